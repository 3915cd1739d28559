//! [`Agent`], the handle on a running agent: it starts the agent's task and sends it commands.

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{Foca, PostcardCodec};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use super::{Actor, AgentConfig, Command, Event, KeyOp, Member, Stats};
use crate::GossipError;
use crate::broadcast::{EventLog, Handler, RateLimit};
use crate::health::{Io, LocalHealth};
use crate::identity::NodeId;
use crate::snapshot::Snapshot;

/// A handle on a running agent. Dropping every handle stops the agent without a leave
/// (others see it fail), as a crash would.
#[derive(Debug, Clone)]
pub struct Agent {
    pub(super) commands: mpsc::UnboundedSender<Command>,
    pub(super) events: broadcast::Sender<Event>,
    pub(super) stats: Arc<Stats>,
    pub(super) local: SocketAddr,
    pub(super) name: String,
    /// What the agent speaks: keyring queries are framed differently in each protocol.
    pub(super) protocol: super::Protocol,
}

impl Agent {
    /// Binds the socket and starts the agent's task.
    pub async fn start(config: AgentConfig) -> Result<Agent, GossipError> {
        if config.protocol == super::Protocol::Serf {
            return super::serf_wire::start(config).await;
        }
        let (socket, local, advertise) = bind(&config).await?;
        let identity = NodeId {
            name: config.node.clone(),
            addr: advertise,
            bump: now_bump(),
            tags: config.tags.clone(),
            leaving: false,
        };
        let previous = config
            .snapshot
            .as_deref()
            .map(|path| Snapshot::read(path, config.rejoin_after_leave))
            .unwrap_or_default();
        let log = Arc::new(Mutex::new(EventLog::after(
            previous.member_clock,
            previous.event_clock,
            previous.query_clock,
        )));
        let mut swim = config.swim.clone();
        swim.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: config.reconnect_interval,
            num_members: std::num::NonZeroUsize::new(2).unwrap_or(std::num::NonZeroUsize::MIN),
        });
        let foca = Foca::with_custom_broadcast(
            identity,
            swim.clone(),
            SmallRng::seed_from_u64(config.seed),
            PostcardCodec,
            Handler(log.clone()),
        );
        let (commands, inbox) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(4096);
        let stats = Arc::new(Stats::default());
        let actor = Actor {
            foca,
            runtime: Io::default(),
            health: LocalHealth::default(),
            socket,
            keyring: config.keyring,
            timers: BinaryHeap::new(),
            timer_events: HashMap::new(),
            next_timer: 0,
            members: BTreeMap::new(),
            log,
            events: events.clone(),
            stats: stats.clone(),
            reap_after: config.reap_after,
            reap_left_after: config.reap_left_after,
            joins: Vec::new(),
            outbox: Vec::new(),
            swim,
            suspicion_mult: config.suspicion_mult,
            sized_for: 0,
            snapshot: config.snapshot,
            snapshot_dirty: false,
            keyring_file: config.keyring_file,
            tags_file: config.tags_file,
            vivaldi: config.coordinates.then(|| {
                crate::coordinate::Client::new(SmallRng::seed_from_u64(config.seed.wrapping_add(2)))
            }),
            coordinates: HashMap::new(),
            pings: HashMap::new(),
            replays: HashMap::new(),
            replay_limit: RateLimit::new(5.0, 10),
            event_limit: RateLimit::new(config.event_rate.0, config.event_rate.1),
            query_limit: RateLimit::new(config.query_rate.0, config.query_rate.1),
            rng: SmallRng::seed_from_u64(config.seed.wrapping_add(1)),
            outgoing: HashMap::new(),
            incoming: HashMap::new(),
            next_incoming: 0,
            forced: HashMap::new(),
        };
        // Serf logs its own join first.
        tracing::info!(target: "serf", "EventMemberJoin: {} {}", config.node, advertise.ip());
        tokio::spawn(actor.run(inbox));
        let agent = Agent {
            commands,
            events,
            stats,
            local,
            name: config.node,
            protocol: super::Protocol::Phoenix,
        };
        if !previous.left && !previous.alive.is_empty() {
            tokio::spawn(rejoin(agent.clone(), previous, advertise));
        }
        Ok(agent)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bound gossip address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Announces this agent to `addr`; true once a member at that address answered within
    /// `timeout`.
    pub async fn join(&self, addr: SocketAddr, timeout: Duration) -> Result<bool, GossipError> {
        let (reply, answered) = oneshot::channel();
        self.send(Command::Join(addr, reply))?;
        Ok(tokio::time::timeout(timeout, answered).await.is_ok())
    }

    /// Joins through any of `addresses` (`host:port`, or a host on Serf's port 7946), trying
    /// them in turn until one answers or `patience` has passed; returns the one that answered.
    pub async fn join_any(
        &self,
        addresses: &[String],
        patience: Duration,
    ) -> Result<SocketAddr, GossipError> {
        let resolved = addresses
            .iter()
            .map(|a| crate::rpc::resolve(a).map_err(GossipError::BadAddress))
            .collect::<Result<Vec<_>, _>>()?;
        let deadline = Instant::now() + patience;
        loop {
            for &addr in &resolved {
                if self.join(addr, Duration::from_secs(1)).await? {
                    return Ok(addr);
                }
            }
            if resolved.is_empty() || Instant::now() >= deadline {
                return Err(GossipError::NobodyAnswered(addresses.join(", ")));
            }
            tracing::warn!("no member answered at {}; retrying", addresses.join(", "));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every member known, this one included.
    pub async fn members(&self) -> Result<Vec<Member>, GossipError> {
        self.request(Command::Members).await
    }

    /// Fires a user event to the whole cluster; returns its Lamport time.
    pub async fn event(
        &self,
        name: &str,
        payload: &[u8],
        coalesce: bool,
    ) -> Result<u64, GossipError> {
        self.request(|reply| Command::Event(name.into(), payload.into(), coalesce, reply))
            .await?
    }

    /// Replaces this agent's tags; the cluster sees a member update.
    pub async fn set_tags(&self, tags: BTreeMap<String, String>) -> Result<(), GossipError> {
        crate::identity::check_tags(&tags)?;
        self.request(|reply| Command::SetTags(tags, reply)).await
    }

    /// Resolves once the agent has stopped (it left, by this handle or another).
    pub async fn stopped(&self) {
        self.commands.closed().await
    }

    /// Leaves gracefully: others list this member as `left`, not `failed`. The agent stops.
    pub async fn leave(&self) -> Result<(), GossipError> {
        self.request(Command::Leave).await
    }

    /// Changes or lists the keyring; returns the installed keys (base64, primary first).
    pub async fn keys(&self, op: KeyOp) -> Result<Vec<String>, GossipError> {
        self.request(|reply| Command::Keys(op, reply)).await?
    }

    /// Sends the command `make` builds around a reply channel and waits for the reply.
    pub(super) async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, GossipError> {
        let (reply, answer) = oneshot::channel();
        self.send(make(reply))?;
        answer.await.map_err(|_| GossipError::Stopped)
    }

    fn send(&self, command: Command) -> Result<(), GossipError> {
        self.commands
            .send(command)
            .map_err(|_| GossipError::Stopped)
    }
}

/// Checks the tags and binds the gossip socket; returns it, the bound address and the one
/// others reach it at (`advertise`, whose port 0 means the bound one; `bind` when not set).
pub(super) async fn bind(
    config: &AgentConfig,
) -> Result<(UdpSocket, SocketAddr, SocketAddr), GossipError> {
    crate::identity::check_tags(&config.tags)?;
    let socket = UdpSocket::bind(config.bind)
        .await
        .map_err(|e| GossipError::Bind(config.bind, e))?;
    let local = socket
        .local_addr()
        .map_err(|e| GossipError::Bind(config.bind, e))?;
    let advertise = match config.advertise {
        Some(addr) if addr.port() == 0 => SocketAddr::new(addr.ip(), local.port()),
        Some(addr) => addr,
        None => local,
    };
    Ok((socket, local, advertise))
}

/// Rejoins through the members of the last snapshot, one after the other, until one answers.
pub(super) async fn rejoin(agent: Agent, previous: Snapshot, me: SocketAddr) {
    for (name, addr) in previous.alive.iter().filter(|(_, addr)| *addr != me) {
        match agent.join(*addr, Duration::from_secs(1)).await {
            Ok(true) => {
                tracing::info!(%name, %addr, "rejoined through the snapshot");
                return;
            }
            Ok(false) => {}
            Err(_) => return,
        }
    }
    tracing::warn!("no member of the snapshot answered");
}

/// A fresh identity's bump: later restarts of the same node win over earlier ones.
fn now_bump() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
