//! The two loops of a host in a cluster. On the leader, placement: every few hundred
//! milliseconds it reads the hosts, their reports and the placements, plans each role again
//! and writes what changed, fenced. On every host, following: it brings each role's live
//! generation to the number of instances placed on it, and reports how many are healthy.
//!
//! Both poll etcd rather than watch it: three small range reads per tick per host, which a
//! few dozen hosts do not feel; watches are the way to a thousand (see `bench/cluster`).

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::json;

use super::{Cluster, Placer, RoleDemand, RolePlacement, plan_role};
use crate::controller::Inner;

/// How often the loops look.
const TICK: Duration = Duration::from_millis(250);

/// What each role asks of placement, from the fleet file as applied.
pub(crate) fn demands(inner: &Inner) -> BTreeMap<String, RoleDemand> {
    inner
        .roles()
        .iter()
        .map(|role| {
            let config = role.config();
            let demand = RoleDemand {
                instances: config.instances,
                demand: super::Capacity::of(&config.run.resources),
                constraint: config.hosts.clone(),
            };
            (role.name.clone(), demand)
        })
        .collect()
}

/// Every role as this host runs it (the fleet file as applied).
fn specs(inner: &Inner) -> BTreeMap<String, super::RoleSpec> {
    inner
        .roles()
        .iter()
        .map(|role| (role.name.clone(), super::RoleSpec::of(&role.config())))
        .collect()
}

/// The fleet file's sizes, with those `phoenix scale` set while the file's stayed the same.
async fn with_sizes(
    cluster: &Cluster,
    mut wanted: BTreeMap<String, RoleDemand>,
) -> BTreeMap<String, RoleDemand> {
    let Ok(sizes) = cluster.sizes().await else {
        return wanted;
    };
    for (role, want) in wanted.iter_mut() {
        if let Some((instances, file)) = sizes.get(role)
            && *file == want.instances
        {
            want.instances = *instances;
        }
    }
    wanted
}

