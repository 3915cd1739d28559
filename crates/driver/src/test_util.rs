//! Helpers for the tests and benchmarks of code that runs instances: a network namespace of
//! one's own (where bridges and veths stay), and a search for bytes that must not be written
//! anywhere (a secret's value). Not used by Phoenix itself.

use std::io;
use std::path::{Path, PathBuf};

/// Moves the calling thread into a new network namespace and brings its loopback up. Call it
/// while the process has one thread to move the whole process (and what it starts later).
pub fn own_network_namespace() -> io::Result<()> {
    // SAFETY: unshare changes only the calling thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut netlink = crate::net::Netlink::open()?;
    let lo = netlink.link_index("lo")?.unwrap_or(1);
    netlink.set_up(lo)
}

/// A loopback TCP port free a moment ago (for a test's listen address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}

/// Every regular file under `dir` (symlinks not followed) whose bytes contain `needle`.
pub fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            found.extend(files_holding(&path, needle));
        } else if meta.is_file()
            && std::fs::read(&path)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        {
            found.push(path);
        }
    }
    found
}
