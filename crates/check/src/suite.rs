//! Loading a goss file: templates, YAML, the schema of every resource type, and `gossfile`
//! includes (relative to the including file, globs allowed, loops detected).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use crate::SuiteError;
use crate::kind::{Kind, Role};
use crate::matcher::{Invalid, Matcher};
use crate::template::{self, TemplateData};
use crate::yaml::{self, Node, Value};

/// Every check of a goss file and the files it includes.
#[derive(Debug, Clone)]
pub struct Suite {
    pub checks: Vec<Check>,
    /// Every file read, in order.
    pub files: Vec<PathBuf>,
    /// sha256 of the files as written (before templates), to tell which checks a verification
    /// ran and whether they changed since (see [`digest_of`]).
    pub digest: String,
    /// What was skipped, `FILE:LINE:COLUMN: why` (a top-level key that is no resource type).
    pub warnings: Vec<String>,
}

/// One resource to check (`file: /etc/passwd: {...}`).
#[derive(Debug, Clone)]
pub struct Check {
    pub kind: Kind,
    /// The resource's key: a path, a name, a URL, `tcp:22`.
    pub id: String,
    pub title: String,
    pub meta: Json,
    pub skip: bool,
    pub attributes: Vec<Attribute>,
    /// Settings that are not checked (`timeout`, `exec`, `request-headers`, `content`).
    pub options: BTreeMap<&'static str, Json>,
    pub file: Arc<Path>,
    pub line: usize,
}

/// One checked attribute and its expectation.
#[derive(Debug, Clone)]
pub struct Attribute {
    pub name: &'static str,
    pub matcher: Matcher,
    /// The expectation as written, for reports.
    pub expected: Json,
}

impl Check {
    /// What is checked: the setting that names it (`name`, `path`, `url`…) when given, else
    /// the resource's key.
    pub fn target(&self) -> &str {
        self.kind
            .target_setting()
            .and_then(|setting| self.option_str(setting))
            .unwrap_or(&self.id)
    }

    pub fn option_str(&self, name: &str) -> Option<&str> {
        self.options.get(name).and_then(Json::as_str)
    }

    pub fn option_bool(&self, name: &str) -> bool {
        self.options
            .get(name)
            .and_then(Json::as_bool)
            .unwrap_or(false)
    }

    /// A timeout option in milliseconds, or the default (also for `timeout: 0`, as goss).
    pub fn timeout_ms(&self, default: u64) -> u64 {
        self.options
            .get("timeout")
            .and_then(Json::as_u64)
            .filter(|&ms| ms > 0)
            .unwrap_or(default)
    }
}

impl Check {
    /// How many times to observe the check while it fails (`retry_count` + 1), and the pause
    /// between tries (`retry_delay`: milliseconds or a Go duration; 0 or unset: 1 s), as goss.
    pub fn retries(&self) -> (u32, Duration) {
        let count = self.options.get("retry_count").and_then(Json::as_u64);
        let attempts = count.map_or(1, |n| n.min(u32::MAX as u64 - 1) as u32 + 1);
        let delay = match self.options.get("retry_delay") {
            Some(Json::Number(ms)) => ms
                .as_f64()
                .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok()),
            Some(Json::String(text)) => crate::go_duration(text.trim()).ok(),
            _ => None,
        };
        let delay = delay
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(1));
        (attempts, delay)
    }
}

/// The digest [`Suite::digest`] would have for `files` as they are now; `None` when one is gone.
pub fn digest_of(files: &[PathBuf]) -> Option<String> {
    let mut hasher = Sha256::new();
    for file in files {
        let canonical = std::fs::canonicalize(file).ok()?;
        hash_file(
            &mut hasher,
            &canonical,
            &std::fs::read_to_string(file).ok()?,
        );
    }
    Some(format!("sha256:{:x}", hasher.finalize()))
}

