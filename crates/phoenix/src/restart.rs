//! Restarting `phoenix up` without stopping its fleet: `phoenix restart` or SIGHUP runs this
//! binary again, `phoenix upgrade PATH` another one (nginx's USR2 idea). The process
//! re-executes itself: its pid, terminal and children stay, the listening sockets and idle
//! client connections cross `execve` open (see `phoenix_fleet::Handover`), and the next
//! program takes the instances over instead of starting them again. Meanwhile new connections
//! wait in the kernel's backlog: none is refused.

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use phoenix_fleet::{Controller, Handed};
use serde_json::json;

use crate::client::{ApiArgs, Client};

/// Names the handover file for the next program (set only on the `execve` that carries it).
const HANDOVER_ENV: &str = "PHOENIX_HANDOVER";
/// How many programs this process ran before, and when the last one asked for the restart.
const RESTARTS_ENV: &str = "PHOENIX_RESTARTS";
const RESTART_AT_ENV: &str = "PHOENIX_RESTART_AT";
/// The handover file, in the state directory.
const HANDOVER_FILE: &str = "handover.json";

/// What the previous program of this process left: the fleet's part, and `phoenix up`'s own
/// descriptors (its lock, its API sockets).
pub struct Inheritance {
    pub handed: Handed,
    pub lock: Option<OwnedFd>,
    pub api_socket: Option<OwnedFd>,
    pub api_tcp: Option<OwnedFd>,
    pub from_version: String,
    /// What was handed over (counted before the controller takes it).
    pub instances_handed: usize,
    pub connections_kept: usize,
    pub listeners_kept: usize,
    pub restarts: u32,
    /// When the restart was asked (ms since the epoch).
    pub asked_at: Option<i64>,
}

/// The previous program's handover, when this program was started by a restart.
pub fn inherited() -> anyhow::Result<Option<Inheritance>> {
    let Some(path) = std::env::var_os(HANDOVER_ENV) else {
        return Ok(None);
    };
    let (handed, mut extra, from_version) = Handed::read(Path::new(&path))?;
    let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    Ok(Some(Inheritance {
        instances_handed: handed.instances.len(),
        connections_kept: handed.parked.len(),
        listeners_kept: handed.frontends.len(),
        handed,
        lock: extra.remove("lock"),
        api_socket: extra.remove("api.sock"),
        api_tcp: extra.remove("api.tcp"),
        from_version,
        restarts: number(RESTARTS_ENV).unwrap_or(0) as u32,
        asked_at: number(RESTART_AT_ENV),
    }))
}

/// The descriptors of `phoenix up` itself that go to the next program.
pub struct OwnFds<'a> {
    pub lock: BorrowedFd<'a>,
    pub api_socket: BorrowedFd<'a>,
    pub api_tcp: Option<BorrowedFd<'a>>,
}

/// Hands the fleet over and re-executes `binary` (this one when `None`) in this process.
/// Returns only if that cannot be done, with the fleet serving again.
pub async fn restart(
    controller: &Controller,
    state: &Path,
    binary: Option<PathBuf>,
    fds: OwnFds<'_>,
    restarts: u32,
    ready: impl FnOnce(),
    mut stop_asked: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let binary = match binary {
        Some(path) => path,
        None => this_binary()?,
    };
    let binary = check_binary(&binary).await?;
    // The next program reads the fleet file again: a mistake in it must not end the fleet.
    let checking = controller.clone();
    tokio::task::spawn_blocking(move || checking.check_restart())
        .await?
        .context("not restarted (the fleet keeps running as it is)")?;
    let asked_at = now_ms();
    let handover = controller.hand_over().await?;
    let path = state.join(HANDOVER_FILE);
    let mut extra = BTreeMap::from([
        ("lock".to_string(), fds.lock),
        ("api.sock".to_string(), fds.api_socket),
    ]);
    if let Some(fd) = fds.api_tcp {
        extra.insert("api.tcp".into(), fd);
    }
    if let Err(error) = handover.handed.write(&path, &extra) {
        controller.resume(handover);
        return Err(error.into());
    }
    println!(
        "phoenix up: restarting as {}: {} instances and {} open connections kept",
        binary.display(),
        handover.handed.instances.len(),
        handover.handed.parked.len()
    );
    ready();
    // The caller's answer goes out before this program ends.
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Ctrl-C or SIGTERM during the handover: stop instead (after serving again, so the stop
    // drains as usual).
    if stop_asked() {
        let _ = std::fs::remove_file(&path);
        controller.resume(handover);
        bail!("a stop signal came during the restart: stopping instead");
    }
    let env = [
        (HANDOVER_ENV, path.as_os_str().to_owned()),
        (RESTARTS_ENV, OsString::from((restarts + 1).to_string())),
        (RESTART_AT_ENV, OsString::from(asked_at.to_string())),
    ];
    let program = binary.clone();
    let error = tokio::task::spawn_blocking(move || {
        phoenix_driver::launcher::on_main_thread(move || exec(&program, &env))
    })
    .await?;
    let _ = std::fs::remove_file(&path);
    controller.resume(handover);
    Err(error).with_context(|| format!("cannot run {}", binary.display()))
}

/// The path this program was run from. A package upgrade that replaced the file leaves
/// `/proc/self/exe` saying `PATH (deleted)`: the file now at PATH is the one to run.
fn this_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe().context("cannot find this program's own path")?;
    let text = path.as_os_str().as_bytes();
    Ok(match text.strip_suffix(b" (deleted)") {
        Some(rest) => PathBuf::from(std::ffi::OsStr::from_bytes(rest)),
        None => path,
    })
}

