//! `http`: one HTTP/1.1 request (redirects followed unless told not to), status, headers, body;
//! over TLS for `https://` (goss's `ca-file`, `cert-file`/`key-file`, `allow-insecure`), and
//! through an HTTP `proxy` (CONNECT for https) when one is given.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use serde_json::{Value as Json, json};

use crate::suite::Check;

const DEFAULT_TIMEOUT_MS: u64 = 5_000;
const MAX_REDIRECTS: usize = 10;
/// A response larger than this is refused: a hostile server cannot grow the runner's memory.
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Trusted when an https check names no `ca-file`.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https://`.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, String> {
        let (tls, rest) = match url.split_once("://") {
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            _ => {
                return Err(format!(
                    "bad URL {url:?}: expected http[s]://HOST[:PORT]/PATH"
                ));
            }
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
            _ => (authority, if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(format!("bad URL {url:?}: no host"));
        }
        Ok(Url {
            tls,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            path: path.to_string(),
        })
    }

    /// `http://host:port/path`, the absolute form a proxy is asked for.
    fn absolute(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority(), self.path)
    }

    /// `host:port`, an IPv6 host in brackets.
    fn authority(&self) -> String {
        match self.host.contains(':') {
            true => format!("[{}]:{}", self.host, self.port),
            false => format!("{}:{}", self.host, self.port),
        }
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

/// A connection, plain or TLS, and the socket under it (for timeouts).
struct Connection {
    socket: TcpStream,
    stream: Box<dyn ReadWrite>,
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Connects to `url`, or through the check's `proxy` (a CONNECT tunnel for https), with TLS
/// for https.
fn connect(check: &Check, url: &Url, left: &dyn Fn() -> Duration) -> Result<Connection, String> {
    let proxy = check.option_str("proxy").map(Url::parse).transpose()?;
    if proxy.as_ref().is_some_and(|p| p.tls) {
        return Err("an https proxy is not supported: give the proxy as http://HOST:PORT".into());
    }
    let hop = proxy.as_ref().unwrap_or(url);
    let addr = (hop.host.as_str(), hop.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", hop.host))?
        .next()
        .ok_or_else(|| format!("{} has no address", hop.host))?;
    let socket =
        TcpStream::connect_timeout(&addr, left()).map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = socket.set_nodelay(true);
    socket.set_read_timeout(Some(left())).ok();
    socket.set_write_timeout(Some(left())).ok();
    let mut plain = socket.try_clone().map_err(|e| e.to_string())?;
    if proxy.is_some() && url.tls {
        tunnel(&mut plain, url)?;
    }
    let stream: Box<dyn ReadWrite> = match url.tls {
        false => Box::new(plain),
        true => {
            let name = ServerName::try_from(url.host.clone())
                .map_err(|e| format!("{}: not a TLS server name: {e}", url.host))?;
            let tls = rustls::ClientConnection::new(tls_config(check)?, name)
                .map_err(|e| format!("TLS: {e}"))?;
            Box::new(rustls::StreamOwned::new(tls, plain))
        }
    };
    Ok(Connection { socket, stream })
}

/// Asks an HTTP proxy for a tunnel to `url` (`CONNECT host:port`) and reads its answer.
fn tunnel(socket: &mut TcpStream, url: &Url) -> Result<(), String> {
    let authority = url.authority();
    let ask = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    socket
        .write_all(ask.as_bytes())
        .map_err(|e| format!("proxy: {e}"))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 {
            return Err("proxy: answer head too long".into());
        }
        match socket.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => return Err("proxy: closed before answering CONNECT".into()),
            Err(e) => return Err(format!("proxy: {e}")),
        }
    }
    let status = String::from_utf8_lossy(&head);
    let status = status.lines().next().unwrap_or("");
    match status.split_whitespace().nth(1) {
        Some(code) if code.starts_with('2') => Ok(()),
        _ => Err(format!("proxy refused CONNECT {authority}: {status}")),
    }
}

/// TLS 1.2/1.3, the server checked against `ca-file` or the system's CAs (not at all with
/// `allow-insecure`), with a client certificate when `cert-file` and `key-file` are given.
fn tls_config(check: &Check) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match check.option_bool("allow-insecure") {
        true => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))),
        false => builder.with_root_certificates(roots(check.option_str("ca-file"))?),
    };
    let config = match (check.option_str("cert-file"), check.option_str("key-file")) {
        (Some(cert), Some(key)) => {
            let chain = certificates(cert)?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("key-file {key}: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("cert-file {cert}: {e}"))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("cert-file and key-file are given together".into()),
    };
    Ok(Arc::new(config))
}

fn roots(ca_file: Option<&str>) -> Result<rustls::RootCertStore, String> {
    let bundle = ca_file.unwrap_or(SYSTEM_CA_BUNDLE);
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(bundle)? {
        // A bundle may hold a certificate webpki cannot use; the others still serve.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(format!("no usable CA certificate in {bundle}"));
    }
    Ok(roots)
}

fn certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{path}: {e}"))
}

/// `allow-insecure`: any server certificate is accepted, though the handshake's signatures
/// are still verified.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn request(check: &Check, url: &Url, method: &str, deadline: Instant) -> Result<Response, String> {
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let Connection { socket, mut stream } = connect(check, url, &left)?;
    let where_to = url.authority();
    // A plain request through a proxy names the whole URL.
    let target = match check.option_str("proxy").is_some() && !url.tls {
        true => url.absolute(),
        false => url.path.clone(),
    };
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: phoenix-check\r\n",
        url.authority()
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
    socket.set_write_timeout(Some(left())).ok();
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(|e| format!("send to {where_to}: {e}"))?;
    let mut raw = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        socket.set_read_timeout(Some(left())).ok();
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buffer[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("no complete response from {where_to} in time"));
            }
            // A TLS server that closes without close_notify has still sent its whole answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => break,
            Err(e) => return Err(format!("read from {where_to}: {e}")),
        }
        if raw.len() > MAX_RESPONSE_BYTES {
            return Err(format!(
                "the response from {where_to} is larger than {} MiB",
                MAX_RESPONSE_BYTES >> 20
            ));
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
        let https = Url::parse("https://example/x").unwrap();
        assert_eq!(
            (https.tls, https.port, https.absolute()),
            (true, 443, "https://example:443/x".to_string())
        );
        assert_eq!(
            Url::parse("http://[::1]:81/").unwrap().authority(),
            "[::1]:81"
        );
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
