//! `phoenix up`: controller, agent and proxy in one foreground process.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use phoenix_fleet::{Controller, Options};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::client::API_ADDR_FILE;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The fleet file.
    #[arg(short = 'f', long = "file", default_value = "phoenix.toml")]
    pub file: PathBuf,
    /// Where the API listens: loopback unless --token is given. Port 0 picks a free port;
    /// clients find it in STATE/api.addr.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub api_listen: SocketAddr,
    /// Require this bearer token on every API request.
    #[arg(long, env = "PHOENIX_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Seed for generated instance names (for reproducible runs).
    #[arg(long, hide = true)]
    pub seed: Option<u64>,
}

pub async fn run(state: &Path, args: UpArgs) -> anyhow::Result<ExitCode> {
    phoenix_api::check_listen(args.api_listen, args.token.as_deref())?;
    std::fs::create_dir_all(state)
        .with_context(|| format!("cannot create state directory {}", state.display()))?;
    let _lock = lock_state(state)?;
    let mut options = Options::new(state.to_path_buf(), args.file.clone());
    options.seed = args.seed;
    options.bake = bake_options()?;
    let controller = Controller::open(options).await?;
    let rpc = crate::agent_cmd::serve(&controller.agent(), controller.agent_settings()).await?;
    let listener = TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("cannot listen on {} for the API", args.api_listen))?;
    let api_addr = listener.local_addr()?;
    write_api_addr(state, api_addr)?;
    let (api_stop, api_stopped) = tokio::sync::watch::channel(false);
    let api = tokio::spawn(phoenix_api::serve(
        listener,
        controller.clone(),
        args.token.clone(),
        api_stopped,
    ));
    println!(
        "phoenix up: fleet {}, state {}, API http://{api_addr}",
        args.file.display(),
        state.display()
    );
    println!(
        "gossip: node {}, gossip {}, RPC {rpc}",
        controller.agent().name(),
        controller.agent().local_addr()
    );
    for warning in controller.warnings() {
        eprintln!("warning: {warning}");
    }
    if let Some((bridge, subnet, gateway)) = controller.bridge() {
        println!("network: bridge {bridge}, subnet {subnet}, proxies also on {gateway}");
    }
    let placements = controller.placements();
    for (role, addr) in controller.listen_addrs() {
        let (driver, network) = placements
            .iter()
            .find(|(name, _, _)| *name == role)
            .map(|(_, driver, bridged)| (*driver, if *bridged { "bridge" } else { "host network" }))
            .unwrap_or(("?", "?"));
        println!("role {role}: proxy on http://{addr} ({driver} driver, {network})");
    }
    let converging = {
        let controller = controller.clone();
        tokio::spawn(async move {
            for (role, error) in controller.converge().await {
                eprintln!("role {role} is not serving: {error}");
            }
            for role in controller.status().roles {
                if let Some(generation) = role.live_generation {
                    let healthy = role
                        .generations
                        .first()
                        .map(|g| g.instances.iter().filter(|i| i.status == "healthy").count())
                        .unwrap_or(0);
                    println!(
                        "role {}: generation {generation} live, {healthy}/{} instances healthy",
                        role.name, role.desired_instances
                    );
                }
            }
        })
    };
    wait_for_stop_signal().await?;
    println!("phoenix up: stopping: draining requests, then stopping instances");
    converging.abort();
    controller.shutdown().await;
    api_stop.send_replace(true);
    let _ = api.await;
    let _ = std::fs::remove_file(state.join(API_ADDR_FILE));
    println!("phoenix up: stopped");
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}

/// `SOURCE_DATE_EPOCH` (reproducible-builds.org) sets the time recorded in images.
pub fn bake_options() -> anyhow::Result<phoenix_image::BakeOptions> {
    let mtime = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(value) => value
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={value:?} is not a number of seconds"))?,
        Err(_) => 0,
    };
    Ok(phoenix_image::BakeOptions { mtime })
}

/// Holds an exclusive lock on the state directory for as long as the file stays open.
fn lock_state(state: &Path) -> anyhow::Result<std::fs::File> {
    let path = state.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    // SAFETY: flock on a file descriptor we own.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !locked {
        bail!(
            "another `phoenix up` is running with state directory {} (it holds {})",
            state.display(),
            path.display()
        );
    }
    Ok(file)
}

fn write_api_addr(state: &Path, addr: SocketAddr) -> anyhow::Result<()> {
    let tmp = state.join(format!("{API_ADDR_FILE}.tmp"));
    std::fs::write(&tmp, format!("{addr}\n"))?;
    std::fs::rename(&tmp, state.join(API_ADDR_FILE))?;
    Ok(())
}
