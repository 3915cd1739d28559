//! `port` (from /proc/net), `addr`, `dns` and `interface`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value as Json, json};

use super::System;
use crate::suite::Check;

/// A listening socket.
#[derive(Debug, Clone)]
pub struct Listener {
    /// `tcp`, `tcp6`, `udp` or `udp6`.
    pub proto: &'static str,
    pub ip: IpAddr,
    pub port: u16,
}

#[derive(Debug, Clone)]
pub struct Interface {
    pub name: String,
    /// `addr/prefix`, as `ip addr` shows them.
    pub addrs: Vec<String>,
    pub mtu: Option<u64>,
}

/// `tcp:22`, `udp6:53` or `80` (tcp).
pub fn parse_port(id: &str) -> Result<(&'static str, u16), String> {
    let (proto, port) = id.split_once(':').unwrap_or(("tcp", id));
    let proto = ["tcp", "tcp6", "udp", "udp6"]
        .into_iter()
        .find(|p| *p == proto)
        .ok_or_else(|| format!("bad port {id:?}: the protocol is tcp, tcp6, udp or udp6"))?;
    let port = port
        .parse()
        .map_err(|_| format!("bad port {id:?}: {port:?} is not a port number"))?;
    Ok((proto, port))
}

/// `tcp://host:port` or `udp://host:port`.
pub fn parse_addr(id: &str) -> Result<(&'static str, &str), String> {
    let (proto, rest) = id
        .split_once("://")
        .ok_or_else(|| format!("bad addr {id:?}: write tcp://HOST:PORT or udp://HOST:PORT"))?;
    let proto = match proto {
        "tcp" => "tcp",
        "udp" => "udp",
        other => {
            return Err(format!(
                "bad addr {id:?}: protocol {other:?} is not tcp or udp"
            ));
        }
    };
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok((proto, rest)),
        _ => Err(format!(
            "bad addr {id:?}: expected HOST:PORT after {proto}://"
        )),
    }
}

/// `host`, `A:host` or `AAAA:host`.
/// A dns key: `host`, or `TYPE:host` with one of goss's record types.
pub fn parse_dns(id: &str) -> Result<(Option<&str>, &str), String> {
    match id.split_once(':') {
        Some((kind, host)) if super::dns::TYPES.iter().any(|(name, _)| *name == kind) => {
            Ok((Some(kind), host))
        }
        Some((kind, _)) if kind.chars().all(|c| c.is_ascii_uppercase()) => Err(format!(
            "dns record type {kind} is not supported; known: {}",
            super::dns::TYPES
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(", ")
        )),
        _ => Ok((None, id)),
    }
}

pub fn read_listeners() -> Result<Vec<Listener>, String> {
    let mut all = Vec::new();
    for (proto, state) in [("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")] {
        let path = format!("/proc/net/{proto}");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // no IPv6 on this machine
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&state) {
                continue;
            }
            if let Some((ip, port)) = f.get(1).and_then(|a| parse_proc_addr(a)) {
                all.push(Listener { proto, ip, port });
            }
        }
    }
    Ok(all)
}

/// `0100007F:1F90` (IPv4) or 32 hex digits for IPv6: 32-bit words printed in host order
/// (little-endian on the machines Phoenix runs on).
fn parse_proc_addr(text: &str) -> Option<(IpAddr, u16)> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok();
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?.to_le_bytes())),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((ip, port))
}

pub fn port<'a>(
    check: &'a Check,
    system: &'a System,
) -> impl Fn(&str) -> Result<Json, String> + 'a {
    move |attribute| {
        let (proto, port) = parse_port(check.target())?;
        let mut ips: Vec<String> = system
            .ports()?
            .iter()
            .filter(|l| l.proto == proto && l.port == port)
            .map(|l| l.ip.to_string())
            .collect();
        ips.sort();
        ips.dedup();
        Ok(match attribute {
            "listening" => json!(!ips.is_empty()),
            _ => json!(ips),
        })
    }
}

pub fn addr(check: &Check) -> impl Fn(&str) -> Result<Json, String> + '_ {
    move |_| {
        let (proto, target) = parse_addr(check.target())?;
        let timeout = Duration::from_millis(check.timeout_ms(500));
        let addrs = resolve(target, timeout)?;
        let reachable = addrs.iter().any(|addr| match proto {
            "tcp" => TcpStream::connect_timeout(addr, timeout).is_ok(),
            _ => UdpSocket::bind(if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            })
            .and_then(|s| s.connect(addr))
            .is_ok(),
        });
        Ok(json!(reachable))
    }
}

pub fn dns(check: &Check) -> impl Fn(&str) -> Result<Json, String> + '_ {
    let answers = dns_answers(check);
    move |attribute| {
        let answers = answers.as_ref().map_err(Clone::clone)?;
        Ok(match attribute {
            "addrs" => json!(answers),
            _ => json!(!answers.is_empty()),
        })
    }
}

