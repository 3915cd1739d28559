//! `[logs.forward]`: captured lines on to Debian's rsyslog (RFC 5424 over TCP with octet
//! framing, and over UDP) and to an HTTP receiver taking Loki's push shape. A receiver that
//! stops mid-stream and comes back loses nothing: sending resumes from the store.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// Debian's rsyslogd, receiving on loopback: TCP lines into `tcp.log`, UDP into `udp.log`.
struct Rsyslog {
    dir: PathBuf,
    tcp: u16,
    udp: u16,
    child: Option<Child>,
}

fn rsyslogd() -> Option<PathBuf> {
    ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Rsyslog {
    fn start(dir: &Path) -> Rsyslog {
        let tcp = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let udp = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.display();
        let template = "%app-name% %procid% %msgid% %structured-data% %msg%\\n";
        let config = format!(
            "global(workDirectory=\"{d}\" maxMessageSize=\"64k\")\n\
             module(load=\"imtcp\")\nmodule(load=\"imudp\")\n\
             template(name=\"line\" type=\"string\" string=\"{template}\")\n\
             ruleset(name=\"tcp\") {{ action(type=\"omfile\" file=\"{d}/tcp.log\" template=\"line\") }}\n\
             ruleset(name=\"udp\") {{ action(type=\"omfile\" file=\"{d}/udp.log\" template=\"line\") }}\n\
             input(type=\"imtcp\" port=\"{tcp}\" address=\"127.0.0.1\" ruleset=\"tcp\")\n\
             input(type=\"imudp\" port=\"{udp}\" address=\"127.0.0.1\" ruleset=\"udp\")\n"
        );
        std::fs::write(dir.join("rsyslog.conf"), config).unwrap();
        let mut rsyslog = Rsyslog {
            dir: dir.to_path_buf(),
            tcp,
            udp,
            child: None,
        };
        rsyslog.resume();
        rsyslog
    }

    /// Starts rsyslogd (again) on the same ports and files.
    fn resume(&mut self) {
        let child = Command::new(rsyslogd().expect("rsyslogd (Debian's rsyslog)"))
            .arg("-n")
            .arg("-f")
            .arg(self.dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(self.dir.join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let tcp = self.tcp;
        wait_for("rsyslogd to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", tcp)).is_ok()
        });
    }

    /// SIGTERM, as `systemctl stop rsyslog` does.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            child.wait().unwrap();
        }
    }

    /// `(instance, tick)` of every `tick N` line a file holds, checking each line's fields.
    fn ticks(&self, file: &str) -> Vec<(String, u64)> {
        let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let (head, tick) = line.rsplit_once(" tick ")?;
                let fields: Vec<&str> = head.splitn(4, ' ').collect();
                assert_eq!(fields[0], "web", "{line}");
                assert_eq!(fields[2], "stdout", "{line}");
                assert!(
                    fields[3].starts_with("[phoenix@32473 generation=\"1\" image=\""),
                    "{line}"
                );
                Some((fields[1].to_string(), tick.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What each instance's ticks lack, as ranges, for a failure's message.
fn missing(ticks: &[(String, u64)]) -> String {
    let mut report = Vec::new();
    for (instance, ticks) in by_instance(ticks) {
        let have: BTreeSet<u64> = ticks.iter().copied().collect();
        let mut gaps = Vec::new();
        let mut tick = 1;
        while tick <= TICKS {
            if have.contains(&tick) {
                tick += 1;
                continue;
            }
            let first = tick;
            while tick <= TICKS && !have.contains(&tick) {
                tick += 1;
            }
            gaps.push(format!("{first}-{}", tick - 1));
        }
        report.push(format!(
            "{instance} ({} lines): [{}]",
            ticks.len(),
            gaps.join(", ")
        ));
    }
    report.join("; ")
}

/// Ticks by instance.
fn by_instance(ticks: &[(String, u64)]) -> BTreeMap<String, Vec<u64>> {
    let mut found: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (instance, tick) in ticks {
        found.entry(instance.clone()).or_default().push(*tick);
    }
    found
}

fn metric(phoenix: &Phoenix, name: &str, sink: &str) -> u64 {
    let text = phoenix.api_get("/metrics");
    let prefix = format!("{name}{{sink=\"{sink}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

const TICKS: u64 = 3_000;

#[test]
fn syslog_over_tcp_loses_nothing_when_rsyslog_restarts_and_udp_carries_lines() {
    if rsyslogd().is_none() && std::env::var_os("PHOENIX_REQUIRE_TOOLS").is_none() {
        eprintln!("skipped: no rsyslogd (apt-get install rsyslog)");
        return;
    }
    let receiver_dir = tempfile::tempdir().unwrap();
    let mut rsyslog = Rsyslog::start(receiver_dir.path());
    let more = format!(
        "\n[logs.forward.central]\nurl = \"tcp://127.0.0.1:{}\"\n\n\
         [logs.forward.datagrams]\nurl = \"udp://127.0.0.1:{}\"\nroles = [\"web\"]\n",
        rsyslog.tcp, rsyslog.udp
    );
    let fleet = Fleet {
        instances: 2,
        role_keys: "env = { TICKS = \"3000\", TICK_MS = \"2\" }\n",
        more: Box::leak(more.into_boxed_str()),
        ..Fleet::version("v1")
    };
    let mut phoenix = Phoenix::start(&fleet);
    phoenix.wait_serving(2);

    // Mid-stream, rsyslog stops for a while, then comes back.
    wait_for("rsyslog to get 500 ticks", Duration::from_secs(30), || {
        rsyslog.ticks("tcp.log").len() >= 500
    });
    rsyslog.stop();
    let before = rsyslog.ticks("tcp.log");
    let during = before.len();
    std::thread::sleep(Duration::from_millis(1500));
    rsyslog.resume();

    let complete = |ticks: &[(String, u64)]| {
        let found = by_instance(ticks);
        found.len() == 2
            && found
                .values()
                .all(|t| t.iter().copied().collect::<BTreeSet<u64>>() == (1..=TICKS).collect())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !complete(&rsyslog.ticks("tcp.log")) {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for every tick of both instances over TCP ({during} before the \
             outage); missing: {}\n{}",
            missing(&rsyslog.ticks("tcp.log")),
            phoenix.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let tcp = rsyslog.ticks("tcp.log");
    let duplicates = tcp.len() as u64 - 2 * TICKS;
    eprintln!(
        "tcp: {} lines for {} ticks ({duplicates} sent again after the outage; {during} before it)",
        tcp.len(),
        2 * TICKS
    );
    // The instances are the role's two live ones.
    let names: BTreeSet<String> = phoenix
        .live_instances()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        by_instance(&tcp).keys().cloned().collect::<BTreeSet<_>>(),
        names
    );
    // The outage was seen and ridden out.
    eprintln!(
        "failures {} forwarded {}",
        metric(&phoenix, "phoenix_logs_forward_failures_total", "central"),
        metric(&phoenix, "phoenix_logs_forwarded_total", "central")
    );
    // The reset was seen at once, not after the 10 s acknowledgement timeout (which
    // would have let the batches rsyslog dropped age out of the resend window): attempts to
    // connect failed while rsyslog was down, on top of the broken connection.
    assert!(metric(&phoenix, "phoenix_logs_forward_failures_total", "central") >= 2);
    assert!(metric(&phoenix, "phoenix_logs_forwarded_total", "central") >= 2 * TICKS);

    // UDP: no delivery guarantee (lines sent while rsyslog was down are gone), but what was
    // sent well before the stop (half of what TCP had then) arrived whole, in order.
    let before = by_instance(&before);
    for (instance, ticks) in by_instance(&rsyslog.ticks("udp.log")) {
        let cut = before[&instance].iter().max().unwrap() / 2;
        assert!(cut >= 100, "{instance}: {cut}");
        let first: Vec<u64> = ticks.iter().copied().filter(|t| *t <= cut).collect();
        assert_eq!(first, (1..=cut).collect::<Vec<_>>(), "{instance}");
    }
    assert_eq!(by_instance(&rsyslog.ticks("udp.log")).len(), 2);
    phoenix.interrupt();
}

/// A receiver of Loki's push API on loopback: answers 503 to the first `refuse` requests,
/// then 204, and keeps the bodies it accepted.
fn loki_receiver(refuse: usize) -> (u16, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let kept = accepted.clone();
    std::thread::spawn(move || {
        let mut seen = 0;
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(stream);
            let mut head = Vec::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
                head.push(line);
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            assert!(head[0].starts_with("POST /loki/api/v1/push "), "{head:?}");
            seen += 1;
            let status = if seen <= refuse {
                "503 Service Unavailable"
            } else {
                kept.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                "204 No Content"
            };
            let _ = reader.get_mut().write_all(
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    (port, accepted)
}

#[test]
fn an_http_sink_gets_loki_streams_and_refusals_are_retried() {
    let (port, accepted) = loki_receiver(3);
    let more = format!("\n[logs.forward.loki]\nurl = \"http://127.0.0.1:{port}\"\n");
    let fleet = Fleet {
        instances: 1,
        role_keys: "env = { TICKS = \"400\", TICK_MS = \"5\" }\n",
        more: Box::leak(more.into_boxed_str()),
        ..Fleet::version("v1")
    };
    let mut phoenix = Phoenix::start(&fleet);
    phoenix.wait_serving(1);
    let instance = phoenix.live_instances()[0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let ticks = |accepted: &[serde_json::Value]| -> Vec<u64> {
        let mut ticks = Vec::new();
        for body in accepted {
            for stream in body["streams"].as_array().unwrap() {
                let labels = &stream["stream"];
                assert_eq!(labels["role"], "web");
                assert_eq!(labels["generation"], "1");
                for value in stream["values"].as_array().unwrap() {
                    let text = value[1].as_str().unwrap();
                    if let Some(n) = text.strip_prefix("tick ") {
                        assert_eq!(labels["instance"], instance.as_str());
                        assert_eq!(labels["stream"], "stdout");
                        assert!(value[0].as_str().unwrap().ends_with("000000"));
                        ticks.push(n.parse().unwrap());
                    }
                }
            }
        }
        ticks
    };
    wait_for("400 ticks at the receiver", Duration::from_secs(30), || {
        ticks(&accepted.lock().unwrap()).len() >= 400
    });
    let mut got = ticks(&accepted.lock().unwrap());
    got.sort();
    got.dedup();
    assert_eq!(got, (1..=400).collect::<Vec<u64>>());
    assert_eq!(
        metric(&phoenix, "phoenix_logs_forward_failures_total", "loki"),
        3
    );
    phoenix.interrupt();
}
