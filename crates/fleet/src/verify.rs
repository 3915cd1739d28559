//! Verifying an image: boot a throwaway instance, run the recipe's checks against it, stop it,
//! and record the result. A deploy refuses an image whose recipe has checks unless its latest
//! verification passed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use phoenix_check::{Report, RunOptions, Target, TemplateData, describe};
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
    /// What runs the throwaway instance: the driver and network of a role of the image.
    pub(crate) drivers: Arc<crate::drivers::Drivers>,
    pub(crate) secrets: Arc<crate::secrets::Secrets>,
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
    /// The throwaway instance's last lines, when the checks failed.
    pub log_tail: Vec<String>,
    /// Its name: `phoenix logs NAME` shows all it wrote.
    pub instance: String,
}

/// The log store's directory of verification instances' output; `_` keeps it apart from
/// every role (role names are a-z, 0-9 and `-`).
pub const VERIFY_LOGS: &str = "_verify";

impl Verification {
    /// Why a deploy cannot use the image: the failed checks, the instance's last lines and
    /// the command that shows the rest.
    pub fn failure(&self) -> String {
        let mut reason = format!(
            "its verification failed {} of {} checks:\n  {}",
            self.row.failed,
            self.row.total,
            self.row.failures.join("\n  ")
        );
        if !self.log_tail.is_empty() {
            reason.push_str(&format!(
                "\nlast lines of the verification instance's output (more: phoenix logs {}):\n  {}",
                self.instance,
                self.log_tail.join("\n  ")
            ));
        }
        reason
    }
}

/// The check file of recipe `name`, if it has one (relative paths are relative to the fleet file).
pub fn checks_of(fleet: &FleetFile, name: &str) -> Option<PathBuf> {
    let recipe = fleet.images.get(name)?;
    recipe.checks.as_ref().map(|path| fleet.dir.join(path))
}

