//! The process driver.

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{Driver, DriverError, InstanceSpec};

/// Starts instances as child processes on this host.
#[derive(Debug, Default, Clone)]
pub struct ProcessDriver;

impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    /// The main process's usage (children it forks are not counted).
    fn usage(&self, pid: u32) -> Option<crate::Usage> {
        crate::procfs::usage(pid)
    }

    fn start(&self, spec: &InstanceSpec) -> Result<(Process, SocketAddr), DriverError> {
        let io = |action| {
            let name = spec.name.clone();
            move |cause| DriverError::Io {
                name,
                action,
                cause,
            }
        };
        let program = resolve_inside(
            &spec.root,
            spec.argv.first().map(String::as_str).unwrap_or(""),
        )
        .map_err(|why| DriverError::Entrypoint {
            name: spec.name.clone(),
            path: spec.argv.first().cloned().unwrap_or_default(),
            why,
        })?;
        let workdir =
            resolve_inside(&spec.root, &spec.workdir).unwrap_or_else(|_| spec.root.clone());
        let port = free_port().map_err(io("find a free port"))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_path)
            .map_err(io("open log file"))?;
        let log_err = log.try_clone().map_err(io("open log file"))?;
        let mut command = Command::new(&program);
        command
            .args(&spec.argv[1..])
            .current_dir(workdir)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env("PORT", port.to_string())
            .env("PHOENIX_INSTANCE", &spec.name)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Own process group: a Ctrl-C on the terminal reaches Phoenix, which drains first,
            // and stop signals reach the instance's own children too.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
        unsafe {
            command.pre_exec(|| {
                // If Phoenix dies (even by SIGKILL), its instances die with it: no orphans.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(io("start process"))?;
        let pid = child.id().unwrap_or(0);
        let start_time = process_start_time(pid).unwrap_or(0);
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        Ok((
            Process {
                pid,
                start_time,
                child,
            },
            address,
        ))
    }
}

/// Resolves an absolute image path inside `root`, refusing `..`.
fn resolve_inside(root: &Path, path: &str) -> Result<PathBuf, &'static str> {
    if !path.starts_with('/') {
        return Err("must be an absolute path inside the image");
    }
    let mut resolved = root.to_path_buf();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => resolved.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err("must not contain `..`"),
        }
    }
    if !resolved.exists() {
        return Err("does not exist in the image");
    }
    Ok(resolved)
}

/// Ports handed to instances: below Linux's ephemeral range (32768-60999), as Nomad's dynamic
/// ports. A port found by binding port 0 would come from the ephemeral range, where any
/// outgoing connection (the proxy's own, to the instances) can take it before the instance
/// binds it.
const INSTANCE_PORTS: std::ops::Range<u16> = 20000..32000;

/// A free TCP port on 127.0.0.1 for an instance. Ports are handed out in turn from a start
/// that differs between processes, so a port just released by a stopped instance (or taken by
/// another Phoenix on this host) is not the next one tried.
fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(INSTANCE_PORTS.end - INSTANCE_PORTS.start);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = INSTANCE_PORTS.start + offset as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port in {INSTANCE_PORTS:?}"),
    ))
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit(pub String);

impl From<std::io::Result<ExitStatus>> for Exit {
    fn from(status: std::io::Result<ExitStatus>) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Exit(match status {
            Ok(s) if s.code().is_some() => format!("exit code {}", s.code().unwrap_or_default()),
            Ok(s) => format!("killed by signal {}", s.signal().unwrap_or_default()),
            Err(e) => format!("wait failed: {e}"),
        })
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A running instance process.
#[derive(Debug)]
pub struct Process {
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
    child: Child,
}

impl Process {
    /// Resolves when the process exits. Cancel-safe: use it in `select!`.
    pub async fn exited(&mut self) -> Exit {
        self.child.wait().await.into()
    }

    /// SIGTERM to the process group, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Exit {
        signal_group(self.pid, libc::SIGTERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.into(),
            Err(_) => {
                signal_group(self.pid, libc::SIGKILL);
                let exit: Exit = self.child.wait().await.into();
                Exit(format!("{exit} (did not stop within {grace:?} of SIGTERM)"))
            }
        }
    }
}

fn signal_group(pid: u32, signal: libc::c_int) {
    if pid > 1 {
        // SAFETY: kill(2) with a negative pid signals the process group; no memory is touched.
        unsafe {
            libc::kill(-(pid as libc::pid_t), signal);
        }
    }
}

/// The start time of `pid` in clock ticks since boot, if it exists.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

/// True when `pid` exists, is not a zombie, and started at `start_time`.
pub fn process_alive(pid: u32, start_time: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return false;
    };
    let mut fields = after.split(' ');
    let state = fields.next();
    let started = fields.nth(18).and_then(|s| s.parse::<u64>().ok());
    state != Some("Z") && started == Some(start_time)
}

/// Kills the process group of a process recorded earlier (by a Phoenix that crashed), but only
/// if `pid` is still that process. Returns true when something was killed.
pub async fn kill_recorded(pid: u32, start_time: u64) -> bool {
    if pid <= 1 || !process_alive(pid, start_time) {
        return false;
    }
    signal_group(pid, libc::SIGKILL);
    // SAFETY: as above; the pid was just checked to be the recorded process.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    for _ in 0..200 {
        if !process_alive(pid, start_time) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[cfg(test)]
mod tests;
