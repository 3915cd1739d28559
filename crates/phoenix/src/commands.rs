//! The commands that talk to a running `phoenix up`, and the local image commands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use http_body_util::BodyExt;
use phoenix_api::StreamLine;
use phoenix_fleet::{Clock, DeployReport, FleetFile, FleetStatus};
use phoenix_image::{ImageStore, short_digest};
use phoenix_store::{ImageRow, JournalRow, Store};

use crate::client::{ApiArgs, Client};

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The role to deploy.
    pub role: String,
    /// Deploy this image (name, digest or digest prefix) instead of baking the role's recipe.
    #[arg(long)]
    pub image: Option<String>,
    /// Print the final report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    pub role: String,
    /// A generation number (`phoenix history`) or an image (name, digest or prefix; digits
    /// only are a generation if one by that number served) [default: the newest earlier
    /// generation whose image differs from the live one].
    #[arg(long, value_name = "GENERATION|IMAGE")]
    pub to: Option<String>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// The role (all roles when left out).
    pub role: Option<String>,
    /// The newest N events.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// The cluster's journal in etcd (rollouts, placements, leaders, every host's), not this
    /// host's.
    #[arg(long)]
    pub cluster: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, clap::Args)]
pub struct BakeArgs {
    /// Recipes to bake (all when left out).
    pub names: Vec<String>,
    /// The fleet file.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Tag the baked image `NAME:TAG` (one recipe), besides its recipe's `tag`.
    #[arg(long)]
    pub tag: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ImagesArgs {
    #[arg(long)]
    pub json: bool,
}

pub async fn deploy(state: &Path, args: DeployArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(state, &args.api)?;
    let body = serde_json::json!({ "image": args.image });
    stream_deploy(
        &client,
        &format!("/v1/roles/{}/deploy", args.role),
        Some(body),
        args.json,
    )
    .await
}

pub async fn rollback(state: &Path, args: RollbackArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(state, &args.api)?;
    stream_deploy(
        &client,
        &format!("/v1/roles/{}/rollback", args.role),
        args.to.map(|to| serde_json::json!({ "to": to })),
        args.json,
    )
    .await
}

/// Prints a deploy's progress as it arrives (a spinner with the current step on a terminal,
/// plain lines otherwise), then its summary line.
pub(crate) async fn stream_deploy(
    client: &Client,
    path: &str,
    body: Option<serde_json::Value>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    stream_work(client, path, body, json, "deploy", |report| {
        let report: DeployReport = serde_json::from_value(report)?;
        Ok(summary(&report))
    })
    .await
}

/// Streams long work the API runs (a deploy, an apply): progress lines, then the report
/// (`summarize`d, or as JSON), or the failure.
pub(crate) async fn stream_work(
    client: &Client,
    path: &str,
    body: Option<serde_json::Value>,
    json: bool,
    what: &str,
    summarize: impl Fn(serde_json::Value) -> anyhow::Result<String>,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let response = client.send("POST", path, body).await?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let text = body.collect().await?.to_bytes();
        return Err(crate::failure::Failure::from_api(status, &text).into());
    }
    let progress = ProgressOutput::new(json);
    let mut buffer = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            buffer.extend_from_slice(&data);
        }
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let line: StreamLine = serde_json::from_slice(&line)
                .with_context(|| format!("unexpected {what} stream"))?;
            match line {
                StreamLine::Progress(text) => progress.line(started, &text),
                StreamLine::Done(report) => {
                    progress.finish();
                    if json {
                        println!("{}", serde_json::to_string_pretty(&report)?);
                    } else {
                        println!("{}", summarize(report)?);
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                StreamLine::Error(message) => {
                    progress.finish();
                    return Err(crate::failure::Failure::new(
                        "refused",
                        format!("{what} failed: {message}"),
                    )
                    .into());
                }
            }
        }
    }
    progress.finish();
    anyhow::bail!("the API closed the {what} stream without a result; see `phoenix history`")
}

/// Progress lines: kept above a spinner on a terminal, printed plainly otherwise, hidden with --json.
enum ProgressOutput {
    Hidden,
    Plain,
    Spinner(indicatif::ProgressBar),
}

impl ProgressOutput {
    fn new(json: bool) -> Self {
        use std::io::IsTerminal;
        if json {
            return ProgressOutput::Hidden;
        }
        if !std::io::stdout().is_terminal() {
            return ProgressOutput::Plain;
        }
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.enable_steady_tick(std::time::Duration::from_millis(100));
        ProgressOutput::Spinner(spinner)
    }

