//! A test network of hosts, like Mininet or containerlab: one bridge in the test's network
//! namespace with an address of its own (where etcd members listen), and one named network
//! namespace per host on it, each with its own address. Traffic stays inside what the test
//! made; everything is removed when the rig is dropped.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::Arc;

use super::Netns;

pub struct Rig {
    tag: u32,
    bridge: String,
    namespaces: Vec<String>,
    /// The third octet of 10.231.X.0/24, from the test's pid and the rig's number, so that
    /// parallel tests differ.
    net: u8,
}

fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("the ip command (iproute2)");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Rig {
    /// A bridge and `hosts` namespaces on it.
    pub fn new(hosts: usize) -> Rig {
        // Rigs of one test binary run side by side: each gets its own names and subnet.
        static RIGS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nth = RIGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let tag = (pid % 10_000) * 10 + nth % 10;
        let net = ((pid * 4 + nth) % 230 + 20) as u8;
        let mut rig = Rig {
            tag,
            bridge: format!("phxb{tag}"),
            namespaces: Vec::new(),
            net,
        };
        let gateway = format!("{}/24", rig.gateway());
        ip(&["link", "add", &rig.bridge, "type", "bridge"]);
        ip(&["addr", "add", &gateway, "dev", &rig.bridge]);
        ip(&["link", "set", &rig.bridge, "up"]);
        for n in 0..hosts {
            let ns = format!("phx{tag}h{n}");
            let veth = format!("phx{tag}v{n}");
            ip(&["netns", "add", &ns]);
            rig.namespaces.push(ns.clone());
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &veth, "master", &rig.bridge, "up"]);
            let address = format!("{}/24", rig.host_ip(n));
            ip(&["-n", &ns, "addr", "add", &address, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &rig.gateway().to_string(),
            ]);
        }
        rig
    }

    /// The bridge's address, in the test's namespace.
    pub fn gateway(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 231, self.net, 1))
    }

    /// Host `n`'s address.
    pub fn host_ip(&self, n: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 231, self.net, 10 + n as u8))
    }

    /// Host `n`'s namespace.
    pub fn netns(&self, n: usize) -> Netns {
        let file = File::open(format!("/run/netns/{}", self.namespaces[n])).unwrap();
        Netns(Arc::new(file))
    }

    /// The name of host `n`'s namespace (for `ip -n`).
    pub fn namespace_name(&self, n: usize) -> String {
        self.namespaces[n].clone()
    }

    /// Kills every process in host `n`'s namespace with SIGKILL: the host dies whole.
    pub fn kill_host(&self, n: usize) {
        let output = Command::new("ip")
            .args(["netns", "pids", &self.namespaces[n]])
            .output()
            .unwrap();
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    /// Cuts host `n` off the bridge (`up = false`) or connects it again.
    pub fn link(&self, n: usize, up: bool) {
        let veth = format!("phx{}v{n}", self.tag);
        ip(&["link", "set", &veth, if up { "up" } else { "down" }]);
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}
