//! Drift: a role's live root compared with its image's file manifest. A drifted root is
//! journaled, unpacked again, and its instances replaced by a blue-green deploy of the same
//! image, so that hand-made changes never live on ("burn and rebuild, never patch").

use std::sync::{Arc, Weak};

use phoenix_image::short_digest;
use serde_json::json;

use crate::controller::Inner;
use crate::deploy::{DeployOptions, DeployReport, Progress};
use crate::{Controller, FleetError};

impl Controller {
    /// Checks role `role`'s live generation for drift; when drifted, replaces its instances
    /// and returns the deploy's report.
    pub async fn heal_drift(&self, role: &str) -> Result<Option<DeployReport>, FleetError> {
        heal_drift(&self.inner, role).await
    }
}

async fn heal_drift(
    inner: &Arc<Inner>,
    role_name: &str,
) -> Result<Option<DeployReport>, FleetError> {
    let role = inner.role(role_name)?;
    let Some(live) = role.live() else {
        return Ok(None);
    };
    let layout =
        crate::instance::root_layout(role.placement.driver.as_ref(), role.config().run.allow_root);
    let (images, image) = (inner.images.clone(), live.image.clone());
    let drift = tokio::task::spawn_blocking(move || images.drift_as(&image, layout, false))
        .await
        .map_err(|e| FleetError::Internal(e.to_string()))??;
    if drift.is_clean() {
        return Ok(None);
    }
    let instances: Vec<String> = live.instances().iter().map(|i| i.name.clone()).collect();
    let sample: Vec<String> = drift
        .added
        .iter()
        .map(|p| format!("+/{p}"))
        .chain(drift.changed.iter().map(|c| format!("~/{}", c.path)))
        .chain(drift.removed.iter().map(|p| format!("-/{p}")))
        .take(20)
        .collect();
    tracing::warn!(role = %role_name, image = %short_digest(&live.image), paths = ?sample, "instances drifted from their image");
    let detail = json!({
        "image": live.image, "generation": live.id, "instances": instances,
        "added": drift.added.len(), "changed": drift.changed.len(), "removed": drift.removed.len(),
        "paths": sample,
    });
    inner
        .journal(Some(role_name), "image.drifted", detail)
        .await;
    let (images, image) = (inner.images.clone(), live.image.clone());
    tokio::task::spawn_blocking(move || images.reunpack(&image, layout))
        .await
        .map_err(|e| FleetError::Internal(e.to_string()))??;
    let options = DeployOptions {
        image: Some(live.image.clone()),
        rollback: None,
    };
    let report = crate::deploy::deploy(inner, role_name, options, &Progress::none()).await?;
    Ok(Some(report))
}

/// Checks `role` every `drift_check` of its config while Phoenix runs. A busy role (a deploy
/// in progress) is checked at the next tick.
pub(crate) async fn watch(inner: Weak<Inner>, role: String) {
    loop {
        let Some(every) = inner
            .upgrade()
            .and_then(|i| i.role(&role).ok().and_then(|r| r.config().drift_check))
        else {
            return;
        };
        if !crate::lifecycle::pause(&inner, every).await {
            return;
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.is_shutting_down() {
            return;
        }
        match heal_drift(&strong, &role).await {
            Ok(Some(report)) => {
                tracing::info!(role = %role, generation = report.generation, "drifted instances replaced")
            }
            Ok(None) | Err(FleetError::Busy { .. }) => {}
            Err(error) => tracing::error!(role = %role, %error, "drift check failed"),
        }
    }
}
