//! The fleet file (`phoenix.toml`): image recipes, roles and the gossip agent.
//!
//! Parsing rejects unknown keys and bad values with `file:line:column`, the table and the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use phoenix_image::Recipe;

mod agent;
mod cluster;
mod deploy;
mod hooks;
mod listener;
mod logs;
mod policy;
mod review;
mod runtime;
mod serf;
mod webhook;
pub use agent::AgentSettings;
pub use cluster::ClusterConfig;
pub use deploy::{CanaryConfig, DeployConfig, RollingConfig, Strategy};
pub use hooks::{Hook, HooksConfig};
pub use listener::{CertFiles, ListenerConfig, RouteConfig};
pub use logs::{ForwardConfig, LogRetention, LogsConfig, Sink};
pub use phoenix_check::go_duration;
pub use phoenix_gossip::address::socket_address;
pub use review::{ReviewCopy, review_copy};
pub use runtime::{
    DEFAULT_FIRST_HOST_PORT, DriverKind, NetworkConfig, NetworkMode, ResourcesConfig, SecretSource,
};
use serde::{Deserialize, Deserializer};
pub use serf::{SerfAgent, SerfConfig, SerfConfigError};
use toml::Spanned;
pub use webhook::{Endpoint, WebhookConfig};

/// An invalid or unreadable fleet file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read fleet file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

/// A parsed, validated fleet file.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetFile {
    pub path: PathBuf,
    /// `copy` sources are relative to this directory.
    pub dir: PathBuf,
    pub images: BTreeMap<String, Recipe>,
    pub roles: BTreeMap<String, RoleConfig>,
    /// `[agent]`, when the file has one.
    pub agent: Option<AgentSettings>,
    /// `[network]`: the bridge of containers with their own network.
    pub network: NetworkConfig,
    /// `[secret.NAME]`: where each secret's value comes from.
    pub secrets: BTreeMap<String, SecretSource>,
    /// `[logs]`: the log store's default retention and the forwarding sinks.
    pub logs: LogsConfig,
    /// `[cluster]`: the fleet spans hosts, its state in etcd (`None`: one machine, SQLite).
    pub cluster: Option<ClusterConfig>,
    /// `[hooks]`: commands run at points of every deploy.
    pub hooks: HooksConfig,
    /// `[webhook.NAME]`: journal events POSTed to URLs.
    pub webhooks: BTreeMap<String, WebhookConfig>,
    /// `[listener.NAME]`: edge addresses routing to roles by host and path, TLS optional.
    pub listeners: BTreeMap<String, ListenerConfig>,
}

/// One `[role.NAME]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct RoleConfig {
    /// The `[image.NAME]` recipe the role runs.
    pub image: String,
    pub instances: u32,
    /// Where the role's proxy frontend listens.
    pub listen: SocketAddr,
    /// Grace between SIGTERM and SIGKILL when an instance is stopped.
    pub stop_timeout: Duration,
    pub health: HealthConfig,
    pub deploy: DeployConfig,
    pub proxy: ProxySettings,
    /// How often the live generation's root is compared with its image's file manifest; a
    /// drifted root is unpacked again and its instances replaced. `None`: never.
    pub drift_check: Option<Duration>,
    /// `[role.NAME.autoscale]`, when the role scales by itself.
    pub autoscale: Option<crate::AutoscaleConfig>,
    /// Instances older than this are replaced, one at a time, new before old.
    pub max_age: Option<Duration>,
    /// `[role.NAME.chaos]`: random kills, when the role opts in.
    pub chaos: Option<crate::ChaosConfig>,
    /// How the instances run: driver, network, user, limits, environment, secrets.
    pub run: RunConfig,
    /// `allow_from` / `allow_cidrs`: who may reach the role; `None`: everyone.
    pub guard: Option<phoenix_driver::Guard>,
    /// How much of the role's output the log store keeps (`logs`, else `[logs]`).
    pub logs: LogRetention,
    /// `hosts = { tag = "zone=a" }`: the hosts of a cluster this role may run on.
    pub hosts: crate::cluster::HostConstraint,
}

