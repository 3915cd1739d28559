//! Scaling a role's live generation (`phoenix scale`), and the flags that keep an instance out
//! of scale-in (`protect`) or out of traffic as well (`standby`), for investigation.
//!
//! Scaling takes the role's deploy lock, so it never runs during a deploy. Scale-out starts
//! instances and waits until they are healthy (the proxy adds them then). Scale-in takes the
//! oldest unprotected instances out of the proxy first, lets their in-flight requests finish
//! (up to the role's drain time), then stops them (SIGTERM, grace, SIGKILL).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::controller::{Generation, Inner, Role};
use crate::deploy::{Progress, start_instances, stop_all};
use crate::instance::{Flags, Instance};
use crate::{Controller, FleetError};

/// What a scale did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleReport {
    pub role: String,
    pub from: u32,
    pub to: u32,
    pub started: Vec<String>,
    pub stopped: Vec<String>,
    /// Requests still in flight on removed instances at the drain deadline.
    pub abandoned_requests: usize,
    #[serde(rename = "duration_ms", alias = "millis")]
    pub millis: u64,
}

/// A change to an instance's flags.
#[derive(Debug, Clone, Copy)]
pub enum FlagChange {
    Protect(bool),
    Standby(bool),
}

impl Controller {
    /// Brings role `role`'s live generation to `instances`, and keeps that size for later
    /// deploys and restarts (until the fleet file's `instances` changes).
    pub async fn scale(
        &self,
        role: &str,
        instances: u32,
        progress: &Progress,
    ) -> Result<ScaleReport, FleetError> {
        match self.inner.cluster.clone() {
            Some(cluster) => {
                crate::cluster::reconcile::scale(&self.inner, &cluster, role, instances, progress)
                    .await
            }
            None => scale(&self.inner, role, instances, progress).await,
        }
    }

    /// Sets or clears `protect` or `standby` on instance `name`; returns its flags.
    pub async fn set_flag(&self, name: &str, change: FlagChange) -> Result<Flags, FleetError> {
        let (role, instance) = self.inner.find_instance(name)?;
        let mut flags = instance.flags();
        match change {
            FlagChange::Protect(on) => flags.protected = on,
            FlagChange::Standby(on) => flags.standby = on,
        }
        instance.set_flags(flags);
        // Standby leaves (or rejoins) the proxy's pool at once.
        role.refresh_backends();
        let kind = match change {
            FlagChange::Protect(_) => "instance.protect",
            FlagChange::Standby(_) => "instance.standby",
        };
        let detail =
            json!({"instance": name, "protected": flags.protected, "standby": flags.standby});
        self.inner.journal(Some(&role.name), kind, detail).await;
        Ok(flags)
    }
}

impl Inner {
    /// The role and instance named `name`, in any generation.
    pub(crate) fn find_instance(
        &self,
        name: &str,
    ) -> Result<(Arc<Role>, Arc<Instance>), FleetError> {
        for role in self.roles() {
            let generations = role.live().into_iter().chain(role.others());
            for generation in generations {
                if let Some(instance) = generation.instances().into_iter().find(|i| i.name == name)
                {
                    return Ok((role.clone(), instance));
                }
            }
        }
        Err(FleetError::UnknownInstance(name.to_string()))
    }
}

async fn scale(
    inner: &Arc<Inner>,
    role_name: &str,
    target: u32,
    progress: &Progress,
) -> Result<ScaleReport, FleetError> {
    let role = inner.role(role_name)?;
    if target == 0 {
        return Err(FleetError::Scale(format!(
            "{role_name}: scale to at least 1 instance (the role would stop serving)"
        )));
    }
    let _lock = role.try_deploy_guard()?;
    let report = resize(inner, &role, target, true, progress).await?;
    journal_scale(inner, &role, &report, "role.scaled", json!({})).await?;
    Ok(report)
}

