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

    // A role added, moved to another port and removed, live, while web serves under load.
    let port = |p: u16| {
        let mut more = fleet("v2", 2);
        more.more = Box::leak(
            format!(
                "\n[role.api]\nimage = \"hello\"\nlisten = \"127.0.0.1:{p}\"\nnetwork = \"host\"\n"
            )
            .into_boxed_str(),
        );
        more
    };
    let (first, second) = (
        phoenix_driver::test_util::free_port(),
        phoenix_driver::test_util::free_port(),
    );
    phoenix.write_fleet(&port(first));
    let planned = text(&phoenix.cli(&["plan"]).stdout);
    assert!(
        planned.contains("+ role api\n    (start: new listener, first generation)"),
        "{planned}"
    );
    assert!(
        planned.contains("~ role web instances: 3 (now 4, set by `phoenix scale`) -> 2"),
        "{planned}"
    );
    let added = phoenix.cli_ok(&["apply", "--auto-approve"]);
    assert!(added.contains("role api added"), "{added}");
    let api = std::net::SocketAddr::from(([127, 0, 0, 1], first));
    assert!(common::get_once(api, "/").contains("hello from api-"));
    assert_eq!(
        phoenix.live_instances().len(),
        2,
        "web scaled back to the file's 2"
    );
    let api_load = Load::start(api, 2);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let api_samples = api_load.stop();
    assert!(api_samples.len() > 10, "{}", api_samples.len());
    assert_eq!(failures(&api_samples), Vec::<String>::new());
    phoenix.write_fleet(&port(second));
    let planned = text(&phoenix.cli(&["plan"]).stdout);
    assert!(
        planned.contains(&format!(
            "~ role api listen: 127.0.0.1:{first} -> 127.0.0.1:{second}"
        )),
        "{planned}"
    );
    let moved = phoenix.cli_ok(&["apply", "--auto-approve"]);
    assert!(
        moved.contains(&format!("role api moved to 127.0.0.1:{second}")),
        "{moved}"
    );
    let moved_to = std::net::SocketAddr::from(([127, 0, 0, 1], second));
    assert!(common::get_once(moved_to, "/").contains("hello from api-"));
    assert!(
        std::net::TcpStream::connect(api).is_err(),
        "the old port is closed"
    );
    phoenix.write_fleet(&fleet("v2", 2));
    let removed = phoenix.cli_ok(&["apply", "--auto-approve"]);
    assert!(removed.contains("role api removed"), "{removed}");
    assert!(std::net::TcpStream::connect(moved_to).is_err());
    let status = phoenix.status();
    assert_eq!(status["roles"].as_array().unwrap().len(), 1, "{status}");
    let journal: Value =
        serde_json::from_str(&phoenix.cli_ok(&["history", "api", "--json", "--limit", "1000"]))
            .unwrap();
    let kinds: Vec<String> = journal
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    for kind in ["role.added", "role.moved", "role.removed"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }

    let samples = load.stop();
    assert!(samples.len() > 100, "{} requests", samples.len());
    assert_eq!(failures(&samples), Vec::<String>::new());
}
