//! Serf's agent configuration: the JSON of `serf agent -config-file/-config-dir` and the
//! values of its flags, merged in Serf's order (defaults, then every file in the order given,
//! a directory's `*.json` files in lexical order, then the command line), and resolved into
//! the settings of a Phoenix agent. Options Phoenix cannot honour are refused by name, never
//! ignored.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use phoenix_check::go_duration;
use phoenix_gossip::address::{DEFAULT_PORT, socket_address};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::AgentSettings;

#[derive(Debug, thiserror::Error)]
pub enum SerfConfigError {
    #[error("Error reading '{}': {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Error decoding '{}': {source}", path.display())]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("option `{option}` is not supported by phoenix agent: {why}")]
    Unsupported { option: &'static str, why: String },
    #[error("option `{option}`: {message}")]
    Invalid {
        option: &'static str,
        message: String,
    },
    #[error("option `{option}`: {source}")]
    File {
        option: &'static str,
        #[source]
        source: phoenix_gossip::persist::FileError,
    },
}

fn invalid(option: &'static str, message: impl Into<String>) -> SerfConfigError {
    SerfConfigError::Invalid {
        option,
        message: message.into(),
    }
}

/// The wire protocol `protocol` names.
fn protocol(text: &str) -> Result<phoenix_gossip::Protocol, SerfConfigError> {
    match text {
        "" | "0" | "phoenix" => Ok(phoenix_gossip::Protocol::Phoenix),
        "serf" => Ok(phoenix_gossip::Protocol::Serf),
        other => Err(invalid(
            "protocol",
            format!("unknown protocol {other:?}: expected \"serf\" or \"phoenix\""),
        )),
    }
}

/// Serf's integer, or a name: kept as text.
fn number_or_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::Number(n) => Ok(n.to_string()),
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Null => Ok(String::new()),
        other => Err(serde::de::Error::custom(format!(
            "expected a number or a string, got {other}"
        ))),
    }
}

fn unsupported(option: &'static str, why: impl Into<String>) -> SerfConfigError {
    SerfConfigError::Unsupported {
        option,
        why: why.into(),
    }
}

/// One layer of Serf's configuration: a file, or the command line. Empty values (`""`, `0`,
/// `false`) mean "not set", as in Serf's `MergeConfig`.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SerfConfig {
    pub node_name: String,
    pub role: String,
    pub disable_coordinates: bool,
    pub tags: BTreeMap<String, String>,
    pub tags_file: String,
    pub bind: String,
    pub advertise: String,
    pub encrypt_key: String,
    pub keyring_file: String,
    pub log_level: String,
    pub rpc_addr: String,
    pub rpc_auth: String,
    /// Serf's protocol version (an integer), or Phoenix's choice of wire: `"serf"` speaks
    /// memberlist's and Serf's own protocol, `"phoenix"` (the default) Phoenix's gossip.
    #[serde(deserialize_with = "number_or_text")]
    pub protocol: String,
    pub replay_on_join: bool,
    pub query_response_size_limit: i64,
    pub query_size_limit: i64,
    pub user_event_size_limit: i64,
    pub start_join: Vec<String>,
    pub event_handlers: Vec<String>,
    pub profile: String,
    pub snapshot_path: String,
    pub leave_on_terminate: bool,
    pub skip_leave_on_interrupt: bool,
    pub discover: String,
    pub mdns: Option<serde_json::Value>,
    pub interface: String,
    #[serde(deserialize_with = "go_duration_field")]
    pub reconnect_interval: Option<Duration>,
    #[serde(deserialize_with = "go_duration_field")]
    pub reconnect_timeout: Option<Duration>,
    #[serde(deserialize_with = "go_duration_field")]
    pub tombstone_timeout: Option<Duration>,
    pub disable_name_resolution: bool,
    pub enable_syslog: bool,
    pub syslog_facility: String,
    pub retry_join: Vec<String>,
    pub retry_max_attempts: i64,
    #[serde(deserialize_with = "go_duration_field")]
    pub retry_interval: Option<Duration>,
    pub rejoin_after_leave: bool,
    pub enable_compression: bool,
    pub statsite_addr: String,
    pub statsd_addr: String,
    #[serde(deserialize_with = "go_duration_field")]
    pub broadcast_timeout: Option<Duration>,
    pub validate_node_names: bool,
    #[serde(rename = "MsgpackUseNewTimeFormat")]
    pub msgpack_use_new_time_format: bool,
}

