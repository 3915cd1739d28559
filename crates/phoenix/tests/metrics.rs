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
                .filter(|p| p["sum"].as_f64().unwrap() > 0.0)
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
    let after = series(&phoenix, "rps");
    assert!(after.len() >= 3, "{after:?}");
}
