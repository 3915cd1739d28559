//! Forwarding one request: pick a backend, reuse or open a connection, retry elsewhere when
//! the request could not be delivered, and stream the response back.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::body::{
    BodyTooLarge, ClientBodyError, Meter, ResponseBody, UpstreamBody, UpstreamResponse,
};
use crate::pool::{self, Sender};
use crate::tunnel;
use crate::{Backend, InFlight, RoleProxy, policy};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const VIA: HeaderValue = HeaderValue::from_static(policy::VIA);
/// The proxy as a `tower::Service`, one per client connection.
#[derive(Debug, Clone)]
pub struct ProxyService {
    proxy: Arc<RoleProxy>,
    /// The client's address, rendered once per connection for `X-Forwarded-For`.
    client_ip: HeaderValue,
}

impl ProxyService {
    pub fn new(proxy: Arc<RoleProxy>, client: SocketAddr) -> Self {
        let client_ip = HeaderValue::from_str(&client.ip().to_string())
            .expect("an IP address is a valid header value");
        ProxyService { proxy, client_ip }
    }
}

impl tower::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Forwarding;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        forward(self.proxy.clone(), self.client_ip.clone(), request)
    }
}

/// Why one attempt on one backend failed.
enum Failure {
    /// The request never left: it can go to another backend whatever its method.
    NotSent {
        request: Box<Request<UpstreamBody>>,
        error: String,
        refused: bool,
    },
    /// The request may have reached the backend.
    Sent(hyper::Error),
}

/// A request on its way to a backend: its response, counted in the role's metrics when it comes.
pub(crate) type Forwarding =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

/// Forwards `request`. What can be done before the first backend attempt — the policy
/// checks, the header rewrite, the raw request head — is done here, before the future is
/// made, so the future holds only what crosses an await. (An async fn holding the request
/// kept it up to three times over in a 2.3 KiB future, copied into its box and from state to
/// state: 2 % of the proxy's time on HTTP/2.)
pub(crate) fn forward(
    proxy: Arc<RoleProxy>,
    client_ip: HeaderValue,
    request: Request<Incoming>,
) -> Forwarding {
    let started = Instant::now();
    match prepare(&proxy, client_ip, request) {
        Prepared::Answer(response) => {
            let response = metered(&proxy, response, started);
            Box::pin(std::future::ready(Ok(response)))
        }
        Prepared::Raw { head, head_method } => Box::pin(async move {
            let response = crate::raw::forward(&proxy, &head, head_method, started).await;
            Ok(metered(&proxy, response, started))
        }),
        Prepared::Hyper {
            parts,
            body,
            upgrade,
        } => Box::pin(async move {
            let response = forward_with_hyper(&proxy, parts, body, upgrade, started).await;
            Ok(metered(&proxy, response, started))
        }),
    }
}

fn metered(
    proxy: &RoleProxy,
    response: Response<ResponseBody>,
    started: Instant,
) -> Response<ResponseBody> {
    proxy
        .metrics
        .record_response(response.status().as_u16(), started.elapsed());
    response
}

/// A request made ready for the backends.
enum Prepared {
    /// Refused before any backend saw it.
    Answer(Response<ResponseBody>),
    /// Without a body, an idempotent request can be sent again even after a backend failed
    /// mid-way: those go over raw connections (see `raw`) as this HTTP/1.1 head.
    Raw { head: BytesMut, head_method: bool },
    /// The rest (a body, an upgrade) go through hyper's client.
    Hyper {
        parts: http::request::Parts,
        body: Incoming,
        upgrade: Option<hyper::upgrade::OnUpgrade>,
    },
}

fn prepare(proxy: &RoleProxy, client_ip: HeaderValue, mut request: Request<Incoming>) -> Prepared {
    proxy.stats.requests.fetch_add(1, Ordering::Relaxed);
    // An upgrade (WebSocket): the protocol asked for, and the client side of the future tunnel.
    let upgrade = upgrade_protocol(request.headers())
        .map(|protocol| (protocol, hyper::upgrade::on(&mut request)));
    let (mut parts, body) = request.into_parts();
    let hosts = parts.headers.get_all(header::HOST).iter().count();
    if let Some(problem) = policy::host_problem(parts.version == http::Version::HTTP_11, hosts) {
        return Prepared::Answer(error_response(proxy, StatusCode::BAD_REQUEST, problem));
    }
    let limit = proxy.config().max_body;
    if body.size_hint().lower() > limit {
        return Prepared::Answer(too_large(proxy, limit));
    }
    if upgrade.is_none() && is_idempotent(&parts.method) && body.is_end_stream() {
        return Prepared::Raw {
            head: crate::raw::request_head(&parts, &client_ip),
            head_method: parts.method == Method::HEAD,
        };
    }
    // Backends speak HTTP/1.1, whatever the client spoke.
    let mut headers = HeaderMap::with_capacity(parts.headers.len() + 4);
    upstream_fields(&parts, &client_ip, &mut headers);
    parts.headers = headers;
    parts.version = http::Version::HTTP_11;
    to_origin_form(&mut parts.uri);
    if let Some((protocol, _)) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
    }
    Prepared::Hyper {
        parts,
        body,
        upgrade: upgrade.map(|(_, client_side)| client_side),
    }
}

