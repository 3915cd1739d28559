//! The isolating and runc drivers: an instance is an OCI container watched by a shim.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::Command;

use crate::cgroup::Cgroups;
use crate::net::{Attach, Lease};
use crate::process::{Exit, Process};
use crate::shim::{Plan, READY_FD, Report, RuntimePlan, SHIM_ARG};
use crate::{Driver, DriverError, InstanceSpec, Network, Recorded, Usage};

/// Which OCI runtime makes the containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runtime {
    /// youki's libcontainer, inside Phoenix's shim: nothing to install.
    Builtin,
    /// An OCI runtime binary (runc, or any with runc's command line).
    Oci(PathBuf),
}

/// How long a container may take from the shim's start to running.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs instances as containers.
#[derive(Debug, Clone)]
pub struct ContainerDriver {
    runtime: Runtime,
    /// `/run/phoenix/HASH`: bundles and the runtime's state.
    run_dir: PathBuf,
    /// `STATE/layers`: each instance's writable layer, on disk.
    layers_dir: PathBuf,
    cgroups: Cgroups,
    /// The host uid of uid 0 inside every instance's user namespace.
    id_offset: u32,
    /// The program started as the shim: this very binary.
    helper: PathBuf,
}

impl ContainerDriver {
    /// A driver for the state directory `state_dir`. Needs root (rootless containers are not
    /// supported) and cgroups it may write; `id_offset` is the host uid that instances' root
    /// maps to. The runtime binary, when one is named, must run.
    pub fn new(runtime: Runtime, state_dir: &Path, id_offset: u32) -> Result<Self, DriverError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(DriverError::Unsupported(
                "containers need root: Phoenix does not run rootless containers yet".into(),
            ));
        }
        let parent = format!("phoenix/{}", state_hash(state_dir));
        let cgroups = Cgroups::detect(&parent).ok_or_else(|| {
            DriverError::Unsupported("no cgroup memory controller is mounted".into())
        })?;
        if let Runtime::Oci(binary) = &runtime {
            let runs = std::process::Command::new(binary)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !runs {
                return Err(DriverError::Unsupported(format!(
                    "the OCI runtime {} does not run (install runc: apt-get install runc)",
                    binary.display()
                )));
            }
        }
        // Runtimes resolve the spec's paths from wherever they run: make them absolute.
        let state_dir = std::path::absolute(state_dir)
            .map_err(DriverError::io("-", "resolve the state directory"))?;
        let run_dir = run_dir_of(&state_dir);
        let layers_dir = state_dir.join("layers");
        // An instance's init, in its user namespace, reaches its root and the files bound into
        // it by these paths: traversable, not listable, all the way down from `/run` (a state
        // directory under a private home directory could not be). The runtime's state and the
        // writable layers (mounted by root) are the owner's alone.
        for (dir, mode) in [
            (run_dir.parent().unwrap_or(&run_dir).to_path_buf(), 0o711),
            (run_dir.clone(), 0o711),
            (run_dir.join("instances"), 0o711),
            (run_dir.join("runtime"), 0o700),
            (layers_dir.clone(), 0o700),
        ] {
            fs::create_dir_all(&dir).map_err(DriverError::io("-", "create the run directory"))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode))
                .map_err(DriverError::io("-", "protect the run directory"))?;
        }
        Ok(ContainerDriver {
            runtime,
            run_dir,
            layers_dir,
            cgroups,
            id_offset,
            helper: PathBuf::from("/proc/self/exe"),
        })
    }

    /// Instances whose shim's Phoenix is gone (it was killed) but that no record names: the
    /// throwaway instances of verifications.
    pub fn orphans(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.run_dir.join("instances")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let plan: Plan =
                    serde_json::from_slice(&fs::read(entry.path().join("shim.json")).ok()?).ok()?;
                let alive = Path::new(&format!("/proc/{}", plan.parent)).exists();
                (!alive).then_some(plan.id)
            })
            .collect()
    }

    /// Removes what the driver keeps for the state directory as a whole (its parent cgroup,
    /// its run directory), once no instance runs.
    pub fn shut_down(&self) {
        self.cgroups.remove_parent();
        for dir in [
            self.run_dir.join("instances"),
            self.run_dir.join("runtime"),
            self.run_dir.clone(),
        ] {
            let _ = fs::remove_dir(dir);
        }
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub fn cgroups(&self) -> &Cgroups {
        &self.cgroups
    }

    /// Where instance `name`'s bundle is (its spec, its root's mount point, its reports).
    pub fn bundle(&self, name: &str) -> PathBuf {
        self.run_dir.join("instances").join(name)
    }

    /// Where the containers are run from (bundles and the runtime's state).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    fn runtime_plan(&self) -> RuntimePlan {
        let state_root = self.run_dir.join("runtime");
        match &self.runtime {
            Runtime::Builtin => RuntimePlan::Builtin { state_root },
            Runtime::Oci(binary) => RuntimePlan::Oci {
                binary: binary.clone(),
                state_root,
            },
        }
    }

    /// Where the runtime keeps its state of the containers, and the command to reach one.
    pub fn exec_target(&self, name: &str) -> ExecTarget {
        ExecTarget {
            id: name.to_string(),
            runtime: self.runtime_plan(),
            bundle: self.bundle(name),
            cgroup_parent: Some(self.cgroups.path_of("").trim_end_matches('/').to_string()),
        }
    }

    fn write_bundle(
        &self,
        spec: &InstanceSpec,
        bundle: &Path,
        user: &crate::user::User,
        env: &[(String, String)],
        own_addr: Option<Ipv4Addr>,
    ) -> std::io::Result<Option<u32>> {
        if bundle.exists() {
            remove_bundle(bundle);
        }
        fs::create_dir_all(bundle)?;
        // Traversable, not listable: the runtime enters the bundle before the user namespace
        // and reaches the root and the bound files from it after.
        fs::set_permissions(bundle, fs::Permissions::from_mode(0o711))?;
        let id_offset = (!spec.allow_root).then_some(self.id_offset);
        let layout = crate::spec::Layout {
            rootfs: &bundle.join("rootfs"),
            bundle,
            user,
            cgroups_path: self.cgroups.path_of(&spec.name),
            id_offset,
            seccomp: match self.runtime {
                Runtime::Builtin => None,
                Runtime::Oci(_) => Some(crate::seccomp::oci_profile()),
            },
            env,
        };
        let config = crate::spec::runtime_spec(spec, &layout);
        write_private(
            &bundle.join("config.json"),
            &serde_json::to_vec_pretty(&config)?,
        )?;
        write_public(
            &bundle.join("hosts"),
            crate::spec::hosts_file(spec, own_addr).as_bytes(),
        )?;
        write_public(
            &bundle.join("hostname"),
            format!("{}\n", spec.name).as_bytes(),
        )?;
        Ok(id_offset)
    }
}

