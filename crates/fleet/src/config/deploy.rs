//! `[role.NAME.deploy]`: how a new generation replaces the live one.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{DAY, grace, parse_duration, timeout};

/// How a new generation replaces the live one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawDeploy")]
pub struct DeployConfig {
    pub strategy: Strategy,
    /// How long a new generation may take to become healthy before the deploy is aborted.
    pub healthy_timeout: Duration,
    /// How long in-flight requests on the old generation may take to finish after the switch.
    pub drain: Duration,
    /// The canary's steps and analysis (used with `strategy = "canary"`).
    pub canary: CanaryConfig,
    /// Batches of a rolling deploy (used with `strategy = "rolling"`).
    pub rolling: RollingConfig,
    /// A `phoenix load` scenario run against the new generation before it takes traffic;
    /// failing thresholds abort the deploy (a path beside the fleet file once checked).
    pub load_test: Option<PathBuf>,
}

/// How many instances a rolling deploy adds and takes away at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollingConfig {
    /// New instances started beyond the role's size at a time.
    pub max_surge: u32,
    /// Old instances taken out of service before their replacements are healthy.
    pub max_unavailable: u32,
}

impl Default for RollingConfig {
    fn default() -> Self {
        RollingConfig {
            max_surge: 1,
            max_unavailable: 0,
        }
    }
}

/// Deploy strategies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Strategy {
    /// The new generation boots beside the live one and takes all traffic at once.
    #[default]
    #[serde(rename = "blue-green")]
    BlueGreen,
    /// The new generation takes a growing share of traffic, step by step, while its errors
    /// and latency are compared with the live generation's; it is promoted or rolled back by
    /// that comparison.
    #[serde(rename = "canary")]
    Canary,
    /// The live generation's instances are replaced a few at a time: at most `max_surge`
    /// more than the role's size run at once, at most `max_unavailable` fewer serve.
    #[serde(rename = "rolling")]
    Rolling,
}

impl Strategy {
    /// The name the fleet file uses.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::BlueGreen => "blue-green",
            Strategy::Canary => "canary",
            Strategy::Rolling => "rolling",
        }
    }
}

/// A canary's steps and the analysis that decides each one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryConfig {
    /// The canary's share of requests at each step, in basis points, increasing.
    pub steps: Vec<u32>,
    /// How long each step is held before it is judged.
    pub interval: Duration,
    /// The fewest requests each side needs in a step before it can be judged.
    pub min_requests: u64,
    /// How much higher (in basis points of requests) the canary's error ratio may be.
    pub max_error_increase: u32,
    /// How much higher (in basis points of the live p99) the canary's p99 may be.
    pub max_p99_increase: u32,
    /// A p99 higher by no more than this is never a failure, whatever the ratio: fresh
    /// instances answer their first requests a little slower (new connections, cold caches),
    /// and 0.5 ms against 1 ms is no regression.
    pub p99_tolerance: Duration,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        CanaryConfig {
            steps: vec![500, 2_500, 5_000],
            interval: Duration::from_secs(30),
            min_requests: 100,
            max_error_increase: 100,
            max_p99_increase: 2_000,
            p99_tolerance: Duration::from_millis(5),
        }
    }
}

impl Default for DeployConfig {
    fn default() -> Self {
        DeployConfig {
            strategy: Strategy::BlueGreen,
            healthy_timeout: Duration::from_secs(30),
            drain: Duration::from_secs(30),
            canary: CanaryConfig::default(),
            rolling: RollingConfig::default(),
            load_test: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeploy {
    #[serde(default)]
    strategy: Strategy,
    #[serde(default, deserialize_with = "optional_timeout")]
    healthy_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "optional_grace")]
    drain: Option<Duration>,
    #[serde(default)]
    steps: Option<Vec<String>>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    min_requests: Option<u64>,
    #[serde(default)]
    max_error_increase: Option<String>,
    #[serde(default)]
    max_p99_increase: Option<String>,
    #[serde(default)]
    p99_tolerance: Option<String>,
    #[serde(default)]
    max_surge: Option<u32>,
    #[serde(default)]
    max_unavailable: Option<u32>,
    #[serde(default)]
    load_test: Option<String>,
}

fn optional_timeout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    timeout(d).map(Some)
}

fn optional_grace<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    grace(d).map(Some)
}

impl TryFrom<RawDeploy> for DeployConfig {
    type Error = String;

