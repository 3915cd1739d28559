//! `protocol = "serf"`: the agent speaking memberlist's and Serf's own wire protocol, so it
//! joins a cluster of `serf agent`s and they join it. One task owns the UDP socket and the
//! cluster's state, as the foca agent does, and answers the same commands; TCP push-pulls
//! (joins and the periodic anti-entropy sync) run on tasks of their own and hand their
//! result back.
//!
//! What it does, after memberlist and Serf: it probes one member per probe interval
//! (directly, then through three others), suspects and then declares dead the ones that do not
//! answer, refutes suspicion of itself, gossips alive, suspect and dead messages and Serf's
//! messages a bounded number of times each (piggybacked on every packet it sends), syncs its
//! state with a random member every 30 s, and keeps Serf's three Lamport clocks, join and leave
//! intents, user events and queries.

mod events;
mod nodes;
mod queue;
mod stream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{RngExt, SeedableRng};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{Agent, AgentConfig, Command, Event, KeyOp, Stats};
use crate::GossipError;
use crate::broadcast::{
    LamportClock, MAX_EVENT_SIZE, MAX_QUERY_SIZE, RateLimit, UserEvent, Window,
};
use crate::keyring::{Key, Keyring};
use crate::memberlist::{
    self, Ack, Dead, IndirectPing, MessageType, Nack, Ping, PushPull, SerfJoin, SerfKeyRequest,
    SerfKeyResponse, SerfLeave, SerfMessage, SerfMessageType, SerfPushPull, SerfQuery,
    SerfQueryResponse, SerfUserEvent, SerfUserEvents, Suspect,
};
use crate::query::{KeyAnswer, Outgoing, QueryEvent, QueryHandle, QueryParams, QueryReply};
use crate::snapshot::Snapshot;
use nodes::{Change, Nodes, Outcome};
use queue::Queue;

/// Memberlist's LAN timings (Serf's default profile).
#[derive(Debug, Clone, Copy)]
struct Timing {
    probe_interval: Duration,
    probe_timeout: Duration,
    gossip_interval: Duration,
    gossip_nodes: usize,
    indirect_checks: usize,
    suspicion_mult: f64,
    retransmit_mult: u32,
    push_pull_interval: Duration,
    /// How long a leave is gossiped before the agent stops (Serf's `LeavePropagateDelay`).
    leave_propagate: Duration,
    /// How often a failed member is contacted again, so a healed partition merges (Serf's
    /// `reconnect_interval`).
    reconnect_interval: Duration,
}

impl Timing {
    fn from(config: &AgentConfig) -> Timing {
        Timing {
            probe_interval: config.swim.probe_period,
            probe_timeout: config.swim.probe_rtt,
            gossip_interval: Duration::from_millis(200),
            gossip_nodes: 3,
            indirect_checks: 3,
            suspicion_mult: config.suspicion_mult,
            retransmit_mult: 4,
            push_pull_interval: Duration::from_secs(30),
            leave_propagate: Duration::from_secs(1),
            reconnect_interval: config.reconnect_interval,
        }
    }

    /// Memberlist's `suspicionTimeout` for a cluster of `members`.
    fn suspicion(&self, members: usize) -> Duration {
        let scale = (members.max(1) as f64).log10().max(1.0);
        self.probe_interval.mul_f64(self.suspicion_mult * scale)
    }
}

/// Memberlist's UDP packet size, less room for the compound header, a label and sealing.
const PACKET_BUDGET: usize = 1400 - 64;

/// The probe under way.
struct Probe {
    target: String,
    addr: SocketAddr,
    seq: u32,
    sent: Instant,
    indirect_at: Instant,
    deadline: Instant,
    acked: bool,
}

/// Who waits for an ack with a given sequence number.
enum Waiter {
    Probe,
    /// An indirect probe made for `to`, who used sequence number `seq`.
    Relay {
        to: SocketAddr,
        seq: u32,
        nack_at: Option<Instant>,
        expires: Instant,
    },
}

/// Where a query's acks and answers go: the asker, and (Serf's relay factor) through how
/// many other members each is also sent.
#[derive(Clone)]
struct ReplyTo {
    addr: SocketAddr,
    node: String,
    relay_factor: u8,
}

/// A query delivered here, waiting for this agent's answer.
struct Asked {
    reply_to: ReplyTo,
    ltime: u64,
    id: u32,
    deadline: Instant,
    responded: bool,
}

/// Why this agent starts a push-pull.
enum Pull {
    /// The periodic anti-entropy sync, or a reconnect.
    Sync,
    /// A join: the cluster's past events are not delivered; `joined` hears it is done.
    Join(oneshot::Sender<()>),
    /// `join -replay`: the events the member remembers are delivered, unless seen here.
    Replay(oneshot::Sender<Result<(), GossipError>>),
}

/// What the TCP tasks hand back.
enum Inbound {
    /// A peer's push-pull, to merge; our state goes back on `answer`.
    Pushed(PushPull, oneshot::Sender<PushPull>),
    /// A peer's fallback probe: the ack goes back on `answer` (none when the ping is for
    /// another node).
    Pinged(Ping, oneshot::Sender<Option<Ack>>),
    /// The ack to our own fallback probe with this sequence number.
    TcpAcked(u32),
    /// The answer to our push-pull, and why we sent it.
    Pulled(PushPull, Pull),
}

struct Wire {
    me: String,
    addr: SocketAddr,
    socket: Arc<UdpSocket>,
    keyring: Option<Keyring>,
    timing: Timing,
    nodes: Nodes,
    queue: Queue,
    member_clock: LamportClock,
    event_clock: LamportClock,
    query_clock: LamportClock,
    events_seen: Window,
    /// The user events of the last 512 Lamport times, for push-pulls.
    event_buffer: events::EventBuffer,
    queries_seen: Window,
    /// User events at or before this time are not delivered (set by a join, as Serf's
    /// `eventMinTime`, so a joiner does not replay the cluster's past).
    event_min: u64,
    /// Join and leave intents about nodes not known yet: their latest Lamport time.
    intents: HashMap<String, u64>,
    events: broadcast::Sender<Event>,
    stats: Arc<Stats>,
    rng: SmallRng,
    next_seq: u32,
    probe: Option<Probe>,
    probe_order: Vec<String>,
    waiters: HashMap<u32, Waiter>,
    outgoing: HashMap<(u64, u32), Outgoing>,
    asked: HashMap<u64, Asked>,
    next_asked: u64,
    event_limit: RateLimit,
    query_limit: RateLimit,
    reap_after: Duration,
    reap_left_after: Duration,
    inbound: mpsc::UnboundedSender<Inbound>,
    /// A leave under way: whom to tell it is done, and when.
    leaving: Option<(oneshot::Sender<()>, Instant)>,
    /// Where members and clocks are kept (Serf's snapshot format), and what was written last.
    snapshot: Option<PathBuf>,
    written: Snapshot,
    /// Where the tags are kept after every change.
    tags_file: Option<PathBuf>,
    /// Where the keyring is kept after every change, and the keyring the TCP listener uses
    /// (kept up to date with `keyring`).
    keyring_file: Option<PathBuf>,
    listener_keyring: watch::Sender<Option<Keyring>>,
    /// This agent's Vivaldi state (`None`: coordinates disabled), and the coordinates members
    /// sent in their acks.
    vivaldi: Option<crate::coordinate::Client>,
    coordinates: HashMap<String, crate::coordinate::Coordinate>,
}

