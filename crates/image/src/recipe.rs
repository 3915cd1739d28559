//! The `[image.NAME]` recipe of a fleet file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How to build one image: a base, then file-changing steps (each one layer), then the run
/// configuration. Unknown keys are rejected so that typos never pass silently.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The base: `"scratch"`, an image name or digest, or a table (`image`, `dir`, `tar`,
    /// `oci`, `debian`).
    #[serde(default)]
    pub from: Base,
    /// The build context: the directory that `copy` sources are read from and never leave
    /// (relative to the fleet file; default its directory).
    pub context: Option<String>,
    /// Layers after the base, in order: copies and commands.
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Copies after `steps`, each one layer (the short form for recipes without commands).
    #[serde(default)]
    pub copy: Vec<CopyStep>,
    /// Environment of every instance and of `run` steps, added to the base's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The program to run, as an absolute path inside the image, then its arguments.
    /// Inherited from the base when not given.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Arguments appended to the entrypoint. Inherited from the base when not given.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// Working directory inside the image (default: the base's, else `/`).
    pub workdir: Option<String>,
    /// `UID[:GID]` or a name the instance runs as (default: the base's).
    pub user: Option<String>,
    /// OCI labels, added to the base's.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Ports the image serves on, e.g. `["8080/tcp", "53/udp"]` (`/tcp` when omitted).
    #[serde(default)]
    pub expose: Vec<String>,
    /// A goss-format check file (relative to the fleet file) that an instance of the image must
    /// pass before the image can be deployed. Not part of the image: changing it rebakes nothing.
    pub checks: Option<String>,
    /// The tag each bake of the recipe gets (`hello:v2`); not part of the image either: the
    /// same content under a new tag is the same digest.
    pub tag: Option<String>,
}

/// An image tag as OCI distribution writes them: 1 to 128 of `A-Z a-z 0-9 _ . -`, not starting
/// with `.` or `-`.
pub fn check_tag(tag: &str) -> Result<(), String> {
    let first_ok = tag
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    let rest_ok = tag
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok && tag.len() <= 128 {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?}: 1 to 128 of A-Z a-z 0-9 _ . - (not starting with . or -)"
        ))
    }
}

impl Recipe {
    /// Every layer step in order: `steps`, then `copy`.
    pub fn layer_steps(&self) -> impl Iterator<Item = Step> + '_ {
        self.steps
            .iter()
            .cloned()
            .chain(self.copy.iter().cloned().map(Step::Copy))
    }
}

/// The base an image starts from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Base {
    /// An empty root.
    #[default]
    Scratch,
    /// A Phoenix image by name (the newest bake of that recipe) or by digest.
    Image(String),
    /// A root directory on the baking machine, taken with its modes and numeric owners.
    Dir(String),
    /// A root file system as a tar file (gzip-compressed or not).
    Tar(String),
    /// An OCI image layout directory or archive (`skopeo copy … oci-archive:`, `podman save
    /// --format oci-archive`), and which image in it (`ref`, when it holds several).
    Oci {
        path: String,
        reference: Option<String>,
    },
    /// A Debian root built by `mmdebstrap` from packages.
    Debian(DebianBase),
}

/// `from = { debian = "bookworm", packages = [...] }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebianBase {
    /// The suite, e.g. `bookworm`.
    pub debian: String,
    /// Packages installed on top of the variant's set.
    #[serde(default)]
    pub packages: Vec<String>,
    /// mmdebstrap's `--variant` (default `apt`: essential packages and apt).
    #[serde(default = "DebianBase::default_variant")]
    pub variant: String,
    /// The mirror (default: mmdebstrap's, from the host's apt sources when they name one).
    pub mirror: Option<String>,
}

impl DebianBase {
    fn default_variant() -> String {
        "apt".into()
    }
}

impl<'de> Deserialize<'de> for Base {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Table(BTreeMap<String, toml_like::Value>),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Name(name) if name == "scratch" => Ok(Base::Scratch),
            Raw::Name(name) if name.is_empty() => Err(serde::de::Error::custom(
                "`from` is empty: use \"scratch\", an image name or a table",
            )),
            Raw::Name(name) => Ok(Base::Image(name)),
            Raw::Table(table) => Base::from_table(table).map_err(serde::de::Error::custom),
        }
    }
}

/// A minimal value type for the `from` table, so that the recipe does not depend on `toml`.
mod toml_like {
    use serde::Deserialize;

    #[derive(Debug, Clone, Deserialize)]
    #[serde(untagged)]
    pub enum Value {
        Text(String),
        List(Vec<String>),
    }
}

