//! Deploys: boot a new generation, gate on health (and, for a canary, on its analysis),
//! switch atomically, drain the old.

use std::sync::Arc;
use std::time::{Duration, Instant};

use phoenix_image::short_digest;
use phoenix_store::{DeployStatus, GenerationRow, GenerationStatus};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

use crate::config::{Hook, RoleConfig, Strategy};
use crate::controller::{Controller, Generation, Inner, Role};
use crate::hooks::{self, Facts};
use crate::instance::{self, Instance};
use crate::verify::{self, VerifyOptions};
use crate::{FleetError, FleetFile, bake};

/// What to deploy.
#[derive(Debug, Clone, Default)]
pub struct DeployOptions {
    /// An image reference (name, digest or digest prefix) instead of baking the role's recipe.
    pub image: Option<String>,
    /// Go back to an earlier image instead.
    pub rollback: Option<RollbackTo>,
}

/// Where a rollback goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollbackTo {
    /// The newest earlier generation that served an image other than the live one.
    Previous,
    /// Digits only, as typed: the generation of that number if one of the role served, else
    /// the image whose digest starts with them (a digest prefix can be all digits).
    Numbered(String),
    /// An image by name, `name:tag`, digest or digest prefix.
    Image(String),
}

impl RollbackTo {
    /// `--to` as written: digits name a generation (or a digest prefix), anything else an image.
    pub fn parse(to: Option<&str>) -> RollbackTo {
        match to {
            None => RollbackTo::Previous,
            Some(to) if !to.is_empty() && to.bytes().all(|b| b.is_ascii_digit()) => {
                RollbackTo::Numbered(to.to_string())
            }
            Some(to) => RollbackTo::Image(to.to_string()),
        }
    }
}

/// A verification a deploy ran before booting the image.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Verified {
    pub checks: u32,
    #[serde(rename = "duration_ms", alias = "ms")]
    pub ms: u64,
}

/// The outcome and timings of a successful deploy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployReport {
    pub role: String,
    pub generation: i64,
    pub image: String,
    pub previous_image: Option<String>,
    /// True when this deploy baked a new image.
    pub baked: bool,
    pub instances: u32,
    pub bake_ms: u64,
    pub boot_to_healthy_ms: u64,
    /// Time to swap the proxy's backend set.
    pub switch_us: u64,
    pub drain_ms: u64,
    pub stop_ms: u64,
    /// The image's verification, when this deploy ran it.
    #[serde(default)]
    pub verified: Option<Verified>,
    /// Requests still running on the old generation when the drain deadline passed.
    pub abandoned_requests: usize,
    /// Microseconds from the switch to the first request routed to the new generation
    /// (none when no request came during the deploy).
    pub first_request_after_switch_us: Option<u64>,
    pub total_ms: u64,
}

/// Where progress lines of long work go (the API streams them to the CLI).
#[derive(Debug, Clone, Default)]
pub struct Progress(Option<mpsc::UnboundedSender<String>>);

impl Progress {
    pub fn none() -> Self {
        Progress(None)
    }

    pub fn channel() -> (Self, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Progress(Some(tx)), rx)
    }

    pub fn say(&self, line: impl Into<String>) {
        let line = line.into();
        tracing::debug!("{line}");
        if let Some(tx) = &self.0 {
            let _ = tx.send(line);
        }
    }
}

impl Controller {
    /// Deploys a new generation of `role` blue-green. On failure the live generation keeps
    /// serving and the error says why (the last health error and the instance's log tail).
    pub async fn deploy(
        &self,
        role: &str,
        options: DeployOptions,
        progress: &Progress,
    ) -> Result<DeployReport, FleetError> {
        match self.inner.cluster.clone() {
            Some(_) if self.inner.role(role)?.config().deploy.strategy != Strategy::BlueGreen => {
                let strategy = self.inner.role(role)?.config().deploy.strategy.name();
                Err(FleetError::StrategyInCluster {
                    role: role.into(),
                    strategy,
                })
            }
            Some(cluster) => {
                crate::cluster::rollout::deploy(&self.inner, &cluster, role, options, progress)
                    .await
            }
            None => deploy(&self.inner, role, options, progress).await,
        }
    }
}

/// Between booting a new generation and switching to it, in a cluster: this host tells the
/// controller whether its part booted, then waits for the word to switch (or to abort).
pub(crate) struct Gate {
    pub booted: tokio::sync::oneshot::Sender<Result<(), String>>,
    pub go: tokio::sync::oneshot::Receiver<Result<(), String>>,
}

