//! Two `phoenix up` hosts on one gossip cluster: each proxy serves the other host's live,
//! healthy instances too, and when a host dies (SIGKILL: its instances die with it) its
//! instances leave the other's pool within the failure-detection time.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Fleet, Load, Phoenix, addr_in_log, failures, members_json, phoenix_bin, wait_for};
use serde_json::Value;

/// The cluster key of these tests (as `phoenix keygen` prints one).
const KEY: &str = "cGhvZW5peC1nb3NzaXAtdGVzdC1rZXktMzItYnl0ZSE=";

/// An `[agent]` table body on ports the agent picks (see `Phoenix::gossip_addrs`); `key` is
/// the rest of the table's key line(s).
fn agent_table(node: &str, join: Option<SocketAddr>, key: &str) -> String {
    let join = join
        .map(|addr| format!("join = [\"{addr}\"]\n"))
        .unwrap_or_default();
    format!("node = \"{node}\"\nbind = \"127.0.0.1:0\"\nrpc_addr = \"127.0.0.1:0\"\n{join}{key}")
}

/// A TCP server that counts the connections it gets (a rogue's "instance").
fn counting_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (addr, count)
}

/// A `phoenix agent` that joins `through` and claims to be a live, healthy `web` instance of
/// `host` at `addr`, with a made-up signature.
fn rogue(
    name: &str,
    through: SocketAddr,
    host: &str,
    addr: SocketAddr,
    key: Option<&str>,
) -> Child {
    let mut command = Command::new(phoenix_bin());
    command
        .args([
            "agent",
            "--node",
            name,
            "--bind",
            "127.0.0.1:0",
            "--rpc-addr",
            "127.0.0.1:0",
        ])
        .args(["--join", &through.to_string()])
        .args([
            "--tag",
            "role=web",
            "--tag",
            "live=true",
            "--tag",
            "health=healthy",
        ])
        .args([
            "--tag",
            &format!("host={host}"),
            "--tag",
            &format!("addr={addr}"),
        ])
        .args([
            "--tag",
            &format!("sig={}", "ab".repeat(32)),
            "--tag",
            "generation=1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(key) = key {
        command.args(["--encrypt", key]);
    }
    command.spawn().unwrap()
}

/// The `member.refused` entries of `phoenix`'s journal, by member name.
fn refused(phoenix: &Phoenix) -> Vec<(String, String)> {
    phoenix
        .events("member.refused")
        .iter()
        .map(|e| {
            (
                e["detail"]["member"].as_str().unwrap().to_string(),
                e["detail"]["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The gossip and RPC addresses `phoenix up` reports at startup.
fn gossip_addrs(phoenix: &Phoenix) -> (SocketAddr, SocketAddr) {
    let log = phoenix.dir.path().join("up.log");
    (addr_in_log(&log, ", gossip "), addr_in_log(&log, ", RPC "))
}

/// Instance members of role web as host A's agent lists them.
fn web_members(rpc: SocketAddr) -> Vec<Value> {
    members_json(rpc, &["--tag", "role=web"])
}

#[test]
fn hosts_share_instances_by_gossip_and_a_dead_host_leaves_the_pool() {
    // Host A reads the cluster key from a file of its own; host B has it in its fleet file.
    let mut fleet_a = Fleet::version("a");
    fleet_a.instances = 2;
    fleet_a.agent = Some(agent_table(
        "host-a",
        None,
        "encrypt_file = \"gossip.key\"\n",
    ));
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("gossip.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    fleet_a.write_to(dir.path());
    let mut a = Phoenix::launch(dir, &[], None);
    a.wait_serving(2);
    let (gossip_a, rpc_a) = gossip_addrs(&a);
    let mut fleet_b = Fleet::version("b");
    fleet_b.instances = 2;
    fleet_b.agent = Some(agent_table(
        "host-b",
        Some(gossip_a),
        &format!("encrypt = \"{KEY}\"\n"),
    ));
    let mut b = Phoenix::start(&fleet_b);

    // Every instance is a member, tagged with its host, health, generation and liveness.
    wait_for(
        "four healthy live web instances",
        Duration::from_secs(30),
        || {
            let members = web_members(rpc_a);
            members.len() == 4
                && members.iter().all(|m| {
                    m["status"] == "alive"
                        && m["tags"]["health"] == "healthy"
                        && m["tags"]["live"] == "true"
                        && m["tags"]["generation"] == "1"
                })
        },
    );
    let on_b: Vec<String> = web_members(rpc_a)
        .iter()
        .filter(|m| m["tags"]["host"] == "host-b")
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(on_b.len(), 2);

    // A rogue with the key but without the means to sign joins claiming to be B's instance.
    let (rogue_addr, rogue_hits) = counting_server();
    let mut forger = rogue("forger", gossip_a, "host-b", rogue_addr, Some(KEY));

    // A's proxy serves B's instances too, once admitted and checked; never the forger.
    let load = Load::start(a.proxy_addr(), 4);
    wait_for(
        "A's proxy reaches B's instances",
        Duration::from_secs(15),
        || {
            let samples = load.samples.lock().unwrap();
            samples.iter().any(|s| s.result.as_deref() == Ok("b"))
                && samples.iter().any(|s| s.result.as_deref() == Ok("a"))
        },
    );

    wait_for("the forger refused", Duration::from_secs(15), || {
        !refused(&a).is_empty()
    });
    assert_eq!(
        refused(&a),
        [(
            "forger".to_string(),
            "its admission signature does not verify under the cluster key".to_string()
        )]
    );
    let admitted: Vec<String> = a
        .events("member.admitted")
        .iter()
        .map(|e| e["detail"]["member"].as_str().unwrap().to_string())
        .collect();
    let mut expected = on_b.clone();
    expected.sort();
    let mut admitted_sorted = admitted.clone();
    admitted_sorted.sort();
    assert_eq!(admitted_sorted, expected, "B's instances, and only them");
    let remote = a.status()["roles"][0]["remote"].clone();
    let remote_hosts: Vec<&str> = remote
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["host"].as_str().unwrap())
        .collect();
    assert_eq!(remote_hosts, ["host-b", "host-b"], "{remote}");
    assert!(a.cli_ok(&["status"]).contains("on host host-b"));
    let _ = forger.kill();
    let _ = forger.wait();

    // Host B dies; its instances fail out of A's view and A's pool.
    b.kill9();
    let killed = Instant::now();
    wait_for("B's instances failed", Duration::from_secs(30), || {
        web_members(rpc_a)
            .iter()
            .filter(|m| on_b.contains(&m["name"].as_str().unwrap().to_string()))
            .all(|m| m["status"] == "failed")
    });
    let detected = killed.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let removed = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.stop();
    let after: Vec<_> = samples.iter().filter(|s| s.started > removed).collect();
    assert!(after.len() > 20, "the load kept going: {}", after.len());
    assert!(
        after.iter().all(|s| s.result.as_deref() == Ok("a")),
        "after removal only A's instances answer: {:?}",
        after.iter().find(|s| s.result.as_deref() != Ok("a"))
    );
    eprintln!(
        "host B's instances out of A's pool {detected:?} after SIGKILL; {} of {} requests failed meanwhile",
        failures(&samples).len(),
        samples.len()
    );
    assert_eq!(
        rogue_hits.load(Ordering::SeqCst),
        0,
        "the forger got no request"
    );
    let removed: Vec<String> = a
        .events("member.removed")
        .iter()
        .map(|e| e["detail"]["member"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(removed.len(), 2, "{removed:?}");
}

#[test]
fn without_a_cluster_key_a_joining_rogue_gets_no_traffic_and_is_journaled() {
    // A loopback cluster without a key: anyone on this machine may join the gossip, but no
    // other host's instance becomes a backend.
    let mut fleet = Fleet::version("a");
    fleet.instances = 1;
    fleet.agent = Some(agent_table("host-a", None, ""));
    let a = Phoenix::start(&fleet);
    let (gossip_a, rpc_a) = gossip_addrs(&a);
    let (rogue_addr, rogue_hits) = counting_server();
    let mut intruder = rogue("intruder", gossip_a, "host-z", rogue_addr, None);
    wait_for("the intruder joined", Duration::from_secs(15), || {
        web_members(rpc_a).iter().any(|m| m["name"] == "intruder")
    });
    wait_for("the intruder refused", Duration::from_secs(15), || {
        !refused(&a).is_empty()
    });
    let load = Load::start(a.proxy_addr(), 2);
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.stop();
    let _ = intruder.kill();
    let _ = intruder.wait();
    assert!(samples.len() > 20, "{}", samples.len());
    assert_eq!(failures(&samples), Vec::<String>::new());
    assert!(samples.iter().all(|s| s.result.as_deref() == Ok("a")));
    assert_eq!(
        rogue_hits.load(Ordering::SeqCst),
        0,
        "the intruder got no request"
    );
    let (member, reason) = refused(&a).remove(0);
    assert_eq!(member, "intruder");
    assert!(reason.contains("this cluster has no key"), "{reason}");
    assert!(
        a.status()["roles"][0]["remote"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}
