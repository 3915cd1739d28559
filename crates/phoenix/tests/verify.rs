//! `phoenix verify` end to end: on the host, on a throwaway instance of an image, as a health
//! endpoint; and the deploy gate on a running `phoenix up`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The CLI in `dir` with its state in `dir/state`.
fn phoenix(dir: &std::path::Path, args: &[&str]) -> Output {
    common::phoenix(dir, &[&["--state", "state"], args].concat())
}

#[test]
fn verify_host_reports_in_every_format_with_goss_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("pass.yaml"),
        "file:\n  /:\n    exists: true\n    filetype: directory\n",
    )
    .unwrap();
    std::fs::write(
        d.join("fail.yaml"),
        "file:\n  /:\n    exists: true\n  /phoenix-nonexistent:\n    exists: true\n",
    )
    .unwrap();
    std::fs::write(
        d.join("bad.yaml"),
        "file:\n  /:\n    exists: true\n    colour: red\n",
    )
    .unwrap();
    std::fs::write(d.join("vars.yaml"), "root: /\n").unwrap();
    std::fs::write(
        d.join("templated.yaml"),
        "file:\n  \"{{.Vars.root}}\":\n    exists: true\n",
    )
    .unwrap();

    // goss's default format is rspecish: a mark per attribute, then the counts.
    let pass = phoenix(d, &["verify", "--host", "pass.yaml"]);
    assert_eq!(pass.status.code(), Some(0), "{}", text(&pass.stderr));
    let out = text(&pass.stdout);
    assert!(out.starts_with("..\n\nTotal Duration: "), "{out}");
    assert!(out.contains("Count: 2, Failed: 0, Skipped: 0"), "{out}");
    assert!(!out.contains('\x1b'), "no colors off a terminal: {out:?}");
    let documented = phoenix(
        d,
        &["verify", "--host", "pass.yaml", "--format", "documentation"],
    );
    assert!(
        text(&documented.stdout).contains("File: /: filetype: matches expectation: \"directory\""),
        "{}",
        text(&documented.stdout)
    );

    // nagios: CRITICAL is exit 2, as a Nagios plugin's; -o takes goss's format options.
    let nagios = phoenix(
        d,
        &[
            "verify",
            "--host",
            "fail.yaml",
            "--format",
            "nagios",
            "-o",
            "perfdata",
        ],
    );
    assert_eq!(nagios.status.code(), Some(2), "{}", text(&nagios.stderr));
    assert!(
        text(&nagios.stdout).starts_with("GOSS CRITICAL - Count: 2, Failed: 1, Skipped: 0"),
        "{}",
        text(&nagios.stdout)
    );
    let typo = phoenix(d, &["verify", "--host", "pass.yaml", "-o", "prety"]);
    assert_eq!(typo.status.code(), Some(2));
    assert!(text(&typo.stderr).contains("unknown format option \"prety\""));
    prometheus_text_parses(d);

    let fail = phoenix(d, &["verify", "--host", "fail.yaml", "--format", "json"]);
    assert_eq!(fail.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&fail.stdout).unwrap();
    assert_eq!(json["summary"]["failed-count"], 1);
    for (format, marker) in [
        ("junit", "<testsuite"),
        ("tap", "not ok 2 - "),
        ("rspecish", ".F\n"),
    ] {
        let output = phoenix(d, &["verify", "--host", "fail.yaml", "--format", format]);
        assert_eq!(output.status.code(), Some(1), "{format}");
        assert!(
            text(&output.stdout).contains(marker),
            "{format}: {}",
            text(&output.stdout)
        );
    }
    let silent = phoenix(d, &["verify", "--host", "fail.yaml", "--format", "silent"]);
    assert_eq!((silent.status.code(), silent.stdout.len()), (Some(1), 0));

    let bad = phoenix(d, &["verify", "--host", "bad.yaml"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("bad.yaml:4:5: unknown attribute \"colour\" of file"),
        "{}",
        text(&bad.stderr)
    );

    // A relative glob include from a file named without a directory, and an empty include
    // (an empty document checks nothing; it is not an error), as goss takes them.
    std::fs::write(d.join("main.yaml"), "gossfile:\n  \"*.inc.yaml\": {}\n").unwrap();
    std::fs::write(d.join("a.inc.yaml"), "file:\n  /:\n    exists: true\n").unwrap();
    std::fs::write(d.join("b.inc.yaml"), "# nothing yet\n").unwrap();
    let included = phoenix(d, &["verify", "--host", "main.yaml"]);
    assert_eq!(
        included.status.code(),
        Some(0),
        "{}",
        text(&included.stderr)
    );
    assert!(text(&included.stdout).contains("Count: 1, Failed: 0"));

    let templated = phoenix(
        d,
        &["verify", "--host", "templated.yaml", "--vars", "vars.yaml"],
    );
    assert_eq!(
        templated.status.code(),
        Some(0),
        "{}",
        text(&templated.stderr)
    );
    let missing = phoenix(d, &["verify", "--host", "templated.yaml"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        text(&missing.stderr).contains("templated.yaml:2:1: no key \"root\""),
        "{}",
        text(&missing.stderr)
    );
    // Several --vars files merge key by key, and --vars-inline wins over them (as goss).
    std::fs::write(d.join("other.yaml"), "root: /nonexistent-root\n").unwrap();
    let layered = |extra: &[&str]| {
        let args = [
            &["verify", "--host", "templated.yaml", "--vars", "vars.yaml"][..],
            extra,
        ]
        .concat();
        phoenix(d, &args).status.code()
    };
    assert_eq!(
        layered(&["--vars", "other.yaml"]),
        Some(1),
        "the later file's root"
    );
    assert_eq!(
        layered(&["--vars", "other.yaml", "--vars-inline", "{\"root\": \"/\"}"]),
        Some(0),
        "inline wins"
    );

    // --retry-timeout: a file that appears while the checks retry.
    let late = d.join("late");
    std::fs::write(
        d.join("late.yaml"),
        format!("file:\n  {}:\n    exists: true\n", late.display()),
    )
    .unwrap();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        std::fs::write(late, "").unwrap();
    });
    let retried = phoenix(
        d,
        &[
            "verify",
            "--host",
            "late.yaml",
            "--retry-timeout",
            "20s",
            "--sleep",
            "100ms",
            "--format",
            "json",
        ],
    );
    writer.join().unwrap();
    assert_eq!(retried.status.code(), Some(0), "{}", text(&retried.stdout));
    let json: Value = serde_json::from_slice(&retried.stdout).unwrap();
    // The file appeared after the first try: only a retry can pass.
    assert_eq!(json["summary"]["failed-count"], 0, "{json}");
}

