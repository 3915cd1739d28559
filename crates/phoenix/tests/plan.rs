//! `phoenix plan` and `phoenix apply` against a running `phoenix up`, under load: changes
//! shown with how they apply, exit codes as `terraform plan -detailed-exitcode`, in-place,
//! scale and blue-green changes applied live with no failed request, saved plans applied
//! exactly or refused once the fleet moved, and what needs a restart refused up front.

mod common;

use std::process::Output;

use common::{Fleet, Load, Phoenix, failures, text};
use serde_json::Value;

fn fleet(version: &str, instances: u32) -> Fleet {
    Fleet {
        instances,
        ..Fleet::version(version)
    }
}

fn code(output: &Output) -> Option<i32> {
    output.status.code()
}

#[test]
fn plan_and_apply_change_a_running_fleet_without_a_restart() {
    let phoenix = Phoenix::start(&fleet("v1", 2));
    let load = Load::start(phoenix.proxy_addr(), 4);
    let no_changes = phoenix.cli(&["plan"]);
    assert_eq!(code(&no_changes), Some(0), "{}", text(&no_changes.stderr));
    assert!(text(&no_changes.stdout).contains("No changes"));

    // A size: in place, by scaling.
    phoenix.write_fleet(&fleet("v1", 3));
    let planned = phoenix.cli(&["plan"]);
    assert_eq!(code(&planned), Some(2));
    let shown = text(&planned.stdout);
    assert!(
        shown.contains("~ role web instances: 2 -> 3\n    (in place (scale))"),
        "{shown}"
    );
    let json: Value = serde_json::from_slice(&phoenix.cli(&["plan", "--json"]).stdout).unwrap();
    assert_eq!(json["changes"][0]["how"], "scale", "{json}");
    assert_eq!(json["changes"][0]["old"], "2");
    let applied = phoenix.cli_ok(&["apply", "--auto-approve"]);
    assert!(
        applied.contains("applied 1 change(s)") && applied.contains("1 scaled"),
        "{applied}"
    );
    assert_eq!(phoenix.live_instances().len(), 3);
    assert_eq!(
        code(&phoenix.cli(&["plan"])),
        Some(0),
        "applied means planned away"
    );

    // A recipe: a new generation, blue-green, from a saved plan.
    phoenix.write_fleet(&fleet("v2", 3));
    let saved = phoenix.dir.path().join("v2.plan");
    let planned = phoenix.cli(&["plan", "-o", saved.to_str().unwrap()]);
    assert_eq!(code(&planned), Some(2));
    assert!(text(&planned.stdout).contains("new generation (blue-green)"));
    let applied = phoenix.cli_ok(&["apply", "--plan", saved.to_str().unwrap()]);
    assert!(applied.contains("1 deployed"), "{applied}");
    assert!(common::get_once(phoenix.proxy_addr(), "/").contains("version v2"));

    // A saved plan is refused once the fleet moved under it.
    phoenix.write_fleet(&fleet("v2", 2));
    phoenix.cli(&["plan", "-o", saved.to_str().unwrap()]);
    phoenix.cli_ok(&["scale", "web", "4"]);
    let stale = phoenix.cli(&["apply", "--plan", saved.to_str().unwrap(), "--json"]);
    assert_eq!(code(&stale), Some(1));
    let error: Value = serde_json::from_slice(&stale.stdout).unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the running fleet changed since this plan was made"),
        "{error}"
    );
    assert_eq!(phoenix.live_instances().len(), 4, "nothing applied");

    // Off a terminal, apply asks for --auto-approve and changes nothing.
    let unasked = phoenix.cli(&["apply"]);
    assert_eq!(code(&unasked), Some(1));
    assert!(
        text(&unasked.stderr).contains("--auto-approve"),
        "{}",
        text(&unasked.stderr)
    );
    assert_eq!(phoenix.live_instances().len(), 4);

    // What only a restart can change is refused as a whole, naming it.
    let mut more = fleet("v2", 2);
    more.more = "\n[role.api]\nimage = \"hello\"\nlisten = \"127.0.0.1:0\"\n";
    phoenix.write_fleet(&more);
    let planned = text(&phoenix.cli(&["plan"]).stdout);
    assert!(
        planned.contains("+ role api\n    (restart of phoenix up"),
        "{planned}"
    );
    let refused = phoenix.cli(&["apply", "--auto-approve"]);
    assert_eq!(code(&refused), Some(1));
    assert!(
        text(&refused.stderr).contains("only a restart of `phoenix up` changes role api"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(
        phoenix.live_instances().len(),
        4,
        "the size change was not applied either"
    );

    let samples = load.stop();
    assert!(samples.len() > 100, "{} requests", samples.len());
    assert_eq!(failures(&samples), Vec::<String>::new());
}
