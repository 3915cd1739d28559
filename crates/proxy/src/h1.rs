//! The HTTP/1.1 fast path: the common request served without hyper, the way HAProxy does it.
//!
//! A request head is parsed in place (httparse) and rewritten straight into the bytes sent to
//! the backend; the response head is rewritten the same way and the body is passed through
//! as it comes, chunked or not. No header map, no per-request task or channel: one read and
//! one write on each side for a small exchange. Backend connections are raw streams kept in
//! the backend's pool.
//!
//! Anything unusual — HTTP/1.0, HTTP/2 (h2c), upgrades, chunked request bodies,
//! `Expect`, absolute-form targets, a malformed head — hands the connection, with the bytes
//! already read, to the general hyper path ([`crate::serve_hyper`]) for the rest of its life.

use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::bulk;
use crate::chunked::Chunked;
use crate::client_stream::ClientStream;
use crate::pool::{self, Upstream};
use crate::{Backend, InFlight, Parked, RoleProxy, Stop, forward, policy, stop_asked};

/// Longest request or response head accepted on the fast path.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head (as hyper).
const MAX_HEADERS: usize = 100;
/// Free space kept in a read buffer before each read.
pub(crate) const READ_RESERVE: usize = 8 * 1024;

/// One client connection and its buffers, reused from request to request.
struct Client {
    stream: ClientStream,
    /// Bytes read from the client and not yet used (a pipelined request may wait here).
    buf: BytesMut,
    /// The request as it goes to the backend.
    upstream_head: BytesMut,
    /// The response as it goes to the client.
    downstream: BytesMut,
    client_ip: String,
}

/// A request head the fast path can forward, already rewritten into `Client::upstream_head`.
#[derive(Debug, Clone, Copy)]
struct RequestHead {
    /// Length of the client's head in `Client::buf`.
    len: usize,
    /// The declared body length (0 without one).
    body: u64,
    /// A HEAD request: its response has no body whatever its headers say.
    head_method: bool,
    idempotent: bool,
    /// The client asked to close the connection after this response.
    close: bool,
}

enum ParsedRequest {
    Forward(RequestHead),
    Partial,
    Fallback,
    /// Not a request: the connection is to be handed over.
    HandOver,
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

/// A final response head (its fields already given to a [`HeadSink`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResponseHead {
    /// Length of the backend's head in its read buffer.
    pub(crate) len: usize,
    pub(crate) status: u16,
    pub(crate) framing: Framing,
    /// The backend keeps the connection open after this response.
    pub(crate) reusable: bool,
}

pub(crate) enum ParsedResponse {
    Final(ResponseHead),
    /// A 1xx answer of `len` bytes to skip (the final one follows).
    Interim(usize),
    Partial,
}

/// Why one attempt on one backend failed.
enum Failure {
    /// Nothing reached the backend: any request can go to another one.
    NotSent { error: String, refused: bool },
    /// The request may have reached the backend.
    Sent(String),
    /// The client went away while its body was being forwarded.
    Client,
}

/// What to do with the client connection after a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    KeepAlive,
    Close,
}

/// Serves one HTTP client connection: the fast path while requests fit it, then hyper.
/// `buffered` holds what the client sent before (to a previous program). Returns the
/// connection, parked between two requests, when asked to hand it over.
pub(crate) async fn serve(
    stream: ClientStream,
    client: SocketAddr,
    buffered: Bytes,
    proxy: Arc<RoleProxy>,
    mut stop: watch::Receiver<Stop>,
) -> Option<Parked> {
    let mut buf = BytesMut::with_capacity(READ_RESERVE.max(buffered.len()));
    buf.extend_from_slice(&buffered);
    let mut conn = Client {
        stream,
        buf,
        upstream_head: BytesMut::with_capacity(1024),
        downstream: BytesMut::with_capacity(READ_RESERVE),
        client_ip: client.ip().to_string(),
    };
    loop {
        let head = match next_request(&mut conn, &proxy, &mut stop).await {
            Some(ParsedRequest::Forward(head)) => head,
            Some(ParsedRequest::Fallback) => break,
            Some(ParsedRequest::Partial) | None => return None,
            Some(ParsedRequest::HandOver) => return park(conn, client),
        };
        if exchange(&mut conn, &proxy, head).await == After::Close {
            let _ = conn.stream.shutdown().await;
            return None;
        }
    }
    let io = Rewind {
        prefix: conn.buf.freeze(),
        inner: conn.stream,
    };
    crate::serve_hyper(io, client, proxy, stop).await;
    None
}

