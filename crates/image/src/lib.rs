//! Images: a recipe becomes a reproducible OCI image layout, blobs named by sha256.
//!
//! The same recipe and the same input files always give the same image digest: tar entries
//! are sorted, owners are numeric 0, mtimes are clamped to one fixed time, gzip carries no
//! name or timestamp, and every JSON document is written with sorted keys and no spaces.

mod archive;
mod bake;
mod base;
mod cache;
mod elf;
mod files;
#[doc(hidden)]
pub mod fuzzing;
mod gzip;
mod hashing;
mod layer;
mod oci;
mod recipe;
mod run;
mod store;
mod unpack;

pub use bake::{BakeOptions, BakedImage, Progress, StepReport};
pub use files::{Change, Drift, FileEntry, FileKind, FileManifest};
pub use oci::{
    ConfigDocument, ImageConfig, Manifest, parse_rfc3339_ms, rfc3339, rfc3339_ms, wire_time,
};
pub use recipe::{Base, Command, CopyStep, DebianBase, Recipe, RunStep, Step, check_tag};
pub use store::{GcReport, ImageRef, ImageStore};
pub use unpack::{Limits, RootLayout};

use std::path::PathBuf;

/// Everything that can go wrong while baking, storing or unpacking an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("source {path} does not exist (paths are relative to {context})")]
    MissingSource { path: PathBuf, context: PathBuf },
    #[error("copy source {path} escapes the build context {context}: copy only files inside it")]
    Escapes { path: String, context: PathBuf },
    #[error("run step `{command}` failed ({status}); its last output:\n{output}")]
    RunFailed {
        command: String,
        status: String,
        output: String,
    },
    #[error(
        "run step `{command}` was killed after its timeout of {limit} (set `timeout` on the step to allow more); its last output:\n{output}"
    )]
    RunTimedOut {
        command: String,
        limit: String,
        output: String,
    },
    #[error("{path} is not an OCI image layout or archive Phoenix can read: {why}")]
    NotOci { path: PathBuf, why: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("layer {layer}: entry {entry:?} {why}; the archive is refused")]
    UnsafeEntry {
        layer: String,
        entry: String,
        why: &'static str,
    },
    #[error("layer {layer} expands past the limit of {limit} bytes; the archive is refused")]
    TooLarge { layer: String, limit: u64 },
    #[error("invalid image path {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("the image has no entrypoint or cmd: add `entrypoint = [\"/bin/app\"]` to the recipe")]
    NoEntrypoint,
    #[error("image {0} is not in the store (bake it first)")]
    NotFound(String),
    #[error("blob {digest} is corrupt: its content hashes to {actual}")]
    Corrupt { digest: String, actual: String },
    #[error("malformed {what} in image store: {cause}")]
    Json {
        what: &'static str,
        cause: serde_json::Error,
    },
    #[error("{action} {path}: {cause}")]
    Io {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
}

impl ImageError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |cause| ImageError::Io {
            action,
            path,
            cause,
        }
    }
}

/// Lower-case hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `sha256:` followed by the hex digest of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex(&sha2::Sha256::digest(bytes)))
}

/// `Corrupt` unless content whose digest is `actual` was expected to have `digest`.
pub(crate) fn expect_digest(digest: &str, actual: String) -> Result<(), ImageError> {
    if actual == digest {
        Ok(())
    } else {
        Err(ImageError::Corrupt {
            digest: digest.into(),
            actual,
        })
    }
}

/// The short form used in listings: the first 12 hex digits.
pub fn short_digest(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}
