//! A fleet across hosts: five `phoenix up` hosts, each in a network namespace of its own on a
//! test bridge, sharing three etcd members; one leads, a killed leader is replaced, hosts are
//! drained by name.

mod common;

use std::time::{Duration, Instant};

use common::rig::Rig;
use common::{Fleet, Phoenix, wait_for};
use phoenix_store::etcd::test_util::{EtcdCluster, etcd_or_skip};
use serde_json::Value;

const HOSTS: usize = 5;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn hosts_of(phoenix: &Phoenix) -> Option<Value> {
    let output = phoenix.cli(&["host", "ls", "--json"]);
    if !output.status.success() {
        eprintln!(
            "phoenix host ls: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        return None;
    }
    let view: Value = serde_json::from_slice(&output.stdout).ok()?;
    Some(view["status"].clone())
}

fn leader(phoenix: &Phoenix) -> Option<String> {
    hosts_of(phoenix)?["leader"].as_str().map(str::to_string)
}

fn names(hosts: &Value) -> Vec<String> {
    hosts["hosts"]
        .as_array()
        .map(|hosts| {
            hosts
                .iter()
                .map(|h| h["name"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Starts `count` hosts on `rig`, host n in namespace n as `hN` (zone a for the first three,
/// b after), every one with the same fleet file (`web` of `instances`) and gossip key, and
/// waits until each serves.
fn start_hosts(rig: &Rig, etcd: &EtcdCluster, count: usize, instances: u32) -> Vec<Phoenix> {
    start_hosts_with(rig, etcd, count, instances, |_| {})
}

/// As `start_hosts`, with the fleet file changed by `change` (on every host alike).
fn start_hosts_with(
    rig: &Rig,
    etcd: &EtcdCluster,
    count: usize,
    instances: u32,
    change: impl Fn(&mut Fleet),
) -> Vec<Phoenix> {
    let mut hosts = Vec::new();
    for n in 0..count {
        let mut fleet = fleet_for(rig, etcd, n, "v1");
        fleet.instances = instances;
        change(&mut fleet);
        let dir = tempfile::tempdir().unwrap();
        fleet.write_to(dir.path());
        // Gossip beyond loopback is sealed: one cluster key in a 0600 file on every host.
        let key = dir.path().join("gossip.key");
        std::fs::write(&key, "cGhvZW5peC1nb3NzaXAtdGVzdC1rZXktMzItYnl0ZSE=\n").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let name = format!("h{n}");
        let address = rig.host_ip(n).to_string();
        let zone = format!("zone={}", if n < 3 { "a" } else { "b" });
        let args = [
            "--host-name",
            &name,
            "--host-address",
            &address,
            "--host-tag",
            &zone,
        ];
        hosts.push(Phoenix::launch(dir, &args, Some(rig.netns(n))));
    }
    for (n, host) in hosts.iter().enumerate() {
        let name = format!("h{n}");
        wait_for(
            &format!("{name} up and registered"),
            Duration::from_secs(60),
            || hosts_of(host).is_some_and(|seen| names(&seen).contains(&name)),
        );
    }
    hosts
}

/// Host `n`'s fleet file of `version`: the same on every host but for the gossip address.
fn fleet_for(rig: &Rig, etcd: &EtcdCluster, n: usize, version: &str) -> Fleet {
    let cluster = format!(
        "\n[cluster]\netcd = {:?}\nlease = \"2s\"\n",
        etcd.endpoints()
    );
    let mut fleet = Fleet::version(version);
    fleet.more = Box::leak(cluster.into_boxed_str());
    fleet.agent = Some(format!(
        "bind = \"{}:7946\"\njoin = [\"{}:7946\"]\nencrypt_file = \"gossip.key\"\n",
        rig.host_ip(n),
        rig.host_ip(0)
    ));
    fleet
}

/// Healthy instances of web's live generation on this host.
fn local_healthy(phoenix: &Phoenix) -> usize {
    phoenix
        .live_instances()
        .iter()
        .filter(|i| i["status"] == "healthy")
        .count()
}

/// Other hosts' instances of web that `phoenix`'s proxy has admitted and found healthy.
fn healthy_remote(phoenix: &Phoenix) -> usize {
    phoenix.status()["roles"][0]["remote"]
        .as_array()
        .map_or(0, |r| r.iter().filter(|r| r["healthy"] == true).count())
}

/// Waits until the controller has placed web one per host and each host runs it, healthy.
fn wait_one_per_host(hosts: &[Phoenix]) {
    wait_for("web placed one per host", Duration::from_secs(30), || {
        hosts_of(&hosts[0]).is_some_and(|seen| {
            let web = &seen["placements"]["web"]["hosts"];
            (0..hosts.len()).all(|n| web[format!("h{n}")] == 1)
        }) && hosts.iter().all(|h| local_healthy(h) == 1)
    });
}

/// Stops `loads`, says what they saw, and asserts that no request failed; the samples.
fn none_failed(what: &str, loads: Vec<common::Load>) -> Vec<common::Sample> {
    let samples: Vec<_> = loads.into_iter().flat_map(|l| l.stop()).collect();
    let failed: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
    eprintln!(
        "{what}: {} requests, {} failed",
        samples.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{what}: {} failed: {:?}",
        failed.len(),
        failed.first()
    );
    samples
}

fn skip() -> bool {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return true;
    }
    !etcd_or_skip()
}

#[test]
fn hosts_elect_one_leader_replace_a_killed_one_and_drain_by_name() {
    if skip() {
        return;
    }
    let rig = Rig::new(HOSTS);
    let etcd = EtcdCluster::start(3, rig.gateway()).expect("three etcd members on the bridge");
    let mut hosts = start_hosts(&rig, &etcd, HOSTS, HOSTS as u32);

    // Every host sees all five, each with its address, tags and live gossip; one leads.
    let mut seen = Value::Null;
    wait_for("five hosts and a leader", Duration::from_secs(30), || {
        seen = hosts_of(&hosts[0]).unwrap_or_default();
        names(&seen).len() == HOSTS && seen["leader"].is_string()
    });
    assert_eq!(names(&seen), ["h0", "h1", "h2", "h3", "h4"]);
    for (n, host) in seen["hosts"].as_array().unwrap().iter().enumerate() {
        assert_eq!(host["address"], rig.host_ip(n).to_string());
        assert_eq!(host["tags"]["zone"], if n < 3 { "a" } else { "b" });
        assert_eq!(host["draining"], false);
    }
    wait_for(
        "every host's gossip member alive",
        Duration::from_secs(20),
        || {
            hosts_of(&hosts[1]).is_some_and(|seen| {
                seen["hosts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|h| h["gossip"] == "alive")
            })
        },
    );
    let first: String = seen["leader"].as_str().unwrap().to_string();
    for host in &hosts {
        assert_eq!(
            leader(host).as_deref(),
            Some(first.as_str()),
            "every host sees one leader"
        );
    }
    let text = hosts[2].cli_ok(&["status"]);
    assert!(text.contains(&format!("host {first:<12}")), "{text}");
    assert!(text.contains("[leader"), "{text}");

    // kill -9 every process of the leader's host, under load through two other hosts'
    // proxies: another host leads within 5 s (a 2 s lease, then an election), and no request
    // fails (the dead host's instance is retried around, then replaced).
    let n = first[1..].parse::<usize>().unwrap();
    wait_for("web placed one per host", Duration::from_secs(30), || {
        hosts.iter().all(|h| local_healthy(h) == 1)
    });
    let (a, b) = ((n + 1) % HOSTS, (n + 2) % HOSTS);
    let loads = [
        hosts[a].load(hosts[a].proxy_addr(), 2),
        hosts[b].load(hosts[b].proxy_addr(), 2),
    ];
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    rig.kill_host(n);
    let _ = hosts[n].child.wait();
    let witness = (n + 1) % HOSTS;
    let mut second = None;
    wait_for("a new leader", Duration::from_secs(10), || {
        second = leader(&hosts[witness]).filter(|l| *l != first);
        second.is_some()
    });
    let took = killed.elapsed();
    eprintln!(
        "time to a new leader after kill -9 of {first}: {} ms",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    wait_for(
        "the dead host's instance replaced",
        Duration::from_secs(30),
        || {
            (0..HOSTS)
                .filter(|m| *m != n)
                .map(|m| local_healthy(&hosts[m]))
                .sum::<usize>()
                == HOSTS
        },
    );
    none_failed(
        "controller host killed under load through two hosts",
        loads.into(),
    );
    wait_for(
        "the dead host off the list",
        Duration::from_secs(10),
        || hosts_of(&hosts[witness]).is_some_and(|seen| !names(&seen).contains(&first)),
    );

    // Drain by name, from any host; a name that is no host is refused with the list.
    let other = (n + 2) % HOSTS;
    let drained = format!("h{other}");
    let out = hosts[witness].cli_ok(&["host", "drain", &drained]);
    assert_eq!(out, format!("{drained}: draining (out of placement)\n"));
    let seen = hosts_of(&hosts[other]).unwrap();
    let host = seen["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == drained.as_str());
    assert_eq!(host.unwrap()["draining"], true);
    let refused = hosts[witness].cli(&["host", "drain", "h-typo"]);
    assert_eq!(refused.status.code(), Some(1));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("no host \"h-typo\" in the cluster (hosts: "),
        "{message}"
    );
    hosts[witness].cli_ok(&["host", "undrain", &drained]);
    let seen = hosts_of(&hosts[other]).unwrap();
    assert!(
        seen["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["draining"] == false)
    );
    let history = hosts[witness].cli_ok(&["history", "--json"]);
    assert!(
        history.contains("host.drained") && history.contains("host.undrained"),
        "{history}"
    );

    // The killed host comes back under its name and takes its record over.
    hosts[n].respawn();
    wait_for("the host back", Duration::from_secs(20), || {
        hosts_of(&hosts[witness]).is_some_and(|seen| names(&seen).len() == HOSTS)
    });
    drop(hosts);
    drop(etcd);
}

#[test]
fn a_role_spreads_over_hosts_moves_off_a_drained_one_and_is_replaced_after_a_host_dies() {
    if skip() {
        return;
    }
    let rig = Rig::new(3);
    let etcd = EtcdCluster::start(3, rig.gateway()).expect("three etcd members on the bridge");
    let hosts = start_hosts(&rig, &etcd, 3, 3);

    // Three instances of web, one on each host.
    wait_for(
        "one web instance on each host",
        Duration::from_secs(30),
        || {
            hosts
                .iter()
                .all(|h| h.live_instances().len() == 1 && local_healthy(h) == 1)
        },
    );
    let names: Vec<String> = hosts
        .iter()
        .map(|h| h.live_instances()[0]["name"].as_str().unwrap().to_string())
        .collect();
    // Each instance listens on its host's address, and h0's proxy reaches all three.
    for (n, host) in hosts.iter().enumerate() {
        let address = host.live_instances()[0]["address"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            address.starts_with(&format!("{}:", rig.host_ip(n))),
            "{address}"
        );
    }
    let proxy = hosts[0].proxy_addr();
    let mut served = std::collections::BTreeSet::new();
    wait_for(
        "h0's proxy serving every host's instance",
        Duration::from_secs(30),
        || {
            let body = hosts[0].get(proxy, "/");
            let answer = body.split("hello from ").nth(1).unwrap_or("");
            if let Some(name) = answer.split_whitespace().next() {
                served.insert(name.to_string());
            }
            names.iter().all(|n| served.contains(n))
        },
    );

    // Drain h1 under load through h0's proxy: its instance moves (started elsewhere, healthy,
    // then stopped on h1) and no request fails.
    let load = hosts[0].load(proxy, 4);
    std::thread::sleep(Duration::from_millis(500));
    hosts[2].cli_ok(&["host", "drain", "h1"]);
    wait_for(
        "h1 empty, its instance on h0 or h2",
        Duration::from_secs(40),
        || {
            hosts[1].live_instances().is_empty()
                && local_healthy(&hosts[0]) + local_healthy(&hosts[2]) == 3
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let samples = none_failed("drain of h1 under load", vec![load]);
    assert!(samples.len() > 200, "{}", samples.len());
    hosts[2].cli_ok(&["host", "undrain", "h1"]);

    // Scale across hosts: the undrained host gets work on the next scale; scaling in takes
    // from the fullest hosts.
    let out = hosts[0].cli_ok(&["scale", "web", "5"]);
    assert!(out.contains("scaled web from 3 to 5"), "{out}");
    let total = |hosts: &[Phoenix]| hosts.iter().map(local_healthy).sum::<usize>();
    assert_eq!(total(&hosts), 5);
    assert!(
        local_healthy(&hosts[1]) >= 1,
        "h1 back in placement gets work"
    );
    let out = hosts[1].cli_ok(&["scale", "web", "3"]);
    assert!(out.contains("scaled web from 5 to 3"), "{out}");
    wait_for(
        "one web instance on each host again",
        Duration::from_secs(30),
        || {
            hosts
                .iter()
                .all(|h| local_healthy(h) == 1 && h.live_instances().len() == 1)
        },
    );

    // kill -9 every process of h2 (phoenix up and its instances): after its lease (2 s) the
    // controller places h2's instances on the hosts left.
    let on_h2 = local_healthy(&hosts[2]);
    assert!(on_h2 >= 1, "{on_h2}");
    let loads = [
        hosts[0].load(proxy, 2),
        hosts[1].load(hosts[1].proxy_addr(), 2),
    ];
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    rig.kill_host(2);
    wait_for(
        "h2's instances replaced on h0 and h1",
        Duration::from_secs(40),
        || local_healthy(&hosts[0]) + local_healthy(&hosts[1]) == 3,
    );
    let replaced = killed.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    none_failed(
        &format!(
            "host h2 killed with SIGKILL under load through h0 and h1 ({on_h2} instance(s) replaced in {} ms)",
            replaced.as_millis()
        ),
        loads.into(),
    );
    let history = hosts[0].cli_ok(&["history", "--json"]);
    assert!(history.contains("role.placed"), "{history}");
    drop(hosts);
    drop(etcd);
}

/// Versions answering through `proxy` in `count` requests from inside `phoenix`'s namespace.
fn versions(phoenix: &Phoenix, proxy: std::net::SocketAddr, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| {
            let body = phoenix.get(proxy, "/");
            let answer = body.split(" version ").nth(1).unwrap_or("");
            answer.split_whitespace().next().unwrap_or("").to_string()
        })
        .collect()
}

/// The one live instance of web on `phoenix`: its address and where other hosts reach it.
fn only_instance(phoenix: &Phoenix) -> (String, Option<String>) {
    let live = phoenix.live_instances();
    assert_eq!(live.len(), 1, "{live:?}");
    let address = live[0]["address"].as_str().unwrap().to_string();
    (address, live[0]["published"].as_str().map(str::to_string))
}

/// A TCP connection to `addr` from inside `netns`, given a second: opened, or why not.
fn connect(netns: common::Netns, addr: std::net::SocketAddr) -> Result<(), std::io::ErrorKind> {
    netns.run(move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .map(drop)
            .map_err(|e| e.kind())
    })
}

#[test]
fn a_deploy_switches_every_host_at_once_and_a_failing_one_changes_nothing() {
    if skip() {
        return;
    }
    // Three hosts, and a fourth namespace on the same network that is no host: an outsider.
    let rig = Rig::new(4);
    let etcd = EtcdCluster::start(3, rig.gateway()).expect("three etcd members on the bridge");
    // Instances in containers on each host's own bridge (the default network).
    let hosts = start_hosts_with(&rig, &etcd, 3, 3, |f| f.network = "bridge");
    wait_one_per_host(&hosts);
    let proxy = hosts[1].proxy_addr();
    wait_for(
        "h1's proxy reaching all three",
        Duration::from_secs(30),
        || {
            hosts[1].status()["roles"][0]["remote"]
                .as_array()
                .is_some_and(|r| r.len() == 2)
        },
    );

    // Each instance is on its host's bridge, published at its host's address; other hosts'
    // proxies send to that published address.
    let (address, published) = only_instance(&hosts[0]);
    let published: std::net::SocketAddr = published.expect("published").parse().unwrap();
    assert_eq!(published.ip(), rig.host_ip(0));
    assert!((20002..24096).contains(&published.port()), "{published}");
    assert!(
        !address.starts_with(&rig.host_ip(0).to_string()),
        "{address}"
    );
    let remote = hosts[1].status()["roles"][0]["remote"].to_string();
    assert!(remote.contains(&published.to_string()), "{remote}");
    assert!(hosts[1].get(published, "/").contains("hello from"));
    // Only Phoenix's user (its proxy) on a peer: another local user there is refused.
    let nobody = common::connect_as_nobody(&rig.netns(1), published);
    let said = common::text(&nobody.stderr);
    assert!(said.contains("refused"), "{said}");
    // Nobody else reaches it: not at the published port from a machine that is no host, not
    // at its bridge address routed through the host.
    let outsider = rig.netns(3);
    // Not translated for it: the host's own closed port answers.
    assert_eq!(
        connect(outsider.clone(), published),
        Err(std::io::ErrorKind::ConnectionRefused)
    );
    let instance: std::net::SocketAddr = address.parse().unwrap();
    let route = format!("{}/32", instance.ip());
    let status = std::process::Command::new("ip")
        .args(["-n", &rig.namespace_name(3), "route", "add", &route, "via"])
        .arg(rig.host_ip(0).to_string())
        .status()
        .unwrap();
    assert!(status.success());
    // Not forwarded: dropped, so the attempt runs out of time.
    assert_eq!(
        connect(outsider, instance),
        Err(std::io::ErrorKind::TimedOut)
    );

    // The same new fleet file on every host, deployed from h2, under load through h1's proxy.
    for (n, host) in hosts.iter().enumerate() {
        let mut v2 = fleet_for(&rig, &etcd, n, "v2");
        v2.instances = 3;
        v2.network = "bridge";
        host.write_fleet(&v2);
    }
    let load = hosts[1].load(proxy, 4);
    std::thread::sleep(Duration::from_millis(300));
    let out = hosts[2].cli_ok(&["deploy", "web"]);
    assert!(out.contains("switched every host"), "{out}");

    // Every host serves v2 at once: nothing but v2 through h1's proxy from now on.
    let after: Vec<String> = versions(&hosts[1], proxy, 30);
    assert!(after.iter().all(|v| v == "v2"), "{after:?}");
    for host in &hosts {
        let live = host.live_instances();
        assert_eq!(live.len(), 1, "{live:?}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let samples = none_failed("deploy across 3 hosts under load", vec![load]);
    // v2 is published at a port of its own, and v1's port closes once v1 has stopped.
    let (_, now_published) = only_instance(&hosts[0]);
    let now_published: std::net::SocketAddr = now_published.unwrap().parse().unwrap();
    assert_ne!(now_published, published);
    assert!(hosts[1].get(now_published, "/").contains("version v2"));
    // Closed, not translated to an address nobody holds now (that would run out of time).
    wait_for(
        "v1's published port closed",
        Duration::from_secs(20),
        || connect(rig.netns(1), published) == Err(std::io::ErrorKind::ConnectionRefused),
    );
    // Old before new: no v1 answer after the first v2 one (one switch, not one per host).
    let served: Vec<&str> = samples
        .iter()
        .filter_map(|s| s.result.as_deref().ok())
        .collect();
    let first_v2 = served.iter().position(|v| *v == "v2").expect("v2 served");
    let late_v1 = served[first_v2..].iter().filter(|v| **v == "v1").count();
    eprintln!(
        "v1 answers after the first v2 one: {late_v1} of {}",
        served.len() - first_v2
    );

    // A version that never becomes healthy: the rollout aborts, naming the host, and every
    // host keeps serving v2.
    for (n, host) in hosts.iter().enumerate() {
        let mut broken = fleet_for(&rig, &etcd, n, "v3");
        broken.instances = 3;
        broken.network = "bridge";
        broken.fail_health = true;
        broken.healthy_timeout = "3s";
        host.write_fleet(&broken);
    }
    let refused = hosts[0].cli(&["deploy", "web"]);
    assert_eq!(refused.status.code(), Some(1));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("h0: ") || message.contains("h1: ") || message.contains("h2: "),
        "{message}"
    );
    let after: Vec<String> = versions(&hosts[1], proxy, 20);
    assert!(after.iter().all(|v| v == "v2"), "{after:?}");
    // Each host journals its own part once the word reaches it (within a tick or two).
    wait_for("h0's journal of the abort", Duration::from_secs(10), || {
        hosts[0]
            .cli_ok(&["history", "--json"])
            .contains("deploy.aborted")
    });

    // A rollback from any host is a rollout too: v1 again on every host, under load.
    let load = hosts[1].load(proxy, 2);
    let out = hosts[0].cli_ok(&["rollback", "web"]);
    assert!(out.contains("switched every host"), "{out}");
    let after: Vec<String> = versions(&hosts[1], proxy, 20);
    assert!(after.iter().all(|v| v == "v1"), "{after:?}");
    none_failed("rollback across 3 hosts under load", vec![load]);

    // h0 restarted in place (`phoenix restart`) hands its instance over: its published port
    // answers other hosts all along.
    let (_, kept) = only_instance(&hosts[0]);
    let kept: std::net::SocketAddr = kept.unwrap().parse().unwrap();
    let direct = hosts[1].load(kept, 2);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // New connections too, not only kept-alive ones: the translation itself stays.
    let fresh = {
        let (stop, netns) = (stop.clone(), rig.netns(1));
        std::thread::spawn(move || {
            netns.enter();
            let (mut opened, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match std::net::TcpStream::connect_timeout(&kept, Duration::from_secs(1)) {
                    Ok(_) => opened += 1,
                    Err(e) => failed.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (opened, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let out = hosts[0].cli_ok(&["restart"]);
    assert!(out.contains("1 of 1 instances kept running"), "{out}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(only_instance(&hosts[0]).1, Some(kept.to_string()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (opened, failed) = fresh.join().unwrap();
    eprintln!(
        "h0 restarted: {opened} new connections to {kept} from h1, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(opened > 50, "{opened}");
    let samples = none_failed(
        &format!("h0 restarted, its instance at {kept} from h1"),
        vec![direct],
    );
    assert!(samples.len() > 100, "{}", samples.len());
    drop(hosts);
    drop(etcd);
}

/// The cluster as host `phoenix` sees it, even when it cannot reach etcd.
fn cluster_view(phoenix: &Phoenix) -> Value {
    phoenix.status()["cluster"].clone()
}

#[test]
fn losing_etcd_members_and_partitioning_the_leader_keep_the_fleet_serving() {
    if skip() {
        return;
    }
    let rig = Rig::new(3);
    let mut etcd = EtcdCluster::start(3, rig.gateway()).expect("three etcd members on the bridge");
    let hosts = start_hosts(&rig, &etcd, 3, 3);
    wait_one_per_host(&hosts);

    // One etcd member of three stops: nothing changes, changes still go through.
    etcd.kill(2);
    hosts[0].cli_ok(&["host", "drain", "h1"]);
    hosts[0].cli_ok(&["host", "undrain", "h1"]);

    // Two stop: every proxy keeps serving (from another host, under load), and a change
    // waits and says why.
    let first = leader(&hosts[0]).unwrap();
    let n: usize = first[1..].parse().unwrap();
    let (other, third) = ((n + 1) % 3, (n + 2) % 3);
    let loads = vec![
        hosts[other].load(hosts[other].proxy_addr(), 2),
        hosts[third].load(hosts[third].proxy_addr(), 2),
    ];
    etcd.kill(1);
    let refused = hosts[other].cli(&["host", "drain", "h0"]);
    assert_eq!(refused.status.code(), Some(1));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("etcd is down or has lost its quorum: changes wait until it answers"),
        "{message}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let view = cluster_view(&hosts[other]);
    assert!(
        view["error"].as_str().unwrap_or("").contains("quorum"),
        "{view}"
    );
    etcd.restart(1).unwrap();
    etcd.restart(2).unwrap();
    wait_for(
        "changes going through again",
        Duration::from_secs(30),
        || hosts[other].cli(&["host", "drain", "h0"]).status.success(),
    );
    hosts[other].cli_ok(&["host", "undrain", "h0"]);
    let samples = none_failed("two of three etcd members down, through two proxies", loads);
    assert!(samples.len() > 100, "{}", samples.len());

    // Cut the leading host off: another host leads, the cut one steps down and its proxy
    // keeps serving its own instance; its instance is placed elsewhere meanwhile.
    let leading = leader(&hosts[0]).unwrap();
    let cut: usize = leading[1..].parse().unwrap();
    let (witness, third) = ((cut + 1) % 3, (cut + 2) % 3);
    let loads = [
        hosts[witness].load(hosts[witness].proxy_addr(), 2),
        hosts[third].load(hosts[third].proxy_addr(), 2),
    ];
    std::thread::sleep(Duration::from_millis(500));
    let cut_at = Instant::now();
    rig.link(cut, false);
    wait_for(
        "a leader on the connected side",
        Duration::from_secs(15),
        || leader(&hosts[witness]).is_some_and(|l| l != leading),
    );
    eprintln!(
        "partition of leader {leading}: new leader in {} ms",
        cut_at.elapsed().as_millis()
    );
    wait_for(
        "the cut host stepping down",
        Duration::from_secs(15),
        || cluster_view(&hosts[cut])["leading"] == false,
    );
    let own = hosts[cut].proxy_addr();
    let body = hosts[cut].get(own, "/");
    assert!(body.contains("hello from"), "{body}");
    wait_for(
        "its instance placed on the other two",
        Duration::from_secs(30),
        || {
            (0..3)
                .filter(|m| *m != cut)
                .map(|m| local_healthy(&hosts[m]))
                .sum::<usize>()
                == 3
        },
    );

    // Reported, not asserted: requests already on their way to the cut host's instance when
    // its link went down wait for the proxy's timeouts (nothing answers, not even a refusal).
    let samples: Vec<_> = loads.into_iter().flat_map(|l| l.stop()).collect();
    let failed = samples.iter().filter(|s| s.result.is_err()).count();
    eprintln!(
        "partition of the leader's host under load through the two others: {} requests, {failed} failed",
        samples.len()
    );

    // Heal: the cut host comes back with nothing placed on it, so no instance is doubled.
    rig.link(cut, true);
    wait_for(
        "the cut host back and empty",
        Duration::from_secs(30),
        || {
            hosts_of(&hosts[witness]).is_some_and(|seen| names(&seen).len() == 3)
                && local_healthy(&hosts[cut]) == 0
                && hosts[cut].live_instances().is_empty()
        },
    );
    let total: usize = hosts.iter().map(local_healthy).sum();
    assert_eq!(total, 3, "three instances in all after the heal");
    drop(hosts);
    drop(etcd);
}

#[test]
fn a_deploy_whose_controller_dies_midway_ends_whole_on_every_host() {
    if skip() {
        return;
    }
    let rig = Rig::new(3);
    let etcd = EtcdCluster::start(3, rig.gateway()).expect("three etcd members on the bridge");
    let mut hosts = start_hosts(&rig, &etcd, 3, 3);
    wait_one_per_host(&hosts);
    let leading = leader(&hosts[0]).unwrap();
    let dead: usize = leading[1..].parse().unwrap();
    let (from, other) = ((dead + 1) % 3, (dead + 2) % 3);

    // v2 starts slowly (3 s), so the rollout is still booting when its controller dies.
    for (n, host) in hosts.iter().enumerate() {
        let mut v2 = fleet_for(&rig, &etcd, n, "v2");
        v2.instances = 3;
        v2.role_keys = "env = { START_DELAY_MS = \"3000\" }\n";
        host.write_fleet(&v2);
    }
    let state = hosts[from].state();
    let dir = hosts[from].dir.path().to_path_buf();
    let netns = rig.netns(from);
    let deploy = std::thread::spawn(move || {
        let mut command = std::process::Command::new(common::phoenix_bin());
        command
            .arg("--state")
            .arg(&state)
            .args(["deploy", "web"])
            .current_dir(dir);
        netns.apply(&mut command);
        command.output().unwrap()
    });
    std::thread::sleep(Duration::from_millis(1500));
    rig.kill_host(dead);
    let _ = hosts[dead].child.wait();
    let output = deploy.join().unwrap();
    let said = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "deploy across a controller failover: {}",
        said.lines().last().unwrap_or("")
    );

    // Finished or rolled back, but the same on both surviving hosts' proxies: never half.
    let seen: Vec<String> = [from, other]
        .iter()
        .flat_map(|n| versions(&hosts[*n], hosts[*n].proxy_addr(), 20))
        .collect();
    let expected = if output.status.success() { "v2" } else { "v1" };
    assert!(seen.iter().all(|v| v == expected), "{said}\n{seen:?}");
    assert!(
        output.status.success(),
        "the new controller finishes the rollout: {said}"
    );
    // Each host deployed with its own fleet file's settings for the role: v2's slow start.
    for n in [from, other] {
        let finished = hosts[n].events("deploy.finished");
        let last = &finished.last().unwrap()["detail"]["report"];
        let booted = last["boot_to_healthy_ms"].as_u64().unwrap();
        assert!(booted >= 3000, "h{n} booted v2 in {booted} ms: {last}");
    }
    hosts.remove(dead);
    drop(hosts);
    drop(etcd);
}

#[test]
fn hosts_reach_etcd_over_mutual_tls_and_a_host_without_a_certificate_is_refused() {
    if skip() {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    common::make_certificates(certs.path());
    let file = |name: &str| certs.path().join(name);
    let tls = phoenix_store::etcd::test_util::Tls {
        ca: file("ca.pem"),
        cert: file("server.pem"),
        key: file("server.key"),
    };
    let loopback = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    let etcd = EtcdCluster::start_with(1, loopback, Some(tls)).expect("etcd over TLS");
    let endpoint = &etcd.endpoints()[0];
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    let fleet = |identity: bool| {
        let mut fleet = Fleet::version("v1");
        fleet.instances = 1;
        let client = if identity {
            format!(
                "cert = {:?}\nkey = {:?}\n",
                file("client.pem"),
                file("client.key")
            )
        } else {
            String::new()
        };
        let table = format!(
            "\n[cluster]\netcd = [{endpoint:?}]\nca = {:?}\n{client}",
            file("ca.pem")
        );
        fleet.more = Box::leak(table.into_boxed_str());
        fleet
    };

    let dir = tempfile::tempdir().unwrap();
    fleet(true).write_to(dir.path());
    let host = Phoenix::launch(dir, &["--host-name", "tls-host"], None);
    wait_for(
        "the host registered over TLS",
        Duration::from_secs(60),
        || hosts_of(&host).is_some_and(|seen| seen["leader"] == "tls-host"),
    );

    let dir = tempfile::tempdir().unwrap();
    fleet(false).write_to(dir.path());
    let mut refused = Phoenix::launch(dir, &["--host-name", "no-cert"], None);
    let status = refused.child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    let log = refused.log();
    assert!(log.contains("cannot join the cluster"), "{log}");
    assert!(log.contains("fatal alert: BadCertificate"), "{log}");
    assert!(log.contains("check [cluster] ca, cert and key"), "{log}");
    drop(host);
}

#[test]
fn the_leader_autoscales_a_role_from_every_hosts_share_of_the_load() {
    if skip() {
        return;
    }
    let rig = Rig::new(2);
    let etcd = EtcdCluster::start(3, rig.gateway()).expect("three etcd members on the bridge");
    let hosts = start_hosts_with(&rig, &etcd, 2, 1, |fleet| {
        fleet.autoscale = Some(
            "min = 1\nmax = 4\nmetric = \"rps_per_instance\"\ntarget = 20\ninterval = \"500ms\"\n\
             window = \"1s\"\nwarmup = \"1s\"\nstabilization = \"3s\"\n",
        );
    });
    let total = |hosts: &[Phoenix]| hosts.iter().map(local_healthy).sum::<usize>();
    wait_for("one instance in all", Duration::from_secs(30), || {
        total(&hosts) == 1
    });
    // The host without it serves once its proxy has admitted and checked the other's.
    wait_for(
        "each proxy reaching the one instance",
        Duration::from_secs(30),
        || {
            hosts
                .iter()
                .all(|h| local_healthy(h) + healthy_remote(h) == 1)
        },
    );
    // Load through both hosts' proxies: far above 20 requests/s per instance.
    let loads = vec![
        hosts[0].load(hosts[0].proxy_addr(), 2),
        hosts[1].load(hosts[1].proxy_addr(), 2),
    ];
    let step = Instant::now();
    wait_for(
        "four instances across the hosts",
        Duration::from_secs(60),
        || total(&hosts) == 4,
    );
    eprintln!(
        "load step to 4 instances across 2 hosts: {:?}",
        step.elapsed()
    );
    // Spread by the placement: two on each host.
    assert_eq!(local_healthy(&hosts[0]), 2);
    assert_eq!(local_healthy(&hosts[1]), 2);
    std::thread::sleep(Duration::from_millis(500));
    none_failed("autoscaling out across 2 hosts under load", loads);

    // Quiet: back to one instance in all, one step at a time, after the stabilization window.
    wait_for("back to one instance", Duration::from_secs(60), || {
        total(&hosts) == 1
    });
    let leader = leader(&hosts[0]).expect("a leader");
    let on_leader = &hosts[if leader == "h0" { 0 } else { 1 }];
    let scaled = on_leader.events("autoscale.scaled");
    let steps: Vec<(u64, u64, u64)> = scaled
        .iter()
        .map(|e| {
            let d = &e["detail"];
            let n = |k: &str| d[k].as_u64().unwrap();
            (n("from"), n("to"), n("hosts"))
        })
        .collect();
    assert!(steps.iter().any(|(from, to, _)| to > from), "{steps:?}");
    assert!(steps.iter().all(|(_, _, hosts)| *hosts == 2), "{steps:?}");
    let ins: Vec<(u64, u64)> = steps
        .iter()
        .filter(|(from, to, _)| to < from)
        .map(|(from, to, _)| (*from, *to))
        .collect();
    assert_eq!(ins, [(4, 3), (3, 2), (2, 1)], "one at a time: {steps:?}");
    // The cluster's journal shows the same decisions from any host, by the leader.
    let other = &hosts[if leader == "h0" { 1 } else { 0 }];
    let journal: Value =
        serde_json::from_str(&other.cli_ok(&["history", "--cluster", "web", "--json"])).unwrap();
    let by_leader: Vec<&Value> = journal
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "autoscale.scaled")
        .collect();
    assert_eq!(by_leader.len(), steps.len(), "{journal}");
    assert!(by_leader.iter().all(|e| e["host"] == leader.as_str()));
    let text = other.cli_ok(&["history", "--cluster"]);
    assert!(
        text.contains("autoscale.scaled") && text.contains("placement.changed"),
        "{text}"
    );
    drop(hosts);
    drop(etcd);
}