/// `--format prometheus` is Prometheus's text format: promtool reads it and finds only the
/// naming advice goss's own metric names get (they are goss's, kept as they are).
fn prometheus_text_parses(d: &std::path::Path) {
    if !std::path::Path::new("/usr/bin/promtool").exists() {
        assert!(
            std::env::var_os("PHOENIX_REQUIRE_TOOLS").is_none(),
            "PHOENIX_REQUIRE_TOOLS is set but promtool is missing"
        );
        eprintln!("skipped: promtool is not installed (apt-get install prometheus)");
        return;
    }
    let metrics = phoenix(
        d,
        &[
            "verify",
            "--host",
            "fail.yaml",
            "--format",
            "prometheus",
            "-o",
            "verbose",
        ],
    );
    assert_eq!(metrics.status.code(), Some(1));
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(&metrics.stdout)
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    let findings = text(&checked.stdout) + &text(&checked.stderr);
    // 3: lint findings only; 1 would be a text it cannot parse.
    assert_eq!(checked.status.code(), Some(3), "{findings}");
    for line in findings.lines() {
        assert!(
            line.contains("should have \"_total\" suffix") || line.contains("use base unit"),
            "{line}"
        );
    }
    assert!(
        text(&metrics.stdout).contains(
            "goss_tests_outcomes_total{outcome=\"fail\",resource_id=\"/phoenix-nonexistent\",type=\"file\"} 1"
        ),
        "{}",
        text(&metrics.stdout)
    );
}

/// GET `path` with an `Accept` header; returns status, content type and body.
fn get(addr: std::net::SocketAddr, path: &str, accept: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or("")
        .to_string();
    (status, content_type, body.to_string())
}

