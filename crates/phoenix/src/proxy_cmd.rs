//! `phoenix proxy`: the role proxy on its own, in front of a fixed list of backends.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use phoenix_proxy::certs::{CertPair, CertStore};
use phoenix_proxy::edge::{Edge, HostMatch, Route, Router, serve_edge};
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
    /// Terminate TLS with this certificate chain (PEM), as a `[listener.NAME]` does.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
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
    let scheme = if args.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    println!(
        "phoenix proxy: {scheme}://{} -> {} backends",
        listener.local_addr()?,
        args.backends.len()
    );
    let (stop, stopped) = tokio::sync::watch::channel(phoenix_proxy::Stop::Serve);
    let grace = Duration::from_secs(10);
    let serving = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => {
            // The edge listener's path: TLS, then one route to every backend.
            let certs = CertStore::load(vec![CertPair { cert, key }])?;
            let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config());
            let route = Route {
                host: HostMatch::Any,
                path_prefix: "/".into(),
                role: "proxy".into(),
                target: proxy,
            };
            let edge = Edge::new("proxy", Router::new(vec![route]), true, None);
            tokio::spawn(serve_edge(listener, edge, Some(acceptor), stopped, grace))
        }
        _ => tokio::spawn(async move {
            phoenix_proxy::serve(listener, proxy, stopped, grace, Vec::new()).await;
        }),
    };
    tokio::signal::ctrl_c().await?;
    stop.send_replace(phoenix_proxy::Stop::Drain);
    let _ = serving.await;
    Ok(ExitCode::SUCCESS)
}
