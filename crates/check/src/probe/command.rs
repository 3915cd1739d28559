//! `command`: runs `sh -c` once per check, with a timeout, and reads its exit status and output.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value as Json, json};

use super::System;
use crate::suite::Check;

/// goss's default command timeout.
const DEFAULT_TIMEOUT_MS: u64 = 10_000;

struct Output {
    status: i32,
    stdout: String,
    stderr: String,
}

pub fn observe<'a>(
    check: &'a Check,
    system: &'a System,
) -> impl Fn(&str) -> Result<Json, String> + 'a {
    let script = check.target().to_string();
    let timeout = Duration::from_millis(check.timeout_ms(DEFAULT_TIMEOUT_MS));
    let output = run(&script, system, timeout);
    move |attribute| {
        let output = output.as_ref().map_err(Clone::clone)?;
        Ok(match attribute {
            "exit-status" => json!(output.status),
            "stdout" => json!(output.stdout),
            _ => json!(output.stderr),
        })
    }
}

fn run(script: &str, system: &System, timeout: Duration) -> Result<Output, String> {
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(env) = &system.target.env {
        command.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    }
    if let Some(dir) = &system.target.workdir {
        command.current_dir(dir);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run /bin/sh: {e}"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait(&mut child, timeout).ok_or_else(|| {
        // SAFETY: kill(2) on the child's own process group, which we created.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
        format!("timed out after {} ms", timeout.as_millis())
    })?;
    Ok(Output {
        // A command killed by a signal reports 128 + the signal, as a shell does.
        status: status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
        stdout: stdout.recv().unwrap_or_default(),
        stderr: stderr.recv().unwrap_or_default(),
    })
}

/// Reads a pipe to the end on its own thread, so that a full pipe never blocks the child.
fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            let _ = tx.send(String::from_utf8_lossy(&bytes).into_owned());
        });
    }
    rx
}

fn wait(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    let mut pause = Duration::from_micros(200);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
