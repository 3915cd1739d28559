//! Mixed clusters of Debian's `serf agent` and `phoenix agent -protocol serf`: each kind joins
//! through the other, and members, tags, user events, queries, failures and leaves flow both
//! ways; then a Serf cluster sealed with a key migrates to Phoenix one agent at a time while
//! events are fired, and none is lost. Every agent is driven with the stock `serf` CLI.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::{free_port, phoenix_bin, serf_or_skip, wait_for};

/// The handler: one line per event (per member, for member events) with what it was and who
/// saw it.
const RECORD: &str = r#"#!/bin/sh
case "$SERF_EVENT" in
member-*)
  while read -r member rest; do
    printf '%s %s %s\n' "$SERF_EVENT" "$member" "$SERF_SELF_NAME" >> "$1"
  done ;;
*)
  payload=$(cat)
  printf '%s %s %s %s\n' "$SERF_EVENT" "$SERF_USER_EVENT$SERF_QUERY_NAME" "$payload" \
    "$SERF_SELF_NAME" >> "$1" ;;
esac
if [ "$SERF_EVENT" = query ]; then printf 'answer from %s' "$SERF_SELF_NAME"; fi
"#;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Serf,
    Phoenix,
}

struct Agent {
    kind: Kind,
    child: Child,
    rpc: String,
    gossip: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    serf: PathBuf,
    dir: PathBuf,
    agents: BTreeMap<String, Agent>,
    /// Flags every agent gets (`-encrypt KEY`).
    common: Vec<String>,
}

impl Cluster {
    fn new(serf: PathBuf, dir: &Path) -> Cluster {
        let script = dir.join("record.sh");
        std::fs::write(&script, RECORD).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        Cluster {
            serf,
            dir: dir.to_path_buf(),
            agents: BTreeMap::new(),
            common: Vec::new(),
        }
    }

    /// Starts `name` of `kind` with Serf's flags, joining through `through`.
    fn start(&mut self, kind: Kind, name: &str, through: Option<&str>) {
        let gossip = format!("127.0.0.1:{}", free_port());
        let rpc = format!("127.0.0.1:{}", free_port());
        self.start_at(kind, name, through, (gossip, rpc), &[]);
    }

    /// Starts `name` at the given gossip and RPC addresses with `extra` flags (with
    /// `-tags-file`, the tags come from the file only, as Serf requires).
    fn start_at(
        &mut self,
        kind: Kind,
        name: &str,
        through: Option<&str>,
        (gossip, rpc): (String, String),
        extra: &[&str],
    ) {
        let mut command = match kind {
            Kind::Serf => Command::new(&self.serf),
            Kind::Phoenix => Command::new(phoenix_bin()),
        };
        command.args(["agent", "-node", name, "-bind", &gossip, "-rpc-addr", &rpc]);
        if !extra.contains(&"-tags-file") {
            command.args(["-tag", &format!("kind={kind:?}"), "-tag", "role=web"]);
        }
        command.args(extra).arg(format!(
            "-event-handler={} {}",
            self.dir.join("record.sh").display(),
            self.records_path(name).display()
        ));
        if kind == Kind::Phoenix {
            command.args(["-protocol", "serf"]);
        }
        command.args(&self.common);
        if let Some(through) = through {
            command.args(["-join", &self.agents[through].gossip]);
        }
        let child = command
            .stdout(std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join(format!("{name}.stderr")))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        self.agents.insert(
            name.to_string(),
            Agent {
                kind,
                child,
                rpc,
                gossip,
            },
        );
        let stderr = self.dir.join(format!("{name}.stderr"));
        let started = (0..300).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            self.try_cli(name, &["members"]).is_some()
        });
        let said = std::fs::read_to_string(stderr).unwrap_or_default();
        assert!(started, "{name} did not start: {said}");
    }

    fn records_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.events"))
    }

    fn records(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.records_path(name))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn try_cli(&self, name: &str, args: &[&str]) -> Option<String> {
        let out = Command::new(&self.serf)
            .arg(args[0])
            .arg(format!("-rpc-addr={}", self.agents[name].rpc))
            .args(&args[1..])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn cli(&self, name: &str, args: &[&str]) -> String {
        self.try_cli(name, args)
            .unwrap_or_else(|| panic!("serf {args:?} against {name} failed"))
    }

    /// Name → (status, tags) as `name`'s `serf members` lists them.
    fn members_of(&self, name: &str) -> BTreeMap<String, (String, String)> {
        self.try_cli(name, &["members"])
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let tags = fields.get(3).copied().unwrap_or("").to_string();
                Some((
                    fields.first()?.to_string(),
                    (fields.get(2)?.to_string(), tags),
                ))
            })
            .collect()
    }

    /// Waits until every running agent lists exactly `expected` (name → status).
    fn settle(&self, expected: &BTreeMap<String, &str>, step: &str) {
        let running: Vec<String> = self.agents.keys().cloned().collect();
        let mut last = String::new();
        let done = (0..300).any(|_| {
            let agreed = running.iter().all(|name| {
                let seen: BTreeMap<String, &str> = self
                    .members_of(name)
                    .into_iter()
                    .map(|(member, (status, _))| {
                        let status = expected
                            .get(&member)
                            .filter(|want| **want == status)
                            .copied()
                            .unwrap_or("other");
                        (member, status)
                    })
                    .collect();
                last = format!("{name} lists {:?}", self.members_of(name));
                seen == *expected
            });
            if !agreed {
                std::thread::sleep(Duration::from_millis(100));
            }
            agreed
        });
        assert!(done, "{step}: expected {expected:?} everywhere; {last}");
    }

    fn kill(&mut self, name: &str) {
        self.agents.remove(name);
    }
}

