//! Canary analysis: the canary generation's errors and latency against the live one's, from
//! the proxy's own per-backend counters, over the same window of time.
//!
//! Each side of a step is a sample of responses. The error ratios are compared with a
//! one-sided two-proportion z-test, the latencies with a one-sided Mann-Whitney U test on the
//! latency histograms (Kayenta's choice: it needs no assumption on the distribution, and
//! histogram buckets are ranks with ties). A step fails only when the canary is worse with
//! 99 % confidence *and* by more than the configured margin: a difference that is certain but
//! negligible, or large but from a handful of requests, decides nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use phoenix_proxy::Backend;
use phoenix_proxy::Histogram;
use serde::Serialize;

use serde_json::json;

use crate::Progress;
use crate::config::CanaryConfig;
use crate::controller::{Generation, Inner, Role};

/// The z-score a one-sided test at 99 % confidence must exceed.
const Z_99: f64 = 2.326;

/// Responses seen from a set of backends: totals since they started, or a window's
/// difference of two such readings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sample {
    pub requests: u64,
    /// Responses with a 5xx status.
    pub errors: u64,
    /// Responses per latency bucket (the proxy's buckets; the last is +Inf).
    pub latency: Vec<u64>,
}

impl Sample {
    /// The totals of `backends` now.
    pub fn of(backends: &[Arc<Backend>]) -> Sample {
        let mut sample = Sample::default();
        for backend in backends {
            let latency = backend.metrics.latency().snapshot();
            sample.requests += backend.metrics.total_responses();
            sample.errors += backend.metrics.responses(5);
            sample.latency.resize(latency.len(), 0);
            for (sum, count) in sample.latency.iter_mut().zip(latency) {
                *sum += count;
            }
        }
        sample
    }

    /// What was seen after `earlier` (a backend that left meanwhile can only lower the
    /// totals, never below zero).
    pub fn since(&self, earlier: &Sample) -> Sample {
        let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
        Sample {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            latency: (0..self.latency.len())
                .map(|i| at(&self.latency, i).saturating_sub(at(&earlier.latency, i)))
                .collect(),
        }
    }

    fn error_ratio(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    fn p99_ms(&self) -> Option<f64> {
        Histogram::quantile_of(&self.latency, 0.99).map(|s| s * 1000.0)
    }
}

/// The figures behind a judgement, journaled with each step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    pub canary_requests: u64,
    pub live_requests: u64,
    pub canary_error_percent: f64,
    pub live_error_percent: f64,
    /// How many standard errors the canary's error ratio lies above the live one's.
    pub error_z: f64,
    /// Upper bounds of the latency buckets holding each side's 99th percentile.
    pub canary_p99_ms: Option<f64>,
    pub live_p99_ms: Option<f64>,
    /// How many standard deviations the canary's latency ranks lie above the live one's.
    pub latency_z: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Too few requests on one side to say anything yet.
    TooFew,
    /// No significant and material difference.
    Healthy,
    /// Worse, with the reason.
    Worse(String),
}

