//! `phoenix metrics` (a role's series) and `phoenix top` (every instance now), read from
//! `STATE/metrics.db`: they work while `phoenix up` runs and after it stopped.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use phoenix_fleet::{Clock, SystemClock};
use phoenix_observe::{MetricsDb, Point, Resolution, Sample};

use crate::commands::human_size;

#[derive(Debug, clap::Args)]
pub struct MetricsArgs {
    pub role: String,
    /// cpu (cores), memory (bytes), rps, errors (5xx/s), in_flight, p50_ms or p99_ms.
    #[arg(long)]
    pub metric: String,
    /// How far back, e.g. `5m`, `2h`, `7d`.
    #[arg(long, default_value = "5m", value_parser = parse_age)]
    pub since: Duration,
    /// `1s`, `10s` or `1m`; by default the finest still kept for `--since`.
    #[arg(long)]
    pub resolution: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Only this role.
    pub role: Option<String>,
    /// Print once instead of refreshing every second.
    #[arg(long)]
    pub once: bool,
    /// Once, as `{"at", "roles": {ROLE: {"role": {METRIC: V}, "instances": {NAME: {..}}}}}`.
    #[arg(long)]
    pub json: bool,
}

/// A duration that also takes days (`7d`).
pub fn parse_age(text: &str) -> Result<Duration, String> {
    match text.strip_suffix('d') {
        Some(days) => days
            .parse::<u64>()
            .map(|d| Duration::from_secs(d * 86_400))
            .map_err(|_| format!("{text:?}: a whole number of days, e.g. 7d")),
        None => phoenix_fleet::parse_duration(text),
    }
}

fn open(state: &Path) -> anyhow::Result<MetricsDb> {
    let path = state.join("metrics.db");
    if !path.exists() {
        bail!(
            "no metrics in {}: `phoenix up` records them while it runs",
            state.display()
        );
    }
    Ok(MetricsDb::open(&path)?)
}