/// The connection between two requests, with what the client already sent.
fn park(conn: Client, client: SocketAddr) -> Option<Parked> {
    let stream = conn.stream.into_std().ok()?;
    Some(Parked {
        stream,
        client,
        buffered: conn.buf.freeze(),
    })
}

/// Reads until a complete request head is buffered; `None` when the client closed, stayed
/// idle past the idle timeout, took longer than the head timeout over a head it started (it
/// gets 408), or the proxy is draining; `HandOver` when it hands its connections over (a
/// head started stays buffered, for the next program).
async fn next_request(
    conn: &mut Client,
    proxy: &RoleProxy,
    stop: &mut watch::Receiver<Stop>,
) -> Option<ParsedRequest> {
    let idle_deadline = tokio::time::Instant::now() + proxy.config().idle_timeout;
    let mut head_deadline = None;
    loop {
        if !conn.buf.is_empty() {
            match parse_request(&conn.buf, &conn.client_ip, &mut conn.upstream_head) {
                ParsedRequest::Partial => {}
                parsed => return Some(parsed),
            }
            head_deadline.get_or_insert_with(|| {
                tokio::time::Instant::now() + proxy.config().request_head_timeout
            });
        }
        // Checked before reading: a client that keeps sending cannot hold the handover up
        // (what it sends waits in the socket for the next program).
        if *stop.borrow() == Stop::HandOver {
            return Some(ParsedRequest::HandOver);
        }
        let deadline = head_deadline.map_or(idle_deadline, |d| d.min(idle_deadline));
        conn.buf.reserve(READ_RESERVE);
        tokio::select! {
            biased;
            read = tokio::time::timeout_at(deadline, conn.stream.read_buf(&mut conn.buf)) => {
                match read {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(_) => return None,
                    Err(_) => {
                        if head_deadline.is_some() {
                            let message = format!(
                                "request head not received within {:?}",
                                proxy.config().request_head_timeout
                            );
                            let status = StatusCode::REQUEST_TIMEOUT;
                            respond_error(conn, proxy, status, &message, true, Instant::now()).await;
                        }
                        return None;
                    }
                }
            }
            asked = stop_asked(stop) => {
                return (asked == Stop::HandOver).then_some(ParsedRequest::HandOver);
            }
        }
    }
}

/// Forwards one request and relays its response.
async fn exchange(conn: &mut Client, proxy: &RoleProxy, head: RequestHead) -> After {
    let started = Instant::now();
    proxy.stats.requests.fetch_add(1, Ordering::Relaxed);
    conn.buf.advance(head.len);
    let limit = proxy.config().max_body;
    if head.body > limit {
        let message = forward::too_large_message(proxy, limit);
        return respond_error(
            conn,
            proxy,
            StatusCode::PAYLOAD_TOO_LARGE,
            &message,
            true,
            started,
        )
        .await;
    }
    // The body bytes already read go out with the head, in the same write.
    let buffered = head.body.min(conn.buf.len() as u64) as usize;
    conn.upstream_head.extend_from_slice(&conn.buf[..buffered]);
    conn.buf.advance(buffered);
    proxy.metrics.add_received(buffered as u64);
    let mut unread = head.body - buffered as u64;
    // A request whose every byte is in hand can be sent again, when its method allows.
    let replayable = unread == 0 && head.idempotent;
    let mut attempts = forward::Attempts::default();
    let (status, message) = loop {
        let Some(claim) = attempts.next(proxy) else {
            break attempts.exhausted(proxy);
        };
        let backend = claim.backend().clone();
        backend.metrics.add_received(buffered as u64);
        let attempt = tokio::time::timeout(
            proxy.config().request_timeout,
            send(
                conn,
                proxy,
                &backend,
                &mut unread,
                head.head_method,
                head.close,
            ),
        )
        .await;
        let (error, refused) = match attempt {
            Ok(Ok((upstream, response))) => {
                return relay(conn, proxy, claim, upstream, response, started, head.close).await;
            }
            Ok(Err(Failure::Client)) => return After::Close,
            Ok(Err(Failure::NotSent { error, refused })) => (error, refused),
            Ok(Err(Failure::Sent(error))) if replayable => (error, false),
            Ok(Err(Failure::Sent(error))) => break forward::failed(&backend, &error),
            Err(_) => break forward::timed_out(proxy, &backend),
        };
        attempts.failed(proxy, backend, error, refused);
    };
    // A body the client is still sending cannot be skipped: the connection ends.
    let close = head.close || unread > 0;
    respond_error(conn, proxy, status, &message, close, started).await
}

