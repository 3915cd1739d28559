//! Deploys across hosts. `phoenix deploy` on any host bakes (and verifies) the image there and
//! asks for a rollout; the controller turns the request into `rollouts/ROLE` (fenced) in phase
//! `boot`. Every host then boots its share of the new generation (as many instances as are
//! placed on it) and says whether it is healthy; when every host with instances is, the
//! controller writes phase `switch` and every host switches at its next look (every 250 ms),
//! then drains and stops its old generation. One host failing, or a timeout, gives phase
//! `abort`: every host stops its new generation and the old one keeps serving. The phase is
//! one key, so a rollout is never half-switched; a controller that takes over mid-rollout
//! reads it and goes on. A host that was away catches up with the last switched image.
//!
//! Every host bakes the role's recipe itself: recipes are reproducible, so the same fleet file
//! gives the same digest everywhere. A host whose file gives another digest refuses to boot,
//! and says so, and the rollout is aborted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phoenix_store::etcd::Op;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Cluster, ClusterError, HostView, RolePlacement, now_ms};
use crate::FleetError;
use crate::controller::Inner;
use crate::deploy::{DeployOptions, DeployReport, Gate, Progress};

/// `rollouts/ROLE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Counts the role's rollouts.
    pub id: u64,
    pub image: String,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub started_at_ms: i64,
    /// The host `phoenix deploy` was run on.
    pub by: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Boot,
    Switch,
    Abort,
}

/// `intents/deploy/ROLE`: a request for a rollout, from any host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Intent {
    image: String,
    by: String,
}

/// `ready/ROLE/HOST`: whether a host's part of a rollout booted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Ready {
    id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Cluster {
    /// Every role's last rollout.
    pub async fn rollouts(&self) -> Result<BTreeMap<String, Rollout>, ClusterError> {
        self.read_under("rollouts/").await
    }

    /// Asks the controller to roll `image` out (what `phoenix deploy` does after baking).
    pub async fn request_rollout(&self, role: &str, image: &str) -> Result<(), ClusterError> {
        let intent = Intent {
            image: image.to_string(),
            by: self.host_name().to_string(),
        };
        let key = self.key(&format!("intents/deploy/{role}"));
        let value = serde_json::to_vec(&intent).unwrap_or_default();
        self.0.etcd.put(&key, value, 0).await?;
        Ok(())
    }

    async fn say_booted(
        &self,
        role: &str,
        id: u64,
        error: Option<String>,
    ) -> Result<(), ClusterError> {
        let key = self.key(&format!("ready/{role}/{}", self.host_name()));
        let value = serde_json::to_vec(&Ready { id, error }).unwrap_or_default();
        let lease = self.0.host_lease.load(std::sync::atomic::Ordering::Relaxed);
        self.0.etcd.put(&key, value, lease).await?;
        Ok(())
    }
}

/// How long a rollout of a role may take: every host may have to bake the image first (ten
/// minutes), then boot it (the role's `healthy_timeout`).
pub(crate) fn limit(config: &crate::RoleConfig) -> Duration {
    config.deploy.healthy_timeout + Duration::from_secs(600)
}

/// The controller's part, each round: requests become rollouts; a booting rollout switches
/// when every host with instances of the role is ready, or aborts.
pub(crate) async fn lead(
    cluster: &Cluster,
    hosts: &[HostView],
    placements: &BTreeMap<String, RolePlacement>,
    timeouts: &BTreeMap<String, Duration>,
) -> Result<(), ClusterError> {
    let intents: BTreeMap<String, Intent> = cluster.read_under("intents/deploy/").await?;
    let rollouts = cluster.rollouts().await?;
    for (role, intent) in intents {
        let last = rollouts.get(&role);
        if last.is_some_and(|r| r.phase == Phase::Boot) {
            continue; // one rollout of a role at a time: the request waits
        }
        let rollout = Rollout {
            id: last.map_or(1, |r| r.id + 1),
            image: intent.image,
            phase: Phase::Boot,
            reason: None,
            started_at_ms: now_ms(),
            by: intent.by,
        };
        let ops = [
            Op::put(
                cluster.key(&format!("rollouts/{role}")),
                serde_json::to_vec(&rollout).unwrap_or_default(),
            ),
            Op::delete(cluster.key(&format!("intents/deploy/{role}"))),
            Op::delete_prefix(cluster.key(&format!("ready/{role}/"))),
        ];
        cluster.write_fenced(&ops).await?;
        let detail =
            json!({"role": role, "rollout": rollout.id, "image": rollout.image, "by": rollout.by});
        cluster.journal("rollout.started", detail).await?;
    }
    for (role, rollout) in cluster.rollouts().await? {
        if rollout.phase != Phase::Boot {
            continue;
        }
        let ready: BTreeMap<String, Ready> = cluster.read_under(&format!("ready/{role}/")).await?;
        // Not placed yet (the hosts are still settling): nothing to wait for yet.
        let Some(placement) = placements.get(&role) else {
            continue;
        };
        let timeout = timeouts
            .get(&role)
            .copied()
            .unwrap_or(Duration::from_secs(600));
        if let Some((phase, reason)) = decide(&rollout, hosts, placement, &ready, timeout, now_ms())
        {
            let next = Rollout {
                phase,
                reason: reason.clone(),
                ..rollout.clone()
            };
            let value = serde_json::to_vec(&next).unwrap_or_default();
            cluster
                .write_fenced(&[Op::put(cluster.key(&format!("rollouts/{role}")), value)])
                .await?;
            let kind = match phase {
                Phase::Switch => "rollout.switched",
                _ => "rollout.aborted",
            };
            let detail = json!({"role": role, "rollout": rollout.id, "image": rollout.image, "reason": reason});
            cluster.journal(kind, detail).await?;
        }
    }
    Ok(())
}

