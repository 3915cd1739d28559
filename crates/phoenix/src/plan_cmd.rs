//! `phoenix plan` and `phoenix apply`: the fleet file against the running `phoenix up`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use phoenix_fleet::{ApplyReport, Plan};

use crate::client::{ApiArgs, Client};
use crate::failure::Failure;

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// The fleet file [default: the nearest phoenix.toml, up from here].
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Save the plan here, for `phoenix apply --plan FILE`.
    #[arg(short = 'o', long = "out", value_name = "FILE")]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// The fleet file [default: the nearest phoenix.toml, up from here].
    #[arg(short = 'f', long = "file", conflicts_with = "plan")]
    pub file: Option<PathBuf>,
    /// Apply this saved plan exactly (refused if the fleet moved since), without asking.
    #[arg(long, value_name = "FILE")]
    pub plan: Option<PathBuf>,
    /// Do not ask (needed when not on a terminal).
    #[arg(long)]
    pub auto_approve: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

fn read_fleet(file: Option<&Path>) -> anyhow::Result<String> {
    let path = crate::locate::fleet_file(file);
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

async fn make_plan(client: &Client, text: &str) -> anyhow::Result<Plan> {
    client
        .post_json("/v1/plan", serde_json::json!({ "fleet": text }))
        .await
}

/// Exit 0: no changes; 2: changes (as `terraform plan -detailed-exitcode`); 1: an error.
pub async fn plan(state: &Path, args: PlanArgs) -> anyhow::Result<ExitCode> {
    let text = read_fleet(args.file.as_deref())?;
    let client = Client::new(state, &args.api)?;
    let plan = make_plan(&client, &text).await?;
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&plan)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    if args.json {
        let mut shown = serde_json::to_value(&plan)?;
        shown.as_object_mut().map(|o| o.remove("fleet_text"));
        println!("{}", serde_json::to_string_pretty(&shown)?);
    } else {
        print!("{}", plan.render());
        if let Some(out) = &args.out {
            println!(
                "Saved to {}: `phoenix apply --plan {}`.",
                out.display(),
                out.display()
            );
        }
    }
    Ok(if plan.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

pub async fn apply(state: &Path, args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(state, &args.api)?;
    let (text, base) = match &args.plan {
        Some(path) => {
            let saved: Plan = serde_json::from_slice(
                &std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
            )
            .with_context(|| format!("{} is not a saved plan", path.display()))?;
            (saved.fleet_text, Some(saved.base))
        }
        None => (read_fleet(args.file.as_deref())?, None),
    };
    if base.is_none() {
        let plan = make_plan(&client, &text).await?;
        if !args.json {
            print!("{}", plan.render());
        }
        if plan.is_empty() {
            if args.json {
                println!("{}", serde_json::json!({"changes": 0}));
            }
            return Ok(ExitCode::SUCCESS);
        }
        if !args.auto_approve && !confirmed()? {
            return Err(Failure::new("refused", "not applied").into());
        }
    }
    let body = serde_json::json!({ "fleet": text, "base": base });
    crate::commands::stream_work(
        &client,
        "/v1/apply",
        Some(body),
        args.json,
        "apply",
        |report| {
            let report: ApplyReport = serde_json::from_value(report)?;
            let mut line = format!(
                "applied {} change(s): {} role(s) in place, {} scaled, {} deployed",
                report.changes,
                report.in_place.len(),
                report.scaled.len(),
                report.deployed.len()
            );
            for role in &report.added {
                line.push_str(&format!("; role {role} added"));
            }
            for (role, addr) in &report.moved {
                line.push_str(&format!("; role {role} moved to {addr}"));
            }
            for role in &report.removed {
                line.push_str(&format!("; role {role} removed"));
            }
            Ok(line)
        },
    )
    .await
}

/// Asks on the terminal; off a terminal, `--auto-approve` is required.
fn confirmed() -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure::new(
            "refused",
            "not applied: stdin is not a terminal to ask on; review the plan and pass --auto-approve",
        )
        .into());
    }
    print!("Apply these changes? Only `yes` is accepted: ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}
