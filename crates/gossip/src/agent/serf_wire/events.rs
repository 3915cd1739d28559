//! Serf's event buffer: the user events of the last 512 Lamport times. Every push-pull carries
//! it, so a member catches up on events gossip did not bring, and a joiner with `-replay` gets
//! the cluster's recent past.

use crate::memberlist::{SerfEventItem, SerfUserEvents};

/// Serf's `EventBuffer`: how many Lamport times are remembered.
pub(super) const EVENT_BUFFER: u64 = 512;

/// At most this many events are kept for one Lamport time (a bound Serf does not have: a
/// hostile push-pull cannot grow a slot without end).
const EVENTS_PER_TIME: usize = 64;

pub(super) struct EventBuffer {
    slots: Vec<Option<SerfUserEvents>>,
}

impl Default for EventBuffer {
    fn default() -> Self {
        EventBuffer {
            slots: vec![None; EVENT_BUFFER as usize],
        }
    }
}

impl EventBuffer {
    /// Keeps an event delivered here (one of an older time in its slot is forgotten).
    pub fn record(&mut self, ltime: u64, name: &str, payload: &[u8]) {
        let at = usize::try_from(ltime % EVENT_BUFFER).unwrap_or(0);
        let slot = &mut self.slots[at];
        let events = match slot {
            Some(kept) if kept.ltime == ltime => kept,
            _ => slot.insert(SerfUserEvents {
                ltime,
                events: Vec::new(),
            }),
        };
        let item = SerfEventItem {
            name: name.to_string(),
            payload: payload.to_vec(),
        };
        if events.events.len() < EVENTS_PER_TIME && !events.events.contains(&item) {
            events.events.push(item);
        }
    }

    /// What a push-pull carries: every remembered time, oldest first.
    pub fn recent(&self) -> Vec<Option<SerfUserEvents>> {
        let mut kept: Vec<SerfUserEvents> = self.slots.iter().flatten().cloned().collect();
        kept.sort_by_key(|events| events.ltime);
        kept.into_iter().map(Some).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_512_times_oldest_first_each_event_once() {
        let mut buffer = EventBuffer::default();
        buffer.record(3, "deploy", b"v1");
        buffer.record(3, "deploy", b"v1");
        buffer.record(3, "deploy", b"v2");
        buffer.record(2, "restart", b"");
        // 515 takes the slot of 3.
        buffer.record(515, "late", b"");
        let recent: Vec<SerfUserEvents> = buffer.recent().into_iter().flatten().collect();
        let times: Vec<u64> = recent.iter().map(|e| e.ltime).collect();
        assert_eq!(times, [2, 515]);
        buffer.record(4, "deploy", b"v1");
        buffer.record(4, "deploy", b"v2");
        let four = buffer.recent().into_iter().flatten().find(|e| e.ltime == 4);
        assert_eq!(four.map(|e| e.events.len()), Some(2));
        for n in 0..100u8 {
            buffer.record(9, "flood", &[n]);
        }
        let nine = buffer.recent().into_iter().flatten().find(|e| e.ltime == 9);
        assert_eq!(nine.map(|e| e.events.len()), Some(EVENTS_PER_TIME));
    }
}
