//! The autoscaler of a role: `[role.NAME.autoscale]`.
//!
//! Every `interval` it looks at the last `window` of per-second samples and recommends a size:
//! - target tracking, Kubernetes HPA's rule: `ceil(current × value / target)`, nothing within
//!   the 10 % tolerance;
//! - or thresholds (the talks' 90 % / 70 %): above `out_above` it grows in proportion, below
//!   `in_below` it shrinks by one.
//!
//! Scale-out applies at once. Scale-in applies the highest recommendation of the last
//! `stabilization` (5 min by default), at most `scale_in_limit` instances per evaluation.
//! Instances younger than `warmup`, or without samples yet, are not counted; as HPA does,
//! they are taken as idle when the role grows and as at target when it shrinks, so that they
//! never cause a scale-in nor hide a needed scale-out. The decision logic is pure: time and
//! samples come in as arguments.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// HPA's default tolerance: a ratio within 10 % of 1 changes nothing.
const TOLERANCE: f64 = 0.1;

/// What the autoscaler watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleMetric {
    /// CPU per instance, in cores (0.9 is 90 % of one core).
    Cpu,
    /// Resident memory per instance, in bytes.
    Memory,
    /// The role's requests per second divided by its instances.
    RpsPerInstance,
    /// The role's p99 latency in milliseconds.
    P99Ms,
}

impl ScaleMetric {
    /// The sampled metric it reads.
    pub fn sample_name(self) -> &'static str {
        match self {
            ScaleMetric::Cpu => "cpu",
            ScaleMetric::Memory => "memory",
            ScaleMetric::RpsPerInstance => "rps",
            ScaleMetric::P99Ms => "p99_ms",
        }
    }

    /// Whether the value is one per instance (averaged over ready instances) rather than one
    /// for the role.
    pub fn per_instance(self) -> bool {
        !matches!(self, ScaleMetric::P99Ms)
    }
}

/// How the size is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Policy {
    Target { target: f64 },
    Thresholds { out_above: f64, in_below: f64 },
}

/// `[role.NAME.autoscale]`, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AutoscaleConfig {
    pub min: u32,
    pub max: u32,
    pub metric: ScaleMetric,
    pub policy: Policy,
    pub interval: Duration,
    pub window: Duration,
    pub stabilization: Duration,
    pub scale_in_limit: u32,
    pub warmup: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoscale {
    min: u32,
    max: u32,
    #[serde(default = "default_metric")]
    metric: ScaleMetric,
    target: Option<f64>,
    out_above: Option<f64>,
    in_below: Option<f64>,
    #[serde(
        default = "default_interval",
        deserialize_with = "crate::config::period"
    )]
    interval: Duration,
    #[serde(default = "default_window", deserialize_with = "crate::config::period")]
    window: Duration,
    #[serde(
        default = "default_stabilization",
        deserialize_with = "crate::config::grace"
    )]
    stabilization: Duration,
    #[serde(default = "default_scale_in_limit")]
    scale_in_limit: u32,
    #[serde(default = "default_warmup", deserialize_with = "crate::config::grace")]
    warmup: Duration,
}

fn default_metric() -> ScaleMetric {
    ScaleMetric::Cpu
}
fn default_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_window() -> Duration {
    Duration::from_secs(5)
}
fn default_stabilization() -> Duration {
    Duration::from_secs(300)
}
fn default_scale_in_limit() -> u32 {
    1
}
fn default_warmup() -> Duration {
    Duration::from_secs(5)
}

impl TryFrom<RawAutoscale> for AutoscaleConfig {
    type Error = String;

    fn try_from(raw: RawAutoscale) -> Result<Self, String> {
        if raw.min == 0 || raw.max < raw.min {
            return Err(format!(
                "`min` must be at least 1 and `max` at least `min` (got {} and {})",
                raw.min, raw.max
            ));
        }
        let policy = match (raw.target, raw.out_above, raw.in_below) {
            (Some(target), None, None) if target > 0.0 => Policy::Target { target },
            (None, Some(out_above), Some(in_below)) if 0.0 <= in_below && in_below < out_above => {
                Policy::Thresholds {
                    out_above,
                    in_below,
                }
            }
            _ => {
                return Err("give either `target` (> 0) or `out_above` and `in_below` \
                            (in_below < out_above)"
                    .into());
            }
        };
        if raw.interval.is_zero() || raw.window.is_zero() || raw.scale_in_limit == 0 {
            return Err("`interval`, `window` and `scale_in_limit` must be above zero".into());
        }
        Ok(AutoscaleConfig {
            min: raw.min,
            max: raw.max,
            metric: raw.metric,
            policy,
            interval: raw.interval,
            window: raw.window,
            stabilization: raw.stabilization,
            scale_in_limit: raw.scale_in_limit,
            warmup: raw.warmup,
        })
    }
}

