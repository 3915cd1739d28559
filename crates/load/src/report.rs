//! What a run saw, overall and per request, and how the thresholds came out.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::threshold::{Aggregation, Metric};
use crate::{Scenario, Threshold};

/// What a run saw.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub scheduled: u64,
    pub ok: u64,
    pub errors: u64,
    /// Errors by kind: `status 503`, `timeout`, `connect`, ….
    pub error_kinds: BTreeMap<String, u64>,
    /// Completed requests (ok or not) per second of the run.
    pub achieved_rps: f64,
    /// Latency from when each request was due, in milliseconds.
    pub latency_ms: Percentiles,
    /// The same by the scenario's request names.
    pub requests: BTreeMap<String, RequestReport>,
    pub thresholds: Vec<ThresholdResult>,
    /// Every threshold held (true when there are none).
    pub passed: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct RequestReport {
    pub count: u64,
    pub errors: u64,
    pub latency_ms: Percentiles,
}

#[derive(Debug, Serialize)]
pub struct ThresholdResult {
    /// As written, like `http_req_duration p(99)<250`.
    pub threshold: String,
    pub actual: f64,
    pub passed: bool,
}

impl Report {
    /// Why the run failed, empty when it passed: the thresholds that did not hold or, for a
    /// scenario without thresholds, any failed request.
    pub fn failures(&self) -> Vec<String> {
        if self.thresholds.is_empty() {
            return match self.errors {
                0 => Vec::new(),
                n => vec![format!("{n} of {} requests failed", self.scheduled)],
            };
        }
        self.thresholds
            .iter()
            .filter(|t| !t.passed)
            .map(|t| format!("{} (was {})", t.threshold, t.was()))
            .collect()
    }
}

impl ThresholdResult {
    /// The measured value to four decimals, enough to read.
    pub fn was(&self) -> f64 {
        (self.actual * 10_000.0).round() / 10_000.0
    }
}

