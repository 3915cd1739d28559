//! Test harness: the real `phoenix` binary, the real hello app, real sockets.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod rig;

pub fn phoenix_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_phoenix"))
}

/// The hello example app, built beside `phoenix` (its own integration tests make cargo build it).
pub fn hello_bin() -> PathBuf {
    let path = phoenix_bin().with_file_name("hello");
    assert!(
        path.is_file(),
        "{} is missing: run the whole workspace's tests (cargo test --workspace)",
        path.display()
    );
    path
}

/// Runs the `phoenix` CLI in `dir` (no `phoenix up` needed) and waits for it.
pub fn phoenix(dir: &Path, args: &[&str]) -> Output {
    Command::new(phoenix_bin())
        .args(args)
        .current_dir(dir)
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .unwrap()
}

/// Fleet file options for tests.
#[derive(Clone)]
pub struct Fleet {
    pub version: String,
    pub fail_health: bool,
    pub instances: u32,
    pub healthy_timeout: &'static str,
    pub drain: &'static str,
    /// Run the role's proxy in TCP mode (with its default TCP health check).
    pub tcp: bool,
    /// The body of an `[agent]` table.
    pub agent: Option<String>,
    /// A goss file written beside the fleet file as the recipe's `checks`.
    pub checks: Option<String>,
    /// The role's `drift_check` period.
    pub drift_check: Option<&'static str>,
    /// The body of a `[role.web.autoscale]` table.
    pub autoscale: Option<&'static str>,
    /// More TOML appended to the file (other `[role.web.*]` tables).
    pub more: &'static str,
    /// More keys of `[role.web]`.
    pub role_keys: &'static str,
    /// `network` of `[role.web]`: `host` unless a test runs Phoenix in a network namespace of
    /// its own (a bridge belongs there, not on the machine running the tests).
    pub network: &'static str,
    /// Copy the hello binary's loader and libraries into the image (it runs in containers).
    pub libraries: bool,
}

impl Fleet {
    pub fn version(version: &str) -> Fleet {
        Fleet {
            version: version.into(),
            fail_health: false,
            instances: 3,
            healthy_timeout: "20s",
            drain: "10s",
            tcp: false,
            agent: None,
            checks: None,
            drift_check: None,
            autoscale: None,
            more: "",
            role_keys: "",
            network: "host",
            libraries: true,
        }
    }

    /// Writes the fleet file (and its check file) into `dir`.
    pub fn write_to(&self, dir: &Path) {
        std::fs::write(dir.join("phoenix.toml"), self.toml()).unwrap();
        if let Some(checks) = &self.checks {
            std::fs::write(dir.join("checks.yaml"), checks).unwrap();
        }
    }

    pub fn toml(&self) -> String {
        let fail = if self.fail_health {
            ", FAIL_HEALTH = \"1\""
        } else {
            ""
        };
        format!(
            r#"[image.hello]
from = "scratch"
context = "{context}"
copy = [{{ src = "hello", dst = "/bin/hello", libraries = {libraries} }}]
env = {{ VERSION = "{version}"{fail} }}
entrypoint = ["/bin/hello"]
{checks}
[role.web]
image = "hello"
instances = {instances}
listen = "127.0.0.1:0"
stop_timeout = "5s"
network = "{network}"
{role_keys}{drift}
[role.web.health]
interval = "100ms"
timeout = "1s"
healthy_threshold = 2
unhealthy_threshold = 2

[role.web.deploy]
healthy_timeout = "{healthy_timeout}"
drain = "{drain}"
{autoscale}{more}{proxy}{agent}"#,
            context = hello_bin().parent().unwrap().display(),
            version = self.version,
            checks = if self.checks.is_some() {
                "checks = \"checks.yaml\"\n"
            } else {
                ""
            },
            instances = self.instances,
            drift = self
                .drift_check
                .map(|d| format!("drift_check = \"{d}\"\n"))
                .unwrap_or_default(),
            healthy_timeout = self.healthy_timeout,
            drain = self.drain,
            autoscale = self
                .autoscale
                .map(|body| format!("\n[role.web.autoscale]\n{body}"))
                .unwrap_or_default(),
            role_keys = self.role_keys,
            network = self.network,
            libraries = self.libraries,
            more = self.more,
            proxy = if self.tcp {
                "\n[role.web.proxy]\nmode = \"tcp\"\n"
            } else {
                ""
            },
            agent = self
                .agent
                .as_ref()
                .map(|body| format!("\n[agent]\n{body}"))
                .unwrap_or_default(),
        )
    }
}

