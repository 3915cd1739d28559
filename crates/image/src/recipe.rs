//! The `[image.NAME]` recipe of a fleet file.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// How to build one image. Unknown keys are rejected so that typos never pass silently.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The base: only `"scratch"` (an empty root) in this version.
    pub from: From,
    /// Files and directories copied into the image, in order.
    #[serde(default)]
    pub copy: Vec<CopyStep>,
    /// Environment of every instance started from the image.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The program to run, as an absolute path inside the image, then its arguments.
    pub entrypoint: Vec<String>,
    /// Extra arguments appended to the entrypoint.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// Working directory inside the image (default `/`).
    pub workdir: Option<String>,
    /// A goss-format check file (relative to the fleet file) that an instance of the image must
    /// pass before the image can be deployed. Not part of the image: changing it rebakes nothing.
    pub checks: Option<String>,
}

/// The base an image starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum From {
    Scratch,
}

impl<'de> Deserialize<'de> for From {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let base = String::deserialize(deserializer)?;
        match base.as_str() {
            "scratch" => Ok(From::Scratch),
            other => Err(serde::de::Error::custom(format!(
                "unsupported base {other:?}: this version bakes `from = \"scratch\"` only"
            ))),
        }
    }
}

/// One `copy` step: `src` on the baking machine (relative to the fleet file) to `dst` in the image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyStep {
    pub src: String,
    pub dst: String,
    /// Permission bits for copied files (e.g. `0o755`); by default 0755 for executables, 0644 otherwise.
    pub mode: Option<u32>,
}
