//! Hosts joining, leading, leaving and dying, against a real etcd member.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use phoenix_store::etcd::test_util::{EtcdCluster, etcd_or_skip};

use super::*;

fn etcd() -> Option<EtcdCluster> {
    if !etcd_or_skip() {
        return None;
    }
    Some(EtcdCluster::start(1, IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("etcd starts"))
}

fn config(etcd: &EtcdCluster) -> ClusterConfig {
    let text = format!(
        "[image.i]\nfrom = \"scratch\"\n[role.r]\nimage = \"i\"\nlisten = \"127.0.0.1:1\"\n[cluster]\netcd = {:?}\nprefix = \"/test/\"\nlease = \"2s\"\n",
        etcd.endpoints()
    );
    let fleet = crate::FleetFile::parse(std::path::Path::new("phoenix.toml"), &text).unwrap();
    fleet.cluster.unwrap()
}

fn record(name: &str, last_octet: u8) -> HostRecord {
    HostRecord {
        name: name.into(),
        address: IpAddr::V4(Ipv4Addr::new(10, 99, 0, last_octet)),
        gossip_addr: None,
        tags: [("zone".to_string(), "a".to_string())].into(),
        cpu_millis: 2000,
        memory: 1 << 30,
        version: "test".into(),
        started_at_ms: 0,
    }
}

async fn leader_among(hosts: &[&Cluster], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let leading: Vec<usize> = (0..hosts.len()).filter(|i| hosts[*i].is_leader()).collect();
        assert!(leading.len() <= 1, "two hosts lead at once: {leading:?}");
        if let [one] = leading[..] {
            return one;
        }
        assert!(Instant::now() < deadline, "no host leads after {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn names_of(status: &ClusterStatus) -> Vec<&str> {
    status
        .hosts
        .iter()
        .map(|h| h.record.name.as_str())
        .collect()
}

fn no_gossip() -> BTreeMap<String, String> {
    BTreeMap::new()
}
fn no_instances() -> BTreeMap<String, u32> {
    BTreeMap::new()
}

#[tokio::test]
async fn hosts_register_one_leads_and_another_takes_over_when_it_leaves_or_dies() {
    let Some(etcd) = etcd() else { return };
    let config = config(&etcd);
    let mut hosts = Vec::new();
    for (n, name) in ["h1", "h2", "h3"].iter().enumerate() {
        hosts.push(
            Cluster::join(&config, None, record(name, n as u8 + 1))
                .await
                .unwrap(),
        );
    }
    let first = leader_among(&hosts.iter().collect::<Vec<_>>(), Duration::from_secs(5)).await;
    let status = hosts[0]
        .status(&no_gossip(), &no_instances())
        .await
        .unwrap();
    let names = names_of(&status);
    assert_eq!(names, ["h1", "h2", "h3"]);
    assert_eq!(status.leader.as_deref(), Some(hosts[first].host_name()));
    assert_eq!(status.hosts[1].record, record("h2", 2));

    // A follower cannot write the journal, and says who can.
    let follower = (first + 1) % 3;
    let refused = hosts[follower]
        .journal("test", serde_json::json!({}))
        .await
        .unwrap_err();
    assert_eq!(
        refused.to_string(),
        format!(
            "this host does not lead the cluster now ({} does); try again on it or wait",
            hosts[first].host_name()
        )
    );

    // The leader leaves: another leads well before a lease would have expired.
    let left = Instant::now();
    let leaving = hosts.remove(first);
    leaving.leave().await;
    let second = leader_among(&hosts.iter().collect::<Vec<_>>(), Duration::from_secs(5)).await;
    assert!(
        left.elapsed() < Duration::from_secs(2),
        "{:?}",
        left.elapsed()
    );
    let status = hosts[0]
        .status(&no_gossip(), &no_instances())
        .await
        .unwrap();
    assert_eq!(status.hosts.len(), 2);

    // The new leader dies without a word (kill -9): after its lease runs out (2 s), the last
    // host leads and the dead one is off the list.
    let died = Instant::now();
    let dead = hosts.remove(second);
    dead.vanish();
    let _ = leader_among(&hosts.iter().collect::<Vec<_>>(), Duration::from_secs(6)).await;
    let took = died.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let status = hosts[0]
        .status(&no_gossip(), &no_instances())
        .await
        .unwrap();
    let names = names_of(&status);
    assert_eq!(names, [hosts[0].host_name()]);

    // Each election is in the journal, numbered without gaps across leaders.
    let history = hosts[0].history(10).await.unwrap();
    let seen: Vec<(u64, &str)> = history.iter().map(|e| (e.seq, e.kind.as_str())).collect();
    assert_eq!(
        seen,
        [
            (1, "controller.elected"),
            (2, "controller.elected"),
            (3, "controller.elected")
        ]
    );
    let leaders: Vec<&str> = history.iter().map(|e| e.host.as_str()).collect();
    assert_eq!(leaders[2], hosts[0].host_name());
    assert_ne!(leaders[0], leaders[1]);
}

#[tokio::test]
async fn two_machines_with_one_name_are_refused_and_draining_is_by_known_name() {
    let Some(etcd) = etcd() else { return };
    let config = config(&etcd);
    let h1 = Cluster::join(&config, None, record("h1", 1)).await.unwrap();
    let clash = Cluster::join(&config, None, record("h1", 7))
        .await
        .unwrap_err();
    assert_eq!(
        clash.to_string(),
        "host name \"h1\" is already in the cluster, registered from 10.99.0.1: give each machine its own name (phoenix up --host-name)"
    );
    // The same machine coming back (a restart) takes its record over.
    let again = Cluster::join(&config, None, record("h1", 1)).await.unwrap();

    let unknown = h1.set_draining("h9", true).await.unwrap_err();
    assert_eq!(
        unknown.to_string(),
        "no host \"h9\" in the cluster (hosts: h1)"
    );
    h1.set_draining("h1", true).await.unwrap();
    let status = again
        .status(&no_gossip(), &[("h1".to_string(), 4)].into())
        .await
        .unwrap();
    assert!(status.hosts[0].draining);
    assert_eq!(status.hosts[0].instances, 4);
    h1.set_draining("h1", false).await.unwrap();
    assert!(
        !again
            .status(&no_gossip(), &no_instances())
            .await
            .unwrap()
            .hosts[0]
            .draining
    );
}

#[tokio::test]
async fn the_controller_defines_roles_in_etcd_and_a_host_with_another_fleet_file_is_told_how() {
    let Some(etcd) = etcd() else { return };
    let config = config(&etcd);
    let h1 = Cluster::join(&config, None, record("h1", 1)).await.unwrap();
    let _ = leader_among(&[&h1], Duration::from_secs(5)).await;
    let h2 = Cluster::join(&config, None, record("h2", 2)).await.unwrap();
    let specs = |text: &str| -> BTreeMap<String, RoleSpec> {
        let fleet = crate::FleetFile::parse(std::path::Path::new("phoenix.toml"), text).unwrap();
        fleet
            .roles
            .iter()
            .map(|(name, role)| (name.clone(), RoleSpec::of(role)))
            .collect()
    };
    let file = |instances: u32, secret: &str| {
        format!(
            "[image.i]\nfrom = \"scratch\"\n[secret.{secret}]\nenv = \"X\"\n[role.web]\nimage = \"i\"\ninstances = {instances}\nlisten = \"127.0.0.1:1\"\nsecrets = [\"{secret}\"]\nhosts = {{ tag = \"zone=a\" }}\n"
        )
    };
    let leader = specs(&file(3, "db_password"));
    let before = h2.divergence(&specs(&file(4, "api_key"))).await.unwrap();
    assert_eq!(
        before,
        BTreeMap::new(),
        "nothing defined yet: nothing to compare"
    );
    assert_eq!(h1.define_roles(&leader).await.unwrap(), 1);
    assert_eq!(
        h1.define_roles(&leader).await.unwrap(),
        0,
        "unchanged: nothing written"
    );
    let stored = h2.role_specs().await.unwrap();
    assert_eq!(stored, leader);
    // The secret is there by name only.
    assert_eq!(stored["web"].secrets, ["db_password"]);
    assert_eq!(stored["web"].hosts, ["zone=a"]);

    // A follower cannot define roles; it learns how its own file differs.
    let refused = h2.define_roles(&specs(&file(4, "db_password"))).await;
    assert!(
        matches!(refused, Err(ClusterError::NotLeader { .. })),
        "{refused:?}"
    );
    assert_eq!(h2.divergence(&leader).await.unwrap(), BTreeMap::new());
    let other = h2.divergence(&specs(&file(4, "api_key"))).await.unwrap();
    assert_eq!(
        other["web"],
        "instances: 3 there, 4 here; secrets: [\"db_password\"] there, [\"api_key\"] here"
    );
}