impl Gate {
    async fn pass(self, booted: Result<(), String>) -> Result<(), String> {
        let failed = booted.is_err();
        let _ = self.booted.send(booted.clone());
        if failed {
            return booted;
        }
        self.go
            .await
            .unwrap_or_else(|_| Err("the cluster's rollout ended without a word".into()))
    }
}

pub(crate) async fn deploy(
    inner: &Arc<Inner>,
    role_name: &str,
    options: DeployOptions,
    progress: &Progress,
) -> Result<DeployReport, FleetError> {
    deploy_gated(inner, role_name, options, progress, None).await
}

/// A deploy whose switch waits at `gate`, when there is one.
pub(crate) async fn deploy_gated(
    inner: &Arc<Inner>,
    role_name: &str,
    options: DeployOptions,
    progress: &Progress,
    mut gate: Option<Gate>,
) -> Result<DeployReport, FleetError> {
    let result = deploy_guarded(inner, role_name, options, progress, &mut gate).await;
    // A failure before the gate was reached still tells the cluster why.
    if let (Err(error), Some(gate)) = (&result, gate) {
        let _ = gate.booted.send(Err(error.to_string()));
    }
    result
}

async fn deploy_guarded(
    inner: &Arc<Inner>,
    role_name: &str,
    options: DeployOptions,
    progress: &Progress,
    gate: &mut Option<Gate>,
) -> Result<DeployReport, FleetError> {
    let role = inner.role(role_name)?;
    let _lock = match gate {
        // A host's part of a rollout queues behind what this host is still finishing (the
        // drain of an aborted rollout); a deploy asked for by hand is refused at once.
        Some(_) => tokio::time::timeout(ROLLOUT_QUEUE_WAIT, role.deploy_guard())
            .await
            .map_err(|_| FleetError::Busy {
                role: role_name.to_string(),
            })?,
        None => role.try_deploy_guard()?,
    };
    // A deploy that fails changes nothing: the role keeps the settings and recipe it serves
    // with (what `plan` compares against).
    let (config, applied) = (role.config(), inner.applied());
    let result = deploy_locked(inner, &role, role_name, options, progress, gate).await;
    if result.is_err() {
        role.set_config(config);
        inner.note_deployed(&applied, role_name);
    }
    result
}

/// How long a host's part of a rollout waits for the role's previous change to end.
const ROLLOUT_QUEUE_WAIT: Duration = Duration::from_secs(60);

