//! The driver test suite: the same cases against the isolating driver (libcontainer) and the
//! runc driver (Debian's runc), with real containers, cgroups, veths and a busybox root.
//!
//! A test binary of its own (`harness = false`): the drivers start their shim by running the
//! current executable again, so `main` first lets a shim run; the suite then moves into a
//! network namespace of its own, so every bridge and veth it makes stays in there.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use phoenix_driver::test_util::{files_holding, own_network_namespace};
use phoenix_driver::{
    Bridge, BridgeConfig, ContainerDriver, Driver, InstanceSpec, Network, Process, Recorded,
    Resources, Runtime, Secret,
};

/// The host uid of uid 0 inside the test instances.
const OFFSET: u32 = 1_800_000_000;

type Case = fn(&Kit) -> Result<(), String>;

fn main() {
    phoenix_driver::run_helper_if_asked();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__exec") {
        // `phoenix exec` runs single-threaded: so does this helper.
        let driver = driver_for(&args[2], Path::new(&args[3]));
        let code = driver.exec_target(&args[4]).run(&args[5..]).unwrap();
        std::process::exit(code);
    }
    if args.get(1).map(String::as_str) == Some("__start_and_hang") {
        start_and_hang(&args[2], Path::new(&args[3]));
    }
    let filter: Vec<&String> = args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        require("root");
        println!("skipped: the driver suite needs root (containers, cgroups, veths)");
        return;
    }
    if !Path::new("/bin/busybox").exists() {
        require("busybox-static (/bin/busybox)");
        println!("skipped: /bin/busybox is missing (apt-get install busybox-static)");
        return;
    }
    own_network_namespace().expect("a network namespace of the suite's own");
    let cases: &[(&str, Case)] = &[
        (
            "sees_only_its_own_root_processes_and_user",
            sees_only_its_own_root_processes_and_user,
        ),
        (
            "stop_is_sigterm_then_the_whole_cgroup",
            stop_is_sigterm_then_the_whole_cgroup,
        ),
        (
            "over_its_memory_limit_it_is_oom_killed",
            over_its_memory_limit_it_is_oom_killed,
        ),
        (
            "limits_and_usage_come_from_its_cgroup",
            limits_and_usage_come_from_its_cgroup,
        ),
        (
            "bridge_addresses_reach_each_instance",
            bridge_addresses_reach_each_instance,
        ),
        (
            "secrets_are_0400_files_and_nowhere_else",
            secrets_are_0400_files_and_nowhere_else,
        ),
        ("exec_runs_inside_as_its_user", exec_runs_inside_as_its_user),
        (
            "cleanup_after_a_crash_leaves_no_process",
            cleanup_after_a_crash_leaves_no_process,
        ),
        (
            "a_bad_entrypoint_is_a_clear_error",
            a_bad_entrypoint_is_a_clear_error,
        ),
    ];
    let mut runtimes = vec![("isolating", Runtime::Builtin)];
    match which("runc") {
        Some(runc) => runtimes.push(("runc", Runtime::Oci(runc))),
        None => {
            require("runc");
            println!("skipped: the runc driver's cases (apt-get install runc)");
        }
    }
    let mut failed = Vec::new();
    let mut ran = 0;
    for (runtime_name, runtime) in &runtimes {
        for (case_name, case) in cases {
            let name = format!("{runtime_name}::{case_name}");
            if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
                continue;
            }
            ran += 1;
            let started = Instant::now();
            let kit = Kit::new(runtime_name, runtime.clone());
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&kit)))
                .unwrap_or_else(|panic| Err(format!("panicked: {panic:?}")));
            match result {
                Ok(()) => println!("test {name} ... ok ({} ms)", started.elapsed().as_millis()),
                Err(why) => {
                    println!("test {name} ... FAILED\n    {why}");
                    failed.push(name);
                }
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        ran - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        std::process::exit(1);
    }
}

