//! Debian's Prometheus scraping `phoenix up`'s `/metrics` with a read token: the labels a role's
//! series carry, a request rate over a known open-loop load, and the example rules loaded.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const TOKEN: &str = "prometheus-scrapes-0123456789";

fn prometheus_installed() -> bool {
    let found =
        Path::new("/usr/bin/prometheus").exists() && Path::new("/usr/bin/promtool").exists();
    if !found {
        assert!(
            std::env::var_os("PHOENIX_REQUIRE_TOOLS").is_none(),
            "PHOENIX_REQUIRE_TOOLS is set but prometheus is missing"
        );
        eprintln!("skipped: prometheus is not installed (apt-get install prometheus)");
    }
    found
}

/// Prometheus's answer to an instant PromQL query: its `result` array.
fn query(prometheus: std::net::SocketAddr, promql: &str) -> Vec<Value> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let answer = get_once(prometheus, &format!("/api/v1/query?query={encoded}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{answer}"));
    assert_eq!(json["status"], "success", "{promql}: {json}");
    json["data"]["result"].as_array().unwrap().clone()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn prometheus_scrapes_labels_and_a_known_rate_and_loads_the_example_rules() {
    if !prometheus_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("prometheus read {TOKEN}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut fleet = Fleet::version("v1");
    fleet.instances = 2;
    fleet.write_to(dir.path());
    let mut phoenix = Phoenix::launch(
        dir,
        &["--api-listen", "127.0.0.1:0", "--api-tokens", "tokens"],
        None,
    );
    phoenix.wait_serving(2);
    let api = std::fs::read_to_string(phoenix.state().join("api.addr")).unwrap();
    let api = api.trim().trim_start_matches("http://").to_string();

    let work = tempfile::tempdir().unwrap();
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/prometheus/rules.yml");
    std::fs::write(work.path().join("token"), TOKEN).unwrap();
    let config = format!(
        "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
         rule_files: [\"{rules}\"]\n\
         scrape_configs:\n  - job_name: phoenix\n    honor_labels: true\n    authorization: {{ type: Bearer, credentials_file: \"{token}\" }}\n    static_configs: [{{ targets: [\"{api}\"] }}]\n",
        rules = rules.display(),
        token = work.path().join("token").display(),
    );
    let config_path = work.path().join("prometheus.yml");
    std::fs::write(&config_path, config).unwrap();
    let checked = Command::new("promtool")
        .args(["check", "config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(checked.status.success(), "{}", text(&checked.stdout));
    assert!(text(&checked.stdout).contains("SUCCESS: 8 rules found"));

    let port = phoenix_driver::test_util::free_port();
    let prometheus_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                work.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={prometheus_addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(work.path().join("prometheus.log")).unwrap_or_default();
    // Ready (its storage open) answers 200; before that, queries get 503.
    wait_for("Prometheus to be ready", Duration::from_secs(60), || {
        std::net::TcpStream::connect(prometheus_addr).is_ok()
            && get_once(prometheus_addr, "/-/ready").starts_with("HTTP/1.1 200")
    });
    wait_for(
        "Prometheus scraping phoenix up",
        Duration::from_secs(60),
        || {
            query(prometheus_addr, "up{job=\"phoenix\"}")
                .first()
                .is_some_and(|r| r["value"][1] == "1")
        },
    );

    // 50 requests per second, on schedule whatever the answers, for 25 s.
    let url = format!("http://{}/", phoenix.proxy_addr());
    let load = Killed(
        Command::new(phoenix_bin())
            .args(["load", &url, "--rps", "50", "--duration", "25s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(20));
    let rate = query(
        prometheus_addr,
        "sum(rate(phoenix_role_responses_total{role=\"web\",class=\"2xx\"}[10s]))",
    );
    let rps: f64 = rate[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(
        (45.0..=55.0).contains(&rps),
        "50 rps in, {rps} measured\n{}",
        log()
    );
    let per_instance = query(
        prometheus_addr,
        "sum by (instance) (rate(phoenix_backend_responses_total{role=\"web\"}[10s]))",
    );
    assert_eq!(per_instance.len(), 2, "{per_instance:?}");
    let sum: f64 = per_instance
        .iter()
        .map(|r| r["value"][1].as_str().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(
        (45.0..=55.0).contains(&sum),
        "the instances' rates add up: {sum}"
    );
    drop(load);

    // Every instance series names its role, instance, generation and image.
    let healthy = query(prometheus_addr, "phoenix_instance_healthy");
    assert_eq!(healthy.len(), 2, "{healthy:?}");
    for series in &healthy {
        let labels = &series["metric"];
        assert_eq!(labels["role"], "web");
        assert_eq!(labels["generation"], "1");
        assert!(labels["instance"].as_str().unwrap().starts_with("web-"));
        assert_eq!(labels["image"].as_str().unwrap().len(), 12, "{labels}");
        assert_eq!(series["value"][1], "1");
    }
    // The example recording rules evaluate against what is scraped.
    let healthy_rule = query(
        prometheus_addr,
        "phoenix:role_healthy_instances{role=\"web\"}",
    );
    assert_eq!(healthy_rule[0]["value"][1], "2", "{healthy_rule:?}");
    let requests_rule = query(
        prometheus_addr,
        "phoenix:role_requests:rate1m{role=\"web\"}",
    );
    assert_eq!(requests_rule.len(), 1, "{requests_rule:?}");
    let firing = query(prometheus_addr, "ALERTS{alertstate=\"firing\"}");
    assert!(
        firing.is_empty(),
        "nothing fires on a healthy fleet: {firing:?}"
    );
}
