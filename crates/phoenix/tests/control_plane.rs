//! The control plane admits its owner on the Unix socket, and on TCP only a token (read-only
//! or operator) or a client certificate; Host and Origin must name the listener; every
//! state-changing call is journaled with who made it.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{Fleet, Phoenix, make_certificates, phoenix, phoenix_bin, text, unix_request};

const READ_SECRET: &str = "read-0123456789abcdef";
const OPERATE_SECRET: &str = "ops-fedcba9876543210";

fn one_instance() -> Fleet {
    Fleet {
        instances: 1,
        ..Fleet::version("v1")
    }
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `phoenix --api URL ARGS` with `env` added and PHOENIX_API_TOKEN only as given.
fn remote(phoenix: &Phoenix, url: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(phoenix_bin())
        .arg("--state")
        .arg(phoenix.state())
        .args(args)
        .args(["--api", url])
        .env_remove("PHOENIX_API_TOKEN")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// One raw HTTP/1.1 request over TCP; the whole response.
fn tcp_request(addr: SocketAddr, head: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

fn tcp_addr(phoenix: &Phoenix) -> SocketAddr {
    let url = std::fs::read_to_string(phoenix.state().join("api.addr")).unwrap();
    url.trim()
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .parse()
        .unwrap()
}

#[test]
fn unsafe_api_settings_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    one_instance().write_to(dir.path());
    let refused = |args: &[&str], env: Option<&str>, expected: &str| {
        let mut command = Command::new(phoenix_bin());
        command
            .current_dir(dir.path())
            .args(["--state", "s", "up"])
            .args(args)
            .env_remove("PHOENIX_API_TOKEN");
        if let Some(value) = env {
            command.env("PHOENIX_API_TOKEN", value);
        }
        let output = command.output().unwrap();
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let stderr = text(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    };
    refused(
        &["--api-listen", "127.0.0.1:0"],
        None,
        "refusing to serve the API on TCP 127.0.0.1:0 without authentication",
    );
    refused(
        &["--token", "s3cret-s3cret-s3cret"],
        None,
        "--token is not taken on the command line",
    );
    refused(
        &["--api-listen", "127.0.0.1:0"],
        Some(" "),
        "PHOENIX_API_TOKEN is set but empty",
    );
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("ci read {READ_SECRET}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(
        &["--api-listen", "127.0.0.1:0", "--api-tokens", "tokens"],
        None,
        "can be read by other users (mode 644): chmod 600",
    );
    write_private(&tokens, &format!("ci read {READ_SECRET}\nops operate\n"));
    refused(
        &["--api-tokens", "tokens"],
        None,
        "tokens:2: write `NAME SCOPE SECRET`",
    );
    assert!(
        !dir.path().join("s/api.sock").exists(),
        "nothing was served"
    );
    // The client refuses a token on its command line too.
    let output = phoenix(dir.path(), &["--state", "s", "status", "--token", "x"]);
    assert!(text(&output.stderr).contains("--token is not taken on the command line"));
}

#[test]
fn the_socket_is_its_owners_and_tcp_takes_scoped_tokens_and_names_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    write_private(
        &dir.path().join("tokens"),
        &format!("# who\nci read {READ_SECRET}\nops operate {OPERATE_SECRET}\n"),
    );
    one_instance().write_to(dir.path());
    let mut phoenix = Phoenix::launch(
        dir,
        &["--api-listen", "127.0.0.1:0", "--api-tokens", "tokens"],
        None,
    );
    phoenix.wait_serving(1);
    let socket = phoenix.state().join("api.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is its owner's");

    // The owner needs nothing more.
    phoenix.cli_ok(&["scale", "web", "2"]);

    let addr = tcp_addr(&phoenix);
    let url = format!("http://{addr}");
    let anonymous = remote(&phoenix, &url, &[], &["status"]);
    assert_eq!(anonymous.status.code(), Some(1));
    assert!(
        text(&anonymous.stderr).contains("401 Unauthorized: missing or wrong API token"),
        "{}",
        text(&anonymous.stderr)
    );
    let reader = [("PHOENIX_API_TOKEN", READ_SECRET)];
    let status = remote(&phoenix, &url, &reader, &["status", "--json"]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["roles"][0]["desired_instances"], 2);
    let denied = remote(&phoenix, &url, &reader, &["scale", "web", "1"]);
    assert_eq!(denied.status.code(), Some(1));
    assert!(
        text(&denied.stderr).contains("token ci is read-only: it cannot POST /v1/roles/web/scale"),
        "{}",
        text(&denied.stderr)
    );
    let token_file = phoenix.dir.path().join("ops.token");
    write_private(&token_file, &format!("{OPERATE_SECRET}\n"));
    let scaled = remote(
        &phoenix,
        &url,
        &[],
        &[
            "scale",
            "web",
            "1",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    assert!(scaled.status.success(), "{}", text(&scaled.stderr));

    // A web page cannot drive it: not by DNS rebinding, not by a cross-site POST.
    let rebinding = tcp_request(
        addr,
        &format!(
            "GET /v1/status HTTP/1.1\r\nHost: attacker.example:{}\r\nAuthorization: Bearer {OPERATE_SECRET}\r\nConnection: close\r\n\r\n",
            addr.port()
        ),
    );
    assert!(rebinding.starts_with("HTTP/1.1 421"), "{rebinding}");
    assert!(
        rebinding.contains("is not this API's address"),
        "{rebinding}"
    );
    let cross_site = tcp_request(
        addr,
        &format!(
            "POST /v1/roles/web/scale HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://attacker.example\r\nAuthorization: Bearer {OPERATE_SECRET}\r\nContent-Type: text/plain\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{{\"instances\":3}}"
        ),
    );
    assert!(cross_site.starts_with("HTTP/1.1 403"), "{cross_site}");
    let plain_post = tcp_request(
        addr,
        &format!(
            "POST /v1/roles/web/scale HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{{\"instances\":3}}"
        ),
    );
    assert!(plain_post.starts_with("HTTP/1.1 401"), "{plain_post}");
    // The scheme's case does not matter; the token's does.
    let lower = |token: &str| {
        tcp_request(
            addr,
            &format!(
                "GET /v1/status HTTP/1.1\r\nHost: {addr}\r\nAuthorization: bearer {token}\r\nConnection: close\r\n\r\n"
            ),
        )
    };
    assert!(lower(READ_SECRET).starts_with("HTTP/1.1 200"));
    assert!(lower(&READ_SECRET.to_uppercase()).starts_with("HTTP/1.1 401"));
    let no_host = tcp_request(addr, "GET /v1/status HTTP/1.0\r\n\r\n");
    assert!(
        no_host.starts_with("HTTP/1.0 400") || no_host.starts_with("HTTP/1.1 400"),
        "{no_host}"
    );

    // Another local user reaches neither the socket (its mode) nor the API behind it (its
    // peer credentials), even when the mode is widened.
    // The binary where that user may run it (a clone's target directory may be private).
    let place = tempfile::tempdir().unwrap();
    std::fs::set_permissions(place.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = place.path().join("phoenix");
    std::fs::copy(phoenix_bin(), &program).unwrap();
    let as_nobody = || {
        Command::new(&program)
            .arg("--state")
            .arg(phoenix.state())
            .args(["scale", "web", "3"])
            .env_remove("PHOENIX_API_TOKEN")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let blocked = as_nobody();
    assert_eq!(blocked.status.code(), Some(1));
    assert!(
        text(&blocked.stderr).contains("Permission denied"),
        "{}",
        text(&blocked.stderr)
    );
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let refused = as_nobody();
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("uid 65534 may not use this API: it belongs to uid 0"),
        "{}",
        text(&refused.stderr)
    );
    let answer = unix_request(&socket, "GET", "/v1/status", "");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Who did what: the owner by uid, the operator token by name; nobody's call is not there.
    let calls: Vec<(String, String)> = phoenix
        .events("api.call")
        .iter()
        .map(|e| {
            (
                e["detail"]["actor"].as_str().unwrap().to_string(),
                e["detail"]["call"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let scale = "POST /v1/roles/web/scale".to_string();
    assert_eq!(
        calls,
        [
            ("uid 0".to_string(), scale.clone()),
            ("token ops".to_string(), scale)
        ]
    );
    let scaled = phoenix.events("role.scaled");
    assert_eq!(scaled.len(), 2, "{scaled:?}");
}

#[test]
fn mutual_tls_admits_only_certificates_the_ca_signed() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    one_instance().write_to(dir.path());
    let mut phoenix = Phoenix::launch(
        dir,
        &[
            "--api-listen",
            "127.0.0.1:0",
            "--api-tls-cert",
            "server.pem",
            "--api-tls-key",
            "server.key",
            "--api-client-ca",
            "ca.pem",
        ],
        None,
    );
    phoenix.wait_serving(1);
    let addr = tcp_addr(&phoenix);
    let url = format!("https://{addr}");
    let files = phoenix.dir.path();
    let file = |name: &str| files.join(name).display().to_string();
    let (ca, cert, key) = (file("ca.pem"), file("client.pem"), file("client.key"));
    let tls = ["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    let scaled = remote(
        &phoenix,
        &url,
        &[],
        &[&["scale", "web", "2"][..], &tls].concat(),
    );
    assert!(scaled.status.success(), "{}", text(&scaled.stderr));

    // curl with the client certificate gets in; without it the handshake fails.
    let curl = |with_cert: bool| {
        let mut command = Command::new("curl");
        command.args(["-sS", "--max-time", "10", "--cacert", &ca]);
        if with_cert {
            command.args(["--cert", &cert, "--key", &key]);
        }
        command.arg(format!("{url}/v1/status")).output().unwrap()
    };
    let admitted = curl(true);
    assert!(admitted.status.success(), "{}", text(&admitted.stderr));
    assert!(text(&admitted.stdout).contains("\"desired_instances\":2"));
    let turned_away = curl(false);
    assert!(
        !turned_away.status.success(),
        "{}",
        text(&turned_away.stdout)
    );
    // Plain HTTP on the TLS port is not an answer either.
    let plain = tcp_request(addr, "GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(!plain.contains("desired_instances"), "{plain}");

    let actors: Vec<String> = phoenix
        .events("api.call")
        .iter()
        .map(|e| e["detail"]["actor"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(actors.len(), 1, "{actors:?}");
    assert!(actors[0].starts_with("certificate sha256:"), "{actors:?}");
    assert_eq!(actors[0].len(), "certificate sha256:".len() + 64);
}
