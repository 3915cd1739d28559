//! `[role.X.deploy] load_test`: a `phoenix load` scenario run against the new generation's
//! instances while it is healthy but takes no traffic; its thresholds (or, without any, a
//! single failed request) stop the deploy, and the figures go to the journal.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use phoenix_load::{Report, Scenario, Target};
use serde_json::json;

use crate::controller::{Generation, Inner};
use crate::deploy::Progress;

/// The scenario at `path`, read as the deploy starts (so a broken file stops it before
/// anything boots).
pub(crate) fn read(path: &Path) -> Result<Scenario, String> {
    Scenario::load(path).map_err(|e| format!("load test: {e}"))
}

/// Sends `scenario` to every instance of `generation`; Err names the failed thresholds.
pub(crate) async fn run(
    inner: &Arc<Inner>,
    role: &str,
    generation: &Generation,
    path: &Path,
    scenario: &Scenario,
    deploy: i64,
    progress: &Progress,
) -> Result<(), String> {
    let addrs: Vec<SocketAddr> = generation
        .instances()
        .iter()
        .map(|i| i.backend.addr)
        .collect();
    if addrs.is_empty() {
        return Err("load test: the new generation has no instances".into());
    }
    progress.say(format!(
        "load test {}: {} requests over {:?} to generation {} ({} instances, no traffic yet)",
        path.display(),
        scenario.scheduled(),
        scenario.duration(),
        generation.id,
        addrs.len()
    ));
    let target = Target {
        host: addrs[0].to_string(),
        addrs,
    };
    let report = phoenix_load::run(scenario, &target).await;
    let failed = report.failures();
    say(progress, &report);
    let detail = json!({
        "deploy": deploy, "generation": generation.id, "file": path, "passed": failed.is_empty(),
        "scheduled": report.scheduled, "ok": report.ok, "errors": report.errors,
        "error_kinds": report.error_kinds, "achieved_rps": report.achieved_rps,
        "latency_ms": report.latency_ms, "thresholds": report.thresholds,
    });
    inner.journal(Some(role), "deploy.load_test", detail).await;
    if failed.is_empty() {
        return Ok(());
    }
    Err(format!(
        "load test {} failed: {}",
        path.display(),
        failed.join("; ")
    ))
}

fn say(progress: &Progress, report: &Report) {
    let l = &report.latency_ms;
    progress.say(format!(
        "load test: {} ok, {} errors, p50 {:.2} ms, p99 {:.2} ms, {:.1} rps",
        report.ok, report.errors, l.p50, l.p99, report.achieved_rps
    ));
    for t in &report.thresholds {
        let mark = if t.passed { "ok" } else { "FAILED" };
        progress.say(format!("  {mark} {} (was {})", t.threshold, t.was()));
    }
}
