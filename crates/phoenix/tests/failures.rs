//! Failures end to end: a deploy that never gets healthy, a crashed instance, a crashed Phoenix.

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, Load, Phoenix, failures, processes_under, signal};

#[test]
fn an_unhealthy_generation_is_destroyed_and_the_live_one_keeps_serving() {
    let phoenix = Phoenix::start(&Fleet::version("v1"));
    let load = Load::start(phoenix.proxy_addr(), 3);
    let broken = Fleet {
        fail_health: true,
        healthy_timeout: "2s",
        ..Fleet::version("v2")
    };
    phoenix.write_fleet(&broken);
    let output = phoenix.cli(&["deploy", "web"]);
    assert_eq!(output.status.code(), Some(1), "a failed deploy exits 1");
    let stderr = common::text(&output.stderr);
    assert!(
        stderr.contains("deploy of web aborted (generation 1 keeps serving)"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "not healthy within 2s: last health check: GET /healthz: 503 Service Unavailable"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("last lines of") && stderr.contains("version v2 listening"),
        "the log tail is shown: {stderr}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let samples = load.stop();
    assert!(
        failures(&samples).is_empty(),
        "requests failed: {:?}",
        failures(&samples)
    );
    assert!(
        samples.iter().all(|s| s.result.as_deref() == Ok("v1")),
        "only v1 ever answered"
    );

    let status = phoenix.status();
    let role = &status["roles"][0];
    assert_eq!(role["live_generation"], 1);
    assert_eq!(
        role["generations"].as_array().unwrap().len(),
        1,
        "the aborted generation is gone"
    );
    assert_eq!(
        processes_under(&phoenix.state()).len(),
        3,
        "the aborted instances were stopped"
    );
    let history = phoenix.history();
    let aborted = history
        .iter()
        .find(|e| e["kind"] == "deploy.aborted")
        .expect("deploy.aborted journaled");
    assert!(
        aborted["detail"]["reason"]
            .as_str()
            .unwrap()
            .contains("503")
    );
}

#[test]
fn a_killed_instance_is_replaced_and_traffic_continues() {
    let phoenix = Phoenix::start(&Fleet::version("v1"));
    let load = Load::start(phoenix.proxy_addr(), 3);
    std::thread::sleep(Duration::from_millis(200));
    let status = phoenix.status();
    let victim = status["roles"][0]["generations"][0]["instances"][0].clone();
    let victim_name = victim["name"].as_str().unwrap().to_string();
    signal(victim["pid"].as_u64().unwrap() as u32, 9);

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = phoenix.status();
        let instances = status["roles"][0]["generations"][0]["instances"]
            .as_array()
            .unwrap()
            .clone();
        let healthy = instances
            .iter()
            .filter(|i| i["status"] == "healthy")
            .count();
        if healthy == 3 && instances.iter().all(|i| i["name"] != victim_name.as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{victim_name} was not replaced: {instances:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = load.count();
    std::thread::sleep(Duration::from_millis(300));
    assert!(load.count() > before, "traffic continues");
    let samples = load.stop();
    assert!(
        failures(&samples).is_empty(),
        "requests failed: {:?}",
        failures(&samples)
    );

    let history = phoenix.history();
    let died = history
        .iter()
        .find(|e| e["kind"] == "instance.died")
        .expect("instance.died journaled");
    assert_eq!(died["detail"]["instance"], victim_name.as_str());
    assert_eq!(died["detail"]["exit"], "killed by signal 9");
    let replaced = history
        .iter()
        .find(|e| e["kind"] == "instance.replaced")
        .expect("instance.replaced journaled");
    assert_eq!(replaced["detail"]["instance"], victim_name.as_str());
}

#[test]
fn kill_9_of_phoenix_mid_deploy_is_recovered_on_restart() {
    let mut phoenix = Phoenix::start(&Fleet::version("v1"));
    // A deploy that will wait for health for a long time: Phoenix is killed while it waits.
    phoenix.write_fleet(&Fleet {
        fail_health: true,
        healthy_timeout: "60s",
        ..Fleet::version("v2")
    });
    let mut deploy = std::process::Command::new(common::phoenix_bin())
        .arg("--state")
        .arg(phoenix.state())
        .args(["deploy", "web"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while processes_under(&phoenix.state()).len() < 6 {
        assert!(
            Instant::now() < deadline,
            "the new generation never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before: Vec<u32> = processes_under(&phoenix.state());
    phoenix.kill9();
    let _ = deploy.wait();
    std::thread::sleep(Duration::from_millis(200));

    phoenix.write_fleet(&Fleet::version("v1"));
    phoenix.restart(3);
    let now = processes_under(&phoenix.state());
    assert_eq!(
        now.len(),
        3,
        "exactly the live generation's instances run: {now:?}"
    );
    assert!(
        before.iter().all(|pid| !now.contains(pid)),
        "no process of the killed Phoenix survived"
    );

    let status = phoenix.status();
    let role = &status["roles"][0];
    assert_eq!(
        role["live_generation"], 1,
        "the generation that was live is live again"
    );
    assert_eq!(role["generations"].as_array().unwrap().len(), 1);
    let load = Load::start(phoenix.proxy_addr(), 2);
    std::thread::sleep(Duration::from_millis(300));
    let samples = load.stop();
    assert!(
        !samples.is_empty() && samples.iter().all(|s| s.result.as_deref() == Ok("v1")),
        "v1 serves"
    );

    let history = phoenix.history();
    let kinds: Vec<&str> = history
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for kind in [
        "deploy.started",
        "deploy.interrupted",
        "instance.lost",
        "up.recovered",
        "role.restarted",
    ] {
        assert!(
            kinds.contains(&kind),
            "{kind} missing from the journal: {kinds:?}"
        );
    }
    assert_eq!(
        kinds.iter().filter(|k| **k == "instance.lost").count(),
        6,
        "both generations' instances were accounted for"
    );

    // The interrupted deploy's generation never serves again, and a new deploy works.
    phoenix.write_fleet(&Fleet::version("v3"));
    let output = phoenix.cli_ok(&["deploy", "web"]);
    assert!(output.contains("deployed web generation 3"), "{output}");
}

#[test]
fn ctrl_c_drains_and_stops_everything() {
    let mut phoenix = Phoenix::start(&Fleet::version("v1"));
    assert_eq!(processes_under(&phoenix.state()).len(), 3);
    let status = phoenix.interrupt();
    assert!(
        status.success(),
        "phoenix up exits 0 after Ctrl-C: {status:?}"
    );
    assert!(
        processes_under(&phoenix.state()).is_empty(),
        "no instance is left running"
    );
    assert!(!phoenix.state().join("api.sock").exists());
    let history = phoenix.history();
    assert_eq!(history.last().unwrap()["kind"], "up.stopped");
    assert_eq!(
        history
            .iter()
            .filter(|e| e["kind"] == "instance.stopped")
            .count(),
        3
    );
}
