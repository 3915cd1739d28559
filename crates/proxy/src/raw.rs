//! Body-less, idempotent requests of hyper's path — HTTP/2 streams above all — sent over the
//! fast path's raw backend connections.
//!
//! hyper's HTTP/1.1 client drives each backend connection in a task of its own, fed through a
//! channel: every request wakes that task and then the stream's task again. Here the
//! stream's own task writes the request head and reads the response with httparse, as the
//! fast path ([`crate::h1`]) does, and the body is read from the connection as the client
//! takes it. Such a request can always be sent again, so any attempt that fails before the
//! response head moves on to another backend; requests with a body stay on hyper's client.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;

use crate::body::ResponseBody;
use crate::h1::{self, Framing, HeadError, HeadSink, READ_RESERVE, ResponseHead};
use crate::metrics::TrafficMetrics;
use crate::pool::{self, Upstream};
use crate::{Backend, InFlight, RoleProxy, forward, policy};

/// Forwards a request without a body that may be sent again (see [`policy::is_idempotent`]):
/// `head` from [`request_head`], `head_method` for a HEAD request.
pub(crate) async fn forward(
    proxy: &RoleProxy,
    head: &[u8],
    head_method: bool,
    started: Instant,
) -> Response<ResponseBody> {
    let mut attempts = forward::Attempts::default();
    let (status, message) = loop {
        let Some(claim) = attempts.next(proxy) else {
            break attempts.exhausted(proxy);
        };
        let backend = claim.backend().clone();
        let attempt = tokio::time::timeout(
            proxy.config().request_timeout,
            send(&backend, proxy, head, head_method),
        )
        .await;
        match attempt {
            Ok(Ok(answer)) => return respond(proxy, claim, answer, started),
            Ok(Err(Failure { error, refused })) => {
                attempts.failed(proxy, backend, error, refused);
            }
            Err(_) => break forward::timed_out(proxy, &backend),
        }
    };
    forward::error_response(proxy, status, &message)
}

/// The request head in HTTP/1.1 bytes, its fields as [`forward::upstream_fields`] gives them.
pub(crate) fn request_head(request: &http::request::Parts, client_ip: &HeaderValue) -> BytesMut {
    let mut out = BytesMut::with_capacity(512);
    out.extend_from_slice(request.method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    let target = request.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    forward::upstream_fields(request, client_ip, &mut out);
    out.extend_from_slice(b"\r\n");
    out
}

/// Why an attempt on one backend failed.
struct Failure {
    error: String,
    /// The connection was refused: the backend is marked down.
    refused: bool,
}

/// A response head from a backend, and the connection its body comes on.
struct Answer {
    upstream: Upstream,
    head: ResponseHead,
    fields: Fields,
}

/// One attempt: a pooled connection, or a new one when there is none or the pooled one turns
/// out closed before it answered anything.
async fn send(
    backend: &Backend,
    proxy: &RoleProxy,
    head: &[u8],
    head_method: bool,
) -> Result<Answer, Failure> {
    let failed = |error: String| Failure {
        error,
        refused: false,
    };
    if let Some(upstream) = backend.raw.checkout() {
        match exchange(upstream, head, head_method).await {
            Ok(answer) => return Ok(answer),
            Err(HeadError::Unanswered(_)) => {}
            Err(HeadError::Failed(error)) => return Err(failed(error)),
        }
    }
    let stream = pool::connect_tcp(backend.addr, proxy.config().connect_timeout)
        .await
        .map_err(|error| Failure {
            error: format!("connect to {}: {error}", backend.addr),
            refused: true,
        })?;
    let upstream = Upstream {
        stream,
        buf: BytesMut::with_capacity(READ_RESERVE),
    };
    exchange(upstream, head, head_method)
        .await
        .map_err(|e| match e {
            HeadError::Unanswered(error) | HeadError::Failed(error) => failed(error),
        })
}

/// Writes the request head on `upstream` and reads the final response head (1xx skipped).
async fn exchange(
    mut upstream: Upstream,
    head: &[u8],
    head_method: bool,
) -> Result<Answer, HeadError> {
    if let Err(error) = upstream.stream.write_all(head).await {
        return Err(HeadError::Unanswered(error.to_string()));
    }
    // The sink hears only a final head, so one set of fields serves every parse attempt.
    let mut fields = Fields::default();
    let parse = |buf: &[u8]| h1::parse_response_into(buf, head_method, false, &mut fields);
    let head = h1::read_response_head(&mut upstream, parse).await?;
    Ok(Answer {
        upstream,
        head,
        fields,
    })
}

/// The response's status and the fields forwarded to the client.
#[derive(Default)]
struct Fields {
    status: StatusCode,
    headers: HeaderMap,
}

impl HeadSink for Fields {
    fn status(&mut self, status: u16, _reason: &str) {
        self.status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    }

    fn field(&mut self, name: &str, value: &[u8]) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            self.headers.append(name, value);
        }
    }
}

