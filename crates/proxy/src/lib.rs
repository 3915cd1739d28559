//! The proxy: one HTTP frontend per role, round-robin over the role's live backends.
//!
//! The backend set is replaced atomically ([`RoleProxy::set_backends`]). A request picks its
//! backend and raises that backend's in-flight count under the same read lock that the switch
//! takes for writing, so once a switch returns, [`drain`] sees every request still bound for
//! an old backend: none can slip through and land on an instance that is being stopped.

mod body;
mod bulk;
pub mod certs;
mod chunked;
mod client_stream;
pub mod edge;
mod forward;
mod h1;
mod metrics;
mod policy;
mod pool;
mod raw;
mod streams;
mod tunnel;

pub use body::ResponseBody;
pub use forward::ProxyService;
pub use metrics::{Exposition, Histogram, LATENCY_BUCKETS, Scope, TrafficMetrics, label};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// One instance the proxy can send requests to.
#[derive(Debug)]
pub struct Backend {
    /// The instance name, for logs and status.
    pub id: String,
    pub addr: SocketAddr,
    in_flight: AtomicUsize,
    /// Set when a connection was refused (passive health); cleared by a passing health check.
    down: AtomicBool,
    /// Keep-alive connections of the general (hyper) path.
    pool: pool::Pool<pool::Sender>,
    /// Keep-alive connections of the HTTP/1.1 fast path.
    raw: pool::Pool<pool::Upstream>,
    /// Turned true at a drain's deadline: upgraded and TCP tunnels to this backend close.
    close_tunnels: watch::Sender<bool>,
    pub metrics: TrafficMetrics,
    /// When its health last changed (see [`now_mark`]; 0 when nothing is pending).
    changed_at: AtomicU64,
    /// When it entered a backend set and has not been routed a request since (0 otherwise).
    eligible_since: AtomicU64,
    /// Microseconds from becoming eligible to its first routed request (`u64::MAX`: not yet).
    first_routed_micros: AtomicU64,
}

impl Backend {
    pub fn new(id: impl Into<String>, addr: SocketAddr) -> Arc<Self> {
        Arc::new(Backend {
            id: id.into(),
            addr,
            in_flight: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            pool: pool::Pool::default(),
            raw: pool::Pool::default(),
            close_tunnels: watch::channel(false).0,
            metrics: TrafficMetrics::default(),
            changed_at: AtomicU64::new(0),
            eligible_since: AtomicU64::new(0),
            first_routed_micros: AtomicU64::new(u64::MAX),
        })
    }

