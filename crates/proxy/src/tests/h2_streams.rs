//! HTTP/2 streams without a body over raw backend connections (`raw.rs`): every response
//! framing decoded, hop-by-hop fields dropped, cookies joined, stale connections replaced,
//! large bodies whole, and a body cut short reported as an error, never as a shorter success.

use hyper::client::conn::http2::SendRequest;

use super::fast_path::{LARGE, framings, large, scripted};
use super::*;

/// An HTTP/2 client connection (prior knowledge) to `addr`.
async fn h2_client(addr: SocketAddr) -> SendRequest<http_body_util::Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}

/// One request on `sender` with `headers`: (status, headers, body), or the body's error.
async fn h2_exchange(
    sender: &mut SendRequest<http_body_util::Empty<Bytes>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, Result<Bytes, String>) {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://web.test{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(http_body_util::Empty::new()).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the body within 5 s")
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    (parts.status.as_u16(), parts.headers, body)
}

#[tokio::test]
async fn every_response_framing_reaches_an_http2_client_decoded() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    let only = Backend::new("a", scripted(framings).await);
    proxy.set_backends(vec![only.clone()]);
    let (addr, _stop) = frontend(proxy.clone()).await;
    let mut sender = h2_client(addr).await;

    let (status, headers, body) = h2_exchange(&mut sender, "GET", "/chunked", &[]).await;
    assert_eq!((status, body.unwrap()), (200, Bytes::from("hello, world")));
    for hop in ["transfer-encoding", "keep-alive", "content-length"] {
        assert!(!headers.contains_key(hop), "{hop}: {headers:?}");
    }
    assert_eq!(headers["via"], "1.1 phoenix");

    let (status, headers, body) = h2_exchange(&mut sender, "HEAD", "/head", &[]).await;
    assert_eq!((status, body.unwrap().len()), (200, 0));
    assert_eq!(headers["content-length"], "1000");

    let (status, _, body) = h2_exchange(&mut sender, "GET", "/empty", &[]).await;
    assert_eq!((status, body.unwrap().len()), (204, 0));

    let (status, _, body) = h2_exchange(&mut sender, "GET", "/interim", &[]).await;
    assert_eq!((status, body.unwrap()), (200, Bytes::from("ok")));
    assert_eq!(
        only.raw.idle.lock().unwrap().len(),
        1,
        "one backend connection served all four, one after another"
    );

    let (status, _, body) = h2_exchange(&mut sender, "GET", "/until-close", &[]).await;
    assert_eq!(
        (status, body.unwrap()),
        (200, Bytes::from("the body runs to the close"))
    );
    assert!(
        only.raw.idle.lock().unwrap().is_empty(),
        "a connection whose body ran to its close is not pooled"
    );
    assert_eq!(proxy.stats.retries.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn http2_cookie_fields_reach_the_backend_as_one_line_with_the_forwarding_headers() {
    let (_, addr, _stop) = serving(ProxyConfig::default(), "a", backend("a").await).await;
    let mut sender = h2_client(addr).await;
    let cookies = [
        ("cookie", "a=1"),
        ("cookie", "b=2"),
        ("x-forwarded-for", "10.0.0.9"),
    ];
    let (status, _, body) = h2_exchange(&mut sender, "GET", "/all", &cookies).await;
    assert_eq!(status, 200);
    let seen = String::from_utf8(body.unwrap().to_vec()).unwrap();
    assert_eq!(
        seen,
        "cookie: a=1; b=2\nhost: web.test\nvia: 1.1 phoenix\n\
         x-forwarded-for: 10.0.0.9, 127.0.0.1\nx-forwarded-proto: http"
    );
}

/// Answers the first request on each connection and closes it, silently, on the second: a
/// pooled connection that turns out dead only once used.
async fn answers_once_per_connection() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0; 4096];
                while buf.windows(4).all(|w| w != b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                stream.write_all(ok).await.unwrap();
                let _ = stream.read(&mut chunk).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_pooled_connection_that_answers_nothing_is_replaced_on_the_same_backend() {
    let (proxy, addr, _stop) = serving(
        ProxyConfig::default(),
        "a",
        answers_once_per_connection().await,
    )
    .await;
    let mut sender = h2_client(addr).await;
    for n in 0..4 {
        let (status, _, body) = h2_exchange(&mut sender, "GET", "/", &[]).await;
        assert_eq!(
            (status, body.unwrap()),
            (200, Bytes::from("ok")),
            "request {n}"
        );
    }
    assert_eq!(
        proxy.stats.retries.load(Ordering::Relaxed),
        0,
        "a dead pooled connection is no failed attempt"
    );
}

#[tokio::test]
async fn large_bodies_arrive_whole_and_one_cut_short_is_an_error() {
    let proxy = RoleProxy::new("web", ProxyConfig::default());
    let only = Backend::new("a", scripted(large).await);
    proxy.set_backends(vec![only.clone()]);
    let (addr, _stop) = frontend(proxy.clone()).await;
    let mut sender = h2_client(addr).await;
    for path in ["/large", "/small", "/large"] {
        let (status, _, body) = h2_exchange(&mut sender, "GET", path, &[]).await;
        let body = body.unwrap();
        assert_eq!(status, 200, "{path}");
        let expected: &[u8] = if path == "/large" { &LARGE.1 } else { b"small" };
        assert!(
            body == expected,
            "{path}: {} bytes, not the body sent",
            body.len()
        );
    }
    assert_eq!(proxy.metrics.sent_bytes(), 2 * (1 << 20) + 5);
    // The stream is reset: before its head reached the client, or during its body.
    let request = Request::get("http://web.test/broken")
        .body(http_body_util::Empty::new())
        .unwrap();
    let answer = match sender.send_request(request).await {
        Ok(response) => response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().len()),
        Err(error) => Err(error),
    };
    assert!(
        answer.is_err(),
        "a body cut short is no success: {answer:?}"
    );
    // The stream failed, not the client's connection, and the broken pipe is not reused.
    let (status, _, body) = h2_exchange(&mut sender, "GET", "/small", &[]).await;
    assert_eq!((status, body.unwrap()), (200, Bytes::from("small")));
}
