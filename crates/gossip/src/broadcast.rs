//! User events, disseminated on foca's custom broadcasts: Lamport-timed, deduplicated, and
//! bounded in size.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Most bytes of an event's name and payload together (Serf's limit is 512).
pub const MAX_EVENT_SIZE: usize = 512;
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

/// A Lamport clock.
#[derive(Debug, Default)]
pub struct LamportClock(u64);

impl LamportClock {
    pub fn now(&self) -> u64 {
        self.0
    }

    /// The time for a new local event.
    pub fn tick(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }

    /// Moves past a time seen from another node.
    pub fn witness(&mut self, seen: u64) {
        self.0 = self.0.max(seen.saturating_add(1));
    }
}

/// State shared between foca's broadcast handler and the agent.
#[derive(Debug, Default)]
pub struct EventLog {
    pub clock: LamportClock,
    seen: BTreeSet<(u64, String, Vec<u8>)>,
    order: VecDeque<(u64, String, Vec<u8>)>,
    /// Events accepted since the agent last looked.
    pub delivered: Vec<UserEvent>,
    pub duplicates: u64,
    pub malformed: u64,
    /// Events at or before this time were handled before a restart: never again.
    floor: u64,
}

impl EventLog {
    /// A log that takes only events after `clock` (the clock of the last snapshot).
    pub fn after(clock: u64) -> Self {
        let mut log = EventLog {
            floor: clock,
            ..EventLog::default()
        };
        if clock > 0 {
            log.clock.witness(clock);
        }
        log
    }

    /// Records an event; false when it was seen before (or is too old to tell).
    fn accept(&mut self, event: &UserEvent) -> bool {
        let oldest = self.order.front().map_or(0, |(ltime, ..)| *ltime);
        let key = (event.ltime, event.name.clone(), event.payload.clone());
        let stale =
            event.ltime <= self.floor || (self.order.len() == REMEMBERED && event.ltime < oldest);
        if stale || self.seen.contains(&key) {
            self.duplicates += 1;
            return false;
        }
        self.seen.insert(key.clone());
        self.order.push_back(key);
        if self.order.len() > REMEMBERED
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        self.clock.witness(event.ltime);
        self.delivered.push(event.clone());
        true
    }
}

/// The key foca keeps while disseminating an event: only an identical event replaces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventKey(u64, String, Vec<u8>);

impl foca::Invalidates for EventKey {
    fn invalidates(&self, other: &Self) -> bool {
        self == other
    }
}

#[derive(Debug, thiserror::Error)]
#[error("malformed user event")]
pub struct Malformed;

/// Foca's handler of custom broadcasts.
pub struct Handler(pub Arc<Mutex<EventLog>>);

impl<T> foca::BroadcastHandler<T> for Handler {
    type Key = EventKey;
    type Error = Malformed;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&T>,
    ) -> Result<Option<EventKey>, Malformed> {
        let mut log = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let event: UserEvent = match postcard::from_bytes(data) {
            Ok(event) if data.len() <= MAX_EVENT_SIZE + 64 => event,
            _ => {
                log.malformed += 1;
                return Err(Malformed);
            }
        };
        let fresh = log.accept(&event);
        Ok(fresh.then_some(EventKey(event.ltime, event.name, event.payload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ltime: u64, name: &str) -> UserEvent {
        UserEvent {
            ltime,
            name: name.into(),
            payload: b"p".to_vec(),
            coalesce: true,
            origin: "n".into(),
        }
    }

    #[test]
    fn duplicates_are_suppressed_and_the_clock_moves_past_what_it_saw() {
        let mut log = EventLog::default();
        assert!(log.accept(&event(5, "deploy")));
        assert!(!log.accept(&event(5, "deploy")));
        assert!(log.accept(&event(5, "other")));
        assert_eq!((log.delivered.len(), log.duplicates), (2, 1));
        assert_eq!(log.clock.tick(), 7);
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
            assert!(log.accept(&event(ltime, "e")));
        }
        assert!(!log.accept(&event(3, "e")), "older than the window");
    }
}
