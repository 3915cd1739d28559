//! Review fleets end to end: two copies of the example beside the main fleet (one from the
//! fleet's directory, one from a git branch), each serving its own version on its own port,
//! torn down by hand or by their ttl without a trace.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Fleet, Phoenix, get_once};
use serde_json::Value;

fn version_at(addr: SocketAddr) -> String {
    let answer = get_once(addr, "/");
    answer.trim().rsplit(' ').next().unwrap().to_string()
}

/// `review ls --json`: name → (state, role web's address).
fn reviews(phoenix: &Phoenix) -> Vec<(String, String, Option<SocketAddr>)> {
    let listed: Value = serde_json::from_str(&phoenix.cli_ok(&["review", "ls", "--json"])).unwrap();
    listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let addr = r["roles"]["web"].as_str().map(|a| a.parse().unwrap());
            (
                r["name"].as_str().unwrap().into(),
                r["state"].as_str().unwrap().into(),
                addr,
            )
        })
        .collect()
}

/// The pids of a review's instances, from its own state.
fn instance_pids(phoenix: &Phoenix, name: &str) -> Vec<u32> {
    let state = phoenix.state().join("reviews").join(name).join("state");
    let out = std::process::Command::new(common::phoenix_bin())
        .arg("--state")
        .arg(&state)
        .args(["status", "--json"])
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    status["roles"][0]["generations"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_u64().unwrap() as u32)
        .collect()
}

fn gone(pids: &[u32]) -> bool {
    pids.iter()
        .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

fn git(dir: &Path, args: &[&str]) {
    let status = std::process::Command::new("git")
        .args(["-c", "user.email=t@t", "-c", "user.name=t"])
        .arg("-C")
        .arg(dir)
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

/// Burns every review left when the test ends, passed or not: a review is a detached process
/// that would outlive the test.
struct BurnAll(std::path::PathBuf);

impl Drop for BurnAll {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.0.join("reviews")) else {
            return;
        };
        for entry in entries.flatten() {
            let _ = std::process::Command::new(common::phoenix_bin())
                .arg("--state")
                .arg(&self.0)
                .args(["review", "down"])
                .arg(entry.file_name())
                .output();
        }
    }
}

#[test]
fn review_fleets_serve_their_own_versions_beside_the_main_one_and_leave_no_trace() {
    let mut phoenix = Phoenix::start(&Fleet::version("v1"));
    let _burn = BurnAll(phoenix.state());
    phoenix.wait_serving(3);
    let main = phoenix.proxy_addr();
    // A branch `feature` whose fleet file says v3, the working tree v2.
    let dir = phoenix.dir().to_path_buf();
    std::fs::write(dir.join(".gitignore"), "state/\n").unwrap();
    git(&dir, &["init", "-q", "-b", "main"]);
    phoenix.write_fleet(&Fleet::version("v3"));
    git(&dir, &["checkout", "-q", "-b", "feature"]);
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-q", "-m", "v3"]);
    git(&dir, &["checkout", "-q", "--detach"]);
    phoenix.write_fleet(&Fleet::version("v2"));

    let up = phoenix.cli_ok(&["review", "up", "pr-2"]);
    assert!(
        up.contains("review pr-2 is up") && up.contains("role web: http://127.0.0.1:"),
        "{up}"
    );
    let up = phoenix.cli_ok(&[
        "review", "up", "feature", "--from", "feature", "--ttl", "1h",
    ]);
    assert!(up.contains("from feature ("), "{up}");
    let listed = reviews(&phoenix);
    let names: Vec<(&str, &str)> = listed
        .iter()
        .map(|(n, s, _)| (n.as_str(), s.as_str()))
        .collect();
    assert_eq!(names, [("feature", "up"), ("pr-2", "up")]);
    let (feature, pr) = (listed[0].2.unwrap(), listed[1].2.unwrap());
    assert!(feature != main && pr != main && feature != pr);
    // Each answers with its own version; the main fleet still serves v1.
    for _ in 0..6 {
        assert_eq!(version_at(main), "v1");
        assert_eq!(version_at(pr), "v2");
        assert_eq!(version_at(feature), "v3");
    }
    assert_eq!(phoenix.status()["roles"][0]["live_generation"], 1);

    // Mistakes are refused with the reason.
    for (args, says) in [
        (vec!["review", "up", "pr-2"], "review pr-2 is up already"),
        (
            vec!["review", "up", "PR_2"],
            "write 1 to 32 lowercase letters",
        ),
        (
            vec!["review", "up", "x", "--from", "no-such-branch"],
            "neither a directory nor a branch",
        ),
        (
            vec!["review", "down", "pr-3"],
            "no review fleet \"pr-3\" (review fleets: feature, pr-2)",
        ),
    ] {
        let out = phoenix.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }

    // Down by hand: its instances stopped, its port closed, its directory gone.
    let pids = instance_pids(&phoenix, "pr-2");
    assert_eq!(pids.len(), 3);
    let down = phoenix.cli_ok(&["review", "down", "pr-2"]);
    assert!(down.contains("instances stopped"), "{down}");
    assert!(gone(&pids), "{pids:?}");
    assert!(std::net::TcpStream::connect(pr).is_err());
    assert!(!phoenix.state().join("reviews/pr-2").exists());

    // Idle past its ttl, and only then, it burns itself: requests for twice the ttl keep it.
    phoenix.cli_ok(&["review", "up", "idle", "--ttl", "2s"]);
    let pids = instance_pids(&phoenix, "idle");
    let addr = reviews(&phoenix)
        .into_iter()
        .find(|r| r.0 == "idle")
        .and_then(|r| r.2)
        .unwrap();
    let busy_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < busy_until {
        assert_eq!(version_at(addr), "v2");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(phoenix.state().join("reviews/idle").exists());
    let deadline = Instant::now() + Duration::from_secs(30);
    while phoenix.state().join("reviews/idle").exists() {
        assert!(Instant::now() < deadline, "the idle review is still there");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(gone(&pids), "{pids:?}");

    phoenix.cli_ok(&["review", "down", "feature"]);
    assert!(std::net::TcpStream::connect(feature).is_err());
    let left: Vec<_> = std::fs::read_dir(phoenix.state().join("reviews"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(
        phoenix.cli_ok(&["review", "ls"]).trim(),
        "no review fleets (phoenix review up NAME starts one)"
    );
    assert_eq!(version_at(main), "v1");
}