/// What the check's name resolves to: from its `server` when it names one (any record type),
/// else from the system resolver (addresses only).
fn dns_answers(check: &Check) -> Result<Vec<String>, String> {
    let (qtype, host) = parse_dns(check.target())?;
    let timeout = Duration::from_millis(check.timeout_ms(500));
    if let Some(server) = check.option_str("server") {
        return super::dns::lookup(host, qtype, server, timeout);
    }
    let v6 = match qtype {
        None => None,
        Some("A") => Some(false),
        Some("AAAA") => Some(true),
        Some(other) => {
            return Err(format!(
                "dns record type {other} needs `server` (the system resolver gives addresses only)"
            ));
        }
    };
    let mut ips: Vec<String> = resolve(&format!("{host}:0"), timeout)
        .unwrap_or_default()
        .into_iter()
        .filter(|a| v6.is_none_or(|v6| a.is_ipv6() == v6))
        .map(|a| a.ip().to_string())
        .collect();
    ips.sort();
    ips.dedup();
    Ok(ips)
}

/// Resolves through the system resolver, giving up after `timeout`.
fn resolve(target: &str, timeout: Duration) -> Result<Vec<SocketAddr>, String> {
    let (tx, rx) = mpsc::channel();
    let owned = target.to_string();
    std::thread::spawn(move || {
        let _ = tx.send(owned.to_socket_addrs().map(Iterator::collect::<Vec<_>>));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(addrs)) => Ok(addrs),
        Ok(Err(e)) => Err(format!("cannot resolve {target}: {e}")),
        Err(_) => Err(format!("resolving {target} took longer than {timeout:?}")),
    }
}

pub fn read_interfaces() -> Result<Vec<Interface>, String> {
    let dir = std::fs::read_dir("/sys/class/net")
        .map_err(|e| format!("cannot list /sys/class/net: {e}"))?;
    let mut all: Vec<Interface> = dir
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let mtu = std::fs::read_to_string(e.path().join("mtu"))
                .ok()
                .and_then(|m| m.trim().parse().ok());
            Interface {
                name,
                addrs: Vec::new(),
                mtu,
            }
        })
        .collect();
    for (name, ip, prefix) in interface_addrs()? {
        if let Some(interface) = all.iter_mut().find(|i| i.name == name) {
            interface.addrs.push(format!("{ip}/{prefix}"));
        }
    }
    Ok(all)
}

/// The IP addresses of the host's network interfaces, as (interface name, address).
pub fn interface_ips() -> Result<Vec<(String, IpAddr)>, String> {
    Ok(interface_addrs()?
        .into_iter()
        .map(|(name, ip, _)| (name, ip))
        .collect())
}

/// (interface, address, prefix length) from getifaddrs(3).
fn interface_addrs() -> Result<Vec<(String, IpAddr, u32)>, String> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(format!("getifaddrs: {}", std::io::Error::last_os_error()));
    }
    let mut found = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: every node of the list is valid until freeifaddrs; addresses are checked for
        // null and read as the family they declare.
        unsafe {
            let ifa = &*cursor;
            if let (Some(ip), Some(mask)) =
                (sockaddr_ip(ifa.ifa_addr), sockaddr_ip(ifa.ifa_netmask))
            {
                let prefix: u32 = match mask {
                    IpAddr::V4(m) => m.to_bits().count_ones(),
                    IpAddr::V6(m) => m.to_bits().count_ones(),
                };
                let name = std::ffi::CStr::from_ptr(ifa.ifa_name)
                    .to_string_lossy()
                    .into_owned();
                found.push((name, ip, prefix));
            }
            cursor = ifa.ifa_next;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

/// # Safety
/// `addr` is null or points to a sockaddr of the size its family implies.
unsafe fn sockaddr_ip(addr: *const libc::sockaddr) -> Option<IpAddr> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees the pointee matches its family.
    unsafe {
        match (*addr).sa_family as i32 {
            libc::AF_INET => {
                let v4 = &*(addr as *const libc::sockaddr_in);
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                let v6 = &*(addr as *const libc::sockaddr_in6);
                Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

pub fn interface<'a>(
    check: &'a Check,
    system: &'a System,
) -> impl Fn(&str) -> Result<Json, String> + 'a {
    move |attribute| {
        let found = system
            .interfaces()?
            .iter()
            .find(|i| i.name == check.target());
        if attribute == "exists" {
            return Ok(json!(found.is_some()));
        }
        let interface = found.ok_or_else(|| format!("no interface {}", check.target()))?;
        Ok(match attribute {
            "addrs" => json!(interface.addrs),
            _ => json!(interface.mtu),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90"),
            Some(("127.0.0.1".parse().unwrap(), 8080))
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:0016"),
            Some(("::1".parse().unwrap(), 22))
        );
        assert_eq!(parse_port("udp6:53"), Ok(("udp6", 53)));
        assert_eq!(parse_port("80"), Ok(("tcp", 80)));
        assert!(parse_port("sctp:1").is_err());
        assert!(parse_addr("tcp://localhost").is_err());
        assert_eq!(parse_dns("MX:example.com"), Ok((Some("MX"), "example.com")));
        assert_eq!(parse_dns("example.com"), Ok((None, "example.com")));
        assert!(
            parse_dns("HINFO:example.com")
                .unwrap_err()
                .contains("not supported")
        );
    }
}
