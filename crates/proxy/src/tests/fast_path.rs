//! The HTTP/1.1 fast path against real sockets: response framings, request bodies,
//! pipelining, stale backend connections, and the hand-over to hyper.

use hyper::client::conn::http1::SendRequest;

use super::*;

/// A backend speaking raw HTTP/1.1: for each request it writes `answer(method, path)` and,
/// when that returns `true`, closes the connection (as for a body that runs to the close,
/// or a backend whose keep-alive timeout just fired).
pub(super) async fn scripted(answer: fn(&str, &str) -> (&'static [u8], bool)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let mut words = head.split(' ');
                    let (method, path) = (words.next().unwrap(), words.next().unwrap());
                    let (bytes, close) = answer(method, path);
                    stream.write_all(bytes).await.unwrap();
                    if close {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A hyper client connection to `addr`: an independent HTTP/1.1 implementation checks the
/// framing of every answer.
async fn client(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// Sends one request on `sender`: (status, headers, body).
async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, http::HeaderMap, Bytes) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "test")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, body)
}

pub(super) fn framings(method: &str, path: &str) -> (&'static [u8], bool) {
    match (method, path) {
        (_, "/chunked") => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nKeep-Alive: timeout=5\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n",
            false,
        ),
        ("HEAD", "/head") => (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", false),
        (_, "/empty") => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        (_, "/interim") => (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        (_, "/until-close") => (b"HTTP/1.1 200 OK\r\n\r\nthe body runs to the close", true),
        _ => (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", false),
    }
}

#[tokio::test]
async fn every_response_framing_passes_through_on_one_keep_alive_connection() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    let only = Backend::new("a", scripted(framings).await);
    proxy.set_backends(vec![only.clone()]);
    let (addr, _stop) = frontend(proxy.clone()).await;
    let mut sender = client(addr).await;

    let (status, headers, body) = exchange(&mut sender, "GET", "/chunked", b"").await;
    assert_eq!((status, &body[..]), (200, &b"hello, world"[..]));
    assert_eq!(headers["transfer-encoding"], "chunked");
    assert!(
        !headers.contains_key("keep-alive"),
        "hop-by-hop: {headers:?}"
    );
    assert_eq!(headers["via"], "1.1 phoenix");

    let (status, headers, body) = exchange(&mut sender, "HEAD", "/head", b"").await;
    assert_eq!((status, body.len()), (200, 0));
    assert_eq!(headers["content-length"], "1000");

    let (status, _, body) = exchange(&mut sender, "GET", "/empty", b"").await;
    assert_eq!((status, body.len()), (204, 0));

    let (status, _, body) = exchange(&mut sender, "GET", "/interim", b"").await;
    assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    assert_eq!(
        only.raw.idle.lock().unwrap().len(),
        1,
        "one backend connection served all four"
    );

    let (status, headers, body) = exchange(&mut sender, "GET", "/until-close", b"").await;
    assert_eq!(
        (status, &body[..]),
        (200, &b"the body runs to the close"[..])
    );
    assert_eq!(headers["connection"], "close");
    tokio::time::timeout(Duration::from_secs(5), sender.ready())
        .await
        .unwrap()
        .expect_err("the client connection ends with a body that runs to the close");
}

#[tokio::test]
async fn request_bodies_reach_the_backend_whole_small_or_streamed() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    let only = Backend::new("a", backend("a").await);
    proxy.set_backends(vec![only.clone()]);
    let (addr, _stop) = frontend(proxy.clone()).await;
    let mut sender = client(addr).await;
    let small = b"a small body";
    let (status, _, echoed) = exchange(&mut sender, "POST", "/echo", small).await;
    assert_eq!((status, &echoed[..]), (200, &small[..]));
    // Far larger than a read buffer: most of it streams after the head went out.
    let large: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (status, _, echoed) = exchange(&mut sender, "PUT", "/echo", &large).await;
    assert_eq!(status, 200);
    assert!(echoed == large, "the large body arrives intact");
    let received = only.metrics.received_bytes();
    assert_eq!(received, (small.len() + large.len()) as u64);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (_, addr, _stop) = serving(ProxyConfig::default(), "a", backend("a").await).await;
    let answer = raw(
        addr,
        b"GET /first HTTP/1.1\r\nHost: t\r\n\r\nGET /second HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    let first = answer.find("a /first").expect("first answered");
    let second = answer.find("a /second").expect("second answered");
    assert!(first < second, "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
}

/// Closes every connection after one answer without saying so, as a backend whose
/// keep-alive timeout fires between requests.
fn closes_silently(_: &str, _: &str) -> (&'static [u8], bool) {
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true)
}

#[tokio::test]
async fn backend_connections_closed_while_idle_are_not_reused() {
    let (proxy, addr, _stop) =
        serving(ProxyConfig::default(), "a", scripted(closes_silently).await).await;
    let mut sender = client(addr).await;
    for method in ["GET", "POST", "GET", "POST"] {
        let (status, _, body) = exchange(&mut sender, method, "/", b"x").await;
        assert_eq!((status, &body[..]), (200, &b"ok"[..]), "{method}");
    }
    assert_eq!(
        proxy.stats.retries.load(Ordering::Relaxed),
        0,
        "closed connections are found before use, not by a failed attempt"
    );
}

#[tokio::test]
async fn unusual_requests_are_handed_to_the_general_path_mid_connection() {
    let (_, addr, _stop) = serving(ProxyConfig::default(), "a", backend("a").await).await;
    let answer = raw(addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.") && answer.ends_with("a /old"),
        "{answer}"
    );

    // A fast-path request, then a chunked body on the same connection: hyper takes over
    // with the bytes already read.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).ends_with("a /fast") {
        let mut buf = [0; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut rest = String::new();
    stream.read_to_string(&mut rest).await.unwrap();
    assert!(
        rest.starts_with("HTTP/1.1 200") && rest.ends_with("abc"),
        "{rest}"
    );

    // Smuggling attempts never reach a backend through the fast path: hyper refuses them.
    let smuggle =
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd";
    let answer = raw(addr, smuggle).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

#[tokio::test]
async fn a_backend_with_a_malformed_answer_gives_502() {
    fn malformed(_: &str, _: &str) -> (&'static [u8], bool) {
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", true)
    }
    let (_, addr, _stop) = serving(ProxyConfig::default(), "bad", scripted(malformed).await).await;
    let answer = raw(
        addr,
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("invalid Content-Length"), "{answer}");
}

/// A 1 MiB body of known length (copied through the pooled buffer) and a backend that breaks off after 100 KiB.
pub(super) static LARGE: std::sync::LazyLock<(Vec<u8>, Vec<u8>)> = std::sync::LazyLock::new(|| {
    let mut next = xorshift(7);
    let body: Vec<u8> = (0..1 << 20).map(|_| next() as u8).collect();
    let mut whole =
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    whole.extend_from_slice(&body);
    (whole, body)
});

pub(super) fn large(_: &str, path: &str) -> (&'static [u8], bool) {
    let whole = &LARGE.0;
    match path {
        "/large" => (whole, false),
        "/broken" => (&whole[..100 * 1024], true),
        _ => (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmall", false),
    }
}

#[tokio::test]
async fn large_bodies_arrive_whole_between_small_ones_on_one_keep_alive_connection() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    let only = Backend::new("a", scripted(large).await);
    proxy.set_backends(vec![only.clone()]);
    let (addr, _stop) = frontend(proxy.clone()).await;
    let mut sender = client(addr).await;
    for path in ["/large", "/small", "/large", "/large", "/small"] {
        let (status, _, body) = exchange(&mut sender, "GET", path, b"").await;
        assert_eq!(status, 200, "{path}");
        if path == "/large" {
            assert!(
                body == LARGE.1,
                "{path}: {} bytes, not the body sent",
                body.len()
            );
        } else {
            assert_eq!(&body[..], b"small");
        }
    }
    assert_eq!(
        only.raw.idle.lock().unwrap().len(),
        1,
        "one backend connection served all five"
    );
    assert_eq!(
        proxy.metrics.sent_bytes(),
        3 * (1 << 20) + 2 * 5,
        "every body byte counted as sent"
    );
}

#[tokio::test]
async fn a_backend_that_breaks_off_a_large_body_closes_the_client_connection() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    proxy.set_backends(vec![Backend::new("a", scripted(large).await)]);
    let (addr, _stop) = frontend(proxy.clone()).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /broken HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the connection is closed, not left hanging")
        .unwrap();
    let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let body_sent = 100 * 1024 - (LARGE.0.len() - LARGE.1.len());
    assert_eq!(
        answer.len() - head_end,
        body_sent,
        "every byte the backend sent"
    );
    assert_eq!(&answer[head_end..], &LARGE.1[..body_sent]);
    // The next client is served: the broken pipe was not reused.
    let mut sender = client(addr).await;
    let (status, _, body) = exchange(&mut sender, "GET", "/large", b"").await;
    assert_eq!(status, 200);
    assert!(body == LARGE.1);
}
