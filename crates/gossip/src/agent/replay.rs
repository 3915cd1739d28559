//! `join -replay`: a joining agent asks the member it joined through for the user events it
//! remembers (the last 64) and delivers those it has not seen to its handlers, as Serf
//! replays its event buffer on such a join. Without `-replay` old events are never delivered.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::Actor;
use crate::broadcast::UserEvent;
use crate::packet::{self, Kind};
use crate::query::Direct;

/// An answer later than this is not taken.
const REPLAY_PATIENCE: Duration = Duration::from_secs(10);
/// Body bytes per packet of replayed events, well inside one datagram.
const PACKET_BUDGET: usize = 1200;

impl Actor {
    /// Asks the agent at `addr` to replay its user events.
    pub(super) fn ask_replay(&mut self, addr: SocketAddr) {
        let now = Instant::now();
        self.replays
            .retain(|_, (_, asked)| now.duration_since(*asked) < REPLAY_PATIENCE);
        let seq = rand::Rng::next_u32(&mut self.rng);
        self.replays.insert(seq, (addr, now));
        self.send_direct(addr, Direct::ReplayAsk { seq });
    }

    /// Sends the user events remembered here, a packet's worth at a time, to whoever asked
    /// (a few times a second at most: an answer is larger than the ask).
    pub(super) fn on_replay_ask(&mut self, seq: u32, to: SocketAddr) {
        if !self.replay_limit.take(std::time::Instant::now()) {
            return;
        }
        let events: Vec<UserEvent> = self.log().recent.iter().cloned().collect();
        let mut batch: Vec<UserEvent> = Vec::new();
        let mut size = 0;
        for event in events {
            let cost = event.name.len() + event.payload.len() + event.origin.len() + 16;
            if size + cost > PACKET_BUDGET && !batch.is_empty() {
                self.send_replayed(to, seq, std::mem::take(&mut batch));
                size = 0;
            }
            size += cost;
            batch.push(event);
        }
        // Always one packet, empty or not: the asker learns there is nothing to replay.
        self.send_replayed(to, seq, batch);
    }

    fn send_replayed(&mut self, to: SocketAddr, seq: u32, events: Vec<UserEvent>) {
        match postcard::to_allocvec(&Direct::Replayed { seq, events }) {
            Ok(body) => {
                let packet = packet::encode(Kind::Direct, &body, self.keyring.as_ref());
                self.outbox.push((to, packet));
            }
            Err(error) => tracing::warn!(%error, "cannot encode replayed events"),
        }
    }

    /// Replayed events: taken only from the agent asked, while the ask is fresh.
    pub(super) fn on_replayed(&mut self, seq: u32, events: Vec<UserEvent>, from: SocketAddr) {
        let Some((asked, when)) = self.replays.get(&seq) else {
            return;
        };
        if *asked != from || when.elapsed() > REPLAY_PATIENCE {
            return;
        }
        let new = self.log().replay(events);
        tracing::debug!(target: "serf", "replayed {new} user events from {from}");
    }
}
