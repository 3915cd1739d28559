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
    wait_for("back to one instance", Duration::from_secs(40), || {
        live_size(&phoenix).0 == 1
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
