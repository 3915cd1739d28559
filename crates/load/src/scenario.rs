//! The scenario file: weighted requests, ramp stages and thresholds, in TOML.
//!
//! ```toml
//! connections = 32
//! timeout = "5s"
//!
//! [[stage]]
//! duration = "10s"
//! target = 100          # requests a second at the end of the stage, ramped from the last
//!
//! [[request]]
//! name = "order"
//! weight = 1
//! method = "POST"
//! path = "/orders"
//! headers = { "Content-Type" = "application/json" }
//! body = '{"item": 1}'
//!
//! [thresholds]
//! http_req_failed = ["rate<0.01"]
//! http_req_duration = ["p(99)<250"]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;
use toml::Spanned;

use crate::Threshold;

/// The most requests one run may schedule (each due time is kept in memory).
const MAX_REQUESTS: f64 = 10_000_000.0;
const MAX_FILE: u64 = 1 << 20;
const MAX_BODY: u64 = 16 << 20;
const MAX_STAGE: Duration = Duration::from_secs(24 * 3600);

/// A checked scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// `http://HOST:PORT` to send to, when the file names it (the command line's wins).
    pub url: Option<String>,
    /// Keep-alive connections: the most requests in flight at once.
    pub connections: usize,
    /// A request without a complete answer by then fails.
    pub timeout: Duration,
    /// Requests a second when the first stage starts.
    pub start_rate: f64,
    pub stages: Vec<Stage>,
    pub requests: Vec<RequestSpec>,
    pub thresholds: Vec<Threshold>,
}

/// The rate ramps linearly to `target` requests a second over `duration`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub duration: Duration,
    pub target: f64,
}

/// One kind of request, sent `weight` times in every sum-of-weights.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub name: String,
    pub weight: u32,
    pub method: Method,
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// Statuses that count as success; empty: any status below 400.
    pub expect_status: Vec<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read load scenario {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    url: Option<Spanned<String>>,
    connections: Option<Spanned<i64>>,
    timeout: Option<Spanned<String>>,
    start_rate: Option<Spanned<f64>>,
    #[serde(default, rename = "stage")]
    stages: Vec<RawStage>,
    #[serde(default, rename = "request")]
    requests: Vec<RawRequest>,
    #[serde(default)]
    thresholds: BTreeMap<Spanned<String>, Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    duration: Spanned<String>,
    target: Spanned<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    name: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
    method: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    #[serde(default)]
    headers: BTreeMap<Spanned<String>, Spanned<String>>,
    body: Option<Spanned<String>>,
    body_file: Option<Spanned<String>>,
    expect_status: Option<Spanned<Vec<u16>>>,
}

impl Scenario {
    /// One `GET path` at a constant `rps` for `duration` (`phoenix load URL --rps N`).
    pub fn constant(rps: f64, duration: Duration, path: &str) -> Scenario {
        Scenario {
            url: None,
            connections: 64,
            timeout: Duration::from_secs(10),
            start_rate: rps,
            stages: vec![Stage {
                duration,
                target: rps,
            }],
            requests: vec![RequestSpec::get(path)],
            thresholds: Vec::new(),
        }
    }

