//! `phoenix agent` processes on loopback: membership through the CLI, Serf-style handlers,
//! graceful leave, and the stock `serf` CLI against a Phoenix agent (when installed).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::{addr_in_log, members_json, phoenix_bin, serf_or_skip, succeeded, text, wait_for};
use serde_json::Value;

/// A running `phoenix agent`, killed when dropped.
struct AgentProcess {
    child: Child,
    rpc: SocketAddr,
    gossip: SocketAddr,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent(name: &str, extra: &[&str], log: &Path) -> AgentProcess {
    let mut command = Command::new(phoenix_bin());
    command
        .args(["agent", "--node", name])
        .args(["--bind", "127.0.0.1:0", "--rpc-addr", "127.0.0.1:0"])
        .args(extra)
        .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
        .stderr(std::fs::File::create(log).unwrap());
    let child = command.spawn().unwrap();
    // Listening before it logs: both addresses are in the startup line.
    let gossip = addr_in_log(log, ", gossip ");
    let rpc = addr_in_log(log, ", RPC ");
    AgentProcess { child, rpc, gossip }
}

/// Waits for `done`; generous, since failure detection runs on the agent's LAN timings
/// (about 5 to 10 s) and the whole suite shares two cores.
fn wait(what: &str, done: impl FnMut() -> bool) {
    wait_for(what, Duration::from_secs(45), done);
}

fn cli(program: &Path, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap()
}

fn members(agent: &AgentProcess) -> Vec<Value> {
    members_json(agent.rpc, &[])
}

fn status_of(members: &[Value], name: &str) -> Option<String> {
    members
        .iter()
        .find(|m| m["name"] == name)
        .map(|m| m["status"].as_str().unwrap().to_string())
}

#[test]
fn agents_gossip_run_serf_handlers_and_leave_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("handled");
    // A Serf handler script: it sees Serf's environment and the event on stdin.
    let script = format!(
        "printf '%s|%s|%s|%s|%s|%s|%s|' \"$SERF_EVENT\" \"$SERF_SELF_NAME\" \"$SERF_SELF_ROLE\" \
         \"$SERF_TAG_ZONE\" \"$SERF_USER_EVENT\" \"$SERF_USER_LTIME\" \"$PHOENIX_USER_EVENT\" >> {0}; \
         cat >> {0}; echo >> {0}",
        record.display()
    );
    let handler = format!("member-join,user:deploy={script}");
    let a = agent(
        "a",
        &[
            "--tag",
            "role=web",
            "--tag",
            "zone=z1",
            "--event-handler",
            &handler,
        ],
        &dir.path().join("a.log"),
    );
    let b = agent(
        "b",
        &["--tag", "role=db", "--join", &a.gossip.to_string()],
        &dir.path().join("b.log"),
    );
    wait("a and b see each other alive", || {
        [&a, &b].iter().all(|agent| {
            let list = members(agent);
            status_of(&list, "a").as_deref() == Some("alive")
                && status_of(&list, "b").as_deref() == Some("alive")
        })
    });

