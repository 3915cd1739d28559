//! `[webhook.NAME]`: every journal event a webhook subscribes to is POSTed to its URL as JSON,
//! signed with HMAC-SHA256, in journal order, retried with a doubling delay. Each webhook keeps
//! the sequence number of the last event it is done with in a file, so a restart goes on where
//! the last run stopped (events are sent at least once; `X-Phoenix-Delivery` tells repeats).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hmac::{Hmac, Mac};
use phoenix_store::{JournalRow, Store};
use serde_json::json;
use sha2::Sha256;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::WebhookConfig;

/// Journal events read from the store at a time.
const BATCH: u32 = 100;
/// The longest wait between two attempts.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// Where the system's CA certificates are, for https receivers without `ca`.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Counters of one webhook, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct WebhookStats {
    /// Events the receiver answered with 2xx.
    pub delivered: AtomicU64,
    /// Attempts that failed (each retried while retries are left).
    pub failures: AtomicU64,
    /// Events given up on (retries spent, or refused with a 4xx).
    pub given_up: AtomicU64,
}

/// The running webhook senders, one task each.
pub(crate) struct Webhooks {
    configs: BTreeMap<String, WebhookConfig>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stats: BTreeMap<String, Arc<WebhookStats>>,
}

/// What every sender shares with the controller.
#[derive(Clone)]
pub(crate) struct Journal {
    pub store: Arc<Store>,
    pub clock: Arc<dyn Clock>,
    /// The newest journal sequence number, bumped by every write.
    pub written: watch::Receiver<i64>,
    pub state_dir: PathBuf,
}

impl Webhooks {
    pub fn start(configs: &BTreeMap<String, WebhookConfig>, journal: &Journal) -> Webhooks {
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut stats = BTreeMap::new();
        for (name, config) in configs {
            let counters = Arc::new(WebhookStats::default());
            stats.insert(name.clone(), counters.clone());
            let sender = Sender {
                name: name.clone(),
                config: config.clone(),
                journal: journal.clone(),
                stats: counters,
                stopped: stopped.clone(),
            };
            tasks.push(tokio::spawn(sender.run()));
        }
        Webhooks {
            configs: configs.clone(),
            stop,
            tasks,
            stats,
        }
    }

    pub fn stats(&self) -> &BTreeMap<String, Arc<WebhookStats>> {
        &self.stats
    }

    /// Starts over with `configs` when they differ from the running ones (`apply`).
    pub async fn reconfigure(
        &mut self,
        configs: &BTreeMap<String, WebhookConfig>,
        journal: &Journal,
    ) {
        if &self.configs != configs {
            self.stop(Duration::from_secs(1)).await;
            *self = Webhooks::start(configs, journal);
        }
    }

    /// Stops every sender; one in the middle of an attempt gets up to `limit` to finish it.
    pub async fn stop(&mut self, limit: Duration) {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut self.tasks);
        let _ = tokio::time::timeout(limit, futures_util::future::join_all(tasks)).await;
    }
}

/// Where webhook `name` keeps the sequence number of the last event it is done with.
fn position_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("webhooks").join(format!("{name}.position"))
}

struct Sender {
    name: String,
    config: WebhookConfig,
    journal: Journal,
    stats: Arc<WebhookStats>,
    stopped: watch::Receiver<bool>,
}

/// How one event's delivery ended.
enum Outcome {
    Delivered,
    GaveUp(String),
    Stopped,
}

impl Sender {
    async fn run(mut self) {
        let client = match Client::new(&self.config) {
            Ok(client) => client,
            Err(why) => {
                tracing::error!(webhook = %self.name, "{why}: no events will be sent");
                return;
            }
        };
        let Some(mut position) = self.start_position().await else {
            return;
        };
        let mut written = self.journal.written.clone();
        while !*self.stopped.borrow() {
            let store = self.journal.store.clone();
            let batch = tokio::task::spawn_blocking(move || store.journal_after(position, BATCH))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            let batch = match batch {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::error!(webhook = %self.name, "reading the journal: {error}");
                    Vec::new()
                }
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = written.changed() => {}
                    _ = self.stopped.changed() => {}
                    // Also a safety net for a missed bump.
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            for event in batch {
                if self.config.wants(&event.kind) {
                    match self.deliver(&client, &event).await {
                        Outcome::Stopped => return,
                        Outcome::Delivered => {
                            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                        }
                        Outcome::GaveUp(why) => self.give_up(&event, why).await,
                    }
                }
                position = event.seq;
                self.save_position(position);
            }
        }
    }

