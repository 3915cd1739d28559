//! `run` steps: a command executed at bake time inside the image's root.
//!
//! The root is an overlay: the image so far (read-only, below), and an empty upper directory
//! that receives every change the command makes; the upper directory becomes the layer. The
//! command runs in its own mount, PID, UTS and IPC namespaces, and in its own network
//! namespace (loopback only) unless the step asks for the network. Mounts live in a mount
//! namespace that dies with the command, so a crash leaves nothing mounted.

use std::ffi::CString;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{ImageError, RunStep};

/// Device files the command sees, bound from the host.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// The first argument that starts the sandbox program as the bake-step helper (the same
/// value as `phoenix_driver::BAKE_STEP_ARG`, which cannot be named from here).
const BAKE_STEP_ARG: &str = "__phoenix-bake-step";

/// Lines of output kept for the error message of a failing step.
const KEPT_LINES: usize = 40;

/// Where a run step works: `scratch` is an empty directory removed by the caller.
pub(crate) struct RunPlace<'a> {
    pub lower: &'a Path,
    pub scratch: &'a Path,
    /// The host id of the step's root in its user namespace (the sandbox makes one); 0: none.
    pub id_offset: u32,
}

/// Runs `step` on top of `place.lower` with `env` (`KEY=VALUE`) in `workdir`; returns the
/// overlay's upper directory. Each output line goes to `output` as it comes.
pub(crate) fn run_step(
    step: &RunStep,
    place: &RunPlace,
    env: &[String],
    workdir: &str,
    sandbox: Option<&Path>,
    output: &mut dyn FnMut(&str),
) -> Result<PathBuf, ImageError> {
    let [upper, work, mounts] = ["upper", "work", "mounts"].map(|d| place.scratch.join(d));
    let mount_point = MountPoint::new(place)?;
    let merged = mount_point.path.clone();
    for dir in [&upper, &work, &mounts.join("proc"), &mounts.join("sys")] {
        fs::create_dir_all(dir).map_err(ImageError::io("create", dir))?;
    }
    // Mount points live in a lower layer of their own, so they never show up in the layer.
    fs::create_dir_all(mounts.join("dev")).map_err(ImageError::io("create", &mounts))?;
    let mut binds = Vec::new();
    for device in DEVICES {
        let host = Path::new("/dev").join(device);
        if host.exists() {
            let point = mounts.join("dev").join(device);
            fs::write(&point, "").map_err(ImageError::io("create", &point))?;
            binds.push((host, merged.join("dev").join(device)));
        }
    }
    if step.network {
        fs::create_dir_all(mounts.join("etc")).map_err(ImageError::io("create", &mounts))?;
        let point = mounts.join("etc/resolv.conf");
        fs::write(&point, "").map_err(ImageError::io("create", &point))?;
        binds.push(("/etc/resolv.conf".into(), merged.join("etc/resolv.conf")));
    }
    let options = format!(
        "lowerdir={}:{},upperdir={},workdir={},redirect_dir=off,metacopy=off",
        mounts.display(),
        place.lower.display(),
        upper.display(),
        work.display()
    );
    if place.id_offset > 0 {
        // The step's root owns its root directory and mount points, as root owns a host's.
        let owner = Some(place.id_offset);
        for dir in [
            &upper,
            &mounts,
            &mounts.join("proc"),
            &mounts.join("sys"),
            &mounts.join("dev"),
        ] {
            std::os::unix::fs::chown(dir, owner, owner).map_err(ImageError::io("chown", dir))?;
        }
    }
    let mounting = Mounts::new(&options, &merged, &binds)?;

    let argv = step.run.argv();
    let (mut command, needs) = match sandbox {
        // The helper makes the namespaces (a user namespace first), enters the root
        // (pivot_root), mounts /proc and drops privileges.
        Some(helper) => {
            let mut command = Command::new(helper);
            command
                .arg(BAKE_STEP_ARG)
                .arg(&merged)
                .arg(workdir)
                .arg(place.id_offset.to_string())
                .arg(if step.network { "net" } else { "nonet" })
                .arg("--");
            (command, "the phoenix bake-step helper")
        }
        None => {
            let mut command = Command::new("unshare");
            command.args(["--pid", "--fork", "--kill-child", "--uts", "--ipc"]);
            if !step.network {
                command.arg("--net");
            }
            command
                .arg("--mount-proc")
                .arg(format!("--root={}", merged.display()))
                .arg(format!("--wd={workdir}"))
                .arg("--");
            (command, "unshare (util-linux)")
        }
    };
    command
        .args(&argv)
        .env_clear()
        .envs(env.iter().filter_map(|pair| pair.split_once('=')));
    if !env.iter().any(|pair| pair.starts_with("PATH=")) {
        command.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    // SAFETY: the closure only makes system calls on data prepared before the fork.
    unsafe {
        command.pre_exec(move || mounting.apply());
    }
    let shown = argv.join(" ");
    run_logged(command, needs, &shown, Some(step.time_limit()), output)?;
    Ok(upper)
}

/// Where the step's root is mounted. In a user namespace the step's ids must be able to walk
/// down to it (the state directory is its owner's only): a fresh directory in `/tmp`, made
/// here (never one that was there), 0711, removed afterwards. Otherwise in the scratch
/// directory.
struct MountPoint {
    path: PathBuf,
    made: Option<PathBuf>,
}

impl MountPoint {
    fn new(place: &RunPlace) -> Result<MountPoint, ImageError> {
        if place.id_offset == 0 {
            let path = place.scratch.join("merged");
            fs::create_dir_all(&path).map_err(ImageError::io("create", &path))?;
            return Ok(MountPoint { path, made: None });
        }
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!(
            "phoenix-step-{}-{}",
            std::process::id(),
            crate::store::unique()
        ));
        // `create`, not `create_all`: fails if anyone made it first.
        fs::DirBuilder::new()
            .mode(0o711)
            .create(&dir)
            .map_err(ImageError::io("create", &dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o711))
            .map_err(ImageError::io("chmod", &dir))?;
        let path = dir.join("root");
        fs::create_dir(&path).map_err(ImageError::io("create", &path))?;
        Ok(MountPoint {
            path,
            made: Some(dir),
        })
    }
}

