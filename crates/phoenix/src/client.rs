//! The CLI's client of the local API.

use std::path::Path;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The file in the state directory where `phoenix up` writes its API address.
pub const API_ADDR_FILE: &str = "api.addr";

/// Where to reach the API and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// API address (default: the one `phoenix up` wrote to STATE/api.addr).
    #[arg(long)]
    pub api: Option<String>,
    /// API token, when `phoenix up` was started with one.
    #[arg(long, env = "PHOENIX_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

pub struct Client {
    addr: String,
    token: Option<String>,
}

impl Client {
    /// Finds the API of the `phoenix up` that owns `state`.
    pub fn new(state: &Path, args: &ApiArgs) -> anyhow::Result<Client> {
        let addr = match &args.api {
            Some(addr) => addr
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string(),
            None => {
                let file = state.join(API_ADDR_FILE);
                let text = std::fs::read_to_string(&file).with_context(|| {
                    format!(
                        "no `phoenix up` is running for state directory {} (cannot read {})",
                        state.display(),
                        file.display()
                    )
                })?;
                text.trim().to_string()
            }
        };
        Ok(Client {
            addr,
            token: args.token.clone(),
        })
    }

    /// Sends a request and returns the response (its body not read yet).
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<http::Response<Incoming>> {
        let stream = TcpStream::connect(&self.addr).await.with_context(|| {
            format!(
                "cannot reach the phoenix API at {} (is `phoenix up` running?)",
                self.addr
            )
        })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.addr);
        if let Some(token) = &self.token {
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
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
            bail!("{message}");
        }
        serde_json::from_slice(&body).with_context(|| format!("{path}: unexpected answer"))
    }

    /// GETs `path` and parses the JSON answer.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self.send("GET", path, None).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "{path}: {status}: {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        serde_json::from_slice(&body).with_context(|| format!("{path}: unexpected answer"))
    }
}
