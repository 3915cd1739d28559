//! Edge listeners (`[listener.NAME]`): one address in front of several roles, routed by host
//! name and path, with TLS termination ([`crate::certs`]), HSTS, and a plain-HTTP listener
//! that redirects to HTTPS. The request then goes through the chosen role's proxy as if it
//! had come to that role's own address (its backends, retries, limits and metrics).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::body::ResponseBody;
use crate::client_stream::FirstWord;
use crate::forward::{self, Forwarding};
use crate::{RoleProxy, Stop, stop_asked};

/// Which host names a route takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// Every host (a route without `host`).
    Any,
    /// One name, lower case.
    Exact(String),
    /// `*.example.test`: every name ending in `.example.test` (not `example.test` itself).
    Wildcard(String),
}

impl HostMatch {
    /// `api.example.test`, `*.example.test`, or `None` for any.
    pub fn parse(host: Option<&str>) -> Result<HostMatch, String> {
        let Some(host) = host else {
            return Ok(HostMatch::Any);
        };
        let host = host.to_ascii_lowercase();
        let (wild, name) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, host.clone()),
        };
        let valid = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(format!(
                "{host:?} is not a host name: write one like \"api.example.test\" or \"*.example.test\""
            ));
        }
        Ok(if wild {
            HostMatch::Wildcard(format!(".{name}"))
        } else {
            HostMatch::Exact(name)
        })
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(name) => host == name,
            HostMatch::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        }
    }

    /// How specific: an exact name beats a wildcard, which beats any host.
    fn rank(&self) -> usize {
        match self {
            HostMatch::Any => 0,
            HostMatch::Wildcard(suffix) => 1 + suffix.len(),
            HostMatch::Exact(_) => usize::MAX,
        }
    }
}

/// One route: requests for `host` whose path starts with `path_prefix` go to `role`.
#[derive(Debug, Clone)]
pub struct Route {
    pub host: HostMatch,
    pub path_prefix: String,
    pub role: String,
    pub target: Arc<RoleProxy>,
}

/// A listener's routes, most specific first: the exact host, then the longest wildcard, then
/// any host; within those, the longest path prefix.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub fn new(mut routes: Vec<Route>) -> Router {
        routes.sort_by_key(|r| std::cmp::Reverse((r.host.rank(), r.path_prefix.len())));
        Router { routes }
    }

    /// The route for a request to `host` (lower case, without port) and `path`.
    pub fn find(&self, host: &str, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.host.matches(host) && path_has_prefix(path, &r.path_prefix))
    }
}

/// `/assets` takes `/assets` and `/assets/x`, not `/assetsx`.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

/// One edge listener: its routes (replaced whole by `phoenix apply`) and what it adds.
#[derive(Debug)]
pub struct Edge {
    pub name: String,
    router: RwLock<Arc<Router>>,
    /// Connections arrive over TLS: `X-Forwarded-Proto: https`.
    tls: bool,
    /// `Strict-Transport-Security: max-age=…` on every response.
    hsts: Option<HeaderValue>,
}

impl Edge {
    pub fn new(name: &str, router: Router, tls: bool, hsts: Option<Duration>) -> Arc<Edge> {
        let hsts = hsts.map(|age| {
            HeaderValue::from_str(&format!("max-age={}", age.as_secs()))
                .expect("digits are a valid header value")
        });
        Arc::new(Edge {
            name: name.to_string(),
            router: RwLock::new(Arc::new(router)),
            tls,
            hsts,
        })
    }

    pub fn set_router(&self, router: Router) {
        *self.router.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(router);
    }

