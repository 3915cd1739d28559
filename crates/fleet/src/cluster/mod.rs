//! A fleet across hosts. Every host registers in etcd under a lease of its own; one host at a
//! time leads as the controller, elected on another lease; every write of the controller is
//! fenced by its lease, so a deposed controller changes nothing. Placement decides which host
//! runs each instance.
//!
//! Keys, under the fleet's prefix:
//!
//! | key                 | value                        | lease          |
//! |---------------------|------------------------------|----------------|
//! | `leader`            | the leading host's name      | the leader's   |
//! | `hosts/NAME`        | [`HostRecord`] (JSON)        | the host's     |
//! | `drain/NAME`        | why, and since when          | none           |
//! | `journal/SEQ`       | a journal event (JSON)       | none (fenced)  |
//! | `placements/ROLE`   | [`RolePlacement`]: per host  | none (fenced)  |
//! | `reports/NAME`      | healthy instances per role   | the host's     |
//! | `roles/ROLE`        | [`RoleSpec`]: the definition | none (fenced)  |
//! | `sizes/ROLE`        | `phoenix scale`'s size       | none           |
//! | `rollouts/ROLE`     | the last rollout and phase   | none (fenced)  |
//! | `intents/deploy/R`  | a deploy asked for           | none           |
//! | `ready/ROLE/NAME`   | a host's part booted (or not)| the host's     |

pub(crate) mod autoscale;
mod host;
mod placement;
mod plan;
pub mod reconcile;
pub mod rollout;
mod spec;

pub use host::{HostRecord, HostSettings, memory_total};
pub use placement::{Capacity, HostConstraint, HostView, PlacementError, Placer};
pub use plan::{RoleDemand, RolePlacement, plan_role};
pub use spec::{RoleSpec, difference};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phoenix_store::etcd::{Candidate, Compare, Etcd, EtcdError, EtcdOptions, Leadership, Op};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::ClusterConfig;

/// A failure of the cluster layer.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(
        "host name {name:?} is already in the cluster, registered from {address}: give each machine its own name (phoenix up --host-name)"
    )]
    NameTaken {
        name: String,
        address: std::net::IpAddr,
    },
    #[error("no host {name:?} in the cluster (hosts: {known})")]
    UnknownHost { name: String, known: String },
    #[error("this host does not lead the cluster now ({leader} does); try again on it or wait")]
    NotLeader { leader: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("cannot join the cluster (is etcd running at the endpoints of [cluster] etcd?)")]
    Join {
        #[source]
        source: EtcdError,
    },
}

/// The cluster as `phoenix status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This host's name.
    pub host: String,
    /// The leading host, if any host leads now.
    pub leader: Option<String>,
    pub hosts: Vec<HostStatus>,
    /// How many instances of each role each host runs, as the controller placed them.
    #[serde(default)]
    pub placements: BTreeMap<String, RolePlacement>,
}

/// One host in `phoenix status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    #[serde(flatten)]
    pub record: HostRecord,
    /// Its lease is alive (it answers etcd).
    pub alive: bool,
    /// `phoenix host drain` put it out of placement.
    pub draining: bool,
    /// The state of its gossip member, as this host sees it (`alive`, `suspect`, `failed`,
    /// `left`), when known.
    pub gossip: Option<String>,
    /// Instances it runs.
    pub instances: u32,
}

/// What a host reports of a role (`reports/NAME`, per role).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleReport {
    /// Healthy instances of its live generation.
    pub healthy: u32,
    /// The live generation's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// A journal event, as kept in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterEvent {
    pub seq: u64,
    pub at_ms: i64,
    pub kind: String,
    pub host: String,
    pub detail: serde_json::Value,
}

/// This host's membership of the cluster; cheap to clone.
#[derive(Clone)]
pub struct Cluster(Arc<Inner>);

struct Inner {
    etcd: Etcd,
    prefix: String,
    ttl: Duration,
    record: HostRecord,
    /// Set while this host leads; its writes are fenced by it.
    leadership: Mutex<Option<Arc<Leadership>>>,
    next_seq: Mutex<u64>,
    /// Where this host's fleet file says otherwise than the controller's: role → how.
    divergent: Mutex<BTreeMap<String, String>>,
    /// The host's lease (renewed, or replaced after etcd was away): what its reports hang on.
    host_lease: Arc<AtomicI64>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cluster({} in {:?})", self.0.record.name, self.0.etcd)
    }
}

