//! The fleet on gossip (Serf plus Synapse): `phoenix up` runs a host agent, every instance it
//! runs is a gossip member of its own whose tags say its role, generation, image, address,
//! health and whether its generation is live here, and every role's proxy also sends traffic
//! to the live, healthy instances other hosts announce. When a host dies, its instances' members
//! fail with it and leave every other proxy within the failure-detection time.
//!
//! A host's own instances stay in its proxy through the controller's direct path (health
//! checks and atomic switches), never through gossip: membership only adds other hosts'.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use phoenix_gossip::{Agent, AgentConfig, Event, Member, Status};
use phoenix_proxy::Backend;
use tokio::sync::Notify;

use crate::FleetError;
use crate::config::AgentSettings;
use crate::controller::Inner;

/// Tag names of instance members.
pub const TAG_ROLE: &str = "role";
pub const TAG_HOST: &str = "host";
pub const TAG_ADDR: &str = "addr";
pub const TAG_GENERATION: &str = "generation";
pub const TAG_IMAGE: &str = "image";
pub const TAG_HEALTH: &str = "health";
pub const TAG_LIVE: &str = "live";
/// Marks the host's own member (instances carry `role` instead).
pub const TAG_KIND: &str = "phoenix";

type Tags = BTreeMap<String, String>;

/// The host agent and the members of this host's instances.
pub(crate) struct Membership {
    host: Agent,
    host_name: String,
    /// Where the host agent is reached: instance members join through it.
    host_addr: SocketAddr,
    /// What instance members are started from (bind IP, keyring, timings).
    template: AgentConfig,
    instances: tokio::sync::Mutex<HashMap<String, (Agent, Tags)>>,
    /// Woken when instances or their health change, so tags follow at once.
    pub wake: Arc<Notify>,
}

impl Membership {
    /// Starts the host agent; joins `settings.join` in the background.
    pub async fn start(
        settings: &AgentSettings,
        state_dir: &Path,
    ) -> Result<Arc<Membership>, FleetError> {
        let mut config = settings
            .agent_config(state_dir)
            .map_err(|e| FleetError::Agent(e.to_string()))?;
        config.tags.insert(TAG_KIND.into(), "host".into());
        let host_name = config.node.clone();
        let host = Agent::start(config.clone())
            .await
            .map_err(|e| FleetError::Agent(e.to_string()))?;
        let host_addr = host
            .members()
            .await
            .map_err(|e| FleetError::Agent(e.to_string()))?
            .into_iter()
            .find(|m| m.name == host_name)
            .map_or(host.local_addr(), |m| m.addr);
        if !settings.join.is_empty() {
            let (host, join) = (host.clone(), settings.join.clone());
            tokio::spawn(async move {
                match host.join_any(&join, Duration::from_secs(60)).await {
                    Ok(through) => tracing::info!(%through, "joined the cluster"),
                    Err(error) => tracing::error!(%error, "could not join the cluster"),
                }
            });
        }
        let mut template = config;
        template.bind = SocketAddr::new(settings.bind.ip(), 0);
        template.advertise = settings.advertise.map(|addr| SocketAddr::new(addr.ip(), 0));
        template.snapshot = None;
        template.tags = BTreeMap::new();
        Ok(Arc::new(Membership {
            host,
            host_name,
            host_addr,
            template,
            instances: tokio::sync::Mutex::new(HashMap::new()),
            wake: Arc::new(Notify::new()),
        }))
    }

    pub fn host(&self) -> &Agent {
        &self.host
    }

    /// Makes the instance members match `desired` (name → tags): new instances join, changed
    /// ones update their tags, gone ones leave gracefully.
    async fn reconcile(&self, desired: BTreeMap<String, BTreeMap<String, String>>) {
        let mut instances = self.instances.lock().await;
        let gone: Vec<String> = instances
            .keys()
            .filter(|name| !desired.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            if let Some((agent, _)) = instances.remove(&name) {
                let _ = agent.leave().await;
            }
        }
        for (name, tags) in desired {
            match instances.get_mut(&name) {
                Some((agent, current)) if *current != tags => {
                    if agent.set_tags(tags.clone()).await.is_ok() {
                        *current = tags;
                    }
                }
                Some(_) => {}
                None => match self.start_member(&name, tags.clone()).await {
                    Ok(agent) => {
                        instances.insert(name, (agent, tags));
                    }
                    Err(error) => tracing::warn!(instance = %name, %error, "no gossip member"),
                },
            }
        }
    }

