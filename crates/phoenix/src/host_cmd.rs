//! `phoenix host ls | drain HOST | undrain HOST`: the hosts of a `[cluster]` fleet.

use std::path::Path;
use std::process::ExitCode;

use phoenix_fleet::FleetStatus;
use phoenix_fleet::cluster::ClusterStatus;
use serde_json::json;

use crate::client::{ApiArgs, Client};

#[derive(Debug, clap::Args)]
pub struct HostArgs {
    #[command(subcommand)]
    pub command: HostCommand,
    /// `ls`: the cluster as `phoenix status --json` has it; drain/undrain: `{"host", "draining"}`.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum HostCommand {
    /// Every host: address, capacity, instances, gossip state, and which one leads.
    Ls,
    /// Take a host out of placement; the controller moves its instances to other hosts.
    Drain { host: String },
    /// Put a drained host back into placement (it gets work on the next scale or deploy).
    Undrain { host: String },
}

pub async fn run(state: &Path, args: HostArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(state, &args.api)?;
    let (host, on) = match args.command {
        HostCommand::Ls => {
            let status: FleetStatus = client.get_json("/v1/status").await?;
            let Some(cluster) = status.cluster else {
                anyhow::bail!(
                    "this fleet runs on one machine: add a [cluster] table to the fleet file to run it on several (see the README, \"Running on several machines\")"
                );
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&cluster)?);
            } else if let Some(error) = cluster.error {
                anyhow::bail!("cannot read the cluster's hosts: {error}");
            } else if let Some(status) = &cluster.status {
                print!("{}", hosts_table(status));
            }
            for (role, how) in &cluster.divergent {
                println!(
                    "warning: role {role} in this host's fleet file differs from the controller's: {how}"
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        HostCommand::Drain { host } => (host, true),
        HostCommand::Undrain { host } => (host, false),
    };
    let path = format!("/v1/hosts/{host}/drain");
    let _: serde_json::Value = client.post_json(&path, json!({ "on": on })).await?;
    if args.json {
        println!("{}", json!({"host": host, "draining": on}));
    } else if on {
        println!("{host}: draining (out of placement)");
    } else {
        println!("{host}: back in placement");
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per host, the leader marked; what `phoenix status` and `phoenix host ls` print.
pub fn hosts_table(cluster: &ClusterStatus) -> String {
    let mut out = String::new();
    for host in &cluster.hosts {
        let r = &host.record;
        let tags: Vec<String> = r.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut marks = Vec::new();
        if cluster.leader.as_deref() == Some(r.name.as_str()) {
            marks.push("leader");
        }
        if r.name == cluster.host {
            marks.push("this host");
        }
        if host.draining {
            marks.push("draining");
        }
        out.push_str(&format!(
            "host {:<12} {:<15} cpus {:<5} memory {:>6} MiB  instances {:<3} gossip {:<8}{}{}\n",
            r.name,
            r.address,
            format!("{:.1}", r.cpu_millis as f64 / 1000.0),
            r.memory >> 20,
            host.instances,
            host.gossip.as_deref().unwrap_or("-"),
            if tags.is_empty() {
                String::new()
            } else {
                format!(" tags {}", tags.join(","))
            },
            if marks.is_empty() {
                String::new()
            } else {
                format!("  [{}]", marks.join(", "))
            },
        ));
    }
    if cluster.leader.is_none() {
        out.push_str("no host leads now (an election is under way, or etcd has no quorum)\n");
    }
    out
}
