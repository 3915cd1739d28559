//! Hostile layers: each escape attempt must leave a canary directory outside the root as it
//! was, and the ones a checker can see must be refused by name.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;

/// One raw tar entry: the name is written as given, `..` and leading `/` included.
struct Raw<'a> {
    name: &'a str,
    kind: tar::EntryType,
    data: &'a [u8],
    link: &'a str,
    mode: u32,
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> Raw<'a> {
    Raw {
        name,
        kind: tar::EntryType::Regular,
        data,
        link: "",
        mode: 0o644,
    }
}

fn dir(name: &str, mode: u32) -> Raw<'_> {
    Raw {
        name,
        kind: tar::EntryType::Directory,
        data: b"",
        link: "",
        mode,
    }
}

fn symlink<'a>(name: &'a str, target: &'a str) -> Raw<'a> {
    Raw {
        name,
        kind: tar::EntryType::Symlink,
        data: b"",
        link: target,
        mode: 0o777,
    }
}

fn hardlink<'a>(name: &'a str, target: &'a str) -> Raw<'a> {
    Raw {
        kind: tar::EntryType::Link,
        ..symlink(name, target)
    }
}

/// A tar of `entries`, names and link targets written byte for byte into the headers.
fn layer(entries: &[Raw]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        let name = &mut header.as_old_mut().name;
        name[..entry.name.len()].copy_from_slice(entry.name.as_bytes());
        let link = &mut header.as_old_mut().linkname;
        link[..entry.link.len()].copy_from_slice(entry.link.as_bytes());
        header.set_entry_type(entry.kind);
        header.set_mode(entry.mode);
        header.set_size(entry.data.len() as u64);
        header.set_uid(0);
        header.set_gid(0);
        header.set_cksum();
        builder.append(&header, entry.data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// A root to unpack into and, beside it, a canary directory holding `keep/file`.
struct Scene {
    _dir: tempfile::TempDir,
    root: PathBuf,
    canary: PathBuf,
}

impl Scene {
    fn new() -> Scene {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store/root");
        let canary = dir.path().join("canary");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(canary.join("keep")).unwrap();
        fs::write(canary.join("keep/file"), b"precious").unwrap();
        Scene {
            _dir: dir,
            root,
            canary,
        }
    }

    /// Applies the layers in order, as unpacking an image does.
    fn apply(&self, layers: &[Vec<u8>]) -> Result<(), ImageError> {
        let mut unpacker = Unpacker::new(&self.root, RootLayout::FAITHFUL, Limits::default())?;
        for (i, bytes) in layers.iter().enumerate() {
            unpacker.apply(bytes.as_slice(), &format!("layer{i}"))?;
        }
        unpacker.finish()
    }

    fn assert_canary_untouched(&self) {
        assert_eq!(
            fs::read(self.canary.join("keep/file")).unwrap(),
            b"precious",
            "the canary outside the root was touched"
        );
        let names: Vec<_> = fs::read_dir(&self.canary).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "something was created beside the canary");
    }

    fn canary_abs(&self) -> String {
        self.canary.display().to_string()
    }
}

fn refused(result: Result<(), ImageError>, entry: &str) {
    match result {
        Err(ImageError::UnsafeEntry { entry: named, .. }) => {
            assert!(
                named.contains(entry),
                "error names {named:?}, not {entry:?}"
            )
        }
        other => panic!("expected the entry {entry:?} to be refused, got {other:?}"),
    }
}

#[test]
fn an_absolute_whiteout_is_refused_and_deletes_nothing() {
    let scene = Scene::new();
    let name = format!("{}/.wh.keep", scene.canary_abs());
    refused(scene.apply(&[layer(&[file(&name, b"")])]), ".wh.keep");
    scene.assert_canary_untouched();
}

#[test]
fn a_parent_dir_whiteout_is_refused_and_deletes_nothing() {
    let scene = Scene::new();
    refused(
        scene.apply(&[layer(&[file("../../canary/.wh.keep", b"")])]),
        "../../canary/.wh.keep",
    );
    scene.assert_canary_untouched();
    assert!(
        check_layer(
            layer(&[file("a/../../x", b"")]).as_slice(),
            "l",
            &Limits::default()
        )
        .is_err()
    );
}

#[test]
fn an_opaque_whiteout_under_a_symlink_stays_inside_the_root() {
    let scene = Scene::new();
    let target = scene.canary_abs();
    let first = layer(&[symlink("link", &target)]);
    let second = layer(&[file("link/.wh..wh..opq", b"")]);
    scene.apply(&[first, second]).unwrap();
    scene.assert_canary_untouched();
    // Through a relative link that climbs out, too.
    let scene = Scene::new();
    let first = layer(&[symlink("up", "../../canary")]);
    let second = layer(&[file("up/.wh..wh..opq", b"")]);
    scene.apply(&[first, second]).unwrap();
    scene.assert_canary_untouched();
}

#[test]
fn a_file_replacing_a_directory_outside_lands_inside_the_root() {
    let scene = Scene::new();
    let target = scene.canary_abs();
    let first = layer(&[symlink("link", &target)]);
    // A file where the link's target has a directory, and a file under the link.
    let second = layer(&[file("link/keep", b"evil"), file("link/new", b"evil")]);
    scene.apply(&[first, second]).unwrap();
    scene.assert_canary_untouched();
    // The link dangles inside the root, so it was replaced by a directory there.
    assert_eq!(fs::read(scene.root.join("link/keep")).unwrap(), b"evil");
    // The link itself replaced by a file: the link goes, not what it points to.
    let scene = Scene::new();
    let first = layer(&[symlink("link", &scene.canary_abs())]);
    let second = layer(&[file("link", b"plain")]);
    scene.apply(&[first, second]).unwrap();
    scene.assert_canary_untouched();
    assert_eq!(fs::read(scene.root.join("link")).unwrap(), b"plain");
}

#[test]
fn a_whiteout_under_a_symlink_to_outside_deletes_nothing_outside() {
    let scene = Scene::new();
    let target = format!("{}/keep", scene.canary_abs());
    let first = layer(&[symlink("link", &target)]);
    let second = layer(&[file("link/.wh.file", b"")]);
    scene.apply(&[first, second]).unwrap();
    scene.assert_canary_untouched();
    let scene = Scene::new();
    let first = layer(&[symlink("link", "../../canary/keep")]);
    let second = layer(&[file("link/.wh.file", b"")]);
    scene.apply(&[first, second]).unwrap();
    scene.assert_canary_untouched();
}

#[test]
fn hard_links_out_of_the_root_are_refused() {
    let scene = Scene::new();
    let target = format!("{}/keep/file", scene.canary_abs());
    refused(
        scene.apply(&[layer(&[hardlink("h", &target)])]),
        "hard link",
    );
    refused(
        scene.apply(&[layer(&[hardlink("h", "../canary/keep/file")])]),
        "../canary/keep/file",
    );
    scene.assert_canary_untouched();
    // Inside the root they work.
    let scene = Scene::new();
    scene
        .apply(&[layer(&[file("a", b"same"), hardlink("b", "a")])])
        .unwrap();
    let (a, b) = (
        fs::metadata(scene.root.join("a")).unwrap(),
        fs::metadata(scene.root.join("b")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
}

#[test]
fn a_layer_past_the_size_limit_is_refused() {
    let scene = Scene::new();
    let limits = Limits {
        max_layer_bytes: 1000,
    };
    let big = vec![7u8; 600];
    let bytes = layer(&[file("a", &big), file("b", &big)]);
    let mut unpacker = Unpacker::new(&scene.root, RootLayout::FAITHFUL, limits).unwrap();
    match unpacker.apply(bytes.as_slice(), "big") {
        Err(ImageError::TooLarge { limit: 1000, .. }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(matches!(
        check_layer(bytes.as_slice(), "big", &limits),
        Err(ImageError::TooLarge { .. })
    ));
    assert_eq!(
        check_layer(layer(&[file("a", &big)]).as_slice(), "ok", &limits).unwrap(),
        600
    );
}

#[test]
fn read_only_directories_get_their_mode_after_their_entries() {
    let scene = Scene::new();
    let bytes = layer(&[
        dir("ro", 0o555),
        file("ro/inner", b"x"),
        dir("ro/sub", 0o500),
    ]);
    scene.apply(&[bytes]).unwrap();
    let mode = |p: &str| fs::metadata(scene.root.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("ro"), 0o555);
    assert_eq!(mode("ro/sub"), 0o500);
    assert_eq!(fs::read(scene.root.join("ro/inner")).unwrap(), b"x");
}

#[test]
fn set_id_bits_survive_only_in_shifted_layouts() {
    let suid = Raw {
        mode: 0o4755,
        ..file("bin/su", b"#!")
    };
    let host = RootLayout::HOST;
    assert_eq!(host.mode(0o4755), 0o555);
    assert_eq!(host.mode(0o2775), 0o555);
    assert_eq!(RootLayout::mapped(0).mode(0o4755), 0o755);
    assert_eq!(RootLayout::mapped(100_000).mode(0o4755), 0o4755);
    let scene = Scene::new();
    let mut unpacker = Unpacker::new(&scene.root, host, Limits::default()).unwrap();
    unpacker.apply(layer(&[suid]).as_slice(), "l").unwrap();
    unpacker.finish().unwrap();
    let meta = fs::metadata(scene.root.join("bin/su")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o555);
}

#[test]
fn missing_parents_follow_links_inside_the_root() {
    // Debian's merged /usr: `lib` is a link to `usr/lib`.
    let scene = Scene::new();
    let first = layer(&[
        dir("usr", 0o755),
        dir("usr/lib", 0o755),
        symlink("lib", "usr/lib"),
    ]);
    let second = layer(&[file("lib/x86_64/libc.so", b"elf")]);
    scene.apply(&[first, second]).unwrap();
    assert_eq!(
        fs::read(scene.root.join("usr/lib/x86_64/libc.so")).unwrap(),
        b"elf"
    );
    assert!(
        fs::symlink_metadata(scene.root.join("lib"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn entries_with_nul_or_absolute_names_are_refused_by_the_checker() {
    let limits = Limits::default();
    for bad in ["/etc/passwd", "a/../../b", "../x"] {
        let result = check_layer(layer(&[file(bad, b"")]).as_slice(), "l", &limits);
        assert!(
            matches!(result, Err(ImageError::UnsafeEntry { .. })),
            "{bad}: {result:?}"
        );
    }
    assert!(check_layer(layer(&[file("./ok/../ok2", b"")]).as_slice(), "l", &limits).is_err());
    assert!(check_layer(layer(&[file("./fine/a", b"")]).as_slice(), "l", &limits).is_ok());
}

#[test]
fn the_layer_size_limit_is_configurable() {
    assert_eq!(Limits::parse("3MiB").unwrap().max_layer_bytes, 3 << 20);
    assert_eq!(Limits::parse("1000").unwrap().max_layer_bytes, 1000);
    let error = Limits::parse("lots").unwrap_err().to_string();
    assert!(
        error.contains("PHOENIX_MAX_LAYER_SIZE=\"lots\" is not a size"),
        "{error}"
    );
    assert!(Limits::parse("0").is_err() && Limits::parse("99999999TiB").is_err());
}

/// Deterministic junk: xorshift64 from `seed`.
fn junk(seed: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 24) as u8
        })
        .collect()
}

#[test]
fn generated_hostile_layers_never_touch_anything_outside_the_root() {
    // The fuzz target's inputs, seeded: entries of every kind whose names and link targets
    // mix the scene's outward links, `..`, `/`, whiteouts and opaque markers; then the raw
    // bytes of real layers with a few bytes changed and cut short, gzipped or not.
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..1500 {
        let len = 1 + usize::from(junk(&mut seed, 1)[0] % 96);
        let mut input = junk(&mut seed, len);
        input[0] |= 1;
        crate::fuzzing::layer(&input);
    }
    let real = layer(&[
        dir("etc", 0o755),
        file("etc/passwd", b"root:x:0:0::/:/bin/sh\n"),
        symlink("abs/x", "/etc"),
        file("rel/.wh.keep", b""),
        file("dir/up/.wh..wh..opq", b""),
    ]);
    let gzipped = {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, &real).unwrap();
        encoder.finish().unwrap()
    };
    for original in [real, gzipped] {
        for _ in 0..300 {
            let mut bytes = original.clone();
            let edits = junk(&mut seed, 8);
            for pair in edits.chunks(2) {
                let at = usize::from(pair[0]) * bytes.len() / 256;
                bytes[at] = pair[1];
            }
            let cut = bytes.len() - bytes.len() * usize::from(junk(&mut seed, 1)[0]) / 1024;
            let mut input = vec![0];
            input.extend_from_slice(&bytes[..cut]);
            crate::fuzzing::layer(&input);
        }
    }
}

#[test]
fn generated_hostile_archives_never_touch_anything_outside_the_root() {
    // The `archive` fuzz target's inputs, seeded: entries of every kind, then archives whose
    // links lead out of the scratch directory they are read into, raw and gzipped.
    let mut seed = 0x517c_c1b7_2722_0a95;
    for _ in 0..400 {
        let len = 1 + usize::from(junk(&mut seed, 1)[0] % 96);
        let mut input = junk(&mut seed, len);
        input[0] |= 1;
        crate::fuzzing::archive(&input);
    }
    for hostile in [
        layer(&[
            symlink("blobs", "../../outside"),
            file("blobs/sha256/aa", b"x"),
            file("index.json", b"{}"),
        ]),
        layer(&[
            symlink("index.json", "/etc/passwd"),
            file("oci-layout", b"{}"),
        ]),
        layer(&[file("../outside/keep/file", b"overwritten")]),
    ] {
        let mut input = vec![0];
        input.extend_from_slice(&hostile);
        crate::fuzzing::archive(&input);
    }
}