#[test]
fn verify_serve_is_a_health_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("ready");
    let checks = dir.path().join("health.yaml");
    std::fs::write(
        &checks,
        format!("file:\n  {}:\n    exists: true\n", flag.display()),
    )
    .unwrap();
    let log = dir.path().join("serve.log");
    let mut child = Command::new(phoenix_bin())
        .args(["verify", "serve"])
        .arg(&checks)
        .args(["--listen", "127.0.0.1:0", "--cache", "300ms"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr = addr_in_log(&log, "on http://");

    let (status, content_type, body) = get(addr, "/healthz", "*/*");
    assert_eq!(status, 503, "{body}");
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert!(body.contains("Count: 1, Failed: 1"), "{body}");
    std::fs::write(&flag, "").unwrap();
    // The cached failure is served until the cache expires, then the checks run again.
    wait_for("a passing result", Duration::from_secs(10), || {
        get(addr, "/healthz", "*/*").0 == 200
    });
    let (status, content_type, body) = get(addr, "/healthz", "application/json");
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["summary"]["failed-count"], 0);
    let (_, _, tap) = get(addr, "/healthz", "application/vnd.goss-tap");
    assert!(tap.starts_with("1..1\nok 1 - "), "{tap}");
    assert_eq!(get(addr, "/other", "*/*").0, 404);
    let _ = child.kill();
    let _ = child.wait();
}

const PASSING: &str = "file:\n  /bin/hello:\n    exists: true\nport:\n  tcp:{{.Env.PORT}}:\n    listening: true\nhttp:\n  http://127.0.0.1:{{.Env.PORT}}/:\n    status: 200\n    body: [\"version {{.Env.VERSION}}\"]\n";

#[test]
fn verify_image_boots_a_throwaway_instance_and_records_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    Fleet {
        checks: Some(PASSING.into()),
        ..Fleet::version("v1")
    }
    .write_to(d);
    let pass = phoenix(d, &["verify", "hello", "--format", "json"]);
    assert_eq!(
        pass.status.code(),
        Some(0),
        "{}\n{}",
        text(&pass.stdout),
        text(&pass.stderr)
    );
    let json: Value = serde_json::from_slice(&pass.stdout).unwrap();
    assert_eq!(json["summary"]["test-count"], 4);
    assert!(
        text(&pass.stderr).contains("verification passed"),
        "{}",
        text(&pass.stderr)
    );
    // The throwaway instance is gone.
    assert!(
        processes_under(&d.join("state")).is_empty(),
        "{:?}",
        processes_under(&d.join("state"))
    );

    Fleet {
        checks: Some(PASSING.replace("version {{.Env.VERSION}}", "version v9")),
        ..Fleet::version("v1")
    }
    .write_to(d);
    let fail = phoenix(d, &["verify", "hello"]);
    assert_eq!(fail.status.code(), Some(1), "{}", text(&fail.stderr));
    assert!(
        text(&fail.stdout).contains("body:\nExpected\n"),
        "{}",
        text(&fail.stdout)
    );

    let history = phoenix(d, &["history", "--json"]);
    let history: Value = serde_json::from_slice(&history.stdout).unwrap();
    let verified: Vec<&Value> = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "image.verified")
        .collect();
    assert_eq!(verified.len(), 2, "{history:#}");
    assert_eq!(
        (
            verified[0]["detail"]["passed"].clone(),
            verified[1]["detail"]["passed"].clone()
        ),
        (true.into(), false.into())
    );
    assert_eq!(verified[1]["detail"]["failed"], 1);

    std::fs::write(d.join("checks.yaml"), "port:\n  tcp:nope: {}\n").unwrap();
    let bad = phoenix(d, &["verify", "hello"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("checks.yaml:2:3: bad port"),
        "{}",
        text(&bad.stderr)
    );
    let none = Fleet::version("v1");
    none.write_to(d);
    let no_checks = phoenix(d, &["verify", "hello"]);
    assert!(
        text(&no_checks.stderr).contains("has no `checks = \"PATH\"`"),
        "{}",
        text(&no_checks.stderr)
    );
}