    pub fn router(&self) -> Arc<Router> {
        self.router
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Sets the backlog and the socket options of an edge listener (see
/// [`crate::client_stream::tune_listener`]). They only make it faster and steadier under a
/// burst of connections: a listener that refuses them still serves.
fn tune_or_warn(listener: &TcpListener, name: &str) {
    if let Err(error) = crate::client_stream::tune_listener(listener, FirstWord::Client) {
        tracing::warn!(
            listener = %name,
            %error,
            "cannot set the listener's backlog, TCP_NODELAY or TCP_DEFER_ACCEPT; serving without"
        );
    }
}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `edge` on `listener` (over TLS with `tls`) until `stop` asks otherwise; open
/// connections then finish their current request, for at most `grace`.
pub async fn serve_edge(
    listener: TcpListener,
    edge: Arc<Edge>,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<Stop>,
    grace: Duration,
) {
    tune_or_warn(&listener, &edge.name);
    let _heartbeat = crate::timer_heartbeat();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, client) = tokio::select! {
            _ = stop_asked(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(listener = %edge.name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (edge, tls, stop) = (edge.clone(), tls.clone(), stop.clone());
        connections.spawn(async move {
            match tls {
                None => serve_connection(stream, client, edge, stop).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => serve_connection(stream, client, edge, stop).await,
                        Ok(Err(error)) => {
                            tracing::debug!(listener = %edge.name, %client, %error, "TLS handshake failed")
                        }
                        Err(_) => {
                            tracing::debug!(listener = %edge.name, %client, "TLS handshake timed out")
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// One client connection: HTTP/1.1 or HTTP/2 (by ALPN over TLS, by its first bytes in clear).
async fn serve_connection<I>(
    io: I,
    client: SocketAddr,
    edge: Arc<Edge>,
    mut stop: watch::Receiver<Stop>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = EdgeService::new(edge, client);
    let (executor, streams) = crate::streams::per_connection();
    let mut builder = auto::Builder::new(executor);
    builder
        .http1()
        .half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder.http2().timer(TokioTimer::new());
    crate::serve_with(&builder, streams, io, service, &mut stop).await;
}

/// Routes each request to its role's proxy.
#[derive(Clone)]
struct EdgeService {
    edge: Arc<Edge>,
    client_ip: HeaderValue,
}

impl EdgeService {
    fn new(edge: Arc<Edge>, client: SocketAddr) -> EdgeService {
        let client_ip = HeaderValue::from_str(&client.ip().to_string())
            .expect("an IP address is a valid header value");
        EdgeService { edge, client_ip }
    }
}

impl tower::Service<Request<Incoming>> for EdgeService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Forwarding;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    /// Routes before the future is made (see [`forward::forward`]): the future holds only
    /// the request on its way.
    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let edge = &self.edge;
        let host = request_host(&request);
        let router = edge.router();
        let Some(route) = router.find(&host, request.uri().path()) else {
            let text = format!(
                "no route for host {host:?} and path {:?} on listener {}\n",
                request.uri().path(),
                edge.name
            );
            let response = with_hsts(edge, plain(StatusCode::NOT_FOUND, text));
            return Box::pin(std::future::ready(Ok(response)));
        };
        if edge.tls {
            // Whatever the client claimed: it came over TLS, to this listener.
            request.headers_mut().insert(
                http::HeaderName::from_static("x-forwarded-proto"),
                HeaderValue::from_static("https"),
            );
        }
        let forwarding = forward::forward(route.target.clone(), self.client_ip.clone(), request);
        if edge.hsts.is_none() {
            return forwarding;
        }
        let edge = edge.clone();
        Box::pin(async move { Ok(with_hsts(&edge, forwarding.await?)) })
    }
}

fn with_hsts(edge: &Edge, mut response: Response<ResponseBody>) -> Response<ResponseBody> {
    if let Some(hsts) = &edge.hsts {
        response
            .headers_mut()
            .insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
    }
    response
}

fn plain(status: StatusCode, text: String) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::message(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The host a request is for, lower case, without port: HTTP/2's `:authority`, else `Host`.
fn request_host<B>(request: &Request<B>) -> String {
    let raw = request
        .uri()
        .host()
        .map(str::to_string)
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| strip_port(h).to_string())
        })
        .unwrap_or_default();
    raw.trim_end_matches('.').to_ascii_lowercase()
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split(']')
            .next()
            .map_or(host, |h| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// Answers every request on `listener` with a permanent redirect (308) to the same host and
/// path over HTTPS at `https_port`, until `stop` asks otherwise.
pub async fn serve_redirect(
    listener: TcpListener,
    https_port: u16,
    mut stop: watch::Receiver<Stop>,
) {
    tune_or_warn(&listener, "HTTP to HTTPS redirect");
    loop {
        let (stream, _) = tokio::select! {
            _ = stop_asked(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<Incoming>| async move {
                    Ok::<_, Infallible>(redirect(&request, https_port))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn redirect<B>(request: &Request<B>, https_port: u16) -> Response<ResponseBody> {
    let host = request_host(request);
    if host.is_empty() {
        return plain(
            StatusCode::BAD_REQUEST,
            "a request needs a Host header\n".into(),
        );
    }
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{path}");
    let mut response = plain(StatusCode::PERMANENT_REDIRECT, format!("{location}\n"));
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, prefix: &str, role: &str) -> Route {
        Route {
            host: HostMatch::parse(host).unwrap(),
            path_prefix: prefix.into(),
            role: role.into(),
            target: crate::RoleProxy::new(role, crate::ProxyConfig::default()),
        }
    }

    fn role_for(router: &Router, host: &str, path: &str) -> Option<String> {
        router.find(host, path).map(|r| r.role.clone())
    }

    /// TCP_DEFER_ACCEPT on the socket behind `listener`, in seconds.
    fn defer_accept_seconds(listener: &std::os::fd::OwnedFd) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut seconds: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a descriptor owned by the caller, and a c_int with its size to fill.
        let got = unsafe {
            libc::getsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&mut seconds as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(got, 0, "getsockopt: {}", std::io::Error::last_os_error());
        seconds
    }

    /// Starts `serve` on a fresh loopback listener and returns the option its socket has once
    /// `serve` has run (read through a second descriptor of the same socket).
    async fn deferral_once_served<F>(serve: impl FnOnce(TcpListener) -> F) -> libc::c_int
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        use std::os::fd::AsFd;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let same_socket = listener.as_fd().try_clone_to_owned().unwrap();
        assert_eq!(
            defer_accept_seconds(&same_socket),
            0,
            "not deferred at bind"
        );
        let task = tokio::spawn(serve(listener));
        tokio::task::yield_now().await;
        let seconds = defer_accept_seconds(&same_socket);
        task.abort();
        seconds
    }

    #[tokio::test]
    async fn both_edge_listeners_defer_accepting_until_the_client_speaks() {
        let (_stop, stopped) = watch::channel(Stop::Serve);
        let edge = Edge::new("public", Router::new(vec![]), false, None);
        let on_edge = stopped.clone();
        let routed = deferral_once_served(move |listener| {
            serve_edge(listener, edge, None, on_edge, Duration::from_secs(1))
        })
        .await;
        assert_eq!(routed, 1, "the routing listener");
        let redirecting =
            deferral_once_served(move |listener| serve_redirect(listener, 8443, stopped)).await;
        assert_eq!(redirecting, 1, "the HTTP to HTTPS redirect listener");
    }

    #[test]
    fn the_most_specific_route_wins_whatever_the_order() {
        let router = Router::new(vec![
            route(None, "/", "fallback"),
            route(Some("*.example.test"), "/assets", "static"),
            route(Some("*.example.test"), "/", "wild"),
            route(Some("api.example.test"), "/", "api"),
        ]);
        let at = |host, path| role_for(&router, host, path);
        assert_eq!(at("api.example.test", "/assets/x").as_deref(), Some("api"));
        assert_eq!(
            at("www.example.test", "/assets/x.css").as_deref(),
            Some("static")
        );
        assert_eq!(at("www.example.test", "/assets").as_deref(), Some("static"));
        assert_eq!(at("www.example.test", "/assetsx").as_deref(), Some("wild"));
        assert_eq!(at("example.test", "/").as_deref(), Some("fallback"));
        assert_eq!(at("other.test", "/").as_deref(), Some("fallback"));
        let strict = Router::new(vec![route(Some("api.example.test"), "/v1", "api")]);
        assert_eq!(role_for(&strict, "api.example.test", "/v2"), None);
        assert_eq!(role_for(&strict, "evil.test", "/v1"), None);
    }

    #[test]
    fn host_names_are_checked_and_hosts_read_without_port() {
        assert!(HostMatch::parse(Some("bad host")).is_err());
        assert!(HostMatch::parse(Some("*.")).is_err());
        assert!(HostMatch::parse(Some("a..b")).is_err());
        assert_eq!(
            HostMatch::parse(Some("API.Example.test")).unwrap(),
            HostMatch::Exact("api.example.test".into())
        );
        assert_eq!(strip_port("api.example.test:8443"), "api.example.test");
        assert_eq!(strip_port("[::1]:8443"), "[::1]");
        let request = Request::builder()
            .uri("/x")
            .header("host", "WWW.Example.test.:8443")
            .body(())
            .unwrap();
        assert_eq!(request_host(&request), "www.example.test");
        let moved = redirect(&request, 8443);
        assert_eq!(moved.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(
            moved.headers()[header::LOCATION],
            "https://www.example.test:8443/x"
        );
    }
}
