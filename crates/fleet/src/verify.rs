//! Verifying an image: boot a throwaway instance, run the recipe's checks against it, stop it,
//! and record the result. A deploy refuses an image whose recipe has checks unless its latest
//! verification passed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use phoenix_check::{Report, RunOptions, Target, TemplateData, describe};
use phoenix_driver::Driver;
use phoenix_image::{ImageStore, short_digest};
use phoenix_store::{Store, VerificationRow};
use serde::Serialize;
use serde_json::json;

use crate::deploy::Progress;
use crate::{FleetError, FleetFile};

/// How many failed checks a verification records and a refused deploy shows.
const FAILURES_KEPT: usize = 30;

/// What a verification needs from its surroundings.
#[derive(Clone)]
pub struct Verifier {
    pub store: Arc<Store>,
    pub images: ImageStore,
    pub driver: Arc<dyn Driver>,
    /// Where the throwaway instance's log goes (`logs/`).
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Checks are retried until they pass or this runs out: an instance needs a moment to
    /// start listening.
    pub run: RunOptions,
    /// `--vars`: what `{{.Vars.x}}` reads.
    pub vars: serde_json::Value,
    /// Grace between SIGTERM and SIGKILL when the throwaway instance is stopped.
    pub stop_timeout: Duration,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            run: RunOptions {
                retry_timeout: Duration::from_secs(10),
                sleep: Duration::from_millis(100),
                ..RunOptions::default()
            },
            vars: serde_json::Value::Null,
            stop_timeout: Duration::from_secs(5),
        }
    }
}

/// The outcome of verifying one image.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub row: VerificationRow,
    pub report: Report,
    /// The throwaway instance's log, when the checks failed.
    pub log_tail: Vec<String>,
}

/// The check file of recipe `name`, if it has one (relative paths are relative to the fleet file).
pub fn checks_of(fleet: &FleetFile, name: &str) -> Option<PathBuf> {
    let recipe = fleet.images.get(name)?;
    recipe.checks.as_ref().map(|path| fleet.dir.join(path))
}

impl Verifier {
    /// The verifier of a state directory, with the process driver: `phoenix verify` needs no
    /// running `phoenix up`.
    pub fn open(state_dir: &Path) -> Result<Verifier, FleetError> {
        let logs = state_dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|cause| FleetError::Io {
            what: format!("create {}", logs.display()),
            cause,
        })?;
        Ok(Verifier {
            store: Arc::new(Store::open(state_dir.join("state.db"))?),
            images: ImageStore::open(state_dir.join("images"))?,
            driver: Arc::new(phoenix_driver::ProcessDriver),
            state_dir: state_dir.to_path_buf(),
        })
    }

    /// Verifies image `digest` with the checks of recipe `name`, and records the result in the
    /// state and the journal.
    pub async fn verify(
        &self,
        fleet: &FleetFile,
        name: &str,
        digest: &str,
        options: &VerifyOptions,
        progress: &Progress,
        now: i64,
    ) -> Result<Verification, FleetError> {
        let checks = checks_of(fleet, name).ok_or_else(|| FleetError::NoChecks {
            name: name.into(),
            file: fleet.path.display().to_string(),
        })?;
        let (root, config) = crate::instance::unpack(&self.images, digest).await?;
        let instance = format!("verify-{}", short_digest(digest));
        let log_path = self
            .state_dir
            .join("logs")
            .join(format!("{instance}-{now}.log"));
        let extra = [("PHOENIX_ROLE", "verify".to_string())];
        let spec =
            crate::instance::spec(&instance, root.clone(), &config, &extra, log_path.clone());
        let (mut process, addr) = self.driver.start(&spec)?;
        progress.say(format!(
            "verifying {name} {}: instance {instance} (pid {}, {addr}), checks {}",
            short_digest(digest),
            process.pid,
            checks.display()
        ));
        let mut env = spec.env;
        env.push(("PORT".into(), addr.port().to_string()));
        env.push(("PHOENIX_INSTANCE".into(), instance));
        let target = instance_target(&root, &config.working_dir, &env);
        let outcome = run_checks(&checks, target, env, options).await;
        process.stop(options.stop_timeout).await;
        let (suite, report) = outcome?;
        let failures: Vec<String> = report
            .failures()
            .take(FAILURES_KEPT)
            .map(describe)
            .collect();
        let row = VerificationRow {
            image: digest.into(),
            name: name.into(),
            checks: suite.digest,
            passed: report.passed(),
            total: report.outcomes.len() as u32,
            failed: report.failures().count() as u32,
            failures,
            files: suite
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect(),
            at: now,
        };
        let (store, record) = (self.store.clone(), row.clone());
        tokio::task::spawn_blocking(move || {
            store.record_verification(&record)?;
            let detail = json!({"name": record.name, "image": record.image, "checks": record.checks,
                "passed": record.passed, "total": record.total, "failed": record.failed, "failures": record.failures});
            store.journal(now, None, "image.verified", &detail)
        })
        .await
        .map_err(|e| FleetError::Internal(e.to_string()))??;
        let log_tail = match row.passed {
            true => Vec::new(),
            false => crate::instance::log_tail(&log_path, 10),
        };
        Ok(Verification {
            row,
            report,
            log_tail,
        })
    }
}