async fn deploy_locked(
    inner: &Arc<Inner>,
    role: &Arc<Role>,
    role_name: &str,
    options: DeployOptions,
    progress: &Progress,
    gate: &mut Option<Gate>,
) -> Result<DeployReport, FleetError> {
    let started = Instant::now();
    if inner.is_shutting_down() {
        return Err(FleetError::ShuttingDown);
    }
    let live = role.live();
    // The hooks of the file as it is now (deploys pick up edits), else as last applied.
    let hooks = inner
        .reload_fleet()
        .map(|f| f.hooks)
        .unwrap_or_else(|_| inner.applied().hooks);
    let mut facts = Facts {
        role: role_name.to_string(),
        strategy: role.config().deploy.strategy.name(),
        previous_image: live.as_ref().map(|g| g.image.clone()),
        live_generation: live.as_ref().map(|g| g.id),
        ..Facts::default()
    };
    // A hook's veto, or a load test that cannot be read, before anything started.
    let stopped = |reason| FleetError::StoppedBeforeStart {
        role: role_name.to_string(),
        reason,
    };
    hooks::run(inner, &hooks, Hook::BeforeBake, &facts, progress)
        .await
        .map_err(stopped)?;
    let (image, baked, verified) =
        choose_image(inner, role, live.as_ref(), &options, progress).await?;
    facts.image = Some(image.clone());
    hooks::run(inner, &hooks, Hook::AfterVerify, &facts, progress)
        .await
        .map_err(stopped)?;
    let bake_ms = started.elapsed().as_millis() as u64 - verified.map_or(0, |v| v.ms);
    let config = role.config();
    facts.strategy = config.deploy.strategy.name();
    // Sized to the role now (a `phoenix scale` included), not only to the file.
    let size = role.desired();
    let previous_image = live.as_ref().map(|g| g.image.clone());
    progress.say(format!(
        "deploying {role_name}: {} -> {} ({} instances)",
        previous_image
            .as_deref()
            .map(short_digest)
            .unwrap_or("nothing"),
        short_digest(&image),
        size
    ));

    // Read now, before anything is recorded: a secret or load test that cannot be read stops
    // the deploy.
    role_secrets(inner, &config)?;
    let load_test = match &config.deploy.load_test {
        Some(path) => Some((path, crate::load_test::read(path).map_err(stopped)?)),
        None => None,
    };
    let now = inner.clock.now_ms();
    let (role_key, image_key, from) = (
        role_name.to_string(),
        image.clone(),
        live.as_ref().map(|g| g.id),
    );
    let (generation_id, deploy_id) = inner
        .db(move |s| {
            let generation = s.create_generation(&role_key, &image_key, now)?;
            Ok((
                generation,
                s.start_deploy(&role_key, from, generation, now)?,
            ))
        })
        .await?;
    (facts.deploy, facts.generation) = (Some(deploy_id), Some(generation_id));
    let detail = json!({"deploy": deploy_id, "generation": generation_id, "image": image, "previous_image": previous_image, "instances": size, "rollback": options.rollback.is_some()});
    inner
        .journal(Some(role_name), "deploy.started", detail)
        .await;
    let secrets = role_secrets(inner, &config)?;
    let generation = Generation::new(
        generation_id,
        image.clone(),
        GenerationStatus::Starting,
        secrets,
    );
    role.add_other(generation.clone());

    let boot = Instant::now();
    let rolling = live.is_some() && config.deploy.strategy == Strategy::Rolling && gate.is_none();
    let booted = match &live {
        // A rolling deploy moves traffic from its first batch: the veto comes before it.
        Some(live) if rolling => {
            match hooks::run(inner, &hooks, Hook::BeforeSwitch, &facts, progress).await {
                Ok(()) => {
                    crate::rolling::replace(
                        inner,
                        role,
                        live,
                        &generation,
                        size,
                        deploy_id,
                        progress,
                    )
                    .await
                }
                vetoed => vetoed,
            }
        }
        _ => {
            boot_generation(
                inner,
                role,
                &generation,
                size,
                config.deploy.healthy_timeout,
                progress,
            )
            .await
        }
    };
    // Healthy, no traffic yet (a canary's first step included): the load test and the hook
    // may stop it.
    let booted = match (booted, &load_test) {
        (Ok(()), Some((path, scenario))) => {
            crate::load_test::run(
                inner,
                role_name,
                &generation,
                path,
                scenario,
                deploy_id,
                progress,
            )
            .await
        }
        (booted, _) => booted,
    };
    let booted = match booted {
        Ok(()) if !rolling => hooks::run(inner, &hooks, Hook::BeforeSwitch, &facts, progress).await,
        other => other,
    };
    let booted = match (gate.take(), &live) {
        (Some(gate), _) => gate.pass(booted).await,
        (None, Some(live)) if booted.is_ok() && config.deploy.strategy == Strategy::Canary => {
            crate::canary::run_steps(inner, role, live, &generation, deploy_id, progress).await
        }
        (None, _) => booted,
    };
    if let Err(reason) = booted {
        progress.say(format!(
            "aborting: {}",
            reason.lines().next().unwrap_or_default()
        ));
        // A canary failed at a step still has its share: back to the live generation.
        role.set_canary(None);
        let serving: Vec<_> = generation
            .instances()
            .iter()
            .map(|i| i.backend.clone())
            .collect();
        phoenix_proxy::drain(&serving, config.deploy.drain).await;
        let stopped = generation.instances();
        stop_all(&stopped).await;
        // Their last lines are in the store before the journal says where they end.
        for instance in &stopped {
            inner
                .capture
                .wait_ended(&instance.name, Duration::from_secs(2))
                .await;
        }
        let log_position =
            phoenix_observe::logs::end_position(inner.capture.store_dir(), role_name);
        generation.set_status(GenerationStatus::Aborted);
        role.remove_other(generation_id);
        let (now, why) = (inner.clock.now_ms(), reason.clone());
        inner
            .db(move |s| {
                s.set_generation_status(generation_id, GenerationStatus::Aborted, now)?;
                s.finish_deploy(deploy_id, DeployStatus::Aborted, Some(&why), now)
            })
            .await?;
        inner
            .journal(
                Some(role_name),
                "deploy.aborted",
                json!({"deploy": deploy_id, "generation": generation_id, "reason": reason,
                       "log_position": log_position}),
            )
            .await;
        facts.reason = Some(reason.clone());
        // Reported in the journal and the progress; the deploy has failed either way.
        let _ = hooks::run(inner, &hooks, Hook::OnAbort, &facts, progress).await;
        return Err(FleetError::DeployAborted {
            role: role_name.into(),
            reason,
            serving: live.as_ref().map(|g| g.id),
        });
    }
    let boot_to_healthy_ms = boot.elapsed().as_millis() as u64;

    let switch = Instant::now();
    let old = role.switch_to(generation.clone());
    let switch_us = switch.elapsed().as_micros() as u64;
    // A promoted canary's share is now part of the live set.
    role.set_canary(None);
    role.remove_other(generation_id);
    let now = inner.clock.now_ms();
    let old_id = old.as_ref().map(|g| g.id);
    inner
        .db(move |s| {
            s.set_generation_status(generation_id, GenerationStatus::Live, now)?;
            old_id.map_or(Ok(()), |id| {
                s.set_generation_status(id, GenerationStatus::Draining, now)
            })
        })
        .await?;
    inner
        .journal(
            Some(role_name),
            "deploy.switched",
            json!({"deploy": deploy_id, "generation": generation_id, "switch_us": switch_us}),
        )
        .await;
    progress.say(format!(
        "switched {role_name} to generation {generation_id} in {switch_us} µs"
    ));
    facts.live_generation = Some(generation_id);
    // Too late to veto: a failure is in the journal and the progress.
    let _ = hooks::run(inner, &hooks, Hook::AfterSwitch, &facts, progress).await;

    let (mut drain_ms, mut stop_ms, mut abandoned_requests) = (0, 0, 0);
    if let Some(old) = old {
        old.set_status(GenerationStatus::Draining);
        role.add_other(old.clone());
        let instances = old.instances();
        let backends: Vec<_> = instances.iter().map(|i| i.backend.clone()).collect();
        let report = phoenix_proxy::drain(&backends, config.deploy.drain).await;
        drain_ms = report.waited.as_millis() as u64;
        abandoned_requests = report.abandoned;
        progress.say(format!(
            "drained generation {} in {drain_ms} ms ({} requests cut at the deadline)",
            old.id, report.abandoned
        ));
        let stopping = Instant::now();
        stop_all(&instances).await;
        stop_ms = stopping.elapsed().as_millis() as u64;
        old.set_status(GenerationStatus::Retired);
        role.remove_other(old.id);
        let (now, id) = (inner.clock.now_ms(), old.id);
        inner
            .db(move |s| s.set_generation_status(id, GenerationStatus::Retired, now))
            .await?;
    }
    let now = inner.clock.now_ms();
    inner
        .db(move |s| s.finish_deploy(deploy_id, DeployStatus::Succeeded, None, now))
        .await?;
    let report = DeployReport {
        role: role_name.into(),
        generation: generation_id,
        image,
        previous_image,
        baked,
        instances: size,
        bake_ms,
        boot_to_healthy_ms,
        switch_us,
        drain_ms,
        stop_ms,
        verified,
        abandoned_requests,
        first_request_after_switch_us: generation
            .instances()
            .iter()
            .filter_map(|i| i.backend.first_routed_after())
            .min()
            .map(|d| d.as_micros() as u64),
        total_ms: started.elapsed().as_millis() as u64,
    };
    inner
        .journal(
            Some(role_name),
            "deploy.finished",
            json!({"deploy": deploy_id, "report": report}),
        )
        .await;
    Ok(report)
}