/// In CI every tool is installed: a missing one is a failure there, a skip elsewhere.
impl Drop for Kit {
    fn drop(&mut self) {
        self.driver.shut_down();
    }
}

fn require(what: &str) {
    if std::env::var_os("PHOENIX_REQUIRE_TOOLS").is_some() {
        eprintln!("PHOENIX_REQUIRE_TOOLS is set but {what} is missing");
        std::process::exit(1);
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(program))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin").join(program)])
        .find(|p| p.is_file())
}

fn driver_for(runtime: &str, state: &Path) -> ContainerDriver {
    let runtime = match runtime {
        "isolating" => Runtime::Builtin,
        _ => Runtime::Oci(which("runc").expect("runc")),
    };
    ContainerDriver::new(runtime, state, OFFSET).unwrap()
}

/// A state directory, a busybox image root laid out for a user namespace, and a driver.
struct Kit {
    runtime_name: String,
    dir: tempfile::TempDir,
    root: PathBuf,
    driver: ContainerDriver,
    tokio: tokio::runtime::Runtime,
}

impl Kit {
    fn new(runtime_name: &str, runtime: Runtime) -> Kit {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        busybox_root(&root, OFFSET);
        let driver = ContainerDriver::new(runtime, dir.path(), OFFSET).unwrap();
        let tokio = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Kit {
            runtime_name: runtime_name.into(),
            dir,
            root,
            driver,
            tokio,
        }
    }

    fn state(&self) -> &Path {
        self.dir.path()
    }

    fn spec(&self, name: &str, script: &str) -> InstanceSpec {
        let mut spec = shell_spec(name, &self.root, self.state(), script);
        spec.env = vec![("GREETING".into(), "hi".into())];
        spec
    }

    fn start(&self, spec: &InstanceSpec) -> Result<(Process, SocketAddr), String> {
        let _runtime = self.tokio.enter();
        self.driver.start(spec).map_err(|e| e.to_string())
    }

    fn log(&self, spec: &InstanceSpec) -> String {
        std::fs::read_to_string(&spec.log_path).unwrap_or_default()
    }

    /// Waits until the instance's log holds `needle`.
    fn wait_log(&self, spec: &InstanceSpec, needle: &str) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log(spec);
            if log.contains(needle) {
                return Ok(log);
            }
            if Instant::now() > deadline {
                return Err(format!("{needle:?} never came; the log:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&self, process: &mut Process, grace: Duration) -> phoenix_driver::Exit {
        self.tokio.block_on(process.stop(grace))
    }

    fn exited(&self, process: &mut Process) -> phoenix_driver::Exit {
        self.tokio.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), process.exited())
                .await
                .expect("the instance did not end in 30 s")
        })
    }
}

