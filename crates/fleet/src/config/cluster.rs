//! `[cluster]`: a fleet across hosts, its desired state in etcd. Without the table, `phoenix
//! up` is the one-machine default (SQLite, nothing else).
//!
//! ```toml
//! [cluster]
//! etcd = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]
//! prefix = "/phoenix/prod/"     # every key of this fleet is under it
//! lease = "3s"                  # a dead controller or host is noticed within this
//! ca = "etcd-ca.pem"            # for https:// endpoints; cert + key for client certificates
//! user = "phoenix"              # etcd authentication; the password in a 0600 file
//! password_file = "etcd.password"
//! ```
//!
//! A role keeps to some hosts with `[role.X] hosts = { tag = "zone=a" }` (or a list of tags,
//! all of which must match a host's `--host-tag`s).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{duration_within, read_private_file};

/// `[cluster]`, checked, with its files read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Client URLs of the etcd members.
    pub etcd: Vec<String>,
    /// The key prefix of this fleet, ending in `/`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Time to live of the controller's and each host's etcd lease.
    #[serde(default = "default_lease", deserialize_with = "lease")]
    pub lease: Duration,
    /// How long one request to one etcd member may take before the next is tried.
    #[serde(
        default = "default_request_timeout",
        deserialize_with = "request_timeout"
    )]
    pub request_timeout: Duration,
    /// The CA that signed the etcd members' certificates (for `https://`).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// A client certificate and its key, when etcd asks for one.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// etcd's user, with `password_file`.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Read from `password_file`.
    #[serde(skip)]
    pub password: Option<String>,
}

fn default_prefix() -> String {
    "/phoenix/".into()
}
fn default_lease() -> Duration {
    Duration::from_secs(3)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(2)
}

fn lease<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    // etcd refuses leases shorter than 1.5 election timeouts; 2 s is safe with its defaults.
    duration_within(d, Duration::from_secs(2), Duration::from_secs(60))
}

fn request_timeout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration_within(d, Duration::from_millis(100), Duration::from_secs(60))
}

impl ClusterConfig {
    /// What is wrong with these settings, naming the key; files are relative to `dir`.
    pub(super) fn check(&mut self, dir: &Path) -> Result<(), String> {
        if self.etcd.is_empty() {
            return Err("[cluster] key `etcd`: list at least one etcd client URL, like \"http://10.0.0.1:2379\"".into());
        }
        for url in &self.etcd {
            phoenix_store::etcd::Endpoint::parse(url)
                .map_err(|e| format!("[cluster] key `etcd`: {e}"))?;
        }
        if !self.prefix.starts_with('/') || self.prefix.contains("//") {
            return Err(format!(
                "[cluster] key `prefix`: {:?} must start with / and have no empty part, like \"/phoenix/prod/\"",
                self.prefix
            ));
        }
        if !self.prefix.ends_with('/') {
            self.prefix.push('/');
        }
        let https = self.etcd.iter().any(|u| u.starts_with("https://"));
        if https && self.ca.is_none() {
            return Err("[cluster] key `ca`: the etcd endpoints are https://, so name the CA file that signed their certificates".into());
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err("[cluster] keys `cert` and `key`: give both (a client certificate and its private key) or neither".into());
        }
        if (self.cert.is_some() || self.ca.is_some()) && !https {
            return Err(
                "[cluster] keys `ca`/`cert`: TLS settings need https:// etcd endpoints".into(),
            );
        }
        for file in [&mut self.ca, &mut self.cert, &mut self.key]
            .into_iter()
            .flatten()
        {
            *file = dir.join(&*file);
        }
        let clear_text = self.etcd.iter().find(|url| {
            phoenix_store::etcd::Endpoint::parse(url).is_ok_and(|e| !e.tls && !is_loopback(&e.host))
        });
        if let (Some(_), Some(url)) = (&self.user, clear_text) {
            return Err(format!(
                "[cluster] key `user`: the password would cross the network in clear text to {url}: use https:// endpoints (with `ca`) or client certificates"
            ));
        }
        match (&self.user, &self.password_file) {
            (Some(_), Some(file)) => {
                let password = read_private_file(dir, file, "[cluster] key `password_file`")?;
                self.password = Some(password);
            }
            (Some(_), None) => return Err(
                "[cluster] key `user`: also give `password_file`, a 0600 file holding the password"
                    .into(),
            ),
            (None, Some(_)) => return Err("[cluster] key `password_file`: also give `user`".into()),
            (None, None) => {}
        }
        Ok(())
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `[role.X] hosts = { tag = "zone=a" }` or `{ tag = ["zone=a", "disk=ssd"] }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHosts {
    tag: OneOrMany,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl RawHosts {
    pub(super) fn constraint(&self, role: &str) -> Result<crate::cluster::HostConstraint, String> {
        let tags = match &self.tag {
            OneOrMany::One(tag) => vec![tag.clone()],
            OneOrMany::Many(tags) => tags.clone(),
        };
        crate::cluster::HostConstraint::parse(&tags)
            .map_err(|why| format!("[role.{role}] key `hosts`: {why}"))
    }
}
