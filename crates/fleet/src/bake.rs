//! Baking the fleet file's recipes into the image store, and recording them.

use std::sync::Arc;
use std::time::Instant;

use phoenix_image::{BakeOptions, ImageStore};
use phoenix_store::Store;
use serde::Serialize;
use serde_json::json;

use crate::controller::Inner;
use crate::{FleetError, FleetFile};

/// The result of baking one recipe.
#[derive(Debug, Clone, Serialize)]
pub struct BakeOutcome {
    pub name: String,
    pub digest: String,
    pub size: u64,
    /// False when the store already held this exact image.
    pub new: bool,
    pub millis: u64,
}

/// Bakes recipe `name` of `fleet`, records it in `store` and the journal, and refreshes the
/// layout's `index.json`. Blocking: call it off the async runtime.
pub fn bake_image(
    store: &Store,
    images: &ImageStore,
    fleet: &FleetFile,
    name: &str,
    options: BakeOptions,
    now: i64,
) -> Result<BakeOutcome, FleetError> {
    let recipe = fleet
        .images
        .get(name)
        .ok_or_else(|| FleetError::UnknownImage {
            name: name.into(),
            file: fleet.path.display().to_string(),
            known: fleet.images.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
    let started = Instant::now();
    let baked = images.bake(recipe, &fleet.dir, options)?;
    let known = store.images()?;
    let new = !known
        .iter()
        .any(|i| i.digest == baked.digest && i.name == name);
    if new {
        store.record_image(name, &baked.digest, baked.size, now)?;
        store.journal(
            now,
            None,
            "image.baked",
            &json!({"name": name, "digest": baked.digest, "size": baked.size}),
        )?;
    }
    let mut refs: Vec<(String, String)> = Vec::new();
    for image in store.images()? {
        if !refs.iter().any(|(n, _)| *n == image.name) {
            refs.push((image.name, image.digest));
        }
    }
    images.write_index(&refs)?;
    Ok(BakeOutcome {
        name: name.into(),
        digest: baked.digest,
        size: baked.size,
        new,
        millis: started.elapsed().as_millis() as u64,
    })
}

pub(crate) async fn bake_in_background(
    inner: &Arc<Inner>,
    fleet: FleetFile,
    name: String,
) -> Result<BakeOutcome, FleetError> {
    let (store, images, options, now) = (
        inner.store.clone(),
        inner.images.clone(),
        inner.bake,
        inner.clock.now_ms(),
    );
    tokio::task::spawn_blocking(move || bake_image(&store, &images, &fleet, &name, options, now))
        .await
        .map_err(|e| FleetError::Internal(e.to_string()))?
}
