use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

mod fast_path;
mod h2_streams;

/// A seeded xorshift64 generator for the decoders' fuzz tests.
pub(crate) fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// A real HTTP backend on loopback answering `NAME PATH`; `/slow/MS` waits first, `/echo`
/// answers the request body and `/headers` the forwarding headers it received.
async fn backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<Incoming>| async move {
                        if req.uri().path() == "/echo" {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            return Ok::<_, Infallible>(Response::new(Full::new(body)));
                        }
                        if let Some(ms) = req.uri().path().strip_prefix("/slow/") {
                            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
                        }
                        let text = if req.uri().path() == "/all" {
                            // Every header as received, one `name: value` a line, sorted.
                            let mut lines: Vec<String> = req
                                .headers()
                                .iter()
                                .map(|(n, v)| {
                                    format!("{n}: {}", String::from_utf8_lossy(v.as_bytes()))
                                })
                                .collect();
                            lines.sort();
                            lines.join("\n")
                        } else if req.uri().path() == "/headers" {
                            let get = |n: &str| {
                                let value = req.headers().get(n).map(|v| v.to_str().unwrap());
                                value.unwrap_or_default().to_string()
                            };
                            let (xff, proto) = (get("x-forwarded-for"), get("x-forwarded-proto"));
                            format!("xff={xff} proto={proto} via={}", get("via"))
                        } else {
                            format!("{name} {}", req.uri().path())
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A loopback address where nothing listens.
async fn refusing() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn frontend(proxy: Arc<RoleProxy>) -> (SocketAddr, watch::Sender<Stop>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(Stop::Serve);
    tokio::spawn(serve(
        listener,
        proxy,
        stopped,
        Duration::from_secs(1),
        Vec::new(),
    ));
    (addr, stop)
}

/// A frontend for role `web` with `config`, in front of one backend named `name`.
async fn serving(
    config: ProxyConfig,
    name: &'static str,
    addr: SocketAddr,
) -> (Arc<RoleProxy>, SocketAddr, watch::Sender<Stop>) {
    let proxy = RoleProxy::new("web", config);
    proxy.set_backends(vec![Backend::new(name, addr)]);
    let (frontend_addr, stop) = frontend(proxy.clone()).await;
    (proxy, frontend_addr, stop)
}

/// One request on a fresh connection: (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let status = raw[9..12].parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let (_proxy, addr, _stop) = serving(ProxyConfig::default(), "b1", backend("b1").await).await;
    for request in [
        &b"GET /x HTTP/1.0\r\n\r\n"[..],
        &b"GET /y HTTP/1.1\r\nHost: t\r\n\r\n"[..],
    ] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut raw = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut raw))
            .await
            .unwrap()
            .unwrap();
        let path = if request.starts_with(b"GET /x") {
            "/x"
        } else {
            "/y"
        };
        assert!(raw.ends_with(&format!("b1 {path}")), "{raw:?}");
    }
}

#[tokio::test]
async fn round_robin_over_the_backends() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    let names = ["a", "b", "c"];
    let mut backends = Vec::new();
    for name in names {
        backends.push(Backend::new(name, backend(name).await));
    }
    proxy.set_backends(backends);
    let (addr, _stop) = frontend(proxy.clone()).await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        let (status, body) = get(addr, "/x").await;
        assert_eq!(status, 200);
        seen.push(body);
    }
    seen.sort();
    assert_eq!(seen, ["a /x", "a /x", "b /x", "b /x", "c /x", "c /x"]);
}

#[tokio::test]
async fn a_canary_gets_its_share_spread_over_its_backends_and_nothing_after_it_ends() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    proxy.set_backends(vec![
        Backend::new("live1", backend("live1").await),
        Backend::new("live2", backend("live2").await),
    ]);
    let canary = vec![
        Backend::new("canary1", backend("canary1").await),
        Backend::new("canary2", backend("canary2").await),
    ];
    proxy.set_canary(canary.clone(), 2_500);
    let (addr, _stop) = frontend(proxy.clone()).await;
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..200 {
        let (status, body) = get(addr, "/x").await;
        assert_eq!(status, 200);
        *seen.entry(body).or_insert(0) += 1;
    }
    let expected: std::collections::BTreeMap<String, i32> = [
        ("canary1 /x", 25),
        ("canary2 /x", 25),
        ("live1 /x", 75),
        ("live2 /x", 75),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(seen, expected);
    assert_eq!(canary[0].metrics.total_responses(), 25);

    proxy.set_canary(Vec::new(), 0);
    for _ in 0..10 {
        assert!(get(addr, "/x").await.1.starts_with("live"));
    }
}

