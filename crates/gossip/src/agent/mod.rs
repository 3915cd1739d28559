//! The agent: one task that owns foca, the UDP socket and the timers, driven by packets,
//! timers and commands from [`Agent`] handles. Membership changes and user events go out on a
//! broadcast channel, so handlers and streams never sit on the gossip path.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{Foca, OwnedNotification, PostcardCodec, State, Timer};
use rand::rngs::SmallRng;
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::GossipError;
use crate::broadcast::{EventLog, Handler, MAX_EVENT_SIZE, Message, RateLimit, UserEvent};
use crate::health::{Io, LocalHealth};
use crate::identity::NodeId;
use crate::keyring::{Key, Keyring};
use crate::packet::{self, Kind};
use crate::query::{Direct, Incoming, Outgoing, QueryHandle, QueryParams};
use crate::snapshot::Snapshot;

mod coords;
mod handle;
mod queries;
mod replay;
mod serf_wire;
mod types;

pub use handle::Agent;
pub use types::{AgentConfig, Event, Member, Profile, Protocol, Stats, Status};

enum Command {
    Join(SocketAddr, oneshot::Sender<()>),
    Members(oneshot::Sender<Vec<Member>>),
    Event(
        String,
        Vec<u8>,
        bool,
        oneshot::Sender<Result<u64, GossipError>>,
    ),
    SetTags(BTreeMap<String, String>, oneshot::Sender<()>),
    Leave(oneshot::Sender<()>),
    Keys(KeyOp, oneshot::Sender<Result<Vec<String>, GossipError>>),
    Query(
        QueryParams,
        oneshot::Sender<Result<QueryHandle, GossipError>>,
    ),
    Respond(u64, Vec<u8>, oneshot::Sender<Result<(), GossipError>>),
    /// Ask the agent at this address to replay its user events (`join -replay`).
    Replay(SocketAddr, oneshot::Sender<Result<(), GossipError>>),
    /// A member's network coordinate, if known.
    Coordinate(
        String,
        oneshot::Sender<Option<crate::coordinate::Coordinate>>,
    ),
    /// A member to force out; `true` to prune it (forget it at once).
    ForceLeave(String, bool, oneshot::Sender<Result<(), GossipError>>),
}

/// A change to (or a look at) this agent's keyring.
#[derive(Debug, Clone)]
pub enum KeyOp {
    Install(Key),
    Use(Key),
    Remove(Key),
    List,
}

/// How long a force-leave waits for a member this agent still lists alive to fail.
const FORCE_LEAVE_PATIENCE: Duration = Duration::from_secs(120);

pub(crate) type Swim = Foca<NodeId, PostcardCodec, SmallRng, Handler>;

struct Known {
    id: NodeId,
    status: Status,
    since: Instant,
}

struct Actor {
    foca: Swim,
    runtime: Io,
    health: LocalHealth,
    socket: UdpSocket,
    keyring: Option<Keyring>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    timer_events: HashMap<u64, Timer<NodeId>>,
    next_timer: u64,
    members: BTreeMap<String, Known>,
    log: Arc<Mutex<EventLog>>,
    events: broadcast::Sender<Event>,
    stats: Arc<Stats>,
    reap_after: Duration,
    reap_left_after: Duration,
    /// Joins waiting for a member at their address.
    joins: Vec<(SocketAddr, oneshot::Sender<()>)>,
    /// Packets to send once foca is done.
    outbox: Vec<(SocketAddr, Vec<u8>)>,
    swim: foca::Config,
    suspicion_mult: f64,
    /// The cluster size the SWIM settings were last scaled for.
    sized_for: usize,
    snapshot: Option<std::path::PathBuf>,
    /// Membership changed since the snapshot was last written.
    snapshot_dirty: bool,
    keyring_file: Option<std::path::PathBuf>,
    tags_file: Option<std::path::PathBuf>,
    /// This agent's Vivaldi state (`None`: coordinates disabled).
    vivaldi: Option<crate::coordinate::Client>,
    /// Members' coordinates, as their pings and pongs told them.
    coordinates: HashMap<String, crate::coordinate::Coordinate>,
    /// Pings awaiting their pong: the member pinged and when.
    pings: HashMap<u32, (String, Instant)>,
    /// Replays asked for (`join -replay`): whom, and when.
    replays: HashMap<u32, (SocketAddr, Instant)>,
    /// How often this agent answers replay asks (its own limit, so asks never use up the
    /// budget for firing user events).
    replay_limit: RateLimit,
    event_limit: RateLimit,
    query_limit: RateLimit,
    /// Picks query ids and relays.
    rng: SmallRng,
    /// Queries asked here, by Lamport time and id.
    outgoing: HashMap<(u64, u32), Outgoing>,
    /// Queries delivered here, by this agent's handle on them.
    incoming: HashMap<u64, Incoming>,
    next_incoming: u64,
    /// Force-leaves of members not seen failing yet, until when they apply.
    forced: HashMap<String, (Instant, bool)>,
}

