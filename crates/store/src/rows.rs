//! Typed rows and statuses.

use rusqlite::Row;
use serde::{Deserialize, Serialize};

macro_rules! status_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

status_enum! {
    /// Where a generation is in its life.
    GenerationStatus { Starting = "starting", Live = "live", Draining = "draining", Retired = "retired", Aborted = "aborted" }
}

status_enum! {
    /// Where an instance is in its life.
    InstanceStatus {
        Starting = "starting", Healthy = "healthy", Unhealthy = "unhealthy", Stopping = "stopping",
        Stopped = "stopped", Died = "died", Lost = "lost",
    }
}

status_enum! {
    /// How a deploy ended.
    DeployStatus { Running = "running", Succeeded = "succeeded", Aborted = "aborted", Interrupted = "interrupted" }
}

impl InstanceStatus {
    /// True once the instance's process is gone for good.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            InstanceStatus::Stopped | InstanceStatus::Died | InstanceStatus::Lost
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRow {
    pub digest: String,
    pub name: String,
    pub size: u64,
    #[serde(with = "phoenix_image::wire_time")]
    pub created_at: i64,
}

impl ImageRow {
    pub(crate) fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(ImageRow {
            digest: row.get(0)?,
            name: row.get(1)?,
            size: row.get::<_, i64>(2)? as u64,
            created_at: row.get(3)?,
        })
    }
}

/// The result of verifying an image with its recipe's checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationRow {
    /// The image's digest.
    pub image: String,
    /// The recipe whose checks ran.
    pub name: String,
    /// The digest of the rendered check files.
    pub checks: String,
    pub passed: bool,
    pub total: u32,
    pub failed: u32,
    /// One line per failed check (at most the first few dozen).
    pub failures: Vec<String>,
    /// The check files read, so that a later change to them can be noticed.
    pub files: Vec<String>,
    #[serde(with = "phoenix_image::wire_time")]
    pub at: i64,
}

impl VerificationRow {
    pub(crate) fn from_row(row: &Row<'_>) -> rusqlite::Result<std::result::Result<Self, String>> {
        let (failures, files): (String, String) = (row.get(7)?, row.get(8)?);
        let parsed = serde_json::from_str(&failures)
            .and_then(|failures| Ok((failures, serde_json::from_str(&files)?)));
        Ok(parsed
            .map_err(|e| format!("failures {failures:?} or files {files:?}: {e}"))
            .map(|(failures, files)| VerificationRow {
                image: row.get(0).unwrap_or_default(),
                name: row.get(1).unwrap_or_default(),
                checks: row.get(2).unwrap_or_default(),
                passed: row.get::<_, i64>(3).unwrap_or_default() != 0,
                total: row.get::<_, i64>(4).unwrap_or_default() as u32,
                failed: row.get::<_, i64>(5).unwrap_or_default() as u32,
                failures,
                files,
                at: row.get(6).unwrap_or_default(),
            }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GenerationRow {
    pub id: i64,
    pub role: String,
    pub image: String,
    pub status: GenerationStatus,
    #[serde(with = "phoenix_image::wire_time")]
    pub created_at: i64,
    #[serde(with = "phoenix_image::wire_time::option")]
    pub switched_at: Option<i64>,
    #[serde(with = "phoenix_image::wire_time::option")]
    pub ended_at: Option<i64>,
}

impl GenerationRow {
    pub(crate) fn from_row(row: &Row<'_>) -> rusqlite::Result<Result<Self, String>> {
        let status: String = row.get(3)?;
        let Some(status) = GenerationStatus::parse(&status) else {
            return Ok(Err(format!("unknown generation status {status:?}")));
        };
        Ok(Ok(GenerationRow {
            id: row.get(0)?,
            role: row.get(1)?,
            image: row.get(2)?,
            status,
            created_at: row.get(4)?,
            switched_at: row.get(5)?,
            ended_at: row.get(6)?,
        }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceRow {
    pub name: String,
    pub role: String,
    pub generation: i64,
    pub image: String,
    pub status: InstanceStatus,
    pub pid: Option<u32>,
    /// The process's start time in clock ticks since boot, to tell it from a reused pid.
    pub pid_start: Option<u64>,
    pub port: u16,
    pub log_path: String,
    #[serde(with = "phoenix_image::wire_time")]
    pub started_at: i64,
    pub ended_at: Option<i64>,
    /// The driver that runs it (`isolating`, `runc`, `process`).
    pub driver: String,
    /// The address it serves on, once it runs.
    pub addr: Option<String>,
}

impl InstanceRow {
    pub(crate) fn from_row(row: &Row<'_>) -> rusqlite::Result<Result<Self, String>> {
        let status: String = row.get(4)?;
        let Some(status) = InstanceStatus::parse(&status) else {
            return Ok(Err(format!("unknown instance status {status:?}")));
        };
        Ok(Ok(InstanceRow {
            name: row.get(0)?,
            role: row.get(1)?,
            generation: row.get(2)?,
            image: row.get(3)?,
            status,
            pid: row.get(5)?,
            pid_start: row.get::<_, Option<i64>>(6)?.map(|v| v as u64),
            port: row.get(7)?,
            log_path: row.get(8)?,
            started_at: row.get(9)?,
            ended_at: row.get(10)?,
            driver: row.get(11)?,
            addr: row.get(12)?,
        }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeployRow {
    pub id: i64,
    pub role: String,
    pub from_generation: Option<i64>,
    pub to_generation: i64,
    #[serde(with = "phoenix_image::wire_time")]
    pub started_at: i64,
}

impl DeployRow {
    pub(crate) fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(DeployRow {
            id: row.get(0)?,
            role: row.get(1)?,
            from_generation: row.get(2)?,
            to_generation: row.get(3)?,
            started_at: row.get(4)?,
        })
    }
}

/// One event of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalRow {
    pub seq: i64,
    #[serde(with = "phoenix_image::wire_time")]
    pub at: i64,
    pub role: Option<String>,
    pub kind: String,
    pub detail: serde_json::Value,
}

impl JournalRow {
    pub(crate) fn from_row(row: &Row<'_>) -> rusqlite::Result<Result<Self, serde_json::Error>> {
        let detail: String = row.get(4)?;
        let seq = row.get(0)?;
        let at = row.get(1)?;
        let role = row.get(2)?;
        let kind = row.get(3)?;
        Ok(serde_json::from_str(&detail).map(|detail| JournalRow {
            seq,
            at,
            role,
            kind,
            detail,
        }))
    }
}
