//! `[listener.NAME]`: an edge address in front of several roles, routed by host name and
//! path, optionally over TLS (like kamal-proxy's hosts, or an nginx `server` block).
//!
//! ```toml
//! [listener.public]
//! listen = "0.0.0.0:443"
//! tls = [{ cert = "api.pem", key = "api-key.pem" }, { cert = "www.pem", key = "www-key.pem" }]
//! redirect_http = "0.0.0.0:80"    # answer plain HTTP with 308 to https://
//! hsts = "365d"                   # Strict-Transport-Security: max-age
//! routes = [
//!   { host = "api.example.test", role = "api" },
//!   { host = "*.example.test", path_prefix = "/assets", role = "static" },
//! ]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::duration_within;

/// `[listener.NAME]`, checked, its files relative to the fleet file resolved.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub listen: SocketAddr,
    /// Certificate and key pairs (PEM); the one whose names cover the name a client asks for
    /// is served, the first when none does.
    #[serde(default, deserialize_with = "one_or_many")]
    pub tls: Vec<CertFiles>,
    /// Every request to one role (instead of `routes`).
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// A plain-HTTP address that redirects every request to this listener over HTTPS.
    #[serde(default)]
    pub redirect_http: Option<SocketAddr>,
    /// `Strict-Transport-Security: max-age` on every answer (TLS listeners only).
    #[serde(default, deserialize_with = "hsts_age")]
    pub hsts: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `api.example.test` or `*.example.test`; every host when left out.
    #[serde(default)]
    pub host: Option<String>,
    /// `/assets`: this path and those under it; every path when left out.
    #[serde(default)]
    pub path_prefix: Option<String>,
    pub role: String,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<CertFiles>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(CertFiles),
        Many(Vec<CertFiles>),
    }
    match OneOrMany::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "write tls = { cert = \"FILE\", key = \"FILE\" }, or a list of such pairs",
        )
    })? {
        OneOrMany::One(pair) => Ok(vec![pair]),
        OneOrMany::Many(pairs) => Ok(pairs),
    }
}

fn hsts_age<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration_within(
        d,
        Duration::from_secs(1),
        Duration::from_secs(2 * 365 * 86_400),
    )
    .map(Some)
}

impl ListenerConfig {
    /// Checks what one listener says on its own (roles and addresses are checked with the
    /// rest of the file), and makes its files relative to `dir`.
    pub(crate) fn check(&mut self, name: &str, dir: &Path) -> Result<(), String> {
        let key = |k: &str| format!("[listener.{name}] key `{k}`");
        match (&self.role, self.routes.is_empty()) {
            (Some(_), false) => {
                return Err(format!(
                    "[listener.{name}]: give either `role` (every request to one role) or `routes`, not both"
                ));
            }
            (None, true) => {
                return Err(format!(
                    "[listener.{name}]: say where requests go: `role = \"web\"`, or `routes = [{{ host = \"...\", role = \"...\" }}]`"
                ));
            }
            _ => {}
        }
        for route in &self.routes {
            phoenix_proxy::edge::HostMatch::parse(route.host.as_deref())
                .map_err(|why| format!("{}: {why}", key("routes")))?;
            if let Some(prefix) = &route.path_prefix
                && !prefix.starts_with('/')
            {
                return Err(format!(
                    "{}: path_prefix {prefix:?} must start with /",
                    key("routes")
                ));
            }
        }
        if self.tls.is_empty() {
            if self.redirect_http.is_some() {
                return Err(format!(
                    "{}: redirects to HTTPS need `tls`",
                    key("redirect_http")
                ));
            }
            if self.hsts.is_some() {
                return Err(format!("{}: HSTS needs `tls`", key("hsts")));
            }
        }
        // Absolute, so that the same file reads the same whichever directory it was named from.
        let absolute = |path: &Path| std::path::absolute(dir.join(path)).unwrap_or(dir.join(path));
        for pair in &mut self.tls {
            pair.cert = absolute(&pair.cert);
            pair.key = absolute(&pair.key);
        }
        Ok(())
    }

    /// Every role it sends to.
    pub fn roles(&self) -> Vec<&str> {
        self.role
            .iter()
            .map(String::as_str)
            .chain(self.routes.iter().map(|r| r.role.as_str()))
            .collect()
    }

    /// Its routes as a plan shows them: `api.example.test → api, *.example.test/assets → web`.
    pub fn describe_routes(&self) -> String {
        self.route_list()
            .iter()
            .map(|r| {
                format!(
                    "{}{} → {}",
                    r.host.as_deref().unwrap_or("*"),
                    r.path_prefix.as_deref().unwrap_or(""),
                    r.role
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Its routes, the `role` shorthand as one route for every host and path.
    pub fn route_list(&self) -> Vec<RouteConfig> {
        match &self.role {
            Some(role) => vec![RouteConfig {
                host: None,
                path_prefix: None,
                role: role.clone(),
            }],
            None => self.routes.clone(),
        }
    }
}
