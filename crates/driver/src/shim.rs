//! The shim: the small process that owns one container, as containerd's shims and conmon do.
//! Phoenix starts its own binary again with `__phoenix-shim PLAN`; single-threaded, it may
//! fork and enter namespaces safely, which a threaded async runtime may not.
//!
//! It mounts the instance's root (the image's root under a writable layer) in a private mount
//! namespace, creates the container with the runtime, plugs its network, writes its secrets
//! onto the container's own tmpfs (they come on stdin, never through a file), starts it, and
//! reports `ok PID START` (or `error WHY`) on descriptor 3. Then it passes stop signals on to
//! the container's init, reaps it, notes an OOM kill, deletes the container and its writable
//! layer, writes `exit.json`, and exits as the container did. It dies with Phoenix
//! (`PR_SET_PDEATHSIG`), and the isolating runtime's container dies with it.

use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cgroup::Cgroups;
use crate::net::Attach;

/// The argument that makes the `phoenix` binary a shim.
pub(crate) const SHIM_ARG: &str = "__phoenix-shim";

/// The descriptor on which the shim reports that the container runs.
pub(crate) const READY_FD: i32 = 3;

/// Signals passed on to the container's init.
const FORWARDED: &[libc::c_int] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// What the shim is to do, written by the driver into the bundle as `shim.json`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Plan {
    /// The container's id: the instance's name.
    pub id: String,
    /// Holds `config.json`; `rootfs`, the root's mount point, is made in it.
    pub bundle: PathBuf,
    /// Where the writable layer goes (`upper`, `work`): on disk, removed at the end.
    pub layer: PathBuf,
    /// The image's unpacked root: the overlay's read-only lower layer.
    pub lower: PathBuf,
    /// The host uid and gid that own the writable layer's root (uid 0 inside).
    pub owner: u32,
    pub runtime: RuntimePlan,
    /// Where the instances' cgroups are (to read OOM kills before the runtime removes them).
    pub cgroup_parent: String,
    pub network: Option<Attach>,
    /// The host uid and gid that own the secret files.
    pub secrets_owner: (u32, u32),
    /// Phoenix's pid: the shim exits at once if its parent is already another process.
    pub parent: u32,
}

/// Which runtime makes the container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) enum RuntimePlan {
    /// youki's libcontainer, in this process.
    Builtin { state_root: PathBuf },
    /// An OCI runtime binary (runc), with its state under `state_root`.
    Oci {
        binary: PathBuf,
        state_root: PathBuf,
    },
}

/// How the container ended, written as `exit.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Report {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom: bool,
}

/// If this process was started as a Phoenix helper (the shim), runs it and exits; otherwise
/// returns at once. Call it first thing in `main`, before any thread starts.
pub fn run_helper_if_asked() {
    let mut args = std::env::args_os().skip(1);
    let first = args.next();
    if first.as_deref() == Some(OsStr::new(crate::BAKE_STEP_ARG)) {
        crate::bake_step::main(args.collect());
    }
    if first.as_deref() != Some(OsStr::new(SHIM_ARG)) {
        return;
    }
    let code = match args.next() {
        Some(plan) => main(Path::new(&plan)),
        None => {
            eprintln!("phoenix shim: no plan given");
            2
        }
    };
    std::process::exit(code);
}

fn main(plan_path: &Path) -> i32 {
    // SAFETY: plain prctl calls on this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
    }
    // SAFETY: descriptor 3 was set up by the driver for this report; nothing else owns it.
    let mut ready = unsafe { File::from_raw_fd(READY_FD) };
    let plan: Plan = match fs::read(plan_path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(plan) => plan,
        Err(e) => {
            let _ = writeln!(
                ready,
                "error cannot read the plan {}: {e}",
                plan_path.display()
            );
            return 1;
        }
    };
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } as u32 != plan.parent {
        return 1;
    }
    let secrets = read_secrets(&mut io::stdin().lock());
    let mut shim = Shim::new(plan);
    match shim.set_up(&secrets) {
        Ok(pid) => {
            let start = crate::process_start_time(pid).unwrap_or(0);
            let _ = writeln!(ready, "ok {pid} {start}");
            drop(ready);
            let status = shim.supervise(pid);
            shim.finish(status)
        }
        Err(error) => {
            let _ = writeln!(ready, "error {}", error.replace('\n', " "));
            shim.tear_down();
            1
        }
    }
}

