//! Blue-green deploys under load, end to end: the real binary, the real hello app, real HTTP.

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, Load, Phoenix, failures, get_once};

fn version_number(version: &str) -> u32 {
    version.trim_start_matches('v').parse().unwrap()
}

#[test]
fn twenty_blue_green_deploys_under_load_fail_no_request_and_switch_to_the_new_version() {
    let phoenix = Phoenix::start(&Fleet::version("v0"));
    let load = Load::start(phoenix.proxy_addr(), 4);
    while load.count() < 50 {
        std::thread::sleep(Duration::from_millis(10));
    }
    // (version, when its deploy command started, when it returned)
    let mut deploys: Vec<(u32, Instant, Instant, usize)> = Vec::new();
    for i in 1..=20 {
        phoenix.write_fleet(&Fleet::version(&format!("v{i}")));
        let (started, before) = (Instant::now(), load.count());
        let output = phoenix.cli_ok(&["deploy", "web"]);
        assert!(
            output.contains(&format!("deployed web generation {}", i + 1)),
            "{output}"
        );
        assert!(
            output.contains("(first request on the new generation "),
            "the switch's reconfiguration latency is reported: {output}"
        );
        deploys.push((i, started, Instant::now(), load.count() - before));
    }
    std::thread::sleep(Duration::from_millis(300));

    // Rolling back serves v19 again, blue-green like any deploy.
    let rollback_started = Instant::now();
    let output = phoenix.cli_ok(&["rollback", "web"]);
    assert!(
        output.contains("rolling back to the image of generation 20"),
        "{output}"
    );
    let rollback_done = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let samples = load.stop();

    let failed = failures(&samples);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        samples.len(),
        &failed[..failed.len().min(5)]
    );
    for (version, started, returned, during) in &deploys {
        assert!(
            *during > 0,
            "no request ran during the deploy of v{version}: the load was not concurrent"
        );
        for sample in samples.iter().filter(|s| s.started < rollback_started) {
            let got = version_number(sample.result.as_ref().unwrap());
            if sample.started >= *returned {
                assert!(
                    got >= *version,
                    "a request sent after the switch to v{version} was answered by v{got}"
                );
            }
            if sample.started < *started {
                assert!(
                    got < *version,
                    "a request sent before the deploy of v{version} was answered by v{got}"
                );
            }
        }
    }
    let after_rollback: Vec<_> = samples
        .iter()
        .filter(|s| s.started >= rollback_done)
        .collect();
    assert!(!after_rollback.is_empty());
    assert!(
        after_rollback
            .iter()
            .all(|s| s.result.as_deref() == Ok("v19")),
        "after the rollback every answer comes from v19"
    );
    println!(
        "{} requests, 0 failed, across 20 deploys and a rollback",
        samples.len()
    );

    let history = phoenix.history();
    let count = |kind: &str| history.iter().filter(|e| e["kind"] == kind).count();
    assert_eq!(
        count("deploy.started"),
        22,
        "first deploy, 20 deploys and the rollback"
    );
    assert_eq!(count("deploy.switched"), 22);
    assert_eq!(count("deploy.finished"), 22);
    assert_eq!(count("deploy.aborted"), 0);
    let last = history
        .iter()
        .rev()
        .find(|e| e["kind"] == "deploy.started")
        .unwrap();
    assert_eq!(last["detail"]["rollback"], true);
}

#[test]
fn a_tcp_mode_role_serves_and_deploys_with_tcp_health_checks() {
    let fleet = Fleet {
        tcp: true,
        drain: "1s",
        ..Fleet::version("v1")
    };
    let phoenix = Phoenix::start(&fleet);
    let addr = phoenix.proxy_addr();
    let answer = get_once(addr, "/");
    assert!(
        answer.ends_with("version v1\n") && !answer.to_ascii_lowercase().contains("via:"),
        "bytes pass untouched: {answer}"
    );
    phoenix.write_fleet(&Fleet {
        version: "v2".into(),
        ..fleet
    });
    let output = phoenix.cli_ok(&["deploy", "web"]);
    assert!(output.contains("deployed web generation 2"), "{output}");
    for _ in 0..5 {
        assert!(get_once(addr, "/").ends_with("version v2\n"));
    }
}

#[test]
fn rollback_skips_generations_of_the_live_image_and_goes_where_it_is_told() {
    let phoenix = Phoenix::start(&Fleet::version("v1"));
    phoenix.write_fleet(&Fleet::version("v2"));
    phoenix.cli_ok(&["deploy", "web"]);
    // The same image again (as `drift --replace` or a redeploy does): generation 3 runs v2.
    let live_image = phoenix.status()["roles"][0]["image"]
        .as_str()
        .unwrap()
        .to_string();
    phoenix.cli_ok(&["deploy", "web", "--image", &live_image]);
    let version = || get_once(phoenix.proxy_addr(), "/");
    assert!(version().contains("version v2"));
    // By default: the newest earlier generation with another image (1, not 2).
    let back = phoenix.cli_ok(&["rollback", "web"]);
    assert!(
        back.contains("rolling back to the image of generation 1"),
        "{back}"
    );
    assert!(version().contains("version v1"), "{}", version());
    // To a generation by number, and to an image by reference.
    let to_two = phoenix.cli_ok(&["rollback", "web", "--to", "2"]);
    assert!(
        to_two.contains("rolling back to the image of generation 2"),
        "{to_two}"
    );
    assert!(version().contains("version v2"));
    let short = &live_image["sha256:".len().."sha256:".len() + 12];
    let refused = phoenix.cli(&["rollback", "web", "--to", short]);
    assert_eq!(refused.status.code(), Some(1));
    let said = common::text(&refused.stderr);
    assert!(
        said.contains("role web already serves") && said.contains("nothing to roll back to"),
        "{said}"
    );
    let missing = phoenix.cli(&["rollback", "web", "--to", "99"]);
    assert!(
        common::text(&missing.stderr).contains("role web has no generation 99 that served"),
        "{}",
        common::text(&missing.stderr)
    );
    let unknown = phoenix.cli(&["rollback", "web", "--to", "nosuch"]);
    assert!(common::text(&unknown.stderr).contains("no image matches \"nosuch\""));
    // Still serving v2 after the refusals.
    assert!(version().contains("version v2"));
}
