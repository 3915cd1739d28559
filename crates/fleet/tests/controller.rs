//! The controller's rules with a fake driver and a manual clock, without the binary: deploy,
//! abort, scale and a restart's handover, in milliseconds.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use phoenix_driver::test_util::FakeDriver;
use phoenix_fleet::{Controller, DeployOptions, ManualClock, Options, Progress, RollbackTo};

/// A fleet file of one role `web` (`instances` of it) whose image says `version`.
fn write_fleet(dir: &Path, version: &str, instances: u32) {
    std::fs::write(dir.join("app"), b"#!/bin/true\n").unwrap();
    let fleet = format!(
        r#"[image.app]
from = "scratch"
context = "{context}"
copy = [{{ src = "app", dst = "/app" }}]
env = {{ VERSION = "{version}" }}
entrypoint = ["/app"]

[role.web]
image = "app"
instances = {instances}
listen = "127.0.0.1:0"
network = "host"
stop_timeout = "1s"

[role.web.health]
interval = "10ms"
timeout = "500ms"
healthy_threshold = 1
unhealthy_threshold = 1

[role.web.deploy]
healthy_timeout = "1s"
drain = "100ms"
"#,
        context = dir.display()
    );
    std::fs::write(dir.join("phoenix.toml"), fleet).unwrap();
}

fn options(dir: &Path, driver: &FakeDriver, clock: &Arc<ManualClock>) -> Options {
    let mut options = Options::new(dir.join(".phoenix"), dir.join("phoenix.toml"));
    options.driver = Some(Arc::new(driver.clone()));
    options.clock = clock.clone();
    options.seed = Some(7);
    options
}

/// One keep-alive GET on `stream`: the body.
fn get_on(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "connection closed");
        raw.push(byte[0]);
    }
    let head = String::from_utf8(raw).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_string)
        })
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0; length];
    stream.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

fn get(addr: SocketAddr) -> String {
    get_on(&mut TcpStream::connect(addr).unwrap())
}

fn version_of(body: &str) -> &str {
    body.trim().rsplit(' ').next().unwrap()
}

fn live(controller: &Controller) -> (Option<i64>, Vec<String>) {
    let status = futures_block(controller.status());
    let role = &status.roles[0];
    let names = role
        .generations
        .iter()
        .find(|g| Some(g.id) == role.live_generation)
        .map(|g| g.instances.iter().map(|i| i.name.clone()).collect())
        .unwrap_or_default();
    (role.live_generation, names)
}

fn futures_block<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_abort_and_scale_follow_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    write_fleet(dir.path(), "v1", 2);
    let driver = FakeDriver::default();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let controller = Controller::open(options(dir.path(), &driver, &clock))
        .await
        .unwrap();
    assert!(controller.converge().await.is_empty());
    let addr = controller.listen_addrs()["web"];
    assert_eq!(version_of(&get(addr)), "v1");
    assert_eq!(driver.running().len(), 2);

    // A new version: blue-green, the old instances stopped once drained.
    clock.advance(60_000);
    write_fleet(dir.path(), "v2", 2);
    let report = controller
        .deploy("web", DeployOptions::default(), &Progress::none())
        .await
        .unwrap();
    assert_eq!(report.generation, 2);
    assert_eq!(version_of(&get(addr)), "v2");
    assert_eq!((driver.running().len(), driver.started()), (2, 4));

    // A version whose instances never get healthy: aborted, v2 keeps serving.
    write_fleet(dir.path(), "v3", 2);
    driver.set_healthy(false);
    let aborted = controller
        .deploy("web", DeployOptions::default(), &Progress::none())
        .await
        .unwrap_err();
    assert!(
        aborted.to_string().contains("generation 2 keeps serving"),
        "{aborted}"
    );
    driver.set_healthy(true);
    assert_eq!(version_of(&get(addr)), "v2");
    let (generation, names) = live(&controller);
    assert_eq!((generation, names.len()), (Some(2), 2));
    assert_eq!(
        driver.running().len(),
        2,
        "the aborted generation's instances stopped"
    );

    // Scaling out and in.
    let out = controller.scale("web", 4, &Progress::none()).await.unwrap();
    assert_eq!((out.from, out.to, out.started.len()), (2, 4, 2));
    let within = controller.scale("web", 1, &Progress::none()).await.unwrap();
    assert_eq!(within.stopped.len(), 3);
    assert_eq!(driver.running().len(), 1);

    // The fleet file asks for 3: `apply` scales in place (the plan says so first).
    write_fleet(dir.path(), "v2", 3);
    let text = std::fs::read_to_string(dir.path().join("phoenix.toml")).unwrap();
    let plan = controller.plan(&text).await.unwrap();
    assert_eq!(plan.changes.len(), 1, "{plan:?}");
    let applied = controller
        .apply(&text, Some(&plan.base), &Progress::none())
        .await
        .unwrap();
    assert_eq!(applied.scaled.len(), 1);
    assert_eq!(driver.running().len(), 3);
    let stale = controller
        .apply(&text, Some(&plan.base), &Progress::none())
        .await;
    assert!(stale.unwrap_err().to_string().contains("plan again"));
    controller.scale("web", 1, &Progress::none()).await.unwrap();

    // A crash is replaced.
    let (_, names) = live(&controller);
    driver.crash(&names[0]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while live(&controller).1 == names || driver.running().len() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the crash was not replaced"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The journal keeps the injected clock's times.
    let journal = controller.store().history(Some("web"), 1000).unwrap();
    let deployed: Vec<_> = journal
        .iter()
        .filter(|e| e.kind == "deploy.finished")
        .collect();
    let times: Vec<i64> = deployed.iter().map(|e| e.at).collect();
    assert_eq!(
        times,
        [1_700_000_000_000, 1_700_000_060_000],
        "{deployed:?}"
    );
    controller.shutdown().await;
    assert!(driver.running().is_empty());
}

