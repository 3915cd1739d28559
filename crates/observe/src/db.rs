//! The metrics database: raw samples, roll-ups, retention and queries. Every function takes
//! the time as an argument, so tests drive it with their own clock.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, params};
use serde::Serialize;

use crate::ObserveError;

/// Raw samples are kept this long (1 hour).
const RAW_KEEP_MS: i64 = 3_600_000;

/// One value of one metric at one time: of an instance, or of the role as a whole (the
/// proxy's view) when `instance` is empty.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub role: String,
    pub instance: String,
    pub image: String,
    pub metric: String,
    pub value: f64,
}

/// A point of a role's series, over its interval. `role` is the role's own value as its proxy
/// sees it (requests per second, errors, in flight, and latency percentiles from the histogram
/// of all the role's requests), averaged over the interval; `None` for what only instances
/// have (cpu, memory). The others describe the instances' values: `sum` the mean of the
/// per-second totals across instances (`None` for percentiles, which do not add up), `avg` the
/// mean per instance, `p95` the 95th percentile of the instances' values, `n` how many.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// Start of the interval (Unix milliseconds; `at`, RFC 3339, in JSON).
    #[serde(rename = "at", with = "phoenix_image::wire_time")]
    pub t: i64,
    pub role: Option<f64>,
    pub sum: Option<f64>,
    pub avg: f64,
    pub p95: f64,
    /// Instance values aggregated.
    pub n: u64,
}

/// Metrics whose instance values do not add up to the role's (latency percentiles).
fn additive(metric: &str) -> bool {
    !metric.ends_with("_ms")
}

/// The resolution of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Per second, from raw samples (the last hour).
    Raw,
    /// 10-second roll-ups (7 days).
    TenSeconds,
    /// 1-minute roll-ups (90 days).
    Minute,
}

impl Resolution {
    fn millis(self) -> i64 {
        match self {
            Resolution::Raw => 1_000,
            Resolution::TenSeconds => 10_000,
            Resolution::Minute => 60_000,
        }
    }

    fn keep_ms(self) -> i64 {
        match self {
            Resolution::Raw => RAW_KEEP_MS,
            Resolution::TenSeconds => 7 * 86_400_000,
            Resolution::Minute => 90 * 86_400_000,
        }
    }

    /// The finest resolution still held for data as old as `since_ms` before `now_ms`.
    pub fn for_window(now_ms: i64, since_ms: i64) -> Resolution {
        let age = now_ms - since_ms;
        if age <= RAW_KEEP_MS {
            Resolution::Raw
        } else if age <= Resolution::TenSeconds.keep_ms() {
            Resolution::TenSeconds
        } else {
            Resolution::Minute
        }
    }
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS samples (
    t        INTEGER NOT NULL,
    role     TEXT NOT NULL,
    instance TEXT NOT NULL,
    image    TEXT NOT NULL,
    metric   TEXT NOT NULL,
    value    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_time ON samples (t);
CREATE INDEX IF NOT EXISTS samples_by_role ON samples (role, metric, t);
CREATE TABLE IF NOT EXISTS rollups (
    resolution INTEGER NOT NULL,
    t          INTEGER NOT NULL,
    role       TEXT NOT NULL,
    metric     TEXT NOT NULL,
    sum        REAL,
    avg        REAL NOT NULL,
    p95        REAL NOT NULL,
    n          INTEGER NOT NULL,
    role_value REAL,
    PRIMARY KEY (resolution, role, metric, t)
);
-- Up to where (exclusive, Unix ms) each resolution has been rolled up.
CREATE TABLE IF NOT EXISTS rolled (
    resolution INTEGER PRIMARY KEY,
    until      INTEGER NOT NULL
);
"#;

/// A database made before roll-ups kept the role's own value: its older points keep theirs
/// (instances and role mixed), newer ones are right.
fn upgrade(conn: &Connection) -> rusqlite::Result<()> {
    let has_role_value: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('rollups') WHERE name = 'role_value'")?
        .exists([])?;
    if !has_role_value {
        conn.execute_batch("ALTER TABLE rollups ADD COLUMN role_value REAL")?;
    }
    Ok(())
}

/// `STATE/metrics.db`, apart from `state.db` so that a sample every second never waits for
/// the controller's writes.
pub struct MetricsDb {
    conn: Mutex<Connection>,
    path: String,
}

impl MetricsDb {
    pub fn open(path: impl AsRef<Path>) -> Result<MetricsDb, ObserveError> {
        let shown = path.as_ref().display().to_string();
        let fail = |cause| ObserveError::Sql {
            path: shown.clone(),
            cause,
        };
        let conn = Connection::open(path.as_ref()).map_err(fail)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(fail)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(fail)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(fail)?;
        conn.execute_batch(SCHEMA).map_err(fail)?;
        upgrade(&conn).map_err(fail)?;
        Ok(MetricsDb {
            conn: Mutex::new(conn),
            path: shown,
        })
    }

    fn sql(&self, cause: rusqlite::Error) -> ObserveError {
        ObserveError::Sql {
            path: self.path.clone(),
            cause,
        }
    }

    /// Records one second's samples, taken at `t_ms`.
    pub fn record(&self, t_ms: i64, samples: &[Sample]) -> Result<(), ObserveError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction().map_err(|e| self.sql(e))?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO samples (t, role, instance, image, metric, value)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(|e| self.sql(e))?;
            for s in samples {
                insert
                    .execute(params![
                        t_ms, s.role, s.instance, s.image, s.metric, s.value
                    ])
                    .map_err(|e| self.sql(e))?;
            }
        }
        tx.commit().map_err(|e| self.sql(e))
    }