/// A network namespace of the test's own, loopback up, held open by a descriptor: what runs
/// in it (a `phoenix up` with its bridge, the clients that talk to it) stays in it.
#[derive(Clone)]
pub struct Netns(Arc<std::fs::File>);

impl Netns {
    pub fn new() -> Netns {
        let file = std::thread::spawn(|| {
            phoenix_driver::test_util::own_network_namespace().expect("a network namespace");
            std::fs::File::open("/proc/thread-self/ns/net").unwrap()
        })
        .join()
        .unwrap();
        Netns(Arc::new(file))
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace descriptor we hold; it changes only this thread.
        let done = unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(done, 0, "setns");
    }

    /// Makes `command` start in the namespace.
    pub fn apply(&self, command: &mut Command) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = self.0.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the descriptor stays open across the fork.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Runs `work` on a thread inside the namespace (sockets it opens stay there).
    pub fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let netns = self.clone();
        std::thread::spawn(move || {
            netns.enter();
            work()
        })
        .join()
        .unwrap()
    }
}

/// A running `phoenix up` in a temporary directory.
pub struct Phoenix {
    pub dir: tempfile::TempDir,
    pub child: Child,
    extra_args: Vec<String>,
    /// The network namespace it runs in, when not the test's own.
    pub netns: Option<Netns>,
}

impl Phoenix {
    /// Starts `phoenix up` on `fleet` and waits until its role serves.
    pub fn start(fleet: &Fleet) -> Phoenix {
        Phoenix::start_with(fleet, &[])
    }

    pub fn start_with(fleet: &Fleet, extra_args: &[&str]) -> Phoenix {
        Phoenix::start_in(fleet, extra_args, None)
    }

    /// `phoenix up` in a network namespace of its own, where its bridge is made; the harness's
    /// commands and requests go there too.
    pub fn start_in_netns(fleet: &Fleet) -> Phoenix {
        Phoenix::start_in(fleet, &[], Some(Netns::new()))
    }

    fn start_in(fleet: &Fleet, extra_args: &[&str], netns: Option<Netns>) -> Phoenix {
        let dir = tempfile::tempdir().unwrap();
        fleet.write_to(dir.path());
        let mut phoenix = Phoenix::launch(dir, extra_args, netns);
        phoenix.wait_serving(fleet.instances);
        phoenix
    }

    /// `phoenix up` on `fleet`, once `prepare` has written more files beside it.
    pub fn start_prepared(fleet: &Fleet, prepare: impl FnOnce(&Path)) -> Phoenix {
        let dir = tempfile::tempdir().unwrap();
        fleet.write_to(dir.path());
        prepare(dir.path());
        let mut phoenix = Phoenix::launch(dir, &[], None);
        phoenix.wait_serving(fleet.instances);
        phoenix
    }

    /// The directory of the fleet file (and the state under it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `phoenix up` on the fleet file already in `dir`, without waiting for it.
    pub fn launch(dir: tempfile::TempDir, extra_args: &[&str], netns: Option<Netns>) -> Phoenix {
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let child = spawn_up(dir.path(), &extra_args, netns.as_ref());
        Phoenix {
            dir,
            child,
            extra_args,
            netns,
        }
    }

