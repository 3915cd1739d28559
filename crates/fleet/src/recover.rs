//! Recovery after Phoenix was killed: no orphaned process, no deploy left half-recorded.

use std::sync::Arc;

use phoenix_store::{DeployStatus, GenerationStatus, InstanceStatus};
use serde_json::json;

use crate::FleetError;
use crate::controller::Inner;

/// Kills every instance process a previous run left behind (checked by pid and start time),
/// marks interrupted deploys and their generations, and journals what it did.
pub(crate) async fn recover(inner: &Arc<Inner>) -> Result<(), FleetError> {
    let instances = inner.db(|s| s.active_instances()).await?;
    let mut killed = 0;
    for instance in &instances {
        // Every process of the instance goes, its cgroup, its runtime state: with the driver
        // that ran it.
        let recorded = phoenix_driver::Recorded {
            name: instance.name.clone(),
            pid: instance.pid,
            pid_start: instance.pid_start,
        };
        let (drivers, driver) = (inner.drivers.clone(), instance.driver.clone());
        let was_running = tokio::task::spawn_blocking(move || drivers.clean_up(&driver, &recorded))
            .await
            .unwrap_or(false);
        killed += usize::from(was_running);
        let (name, now) = (instance.name.clone(), inner.clock.now_ms());
        inner
            .db(move |s| s.set_instance_status(&name, InstanceStatus::Lost, now))
            .await?;
        let detail = json!({"instance": instance.name, "generation": instance.generation, "pid": instance.pid, "driver": instance.driver, "killed": was_running});
        inner
            .journal(Some(&instance.role), "instance.lost", detail)
            .await;
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
