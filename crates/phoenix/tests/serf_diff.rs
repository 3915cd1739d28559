//! The same handler script under Debian's `serf agent` and under `phoenix agent`, for the same
//! sequence of events on two clusters side by side (join, user events with and without a
//! payload, a query, a tag change, a leave, a kill -9, a force-leave, the reap, a force-leave
//! with -prune, a late join with -replay): what each
//! handler saw must not differ. Both clusters are driven with the stock `serf` CLI and started
//! with the same Serf configuration file.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, phoenix_bin, serf_or_skip};

/// What the handler records of every event: Serf's variables, then stdin as it came.
const RECORD: &str = r#"#!/bin/sh
input=$(cat; echo x)
input=${input%x}
tags=$(env | grep '^SERF_TAG_' | sort | tr '\n' ' ')
printf 'event=%s self=%s role=%s user=%s user_ltime=%s query=%s query_ltime=%s tags=%s\n%s--\n' \
  "$SERF_EVENT" "$SERF_SELF_NAME" "$SERF_SELF_ROLE" "$SERF_USER_EVENT" "$SERF_USER_LTIME" \
  "$SERF_QUERY_NAME" "$SERF_QUERY_LTIME" "$tags" "$input" >> "$1"
if [ "$SERF_EVENT" = query ]; then printf 'answer from %s' "$SERF_SELF_NAME"; fi
"#;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Serf,
    Phoenix,
}

