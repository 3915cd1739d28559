//! How a role's instances run: the driver, the network, the user, resource limits, the
//! environment and secrets given at start (never baked), and `[network]` and `[secret.NAME]`.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// `driver = "..."`: what runs the role's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// Containers made by Phoenix itself (youki's libcontainer): the default.
    Isolating,
    /// Containers made by an OCI runtime binary (`runc`, or `runtime = PATH`).
    Runc,
    /// Plain child processes: no isolation, for development.
    Process,
}

impl DriverKind {
    pub fn name(&self) -> &'static str {
        match self {
            DriverKind::Isolating => "isolating",
            DriverKind::Runc => "runc",
            DriverKind::Process => "process",
        }
    }
}

/// `network = "..."`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Its own network namespace and an address on Phoenix's bridge (containers' default).
    Bridge,
    /// The host's network: the instance listens on loopback (the process driver's only mode).
    Host,
}

/// `resources = { cpus = 0.5, memory = "256MiB", pids = 512, nofile = 4096 }`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesConfig {
    /// CPU time in cores (0.5: half a core).
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Memory, in bytes or with a unit; over it, the instance is OOM-killed and replaced.
    #[serde(default, deserialize_with = "optional_size")]
    pub memory: Option<u64>,
    /// Processes and threads.
    #[serde(default)]
    pub pids: Option<u64>,
    /// Open files (`RLIMIT_NOFILE`).
    #[serde(default)]
    pub nofile: Option<u64>,
}

impl ResourcesConfig {
    /// Why these limits cannot work, if they cannot.
    pub(crate) fn problem(&self) -> Option<String> {
        if let Some(cpus) = self.cpus
            && !(0.01..=1024.0).contains(&cpus)
        {
            return Some(format!(
                "`cpus` must be between 0.01 and 1024 cores, not {cpus}"
            ));
        }
        if let Some(memory) = self.memory
            && memory < 4 << 20
        {
            return Some(format!(
                "`memory` must be at least 4MiB, not {memory} bytes"
            ));
        }
        if self.pids == Some(0) {
            return Some("`pids` must be at least 1".into());
        }
        if let Some(nofile) = self.nofile
            && !(16..=1 << 20).contains(&nofile)
        {
            return Some(format!(
                "`nofile` must be between 16 and 1048576, not {nofile}"
            ));
        }
        None
    }
}

/// `[network]`: the bridge containers' addresses live on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// An IPv4 network for the instances, e.g. `"10.89.16.0/20"` (default: a /20 of
    /// 10.89.0.0/16 that no interface or route of the host uses).
    #[serde(default)]
    pub subnet: Option<String>,
    /// The bridge's name (default `phx` and 8 hex digits of the state directory's path).
    #[serde(default)]
    pub bridge: Option<String>,
    /// In a cluster, other hosts reach an instance on the bridge at this host's address and
    /// port `first_host_port` + the instance's offset in the subnet (default 20000: 20002 to
    /// 24095 for a /20).
    #[serde(default)]
    pub first_host_port: Option<u16>,
}

/// Where published ports start unless `[network] first_host_port` says otherwise.
pub const DEFAULT_FIRST_HOST_PORT: u16 = 20000;

impl NetworkConfig {
    pub(crate) fn problem(&self) -> Option<String> {
        if let Some(subnet) = &self.subnet
            && let Err(why) = phoenix_driver::Subnet::parse(subnet)
        {
            return Some(format!("key `subnet`: {why}"));
        }
        if let Some(port) = self.first_host_port
            && port < 1024
        {
            return Some(format!(
                "key `first_host_port`: {port} is a privileged port: choose one from 1024 on"
            ));
        }
        if let Some(bridge) = &self.bridge
            && !(1..=15).contains(&bridge.len())
        {
            return Some(format!(
                "key `bridge`: {bridge:?} must be 1 to 15 characters (a Linux interface name)"
            ));
        }
        None
    }
}

/// `[secret.NAME]`: where a secret's value comes from when `phoenix up` starts (a file is read
/// again at each deploy). Values never enter the state, the journal or a log.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// A file (relative to the fleet file).
    #[serde(default)]
    pub file: Option<String>,
    /// An environment variable of the operator who runs `phoenix up`.
    #[serde(default)]
    pub env: Option<String>,
}

impl SecretSource {
    pub(crate) fn problem(&self) -> Option<String> {
        match (&self.file, &self.env) {
            (Some(_), Some(_)) => Some("give `file` or `env`, not both".into()),
            (None, None) => Some("needs `file = \"PATH\"` or `env = \"VARIABLE\"`".into()),
            _ => None,
        }
    }
}

/// Secret names become file names in `/run/secrets`: keep them plain.
pub(crate) fn check_secret_name(name: &str) -> Result<(), &'static str> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    match (
        name.is_empty() || name.len() > 64,
        plain,
        name.starts_with('.'),
    ) {
        (true, _, _) => Err("must be 1 to 64 characters"),
        (_, false, _) => Err("may only hold A-Z, a-z, 0-9, `_`, `-` and `.`"),
        (_, _, true) => Err("must not start with `.`"),
        _ => Ok(()),
    }
}

/// Environment names and values given to instances.
pub(crate) fn env_problem(env: &BTreeMap<String, String>) -> Option<String> {
    env.iter().find_map(|(key, value)| {
        let bad_key = key.is_empty() || key.contains('=') || key.contains('\0');
        if bad_key {
            Some(format!(
                "environment name {key:?} is empty or holds `=` or NUL"
            ))
        } else if value.contains('\0') {
            Some(format!("environment value of {key} holds a NUL byte"))
        } else {
            None
        }
    })
}

fn optional_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    super::size(deserializer).map(Some)
}