    /// Reads and checks a scenario file; `body_file`s are read relative to it.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let read = |reason: String| ScenarioError::Read {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = read_bounded(path, MAX_FILE).map_err(read)?;
        let text = String::from_utf8(bytes).map_err(|_| read("it is not UTF-8 text".into()))?;
        Scenario::parse(path, &text)
    }

    /// Checks `text` as the scenario file at `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Scenario, ScenarioError> {
        let at = |span: std::ops::Range<usize>, message: String| {
            let (line, column) = line_and_column(text, span.start);
            ScenarioError::Invalid {
                path: path.to_path_buf(),
                line,
                column,
                message,
            }
        };
        let raw: RawScenario = toml::from_str(text)
            .map_err(|e| at(e.span().unwrap_or(0..0), e.message().to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut scenario = Scenario::constant(0.0, Duration::ZERO, "/");
        if let Some(url) = raw.url {
            if !url.get_ref().starts_with("http://") {
                return Err(at(
                    url.span(),
                    format!("`url` {:?}: write http://HOST:PORT", url.get_ref()),
                ));
            }
            scenario.url = Some(url.into_inner());
        }
        if let Some(connections) = raw.connections {
            let n = *connections.get_ref();
            if !(1..=10_000).contains(&n) {
                return Err(at(
                    connections.span(),
                    format!("`connections` {n}: write 1 to 10000"),
                ));
            }
            scenario.connections = n as usize;
        }
        if let Some(timeout) = raw.timeout {
            scenario.timeout = duration(timeout.get_ref())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    at(
                        timeout.span(),
                        format!("`timeout` {:?}: {DURATION_HELP}", timeout.get_ref()),
                    )
                })?;
        }
        scenario.start_rate = match raw.start_rate {
            Some(rate) => check_rate(*rate.get_ref())
                .map_err(|why| at(rate.span(), format!("`start_rate`: {why}")))?,
            None => 0.0,
        };
        scenario.stages = stages(raw.stages, &at)?;
        let total = crate::schedule::requests_due(scenario.start_rate, &scenario.stages);
        if total > MAX_REQUESTS {
            return Err(at(
                0..0,
                format!(
                    "the stages schedule {:.0} requests, more than one run's {MAX_REQUESTS}: split the scenario",
                    total
                ),
            ));
        }
        scenario.requests = raw
            .requests
            .into_iter()
            .map(|r| request(r, dir, &at))
            .collect::<Result<_, _>>()?;
        if scenario.requests.is_empty() {
            scenario.requests.push(RequestSpec::get("/"));
        }
        // In the file's order (the table's keys come sorted).
        let mut written = Vec::new();
        for (metric, expressions) in raw.thresholds {
            for expression in expressions {
                let threshold =
                    Threshold::parse(metric.get_ref(), expression.get_ref()).map_err(|e| {
                        at(
                            expression.span(),
                            format!("[thresholds] {}: {e}", metric.get_ref()),
                        )
                    })?;
                if let Some(name) = &threshold.request
                    && !scenario.requests.iter().any(|r| &r.name == name)
                {
                    return Err(at(
                        metric.span(),
                        format!(
                            "[thresholds] {:?}: no [[request]] is named {name:?}",
                            metric.get_ref()
                        ),
                    ));
                }
                written.push((expression.span().start, threshold));
            }
        }
        written.sort_by_key(|(at, _)| *at);
        scenario.thresholds = written.into_iter().map(|(_, t)| t).collect();
        Ok(scenario)
    }

    /// How many requests the stages schedule.
    pub fn scheduled(&self) -> usize {
        crate::schedule::due_count(self.start_rate, &self.stages)
    }

    /// How long the stages last.
    pub fn duration(&self) -> Duration {
        self.stages.iter().map(|s| s.duration).sum()
    }
}

impl RequestSpec {
    /// A plain `GET path`.
    pub fn get(path: &str) -> RequestSpec {
        RequestSpec {
            name: format!("GET {path}"),
            weight: 1,
            method: Method::GET,
            path: path.to_string(),
            headers: Vec::new(),
            body: Bytes::new(),
            expect_status: Vec::new(),
        }
    }
}

type At<'a> = dyn Fn(std::ops::Range<usize>, String) -> ScenarioError + 'a;

fn stages(raw: Vec<RawStage>, at: &At) -> Result<Vec<Stage>, ScenarioError> {
    if raw.is_empty() {
        return Err(at(0..0, "no [[stage]]: add one, like [[stage]] duration = \"30s\" target = 50 (requests a second)".into()));
    }
    raw.into_iter()
        .map(|stage| {
            let length = duration(stage.duration.get_ref())
                .filter(|d| !d.is_zero() && *d <= MAX_STAGE)
                .ok_or_else(|| {
                    at(
                        stage.duration.span(),
                        format!(
                            "`duration` {:?}: {DURATION_HELP}, up to 24h",
                            stage.duration.get_ref()
                        ),
                    )
                })?;
            let target = check_rate(*stage.target.get_ref())
                .map_err(|why| at(stage.target.span(), format!("`target`: {why}")))?;
            Ok(Stage {
                duration: length,
                target,
            })
        })
        .collect()
}