#[test]
fn five_serf_and_five_phoenix_agents_share_one_cluster() {
    let Some((_dir, mut cluster)) = cluster_or_skip() else {
        return;
    };
    // Each agent joins through one of the other kind: s1 ← p1 ← s2 ← p2 …
    let mut previous: Option<String> = None;
    let mut names = Vec::new();
    for i in 1..=5 {
        for (kind, prefix) in [(Kind::Serf, "s"), (Kind::Phoenix, "p")] {
            let name = format!("{prefix}{i}");
            cluster.start(kind, &name, previous.as_deref());
            previous = Some(name.clone());
            names.push(name);
        }
    }
    let mut expected: BTreeMap<String, &str> = names.iter().map(|n| (n.clone(), "alive")).collect();
    cluster.settle(&expected, "all ten joined");
    for name in &names {
        for (member, (_, tags)) in cluster.members_of(name) {
            let kind = if member.starts_with('s') {
                "Serf"
            } else {
                "Phoenix"
            };
            let mut tags: Vec<&str> = tags.split(',').collect();
            tags.sort();
            assert_eq!(
                tags,
                [format!("kind={kind}").as_str(), "role=web"],
                "{name} lists {member}'s tags"
            );
        }
    }

    // User events both ways: every handler sees each exactly once, payload included.
    cluster.cli(
        "s3",
        &["event", "-coalesce=false", "from-serf", "s-payload"],
    );
    cluster.cli(
        "p3",
        &["event", "-coalesce=false", "from-phoenix", "p-payload"],
    );
    for name in &names {
        wait_for(
            &format!("{name}'s handler"),
            Duration::from_secs(20),
            || {
                let records = cluster.records(name);
                records.contains(&format!("user from-serf s-payload {name}"))
                    && records.contains(&format!("user from-phoenix p-payload {name}"))
            },
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    for name in &names {
        let users: Vec<String> = cluster
            .records(name)
            .into_iter()
            .filter(|r| r.starts_with("user "))
            .collect();
        assert_eq!(users.len(), 2, "{name}: {users:?}");
    }

    // A query from a Phoenix agent: acked and answered by all ten handlers.
    let answer = cluster.cli("p4", &["query", "-timeout=5s", "who"]);
    for name in &names {
        assert!(answer.contains(&format!("Ack from '{name}'")), "{answer}");
        assert!(
            answer.contains(&format!("Response from '{name}': answer from {name}")),
            "{answer}"
        );
    }
    // One from a Serf agent, filtered to the Phoenix agents by a tag.
    let answer = cluster.cli(
        "s4",
        &["query", "-timeout=5s", "-tag", "kind=Phoe.*", "who"],
    );
    let responders = answer.matches("Response from").count();
    assert_eq!(responders, 5, "{answer}");
    assert!(!answer.contains("Response from 's"), "{answer}");

    // A tag change on a Phoenix agent reaches the Serf agents, and the reverse.
    cluster.cli("p2", &["tags", "-set", "role=db"]);
    cluster.cli("s2", &["tags", "-set", "role=cache"]);
    wait_for("the new tags everywhere", Duration::from_secs(20), || {
        names.iter().all(|name| {
            let members = cluster.members_of(name);
            members
                .get("p2")
                .is_some_and(|(_, t)| t.contains("role=db"))
                && members
                    .get("s2")
                    .is_some_and(|(_, t)| t.contains("role=cache"))
        })
    });

    // kill -9 one of each: everyone else lists them failed.
    cluster.kill("s5");
    cluster.kill("p5");
    expected.insert("s5".into(), "failed");
    expected.insert("p5".into(), "failed");
    cluster.settle(&expected, "after kill -9 of s5 and p5");

    // A graceful leave of one of each: left, not failed.
    cluster.cli("p4", &["leave"]);
    cluster.cli("s4", &["leave"]);
    wait_for("p4 and s4 to stop", Duration::from_secs(10), || {
        ["p4", "s4"]
            .iter()
            .all(|n| cluster.try_cli(n, &["members"]).is_none())
    });
    cluster.kill("p4");
    cluster.kill("s4");
    expected.insert("s4".into(), "left");
    expected.insert("p4".into(), "left");
    cluster.settle(&expected, "after the leaves of s4 and p4");

    // Every handler that stayed saw both failures and both leaves, once.
    std::thread::sleep(Duration::from_secs(2));
    for name in cluster.agents.keys() {
        let mut events: Vec<String> = cluster
            .records(name)
            .iter()
            .filter(|r| r.starts_with("member-failed") || r.starts_with("member-leave"))
            .cloned()
            .collect();
        events.sort();
        for (event, member) in [
            ("member-failed", "s5"),
            ("member-failed", "p5"),
            ("member-leave", "s4"),
            ("member-leave", "p4"),
        ] {
            assert!(
                events
                    .iter()
                    .any(|e| e.starts_with(event) && e.contains(member)),
                "{name}: no {event} of {member} in {events:?}"
            );
        }
    }
}

#[test]
fn a_serf_cluster_migrates_to_phoenix_one_agent_at_a_time_under_events() {
    let Some((dir, mut cluster)) = cluster_or_skip() else {
        return;
    };
    // Sealed with a key from Serf's keyring: every packet and push-pull, both kinds.
    let key = phoenix_gossip::Key::generate().unwrap().to_base64();
    cluster.common = vec!["-encrypt".into(), key];
    let size = 4;
    cluster.start(Kind::Serf, "n1", None);
    for i in 2..=size {
        cluster.start(Kind::Serf, &format!("n{i}"), Some("n1"));
    }
    let everyone: BTreeMap<String, &str> = (1..=size).map(|i| (format!("n{i}"), "alive")).collect();
    cluster.settle(&everyone, "the Serf cluster");

    // Replace n1, n2, … by Phoenix agents of the same name, each joining through the next
    // one; an event is fired before and after every step, through an agent not being
    // replaced.
    let mut fired = Vec::new();
    // Since when each Phoenix agent runs, and until when each Serf agent ran (in events).
    let mut phoenix_from: BTreeMap<String, usize> = BTreeMap::new();
    let mut serf_until: BTreeMap<String, usize> = BTreeMap::new();
    for i in 1..=size {
        let name = format!("n{i}");
        let other = format!("n{}", i % size + 1);
        fire(&cluster, &mut fired, &other);
        serf_until.insert(name.clone(), fired.len());
        cluster.cli(&name, &["leave"]);
        cluster.kill(&name);
        // The records of the Serf agent it replaces are kept apart.
        let records = cluster.records_path(&name);
        std::fs::rename(&records, dir.path().join(format!("{name}.serf-events"))).unwrap();
        fire(&cluster, &mut fired, &other);
        cluster.start(Kind::Phoenix, &name, Some(&other));
        phoenix_from.insert(name.clone(), fired.len());
        cluster.settle(&everyone, &format!("{name} replaced"));
        fire(&cluster, &mut fired, &other);
    }
    assert!(cluster.agents.values().all(|a| a.kind == Kind::Phoenix));
    for i in 1..=size {
        fire(&cluster, &mut fired, &format!("n{i}"));
    }

    // Every Phoenix agent saw every event fired after it started, once.
    for (name, from) in &phoenix_from {
        let wanted = &fired[*from..];
        let mut got = Vec::new();
        wait_for(&format!("{name}'s events"), Duration::from_secs(20), || {
            got = user_events(&cluster.records(name).join("\n"));
            wanted.iter().all(|e| got.contains(e))
        });
        let distinct: BTreeSet<&String> = got.iter().collect();
        assert_eq!(
            distinct.len(),
            got.len(),
            "{name} saw an event twice: {got:?}"
        );
    }
    // Every Serf agent saw every event fired while it ran (they were all up at the first).
    for (name, until) in &serf_until {
        let path = dir.path().join(format!("{name}.serf-events"));
        let got = user_events(&std::fs::read_to_string(path).unwrap_or_default());
        for event in &fired[..*until] {
            assert!(
                got.contains(event),
                "the Serf agent {name} missed {event}: {got:?}"
            );
        }
    }
}

#[test]
fn a_phoenix_agent_on_serfs_wire_rejoins_from_its_snapshot_with_its_tags() {
    let Some((dir, mut cluster)) = cluster_or_skip() else {
        return;
    };
    cluster.start(Kind::Serf, "s1", None);
    cluster.start(Kind::Serf, "s2", Some("s1"));
    let snapshot = dir.path().join("p1.snapshot");
    let tags_file = dir.path().join("p1.tags");
    std::fs::write(&tags_file, r#"{"kind": "Phoenix"}"#).unwrap();
    let (snapshot, tags_file) = (snapshot.to_str().unwrap(), tags_file.to_str().unwrap());
    let addresses = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let flags = ["-snapshot", snapshot, "-tags-file", tags_file];
    cluster.start_at(Kind::Phoenix, "p1", Some("s1"), addresses.clone(), &flags);
    let everyone = all_alive(&["s1", "s2", "p1"]);
    cluster.settle(&everyone, "joined");
    cluster.cli("p1", &["tags", "-set", "color=blue"]);
    let tags_seen = |cluster: &Cluster, by: &str| {
        cluster
            .members_of(by)
            .get("p1")
            .map(|(_, tags)| tags.clone())
            .unwrap_or_default()
    };
    wait_for("s2 sees p1's new tag", Duration::from_secs(20), || {
        tags_seen(&cluster, "s2") == "color=blue,kind=Phoenix"
    });
    cluster.cli("s1", &["event", "-coalesce=false", "before"]);
    wait_for("p1 hears the event", Duration::from_secs(20), || {
        user_events(&cluster.records("p1").join("\n")) == ["before"]
    });
    // The snapshot (written once a probe interval) holds the members alive and the event
    // clock, owner-only.
    let wanted = [
        format!("alive: s1 {}", cluster.agents["s1"].gossip),
        format!("alive: s2 {}", cluster.agents["s2"].gossip),
        "event-clock: 1".to_string(),
    ];
    let mut text = String::new();
    wait_for("p1's snapshot", Duration::from_secs(10), || {
        text = std::fs::read_to_string(snapshot).unwrap_or_default();
        wanted.iter().all(|w| text.lines().any(|l| l == w))
    });
    let mode = std::fs::metadata(snapshot).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // Killed, then started again without -join: it rejoins through the snapshot, with the tag
    // set before (from the tags file), and the old event is not delivered again.
    cluster.kill("p1");
    let mut failed = everyone.clone();
    failed.insert("p1".into(), "failed");
    cluster.settle(&failed, "p1 killed");
    cluster.start_at(Kind::Phoenix, "p1", None, addresses.clone(), &flags);
    cluster.settle(&everyone, "p1 rejoined through its snapshot");
    let mut seen = String::new();
    let kept = (0..100).any(|_| {
        seen = tags_seen(&cluster, "s1");
        std::thread::sleep(Duration::from_millis(100));
        seen == "color=blue,kind=Phoenix"
    });
    assert!(kept, "s1 lists p1's tags as {seen:?} after the restart");
    cluster.cli("s2", &["event", "-coalesce=false", "after"]);
    wait_for("p1 hears the next event", Duration::from_secs(20), || {
        user_events(&cluster.records("p1").join("\n")) == ["before", "after"]
    });

    // After a graceful leave the snapshot says so: only -rejoin joins again by itself.
    cluster.cli("p1", &["leave"]);
    cluster.kill("p1");
    let mut left = everyone.clone();
    left.insert("p1".into(), "left");
    cluster.settle(&left, "p1 left");
    let text = std::fs::read_to_string(snapshot).unwrap();
    assert_eq!(text.lines().last(), Some("leave"), "{text}");
    let replayed = phoenix_gossip::snapshot::Snapshot::read(Path::new(snapshot), false);
    assert!(replayed.left && replayed.alive.is_empty(), "{text}");
    let rejoin = [&flags[..], &["-rejoin"]].concat();
    cluster.start_at(Kind::Phoenix, "p1", None, addresses, &rejoin);
    cluster.settle(&everyone, "p1 rejoined after its leave with -rejoin");
}

#[test]
fn keys_rotate_across_serf_and_phoenix_agents_from_either_kind() {
    let Some((dir, mut cluster)) = cluster_or_skip() else {
        return;
    };
    let old = phoenix_gossip::Key::generate().unwrap().to_base64();
    let new = phoenix_gossip::Key::generate().unwrap().to_base64();
    let keyring_file = dir.path().join("p2.keyring");
    std::fs::write(&keyring_file, format!("[\"{old}\"]")).unwrap();
    std::fs::set_permissions(&keyring_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let keyring_flags = ["-keyring-file", keyring_file.to_str().unwrap()];
    let sealed = ["-encrypt", old.as_str()];
    cluster.start_at(Kind::Serf, "s1", None, fresh_addresses(), &sealed);
    cluster.start_at(Kind::Serf, "s2", Some("s1"), fresh_addresses(), &sealed);
    cluster.start_at(Kind::Phoenix, "p1", Some("s1"), fresh_addresses(), &sealed);
    let p2 = fresh_addresses();
    cluster.start_at(Kind::Phoenix, "p2", Some("s2"), p2.clone(), &keyring_flags);
    let everyone = all_alive(&["s1", "s2", "p1", "p2"]);
    cluster.settle(&everyone, "sealed with the old key");

    // Installed through a Serf agent, made primary through a Phoenix one, the old key removed
    // through a Serf agent: each step is done on all four.
    for (through, args) in [
        ("s1", ["keys", "-install", new.as_str()]),
        ("p1", ["keys", "-use", new.as_str()]),
        ("s2", ["keys", "-remove", old.as_str()]),
    ] {
        let out = cluster.try_cli(through, &args);
        assert!(out.is_some(), "serf {args:?} through {through} failed");
    }
    for through in ["s1", "p2"] {
        let listing = cluster.cli(through, &["keys", "-list"]);
        let keys: Vec<&str> = listing
            .lines()
            .filter(|l| l.contains("[4/4]"))
            .map(str::trim)
            .collect();
        assert_eq!(keys, [format!("{new}  [4/4]")], "{through}: {listing}");
    }
    // Gossip now travels under the new key only: an event reaches every handler.
    cluster.cli("p1", &["event", "-coalesce=false", "rotated"]);
    for name in ["s1", "s2", "p1", "p2"] {
        wait_for(
            &format!("{name} hears the event"),
            Duration::from_secs(20),
            || user_events(&cluster.records(name).join("\n")) == ["rotated"],
        );
    }
    // p2 kept the rotation in its keyring file, and rejoins with it after a crash.
    let kept = std::fs::read_to_string(&keyring_file).unwrap();
    assert!(kept.contains(&new) && !kept.contains(&old), "{kept}");
    cluster.kill("p2");
    cluster.start_at(Kind::Phoenix, "p2", Some("s1"), p2, &keyring_flags);
    cluster.settle(&everyone, "p2 back with its keyring file");
}

#[test]
fn serf_rtt_estimates_round_trips_between_both_kinds() {
    let Some((_dir, mut cluster)) = cluster_or_skip() else {
        return;
    };
    cluster.start(Kind::Serf, "s1", None);
    cluster.start(Kind::Serf, "s2", Some("s1"));
    cluster.start(Kind::Phoenix, "p1", Some("s1"));
    cluster.start(Kind::Phoenix, "p2", Some("s2"));
    // Coordinates travel in the acks of probes, both ways: each agent estimates the round trip
    // between any two members it probed or heard from, a Serf agent to a Phoenix agent included.
    for (asked, a, b) in [
        ("s1", "s1", "p1"),
        ("p1", "p1", "s2"),
        ("p2", "p2", "p1"),
        ("s2", "p1", "p2"),
    ] {
        let mut said = String::new();
        let estimated = (0..200).any(|_| {
            said = cluster.try_cli(asked, &["rtt", a, b]).unwrap_or_default();
            std::thread::sleep(Duration::from_millis(100));
            said.starts_with(&format!("Estimated {a} <-> {b} rtt: "))
        });
        assert!(estimated, "serf rtt {a} {b} through {asked}: {said:?}");
        // On loopback: well under a millisecond measured, so the estimate is small.
        let ms: f64 = said
            .split_whitespace()
            .nth(5)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no figure in {said:?}"));
        assert!((0.0..50.0).contains(&ms), "{said}");
    }
}

#[test]
fn query_answers_are_relayed_through_both_kinds() {
    let Some((dir, mut cluster)) = cluster_or_skip() else {
        return;
    };
    let debug = ["-log-level", "debug"];
    cluster.start(Kind::Serf, "s1", None);
    cluster.start_at(Kind::Serf, "s2", Some("s1"), fresh_addresses(), &debug);
    cluster.start(Kind::Phoenix, "p1", Some("s1"));
    cluster.start_at(Kind::Phoenix, "p2", Some("s2"), fresh_addresses(), &debug);
    let everyone = all_alive(&["s1", "s2", "p1", "p2"]);
    cluster.settle(&everyone, "joined");
    // With a relay factor of 3, the one answering sends its ack and answer through all three
    // others too: the asker still counts each once.
    for (asker, answerer, relay) in [("s1", "p1", "s2"), ("p1", "s1", "p2")] {
        let out = cluster.cli(
            asker,
            &[
                "query",
                "-node",
                answerer,
                "-relay-factor",
                "3",
                "-timeout",
                "2s",
                "q",
            ],
        );
        assert!(
            out.contains(&format!(
                "Response from '{answerer}': answer from {answerer}"
            )) && out.contains("Total Acks: 1")
                && out.contains("Total Responses: 1"),
            "query through {asker}: {out}"
        );
        let to = &cluster.agents[asker].gossip;
        let said = match cluster.agents[relay].kind {
            Kind::Serf => format!("Relaying response to addr: {to}"),
            Kind::Phoenix => format!("relaying a response to {to} ({asker})"),
        };
        let log = |name: &str| {
            let stdout = std::fs::read_to_string(dir.path().join(format!("{name}.log")));
            let stderr = std::fs::read_to_string(dir.path().join(format!("{name}.stderr")));
            stdout.unwrap_or_default() + &stderr.unwrap_or_default()
        };
        wait_for(
            &format!("{relay} relays {answerer}'s answer"),
            Duration::from_secs(10),
            || log(relay).contains(&said),
        );
    }
}

#[test]
fn tcp_fallback_pings_are_acked_by_both_kinds_sealed_or_not() {
    use phoenix_gossip::memberlist::{self, MessageType, Ping, StreamMessage};
    let Some((_dir, mut cluster)) = cluster_or_skip() else {
        return;
    };
    let key = phoenix_gossip::Key::generate().unwrap();
    let keyring = phoenix_gossip::Keyring::new(key.clone());
    let encoded = key.to_base64();
    let sealed = ["-encrypt", encoded.as_str()];
    cluster.start(Kind::Serf, "s1", None);
    cluster.start(Kind::Phoenix, "p1", None);
    cluster.start_at(Kind::Serf, "s2", None, fresh_addresses(), &sealed);
    cluster.start_at(Kind::Phoenix, "p2", None, fresh_addresses(), &sealed);
    // Memberlist's fallback probe: a ping on a TCP stream gets its ack on the same stream
    // (without a coordinate: nothing is timed over TCP); a ping meant for another node gets
    // none.
    for (seq, name) in [(7, "s1"), (8, "p1"), (9, "s2"), (10, "p2")] {
        let keyring = name.ends_with('2').then_some(&keyring);
        let ping_for = |node: &str| {
            let mut conn = std::net::TcpStream::connect(&cluster.agents[name].gossip).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let ping = Ping {
                seq_no: seq,
                node: node.to_string(),
                ..Ping::default()
            };
            let body = memberlist::encode(MessageType::Ping, &ping).unwrap();
            memberlist::write_stream(&mut conn, &body, "", keyring).unwrap();
            memberlist::read_stream(&mut conn, keyring)
        };
        match ping_for(name) {
            Ok(StreamMessage::Ack(ack)) => {
                assert_eq!((ack.seq_no, ack.payload), (seq, Vec::new()), "{name}");
            }
            other => panic!("{name} answered a TCP ping with {other:?}"),
        }
        assert!(
            !matches!(ping_for("someone-else"), Ok(StreamMessage::Ack(_))),
            "{name} acked a ping for another node"
        );
    }
}

#[test]
fn a_member_udp_cannot_reach_stays_alive_through_tcp_probes_of_both_kinds() {
    let Some((dir, mut cluster)) = cluster_or_skip() else {
        return;
    };
    cluster.start(Kind::Serf, "s1", None);
    cluster.start(Kind::Phoenix, "p1", Some("s1"));
    // Two members the test plays: both ignore UDP; "deaf" answers pings on TCP, "gone" does
    // not listen on TCP at all.
    let deaf = deaf_member();
    let gone = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for (name, addr) in [("deaf", deaf), ("gone", gone.local_addr().unwrap())] {
        announce(&cluster, "s1", name, addr, 1, true);
    }
    // Both agents probe both: "gone" fails everywhere, "deaf" stays alive on the strength of
    // its TCP acks alone.
    let expected: BTreeMap<String, &str> = [
        ("s1", "alive"),
        ("p1", "alive"),
        ("deaf", "alive"),
        ("gone", "failed"),
    ]
    .iter()
    .map(|(n, s)| (n.to_string(), *s))
    .collect();
    cluster.settle(&expected, "gone failed, deaf alive");
    // Another round of probes of each, and still so.
    std::thread::sleep(Duration::from_secs(3));
    cluster.settle(&expected, "deaf still alive");
    let said = std::fs::read_to_string(dir.path().join("p1.stderr")).unwrap();
    assert!(
        said.contains("was able to connect to deaf over TCP but UDP probes failed"),
        "{said}"
    );
}

#[test]
fn phoenix_agents_vote_in_a_serf_agents_name_conflict() {
    let Some((dir, mut cluster)) = cluster_or_skip() else {
        return;
    };
    cluster.start(Kind::Serf, "s1", None);
    cluster.start(Kind::Serf, "s2", Some("s1"));
    cluster.start(Kind::Phoenix, "p1", Some("s1"));
    cluster.start(Kind::Phoenix, "p2", Some("s2"));
    let everyone = all_alive(&["s1", "s2", "p1", "p2"]);
    cluster.settle(&everyone, "joined");
    // Someone else claims s1's name from another address: s1 asks the cluster where s1 is,
    // and every other member (Phoenix agents included) answers with s1's real address.
    let impostor = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    announce(
        &cluster,
        "s1",
        "s1",
        impostor.local_addr().unwrap(),
        1000,
        false,
    );
    let log = dir.path().join("s1.log");
    wait_for("s1's vote", Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("majority in name conflict resolution [3 / 3]")
    });
    cluster.settle(&everyone, "s1 stays");
}

/// A member that never reads UDP and acks every ping sent to it on TCP; its address.
fn deaf_member() -> std::net::SocketAddr {
    use phoenix_gossip::memberlist::{self, Ack, MessageType, StreamMessage};
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let udp = std::net::UdpSocket::bind(addr).unwrap();
    std::thread::spawn(move || {
        let _udp = udp;
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            // A plain stream message has no length: parse what came so far after each read.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let message = loop {
                match conn.read(&mut chunk) {
                    Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => break None,
                }
                if let Ok(message) = memberlist::read_stream(&mut buf.as_slice(), None) {
                    break Some(message);
                }
            };
            if let Some(StreamMessage::Ping(ping)) = message {
                let ack = Ack {
                    seq_no: ping.seq_no,
                    payload: Vec::new(),
                };
                let body = memberlist::encode(MessageType::Ack, &ack).unwrap();
                let _ = memberlist::write_stream(&mut conn, &body, "", None);
            }
        }
    });
    addr
}

#[test]
fn join_replay_delivers_the_events_either_kind_remembers() {
    let Some((_dir, mut cluster)) = cluster_or_skip() else {
        return;
    };
    cluster.start(Kind::Serf, "s1", None);
    let mut fired = Vec::new();
    for _ in 0..3 {
        fire(&cluster, &mut fired, "s1");
    }
    // A Phoenix agent joining a Serf agent with -replay gets the events it remembers; one
    // joining without does not.
    cluster.start_at(
        Kind::Phoenix,
        "p1",
        Some("s1"),
        fresh_addresses(),
        &["-replay"],
    );
    cluster.start(Kind::Phoenix, "p2", Some("s1"));
    wait_for("p1's replayed events", Duration::from_secs(20), || {
        user_events(&cluster.records("p1").join("\n")) == fired
    });
    let three = all_alive(&["s1", "p1", "p2"]);
    cluster.settle(&three, "p2 joined");
    assert_eq!(
        user_events(&cluster.records("p2").join("\n")),
        Vec::<String>::new()
    );
    // And a Serf agent joining the Phoenix agent with -replay gets them from its buffer.
    cluster.start_at(
        Kind::Serf,
        "s2",
        Some("p1"),
        fresh_addresses(),
        &["-replay"],
    );
    wait_for("s2's replayed events", Duration::from_secs(20), || {
        user_events(&cluster.records("s2").join("\n")) == fired
    });
    // `serf join -replay` through the RPC does the same for an agent already running.
    cluster.cli("p2", &["join", "-replay", &cluster.agents["s1"].gossip]);
    wait_for("p2's replayed events", Duration::from_secs(20), || {
        user_events(&cluster.records("p2").join("\n")) == fired
    });
    // A new event reaches everyone once, replayed or not.
    fire(&cluster, &mut fired, "p2");
    for name in ["s1", "p1", "p2", "s2"] {
        wait_for(&format!("{name}'s events"), Duration::from_secs(20), || {
            let got = user_events(&cluster.records(name).join("\n"));
            got.len() >= fired.len() && got.ends_with(&fired[3..])
        });
        let got = user_events(&cluster.records(name).join("\n"));
        assert_eq!(got.len(), fired.len(), "{name}: {got:?}");
    }
}

/// A cluster in a fresh directory; `None` (the test is skipped) without Debian's `serf`.
fn cluster_or_skip() -> Option<(tempfile::TempDir, Cluster)> {
    let serf = serf_or_skip()?;
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new(serf, dir.path());
    Some((dir, cluster))
}

/// A gossip and an RPC address on loopback, free now.
fn fresh_addresses() -> (String, String) {
    (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    )
}

/// Every one of `names`, alive.
fn all_alive(names: &[&str]) -> BTreeMap<String, &'static str> {
    names.iter().map(|n| (n.to_string(), "alive")).collect()
}

