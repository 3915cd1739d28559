//! The controller: owns the roles, their generations and instances, and converges to the fleet file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use phoenix_driver::{Driver, Secret};
use phoenix_image::{BakeOptions, ImageStore};
use phoenix_proxy::RoleProxy;
use phoenix_store::{GenerationStatus, Store, StoreError};
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::clock::{Clock, Namer, SystemClock};
use crate::instance::Instance;
use crate::membership::Membership;
use crate::{AgentSettings, FleetError, FleetFile, RoleConfig, RunConfig, bake};

/// How to open a controller.
pub struct Options {
    pub state_dir: PathBuf,
    pub fleet_path: PathBuf,
    pub clock: Arc<dyn Clock>,
    /// Seed for instance names; `None` seeds from the OS.
    pub seed: Option<u64>,
    pub bake: BakeOptions,
    /// One driver for every role, on the host's network, instead of what the fleet file asks.
    pub driver: Option<Arc<dyn Driver>>,
    /// What the previous program of this process handed over (`phoenix restart`).
    pub inherited: Option<crate::handover::Handed>,
    /// This machine as a host of a `[cluster]` (ignored without one).
    pub host: crate::cluster::HostSettings,
    /// TLS to the etcd members, for `https://` endpoints.
    pub cluster_tls: Option<Arc<rustls::ClientConfig>>,
}

impl Options {
    pub fn new(state_dir: PathBuf, fleet_path: PathBuf) -> Self {
        Options {
            state_dir,
            fleet_path,
            clock: Arc::new(SystemClock),
            seed: None,
            bake: BakeOptions::default(),
            driver: None,
            inherited: None,
            host: Default::default(),
            cluster_tls: None,
        }
    }
}

/// What the supervisors tell the controller.
#[derive(Debug)]
pub(crate) enum Event {
    HealthChanged {
        role: String,
    },
    Died {
        role: String,
        generation: i64,
        instance: String,
    },
}

/// A set of instances of one role running one image.
#[derive(Debug)]
pub(crate) struct Generation {
    pub id: i64,
    pub image: String,
    instances: Mutex<Vec<Arc<Instance>>>,
    status: Mutex<GenerationStatus>,
    /// The role's secrets as they were when the generation was made: every instance of it,
    /// replacements included, gets the same values; a new value needs a new generation.
    pub secrets: Vec<Secret>,
}

impl Generation {
    pub fn new(
        id: i64,
        image: String,
        status: GenerationStatus,
        secrets: Vec<Secret>,
    ) -> Arc<Self> {
        Arc::new(Generation {
            id,
            image,
            instances: Mutex::new(Vec::new()),
            status: Mutex::new(status),
            secrets,
        })
    }

    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn status(&self) -> GenerationStatus {
        *self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_status(&self, status: GenerationStatus) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }

    /// An instance joins the generation.
    pub fn add(&self, instance: Arc<Instance>) {
        self.instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(instance);
    }

    /// Instances leave the generation (they stop serving it; stopping them is the caller's).
    pub fn remove(&self, leaving: impl Fn(&Instance) -> bool) {
        self.instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|i| !leaving(i));
    }
}

/// An instance of another host, admitted as a backend of a role.
#[derive(Debug, Clone)]
pub struct RemoteBackend {
    pub backend: Arc<phoenix_proxy::Backend>,
    /// The host that runs it.
    pub host: String,
    /// Whether this host's own health check of it passes (only then it gets traffic).
    pub healthy: bool,
    /// Its generation is the live one on its host.
    pub live: bool,
    /// Its image, as a short digest.
    pub image: String,
}

/// One role at run time.
#[derive(Debug)]
pub(crate) struct Role {
    pub name: String,
    config: RwLock<RoleConfig>,
    pub proxy: Arc<RoleProxy>,
    /// Where its frontend listens (changed by `apply`).
    listen: RwLock<SocketAddr>,
    /// Its frontends' serving tasks and their stop signals.
    frontends: Mutex<Vec<crate::roles::Frontend>>,
    /// Held by whatever changes the role's generations or size: one at a time.
    deploy_lock: Arc<tokio::sync::Mutex<()>>,
    live: Mutex<Option<Arc<Generation>>>,
    /// Generations starting (in a deploy) or draining.
    others: Mutex<Vec<Arc<Generation>>>,
    /// A canary generation in a deploy and its share of requests (basis points).
    canary: Mutex<Option<(Arc<Generation>, u32)>>,
    /// Recent unexpected deaths, for crash-loop backoff.
    deaths: Mutex<Vec<Instant>>,
    /// Live, healthy instances of this role on other hosts (from gossip).
    remote: Mutex<Vec<RemoteBackend>>,
    /// Tells the membership task that instances or their health changed.
    changed: Arc<tokio::sync::Notify>,
    /// The size set by `phoenix scale`, when it overrides the fleet file's `instances`.
    size: Mutex<Option<u32>>,
    /// Instances killed on purpose (chaos): replaced at once, not counted as a crash loop.
    killed_on_purpose: Mutex<Vec<String>>,
    /// The driver and network its instances run on.
    pub placement: crate::drivers::Placement,
    /// In a cluster: other hosts' instances serve when they run the image this host's live
    /// generation runs (so every host's proxy switches with its own switch, without waiting
    /// for the `live` tags to spread); on their own, when they say they are live.
    by_image: std::sync::atomic::AtomicBool,
}

