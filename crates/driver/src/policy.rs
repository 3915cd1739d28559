//! Network policy between roles (`allow_from`, `allow_cidrs`), enforced in the kernel with
//! nftables through Debian's `nft` command: two tables named after the bridge, one of family
//! `bridge` (what instances send each other directly, and anti-spoofing) and one of family
//! `inet` (what reaches a role's proxy, from instances and from elsewhere, and what local users
//! send instances directly).
//!
//! An instance is known by its IPv4 address; frames from its link that carry another source
//! address (or IPv6, or a forged ARP) are dropped, so the address identifies it. A connection
//! attempt (a TCP SYN, or a UDP datagram between instances) to a guarded role is let through
//! only from the roles it allows (or, from outside the bridge, from its CIDRs); the rest is
//! refused (a TCP reset, where the kernel can send one) and counted per role pair in named
//! counters. Sets of addresses per role change as instances start and stop; the rules change
//! only when the tables are made again.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::DriverError;

/// Every role on the bridge, with its guard when it has one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyConfig {
    pub roles: Vec<RoleRule>,
}

impl PolicyConfig {
    /// True when some role is guarded: only then are tables made.
    pub fn guards_anything(&self) -> bool {
        self.roles.iter().any(|r| r.guard.is_some())
    }
}

/// One role: its name, the address its proxy listens on (instances reach it at the bridge's
/// address and the same port), and who may reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleRule {
    pub name: String,
    pub listen: SocketAddr,
    pub guard: Option<Guard>,
}

/// Who may reach a guarded role: instances of `allow_from` (through its proxy, or directly),
/// and from outside the bridge, sources in `allow_cidrs`. Nobody else.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Guard {
    pub allow_from: Vec<String>,
    pub allow_cidrs: Vec<Cidr>,
}

/// An IPv4 or IPv6 network (`10.0.0.0/8`, `::1/128`; a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let bad = || format!("{text:?} is not a network: write one like \"10.0.0.0/8\" or \"::1\"");
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| bad())?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix.parse::<u8>().map_err(|_| bad())?,
            None => bits,
        };
        if prefix > bits {
            return Err(format!("{text:?}: the prefix is longer than /{bits}"));
        }
        let host_bits = match addr {
            IpAddr::V4(v4) => u128::from(u32::from(v4)) & low_bits(32 - prefix),
            IpAddr::V6(v6) => u128::from(v6) & low_bits(128 - prefix),
        };
        if host_bits != 0 {
            return Err(format!(
                "{text:?} has host bits set: write the network's first address"
            ));
        }
        Ok(Cidr { addr, prefix })
    }
}

fn low_bits(n: u8) -> u128 {
    if n >= 128 {
        u128::MAX
    } else {
        (1u128 << n) - 1
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Where refused attempts came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// An instance of this role.
    Role(String),
    /// An instance of no role (a verification's throwaway instance).
    Unlisted,
    /// Outside the bridge, from an address not in `allow_cidrs`.
    Outside,
    /// A local user other than Phoenix's, straight to an instance.
    Host,
}

impl Source {
    /// `role`, `unlisted`, `outside` or `host`.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Role(_) => "role",
            Source::Unlisted => "unlisted",
            Source::Outside => "outside",
            Source::Host => "host",
        }
    }
}

/// Refused attempts from one source to one guarded role (packets: a refused TCP connection
/// counts once, a dropped one once per SYN sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub to: String,
    pub from: Source,
    pub packets: u64,
}

/// The tables of one bridge.
#[derive(Debug)]
pub struct Firewall {
    nft: PathBuf,
    table: String,
    roles: Vec<String>,
    guarded: Vec<usize>,
}

/// An instance known to the firewall: its link, address and role (by index).
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub link: String,
    pub addr: Ipv4Addr,
    pub role: Option<usize>,
}

