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

/// A driver that runs no process: each instance is a small HTTP server in the caller's tokio
/// runtime answering `hello from NAME version V` (V: the spec's `VERSION`), with status 200
/// while it is healthy and 500 after [`FakeDriver::set_healthy`]`(false)` at its start. Tests
/// of the controller drive deploys, aborts, scaling and restarts with it in milliseconds.
#[derive(Debug, Default, Clone)]
pub struct FakeDriver {
    state: std::sync::Arc<std::sync::Mutex<FakeState>>,
}

#[derive(Debug, Default)]
struct FakeState {
    instances: std::collections::BTreeMap<String, FakeInstance>,
    unhealthy: bool,
    next_pid: u32,
}

#[derive(Debug)]
struct FakeInstance {
    pid: u32,
    exit: tokio::sync::watch::Sender<Option<i32>>,
}

impl FakeDriver {
    /// Instances started from now on answer 500 (`false`) or 200 (`true`).
    pub fn set_healthy(&self, healthy: bool) {
        self.lock().unwrap_or_else(|p| p.into_inner()).unhealthy = !healthy;
    }

    /// The instances running now, by name.
    pub fn running(&self) -> Vec<String> {
        let state = self.lock().unwrap_or_else(|p| p.into_inner());
        state
            .instances
            .iter()
            .filter(|(_, i)| i.exit.borrow().is_none())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Every instance ever started (running or not).
    pub fn started(&self) -> usize {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .instances
            .len()
    }

    /// Ends instance `name` as a crash would (exit code 1).
    pub fn crash(&self, name: &str) {
        let state = self.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(instance) = state.instances.get(name) {
            instance.exit.send_replace(Some(1));
        }
    }

    fn lock(&self) -> std::sync::LockResult<std::sync::MutexGuard<'_, FakeState>> {
        self.state.lock()
    }
}

impl crate::Driver for FakeDriver {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn id_offset(&self, _allow_root: bool) -> Option<u32> {
        None
    }

    fn start(
        &self,
        spec: &crate::InstanceSpec,
    ) -> Result<(crate::Process, std::net::SocketAddr), crate::DriverError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(crate::DriverError::io(&spec.name, "listen"))?;
        let addr = listener
            .local_addr()
            .map_err(crate::DriverError::io(&spec.name, "listen"))?;
        let version = spec
            .env
            .iter()
            .find(|(k, _)| k == "VERSION")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let mut state = self.lock().unwrap_or_else(|p| p.into_inner());
        state.next_pid += 1;
        let pid = 4_000_000 + state.next_pid;
        let (exit, ended) = tokio::sync::watch::channel(None);
        let body = format!("hello from {} version {version}\n", spec.name);
        // On a runtime of their own: instances outlive the controller's, as processes do.
        fake_runtime().spawn(fake_server(listener, body, !state.unhealthy, ended));
        state.instances.insert(
            spec.name.clone(),
            FakeInstance {
                pid,
                exit: exit.clone(),
            },
        );
        Ok((crate::Process::fake(pid, exit), addr))
    }

    fn usage(&self, _name: &str, _pid: u32) -> Option<crate::Usage> {
        None
    }

    fn cleanup(&self, recorded: &crate::Recorded) -> bool {
        let state = self.lock().unwrap_or_else(|p| p.into_inner());
        state.instances.get(&recorded.name).is_some_and(|i| {
            let running = i.exit.borrow().is_none();
            i.exit.send_replace(Some(137));
            running
        })
    }

    fn adopt(&self, adoption: &crate::Adoption) -> Result<crate::Process, crate::DriverError> {
        let state = self.lock().unwrap_or_else(|p| p.into_inner());
        match state.instances.get(&adoption.name) {
            Some(i) if i.pid == adoption.pid && i.exit.borrow().is_none() => {
                Ok(crate::Process::fake(i.pid, i.exit.clone()))
            }
            _ => Err(crate::DriverError::Start {
                name: adoption.name.clone(),
                message: "no such running fake instance".into(),
            }),
        }
    }
}

/// The runtime fake instances run on, for the life of the test process.
fn fake_runtime() -> &'static tokio::runtime::Handle {
    static HANDLE: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for fake instances");
            let _ = tx.send(runtime.handle().clone());
            runtime.block_on(std::future::pending::<()>());
        });
        rx.recv().expect("the fake instances' runtime started")
    })
}

/// Answers every request on `listener` with `body` (200) or 500, keep-alive, until `ended`.
async fn fake_server(
    listener: std::net::TcpListener,
    body: String,
    healthy: bool,
    mut ended: tokio::sync::watch::Receiver<Option<i32>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let status = if healthy {
        "200 OK"
    } else {
        "500 Internal Server Error"
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut connections = tokio::task::JoinSet::new();
    let watching = ended.clone();
    loop {
        tokio::select! {
            _ = ended.wait_for(Option::is_some) => return,
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else { continue };
                let answer = answer.clone();
                let mut ended = watching.clone();
                connections.spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let read = tokio::select! {
                            _ = ended.wait_for(Option::is_some) => return,
                            read = stream.read(&mut chunk) => read,
                        };
                        match read {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        }
    }
}
