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
    pub duration_ns: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
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
        let outcomes = run_once(&suite.checks, target, options.max_concurrent);
        let failed = outcomes.iter().any(|o| o.result == Status::Fail);
        if !failed || started.elapsed() + options.sleep > options.retry_timeout {
            return Report {
                outcomes,
                duration_ns: started.elapsed().as_nanos() as u64,
                attempts,
            };
        }
        std::thread::sleep(options.sleep);
    }
}

fn run_once(checks: &[Check], target: &Target, max_concurrent: usize) -> Vec<Outcome> {
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
                    let outcomes = evaluate(check, &system);
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

fn evaluate(check: &Check, system: &System) -> Vec<Outcome> {
    let started = Instant::now();
    let observed = match check.skip {
        true => vec![Err(String::new()); check.attributes.len()],
        false => probe::observe(check, system),
    };
    let duration_ns = started.elapsed().as_nanos() as u64;
    check
        .attributes
        .iter()
        .zip(observed)
        .map(|(attribute, observed)| {
            let (result, found, error) = match (check.skip, observed) {
                (true, _) => (Status::Skip, None, String::new()),
                (false, Err(error)) => (Status::Fail, None, error),
                (false, Ok(found)) => match attribute.matcher.matches(&found) {
                    Ok(true) => (Status::Pass, Some(found), String::new()),
                    Ok(false) => (Status::Fail, Some(found), String::new()),
                    Err(error) => (Status::Fail, Some(found), error),
                },
            };
            Outcome {
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
            }
        })
        .collect()
}
