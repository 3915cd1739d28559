//! Phoenix servers and chaos on a running fleet under load: `max_age` renews every instance,
//! new before old, and `[role.web.chaos]` kills instances that the crash replacement brings
//! back; neither fails a request.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Fleet, Load, Phoenix, failures, wait_for};

fn names(phoenix: &Phoenix) -> BTreeSet<String> {
    phoenix.status()["roles"][0]["generations"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn max_age_renews_every_instance_new_before_old() {
    let mut fleet = Fleet::version("v1");
    fleet.instances = 2;
    fleet.role_keys = "max_age = \"2s\"\n";
    let phoenix = Phoenix::start(&fleet);
    let first = names(&phoenix);
    let load = Load::start(phoenix.proxy_addr(), 4);
    wait_for(
        "both first instances renewed",
        Duration::from_secs(30),
        || names(&phoenix).is_disjoint(&first) && phoenix.events("instance.renewed").len() >= 2,
    );
    let samples = load.stop();
    assert!(samples.len() > 100);
    assert_eq!(failures(&samples), Vec::<String>::new());
    let renewed = phoenix.events("instance.renewed");
    let old: BTreeSet<String> = renewed
        .iter()
        .map(|e| e["detail"]["instance"].as_str().unwrap().to_string())
        .collect();
    assert!(first.is_subset(&old), "{renewed:?}");
    assert!(
        renewed
            .iter()
            .all(|e| e["detail"]["age_s"].as_u64().unwrap() >= 2)
    );
    assert_eq!(names(&phoenix).len(), 2);
}

#[test]
fn chaos_kills_are_replaced_without_a_failed_request() {
    let mut fleet = Fleet::version("v1");
    fleet.instances = 3;
    fleet.more = "\n[role.web.chaos]\nevery = \"400ms\"\nmin_healthy = 2\n";
    let phoenix = Phoenix::start(&fleet);
    let load = Load::start(phoenix.proxy_addr(), 4);
    wait_for("three chaos kills", Duration::from_secs(30), || {
        phoenix.events("chaos.killed").len() >= 3
    });
    let samples = load.stop();
    assert!(samples.len() > 100);
    assert_eq!(failures(&samples), Vec::<String>::new());
    for kill in phoenix.events("chaos.killed") {
        assert!(
            kill["detail"]["healthy_before"].as_u64().unwrap() > 2,
            "{kill}"
        );
    }
    wait_for("replacements", Duration::from_secs(20), || {
        phoenix.events("instance.replaced").len() >= 3
    });
}