/// Forwards a request with a body, or an upgrade, through hyper's client.
async fn forward_with_hyper(
    proxy: &RoleProxy,
    parts: http::request::Parts,
    body: Incoming,
    mut upgrade: Option<hyper::upgrade::OnUpgrade>,
    started: Instant,
) -> Response<ResponseBody> {
    let limit = proxy.config().max_body;
    let body = UpstreamBody {
        body,
        seen: 0,
        limit,
        meter: Meter {
            role: proxy.metrics.clone(),
            backend: None,
        },
    };
    let mut request = Some(Request::from_parts(parts, body));
    let mut attempts = Attempts::default();
    while let Some(claim) = attempts.next(proxy) {
        // A request goes again only when it never left (`Failure::NotSent` gives it back).
        let Some(mut outgoing) = request.take() else {
            break;
        };
        outgoing.body_mut().meter_for(claim.backend());
        let attempt = tokio::time::timeout(
            proxy.config().request_timeout,
            send(claim.backend(), proxy, outgoing),
        )
        .await;
        let failure = match attempt {
            Ok(Ok((mut response, _sender)))
                if response.status() == StatusCode::SWITCHING_PROTOCOLS =>
            {
                let Some(client_side) = upgrade.take() else {
                    return error_response(
                        proxy,
                        StatusCode::BAD_GATEWAY,
                        "backend switched protocols unasked",
                    );
                };
                let backend_side = hyper::upgrade::on(&mut response);
                claim
                    .backend()
                    .metrics
                    .record_response(101, started.elapsed());
                let role = proxy.metrics.clone();
                tokio::spawn(async move {
                    match tokio::try_join!(client_side, backend_side) {
                        Ok((client, backend)) => {
                            tunnel::splice(TokioIo::new(client), TokioIo::new(backend), claim, role)
                                .await
                        }
                        Err(error) => tracing::debug!(%error, "upgrade failed"),
                    }
                });
                let (mut parts, _) = response.into_parts();
                parts.headers.append(header::VIA, VIA);
                return Response::from_parts(parts, ResponseBody::empty());
            }
            Ok(Ok((response, sender))) => {
                claim
                    .backend()
                    .metrics
                    .record_response(response.status().as_u16(), started.elapsed());
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.headers.append(header::VIA, VIA);
                let body = ResponseBody::upstream(UpstreamResponse::new(
                    body,
                    sender,
                    claim,
                    proxy.metrics.clone(),
                ));
                return Response::from_parts(parts, body);
            }
            Ok(Err(failure)) => failure,
            Err(_) => {
                let (status, message) = timed_out(proxy, claim.backend());
                return error_response(proxy, status, &message);
            }
        };
        let backend = claim.backend();
        let (error, refused) = match failure {
            Failure::NotSent {
                request: unsent,
                error,
                refused,
            } => {
                request = Some(*unsent);
                (error, refused)
            }
            Failure::Sent(error) if caused_by::<BodyTooLarge>(&error) => {
                return too_large(proxy, limit);
            }
            Failure::Sent(error) if caused_by::<ClientBodyError>(&error) => {
                let message = match std::error::Error::source(&error) {
                    Some(cause) => cause.to_string(),
                    None => error.to_string(),
                };
                return error_response(proxy, StatusCode::BAD_REQUEST, &message);
            }
            Failure::Sent(error) => {
                let (status, message) = failed(backend, &error);
                return error_response(proxy, status, &message);
            }
        };
        attempts.failed(proxy, backend.clone(), error, refused);
    }
    let (status, message) = attempts.exhausted(proxy);
    error_response(proxy, status, &message)
}

/// The backends one request has tried and why the last one failed: the book every path's
/// retry loop keeps (the fast path, raw connections, hyper's client).
#[derive(Default)]
pub(crate) struct Attempts {
    /// Empty (no allocation) on the usual path.
    tried: Vec<Arc<Backend>>,
    last_error: Option<String>,
}

impl Attempts {
    /// The next backend to try, claimed; `None` when none is left.
    pub(crate) fn next(&self, proxy: &RoleProxy) -> Option<InFlight> {
        proxy.pick(&self.tried)
    }