fn hash_file(hasher: &mut Sha256, canonical: &Path, text: &str) {
    hasher.update(canonical.to_string_lossy().as_bytes());
    hasher.update([0]);
    hasher.update(text.as_bytes());
    hasher.update([0]);
}

/// Reads a `--vars` file (YAML or JSON).
pub fn load_vars(path: &Path) -> Result<Json, SuiteError> {
    parse_vars(path, &read(path)?)
}

/// Variables given as YAML or JSON text (`--vars-inline`); `path` names them in errors.
pub fn parse_vars(path: &Path, text: &str) -> Result<Json, SuiteError> {
    let node = yaml::parse(text).map_err(|e| invalid(path, e.line, e.column, e.message))?;
    Ok(node.to_json())
}

/// Lays `later` over `vars`: maps merge key by key (deeply), anything else is replaced.
pub fn merge_vars(vars: &mut Json, later: Json) {
    match (vars, later) {
        (Json::Object(into), Json::Object(from)) => {
            for (key, value) in from {
                merge_vars(into.entry(key).or_insert(Json::Null), value);
            }
        }
        (slot, later) => *slot = later,
    }
}

/// Loads `path` and everything it includes.
pub fn load(path: &Path, data: &TemplateData) -> Result<Suite, SuiteError> {
    let mut loader = Loader::new(data);
    loader.file(path, None)?;
    let mut suite = loader.suite;
    // As goss: a suite that checks nothing is an error, so an empty or mistyped file can
    // never pass a deploy gate.
    if suite.checks.is_empty() {
        return Err(invalid(
            path,
            1,
            1,
            format!("found 0 tests, source: {}", path.display()),
        ));
    }
    suite.digest = format!("sha256:{:x}", loader.hasher.finalize());
    Ok(suite)
}

/// Parses `text` as a goss file named `path` without reading anything: for the fuzzer.
/// Includes are followed only if `path`'s directory exists.
#[doc(hidden)]
pub fn parse_text(path: &Path, text: &str, data: &TemplateData) -> Result<Vec<Check>, SuiteError> {
    let mut loader = Loader::new(data);
    let text = template::render(text, data).map_err(|e| invalid(path, e.line, 1, e.message))?;
    let doc = yaml::parse(&text).map_err(|e| invalid(path, e.line, e.column, e.message))?;
    loader.document(&Arc::from(path), &doc)?;
    Ok(loader.suite.checks)
}

struct Loader<'a> {
    data: &'a TemplateData,
    suite: Suite,
    /// The include chain, to detect loops.
    stack: Vec<PathBuf>,
    hasher: Sha256,
    /// Where each resource is in `suite.checks`: a later file's check replaces an earlier
    /// one in constant time, so a long suite loads in linear time.
    index: std::collections::HashMap<(Kind, String), usize>,
}