#[test]
fn deploys_refuse_images_that_did_not_pass_their_checks() {
    let fleet = Fleet {
        checks: Some(PASSING.into()),
        instances: 2,
        ..Fleet::version("v1")
    };
    let phoenix = Phoenix::start(&fleet);
    let live_image = |p: &Phoenix| {
        p.status()["roles"][0]["generations"][0]["image"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let v1 = live_image(&phoenix);
    // `up`'s first deploy verified v1 before booting it.
    let first = phoenix
        .history()
        .into_iter()
        .find(|e| e["kind"] == "image.verified")
        .expect("v1 verified");
    assert_eq!(first["detail"]["passed"], true);

    // A fresh bake whose checks fail is verified, refused, and v1 keeps serving.
    phoenix.write_fleet(&Fleet {
        checks: Some(PASSING.replace("version {{.Env.VERSION}}", "version v1")),
        ..Fleet::version("v2")
    });
    let load = Load::start(phoenix.proxy_addr(), 2);
    let refused = phoenix.cli(&["deploy", "web"]);
    assert!(!refused.status.success());
    let message = text(&refused.stderr);
    assert!(
        message.contains("cannot be deployed: its verification failed 1 of 4 checks"),
        "{message}"
    );
    assert!(
        message.contains("HTTP: http://127.0.0.1:") && message.contains("body: doesn't match"),
        "{message}"
    );
    // The cause in the instance's own words, and where to read the rest.
    let (_, more) = message
        .split_once("(more: phoenix logs ")
        .unwrap_or_else(|| panic!("no logs command in {message}"));
    let instance = more.split(')').next().unwrap().to_string();
    assert!(instance.starts_with("verify-"), "{message}");
    assert!(
        message.contains(&format!("hello {instance} version v2 listening")),
        "{message}"
    );
    let logged = phoenix.cli_ok(&["logs", &instance, "--json"]);
    let first: Value = serde_json::from_str(logged.lines().next().unwrap()).unwrap();
    assert_eq!(first["instance"], instance.as_str());
    assert_eq!(first["generation"], 0);
    let journaled = phoenix
        .history()
        .into_iter()
        .rfind(|e| e["kind"] == "image.verified")
        .unwrap();
    assert_eq!(journaled["detail"]["passed"], false);
    assert_eq!(
        journaled["detail"]["logs"],
        format!("phoenix logs {instance}").as_str()
    );
    assert!(
        journaled["detail"]["log_position"]["offset"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(live_image(&phoenix), v1);
    let samples = load.stop();
    assert!(failures(&samples).is_empty(), "{:?}", failures(&samples));

    // An image baked but never verified is refused by reference, then deployed once it passes.
    phoenix.write_fleet(&Fleet {
        checks: Some(PASSING.into()),
        ..Fleet::version("v3")
    });
    let baked: Value = serde_json::from_str(&phoenix.cli_ok(&["bake", "--json"])).unwrap();
    let v3 = baked[0]["digest"].as_str().unwrap().to_string();
    let never = phoenix.cli(&["deploy", "web", "--image", &v3]);
    assert!(
        text(&never.stderr).contains("was never verified; run `phoenix verify"),
        "{}",
        text(&never.stderr)
    );
    assert_eq!(live_image(&phoenix), v1);
    phoenix.cli_ok(&["verify", &v3[..19]]);
    phoenix.cli_ok(&["deploy", "web", "--image", &v3]);
    assert_eq!(live_image(&phoenix), v3);

    // Changed check files run again, even for an image that passed the old ones.
    let verifications = |p: &Phoenix| {
        p.history()
            .iter()
            .filter(|e| e["kind"] == "image.verified")
            .count()
    };
    let before = verifications(&phoenix);
    let tightened = format!("{PASSING}kernel-param:\n  kernel.ostype:\n    value: Linux\n");
    phoenix.write_fleet(&Fleet {
        checks: Some(tightened),
        ..Fleet::version("v3")
    });
    let deployed = phoenix.cli_ok(&["deploy", "web"]);
    assert!(deployed.contains("verify "), "{deployed}");
    assert_eq!(verifications(&phoenix), before + 1);
    // Unchanged checks and image: no second run.
    let again = phoenix.cli_ok(&["deploy", "web"]);
    assert!(!again.contains("verify "), "{again}");
    assert_eq!(verifications(&phoenix), before + 1);
}