    /// Requests sent to this backend whose response has not been fully delivered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Marks the backend reachable again (after a passing active health check).
    pub fn mark_up(&self) {
        self.down.store(false, Ordering::Release);
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Records that the backend's health just changed; the next backend-set update that adds
    /// or removes it measures its reconfiguration latency from this moment.
    pub fn note_change(&self) {
        let _ =
            self.changed_at
                .compare_exchange(0, now_mark(), Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Time from entering the backend set (or its health change) to its first routed request.
    pub fn first_routed_after(&self) -> Option<Duration> {
        let micros = self.first_routed_micros.load(Ordering::Acquire);
        (micros != u64::MAX).then(|| Duration::from_micros(micros))
    }
}

/// Counters of one role's frontend.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub requests: AtomicU64,
    /// Responses the proxy made itself because no backend could answer (502, 503, 504).
    pub proxy_errors: AtomicU64,
    /// Attempts moved to another backend after a connection failure.
    pub retries: AtomicU64,
    /// Connections closed at accept for `max_connections_per_client`.
    pub refused_connections: AtomicU64,
}

/// What a frontend speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// HTTP/1.1 reverse proxy (keep-alive, retries, `X-Forwarded-*`, upgrades).
    #[default]
    Http,
    /// Layer 4: each client connection is joined to one backend connection.
    Tcp,
}

impl Mode {
    /// Who speaks first on this mode's connections, which decides whether the listener may
    /// defer accepting them (see [`client_stream::tune_listener`]).
    fn first_word(self) -> client_stream::FirstWord {
        match self {
            Mode::Http => client_stream::FirstWord::Client,
            Mode::Tcp => client_stream::FirstWord::Either,
        }
    }
}

/// Settings of one frontend.
#[derive(Debug, Clone, Copy)]
pub struct ProxyConfig {
    pub mode: Mode,
    /// How long to wait for a backend's TCP connection.
    pub connect_timeout: Duration,
    /// How long to wait for a backend's response head before answering 504.
    pub request_timeout: Duration,
    /// How long a client connection may sit without sending a complete request head
    /// (between keep-alive requests, and while sending headers) before it is closed.
    pub idle_timeout: Duration,
    /// The largest request body accepted; larger ones get 413.
    pub max_body: u64,
    /// How long a client may take to send a whole request head once it has started one
    /// (HAProxy's `timeout http-request`); then 408 and the connection is closed.
    pub request_head_timeout: Duration,
    /// Client connections served at once on this listener; more wait in the kernel's backlog
    /// (HAProxy's `maxconn`).
    pub max_connections: usize,
    /// Client connections one address may hold at once; more are closed at accept.
    pub max_connections_per_client: Option<usize>,
}

/// The default `max_connections`: half the descriptors this process may open (each proxied
/// connection holds one to the client and one to a backend), less a reserve for the rest.
pub fn default_max_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur.min(1 << 20) as usize
    } else {
        1024
    };
    (soft.saturating_sub(256) / 2).max(64)
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            mode: Mode::Http,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            request_head_timeout: Duration::from_secs(10),
            max_connections: default_max_connections(),
            max_connections_per_client: None,
            max_body: 16 << 20,
        }
    }
}

/// The frontend state of one role.
#[derive(Debug)]
pub struct RoleProxy {
    pub role: String,
    /// Fixed for the frontend's life: the mode and `max_connections` (its listener's slots).
    fixed: ProxyConfig,
    /// The rest, changed in place by [`RoleProxy::set_config`]: read with plain loads on the
    /// hot path, no lock.
    tunables: Tunables,
    backends: RwLock<Sets>,
    /// Counts requests to split them between the sets.
    turn: AtomicU64,
    pub stats: ProxyStats,
    /// Every response of the role, the proxy's own error answers included.
    pub metrics: Arc<TrafficMetrics>,
    /// From a membership or health change to the first request routed accordingly.
    pub reconfiguration: Histogram,
}

impl RoleProxy {
    pub fn new(role: impl Into<String>, config: ProxyConfig) -> Arc<Self> {
        Arc::new(RoleProxy {
            role: role.into(),
            fixed: config,
            tunables: Tunables::new(&config),
            backends: RwLock::new(Sets::default()),
            turn: AtomicU64::new(0),
            stats: ProxyStats::default(),
            metrics: Arc::default(),
            reconfiguration: Histogram::default(),
        })
    }

    /// Replaces the backend set in one step. When this returns, every request bound for a
    /// backend that is no longer in the set is already counted in that backend's in-flight.
    /// The settings now.
    pub fn config(&self) -> ProxyConfig {
        let t = &self.tunables;
        let duration = |d: &AtomicU64| Duration::from_nanos(d.load(Ordering::Relaxed));
        ProxyConfig {
            mode: self.fixed.mode,
            max_connections: self.fixed.max_connections,
            connect_timeout: duration(&t.connect_timeout),
            request_timeout: duration(&t.request_timeout),
            idle_timeout: duration(&t.idle_timeout),
            request_head_timeout: duration(&t.request_head_timeout),
            max_body: t.max_body.load(Ordering::Relaxed),
            max_connections_per_client: match t.max_connections_per_client.load(Ordering::Relaxed) {
                0 => None,
                n => Some(n),
            },
        }
    }

