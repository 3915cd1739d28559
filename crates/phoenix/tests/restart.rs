//! `phoenix restart`, SIGHUP and `phoenix upgrade`: Phoenix replaces its own program while its
//! instances keep running and its clients keep being served.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The running `phoenix up`'s own account of itself.
fn up_info(phoenix: &Phoenix) -> Value {
    let answer = phoenix.api_get("/v1/up");
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(body).unwrap()
}

#[test]
fn ten_restarts_and_an_upgrade_under_load_fail_no_request_and_keep_every_instance() {
    let mut phoenix = Phoenix::start(&Fleet::version("v1"));
    let before_pids = processes_under(&phoenix.state());
    assert_eq!(before_pids.len(), 3, "three instances: {before_pids:?}");
    let first = up_info(&phoenix);
    let load = Load::start(phoenix.proxy_addr(), 4);
    std::thread::sleep(Duration::from_millis(300));
    for round in 1..=10 {
        let before = load.count();
        let out = if round % 2 == 0 {
            // SIGHUP does what `phoenix restart` does.
            signal(first["pid"].as_u64().unwrap() as u32, 1);
            wait_for("the restart by SIGHUP", Duration::from_secs(60), || {
                up_info(&phoenix)["restarts"].as_u64() == Some(round)
            });
            String::new()
        } else {
            phoenix.cli_ok(&["restart"])
        };
        if round % 2 == 1 {
            assert!(out.contains("3 of 3 instances kept running"), "{out}");
        }
        wait_for(
            "requests after the restart",
            Duration::from_secs(10),
            || load.count() > before + 20,
        );
    }
    // An upgrade to another binary: a copy, as a package manager would install it.
    let dir = tempfile::tempdir().unwrap();
    let next = dir.path().join("phoenix-next");
    std::fs::copy(phoenix_bin(), &next).unwrap();
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).unwrap();
    let answer: Value =
        serde_json::from_str(&phoenix.cli_ok(&["upgrade", next.to_str().unwrap(), "--json"]))
            .unwrap();
    assert_eq!(answer["binary"], next.to_str().unwrap());
    assert_eq!(answer["restarts"], 11);
    assert_eq!(answer["restart"]["instances_handed"], 3);
    assert_eq!(answer["restart"]["instances_running"], 3);
    let before = load.count();
    wait_for(
        "requests after the upgrade",
        Duration::from_secs(10),
        || load.count() > before + 20,
    );
    let samples = load.stop();
    let failed = failures(&samples);
    eprintln!(
        "{} requests over 10 restarts and an upgrade, {} failed",
        samples.len(),
        failed.len()
    );
    assert!(samples.len() > 500, "the load ran: {}", samples.len());
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(samples.iter().all(|s| s.result.as_deref() == Ok("v1")));

    let now = up_info(&phoenix);
    assert_eq!(now["pid"], first["pid"], "the same process");
    assert_eq!(now["binary"], next.to_str().unwrap());
    assert_eq!(
        processes_under(&phoenix.state()),
        before_pids,
        "the same instance processes"
    );
    let restarted = phoenix.events("up.restarted");
    assert_eq!(restarted.len(), 11, "{restarted:?}");
    assert!(phoenix.events("instance.started").len() == 3);
    // The keep-alive connections of the load were kept, not closed.
    assert_eq!(restarted[10]["detail"]["connections_kept"], 4);

    // Still a fleet that deploys, and Ctrl-C still stops everything.
    phoenix.write_fleet(&Fleet::version("v2"));
    phoenix.cli_ok(&["deploy", "web"]);
    assert!(
        phoenix
            .get(phoenix.proxy_addr(), "/")
            .contains("version v2")
    );
    assert!(phoenix.interrupt().success());
    assert!(
        phoenix.log().contains("stopping everything"),
        "{}",
        phoenix.log()
    );
    assert_eq!(processes_under(&phoenix.state()), Vec::<u32>::new());
}

