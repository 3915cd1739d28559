//! Serf's coalescing for event handlers: member events, and user events fired with
//! `coalesce`, are held until their kind has been quiet for `quiet` or `max` has passed since
//! the first one (members and user events each on their own timers, as Serf runs two
//! coalescers); then each member is reported once (its latest change), and each user event
//! name once (its latest Lamport time). Time is passed in, so tests are deterministic.
//!
//! Serf's member coalescer remembers each member's latest change and the last one it reported,
//! and skips a change already reported, except a `member-update`: so a member whose latest
//! change is a tag update is reported again with every later batch of member events. Handlers
//! written for Serf see exactly that here too.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::agent::{Event, Member};
use crate::broadcast::UserEvent;
use crate::rpc::member_event_parts;

/// What a handler runs for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Batch {
    /// Serf's event name (`member-join`, …) and every member it concerns.
    Members(&'static str, Vec<Member>),
    User(UserEvent),
}

/// When held events of one kind are due.
#[derive(Debug, Default)]
struct Window {
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Window {
    fn touch(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    fn deadline(&self, quiet: Duration, max: Duration) -> Option<Instant> {
        Some((self.first? + max).min(self.last? + quiet))
    }

    /// True (and the window closed) when due at `now`.
    fn close_if_due(&mut self, now: Instant, quiet: Duration, max: Duration) -> bool {
        if self.deadline(quiet, max).is_none_or(|due| due > now) {
            return false;
        }
        *self = Window::default();
        true
    }
}

#[derive(Debug)]
pub struct Coalescer {
    quiet: Duration,
    max: Duration,
    /// Latest change of each member: (event name, member), kept after it is reported.
    members: BTreeMap<String, (&'static str, Member)>,
    /// The change last reported for each member.
    reported: BTreeMap<String, &'static str>,
    member_window: Window,
    /// Latest coalescing user event of each name.
    users: BTreeMap<String, UserEvent>,
    user_window: Window,
}

impl Coalescer {
    /// Serf's agent defaults: 1 s quiet, 3 s at most.
    pub fn serf() -> Self {
        Coalescer::new(Duration::from_secs(1), Duration::from_secs(3))
    }

    pub fn new(quiet: Duration, max: Duration) -> Self {
        Coalescer {
            quiet,
            max,
            members: BTreeMap::new(),
            reported: BTreeMap::new(),
            member_window: Window::default(),
            users: BTreeMap::new(),
            user_window: Window::default(),
        }
    }

    /// Takes an event: returns it at once when it does not coalesce.
    pub fn push(&mut self, event: Event, now: Instant) -> Option<Batch> {
        match event {
            Event::User(user) if !user.coalesce => return Some(Batch::User(user)),
            Event::User(user) => {
                let newer = self
                    .users
                    .get(&user.name)
                    .is_none_or(|held| held.ltime < user.ltime);
                if newer {
                    self.users.insert(user.name.clone(), user);
                }
                self.user_window.touch(now);
            }
            other => {
                let (kind, member) = member_event_parts(&other)?;
                self.members
                    .insert(member.name.clone(), (kind, member.clone()));
                self.member_window.touch(now);
            }
        }
        None
    }

    /// When the held events are due (`None` when nothing is held).
    pub fn deadline(&self) -> Option<Instant> {
        let members = self.member_window.deadline(self.quiet, self.max);
        let users = self.user_window.deadline(self.quiet, self.max);
        members.into_iter().chain(users).min()
    }

    /// The held events, if due at `now`: member batches (one per kind), then user events.
    pub fn flush(&mut self, now: Instant) -> Vec<Batch> {
        let mut batches = Vec::new();
        if self.member_window.close_if_due(now, self.quiet, self.max) {
            batches.extend(self.member_batches());
        }
        if self.user_window.close_if_due(now, self.quiet, self.max) {
            batches.extend(
                std::mem::take(&mut self.users)
                    .into_values()
                    .map(Batch::User),
            );
        }
        batches
    }

    /// Everything held, due or not (the agent is stopping).
    pub fn flush_all(&mut self, now: Instant) -> Vec<Batch> {
        self.flush(now + self.max)
    }

    /// Serf's `memberEventCoalescer.Flush`: every member whose latest change differs from the
    /// one last reported, or is an update.
    fn member_batches(&mut self) -> Vec<Batch> {
        let mut by_kind: BTreeMap<&'static str, Vec<Member>> = BTreeMap::new();
        for (name, (kind, member)) in &self.members {
            if self.reported.get(name) == Some(kind) && *kind != "member-update" {
                continue;
            }
            self.reported.insert(name.clone(), kind);
            by_kind.entry(kind).or_default().push(member.clone());
        }
        // A reaped member is never reported again (unless it comes back): forget it, so the
        // maps stay as large as the cluster.
        let reaped: Vec<String> = self
            .members
            .iter()
            .filter(|(_, (kind, _))| *kind == "member-reap")
            .map(|(name, _)| name.clone())
            .collect();
        for name in reaped {
            self.members.remove(&name);
            self.reported.remove(&name);
        }
        by_kind
            .into_iter()
            .map(|(kind, members)| Batch::Members(kind, members))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::Status;

    fn member(name: &str) -> Member {
        Member {
            name: name.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            tags: BTreeMap::new(),
            status: Status::Alive,
        }
    }

    fn user(name: &str, ltime: u64, coalesce: bool) -> Event {
        Event::User(UserEvent {
            ltime,
            name: name.into(),
            payload: Vec::new(),
            coalesce,
            origin: "o".into(),
        })
    }

    #[test]
    fn a_burst_becomes_one_batch_per_kind_after_a_quiet_second() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut c = Coalescer::serf();
        assert_eq!(c.push(Event::MemberJoin(member("a")), at(0)), None);
        assert_eq!(c.push(Event::MemberJoin(member("b")), at(100)), None);
        assert_eq!(c.push(Event::MemberFailed(member("a")), at(200)), None);
        assert_eq!(c.push(user("deploy", 3, true), at(300)), None);
        assert_eq!(c.push(user("deploy", 5, true), at(400)), None);
        assert_eq!(c.push(user("deploy", 4, true), at(500)), None);
        assert!(c.flush(at(1199)).is_empty(), "not quiet for a second yet");
        assert_eq!(
            c.deadline(),
            Some(at(1200)),
            "members: a second after the last"
        );
        assert_eq!(
            c.flush(at(1200)),
            [
                Batch::Members("member-failed", vec![member("a")]),
                Batch::Members("member-join", vec![member("b")]),
            ]
        );
        assert_eq!(
            c.deadline(),
            Some(at(1500)),
            "user events: on their own timer"
        );
        let batches = c.flush(at(1500));
        let [Batch::User(latest)] = &batches[..] else {
            panic!("{batches:?}")
        };
        assert_eq!(latest.ltime, 5, "only the latest deploy");
        assert_eq!(c.deadline(), None);
    }

    #[test]
    fn a_steady_trickle_is_flushed_after_three_seconds_at_most() {
        let t0 = Instant::now();
        let mut c = Coalescer::serf();
        for i in 0..10 {
            let name = format!("n{i}");
            c.push(
                Event::MemberJoin(member(&name)),
                t0 + Duration::from_millis(500 * i),
            );
        }
        assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(3)));
        assert_eq!(c.flush(t0 + Duration::from_secs(3)).len(), 1);
    }

    /// Serf's coalescer reports a member's last tag update again with every later batch of
    /// member events, and never reports the same join twice; user events do not flush members.
    #[test]
    fn an_update_is_reported_again_with_later_member_batches_as_in_serf() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut c = Coalescer::serf();
        c.push(Event::MemberJoin(member("a")), at(0));
        assert_eq!(c.flush(at(1)).len(), 1);
        c.push(Event::MemberUpdate(member("a")), at(10));
        assert_eq!(
            c.flush(at(11)),
            [Batch::Members("member-update", vec![member("a")])]
        );
        c.push(user("deploy", 1, true), at(20));
        assert!(
            matches!(&c.flush(at(21))[..], [Batch::User(_)]),
            "user events alone"
        );
        c.push(Event::MemberJoin(member("b")), at(30));
        assert_eq!(
            c.flush(at(31)),
            [
                Batch::Members("member-join", vec![member("b")]),
                Batch::Members("member-update", vec![member("a")]),
            ]
        );
        c.push(Event::MemberReap(member("a")), at(40));
        assert_eq!(
            c.flush(at(41)),
            [Batch::Members("member-reap", vec![member("a")])]
        );
        c.push(Event::MemberJoin(member("c")), at(50));
        assert_eq!(
            c.flush(at(51)),
            [Batch::Members("member-join", vec![member("c")])],
            "b's join is not told twice, a is gone"
        );
    }

    #[test]
    fn events_fired_without_coalescing_pass_at_once() {
        let mut c = Coalescer::serf();
        let now = Instant::now();
        assert!(matches!(
            c.push(user("now", 1, false), now),
            Some(Batch::User(_))
        ));
        assert_eq!(c.deadline(), None);
    }
}
