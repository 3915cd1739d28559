//! bench/cluster: Phoenix's controller logic (placement rounds and rollout rounds, fenced writes
//! and all) against simulated hosts and a real etcd. The simulated hosts are records in etcd
//! and the answers they would give (reports of booted generations), written by this program;
//! no instance runs. Measures: the first placement of every role, the placement and start of a
//! deploy of one role, the controller's etcd writes per deploy, the time to react to failed
//! hosts, and the process's memory.
//!
//! Usage: cluster_bench [HOSTS] [ROLES] [INSTANCES_PER_ROLE] [FAILED_HOSTS] [ETCD_MEMBERS]
//! (defaults 1000 10 1000 100 1). Needs Debian's etcd-server.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use phoenix_fleet::cluster::reconcile::{PlacementRounds, rollout_round};
use phoenix_fleet::cluster::rollout::Phase;
use phoenix_fleet::cluster::{Capacity, Cluster, HostConstraint, HostRecord, RoleDemand};
use phoenix_store::etcd::test_util::EtcdCluster;
use phoenix_store::etcd::{Etcd, EtcdOptions, Op};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn memory_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn record(name: &str, cpu_millis: u64, memory: u64) -> HostRecord {
    HostRecord {
        name: name.into(),
        address: IpAddr::V4(Ipv4Addr::LOCALHOST),
        gossip_addr: None,
        tags: BTreeMap::new(),
        cpu_millis,
        memory,
        version: "bench".into(),
        started_at_ms: 0,
    }
}

/// Writes `ops` in transactions of at most 100 operations (etcd allows 128).
async fn write_batched(etcd: &Etcd, ops: Vec<Op>) -> Result<()> {
    for chunk in ops.chunks(100) {
        etcd.txn(&[], chunk, &[]).await?;
    }
    Ok(())
}

/// The store's revision: every write adds one, so differences count writes.
async fn revision(etcd: &Etcd) -> Result<i64> {
    Ok(etcd.get_prefix("/bench/none/").await?.0)
}

/// Instances placed in all, over every role.
async fn placed(controller: &Cluster) -> Result<u32> {
    let placements = controller.placements().await?;
    Ok(placements
        .values()
        .map(|p| p.hosts.values().sum::<u32>())
        .sum())
}

