//! `phoenix proxy`: the role proxy on its own, in front of a fixed list of backends.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use phoenix_proxy::{Backend, ProxyConfig, RoleProxy};
use tokio::net::TcpListener;

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    #[command(flatten)]
    pub log: crate::LogArgs,
    /// Where to listen.
    #[arg(long)]
    pub listen: SocketAddr,
    /// A backend address (repeat for more); requests go round-robin.
    #[arg(long = "backend", required = true)]
    pub backends: Vec<SocketAddr>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let proxy = RoleProxy::new("proxy", ProxyConfig::default());
    let backends = args
        .backends
        .iter()
        .enumerate()
        .map(|(i, addr)| Backend::new(format!("backend-{}", i + 1), *addr))
        .collect();
    proxy.set_backends(backends);
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    println!(
        "phoenix proxy: http://{} -> {} backends",
        listener.local_addr()?,
        args.backends.len()
    );
    let (stop, stopped) = tokio::sync::watch::channel(phoenix_proxy::Stop::Serve);
    let serving = tokio::spawn(phoenix_proxy::serve(
        listener,
        proxy,
        stopped,
        Duration::from_secs(10),
        Vec::new(),
    ));
    tokio::signal::ctrl_c().await?;
    stop.send_replace(phoenix_proxy::Stop::Drain);
    let _ = serving.await;
    Ok(ExitCode::SUCCESS)
}
