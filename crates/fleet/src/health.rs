//! The active HTTP health probe.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Runs the configured check once.
pub async fn check(addr: SocketAddr, health: &crate::HealthConfig) -> Result<(), String> {
    match health.check {
        Some(crate::CheckKind::Tcp) => connect(addr, health.timeout).await,
        Some(crate::CheckKind::Http) | None => probe(addr, &health.path, health.timeout).await,
    }
}

/// Ok when `addr` accepts a TCP connection within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("connect to {addr}: {e}")),
        Err(_) => Err(format!("connect to {addr}: no answer within {timeout:?}")),
    }
}

/// GETs `path` on `addr` over a fresh connection; Ok for 2xx and 3xx, else a one-line reason.
pub async fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, get(addr, path)).await {
        Ok(result) => result,
        Err(_) => Err(format!("GET {path}: no answer within {timeout:?}")),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("GET {path}: connect to {addr}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "phoenix-health")
        // One probe, one connection: the instance closes it once it has answered.
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        return Ok(());
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body[..body.len().min(200)])
        .trim()
        .replace('\n', " ");
    Err(format!(
        "GET {path}: {status}{}{text}",
        if text.is_empty() { "" } else { ": " }
    ))
}
