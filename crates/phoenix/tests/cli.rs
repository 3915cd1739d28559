//! CLI behaviour that needs no running fleet, and the API's token.

mod common;

use std::process::Command;

use common::{Fleet, Phoenix, phoenix, phoenix_bin, text};

#[test]
fn two_bakes_in_two_places_give_the_same_digest() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(a.path().join("phoenix.toml"), Fleet::version("v1").toml()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    std::fs::write(b.path().join("phoenix.toml"), Fleet::version("v1").toml()).unwrap();
    let bake = |dir: &std::path::Path| {
        let output = phoenix(dir, &["--state", "s", "bake", "--json"]);
        assert!(output.status.success(), "{}", text(&output.stderr));
        let outcomes: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        outcomes[0]["digest"].as_str().unwrap().to_string()
    };
    let digest = bake(a.path());
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    assert_eq!(bake(b.path()), digest);

    let images: serde_json::Value =
        serde_json::from_slice(&phoenix(a.path(), &["--state", "s", "images", "--json"]).stdout)
            .unwrap();
    assert_eq!(images[0]["digest"], digest.as_str());
    assert_eq!(images[0]["name"], "hello");
    let index = std::fs::read_to_string(a.path().join("s/images/index.json")).unwrap();
    assert!(
        index.contains(&digest) && index.contains("org.opencontainers.image.ref.name"),
        "{index}"
    );

    let later = Command::new(phoenix_bin())
        .args(["--state", "s", "bake", "--json"])
        .current_dir(a.path())
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    let later: serde_json::Value = serde_json::from_slice(&later.stdout).unwrap();
    assert_ne!(
        later[0]["digest"],
        digest.as_str(),
        "SOURCE_DATE_EPOCH is part of the image"
    );
}