    /// Rolls up every complete 10-second and 1-minute interval not rolled up yet, then drops
    /// what is past its retention.
    pub fn maintain(&self, now_ms: i64) -> Result<(), ObserveError> {
        for resolution in [Resolution::TenSeconds, Resolution::Minute] {
            self.roll_up(resolution, now_ms)?;
        }
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute(
            "DELETE FROM samples WHERE t < ?1",
            params![now_ms - RAW_KEEP_MS],
        )
        .map_err(|e| self.sql(e))?;
        for resolution in [Resolution::TenSeconds, Resolution::Minute] {
            conn.execute(
                "DELETE FROM rollups WHERE resolution = ?1 AND t < ?2",
                params![resolution.millis(), now_ms - resolution.keep_ms()],
            )
            .map_err(|e| self.sql(e))?;
        }
        Ok(())
    }

    fn roll_up(&self, resolution: Resolution, now_ms: i64) -> Result<(), ObserveError> {
        let step = resolution.millis();
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let rolled: Option<i64> = conn
            .query_row(
                "SELECT until FROM rolled WHERE resolution = ?1",
                params![step],
                |row| row.get(0),
            )
            .ok();
        let oldest: Option<i64> = conn
            .query_row("SELECT MIN(t) FROM samples", [], |row| row.get(0))
            .map_err(|e| self.sql(e))?;
        let Some(oldest) = rolled.or(oldest.map(|t| t - t.rem_euclid(step))) else {
            return Ok(());
        };
        let until = now_ms - now_ms.rem_euclid(step);
        if until <= oldest {
            return Ok(());
        }
        let rows = read_samples(&conn, oldest, until, None, None).map_err(|e| self.sql(e))?;
        let points = aggregate(&rows, step);
        let tx = conn.unchecked_transaction().map_err(|e| self.sql(e))?;
        for ((role, metric, t), point) in points {
            tx.execute(
                "INSERT OR REPLACE INTO rollups
                 (resolution, t, role, metric, sum, avg, p95, n, role_value)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    step,
                    t,
                    role,
                    metric,
                    point.sum,
                    point.avg,
                    point.p95,
                    point.n as i64,
                    point.role
                ],
            )
            .map_err(|e| self.sql(e))?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO rolled (resolution, until) VALUES (?1, ?2)",
            params![step, until],
        )
        .map_err(|e| self.sql(e))?;
        tx.commit().map_err(|e| self.sql(e))
    }

    /// The series of `metric` for `role` since `since_ms`, at `resolution`.
    pub fn query(
        &self,
        role: &str,
        metric: &str,
        since_ms: i64,
        resolution: Resolution,
    ) -> Result<Vec<Point>, ObserveError> {
        if !crate::METRICS.contains(&metric) {
            return Err(ObserveError::UnknownMetric(metric.into()));
        }
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if resolution == Resolution::Raw {
            let rows = read_samples(&conn, since_ms, i64::MAX, Some(role), Some(metric))
                .map_err(|e| self.sql(e))?;
            return Ok(aggregate(&rows, 1_000).into_values().collect());
        }
        let mut statement = conn
            .prepare(
                "SELECT t, sum, avg, p95, n, role_value FROM rollups
                 WHERE resolution = ?1 AND role = ?2 AND metric = ?3 AND t >= ?4 ORDER BY t",
            )
            .map_err(|e| self.sql(e))?;
        let points = statement
            .query_map(
                params![resolution.millis(), role, metric, since_ms],
                |row| {
                    Ok(Point {
                        t: row.get(0)?,
                        role: row.get(5)?,
                        sum: row.get(1)?,
                        avg: row.get(2)?,
                        p95: row.get(3)?,
                        n: row.get::<_, i64>(4)? as u64,
                    })
                },
            )
            .map_err(|e| self.sql(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql(e))?;
        Ok(points)
    }

    /// Every role with samples or roll-ups, sorted.
    pub fn roles(&self) -> Result<Vec<String>, ObserveError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut statement = conn
            .prepare("SELECT role FROM samples UNION SELECT role FROM rollups ORDER BY role")
            .map_err(|e| self.sql(e))?;
        let roles = statement
            .query_map([], |row| row.get(0))
            .map_err(|e| self.sql(e))?
            .collect::<Result<Vec<String>, _>>()
            .map_err(|e| self.sql(e))?;
        Ok(roles)
    }

    /// The newest sample of every instance and role (for `phoenix top`), with its time.
    pub fn latest(&self) -> Result<Vec<(i64, Sample)>, ObserveError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let newest: Option<i64> = conn
            .query_row("SELECT MAX(t) FROM samples", [], |row| row.get(0))
            .map_err(|e| self.sql(e))?;
        let Some(newest) = newest else {
            return Ok(Vec::new());
        };
        let rows = read_samples(&conn, newest, newest + 1, None, None).map_err(|e| self.sql(e))?;
        Ok(rows)
    }
}

