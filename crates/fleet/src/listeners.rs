//! The edge listeners of `phoenix up` (`[listener.NAME]`): bound at start, each routing to
//! its roles' proxies; certificates read again when their files change; routes replaced by
//! `phoenix apply` without a restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use phoenix_proxy::Stop;
use phoenix_proxy::certs::{CertPair, CertStore};
use phoenix_proxy::edge::{Edge, HostMatch, Route, Router, serve_edge, serve_redirect};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::controller::Inner;
use crate::{FleetError, ListenerConfig};

/// How often certificate files are looked at.
const CERT_CHECK: Duration = Duration::from_secs(1);

/// The running listeners, by name.
#[derive(Default)]
pub(crate) struct Listeners {
    edges: std::sync::Mutex<BTreeMap<String, Arc<Edge>>>,
}

impl Listeners {
    /// Binds and serves every listener of the fleet file; an address in use or a certificate
    /// that cannot be read is an error naming the listener (nothing is left bound).
    pub(crate) async fn start(
        inner: &Arc<Inner>,
        listeners: &BTreeMap<String, ListenerConfig>,
    ) -> Result<(), FleetError> {
        let mut ready = Vec::new();
        for (name, config) in listeners {
            let router = router(inner, config)?;
            let certs = match config.tls.is_empty() {
                true => None,
                false => Some(load_certs(name, config)?),
            };
            let listener = bind(name, config.listen).await?;
            let redirect = match config.redirect_http {
                Some(addr) => Some(bind(name, addr).await?),
                None => None,
            };
            let edge = Edge::new(name, router, certs.is_some(), config.hsts);
            ready.push((edge, certs, listener, redirect));
        }
        for (edge, certs, listener, redirect) in ready {
            let stop = stop_on_shutdown(inner);
            let https_port = listener.local_addr().map(|a| a.port()).unwrap_or(443);
            let acceptor = certs
                .as_ref()
                .map(|c| tokio_rustls::TlsAcceptor::from(c.server_config()));
            if let Some(redirect) = redirect {
                inner.spawn(serve_redirect(redirect, https_port, stop.clone()));
            }
            if let Some(certs) = certs {
                inner.spawn(reload_certs(
                    Arc::downgrade(inner),
                    edge.name.clone(),
                    certs,
                ));
            }
            let grace = Duration::from_secs(10);
            inner.spawn(serve_edge(listener, edge.clone(), acceptor, stop, grace));
            inner.listeners.lock().insert(edge.name.clone(), edge);
        }
        Ok(())
    }

    /// Replaces each running listener's routes with the fleet file's (`phoenix apply`). A new
    /// listener, or one whose address or certificates changed, needs a restart.
    pub(crate) fn update_routes(
        inner: &Inner,
        listeners: &BTreeMap<String, ListenerConfig>,
    ) -> Result<Vec<String>, FleetError> {
        let edges = inner.listeners.lock().clone();
        let mut changed = Vec::new();
        for (name, config) in listeners {
            let Some(edge) = edges.get(name) else {
                continue;
            };
            edge.set_router(router(inner, config)?);
            changed.push(name.clone());
        }
        Ok(changed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Edge>>> {
        self.edges.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A listener's routes to its roles' proxies.
fn router(inner: &Inner, config: &ListenerConfig) -> Result<Router, FleetError> {
    let mut routes = Vec::new();
    for route in config.route_list() {
        let role = inner.role(&route.role)?;
        routes.push(Route {
            host: HostMatch::parse(route.host.as_deref()).map_err(FleetError::Apply)?,
            path_prefix: route.path_prefix.clone().unwrap_or_else(|| "/".into()),
            role: route.role.clone(),
            target: role.proxy.clone(),
        });
    }
    Ok(Router::new(routes))
}

fn load_certs(name: &str, config: &ListenerConfig) -> Result<Arc<CertStore>, FleetError> {
    let pairs = config
        .tls
        .iter()
        .map(|p| CertPair {
            cert: p.cert.clone(),
            key: p.key.clone(),
        })
        .collect();
    CertStore::load(pairs).map_err(|e| FleetError::Io {
        what: format!("listener {name}: TLS"),
        cause: std::io::Error::other(e.to_string()),
    })
}

async fn bind(name: &str, addr: std::net::SocketAddr) -> Result<TcpListener, FleetError> {
    TcpListener::bind(addr)
        .await
        .map_err(|cause| FleetError::Listen {
            role: format!("listener {name}"),
            addr,
            cause,
        })
}

/// A stop signal that turns to `Drain` when Phoenix shuts down.
fn stop_on_shutdown(inner: &Arc<Inner>) -> watch::Receiver<Stop> {
    let (tx, rx) = watch::channel(Stop::Serve);
    let mut shutdown = inner.shutdown.subscribe();
    inner.spawn(async move {
        let _ = shutdown.wait_for(|s| *s).await;
        tx.send_replace(Stop::Drain);
    });
    rx
}

/// Looks at the certificate files every second: changed ones are read again (journaled), a
/// broken one keeps the old certificate (journaled with why).
async fn reload_certs(inner: std::sync::Weak<Inner>, name: String, certs: Arc<CertStore>) {
    loop {
        if !crate::lifecycle::pause(&inner, CERT_CHECK).await {
            return;
        }
        let store = certs.clone();
        let Ok((reloaded, errors)) =
            tokio::task::spawn_blocking(move || store.reload_if_changed()).await
        else {
            continue;
        };
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if reloaded > 0 {
            strong
                .journal(
                    None,
                    "listener.certificates_reloaded",
                    json!({"listener": name, "pairs": reloaded}),
                )
                .await;
        }
        for error in errors {
            tracing::error!(listener = %name, %error, "certificate not reloaded: the old one serves");
            strong
                .journal(
                    None,
                    "listener.certificate_refused",
                    json!({"listener": name, "error": error.to_string()}),
                )
                .await;
        }
    }
}
