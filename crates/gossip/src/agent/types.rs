//! What an agent is told and what it tells: its configuration, members, events, counters.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde::Serialize;

use crate::broadcast::UserEvent;
use crate::keyring::Keyring;
use crate::query::QueryEvent;

/// How an agent starts.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The node name, unique in the cluster.
    pub node: String,
    pub bind: SocketAddr,
    /// The address others reach this agent at (default: `bind`).
    pub advertise: Option<SocketAddr>,
    pub tags: BTreeMap<String, String>,
    /// Encrypts every packet when set.
    pub keyring: Option<Keyring>,
    /// Seeds foca's randomness (member selection): fixed in tests, random otherwise.
    pub seed: u64,
    /// Probe, suspicion and dissemination settings (memberlist's LAN defaults by default).
    pub swim: foca::Config,
    /// How long failed members are listed (and tried again) before they are forgotten
    /// (Serf's `reconnect_timeout`).
    pub reap_after: Duration,
    /// How long members that left are listed before they are forgotten (Serf's
    /// `tombstone_timeout`).
    pub reap_left_after: Duration,
    /// Suspicion lasts `suspicion_mult × max(1, log10 N) × probe_period` for N members, and
    /// updates are retransmitted `8 × log10(N + 1)` times: both follow the cluster's size as
    /// it changes, as memberlist does (`swim` holds the values for a lone agent).
    pub suspicion_mult: f64,
    /// Where to keep the snapshot (members and clock) for rejoining after a restart.
    pub snapshot: Option<std::path::PathBuf>,
    /// Compute Vivaldi network coordinates (off: Serf's `disable_coordinates`).
    pub coordinates: bool,
    /// Rejoin through the snapshot even after a graceful leave (Serf's `rejoin_after_leave`).
    pub rejoin_after_leave: bool,
    /// Where to keep the keyring after every change (Serf's `keyring_file`: a JSON list of
    /// base64 keys, primary first, mode 0600), so a restarted agent has the rotated keys.
    pub keyring_file: Option<std::path::PathBuf>,
    /// Where to keep the tags after every change (Serf's `tags_file`: a JSON object, mode 0600).
    pub tags_file: Option<std::path::PathBuf>,
    /// User events this agent may fire: per second on average, and in a burst.
    pub event_rate: (f64, u32),
    /// Queries this agent may ask: per second on average, and in a burst.
    pub query_rate: (f64, u32),
    /// How often failed members are contacted again, so a healed partition merges.
    pub reconnect_interval: Duration,
    /// The wire protocol: Phoenix's own, or Serf's (to join `serf agent`s).
    pub protocol: Protocol,
}

/// What an agent speaks on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// Phoenix's own gossip (SWIM on foca): the default between Phoenix agents.
    #[default]
    Phoenix,
    /// Memberlist's and Serf's protocol, so the agent joins a cluster of `serf agent`s.
    Serf,
}

/// Serf's timing profiles (memberlist's default configurations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// Probe every second, suspicion × 4 (memberlist's `DefaultLANConfig`).
    #[default]
    Lan,
    /// Probe every 5 s with a 3 s timeout, suspicion × 6 (`DefaultWANConfig`).
    Wan,
    /// Probe every second with a 200 ms timeout, suspicion × 3 (`DefaultLocalConfig`).
    Local,
}

impl AgentConfig {
    /// Takes the probe and suspicion timings of `profile`.
    pub fn set_profile(&mut self, profile: Profile) {
        let size = std::num::NonZeroU32::new(32).unwrap_or(std::num::NonZeroU32::MIN);
        (self.swim, self.suspicion_mult) = match profile {
            Profile::Lan => (foca::Config::new_lan(size), 4.0),
            Profile::Wan => (foca::Config::new_wan(size), 6.0),
            Profile::Local => {
                let mut swim = foca::Config::new_lan(size);
                swim.probe_period = Duration::from_secs(1);
                swim.probe_rtt = Duration::from_millis(200);
                (swim, 3.0)
            }
        };
    }

    pub fn new(node: impl Into<String>, bind: SocketAddr) -> Self {
        AgentConfig {
            node: node.into(),
            bind,
            advertise: None,
            tags: BTreeMap::new(),
            keyring: None,
            seed: 0,
            swim: foca::Config::new_lan(
                std::num::NonZeroU32::new(32).unwrap_or(std::num::NonZeroU32::MIN),
            ),
            reap_after: Duration::from_secs(24 * 3600),
            reap_left_after: Duration::from_secs(24 * 3600),
            suspicion_mult: 4.0,
            snapshot: None,
            coordinates: true,
            rejoin_after_leave: false,
            keyring_file: None,
            tags_file: None,
            event_rate: (50.0, 100),
            query_rate: (20.0, 40),
            reconnect_interval: Duration::from_secs(30),
            protocol: Protocol::Phoenix,
        }
    }
}

/// A member's state as this agent sees it (Serf's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Alive,
    Suspect,
    Failed,
    Left,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Alive => "alive",
            Status::Suspect => "suspect",
            Status::Failed => "failed",
            Status::Left => "left",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub name: String,
    pub addr: SocketAddr,
    pub tags: BTreeMap<String, String>,
    pub status: Status,
}

/// What subscribers hear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    MemberJoin(Member),
    MemberUpdate(Member),
    MemberLeave(Member),
    MemberFailed(Member),
    MemberReap(Member),
    User(UserEvent),
    Query(QueryEvent),
}

/// Counters of one agent.
#[derive(Debug, Default)]
pub struct Stats {
    pub packets_received: AtomicU64,
    pub packets_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Packets dropped before foca saw them (garbage, truncated, wrong key…).
    pub packets_dropped: AtomicU64,
    /// Packets foca refused (malformed SWIM message).
    pub messages_rejected: AtomicU64,
    /// Lifeguard's local health score: 0 is healthy, up to 8 when this agent's own probes
    /// go unanswered (see [`crate::health`]).
    pub health_score: AtomicU64,
    /// Serf's clocks as `info` shows them (`member_time`, `event_time`, `query_time`).
    pub member_time: AtomicU64,
    pub event_time: AtomicU64,
    pub query_time: AtomicU64,
    /// Member updates still to be gossiped (Serf's `intent_queue`).
    pub intent_queue: AtomicU64,
    /// User events and queries still to be gossiped.
    pub event_queue: AtomicU64,
    /// How often the Vivaldi coordinate went invalid and started over.
    pub coordinate_resets: AtomicU64,
}
