//! `phoenix logs`: instances' output captured line by line into the log store, kept after
//! the instances (and `phoenix up`) are gone, followed across a restart and a deploy.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn logs_by_role_outlive_instances_restarts_and_phoenix_up() {
    let mut phoenix = Phoenix::start(&Fleet::version("v1"));
    let first = json_lines(&phoenix.cli_ok(&["logs", "web", "--json"]));
    let listening: Vec<&Value> = first
        .iter()
        .filter(|l| l["text"].as_str().unwrap().contains("version v1 listening"))
        .collect();
    assert_eq!(listening.len(), 3, "{first:?}");
    for line in &listening {
        assert_eq!(line["stream"], "stdout");
        assert_eq!(line["generation"], 1);
        assert_eq!(line["image"].as_str().unwrap().len(), 12);
        let text = line["text"].as_str().unwrap();
        let instance = line["instance"].as_str().unwrap();
        assert!(text.starts_with(&format!("hello {instance} ")), "{text}");
        assert!(line["at"].as_str().unwrap().ends_with('Z'));
    }

    // A follower, across a restart of Phoenix and a deploy.
    let mut follower = Command::new(phoenix_bin())
        .arg("--state")
        .arg(phoenix.state())
        .args(["logs", "web", "-f", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::<Value>::new()));
    let reader = {
        let (seen, stdout) = (seen.clone(), follower.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                seen.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
            }
        })
    };
    phoenix.cli_ok(&["restart"]);
    phoenix.write_fleet(&Fleet::version("v2"));
    phoenix.cli_ok(&["deploy", "web"]);
    let count = |seen: &[Value], generation: i64, text: &str| {
        seen.iter()
            .filter(|l| l["generation"] == generation && l["text"].as_str().unwrap().contains(text))
            .count()
    };
    wait_for(
        "the follower to see the deploy",
        Duration::from_secs(20),
        || {
            let seen = seen.lock().unwrap();
            count(&seen, 2, "version v2 listening") == 3 && count(&seen, 1, "SIGTERM") == 3
        },
    );
    follower.kill().unwrap();
    follower.wait().unwrap();
    reader.join().unwrap();

    // Filters: a generation, a pattern, one instance.
    let second = json_lines(&phoenix.cli_ok(&["logs", "web", "--generation", "2", "--json"]));
    assert_eq!(second.len(), 3, "{second:?}");
    let stopped =
        json_lines(&phoenix.cli_ok(&["logs", "web", "--grep", "SIGTERM|stopped", "--json"]));
    assert_eq!(stopped.len(), 6, "{stopped:?}");
    assert!(stopped.iter().all(|l| l["generation"] == 1));
    let one = second[0]["instance"].as_str().unwrap().to_string();
    let mine = json_lines(&phoenix.cli_ok(&["logs", &one, "--json"]));
    assert!(!mine.is_empty() && mine.iter().all(|l| l["instance"] == one.as_str()));

    // A crash journals the instance's last lines and where to see more.
    let victim = phoenix.live_instances()[0].clone();
    let name = victim["name"].as_str().unwrap().to_string();
    signal(victim["pid"].as_u64().unwrap() as u32, 9);
    wait_for("the death in the journal", Duration::from_secs(10), || {
        !phoenix.events("instance.died").is_empty()
    });
    let died = &phoenix.events("instance.died")[0]["detail"];
    assert_eq!(died["logs"], format!("phoenix logs {name}"));
    assert_eq!(died["log_position"]["segment"], 1, "{died}");
    let offset = died["log_position"]["offset"].as_u64().unwrap() as usize;
    let segment = std::fs::read(phoenix.state().join("logs/store/web/0000000001.jsonl")).unwrap();
    let before = String::from_utf8_lossy(&segment[..offset]);
    assert!(
        before.ends_with('\n') && before.contains(&format!("\"instance\":\"{name}\"")),
        "the position follows the instance's lines"
    );
    assert!(
        died["log_tail"][0]
            .as_str()
            .unwrap()
            .contains("version v2 listening"),
        "{died}"
    );

    // Without `phoenix up`, from the store: the last lines of the instances it stopped too.
    assert!(phoenix.interrupt().success());
    let after = phoenix.cli_ok(&["logs", "web", "-n", "3"]);
    assert_eq!(after.lines().count(), 3, "{after}");
    assert!(after.contains("hello: stopped"), "{after}");
    let wrong = phoenix.cli(&["logs", "wbe"]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        text(&wrong.stderr)
            .contains("no logs of a role or instance \"wbe\" (roles with logs: web)"),
        "{}",
        text(&wrong.stderr)
    );
}
