//! Report formats, as goss prints them: rspecish (goss's default), documentation, json, junit,
//! tap, nagios, prometheus and silent, with goss's `--format-options`.

use std::fmt::Write;
use std::str::FromStr;

use serde_json::{Value as Json, json};

use crate::run::{Outcome, Report, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Rspecish,
    Documentation,
    Json,
    Junit,
    Tap,
    Nagios,
    Prometheus,
    Silent,
}

const FORMATS: &str = "rspecish, documentation, json, junit, tap, nagios, prometheus or silent";

impl FromStr for Format {
    type Err = String;

    fn from_str(name: &str) -> Result<Format, String> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "rspecish" => Format::Rspecish,
            "documentation" => Format::Documentation,
            "json" => Format::Json,
            "junit" => Format::Junit,
            "tap" => Format::Tap,
            "nagios" => Format::Nagios,
            "prometheus" => Format::Prometheus,
            "silent" => Format::Silent,
            other => return Err(format!("unknown format {other:?}: {FORMATS}")),
        })
    }
}

impl Format {
    /// The media type of the format, for `verify serve`'s content negotiation.
    pub fn media_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Junit => "application/xml",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            _ => "text/plain; charset=utf-8",
        }
    }

    /// The exit status for `report`, as goss: 1 when a check failed (Nagios: 2, CRITICAL).
    pub fn exit_status(self, report: &Report) -> u8 {
        match (report.passed(), self) {
            (true, _) => 0,
            (false, Format::Nagios) => 2,
            (false, _) => 1,
        }
    }
}

/// goss's `--format-options` (`-o`): `pretty` and `sort` (json, and sort for every format
/// that lists checks), `perfdata` and `verbose` (nagios; verbose for prometheus too),
/// `exclude_raw` (accepted: Phoenix's values have no raw form apart from what is shown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FormatOptions {
    pub pretty: bool,
    pub sort: bool,
    pub perfdata: bool,
    pub verbose: bool,
    pub exclude_raw: bool,
}

impl FormatOptions {
    /// Reads the options as given (`-o pretty -o sort`, or `pretty,sort`).
    pub fn parse<S: AsRef<str>>(given: &[S]) -> Result<FormatOptions, String> {
        let mut options = FormatOptions::default();
        for name in given.iter().flat_map(|g| g.as_ref().split(',')) {
            match name.trim() {
                "pretty" => options.pretty = true,
                "sort" => options.sort = true,
                "perfdata" => options.perfdata = true,
                "verbose" => options.verbose = true,
                "exclude_raw" => options.exclude_raw = true,
                other => {
                    return Err(format!(
                        "unknown format option {other:?}: exclude_raw, perfdata, pretty, sort or verbose"
                    ));
                }
            }
        }
        Ok(options)
    }
}

/// Renders `report`; `color` adds ANSI colors (on a terminal).
pub fn render(report: &Report, format: Format, options: &FormatOptions, color: bool) -> String {
    let sorted;
    let report = match options.sort {
        true => {
            sorted = sorted_by_resource(report);
            &sorted
        }
        false => report,
    };
    match format {
        Format::Documentation => documentation(report, color),
        Format::Rspecish => rspecish(report, color),
        Format::Json => json(report, options),
        Format::Junit => junit(report),
        Format::Tap => tap(report),
        Format::Nagios => nagios(report, options),
        Format::Prometheus => prometheus(report, options),
        Format::Silent => String::new(),
    }
}

/// The report with its checks in goss's sort order (`TYPE:ID`); a check's attributes stay
/// together and in order.
fn sorted_by_resource(report: &Report) -> Report {
    let mut report = report.clone();
    report.outcomes.sort_by_key(sort_key);
    report
}

fn sort_key(outcome: &Outcome) -> String {
    format!("{}:{}", outcome.resource_type, outcome.resource_id)
}

/// The outcomes of each check: runs of the same resource.
fn groups(outcomes: &[Outcome]) -> Vec<&[Outcome]> {
    outcomes
        .chunk_by(|a, b| (&a.resource_type, &a.resource_id) == (&b.resource_type, &b.resource_id))
        .collect()
}

