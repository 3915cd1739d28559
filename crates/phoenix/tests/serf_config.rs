//! `phoenix agent` started the Serf way: one-dash flags, JSON configuration files and
//! directories, a tags file and a keyring file that survive restarts, and snapshots that
//! Debian's `serf agent` and a Phoenix agent read from each other.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    addr_in_log, free_port, members_json, phoenix_bin, serf_or_skip, succeeded, text, wait_for,
};
use serde_json::Value;

/// A running agent process (Phoenix's or Serf's), killed with SIGKILL when dropped: no leave.
struct Running {
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `phoenix agent ARGS` logging to `log`; returns it with its gossip and RPC addresses.
fn phoenix_agent(args: &[&str], log: &Path) -> (Running, SocketAddr, SocketAddr) {
    let child = Command::new(phoenix_bin())
        .arg("agent")
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let gossip = addr_in_log(log, ", gossip ");
    let rpc = addr_in_log(log, ", RPC ");
    (Running { child }, gossip, rpc)
}

fn wait(what: &str, done: impl FnMut() -> bool) {
    wait_for(what, Duration::from_secs(45), done);
}

fn member<'a>(members: &'a [Value], name: &str) -> Option<&'a Value> {
    members.iter().find(|m| m["name"] == name)
}

fn phoenix_ok(args: &[&str]) -> String {
    let out = Command::new(phoenix_bin()).args(args).output().unwrap();
    succeeded(&format!("phoenix {args:?}"), out)
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn serfs_flags_and_configuration_files_start_an_agent() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf.d");
    std::fs::create_dir(&conf).unwrap();
    std::fs::write(
        conf.join("10-base.json"),
        r#"{"node_name": "from-dir", "tags": {"dc": "one", "role": "db"}, "profile": "local"}"#,
    )
    .unwrap();
    std::fs::write(conf.join("20-more.json"), r#"{"tags": {"dc": "two"}}"#).unwrap();
    std::fs::write(conf.join("30-ignored.txt"), "not JSON, not read").unwrap();
    let extra = dir.path().join("extra.conf");
    std::fs::write(&extra, r#"{"node_name": "from-file", "log_level": "info"}"#).unwrap();
    let log = dir.path().join("agent.log");
    let (_agent, _, rpc) = phoenix_agent(
        &[
            "-bind=127.0.0.1:0",
            "-rpc-addr",
            "127.0.0.1:0",
            "-config-dir",
            conf.to_str().unwrap(),
            "-config-file",
            extra.to_str().unwrap(),
            "-tag",
            "role=web",
        ],
        &log,
    );
    let members = members_json(rpc, &[]);
    assert_eq!(members.len(), 1, "{members:?}");
    let me = member(&members, "from-file").expect("the name of the last file");
    assert_eq!(me["tags"], serde_json::json!({"dc": "two", "role": "web"}));

    // Bad input is named: the file, the line, the key.
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        "{\n  \"node_name\": \"x\",\n  \"bind_addr\": \"127.0.0.1\"\n}",
    )
    .unwrap();
    let out = Command::new(phoenix_bin())
        .args(["agent", "-config-file", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let error = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{error}");
    assert!(
        error.contains(&format!("Error decoding '{}'", bad.display()))
            && error.contains("unknown field `bind_addr`")
            && error.contains("line 3"),
        "{error}"
    );
    let out = Command::new(phoenix_bin())
        .args(["agent", "-discover", "cluster", "-bind", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("option `discover` is not supported by phoenix agent"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_tags_file_and_the_keyring_file_survive_a_restart_after_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (
        phoenix_ok(&["keygen"]).trim().to_string(),
        phoenix_ok(&["keygen"]).trim().to_string(),
    );
    let keyring = dir.path().join("keyring.json");
    write_private(&keyring, &format!("[\"{old}\"]"));
    let tags = dir.path().join("tags.json");
    let args = [
        "-node",
        "a",
        "-bind",
        "127.0.0.1:0",
        "-rpc-addr",
        "127.0.0.1:0",
        "-keyring-file",
        keyring.to_str().unwrap(),
        "-tags-file",
        tags.to_str().unwrap(),
    ];
    let (a, _, rpc) = phoenix_agent(&args, &dir.path().join("a.log"));
    let rpc_addr = rpc.to_string();
    for step in [["--install", &new], ["--use", &new], ["--remove", &old]] {
        phoenix_ok(&["keys", "--rpc-addr", &rpc_addr, step[0], step[1]]);
    }
    let kept: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(&keyring).unwrap()).unwrap();
    assert_eq!(kept, std::slice::from_ref(&new));
    let mode = std::fs::metadata(&keyring).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    phoenix_ok(&["tags", "--rpc-addr", &rpc_addr, "--set", "build=7"]);
    let kept: Value = serde_json::from_str(&std::fs::read_to_string(&tags).unwrap()).unwrap();
    assert_eq!(kept, serde_json::json!({"build": "7"}));
    drop(a);

    // Restarted from the same files: the rotated key and the changed tags.
    let (_a, gossip, rpc) = phoenix_agent(&args, &dir.path().join("a2.log"));
    let join = gossip.to_string();
    let b_args = [
        "-node",
        "b",
        "-bind",
        "127.0.0.1:0",
        "-rpc-addr",
        "127.0.0.1:0",
    ];
    let (_b, _, _) = phoenix_agent(
        &[&b_args[..], &["-encrypt", &new, "-join", &join]].concat(),
        &dir.path().join("b.log"),
    );
    wait("b joins a with the new key", || {
        let members = members_json(rpc, &[]);
        member(&members, "b").is_some_and(|b| b["status"] == "alive")
            && member(&members, "a").is_some_and(|a| a["tags"]["build"] == "7")
    });
    // A keyring file others can read is refused.
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(phoenix_bin())
        .arg("agent")
        .args(args)
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("chmod 600"),
        "{}",
        text(&out.stderr)
    );
}

fn serf_agent(serf: &Path, name: &str, port: u16, extra: &[&str], log: &Path) -> (Running, u16) {
    let rpc = free_port();
    let child = Command::new(serf)
        .args(["agent", "-node", name, "-log-level", "debug"])
        .arg(format!("-bind=127.0.0.1:{port}"))
        .arg(format!("-rpc-addr=127.0.0.1:{rpc}"))
        .args(extra)
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (Running { child }, rpc)
}

fn file_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The value of `NAME: N` in a snapshot.
fn clock(snapshot: &str, name: &str) -> u64 {
    snapshot
        .lines()
        .filter_map(|line| line.strip_prefix(&format!("{name}: ")))
        .next_back()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn serf_and_phoenix_agents_read_each_others_snapshots() {
    let Some(serf) = serf_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let snapshot: PathBuf = dir.path().join("s1.snapshot");
    let (p1, p2) = (free_port(), free_port());
    let (s1, rpc1) = serf_agent(
        &serf,
        "s1",
        p1,
        &["-snapshot", snapshot.to_str().unwrap()],
        &dir.path().join("s1.log"),
    );
    let s1_log = dir.path().join("s1.log");
    wait("s1 runs", || {
        file_text(&s1_log).contains("Serf agent running!")
    });
    let join = format!("127.0.0.1:{p1}");
    let (s2, _) = serf_agent(
        &serf,
        "s2",
        p2,
        &["-join", &join],
        &dir.path().join("s2.log"),
    );
    let rpc1 = format!("-rpc-addr=127.0.0.1:{rpc1}");
    wait("serf agents s1 and s2 joined, events fired", || {
        let out = Command::new(&serf)
            .args(["members", &rpc1])
            .output()
            .unwrap();
        text(&out.stdout).matches("alive").count() == 2
    });
    for payload in ["1", "2", "3"] {
        let out = Command::new(&serf)
            .args(["event", &rpc1, "deploy", payload])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    // Serf buffers its snapshot and flushes it on the next line after 500 ms, or when it shuts
    // down: a TERM (no leave, as in a crash the snapshot must survive) makes it write all.
    let mut s1 = s1;
    let _ = Command::new("kill")
        .args(["-TERM", &s1.child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while s1.child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "serf s1 did not stop on TERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let written = file_text(&snapshot);
    let s2_line = format!("alive: s2 127.0.0.1:{p2}");
    assert!(written.contains(&s2_line), "{written}");
    let serf_event_clock = clock(&written, "event-clock");
    assert!(serf_event_clock >= 3, "{written}");
    assert!(
        !written.contains("\nleave\n"),
        "a TERM is not a leave: {written}"
    );
    drop((s1, s2));

    // A Phoenix agent where s2 was, and one started on s1's snapshot: it rejoins through it.
    let bind2 = format!("127.0.0.1:{p2}");
    let (_q2, _, _) = phoenix_agent(
        &["-node", "q2", "-bind", &bind2, "-rpc-addr", "127.0.0.1:0"],
        &dir.path().join("q2.log"),
    );
    let (q1, _, rpc) = phoenix_agent(
        &[
            "-node",
            "q1",
            "-bind",
            "127.0.0.1:0",
            "-rpc-addr",
            "127.0.0.1:0",
            "-snapshot",
            snapshot.to_str().unwrap(),
        ],
        &dir.path().join("q1.log"),
    );
    wait("q1 rejoined through Serf's snapshot", || {
        member(&members_json(rpc, &[]), "q2").is_some_and(|q2| q2["status"] == "alive")
    });
    let q2_line = format!("alive: q2 127.0.0.1:{p2}");
    wait("q1 wrote its snapshot in Serf's format", || {
        file_text(&snapshot).contains(&q2_line)
    });
    let written = file_text(&snapshot);
    assert!(
        clock(&written, "event-clock") >= serf_event_clock,
        "the event clock carried over: {written}"
    );
    drop(q1);

    // Serf reads Phoenix's snapshot: it tries to rejoin through q2.
    let log = dir.path().join("s3.log");
    let (_s3, _) = serf_agent(
        &serf,
        "s3",
        free_port(),
        &["-snapshot", snapshot.to_str().unwrap()],
        &log,
    );
    let attempt = format!("Attempting re-join to previously known node: q2: 127.0.0.1:{p2}");
    wait("serf read the Phoenix snapshot", || {
        file_text(&log).contains(&attempt)
    });
    assert!(
        !file_text(&log).contains("Unrecognized snapshot line"),
        "{}",
        file_text(&log)
    );
}

/// What `serf monitor -log-level=LEVEL` prints in its first second.
fn monitor(serf: &Path, rpc: SocketAddr, level: &str) -> (String, String) {
    let mut child = Command::new(serf)
        .args([
            "monitor",
            &format!("-rpc-addr={rpc}"),
            &format!("-log-level={level}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (text(&out.stdout), text(&out.stdout) + &text(&out.stderr))
}

#[test]
fn serf_monitor_replays_the_agents_log_at_its_level() {
    let Some(serf) = serf_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_agent, _, rpc) = phoenix_agent(
        &[
            "-node",
            "m1",
            "-bind",
            "127.0.0.1:0",
            "-rpc-addr",
            "127.0.0.1:0",
            "-event-handler",
            "user=echo out; exit 3",
        ],
        &dir.path().join("m1.log"),
    );
    let out = Command::new(&serf)
        .args(["event", &format!("-rpc-addr={rpc}"), "hello"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let failed = "[ERR] agent: Error invoking script 'echo out; exit 3': exit status 3";
    wait("the handler ran and failed", || {
        monitor(&serf, rpc, "err").0.contains(failed)
    });
    // A monitor started afterwards gets the lines kept, at its level and above.
    let (debug, _) = monitor(&serf, rpc, "debug");
    for line in [
        "[INFO] serf: EventMemberJoin: m1 127.0.0.1",
        "[INFO] agent: Received event: user-event: hello",
        "[DEBUG] agent: Event 'user' script output: out",
        failed,
    ] {
        assert!(debug.contains(line), "{line:?} not in:\n{debug}");
    }
    let (errors, _) = monitor(&serf, rpc, "ERR");
    assert!(
        errors.contains(failed) && !errors.contains("[INFO]") && !errors.contains("[DEBUG]"),
        "{errors}"
    );
    let (_, refused) = monitor(&serf, rpc, "error");
    assert!(refused.contains("Unknown log level: ERROR"), "{refused}");
}

/// `serf rtt`'s estimate between two nodes, in milliseconds, once it has one.
fn rtt_ms(serf: &Path, rpc: SocketAddr, a: &str, b: &str) -> Option<f64> {
    let out = Command::new(serf)
        .args(["rtt", &format!("-rpc-addr={rpc}"), a, b])
        .output()
        .unwrap();
    let printed = text(&out.stdout);
    let ms = printed.split("rtt: ").nth(1)?.split(" ms").next()?;
    ms.trim().parse().ok()
}

#[test]
fn serf_rtt_estimates_round_trips_from_vivaldi_coordinates() {
    let Some(serf) = serf_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let loopback = ["-bind", "127.0.0.1:0", "-rpc-addr", "127.0.0.1:0"];
    let (_a, gossip, rpc) = phoenix_agent(
        &[&loopback[..], &["-node", "a"]].concat(),
        &dir.path().join("a.log"),
    );
    let join = gossip.to_string();
    let _others: Vec<_> = ["b", "c"]
        .iter()
        .map(|name| {
            phoenix_agent(
                &[&loopback[..], &["-node", name, "-join", &join]].concat(),
                &dir.path().join(format!("{name}.log")),
            )
        })
        .collect();
    // A round trip on loopback is well under a millisecond; the estimate comes from a few
    // pings a second, so it is checked against a generous bound, never for speed.
    let mut estimate = None;
    wait("serf rtt has an estimate for b and c", || {
        estimate = rtt_ms(&serf, rpc, "b", "c");
        estimate.is_some()
    });
    let estimate = estimate.unwrap();
    assert!(estimate > 0.0 && estimate < 5.0, "b <-> c: {estimate} ms");
    let to_self = rtt_ms(&serf, rpc, "b", "a");
    assert!(to_self.is_some_and(|ms| ms < 5.0), "b <-> a: {to_self:?}");
    let out = Command::new(&serf)
        .args(["rtt", &format!("-rpc-addr={rpc}"), "nobody"])
        .output()
        .unwrap();
    let said = text(&out.stdout) + &text(&out.stderr);
    assert!(
        said.contains("Could not find a coordinate for node \"nobody\""),
        "{said}"
    );
    // Serf's disable_coordinates: none computed, none given.
    let conf = dir.path().join("off.json");
    std::fs::write(&conf, r#"{"disable_coordinates": true}"#).unwrap();
    let (_d, _, rpc_d) = phoenix_agent(
        &[
            &loopback[..],
            &[
                "-node",
                "d",
                "-join",
                &join,
                "-config-file",
                conf.to_str().unwrap(),
            ],
        ]
        .concat(),
        &dir.path().join("d.log"),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rtt_ms(&serf, rpc_d, "d", "a"), None);
}