fn request(raw: RawRequest, dir: &Path, at: &At) -> Result<RequestSpec, ScenarioError> {
    let method = match raw.method {
        Some(method) => Method::from_bytes(method.get_ref().to_ascii_uppercase().as_bytes())
            .map_err(|_| {
                at(
                    method.span(),
                    format!("`method` {:?} is not an HTTP method", method.get_ref()),
                )
            })?,
        None => Method::GET,
    };
    let path = match raw.path {
        Some(path) => {
            let ok = path.get_ref().starts_with('/')
                && path.get_ref().parse::<http::uri::PathAndQuery>().is_ok();
            if !ok {
                return Err(at(
                    path.span(),
                    format!(
                        "`path` {:?}: write an absolute path like \"/orders?page=2\"",
                        path.get_ref()
                    ),
                ));
            }
            path.into_inner()
        }
        None => "/".to_string(),
    };
    let weight = match raw.weight {
        Some(weight) if (1..=1000).contains(weight.get_ref()) => *weight.get_ref() as u32,
        Some(weight) => {
            return Err(at(
                weight.span(),
                format!("`weight` {}: write 1 to 1000", weight.get_ref()),
            ));
        }
        None => 1,
    };
    let mut headers = Vec::with_capacity(raw.headers.len());
    for (name, value) in raw.headers {
        let header = HeaderName::from_bytes(name.get_ref().as_bytes()).map_err(|_| {
            at(
                name.span(),
                format!("header name {:?} is not valid", name.get_ref()),
            )
        })?;
        let content = HeaderValue::from_str(value.get_ref()).map_err(|_| {
            at(
                value.span(),
                format!(
                    "header {:?}: the value has characters a header cannot carry",
                    name.get_ref()
                ),
            )
        })?;
        headers.push((header, content));
    }
    let body = match (raw.body, raw.body_file) {
        (Some(_), Some(file)) => {
            return Err(at(
                file.span(),
                "give `body` or `body_file`, not both".into(),
            ));
        }
        (Some(body), None) => Bytes::from(body.into_inner()),
        (None, Some(file)) => read_bounded(&dir.join(file.get_ref()), MAX_BODY)
            .map(Bytes::from)
            .map_err(|why| {
                at(
                    file.span(),
                    format!("`body_file` {:?}: {why}", file.get_ref()),
                )
            })?,
        (None, None) => Bytes::new(),
    };
    let expect_status = match raw.expect_status {
        Some(statuses) => {
            if let Some(bad) = statuses
                .get_ref()
                .iter()
                .find(|s| !(100..=599).contains(*s))
            {
                return Err(at(
                    statuses.span(),
                    format!("`expect_status`: {bad} is not an HTTP status"),
                ));
            }
            statuses.into_inner()
        }
        None => Vec::new(),
    };
    let name = raw
        .name
        .map(Spanned::into_inner)
        .unwrap_or_else(|| format!("{method} {path}"));
    Ok(RequestSpec {
        name,
        weight,
        method,
        path,
        headers,
        body,
        expect_status,
    })
}

/// At most `limit` bytes of a regular file (not `/dev/zero`, a FIFO or a directory).
fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    // Looked at before opening too: opening a FIFO would wait for a writer.
    let regular = |m: std::fs::Metadata| match m.is_file() {
        true => Ok(()),
        false => Err("it is not a regular file".to_string()),
    };
    regular(std::fs::metadata(path).map_err(|e| e.to_string())?)?;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    regular(file.metadata().map_err(|e| e.to_string())?)?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > limit {
        return Err(format!("it is larger than {limit} bytes"));
    }
    Ok(bytes)
}

