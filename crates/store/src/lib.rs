//! Durable state: images, generations, instances, deploys and an append-only event journal,
//! in one SQLite file (WAL mode, so the CLI can read while `phoenix up` writes).
//!
//! Every time is a Unix timestamp in milliseconds supplied by the caller, so that the
//! controller's clock stays injectable.

pub mod etcd;
mod rows;
mod schema;

pub use rows::*;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

/// A failure of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {cause}")]
    Sqlite {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    #[error("state store {path}: {cause}")]
    Io {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("state store {path}: {what} (the file was written by another version of Phoenix?)")]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "state store {path} is damaged ({problems}); Phoenix will not run on it. Keep a copy, then restore a backup or move it aside (Phoenix then starts with an empty state and removes the instances it left behind)"
    )]
    Damaged { path: PathBuf, problems: String },
    #[error("state store {path}: {cause}")]
    Json {
        path: PathBuf,
        cause: serde_json::Error,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

/// Creates `path` readable by its owner only (SQLite's journal files take its mode), or
/// makes an existing one so: the state is the operator's alone.
pub fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?
        .set_permissions(std::fs::Permissions::from_mode(0o600))
}

/// The state store. Cheap to share behind an `Arc`; calls are short and serialized.
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating and migrating if needed) the SQLite file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let wrap = |cause| StoreError::Sqlite {
            path: path.clone(),
            cause,
        };
        private_file(&path).map_err(|cause| StoreError::Io {
            path: path.clone(),
            cause,
        })?;
        let conn = Connection::open(&path).map_err(wrap)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(wrap)?;
        conn.pragma_update(None, "journal_mode", "wal")
            .map_err(wrap)?;
        conn.pragma_update(None, "synchronous", "normal")
            .map_err(wrap)?;
        conn.pragma_update(None, "foreign_keys", "on")
            .map_err(wrap)?;
        schema::migrate(&conn).map_err(wrap)?;
        Ok(Store {
            path,
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// SQLite's `quick_check` of every page and index: a damaged state is refused at startup
    /// rather than found in the middle of a deploy.
    pub fn check(&self) -> Result<()> {
        let damaged = |problems: String| StoreError::Damaged {
            path: self.path.clone(),
            problems,
        };
        let conn = self.conn();
        let rows: std::result::Result<Vec<String>, rusqlite::Error> = conn
            .prepare("PRAGMA quick_check(5)")
            .and_then(|mut statement| {
                statement
                    .query_map([], |row| row.get::<_, String>(0))?
                    .collect()
            });
        match rows {
            Ok(rows) if rows == ["ok"] => Ok(()),
            Ok(rows) => Err(damaged(rows.join("; "))),
            Err(cause) => Err(damaged(cause.to_string())),
        }
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn sql(&self, cause: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            cause,
        }
    }

    fn corrupt(&self, what: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    // ---- images ----

    /// Records a baked image; baking the same digest again only refreshes nothing.
    pub fn record_image(&self, name: &str, digest: &str, size: u64, now: i64) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO images (digest, name, size, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (digest, name) DO NOTHING",
                params![digest, name, size as i64, now],
            )
            .map(drop)
            .map_err(|e| self.sql(e))
    }

    /// Every image, newest first.
    pub fn images(&self) -> Result<Vec<ImageRow>> {
        let sql = "SELECT digest, name, size, created_at FROM images ORDER BY created_at DESC, rowid DESC";
        self.query(sql, [], ImageRow::from_row)
    }

    /// Forgets image `digest` under every name, and its tags; returns how many names it had.
    pub fn remove_image(&self, digest: &str) -> Result<usize> {
        self.conn()
            .execute("DELETE FROM tags WHERE digest = ?1", params![digest])
            .map_err(|e| self.sql(e))?;
        self.conn()
            .execute("DELETE FROM images WHERE digest = ?1", params![digest])
            .map_err(|e| self.sql(e))
    }

    /// Points `name:tag` at `digest` (moving it from any image it named before).
    pub fn tag_image(&self, name: &str, tag: &str, digest: &str, now: i64) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO tags (name, tag, digest, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name, tag) DO UPDATE SET digest = ?3, created_at = ?4",
                params![name, tag, digest, now],
            )
            .map(drop)
            .map_err(|e| self.sql(e))
    }

    /// Every tag: `(name, tag, digest)`, newest first.
    pub fn tags(&self) -> Result<Vec<(String, String, String)>> {
        self.query(
            "SELECT name, tag, digest FROM tags ORDER BY created_at DESC, rowid DESC",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
    }

    /// `name:tag` of image `digest` under `name` (its newest tag), else `name`.
    pub fn display_name(&self, name: &str, digest: &str) -> Result<String> {
        let tags = self.tags()?;
        Ok(tags
            .iter()
            .find(|(n, _, d)| n == name && d == digest)
            .map(|(n, t, _)| format!("{n}:{t}"))
            .unwrap_or_else(|| name.to_string()))
    }

    /// True when image `digest` cannot be trusted by name alone: its latest verification
    /// failed, or every generation that ran it was aborted.
    fn discredited(&self, digest: &str) -> Result<bool> {
        if self.latest_verification(digest)?.is_some_and(|v| !v.passed) {
            return Ok(true);
        }
        let statuses: Vec<String> = self.query(
            "SELECT status FROM generations WHERE image = ?1",
            params![digest],
            |row| row.get(0),
        )?;
        Ok(!statuses.is_empty() && statuses.iter().all(|s| s == "aborted"))
    }

    /// Resolves `reference`: `name:tag`, an image name (its newest bake that did not fail
    /// verification or only abort), `name@PREFIX`, a digest or a unique digest prefix of at
    /// least 6 hex digits.
    pub fn find_image(&self, reference: &str) -> Result<Option<ImageRow>> {
        let images = self.images()?;
        if let Some((name, tag)) = reference.split_once(':')
            && !reference.starts_with("sha256:")
            && !reference.contains('@')
        {
            let tagged = self
                .tags()?
                .into_iter()
                .find(|(n, t, _)| n == name && t == tag);
            return Ok(tagged.and_then(|(name, _, digest)| {
                images
                    .into_iter()
                    .find(|i| i.name == name && i.digest == digest)
            }));
        }
        if reference.split_once('@').is_none() && images.iter().any(|i| i.name == reference) {
            // A bare name: its newest image that neither failed verification nor only ever
            // aborted.
            for image in images.into_iter().filter(|i| i.name == reference) {
                if !self.discredited(&image.digest)? {
                    return Ok(Some(image));
                }
            }
            return Ok(None);
        }
        let (name, prefix) = match reference.split_once('@') {
            Some((name, digest)) => (Some(name), Some(digest)),
            None => (None, Some(reference)),
        };
        let prefix = prefix.map(|p| p.strip_prefix("sha256:").unwrap_or(p));
        if prefix.is_some_and(|p| p.len() < 6) {
            return Ok(None);
        }
        let mut matches = images.into_iter().filter(|i| {
            name.is_none_or(|n| i.name == n)
                && prefix.is_none_or(|p| i.digest["sha256:".len()..].starts_with(p))
        });
        let first = matches.next();
        let ambiguous = prefix.is_some()
            && matches.any(|i| Some(&i.digest) != first.as_ref().map(|f| &f.digest));
        Ok(if ambiguous { None } else { first })
    }

    // ---- verifications ----

    /// Records the result of verifying an image.
    pub fn record_verification(&self, row: &VerificationRow) -> Result<()> {
        let list = |items: &[String]| serde_json::to_string(items).unwrap_or_else(|_| "[]".into());
        self.conn()
            .execute(
                "INSERT INTO verifications (image, name, checks, passed, total, failed, failures, files, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![row.image, row.name, row.checks, row.passed, row.total, row.failed, list(&row.failures), list(&row.files), row.at],
            )
            .map(drop)
            .map_err(|e| self.sql(e))
    }

    /// The latest verification of image `digest`, if it was ever verified.
    pub fn latest_verification(&self, digest: &str) -> Result<Option<VerificationRow>> {
        let sql =
            "SELECT image, name, checks, passed, total, failed, at, failures, files FROM verifications
                   WHERE image = ?1 ORDER BY id DESC LIMIT 1";
        Ok(self
            .query_checked(sql, params![digest], VerificationRow::from_row)?
            .pop())
    }

    // ---- role sizes ----

    /// Records that `role` runs `instances` (set by hand, while the fleet file said
    /// `file_instances`).
    pub fn set_role_size(
        &self,
        role: &str,
        instances: u32,
        file_instances: u32,
        now: i64,
    ) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO role_sizes (role, instances, file_instances, at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (role) DO UPDATE SET instances = ?2, file_instances = ?3, at = ?4",
                params![role, instances, file_instances, now],
            )
            .map(drop)
            .map_err(|e| self.sql(e))
    }

    /// The size set by hand for `role` and the file's `instances` at the time, if any.
    pub fn role_size(&self, role: &str) -> Result<Option<(u32, u32)>> {
        let sql = "SELECT instances, file_instances FROM role_sizes WHERE role = ?1";
        Ok(self
            .query(sql, params![role], |row| {
                Ok((row.get::<_, u32>(0)?, row.get::<_, u32>(1)?))
            })?
            .pop())
    }

    // ---- generations ----

    /// Creates a generation of `role` running `image` in state `starting`.
    pub fn create_generation(&self, role: &str, image: &str, now: i64) -> Result<i64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO generations (role, image, status, created_at) VALUES (?1, ?2, 'starting', ?3)",
            params![role, image, now],
        )
        .map_err(|e| self.sql(e))?;
        Ok(conn.last_insert_rowid())
    }

    pub fn set_generation_status(&self, id: i64, status: GenerationStatus, now: i64) -> Result<()> {
        let column = match status {
            GenerationStatus::Live => "switched_at",
            GenerationStatus::Retired | GenerationStatus::Aborted => "ended_at",
            GenerationStatus::Starting | GenerationStatus::Draining => "updated_at",
        };
        let sql = format!("UPDATE generations SET status = ?1, {column} = ?2 WHERE id = ?3");
        self.conn()
            .execute(&sql, params![status.as_str(), now, id])
            .map(drop)
            .map_err(|e| self.sql(e))
    }

    pub fn generation(&self, id: i64) -> Result<Option<GenerationRow>> {
        self.query_generations("WHERE id = ?1", params![id])
            .map(|mut v| v.pop())
    }

    /// The generations of `role` (all roles when `None`), newest first.
    pub fn generations(&self, role: Option<&str>) -> Result<Vec<GenerationRow>> {
        match role {
            Some(role) => self.query_generations("WHERE role = ?1 ORDER BY id DESC", params![role]),
            None => self.query_generations("ORDER BY id DESC", params![]),
        }
    }

    /// The generation of `role` that serves traffic, if any.
    pub fn live_generation(&self, role: &str) -> Result<Option<GenerationRow>> {
        self.query_generations(
            "WHERE role = ?1 AND status = 'live' ORDER BY id DESC LIMIT 1",
            params![role],
        )
        .map(|mut v| v.pop())
    }

    /// Every live generation, of every role.
    pub fn live_generations(&self) -> Result<Vec<GenerationRow>> {
        self.query_generations("WHERE status = 'live' ORDER BY role", [])
    }

    /// The newest generation of `role` before `before` that once served and was replaced, with
    /// an image other than `not_image`: the rollback target.
    pub fn previous_generation(
        &self,
        role: &str,
        before: i64,
        not_image: &str,
    ) -> Result<Option<GenerationRow>> {
        self.query_generations(
            "WHERE role = ?1 AND id < ?2 AND status = 'retired' AND switched_at IS NOT NULL AND image != ?3 ORDER BY id DESC LIMIT 1",
            params![role, before, not_image],
        )
        .map(|mut v| v.pop())
    }

    fn query_generations(
        &self,
        tail: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<GenerationRow>> {
        let columns = "id, role, image, status, created_at, switched_at, ended_at";
        self.query_checked(
            &format!("SELECT {columns} FROM generations {tail}"),
            params,
            GenerationRow::from_row,
        )
    }

    /// Runs `sql` and maps each row with `from_row`, whose inner error names a value this
    /// version does not understand.
    fn query_checked<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        from_row: fn(&rusqlite::Row<'_>) -> rusqlite::Result<std::result::Result<T, String>>,
    ) -> Result<Vec<T>> {
        let raw = self.query(sql, params, from_row)?;
        raw.into_iter()
            .map(|r| r.map_err(|what| self.corrupt(what)))
            .collect()
    }

    /// Runs `sql` and maps each row with `from_row`.
    fn query<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        from_row: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql).map_err(|e| self.sql(e))?;
        let rows = stmt.query_map(params, from_row).map_err(|e| self.sql(e))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(|e| self.sql(e))
    }

    // ---- instances ----

    pub fn insert_instance(&self, instance: &InstanceRow) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO instances (name, role, generation, image, status, pid, pid_start, port, log_path, started_at, driver, addr)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    instance.name,
                    instance.role,
                    instance.generation,
                    instance.image,
                    instance.status.as_str(),
                    instance.pid,
                    instance.pid_start.map(|v| v as i64),
                    instance.port,
                    instance.log_path,
                    instance.started_at,
                    instance.driver,
                    instance.addr
                ],
            )
            .map(drop)
            .map_err(|e| self.sql(e))
    }

    /// Records the process of a started instance.
    /// Records the process of an instance whose row was written before it was started.
    pub fn set_instance_process(
        &self,
        name: &str,
        pid: u32,
        pid_start: u64,
        addr: std::net::SocketAddr,
    ) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE instances SET pid = ?1, pid_start = ?2, port = ?3, addr = ?4 WHERE name = ?5",
                params![pid, pid_start as i64, addr.port(), addr.to_string(), name],
            )
            .map(drop)
            .map_err(|e| self.sql(e))
    }

    pub fn set_instance_status(&self, name: &str, status: InstanceStatus, now: i64) -> Result<()> {
        let ended = if status.is_final() { Some(now) } else { None };
        self.conn()
            .execute(
                "UPDATE instances SET status = ?1, ended_at = COALESCE(?2, ended_at) WHERE name = ?3",
                params![status.as_str(), ended, name],
            )
            .map(drop)
            .map_err(|e| self.sql(e))
    }

    /// Instances whose process may still exist (not stopped, died or lost).
    pub fn active_instances(&self) -> Result<Vec<InstanceRow>> {
        self.query_instances(
            "WHERE status NOT IN ('stopped', 'died', 'lost') ORDER BY started_at, name",
            params![],
        )
    }

    /// The instance named `name`, if it was ever recorded.
    pub fn instance(&self, name: &str) -> Result<Option<InstanceRow>> {
        Ok(self
            .query_instances("WHERE name = ?1", params![name])?
            .into_iter()
            .next())
    }

    pub fn instances_of_generation(&self, generation: i64) -> Result<Vec<InstanceRow>> {
        self.query_instances(
            "WHERE generation = ?1 ORDER BY started_at, name",
            params![generation],
        )
    }

    fn query_instances(
        &self,
        tail: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<InstanceRow>> {
        let columns = "name, role, generation, image, status, pid, pid_start, port, log_path, started_at, ended_at, driver, addr";
        self.query_checked(
            &format!("SELECT {columns} FROM instances {tail}"),
            params,
            InstanceRow::from_row,
        )
    }

    // ---- deploys ----

    pub fn start_deploy(&self, role: &str, from: Option<i64>, to: i64, now: i64) -> Result<i64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO deploys (role, from_generation, to_generation, status, started_at) VALUES (?1, ?2, ?3, 'running', ?4)",
            params![role, from, to, now],
        )
        .map_err(|e| self.sql(e))?;
        Ok(conn.last_insert_rowid())
    }

    pub fn finish_deploy(
        &self,
        id: i64,
        status: DeployStatus,
        reason: Option<&str>,
        now: i64,
    ) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE deploys SET status = ?1, reason = ?2, ended_at = ?3 WHERE id = ?4",
                params![status.as_str(), reason, now, id],
            )
            .map(drop)
            .map_err(|e| self.sql(e))
    }

    /// Deploys that were running when the controller last stopped.
    pub fn running_deploys(&self) -> Result<Vec<DeployRow>> {
        let sql = "SELECT id, role, from_generation, to_generation, started_at FROM deploys WHERE status = 'running'";
        self.query(sql, [], DeployRow::from_row)
    }

    // ---- journal ----

    /// Appends an event to the journal and returns its sequence number.
    pub fn journal(
        &self,
        now: i64,
        role: Option<&str>,
        kind: &str,
        detail: &serde_json::Value,
    ) -> Result<i64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO journal (at, role, kind, detail) VALUES (?1, ?2, ?3, ?4)",
            params![now, role, kind, detail.to_string()],
        )
        .map_err(|e| self.sql(e))?;
        Ok(conn.last_insert_rowid())
    }

    /// The journal of `role` (everything when `None`), oldest first; at most the last `limit` events.
    /// Every role the journal names for what happened to it (not a call naming it, which
    /// may be a typo), sorted.
    pub fn journal_roles(&self) -> Result<Vec<String>> {
        self.query(
            "SELECT DISTINCT role FROM journal WHERE role IS NOT NULL AND kind != 'api.call' ORDER BY role",
            [],
            |row| row.get(0),
        )
    }

    pub fn history(&self, role: Option<&str>, limit: u32) -> Result<Vec<JournalRow>> {
        self.journal_rows(
            "SELECT seq, at, role, kind, detail FROM (
               SELECT * FROM journal WHERE ?1 IS NULL OR role = ?1 OR role IS NULL ORDER BY seq DESC LIMIT ?2
             ) ORDER BY seq",
            params![role, limit],
        )
    }

    /// Up to `limit` journal entries after sequence number `after`, oldest first.
    pub fn journal_after(&self, after: i64, limit: u32) -> Result<Vec<JournalRow>> {
        self.journal_rows(
            "SELECT seq, at, role, kind, detail FROM journal WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            params![after, limit],
        )
    }

    fn journal_rows(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<JournalRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql).map_err(|e| self.sql(e))?;
        let raw = stmt
            .query_map(params, JournalRow::from_row)
            .map_err(|e| self.sql(e))?;
        let raw: Vec<_> = raw
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.sql(e))?;
        raw.into_iter()
            .map(|r| {
                r.map_err(|cause| StoreError::Json {
                    path: self.path.clone(),
                    cause,
                })
            })
            .collect()
    }

    /// The sequence number of the newest journal entry (0 when there is none).
    pub fn journal_last_seq(&self) -> Result<i64> {
        self.conn()
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM journal", [], |row| {
                row.get(0)
            })
            .map_err(|e| self.sql(e))
    }

    /// The journal entry with sequence number `seq`, if any.
    pub fn journal_entry(&self, seq: i64) -> Result<Option<JournalRow>> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT seq, at, role, kind, detail FROM journal WHERE seq = ?1",
                params![seq],
                JournalRow::from_row,
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        row.transpose().map_err(|cause| StoreError::Json {
            path: self.path.clone(),
            cause,
        })
    }
}

#[cfg(test)]
mod tests;
