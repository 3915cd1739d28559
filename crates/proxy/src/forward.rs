//! Forwarding one request: pick a backend, reuse or open a connection, retry elsewhere when
//! the request could not be delivered, and stream the response back.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

use crate::body::UpstreamResponse;
use crate::pool::{self, Sender, UpstreamBody};
use crate::{Backend, RoleProxy};

/// The body type returned to clients.
pub type ResponseBody = BoxBody<Bytes, hyper::Error>;

/// The proxy as a `tower::Service`, one per client connection.
#[derive(Debug, Clone)]
pub struct ProxyService {
    proxy: Arc<RoleProxy>,
    client: SocketAddr,
}

impl ProxyService {
    pub fn new(proxy: Arc<RoleProxy>, client: SocketAddr) -> Self {
        ProxyService { proxy, client }
    }
}

impl tower::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let proxy = self.proxy.clone();
        let client = self.client;
        Box::pin(async move { Ok(forward(&proxy, client, request).await) })
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
    Sent(String),
}

async fn forward(
    proxy: &RoleProxy,
    client: SocketAddr,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    proxy.stats.requests.fetch_add(1, Ordering::Relaxed);
    let (mut parts, body) = request.into_parts();
    // Without a body, an idempotent request can be sent again even after a backend failed mid-way.
    let replayable = is_idempotent(&parts.method) && body.is_end_stream();
    prepare_upstream(&mut parts.headers, &mut parts.uri, client);
    let template = (
        parts.method.clone(),
        parts.uri.clone(),
        parts.version,
        parts.headers.clone(),
    );
    let mut request = Some(Request::from_parts(parts, body.boxed()));
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    let mut last_error = None;
    while let Some(claim) = proxy.pick(&tried) {
        tried.push(claim.backend().clone());
        if tried.len() > 1 {
            proxy.stats.retries.fetch_add(1, Ordering::Relaxed);
        }
        let outgoing = match request.take() {
            Some(request) => request,
            None => rebuild(&template),
        };
        let attempt = tokio::time::timeout(
            proxy.config.request_timeout,
            send(claim.backend(), proxy, outgoing),
        )
        .await;
        match attempt {
            Err(_) => {
                let message = format!(
                    "backend {} did not answer within {:?}",
                    claim.backend().id,
                    proxy.config.request_timeout
                );
                return error_response(proxy, StatusCode::GATEWAY_TIMEOUT, &message);
            }
            Ok(Ok((response, sender))) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                return Response::from_parts(
                    parts,
                    UpstreamResponse::new(body, sender, claim).boxed(),
                );
            }
            Ok(Err(Failure::NotSent {
                request: unsent,
                error,
                refused,
            })) => {
                if refused {
                    claim.backend().down.store(true, Ordering::Release);
                }
                tracing::debug!(role = %proxy.role, backend = %claim.backend().id, %error, "request not delivered, trying another backend");
                last_error = Some(error);
                request = Some(*unsent);
            }
            Ok(Err(Failure::Sent(error))) if replayable => {
                tracing::debug!(role = %proxy.role, backend = %claim.backend().id, %error, "idempotent request failed, trying another backend");
                last_error = Some(error);
            }
            Ok(Err(Failure::Sent(error))) => {
                return error_response(
                    proxy,
                    StatusCode::BAD_GATEWAY,
                    &format!("backend {} failed: {error}", claim.backend().id),
                );
            }
        }
    }
    match last_error {
        None => error_response(
            proxy,
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("no healthy instance of role {}", proxy.role),
        ),
        Some(error) => error_response(
            proxy,
            StatusCode::BAD_GATEWAY,
            &format!("no instance of role {} could answer: {error}", proxy.role),
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
                None => return Err(Failure::Sent(error.into_error().to_string())),
            },
        }
    }
    let mut sender = match pool::connect(backend.addr, proxy.config.connect_timeout).await {
        Ok(sender) => sender,
        Err(error) => {
            return Err(Failure::NotSent {
                request: Box::new(request),
                error: format!("connect to {}: {error}", backend.addr),
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
            None => Err(Failure::Sent(error.into_error().to_string())),
        },
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn rebuild(template: &(Method, Uri, http::Version, HeaderMap)) -> Request<UpstreamBody> {
    let (method, uri, version, headers) = template;
    let mut request = Request::new(
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    *request.version_mut() = *version;
    *request.headers_mut() = headers.clone();
    request
}

/// Rewrites the request for the backend: origin-form URI, no hop-by-hop headers, and the
/// client's address appended to `X-Forwarded-For`.
fn prepare_upstream(headers: &mut HeaderMap, uri: &mut Uri, client: SocketAddr) {
    if uri.scheme().is_some() || uri.authority().is_some() {
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        *uri = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
    }
    strip_hop_by_hop(headers);
    let forwarded = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {}", client.ip()),
        None => client.ip().to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), value);
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

fn error_response(proxy: &RoleProxy, status: StatusCode, message: &str) -> Response<ResponseBody> {
    proxy.stats.proxy_errors.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(role = %proxy.role, status = status.as_u16(), "{message}");
    let body = Full::new(Bytes::from(format!("{} {message}\n", status.as_u16())));
    let mut response = Response::new(body.map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