/// One attempt on one backend: a pooled connection or a new one, the request, and the
/// response head.
async fn send(
    conn: &mut Client,
    proxy: &RoleProxy,
    backend: &Backend,
    unread: &mut u64,
    head_method: bool,
    client_close: bool,
) -> Result<(Upstream, ResponseHead), Failure> {
    let mut upstream = match backend.raw.checkout() {
        Some(upstream) => upstream,
        None => match pool::connect_tcp(backend.addr, proxy.config().connect_timeout).await {
            Ok(stream) => Upstream {
                stream,
                buf: BytesMut::with_capacity(READ_RESERVE),
            },
            Err(error) => {
                return Err(Failure::NotSent {
                    error: format!("connect to {}: {error}", backend.addr),
                    refused: true,
                });
            }
        },
    };
    if let Err(error) = upstream.stream.write_all(&conn.upstream_head).await {
        return Err(Failure::Sent(error.to_string()));
    }
    forward_body(conn, &mut upstream, backend, proxy, unread).await?;
    let downstream = &mut conn.downstream;
    let parse = |buf: &[u8]| parse_response(buf, head_method, client_close, downstream);
    match read_response_head(&mut upstream, parse).await {
        Ok(response) => Ok((upstream, response)),
        Err(HeadError::Unanswered(error) | HeadError::Failed(error)) => Err(Failure::Sent(error)),
    }
}

/// Why no final response head came from a backend.
pub(crate) enum HeadError {
    /// The backend sent nothing (a pooled connection it had closed, typically).
    Unanswered(String),
    Failed(String),
}

/// Reads from `upstream` until `parse` finds a final response head (1xx ones are skipped);
/// the head's bytes are consumed from the buffer.
pub(crate) async fn read_response_head(
    upstream: &mut Upstream,
    mut parse: impl FnMut(&[u8]) -> Result<ParsedResponse, &'static str>,
) -> Result<ResponseHead, HeadError> {
    let mut answered = !upstream.buf.is_empty();
    loop {
        match parse(&upstream.buf) {
            Ok(ParsedResponse::Final(response)) => {
                upstream.buf.advance(response.len);
                return Ok(response);
            }
            Ok(ParsedResponse::Interim(len)) => {
                upstream.buf.advance(len);
                continue;
            }
            Ok(ParsedResponse::Partial) => {}
            Err(error) => return Err(HeadError::Failed(error.to_string())),
        }
        upstream.buf.reserve(READ_RESERVE);
        let error = match upstream.stream.read_buf(&mut upstream.buf).await {
            Ok(0) => "closed the connection before answering".to_string(),
            Ok(_) => {
                answered = true;
                continue;
            }
            Err(error) => error.to_string(),
        };
        return Err(if answered {
            HeadError::Failed(error)
        } else {
            HeadError::Unanswered(error)
        });
    }
}

/// Streams the part of a request body the client has not sent yet.
async fn forward_body(
    conn: &mut Client,
    upstream: &mut Upstream,
    backend: &Backend,
    proxy: &RoleProxy,
    unread: &mut u64,
) -> Result<(), Failure> {
    while *unread > 0 {
        if conn.buf.is_empty() {
            conn.buf.reserve(READ_RESERVE);
            match conn.stream.read_buf(&mut conn.buf).await {
                Ok(n) if n > 0 => {}
                _ => return Err(Failure::Client),
            }
        }
        let take = (*unread).min(conn.buf.len() as u64) as usize;
        if let Err(error) = upstream.stream.write_all(&conn.buf[..take]).await {
            return Err(Failure::Sent(error.to_string()));
        }
        conn.buf.advance(take);
        *unread -= take as u64;
        proxy.metrics.add_received(take as u64);
        backend.metrics.add_received(take as u64);
    }
    Ok(())
}