    let out = cli(
        &phoenix_bin(),
        &["event", "--rpc-addr", &b.rpc.to_string(), "deploy", "v2"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait("a's handler ran for the join and the event", || {
        let seen = std::fs::read_to_string(&record).unwrap_or_default();
        // As in Serf: the local node's own join too (alone, or coalesced with b's), and the
        // payload with a newline added (then the script's own `echo`).
        seen.contains("member-join|a|web|z1||||")
            && seen.contains("a\t127.0.0.1\tweb\trole=web,zone=z1\n")
            && seen.contains("b\t127.0.0.1\tdb\trole=db\n")
            && seen.contains("|deploy|v2\n\n")
    });
    let seen = std::fs::read_to_string(&record).unwrap();
    let line = seen.lines().find(|l| l.starts_with("user|")).unwrap();
    let fields: Vec<&str> = line.split('|').collect();
    assert!(
        fields[5].parse::<u64>().unwrap() >= 1,
        "SERF_USER_LTIME: {line}"
    );
    assert_eq!(
        (fields[6], fields[7]),
        ("deploy", "v2"),
        "PHOENIX_ alias and payload: {line}"
    );

    // A burst of coalescing events reaches the handler once, as its latest.
    for payload in ["v3", "v4"] {
        let out = cli(
            &phoenix_bin(),
            &["event", "--rpc-addr", &b.rpc.to_string(), "deploy", payload],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    wait("the latest of the burst is handled", || {
        std::fs::read_to_string(&record)
            .unwrap_or_default()
            .contains("|deploy|v4\n")
    });
    let seen = std::fs::read_to_string(&record).unwrap();
    assert!(!seen.contains("|deploy|v3"), "coalesced away: {seen}");

    let tags = cli(
        &phoenix_bin(),
        &[
            "tags",
            "--rpc-addr",
            &b.rpc.to_string(),
            "--set",
            "version=2",
            "--delete",
            "role",
        ],
    );
    assert!(tags.status.success(), "{}", text(&tags.stderr));
    wait("a sees b's new tags", || {
        members(&a).iter().any(|m| {
            m["name"] == "b" && m["tags"]["version"] == "2" && m["tags"].get("role").is_none()
        })
    });

    let out = cli(&phoenix_bin(), &["leave", "--rpc-addr", &b.rpc.to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait("a lists b as left, not failed", || {
        status_of(&members(&a), "b").as_deref() == Some("left")
    });
    // As Serf's: the agent that left has exited, and its RPC port is free.
    let mut b = b;
    wait(
        "b's process exits after leaving",
        || matches!(b.child.try_wait(), Ok(Some(status)) if status.success()),
    );
    assert!(
        std::net::TcpStream::connect(b.rpc).is_err(),
        "RPC port released"
    );
}

/// The stock `serf` CLI from Debian's package, unchanged, against a Phoenix agent.
#[test]
fn the_serf_cli_works_against_a_phoenix_agent() {
    let Some(serf) = serf_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = text(&cli(&serf, &["keygen"]).stdout).trim().to_string();
    // A Serf query handler: what it prints is the answer.
    let answer = r#"query=printf '%s:%s:%s' "$SERF_SELF_NAME" "$SERF_QUERY_NAME" "$(cat)""#;
    let a = agent(
        "a",
        &[
            "--tag",
            "role=web",
            "--encrypt",
            &key,
            "--event-handler",
            answer,
        ],
        &dir.path().join("a.log"),
    );
    let with_role = |role: &str| {
        vec![
            "--tag".to_string(),
            format!("role={role}"),
            "--encrypt".to_string(),
            key.clone(),
            "--join".to_string(),
            a.gossip.to_string(),
            "--event-handler".to_string(),
            answer.to_string(),
        ]
    };
    let (b_args, c_args) = (with_role("db"), with_role("cache"));
    let b = agent("b", &strs(&b_args), &dir.path().join("b.log"));
    let c = agent("c", &strs(&c_args), &dir.path().join("c.log"));
    let rpc_a = format!("-rpc-addr={}", a.rpc);
    let rpc_b = format!("-rpc-addr={}", b.rpc);
    let serf_ok = |args: &[&str]| succeeded(&format!("serf {args:?}"), cli(&serf, args));
    wait("serf members lists all three alive", || {
        let out = text(&cli(&serf, &["members", &rpc_a]).stdout);
        out.lines().filter(|l| l.contains("alive")).count() == 3
    });
    let filtered = serf_ok(&["members", &rpc_a, "-tag", "role=db"]);
    assert!(
        filtered.starts_with("b ") && !filtered.contains("a "),
        "{filtered}"
    );
    // Filters are Go-style regular expressions, anchored as Serf anchors them.
    let names = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["members", &rpc_a];
        all.extend_from_slice(args);
        let out = serf_ok(&all);
        let mut names: Vec<String> = out
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&["-tag", "role=w.b"]), ["a"]);
    assert_eq!(names(&["-tag", "role=web|db"]), ["a", "b"]);
    assert_eq!(names(&["-name", "[ab]"]), ["a", "b"]);
    assert_eq!(names(&["-status", "ali.e", "-name", "c"]), ["c"]);
    let bad = cli(&serf, &["members", &rpc_a, "-tag", "role=("]);
    let said = text(&bad.stderr) + &text(&bad.stdout);
    assert!(!bad.status.success(), "{said}");
    assert!(said.contains("Failed to compile regex"), "{said}");
    assert!(serf_ok(&["event", &rpc_a, "deploy", "v2"]).contains("Event 'deploy' dispatched"));
    assert!(serf_ok(&["event", &rpc_a, "no-payload"]).contains("dispatched"));
    serf_ok(&["tags", &rpc_b, "-set", "version=2"]);
    wait("serf sees b's new tag", || {
        text(&cli(&serf, &["members", &rpc_a, "-tag", "version=2"]).stdout).starts_with("b ")
    });
    // `serf rtt` answers at once: an estimate once a ping went between them, until then that
    // no coordinate is known (serf_config.rs checks the estimates themselves).
    let serf_path = serf.to_str().unwrap();
    let rtt = cli(
        Path::new("timeout"),
        &["10", serf_path, "rtt", &rpc_a, "a", "b"],
    );
    let said = text(&rtt.stderr) + &text(&rtt.stdout);
    assert_ne!(rtt.status.code(), Some(124), "serf rtt hung");
    assert!(
        said.contains("Estimated a <-> b rtt: ") || said.contains("Could not find a coordinate"),
        "{said}"
    );
    // Queries: every member's handler answers; filters pick who does.
    let asked = serf_ok(&["query", &rpc_a, "-timeout=2s", "uptime", "hello"]);
    for name in ["a", "b", "c"] {
        assert!(
            asked.contains(&format!("Ack from '{name}'"))
                && asked.contains(&format!("Response from '{name}': {name}:uptime:hello")),
            "{asked}"
        );
    }
    assert!(
        asked.contains("Total Acks: 3") && asked.contains("Total Responses: 3"),
        "{asked}"
    );
    let by_tag = serf_ok(&["query", &rpc_b, "-timeout=2s", "-tag", "role=db", "who"]);
    assert!(by_tag.contains("Total Responses: 1"), "{by_tag}");
    assert!(by_tag.contains("Response from 'b': b:who:"), "{by_tag}");
    // A query's tag filter is unanchored, as in Serf: `ca` picks `cache`, `web|db` two.
    let unanchored = serf_ok(&["query", &rpc_b, "-timeout=2s", "-tag", "role=ca", "who"]);
    assert!(unanchored.contains("Total Responses: 1"), "{unanchored}");
    assert!(unanchored.contains("Response from 'c'"), "{unanchored}");
    let either = serf_ok(&["query", &rpc_b, "-timeout=2s", "-tag", "role=web|db", "who"]);
    assert!(either.contains("Total Responses: 2"), "{either}");
    let by_node = serf_ok(&[
        "query",
        &rpc_b,
        "-timeout=2s",
        "-node",
        "c",
        "-no-ack",
        "who",
    ]);
    assert!(by_node.contains("Response from 'c': c:who:"), "{by_node}");
    assert!(
        !by_node.contains("Ack from") && by_node.contains("Total Responses: 1"),
        "{by_node}"
    );
    // Phoenix's own CLI, same protocol.
    let ours = cli(
        &phoenix_bin(),
        &[
            "query",
            "--rpc-addr",
            &a.rpc.to_string(),
            "--timeout",
            "2s",
            "--json",
            "uptime",
            "x",
        ],
    );
    let ours: Value = serde_json::from_slice(&ours.stdout).unwrap();
    assert_eq!(ours["responses"]["c"], "c:uptime:x", "{ours}");
    assert_eq!(ours["acks"].as_array().unwrap().len(), 3, "{ours}");

    // Key rotation through serf keys against one agent reaches every member.
    let new_key = text(&cli(&serf, &["keygen"]).stdout).trim().to_string();
    serf_ok(&["keys", &rpc_a, "-install", &new_key]);
    serf_ok(&["keys", &rpc_b, "-use", &new_key]);
    serf_ok(&["keys", &rpc_a, "-remove", &key]);
    let listed = serf_ok(&["keys", &rpc_b, "-list"]);
    assert!(
        listed.contains(&new_key) && !listed.contains(&key) && listed.contains("[3/3]"),
        "{listed}"
    );
    let refused = cli(&serf, &["keys", &rpc_a, "-remove", &new_key]);
    assert!(
        !refused.status.success(),
        "the key in use cannot be removed"
    );
    // serf monitor streams the agent's log; serf info shows its stats.
    let mut monitor = Command::new(&serf)
        .args(["monitor", &rpc_a])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = {
        let stdout = monitor.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        rx
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(serf_ok(&["event", &rpc_b, "after-rotation"]).contains("dispatched"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut logged = Vec::new();
    while !logged
        .iter()
        .any(|l: &String| l.contains("[INFO] agent: Received event: user-event: after-rotation"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => logged.push(line),
            Err(_) => panic!("serf monitor never showed the event: {logged:?}"),
        }
    }
    let _ = monitor.kill();
    let _ = monitor.wait();
    // `serf info` has every section of Serf's: the tags, the handlers by Serf's `EVENT:NAME`,
    // the clocks (an event was fired: the event clock is past 1) and the runtime.
    let info: Value = serde_json::from_str(&serf_ok(&["info", "-format=json", &rpc_a])).unwrap();
    assert_eq!(info["agent"]["name"], "a", "{info}");
    assert_eq!(info["tags"]["role"], "web", "{info}");
    assert_eq!(
        info["event_handlers"]["query:"],
        answer["query=".len()..],
        "{info}"
    );
    assert_eq!(info["serf"]["members"], "3", "{info}");
    assert_eq!(info["serf"]["health_score"], "0", "{info}");
    let event_time: u64 = info["serf"]["event_time"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(event_time >= 2, "{info}");
    assert_eq!(info["runtime"]["os"], "linux", "{info}");
    wait("all still alive after the rotation", || {
        text(&cli(&serf, &["members", &rpc_a, "-status", "alive"]).stdout)
            .lines()
            .count()
            == 3
    });
    // A crashed member is failed until force-leave lists it as left.
    drop(c);
    wait("serf lists c as failed", || {
        text(&cli(&serf, &["members", &rpc_a, "-status", "failed"]).stdout).starts_with("c ")
    });
    serf_ok(&["force-leave", &rpc_b, "c"]);
    wait("serf lists c as left", || {
        text(&cli(&serf, &["members", &rpc_a, "-status", "left"]).stdout).starts_with("c ")
    });
    serf_ok(&["leave", &rpc_b]);
    wait("serf lists b as left", || {
        text(&cli(&serf, &["members", &rpc_a, "-status", "left"]).stdout).starts_with("b ")
    });
}

fn strs(owned: &[String]) -> Vec<&str> {
    owned.iter().map(String::as_str).collect()
}

#[test]
fn the_rpc_takes_only_its_token_and_never_an_empty_one() {
    let empty = Command::new(phoenix_bin())
        .args(["agent", "--bind", "127.0.0.1:0", "--rpc-addr", "0.0.0.0:0"])
        .args(["--rpc-auth", ""])
        .output()
        .unwrap();
    assert_eq!(empty.status.code(), Some(1));
    assert!(
        text(&empty.stderr).contains("--rpc-auth is empty: an empty token is refused"),
        "{}",
        text(&empty.stderr)
    );
    // Gossip beyond loopback is encrypted, with a key from `phoenix keygen`.
    let open = Command::new(phoenix_bin())
        .args(["agent", "--bind", "0.0.0.0:0", "--rpc-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(open.status.code(), Some(1));
    assert!(
        text(&open.stderr).contains(
            "--bind 0.0.0.0:0 is not loopback: gossip beyond this machine must be encrypted"
        ),
        "{}",
        text(&open.stderr)
    );
    let keys: Vec<String> = (0..2)
        .map(|_| {
            let output = Command::new(phoenix_bin()).arg("keygen").output().unwrap();
            text(&output.stdout).trim().to_string()
        })
        .collect();
    assert_eq!(keys[0].len(), 44, "32 bytes in base64: {keys:?}");
    assert_ne!(keys[0], keys[1]);
    let Some(serf) = serf_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = agent(
        "a",
        &["--rpc-auth", "rpc-0123456789abcdef", "--encrypt", &keys[0]],
        &dir.path().join("a.log"),
    );
    let rpc = format!("-rpc-addr={}", a.rpc);
    for wrong in ["rpc-0123456789abcdeX", "rpc-0123456789abcde", ""] {
        let output = cli(&serf, &["members", &rpc, &format!("-rpc-auth={wrong}")]);
        assert!(!output.status.success(), "{wrong:?}");
        let said = format!("{}{}", text(&output.stdout), text(&output.stderr));
        assert!(
            said.contains("Invalid authentication token") || said.contains("Authentication"),
            "{wrong:?}: {said}"
        );
    }
    let right = cli(&serf, &["members", &rpc, "-rpc-auth=rpc-0123456789abcdef"]);
    assert!(
        text(&right.stdout).starts_with("a "),
        "{}",
        text(&right.stderr)
    );
}
