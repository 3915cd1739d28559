//! Connections to etcd members: plain or TLS, HTTP/1.1, kept alive in a small pool, with
//! failover from one member to the next and etcd's token authentication.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::wire::{Authenticate, ErrorAnswer, Token};
use super::{EtcdError, EtcdOptions, Result};

/// One etcd member's client URL, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// `http://HOST:PORT` or `https://HOST:PORT` (a trailing `/` is allowed).
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |what: &str| EtcdError::BadEndpoint {
            endpoint: url.to_string(),
            what: what.to_string(),
        };
        let (tls, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err(bad("must start with http:// or https://"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') || authority.contains('@') {
            return Err(bad("must be http(s)://HOST:PORT, without a path or user"));
        }
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| bad("has no port (etcd's client port is usually 2379)"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| bad(&format!("port {port:?} is not a number from 1 to 65535")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(bad("has no host or a zero port"));
        }
        Ok(Self {
            url: url.to_string(),
            tls,
            host: host.to_string(),
            port,
        })
    }
}

impl Endpoint {
    /// A JSON POST of `path` to this member.
    fn post(&self, path: &str) -> hyper::http::request::Builder {
        hyper::Request::post(path)
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .header(hyper::header::CONTENT_TYPE, "application/json")
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One connection to a member: where requests go, and why it died, when it did (hyper's own
/// error says only "channel closed"; the cause, say a TLS alert, is the connection task's).
struct Sender {
    requests: SendRequest<Full<Bytes>>,
    died: Option<tokio::sync::oneshot::Receiver<String>>,
}

impl Sender {
    fn is_closed(&self) -> bool {
        self.requests.is_closed()
    }

    /// Sends `request` and waits for the answer's head, within `timeout`.
    async fn exchange(
        &mut self,
        request: hyper::Request<Full<Bytes>>,
        timeout: std::time::Duration,
    ) -> std::result::Result<hyper::Response<Incoming>, Failure> {
        let sent = tokio::time::timeout(timeout, async {
            self.requests.ready().await?;
            self.requests.send_request(request).await
        })
        .await
        .map_err(|_| Failure(format!("no answer within {timeout:?}")))?;
        match sent {
            Ok(response) => Ok(response),
            Err(e) => {
                // The connection task knows why; it tells as it ends, right after.
                let wait = std::time::Duration::from_millis(500);
                let died = match self.died.take() {
                    Some(died) => tokio::time::timeout(wait, died)
                        .await
                        .ok()
                        .and_then(|r| r.ok()),
                    None => None,
                };
                Err(Failure(died.unwrap_or_else(|| chain(&e))))
            }
        }
    }
}

/// Every member, the one in use, idle connections and each member's auth token.
pub(crate) struct Pool {
    endpoints: Vec<Endpoint>,
    options: EtcdOptions,
    current: AtomicUsize,
    idle: Mutex<Vec<(usize, Sender)>>,
    tokens: Mutex<HashMap<usize, String>>,
}

/// A streaming answer (a watch).
pub(crate) struct Stream {
    body: Incoming,
    _sender: Sender,
}

impl Stream {
    pub(crate) async fn chunk(&mut self) -> std::result::Result<Option<Bytes>, hyper::Error> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

/// Why one member could not serve a request: the next one may.
struct Failure(String);

impl Pool {
    pub(crate) fn new(options: EtcdOptions) -> Result<Self> {
        if options.endpoints.is_empty() {
            return Err(EtcdError::BadEndpoint {
                endpoint: String::new(),
                what: "no endpoint given".into(),
            });
        }
        let endpoints = options
            .endpoints
            .iter()
            .map(|url| Endpoint::parse(url))
            .collect::<Result<Vec<_>>>()?;
        if let Some(e) = endpoints.iter().find(|e| e.tls)
            && options.tls.is_none()
        {
            return Err(EtcdError::BadEndpoint {
                endpoint: e.url.clone(),
                what: "is https but no TLS settings (a CA file) were given".into(),
            });
        }
        Ok(Self {
            endpoints,
            options,
            current: AtomicUsize::new(0),
            idle: Mutex::new(Vec::new()),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn describe(&self) -> String {
        let urls: Vec<&str> = self.endpoints.iter().map(|e| e.url.as_str()).collect();
        urls.join(",")
    }

    pub(crate) fn protocol(&self, path: &'static str, e: impl std::fmt::Display) -> EtcdError {
        EtcdError::Protocol {
            endpoint: self.endpoints[self.current.load(Ordering::Relaxed)]
                .url
                .clone(),
            path,
            what: e.to_string(),
        }
    }

    /// Sends one request, moving from member to member until one answers; the member's URL and
    /// the answer's bytes.
    pub(crate) async fn request(&self, path: &'static str, body: Value) -> Result<(String, Bytes)> {
        let body = Bytes::from(body.to_string());
        self.each_member(path, |index| {
            let body = body.clone();
            async move {
                let (sender, response) = self.send(index, path, body).await?;
                let status = response.status();
                let bytes = read_bounded(response.into_body(), self.options.timeout).await?;
                self.idle.lock().unwrap().push((index, sender));
                Ok((status, bytes))
            }
        })
        .await
    }

    /// Opens a streaming request on a connection of its own.
    pub(crate) async fn stream(&self, path: &'static str, body: Value) -> Result<Stream> {
        let body = Bytes::from(body.to_string());
        let opened = Mutex::new(None);
        self.each_member(path, |index| {
            let body = body.clone();
            let opened = &opened;
            async move {
                let sender = self.connect(index).await?;
                let (sender, response) = self.send_on(sender, index, path, body).await?;
                let status = response.status();
                if status.is_success() {
                    *opened.lock().unwrap() = Some(Stream {
                        body: response.into_body(),
                        _sender: sender,
                    });
                    return Ok((status, Bytes::new()));
                }
                let bytes = read_bounded(response.into_body(), self.options.timeout).await;
                Ok((status, bytes.unwrap_or_default()))
            }
        })
        .await?;
        let opened = opened.into_inner().unwrap();
        opened.ok_or_else(|| self.protocol(path, "no stream"))
    }

    /// Runs `attempt` on the current member, then on the others in turn, until one answers
    /// with success; re-authenticates once when a token has expired.
    async fn each_member<F, Fut>(
        &self,
        path: &'static str,
        mut attempt: F,
    ) -> Result<(String, Bytes)>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(hyper::StatusCode, Bytes), Failure>>,
    {
        let start = self.current.load(Ordering::Relaxed);
        let mut tried = Vec::new();
        let mut last = String::new();
        for step in 0..self.endpoints.len() {
            let index = (start + step) % self.endpoints.len();
            let url = self.endpoints[index].url.clone();
            let mut reauthenticated = false;
            loop {
                match attempt(index).await {
                    Ok((status, bytes)) if status.is_success() => {
                        self.current.store(index, Ordering::Relaxed);
                        return Ok((url, bytes));
                    }
                    Ok((status, bytes)) => {
                        let error: ErrorAnswer = serde_json::from_slice(&bytes).unwrap_or_default();
                        let message = if error.message.is_empty() {
                            format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes))
                        } else {
                            error.message.clone()
                        };
                        if is_auth_expired(&error)
                            && !reauthenticated
                            && self.options.credentials.is_some()
                        {
                            self.tokens.lock().unwrap().remove(&index);
                            reauthenticated = true;
                            continue;
                        }
                        if !is_member_trouble(status, &error) {
                            return Err(EtcdError::Refused {
                                endpoint: url,
                                path,
                                code: error.code,
                                message,
                            });
                        }
                        last = format!("{url}: {message}");
                    }
                    Err(Failure(why)) => last = format!("{url}: {why}"),
                }
                break;
            }
            tried.push(url);
        }
        let tls = ["alert", "certificate", "TLS", "tls"];
        let hint = if tls.iter().any(|word| last.contains(word)) {
            "The TLS handshake failed: check [cluster] ca, cert and key against etcd's certificates"
        } else {
            "etcd is down or has lost its quorum: changes wait until it answers"
        };
        Err(EtcdError::Unavailable {
            tried: tried.join(", "),
            last,
            hint,
        })
    }

    async fn send(
        &self,
        index: usize,
        path: &'static str,
        body: Bytes,
    ) -> std::result::Result<(Sender, hyper::Response<Incoming>), Failure> {
        let pooled = {
            let mut idle = self.idle.lock().unwrap();
            idle.iter()
                .rposition(|(i, s)| *i == index && !s.is_closed())
                .map(|at| idle.swap_remove(at).1)
        };
        let sender = match pooled {
            Some(sender) => sender,
            None => self.connect(index).await?,
        };
        self.send_on(sender, index, path, body).await
    }

    async fn send_on(
        &self,
        mut sender: Sender,
        index: usize,
        path: &'static str,
        body: Bytes,
    ) -> std::result::Result<(Sender, hyper::Response<Incoming>), Failure> {
        let token = self.token(index).await?;
        let mut request = self.endpoints[index]
            .post(&format!("/v3/{path}"))
            // etcd's require-leader: a member without a leader refuses instead of hanging.
            .header("grpc-metadata-hasleader", "true");
        if let Some(token) = token {
            request = request.header(hyper::header::AUTHORIZATION, token);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| Failure(chain(&e)))?;
        let response = sender.exchange(request, self.options.timeout).await?;
        Ok((sender, response))
    }

    /// The member's auth token, authenticating first if there is none yet.
    async fn token(&self, index: usize) -> std::result::Result<Option<String>, Failure> {
        let Some((name, password)) = &self.options.credentials else {
            return Ok(None);
        };
        if let Some(token) = self.tokens.lock().unwrap().get(&index) {
            return Ok(Some(token.clone()));
        }
        let body = serde_json::to_vec(&Authenticate { name, password }).unwrap_or_default();
        let sender = self.connect(index).await?;
        let request = self.endpoints[index]
            .post("/v3/auth/authenticate")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Failure(chain(&e)))?;
        let mut sender = sender;
        let response = sender.exchange(request, self.options.timeout).await?;
        let status = response.status();
        let bytes = read_bounded(response.into_body(), self.options.timeout).await?;
        let token: Token = serde_json::from_slice(&bytes).map_err(|_| {
            let error: ErrorAnswer = serde_json::from_slice(&bytes).unwrap_or_default();
            Failure(format!(
                "authentication as {name:?} failed (HTTP {status}): {}",
                error.message
            ))
        })?;
        self.tokens
            .lock()
            .unwrap()
            .insert(index, token.token.clone());
        Ok(Some(token.token))
    }

    async fn connect(&self, index: usize) -> std::result::Result<Sender, Failure> {
        let endpoint = &self.endpoints[index];
        let timeout = self.options.timeout;
        let tcp = tokio::time::timeout(
            timeout,
            TcpStream::connect((endpoint.host.as_str(), endpoint.port)),
        )
        .await
        .map_err(|_| Failure(format!("cannot connect within {timeout:?}")))?
        .map_err(|e| Failure(format!("cannot connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match (&self.options.tls, endpoint.tls) {
            (Some(config), true) => {
                let name = rustls::pki_types::ServerName::try_from(endpoint.host.clone())
                    .map_err(|e| Failure(format!("server name {:?}: {e}", endpoint.host)))?;
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls = tokio::time::timeout(timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| Failure("TLS handshake timed out".into()))?
                    .map_err(|e| Failure(format!("TLS: {e}")))?;
                Box::new(tls)
            }
            _ => Box::new(tcp),
        };
        let (requests, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| Failure(chain(&e)))?;
        let (tell, died) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                let _ = tell.send(chain(&e));
            }
        });
        Ok(Sender {
            requests,
            died: Some(died),
        })
    }
}

/// An error with its causes: hyper says only "connection error" where the cause is, say, a
/// TLS alert.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// An answer's body, whole: at most 64 MiB (etcd's own answers stay far below; a larger one
/// is not etcd's) and within `timeout`.
async fn read_bounded(
    body: Incoming,
    timeout: std::time::Duration,
) -> std::result::Result<Bytes, Failure> {
    const MAX_ANSWER: usize = 64 << 20;
    let limited = http_body_util::Limited::new(body, MAX_ANSWER);
    let collected = tokio::time::timeout(timeout, limited.collect())
        .await
        .map_err(|_| Failure(format!("no whole answer within {timeout:?}")))?
        .map_err(|e| Failure(format!("reading the answer: {e}")))?;
    Ok(collected.to_bytes())
}

/// etcd's "invalid auth token" (the simple tokens of etcd 3.4 live in one member's memory).
fn is_auth_expired(error: &ErrorAnswer) -> bool {
    error.message.contains("invalid auth token")
        || error.message.contains("token") && error.code == 16
}

/// An answer that says this member cannot serve now, where another one might: no leader, not
/// started, timed out, or the gateway's 503.
fn is_member_trouble(status: hyper::StatusCode, error: &ErrorAnswer) -> bool {
    // gRPC codes: 4 deadline exceeded, 14 unavailable.
    status == hyper::StatusCode::SERVICE_UNAVAILABLE
        || matches!(error.code, 4 | 14)
        || error.message.contains("no leader")
        || error.message.contains("timed out")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_say_what_is_wrong_with_them() {
        let ok = Endpoint::parse("https://10.0.0.1:2379/").unwrap();
        assert_eq!(
            (ok.tls, ok.host.as_str(), ok.port),
            (true, "10.0.0.1", 2379)
        );
        let v6 = Endpoint::parse("http://[::1]:2379").unwrap();
        assert_eq!(v6.host, "::1");
        for (url, says) in [
            ("10.0.0.1:2379", "http:// or https://"),
            ("http://10.0.0.1", "no port"),
            ("http://10.0.0.1:23x9", "not a number"),
            ("http://10.0.0.1:2379/v3", "without a path"),
            ("http://user@h:1", "without a path or user"),
            ("http://:2379", "no host"),
        ] {
            let error = Endpoint::parse(url).unwrap_err().to_string();
            assert!(error.contains(says), "{url}: {error}");
        }
    }
}