/// Binds the UDP socket and the TCP listener on the same port and starts the agent's task.
pub(super) async fn start(config: AgentConfig) -> Result<Agent, GossipError> {
    let (socket, local, addr) = super::handle::bind(&config).await?;
    let listener = TcpListener::bind(local)
        .await
        .map_err(|e| GossipError::Bind(local, e))?;
    let previous = config
        .snapshot
        .as_deref()
        .map(|path| Snapshot::read(path, config.rejoin_after_leave))
        .unwrap_or_default();
    let (commands, inbox) = mpsc::unbounded_channel();
    let (events, _) = broadcast::channel(4096);
    let (inbound, inbound_rx) = mpsc::unbounded_channel();
    let (listener_keyring, keyring_rx) = watch::channel(config.keyring.clone());
    let stats = Arc::new(Stats::default());
    let now = Instant::now();
    let mut wire = Wire {
        me: config.node.clone(),
        addr,
        socket: Arc::new(socket),
        keyring: config.keyring.clone(),
        timing: Timing::from(&config),
        nodes: Nodes::new(&config.node, addr, &config.tags, now),
        queue: Queue::default(),
        member_clock: LamportClock::default(),
        event_clock: LamportClock::default(),
        query_clock: LamportClock::default(),
        events_seen: Window::default(),
        event_buffer: events::EventBuffer::default(),
        queries_seen: Window::default(),
        event_min: 0,
        intents: HashMap::new(),
        events: events.clone(),
        stats: stats.clone(),
        rng: SmallRng::seed_from_u64(config.seed),
        next_seq: 0,
        probe: None,
        probe_order: Vec::new(),
        waiters: HashMap::new(),
        outgoing: HashMap::new(),
        asked: HashMap::new(),
        next_asked: 0,
        event_limit: RateLimit::new(config.event_rate.0, config.event_rate.1),
        query_limit: RateLimit::new(config.query_rate.0, config.query_rate.1),
        reap_after: config.reap_after,
        reap_left_after: config.reap_left_after,
        inbound: inbound.clone(),
        leaving: None,
        snapshot: config.snapshot.clone(),
        written: Snapshot::default(),
        tags_file: config.tags_file.clone(),
        keyring_file: config.keyring_file.clone(),
        listener_keyring,
        vivaldi: config.coordinates.then(|| {
            crate::coordinate::Client::new(SmallRng::seed_from_u64(config.seed.wrapping_add(2)))
        }),
        coordinates: HashMap::new(),
    };
    wire.restore(&previous);
    // Serf announces itself with a join intent, and lists itself first.
    let ltime = wire.member_clock.tick();
    wire.join_intent(&config.node, ltime);
    wire.publish(Event::MemberJoin(wire.nodes.me().member()));
    tokio::spawn(listen(listener, inbound, keyring_rx));
    tokio::spawn(wire.run(inbox, inbound_rx));
    let agent = Agent {
        commands,
        events,
        stats,
        local,
        name: config.node,
        protocol: super::Protocol::Serf,
    };
    if !previous.left && !previous.alive.is_empty() {
        tokio::spawn(super::handle::rejoin(agent.clone(), previous, addr));
    }
    Ok(agent)
}

/// Accepts push-pulls: each is read, handed to the agent, and answered with its state.
async fn listen(
    listener: TcpListener,
    inbound: mpsc::UnboundedSender<Inbound>,
    keyring: watch::Receiver<Option<Keyring>>,
) {
    loop {
        let Ok((mut conn, peer)) = listener.accept().await else {
            continue;
        };
        if inbound.is_closed() {
            return;
        }
        let inbound = inbound.clone();
        let keyring = keyring.borrow().clone();
        tokio::spawn(async move {
            let work = async {
                match stream::read(&mut conn, keyring.as_ref()).await? {
                    memberlist::StreamMessage::PushPull(theirs) => {
                        let (answer, ours) = oneshot::channel();
                        if inbound.send(Inbound::Pushed(theirs, answer)).is_err() {
                            return Ok(());
                        }
                        if let Ok(ours) = ours.await {
                            stream::write(&mut conn, &ours, keyring.as_ref()).await?;
                        }
                    }
                    memberlist::StreamMessage::Ping(ping) => {
                        let (answer, ack) = oneshot::channel();
                        if inbound.send(Inbound::Pinged(ping, answer)).is_err() {
                            return Ok(());
                        }
                        if let Ok(Some(ack)) = ack.await {
                            let kind = MessageType::Ack;
                            stream::write_message(&mut conn, kind, &ack, keyring.as_ref()).await?;
                        }
                    }
                    // Nobody sends an ack unasked.
                    memberlist::StreamMessage::Ack(_) => {}
                }
                Ok::<(), stream::StreamError>(())
            };
            match tokio::time::timeout(stream::TIMEOUT, work).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, "push-pull from a peer failed: {e}"),
                Err(_) => tracing::debug!(%peer, "push-pull from a peer timed out"),
            }
        });
    }
}

