//! `dns` checks with a `server`: one query to that server (UDP, then TCP when the answer is
//! truncated), its answers written as goss writes them (`10 mail.example.`, `0 5 443
//! srv.example.`, `0 issue letsencrypt.org`). Answers are untrusted bytes: every read is
//! bounds-checked and compressed names may not loop.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::Duration;

/// The record types goss queries by prefix (`MX:example.com`).
pub const TYPES: &[(&str, u16)] = &[
    ("A", 1),
    ("NS", 2),
    ("CNAME", 5),
    ("PTR", 12),
    ("MX", 15),
    ("TXT", 16),
    ("AAAA", 28),
    ("SRV", 33),
    ("SSHFP", 44),
    ("CAA", 257),
];

/// The answers for `host` of type `qtype` (`None`: A and AAAA, as goss's plain lookup) from
/// `server` (`HOST[:PORT]`, port 53 when missing), sorted.
pub fn lookup(
    host: &str,
    qtype: Option<&str>,
    server: &str,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let server = server_address(server)?;
    let mut answers = match qtype {
        None => {
            let mut both = query(host, 1, server, timeout)?;
            both.extend(query(host, 28, server, timeout)?);
            both
        }
        Some("PTR") => query(&reverse_name(host)?, 12, server, timeout)?,
        Some(name) => {
            let code = TYPES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, code)| *code)
                .ok_or_else(|| format!("dns record type {name} is not supported"))?;
            query(host, code, server, timeout)?
        }
    };
    answers.sort();
    Ok(answers)
}

/// `HOST[:PORT]` with port 53 by default, as goss's `parseServerString`.
fn server_address(server: &str) -> Result<SocketAddr, String> {
    let with_port = match server.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:53"),
        Ok(IpAddr::V4(ip)) => format!("{ip}:53"),
        Err(_)
            if server
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok()) =>
        {
            server.to_string()
        }
        Err(_) => format!("{server}:53"),
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| format!("dns server {server}: {e}"))?
        .next()
        .ok_or_else(|| format!("dns server {server} has no address"))
}

/// `8.8.8.8` is `8.8.8.8.in-addr.arpa`; an IPv6 address its nibbles under `ip6.arpa`.
fn reverse_name(addr: &str) -> Result<String, String> {
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => {
            let o = ip.octets();
            Ok(format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0]))
        }
        Ok(IpAddr::V6(ip)) => {
            let nibbles: Vec<String> = ip
                .octets()
                .iter()
                .rev()
                .flat_map(|b| [b & 0xf, b >> 4])
                .map(|n| format!("{n:x}"))
                .collect();
            Ok(format!("{}.ip6.arpa", nibbles.join(".")))
        }
        Err(_) => Err(format!("PTR:{addr}: not an IP address")),
    }
}

fn query(
    host: &str,
    qtype: u16,
    server: SocketAddr,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let id = (std::process::id() as u16) ^ (qtype.rotate_left(7));
    let message = encode_query(id, host, qtype)?;
    let bind = if server.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let socket = UdpSocket::bind(bind).map_err(|e| format!("dns: {e}"))?;
    socket.set_read_timeout(Some(timeout)).ok();
    socket
        .send_to(&message, server)
        .map_err(|e| format!("dns query to {server}: {e}"))?;
    let mut buffer = [0u8; 4096];
    let answer = loop {
        let (len, from) = socket.recv_from(&mut buffer).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                format!("DNS lookup timed out ({timeout:?})")
            }
            _ => format!("dns answer from {server}: {e}"),
        })?;
        // Only the server's answer to this query counts.
        if from == server && len >= 2 && buffer[..2] == id.to_be_bytes() {
            break buffer[..len].to_vec();
        }
    };
    let truncated = answer.get(2).is_some_and(|flags| flags & 0x02 != 0);
    let answer = match truncated {
        true => query_tcp(&message, server, timeout)?,
        false => answer,
    };
    decode_answers(&answer, qtype)
}

/// The same query over TCP, for an answer too large for UDP.
fn query_tcp(message: &[u8], server: SocketAddr, timeout: Duration) -> Result<Vec<u8>, String> {
    let failed = |e: std::io::Error| format!("dns over TCP to {server}: {e}");
    let mut stream = TcpStream::connect_timeout(&server, timeout).map_err(failed)?;
    stream.set_read_timeout(Some(timeout)).ok();
    stream.set_write_timeout(Some(timeout)).ok();
    let mut framed = (message.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(message);
    stream.write_all(&framed).map_err(failed)?;
    let mut length = [0u8; 2];
    stream.read_exact(&mut length).map_err(failed)?;
    let mut answer = vec![0u8; u16::from_be_bytes(length) as usize];
    stream.read_exact(&mut answer).map_err(failed)?;
    Ok(answer)
}

fn encode_query(id: u16, host: &str, qtype: u16) -> Result<Vec<u8>, String> {
    let mut message = Vec::with_capacity(64);
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in host.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{host:?} is not a DNS name"));
        }
        message.push(label.len() as u8);
        message.extend_from_slice(label.as_bytes());
    }
    message.push(0);
    message.extend_from_slice(&qtype.to_be_bytes());
    message.extend_from_slice(&1u16.to_be_bytes()); // IN
    Ok(message)
}