fn respond(
    proxy: &RoleProxy,
    claim: InFlight,
    answer: Answer,
    started: Instant,
) -> Response<ResponseBody> {
    let Answer {
        upstream,
        head,
        mut fields,
    } = answer;
    claim
        .backend()
        .metrics
        .record_response(head.status, started.elapsed());
    fields
        .headers
        .append(header::VIA, HeaderValue::from_static(policy::VIA));
    let body = RawBody {
        upstream: Some(upstream),
        framing: head.framing,
        reusable: head.reusable,
        claim,
        role: proxy.metrics.clone(),
    };
    let mut response = Response::new(ResponseBody::raw(body));
    *response.status_mut() = fields.status;
    *response.headers_mut() = fields.headers;
    response
}

/// A response body read from a raw backend connection as the client takes it. Until it is
/// done (or dropped) it keeps the backend's in-flight count raised; a connection whose
/// response was read to its end goes back to the pool.
#[derive(Debug)]
pub(crate) struct RawBody {
    /// `None` once the connection closed or failed.
    upstream: Option<Upstream>,
    framing: Framing,
    reusable: bool,
    claim: InFlight,
    role: Arc<TrafficMetrics>,
}

impl RawBody {
    fn complete(&self) -> bool {
        match self.framing {
            Framing::Length(left) => left == 0,
            Framing::Chunked(decoder) => decoder.is_done(),
            Framing::UntilClose => self.upstream.is_none(),
        }
    }

    /// The next run of body bytes already read, if any.
    fn buffered(&mut self) -> Result<Option<Bytes>, std::io::Error> {
        let Some(upstream) = self.upstream.as_mut() else {
            return Ok(None);
        };
        let buf = &mut upstream.buf;
        if buf.is_empty() {
            return Ok(None);
        }
        let data = match &mut self.framing {
            Framing::Length(left) => {
                let take = (*left).min(buf.len() as u64);
                *left -= take;
                buf.split_to(take as usize).freeze()
            }
            Framing::Chunked(decoder) => {
                let (used, data) = decoder
                    .decode(buf)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                buf.split_to(used).freeze().slice(data)
            }
            Framing::UntilClose => buf.split().freeze(),
        };
        Ok(Some(data))
    }
}

impl Body for RawBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        loop {
            if this.complete() {
                return Poll::Ready(None);
            }
            match this.buffered() {
                Ok(Some(data)) if data.is_empty() => continue,
                Ok(Some(data)) => {
                    let bytes = data.len() as u64;
                    this.role.add_sent(bytes);
                    this.claim.backend().metrics.add_sent(bytes);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) => {}
                Err(error) => {
                    this.upstream = None;
                    return Poll::Ready(Some(Err(error)));
                }
            }
            let Some(upstream) = this.upstream.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(poll_read_more(upstream, cx)) {
                Ok(0) => {
                    this.upstream = None;
                    if this.framing != Framing::UntilClose {
                        let closed = "the backend closed the connection before the body ended";
                        return Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            closed,
                        ))));
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    this.upstream = None;
                    return Poll::Ready(Some(Err(error)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.complete()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}

/// Reads what the backend has sent into `upstream`'s buffer.
fn poll_read_more(upstream: &mut Upstream, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
    upstream.buf.reserve(READ_RESERVE);
    loop {
        match upstream.stream.try_read_buf(&mut upstream.buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                ready!(upstream.stream.poll_read_ready(cx))?;
            }
            read => return Poll::Ready(read),
        }
    }
}

impl Drop for RawBody {
    fn drop(&mut self) {
        if self.reusable
            && self.complete()
            && let Some(upstream) = self.upstream.take()
            && upstream.buf.is_empty()
        {
            self.claim.backend().raw.checkin(upstream);
        }
    }
}