    /// Changes the settings that can change under open connections (timeouts, body limit,
    /// connections per client); each request reads them as it goes. The mode and
    /// `max_connections` stay what the frontend started with.
    pub fn set_config(&self, config: &ProxyConfig) {
        self.tunables.store(config);
    }

    /// Replaces the live backend set in one step.
    pub fn set_backends(&self, backends: Vec<Arc<Backend>>) {
        let mut sets = self.backends.write().unwrap_or_else(|p| p.into_inner());
        self.note_membership(&sets.live.backends, &backends);
        sets.live.backends = backends;
    }

    /// Sends `share` (in basis points, 0 to 10,000) of the requests to `backends` (a canary)
    /// and the rest to the live set, spread evenly; an empty set or a zero share ends it.
    pub fn set_canary(&self, backends: Vec<Arc<Backend>>, share: u32) {
        let mut sets = self.backends.write().unwrap_or_else(|p| p.into_inner());
        self.note_membership(&sets.canary.backends, &backends);
        sets.canary.backends = backends;
        sets.canary_share = share.min(10_000);
    }

    /// Starts the reconfiguration clock of backends entering a set; records it for the ones
    /// leaving whose health change caused it.
    fn note_membership(&self, current: &[Arc<Backend>], next: &[Arc<Backend>]) {
        let now = now_mark();
        for added in next
            .iter()
            .filter(|b| !current.iter().any(|c| Arc::ptr_eq(c, b)))
        {
            let changed = added.changed_at.swap(0, Ordering::AcqRel);
            added
                .eligible_since
                .store(if changed == 0 { now } else { changed }, Ordering::Release);
        }
        for removed in current
            .iter()
            .filter(|c| !next.iter().any(|b| Arc::ptr_eq(c, b)))
        {
            removed.eligible_since.store(0, Ordering::Release);
            let changed = removed.changed_at.swap(0, Ordering::AcqRel);
            if changed != 0 {
                self.reconfiguration
                    .record(Duration::from_nanos(now.saturating_sub(changed)));
            }
        }
    }

    /// A snapshot of the live backend set.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        let sets = self.backends.read().unwrap_or_else(|p| p.into_inner());
        sets.live.backends.clone()
    }

    /// The canary set and its share in basis points.
    pub fn canary(&self) -> (Vec<Arc<Backend>>, u32) {
        let sets = self.backends.read().unwrap_or_else(|p| p.into_inner());
        (sets.canary.backends.clone(), sets.canary_share)
    }

    /// Picks the next backend: the canary set on its share of the turns, else the live set,
    /// round-robin within the set, skipping `tried` ones and, while others remain, ones
    /// marked down; the other set when the chosen one has nothing left. The in-flight count
    /// is raised before the lock is released.
    fn pick(&self, tried: &[Arc<Backend>]) -> Option<InFlight> {
        let sets = self.backends.read().unwrap_or_else(|p| p.into_inner());
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let (first, second) = if canary_turn(turn, sets.canary_share) {
            (&sets.canary, &sets.live)
        } else {
            (&sets.live, &sets.canary)
        };
        let chosen = first.pick(tried).or_else(|| second.pick(tried))?;
        let since = chosen.eligible_since.load(Ordering::Acquire);
        if since != 0
            && chosen
                .eligible_since
                .compare_exchange(since, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            let latency = Duration::from_nanos(now_mark().saturating_sub(since));
            self.reconfiguration.record(latency);
            chosen
                .first_routed_micros
                .store(latency.as_micros() as u64, Ordering::Release);
        }
        Some(InFlight::new(chosen.clone()))
    }
}

/// Whether request number `turn` goes to the canary: exactly `share` in 10,000 of any run of
/// turns, spread evenly (no bursts), with no randomness.
fn canary_turn(turn: u64, share: u32) -> bool {
    let share = u64::from(share);
    share > 0 && (turn + 1) * share / 10_000 > turn * share / 10_000
}