/// What a booting rollout does next, if anything: switch when every live host with
/// instances placed said it is ready, abort when one failed or time is up.
fn decide(
    rollout: &Rollout,
    hosts: &[HostView],
    placement: &RolePlacement,
    ready: &BTreeMap<String, Ready>,
    timeout: Duration,
    now_ms: i64,
) -> Option<(Phase, Option<String>)> {
    let ours = |host: &str| ready.get(host).filter(|r| r.id == rollout.id);
    if let Some((host, error)) = ready
        .iter()
        .filter(|(_, r)| r.id == rollout.id)
        .find_map(|(host, r)| r.error.as_ref().map(|e| (host, e)))
    {
        return Some((Phase::Abort, Some(format!("{host}: {error}"))));
    }
    let waiting: Vec<&str> = hosts
        .iter()
        .filter(|h| h.alive && placement.on(&h.name) > 0)
        .filter(|h| ours(&h.name).is_none())
        .map(|h| h.name.as_str())
        .collect();
    if waiting.is_empty() {
        return Some((Phase::Switch, None));
    }
    let age = now_ms.saturating_sub(rollout.started_at_ms).max(0) as u64;
    if age > timeout.as_millis() as u64 {
        let why = format!(
            "{} did not boot a healthy generation within {} s",
            waiting.join(", "),
            timeout.as_secs()
        );
        return Some((Phase::Abort, Some(why)));
    }
    None
}

/// A host's part: what it did of each role's rollouts.
#[derive(Default)]
pub(crate) struct Following {
    /// The last rollout of each role this host booted (or caught up with).
    handled: BTreeMap<String, u64>,
    /// Booted generations waiting for the word.
    waiting: BTreeMap<String, (u64, tokio::sync::oneshot::Sender<Result<(), String>>)>,
}

/// Boots new rollouts, passes the word on to the ones waiting, and catches up with switched
/// images this host missed.
pub(crate) async fn follow(inner: &Arc<Inner>, cluster: &Cluster, following: &mut Following) {
    let Ok(rollouts) = cluster.rollouts().await else {
        return;
    };
    for (role_name, rollout) in rollouts {
        let Ok(role) = inner.role(&role_name) else {
            continue;
        };
        let handled = following.handled.get(&role_name).copied().unwrap_or(0);
        match rollout.phase {
            Phase::Boot if rollout.id > handled => {
                following.handled.insert(role_name.clone(), rollout.id);
                let (go, gate) = gate(cluster.clone(), role_name.clone(), rollout.id);
                following
                    .waiting
                    .insert(role_name.clone(), (rollout.id, go));
                let (inner, image) = (inner.clone(), rollout.image.clone());
                inner.clone().spawn(async move {
                    run_local(&inner, &role_name, &image, Some(gate)).await;
                });
            }
            Phase::Switch | Phase::Abort => {
                if let Some((id, go)) = following.waiting.remove(&role_name) {
                    let word = match (rollout.id == id, rollout.phase) {
                        (true, Phase::Switch) => Ok(()),
                        (true, _) => {
                            Err(rollout.reason.clone().unwrap_or_else(|| "aborted".into()))
                        }
                        (false, _) => Err("a newer rollout replaced this one".into()),
                    };
                    let _ = go.send(word);
                    continue;
                }
                let serving = role.live().map(|g| g.image.clone());
                let behind = rollout.phase == Phase::Switch
                    && serving.is_some_and(|image| image != rollout.image)
                    && rollout.id > handled
                    && !role.is_deploying();
                if behind {
                    following.handled.insert(role_name.clone(), rollout.id);
                    let (inner, image) = (inner.clone(), rollout.image.clone());
                    inner.clone().spawn(async move {
                        run_local(&inner, &role_name, &image, None).await;
                    });
                }
            }
            Phase::Boot => {}
        }
    }
}