/// The runtime state and id of one container, for `phoenix exec`.
#[derive(Debug, Clone)]
pub struct ExecTarget {
    id: String,
    runtime: RuntimePlan,
    /// The container's bundle: its spec says who the instance's process runs as.
    bundle: PathBuf,
    /// Where the instances' cgroups are.
    cgroup_parent: Option<String>,
}

impl ExecTarget {
    /// The running container `name` of the state directory `state_dir`, as its shim's plan
    /// describes it; `None` when it does not run.
    pub fn find(state_dir: &Path, name: &str) -> Option<ExecTarget> {
        let state_dir = std::path::absolute(state_dir).ok()?;
        let bundle = run_dir_of(&state_dir).join("instances").join(name);
        let plan: Plan = serde_json::from_slice(&fs::read(bundle.join("shim.json")).ok()?).ok()?;
        Some(ExecTarget {
            id: plan.id,
            runtime: plan.runtime,
            bundle,
            cgroup_parent: Some(plan.cgroup_parent),
        })
    }

    /// Runs `argv` in the running container as its user, with its environment, limits and
    /// filters, with this process's stdin, stdout and stderr; returns its exit code (128 + N
    /// when killed by signal N). Call it while this process has one thread.
    pub fn run(&self, argv: &[String]) -> Result<i32, DriverError> {
        let fail = |message: String| DriverError::Start {
            name: self.id.clone(),
            message,
        };
        match &self.runtime {
            RuntimePlan::Builtin { .. } => {
                // libcontainer's tenants do not join a user namespace: Phoenix enters itself.
                let config: serde_json::Value = fs::read(self.bundle.join("config.json"))
                    .ok()
                    .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                    .ok_or_else(|| fail("the instance is not running (no bundle)".into()))?;
                let pid: u32 = fs::read_to_string(self.bundle.join("init.pid"))
                    .ok()
                    .and_then(|p| p.trim().parse().ok())
                    .ok_or_else(|| fail("the instance's init process is not recorded".into()))?;
                let cgroups = self.cgroup_parent.as_deref().and_then(|parent| {
                    Cgroups::detect(parent).map(|cgroups| (cgroups, self.id.clone()))
                });
                crate::exec::exec_inside(&config, pid, cgroups, argv)
                    .map_err(|e| fail(format!("cannot run in the instance: {e}")))?;
                unreachable!("exec_inside returns only with an error")
            }
            RuntimePlan::Oci { binary, state_root } => {
                let status = std::process::Command::new(binary)
                    .arg("--root")
                    .arg(state_root)
                    .arg("exec")
                    .arg(&self.id)
                    .args(argv)
                    .status()
                    .map_err(|e| fail(format!("cannot run {}: {e}", binary.display())))?;
                use std::os::unix::process::ExitStatusExt;
                Ok(status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
            }
        }
    }
}

impl Driver for ContainerDriver {
    fn name(&self) -> &'static str {
        match self.runtime {
            Runtime::Builtin => "isolating",
            Runtime::Oci(_) => "runc",
        }
    }

