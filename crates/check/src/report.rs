//! Report formats, as goss prints them: documentation, rspecish, json, junit, tap, silent.

use std::fmt::Write;
use std::str::FromStr;

use serde_json::json;

use crate::run::{Outcome, Report, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Documentation,
    Rspecish,
    Json,
    Junit,
    Tap,
    Silent,
}

impl FromStr for Format {
    type Err = String;

    fn from_str(name: &str) -> Result<Format, String> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "documentation" => Format::Documentation,
            "rspecish" => Format::Rspecish,
            "json" => Format::Json,
            "junit" => Format::Junit,
            "tap" => Format::Tap,
            "silent" => Format::Silent,
            other => {
                return Err(format!(
                    "unknown format {other:?}: documentation, rspecish, json, junit, tap or silent"
                ));
            }
        })
    }
}

impl Format {
    /// The media type of the format, for `verify serve`'s content negotiation.
    pub fn media_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Junit => "application/xml",
            _ => "text/plain; charset=utf-8",
        }
    }
}

/// Renders `report`; `color` adds ANSI colors (on a terminal).
pub fn render(report: &Report, format: Format, color: bool) -> String {
    match format {
        Format::Documentation => documentation(report, color),
        Format::Rspecish => rspecish(report, color),
        Format::Json => json(report),
        Format::Junit => junit(report),
        Format::Tap => tap(report),
        Format::Silent => String::new(),
    }
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

/// One line describing an outcome: `File: /etc/passwd: mode: matches expectation: "0644"`.
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

fn summary_line(report: &Report) -> String {
    format!(
        "Total Duration: {:.3}s\nCount: {}, Failed: {}, Skipped: {}\n",
        report.duration_ns as f64 / 1e9,
        report.outcomes.len(),
        report.count(Status::Fail),
        report.count(Status::Skip)
    )
}

fn titled(outcome: &Outcome, line: String) -> String {
    match outcome.title.is_empty() {
        true => line,
        false => format!("Title: {}\n{line}", outcome.title),
    }
}

fn documentation(report: &Report, color: bool) -> String {
    let mut out = String::new();
    for outcome in &report.outcomes {
        let line = titled(outcome, describe(outcome));
        let _ = writeln!(out, "{}", paint(&line, outcome.result, color));
    }
    out.push('\n');
    failures_section(report, color, &mut out);
    out + &summary_line(report)
}

fn failures_section(report: &Report, color: bool, out: &mut String) {
    if report.passed() {
        return;
    }
    out.push_str("Failures:\n\n");
    for outcome in report.failures() {
        let line = titled(outcome, describe(outcome));
        let _ = writeln!(out, "{}\n", paint(&line, Status::Fail, color));
    }
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
    failures_section(report, color, &mut out);
    out + &summary_line(report)
}

fn json(report: &Report) -> String {
    let failed = report.count(Status::Fail);
    let value = json!({
        "results": report.outcomes,
        "summary": {
            "test-count": report.outcomes.len(),
            "failed-count": failed,
            "skipped-count": report.count(Status::Skip),
            "total-duration": report.duration_ns,
            "attempts": report.attempts,
            "summary-line": summary_line(report).replace('\n', " ").trim(),
        }
    });
    serde_json::to_string_pretty(&value).unwrap_or_default() + "\n"
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
        let line = describe(outcome).replace('\n', " ");
        let _ = match outcome.result {
            Status::Pass => writeln!(out, "ok {} - {line}", i + 1),
            Status::Fail => writeln!(out, "not ok {} - {line}", i + 1),
            Status::Skip => writeln!(out, "ok {} - # SKIP {line}", i + 1),
        };
    }
    out
}
