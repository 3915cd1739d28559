//! `[logs.forward.NAME]`: every captured line, read back from the log store, sent on to a
//! syslog server (RFC 5424; TCP with octet framing, or UDP) or a Loki-shaped HTTP sink.
//!
//! A sink's place in each role's logs is kept in `STATE/logs/forward/NAME.json` and moves only
//! past lines confirmed delivered: for TCP, once the receiver's kernel has acknowledged every
//! byte (the socket's send queue is empty) and the receiver has not hung up; for HTTP, a 2xx
//! answer. When a connection fails, what was confirmed in the last seconds before is sent
//! again (a receiver that stops may not have read what its kernel acknowledged), so delivery is
//! at least once: within the store's retention, an outage or a restart of Phoenix loses
//! nothing, and a line may arrive twice.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use phoenix_observe::logs::{LogLine, Position, Query};
use phoenix_observe::ship;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{Notify, watch};

use crate::config::{ForwardConfig, Sink};

/// Lines a batch holds at most.
const BATCH: usize = 1_000;
/// After a failed connection, lines confirmed this recently are sent again.
const RESEND_WINDOW: Duration = Duration::from_secs(2);
/// The longest wait between attempts while a sink is down.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a connection, a write or an acknowledgement may take.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters of one sink, for `/metrics`.
#[derive(Debug, Default)]
pub struct SinkStats {
    pub sent: AtomicU64,
    pub failures: AtomicU64,
    /// Lines the receiver refused for good (an HTTP 4xx other than 429).
    pub rejected: AtomicU64,
}

/// The running forwarders, one task a sink.
pub(crate) struct Forwarding {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stats: BTreeMap<String, Arc<SinkStats>>,
}

impl Forwarding {
    /// Starts a forwarder for every sink of `sinks`, reading the store at `store_dir`.
    pub fn start(
        sinks: &BTreeMap<String, ForwardConfig>,
        store_dir: &Path,
        state_dir: &Path,
        written: Arc<Notify>,
    ) -> Forwarding {
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut stats = BTreeMap::new();
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        for (name, config) in sinks {
            let sink_stats = Arc::new(SinkStats::default());
            stats.insert(name.clone(), sink_stats.clone());
            let forwarder = Forwarder {
                name: name.clone(),
                config: config.clone(),
                store_dir: store_dir.to_path_buf(),
                positions_path: positions_path(state_dir, name),
                written: written.clone(),
                stats: sink_stats,
                hostname: hostname.clone(),
            };
            tasks.push(tokio::spawn(forwarder.run(stopped.clone())));
        }
        Forwarding { stop, tasks, stats }
    }

    pub fn stats(&self) -> &BTreeMap<String, Arc<SinkStats>> {
        &self.stats
    }

    /// Sends what the store holds (up to `limit`), then stops every forwarder.
    pub async fn stop(&mut self, limit: Duration) {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut self.tasks);
        let _ = tokio::time::timeout(limit, futures_util::future::join_all(tasks)).await;
    }
}

/// Where sink `name` keeps its positions.
pub fn positions_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir
        .join("logs")
        .join("forward")
        .join(format!("{name}.json"))
}

struct Forwarder {
    name: String,
    config: ForwardConfig,
    store_dir: PathBuf,
    positions_path: PathBuf,
    written: Arc<Notify>,
    stats: Arc<SinkStats>,
    hostname: String,
}

/// An open connection to a sink, kept between batches.
enum Connection {
    None,
    Tcp(TcpStream),
    Udp(UdpSocket),
}

