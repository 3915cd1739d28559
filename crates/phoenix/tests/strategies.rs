//! Canary and rolling deploys end to end: the real binary, the real hello app (one release of
//! it answering 5 % errors, one never healthy), real load through the proxy, the analysis'
//! figures and the batches read back from the journal.

mod common;

use std::time::Duration;

use common::{Fleet, Load, Phoenix, Sample};
use serde_json::Value;

const CANARY: &str = "strategy = \"canary\"\nsteps = [\"5%\", \"25%\", \"50%\"]\ninterval = \"2s\"\nmin_requests = 100\n";

fn fleet(version: &str, error_percent: u32) -> Fleet {
    let mut fleet = Fleet::version(version);
    fleet.more = CANARY;
    if error_percent > 0 {
        fleet.role_keys = Box::leak(
            format!("env = {{ ERROR_PERCENT = \"{error_percent}\" }}\n").into_boxed_str(),
        );
    }
    fleet
}

/// Responses by what served them: (answers of `version`, 500s of the failing release, others).
fn tally<'a>(samples: &'a [Sample], version: &str) -> (usize, usize, Vec<&'a String>) {
    let (mut served, mut failing, mut other) = (0, 0, Vec::new());
    for sample in samples {
        match &sample.result {
            Ok(v) if v == version => served += 1,
            Ok(_) => {}
            Err(e) if e.starts_with("HTTP/1.1 500") && e.contains("ERROR_PERCENT=5") => {
                failing += 1
            }
            Err(e) => other.push(e),
        }
    }
    (served, failing, other)
}

fn share(figures: &Value) -> f64 {
    let canary = figures["canary_requests"].as_f64().unwrap();
    canary / (canary + figures["live_requests"].as_f64().unwrap())
}

