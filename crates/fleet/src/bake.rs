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
    #[serde(rename = "duration_ms")]
    pub millis: u64,
    /// Why the image may not start in a container (see `BakedImage::warnings`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Bakes recipe `name` of `fleet` (after the fleet's recipes it is based on, bases first),
/// records each in `store` and the journal, and refreshes the layout's `index.json`.
/// Blocking: call it off the async runtime.
pub fn bake_image(
    store: &Store,
    images: &ImageStore,
    fleet: &FleetFile,
    name: &str,
    options: BakeOptions,
    now: i64,
    progress: &mut dyn Progress,
) -> Result<BakeOutcome, FleetError> {
    let mut outcome = None;
    for recipe in bake_order(fleet, name)? {
        outcome = Some(bake_one(
            store,
            images,
            fleet,
            &recipe,
            options.clone(),
            now,
            progress,
        )?);
    }
    Ok(outcome.expect("the order ends with `name`"))
}

/// `name` and the recipes of the fleet file it is built on, bases first. A recipe that is its
/// own base, through any chain, is refused with the chain.
fn bake_order(fleet: &FleetFile, name: &str) -> Result<Vec<String>, FleetError> {
    let mut chain = vec![name.to_string()];
    while let Some(Base::Image(base)) = chain
        .last()
        .and_then(|n| fleet.images.get(n))
        .map(|r| &r.from)
    {
        if !fleet.images.contains_key(base) {
            break;
        }
        let looped = chain.contains(base);
        chain.push(base.clone());
        if looped {
            return Err(FleetError::BaseLoop(chain.join(" -> ")));
        }
    }
    chain.reverse();
    Ok(chain)
}

/// Bakes one recipe and records it.
fn bake_one(
    store: &Store,
    images: &ImageStore,
    fleet: &FleetFile,
    name: &str,
    options: BakeOptions,
    now: i64,
    progress: &mut dyn Progress,
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
    let mut recording = Recording::new(progress, name);
    let baked = images.bake_with(recipe, &fleet.dir, options, &mut recording);
    let digest = baked.as_ref().map(|b| b.digest.as_str()).unwrap_or("");
    recording.store(images, digest);
    let baked = baked?;
    let known = store.images()?;
    let new = !known
        .iter()
        .any(|i| i.digest == baked.digest && i.name == name);
    if let Some(tag) = &recipe.tag {
        store.tag_image(name, tag, &baked.digest, now)?;
    }
    if new {
        store.record_image(name, &baked.digest, baked.size, now)?;
        store.journal(
            now,
            None,
            "image.baked",
            &json!({"name": name, "digest": baked.digest, "size": baked.size, "warnings": baked.warnings}),
        )?;
    }
    for warning in &baked.warnings {
        tracing::warn!(image = %name, "{warning}");
    }
    refresh_index(store, images)?;
    Ok(BakeOutcome {
        name: name.into(),
        digest: baked.digest,
        size: baked.size,
        new,
        millis: started.elapsed().as_millis() as u64,
        warnings: baked.warnings,
    })
}

/// The log store's directory of bake steps' output (`run`, mmdebstrap); `_` keeps it apart
/// from every role.
pub const BAKE_LOGS: &str = "_bake";

/// Lines of one bake kept for the store; a longer output keeps its first ones and counts the rest.
const BAKE_LINES: usize = 100_000;

/// Passes a bake's progress on, and records its command output for the log store, each line
/// stamped as it comes.
struct Recording<'a> {
    inner: &'a mut dyn Progress,
    instance: String,
    lines: Vec<phoenix_observe::logs::LogLine>,
    dropped: u64,
    /// Whether a command wrote anything (steps alone are not worth keeping).
    said: bool,
}

impl<'a> Recording<'a> {
    fn new(inner: &'a mut dyn Progress, name: &str) -> Recording<'a> {
        Recording {
            inner,
            instance: format!("bake-{name}"),
            lines: Vec::new(),
            dropped: 0,
            said: false,
        }
    }

    /// Appends what the bake's commands wrote to `_bake` in the store beside `images`.
    fn store(mut self, images: &ImageStore, digest: &str) {
        if self.dropped > 0 {
            let note = format!("[phoenix: {} more lines of output not kept]", self.dropped);
            self.push(note);
        }
        if !self.said {
            return;
        }
        let image = phoenix_image::short_digest(digest).to_string();
        for line in &mut self.lines {
            line.image.clone_from(&image);
        }
        let Some(state_dir) = images.root().parent() else {
            return;
        };
        let dir = crate::capture::store_dir(state_dir);
        let stored = phoenix_observe::logs::LogStore::open(&dir, Default::default())
            .and_then(|store| store.append(BAKE_LOGS, &self.lines, now_ms()));
        if let Err(error) = stored {
            tracing::warn!(%error, "cannot store the bake's output");
        }
    }

    fn push(&mut self, text: String) {
        for (piece, split) in phoenix_observe::logs::split_line(&text) {
            self.lines.push(phoenix_observe::logs::LogLine {
                at: now_ms(),
                stream: phoenix_observe::logs::Stream::Stdout,
                instance: self.instance.clone(),
                generation: 0,
                image: String::new(),
                text: piece,
                split,
            });
        }
    }
}

fn now_ms() -> i64 {
    use crate::Clock;
    crate::SystemClock.now_ms()
}

impl Progress for Recording<'_> {
    fn step(&mut self, index: usize, total: usize, what: &str) {
        self.inner.step(index, total, what);
        if self.lines.len() < BAKE_LINES {
            self.push(format!("[phoenix: step {index}/{total}: {what}]"));
        }
    }

    fn advance(&mut self, done: u64, total: u64) {
        self.inner.advance(done, total);
    }

    fn finished(&mut self, report: &phoenix_image::StepReport) {
        self.inner.finished(report);
    }

    fn line(&mut self, line: &str) {
        self.inner.line(line);
        self.said = true;
        if self.lines.len() < BAKE_LINES {
            self.push(line.to_string());
        } else {
            self.dropped += 1;
        }
    }
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
        inner.bake.clone(),
        inner.clock.now_ms(),
    );
    tokio::task::spawn_blocking(move || {
        bake_image(&store, &images, &fleet, &name, options, now, &mut ())
    })
    .await
    .map_err(|e| FleetError::Internal(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(text: &str) -> FleetFile {
        FleetFile::parse(std::path::Path::new("phoenix.toml"), text).unwrap()
    }

    #[test]
    fn bases_bake_first_and_loops_are_refused_with_their_chain() {
        let chain = fleet(
            "[image.app]\nfrom = \"base\"\nentrypoint = [\"/a\"]\n\
             [image.base]\nfrom = \"os\"\n[image.os]\n",
        );
        assert_eq!(bake_order(&chain, "app").unwrap(), ["os", "base", "app"]);
        // A base that is not a recipe is an image in the store: nothing to bake first.
        let outside = fleet("[image.app]\nfrom = \"debian-slim\"\n");
        assert_eq!(bake_order(&outside, "app").unwrap(), ["app"]);
        let looped = fleet("[image.a]\nfrom = \"b\"\n[image.b]\nfrom = \"a\"\n");
        let error = bake_order(&looped, "a").unwrap_err().to_string();
        assert!(error.contains("a -> b -> a"), "{error}");
    }
}
