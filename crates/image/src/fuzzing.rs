//! Layer unpacking without a store, for `cargo fuzz` (see `fuzz/`) and the seeded test: any
//! bytes become a layer applied over a root whose links point out of it, and a directory
//! beside the root must come out exactly as it went in. Not part of the API.
//!
//! The scene lives under the temporary directory; only its `outside` directory is a target.
//! Still, fuzz on a machine you can throw away: a containment bug is what this looks for.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::unpack::{Limits, RootLayout, Unpacker, check_layer, remove_path};

/// Small enough that the size limit is reached within a fuzzing run.
const FUZZ_LIMITS: Limits = Limits {
    max_layer_bytes: 1 << 20,
};

/// Applies `data` as a layer. An even first byte: the rest is the layer's bytes as they come
/// (tar, or gzip when it starts like gzip). An odd one: the rest describes entries (kinds,
/// names, link targets, modes) that are written as a well-formed tar, so that the unpacker
/// rather than the tar reader's checksum test meets them. Panics if anything outside the
/// root changed.
pub fn layer(data: &[u8]) {
    let Some((scene, bytes)) = scene_and_bytes(data) else {
        return;
    };
    let _ = check_layer(decoded(&bytes), "fuzz", &FUZZ_LIMITS);
    if let Ok(mut unpacker) = Unpacker::new(&scene.root, RootLayout::FAITHFUL, FUZZ_LIMITS)
        && unpacker.apply(decoded(&bytes), "fuzz").is_ok()
    {
        let _ = unpacker.finish();
    }
    scene.assert_outside_untouched();
}

/// Imports `data` as an OCI archive (`phoenix import`) into a store inside a root whose
/// links point out of it. An even first byte: the rest is the archive as it comes. An odd one:
/// entries described byte by byte, written as a well-formed tar. Panics if anything outside
/// the root changed.
pub fn archive(data: &[u8]) {
    let Some((scene, bytes)) = scene_and_bytes(data) else {
        return;
    };
    let input = scene.root.join("dir/input.tar");
    if fs::write(&input, &bytes).is_ok()
        && let Ok(store) = crate::ImageStore::open(scene.root.join("store"))
    {
        let _ = store.import(&input, None);
    }
    scene.assert_outside_untouched();
}

/// A fresh scene, and the tar bytes `data` stands for: its tail as it is (an even first
/// byte) or the entries it describes written as a well-formed tar (an odd one).
fn scene_and_bytes(data: &[u8]) -> Option<(Scene, Vec<u8>)> {
    let (&first, rest) = data.split_first()?;
    let scene = Scene::new();
    let bytes = if first % 2 == 0 {
        rest.to_vec()
    } else {
        generated_layer(rest, &scene.outside)
    };
    Some((scene, bytes))
}

fn decoded(bytes: &[u8]) -> Box<dyn Read + '_> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(bytes))
    } else {
        Box::new(bytes)
    }
}

/// `base/root` holding links to `base/outside` (absolute and climbing), and `base/outside`
/// holding `keep/file`.
struct Scene {
    base: PathBuf,
    root: PathBuf,
    outside: PathBuf,
}