impl Actor {
    /// The event log shared with foca's broadcast handler.
    fn log(&self) -> std::sync::MutexGuard<'_, EventLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Command>) {
        let mut buf = vec![0u8; 65536];
        let mut reap = tokio::time::interval(Duration::from_secs(1));
        loop {
            let next_timer = self.timers.peek().map(|Reverse((at, _))| *at);
            let next_deadline = self.outgoing.values().map(|q| q.deadline).min();
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => {
                    if let Ok((len, from)) = received {
                        self.on_packet(&buf[..len], from);
                    }
                }
                command = inbox.recv() => match command {
                    Some(Command::Leave(reply)) => {
                        self.leave().await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(command) => self.on_command(command),
                    // Every handle is gone: stop without a word, as a crash would.
                    None => return,
                },
                _ = sleep_until(next_timer) => self.on_timers(),
                _ = sleep_until(next_deadline) => self.close_queries(),
                _ = reap.tick() => {
                    self.reap();
                    self.ping_someone();
                }
            }
            self.drain();
            self.flush().await;
            self.publish_stats();
        }
    }

    /// Serf's clocks and queues, for `info`.
    fn publish_stats(&self) {
        let (member_time, event_time, query_time) = {
            let log = self.log();
            (
                log.member_clock.time(),
                log.clock.time(),
                log.query_clock.time(),
            )
        };
        let stats = &self.stats;
        let set = |counter: &std::sync::atomic::AtomicU64, value: u64| {
            counter.store(value, Ordering::Relaxed);
        };
        set(&stats.member_time, member_time);
        set(&stats.event_time, event_time);
        set(&stats.query_time, query_time);
        set(&stats.intent_queue, self.foca.updates_backlog() as u64);
        set(
            &stats.event_queue,
            self.foca.custom_broadcast_backlog() as u64,
        );
    }

    /// Sends the packets foca produced.
    async fn flush(&mut self) {
        for (to, packet) in self.outbox.drain(..) {
            if self.socket.send_to(&packet, to).await.is_ok() {
                self.stats.packets_sent.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes_sent
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
            }
        }
    }

    fn on_packet(&mut self, bytes: &[u8], from: SocketAddr) {
        self.stats.packets_received.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_received
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        match unframe(bytes, self.keyring.as_ref()) {
            Unframed::Swim(body) => {
                if let Err(error) = self.foca.handle_data(&body, &mut self.runtime) {
                    self.stats.messages_rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%error, "SWIM message rejected");
                }
            }
            Unframed::Direct(Direct::Ping {
                seq,
                from: name,
                coord,
            }) => {
                self.on_ping(seq, name, coord, from);
            }
            Unframed::Direct(Direct::ReplayAsk { seq }) => self.on_replay_ask(seq, from),
            Unframed::Direct(Direct::Replayed { seq, events }) => {
                self.on_replayed(seq, events, from);
            }
            Unframed::Direct(message) => self.on_direct(message),
            Unframed::Malformed => {
                self.stats.messages_rejected.fetch_add(1, Ordering::Relaxed);
            }
            Unframed::Dropped(reason) => {
                self.stats.packets_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%reason, "packet dropped");
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Join(addr, reply) => {
                let placeholder = NodeId {
                    name: String::new(),
                    addr,
                    bump: 0,
                    tags: BTreeMap::new(),
                    leaving: false,
                };
                if self
                    .members
                    .values()
                    .any(|k| k.id.addr == addr && k.status == Status::Alive)
                {
                    let _ = reply.send(());
                } else {
                    self.joins.push((addr, reply));
                }
                let _ = self.foca.announce(placeholder, &mut self.runtime);
            }
            Command::Members(reply) => {
                let _ = reply.send(self.member_list());
            }
            Command::Event(name, payload, coalesce, reply) => {
                let _ = reply.send(self.fire(name, payload, coalesce));
            }
            Command::SetTags(tags, reply) => {
                keep_tags(self.tags_file.as_deref(), &tags);
                let mut id = self.foca.identity().next();
                id.tags = tags;
                match self.foca.change_identity(id, &mut self.runtime) {
                    // Serf reports its own tag change to its handlers as a member update.
                    Ok(()) => {
                        let me = member_of(self.foca.identity(), Status::Alive);
                        self.publish(Event::MemberUpdate(me));
                    }
                    Err(error) => tracing::warn!(%error, "could not change tags"),
                }
                let _ = reply.send(());
            }
            Command::Keys(op, reply) => {
                let _ = reply.send(self.change_keys(op));
            }
            Command::Query(params, reply) => {
                let _ = reply.send(self.ask(params));
            }
            Command::Respond(id, payload, reply) => {
                let _ = reply.send(self.respond(id, payload));
            }
            Command::Replay(addr, reply) => {
                self.ask_replay(addr);
                let _ = reply.send(Ok(()));
            }
            Command::Coordinate(node, reply) => {
                let _ = reply.send(self.coordinate_of(&node));
            }
            Command::ForceLeave(name, prune, reply) => {
                let _ = reply.send(self.broadcast_force_leave(name, prune));
            }
            Command::Leave(_) => unreachable!("handled by the loop"),
        }
    }

    fn change_keys(&mut self, op: KeyOp) -> Result<Vec<String>, GossipError> {
        change_keys(self.keyring.as_mut(), op, self.keyring_file.as_deref())
    }

    fn fire(&mut self, name: String, payload: Vec<u8>, coalesce: bool) -> Result<u64, GossipError> {
        if name.len() + payload.len() > MAX_EVENT_SIZE {
            return Err(GossipError::EventTooLarge(name.len() + payload.len()));
        }
        if !self.event_limit.take(std::time::Instant::now()) {
            return Err(GossipError::RateLimited);
        }
        let ltime = self.log().clock.tick();
        let event = UserEvent {
            ltime,
            name,
            payload,
            coalesce,
            origin: self.foca.identity().name.clone(),
        };
        self.broadcast(&Message::Event(event))?;
        Ok(ltime)
    }

    /// Hands a message to foca for dissemination (delivering it here too) and sends it now
    /// rather than at the next gossip round.
    fn broadcast(&mut self, message: &Message) -> Result<(), GossipError> {
        let data =
            postcard::to_allocvec(message).map_err(|e| GossipError::Encode(e.to_string()))?;
        self.foca
            .add_broadcast(&data)
            .map_err(|e| GossipError::Encode(e.to_string()))?;
        let _ = self.foca.gossip(&mut self.runtime);
        Ok(())
    }

    /// Marks this identity as leaving, lets that spread, then leaves the cluster.
    async fn leave(&mut self) {
        let mut id = self.foca.identity().next();
        id.leaving = true;
        let _ = self.foca.change_identity(id, &mut self.runtime);
        let _ = self.foca.gossip(&mut self.runtime);
        self.drain();
        self.flush().await;
        let _ = self.foca.leave_cluster(&mut self.runtime);
        self.drain();
        self.flush().await;
        self.save_snapshot(true);
        // As Serf's: the local node's own leave is a member event to its handlers.
        let me = member_of(self.foca.identity(), Status::Left);
        self.publish(Event::MemberLeave(me));
    }

    /// Rescales suspicion and retransmissions when the cluster's size changed by a tenth.
    fn scale_to_cluster(&mut self) {
        let size = self.foca.num_members() + 1;
        if size.abs_diff(self.sized_for) * 10 < self.sized_for.max(10) {
            return;
        }
        self.sized_for = size;
        let log = (size as f64).log10();
        let mut config = self.swim.clone();
        config.suspect_to_down_after = config
            .probe_period
            .mul_f64(self.suspicion_mult * log.max(1.0));
        // Twice memberlist's multiplier: a user event is told often enough that no member
        // misses it (at 4, about one event in twenty missed somebody in a 10-member cluster).
        let transmissions = ((size + 1) as f64).log10() * 8.0;
        config.max_transmissions = std::num::NonZeroU8::new(transmissions.clamp(1.0, 255.0) as u8)
            .unwrap_or(std::num::NonZeroU8::MIN);
        if self.foca.set_config(config).is_err() {
            tracing::warn!(size, "could not rescale SWIM settings");
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, key))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(timer) = self.timer_events.remove(&key)
                && let Err(error) = self.foca.handle_timer(timer, &mut self.runtime)
            {
                tracing::debug!(%error, "timer");
            }
        }
    }

    /// Acts on everything foca asked for: packets, timers, notifications; then delivers the
    /// user events the broadcast handler accepted.
    fn drain(&mut self) {
        // News goes on at once rather than at the next gossip round, so each hop costs a
        // packet's flight, not a gossip interval: a new user event or query to twice the
        // usual number of members (so the first wave misses almost nobody), a member declared
        // down to the usual number.
        let delivered = std::mem::take(&mut self.log().delivered);
        let someone_down = self
            .runtime
            .notifications
            .iter()
            .any(|n| matches!(n, OwnedNotification::MemberDown(_)));
        let rounds = if !delivered.is_empty() {
            2
        } else {
            usize::from(someone_down)
        };
        for _ in 0..rounds {
            let _ = self.foca.gossip(&mut self.runtime);
        }
        self.scale_to_cluster();
        self.health.observe(&mut self.runtime);
        self.stats
            .health_score
            .store(u64::from(self.health.score()), Ordering::Relaxed);
        for (to, data) in std::mem::take(&mut self.runtime.sends) {
            let packet = packet::encode(Kind::Swim, &data, self.keyring.as_ref());
            self.outbox.push((to, packet));
        }
        let now = Instant::now();
        let own_probe_failed = std::mem::take(&mut self.runtime.probes_failed);
        for (after, timer) in std::mem::take(&mut self.runtime.timers) {
            let after = self.health.scale(&timer, after, &own_probe_failed);
            self.next_timer += 1;
            self.timers.push(Reverse((now + after, self.next_timer)));
            self.timer_events.insert(self.next_timer, timer);
        }
        for notification in std::mem::take(&mut self.runtime.notifications) {
            self.on_notification(notification);
        }
        for message in delivered {
            match message {
                Message::Event(event) => {
                    let _ = self.events.send(Event::User(event));
                }
                Message::Query(query) => self.on_query(query),
                Message::ForceLeave { name, .. } => self.on_force_leave(&name, false),
                Message::ForceLeavePrune { name, .. } => self.on_force_leave(&name, true),
            }
        }
    }

    fn on_notification(&mut self, notification: OwnedNotification<NodeId>) {
        match notification {
            OwnedNotification::MemberUp(id) | OwnedNotification::Rename(_, id) => self.up(id),
            OwnedNotification::MemberDown(id) => self.down(id),
            _ => {}
        }
    }

    fn up(&mut self, id: NodeId) {
        // Joins waiting for this address are answered.
        let (answered, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.joins)
            .into_iter()
            .partition(|(addr, _)| *addr == id.addr);
        self.joins = waiting;
        for (_, reply) in answered {
            let _ = reply.send(());
        }
        self.snapshot_dirty = true;
        let previous = self.members.insert(
            id.name.clone(),
            Known {
                id: id.clone(),
                status: Status::Alive,
                since: Instant::now(),
            },
        );
        let member = member_of(&id, Status::Alive);
        let event = match previous {
            Some(known) if known.status == Status::Alive && known.id.tags == id.tags => return,
            Some(known) if known.status == Status::Alive => Event::MemberUpdate(member),
            _ => Event::MemberJoin(member),
        };
        self.publish(event);
    }

    fn down(&mut self, id: NodeId) {
        let Some(known) = self.members.get_mut(&id.name) else {
            return;
        };
        // A stale identity (renamed since) going down says nothing about the member.
        if known.id.bump > id.bump || known.status != Status::Alive {
            return;
        }
        self.snapshot_dirty = true;
        let (forced, prune) = match self.forced.remove(&id.name) {
            Some((until, prune)) if Instant::now() < until => (true, prune),
            _ => (false, false),
        };
        let leaving = id.leaving || known.id.leaving || forced;
        known.status = if leaving {
            Status::Left
        } else {
            Status::Failed
        };
        known.since = Instant::now();
        let member = member_of(&known.id, known.status);
        let event = if leaving {
            Event::MemberLeave(member)
        } else {
            Event::MemberFailed(member)
        };
        self.publish(event);
        if prune {
            self.prune(&id.name);
        }
    }

    /// Forgets a member at once (`force-leave -prune`), as a reap does.
    pub(super) fn prune(&mut self, name: &str) {
        if let Some(known) = self.members.remove(name) {
            self.forget_coordinate(name);
            self.snapshot_dirty = true;
            self.publish(Event::MemberReap(member_of(&known.id, known.status)));
        }
    }

    /// Tells subscribers (handlers, RPC streams, the fleet) of a member event, and logs it as
    /// Serf does, for `monitor`.
    pub(super) fn publish(&self, event: Event) {
        announce(&self.events, event);
    }

    fn member_list(&self) -> Vec<Member> {
        let suspects: Vec<&str> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() == State::Suspect)
            .map(|m| m.id().name.as_str())
            .collect();
        let me = self.foca.identity();
        let mut list = vec![member_of(me, Status::Alive)];
        for known in self.members.values().filter(|k| k.id.name != me.name) {
            let status =
                if known.status == Status::Alive && suspects.contains(&known.id.name.as_str()) {
                    Status::Suspect
                } else {
                    known.status
                };
            list.push(member_of(&known.id, status));
        }
        list
    }

    /// Writes the snapshot when membership changed (at most once a tick).
    fn save_snapshot(&mut self, left: bool) {
        let Some(path) = &self.snapshot else {
            return;
        };
        if !self.snapshot_dirty && !left {
            return;
        }
        self.snapshot_dirty = false;
        let (member_clock, clock, query_clock) = {
            let log = self.log();
            (
                log.member_clock.last(),
                log.clock.last(),
                log.query_clock.last(),
            )
        };
        let snapshot = Snapshot {
            member_clock,
            event_clock: clock,
            query_clock,
            alive: self
                .members
                .values()
                .filter(|k| k.status == Status::Alive)
                .map(|k| (k.id.name.clone(), k.id.addr))
                .collect(),
            left,
        };
        if let Err(error) = snapshot.write(path) {
            tracing::warn!(%error, "cannot write the snapshot");
        }
    }

    fn reap(&mut self) {
        self.save_snapshot(false);
        let now = Instant::now();
        self.incoming.retain(|_, q| q.deadline > now);
        let (reap_after, reap_left_after) = (self.reap_after, self.reap_left_after);
        let expired: Vec<String> = self
            .members
            .iter()
            .filter(|(_, k)| match k.status {
                Status::Alive => false,
                Status::Left => k.since.elapsed() >= reap_left_after,
                Status::Suspect | Status::Failed => k.since.elapsed() >= reap_after,
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in expired {
            if let Some(known) = self.members.remove(&name) {
                self.forget_coordinate(&name);
                self.publish(Event::MemberReap(member_of(&known.id, known.status)));
            }
        }
    }
}

/// A packet from the network, unframed (and opened): every byte is hostile until here.
pub(crate) enum Unframed {
    /// For foca, which decodes it further.
    Swim(Vec<u8>),
    Direct(Direct),
    /// A direct message that does not decode.
    Malformed,
    Dropped(packet::Dropped),
}

pub(crate) fn unframe(bytes: &[u8], keyring: Option<&Keyring>) -> Unframed {
    match packet::decode(bytes, keyring) {
        Ok((Kind::Swim, body)) => Unframed::Swim(body),
        Ok((Kind::Direct, body)) => match postcard::from_bytes::<Direct>(&body) {
            Ok(message) => Unframed::Direct(message),
            Err(_) => Unframed::Malformed,
        },
        Err(reason) => Unframed::Dropped(reason),
    }
}

fn member_of(id: &NodeId, status: Status) -> Member {
    Member {
        name: id.name.clone(),
        addr: id.addr,
        tags: id.tags.clone(),
        status,
    }
}

/// Tells subscribers (handlers, RPC streams, the fleet) of a member event, and logs it as
/// Serf does, for `monitor`.
fn announce(events: &broadcast::Sender<Event>, event: Event) {
    if let Some((kind, member)) = crate::rpc::member_event_parts(&event) {
        let name = match kind {
            "member-join" => "EventMemberJoin",
            "member-leave" => "EventMemberLeave",
            "member-failed" => "EventMemberFailed",
            "member-update" => "EventMemberUpdate",
            _ => "EventMemberReap",
        };
        tracing::info!(target: "serf", "{name}: {} {}", member.name, member.addr.ip());
    }
    let _ = events.send(event);
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes the tags to the tags file (both agents), before others see them, as Serf: a
/// restart never loses a change the cluster saw.
fn keep_tags(file: Option<&std::path::Path>, tags: &BTreeMap<String, String>) {
    if let Some(path) = file
        && let Err(error) = crate::persist::save_tags(path, tags)
    {
        tracing::error!(%error, "cannot keep the tags");
    }
}

/// Applies a keyring change (both agents): the file first, as Serf, so a restart has the keys
/// others now use; returns the keys installed, primary first, in base64.
fn change_keys(
    keyring: Option<&mut Keyring>,
    op: KeyOp,
    file: Option<&std::path::Path>,
) -> Result<Vec<String>, GossipError> {
    let keyring = keyring.ok_or(GossipError::NotEncrypted)?;
    let changes = !matches!(op, KeyOp::List);
    match op {
        KeyOp::Install(key) => keyring.install(key),
        KeyOp::Use(key) => keyring.use_key(&key)?,
        KeyOp::Remove(key) => keyring.remove(&key)?,
        KeyOp::List => {}
    }
    if let Some(path) = file
        && changes
    {
        keyring.save_file(path)?;
    }
    Ok(keyring.keys().iter().map(Key::to_base64).collect())
}