    /// `backend` failed the request in a way that lets it go elsewhere; one that `refused`
    /// the connection is marked down until a health check passes.
    pub(crate) fn failed(
        &mut self,
        proxy: &RoleProxy,
        backend: Arc<Backend>,
        error: String,
        refused: bool,
    ) {
        if refused {
            backend.down.store(true, Ordering::Release);
        }
        tracing::debug!(role = %proxy.role, backend = %backend.id, %error, "request failed, trying another backend");
        proxy.stats.retries.fetch_add(1, Ordering::Relaxed);
        self.tried.push(backend);
        self.last_error = Some(error);
    }

    /// The answer once no backend is left to try.
    pub(crate) fn exhausted(&mut self, proxy: &RoleProxy) -> (StatusCode, String) {
        exhausted(proxy, self.last_error.take())
    }
}

/// The answer when `backend` did not answer within the request timeout.
pub(crate) fn timed_out(proxy: &RoleProxy, backend: &Backend) -> (StatusCode, String) {
    let message = format!(
        "backend {} did not answer within {:?}",
        backend.id,
        proxy.config().request_timeout
    );
    (StatusCode::GATEWAY_TIMEOUT, message)
}

/// The answer when a request that cannot be sent again failed on `backend`.
pub(crate) fn failed(backend: &Backend, error: &dyn std::fmt::Display) -> (StatusCode, String) {
    let message = format!("backend {} failed: {error}", backend.id);
    (StatusCode::BAD_GATEWAY, message)
}

/// The answer when no backend is left to try; `last_error` is why the last one failed.
pub(crate) fn exhausted(proxy: &RoleProxy, last_error: Option<String>) -> (StatusCode, String) {
    match last_error {
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no healthy instance of role {}", proxy.role),
        ),
        Some(error) => (
            StatusCode::BAD_GATEWAY,
            format!("no instance of role {} could answer: {error}", proxy.role),
        ),
    }
}

/// One attempt on one backend: pooled connections first, then a new one.
async fn send(
    backend: &Backend,
    proxy: &RoleProxy,
    mut request: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, Sender), Failure> {
    while let Some(mut sender) = backend.pool.checkout() {
        if sender.ready().await.is_err() {
            continue;
        }
        match sender.try_send_request(request).await {
            Ok(response) => return Ok((response, sender)),
            Err(mut error) => match error.take_message() {
                // A stale keep-alive connection: nothing was written, use another one.
                Some(unsent) => request = unsent,
                None => return Err(Failure::Sent(error.into_error())),
            },
        }
    }
    let mut sender = match pool::connect(backend.addr, proxy.config().connect_timeout).await {
        Ok(sender) => sender,
        Err(error) => {
            let error = format!("connect to {}: {error}", backend.addr);
            return Err(Failure::NotSent {
                request: Box::new(request),
                error,
                refused: true,
            });
        }
    };
    match sender.try_send_request(request).await {
        Ok(response) => Ok((response, sender)),
        Err(mut error) => match error.take_message() {
            Some(request) => Err(Failure::NotSent {
                request: Box::new(request),
                error: error.into_error().to_string(),
                refused: false,
            }),
            None => Err(Failure::Sent(error.into_error())),
        },
    }
}

