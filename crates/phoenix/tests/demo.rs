//! The README's first command: `phoenix demo`, on the isolating driver (root, in a network
//! namespace of its own) and for a user without root (the process driver, with a warning).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use common::{hello_bin, phoenix_bin, text};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn demo_passed(output: &Output) -> String {
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "the demo failed ({}):\n{stdout}\n{}",
        output.status,
        text(&output.stderr)
    );
    assert!(
        stdout.contains("requests failed                    0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("0 failed requests: every deploy, abort and crash was invisible"),
        "{stdout}"
    );
    stdout
}

#[test]
fn the_demo_runs_on_the_isolating_driver() {
    if !is_root() {
        eprintln!("skipped: the isolating driver needs root");
        return;
    }
    let netns = common::Netns::new();
    let mut command = Command::new(phoenix_bin());
    command.arg("demo");
    netns.apply(&mut command);
    let stdout = demo_passed(&command.output().unwrap());
    assert!(
        stdout.contains("instances run with the isolating driver, on bridge phx"),
        "{stdout}"
    );
    assert!(stdout.contains("(isolating driver, pid"), "{stdout}");
}

#[test]
fn the_demo_runs_for_a_user_without_root() {
    // The binaries where that user may run them (a clone's target directory may be private).
    let place = tempfile::tempdir().unwrap();
    std::fs::set_permissions(place.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for bin in [phoenix_bin(), hello_bin()] {
        let to = place.path().join(bin.file_name().unwrap());
        std::fs::copy(&bin, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let tmp = place.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut command = Command::new(place.path().join("phoenix"));
    command.arg("demo").env("TMPDIR", &tmp).current_dir(&tmp);
    if is_root() {
        // nobody, as a user trying Phoenix without root is.
        std::os::unix::fs::chown(&tmp, Some(65534), Some(65534)).unwrap();
        // (std drops the supplementary groups with the uid.)
        command.uid(65534).gid(65534).env("HOME", &tmp);
    }
    let stdout = demo_passed(&command.output().unwrap());
    assert!(
        stdout.contains(
            "warning: role web: instances run with the process driver, without isolation"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("containers need root"), "{stdout}");
}
