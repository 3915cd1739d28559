//! Queries, keyring changes on every member, and force-leave: the agent's side of them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Actor, Agent, Command, Event, FORCE_LEAVE_PATIENCE, KeyOp, Status, member_of};
use crate::GossipError;
use crate::broadcast::{MAX_QUERY_SIZE, Message, Query};
use crate::keyring::Key;
use crate::packet::{self, Kind};
use crate::query::{
    self, Direct, INTERNAL_PREFIX, Incoming, KeyAnswer, KeyReport, Outgoing, QueryEvent,
    QueryHandle, QueryParams, QueryReply,
};

impl KeyOp {
    /// The internal query that applies this change on every member.
    pub(super) fn to_query(&self) -> (String, Vec<u8>) {
        let (verb, key) = match self {
            KeyOp::Install(key) => ("install-key", Some(key)),
            KeyOp::Use(key) => ("use-key", Some(key)),
            KeyOp::Remove(key) => ("remove-key", Some(key)),
            KeyOp::List => ("list-keys", None),
        };
        (
            format!("{INTERNAL_PREFIX}{verb}"),
            key.map(|k| k.to_base64().into_bytes()).unwrap_or_default(),
        )
    }

    /// The change an internal query asks for; `None` for other queries.
    pub(super) fn from_query(name: &str, payload: &[u8]) -> Option<Result<KeyOp, String>> {
        let verb = name.strip_prefix(INTERNAL_PREFIX)?;
        let key = || {
            std::str::from_utf8(payload)
                .map_err(|e| e.to_string())
                .and_then(|text| Key::from_base64(text).map_err(|e| e.to_string()))
        };
        Some(match verb {
            "install-key" => key().map(KeyOp::Install),
            "use-key" => key().map(KeyOp::Use),
            "remove-key" => key().map(KeyOp::Remove),
            "list-keys" => Ok(KeyOp::List),
            other => Err(format!("unknown internal query {other}")),
        })
    }
}

impl Agent {
    /// Asks the cluster (or the members the filters pick); replies arrive on the handle
    /// until the query's deadline.
    pub async fn query(&self, params: QueryParams) -> Result<QueryHandle, GossipError> {
        self.request(|reply| Command::Query(params, reply)).await?
    }

    /// Answers a query delivered to this agent (once, before its deadline).
    pub async fn respond(&self, id: u64, payload: Vec<u8>) -> Result<(), GossipError> {
        self.request(|reply| Command::Respond(id, payload, reply))
            .await?
    }

    /// Asks the agent at `addr` (joined through) for the user events it remembers; those not
    /// seen here are delivered as if just gossiped (`join -replay`).
    pub async fn replay_from(&self, addr: SocketAddr) -> Result<(), GossipError> {
        self.request(|reply| Command::Replay(addr, reply)).await?
    }

    /// A member's network coordinate (this agent's own included), if known.
    pub async fn coordinate(
        &self,
        node: &str,
    ) -> Result<Option<crate::coordinate::Coordinate>, GossipError> {
        self.request(|reply| Command::Coordinate(node.into(), reply))
            .await
    }

    /// Tells the cluster that a failed member has left for good (Serf's force-leave).
    pub async fn force_leave(&self, node: &str, prune: bool) -> Result<(), GossipError> {
        self.request(|reply| Command::ForceLeave(node.into(), prune, reply))
            .await?
    }

    /// Applies a keyring change on every member (an internal query) and reports each one's
    /// keys or error; waits until every alive member answered or the query timed out.
    pub async fn change_keys_everywhere(&self, op: KeyOp) -> Result<KeyReport, GossipError> {
        let members = self.members().await?;
        let alive = members.iter().filter(|m| m.status == Status::Alive).count();
        let (name, payload) = match self.protocol {
            super::Protocol::Phoenix => op.to_query(),
            super::Protocol::Serf => super::serf_wire::key_query(&op),
        };
        let mut handle = self
            .query(QueryParams {
                name,
                payload,
                ..QueryParams::default()
            })
            .await?;
        let mut report = KeyReport {
            members: alive,
            answers: BTreeMap::new(),
        };
        while report.answers.len() < alive
            && let Some(reply) = handle.next().await
        {
            if let QueryReply::Response(from, payload) = reply {
                let answer = match self.protocol {
                    super::Protocol::Phoenix => {
                        postcard::from_bytes(&payload).unwrap_or_else(|_| KeyAnswer {
                            keys: Vec::new(),
                            error: "unreadable answer".into(),
                        })
                    }
                    super::Protocol::Serf => super::serf_wire::key_answer(&payload),
                };
                report.answers.insert(from, answer);
            }
        }
        Ok(report)
    }
}