/// Secrets arrive on stdin as `NAME\0LENGTH\0VALUE` records.
fn read_secrets(input: &mut impl Read) -> Vec<crate::Secret> {
    let mut bytes = Vec::new();
    let _ = input.take(64 << 20).read_to_end(&mut bytes);
    let mut secrets = Vec::new();
    let mut rest = bytes.as_slice();
    while let Some(name_end) = rest.iter().position(|&b| b == 0) {
        let name = String::from_utf8_lossy(&rest[..name_end]).into_owned();
        rest = &rest[name_end + 1..];
        let Some(len_end) = rest.iter().position(|&b| b == 0) else {
            break;
        };
        let Some(len) = std::str::from_utf8(&rest[..len_end])
            .ok()
            .and_then(|l| l.parse::<usize>().ok())
        else {
            break;
        };
        rest = &rest[len_end + 1..];
        if rest.len() < len {
            break;
        }
        secrets.push(crate::Secret {
            name,
            value: rest[..len].to_vec(),
        });
        rest = &rest[len..];
    }
    secrets
}

/// Encodes secrets for the shim's stdin.
pub(crate) fn encode_secrets(secrets: &[crate::Secret]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for secret in secrets {
        bytes.extend_from_slice(secret.name.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(secret.value.len().to_string().as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(&secret.value);
    }
    bytes
}

struct Shim {
    plan: Plan,
    /// The container, while the builtin runtime holds it.
    container: Option<libcontainer::container::Container>,
}

impl Shim {
    fn new(plan: Plan) -> Shim {
        Shim {
            plan,
            container: None,
        }
    }

    fn rootfs(&self) -> PathBuf {
        self.plan.bundle.join("rootfs")
    }

    /// Everything up to a running container; returns its init's pid.
    fn set_up(&mut self, secrets: &[crate::Secret]) -> Result<u32, String> {
        self.mount_root()
            .map_err(|e| format!("cannot mount the instance's root: {e}"))?;
        let pid = self.create()?;
        if let Some(attach) = &self.plan.network {
            let netns = File::open(format!("/proc/{pid}/ns/net"))
                .map_err(|e| format!("cannot open the instance's network namespace: {e}"))?;
            attach
                .apply(&netns)
                .map_err(|e| format!("cannot plug the instance into {}: {e}", attach.bridge))?;
        }
        self.write_secrets(pid, secrets)
            .map_err(|e| format!("cannot write the secrets: {e}"))?;
        block_signals();
        self.start()?;
        Ok(pid)
    }

    /// The overlay of the image's root and a fresh writable layer, in a mount namespace of
    /// the shim's own: nothing is mounted on the host, and it all goes when the shim ends.
    fn mount_root(&self) -> io::Result<()> {
        let layer = &self.plan.layer;
        let (upper, work, rootfs) = (layer.join("upper"), layer.join("work"), self.rootfs());
        for dir in [&upper, &work, &rootfs] {
            fs::create_dir_all(dir)?;
        }
        let lower_mode = fs::metadata(&self.plan.lower)?.permissions().mode();
        fs::set_permissions(&upper, fs::Permissions::from_mode(lower_mode & 0o7777))?;
        std::os::unix::fs::chown(&upper, Some(self.plan.owner), Some(self.plan.owner))?;
        // SAFETY: unshare and mount with NUL-terminated strings that outlive the calls.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            let options = c_string(&format!(
                "lowerdir={},upperdir={},workdir={}",
                overlay_path(&self.plan.lower),
                overlay_path(&upper),
                overlay_path(&work)
            ))?;
            let target = c_string(&rootfs.display().to_string())?;
            check(libc::mount(
                c"overlay".as_ptr(),
                target.as_ptr(),
                c"overlay".as_ptr(),
                libc::MS_NODEV,
                options.as_ptr().cast(),
            ))?;
        }
        Ok(())
    }

    /// Creates the container (its init waits to be started); returns the init's pid.
    fn create(&mut self) -> Result<u32, String> {
        match self.plan.runtime.clone() {
            RuntimePlan::Builtin { state_root } => {
                use libcontainer::container::builder::ContainerBuilder;
                use libcontainer::syscall::syscall::SyscallType;
                let programs = crate::seccomp::bpf_programs()?;
                let null = File::open("/dev/null").map_err(|e| e.to_string())?;
                let container = ContainerBuilder::new(self.plan.id.clone(), SyscallType::default())
                    .with_root_path(&state_root)
                    .map_err(|e| error_chain(&e))?
                    .with_executor(Isolated { programs })
                    .with_stdin(OwnedFd::from(null))
                    .as_init(&self.plan.bundle)
                    .with_systemd(false)
                    .with_detach(true)
                    .build()
                    .map_err(|e| format!("cannot create the container: {}", error_chain(&e)))?;
                let pid = container
                    .pid()
                    .ok_or("the container has no init process")?
                    .as_raw() as u32;
                self.container = Some(container);
                // Where `phoenix exec` finds it, as runc's pid file for the other runtime.
                fs::write(self.plan.bundle.join("init.pid"), pid.to_string())
                    .map_err(|e| format!("cannot record the init's pid: {e}"))?;
                Ok(pid)
            }
            RuntimePlan::Oci { binary, .. } => {
                let pid_file = self.plan.bundle.join("init.pid");
                self.runtime_command(&binary, "create")
                    .args(["--bundle"])
                    .arg(&self.plan.bundle)
                    .arg("--pid-file")
                    .arg(&pid_file)
                    .arg(&self.plan.id)
                    .status()
                    .map_err(|e| format!("cannot run {}: {e}", binary.display()))
                    .and_then(|status| self.runtime_result(&binary, "create", status))?;
                fs::read_to_string(&pid_file)
                    .ok()
                    .and_then(|p| p.trim().parse().ok())
                    .ok_or_else(|| format!("{} create wrote no pid", binary.display()))
            }
        }
    }

    fn start(&mut self) -> Result<(), String> {
        match self.plan.runtime.clone() {
            RuntimePlan::Builtin { .. } => self
                .container
                .as_mut()
                .ok_or("no container to start")?
                .start()
                .map_err(|e| format!("cannot start the container: {}", error_chain(&e))),
            RuntimePlan::Oci { binary, .. } => self
                .runtime_command(&binary, "start")
                .arg(&self.plan.id)
                .status()
                .map_err(|e| format!("cannot run {}: {e}", binary.display()))
                .and_then(|status| self.runtime_result(&binary, "start", status)),
        }
    }

    /// `runc --root STATE --log FILE VERB`, with the container's stdio (the instance's log).
    fn runtime_command(&self, binary: &Path, verb: &str) -> Command {
        let mut command = Command::new(binary);
        if let RuntimePlan::Oci { state_root, .. } = &self.plan.runtime {
            command.arg("--root").arg(state_root);
        }
        command
            .arg("--log")
            .arg(self.plan.bundle.join("runtime.log"))
            .arg("--log-format")
            .arg("text")
            .arg(verb)
            .stdin(Stdio::null());
        command
    }

    fn runtime_result(
        &self,
        binary: &Path,
        verb: &str,
        status: std::process::ExitStatus,
    ) -> Result<(), String> {
        if status.success() {
            return Ok(());
        }
        let log = fs::read_to_string(self.plan.bundle.join("runtime.log")).unwrap_or_default();
        let last = log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        Err(format!(
            "{} {verb} failed ({status}): {last}",
            binary.display()
        ))
    }

    /// Each secret as a 0400 file of the instance's user on the container's own tmpfs at
    /// `/run/secrets`, reached through the container's root (resolved inside it).
    fn write_secrets(&self, pid: u32, secrets: &[crate::Secret]) -> io::Result<()> {
        if secrets.is_empty() {
            return Ok(());
        }
        // The container's root as its init sees it (the magic link is followed once, here);
        // every path below is then resolved inside it.
        let root = pathrs::Root::from_fd(File::open(format!("/proc/{pid}/root"))?);
        let (uid, gid) = self.plan.secrets_owner;
        // Files are created as their owner: a tmpfs of the instance's user namespace takes no
        // inode of an id it does not map (host root included).
        // SAFETY: setfsuid and setfsgid on this single-threaded process; restored below.
        let (old_gid, old_uid) = unsafe { (libc::setfsgid(gid), libc::setfsuid(uid)) };
        let written = (|| {
            for secret in secrets {
                let path = Path::new(crate::spec::SECRETS_DIR).join(&secret.name);
                let mut file = root
                    .create_file(
                        &path,
                        pathrs::flags::OpenFlags::O_WRONLY
                            | pathrs::flags::OpenFlags::O_CREAT
                            | pathrs::flags::OpenFlags::O_EXCL,
                        &fs::Permissions::from_mode(0o400),
                    )
                    .map_err(pathrs_io)?;
                file.write_all(&secret.value)?;
            }
            Ok(())
        })();
        // SAFETY: as above.
        unsafe {
            libc::setfsuid(old_uid as libc::uid_t);
            libc::setfsgid(old_gid as libc::gid_t);
        }
        written
    }

    /// Passes signals on to the container's init until it exits; returns its wait status.
    fn supervise(&self, init: u32) -> i32 {
        let set = signal_set();
        loop {
            let timeout = libc::timespec {
                tv_sec: 0,
                tv_nsec: 200_000_000,
            };
            // SAFETY: sigtimedwait with a set built by sigaddset and a null info pointer.
            let signal = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
            if FORWARDED.contains(&signal) {
                // SAFETY: kill(2) touches no memory.
                unsafe { libc::kill(init as libc::pid_t, signal) };
            }
            loop {
                let mut status = 0;
                // SAFETY: waitpid with a valid status pointer.
                let reaped = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if reaped <= 0 {
                    break;
                }
                if reaped as u32 == init {
                    return status;
                }
            }
        }
    }

    /// After the container's end: note an OOM kill, delete the container, write the report,
    /// exit as the container did.
    fn finish(mut self, status: i32) -> i32 {
        let oom = Cgroups::detect(&self.plan.cgroup_parent)
            .is_some_and(|cgroups| cgroups.oom_kills(&self.plan.id) > 0);
        self.tear_down();
        let report = Report {
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            oom,
        };
        if let Ok(json) = serde_json::to_vec(&report) {
            let _ = fs::write(self.plan.bundle.join("exit.json"), json);
        }
        match report {
            Report {
                code: Some(code), ..
            } => code,
            Report {
                signal: Some(signal),
                ..
            } => die_by(signal),
            _ => 1,
        }
    }

    /// Deletes the container (every process left in it, its cgroup, the runtime's state) and
    /// its writable layer.
    fn tear_down(&mut self) {
        match self.plan.runtime.clone() {
            RuntimePlan::Builtin { state_root } => {
                if let Some(mut container) = self.container.take() {
                    let _ = container.delete(true);
                }
                let _ = fs::remove_dir_all(state_root.join(&self.plan.id));
            }
            RuntimePlan::Oci { binary, .. } => {
                let _ = self
                    .runtime_command(&binary, "delete")
                    .arg("--force")
                    .arg(&self.plan.id)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        if let Some(cgroups) = Cgroups::detect(&self.plan.cgroup_parent) {
            cgroups.kill_all(&self.plan.id);
            cgroups.remove(&self.plan.id);
        }
        if let Some(attach) = &self.plan.network {
            attach.remove();
        }
        let rootfs = self.rootfs();
        if let Ok(target) = c_string(&rootfs.display().to_string()) {
            // SAFETY: umount2 on a NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir_all(&self.plan.layer);
    }
}

/// The isolating runtime's last step inside the container, just before the entrypoint runs:
/// die with the shim, apply the seccomp filter, exec.
#[derive(Clone)]
pub(crate) struct Isolated {
    pub programs: Vec<seccompiler::BpfProgram>,
}

impl libcontainer::workload::Executor for Isolated {
    fn exec(
        &self,
        spec: &libcontainer::oci_spec::runtime::Spec,
    ) -> Result<(), libcontainer::workload::ExecutorError> {
        use libcontainer::workload::ExecutorError;
        // SAFETY: prctl on this process; the credentials no longer change before exec.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        for program in &self.programs {
            seccompiler::apply_filter(program)
                .map_err(|e| ExecutorError::Other(format!("seccomp: {e}")))?;
        }
        libcontainer::workload::default::DefaultExecutor {}.exec(spec)
    }

    fn validate(
        &self,
        spec: &libcontainer::oci_spec::runtime::Spec,
    ) -> Result<(), libcontainer::workload::ExecutorValidationError> {
        libcontainer::workload::default::DefaultExecutor {}.validate(spec)
    }
}

/// The signals the shim waits for, blocked so that `sigtimedwait` receives them.
fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a zeroed local value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
            libc::sigaddset(&mut set, *signal);
        }
        set
    }
}

