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
/// An instance member's admission signature: HMAC-SHA256, under the cluster key, of its name,
/// role, host and address. Other hosts route to it only when it verifies.
pub const TAG_SIG: &str = "sig";

type Tags = BTreeMap<String, String>;

/// The host agent and the members of this host's instances.
pub(crate) struct Membership {
    host: Agent,
    host_name: String,
    /// Where the host agent is reached: instance members join through it.
    host_addr: SocketAddr,
    /// What instance members are started from (bind IP, keyring, timings).
    template: AgentConfig,
    /// Signs this host's instance members and checks other hosts'.
    key: Option<AdmissionKey>,
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
            key: settings.cluster_key().map(AdmissionKey),
            instances: tokio::sync::Mutex::new(HashMap::new()),
            wake: Arc::new(Notify::new()),
        }))
    }

    pub fn host(&self) -> &Agent {
        &self.host
    }

    /// The host agent's name and gossip address.
    pub fn host_member(&self) -> (&str, SocketAddr) {
        (&self.host_name, self.host_addr)
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
fn desired_members(
    inner: &Inner,
    host: &str,
    key: Option<&AdmissionKey>,
) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut desired = BTreeMap::new();
    for role in inner.roles() {
        let live = role.live();
        let others = role.others();
        for generation in live.iter().chain(others.iter()) {
            let is_live = live.as_ref().is_some_and(|l| Arc::ptr_eq(l, generation));
            for instance in generation.instances() {
                let tags = BTreeMap::from([
                    (TAG_ROLE.to_string(), role.name.clone()),
                    (TAG_HOST.to_string(), host.to_string()),
                    (TAG_ADDR.to_string(), instance.advertised.to_string()),
                    (TAG_GENERATION.to_string(), generation.id.to_string()),
                    (TAG_IMAGE.to_string(), short(&generation.image)),
                    (
                        TAG_HEALTH.to_string(),
                        instance.status().as_str().to_string(),
                    ),
                    (TAG_LIVE.to_string(), is_live.to_string()),
                ]);
                let mut tags = tags;
                if let Some(key) = key {
                    let addr = instance.advertised.to_string();
                    let sig = key.sign(&instance.name, &role.name, host, &addr);
                    tags.insert(TAG_SIG.to_string(), sig);
                }
                desired.insert(instance.name.clone(), tags);
            }
        }
    }
    desired
}

pub(crate) fn short(digest: &str) -> String {
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
        let desired = desired_members(&strong, &membership.host_name, membership.key.as_ref());
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

/// Feeds every role's proxy the live, healthy instances other hosts announce — once their
/// signature verifies and this host's own health check of them passes. Admissions, refusals
/// and removals are journaled.
pub(crate) async fn follow_members(inner: Weak<Inner>, membership: Arc<Membership>) {
    let mut events = membership.host.subscribe();
    let checked = Arc::new(Notify::new());
    let mut remotes = Remotes::default();
    let Some(mut shutdown) = inner.upgrade().map(|i| i.shutdown.subscribe()) else {
        return;
    };
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.is_shutting_down() {
            return;
        }
        let Ok(members) = membership.host.members().await else {
            return;
        };
        let candidates = candidates(&members, &membership.host_name);
        remotes
            .update(&strong, candidates, membership.key.as_ref(), &checked)
            .await;
        for role in strong.roles() {
            role.set_remote(remotes.of_role(&role.name));
        }
        drop(strong);
        // Wait for the next membership change or health change of a remote instance (user
        // events and queries change nothing here); take every change already queued at once.
        tokio::select! {
            _ = checked.notified() => {}
            changed = next_change(&mut events) => if !changed { return },
            _ = phoenix_proxy::stopped(&mut shutdown) => return,
        }
        while events.try_recv().is_ok() {}
    }
}

/// False when the agent is gone.
async fn next_change(events: &mut tokio::sync::broadcast::Receiver<Event>) -> bool {
    loop {
        match events.recv().await {
            Ok(Event::User(_) | Event::Query(_)) => continue,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return true,
            Err(_) => return false,
        }
    }
}

/// An instance another host announces as healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Candidate {
    name: String,
    role: String,
    host: String,
    addr: SocketAddr,
    sig: Option<String>,
}

/// What may change on a candidate without its admission starting over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Serving {
    live: bool,
    image: String,
}

