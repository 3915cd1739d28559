//! The autoscaler on a running fleet: a load step makes the role scale out (target tracking
//! on requests per instance), with no failed request; when the load stops, the role scales
//! back in one instance at a time after the stabilization window; every decision is in the
//! journal with its reason.

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, Load, Phoenix, failures, wait_for};

fn live_size(phoenix: &Phoenix) -> (usize, usize) {
    let instances = phoenix.live_instances();
    let healthy = instances
        .iter()
        .filter(|i| i["status"] == "healthy")
        .count();
    (instances.len(), healthy)
}

#[test]
fn a_load_step_scales_out_and_the_quiet_scales_back_in() {
    let mut fleet = Fleet::version("v1");
    fleet.instances = 1;
    fleet.autoscale = Some(
        "min = 1\nmax = 3\nmetric = \"rps_per_instance\"\ntarget = 20\ninterval = \"500ms\"\n\
         window = \"1s\"\nwarmup = \"1s\"\nstabilization = \"3s\"\n",
    );
    let phoenix = Phoenix::start(&fleet);
    let load = Load::start(phoenix.proxy_addr(), 4);
    let step = Instant::now();
    wait_for("three healthy instances", Duration::from_secs(30), || {
        live_size(&phoenix) == (3, 3)
    });
    eprintln!(
        "load step to the third instance serving: {:?}",
        step.elapsed()
    );
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.stop();
    assert!(samples.len() > 100);
    assert_eq!(failures(&samples), Vec::<String>::new());

    let quiet = Instant::now();
    // The scale is journaled after it is done: wait for both.
    let scaled_to_one = || {
        let scaled = phoenix.events("autoscale.scaled");
        scaled.last().is_some_and(|e| e["detail"]["to"] == 1)
    };
    wait_for("back to one instance", Duration::from_secs(40), || {
        live_size(&phoenix).0 == 1 && scaled_to_one()
    });
    assert!(
        quiet.elapsed() >= Duration::from_secs(3),
        "scale-in waited for the stabilization window"
    );
    let scaled = phoenix.events("autoscale.scaled");
    // The history is oldest first.
    let steps: Vec<(u64, u64)> = scaled
        .iter()
        .map(|e| {
            (
                e["detail"]["from"].as_u64().unwrap(),
                e["detail"]["to"].as_u64().unwrap(),
            )
        })
        .collect();
    let ins: Vec<&(u64, u64)> = steps.iter().filter(|(from, to)| to < from).collect();
    assert_eq!(ins, [&(3, 2), &(2, 1)], "one at a time: {steps:?}");
    assert!(steps.iter().any(|(from, to)| to > from), "{steps:?}");
    let reason = scaled.last().unwrap()["detail"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("rps") && reason.contains("target 20"),
        "{reason}"
    );
    // The quiet first held scale-in back: the stabilization window, with its reason.
    let held = phoenix.events("autoscale.held");
    assert!(!held.is_empty());
    let why = held[0]["detail"]["reason"].as_str().unwrap();
    assert!(why.contains("stabilization window"), "{why}");
}

#[test]
fn the_autoscaler_never_shrinks_a_role_during_a_deploy() {
    let mut fleet = Fleet::version("v1");
    fleet.instances = 3;
    fleet.healthy_timeout = "5s";
    fleet.autoscale = Some(
        "min = 1\nmax = 3\nmetric = \"rps_per_instance\"\ntarget = 20\ninterval = \"300ms\"\n\
         window = \"1s\"\nwarmup = \"300ms\"\nstabilization = \"1s\"\n",
    );
    let phoenix = Phoenix::start(&fleet);
    // A deploy that holds the role's lock for 5 s: its instances never get healthy.
    let mut broken = fleet.clone();
    broken.version = "v2".into();
    broken.fail_health = true;
    phoenix.write_fleet(&broken);
    let aborted = phoenix.cli(&["deploy", "web"]);
    assert!(!aborted.status.success());
    // With no load the role wants 1 instance; the deploy kept it at 3 until it ended.
    wait_for(
        "the scale-in after the deploy",
        Duration::from_secs(30),
        || live_size(&phoenix).0 == 1,
    );
    let history = phoenix.history();
    let at = |kind: &str| {
        history
            .iter()
            .find(|e| e["kind"] == kind)
            .map(|e| phoenix_image::parse_rfc3339_ms(e["at"].as_str().unwrap()).unwrap())
            .unwrap()
    };
    let (started, ended) = (at("deploy.started"), at("deploy.aborted"));
    assert!(ended - started >= 4_000, "the deploy held the lock");
    for event in phoenix.events("autoscale.scaled") {
        let (from, to) = (
            event["detail"]["from"].as_u64(),
            event["detail"]["to"].as_u64(),
        );
        let when = phoenix_image::parse_rfc3339_ms(event["at"].as_str().unwrap()).unwrap();
        assert!(
            to >= from || when < started || when > ended,
            "a scale-in during the deploy: {event}"
        );
    }
}
