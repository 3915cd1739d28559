//! Bakes through the public API on real files, with real `run` steps (overlayfs and
//! namespaces through util-linux's `unshare`, a static busybox as the image's shell).

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use phoenix_image::{
    BakeOptions, Base, Command, CopyStep, FileKind, ImageError, ImageStore, Recipe, RunStep, Step,
};

/// The static busybox from Debian's `busybox-static`, or why the test cannot run here.
fn busybox() -> Option<PathBuf> {
    let path = PathBuf::from("/bin/busybox");
    let root = unsafe { libc_geteuid() } == 0;
    let usable = root && path.is_file() && Path::new("/usr/bin/unshare").exists();
    if usable {
        return Some(path);
    }
    let why = "run steps need root, util-linux's unshare and busybox-static";
    assert!(
        std::env::var_os("PHOENIX_REQUIRE_TOOLS").is_none(),
        "PHOENIX_REQUIRE_TOOLS is set but {why}"
    );
    eprintln!("skipped: {why}");
    None
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A build context with `rootfs/` (busybox as /bin/sh, and /bin/gone) and `app/`.
fn context(dir: &Path, busybox: &Path) {
    let bin = dir.join("rootfs/bin");
    fs::create_dir_all(&bin).unwrap();
    fs::copy(busybox, bin.join("busybox")).unwrap();
    symlink("busybox", bin.join("sh")).unwrap();
    fs::write(bin.join("gone"), "to be deleted").unwrap();
    fs::create_dir_all(dir.join("app/static")).unwrap();
    fs::write(dir.join("app/static/index.html"), "<h1>hi</h1>").unwrap();
    fs::write(dir.join("app/run.sh"), "#!/bin/sh\necho up\n").unwrap();
    fs::set_permissions(dir.join("app/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
}

fn run(line: &str) -> Step {
    Step::Run(RunStep {
        run: Command::Shell(line.into()),
        network: false,
        timeout: None,
    })
}

fn copy(src: &str, dst: &str, owner: Option<&str>) -> Step {
    Step::Copy(CopyStep {
        src: src.into(),
        dst: dst.into(),
        mode: None,
        owner: owner.map(Into::into),
        libraries: false,
    })
}

fn recipe() -> Recipe {
    Recipe {
        from: Base::Dir("rootfs".into()),
        steps: vec![
            run(
                "mkdir -p /etc && echo hello > /etc/greeting && rm /bin/gone \
                 && echo $$ > /pid && cat /proc/net/dev > /net && echo $GREETING > /env",
            ),
            copy("app", "/srv/app", Some("1000:1000")),
        ],
        env: [("GREETING".to_string(), "from-env".to_string())].into(),
        entrypoint: Some(vec!["/srv/app/run.sh".into()]),
        user: Some("1000".into()),
        labels: [("org.example.team".to_string(), "web".to_string())].into(),
        expose: vec!["8080".into()],
        ..Recipe::default()
    }
}

/// Every blob file name and cache record in a store.
fn store_listing(store: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for dir in ["blobs/sha256", "cache/layers"] {
        if let Ok(entries) = fs::read_dir(store.join(dir)) {
            names.extend(
                entries
                    .flatten()
                    .map(|e| format!("{dir}/{:?}", e.file_name())),
            );
        }
    }
    names.sort();
    names
}

#[test]
fn run_steps_make_layers_in_namespaces_and_unchanged_rebakes_do_no_work() {
    let Some(busybox) = busybox() else { return };
    let dir = tempfile::tempdir().unwrap();
    context(dir.path(), &busybox);
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let image = store
        .bake(
            &recipe(),
            dir.path(),
            BakeOptions {
                mtime: 1_700_000_000,
                ..BakeOptions::default()
            },
        )
        .unwrap();
    assert_eq!(image.steps.len(), 3, "{:?}", image.steps);
    assert!(image.steps.iter().all(|s| !s.cached));
    let manifest = store.manifest(&image.digest).unwrap();
    assert_eq!(manifest.layers.len(), 3, "base, run, copy: one layer each");

    // The run step's changes, including a deletion, are in the image.
    let files = store.files(&image.digest).unwrap();
    assert!(files.get("bin/gone").is_none(), "the run step deleted it");
    assert_eq!(files.get("etc/greeting").unwrap().kind, FileKind::File);
    let app = files.get("srv/app/run.sh").unwrap();
    assert_eq!((app.uid, app.gid, app.mode), (1000, 1000, 0o755));
    assert_eq!(files.root, image.files_root);
    let root = store.unpack(&image.digest).unwrap();
    assert!(!root.join("bin/gone").exists());
    assert_eq!(
        fs::read_to_string(root.join("etc/greeting")).unwrap(),
        "hello\n"
    );
    // PID namespace: the command was PID 1. Network namespace: loopback only.
    assert_eq!(fs::read_to_string(root.join("pid")).unwrap(), "1\n");
    let net = fs::read_to_string(root.join("net")).unwrap();
    let interfaces: Vec<&str> = net.lines().skip(2).map(|l| l.trim()).collect();
    assert!(
        interfaces.len() == 1 && interfaces[0].starts_with("lo:"),
        "{net}"
    );
    assert_eq!(fs::read_to_string(root.join("env")).unwrap(), "from-env\n");

    // The config carries every recipe field.
    let config = store.config(&image.digest).unwrap();
    assert_eq!(config.user, "1000");
    assert_eq!(config.labels["org.example.team"], "web");
    assert!(config.exposed_ports.contains_key("8080/tcp"));
    assert_eq!(config.env, ["GREETING=from-env"]);

    // Unchanged: every step from the cache, the same digest, and no blob written.
    let before = store_listing(&dir.path().join("store"));
    let started = Instant::now();
    let again = store
        .bake(
            &recipe(),
            dir.path(),
            BakeOptions {
                mtime: 1_700_000_000,
                ..BakeOptions::default()
            },
        )
        .unwrap();
    eprintln!("unchanged rebake: {:?}", started.elapsed());
    assert_eq!(again.digest, image.digest);
    assert!(again.steps.iter().all(|s| s.cached), "{:?}", again.steps);
    assert_eq!(store_listing(&dir.path().join("store")), before);

    // A changed copy source rebuilds only the copy layer.
    fs::write(dir.path().join("app/static/index.html"), "<h1>v2</h1>").unwrap();
    let changed = store
        .bake(
            &recipe(),
            dir.path(),
            BakeOptions {
                mtime: 1_700_000_000,
                ..BakeOptions::default()
            },
        )
        .unwrap();
    let cached: Vec<bool> = changed.steps.iter().map(|s| s.cached).collect();
    assert_eq!(cached, [true, true, false]);
    assert_ne!(changed.digest, image.digest);
}

#[test]
fn a_failing_run_step_shows_its_output_and_leaves_the_store_unchanged() {
    let Some(busybox) = busybox() else { return };
    let dir = tempfile::tempdir().unwrap();
    context(dir.path(), &busybox);
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let before = store_listing(&dir.path().join("store"));
    let mut failing = recipe();
    failing.steps = vec![
        run("echo made > /made"),
        run("echo 'something broke' >&2; exit 3"),
    ];
    let error = store
        .bake(&failing, dir.path(), BakeOptions::default())
        .unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, ImageError::RunFailed { .. })
            && message.contains("something broke")
            && message.contains("exit status: 3"),
        "{message}"
    );
    assert_eq!(
        store_listing(&dir.path().join("store")),
        before,
        "the base and first step's layers were removed again"
    );
    let leftovers: Vec<_> = fs::read_dir(dir.path().join("store/tmp"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "scratch directories are removed");
}

#[test]
fn a_run_step_past_its_timeout_is_killed_with_its_children_and_named() {
    let Some(busybox) = busybox() else { return };
    let dir = tempfile::tempdir().unwrap();
    context(dir.path(), &busybox);
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let before = store_listing(&dir.path().join("store"));
    let mut hanging = recipe();
    // A child in the background and one in the foreground: both must go.
    let marker = format!("phoenix-timeout-{}", std::process::id());
    hanging.steps = vec![Step::Run(RunStep {
        run: Command::Shell(format!(
            "echo started; sleep 300 & exec sleep 301 # {marker}"
        )),
        network: false,
        timeout: Some(std::time::Duration::from_secs(1)),
    })];
    let error = store
        .bake(&hanging, dir.path(), BakeOptions::default())
        .unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, ImageError::RunTimedOut { .. })
            && message.contains("was killed after its timeout of 1s")
            && message.contains("started"),
        "{message}"
    );
    assert_eq!(store_listing(&dir.path().join("store")), before);
    let survivors = || -> Vec<String> {
        fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains("sleep 30") && !c.contains("cargo"))
            .collect()
    };
    // The kernel tears the PID namespace down after its init dies: the killed children may
    // still be listed for a moment, never for long.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !survivors().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(survivors().is_empty(), "{:?}", survivors());
}

