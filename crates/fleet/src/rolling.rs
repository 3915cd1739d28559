//! Rolling deploys: the live generation's instances are replaced a batch at a time. Each
//! round takes at most `max_unavailable` old instances out (drained, then stopped), boots at
//! most `max_surge` more new ones than that, and once they are healthy gives them their share
//! of requests and retires the old instances beyond the role's size. New instances serve
//! beside the old ones through the proxy's second backend set, weighted by their number so
//! every instance gets the same load.

use std::sync::Arc;

use serde_json::json;

use crate::Progress;
use crate::controller::{Generation, Inner, Role};
use crate::deploy::boot_generation;
use crate::scale::{grow, shrink};

/// Replaces `live`'s instances with `size` instances of `generation`. On success every new
/// instance is healthy and serving and `live` has none left (the caller switches). On failure
/// `live` is grown back to `size`, the new instances are out of the proxy and drained, and
/// the reason is returned (the caller stops them).
pub(crate) async fn replace(
    inner: &Arc<Inner>,
    role: &Role,
    live: &Arc<Generation>,
    generation: &Arc<Generation>,
    size: u32,
    deploy_id: i64,
    progress: &Progress,
) -> Result<(), String> {
    let config = role.config();
    let batches = config.deploy.rolling;
    loop {
        let (old, new) = (live.instances(), generation.instances().len() as u32);
        if old.is_empty() && new >= size {
            return Ok(());
        }
        let down = batches.max_unavailable.min(old.len() as u32) as usize;
        if down > 0 {
            shrink(role, live, &old[..down], progress).await;
        }
        let up = size
            .saturating_sub(new)
            .min(batches.max_surge + down as u32);
        if up > 0 {
            let booted = boot_generation(
                inner,
                role,
                generation,
                up,
                config.deploy.healthy_timeout,
                progress,
            )
            .await;
            if let Err(why) = booted {
                restore(inner, role, live, generation, size, progress).await;
                return Err(why);
            }
        }
        weigh(role, live, generation);
        let old = live.instances();
        let surplus = (old.len() + generation.instances().len()).saturating_sub(size as usize);
        if surplus > 0 {
            shrink(role, live, &old[..surplus.min(old.len())], progress).await;
            weigh(role, live, generation);
        }
        let (old, new) = (live.instances().len(), generation.instances().len());
        progress.say(format!(
            "rolling: {new} of {size} instances on generation {}, {old} of generation {} left",
            generation.id, live.id
        ));
        inner
            .journal(
                Some(&role.name),
                "deploy.batch",
                json!({"deploy": deploy_id, "generation": generation.id, "new": new, "old": old}),
            )
            .await;
    }
}

/// Gives the new generation's healthy instances their share of requests: as many as the
/// new instances are among all serving ones.
fn weigh(role: &Role, live: &Generation, generation: &Arc<Generation>) {
    let serving = |g: &Generation| g.instances().iter().filter(|i| i.is_healthy()).count() as u64;
    let (old, new) = (serving(live), serving(generation));
    let share = (new * 10_000).checked_div(old + new).unwrap_or(0) as u32;
    role.set_canary(Some((generation.clone(), share)));
}

/// Grows `live` back to `size`, then takes the new instances out of the proxy and drains them.
async fn restore(
    inner: &Arc<Inner>,
    role: &Role,
    live: &Arc<Generation>,
    generation: &Arc<Generation>,
    size: u32,
    progress: &Progress,
) {
    let missing = size.saturating_sub(live.instances().len() as u32);
    if missing > 0
        && let Err(error) = grow(inner, role, live, missing, progress).await
    {
        progress.say(format!(
            "could not bring generation {} back to {size} instances: {error}",
            live.id
        ));
    }
    role.set_canary(None);
    let backends: Vec<_> = generation
        .instances()
        .iter()
        .map(|i| i.backend.clone())
        .collect();
    phoenix_proxy::drain(&backends, role.config().deploy.drain).await;
}
