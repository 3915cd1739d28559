//! `phoenix load` against a real HTTP server on loopback: the schedule is kept exactly, and
//! errors are counted by kind.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{phoenix, text};
use serde_json::Value;

/// A keep-alive HTTP/1.1 server: every 10th request gets 503, the others 200.
fn server() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicU64::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let count = count.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    let mut line = String::new();
                    let mut head_done = false;
                    while reader.read_line(&mut line).unwrap_or(0) > 0 {
                        if line == "\r\n" {
                            head_done = true;
                            break;
                        }
                        line.clear();
                    }
                    if !head_done {
                        return;
                    }
                    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                    let status = if n.is_multiple_of(10) {
                        "503 Service Unavailable"
                    } else {
                        "200 OK"
                    };
                    let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\n\r\nok");
                    if writer.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, served)
}

#[test]
fn load_keeps_its_schedule_and_counts_errors_by_kind() {
    let (addr, served) = server();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/");
    let output = phoenix(
        dir.path(),
        &[
            "load",
            &url,
            "--rps",
            "200",
            "--duration",
            "2s",
            "--connections",
            "8",
            "--json",
        ],
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "errors make it exit 1: {}",
        text(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["scheduled"], 400);
    assert_eq!(
        served.load(Ordering::SeqCst),
        400,
        "every scheduled request was sent"
    );
    assert_eq!(report["ok"], 360);
    assert_eq!(report["errors"], 40);
    assert_eq!(report["error_kinds"]["status 503"], 40);
    let l = &report["latency_ms"];
    let p = |k: &str| l[k].as_f64().unwrap();
    assert!(
        0.0 < p("p50") && p("p50") <= p("p90") && p("p90") <= p("p99") && p("p99") <= p("max"),
        "{l}"
    );

    // A server that hangs up on every connection: every request is an error, none is lost.
    let rude = TcpListener::bind("127.0.0.1:0").unwrap();
    let rude_addr = rude.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in rude.incoming() {
            drop(stream);
        }
    });
    let output = phoenix(
        dir.path(),
        &[
            "load",
            &format!("http://{rude_addr}/"),
            "--rps",
            "50",
            "--duration",
            "1s",
            "--json",
        ],
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["scheduled"], 50);
    assert_eq!(report["ok"], 0);
    assert_eq!(report["errors"], 50, "{report}");

    let bad = phoenix(dir.path(), &["load", "https://example.com/", "--rps", "1"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("only http://"),
        "{}",
        text(&bad.stderr)
    );
}