/// Other hosts' alive, healthy instance members (live or about to be: a role's proxy picks
/// the ones that serve, see `Role::backends`), and what they serve.
fn candidates(members: &[Member], own_host: &str) -> Vec<(Candidate, Serving)> {
    let mut found = Vec::new();
    for member in members {
        let serving = member.status == Status::Alive
            && tag(member, TAG_HOST).is_some_and(|h| h != own_host)
            && tag(member, TAG_HEALTH) == Some("healthy");
        let (Some(role), Some(host), Some(addr)) = (
            tag(member, TAG_ROLE),
            tag(member, TAG_HOST),
            tag(member, TAG_ADDR).and_then(|a| a.parse::<SocketAddr>().ok()),
        ) else {
            continue;
        };
        if serving {
            let candidate = Candidate {
                name: member.name.clone(),
                role: role.to_string(),
                host: host.to_string(),
                addr,
                sig: tag(member, TAG_SIG).map(str::to_string),
            };
            let serving = Serving {
                live: tag(member, TAG_LIVE) == Some("true"),
                image: tag(member, TAG_IMAGE).unwrap_or_default().to_string(),
            };
            found.push((candidate, serving));
        }
    }
    found
}

/// One admitted remote instance: its backend, and the health check this host runs on it.
struct Remote {
    candidate: Candidate,
    serving: Serving,
    backend: Arc<Backend>,
    healthy: Arc<std::sync::atomic::AtomicBool>,
    checker: tokio::task::JoinHandle<()>,
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.checker.abort();
    }
}

/// The remote instances admitted, and those refused (journaled once each).
#[derive(Default)]
struct Remotes {
    admitted: HashMap<String, Remote>,
    refused: std::collections::HashSet<String>,
}

impl Remotes {
    async fn update(
        &mut self,
        inner: &Inner,
        candidates: Vec<(Candidate, Serving)>,
        key: Option<&AdmissionKey>,
        checked: &Arc<Notify>,
    ) {
        let gone: Vec<String> = self
            .admitted
            .iter()
            .filter(|(name, remote)| {
                !candidates
                    .iter()
                    .any(|(c, _)| &c.name == *name && *c == remote.candidate)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(remote) = self.admitted.remove(&name) {
                let c = &remote.candidate;
                let detail = serde_json::json!({"member": c.name, "host": c.host, "addr": c.addr.to_string()});
                inner.journal(Some(&c.role), "member.removed", detail).await;
            }
        }
        self.refused
            .retain(|name| candidates.iter().any(|(c, _)| &c.name == name));
        for (candidate, serving) in candidates {
            if let Some(remote) = self.admitted.get_mut(&candidate.name) {
                remote.serving = serving;
                continue;
            }
            if self.refused.contains(&candidate.name) {
                continue;
            }
            let Ok(role) = inner.role(&candidate.role) else {
                continue;
            };
            let detail = serde_json::json!({"member": candidate.name, "host": candidate.host,
                "addr": candidate.addr.to_string()});
            if let Err(reason) = admit(key, &candidate) {
                let mut detail = detail;
                detail["reason"] = serde_json::json!(reason);
                tracing::warn!(member = %candidate.name, "refused as a backend: {reason}");
                inner
                    .journal(Some(&candidate.role), "member.refused", detail)
                    .await;
                self.refused.insert(candidate.name);
                continue;
            }
            inner
                .journal(Some(&candidate.role), "member.admitted", detail)
                .await;
            let backend = Backend::new(candidate.name.clone(), candidate.addr);
            let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let checker = tokio::spawn(check_remote(
                backend.clone(),
                role.config().health,
                healthy.clone(),
                checked.clone(),
            ));
            let name = candidate.name.clone();
            self.admitted.insert(
                name,
                Remote {
                    candidate,
                    serving,
                    backend,
                    healthy,
                    checker,
                },
            );
        }
    }

    /// `role`'s admitted remote instances that pass this host's health check, with their hosts.
    fn of_role(&self, role: &str) -> Vec<crate::controller::RemoteBackend> {
        let mut remote: Vec<_> = self
            .admitted
            .values()
            .filter(|r| r.candidate.role == role)
            .map(|r| crate::controller::RemoteBackend {
                backend: r.backend.clone(),
                host: r.candidate.host.clone(),
                healthy: r.healthy.load(std::sync::atomic::Ordering::Acquire),
                live: r.serving.live,
                image: r.serving.image.clone(),
            })
            .collect();
        remote.sort_by(|a, b| a.backend.id.cmp(&b.backend.id));
        remote
    }
}

/// Whether `candidate` may become a backend: its signature must verify under the cluster key.
fn admit(key: Option<&AdmissionKey>, candidate: &Candidate) -> Result<(), &'static str> {
    let Some(key) = key else {
        return Err(
            "this cluster has no key: set [agent] encrypt_file on every host to admit other hosts' instances",
        );
    };
    let Some(sig) = &candidate.sig else {
        return Err("its member carries no admission signature");
    };
    let addr = candidate.addr.to_string();
    if key.verify(
        &candidate.name,
        &candidate.role,
        &candidate.host,
        &addr,
        sig,
    ) {
        Ok(())
    } else {
        Err("its admission signature does not verify under the cluster key")
    }
}

