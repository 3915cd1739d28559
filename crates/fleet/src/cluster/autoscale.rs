//! The autoscaler across hosts. Every host writes its share of a role's metric each interval
//! (`PREFIX/observed/ROLE/HOST`, under its lease); the leading host alone decides the role's
//! size from every host's share and sets it as `phoenix scale` does, and the placement spreads
//! it. The leader's autoscaler starts afresh when leadership moves (so it holds scale-in for
//! one stabilization window, as a fresh one does on one machine).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Cluster;
use crate::autoscale::{AutoscaleConfig, Autoscaler, Observation, ScaleMetric};
use crate::controller::{Inner, Role};

/// One host's share of a role's metric over the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Share {
    /// Per-instance metrics (cpu, memory): each ready local instance's mean.
    #[serde(default)]
    pub values: Vec<f64>,
    /// Local instances not counted: warming up, or without samples.
    #[serde(default)]
    pub missing: u32,
    /// Local instances counted (ready).
    #[serde(default)]
    pub ready: u32,
    /// The role's metric as this host's proxy saw it (requests per second, p99 in ms).
    #[serde(default)]
    pub proxy: Option<f64>,
    pub at_ms: i64,
}

/// This host's share: its live instances, and its proxy's view of the role.
pub(crate) fn share(inner: &Inner, role: &Role, config: &AutoscaleConfig, now_ms: i64) -> Share {
    let mut share = Share {
        at_ms: now_ms,
        ..Share::default()
    };
    let metric = config.metric.sample_name();
    let instances = role.live().map(|g| g.instances()).unwrap_or_default();
    for instance in &instances {
        let warm = instance.started.elapsed() >= config.warmup && instance.is_healthy();
        match inner.recent.mean(&instance.name, metric, config.window) {
            Some(value) if warm => {
                share.values.push(value);
                share.ready += 1;
            }
            _ => share.missing += 1,
        }
    }
    share.proxy = inner
        .recent
        .mean(&format!("role:{}", role.name), metric, config.window);
    share
}

/// The role as a whole, from every host's share: `current` is its size across hosts.
/// Requests per instance are the proxies' total rate over the ready instances (an instance
/// gets requests from every host's proxy, so no one host sees all of its rate); p99 is the
/// worst proxy's; cpu and memory are each instance's own.
pub(crate) fn merge(metric: ScaleMetric, current: u32, shares: &[Share]) -> Observation {
    let missing = shares.iter().map(|s| s.missing).sum();
    let values = match metric {
        ScaleMetric::Cpu | ScaleMetric::Memory => {
            shares.iter().flat_map(|s| s.values.clone()).collect()
        }
        ScaleMetric::RpsPerInstance => {
            let ready: u32 = shares.iter().map(|s| s.ready).sum();
            let total: f64 = shares.iter().filter_map(|s| s.proxy).sum();
            let measured = shares.iter().any(|s| s.proxy.is_some());
            if ready == 0 || !measured {
                Vec::new()
            } else {
                vec![total / f64::from(ready); ready as usize]
            }
        }
        ScaleMetric::P99Ms => shares
            .iter()
            .filter_map(|s| s.proxy)
            .reduce(f64::max)
            .into_iter()
            .collect(),
    };
    Observation {
        current,
        values,
        missing,
    }
}

/// One interval of a role's autoscaling in a cluster: report this host's share and, when
/// leading, decide and set the size.
pub(crate) async fn step(
    inner: &Arc<Inner>,
    cluster: &Cluster,
    role: &Arc<Role>,
    config: &AutoscaleConfig,
    scaler: &mut Option<Autoscaler>,
) {
    let now_ms = inner.clock.now_ms();
    let mine = share(inner, role, config, now_ms);
    let key = format!("observed/{}/{}", role.name, cluster.host_name());
    if let Err(e) = cluster
        .put_own(&key, serde_json::to_vec(&mine).unwrap_or_default())
        .await
    {
        return tracing::debug!("cannot report the autoscaler's share: {e}");
    }
    if !cluster.is_leader() {
        *scaler = None;
        return;
    }
    let (shares, current) = match observed(cluster, &role.name, config, now_ms).await {
        Ok(found) => found,
        Err(e) => return tracing::debug!("cannot read the autoscaler's shares: {e}"),
    };
    let Some(current) = current else { return };
    let seen = merge(config.metric, current, &shares);
    let scaler = scaler.get_or_insert_with(|| Autoscaler::new(config.clone()));
    let decision = scaler.decide(now_ms, &seen);
    if decision.desired == current {
        return;
    }
    if let Err(e) = cluster
        .set_size(&role.name, decision.desired, role.config().instances)
        .await
    {
        return tracing::warn!(role = %role.name, "cannot set the autoscaled size: {e}");
    }
    let detail = json!({
        "role": role.name, "from": current, "to": decision.desired,
        "recommended": decision.recommended, "reason": decision.reason,
        "metric": config.metric, "values": seen.values, "missing": seen.missing,
        "hosts": shares.len(),
    });
    let _ = cluster.journal("autoscale.scaled", detail.clone()).await;
    inner
        .journal(Some(&role.name), "autoscale.scaled", detail)
        .await;
}

/// Every host's fresh share of `role` (a host silent for three intervals is left out), and
/// the role's size across hosts (`None` before its first placement).
async fn observed(
    cluster: &Cluster,
    role: &str,
    config: &AutoscaleConfig,
    now_ms: i64,
) -> Result<(Vec<Share>, Option<u32>), super::ClusterError> {
    let shares: BTreeMap<String, Share> = cluster.read_under(&format!("observed/{role}/")).await?;
    let stale = now_ms - 3 * config.interval.as_millis() as i64;
    let shares = shares.into_values().filter(|s| s.at_ms >= stale).collect();
    let current = cluster.placements().await?.get(role).map(|p| p.total);
    Ok((shares, current))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(values: &[f64], missing: u32, proxy: Option<f64>) -> Share {
        Share {
            values: values.to_vec(),
            missing,
            ready: values.len() as u32,
            proxy,
            at_ms: 0,
        }
    }

    #[test]
    fn requests_per_instance_are_every_proxys_rate_over_the_ready_instances() {
        // Two hosts, three ready instances; the proxies saw 90 and 30 requests/s.
        let shares = [
            share(&[10.0, 10.0], 0, Some(90.0)),
            share(&[5.0], 1, Some(30.0)),
        ];
        let seen = merge(ScaleMetric::RpsPerInstance, 4, &shares);
        assert_eq!(seen.current, 4);
        assert_eq!(seen.values, vec![40.0, 40.0, 40.0]);
        assert_eq!(seen.missing, 1);
        let idle = [share(&[], 2, None)];
        assert!(
            merge(ScaleMetric::RpsPerInstance, 2, &idle)
                .values
                .is_empty()
        );
    }

    #[test]
    fn cpu_is_each_instances_and_p99_the_worst_proxys() {
        let shares = [
            share(&[0.5, 0.7], 0, Some(12.0)),
            share(&[0.9], 0, Some(30.0)),
        ];
        assert_eq!(
            merge(ScaleMetric::Cpu, 3, &shares).values,
            vec![0.5, 0.7, 0.9]
        );
        assert_eq!(merge(ScaleMetric::P99Ms, 3, &shares).values, vec![30.0]);
    }
}
