//! Runs `[hooks]` commands at the points of a deploy, with the deploy's facts in `PHOENIX_*`
//! environment variables; their output goes to the deploy's progress and the journal.

use std::process::Stdio;
use std::time::Instant;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::Progress;
use crate::config::{Hook, HooksConfig};
use crate::controller::Inner;

/// Lines of a hook's output kept in the journal.
const KEPT_LINES: usize = 20;

/// What a hook is told about the deploy.
#[derive(Debug, Clone, Default)]
pub(crate) struct Facts {
    pub role: String,
    pub strategy: &'static str,
    pub deploy: Option<i64>,
    pub generation: Option<i64>,
    pub image: Option<String>,
    pub previous_image: Option<String>,
    pub live_generation: Option<i64>,
    pub reason: Option<String>,
}

impl Facts {
    fn env(&self, hook: Hook) -> Vec<(&'static str, String)> {
        let text = |v: &Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
        vec![
            ("PHOENIX_HOOK", hook.name().to_string()),
            ("PHOENIX_ROLE", self.role.clone()),
            ("PHOENIX_STRATEGY", self.strategy.to_string()),
            ("PHOENIX_DEPLOY", text(&self.deploy)),
            ("PHOENIX_GENERATION", text(&self.generation)),
            ("PHOENIX_IMAGE", self.image.clone().unwrap_or_default()),
            (
                "PHOENIX_PREVIOUS_IMAGE",
                self.previous_image.clone().unwrap_or_default(),
            ),
            ("PHOENIX_LIVE_GENERATION", text(&self.live_generation)),
            ("PHOENIX_REASON", self.reason.clone().unwrap_or_default()),
        ]
    }
}

/// Runs `hook` if the fleet file sets it. Err with the reason when it exits non-zero, cannot
/// start or outlives the time limit (killed with its process group).
pub(crate) async fn run(
    inner: &Inner,
    hooks: &HooksConfig,
    hook: Hook,
    facts: &Facts,
    progress: &Progress,
) -> Result<(), String> {
    let Some(command) = hooks.command(hook) else {
        return Ok(());
    };
    let started = Instant::now();
    progress.say(format!("hook {}: {}", hook.name(), command.join(" ")));
    let (outcome, output) = execute(command, hooks, hook, facts, progress).await;
    let ms = started.elapsed().as_millis() as u64;
    inner
        .journal(
            Some(&facts.role),
            "deploy.hook",
            json!({"hook": hook.name(), "command": command, "deploy": facts.deploy,
                   "ok": outcome.is_ok(), "result": outcome.as_ref().err(), "ms": ms,
                   "output": output}),
        )
        .await;
    match outcome {
        Ok(()) => Ok(()),
        Err(why) => {
            let why = format!("hook {} {why}", hook.name());
            progress.say(why.clone());
            Err(why)
        }
    }
}

/// Runs the command; returns how it ended and its last lines of output.
async fn execute(
    command: &[String],
    hooks: &HooksConfig,
    hook: Hook,
    facts: &Facts,
    progress: &Progress,
) -> (Result<(), String>, Vec<String>) {
    let mut child = match Command::new(&command[0])
        .args(&command[1..])
        .envs(facts.env(hook))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            return (
                Err(format!("could not start {}: {error}", command[0])),
                Vec::new(),
            );
        }
    };
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let mut lines = Vec::new();
    let read = async {
        let mut out = stdout.map(|s| BufReader::new(s).lines());
        let mut err = stderr.map(|s| BufReader::new(s).lines());
        loop {
            let line = tokio::select! {
                Some(Ok(Some(line))) = async { match &mut out { Some(o) => Some(o.next_line().await), None => None } } => line,
                Some(Ok(Some(line))) = async { match &mut err { Some(e) => Some(e.next_line().await), None => None } } => line,
                else => break,
            };
            progress.say(format!("[{}] {line}", hook.name()));
            lines.push(line);
            if lines.len() > KEPT_LINES {
                lines.remove(0);
            }
        }
    };
    let ran = tokio::time::timeout(hooks.timeout, async {
        read.await;
        child.wait().await
    })
    .await;
    let outcome = match ran {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("failed ({status})")),
        Ok(Err(error)) => Err(format!("failed: {error}")),
        Err(_) => {
            kill_group(&child);
            Err(format!(
                "timed out after {:?} and was killed",
                hooks.timeout
            ))
        }
    };
    (outcome, lines)
}

/// Kills the hook and whatever it started (it leads its own process group).
fn kill_group(child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on the process group the hook leads; no memory is involved.
        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
    }
}
