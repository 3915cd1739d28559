//! Running a suite: a bounded pool of workers over the checks, one shared view of the system per
//! attempt, and retries until everything passes or the retry timeout runs out.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::probe::{self, System, Target};
use crate::suite::{Check, Suite};

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// How many checks run at once.
    pub max_concurrent: usize,
    /// Retry a failing run until this much time has passed (zero: run once).
    pub retry_timeout: Duration,
    /// Pause between attempts.
    pub sleep: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            max_concurrent: 50,
            retry_timeout: Duration::ZERO,
            sleep: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

/// The result of one attribute of one check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// `File`, `Port`, `KernelParam`, as goss names them.
    pub resource_type: String,
    pub resource_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub title: String,
    #[serde(default, skip_serializing_if = "Json::is_null")]
    pub meta: Json,
    pub property: String,
    pub result: Status,
    pub expected: Json,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found: Option<Json>,
    /// Why the value could not be read, when it could not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// goss's matcher message: `matches expectation`, or what was expected (`to equal`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the check started, from the start of the run.
    #[serde(default)]
    pub start_ns: u64,
    pub duration_ns: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
    /// When the run started, in nanoseconds since the Unix epoch.
    #[serde(default)]
    pub started_unix_ns: u64,
    pub duration_ns: u64,
    /// How many times the suite ran (more than one with retries).
    pub attempts: u32,
}

impl Report {
    pub fn count(&self, status: Status) -> usize {
        self.outcomes.iter().filter(|o| o.result == status).count()
    }

    pub fn passed(&self) -> bool {
        self.count(Status::Fail) == 0
    }

    pub fn failures(&self) -> impl Iterator<Item = &Outcome> {
        self.outcomes.iter().filter(|o| o.result == Status::Fail)
    }
}

/// Runs `suite` against `target`, retrying as `options` say.
pub fn run(suite: &Suite, target: &Target, options: &RunOptions) -> Report {
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let attempt_started = (Instant::now(), std::time::SystemTime::now());
        let outcomes = run_once(&suite.checks, target, options.max_concurrent);
        let failed = outcomes.iter().any(|o| o.result == Status::Fail);
        if !failed || started.elapsed() + options.sleep > options.retry_timeout {
            let since_epoch = attempt_started
                .1
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            return Report {
                outcomes,
                started_unix_ns: since_epoch.as_nanos() as u64,
                duration_ns: attempt_started.0.elapsed().as_nanos() as u64,
                attempts,
            };
        }
        std::thread::sleep(options.sleep);
    }
}

fn run_once(checks: &[Check], target: &Target, max_concurrent: usize) -> Vec<Outcome> {
    let run_started = Instant::now();
    let system = System::new(target);
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Vec<Outcome>>> = checks.iter().map(|_| Mutex::new(Vec::new())).collect();
    let workers = max_concurrent.clamp(1, checks.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(check) = checks.get(index) else {
                        break;
                    };
                    let outcomes = evaluate(check, &system, run_started);
                    *results[index].lock().unwrap_or_else(|e| e.into_inner()) = outcomes;
                }
            });
        }
    });
    results
        .into_iter()
        .flat_map(|r| r.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect()
}

fn evaluate(check: &Check, system: &System, run_started: Instant) -> Vec<Outcome> {
    let started = Instant::now();
    let start_ns = started.duration_since(run_started).as_nanos() as u64;
    let (attempts, delay) = check.retries();
    let observe = |system: &System| match check.skip {
        true => Vec::new(),
        false => probe::observe(check, system),
    };
    let mut judged = judge(check, observe(system));
    for _ in 1..attempts {
        if !judged.iter().any(|(result, _, _)| *result == Status::Fail) {
            break;
        }
        std::thread::sleep(delay);
        // A fresh view: the tables of the first try (packages) are what failed.
        judged = judge(check, observe(&System::new(system.target)));
    }
    let duration_ns = started.elapsed().as_nanos() as u64;
    check
        .attributes
        .iter()
        .zip(judged)
        .map(|(attribute, (result, found, error))| Outcome {
            message: match result {
                Status::Pass => "matches expectation".to_string(),
                Status::Fail => attribute.matcher.message(),
                Status::Skip => String::new(),
            },
            start_ns,
            resource_type: check.kind.title().to_string(),
            resource_id: check.id.clone(),
            title: check.title.clone(),
            meta: check.meta.clone(),
            property: attribute.name.to_string(),
            result,
            expected: attribute.expected.clone(),
            found,
            error,
            duration_ns,
        })
        .collect()
}

type Judged = (Status, Option<Json>, String);

/// Each attribute's result for what was observed; every one skipped when the check is, and the
/// rest skipped after its gate ([`crate::kind::Kind::gate`]) fails or finds `false`.
fn judge(check: &Check, observed: Vec<Result<Json, String>>) -> Vec<Judged> {
    if check.skip {
        return vec![(Status::Skip, None, String::new()); check.attributes.len()];
    }
    let mut judged: Vec<Judged> = check
        .attributes
        .iter()
        .zip(observed)
        .map(|(attribute, observed)| match observed {
            Err(error) => (Status::Fail, None, error),
            Ok(found) => match attribute.matcher.matches(&found) {
                Ok(true) => (Status::Pass, Some(found), String::new()),
                Ok(false) => (Status::Fail, Some(found), String::new()),
                Err(error) => (Status::Fail, Some(found), error),
            },
        })
        .collect();
    let gate = check
        .kind
        .gate()
        .and_then(|gate| check.attributes.iter().position(|a| a.name == gate));
    if let Some(gate) = gate {
        let (result, found, _) = &judged[gate];
        if *result == Status::Fail || *found == Some(Json::Bool(false)) {
            for (index, slot) in judged.iter_mut().enumerate() {
                if index != gate {
                    *slot = (Status::Skip, None, String::new());
                }
            }
        }
    }
    judged
}
