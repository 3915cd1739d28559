//! The header policy of both HTTP paths — the fast HTTP/1.1 one (`h1.rs`) and hyper's
//! (`forward.rs`) — written once: what never crosses the proxy, what may be sent again, what
//! the proxy adds, and which requests it refuses. A differential test sends the same requests
//! through both paths and compares what the backend receives.

/// Headers that describe one connection and are never forwarded (RFC 9110, 7.6.1), besides
/// those a `Connection` header names. The fast path passes a chunked response body through
/// as it is, so it keeps that response's `Transfer-Encoding: chunked` (and only that).
pub(crate) const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// True when `name` is one of [`HOP_BY_HOP`].
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// True when a field named `name` is not forwarded: it is one of [`HOP_BY_HOP`], or one of the
/// names its message's `Connection` fields `listed`.
pub(crate) fn is_dropped(name: &str, listed: &[&str]) -> bool {
    is_hop_by_hop(name) || listed.iter().any(|l| l.eq_ignore_ascii_case(name))
}

/// The elements of a comma-separated field value such as `Connection` (RFC 9110, 5.6.1),
/// trimmed, empty ones skipped.
pub(crate) fn list_elements(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|element| !element.is_empty())
}

/// The `Via` value added both ways.
pub(crate) const VIA: &str = "1.1 phoenix";

/// The `X-Forwarded-Proto` added when the client did not send one.
pub(crate) const FORWARDED_PROTO: &str = "http";

/// Methods that may be sent to another backend after one failed mid-request (RFC 9110, 9.2.2),
/// when the request has no body.
pub(crate) fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// The `X-Forwarded-For` sent on, given piece by piece to `push` (the fast path writes it
/// straight into the outgoing head): the client's value, then the client's address.
pub(crate) fn forwarded_for<'a>(
    earlier: Option<&'a [u8]>,
    client_ip: &'a str,
    mut push: impl FnMut(&'a [u8]),
) {
    if let Some(earlier) = earlier {
        push(earlier);
        push(b", ");
    }
    push(client_ip.as_bytes());
}

/// Why a request's `Host` fields make it one to refuse with 400: an HTTP/1.1 request carries
/// exactly one (RFC 9112, 3.2); two could route differently at the proxy and the backend.
pub(crate) fn host_problem(http_1_1: bool, hosts: usize) -> Option<&'static str> {
    match hosts {
        0 if http_1_1 => Some("an HTTP/1.1 request needs a Host header"),
        0 | 1 => None,
        _ => Some("a request may carry only one Host header"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_in_values() {
        assert!(is_hop_by_hop("Transfer-Encoding") && is_hop_by_hop("KEEP-ALIVE"));
        assert!(!is_hop_by_hop("host") && !is_hop_by_hop("x-forwarded-for"));
        assert!(is_dropped("X-Secret", &["x-secret"]) && is_dropped("TE", &[]));
        assert!(!is_dropped("host", &["x-secret"]));
        let value = |earlier: Option<&[u8]>| {
            let mut value = Vec::new();
            forwarded_for(earlier, "10.0.0.1", |piece| value.extend_from_slice(piece));
            value
        };
        assert_eq!(value(None), b"10.0.0.1");
        assert_eq!(value(Some(b"1.2.3.4")), b"1.2.3.4, 10.0.0.1");
        let elements: Vec<&str> = list_elements(" keep-alive, ,X-Secret ,").collect();
        assert_eq!(elements, ["keep-alive", "X-Secret"]);
        assert!(is_idempotent("PUT") && !is_idempotent("POST") && !is_idempotent("get"));
        assert_eq!(host_problem(true, 1), None);
        assert_eq!(host_problem(false, 0), None);
        assert!(host_problem(true, 0).is_some());
        assert!(host_problem(false, 2).is_some());
    }
}