impl Verifier {
    /// The verifier of a state directory: `phoenix verify` needs no running `phoenix up`. The
    /// throwaway instance runs on its role's driver, on the host's network (a bridge belongs
    /// to `phoenix up`). Also returns why a driver fell back, if one did.
    pub fn open(
        state_dir: &Path,
        fleet: &FleetFile,
    ) -> Result<(Verifier, Vec<String>), FleetError> {
        let logs = state_dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|cause| FleetError::Io {
            what: format!("create {}", logs.display()),
            cause,
        })?;
        let drivers = crate::drivers::Drivers::open(fleet, state_dir, false, None, None)?;
        let warnings = drivers.warnings.clone();
        let verifier = Verifier {
            store: Arc::new(Store::open(state_dir.join("state.db"))?),
            images: ImageStore::open(state_dir.join("images"))?,
            drivers: Arc::new(drivers),
            secrets: Arc::new(crate::secrets::Secrets::capture(fleet)),
            state_dir: state_dir.to_path_buf(),
        };
        Ok((verifier, warnings))
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
        // The instance runs as a role of the image would: its driver, settings and secrets.
        let role = fleet.roles.iter().find(|(_, r)| r.image == name);
        let run = role.map(|(_, r)| r.run.clone()).unwrap_or_default();
        let placement = self.drivers.placement(role.map_or("", |(n, _)| n.as_str()));
        let driver = placement.driver.clone();
        let (root, config) =
            crate::instance::unpack(&self.images, digest, driver.as_ref(), run.allow_root).await?;
        let instance = format!(
            "verify-{}{:06x}",
            &short_digest(digest)[..6],
            (now as u64) & 0xff_ffff
        );
        // Its output goes to the log store, under `_verify` (no role can be named so).
        let source = crate::capture::Source {
            role: VERIFY_LOGS.into(),
            instance: instance.clone(),
            generation: 0,
            image: short_digest(digest).to_string(),
        };
        let (output, pipes) = crate::capture::OneOff::start(
            crate::capture::store_dir(&self.state_dir),
            source,
            Arc::new(crate::SystemClock),
        )
        .map_err(|cause| FleetError::Io {
            what: format!("make the output pipes of {instance}"),
            cause,
        })?;
        let log_path = self.state_dir.join("logs").join(format!("{instance}.log"));
        let launch = crate::instance::Launch {
            role: "",
            secrets: self.secrets.values(fleet, &run.secrets)?,
            run: &run,
            network: placement.network.clone(),
            hosts: Vec::new(),
            host_ip: std::net::Ipv4Addr::LOCALHOST,
        };
        let extra = [("PHOENIX_ROLE", "verify".to_string())];
        let mut spec =
            crate::instance::spec(&instance, root.clone(), &config, &launch, &extra, log_path);
        spec.output = Some(pipes);
        let starting = (driver.clone(), spec.clone());
        // Only the instance holds the pipes' write ends from here: its end is their end.
        spec.output = None;
        let (mut process, addr) =
            tokio::task::spawn_blocking(move || starting.0.start(&starting.1))
                .await
                .map_err(|e| FleetError::Internal(e.to_string()))??;
        progress.say(format!(
            "verifying {name} {}: instance {instance} ({} driver, pid {}, {addr}), checks {}",
            short_digest(digest),
            driver.name(),
            process.pid,
            checks.display()
        ));
        let mut env = spec.env;
        env.push(("PORT".into(), addr.port().to_string()));
        env.push(("HOST".into(), addr.ip().to_string()));
        env.push(("PHOENIX_INSTANCE".into(), instance.clone()));
        // Containers are checked from inside, as the instance sees itself; the process driver's
        // instances from the host, their files under the root.
        let inside = driver.id_offset(run.allow_root).map(|_| process.pid);
        let target = instance_target(&root, &config.working_dir, &env);
        let outcome = run_checks(&checks, target, inside, env, options).await;
        process.stop(options.stop_timeout).await;
        let (lines, log_position) = output.finish(Duration::from_secs(3), now).await;
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
        let logs = format!("phoenix logs {instance}");
        let detail = json!({"name": record.name, "image": record.image, "checks": record.checks,
            "passed": record.passed, "total": record.total, "failed": record.failed,
            "failures": record.failures, "instance": instance, "logs": logs,
            "log_position": log_position});
        tokio::task::spawn_blocking(move || {
            store.record_verification(&record)?;
            store.journal(now, None, "image.verified", &detail)
        })
        .await
        .map_err(|e| FleetError::Internal(e.to_string()))??;
        let log_tail = match row.passed {
            true => Vec::new(),
            false => {
                let skip = lines.len().saturating_sub(10);
                lines[skip..].iter().map(|l| l.text.clone()).collect()
            }
        };
        Ok(Verification {
            row,
            report,
            log_tail,
            instance,
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
/// the instance's on top, so `{{.Env.PORT}}` is the instance's port. With `inside`, the checks
/// run in a helper process that joins the namespaces of that instance process first.
async fn run_checks(
    checks: &Path,
    target: Target,
    inside: Option<u32>,
    instance_env: Vec<(String, String)>,
    options: &VerifyOptions,
) -> Result<(phoenix_check::Suite, Report), FleetError> {
    let (checks, options) = (checks.to_path_buf(), options.clone());
    tokio::task::spawn_blocking(move || {
        let mut env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
        env.extend(instance_env);
        let data = TemplateData {
            vars: options.vars.clone(),
            env,
        };
        let suite = phoenix_check::load(&checks, &data)?;
        for warning in &suite.warnings {
            tracing::warn!("checks: {warning}");
        }
        let report = match inside {
            None => phoenix_check::run(&suite, &target, &options.run),
            Some(pid) => {
                let request = CheckIn {
                    pid,
                    checks: checks.clone(),
                    vars: data.vars,
                    env: data.env,
                    retry_timeout_ms: options.run.retry_timeout.as_millis() as u64,
                    sleep_ms: options.run.sleep.as_millis() as u64,
                    max_concurrent: options.run.max_concurrent,
                };
                check_inside(&request)?
            }
        };
        Ok((suite, report))
    })
    .await
    .map_err(|e| FleetError::Internal(e.to_string()))?
}

/// The argument that makes the `phoenix` binary run checks inside an instance.
pub(crate) const CHECK_IN_ARG: &str = "__phoenix-check-in";

/// What the check helper reads on stdin.
#[derive(Debug, Serialize, serde::Deserialize)]
struct CheckIn {
    pid: u32,
    checks: PathBuf,
    vars: serde_json::Value,
    env: std::collections::BTreeMap<String, String>,
    retry_timeout_ms: u64,
    sleep_ms: u64,
    max_concurrent: usize,
}

/// Runs the checks in a helper (this binary again), which enters the instance's namespaces.
fn check_inside(request: &CheckIn) -> Result<Report, FleetError> {
    use std::io::Write;
    let io = |what: &str, cause: std::io::Error| FleetError::Io {
        what: format!("{what} the check helper"),
        cause,
    };
    let mut child = std::process::Command::new("/proc/self/exe")
        .arg(CHECK_IN_ARG)
        .env_clear()
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| io("start", e))?;
    let body = serde_json::to_vec(request).map_err(|e| FleetError::Internal(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&body).map_err(|e| io("feed", e))?;
    }
    let output = child.wait_with_output().map_err(|e| io("wait for", e))?;
    serde_json::from_slice(&output.stdout).map_err(|_| {
        FleetError::Internal(format!(
            "the check helper failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    })
}

/// The check helper: loads the checks (from the host's files), joins the instance's
/// namespaces, runs them there and prints the report as JSON. Returns the exit code.
pub(crate) fn check_in_main() -> i32 {
    use std::io::Read;
    let mut input = Vec::new();
    if std::io::stdin()
        .take(16 << 20)
        .read_to_end(&mut input)
        .is_err()
    {
        return 2;
    }
    let request: CheckIn = match serde_json::from_slice(&input) {
        Ok(request) => request,
        Err(e) => {
            eprintln!("phoenix check helper: bad request: {e}");
            return 2;
        }
    };
    let data = TemplateData {
        vars: request.vars,
        env: request.env,
    };
    let suite = match phoenix_check::load(&request.checks, &data) {
        Ok(suite) => suite,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    if let Err(e) = phoenix_driver::enter(request.pid) {
        eprintln!("cannot enter instance process {}: {e}", request.pid);
        return 1;
    }
    let options = RunOptions {
        max_concurrent: request.max_concurrent,
        retry_timeout: Duration::from_millis(request.retry_timeout_ms),
        sleep: Duration::from_millis(request.sleep_ms),
    };
    let mut target = Target::host();
    target.env = Some(data.env.into_iter().collect());
    let report = phoenix_check::run(&suite, &target, &options);
    match serde_json::to_string(&report) {
        Ok(json) => {
            println!("{json}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
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
