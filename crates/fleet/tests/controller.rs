//! The controller's rules with a fake driver and a manual clock, without the binary: deploy,
//! abort, scale and a restart's handover, in milliseconds.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use phoenix_driver::test_util::FakeDriver;
use phoenix_fleet::{Controller, DeployOptions, ManualClock, Options, Progress};

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
