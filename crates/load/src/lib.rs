//! Open-loop HTTP load from a scenario (`phoenix load`, and a deploy's `load_test`).
//!
//! Requests are sent on a schedule whatever the server does (as wrk2 and k6's arrival-rate
//! executors do, unlike a closed loop that slows down with the server), and each latency is
//! measured from the time the request was due, so a stalled server shows up as latency
//! instead of hiding as fewer requests ("coordinated omission").

#![forbid(unsafe_code)]

mod report;
mod run;
mod scenario;
mod schedule;
mod threshold;

pub use report::{Percentiles, Report, RequestReport, ThresholdResult};
pub use run::{Target, run};
pub use scenario::{RequestSpec, Scenario, ScenarioError, Stage};
pub use schedule::due_times;
pub use threshold::{Threshold, ThresholdError};

/// For `cargo fuzz` (see `fuzz/`) and the seeded test.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    use crate::{Scenario, ScenarioError};

    /// Any bytes as a scenario file: a checked scenario of a bounded size, or an error whose
    /// line is inside the file; never a panic.
    pub fn scenario_file(data: &[u8]) {
        let text = String::from_utf8_lossy(data);
        match Scenario::parse(Path::new("/nonexistent/load.toml"), &text) {
            Ok(scenario) => {
                assert!(scenario.scheduled() <= 10_000_000);
                assert!(!scenario.requests.is_empty() && !scenario.stages.is_empty());
            }
            Err(ScenarioError::Invalid {
                line,
                column,
                message,
                ..
            }) => {
                let lines = text.split('\n').count();
                assert!(
                    (1..=lines).contains(&line),
                    "line {line} of {lines}: {message}"
                );
                assert!(column >= 1 && !message.is_empty());
            }
            Err(ScenarioError::Read { .. }) => {}
        }
    }
}