/// The answer records of type `qtype`, as goss prints them.
fn decode_answers(message: &[u8], qtype: u16) -> Result<Vec<String>, String> {
    let bad = || "malformed DNS answer".to_string();
    let u16_at = |at: usize| -> Result<u16, String> {
        Ok(u16::from_be_bytes([
            *message.get(at).ok_or_else(bad)?,
            *message.get(at + 1).ok_or_else(bad)?,
        ]))
    };
    let rcode = u16_at(2)? & 0x0f;
    // NXDOMAIN and friends: nothing resolves (goss: resolvable false, no error).
    if rcode != 0 {
        return Ok(Vec::new());
    }
    let (questions, answers) = (u16_at(4)?, u16_at(6)?);
    let mut at = 12;
    for _ in 0..questions {
        at = read_name(message, at)?.1 + 4;
    }
    let mut found = Vec::new();
    for _ in 0..answers {
        let (_, after_name) = read_name(message, at)?;
        let rtype = u16_at(after_name)?;
        let length = u16_at(after_name + 8)? as usize;
        let start = after_name + 10;
        let data = message.get(start..start + length).ok_or_else(bad)?;
        if rtype == qtype {
            found.push(record_text(message, rtype, start, data)?);
        }
        at = start + length;
    }
    Ok(found)
}

fn record_text(message: &[u8], rtype: u16, start: usize, data: &[u8]) -> Result<String, String> {
    let bad = || "malformed DNS record".to_string();
    let number = |at: usize| -> Result<u16, String> {
        Ok(u16::from_be_bytes([
            *data.get(at).ok_or_else(bad)?,
            *data.get(at + 1).ok_or_else(bad)?,
        ]))
    };
    Ok(match rtype {
        1 => {
            let octets: [u8; 4] = data.try_into().map_err(|_| bad())?;
            std::net::Ipv4Addr::from(octets).to_string()
        }
        28 => {
            let octets: [u8; 16] = data.try_into().map_err(|_| bad())?;
            std::net::Ipv6Addr::from(octets).to_string()
        }
        2 | 5 | 12 => read_name(message, start)?.0,
        15 => format!("{} {}", number(0)?, read_name(message, start + 2)?.0),
        33 => format!(
            "{} {} {} {}",
            number(0)?,
            number(2)?,
            number(4)?,
            read_name(message, start + 6)?.0
        ),
        16 => {
            // One or more length-prefixed strings, joined as goss joins `Txt`.
            let mut text = String::new();
            let mut at = 0;
            while at < data.len() {
                let len = data[at] as usize;
                let part = data.get(at + 1..at + 1 + len).ok_or_else(bad)?;
                text.push_str(&String::from_utf8_lossy(part));
                at += 1 + len;
            }
            text
        }
        44 => {
            let (algorithm, kind) = (data.first().ok_or_else(bad)?, data.get(1).ok_or_else(bad)?);
            let print: String = data[2..].iter().map(|b| format!("{b:02X}")).collect();
            format!("{algorithm} {kind} {print}")
        }
        257 => {
            let flags = data.first().ok_or_else(bad)?;
            let tag_len = *data.get(1).ok_or_else(bad)? as usize;
            let tag = data.get(2..2 + tag_len).ok_or_else(bad)?;
            let value = &data[2 + tag_len..];
            format!(
                "{flags} {} {}",
                String::from_utf8_lossy(tag),
                String::from_utf8_lossy(value)
            )
        }
        _ => return Err(bad()),
    })
}

/// A name at `at` (compression pointers followed, at most 64 jumps) with a trailing dot, and
/// where the bytes after it start.
fn read_name(message: &[u8], mut at: usize) -> Result<(String, usize), String> {
    let bad = || "malformed DNS name".to_string();
    let mut name = String::new();
    let mut after = None;
    for _ in 0..64 {
        let len = *message.get(at).ok_or_else(bad)? as usize;
        match len {
            0 => {
                if name.is_empty() {
                    name.push('.');
                }
                return Ok((name, after.unwrap_or(at + 1)));
            }
            l if l & 0xc0 == 0xc0 => {
                let low = *message.get(at + 1).ok_or_else(bad)? as usize;
                after.get_or_insert(at + 2);
                at = ((l & 0x3f) << 8) | low;
            }
            l => {
                let label = message.get(at + 1..at + 1 + l).ok_or_else(bad)?;
                name.push_str(&String::from_utf8_lossy(label));
                name.push('.');
                at += 1 + l;
            }
        }
    }
    Err(bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_queries_and_hostile_answers() {
        assert_eq!(reverse_name("8.8.4.4").unwrap(), "4.4.8.8.in-addr.arpa");
        assert!(reverse_name("::1").unwrap().starts_with("1.0.0.0."));
        assert!(encode_query(1, "a..b", 1).is_err());
        // A name pointing at itself must not loop; a short answer is an error, not a panic.
        let mut looping = vec![0u8; 12];
        looping[5] = 1;
        looping.extend_from_slice(&[0xc0, 12]);
        assert!(decode_answers(&looping, 1).is_err());
        assert!(decode_answers(&[0, 1, 0x81], 1).is_err());
        assert_eq!(server_address("127.0.0.1").unwrap().port(), 53);
        assert_eq!(server_address("127.0.0.1:5353").unwrap().port(), 5353);
    }
}