impl Firewall {
    /// Makes the tables of `bridge` (replacing what a previous run left) in one transaction.
    pub(crate) fn install(
        bridge: &str,
        gateway: Ipv4Addr,
        config: &PolicyConfig,
    ) -> Result<Firewall, DriverError> {
        let firewall = Firewall {
            nft: find_nft()?,
            table: bridge.to_string(),
            roles: config.roles.iter().map(|r| r.name.clone()).collect(),
            guarded: (0..config.roles.len())
                .filter(|&i| config.roles[i].guard.is_some())
                .collect(),
        };
        let uid = effective_uid();
        let script = format!(
            "{}{}{}",
            firewall.clear_script(),
            bridge_table(bridge, config),
            inet_table(bridge, gateway, uid, config)
        );
        firewall.run(&script).map_err(|why| {
            DriverError::Network(format!("network policy: cannot install the rules: {why}"))
        })?;
        Ok(firewall)
    }

    /// Removes tables a previous run left for `bridge`, if `nft` is here (a run without a
    /// policy must not keep the old one's rules).
    pub(crate) fn remove_stale(bridge: &str) {
        if let Ok(nft) = find_nft() {
            let firewall = Firewall {
                nft,
                table: bridge.to_string(),
                roles: Vec::new(),
                guarded: Vec::new(),
            };
            let _ = firewall.run(&firewall.clear_script());
        }
    }

    fn clear_script(&self) -> String {
        let t = &self.table;
        format!(
            "table bridge {t} {{}}\ndelete table bridge {t}\ntable inet {t} {{}}\ndelete table inet {t}\n"
        )
    }

    /// The index of a role in the sets, if the policy knows it.
    pub(crate) fn role_index(&self, role: &str) -> Option<usize> {
        self.roles.iter().position(|r| r == role)
    }

    /// Binds an instance's link to its address and adds it to its role's sets: done before
    /// the link exists, so its first packet is judged.
    pub(crate) fn admit(&self, member: &Member) -> Result<(), DriverError> {
        self.run(&self.elements("add", member)).map_err(|why| {
            DriverError::Network(format!(
                "network policy: cannot admit {} ({}): {why}",
                member.link, member.addr
            ))
        })
    }

    /// Takes an instance out again (before its address is handed out to another).
    pub(crate) fn forget(&self, member: &Member) {
        if let Err(why) = self.run(&self.elements("delete", member)) {
            tracing::warn!(link = %member.link, %why, "network policy: removing an instance");
        }
    }

    fn elements(&self, verb: &str, member: &Member) -> String {
        let (t, link, addr) = (&self.table, &member.link, member.addr);
        let mut script = format!(
            "{verb} element bridge {t} links {{ \"{link}\" }}\n{verb} element bridge {t} bound {{ \"{link}\" . {addr} }}\n"
        );
        if let Some(i) = member.role {
            let _ = write!(
                script,
                "{verb} element bridge {t} a_{i} {{ {addr} }}\n{verb} element inet {t} a_{i} {{ {addr} }}\n"
            );
        }
        script
    }

