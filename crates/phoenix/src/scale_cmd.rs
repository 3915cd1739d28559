//! `phoenix scale`, `phoenix protect` and `phoenix standby`: sizing a role by hand, and keeping
//! instances out of scale-in or out of traffic for investigation.

use std::path::Path;
use std::process::ExitCode;

use phoenix_fleet::{Flags, ScaleReport};
use serde_json::json;

use crate::client::{ApiArgs, Client};

#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    pub role: String,
    /// The number of instances the live generation should run (kept for later deploys and
    /// restarts until the fleet file's `instances` changes).
    pub instances: u32,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, clap::Args)]
pub struct FlagArgs {
    pub instance: String,
    /// Clear the flag instead of setting it.
    #[arg(long)]
    pub off: bool,
    /// `{"instance", "protected", "standby"}`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

pub async fn scale(state: &Path, args: ScaleArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(state, &args.api)?;
    let report: ScaleReport = client
        .post_json(
            &format!("/v1/roles/{}/scale", args.role),
            json!({ "instances": args.instances }),
        )
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "scaled {} from {} to {} in {} ms{}{}",
        report.role,
        report.from,
        report.to,
        report.millis,
        list("started", &report.started),
        list("stopped after draining", &report.stopped)
    );
    Ok(ExitCode::SUCCESS)
}

fn list(what: &str, names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!("; {what} {}", names.join(", "))
    }
}

/// `phoenix protect` (`flag` = "protect") or `phoenix standby` (`flag` = "standby").
pub async fn flag(state: &Path, flag: &str, args: FlagArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(state, &args.api)?;
    let flags: Flags = client
        .post_json(
            &format!("/v1/instances/{}/{flag}", args.instance),
            json!({ "on": !args.off }),
        )
        .await?;
    if args.json {
        let answer = json!({"instance": args.instance, "protected": flags.protected, "standby": flags.standby});
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: protected {}, standby {}",
        args.instance, flags.protected, flags.standby
    );
    Ok(ExitCode::SUCCESS)
}
