//! Keep-alive connections to one backend.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::UpstreamBody;

pub(crate) type Sender = SendRequest<UpstreamBody>;

/// Idle connections kept per backend.
const MAX_IDLE: usize = 256;

/// Idle, reusable connections to one backend.
#[derive(Default)]
pub(crate) struct Pool {
    pub(crate) idle: Mutex<Vec<Sender>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle", &self.idle.lock().map(|i| i.len()).unwrap_or(0))
            .finish()
    }
}

impl Pool {
    /// An idle connection that is still open, if any.
    pub(crate) fn checkout(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Returns a connection whose last response was read to the end.
    pub(crate) fn checkin(&self, sender: Sender) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if !sender.is_closed() && idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    /// Closes every idle connection (the backend is going away).
    pub(crate) fn clear(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Opens a new HTTP/1.1 connection to `addr`.
pub(crate) async fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<Sender> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect timed out after {timeout:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    // One flattened buffer per message: `send` is cheaper than `writev` on small messages.
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        // With upgrades: a 101 answer hands the connection over to a tunnel.
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%addr, %error, "backend connection closed");
        }
    });
    Ok(sender)
}