/// A gate whose booted side reports to etcd; returns the sender of the word.
fn gate(
    cluster: Cluster,
    role: String,
    id: u64,
) -> (tokio::sync::oneshot::Sender<Result<(), String>>, Gate) {
    let (booted_tx, booted_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let error = match booted_rx.await {
            Ok(Ok(())) => None,
            Ok(Err(reason)) => Some(reason),
            Err(_) => Some("the deploy ended before booting".into()),
        };
        if let Err(e) = cluster.say_booted(&role, id, error).await {
            tracing::warn!(%role, "cannot tell the controller how the rollout booted: {e}");
        }
    });
    (
        go_tx,
        Gate {
            booted: booted_tx,
            go: go_rx,
        },
    )
}

/// This host's deploy of `image` for a rollout, with the role's settings from this host's
/// fleet file (the same file on every host); the image is baked from it when it is not here
/// yet, and must come out the same. A deploy that fails keeps the settings the role had.
async fn run_local(inner: &Arc<Inner>, role: &str, image: &str, gate: Option<Gate>) {
    let before = match prepare(inner, role, image).await {
        Ok(before) => before,
        Err(reason) => {
            tracing::error!(%role, "{reason}");
            if let Some(gate) = gate {
                let _ = gate.booted.send(Err(reason));
            }
            return;
        }
    };
    let options = DeployOptions {
        image: Some(image.to_string()),
        rollback: None,
    };
    let result = crate::deploy::deploy_gated(inner, role, options, &Progress::none(), gate).await;
    if let Err(error) = result {
        tracing::warn!(%role, %error, "this host's part of the rollout did not finish");
        if let (Ok(running), (config, applied)) = (inner.role(role), before) {
            running.set_config(config);
            inner.note_deployed(&applied, role);
        }
    }
}

/// Takes the role's settings from the fleet file and makes sure the image is here; the
/// settings and applied file from before.
async fn prepare(
    inner: &Arc<Inner>,
    role_name: &str,
    image: &str,
) -> Result<(crate::RoleConfig, crate::FleetFile), String> {
    let role = inner.role(role_name).map_err(|e| e.to_string())?;
    let fleet = inner.reload_fleet().map_err(|e| e.to_string())?;
    let config = fleet
        .roles
        .get(role_name)
        .cloned()
        .ok_or_else(|| format!("role {role_name} is not in this host's fleet file"))?;
    have_image(inner, &fleet, &config.image, image).await?;
    let before = (role.config(), inner.applied());
    role.set_config(config);
    inner.note_deployed(&fleet, role_name);
    Ok(before)
}

async fn have_image(
    inner: &Arc<Inner>,
    fleet: &crate::FleetFile,
    recipe: &str,
    image: &str,
) -> Result<(), String> {
    let wanted = image.to_string();
    if inner
        .db(move |s| s.find_image(&wanted))
        .await
        .ok()
        .flatten()
        .is_some()
    {
        return Ok(());
    }
    let outcome = crate::bake::bake_in_background(inner, fleet.clone(), recipe.to_string())
        .await
        .map_err(|e| e.to_string())?;
    if outcome.digest != image {
        return Err(format!(
            "this host's fleet file bakes image {recipe} into {}, not {}: are the fleet files the same on every host?",
            phoenix_image::short_digest(&outcome.digest),
            phoenix_image::short_digest(image)
        ));
    }
    Ok(())
}