#[test]
fn canary_turns_are_exactly_the_share_and_evenly_spread() {
    for share in [1, 500, 2_500, 5_000, 9_999, 10_000] {
        let turns: Vec<u64> = (0..10_000).filter(|&t| canary_turn(t, share)).collect();
        assert_eq!(turns.len() as u32, share, "share {share}");
        let widest = turns.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        assert!(
            widest <= 10_000 / u64::from(share) + 1,
            "share {share}: a gap of {widest} turns"
        );
    }
    assert!((0..10_000).all(|t| !canary_turn(t, 0)));
}

#[tokio::test]
async fn a_refused_connection_is_retried_on_another_backend_and_marked_down() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    let dead = Backend::new("dead", refusing().await);
    proxy.set_backends(vec![
        dead.clone(),
        Backend::new("live", backend("live").await),
    ]);
    let (addr, _stop) = frontend(proxy.clone()).await;
    for _ in 0..10 {
        assert_eq!(get(addr, "/").await, (200, "live /".to_string()));
    }
    assert!(dead.is_down());
    assert_eq!(proxy.stats.proxy_errors.load(Ordering::Relaxed), 0);
    assert!(proxy.stats.retries.load(Ordering::Relaxed) >= 1);
}

#[tokio::test]
async fn no_backend_gives_503_and_all_refusing_gives_502() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    let (addr, _stop) = frontend(proxy.clone()).await;
    let (status, body) = get(addr, "/").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "503 no healthy instance of role web\n")
    );
    proxy.set_backends(vec![Backend::new("dead", refusing().await)]);
    let (status, body) = get(addr, "/").await;
    assert_eq!(status, 502);
    assert!(body.contains("could answer"), "{body}");
}

/// Starts `GET /slow/MS` through the proxy and waits until `old` counts it in flight.
async fn slow_request_in_flight(
    addr: SocketAddr,
    old: &Backend,
    ms: u64,
) -> tokio::task::JoinHandle<(u16, String)> {
    let slow = tokio::spawn(async move { get(addr, &format!("/slow/{ms}")).await });
    while old.in_flight() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    slow
}

#[tokio::test]
async fn switch_is_immediate_and_drain_waits_for_in_flight_requests() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    let old = Backend::new("old", backend("old").await);
    proxy.set_backends(vec![old.clone()]);
    let (addr, _stop) = frontend(proxy.clone()).await;
    let slow = slow_request_in_flight(addr, &old, 300).await;
    proxy.set_backends(vec![Backend::new("new", backend("new").await)]);
    assert_eq!(
        get(addr, "/").await.1,
        "new /",
        "new requests go to the new generation at once"
    );
    let report = drain(std::slice::from_ref(&old), Duration::from_secs(5)).await;
    assert_eq!(report.abandoned, 0);
    assert!(
        report.waited >= Duration::from_millis(100),
        "drain returned before the slow request finished: {report:?}"
    );
    assert_eq!(slow.await.unwrap(), (200, "old /slow/300".to_string()));
    assert_eq!(old.in_flight(), 0);
}

#[tokio::test]
async fn drain_gives_up_at_the_deadline() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    let old = Backend::new("old", backend("old").await);
    proxy.set_backends(vec![old.clone()]);
    let (addr, _stop) = frontend(proxy.clone()).await;
    let _slow = slow_request_in_flight(addr, &old, 5000).await;
    proxy.set_backends(vec![]);
    let report = drain(std::slice::from_ref(&old), Duration::from_millis(100)).await;
    assert_eq!(report.abandoned, 1);
}

