//! The API's listeners: a Unix socket for the owner, TCP (plain with tokens, or mutual TLS).
//! Each connection learns who is on the other end before its first request is read.

use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::access::{HostPolicy, Peer};

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a client may take to send a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;

/// What a request's connection tells about it, for the authorization layer.
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    pub peer: Peer,
    /// The Host/Origin policy of a TCP listener; none on the Unix socket.
    pub hosts: Option<HostPolicy>,
}

/// Binds the owner's socket at `path`: created under a temporary name, made 0600, then moved
/// into place, so it is never reachable with a wider mode.
pub fn bind_owner_socket(path: &Path) -> io::Result<UnixListener> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path)?;
    Ok(listener)
}

/// Serves `router` on the Unix socket until `shutdown` turns true; each connection's peer is
/// its uid (SO_PEERCRED).
pub async fn serve_unix(
    listener: UnixListener,
    router: Router,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let listener = Arc::new(listener);
    serve(shutdown, router, move || {
        let listener = listener.clone();
        async move {
            let (stream, _) = listener.accept().await?;
            let uid = stream.peer_cred()?.uid();
            let connection = Connection {
                peer: Peer::Local { uid },
                hosts: None,
            };
            Ok::<_, io::Error>(Accepted::Ready(Box::new(stream), connection))
        }
    })
    .await
}

/// Serves `router` on TCP until `shutdown` turns true: with `tls`, every client goes through
/// a TLS handshake (the client certificate, when the config asks for one, names the peer).
pub async fn serve_tcp(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    hosts: HostPolicy,
    router: Router,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let listener = Arc::new(listener);
    serve(shutdown, router, move || {
        let (acceptor, hosts) = (acceptor.clone(), hosts.clone());
        let listener = listener.clone();
        async move {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let Some(acceptor) = acceptor else {
                let connection = Connection {
                    peer: Peer::Remote,
                    hosts: Some(hosts),
                };
                return Ok(Accepted::Ready(Box::new(stream), connection));
            };
            // The handshake runs in the connection's own task: a slow client holds only itself.
            let handshake = async move {
                let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake"))??;
                let peer = match tls.get_ref().1.peer_certificates() {
                    Some([leaf, ..]) => Peer::Certificate {
                        fingerprint: crate::tls::fingerprint(leaf),
                    },
                    _ => Peer::Remote,
                };
                let connection = Connection {
                    peer,
                    hosts: Some(hosts),
                };
                Ok::<_, io::Error>((Box::new(tls) as Box<dyn Io>, connection))
            };
            Ok(Accepted::Pending(Box::pin(handshake)))
        }
    })
    .await
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

type Handshake =
    std::pin::Pin<Box<dyn Future<Output = io::Result<(Box<dyn Io>, Connection)>> + Send>>;

enum Accepted {
    Ready(Box<dyn Io>, Connection),
    Pending(Handshake),
}

/// The accept loop shared by both listeners: one task per connection, all of them asked to
/// finish (and given a grace period) when `shutdown` turns true.
async fn serve<F, A>(
    mut shutdown: watch::Receiver<bool>,
    router: Router,
    mut accept: A,
) -> io::Result<()>
where
    A: FnMut() -> F,
    F: Future<Output = io::Result<Accepted>>,
{
    let mut connections = JoinSet::new();
    loop {
        while connections.len() >= MAX_CONNECTIONS {
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                _ = connections.join_next() => {}
            }
        }
        if *shutdown.borrow() {
            break;
        }
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            accepted = accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let accepted = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors or a reset before accept: pause, never spin.
                tracing::warn!(%error, "API accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let (io, connection) = match accepted {
                Accepted::Ready(io, connection) => (io, connection),
                Accepted::Pending(handshake) => match handshake.await {
                    Ok(ready) => ready,
                    Err(error) => {
                        tracing::debug!(%error, "API connection refused at its handshake");
                        return;
                    }
                },
            };
            serve_connection(io, connection, router, shutdown).await;
        });
    }
    let deadline = tokio::time::sleep(SHUTDOWN_GRACE);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => {
                connections.abort_all();
                break;
            }
            next = connections.join_next() => if next.is_none() { break },
        }
    }
    Ok(())
}

async fn serve_connection(
    io: Box<dyn Io>,
    connection: Connection,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let service = TowerToHyperService::new(router.layer(Extension(connection)));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    let serving = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(serving);
    tokio::select! {
        _ = serving.as_mut() => return,
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
    serving.as_mut().graceful_shutdown();
    let _ = serving.await;
}