/// An instance of the process driver: its files under its root, everything else the host's;
/// commands run with its environment (plus the host's `PATH`) in its working directory.
fn instance_target(root: &Path, workdir: &str, env: &[(String, String)]) -> Target {
    let mut env = env.to_vec();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push((
            "PATH".into(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        ));
    }
    Target {
        root: root.to_path_buf(),
        env: Some(env),
        workdir: Some(root.join(workdir.trim_start_matches('/'))),
    }
}

/// Loads and runs the checks off the async runtime. `.Env` is this process's environment with
/// the instance's on top, so `{{.Env.PORT}}` is the instance's port.
async fn run_checks(
    checks: &Path,
    target: Target,
    instance_env: Vec<(String, String)>,
    options: &VerifyOptions,
) -> Result<(phoenix_check::Suite, Report), FleetError> {
    let (checks, options) = (checks.to_path_buf(), options.clone());
    tokio::task::spawn_blocking(move || {
        let mut env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
        env.extend(instance_env);
        let data = TemplateData {
            vars: options.vars,
            env,
        };
        let suite = phoenix_check::load(&checks, &data)?;
        let report = phoenix_check::run(&suite, &target, &options.run);
        Ok((suite, report))
    })
    .await
    .map_err(|e| FleetError::Internal(e.to_string()))?
}

/// True when `row` passed and the check files it ran are unchanged: no need to verify again.
pub fn still_passes(row: &VerificationRow) -> bool {
    let files: Vec<PathBuf> = row.files.iter().map(PathBuf::from).collect();
    row.passed && phoenix_check::digest_of(&files).as_deref() == Some(row.checks.as_str())
}

/// Refuses `digest` for a deploy when recipe `name` has checks and the image's latest
/// verification is missing or failed.
pub fn gate(store: &Store, fleet: &FleetFile, name: &str, digest: &str) -> Result<(), FleetError> {
    if checks_of(fleet, name).is_none() {
        return Ok(());
    }
    let refused = |reason: String| FleetError::NotVerified {
        image: short_digest(digest).to_string(),
        reason,
    };
    match store.latest_verification(digest)? {
        None => Err(refused(format!(
            "recipe {name} has checks and the image was never verified; run `phoenix verify {}`",
            short_digest(digest)
        ))),
        Some(row) if !row.passed => Err(refused(format!(
            "its verification failed {} of {} checks:\n  {}",
            row.failed,
            row.total,
            row.failures.join("\n  ")
        ))),
        Some(_) => Ok(()),
    }
}
