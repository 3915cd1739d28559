//! `phoenix review up NAME | ls | down NAME`: throwaway copies of the fleet beside the main
//! one (a branch's or a directory's version), each with its own state, ports and secrets,
//! burned by hand or once idle for their `ttl`.
//!
//! A review fleet is a `phoenix up` of its own, started detached on a rewritten copy of the
//! fleet file under `STATE/reviews/NAME/` (`src/` the copied source, `state/` its state,
//! `up.log` its output, `review.json` what started it).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use phoenix_fleet::FleetStatus;
use serde::{Deserialize, Serialize};

use crate::client::{ApiArgs, Client};

#[derive(Debug, clap::Args)]
pub struct ReviewArgs {
    #[command(subcommand)]
    pub command: ReviewCommand,
    /// Print JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum ReviewCommand {
    /// Start an isolated copy of the fleet: its own state, a free port per role, its own
    /// secrets; from the fleet file's directory, another directory or a git branch.
    Up {
        /// Lowercase letters, digits and `-` (a branch name, say), at most 32.
        name: String,
        /// A directory holding a phoenix.toml, or a git branch, tag or commit of the fleet
        /// file's repository [default: the fleet file's directory as it is now].
        #[arg(long, value_name = "BRANCH_OR_DIR")]
        from: Option<String>,
        /// Burned once no request has reached it for this long.
        #[arg(long, default_value = "8h", value_parser = parse_ttl)]
        ttl: Duration,
        /// A directory with a file per secret of the fleet (the main fleet's are never used).
        #[arg(long, value_name = "DIR")]
        secrets: Option<PathBuf>,
        /// The main fleet file [default: the nearest phoenix.toml, up from here].
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
    },
    /// The review fleets: source, age, ttl, state and where their roles answer.
    Ls,
    /// Stop a review fleet's instances and remove everything it had.
    Down { name: String },
}

/// What `review.json` keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Review {
    name: String,
    from: String,
    ttl_seconds: u64,
    created_at: u64,
    pid: u32,
    /// The pid's start time (clock ticks since boot): a reused pid is not the review's.
    start_time: u64,
}

/// `--ttl`: between a minute and 30 days.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = phoenix_fleet::parse_duration(text)?;
    if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(30 * 86_400) {
        return Err(format!("{text:?}: write 1s to 30d"));
    }
    Ok(ttl)
}

pub async fn run(state: &Path, args: ReviewArgs) -> anyhow::Result<ExitCode> {
    let reviews = state.join("reviews");
    match args.command {
        ReviewCommand::Up {
            name,
            from,
            ttl,
            secrets,
            file,
        } => {
            check_name(&name)?;
            let fleet = crate::locate::fleet_file(file.as_deref());
            up(
                &reviews,
                &name,
                &fleet,
                from.as_deref(),
                ttl,
                secrets.as_deref(),
                args.json,
            )
            .await
        }
        ReviewCommand::Ls => ls(&reviews, args.json).await,
        ReviewCommand::Down { name } => {
            check_name(&name)?;
            down(&reviews, &name, args.json).await
        }
    }
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty() || name.len() > 32 || !plain || name.starts_with('-') {
        bail!(
            "review name {name:?}: write 1 to 32 lowercase letters, digits and `-`, not starting with `-`"
        );
    }
    Ok(())
}

