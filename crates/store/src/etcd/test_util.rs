//! Real etcd members for tests and benchmarks: Debian's `etcd` binary, each member in a
//! temporary directory, on addresses the caller chooses (loopback, or a test bridge).

use std::net::{IpAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A cluster of etcd members, stopped (kill -9) when dropped.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    /// Client TLS: the CA clients must be signed by, and the members' certificate and key.
    tls: Option<Tls>,
}

/// PEM files for serving clients over TLS with client certificates.
#[derive(Debug, Clone)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

struct Member {
    name: String,
    client: String,
    peer: String,
    /// Plain HTTP `/health`, also when clients speak TLS.
    metrics: String,
    child: Option<Child>,
}

/// Where the `etcd` binary is, if installed.
pub fn etcd_binary() -> Option<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Whether etcd can be started here; where it cannot, says `skipped` (or fails, where
/// `PHOENIX_REQUIRE_TOOLS` says every tool must be there, as in CI).
pub fn etcd_or_skip() -> bool {
    if etcd_binary().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("PHOENIX_REQUIRE_TOOLS").is_none(),
        "etcd is required here (apt-get install etcd-server)"
    );
    eprintln!("skipped: etcd is not installed (apt-get install etcd-server)");
    false
}

impl EtcdCluster {
    /// Starts `size` members on `ip`, each on free ports, and waits until they are healthy.
    pub fn start(size: usize, ip: IpAddr) -> std::io::Result<Self> {
        Self::start_with(size, ip, None)
    }

    /// The same, serving clients over TLS and admitting only certificates `tls.ca` signed.
    pub fn start_with(size: usize, ip: IpAddr, tls: Option<Tls>) -> std::io::Result<Self> {
        // A free port found here may be taken by another test before etcd binds it: a member
        // that exits at once is tried again with other ports.
        let mut attempt = 1;
        loop {
            match Self::try_start(size, ip, tls.clone()) {
                Ok(cluster) => return Ok(cluster),
                Err(error) if attempt < 3 => {
                    eprintln!("etcd members did not start ({error}); again with other ports");
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn try_start(size: usize, ip: IpAddr, tls: Option<Tls>) -> std::io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut members = Vec::new();
        for n in 0..size {
            members.push(Member {
                name: format!("etcd{n}"),
                client: format!("{scheme}://{}", with_port(ip, free_port(ip)?)),
                peer: format!("http://{}", with_port(ip, free_port(ip)?)),
                metrics: format!("http://{}", with_port(ip, free_port(ip)?)),
                child: None,
            });
        }
        let mut cluster = Self { dir, members, tls };
        for n in 0..size {
            cluster.spawn(n)?;
        }
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// Kills member `n` with SIGKILL.
    pub fn kill(&mut self, n: usize) {
        if let Some(mut child) = self.members[n].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `n` again on its data directory.
    pub fn restart(&mut self, n: usize) -> std::io::Result<()> {
        self.kill(n);
        self.spawn(n)
    }

    fn spawn(&mut self, n: usize) -> std::io::Result<()> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect();
        let member = &self.members[n];
        let data = self.dir.path().join(&member.name);
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", member.name)))?;
        let mut command = Command::new(etcd_binary().unwrap_or_else(|| "etcd".into()));
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &member.client])
            .args(["--advertise-client-urls", &member.client])
            .args(["--listen-peer-urls", &member.peer])
            .args(["--listen-metrics-urls", &member.metrics])
            .args(["--initial-advertise-peer-urls", &member.peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", "phoenix-test"])
            .args(["--initial-cluster-state", "new"])
            // Short Raft timers, so a lost leader is replaced in about a second.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.members[n].child = Some(child);
        Ok(())
    }

    fn wait_healthy(&mut self, within: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + within;
        for member in &mut self.members {
            let address = member.metrics.trim_start_matches("http://").to_string();
            while !healthy(&address) {
                // The log goes with the cluster's directory: its last lines go in the error.
                let log = self.dir.path().join(format!("{}.log", member.name));
                let tail = || {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let last: Vec<&str> = text.lines().rev().take(3).collect();
                    last.join(" | ")
                };
                if let Some(Ok(Some(exit))) = member.child.as_mut().map(|c| c.try_wait()) {
                    return Err(std::io::Error::other(format!(
                        "etcd member {} exited ({exit}): {}",
                        member.name,
                        tail()
                    )));
                }
                if Instant::now() > deadline {
                    return Err(std::io::Error::other(format!(
                        "etcd member {} at {} did not become healthy in {within:?}: {}",
                        member.name,
                        member.client,
                        tail()
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for n in 0..self.members.len() {
            self.kill(n);
        }
    }
}

/// etcd's `/health` says `"health":"true"` once the member has a leader.
fn healthy(address: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(address) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /health HTTP/1.0\r\nHost: {address}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

fn free_port(ip: IpAddr) -> std::io::Result<u16> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

fn with_port(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}