pub async fn metrics(state: &Path, args: MetricsArgs) -> anyhow::Result<ExitCode> {
    let db = open(state)?;
    let now = SystemClock.now_ms();
    let since = now - args.since.as_millis() as i64;
    let resolution = match args.resolution.as_deref() {
        None => Resolution::for_window(now, since),
        Some("1s") => Resolution::Raw,
        Some("10s") => Resolution::TenSeconds,
        Some("1m") => Resolution::Minute,
        Some(other) => bail!("--resolution {other:?}: one of 1s, 10s, 1m"),
    };
    known_role(&db, &args.role)?;
    let points = db
        .query(&args.role, &args.metric, since, resolution)
        .with_context(|| format!("role {}", args.role))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&points)?);
        return Ok(ExitCode::SUCCESS);
    }
    // ROLE: the proxy's view of the whole role; the others: across its instances.
    println!(
        "{:<19}  {:>12}  {:>12}  {:>12}  {:>12}  {:>5}",
        "TIME (UTC)", "ROLE", "INSTANCES SUM", "AVG", "P95", "N"
    );
    for Point {
        t,
        role,
        sum,
        avg,
        p95,
        n,
    } in points
    {
        let show = |v: Option<f64>| v.map_or("-".to_string(), |v| value(&args.metric, v));
        let stamp = phoenix_image::rfc3339((t / 1000).max(0) as u64);
        println!(
            "{}  {:>12}  {:>12}  {:>12}  {:>12}  {n:>5}",
            &stamp[..19].replace('T', " "),
            show(role),
            show(sum),
            show((n > 0).then_some(avg)),
            show((n > 0).then_some(p95))
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A role metrics.db has never heard of is an error naming the ones it has.
fn known_role(db: &MetricsDb, role: &str) -> anyhow::Result<()> {
    let roles = db.roles()?;
    if roles.iter().any(|r| r == role) {
        return Ok(());
    }
    bail!(
        "no role {role:?} in the metrics (roles: {})",
        if roles.is_empty() {
            "none yet".to_string()
        } else {
            roles.join(", ")
        }
    )
}

/// A metric's value with its unit.
fn value(metric: &str, v: f64) -> String {
    match metric {
        "memory" => human_size(v as u64),
        "cpu" => format!("{v:.3}"),
        "p50_ms" | "p99_ms" => format!("{v:.2} ms"),
        _ => format!("{v:.1}"),
    }
}

pub async fn top(state: &Path, args: TopArgs) -> anyhow::Result<ExitCode> {
    let db = open(state)?;
    if let Some(role) = &args.role {
        known_role(&db, role)?;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&top_json(&db.latest()?, args.role.as_deref()))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let refresh = !args.once && std::io::stdout().is_terminal();
    loop {
        let latest = db.latest()?;
        let screen = render(&latest, args.role.as_deref());
        if refresh {
            // Clear the screen and go home, as top does.
            print!("\x1b[2J\x1b[H{screen}");
        } else {
            print!("{screen}");
            return Ok(ExitCode::SUCCESS);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// One screen: per role its proxy's view, then one line per instance.
/// The newest second of samples as JSON: the role's own values apart from each instance's.
fn top_json(latest: &[(i64, Sample)], only: Option<&str>) -> serde_json::Value {
    let mut roles = serde_json::Map::new();
    for (_, sample) in latest
        .iter()
        .filter(|(_, s)| only.is_none_or(|r| r == s.role))
    {
        let role = roles
            .entry(sample.role.clone())
            .or_insert_with(|| serde_json::json!({"role": {}, "instances": {}}));
        let slot = if sample.instance.is_empty() {
            &mut role["role"]
        } else {
            role["instances"]
                .as_object_mut()
                .expect("made above")
                .entry(sample.instance.clone())
                .or_insert_with(|| serde_json::json!({}))
        };
        slot[sample.metric.as_str()] = serde_json::json!(sample.value);
    }
    let at = latest
        .first()
        .map(|(t, _)| phoenix_image::rfc3339((*t / 1000).max(0) as u64));
    serde_json::json!({"at": at, "roles": roles})
}

fn render(latest: &[(i64, Sample)], only: Option<&str>) -> String {
    let mut roles: BTreeMap<&str, BTreeMap<&str, BTreeMap<&str, f64>>> = BTreeMap::new();
    for (_, sample) in latest {
        if only.is_some_and(|r| r != sample.role) {
            continue;
        }
        roles
            .entry(&sample.role)
            .or_default()
            .entry(&sample.instance)
            .or_default()
            .insert(&sample.metric, sample.value);
    }
    let at = latest
        .first()
        .map(|(t, _)| phoenix_image::rfc3339((*t / 1000).max(0) as u64))
        .unwrap_or_else(|| "no samples yet".into());
    let mut out = format!("phoenix top — {at}\n");
    let get = |m: &BTreeMap<&str, f64>, k: &str| m.get(k).copied();
    let show = |v: Option<f64>, metric: &str| v.map(|v| value(metric, v)).unwrap_or("-".into());
    for (role, instances) in roles {
        let whole = instances.get("").cloned().unwrap_or_default();
        out.push_str(&format!(
            "\nrole {role}: {} rps, p50 {}, p99 {}, {} errors/s, {} in flight\n",
            show(get(&whole, "rps"), "rps"),
            show(get(&whole, "p50_ms"), "p50_ms"),
            show(get(&whole, "p99_ms"), "p99_ms"),
            show(get(&whole, "errors"), "errors"),
            show(get(&whole, "in_flight"), "in_flight"),
        ));
        out.push_str(&format!(
            "  {:<14} {:>8} {:>10} {:>8} {:>9}\n",
            "INSTANCE", "CPU", "MEMORY", "RPS", "IN-FLIGHT"
        ));
        for (name, metrics) in instances.iter().filter(|(name, _)| !name.is_empty()) {
            out.push_str(&format!(
                "  {:<14} {:>8} {:>10} {:>8} {:>9}\n",
                name,
                show(get(metrics, "cpu"), "cpu"),
                show(get(metrics, "memory"), "memory"),
                show(get(metrics, "rps"), "rps"),
                show(get(metrics, "in_flight"), "in_flight"),
            ));
        }
    }
    out
}
