//! The hello app, started as a real process.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(port: u16, args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hello"));
    command
        .args(args)
        .env("PORT", port.to_string())
        .env("PHOENIX_INSTANCE", "web-abc123")
        .stdout(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    command.spawn().unwrap()
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).ok()?;
    Some((
        raw[9..12].parse().ok()?,
        raw.split_once("\r\n\r\n")?.1.to_string(),
    ))
}

fn wait_up(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(port, "/healthz").is_none() {
        assert!(Instant::now() < deadline, "hello did not start listening");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    unsafe { kill(child.id() as i32, 15) };
    child.wait().unwrap()
}

#[test]
fn answers_with_version_and_instance_and_stops_on_sigterm() {
    let port = free_port();
    let mut child = start(port, &[], &[("VERSION", "v9")]);
    wait_up(port);
    assert_eq!(
        get(port, "/"),
        Some((200, "hello from web-abc123 version v9\n".into()))
    );
    assert_eq!(get(port, "/healthz"), Some((200, "ok\n".into())));
    assert_eq!(get(port, "/nope").map(|r| r.0), Some(404));
    assert_eq!(
        get(port, "/slow/50"),
        Some((200, "hello from web-abc123 version v9\n".into()))
    );
    assert!(terminate(&mut child).success());
}

#[test]
fn fail_health_by_flag_or_env() {
    for (args, env) in [
        (&["--fail-health"][..], &[][..]),
        (&[][..], &[("FAIL_HEALTH", "1")][..]),
    ] {
        let port = free_port();
        let mut child = start(port, args, env);
        wait_up(port);
        assert_eq!(get(port, "/healthz").map(|r| r.0), Some(503));
        assert_eq!(get(port, "/").map(|r| r.0), Some(200));
        terminate(&mut child);
    }
}

#[test]
fn a_missing_port_is_a_usage_error() {
    let status = Command::new(env!("CARGO_BIN_EXE_hello"))
        .env_remove("PORT")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
}
