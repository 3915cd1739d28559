//! Queries, as in Serf: a query is disseminated like a user event, every member that matches
//! its filters acks it (when asked) and may answer, and acks and answers travel straight back
//! to the asking agent over UDP, optionally relayed through other members as well. The asker
//! hears them until the query's deadline, then the query is closed.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::broadcast::Query;
use crate::filter::query_tags_match;
use crate::identity::NodeId;

/// Name prefix of the queries agents answer themselves (keyring changes).
pub(crate) const INTERNAL_PREFIX: &str = "_phoenix_";

/// What to ask and of whom.
#[derive(Debug, Clone, Default)]
pub struct QueryParams {
    pub name: String,
    pub payload: Vec<u8>,
    /// Only these nodes answer (all when empty).
    pub filter_nodes: Vec<String>,
    /// Only nodes whose tags match these patterns answer (`*` is a wildcard).
    pub filter_tags: BTreeMap<String, String>,
    /// Members ack receipt before they answer.
    pub ack: bool,
    /// Each answer is also sent through this many other members (for lossy networks).
    pub relay_factor: u8,
    /// How long to collect answers; Serf's default for the cluster's size when `None`.
    pub timeout: Option<Duration>,
}

/// What comes back from one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryReply {
    Ack(String),
    Response(String, Vec<u8>),
}

/// The asker's end of a running query: replies until the deadline, then `None`.
#[derive(Debug)]
pub struct QueryHandle {
    pub ltime: u64,
    pub timeout: Duration,
    pub(crate) replies: mpsc::UnboundedReceiver<QueryReply>,
}

impl QueryHandle {
    /// The next ack or response; `None` once the query has timed out.
    pub async fn next(&mut self) -> Option<QueryReply> {
        self.replies.recv().await
    }
}

/// A query delivered to this agent; answer it with [`crate::Agent::respond`] and `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryEvent {
    /// This agent's handle on the query (not the same on other members).
    pub id: u64,
    pub ltime: u64,
    pub name: String,
    pub payload: Vec<u8>,
    pub origin: String,
}

/// Messages sent straight to one agent rather than gossiped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Direct {
    Ack {
        ltime: u64,
        id: u32,
        from: String,
    },
    Response {
        ltime: u64,
        id: u32,
        from: String,
        payload: Vec<u8>,
    },
    /// Please pass `message` on to `to` (Serf's relay factor).
    Relay {
        to: SocketAddr,
        message: Box<Direct>,
    },
    /// A round-trip probe carrying the sender's network coordinate.
    Ping {
        seq: u32,
        from: String,
        coord: crate::coordinate::Coordinate,
    },
    /// The answer to a `Ping`, with the answering agent's coordinate.
    Pong {
        seq: u32,
        from: String,
        coord: crate::coordinate::Coordinate,
    },
    /// Please send me the user events you remember (`join -replay`).
    ReplayAsk {
        seq: u32,
    },
    /// Some of the user events asked for by `ReplayAsk` `seq` (one packet's worth).
    Replayed {
        seq: u32,
        events: Vec<crate::broadcast::UserEvent>,
    },
}

/// A query this agent asked, collecting replies.
pub(crate) struct Outgoing {
    pub replies: mpsc::UnboundedSender<QueryReply>,
    pub deadline: Instant,
    acks: HashSet<String>,
    responses: HashSet<String>,
}

impl Outgoing {
    pub fn new(replies: mpsc::UnboundedSender<QueryReply>, deadline: Instant) -> Self {
        Outgoing {
            replies,
            deadline,
            acks: HashSet::new(),
            responses: HashSet::new(),
        }
    }

    /// Passes a reply on unless the same member's was heard already (relays duplicate them).
    pub fn take(&mut self, reply: QueryReply) {
        let fresh = match &reply {
            QueryReply::Ack(from) => self.acks.insert(from.clone()),
            QueryReply::Response(from, _) => self.responses.insert(from.clone()),
        };
        if fresh {
            let _ = self.replies.send(reply);
        }
    }
}

/// A query delivered here, waiting for this agent's answer.
pub(crate) struct Incoming {
    pub query: Query,
    pub deadline: Instant,
    pub responded: bool,
}

/// True when `me` is among the members the query asks.
pub(crate) fn is_asked(query: &Query, me: &NodeId) -> bool {
    (query.filter_nodes.is_empty() || query.filter_nodes.contains(&me.name))
        && query_tags_match(&query.filter_tags, &me.tags)
}

/// Serf's default query timeout: gossip interval × 16 × ⌈log10(N + 1)⌉.
pub(crate) fn default_timeout(members: usize, gossip_interval: Duration) -> Duration {
    let scale = ((members + 1) as f64).log10().ceil().max(1.0);
    gossip_interval * 16 * scale as u32
}

/// An agent's answer to a keyring query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAnswer {
    /// Installed keys (base64, primary first) after the change.
    pub keys: Vec<String>,
    /// Why the change failed here; empty on success.
    pub error: String,
}

/// What a keyring change did across the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyReport {
    /// Members alive when the change was asked.
    pub members: usize,
    /// Answers by member.
    pub answers: BTreeMap<String, KeyAnswer>,
}

impl KeyReport {
    pub fn errors(&self) -> impl Iterator<Item = (&String, &String)> {
        self.answers
            .iter()
            .filter(|(_, a)| !a.error.is_empty())
            .map(|(node, a)| (node, &a.error))
    }

    /// How many members hold each key.
    pub fn key_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for answer in self.answers.values() {
            for key in &answer.keys {
                *counts.entry(key.clone()).or_default() += 1;
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_passed_on_once_per_member() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut outgoing = Outgoing::new(tx, Instant::now());
        outgoing.take(QueryReply::Ack("a".into()));
        outgoing.take(QueryReply::Ack("a".into()));
        outgoing.take(QueryReply::Response("a".into(), b"1".to_vec()));
        outgoing.take(QueryReply::Response("a".into(), b"1".to_vec()));
        outgoing.take(QueryReply::Response("b".into(), b"2".to_vec()));
        drop(outgoing);
        let mut got = Vec::new();
        while let Ok(reply) = rx.try_recv() {
            got.push(reply);
        }
        assert_eq!(got.len(), 3, "{got:?}");
    }

    #[test]
    fn the_default_timeout_grows_with_the_cluster() {
        let interval = Duration::from_millis(200);
        assert_eq!(default_timeout(1, interval), Duration::from_millis(3200));
        assert_eq!(default_timeout(9, interval), Duration::from_millis(3200));
        assert_eq!(default_timeout(10, interval), Duration::from_millis(6400));
        assert_eq!(default_timeout(100, interval), Duration::from_millis(9600));
    }
}