impl Forwarder {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut positions = self.load_positions();
        let mut connection = Connection::None;
        let mut backoff = Duration::from_millis(100);
        // Batches confirmed lately: when, the role, and where the batch began.
        let mut recent: VecDeque<(Instant, String, Position)> = VecDeque::new();
        let mut complaining = false;
        loop {
            // The resend window is reckoned from the round's start: a send that fails slowly
            // must not age out the batches confirmed just before it.
            let round = Instant::now();
            let stopping = *stop.borrow();
            let mut sent = false;
            let mut failed = None;
            for role in self.roles() {
                let from = positions.get(&role).copied().unwrap_or_default();
                let (lines, next) = match self.read(&role, from).await {
                    Ok(read) => read,
                    Err(error) => {
                        tracing::warn!(sink = %self.name, %role, %error, "cannot read the log store");
                        continue;
                    }
                };
                if lines.is_empty() {
                    positions.insert(role, next);
                    continue;
                }
                match self.send(&mut connection, &role, &lines).await {
                    Ok(()) => {
                        self.stats
                            .sent
                            .fetch_add(lines.len() as u64, Ordering::Relaxed);
                        recent.push_back((Instant::now(), role.clone(), from));
                        positions.insert(role, next);
                        sent = true;
                    }
                    Err(error) => {
                        failed = Some(error);
                        break;
                    }
                }
            }
            while recent
                .front()
                .is_some_and(|(at, _, _)| round.saturating_duration_since(*at) > RESEND_WINDOW)
            {
                recent.pop_front();
            }
            if let Some(error) = failed {
                connection = Connection::None;
                // What the receiver may have lost goes again.
                for (_, role, from) in recent.drain(..) {
                    let at = positions.entry(role).or_default();
                    if (from.seq, from.offset) < (at.seq, at.offset) {
                        *at = from;
                    }
                }
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                if !complaining {
                    tracing::warn!(sink = %self.name, to = %self.config.url, %error, "cannot forward logs; retrying (nothing is lost while the store keeps them)");
                    complaining = true;
                }
                self.save_positions(&positions);
                if stopping {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            if complaining && sent {
                tracing::info!(sink = %self.name, "forwarding logs again");
                complaining = false;
            }
            backoff = Duration::from_millis(100);
            if sent {
                self.save_positions(&positions);
                continue;
            }
            if stopping {
                break;
            }
            let written = self.written.notified();
            tokio::select! {
                _ = written => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = stop.changed() => {}
            }
        }
        self.save_positions(&positions);
    }

    /// The roles this sink takes: those it names, or every role the store has.
    fn roles(&self) -> Vec<String> {
        if !self.config.roles.is_empty() {
            return self.config.roles.clone();
        }
        let Ok(entries) = std::fs::read_dir(&self.store_dir) else {
            return Vec::new();
        };
        let mut roles: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        roles.sort();
        roles
    }

    async fn read(&self, role: &str, from: Position) -> std::io::Result<(Vec<LogLine>, Position)> {
        let query = Query {
            role: role.to_string(),
            ..Query::default()
        };
        let dir = self.store_dir.clone();
        tokio::task::spawn_blocking(move || {
            phoenix_observe::logs::read_from(&dir, &query, from, BATCH)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// The saved positions; a new sink starts at the end of what each role has now (it is
    /// given what is written from its start on, not the store's past).
    fn load_positions(&self) -> BTreeMap<String, Position> {
        if let Ok(bytes) = std::fs::read(&self.positions_path)
            && let Ok(positions) = serde_json::from_slice(&bytes)
        {
            return positions;
        }
        let positions: BTreeMap<String, Position> = self
            .roles()
            .into_iter()
            .map(|role| {
                let end = phoenix_observe::logs::end_position(&self.store_dir, &role);
                (role, end)
            })
            .collect();
        self.save_positions(&positions);
        positions
    }

    fn save_positions(&self, positions: &BTreeMap<String, Position>) {
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.positions_path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self.positions_path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(positions)?)?;
            std::fs::rename(&tmp, &self.positions_path)
        };
        if let Err(error) = write() {
            tracing::warn!(sink = %self.name, %error, "cannot save the forwarding position");
        }
    }

    async fn send(
        &self,
        connection: &mut Connection,
        role: &str,
        lines: &[LogLine],
    ) -> std::io::Result<()> {
        match &self.config.url {
            Sink::SyslogTcp(addr) => {
                let mut frames = Vec::with_capacity(lines.len() * 160);
                for line in lines {
                    let message = ship::syslog_message(role, &self.hostname, line);
                    frames.extend_from_slice(&ship::octet_frame(&message));
                }
                let stream = match connection {
                    Connection::Tcp(stream) => stream,
                    _ => {
                        *connection = Connection::Tcp(connect(*addr).await?);
                        let Connection::Tcp(stream) = connection else {
                            unreachable!()
                        };
                        stream
                    }
                };
                send_tcp(stream, &frames).await
            }
            Sink::SyslogUdp(addr) => {
                if !matches!(connection, Connection::Udp(_)) {
                    let local: SocketAddr = if addr.is_ipv4() {
                        "0.0.0.0:0".parse().expect("an address")
                    } else {
                        "[::]:0".parse().expect("an address")
                    };
                    *connection = Connection::Udp(UdpSocket::bind(local).await?);
                }
                let Connection::Udp(socket) = connection else {
                    unreachable!()
                };
                for line in lines {
                    let message = ship::syslog_message(role, &self.hostname, line);
                    socket.send_to(message.as_bytes(), addr).await?;
                }
                Ok(())
            }
            Sink::Loki { addr, path } => {
                let status = post_json(*addr, path, ship::loki_body(role, lines)).await?;
                match status {
                    200..=299 => Ok(()),
                    429 | 500..=599 => Err(std::io::Error::other(format!(
                        "the receiver answered {status}"
                    ))),
                    _ => {
                        // Refused for good: sending it again would stall every later line.
                        self.stats
                            .rejected
                            .fetch_add(lines.len() as u64, Ordering::Relaxed);
                        tracing::warn!(sink = %self.name, %role, status, lines = lines.len(), "the receiver refused a batch of lines; they stay in the local store");
                        Ok(())
                    }
                }
            }
        }
    }
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Writes `frames` and waits until the receiver's kernel has acknowledged every byte, with the
/// connection still open.
async fn send_tcp(stream: &mut TcpStream, frames: &[u8]) -> std::io::Result<()> {
    still_open(stream)?;
    tokio::time::timeout(IO_TIMEOUT, stream.write_all(frames))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let started = Instant::now();
    // A reset leaves the unacknowledged bytes counted for good, so the connection's end is
    // looked for on every round: waiting out the timeout instead would push the batches the
    // receiver may have lost out of the resend window.
    while unacknowledged(stream)? > 0 {
        still_open(stream)?;
        if started.elapsed() > IO_TIMEOUT {
            return Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    still_open(stream)
}

/// A syslog receiver never sends: anything to read is its end (or an error).
fn still_open(stream: &TcpStream) -> std::io::Result<()> {
    if let Some(error) = stream.take_error()? {
        return Err(error);
    }
    let mut byte = [0u8; 1];
    match stream.try_read(&mut byte) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Ok(0) => Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Bytes written to `stream` that its peer has not acknowledged yet (`SIOCOUTQ`).
fn unacknowledged(stream: &TcpStream) -> std::io::Result<libc::c_int> {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int through the pointer, which is valid for the call.
    let done = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if done < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(queued)
}

/// POSTs `body` as JSON to `http://addr{path}`; the answer's status.
async fn post_json(addr: SocketAddr, path: &str, body: Vec<u8>) -> std::io::Result<u16> {
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    let exchange = async {
        let stream = connect(addr).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        let request = http::Request::post(path)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(std::io::Error::other)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(std::io::Error::other)?;
        Ok(response.status().as_u16())
    };
    tokio::time::timeout(IO_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}