#[tokio::test]
async fn keep_alive_connections_are_reused() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    let only = Backend::new("a", backend("a").await);
    proxy.set_backends(vec![only.clone()]);
    let (addr, _stop) = frontend(proxy.clone()).await;
    for _ in 0..5 {
        assert_eq!(get(addr, "/").await.0, 200);
    }
    assert_eq!(
        only.raw.idle.lock().unwrap().len(),
        1,
        "sequential requests share one backend connection"
    );
}

#[tokio::test]
async fn request_timeout_gives_504() {
    let config = ProxyConfig {
        request_timeout: Duration::from_millis(100),
        ..ProxyConfig::default()
    };
    let (_, addr, _stop) = serving(config, "slow", backend("slow").await).await;
    assert_eq!(get(addr, "/slow/2000").await.0, 504);
}

/// A backend that reads a request head and closes the connection without answering,
/// as an instance killed mid-request would.
async fn dropping() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0; 4096];
                let _ = stream.read(&mut buf).await;
            });
        }
    });
    addr
}

/// Sends raw bytes on a fresh connection and returns the whole answer.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn forwarded_headers_and_via_are_set() {
    let (_, addr, _stop) = serving(ProxyConfig::default(), "a", backend("a").await).await;
    let request = b"GET /headers HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 10.9.8.7\r\nConnection: close\r\n\r\n";
    let answer = raw(addr, request).await;
    assert!(
        answer.contains("xff=10.9.8.7, 127.0.0.1 proto=http via=1.1 phoenix"),
        "{answer}"
    );
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nvia: 1.1 phoenix\r\n"),
        "the response carries Via: {answer}"
    );
}

#[tokio::test]
async fn oversize_bodies_get_413_declared_or_streamed() {
    let config = ProxyConfig {
        max_body: 10,
        ..ProxyConfig::default()
    };
    let (_, addr, _stop) = serving(config, "a", backend("a").await).await;
    let declared =
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nConnection: close\r\n\r\n01234567890";
    let declared = raw(addr, declared).await;
    assert!(declared.starts_with("HTTP/1.1 413"), "{declared}");
    assert!(
        declared.contains("larger than the 10 bytes allowed (max_body of role web)"),
        "{declared}"
    );
    let chunked = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n6\r\n012345\r\n6\r\n678901\r\n0\r\n\r\n";
    let streamed = raw(addr, chunked).await;
    assert!(streamed.starts_with("HTTP/1.1 413"), "{streamed}");
    let fits =
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\nConnection: close\r\n\r\n0123456789";
    let fits = raw(addr, fits).await;
    assert!(fits.starts_with("HTTP/1.1 200"), "{fits}");
}

#[tokio::test]
async fn idle_client_connections_are_closed_after_the_idle_timeout() {
    let config = ProxyConfig {
        idle_timeout: Duration::from_millis(200),
        ..ProxyConfig::default()
    };
    let (_, addr, _stop) = serving(config, "a", backend("a").await).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Now idle: the proxy closes the keep-alive connection (EOF).
    assert_closed(&mut stream).await;
}

#[tokio::test]
async fn only_idempotent_requests_are_retried_after_a_backend_fails_mid_request() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    let (addr, _stop) = frontend(proxy.clone()).await;
    for _ in 0..4 {
        // The dropping backend comes first in turn, then the good one.
        let dropper = Backend::new("dropper", dropping().await);
        proxy.set_backends(vec![dropper, Backend::new("good", backend("good").await)]);
        proxy
            .backends
            .read()
            .unwrap()
            .live
            .next
            .store(0, Ordering::Relaxed);
        let get = raw(
            addr,
            b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            get.starts_with("HTTP/1.1 200") && get.ends_with("good /x"),
            "GET is retried: {get}"
        );
        proxy
            .backends
            .read()
            .unwrap()
            .live
            .next
            .store(0, Ordering::Relaxed);
        let post =
            b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi";
        let post = raw(addr, post).await;
        assert!(
            post.starts_with("HTTP/1.1 502"),
            "POST is not retried once sent: {post}"
        );
    }
}