    /// Refused attempts so far, per guarded role and source (every pair, none included).
    pub fn denied(&self) -> Result<Vec<Denied>, DriverError> {
        let mut found = Vec::new();
        for family in ["bridge", "inet"] {
            let output = Command::new(&self.nft)
                .args(["-j", "list", "counters", "table", family, &self.table])
                .output()
                .map_err(|e| DriverError::Network(format!("network policy: run nft: {e}")))?;
            if !output.status.success() {
                return Err(DriverError::Network(format!(
                    "network policy: nft list counters: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                )));
            }
            found.extend(parse_counters(&output.stdout));
        }
        let mut denied: Vec<Denied> = Vec::new();
        for (name, packets) in found {
            let Some((to, from)) = self.counter_meaning(&name) else {
                continue;
            };
            match denied.iter_mut().find(|d| d.to == to && d.from == from) {
                Some(entry) => entry.packets += packets,
                None => denied.push(Denied { to, from, packets }),
            }
        }
        denied.sort_by(|a, b| (&a.to, &a.from).cmp(&(&b.to, &b.from)));
        Ok(denied)
    }

    /// What a counter's name (`d_FROM_TO`, `x_TO`, `o_TO`, `h_TO`) counts.
    fn counter_meaning(&self, name: &str) -> Option<(String, Source)> {
        let role = |index: &str| index.parse::<usize>().ok().and_then(|i| self.roles.get(i));
        let (kind, rest) = name.split_once('_')?;
        let (from, to) = match kind {
            "d" => {
                let (from, to) = rest.split_once('_')?;
                (Source::Role(role(from)?.clone()), to)
            }
            "x" => (Source::Unlisted, rest),
            "o" => (Source::Outside, rest),
            "h" => (Source::Host, rest),
            _ => return None,
        };
        let to = role(to)?;
        self.guarded
            .iter()
            .any(|&g| self.roles[g] == *to)
            .then(|| (to.clone(), from))
    }

    /// Removes both tables (at shutdown).
    pub(crate) fn remove(&self) {
        if let Err(why) = self.run(&self.clear_script()) {
            tracing::warn!(%why, "network policy: removing the tables");
        }
    }

    fn run(&self, script: &str) -> Result<(), String> {
        run_nft(&self.nft, script)
    }
}

/// Feeds `script` to `nft -f -`: one transaction, all or nothing.
pub(crate) fn run_nft(nft: &std::path::Path, script: &str) -> Result<(), String> {
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", nft.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("cannot write to nft: {e}"))?;
    }
    let output = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }
}

/// `(name, packets)` of every named counter in `nft -j list counters` output.
fn parse_counters(json: &[u8]) -> Vec<(String, u64)> {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) else {
        return Vec::new();
    };
    value["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let counter = item.get("counter")?;
            Some((
                counter["name"].as_str()?.to_string(),
                counter["packets"].as_u64()?,
            ))
        })
        .collect()
}

fn find_nft() -> Result<PathBuf, DriverError> {
    nft_for("network policy (allow_from, allow_cidrs)")
}

/// The `nft` command, or an error saying that `what` needs it.
pub(crate) fn nft_for(what: &str) -> Result<PathBuf, DriverError> {
    [
        "/usr/sbin/nft",
        "/sbin/nft",
        "/usr/bin/nft",
        "/usr/local/sbin/nft",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|path| path.is_file())
    .ok_or_else(|| {
        DriverError::Network(format!(
            "{what} needs nftables: install the `nftables` package (the `nft` command)"
        ))
    })
}

pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// A connection attempt: a TCP SYN without ACK.
const SYN: &str = "tcp flags & (syn | ack) == syn";

/// The `bridge` table: links bound to their addresses, and direct attempts between instances.
fn bridge_table(bridge: &str, config: &PolicyConfig) -> String {
    let mut t = format!(
        "table bridge {bridge} {{\n  set links {{ type ifname; }}\n  set bound {{ type ifname . ipv4_addr; }}\n  counter spoofed {{ }}\n  counter ipv6 {{ }}\n"
    );
    role_sets(&mut t, config);
    counters(&mut t, config, &["x"]);
    for (j, role) in config.roles.iter().enumerate() {
        if let Some(guard) = &role.guard {
            guard_chain(&mut t, config, j, guard, "drop");
        }
    }
    t.push_str(
        "  chain prerouting {\n    type filter hook prerouting priority -200; policy accept;\n\
         \x20   iifname @links ether type ip iifname . ip saddr != @bound counter name \"spoofed\" drop\n\
         \x20   iifname @links ether type arp iifname . arp saddr ip != @bound counter name \"spoofed\" drop\n\
         \x20   iifname @links ether type ip6 counter name \"ipv6\" drop\n  }\n",
    );
    t.push_str("  chain forward {\n    type filter hook forward priority 0; policy accept;\n");
    for j in guarded(config) {
        let _ = writeln!(t, "    ip daddr @a_{j} {SYN} jump guard_{j}");
        let _ = writeln!(t, "    ip daddr @a_{j} meta l4proto udp jump guard_{j}");
    }
    t.push_str("  }\n}\n");
    t
}

