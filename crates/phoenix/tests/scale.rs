//! `phoenix scale`, `protect` and `standby` on a running fleet under load: scale-out waits
//! for health, scale-in drains and never picks a protected or standby instance, standby takes
//! an instance out of traffic, and the size outlives a restart and sizes the next deploy.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::{Fleet, Load, Phoenix, failures};
use serde_json::Value;

/// The instance names that answer `count` fresh connections through the proxy.
fn answering(proxy: SocketAddr, count: usize) -> BTreeSet<String> {
    (0..count)
        .map(|_| {
            let response = common::get_once(proxy, "/");
            // "hello from web-3f9a1c version v1"
            let body = response.rsplit("\r\n\r\n").next().unwrap();
            body.split_whitespace().nth(2).unwrap().to_string()
        })
        .collect()
}

/// The live generation's instances: (name, protected, standby), oldest first.
fn live_instances(phoenix: &Phoenix) -> Vec<(String, bool, bool)> {
    let mut instances = phoenix.live_instances();
    instances.sort_by_key(|i| std::cmp::Reverse(i["uptime_ms"].as_u64().unwrap()));
    instances
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_string(),
                i["protected"].as_bool().unwrap(),
                i["standby"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn scale_protect_and_standby_under_load() {
    let mut fleet = Fleet::version("v1");
    fleet.instances = 2;
    let mut phoenix = Phoenix::start(&fleet);
    let proxy = phoenix.proxy_addr();
    let load = Load::start(proxy, 4);

    let report: Value =
        serde_json::from_str(&phoenix.cli_ok(&["scale", "web", "4", "--json"])).unwrap();
    assert_eq!(
        (report["from"].as_u64(), report["to"].as_u64()),
        (Some(2), Some(4))
    );
    assert_eq!(report["started"].as_array().unwrap().len(), 2);
    let instances = live_instances(&phoenix);
    assert_eq!(instances.len(), 4);
    assert_eq!(phoenix.status()["roles"][0]["desired_instances"], 4);
    assert_eq!(answering(proxy, 40).len(), 4, "all four serve");

    // Keep the oldest for investigation, and take the second out of traffic.
    let (oldest, second) = (instances[0].0.clone(), instances[1].0.clone());
    phoenix.cli_ok(&["protect", &oldest]);
    phoenix.cli_ok(&["standby", &second]);
    let serving = answering(proxy, 40);
    assert!(!serving.contains(&second), "{serving:?}");
    assert_eq!(serving.len(), 3);

    // Scale-in may only take the other two.
    let report: Value =
        serde_json::from_str(&phoenix.cli_ok(&["scale", "web", "2", "--json"])).unwrap();
    let stopped: BTreeSet<String> = report["stopped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    let expected: BTreeSet<String> = instances[2..].iter().map(|i| i.0.clone()).collect();
    assert_eq!(stopped, expected);
    let left = live_instances(&phoenix);
    assert_eq!(
        left,
        vec![(oldest.clone(), true, false), (second.clone(), false, true)]
    );
    let refused = phoenix.cli(&["scale", "web", "1"]);
    assert!(!refused.status.success());
    let message = common::text(&refused.stderr);
    assert!(
        message.contains("only 0 of 2 instances may be removed"),
        "{message}"
    );
    let zero = phoenix.cli(&["scale", "web", "0"]);
    assert!(common::text(&zero.stderr).contains("at least 1"));

    // Back from standby: it serves again.
    phoenix.cli_ok(&["standby", &second, "--off"]);
    assert_eq!(answering(proxy, 30).len(), 2);
    let samples = load.stop();
    assert!(samples.len() > 100);
    assert_eq!(failures(&samples), Vec::<String>::new());

    let kinds: Vec<String> = phoenix
        .history()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    for kind in ["role.scaled", "instance.protect", "instance.standby"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }

    // The size outlives a restart, and the next deploy is sized to it.
    assert!(phoenix.interrupt().success());
    phoenix.restart(2);
    common::wait_for("the restart to finish", Duration::from_secs(20), || {
        phoenix.status()["roles"][0]["deploying"] == false
    });
    fleet.version = "v2".into();
    phoenix.write_fleet(&fleet);
    let deployed: Value =
        serde_json::from_str(&phoenix.cli_ok(&["deploy", "web", "--json"])).unwrap();
    assert_eq!(deployed["instances"], 2);
    // A changed `instances` in the file wins over the size set by hand.
    fleet.instances = 3;
    fleet.version = "v3".into();
    phoenix.write_fleet(&fleet);
    let deployed: Value =
        serde_json::from_str(&phoenix.cli_ok(&["deploy", "web", "--json"])).unwrap();
    assert_eq!(deployed["instances"], 3);
}
