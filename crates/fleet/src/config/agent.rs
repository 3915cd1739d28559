//! `[agent]`: the gossip agent `phoenix up` runs, with the options of `phoenix agent`. Without
//! the table, `phoenix up` still runs an agent, alone on free loopback ports.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::period;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// The host's member name (default: the host name).
    #[serde(default)]
    pub node: Option<String>,
    /// Gossip address (UDP). Instances' members bind the same IP on free ports.
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// The address others reach this host at (default: `bind`).
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// Agents to join through, retried for a minute.
    #[serde(default)]
    pub join: Vec<String>,
    /// Tags of the host's member.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// `[TYPE=]SCRIPT` handlers, as `--event-handler`.
    #[serde(default)]
    pub event_handlers: Vec<String>,
    /// Base64 AES key (16, 24 or 32 bytes) sealing every gossip packet; also the key that
    /// signs this host's instance members, so other hosts admit them as backends.
    #[serde(default)]
    pub encrypt: Option<String>,
    /// A file holding the `encrypt` key (mode 0600; relative to the fleet file), instead of
    /// the key itself in the fleet file.
    #[serde(default)]
    pub encrypt_file: Option<PathBuf>,
    /// Snapshot for rejoining after a restart (relative paths are under the state directory).
    #[serde(default)]
    pub snapshot: Option<PathBuf>,
    /// Serf's RPC protocol, for `phoenix members` and the stock `serf` CLI.
    #[serde(default = "default_rpc")]
    pub rpc_addr: SocketAddr,
    /// Token RPC clients must give (required when `rpc_addr` is not loopback).
    #[serde(default)]
    pub rpc_auth: Option<String>,
    #[serde(default = "default_reconnect", deserialize_with = "period")]
    pub reconnect_interval: Duration,
    #[serde(default = "default_reap", deserialize_with = "period")]
    pub reap_after: Duration,
}

impl AgentSettings {
    /// The agent of a fleet file without `[agent]`: a lone host on free loopback ports.
    pub fn lone() -> Self {
        AgentSettings {
            node: None,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            join: Vec::new(),
            tags: BTreeMap::new(),
            event_handlers: Vec::new(),
            encrypt: None,
            encrypt_file: None,
            snapshot: None,
            rpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            rpc_auth: None,
            reconnect_interval: default_reconnect(),
            reap_after: default_reap(),
        }
    }

    /// The gossip agent's configuration; a relative snapshot path is taken under `base`.
    pub fn agent_config(
        &self,
        base: &Path,
    ) -> Result<phoenix_gossip::AgentConfig, phoenix_gossip::KeyError> {
        let node = self.node.clone().unwrap_or_else(phoenix_gossip::host_name);
        let mut config = phoenix_gossip::AgentConfig::new(node, self.bind);
        config.advertise = self.advertise;
        config.tags = self.tags.clone();
        // Seeds SWIM's member selection.
        config.seed = fastrand::u64(..);
        config.reap_after = self.reap_after;
        config.reconnect_interval = self.reconnect_interval;
        config.snapshot = self.snapshot.as_ref().map(|p| base.join(p));
        if let Some(key) = &self.encrypt {
            let key = phoenix_gossip::Key::from_base64(key)?;
            config.keyring = Some(phoenix_gossip::Keyring::new(key));
        }
        Ok(config)
    }

    /// Why these settings cannot work, if they cannot.
    pub(super) fn problem(&self) -> Option<String> {
        if self
            .rpc_auth
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Some("[agent] key `rpc_auth`: an empty token is refused".into());
        }
        if !self.rpc_addr.ip().is_loopback() && self.rpc_auth.is_none() {
            return Some(format!(
                "[agent] key `rpc_addr`: {} is not loopback: set `rpc_auth` too",
                self.rpc_addr
            ));
        }
        if self.encrypt.is_some() && self.encrypt_file.is_some() {
            return Some("[agent]: set `encrypt` or `encrypt_file`, not both".into());
        }
        if let Some(key) = &self.encrypt
            && let Err(error) = phoenix_gossip::Key::from_base64(key)
        {
            return Some(format!("[agent] key `encrypt`: {error}"));
        }
        let sealed = self.encrypt.is_some() || self.encrypt_file.is_some();
        if !self.bind.ip().is_loopback() && !sealed {
            return Some(format!(
                "[agent] key `bind`: {} is not loopback: gossip beyond this machine must be encrypted: set `encrypt_file` (a key from `phoenix keygen`)",
                self.bind
            ));
        }
        None
    }

    /// Reads `encrypt_file` (relative to `dir`) into `encrypt`: the file must be its owner's
    /// alone and hold a valid key.
    pub(super) fn load_key_file(&mut self, dir: &Path) -> Result<(), String> {
        let Some(file) = &self.encrypt_file else {
            return Ok(());
        };
        let what = "[agent] key `encrypt_file`";
        let key = super::read_private_file(dir, file, what)?;
        phoenix_gossip::Key::from_base64(&key)
            .map_err(|e| format!("{what}: {}: {e}", dir.join(file).display()))?;
        self.encrypt = Some(key);
        Ok(())
    }

    /// The cluster key's bytes, when there is one.
    pub fn cluster_key(&self) -> Option<Vec<u8>> {
        let key = phoenix_gossip::Key::from_base64(self.encrypt.as_deref()?).ok()?;
        Some(key.as_bytes().to_vec())
    }
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7946))
}

fn default_rpc() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7373))
}

fn default_reconnect() -> Duration {
    Duration::from_secs(30)
}

fn default_reap() -> Duration {
    Duration::from_secs(24 * 3600)
}