impl Wire {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut inbound: mpsc::UnboundedReceiver<Inbound>,
    ) {
        let mut buf = vec![0u8; 65536];
        let mut probe = tokio::time::interval(self.timing.probe_interval);
        let mut gossip = tokio::time::interval(self.timing.gossip_interval);
        let mut housekeeping = tokio::time::interval(Duration::from_millis(50));
        let mut push_pull = tokio::time::interval(self.timing.push_pull_interval);
        push_pull.tick().await;
        let mut reconnect = tokio::time::interval(self.timing.reconnect_interval);
        reconnect.tick().await;
        let socket = self.socket.clone();
        loop {
            tokio::select! {
                received = socket.recv_from(&mut buf) => {
                    if let Ok((len, from)) = received {
                        self.on_packet(&buf[..len], from).await;
                    }
                }
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command).await,
                    // Every handle dropped: stop without a leave, as a crash would.
                    None => return,
                },
                Some(message) = inbound.recv() => self.on_inbound(message),
                _ = probe.tick() => {
                    self.probe().await;
                    self.save_snapshot(false);
                }
                _ = gossip.tick() => self.gossip().await,
                _ = housekeeping.tick() => {
                    self.housekeeping().await;
                    if self.leaving.as_ref().is_some_and(|(_, until)| Instant::now() >= *until) {
                        if let Some((done, _)) = self.leaving.take() {
                            self.save_snapshot(true);
                            let _ = done.send(());
                        }
                        return;
                    }
                }
                _ = push_pull.tick() => self.sync_with_someone(),
                _ = reconnect.tick() => self.reconnect(),
            }
        }
    }

    fn publish(&self, event: Event) {
        super::announce(&self.events, event);
    }

    fn seq(&mut self) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1);
        self.next_seq
    }

    /// Sends `messages` to `to` in one packet, with as much queued gossip as fits.
    async fn send(&mut self, to: SocketAddr, mut messages: Vec<Vec<u8>>) {
        let used: usize = messages.iter().map(|m| m.len() + 2).sum();
        let limit = queue::retransmit_limit(self.timing.retransmit_mult, self.nodes.up_count());
        messages.extend(self.queue.take(PACKET_BUDGET.saturating_sub(used), limit));
        if messages.is_empty() {
            return;
        }
        match memberlist::packet(&messages, "", self.keyring.as_ref()) {
            Ok(packet) => {
                if self.socket.send_to(&packet, to).await.is_ok() {
                    self.stats.packets_sent.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .bytes_sent
                        .fetch_add(packet.len() as u64, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!(%to, "cannot frame a packet: {e}"),
        }
    }

    async fn send_one<T: serde::Serialize>(&mut self, to: SocketAddr, kind: MessageType, body: &T) {
        if let Ok(message) = memberlist::encode(kind, body) {
            self.send(to, vec![message]).await;
        }
    }

    fn ping_to(&self, node: &str, seq: u32) -> Ping {
        Ping {
            seq_no: seq,
            node: node.to_string(),
            source_addr: memberlist::ip_bytes(self.addr.ip()),
            source_port: self.addr.port(),
            source_node: self.me.clone(),
        }
    }

    async fn on_packet(&mut self, bytes: &[u8], from: SocketAddr) {
        self.stats.packets_received.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_received
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let packet = match memberlist::parse_packet(bytes, self.keyring.as_ref()) {
            Ok(packet) => packet,
            Err(e) => {
                self.stats.packets_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%from, "dropped a packet: {e}");
                return;
            }
        };
        for (kind, body) in packet.messages {
            if let Err(e) = self.on_message(kind, &body, from).await {
                self.stats.messages_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%from, "refused a {kind:?} message: {e}");
            }
        }
    }

    async fn on_message(
        &mut self,
        kind: MessageType,
        body: &[u8],
        from: SocketAddr,
    ) -> Result<(), memberlist::WireError> {
        let now = Instant::now();
        match kind {
            MessageType::Ping => {
                let ping: Ping = memberlist::decode(body)?;
                if let Some(ack) = self.ack_for(&ping) {
                    let to = ping.source().unwrap_or(from);
                    self.send_one(to, MessageType::Ack, &ack).await;
                }
            }
            MessageType::IndirectPing => {
                let ask: IndirectPing = memberlist::decode(body)?;
                let Some(target) = ask.target() else {
                    return Ok(());
                };
                let seq = self.seq();
                let ping = self.ping_to(&ask.node, seq);
                self.waiters.insert(
                    seq,
                    Waiter::Relay {
                        to: ask.source().unwrap_or(from),
                        seq: ask.seq_no,
                        nack_at: ask.nack.then(|| now + self.timing.probe_timeout),
                        expires: now + self.timing.probe_interval,
                    },
                );
                self.send_one(target, MessageType::Ping, &ping).await;
            }
            MessageType::Ack => {
                let ack: Ack = memberlist::decode(body)?;
                match self.waiters.remove(&ack.seq_no) {
                    Some(Waiter::Probe) => {
                        if let Some(probe) = self.probe.as_mut().filter(|p| p.seq == ack.seq_no) {
                            probe.acked = true;
                            // Memberlist times only direct acks, in the probe's first phase.
                            if now < probe.indirect_at {
                                let (target, rtt) = (probe.target.clone(), now - probe.sent);
                                self.learn_coordinate(target, &ack.payload, rtt);
                            }
                        }
                    }
                    Some(Waiter::Relay { to, seq, .. }) => {
                        let relayed = Ack {
                            seq_no: seq,
                            payload: ack.payload,
                        };
                        self.send_one(to, MessageType::Ack, &relayed).await;
                    }
                    None => {}
                }
            }
            MessageType::Alive => {
                let alive = memberlist::decode(body)?;
                let outcome = self.nodes.alive(&alive, now);
                self.apply(outcome);
            }
            MessageType::Suspect => {
                let suspect: Suspect = memberlist::decode(body)?;
                let timeout = self.timing.suspicion(self.nodes.up_count());
                let outcome = self.nodes.suspect(&suspect, now, timeout);
                self.apply(outcome);
            }
            MessageType::Dead => {
                let dead: Dead = memberlist::decode(body)?;
                let outcome = self.nodes.dead(&dead, now);
                self.apply(outcome);
            }
            MessageType::User => self.on_serf(memberlist::decode_serf(body)?).await,
            // Nacks only tell memberlist's local health; the rest never comes over UDP.
            _ => {}
        }
        Ok(())
    }

    /// Gossips what a state change asks for and tells subscribers.
    fn apply(&mut self, outcome: Outcome) {
        for (about, message) in outcome.gossip {
            self.queue.push(Some(about), message);
        }
        let Some(change) = outcome.change else {
            return;
        };
        let (Change::Joined(name)
        | Change::Updated(name)
        | Change::Left(name)
        | Change::Failed(name)) = &change;
        let Some(member) = self.nodes.get(name).map(|n| n.member()) else {
            return;
        };
        if let Some(ltime) = self.intents.remove(name)
            && let Some(node) = self.nodes.get_mut(name)
        {
            node.status_ltime = node.status_ltime.max(ltime);
        }
        self.publish(match change {
            Change::Joined(_) => Event::MemberJoin(member),
            Change::Updated(_) => Event::MemberUpdate(member),
            Change::Left(_) => Event::MemberLeave(member),
            Change::Failed(_) => Event::MemberFailed(member),
        });
    }

    /// Gossips a Serf message to everyone.
    fn broadcast_serf<T: serde::Serialize>(&mut self, kind: SerfMessageType, body: &T) {
        match memberlist::encode_serf(kind, body) {
            Ok(message) => self.queue.push(None, message),
            Err(e) => tracing::warn!("cannot encode a {kind:?} message: {e}"),
        }
    }

    async fn on_serf(&mut self, message: SerfMessage) {
        match message {
            SerfMessage::Join(join) => {
                self.member_clock.witness(join.ltime);
                if self.join_intent(&join.node, join.ltime) {
                    self.broadcast_serf(SerfMessageType::Join, &join);
                }
            }
            SerfMessage::Leave(leave) => {
                self.member_clock.witness(leave.ltime);
                if self.leave_intent(&leave) {
                    self.broadcast_serf(SerfMessageType::Leave, &leave);
                }
            }
            SerfMessage::UserEvent(event) => {
                self.event_clock.witness(event.ltime);
                if self.take_event(&event, false) {
                    self.broadcast_serf(SerfMessageType::UserEvent, &event);
                }
            }
            SerfMessage::Query(query) => {
                self.query_clock.witness(query.ltime);
                let key = (query.ltime, query.id.to_string(), Vec::new());
                if self.queries_seen.accept(key) {
                    self.broadcast_serf(SerfMessageType::Query, &query);
                    self.answer_if_asked(&query).await;
                }
            }
            SerfMessage::QueryResponse(response) => {
                if let Some(outgoing) = self.outgoing.get_mut(&(response.ltime, response.id)) {
                    outgoing.take(if response.flags & memberlist::QUERY_FLAG_ACK != 0 {
                        QueryReply::Ack(response.from)
                    } else {
                        QueryReply::Response(response.from, response.payload)
                    });
                }
            }
            // Serf relays query responses only: nothing else is passed on.
            SerfMessage::Relay(relay) => {
                if relay.message.first() == Some(&(SerfMessageType::QueryResponse as u8)) {
                    tracing::debug!("relaying a response to {} ({})", relay.to, relay.node);
                    self.send(relay.to, vec![relay.user_message()]).await;
                }
            }
            SerfMessage::Other(_) => {}
        }
    }

    /// Serf's `handleNodeJoinIntent`; true when it is news (to gossip on).
    fn join_intent(&mut self, node: &str, ltime: u64) -> bool {
        match self.nodes.get_mut(node) {
            Some(member) if ltime > member.status_ltime => {
                member.status_ltime = ltime;
                member.leaving = false;
                true
            }
            Some(_) => false,
            None => self.remember_intent(node, ltime),
        }
    }

    /// Serf's `handleNodeLeaveIntent`; true when it is news (to gossip on).
    fn leave_intent(&mut self, leave: &SerfLeave) -> bool {
        if leave.node == self.me {
            if self.leaving.is_none() {
                // An old leave intent about this agent: refuted with a newer join intent.
                let ltime = self.member_clock.tick();
                self.join_intent(&leave.node.clone(), ltime);
                let join = SerfJoin {
                    ltime,
                    node: self.me.clone(),
                };
                self.broadcast_serf(SerfMessageType::Join, &join);
            }
            return false;
        }
        let Some(member) = self.nodes.get_mut(&leave.node) else {
            return self.remember_intent(&leave.node, leave.ltime);
        };
        if leave.ltime <= member.status_ltime {
            return false;
        }
        member.status_ltime = leave.ltime;
        match member.state {
            memberlist::NodeState::Alive | memberlist::NodeState::Suspect => member.leaving = true,
            memberlist::NodeState::Dead => {
                // Force-leave: a failed member is listed as left from now on.
                member.state = memberlist::NodeState::Left;
                member.since = Instant::now();
                let left = member.member();
                self.publish(Event::MemberLeave(left));
            }
            memberlist::NodeState::Left => {}
        }
        if leave.prune
            && let Some(gone) = self.nodes.remove(&leave.node)
        {
            self.forget_coordinate(&gone.name);
            self.publish(Event::MemberReap(gone.member()));
        }
        true
    }

    /// An intent about a node not known yet; true when newer than one heard before.
    fn remember_intent(&mut self, node: &str, ltime: u64) -> bool {
        const REMEMBERED: usize = 4096;
        let known = self.intents.get(node).copied().unwrap_or(0);
        if ltime <= known || (self.intents.len() >= REMEMBERED && known == 0) {
            return false;
        }
        self.intents.insert(node.to_string(), ltime);
        true
    }

    /// A user event: delivered once, unless from before this agent joined.
    /// Delivers a user event not seen before (`replay`: even one from before this agent
    /// joined); false when it is not news.
    fn take_event(&mut self, event: &SerfUserEvent, replay: bool) -> bool {
        if event.ltime <= self.event_min && !replay {
            return false;
        }
        // As Serf: older than the event buffer reaches is too old to tell.
        let now = self.event_clock.time();
        if now > events::EVENT_BUFFER && event.ltime < now - events::EVENT_BUFFER {
            return false;
        }
        let key = (event.ltime, event.name.clone(), event.payload.clone());
        if !self.events_seen.accept(key) {
            return false;
        }
        self.event_buffer
            .record(event.ltime, &event.name, &event.payload);
        self.publish(Event::User(UserEvent {
            ltime: event.ltime,
            name: event.name.clone(),
            payload: event.payload.clone(),
            coalesce: event.cc,
            origin: String::new(),
        }));
        true
    }

    /// Acks (when asked to) and delivers a query this agent's name and tags match.
    async fn answer_if_asked(&mut self, query: &SerfQuery) {
        let me = self.nodes.me();
        if !query.addressed_to(&me.name, &me.tags) {
            return;
        }
        let Some(addr) = query.reply_to() else {
            return;
        };
        let reply_to = ReplyTo {
            addr,
            node: query.source_node.clone(),
            relay_factor: query.relay_factor,
        };
        if query.wants_ack() {
            let ack = query.response(&self.me, true, Vec::new());
            self.send_response(&reply_to, &ack).await;
        }
        // Serf's own queries (`_serf_…`) are answered by the agent: not for handlers.
        if let Some(verb) = query.name.strip_prefix("_serf_") {
            if let Some(answer) = self.answer_internal(verb, &query.payload) {
                let response = query.response(&self.me, false, answer);
                self.send_response(&reply_to, &response).await;
            }
            return;
        }
        let timeout = Duration::from_nanos(u64::try_from(query.timeout).unwrap_or(0));
        self.next_asked += 1;
        let id = self.next_asked;
        self.asked.insert(
            id,
            Asked {
                reply_to,
                ltime: query.ltime,
                id: query.id,
                deadline: Instant::now() + timeout,
                responded: false,
            },
        );
        self.publish(Event::Query(QueryEvent {
            id,
            ltime: query.ltime,
            name: query.name.clone(),
            payload: query.payload.clone(),
            origin: query.source_node.clone(),
        }));
    }

    /// Serf's `NotifyPingComplete`: the round trip of a direct probe and the coordinate in
    /// its ack move this agent's coordinate; the member's is kept (checked first).
    fn learn_coordinate(&mut self, node: String, payload: &[u8], rtt: Duration) {
        let Some(vivaldi) = self.vivaldi.as_mut() else {
            return;
        };
        let Some(theirs) = memberlist::read_coordinate_payload(payload) else {
            return;
        };
        match vivaldi.update(&node, &theirs, rtt) {
            Ok(()) => {
                self.coordinates.insert(node, theirs);
            }
            Err(error) => tracing::debug!(%node, %error, "coordinate refused"),
        }
    }

    /// A member's coordinate (this agent's own included), if known.
    fn coordinate_of(&self, node: &str) -> Option<crate::coordinate::Coordinate> {
        let vivaldi = self.vivaldi.as_ref()?;
        if node == self.me {
            return Some(vivaldi.coordinate().clone());
        }
        self.coordinates.get(node).cloned()
    }

    fn forget_coordinate(&mut self, node: &str) {
        self.coordinates.remove(node);
        if let Some(vivaldi) = self.vivaldi.as_mut() {
            vivaldi.forget(node);
        }
    }

    /// Serf's answer to one of its internal queries: the keyring ones change or list this
    /// agent's keys, `conflict` says where this agent knows the node named, `ping` is
    /// answered by its ack alone.
    fn answer_internal(&mut self, verb: &str, payload: &[u8]) -> Option<Vec<u8>> {
        if verb == "conflict" {
            return self.answer_conflict(payload);
        }
        let op = match verb {
            "list-keys" => Ok(KeyOp::List),
            "install-key" | "use-key" | "remove-key" => {
                let request = memberlist::decode_serf_payload::<SerfKeyRequest>(
                    SerfMessageType::KeyRequest,
                    payload,
                );
                request
                    .map_err(|e| format!("Failed to decode key request: {e}"))
                    .and_then(|r| Key::from_bytes(r.key).map_err(|e| e.to_string()))
                    .map(|key| match verb {
                        "install-key" => KeyOp::Install(key),
                        "use-key" => KeyOp::Use(key),
                        _ => KeyOp::Remove(key),
                    })
            }
            _ => return None,
        };
        let listing = verb == "list-keys";
        let refused = |error| serf_key_message(error, listing);
        let response = match op.and_then(|op| self.change_keys(op).map_err(refused)) {
            // Serf lists the keys only when asked to.
            Ok(keys) if listing => SerfKeyResponse {
                result: true,
                primary_key: keys.first().cloned().unwrap_or_default(),
                keys,
                message: String::new(),
            },
            Ok(_) => SerfKeyResponse {
                result: true,
                ..SerfKeyResponse::default()
            },
            Err(message) => SerfKeyResponse {
                message,
                ..SerfKeyResponse::default()
            },
        };
        memberlist::encode_serf_payload(SerfMessageType::KeyResponse, &response).ok()
    }

    /// Serf's name-conflict vote: this agent's view of the node named (nil when unknown); a
    /// question about itself gets no answer, as in Serf.
    fn answer_conflict(&self, payload: &[u8]) -> Option<Vec<u8>> {
        let name = std::str::from_utf8(payload).ok()?;
        if name == self.me {
            return None;
        }
        let member = self.nodes.get(name).map(|node| {
            let status = match node.status() {
                _ if node.leaving && !node.dead_or_left() => 2,
                super::Status::Alive | super::Status::Suspect => 1,
                super::Status::Left => 3,
                super::Status::Failed => 4,
            };
            let vsn = |i: usize| node.vsn.get(i).copied().unwrap_or(0);
            memberlist::SerfMember {
                name: node.name.clone(),
                addr: memberlist::ip_bytes(node.addr.ip()),
                port: node.addr.port(),
                tags: node.tags.clone(),
                status,
                protocol_min: vsn(0),
                protocol_max: vsn(1),
                protocol_cur: vsn(2),
                delegate_min: vsn(3),
                delegate_max: vsn(4),
                delegate_cur: vsn(5),
            }
        });
        memberlist::encode_serf_payload(SerfMessageType::ConflictResponse, &member).ok()
    }

    /// Changes this agent's keyring (and its file), and the TCP listener's with it.
    fn change_keys(&mut self, op: KeyOp) -> Result<Vec<String>, GossipError> {
        let keys = super::change_keys(self.keyring.as_mut(), op, self.keyring_file.as_deref())?;
        self.listener_keyring.send_replace(self.keyring.clone());
        Ok(keys)
    }

    /// Sends an ack or an answer to the asker, and the same through `relay_factor` other
    /// members (alive, speaking Serf's protocol 5), as Serf's `relayResponse`.
    async fn send_response(&mut self, to: &ReplyTo, response: &SerfQueryResponse) {
        let message = match memberlist::encode_serf(SerfMessageType::QueryResponse, response) {
            Ok(message) => message,
            Err(e) => return tracing::warn!("cannot encode a query response: {e}"),
        };
        if to.relay_factor > 0 {
            self.relay_response(to, &message).await;
        }
        self.send(to.addr, vec![message]).await;
    }

    /// Serf's `relayResponse`: the same message through `relay_factor` other members (alive,
    /// speaking Serf's protocol 5), none unless there are that many to pick from.
    async fn relay_response(&mut self, to: &ReplyTo, message: &[u8]) {
        let factor = usize::from(to.relay_factor);
        let relays: Vec<SocketAddr> = self
            .nodes
            .others_up()
            .filter(|n| n.state == memberlist::NodeState::Alive)
            .filter(|n| n.vsn.get(4).is_some_and(|&max| max >= 5))
            .map(|n| n.addr)
            .collect();
        if relays.len() < factor {
            return;
        }
        match memberlist::SerfRelay::wrap(to.addr, &to.node, message) {
            Ok(relayed) => {
                for through in pick(&mut self.rng, relays, factor) {
                    self.send(through, vec![relayed.clone()]).await;
                }
            }
            Err(e) => tracing::warn!("cannot wrap a relayed response: {e}"),
        }
    }

    /// Probes the next member: directly, then (in `housekeeping`) through others.
    async fn probe(&mut self) {
        if self.leaving.is_some() {
            return;
        }
        let Some(target) = self.next_target() else {
            return;
        };
        let Some(addr) = self.nodes.get(&target).map(|n| n.addr) else {
            return;
        };
        let seq = self.seq();
        let now = Instant::now();
        self.probe = Some(Probe {
            target: target.clone(),
            addr,
            seq,
            sent: now,
            indirect_at: now + self.timing.probe_timeout,
            deadline: now + self.timing.probe_interval,
            acked: false,
        });
        self.waiters.insert(seq, Waiter::Probe);
        let ping = self.ping_to(&target, seq);
        self.send_one(addr, MessageType::Ping, &ping).await;
    }

    /// Members in a shuffled round, as memberlist probes them.
    fn next_target(&mut self) -> Option<String> {
        for _ in 0..2 {
            while let Some(name) = self.probe_order.pop() {
                if self.nodes.others_up().any(|n| n.name == name) {
                    return Some(name);
                }
            }
            self.probe_order = self.nodes.others_up().map(|n| n.name.clone()).collect();
            self.probe_order.shuffle(&mut self.rng);
        }
        None
    }

    /// Sends queued gossip to a few random members (and recently failed ones, which may
    /// come back, as memberlist's `GossipToTheDeadTime`).
    async fn gossip(&mut self) {
        if self.queue.len() == 0 {
            return;
        }
        let now = Instant::now();
        let candidates: Vec<SocketAddr> = self
            .nodes
            .iter()
            .filter(|n| n.name != self.me)
            .filter(|n| !n.dead_or_left() || now.duration_since(n.since) < Duration::from_secs(30))
            .map(|n| n.addr)
            .collect();
        let chosen = pick(&mut self.rng, candidates, self.timing.gossip_nodes);
        for to in chosen {
            self.send(to, Vec::new()).await;
        }
    }

    /// Probe timeouts, relayed probes, suspicions, query deadlines, reaping.
    async fn housekeeping(&mut self) {
        let now = Instant::now();
        self.advance_probe(now).await;
        let mut nacks = Vec::new();
        self.waiters.retain(|_, waiter| match waiter {
            Waiter::Probe => true,
            Waiter::Relay {
                to,
                seq,
                nack_at,
                expires,
            } => {
                if nack_at.is_some_and(|at| now >= at) {
                    nacks.push((*to, *seq));
                    *nack_at = None;
                }
                now < *expires
            }
        });
        for (to, seq) in nacks {
            self.send_one(to, MessageType::Nack, &Nack { seq_no: seq })
                .await;
        }
        for dead in self.nodes.expired_suspicions(now) {
            let outcome = self.nodes.dead(&dead, now);
            self.apply(outcome);
        }
        self.outgoing.retain(|_, query| query.deadline > now);
        self.asked.retain(|_, asked| asked.deadline > now);
        for gone in self.nodes.reap(now, self.reap_after, self.reap_left_after) {
            self.forget_coordinate(&gone.name);
            self.publish(Event::MemberReap(gone.member()));
        }
        self.stats
            .member_time
            .store(self.member_clock.last(), Ordering::Relaxed);
        self.stats
            .event_time
            .store(self.event_clock.last(), Ordering::Relaxed);
        self.stats
            .query_time
            .store(self.query_clock.last(), Ordering::Relaxed);
        self.stats
            .event_queue
            .store(self.queue.len() as u64, Ordering::Relaxed);
    }

    /// Asks others to probe an unanswered target, and suspects it once the interval is over.
    async fn advance_probe(&mut self, now: Instant) {
        let Some(probe) = &self.probe else {
            return;
        };
        if probe.acked {
            // An ack over TCP left the UDP waiter behind.
            self.waiters.remove(&probe.seq);
            self.probe = None;
            return;
        }
        if now >= probe.deadline {
            let target = probe.target.clone();
            self.waiters.remove(&probe.seq);
            self.probe = None;
            let Some(incarnation) = self.nodes.get(&target).map(|n| n.incarnation) else {
                return;
            };
            let suspect = Suspect {
                incarnation,
                node: target,
                from: self.me.clone(),
            };
            let timeout = self.timing.suspicion(self.nodes.up_count());
            let outcome = self.nodes.suspect(&suspect, now, timeout);
            self.apply(outcome);
            return;
        }
        if now < probe.indirect_at {
            return;
        }
        let (target, addr, seq) = (probe.target.clone(), probe.addr, probe.seq);
        if let Some(probe) = self.probe.as_mut() {
            probe.indirect_at = probe.deadline;
        }
        let helpers: Vec<SocketAddr> = self
            .nodes
            .others_up()
            .filter(|n| n.name != target && n.state == memberlist::NodeState::Alive)
            .map(|n| n.addr)
            .collect();
        let ask = IndirectPing {
            seq_no: seq,
            target: memberlist::ip_bytes(addr.ip()),
            port: addr.port(),
            node: target,
            nack: true,
            source_addr: memberlist::ip_bytes(self.addr.ip()),
            source_port: self.addr.port(),
            source_node: self.me.clone(),
        };
        let chosen = pick(&mut self.rng, helpers, self.timing.indirect_checks);
        for helper in chosen {
            self.send_one(helper, MessageType::IndirectPing, &ask).await;
        }
        self.tcp_probe(&ask.node, addr, seq, now);
    }

    /// Memberlist's fallback: the same ping on a TCP stream, alongside the indirect ones, to
    /// members that speak protocol 3 or later; its ack counts as the probe's.
    fn tcp_probe(&self, target: &str, addr: SocketAddr, seq: u32, now: Instant) {
        let speaks_tcp_pings = self
            .nodes
            .get(target)
            .is_some_and(|n| n.vsn.get(1).is_some_and(|&max| max >= 3));
        let Some(probe) = self.probe.as_ref().filter(|_| speaks_tcp_pings) else {
            return;
        };
        let patience = probe.deadline.saturating_duration_since(now);
        let ping = self.ping_to(target, seq);
        let keyring = self.keyring.clone();
        let inbound = self.inbound.clone();
        tokio::spawn(async move {
            match stream::ping(addr, &ping, keyring.as_ref(), patience).await {
                Ok(ack) if ack.seq_no == seq => {
                    let _ = inbound.send(Inbound::TcpAcked(seq));
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(%addr, "TCP fallback probe failed: {e}"),
            }
        });
    }

    /// The ack to a ping: this agent's coordinate in it, as Serf's ping delegate puts it;
    /// none for a ping meant for another node.
    fn ack_for(&self, ping: &Ping) -> Option<Ack> {
        if !ping.node.is_empty() && ping.node != self.me {
            return None;
        }
        Some(Ack {
            seq_no: ping.seq_no,
            payload: self
                .vivaldi
                .as_ref()
                .map(|v| memberlist::coordinate_payload(v.coordinate()))
                .unwrap_or_default(),
        })
    }

    /// This agent's state for a push-pull.
    fn local_state(&self, join: bool) -> PushPull {
        let nodes = self.nodes.iter().map(|n| n.push_state()).collect();
        let serf = SerfPushPull {
            ltime: self.member_clock.time(),
            status_ltimes: self
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.status_ltime))
                .collect(),
            left_members: self
                .nodes
                .iter()
                .filter(|n| n.state == memberlist::NodeState::Left)
                .map(|n| n.name.clone())
                .collect(),
            event_ltime: self.event_clock.time(),
            events: self.event_buffer.recent(),
            query_ltime: self.query_clock.time(),
        };
        PushPull {
            join,
            nodes,
            serf: Some(serf),
        }
    }

    /// Memberlist's and Serf's `mergeRemoteState`: nodes, intents, clocks, then the events
    /// the member remembers (none after our own join, all for a replay).
    fn merge(&mut self, remote: PushPull, our_join: bool, replay: bool) {
        let now = Instant::now();
        let suspicion = self.timing.suspicion(self.nodes.up_count());
        for outcome in self.nodes.merge(&remote.nodes, now, suspicion) {
            self.apply(outcome);
        }
        let Some(serf) = remote.serf else {
            return;
        };
        self.member_clock.witness(serf.ltime.saturating_sub(1));
        for (node, ltime) in &serf.status_ltimes {
            if serf.left_members.contains(node) {
                let leave = SerfLeave {
                    ltime: *ltime,
                    node: node.clone(),
                    prune: false,
                };
                self.leave_intent(&leave);
            } else {
                self.join_intent(node, *ltime);
            }
        }
        if our_join {
            self.event_min = self.event_min.max(serf.event_ltime.saturating_sub(1));
        }
        self.event_clock.witness(serf.event_ltime.saturating_sub(1));
        self.query_clock.witness(serf.query_ltime.saturating_sub(1));
        let mut remembered: Vec<SerfUserEvents> = serf.events.into_iter().flatten().collect();
        remembered.sort_by_key(|events| events.ltime);
        for events in remembered {
            for item in events.events {
                let event = SerfUserEvent {
                    ltime: events.ltime,
                    name: item.name,
                    payload: item.payload,
                    cc: false,
                };
                self.take_event(&event, replay);
            }
        }
    }

    fn on_inbound(&mut self, message: Inbound) {
        match message {
            Inbound::Pushed(theirs, answer) => {
                let _ = answer.send(self.local_state(false));
                self.merge(theirs, false, false);
            }
            Inbound::Pulled(theirs, Pull::Sync) => self.merge(theirs, false, false),
            Inbound::Pulled(theirs, Pull::Join(joined)) => {
                self.merge(theirs, true, false);
                let _ = joined.send(());
            }
            Inbound::Pulled(theirs, Pull::Replay(done)) => {
                self.merge(theirs, false, true);
                let _ = done.send(Ok(()));
            }
            Inbound::Pinged(ping, answer) => {
                // Memberlist's stream ack carries no payload: no round trip is timed over TCP.
                let ack = self.ack_for(&ping).map(|ack| Ack {
                    payload: Vec::new(),
                    ..ack
                });
                let _ = answer.send(ack);
            }
            Inbound::TcpAcked(seq) => {
                if let Some(probe) = self.probe.as_mut().filter(|p| p.seq == seq) {
                    // As memberlist: the member is up, but UDP to it is not getting through.
                    tracing::warn!(
                        "was able to connect to {} over TCP but UDP probes failed, network may be misconfigured",
                        probe.target
                    );
                    probe.acked = true;
                }
            }
        }
    }

    /// Starts a push-pull with `addr`; the agent merges the answer as `why` says.
    fn push_pull(&self, addr: SocketAddr, why: Pull) {
        let ours = self.local_state(matches!(why, Pull::Join(_)));
        let keyring = self.keyring.clone();
        let inbound = self.inbound.clone();
        tokio::spawn(async move {
            match stream::exchange(addr, &ours, keyring.as_ref()).await {
                Ok(theirs) => {
                    let _ = inbound.send(Inbound::Pulled(theirs, why));
                }
                Err(e) => {
                    tracing::warn!(%addr, "push-pull failed: {e}");
                    if let Pull::Replay(done) = why {
                        let _ = done.send(Err(GossipError::NobodyAnswered(addr.to_string())));
                    }
                }
            }
        });
    }

    /// The periodic anti-entropy sync, with one random live member.
    fn sync_with_someone(&mut self) {
        let others: Vec<SocketAddr> = self.nodes.others_up().map(|n| n.addr).collect();
        if let Some(addr) = others.choose(&mut self.rng) {
            self.push_pull(*addr, Pull::Sync);
        }
    }

    /// Serf's reconnect: a push-pull with one failed member (not one that left), which
    /// merges the two sides again once a partition healed.
    fn reconnect(&mut self) {
        let failed: Vec<SocketAddr> = self
            .nodes
            .iter()
            .filter(|n| n.name != self.me && n.state == memberlist::NodeState::Dead)
            .map(|n| n.addr)
            .collect();
        if let Some(addr) = failed.choose(&mut self.rng) {
            self.push_pull(*addr, Pull::Sync);
        }
    }

    /// Takes the clocks of the last snapshot, so old events and queries are not taken for
    /// new ones after a restart (Serf's `eventMinTime` from its snapshot).
    fn restore(&mut self, previous: &Snapshot) {
        self.member_clock.witness(previous.member_clock);
        self.event_clock.witness(previous.event_clock);
        self.query_clock.witness(previous.query_clock);
        self.event_min = previous.event_clock;
        self.written = previous.clone();
    }

    /// Writes the snapshot when members or clocks changed (`left`: after a graceful leave).
    fn save_snapshot(&mut self, left: bool) {
        let Some(path) = &self.snapshot else {
            return;
        };
        let now = Snapshot {
            member_clock: self.member_clock.last(),
            event_clock: self.event_clock.last(),
            query_clock: self.query_clock.last(),
            alive: self
                .nodes
                .others_up()
                .filter(|n| n.state == memberlist::NodeState::Alive)
                .map(|n| (n.name.clone(), n.addr))
                .collect(),
            left,
        };
        if now == self.written {
            return;
        }
        match now.write(path) {
            Ok(()) => self.written = now,
            Err(error) => tracing::warn!(%error, "cannot write the snapshot"),
        }
    }

    async fn on_command(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Join(addr, joined) => self.push_pull(addr, Pull::Join(joined)),
            Command::Members(reply) => {
                let _ = reply.send(self.nodes.iter().map(|n| n.member()).collect());
            }
            Command::Event(name, payload, coalesce, reply) => {
                let _ = reply.send(self.fire(name, payload, coalesce));
            }
            Command::SetTags(tags, reply) => {
                super::keep_tags(self.tags_file.as_deref(), &tags);
                let outcome = self.nodes.set_my_tags(&tags);
                self.apply(outcome);
                let _ = reply.send(());
            }
            Command::Leave(done) => self.leave(done).await,
            Command::Keys(op, reply) => {
                let _ = reply.send(self.change_keys(op));
            }
            Command::Query(params, reply) => {
                let asked = self.ask(params, now).await;
                let _ = reply.send(asked);
            }
            Command::Respond(id, payload, reply) => {
                let _ = reply.send(self.respond(id, payload, now).await);
            }
            Command::Replay(addr, reply) => self.push_pull(addr, Pull::Replay(reply)),
            Command::Coordinate(node, reply) => {
                let _ = reply.send(self.coordinate_of(&node));
            }
            Command::ForceLeave(node, prune, reply) => {
                let _ = reply.send(self.force_leave(&node, prune));
            }
        }
    }

    fn fire(&mut self, name: String, payload: Vec<u8>, coalesce: bool) -> Result<u64, GossipError> {
        let size = name.len() + payload.len();
        if size > MAX_EVENT_SIZE {
            return Err(GossipError::EventTooLarge(size));
        }
        if !self.event_limit.take(std::time::Instant::now()) {
            return Err(GossipError::RateLimited);
        }
        let event = SerfUserEvent {
            ltime: self.event_clock.tick(),
            name,
            payload,
            cc: coalesce,
        };
        self.take_event(&event, false);
        self.broadcast_serf(SerfMessageType::UserEvent, &event);
        Ok(event.ltime)
    }

    async fn ask(&mut self, params: QueryParams, now: Instant) -> Result<QueryHandle, GossipError> {
        let size = params.name.len() + params.payload.len();
        if size > MAX_QUERY_SIZE {
            return Err(GossipError::QueryTooLarge(size));
        }
        if !self.query_limit.take(std::time::Instant::now()) {
            return Err(GossipError::RateLimited);
        }
        let timeout = params.timeout.unwrap_or_else(|| {
            crate::query::default_timeout(self.nodes.up_count(), self.timing.gossip_interval)
        });
        let query = SerfQuery {
            ltime: self.query_clock.tick(),
            id: self.rng.random(),
            addr: memberlist::ip_bytes(self.addr.ip()),
            port: self.addr.port(),
            source_node: self.me.clone(),
            filters: memberlist::query_filters(&params.filter_nodes, &params.filter_tags)
                .map_err(|e| GossipError::Encode(e.to_string()))?,
            flags: if params.ack {
                memberlist::QUERY_FLAG_ACK
            } else {
                0
            },
            relay_factor: params.relay_factor,
            timeout: i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX),
            name: params.name,
            payload: params.payload,
        };
        let (replies, receiver) = mpsc::unbounded_channel();
        self.outgoing.insert(
            (query.ltime, query.id),
            Outgoing::new(replies, now + timeout),
        );
        self.queries_seen
            .accept((query.ltime, query.id.to_string(), Vec::new()));
        self.broadcast_serf(SerfMessageType::Query, &query);
        self.answer_if_asked(&query).await;
        Ok(QueryHandle {
            ltime: query.ltime,
            timeout,
            replies: receiver,
        })
    }

    async fn respond(
        &mut self,
        id: u64,
        payload: Vec<u8>,
        now: Instant,
    ) -> Result<(), GossipError> {
        if payload.len() > MAX_QUERY_SIZE {
            return Err(GossipError::ResponseTooLarge(payload.len()));
        }
        let asked = self
            .asked
            .get_mut(&id)
            .ok_or(GossipError::UnknownQuery(id))?;
        if asked.responded {
            return Err(GossipError::AlreadyResponded(id));
        }
        if now >= asked.deadline {
            return Err(GossipError::PastDeadline(id));
        }
        asked.responded = true;
        let response = SerfQueryResponse {
            ltime: asked.ltime,
            id: asked.id,
            from: self.me.clone(),
            flags: 0,
            payload,
        };
        let to = asked.reply_to.clone();
        self.send_response(&to, &response).await;
        Ok(())
    }

    fn force_leave(&mut self, node: &str, prune: bool) -> Result<(), GossipError> {
        if self.nodes.get(node).is_none() {
            return Err(GossipError::UnknownMember(node.to_string()));
        }
        let leave = SerfLeave {
            ltime: self.member_clock.tick(),
            node: node.to_string(),
            prune,
        };
        self.leave_intent(&leave);
        self.broadcast_serf(SerfMessageType::Leave, &leave);
        Ok(())
    }

    /// Serf's leave: a leave intent, then memberlist's dead message about itself, sent to
    /// every member at once and gossiped until the propagation delay is over.
    async fn leave(&mut self, done: oneshot::Sender<()>) {
        let leave = SerfLeave {
            ltime: self.member_clock.tick(),
            node: self.me.clone(),
            prune: false,
        };
        if let Some(me) = self.nodes.get_mut(&self.me.clone()) {
            me.status_ltime = leave.ltime;
        }
        // Encoded once: the same two messages go to everyone, then on with the gossip.
        let mut messages: Vec<Vec<u8>> = memberlist::encode_serf(SerfMessageType::Leave, &leave)
            .into_iter()
            .collect();
        self.broadcast_serf(SerfMessageType::Leave, &leave);
        let outcome = self.nodes.leave();
        messages.extend(outcome.gossip.iter().map(|(_, dead)| dead.clone()));
        self.apply(outcome);
        self.leaving = Some((done, Instant::now() + self.timing.leave_propagate));
        let everyone: Vec<SocketAddr> = self.nodes.others_up().map(|n| n.addr).collect();
        for to in everyone {
            self.send(to, messages.clone()).await;
        }
    }
}