#[test]
fn config_errors_name_file_line_column_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = Fleet::version("v1")
        .toml()
        .replace("instances = 3", "instancs = 3");
    std::fs::write(dir.path().join("bad.toml"), &bad).unwrap();
    let line = bad.lines().position(|l| l.starts_with("instancs")).unwrap() + 1;
    for args in [
        &["up", "-f", "bad.toml"][..],
        &["bake", "-f", "bad.toml"][..],
    ] {
        let output = phoenix(dir.path(), args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let stderr = text(&output.stderr);
        let expected = format!(
            "error: bad.toml:{line}:1: [role.web] key `instancs`: unknown field `instancs`"
        );
        assert!(stderr.starts_with(&expected), "{args:?}: {stderr}");
    }
    let missing = phoenix(dir.path(), &["up", "-f", "nope.toml"]);
    assert!(
        text(&missing.stderr).contains("cannot read fleet file nope.toml"),
        "{}",
        text(&missing.stderr)
    );
    let usage = phoenix(dir.path(), &["deploy"]);
    assert_eq!(usage.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn commands_without_a_running_phoenix_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let output = phoenix(dir.path(), &["--state", "s", "status"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("no `phoenix up` is running for state directory s"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn phoenix_up_refuses_a_damaged_state_and_says_how_to_recover() {
    let mut first = Phoenix::start(&Fleet {
        instances: 1,
        ..Fleet::version("v1")
    });
    assert!(first.interrupt().success());
    let sound = phoenix(first.dir.path(), &["--state", "state", "state", "check"]);
    assert!(sound.status.success(), "{}", text(&sound.stderr));
    assert!(
        text(&sound.stdout).ends_with("state.db: ok\n"),
        "{}",
        text(&sound.stdout)
    );
    let db = first.state().join("state.db");
    let mut bytes = std::fs::read(&db).unwrap();
    for (i, byte) in bytes.iter_mut().enumerate().skip(4096) {
        *byte = (i % 251) as u8;
    }
    std::fs::write(&db, &bytes).unwrap();
    let output = phoenix(
        first.dir.path(),
        &["--state", "state", "up", "-f", "phoenix.toml"],
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("state.db is damaged (") && stderr.contains("move it aside"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&db).unwrap(),
        bytes,
        "the damaged file is kept as it was"
    );
    let damaged = phoenix(first.dir.path(), &["--state", "state", "state", "check"]);
    assert_eq!(damaged.status.code(), Some(1));
    assert!(
        text(&damaged.stderr).contains("state.db is damaged ("),
        "{}",
        text(&damaged.stderr)
    );
}

#[test]
fn a_second_phoenix_up_on_the_same_state_is_refused() {
    let first = Phoenix::start(&Fleet {
        instances: 1,
        ..Fleet::version("v1")
    });
    let output = phoenix(
        first.dir.path(),
        &["--state", "state", "up", "-f", "phoenix.toml"],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("another `phoenix up` is running"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn metrics_are_exposed_per_role_and_instance_on_the_api() {
    let phoenix = Phoenix::start(&Fleet {
        instances: 2,
        ..Fleet::version("v1")
    });
    let proxy = phoenix.proxy_addr();
    for _ in 0..10 {
        let answer = common::get_once(proxy, "/");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let answer = phoenix.api_get("/metrics");
    assert!(
        answer.contains("content-type: text/plain; version=0.0.4"),
        "{answer}"
    );
    assert!(
        answer.contains("phoenix_role_responses_total{role=\"web\",class=\"2xx\"} 10"),
        "{answer}"
    );
    assert!(
        answer.contains("phoenix_role_live_generation{role=\"web\"} 1"),
        "{answer}"
    );
    let per_instance: u64 = answer
        .lines()
        .filter(|l| {
            l.starts_with("phoenix_backend_responses_total{") && l.contains("class=\"2xx\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(
        per_instance, 10,
        "the instances' counts add up to the role's"
    );
    assert_eq!(answer.matches("phoenix_instance_healthy{").count(), 2);
    assert!(
        answer
            .lines()
            .filter(|l| l.starts_with("phoenix_instance_healthy{"))
            .all(|l| l.ends_with(" 1"))
    );
}

#[test]
fn commands_find_the_state_and_the_agent_from_any_subdirectory() {
    let phoenix = Phoenix::start(&Fleet {
        instances: 1,
        ..Fleet::version("v1")
    });
    // `.phoenix` beside the fleet file is where the walk up ends (here, the harness's state).
    std::os::unix::fs::symlink("state", phoenix.dir.path().join(".phoenix")).unwrap();
    let deep = phoenix.dir.path().join("src/app/deeper");
    std::fs::create_dir_all(&deep).unwrap();
    let run = |args: &[&str]| {
        let output = Command::new(phoenix_bin())
            .args(args)
            .current_dir(&deep)
            .env_remove("PHOENIX_STATE")
            .env_remove("SERF_RPC_ADDR")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            text(&output.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let status = run(&["status", "--json"]);
    assert_eq!(status["roles"][0]["name"], "web");
    assert_eq!(status["roles"][0]["live_generation"], 1);
    // The agent's RPC address is random; `members` reads it from the state directory.
    let rpc = std::fs::read_to_string(phoenix.state().join("rpc.addr")).unwrap();
    assert_ne!(rpc.trim(), "127.0.0.1:7373");
    let members = run(&["members", "--json"]);
    let names: Vec<&str> = members
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["tags"]["role"].as_str().unwrap_or("host"))
        .collect();
    assert!(names.contains(&"web"), "{members}");
    // And the fleet file: `bake` from the subdirectory bakes the recipe above it.
    let baked = run(&["bake", "--json"]);
    assert!(baked.to_string().contains("sha256:"), "{baked}");
}

#[test]
fn bash_completes_commands_and_values_and_man_renders_the_pages() {
    let dir = tempfile::tempdir().unwrap();
    let script = phoenix(dir.path(), &["completions", "bash"]);
    assert!(script.status.success());
    std::fs::write(dir.path().join("phoenix.bash"), &script.stdout).unwrap();
    // Real bash, as a shell's completion would call it.
    let complete = |words: &str, current: usize| {
        let output = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source ./phoenix.bash; COMP_WORDS=({words}); COMP_CWORD={current}; \
                 _phoenix phoenix \"${{COMP_WORDS[{current}]}}\" \"${{COMP_WORDS[{}]}}\"; \
                 echo \"${{COMPREPLY[@]}}\"",
                current - 1
            ))
            .current_dir(dir.path())
            .output()
            .unwrap();
        text(&output.stdout).trim().to_string()
    };
    assert_eq!(complete("phoenix dep", 1), "deploy");
    assert_eq!(complete("phoenix roll", 1), "rollback");
    assert!(complete("phoenix completions ''", 2).contains("bash elvish fish powershell zsh"));
    // Man pages: one per command, that man(1) renders.
    let pages = dir.path().join("man");
    let wrote = phoenix(dir.path(), &["man", "--dir", pages.to_str().unwrap()]);
    assert!(wrote.status.success(), "{}", text(&wrote.stderr));
    assert!(pages.join("phoenix.1").exists() && pages.join("phoenix-deploy.1").exists());
    if std::path::Path::new("/usr/bin/man").exists() {
        let rendered = Command::new("man")
            .arg("-l")
            .arg(pages.join("phoenix-deploy.1"))
            .env("MANPAGER", "cat")
            .env("COLUMNS", "100")
            .output()
            .unwrap();
        let shown = text(&rendered.stdout);
        assert!(
            shown.contains("phoenix-deploy") && shown.contains("blue-green"),
            "{shown}"
        );
    }
    // Options a command does not use are not offered to it.
    let status = phoenix(dir.path(), &["status", "--log", "debug"]);
    assert_eq!(status.status.code(), Some(2));
}

#[test]
fn json_failures_are_objects_on_stdout_and_unknown_roles_name_the_known_ones() {
    let phoenix = Phoenix::start(&Fleet {
        instances: 1,
        ..Fleet::version("v1")
    });
    let failed = |args: &[&str]| {
        let output = phoenix.cli(args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&output.stdout)));
        (
            answer["error"]["kind"].as_str().unwrap().to_string(),
            answer["error"]["message"].as_str().unwrap().to_string(),
        )
    };
    for args in [
        &["deploy", "wbe", "--json"][..],
        &["rollback", "wbe", "--json"],
        &["scale", "wbe", "2", "--json"],
        &["history", "wbe", "--json"],
    ] {
        let (kind, message) = failed(args);
        assert_eq!(kind, "not_found", "{args:?}: {message}");
        assert!(
            message.contains("\"wbe\"") && message.contains("web"),
            "{args:?}: {message}"
        );
    }
    let (kind, _) = failed(&["protect", "web-000000", "--json"]);
    assert_eq!(kind, "not_found");
    // Without a running `phoenix up`.
    let elsewhere = tempfile::tempdir().unwrap();
    let output = common::phoenix(elsewhere.path(), &["status", "--json"]);
    assert_eq!(output.status.code(), Some(1));
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["error"]["kind"], "not_running", "{answer}");
    // Successes: the documented keys.
    let instance = phoenix.live_instances()[0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let protect: serde_json::Value =
        serde_json::from_str(&phoenix.cli_ok(&["protect", &instance, "--json"])).unwrap();
    assert_eq!(protect["instance"], instance.as_str());
    assert_eq!(protect["protected"], true);
    assert_eq!(protect["standby"], false);
    let json_of = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&phoenix.cli_ok(args)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    };
    let checked = json_of(&["state", "check", "--json"]);
    assert_eq!(checked["ok"], true, "{checked}");
    let archive = phoenix.dir.path().join("web.tar");
    let exported = json_of(&["export", "hello", "-o", archive.to_str().unwrap(), "--json"]);
    assert_eq!(exported["ref"], "hello:latest", "{exported}");
    assert!(exported["digest"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(
        exported["size"].as_u64().unwrap(),
        std::fs::metadata(&archive).unwrap().len()
    );
    let tagged = json_of(&["tags", "--set", "zone=a", "--json"]);
    assert_eq!(tagged["set"]["zone"], "a", "{tagged}");
    let fired = json_of(&["event", "deployed", "v1", "--json"]);
    assert_eq!(fired["event"], "deployed", "{fired}");
    common::wait_for("a sample", std::time::Duration::from_secs(10), || {
        let top: serde_json::Value =
            serde_json::from_str(&phoenix.cli_ok(&["top", "--json"])).unwrap();
        top["at"].is_string() && top["roles"]["web"]["instances"][&instance].is_object()
    });
}