/// Tells `agent` by a push-pull that `node` is alive at `addr` with `incarnation`, as a
/// member the test plays (`join`: as its join, with Serf's state).
fn announce(
    cluster: &Cluster,
    agent: &str,
    node: &str,
    addr: std::net::SocketAddr,
    incarnation: u32,
    join: bool,
) {
    use phoenix_gossip::memberlist::{self, NodeState, PushNodeState, PushPull, SerfPushPull};
    let push = PushPull {
        join,
        nodes: vec![PushNodeState {
            name: node.into(),
            addr: memberlist::ip_bytes(addr.ip()),
            port: addr.port(),
            meta: memberlist::encode_tags(&BTreeMap::new()).unwrap(),
            incarnation,
            state: NodeState::Alive,
            vsn: vec![1, 5, 2, 2, 5, 4],
        }],
        serf: join.then(|| SerfPushPull {
            ltime: 1,
            status_ltimes: BTreeMap::from([(node.to_string(), 1)]),
            ..SerfPushPull::default()
        }),
    };
    let mut conn = std::net::TcpStream::connect(&cluster.agents[agent].gossip).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    memberlist::write_push_pull(&mut conn, &push, "", None).unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = memberlist::read_push_pull(&mut conn, None);
}

/// Fires the next numbered user event through `through`.
fn fire(cluster: &Cluster, fired: &mut Vec<String>, through: &str) {
    let name = format!("e{:03}", fired.len());
    cluster.cli(through, &["event", "-coalesce=false", &name]);
    fired.push(name);
}

/// The user events' names in a handler's records.
fn user_events(records: &str) -> Vec<String> {
    records
        .lines()
        .filter_map(|r| r.strip_prefix("user "))
        .filter_map(|rest| rest.split(' ').next())
        .map(str::to_string)
        .collect()
}
