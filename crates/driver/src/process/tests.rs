use std::os::unix::fs::PermissionsExt;

use std::os::unix::process::CommandExt;

use super::*;

/// An image root holding one shell script at /bin/app.
fn root_with_script(dir: &Path, script: &str) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("srv")).unwrap();
    std::fs::write(root.join("bin/app"), format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(root.join("bin/app"), std::fs::Permissions::from_mode(0o755)).unwrap();
    root
}

fn spec(dir: &Path, root: PathBuf) -> InstanceSpec {
    InstanceSpec {
        name: "web-abc123".into(),
        role: "web".into(),
        root,
        argv: vec!["/bin/app".into(), "one".into()],
        env: vec![
            ("VERSION".into(), "v7".into()),
            ("PATH".into(), "/usr/bin:/bin".into()),
        ],
        workdir: "/srv".into(),
        user: String::new(),
        log_path: dir.join("web-abc123.log"),
        output: None,
        network: Network::Host,
        port: None,
        host_ip: std::net::Ipv4Addr::LOCALHOST,
        resources: crate::Resources::default(),
        secrets: Vec::new(),
        // The tests may run as root: the process driver runs instances as its caller.
        allow_root: true,
        hosts: Vec::new(),
    }
}

#[tokio::test]
async fn runs_inside_the_root_with_only_its_own_environment() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_with_script(
        dir.path(),
        r#"echo "args=$1 port=$PORT name=$PHOENIX_INSTANCE v=$VERSION home=${HOME:-none} cwd=$(pwd)"; echo oops >&2"#,
    );
    let spec = spec(dir.path(), root.clone());
    let (mut process, address) = ProcessDriver.start(&spec).unwrap();
    assert!(address.ip().is_loopback());
    assert_eq!(process.exited().await, Exit::new("exit code 0"));
    let log = std::fs::read_to_string(&spec.log_path).unwrap();
    let expected = format!(
        "args=one port={} name=web-abc123 v=v7 home=none cwd={}\noops\n",
        address.port(),
        root.join("srv").display()
    );
    assert_eq!(log, expected);
}

#[tokio::test]
async fn stop_sends_sigterm_then_sigkill_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let polite = root_with_script(
        dir.path(),
        "trap 'echo got TERM; exit 0' TERM; echo ready; while true; do sleep 0.05; done",
    );
    let (mut process, _) = ProcessDriver.start(&spec(dir.path(), polite)).unwrap();
    assert!(process_alive(process.pid, process.start_time));
    wait_for_log(&dir.path().join("web-abc123.log"), "ready").await;
    assert_eq!(
        process.stop(Duration::from_secs(5)).await,
        Exit::new("exit code 0")
    );
    assert!(
        std::fs::read_to_string(dir.path().join("web-abc123.log"))
            .unwrap()
            .contains("got TERM")
    );

    let stubborn_dir = tempfile::tempdir().unwrap();
    let stubborn = root_with_script(
        stubborn_dir.path(),
        "trap '' TERM; echo ready; while true; do sleep 0.05; done",
    );
    let (mut process, _) = ProcessDriver
        .start(&spec(stubborn_dir.path(), stubborn))
        .unwrap();
    wait_for_log(&stubborn_dir.path().join("web-abc123.log"), "ready").await;
    let exit = process.stop(Duration::from_millis(200)).await;
    assert!(exit.text.starts_with("killed by signal 9"), "{exit}");
}

#[tokio::test]
async fn a_missing_entrypoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_with_script(dir.path(), "true");
    let mut spec = spec(dir.path(), root);
    spec.argv = vec!["/bin/nope".into()];
    let error = ProcessDriver.start(&spec).unwrap_err().to_string();
    assert_eq!(
        error,
        "instance web-abc123: entrypoint \"/bin/nope\" does not exist in the image"
    );
    spec.argv = vec!["/../bin/app".into()];
    assert!(
        ProcessDriver
            .start(&spec)
            .unwrap_err()
            .to_string()
            .contains("`..`")
    );
}

#[tokio::test]
async fn kill_recorded_kills_only_the_recorded_process() {
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = child.id();
    let start = process_start_time(pid).unwrap();
    assert!(
        !kill_recorded(pid, start + 1).await,
        "a different start time means a reused pid"
    );
    assert!(process_alive(pid, start));
    assert!(kill_recorded(pid, start).await);
    let _ = child.wait();
    assert!(!process_alive(pid, start));
}

async fn wait_for_log(path: &Path, needle: &str) {
    for _ in 0..500 {
        if std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(needle)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{needle:?} never appeared in {}", path.display());
}

#[test]
fn instance_ports_come_from_outside_the_ephemeral_range_and_skip_taken_ones() {
    let first = free_port().unwrap();
    assert!(INSTANCE_PORTS.contains(&first), "{first}");
    // Hold the next port in turn: it is skipped, not handed out.
    let next_in_turn = if first + 1 == INSTANCE_PORTS.end {
        INSTANCE_PORTS.start
    } else {
        first + 1
    };
    let held = TcpListener::bind((Ipv4Addr::LOCALHOST, next_in_turn));
    let second = free_port().unwrap();
    assert!(INSTANCE_PORTS.contains(&second), "{second}");
    assert_ne!(second, first, "a port is not handed out twice in a row");
    if held.is_ok() {
        assert_ne!(second, next_in_turn, "a taken port is skipped");
    }
}

#[tokio::test]
async fn as_root_it_refuses_without_allow_root_and_secrets_go_to_memory() {
    let dir = tempfile::tempdir().unwrap();
    let root = root_with_script(
        dir.path(),
        r#"echo "dir=$PHOENIX_SECRETS_DIR"; cat "$PHOENIX_SECRETS_DIR/token"; echo; stat -c %a "$PHOENIX_SECRETS_DIR/token""#,
    );
    let mut spec = spec(dir.path(), root);
    if is_root() {
        spec.allow_root = false;
        let error = ProcessDriver.start(&spec).unwrap_err().to_string();
        assert!(error.contains("allow_root = true"), "{error}");
        spec.allow_root = true;
    }
    spec.secrets = vec![crate::Secret {
        name: "token".into(),
        value: b"t0k3n".to_vec(),
    }];
    let (mut process, _) = ProcessDriver.start(&spec).unwrap();
    assert_eq!(process.exited().await, Exit::new("exit code 0"));
    let log = std::fs::read_to_string(&spec.log_path).unwrap();
    let dir_line = log.lines().next().unwrap();
    assert!(dir_line.starts_with("dir=/dev/shm/phoenix-"), "{log}");
    assert!(log.contains("t0k3n\n400\n"), "{log}");
    // Removed once the instance ended.
    assert!(!Path::new(dir_line.trim_start_matches("dir=")).exists());
}