async fn up(
    reviews: &Path,
    name: &str,
    fleet: &Path,
    from: Option<&str>,
    ttl: Duration,
    secrets: Option<&Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let dir = reviews.join(name);
    if let Some(review) = read_review(&dir)
        && alive(&review)
    {
        bail!(
            "review {name} is up already (pid {}): `phoenix review down {name}` first",
            review.pid
        );
    }
    remove_dir(&dir)?;
    let fleet = fleet
        .canonicalize()
        .with_context(|| format!("no fleet file at {}", fleet.display()))?;
    // The main file must be right first: its errors name its own lines.
    phoenix_fleet::FleetFile::load(&fleet)?;
    if let Some(secrets) = secrets
        && !secrets.is_dir()
    {
        bail!("--secrets {}: not a directory", secrets.display());
    }
    let secrets = secrets.map(|s| s.canonicalize()).transpose()?;
    create_private(&dir)?;
    let started = start(&dir, name, &fleet, from, ttl, secrets.as_deref()).await;
    let (review, status) = match started {
        Ok(started) => started,
        Err(error) => {
            let _ = remove_dir(&dir);
            return Err(error);
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&view(&dir, &review, Some(&status)))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "review {name} is up (from {}, burned after {} without a request)",
        review.from,
        human(ttl)
    );
    for role in &status.roles {
        println!("  role {}: http://{}", role.name, role.listen);
    }
    println!(
        "  state {}: phoenix --state {} status",
        dir.join("state").display(),
        dir.join("state").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Copies the source, rewrites its fleet file, starts its `phoenix up` and waits until every
/// role serves.
async fn start(
    dir: &Path,
    name: &str,
    fleet: &Path,
    from: Option<&str>,
    ttl: Duration,
    secrets: Option<&Path>,
) -> anyhow::Result<(Review, FleetStatus)> {
    let src = dir.join("src");
    let main_state = dir
        .parent()
        .and_then(Path::parent)
        .and_then(|s| s.canonicalize().ok())
        .unwrap_or_default();
    let (copied_fleet, from) = copy_source(fleet, from, &src, &main_state)?;
    let text = std::fs::read_to_string(&copied_fleet).with_context(|| {
        format!(
            "{}: no fleet file in the review's source",
            copied_fleet.display()
        )
    })?;
    let original_dir = fleet.parent().unwrap_or(Path::new("/"));
    let copy = phoenix_fleet::config::review_copy(&text, original_dir, secrets)
        .map_err(|why| anyhow::anyhow!("{}: {why}", copied_fleet.display()))?;
    std::fs::write(&copied_fleet, &copy.text)?;
    for change in &copy.changes {
        eprintln!("review {name}: {change}");
    }
    let log = std::fs::File::create(dir.join("up.log"))?;
    let state = dir.join("state");
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--state")
        .arg(&state)
        .arg("up")
        .arg("-f")
        .arg(&copied_fleet)
        .arg("--no-dashboard")
        .arg("--idle-exit")
        .arg(format!("{}s", ttl.as_secs()))
        .arg("--review-dir")
        .arg(dir)
        .current_dir(&src)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for this command never reaches it.
        .process_group(0)
        .spawn()
        .context("cannot start the review's phoenix up")?;
    let created_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let review = Review {
        name: name.to_string(),
        from,
        ttl_seconds: ttl.as_secs(),
        created_at,
        pid: child.id(),
        start_time: phoenix_driver::process_start_time(child.id()).unwrap_or_default(),
    };
    std::fs::write(dir.join("review.json"), serde_json::to_vec_pretty(&review)?)?;
    match wait_serving(dir, &mut child).await {
        Ok(status) => Ok((review, status)),
        Err(error) => {
            stop(&review).await;
            let log = std::fs::read_to_string(dir.join("up.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "review {name} did not come up: {error:#}\n{}",
                tail.join("\n")
            )
        }
    }
}

/// The source as a copy under `src`: a directory's files (without state directories and
/// `.git`), or a git ref's tree. Returns the copy's fleet file and how to name the source.
fn copy_source(
    fleet: &Path,
    from: Option<&str>,
    src: &Path,
    state: &Path,
) -> anyhow::Result<(PathBuf, String)> {
    let fleet_dir = fleet.parent().unwrap_or(Path::new("/"));
    let file_name = fleet.file_name().unwrap_or_default();
    std::fs::create_dir_all(src)?;
    match from {
        None => {
            copy_tree(fleet_dir, src, state)?;
            Ok((src.join(file_name), fleet_dir.display().to_string()))
        }
        Some(from) if Path::new(from).is_dir() => {
            let from_dir = Path::new(from).canonicalize()?;
            copy_tree(&from_dir, src, state)?;
            Ok((
                src.join(crate::locate::FLEET_FILE),
                from_dir.display().to_string(),
            ))
        }
        Some(reference) if reference.starts_with('-') => {
            bail!("--from {reference:?}: a branch, tag or commit does not start with `-`")
        }
        Some(reference) => {
            let top = git(fleet_dir, &["rev-parse", "--show-toplevel"]).with_context(|| {
                format!(
                    "--from {reference}: not a directory, and {} is not in a git repository",
                    fleet_dir.display()
                )
            })?;
            let top = PathBuf::from(top.trim());
            let commit = git(
                &top,
                &[
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    &format!("{reference}^{{commit}}"),
                ],
            )
            .map_err(|_| {
                anyhow::anyhow!(
                    "--from {reference}: neither a directory nor a branch, tag or commit of {}",
                    top.display()
                )
            })?;
            let archive = std::process::Command::new("git")
                .arg("-C")
                .arg(&top)
                .args(["archive", "--format=tar", commit.trim()])
                .stdout(Stdio::piped())
                .spawn()?;
            let unpacked = std::process::Command::new("tar")
                .args(["-x", "--no-same-owner", "-C"])
                .arg(src)
                .stdin(archive.stdout.context("git archive's output")?)
                .status()?;
            if !unpacked.success() {
                bail!(
                    "--from {reference}: cannot unpack git archive of {}",
                    top.display()
                );
            }
            let relative = fleet
                .strip_prefix(top.canonicalize()?)
                .unwrap_or(Path::new(file_name));
            Ok((
                src.join(relative),
                format!(
                    "{reference} ({})",
                    &commit.trim()[..12.min(commit.trim().len())]
                ),
            ))
        }
    }
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()?;
    if !output.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// Copies regular files, directories and symbolic links (as links), leaving out state
/// directories (`.phoenix`, and the main one whatever its name), `.git` and `target`.
fn copy_tree(from: &Path, to: &Path, state: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        let skipped = [crate::locate::STATE_DIR, ".git", "target"]
            .iter()
            .any(|skip| name == *skip);
        // The main state directory, whatever its name: it holds this very copy.
        if skipped || entry.path().canonicalize().is_ok_and(|p| p == state) {
            continue;
        }
        let (source, target) = (entry.path(), to.join(&name));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_tree(&source, &target, state)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&source)?, &target)?;
        } else if kind.is_file() {
            std::fs::copy(&source, &target)
                .with_context(|| format!("cannot copy {}", source.display()))?;
        }
    }
    Ok(())
}

/// Polls the review's API until every role has a live generation with all its instances
/// healthy, or its `phoenix up` ended, or 3 minutes passed.
async fn wait_serving(dir: &Path, child: &mut std::process::Child) -> anyhow::Result<FleetStatus> {
    let state = dir.join("state");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        // Our own child: waited on directly, for its exit status in the message.
        if let Ok(Some(status)) = child.try_wait() {
            bail!("its phoenix up ended ({status})");
        }
        if state.join("api.sock").exists()
            && let Ok(client) = Client::new(&state, &owner())
            && let Ok(status) = client.get_json::<FleetStatus>("/v1/status").await
            && status.roles.iter().all(|r| {
                r.live_generation.is_some()
                    && r.generations.first().is_some_and(|g| {
                        g.instances.iter().filter(|i| i.status == "healthy").count()
                            >= r.desired_instances as usize
                    })
            })
        {
            return Ok(status);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("its roles were not all serving within 3 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn owner() -> ApiArgs {
    ApiArgs {
        api: None,
        token_file: None,
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
        token: None,
    }
}

async fn ls(reviews: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let mut views = Vec::new();
    let mut names: Vec<PathBuf> = match std::fs::read_dir(reviews) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    for dir in names {
        let Some(review) = read_review(&dir) else {
            continue;
        };
        let status = match alive(&review) {
            true => match Client::new(&dir.join("state"), &owner()) {
                Ok(client) => client.get_json::<FleetStatus>("/v1/status").await.ok(),
                Err(_) => None,
            },
            false => None,
        };
        views.push(view(&dir, &review, status.as_ref()));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(ExitCode::SUCCESS);
    }
    if views.is_empty() {
        println!("no review fleets (phoenix review up NAME starts one)");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<9} {:>8} {:>8}  {:<40} FROM",
        "NAME", "STATE", "AGE", "TTL", "ROLES"
    );
    for v in &views {
        let roles: Vec<String> = v
            .roles
            .iter()
            .map(|(r, a)| format!("{r}=http://{a}"))
            .collect();
        println!(
            "{:<20} {:<9} {:>8} {:>8}  {:<40} {}",
            v.name,
            v.state,
            human(Duration::from_secs(v.age_seconds)),
            human(Duration::from_secs(v.ttl_seconds)),
            roles.join(" "),
            v.from
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct ReviewView {
    name: String,
    /// `up`, or `stopped` (its `phoenix up` is gone; `down` removes what is left).
    state: &'static str,
    from: String,
    pid: u32,
    age_seconds: u64,
    ttl_seconds: u64,
    state_dir: PathBuf,
    /// Role name → the address its proxy answers on.
    roles: std::collections::BTreeMap<String, String>,
}

fn view(dir: &Path, review: &Review, status: Option<&FleetStatus>) -> ReviewView {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    ReviewView {
        name: review.name.clone(),
        state: if alive(review) { "up" } else { "stopped" },
        from: review.from.clone(),
        pid: review.pid,
        age_seconds: now.saturating_sub(review.created_at),
        ttl_seconds: review.ttl_seconds,
        state_dir: dir.join("state"),
        roles: status
            .map(|s| {
                s.roles
                    .iter()
                    .map(|r| (r.name.clone(), r.listen.clone()))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

async fn down(reviews: &Path, name: &str, json: bool) -> anyhow::Result<ExitCode> {
    let dir = reviews.join(name);
    let Some(review) = read_review(&dir) else {
        let known: Vec<String> = std::fs::read_dir(reviews)
            .map(|e| {
                e.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        bail!(
            "no review fleet {name:?} (review fleets: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    };
    let forced = stop(&review).await;
    remove_dir(&dir)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"review": name, "removed": true, "forced": forced})
        );
    } else if forced {
        println!(
            "review {name}: its phoenix up did not stop within a minute and was killed; removed"
        );
    } else {
        println!("review {name}: instances stopped, state and copy removed");
    }
    Ok(ExitCode::SUCCESS)
}

/// Stops the review's `phoenix up` (SIGTERM: it drains and stops its instances), killing it
/// after a minute; true when it had to be killed.
async fn stop(review: &Review) -> bool {
    if !alive(review) {
        return false;
    }
    signal(review.pid, libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while alive(review) {
        if tokio::time::Instant::now() > deadline {
            signal(review.pid, libc::SIGKILL);
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a pid just checked (by `alive`) to be this review's phoenix up.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Whether the review's `phoenix up` still runs: the process started then, not a zombie.
fn alive(review: &Review) -> bool {
    phoenix_driver::process_alive(review.pid, review.start_time)
}

fn read_review(dir: &Path) -> Option<Review> {
    serde_json::from_slice(&std::fs::read(dir.join("review.json")).ok()?).ok()
}

fn create_private(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    Ok(())
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Called by a review's own `phoenix up` once its ttl stopped it: nothing of it is left.
pub fn remove_expired(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => println!("phoenix up: review removed ({})", dir.display()),
        Err(error) => eprintln!(
            "phoenix up: cannot remove the review's {}: {error}",
            dir.display()
        ),
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}