impl Base {
    fn from_table(table: BTreeMap<String, toml_like::Value>) -> Result<Base, String> {
        use toml_like::Value;
        const KINDS: &str = "one of `image`, `dir`, `tar`, `oci` or `debian`";
        let text = |key: &str| match table.get(key) {
            Some(Value::Text(s)) => Ok(Some(s.clone())),
            Some(Value::List(_)) => Err(format!("`from.{key}` must be a string")),
            None => Ok(None),
        };
        let allow = |allowed: &[&str]| match table.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(key) => Err(format!(
                "unknown key `from.{key}`: expected {}",
                allowed
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None => Ok(()),
        };
        let kinds: Vec<&String> = table
            .keys()
            .filter(|k| ["image", "dir", "tar", "oci", "debian"].contains(&k.as_str()))
            .collect();
        match kinds.as_slice() {
            [] => Err(format!("`from` table needs {KINDS}")),
            [kind] => match kind.as_str() {
                "image" => allow(&["image"]).and(Ok(Base::Image(text("image")?.unwrap()))),
                "dir" => allow(&["dir"]).and(Ok(Base::Dir(text("dir")?.unwrap()))),
                "tar" => allow(&["tar"]).and(Ok(Base::Tar(text("tar")?.unwrap()))),
                "oci" => allow(&["oci", "ref"]).and(Ok(Base::Oci {
                    path: text("oci")?.unwrap(),
                    reference: text("ref")?,
                })),
                _ => {
                    allow(&["debian", "packages", "variant", "mirror"])?;
                    let packages = match table.get("packages") {
                        Some(Value::List(list)) => list.clone(),
                        Some(Value::Text(_)) => {
                            return Err("`from.packages` must be a list of strings".into());
                        }
                        None => Vec::new(),
                    };
                    Ok(Base::Debian(DebianBase {
                        debian: text("debian")?.unwrap(),
                        packages,
                        variant: text("variant")?.unwrap_or_else(DebianBase::default_variant),
                        mirror: text("mirror")?,
                    }))
                }
            },
            _ => Err(format!("`from` names two bases: give {KINDS}")),
        }
    }
}

/// One layer step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Step {
    Copy(CopyStep),
    Run(RunStep),
}

impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            src: Option<String>,
            dst: Option<String>,
            mode: Option<u32>,
            owner: Option<String>,
            libraries: Option<bool>,
            run: Option<Command>,
            network: Option<bool>,
            timeout: Option<String>,
        }
        let raw = Raw::deserialize(deserializer)?;
        let fail = |why: &str| Err(serde::de::Error::custom(why));
        match (raw.src, raw.run) {
            (Some(src), None) => {
                if raw.network.is_some() || raw.timeout.is_some() {
                    return fail("`network` and `timeout` belong to a `run` step, not a copy");
                }
                let Some(dst) = raw.dst else {
                    return fail("a copy step needs `dst`");
                };
                Ok(Step::Copy(CopyStep {
                    src,
                    dst,
                    mode: raw.mode,
                    owner: raw.owner,
                    libraries: raw.libraries.unwrap_or(false),
                }))
            }
            (None, Some(run)) => {
                if raw.dst.is_some()
                    || raw.mode.is_some()
                    || raw.owner.is_some()
                    || raw.libraries.is_some()
                {
                    return fail(
                        "`dst`, `mode`, `owner` and `libraries` belong to a copy step, not `run`",
                    );
                }
                let timeout = match raw.timeout.as_deref().map(parse_timeout) {
                    Some(Ok(timeout)) => Some(timeout),
                    Some(Err(why)) => return fail(&why),
                    None => None,
                };
                Ok(Step::Run(RunStep {
                    run,
                    network: raw.network.unwrap_or(false),
                    timeout,
                }))
            }
            (Some(_), Some(_)) => fail("a step is either a copy (`src`, `dst`) or a `run`"),
            (None, None) => fail("a step needs `src` and `dst` (a copy) or `run` (a command)"),
        }
    }
}

/// A run step's `timeout`: a whole number and `s`, `m` or `h`, from 1s to 24h.
fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let seconds = match (digits.parse::<u64>(), &text[digits.len()..]) {
        (Ok(n), "s") => Some(n),
        (Ok(n), "m") => n.checked_mul(60),
        (Ok(n), "h") => n.checked_mul(3600),
        _ => None,
    };
    match seconds {
        Some(seconds) if (1..=86_400).contains(&seconds) => {
            Ok(std::time::Duration::from_secs(seconds))
        }
        _ => Err(format!(
            "`timeout` {text:?}: write a whole number and s, m or h, between 1s and 24h, like \"30m\""
        )),
    }
}