/// A backend that answers `101 Switching Protocols` to `Upgrade: echo` and then echoes bytes.
async fn upgrade_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|mut req: Request<Incoming>| async move {
                    let upgraded = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let mut io = TokioIo::new(upgraded.await.unwrap());
                        let (mut reader, mut writer) = tokio::io::split(&mut io);
                        let _ = tokio::io::copy(&mut reader, &mut writer).await;
                    });
                    let mut response = Response::new(Full::new(Bytes::new()));
                    *response.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                    response
                        .headers_mut()
                        .insert("connection", "upgrade".parse().unwrap());
                    response
                        .headers_mut()
                        .insert("upgrade", "echo".parse().unwrap());
                    Ok::<_, Infallible>(response)
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                let _ = conn.with_upgrades().await;
            });
        }
    });
    addr
}

/// A raw TCP echo server.
async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    addr
}

async fn echo_round_trip(stream: &mut TcpStream, text: &[u8]) {
    stream.write_all(text).await.unwrap();
    let mut buf = vec![0; text.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, text);
}

/// The peer closes the connection (EOF or reset) well within this bound.
async fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the connection is still open: {read:?}"
    );
}

#[tokio::test]
async fn upgraded_connections_pass_through_and_close_at_the_drain_deadline() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    let old = Backend::new("old", upgrade_backend().await);
    proxy.set_backends(vec![old.clone()]);
    let (addr, _stop) = frontend(proxy.clone()).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET /chat HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0; 1];
        client.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 101") && head.contains("upgrade: echo"),
        "{head}"
    );
    echo_round_trip(&mut client, b"ping").await;
    assert_eq!(old.in_flight(), 1, "the tunnel holds its backend");

    proxy.set_backends(vec![Backend::new("new", backend("new").await)]);
    echo_round_trip(&mut client, b"still open after the switch").await;
    let report = drain(std::slice::from_ref(&old), Duration::from_millis(300)).await;
    assert_eq!(report.abandoned, 1);
    assert!(report.waited >= Duration::from_millis(300));
    assert_closed(&mut client).await;
}

#[tokio::test]
async fn tcp_mode_forwards_bytes_both_ways_and_skips_refusing_backends() {
    let config = ProxyConfig {
        mode: Mode::Tcp,
        ..ProxyConfig::default()
    };
    let proxy = RoleProxy::new("db", config);
    let dead = Backend::new("dead", refusing().await);
    let live = Backend::new("live", echo_backend().await);
    proxy.set_backends(vec![dead.clone(), live.clone()]);
    let (addr, _stop) = frontend(proxy.clone()).await;
    for _ in 0..3 {
        let mut client = TcpStream::connect(addr).await.unwrap();
        echo_round_trip(&mut client, b"\x00binary\xffbytes\r\n").await;
        echo_round_trip(&mut client, &[7u8; 100_000]).await;
    }
    assert!(dead.is_down());

    let mut held = TcpStream::connect(addr).await.unwrap();
    echo_round_trip(&mut held, b"hold").await;
    proxy.set_backends(vec![]);
    let report = drain(std::slice::from_ref(&live), Duration::from_millis(200)).await;
    assert_eq!(
        report.abandoned, 1,
        "the open TCP connection was counted in flight"
    );
    assert_closed(&mut held).await;
}

#[tokio::test]
async fn tcp_mode_passes_a_servers_greeting_to_a_client_that_has_sent_nothing() {
    // Like SMTP, SSH or MySQL: the server speaks first.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let greeter = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let _ = stream.write_all(b"220 ready\r\n").await;
        }
    });
    let config = ProxyConfig {
        mode: Mode::Tcp,
        ..ProxyConfig::default()
    };
    let proxy = RoleProxy::new("mail", config);
    proxy.set_backends(vec![Backend::new("greeter", greeter)]);
    let (addr, _stop) = frontend(proxy).await;
    // Lets `serve` set its listener's options before the handshake, which the kernel completes
    // within `connect`.
    tokio::task::yield_now().await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 11];
    // Well inside the second an HTTP listener's deferred accept would hold a silent client.
    tokio::time::timeout(Duration::from_millis(500), client.read_exact(&mut greeting))
        .await
        .expect("the greeting, though the client sent nothing")
        .unwrap();
    assert_eq!(&greeting, b"220 ready\r\n");
}

