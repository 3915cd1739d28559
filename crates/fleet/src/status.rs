//! A snapshot of the fleet for `phoenix status`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::controller::{Controller, Generation};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetStatus {
    pub state_dir: String,
    pub roles: Vec<RoleStatus>,
    /// The hosts of a `[cluster]` and who leads (absent on one machine); `error` says why they
    /// could not be read (etcd unreachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterView>,
}

/// `phoenix status`'s view of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterView {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<crate::cluster::ClusterStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether this host believes it leads (known without etcd: a host cut off from etcd
    /// steps down when its lease can no longer be renewed).
    #[serde(default)]
    pub leading: bool,
    /// Roles this host's fleet file defines otherwise than the controller's: role → how.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub divergent: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoleStatus {
    pub name: String,
    pub listen: String,
    pub desired_instances: u32,
    pub live_generation: Option<i64>,
    pub image: Option<String>,
    /// The live image by name: `hello:v2` (its newest tag), or `hello` when untagged.
    #[serde(default)]
    pub image_name: Option<String>,
    pub deploying: bool,
    pub requests: u64,
    pub proxy_errors: u64,
    pub retries: u64,
    pub generations: Vec<GenerationView>,
    /// Other hosts' instances admitted as backends (by gossip, signed with the cluster key).
    #[serde(default)]
    pub remote: Vec<RemoteView>,
    /// Its network policy (`allow_from`, `allow_cidrs`) and what it refused, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyView {
    pub allow_from: Vec<String>,
    pub allow_cidrs: Vec<String>,
    /// Refused attempts by source, every source included.
    pub denied: Vec<DeniedView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeniedView {
    /// `role` (an instance of role `from`), `unlisted` (an instance of no role), `outside`
    /// (an address not in `allow_cidrs`) or `host` (a local user, straight to an instance).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    pub packets: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteView {
    pub name: String,
    pub host: String,
    pub address: String,
    /// Whether this host's own health check of it passes (it gets traffic only then).
    pub healthy: bool,
    pub in_flight: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerationView {
    pub id: i64,
    pub status: String,
    pub image: String,
    pub instances: Vec<InstanceView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceView {
    pub name: String,
    pub status: String,
    pub address: String,
    /// Where other hosts reach it, when not at `address` (a published port, in a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<String>,
    pub pid: u32,
    pub in_flight: usize,
    pub uptime_ms: u64,
    pub last_error: Option<String>,
    /// Kept out of scale-in (`phoenix protect`).
    pub protected: bool,
    /// Out of traffic and of scale-in (`phoenix standby`).
    pub standby: bool,
}

impl Controller {
    pub async fn status(&self) -> FleetStatus {
        let denied = self.denied().await;
        let tags = self.inner.db(|s| s.tags()).await.unwrap_or_default();
        let roles = self
            .inner
            .roles()
            .into_iter()
            .map(|role| {
                let live = role.live();
                let others = role.others();
                let stats = &role.proxy.stats;
                RoleStatus {
                    name: role.name.clone(),
                    listen: role.listen().to_string(),
                    desired_instances: role.desired(),
                    live_generation: live.as_ref().map(|g| g.id),
                    image: live.as_ref().map(|g| g.image.clone()),
                    image_name: live.as_ref().map(|g| {
                        let recipe = role.config().image;
                        tags.iter()
                            .find(|(name, _, digest)| *name == recipe && *digest == g.image)
                            .map(|(name, tag, _)| format!("{name}:{tag}"))
                            .unwrap_or(recipe)
                    }),
                    deploying: role.is_deploying(),
                    requests: stats.requests.load(Ordering::Relaxed),
                    proxy_errors: stats.proxy_errors.load(Ordering::Relaxed),
                    retries: stats.retries.load(Ordering::Relaxed),
                    generations: live.iter().chain(others.iter()).map(|g| view(g)).collect(),
                    remote: role
                        .remote()
                        .into_iter()
                        .map(|r| RemoteView {
                            name: r.backend.id.clone(),
                            host: r.host,
                            address: r.backend.addr.to_string(),
                            healthy: r.healthy,
                            in_flight: r.backend.in_flight(),
                        })
                        .collect(),
                    policy: role.config().guard.map(|guard| PolicyView {
                        allow_from: guard.allow_from.clone(),
                        allow_cidrs: guard.allow_cidrs.iter().map(|c| c.to_string()).collect(),
                        denied: denied
                            .iter()
                            .filter(|d| d.to == role.name)
                            .map(|d| DeniedView {
                                kind: d.from.kind().to_string(),
                                from: match &d.from {
                                    phoenix_driver::Source::Role(name) => Some(name.clone()),
                                    _ => None,
                                },
                                packets: d.packets,
                            })
                            .collect(),
                    }),
                }
            })
            .collect();
        FleetStatus {
            state_dir: self.inner.state_dir.display().to_string(),
            roles,
            cluster: self.cluster_view().await,
        }
    }

    /// Hosts from etcd, with the state of each one's gossip member and its instances as this
    /// host's agent sees them.
    async fn cluster_view(&self) -> Option<ClusterView> {
        use crate::membership::{TAG_HOST, TAG_KIND};
        let cluster = self.inner.cluster.as_ref()?;
        let members = self.agent().members().await.unwrap_or_default();
        let is_host =
            |m: &phoenix_gossip::Member| m.tags.get(TAG_KIND).map(String::as_str) == Some("host");
        let gossip: BTreeMap<String, String> = members
            .iter()
            .filter(|m| is_host(m))
            .map(|m| (m.name.clone(), m.status.as_str().to_string()))
            .collect();
        let mut instances: BTreeMap<String, u32> = BTreeMap::new();
        for member in members
            .iter()
            .filter(|m| !is_host(m) && m.status == phoenix_gossip::Status::Alive)
        {
            if let Some(host) = member.tags.get(TAG_HOST) {
                *instances.entry(host.clone()).or_default() += 1;
            }
        }
        Some(match cluster.status(&gossip, &instances).await {
            Ok(status) => ClusterView {
                status: Some(status),
                error: None,
                leading: cluster.is_leader(),
                divergent: cluster.divergence_seen(),
            },
            Err(e) => ClusterView {
                status: None,
                error: Some(e.to_string()),
                leading: cluster.is_leader(),
                divergent: cluster.divergence_seen(),
            },
        })
    }
}

impl Controller {
    /// Refused attempts between roles so far (empty without a network policy, or when the
    /// counters cannot be read: that is logged).
    pub async fn denied(&self) -> Vec<phoenix_driver::Denied> {
        let Some(bridge) = self.inner.drivers.bridge().cloned() else {
            return Vec::new();
        };
        if !bridge.has_policy() {
            return Vec::new();
        }
        match tokio::task::spawn_blocking(move || bridge.denied()).await {
            Ok(Ok(denied)) => denied,
            Ok(Err(error)) => {
                tracing::warn!(%error, "reading the network policy's counters");
                Vec::new()
            }
            Err(error) => {
                tracing::warn!(%error, "reading the network policy's counters");
                Vec::new()
            }
        }
    }
}

fn view(generation: &Generation) -> GenerationView {
    GenerationView {
        id: generation.id,
        status: generation.status().to_string(),
        image: generation.image.clone(),
        instances: generation
            .instances()
            .iter()
            .map(|i| InstanceView {
                name: i.name.clone(),
                status: i.status().to_string(),
                address: i.backend.addr.to_string(),
                published: (i.advertised != i.backend.addr).then(|| i.advertised.to_string()),
                pid: i.pid,
                in_flight: i.backend.in_flight(),
                uptime_ms: i.started.elapsed().as_millis() as u64,
                last_error: i.last_error(),
                protected: i.flags().protected,
                standby: i.flags().standby,
            })
            .collect(),
    }
}
