//! One running instance and the task that supervises it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use std::net::{Ipv4Addr, SocketAddr};

use phoenix_driver::{Driver, Exit, InstanceSpec, Network, Process, Resources, Secret};
use phoenix_image::{ImageConfig, ImageStore, RootLayout};
use phoenix_proxy::Backend;
use phoenix_store::{InstanceRow, InstanceStatus};
use serde_json::json;
use tokio::sync::watch;

use crate::controller::{Event, Generation, Inner, Role};
use crate::{FleetError, HealthConfig, RunConfig, health};

/// A running instance, as the controller sees it.
#[derive(Debug)]
pub(crate) struct Instance {
    pub name: String,
    pub role: String,
    pub generation: i64,
    pub backend: Arc<Backend>,
    /// Where other hosts reach it (a published port of a bridge instance, in a cluster); the
    /// backend's address otherwise.
    pub advertised: SocketAddr,
    /// The instance's main process on the host (a container's init), and its start time.
    pub pid: u32,
    pub start_time: u64,
    /// The child of this process that ends with it: the instance, or its container's shim.
    pub watcher: u32,
    /// What runs it: where its CPU and memory use are read.
    pub driver: Arc<dyn Driver>,
    pub started: Instant,
    state: Mutex<HealthState>,
    flags: Mutex<Flags>,
    /// The latest CPU (cores, once two samples exist) and resident memory the sampler saw.
    usage: Mutex<(Option<f64>, Option<u64>)>,
    stop: watch::Sender<bool>,
    ended: watch::Receiver<Option<String>>,
}

/// What an operator set on an instance, for investigation (as AWS's scale-in protection and
/// standby): `protected` keeps it out of scale-in; `standby` also takes it out of traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Flags {
    pub protected: bool,
    pub standby: bool,
}

#[derive(Debug)]
struct HealthState {
    status: InstanceStatus,
    passes: u32,
    failures: u32,
    last_error: Option<String>,
}

impl Instance {
    pub fn flags(&self) -> Flags {
        *self.flags.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_flags(&self, flags: Flags) {
        *self.flags.lock().unwrap_or_else(|p| p.into_inner()) = flags;
    }

    /// The latest CPU (cores) and resident memory (bytes) sampled, when known.
    pub fn usage(&self) -> (Option<f64>, Option<u64>) {
        *self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_usage(&self, cpu: Option<f64>, rss_bytes: u64) {
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        *usage = (cpu.or(usage.0), Some(rss_bytes));
    }

    pub fn status(&self) -> InstanceStatus {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).status
    }

    pub fn is_healthy(&self) -> bool {
        self.status() == InstanceStatus::Healthy
    }

    pub fn last_error(&self) -> Option<String> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error
            .clone()
    }

    /// How the process ended, once it has.
    pub fn ended(&self) -> Option<String> {
        self.ended.borrow().clone()
    }

    /// Kills the instance's process with SIGKILL, as a crash would (its supervisor then
    /// reports the death and the crash replacement follows).
    pub fn kill(&self) {
        // SAFETY: kill(2) on a pid our supervisor still owns (it has not been reaped).
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
    }

    /// Stops the instance (SIGTERM, then SIGKILL after the role's grace) and waits for the end.
    pub async fn stop(&self) -> String {
        self.stop.send_replace(true);
        let mut ended = self.ended.clone();
        let exit = ended
            .wait_for(Option::is_some)
            .await
            .map(|e| e.clone().unwrap_or_default());
        exit.unwrap_or_else(|_| "supervisor gone".into())
    }

    /// Counts one probe result; returns the new status when it changed.
    fn record_probe(
        &self,
        result: Result<(), String>,
        health: &HealthConfig,
    ) -> Option<InstanceStatus> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let before = state.status;
        match result {
            Ok(()) => {
                state.passes += 1;
                state.failures = 0;
                state.last_error = None;
                if state.passes >= health.healthy_threshold {
                    state.status = InstanceStatus::Healthy;
                }
            }
            Err(error) => {
                state.failures += 1;
                state.passes = 0;
                state.last_error = Some(error);
                if before == InstanceStatus::Healthy && state.failures >= health.unhealthy_threshold
                {
                    state.status = InstanceStatus::Unhealthy;
                }
            }
        }
        (state.status != before).then_some(state.status)
    }

    fn set_status(&self, status: InstanceStatus) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).status = status;
    }
}