/// Sends the response head (already in `Client::downstream`) and its body to the client.
/// The claim is held until the body is through, so a drain waits for it.
async fn relay(
    conn: &mut Client,
    proxy: &RoleProxy,
    claim: InFlight,
    mut upstream: Upstream,
    response: ResponseHead,
    started: Instant,
    client_close: bool,
) -> After {
    let backend = claim.backend();
    let elapsed = started.elapsed();
    proxy.metrics.record_response(response.status, elapsed);
    backend.metrics.record_response(response.status, elapsed);
    let mut framing = response.framing;
    let mut sent = 0u64;
    let complete = loop {
        let Ok(take) = body_bytes(&mut framing, &upstream.buf) else {
            break false;
        };
        conn.downstream.extend_from_slice(&upstream.buf[..take]);
        upstream.buf.advance(take);
        sent += take as u64;
        if let Framing::Length(left) = framing
            && left >= bulk::MIN_BODY
        {
            // The head and the body bytes read with it go out with the first read of the rest.
            let complete = copy_body(conn, &mut upstream, left, &mut sent).await;
            framing = Framing::Length(0);
            break complete;
        }
        if !conn.downstream.is_empty() {
            if conn.stream.write_all(&conn.downstream).await.is_err() {
                break false;
            }
            conn.downstream.clear();
        }
        if body_done(framing) {
            break true;
        }
        upstream.buf.reserve(READ_RESERVE);
        match upstream.stream.read_buf(&mut upstream.buf).await {
            Ok(0) => break framing == Framing::UntilClose,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    conn.downstream.clear();
    proxy.metrics.add_sent(sent);
    backend.metrics.add_sent(sent);
    let reusable = complete && response.reusable && upstream.buf.is_empty();
    if reusable {
        backend.raw.checkin(upstream);
    }
    drop(claim);
    if complete && !client_close && framing != Framing::UntilClose {
        After::KeepAlive
    } else {
        After::Close
    }
}

/// Sends what waits in `conn.downstream` (the head, perhaps some body) and the rest of a body
/// of known length (`left` bytes, none of them read yet) from the backend to the client
/// through a pooled buffer ([`bulk::relay`]). Returns whether all of it got through.
async fn copy_body(conn: &mut Client, upstream: &mut Upstream, left: u64, sent: &mut u64) -> bool {
    let prefix = &conn.downstream[..];
    let relayed = bulk::relay(
        &mut upstream.stream,
        &mut conn.stream,
        prefix,
        left,
        |moved| *sent += moved as u64,
    )
    .await;
    if let Err(broken) = &relayed {
        tracing::debug!(error = %broken, cause = ?std::error::Error::source(broken), "body broken off");
    }
    relayed.is_ok()
}

/// How many bytes at the start of `buf` belong to the body, advancing `framing`.
fn body_bytes(framing: &mut Framing, buf: &[u8]) -> Result<usize, crate::chunked::Malformed> {
    Ok(match framing {
        Framing::Length(left) => {
            let take = (*left).min(buf.len() as u64);
            *left -= take;
            take as usize
        }
        Framing::Chunked(scanner) => scanner.scan(buf)?,
        Framing::UntilClose => buf.len(),
    })
}

fn body_done(framing: Framing) -> bool {
    match framing {
        Framing::Length(left) => left == 0,
        Framing::Chunked(scanner) => scanner.is_done(),
        Framing::UntilClose => false,
    }
}

/// Answers with the proxy's own short message.
async fn respond_error(
    conn: &mut Client,
    proxy: &RoleProxy,
    status: StatusCode,
    message: &str,
    close: bool,
    started: Instant,
) -> After {
    let text = forward::error_text(proxy, status, message);
    proxy
        .metrics
        .record_response(status.as_u16(), started.elapsed());
    let out = &mut conn.downstream;
    out.clear();
    out.extend_from_slice(format!("HTTP/1.1 {status}\r\n").as_bytes());
    out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\n");
    out.extend_from_slice(format!("content-length: {}\r\n", text.len()).as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&text);
    let written = conn.stream.write_all(out).await;
    out.clear();
    if close || written.is_err() {
        After::Close
    } else {
        After::KeepAlive
    }
}

/// What the `Connection` header fields of a head say.
#[derive(Default)]
struct ConnectionTokens<'a> {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    /// Other header names listed: hop-by-hop for this message.
    listed: Vec<&'a str>,
}

impl<'a> ConnectionTokens<'a> {
    fn of(headers: &[httparse::Header<'a>]) -> Self {
        let mut tokens = ConnectionTokens::default();
        for header in headers {
            if !header.name.eq_ignore_ascii_case("connection") {
                continue;
            }
            let value = std::str::from_utf8(header.value).unwrap_or_default();
            for token in policy::list_elements(value) {
                if token.eq_ignore_ascii_case("close") {
                    tokens.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    tokens.keep_alive = true;
                } else if token.eq_ignore_ascii_case("upgrade") {
                    tokens.upgrade = true;
                } else {
                    tokens.listed.push(token);
                }
            }
        }
        tokens
    }

    /// True when `name` must not be forwarded.
    fn is_hop_by_hop(&self, name: &str) -> bool {
        policy::is_dropped(name, &self.listed)
    }
}

/// A `Content-Length` value: digits only.
fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Parses a request head at the start of `buf` and, when the fast path can take it, writes
/// the head for the backend into `out`: origin-form, hop-by-hop fields removed, the client's
/// address appended to `X-Forwarded-For`, `X-Forwarded-Proto` when absent, and `Via`.
fn parse_request(buf: &[u8], client_ip: &str, out: &mut BytesMut) -> ParsedRequest {
    let mut fields = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return ParsedRequest::Partial,
        // Too long, too many fields or malformed: hyper answers it properly.
        _ => return ParsedRequest::Fallback,
    };
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version)
    else {
        return ParsedRequest::Fallback;
    };
    if !target.starts_with('/') {
        return ParsedRequest::Fallback;
    }
    let tokens = ConnectionTokens::of(request.headers);
    if tokens.upgrade {
        return ParsedRequest::Fallback;
    }
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let (mut host, mut proto, mut body) = (false, false, None);
    let mut forwarded_for: Option<&[u8]> = None;
    for field in request.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case("transfer-encoding") || name.eq_ignore_ascii_case("expect") {
            return ParsedRequest::Fallback;
        } else if name.eq_ignore_ascii_case("content-length") {
            match (body, content_length(field.value)) {
                (None, Some(length)) => body = Some(length),
                _ => return ParsedRequest::Fallback,
            }
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            if forwarded_for.replace(field.value).is_some() {
                return ParsedRequest::Fallback;
            }
            continue;
        } else if tokens.is_hop_by_hop(name) {
            continue;
        } else if name.eq_ignore_ascii_case("host") {
            if host {
                // Two Host fields: the general path refuses them (policy::host_problem).
                return ParsedRequest::Fallback;
            }
            host = true;
        } else if name.eq_ignore_ascii_case("x-forwarded-proto") {
            proto = true;
        }
        push_field(out, name.as_bytes(), field.value);
    }
    if !host {
        return ParsedRequest::Fallback;
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    policy::forwarded_for(forwarded_for, client_ip, |piece| {
        out.extend_from_slice(piece)
    });
    out.extend_from_slice(b"\r\n");
    if !proto {
        push_field(
            out,
            b"x-forwarded-proto",
            policy::FORWARDED_PROTO.as_bytes(),
        );
    }
    push_field(out, b"via", policy::VIA.as_bytes());
    out.extend_from_slice(b"\r\n");
    ParsedRequest::Forward(RequestHead {
        len,
        body: body.unwrap_or(0),
        head_method: method == "HEAD",
        idempotent: policy::is_idempotent(method),
        close: tokens.close,
    })
}