/// Brings the live generation to `target`; scale-in only when `may_shrink`. The caller holds
/// the deploy lock, or (the autoscaler during a deploy) only grows the live generation.
pub(crate) async fn resize(
    inner: &Arc<Inner>,
    role: &Role,
    target: u32,
    may_shrink: bool,
    progress: &Progress,
) -> Result<ScaleReport, FleetError> {
    let started = Instant::now();
    let live = role.live().ok_or_else(|| {
        FleetError::Scale(format!(
            "{}: it has no live generation yet (deploy it first)",
            role.name
        ))
    })?;
    let from = live.instances().len() as u32;
    let mut report = ScaleReport {
        role: role.name.clone(),
        from,
        to: from,
        started: Vec::new(),
        stopped: Vec::new(),
        abandoned_requests: 0,
        millis: 0,
    };
    if target > from {
        report.started = grow(inner, role, &live, target - from, progress).await?;
        report.to = target;
    } else if target < from && may_shrink {
        let victims = choose_victims(&live.instances(), (from - target) as usize)
            .map_err(|why| FleetError::Scale(format!("{}: {why}", role.name)))?;
        report.abandoned_requests = shrink(role, &live, &victims, progress).await;
        report.stopped = victims.iter().map(|i| i.name.clone()).collect();
        report.to = target;
    }
    report.millis = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Keeps the new size for restarts and deploys, and journals `kind` with `extra` details.
pub(crate) async fn journal_scale(
    inner: &Arc<Inner>,
    role: &Role,
    report: &ScaleReport,
    kind: &'static str,
    extra: serde_json::Value,
) -> Result<(), FleetError> {
    let target = report.to;
    role.set_size(target);
    let (now, file, key) = (
        inner.clock.now_ms(),
        role.config().instances,
        role.name.clone(),
    );
    inner
        .db(move |s| s.set_role_size(&key, target, file, now))
        .await?;
    let mut detail = json!({
        "from": report.from, "to": report.to, "started": report.started,
        "stopped": report.stopped, "abandoned_requests": report.abandoned_requests,
        "duration_ms": report.millis,
    });
    if let (Some(detail), Some(extra)) = (detail.as_object_mut(), extra.as_object()) {
        detail.extend(extra.clone());
    }
    inner.journal(Some(&role.name), kind, detail).await;
    Ok(())
}

/// Starts `count` instances in `live` and waits until they are healthy. On failure the new
/// instances are stopped again and the role keeps its size.
pub(crate) async fn grow(
    inner: &Arc<Inner>,
    role: &Role,
    live: &Arc<Generation>,
    count: u32,
    progress: &Progress,
) -> Result<Vec<String>, FleetError> {
    let started = start_instances(inner, role, live, count, progress).await;
    let new = started.instances;
    if let Some(error) = started.error {
        remove_and_stop(role, live, &new).await;
        return Err(error);
    }
    let deadline = Instant::now() + role.config().deploy.healthy_timeout;
    // Pushed first, checked after: if a deploy switched away from `live` meanwhile (the
    // autoscaler grows during deploys), its drain may have missed these, so they stop here.
    let still_live = || role.live().is_some_and(|g| Arc::ptr_eq(&g, live));
    while !(new.iter().all(|i| i.is_healthy()) && still_live()) {
        let failed = new.iter().find(|i| i.ended().is_some());
        let switched = !still_live();
        if failed.is_some() || switched || Instant::now() >= deadline || inner.is_shutting_down() {
            let why = match failed {
                Some(instance) => format!("{} exited during startup", instance.name),
                None if switched => "a deploy switched generations meanwhile".to_string(),
                None => "new instances not healthy in time".to_string(),
            };
            remove_and_stop(role, live, &new).await;
            return Err(FleetError::Scale(format!("{}: {why}", role.name)));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    role.refresh_backends();
    Ok(new.iter().map(|i| i.name.clone()).collect())
}

async fn remove_and_stop(role: &Role, live: &Generation, instances: &[Arc<Instance>]) {
    live.remove(|i| instances.iter().any(|n| std::ptr::eq(&**n, i)));
    role.refresh_backends();
    stop_all(instances).await;
}

/// Takes `victims` out of the proxy, drains them and stops them; returns the requests cut at
/// the drain deadline.
pub(crate) async fn shrink(
    role: &Role,
    live: &Generation,
    victims: &[Arc<Instance>],
    progress: &Progress,
) -> usize {
    live.remove(|i| victims.iter().any(|v| std::ptr::eq(&**v, i)));
    role.refresh_backends();
    let backends: Vec<_> = victims.iter().map(|i| i.backend.clone()).collect();
    let drained = phoenix_proxy::drain(&backends, role.config().deploy.drain).await;
    progress.say(format!(
        "drained {} in {} ms",
        victims
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        drained.waited.as_millis()
    ));
    stop_all(victims).await;
    drained.abandoned
}

/// The `count` instances to remove: never a protected or standby one; the oldest first (a
/// live generation runs one image, so "oldest image first" is already settled).
fn choose_victims(instances: &[Arc<Instance>], count: usize) -> Result<Vec<Arc<Instance>>, String> {
    let mut candidates: Vec<&Arc<Instance>> = instances
        .iter()
        .filter(|i| {
            let flags = i.flags();
            !flags.protected && !flags.standby
        })
        .collect();
    if candidates.len() < count {
        return Err(format!(
            "only {} of {} instances may be removed: the others are protected or on standby",
            candidates.len(),
            instances.len()
        ));
    }
    candidates.sort_by_key(|i| i.started);
    Ok(candidates.into_iter().take(count).cloned().collect())
}
