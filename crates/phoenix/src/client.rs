//! The CLI's client of the API: the owner's Unix socket in the state directory by default, or
//! a TCP address with a token (from a file or PHOENIX_API_TOKEN) or a client certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

/// The file in the state directory where `phoenix up` writes its TCP API address, if any.
pub const API_ADDR_FILE: &str = "api.addr";

/// Where to reach the API and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// The API over TCP, `http://HOST:PORT` or `https://HOST:PORT` (default: the owner's
    /// socket, STATE/api.sock).
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
    /// A file holding the API token for TCP (or set PHOENIX_API_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// For https: the CA that signed the API's certificate.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// For https: this client's certificate and key.
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub tls_key: Option<PathBuf>,
    /// Refused: a token on the command line shows in `ps` to every user.
    #[arg(long, hide = true, value_name = "TOKEN")]
    pub token: Option<String>,
}

/// How the client reaches the API.
enum Target {
    Socket(PathBuf),
    Tcp {
        host: String,
        port: u16,
        tls: Option<Arc<rustls::ClientConfig>>,
    },
}

pub struct Client {
    target: Target,
    token: Option<String>,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

impl Client {
    /// Finds the API of the `phoenix up` that owns `state`, or the one `args` names.
    pub fn new(state: &Path, args: &ApiArgs) -> anyhow::Result<Client> {
        if args.token.is_some() {
            bail!(
                "--token is not taken on the command line (every user sees it in `ps`): use --token-file FILE or PHOENIX_API_TOKEN"
            );
        }
        let target = match &args.api {
            Some(url) => tcp_target(url, args)?,
            None => {
                let socket = state.join(crate::up::API_SOCKET);
                if !socket.exists() {
                    return Err(crate::failure::Failure::new(
                        "not_running",
                        format!(
                            "no `phoenix up` is running for state directory {} (no {})",
                            state.display(),
                            socket.display()
                        ),
                    )
                    .into());
                }
                Target::Socket(socket)
            }
        };
        let token = match &args.token_file {
            Some(path) => Some(read_token_file(path)?),
            None => std::env::var("PHOENIX_API_TOKEN")
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
        };
        Ok(Client { target, token })
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Io>> {
        match &self.target {
            Target::Socket(path) => {
                let stream = UnixStream::connect(path).await.with_context(|| {
                    format!(
                        "cannot reach the phoenix API at {} (is `phoenix up` running?)",
                        path.display()
                    )
                })?;
                Ok(Box::new(stream))
            }
            Target::Tcp { host, port, tls } => {
                let stream = TcpStream::connect((host.as_str(), *port))
                    .await
                    .with_context(|| {
                        format!("cannot reach the phoenix API at {host}:{port} (is `phoenix up` serving it?)")
                    })?;
                let Some(tls) = tls else {
                    return Ok(Box::new(stream));
                };
                let name = phoenix_api::tls::server_name(host.trim_matches(['[', ']']))?;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let stream = connector
                    .connect(name, stream)
                    .await
                    .with_context(|| format!("TLS with the phoenix API at {host}:{port}"))?;
                Ok(Box::new(stream))
            }
        }
    }

    fn host_header(&self) -> String {
        match &self.target {
            Target::Socket(_) => "localhost".into(),
            Target::Tcp { host, port, .. } => format!("{host}:{port}"),
        }
    }

    /// Sends a request and returns the response (its body not read yet).
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<http::Response<Incoming>> {
        let stream = self.connect().await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.host_header());
        if let (Some(token), Target::Tcp { .. }) = (&self.token, &self.target) {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let request = request
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(bytes)))?;
        Ok(sender.send_request(request).await?)
    }

    /// POSTs `body` to `path` and parses the JSON answer; an error answer's message is the error.
    pub async fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<T> {
        let response = self.send("POST", path, Some(body)).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(crate::failure::Failure::from_api(status, &body).into());
        }
        serde_json::from_slice(&body).with_context(|| format!("{path}: unexpected answer"))
    }

    /// GETs `path` and parses the JSON answer.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self.send("GET", path, None).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let mut failure = crate::failure::Failure::from_api(status, &body);
            failure.message = format!("{path}: {status}: {}", failure.message);
            return Err(failure.into());
        }
        serde_json::from_slice(&body).with_context(|| format!("{path}: unexpected answer"))
    }
}

/// `http://HOST:PORT`, `https://HOST:PORT` or `HOST:PORT`.
fn tcp_target(url: &str, args: &ApiArgs) -> anyhow::Result<Target> {
    let (https, rest) = match url.split_once("://") {
        Some(("https", rest)) => (true, rest),
        Some(("http", rest)) => (false, rest),
        Some((scheme, _)) => bail!("--api {url}: use http:// or https://, not {scheme}://"),
        None => (false, url),
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
        .with_context(|| format!("--api {url}: write HOST:PORT, like http://127.0.0.1:7070"))?;
    let tls = match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (Some(ca), Some(cert), Some(key)) if https => {
            Some(phoenix_api::tls::client_config(ca, cert, key)?)
        }
        _ if https => bail!("--api {url}: https needs --tls-ca, --tls-cert and --tls-key"),
        _ => None,
    };
    Ok(Target::Tcp {
        host: host.to_string(),
        port,
        tls,
    })
}

/// The token in `path`: its first line, trimmed; never empty.
fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    Ok(token)
}