/// Replaces this program with `binary`, with this program's arguments and environment plus
/// `env`. Returns only on failure.
fn exec(binary: &Path, env: &[(&str, OsString)]) -> std::io::Error {
    let c = |bytes: &[u8]| CString::new(bytes).map_err(std::io::Error::other);
    let build = || -> std::io::Result<(CString, Vec<CString>, Vec<CString>)> {
        let program = c(binary.as_os_str().as_bytes())?;
        let mut args = vec![program.clone()];
        for arg in std::env::args_os().skip(1) {
            args.push(c(arg.as_bytes())?);
        }
        let ours: Vec<&str> = env.iter().map(|(k, _)| *k).collect();
        let mut vars = Vec::new();
        for (key, value) in std::env::vars_os() {
            if !ours.iter().any(|k| key.as_bytes() == k.as_bytes()) {
                vars.push(c(&[key.as_bytes(), b"=", value.as_bytes()].concat())?);
            }
        }
        for (key, value) in env {
            vars.push(c(&[key.as_bytes(), b"=", value.as_bytes()].concat())?);
        }
        Ok((program, args, vars))
    };
    let (program, args, vars) = match build() {
        Ok(built) => built,
        Err(error) => return error,
    };
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = vars.iter().map(|v| v.as_ptr()).collect();
    envp.push(std::ptr::null());
    // A stop or restart signal that comes while the next program starts waits (a blocked
    // signal stays pending across execve) instead of killing the process with its default
    // action: the next program unblocks them once it handles them.
    let old = set_stop_signals(libc::SIG_BLOCK);
    // SAFETY: every pointer is to a NUL-terminated string that outlives the call, and both
    // arrays end with a null pointer.
    unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    let error = std::io::Error::last_os_error();
    // SAFETY: restores this thread's mask as it was.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    error
}

/// Blocks or unblocks SIGINT, SIGTERM and SIGHUP on the calling thread; returns the old mask.
fn set_stop_signals(how: libc::c_int) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; pthread_sigmask
    // changes only the calling thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(how, &set, &mut old);
        old
    }
}

/// Called once `phoenix up` handles SIGINT, SIGTERM and SIGHUP: unblocks them where the
/// previous program blocked them before `execve` (every thread of this program inherited the
/// mask; the main thread, which lives as long as the process, takes delivery). Children get
/// an empty mask whatever this one is (the standard library resets it).
pub async fn unblock_stop_signals() {
    set_stop_signals(libc::SIG_UNBLOCK);
    let _ = tokio::task::spawn_blocking(|| {
        phoenix_driver::launcher::on_main_thread(|| set_stop_signals(libc::SIG_UNBLOCK))
    })
    .await;
}