impl Role {
    /// A role about to serve on `listen` (not serving yet: see [`Role::serve`]).
    pub fn new(
        name: &str,
        config: RoleConfig,
        listen: SocketAddr,
        size: Option<u32>,
        changed: Arc<tokio::sync::Notify>,
        placement: crate::drivers::Placement,
    ) -> Arc<Role> {
        Arc::new(Role {
            name: name.to_string(),
            proxy: RoleProxy::new(name.to_string(), config.proxy.to_proxy_config()),
            config: RwLock::new(config),
            listen: RwLock::new(listen),
            frontends: Mutex::new(Vec::new()),
            deploy_lock: Arc::new(tokio::sync::Mutex::new(())),
            live: Mutex::new(None),
            others: Mutex::new(Vec::new()),
            canary: Mutex::new(None),
            deaths: Mutex::new(Vec::new()),
            remote: Mutex::new(Vec::new()),
            changed,
            killed_on_purpose: Mutex::new(Vec::new()),
            size: Mutex::new(size),
            placement,
            by_image: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Chooses other hosts' instances by image (in a cluster), not by their `live` tag.
    pub(crate) fn choose_remote_by_image(&self) {
        self.by_image
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn listen(&self) -> SocketAddr {
        *self.listen.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_listen(&self, addr: SocketAddr) {
        *self.listen.write().unwrap_or_else(|p| p.into_inner()) = addr;
    }

    pub(crate) fn frontends(&self) -> std::sync::MutexGuard<'_, Vec<crate::roles::Frontend>> {
        self.frontends.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many instances the live generation should have: the size set by `phoenix scale`,
    /// else the fleet file's `instances`. Deploys and restarts size new generations to it.
    pub fn desired(&self) -> u32 {
        let size = *self.size.lock().unwrap_or_else(|p| p.into_inner());
        size.unwrap_or_else(|| self.config().instances)
    }

    pub fn config(&self) -> RoleConfig {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A new config from the fleet file; a changed `instances` replaces a size set by hand.
    pub fn set_config(&self, config: RoleConfig) {
        let mut current = self.config.write().unwrap_or_else(|p| p.into_inner());
        if current.instances != config.instances {
            *self.size.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        self.proxy.set_config(&config.proxy.to_proxy_config());
        *current = config;
    }

    /// The right to change the role's generations or size, if nobody holds it (a deploy, a
    /// scale, a renewal, a strike of chaos, a restart's handover).
    pub fn try_deploy_guard(&self) -> Result<tokio::sync::OwnedMutexGuard<()>, FleetError> {
        self.deploy_lock
            .clone()
            .try_lock_owned()
            .map_err(|_| FleetError::Busy {
                role: self.name.clone(),
            })
    }

    /// The same right, waiting for it.
    pub async fn deploy_guard(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.deploy_lock.clone().lock_owned().await
    }

    /// True while something holds the right to change the role.
    pub fn is_deploying(&self) -> bool {
        self.deploy_lock.try_lock().is_err()
    }

    /// The size `phoenix scale` set (kept until the file's `instances` changes).
    pub fn set_size(&self, size: u32) {
        *self.size.lock().unwrap_or_else(|p| p.into_inner()) = Some(size);
    }

    /// `name` is about to be killed on purpose (chaos): its death is no crash.
    pub fn note_killed_on_purpose(&self, name: &str) {
        self.killed_on_purpose
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.to_string());
    }

    pub fn live(&self) -> Option<Arc<Generation>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The generations starting or draining.
    pub fn others(&self) -> Vec<Arc<Generation>> {
        self.others
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Points the proxy at the healthy instances of the live generation (and other hosts'
    /// live ones), in one step.
    pub fn refresh_backends(&self) {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        self.proxy.set_backends(self.backends(live.as_ref()));
        drop(live);
        self.refresh_canary();
        self.changed.notify_one();
    }

    /// Sends `share` basis points of the requests to `generation`'s healthy instances (a
    /// canary), or, with `None`, none.
    pub fn set_canary(&self, canary: Option<(Arc<Generation>, u32)>) {
        *self.canary.lock().unwrap_or_else(|p| p.into_inner()) = canary;
        self.refresh_canary();
    }

    fn refresh_canary(&self) {
        let canary = self.canary.lock().unwrap_or_else(|p| p.into_inner());
        match canary.as_ref() {
            Some((generation, share)) => self
                .proxy
                .set_canary(healthy_backends(Some(generation)), *share),
            None => self.proxy.set_canary(Vec::new(), 0),
        }
    }

    /// Makes `generation` the live one and moves traffic to it atomically; returns the old one.
    pub fn switch_to(&self, generation: Arc<Generation>) -> Option<Arc<Generation>> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        generation.set_status(GenerationStatus::Live);
        let old = live.replace(generation);
        self.proxy.set_backends(self.backends(live.as_ref()));
        self.changed.notify_one();
        old
    }

    /// Replaces the instances other hosts serve this role with.
    pub fn set_remote(&self, remote: Vec<RemoteBackend>) {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        *self.remote.lock().unwrap_or_else(|p| p.into_inner()) = remote;
        self.proxy.set_backends(self.backends(live.as_ref()));
    }

    fn backends(&self, live: Option<&Arc<Generation>>) -> Vec<Arc<phoenix_proxy::Backend>> {
        let mut backends = healthy_backends(live);
        let by_image = self.by_image.load(std::sync::atomic::Ordering::Relaxed);
        let image = live.map(|g| crate::membership::short(&g.image));
        let serves = |r: &RemoteBackend| match (&image, by_image) {
            (Some(image), true) => r.image == *image,
            _ => r.live,
        };
        backends.extend(
            self.remote
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|r| r.healthy && serves(r))
                .map(|r| r.backend.clone()),
        );
        backends
    }

    /// The instances other hosts serve this role with, as last admitted.
    pub fn remote(&self) -> Vec<RemoteBackend> {
        self.remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn add_other(&self, generation: Arc<Generation>) {
        self.others
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(generation);
        self.changed.notify_one();
    }

    pub fn remove_other(&self, id: i64) {
        self.others
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|g| g.id != id);
        self.changed.notify_one();
    }

    /// Delay before replacing a crashed instance: none for the first crash in a minute,
    /// then doubling from 500 ms up to 30 s, so a crash loop does not spin. An instance killed
    /// on purpose is replaced at once and does not count.
    fn replacement_delay(&self, dead: &str) -> Duration {
        let mut on_purpose = self
            .killed_on_purpose
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(at) = on_purpose.iter().position(|name| name == dead) {
            on_purpose.remove(at);
            return Duration::ZERO;
        }
        drop(on_purpose);
        let mut deaths = self.deaths.lock().unwrap_or_else(|p| p.into_inner());
        deaths.retain(|t| t.elapsed() < Duration::from_secs(60));
        deaths.push(Instant::now());
        match deaths.len() {
            0 | 1 => Duration::ZERO,
            n => Duration::from_millis(500u64.saturating_mul(1 << (n - 2).min(6)))
                .min(Duration::from_secs(30)),
        }
    }
}

fn healthy_backends(generation: Option<&Arc<Generation>>) -> Vec<Arc<phoenix_proxy::Backend>> {
    generation
        .iter()
        .flat_map(|g| g.instances())
        .filter(|i| i.is_healthy() && !i.flags().standby)
        .map(|i| i.backend.clone())
        .collect()
}

/// Shared state of the controller.
pub(crate) struct Inner {
    pub state_dir: PathBuf,
    pub fleet_path: PathBuf,
    pub store: Arc<Store>,
    pub images: ImageStore,
    pub drivers: Arc<crate::drivers::Drivers>,
    pub secrets: Arc<crate::secrets::Secrets>,
    pub clock: Arc<dyn Clock>,
    pub namer: Namer,
    pub bake: BakeOptions,
    roles: RwLock<BTreeMap<String, Arc<Role>>>,
    pub events: mpsc::UnboundedSender<Event>,
    pub shutdown: watch::Sender<bool>,
    membership: Arc<Membership>,
    /// What the host agent was started with (its RPC and handlers are the binary's).
    agent_settings: AgentSettings,
    /// Ends when the instance members have left, at shutdown.
    members_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The last minute of per-second samples, for the autoscaler.
    pub recent: crate::sampling::Recent,
    /// The fleet file as last applied (at start, by `apply`, and for a role by its deploy):
    /// what `plan` compares with.
    applied: Mutex<FleetFile>,
    /// Every background task (loops, replacements): shutdown waits for them.
    tasks: tokio_util::task::TaskTracker,
    /// Instances' output into the log store.
    pub capture: crate::capture::Capture,
    /// This host's membership of a `[cluster]`, when the fleet file has one.
    pub cluster: Option<crate::cluster::Cluster>,
    /// `[logs.forward.*]`: the store's lines on to other log systems.
    pub forwarding: tokio::sync::Mutex<crate::forward::Forwarding>,
    /// `[listener.NAME]`: the edge listeners.
    pub(crate) listeners: crate::listeners::Listeners,
    /// The newest journal sequence number: webhook senders wake on it.
    journal_written: watch::Sender<i64>,
    /// `[webhook.NAME]`: journal events sent on.
    pub(crate) webhooks: tokio::sync::Mutex<crate::webhooks::Webhooks>,
}

impl Inner {
    /// Where instances on the host's network listen: this host's address in a cluster (so
    /// other hosts' proxies reach them), loopback on one machine.
    pub(crate) fn host_ip(&self) -> std::net::Ipv4Addr {
        match &self.cluster {
            Some(cluster) => host_ipv4(cluster.address()),
            None => std::net::Ipv4Addr::LOCALHOST,
        }
    }

    /// The last `count` lines `instance` wrote (from the log store).
    pub(crate) fn log_tail(
        &self,
        instance: &crate::instance::Instance,
        count: usize,
    ) -> Vec<String> {
        phoenix_observe::logs::tail(
            self.capture.store_dir(),
            &instance.role,
            &instance.name,
            count,
        )
        .into_iter()
        .map(|line| line.text)
        .collect()
    }

    pub fn role(&self, name: &str) -> Result<Arc<Role>, FleetError> {
        let roles = self.roles.read().unwrap_or_else(|p| p.into_inner());
        roles
            .get(name)
            .cloned()
            .ok_or_else(|| FleetError::UnknownRole {
                role: name.into(),
                known: roles.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    /// Runs `work` in the background, counted: shutdown waits for it.
    pub(crate) fn spawn(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(work);
    }

    /// What tells the membership task that instances changed (each role holds it).
    pub(crate) fn membership_wake(&self) -> Arc<tokio::sync::Notify> {
        self.membership.wake.clone()
    }

    /// Where a role added at run time with `run` runs: the placement of a running role with
    /// the same driver and network (or the process driver this host fell back to).
    pub(crate) fn placement_like(&self, run: &RunConfig) -> Option<crate::drivers::Placement> {
        let wants_bridge = run.network == crate::NetworkMode::Bridge;
        self.roles().iter().map(|r| r.placement.clone()).find(|p| {
            let driver = p.driver.name();
            let bridged = matches!(p.network, phoenix_driver::Network::Bridge(_));
            (driver == run.driver.name() && bridged == wants_bridge)
                || (driver == "process" && !run.driver_explicit)
        })
    }

    /// Every role now, by name.
    pub fn roles(&self) -> Vec<Arc<Role>> {
        self.roles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub(crate) fn insert_role(&self, role: Arc<Role>) {
        self.roles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(role.name.clone(), role);
    }

    pub(crate) fn remove_role(&self, name: &str) -> Option<Arc<Role>> {
        self.roles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Runs a store call off the async runtime.
    pub async fn db<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, FleetError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || call(&store))
            .await
            .map_err(|e| FleetError::Internal(e.to_string()))?
            .map_err(FleetError::from)
    }

    /// Appends to the journal; a failure is logged, never fatal to the work it describes.
    pub async fn journal(&self, role: Option<&str>, kind: &'static str, detail: serde_json::Value) {
        let now = self.clock.now_ms();
        let role = role.map(str::to_string);
        tracing::info!(role = role.as_deref().unwrap_or("-"), "{kind} {detail}");
        match self
            .db(move |s| s.journal(now, role.as_deref(), kind, &detail))
            .await
        {
            Ok(seq) => {
                self.journal_written.send_replace(seq);
            }
            Err(error) => tracing::error!(%error, "writing the journal"),
        }
    }

    /// What webhook senders read the journal with.
    pub(crate) fn webhook_journal(&self) -> crate::webhooks::Journal {
        crate::webhooks::Journal {
            store: self.store.clone(),
            clock: self.clock.clone(),
            written: self.journal_written.subscribe(),
            state_dir: self.state_dir.clone(),
        }
    }

    /// What verifying an image needs.
    /// What verifying an image needs: the drivers and networks of the roles, the secrets.
    pub fn verifier(&self) -> crate::Verifier {
        crate::Verifier {
            store: self.store.clone(),
            images: self.images.clone(),
            drivers: self.drivers.clone(),
            secrets: self.secrets.clone(),
            state_dir: self.state_dir.clone(),
        }
    }

    /// What instances' `/etc/hosts` lists besides themselves: every role's name, at the
    /// bridge's address where its proxy also listens.
    pub fn role_hosts(&self) -> Vec<(String, std::net::Ipv4Addr)> {
        match self.drivers.bridge() {
            Some(bridge) => self
                .roles()
                .iter()
                .map(|role| (role.name.clone(), bridge.gateway()))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Reads the fleet file again (deploys pick up edits).
    pub fn reload_fleet(&self) -> Result<FleetFile, FleetError> {
        Ok(FleetFile::load(&self.fleet_path)?)
    }

    pub fn applied(&self) -> FleetFile {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_applied(&self, fleet: FleetFile) {
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = fleet;
    }

    /// A deploy of `role` took its settings and recipe from `fleet`.
    pub fn note_deployed(&self, fleet: &FleetFile, role: &str) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(config) = fleet.roles.get(role) {
            if let Some(recipe) = fleet.images.get(&config.image) {
                applied.images.insert(config.image.clone(), recipe.clone());
            }
            applied.roles.insert(role.to_string(), config.clone());
        }
    }
}

/// The controller of one state directory.
#[derive(Clone)]
pub struct Controller {
    pub(crate) inner: Arc<Inner>,
}

impl Controller {
    /// Opens the state, recovers from a previous crash, and binds every role's frontend.
    /// Call [`Controller::converge`] next to bring the roles up.
    pub async fn open(mut options: Options) -> Result<Controller, FleetError> {
        let mut inherited = options.inherited.take().unwrap_or_default();
        let fleet = FleetFile::load(&options.fleet_path)?;
        let absolute = |path: &PathBuf| {
            std::path::absolute(path).map_err(|e| FleetError::Io {
                what: format!("resolve {}", path.display()),
                cause: e,
            })
        };
        let state_dir = absolute(&options.state_dir)?;
        let fleet_path = absolute(&options.fleet_path)?;
        // The state is its owner's: others may pass through it (containers' runtimes reach
        // their bundles once in a user namespace) but not list it; the logs are private, and
        // so are the databases (`private_file`) and the images' roots.
        for (dir, mode) in [(state_dir.clone(), 0o711), (state_dir.join("logs"), 0o700)] {
            std::fs::create_dir_all(&dir)
                .and_then(|()| {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                })
                .map_err(|e| FleetError::Io {
                    what: format!("create {}", dir.display()),
                    cause: e,
                })?;
        }
        let store = Arc::new(Store::open(state_dir.join("state.db"))?);
        let capture = crate::capture::Capture::start(
            crate::capture::store_dir(&state_dir),
            options.clock.clone(),
        )
        .map_err(|cause| FleetError::Io {
            what: "open the log store".into(),
            cause,
        })?;
        capture.inherit(std::mem::take(&mut inherited.outputs));
        capture.set_retentions(&fleet.roles);
        let forwarding = crate::forward::Forwarding::start(
            &fleet.logs.forward,
            capture.store_dir(),
            &state_dir,
            capture.written(),
        );
        store.check()?;
        let (journal_written, _) = watch::channel(store.journal_last_seq()?);
        let webhooks = crate::webhooks::Webhooks::start(
            &fleet.webhooks,
            &crate::webhooks::Journal {
                store: store.clone(),
                clock: options.clock.clone(),
                written: journal_written.subscribe(),
                state_dir: state_dir.clone(),
            },
        );
        let metrics_path = state_dir.join("metrics.db");
        phoenix_store::private_file(&metrics_path).map_err(|cause| FleetError::Io {
            what: format!("create {}", metrics_path.display()),
            cause,
        })?;
        let metrics = Arc::new(phoenix_observe::MetricsDb::open(
            state_dir.join("metrics.db"),
        )?);
        let images = ImageStore::open(state_dir.join("images"))?;
        let rng = options
            .seed
            .map(fastrand::Rng::with_seed)
            .unwrap_or_default();
        let (events, events_rx) = mpsc::unbounded_channel();
        let (shutdown, _) = watch::channel(false);
        // The fleet file's `[agent]`, or a lone agent without one.
        let mut agent_settings = fleet.agent.clone().unwrap_or_else(AgentSettings::lone);
        // In a cluster the host's gossip member carries the host's name.
        if let (Some(_), Some(name)) = (&fleet.cluster, &options.host.name) {
            agent_settings.node = Some(name.clone());
        }
        let membership = Membership::start(&agent_settings, &state_dir).await?;
        let cluster = match &fleet.cluster {
            Some(config) => {
                let record = options.host.record(membership.host_member());
                Some(
                    crate::cluster::Cluster::join(config, options.cluster_tls.clone(), record)
                        .await?,
                )
            }
            None => None,
        };
        let drivers = match options.driver {
            Some(driver) => crate::drivers::Drivers::single(&fleet, driver),
            None => {
                let (fleet, state) = (fleet.clone(), state_dir.clone());
                let bridge = inherited.bridge.clone();
                // On loopback (a one-machine cluster) there is nobody to publish to.
                let publish_on = cluster
                    .as_ref()
                    .map(|c| host_ipv4(c.address()))
                    .filter(|ip| !ip.is_loopback());
                tokio::task::spawn_blocking(move || {
                    crate::drivers::Drivers::open(&fleet, &state, true, bridge.as_ref(), publish_on)
                })
                .await
                .map_err(|e| FleetError::Internal(e.to_string()))??
            }
        };
        let secrets = crate::secrets::Secrets::capture(&fleet);
        check_secrets(&fleet, &secrets)?;
        let mut roles = BTreeMap::new();
        let mut listeners = Vec::new();
        for (name, config) in &fleet.roles {
            let gateway = drivers.bridge().map(|b| b.gateway());
            let (listen, bound) =
                match crate::roles::take_inherited(&mut inherited, name, config.listen) {
                    Some(taken) => taken,
                    None => crate::roles::bind(name, config.listen, gateway).await?,
                };
            // A size set by hand holds until the file's `instances` changes.
            let size = store
                .role_size(name)?
                .filter(|(_, file)| *file == config.instances)
                .map(|(size, _)| size);
            // In a cluster a host starts each role small; the placement then says how many.
            let size = if fleet.cluster.is_some() {
                Some(1)
            } else {
                size
            };
            let role = Role::new(
                name,
                config.clone(),
                listen,
                size,
                membership.wake.clone(),
                drivers.placement(name),
            );
            if fleet.cluster.is_some() {
                role.choose_remote_by_image();
            }
            listeners.push((bound, role.clone()));
            roles.insert(name.clone(), role);
        }
        // The network policy, before any instance starts (rules name the bound ports).
        let guarded: Vec<_> = roles
            .values()
            .map(|role| (role.name.clone(), role.listen(), role.config().guard))
            .collect();
        let drivers = tokio::task::spawn_blocking(move || drivers.guard(&guarded).map(|_| drivers))
            .await
            .map_err(|e| FleetError::Internal(e.to_string()))??;
        let inner = Arc::new(Inner {
            state_dir,
            fleet_path,
            store,
            images,
            drivers: Arc::new(drivers),
            secrets: Arc::new(secrets),
            clock: options.clock,
            namer: Namer::new(rng),
            bake: options.bake,
            roles: RwLock::new(roles),
            events,
            shutdown,
            membership: membership.clone(),
            agent_settings,
            members_task: Mutex::new(None),
            recent: Default::default(),
            applied: Mutex::new(fleet.clone()),
            tasks: tokio_util::task::TaskTracker::new(),
            capture,
            forwarding: tokio::sync::Mutex::new(forwarding),
            cluster,
            listeners: Default::default(),
            journal_written,
            webhooks: tokio::sync::Mutex::new(webhooks),
        });
        // Edge listeners bind before anything starts: a bad certificate or a taken address
        // stops `phoenix up` here, naming the listener.
        crate::listeners::Listeners::start(&inner, &fleet.listeners).await?;
        // Instances handed over by the previous program are taken over, not killed.
        let handed: Vec<_> = std::mem::take(&mut inherited.instances)
            .into_iter()
            .filter(|h| inner.role(&h.role).is_ok())
            .collect();
        let keep = handed.iter().map(|h| h.name.clone()).collect();
        crate::recover::recover(&inner, &keep).await?;
        if !handed.is_empty() {
            let adopted = inner.adopt(&handed).await;
            inner.journal_adoption(handed.len(), adopted).await;
        }
        // Ports published for instances that were not taken over stop translating.
        if let Some(bridge) = inner.drivers.bridge().cloned() {
            tokio::task::spawn_blocking(move || bridge.release_published())
                .await
                .map_err(|e| FleetError::Internal(e.to_string()))??;
        }
        inner
            .journal(
                None,
                "up.started",
                json!({"pid": std::process::id(), "fleet": inner.fleet_path.display().to_string()}),
            )
            .await;
        for (bound, role) in listeners {
            let parked = crate::handover::take_role(&mut inherited.parked, &role.name);
            role.serve(bound, parked);
        }
        inner.spawn(event_loop(Arc::downgrade(&inner), events_rx));
        let weak = Arc::downgrade(&inner);
        let members_task = tokio::spawn(crate::membership::keep_members(
            weak.clone(),
            membership.clone(),
        ));
        *inner.members_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(members_task);
        inner.spawn(crate::sampling::run(weak.clone(), metrics));
        for role in inner.roles() {
            crate::roles::spawn_loops(&inner, &role.name);
        }
        if let Some(cluster) = inner.cluster.clone() {
            inner.spawn(crate::cluster::reconcile::lead(
                weak.clone(),
                cluster.clone(),
            ));
            inner.spawn(crate::cluster::reconcile::follow(weak.clone(), cluster));
        }
        inner.spawn(crate::membership::follow_members(weak, membership));
        Ok(Controller { inner })
    }

    /// `phoenix host drain|undrain HOST`.
    pub async fn set_host_draining(&self, host: &str, on: bool) -> Result<(), FleetError> {
        let cluster = self.inner.cluster.as_ref().ok_or(FleetError::NoCluster)?;
        cluster.set_draining(host, on).await?;
        let kind = if on { "host.drained" } else { "host.undrained" };
        self.inner
            .journal(None, kind, json!({ "host": host }))
            .await;
        Ok(())
    }

    /// The cluster's journal, newest `limit` events, oldest first (`phoenix history --cluster`).
    pub async fn cluster_history(
        &self,
        limit: usize,
    ) -> Result<Vec<crate::cluster::ClusterEvent>, FleetError> {
        let cluster = self.inner.cluster.as_ref().ok_or(FleetError::NoCluster)?;
        Ok(cluster.history(limit).await?)
    }

    /// Brings every role to its desired state: the live generation recorded in the state is
    /// started again; a role without one gets its first deploy. Returns per-role failures.
    pub async fn converge(&self) -> Vec<(String, FleetError)> {
        let mut failures = Vec::new();
        for role in self.inner.roles() {
            // Taken over from the previous program (`phoenix restart`): already serving.
            if role.live().is_some() {
                continue;
            }
            let live = match self
                .inner
                .db({
                    let name = role.name.clone();
                    move |s| s.live_generation(&name)
                })
                .await
            {
                Ok(live) => live,
                Err(error) => {
                    failures.push((role.name.clone(), error));
                    continue;
                }
            };
            let result = match live {
                Some(generation) => {
                    crate::deploy::restart_live(&self.inner, &role, generation).await
                }
                // This host's own first deploy, also in a cluster (where every host bakes the
                // same recipe into the same image).
                None => crate::deploy::deploy(
                    &self.inner,
                    &role.name,
                    crate::DeployOptions::default(),
                    &crate::Progress::none(),
                )
                .await
                .map(drop),
            };
            if let Err(error) = result {
                tracing::error!(role = %role.name, %error, "role did not come up");
                failures.push((role.name.clone(), error));
            }
        }
        failures
    }

    /// The address each role's frontend listens on.
    pub fn listen_addrs(&self) -> BTreeMap<String, SocketAddr> {
        self.inner
            .roles()
            .iter()
            .map(|role| (role.name.clone(), role.listen()))
            .collect()
    }

    /// What could not be done as the fleet file asks, and what was done instead (a driver
    /// that fell back).
    pub fn warnings(&self) -> Vec<String> {
        self.inner.drivers.warnings.clone()
    }

    /// The bridge instances live on, when roles have their own network: its name, subnet and
    /// address (where every role's proxy also listens for them).
    pub fn bridge(&self) -> Option<(String, String, std::net::Ipv4Addr)> {
        self.inner
            .drivers
            .bridge()
            .map(|b| (b.name().to_string(), b.subnet().to_string(), b.gateway()))
    }

    /// Each role's driver and network, for listings.
    pub fn placements(&self) -> Vec<(String, &'static str, bool)> {
        self.inner
            .roles()
            .iter()
            .map(|role| {
                let bridged = matches!(role.placement.network, phoenix_driver::Network::Bridge(_));
                (role.name.clone(), role.placement.driver.name(), bridged)
            })
            .collect()
    }

    /// This host's gossip agent (for the RPC and event handlers).
    pub fn agent(&self) -> phoenix_gossip::Agent {
        self.inner.membership.host().clone()
    }

    /// The settings the host agent was started with.
    pub fn agent_settings(&self) -> &AgentSettings {
        &self.inner.agent_settings
    }

    pub fn state_dir(&self) -> &std::path::Path {
        &self.inner.state_dir
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// The controller's clock, in Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    /// Journals a state-changing API call and who made it, before it runs: the entries the
    /// call itself writes follow it.
    pub async fn journal_api_call(&self, role: Option<&str>, actor: &str, call: &str) {
        let detail = serde_json::json!({"actor": actor, "call": call});
        self.inner.journal(role, "api.call", detail).await;
    }

    /// Bakes the image `name` of the current fleet file.
    pub async fn bake(&self, name: &str) -> Result<bake::BakeOutcome, FleetError> {
        let fleet = self.inner.reload_fleet()?;
        bake::bake_in_background(&self.inner, fleet, name.to_string()).await
    }

    /// Kills one instance's process with SIGKILL, as a crash would (used by `phoenix demo`).
    pub fn kill_instance(&self, name: &str) -> Result<u32, FleetError> {
        let (role, instance) = self.inner.find_instance(name)?;
        // Only the live generation's, as before: the others are starting or draining.
        if role.live().is_none_or(|g| g.id != instance.generation) {
            return Err(FleetError::UnknownInstance(name.to_string()));
        }
        instance.kill();
        Ok(instance.pid)
    }

    /// Stops accepting, lets in-flight requests finish, stops every instance, and records it.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.shutdown.send_replace(true);
        for role in inner.roles() {
            role.stop_frontends().await;
        }
        let mut stopping = Vec::new();
        for role in inner.roles() {
            let generations = role.live().into_iter().chain(role.others());
            stopping.extend(generations.flat_map(|g| g.instances()));
        }
        let stopped = stopping.len();
        crate::deploy::stop_all(&stopping).await;
        // Their last lines reach the log store before Phoenix ends.
        inner.capture.drain(Duration::from_secs(3)).await;
        // And on to the sinks, as far as they take them in a few seconds (the rest goes at
        // the next start).
        inner
            .forwarding
            .lock()
            .await
            .stop(Duration::from_secs(3))
            .await;
        // Webhook senders finish the attempt under way, if it is quick.
        inner
            .webhooks
            .lock()
            .await
            .stop(Duration::from_secs(2))
            .await;
        // Instance members leave, then the host's member.
        let members_task = inner
            .members_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = members_task {
            let _ = task.await;
        }
        let _ = inner.membership.host().leave().await;
        if let Some(cluster) = &inner.cluster {
            cluster.leave().await;
        }
        let cleanup = inner.clone();
        let _ = tokio::task::spawn_blocking(move || cleanup.drivers.shut_down()).await;
        // Every background task sees the shutdown and ends; none is cut off mid-write.
        inner.tasks.close();
        let waited = tokio::time::timeout(Duration::from_secs(10), inner.tasks.wait()).await;
        let tasks_left = inner.tasks.len();
        if waited.is_err() {
            tracing::warn!(tasks_left, "background tasks still running after 10 s");
        }
        inner
            .journal(
                None,
                "up.stopped",
                json!({"instances_stopped": stopped, "tasks_left": tasks_left}),
            )
            .await;
    }
}

/// Every role's secrets can be read: an error now, not at the first deploy.
fn check_secrets(fleet: &FleetFile, secrets: &crate::secrets::Secrets) -> Result<(), FleetError> {
    for (name, role) in &fleet.roles {
        secrets
            .values(fleet, &role.run.secrets)
            .map_err(|e| match e {
                FleetError::Secret {
                    name: secret,
                    reason,
                } => FleetError::Secret {
                    name: secret,
                    reason: format!("{reason} (role {name})"),
                },
                other => other,
            })?;
    }
    Ok(())
}

impl Controller {
    /// What the next program would refuse at its start, checked before a restart hands the
    /// fleet over: the fleet file parses, every role's secrets can be read, its drivers can
    /// run here, and an address a role moves to is free. Blocks (call it off the runtime).
    pub fn check_restart(&self) -> Result<(), FleetError> {
        let fleet = self.inner.reload_fleet()?;
        check_secrets(&fleet, &crate::secrets::Secrets::capture(&fleet))?;
        crate::drivers::Drivers::open(&fleet, &self.inner.state_dir, false, None, None)?;
        for (name, config) in &fleet.roles {
            let kept = self.inner.role(name).is_ok_and(|role| {
                let now = role.listen();
                now.ip() == config.listen.ip()
                    && (config.listen.port() == 0 || config.listen.port() == now.port())
            });
            if !kept {
                std::net::TcpListener::bind(config.listen).map_err(|cause| FleetError::Listen {
                    role: name.clone(),
                    addr: config.listen,
                    cause,
                })?;
            }
        }
        Ok(())
    }
}

/// Reacts to supervisors: health changes refresh the backend set; deaths are replaced.
async fn event_loop(inner: std::sync::Weak<Inner>, mut events: mpsc::UnboundedReceiver<Event>) {
    let Some(mut shutdown) = inner.upgrade().map(|i| i.shutdown.subscribe()) else {
        return;
    };
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = phoenix_proxy::stopped(&mut shutdown) => None,
        };
        let Some(event) = event else { return };
        let Some(inner) = inner.upgrade() else { return };
        match event {
            Event::HealthChanged { role } => {
                if let Ok(role) = inner.role(&role) {
                    role.refresh_backends();
                }
            }
            Event::Died {
                role,
                generation,
                instance,
            } => {
                if let Ok(role) = inner.role(&role) {
                    role.refresh_backends();
                    inner.spawn(replace(inner.clone(), role.clone(), generation, instance));
                }
            }
        }
    }
}

/// Replaces a crashed instance of the live generation, retrying with backoff until it works
/// or the generation is no longer live.
async fn replace(inner: Arc<Inner>, role: Arc<Role>, generation: i64, dead: String) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        let delay = role.replacement_delay(&dead);
        if !delay.is_zero() {
            tracing::warn!(role = %role.name, ?delay, "instances keep crashing; waiting before the next replacement");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = phoenix_proxy::stopped(&mut shutdown) => return,
            }
        }
        let Some(live) = role.live().filter(|g| g.id == generation) else {
            return;
        };
        if inner.is_shutting_down() {
            return;
        }
        live.remove(|i| i.name == dead);
        match crate::deploy::start_instance(&inner, &role, &live).await {
            Ok(new) => {
                live.add(new.clone());
                // A deploy may have switched away while the instance started. Pushed first and
                // checked second: either the deploy's drain saw it, or it is stopped here.
                let still_live = role.live().is_some_and(|g| Arc::ptr_eq(&g, &live));
                if !still_live || inner.is_shutting_down() {
                    new.stop().await;
                    return;
                }
                let detail =
                    json!({"instance": dead, "replacement": new.name, "generation": generation});
                inner
                    .journal(Some(&role.name), "instance.replaced", detail)
                    .await;
                return;
            }
            Err(error) => {
                tracing::error!(role = %role.name, %error, "cannot replace instance {dead}");
                let detail = json!({"instance": dead, "error": error.to_string()});
                inner
                    .journal(Some(&role.name), "instance.replace_failed", detail)
                    .await;
            }
        }
    }
}

/// A cluster host's IPv4 address, where its instances are reached (loopback when it has none).
fn host_ipv4(address: std::net::IpAddr) -> std::net::Ipv4Addr {
    match address {
        std::net::IpAddr::V4(ip) if !ip.is_unspecified() => ip,
        _ => std::net::Ipv4Addr::LOCALHOST,
    }
}
