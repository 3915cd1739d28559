//! Keep-alive connections to one backend: hyper's senders for the general path, and raw
//! streams with their read buffer for the HTTP/1.1 fast path ([`crate::h1`]).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::BytesMut;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::UpstreamBody;

pub(crate) type Sender = SendRequest<UpstreamBody>;

/// Idle connections kept per backend and per kind.
const MAX_IDLE: usize = 256;

/// A pooled connection that can tell whether it is still worth reusing.
pub(crate) trait Reusable {
    fn reusable(&self) -> bool;
}

impl Reusable for Sender {
    fn reusable(&self) -> bool {
        !self.is_closed()
    }
}

/// A raw keep-alive connection to a backend and the bytes read from it but not yet used.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) stream: TcpStream,
    pub(crate) buf: BytesMut,
}

impl Reusable for Upstream {
    /// An idle connection must have nothing to read: data or EOF means the backend answered
    /// something unasked or closed it. `try_read` costs no syscall while the reactor has seen
    /// no readiness, the usual case.
    fn reusable(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Idle, reusable connections to one backend.
pub(crate) struct Pool<C> {
    pub(crate) idle: Mutex<Vec<C>>,
}

impl<C> Default for Pool<C> {
    fn default() -> Self {
        Pool {
            idle: Mutex::new(Vec::new()),
        }
    }
}

impl<C> std::fmt::Debug for Pool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle", &self.idle.lock().map(|i| i.len()).unwrap_or(0))
            .finish()
    }
}

impl<C: Reusable> Pool<C> {
    /// An idle connection that is still open, if any.
    pub(crate) fn checkout(&self) -> Option<C> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(connection) = idle.pop() {
            if connection.reusable() {
                return Some(connection);
            }
        }
        None
    }

    /// Returns a connection whose last response was read to the end.
    pub(crate) fn checkin(&self, connection: C) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE && connection.reusable() {
            idle.push(connection);
        }
    }

    /// Closes every idle connection (the backend is going away).
    pub(crate) fn clear(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Opens a TCP connection to `addr` within `timeout`, with Nagle off.
pub(crate) async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect timed out after {timeout:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Opens a new HTTP/1.1 connection to `addr` driven by hyper.
pub(crate) async fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<Sender> {
    let stream = connect_tcp(addr, timeout).await?;
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