/// The image a rollback deploys (never the live one), and where it was found.
async fn rollback_image(
    inner: &Arc<Inner>,
    role: &Role,
    live: Option<&Arc<Generation>>,
    to: &RollbackTo,
) -> Result<(String, String), FleetError> {
    let name = role.name.clone();
    let live_image = live.map(|g| g.image.clone()).unwrap_or_default();
    let no_previous = || FleetError::NoPrevious {
        role: role.name.clone(),
    };
    let (image, from) = match to {
        RollbackTo::Previous => {
            let live_id = live.ok_or_else(no_previous)?.id;
            let differing = live_image.clone();
            let previous = inner
                .db(move |s| s.previous_generation(&name, live_id, &differing))
                .await?
                .ok_or_else(no_previous)?;
            let from = format!("the image of generation {}", previous.id);
            (previous.image, from)
        }
        RollbackTo::Numbered(text) => {
            let id = text.parse::<i64>().ok();
            let served = match id {
                Some(id) => served_generation(inner, role, id).await?,
                None => None,
            };
            if let Some(generation) = served {
                let from = format!("the image of generation {}", generation.id);
                (generation.image, from)
            } else {
                match (named_image(inner, text).await, id) {
                    // Neither a generation nor an image: digits most likely meant a generation.
                    (Err(FleetError::ImageNotFound(_)), Some(generation)) => {
                        return Err(FleetError::NoSuchGeneration {
                            role: role.name.clone(),
                            generation,
                        });
                    }
                    (found, _) => (found?, format!("image {text}")),
                }
            }
        }
        RollbackTo::Image(reference) => (
            named_image(inner, reference).await?,
            format!("image {reference}"),
        ),
    };
    if image == live_image {
        return Err(FleetError::AlreadyLive {
            role: role.name.clone(),
            image: short_digest(&image).to_string(),
        });
    }
    Ok((image, from))
}