fn check_rate(rate: f64) -> Result<f64, String> {
    if rate.is_finite() && (0.0..=1_000_000.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!(
            "{rate} requests a second is out of range: write 0 to 1000000"
        ))
    }
}

const DURATION_HELP: &str = "write a duration like \"500ms\", \"30s\", \"2m\" or \"1m30s\"";

/// `500ms`, `30s`, `2m`, `1h`, and sums like `1m30s`.
fn duration(text: &str) -> Option<Duration> {
    let (mut total, mut rest) = (Duration::ZERO, text.trim());
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, millis) = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)]
            .into_iter()
            .find(|(unit, _)| rest.starts_with(unit) && !rest[unit.len()..].starts_with('s'))?;
        rest = &rest[unit.len()..];
        total = total.checked_add(Duration::from_millis(value.checked_mul(millis)?))?;
    }
    Some(total)
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let column = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario, String> {
        Scenario::parse(Path::new("/srv/load.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_scenario_reads_with_its_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("order.json"), b"{\"item\": 1}").unwrap();
        let text = r#"
connections = 8
timeout = "1m30s"
start_rate = 5

[[stage]]
duration = "10s"
target = 50

[[stage]]
duration = "500ms"
target = 0

[[request]]
path = "/"

[[request]]
name = "order"
weight = 2
method = "post"
path = "/orders?x=1"
headers = { "Content-Type" = "application/json", Host = "shop.example.test" }
body_file = "order.json"
expect_status = [201]
"#;
        let path = dir.path().join("load.toml");
        std::fs::write(&path, text).unwrap();
        let s = Scenario::load(&path).unwrap();
        assert_eq!(
            (s.connections, s.timeout, s.start_rate),
            (8, Duration::from_secs(90), 5.0)
        );
        assert_eq!(
            s.stages[1],
            Stage {
                duration: Duration::from_millis(500),
                target: 0.0
            }
        );
        assert_eq!(s.requests[0].name, "GET /");
        let order = &s.requests[1];
        assert_eq!(
            (order.method.as_str(), order.weight, order.path.as_str()),
            ("POST", 2, "/orders?x=1")
        );
        assert_eq!(&order.body[..], b"{\"item\": 1}");
        assert_eq!(order.headers.len(), 2);
        assert_eq!(order.expect_status, vec![201]);
        // (5 + 50) / 2 × 10 s + 50 / 2 × 0.5 s = 287.5: requests number 0 to 287 are due.
        assert_eq!(s.scheduled(), 288);
        assert_eq!(s.duration(), Duration::from_millis(10_500));
    }

    #[test]
    fn mistakes_name_the_file_line_and_field() {
        let stage = "[[stage]]\nduration = \"1s\"\ntarget = 1\n";
        let cases = [
            ("", "/srv/load.toml:1:1: no [[stage]]"),
            (
                "[[stage]]\nduration = \"1 s\"\ntarget = 1\n",
                "/srv/load.toml:2:12: `duration` \"1 s\"",
            ),
            (
                "[[stage]]\nduration = \"1s\"\ntarget = -1\n",
                "/srv/load.toml:3:10: `target`",
            ),
            (
                "[[stage]]\nduration = \"2d\"\ntarget = 1\n",
                "/srv/load.toml:2:12",
            ),
            (
                &format!("{stage}[[request]]\npath = \"orders\"\n"),
                "/srv/load.toml:5:8: `path`",
            ),
            (
                &format!("{stage}[[request]]\nmethod = \"GE T\"\n"),
                "/srv/load.toml:5:10: `method`",
            ),
            (
                &format!("{stage}[[request]]\nweight = 0\n"),
                "/srv/load.toml:5:10: `weight` 0",
            ),
            (
                &format!("{stage}[[request]]\nheaders = {{ \"X\" = \"a\\nb\" }}\n"),
                "/srv/load.toml:5",
            ),
            (
                &format!("{stage}[[request]]\nbody_file = \"missing.json\"\n"),
                "`body_file` \"missing.json\"",
            ),
            (
                &format!("{stage}[[request]]\nbodyy = \"x\"\n"),
                "/srv/load.toml:5:1: unknown field `bodyy`",
            ),
            (
                &format!("{stage}[thresholds]\nhttp_req_duration = [\"p99<5\"]\n"),
                "/srv/load.toml:5:22: [thresholds] http_req_duration",
            ),
            (
                &format!("{stage}[thresholds]\n\"http_reqs{{name:x}}\" = [\"count>1\"]\n"),
                "no [[request]] is named \"x\"",
            ),
            ("connections = 0\n", "/srv/load.toml:1:15: `connections` 0"),
            (
                "[[stage]]\nduration = \"24h\"\ntarget = 1000\n",
                "more than one run's",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(text).unwrap_err();
            assert!(
                error.contains(expected),
                "{text:?}\n{error}\nexpected {expected}"
            );
        }
    }

    #[test]
    fn devices_fifos_and_huge_files_are_refused_without_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        for path in [Path::new("/dev/zero"), &fifo, dir.path()] {
            let error = Scenario::load(path).unwrap_err().to_string();
            assert!(error.ends_with("it is not a regular file"), "{error}");
        }
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; (MAX_FILE + 1) as usize]).unwrap();
        let error = Scenario::load(&big).unwrap_err().to_string();
        assert!(error.contains("larger than 1048576 bytes"), "{error}");
        let text =
            "[[stage]]\nduration = \"1s\"\ntarget = 1\n[[request]]\nbody_file = \"/dev/zero\"\n";
        let error = parse(text).unwrap_err();
        assert!(
            error.contains(
                "/srv/load.toml:5:13: `body_file` \"/dev/zero\": it is not a regular file"
            ),
            "{error}"
        );
    }

    #[test]
    fn durations_add_up() {
        assert_eq!(duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(duration("1h"), Some(Duration::from_secs(3600)));
        for bad in ["", "5", "s", "1.5s", "1d", "-1s", "99999999999999999999h"] {
            assert_eq!(duration(bad), None, "{bad}");
        }
    }
}