#[test]
fn a_canary_with_five_percent_errors_is_rolled_back_and_a_good_one_is_promoted() {
    let mut phoenix = Phoenix::start(&fleet("v1", 0));
    phoenix.wait_serving(3);
    let load = Load::start(phoenix.proxy_addr(), 4);
    while load.count() < 100 {
        std::thread::sleep(Duration::from_millis(10));
    }

    // A release answering 5 % errors: judged worse at the first step and rolled back.
    phoenix.write_fleet(&fleet("v2", 5));
    let output = phoenix.cli(&["deploy", "web"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the bad canary deploy fails");
    assert!(
        stderr.contains("canary failed at 5% of requests: errors")
            && stderr.contains("generation 1 keeps serving"),
        "{stderr}"
    );
    let failed = phoenix.events("deploy.canary_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    let figures = &failed[0]["detail"]["figures"];
    assert_eq!(failed[0]["detail"]["share_percent"], 5.0);
    assert!(
        figures["canary_requests"].as_u64().unwrap() >= 100,
        "judged on the minimum sample: {figures}"
    );
    let canary_errors = figures["canary_error_percent"].as_f64().unwrap();
    // Each instance fails every 20th request it answers: over ~100 answers spread on three
    // instances, between 2 % and 5 %.
    assert!((2.0..=5.5).contains(&canary_errors), "{figures}");
    assert_eq!(figures["live_error_percent"], 0.0, "{figures}");
    assert!(figures["error_z"].as_f64().unwrap() > 2.326, "{figures}");
    assert!(
        (0.035..=0.065).contains(&share(figures)),
        "5 % of requests: {figures}"
    );
    assert!(phoenix.events("deploy.canary_passed").is_empty());
    let aborted = phoenix.events("deploy.aborted");
    assert!(
        aborted[0]["detail"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("canary failed at 5%"),
        "{aborted:?}"
    );
    let history = phoenix.cli_ok(&["history", "web"]);
    assert!(history.contains("deploy.canary_failed"), "{history}");
    assert_eq!(phoenix.status()["roles"][0]["live_generation"], 1);

    // A good release: every step passes and it is promoted.
    let bad = load.count();
    phoenix.write_fleet(&fleet("v3", 0));
    let output = phoenix.cli_ok(&["deploy", "web"]);
    assert!(output.contains("canary step 3/3 passed"), "{output}");
    assert!(output.contains("deployed web generation 3"), "{output}");
    std::thread::sleep(Duration::from_millis(300));
    let samples = load.stop();

    let (v2_served, v2_failing, other) = tally(&samples[..bad], "v2");
    assert!(
        other.is_empty(),
        "the live generation failed requests: {other:?}"
    );
    let canary_answers = v2_served + v2_failing;
    assert!(
        canary_answers >= 100
            && v2_failing * 100 >= canary_answers * 2
            && v2_failing * 100 <= canary_answers * 7,
        "the canary answered {canary_answers} requests, {v2_failing} of them 500s"
    );
    let (_, failing, other) = tally(&samples[bad..], "v3");
    assert!(
        other.is_empty() && failing == 0,
        "no failed request during the good canary: {other:?}"
    );
    let passed = phoenix.events("deploy.canary_passed");
    let shares: Vec<f64> = passed
        .iter()
        .map(|e| e["detail"]["share_percent"].as_f64().unwrap())
        .collect();
    assert_eq!(shares, [5.0, 25.0, 50.0]);
    for (event, expected) in passed.iter().zip([0.05, 0.25, 0.5]) {
        let figures = &event["detail"]["figures"];
        assert!(
            (share(figures) - expected).abs() < 0.03,
            "{expected}: {figures}"
        );
        assert_eq!(figures["canary_error_percent"], 0.0);
    }
    let last: Vec<_> = samples.iter().rev().take(20).collect();
    assert!(
        last.iter().all(|s| s.result.as_deref() == Ok("v3")),
        "after the promotion every request is v3: {last:?}"
    );
}

fn rolling(version: &str, batches: &'static str) -> Fleet {
    let mut fleet = Fleet::version(version);
    fleet.more = batches;
    fleet
}

#[test]
fn a_rolling_deploy_replaces_one_instance_at_a_time_and_a_failed_one_leaves_the_old_size() {
    let surge = "strategy = \"rolling\"\nmax_surge = 1\nmax_unavailable = 0\n";
    let mut phoenix = Phoenix::start(&rolling("v1", surge));
    phoenix.wait_serving(3);
    let load = Load::start(phoenix.proxy_addr(), 4);
    while load.count() < 100 {
        std::thread::sleep(Duration::from_millis(10));
    }
    phoenix.write_fleet(&rolling("v2", surge));
    let output = phoenix.cli_ok(&["deploy", "web"]);
    assert!(
        output.contains("rolling: 3 of 3 instances on generation 2, 0 of generation 1 left"),
        "{output}"
    );
    let batches: Vec<(u64, u64)> = phoenix
        .events("deploy.batch")
        .iter()
        .map(|e| {
            let d = &e["detail"];
            (d["new"].as_u64().unwrap(), d["old"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(batches, [(1, 2), (2, 1), (3, 0)], "one instance at a time");
    let upgraded = load.count();

    // Never healthy, one old instance taken out first: the failure brings the old size back.
    let mut broken = rolling(
        "v3",
        "strategy = \"rolling\"\nmax_surge = 0\nmax_unavailable = 1\n",
    );
    broken.fail_health = true;
    broken.healthy_timeout = "2s";
    phoenix.write_fleet(&broken);
    let output = phoenix.cli(&["deploy", "web"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("generation 2 keeps serving"), "{stderr}");
    assert_eq!(phoenix.status()["roles"][0]["live_generation"], 2);
    let live = phoenix.live_instances();
    assert_eq!(live.len(), 3, "back to 3 instances: {live:?}");
    std::thread::sleep(Duration::from_millis(300));
    let samples = load.stop();

    let (_, _, failed) = tally(&samples, "v2");
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    let during: Vec<&str> = samples[..upgraded]
        .iter()
        .filter_map(|s| s.result.as_deref().ok())
        .collect();
    let mixed = during.windows(2).any(|w| w[0] != w[1]);
    assert!(mixed && during.contains(&"v1") && during.contains(&"v2"));
    let after: Vec<_> = samples[upgraded..]
        .iter()
        .filter_map(|s| s.result.as_deref().ok())
        .collect();
    assert!(
        after.iter().all(|v| *v == "v2"),
        "v3 never served: {:?}",
        after.iter().find(|v| **v != "v2")
    );
}