impl Actor {
    pub(super) fn ask(&mut self, params: QueryParams) -> Result<QueryHandle, GossipError> {
        let size = params.name.len() + params.payload.len();
        if size > MAX_QUERY_SIZE {
            return Err(GossipError::QueryTooLarge(size));
        }
        if !self.query_limit.take(std::time::Instant::now()) {
            return Err(GossipError::RateLimited);
        }
        let gossip_interval = self
            .swim
            .periodic_gossip
            .as_ref()
            .map_or(Duration::from_millis(200), |p| p.frequency);
        let timeout = params.timeout.unwrap_or_else(|| {
            query::default_timeout(self.foca.num_members() + 1, gossip_interval)
        });
        let ltime = self.log().query_clock.tick();
        let id = rand::Rng::next_u32(&mut self.rng);
        let (replies, receiver) = mpsc::unbounded_channel();
        self.outgoing.insert(
            (ltime, id),
            Outgoing::new(replies, Instant::now() + timeout),
        );
        let me = self.foca.identity();
        let query = Query {
            ltime,
            id,
            name: params.name,
            payload: params.payload,
            origin: me.name.clone(),
            reply_to: me.addr,
            filter_nodes: params.filter_nodes,
            filter_tags: params.filter_tags,
            ack: params.ack,
            relay_factor: params.relay_factor,
            timeout_ms: timeout.as_millis() as u64,
        };
        if let Err(error) = self.broadcast(&Message::Query(query)) {
            self.outgoing.remove(&(ltime, id));
            return Err(error);
        }
        Ok(QueryHandle {
            ltime,
            timeout,
            replies: receiver,
        })
    }

    /// A query reached this agent: ack it, then answer it here (keyring changes) or hand it
    /// to subscribers to answer.
    pub(super) fn on_query(&mut self, query: Query) {
        let me = self.foca.identity().clone();
        if !query::is_asked(&query, &me) {
            return;
        }
        if query.ack {
            let ack = Direct::Ack {
                ltime: query.ltime,
                id: query.id,
                from: me.name.clone(),
            };
            self.send_direct(query.reply_to, ack);
        }
        let deadline = Instant::now() + Duration::from_millis(query.timeout_ms);
        self.next_incoming += 1;
        let id = self.next_incoming;
        let internal = KeyOp::from_query(&query.name, &query.payload);
        let event = QueryEvent {
            id,
            ltime: query.ltime,
            name: query.name.clone(),
            payload: query.payload.clone(),
            origin: query.origin.clone(),
        };
        self.incoming.insert(
            id,
            Incoming {
                query,
                deadline,
                responded: false,
            },
        );
        match internal {
            Some(op) => {
                let answer = match op
                    .map_err(GossipError::BadInternalQuery)
                    .and_then(|op| self.change_keys(op))
                {
                    Ok(keys) => KeyAnswer {
                        keys,
                        error: String::new(),
                    },
                    Err(error) => KeyAnswer {
                        keys: Vec::new(),
                        error: error.to_string(),
                    },
                };
                let payload = postcard::to_allocvec(&answer).unwrap_or_default();
                if let Err(error) = self.respond(id, payload) {
                    tracing::warn!(%error, "cannot answer a keyring query");
                }
            }
            None => {
                let _ = self.events.send(Event::Query(event));
            }
        }
    }

    pub(super) fn respond(&mut self, id: u64, payload: Vec<u8>) -> Result<(), GossipError> {
        if payload.len() > MAX_QUERY_SIZE {
            return Err(GossipError::ResponseTooLarge(payload.len()));
        }
        let incoming = self
            .incoming
            .get_mut(&id)
            .ok_or(GossipError::UnknownQuery(id))?;
        if incoming.responded {
            return Err(GossipError::AlreadyResponded(id));
        }
        if Instant::now() > incoming.deadline {
            return Err(GossipError::PastDeadline(id));
        }
        incoming.responded = true;
        let query = &incoming.query;
        let (reply_to, relay_factor, origin) =
            (query.reply_to, query.relay_factor, query.origin.clone());
        let response = Direct::Response {
            ltime: query.ltime,
            id: query.id,
            from: self.foca.identity().name.clone(),
            payload,
        };
        for relay in self.relays(&origin, relay_factor) {
            let relayed = Direct::Relay {
                to: reply_to,
                message: Box::new(response.clone()),
            };
            self.send_direct(relay, relayed);
        }
        self.send_direct(reply_to, response);
        Ok(())
    }

