//! `phoenix exec INSTANCE -- CMD...`: a command inside a running instance, as its user, with
//! its environment, limits and filters (like `kamal app exec` and `nomad alloc exec`). Runs
//! before the async runtime starts: entering a container needs a single-threaded process.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use phoenix_store::{InstanceStatus, Store};

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The instance (`phoenix status` lists them).
    pub instance: String,
    /// The command and its arguments, after `--`.
    #[arg(required = true, last = true)]
    pub command: Vec<String>,
}

pub fn run(state: &Path, args: ExecArgs) -> anyhow::Result<ExitCode> {
    let state = std::path::absolute(state).unwrap_or_else(|_| state.to_path_buf());
    let db = state.join("state.db");
    if !db.exists() {
        bail!(
            "no Phoenix state at {} (run `phoenix up` first, or pass --state)",
            state.display()
        );
    }
    let store = Store::open(&db)?;
    let row = store.instance(&args.instance)?.with_context(|| {
        format!(
            "no instance {:?}: `phoenix status` lists the running ones",
            args.instance
        )
    })?;
    let running = matches!(
        row.status,
        InstanceStatus::Starting | InstanceStatus::Healthy | InstanceStatus::Unhealthy
    );
    if !running {
        bail!("instance {} is {}: it no longer runs", row.name, row.status);
    }
    if row.driver == "process" {
        bail!(
            "instance {} runs with the process driver, without isolation: there is nothing to \
             enter; run the command on this host",
            row.name
        );
    }
    let target = phoenix_driver::ExecTarget::find(&state, &row.name)
        .with_context(|| format!("instance {} has no running container here", row.name))?;
    let code = target.run(&args.command)?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}
