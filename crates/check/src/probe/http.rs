//! `http`: one HTTP/1.1 request (redirects followed unless told not to), status, headers, body.
//! Plain `http://` only: checks run against instances and local services.

use std::io::{Read, Write};

use base64::Engine;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

use crate::suite::Check;

const DEFAULT_TIMEOUT_MS: u64 = 5_000;
const MAX_REDIRECTS: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, String> {
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => {
                return Err(format!(
                    "{url}: https is not supported; check the service over plain http on loopback"
                ));
            }
            _ => return Err(format!("bad URL {url:?}: expected http://HOST[:PORT]/PATH")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => (
                host,
                port.parse()
                    .map_err(|_| format!("bad URL {url:?}: bad port {port:?}"))?,
            ),
            _ => (authority, 80),
        };
        if host.is_empty() {
            return Err(format!("bad URL {url:?}: no host"));
        }
        Ok(Url {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            path: path.to_string(),
        })
    }

    fn resolve(&self, location: &str) -> Result<Url, String> {
        if location.starts_with('/') {
            return Ok(Url {
                path: location.to_string(),
                ..self.clone()
            });
        }
        Url::parse(location)
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

pub fn observe(check: &Check) -> impl Fn(&str) -> Result<Json, String> + '_ {
    let response = fetch(check);
    move |attribute| {
        let response = response.as_ref().map_err(Clone::clone)?;
        Ok(match attribute {
            "status" => json!(response.status),
            "headers" => {
                // As goss prints them: Go's canonical names, one line per value, sorted.
                let mut lines: Vec<String> = response
                    .headers
                    .iter()
                    .map(|(k, v)| format!("{}: {v}", canonical_name(k)))
                    .collect();
                lines.sort();
                json!(lines.join("\n"))
            }
            _ => json!(String::from_utf8_lossy(&response.body)),
        })
    }
}

/// Go's `CanonicalMIMEHeaderKey`: `content-type` is `Content-Type`. A name with a byte that
/// is not a token character is left as it is, as Go leaves it.
fn canonical_name(name: &str) -> String {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !name.bytes().all(token) {
        return name.to_string();
    }
    let mut upper = true;
    name.chars()
        .map(|c| {
            let out = match upper {
                true => c.to_ascii_uppercase(),
                false => c.to_ascii_lowercase(),
            };
            upper = c == '-';
            out
        })
        .collect()
}

fn fetch(check: &Check) -> Result<Response, String> {
    let timeout = Duration::from_millis(check.timeout_ms(DEFAULT_TIMEOUT_MS));
    let deadline = Instant::now() + timeout;
    let mut url = Url::parse(check.target())?;
    let mut method = check.option_str("method").unwrap_or("GET").to_string();
    let follow = !check.option_bool("no-follow-redirects");
    for _ in 0..=MAX_REDIRECTS {
        let response = request(check, &url, &method, deadline)?;
        let location = response
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("location"));
        match location {
            Some((_, location)) if follow && (300..400).contains(&response.status) => {
                url = url.resolve(location)?;
                if response.status == 303 {
                    method = "GET".into();
                }
            }
            _ => return Ok(response),
        }
    }
    Err(format!("more than {MAX_REDIRECTS} redirects"))
}

fn request(check: &Check, url: &Url, method: &str, deadline: Instant) -> Result<Response, String> {
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let addr = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", url.host))?
        .next()
        .ok_or_else(|| format!("{} has no address", url.host))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, left()).map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\nUser-Agent: phoenix-check\r\n",
        url.path, url.host, url.port
    );
    if let Some(user) = check.option_str("username") {
        let credentials = format!("{user}:{}", check.option_str("password").unwrap_or(""));
        head.push_str(&format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(credentials.as_bytes())
        ));
    }
    for header in check
        .options
        .get("request-headers")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        head.push_str(header.as_str().unwrap_or_default());
        head.push_str("\r\n");
    }
    let body = check.option_str("request-body").unwrap_or("");
    if !body.is_empty() || method != "GET" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    head.push_str(body);
    stream.set_write_timeout(Some(left())).ok();
    stream
        .write_all(head.as_bytes())
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut raw = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        stream.set_read_timeout(Some(left())).ok();
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buffer[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("no complete response from {addr} in time"));
            }
            Err(e) => return Err(format!("read from {addr}: {e}")),
        }
    }
    parse_response(&raw, method == "HEAD")
}

fn parse_response(raw: &[u8], head_only: bool) -> Result<Response, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let end = match parsed.parse(raw) {
        Ok(httparse::Status::Complete(end)) => end,
        Ok(httparse::Status::Partial) => {
            return Err("the connection closed before the response head ended".into());
        }
        Err(e) => return Err(format!("bad response: {e}")),
    };
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    let rest = &raw[end..];
    let body = match (head_only, chunked) {
        (true, _) => Vec::new(),
        (false, true) => dechunk(rest)?,
        (false, false) => rest.to_vec(),
    };
    Ok(Response {
        status: parsed.code.unwrap_or(0),
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunked body")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(data.get(..size).ok_or("truncated chunk")?);
        data = data.get(size + 2..).ok_or("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_encodings() {
        let url = Url::parse("http://127.0.0.1:8080/healthz?x=1").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("127.0.0.1", 8080, "/healthz?x=1")
        );
        assert_eq!(Url::parse("http://[::1]:81").unwrap().host, "::1");
        assert_eq!(Url::parse("http://example").unwrap().port, 80);
        assert!(Url::parse("https://example").unwrap_err().contains("https"));
        assert!(Url::parse("ftp://x").is_err());
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
    }

    #[test]
    fn header_names_are_gos_canonical_names() {
        assert_eq!(canonical_name("content-TYPE"), "Content-Type");
        assert_eq!(canonical_name("x-request-id"), "X-Request-Id");
        assert_eq!(canonical_name("etag"), "Etag");
        assert_eq!(canonical_name("bad name"), "bad name");
    }
}