#[test]
fn a_handover_keeps_instances_listeners_and_idle_connections() {
    let dir = tempfile::tempdir().unwrap();
    write_fleet(dir.path(), "v1", 2);
    let driver = FakeDriver::default();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let first = tokio::runtime::Runtime::new().unwrap();
    let (handed, addr, mut idle, names) = first.block_on(async {
        let controller = Controller::open(options(dir.path(), &driver, &clock))
            .await
            .unwrap();
        assert!(controller.converge().await.is_empty());
        let addr = controller.listen_addrs()["web"];
        let mut idle = TcpStream::connect(addr).unwrap();
        assert_eq!(version_of(&get_on(&mut idle)), "v1");
        let names = tokio::task::spawn_blocking({
            let controller = controller.clone();
            move || {
                let runtime = tokio::runtime::Handle::current();
                let status = runtime.block_on(controller.status());
                let role = &status.roles[0];
                role.generations[0]
                    .instances
                    .iter()
                    .map(|i| i.name.clone())
                    .collect::<Vec<_>>()
            }
        })
        .await
        .unwrap();
        let handover = controller.hand_over().await.unwrap();
        assert_eq!(handover.handed.instances.len(), 2);
        assert_eq!(
            handover.handed.parked.len(),
            1,
            "the idle connection is kept"
        );
        (handover.handed, addr, idle, names)
    });
    // The first program ends, every task with it (as `execve` ends it).
    drop(first);
    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        let mut options = options(dir.path(), &driver, &clock);
        options.inherited = Some(handed);
        let controller = Controller::open(options).await.unwrap();
        assert!(controller.converge().await.is_empty());
        assert_eq!(controller.listen_addrs()["web"], addr, "the same listener");
        assert_eq!(driver.started(), 2, "no instance started again");
        let status = controller.status().await;
        let mut now: Vec<String> = status.roles[0].generations[0]
            .instances
            .iter()
            .map(|i| i.name.clone())
            .collect();
        now.sort();
        let mut before = names.clone();
        before.sort();
        assert_eq!(now, before);
        let idle_answer = tokio::task::spawn_blocking(move || get_on(&mut idle))
            .await
            .unwrap();
        assert_eq!(
            version_of(&idle_answer),
            "v1",
            "the kept connection is served on"
        );
        let adopted = controller.store().history(None, 100).unwrap();
        assert!(
            adopted
                .iter()
                .any(|e| e.kind == "up.adopted" && e.detail["instances_adopted"] == 2)
        );
        controller.shutdown().await;
        assert!(driver.running().is_empty());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_given_back_serves_on_with_its_connections() {
    let dir = tempfile::tempdir().unwrap();
    write_fleet(dir.path(), "v1", 2);
    let driver = FakeDriver::default();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let controller = Controller::open(options(dir.path(), &driver, &clock))
        .await
        .unwrap();
    assert!(controller.converge().await.is_empty());
    let addr = controller.listen_addrs()["web"];
    let mut idle = TcpStream::connect(addr).unwrap();
    let mut idle = tokio::task::spawn_blocking(move || {
        assert_eq!(version_of(&get_on(&mut idle)), "v1");
        idle
    })
    .await
    .unwrap();
    let handover = controller.hand_over().await.unwrap();
    assert_eq!(handover.handed.parked.len(), 1);
    // While handed over, nothing that changes the role may start.
    let busy = controller.scale("web", 3, &Progress::none()).await;
    assert!(busy.unwrap_err().to_string().contains("already running"));
    controller.resume(handover);
    let answer = tokio::task::spawn_blocking(move || get_on(&mut idle))
        .await
        .unwrap();
    assert_eq!(
        version_of(&answer),
        "v1",
        "the parked connection is served again"
    );
    assert_eq!(version_of(&get(addr)), "v1");
    controller.scale("web", 3, &Progress::none()).await.unwrap();
    assert_eq!(driver.running().len(), 3);
    controller.shutdown().await;
}

/// Hook scripts in `dir/hooks`: each appends its `PHOENIX_*` facts to `dir/hooks.log`;
/// `before_switch` says "tests red" and vetoes while `dir/veto` exists, `before_bake`
/// refuses while `dir/closed` exists.
fn write_hooks(dir: &Path, timeout: &str) {
    use std::os::unix::fs::PermissionsExt;
    let hooks = dir.join("hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    let record = format!(
        "echo \"$PHOENIX_HOOK role=$PHOENIX_ROLE strategy=$PHOENIX_STRATEGY deploy=$PHOENIX_DEPLOY generation=$PHOENIX_GENERATION live=$PHOENIX_LIVE_GENERATION image=${{PHOENIX_IMAGE:+set}} previous=${{PHOENIX_PREVIOUS_IMAGE:+set}} reason=$PHOENIX_REASON\" >> {log}",
        log = dir.join("hooks.log").display()
    );
    let scripts = [
        ("record", String::new()),
        (
            "gate",
            format!(
                "if [ -e {veto} ]; then echo tests red; echo see the report >&2; exit 3; fi\n",
                veto = dir.join("veto").display()
            ),
        ),
        (
            "open",
            format!(
                "if [ -e {closed} ]; then echo deploys are frozen; exit 1; fi\n",
                closed = dir.join("closed").display()
            ),
        ),
    ];
    for (name, body) in scripts {
        let path = hooks.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{record}\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let fleet = dir.join("phoenix.toml");
    let mut text = std::fs::read_to_string(&fleet).unwrap();
    text.push_str(&format!(
        "\n[hooks]\nbefore_bake = [\"./hooks/open\"]\nafter_verify = [\"./hooks/record\"]\nbefore_switch = [\"./hooks/gate\"]\nafter_switch = [\"./hooks/record\"]\non_abort = [\"./hooks/record\"]\ntimeout = \"{timeout}\"\n"
    ));
    std::fs::write(fleet, text).unwrap();
}

fn hook_log(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("hooks.log")).unwrap_or_default();
    std::fs::remove_file(dir.join("hooks.log")).ok();
    text.lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_see_the_deploy_and_may_stop_it_before_traffic_moves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    write_fleet(path, "v1", 2);
    write_hooks(path, "10s");
    let driver = FakeDriver::default();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let controller = Controller::open(options(path, &driver, &clock))
        .await
        .unwrap();
    assert!(controller.converge().await.is_empty());
    let addr = controller.listen_addrs()["web"];
    let first = hook_log(path);
    assert_eq!(
        first,
        [
            "before_bake role=web strategy=blue-green deploy= generation= live= image= previous= reason=",
            "after_verify role=web strategy=blue-green deploy= generation= live= image=set previous= reason=",
            "before_switch role=web strategy=blue-green deploy=1 generation=1 live= image=set previous= reason=",
            "after_switch role=web strategy=blue-green deploy=1 generation=1 live=1 image=set previous= reason=",
        ]
    );

    // before_switch vetoes v2: the new generation is stopped, v1 serves on, on_abort is told why.
    write_fleet(path, "v2", 2);
    write_hooks(path, "10s");
    std::fs::write(path.join("veto"), "").unwrap();
    let (progress, mut said) = Progress::channel();
    let vetoed = controller
        .deploy("web", DeployOptions::default(), &progress)
        .await
        .unwrap_err()
        .to_string();
    assert!(vetoed.contains("generation 1 keeps serving"), "{vetoed}");
    assert!(
        vetoed.contains("hook before_switch failed (exit status: 3)"),
        "{vetoed}"
    );
    let mut lines = Vec::new();
    while let Ok(line) = said.try_recv() {
        lines.push(line);
    }
    assert!(
        lines.contains(&"[before_switch] tests red".to_string()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"[before_switch] see the report".to_string()),
        "{lines:?}"
    );
    assert_eq!(version_of(&get(addr)), "v1");
    assert_eq!((driver.running().len(), driver.started()), (2, 4));
    let log = hook_log(path);
    assert_eq!(log.len(), 4, "{log:?}");
    assert!(log[2].starts_with("before_switch role=web strategy=blue-green deploy=2 generation=2 live=1 image=set previous=set"), "{log:?}");
    assert!(
        log[3].starts_with("on_abort role=web strategy=blue-green deploy=2 generation=2 live=1 image=set previous=set reason=hook before_switch failed"),
        "{log:?}"
    );
    let journal = controller.store().history(Some("web"), 1000).unwrap();
    let gate = journal
        .iter()
        .filter(|e| e.kind == "deploy.hook")
        .find(|e| e.detail["hook"] == "before_switch" && e.detail["deploy"] == 2)
        .expect("the veto is journaled");
    assert_eq!(gate.detail["ok"], false);
    // stdout and stderr are two pipes: their lines interleave as they come.
    let mut output: Vec<String> = serde_json::from_value(gate.detail["output"].clone()).unwrap();
    output.sort();
    assert_eq!(output, ["see the report", "tests red"]);

    // before_bake refuses: nothing is baked or started at all.
    std::fs::remove_file(path.join("veto")).unwrap();
    std::fs::write(path.join("closed"), "").unwrap();
    let refused = controller
        .deploy("web", DeployOptions::default(), &Progress::none())
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("stopped before it began"), "{refused}");
    assert!(refused.contains("before_bake failed"), "{refused}");
    assert_eq!(driver.started(), 4);
    assert_eq!(hook_log(path).len(), 1);

    // Open again: v2 goes live and after_switch sees it.
    std::fs::remove_file(path.join("closed")).unwrap();
    let report = controller
        .deploy("web", DeployOptions::default(), &Progress::none())
        .await
        .unwrap();
    assert_eq!(version_of(&get(addr)), "v2");
    let log = hook_log(path);
    assert_eq!(
        log.last().unwrap(),
        &format!(
            "after_switch role=web strategy=blue-green deploy=3 generation={g} live={g} image=set previous=set reason=",
            g = report.generation
        )
    );
    controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_past_its_time_is_killed_with_what_it_started() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    write_fleet(path, "v1", 1);
    write_hooks(path, "300ms");
    // The gate starts a long child and waits for it: both must go at the time limit.
    let pid_file = path.join("child.pid");
    let gate = path.join("hooks/gate");
    std::fs::write(
        &gate,
        format!(
            "#!/bin/sh\nsleep 600 &\necho $! > {}\nwait\n",
            pid_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&gate, std::fs::Permissions::from_mode(0o755)).unwrap();
    let driver = FakeDriver::default();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let controller = Controller::open(options(path, &driver, &clock))
        .await
        .unwrap();
    let failed = controller.converge().await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0]
            .1
            .to_string()
            .contains("hook before_switch timed out after 300ms and was killed"),
        "{}",
        failed[0].1
    );
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Reaped by init once killed; /proc/PID goes (or turns into another process, never `sleep 600`).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.starts_with("sleep\u{0}600"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the hook's child outlived it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        driver.running().is_empty(),
        "the first generation never went live"
    );
    controller.shutdown().await;
}