    fn line(&self, started: Instant, text: &str) {
        let line = format!("[{:>6.1}s] {text}", started.elapsed().as_secs_f64());
        match self {
            ProgressOutput::Hidden => {}
            ProgressOutput::Plain => println!("{line}"),
            ProgressOutput::Spinner(spinner) => {
                spinner.println(&line);
                spinner.set_message(text.to_string());
            }
        }
    }

    fn finish(&self) {
        if let ProgressOutput::Spinner(spinner) = self {
            spinner.finish_and_clear();
        }
    }
}

/// The one-line summary of a deploy.
pub fn summary(report: &DeployReport) -> String {
    format!(
        "deployed {} generation {} ({}) in {:.1} s: bake {} ms, {}boot to healthy {} ms, switch {} µs{}, drain {} ms, stop {} ms",
        report.role,
        report.generation,
        short_digest(&report.image),
        report.total_ms as f64 / 1000.0,
        report.bake_ms,
        report
            .verified
            .map(|v| format!("verify {} ms ({} checks), ", v.ms, v.checks))
            .unwrap_or_default(),
        report.boot_to_healthy_ms,
        report.switch_us,
        report
            .first_request_after_switch_us
            .map(|us| format!(" (first request on the new generation {us} µs later)"))
            .unwrap_or_default(),
        report.drain_ms,
        report.stop_ms
    )
}

