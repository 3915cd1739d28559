//! `phoenix load`: open-loop HTTP load at a fixed rate, or from a scenario file (weighted
//! requests, ramp stages, thresholds); the generator is `phoenix_load`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use phoenix_load::{Report, Scenario, Target};

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// `http://HOST:PORT/PATH` (plain HTTP/1.1); with `--scenario`, `http://HOST:PORT` (the
    /// file's `url` otherwise).
    pub url: Option<String>,
    /// Requests per second, sent on schedule whatever the answers.
    #[arg(long, conflicts_with = "scenario")]
    pub rps: Option<u32>,
    /// How long to send, e.g. `30s`.
    #[arg(long, value_parser = parse_duration, conflicts_with = "scenario")]
    pub duration: Option<Duration>,
    /// A scenario file: weighted requests, ramp stages and thresholds (see the README).
    #[arg(long, value_name = "FILE")]
    pub scenario: Option<PathBuf>,
    /// Keep-alive connections (the most requests in flight at once) [default: 64].
    #[arg(long)]
    pub connections: Option<usize>,
    /// A request without a complete answer by then is an error [default: 10s].
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    #[arg(long)]
    pub json: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    phoenix_fleet::parse_duration(text)
}

pub async fn run(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let (mut scenario, target) = scenario_and_target(&args)?;
    if let Some(connections) = args.connections {
        if connections == 0 {
            bail!("--connections must be at least 1");
        }
        scenario.connections = connections;
    }
    if let Some(timeout) = args.timeout {
        scenario.timeout = timeout;
    }
    let report = phoenix_load::run(&scenario, &target).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&scenario, &report);
    }
    // Thresholds decide when there are some (as k6's); otherwise any error fails the run.
    let passed = report.failures().is_empty();
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn scenario_and_target(args: &LoadArgs) -> anyhow::Result<(Scenario, Target)> {
    if let Some(file) = &args.scenario {
        let scenario = Scenario::load(file)?;
        let url = args
            .url
            .clone()
            .or_else(|| scenario.url.clone())
            .with_context(|| {
                format!(
                    "{}: give the URL to load, on the command line or as `url` in the file",
                    file.display()
                )
            })?;
        let (target, path) = Target::parse(&url).map_err(anyhow::Error::msg)?;
        if path != "/" {
            bail!(
                "{url:?}: with --scenario, give http://HOST:PORT only; each [[request]] has its own `path`"
            );
        }
        return Ok((scenario, target));
    }
    let Some(url) = &args.url else {
        bail!("give a URL and --rps N, or --scenario FILE");
    };
    let rps = match args.rps {
        Some(0) | None => bail!("--rps must be at least 1 (or give --scenario FILE)"),
        Some(rps) => rps,
    };
    let (target, path) = Target::parse(url).map_err(anyhow::Error::msg)?;
    let duration = args.duration.unwrap_or(Duration::from_secs(10));
    Ok((Scenario::constant(f64::from(rps), duration, &path), target))
}

fn print_report(scenario: &Scenario, report: &Report) {
    let l = &report.latency_ms;
    println!(
        "{} requests scheduled over {:?}: {} ok, {} errors, {:.1} rps achieved",
        report.scheduled,
        scenario.duration(),
        report.ok,
        report.errors,
        report.achieved_rps
    );
    println!(
        "latency from schedule: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        l.p50, l.p90, l.p99, l.p999, l.max
    );
    for (kind, count) in &report.error_kinds {
        println!("  {count:>8}  {kind}");
    }
    if report.requests.len() > 1 {
        println!("by request:");
        for (name, r) in &report.requests {
            let p = &r.latency_ms;
            println!(
                "  {name}: {} sent, {} errors, p50 {:.2} ms, p99 {:.2} ms",
                r.count, r.errors, p.p50, p.p99
            );
        }
    }
    if !report.thresholds.is_empty() {
        println!("thresholds:");
        for t in &report.thresholds {
            let mark = if t.passed { "ok  " } else { "FAIL" };
            println!("  {mark} {} (was {:.4})", t.threshold, t.actual);
        }
    }
}
