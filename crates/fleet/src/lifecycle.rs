//! Phoenix servers and Chaos Monkey: `max_age` replaces instances older than it, one at a
//! time, the new one serving before the old one is drained; `[role.NAME.chaos]` (opt-in)
//! kills a random instance at a mean interval, never below `min_healthy` healthy instances and
//! never during a deploy, and the crash replacement brings a new one.

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::controller::{Inner, Role};
use crate::deploy::Progress;

/// `[role.NAME.chaos]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosConfig {
    /// The mean time between kills (exponentially distributed).
    #[serde(deserialize_with = "crate::config::period")]
    pub every: Duration,
    /// A kill never leaves fewer healthy instances than this.
    #[serde(default = "one")]
    pub min_healthy: u32,
}

fn one() -> u32 {
    1
}

/// How often ages are checked.
const AGE_CHECK: Duration = Duration::from_secs(1);

/// Replaces instances of `role` older than its `max_age` while Phoenix runs.
pub(crate) async fn renew(inner: Weak<Inner>, role_name: String) {
    loop {
        if !pause(&inner, AGE_CHECK).await {
            return;
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let Ok(role) = strong.role(&role_name) else {
            return;
        };
        let Some(max_age) = role.config().max_age else {
            continue;
        };
        let Some(live) = role.live() else { continue };
        let oldest = live
            .instances()
            .into_iter()
            .filter(|i| {
                let flags = i.flags();
                !flags.protected && !flags.standby && i.started.elapsed() > max_age
            })
            .min_by_key(|i| i.started);
        let Some(oldest) = oldest else { continue };
        // Never during a deploy: the deploy replaces every instance anyway.
        let Ok(_lock) = role.try_deploy_guard() else {
            continue;
        };
        renew_one(&strong, &role, &live, oldest).await;
    }
}

/// New before old: start one instance, wait until it is healthy, then drain and stop `old`.
async fn renew_one(
    inner: &Arc<Inner>,
    role: &Role,
    live: &Arc<crate::controller::Generation>,
    old: Arc<crate::instance::Instance>,
) {
    let age = old.started.elapsed();
    let started = crate::scale::grow(inner, role, live, 1, &Progress::none()).await;
    match started {
        Ok(new) => {
            crate::scale::shrink(role, live, std::slice::from_ref(&old), &Progress::none()).await;
            let detail =
                json!({"instance": old.name, "replacement": new.first(), "age_s": age.as_secs()});
            inner
                .journal(Some(&role.name), "instance.renewed", detail)
                .await;
        }
        Err(error) => {
            let detail = json!({"instance": old.name, "error": error.to_string()});
            inner
                .journal(Some(&role.name), "instance.renew_failed", detail)
                .await;
        }
    }
}

/// Kills random instances of `role` while its chaos is configured.
pub(crate) async fn chaos(inner: Weak<Inner>, role_name: String) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let Ok(role) = strong.role(&role_name) else {
            return;
        };
        let config = role.config().chaos;
        // Exponential intervals: kills come as a Poisson process with the mean asked for.
        let wait = match &config {
            Some(chaos) => chaos.every.mul_f64(-(1.0 - strong.namer.fraction()).ln()),
            None => Duration::from_secs(1),
        };
        drop(strong);
        if !pause(&inner, wait).await {
            return;
        }
        let (Some(config), Some(strong)) = (config, inner.upgrade()) else {
            continue;
        };
        strike(&strong, &role, &config).await;
    }
}

async fn strike(inner: &Arc<Inner>, role: &Role, config: &ChaosConfig) {
    // Never during a deploy.
    let Ok(lock) = role.try_deploy_guard() else {
        return;
    };
    let Some(live) = role.live() else { return };
    let healthy: Vec<_> = live
        .instances()
        .into_iter()
        .filter(|i| i.is_healthy() && !i.flags().protected && !i.flags().standby)
        .collect();
    let all_healthy = live.instances().iter().filter(|i| i.is_healthy()).count() as u32;
    if healthy.is_empty() || all_healthy <= config.min_healthy {
        return;
    }
    let pick = (inner.namer.fraction() * healthy.len() as f64) as usize;
    let victim = &healthy[pick.min(healthy.len() - 1)];
    drop(lock);
    role.note_killed_on_purpose(&victim.name);
    victim.kill();
    let detail = json!({"instance": victim.name, "pid": victim.pid, "healthy_before": all_healthy});
    inner
        .journal(Some(&role.name), "chaos.killed", detail)
        .await;
}

/// Sleeps `time` unless Phoenix shuts down first; false when it does.
pub(crate) async fn pause(inner: &Weak<Inner>, time: Duration) -> bool {
    let Some(mut shutdown) = inner.upgrade().map(|i| i.shutdown.subscribe()) else {
        return false;
    };
    tokio::select! {
        _ = tokio::time::sleep(time) => true,
        _ = phoenix_proxy::stopped(&mut shutdown) => false,
    }
}