/// The `inet` table: what reaches a guarded role's proxy, and local users to its instances.
fn inet_table(bridge: &str, gateway: Ipv4Addr, uid: u32, config: &PolicyConfig) -> String {
    let mut t = format!("table inet {bridge} {{\n");
    role_sets(&mut t, config);
    counters(&mut t, config, &["x", "o", "h"]);
    t.push_str("  chain deny {\n    meta l4proto tcp reject with tcp reset\n    reject\n  }\n");
    for (j, role) in config.roles.iter().enumerate() {
        let Some(guard) = &role.guard else { continue };
        guard_chain(&mut t, config, j, guard, "goto deny");
        let _ = writeln!(
            t,
            "  set c4_{j} {{ type ipv4_addr; flags interval; {}}}",
            elements(guard, true)
        );
        let _ = writeln!(
            t,
            "  set c6_{j} {{ type ipv6_addr; flags interval; {}}}",
            elements(guard, false)
        );
        let _ = write!(
            t,
            "  chain outside_{j} {{\n    ip saddr @c4_{j} accept\n    ip6 saddr @c6_{j} accept\n    counter name \"o_{j}\" goto deny\n  }}\n"
        );
    }
    t.push_str("  chain input {\n    type filter hook input priority 0; policy accept;\n");
    for j in guarded(config) {
        let listen = config.roles[j].listen;
        let port = listen.port();
        // From an instance: its proxy's port at whatever address of this host.
        let _ = writeln!(
            t,
            "    iifname \"{bridge}\" tcp dport {port} {SYN} jump guard_{j}"
        );
        for target in outside_targets(listen, gateway) {
            let _ = writeln!(
                t,
                "    iifname != \"{bridge}\" {target}tcp dport {port} {SYN} jump outside_{j}"
            );
        }
    }
    t.push_str("  }\n  chain output {\n    type filter hook output priority 0; policy accept;\n");
    for j in guarded(config) {
        for proto in [SYN, "meta l4proto udp"] {
            let _ = writeln!(
                t,
                "    oifname \"{bridge}\" ip daddr @a_{j} {proto} meta skuid != {uid} counter name \"h_{j}\" goto deny"
            );
        }
    }
    t.push_str("  }\n}\n");
    t
}

fn guarded(config: &PolicyConfig) -> impl Iterator<Item = usize> + '_ {
    (0..config.roles.len()).filter(|&j| config.roles[j].guard.is_some())
}

fn role_sets(t: &mut String, config: &PolicyConfig) {
    for i in 0..config.roles.len() {
        let _ = writeln!(t, "  set a_{i} {{ type ipv4_addr; }}");
    }
}

/// `d_FROM_TO` for every role and guarded role, and one per `extra` prefix and guarded role.
fn counters(t: &mut String, config: &PolicyConfig, extra: &[&str]) {
    for j in guarded(config) {
        for i in 0..config.roles.len() {
            let _ = writeln!(t, "  counter d_{i}_{j} {{ }}");
        }
        for prefix in extra {
            let _ = writeln!(t, "  counter {prefix}_{j} {{ }}");
        }
    }
}

/// Lets the allowed roles' instances through and refuses (`deny`) the rest, counted.
fn guard_chain(t: &mut String, config: &PolicyConfig, j: usize, guard: &Guard, deny: &str) {
    let _ = writeln!(t, "  chain guard_{j} {{");
    for (i, role) in config.roles.iter().enumerate() {
        if guard.allow_from.contains(&role.name) {
            let _ = writeln!(t, "    ip saddr @a_{i} accept");
        } else {
            let _ = writeln!(t, "    ip saddr @a_{i} counter name \"d_{i}_{j}\" {deny}");
        }
    }
    let _ = writeln!(t, "    counter name \"x_{j}\" {deny}\n  }}");
}