#[tokio::test]
async fn metrics_count_responses_latency_and_bytes_per_role_and_backend() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    let a = Backend::new("a", backend("a").await);
    proxy.set_backends(vec![a.clone()]);
    let (addr, _stop) = frontend(proxy.clone()).await;
    for _ in 0..3 {
        assert_eq!(get(addr, "/x").await, (200, "a /x".to_string()));
    }
    let post = raw(
        addr,
        b"POST /y HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert!(post.ends_with("a /y"), "{post}");
    proxy.set_backends(vec![]);
    assert_eq!(get(addr, "/").await.0, 503);

    assert_eq!(proxy.metrics.responses(2), 4);
    assert_eq!(
        proxy.metrics.responses(5),
        1,
        "the proxy's own 503 counts for the role"
    );
    assert_eq!(a.metrics.responses(2), 4);
    assert_eq!(a.metrics.responses(5), 0, "but not for any backend");
    let mut exposition = Exposition::default();
    exposition.traffic(Scope::Role, "role=\"web\"", &proxy.metrics, 0);
    exposition.traffic(
        Scope::Backend,
        "role=\"web\",instance=\"a\"",
        &a.metrics,
        a.in_flight(),
    );
    let text = exposition.render();
    for line in [
        "phoenix_role_responses_total{role=\"web\",class=\"2xx\"} 4",
        "phoenix_role_responses_total{role=\"web\",class=\"5xx\"} 1",
        "phoenix_role_response_seconds_bucket{role=\"web\",le=\"+Inf\"} 5",
        "phoenix_role_response_seconds_count{role=\"web\"} 5",
        "phoenix_role_received_bytes_total{role=\"web\"} 5",
        "phoenix_role_sent_bytes_total{role=\"web\"} 16",
        "phoenix_backend_responses_total{role=\"web\",instance=\"a\",class=\"2xx\"} 4",
        "phoenix_backend_received_bytes_total{role=\"web\",instance=\"a\"} 5",
        "phoenix_backend_sent_bytes_total{role=\"web\",instance=\"a\"} 16",
        "phoenix_backend_in_flight{role=\"web\",instance=\"a\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    assert_valid_exposition(&text);
}

/// Every family has one HELP and one TYPE before its samples, samples of a family are together,
/// and histogram buckets never decrease.
fn assert_valid_exposition(text: &str) {
    let mut seen = std::collections::HashSet::new();
    let mut current = String::new();
    let mut last_bucket: Option<(String, u64)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let family = rest.split(' ').next().unwrap().to_string();
            assert!(seen.insert(family.clone()), "family {family} appears twice");
            current = family;
            continue;
        }
        if line.starts_with("# TYPE ") {
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap();
        assert!(
            name.starts_with(current.as_str()),
            "{name} outside its family block {current}"
        );
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        if name.ends_with("_bucket") {
            let series = line.split(",le=").next().unwrap().to_string();
            if let Some((previous, count)) = &last_bucket
                && *previous == series
            {
                assert!(value as u64 >= *count, "histogram buckets decrease: {line}");
            }
            last_bucket = Some((series, value as u64));
        }
    }
}

#[tokio::test]
async fn reconfiguration_latency_is_measured_from_the_change_to_the_first_routed_request() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    let (addr, _stop) = frontend(proxy.clone()).await;
    let a = Backend::new("a", backend("a").await);
    proxy.set_backends(vec![a.clone()]);
    assert_eq!(a.first_routed_after(), None, "no request yet");
    assert_eq!(get(addr, "/").await.0, 200);
    assert!(a.first_routed_after().is_some());
    assert_eq!(
        proxy.reconfiguration.count(),
        1,
        "one addition, routed once"
    );
    assert_eq!(get(addr, "/").await.0, 200);
    assert_eq!(
        proxy.reconfiguration.count(),
        1,
        "only the first request after a change counts"
    );

    // A health change that removes the backend is measured up to its removal.
    a.note_change();
    proxy.set_backends(vec![]);
    assert_eq!(proxy.reconfiguration.count(), 2);
    // A removal without a noted change (a plain switch) measures nothing.
    let b = Backend::new("b", backend("b").await);
    proxy.set_backends(vec![b.clone()]);
    proxy.set_backends(vec![]);
    assert_eq!(proxy.reconfiguration.count(), 2);
    assert_eq!(b.first_routed_after(), None);
}