    /// The saved position, or the journal's end for a new webhook (it is sent what comes
    /// from now on, not the past).
    async fn start_position(&self) -> Option<i64> {
        let path = position_path(&self.journal.state_dir, &self.name);
        if let Some(saved) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| text.trim().parse().ok())
        {
            return Some(saved);
        }
        let store = self.journal.store.clone();
        match tokio::task::spawn_blocking(move || store.journal_last_seq()).await {
            Ok(Ok(end)) => {
                self.save_position(end);
                Some(end)
            }
            failed => {
                tracing::error!(webhook = %self.name, "reading the journal: {failed:?}");
                None
            }
        }
    }

    fn save_position(&self, position: i64) {
        let path = position_path(&self.journal.state_dir, &self.name);
        let tmp = path.with_extension("tmp");
        let saved = std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))
            .and_then(|()| std::fs::write(&tmp, position.to_string()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(error) = saved {
            tracing::warn!(webhook = %self.name, "saving {}: {error}", path.display());
        }
    }

    /// Sends `event` until the receiver takes it, refuses it or the retries are spent.
    async fn deliver(&mut self, client: &Client, event: &JournalRow) -> Outcome {
        let body = json!({
            "webhook": self.name, "id": event.seq, "at": event.at, "kind": event.kind,
            "role": event.role, "detail": event.detail,
        })
        .to_string();
        let delivery = format!("{}-{}", self.name, event.seq);
        let mut delay = self.config.retry_delay;
        let mut last = String::new();
        for attempt in 0..=self.config.retries {
            if attempt > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.stopped.changed() => return Outcome::Stopped,
                }
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
            let timestamp = self.journal.clock.now_ms() / 1000;
            let request = Request {
                body: &body,
                kind: &event.kind,
                delivery: &delivery,
                timestamp,
                signature: sign(&self.config.secret, timestamp, &body),
            };
            let answer = tokio::time::timeout(self.config.timeout, client.post(&request)).await;
            match answer {
                Ok(Ok(status)) if (200..300).contains(&status) => return Outcome::Delivered,
                // The receiver says the event itself is wrong: sending it again changes nothing.
                Ok(Ok(status))
                    if (400..500).contains(&status) && status != 408 && status != 429 =>
                {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    return Outcome::GaveUp(format!("refused with HTTP {status}"));
                }
                Ok(Ok(status)) => last = format!("HTTP {status}"),
                Ok(Err(error)) => last = error,
                Err(_) => last = format!("no answer within {:?}", self.config.timeout),
            }
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(webhook = %self.name, event = event.seq, attempt, "{last}");
        }
        Outcome::GaveUp(format!(
            "{} attempts failed, the last: {last}",
            self.config.retries + 1
        ))
    }

    async fn give_up(&self, event: &JournalRow, why: String) {
        self.stats.given_up.fetch_add(1, Ordering::Relaxed);
        tracing::error!(webhook = %self.name, event = event.seq, "gave up: {why}");
        let detail = json!({"webhook": self.name, "event": event.seq, "kind": event.kind,
                            "url": self.config.url.to_string(), "reason": why});
        let (store, now, role) = (
            self.journal.store.clone(),
            self.journal.clock.now_ms(),
            event.role.clone(),
        );
        let _ = tokio::task::spawn_blocking(move || {
            store.journal(now, role.as_deref(), "webhook.failed", &detail)
        })
        .await;
    }
}

/// `sha256=` and the hex HMAC-SHA256 of `TIMESTAMP.BODY` under `secret`.
pub fn sign(secret: &str, timestamp: i64, body: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

struct Request<'a> {
    body: &'a str,
    kind: &'a str,
    delivery: &'a str,
    timestamp: i64,
    signature: String,
}

/// An HTTP/1.1 client for one endpoint, over TLS for https.
struct Client {
    endpoint: crate::config::Endpoint,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Client {
    fn new(config: &WebhookConfig) -> Result<Client, String> {
        let tls = match config.url.tls {
            false => None,
            true => Some(tls_connector(config.ca.as_deref())?),
        };
        Ok(Client {
            endpoint: config.url.clone(),
            tls,
        })
    }

    /// One POST; the answer's status.
    async fn post(&self, request: &Request<'_>) -> Result<u16, String> {
        let endpoint = &self.endpoint;
        let stream = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| format!("connect to {}:{}: {e}", endpoint.host, endpoint.port))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        match &self.tls {
            None => self.exchange(stream, request).await,
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(endpoint.host.clone())
                    .map_err(|e| format!("{}: {e}", endpoint.host))?;
                let stream = connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", endpoint.host))?;
                self.exchange(stream, request).await
            }
        }
    }

    async fn exchange<S>(&self, stream: S, request: &Request<'_>) -> Result<u16, String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        use http_body_util::Full;
        use hyper_util::rt::TokioIo;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let endpoint = &self.endpoint;
        let default_port = if endpoint.tls { 443 } else { 80 };
        let host = match (endpoint.port == default_port, endpoint.host.contains(':')) {
            (true, false) => endpoint.host.clone(),
            (true, true) => format!("[{}]", endpoint.host),
            (false, false) => format!("{}:{}", endpoint.host, endpoint.port),
            (false, true) => format!("[{}]:{}", endpoint.host, endpoint.port),
        };
        let http = http::Request::post(endpoint.path.as_str())
            .header(http::header::HOST, host)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("phoenix/", env!("CARGO_PKG_VERSION")),
            )
            .header("x-phoenix-event", request.kind)
            .header("x-phoenix-delivery", request.delivery)
            .header("x-phoenix-timestamp", request.timestamp.to_string())
            .header("x-phoenix-signature", &request.signature)
            .body(Full::new(bytes::Bytes::from(request.body.to_string())))
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(http).await.map_err(|e| e.to_string())?;
        Ok(response.status().as_u16())
    }
}

/// TLS 1.2/1.3 with the receiver's certificate checked against `ca` or the system's bundle.
fn tls_connector(ca: Option<&Path>) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bundle = ca.unwrap_or(Path::new(SYSTEM_CA_BUNDLE));
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(bundle)
        .map_err(|e| format!("CA certificates {}: {e}", bundle.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("CA certificates {}: {e}", bundle.display()))?;
        // The system bundle may hold a certificate webpki cannot use; the others still serve.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(format!("no CA certificate in {}", bundle.display()));
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
