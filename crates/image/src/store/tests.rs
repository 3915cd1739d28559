use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::{BakeOptions, CopyStep, ImageError, Recipe};

fn recipe(copy: Vec<CopyStep>) -> Recipe {
    Recipe {
        copy,
        env: [("VERSION".to_string(), "v1".to_string())].into(),
        entrypoint: Some(vec!["/bin/app".into()]),
        ..Recipe::default()
    }
}

fn copy(src: &str, dst: &str) -> CopyStep {
    CopyStep {
        src: src.into(),
        dst: dst.into(),
        mode: None,
        owner: None,
        libraries: false,
    }
}

/// Writes the same small tree into `dir`; `touch` varies the files' mtimes and permissions noise.
fn write_context(dir: &Path, touch: u32) {
    fs::create_dir_all(dir.join("static/css")).unwrap();
    fs::write(dir.join("app"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(dir.join("app"), fs::Permissions::from_mode(0o700 + touch)).unwrap();
    fs::write(dir.join("static/index.html"), b"<h1>hi</h1>").unwrap();
    fs::write(dir.join("static/css/site.css"), b"h1{}").unwrap();
    fs::set_permissions(
        dir.join("static/index.html"),
        fs::Permissions::from_mode(0o600 + touch),
    )
    .unwrap();
}

fn steps() -> Vec<CopyStep> {
    vec![copy("app", "/bin/app"), copy("static", "/srv/www")]
}

#[test]
fn two_bakes_of_the_same_inputs_give_the_same_digest_and_blobs() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_context(&a.path().join("ctx"), 0);
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_context(&b.path().join("ctx"), 0o44);
    let store_a = ImageStore::open(a.path().join("store")).unwrap();
    let store_b = ImageStore::open(b.path().join("store")).unwrap();
    let one = store_a
        .bake(
            &recipe(steps()),
            &a.path().join("ctx"),
            BakeOptions::default(),
        )
        .unwrap();
    let two = store_b
        .bake(
            &recipe(steps()),
            &b.path().join("ctx"),
            BakeOptions::default(),
        )
        .unwrap();
    assert_eq!(one.digest, two.digest);
    let manifest = store_a.manifest(&one.digest).unwrap();
    for layer in &manifest.layers {
        let bytes_a = fs::read(store_a.blob_path(&layer.digest).unwrap()).unwrap();
        let bytes_b = fs::read(store_b.blob_path(&layer.digest).unwrap()).unwrap();
        assert_eq!(bytes_a, bytes_b, "layer blobs differ");
    }
    // Baking again into the same store is a no-op that yields the same digest.
    let again = store_a
        .bake(
            &recipe(steps()),
            &a.path().join("ctx"),
            BakeOptions::default(),
        )
        .unwrap();
    assert_eq!(again.digest, one.digest);
    assert!(again.steps.iter().all(|s| s.cached), "{:?}", again.steps);
}

#[test]
fn content_env_and_mtime_change_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    write_context(&ctx, 0);
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let base = store
        .bake(&recipe(steps()), &ctx, BakeOptions::default())
        .unwrap()
        .digest;
    let mut other_env = recipe(steps());
    other_env.env.insert("VERSION".into(), "v2".into());
    assert_ne!(
        store
            .bake(&other_env, &ctx, BakeOptions::default())
            .unwrap()
            .digest,
        base
    );
    assert_ne!(
        store
            .bake(
                &recipe(steps()),
                &ctx,
                BakeOptions {
                    mtime: 1,
                    ..BakeOptions::default()
                }
            )
            .unwrap()
            .digest,
        base
    );
    fs::write(ctx.join("static/css/site.css"), b"h2{}").unwrap();
    assert_ne!(
        store
            .bake(&recipe(steps()), &ctx, BakeOptions::default())
            .unwrap()
            .digest,
        base
    );
}

#[test]
fn unpacked_root_holds_the_files_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    write_context(&ctx, 0);
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let image = store
        .bake(&recipe(steps()), &ctx, BakeOptions::default())
        .unwrap();
    let root = store.unpack(&image.digest).unwrap();
    assert_eq!(
        fs::read(root.join("bin/app")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
    assert_eq!(
        fs::read(root.join("srv/www/css/site.css")).unwrap(),
        b"h1{}"
    );
    let app_mode = fs::metadata(root.join("bin/app"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(app_mode, 0o555, "executable, not writable");
    let page_mode = fs::metadata(root.join("srv/www/index.html"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(page_mode, 0o444);
    assert_eq!(
        fs::metadata(root.join("srv")).unwrap().permissions().mode() & 0o777,
        0o555
    );
    assert_eq!(
        store.unpack(&image.digest).unwrap(),
        root,
        "second unpack reuses the root"
    );
    let config = store.config(&image.digest).unwrap();
    assert_eq!(config.entrypoint, vec!["/bin/app"]);
    assert_eq!(config.env, vec!["VERSION=v1"]);
    assert_eq!(config.working_dir, "/");
}

#[test]
fn bad_recipes_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    write_context(&ctx, 0);
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let missing = store.bake(
        &recipe(vec![copy("nope", "/bin/app")]),
        &ctx,
        BakeOptions::default(),
    );
    assert!(
        matches!(missing, Err(ImageError::MissingSource { .. })),
        "{missing:?}"
    );
    let no_entry = store.bake(
        &recipe(vec![copy("static", "/srv")]),
        &ctx,
        BakeOptions::default(),
    );
    let message = no_entry.unwrap_err().to_string();
    assert!(
        message.contains("/bin/app") && message.contains("not in the image"),
        "{message}"
    );
    let escape = store.bake(
        &recipe(vec![copy("app", "/../bin/app")]),
        &ctx,
        BakeOptions::default(),
    );
    assert!(
        matches!(escape, Err(ImageError::BadPath { .. })),
        "{escape:?}"
    );
    let outside = store.bake(
        &recipe(vec![copy("../app", "/bin/app")]),
        &ctx.join("static"),
        BakeOptions::default(),
    );
    assert!(
        matches!(outside, Err(ImageError::Escapes { .. })),
        "{outside:?}"
    );
    // A symlink in the copied tree that names a file of this machine.
    std::os::unix::fs::symlink("/etc/passwd", ctx.join("static/passwd")).unwrap();
    let absolute = store.bake(
        &recipe(vec![copy("app", "/bin/app"), copy("static", "/srv")]),
        &ctx,
        BakeOptions::default(),
    );
    let message = absolute.unwrap_err().to_string();
    assert!(
        message.contains("escapes the build context") && message.contains("/etc/passwd"),
        "{message}"
    );
}

#[test]
fn a_corrupt_blob_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    write_context(&ctx, 0);
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let image = store
        .bake(&recipe(steps()), &ctx, BakeOptions::default())
        .unwrap();
    let layer = store.manifest(&image.digest).unwrap().layers[0]
        .digest
        .clone();
    let path = store.blob_path(&layer).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 9;
    bytes[last] ^= 0xff;
    fs::write(&path, bytes).unwrap();
    let result = store.unpack(&image.digest);
    assert!(result.is_err(), "corrupt layer must not unpack");
    assert!(
        !store
            .roots_dir()
            .join(digest_hex(&image.digest).unwrap())
            .exists()
    );
}