    /// Waits until role `role`'s live generation has `instances` healthy instances.
    pub fn wait_role(&mut self, role: &str, instances: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!("phoenix up exited ({exit}) before serving:\n{}", self.log());
            }
            let healthy = self.try_status().map(|status| {
                status["roles"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|r| r["name"] == role)
                    .flat_map(|r| {
                        let live = r["live_generation"].clone();
                        r["generations"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .filter(move |g| g["id"] == live)
                            .flat_map(|g| g["instances"].as_array().unwrap().clone())
                            .collect::<Vec<_>>()
                    })
                    .filter(|i| i["status"] == "healthy")
                    .count()
            });
            if healthy == Some(instances) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "role {role} did not get {instances} healthy instances\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One GET of `path` on `addr`, from inside Phoenix's network namespace.
    pub fn get(&self, addr: SocketAddr, path: &str) -> String {
        let path = path.to_string();
        match &self.netns {
            Some(netns) => netns.run(move || get_once(addr, &path)),
            None => get_once(addr, &path),
        }
    }

    /// Load on `addr` from inside Phoenix's network namespace.
    pub fn load(&self, addr: SocketAddr, clients: usize) -> Load {
        Load::start_in(self.netns.clone(), addr, clients)
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn fleet_path(&self) -> PathBuf {
        self.dir.path().join("phoenix.toml")
    }

    pub fn write_fleet(&self, fleet: &Fleet) {
        fleet.write_to(self.dir.path());
    }

    /// Starts `phoenix up` again on the same state (after a crash).
    pub fn restart(&mut self, instances: u32) {
        self.respawn();
        self.wait_serving(instances);
    }

    /// Starts `phoenix up` again on the same directory, without waiting for it.
    pub fn respawn(&mut self) {
        self.child = spawn_up(self.dir.path(), &self.extra_args, self.netns.as_ref());
    }

    /// Runs a `phoenix` CLI command against this state directory.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut command = Command::new(phoenix_bin());
        command
            .arg("--state")
            .arg(self.state())
            .args(args)
            .current_dir(self.dir.path());
        if let Some(netns) = &self.netns {
            netns.apply(&mut command);
        }
        command.output().unwrap()
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        succeeded(&format!("phoenix {args:?}"), self.cli(args))
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.cli_ok(&["status", "--json"])).unwrap()
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.status()["roles"][0]["listen"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn history(&self) -> Vec<Value> {
        serde_json::from_str::<Value>(
            &self.cli_ok(&["history", "web", "--json", "--limit", "100000"]),
        )
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
    }

    /// The live generation's instances as `phoenix status --json` shows them.
    /// The live instances of role `web` (the harness's role).
    pub fn live_instances(&self) -> Vec<Value> {
        let status = self.status();
        let role = status["roles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "web")
            .cloned()
            .unwrap_or_default();
        role["generations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["id"] == role["live_generation"])
            .and_then(|g| g["instances"].as_array().cloned())
            .unwrap_or_default()
    }

    /// The journal's events of `kind` for role web, oldest first.
    pub fn events(&self, kind: &str) -> Vec<Value> {
        self.history()
            .into_iter()
            .filter(|e| e["kind"] == kind)
            .collect()
    }

    /// A GET of `path` on the API's socket, the whole response.
    pub fn api_get(&self, path: &str) -> String {
        unix_request(&self.state().join("api.sock"), "GET", path, "")
    }

    /// Waits until the live generation has `instances` healthy instances; on failure the
    /// panic shows the last status and `phoenix up`'s log, so a CI failure explains itself.
    pub fn wait_serving(&mut self, instances: u32) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        loop {
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!("phoenix up exited ({exit}) before serving:\n{}", self.log());
            }
            last = self.try_status().or(last);
            if let Some(status) = &last {
                let role = &status["roles"][0];
                let live = role["generations"].as_array().and_then(|g| {
                    g.iter()
                        .find(|g| g["id"] == role["live_generation"])
                        .cloned()
                });
                let healthy = live
                    .map(|g| {
                        g["instances"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .filter(|i| i["status"] == "healthy")
                            .count()
                    })
                    .unwrap_or(0);
                if healthy == instances as usize {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "phoenix did not serve {instances} healthy instances in time\nlast status: {}\n{}",
                last.map(|s| s.to_string()).unwrap_or_else(|| "none".into()),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The end of `phoenix up`'s stdout and stderr.
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "--- up.log (last {} lines) ---\n{}",
            tail.len(),
            tail.join("\n")
        )
    }

    fn try_status(&self) -> Option<Value> {
        if !self.state().join("api.sock").exists() {
            return None;
        }
        let output = self.cli(&["status", "--json"]);
        output
            .status
            .success()
            .then(|| serde_json::from_slice(&output.stdout).ok())
            .flatten()
    }

    /// Sends SIGKILL to `phoenix up` and waits for it.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Ctrl-C: SIGINT and wait for a clean exit.
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        signal(self.child.id(), 2);
        self.child.wait().unwrap()
    }
}

impl Drop for Phoenix {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.child.id(), 2);
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(self.dir.path())
            .status();
    }
}

fn spawn_up(dir: &Path, extra_args: &[String], netns: Option<&Netns>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("up.log"))
        .unwrap();
    let mut command = Command::new(phoenix_bin());
    if let Some(netns) = netns {
        netns.apply(&mut command);
    }
    command
        .args([
            "--state",
            "state",
            "up",
            "--log",
            "info",
            "-f",
            "phoenix.toml",
        ])
        .args(extra_args)
        .current_dir(dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Waits until `done`, checking every 50 ms, failing after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `phoenix members --json` against the agent at `rpc`, with extra `filters`.
pub fn members_json(rpc: SocketAddr, filters: &[&str]) -> Vec<Value> {
    let out = Command::new(phoenix_bin())
        .args(["members", "--json", "--rpc-addr", &rpc.to_string()])
        .args(filters)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The address a process printed right after `marker` in its log, once it is there.
/// Servers under test bind port 0 and report the port: a port picked in advance by the
/// test can be taken by any connection's ephemeral port before the server binds it.
pub fn addr_in_log(log: &Path, marker: &str) -> SocketAddr {
    let mut found = None;
    wait_for(
        &format!("{marker:?} in {}", log.display()),
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            found = text.split_once(marker).and_then(|(_, rest)| {
                let end = rest
                    .find(|c: char| !(c.is_ascii_digit() || ".:[]".contains(c)))
                    .unwrap_or(rest.len());
                rest[..end].parse().ok()
            });
            found.is_some()
        },
    );
    found.unwrap()
}

pub fn signal(pid: u32, sig: i32) {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    unsafe { kill(pid as i32, sig) };
}

/// One GET of `path` on a fresh connection to `addr`: the whole response, head and body.
pub fn get_once(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// One request over a Unix socket (`extra` is more header lines, each ending in CRLF); the
/// whole response.
pub fn unix_request(socket: &Path, method: &str, path: &str, extra: &str) -> String {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n{extra}Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// The stdout of a command that must have succeeded (else both outputs, in the panic).
pub fn succeeded(what: &str, output: Output) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every process of the instances of the state directory `state`: those in its containers'
/// cgroups, and those whose executable lies under it (the process driver runs them from the
/// image roots).
pub fn processes_under(state: &Path) -> Vec<u32> {
    let state = state.canonicalize().unwrap();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        if exe.starts_with(&state) && !is_zombie(pid) {
            pids.push(pid);
        }
    }
    let hash = phoenix_driver::state_hash(&state);
    for base in ["/sys/fs/cgroup/memory/phoenix", "/sys/fs/cgroup/phoenix"] {
        let Ok(instances) = std::fs::read_dir(Path::new(base).join(&hash)) else {
            continue;
        };
        for instance in instances.flatten() {
            let procs =
                std::fs::read_to_string(instance.path().join("cgroup.procs")).unwrap_or_default();
            pids.extend(
                procs
                    .lines()
                    .filter_map(|l| l.parse::<u32>().ok())
                    .filter(|pid| !is_zombie(*pid)),
            );
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The unpacked root instances of `image` run from: shifted into the user namespace for
/// containers, as is for the process driver.
pub fn image_root(state: &Path, image: &str) -> PathBuf {
    let hex = &image["sha256:".len()..];
    let roots = state.join("images/roots");
    [
        format!("{hex}-ws{}", phoenix_fleet::ID_OFFSET),
        format!("{hex}-w0"),
        hex.to_string(),
    ]
    .into_iter()
    .map(|name| roots.join(name))
    .find(|root| root.is_dir())
    .unwrap_or_else(|| panic!("no unpacked root of {image} in {}", roots.display()))
}

pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                .unwrap_or(true)
        })
        .unwrap_or(true)
}

/// One response seen by the load.
#[derive(Debug, Clone)]
pub struct Sample {
    pub started: Instant,
    pub result: Result<String, String>,
}

/// Concurrent keep-alive clients sending `GET /` in a loop, recording every response.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub samples: Arc<Mutex<Vec<Sample>>>,
}

impl Load {
    pub fn start(addr: SocketAddr, clients: usize) -> Load {
        Load::start_in(None, addr, clients)
    }

    /// Load from inside `netns` (the clients' sockets are made there).
    pub fn start_in(netns: Option<Netns>, addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, samples, netns) = (stop.clone(), samples.clone(), netns.clone());
                std::thread::spawn(move || {
                    if let Some(netns) = netns {
                        netns.enter();
                    }
                    client_loop(addr, &stop, &samples)
                })
            })
            .collect();
        Load {
            stop,
            threads,
            samples,
        }
    }