macro_rules! take_set {
    ($into:ident, $from:ident, $($field:ident),+) => {
        $(if is_set(&$from.$field) {
            $into.$field = $from.$field;
        })+
    };
}

/// Serf's "set": anything but the zero value.
fn is_set<T: Default + PartialEq>(value: &T) -> bool {
    *value != T::default()
}

impl SerfConfig {
    /// Parses one JSON file's text.
    pub fn parse(path: &Path, text: &str) -> Result<SerfConfig, SerfConfigError> {
        serde_json::from_str(text).map_err(|source| SerfConfigError::Decode {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads `paths` in order, as Serf's `ReadConfigPaths`: a file is read whatever its
    /// name; a directory gives its `*.json` files (not its subdirectories), in lexical order.
    pub fn read_paths(paths: &[PathBuf]) -> Result<SerfConfig, SerfConfigError> {
        let read_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SerfConfigError::Read { path, source }
        };
        let mut merged = SerfConfig::default();
        for path in paths {
            let metadata = std::fs::metadata(path).map_err(read_error(path))?;
            let files = if metadata.is_dir() {
                let mut files = Vec::new();
                for entry in std::fs::read_dir(path).map_err(read_error(path))? {
                    let entry = entry.map_err(read_error(path))?;
                    let is_json = entry.file_name().to_string_lossy().ends_with(".json");
                    if is_json && !entry.path().is_dir() {
                        files.push(entry.path());
                    }
                }
                files.sort();
                files
            } else {
                vec![path.clone()]
            };
            for file in files {
                let text = std::fs::read_to_string(&file).map_err(read_error(&file))?;
                merged.merge(SerfConfig::parse(&file, &text)?);
            }
        }
        Ok(merged)
    }

    /// Lays `later` over this configuration as Serf's `MergeConfig` does: set values replace,
    /// tags are merged key by key, and handlers and join addresses are appended.
    pub fn merge(&mut self, later: SerfConfig) {
        let mut later = later;
        self.tags.append(&mut later.tags);
        self.event_handlers.append(&mut later.event_handlers);
        self.start_join.append(&mut later.start_join);
        self.retry_join.append(&mut later.retry_join);
        if later.mdns.is_some() {
            self.mdns = later.mdns.take();
        }
        take_set!(
            self,
            later,
            node_name,
            role,
            disable_coordinates,
            tags_file,
            bind,
            advertise,
            encrypt_key,
            keyring_file,
            log_level,
            rpc_addr,
            rpc_auth,
            replay_on_join,
            query_response_size_limit,
            query_size_limit,
            user_event_size_limit,
            profile,
            snapshot_path,
            leave_on_terminate,
            skip_leave_on_interrupt,
            discover,
            interface,
            reconnect_interval,
            reconnect_timeout,
            tombstone_timeout,
            disable_name_resolution,
            enable_syslog,
            syslog_facility,
            retry_max_attempts,
            retry_interval,
            rejoin_after_leave,
            enable_compression,
            statsite_addr,
            statsd_addr,
            broadcast_timeout,
            validate_node_names,
            msgpack_use_new_time_format
        );
        if !later.protocol.is_empty() {
            self.protocol = later.protocol;
        }
    }

    /// The Phoenix agent these options describe.
    pub fn resolve(self) -> Result<SerfAgent, SerfConfigError> {
        self.refuse_unsupported()?;
        let mut warnings = Vec::new();
        let mut tags = self.tags.clone();
        if !self.role.is_empty() {
            warnings.push("Deprecation warning: 'Role' has been replaced with 'Tags'".into());
            tags.insert("role".into(), self.role.clone());
        }
        let tags_file = non_empty_path(&self.tags_file);
        if let Some(file) = &tags_file {
            if !tags.is_empty() {
                return Err(invalid(
                    "tags_file",
                    "Tags config not allowed while using tag files",
                ));
            }
            let file_error = |source| SerfConfigError::File {
                option: "tags_file",
                source,
            };
            tags = phoenix_gossip::persist::load_tags(file)
                .map_err(file_error)?
                .unwrap_or_default();
        }
        let keyring_file = non_empty_path(&self.keyring_file);
        let keyring = match &keyring_file {
            Some(_) if !self.encrypt_key.is_empty() => {
                return Err(invalid(
                    "keyring_file",
                    "Encryption key not allowed while using a keyring",
                ));
            }
            Some(file) => Some(phoenix_gossip::Keyring::load_file(file).map_err(|source| {
                SerfConfigError::File {
                    option: "keyring_file",
                    source,
                }
            })?),
            None => None,
        };
        let encrypt = match (&keyring, self.encrypt_key.as_str()) {
            (Some(keyring), _) => keyring.keys().first().map(phoenix_gossip::Key::to_base64),
            (None, "") => None,
            (None, key) => {
                phoenix_gossip::Key::from_base64(key)
                    .map_err(|e| invalid("encrypt_key", format!("Invalid encryption key: {e}")))?;
                Some(key.to_string())
            }
        };
        if !self.rpc_auth.is_empty() && self.rpc_auth.trim().is_empty() {
            return Err(invalid("rpc_auth", "a blank token is refused"));
        }
        let node = match self.node_name.as_str() {
            "" => phoenix_gossip::host_name(),
            name => name.to_string(),
        };
        if self.validate_node_names {
            validate_node_name(&node)?;
        }
        let bind = self.bind_address()?;
        let advertise = match self.advertise.as_str() {
            "" => None,
            text => Some(socket_address(text, DEFAULT_PORT).map_err(|e| invalid("advertise", e))?),
        };
        let rpc_addr = match self.rpc_addr.as_str() {
            "" => SocketAddr::from(([127, 0, 0, 1], 7373)),
            text => socket_address(text, 0).map_err(|e| invalid("rpc_addr", e))?,
        };
        let mut retry_interval = self.retry_interval.unwrap_or(Duration::from_secs(30));
        if retry_interval < Duration::from_secs(1) {
            retry_interval = Duration::from_secs(1);
            warnings.push("Warning: 'RetryInterval' is too low. Setting to 1s".into());
        }
        if self.rejoin_after_leave && self.snapshot_path.is_empty() {
            warnings.push("Warning: 'RejoinAfterLeave' enabled without snapshot file".into());
        }
        let settings = AgentSettings {
            node: Some(node),
            bind,
            advertise,
            join: self.start_join.clone(),
            tags,
            event_handlers: self.event_handlers.clone(),
            encrypt,
            encrypt_file: None,
            snapshot: non_empty_path(&self.snapshot_path),
            rpc_addr,
            rpc_auth: Some(self.rpc_auth.clone()).filter(|t| !t.is_empty()),
            reconnect_interval: self.reconnect_interval.unwrap_or(Duration::from_secs(30)),
            reap_after: self
                .reconnect_timeout
                .unwrap_or(Duration::from_secs(24 * 3600)),
        };
        Ok(SerfAgent {
            settings,
            keyring,
            keyring_file,
            tags_file,
            rejoin_after_leave: self.rejoin_after_leave,
            replay_on_join: self.replay_on_join,
            coordinates: !self.disable_coordinates,
            reap_left_after: self
                .tombstone_timeout
                .unwrap_or(Duration::from_secs(24 * 3600)),
            profile: profile(&self.profile)?,
            protocol: protocol(&self.protocol)?,
            log_level: log_level(&self.log_level)?,
            retry_join: self.retry_join.clone(),
            retry_max_attempts: u32::try_from(self.retry_max_attempts.max(0)).unwrap_or(u32::MAX),
            retry_interval,
            leave_on_terminate: self.leave_on_terminate,
            skip_leave_on_interrupt: self.skip_leave_on_interrupt,
            warnings,
        })
    }

    /// Serf's options a Phoenix agent cannot honour: each is named, with the reason.
    fn refuse_unsupported(&self) -> Result<(), SerfConfigError> {
        if !self.discover.is_empty() || self.mdns.is_some() {
            let option = if self.discover.is_empty() {
                "mdns"
            } else {
                "discover"
            };
            return Err(unsupported(
                option,
                "mDNS discovery is not built in: give the addresses with `join` or `retry_join`",
            ));
        }
        if self
            .protocol
            .parse::<i64>()
            .is_ok_and(|version| version != 0)
        {
            return Err(unsupported(
                "protocol",
                "Serf's versions 2 to 5 are not chosen by number: give \"serf\" to speak \
                 memberlist's and Serf's protocol (what `serf agent` speaks), or \"phoenix\"",
            ));
        }
        if self.enable_syslog {
            return Err(unsupported(
                "enable_syslog",
                "the agent logs to stderr: let the service manager (journald, rsyslog) carry it",
            ));
        }
        for (option, value) in [
            ("statsite_addr", &self.statsite_addr),
            ("statsd_addr", &self.statsd_addr),
        ] {
            if !value.is_empty() {
                return Err(unsupported(
                    option,
                    "metrics are served by `phoenix metrics`, not streamed to statsd",
                ));
            }
        }
        for (option, value, default) in [
            ("query_size_limit", self.query_size_limit, 1024),
            (
                "query_response_size_limit",
                self.query_response_size_limit,
                1024,
            ),
            ("user_event_size_limit", self.user_event_size_limit, 512),
        ] {
            if value != 0 && value != default {
                return Err(unsupported(
                    option,
                    format!("the limit is fixed at Serf's default, {default} bytes"),
                ));
            }
        }
        Ok(())
    }

    /// The gossip address: `bind` (port 7946 unless given), on `interface` when one is named.
    /// Serf binds 0.0.0.0 by default; Phoenix binds loopback unless told otherwise.
    fn bind_address(&self) -> Result<SocketAddr, SerfConfigError> {
        let bind = match self.bind.as_str() {
            "" if self.interface.is_empty() => SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            "" => SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            text => socket_address(text, DEFAULT_PORT).map_err(|e| invalid("bind", e))?,
        };
        if self.interface.is_empty() {
            return Ok(bind);
        }
        let addresses = interface_addresses(&self.interface)
            .map_err(|e| invalid("interface", format!("Invalid network interface: {e}")))?;
        if bind.ip().is_unspecified() {
            let usable = addresses
                .iter()
                .find(|ip| !is_link_local(ip))
                .ok_or_else(|| {
                    invalid(
                        "interface",
                        format!(
                            "Failed to find usable address for interface '{}'",
                            self.interface
                        ),
                    )
                })?;
            return Ok(SocketAddr::new(*usable, bind.port()));
        }
        if !addresses.contains(&bind.ip()) {
            return Err(invalid(
                "interface",
                format!(
                    "Interface '{}' has no '{}' address",
                    self.interface,
                    bind.ip()
                ),
            ));
        }
        Ok(bind)
    }
}

/// A Serf configuration resolved into a Phoenix agent's.
#[derive(Debug)]
pub struct SerfAgent {
    pub settings: AgentSettings,
    /// The keys of `keyring_file`, primary first (`settings.encrypt` holds the primary).
    pub keyring: Option<phoenix_gossip::Keyring>,
    pub keyring_file: Option<PathBuf>,
    pub tags_file: Option<PathBuf>,
    pub rejoin_after_leave: bool,
    /// Replay the user events of the member joined through at start (`-replay`).
    pub replay_on_join: bool,
    /// Vivaldi coordinates are computed (not Serf's `disable_coordinates`).
    pub coordinates: bool,
    pub reap_left_after: Duration,
    pub profile: phoenix_gossip::Profile,
    pub protocol: phoenix_gossip::Protocol,
    pub log_level: Option<tracing::Level>,
    pub retry_join: Vec<String>,
    /// 0: retry for ever.
    pub retry_max_attempts: u32,
    pub retry_interval: Duration,
    pub leave_on_terminate: bool,
    pub skip_leave_on_interrupt: bool,
    /// What Serf would print as warnings (a deprecated option, a value raised to its floor).
    pub warnings: Vec<String>,
}

impl SerfAgent {
    /// The gossip agent's configuration.
    pub fn agent_config(&self) -> Result<phoenix_gossip::AgentConfig, phoenix_gossip::KeyError> {
        let mut config = self.settings.agent_config(Path::new(""))?;
        config.set_profile(self.profile);
        if let Some(keyring) = &self.keyring {
            config.keyring = Some(keyring.clone());
        }
        config.keyring_file = self.keyring_file.clone();
        config.tags_file = self.tags_file.clone();
        config.rejoin_after_leave = self.rejoin_after_leave;
        config.coordinates = self.coordinates;
        config.reap_left_after = self.reap_left_after;
        config.protocol = self.protocol;
        Ok(config)
    }
}

fn non_empty_path(text: &str) -> Option<PathBuf> {
    (!text.is_empty()).then(|| PathBuf::from(text))
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// The addresses of the network interface `name`, IPv4 first.
fn interface_addresses(name: &str) -> Result<Vec<IpAddr>, String> {
    let interfaces = phoenix_check::interface_ips()?;
    let mut found: Vec<IpAddr> = interfaces
        .into_iter()
        .filter(|(interface, _)| interface == name)
        .map(|(_, ip)| ip)
        .collect();
    if found.is_empty() {
        return Err(format!("no interface {name:?} with an address"));
    }
    found.sort_by_key(|ip| ip.is_ipv6());
    Ok(found)
}

/// Serf's `validate_node_names`: letters, digits, `-` and `.`, at most 128 characters.
fn validate_node_name(name: &str) -> Result<(), SerfConfigError> {
    if name.is_empty() || name.len() > 128 {
        return Err(invalid(
            "node_name",
            format!(
                "Node name is {} characters. Valid length is between 1 and 128 characters",
                name.len()
            ),
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(invalid(
            "node_name",
            format!(
                "Node name contains invalid characters {name}, Valid characters include all alpha-numerics and dashes and '.'"
            ),
        ));
    }
    Ok(())
}

fn profile(name: &str) -> Result<phoenix_gossip::Profile, SerfConfigError> {
    match name {
        "" | "lan" => Ok(phoenix_gossip::Profile::Lan),
        "wan" => Ok(phoenix_gossip::Profile::Wan),
        "local" => Ok(phoenix_gossip::Profile::Local),
        other => Err(invalid("profile", format!("Unknown profile: {other}"))),
    }
}

/// Serf's levels (any case); `None` when not set.
fn log_level(name: &str) -> Result<Option<tracing::Level>, SerfConfigError> {
    let level = match name.to_ascii_uppercase().as_str() {
        "" => return Ok(None),
        "TRACE" => tracing::Level::TRACE,
        "DEBUG" => tracing::Level::DEBUG,
        "INFO" => tracing::Level::INFO,
        "WARN" => tracing::Level::WARN,
        "ERR" | "ERROR" => tracing::Level::ERROR,
        other => {
            return Err(invalid(
                "log_level",
                format!(
                    "Invalid log level: {other}. Valid log levels are: [TRACE DEBUG INFO WARN ERR]"
                ),
            ));
        }
    };
    Ok(Some(level))
}

fn go_duration_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    if text.is_empty() {
        return Ok(None);
    }
    go_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("phoenix-serf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn json(text: &str) -> SerfConfig {
        SerfConfig::parse(Path::new("test.json"), text).unwrap()
    }

    #[test]
    fn files_and_directories_merge_in_serfs_order() {
        let dir = dir("merge");
        let first = dir.join("first.conf");
        std::fs::write(
            &first,
            r#"{"node_name": "a", "tags": {"role": "web", "dc": "one"}, "event_handlers": ["h1"],
                "replay_on_join": false, "rejoin_after_leave": true, "start_join": ["x:1"]}"#,
        )
        .unwrap();
        let conf = dir.join("conf.d");
        std::fs::create_dir_all(conf.join("sub.json")).unwrap();
        std::fs::write(
            conf.join("b.json"),
            r#"{"node_name": "b", "event_handlers": ["h2"]}"#,
        )
        .unwrap();
        std::fs::write(
            conf.join("c.json"),
            r#"{"node_name": "c", "tags": {"dc": "two"}, "rejoin_after_leave": false}"#,
        )
        .unwrap();
        std::fs::write(conf.join("d.txt"), "not json, not read").unwrap();
        let mut merged = SerfConfig::read_paths(&[first, conf]).unwrap();
        assert_eq!(merged.node_name, "c", "lexical order: c.json last");
        assert_eq!(merged.event_handlers, ["h1", "h2"]);
        assert!(
            merged.rejoin_after_leave,
            "false does not unset, as in Serf"
        );
        let command_line = SerfConfig {
            node_name: "cli".into(),
            event_handlers: vec!["h3".into()],
            start_join: vec!["y:2".into()],
            ..SerfConfig::default()
        };
        merged.merge(command_line);
        assert_eq!(merged.node_name, "cli");
        assert_eq!(merged.event_handlers, ["h1", "h2", "h3"]);
        assert_eq!(merged.start_join, ["x:1", "y:2"]);
        assert_eq!(
            merged.tags,
            BTreeMap::from([("dc".into(), "two".into()), ("role".into(), "web".into())])
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_files_are_named_with_the_line_and_the_key() {
        let dir = dir("bad");
        let file = dir.join("agent.json");
        std::fs::write(
            &file,
            "{\n  \"node_name\": \"a\",\n  \"nodename\": \"b\"\n}",
        )
        .unwrap();
        let error = SerfConfig::read_paths(std::slice::from_ref(&file))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with(&format!("Error decoding '{}'", file.display()))
                && error.contains("unknown field `nodename`")
                && error.contains("line 3"),
            "{error}"
        );
        std::fs::write(&file, r#"{"retry_interval": "soon"}"#).unwrap();
        let error = SerfConfig::read_paths(std::slice::from_ref(&file))
            .unwrap_err()
            .to_string();
        assert!(error.contains("invalid duration \"soon\""), "{error}");
        let error = SerfConfig::read_paths(&[dir.join("missing.json")])
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("Error reading '"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn options_phoenix_cannot_honour_are_refused_by_name() {
        for (text, option) in [
            (r#"{"discover": "cluster"}"#, "`discover`"),
            (r#"{"mdns": {"interface": "eth0"}}"#, "`mdns`"),
            (r#"{"protocol": 4}"#, "`protocol`"),
            (r#"{"enable_syslog": true}"#, "`enable_syslog`"),
            (r#"{"statsd_addr": "127.0.0.1:8125"}"#, "`statsd_addr`"),
            (
                r#"{"user_event_size_limit": 9000}"#,
                "`user_event_size_limit`",
            ),
        ] {
            let error = json(text).resolve().unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("option {option} is not supported")),
                "{text}: {error}"
            );
        }
        let accepted = r#"{"user_event_size_limit": 512, "disable_coordinates": true,
            "enable_compression": true, "disable_name_resolution": true,
            "broadcast_timeout": "5s", "MsgpackUseNewTimeFormat": true, "node_name": "n"}"#;
        json(accepted).resolve().unwrap();
        json(r#"{"replay_on_join": true, "protocol": "serf"}"#)
            .resolve()
            .unwrap();
    }

    #[test]
    fn protocol_chooses_the_wire_by_name() {
        let serf = json(r#"{"protocol": "serf"}"#).resolve().unwrap();
        assert_eq!(serf.protocol, phoenix_gossip::Protocol::Serf);
        assert_eq!(
            serf.agent_config().unwrap().protocol,
            phoenix_gossip::Protocol::Serf
        );
        let default = json("{}").resolve().unwrap();
        assert_eq!(default.protocol, phoenix_gossip::Protocol::Phoenix);
        let error = json(r#"{"protocol": "serff"}"#)
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("\"serff\"") && error.contains("\"serf\""),
            "{error}"
        );
        let error = json(r#"{"protocol": 4}"#)
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(error.contains("give \"serf\""), "{error}");
    }

    #[test]
    fn values_resolve_as_serf_reads_them() {
        let agent = json(
            r#"{"node_name": "n1", "role": "web", "bind": "127.0.0.2",
                "advertise": "127.0.0.3:8000", "rpc_addr": "127.0.0.1:7374",
                "log_level": "debug", "profile": "wan", "retry_interval": "100ms",
                "reconnect_timeout": "1h30m", "tombstone_timeout": "1.5s",
                "retry_max_attempts": 3, "snapshot_path": "s"}"#,
        )
        .resolve()
        .unwrap();
        let settings = &agent.settings;
        assert_eq!(settings.bind, "127.0.0.2:7946".parse().unwrap());
        assert_eq!(settings.advertise, Some("127.0.0.3:8000".parse().unwrap()));
        assert_eq!(settings.rpc_addr, "127.0.0.1:7374".parse().unwrap());
        assert_eq!(settings.tags["role"], "web");
        assert_eq!(settings.reap_after, Duration::from_secs(5400));
        assert_eq!(agent.reap_left_after, Duration::from_millis(1500));
        assert_eq!(
            agent.retry_interval,
            Duration::from_secs(1),
            "raised to Serf's floor"
        );
        assert_eq!(agent.retry_max_attempts, 3);
        assert_eq!(agent.log_level, Some(tracing::Level::DEBUG));
        assert_eq!(agent.profile, phoenix_gossip::Profile::Wan);
        assert_eq!(agent.warnings.len(), 2, "{:?}", agent.warnings);
        let defaults = json(r#"{"node_name": "n"}"#).resolve().unwrap();
        assert_eq!(defaults.settings.bind, "127.0.0.1:7946".parse().unwrap());
        assert_eq!(
            defaults.settings.rpc_addr,
            "127.0.0.1:7373".parse().unwrap()
        );

        for (text, expected) in [
            (r#"{"log_level": "loud"}"#, "Invalid log level: LOUD"),
            (r#"{"profile": "space"}"#, "Unknown profile: space"),
            (r#"{"rpc_addr": "127.0.0.1"}"#, "has no port"),
            (r#"{"encrypt_key": "c2hvcnQ="}"#, "Invalid encryption key"),
            (
                r#"{"node_name": "a_b", "validate_node_names": true}"#,
                "invalid characters",
            ),
            (
                r#"{"tags": {"a": "b"}, "tags_file": "/nonexistent/t"}"#,
                "Tags config not allowed while using tag files",
            ),
            (
                r#"{"encrypt_key": "x", "keyring_file": "/nonexistent/k"}"#,
                "Encryption key not allowed while using a keyring",
            ),
            (r#"{"interface": "nosuch0"}"#, "Invalid network interface"),
            (
                r#"{"interface": "lo", "bind": "192.0.2.1"}"#,
                "Interface 'lo' has no '192.0.2.1' address",
            ),
        ] {
            let error = json(text).resolve().unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
        let on_lo = json(r#"{"interface": "lo", "node_name": "n"}"#)
            .resolve()
            .unwrap();
        assert_eq!(on_lo.settings.bind, "127.0.0.1:7946".parse().unwrap());
    }
}