#[tokio::test]
async fn http2_clients_are_served_over_h2c_with_requests_spread_over_backends() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    proxy.set_backends(vec![
        Backend::new("a", backend("a").await),
        Backend::new("b", backend("b").await),
    ]);
    let (addr, _stop) = frontend(proxy.clone()).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let mut answers = Vec::new();
    let requests: Vec<_> = (0..10)
        .map(|i| {
            let mut sender = sender.clone();
            tokio::spawn(async move {
                let uri = format!("http://web.test/h2/{i}");
                let request = Request::get(uri)
                    .body(http_body_util::Empty::<Bytes>::new())
                    .unwrap();
                let response = sender.send_request(request).await.unwrap();
                assert_eq!(response.version(), http::Version::HTTP_2);
                let status = response.status();
                let body = http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                (status, String::from_utf8(body.to_vec()).unwrap())
            })
        })
        .collect();
    for request in requests {
        answers.push(request.await.unwrap());
    }
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "{answers:?}"
    );
    let from_a = answers
        .iter()
        .filter(|(_, body)| body.starts_with("a /h2/"))
        .count();
    assert_eq!(from_a, 5, "round-robin over both backends: {answers:?}");
}

/// HTTP/2 splits cookies over fields and gives the host as `:authority`; an HTTP/1.1 backend
/// gets one `Cookie` field and a `Host`, on both of hyper's paths.
#[tokio::test]
async fn http2_requests_reach_the_backend_with_one_cookie_field_and_a_host() {
    let (_, addr, _stop) = serving(ProxyConfig::default(), "a", backend("a").await).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    for method in [Method::GET, Method::POST] {
        let request = Request::builder()
            .method(&method)
            .uri("http://web.test/all")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("x-forwarded-for", "10.9.9.9")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200, "{method}");
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        let lines: Vec<&str> = std::str::from_utf8(&body).unwrap().lines().collect();
        let named = |name: &str| -> Vec<&str> {
            lines
                .iter()
                .filter_map(|l| l.strip_prefix(name))
                .collect::<Vec<_>>()
        };
        assert_eq!(named("cookie: "), ["a=1; b=2"], "{method}: {lines:?}");
        assert_eq!(named("host: "), ["web.test"], "{method}: {lines:?}");
        assert_eq!(
            named("x-forwarded-for: "),
            ["10.9.9.9, 127.0.0.1"],
            "{method}: {lines:?}"
        );
        assert_eq!(named("via: "), ["1.1 phoenix"], "{method}: {lines:?}");
        assert_eq!(
            named("x-forwarded-proto: "),
            ["http"],
            "{method}: {lines:?}"
        );
    }
}

#[tokio::test]
async fn requests_with_no_or_two_hosts_or_a_bad_chunk_get_400() {
    let (_, addr, _stop) = serving(ProxyConfig::default(), "a", backend("a").await).await;
    let cases: [(&[u8], &str); 5] = [
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", "HTTP/1.1 400"),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            "HTTP/1.1 400",
        ),
        // HTTP/1.0 needs no Host; one Host is the usual case.
        (b"GET / HTTP/1.0\r\n\r\n", "HTTP/1.0 200"),
        (b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", "HTTP/1.1 200"),
    ];
    for (request, expected) in cases {
        let answer = raw(addr, request).await;
        assert!(
            answer.starts_with(expected),
            "{}: {answer}",
            String::from_utf8_lossy(request)
        );
    }
    let bad_chunk = raw(addr, cases[2].0).await;
    assert!(
        bad_chunk.contains("the request body is malformed"),
        "{bad_chunk}"
    );
}

#[tokio::test]
async fn a_request_head_that_trickles_past_the_head_timeout_gets_408() {
    let config = ProxyConfig {
        request_head_timeout: Duration::from_millis(200),
        ..ProxyConfig::default()
    };
    let (_, addr, _stop) = serving(config, "a", backend("a").await).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection was closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("request head not received within 200ms"),
        "{answer}"
    );
    // An idle connection (no head started) is not cut by the head timeout.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    idle.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    idle.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Sends one keep-alive request on `stream` and reads its answer's first bytes.