/// `phoenix scale` in a cluster: sets the size, then waits until the controller has placed it
/// and every host runs its share, healthy.
pub(crate) async fn scale(
    inner: &Arc<Inner>,
    cluster: &Cluster,
    role_name: &str,
    instances: u32,
    progress: &crate::Progress,
) -> Result<crate::ScaleReport, crate::FleetError> {
    let started = std::time::Instant::now();
    let role = inner.role(role_name)?;
    if instances == 0 {
        return Err(crate::FleetError::Scale(format!(
            "{role_name}: scale to at least 1 instance (the role would stop serving)"
        )));
    }
    let config = role.config();
    let from = cluster
        .placements()
        .await?
        .get(role_name)
        .map_or(0, |p| p.total);
    cluster
        .set_size(role_name, instances, config.instances)
        .await?;
    progress.say(format!(
        "asked the controller for {instances} instances of {role_name}"
    ));
    let limit = config.deploy.healthy_timeout + Duration::from_secs(60);
    loop {
        let placement = cluster.placements().await?.remove(role_name);
        let reports = cluster.reports().await?;
        let healthy: u32 = reports
            .values()
            .filter_map(|roles| roles.get(role_name))
            .map(|r| r.healthy)
            .sum();
        if let Some(placement) = placement
            && placement.total == instances
            && placement.leaving.is_empty()
            && healthy == instances
        {
            break;
        }
        if started.elapsed() > limit {
            return Err(crate::FleetError::Scale(format!(
                "{role_name}: {healthy} of {instances} instances healthy across hosts after {} s (see `phoenix host ls`)",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(crate::ScaleReport {
        role: role_name.to_string(),
        from,
        to: instances,
        started: Vec::new(),
        stopped: Vec::new(),
        abandoned_requests: 0,
        millis: started.elapsed().as_millis() as u64,
    })
}

/// While this host leads: plans every role and writes the placements that changed.
pub(crate) async fn lead(inner: Weak<Inner>, cluster: Cluster) {
    let mut stopping = cluster.stopping();
    let mut rounds = PlacementRounds::new(cluster.lease() * 2);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        if !cluster.is_leader() {
            continue;
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.is_shutting_down() {
            return;
        }
        let wanted = demands(&strong);
        let timeouts: BTreeMap<String, Duration> = strong
            .roles()
            .iter()
            .map(|r| (r.name.clone(), super::rollout::limit(&r.config())))
            .collect();
        let specs = specs(&strong);
        drop(strong);
        if let Err(e) = cluster.define_roles(&specs).await {
            tracing::debug!("cannot define the roles in etcd: {e}");
        }
        let wanted = with_sizes(&cluster, wanted).await;
        if let Err(e) = rounds.round(&cluster, &wanted).await {
            tracing::debug!("placement round failed: {e}");
        }
        if let Err(e) = rollout_round(&cluster, &timeouts).await {
            tracing::debug!("rollout round failed: {e}");
        }
    }
}

/// Hosts start at about the same time when a cluster starts: a role is placed for the first
/// time only once the set of hosts has not changed for a while, so that it spreads over all
/// of them instead of piling onto the first few to register.
struct Settling {
    period: Duration,
    seen: Vec<String>,
    since: tokio::time::Instant,
}

impl Settling {
    fn new(period: Duration) -> Self {
        Self {
            period,
            seen: Vec::new(),
            since: tokio::time::Instant::now(),
        }
    }

    /// Whether `hosts` have been the same for the period.
    fn settled(&mut self, hosts: &[super::HostView]) -> bool {
        let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
        if names != self.seen {
            self.seen = names;
            self.since = tokio::time::Instant::now();
        }
        self.since.elapsed() >= self.period
    }
}

/// The controller's placement, one round at a time (what its loop runs every 250 ms; public
/// for `bench/cluster`, which drives it against simulated hosts).
pub struct PlacementRounds {
    settling: Settling,
    /// The last failure journaled per role, so a lasting one is journaled once.
    failed: BTreeMap<String, String>,
}

impl PlacementRounds {
    /// First placements wait until the host set has been stable for `settle`.
    pub fn new(settle: Duration) -> Self {
        Self {
            settling: Settling::new(settle),
            failed: BTreeMap::new(),
        }
    }

    /// Plans every role once and writes what changed; how many roles changed.
    pub async fn round(
        &mut self,
        cluster: &Cluster,
        wanted: &BTreeMap<String, RoleDemand>,
    ) -> Result<usize, super::ClusterError> {
        place_once(cluster, wanted, &mut self.failed, &mut self.settling).await
    }
}

/// The controller's rollout round: requests become rollouts, booted ones switch or abort.
pub async fn rollout_round(
    cluster: &Cluster,
    timeouts: &BTreeMap<String, Duration>,
) -> Result<(), super::ClusterError> {
    let hosts = cluster.host_views().await?;
    let placements = cluster.placements().await?;
    super::rollout::lead(cluster, &hosts, &placements, timeouts).await
}

async fn place_once(
    cluster: &Cluster,
    wanted: &BTreeMap<String, RoleDemand>,
    failed: &mut BTreeMap<String, String>,
    settling: &mut Settling,
) -> Result<usize, super::ClusterError> {
    let mut changed = 0;
    let hosts = cluster.host_views().await?;
    let settled = settling.settled(&hosts);
    let reports = cluster.reports().await?;
    let current = cluster.placements().await?;
    let mut placer = Placer::new(hosts.clone());
    for (role, want) in wanted {
        let healthy: BTreeMap<String, u32> = reports
            .iter()
            .map(|(host, roles)| (host.clone(), roles.get(role).map_or(0, |r| r.healthy)))
            .collect();
        let before = current.get(role);
        if before.is_none() && !settled {
            continue;
        }
        match plan_role(role, want, before, &hosts, &mut placer, &healthy) {
            Ok(next) if Some(&next) != before => {
                let value = serde_json::to_vec(&next).unwrap_or_default();
                cluster
                    .put_fenced(&format!("placements/{role}"), value)
                    .await?;
                changed += 1;
                failed.remove(role);
                let detail = json!({"role": role, "from": before, "to": next});
                cluster.journal("placement.changed", detail).await?;
            }
            Ok(_) => {
                failed.remove(role);
            }
            Err(error) => {
                let text = error.to_string();
                if failed.get(role) != Some(&text) {
                    tracing::warn!(%role, "{text}");
                    cluster
                        .journal("placement.failed", json!({"role": role, "error": text}))
                        .await?;
                    failed.insert(role.clone(), text);
                }
            }
        }
    }
    Ok(changed)
}

/// On every host: each role's live generation follows the instances placed here, and the
/// healthy ones are reported.
pub(crate) async fn follow(inner: Weak<Inner>, cluster: Cluster) {
    let mut stopping = cluster.stopping();
    let mut reported: Option<BTreeMap<String, super::RoleReport>> = None;
    let mut following = super::rollout::Following::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.is_shutting_down() {
            return;
        }
        super::rollout::follow(&strong, &cluster, &mut following).await;
        admit_peers(&strong, &cluster).await;
        if let Ok(divergent) = cluster.divergence(&specs(&strong)).await {
            cluster.note_divergence(divergent);
        }
        match cluster.placements().await {
            Ok(placements) => apply(&strong, cluster.host_name(), &placements).await,
            Err(e) => tracing::debug!("cannot read placements: {e}"),
        }
        let healthy = healthy_counts(&strong);
        if reported.as_ref() != Some(&healthy) {
            match cluster.report(&healthy).await {
                Ok(()) => reported = Some(healthy),
                Err(e) => tracing::debug!("cannot report to etcd: {e}"),
            }
        }
    }
}

/// Lets the cluster's hosts (and only them) reach this host's bridge instances at their
/// published ports. Hosts that etcd no longer lists keep their access until it answers again.
async fn admit_peers(inner: &Arc<Inner>, cluster: &Cluster) {
    let Some(bridge) = inner.drivers.bridge().cloned() else {
        return;
    };
    let addresses = match cluster.host_addresses().await {
        Ok(addresses) => addresses,
        Err(e) => return tracing::debug!("cannot read the hosts: {e}"),
    };
    let peers = addresses.into_iter().filter_map(|ip| match ip {
        std::net::IpAddr::V4(v4) => Some(v4),
        std::net::IpAddr::V6(_) => None,
    });
    let peers: Vec<_> = peers.collect();
    match tokio::task::spawn_blocking(move || bridge.set_peers(peers)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "cannot admit the cluster's hosts"),
        Err(error) => tracing::warn!(%error, "cannot admit the cluster's hosts"),
    }
}

/// Resizes each role whose live generation has another number of instances than placed here;
/// a role busy with a deploy or a scale is left for the next tick.
async fn apply(inner: &Arc<Inner>, host: &str, placements: &BTreeMap<String, RolePlacement>) {
    for role in inner.roles() {
        let Some(placement) = placements.get(&role.name) else {
            continue;
        };
        let Some(live) = role.live() else { continue };
        let target = placement.on(host);
        if live.instances().len() as u32 == target {
            continue;
        }
        let Ok(_lock) = role.try_deploy_guard() else {
            continue;
        };
        let progress = crate::Progress::none();
        match crate::scale::resize(inner, &role, target, true, &progress).await {
            Ok(report) => {
                let detail = json!({"placed": target});
                let _ =
                    crate::scale::journal_scale(inner, &role, &report, "role.placed", detail).await;
            }
            Err(error) => tracing::warn!(role = %role.name, %error, "cannot follow the placement"),
        }
    }
}

/// Healthy instances of each role's live generation on this host.
fn healthy_counts(inner: &Inner) -> BTreeMap<String, super::RoleReport> {
    inner
        .roles()
        .iter()
        .map(|role| {
            let live = role.live();
            let healthy = live.as_ref().map_or(0, |g| {
                g.instances().iter().filter(|i| i.is_healthy()).count()
            });
            let report = super::RoleReport {
                healthy: healthy as u32,
                image: live.map(|g| g.image.clone()),
            };
            (role.name.clone(), report)
        })
        .collect()
}
