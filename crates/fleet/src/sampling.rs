//! Every second: each instance's CPU and memory (from the driver) and traffic (from its proxy
//! backend), and each role's traffic as its proxy sees it, into `STATE/metrics.db`; every
//! 10 s the roll-ups and retention.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use phoenix_observe::{MetricsDb, Sample};
use phoenix_proxy::{Histogram, TrafficMetrics};

use crate::controller::Inner;

/// How often instances are sampled.
pub(crate) const EVERY: Duration = Duration::from_secs(1);

/// How long samples stay in memory for the autoscaler.
const RECENT: Duration = Duration::from_secs(60);

/// One sample in memory: when, which metric, its value.
type Timed = (Instant, &'static str, f64);

/// The last minute of samples, by instance name (and `role:NAME` for a role's own).
#[derive(Debug, Default)]
pub(crate) struct Recent(std::sync::Mutex<HashMap<String, Vec<Timed>>>);

impl Recent {
    fn push(&self, key: &str, at: Instant, values: &[(&'static str, f64)]) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let series = all.entry(key.to_string()).or_default();
        series.retain(|(t, _, _)| at.duration_since(*t) < RECENT);
        series.extend(values.iter().map(|(metric, value)| (at, *metric, *value)));
    }

    fn keep_only(&self, keys: &[String]) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|key, _| keys.contains(key));
    }

    /// The mean of `metric` for `key` over the last `window`, if sampled.
    pub(crate) fn mean(&self, key: &str, metric: &str, window: Duration) -> Option<f64> {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let values: Vec<f64> = all
            .get(key)?
            .iter()
            .filter(|(t, m, _)| *m == metric && t.elapsed() <= window)
            .map(|(_, _, v)| *v)
            .collect();
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    }
}

/// What a counter said last time, to turn totals into rates.
struct Last {
    at: Instant,
    cpu_seconds: Option<f64>,
    responses: u64,
    errors: u64,
    latency: Vec<u64>,
}

/// The sampler's memory between ticks, per instance name (and per role, keyed `role:NAME`).
#[derive(Default)]
pub(crate) struct Sampler {
    last: HashMap<String, Last>,
}

impl Sampler {
    /// One second's samples of every role and instance.
    pub(crate) fn collect(&mut self, inner: &Inner) -> Vec<Sample> {
        let mut samples = Vec::new();
        let mut seen = Vec::new();
        for role in inner.roles() {
            let generations: Vec<_> = role.live().into_iter().chain(role.others()).collect();
            let mut in_flight = 0;
            for generation in &generations {
                for instance in generation.instances() {
                    let usage = instance.driver.usage(&instance.name, instance.pid);
                    in_flight += instance.backend.in_flight();
                    let metrics = self.rates(
                        &instance.name,
                        &instance.backend.metrics,
                        usage.map(|u| u.cpu_seconds),
                    );
                    let mut values = metrics;
                    if let Some(usage) = usage {
                        values.push(("memory", usage.rss_bytes as f64));
                        instance.set_usage(
                            values.iter().find(|(m, _)| *m == "cpu").map(|c| c.1),
                            usage.rss_bytes,
                        );
                    }
                    values.push(("in_flight", instance.backend.in_flight() as f64));
                    inner.recent.push(&instance.name, Instant::now(), &values);
                    samples.extend(values.into_iter().map(|(metric, value)| Sample {
                        role: role.name.clone(),
                        instance: instance.name.clone(),
                        image: generation.image.clone(),
                        metric: metric.into(),
                        value,
                    }));
                    seen.push(instance.name.clone());
                }
            }
            let key = format!("role:{}", role.name);
            let mut values = self.rates(&key, &role.proxy.metrics, None);
            values.push(("in_flight", in_flight as f64));
            inner.recent.push(&key, Instant::now(), &values);
            let image = role.live().map(|g| g.image.clone()).unwrap_or_default();
            samples.extend(values.into_iter().map(|(metric, value)| Sample {
                role: role.name.clone(),
                instance: String::new(),
                image: image.clone(),
                metric: metric.into(),
                value,
            }));
            seen.push(key);
        }
        // Forget instances that are gone.
        self.last.retain(|name, _| seen.contains(name));
        inner.recent.keep_only(&seen);
        samples
    }

    /// Rates since the last tick: cpu (cores), rps, errors (5xx/s), p50_ms and p99_ms (when
    /// there were responses). The first tick of a key only sets the baseline.
    fn rates(
        &mut self,
        key: &str,
        traffic: &TrafficMetrics,
        cpu_seconds: Option<f64>,
    ) -> Vec<(&'static str, f64)> {
        let now = Last {
            at: Instant::now(),
            cpu_seconds,
            responses: traffic.total_responses(),
            errors: traffic.responses(5),
            latency: traffic.latency().snapshot().to_vec(),
        };
        let Some(before) = self.last.insert(key.to_string(), now) else {
            return Vec::new();
        };
        let now = &self.last[key];
        let seconds = now.at.duration_since(before.at).as_secs_f64().max(1e-3);
        let mut values = vec![
            (
                "rps",
                now.responses.saturating_sub(before.responses) as f64 / seconds,
            ),
            (
                "errors",
                now.errors.saturating_sub(before.errors) as f64 / seconds,
            ),
        ];
        if let (Some(now_cpu), Some(before_cpu)) = (now.cpu_seconds, before.cpu_seconds) {
            values.push(("cpu", ((now_cpu - before_cpu) / seconds).max(0.0)));
        }
        let interval: Vec<u64> = now
            .latency
            .iter()
            .zip(&before.latency)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        for (metric, q) in [("p50_ms", 0.50), ("p99_ms", 0.99)] {
            if let Some(seconds) = Histogram::quantile_of(&interval, q) {
                values.push((metric, seconds * 1000.0));
            }
        }
        values
    }
}

/// Samples while Phoenix runs.
pub(crate) async fn run(inner: Weak<Inner>, db: Arc<MetricsDb>) {
    let mut sampler = Sampler::default();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        let mut shutdown = match inner.upgrade() {
            Some(inner) => inner.shutdown.subscribe(),
            None => return,
        };
        tokio::select! {
            _ = tick.tick() => {}
            _ = phoenix_proxy::stopped(&mut shutdown) => return,
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let samples = sampler.collect(&strong);
        let now = strong.clock.now_ms();
        drop(strong);
        ticks += 1;
        let db = db.clone();
        let maintain = ticks.is_multiple_of(10);
        let written = tokio::task::spawn_blocking(move || {
            db.record(now, &samples)?;
            if maintain {
                db.maintain(now)?;
            }
            Ok::<_, phoenix_observe::ObserveError>(())
        })
        .await;
        if let Ok(Err(error)) = written {
            tracing::warn!(%error, "cannot record metrics");
        }
    }
}