/// The `Upgrade` protocol when the request asks for one (`Connection: upgrade`).
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection = headers.get(header::CONNECTION)?.to_str().ok()?;
    let asks = policy::list_elements(connection).any(|token| token.eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

fn is_idempotent(method: &Method) -> bool {
    policy::is_idempotent(method.as_str())
}

/// `http://host/path?q` as `/path?q`: backends are sent origin-form targets.
fn to_origin_form(uri: &mut Uri) {
    if uri.scheme().is_some() || uri.authority().is_some() {
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        *uri = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
    }
}

/// Where the fields of a request go as the backend gets them: HTTP/1.1 bytes for a raw
/// backend connection ([`crate::raw::request_head`]), or a header map for hyper's client.
pub(crate) trait FieldSink {
    /// A field the client sent, passed on as it is.
    fn pass(&mut self, name: &HeaderName, value: &HeaderValue);
    /// A field the proxy writes, its value in `pieces`.
    fn add(&mut self, name: &HeaderName, pieces: &[&[u8]]);
}

impl FieldSink for HeaderMap {
    fn pass(&mut self, name: &HeaderName, value: &HeaderValue) {
        self.append(name.clone(), value.clone());
    }

    fn add(&mut self, name: &HeaderName, pieces: &[&[u8]]) {
        // Every piece is a valid value or a separator, so the whole is one too.
        if let Ok(value) = HeaderValue::from_bytes(&pieces.concat()) {
            self.append(name.clone(), value);
        }
    }
}

impl FieldSink for BytesMut {
    fn pass(&mut self, name: &HeaderName, value: &HeaderValue) {
        crate::h1::push_field(self, name.as_str().as_bytes(), value.as_bytes());
    }

    fn add(&mut self, name: &HeaderName, pieces: &[&[u8]]) {
        self.extend_from_slice(name.as_str().as_bytes());
        self.extend_from_slice(b": ");
        for piece in pieces {
            self.extend_from_slice(piece);
        }
        self.extend_from_slice(b"\r\n");
    }
}

/// Gives `sink` the fields of `request` as the backend gets them, read without changing the
/// request: hop-by-hop fields and those `Connection` names dropped; `Host` from the authority
/// when HTTP/2 gave none; cookies in one field, as HTTP/1.1 wants them (RFC 9113, 8.2.3); the
/// client's address appended to `X-Forwarded-For`; `X-Forwarded-Proto` when absent; `Via`.
pub(crate) fn upstream_fields(
    request: &http::request::Parts,
    client_ip: &HeaderValue,
    sink: &mut impl FieldSink,
) {
    let headers = &request.headers;
    if !headers.contains_key(header::HOST)
        && let Some(authority) = request.uri.authority()
    {
        sink.add(&header::HOST, &[authority.as_str().as_bytes()]);
    }
    let mut cookies = headers.get_all(header::COOKIE).iter();
    match (cookies.next(), cookies.next()) {
        (Some(only), None) => sink.pass(&header::COOKIE, only),
        (Some(first), Some(second)) => {
            let mut pieces = vec![first.as_bytes(), b"; ", second.as_bytes()];
            for more in cookies {
                pieces.extend([b"; ".as_slice(), more.as_bytes()]);
            }
            sink.add(&header::COOKIE, &pieces);
        }
        (None, _) => {}
    }
    // Names a `Connection` field lists: hop-by-hop for this message. Split once, not per field.
    let listed: Vec<&str> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| policy::list_elements(value.to_str().unwrap_or_default()))
        .collect();
    let mut forwarded_proto = false;
    // The first `X-Forwarded-For`, which the client's address is appended to.
    let mut earlier = None;
    for (name, value) in headers {
        if name == X_FORWARDED_FOR {
            earlier.get_or_insert(value.as_bytes());
            continue;
        }
        if name == header::COOKIE || policy::is_dropped(name.as_str(), &listed) {
            continue;
        }
        forwarded_proto |= name == X_FORWARDED_PROTO;
        sink.pass(name, value);
    }
    let client_ip = client_ip.to_str().unwrap_or_default();
    let (mut forwarded, mut len) = ([&[][..]; 3], 0);
    policy::forwarded_for(earlier, client_ip, |piece| {
        forwarded[len] = piece;
        len += 1;
    });
    sink.add(&X_FORWARDED_FOR, &forwarded[..len]);
    if !forwarded_proto {
        sink.add(&X_FORWARDED_PROTO, &[policy::FORWARDED_PROTO.as_bytes()]);
    }
    sink.add(&header::VIA, &[policy::VIA.as_bytes()]);
}

/// [`policy::HOP_BY_HOP`] as header names, parsed once: removing by `&str` would parse every
/// name again on every request.
fn hop_by_hop_names() -> &'static [HeaderName] {
    static NAMES: std::sync::LazyLock<Vec<HeaderName>> = std::sync::LazyLock::new(|| {
        policy::HOP_BY_HOP
            .iter()
            .map(|name| HeaderName::from_static(name))
            .collect()
    });
    &NAMES
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(connection) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = policy::list_elements(connection.to_str().unwrap_or_default())
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in hop_by_hop_names() {
        headers.remove(name);
    }
}

/// True when `error` or one of its sources is an `E`.
fn caused_by<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<E>() {
            return true;
        }
        current = error.source();
    }
    false
}

fn too_large(proxy: &RoleProxy, limit: u64) -> Response<ResponseBody> {
    let message = too_large_message(proxy, limit);
    error_response(proxy, StatusCode::PAYLOAD_TOO_LARGE, &message)
}

pub(crate) fn too_large_message(proxy: &RoleProxy, limit: u64) -> String {
    format!(
        "request body larger than the {limit} bytes allowed (max_body of role {})",
        proxy.role
    )
}

/// The body of one of the proxy's own answers; counts and logs it.
pub(crate) fn error_text(proxy: &RoleProxy, status: StatusCode, message: &str) -> Bytes {
    proxy.stats.proxy_errors.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(role = %proxy.role, status = status.as_u16(), "{message}");
    Bytes::from(format!("{} {message}\n", status.as_u16()))
}

pub(crate) fn error_response(
    proxy: &RoleProxy,
    status: StatusCode,
    message: &str,
) -> Response<ResponseBody> {
    let body = ResponseBody::message(error_text(proxy, status, message));
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
