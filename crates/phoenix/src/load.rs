//! A small closed-loop HTTP load generator over keep-alive connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the load saw.
#[derive(Debug, Default)]
pub struct LoadStats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    /// Successful responses by the version the hello app reported.
    pub versions: Mutex<BTreeMap<String, u64>>,
    /// The first few failures, for the report.
    pub failures: Mutex<Vec<String>>,
    /// The version of the newest response.
    pub last_version: Mutex<String>,
}

impl LoadStats {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() < 5 {
            failures.push(why);
        }
    }

    pub fn versions(&self) -> BTreeMap<String, u64> {
        self.versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Running load; stop it with [`Load::stop`].
pub struct Load {
    stop: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
    pub stats: Arc<LoadStats>,
}

impl Load {
    /// Starts `workers` loops, each sending `GET /` to `addr` and pausing `pause` between requests.
    pub fn start(addr: SocketAddr, workers: usize, pause: Duration) -> Load {
        let (stop, stopped) = watch::channel(false);
        let stats = Arc::new(LoadStats::default());
        let workers = (0..workers)
            .map(|_| tokio::spawn(worker(addr, pause, stats.clone(), stopped.clone())))
            .collect();
        Load {
            stop,
            workers,
            stats,
        }
    }

    pub async fn stop(self) -> Arc<LoadStats> {
        self.stop.send_replace(true);
        for worker in self.workers {
            let _ = worker.await;
        }
        self.stats
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn worker(
    addr: SocketAddr,
    pause: Duration,
    stats: Arc<LoadStats>,
    stop: watch::Receiver<bool>,
) {
    let mut connection: Option<Sender> = None;
    while !*stop.borrow() {
        let sender = match connection.take() {
            Some(sender) if !sender.is_closed() => Ok(sender),
            _ => connect(addr).await,
        };
        stats.sent.fetch_add(1, Ordering::Relaxed);
        match sender {
            Ok(mut sender) => match request(&mut sender).await {
                Ok(version) => {
                    *stats
                        .versions
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(version.clone())
                        .or_default() += 1;
                    *stats.last_version.lock().unwrap_or_else(|p| p.into_inner()) = version;
                    connection = Some(sender);
                }
                Err(why) => stats.fail(why),
            },
            Err(why) => stats.fail(why),
        }
        tokio::time::sleep(pause).await;
    }
}

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One `GET /`; returns the version from `hello from NAME version VERSION`.
async fn request(sender: &mut Sender) -> Result<String, String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let request = http::Request::get("/")
        .header(http::header::HOST, "demo")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .map_err(|_| "no response within 10 s".to_string())?
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    if status != http::StatusCode::OK {
        return Err(format!("{status}: {}", text.trim()));
    }
    text.trim()
        .rsplit_once(" version ")
        .map(|(_, v)| v.to_string())
        .ok_or_else(|| format!("unexpected body {text:?}"))
}