/// Serf's words for a keyring query refused here (`listing`: a `list-keys`).
fn serf_key_message(error: GossipError, listing: bool) -> String {
    match error {
        GossipError::NotEncrypted if listing => "Keyring is empty (encryption not enabled)".into(),
        GossipError::NotEncrypted => "No keyring to modify (encryption not enabled)".into(),
        other => other.to_string(),
    }
}

/// The internal query that makes every member apply `op`, as Serf's key manager sends it.
pub(super) fn key_query(op: &KeyOp) -> (String, Vec<u8>) {
    let (verb, key) = match op {
        KeyOp::Install(key) => ("install-key", key.as_bytes()),
        KeyOp::Use(key) => ("use-key", key.as_bytes()),
        KeyOp::Remove(key) => ("remove-key", key.as_bytes()),
        KeyOp::List => ("list-keys", &[][..]),
    };
    let request = SerfKeyRequest { key: key.to_vec() };
    let payload =
        memberlist::encode_serf_payload(SerfMessageType::KeyRequest, &request).unwrap_or_default();
    (format!("_serf_{verb}"), payload)
}

/// A member's answer to [`key_query`], read as Serf's key manager reads it.
pub(super) fn key_answer(payload: &[u8]) -> KeyAnswer {
    match memberlist::decode_serf_payload::<SerfKeyResponse>(SerfMessageType::KeyResponse, payload)
    {
        Ok(answer) if answer.result => KeyAnswer {
            keys: answer.keys,
            error: String::new(),
        },
        Ok(answer) => KeyAnswer {
            keys: Vec::new(),
            error: answer.message,
        },
        Err(e) => KeyAnswer {
            keys: Vec::new(),
            error: format!("Failed to decode key query response: {e}"),
        },
    }
}

