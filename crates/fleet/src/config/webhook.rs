//! `[webhook.NAME]`: journal events POSTed as signed JSON to a URL.
//!
//! ```toml
//! [webhook.chat]
//! url = "https://hooks.example.test/phoenix"
//! events = ["deploy.finished", "deploy.aborted", "instance.*"]
//! secret_file = "webhook.secret"    # the HMAC-SHA256 key, a file of mode 0600
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{duration_within, read_private_file};

/// The families of journal events, the part of a kind before its dot.
const FAMILIES: &[&str] = &[
    "api",
    "autoscale",
    "chaos",
    "controller",
    "deploy",
    "host",
    "image",
    "instance",
    "member",
    "placement",
    "role",
    "rollout",
    "up",
];

/// `[webhook.NAME]`, checked, with its secret read.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    #[serde(deserialize_with = "endpoint")]
    pub url: Endpoint,
    /// Kinds of journal events (`deploy.finished`), families (`deploy.*`) or `*`.
    pub events: Vec<String>,
    /// The file holding the HMAC key the requests are signed with.
    pub secret_file: PathBuf,
    /// Read from `secret_file`.
    #[serde(skip)]
    pub secret: String,
    /// One attempt's time limit (connect, send, answer).
    #[serde(default = "default_timeout", deserialize_with = "attempt_timeout")]
    pub timeout: Duration,
    /// Attempts after the first failed one, waiting `retry_delay`, twice as long each time.
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_retry_delay", deserialize_with = "retry_delay")]
    pub retry_delay: Duration,
    /// For https: the CA certificates (PEM) the receiver's certificate is checked against;
    /// the system's bundle when left out.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Everything but the secret.
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret_file", &self.secret_file)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("retry_delay", &self.retry_delay)
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_retries() -> u32 {
    5
}
fn default_retry_delay() -> Duration {
    Duration::from_secs(1)
}
fn attempt_timeout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration_within(d, Duration::from_millis(100), Duration::from_secs(300))
}
fn retry_delay<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration_within(d, Duration::from_millis(10), Duration::from_secs(3600))
}

/// Where a webhook is sent: `http://` or `https://`, a host, a port and a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// The path and query, from `/`.
    pub path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("{url:?} is not an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        if authority.contains('@') {
            return Err(format!(
                "{url:?}: credentials in the URL would be sent in the clear; sign with secret_file instead"
            ));
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(bracketed) => bracketed
                .split_once(']')
                .map(|(host, rest)| (host, rest.strip_prefix(':')))
                .ok_or_else(|| format!("{url:?}: no ] after the [address"))?,
            None => match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port = match port {
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{url:?}: {port:?} is not a port number"))?,
        };
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':');
        if host.is_empty() || !host.chars().all(plain) {
            return Err(format!("{url:?}: {host:?} is not a host name or address"));
        }
        if path.chars().any(|c| c.is_ascii_control() || c == ' ') {
            return Err(format!(
                "{url:?}: the path holds spaces or control characters"
            ));
        }
        Ok(Endpoint {
            tls,
            host: host.to_string(),
            port,
            path,
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        match self.host.contains(':') {
            true => write!(f, "{scheme}://[{}]:{}{}", self.host, self.port, self.path),
            false => write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.path),
        }
    }
}

fn endpoint<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Endpoint, D::Error> {
    let text = String::deserialize(deserializer)?;
    Endpoint::parse(&text).map_err(serde::de::Error::custom)
}

impl WebhookConfig {
    /// Whether events of `kind` go to this webhook. `webhook.*` events never do: a receiver
    /// that fails would otherwise feed itself.
    pub fn wants(&self, kind: &str) -> bool {
        !kind.starts_with("webhook.")
            && self
                .events
                .iter()
                .any(|pattern| match pattern.strip_suffix('*') {
                    Some(prefix) => kind.starts_with(prefix),
                    None => pattern == kind,
                })
    }

    /// Checks the event patterns and reads the secret; files are relative to `dir`.
    pub(crate) fn check(&mut self, dir: &Path) -> Result<(), String> {
        if self.events.is_empty() {
            return Err(
                "`events` is empty: list the kinds to send, like [\"deploy.*\"] or [\"*\"]".into(),
            );
        }
        for pattern in &self.events {
            let family = pattern.split('.').next().unwrap_or_default();
            let shaped = pattern == "*"
                || pattern.strip_suffix(".*").is_some_and(|f| !f.contains('.'))
                || (pattern.contains('.') && !pattern.contains('*'));
            if !shaped || (pattern != "*" && !FAMILIES.contains(&family)) {
                return Err(format!(
                    "`events`: {pattern:?} is not an event kind (like deploy.finished), a family (like deploy.*) or *; families: {}",
                    FAMILIES.join(", ")
                ));
            }
        }
        self.secret_file = dir.join(&self.secret_file);
        self.secret = read_private_file(dir, &self.secret_file, "secret_file")?;
        if self.secret.len() < 16 {
            return Err(format!(
                "secret_file: {} holds {} characters; use at least 16 (e.g. openssl rand -hex 32)",
                self.secret_file.display(),
                self.secret.len()
            ));
        }
        if let Some(ca) = &mut self.ca {
            *ca = dir.join(&*ca);
            if !self.url.tls {
                return Err("`ca` is for https:// URLs only".into());
            }
            if !ca.is_file() {
                return Err(format!("ca: {} is not a file", ca.display()));
            }
        }
        Ok(())
    }
}
