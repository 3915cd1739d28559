//! How a command failed, for people (a line on stderr) and for scripts (with `--json`, one
//! object on stdout: `{"error": {"kind": ..., "message": ...}}`, exit 1).

use serde_json::json;

/// A failure with a kind scripts can branch on.
#[derive(Debug)]
pub struct Failure {
    pub kind: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }

    /// An error answer of the API: its message, and a kind from its status.
    pub fn from_api(status: hyper::StatusCode, body: &[u8]) -> Failure {
        let message = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
        let kind = match status.as_u16() {
            400 => "bad_request",
            401 | 403 => "denied",
            404 => "not_found",
            409 => "busy",
            422 => "refused",
            _ => "failed",
        };
        Failure::new(kind, message)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// The kind of any error a command returns.
pub fn kind_of(error: &anyhow::Error) -> &'static str {
    for cause in error.chain() {
        if let Some(failure) = cause.downcast_ref::<Failure>() {
            return failure.kind;
        }
        if let Some(fleet) = cause.downcast_ref::<phoenix_fleet::FleetError>() {
            use phoenix_fleet::FleetError;
            return match fleet {
                FleetError::UnknownRole { .. } | FleetError::UnknownInstance(_) => "not_found",
                FleetError::ImageNotFound(_) | FleetError::UnknownImage { .. } => "not_found",
                FleetError::Busy { .. } => "busy",
                FleetError::Config(_) => "invalid_fleet_file",
                _ => "failed",
            };
        }
        if cause.downcast_ref::<phoenix_fleet::ConfigError>().is_some() {
            return "invalid_fleet_file";
        }
    }
    "failed"
}

/// The `--json` form of a failure.
pub fn json(error: &anyhow::Error) -> serde_json::Value {
    json!({"error": {"kind": kind_of(error), "message": message(error)}})
}

/// The error and its causes on one line, as `{:#}` writes them, but without a cause that a
/// message already quotes (typed errors name their cause in their own message).
pub fn message(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}