    fn id_offset(&self, allow_root: bool) -> Option<u32> {
        Some(if allow_root { 0 } else { self.id_offset })
    }

    fn start(&self, spec: &InstanceSpec) -> Result<(Process, SocketAddr), DriverError> {
        let io = |action| DriverError::io(&spec.name, action);
        let user =
            crate::user::resolve(&spec.root, &spec.user).map_err(|message| DriverError::Start {
                name: spec.name.clone(),
                message,
            })?;
        let (lease, attach, host, port) = match &spec.network {
            Network::Bridge(bridge) => {
                let port = spec.port.unwrap_or(8080);
                let mut lease = bridge.lease(&spec.role, &self.cgroups.path_of(&spec.name))?;
                lease.publish(port)?;
                let attach = Attach::new(bridge, &lease);
                (Some(lease), Some(attach), None, port)
            }
            Network::Host => {
                let port = match spec.port {
                    Some(port) => port,
                    None => crate::process::free_port().map_err(io("find a free port"))?,
                };
                (None, None, Some(spec.host_ip), port)
            }
        };
        let own_addr = lease.as_ref().map(|l| l.addr);
        let listen_on = own_addr.or(host).unwrap_or(Ipv4Addr::LOCALHOST);
        let mut env = spec.env.clone();
        env.extend(crate::listen_env(&spec.name, &listen_on.to_string(), port));
        let bundle = self.bundle(&spec.name);
        let id_offset = self
            .write_bundle(spec, &bundle, &user, &env, own_addr)
            .map_err(io("write its bundle"))?;
        let owner = id_offset.unwrap_or(0);
        let plan = Plan {
            id: spec.name.clone(),
            bundle: bundle.clone(),
            layer: self.layers_dir.join(&spec.name),
            lower: spec.root.clone(),
            owner,
            runtime: self.runtime_plan(),
            cgroup_parent: self.cgroups.path_of("").trim_end_matches('/').to_string(),
            network: attach,
            secrets_owner: (owner + user.uid, owner + user.gid),
            parent: std::process::id(),
        };
        let plan_path = bundle.join("shim.json");
        write_private(
            &plan_path,
            &serde_json::to_vec(&plan).map_err(|e| io("write its plan")(e.into()))?,
        )
        .map_err(io("write its plan"))?;
        let (shim, pid, start_time) = self.spawn_shim(spec, &plan_path)?;
        let running = Running {
            name: spec.name.clone(),
            bundle,
            cgroups: self.cgroups.clone(),
            runtime: self.runtime_plan(),
            lease,
        };
        let addr = SocketAddr::from((listen_on, port));
        Ok((Process::container(pid, start_time, shim, running), addr))
    }