const WEBHOOK_SECRET: &str = "0123456789abcdef0123456789abcdef";

/// Adds `[webhook.ci]` sending `deploy.*` to `url`, its secret in an owner-only file.
fn write_webhook(dir: &Path, url: &str) {
    use std::os::unix::fs::PermissionsExt;
    let secret = dir.join("webhook.secret");
    std::fs::write(&secret, format!("{WEBHOOK_SECRET}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let fleet = dir.join("phoenix.toml");
    let mut text = std::fs::read_to_string(&fleet).unwrap();
    text.push_str(&format!(
        "\n[webhook.ci]\nurl = \"{url}\"\nevents = [\"deploy.*\"]\nsecret_file = \"webhook.secret\"\nretries = 3\nretry_delay = \"10ms\"\n"
    ));
    std::fs::write(fleet, text).unwrap();
}

/// The deliveries up to the one of `deploy.finished` of `deploy`, checking each signature.
fn deliveries_until_finished(
    receiver: &phoenix_fleet::test_util::WebhookReceiver,
    deploy: i64,
) -> Vec<phoenix_fleet::test_util::Received> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let received = receiver.received();
        let finished = received.iter().any(|r| {
            let body = r.json();
            body["kind"] == "deploy.finished"
                && body["detail"]["deploy"] == deploy
                && r.status == 200
        });
        if finished {
            for r in &received {
                let timestamp: i64 = r.headers["x-phoenix-timestamp"].parse().unwrap();
                assert_eq!(
                    r.headers["x-phoenix-signature"],
                    phoenix_fleet::sign_webhook(WEBHOOK_SECRET, timestamp, &r.body),
                    "{r:?}"
                );
                assert_eq!(timestamp, 1_700_000_000, "the injected clock's time");
                let body = r.json();
                assert_eq!(r.headers["x-phoenix-event"], body["kind"].as_str().unwrap());
                assert_eq!(
                    r.headers["x-phoenix-delivery"],
                    format!("ci-{}", body["id"])
                );
                assert_eq!(r.headers["content-type"], "application/json");
                assert_eq!(r.path, "/hooks/phoenix?team=web");
            }
            return received;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "deploy {deploy} never reached the receiver: {received:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kinds(received: &[phoenix_fleet::test_util::Received]) -> Vec<(i64, String, u16)> {
    received
        .iter()
        .map(|r| {
            let body = r.json();
            (
                body["id"].as_i64().unwrap(),
                body["kind"].as_str().unwrap().to_string(),
                r.status,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_get_signed_journal_events_in_order_retried_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let receiver = phoenix_fleet::test_util::WebhookReceiver::start();
    let url = receiver.url("/hooks/phoenix?team=web");
    let write = |version: &str| {
        write_fleet(path, version, 1);
        write_webhook(path, &url);
    };
    write("v1");
    let driver = FakeDriver::default();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let controller = Controller::open(options(path, &driver, &clock))
        .await
        .unwrap();
    assert!(controller.converge().await.is_empty());
    let first = kinds(&tokio::task::block_in_place(|| {
        deliveries_until_finished(&receiver, 1)
    }));
    assert_eq!(first.first().unwrap().1, "deploy.started", "{first:?}");
    assert_eq!(first.last().unwrap().1, "deploy.finished", "{first:?}");
    assert!(
        first.windows(2).all(|w| w[0].0 < w[1].0),
        "in journal order: {first:?}"
    );
    assert!(
        first.iter().all(|(_, kind, _)| kind.starts_with("deploy.")),
        "{first:?}"
    );

    // The receiver fails twice: the same event is sent again, then the rest in order.
    receiver.answer(&[503, 503]);
    write("v2");
    controller
        .deploy("web", DeployOptions::default(), &Progress::none())
        .await
        .unwrap();
    let second = kinds(&tokio::task::block_in_place(|| {
        deliveries_until_finished(&receiver, 2)
    }))[first.len()..]
        .to_vec();
    let started = second[0].0;
    assert_eq!(
        second[..3],
        [
            (started, "deploy.started".into(), 503),
            (started, "deploy.started".into(), 503),
            (started, "deploy.started".into(), 200),
        ],
        "{second:?}"
    );
    assert!(
        second[3..]
            .iter()
            .all(|(id, _, status)| *id > started && *status == 200)
    );

    // A 4xx is not retried: the event is given up on and journaled, the next ones go on.
    receiver.answer(&[422]);
    write("v3");
    controller
        .deploy("web", DeployOptions::default(), &Progress::none())
        .await
        .unwrap();
    let third = kinds(&tokio::task::block_in_place(|| {
        deliveries_until_finished(&receiver, 3)
    }));
    let refused = third
        .iter()
        .position(|(_, _, status)| *status == 422)
        .unwrap();
    assert_eq!(third[refused].1, "deploy.started");
    assert!(
        third[refused + 1..]
            .iter()
            .all(|(id, _, status)| *id > third[refused].0 && *status == 200)
    );
    let journal = controller.store().history(None, 1000).unwrap();
    let failed: Vec<_> = journal
        .iter()
        .filter(|e| e.kind == "webhook.failed")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].detail["webhook"], "ci");
    assert_eq!(failed[0].detail["kind"], "deploy.started");
    assert_eq!(failed[0].detail["reason"], "refused with HTTP 422");
    let metrics = controller.metrics_text().await;
    assert!(
        metrics.contains("phoenix_webhook_failures_total{webhook=\"ci\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("phoenix_webhook_given_up_total{webhook=\"ci\"} 1"),
        "{metrics}"
    );
    controller.shutdown().await;

    // A restart goes on after the last event sent: nothing twice, the next deploy's events.
    let sent = receiver.received().len();
    // While Phoenix is down, something else journals an event: it is sent after the restart.
    let store = phoenix_store::Store::open(path.join(".phoenix/state.db")).unwrap();
    let missed = store
        .journal(
            1,
            Some("web"),
            "deploy.interrupted",
            &serde_json::json!({"deploy": 99}),
        )
        .unwrap();
    drop(store);
    let mut reopened = options(path, &driver, &clock);
    // Another seed: the same one would name the new instances as the first run did.
    reopened.seed = Some(8);
    let controller = Controller::open(reopened).await.unwrap();
    let failed = controller.converge().await;
    assert!(failed.is_empty(), "{failed:?}");
    write("v4");
    let report = controller
        .deploy("web", DeployOptions::default(), &Progress::none())
        .await
        .unwrap();
    let after = kinds(&tokio::task::block_in_place(|| {
        deliveries_until_finished(&receiver, report.generation)
    }))[sent..]
        .to_vec();
    assert_eq!(
        after[0],
        (missed, "deploy.interrupted".into(), 200),
        "{after:?}"
    );
    assert_eq!(after[1].1, "deploy.started", "{after:?}");
    let last_before = kinds(&receiver.received()[..sent]).last().unwrap().0;
    assert!(
        after.iter().all(|(id, _, _)| *id > last_before),
        "{after:?}"
    );
    controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_to_digits_takes_a_generation_first_then_a_digest_prefix() {
    let dir = tempfile::tempdir().unwrap();
    write_fleet(dir.path(), "v1", 1);
    let driver = FakeDriver::default();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let controller = Controller::open(options(dir.path(), &driver, &clock))
        .await
        .unwrap();
    assert!(controller.converge().await.is_empty());
    let addr = controller.listen_addrs()["web"];

    // Bake versions until one's digest starts with 6 digits, the shortest prefix the store
    // takes: about 1 in 17 does ((10/16)^6), so 400 tries fail about once in 10^11.
    let (digits_version, prefix) = (2..400)
        .find_map(|n| {
            let version = format!("v{n}");
            write_fleet(dir.path(), &version, 1);
            let baked = futures_block(controller.bake("app")).unwrap();
            let hex = baked.digest["sha256:".len()..][..6].to_string();
            hex.bytes()
                .all(|b| b.is_ascii_digit())
                .then_some((version, hex))
        })
        .expect("a digest starting with 6 digits");

    // Generation 2 serves another version.
    write_fleet(dir.path(), "v9999", 1);
    let report = controller
        .deploy("web", DeployOptions::default(), &Progress::none())
        .await
        .unwrap();
    assert_eq!(report.generation, 2);
    assert_eq!(version_of(&get(addr)), "v9999");

    // Digits that name no generation that served: the image whose digest starts with them.
    let rollback = |to: &str| DeployOptions {
        rollback: Some(RollbackTo::parse(Some(to))),
        ..DeployOptions::default()
    };
    controller
        .deploy("web", rollback(&prefix), &Progress::none())
        .await
        .unwrap();
    assert_eq!(version_of(&get(addr)), digits_version, "--to {prefix}");

    // Digits that name a generation that served: that generation's image.
    controller
        .deploy("web", rollback("1"), &Progress::none())
        .await
        .unwrap();
    assert_eq!(version_of(&get(addr)), "v1");

    // Neither: the error names the generation.
    let missing = controller
        .deploy("web", rollback("424242"), &Progress::none())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("no generation 424242 that served"),
        "{missing}"
    );
    assert_eq!(version_of(&get(addr)), "v1");
    controller.shutdown().await;
}