/// A copy: `src` on the baking machine (relative to the fleet file) to `dst` in the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyStep {
    pub src: String,
    pub dst: String,
    /// Permission bits for copied files (e.g. `0o755`); by default 0755 for executables, 0644 otherwise.
    pub mode: Option<u32>,
    /// Numeric `UID:GID` (or `UID`) of everything copied; default `0:0`.
    pub owner: Option<String>,
    /// Also copy what copied programs need to start, from this host: their ELF interpreter
    /// and shared libraries, at their paths (a dynamically linked binary on a `scratch` base).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub libraries: bool,
}

/// A command run at bake time inside the image's root, in its own mount, PID and network
/// namespaces. What it changes becomes the layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunStep {
    pub run: Command,
    /// Give the command the host's network (default: none but its own loopback).
    pub network: bool,
    /// How long the command may run before it is killed and the bake fails (`timeout =
    /// "10m"`; default [`RunStep::DEFAULT_TIMEOUT`]). Not part of the layer's cache key.
    #[serde(skip)]
    pub timeout: Option<std::time::Duration>,
}

impl RunStep {
    /// Thirty minutes: an `apt-get install` of a large package set, with room to spare.
    pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

    /// The limit this step runs under.
    pub fn time_limit(&self) -> std::time::Duration {
        self.timeout.unwrap_or(Self::DEFAULT_TIMEOUT)
    }
}

/// A command: a shell line (`/bin/sh -c`) or an argument vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Command {
    Shell(String),
    Exec(Vec<String>),
}

impl Command {
    /// The argument vector to execute.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Command::Shell(line) => vec!["/bin/sh".into(), "-c".into(), line.clone()],
            Command::Exec(argv) => argv.clone(),
        }
    }
}

/// Parses a numeric `UID[:GID]`.
pub(crate) fn numeric_owner(owner: &str) -> Option<(u32, u32)> {
    match owner.split_once(':') {
        Some((uid, gid)) => Some((uid.parse().ok()?, gid.parse().ok()?)),
        None => {
            let id = owner.parse().ok()?;
            Some((id, id))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Wrap {
        image: Recipe,
    }

    fn parse(text: &str) -> Result<Recipe, String> {
        serde_json::from_str::<Wrap>(text)
            .map(|w| w.image)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn bases_parse_from_names_and_tables() {
        let base = |from: &str| parse(&format!(r#"{{"image":{{"from":{from}}}}}"#)).map(|r| r.from);
        assert_eq!(base(r#""scratch""#).unwrap(), Base::Scratch);
        assert_eq!(base(r#""web""#).unwrap(), Base::Image("web".into()));
        assert_eq!(base(r#"{"dir":"root"}"#).unwrap(), Base::Dir("root".into()));
        assert_eq!(
            base(r#"{"oci":"a.tar","ref":"v1"}"#).unwrap(),
            Base::Oci {
                path: "a.tar".into(),
                reference: Some("v1".into())
            }
        );
        let debian = base(r#"{"debian":"bookworm","packages":["nginx"]}"#).unwrap();
        assert_eq!(
            debian,
            Base::Debian(DebianBase {
                debian: "bookworm".into(),
                packages: vec!["nginx".into()],
                variant: "apt".into(),
                mirror: None
            })
        );
        let two = base(r#"{"dir":"a","tar":"b"}"#).unwrap_err();
        assert!(two.contains("names two bases"), "{two}");
        let unknown = base(r#"{"tar":"b","ref":"x"}"#).unwrap_err();
        assert!(unknown.contains("unknown key `from.ref`"), "{unknown}");
    }

    #[test]
    fn steps_are_copies_or_commands() {
        let recipe = parse(
            r#"{"image":{"steps":[{"run":"apt-get update","network":true},
                {"src":"app","dst":"/bin/app","owner":"1000:1000"},
                {"run":["/bin/true"]}]}}"#,
        )
        .unwrap();
        assert_eq!(recipe.steps.len(), 3);
        assert!(matches!(&recipe.steps[0], Step::Run(r) if r.network));
        assert!(
            matches!(&recipe.steps[1], Step::Copy(c) if c.owner.as_deref() == Some("1000:1000"))
        );
        let mixed = parse(r#"{"image":{"steps":[{"src":"a","dst":"/a","run":"x"}]}}"#);
        assert!(mixed.unwrap_err().contains("either a copy"));
        let network = parse(r#"{"image":{"steps":[{"src":"a","dst":"/a","network":true}]}}"#);
        assert!(network.unwrap_err().contains("belong to a `run` step"));
    }

    #[test]
    fn owners_are_numeric() {
        assert_eq!(numeric_owner("1000:100"), Some((1000, 100)));
        assert_eq!(numeric_owner("7"), Some((7, 7)));
        assert_eq!(numeric_owner("www-data"), None);
    }
}
