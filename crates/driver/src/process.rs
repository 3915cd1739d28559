//! The process driver: the entrypoint as a child process of Phoenix, from the image's root on
//! the host, as the user running Phoenix, in its own process group, with a free loopback port
//! in `PORT`. No isolation: for development and for hosts where containers cannot run.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::Command;

use crate::watcher::Watcher;

use crate::{Driver, DriverError, InstanceSpec, Network, Recorded};

/// Starts instances as child processes on this host.
#[derive(Debug, Default, Clone)]
pub struct ProcessDriver;

impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    fn id_offset(&self, _allow_root: bool) -> Option<u32> {
        None
    }

    /// The main process's usage (children it forks are not counted).
    fn usage(&self, _name: &str, pid: u32) -> Option<crate::Usage> {
        crate::procfs::usage(pid)
    }

    fn cleanup(&self, recorded: &Recorded) -> bool {
        let (Some(pid), Some(start)) = (recorded.pid, recorded.pid_start) else {
            return false;
        };
        kill_recorded_now(pid, start)
    }

    fn adopt(&self, adoption: &crate::Adoption) -> Result<Process, DriverError> {
        if adoption.watcher != adoption.pid {
            return Err(DriverError::Start {
                name: adoption.name.clone(),
                message: "a process driver instance is its own watcher".into(),
            });
        }
        Process::adopted(adoption, None)
    }

    fn start(&self, spec: &InstanceSpec) -> Result<(Process, SocketAddr), DriverError> {
        if matches!(spec.network, Network::Bridge(_)) {
            return Err(DriverError::Unsupported(format!(
                "instance {}: the process driver runs in the host's network; use network = \"host\"",
                spec.name
            )));
        }
        if is_root() && !spec.allow_root {
            return Err(DriverError::Unsupported(format!(
                "instance {}: the process driver would run it as host root: set allow_root = true \
                 on the role to accept that, or use the isolating driver",
                spec.name
            )));
        }
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
        let io = |action| DriverError::io(&spec.name, action);
        let port = match spec.port {
            Some(port) => port,
            None => free_port().map_err(io("find a free port"))?,
        };
        let secrets = write_secrets(spec).map_err(io("write its secrets"))?;
        let (log, log_err) = crate::Output::or_file(spec.output.as_ref(), &spec.log_path)
            .map_err(io("open its output"))?;
        let mut command = Command::new(&program);
        command
            .args(&spec.argv[1..])
            .current_dir(workdir)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .envs(crate::listen_env(
                &spec.name,
                &spec.host_ip.to_string(),
                port,
            ))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Own process group: a Ctrl-C on the terminal reaches Phoenix, which drains first,
            // and stop signals reach the instance's own children too.
            .process_group(0);
        if let Some(dir) = &secrets {
            command.env("PHOENIX_SECRETS_DIR", dir);
        }
        let nofile = spec.resources.nofile;
        // SAFETY: prctl and setrlimit are async-signal-safe and touch only the child.
        unsafe {
            command.pre_exec(move || {
                // If Phoenix dies (even by SIGKILL), its instances die with it: no orphans.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(limit) = nofile {
                    let limit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        // Forked by the main thread: see `launcher`.
        let child = crate::launcher::on_main_thread(move || command.spawn())
            .map_err(io("start process"))?;
        let pid = child.id().unwrap_or(0);
        let start_time = process_start_time(pid).unwrap_or(0);
        let address = SocketAddr::from((spec.host_ip, port));
        Ok((
            Process {
                pid,
                start_time,
                watcher: Watcher::Child(child),
                end: Ending::Group { secrets },
            },
            address,
        ))
    }
}

/// Where the process driver keeps instance `name`'s secrets.
fn secrets_dir(name: &str) -> PathBuf {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/dev/shm/phoenix-{uid}/{name}"))
}

/// The process driver has no tmpfs of its own: secrets go to a private directory on
/// `/dev/shm` (memory, never the disk), named in `PHOENIX_SECRETS_DIR`.
fn write_secrets(spec: &InstanceSpec) -> std::io::Result<Option<PathBuf>> {
    if spec.secrets.is_empty() {
        return Ok(None);
    }
    let dir = secrets_dir(&spec.name);
    let base = dir.parent().unwrap_or(&dir).to_path_buf();
    std::fs::create_dir_all(&base)?;
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    for secret in &spec.secrets {
        use std::io::Write;
        let path = dir.join(&secret.name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&path)?;
        file.write_all(&secret.value)?;
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500))?;
    Ok(Some(dir))
}

use std::os::unix::fs::OpenOptionsExt;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
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
pub(crate) fn free_port() -> std::io::Result<u16> {
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

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// `exit code N`, `killed by signal N`, ...
    pub text: String,
    /// The kernel killed it for going over its memory limit.
    pub oom: bool,
}

impl Exit {
    pub fn new(text: impl Into<String>) -> Exit {
        Exit {
            text: text.into(),
            oom: false,
        }
    }
}

impl From<std::io::Result<ExitStatus>> for Exit {
    fn from(status: std::io::Result<ExitStatus>) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Exit::new(match status {
            Ok(s) if s.code().is_some() => format!("exit code {}", s.code().unwrap_or_default()),
            Ok(s) => format!("killed by signal {}", s.signal().unwrap_or_default()),
            Err(e) => format!("wait failed: {e}"),
        })
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)?;
        if self.oom {
            f.write_str(" (out of memory: over its memory limit)")?;
        }
        Ok(())
    }
}