/// Where a parsed response head goes, field by field: rewritten into bytes for an HTTP/1.1
/// client here, or into a header map for hyper's path ([`crate::raw`]).
pub(crate) trait HeadSink {
    fn status(&mut self, status: u16, reason: &str);
    fn field(&mut self, name: &str, value: &[u8]);
}

/// The head for an HTTP/1.1 client, in bytes: status line, fields, `Via`, and `Connection:
/// close` when the connection ends after it.
struct ClientHead<'a>(&'a mut BytesMut);

impl HeadSink for ClientHead<'_> {
    fn status(&mut self, status: u16, reason: &str) {
        let out = &mut *self.0;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(&status_digits(status));
        out.extend_from_slice(b" ");
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    fn field(&mut self, name: &str, value: &[u8]) {
        push_field(self.0, name.as_bytes(), value);
    }
}

/// Parses a response head at the start of `buf` and writes the head for the client into
/// `out`: hop-by-hop fields removed (a chunked `Transfer-Encoding` stays, the body passes
/// through as it is), `Via` added, and `Connection: close` when the connection ends after it.
fn parse_response(
    buf: &[u8],
    head_method: bool,
    client_close: bool,
    out: &mut BytesMut,
) -> Result<ParsedResponse, &'static str> {
    let parsed = parse_response_into(buf, head_method, true, &mut ClientHead(out))?;
    if let ParsedResponse::Final(head) = &parsed {
        push_field(out, b"via", policy::VIA.as_bytes());
        if client_close || head.framing == Framing::UntilClose {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
    Ok(parsed)
}

/// Parses a response head at the start of `buf` and gives `sink` its status and the fields to
/// forward: hop-by-hop ones removed; a chunked `Transfer-Encoding` only when `pass_chunked`
/// (the body then passes through as it is), and never a `Content-Length` beside it.
pub(crate) fn parse_response_into(
    buf: &[u8],
    head_method: bool,
    pass_chunked: bool,
    sink: &mut impl HeadSink,
) -> Result<ParsedResponse, &'static str> {
    let mut fields = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {
            return Ok(ParsedResponse::Partial);
        }
        Ok(httparse::Status::Partial) => return Err("sent a response head over 64 KiB"),
        Err(_) => return Err("sent a malformed response head"),
    };
    let status = response.code.unwrap_or(0);
    if status == 101 {
        return Err("switched protocols unasked");
    }
    if (100..200).contains(&status) {
        return Ok(ParsedResponse::Interim(len));
    }
    let tokens = ConnectionTokens::of(response.headers);
    let mut chunked = None;
    let mut length = None;
    for field in response.headers.iter() {
        if field.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked must be the last coding; otherwise the body runs to the close.
            let value = std::str::from_utf8(field.value).unwrap_or_default();
            let last = value.rsplit(',').next().unwrap_or_default().trim();
            chunked = Some(last.eq_ignore_ascii_case("chunked"));
        } else if field.name.eq_ignore_ascii_case("content-length") {
            let value = content_length(field.value).ok_or("sent an invalid Content-Length")?;
            if length.is_some_and(|l| l != value) {
                return Err("sent conflicting Content-Length fields");
            }
            length = Some(value);
        }
    }
    let no_body = head_method || status == 204 || status == 304;
    let framing = match (no_body, chunked, length) {
        (true, _, _) => Framing::Length(0),
        (false, Some(true), _) => Framing::Chunked(Chunked::default()),
        (false, Some(false), _) | (false, None, None) => Framing::UntilClose,
        (false, None, Some(length)) => Framing::Length(length),
    };
    let keep_alive = if response.version == Some(1) {
        !tokens.close
    } else {
        tokens.keep_alive
    };
    let reusable = keep_alive && framing != Framing::UntilClose;
    sink.status(status, response.reason.unwrap_or_default());
    for field in response.headers.iter() {
        // With a Transfer-Encoding, Content-Length is meaningless (RFC 9112, 6.3).
        let stale_length = chunked.is_some() && field.name.eq_ignore_ascii_case("content-length");
        let framing = pass_chunked
            && chunked.is_some()
            && field.name.eq_ignore_ascii_case("transfer-encoding");
        if stale_length || (tokens.is_hop_by_hop(field.name) && !framing) {
            continue;
        }
        sink.field(field.name, field.value);
    }
    Ok(ParsedResponse::Final(ResponseHead {
        len,
        status,
        framing,
        reusable,
    }))
}