fn paint(text: &str, status: Status, color: bool) -> String {
    if !color {
        return text.to_string();
    }
    let code = match status {
        Status::Pass => 32,
        Status::Fail => 31,
        Status::Skip => 33,
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// One line describing an outcome, for messages (a refused deploy):
/// `File: /etc/passwd: mode: doesn't match, expect: "0644" found: "0600"`.
pub fn describe(outcome: &Outcome) -> String {
    let subject = format!(
        "{}: {}: {}",
        outcome.resource_type, outcome.resource_id, outcome.property
    );
    let expected = outcome.expected.to_string();
    match outcome.result {
        Status::Pass => format!("{subject}: matches expectation: {expected}"),
        Status::Skip => format!("{subject}: skipped"),
        Status::Fail if !outcome.error.is_empty() => {
            format!("{subject}: expected {expected}: {}", outcome.error)
        }
        Status::Fail => {
            let found = outcome
                .found
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            format!("{subject}: doesn't match, expect: {expected} found: {found}")
        }
    }
}

/// goss's `humanizeResult`: the outcome in full (`Expected` / found / `to equal` / expected,
/// one per line and indented), or `compact` on one line.
fn humanize(outcome: &Outcome, compact: bool) -> String {
    let subject = format!(
        "{}: {}: {}",
        outcome.resource_type, outcome.resource_id, outcome.property
    );
    let sep = if compact { " " } else { "\n" };
    let shown = |text: &str| match compact {
        true => text.split_whitespace().collect::<Vec<_>>().join(" "),
        false => indent(text),
    };
    match outcome.result {
        Status::Pass => format!("{subject}: matches expectation: {}", outcome.expected),
        Status::Skip => format!("{subject}: skipped"),
        Status::Fail if !outcome.error.is_empty() => {
            format!("{subject}:{sep}Error{sep}{}", shown(&outcome.error))
        }
        Status::Fail => {
            let found = outcome.found.clone().unwrap_or(Json::Null).to_string();
            let parts = [
                "Expected".to_string(),
                shown(&found),
                outcome.message.clone(),
                shown(&outcome.expected.to_string()),
            ];
            format!("{subject}:{sep}{}", parts.join(sep))
        }
    }
}

/// goss's `indentLines`: four spaces before every line.
fn indent(text: &str) -> String {
    text.trim_end_matches('\n')
        .split('\n')
        .map(|line| format!("    {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// goss's title and meta lines before a check's outcomes.
fn header(outcome: &Outcome) -> String {
    let mut out = String::new();
    if !outcome.title.is_empty() {
        let _ = writeln!(out, "Title: {}", outcome.title);
    }
    if let Json::Object(meta) = &outcome.meta {
        out.push_str("Meta:\n");
        let mut keys: Vec<_> = meta.keys().collect();
        keys.sort();
        for key in keys {
            let value = match &meta[key] {
                Json::String(text) => text.clone(),
                other => other.to_string(),
            };
            let _ = writeln!(out, "    {key}: {value}");
        }
    }
    out
}

fn summary_line(report: &Report, color: bool) -> String {
    let status = match report.passed() {
        true => Status::Pass,
        false => Status::Fail,
    };
    let count = format!(
        "Count: {}, Failed: {}, Skipped: {}",
        report.outcomes.len(),
        report.count(Status::Fail),
        report.count(Status::Skip)
    );
    format!(
        "Total Duration: {:.3}s\n{}\n",
        seconds(report.duration_ns),
        paint(&count, status, color)
    )
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// goss's `Failures/Skipped:` section: each check with a failed or skipped attribute, in
/// sort order, its header, then those attributes in full.
fn failed_or_skipped(report: &Report, color: bool) -> String {
    let mut groups: Vec<Vec<&Outcome>> = groups(&report.outcomes)
        .into_iter()
        .map(|group| group.iter().filter(|o| o.result != Status::Pass).collect())
        .filter(|group: &Vec<&Outcome>| !group.is_empty())
        .collect();
    if groups.is_empty() {
        return String::new();
    }
    groups.sort_by_key(|group| sort_key(group[0]));
    let mut out = String::from("Failures/Skipped:\n\n");
    for group in groups {
        out.push_str(&header(group[0]));
        for outcome in group {
            let _ = writeln!(
                out,
                "{}",
                paint(&humanize(outcome, false), outcome.result, color)
            );
        }
        out.push('\n');
    }
    out
}

fn documentation(report: &Report, color: bool) -> String {
    let mut out = String::new();
    for group in groups(&report.outcomes) {
        out.push_str(&header(&group[0]));
        for outcome in group {
            let _ = writeln!(
                out,
                "{}",
                paint(&humanize(outcome, false), outcome.result, color)
            );
        }
    }
    out.push_str("\n\n");
    out + &failed_or_skipped(report, color) + &summary_line(report, color)
}

fn rspecish(report: &Report, color: bool) -> String {
    let mut out = String::new();
    for outcome in &report.outcomes {
        let mark = match outcome.result {
            Status::Pass => ".",
            Status::Fail => "F",
            Status::Skip => "S",
        };
        out.push_str(&paint(mark, outcome.result, color));
    }
    out.push_str("\n\n");
    out + &failed_or_skipped(report, color) + &summary_line(report, color)
}

/// goss's JSON: every result as goss's `TestResult` (integer `result`: 0 pass, 1 fail, 2 skip;
/// `duration` in nanoseconds) and a summary; one line unless `pretty` (four spaces, as goss).
fn json(report: &Report, options: &FormatOptions) -> String {
    let results: Vec<Json> = report
        .outcomes
        .iter()
        .map(|outcome| goss_result(report, outcome))
        .collect();
    let (count, failed, skipped) = (
        report.outcomes.len(),
        report.count(Status::Fail),
        report.count(Status::Skip),
    );
    let value = json!({
        "results": results,
        "summary": {
            "test-count": count,
            "failed-count": failed,
            "skipped-count": skipped,
            "total-duration": report.duration_ns,
            "summary-line": format!(
                "Count: {count}, Failed: {failed}, Skipped: {skipped}, Duration: {:.3}s",
                seconds(report.duration_ns)
            ),
        }
    });
    let mut out = Vec::new();
    let written = match options.pretty {
        true => {
            let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
            let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
            serde::Serialize::serialize(&value, &mut serializer)
        }
        false => serde_json::to_writer(&mut out, &value),
    };
    // A JSON value always serializes.
    debug_assert!(written.is_ok());
    String::from_utf8_lossy(&out).into_owned() + "\n"
}

fn goss_result(report: &Report, outcome: &Outcome) -> Json {
    let start = report.started_unix_ns + outcome.start_ns;
    let end = start + outcome.duration_ns;
    let error = (!outcome.error.is_empty()).then(|| outcome.error.clone());
    json!({
        "successful": outcome.result != Status::Fail,
        "skipped": outcome.result == Status::Skip,
        "resource-id": outcome.resource_id,
        "resource-type": outcome.resource_type,
        "property": outcome.property,
        "title": outcome.title,
        "meta": outcome.meta,
        "result": match outcome.result {
            Status::Pass => 0,
            Status::Fail => 1,
            Status::Skip => 2,
        },
        "err": error,
        "matcher-result": {
            "actual": outcome.found,
            "message": outcome.message,
            "expected": match outcome.result {
                Status::Skip => Json::Null,
                _ => outcome.expected.clone(),
            },
            "missing-elements": null,
            "found-elements": null,
            "extra-elements": null,
            "transform-chain": null,
            "untransformed-value": null,
        },
        "start-time": rfc3339_nano(start),
        "end-time": rfc3339_nano(end),
        "duration": outcome.duration_ns,
        "summary-line": humanize(outcome, false),
        "summary-line-compact": humanize(outcome, true),
    })
}

/// Go's `time.RFC3339Nano` in UTC: `2026-12-04T12:00:00.123456789Z`, trailing zeros dropped.
fn rfc3339_nano(unix_ns: u64) -> String {
    let (seconds, nanos) = (unix_ns / 1_000_000_000, unix_ns % 1_000_000_000);
    let (days, second_of_day) = (seconds / 86_400, seconds % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let fraction = match nanos {
        0 => String::new(),
        n => format!(".{n:09}").trim_end_matches('0').to_string(),
    };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{fraction}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// goss's nagios plugin output: `GOSS OK - ...` or `GOSS CRITICAL - ...` (exit 2), with
/// `perfdata` after a `|` and, `verbose`, one line per failure.
fn nagios(report: &Report, options: &FormatOptions) -> String {
    let (count, failed, skipped) = (
        report.outcomes.len(),
        report.count(Status::Fail),
        report.count(Status::Skip),
    );
    let duration = seconds(report.duration_ns);
    let state = if failed > 0 { "CRITICAL" } else { "OK" };
    let mut out = format!(
        "GOSS {state} - Count: {count}, Failed: {failed}, Skipped: {skipped}, Duration: {duration:.3}s"
    );
    if options.perfdata {
        let _ = write!(
            out,
            "|total={count} failed={failed} skipped={skipped} duration={duration:.3}s"
        );
    }
    out.push('\n');
    if options.verbose {
        for (i, outcome) in report.failures().enumerate() {
            let _ = writeln!(out, "Fail {} - {}", i + 1, humanize(outcome, true));
        }
    }
    out
}

/// goss's Prometheus text format: outcomes and their durations (ms) by resource type (and,
/// `verbose`, resource id), and the run's outcome and duration.
fn prometheus(report: &Report, options: &FormatOptions) -> String {
    use std::collections::BTreeMap;
    let mut outcomes: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for outcome in &report.outcomes {
        let mut labels = vec![
            ("outcome", outcome_name(outcome.result).to_string()),
            ("type", outcome.resource_type.to_lowercase()),
        ];
        if options.verbose {
            labels.insert(1, ("resource_id", outcome.resource_id.clone()));
        }
        let entry = outcomes.entry(label_set(&labels)).or_default();
        entry.0 += 1;
        entry.1 += outcome.duration_ns / 1_000_000;
    }
    let run = match (report.passed(), report.count(Status::Pass)) {
        (false, _) => "fail",
        (true, 0) if !report.outcomes.is_empty() => "skip",
        (true, 0) => "unknown",
        (true, _) => "pass",
    };
    let run_labels = label_set(&[("outcome", run.to_string())]);
    let mut out = String::new();
    let mut family = |name: &str, help: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP goss_tests_{name} {help}");
        let _ = writeln!(out, "# TYPE goss_tests_{name} counter");
        for (labels, value) in samples {
            let _ = writeln!(out, "goss_tests_{name}{labels} {value}");
        }
    };
    family(
        "outcomes_duration_milliseconds",
        "The duration of tests from this run. Note; tests run concurrently.",
        outcomes
            .iter()
            .map(|(l, (_, ms))| (l.clone(), *ms))
            .collect(),
    );
    family(
        "outcomes_total",
        "The number of test-outcomes from this run.",
        outcomes.iter().map(|(l, (n, _))| (l.clone(), *n)).collect(),
    );
    family(
        "run_duration_milliseconds",
        "The end-to-end duration of this run.",
        vec![(run_labels.clone(), report.duration_ns / 1_000_000)],
    );
    family(
        "run_outcomes_total",
        "The outcomes of this run as a whole.",
        vec![(run_labels, 1)],
    );
    out
}

fn outcome_name(status: Status) -> &'static str {
    match status {
        Status::Pass => "pass",
        Status::Fail => "fail",
        Status::Skip => "skip",
    }
}

/// `{a="x",b="y"}` with the text format's escapes.
fn label_set(labels: &[(&str, String)]) -> String {
    let pairs: Vec<String> = labels
        .iter()
        .map(|(name, value)| {
            let value = value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{name}=\"{value}\"")
        })
        .collect();
    format!("{{{}}}", pairs.join(","))
}

fn junit(report: &Report) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuite name=\"goss\" errors=\"0\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" time=\"{:.3}\">",
        report.outcomes.len(),
        report.count(Status::Fail),
        report.count(Status::Skip),
        report.duration_ns as f64 / 1e9
    );
    for outcome in &report.outcomes {
        let name = format!(
            "{} {} {}",
            outcome.resource_type, outcome.resource_id, outcome.property
        );
        let _ = write!(
            out,
            "<testcase name=\"{}\" classname=\"{}\" time=\"{:.3}\">",
            xml(&name),
            xml(&outcome.resource_type),
            outcome.duration_ns as f64 / 1e9
        );
        match outcome.result {
            Status::Pass => {
                let _ = write!(out, "<system-out>{}</system-out>", xml(&describe(outcome)));
            }
            Status::Fail => {
                let _ = write!(
                    out,
                    "<failure message=\"{0}\">{0}</failure>",
                    xml(&describe(outcome))
                );
            }
            Status::Skip => out.push_str("<skipped/>"),
        }
        out.push_str("</testcase>\n");
    }
    out + "</testsuite>\n"
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\n', "&#10;")
}

fn tap(report: &Report) -> String {
    let mut out = format!("1..{}\n", report.outcomes.len());
    for (i, outcome) in report.outcomes.iter().enumerate() {
        let line = humanize(outcome, true);
        let _ = match outcome.result {
            Status::Pass => writeln!(out, "ok {} - {line}", i + 1),
            Status::Fail => writeln!(out, "not ok {} - {line}", i + 1),
            Status::Skip => writeln!(out, "ok {} - # SKIP {line}", i + 1),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_gos_rfc3339_nano_in_utc() {
        assert_eq!(rfc3339_nano(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_nano(1_796_385_600_123_400_000),
            "2026-12-04T12:00:00.1234Z"
        );
        assert_eq!(
            rfc3339_nano(951_782_400_000_000_001),
            "2000-02-29T00:00:00.000000001Z"
        );
    }
}