/// The keys of `[role.NAME]` that say how its instances run; all given at start, none baked.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// What runs the instances (default: the isolating driver).
    pub driver: DriverKind,
    /// True when the file names the driver: then it is required, not merely preferred.
    pub driver_explicit: bool,
    /// The OCI runtime binary of `driver = "runc"` (default: `runc` on the PATH).
    pub runtime: Option<String>,
    pub network: NetworkMode,
    /// The port instances listen on (`PORT`); default: the image's lowest exposed TCP port,
    /// else 8080, on the bridge; a free one on the host's network.
    pub port: Option<u16>,
    /// Who the instances run as, overriding the image's `User`.
    pub user: Option<String>,
    /// Run instances as real host root, without a user namespace.
    pub allow_root: bool,
    pub resources: ResourcesConfig,
    /// `[role.NAME.env]`: given at start, never baked into the image.
    pub env: BTreeMap<String, String>,
    /// Names of `[secret.NAME]` tables, given as files in `/run/secrets`.
    pub secrets: Vec<String>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            driver: DriverKind::Isolating,
            driver_explicit: false,
            runtime: None,
            network: NetworkMode::Bridge,
            port: None,
            user: None,
            allow_root: false,
            resources: ResourcesConfig::default(),
            env: BTreeMap::new(),
            secrets: Vec::new(),
        }
    }
}

/// `[role.NAME.health]`: the active HTTP health check.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `http` (GET `path`, 2xx or 3xx passes) or `tcp` (a connection is accepted). Default:
    /// `http`, or `tcp` for roles in TCP mode.
    #[serde(default)]
    pub check: Option<CheckKind>,
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_interval", deserialize_with = "period")]
    pub interval: Duration,
    #[serde(default = "default_health_timeout", deserialize_with = "timeout")]
    pub timeout: Duration,
    /// Consecutive passes before an instance counts as healthy.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures before a healthy instance counts as unhealthy.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

/// How an instance's health is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Http,
    Tcp,
}

/// `[role.NAME.proxy]`: the role's frontend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// `http` (default) or `tcp` (layer 4: bytes spliced both ways).
    #[serde(default)]
    pub mode: ProxyMode,
    #[serde(default = "default_connect_timeout", deserialize_with = "timeout")]
    pub connect_timeout: Duration,
    /// How long a backend may take to answer with a response head (then 504).
    #[serde(default = "default_request_timeout", deserialize_with = "timeout")]
    pub request_timeout: Duration,
    /// How long a client connection may idle between requests (or dawdle over headers).
    #[serde(default = "default_idle_timeout", deserialize_with = "timeout")]
    pub idle_timeout: Duration,
    /// The largest request body, in bytes or with a unit (`"16MiB"`); larger ones get 413.
    #[serde(default = "default_max_body", deserialize_with = "size")]
    pub max_body: u64,
    /// How long a client may take over a request head it started (then 408).
    #[serde(default = "default_request_head_timeout", deserialize_with = "timeout")]
    pub request_head_timeout: Duration,
    /// Client connections served at once (default: sized to the descriptor limit).
    #[serde(default, deserialize_with = "optional_connections")]
    pub max_connections: Option<usize>,
    /// Client connections one address may hold at once (default: no limit).
    #[serde(default, deserialize_with = "optional_connections")]
    pub max_connections_per_client: Option<usize>,
}

/// A connection count: 1 to a million.
fn optional_connections<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<usize>, D::Error> {
    let value = u64::deserialize(deserializer)?;
    if !(1..=1_000_000).contains(&value) {
        return Err(serde::de::Error::custom(format!(
            "{value} is out of range: write between 1 and 1000000"
        )));
    }
    Ok(Some(value as usize))
}