/// The three digits of a status code (httparse accepts exactly three).
fn status_digits(status: u16) -> [u8; 3] {
    let digit = |n: u16| b'0' + (n % 10) as u8;
    [digit(status / 100), digit(status / 10), digit(status)]
}

pub(crate) fn push_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A client connection handed to hyper, with the bytes the fast path already read from it.
pub(crate) struct Rewind {
    prefix: Bytes,
    inner: ClientStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let take = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix.split_to(take));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Any bytes as a request head: the fast path forwards it only as a complete head the
/// backend parses back, with one `X-Forwarded-For`, one `Via` and no `Transfer-Encoding`.
/// Panics otherwise (for the fuzz target and the seeded test).
pub(crate) fn check_request(bytes: &[u8]) {
    let mut out = BytesMut::new();
    let ParsedRequest::Forward(head) = parse_request(bytes, "127.0.0.1", &mut out) else {
        return;
    };
    assert!(head.len <= bytes.len());
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS + 3];
    let mut parsed = httparse::Request::new(&mut fields);
    assert!(matches!(parsed.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len()));
    let count = |name: &str| {
        parsed
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
    };
    assert_eq!((count("x-forwarded-for"), count("via")), (1, 1));
    assert_eq!((count("transfer-encoding"), count("host")), (0, 1));
}

