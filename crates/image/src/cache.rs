//! Caches that make a rebake of an unchanged recipe do no work.
//!
//! - The layer cache maps a layer's key (the hash of its parent's key and of everything the
//!   step reads: its description and the sha256 of every source file) to the layer already
//!   in the store.
//! - The stat cache remembers the sha256 of source files by inode, size, mtime and ctime, as
//!   git's index does, so that proving a large tree unchanged is a walk of `stat` calls.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ImageError;
use crate::layer::LayerRecord;

/// What identifies a file's content without reading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    sha256: String,
}

/// Content hashes of source files, remembered across bakes.
#[derive(Debug, Default)]
pub(crate) struct StatCache {
    path: Option<PathBuf>,
    // Keyed by the path as text: hashing strings is far cheaper than comparing `Path`s
    // component by component, and a large tree has many thousands of entries.
    old: HashMap<String, Stamp>,
    new: HashMap<String, Stamp>,
    /// Files whose content had to be read.
    pub hashed: u64,
}

impl StatCache {
    /// A cache that remembers nothing (for trees that exist only during one bake).
    pub(crate) fn none() -> Self {
        StatCache::default()
    }

    /// Loads the cache kept at `path` (empty when missing or unreadable: it is only a cache).
    pub(crate) fn load(path: PathBuf) -> Self {
        let old = fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        StatCache {
            path: Some(path),
            old,
            ..StatCache::default()
        }
    }

    /// The `sha256:` of `path`'s content, read only when its stat changed.
    pub(crate) fn sha256(
        &mut self,
        path: &Path,
        meta: &fs::Metadata,
    ) -> Result<String, ImageError> {
        let stamp = |sha256: String| Stamp {
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            sha256,
        };
        let key = path.to_string_lossy();
        if let Some(known) = self.old.get(key.as_ref())
            && *known == stamp(known.sha256.clone())
        {
            self.new.insert(key.into_owned(), known.clone());
            return Ok(known.sha256.clone());
        }
        let sha256 = crate::files::sha256_file(path)?;
        self.hashed += 1;
        let fresh = stamp(sha256.clone());
        // A file changed within the last seconds could change again within the same mtime
        // tick without its stamp changing ("racy git"): hash it again next time.
        if !recent(fresh.mtime_ns) && !recent(fresh.ctime_ns) {
            self.new.insert(key.into_owned(), fresh);
        }
        Ok(sha256)
    }

    /// Writes what this bake saw, when it differs from what was loaded.
    pub(crate) fn save(self) {
        let Some(path) = self.path else { return };
        if self.new != self.old
            && let Ok(bytes) = serde_json::to_vec(&self.new)
        {
            let _ = crate::store::write_atomic(&path, &bytes);
        }
    }
}

fn recent(ns: i128) -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    now - ns < 2_000_000_000
}

/// The layer cache under `STORE/cache/layers`.
#[derive(Debug, Clone)]
pub(crate) struct LayerCache {
    dir: PathBuf,
}

impl LayerCache {
    pub(crate) fn new(dir: PathBuf) -> Self {
        LayerCache { dir }
    }

    pub(crate) fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key.trim_start_matches("sha256:"))
    }

    pub(crate) fn get(&self, key: &str) -> Option<LayerRecord> {
        let bytes = fs::read(self.path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub(crate) fn put(&self, key: &str, record: &LayerRecord) -> Result<(), ImageError> {
        fs::create_dir_all(&self.dir).map_err(ImageError::io("create", &self.dir))?;
        let bytes = serde_json::to_vec(record).map_err(|cause| ImageError::Json {
            what: "layer cache record",
            cause,
        })?;
        crate::store::write_atomic(&self.path(key), &bytes)
    }

    /// Forgets every record whose layer blob is not kept (after `gc`).
    pub(crate) fn retain(&self, keep: impl Fn(&LayerRecord) -> bool) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let stale = fs::read(entry.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<LayerRecord>(&b).ok())
                .is_none_or(|record| !keep(&record));
            if stale {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// The key of a layer: its parent's key, then what the step reads (serialized straight into
/// the hash: a large tree's description is never built in memory).
pub(crate) fn layer_key(parent: &str, what: &impl Serialize) -> String {
    let mut hasher = Sha256::new()
        .chain_update(parent.as_bytes())
        .chain_update([0u8]);
    serde_json::to_writer(HashWriter(&mut hasher), what).expect("keys serialize");
    format!("sha256:{}", crate::hex(&hasher.finalize()))
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