/// Unpacks image `digest` in the layout `driver` runs roots in (once; later calls reuse the
/// root) and reads its config, off the async runtime.
pub(crate) async fn unpack(
    images: &ImageStore,
    digest: &str,
    driver: &dyn Driver,
    allow_root: bool,
) -> Result<(PathBuf, ImageConfig), FleetError> {
    let layout = root_layout(driver, allow_root);
    let (images, digest) = (images.clone(), digest.to_string());
    tokio::task::spawn_blocking(move || {
        Ok((images.unpack_as(&digest, layout)?, images.config(&digest)?))
    })
    .await
    .map_err(|e| FleetError::Internal(e.to_string()))?
}

/// How the roots `driver` runs are laid out: shifted into the instances' user namespace for
/// containers, as the image says (without write or set-id bits) for the process driver.
pub(crate) fn root_layout(driver: &dyn Driver, allow_root: bool) -> RootLayout {
    match driver.id_offset(allow_root) {
        Some(offset) => RootLayout::mapped(offset),
        None => RootLayout::HOST,
    }
}

/// What an instance gets at start besides its image: its role's runtime settings, its network,
/// and the secrets of its generation.
pub(crate) struct Launch<'a> {
    /// The role the instance serves; empty for a verification's.
    pub role: &'a str,
    pub run: &'a RunConfig,
    pub network: Network,
    pub secrets: Vec<Secret>,
    pub hosts: Vec<(String, Ipv4Addr)>,
    /// Where an instance on the host's network listens (see `InstanceSpec::host_ip`).
    pub host_ip: Ipv4Addr,
}

/// What the driver needs to start `name` from an unpacked image: its entrypoint, working
/// directory, user and environment (the image's, the role's, then `extra`), port and limits.
pub(crate) fn spec(
    name: &str,
    root: PathBuf,
    config: &ImageConfig,
    launch: &Launch,
    extra: &[(&str, String)],
    log_path: PathBuf,
) -> InstanceSpec {
    let image_env = config
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()));
    let role_env = launch.run.env.iter().map(|(k, v)| (k.clone(), v.clone()));
    let extra = extra.iter().map(|(k, v)| (k.to_string(), v.clone()));
    let mut env: Vec<(String, String)> = Vec::new();
    for (key, value) in image_env.chain(role_env).chain(extra) {
        env.retain(|(k, _)| *k != key);
        env.push((key, value));
    }
    let run = launch.run;
    let port = match launch.network {
        // On the host's network every instance needs a port of its own.
        Network::Host => run.port,
        Network::Bridge(_) => run.port.or_else(|| lowest_tcp_port(config)),
    };
    InstanceSpec {
        name: name.into(),
        role: launch.role.into(),
        root,
        argv: config
            .entrypoint
            .iter()
            .chain(&config.cmd)
            .cloned()
            .collect(),
        env,
        workdir: config.working_dir.clone(),
        user: run.user.clone().unwrap_or_else(|| config.user.clone()),
        log_path,
        output: None,
        network: launch.network.clone(),
        port,
        host_ip: launch.host_ip,
        resources: Resources {
            cpus: run.resources.cpus,
            memory: run.resources.memory,
            pids: run.resources.pids,
            nofile: run.resources.nofile,
        },
        secrets: launch.secrets.clone(),
        allow_root: run.allow_root,
        hosts: launch.hosts.clone(),
    }
}

/// The image's lowest exposed TCP port (`"8080/tcp"`, or a bare number).
fn lowest_tcp_port(config: &ImageConfig) -> Option<u16> {
    config
        .exposed_ports
        .keys()
        .filter_map(|port| match port.split_once('/') {
            Some((number, "tcp")) => number.parse().ok(),
            Some(_) => None,
            None => port.parse().ok(),
        })
        .min()
}