impl<'de> Deserialize<'de> for AutoscaleConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = RawAutoscale::deserialize(deserializer)?;
        AutoscaleConfig::try_from(raw).map_err(serde::de::Error::custom)
    }
}

/// What the autoscaler sees at one evaluation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// Instances in the live generation now.
    pub current: u32,
    /// The window's average of each ready instance (per-instance metrics), or of the role (one
    /// value, for role metrics). Empty when nothing was measured.
    pub values: Vec<f64>,
    /// Instances not counted: warming up, or without samples.
    pub missing: u32,
}

/// One evaluation's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The size to apply (equal to `current` for no change).
    pub desired: u32,
    /// The recommendation before stabilization and limits.
    pub recommended: u32,
    pub reason: String,
}

/// A role's autoscaler: the config and its recent recommendations.
#[derive(Debug)]
pub struct Autoscaler {
    pub config: AutoscaleConfig,
    /// (time in ms, recommendation) over the stabilization window.
    history: VecDeque<(i64, u32)>,
    /// When the first evaluation ran.
    started: Option<i64>,
}

impl Autoscaler {
    pub fn new(config: AutoscaleConfig) -> Autoscaler {
        Autoscaler {
            config,
            history: VecDeque::new(),
            started: None,
        }
    }

    /// Decides the size at `now_ms` from `seen`.
    pub fn decide(&mut self, now_ms: i64, seen: &Observation) -> Decision {
        let config = &self.config;
        let current = seen.current;
        let (raw, why) = match self.recommend(seen) {
            Some(recommendation) => recommendation,
            None => (
                current,
                "no samples in the window: keeping the size".to_string(),
            ),
        };
        let recommended = raw.clamp(config.min, config.max);
        let stabilization = config.stabilization.as_millis() as i64;
        if self.history.is_empty() && self.started.is_none() {
            // A fresh autoscaler counts the size it found as a recommendation, so that it
            // never shrinks a role before one stabilization window has passed.
            self.started = Some(now_ms);
            self.history.push_back((now_ms, current));
        }
        self.history.push_back((now_ms, recommended));
        while self
            .history
            .front()
            .is_some_and(|(t, _)| *t < now_ms - stabilization)
        {
            self.history.pop_front();
        }
        let desired = if recommended >= current {
            recommended
        } else {
            // Scale-in: the highest recommendation of the window, then the rate limit.
            let highest = self
                .history
                .iter()
                .map(|(_, r)| *r)
                .max()
                .unwrap_or(current);
            let floor = current.saturating_sub(config.scale_in_limit);
            highest.min(current).max(floor).max(config.min)
        };
        let reason = if desired == current && recommended < current {
            format!(
                "{why}; scale-in held by the {:?} stabilization window",
                config.stabilization
            )
        } else {
            why
        };
        Decision {
            desired,
            recommended,
            reason,
        }
    }