/// Seeded mutation fuzzing of a full scenario: a value or an error inside the file, never a
/// panic.
#[test]
fn mutated_scenarios_never_panic_and_errors_point_inside_the_file() {
    let seed = "url = \"http://127.0.0.1:8080\"\nconnections = 8\ntimeout = \"1m30s\"\nstart_rate = 5\n\n\
        [[stage]]\nduration = \"2s\"\ntarget = 50\n\n[[request]]\nname = \"order\"\nweight = 2\n\
        method = \"POST\"\npath = \"/orders?x=1\"\nheaders = { \"Content-Type\" = \"application/json\" }\n\
        body = '{\"item\": 1}'\nexpect_status = [201]\n\n[thresholds]\nhttp_req_failed = [\"rate<0.01\"]\n\
        \"http_req_duration{name:order}\" = [\"p(99.9)<=250\", \"avg<5\"]\n";
    let alphabet: Vec<char> = "[]{}=\".,:#\n 0123456789abcxyz_-<>()ms\u{1F525}\\'"
        .chars()
        .collect();
    let mut state: u64 = 0x10ad;
    let mut next = |below: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % below as u64) as usize
    };
    for _ in 0..3000 {
        let mut chars: Vec<char> = seed.chars().collect();
        for _ in 0..1 + next(5) {
            let at = next(chars.len() + 1);
            let c = alphabet[next(alphabet.len())];
            match next(3) {
                0 if at < chars.len() => {
                    chars.remove(at);
                }
                1 => chars.insert(at, c),
                _ if at < chars.len() => chars[at] = c,
                _ => {}
            }
        }
        let text: String = chars.into_iter().collect();
        crate::fuzzing::scenario_file(text.as_bytes());
    }
}