    fn try_from(raw: RawDeploy) -> Result<Self, String> {
        let defaults = DeployConfig::default();
        let rolling_keys = [
            ("max_surge", raw.max_surge.is_some()),
            ("max_unavailable", raw.max_unavailable.is_some()),
        ];
        if raw.strategy != Strategy::Rolling
            && let Some((key, _)) = rolling_keys.iter().find(|(_, set)| *set)
        {
            return Err(format!(
                "`{key}` applies to strategy = \"rolling\" only (this deploy is {})",
                raw.strategy.name()
            ));
        }
        let mut rolling = defaults.rolling;
        rolling.max_surge = raw.max_surge.unwrap_or(rolling.max_surge);
        rolling.max_unavailable = raw.max_unavailable.unwrap_or(rolling.max_unavailable);
        if rolling.max_surge == 0 && rolling.max_unavailable == 0 {
            return Err("`max_surge` and `max_unavailable` are both 0: a rolling deploy could never replace an instance; make one of them at least 1".into());
        }
        let canary_keys = [
            ("steps", raw.steps.is_some()),
            ("interval", raw.interval.is_some()),
            ("min_requests", raw.min_requests.is_some()),
            ("max_error_increase", raw.max_error_increase.is_some()),
            ("max_p99_increase", raw.max_p99_increase.is_some()),
            ("p99_tolerance", raw.p99_tolerance.is_some()),
        ];
        if raw.strategy != Strategy::Canary
            && let Some((key, _)) = canary_keys.iter().find(|(_, set)| *set)
        {
            return Err(format!(
                "`{key}` applies to strategy = \"canary\" only (this deploy is {})",
                raw.strategy.name()
            ));
        }
        let mut canary = defaults.canary;
        if let Some(steps) = raw.steps {
            canary.steps = steps_of(&steps)?;
        }
        if let Some(interval) = raw.interval {
            canary.interval = parse_duration(&interval).map_err(|e| format!("`interval`: {e}"))?;
            if canary.interval < Duration::from_secs(1) || canary.interval > DAY {
                return Err(format!(
                    "`interval`: {interval:?} is out of range: write between 1s and 24h"
                ));
            }
        }
        if let Some(min) = raw.min_requests {
            if min == 0 {
                return Err("`min_requests`: 0 would judge a step on no traffic at all; write at least 1 (100 by default)".into());
            }
            canary.min_requests = min;
        }
        if let Some(text) = raw.max_error_increase {
            canary.max_error_increase =
                percent(&text, 10_000).map_err(|e| format!("`max_error_increase`: {e}"))?;
        }
        if let Some(text) = raw.max_p99_increase {
            canary.max_p99_increase =
                percent(&text, 100_000).map_err(|e| format!("`max_p99_increase`: {e}"))?;
        }
        if let Some(text) = raw.p99_tolerance {
            canary.p99_tolerance =
                parse_duration(&text).map_err(|e| format!("`p99_tolerance`: {e}"))?;
            if canary.p99_tolerance > Duration::from_secs(60) {
                return Err(format!(
                    "`p99_tolerance`: {text:?} is out of range: write 0ms to 60s"
                ));
            }
        }
        let load_test = match raw.load_test {
            Some(file) if file.trim().is_empty() => {
                return Err(
                    "`load_test` is empty: name a scenario file, like \"load.toml\"".into(),
                );
            }
            Some(_) if raw.strategy == Strategy::Rolling => {
                return Err("`load_test` runs against the whole new generation before it takes traffic, and a rolling deploy moves traffic batch by batch: use strategy = \"blue-green\" or \"canary\"".into());
            }
            other => other.map(PathBuf::from),
        };
        Ok(DeployConfig {
            load_test,
            strategy: raw.strategy,
            healthy_timeout: raw.healthy_timeout.unwrap_or(defaults.healthy_timeout),
            drain: raw.drain.unwrap_or(defaults.drain),
            canary,
            rolling,
        })
    }
}

/// Steps like `["5%", "25%", "50%"]`: each above 0 % and below 100 %, increasing.
fn steps_of(steps: &[String]) -> Result<Vec<u32>, String> {
    if steps.is_empty() {
        return Err(
            "`steps` is empty: write the canary's shares, like [\"5%\", \"25%\", \"50%\"]".into(),
        );
    }
    let mut shares = Vec::with_capacity(steps.len());
    for text in steps {
        let share = percent(text, 10_000).map_err(|e| format!("`steps`: {e}"))?;
        if share == 0 || share >= 10_000 {
            return Err(format!(
                "`steps`: {text:?} is out of range: a canary step takes more than 0% and less than 100% (the promotion takes the rest)"
            ));
        }
        if shares.last().is_some_and(|&last| share <= last) {
            return Err(format!(
                "`steps`: {text:?} does not grow: each step takes a larger share than the one before"
            ));
        }
        shares.push(share);
    }
    Ok(shares)
}

/// A percentage like `"5%"` or `"0.5%"` in basis points, at most `max`.
pub(crate) fn percent(text: &str, max: u32) -> Result<u32, String> {
    let number = text
        .trim()
        .strip_suffix('%')
        .and_then(|n| n.trim().parse::<f64>().ok())
        .filter(|n| n.is_finite() && *n >= 0.0)
        .ok_or_else(|| {
            format!("{text:?} is not a percentage: write a number and %, like \"5%\"")
        })?;
    let basis_points = (number * 100.0).round();
    if basis_points > f64::from(max) {
        return Err(format!(
            "{text:?} is out of range: at most {}%",
            f64::from(max) / 100.0
        ));
    }
    Ok(basis_points as u32)
}