    pub fn count(&self) -> usize {
        self.samples.lock().unwrap().len()
    }

    pub fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
        Arc::try_unwrap(self.samples).unwrap().into_inner().unwrap()
    }
}

fn client_loop(addr: SocketAddr, stop: &AtomicBool, samples: &Mutex<Vec<Sample>>) {
    let mut connection: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let result = get_version(addr, &mut connection);
        if result.is_err() {
            connection = None;
        }
        samples.lock().unwrap().push(Sample { started, result });
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One keep-alive `GET /`; returns the version in `hello from NAME version V`.
fn get_version(
    addr: SocketAddr,
    connection: &mut Option<BufReader<TcpStream>>,
) -> Result<String, String> {
    if connection.is_none() {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        *connection = Some(BufReader::new(stream));
    }
    let reader = connection.as_mut().unwrap();
    reader
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .map_err(|e| format!("read: {e}"))?;
    if status_line.is_empty() {
        return Err("connection closed".into());
    }
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value
                .trim()
                .parse()
                .map_err(|_| "bad content-length".to_string())?;
        }
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .map_err(|e| format!("read body: {e}"))?;
    let body = text(&body);
    if !status_line.starts_with("HTTP/1.1 200") {
        return Err(format!("{} {}", status_line.trim(), body.trim()));
    }
    body.trim()
        .rsplit_once(" version ")
        .map(|(_, v)| v.to_string())
        .ok_or(format!("unexpected body {body:?}"))
}