impl<'a> Loader<'a> {
    fn new(data: &'a TemplateData) -> Loader<'a> {
        Loader {
            data,
            suite: Suite {
                checks: Vec::new(),
                files: Vec::new(),
                digest: String::new(),
                warnings: Vec::new(),
            },
            stack: Vec::new(),
            hasher: Sha256::new(),
            index: std::collections::HashMap::new(),
        }
    }

    fn file(&mut self, path: &Path, included_at: Option<(&Path, &Node)>) -> Result<(), SuiteError> {
        let canonical = std::fs::canonicalize(path).map_err(|cause| match included_at {
            Some((from, node)) => invalid(
                from,
                node.line,
                node.column,
                format!("cannot include {}: {cause}", path.display()),
            ),
            None => SuiteError::Read {
                path: path.into(),
                cause,
            },
        })?;
        if let Some(start) = self.stack.iter().position(|p| *p == canonical) {
            let (from, node) = included_at.expect("the first file cannot loop");
            let chain: Vec<String> = self.stack[start..]
                .iter()
                .chain([&canonical])
                .map(|p| p.display().to_string())
                .collect();
            return Err(invalid(
                from,
                node.line,
                node.column,
                format!("include loop: {}", chain.join(" -> ")),
            ));
        }
        let raw = read(path)?;
        let text =
            template::render(&raw, self.data).map_err(|e| invalid(path, e.line, 1, e.message))?;
        hash_file(&mut self.hasher, &canonical, &raw);
        self.suite.files.push(path.to_path_buf());
        let doc = yaml::parse(&text).map_err(|e| invalid(path, e.line, e.column, e.message))?;
        self.stack.push(canonical);
        let file: Arc<Path> = Arc::from(path);
        let result = self.document(&file, &doc);
        self.stack.pop();
        result
    }

    fn document(&mut self, file: &Arc<Path>, doc: &Node) -> Result<(), SuiteError> {
        let at = |e: Invalid| invalid(file, e.line, e.column, e.message);
        // An empty document (an empty include, a file of comments) checks nothing, as in goss;
        // `load` still refuses a suite with no check at all.
        if let Value::Null = doc.value {
            return Ok(());
        }
        let Value::Map(sections) = &doc.value else {
            return Err(at(Invalid::at(
                doc,
                format!("a goss file is a map of resource types, not {}", doc.kind()),
            )));
        };
        for (key, resources) in sections {
            let name = key.as_text().unwrap_or_default();
            let entries = entries_of(resources).map_err(at)?;
            if name == "gossfile" {
                for (include, settings) in entries {
                    self.include(file, include, settings)?;
                }
                continue;
            }
            // goss ignores a key that is no resource type; it is skipped here too, said aloud.
            let Some(kind) = Kind::from_key(&name) else {
                self.suite.warnings.push(format!(
                    "{}:{}:{}: unknown resource type {name:?} skipped, as goss skips it; known: {}",
                    file.display(),
                    key.line,
                    key.column,
                    Kind::names().join(", ")
                ));
                continue;
            };
            for (id, body) in entries {
                let check = parse_check(kind, id, body, file).map_err(at)?;
                let at = self.suite.checks.len();
                match self.index.entry((kind, check.id.clone())) {
                    std::collections::hash_map::Entry::Occupied(earlier) => {
                        self.suite.checks[*earlier.get()] = check;
                    }
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(at);
                        self.suite.checks.push(check);
                    }
                }
            }
        }
        Ok(())
    }

    fn include(&mut self, from: &Arc<Path>, key: &Node, settings: &Node) -> Result<(), SuiteError> {
        let at = |e: Invalid| invalid(from, e.line, e.column, e.message);
        let mut skip = false;
        // goss's `file:` names the file when the key is only a label.
        let mut pattern = key.as_text().unwrap_or_default();
        let mut named_at = key;
        for (name, value) in entries_of(settings).map_err(at)? {
            match name.as_text().as_deref() {
                Some("skip") => skip = boolean(value).map_err(at)?,
                Some("file") => {
                    pattern = value.as_text().filter(|f| !f.is_empty()).ok_or_else(|| {
                        at(Invalid::at(
                            value,
                            "`file` is the path of the file to include",
                        ))
                    })?;
                    named_at = value;
                }
                other => {
                    return Err(at(Invalid::at(
                        name,
                        format!(
                            "unknown gossfile attribute {:?}; known: file, skip",
                            other.unwrap_or_default()
                        ),
                    )));
                }
            }
        }
        if skip {
            return Ok(());
        }
        let key = named_at;
        for path in expand(&parent(from).join(&pattern)).map_err(|m| at(Invalid::at(key, m)))? {
            self.file(&path, Some((from, key)))?;
        }
        Ok(())
    }
}