#[derive(Debug, Default, Serialize, Clone, Copy)]
pub struct Percentiles {
    pub min: f64,
    pub avg: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of sorted `micros`.
    fn of(sorted: &[u64]) -> Percentiles {
        if sorted.is_empty() {
            return Percentiles::default();
        }
        let sum: u64 = sorted.iter().sum();
        Percentiles {
            min: ms(sorted[0]),
            avg: sum as f64 / sorted.len() as f64 / 1000.0,
            p50: percentile(sorted, 50.0),
            p90: percentile(sorted, 90.0),
            p95: percentile(sorted, 95.0),
            p99: percentile(sorted, 99.0),
            p999: percentile(sorted, 99.9),
            max: ms(sorted[sorted.len() - 1]),
        }
    }
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// The nearest-rank percentile `p` (0–100) of sorted `micros`, in milliseconds.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Less a hair: 99.9 % of 1000 is rank 999, not the 1000 rounding would give.
    let rank = ((p / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize).clamp(1, sorted.len());
    ms(sorted[rank - 1])
}

/// One request's outcome.
pub(crate) struct Outcome {
    pub request: usize,
    pub micros: u64,
    pub error: Option<String>,
}

/// Sums `outcomes` of `scenario` over `seconds` and judges its thresholds.
pub(crate) fn summarise(
    scenario: &Scenario,
    scheduled: u64,
    outcomes: Vec<Outcome>,
    seconds: f64,
) -> Report {
    let mut report = Report {
        scheduled,
        ..Report::default()
    };
    let mut all = Vec::with_capacity(outcomes.len());
    // By request name (two [[request]]s may share one): latencies and errors; every name is
    // reported, answered or not.
    let mut samples: BTreeMap<&str, (Vec<u64>, u64)> = scenario
        .requests
        .iter()
        .map(|r| (r.name.as_str(), Default::default()))
        .collect();
    for outcome in &outcomes {
        all.push(outcome.micros);
        let sample = samples
            .entry(&scenario.requests[outcome.request].name)
            .or_default();
        sample.0.push(outcome.micros);
        match &outcome.error {
            None => report.ok += 1,
            Some(kind) => {
                report.errors += 1;
                sample.1 += 1;
                *report.error_kinds.entry(kind.clone()).or_default() += 1;
            }
        }
    }
    all.sort_unstable();
    report.achieved_rps = all.len() as f64 / seconds.max(f64::EPSILON);
    report.latency_ms = Percentiles::of(&all);
    for (name, (micros, errors)) in &mut samples {
        micros.sort_unstable();
        let request = RequestReport {
            count: micros.len() as u64,
            errors: *errors,
            latency_ms: Percentiles::of(micros),
        };
        report.requests.insert(name.to_string(), request);
    }
    for threshold in &scenario.thresholds {
        let (micros, errors) = match &threshold.request {
            Some(name) => samples
                .get(name.as_str())
                .map(|(m, e)| (m.as_slice(), *e))
                .unwrap_or((&[], 0)),
            None => (all.as_slice(), report.errors),
        };
        let actual = measure(threshold, micros, errors, seconds);
        report.thresholds.push(ThresholdResult {
            threshold: threshold.to_string(),
            actual,
            passed: threshold.holds(actual),
        });
    }
    report.passed = report.thresholds.iter().all(|t| t.passed);
    report
}

/// The figure `threshold` judges, from sorted latencies and an error count.
fn measure(threshold: &Threshold, sorted: &[u64], errors: u64, seconds: f64) -> f64 {
    let count = sorted.len() as f64;
    match (threshold.metric, threshold.aggregation) {
        (Metric::Failed, _) if count == 0.0 => 0.0,
        (Metric::Failed, _) => errors as f64 / count,
        (Metric::Requests, Aggregation::Count) => count,
        (Metric::Requests, _) => count / seconds.max(f64::EPSILON),
        (_, Aggregation::Percentile(p)) => percentile(sorted, p),
        (_, Aggregation::Med) => percentile(sorted, 50.0),
        (_, aggregation) => {
            let p = Percentiles::of(sorted);
            match aggregation {
                Aggregation::Min => p.min,
                Aggregation::Max => p.max,
                _ => p.avg,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let micros: Vec<u64> = (1..=1000).map(|n| n * 1000).collect();
        let p = Percentiles::of(&micros);
        assert_eq!(
            (p.min, p.p50, p.p90, p.p95, p.p99, p.p999, p.max),
            (1.0, 500.0, 900.0, 950.0, 990.0, 999.0, 1000.0)
        );
        assert_eq!(p.avg, 500.5);
        assert_eq!(Percentiles::of(&[]).max, 0.0);
    }

    #[test]
    fn thresholds_are_judged_overall_and_per_request() {
        let text = r#"
            [[stage]]
            duration = "1s"
            target = 10
            [[request]]
            name = "fast"
            weight = 3
            [[request]]
            name = "slow"
            path = "/slow"
            [thresholds]
            http_req_failed = ["rate<0.2"]
            "http_req_failed{name:slow}" = ["rate<0.2"]
            "http_req_duration{name:fast}" = ["p(99)<=3", "avg<2.5"]
            http_reqs = ["count==8"]
        "#;
        let scenario = Scenario::parse(std::path::Path::new("s.toml"), text).unwrap();
        let outcome = |request, ms: u64, error: Option<&str>| Outcome {
            request,
            micros: ms * 1000,
            error: error.map(str::to_string),
        };
        let outcomes = vec![
            outcome(0, 1, None),
            outcome(0, 2, None),
            outcome(0, 3, None),
            outcome(0, 3, None),
            outcome(1, 50, None),
            outcome(1, 60, Some("status 500")),
            outcome(1, 70, None),
            outcome(0, 1, None),
        ];
        let report = summarise(&scenario, 8, outcomes, 1.0);
        let judged: Vec<(String, f64, bool)> = report
            .thresholds
            .iter()
            .map(|t| (t.threshold.clone(), t.actual, t.passed))
            .collect();
        assert_eq!(
            judged,
            vec![
                ("http_req_failed rate<0.2".into(), 0.125, true),
                (
                    "http_req_failed{name:slow} rate<0.2".into(),
                    1.0 / 3.0,
                    false
                ),
                ("http_req_duration{name:fast} p(99)<=3".into(), 3.0, true),
                ("http_req_duration{name:fast} avg<2.5".into(), 2.0, true),
                ("http_reqs count==8".into(), 8.0, true),
            ]
        );
        assert!(!report.passed);
        assert_eq!(
            report.failures(),
            ["http_req_failed{name:slow} rate<0.2 (was 0.3333)"]
        );
        assert_eq!(report.requests["slow"].errors, 1);
        assert_eq!(report.requests["fast"].count, 5);
        assert_eq!(report.error_kinds["status 500"], 1);
    }
}
