//! User events, queries and force-leaves, disseminated on foca's custom broadcasts:
//! Lamport-timed, deduplicated, and bounded in size.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Most bytes of an event's name and payload together (Serf's limit is 512).
pub const MAX_EVENT_SIZE: usize = 512;
/// Most bytes of a query's name and payload together, and of a response (Serf's limits).
pub const MAX_QUERY_SIZE: usize = 1024;
/// Most bytes of an encoded broadcast: a query at its limit with room for its filters.
const MAX_BROADCAST: usize = MAX_QUERY_SIZE + 512;
/// How many recent events are remembered for duplicate suppression.
const REMEMBERED: usize = 1024;

/// A user event as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserEvent {
    pub ltime: u64,
    pub name: String,
    pub payload: Vec<u8>,
    pub coalesce: bool,
    /// The node that fired it (for logs; not part of its identity).
    pub origin: String,
}

/// Limits how fast this agent fires user events: `rate` a second on average, bursts of
/// `burst`. Time is passed in, so tests are deterministic.
#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<std::time::Instant>,
}

impl RateLimit {
    pub fn new(rate: f64, burst: u32) -> Self {
        RateLimit {
            rate,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: None,
        }
    }

    /// Takes one token; false when the limit is reached.
    pub fn take(&mut self, now: std::time::Instant) -> bool {
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A Lamport clock that counts as Serf's: it starts at 1, a local event takes the current
/// time and then advances it, and a time seen from elsewhere moves it one past. So the first
/// event of a cluster has time 1, and handlers see the `SERF_USER_LTIME` a Serf agent gives.
#[derive(Debug)]
pub struct LamportClock(u64);

impl Default for LamportClock {
    fn default() -> Self {
        LamportClock(1)
    }
}

impl LamportClock {
    /// The time for a new local event.
    pub fn tick(&mut self) -> u64 {
        let time = self.0;
        self.0 += 1;
        time
    }

    /// The time the next local event takes (Serf's `Time()`).
    pub fn time(&self) -> u64 {
        self.0
    }

    /// The latest time this clock has given or seen (what Serf's snapshot keeps).
    pub fn last(&self) -> u64 {
        self.0 - 1
    }

    /// Moves past a time seen from another node.
    pub fn witness(&mut self, seen: u64) {
        self.0 = self.0.max(seen.saturating_add(1));
    }
}

/// What travels on foca's custom broadcasts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Event(UserEvent),
    Query(Query),
    /// Serf's force-leave: whoever lists `name` as failed lists it as left instead.
    ForceLeave {
        ltime: u64,
        name: String,
    },
    /// Serf's `force-leave -prune`: as `ForceLeave`, then the member is forgotten at once
    /// (reaped) rather than after the tombstone timeout. (A variant of its own, so agents of
    /// an earlier version drop it rather than misread it.)
    ForceLeavePrune {
        ltime: u64,
        name: String,
    },
}

/// A query as it travels: disseminated like a user event, answered directly to `reply_to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    pub ltime: u64,
    /// Random, so two queries at the same Lamport time stay apart.
    pub id: u32,
    pub name: String,
    pub payload: Vec<u8>,
    pub origin: String,
    /// Where acks and responses go.
    pub reply_to: std::net::SocketAddr,
    /// Only these nodes answer (all when empty).
    pub filter_nodes: Vec<String>,
    /// Only nodes whose tags match these patterns answer.
    pub filter_tags: std::collections::BTreeMap<String, String>,
    pub ack: bool,
    /// Responders send their answer through this many other members too.
    pub relay_factor: u8,
    /// Answers after this long are refused.
    pub timeout_ms: u64,
}

/// A remembered message: its Lamport time and what tells it apart from others at that time.
type Seen = (u64, String, Vec<u8>);

/// The recent messages of one kind, for duplicate suppression.
#[derive(Debug, Default)]
pub(crate) struct Window {
    seen: BTreeSet<Seen>,
    order: VecDeque<Seen>,
    /// Messages at or before this time were handled before a restart: never again.
    floor: u64,
}

impl Window {
    /// Records a message; false when it was seen before (or is too old to tell).
    pub(crate) fn accept(&mut self, key: Seen) -> bool {
        let oldest = self.order.front().map_or(0, |(ltime, ..)| *ltime);
        let stale = key.0 <= self.floor || (self.order.len() == REMEMBERED && key.0 < oldest);
        if stale || self.seen.contains(&key) {
            return false;
        }
        self.seen.insert(key.clone());
        self.order.push_back(key);
        if self.order.len() > REMEMBERED
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }
}

/// User events kept for a joiner that asks to replay them (`join -replay`).
pub const REPLAYABLE: usize = 64;

/// State shared between foca's broadcast handler and the agent. Member intents (force-leave),
/// events and queries keep separate Lamport clocks, as in Serf.
#[derive(Debug, Default)]
pub struct EventLog {
    pub member_clock: LamportClock,
    pub clock: LamportClock,
    pub query_clock: LamportClock,
    events: Window,
    queries: Window,
    leaves: Window,
    /// Messages accepted since the agent last looked.
    pub delivered: Vec<Message>,
    /// The latest user events, oldest first, for `join -replay`.
    pub recent: std::collections::VecDeque<UserEvent>,
    pub duplicates: u64,
    pub malformed: u64,
}

impl EventLog {
    /// A log that takes only events and queries after the clocks of the last snapshot.
    pub fn after(member_clock: u64, clock: u64, query_clock: u64) -> Self {
        let mut log = EventLog::default();
        if member_clock > 0 {
            log.member_clock.witness(member_clock);
        }
        log.events.floor = clock;
        log.queries.floor = query_clock;
        if clock > 0 {
            log.clock.witness(clock);
        }
        if query_clock > 0 {
            log.query_clock.witness(query_clock);
        }
        log
    }

