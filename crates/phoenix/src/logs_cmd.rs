//! `phoenix logs ROLE|INSTANCE`: what instances wrote, from the log store in the state
//! directory (so it works without `phoenix up`), merged in time order across a role's
//! instances; `-f` follows across deploys (like `kamal app logs -f`, `nomad alloc logs -f`).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use phoenix_observe::logs::{self, LogLine, Query, Stream};

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// A role, or one instance (`web-3f9a1c`).
    pub target: String,
    /// Keep printing lines as they are written (new instances appear, old ones end).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// From this long ago (`10m`, `2h`, `7d`) or this time (RFC 3339) on.
    #[arg(long, value_name = "AGE|TIME")]
    pub since: Option<String>,
    /// Up to this long ago or this time.
    #[arg(long, value_name = "AGE|TIME")]
    pub until: Option<String>,
    /// Only the instances of this generation.
    #[arg(long)]
    pub generation: Option<i64>,
    /// Only lines matching this regular expression.
    #[arg(long, value_name = "RE")]
    pub grep: Option<String>,
    /// Only the last N lines (before following).
    #[arg(short = 'n', long, value_name = "N")]
    pub lines: Option<usize>,
    /// One JSON object a line: `{"at", "stream", "instance", "generation", "image", "text"}`.
    #[arg(long)]
    pub json: bool,
}

pub async fn logs(state: &Path, args: LogsArgs) -> anyhow::Result<ExitCode> {
    let dir = phoenix_fleet::log_store_dir(state);
    let query = query(&dir, &args)?;
    let (mut lines, mut position) = tokio::task::spawn_blocking({
        let (dir, query) = (dir.clone(), query.clone());
        move || logs::read(&dir, &query)
    })
    .await?
    .with_context(|| format!("read the log store {}", dir.display()))?;
    if let Some(n) = args.lines {
        lines = lines.split_off(lines.len().saturating_sub(n));
    }
    let mut printer = Printer::new(args.json);
    printer.print(&lines)?;
    if !args.follow {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let (dir, query) = (dir.clone(), query.clone());
        let (new, next) =
            tokio::task::spawn_blocking(move || logs::read_after(&dir, &query, position)).await??;
        position = next;
        printer.print(&new)?;
    }
}

/// What `args` asks for: a role's lines, or one instance's.
fn query(dir: &Path, args: &LogsArgs) -> anyhow::Result<Query> {
    let now = now_ms();
    let time = |text: &Option<String>, what: &str| -> anyhow::Result<Option<i64>> {
        let Some(text) = text else { return Ok(None) };
        if let Some(at) = phoenix_image::parse_rfc3339_ms(text) {
            return Ok(Some(at));
        }
        let age = crate::metrics_cmd::parse_age(text).map_err(|why| {
            anyhow::anyhow!(
                "--{what} {text:?}: an age like 10m or a time like 2026-12-02T10:00:00Z ({why})"
            )
        })?;
        Ok(Some(now - age.as_millis() as i64))
    };
    let grep = match &args.grep {
        Some(pattern) => Some(
            regex::Regex::new(pattern).map_err(|e| anyhow::anyhow!("--grep {pattern:?}: {e}"))?,
        ),
        None => None,
    };
    let (role, instance) = target(dir, &args.target)?;
    Ok(Query {
        role,
        instance,
        since: time(&args.since, "since")?,
        until: time(&args.until, "until")?,
        generation: args.generation,
        grep,
    })
}

/// The role (and instance) `target` names: a role with logs, or an instance of one.
fn target(dir: &Path, target: &str) -> anyhow::Result<(String, Option<String>)> {
    let plain = |name: &str| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if plain(target) && dir.join(target).is_dir() {
        return Ok((target.to_string(), None));
    }
    if let Some((role, _)) = target.rsplit_once('-')
        && plain(target)
        && dir.join(role).is_dir()
    {
        return Ok((role.to_string(), Some(target.to_string())));
    }
    // Verification instances and bakes are kept apart from roles, in `_verify` and `_bake`.
    for (name, kept) in [
        ("verify", phoenix_fleet::VERIFY_LOGS),
        ("bake", phoenix_fleet::BAKE_LOGS),
    ] {
        if target == name && dir.join(kept).is_dir() {
            return Ok((kept.to_string(), None));
        }
        if target.starts_with(&format!("{name}-")) && plain(target) && dir.join(kept).is_dir() {
            return Ok((kept.to_string(), Some(target.to_string())));
        }
    }
    let roles = roles_with_logs(dir);
    let known = if roles.is_empty() {
        "none yet".to_string()
    } else {
        roles.join(", ")
    };
    Err(crate::failure::Failure::new(
        "not_found",
        format!("no logs of a role or instance {target:?} (roles with logs: {known})"),
    )
    .into())
}

fn roles_with_logs(dir: &Path) -> Vec<String> {
    let mut roles: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    roles.sort();
    roles
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Prints lines as text (instance names coloured on a terminal) or JSON lines.
struct Printer {
    json: bool,
    colour: bool,
    colours: Vec<String>,
}

impl Printer {
    fn new(json: bool) -> Printer {
        Printer {
            json,
            colour: !json && std::io::stdout().is_terminal(),
            colours: Vec::new(),
        }
    }

    fn print(&mut self, lines: &[LogLine]) -> anyhow::Result<()> {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        for line in lines {
            if self.json {
                serde_json::to_writer(&mut out, line)?;
                writeln!(out)?;
                continue;
            }
            let name = self.name(&line.instance);
            let stream = match line.stream {
                Stream::Stdout => "",
                Stream::Stderr => " err",
            };
            let more = if line.split { " ↩" } else { "" };
            writeln!(
                out,
                "{} {name} [{}]{stream} | {}{more}",
                phoenix_image::rfc3339_ms(line.at),
                line.generation,
                line.text
            )?;
        }
        out.flush()?;
        Ok(())
    }

    /// The instance's name, in its own colour on a terminal.
    fn name(&mut self, instance: &str) -> String {
        if !self.colour {
            return instance.to_string();
        }
        let index = match self.colours.iter().position(|n| n == instance) {
            Some(index) => index,
            None => {
                self.colours.push(instance.to_string());
                self.colours.len() - 1
            }
        };
        const COLOURS: [u8; 6] = [36, 33, 35, 32, 34, 31];
        format!("\x1b[{}m{instance}\x1b[0m", COLOURS[index % COLOURS.len()])
    }
}