    async fn start_member(
        &self,
        name: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<Agent, phoenix_gossip::GossipError> {
        let mut config = self.template.clone();
        config.node = name.to_string();
        config.tags = tags;
        // Each member picks whom to probe with its own randomness.
        config.seed = fastrand::u64(..);
        let agent = Agent::start(config).await?;
        agent.join(self.host_addr, Duration::from_secs(2)).await?;
        Ok(agent)
    }

    /// Every instance member leaves (a clean stop: others see `left`, not `failed`).
    pub async fn leave_all(&self) {
        let mut instances = self.instances.lock().await;
        for (_, (agent, _)) in instances.drain() {
            let _ = agent.leave().await;
        }
    }
}

/// The tags of every instance this host runs, by instance name.
fn desired_members(inner: &Inner, host: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut desired = BTreeMap::new();
    for role in inner.roles.values() {
        let live = role.live();
        let others = role.others();
        for generation in live.iter().chain(others.iter()) {
            let is_live = live.as_ref().is_some_and(|l| Arc::ptr_eq(l, generation));
            for instance in generation.instances() {
                let tags = BTreeMap::from([
                    (TAG_ROLE.to_string(), role.name.clone()),
                    (TAG_HOST.to_string(), host.to_string()),
                    (TAG_ADDR.to_string(), instance.backend.addr.to_string()),
                    (TAG_GENERATION.to_string(), generation.id.to_string()),
                    (TAG_IMAGE.to_string(), short(&generation.image)),
                    (
                        TAG_HEALTH.to_string(),
                        instance.status().as_str().to_string(),
                    ),
                    (TAG_LIVE.to_string(), is_live.to_string()),
                ]);
                desired.insert(instance.name.clone(), tags);
            }
        }
    }
    desired
}

fn short(digest: &str) -> String {
    digest
        .trim_start_matches("sha256:")
        .chars()
        .take(12)
        .collect()
}

/// Keeps this host's instance members in step with the controller, until the controller is
/// gone or shuts down (then they leave).
pub(crate) async fn keep_members(inner: Weak<Inner>, membership: Arc<Membership>) {
    let mut shutdown = match inner.upgrade() {
        Some(inner) => inner.shutdown.subscribe(),
        None => return,
    };
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.is_shutting_down() {
            break;
        }
        let desired = desired_members(&strong, &membership.host_name);
        drop(strong);
        membership.reconcile(desired).await;
        tokio::select! {
            _ = membership.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = phoenix_proxy::stopped(&mut shutdown) => break,
        }
    }
    membership.leave_all().await;
}

/// Feeds every role's proxy the live, healthy instances other hosts announce.
pub(crate) async fn follow_members(inner: Weak<Inner>, membership: Arc<Membership>) {
    let mut events = membership.host.subscribe();
    let mut backends: HashMap<String, Arc<Backend>> = HashMap::new();
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let Ok(members) = membership.host.members().await else {
            return;
        };
        for role in strong.roles.values() {
            let remote =
                remote_backends(&members, &role.name, &membership.host_name, &mut backends);
            role.set_remote(remote);
        }
        drop(strong);
        // Wait for the next membership change (user events and queries change nothing
        // here); take every change already queued at once.
        loop {
            match events.recv().await {
                Ok(Event::User(_) | Event::Query(_)) => continue,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                Err(_) => return,
            }
        }
        while events.try_recv().is_ok() {}
    }
}

/// Backends for `role` from other hosts' alive, healthy, live instance members; the same
/// backend object is kept for a member as long as its address does not change.
fn remote_backends(
    members: &[Member],
    role: &str,
    host: &str,
    cache: &mut HashMap<String, Arc<Backend>>,
) -> Vec<Arc<Backend>> {
    let mut wanted = Vec::new();
    for member in members {
        let serving = member.status == Status::Alive
            && tag(member, TAG_ROLE) == Some(role)
            && tag(member, TAG_HOST) != Some(host)
            && tag(member, TAG_LIVE) == Some("true")
            && tag(member, TAG_HEALTH) == Some("healthy");
        let Some(addr) = tag(member, TAG_ADDR).and_then(|a| a.parse::<SocketAddr>().ok()) else {
            continue;
        };
        if !serving {
            continue;
        }
        let backend = cache
            .entry(member.name.clone())
            .and_modify(|b| {
                if b.addr != addr {
                    *b = Backend::new(member.name.clone(), addr);
                }
            })
            .or_insert_with(|| Backend::new(member.name.clone(), addr));
        wanted.push(backend.clone());
    }
    cache.retain(|name, _| members.iter().any(|m| &m.name == name));
    wanted
}

fn tag<'a>(member: &'a Member, key: &str) -> Option<&'a str> {
    member.tags.get(key).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, host: &str, status: Status, health: &str, live: bool) -> Member {
        Member {
            name: name.into(),
            addr: "127.0.0.1:7946".parse().unwrap(),
            tags: BTreeMap::from([
                (TAG_ROLE.to_string(), "web".to_string()),
                (TAG_HOST.to_string(), host.to_string()),
                (
                    TAG_ADDR.to_string(),
                    format!("127.0.0.1:{}", 20000 + name.len()),
                ),
                (TAG_HEALTH.to_string(), health.to_string()),
                (TAG_LIVE.to_string(), live.to_string()),
            ]),
            status,
        }
    }

    #[test]
    fn only_other_hosts_alive_healthy_live_instances_are_backends() {
        let members = vec![
            member("a", "other", Status::Alive, "healthy", true),
            member("bb", "me", Status::Alive, "healthy", true),
            member("ccc", "other", Status::Failed, "healthy", true),
            member("dddd", "other", Status::Alive, "starting", true),
            member("eeeee", "other", Status::Alive, "healthy", false),
        ];
        let mut cache = HashMap::new();
        let backends = remote_backends(&members, "web", "me", &mut cache);
        let names: Vec<&str> = backends.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(names, vec!["a"]);
        assert!(remote_backends(&members, "db", "me", &mut cache).is_empty());
        // The same member keeps the same backend (and its pooled connections).
        let again = remote_backends(&members, "web", "me", &mut cache);
        assert!(Arc::ptr_eq(&backends[0], &again[0]));
        remote_backends(&[], "web", "me", &mut cache);
        assert!(cache.is_empty(), "forgotten members are dropped");
    }
}
