//! What waits for an instance's watched process (the instance itself, or a container's shim):
//! a child this program started, or one a previous program of this same process started
//! before `phoenix restart` re-executed it — still this process's child, found by pid.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;
use tokio::process::Child;

#[derive(Debug)]
pub(crate) enum Watcher {
    Child(Child),
    Adopted(Adopted),
    /// A test double's instance (`test_util::FakeDriver`): its exit code once it ends.
    Fake(tokio::sync::watch::Receiver<Option<i32>>),
}

impl Watcher {
    pub(crate) fn id(&self) -> u32 {
        match self {
            Watcher::Child(child) => child.id().unwrap_or(0),
            Watcher::Adopted(adopted) => adopted.pid,
            Watcher::Fake(_) => 0,
        }
    }

    /// Resolves when the process has ended, and reaps it. Cancel-safe.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        match self {
            Watcher::Child(child) => child.wait().await,
            Watcher::Adopted(adopted) => adopted.wait().await,
            Watcher::Fake(exit) => {
                let code = exit
                    .wait_for(Option::is_some)
                    .await
                    .map_or(137, |c| c.unwrap_or(0));
                Ok(ExitStatus::from_raw(code << 8))
            }
        }
    }
}

/// A child of this process that an earlier program started, watched through a pidfd.
#[derive(Debug)]
pub(crate) struct Adopted {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
}

impl Adopted {
    /// Takes over `pid`, which must be a child of this process.
    pub(crate) fn new(pid: u32) -> io::Result<Adopted> {
        if parent_of(pid)? != std::process::id() {
            return Err(io::Error::other(format!(
                "process {pid} is not a child of this process"
            )));
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just returned to us and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the OwnedFd stays open and unchanged for as long as the AsyncFd owns it.
        let pidfd =
            unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?;
        Ok(Adopted {
            pid,
            pidfd,
            status: None,
        })
    }

    async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.status {
                return Ok(status);
            }
            // A pidfd turns readable when its process has ended.
            let mut ready = self.pidfd.readable().await?;
            let mut raw = 0;
            // SAFETY: waitpid on our own child, writing into a local.
            let reaped = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut raw, libc::WNOHANG) };
            match reaped {
                0 => ready.clear_ready(),
                n if n < 0 => return Err(io::Error::last_os_error()),
                _ => self.status = Some(ExitStatus::from_raw(raw)),
            }
        }
    }
}

/// The parent pid of `pid`, from `/proc/PID/stat`.
fn parent_of(pid: u32) -> io::Result<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 2..])
        .ok_or_else(|| io::Error::other("unreadable /proc stat"))?;
    after
        .split(' ')
        .nth(1)
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| io::Error::other("unreadable /proc stat"))
}
