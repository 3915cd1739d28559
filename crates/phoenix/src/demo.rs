//! `phoenix demo`: the whole story in about a minute, in a temporary state directory.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use phoenix_fleet::{Controller, DeployOptions, DeployReport, FleetError, Options, Progress};
use phoenix_image::short_digest;

use crate::load::Load;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub log: crate::LogArgs,
    /// The hello app binary (default: `hello` next to this executable).
    #[arg(long)]
    pub app: Option<PathBuf>,
    /// Keep the temporary state directory (logs, images, state.db) for a look afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Concurrent load clients.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let app = find_app(args.app.as_deref())?;
    let dir = std::env::temp_dir().join(format!("phoenix-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "phoenix demo: state in {} ({})\n",
        dir.display(),
        if args.keep {
            "kept"
        } else {
            "removed at the end"
        }
    );
    let result = story(&dir, &app, args.clients).await;
    if !args.keep {
        remove_dir(&dir);
    }
    result
}

struct Summary {
    sent: u64,
    failed: u64,
    versions: String,
    stale_after_switch: u64,
    first: DeployReport,
    upgrade: DeployReport,
    abort_ms: u128,
    abort_reason: String,
    replaced_ms: u128,
    failures: Vec<String>,
}

async fn story(dir: &Path, app: &Path, clients: usize) -> anyhow::Result<ExitCode> {
    let fleet = dir.join("phoenix.toml");
    write_fleet(&fleet, app, "v1", false)?;
    let controller = Controller::open(Options::new(dir.join("state"), fleet.clone())).await?;
    let addr = controller.listen_addrs()["web"];
    for warning in controller.warnings() {
        println!("   warning: {warning}\n");
    }
    let (_, driver, bridged) = controller.placements().remove(0);
    println!(
        "   instances run with the {driver} driver{}\n",
        match controller.bridge() {
            Some((bridge, subnet, _)) if bridged => format!(", on bridge {bridge} ({subnet})"),
            _ => ", on the host's network".into(),
        }
    );

    step(1, "bake hello v1 and boot 3 instances behind the proxy");
    let first = deploy(&controller).await?;
    println!("   web serves on http://{addr}\n");

    step(
        2,
        &format!("steady load: {clients} clients on keep-alive connections"),
    );
    let load = Load::start(addr, clients, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "   {} requests so far, {} failed\n",
        load.stats.sent.load(Ordering::Relaxed),
        load.stats.failed.load(Ordering::Relaxed)
    );

    step(3, "bake v2 and deploy it blue-green under that load");
    write_fleet(&fleet, app, "v2", false)?;
    let upgrade = deploy(&controller).await?;
    let v1_at_switch = load.stats.versions().get("v1").copied().unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stale_after_switch = load.stats.versions().get("v1").copied().unwrap_or(0) - v1_at_switch;
    println!("   responses from v1 since the switch: {stale_after_switch}\n");

    step(
        4,
        "deploy a broken v3 (its health check fails): the deploy aborts by itself",
    );
    write_fleet(&fleet, app, "v3", true)?;
    let aborting = Instant::now();
    let abort_reason = match deploy(&controller).await {
        Err(error) => match error.downcast::<FleetError>() {
            Ok(FleetError::DeployAborted { reason, .. }) => reason,
            Ok(other) => bail!("the broken deploy failed for another reason: {other}"),
            Err(other) => return Err(other),
        },
        Ok(_) => bail!("the broken v3 was deployed: the health gate did not hold"),
    };
    let abort_ms = aborting.elapsed().as_millis();
    println!(
        "   aborted after {abort_ms} ms: {}",
        abort_reason.replace('\n', "\n   ")
    );
    println!(
        "   still serving: {}\n",
        load.stats
            .last_version
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    );

    step(5, "kill -9 an instance and watch it replaced");
    let victim = controller.status().await.roles[0].generations[0].instances[0].clone();
    let killing = Instant::now();
    controller.kill_instance(&victim.name)?;
    println!("   killed {} (pid {})", victim.name, victim.pid);
    let replacement = wait_for_replacement(&controller, &victim.name).await?;
    let replaced_ms = killing.elapsed().as_millis();
    println!("   replaced by {replacement}, healthy {replaced_ms} ms after the kill\n");

    step(
        6,
        "stop the load and shut down: drain, then stop every instance",
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = load.stop().await;
    controller.shutdown().await;
    let summary = Summary {
        sent: stats.sent.load(Ordering::Relaxed),
        failed: stats.failed.load(Ordering::Relaxed),
        versions: stats
            .versions()
            .iter()
            .map(|(v, n)| format!("{v}: {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        stale_after_switch,
        first,
        upgrade,
        abort_ms,
        abort_reason,
        replaced_ms,
        failures: stats.failures.lock().map(|f| f.clone()).unwrap_or_default(),
    };
    print_summary(&summary);
    Ok(if summary.failed == 0 && summary.stale_after_switch == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn step(n: u32, text: &str) {
    println!("{n}. {text}");
}

/// Deploys `web`, printing progress lines indented under the current step.
async fn deploy(controller: &Controller) -> anyhow::Result<DeployReport> {
    let (progress, mut lines) = Progress::channel();
    let printer = tokio::spawn(async move {
        let started = Instant::now();
        while let Some(line) = lines.recv().await {
            println!("   [{:>5.1}s] {line}", started.elapsed().as_secs_f64());
        }
    });
    let result = controller
        .deploy("web", DeployOptions::default(), &progress)
        .await;
    drop(progress);
    let _ = printer.await;
    let report = result?;
    println!("   {}", crate::commands::summary(&report));
    Ok(report)
}

async fn wait_for_replacement(controller: &Controller, victim: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let status = controller.status().await;
        let live = &status.roles[0].generations[0];
        let healthy: Vec<_> = live
            .instances
            .iter()
            .filter(|i| i.status == "healthy")
            .collect();
        if healthy.len() == 3 && live.instances.iter().all(|i| i.name != victim) {
            let newest = live
                .instances
                .iter()
                .min_by_key(|i| i.uptime_ms)
                .map(|i| i.name.clone())
                .unwrap_or_default();
            return Ok(newest);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{victim} was not replaced within 30 s")
}

fn print_summary(s: &Summary) {
    let row = |label: &str, value: String| println!("  {label:<34} {value}");
    println!("summary");
    row("requests sent", s.sent.to_string());
    row("requests failed", s.failed.to_string());
    row("responses by version", s.versions.clone());
    row(
        "v1 responses after the v2 switch",
        s.stale_after_switch.to_string(),
    );
    row(
        "first deploy (v1, 3 instances)",
        format!(
            "{:.2} s (boot to healthy {} ms)",
            s.first.total_ms as f64 / 1000.0,
            s.first.boot_to_healthy_ms
        ),
    );
    row(
        "v2 verified before the deploy",
        s.upgrade.verified.map_or("not verified".into(), |v| {
            format!(
                "{} goss checks passed on a throwaway instance ({} ms)",
                v.checks, v.ms
            )
        }),
    );
    row(
        "blue-green deploy v1 -> v2",
        format!(
            "{:.2} s: bake {} ms, boot to healthy {} ms, drain {} ms, stop {} ms",
            s.upgrade.total_ms as f64 / 1000.0,
            s.upgrade.bake_ms,
            s.upgrade.boot_to_healthy_ms,
            s.upgrade.drain_ms,
            s.upgrade.stop_ms
        ),
    );
    row(
        "switch time",
        format!(
            "{} µs ({} -> {})",
            s.upgrade.switch_us,
            short_digest(s.upgrade.previous_image.as_deref().unwrap_or("")),
            short_digest(&s.upgrade.image)
        ),
    );
    row(
        "first request on v2 after the switch",
        s.upgrade
            .first_request_after_switch_us
            .map_or("-".into(), |us| format!("{us} µs")),
    );
    row(
        "broken v3 deploy",
        format!(
            "aborted after {:.2} s, v2 kept serving",
            s.abort_ms as f64 / 1000.0
        ),
    );
    row(
        "abort reason",
        s.abort_reason
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
    );
    row(
        "kill -9 to healthy replacement",
        format!("{} ms", s.replaced_ms),
    );
    for failure in &s.failures {
        row("failure", failure.clone());
    }
    println!(
        "\n{}",
        if s.failed == 0 {
            "0 failed requests: every deploy, abort and crash was invisible to clients."
        } else {
            "SOME REQUESTS FAILED"
        }
    );
}

fn find_app(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()
            .context("cannot locate the phoenix executable")?
            .with_file_name("hello"),
    };
    if !path.is_file() {
        bail!(
            "cannot find the hello example app at {}: build it with `cargo build --release --workspace`, or pass --app PATH",
            path.display()
        );
    }
    Ok(path.canonicalize()?)
}

/// The demo's fleet file (and its check file): the hello app at `version`, optionally failing
/// its health check.
fn write_fleet(path: &Path, app: &Path, version: &str, fail_health: bool) -> anyhow::Result<()> {
    let quote = |path: &Path| {
        path.display()
            .to_string()
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
    };
    let context = quote(app.parent().unwrap_or(Path::new("/")));
    let app = quote(Path::new(app.file_name().unwrap_or_default()));
    let fail = if fail_health {
        ", FAIL_HEALTH = \"1\""
    } else {
        ""
    };
    let text = format!(
        r#"[image.hello]
from = "scratch"
context = "{context}"
copy = [{{ src = "{app}", dst = "/bin/hello", libraries = true }}]
env = {{ VERSION = "{version}"{fail} }}
entrypoint = ["/bin/hello"]
checks = "checks.yaml"

[role.web]
image = "hello"
instances = 3
listen = "127.0.0.1:0"
stop_timeout = "3s"

[role.web.health]
path = "/healthz"
interval = "200ms"
timeout = "1s"
healthy_threshold = 2
unhealthy_threshold = 2

[role.web.deploy]
strategy = "blue-green"
healthy_timeout = "5s"
drain = "10s"
"#
    );
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    let checks = path.with_file_name("checks.yaml");
    std::fs::write(&checks, HELLO_CHECKS)
        .with_context(|| format!("cannot write {}", checks.display()))
}

/// The example's check file: every image the demo deploys is verified with it first.
const HELLO_CHECKS: &str = include_str!("../../../examples/hello/checks.yaml");

/// Removes the demo directory; unpacked image roots are read-only, so restore write access first.
fn remove_dir(dir: &Path) {
    let _ = std::process::Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(dir)
        .status();
    let _ = std::fs::remove_dir_all(dir);
}
