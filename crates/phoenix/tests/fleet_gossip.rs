//! Two `phoenix up` hosts on one gossip cluster: each proxy serves the other host's live,
//! healthy instances too, and when a host dies (SIGKILL: its instances die with it) its
//! instances leave the other's pool within the failure-detection time.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Fleet, Load, Phoenix, addr_in_log, failures, members_json, wait_for};
use serde_json::Value;

/// An `[agent]` table body on ports the agent picks (see `Phoenix::gossip_addrs`).
fn agent_table(node: &str, join: Option<SocketAddr>) -> String {
    let join = join
        .map(|addr| format!("join = [\"{addr}\"]\n"))
        .unwrap_or_default();
    format!("node = \"{node}\"\nbind = \"127.0.0.1:0\"\nrpc_addr = \"127.0.0.1:0\"\n{join}")
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
    let mut fleet_a = Fleet::version("a");
    fleet_a.instances = 2;
    fleet_a.agent = Some(agent_table("host-a", None));
    let a = Phoenix::start(&fleet_a);
    let (gossip_a, rpc_a) = gossip_addrs(&a);
    let mut fleet_b = Fleet::version("b");
    fleet_b.instances = 2;
    fleet_b.agent = Some(agent_table("host-b", Some(gossip_a)));
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

    // A's proxy serves B's instances too.
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
}
