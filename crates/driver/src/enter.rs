//! Entering a running instance: this process joins the namespaces of the instance whose init
//! is `pid`, so that what it reads, connects to and runs is what the instance sees (its root,
//! its processes, its network), as `nsenter` does. For checks that run inside an instance.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use crate::net::setns;

/// The namespaces joined, in order: the user namespace first, which grants the rights to
/// join the others it owns.
const KINDS: &[(&str, libc::c_int)] = &[
    ("user", libc::CLONE_NEWUSER),
    ("mnt", libc::CLONE_NEWNS),
    ("uts", libc::CLONE_NEWUTS),
    ("ipc", libc::CLONE_NEWIPC),
    ("net", libc::CLONE_NEWNET),
    ("pid", libc::CLONE_NEWPID),
];

/// Moves this process into the namespaces of process `pid`, then into its root, and forks:
/// only a child is in the PID namespace (its `/proc/self` is in the instance's `/proc`, and
/// it may start threads). Returns in that child; the parent waits for it and exits as it
/// did. Must be called while the process has one thread. In a user namespace it becomes its
/// root.
pub fn enter(pid: u32) -> io::Result<()> {
    await_one_thread()?;
    // Open every namespace first: once in the instance's mount namespace, /proc is its own.
    let mut targets = Vec::new();
    for (name, kind) in KINDS {
        let theirs = File::open(format!("/proc/{pid}/ns/{name}"))
            .map_err(|e| io::Error::new(e.kind(), format!("instance process {pid}: {e}")))?;
        let ours = std::fs::metadata(format!("/proc/self/ns/{name}"))?;
        if theirs.metadata()?.ino() != ours.ino() {
            targets.push((*name, *kind, theirs));
        }
    }
    let root = File::open(format!("/proc/{pid}/root"))?;
    for (name, kind, file) in &targets {
        setns(file, *kind)
            .map_err(|e| io::Error::new(e.kind(), format!("join its {name} namespace: {e}")))?;
        if *kind == libc::CLONE_NEWUSER {
            become_root_inside()?;
        }
    }
    // SAFETY: fchdir and chroot on a directory descriptor of the instance's root.
    unsafe {
        if libc::fchdir(root.as_raw_fd()) != 0 || libc::chroot(c".".as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::chdir(c"/".as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: fork in a single-threaded process; the parent only waits and exits.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(()),
        child => {
            let mut status = 0;
            // SAFETY: waiting for the child forked above.
            unsafe { libc::waitpid(child, &mut status, 0) };
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            std::process::exit(code)
        }
    }
}

/// Waits (briefly) until this process has one thread: joining a user namespace fails with
/// EINVAL otherwise, and a library may have just ended a helper thread that the kernel has
/// not reaped yet (gtmpl lexes every template on a thread of its own).
fn await_one_thread() -> io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let threads = std::fs::read_dir("/proc/self/task")?.count();
        if threads <= 1 {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "{threads} threads still running; joining namespaces needs one"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// After joining a user namespace: uid and gid 0 of it, no supplementary groups.
fn become_root_inside() -> io::Result<()> {
    // SAFETY: credential calls on this single-threaded process.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(0, 0, 0) != 0
            || libc::setresuid(0, 0, 0) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