/// The failures among `samples`, for assertion messages.
pub fn failures(samples: &[Sample]) -> Vec<String> {
    samples
        .iter()
        .filter_map(|s| s.result.clone().err())
        .collect()
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
pub fn make_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (Debian's package) is installed");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            text(&output.stderr)
        );
    };
    // Extensions make them version 3, as WebPKI requires.
    std::fs::write(dir.join("server.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("client.cnf"), "extendedKeyUsage=clientAuth\n").unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=phoenix test CA",
    ]);
    for name in ["server", "client"] {
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.cnf"),
        ]);
    }
}

/// busybox nc to `addr` as uid and gid 65534 inside `netns`: a local user who is not root.
pub fn connect_as_nobody(netns: &Netns, addr: SocketAddr) -> Output {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new("/bin/busybox");
    command.args([
        "nc",
        "-w",
        "2",
        &addr.ip().to_string(),
        &addr.port().to_string(),
    ]);
    netns.apply(&mut command);
    // SAFETY: setgroups, setgid and setuid are async-signal-safe; run after the setns above.
    unsafe {
        command.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.stdin(std::process::Stdio::null());
    command.output().unwrap()
}

/// Debian's `serf`, or None (the test is skipped) where it is not installed and not required
/// (`PHOENIX_REQUIRE_SERF`, which CI sets).
pub fn serf_or_skip() -> Option<PathBuf> {
    let serf = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("serf"))
            .find(|candidate| candidate.is_file())
    });
    if serf.is_none() {
        assert!(
            std::env::var_os("PHOENIX_REQUIRE_SERF").is_none(),
            "PHOENIX_REQUIRE_SERF is set but serf is not installed"
        );
        eprintln!("skipped: serf not installed (apt-get install serf)");
    }
    serf
}

/// A loopback port free for both TCP and UDP (a Serf agent binds both).
pub fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
