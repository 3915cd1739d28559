//! Test doubles of what Phoenix talks to: a webhook receiver on loopback.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, String>,
    pub body: String,
    /// The status it was answered with.
    pub status: u16,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    /// Statuses to answer with, in turn; 200 once they are spent.
    answers: VecDeque<u16>,
}

/// An HTTP/1.1 server on 127.0.0.1 that records every request and answers each with the next
/// programmed status (200 by default).
#[derive(Clone)]
pub struct WebhookReceiver {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl WebhookReceiver {
    pub fn start() -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let receiver = WebhookReceiver {
            addr: listener.local_addr().expect("its address"),
            state: Arc::default(),
        };
        let state = receiver.state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = state.clone();
                std::thread::spawn(move || serve(stream, &state));
            }
        });
        receiver
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next requests are answered with `statuses`, in turn.
    pub fn answer(&self, statuses: &[u16]) {
        self.lock().answers.extend(statuses);
    }

    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    /// Waits up to 10 s for `count` requests; what was received.
    pub fn wait_for(&self, count: usize) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let received = self.received();
            if received.len() >= count || Instant::now() > deadline {
                return received;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split(' ').nth(1).unwrap_or_default().to_string();
        let mut headers = BTreeMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
            }
        }
        let length = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0usize);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let status = {
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            let status = state.answers.pop_front().unwrap_or(200);
            state.received.push(Received {
                path,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
                status,
            });
            status
        };
        let answer = format!("HTTP/1.1 {status} Status\r\ncontent-length: 0\r\n\r\n");
        if (&stream).write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}