fn parse_check(kind: Kind, id: &Node, body: &Node, file: &Arc<Path>) -> Result<Check, Invalid> {
    let mut check = Check {
        kind,
        id: id.as_text().unwrap_or_default(),
        title: String::new(),
        meta: Json::Null,
        skip: false,
        attributes: Vec::new(),
        options: BTreeMap::new(),
        file: file.clone(),
        line: id.line,
    };
    for (key, value) in entries_of(body)? {
        let name = key.as_text().unwrap_or_default();
        match name.as_str() {
            "skip" => check.skip = boolean(value)?,
            "title" => check.title = value.as_text().unwrap_or_default(),
            "meta" => check.meta = value.to_json(),
            _ => match kind.role(&name) {
                Some((name, Role::Checked(shape))) => check.attributes.push(Attribute {
                    name,
                    matcher: Matcher::parse(value, shape)?,
                    expected: value.to_json(),
                }),
                Some((name, Role::Setting(setting))) => {
                    setting.validate(value)?;
                    check.options.insert(name, value.to_json());
                }
                None => {
                    return Err(Invalid::at(
                        key,
                        format!(
                            "unknown attribute {name:?} of {} {:?}; known: {}",
                            kind.name(),
                            check.id,
                            kind.attribute_names().join(", ")
                        ),
                    ));
                }
            },
        }
    }
    // The key, or the setting that names what is checked when the key is only a label
    // (`http: {api: {url: http://...}}`).
    kind.validate_id(check.target())
        .map_err(|m| Invalid::at(id, m))?;
    kind.validate(&check).map_err(|m| Invalid::at(id, m))?;
    Ok(check)
}

/// The entries of a map; null (`key:` with nothing after it) is an empty map.
fn entries_of(node: &Node) -> Result<&[(Node, Node)], Invalid> {
    match &node.value {
        Value::Map(entries) => Ok(entries),
        Value::Null => Ok(&[]),
        _ => Err(Invalid::at(
            node,
            format!("expected a map, found {}", node.kind()),
        )),
    }
}

fn boolean(node: &Node) -> Result<bool, Invalid> {
    match node.value {
        Value::Bool(b) => Ok(b),
        _ => Err(Invalid::at(
            node,
            format!("expected true or false, found {}", node.kind()),
        )),
    }
}

/// A path, or the sorted matches of a glob (`*`, `?`) in any of its components, as Go's
/// `filepath.Glob` (`section_*/*.yml`); a pattern that matches nothing gives nothing.
fn expand(path: &Path) -> Result<Vec<PathBuf>, String> {
    if !path.to_string_lossy().contains(['*', '?']) {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut found = vec![PathBuf::new()];
    for component in path.components() {
        let name = component.as_os_str().to_string_lossy();
        if !name.contains(['*', '?']) {
            found.iter_mut().for_each(|p| p.push(component));
            continue;
        }
        let mut next = Vec::new();
        for dir in &found {
            let listed = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            let Ok(listing) = std::fs::read_dir(listed) else {
                continue;
            };
            let mut matches: Vec<PathBuf> = listing
                .filter_map(Result::ok)
                .filter(|entry| glob(&name, &entry.file_name().to_string_lossy()))
                .map(|entry| dir.join(entry.file_name()))
                .collect();
            matches.sort();
            next.extend(matches);
        }
        found = next;
    }
    Ok(found)
}

/// The directory of `path`; `.` for a bare file name (whose parent is the empty path).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// `*` and `?` over a whole name.
pub(crate) fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            (pi, ni) = (pi + 1, ni + 1);
        } else if pi < p.len() && p[pi] == '*' {
            (star, mark, pi) = (Some(pi), ni, pi + 1);
        } else if let Some(s) = star {
            (pi, mark) = (s + 1, mark + 1);
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn read(path: &Path) -> Result<String, SuiteError> {
    std::fs::read_to_string(path).map_err(|cause| SuiteError::Read {
        path: path.into(),
        cause,
    })
}

fn invalid(path: &Path, line: usize, column: usize, message: String) -> SuiteError {
    SuiteError::Invalid {
        path: path.into(),
        line,
        column,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*.yaml", "a.yaml"));
        assert!(glob("goss_?.yml", "goss_1.yml"));
        assert!(!glob("*.yaml", "a.yml"));
        assert!(glob("a*b*c", "aXXbYc"));
        assert!(!glob("a*b", "ab/c"));
    }
}
