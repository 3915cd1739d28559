//! Drivers run instances. This version has the process driver: an instance is a child process
//! started from the image's unpacked root, in its own process group, with its output in a log
//! file and a free loopback port in `PORT`.

mod process;
mod procfs;

pub use process::{Exit, Process, ProcessDriver, kill_recorded, process_alive, process_start_time};

use std::net::SocketAddr;
use std::path::PathBuf;

/// What a driver needs to start one instance.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// The instance's generated name (`web-3f9a1c`), also given to it as `PHOENIX_INSTANCE`.
    pub name: String,
    /// The unpacked image root; `argv[0]` and `workdir` are resolved inside it.
    pub root: PathBuf,
    /// Entrypoint and arguments, as paths inside the image.
    pub argv: Vec<String>,
    /// The environment: nothing of the host's leaks into an instance.
    pub env: Vec<(String, String)>,
    /// Working directory inside the image.
    pub workdir: String,
    /// Where stdout and stderr go.
    pub log_path: PathBuf,
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
        cause: std::io::Error,
    },
}

/// Runs instances. Implemented by the process driver; the `oci` and `docker` drivers follow.
pub trait Driver: Send + Sync + 'static {
    /// A short name for listings (`process`).
    fn name(&self) -> &'static str;

    /// Starts an instance and returns its supervised process and the address it serves on.
    fn start(&self, spec: &InstanceSpec) -> Result<(Process, SocketAddr), DriverError>;

    /// What the instance whose main process is `pid` uses now, if it still runs.
    fn usage(&self, pid: u32) -> Option<Usage>;
}

/// Resources an instance has used.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// CPU time (user and system) since the instance started, in seconds.
    pub cpu_seconds: f64,
    /// Resident memory now, in bytes.
    pub rss_bytes: u64,
}