/// `phoenix deploy` in a cluster: bake and verify here, ask for a rollout, and wait for it.
pub(crate) async fn deploy(
    inner: &Arc<Inner>,
    cluster: &Cluster,
    role_name: &str,
    options: DeployOptions,
    progress: &Progress,
) -> Result<DeployReport, FleetError> {
    let started = Instant::now();
    let role = inner.role(role_name)?;
    let live = role.live();
    let previous_image = live.as_ref().map(|g| g.image.clone());
    let (image, baked, verified) =
        crate::deploy::choose_image(inner, &role, live.as_ref(), &options, progress).await?;
    let bake_ms = started.elapsed().as_millis() as u64;
    let before = cluster.rollouts().await?.get(role_name).map_or(0, |r| r.id);
    cluster.request_rollout(role_name, &image).await?;
    let requested = Instant::now();
    progress.say(format!(
        "asked the controller to roll {} out to every host",
        phoenix_image::short_digest(&image)
    ));
    let limit = limit(&role.config());
    let rollout = loop {
        if started.elapsed() > limit {
            return Err(FleetError::Cluster(ClusterError::Unsupported(format!(
                "the rollout of {role_name} did not end within {} s (is a host leading? see `phoenix host ls`)",
                limit.as_secs()
            ))));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(rollout) = cluster.rollouts().await?.remove(role_name) else {
            continue;
        };
        if rollout.id > before && rollout.image == image && rollout.phase != Phase::Boot {
            break rollout;
        }
    };
    if rollout.phase == Phase::Abort {
        return Err(FleetError::DeployAborted {
            role: role_name.into(),
            reason: rollout.reason.unwrap_or_default(),
            serving: role.live().map(|g| g.id),
        });
    }
    // Switched: every host with instances of the role serves the new image at its next look.
    let booted_ms = requested.elapsed().as_millis() as u64;
    let switched = Instant::now();
    let placements = cluster.placements().await?;
    let placement = placements.get(role_name).cloned().unwrap_or_default();
    loop {
        let reports = cluster.reports().await?;
        let alive: Vec<HostView> = cluster.host_views().await?;
        let behind: Vec<&str> = alive
            .iter()
            .filter(|h| placement.on(&h.name) > 0)
            .filter(|h| {
                reports
                    .get(&h.name)
                    .and_then(|r| r.get(role_name))
                    .and_then(|r| r.image.as_deref())
                    != Some(image.as_str())
            })
            .map(|h| h.name.as_str())
            .collect();
        if behind.is_empty() {
            break;
        }
        if started.elapsed() > limit {
            return Err(FleetError::Cluster(ClusterError::Unsupported(format!(
                "the rollout of {role_name} switched, but {} did not report the new image",
                behind.join(", ")
            ))));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress.say(format!(
        "switched every host to {}",
        phoenix_image::short_digest(&image)
    ));
    Ok(DeployReport {
        role: role_name.into(),
        generation: rollout.id as i64,
        image,
        previous_image,
        baked,
        instances: placements.get(role_name).map_or(0, |p| p.total),
        // In a cluster: the rollout from the request to the controller's switch (every host
        // booted and healthy), then until every host with instances serves the new image.
        bake_ms,
        boot_to_healthy_ms: booted_ms,
        switch_us: switched.elapsed().as_micros() as u64,
        drain_ms: 0,
        stop_ms: 0,
        verified,
        abandoned_requests: 0,
        first_request_after_switch_us: None,
        total_ms: started.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, alive: bool) -> HostView {
        HostView {
            name: name.into(),
            tags: BTreeMap::new(),
            capacity: super::super::Capacity::default(),
            draining: false,
            alive,
        }
    }

    fn rollout(age_ms: i64) -> Rollout {
        Rollout {
            id: 7,
            image: "sha256:new".into(),
            phase: Phase::Boot,
            reason: None,
            started_at_ms: 1_000_000 - age_ms,
            by: "h1".into(),
        }
    }

    fn ready(entries: &[(&str, u64, Option<&str>)]) -> BTreeMap<String, Ready> {
        entries
            .iter()
            .map(|(h, id, e)| {
                (
                    h.to_string(),
                    Ready {
                        id: *id,
                        error: e.map(str::to_string),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_rollout_switches_when_every_host_with_instances_is_ready_and_not_before() {
        let hosts = [
            host("h1", true),
            host("h2", true),
            host("h3", true),
            host("h4", false),
        ];
        let placement = RolePlacement {
            total: 3,
            hosts: [("h1".into(), 2), ("h2".into(), 1), ("h4".into(), 1)].into(),
            leaving: vec![],
        };
        let minute = Duration::from_secs(60);
        // h2's answer is for an older rollout; h3 has no instances; h4 is dead.
        let early = ready(&[("h1", 7, None), ("h2", 6, None)]);
        assert_eq!(
            decide(
                &rollout(1000),
                &hosts,
                &placement,
                &early,
                minute,
                1_000_000
            ),
            None
        );
        let all = ready(&[("h1", 7, None), ("h2", 7, None)]);
        assert_eq!(
            decide(&rollout(1000), &hosts, &placement, &all, minute, 1_000_000),
            Some((Phase::Switch, None))
        );
    }

    #[test]
    fn one_failed_host_or_a_timeout_aborts_naming_who() {
        let hosts = [host("h1", true), host("h2", true)];
        let placement = RolePlacement {
            total: 2,
            hosts: [("h1".into(), 1), ("h2".into(), 1)].into(),
            leaving: vec![],
        };
        let minute = Duration::from_secs(60);
        let failed = ready(&[
            ("h1", 7, None),
            ("h2", 7, Some("web-1 never became healthy")),
        ]);
        assert_eq!(
            decide(
                &rollout(1000),
                &hosts,
                &placement,
                &failed,
                minute,
                1_000_000
            ),
            Some((Phase::Abort, Some("h2: web-1 never became healthy".into())))
        );
        let slow = ready(&[("h1", 7, None)]);
        assert_eq!(
            decide(
                &rollout(61_000),
                &hosts,
                &placement,
                &slow,
                minute,
                1_000_000
            ),
            Some((
                Phase::Abort,
                Some("h2 did not boot a healthy generation within 60 s".into())
            ))
        );
    }
}
