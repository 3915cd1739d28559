//! An edge listener: TLS termination with a certificate per host name (SNI) read again when
//! its file changes, HTTP/2 and HTTP/1.1 by ALPN, HSTS, a plain-HTTP redirect, and routing by
//! host and path to two roles, with routes changed by `phoenix apply`. Clients are Debian's
//! `curl` and `openssl s_client`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Fleet, Phoenix, phoenix_bin, text, wait_for};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `phoenix tls dev-cert` for `name` into `dir`.
fn dev_cert(dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new(phoenix_bin())
        .args(["tls", "dev-cert", "--name", name, "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// curl to `https://HOST:PORT/PATH` resolved to loopback, trusting `ca`: status, HTTP
/// version, headers and body.
fn curl(ca: &Path, host: &str, port: u16, path: &str, extra: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "5", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .unwrap();
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

/// The certificate `openssl s_client` gets when it asks for `name`: its subject and SHA-256
/// fingerprint.
fn served_cert(port: u16, name: &str, extra: &[&str]) -> String {
    let shell = format!(
        "openssl s_client -connect 127.0.0.1:{port} -servername {name} {} </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName -fingerprint -sha256",
        extra.join(" ")
    );
    let out = Command::new("sh").args(["-c", &shell]).output().unwrap();
    text(&out.stdout)
}

fn fleet(port: u16, redirect: u16, routes: &str) -> Fleet {
    let mut fleet = Fleet::version("v1");
    fleet.instances = 1;
    let more = format!(
        r#"
[role.api]
image = "hello"
listen = "127.0.0.1:0"
network = "host"
[role.api.health]
interval = "100ms"

[listener.public]
listen = "127.0.0.1:{port}"
tls = [{{ cert = "a/cert.pem", key = "a/key.pem" }}, {{ cert = "b/cert.pem", key = "b/key.pem" }}]
redirect_http = "127.0.0.1:{redirect}"
hsts = "1d"
routes = [{routes}]
"#
    );
    fleet.more = Box::leak(more.into_boxed_str());
    fleet
}

const ROUTES: &str = r#"{ host = "api.example.test", role = "api" }, { host = "*.example.test", path_prefix = "/assets", role = "web" }"#;

#[test]
fn a_tls_listener_routes_by_host_and_path_and_reloads_its_certificates() {
    let (port, redirect) = (free_port(), free_port());
    // Made first: the fleet file names them, and `phoenix up` refuses a listener without.
    let fleet = fleet(port, redirect, ROUTES);
    let mut phoenix = Phoenix::start_prepared(&fleet, |dir| {
        dev_cert(&dir.join("a"), "api.example.test");
        dev_cert(&dir.join("b"), "*.example.test");
    });
    phoenix.wait_role("api", 1);
    phoenix.wait_role("web", 1);
    let (a, b) = (phoenix.dir().join("a"), phoenix.dir().join("b"));

    // By name: api's certificate and role; HTTP/2 by ALPN, HSTS on the answer.
    let answer = curl(&a.join("cert.pem"), "api.example.test", port, "/", &[]);
    assert!(answer.starts_with("HTTP/2 200"), "{answer}");
    assert!(answer.contains("hello from api-"), "{answer}");
    assert!(
        answer.contains("strict-transport-security: max-age=86400"),
        "{answer}"
    );
    let answer = curl(
        &a.join("cert.pem"),
        "api.example.test",
        port,
        "/",
        &["--http1.1"],
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The wildcard's certificate and the path route to web (hello answers only `/`: its own
    // 404, from a web instance, shows the route); other paths have no route.
    let answer = curl(
        &b.join("cert.pem"),
        "www.example.test",
        port,
        "/assets/app.css",
        &[],
    );
    assert!(answer.contains("x-instance: web-"), "{answer}");
    let answer = curl(&b.join("cert.pem"), "www.example.test", port, "/admin", &[]);
    assert!(answer.starts_with("HTTP/2 404"), "{answer}");
    assert!(
        answer.contains("no route for host \"www.example.test\""),
        "{answer}"
    );
    // Each name gets its own certificate; an unknown one the first.
    assert!(served_cert(port, "api.example.test", &[]).contains("DNS:api.example.test"));
    assert!(served_cert(port, "www.example.test", &[]).contains("DNS:*.example.test"));
    assert!(served_cert(port, "other.test", &[]).contains("DNS:api.example.test"));
    // TLS 1.1 is refused.
    assert!(served_cert(port, "api.example.test", &["-tls1_1"]).is_empty());

    // Plain HTTP is sent to HTTPS, same host and path.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-i",
            "--max-time",
            "5",
            "-H",
            "Host: api.example.test",
        ])
        .arg(format!("http://127.0.0.1:{redirect}/x?y=1"))
        .output()
        .unwrap();
    let moved = text(&out.stdout);
    assert!(moved.starts_with("HTTP/1.1 308"), "{moved}");
    assert!(
        moved.contains(&format!("location: https://api.example.test:{port}/x?y=1")),
        "{moved}"
    );

    // A renewed certificate: a new handshake gets it, no restart.
    let before = served_cert(port, "api.example.test", &[]);
    let renewed = phoenix.dir().join("renewed");
    dev_cert(&renewed, "api.example.test");
    std::fs::copy(renewed.join("key.pem"), a.join("key.pem")).unwrap();
    std::fs::copy(renewed.join("cert.pem"), a.join("cert.pem")).unwrap();
    wait_for(
        "the renewed certificate served",
        Duration::from_secs(10),
        || {
            let now = served_cert(port, "api.example.test", &[]);
            now.contains("DNS:api.example.test") && now != before
        },
    );
    let answer = curl(
        &renewed.join("cert.pem"),
        "api.example.test",
        port,
        "/",
        &[],
    );
    assert!(answer.contains("hello from api-"), "{answer}");
    // A broken file keeps the certificate served, and says why.
    std::fs::write(a.join("cert.pem"), "not a certificate").unwrap();
    wait_for("the broken file journaled", Duration::from_secs(10), || {
        !phoenix.events("listener.certificate_refused").is_empty()
    });
    let answer = curl(
        &renewed.join("cert.pem"),
        "api.example.test",
        port,
        "/",
        &[],
    );
    assert!(answer.contains("hello from api-"), "{answer}");

    // New routes with `phoenix apply`, no restart: every path of the wildcard to web.
    let routes =
        r#"{ host = "api.example.test", role = "api" }, { host = "*.example.test", role = "web" }"#;
    phoenix.write_fleet(&self::fleet(port, redirect, routes));
    let applied = phoenix.cli_ok(&["apply", "--auto-approve"]);
    assert!(applied.contains("routes"), "{applied}");
    let answer = curl(&b.join("cert.pem"), "www.example.test", port, "/admin", &[]);
    assert!(answer.contains("x-instance: web-"), "{answer}");
}
