//! Published ports: in a cluster, other hosts' proxies reach this host's bridge instances at
//! the host's address and a port of their own, `first port + the instance's offset in the
//! subnet` (so the port follows from the address, and a restarted Phoenix finds it again).
//! One nftables table of family `ip`, named after the bridge, translates (DNAT) connections
//! from the cluster's hosts (`peers`) only. Translation needs the host's IPv4 forwarding on;
//! the same table drops every other packet forwarded to or from the bridge, so forwarding
//! routes nothing else there (an address on the bridge is not reachable by a route). On the
//! sending side, only Phoenix's own user (its proxies) may connect to the peers' published
//! ports: another local user cannot go around a peer's proxy (and its network policy).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Mutex;

use crate::DriverError;
use crate::policy::{effective_uid, nft_for, run_nft};

/// The published ports of one bridge.
#[derive(Debug)]
pub(crate) struct Publisher {
    nft: PathBuf,
    table: String,
    host_ip: Ipv4Addr,
    first_port: u16,
    state: Mutex<Published>,
}

#[derive(Debug, Default)]
struct Published {
    /// Host port → the instance's address and port.
    ports: BTreeMap<u16, SocketAddrV4>,
    /// `None` until this program knows them: the table keeps what it has (after a restart,
    /// the previous program's peers).
    peers: Option<BTreeSet<Ipv4Addr>>,
    /// Taking over a previous program's table: its elements stay until `release`.
    held: bool,
}

impl Publisher {
    /// Makes the table of `bridge`. `fresh`: replacing whatever a previous run left; else
    /// taking over a previous program's table (`phoenix restart`), whose ports keep
    /// translating until the instances are taken over (`release`).
    pub(crate) fn install(
        bridge: &str,
        host_ip: Ipv4Addr,
        ports: (u16, u16),
        fresh: bool,
    ) -> Result<Publisher, DriverError> {
        let first_port = ports.0;
        let publisher = Publisher {
            nft: nft_for("publishing bridge instances to other hosts ([cluster])")?,
            table: bridge.to_string(),
            host_ip,
            first_port,
            state: Mutex::new(Published {
                held: !fresh,
                ..Published::default()
            }),
        };
        let mut script = String::new();
        if fresh {
            script.push_str(&clear_script(bridge));
        }
        script.push_str(&table_script(bridge, host_ip, ports, effective_uid()));
        run_nft(&publisher.nft, &script).map_err(|why| {
            DriverError::Network(format!("published ports: cannot install the rules: {why}"))
        })?;
        enable_forwarding()?;
        Ok(publisher)
    }

    /// Where other hosts reach the instance `offset` addresses into the subnet.
    pub(crate) fn address_of(&self, offset: u32) -> SocketAddr {
        SocketAddr::from((self.host_ip, self.port_of(offset)))
    }

    fn port_of(&self, offset: u32) -> u16 {
        // The bridge checked at install that every offset fits (`fits`).
        self.first_port.saturating_add(offset as u16)
    }

    /// Publishes the instance at `target`, `offset` into the subnet.
    pub(crate) fn add(&self, offset: u32, target: SocketAddrV4) -> Result<u16, DriverError> {
        let port = self.port_of(offset);
        let mut state = self.lock();
        state.ports.insert(port, target);
        self.sync(&state).map(|()| port)
    }

    /// Stops publishing `port`.
    pub(crate) fn remove(&self, port: u16) {
        let mut state = self.lock();
        state.ports.remove(&port);
        if let Err(error) = self.sync(&state) {
            tracing::warn!(%error, port, "published ports: removing one");
        }
    }

    /// The hosts whose connections are translated (the cluster's hosts).
    pub(crate) fn set_peers(&self, peers: BTreeSet<Ipv4Addr>) -> Result<(), DriverError> {
        let mut state = self.lock();
        if state.peers.as_ref() == Some(&peers) {
            return Ok(());
        }
        state.peers = Some(peers);
        self.sync(&state)
    }

    /// Ends taking over: from now on the table holds what this program published.
    pub(crate) fn release(&self) -> Result<(), DriverError> {
        let mut state = self.lock();
        state.held = false;
        self.sync(&state)
    }

