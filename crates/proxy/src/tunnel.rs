//! Tunnels: bytes copied both ways (in user space, `copy_bidirectional`) between a client and
//! a backend, for upgraded HTTP connections (WebSocket) and for roles in TCP mode. A tunnel
//! holds its backend's in-flight claim, so a drain waits for it, and ends when the drain's
//! deadline passes.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::{Backend, InFlight, RoleProxy, TrafficMetrics, stopped};

/// Copies bytes both ways until either side closes or the backend's tunnels are closed.
pub(crate) async fn splice<A, B>(
    mut client: A,
    mut backend: B,
    claim: InFlight,
    role: Arc<TrafficMetrics>,
) where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut closing = claim.backend().close_tunnels.subscribe();
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut backend) => match result {
            Ok((received, sent)) => {
                for metrics in [&*role, &claim.backend().metrics] {
                    metrics.add_received(received);
                    metrics.add_sent(sent);
                }
            }
            Err(error) => tracing::debug!(backend = %claim.backend().id, %error, "tunnel ended"),
        },
        _ = stopped(&mut closing) => {
            tracing::debug!(backend = %claim.backend().id, "tunnel closed at the drain deadline");
        }
    }
}

/// One client connection of a role in TCP mode: connect to a backend (another one when a
/// connection is refused) and splice.
pub(crate) async fn serve_tcp(client: TcpStream, proxy: Arc<RoleProxy>) {
    proxy.stats.requests.fetch_add(1, Ordering::Relaxed);
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    while let Some(claim) = proxy.pick(&tried) {
        let backend = claim.backend().clone();
        match tokio::time::timeout(
            proxy.config().connect_timeout,
            TcpStream::connect(backend.addr),
        )
        .await
        {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                splice(client, stream, claim, proxy.metrics.clone()).await;
                return;
            }
            Ok(Err(error)) => {
                backend.down.store(true, Ordering::Release);
                tracing::debug!(role = %proxy.role, backend = %backend.id, %error, "connect failed, trying another backend");
            }
            Err(_) => {
                tracing::debug!(role = %proxy.role, backend = %backend.id, "connect timed out, trying another backend")
            }
        }
        proxy.stats.retries.fetch_add(1, Ordering::Relaxed);
        tried.push(backend);
    }
    proxy.stats.proxy_errors.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(role = %proxy.role, "no instance could take a TCP connection; closing it");
}
