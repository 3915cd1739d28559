//! A deploy's `load_test` end to end: the real binary and hello app, a scenario sent to the new
//! generation's own instances before the switch, real load through the proxy meanwhile. In a
//! file of its own: its 200 requests a second would otherwise run beside the canary test and
//! blur the latencies that test compares.

mod common;

use std::time::Duration;

use common::{Fleet, Load, Phoenix, Sample};

/// A release whose instances answer every `error_percent`-th request with a 500.
fn failing(version: &str, error_percent: u32) -> Fleet {
    let mut fleet = Fleet::version(version);
    fleet.role_keys =
        Box::leak(format!("env = {{ ERROR_PERCENT = \"{error_percent}\" }}\n").into_boxed_str());
    fleet
}

/// Answers of `version`, and the other results (errors or other versions).
fn tally<'a>(samples: &'a [Sample], version: &str) -> (usize, Vec<&'a Result<String, String>>) {
    let mut served = 0;
    let mut other = Vec::new();
    for sample in samples {
        match &sample.result {
            Ok(v) if v == version => served += 1,
            result => other.push(result),
        }
    }
    (served, other)
}

#[test]
fn a_load_test_before_the_switch_stops_a_release_that_fails_its_thresholds() {
    let keys = "load_test = \"load.toml\"\n";
    let mut phoenix = Phoenix::start(&Fleet::version("v1"));
    // 200 rps for 2 s straight to the new generation's instances, before it takes traffic.
    let scenario = "start_rate = 200\n\n[[stage]]\nduration = \"2s\"\ntarget = 200\n\n[[request]]\npath = \"/\"\n\n\
                    [thresholds]\nhttp_req_failed = [\"rate<0.01\"]\nhttp_req_duration = [\"p(99)<2000\"]\n";
    std::fs::write(phoenix.dir().join("load.toml"), scenario).unwrap();
    phoenix.wait_serving(3);
    let load = Load::start(phoenix.proxy_addr(), 4);
    while load.count() < 100 {
        std::thread::sleep(Duration::from_millis(10));
    }

    // A release answering 5 % errors: the load test fails and the switch never happens.
    let mut bad = failing("v2", 5);
    bad.more = keys;
    phoenix.write_fleet(&bad);
    let output = phoenix.cli(&["deploy", "web"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(
        stderr.contains("load test")
            && stderr.contains("failed: http_req_failed rate<0.01 (was 0.0")
            && stderr.contains("generation 1 keeps serving"),
        "{stderr}"
    );
    assert!(
        stdout.contains("load test ")
            && stdout.contains("400 requests over 2s to generation 2 (3 instances"),
        "{stdout}"
    );
    let tests = phoenix.events("deploy.load_test");
    assert_eq!(tests.len(), 1, "{tests:?}");
    let detail = &tests[0]["detail"];
    assert_eq!(
        (detail["passed"].as_bool(), detail["scheduled"].as_u64()),
        (Some(false), Some(400))
    );
    let errors = detail["errors"].as_u64().unwrap();
    // Every instance fails every 20th request it answers: 400 spread over 3 gives 18 to 21.
    assert!((18..=21).contains(&errors), "{detail}");
    assert_eq!(detail["thresholds"][0]["passed"], false);
    assert_eq!(detail["thresholds"][1]["passed"], true);
    assert_eq!(phoenix.status()["roles"][0]["live_generation"], 1);
    let before_good = load.count();

    // A good release passes and is switched to.
    let mut fixed = Fleet::version("v3");
    fixed.more = keys;
    phoenix.write_fleet(&fixed);
    let output = phoenix.cli_ok(&["deploy", "web"]);
    assert!(
        output.contains("ok http_req_failed rate<0.01 (was 0)"),
        "{output}"
    );
    assert!(output.contains("deployed web generation 3"), "{output}");
    std::thread::sleep(Duration::from_millis(300));
    let samples = load.stop();
    let (v1, other) = tally(&samples[..before_good], "v1");
    assert!(
        other.is_empty(),
        "the live generation failed requests: {other:?}"
    );
    assert_eq!(
        v1, before_good,
        "nothing but v1 answered through the proxy before the switch"
    );
    let tests = phoenix.events("deploy.load_test");
    assert_eq!(tests[1]["detail"]["passed"], true);
    assert_eq!(tests[1]["detail"]["errors"], 0);
    assert!(
        samples
            .iter()
            .rev()
            .take(20)
            .all(|s| s.result.as_deref() == Ok("v3"))
    );
}