fn read_samples(
    conn: &Connection,
    from: i64,
    until: i64,
    role: Option<&str>,
    metric: Option<&str>,
) -> rusqlite::Result<Vec<(i64, Sample)>> {
    let mut statement = conn.prepare_cached(
        "SELECT t, role, instance, image, metric, value FROM samples
         WHERE t >= ?1 AND t < ?2 AND (?3 IS NULL OR role = ?3) AND (?4 IS NULL OR metric = ?4)
         ORDER BY t",
    )?;
    statement
        .query_map(params![from, until, role, metric], |row| {
            Ok((
                row.get(0)?,
                Sample {
                    role: row.get(1)?,
                    instance: row.get(2)?,
                    image: row.get(3)?,
                    metric: row.get(4)?,
                    value: row.get(5)?,
                },
            ))
        })?
        .collect()
}

/// A role, a metric and the start of an interval.
type SeriesKey = (String, String, i64);

/// What one interval of one role and metric gathers: the instances' values, their total per
/// second, and the role's own values.
#[derive(Default)]
struct Gathered {
    values: Vec<f64>,
    totals: BTreeMap<i64, f64>,
    role: Vec<f64>,
}

/// Groups samples into intervals of `step` ms per role and metric (see [`Point`]); the role's
/// own samples (no instance) are kept apart from its instances'.
fn aggregate(rows: &[(i64, Sample)], step: i64) -> BTreeMap<SeriesKey, Point> {
    let mut groups: BTreeMap<SeriesKey, Gathered> = BTreeMap::new();
    for (t, sample) in rows {
        let interval = t - t.rem_euclid(step);
        let second = t - t.rem_euclid(1_000);
        let gathered = groups
            .entry((sample.role.clone(), sample.metric.clone(), interval))
            .or_default();
        if sample.instance.is_empty() {
            gathered.role.push(sample.value);
        } else {
            gathered.values.push(sample.value);
            *gathered.totals.entry(second).or_default() += sample.value;
        }
    }
    groups
        .into_iter()
        .map(|(key, mut gathered)| {
            let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
            let values = &mut gathered.values;
            values.sort_by(|a, b| a.total_cmp(b));
            let rank = ((0.95 * values.len() as f64).ceil() as usize).clamp(1, values.len().max(1));
            let totals: Vec<f64> = gathered.totals.values().copied().collect();
            let point = Point {
                t: key.2,
                role: (!gathered.role.is_empty()).then(|| mean(&gathered.role)),
                sum: (additive(&key.1) && !totals.is_empty()).then(|| mean(&totals)),
                avg: if values.is_empty() { 0.0 } else { mean(values) },
                p95: values.get(rank - 1).copied().unwrap_or(0.0),
                n: values.len() as u64,
            };
            (key, point)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first sample's time: on a minute boundary.
    const T0: i64 = 1_020_000;

    fn sample(role: &str, instance: &str, metric: &str, value: f64) -> Sample {
        Sample {
            role: role.into(),
            instance: instance.into(),
            image: "sha256:x".into(),
            metric: metric.into(),
            value,
        }
    }

    /// 30 s of two instances: a at 0.2 cpu, b at 0.4 (0.8 from second 20 on).
    fn db_with_samples() -> (tempfile::TempDir, MetricsDb) {
        let dir = tempfile::tempdir().unwrap();
        let db = MetricsDb::open(dir.path().join("metrics.db")).unwrap();
        for second in 0..30 {
            let b = if second < 20 { 0.4 } else { 0.8 };
            let t = T0 + second * 1_000;
            db.record(
                t,
                &[
                    sample("web", "web-a", "cpu", 0.2),
                    sample("web", "web-b", "cpu", b),
                    sample("web", "", "rps", 100.0 + second as f64),
                    sample("web", "web-a", "rps", 60.0 + second as f64),
                    sample("web", "web-b", "rps", 40.0),
                    sample("web", "", "p99_ms", 12.0),
                    sample("web", "web-a", "p99_ms", 10.0),
                    sample("web", "web-b", "p99_ms", 14.0),
                ],
            )
            .unwrap();
        }
        (dir, db)
    }

    #[test]
    fn ten_second_rollups_sum_average_and_p95_across_instances() {
        let (_dir, db) = db_with_samples();
        db.maintain(T0 + 30_000).unwrap();
        let points = db.query("web", "cpu", 0, Resolution::TenSeconds).unwrap();
        let t0 = T0;
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert_eq!(points.len(), 3, "{points:?}");
        assert_eq!(points[0].t, t0);
        assert!(
            close(points[0].sum.unwrap(), 0.6) && close(points[0].avg, 0.3),
            "{points:?}"
        );
        assert!(close(points[0].p95, 0.4) && points[0].n == 20);
        assert_eq!(points[0].role, None, "cpu is the instances' only");
        assert!(
            close(points[2].sum.unwrap(), 1.0)
                && close(points[2].avg, 0.5)
                && close(points[2].p95, 0.8)
        );
        // The role's own row (its proxy's view) apart from its instances': the instances'
        // totals are 100 + s a second as the proxy's are, not twice that.
        let rps = db.query("web", "rps", 0, Resolution::TenSeconds).unwrap();
        assert!(
            close(rps[1].role.unwrap(), 114.5)
                && close(rps[1].sum.unwrap(), 114.5)
                && close(rps[1].avg, 57.25)
                && rps[1].n == 20,
            "{rps:?}"
        );
        // Percentiles: the role's from its own histogram; instance values never summed.
        let p99 = db
            .query("web", "p99_ms", 0, Resolution::TenSeconds)
            .unwrap();
        assert!(
            close(p99[0].role.unwrap(), 12.0)
                && p99[0].sum.is_none()
                && close(p99[0].p95, 14.0)
                && close(p99[0].avg, 12.0),
            "{p99:?}"
        );
        // Rolling up again adds nothing; an incomplete minute is not rolled up.
        db.maintain(T0 + 30_500).unwrap();
        assert_eq!(
            db.query("web", "cpu", 0, Resolution::TenSeconds).unwrap(),
            points
        );
        assert!(
            db.query("web", "cpu", 0, Resolution::Minute)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn raw_queries_give_per_second_totals_and_retention_drops_old_data() {
        let (_dir, db) = db_with_samples();
        let raw = db
            .query("web", "cpu", T0 + 25_000, Resolution::Raw)
            .unwrap();
        assert_eq!(raw.len(), 5);
        assert!((raw[0].sum.unwrap() - 1.0).abs() < 1e-9 && raw[0].n == 2);
        db.maintain(T0 + 60_000).unwrap();
        let minute = db.query("web", "cpu", 0, Resolution::Minute).unwrap();
        assert_eq!(minute.len(), 1);
        assert_eq!(minute[0].n, 60);
        // An hour later the raw samples are gone; the role's roll-ups stay.
        db.maintain(T0 + RAW_KEEP_MS + 60_000).unwrap();
        assert!(
            db.query("web", "cpu", 0, Resolution::Raw)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            db.query("web", "cpu", 0, Resolution::TenSeconds)
                .unwrap()
                .len(),
            3
        );
        assert!(db.latest().unwrap().is_empty());
        // After 7 days the 10-second points go; after 90 days the minutes too.
        db.maintain(T0 + 8 * 86_400_000).unwrap();
        assert!(
            db.query("web", "cpu", 0, Resolution::TenSeconds)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            db.query("web", "cpu", 0, Resolution::Minute).unwrap().len(),
            1
        );
        db.maintain(T0 + 91 * 86_400_000).unwrap();
        assert!(
            db.query("web", "cpu", 0, Resolution::Minute)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn unknown_metrics_are_refused_and_resolutions_follow_the_window() {
        let (_dir, db) = db_with_samples();
        assert!(matches!(
            db.query("web", "cpus", 0, Resolution::Raw),
            Err(ObserveError::UnknownMetric(_))
        ));
        let now = 10 * 86_400_000;
        assert_eq!(Resolution::for_window(now, now - 60_000), Resolution::Raw);
        assert_eq!(
            Resolution::for_window(now, now - 2 * 86_400_000),
            Resolution::TenSeconds
        );
        assert_eq!(Resolution::for_window(now, 0), Resolution::Minute);
        let latest = db.latest().unwrap();
        assert_eq!(
            latest.len(),
            8,
            "every instance and role row of the newest second"
        );
        assert!(latest.iter().all(|(t, _)| *t == T0 + 29_000));
    }
}
