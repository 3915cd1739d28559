//! `[logs]`: how much of each role's output the log store keeps, and where it is forwarded.
//!
//! ```toml
//! [logs]
//! max_size = "1GiB"          # per role, the default of every role
//! max_age = "7d"
//!
//! [logs.forward.central]
//! url = "tcp://127.0.0.1:514"   # syslog, RFC 5424 with octet framing; udp:// for UDP;
//!                               # http://HOST/loki/api/v1/push for Loki's JSON push API
//! roles = ["web"]               # default: every role
//! ```
//!
//! A role keeps its own amounts with `[role.NAME] logs = { max_size = "..", max_age = ".." }`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{DAY, duration_within, size};

/// `[logs]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsConfig {
    /// The default retention of every role (as [`LogRetention`]).
    #[serde(default = "default_max_size", deserialize_with = "store_size")]
    pub max_size: u64,
    #[serde(default = "default_max_age", deserialize_with = "store_age")]
    pub max_age: Duration,
    /// `[logs.forward.NAME]`: sinks every captured line is sent to.
    #[serde(default)]
    pub forward: BTreeMap<String, ForwardConfig>,
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            max_size: default_max_size(),
            max_age: default_max_age(),
            forward: BTreeMap::new(),
        }
    }
}

impl LogsConfig {
    /// What a role keeps unless it says otherwise.
    pub fn keep(&self) -> LogRetention {
        LogRetention {
            max_size: self.max_size,
            max_age: self.max_age,
        }
    }
}

/// How much of a role's output the store keeps: the oldest goes first past either amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogRetention {
    #[serde(default = "default_max_size", deserialize_with = "store_size")]
    pub max_size: u64,
    #[serde(default = "default_max_age", deserialize_with = "store_age")]
    pub max_age: Duration,
}

impl Default for LogRetention {
    fn default() -> Self {
        LogRetention {
            max_size: default_max_size(),
            max_age: default_max_age(),
        }
    }
}

fn default_max_size() -> u64 {
    1 << 30
}

fn default_max_age() -> Duration {
    7 * DAY
}

/// At least 1 MiB: the store seals segments of up to 8 MiB, and keeps the active one.
fn store_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let value = size(deserializer)?;
    if value < 1 << 20 {
        return Err(serde::de::Error::custom(format!(
            "{value} bytes is too small: keep at least \"1MiB\" a role"
        )));
    }
    Ok(value)
}

/// A minute to ten years.
fn store_age<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    duration_within(deserializer, Duration::from_secs(60), 3650 * DAY)
}

/// `[logs.forward.NAME]`: one sink.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    #[serde(deserialize_with = "sink")]
    pub url: Sink,
    /// The roles whose lines go there; empty: every role.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// Where lines are forwarded, by the scheme of `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// `tcp://HOST:PORT`: syslog (RFC 5424) over TCP with octet-counting framing (RFC 6587).
    SyslogTcp(SocketAddr),
    /// `udp://HOST:PORT`: syslog (RFC 5424), a datagram a line (RFC 5426).
    SyslogUdp(SocketAddr),
    /// `http://HOST:PORT/PATH`: JSON in the shape of Loki's push API.
    Loki { addr: SocketAddr, path: String },
}

impl Sink {
    pub fn parse(url: &str) -> Result<Sink, String> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            format!("{url:?} is not a URL: write tcp://HOST:PORT, udp://HOST:PORT or http://HOST:PORT/PATH")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let addr = || -> Result<SocketAddr, String> {
            use std::net::ToSocketAddrs;
            authority
                .to_socket_addrs()
                .ok()
                .and_then(|mut addrs| addrs.next())
                .ok_or_else(|| match authority.rsplit_once(':') {
                    None => format!("{authority:?} in {url:?} has no port: write HOST:PORT"),
                    Some(_) => format!("{authority:?} in {url:?} is not HOST:PORT with a known host and a port number"),
                })
        };
        match scheme {
            "tcp" | "udp" if !path.is_empty() && path != "/" => Err(format!(
                "{url:?}: a syslog sink has no path; write {scheme}://{authority}"
            )),
            "tcp" => Ok(Sink::SyslogTcp(addr()?)),
            "udp" => Ok(Sink::SyslogUdp(addr()?)),
            "http" => Ok(Sink::Loki {
                addr: addr()?,
                path: if path.is_empty() {
                    "/loki/api/v1/push".into()
                } else {
                    path.into()
                },
            }),
            "https" => Err(format!(
                "{url:?}: https sinks are not supported yet; forward to a local relay over http, or use syslog"
            )),
            other => Err(format!(
                "{url:?}: unknown scheme {other:?}; use tcp:// or udp:// (syslog) or http:// (Loki push API)"
            )),
        }
    }
}

fn sink<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Sink, D::Error> {
    let text = String::deserialize(deserializer)?;
    Sink::parse(&text).map_err(serde::de::Error::custom)
}

impl std::fmt::Display for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::SyslogTcp(addr) => write!(f, "tcp://{addr}"),
            Sink::SyslogUdp(addr) => write!(f, "udp://{addr}"),
            Sink::Loki { addr, path } => write!(f, "http://{addr}{path}"),
        }
    }
}

/// Sink names are plain and the roles they name exist; an error carries the offset in `text`
/// of the sink's table (for its line) and the message.
pub(super) fn check_forward<T>(
    logs: &LogsConfig,
    roles: &BTreeMap<String, T>,
    text: &str,
) -> Result<(), (usize, String)> {
    for (name, sink) in &logs.forward {
        let offset = text
            .find(&format!("forward.{name}"))
            .or_else(|| text.find("[logs"))
            .unwrap_or(0);
        super::check_name(name)
            .map_err(|why| (offset, format!("[logs.forward] sink name {name:?} {why}")))?;
        if let Some(unknown) = sink.roles.iter().find(|r| !roles.contains_key(*r)) {
            let known: Vec<&str> = roles.keys().map(String::as_str).collect();
            return Err((
                offset,
                format!(
                    "[logs.forward.{name}] key `roles`: no [role.{unknown}] in this file (roles: {})",
                    known.join(", ")
                ),
            ));
        }
    }
    Ok(())
}
