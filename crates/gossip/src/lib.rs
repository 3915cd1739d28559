//! Gossip membership on foca (SWIM with suspicion): agents join by gossip over UDP, carry
//! tags, fire Lamport-timed user events, ask queries, and tell a graceful leave from a failure. Every
//! packet can be sealed with AES-GCM from a rotating keyring.

pub mod address;
mod agent;
mod broadcast;
pub mod coalesce;
pub mod coordinate;
pub mod filter;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
mod identity;
pub mod keyring;
pub mod memberlist;
pub mod packet;
pub mod persist;
pub mod query;
pub mod rpc;
pub mod snapshot;

pub use agent::{Agent, AgentConfig, Event, KeyOp, Member, Profile, Protocol, Stats, Status};
pub use broadcast::{MAX_EVENT_SIZE, MAX_QUERY_SIZE, UserEvent};
pub use keyring::{Key, KeyError, Keyring};
pub use query::{KeyAnswer, KeyReport, QueryEvent, QueryHandle, QueryParams, QueryReply};

use std::net::SocketAddr;

/// This machine's host name: the default member name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "phoenix".into())
}

#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error("cannot bind the gossip socket on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("the agent has stopped")]
    Stopped,
    #[error("user events are fired faster than this agent's limit allows; try again shortly")]
    RateLimited,
    #[error("user event of {0} bytes is over the {MAX_EVENT_SIZE}-byte limit")]
    EventTooLarge(usize),
    #[error("tags of {0} bytes are over the {limit}-byte limit", limit = identity::MAX_TAGS_SIZE)]
    TagsTooLarge(usize),
    #[error("query of {0} bytes is over the {MAX_QUERY_SIZE}-byte limit")]
    QueryTooLarge(usize),
    #[error("response of {0} bytes is over the {MAX_QUERY_SIZE}-byte limit")]
    ResponseTooLarge(usize),
    #[error("no pending query with id {0}")]
    UnknownQuery(u64),
    #[error("query {0} was answered already")]
    AlreadyResponded(u64),
    #[error("query {0} is past its deadline")]
    PastDeadline(u64),
    #[error("{0}")]
    BadAddress(String),
    #[error("no agent answered at {0}")]
    NobodyAnswered(String),
    #[error("no member named {0}")]
    UnknownMember(String),
    #[error("{0}")]
    BadInternalQuery(String),
    #[error("cannot encode a message: {0}")]
    Encode(String),
    #[error("not supported yet: {0}")]
    Unsupported(String),
    #[error("encryption is not enabled on this agent (start it with a key)")]
    NotEncrypted,
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot keep the keyring: {0}")]
    KeyringFile(#[from] persist::FileError),
}
