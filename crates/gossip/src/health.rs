//! Lifeguard's local health awareness (memberlist's "awareness"): an agent that cannot get its
//! own probes answered is more likely slow itself (CPU-starved, paused, losing packets) than
//! surrounded by dead members. A failed probe right after another failed one raises its score
//! (up to 8) — memberlist counts missing nacks instead, which foca does not send; a dead member
//! fails one probe now and then, a slow agent fails them all — and each answered probe lowers
//! it. While the score is `s` the agent probes `s + 1` times less often, waits `s + 1` times
//! longer for acks, and lets the suspicions its own failed probes start run `s + 1` times
//! longer before it declares anyone down. A slow agent thus stops accusing healthy members,
//! while a healthy one detects a dead member as fast as ever.
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
    /// Members whose probe by this agent failed.
    pub probes_failed: Vec<String>,
    /// Probe numbers of this agent's pings sent (a probe's first one starts it).
    pub probes_sent: Vec<ProbeNumber>,
    /// Probe numbers of acks received, direct or forwarded.
    pub acks: Vec<ProbeNumber>,
}

impl Runtime<NodeId> for Io {
    fn notify(&mut self, notification: Notification<'_, NodeId>) {
        match notification {
            Notification::ProbeFailed(_, member) => self.probes_failed.push(member.name.clone()),
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
    /// The last probe failed.
    failing: bool,
}

impl LocalHealth {
    pub fn score(&self) -> u32 {
        self.score
    }

    /// Takes what one input to foca told about this agent's probes.
    pub fn observe(&mut self, io: &mut Io) {
        for _ in &io.probes_failed {
            if self.failing {
                self.score = (self.score + 1).min(MAX_SCORE);
            }
            self.failing = true;
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
                self.failing = false;
                self.score = self.score.saturating_sub(1);
            }
        }
    }

    /// How long to wait for `timer`, given the score; `own_probe_failed` names the members
    /// whose suspicion this agent's own failed probe just started.
    pub fn scale(
        &self,
        timer: &Timer<NodeId>,
        after: Duration,
        own_probe_failed: &[String],
    ) -> Duration {
        match timer {
            Timer::ProbeRandomMember(_) | Timer::SendIndirectProbe { .. } => {
                after * (self.score + 1)
            }
            Timer::ChangeSuspectToDown { member_id, .. }
                if own_probe_failed.contains(&member_id.name) =>
            {
                after * (self.score + 1)
            }
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
            outcome.probes_failed.push("x".into());
            // Its ack, too late: it was given up already.
            outcome.acks.push(probe);
        } else {
            // A direct ack and a forwarded one for the same probe count once.
            outcome.acks.extend([probe, probe]);
        }
        health.observe(&mut outcome);
    }

    #[test]
    fn failed_probes_in_a_row_raise_the_score_and_answered_ones_lower_it() {
        let mut health = LocalHealth::default();
        for probe in 0..4 {
            probe_round(&mut health, probe, true);
        }
        assert_eq!(health.score(), 3, "the first failure alone says nothing");
        let probe = Timer::ProbeRandomMember(0);
        assert_eq!(
            health.scale(&probe, Duration::from_secs(1), &[]),
            Duration::from_secs(4)
        );
        let gossip = Timer::PeriodicGossip(0);
        assert_eq!(
            health.scale(&gossip, Duration::from_millis(200), &[]),
            Duration::from_millis(200),
            "gossip keeps its pace"
        );
        let suspicion = |name: &str| Timer::ChangeSuspectToDown {
            member_id: NodeId {
                name: name.into(),
                addr: "127.0.0.1:1".parse().unwrap(),
                bump: 0,
                tags: Default::default(),
                leaving: false,
            },
            incarnation: 0,
            token: 0,
        };
        let own = ["x".to_string()];
        assert_eq!(
            health.scale(&suspicion("x"), Duration::from_secs(1), &own),
            Duration::from_secs(4),
            "a suspicion this agent's own failed probe started waits longer"
        );
        assert_eq!(
            health.scale(&suspicion("y"), Duration::from_secs(1), &own),
            Duration::from_secs(1),
            "one heard from others does not"
        );
        probe_round(&mut health, 9, false);
        assert_eq!(health.score(), 2, "one answered probe, one step down");
        for probe in 10..30 {
            probe_round(&mut health, probe, true);
        }
        assert_eq!(health.score(), MAX_SCORE);
        for probe in 30..50 {
            probe_round(&mut health, probe, false);
        }
        assert_eq!(health.score(), 0);
        // A dead member fails one probe in a round now and then: no change.
        for probe in 50..70 {
            probe_round(&mut health, probe, probe % 5 == 0);
        }
        assert_eq!(health.score(), 0);
    }
}
