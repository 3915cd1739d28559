//! Memberlist's view of the cluster, as its `state.go` keeps it: every node with its
//! incarnation and state, changed only by alive, suspect and dead messages (gossiped, or taken
//! from a push-pull), with Serf's member status on top (a leave intent makes an alive member
//! `leaving`, so its departure reads as a leave and not a failure). Pure: time comes in as
//! arguments, and what to gossip and what to tell subscribers comes out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::agent::{Member, Status};
use crate::memberlist::{self, Alive, Dead, NodeState, PushNodeState, Suspect};

/// Memberlist's protocol versions (min, max, current) and Serf's, as Debian's agent sends them
/// about itself.
pub(super) const VSN: [u8; 6] = [1, 5, 2, 2, 5, 5];

/// One node as this agent knows it.
#[derive(Debug, Clone)]
pub(super) struct Node {
    pub name: String,
    pub addr: SocketAddr,
    pub meta: Vec<u8>,
    pub tags: BTreeMap<String, String>,
    pub incarnation: u32,
    pub state: NodeState,
    pub since: Instant,
    /// Serf's Lamport time of the node's last join or leave intent.
    pub status_ltime: u64,
    /// A leave intent was heard while it was alive.
    pub leaving: bool,
    /// Until when it is suspected (then declared dead).
    pub suspect_until: Option<Instant>,
    /// The protocol versions it announced: passed on as they are (a node that hears others
    /// announce different versions of it refutes them).
    pub vsn: Vec<u8>,
}

impl Node {
    pub fn status(&self) -> Status {
        match self.state {
            NodeState::Alive => Status::Alive,
            NodeState::Suspect => Status::Suspect,
            NodeState::Dead => Status::Failed,
            NodeState::Left => Status::Left,
        }
    }

    pub fn member(&self) -> Member {
        Member {
            name: self.name.clone(),
            addr: self.addr,
            tags: self.tags.clone(),
            status: self.status(),
        }
    }

    pub fn alive_message(&self) -> Alive {
        Alive {
            incarnation: self.incarnation,
            node: self.name.clone(),
            addr: memberlist::ip_bytes(self.addr.ip()),
            port: self.addr.port(),
            meta: self.meta.clone(),
            vsn: self.vsn.clone(),
        }
    }

    pub fn push_state(&self) -> PushNodeState {
        PushNodeState {
            name: self.name.clone(),
            addr: memberlist::ip_bytes(self.addr.ip()),
            port: self.addr.port(),
            meta: self.meta.clone(),
            incarnation: self.incarnation,
            state: self.state,
            vsn: self.vsn.clone(),
        }
    }

    pub fn dead_or_left(&self) -> bool {
        matches!(self.state, NodeState::Dead | NodeState::Left)
    }
}

/// What a message changed, for subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Change {
    Joined(String),
    Updated(String),
    Left(String),
    Failed(String),
}

/// What to do after a message: gossip it on (or a refutation instead), tell subscribers.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    /// Messages to gossip, each with the node it is about (a newer one replaces an older).
    pub gossip: Vec<(String, Vec<u8>)>,
    pub change: Option<Change>,
}

impl Outcome {
    fn gossip(node: &str, kind: memberlist::MessageType, body: &impl serde::Serialize) -> Self {
        let mut outcome = Outcome::default();
        outcome.push(node, kind, body);
        outcome
    }

    fn push(&mut self, node: &str, kind: memberlist::MessageType, body: &impl serde::Serialize) {
        if let Ok(message) = memberlist::encode(kind, body) {
            self.gossip.push((node.to_string(), message));
        }
    }
}

/// Every node, this agent's own included.
pub(super) struct Nodes {
    me: String,
    nodes: BTreeMap<String, Node>,
    /// This agent has left: alive messages about it are ignored, dead ones not refuted.
    left: bool,
}

impl Nodes {
    /// The cluster as a new agent sees it: itself, alive at incarnation 1.
    pub fn new(me: &str, addr: SocketAddr, tags: &BTreeMap<String, String>, now: Instant) -> Self {
        let node = Node {
            name: me.to_string(),
            addr,
            meta: memberlist::encode_tags(tags).unwrap_or_default(),
            tags: tags.clone(),
            incarnation: 1,
            state: NodeState::Alive,
            since: now,
            status_ltime: 0,
            leaving: false,
            suspect_until: None,
            vsn: VSN.to_vec(),
        };
        Nodes {
            me: me.to_string(),
            nodes: BTreeMap::from([(me.to_string(), node)]),
            left: false,
        }
    }

    pub fn me(&self) -> &Node {
        &self.nodes[&self.me]
    }