struct Agent {
    child: Option<Child>,
    rpc: String,
    gossip: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One cluster: agents of one kind, started and driven the same way.
struct Cluster {
    kind: Kind,
    serf: PathBuf,
    dir: PathBuf,
    agents: BTreeMap<&'static str, Agent>,
}

impl Cluster {
    fn new(kind: Kind, serf: &Path, dir: &Path) -> Cluster {
        let dir = dir.join(format!("{kind:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("record.sh");
        std::fs::write(&script, RECORD).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Failed members stay (for force-leave); left ones are reaped soon.
        std::fs::write(
            dir.join("agent.json"),
            r#"{"reconnect_timeout": "1h", "tombstone_timeout": "2s"}"#,
        )
        .unwrap();
        Cluster {
            kind,
            serf: serf.to_path_buf(),
            dir,
            agents: BTreeMap::new(),
        }
    }

    /// Starts `name` with Serf's flags, its handler recording to `NAME.events`.
    fn start(&mut self, name: &'static str, tags: &[&str], join: Option<&str>, handler: bool) {
        let (gossip, rpc) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let record = self.dir.join(format!("{name}.events"));
        let program = match self.kind {
            Kind::Serf => self.serf.clone(),
            Kind::Phoenix => phoenix_bin(),
        };
        let mut command = Command::new(program);
        command
            .args(["agent", "-node", name, "-bind", &gossip, "-rpc-addr", &rpc])
            .arg(format!(
                "-config-file={}",
                self.dir.join("agent.json").display()
            ));
        for tag in tags {
            command.args(["-tag", tag]);
        }
        if let Some(through) = join {
            command.args(["-join", &self.agents[through].gossip]);
        }
        if handler {
            let script = self.dir.join("record.sh");
            command.arg(format!(
                "-event-handler={} {}",
                script.display(),
                record.display()
            ));
        }
        let child = command
            .stdout(std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.agents.insert(
            name,
            Agent {
                child: Some(child),
                rpc,
                gossip,
            },
        );
        wait_for_rpc(&self.serf, &self.agents[name].rpc);
    }

    /// Runs the `serf` CLI against `name`'s RPC address.
    fn serf_cli(&self, name: &str, args: &[&str]) -> String {
        let rpc = format!("-rpc-addr={}", self.agents[name].rpc);
        let out = Command::new(&self.serf)
            .arg(args[0])
            .arg(rpc)
            .args(&args[1..])
            .output()
            .unwrap();
        common::succeeded(&format!("{:?}: serf {args:?}", self.kind), out)
    }

    fn kill(&mut self, name: &str) {
        if let Some(mut agent) = self.agents.remove(name)
            && let Some(mut child) = agent.child.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn records(&self, name: &str) -> String {
        let path = self.dir.join(format!("{name}.events"));
        std::fs::read_to_string(path).unwrap_or_default()
    }
}

fn wait_for_rpc(serf: &Path, rpc: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(serf)
            .args(["members", &format!("-rpc-addr={rpc}")])
            .output()
            .unwrap();
        if out.status.success() {
            return;
        }
        assert!(Instant::now() < deadline, "no RPC at {rpc}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every handler named has recorded a record containing each of `expected`,
/// in both clusters, then until no handler has recorded anything for 2 s.
fn settle(clusters: &[&Cluster], handlers: &[&str], expected: &[&str], step: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let snapshot = || -> Vec<String> {
        clusters
            .iter()
            .flat_map(|c| handlers.iter().map(|h| c.records(h)))
            .collect()
    };
    loop {
        let seen = clusters.iter().all(|cluster| {
            handlers.iter().all(|name| {
                let records = cluster.records(name);
                expected.iter().all(|want| {
                    records
                        .split("--\n")
                        .any(|record| want.split('&').all(|part| record.contains(part)))
                })
            })
        });
        if seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "step {step:?}: not every handler saw {expected:?}:\n{}",
            report(clusters, handlers)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut last = snapshot();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
        let now = snapshot();
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "step {step:?}: handlers never went quiet"
        );
    }
}

fn report(clusters: &[&Cluster], handlers: &[&str]) -> String {
    let mut out = String::new();
    for cluster in clusters {
        for name in handlers {
            out.push_str(&format!(
                "== {:?} {name}:\n{}\n",
                cluster.kind,
                cluster.records(name)
            ));
        }
    }
    out
}

/// A handler's records, each made comparable: member lines sorted, and the tags in a line
/// sorted (Serf writes both in Go's random map order); the records themselves sorted, since
/// Serf runs the batches of one flush in random order too, and reaps on a 15 s timer where
/// Phoenix uses 1 s; repeats of one update counted once.
fn normalized(records: &str) -> Vec<String> {
    let mut all: Vec<String> = records
        .split_terminator("--\n")
        .map(|record| {
            let (head, input) = record.split_once('\n').unwrap_or((record, ""));
            if !head.starts_with("event=member-") {
                return record.to_string();
            }
            let mut lines: Vec<String> = input
                .lines()
                .map(|line| {
                    let mut fields: Vec<String> = line.split('\t').map(str::to_string).collect();
                    if let Some(tags) = fields.get_mut(3) {
                        let mut pairs: Vec<&str> = tags.split(',').collect();
                        pairs.sort();
                        *tags = pairs.join(",");
                    }
                    fields.join("\t")
                })
                .collect();
            lines.sort();
            format!("{head}\n{}\n", lines.join("\n"))
        })
        .collect();
    all.sort();
    // Serf repeats a member's last update with every later batch of member events (Phoenix
    // too); how many batches there are depends on timers (Serf reaps every 15 s), so each
    // distinct update is compared, not its number of repeats.
    all.dedup_by(|a, b| a == b && a.starts_with("event=member-update"));
    all
}

#[test]
fn handlers_see_the_same_events_under_serf_and_phoenix() {
    let Some(serf) = serf_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut serf_cluster = Cluster::new(Kind::Serf, &serf, dir.path());
    let mut phoenix_cluster = Cluster::new(Kind::Phoenix, &serf, dir.path());
    macro_rules! both {
        (|$c:ident| $body:expr) => {
            for $c in [&mut serf_cluster, &mut phoenix_cluster] {
                $body;
            }
        };
    }
    let all = ["n1", "n2", "n3"];
    let mut answers = Vec::new();

    both!(|c| c.start("n1", &["role=web", "build-id=42"], None, true));
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &["n1"],
        &["event=member-join&n1\t"],
        "n1 starts",
    );
    both!(|c| c.start("n2", &["role=db"], Some("n1"), true));
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &["n1", "n2"],
        &["n2\t"],
        "n2 joins",
    );
    both!(|c| c.start("n3", &["role=cache"], Some("n1"), true));
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &all,
        &["n3\t"],
        "n3 joins",
    );

    both!(|c| c.serf_cli("n1", &["event", "deploy", "v1"]));
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &all,
        &["user=deploy"],
        "event",
    );
    both!(|c| c.serf_cli("n2", &["event", "-coalesce=false", "restart"]));
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &all,
        &["user=restart"],
        "event, no payload",
    );
    both!(|c| answers.push(c.serf_cli("n1", &["query", "-timeout=3s", "uptime", "now"])));
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &all,
        &["query=uptime"],
        "query",
    );