impl Cluster {
    /// Registers this host and starts campaigning to lead.
    pub async fn join(
        config: &ClusterConfig,
        tls: Option<Arc<rustls::ClientConfig>>,
        record: HostRecord,
    ) -> Result<Self, ClusterError> {
        let etcd = Etcd::new(EtcdOptions {
            endpoints: config.etcd.clone(),
            tls,
            credentials: config.user.clone().zip(config.password.clone()),
            timeout: config.request_timeout,
        })?;
        let prefix = config.prefix.clone();
        let host_key = format!("{prefix}hosts/{}", record.name);
        let lease = host::register(&etcd, &host_key, &record, config.lease)
            .await
            .map_err(|e| match e {
                ClusterError::Etcd(source) => ClusterError::Join { source },
                other => other,
            })?;
        let (stop, stopped) = watch::channel(false);
        let host_lease = Arc::new(AtomicI64::new(lease));
        let cluster = Cluster(Arc::new(Inner {
            etcd: etcd.clone(),
            prefix,
            ttl: config.lease,
            record: record.clone(),
            leadership: Mutex::new(None),
            next_seq: Mutex::new(0),
            divergent: Mutex::new(BTreeMap::new()),
            host_lease: host_lease.clone(),
            stop,
            tasks: Mutex::new(Vec::new()),
        }));
        let keeper =
            host::keep_registered(etcd, host_key, record, config.lease, host_lease, stopped);
        cluster.spawn(keeper);
        cluster.spawn(cluster.clone().campaign_forever());
        Ok(cluster)
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        self.0.tasks.lock().unwrap().push(handle);
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.0.prefix)
    }

    /// This host's name.
    pub fn host_name(&self) -> &str {
        &self.0.record.name
    }

    /// The time to live of the leases.
    pub fn lease(&self) -> Duration {
        self.0.ttl
    }

    /// The address other hosts reach this one at.
    pub fn address(&self) -> std::net::IpAddr {
        self.0.record.address
    }

    /// Whether this host leads now.
    pub fn is_leader(&self) -> bool {
        self.0.leadership.lock().unwrap().is_some()
    }

    async fn campaign_forever(self) {
        let candidate = Candidate::new(
            self.0.etcd.clone(),
            self.key("leader"),
            self.0.record.name.clone(),
            self.0.ttl,
        );
        let mut stopped = self.0.stop.subscribe();
        loop {
            let won = tokio::select! {
                won = candidate.campaign() => won,
                _ = stopped.wait_for(|s| *s) => return,
            };
            let leadership = match won {
                Ok(leadership) => Arc::new(leadership),
                Err(e) => {
                    tracing::warn!("cannot campaign to lead the cluster: {e}");
                    tokio::time::sleep(self.0.ttl / 3).await;
                    continue;
                }
            };
            self.take_office(leadership.clone()).await;
            let stopping = tokio::select! {
                _ = leadership.lost() => false,
                _ = stopped.wait_for(|s| *s) => true,
            };
            if stopping {
                self.step_down();
                if let Some(leadership) = Arc::into_inner(leadership) {
                    let _ = leadership.resign().await;
                }
                return;
            }
            tracing::warn!("this host lost the lead of the cluster (its etcd lease expired)");
            self.step_down();
        }
    }

    async fn take_office(&self, leadership: Arc<Leadership>) {
        let last = self.0.etcd.last_under(&self.key("journal/")).await;
        let next = match last {
            Ok(Some(kv)) => {
                kv.key_str()
                    .rsplit('/')
                    .next()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0)
                    + 1
            }
            Ok(None) => 1,
            Err(e) => {
                tracing::warn!("cannot read the cluster journal: {e}");
                1
            }
        };
        *self.0.next_seq.lock().unwrap() = next;
        *self.0.leadership.lock().unwrap() = Some(leadership.clone());
        tracing::info!(host = %self.0.record.name, term = leadership.term(), "this host leads the cluster");
        let detail = serde_json::json!({ "term": leadership.term() });
        if let Err(e) = self.journal("controller.elected", detail).await {
            tracing::warn!("cannot journal the election: {e}");
        }
    }

    fn step_down(&self) {
        *self.0.leadership.lock().unwrap() = None;
    }

    /// The leadership to fence a write with, or who leads instead.
    async fn office(&self) -> Result<Arc<Leadership>, ClusterError> {
        if let Some(leadership) = self.0.leadership.lock().unwrap().clone() {
            return Ok(leadership);
        }
        let leader = self.0.etcd.get(&self.key("leader")).await?;
        Err(ClusterError::NotLeader {
            leader: leader.map_or("no host".into(), |kv| {
                String::from_utf8_lossy(&kv.value).into_owned()
            }),
        })
    }

    /// Appends an event to the cluster's journal; only the leader can, fenced by its lease.
    pub async fn journal(
        &self,
        kind: &str,
        detail: serde_json::Value,
    ) -> Result<u64, ClusterError> {
        let leadership = self.office().await?;
        loop {
            let seq = *self.0.next_seq.lock().unwrap();
            let key = self.key(&format!("journal/{seq:020}"));
            let event = ClusterEvent {
                seq,
                at_ms: now_ms(),
                kind: kind.to_string(),
                host: self.0.record.name.clone(),
                detail: detail.clone(),
            };
            let value = serde_json::to_vec(&event).unwrap_or_default();
            // The journal keeps its last JOURNAL_KEPT events: each append drops the one that
            // falls out of the window.
            let mut ops = vec![Op::put(key.as_str(), value)];
            if seq > JOURNAL_KEPT {
                let old = self.key(&format!("journal/{:020}", seq - JOURNAL_KEPT));
                ops.push(Op::delete(old));
            }
            let done = leadership.txn(&[Compare::absent(key.as_str())], &ops).await;
            let mut next = self.0.next_seq.lock().unwrap();
            match done {
                Ok(result) if result.succeeded => {
                    *next = seq + 1;
                    return Ok(seq);
                }
                // Written by a previous leader after we read the last entry: skip past it.
                Ok(_) => *next = seq + 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The newest `limit` events of the cluster's journal, oldest first.
    pub async fn history(&self, limit: usize) -> Result<Vec<ClusterEvent>, ClusterError> {
        let (_, kvs) = self.0.etcd.get_prefix(&self.key("journal/")).await?;
        let skip = kvs.len().saturating_sub(limit);
        Ok(kvs
            .iter()
            .skip(skip)
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    /// Every registered host, whether it drains, and who leads. `gossip` has the state of
    /// hosts' gossip members by name; `instances` how many instances each host runs.
    pub async fn status(
        &self,
        gossip: &BTreeMap<String, String>,
        instances: &BTreeMap<String, u32>,
    ) -> Result<ClusterStatus, ClusterError> {
        let leader = self.0.etcd.get(&self.key("leader")).await?;
        let hosts = self
            .hosts()
            .await?
            .into_iter()
            .map(|(record, draining)| HostStatus {
                alive: true,
                draining,
                gossip: gossip.get(&record.name).cloned(),
                instances: instances.get(&record.name).copied().unwrap_or(0),
                record,
            })
            .collect();
        Ok(ClusterStatus {
            host: self.0.record.name.clone(),
            leader: leader.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
            hosts,
            placements: self.placements().await?,
        })
    }

    /// Every registered host (its record under its lease), and whether it drains.
    async fn hosts(&self) -> Result<Vec<(HostRecord, bool)>, ClusterError> {
        let hosts: BTreeMap<String, HostRecord> = self.read_under("hosts/").await?;
        // A drain mark counts by its key, whatever its value.
        let prefix = self.key("drain/");
        let (_, drains) = self.0.etcd.get_prefix(&prefix).await?;
        let draining: Vec<&str> = drains
            .iter()
            .filter_map(|kv| kv.key_str().strip_prefix(&prefix))
            .collect();
        Ok(hosts
            .into_values()
            .map(|record| {
                let draining = draining.contains(&record.name.as_str());
                (record, draining)
            })
            .collect())
    }

    /// The address of every registered host.
    pub async fn host_addresses(&self) -> Result<Vec<std::net::IpAddr>, ClusterError> {
        let hosts: BTreeMap<String, HostRecord> = self.read_under("hosts/").await?;
        Ok(hosts.into_values().map(|record| record.address).collect())
    }

    /// Takes `host` out of placement (`on`) or puts it back. Any host may ask; the leader
    /// journals it.
    pub async fn set_draining(&self, host: &str, on: bool) -> Result<(), ClusterError> {
        let names: Vec<String> = self
            .hosts()
            .await?
            .into_iter()
            .map(|(record, _)| record.name)
            .collect();
        let key = self.key(&format!("drain/{host}"));
        if on {
            if !names.iter().any(|n| n == host) {
                return Err(ClusterError::UnknownHost {
                    name: host.to_string(),
                    known: names.join(", "),
                });
            }
            let value = serde_json::json!({ "since_ms": now_ms(), "by": self.0.record.name });
            self.0.etcd.put(&key, value.to_string(), 0).await?;
        } else {
            self.0.etcd.delete(&key, false).await?;
        }
        Ok(())
    }

    /// Writes `value` at `rest` under the prefix; only the leader can, fenced by its lease.
    pub async fn put_fenced(&self, rest: &str, value: Vec<u8>) -> Result<(), ClusterError> {
        self.write_fenced(&[Op::put(self.key(rest), value)]).await
    }

    /// Runs `ops` in one transaction fenced by the leader's lease.
    pub(crate) async fn write_fenced(&self, ops: &[Op]) -> Result<(), ClusterError> {
        let leadership = self.office().await?;
        leadership.txn(&[], ops).await?;
        Ok(())
    }

    /// Every role's placement.
    pub async fn placements(&self) -> Result<BTreeMap<String, RolePlacement>, ClusterError> {
        self.read_under("placements/").await
    }

    /// Every JSON value under `rest` of the prefix, by the rest of its key (values that do not
    /// parse are left out: they are not Phoenix's).
    pub(crate) async fn read_under<T: serde::de::DeserializeOwned>(
        &self,
        rest: &str,
    ) -> Result<BTreeMap<String, T>, ClusterError> {
        let prefix = self.key(rest);
        let (_, kvs) = self.0.etcd.get_prefix(&prefix).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let name = kv.key_str().strip_prefix(&prefix)?.to_string();
                Some((name, serde_json::from_slice(&kv.value).ok()?))
            })
            .collect())
    }

    /// Every live host as placement sees it (a host whose lease ran out is not listed).
    pub async fn host_views(&self) -> Result<Vec<HostView>, ClusterError> {
        Ok(self
            .hosts()
            .await?
            .into_iter()
            .map(|(record, draining)| HostView {
                name: record.name,
                tags: record.tags,
                capacity: Capacity {
                    cpu_millis: record.cpu_millis,
                    memory: record.memory,
                },
                draining,
                alive: true,
            })
            .collect())
    }

    /// What each host reports: healthy instances of each role's live generation.
    pub async fn reports(
        &self,
    ) -> Result<BTreeMap<String, BTreeMap<String, RoleReport>>, ClusterError> {
        self.read_under("reports/").await
    }

    /// Reports this host's healthy instances per role (held by the host's lease, so a dead
    /// host's report goes with it).
    pub async fn report(&self, healthy: &BTreeMap<String, RoleReport>) -> Result<(), ClusterError> {
        let value = serde_json::to_vec(healthy).unwrap_or_default();
        self.put_own(&format!("reports/{}", self.0.record.name), value)
            .await
    }

    /// Writes `value` at `rest` under the prefix, held by this host's lease (it goes when the
    /// host does).
    pub(crate) async fn put_own(&self, rest: &str, value: Vec<u8>) -> Result<(), ClusterError> {
        let lease = self.0.host_lease.load(Ordering::Relaxed);
        self.0.etcd.put(&self.key(rest), value, lease).await?;
        Ok(())
    }

    /// Sets a role's size across hosts (`phoenix scale`): it holds until the fleet file's
    /// `instances` (`file`) changes. Any host may ask; the controller places it.
    pub async fn set_size(
        &self,
        role: &str,
        instances: u32,
        file: u32,
    ) -> Result<(), ClusterError> {
        let key = self.key(&format!("sizes/{role}"));
        let value = serde_json::json!({ "instances": instances, "file": file });
        self.0.etcd.put(&key, value.to_string(), 0).await?;
        Ok(())
    }

    /// Sizes set by `phoenix scale`: role → (instances, the file's instances then).
    pub async fn sizes(&self) -> Result<BTreeMap<String, (u32, u32)>, ClusterError> {
        #[derive(Deserialize)]
        struct Size {
            instances: u32,
            file: u32,
        }
        let sizes: BTreeMap<String, Size> = self.read_under("sizes/").await?;
        Ok(sizes
            .into_iter()
            .map(|(role, size)| (role, (size.instances, size.file)))
            .collect())
    }

    /// Keeps where this host's roles differ from the controller's, warning once per change.
    pub(crate) fn note_divergence(&self, now: BTreeMap<String, String>) {
        let mut divergent = self.0.divergent.lock().unwrap();
        if *divergent != now {
            for (role, how) in &now {
                tracing::warn!(%role, "this host's fleet file differs from the controller's: {how}");
            }
            *divergent = now;
        }
    }

    /// Where this host's fleet file says otherwise than the controller's (as last seen).
    pub fn divergence_seen(&self) -> BTreeMap<String, String> {
        self.0.divergent.lock().unwrap().clone()
    }

    /// Resolves when this host's cluster membership is stopping.
    pub(crate) fn stopping(&self) -> watch::Receiver<bool> {
        self.0.stop.subscribe()
    }

    /// Leaves the cluster: resigns the lead at once (another host takes over without waiting
    /// for the lease) and stops renewing the host's lease.
    pub async fn leave(&self) {
        self.0.stop.send_replace(true);
        let tasks: Vec<_> = std::mem::take(&mut *self.0.tasks.lock().unwrap());
        for task in tasks {
            let _ = tokio::time::timeout(self.0.ttl, task).await;
        }
        let key = self.key(&format!("hosts/{}", self.0.record.name));
        let _ = self.0.etcd.delete(&key, false).await;
    }
}

#[cfg(test)]
impl Cluster {
    /// Stops every task without a word to etcd, as `kill -9` would.
    fn vanish(self) {
        for task in self.0.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// How many events the cluster journal in etcd keeps.
const JOURNAL_KEPT: u64 = 10_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests;
