//! bench/start's harness: the time from "start it" to the first 200 from `GET /healthz`, for
//! the same image under each way of running it: the process driver, the isolating driver (on
//! the host's network, and on a bridge in a network namespace of its own), the runc driver,
//! plain `runc run`, and plain `podman run`. Prints one JSON line per way: the runs in ms.
//!
//! Usage: start_bench STATE IMAGE_DIGEST PODMAN_IMAGE RUNS
//! (STATE holds the image, baked by `phoenix bake`; PODMAN_IMAGE is the same image loaded
//! into podman from `phoenix export`.)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use phoenix_driver::{
    Bridge, BridgeConfig, ContainerDriver, Driver, InstanceSpec, Network, ProcessDriver, Resources,
    Runtime,
};
use phoenix_image::{ImageStore, RootLayout};

const OFFSET: u32 = 1_800_000_000;

fn main() {
    phoenix_driver::run_helper_if_asked();
    let args: Vec<String> = std::env::args().collect();
    let (state, digest, podman_image) = (PathBuf::from(&args[1]), &args[2], &args[3]);
    let runs: usize = args[4].parse().unwrap();
    let store = ImageStore::open(state.join("images")).unwrap();
    let host_root = store.unpack_as(digest, RootLayout::HOST).unwrap();
    let mapped_root = store.unpack_as(digest, RootLayout::mapped(OFFSET)).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let work = state.join("bench");
    std::fs::create_dir_all(&work).unwrap();

    let rt = &runtime;
    let process: Box<dyn Driver> = Box::new(ProcessDriver);
    report("process driver", runs, |i| {
        phoenix_run(
            rt,
            process.as_ref(),
            &host_root,
            &work,
            i,
            Network::Host,
            true,
        )
    });
    let isolating = ContainerDriver::new(Runtime::Builtin, &state, OFFSET).unwrap();
    report("isolating driver", runs, |i| {
        phoenix_run(rt, &isolating, &mapped_root, &work, i, Network::Host, false)
    });
    let runc = ContainerDriver::new(Runtime::Oci(which("runc")), &state, OFFSET).unwrap();
    report("runc driver", runs, |i| {
        phoenix_run(rt, &runc, &mapped_root, &work, i, Network::Host, false)
    });
    report("runc run", runs, |i| runc_run(&host_root, &work, i));
    report("podman run", runs, |_| podman_run(podman_image));
    // Last: this process moves into a network namespace of its own for the bridge.
    phoenix_driver::test_util::own_network_namespace().unwrap();
    let bridge = Bridge::create(&BridgeConfig {
        name: "pxbench".into(),
        subnet: None,
    })
    .unwrap();
    report("isolating driver, bridge", runs, |i| {
        phoenix_run(
            rt,
            &isolating,
            &mapped_root,
            &work,
            i,
            Network::Bridge(bridge.clone()),
            false,
        )
    });
    let _ = bridge.remove();
    isolating.shut_down();
}

/// Runs `one` `runs` times (plus one warm-up) and prints the times.
fn report(what: &str, runs: usize, mut one: impl FnMut(usize) -> f64) {
    let _ = one(runs + 1);
    let times: Vec<f64> = (0..runs).map(&mut one).collect();
    println!("{}", serde_json::json!({"what": what, "ms": times}));
}

/// Starts an instance with `driver`, waits until it answers 200, stops it; returns the ms.
fn phoenix_run(
    runtime: &tokio::runtime::Runtime,
    driver: &dyn Driver,
    root: &Path,
    work: &Path,
    i: usize,
    network: Network,
    allow_root: bool,
) -> f64 {
    let name = format!("bench-{i:04}");
    let spec = InstanceSpec {
        name: name.clone(),
        role: "web".into(),
        root: root.to_path_buf(),
        argv: vec!["/bin/hello".into()],
        env: vec![("VERSION".into(), "bench".into())],
        workdir: "/".into(),
        user: String::new(),
        log_path: work.join(format!("{name}.log")),
        output: None,
        network,
        port: None,
        host_ip: std::net::Ipv4Addr::LOCALHOST,
        resources: Resources::default(),
        secrets: Vec::new(),
        allow_root,
        hosts: Vec::new(),
    };
    let started = Instant::now();
    let (mut process, addr) = driver.start(&spec).unwrap();
    wait_healthy(addr);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    runtime.block_on(process.stop(Duration::from_secs(5)));
    ms
}

/// Plain `runc run` of the same root (read-only, the host's network), detached.
fn runc_run(root: &Path, work: &Path, i: usize) -> f64 {
    let bundle = work.join(format!("runc-{i}"));
    let _ = std::fs::remove_dir_all(&bundle);
    std::fs::create_dir_all(&bundle).unwrap();
    let runc = which("runc");
    let ok = Command::new(&runc)
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .status()
        .unwrap();
    assert!(ok.success());
    let port = phoenix_driver::test_util::free_port();
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    spec["root"] = serde_json::json!({"path": root, "readonly": true});
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["/bin/hello"]);
    spec["process"]["env"] =
        serde_json::json!([format!("PORT={port}"), "HOST=127.0.0.1", "VERSION=bench"]);
    spec["process"]["rlimits"] =
        serde_json::json!([{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]);
    let namespaces: Vec<serde_json::Value> = spec["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["type"] != "network")
        .cloned()
        .collect();
    spec["linux"]["namespaces"] = namespaces.into();
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    let id = format!("phoenix-bench-{}-{i}", std::process::id());
    let state = work.join("runc-state");
    let started = Instant::now();
    let ok = Command::new(&runc)
        .arg("--root")
        .arg(&state)
        .args(["run", "--detach", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "runc run failed");
    wait_healthy(SocketAddr::from(([127, 0, 0, 1], port)));
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let _ = Command::new(&runc)
        .arg("--root")
        .arg(&state)
        .args(["delete", "--force", &id])
        .status();
    ms
}

/// Plain `podman run` of the same image (runc, the host's network), detached.
fn podman_run(image: &str) -> f64 {
    let port = phoenix_driver::test_util::free_port();
    let started = Instant::now();
    let output = Command::new("podman")
        .args([
            "--runtime",
            "runc",
            "run",
            "--detach",
            "--rm",
            "--network",
            "host",
        ])
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .args(["-e", &format!("PORT={port}"), "-e", "HOST=127.0.0.1", image])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "podman run failed");
    wait_healthy(SocketAddr::from(([127, 0, 0, 1], port)));
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let id = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let _ = Command::new("podman")
        .args(["--runtime", "runc", "rm", "--force", "--time", "0", &id])
        .stdout(Stdio::null())
        .status();
    ms
}

/// Polls `GET /healthz` every millisecond until it answers 200 (30 s at most).
fn wait_healthy(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            let _ =
                stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n");
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("{addr} never answered 200");
}

fn which(program: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(program))
}