async fn keep_alive_get(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn connections_past_max_connections_wait_until_one_ends() {
    let config = ProxyConfig {
        max_connections: 2,
        ..ProxyConfig::default()
    };
    let (_, addr, _stop) = serving(config, "a", backend("a").await).await;
    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    assert!(keep_alive_get(&mut first).await.starts_with("HTTP/1.1 200"));
    assert!(
        keep_alive_get(&mut second)
            .await
            .starts_with("HTTP/1.1 200")
    );
    // The third connects (the kernel's backlog) but is not served while both are open.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0; 4096];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
    assert!(early.is_err(), "served past max_connections");
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf))
        .await
        .expect("served once a connection ended")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_client_past_its_connection_limit_is_closed_at_accept() {
    let config = ProxyConfig {
        max_connections_per_client: Some(1),
        ..ProxyConfig::default()
    };
    let (proxy, addr, _stop) = serving(config, "a", backend("a").await).await;
    let mut first = TcpStream::connect(addr).await.unwrap();
    assert!(keep_alive_get(&mut first).await.starts_with("HTTP/1.1 200"));
    let mut second = TcpStream::connect(addr).await.unwrap();
    let _ = second.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), second.read_to_end(&mut answer)).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(proxy.stats.refused_connections.load(Ordering::Relaxed), 1);
    drop(first);
    // Its count went with it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _) = get(addr, "/").await;
    assert_eq!(status, 200);
}

/// Raises this test process's descriptor limit to its hard limit (the slowloris test holds
/// thousands of sockets on both ends).
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

#[tokio::test]
async fn a_listener_holds_far_more_waiting_connections_than_the_128_tokio_listens_with() {
    raise_descriptor_limit();
    let bound = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = bound.local_addr().unwrap();
    let listener = client_stream::Listener::new(bound, client_stream::FirstWord::Client).unwrap();
    // 1,500 clients connect and send their first bytes before any is accepted. (With a full
    // queue the kernel drops new handshakes, and connect waits for its retries.)
    let clients: Vec<std::net::TcpStream> = (0..1500)
        .map(|n| {
            let mut client = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("client {n} could not connect: {e}"));
            std::io::Write::write_all(&mut client, b"GET / HTTP/1.1\r\n").unwrap();
            client
        })
        .collect();
    // All wait in the kernel's queue. One that overflowed it would come back only when its
    // bytes are sent again (200 ms at the soonest), so the queue runs dry first.
    let mut accepted = Vec::new();
    while let Ok(next) = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await {
        accepted.push(next.unwrap());
    }
    assert_eq!(
        accepted.len(),
        clients.len(),
        "connections dropped by a full accept queue (backlog {}, capped by net.core.somaxconn)",
        client_stream::BACKLOG
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_trickling_connections_do_not_stop_normal_requests() {
    raise_descriptor_limit();
    let config = ProxyConfig {
        request_head_timeout: Duration::from_secs(30),
        ..ProxyConfig::default()
    };
    let (_, addr, _stop) = serving(config, "a", backend("a").await).await;
    let mut slow = Vec::new();
    for _ in 0..2000 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nX-a: ").await.unwrap();
        slow.push(stream);
    }
    // They keep trickling while normal clients come and go.
    let trickle = tokio::spawn(async move {
        for _ in 0..10 {
            for stream in slow.iter_mut() {
                let _ = stream.write_all(b"a").await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        slow
    });
    for _ in 0..50 {
        let answer = tokio::time::timeout(Duration::from_secs(5), get(addr, "/")).await;
        assert_eq!(answer.expect("answered within 5 s").0, 200);
    }
    let slow = trickle.await.unwrap();
    assert_eq!(slow.len(), 2000);
}

#[tokio::test]
async fn both_paths_send_the_backend_the_same_headers() {
    let (_, addr, _stop) = serving(ProxyConfig::default(), "a", backend("a").await).await;
    let heads = [
        "Host: t\r\n",
        "Host: t\r\nX-Forwarded-For: 10.1.1.1\r\nX-Forwarded-Proto: https\r\n",
        "Host: t\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n",
        "Host: t\r\nTE: trailers\r\nTrailer: X-T\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\n",
        "Host: t\r\nAccept: */*\r\nUser-Agent: differential\r\nVia: 1.0 other\r\n",
    ];
    // Origin-form takes the fast path; absolute-form is handed to hyper, where a GET goes over
    // a raw backend connection and a POST through hyper's client.
    for (head, method) in heads.iter().flat_map(|h| [(h, "GET"), (h, "POST")]) {
        let end = "Content-Length: 0\r\nConnection: close\r\n\r\n";
        let fast = format!("{method} /all HTTP/1.1\r\n{head}{end}");
        let general = format!("{method} http://t/all HTTP/1.1\r\n{head}{end}");
        let received = |answer: String| {
            let body = answer
                .split_once("\r\n\r\n")
                .unwrap()
                .1
                .to_ascii_lowercase();
            body.lines().map(str::to_string).collect::<Vec<_>>()
        };
        let fast = received(raw(addr, fast.as_bytes()).await);
        let general = received(raw(addr, general.as_bytes()).await);
        assert_eq!(fast, general, "{method} {head:?}");
        for gone in [
            "x-secret",
            "keep-alive",
            "te:",
            "trailer",
            "proxy-connection",
            "upgrade",
        ] {
            assert!(
                !fast.iter().any(|l| l.starts_with(gone)),
                "{head:?}: {fast:?}"
            );
        }
        assert!(fast.iter().any(|l| l.starts_with("via: ")), "{fast:?}");
    }
}

/// One keep-alive request on `stream`: the body of a `Content-Length` response.
async fn request_on(stream: &mut TcpStream, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "connection closed"
        );
        raw.push(byte[0]);
    }
    let head = String::from_utf8(raw).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("connection: close"));
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_string)
        })
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.unwrap();
    String::from_utf8(body).unwrap()
}