    /// Writes the whole set of ports and peers in one transaction (a few thousand elements
    /// at most): nothing stale can stay behind.
    fn sync(&self, state: &Published) -> Result<(), DriverError> {
        if state.held {
            return Ok(());
        }
        let t = &self.table;
        let mut script = format!("flush map ip {t} ports\n");
        if let Some(peers) = &state.peers {
            let _ = writeln!(script, "flush set ip {t} peers");
            if !peers.is_empty() {
                let peers: Vec<String> = peers.iter().map(Ipv4Addr::to_string).collect();
                let _ = writeln!(
                    script,
                    "add element ip {t} peers {{ {} }}",
                    peers.join(", ")
                );
            }
        }
        if !state.ports.is_empty() {
            let ports: Vec<String> = state
                .ports
                .iter()
                .map(|(port, target)| format!("{port} : {} . {}", target.ip(), target.port()))
                .collect();
            let _ = writeln!(
                script,
                "add element ip {t} ports {{ {} }}",
                ports.join(", ")
            );
        }
        run_nft(&self.nft, &script)
            .map_err(|why| DriverError::Network(format!("published ports: {why}")))
    }

    /// Removes the table (at shutdown).
    pub(crate) fn uninstall(&self) {
        if let Err(why) = run_nft(&self.nft, &clear_script(&self.table)) {
            tracing::warn!(%why, "published ports: removing the table");
        }
    }

    /// Removes a table a previous run left for `bridge`, if `nft` is here.
    pub(crate) fn remove_stale(bridge: &str) {
        if let Ok(nft) = nft_for("") {
            let _ = run_nft(&nft, &clear_script(bridge));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Published> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// True when ports from `first_port` on cover `hosts` addresses.
pub(crate) fn fits(first_port: u16, hosts: u32) -> bool {
    first_port >= 1024 && u32::from(first_port) + hosts <= u32::from(u16::MAX)
}

fn clear_script(bridge: &str) -> String {
    format!("table ip {bridge} {{}}\ndelete table ip {bridge}\n")
}

/// The table (declared so that a previous program's sets keep their elements) and its rules
/// (made again).
fn table_script(bridge: &str, host_ip: Ipv4Addr, ports: (u16, u16), uid: u32) -> String {
    let (first, last) = ports;
    format!(
        "table ip {bridge} {{\n\
         \x20 set peers {{ type ipv4_addr; }}\n\
         \x20 map ports {{ type inet_service : ipv4_addr . inet_service; }}\n\
         \x20 chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         \x20 chain forward {{ type filter hook forward priority filter; policy accept; }}\n\
         \x20 chain output {{ type filter hook output priority filter; policy accept; }}\n\
         }}\n\
         flush chain ip {bridge} prerouting\n\
         flush chain ip {bridge} forward\n\
         flush chain ip {bridge} output\n\
         add rule ip {bridge} prerouting ip daddr {host_ip} ip saddr @peers dnat ip to tcp dport map @ports\n\
         add rule ip {bridge} forward oifname \"{bridge}\" ct status dnat accept\n\
         add rule ip {bridge} forward iifname \"{bridge}\" ct status dnat accept\n\
         add rule ip {bridge} forward oifname \"{bridge}\" drop\n\
         add rule ip {bridge} forward iifname \"{bridge}\" drop\n\
         add rule ip {bridge} output ip daddr @peers tcp dport {first}-{last} meta skuid != {uid} reject with tcp reset\n"
    )
}

/// Translated connections are forwarded: IPv4 forwarding on, in this network namespace.
fn enable_forwarding() -> Result<(), DriverError> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(path, "1").map_err(|e| {
        DriverError::Network(format!(
            "published ports: cannot turn IPv4 forwarding on ({path}): {e}"
        ))
    })?;
    tracing::info!("IPv4 forwarding turned on, for other hosts to reach bridge instances");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_must_fit_the_subnet() {
        assert!(fits(20000, 4094));
        assert!(fits(61441, 4094));
        assert!(!fits(61442, 4094));
        assert!(!fits(80, 10));
    }

    #[test]
    fn the_table_translates_only_for_peers_to_the_host_address() {
        let script = table_script("phx0", Ipv4Addr::new(10, 0, 0, 1), (20000, 24095), 0);
        assert!(script.contains(
            "prerouting ip daddr 10.0.0.1 ip saddr @peers dnat ip to tcp dport map @ports"
        ));
        assert!(script.contains("forward oifname \"phx0\" drop"));
        assert!(script.contains("forward iifname \"phx0\" drop"));
        assert!(script.contains(
            "output ip daddr @peers tcp dport 20000-24095 meta skuid != 0 reject with tcp reset"
        ));
    }
}