    fn adopt(&self, adoption: &crate::Adoption) -> Result<Process, DriverError> {
        let lease = match &adoption.network {
            Network::Bridge(bridge) => {
                let SocketAddr::V4(addr) = adoption.addr else {
                    return Err(DriverError::Network(format!(
                        "instance {}: {} is not a bridge address",
                        adoption.name, adoption.addr
                    )));
                };
                let mut lease = bridge.adopt_lease(
                    &adoption.role,
                    &self.cgroups.path_of(&adoption.name),
                    *addr.ip(),
                )?;
                lease.publish(addr.port())?;
                Some(lease)
            }
            Network::Host => None,
        };
        let running = Running {
            name: adoption.name.clone(),
            bundle: self.bundle(&adoption.name),
            cgroups: self.cgroups.clone(),
            runtime: self.runtime_plan(),
            lease,
        };
        Process::adopted(adoption, Some(running))
    }

    fn usage(&self, name: &str, _pid: u32) -> Option<Usage> {
        self.cgroups.usage(name)
    }

    fn cleanup(&self, recorded: &Recorded) -> bool {
        let name = &recorded.name;
        let plan: Option<Plan> = fs::read(self.bundle(name).join("shim.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        if let Some(attach) = plan.as_ref().and_then(|p| p.network.as_ref()) {
            attach.remove();
        }
        let existed = self.cgroups.exists(name);
        let killed = self.cgroups.kill_all(name);
        self.cgroups.remove(name);
        if let RuntimePlan::Oci { binary, state_root } = self.runtime_plan() {
            let _ = std::process::Command::new(binary)
                .arg("--root")
                .arg(state_root)
                .args(["delete", "--force", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = fs::remove_dir_all(self.run_dir.join("runtime").join(name));
        remove_bundle(&self.bundle(name));
        let _ = fs::remove_dir_all(self.layers_dir.join(name));
        existed || killed > 0
    }
}

impl ContainerDriver {
    /// Starts the shim with the secrets on its stdin and waits for its report on descriptor 3.
    fn spawn_shim(
        &self,
        spec: &InstanceSpec,
        plan: &Path,
    ) -> Result<(tokio::process::Child, u32, u64), DriverError> {
        let io = |action| DriverError::io(&spec.name, action);
        let (log, log_err) = crate::Output::or_file(spec.output.as_ref(), &spec.log_path)
            .map_err(io("open its output"))?;
        let (ready_read, ready_write) = std::io::pipe().map_err(io("make a pipe"))?;
        let ready_write = OwnedFd::from(ready_write);
        let ready_fd = ready_write.as_raw_fd();
        let (secrets_read, mut secrets_write) = std::io::pipe().map_err(io("make a pipe"))?;
        let mut command = Command::new(&self.helper);
        command
            .arg0("phoenix")
            .arg(SHIM_ARG)
            .arg(plan)
            .env_clear()
            .stdin(Stdio::from(secrets_read))
            .stdout(log)
            .stderr(log_err)
            // Own process group: a Ctrl-C on the terminal reaches Phoenix, which drains first.
            .process_group(0);
        // SAFETY: dup2 is async-signal-safe; it gives the child the report pipe as fd 3.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(ready_fd, READY_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // Forked by the main thread (see `launcher`); the command goes with the job, and with
        // it the parent's copies of the child's ends, which must close or the reads never end.
        let mut child = crate::launcher::on_main_thread(move || command.spawn())
            .map_err(io("start its shim"))?;
        drop(ready_write);
        // The shim reads its stdin whole before anything else, so this cannot block for long.
        secrets_write
            .write_all(&crate::shim::encode_secrets(&spec.secrets))
            .map_err(io("pass its secrets"))?;
        drop(secrets_write);
        let line = read_report(ready_read).map_err(io("hear from its shim"))?;
        match line.strip_prefix("ok ") {
            Some(rest) => {
                let mut fields = rest.split_whitespace().map(|f| f.parse::<u64>().ok());
                match (fields.next().flatten(), fields.next().flatten()) {
                    (Some(pid), Some(start)) => Ok((child, pid as u32, start)),
                    _ => Err(DriverError::Start {
                        name: spec.name.clone(),
                        message: format!("the shim said {line:?}"),
                    }),
                }
            }
            None => {
                // The shim removes what it made before it exits: let it finish.
                let waited = std::thread::spawn(move || {
                    let deadline = std::time::Instant::now() + Duration::from_secs(20);
                    while std::time::Instant::now() < deadline {
                        if child.try_wait().map_or(true, |s| s.is_some()) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let _ = child.start_kill();
                });
                let _ = waited.join();
                let message = line
                    .strip_prefix("error ")
                    .map(str::to_string)
                    .unwrap_or_else(|| "its shim ended before the container ran".into());
                Err(DriverError::Start {
                    name: spec.name.clone(),
                    message,
                })
            }
        }
    }
}

/// The shim's one line, or an empty one when it ended without a word; bounded in time.
fn read_report(pipe: std::io::PipeReader) -> std::io::Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(pipe).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(START_TIMEOUT)
        .map(|line| line.trim_end().to_string())
        .map_err(|_| std::io::Error::other("the container did not start within 60 s"))
}

/// A running container, as its `Process` needs it at the end.
#[derive(Debug)]
pub(crate) struct Running {
    name: String,
    bundle: PathBuf,
    cgroups: Cgroups,
    runtime: RuntimePlan,
    /// The instance's address on the bridge, free again once it ended.
    lease: Option<Lease>,
}

impl Running {
    /// How the container ended, from the shim's report (or its own death, if the shim was
    /// killed); whatever is left of it is removed.
    pub(crate) fn finish(&mut self, status: std::io::Result<ExitStatus>) -> Exit {
        let report: Option<Report> = fs::read(self.bundle.join("exit.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let exit = match report {
            Some(report) => Exit {
                text: match (report.code, report.signal) {
                    (Some(code), _) => format!("exit code {code}"),
                    (_, Some(signal)) => format!("killed by signal {signal}"),
                    _ => "ended".into(),
                },
                oom: report.oom,
            },
            None => {
                // The shim itself died: nothing may stay behind.
                self.killer()();
                let mut exit: Exit = status.into();
                exit.text = format!("{} (its shim died)", exit.text);
                exit
            }
        };
        if let RuntimePlan::Oci { .. } = self.runtime {
            // runc's state went with `runc delete`; the bundle goes in every case.
        }
        remove_bundle(&self.bundle);
        self.lease = None;
        exit
    }

    /// Kills every process of the container (its whole cgroup), off the caller's thread.
    pub(crate) fn killer(&self) -> impl FnOnce() + Send + 'static {
        let (cgroups, name) = (self.cgroups.clone(), self.name.clone());
        move || {
            cgroups.kill_all(&name);
        }
    }
}

/// Removes a bundle: its writable layer may hold files of any owner and mode.
fn remove_bundle(bundle: &Path) {
    let _ = fs::remove_dir_all(bundle);
}

/// A file only the owner may read (the spec holds the environment).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

/// A file the instance reads through a bind mount (`/etc/hosts`).
fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    fs::write(path, bytes)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
}

/// Where the containers of state directory `state_dir` run from: `/run/phoenix/HASH`.
pub fn run_dir_of(state_dir: &Path) -> PathBuf {
    Path::new("/run/phoenix").join(state_hash(state_dir))
}

/// A short, stable name for a state directory (8 hex digits): instances of two Phoenixes
/// never share a cgroup or a bridge.
pub fn state_hash(state_dir: &Path) -> String {
    use sha2::Digest;
    let absolute = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let digest = sha2::Sha256::digest(absolute.as_os_str().as_encoded_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}