/// Up to `n` of `items`, at random.
fn pick<T>(rng: &mut SmallRng, mut items: Vec<T>, n: usize) -> Vec<T> {
    items.shuffle(rng);
    items.truncate(n);
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspicion_lasts_longer_in_larger_clusters() {
        let mut config = AgentConfig::new("a", SocketAddr::from(([127, 0, 0, 1], 0)));
        config.set_profile(crate::Profile::Lan);
        let timing = Timing::from(&config);
        assert_eq!(timing.suspicion(1), Duration::from_secs(4));
        assert_eq!(timing.suspicion(10), Duration::from_secs(4));
        assert_eq!(timing.suspicion(100), Duration::from_secs(8));
    }

    #[test]
    fn members_expose_serfs_tags_and_statuses() {
        let now = Instant::now();
        let tags = std::collections::BTreeMap::from([("role".to_string(), "web".to_string())]);
        let nodes = Nodes::new("a", SocketAddr::from(([127, 0, 0, 1], 7946)), &tags, now);
        let member = nodes.me().member();
        assert_eq!(member.tags, tags);
        assert_eq!(member.status, super::super::Status::Alive);
        assert_eq!(
            memberlist::decode_tags(&nodes.me().meta).unwrap(),
            tags,
            "meta is Serf's tag encoding"
        );
    }
}
