//! Baking the fleet file's recipes into the image store, and recording them.

use std::sync::Arc;
use std::time::Instant;

use phoenix_image::{BakeOptions, Base, ImageStore, Progress};
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
    progress: &mut dyn Progress,
) -> Result<BakeOutcome, FleetError> {
    bake_with_bases(
        store,
        images,
        fleet,
        name,
        options,
        now,
        progress,
        &mut Vec::new(),
    )
}

/// Bakes `name`, first baking its base when the base is another recipe of the fleet file.
/// `chain` holds the recipes being baked, to refuse a recipe that is its own base.
#[allow(clippy::too_many_arguments)]
fn bake_with_bases(
    store: &Store,
    images: &ImageStore,
    fleet: &FleetFile,
    name: &str,
    options: BakeOptions,
    now: i64,
    progress: &mut dyn Progress,
    chain: &mut Vec<String>,
) -> Result<BakeOutcome, FleetError> {
    if chain.iter().any(|n| n == name) {
        chain.push(name.into());
        return Err(FleetError::BaseLoop(chain.join(" -> ")));
    }
    if let Some(Base::Image(base)) = fleet.images.get(name).map(|r| &r.from) {
        if fleet.images.contains_key(base) {
            chain.push(name.into());
            bake_with_bases(store, images, fleet, base, options, now, progress, chain)?;
            chain.pop();
        }
    }
    let recipe = fleet
        .images
        .get(name)
        .ok_or_else(|| FleetError::UnknownImage {
            name: name.into(),
            file: fleet.path.display().to_string(),
            known: fleet.images.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
    let started = Instant::now();
    let baked = images.bake_with(recipe, &fleet.dir, options, progress)?;
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
    refresh_index(store, images)?;
    Ok(BakeOutcome {
        name: name.into(),
        digest: baked.digest,
        size: baked.size,
        new,
        millis: started.elapsed().as_millis() as u64,
    })
}

/// Rewrites the layout's `index.json` from the recorded images: each name's newest bake.
pub fn refresh_index(store: &Store, images: &ImageStore) -> Result<(), FleetError> {
    let mut refs: Vec<(String, String)> = Vec::new();
    for image in store.images()? {
        if !refs.iter().any(|(n, _)| *n == image.name) {
            refs.push((image.name, image.digest));
        }
    }
    Ok(images.write_index(&refs)?)
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
    tokio::task::spawn_blocking(move || {
        bake_image(&store, &images, &fleet, &name, options, now, &mut ())
    })
    .await
    .map_err(|e| FleetError::Internal(e.to_string()))?
}