/// The live and the canary backend sets.
#[derive(Debug, Default)]
struct Sets {
    live: BackendSet,
    canary: BackendSet,
    /// The canary's share of requests, in basis points.
    canary_share: u32,
}

/// Backends taken in turn.
#[derive(Debug, Default)]
struct BackendSet {
    backends: Vec<Arc<Backend>>,
    next: AtomicUsize,
}

impl BackendSet {
    /// The next untried backend round-robin that is up, else any untried one.
    fn pick(&self, tried: &[Arc<Backend>]) -> Option<&Arc<Backend>> {
        let count = self.backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let untried = |b: &&Arc<Backend>| !tried.iter().any(|t| Arc::ptr_eq(t, b));
        let in_turn = || (0..count).map(|i| &self.backends[(start + i) % count]);
        in_turn()
            .filter(untried)
            .find(|b| !b.is_down())
            .or_else(|| in_turn().find(untried))
    }
}

/// Holds one request's claim on a backend; dropping it lowers the in-flight count.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Backend>);

impl InFlight {
    fn new(backend: Arc<Backend>) -> Self {
        backend.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(backend)
    }

    pub(crate) fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The settings of a frontend that change in place, as plain atomics.
#[derive(Debug)]
struct Tunables {
    connect_timeout: AtomicU64,
    request_timeout: AtomicU64,
    idle_timeout: AtomicU64,
    request_head_timeout: AtomicU64,
    max_body: AtomicU64,
    /// 0: no limit.
    max_connections_per_client: AtomicUsize,
}

impl Tunables {
    fn new(config: &ProxyConfig) -> Tunables {
        let tunables = Tunables {
            connect_timeout: AtomicU64::new(0),
            request_timeout: AtomicU64::new(0),
            idle_timeout: AtomicU64::new(0),
            request_head_timeout: AtomicU64::new(0),
            max_body: AtomicU64::new(0),
            max_connections_per_client: AtomicUsize::new(0),
        };
        tunables.store(config);
        tunables
    }

    fn store(&self, config: &ProxyConfig) {
        let nanos = |d: Duration| d.as_nanos().min(u128::from(u64::MAX)) as u64;
        let set = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        set(&self.connect_timeout, nanos(config.connect_timeout));
        set(&self.request_timeout, nanos(config.request_timeout));
        set(&self.idle_timeout, nanos(config.idle_timeout));
        set(
            &self.request_head_timeout,
            nanos(config.request_head_timeout),
        );
        set(&self.max_body, config.max_body);
        self.max_connections_per_client.store(
            config.max_connections_per_client.unwrap_or(0),
            Ordering::Relaxed,
        );
    }
}

/// What a drain found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    pub waited: Duration,
    /// Requests still in flight when the deadline passed (0 when all finished).
    pub abandoned: usize,
}