#[test]
fn an_upgrade_to_a_binary_that_is_not_phoenix_or_that_others_can_change_is_refused_and_ctrl_c_during_a_restart_stops()
 {
    let phoenix = Phoenix::start(&Fleet::version("v1"));
    let pids = processes_under(&phoenix.state());
    let dir = tempfile::tempdir().unwrap();
    let not_phoenix = dir.path().join("true");
    std::fs::copy("/bin/true", &not_phoenix).unwrap();
    let writable = dir.path().join("phoenix-writable");
    std::fs::copy(phoenix_bin(), &writable).unwrap();
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o777)).unwrap();
    let open_dir = dir.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    let in_open_dir = open_dir.join("phoenix");
    std::fs::copy(phoenix_bin(), &in_open_dir).unwrap();
    std::fs::set_permissions(&in_open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    for (binary, why) in [
        (in_open_dir.to_str().unwrap(), "others may replace files in"),
        (not_phoenix.to_str().unwrap(), "not a Phoenix binary"),
        (writable.to_str().unwrap(), "others could change it"),
        ("/nonexistent/phoenix", "no such file"),
    ] {
        let output = phoenix.cli(&["upgrade", binary]);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{binary}: {stderr}");
        assert!(stderr.contains(why), "{binary}: {stderr}");
    }
    // A mistake in the fleet file is found before anything is handed over.
    let good = std::fs::read_to_string(phoenix.fleet_path()).unwrap();
    std::fs::write(
        phoenix.fleet_path(),
        good.replace("instances = 3", "instances = \"three\""),
    )
    .unwrap();
    let output = phoenix.cli(&["restart"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not restarted")
            && stderr.contains("phoenix.toml:")
            && stderr.contains("instances"),
        "{stderr}"
    );
    std::fs::write(phoenix.fleet_path(), good).unwrap();
    // Nothing moved.
    assert_eq!(up_info(&phoenix)["restarts"], 0);
    assert_eq!(processes_under(&phoenix.state()), pids);
    assert!(
        phoenix
            .get(phoenix.proxy_addr(), "/")
            .contains("version v1")
    );

    // Ctrl-C right after SIGHUP, whichever program gets it, stops everything cleanly.
    let mut phoenix = phoenix;
    signal(up_info(&phoenix)["pid"].as_u64().unwrap() as u32, 1);
    std::thread::sleep(Duration::from_millis(10));
    assert!(phoenix.interrupt().success(), "{}", phoenix.log());
    assert_eq!(processes_under(&phoenix.state()), Vec::<u32>::new());
}

/// A POST with a 100-byte body through the role's proxy: the status code.
fn post_100_bytes(phoenix: &Phoenix) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(phoenix.proxy_addr()).unwrap();
    let body = "x".repeat(100);
    let request = format!(
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{body}"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer[9..12].to_string()
}

#[test]
fn proxy_limits_apply_in_place_and_its_mode_with_a_restart() {
    let mut fleet = Fleet::version("v1");
    let phoenix = Phoenix::start(&fleet);
    let pids = processes_under(&phoenix.state());
    assert_eq!(post_100_bytes(&phoenix), "200");

    // A body limit: read per request, applied in place.
    fleet.more = "\n[role.web.proxy]\nmax_body = \"10\"\n";
    phoenix.write_fleet(&fleet);
    let plan = text(&phoenix.cli(&["plan"]).stdout);
    assert!(
        plan.contains("proxy.max_body: 16777216 -> 10") && plan.contains("(in place)"),
        "{plan}"
    );
    phoenix.cli_ok(&["apply", "--auto-approve"]);
    assert_eq!(
        post_100_bytes(&phoenix),
        "413",
        "the new limit holds at once"
    );

    // The mode is the listener's: `apply` refuses it, `phoenix restart` applies it.
    fleet.more = "\n[role.web.proxy]\nmax_body = \"10\"\nmode = \"tcp\"\n";
    phoenix.write_fleet(&fleet);
    let plan = phoenix.cli(&["plan"]);
    assert_eq!(plan.status.code(), Some(2));
    let plan = text(&plan.stdout);
    assert!(
        plan.contains("proxy.mode") && plan.contains("phoenix restart (no request dropped)"),
        "{plan}"
    );
    let apply = phoenix.cli(&["apply", "--auto-approve"]);
    assert_eq!(apply.status.code(), Some(1));
    assert!(
        text(&apply.stderr).contains("`phoenix restart` applies role web proxy.mode"),
        "{}",
        text(&apply.stderr)
    );
    assert_eq!(post_100_bytes(&phoenix), "413");
    phoenix.cli_ok(&["restart"]);
    // Bytes are spliced now: the instance answers, no HTTP limit applies.
    assert_eq!(post_100_bytes(&phoenix), "200");
    let plan = phoenix.cli(&["plan"]);
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan.stdout));
    assert_eq!(
        processes_under(&phoenix.state()),
        pids,
        "no instance replaced"
    );
}
