//! Runs a role's autoscaler while Phoenix runs: every `interval`, observe the live
//! generation over the window, decide, and resize. A deploy holds the role's lock: meanwhile
//! the autoscaler only grows the live generation (never shrinks it), and the deploy sizes the
//! new generation to the role's size when it starts.

use std::sync::{Arc, Weak};

use serde_json::json;

use crate::autoscale::{AutoscaleConfig, Autoscaler, Decision, Observation};
use crate::controller::{Inner, Role};
use crate::deploy::Progress;
use crate::scale::{journal_scale, resize};

pub(crate) async fn run(inner: Weak<Inner>, role_name: String) {
    let mut scaler: Option<Autoscaler> = None;
    // The last (recommended, desired) journaled: an evaluation that repeats it is not journaled
    // again, so a steady role does not fill the journal every interval.
    let mut last: Option<(u32, u32)> = None;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let Ok(role) = strong.role(&role_name) else {
            return;
        };
        let config = role.config().autoscale;
        let every = config
            .as_ref()
            .map(|c| c.interval)
            .unwrap_or(std::time::Duration::from_secs(5));
        drop(strong);
        if !crate::lifecycle::pause(&inner, every).await {
            return;
        }
        let Some(config) = config else {
            scaler = None;
            continue;
        };
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.is_shutting_down() {
            return;
        }
        if scaler.as_ref().is_none_or(|s| s.config != config) {
            scaler = Some(Autoscaler::new(config.clone()));
        }
        if let Some(cluster) = strong.cluster.clone() {
            crate::cluster::autoscale::step(&strong, &cluster, &role, &config, &mut scaler).await;
            continue;
        }
        let scaler = scaler.as_mut().expect("set above");
        let Some(seen) = observe(&strong, &role, &config) else {
            continue;
        };
        let decision = scaler.decide(strong.clock.now_ms(), &seen);
        apply(&strong, &role, &config, &seen, decision, &mut last).await;
    }
}

/// The live generation over the window: ready instances' means, warming ones missing.
fn observe(inner: &Inner, role: &Role, config: &AutoscaleConfig) -> Option<Observation> {
    let live = role.live()?;
    let instances = live.instances();
    let metric = config.metric.sample_name();
    let mut seen = Observation {
        current: instances.len() as u32,
        ..Observation::default()
    };
    if config.metric.per_instance() {
        for instance in &instances {
            let warm = instance.started.elapsed() >= config.warmup && instance.is_healthy();
            match inner.recent.mean(&instance.name, metric, config.window) {
                Some(value) if warm => seen.values.push(value),
                _ => seen.missing += 1,
            }
        }
    } else if let Some(value) =
        inner
            .recent
            .mean(&format!("role:{}", role.name), metric, config.window)
    {
        seen.values.push(value);
    }
    Some(seen)
}

async fn apply(
    inner: &Arc<Inner>,
    role: &Arc<Role>,
    config: &AutoscaleConfig,
    seen: &Observation,
    decision: Decision,
    last: &mut Option<(u32, u32)>,
) {
    let detail = json!({
        "recommended": decision.recommended, "reason": decision.reason,
        "metric": config.metric, "values": seen.values, "missing": seen.missing,
    });
    if decision.desired == seen.current {
        let outcome = (decision.recommended, decision.desired);
        if *last != Some(outcome) {
            *last = Some(outcome);
            // `held`: a smaller size was recommended, the stabilization window keeps this one.
            let kind = if decision.recommended < seen.current {
                "autoscale.held"
            } else {
                "autoscale.steady"
            };
            let mut detail = detail.clone();
            detail["current"] = json!(seen.current);
            inner.journal(Some(&role.name), kind, detail).await;
        }
        return;
    }
    *last = None;
    let lock = role.try_deploy_guard();
    let during_deploy = lock.is_err();
    if during_deploy && decision.desired < seen.current {
        return;
    }
    let result = resize(
        inner,
        role,
        decision.desired,
        !during_deploy,
        &Progress::none(),
    )
    .await;
    drop(lock);
    match result {
        Ok(report) if report.to != report.from => {
            let mut detail = detail;
            detail["during_deploy"] = json!(during_deploy);
            if let Err(error) =
                journal_scale(inner, role, &report, "autoscale.scaled", detail).await
            {
                tracing::error!(role = %role.name, %error, "cannot record an autoscale");
            }
        }
        Ok(_) => {}
        Err(error) => {
            tracing::warn!(role = %role.name, %error, "autoscale failed");
            let detail = json!({"desired": decision.desired, "error": error.to_string()});
            inner
                .journal(Some(&role.name), "autoscale.failed", detail)
                .await;
        }
    }
}