#[tokio::test]
async fn a_handover_passes_the_listener_and_idle_connections_on_open() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    proxy.set_backends(vec![Backend::new("b1", backend("b1").await)]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(Stop::Serve);
    let first = tokio::spawn(serve(
        listener,
        proxy.clone(),
        stopped,
        Duration::from_secs(5),
        Vec::new(),
    ));
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert_eq!(request_on(&mut idle, "/one").await, "b1 /one");
    // A request in flight when the handover is asked finishes first.
    let mut busy = TcpStream::connect(addr).await.unwrap();
    let slow = tokio::spawn(async move {
        let body = request_on(&mut busy, "/slow/300").await;
        (body, busy)
    });
    // A client that had started its next head when the handover came.
    let mut partial = TcpStream::connect(addr).await.unwrap();
    assert_eq!(request_on(&mut partial, "/p").await, "b1 /p");
    partial.write_all(b"GET /par").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.send_replace(Stop::HandOver);
    let leftover = first.await.unwrap();
    let (body, mut busy) = slow.await.unwrap();
    assert_eq!(body, "b1 /slow/300");
    assert_eq!(leftover.parked.len(), 3, "{leftover:?}");
    let buffered: Vec<_> = leftover.parked.iter().map(|p| p.buffered.clone()).collect();
    assert!(
        buffered.contains(&Bytes::from_static(b"GET /par")),
        "{buffered:?}"
    );
    // Between the two programs, a new client waits in the backlog.
    let waiting = tokio::spawn(async move { get(addr, "/queued").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let listener = TcpListener::from_std(leftover.listener.unwrap()).unwrap();
    let (_stop, stopped) = watch::channel(Stop::Serve);
    tokio::spawn(serve(
        listener,
        proxy,
        stopped,
        Duration::from_secs(5),
        leftover.parked,
    ));
    assert_eq!(waiting.await.unwrap(), (200, "b1 /queued".to_string()));
    assert_eq!(request_on(&mut idle, "/two").await, "b1 /two");
    assert_eq!(request_on(&mut busy, "/three").await, "b1 /three");
    let rest = "tial HTTP/1.1\r\nHost: test\r\n\r\n";
    partial.write_all(rest.as_bytes()).await.unwrap();
    let mut raw = vec![0; 512];
    let n = partial.read(&mut raw).await.unwrap();
    assert!(
        String::from_utf8_lossy(&raw[..n]).ends_with("b1 /partial"),
        "{:?}",
        String::from_utf8_lossy(&raw[..n])
    );
}