/// Checks that `binary` is a Phoenix this process may run: an absolute path to an executable
/// file that only its owner (root or this user) can change or replace, answering `--version`
/// as Phoenix. Returns the file's own path (links resolved), which is what runs.
async fn check_binary(binary: &Path) -> anyhow::Result<PathBuf> {
    if !binary.is_absolute() {
        bail!("{}: give the binary's absolute path", binary.display());
    }
    // The file itself, not a link someone could point elsewhere between the check and the run.
    let binary = &std::fs::canonicalize(binary).with_context(|| format!("{}", binary.display()))?;
    let meta = std::fs::metadata(binary).with_context(|| format!("{}", binary.display()))?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let mode = meta.permissions().mode();
    if !meta.is_file() || mode & 0o111 == 0 {
        bail!("{}: not an executable file", binary.display());
    }
    if mode & 0o022 != 0 || (meta.uid() != 0 && meta.uid() != euid) {
        bail!(
            "{}: others could change it (mode {:o}, owner uid {}): it must be writable only by root or uid {euid}",
            binary.display(),
            mode & 0o7777,
            meta.uid()
        );
    }
    // Nor may others replace it in its directory (a sticky one, like /tmp, lets only its owner).
    let parent = binary.parent().unwrap_or(Path::new("/"));
    let dir = std::fs::metadata(parent).with_context(|| format!("{}", parent.display()))?;
    let dir_mode = dir.permissions().mode();
    if dir_mode & 0o022 != 0 && dir_mode & 0o1000 == 0 {
        bail!(
            "{}: others may replace files in {} (mode {:o})",
            binary.display(),
            parent.display(),
            dir_mode & 0o7777
        );
    }
    let output = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(binary)
            .arg("--version")
            .env_clear()
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("{} --version did not answer within 10 s", binary.display()))?
    .with_context(|| format!("cannot run {}", binary.display()))?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    match text.strip_prefix("phoenix ") {
        Some(version) if output.status.success() => {
            println!("phoenix up: {} is phoenix {version}", binary.display());
            Ok(binary.clone())
        }
        _ => bail!(
            "{}: not a Phoenix binary (`--version` said {text:?})",
            binary.display()
        ),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What the program that starts from `inheritance` journals and prints; returns the
/// journal's detail.
pub async fn announce(controller: &Controller, inheritance: &Inheritance) -> serde_json::Value {
    let took_ms = inheritance.asked_at.map(|at| now_ms() - at);
    let status = controller.status().await;
    let instances: usize = status
        .roles
        .iter()
        .flat_map(|r| r.generations.first())
        .map(|g| g.instances.len())
        .sum();
    let detail = json!({
        "from_version": inheritance.from_version,
        "to_version": env!("CARGO_PKG_VERSION"),
        "instances_handed": inheritance.instances_handed,
        "instances_running": instances,
        "connections_kept": inheritance.connections_kept,
        "listeners_kept": inheritance.listeners_kept,
        "restarts": inheritance.restarts,
        "took_ms": took_ms,
    });
    println!(
        "phoenix up: restarted ({} -> {}) in {} ms: {} of {} instances taken over, {} connections kept",
        inheritance.from_version,
        env!("CARGO_PKG_VERSION"),
        took_ms.unwrap_or(0),
        instances.min(inheritance.instances_handed),
        inheritance.instances_handed,
        inheritance.connections_kept
    );
    controller.journal_restart(detail.clone()).await;
    detail
}

#[derive(Debug, clap::Args)]
pub struct RestartArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct UpgradeArgs {
    /// The new `phoenix` binary (made absolute from here).
    pub binary: PathBuf,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `phoenix restart`.
pub async fn restart_cmd(state: &Path, args: RestartArgs) -> anyhow::Result<ExitCode> {
    ask(state, &args.api, None, args.json).await
}

/// `phoenix upgrade PATH`.
pub async fn upgrade_cmd(state: &Path, args: UpgradeArgs) -> anyhow::Result<ExitCode> {
    let binary =
        std::path::absolute(&args.binary).with_context(|| format!("{}", args.binary.display()))?;
    if !binary.is_file() {
        bail!("{}: no such file", binary.display());
    }
    ask(state, &args.api, Some(binary), args.json).await
}

/// Asks the running `phoenix up` to restart and waits until the next program answers.
async fn ask(
    state: &Path,
    api: &ApiArgs,
    binary: Option<PathBuf>,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let client = Client::new(state, api)?;
    let before: phoenix_api::UpInfo = client.get_json("/v1/up").await?;
    let started = Instant::now();
    let body = json!({ "binary": binary });
    // The answer may be lost when the program it came from ends: the new one tells.
    if let Ok(response) = client.send("POST", "/v1/restart", Some(body)).await {
        let status = response.status();
        if !status.is_success() {
            use http_body_util::BodyExt;
            let bytes = response.into_body().collect().await?.to_bytes();
            return Err(crate::failure::Failure::from_api(status, &bytes).into());
        }
    }
    let deadline = started + Duration::from_secs(120);
    let after = loop {
        if Instant::now() > deadline {
            bail!(
                "phoenix up (pid {}) did not come back within 120 s",
                before.pid
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if !Path::new(&format!("/proc/{}", before.pid)).exists() {
            bail!(
                "phoenix up (pid {}) ended during the restart: its output says why",
                before.pid
            );
        }
        if let Ok(info) = client.get_json::<phoenix_api::UpInfo>("/v1/up").await
            && info.restarts > before.restarts
            && info.last_restart.is_some()
        {
            break info;
        }
    };
    if json_out {
        let answer = json!({
            "pid": after.pid,
            "from_version": before.version,
            "version": after.version,
            "binary": after.binary,
            "restarts": after.restarts,
            "duration_ms": started.elapsed().as_millis() as u64,
            "restart": after.last_restart,
        });
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(ExitCode::SUCCESS);
    }
    let kept = |key: &str| {
        after
            .last_restart
            .as_ref()
            .and_then(|r| r[key].as_u64())
            .unwrap_or(0)
    };
    println!(
        "phoenix up (pid {}) restarted: {} -> {} ({}), {} of {} instances kept running, {} open connections kept, {} ms",
        after.pid,
        before.version,
        after.version,
        after.binary,
        kept("instances_running").min(kept("instances_handed")),
        kept("instances_handed"),
        kept("connections_kept"),
        started.elapsed().as_millis()
    );
    Ok(ExitCode::SUCCESS)
}

/// For `UpInfo`: this program.
pub fn up_info(inheritance: Option<&Inheritance>) -> phoenix_api::UpInfo {
    phoenix_api::UpInfo {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        binary: std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        started_at: now_ms(),
        restarts: inheritance.map_or(0, |i| i.restarts),
        last_restart: None,
    }
}