fn default_request_head_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    #[default]
    Http,
    Tcp,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            mode: ProxyMode::Http,
            connect_timeout: default_connect_timeout(),
            request_timeout: default_request_timeout(),
            idle_timeout: default_idle_timeout(),
            max_body: default_max_body(),
            request_head_timeout: default_request_head_timeout(),
            max_connections: None,
            max_connections_per_client: None,
        }
    }
}

impl ProxySettings {
    /// The proxy crate's view of these settings.
    pub fn to_proxy_config(&self) -> phoenix_proxy::ProxyConfig {
        phoenix_proxy::ProxyConfig {
            mode: match self.mode {
                ProxyMode::Http => phoenix_proxy::Mode::Http,
                ProxyMode::Tcp => phoenix_proxy::Mode::Tcp,
            },
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            idle_timeout: self.idle_timeout,
            max_body: self.max_body,
            request_head_timeout: self.request_head_timeout,
            max_connections: self
                .max_connections
                .unwrap_or_else(phoenix_proxy::default_max_connections),
            max_connections_per_client: self.max_connections_per_client,
        }
    }
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_body() -> u64 {
    16 << 20
}

fn default_health_path() -> String {
    "/healthz".into()
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_unhealthy_threshold() -> u32 {
    3
}
fn default_stop_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            check: None,
            path: default_health_path(),
            interval: default_interval(),
            timeout: default_health_timeout(),
            healthy_threshold: default_healthy_threshold(),
            unhealthy_threshold: default_unhealthy_threshold(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    #[serde(default)]
    image: BTreeMap<Spanned<String>, Recipe>,
    #[serde(default)]
    role: BTreeMap<Spanned<String>, RawRole>,
    #[serde(default)]
    agent: Option<Spanned<AgentSettings>>,
    #[serde(default)]
    network: Option<Spanned<NetworkConfig>>,
    #[serde(default)]
    secret: BTreeMap<Spanned<String>, Spanned<SecretSource>>,
    #[serde(default)]
    logs: Option<LogsConfig>,
    #[serde(default)]
    cluster: Option<Spanned<ClusterConfig>>,
    #[serde(default)]
    listener: BTreeMap<Spanned<String>, Spanned<ListenerConfig>>,
    #[serde(default)]
    hooks: Option<Spanned<HooksConfig>>,
    #[serde(default)]
    webhook: BTreeMap<Spanned<String>, Spanned<WebhookConfig>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    image: Spanned<String>,
    #[serde(default = "one")]
    instances: Spanned<u32>,
    listen: Spanned<SocketAddr>,
    #[serde(default = "default_stop_timeout", deserialize_with = "grace")]
    stop_timeout: Duration,
    #[serde(default = "default_health")]
    health: Spanned<HealthConfig>,
    #[serde(default)]
    deploy: Option<Spanned<DeployConfig>>,
    #[serde(default)]
    proxy: ProxySettings,
    #[serde(default, deserialize_with = "optional_period")]
    drift_check: Option<Duration>,
    #[serde(default)]
    autoscale: Option<crate::AutoscaleConfig>,
    #[serde(default, deserialize_with = "optional_lifetime")]
    max_age: Option<Duration>,
    #[serde(default)]
    chaos: Option<crate::ChaosConfig>,
    #[serde(default)]
    driver: Option<DriverKind>,
    #[serde(default)]
    runtime: Option<Spanned<String>>,
    #[serde(default)]
    network: Option<Spanned<NetworkMode>>,
    #[serde(default)]
    port: Option<Spanned<u16>>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    allow_root: bool,
    #[serde(default)]
    resources: Option<Spanned<ResourcesConfig>>,
    #[serde(default)]
    env: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    secrets: Vec<Spanned<String>>,
    #[serde(default)]
    allow_from: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    allow_cidrs: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    logs: Option<LogRetention>,
    #[serde(default)]
    hosts: Option<Spanned<cluster::RawHosts>>,
}

fn one() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

fn default_health() -> Spanned<HealthConfig> {
    Spanned::new(0..0, HealthConfig::default())
}

/// The largest role this version runs on one host.
const MAX_INSTANCES: u32 = 256;

impl FleetFile {
    /// Reads and validates the fleet file at `path`.
    pub fn load(path: &Path) -> Result<FleetFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        FleetFile::parse(path, &text)
    }

    /// Parses `text` as the fleet file at `path`.
    pub fn parse(path: &Path, text: &str) -> Result<FleetFile, ConfigError> {
        let at = |span: std::ops::Range<usize>, message: String| {
            invalid(path, text, span.start, message)
        };
        let raw: RawFleet = toml::from_str(text)
            .map_err(|e| at(e.span().unwrap_or(0..0), e.message().to_string()))?;
        let mut images = BTreeMap::new();
        for (name, recipe) in raw.image {
            check_name(name.get_ref()).map_err(|why| {
                at(
                    name.span(),
                    format!("image name {:?} {why}", name.get_ref()),
                )
            })?;
            if let Some(tag) = &recipe.tag {
                phoenix_image::check_tag(tag).map_err(|why| {
                    at(
                        name.span(),
                        format!("[image.{}] key `tag`: {why}", name.get_ref()),
                    )
                })?;
            }
            images.insert(name.into_inner(), recipe);
        }
        let mut secrets = BTreeMap::new();
        for (name, source) in raw.secret {
            runtime::check_secret_name(name.get_ref()).map_err(|why| {
                at(
                    name.span(),
                    format!("secret name {:?} {why}", name.get_ref()),
                )
            })?;
            if let Some(problem) = source.get_ref().problem() {
                return Err(at(
                    source.span(),
                    format!("[secret.{}]: {problem}", name.get_ref()),
                ));
            }
            secrets.insert(name.into_inner(), source.into_inner());
        }
        let secret_names: Vec<String> = secrets.keys().cloned().collect();
        let network = match raw.network {
            Some(network) => match network.get_ref().problem() {
                Some(problem) => return Err(at(network.span(), format!("[network] {problem}"))),
                None => network.into_inner(),
            },
            None => NetworkConfig::default(),
        };
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let cluster = match raw.cluster {
            Some(cluster) => {
                let span = cluster.span();
                let mut cluster = cluster.into_inner();
                cluster.check(&dir).map_err(|why| at(span, why))?;
                Some(cluster)
            }
            None => None,
        };
        let logs = raw.logs.unwrap_or_default();
        let mut roles = BTreeMap::new();
        let mut guards = Vec::new();
        let mut listeners: Vec<(String, SocketAddr)> = Vec::new();
        for (name, role) in raw.role {
            check_name(name.get_ref())
                .map_err(|why| at(name.span(), format!("role name {:?} {why}", name.get_ref())))?;
            let role_name = name.get_ref().clone();
            if !images.contains_key(role.image.get_ref()) {
                let known: Vec<_> = images.keys().map(String::as_str).collect();
                return Err(at(
                    role.image.span(),
                    format!(
                        "[role.{role_name}] key `image`: no [image.{}] in this file (images: {})",
                        role.image.get_ref(),
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
            let instances = *role.instances.get_ref();
            if !(1..=MAX_INSTANCES).contains(&instances) {
                return Err(at(
                    role.instances.span(),
                    format!(
                        "[role.{role_name}] key `instances`: must be between 1 and {MAX_INSTANCES}, not {instances}"
                    ),
                ));
            }
            let listen = *role.listen.get_ref();
            if let Some((other, theirs)) = listeners
                .iter()
                .find(|(_, addr)| same_listener(*addr, listen))
            {
                return Err(at(
                    role.listen.span(),
                    format!(
                        "[role.{role_name}] key `listen`: {listen} collides with [role.{other}] listen = \"{theirs}\"; give each role its own port"
                    ),
                ));
            }
            listeners.push((role_name.clone(), listen));
            let runtime = runtime_settings(&role, &role_name, &secret_names, &at)?;
            let health = role.health.get_ref();
            if health.healthy_threshold == 0
                || health.unhealthy_threshold == 0
                || !health.path.starts_with('/')
            {
                return Err(at(
                    role.health.span(),
                    format!(
                        "[role.{role_name}.health]: thresholds must be at least 1 and `path` must start with `/`"
                    ),
                ));
            }
            if let Some(guard) = policy::read(
                &role_name,
                role.allow_from.clone(),
                role.allow_cidrs.clone(),
                &at,
            )? {
                guards.push(guard);
            }
            let hosts = match &role.hosts {
                Some(hosts) => hosts
                    .get_ref()
                    .constraint(&role_name)
                    .map_err(|why| at(hosts.span(), why))?,
                None => Default::default(),
            };
            let deploy = match role.deploy {
                Some(deploy) => {
                    let span = deploy.span();
                    let mut deploy = deploy.into_inner();
                    deploy.load_test =
                        check_load_test(&dir, deploy.load_test, cluster.is_some())
                            .map_err(|why| at(span, format!("[role.{role_name}.deploy] {why}")))?;
                    deploy
                }
                None => DeployConfig::default(),
            };
            let mut health = role.health.into_inner();
            if health.check.is_none() && role.proxy.mode == ProxyMode::Tcp {
                health.check = Some(CheckKind::Tcp);
            }
            let config = RoleConfig {
                image: role.image.into_inner(),
                instances,
                listen,
                stop_timeout: role.stop_timeout,
                health,
                deploy,
                proxy: role.proxy,
                drift_check: role.drift_check,
                autoscale: role.autoscale,
                max_age: role.max_age,
                chaos: role.chaos,
                run: RunConfig {
                    driver: runtime.driver,
                    driver_explicit: role.driver.is_some(),
                    runtime: role.runtime.map(Spanned::into_inner),
                    network: runtime.network,
                    port: role.port.map(Spanned::into_inner),
                    user: role.user,
                    allow_root: role.allow_root,
                    resources: role.resources.map(Spanned::into_inner).unwrap_or_default(),
                    env: role.env.map(Spanned::into_inner).unwrap_or_default(),
                    secrets: role.secrets.into_iter().map(Spanned::into_inner).collect(),
                },
                guard: None,
                logs: role.logs.unwrap_or(logs.keep()),
                hosts,
            };
            roles.insert(name.into_inner(), config);
        }
        policy::apply(guards, &mut roles, &at)?;
        logs::check_forward(&logs, &roles, text)
            .map_err(|(offset, why)| invalid(path, text, offset, why))?;
        let agent = match raw.agent {
            Some(agent) => match agent.get_ref().problem() {
                Some(problem) => return Err(at(agent.span(), problem)),
                None => {
                    let span = agent.span();
                    let mut agent = agent.into_inner();
                    agent.load_key_file(&dir).map_err(|why| at(span, why))?;
                    Some(agent)
                }
            },
            None => None,
        };
        let listeners = check_listeners(raw.listener, &roles, &dir, &at)?;
        let hooks = match raw.hooks {
            Some(hooks) => {
                let span = hooks.span();
                let mut hooks = hooks.into_inner();
                hooks.check(&dir).map_err(|why| at(span.clone(), why))?;
                if cluster.is_some() && !hooks.is_empty() {
                    return Err(at(
                        span,
                        "[hooks] run on one machine only for now: remove them or [cluster]".into(),
                    ));
                }
                hooks
            }
            None => HooksConfig::default(),
        };
        let webhooks = check_webhooks(raw.webhook, cluster.is_some(), &dir, &at)?;
        Ok(FleetFile {
            hooks,
            webhooks,
            cluster,
            listeners,
            path: path.to_path_buf(),
            dir,
            images,
            roles,
            agent,
            network,
            secrets,
            logs,
        })
    }
}

/// A role's `load_test`: a scenario beside the fleet file that reads and checks; one machine
/// only for now.
fn check_load_test(
    dir: &Path,
    file: Option<PathBuf>,
    clustered: bool,
) -> Result<Option<PathBuf>, String> {
    let Some(file) = file else {
        return Ok(None);
    };
    if clustered {
        return Err("`load_test` runs on one machine only for now: remove it or [cluster]".into());
    }
    let path = dir.join(&file);
    phoenix_load::Scenario::load(&path).map_err(|e| format!("`load_test`: {e}"))?;
    Ok(Some(path))
}

/// Checks every `[listener.NAME]`: its own keys, that its roles exist, and that no two
/// listeners or roles share an address.
fn check_webhooks(
    raw: BTreeMap<Spanned<String>, Spanned<WebhookConfig>>,
    in_cluster: bool,
    dir: &Path,
    at: &dyn Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<BTreeMap<String, WebhookConfig>, ConfigError> {
    let mut webhooks = BTreeMap::new();
    for (name, webhook) in raw {
        check_name(name.get_ref()).map_err(|why| {
            at(
                name.span(),
                format!("webhook name {:?} {why}", name.get_ref()),
            )
        })?;
        let span = webhook.span();
        if in_cluster {
            return Err(at(
                span,
                "[webhook] is sent from one machine only for now: remove it or [cluster]".into(),
            ));
        }
        let mut webhook = webhook.into_inner();
        webhook.check(dir).map_err(|why| at(span, why))?;
        webhooks.insert(name.into_inner(), webhook);
    }
    Ok(webhooks)
}

fn check_listeners(
    raw: BTreeMap<Spanned<String>, Spanned<ListenerConfig>>,
    roles: &BTreeMap<String, RoleConfig>,
    dir: &Path,
    at: &dyn Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<BTreeMap<String, ListenerConfig>, ConfigError> {
    let mut listeners = BTreeMap::new();
    let mut taken: Vec<(SocketAddr, String)> = roles
        .iter()
        .filter(|(_, r)| r.listen.port() != 0)
        .map(|(name, r)| (r.listen, format!("role {name}")))
        .collect();
    for (name, listener) in raw {
        check_name(name.get_ref()).map_err(|why| {
            at(
                name.span(),
                format!("listener name {:?} {why}", name.get_ref()),
            )
        })?;
        let span = listener.span();
        let name = name.into_inner();
        let mut listener = listener.into_inner();
        listener
            .check(&name, dir)
            .map_err(|why| at(span.clone(), why))?;
        if let Some(role) = listener
            .roles()
            .into_iter()
            .find(|r| !roles.contains_key(*r))
        {
            let known: Vec<&str> = roles.keys().map(String::as_str).collect();
            return Err(at(
                span,
                format!(
                    "[listener.{name}]: no role {role:?} in this file (roles: {})",
                    known.join(", ")
                ),
            ));
        }
        for addr in std::iter::once(listener.listen).chain(listener.redirect_http) {
            if let Some((_, owner)) = taken.iter().find(|(a, _)| a.port() != 0 && *a == addr) {
                return Err(at(
                    span,
                    format!("[listener.{name}]: {addr} is already {owner}'s address"),
                ));
            }
            taken.push((addr, format!("listener {name}")));
        }
        listeners.insert(name, listener);
    }
    Ok(listeners)
}

/// The driver and network a role resolves to, once its runtime keys are checked.
struct RuntimeSettings {
    driver: DriverKind,
    network: NetworkMode,
}

/// Checks a role's driver, network, port, limits, environment and secrets; errors point at the
/// offending key.
fn runtime_settings(
    role: &RawRole,
    name: &str,
    secret_names: &[String],
    at: &dyn Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<RuntimeSettings, ConfigError> {
    let driver = role.driver.unwrap_or(DriverKind::Isolating);
    let network = match (&role.network, driver) {
        (Some(mode), DriverKind::Process) if *mode.get_ref() == NetworkMode::Bridge => {
            return Err(at(
                mode.span(),
                format!(
                    "[role.{name}] key `network`: the process driver runs in the host's network;                      use network = \"host\" or another driver"
                ),
            ));
        }
        (Some(mode), _) => *mode.get_ref(),
        (None, DriverKind::Process) => NetworkMode::Host,
        (None, _) => NetworkMode::Bridge,
    };
    if let Some(runtime) = &role.runtime
        && driver != DriverKind::Runc
    {
        return Err(at(
            runtime.span(),
            format!(
                "[role.{name}] key `runtime`: only `driver = \"runc\"` runs an OCI runtime binary"
            ),
        ));
    }
    if let Some(port) = &role.port
        && *port.get_ref() == 0
    {
        return Err(at(
            port.span(),
            format!("[role.{name}] key `port`: the port instances listen on cannot be 0"),
        ));
    }
    if let Some(resources) = &role.resources
        && let Some(problem) = resources.get_ref().problem()
    {
        return Err(at(
            resources.span(),
            format!("[role.{name}] key `resources`: {problem}"),
        ));
    }
    if let Some(env) = &role.env
        && let Some(problem) = runtime::env_problem(env.get_ref())
    {
        return Err(at(env.span(), format!("[role.{name}.env]: {problem}")));
    }
    for secret in &role.secrets {
        if !secret_names.contains(secret.get_ref()) {
            return Err(at(
                secret.span(),
                format!(
                    "[role.{name}] key `secrets`: no [secret.{}] in this file (secrets: {})",
                    secret.get_ref(),
                    if secret_names.is_empty() {
                        "none".to_string()
                    } else {
                        secret_names.join(", ")
                    }
                ),
            ));
        }
    }
    Ok(RuntimeSettings { driver, network })
}

/// Two listen addresses that cannot both be bound: one port, and one address or either the
/// unspecified one. Port 0 asks for any free port, so it never collides.
/// A secret kept in a file beside the fleet file: it must be readable by its owner only.
/// `what` names the key, for errors.
pub(crate) fn read_private_file(dir: &Path, file: &Path, what: &str) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join(file);
    let shown = path.display();
    let metadata = std::fs::metadata(&path).map_err(|e| format!("{what}: {shown}: {e}"))?;
    if metadata.mode() & 0o077 != 0 {
        return Err(format!(
            "{what}: {shown} can be read by other users (mode {:o}): chmod 600 {shown}",
            metadata.mode() & 0o7777
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{what}: {shown}: {e}"))?;
    Ok(text.trim().to_string())
}

fn same_listener(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Names become parts of instance names and paths: keep them plain.
fn check_name(name: &str) -> Result<(), &'static str> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    match (name.is_empty(), plain, name.len() > 40) {
        (true, _, _) => Err("is empty"),
        (_, false, _) => Err("may only hold a-z, 0-9 and `-`"),
        (_, _, true) => Err("is longer than 40 characters"),
        _ => Ok(()),
    }
}

/// An error at byte `offset` of `text`, with the enclosing table and key when they can be found.
fn invalid(path: &Path, text: &str, offset: usize, message: String) -> ConfigError {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = text[line_start..offset].chars().count() + 1;
    let line_text = text[line_start..].lines().next().unwrap_or("");
    let header = line_text.trim();
    if header.starts_with('[') && message == "duplicate key" {
        // A table written twice: name it whole, and where it was first.
        let first = text[..line_start]
            .lines()
            .position(|l| l.trim() == header)
            .map(|i| format!(" (first at line {})", i + 1))
            .unwrap_or_default();
        return ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            column,
            message: format!("{header} is defined twice{first}: write its keys in one table"),
        };
    }
    let mut context = String::new();
    if !message.starts_with('[') {
        if let Some(table) = before
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
        {
            context.push_str(table);
            context.push(' ');
        }
        if let Some((key, _)) = line_text.split_once('=')
            && !line_text.trim_start().starts_with('[')
        {
            context.push_str(&format!("key `{}`", key.trim()));
        }
    }
    let message = if context.is_empty() {
        message
    } else {
        format!("{}: {message}", context.trim_end())
    };
    ConfigError::Invalid {
        path: path.to_path_buf(),
        line,
        column,
        message,
    }
}

/// Parses a duration string: an integer and a unit (`ms`, `s`, `m`, `h`, `d`), e.g. `"500ms"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &text[digits.len()..];
    let value: u64 = digits.parse().map_err(|_| bad_duration(text))?;
    let millis = match unit {
        "ms" => value,
        "s" => value.saturating_mul(1_000),
        "m" => value.saturating_mul(60_000),
        "h" => value.saturating_mul(3_600_000),
        "d" => value.saturating_mul(86_400_000),
        _ => return Err(bad_duration(text)),
    };
    Ok(Duration::from_millis(millis))
}

fn bad_duration(text: &str) -> String {
    format!(
        "invalid duration {text:?}: write a whole number and a unit, like \"500ms\", \"2s\", \"1m\", \"1h\" or \"7d\""
    )
}

/// Parses a byte size: a whole number of bytes, or a number and `B`, `KiB`, `MiB` or `GiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &text[digits.len()..];
    let value: u64 = digits.parse().map_err(|_| bad_size(text))?;
    let scale = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad_size(text)),
    };
    value.checked_mul(scale).ok_or_else(|| bad_size(text))
}

fn bad_size(text: &str) -> String {
    format!(
        "invalid size {text:?}: write a whole number of bytes, or a number and KiB, MiB or GiB, like \"16MiB\""
    )
}

pub(crate) fn size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(deserializer)? {
        Size::Bytes(bytes) => Ok(bytes),
        Size::Text(text) => parse_size(&text).map_err(serde::de::Error::custom),
    }
}

// Every duration in the fleet file has a range: outside it a value cannot work (a zero
// interval spins a worker, a timeout of centuries overflows the clock), so it is refused where
// it is written and the error points at it.
pub(crate) const DAY: Duration = Duration::from_secs(86_400);

/// How often something repeats (health checks, autoscaler ticks, drift checks): 10ms to a day.
pub(crate) fn period<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    duration_within(deserializer, Duration::from_millis(10), DAY)
}

/// How long to wait for an answer (a probe, a connection, a healthy generation): 1ms to a day.
pub(crate) fn timeout<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    duration_within(deserializer, Duration::from_millis(1), DAY)
}

/// How long to wait before acting (stop grace, drain, warm-up, stabilization): 0 to a day.
pub(crate) fn grace<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    duration_within(deserializer, Duration::ZERO, DAY)
}

fn optional_period<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    period(deserializer).map(Some)
}

/// An instance's longest life (`max_age`): a second to a year.
fn optional_lifetime<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    duration_within(deserializer, Duration::from_secs(1), 365 * DAY).map(Some)
}

pub(crate) fn duration_within<'de, D: Deserializer<'de>>(
    deserializer: D,
    min: Duration,
    max: Duration,
) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    let value = parse_duration(&text).map_err(serde::de::Error::custom)?;
    if value < min || value > max {
        return Err(serde::de::Error::custom(format!(
            "{text:?} is out of range: write between {} and {}",
            show_duration(min),
            show_duration(max)
        )));
    }
    Ok(value)
}

/// A duration as the fleet file writes it, in its largest whole unit.
fn show_duration(value: Duration) -> String {
    let ms = value.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let units = [(3_600_000, "h"), (60_000, "m"), (1_000, "s")];
    for (size, unit) in units {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests;