    pub fn get(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Node> {
        self.nodes.get_mut(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// Other nodes that are alive or suspect: whom to probe and gossip to.
    pub fn others_up(&self) -> impl Iterator<Item = &Node> {
        self.nodes
            .values()
            .filter(|n| n.name != self.me && !n.dead_or_left())
    }

    /// Nodes not dead or left, this one included (the `N` of memberlist's formulas).
    pub fn up_count(&self) -> usize {
        self.nodes.values().filter(|n| !n.dead_or_left()).count()
    }

    /// New tags for this agent: a higher incarnation, gossiped.
    pub fn set_my_tags(&mut self, tags: &BTreeMap<String, String>) -> Outcome {
        let me = self.me.clone();
        let Some(node) = self.nodes.get_mut(&me) else {
            return Outcome::default();
        };
        node.meta = memberlist::encode_tags(tags).unwrap_or_default();
        node.tags = tags.clone();
        node.incarnation += 1;
        let mut outcome =
            Outcome::gossip(&me, memberlist::MessageType::Alive, &node.alive_message());
        outcome.change = Some(Change::Updated(me));
        outcome
    }

    /// This agent leaves: a dead message about itself, from itself.
    pub fn leave(&mut self) -> Outcome {
        self.left = true;
        let me = self.me.clone();
        let Some(node) = self.nodes.get_mut(&me) else {
            return Outcome::default();
        };
        node.incarnation += 1;
        let dead = Dead {
            incarnation: node.incarnation,
            node: me.clone(),
            from: me.clone(),
        };
        Outcome::gossip(&me, memberlist::MessageType::Dead, &dead)
    }

    /// Memberlist's `aliveNode`.
    pub fn alive(&mut self, a: &Alive, now: Instant) -> Outcome {
        let Some(addr) = a.address() else {
            return Outcome::default();
        };
        if a.node.is_empty() || (self.left && a.node == self.me) {
            return Outcome::default();
        }
        if a.vsn.len() >= 3 && (a.vsn[0] == 0 || a.vsn[1] == 0 || a.vsn[0] > a.vsn[1]) {
            return Outcome::default();
        }
        let is_me = a.node == self.me;
        let node = self.nodes.entry(a.node.clone()).or_insert_with(|| Node {
            name: a.node.clone(),
            addr,
            meta: a.meta.clone(),
            tags: BTreeMap::new(),
            incarnation: 0,
            state: NodeState::Dead,
            since: now,
            status_ltime: 0,
            leaving: false,
            suspect_until: None,
            vsn: VSN.to_vec(),
        });
        let mut moved = false;
        if node.addr != addr {
            // A left node may come back elsewhere; a live one keeps its address.
            if node.state != NodeState::Left {
                return Outcome::default();
            }
            moved = true;
        }
        if is_me {
            if a.incarnation < node.incarnation
                || (a.incarnation == node.incarnation && a.meta == node.meta)
            {
                return Outcome::default();
            }
            return self.refute(a.incarnation);
        }
        if a.incarnation <= node.incarnation && !moved && node.incarnation != 0 {
            return Outcome::default();
        }
        let was = node.state;
        let old_meta = std::mem::replace(&mut node.meta, a.meta.clone());
        node.incarnation = a.incarnation;
        node.addr = addr;
        node.suspect_until = None;
        node.tags = memberlist::decode_tags(&node.meta).unwrap_or_default();
        if a.vsn.len() >= 6 {
            node.vsn = a.vsn.clone();
        }
        if was != NodeState::Alive {
            node.state = NodeState::Alive;
            node.since = now;
        }
        let mut outcome = Outcome::gossip(&a.node, memberlist::MessageType::Alive, a);
        outcome.change = if matches!(was, NodeState::Dead | NodeState::Left) {
            node.leaving = false;
            Some(Change::Joined(a.node.clone()))
        } else if old_meta != node.meta {
            Some(Change::Updated(a.node.clone()))
        } else {
            None
        };
        outcome
    }

    /// Memberlist's `suspectNode`: suspected until `now + timeout`, unless it refutes.
    pub fn suspect(&mut self, s: &Suspect, now: Instant, timeout: Duration) -> Outcome {
        let Some(node) = self.nodes.get_mut(&s.node) else {
            return Outcome::default();
        };
        if s.incarnation < node.incarnation || node.state != NodeState::Alive {
            return Outcome::default();
        }
        if s.node == self.me {
            return self.refute(s.incarnation);
        }
        node.incarnation = s.incarnation;
        node.state = NodeState::Suspect;
        node.since = now;
        node.suspect_until = Some(now + timeout);
        Outcome::gossip(&s.node, memberlist::MessageType::Suspect, s)
    }

    /// Memberlist's `deadNode`; a dead message from the node itself is a leave.
    pub fn dead(&mut self, d: &Dead, now: Instant) -> Outcome {
        let Some(node) = self.nodes.get_mut(&d.node) else {
            return Outcome::default();
        };
        if d.incarnation < node.incarnation || node.dead_or_left() {
            return Outcome::default();
        }
        if d.node == self.me && !self.left {
            return self.refute(d.incarnation);
        }
        node.incarnation = d.incarnation;
        node.suspect_until = None;
        node.since = now;
        let left = d.node == d.from || node.leaving;
        node.state = if left {
            NodeState::Left
        } else {
            NodeState::Dead
        };
        let mut outcome = Outcome::gossip(&d.node, memberlist::MessageType::Dead, d);
        outcome.change = Some(if left {
            Change::Left(d.node.clone())
        } else {
            Change::Failed(d.node.clone())
        });
        outcome
    }

    /// Suspicions past their time become dead messages (from this agent).
    pub fn expired_suspicions(&self, now: Instant) -> Vec<Dead> {
        self.nodes
            .values()
            .filter(|n| n.state == NodeState::Suspect && n.suspect_until.is_some_and(|t| t <= now))
            .map(|n| Dead {
                incarnation: n.incarnation,
                node: n.name.clone(),
                from: self.me.clone(),
            })
            .collect()
    }

    /// A remote push-pull's nodes, applied as memberlist's `mergeState` does.
    pub fn merge(
        &mut self,
        remote: &[PushNodeState],
        now: Instant,
        suspicion: Duration,
    ) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        for r in remote {
            outcomes.push(match r.state {
                NodeState::Alive => {
                    let alive = Alive {
                        incarnation: r.incarnation,
                        node: r.name.clone(),
                        addr: r.addr.clone(),
                        port: r.port,
                        meta: r.meta.clone(),
                        vsn: r.vsn.clone(),
                    };
                    self.alive(&alive, now)
                }
                NodeState::Left => self.dead(
                    &Dead {
                        incarnation: r.incarnation,
                        node: r.name.clone(),
                        from: r.name.clone(),
                    },
                    now,
                ),
                // A node dead over there is only suspect here: it may refute.
                NodeState::Dead | NodeState::Suspect => {
                    let suspect = Suspect {
                        incarnation: r.incarnation,
                        node: r.name.clone(),
                        from: self.me.clone(),
                    };
                    self.suspect(&suspect, now, suspicion)
                }
            });
        }
        outcomes
    }

    /// Forgets nodes failed longer than `failed_for` or left longer than `left_for`.
    pub fn reap(&mut self, now: Instant, failed_for: Duration, left_for: Duration) -> Vec<Node> {
        let due: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.name != self.me)
            .filter(|n| match n.state {
                NodeState::Dead => now.duration_since(n.since) >= failed_for,
                NodeState::Left => now.duration_since(n.since) >= left_for,
                _ => false,
            })
            .map(|n| n.name.clone())
            .collect();
        due.iter()
            .filter_map(|name| self.nodes.remove(name))
            .collect()
    }

    /// Forgets a node at once (`force-leave -prune`).
    pub fn remove(&mut self, name: &str) -> Option<Node> {
        if name == self.me {
            return None;
        }
        self.nodes.remove(name)
    }

    /// Memberlist's `refute`: this agent is alive, at an incarnation above `seen`.
    fn refute(&mut self, seen: u32) -> Outcome {
        let me = self.me.clone();
        let Some(node) = self.nodes.get_mut(&me) else {
            return Outcome::default();
        };
        node.incarnation = node.incarnation.max(seen) + 1;
        Outcome::gossip(&me, memberlist::MessageType::Alive, &node.alive_message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn alive(name: &str, port: u16, incarnation: u32, role: &str) -> Alive {
        let tags = BTreeMap::from([("role".to_string(), role.to_string())]);
        Alive {
            incarnation,
            node: name.into(),
            addr: vec![127, 0, 0, 1],
            port,
            meta: memberlist::encode_tags(&tags).unwrap(),
            vsn: VSN.to_vec(),
        }
    }

    fn nodes() -> (Nodes, Instant) {
        let now = Instant::now();
        (Nodes::new("me", addr(1), &BTreeMap::new(), now), now)
    }

    #[test]
    fn alive_messages_join_update_and_are_ignored_when_stale() {
        let (mut nodes, now) = nodes();
        let joined = nodes.alive(&alive("a", 2, 1, "web"), now);
        assert_eq!(joined.change, Some(Change::Joined("a".into())));
        assert_eq!(joined.gossip.len(), 1);
        assert_eq!(nodes.get("a").unwrap().tags["role"], "web");
        // Its versions are passed on as it announced them.
        let older = Alive {
            vsn: vec![1, 5, 2, 2, 5, 4],
            ..alive("o", 9, 1, "web")
        };
        nodes.alive(&older, now);
        assert_eq!(nodes.get("o").unwrap().push_state().vsn, older.vsn);
        let stale = nodes.alive(&alive("a", 2, 1, "db"), now);
        assert!(stale.gossip.is_empty() && stale.change.is_none());
        let updated = nodes.alive(&alive("a", 2, 2, "db"), now);
        assert_eq!(updated.change, Some(Change::Updated("a".into())));
        assert_eq!(nodes.get("a").unwrap().tags["role"], "db");
        // Another address for a live node is a conflict: ignored.
        let moved = nodes.alive(&alive("a", 3, 9, "db"), now);
        assert!(moved.gossip.is_empty());
        assert_eq!(nodes.get("a").unwrap().addr, addr(2));
    }

    #[test]
    fn suspicion_ends_in_failure_unless_refuted_and_a_self_leave_is_a_leave() {
        let (mut nodes, now) = nodes();
        nodes.alive(&alive("a", 2, 1, "web"), now);
        nodes.alive(&alive("b", 3, 1, "web"), now);
        let timeout = Duration::from_secs(4);
        let suspect = Suspect {
            incarnation: 1,
            node: "a".into(),
            from: "me".into(),
        };
        assert_eq!(nodes.suspect(&suspect, now, timeout).gossip.len(), 1);
        assert_eq!(nodes.get("a").unwrap().status(), Status::Suspect);
        assert!(
            nodes
                .expired_suspicions(now + Duration::from_secs(3))
                .is_empty()
        );
        // a refutes with a higher incarnation: alive again, no longer suspected.
        nodes.alive(&alive("a", 2, 2, "web"), now);
        assert_eq!(nodes.get("a").unwrap().status(), Status::Alive);
        assert!(
            nodes
                .expired_suspicions(now + Duration::from_secs(5))
                .is_empty()
        );
        // Suspected again, it does not answer: dead after the timeout.
        let suspect = Suspect {
            incarnation: 2,
            ..suspect
        };
        nodes.suspect(&suspect, now, timeout);
        let expired = nodes.expired_suspicions(now + timeout);
        assert_eq!(expired.len(), 1);
        let failed = nodes.dead(&expired[0], now + timeout);
        assert_eq!(failed.change, Some(Change::Failed("a".into())));
        // b leaves: a dead message from itself.
        let left = nodes.dead(
            &Dead {
                incarnation: 1,
                node: "b".into(),
                from: "b".into(),
            },
            now,
        );
        assert_eq!(left.change, Some(Change::Left("b".into())));
        assert_eq!(nodes.up_count(), 1);
        // Reaped after their timeouts.
        let later = now + Duration::from_secs(100);
        let reaped = nodes.reap(later, Duration::from_secs(50), Duration::from_secs(200));
        assert_eq!(reaped.len(), 1, "only the failed one");
        assert_eq!(reaped[0].name, "a");
    }

    #[test]
    fn this_agent_refutes_suspicion_and_death_until_it_leaves() {
        let (mut nodes, now) = nodes();
        let suspect = Suspect {
            incarnation: 1,
            node: "me".into(),
            from: "a".into(),
        };
        let refuted = nodes.suspect(&suspect, now, Duration::from_secs(1));
        assert_eq!(nodes.me().incarnation, 2);
        assert_eq!(nodes.me().status(), Status::Alive);
        let (kind, body) = refuted.gossip[0].1.split_first().unwrap();
        assert_eq!(*kind, memberlist::MessageType::Alive as u8);
        let alive: Alive = memberlist::decode(body).unwrap();
        assert_eq!(alive.incarnation, 2);
        let dead = Dead {
            incarnation: 5,
            node: "me".into(),
            from: "a".into(),
        };
        nodes.dead(&dead, now);
        assert_eq!(nodes.me().incarnation, 6);
        let leave = nodes.leave();
        assert_eq!(leave.gossip.len(), 1);
        assert_eq!(nodes.me().incarnation, 7);
    }

    #[test]
    fn a_push_pull_merges_dead_as_suspect_and_left_as_left() {
        let (mut nodes, now) = nodes();
        nodes.alive(&alive("a", 2, 1, "web"), now);
        nodes.alive(&alive("b", 3, 1, "web"), now);
        let state = |name: &str, port, state| PushNodeState {
            name: String::from(name),
            addr: vec![127, 0, 0, 1],
            port,
            meta: Vec::new(),
            incarnation: 1,
            state,
            vsn: VSN.to_vec(),
        };
        nodes.merge(
            &[
                state("a", 2, NodeState::Dead),
                state("b", 3, NodeState::Left),
                state("c", 4, NodeState::Alive),
            ],
            now,
            Duration::from_secs(4),
        );
        assert_eq!(nodes.get("a").unwrap().status(), Status::Suspect);
        assert_eq!(nodes.get("b").unwrap().status(), Status::Left);
        assert_eq!(nodes.get("c").unwrap().status(), Status::Alive);
    }
}
