//! Role metrics on a running fleet under load: per-second samples in `metrics.db`, read by
//! `phoenix metrics` and `phoenix top`, kept after `phoenix up` stops, and instance CPU and
//! memory on the Prometheus endpoint.

mod common;

use std::time::Duration;

use common::{Fleet, Load, Phoenix, failures, wait_for};
use serde_json::Value;

fn series(phoenix: &Phoenix, metric: &str) -> Vec<Value> {
    let output = phoenix.cli_ok(&[
        "metrics", "web", "--metric", metric, "--since", "1m", "--json",
    ]);
    serde_json::from_str::<Value>(&output)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn role_metrics_are_sampled_every_second_and_outlive_the_fleet() {
    let mut fleet = Fleet::version("v1");
    fleet.instances = 2;
    let mut phoenix = Phoenix::start(&fleet);
    let load = Load::start(phoenix.proxy_addr(), 4);
    wait_for(
        "three seconds of traffic in metrics.db",
        Duration::from_secs(30),
        || {
            series(&phoenix, "rps")
                .iter()
                .filter(|p| p["role"].as_f64().unwrap_or(0.0) > 0.0)
                .count()
                >= 3
        },
    );
    // Memory: each instance takes 16 MiB more than it had; the role's sum is their total.
    for instance in phoenix.live_instances() {
        let addr: std::net::SocketAddr = instance["address"].as_str().unwrap().parse().unwrap();
        assert!(common::get_once(addr, "/alloc/16").contains("holding 16 MiB"));
    }
    let mut last = Value::Null;
    wait_for(
        "16 MiB per instance in metrics.db",
        Duration::from_secs(10),
        || {
            last = series(&phoenix, "memory")
                .last()
                .cloned()
                .unwrap_or_default();
            last["avg"].as_f64().unwrap_or(0.0) >= 16.0 * 1048576.0
        },
    );
    assert_eq!(last["n"], 2, "{last}");
    let (sum, avg) = (last["sum"].as_f64().unwrap(), last["avg"].as_f64().unwrap());
    assert!(
        avg < 64.0 * 1048576.0 && (sum - 2.0 * avg).abs() < 1.0,
        "{last}"
    );
    let cpu = series(&phoenix, "cpu");
    assert!(!cpu.is_empty() && cpu.iter().all(|p| p["avg"].as_f64().unwrap() >= 0.0));
    assert!(!series(&phoenix, "p99_ms").is_empty());
    let unknown = phoenix.cli(&["metrics", "web", "--metric", "cpus"]);
    assert!(common::text(&unknown.stderr).contains("unknown metric \"cpus\""));
    for command in [
        &["metrics", "wbe", "--metric", "rps"][..],
        &["top", "wbe", "--once"],
    ] {
        let unknown = phoenix.cli(command);
        assert_eq!(unknown.status.code(), Some(1));
        assert!(
            common::text(&unknown.stderr).contains("no role \"wbe\" in the metrics (roles: web)"),
            "{}",
            common::text(&unknown.stderr)
        );
    }

    let top = phoenix.cli_ok(&["top", "--once"]);
    let status = phoenix.status();
    for instance in status["roles"][0]["generations"][0]["instances"]
        .as_array()
        .unwrap()
    {
        let name = instance["name"].as_str().unwrap();
        assert!(top.contains(name), "{top}");
    }
    assert!(top.contains("role web:") && top.contains("rps"), "{top}");

    let exposition = phoenix.api_get("/metrics");
    assert!(
        exposition.contains("phoenix_instance_memory_bytes{role=\"web\",instance=\"")
            && exposition.contains("phoenix_instance_cpu_cores{role=\"web\",instance=\""),
        "{exposition}"
    );
    let samples = load.stop();
    assert_eq!(failures(&samples), Vec::<String>::new());

    // The role's history stays when its instances and Phoenix are gone.
    assert!(phoenix.interrupt().success());
    // Every background task (loops, samplers, replacements) ended before `up` did.
    let stopped = phoenix
        .history()
        .into_iter()
        .rfind(|e| e["kind"] == "up.stopped")
        .expect("up.stopped journaled");
    assert_eq!(stopped["detail"]["tasks_left"], 0, "{stopped}");
    let after = series(&phoenix, "rps");
    assert!(after.len() >= 3, "{after:?}");
}

/// The mean of `field` over the points from second `from` to `to` of the series.
fn mean(points: &[Value], field: &str, from: usize, to: usize) -> f64 {
    let values: Vec<f64> = points[from..to]
        .iter()
        .map(|p| {
            p[field]
                .as_f64()
                .unwrap_or_else(|| panic!("{field} in {p}"))
        })
        .collect();
    values.iter().sum::<f64>() / values.len() as f64
}

#[test]
fn a_known_open_loop_load_is_counted_once_for_the_role_and_across_its_instances() {
    let mut fleet = Fleet::version("v1");
    fleet.instances = 3;
    let phoenix = Phoenix::start(&fleet);
    // 50 requests a second on schedule (open loop), for 14 s.
    let url = format!("http://{}/", phoenix.proxy_addr());
    let load = std::process::Command::new(common::phoenix_bin())
        .args(["load", &url, "--rps", "50", "--duration", "14s", "--json"])
        .output();
    let load = load.unwrap();
    let report: Value = serde_json::from_slice(&load.stdout).unwrap();
    assert_eq!(report["errors"], 0, "{report}");
    // Let the last second be sampled.
    std::thread::sleep(Duration::from_millis(1500));
    let rps = series(&phoenix, "rps");
    let busy: Vec<Value> = rps
        .iter()
        .filter(|p| p["role"].as_f64().unwrap_or(0.0) > 1.0)
        .cloned()
        .collect();
    assert!(busy.len() >= 12, "{rps:?}");
    // The steady middle (not the first or last second, which are partly idle).
    let (from, to) = (2, busy.len() - 2);
    let role = mean(&busy, "role", from, to);
    let instances = mean(&busy, "sum", from, to);
    assert!(
        (45.0..=55.0).contains(&role),
        "the proxy saw {role} rps: {busy:?}"
    );
    assert!(
        (45.0..=55.0).contains(&instances),
        "the instances together saw {instances} rps, not twice it: {busy:?}"
    );
    assert!(busy[from..to].iter().all(|p| p["n"] == 3), "{busy:?}");
    let per_instance = mean(&busy, "avg", from, to);
    assert!((13.0..=20.0).contains(&per_instance), "{per_instance}");
    // Percentiles: the role's from its merged histogram, never a sum of instances' values.
    let p99 = series(&phoenix, "p99_ms");
    let with_role: Vec<&Value> = p99.iter().filter(|p| p["role"].is_number()).collect();
    assert!(with_role.len() >= 10, "{p99:?}");
    assert!(p99.iter().all(|p| p["sum"].is_null()), "{p99:?}");
    let role_p99 = with_role[with_role.len() / 2]["role"].as_f64().unwrap();
    assert!(role_p99 > 0.0 && role_p99 < 1000.0, "{role_p99}");
    // The table shows the proxy's view and the instances' sum side by side.
    let table = phoenix.cli_ok(&["metrics", "web", "--metric", "p99_ms", "--since", "1m"]);
    assert!(
        table.contains("ROLE") && table.contains("INSTANCES SUM"),
        "{table}"
    );
}