impl Scene {
    fn new() -> Scene {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir().join(format!(
            "phoenix-fuzz-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let (root, outside) = (base.join("root"), base.join("outside"));
        remove_path(&base);
        fs::create_dir_all(root.join("dir")).expect("create the fuzz root");
        fs::create_dir_all(outside.join("keep")).expect("create the canary");
        fs::write(outside.join("keep/file"), b"precious").expect("write the canary");
        for dir in [&base, &outside, &outside.join("keep")] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        for (name, target) in [
            ("abs", outside.clone()),
            ("rel", PathBuf::from("../outside")),
            ("file", outside.join("keep/file")),
            ("dir/up", PathBuf::from("../../outside/keep")),
        ] {
            symlink(target, root.join(name)).expect("link out of the root");
        }
        Scene {
            base,
            root,
            outside,
        }
    }

    fn assert_outside_untouched(&self) {
        let names = |dir: &Path| -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            names
        };
        assert_eq!(names(&self.base), ["outside", "root"], "beside the root");
        assert_eq!(names(&self.outside), ["keep"], "in the canary directory");
        assert_eq!(names(&self.outside.join("keep")), ["file"], "in keep/");
        let file = self.outside.join("keep/file");
        assert_eq!(fs::read(&file).ok().as_deref(), Some(&b"precious"[..]));
        for (path, mode) in [
            (&self.outside, 0o40755),
            (&self.outside.join("keep"), 0o40755),
            (&file, 0o100644),
        ] {
            let meta = fs::symlink_metadata(path).expect("the canary is there");
            assert_eq!(meta.mode(), mode, "the mode of {}", path.display());
            assert_eq!(
                (meta.uid(), meta.gid()),
                own_ids(),
                "the owner of {}",
                path.display()
            );
        }
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        remove_path(&self.base);
    }
}

/// This process's effective uid and gid (what owns the files it creates).
fn own_ids() -> (u32, u32) {
    fs::metadata("/proc/self")
        .map(|m| (m.uid(), m.gid()))
        .unwrap_or((0, 0))
}

/// Path pieces a hostile layer would use: the scene's links, climbs, whiteouts.
const PIECES: &[&str] = &[
    "abs",
    "rel",
    "file",
    "dir",
    "up",
    "..",
    ".",
    "",
    "keep",
    "outside",
    ".wh..wh..opq",
    ".wh.keep",
    ".wh.file",
    ".wh.abs",
    ".wh.dir",
    "new",
];

/// A well-formed tar of the entries `spec` describes, byte by byte.
fn generated_layer(spec: &[u8], outside: &Path) -> Vec<u8> {
    let mut bytes = spec.iter().copied();
    let mut builder = tar::Builder::new(Vec::new());
    while let Some(kind) = bytes.next() {
        let name = path_from(&mut bytes, None);
        let target = path_from(&mut bytes, Some(outside));
        let mode = (u32::from(bytes.next().unwrap_or(0)) << 4) | (0o4000 * u32::from(kind >> 7));
        let content = vec![b'x'; usize::from(bytes.next().unwrap_or(0) % 8)];
        let mut header = tar::Header::new_gnu();
        let (entry_type, data) = match kind % 6 {
            0 => (tar::EntryType::Regular, &content[..]),
            1 => (tar::EntryType::Directory, &[][..]),
            2 => (tar::EntryType::Symlink, &[][..]),
            3 => (tar::EntryType::Link, &[][..]),
            4 => (tar::EntryType::Fifo, &[][..]),
            _ => (tar::EntryType::Char, &[][..]),
        };
        if !fits(&name, &header.as_old().name) || !fits(&target, &header.as_old().linkname) {
            continue;
        }
        header.as_old_mut().name[..name.len()].copy_from_slice(&name);
        header.as_old_mut().linkname[..target.len()].copy_from_slice(&target);
        header.set_entry_type(entry_type);
        header.set_mode(mode & 0o7777);
        header.set_size(data.len() as u64);
        header.set_cksum();
        if builder.append(&header, data).is_err() {
            break;
        }
    }
    builder.into_inner().unwrap_or_default()
}

fn fits(value: &[u8], field: &[u8]) -> bool {
    value.len() < field.len()
}

/// One to four pieces joined by `/`; a link target may start at `/` or at the canary.
fn path_from(bytes: &mut impl Iterator<Item = u8>, outside: Option<&Path>) -> Vec<u8> {
    let head = bytes.next().unwrap_or(0);
    let mut path = match (head % 4, outside) {
        (1, _) => b"/".to_vec(),
        (2, Some(outside)) => format!("{}/", outside.display()).into_bytes(),
        _ => Vec::new(),
    };
    for i in 0..=(head >> 2) % 4 {
        if i > 0 {
            path.push(b'/');
        }
        let piece = PIECES[usize::from(bytes.next().unwrap_or(0)) % PIECES.len()];
        path.extend_from_slice(piece.as_bytes());
    }
    path
}