#[test]
fn a_missing_or_escaping_source_fails_after_the_base_and_leaves_the_store_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    fs::create_dir_all(ctx.join("rootfs/bin")).unwrap();
    fs::write(ctx.join("rootfs/bin/app"), "#!/bin/sh\n").unwrap();
    fs::create_dir_all(ctx.join("site")).unwrap();
    fs::write(dir.path().join("secret"), "outside the context").unwrap();
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let before = store_listing(&dir.path().join("store"));
    let with_copy = |src: &str| Recipe {
        from: Base::Dir("rootfs".into()),
        steps: vec![copy(src, "/srv/site", None)],
        entrypoint: Some(vec!["/bin/app".into()]),
        ..Recipe::default()
    };
    // Each fails after the base layer was written: that layer is removed again.
    let missing = store
        .bake(&with_copy("nope"), &ctx, BakeOptions::default())
        .unwrap_err();
    assert!(
        matches!(missing, ImageError::MissingSource { .. }) && missing.to_string().contains("nope"),
        "{missing}"
    );
    assert_eq!(store_listing(&dir.path().join("store")), before);
    let dotdot = store
        .bake(&with_copy("../secret"), &ctx, BakeOptions::default())
        .unwrap_err();
    assert!(matches!(dotdot, ImageError::Escapes { .. }), "{dotdot}");
    assert_eq!(store_listing(&dir.path().join("store")), before);
    symlink(dir.path().join("secret"), ctx.join("site/key")).unwrap();
    let link = store
        .bake(&with_copy("site"), &ctx, BakeOptions::default())
        .unwrap_err();
    assert!(
        link.to_string().contains("escapes the build context")
            && link.to_string().contains("secret"),
        "{link}"
    );
    assert_eq!(store_listing(&dir.path().join("store")), before);
}

