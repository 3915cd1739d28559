//! The web dashboard in Debian's Chromium (headless, driven over the DevTools protocol on a
//! pipe): the login URL `phoenix dashboard` prints becomes a session, the page shows the role
//! and follows a deploy live (server-sent events, no reload) to the new generation, graphs and
//! the log tail load, the keyboard reaches the controls, and a narrow window does not scroll
//! sideways. Screenshots go to `target/artifacts/` (or `$PHOENIX_ARTIFACTS`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use serde_json::{Value, json};

fn chromium_path() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A headless Chromium and one page, spoken to over `--remote-debugging-pipe` (fd 3 in,
/// fd 4 out, NUL-terminated JSON).
struct Browser {
    child: Child,
    to: std::fs::File,
    from: mpsc::Receiver<Value>,
    next_id: u64,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let (their_in, our_out) = std::io::pipe().unwrap();
        let (our_in, their_out) = std::io::pipe().unwrap();
        let (their_in, their_out) = (OwnedFd::from(their_in), OwnedFd::from(their_out));
        let (read_fd, write_fd) = (their_in.as_raw_fd(), their_out.as_raw_fd());
        let mut command = Command::new(chromium_path().expect("chromium (Debian's chromium)"));
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--hide-scrollbars",
                "--mute-audio",
                "--remote-debugging-pipe",
                "--window-size=1280,1100",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only fcntl and dup2, which are async-signal-safe, between fork and exec.
        // Both ends move above 4 first, so that neither is overwritten by the other's dup2
        // (and an end already at 3 or 4 loses its close-on-exec flag, as dup2 does).
        unsafe {
            command.pre_exec(move || {
                let high_read = libc::fcntl(read_fd, libc::F_DUPFD, 10);
                let high_write = libc::fcntl(write_fd, libc::F_DUPFD, 10);
                if high_read < 0
                    || high_write < 0
                    || libc::dup2(high_read, 3) < 0
                    || libc::dup2(high_write, 4) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        drop((their_in, their_out));
        let (tx, from) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(our_in);
            loop {
                let mut message = Vec::new();
                match reader.read_until(0, &mut message) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                message.pop();
                if let Ok(value) = serde_json::from_slice::<Value>(&message)
                    && tx.send(value).is_err()
                {
                    return;
                }
            }
        });
        let mut browser = Browser {
            child,
            to: std::fs::File::from(OwnedFd::from(our_out)),
            from,
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = browser.call("Target.createTarget", json!({ "url": url }));
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = browser.call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        browser
    }

    /// Sends a command (to the page once attached) and waits for its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = self
                .from
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no answer from chromium to {method}"));
            if answer["id"] == id {
                if let Some(error) = answer.get("error") {
                    panic!("{method}: {error}");
                }
                return answer["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        result["result"]["value"].clone()
    }

    fn wait_until(&mut self, what: &str, expression: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.eval(expression) == json!(true) {
                return;
            }
            if Instant::now() > deadline {
                let body = self.eval("document.body ? document.body.innerText : ''");
                panic!(
                    "timed out waiting: {what}\npage:\n{}",
                    body.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A key pressed and released; `text` is what it types (Enter's "\r" activates a button).
    fn key(&mut self, key: &str, code: &str, key_code: u32, text: Option<&str>) {
        let down = if text.is_some() {
            "keyDown"
        } else {
            "rawKeyDown"
        };
        for kind in [down, "keyUp"] {
            let mut event = json!({
                "type": kind, "key": key, "code": code, "windowsVirtualKeyCode": key_code,
            });
            if let Some(text) = text.filter(|_| kind == "keyDown") {
                event["text"] = json!(text);
            }
            self.call("Input.dispatchKeyEvent", event);
        }
    }

    fn screenshot(&mut self, name: &str) -> PathBuf {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let dir = std::env::var_os("PHOENIX_ARTIFACTS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/artifacts")
            });
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One GET to the dashboard at `base` (`http://ADDR`), with its Host; the whole answer.
fn get(base: &str, path: &str) -> String {
    get_with(base, path, "")
}

/// As [`get`], with more header lines (each ending in CRLF).
fn get_with(base: &str, path: &str, extra: &str) -> String {
    use std::io::Read;
    let addr = base.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let host = if extra.starts_with("Host:") {
        String::new()
    } else {
        format!("Host: {addr}\r\n")
    };
    let request = format!("GET {path} HTTP/1.1\r\n{host}Connection: close\r\n{extra}\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

const LIVE: &str = "document.querySelector('[data-role=\"web\"]')?.dataset.liveGeneration";

#[test]
fn the_dashboard_follows_a_deploy_live_in_chromium() {
    if chromium_path().is_none() && std::env::var_os("PHOENIX_REQUIRE_TOOLS").is_none() {
        eprintln!("skipped: no chromium (apt-get install chromium)");
        return;
    }
    let mut phoenix = Phoenix::start(&Fleet {
        instances: 2,
        ..Fleet::version("v1")
    });
    phoenix.wait_serving(2);
    let url = phoenix.cli_ok(&["dashboard"]).trim().to_string();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.contains("/login?token="),
        "{url}"
    );
    let base = url.split("/login").next().unwrap().to_string();

    // Without the login, nothing but the sign-in note.
    let refused = get(&base, "/api/state");
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");

    // Hostile requests: a forged cookie, a bad token, another site's page, DNS rebinding.
    let forged = get_with(&base, "/api/state", "Cookie: phoenix_session=00ff\r\n");
    assert!(forged.starts_with("HTTP/1.1 401"), "{forged}");
    let bad_login = get(&base, "/login?token=0123");
    assert!(bad_login.starts_with("HTTP/1.1 401"), "{bad_login}");
    let cross_site = get_with(&base, "/api/state", "Origin: http://evil.example\r\n");
    assert!(cross_site.starts_with("HTTP/1.1 403"), "{cross_site}");
    let rebound = get_with(&base, "/", "Host: evil.example\r\n");
    assert!(rebound.starts_with("HTTP/1.1 421"), "{rebound}");

    let mut browser = Browser::open(&url);
    browser.wait_until(
        "the page to show web's generation 1",
        &format!("{LIVE} === '1'"),
        Duration::from_secs(20),
    );
    // The token is gone from the address bar, and works no more.
    assert_eq!(browser.eval("location.href"), json!(format!("{base}/")));
    let again = get(&base, url.strip_prefix(&base).unwrap());
    assert!(again.starts_with("HTTP/1.1 401"), "{again}");
    // Signed in, a role name that is a path is still refused.
    assert_eq!(
        browser.eval("fetch('/api/logs/..%2F..%2Fetc').then(r => r.status)"),
        json!(400)
    );
    assert_eq!(
        browser.eval("fetch('/api/graph/web/bogus').then(r => r.status)"),
        json!(404)
    );
    // The session cookie is not readable by the page's script.
    assert_eq!(browser.eval("document.cookie"), json!(""));
    assert_eq!(
        browser.eval("document.querySelector('[data-role=\"web\"] .image').textContent"),
        json!("hello")
    );

    // A deploy, watched without reloading: a mark set now must survive. A slow request on the
    // old generation keeps the deploy draining for 4 s, so its middle can be seen.
    browser.eval("window.phoenixMark = 42");
    let proxy = phoenix.proxy_addr();
    let slow = std::thread::spawn(move || get_once(proxy, "/slow/4000"));
    std::thread::sleep(Duration::from_millis(300));
    phoenix.write_fleet(&Fleet {
        instances: 2,
        ..Fleet::version("v2")
    });
    let mut deploy = Command::new(phoenix_bin())
        .arg("--state")
        .arg(phoenix.state())
        .args(["deploy", "web"])
        .current_dir(phoenix.fleet_path().parent().unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    browser.wait_until(
        "the page to show the deploy under way",
        "document.querySelector('[data-role=\"web\"] .badge').textContent === 'deploying'",
        Duration::from_secs(30),
    );
    browser.wait_until(
        "the page to show generation 2 live while generation 1 drains",
        &format!(
            "{LIVE} === '2' && [...document.querySelectorAll('[data-role=\"web\"] p')].some(p => p.textContent === 'Generation 1 (draining)')"
        ),
        Duration::from_secs(60),
    );
    assert!(deploy.wait().unwrap().success());
    let answer = slow.join().unwrap();
    assert!(answer.contains("version v1"), "{answer}");
    assert_eq!(
        browser.eval("window.phoenixMark"),
        json!(42),
        "the page reloaded"
    );
    browser.wait_until(
        "both new instances healthy on the page",
        "[...document.querySelectorAll('[data-role=\"web\"] li[data-generation=\"2\"] .badge')].filter(b => b.textContent === 'healthy').length === 2",
        Duration::from_secs(30),
    );
    browser.wait_until(
        "the timeline to show the switch",
        "[...document.querySelectorAll('#timeline li')].some(li => li.dataset.kind.startsWith('deploy.'))",
        Duration::from_secs(10),
    );
    browser.wait_until(
        "the log tail to show the new version starting",
        "document.querySelector('#logs').innerText.includes('version v2 listening')",
        Duration::from_secs(20),
    );
    browser.wait_until(
        "the four graphs to load as images",
        "[...document.querySelectorAll('#graphs img')].filter(i => i.complete && i.naturalWidth > 0).length === 4",
        Duration::from_secs(20),
    );
    let wide = browser.screenshot("dashboard.png");

    // Keyboard: the first Tab lands on the skip link; Tabs reach the range buttons; Enter
    // presses one.
    browser.key("Tab", "Tab", 9, None);
    assert_eq!(
        browser.eval("document.activeElement.textContent"),
        json!("Skip to roles")
    );
    let mut reached = false;
    for _ in 0..12 {
        browser.key("Tab", "Tab", 9, None);
        if browser.eval("document.activeElement.dataset.range === '1d'") == json!(true) {
            reached = true;
            break;
        }
    }
    assert!(reached, "Tab never reached the Day button");
    browser.key("Enter", "Enter", 13, Some("\r"));
    browser.wait_until(
        "Enter to choose the day range",
        "document.querySelector('[data-range=\"1d\"]').getAttribute('aria-pressed') === 'true' && document.querySelector('#graphs img').src.includes('range=1d')",
        Duration::from_secs(5),
    );

    // A phone-sized window: no sideways scrolling.
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": 360, "height": 800, "deviceScaleFactor": 1, "mobile": true }),
    );
    browser.wait_until(
        "the page to fit 360 px",
        "document.documentElement.scrollWidth <= 360",
        Duration::from_secs(5),
    );
    let narrow = browser.screenshot("dashboard-narrow.png");
    eprintln!("screenshots: {} {}", wide.display(), narrow.display());
    phoenix.interrupt();
}