/// Starts one instance of `generation` of `role` from the unpacked image at `root` and
/// supervises it.
pub(crate) async fn start(
    inner: &Arc<Inner>,
    role: &Role,
    generation: &Generation,
    root: PathBuf,
    config: &ImageConfig,
) -> Result<Arc<Instance>, FleetError> {
    let role_config = role.config();
    let name = inner.namer.instance_name(&role.name);
    let log_path = inner.state_dir.join("logs").join(format!("{name}.log"));
    let extra = [
        ("PHOENIX_ROLE", role.name.clone()),
        ("PHOENIX_GENERATION", generation.id.to_string()),
    ];
    let launch = Launch {
        role: &role.name,
        run: &role_config.run,
        network: role.placement.network.clone(),
        secrets: generation.secrets.clone(),
        hosts: inner.role_hosts(),
        host_ip: inner.host_ip(),
    };
    let mut spec = spec(&name, root, config, &launch, &extra, log_path.clone());
    let source = crate::capture::Source {
        role: role.name.clone(),
        instance: name.clone(),
        generation: generation.id,
        image: phoenix_image::short_digest(&generation.image).to_string(),
    };
    spec.output = Some(
        inner
            .capture
            .pipes(&source)
            .map_err(|cause| FleetError::Io {
                what: format!("make the output pipes of {name}"),
                cause,
            })?,
    );
    let driver = role.placement.driver.clone();
    // The row is written before the process exists, so a crash of Phoenix at any moment after
    // the start leaves a record that recovery accounts for.
    let row = InstanceRow {
        name: name.clone(),
        role: role.name.clone(),
        generation: generation.id,
        image: generation.image.clone(),
        status: InstanceStatus::Starting,
        pid: None,
        pid_start: None,
        port: 0,
        log_path: log_path.display().to_string(),
        started_at: inner.clock.now_ms(),
        ended_at: None,
        driver: driver.name().to_string(),
        addr: None,
    };
    inner.db(move |s| s.insert_instance(&row)).await?;
    let starting = driver.clone();
    let started = tokio::task::spawn_blocking(move || starting.start(&spec))
        .await
        .map_err(|e| FleetError::Internal(e.to_string()))?;
    let (process, addr) = match started {
        Ok(started) => started,
        Err(error) => {
            let (key, now) = (name.clone(), inner.clock.now_ms());
            inner
                .db(move |s| s.set_instance_status(&key, InstanceStatus::Died, now))
                .await?;
            return Err(error.into());
        }
    };
    let (key, pid, start_time) = (name.clone(), process.pid, process.start_time);
    inner
        .db(move |s| s.set_instance_process(&key, pid, start_time, addr))
        .await?;
    let detail = json!({"instance": name, "generation": generation.id, "image": generation.image,
        "pid": process.pid, "addr": addr.to_string(), "driver": driver.name()});
    inner
        .journal(Some(&role.name), "instance.started", detail)
        .await;
    let watched = Watched {
        name,
        process,
        addr,
        driver,
        healthy: false,
    };
    Ok(supervise(inner, role, generation.id, watched))
}

/// A running instance's process, about to get its supervisor.
pub(crate) struct Watched {
    pub name: String,
    pub process: Process,
    pub addr: std::net::SocketAddr,
    pub driver: Arc<dyn Driver>,
    /// Known healthy already (taken over from the previous program): routable at once.
    pub healthy: bool,
}

/// Makes the controller's `Instance` of a running process and starts its supervisor.
pub(crate) fn supervise(
    inner: &Arc<Inner>,
    role: &Role,
    generation: i64,
    watched: Watched,
) -> Arc<Instance> {
    let role_config = role.config();
    let Watched {
        name,
        process,
        addr,
        driver,
        healthy,
    } = watched;
    let (stop, stop_rx) = watch::channel(false);
    let (ended_tx, ended) = watch::channel(None);
    let (status, passes) = if healthy {
        (
            InstanceStatus::Healthy,
            role_config.health.healthy_threshold,
        )
    } else {
        (InstanceStatus::Starting, 0)
    };
    let instance = Arc::new(Instance {
        name: name.clone(),
        role: role.name.clone(),
        generation,
        backend: Backend::new(name, addr),
        advertised: match &role.placement.network {
            Network::Bridge(bridge) => bridge.published(addr).unwrap_or(addr),
            Network::Host => addr,
        },
        pid: process.pid,
        start_time: process.start_time,
        watcher: process.watcher_pid(),
        driver,
        started: Instant::now(),
        state: Mutex::new(HealthState {
            status,
            passes,
            failures: 0,
            last_error: None,
        }),
        flags: Mutex::new(Flags::default()),
        usage: Mutex::new((None, None)),
        stop,
        ended,
    });
    let supervisor = Supervisor {
        inner: inner.clone(),
        instance: instance.clone(),
        health: role_config.health,
        grace: role_config.stop_timeout,
        memory_limit: role_config.run.resources.memory,
    };
    // Counted: shutdown waits for every supervisor to record its instance's end.
    inner.spawn(supervisor.run(process, stop_rx, ended_tx));
    instance
}