/// Waits until `backends` (already removed from every set) hold no request, or `deadline`.
pub async fn drain(backends: &[Arc<Backend>], deadline: Duration) -> DrainReport {
    let start = Instant::now();
    loop {
        let in_flight: usize = backends.iter().map(|b| b.in_flight()).sum();
        if in_flight == 0 || start.elapsed() >= deadline {
            for backend in backends {
                backend.pool.clear();
                backend.raw.clear();
                backend.close_tunnels.send_replace(true);
            }
            return DrainReport {
                waited: start.elapsed(),
                abandoned: in_flight,
            };
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What a frontend is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stop {
    #[default]
    Serve,
    /// Stop accepting; open connections finish their current request and close.
    Drain,
    /// Stop accepting; open connections finish their current request and are set aside,
    /// open, with the listener, for the next program (`phoenix restart`).
    HandOver,
}

/// A client connection set aside between two requests: the next program serves it on.
#[derive(Debug)]
pub struct Parked {
    pub stream: std::net::TcpStream,
    pub client: SocketAddr,
    /// Bytes the client already sent (part of its next request).
    pub buffered: bytes::Bytes,
}

/// What a frontend leaves when it stops: after [`Stop::HandOver`], its listener and its
/// parked connections.
#[derive(Debug, Default)]
pub struct Leftover {
    pub listener: Option<std::net::TcpListener>,
    pub parked: Vec<Parked>,
}

/// Serves `proxy` on `listener` (and first the connections `inherited` from a previous
/// program) until `stop` asks otherwise; then stops accepting, lets open connections finish
/// their current request, and returns when they are closed or parked, or after `grace`.
///
/// At most `max_connections` are served at once: the next is not accepted until one ends, so
/// the excess waits in the kernel's backlog instead of holding descriptors. When `accept`
/// fails (out of descriptors, say), the loop pauses, longer each time, instead of spinning.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<RoleProxy>,
    mut stop: watch::Receiver<Stop>,
    grace: Duration,
    inherited: Vec<Parked>,
) -> Leftover {
    let slots = Arc::new(tokio::sync::Semaphore::new(
        proxy.config().max_connections.max(1),
    ));
    let clients = Arc::new(ClientCounts::default());
    let listener = match client_stream::Listener::new(listener, proxy.config().mode.first_word()) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(role = %proxy.role, %error, "cannot watch the listening socket");
            return Leftover::default();
        }
    };
    let _heartbeat = timer_heartbeat();
    let mut connections = tokio::task::JoinSet::new();
    for parked in inherited {
        if parked.stream.set_nonblocking(true).is_err() {
            continue;
        }
        let stream = client_stream::ClientStream::Unregistered(parked.stream);
        let (proxy, stop) = (proxy.clone(), stop.clone());
        let slot = slots.clone().try_acquire_owned().ok();
        connections.spawn(async move {
            let parked = h1::serve(stream, parked.client, parked.buffered, proxy, stop).await;
            drop(slot);
            parked
        });
    }
    let mut pause = ACCEPT_PAUSE_MIN;
    let asked = loop {
        while connections.try_join_next().is_some() {}
        let slot = tokio::select! {
            asked = stop_asked(&mut stop) => break asked,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, client) = tokio::select! {
            asked = stop_asked(&mut stop) => break asked,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(role = %proxy.role, %error, "accept failed; pausing {pause:?}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                    continue;
                }
            },
        };
        pause = ACCEPT_PAUSE_MIN;
        let Some(admitted) = clients.admit(client.ip(), proxy.config().max_connections_per_client)
        else {
            proxy
                .stats
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (stop, proxy) = (stop.clone(), proxy.clone());
        connections.spawn(async move {
            let parked = match proxy.config().mode {
                Mode::Http => h1::serve(stream, client, bytes::Bytes::new(), proxy, stop).await,
                Mode::Tcp => {
                    if let Ok(stream) = stream.into_tokio() {
                        tunnel::serve_tcp(stream, proxy).await;
                    }
                    None
                }
            };
            drop((slot, admitted));
            parked
        });
    };
    let mut leftover = Leftover::default();
    if asked == Stop::HandOver {
        leftover.listener = Some(listener.into_std());
    } else {
        drop(listener);
    }
    let _ = tokio::time::timeout(grace, async {
        while let Some(joined) = connections.join_next().await {
            if let Ok(Some(parked)) = joined {
                leftover.parked.push(parked);
            }
        }
    })
    .await;
    leftover
}

/// How often [`timer_heartbeat`] fires: shorter than the default request, head and idle
/// timeouts (a timeout configured shorter still wakes the loop when it is set, as before).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A timer due every second on this runtime for as long as the returned set is held.
///
/// tokio wakes its event loop (an eventfd write, then an extra epoll_wait) whenever a timer
/// is set to expire before the earliest one the loop last went to sleep with. Each request
/// sets a timeout; with a new connection per request, no other timer was nearer, so nearly
/// every request paid that wake (strace: 10,223 eventfd writes for 10,460 requests). With a
/// timer always due within a second, setting a later one costs no wake.
pub(crate) fn timer_heartbeat() -> tokio::task::JoinSet<()> {
    let mut heartbeat = tokio::task::JoinSet::new();
    heartbeat.spawn(async {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
        }
    });
    heartbeat
}