pub async fn status(state: &Path, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(state, &args.api)?;
    let status: FleetStatus = client.get_json("/v1/status").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    for role in &status.roles {
        let live = role
            .generations
            .iter()
            .find(|g| Some(g.id) == role.live_generation);
        let healthy = live
            .map(|g| g.instances.iter().filter(|i| i.status == "healthy").count())
            .unwrap_or(0);
        println!(
            "role {}  proxy {}  live generation {}  image {}  healthy {healthy}/{}  requests {}  proxy errors {}{}",
            role.name,
            role.listen,
            role.live_generation
                .map(|g| g.to_string())
                .unwrap_or_else(|| "none".into()),
            match (&role.image_name, &role.image) {
                (Some(name), Some(digest)) => format!("{name} ({})", short_digest(digest)),
                _ => "-".to_string(),
            },
            role.desired_instances,
            role.requests,
            role.proxy_errors,
            if role.deploying { "  (deploying)" } else { "" }
        );
        for generation in &role.generations {
            println!(
                "  generation {} {} {}",
                generation.id, generation.status, generation.image
            );
            for instance in &generation.instances {
                println!(
                    "    {:<14} {:<10} {:<21} pid {:<7} up {:>6}s  in-flight {}{}{}{}",
                    instance.name,
                    instance.status,
                    instance.address,
                    instance.pid,
                    instance.uptime_ms / 1000,
                    instance.in_flight,
                    match (instance.standby, instance.protected) {
                        (true, _) => "  [standby]",
                        (false, true) => "  [protected]",
                        _ => "",
                    },
                    instance
                        .published
                        .as_deref()
                        .map(|p| format!("  published at {p}"))
                        .unwrap_or_default(),
                    instance
                        .last_error
                        .as_deref()
                        .map(|e| format!("  last error: {e}"))
                        .unwrap_or_default()
                );
            }
        }
        for remote in &role.remote {
            println!(
                "  remote {:<14} {:<10} {:<21} on host {}  in-flight {}",
                remote.name,
                if remote.healthy { "healthy" } else { "down" },
                remote.address,
                remote.host,
                remote.in_flight
            );
        }
        if let Some(policy) = &role.policy {
            println!("  {}", policy_line(policy));
        }
    }
    if let Some(cluster) = &status.cluster {
        match (&cluster.status, &cluster.error) {
            (Some(cluster), _) => print!("{}", crate::host_cmd::hosts_table(cluster)),
            (None, Some(error)) => println!("cluster: cannot read the hosts: {error}"),
            (None, None) => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `policy: allow from api; from outside 127.0.0.1/32; refused web 3, outside 1`.
fn policy_line(policy: &phoenix_fleet::PolicyView) -> String {
    let list = |items: &[String]| {
        if items.is_empty() {
            "nobody".to_string()
        } else {
            items.join(", ")
        }
    };
    let refused: Vec<String> = policy
        .denied
        .iter()
        .filter(|d| d.packets > 0)
        .map(|d| format!("{} {}", d.from.as_deref().unwrap_or(&d.kind), d.packets))
        .collect();
    format!(
        "policy: allow from {}; from outside {}; refused {}",
        list(&policy.allow_from),
        list(&policy.allow_cidrs),
        if refused.is_empty() {
            "none".to_string()
        } else {
            refused.join(", ")
        }
    )
}

pub async fn history(state: &Path, args: HistoryArgs) -> anyhow::Result<ExitCode> {
    if args.cluster {
        return cluster_history(state, args).await;
    }
    // A role the journal never named is a typo, not an empty history.
    let path = state.join("state.db");
    if let Some(role) = &args.role
        && path.exists()
    {
        let known = Store::open(&path)?.journal_roles()?;
        if !known.contains(role) {
            return Err(crate::failure::Failure::new(
                "not_found",
                format!(
                    "no role {role:?} in the journal (roles: {})",
                    known.join(", ")
                ),
            )
            .into());
        }
    }
    let mut query = format!("/v1/history?limit={}", args.limit);
    if let Some(role) = &args.role {
        query.push_str(&format!("&role={role}"));
    }
    // Through the API when `phoenix up` runs; straight from the state file when its socket is
    // gone or left behind by a crash (an API named with --api must answer).
    let via_api = match Client::new(state, &args.api) {
        Ok(client) if args.api.api.is_some() => Some(client.get_json(&query).await?),
        Ok(client) => client.get_json(&query).await.ok(),
        Err(error) if args.api.api.is_some() => return Err(error),
        Err(_) => None,
    };
    let rows: Vec<JournalRow> = match via_api {
        Some(rows) => rows,
        None => {
            let path = state.join("state.db");
            anyhow::ensure!(
                path.exists(),
                "no state in {} (run `phoenix up` first)",
                state.display()
            );
            Store::open(&path)?.history(args.role.as_deref(), args.limit)?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    for row in rows {
        println!(
            "{:>5}  {}  {:<8} {:<22} {}",
            row.seq,
            clock_time(row.at),
            row.role.as_deref().unwrap_or("-"),
            row.kind,
            describe(&row.detail)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `phoenix history --cluster [ROLE]`: the cluster's journal, through `phoenix up`.
async fn cluster_history(state: &Path, args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(state, &args.api)?;
    let query = format!("/v1/cluster/history?limit={}", args.limit);
    let events: Vec<phoenix_fleet::cluster::ClusterEvent> = client.get_json(&query).await?;
    let events: Vec<_> = events
        .into_iter()
        .filter(|e| {
            args.role
                .as_deref()
                .is_none_or(|role| e.detail["role"].as_str() == Some(role))
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&events)?);
        return Ok(ExitCode::SUCCESS);
    }
    for event in events {
        println!(
            "{:>5}  {}  {:<10} {:<22} {}",
            event.seq,
            clock_time(event.at_ms),
            event.host,
            event.kind,
            describe(&event.detail)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A journal detail as `key=value` pairs, digests shortened.
fn describe(detail: &serde_json::Value) -> String {
    let Some(map) = detail.as_object() else {
        return detail.to_string();
    };
    map.iter()
        .map(|(key, value)| {
            let text = match value {
                serde_json::Value::String(s) if s.starts_with("sha256:") => {
                    short_digest(s).to_string()
                }
                serde_json::Value::String(s) => s.replace('\n', " | "),
                other => other.to_string(),
            };
            format!("{key}={text}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `YYYY-MM-DD HH:MM:SS.mmm` UTC of a Unix time in milliseconds.
fn clock_time(ms: i64) -> String {
    let seconds = (ms / 1000).max(0) as u64;
    let stamp = phoenix_image::rfc3339(seconds);
    format!(
        "{} {}.{:03}",
        &stamp[..10],
        &stamp[11..19],
        ms.rem_euclid(1000)
    )
}

pub async fn bake(state: &Path, args: BakeArgs) -> anyhow::Result<ExitCode> {
    let file = crate::locate::fleet_file(args.file.as_deref());
    let fleet = FleetFile::load(&file)?;
    let names: Vec<String> = if args.names.is_empty() {
        fleet.images.keys().cloned().collect()
    } else {
        args.names.clone()
    };
    anyhow::ensure!(
        !names.is_empty(),
        "{} has no [image.NAME] recipes",
        file.display()
    );
    if let Some(tag) = &args.tag {
        phoenix_image::check_tag(tag).map_err(|why| anyhow::anyhow!("--tag: {why}"))?;
        anyhow::ensure!(
            names.len() == 1,
            "--tag names one image: say which recipe to bake (recipes: {})",
            names.join(", ")
        );
    }
    std::fs::create_dir_all(state)
        .with_context(|| format!("cannot create state directory {}", state.display()))?;
    let options = crate::up::bake_options()?;
    let tag = args.tag.clone();
    let state = state.to_path_buf();
    let json = args.json;
    let outcomes =
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<phoenix_fleet::BakeOutcome>> {
            let store = Store::open(state.join("state.db"))?;
            let images = ImageStore::open(state.join("images"))?;
            let now = phoenix_fleet::SystemClock.now_ms();
            names
                .iter()
                .map(|name| {
                    let mut quiet = ();
                    let mut bars = crate::image_cmd::BakeProgress::new(name);
                    let progress: &mut dyn phoenix_image::Progress =
                        if json { &mut quiet } else { &mut bars };
                    let outcome = phoenix_fleet::bake_image(
                        &store,
                        &images,
                        &fleet,
                        name,
                        options.clone(),
                        now,
                        progress,
                    )?;
                    if let Some(tag) = &tag {
                        store.tag_image(name, tag, &outcome.digest, now)?;
                    }
                    Ok(outcome)
                })
                .collect()
        })
        .await??;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcomes)?);
    } else {
        for outcome in outcomes {
            let state = if outcome.new { "baked" } else { "unchanged" };
            println!(
                "{:<16} {}  {:>9}  {state} in {} ms",
                outcome.name,
                outcome.digest,
                human_size(outcome.size),
                outcome.millis
            );
            for warning in &outcome.warnings {
                eprintln!("warning: image {}: {warning}", outcome.name);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One image in `phoenix images --json`.
#[derive(serde::Serialize)]
struct ImageView {
    #[serde(flatten)]
    row: ImageRow,
    /// Its tags under its name (`v2`), newest first.
    tags: Vec<String>,
    /// The roles whose live generation runs it.
    live: Vec<String>,
}

pub async fn images(state: &Path, args: ImagesArgs) -> anyhow::Result<ExitCode> {
    let path = state.join("state.db");
    let views: Vec<ImageView> = if path.exists() {
        let store = Store::open(&path)?;
        let (tags, live) = (store.tags()?, store.live_generations()?);
        store
            .images()?
            .into_iter()
            .map(|row| ImageView {
                tags: tags
                    .iter()
                    .filter(|(name, _, digest)| *name == row.name && *digest == row.digest)
                    .map(|(_, tag, _)| tag.clone())
                    .collect(),
                live: live
                    .iter()
                    .filter(|g| g.image == row.digest)
                    .map(|g| g.role.clone())
                    .collect(),
                row,
            })
            .collect()
    } else {
        Vec::new()
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:<12} {:<12}  {:>9}  {:<23}  LIVE",
        "NAME", "TAGS", "DIGEST", "SIZE", "BAKED"
    );
    for view in views {
        let row = &view.row;
        println!(
            "{:<16} {:<12} {:<12}  {:>9}  {:<23}  {}",
            row.name,
            if view.tags.is_empty() {
                "-".to_string()
            } else {
                view.tags.join(",")
            },
            short_digest(&row.digest),
            human_size(row.size),
            clock_time(row.created_at),
            if view.live.is_empty() {
                "-".to_string()
            } else {
                view.live.join(",")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

#[derive(Debug, clap::Args)]
pub struct StateArgs {
    #[command(subcommand)]
    pub command: StateCommand,
    /// Print `{"state_db", "ok"}`.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum StateCommand {
    /// Read every page and index of STATE/state.db (SQLite's quick_check): exit 0 when it is
    /// sound, 1 with what is wrong. Safe while `phoenix up` runs.
    Check,
}

pub fn state(state: &Path, args: StateArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        StateCommand::Check => {
            let path = state.join("state.db");
            anyhow::ensure!(
                path.exists(),
                "no state in {} (run `phoenix up` first)",
                state.display()
            );
            Store::open(&path)?.check()?;
            if args.json {
                let answer =
                    serde_json::json!({"state_db": path.display().to_string(), "ok": true});
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                println!("{}: ok", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
