//! The schema, versioned with SQLite's `user_version`.

use rusqlite::Connection;

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE images (
    digest     TEXT NOT NULL,
    name       TEXT NOT NULL,
    size       INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (digest, name)
);
CREATE TABLE generations (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    role        TEXT NOT NULL,
    image       TEXT NOT NULL,
    status      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER,
    switched_at INTEGER,
    ended_at    INTEGER
);
CREATE INDEX generations_by_role ON generations (role, status);
CREATE TABLE instances (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL,
    generation INTEGER NOT NULL REFERENCES generations (id),
    image      TEXT NOT NULL,
    status     TEXT NOT NULL,
    pid        INTEGER,
    pid_start  INTEGER,
    port       INTEGER NOT NULL,
    log_path   TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at   INTEGER
);
CREATE INDEX instances_by_status ON instances (status);
CREATE TABLE deploys (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    role            TEXT NOT NULL,
    from_generation INTEGER,
    to_generation   INTEGER NOT NULL,
    status          TEXT NOT NULL,
    reason          TEXT,
    started_at      INTEGER NOT NULL,
    ended_at        INTEGER
);
CREATE TABLE journal (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    role   TEXT,
    kind   TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX journal_by_role ON journal (role, seq);
-- The journal is append-only: history is never rewritten.
CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal BEGIN SELECT RAISE(ABORT, 'the journal is append-only'); END;
CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal BEGIN SELECT RAISE(ABORT, 'the journal is append-only'); END;
"#,
    r#"
CREATE TABLE verifications (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    image    TEXT NOT NULL,
    name     TEXT NOT NULL,
    checks   TEXT NOT NULL,
    passed   INTEGER NOT NULL,
    total    INTEGER NOT NULL,
    failed   INTEGER NOT NULL,
    failures TEXT NOT NULL,
    files    TEXT NOT NULL,
    at       INTEGER NOT NULL
);
CREATE INDEX verifications_by_image ON verifications (image, id);
"#,
    r#"
-- A role's size set by `phoenix scale`, and the fleet file's `instances` when it was set: a
-- later change of the file wins over it.
CREATE TABLE role_sizes (
    role           TEXT PRIMARY KEY,
    instances      INTEGER NOT NULL,
    file_instances INTEGER NOT NULL,
    at             INTEGER NOT NULL
);
"#,
    r#"
-- What ran each instance (recovery ends it the same way) and the address it served on.
ALTER TABLE instances ADD COLUMN driver TEXT NOT NULL DEFAULT 'process';
ALTER TABLE instances ADD COLUMN addr TEXT;
"#,
    r#"
-- `name:tag` -> digest: a tag names one image of a name and moves when given to another.
CREATE TABLE tags (
    name       TEXT NOT NULL,
    tag        TEXT NOT NULL,
    digest     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (name, tag)
);
"#,
];

pub(crate) fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
