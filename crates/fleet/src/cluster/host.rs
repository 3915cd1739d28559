//! This host in the cluster: its record under `hosts/NAME`, held by a lease of its own, so
//! that a host that dies (or is cut off from etcd) leaves the list within a time to live.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use phoenix_store::etcd::{Compare, Etcd, Op};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::ClusterError;

/// What a host says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    /// The address other hosts reach this host's instances and proxy at.
    pub address: IpAddr,
    /// Its gossip agent's address, when it runs one.
    #[serde(default)]
    pub gossip_addr: Option<SocketAddr>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// What it offers instances: thousandths of a core, bytes of memory.
    pub cpu_millis: u64,
    pub memory: u64,
    /// Phoenix's version on it.
    pub version: String,
    pub started_at_ms: i64,
}

/// This machine as a host, from `phoenix up`'s flags; what is not given is found out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSettings {
    /// Default: the gossip agent's member name (the machine's host name).
    pub name: Option<String>,
    /// Default: the gossip agent's address.
    pub address: Option<IpAddr>,
    pub tags: BTreeMap<String, String>,
    /// Default: every CPU of the machine.
    pub cpus: Option<f64>,
    /// Default: all of its memory.
    pub memory: Option<u64>,
}

impl HostSettings {
    /// The record this host registers, given its gossip member's name and address.
    pub fn record(&self, (member, gossip): (&str, SocketAddr)) -> HostRecord {
        let cpus = self.cpus.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
        });
        HostRecord {
            name: self.name.clone().unwrap_or_else(|| member.to_string()),
            address: self.address.unwrap_or(gossip.ip()),
            gossip_addr: Some(gossip),
            tags: self.tags.clone(),
            cpu_millis: (cpus * 1000.0).round() as u64,
            memory: self.memory.unwrap_or_else(memory_total),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at_ms: super::now_ms(),
        }
    }
}

/// Registers `record` at `key` under a new lease. A key held by another host's record (a
/// different address) means two machines were given one name: refused. Our own record from a
/// previous run is taken over.
pub(super) async fn register(
    etcd: &Etcd,
    key: &str,
    record: &HostRecord,
    ttl: Duration,
) -> Result<i64, ClusterError> {
    let value = serde_json::to_vec(record).unwrap_or_default();
    loop {
        let existing = etcd.get(key).await?;
        let guard = match &existing {
            None => Compare::absent(key),
            Some(kv) => {
                let theirs: Option<HostRecord> = serde_json::from_slice(&kv.value).ok();
                if let Some(theirs) = theirs.filter(|t| t.address != record.address) {
                    return Err(ClusterError::NameTaken {
                        name: record.name.clone(),
                        address: theirs.address,
                    });
                }
                Compare::mod_revision(key, kv.mod_revision)
            }
        };
        let lease = etcd.grant(ttl).await?;
        let put = Op::put_with_lease(key, value.clone(), lease);
        if etcd.txn(&[guard], &[put], &[]).await?.succeeded {
            return Ok(lease);
        }
        let _ = etcd.revoke(lease).await;
    }
}

/// Keeps the host's lease alive; registers again when it was lost (etcd was away for longer
/// than a time to live). Returns only when `stop` is set.
pub(super) async fn keep_registered(
    etcd: Etcd,
    key: String,
    record: HostRecord,
    ttl: Duration,
    lease: Arc<AtomicI64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ttl / 3) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match etcd.keep_alive(lease.load(Ordering::Relaxed)).await {
            Ok(left) if left > 0 => {
                renewed = Instant::now();
                continue;
            }
            Err(e) if renewed.elapsed() < ttl => {
                tracing::debug!("host lease renewal failed, retrying: {e}");
                continue;
            }
            _ => {}
        }
        match register(&etcd, &key, &record, ttl).await {
            Ok(new) => {
                tracing::info!("registered again in etcd after losing the host lease");
                lease.store(new, Ordering::Relaxed);
                renewed = Instant::now();
            }
            Err(e) => tracing::warn!("cannot register this host in etcd: {e}"),
        }
    }
}

/// Total memory from `/proc/meminfo`, in bytes.
pub fn memory_total() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}