fn block_signals() {
    let set = signal_set();
    // SAFETY: blocks the set for this single-threaded process.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Ends this process with `signal`, so that its parent sees the container's own death.
fn die_by(signal: i32) -> i32 {
    // SAFETY: restore the default action, unblock, and raise the signal on ourselves.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::kill(libc::getpid(), signal);
    }
    std::thread::sleep(Duration::from_millis(100));
    128 + signal
}

/// A path in overlayfs options: `,`, `:` and `\` are escaped.
fn overlay_path(path: &Path) -> String {
    let mut escaped = String::new();
    for c in path.display().to_string().chars() {
        if matches!(c, ',' | ':' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

fn c_string(text: &str) -> io::Result<CString> {
    CString::new(text).map_err(|_| io::Error::other("a path holds a NUL byte"))
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn pathrs_io(error: pathrs::error::Error) -> io::Error {
    match error.kind() {
        pathrs::error::ErrorKind::OsError(Some(errno)) => io::Error::from_raw_os_error(errno),
        _ => io::Error::other(error.to_string()),
    }
}

/// An error and its causes, one after the other.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_through_the_stdin_encoding() {
        let secrets = vec![
            crate::Secret {
                name: "db".into(),
                value: b"a\0b\nc".to_vec(),
            },
            crate::Secret {
                name: "api_key".into(),
                value: Vec::new(),
            },
        ];
        let bytes = encode_secrets(&secrets);
        let back = read_secrets(&mut bytes.as_slice());
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].value, b"a\0b\nc");
        assert_eq!(back[1].name, "api_key");
        // Truncated input yields the whole records only.
        let back = read_secrets(&mut &bytes[..bytes.len() - 3]);
        assert_eq!(back.len(), 1);
    }

    #[test]
    fn overlay_options_escape_separators() {
        assert_eq!(overlay_path(Path::new("/a,b:c")), "/a\\,b\\:c");
    }
}
