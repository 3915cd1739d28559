//! `phoenix load` against a real HTTP server on loopback: the schedule is kept exactly, and
//! errors are counted by kind.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{phoenix, text};
use serde_json::Value;

/// What the server was sent: the request line, body and arrival of each request.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>, Instant)>>>;

/// A keep-alive HTTP/1.1 server: every 10th request gets 503, the others 200.
fn server() -> (SocketAddr, Arc<AtomicU64>, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicU64::new(0));
    let seen: Seen = Arc::default();
    let (count, log) = (served.clone(), seen.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (count, log) = (count.clone(), log.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    let (mut line, mut first, mut length) = (String::new(), None, 0);
                    let mut head_done = false;
                    while reader.read_line(&mut line).unwrap_or(0) > 0 {
                        if line == "\r\n" {
                            head_done = true;
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(n) = lower.strip_prefix("content-length:") {
                            length = n.trim().parse().unwrap();
                        }
                        first.get_or_insert_with(|| line.trim_end().to_string());
                        line.clear();
                    }
                    if !head_done {
                        return;
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    log.lock()
                        .unwrap()
                        .push((first.unwrap_or_default(), body, Instant::now()));
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
    (addr, served, seen)
}

#[test]
fn load_keeps_its_schedule_and_counts_errors_by_kind() {
    let (addr, served, _) = server();
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

#[test]
fn a_scenario_ramps_weighs_its_requests_and_is_judged_by_its_thresholds() {
    let (addr, _, seen) = server();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("order.json"), br#"{"item": 1}"#).unwrap();
    // 0 → 200 rps over 1 s, then 200 for 1 s: 100 + 200 requests, 3 of every 4 a GET.
    let scenario = |failed: &str| {
        format!(
            r#"url = "http://{addr}"
connections = 8

[[stage]]
duration = "1s"
target = 200

[[stage]]
duration = "1s"
target = 200

[[request]]
name = "home"
weight = 3
path = "/"

[[request]]
name = "order"
method = "POST"
path = "/orders"
headers = {{ "Content-Type" = "application/json" }}
body_file = "order.json"

[thresholds]
http_req_failed = ["{failed}"]
http_req_duration = ["p(99)<5000"]
"http_reqs{{name:order}}" = ["count==75"]
"#
        )
    };
    std::fs::write(dir.path().join("strict.toml"), scenario("rate<0.05")).unwrap();
    // Run from elsewhere: `body_file` is found beside the scenario.
    let elsewhere = tempfile::tempdir().unwrap();
    let file = dir.path().join("strict.toml");
    let strict = phoenix(
        elsewhere.path(),
        &["load", "--scenario", file.to_str().unwrap(), "--json"],
    );
    assert_eq!(strict.status.code(), Some(1), "{}", text(&strict.stderr));
    let report: Value = serde_json::from_slice(&strict.stdout).unwrap();
    assert_eq!(report["scheduled"], 300);
    assert_eq!(
        (report["ok"].as_u64(), report["errors"].as_u64()),
        (Some(270), Some(30))
    );
    assert_eq!(report["requests"]["home"]["count"], 225);
    assert_eq!(report["requests"]["order"]["count"], 75);
    let judged: Vec<(String, bool)> = report["thresholds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["threshold"].as_str().unwrap().to_string(),
                t["passed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        judged,
        vec![
            ("http_req_failed rate<0.05".to_string(), false),
            ("http_req_duration p(99)<5000".to_string(), true),
            ("http_reqs{name:order} count==75".to_string(), true),
        ]
    );
    assert_eq!(report["thresholds"][0]["actual"], 0.1);
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let posts: Vec<_> = seen
        .iter()
        .filter(|(line, _, _)| line.starts_with("POST /orders "))
        .collect();
    assert_eq!(posts.len(), 75);
    assert!(posts.iter().all(|(_, body, _)| body == br#"{"item": 1}"#));
    assert_eq!(
        seen.iter()
            .filter(|(line, _, _)| line.starts_with("GET / "))
            .count(),
        225
    );
    // The rate ramped: 25 requests in the first half second (0 → 100 rps), 100 in the first.
    let start = seen.iter().map(|r| r.2).min().unwrap();
    let within = |ms| {
        seen.iter()
            .filter(|r| r.2 - start < Duration::from_millis(ms))
            .count()
    };
    let (half, first) = (within(500), within(1000));
    assert!(
        (20..=30).contains(&half) && (90..=110).contains(&first),
        "{half} {first}"
    );
    // A looser threshold passes, and its report is for people.
    std::fs::write(dir.path().join("loose.toml"), scenario("rate<0.2")).unwrap();
    let loose = phoenix(dir.path(), &["load", "--scenario", "loose.toml"]);
    assert_eq!(loose.status.code(), Some(0), "{}", text(&loose.stderr));
    let out = text(&loose.stdout);
    assert!(
        out.contains("300 requests scheduled")
            && out.contains("ok   http_req_failed rate<0.2 (was 0.1000)"),
        "{out}"
    );
    assert!(out.contains("order: 75 sent"), "{out}");

    // A mistake names the file, line and field.
    std::fs::write(
        dir.path().join("bad.toml"),
        "[[stage]]\nduration = \"1s\"\ntarget = 1\n[[request]]\nmethod = \"GE T\"\n",
    )
    .unwrap();
    let bad = phoenix(
        dir.path(),
        &["load", "--scenario", "bad.toml", "http://127.0.0.1:1"],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("bad.toml:5:10: `method` \"GE T\" is not an HTTP method"),
        "{}",
        text(&bad.stderr)
    );
    let both = phoenix(
        dir.path(),
        &["load", "--scenario", "loose.toml", "--rps", "5"],
    );
    assert_eq!(both.status.code(), Some(2), "{}", text(&both.stderr));
}
