//! Agent addresses as Serf's command line and config take them.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

/// Serf's default gossip port.
pub const DEFAULT_PORT: u16 = 7946;

/// `HOST[:PORT]` as Go's `net.ResolveTCPAddr` takes it, with `default_port` when the port is
/// missing (0: the port is required).
pub fn socket_address(text: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        if default_port == 0 {
            return Err(format!("{text:?} has no port"));
        }
        return Ok(SocketAddr::new(ip, default_port));
    }
    let with_port = match text.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() => text.to_string(),
        _ if default_port == 0 => return Err(format!("{text:?} has no port")),
        _ => format!("{text}:{default_port}"),
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_ips_and_hosts_take_the_default_port() {
        assert_eq!(
            socket_address("::1", 7946).unwrap(),
            "[::1]:7946".parse().unwrap()
        );
        assert_eq!(
            socket_address("[::1]", 7946).unwrap(),
            "[::1]:7946".parse().unwrap()
        );
        assert_eq!(
            socket_address("[::1]:80", 7946).unwrap(),
            "[::1]:80".parse().unwrap()
        );
        assert_eq!(
            socket_address("127.0.0.1", 7946).unwrap(),
            "127.0.0.1:7946".parse().unwrap()
        );
        assert_eq!(socket_address("localhost:81", 0).unwrap().port(), 81);
        assert!(
            socket_address("127.0.0.1", 0)
                .unwrap_err()
                .contains("no port")
        );
    }
}
