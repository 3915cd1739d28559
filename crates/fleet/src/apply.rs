//! `phoenix apply`: a plan carried out on the running fleet, without a restart. What only a
//! restart can change (roles added or removed, listen addresses, proxy modes, drivers,
//! networks, network policy, `[agent]`, `[network]`) is refused as a whole, before anything
//! changes, naming each such key.

use serde::{Deserialize, Serialize};

use crate::controller::Controller;
use crate::deploy::{DeployOptions, DeployReport, Progress};
use crate::plan::{How, Op, Plan, Running};
use crate::scale::ScaleReport;
use crate::{FleetError, FleetFile};

/// What an apply did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyReport {
    /// Changes applied.
    pub changes: usize,
    /// Roles started, and removed.
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Roles whose frontend moved, and where to.
    pub moved: Vec<(String, String)>,
    /// Roles whose settings changed in place.
    pub in_place: Vec<String>,
    pub scaled: Vec<ScaleReport>,
    pub deployed: Vec<DeployReport>,
}

impl Controller {
    /// A role added live runs on a driver and network some running role has; one that asks
    /// for another is refused before anything changes.
    fn check_placements(&self, plan: &Plan, desired: &FleetFile) -> Result<(), FleetError> {
        for change in plan.changes.iter().filter(|c| c.how == How::Start) {
            let name = change.role.as_deref().unwrap_or_default();
            let run = &desired.roles[name].run;
            if self.inner.placement_like(run).is_none() {
                return Err(FleetError::Apply(format!(
                    "role {name} asks for driver {} on the {} network, which no running role has: apply the file with `phoenix restart`",
                    run.driver.name(),
                    if run.network == crate::NetworkMode::Bridge {
                        "bridge"
                    } else {
                        "host"
                    },
                )));
            }
        }
        Ok(())
    }

    /// What applying the fleet file `text` would change.
    pub async fn plan(&self, text: &str) -> Result<Plan, FleetError> {
        let desired = FleetFile::parse(&self.inner.fleet_path, text)?;
        Ok(self.plan_against(&desired, text))
    }

    fn plan_against(&self, desired: &FleetFile, text: &str) -> Plan {
        let applied = self.inner.applied();
        let running = Running {
            policy: self
                .inner
                .drivers
                .bridge()
                .is_some_and(|bridge| bridge.has_policy()),
            applied: &applied,
            roles: self
                .inner
                .roles()
                .iter()
                .map(|r| (r.name.clone(), r.config(), r.desired()))
                .collect(),
        };
        crate::plan::plan(&running, desired, text)
    }

    /// Applies the fleet file `text` (which must be what the file holds now: deploys read it
    /// again); with `base`, only if the running fleet is still what that plan was made against.
    pub async fn apply(
        &self,
        text: &str,
        base: Option<&str>,
        progress: &Progress,
    ) -> Result<ApplyReport, FleetError> {
        let on_disk = tokio::fs::read_to_string(&self.inner.fleet_path)
            .await
            .unwrap_or_default();
        if on_disk != text {
            return Err(FleetError::Apply(format!(
                "{} is not what was planned (it changed, or another file was given): plan it again",
                self.inner.fleet_path.display()
            )));
        }
        let desired = FleetFile::parse(&self.inner.fleet_path, text)?;
        let plan = self.plan_against(&desired, text);
        if let Some(base) = base
            && base != plan.base
        {
            return Err(FleetError::Apply(
                "the running fleet changed since this plan was made: plan again".into(),
            ));
        }
        let restart: Vec<String> = plan
            .needs_restart()
            .iter()
            .map(|c| {
                format!(
                    "{}{}",
                    c.role
                        .as_deref()
                        .map(|r| format!("role {r}"))
                        .unwrap_or_default(),
                    c.key
                        .as_deref()
                        .map(|k| format!(" {k}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        if !restart.is_empty() {
            return Err(FleetError::Apply(format!(
                "not applied: `phoenix restart` applies {} (no request dropped; instances whose driver or network changed are replaced)",
                restart.join(", ")
            )));
        }
        self.check_placements(&plan, &desired)?;
        let mut report = ApplyReport {
            changes: plan.changes.len(),
            added: Vec::new(),
            removed: Vec::new(),
            moved: Vec::new(),
            in_place: Vec::new(),
            scaled: Vec::new(),
            deployed: Vec::new(),
        };
        // Removed roles first (their ports may be taken by others), added roles last.
        for change in plan.changes.iter().filter(|c| c.how == How::DrainAndRemove) {
            let name = change.role.as_deref().unwrap_or_default();
            self.remove_role(name, progress).await?;
            report.removed.push(name.to_string());
        }
        let mut roles: Vec<&str> = plan
            .changes
            .iter()
            .filter(|c| c.op == Op::Change)
            .filter_map(|c| c.role.as_deref())
            .collect();
        roles.dedup();
        for name in roles {
            let role = self.inner.role(name)?;
            let changes: Vec<_> = plan
                .changes
                .iter()
                .filter(|c| c.role.as_deref() == Some(name))
                .collect();
            let config = desired.roles[name].clone();
            if changes.iter().any(|c| c.how == How::NewListener) {
                let bound = self.move_role(name, config.listen, progress).await?;
                report.moved.push((name.to_string(), bound.to_string()));
            }
            if changes.iter().any(|c| c.how == How::NewGeneration) {
                progress.say(format!("role {name}: new generation"));
                report.deployed.push(
                    self.deploy(name, DeployOptions::default(), progress)
                        .await?,
                );
                continue;
            }
            let resize = changes.iter().any(|c| c.how == How::Scale);
            role.set_config(config.clone());
            if resize {
                progress.say(format!("role {name}: scale to {}", config.instances));
                report
                    .scaled
                    .push(self.scale(name, config.instances, progress).await?);
            } else {
                progress.say(format!("role {name}: settings changed in place"));
                report.in_place.push(name.to_string());
            }
        }
        for change in plan.changes.iter().filter(|c| c.how == How::Start) {
            let name = change.role.as_deref().unwrap_or_default();
            let config = desired.roles[name].clone();
            report
                .deployed
                .push(self.add_role(name, config, progress).await?);
            report.added.push(name.to_string());
        }
        let routed = crate::listeners::Listeners::update_routes(&self.inner, &desired.listeners)?;
        if plan
            .changes
            .iter()
            .any(|c| c.role.is_none() && c.key.as_deref().is_some_and(|k| k.ends_with(" routes")))
        {
            progress.say(format!(
                "routes of listener(s) {} replaced",
                routed.join(", ")
            ));
        }
        let journal = self.inner.webhook_journal();
        self.inner
            .webhooks
            .lock()
            .await
            .reconfigure(&desired.webhooks, &journal)
            .await;
        self.inner.set_applied(desired);
        Ok(report)
    }
}
