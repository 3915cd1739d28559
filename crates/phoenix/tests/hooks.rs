//! Deploy hooks and webhooks end to end: the real binary under load, hook programs that record
//! what they are told and veto a switch, a real HTTP receiver on loopback checking signatures.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{Fleet, Load, Phoenix};
use phoenix_fleet::test_util::WebhookReceiver;

const SECRET: &str = "9f2c4e7a1b3d5f6081a2c3e4f5061728";

fn fleet(version: &str, webhook_url: &str) -> Fleet {
    let mut fleet = Fleet::version(version);
    fleet.more = Box::leak(
        format!(
            "
[hooks]
before_switch = [\"./hooks/smoke-test\", \"--quick\"]
after_switch = [\"./hooks/record\"]
on_abort = [\"./hooks/record\"]
timeout = \"20s\"

[webhook.ci]
url = \"{webhook_url}\"
events = [\"deploy.started\", \"deploy.aborted\", \"deploy.finished\"]
secret_file = \"webhook.secret\"
retry_delay = \"50ms\"
"
        )
        .into_boxed_str(),
    );
    fleet
}

fn write_hooks(dir: &Path) {
    std::fs::create_dir(dir.join("hooks")).unwrap();
    let scripts = [
        (
            "smoke-test",
            "#!/bin/sh\necho \"smoke test $1 of generation $PHOENIX_GENERATION\"\nif [ -e veto ]; then echo 'smoke test: red' >&2; exit 1; fi\necho 'smoke test: green'\n",
        ),
        (
            "record",
            "#!/bin/sh\necho \"$PHOENIX_HOOK generation=$PHOENIX_GENERATION live=$PHOENIX_LIVE_GENERATION reason=$PHOENIX_REASON\" >> hooks.log\n",
        ),
    ];
    for (name, text) in scripts {
        let path = dir.join("hooks").join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let secret = dir.join("webhook.secret");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn hooks_veto_a_switch_and_webhooks_tell_a_receiver_under_load() {
    let receiver = WebhookReceiver::start();
    let url = receiver.url("/phoenix");
    let mut phoenix = Phoenix::start_prepared(&fleet("v1", &url), write_hooks);
    phoenix.wait_serving(3);
    let load = Load::start(phoenix.proxy_addr(), 4);
    while load.count() < 100 {
        std::thread::sleep(Duration::from_millis(10));
    }

    // The smoke test fails: the switch is vetoed, v1 serves on, on_abort hears why.
    std::fs::write(phoenix.dir().join("veto"), "").unwrap();
    phoenix.write_fleet(&fleet("v2", &url));
    let output = phoenix.cli(&["deploy", "web"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{said}");
    assert!(
        said.contains("[before_switch] smoke test --quick of generation 2"),
        "{said}"
    );
    assert!(said.contains("[before_switch] smoke test: red"), "{said}");
    assert!(
        said.contains("deploy of web aborted (generation 1 keeps serving): hook before_switch failed (exit status: 1)"),
        "{said}"
    );
    let history = phoenix.cli_ok(&["history", "web"]);
    assert!(history.contains("deploy.hook"), "{history}");
    let hook: Vec<_> = phoenix
        .events("deploy.hook")
        .into_iter()
        .filter(|e| e["detail"]["deploy"] == 2)
        .collect();
    assert_eq!(hook.len(), 2, "before_switch and on_abort: {hook:?}");
    assert_eq!(hook[0]["detail"]["ok"], false);
    assert!(
        hook[0]["detail"]["output"]
            .to_string()
            .contains("smoke test: red")
    );

    // Green: v2 goes live, after_switch sees it.
    std::fs::remove_file(phoenix.dir().join("veto")).unwrap();
    let said = phoenix.cli_ok(&["deploy", "web"]);
    assert!(said.contains("[before_switch] smoke test: green"), "{said}");
    assert_eq!(phoenix.status()["roles"][0]["live_generation"], 3);
    std::thread::sleep(Duration::from_millis(300));
    let samples = load.stop();
    let failed: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(samples.iter().any(|s| s.result.as_deref() == Ok("v2")));

    let log = std::fs::read_to_string(phoenix.dir().join("hooks.log")).unwrap();
    let log: Vec<&str> = log.lines().collect();
    assert_eq!(
        log,
        [
            "after_switch generation=1 live=1 reason=",
            "on_abort generation=2 live=1 reason=hook before_switch failed (exit status: 1)",
            "after_switch generation=3 live=3 reason=",
        ]
    );

    // The receiver got the three deploys' events, signed, in order.
    let wanted = [
        ("deploy.started", 1),
        ("deploy.finished", 1),
        ("deploy.started", 2),
        ("deploy.aborted", 2),
        ("deploy.started", 3),
        ("deploy.finished", 3),
    ];
    let received = receiver.wait_for(wanted.len());
    let seen: Vec<(String, i64)> = received
        .iter()
        .map(|r| {
            let body = r.json();
            let timestamp: i64 = r.headers["x-phoenix-timestamp"].parse().unwrap();
            assert_eq!(
                r.headers["x-phoenix-signature"],
                phoenix_fleet::sign_webhook(SECRET, timestamp, &r.body)
            );
            assert_eq!(body["role"], "web");
            (
                body["kind"].as_str().unwrap().to_string(),
                body["detail"]["deploy"].as_i64().unwrap(),
            )
        })
        .collect();
    let wanted: Vec<(String, i64)> = wanted.iter().map(|(k, d)| (k.to_string(), *d)).collect();
    assert_eq!(seen, wanted);
    let metrics = phoenix.api_get("/metrics");
    assert!(
        metrics.contains("phoenix_webhook_delivered_total{webhook=\"ci\"} 6"),
        "{metrics}"
    );
}