/// Any bytes as a response head: a final one is rewritten into a complete head the client
/// parses back. Panics otherwise.
pub(crate) fn check_response(bytes: &[u8]) {
    for (head_method, client_close) in [(false, false), (true, true)] {
        let mut out = BytesMut::new();
        if let Ok(ParsedResponse::Final(head)) =
            parse_response(bytes, head_method, client_close, &mut out)
        {
            assert!(head.len <= bytes.len());
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS + 3];
            let mut parsed = httparse::Response::new(&mut fields);
            assert!(
                matches!(parsed.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len())
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: &[u8] = b"POST /a?b=c HTTP/1.1\r\nHost: example\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nX-Forwarded-For: 10.0.0.1\r\nContent-Length: 4\r\n\r\nbody";
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: X-Hop\r\nX-Hop: 1\r\nServer: s\r\n\r\nabc";

    fn forwarded(buf: &[u8]) -> Option<(RequestHead, BytesMut)> {
        let mut out = BytesMut::new();
        match parse_request(buf, "127.0.0.1", &mut out) {
            ParsedRequest::Forward(head) => Some((head, out)),
            _ => None,
        }
    }

    #[test]
    fn a_request_head_is_rewritten_for_the_backend() {
        let (head, out) = forwarded(REQUEST).unwrap();
        assert_eq!(
            (head.len, head.body, head.idempotent),
            (REQUEST.len() - 4, 4, false)
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "POST /a?b=c HTTP/1.1\r\nHost: example\r\nContent-Length: 4\r\n\
             x-forwarded-for: 10.0.0.1, 127.0.0.1\r\nx-forwarded-proto: http\r\nvia: 1.1 phoenix\r\n\r\n"
        );
    }

    #[test]
    fn a_response_head_is_rewritten_for_the_client() {
        let mut out = BytesMut::new();
        let Ok(ParsedResponse::Final(head)) = parse_response(RESPONSE, false, true, &mut out)
        else {
            panic!("a final response");
        };
        assert_eq!(
            (head.status, head.framing, head.reusable),
            (200, Framing::Length(3), true)
        );
        assert_eq!(head.len, RESPONSE.len() - 3);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nServer: s\r\nvia: 1.1 phoenix\r\nconnection: close\r\n\r\n"
        );
    }

    /// Seeded fuzz: mutated heads never panic; whatever the fast path forwards is a valid
    /// head with exactly one `X-Forwarded-For` and `Via`, and no `Transfer-Encoding`.
    #[test]
    fn fuzz_mutated_heads() {
        let mut next = crate::tests::xorshift(0x2545_f491_4f6c_dd1du64);
        let alphabet = b"\r\n :,;-0aZ\t\x00\xff";
        for _ in 0..20_000 {
            let mut request = REQUEST.to_vec();
            let mut response = RESPONSE.to_vec();
            for bytes in [&mut request, &mut response] {
                for _ in 0..=next() % 4 {
                    let at = (next() as usize) % bytes.len();
                    match next() % 3 {
                        0 => bytes[at] = alphabet[(next() as usize) % alphabet.len()],
                        1 => {
                            bytes.remove(at);
                        }
                        _ => bytes.insert(at, alphabet[(next() as usize) % alphabet.len()]),
                    }
                }
            }
            check_request(&request);
            check_response(&response);
        }
    }
}