/// The generation `id` of the role, if it ever served.
async fn served_generation(
    inner: &Arc<Inner>,
    role: &Role,
    id: i64,
) -> Result<Option<GenerationRow>, FleetError> {
    let name = role.name.clone();
    Ok(inner
        .db(move |s| s.generation(id))
        .await?
        .filter(|g| g.role == name && g.switched_at.is_some()))
}

/// The digest of an image named by hand (`deploy --image`, `rollback --to`). It may never have
/// served, so it passes the gate.
async fn named_image(inner: &Arc<Inner>, reference: &str) -> Result<String, FleetError> {
    let key = reference.to_string();
    let image = inner
        .db(move |s| s.find_image(&key))
        .await?
        .ok_or_else(|| FleetError::ImageNotFound(reference.to_string()))?;
    let fleet = inner.reload_fleet()?;
    gate(inner, fleet, image.name, image.digest.clone()).await?;
    Ok(image.digest)
}

/// Picks the image to deploy: the rollback target, the given reference, or a fresh bake of the
/// role's recipe from the (re-read) fleet file. Returns the digest, whether it was newly baked,
/// and the verification this deploy ran.
pub(crate) async fn choose_image(
    inner: &Arc<Inner>,
    role: &Role,
    live: Option<&Arc<Generation>>,
    options: &DeployOptions,
    progress: &Progress,
) -> Result<(String, bool, Option<Verified>), FleetError> {
    if let Some(to) = &options.rollback {
        let (image, from) = rollback_image(inner, role, live, to).await?;
        progress.say(format!("rolling back to {from} ({})", short_digest(&image)));
        return Ok((image, false, None));
    }
    if let Some(reference) = &options.image {
        return Ok((named_image(inner, reference).await?, false, None));
    }
    let fleet = inner.reload_fleet()?;
    let config = fleet
        .roles
        .get(&role.name)
        .cloned()
        .ok_or_else(|| FleetError::RoleNotInFile {
            role: role.name.clone(),
        })?;
    role.set_config(config.clone());
    inner.note_deployed(&fleet, &role.name);
    progress.say(format!("baking image {}", config.image));
    let outcome = bake::bake_in_background(inner, fleet.clone(), config.image.clone()).await?;
    let state = if outcome.new { "baked" } else { "unchanged" };
    progress.say(format!(
        "image {} {state}: {} ({} ms)",
        outcome.name,
        short_digest(&outcome.digest),
        outcome.millis
    ));
    for warning in &outcome.warnings {
        progress.say(format!("warning: image {}: {warning}", outcome.name));
    }
    let verified = verify_if_needed(
        inner,
        &fleet,
        &outcome.name,
        &outcome.digest,
        (&role.name, &config),
        progress,
    )
    .await?;
    gate(inner, fleet, outcome.name, outcome.digest.clone()).await?;
    Ok((outcome.digest, outcome.new, verified))
}

/// Verifies a freshly baked image whose recipe has checks, unless it already passed the same
/// check files: bake, verify and deploy are one pipeline, and tightened checks run again.
async fn verify_if_needed(
    inner: &Arc<Inner>,
    fleet: &FleetFile,
    name: &str,
    digest: &str,
    (_role, config): (&str, &RoleConfig),
    progress: &Progress,
) -> Result<Option<Verified>, FleetError> {
    if verify::checks_of(fleet, name).is_none() {
        return Ok(None);
    }
    let key = digest.to_string();
    let latest = inner.db(move |s| s.latest_verification(&key)).await?;
    if latest.as_ref().is_some_and(verify::still_passes) {
        return Ok(None);
    }
    let options = VerifyOptions {
        stop_timeout: config.stop_timeout,
        ..VerifyOptions::default()
    };
    let started = Instant::now();
    let verification = inner
        .verifier()
        .verify(
            fleet,
            name,
            digest,
            &options,
            progress,
            inner.clock.now_ms(),
        )
        .await?;
    // Boot, checks and stop: the whole time the deploy spent verifying.
    let (row, ms) = (&verification.row, started.elapsed().as_millis() as u64);
    progress.say(format!(
        "verification {}: {} checks, {} failed ({ms} ms)",
        if row.passed { "passed" } else { "failed" },
        row.total,
        row.failed,
    ));
    if !row.passed {
        return Err(FleetError::NotVerified {
            image: phoenix_image::short_digest(digest).to_string(),
            reason: verification.failure(),
        });
    }
    Ok(Some(Verified {
        checks: row.total,
        ms,
    }))
}

