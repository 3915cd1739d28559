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