impl Drop for MountPoint {
    fn drop(&mut self) {
        if let Some(dir) = &self.made {
            // Nothing is mounted here any more: the mounts died with the step's namespace.
            let _ = fs::remove_dir(&self.path);
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Runs `command` with stdout and stderr merged into `output`, line by line; a failure
/// carries the last lines. `needs` names what to install when the program is missing. Past
/// `limit` the command is killed (with everything in its PID namespace) and the run fails.
pub(crate) fn run_logged(
    mut command: Command,
    needs: &str,
    shown: &str,
    limit: Option<std::time::Duration>,
    output: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let (reader, writer) = std::io::pipe().map_err(ImageError::io("pipe for", shown))?;
    let stdout = writer
        .try_clone()
        .map_err(ImageError::io("pipe for", shown))?;
    command.stdin(Stdio::null()).stdout(stdout).stderr(writer);
    let mut child = command.spawn().map_err(|cause| ImageError::Io {
        action: "start",
        path: format!("{needs} for {shown}").into(),
        cause,
    })?;
    // The parent's copies of the pipe's write end must close, or the read never ends.
    drop(command);
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let timed_out = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = limit.map(|limit| {
        let (pid, timed_out) = (child.id() as libc::pid_t, timed_out.clone());
        std::thread::spawn(move || {
            if finished.recv_timeout(limit) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                // SAFETY: kill on the child's pid, which is not reaped before `done` is sent.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        })
    });
    let mut kept: Vec<String> = Vec::new();
    for line in BufReader::new(reader).lines().map_while(Result::ok) {
        output(&line);
        kept.push(line);
        if kept.len() > KEPT_LINES {
            kept.remove(0);
        }
    }
    let status = child.wait();
    let _ = done.send(());
    if let Some(watchdog) = watchdog {
        let _ = watchdog.join();
    }
    let status = status.map_err(ImageError::io("wait for", shown))?;
    if let Some(limit) = limit.filter(|_| timed_out.load(std::sync::atomic::Ordering::SeqCst)) {
        return Err(ImageError::RunTimedOut {
            command: shown.to_string(),
            limit: format!("{limit:?}"),
            output: kept.join("\n"),
        });
    }
    if !status.success() {
        return Err(ImageError::RunFailed {
            command: shown.to_string(),
            status: status.to_string(),
            output: kept.join("\n"),
        });
    }
    Ok(())
}

/// Mounts prepared before the fork, applied in the child before it execs.
struct Mounts {
    options: CString,
    merged: CString,
    binds: Vec<(CString, CString)>,
}

fn c_path(path: &Path) -> Result<CString, ImageError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ImageError::BadPath {
        path: path.display().to_string(),
        why: "paths must not contain NUL",
    })
}

impl Mounts {
    fn new(options: &str, merged: &Path, binds: &[(PathBuf, PathBuf)]) -> Result<Self, ImageError> {
        Ok(Mounts {
            options: CString::new(options).map_err(|_| ImageError::BadPath {
                path: options.into(),
                why: "paths must not contain NUL",
            })?,
            merged: c_path(merged)?,
            binds: binds
                .iter()
                .map(|(from, to)| Ok((c_path(from)?, c_path(to)?)))
                .collect::<Result<_, ImageError>>()?,
        })
    }

    /// A private mount namespace with the overlay and the bind mounts. Runs after fork.
    fn apply(&self) -> std::io::Result<()> {
        let check = |result: libc::c_int| {
            if result == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        // SAFETY: plain system calls on NUL-terminated strings that outlive them.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"overlay".as_ptr(),
                self.merged.as_ptr(),
                c"overlay".as_ptr(),
                0,
                self.options.as_ptr().cast(),
            ))?;
            for (from, to) in &self.binds {
                check(libc::mount(
                    from.as_ptr(),
                    to.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
            }
        }
        Ok(())
    }
}
