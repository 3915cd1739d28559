//! `phoenix restart` and `phoenix upgrade`: the running program hands what must outlive it to
//! the next program of the same process (it re-executes itself, so its pid, its children and
//! its terminal stay): every role's listening sockets, the client connections idle between two
//! requests (with any bytes of a next request already read), and the running instances, which
//! are taken over instead of started again.
//!
//! The descriptors cross `execve` open (close-on-exec cleared, as systemd's socket activation
//! passes them); a file in the state directory, readable by its owner only, says which
//! descriptor is what. The next program accepts it only when it names this very process.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use phoenix_proxy::Parked;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::FleetError;
use crate::controller::{Controller, Inner};

/// One instance as the next program takes it over.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandedInstance {
    pub name: String,
    pub role: String,
    pub generation: i64,
    /// Its main process and that process's start time (checked before anything is done).
    pub pid: u32,
    pub start_time: u64,
    /// The child of this process that ends with it: the instance, or its container's shim.
    pub watcher: u32,
    pub addr: SocketAddr,
    pub healthy: bool,
    pub driver: String,
}

/// The bridge the instances stay on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandedBridge {
    pub name: String,
    pub subnet: String,
}

/// What one program of `phoenix up` leaves to the next.
#[derive(Debug, Default)]
pub struct Handed {
    /// Every role's listening sockets, by role.
    pub frontends: Vec<(String, std::net::TcpListener)>,
    /// Client connections idle between two requests, by role.
    pub parked: Vec<(String, Parked)>,
    pub instances: Vec<HandedInstance>,
    pub bridge: Option<HandedBridge>,
    /// The read ends of running instances' stdout and stderr pipes (by instance and stream).
    pub outputs: Vec<(String, &'static str, OwnedFd)>,
}

/// A fleet handed over and waiting for the next program: no deploy, scale or renewal starts
/// while it is held. Give it back with [`Controller::resume`] if the next program cannot run.
pub struct Handover {
    pub handed: Handed,
    guards: Vec<tokio::sync::OwnedMutexGuard<()>>,
}

impl Controller {
    /// Stops every frontend (the requests in flight finish; idle connections and listeners
    /// stay open) and describes the running instances, for the next program. Refused while a
    /// deploy runs or a generation drains.
    pub async fn hand_over(&self) -> Result<Handover, FleetError> {
        let inner = &self.inner;
        let roles = inner.roles();
        let mut guards = Vec::new();
        for role in &roles {
            let guard = role.try_deploy_guard().map_err(|_| {
                FleetError::Restart(format!(
                    "a deploy of role {} is running: restart when it has finished",
                    role.name
                ))
            })?;
            if let Some(other) = role.others().first() {
                return Err(FleetError::Restart(format!(
                    "generation {} of role {} is still {}: restart when it has finished",
                    other.id,
                    role.name,
                    other.status()
                )));
            }
            guards.push(guard);
        }
        let mut handed = Handed {
            outputs: inner.capture.handed(),
            bridge: inner.drivers.bridge().map(|b| HandedBridge {
                name: b.name().to_string(),
                subnet: b.subnet().to_string(),
            }),
            ..Handed::default()
        };
        for role in &roles {
            for leftover in role.hand_over_frontends().await {
                if let Some(listener) = leftover.listener {
                    handed.frontends.push((role.name.clone(), listener));
                }
                let parked = leftover.parked.into_iter();
                handed
                    .parked
                    .extend(parked.map(|parked| (role.name.clone(), parked)));
            }
            let Some(live) = role.live() else { continue };
            for instance in live.instances() {
                if instance.ended().is_some() {
                    continue;
                }
                handed.instances.push(HandedInstance {
                    name: instance.name.clone(),
                    role: role.name.clone(),
                    generation: live.id,
                    pid: instance.pid,
                    start_time: instance.start_time,
                    watcher: instance.watcher,
                    addr: instance.backend.addr,
                    healthy: instance.is_healthy(),
                    driver: instance.driver.name().to_string(),
                });
            }
        }
        Ok(Handover { handed, guards })
    }

    /// Serves again what [`Controller::hand_over`] stopped: the next program did not start.
    pub fn resume(&self, handover: Handover) {
        let Handover { handed, guards } = handover;
        let mut parked = handed.parked;
        let mut by_role: BTreeMap<String, Vec<tokio::net::TcpListener>> = BTreeMap::new();
        for (role, listener) in handed.frontends {
            if let Ok(listener) = listener_to_tokio(listener) {
                by_role.entry(role).or_default().push(listener);
            }
        }
        // Each role's listeners together: a parked connection goes to the one that took it.
        for (name, listeners) in by_role {
            let mine = take_role(&mut parked, &name);
            if let Ok(role) = self.inner.role(&name) {
                role.serve(listeners, mine);
            }
        }
        drop(guards);
    }