/// Compares a step's canary sample with the live one's.
pub fn judge(canary: &Sample, live: &Sample, config: &CanaryConfig) -> (Verdict, Figures) {
    let figures = Figures {
        canary_requests: canary.requests,
        live_requests: live.requests,
        canary_error_percent: round(canary.error_ratio() * 100.0),
        live_error_percent: round(live.error_ratio() * 100.0),
        error_z: round(error_z(canary, live)),
        canary_p99_ms: canary.p99_ms(),
        live_p99_ms: live.p99_ms(),
        latency_z: round(mann_whitney_z(&canary.latency, &live.latency)),
    };
    if canary.requests < config.min_requests || live.requests < config.min_requests {
        return (Verdict::TooFew, figures);
    }
    let error_margin = f64::from(config.max_error_increase) / 10_000.0;
    if figures.error_z > Z_99 && canary.error_ratio() - live.error_ratio() > error_margin {
        let reason = format!(
            "errors {:.2}% against the live generation's {:.2}% ({} and {} requests; z = {:.1}, more than {:.2} points worse at 99% confidence)",
            figures.canary_error_percent,
            figures.live_error_percent,
            canary.requests,
            live.requests,
            figures.error_z,
            error_margin * 100.0
        );
        return (Verdict::Worse(reason), figures);
    }
    let latency_margin = 1.0 + f64::from(config.max_p99_increase) / 10_000.0;
    let tolerance_ms = config.p99_tolerance.as_secs_f64() * 1000.0;
    if let (Some(canary_p99), Some(live_p99)) = (figures.canary_p99_ms, figures.live_p99_ms)
        && figures.latency_z > Z_99
        && canary_p99 > live_p99 * latency_margin
        && canary_p99 - live_p99 > tolerance_ms
    {
        let reason = format!(
            "p99 latency up to {canary_p99} ms against the live generation's {live_p99} ms (z = {:.1}, slower at 99% confidence, more than {}% and {tolerance_ms} ms above)",
            figures.latency_z,
            config.max_p99_increase / 100
        );
        return (Verdict::Worse(reason), figures);
    }
    (Verdict::Healthy, figures)
}

/// One-sided two-proportion z-test: how far the canary's error ratio lies above the live
/// one's, in standard errors of the pooled ratio (0 when neither side has an error).
fn error_z(canary: &Sample, live: &Sample) -> f64 {
    let (n1, n2) = (canary.requests as f64, live.requests as f64);
    if n1 == 0.0 || n2 == 0.0 {
        return 0.0;
    }
    let pooled = (canary.errors + live.errors) as f64 / (n1 + n2);
    let variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2);
    if variance <= 0.0 {
        return 0.0;
    }
    (canary.error_ratio() - live.error_ratio()) / variance.sqrt()
}

/// Mann-Whitney U of `canary` against `live` latencies given as counts per ordered bucket,
/// as a z-score with the correction for ties (every observation in a bucket ties): positive
/// when the canary's latencies rank higher.
fn mann_whitney_z(canary: &[u64], live: &[u64]) -> f64 {
    let (n1, n2): (f64, f64) = (
        canary.iter().sum::<u64>() as f64,
        live.iter().sum::<u64>() as f64,
    );
    let n = n1 + n2;
    if n1 == 0.0 || n2 == 0.0 || n < 2.0 {
        return 0.0;
    }
    let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0) as f64;
    let (mut u, mut live_below, mut ties) = (0.0, 0.0, 0.0);
    for bucket in 0..canary.len().max(live.len()) {
        let (a, b) = (at(canary, bucket), at(live, bucket));
        // Pairs where the canary is slower count 1, pairs in the same bucket count a half.
        u += a * (live_below + b / 2.0);
        live_below += b;
        let t = a + b;
        ties += t * t * t - t;
    }
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if variance <= 0.0 {
        return 0.0;
    }
    (u - n1 * n2 / 2.0) / variance.sqrt()
}