struct Supervisor {
    inner: Arc<Inner>,
    instance: Arc<Instance>,
    health: HealthConfig,
    grace: std::time::Duration,
    /// For the journal of an OOM kill.
    memory_limit: Option<u64>,
}

enum End {
    Stopped(Exit),
    Died(Exit),
}

impl Supervisor {
    async fn run(
        self,
        mut process: Process,
        mut stop: watch::Receiver<bool>,
        ended: watch::Sender<Option<String>>,
    ) {
        let mut interval = self.health.interval;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            // `phoenix apply` may have changed how often and how strictly to check.
            let health = self.health_now();
            if health.interval != interval {
                interval = health.interval;
                ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            tokio::select! {
                biased;
                _ = phoenix_proxy::stopped(&mut stop) => {
                    self.instance.set_status(InstanceStatus::Stopping);
                    self.inner.events.send(Event::HealthChanged { role: self.instance.role.clone() }).ok();
                    break End::Stopped(process.stop(self.grace).await);
                }
                exit = process.exited() => break End::Died(exit),
                _ = ticker.tick() => self.probe(&health).await,
            }
        };
        let instance = &self.instance;
        let (status, kind, exit) = match end {
            End::Stopped(exit) => (InstanceStatus::Stopped, "instance.stopped", exit),
            End::Died(exit) if exit.oom => (InstanceStatus::Died, "instance.oom", exit),
            End::Died(exit) => (InstanceStatus::Died, "instance.died", exit),
        };
        instance.set_status(status);
        self.record_status(status).await;
        let mut detail = json!({"instance": instance.name, "generation": instance.generation, "exit": exit.to_string()});
        if exit.oom {
            detail["memory_limit"] = json!(self.memory_limit);
        }
        if status == InstanceStatus::Died {
            // Its last lines: once its streams ended, they are in the store.
            self.inner
                .capture
                .wait_ended(&instance.name, std::time::Duration::from_millis(500))
                .await;
            detail["log_tail"] = json!(self.inner.log_tail(instance, 10));
            detail["logs"] = json!(format!("phoenix logs {}", instance.name));
            detail["log_position"] = json!(phoenix_observe::logs::end_position(
                self.inner.capture.store_dir(),
                &instance.role
            ));
            tracing::warn!(instance = %instance.name, exit = %exit, "instance died");
        }
        self.inner.journal(Some(&instance.role), kind, detail).await;
        ended.send_replace(Some(exit.to_string()));
        if status == InstanceStatus::Died {
            let event = Event::Died {
                role: instance.role.clone(),
                generation: instance.generation,
                instance: instance.name.clone(),
            };
            self.inner.events.send(event).ok();
        }
    }

    /// Writes the instance's status to the state; a failure is logged, the instance goes on.
    async fn record_status(&self, status: InstanceStatus) {
        let name = self.instance.name.clone();
        let now = self.inner.clock.now_ms();
        if let Err(error) = self
            .inner
            .db(move |s| s.set_instance_status(&name, status, now))
            .await
        {
            tracing::error!(%error, instance = %self.instance.name, "recording instance status {status}");
        }
    }

    /// The instance's health check: what is checked (`check`, `path`) as when it started, how
    /// often and how strictly (`interval`, `timeout`, thresholds) as its role says now.
    fn health_now(&self) -> HealthConfig {
        let mut health = self.health.clone();
        if let Ok(role) = self.inner.role(&self.instance.role) {
            let now = role.config().health;
            health.interval = now.interval;
            health.timeout = now.timeout;
            health.healthy_threshold = now.healthy_threshold;
            health.unhealthy_threshold = now.unhealthy_threshold;
        }
        health
    }

    async fn probe(&self, health: &HealthConfig) {
        let instance = &self.instance;
        let result = health::check(instance.backend.addr, health).await;
        if result.is_ok() {
            instance.backend.mark_up();
        }
        let error = result.as_ref().err().cloned();
        let Some(status) = instance.record_probe(result, health) else {
            return;
        };
        instance.backend.note_change();
        self.record_status(status).await;
        let kind = if status == InstanceStatus::Healthy {
            "instance.healthy"
        } else {
            "instance.unhealthy"
        };
        let mut detail = json!({"instance": instance.name, "generation": instance.generation});
        if let Some(error) = error {
            detail["error"] = json!(error);
        }
        self.inner.journal(Some(&instance.role), kind, detail).await;
        self.inner
            .events
            .send(Event::HealthChanged {
                role: instance.role.clone(),
            })
            .ok();
    }
}