    /// Journals a restart the previous program of this process asked for.
    pub async fn journal_restart(&self, detail: serde_json::Value) {
        self.inner.journal(None, "up.restarted", detail).await;
    }
}

/// The connections parked for `role`, taken out of `parked`.
pub(crate) fn take_role(parked: &mut Vec<(String, Parked)>, role: &str) -> Vec<Parked> {
    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(parked)
        .into_iter()
        .partition(|(r, _)| r == role);
    *parked = rest;
    mine.into_iter().map(|(_, p)| p).collect()
}

pub(crate) fn listener_to_tokio(
    listener: std::net::TcpListener,
) -> std::io::Result<tokio::net::TcpListener> {
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// The handover file: which inherited descriptor is what.
#[derive(Debug, Serialize, Deserialize)]
struct HandoverFile {
    /// The process that wrote it; only that process (after `execve`) reads it.
    pid: u32,
    /// The version of the program that wrote it.
    version: String,
    frontends: Vec<(String, RawFd)>,
    parked: Vec<ParkedFd>,
    instances: Vec<HandedInstance>,
    bridge: Option<HandedBridge>,
    /// Output pipes' read ends: instance, stream, descriptor.
    #[serde(default)]
    outputs: Vec<(String, String, RawFd)>,
    /// Descriptors of the program's own (its lock, its API sockets), by name.
    extra: BTreeMap<String, RawFd>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ParkedFd {
    role: String,
    fd: RawFd,
    client: SocketAddr,
    /// What the client sent already, hex-encoded.
    buffered: String,
}

/// The largest handover file read: a bound on what a damaged or hostile file can cost.
const MAX_FILE: u64 = 64 << 20;

impl Handed {
    /// Writes the handover file and leaves every descriptor open across `execve`; `extra`
    /// names the program's own descriptors that go along.
    pub fn write(
        &self,
        path: &Path,
        extra: &BTreeMap<String, BorrowedFd<'_>>,
    ) -> Result<(), FleetError> {
        let io = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |cause| FleetError::Io { what, cause }
        };
        // Descriptors `self` and `extra` own for the whole call.
        let mut fds: Vec<RawFd> = Vec::new();
        let mut note = |fd: BorrowedFd<'_>| {
            fds.push(fd.as_raw_fd());
            fd.as_raw_fd()
        };
        let file = HandoverFile {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            frontends: self
                .frontends
                .iter()
                .map(|(role, listener)| (role.clone(), note(listener.as_fd())))
                .collect(),
            parked: self
                .parked
                .iter()
                .map(|(role, parked)| ParkedFd {
                    role: role.clone(),
                    fd: note(parked.stream.as_fd()),
                    client: parked.client,
                    buffered: hex(&parked.buffered),
                })
                .collect(),
            instances: self.instances.clone(),
            bridge: self.bridge.clone(),
            outputs: self
                .outputs
                .iter()
                .map(|(instance, stream, fd)| {
                    (instance.clone(), stream.to_string(), note(fd.as_fd()))
                })
                .collect(),
            extra: extra
                .iter()
                .map(|(name, fd)| (name.clone(), note(*fd)))
                .collect(),
        };
        let bytes = serde_json::to_vec(&file).map_err(|e| io("encode")(e.into()))?;
        write_private(path, &bytes).map_err(io("write"))?;
        for fd in fds {
            // SAFETY: the descriptor is owned by `self` or `extra`, borrowed for this call.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            set_cloexec(fd, false).map_err(io("pass a descriptor named in"))?;
        }
        Ok(())
    }

    /// Reads the handover file the previous program of this process wrote (and removes it):
    /// what it handed over, and the program's own descriptors by name. Every descriptor is
    /// checked to be a socket and closed again on the next `exec` (instances must not get it).
    pub fn read(path: &Path) -> Result<(Handed, BTreeMap<String, OwnedFd>, String), FleetError> {
        let bad = |why: String| FleetError::Restart(format!("{}: {why}", path.display()));
        let bytes = read_bounded(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let _ = std::fs::remove_file(path);
        let file: HandoverFile =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a handover: {e}")))?;
        if file.pid != std::process::id() {
            return Err(bad(format!(
                "written by process {}, not this one ({})",
                file.pid,
                std::process::id()
            )));
        }
        let mut taken = std::collections::BTreeSet::new();
        let mut take = |fd: RawFd, kind: Kind| -> Result<OwnedFd, FleetError> {
            if fd < 3 || !taken.insert(fd) {
                return Err(bad(format!("descriptor {fd} cannot be handed over")));
            }
            inherited_fd(fd, kind).map_err(|e| bad(format!("descriptor {fd}: {e}")))
        };
        let mut handed = Handed {
            instances: file.instances,
            bridge: file.bridge,
            ..Handed::default()
        };
        for (role, fd) in file.frontends {
            handed
                .frontends
                .push((role, std::net::TcpListener::from(take(fd, Kind::Socket)?)));
        }
        for parked in file.parked {
            let stream = std::net::TcpStream::from(take(parked.fd, Kind::Socket)?);
            let buffered = unhex(&parked.buffered)
                .ok_or_else(|| bad(format!("descriptor {}: bad buffered bytes", parked.fd)))?;
            let parked_conn = Parked {
                stream,
                client: parked.client,
                buffered: buffered.into(),
            };
            handed.parked.push((parked.role, parked_conn));
        }
        for (instance, stream, fd) in file.outputs {
            let stream = match stream.as_str() {
                "stdout" => "stdout",
                "stderr" => "stderr",
                other => return Err(bad(format!("no stream {other:?}"))),
            };
            handed
                .outputs
                .push((instance, stream, take(fd, Kind::Pipe)?));
        }
        let mut extra = BTreeMap::new();
        for (name, fd) in file.extra {
            extra.insert(name, take(fd, Kind::Any)?);
        }
        Ok((handed, extra, file.version))
    }
}

impl Inner {
    /// Takes over the instances the previous program handed over, for every role whose live
    /// generation they belong to (and whose driver is still the same); the others stop.
    /// Returns how many were taken over.
    pub(crate) async fn adopt(self: &Arc<Self>, handed: &[HandedInstance]) -> usize {
        let mut adopted = 0;
        for role in self.roles() {
            let mine: Vec<&HandedInstance> =
                handed.iter().filter(|h| h.role == role.name).collect();
            let Some(generation) = mine.first().map(|h| h.generation) else {
                continue;
            };
            match crate::deploy::adopt_live(self, &role, generation, &mine).await {
                Ok(count) => adopted += count,
                Err(error) => {
                    tracing::error!(role = %role.name, %error, "cannot take over its instances");
                }
            }
        }
        adopted
    }

    /// Journals what was taken over and what was not (and stopped).
    pub(crate) async fn journal_adoption(&self, handed: usize, adopted: usize) {
        self.journal(
            None,
            "up.adopted",
            json!({"instances_handed": handed, "instances_adopted": adopted}),
        )
        .await;
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> std::io::Result<()> {
    let flag = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: fcntl on a descriptor borrowed for the call.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flag) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What an inherited descriptor must be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Socket,
    Pipe,
    Any,
}

/// Takes ownership of inherited descriptor `fd` if it is open and of the `kind` asked.
fn inherited_fd(fd: RawFd, kind: Kind) -> std::io::Result<OwnedFd> {
    // SAFETY: fstat writes into a local; an fd that is not open fails with EBADF.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut stat) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let format = stat.st_mode & libc::S_IFMT;
    match kind {
        Kind::Socket if format != libc::S_IFSOCK => {
            return Err(std::io::Error::other("not a socket"));
        }
        Kind::Pipe if format != libc::S_IFIFO => {
            return Err(std::io::Error::other("not a pipe"));
        }
        _ => {}
    }
    // SAFETY: the descriptor is open, was passed to this program for this purpose, and is
    // taken once (the caller refuses duplicates).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(owned.as_fd(), true)?;
    Ok(owned)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_bytes_round_trip_and_bad_hex_is_refused() {
        let bytes = b"GET /par\x00\xff";
        assert_eq!(unhex(&hex(bytes)).unwrap(), bytes);
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn a_handover_file_of_another_process_or_with_a_non_socket_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handover.json");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handed = Handed {
            frontends: vec![("web".into(), listener)],
            ..Handed::default()
        };
        handed.write(&path, &BTreeMap::new()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (read, extra, version) = Handed::read(&path).unwrap();
        assert!(extra.is_empty());
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
        assert_eq!(read.frontends[0].1.local_addr().unwrap(), addr);
        assert!(!path.exists(), "the file is removed once read");
        // Both programs' objects own the same descriptor here (one process, no exec).
        std::mem::forget(read);
        let file = std::fs::File::open(dir.path()).unwrap();
        for (pid, fd, why) in [
            (std::process::id() + 1, 3, "not this one"),
            (std::process::id(), file.as_raw_fd(), "not a socket"),
            (std::process::id(), 1, "cannot be handed over"),
        ] {
            let text = json!({"pid": pid, "version": "x", "frontends": [["web", fd]],
                "parked": [], "instances": [], "bridge": null, "extra": {}});
            std::fs::write(&path, text.to_string()).unwrap();
            let error = Handed::read(&path).unwrap_err().to_string();
            assert!(error.contains(why), "{error}");
        }
        std::fs::write(&path, "{not json").unwrap();
        assert!(
            Handed::read(&path)
                .unwrap_err()
                .to_string()
                .contains("not a handover")
        );
    }
}