/// Runs a canary deploy's steps: `generation` (booted and healthy) takes each step's share
/// of requests for the step's interval while it is compared with `live`. Returns once every
/// step passed (the caller switches), or the reason it failed, with the canary's traffic
/// already back on the live generation and drained.
pub(crate) async fn run_steps(
    inner: &Inner,
    role: &Role,
    live: &Arc<Generation>,
    generation: &Arc<Generation>,
    deploy_id: i64,
    progress: &Progress,
) -> Result<(), String> {
    let config = role.config();
    let canary = &config.deploy.canary;
    let steps = canary.steps.len();
    for (index, &share) in canary.steps.iter().enumerate() {
        let step = index + 1;
        let percent = f64::from(share) / 100.0;
        role.set_canary(Some((generation.clone(), share)));
        progress.say(format!(
            "canary step {step}/{steps}: {percent}% of requests to generation {} for {:?}",
            generation.id, canary.interval
        ));
        inner
            .journal(
                Some(&role.name),
                "deploy.canary_step",
                json!({"deploy": deploy_id, "generation": generation.id, "step": step, "share_percent": percent}),
            )
            .await;
        let judged = hold_step(live, generation, canary).await;
        let (passed, figures) = match &judged {
            Ok(figures) => (true, figures),
            Err((_, figures)) => (false, figures),
        };
        inner
            .journal(
                Some(&role.name),
                if passed {
                    "deploy.canary_passed"
                } else {
                    "deploy.canary_failed"
                },
                json!({"deploy": deploy_id, "generation": generation.id, "step": step,
                       "share_percent": percent, "figures": figures,
                       "reason": judged.as_ref().err().map(|(why, _)| why)}),
            )
            .await;
        if let Err((why, _)) = judged {
            let reason = format!("canary failed at {percent}% of requests: {why}");
            progress.say(reason.clone());
            end(role, generation, config.deploy.drain).await;
            return Err(reason);
        }
        progress.say(format!(
            "canary step {step}/{steps} passed: {} requests, errors {}% against {}%, p99 {} against {} ms",
            figures.canary_requests,
            figures.canary_error_percent,
            figures.live_error_percent,
            figures.canary_p99_ms.map_or("-".into(), |v| v.to_string()),
            figures.live_p99_ms.map_or("-".into(), |v| v.to_string()),
        ));
    }
    Ok(())
}

/// Takes the canary's share back to the live generation and waits for its requests.
async fn end(role: &Role, generation: &Arc<Generation>, drain: Duration) {
    role.set_canary(None);
    let backends: Vec<_> = generation
        .instances()
        .iter()
        .map(|i| i.backend.clone())
        .collect();
    phoenix_proxy::drain(&backends, drain).await;
}

/// Holds one step for its interval, judging every second: a canary found worse fails at
/// once; one still short of `min_requests` after three intervals fails as inconclusive.
async fn hold_step(
    live: &Arc<Generation>,
    generation: &Arc<Generation>,
    config: &CanaryConfig,
) -> Result<Figures, (String, Figures)> {
    let backends = |g: &Arc<Generation>| -> Vec<Arc<Backend>> {
        g.instances().iter().map(|i| i.backend.clone()).collect()
    };
    let (canary_start, live_start) = (
        Sample::of(&backends(generation)),
        Sample::of(&backends(live)),
    );
    let started = Instant::now();
    let tick = (config.interval / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        let canary = Sample::of(&backends(generation)).since(&canary_start);
        let live_now = Sample::of(&backends(live)).since(&live_start);
        let (verdict, figures) = judge(&canary, &live_now, config);
        let held = started.elapsed();
        match verdict {
            Verdict::Worse(why) => return Err((why, figures)),
            Verdict::Healthy if held >= config.interval => return Ok(figures),
            Verdict::TooFew if held >= config.interval * 3 => {
                let why = format!(
                    "inconclusive: {} canary and {} live requests in {:?}, fewer than min_requests = {}",
                    figures.canary_requests, figures.live_requests, held, config.min_requests
                );
                return Err((why, figures));
            }
            _ => {}
        }
    }
}

