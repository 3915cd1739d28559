//! Network coordinates on the agent: once a second it pings one alive member directly with
//! its Vivaldi coordinate and takes the round trip and the member's coordinate from the pong,
//! as Serf takes them from memberlist's probes. Coordinates from peers are checked first.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::Actor;
use crate::agent::Status;
use crate::coordinate::Coordinate;
use crate::query::Direct;

/// A ping not answered by then is forgotten.
const PING_PATIENCE: Duration = Duration::from_secs(5);

impl Actor {
    /// Pings one alive member, picked at random.
    pub(super) fn ping_someone(&mut self) {
        let Some(vivaldi) = &self.vivaldi else {
            return;
        };
        let now = Instant::now();
        self.pings
            .retain(|_, (_, sent)| now.duration_since(*sent) < PING_PATIENCE);
        let me = self.foca.identity().name.clone();
        let alive: Vec<(String, SocketAddr)> = self
            .members
            .values()
            .filter(|k| k.status == Status::Alive && k.id.name != me)
            .map(|k| (k.id.name.clone(), k.id.addr))
            .collect();
        if alive.is_empty() {
            return;
        }
        let (name, addr) = alive[rand::Rng::next_u32(&mut self.rng) as usize % alive.len()].clone();
        let seq = rand::Rng::next_u32(&mut self.rng);
        let coord = vivaldi.coordinate().clone();
        self.pings.insert(seq, (name, now));
        self.send_direct(
            addr,
            Direct::Ping {
                seq,
                from: me,
                coord,
            },
        );
    }

    /// Answers a ping with this agent's coordinate.
    pub(super) fn on_ping(&mut self, seq: u32, from: String, coord: Coordinate, to: SocketAddr) {
        let Some(vivaldi) = &self.vivaldi else {
            return;
        };
        let pong = Direct::Pong {
            seq,
            from: self.foca.identity().name.clone(),
            coord: vivaldi.coordinate().clone(),
        };
        self.remember_coordinate(from, coord);
        self.send_direct(to, pong);
    }

    /// A pong to one of this agent's pings: a round trip to learn from.
    pub(super) fn on_pong(&mut self, seq: u32, from: String, coord: Coordinate) {
        let Some((name, sent)) = self.pings.remove(&seq) else {
            return;
        };
        let Some(vivaldi) = &mut self.vivaldi else {
            return;
        };
        if name != from {
            return;
        }
        let rtt = Instant::now().duration_since(sent);
        match vivaldi.update(&from, &coord, rtt) {
            Ok(()) => self.remember_coordinate(from, coord),
            Err(error) => tracing::debug!(%from, %error, "coordinate refused"),
        }
    }

    /// Keeps a member's coordinate (members only, and valid ones only).
    fn remember_coordinate(&mut self, from: String, coord: Coordinate) {
        if coord.is_valid() && self.members.contains_key(&from) {
            self.coordinates.insert(from, coord);
        }
    }

    /// A member's coordinate (this agent's own included), if known.
    pub(super) fn coordinate_of(&self, node: &str) -> Option<Coordinate> {
        let vivaldi = self.vivaldi.as_ref()?;
        if node == self.foca.identity().name {
            return Some(vivaldi.coordinate().clone());
        }
        self.coordinates.get(node).cloned()
    }

    /// Forgets what was learnt of a reaped member.
    pub(super) fn forget_coordinate(&mut self, node: &str) {
        self.coordinates.remove(node);
        if let Some(vivaldi) = &mut self.vivaldi {
            vivaldi.forget(node);
        }
    }
}