/// The deploy gate, off the async runtime.
async fn gate(
    inner: &Arc<Inner>,
    fleet: FleetFile,
    name: String,
    digest: String,
) -> Result<(), FleetError> {
    let store = inner.store.clone();
    tokio::task::spawn_blocking(move || verify::gate(&store, &fleet, &name, &digest))
        .await
        .map_err(|e| FleetError::Internal(e.to_string()))?
}

/// Starts `count` instances of `generation` and waits until every one is healthy.
/// Returns the reason when one dies or the timeout passes.
pub(crate) async fn boot_generation(
    inner: &Arc<Inner>,
    role: &Role,
    generation: &Arc<Generation>,
    count: u32,
    timeout: Duration,
    progress: &Progress,
) -> Result<(), String> {
    let started = start_instances(inner, role, generation, count, progress).await;
    if let Some(error) = started.error {
        return Err(error.to_string());
    }
    let deadline = Instant::now() + timeout;
    let mut announced = Vec::new();
    loop {
        if inner.is_shutting_down() {
            return Err("phoenix is shutting down".into());
        }
        let instances = generation.instances();
        for instance in &instances {
            if let Some(exit) = instance.ended() {
                inner
                    .capture
                    .wait_ended(&instance.name, Duration::from_millis(500))
                    .await;
                return Err(startup_failure(
                    inner,
                    instance,
                    &format!("exited during startup ({exit})"),
                ));
            }
            if instance.is_healthy() && !announced.contains(&instance.name) {
                progress.say(format!(
                    "{} is healthy after {} ms",
                    instance.name,
                    instance.started.elapsed().as_millis()
                ));
                announced.push(instance.name.clone());
            }
        }
        if instances.iter().all(|i| i.is_healthy()) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let sick = instances
                .iter()
                .find(|i| !i.is_healthy())
                .expect("one instance is not healthy");
            let error = sick
                .last_error()
                .unwrap_or_else(|| "no health check has passed yet".into());
            return Err(startup_failure(
                inner,
                sick,
                &format!("not healthy within {timeout:?}: last health check: {error}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn startup_failure(inner: &Inner, instance: &Instance, what: &str) -> String {
    let tail = inner.log_tail(instance, 10);
    let mut reason = format!("instance {} {what}", instance.name);
    if !tail.is_empty() {
        reason.push_str(&format!(
            "\nlast lines of its output (more: phoenix logs {}):\n  {}",
            instance.name,
            tail.join("\n  ")
        ));
    }
    reason
}

/// Starts one instance of `generation` (the image is unpacked once and reused).
pub(crate) async fn start_instance(
    inner: &Arc<Inner>,
    role: &Role,
    generation: &Generation,
) -> Result<Arc<Instance>, FleetError> {
    let (root, config) = unpack_for(inner, role, generation).await?;
    instance::start(inner, role, generation, root, &config).await
}

/// What [`start_instances`] did: every instance it started (each also added to the
/// generation), and the first error if a start failed.
pub(crate) struct Started {
    pub instances: Vec<Arc<Instance>>,
    pub error: Option<FleetError>,
}

/// Starts `count` instances of `generation` at once: a container's start mostly waits on the
/// kernel (namespaces, cgroups, a veth pair), so ten of them take little longer than one. The
/// image is unpacked first, once. Each instance joins the generation as soon as it runs, and
/// every start is awaited even after one fails, so none is left untracked.
pub(crate) async fn start_instances(
    inner: &Arc<Inner>,
    role: &Role,
    generation: &Generation,
    count: u32,
    progress: &Progress,
) -> Started {
    let (root, config) = match unpack_for(inner, role, generation).await {
        Ok(unpacked) => unpacked,
        Err(error) => {
            return Started {
                instances: Vec::new(),
                error: Some(error),
            };
        }
    };
    let starts = (0..count).map(|_| async {
        let instance = instance::start(inner, role, generation, root.clone(), &config).await?;
        progress.say(format!(
            "started {} (pid {}, {})",
            instance.name, instance.pid, instance.backend.addr
        ));
        generation.add(instance.clone());
        Ok::<_, FleetError>(instance)
    });
    let mut started = Started {
        instances: Vec::new(),
        error: None,
    };
    for result in futures_util::future::join_all(starts).await {
        match result {
            Ok(instance) => started.instances.push(instance),
            Err(error) => {
                started.error.get_or_insert(error);
            }
        }
    }
    started
}

async fn unpack_for(
    inner: &Arc<Inner>,
    role: &Role,
    generation: &Generation,
) -> Result<(std::path::PathBuf, phoenix_image::ImageConfig), FleetError> {
    let allow_root = role.config().run.allow_root;
    let driver = role.placement.driver.clone();
    instance::unpack(
        &inner.images,
        &generation.image,
        driver.as_ref(),
        allow_root,
    )
    .await
}

/// The current values of the role's secrets (files are read again), for a new generation.
fn role_secrets(
    inner: &Inner,
    config: &RoleConfig,
) -> Result<Vec<phoenix_driver::Secret>, FleetError> {
    if config.run.secrets.is_empty() {
        return Ok(Vec::new());
    }
    let fleet = inner.reload_fleet()?;
    inner.secrets.values(&fleet, &config.run.secrets)
}

/// Stops `instances` at once: each gets its own grace period, not the sum of all before it.
pub(crate) async fn stop_all(instances: &[Arc<Instance>]) {
    futures_util::future::join_all(instances.iter().map(|i| i.stop())).await;
}

/// Starts the recorded live generation of `role` again (after a restart of Phoenix) and waits
/// for it to become healthy.
pub(crate) async fn restart_live(
    inner: &Arc<Inner>,
    role: &Arc<Role>,
    row: GenerationRow,
) -> Result<(), FleetError> {
    let _lock = role.deploy_guard().await;
    if !inner.images.contains(&row.image) {
        return Err(FleetError::ImageNotFound(row.image));
    }
    let config = role.config();
    let size = role.desired();
    let secrets = role_secrets(inner, &config)?;
    let generation = Generation::new(row.id, row.image.clone(), GenerationStatus::Live, secrets);
    let started = start_instances(inner, role, &generation, size, &Progress::none()).await;
    if let Some(error) = started.error {
        stop_all(&started.instances).await;
        return Err(error);
    }
    role.switch_to(generation.clone());
    let detail = json!({"generation": row.id, "image": row.image, "instances": size});
    inner
        .journal(Some(&role.name), "role.restarted", detail)
        .await;
    let deadline = Instant::now() + config.deploy.healthy_timeout;
    while Instant::now() < deadline && !generation.instances().iter().all(|i| i.is_healthy()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Takes over the instances of `role`'s live generation `generation` that the previous
/// program of this process handed over (`phoenix restart`), without touching them; those that
/// cannot be taken over are removed, and new ones make up the role's size. Returns how many
/// were taken over.
pub(crate) async fn adopt_live(
    inner: &Arc<Inner>,
    role: &Arc<Role>,
    generation: i64,
    handed: &[&crate::handover::HandedInstance],
) -> Result<usize, FleetError> {
    let _lock = role.deploy_guard().await;
    let name = role.name.clone();
    let row = inner.db(move |s| s.live_generation(&name)).await?;
    let Some(row) = row.filter(|row| row.id == generation) else {
        return Err(FleetError::Restart(format!(
            "generation {generation} of role {} is no longer live",
            role.name
        )));
    };
    let config = role.config();
    let secrets = role_secrets(inner, &config)?;
    let live = Generation::new(row.id, row.image.clone(), GenerationStatus::Live, secrets);
    let driver = role.placement.driver.clone();
    for handed in handed {
        let adoption = phoenix_driver::Adoption {
            name: handed.name.clone(),
            role: role.name.clone(),
            pid: handed.pid,
            start_time: handed.start_time,
            watcher: handed.watcher,
            addr: handed.addr,
            network: role.placement.network.clone(),
        };
        let taking = driver.clone();
        let same_driver = handed.driver == driver.name();
        let process = tokio::task::spawn_blocking(move || {
            if !same_driver {
                return Err(phoenix_driver::DriverError::Unsupported(
                    "the role's driver changed".into(),
                ));
            }
            taking.adopt(&adoption)
        })
        .await
        .map_err(|e| FleetError::Internal(e.to_string()))?;
        match process {
            Ok(process) => {
                let watched = instance::Watched {
                    name: handed.name.clone(),
                    process,
                    addr: handed.addr,
                    driver: driver.clone(),
                    healthy: handed.healthy,
                };
                inner.capture.resume(&crate::capture::Source {
                    role: role.name.clone(),
                    instance: handed.name.clone(),
                    generation: row.id,
                    image: phoenix_image::short_digest(&row.image).to_string(),
                });
                let instance = instance::supervise(inner, role, row.id, watched);
                live.add(instance);
            }
            Err(error) => {
                tracing::warn!(instance = %handed.name, %error, "not taken over: removed");
                inner.forget_lost(handed).await;
            }
        }
    }
    let adopted = live.instances().len();
    role.switch_to(live.clone());
    let missing = role.desired().saturating_sub(adopted as u32);
    if missing > 0 {
        let started = start_instances(inner, role, &live, missing, &Progress::none()).await;
        if let Some(error) = started.error {
            tracing::error!(role = %role.name, %error, "cannot make up the role's size");
        }
        role.refresh_backends();
    }
    let detail =
        json!({"generation": row.id, "image": row.image, "adopted": adopted, "started": missing});
    inner
        .journal(Some(&role.name), "role.adopted", detail)
        .await;
    Ok(adopted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ManualClock, Options};
    use phoenix_driver::test_util::FakeDriver;

    /// A role `web` of one instance whose image says `version`.
    fn write_fleet(dir: &std::path::Path, version: &str) {
        std::fs::write(dir.join("app"), b"#!/bin/true\n").unwrap();
        let fleet = format!(
            "[image.app]\nfrom = \"scratch\"\ncontext = \"{}\"\n\
             copy = [{{ src = \"app\", dst = \"/app\" }}]\nenv = {{ VERSION = \"{version}\" }}\n\
             entrypoint = [\"/app\"]\n\n[role.web]\nimage = \"app\"\ninstances = 1\n\
             listen = \"127.0.0.1:0\"\nnetwork = \"host\"\nstop_timeout = \"1s\"\n\n\
             [role.web.health]\ninterval = \"10ms\"\ntimeout = \"500ms\"\n\
             healthy_threshold = 1\nunhealthy_threshold = 1\n\n\
             [role.web.deploy]\nhealthy_timeout = \"1s\"\ndrain = \"10ms\"\n",
            dir.display()
        );
        std::fs::write(dir.join("phoenix.toml"), fleet).unwrap();
    }

    type Word = Result<(), String>;

    /// A gate, how its host reports booting, and how the controller gives the word.
    fn gate() -> (
        Gate,
        tokio::sync::oneshot::Receiver<Word>,
        tokio::sync::oneshot::Sender<Word>,
    ) {
        let (booted, booted_rx) = tokio::sync::oneshot::channel();
        let (go_tx, go) = tokio::sync::oneshot::channel();
        (Gate { booted, go }, booted_rx, go_tx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hosts_part_of_a_rollout_waits_for_the_roles_last_change_and_says_why_it_failed() {
        let dir = tempfile::tempdir().unwrap();
        write_fleet(dir.path(), "v1");
        let driver = FakeDriver::default();
        let mut options =
            Options::new(dir.path().join(".phoenix"), dir.path().join("phoenix.toml"));
        options.driver = Some(Arc::new(driver.clone()));
        options.clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let controller = Controller::open(options).await.unwrap();
        assert!(controller.converge().await.is_empty());
        let inner = controller.inner.clone();
        let role = inner.role("web").unwrap();

        // The role is still busy (an aborted rollout draining): the part queues, then runs.
        write_fleet(dir.path(), "v2");
        let busy = role.try_deploy_guard().unwrap();
        let (part, mut booted, go) = gate();
        let queued = {
            let inner = inner.clone();
            tokio::spawn(async move {
                let options = DeployOptions::default();
                deploy_gated(&inner, "web", options, &Progress::none(), Some(part)).await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(booted.try_recv().is_err(), "booted while the role was busy");
        drop(busy);
        assert_eq!(booted.await.unwrap(), Ok(()));
        go.send(Ok(())).unwrap();
        assert_eq!(queued.await.unwrap().unwrap().generation, 2);

        // A part that fails before it boots anything tells the cluster the reason.
        std::fs::write(dir.path().join("phoenix.toml"), "[role.web\n").unwrap();
        let (part, booted, _go) = gate();
        let failed = deploy_gated(
            &inner,
            "web",
            DeployOptions::default(),
            &Progress::none(),
            Some(part),
        )
        .await;
        let reason = booted.await.unwrap().unwrap_err();
        assert_eq!(reason, failed.unwrap_err().to_string());
        assert!(reason.contains("phoenix.toml"), "{reason}");
    }
}