    both!(|c| c.serf_cli("n2", &["tags", "-set", "role=db2", "-set", "zone=a"]));
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &all,
        &["event=member-update"],
        "tags",
    );
    both!(|c| c.serf_cli("n3", &["leave"]));
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &["n1", "n2"],
        &["event=member-leave&n3\t"],
        "leave",
    );

    both!(|c| c.start("n4", &["role=tmp"], Some("n1"), false));
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &["n1", "n2"],
        &["event=member-join&n4\t"],
        "n4 joins",
    );
    both!(|c| c.kill("n4"));
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &["n1", "n2"],
        &["event=member-failed&n4\t"],
        "kill -9",
    );
    both!(|c| c.serf_cli("n1", &["force-leave", "n4"]));
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &["n1", "n2"],
        &["event=member-leave&n4\t"],
        "force-leave",
    );
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &["n1", "n2"],
        &["event=member-reap&n3\t", "event=member-reap&n4\t"],
        "reap",
    );

    // force-leave -prune forgets a failed member at once: a leave, then a reap.
    both!(|c| c.start("n5", &["role=tmp"], Some("n1"), false));
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &["n1", "n2"],
        &["event=member-join&n5\t"],
        "n5 joins",
    );
    both!(|c| c.kill("n5"));
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &["n1", "n2"],
        &["event=member-failed&n5\t"],
        "kill -9 n5",
    );
    both!(|c| c.serf_cli("n2", &["force-leave", "-prune", "n5"]));
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &["n1", "n2"],
        &["event=member-reap&n5\t"],
        "prune",
    );

    // A late node joins with -replay: its handler gets the user events n1 remembers.
    both!(|c| c.start("n6", &["role=late"], None, true));
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &["n6"],
        &["event=member-join&n6\t"],
        "n6 alone",
    );
    both!(|c| {
        let through = c.agents["n1"].gossip.clone();
        c.serf_cli("n6", &["join", "-replay", &through])
    });
    settle(
        &[&serf_cluster, &phoenix_cluster],
        &["n6"],
        &["user=deploy", "user=restart", "event=member-join&n2\t"],
        "join -replay",
    );

    for name in ["n1", "n2", "n3", "n6"] {
        let (serf_saw, phoenix_saw) = (
            normalized(&serf_cluster.records(name)),
            normalized(&phoenix_cluster.records(name)),
        );
        assert_eq!(
            serf_saw, phoenix_saw,
            "{name}'s handler saw different events (left: serf, right: phoenix)"
        );
    }
    // The query's answers, as the serf CLI printed them.
    let responses = |out: &str| -> Vec<String> {
        let mut lines: Vec<String> = out
            .lines()
            .filter(|l| l.starts_with("Response from"))
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    };
    assert_eq!(responses(&answers[0]), responses(&answers[1]));
    assert_eq!(responses(&answers[0]).len(), 3, "{}", answers[0]);
}