#[tokio::main]
async fn main() -> Result<()> {
    let (hosts, roles, per_role, failed, members) = (
        arg(1, 1000),
        arg(2, 10),
        arg(3, 1000),
        arg(4, 100),
        arg(5, 1),
    );
    let members_up = EtcdCluster::start(members, IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    let text = format!(
        "[image.i]\nfrom = \"scratch\"\n[role.r]\nimage = \"i\"\nlisten = \"127.0.0.1:1\"\n[cluster]\netcd = {:?}\nprefix = \"/bench/\"\nlease = \"10s\"\nrequest_timeout = \"10s\"\n",
        members_up.endpoints()
    );
    let config = phoenix_fleet::FleetFile::parse(std::path::Path::new("bench.toml"), &text)?
        .cluster
        .ok_or("no [cluster]")?;
    let etcd = Etcd::new(EtcdOptions {
        endpoints: members_up.endpoints(),
        tls: None,
        credentials: None,
        timeout: Duration::from_secs(10),
    })?;
    let rss_start = memory_kib("VmRSS:");

    // The controller: a host that offers nothing, so nothing is placed on it.
    let controller = Cluster::join(&config, None, record("controller", 0, 0)).await?;
    while !controller.is_leader() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The simulated hosts: 16 cores and 64 GiB each, held by one lease.
    let lease = etcd.grant(Duration::from_secs(3600)).await?;
    let names: Vec<String> = (0..hosts).map(|n| format!("sim-{n:05}")).collect();
    let ops = names
        .iter()
        .map(|name| {
            let value = serde_json::to_vec(&record(name, 16_000, 64 << 30)).unwrap_or_default();
            Op::put_with_lease(format!("/bench/hosts/{name}"), value, lease)
        })
        .collect();
    write_batched(&etcd, ops).await?;

    let demands: BTreeMap<String, RoleDemand> = (0..roles)
        .map(|n| {
            let demand = RoleDemand {
                instances: per_role as u32,
                demand: Capacity {
                    cpu_millis: 100,
                    memory: 64 << 20,
                },
                constraint: HostConstraint::default(),
            };
            (format!("role{n:02}"), demand)
        })
        .collect();
    let mut rounds = PlacementRounds::new(Duration::ZERO);

    // 1. Every role placed for the first time.
    let before = revision(&etcd).await?;
    let started = Instant::now();
    let changed = rounds.round(&controller, &demands).await?;
    let first = started.elapsed();
    let writes_first = revision(&etcd).await? - before;
    println!(
        "first placement: {} instances of {changed} roles on {hosts} hosts in {} ms ({writes_first} etcd writes)",
        placed(&controller).await?,
        first.as_millis(),
    );

    // 2. A deploy of role00: requested, placed and started (phase boot: every host told to
    //    boot its share), every host with instances reports a healthy generation, the switch.
    let timeouts: BTreeMap<String, Duration> = demands
        .keys()
        .map(|r| (r.clone(), Duration::from_secs(600)))
        .collect();
    let role = "role00";
    let before = revision(&etcd).await?;
    let started = Instant::now();
    controller.request_rollout(role, "sha256:bench-v2").await?;
    rollout_round(&controller, &timeouts).await?;
    let booting = started.elapsed();
    let rollout = controller
        .rollouts()
        .await?
        .remove(role)
        .ok_or("no rollout")?;
    assert_eq!(rollout.phase, Phase::Boot);
    let writes_boot = revision(&etcd).await? - before - 1; // less the request
    let placement = controller
        .placements()
        .await?
        .remove(role)
        .ok_or("no placement")?;
    let ready: Vec<Op> = placement
        .hosts
        .keys()
        .map(|host| {
            let value = format!("{{\"id\":{}}}", rollout.id);
            Op::put(format!("/bench/ready/{role}/{host}"), value)
        })
        .collect();
    let reports = ready.len();
    write_batched(&etcd, ready).await?;
    let before = revision(&etcd).await?;
    let switching = Instant::now();
    rollout_round(&controller, &timeouts).await?;
    let switch = switching.elapsed();
    let writes_switch = revision(&etcd).await? - before;
    let switched = controller
        .rollouts()
        .await?
        .remove(role)
        .ok_or("no rollout")?;
    assert_eq!(switched.phase, Phase::Switch);
    println!(
        "deploy of a {per_role}-instance role: placed and started (boot written) in {} ms; switch decided and written {} ms after {reports} hosts reported; controller etcd writes {} (plus 1 request and {reports} host reports)",
        booting.as_millis(),
        switch.as_millis(),
        writes_boot + writes_switch
    );

    // 3. Failed hosts: their records vanish (as when their leases expire); one round places
    //    their instances elsewhere.
    let gone: Vec<&String> = names
        .iter()
        .step_by((hosts / failed.max(1)).max(1))
        .take(failed)
        .collect();
    let placements = controller.placements().await?;
    let lost: u32 = gone
        .iter()
        .map(|host| placements.values().map(|p| p.on(host)).sum::<u32>())
        .sum();
    let deletes = gone
        .iter()
        .map(|name| Op::delete(format!("/bench/hosts/{name}")))
        .collect();
    write_batched(&etcd, deletes).await?;
    let started = Instant::now();
    let changed = rounds.round(&controller, &demands).await?;
    let react = started.elapsed();
    println!(
        "{} hosts failed: {lost} instances re-placed ({changed} roles changed) in {} ms; {} instances placed after",
        gone.len(),
        react.as_millis(),
        placed(&controller).await?
    );
    println!(
        "memory of the bench process (controller logic, etcd client, runtime): RSS {} MiB at start, {} MiB at the end, peak {} MiB",
        rss_start / 1024,
        memory_kib("VmRSS:") / 1024,
        memory_kib("VmHWM:") / 1024
    );
    controller.leave().await;
    drop(members_up);
    Ok(())
}
