//! Role metrics that outlive instances: per-instance samples every second, rolled up per role
//! into 10-second and 1-minute points, kept in `STATE/metrics.db` (SQLite) with retention:
//! raw samples 1 hour, 10-second points 7 days, 1-minute points 90 days. A role's history is
//! keyed by the role, so it stays when every instance it had is gone.

mod db;
pub mod logs;
pub mod ship;

pub use db::{MetricsDb, Point, Resolution, Sample};

/// Everything that can go wrong with the metrics database.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("metrics database {path}: {cause}")]
    Sql {
        path: String,
        cause: rusqlite::Error,
    },
    #[error("unknown metric {0:?}: one of cpu, memory, rps, errors, in_flight, p50_ms, p99_ms")]
    UnknownMetric(String),
}

/// The metrics Phoenix records, per instance and per role.
pub const METRICS: &[&str] = &[
    "cpu",
    "memory",
    "rps",
    "errors",
    "in_flight",
    "p50_ms",
    "p99_ms",
];