#[test]
fn two_clones_bake_byte_identical_images_at_different_times() {
    let Some(busybox) = busybox() else { return };
    let bake = |umask_mode: u32| {
        let dir = tempfile::tempdir().unwrap();
        context(dir.path(), &busybox);
        // Another clone: other modes (only the executable bit counts) and other mtimes.
        fs::set_permissions(
            dir.path().join("app/static/index.html"),
            fs::Permissions::from_mode(umask_mode),
        )
        .unwrap();
        let store = ImageStore::open(dir.path().join("store")).unwrap();
        let image = store
            .bake(
                &recipe(),
                dir.path(),
                BakeOptions {
                    mtime: 1_600_000_000,
                    ..BakeOptions::default()
                },
            )
            .unwrap();
        let mut blobs: Vec<(String, Vec<u8>)> = fs::read_dir(dir.path().join("store/blobs/sha256"))
            .unwrap()
            .flatten()
            .map(|e| {
                (
                    e.file_name().into_string().unwrap(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        blobs.sort();
        (image.digest, blobs, dir)
    };
    let (one, blobs_one, _a) = bake(0o644);
    std::thread::sleep(Duration::from_millis(1100));
    let (two, blobs_two, _b) = bake(0o600);
    assert_eq!(one, two);
    assert_eq!(blobs_one.len(), blobs_two.len());
    for ((name_a, a), (name_b, b)) in blobs_one.iter().zip(&blobs_two) {
        assert_eq!(name_a, name_b);
        assert!(a == b, "blob {name_a} differs");
    }
}

#[test]
fn export_import_and_oci_bases_keep_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path();
    fs::create_dir_all(ctx.join("app")).unwrap();
    fs::write(ctx.join("app/run.sh"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(ctx.join("app/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    let store = ImageStore::open(ctx.join("store")).unwrap();
    let base = Recipe {
        copy: vec![CopyStep {
            src: "app".into(),
            dst: "/app".into(),
            mode: None,
            owner: None,
            libraries: false,
        }],
        entrypoint: Some(vec!["/app/run.sh".into()]),
        ..Recipe::default()
    };
    let image = store.bake(&base, ctx, BakeOptions::default()).unwrap();
    let export = |path: &Path| {
        store
            .export(&image.digest, "base:v1", fs::File::create(path).unwrap())
            .unwrap();
        fs::read(path).unwrap()
    };
    let archive = ctx.join("base.tar");
    assert_eq!(
        export(&archive),
        export(&ctx.join("again.tar")),
        "exports are reproducible"
    );

    let other = ImageStore::open(ctx.join("other")).unwrap();
    let imported = other.import(&archive, None).unwrap();
    assert_eq!(imported.len(), 1);
    assert_eq!(imported[0].digest, image.digest);
    assert_eq!(imported[0].name, "base:v1");
    assert_eq!(
        other.files(&image.digest).unwrap(),
        store.files(&image.digest).unwrap()
    );
    assert!(
        other
            .unpack(&image.digest)
            .unwrap()
            .join("app/run.sh")
            .is_file()
    );

    // An OCI archive as a base, and an image in the store by name as a base.
    let on_top = |from: Base| Recipe {
        from,
        copy: vec![CopyStep {
            src: "app/run.sh".into(),
            dst: "/bin/extra".into(),
            mode: Some(0o700),
            owner: None,
            libraries: false,
        }],
        ..Recipe::default()
    };
    let oci_base = on_top(Base::Oci {
        path: "base.tar".into(),
        reference: Some("v1".into()),
    });
    let from_oci = store.bake(&oci_base, ctx, BakeOptions::default()).unwrap();
    // Again: the archive is known by content and not imported a second time.
    let again = store.bake(&oci_base, ctx, BakeOptions::default()).unwrap();
    assert_eq!(again.digest, from_oci.digest);
    assert!(again.steps.iter().all(|s| s.cached), "{:?}", again.steps);
    let memos = fs::read_dir(ctx.join("store/cache/oci")).unwrap().count();
    assert_eq!(memos, 1, "one remembered import");
    store
        .write_index(&[("base".into(), image.digest.clone())])
        .unwrap();
    let from_name = store
        .bake(
            &on_top(Base::Image("base".into())),
            ctx,
            BakeOptions::default(),
        )
        .unwrap();
    assert_eq!(from_oci.digest, from_name.digest, "same base, same image");
    let config = store.config(&from_name.digest).unwrap();
    assert_eq!(
        config.entrypoint,
        ["/app/run.sh"],
        "inherited from the base"
    );
    let files = store.files(&from_name.digest).unwrap();
    assert_eq!(files.get("bin/extra").unwrap().mode, 0o700);
    assert!(files.get("app/run.sh").is_some());

    let missing = store.bake(
        &on_top(Base::Image("nope".into())),
        ctx,
        BakeOptions::default(),
    );
    assert!(missing.unwrap_err().to_string().contains("nope"));
}

#[test]
fn tar_bases_and_drift_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path();
    let rootfs = ctx.join("rootfs");
    fs::create_dir_all(rootfs.join("etc")).unwrap();
    fs::create_dir_all(rootfs.join("bin")).unwrap();
    fs::write(rootfs.join("etc/config"), "port = 80\n").unwrap();
    fs::write(rootfs.join("etc/keep"), "keep").unwrap();
    fs::write(rootfs.join("bin/app"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(rootfs.join("bin/app"), fs::Permissions::from_mode(0o755)).unwrap();
    let status = std::process::Command::new("tar")
        .args(["-czf", "root.tar.gz", "-C", "rootfs", "."])
        .current_dir(ctx)
        .status()
        .unwrap();
    assert!(status.success());
    let store = ImageStore::open(ctx.join("store")).unwrap();
    let recipe = Recipe {
        from: Base::Tar("root.tar.gz".into()),
        entrypoint: Some(vec!["/bin/app".into()]),
        ..Recipe::default()
    };
    let image = store.bake(&recipe, ctx, BakeOptions::default()).unwrap();
    assert_eq!(
        store
            .bake(&recipe, ctx, BakeOptions::default())
            .unwrap()
            .digest,
        image.digest
    );
    let root = store.unpack(&image.digest).unwrap();
    assert!(store.drift(&image.digest, false).unwrap().is_clean());

    // Someone patches the server in place.
    let config = root.join("etc/config");
    fs::set_permissions(root.join("etc"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&config, "port = 81\n").unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o444)).unwrap();
    fs::write(root.join("etc/backdoor"), "x").unwrap();
    fs::remove_file(root.join("etc/keep")).unwrap();
    fs::set_permissions(root.join("bin/app"), fs::Permissions::from_mode(0o4555)).unwrap();
    let drift = store.drift(&image.digest, false).unwrap();
    assert_eq!(drift.added, ["etc/backdoor"]);
    assert_eq!(drift.removed, ["etc/keep"]);
    let changed: Vec<(&str, &Vec<&str>)> = drift
        .changed
        .iter()
        .map(|c| (c.path.as_str(), &c.what))
        .collect();
    assert_eq!(
        changed,
        [("bin/app", &vec!["mode"]), ("etc/config", &vec!["content"])]
    );
    assert_eq!(
        drift.hashed, 2,
        "only the files whose status changed were read"
    );

    // Unpacking again restores the image.
    store
        .reunpack(&image.digest, phoenix_image::RootLayout::HOST)
        .unwrap();
    assert!(store.drift(&image.digest, true).unwrap().is_clean());

    // gc keeps what the index or the caller names, and removes the rest.
    fs::write(rootfs.join("etc/config"), "port = 82\n").unwrap();
    let newer = Recipe {
        from: Base::Dir("rootfs".into()),
        ..recipe.clone()
    };
    let second = store.bake(&newer, ctx, BakeOptions::default()).unwrap();
    store
        .write_index(&[("app".into(), second.digest.clone())])
        .unwrap();
    let report = store.gc(&[]).unwrap();
    assert!(report.blobs >= 3 && report.roots == 1, "{report:?}");
    assert!(!store.contains(&image.digest));
    assert!(
        store
            .unpack(&second.digest)
            .unwrap()
            .join("bin/app")
            .exists()
    );
    assert_eq!(store.gc(&[]).unwrap().blobs, 0);
}
