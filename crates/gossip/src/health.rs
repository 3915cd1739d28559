//! Lifeguard's local health awareness (memberlist's "awareness"): an agent that cannot get its
//! own probes answered is more likely slow itself (CPU-starved, paused, losing packets) than
//! surrounded by dead members. Each failed probe raises its score (up to 8), each answered one
//! lowers it, and while the score is `s` the agent probes `s + 1` times less often, waits
//! `s + 1` times longer for acks and lets its suspicions run `s + 1` times longer before it
//! declares anyone down. A slow agent thus stops accusing healthy members, and a member it
//! suspects has time to refute.
//!
//! The score comes from foca's probe notifications, gathered by [`Io`], the agent's foca
//! runtime.

use std::net::SocketAddr;
use std::time::Duration;

use foca::{Message, Notification, OwnedNotification, ProbeNumber, Runtime, Timer};

use crate::identity::NodeId;

/// The highest score (memberlist's default).
pub const MAX_SCORE: u32 = 8;

/// What foca asked for while handling one input.
#[derive(Default)]
pub(crate) struct Io {
    pub sends: Vec<(SocketAddr, Vec<u8>)>,
    pub timers: Vec<(Duration, Timer<NodeId>)>,
    /// Membership notifications (per-packet ones are only counted).
    pub notifications: Vec<OwnedNotification<NodeId>>,
    pub probes_failed: u32,
    /// Probe numbers of this agent's pings sent (a probe's first one starts it).
    pub probes_sent: Vec<ProbeNumber>,
    /// Probe numbers of acks received, direct or forwarded.
    pub acks: Vec<ProbeNumber>,
}

impl Runtime<NodeId> for Io {
    fn notify(&mut self, notification: Notification<'_, NodeId>) {
        match notification {
            Notification::ProbeFailed(..) => self.probes_failed += 1,
            Notification::DataReceived(header) => match header.message {
                Message::Ack(probe)
                | Message::ForwardedAck {
                    probe_number: probe,
                    ..
                } => self.acks.push(probe),
                _ => {}
            },
            Notification::DataSent(header) => {
                if let Message::Ping(probe) = header.message {
                    self.probes_sent.push(probe);
                }
            }
            other => self.notifications.push(other.to_owned()),
        }
    }

    fn send_to(&mut self, to: NodeId, data: &[u8]) {
        self.sends.push((to.addr, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<NodeId>, after: Duration) {
        self.timers.push((after, event));
    }
}

/// The local health score.
#[derive(Debug, Default)]
pub(crate) struct LocalHealth {
    score: u32,
    /// The probe under way, and whether its answer was counted already. Acks of earlier
    /// probes arrive late, after the probe was given up: they say nothing good.
    current: Option<(ProbeNumber, bool)>,
}

impl LocalHealth {
    pub fn score(&self) -> u32 {
        self.score
    }

    /// Takes what one input to foca told about this agent's probes.
    pub fn observe(&mut self, io: &mut Io) {
        let failed = std::mem::take(&mut io.probes_failed);
        if failed > 0 {
            self.score = (self.score + failed).min(MAX_SCORE);
            // The probe was given up: an ack arriving now is too late to count.
            if let Some((_, counted)) = &mut self.current {
                *counted = true;
            }
        }
        for probe in io.probes_sent.drain(..) {
            if self.current.is_none_or(|(current, _)| current != probe) {
                self.current = Some((probe, false));
            }
        }
        for probe in io.acks.drain(..) {
            if let Some((current, counted)) = &mut self.current
                && *current == probe
                && !*counted
            {
                *counted = true;
                self.score = self.score.saturating_sub(1);
            }
        }
    }

    /// How long to wait for `timer`, given the score.
    pub fn scale(&self, timer: &Timer<NodeId>, after: Duration) -> Duration {
        match timer {
            Timer::ProbeRandomMember(_)
            | Timer::SendIndirectProbe { .. }
            | Timer::ChangeSuspectToDown { .. } => after * (self.score + 1),
            _ => after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe_round(health: &mut LocalHealth, probe: ProbeNumber, failed: bool) {
        let mut io = Io::default();
        io.probes_sent.push(probe);
        health.observe(&mut io);
        let mut outcome = Io::default();
        if failed {
            outcome.probes_failed = 1;
            // Its ack, too late: it was given up already.
            outcome.acks.push(probe);
        } else {
            // A direct ack and a forwarded one for the same probe count once.
            outcome.acks.extend([probe, probe]);
        }
        health.observe(&mut outcome);
    }

    #[test]
    fn failed_probes_raise_the_score_and_answered_ones_lower_it() {
        let mut health = LocalHealth::default();
        for _ in 0..3 {
            probe_round(&mut health, 1, true);
        }
        assert_eq!(health.score(), 3);
        let probe = Timer::ProbeRandomMember(0);
        assert_eq!(
            health.scale(&probe, Duration::from_secs(1)),
            Duration::from_secs(4)
        );
        let other = Timer::PeriodicGossip(0);
        assert_eq!(
            health.scale(&other, Duration::from_millis(200)),
            Duration::from_millis(200),
            "gossip keeps its pace"
        );
        probe_round(&mut health, 2, false);
        assert_eq!(health.score(), 2, "one answered probe, one step down");
        for _ in 0..20 {
            probe_round(&mut health, 1, true);
        }
        assert_eq!(health.score(), MAX_SCORE);
        for probe in 20..40 {
            probe_round(&mut health, probe, false);
        }
        assert_eq!(health.score(), 0);
    }
}