/// This host's own health check of a remote instance, at the role's interval: the backend is
/// routed to only while it passes.
async fn check_remote(
    backend: Arc<Backend>,
    health: crate::HealthConfig,
    healthy: Arc<std::sync::atomic::AtomicBool>,
    checked: Arc<Notify>,
) {
    use std::sync::atomic::Ordering;
    loop {
        let passed = crate::health::check(backend.addr, &health).await.is_ok();
        if passed {
            backend.mark_up();
        }
        if healthy.swap(passed, Ordering::AcqRel) != passed {
            backend.note_change();
            checked.notify_one();
        }
        tokio::time::sleep(health.interval).await;
    }
}

/// The cluster key, as the HMAC key that signs instance members.
pub(crate) struct AdmissionKey(Vec<u8>);

impl AdmissionKey {
    fn mac(&self, name: &str, role: &str, host: &str, addr: &str) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.0)
            .expect("HMAC takes a key of any length");
        mac.update(b"phoenix instance admission v1");
        for field in [name, role, host, addr] {
            mac.update(&[0]);
            mac.update(field.as_bytes());
        }
        mac
    }

    fn sign(&self, name: &str, role: &str, host: &str, addr: &str) -> String {
        use hmac::Mac;
        let bytes = self.mac(name, role, host, addr).finalize().into_bytes();
        phoenix_image::hex(&bytes)
    }

    /// Whether `sig` is this key's signature of the fields (compared in constant time).
    fn verify(&self, name: &str, role: &str, host: &str, addr: &str, sig: &str) -> bool {
        use hmac::Mac;
        let Some(bytes) = decode_hex(sig) else {
            return false;
        };
        self.mac(name, role, host, addr)
            .verify_slice(&bytes)
            .is_ok()
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
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
    fn only_other_hosts_alive_healthy_instances_are_candidates_with_what_they_serve() {
        let members = vec![
            member("a", "other", Status::Alive, "healthy", true),
            member("bb", "me", Status::Alive, "healthy", true),
            member("ccc", "other", Status::Failed, "healthy", true),
            member("dddd", "other", Status::Alive, "starting", true),
            member("eeeee", "other", Status::Alive, "healthy", false),
        ];
        let found: Vec<(String, bool)> = candidates(&members, "me")
            .into_iter()
            .map(|(c, serving)| (c.name, serving.live))
            .collect();
        // A healthy instance of a generation not live yet is a candidate too: in a cluster
        // the proxy picks it by image at the switch; otherwise only live ones serve.
        assert_eq!(
            found,
            vec![("a".to_string(), true), ("eeeee".to_string(), false)]
        );
    }

    #[test]
    fn only_members_signed_with_the_cluster_key_are_admitted() {
        let key = AdmissionKey(b"0123456789abcdef0123456789abcdef".to_vec());
        let other = AdmissionKey(b"fedcba9876543210fedcba9876543210".to_vec());
        let mut candidate = Candidate {
            name: "web-1".into(),
            role: "web".into(),
            host: "host-b".into(),
            addr: "10.0.0.2:8080".parse().unwrap(),
            sig: Some(key.sign("web-1", "web", "host-b", "10.0.0.2:8080")),
        };
        assert_eq!(admit(Some(&key), &candidate), Ok(()));
        assert!(admit(None, &candidate).unwrap_err().contains("no key"));
        assert!(
            admit(Some(&other), &candidate)
                .unwrap_err()
                .contains("does not verify")
        );
        // A signature is for its fields only: another address, role or host does not verify.
        for change in [
            |c: &mut Candidate| c.addr = "10.0.0.9:8080".parse().unwrap(),
            |c: &mut Candidate| c.role = "api".into(),
            |c: &mut Candidate| c.host = "host-c".into(),
            |c: &mut Candidate| c.sig = Some("00".repeat(32)),
            |c: &mut Candidate| c.sig = Some("zz".into()),
        ] {
            let mut changed = candidate.clone();
            change(&mut changed);
            assert!(admit(Some(&key), &changed).is_err(), "{changed:?}");
        }
        candidate.sig = None;
        assert!(
            admit(Some(&key), &candidate)
                .unwrap_err()
                .contains("no admission signature")
        );
    }
}