/// `elements = { ... }; ` of the guard's networks of one family, or nothing.
fn elements(guard: &Guard, v4: bool) -> String {
    let list: Vec<String> = guard
        .allow_cidrs
        .iter()
        .filter(|c| c.addr.is_ipv4() == v4)
        .map(Cidr::to_string)
        .collect();
    if list.is_empty() {
        String::new()
    } else {
        format!("elements = {{ {} }}; ", list.join(", "))
    }
}

/// The destination matches (each followed by a space) under which a connection from outside
/// the bridge reaches a role listening on `listen`: its address (any, when unspecified), and
/// the bridge's address when it listens on loopback (its proxy listens there too).
fn outside_targets(listen: SocketAddr, gateway: Ipv4Addr) -> Vec<String> {
    let ip = listen.ip();
    let mut targets = Vec::new();
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => targets.push("meta nfproto ipv4 ".to_string()),
        IpAddr::V6(v6) if v6.is_unspecified() => targets.push(String::new()),
        IpAddr::V4(v4) => targets.push(format!("ip daddr {v4} ")),
        IpAddr::V6(v6) => targets.push(format!("ip6 daddr {v6} ")),
    }
    if ip.is_loopback() {
        targets.push(format!("ip daddr {gateway} "));
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PolicyConfig {
        let role = |name: &str, port: u16, guard| RoleRule {
            name: name.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            guard,
        };
        PolicyConfig {
            roles: vec![
                role("api", 8081, None),
                role(
                    "db",
                    8082,
                    Some(Guard {
                        allow_from: vec!["api".into()],
                        allow_cidrs: vec![
                            Cidr::parse("127.0.0.1").unwrap(),
                            Cidr::parse("fd00::/8").unwrap(),
                        ],
                    }),
                ),
                role("web", 8080, None),
            ],
        }
    }

    #[test]
    fn networks_parse_with_clear_errors() {
        assert_eq!(Cidr::parse("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            Cidr::parse("127.0.0.1").unwrap().to_string(),
            "127.0.0.1/32"
        );
        assert_eq!(Cidr::parse("::1").unwrap().to_string(), "::1/128");
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().prefix, 0);
        assert!(Cidr::parse("10.0.0.1/8").unwrap_err().contains("host bits"));
        assert!(Cidr::parse("10.0.0.0/33").unwrap_err().contains("/32"));
        assert!(Cidr::parse("web").unwrap_err().contains("not a network"));
        assert!(
            Cidr::parse("10.0.0.0/x")
                .unwrap_err()
                .contains("not a network")
        );
    }

    #[test]
    fn a_guarded_role_lets_its_allowed_roles_through_and_counts_the_others() {
        let bridge = bridge_table("phx1", &config());
        // db (1) allows api (0), refuses web (2) and instances of no role, directly.
        assert!(bridge.contains("chain guard_1 {\n    ip saddr @a_0 accept\n    ip saddr @a_1 counter name \"d_1_1\" drop\n    ip saddr @a_2 counter name \"d_2_1\" drop\n    counter name \"x_1\" drop\n  }"), "{bridge}");
        assert!(bridge.contains(&format!("ip daddr @a_1 {SYN} jump guard_1")));
        assert!(!bridge.contains("guard_0") && !bridge.contains("guard_2"));
        assert!(bridge.contains("iifname . ip saddr != @bound"));
        let inet = inet_table("phx1", Ipv4Addr::new(10, 89, 0, 1), 0, &config());
        assert!(inet.contains(&format!(
            "iifname \"phx1\" tcp dport 8082 {SYN} jump guard_1"
        )));
        assert!(inet.contains(&format!(
            "iifname != \"phx1\" ip daddr 127.0.0.1 tcp dport 8082 {SYN} jump outside_1"
        )));
        assert!(inet.contains(&format!(
            "iifname != \"phx1\" ip daddr 10.89.0.1 tcp dport 8082 {SYN} jump outside_1"
        )));
        assert!(
            inet.contains(
                "set c4_1 { type ipv4_addr; flags interval; elements = { 127.0.0.1/32 }; }"
            )
        );
        assert!(
            inet.contains("set c6_1 { type ipv6_addr; flags interval; elements = { fd00::/8 }; }")
        );
        assert!(inet.contains("meta skuid != 0 counter name \"h_1\" goto deny"));
        assert!(!inet.contains("dport 8080") && !inet.contains("dport 8081"));
    }

    #[test]
    fn listeners_on_any_address_are_guarded_on_every_address() {
        let gw = Ipv4Addr::new(10, 89, 0, 1);
        let any4 = outside_targets("0.0.0.0:80".parse().unwrap(), gw);
        assert_eq!(any4, vec!["meta nfproto ipv4 "]);
        assert_eq!(outside_targets("[::]:80".parse().unwrap(), gw), vec![""]);
        assert_eq!(
            outside_targets("[::1]:80".parse().unwrap(), gw),
            vec!["ip6 daddr ::1 ", "ip daddr 10.89.0.1 "]
        );
        assert_eq!(
            outside_targets("192.0.2.7:80".parse().unwrap(), gw),
            vec!["ip daddr 192.0.2.7 "]
        );
    }

    #[test]
    fn counters_are_read_back_as_role_pairs() {
        let config = config();
        let firewall = Firewall {
            nft: "/usr/sbin/nft".into(),
            table: "phx1".into(),
            roles: config.roles.iter().map(|r| r.name.clone()).collect(),
            guarded: vec![1],
        };
        let json = br#"{"nftables": [{"metainfo": {}},
            {"counter": {"family": "inet", "name": "d_2_1", "table": "phx1", "packets": 3, "bytes": 180}},
            {"counter": {"family": "inet", "name": "o_1", "table": "phx1", "packets": 1, "bytes": 60}},
            {"counter": {"family": "inet", "name": "h_1", "table": "phx1", "packets": 0, "bytes": 0}},
            {"counter": {"family": "bridge", "name": "spoofed", "table": "phx1", "packets": 9, "bytes": 0}}]}"#;
        let counters = parse_counters(json);
        assert_eq!(counters.len(), 4);
        assert_eq!(
            firewall.counter_meaning("d_2_1"),
            Some(("db".into(), Source::Role("web".into())))
        );
        assert_eq!(
            firewall.counter_meaning("o_1"),
            Some(("db".into(), Source::Outside))
        );
        assert_eq!(
            firewall.counter_meaning("d_1_0"),
            None,
            "api is not guarded"
        );
        assert_eq!(firewall.counter_meaning("spoofed"), None);
        assert_eq!(firewall.counter_meaning("d_9_1"), None);
    }

    #[test]
    fn an_instance_is_bound_to_its_link_and_joins_its_role() {
        let firewall = Firewall {
            nft: "/usr/sbin/nft".into(),
            table: "phx1".into(),
            roles: vec!["api".into()],
            guarded: vec![],
        };
        let member = Member {
            link: "px0123".into(),
            addr: Ipv4Addr::new(10, 89, 0, 5),
            role: Some(0),
        };
        let script = firewall.elements("add", &member);
        assert_eq!(
            script,
            "add element bridge phx1 links { \"px0123\" }\n\
             add element bridge phx1 bound { \"px0123\" . 10.89.0.5 }\n\
             add element bridge phx1 a_0 { 10.89.0.5 }\n\
             add element inet phx1 a_0 { 10.89.0.5 }\n"
        );
        let unlisted = Member {
            role: None,
            ..member
        };
        assert_eq!(firewall.elements("delete", &unlisted).lines().count(), 2);
    }
}
