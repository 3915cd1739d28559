//! Drivers run instances.
//!
//! - The **isolating** driver (the default) makes every instance a container: its own mount
//!   namespace with the image's root as `/` under a throwaway writable layer, its own PID, UTS,
//!   IPC and network namespaces, a user namespace that maps its root to an unprivileged host
//!   uid, Docker's default capabilities, `no_new_privs` and seccomp filter, cgroup limits, and
//!   secrets as files on a tmpfs. It runs the container with youki's `libcontainer`.
//! - The **runc** driver runs the same OCI runtime spec with an OCI runtime binary (runc).
//! - The **process** driver runs the entrypoint as a plain child process: no isolation, for
//!   development and for hosts where containers cannot run.
//!
//! Containers are watched by a small monitor process (`shim`), the `phoenix` binary started
//! again: it sets the container up, forwards signals, reaps it, and reports how it ended.

mod bake_step;
mod cgroup;
mod container;
mod enter;
mod exec;
pub mod launcher;
mod net;
mod policy;
mod process;
mod procfs;
mod publish;
mod seccomp;
mod shim;
mod spec;
pub mod test_util;
mod user;
mod watcher;

pub use bake_step::BAKE_STEP_ARG;
pub use cgroup::{CgroupVersion, Cgroups};
pub use container::{ContainerDriver, ExecTarget, Runtime, run_dir_of, state_hash};
pub use enter::enter;
pub use net::{Bridge, BridgeConfig, Lease, Subnet};
pub use policy::{Cidr, Denied, Guard, PolicyConfig, RoleRule, Source};
pub use process::{Exit, Process, ProcessDriver, kill_recorded, process_alive, process_start_time};
pub use shim::run_helper_if_asked;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

/// What a driver needs to start one instance.
#[derive(Clone)]
pub struct InstanceSpec {
    /// The instance's generated name (`web-3f9a1c`), its hostname, and `PHOENIX_INSTANCE`.
    pub name: String,
    /// The role it serves (empty for none): what the network policy knows it by.
    pub role: String,
    /// The unpacked image root (laid out as [`Driver::id_offset`] asked); never written.
    pub root: PathBuf,
    /// Entrypoint and arguments, as paths inside the image.
    pub argv: Vec<String>,
    /// The environment: the image's, then the role's, then Phoenix's. Nothing of the host's
    /// leaks into an instance.
    pub env: Vec<(String, String)>,
    /// Working directory inside the image.
    pub workdir: String,
    /// `USER[:GROUP]` by name or number, resolved in the image's `/etc/passwd` and
    /// `/etc/group`; empty: root inside the instance's user namespace.
    pub user: String,
    /// Where stdout and stderr go, unless `output` says otherwise.
    pub log_path: PathBuf,
    /// Pipes Phoenix reads the instance's stdout and stderr from (line by line, into the log
    /// store), instead of `log_path`.
    pub output: Option<Output>,
    /// The host's network, or an address on Phoenix's bridge.
    pub network: Network,
    /// The port the instance serves on (`PORT`); `None` picks a free one (host network only).
    pub port: Option<u16>,
    /// The address an instance on the host's network listens on: loopback on one machine,
    /// the host's address in a cluster (other hosts' proxies reach it there).
    pub host_ip: Ipv4Addr,
    pub resources: Resources,
    /// Files for `/run/secrets/NAME`, mode 0400, owned by the instance's user.
    pub secrets: Vec<Secret>,
    /// Run as real host root, without a user namespace.
    pub allow_root: bool,
    /// Extra `/etc/hosts` lines: names of other roles and the address that serves them.
    pub hosts: Vec<(String, Ipv4Addr)>,
}

impl std::fmt::Debug for InstanceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceSpec")
            .field("name", &self.name)
            .field("root", &self.root)
            .field("argv", &self.argv)
            .field("user", &self.user)
            .field("network", &self.network)
            .field("port", &self.port)
            .field("resources", &self.resources)
            .field("secrets", &self.secrets)
            .finish_non_exhaustive()
    }
}

/// The write ends of the pipes an instance's stdout and stderr go to.
#[derive(Debug, Clone)]
pub struct Output {
    pub stdout: Arc<std::os::fd::OwnedFd>,
    pub stderr: Arc<std::os::fd::OwnedFd>,
}

impl Output {
    /// Stdio for a child: its own copies of the two ends.
    pub(crate) fn stdio(&self) -> std::io::Result<(std::process::Stdio, std::process::Stdio)> {
        Ok((
            std::process::Stdio::from(self.stdout.try_clone()?),
            std::process::Stdio::from(self.stderr.try_clone()?),
        ))
    }