    /// The recommendation and why, or `None` without samples.
    fn recommend(&self, seen: &Observation) -> Option<(u32, String)> {
        if seen.values.is_empty() {
            return None;
        }
        let current = seen.current.max(1);
        let metric = self.config.metric.sample_name();
        let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
        let measured = mean(&seen.values);
        match self.config.policy {
            Policy::Target { target } => {
                let value = if self.config.metric == ScaleMetric::RpsPerInstance {
                    // The role's rate spread over the instances that serve it.
                    seen.values.iter().sum::<f64>() / current as f64
                } else {
                    measured
                };
                let ratio = value / target;
                if (ratio - 1.0).abs() <= TOLERANCE {
                    return Some((
                        current,
                        format!("{metric} {value:.3} within 10 % of target {target}"),
                    ));
                }
                let mut ratio = ratio;
                if seen.missing > 0 && self.config.metric.per_instance() {
                    // Instances without samples: idle when growing, at target when shrinking.
                    let assumed = if ratio > 1.0 { 0.0 } else { target };
                    let ready = seen.values.len() as f64;
                    let total = value * ready + assumed * f64::from(seen.missing);
                    let adjusted = total / (ready + f64::from(seen.missing)) / target;
                    if (adjusted - 1.0).abs() <= TOLERANCE || (adjusted > 1.0) != (ratio > 1.0) {
                        return Some((
                            current,
                            format!(
                                "{metric} {value:.3} vs target {target}, but {} instances still warming up",
                                seen.missing
                            ),
                        ));
                    }
                    ratio = adjusted;
                }
                let desired = (f64::from(current) * ratio).ceil() as u32;
                Some((
                    desired,
                    format!(
                        "{metric} {value:.3} vs target {target}: ceil({current} × {ratio:.3}) = {desired}"
                    ),
                ))
            }
            Policy::Thresholds {
                out_above,
                in_below,
            } => {
                if measured > out_above {
                    let desired = ((f64::from(current) * measured / out_above).ceil() as u32)
                        .max(current + 1);
                    Some((
                        desired,
                        format!("{metric} {measured:.3} above {out_above}: {desired}"),
                    ))
                } else if measured < in_below && seen.missing == 0 {
                    Some((
                        current - 1,
                        format!("{metric} {measured:.3} below {in_below}: one fewer"),
                    ))
                } else {
                    Some((
                        current,
                        format!("{metric} {measured:.3} between {in_below} and {out_above}"),
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(policy: Policy) -> AutoscaleConfig {
        AutoscaleConfig {
            min: 2,
            max: 10,
            metric: ScaleMetric::Cpu,
            policy,
            interval: Duration::from_secs(2),
            window: Duration::from_secs(5),
            stabilization: Duration::from_secs(300),
            scale_in_limit: 1,
            warmup: Duration::from_secs(5),
        }
    }

    fn seen(current: u32, values: &[f64], missing: u32) -> Observation {
        Observation {
            current,
            values: values.to_vec(),
            missing,
        }
    }

    #[test]
    fn target_tracking_follows_the_hpa_formula_with_its_tolerance() {
        let mut scaler = Autoscaler::new(config(Policy::Target { target: 0.5 }));
        // 4 instances at 0.9 cores for a 0.5 target: ceil(4 × 1.8) = 8, at once.
        assert_eq!(scaler.decide(0, &seen(4, &[0.9; 4], 0)).desired, 8);
        // Within 10 %: nothing.
        let calm = scaler.decide(2_000, &seen(8, &[0.53; 8], 0));
        assert_eq!(calm.desired, 8);
        assert!(calm.reason.contains("within 10 %"), "{}", calm.reason);
        // Clamped to max.
        assert_eq!(scaler.decide(4_000, &seen(8, &[5.0; 8], 0)).desired, 10);
        // Nothing measured: no change.
        assert_eq!(scaler.decide(6_000, &seen(10, &[], 10)).desired, 10);
    }

    #[test]
    fn scale_in_waits_for_the_stabilization_window_and_steps_by_the_limit() {
        let mut scaler = Autoscaler::new(config(Policy::Target { target: 0.5 }));
        assert_eq!(scaler.decide(0, &seen(6, &[0.5; 6], 0)).desired, 6);
        // Load drops: the recommendation is 2, but 6 was recommended within 5 minutes.
        let held = scaler.decide(60_000, &seen(6, &[0.1; 6], 0));
        assert_eq!((held.recommended, held.desired), (2, 6));
        assert!(held.reason.contains("stabilization"), "{}", held.reason);
        // After the window only low recommendations remain: one instance per evaluation.
        let first = scaler.decide(301_000, &seen(6, &[0.1; 6], 0));
        assert_eq!(first.desired, 5);
        assert_eq!(scaler.decide(303_000, &seen(5, &[0.1; 5], 0)).desired, 4);
        // Never below min.
        let mut low = Autoscaler::new(config(Policy::Target { target: 0.5 }));
        assert_eq!(low.decide(0, &seen(2, &[0.0; 2], 0)).desired, 2);
    }

    #[test]
    fn a_fresh_autoscaler_holds_scale_in_for_one_window() {
        let mut scaler = Autoscaler::new(config(Policy::Target { target: 0.5 }));
        assert_eq!(scaler.decide(0, &seen(4, &[0.0; 4], 0)).desired, 4);
        assert_eq!(scaler.decide(299_000, &seen(4, &[0.0; 4], 0)).desired, 4);
        assert_eq!(scaler.decide(301_000, &seen(4, &[0.0; 4], 0)).desired, 3);
    }

    #[test]
    fn warming_instances_neither_trigger_scale_in_nor_hide_scale_out() {
        let mut scaler = Autoscaler::new(config(Policy::Target { target: 0.5 }));
        // 2 ready at 1.0, 2 warming: taken as idle, (2 + 0) / 4 = 0.5: on target, no change.
        let warming = scaler.decide(0, &seen(4, &[1.0, 1.0], 2));
        assert_eq!(warming.desired, 4);
        assert!(warming.reason.contains("warming up"), "{}", warming.reason);
        // 2 ready at 2.0, 2 warming: (4 + 0) / 4 = 1.0 → ceil(4 × 2) = 8.
        assert_eq!(
            scaler.decide(2_000, &seen(4, &[2.0, 2.0], 2)).recommended,
            8
        );
        // 2 ready at 0.1, 2 warming: shrinking assumes them at target → (0.2 + 1.0) / 4 = 0.3.
        let mut idle = Autoscaler::new(config(Policy::Target { target: 0.5 }));
        assert_eq!(idle.decide(0, &seen(4, &[0.1, 0.1], 2)).recommended, 3);
    }

    #[test]
    fn thresholds_scale_out_above_and_in_below() {
        let policy = Policy::Thresholds {
            out_above: 0.9,
            in_below: 0.7,
        };
        let mut scaler = Autoscaler::new(AutoscaleConfig {
            stabilization: Duration::ZERO,
            ..config(policy)
        });
        assert_eq!(scaler.decide(0, &seen(3, &[0.95; 3], 0)).desired, 4);
        assert_eq!(scaler.decide(1_000, &seen(3, &[1.8; 3], 0)).desired, 6);
        assert_eq!(scaler.decide(2_000, &seen(6, &[0.8; 6], 0)).desired, 6);
        assert_eq!(scaler.decide(3_000, &seen(6, &[0.5; 6], 0)).desired, 5);
    }

    #[test]
    fn rps_per_instance_divides_the_role_rate() {
        let mut scaler = Autoscaler::new(AutoscaleConfig {
            metric: ScaleMetric::RpsPerInstance,
            ..config(Policy::Target { target: 100.0 })
        });
        // Two instances serving 300 and 300 rps: 600 / 2 = 300 per instance → ceil(2 × 3) = 6.
        assert_eq!(scaler.decide(0, &seen(2, &[300.0, 300.0], 0)).desired, 6);
    }

    #[test]
    fn configs_are_validated() {
        let parse = |text: &str| -> Result<AutoscaleConfig, String> {
            toml::from_str::<AutoscaleConfig>(text).map_err(|e| e.to_string())
        };
        let ok = parse("min = 2\nmax = 8\nmetric = \"p99_ms\"\ntarget = 50\n").unwrap();
        assert_eq!(ok.metric, ScaleMetric::P99Ms);
        assert_eq!(ok.stabilization, Duration::from_secs(300));
        assert!(parse("min = 2\nmax = 8\nout_above = 0.9\nin_below = 0.7\n").is_ok());
        assert!(
            parse("min = 0\nmax = 8\ntarget = 1\n")
                .unwrap_err()
                .contains("`min`")
        );
        assert!(
            parse("min = 2\nmax = 8\n")
                .unwrap_err()
                .contains("either `target`")
        );
        assert!(parse("min = 2\nmax = 8\ntarget = 1\nin_below = 0.5\n").is_err());
        assert!(
            parse("min = 2\nmax = 8\ntarget = 1\nmetrc = \"cpu\"\n")
                .unwrap_err()
                .contains("metrc")
        );
    }
}