/// How an instance's end is brought about and reported, by driver.
#[derive(Debug)]
enum Ending {
    /// A process group of the process driver (and its secrets directory, removed at the end).
    Group { secrets: Option<PathBuf> },
    /// A container watched by its shim.
    Container(Box<crate::container::Running>),
    /// A test double's instance: stopping it sets its exit code.
    Fake(tokio::sync::watch::Sender<Option<i32>>),
}

/// A running instance: its main process, and what watches it.
#[derive(Debug)]
pub struct Process {
    /// The instance's main process on the host (a container's init).
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
    /// The process driver's instance itself, or a container's shim.
    watcher: Watcher,
    end: Ending,
}

impl Process {
    pub(crate) fn container(
        pid: u32,
        start_time: u64,
        shim: tokio::process::Child,
        running: crate::container::Running,
    ) -> Process {
        Process {
            pid,
            start_time,
            watcher: Watcher::Child(shim),
            end: Ending::Container(Box::new(running)),
        }
    }

    /// An instance a previous program of this process started, watched by `watcher` (a
    /// container's shim, or the instance itself), still this process's child.
    pub(crate) fn adopted(
        adoption: &crate::Adoption,
        running: Option<crate::container::Running>,
    ) -> Result<Process, DriverError> {
        if !process_alive(adoption.pid, adoption.start_time) {
            return Err(DriverError::Start {
                name: adoption.name.clone(),
                message: format!("process {} is gone", adoption.pid),
            });
        }
        let watcher = crate::watcher::Adopted::new(adoption.watcher)
            .map_err(DriverError::io(&adoption.name, "watch its process"))?;
        let end = match running {
            Some(running) => Ending::Container(Box::new(running)),
            None => {
                let secrets = secrets_dir(&adoption.name);
                Ending::Group {
                    secrets: secrets.exists().then_some(secrets),
                }
            }
        };
        Ok(Process {
            pid: adoption.pid,
            start_time: adoption.start_time,
            watcher: Watcher::Adopted(watcher),
            end,
        })
    }

    /// A test double's instance (see `test_util::FakeDriver`).
    pub(crate) fn fake(pid: u32, exit: tokio::sync::watch::Sender<Option<i32>>) -> Process {
        Process {
            pid,
            start_time: 0,
            watcher: Watcher::Fake(exit.subscribe()),
            end: Ending::Fake(exit),
        }
    }

    /// The process this instance's end is seen by: the instance, or its container's shim.
    pub fn watcher_pid(&self) -> u32 {
        self.watcher.id()
    }

    /// Resolves when the instance has ended. Cancel-safe: use it in `select!`.
    pub async fn exited(&mut self) -> Exit {
        let status = self.watcher.wait().await;
        self.ended(status)
    }

    fn ended(&mut self, status: std::io::Result<ExitStatus>) -> Exit {
        match &mut self.end {
            Ending::Group { secrets } => {
                if let Some(dir) = secrets.take() {
                    remove_secrets(&dir);
                }
                status.into()
            }
            Ending::Container(running) => running.finish(status),
            Ending::Fake(_) => status.into(),
        }
    }

    /// SIGTERM (to the process group, or to the container's init), then after `grace` SIGKILL
    /// to every process of the instance (its group, or its whole cgroup).
    pub async fn stop(&mut self, grace: Duration) -> Exit {
        match &self.end {
            Ending::Group { .. } => signal_group(self.pid, libc::SIGTERM),
            // The shim passes it on to the container's init.
            Ending::Container(_) => signal(self.watcher.id(), libc::SIGTERM),
            Ending::Fake(exit) => {
                exit.send_replace(Some(0));
                true
            }
        };
        let status = match tokio::time::timeout(grace, self.watcher.wait()).await {
            Ok(status) => return self.ended(status),
            Err(_) => {
                match &self.end {
                    Ending::Group { .. } => {
                        signal_group(self.pid, libc::SIGKILL);
                    }
                    Ending::Container(running) => {
                        let _ = tokio::task::spawn_blocking(running.killer()).await;
                    }
                    Ending::Fake(exit) => {
                        exit.send_replace(Some(137));
                    }
                }
                self.watcher.wait().await
            }
        };
        let mut exit = self.ended(status);
        exit.text = format!("{} (did not stop within {grace:?} of SIGTERM)", exit.text);
        exit
    }
}

fn remove_secrets(dir: &Path) {
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let _ = std::fs::remove_dir_all(dir);
}

fn signal(pid: u32, signal: libc::c_int) -> bool {
    // SAFETY: kill(2) touches no memory.
    pid > 1 && unsafe { libc::kill(pid as libc::pid_t, signal) } == 0
}

fn signal_group(pid: u32, signal: libc::c_int) -> bool {
    // SAFETY: kill(2) with a negative pid signals the process group; no memory is touched.
    pid > 1 && unsafe { libc::kill(-(pid as libc::pid_t), signal) } == 0
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
    tokio::task::spawn_blocking(move || kill_recorded_now(pid, start_time))
        .await
        .unwrap_or(false)
}

fn kill_recorded_now(pid: u32, start_time: u64) -> bool {
    if pid <= 1 || !process_alive(pid, start_time) {
        return false;
    }
    signal_group(pid, libc::SIGKILL);
    signal(pid, libc::SIGKILL);
    for _ in 0..200 {
        if !process_alive(pid, start_time) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

#[cfg(test)]
mod tests;