fn round(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(requests: u64, errors: u64, latency: &[u64]) -> Sample {
        Sample {
            requests,
            errors,
            latency: latency.to_vec(),
        }
    }

    /// `requests` responses all in latency bucket `bucket` (of 15).
    fn at_bucket(requests: u64, errors: u64, bucket: usize) -> Sample {
        let mut latency = vec![0; 15];
        latency[bucket] = requests;
        sample(requests, errors, &latency)
    }

    #[test]
    fn five_percent_errors_against_none_fail_once_the_sample_is_large_enough() {
        let config = CanaryConfig::default();
        let live = at_bucket(1_900, 0, 4);
        let (verdict, _) = judge(&at_bucket(99, 5, 4), &live, &config);
        assert_eq!(verdict, Verdict::TooFew, "99 requests < min_requests 100");
        let (verdict, figures) = judge(&at_bucket(100, 5, 4), &live, &config);
        assert!(
            matches!(&verdict, Verdict::Worse(why) if why.starts_with("errors 5.00% against the live generation's 0.00%")),
            "{verdict:?}"
        );
        assert_eq!(figures.canary_error_percent, 5.0);
        assert!(figures.error_z > 6.0, "{figures:?}");
    }

    #[test]
    fn a_difference_within_chance_or_within_the_margin_passes() {
        let config = CanaryConfig::default();
        // 2 errors in 100 against 1 in 100: not significant.
        let (verdict, figures) = judge(&at_bucket(100, 2, 4), &at_bucket(100, 1, 4), &config);
        assert_eq!(verdict, Verdict::Healthy, "{figures:?}");
        assert!(figures.error_z < Z_99);
        // 0.5 % against 0.1 % over a million requests: certain, but under the 1-point margin.
        let (verdict, figures) = judge(
            &at_bucket(1_000_000, 5_000, 4),
            &at_bucket(1_000_000, 1_000, 4),
            &config,
        );
        assert!(figures.error_z > 50.0);
        assert_eq!(verdict, Verdict::Healthy);
    }

    #[test]
    fn a_slower_canary_fails_on_latency_and_an_equal_one_does_not() {
        let config = CanaryConfig::default();
        let live = at_bucket(1_000, 0, 4); // <= 2.5 ms
        let (verdict, figures) = judge(&at_bucket(200, 0, 7), &live, &config); // <= 25 ms
        assert!(
            matches!(&verdict, Verdict::Worse(why) if why.starts_with("p99 latency up to 25 ms against the live generation's 2.5 ms")),
            "{verdict:?}"
        );
        assert!(figures.latency_z > 10.0, "{figures:?}");
        let (verdict, figures) = judge(&at_bucket(200, 0, 4), &live, &config);
        assert_eq!(verdict, Verdict::Healthy);
        assert_eq!(figures.latency_z, 0.0, "all ties");
        // Faster is never worse.
        let (verdict, figures) = judge(&at_bucket(200, 0, 1), &live, &config);
        assert_eq!(verdict, Verdict::Healthy);
        assert!(figures.latency_z < -10.0);
        // Slower for certain, but by 2.5 ms: within the default tolerance of 5 ms, unless
        // the tolerance is lowered.
        let (verdict, figures) = judge(&at_bucket(200, 0, 5), &live, &config); // <= 5 ms
        assert!(figures.latency_z > 10.0, "{figures:?}");
        assert_eq!(verdict, Verdict::Healthy);
        let strict = CanaryConfig {
            p99_tolerance: Duration::from_millis(1),
            ..CanaryConfig::default()
        };
        let (verdict, _) = judge(&at_bucket(200, 0, 5), &live, &strict);
        assert!(
            matches!(&verdict, Verdict::Worse(why) if why.contains("more than 20% and 1 ms above")),
            "{verdict:?}"
        );
    }

    #[test]
    fn mann_whitney_matches_the_textbook_value() {
        // Canary latencies ranked {2,3,3}, live {1,1,2}, one per bucket count:
        // U = 1·(2 + ½·1) + 2·(3 + 0) = 8.5 of 9 pairs; mean 4.5.
        let z = mann_whitney_z(&[0, 1, 2], &[2, 1, 0]);
        // Ties: buckets of 2, 2, 2 -> Σ(t³ - t) = 18; var = 9/12 · (7 - 18/30) = 4.8.
        assert!((z - 4.0 / 4.8f64.sqrt()).abs() < 1e-9, "{z}");
    }

    #[test]
    fn a_window_is_the_difference_of_two_readings() {
        let before = sample(10, 1, &[5, 5]);
        let after = sample(25, 4, &[12, 13]);
        assert_eq!(after.since(&before), sample(15, 3, &[7, 8]));
        assert_eq!(before.since(&after), sample(0, 0, &[0, 0]));
    }
}
