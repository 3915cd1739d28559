//! Recovery after Phoenix was killed: no orphaned process, no deploy left half-recorded.

use std::sync::Arc;

use phoenix_store::{DeployStatus, GenerationStatus, InstanceStatus};
use serde_json::json;

use crate::FleetError;
use crate::controller::Inner;

/// An instance that a previous program of Phoenix ran and nobody supervises now.
pub(crate) struct Lost<'a> {
    pub name: &'a str,
    pub role: &'a str,
    pub generation: i64,
    pub pid: Option<u32>,
    pub pid_start: Option<u64>,
    pub driver: &'a str,
}

impl Inner {
    /// Removes a lost instance with the driver that ran it (every process, its cgroup, its
    /// runtime state; checked by pid and start time), records it, and journals it. True when
    /// something still ran.
    pub(crate) async fn lose(&self, lost: Lost<'_>) -> Result<bool, FleetError> {
        let recorded = phoenix_driver::Recorded {
            name: lost.name.to_string(),
            pid: lost.pid,
            pid_start: lost.pid_start,
        };
        let (drivers, driver) = (self.drivers.clone(), lost.driver.to_string());
        let was_running = tokio::task::spawn_blocking(move || drivers.clean_up(&driver, &recorded))
            .await
            .unwrap_or(false);
        let (name, now) = (lost.name.to_string(), self.clock.now_ms());
        self.db(move |s| s.set_instance_status(&name, InstanceStatus::Lost, now))
            .await?;
        let detail = json!({"instance": lost.name, "generation": lost.generation, "pid": lost.pid, "driver": lost.driver, "killed": was_running});
        self.journal(Some(lost.role), "instance.lost", detail).await;
        Ok(was_running)
    }

    /// Removes an instance handed over by the previous program that could not be taken over.
    pub(crate) async fn forget_lost(&self, handed: &crate::handover::HandedInstance) {
        let lost = Lost {
            name: &handed.name,
            role: &handed.role,
            generation: handed.generation,
            pid: Some(handed.pid),
            pid_start: Some(handed.start_time),
            driver: &handed.driver,
        };
        if let Err(error) = self.lose(lost).await {
            tracing::error!(instance = %handed.name, %error, "recording a lost instance");
        }
    }
}

/// Kills every instance process a previous run left behind (checked by pid and start time),
/// but those in `keep` (handed over to be taken over), marks interrupted deploys and their
/// generations, and journals what it did.
pub(crate) async fn recover(
    inner: &Arc<Inner>,
    keep: &std::collections::HashSet<String>,
) -> Result<(), FleetError> {
    let instances: Vec<_> = inner
        .db(|s| s.active_instances())
        .await?
        .into_iter()
        .filter(|i| !keep.contains(&i.name))
        .collect();
    let mut killed = 0;
    for instance in &instances {
        let lost = Lost {
            name: &instance.name,
            role: &instance.role,
            generation: instance.generation,
            pid: instance.pid,
            pid_start: instance.pid_start,
            driver: &instance.driver,
        };
        killed += usize::from(inner.lose(lost).await?);
    }
    let drivers = inner.drivers.clone();
    let orphans = tokio::task::spawn_blocking(move || drivers.clean_orphans())
        .await
        .unwrap_or_default();
    if !orphans.is_empty() {
        inner
            .journal(
                None,
                "instance.orphans_removed",
                json!({"instances": orphans}),
            )
            .await;
    }
    let deploys = inner.db(|s| s.running_deploys()).await?;
    for deploy in &deploys {
        let (id, to, now) = (deploy.id, deploy.to_generation, inner.clock.now_ms());
        inner
            .db(move |s| {
                s.finish_deploy(
                    id,
                    DeployStatus::Interrupted,
                    Some("phoenix stopped during the deploy"),
                    now,
                )?;
                match s.generation(to)? {
                    Some(g) if g.status == GenerationStatus::Starting => {
                        s.set_generation_status(to, GenerationStatus::Aborted, now)
                    }
                    _ => Ok(()),
                }
            })
            .await?;
        inner
            .journal(
                Some(&deploy.role),
                "deploy.interrupted",
                json!({"deploy": deploy.id, "generation": deploy.to_generation}),
            )
            .await;
    }
    let generations = inner.db(|s| s.generations(None)).await?;
    for generation in generations {
        let status = match generation.status {
            GenerationStatus::Starting => GenerationStatus::Aborted,
            GenerationStatus::Draining => GenerationStatus::Retired,
            _ => continue,
        };
        let (id, now) = (generation.id, inner.clock.now_ms());
        inner
            .db(move |s| s.set_generation_status(id, status, now))
            .await?;
    }
    if !instances.is_empty() || !deploys.is_empty() {
        let detail = json!({"instances_lost": instances.len(), "processes_killed": killed, "deploys_interrupted": deploys.len()});
        inner.journal(None, "up.recovered", detail).await;
    }
    Ok(())
}