    /// Stdio for a child: `output`'s pipes, or `log_path` opened for appending.
    pub(crate) fn or_file(
        output: Option<&Output>,
        log_path: &std::path::Path,
    ) -> std::io::Result<(std::process::Stdio, std::process::Stdio)> {
        if let Some(output) = output {
            return output.stdio();
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        let log_err = log.try_clone()?;
        Ok((log.into(), log_err.into()))
    }
}

/// Where an instance's network is.
#[derive(Debug, Clone)]
pub enum Network {
    /// The host's network namespace: the instance listens on loopback.
    Host,
    /// Its own network namespace, with an address on the bridge.
    Bridge(Arc<Bridge>),
}

/// Limits enforced with cgroups (and `RLIMIT_NOFILE`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Resources {
    /// CPU time, in cores (0.5: half of one core).
    pub cpus: Option<f64>,
    /// Memory, in bytes; the instance is OOM-killed beyond it.
    pub memory: Option<u64>,
    /// Processes and threads.
    pub pids: Option<u64>,
    /// Open files.
    pub nofile: Option<u64>,
}

/// A secret's name and value. The value never appears in `Debug` output.
#[derive(Clone)]
pub struct Secret {
    pub name: String,
    pub value: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({}, {} bytes)", self.name, self.value.len())
    }
}

/// A failure to start or signal an instance.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("instance {name}: entrypoint {path:?} {why}")]
    Entrypoint {
        name: String,
        path: String,
        why: &'static str,
    },
    #[error("instance {name}: cannot {action}: {cause}")]
    Io {
        name: String,
        action: &'static str,
        #[source]
        cause: std::io::Error,
    },
    #[error("instance {name}: {message}")]
    Start { name: String, message: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("network: {0}")]
    Network(String),
}

impl DriverError {
    pub(crate) fn io(name: &str, action: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        let name = name.to_string();
        move |cause| DriverError::Io {
            name,
            action,
            cause,
        }
    }
}

/// What a driver recorded about a running instance, enough to find it again after Phoenix
/// itself was killed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub name: String,
    pub pid: Option<u32>,
    pub pid_start: Option<u64>,
}

/// An instance to take over after `phoenix restart` re-executed this process: its watched
/// process (the instance, or its container's shim) is still this process's child.
#[derive(Debug, Clone)]
pub struct Adoption {
    pub name: String,
    pub role: String,
    /// The instance's main process and its start time, checked before anything is done.
    pub pid: u32,
    pub start_time: u64,
    /// The child this process waits for: the instance itself, or its container's shim.
    pub watcher: u32,
    /// The address it serves on (on the bridge, its lease).
    pub addr: SocketAddr,
    pub network: Network,
}

/// Runs instances.
pub trait Driver: Send + Sync + std::fmt::Debug + 'static {
    /// A short name for listings and the state (`isolating`, `runc`, `process`).
    fn name(&self) -> &'static str;

    /// The owner offset of the roots this driver runs (the host uid of the instance's uid 0),
    /// or `None` for the host layout (no write or set-id bits, owners as in the image).
    fn id_offset(&self, allow_root: bool) -> Option<u32>;

    /// Starts an instance and returns its supervised process and the address it serves on.
    /// Blocks until the instance's process runs (call it off the async runtime).
    fn start(&self, spec: &InstanceSpec) -> Result<(Process, SocketAddr), DriverError>;

    /// What the instance uses now, if it still runs: its whole cgroup for containers, the main
    /// process for the process driver.
    fn usage(&self, name: &str, pid: u32) -> Option<Usage>;

    /// Removes what a previous run of Phoenix left of an instance (it was killed): every
    /// process of the instance, its cgroup and its runtime state. True when something ran.
    fn cleanup(&self, recorded: &Recorded) -> bool;

    /// Takes over an instance the previous program of this process started, without touching
    /// it (`phoenix restart`, `phoenix upgrade`).
    fn adopt(&self, adoption: &Adoption) -> Result<Process, DriverError>;
}

/// Resources an instance has used.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// CPU time (user and system) since the instance started, in seconds.
    pub cpu_seconds: f64,
    /// Memory in use now, in bytes (resident for a process; the cgroup's, less reclaimable
    /// file cache, for a container).
    pub rss_bytes: u64,
}

/// The environment every driver gives an instance besides its own: where to listen.
pub(crate) fn listen_env(name: &str, host: &str, port: u16) -> [(String, String); 3] {
    [
        ("PORT".into(), port.to_string()),
        ("HOST".into(), host.to_string()),
        ("PHOENIX_INSTANCE".into(), name.to_string()),
    ]
}