/// A root holding static busybox and its applets, an os-release, and users; owned as the
/// user namespace maps it (`offset` is root inside).
fn busybox_root(root: &Path, offset: u32) {
    for dir in ["bin", "etc", "tmp", "run", "srv"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let applets = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    std::fs::write(
        root.join("etc/os-release"),
        "PRETTY_NAME=\"Phoenix test image\"\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/srv:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let status = std::process::Command::new("chown")
        .args(["-R", "-h", &format!("{offset}:{offset}")])
        .arg(root)
        .status()
        .unwrap();
    assert!(status.success());
    let status = std::process::Command::new("chown")
        .args(["-R", "-h", &format!("{}:{}", offset + 1000, offset + 1000)])
        .arg(root.join("srv"))
        .status()
        .unwrap();
    assert!(status.success());
}

fn check(condition: bool, what: impl Into<String>) -> Result<(), String> {
    if condition { Ok(()) } else { Err(what.into()) }
}

/// `key=value` lines of a log, as the scripts print them.
fn fields(log: &str) -> BTreeMap<String, String> {
    log.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn sees_only_its_own_root_processes_and_user(kit: &Kit) -> Result<(), String> {
    let mut spec = kit.spec(
        "iso-1a2b3c",
        r#"echo "uid=$(id -u)"; echo "gid=$(id -g)"; echo "host=$(hostname)";
           echo "os=$(grep PRETTY /etc/os-release)"; echo "procs=$(ls /proc | grep -c '^[0-9]')";
           echo "pid=$$"; echo "map=$(cat /proc/self/uid_map | tr -s ' ' | sed 's/^ //')";
           echo "nnp=$(grep NoNewPrivs /proc/self/status | tr -d '\t ' | cut -d: -f2)";
           echo "seccomp=$(grep '^Seccomp:' /proc/self/status | tr -d '\t ' | cut -d: -f2)";
           echo "capeff=$(grep CapEff /proc/self/status | tr -d '\t ' | cut -d: -f2)";
           echo "state=$(ls /proc/1/root/../../.. 2>&1 | head -1)";
           if unshare -n true 2>/dev/null; then echo unshare=yes; else echo unshare=no; fi;
           if mount -t tmpfs none /tmp 2>/dev/null; then echo mount=yes; else echo mount=no; fi;
           echo "greeting=$GREETING port=$PORT"; echo done=1; sleep 30"#,
    );
    spec.user = "app".into();
    let (mut process, addr) = kit.start(&spec)?;
    let log = kit.wait_log(&spec, "done=1")?;
    let f = fields(&log);
    let result = (|| {
        check(
            f["uid"] == "1000" && f["gid"] == "1000",
            format!("runs as app: {log}"),
        )?;
        check(f["host"] == "iso-1a2b3c", format!("hostname: {log}"))?;
        check(
            f["os"].contains("Phoenix test image"),
            format!("its own /etc/os-release: {log}"),
        )?;
        check(
            f["pid"] == "1",
            format!("PID 1 of its own namespace: {log}"),
        )?;
        let procs: u32 = f["procs"].parse().unwrap_or(99);
        check(
            procs <= 4,
            format!("sees only its own processes, not the host's: {log}"),
        )?;
        check(
            f["map"] == format!("0 {OFFSET} 65536"),
            format!("a user namespace mapping root to {OFFSET}: {log}"),
        )?;
        check(f["nnp"] == "1", format!("no_new_privs: {log}"))?;
        check(f["seccomp"] == "2", format!("a seccomp filter: {log}"))?;
        check(
            f["capeff"] == "0000000000000000",
            format!("no effective capability for a user: {log}"),
        )?;
        check(
            f["unshare"] == "no" && f["mount"] == "no",
            format!("no new namespaces or mounts: {log}"),
        )?;
        check(
            log.contains(&format!("greeting=hi port={}", addr.port())),
            format!("the environment: {log}"),
        )?;
        // Its processes are in its cgroup, counted from outside.
        let pids = kit.driver.cgroups().pids("iso-1a2b3c");
        check(
            pids.contains(&process.pid),
            format!("its init {} in its cgroup {pids:?}", process.pid),
        )
    })();
    kit.stop(&mut process, Duration::from_secs(1));
    result
}

fn stop_is_sigterm_then_the_whole_cgroup(kit: &Kit) -> Result<(), String> {
    let polite = kit.spec(
        "stop-polite",
        "trap 'echo got TERM; exit 0' TERM; echo ready; while true; do sleep 0.05; done",
    );
    let (mut process, _) = kit.start(&polite)?;
    kit.wait_log(&polite, "ready")?;
    let exit = kit.stop(&mut process, Duration::from_secs(10));
    check(
        exit.text == "exit code 0",
        format!("SIGTERM ends it: {exit}"),
    )?;
    check(kit.log(&polite).contains("got TERM"), "the trap ran")?;

    // Ignores SIGTERM and leaves a grandchild in a session of its own.
    let stubborn = kit.spec(
        "stop-stubborn",
        "trap '' TERM; setsid sleep 1000 & sleep 1000 & echo ready; while true; do sleep 0.05; done",
    );
    let (mut process, _) = kit.start(&stubborn)?;
    kit.wait_log(&stubborn, "ready")?;
    let before = kit.driver.cgroups().pids("stop-stubborn");
    check(
        before.len() >= 3,
        format!("init, the grandchild and a sleep: {before:?}"),
    )?;
    let exit = kit.stop(&mut process, Duration::from_millis(300));
    check(
        exit.text.starts_with("killed by signal 9") && exit.text.contains("did not stop"),
        format!("SIGKILL after the grace: {exit}"),
    )?;
    let alive: Vec<u32> = before
        .iter()
        .copied()
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    check(
        alive.is_empty(),
        format!("every process of its cgroup is gone: {alive:?}"),
    )?;
    check(
        !kit.driver.cgroups().exists("stop-stubborn"),
        "its cgroup is removed",
    )?;
    check(
        !kit.driver.bundle("stop-stubborn").exists(),
        "its bundle is removed",
    )?;
    check(
        !kit.state().join("layers/stop-stubborn").exists(),
        "its writable layer is removed",
    )
}

fn over_its_memory_limit_it_is_oom_killed(kit: &Kit) -> Result<(), String> {
    // PID 1 itself takes a buffer of `block` under a 32 MiB limit.
    let dd = |name: &str, block: &str| {
        let mut spec = kit.spec(name, "");
        spec.argv = ["/bin/dd", "if=/dev/zero", "of=/dev/null", block, "count=1"]
            .map(String::from)
            .to_vec();
        spec.resources.memory = Some(32 << 20);
        spec
    };
    let spec = dd("oom-1", "bs=128M");
    let (mut process, _) = kit.start(&spec)?;
    let exit = kit.exited(&mut process);
    check(
        exit.oom,
        format!("an OOM kill: {exit}; log: {}", kit.log(&spec)),
    )?;
    check(
        exit.text == "killed by signal 9",
        format!("by SIGKILL: {exit}"),
    )?;
    // Under the limit, the same command finishes.
    let (mut process, _) = kit.start(&dd("oom-2", "bs=4M"))?;
    let exit = kit.exited(&mut process);
    check(
        !exit.oom && exit.text == "exit code 0",
        format!("no OOM: {exit}"),
    )
}

fn limits_and_usage_come_from_its_cgroup(kit: &Kit) -> Result<(), String> {
    // 24 MiB on a tmpfs is charged to the instance.
    let mut spec = kit.spec(
        "limits-1",
        "head -c 25165824 /dev/zero > /dev/shm/blob; echo filled=1; sleep 30",
    );
    spec.resources = Resources {
        cpus: Some(0.25),
        memory: Some(128 << 20),
        pids: Some(20),
        nofile: Some(512),
    };
    let (mut process, _) = kit.start(&spec)?;
    let result = (|| {
        kit.wait_log(&spec, "filled=1")?;
        let usage = kit
            .driver
            .usage("limits-1", process.pid)
            .ok_or("no usage from the cgroup")?;
        check(
            (24 << 20..=96 << 20).contains(&usage.rss_bytes),
            format!("24 MiB of tmpfs and the shell: {} bytes", usage.rss_bytes),
        )?;
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", process.pid))
            .map_err(|e| e.to_string())?;
        check(
            limits
                .lines()
                .any(|l| l.starts_with("Max open files") && l.contains(" 512 ")),
            format!("RLIMIT_NOFILE 512: {limits}"),
        )?;
        let path = kit.driver.cgroups().path_of("limits-1");
        let quota = std::fs::read_to_string(format!("/sys/fs/cgroup/cpu{path}/cpu.cfs_quota_us"))
            .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cpu.max")))
            .map_err(|e| format!("cpu limit file: {e}"))?;
        check(
            quota.trim() == "25000" || quota.trim() == "25000 100000",
            format!("a quarter of a core: {quota}"),
        )
    })();
    kit.stop(&mut process, Duration::from_secs(1));
    result?;
    // Forks past the pids limit fail: the shell counts how far it got.
    let mut spec = kit.spec(
        "limits-2",
        "for i in $(seq 60); do echo n=$i; sleep 30 & done; echo all=started",
    );
    spec.resources.pids = Some(20);
    let (mut process, _) = kit.start(&spec)?;
    let exit = kit.exited(&mut process);
    let log = kit.log(&spec);
    let last: u32 = log
        .lines()
        .filter_map(|l| l.strip_prefix("n="))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0);
    check(
        !log.contains("all=started") && (15..=20).contains(&last),
        format!("the 20th process or so could not start ({exit}): last n={last}"),
    )
}

fn bridge_addresses_reach_each_instance(kit: &Kit) -> Result<(), String> {
    let bridge = Bridge::create(&BridgeConfig {
        name: format!("pxt{}", &kit.runtime_name[..3]),
        subnet: None,
    })
    .map_err(|e| e.to_string())?;
    let result = (|| {
        let serve = |name: &str| {
            let mut spec = kit.spec(
                name,
                r#"mkdir -p /tmp/www && echo "hello from $(hostname)" > /tmp/www/index.html &&
                   echo "routes=$(ip route 2>/dev/null | head -1)";
                   exec httpd -f -p "$HOST:$PORT" -h /tmp/www"#,
            );
            spec.network = Network::Bridge(bridge.clone());
            spec.port = Some(8080);
            spec
        };
        let (a_spec, b_spec) = (serve("net-a"), serve("net-b"));
        let (mut a, a_addr) = kit.start(&a_spec)?;
        let (mut b, b_addr) = kit.start(&b_spec)?;
        let result = (|| {
            check(
                a_addr.ip() != b_addr.ip() && a_addr.port() == 8080,
                format!("own addresses, same port: {a_addr} {b_addr}"),
            )?;
            let subnet = bridge.subnet();
            for addr in [a_addr, b_addr] {
                let std::net::IpAddr::V4(ip) = addr.ip() else {
                    return Err("not IPv4".into());
                };
                check(subnet.overlaps(ip, 32), format!("{ip} is in {subnet}"))?;
            }
            check(
                http_get(a_addr)?.contains("hello from net-a"),
                "the first answers",
            )?;
            check(
                http_get(b_addr)?.contains("hello from net-b"),
                "the second answers",
            )?;
            // One instance reaches the other by its address, through the bridge.
            let (mut probe, _) = kit.start(&{
                let mut spec = kit.spec(
                    "net-probe",
                    &format!("wget -q -O - http://{b_addr}/ && echo fetched=1"),
                );
                spec.network = Network::Bridge(bridge.clone());
                spec
            })?;
            let exit = kit.exited(&mut probe);
            let log =
                std::fs::read_to_string(kit.state().join("net-probe.log")).unwrap_or_default();
            check(
                exit.text == "exit code 0" && log.contains("hello from net-b"),
                format!("instance to instance: {exit}: {log}"),
            )
        })();
        kit.stop(&mut a, Duration::from_secs(1));
        kit.stop(&mut b, Duration::from_secs(1));
        result
    })();
    bridge.remove().map_err(|e| e.to_string())?;
    result
}

fn http_get(addr: SocketAddr) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(mut stream) => {
                stream
                    .write_all(b"GET / HTTP/1.0\r\n\r\n")
                    .map_err(|e| e.to_string())?;
                let mut answer = String::new();
                stream
                    .read_to_string(&mut answer)
                    .map_err(|e| e.to_string())?;
                return Ok(answer);
            }
            Err(e) if Instant::now() > deadline => return Err(format!("connect {addr}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

const SECRET: &str = "s3cr3t-value-7f1e2d";

fn secrets_are_0400_files_and_nowhere_else(kit: &Kit) -> Result<(), String> {
    let mut spec = kit.spec(
        "secret-1",
        r#"echo "mode=$(stat -c %a /run/secrets/db)"; echo "owner=$(stat -c %u /run/secrets/db)";
           echo "fs=$(stat -f -c %T /run/secrets)"; echo "value=$(cat /run/secrets/db | md5sum | cut -c1-8)";
           echo "inenv=$(env | grep -c s3cr3t)"; echo done=1; sleep 30"#,
    );
    spec.user = "app".into();
    spec.secrets = vec![Secret {
        name: "db".into(),
        value: SECRET.as_bytes().to_vec(),
    }];
    let (mut process, _) = kit.start(&spec)?;
    let result = (|| {
        let log = kit.wait_log(&spec, "done=1")?;
        let f = fields(&log);
        check(f["mode"] == "400", format!("mode 0400: {log}"))?;
        check(
            f["owner"] == "1000",
            format!("owned by the instance's user: {log}"),
        )?;
        check(f["fs"] == "tmpfs", format!("on a tmpfs: {log}"))?;
        let expected = md5_prefix(SECRET);
        check(f["value"] == expected, format!("the value: {log}"))?;
        check(f["inenv"] == "0", format!("not in the environment: {log}"))?;
        // Nothing Phoenix wrote holds it: not the spec, the plan, the log, the layer.
        let mut found = files_holding(kit.state(), SECRET.as_bytes());
        found.extend(files_holding(kit.driver.run_dir(), SECRET.as_bytes()));
        check(found.is_empty(), format!("the secret is in {found:?}"))
    })();
    kit.stop(&mut process, Duration::from_secs(1));
    result
}

fn md5_prefix(text: &str) -> String {
    let output = std::process::Command::new("/bin/busybox")
        .args([
            "sh",
            "-c",
            &format!("printf %s '{text}' | md5sum | cut -c1-8"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn exec_runs_inside_as_its_user(kit: &Kit) -> Result<(), String> {
    let mut spec = kit.spec("exec-1", "echo ready; sleep 30");
    spec.user = "app".into();
    spec.secrets = vec![Secret {
        name: "key".into(),
        value: b"k3y".to_vec(),
    }];
    let (mut process, _) = kit.start(&spec)?;
    let result = (|| {
        kit.wait_log(&spec, "ready")?;
        let script = "echo user=$(id -u) host=$(hostname) init=$(cat /proc/1/comm) \
             map=$(cat /proc/self/uid_map | tr -s ' ' | sed 's/^ //') key=$(cat /run/secrets/key) \
             nnp=$(grep NoNewPrivs /proc/self/status | tr -d '\t ' | cut -d: -f2) \
             cap=$(grep CapEff /proc/self/status | tr -d '\t ' | cut -d: -f2); exit 7";
        let output = std::process::Command::new("/proc/self/exe")
            .args(["__exec", &kit.runtime_name])
            .arg(kit.state())
            .args(["exec-1", "/bin/sh", "-c", script])
            .output()
            .map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        check(
            output.status.code() == Some(7),
            format!(
                "the exit code passes through: {:?} {stdout} {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        )?;
        let expected = format!(
            "user=1000 host=exec-1 init=sleep map=0 {OFFSET} 65536 key=k3y nnp=1 cap=0000000000000000"
        );
        check(
            stdout.trim() == expected,
            format!(
                "inside its namespaces, user namespace included, as its user:\n{stdout}\nnot\n{expected}"
            ),
        )?;
        // The command ran in the instance's cgroup (it counted against its limits).
        check(
            !kit.driver.cgroups().pids("exec-1").is_empty(),
            "the instance's cgroup",
        )
    })();
    kit.stop(&mut process, Duration::from_secs(1));
    result
}

/// In a helper process: starts `crash-1` (with a grandchild in a session of its own), prints
/// its pid, and waits to be killed, as a Phoenix that crashes.
fn start_and_hang(runtime: &str, state: &Path) -> ! {
    let driver = driver_for(runtime, state);
    let root = state.join("root");
    let spec = shell_spec(
        "crash-1",
        &root,
        state,
        "setsid sleep 1000 & sleep 1000 & echo ready; wait",
    );
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = tokio.enter();
    let (process, _) = driver.start(&spec).unwrap();
    println!("pid={} start={}", process.pid, process.start_time);
    std::io::stdout().flush().unwrap();
    std::mem::forget(process);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn cleanup_after_a_crash_leaves_no_process(kit: &Kit) -> Result<(), String> {
    let mut helper = std::process::Command::new("/proc/self/exe")
        .args(["__start_and_hang", &kit.runtime_name])
        .arg(kit.state())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    let mut stdout = helper.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte).map_err(|e| e.to_string())? == 1 && byte[0] != b'\n' {
        line.push(byte[0] as char);
    }
    let f: BTreeMap<String, String> = line
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let pid: u32 = f
        .get("pid")
        .and_then(|p| p.parse().ok())
        .ok_or(format!("helper said {line:?}"))?;
    let spec = kit.spec("crash-1", "");
    kit.wait_log(&spec, "ready")?;
    let before = kit.driver.cgroups().pids("crash-1");
    check(
        before.len() >= 3,
        format!("init, sleep and the grandchild: {before:?}"),
    )?;
    // Phoenix is killed: its shim goes with it.
    helper.kill().map_err(|e| e.to_string())?;
    helper.wait().map_err(|e| e.to_string())?;
    // The next Phoenix cleans up what it recorded.
    let recorded = Recorded {
        name: "crash-1".into(),
        pid: Some(pid),
        pid_start: f.get("start").and_then(|s| s.parse().ok()),
    };
    kit.driver.cleanup(&recorded);
    let alive: Vec<u32> = before
        .iter()
        .copied()
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists() && !zombie(*pid))
        .collect();
    check(
        alive.is_empty(),
        format!("processes left after the cleanup: {alive:?}"),
    )?;
    check(
        !kit.driver.cgroups().exists("crash-1"),
        "its cgroup is removed",
    )?;
    check(
        !kit.driver.bundle("crash-1").exists() && !kit.state().join("layers/crash-1").exists(),
        "its bundle and writable layer are removed",
    )
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn a_bad_entrypoint_is_a_clear_error(kit: &Kit) -> Result<(), String> {
    let mut spec = kit.spec("bad-1", "");
    spec.argv = vec!["/bin/nope".into()];
    match kit.start(&spec) {
        Ok((mut process, _)) => {
            let exit = kit.exited(&mut process);
            check(
                exit.text != "exit code 0",
                format!("a missing entrypoint cannot succeed: {exit}"),
            )
        }
        Err(error) => check(
            error.contains("/bin/nope") && error.contains("bad-1"),
            format!("the error names the instance and the entrypoint: {error}"),
        ),
    }?;
    let mut spec = kit.spec("bad-2", "true");
    spec.user = "nobody-here".into();
    let error = kit
        .start(&spec)
        .err()
        .ok_or("an unknown user must be refused")?;
    check(
        error.contains("nobody-here") && error.contains("/etc/passwd"),
        format!("the error names the user: {error}"),
    )
}

/// `sh -c script` in `root` on the host's network, logging to `STATE/NAME.log`.
fn shell_spec(name: &str, root: &Path, state: &Path, script: &str) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        role: "web".into(),
        root: root.to_path_buf(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: Vec::new(),
        workdir: "/".into(),
        user: String::new(),
        log_path: state.join(format!("{name}.log")),
        output: None,
        network: Network::Host,
        port: None,
        host_ip: std::net::Ipv4Addr::LOCALHOST,
        resources: Resources::default(),
        secrets: Vec::new(),
        allow_root: false,
        hosts: Vec::new(),
    }
}