/// Resolves with what `stop` asks once it asks anything but to serve (or its sender is gone:
/// a drain).
pub async fn stop_asked(stop: &mut watch::Receiver<Stop>) -> Stop {
    match stop.wait_for(|asked| *asked != Stop::Serve).await {
        Ok(asked) => *asked,
        Err(_) => Stop::Drain,
    }
}

const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Open connections per client address, for `max_connections_per_client`.
#[derive(Default)]
struct ClientCounts(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One admitted connection; its count goes when it is dropped.
struct Admitted {
    counts: Arc<ClientCounts>,
    ip: Option<std::net::IpAddr>,
}

impl ClientCounts {
    /// Counts a connection from `ip`, or refuses it when `limit` is reached.
    fn admit(self: &Arc<Self>, ip: std::net::IpAddr, limit: Option<usize>) -> Option<Admitted> {
        let Some(limit) = limit else {
            return Some(Admitted {
                counts: self.clone(),
                ip: None,
            });
        };
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Admitted {
            counts: self.clone(),
            ip: Some(ip),
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let Some(ip) = self.ip else { return };
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&ip);
            }
        }
    }
}

/// One HTTP client connection served by hyper (the general path): HTTP/1.x with keep-alive,
/// upgrades and the idle timeout, or h2c.
async fn serve_hyper<I>(
    io: I,
    client: SocketAddr,
    proxy: Arc<RoleProxy>,
    mut stop: watch::Receiver<Stop>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let idle_timeout = proxy.config().idle_timeout;
    let proxy_head_timeout = proxy.config().request_head_timeout;
    let service = ProxyService::new(proxy, client);
    // HTTP/1.1, and HTTP/2 for clients that speak it from the first byte (h2c, prior knowledge).
    let (executor, streams) = streams::per_connection();
    let mut builder = auto::Builder::new(executor);
    builder
        .http1()
        .writev(false)
        // A client may send its request and shut its side down (`printf ... | nc`): it
        // still gets its answer, as from HAProxy and nginx.
        .half_close(true)
        .timer(TokioTimer::new())
        // hyper's timer runs while it waits for a head, idle or not: the shorter of the two.
        .header_read_timeout(idle_timeout.min(proxy_head_timeout));
    builder.http2().timer(TokioTimer::new());
    serve_with(&builder, streams, io, service, &mut stop).await;
}

/// Serves one client connection with `builder`'s protocols until it ends, or until `stop` asks
/// and it has shut down gracefully. Its HTTP/2 streams run in this task, and its writes wait
/// for the task's next turn (see `streams`).
pub(crate) async fn serve_with<I, T>(
    builder: &auto::Builder<streams::ConnectionExecutor>,
    streams: streams::Streams,
    io: I,
    service: T,
    stop: &mut watch::Receiver<Stop>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<ResponseBody>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    T::Future: Send + 'static,
{
    let service = TowerToHyperService::new(service);
    let io = streams.defer_writes(io);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    streams
        .beside(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop_asked(stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        })
        .await;
}

/// Nanoseconds since the first call in this process, plus one (so 0 can mean "unset").
fn now_mark() -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// Resolves once `flag` turns true (or its sender is gone).
pub async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|stop| *stop).await;
}

/// The head parsers for `cargo fuzz` (see `fuzz/`). Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    /// Any bytes as a request head (an even first byte) or a response head (an odd one);
    /// panics if a parsed head is rewritten into something that does not parse back.
    pub fn heads(data: &[u8]) {
        let Some((&first, rest)) = data.split_first() else {
            return;
        };
        if first % 2 == 0 {
            crate::h1::check_request(rest);
        } else {
            crate::h1::check_response(rest);
        }
    }
}

#[cfg(test)]
mod tests;