    /// Up to `relay_factor` alive members other than this one and `origin`, picked at
    /// random, to relay an answer.
    pub(super) fn relays(&mut self, origin: &str, relay_factor: u8) -> Vec<SocketAddr> {
        let me = self.foca.identity().name.clone();
        let mut candidates: Vec<SocketAddr> = self
            .members
            .values()
            .filter(|k| k.status == Status::Alive && k.id.name != me && k.id.name != origin)
            .map(|k| k.id.addr)
            .collect();
        let wanted = usize::from(relay_factor).min(candidates.len());
        for i in 0..wanted {
            let pick = i + rand::Rng::next_u32(&mut self.rng) as usize % (candidates.len() - i);
            candidates.swap(i, pick);
        }
        candidates.truncate(wanted);
        candidates
    }

    /// Sends a direct message (to this agent itself without the network).
    pub(super) fn send_direct(&mut self, to: SocketAddr, message: Direct) {
        if to == self.foca.identity().addr {
            return self.on_direct(message);
        }
        match postcard::to_allocvec(&message) {
            Ok(body) => {
                let packet = packet::encode(Kind::Direct, &body, self.keyring.as_ref());
                self.outbox.push((to, packet));
            }
            Err(error) => tracing::warn!(%error, "cannot encode a direct message"),
        }
    }

    pub(super) fn on_direct(&mut self, message: Direct) {
        let (key, reply) = match message {
            Direct::Ack { ltime, id, from } => ((ltime, id), QueryReply::Ack(from)),
            Direct::Response {
                ltime,
                id,
                from,
                payload,
            } => ((ltime, id), QueryReply::Response(from, payload)),
            Direct::Relay { to, message } => {
                // One hop only: a relayed message is never relayed again.
                if !matches!(*message, Direct::Relay { .. }) {
                    self.send_direct(to, *message);
                }
                return;
            }
            Direct::Pong { seq, from, coord } => return self.on_pong(seq, from, coord),
            // These are answered where their packet came from (see `on_packet`); one that
            // got here was relayed, and is not answered.
            Direct::Ping { .. } | Direct::ReplayAsk { .. } | Direct::Replayed { .. } => return,
        };
        if let Some(outgoing) = self.outgoing.get_mut(&key) {
            outgoing.take(reply);
        }
    }

    /// Closes the queries past their deadline (their handles then end).
    pub(super) fn close_queries(&mut self) {
        let now = Instant::now();
        self.outgoing.retain(|_, q| q.deadline > now);
    }

    pub(super) fn broadcast_force_leave(
        &mut self,
        name: String,
        prune: bool,
    ) -> Result<(), GossipError> {
        // Sent even when the member still looks alive here: others may know better, and
        // whoever lists it alive ignores the intent.
        if !self.members.contains_key(&name) {
            return Err(GossipError::UnknownMember(name));
        }
        // An intent about a member: Serf's member clock, not the user events'.
        let ltime = self.log().member_clock.tick();
        match prune {
            true => self.broadcast(&Message::ForceLeavePrune { ltime, name }),
            false => self.broadcast(&Message::ForceLeave { ltime, name }),
        }
    }

    /// A failed member was forced out: list it as left (and forget it, when pruned).
    pub(super) fn on_force_leave(&mut self, name: &str, prune: bool) {
        let Some(known) = self.members.get_mut(name) else {
            return;
        };
        if known.status == Status::Left {
            if prune {
                self.prune(name);
            }
            return;
        }
        if known.status != Status::Failed {
            // This agent has not seen it fail yet: the intent waits for a while.
            self.forced.insert(
                name.to_string(),
                (Instant::now() + FORCE_LEAVE_PATIENCE, prune),
            );
            return;
        }
        known.status = Status::Left;
        known.since = Instant::now();
        self.snapshot_dirty = true;
        let member = member_of(&known.id, Status::Left);
        self.publish(Event::MemberLeave(member));
        if prune {
            self.prune(name);
        }
    }
}