    /// Takes user events another agent replayed: each one new here is delivered, as if it
    /// had been gossiped (but it is not passed on). Returns how many were new.
    pub fn replay(&mut self, events: Vec<UserEvent>) -> usize {
        events
            .into_iter()
            .filter(|event| self.accept(&Message::Event(event.clone())).is_some())
            .count()
    }

    /// Records a message; the key foca keeps while disseminating it, or `None` for a
    /// duplicate (which foca then stops spreading).
    fn accept(&mut self, message: &Message) -> Option<BroadcastKey> {
        let (kind, key) = match message {
            Message::Event(event) => (0, (event.ltime, event.name.clone(), event.payload.clone())),
            Message::Query(query) => (
                1,
                (
                    query.ltime,
                    query.origin.clone(),
                    query.id.to_le_bytes().to_vec(),
                ),
            ),
            Message::ForceLeave { ltime, name } => (2, (*ltime, name.clone(), Vec::new())),
            Message::ForceLeavePrune { ltime, name } => (2, (*ltime, name.clone(), vec![1])),
        };
        let (window, clock) = match kind {
            0 => (&mut self.events, &mut self.clock),
            1 => (&mut self.queries, &mut self.query_clock),
            _ => (&mut self.leaves, &mut self.member_clock),
        };
        if !window.accept(key.clone()) {
            self.duplicates += 1;
            return None;
        }
        clock.witness(key.0);
        if let Message::Event(event) = message {
            if self.recent.len() == REPLAYABLE {
                self.recent.pop_front();
            }
            self.recent.push_back(event.clone());
        }
        self.delivered.push(message.clone());
        Some(BroadcastKey(kind, key))
    }
}

/// The key foca keeps while disseminating a message: only an identical one replaces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastKey(u8, Seen);

impl foca::Invalidates for BroadcastKey {
    fn invalidates(&self, other: &Self) -> bool {
        self == other
    }
}

#[derive(Debug, thiserror::Error)]
#[error("malformed broadcast")]
pub struct Malformed;

/// Foca's handler of custom broadcasts.
pub struct Handler(pub Arc<Mutex<EventLog>>);

impl<T> foca::BroadcastHandler<T> for Handler {
    type Key = BroadcastKey;
    type Error = Malformed;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&T>,
    ) -> Result<Option<BroadcastKey>, Malformed> {
        let mut log = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match postcard::from_bytes::<Message>(data) {
            Ok(message) if data.len() <= MAX_BROADCAST => Ok(log.accept(&message)),
            _ => {
                log.malformed += 1;
                Err(Malformed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ltime: u64, name: &str) -> Message {
        Message::Event(UserEvent {
            ltime,
            name: name.into(),
            payload: b"p".to_vec(),
            coalesce: true,
            origin: "n".into(),
        })
    }

    #[test]
    fn duplicates_are_suppressed_and_the_clock_moves_past_what_it_saw() {
        let mut log = EventLog::default();
        assert!(log.accept(&event(5, "deploy")).is_some());
        assert!(log.accept(&event(5, "deploy")).is_none());
        assert!(log.accept(&event(5, "other")).is_some());
        assert_eq!((log.delivered.len(), log.duplicates), (2, 1));
        assert_eq!(log.clock.tick(), 6, "the time past what it saw, as Serf");
        assert_eq!(log.clock.last(), 6);
        assert_eq!(
            log.query_clock.tick(),
            1,
            "queries keep their own clock, from 1"
        );
    }

    #[test]
    fn queries_are_told_apart_by_origin_and_id() {
        let query = |id: u32, origin: &str| {
            Message::Query(Query {
                ltime: 3,
                id,
                name: "uptime".into(),
                payload: Vec::new(),
                origin: origin.into(),
                reply_to: "127.0.0.1:1".parse().unwrap(),
                filter_nodes: Vec::new(),
                filter_tags: Default::default(),
                ack: true,
                relay_factor: 0,
                timeout_ms: 1000,
            })
        };
        let mut log = EventLog::after(0, 0, 2);
        assert!(log.accept(&query(1, "a")).is_some());
        assert!(log.accept(&query(1, "a")).is_none());
        assert!(log.accept(&query(2, "a")).is_some());
        assert!(log.accept(&query(1, "b")).is_some());
        assert_eq!(log.query_clock.last(), 3);
        let mut restarted = EventLog::after(0, 0, 3);
        assert!(
            restarted.accept(&query(1, "a")).is_none(),
            "handled before the restart"
        );
    }

    #[test]
    fn the_rate_limit_allows_a_burst_then_the_rate() {
        let t0 = std::time::Instant::now();
        let mut limit = RateLimit::new(10.0, 3);
        assert!((0..3).all(|_| limit.take(t0)), "a burst of three");
        assert!(!limit.take(t0), "then nothing");
        assert!(!limit.take(t0 + std::time::Duration::from_millis(50)));
        assert!(
            limit.take(t0 + std::time::Duration::from_millis(100)),
            "one per 100 ms"
        );
        assert!(!limit.take(t0 + std::time::Duration::from_millis(100)));
    }

    #[test]
    fn the_window_forgets_the_oldest_and_refuses_older_ones() {
        let mut log = EventLog::default();
        for ltime in 10..10 + REMEMBERED as u64 + 5 {
            assert!(log.accept(&event(ltime, "e")).is_some());
        }
        assert!(
            log.accept(&event(3, "e")).is_none(),
            "older than the window"
        );
    }
}
