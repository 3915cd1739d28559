//! Serf's RPC protocol (IPC version 1): msgpack maps over TCP, a `{Command, Seq}` header then
//! an optional body per request, a `{Seq, Error}` header then an optional body per response.
//! The stock `serf` CLI (`serf members`, `serf event`, `serf tags`, `serf keys`, …) talks to a
//! Phoenix agent through it unchanged.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

mod client;
mod filters;
pub mod logbook;
mod messages;

pub use client::Client;
pub use filters::{EventFilter, MemberFilter, member_event_parts};
pub use logbook::LogBook;
use messages::MAX_REQUEST;
pub use messages::*;

use crate::GossipError;
use crate::agent::{Agent, Event, KeyOp, Status};
use crate::keyring::Key;
use crate::query::{QueryHandle, QueryParams, QueryReply};

/// Serves the RPC protocol for `agent` on `listener` until the task is dropped.
/// What an RPC server knows beside its agent.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// The token clients must give (`auth`), if any.
    pub auth_key: Option<String>,
    /// The agent's log, for `monitor`.
    pub logs: LogBook,
    /// The event handlers as `info` lists them: Serf's `EVENT:NAME` to the script.
    pub event_handlers: BTreeMap<String, String>,
}

/// Serves Serf's RPC protocol for `agent` on `listener`, each client in a task of its own.
pub async fn serve(listener: TcpListener, agent: Agent, options: ServeOptions) {
    let options = std::sync::Arc::new(options);
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        let options = options.clone();
        tokio::spawn(async move {
            if let Err(error) = Session::new(agent, options).run(stream).await {
                tracing::debug!(%peer, %error, "RPC session ended");
            }
        });
    }
}

/// Encodes one msgpack map (Go's field names) onto `out`.
pub fn encode(out: &mut Vec<u8>, value: &impl Serialize) {
    // Writing a serializable struct into a Vec cannot fail.
    let _ = rmp_serde::encode::write_named(out, value);
}

/// Decodes one value from the start of `buf`: `Ok(None)` while it is incomplete.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, String> {
    let mut de = rmp_serde::Deserializer::new(Cursor::new(buf));
    match T::deserialize(&mut de) {
        Ok(value) => Ok(Some((value, de.get_ref().position() as usize))),
        Err(error) if is_eof(&error) => Ok(None),
        Err(error) => Err(error.to_string()),
    }
}

fn is_eof(error: &rmp_serde::decode::Error) -> bool {
    use rmp_serde::decode::Error;
    match error {
        Error::InvalidMarkerRead(e) | Error::InvalidDataRead(e) => {
            e.kind() == std::io::ErrorKind::UnexpectedEof
        }
        _ => false,
    }
}

/// Commands whose header is followed by a body.
fn has_body(command: &str) -> bool {
    matches!(
        command,
        "handshake"
            | "auth"
            | "event"
            | "force-leave"
            | "join"
            | "members-filtered"
            | "tags"
            | "stream"
            | "monitor"
            | "stop"
            | "install-key"
            | "use-key"
            | "remove-key"
            | "query"
            | "respond"
            | "get-coordinate"
    )
}

struct Session {
    agent: Agent,
    options: std::sync::Arc<ServeOptions>,
    handshaken: bool,
    authenticated: bool,
    /// Open streams, monitors and queries by the `Seq` that started them.
    streams: HashMap<u64, tokio::task::JoinHandle<()>>,
    /// The `Seq` of this client's monitor: one at a time, as in Serf.
    monitor: Option<u64>,
    /// The command just run sent its own response header (it goes on streaming records).
    replied: bool,
    /// The connection ends after this answer (an unknown command, as in Serf).
    close: bool,
}

impl Session {
    fn new(agent: Agent, options: std::sync::Arc<ServeOptions>) -> Self {
        let authenticated = options.auth_key.is_none();
        Session {
            agent,
            options,
            handshaken: false,
            authenticated,
            streams: HashMap::new(),
            monitor: None,
            replied: false,
            close: false,
        }
    }

    async fn run(mut self, stream: TcpStream) -> Result<(), String> {
        let (mut reader, mut writer) = stream.into_split();
        let (out, mut outbox) = mpsc::unbounded_channel::<Vec<u8>>();
        let writer_task = tokio::spawn(async move {
            while let Some(frame) = outbox.recv().await {
                if writer.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
        let mut buf = Vec::new();
        let result = loop {
            let request = match self.next_request(&buf) {
                Ok(Some((header, body, used))) => {
                    buf.drain(..used);
                    (header, body)
                }
                Ok(None) => {
                    if buf.len() > MAX_REQUEST {
                        break Err("request too large".to_string());
                    }
                    let mut chunk = [0u8; 4096];
                    match reader.read(&mut chunk).await {
                        Ok(0) | Err(_) => break Ok(()),
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    continue;
                }
                Err(error) => break Err(error),
            };
            let (header, body) = request;
            let leave = header.command == "leave";
            self.handle(header, &body, &out).await;
            if leave || self.close {
                break Ok(());
            }
        };
        for (_, stream) in self.streams.drain() {
            stream.abort();
        }
        drop(out);
        let _ = writer_task.await;
        result
    }

    /// A whole request at the start of `buf`: header, raw body, bytes used.
    fn next_request(&self, buf: &[u8]) -> Result<Option<(RequestHeader, Vec<u8>, usize)>, String> {
        let Some((header, used)) = decode::<RequestHeader>(buf)? else {
            return Ok(None);
        };
        if !has_body(&header.command) {
            return Ok(Some((header, Vec::new(), used)));
        }
        // The body is decoded as an untyped value first only to find where it ends.
        let Some((_, body_len)) = decode::<rmpv_skip::Any>(&buf[used..])? else {
            return Ok(None);
        };
        let body = buf[used..used + body_len].to_vec();
        Ok(Some((header, body, used + body_len)))
    }

    async fn handle(
        &mut self,
        header: RequestHeader,
        body: &[u8],
        out: &mpsc::UnboundedSender<Vec<u8>>,
    ) {
        let seq = header.seq;
        let reply = |error: String, body: Option<Vec<u8>>| {
            let _ = out.send(response(seq, error, body.as_deref()));
        };
        if header.command != "handshake" && !self.handshaken {
            return reply("Handshake required".into(), None);
        }
        if !matches!(header.command.as_str(), "handshake" | "auth") && !self.authenticated {
            return reply("Authentication required".into(), None);
        }
        let result = self.dispatch(&header.command, seq, body, out).await;
        if std::mem::take(&mut self.replied) {
            return;
        }
        match result {
            Ok(body) => reply(String::new(), body),
            // Serf's clients read a body after the header of these commands, error or not.
            Err(failure) => reply(
                failure.error,
                failure.body.or_else(|| empty_body(&header.command)),
            ),
        }
    }

    /// Answers `seq` now: the records that follow must come after this header.
    fn reply_now(&mut self, seq: u64, out: &mpsc::UnboundedSender<Vec<u8>>) {
        let _ = out.send(response(seq, String::new(), None));
        self.replied = true;
    }

    /// Streams events as responses to `seq` (what `record` makes of each), until `stop`.
    fn forward_events(
        &mut self,
        seq: u64,
        out: &mpsc::UnboundedSender<Vec<u8>>,
        record: impl Fn(&Event) -> Option<Vec<u8>> + Send + 'static,
    ) {
        let mut events = self.agent.subscribe();
        self.reply_now(seq, out);
        let out = out.clone();
        let task = tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                if let Some(record) = record(&event)
                    && out
                        .send(response(seq, String::new(), Some(&record)))
                        .is_err()
                {
                    break;
                }
            }
        });
        self.streams.insert(seq, task);
    }

    /// Streams the agent's log at `level` and above as records answering `seq`: the lines
    /// kept, then the live ones, until `stop`.
    fn follow_log(
        &mut self,
        seq: u64,
        out: &mpsc::UnboundedSender<Vec<u8>>,
        level: tracing::Level,
    ) {
        let (backlog, mut live) = self.options.logs.follow();
        self.reply_now(seq, out);
        let out = out.clone();
        let send = move |line: &logbook::LogLine| -> bool {
            if line.level > level {
                return true;
            }
            let record = encoded(&LogRecord {
                log: line.text.to_string(),
            });
            out.send(response(seq, String::new(), record.as_deref()))
                .is_ok()
        };
        let task = tokio::spawn(async move {
            if !backlog.iter().all(&send) {
                return;
            }
            loop {
                match live.recv().await {
                    Ok(line) if !send(&line) => return,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
            }
        });
        self.streams.insert(seq, task);
    }

    /// Streams a query's acks and responses as records answering `seq`, then `done`.
    fn forward_replies(
        &mut self,
        seq: u64,
        out: &mpsc::UnboundedSender<Vec<u8>>,
        mut handle: QueryHandle,
    ) {
        self.reply_now(seq, out);
        let out = out.clone();
        let task = tokio::spawn(async move {
            let record = |kind: &str, from: String, payload: Vec<u8>| {
                let record = QueryRecord {
                    kind: kind.into(),
                    from,
                    payload,
                };
                response(seq, String::new(), encoded(&record).as_deref())
            };
            while let Some(reply) = handle.next().await {
                let frame = match reply {
                    QueryReply::Ack(from) => record("ack", from, Vec::new()),
                    QueryReply::Response(from, payload) => record("response", from, payload),
                };
                if out.send(frame).is_err() {
                    return;
                }
            }
            let _ = out.send(record("done", String::new(), Vec::new()));
        });
        self.streams.insert(seq, task);
    }

    /// Runs one command: `Ok(Some(body))` for commands that answer with a body.
    async fn dispatch(
        &mut self,
        command: &str,
        seq: u64,
        body: &[u8],
        out: &mpsc::UnboundedSender<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>, Failure> {
        let agent = &self.agent;
        match command {
            "handshake" => {
                let request: HandshakeRequest = body_of(body)?;
                if self.handshaken {
                    return Err("Handshake already performed".into());
                }
                if request.version != 1 {
                    return Err("Unsupported IPC version".into());
                }
                self.handshaken = true;
                Ok(None)
            }
            "auth" => {
                let request: AuthRequest = body_of(body)?;
                // Constant time: how long the answer takes says nothing of how close a guess was.
                let matches = |key: &str| {
                    use subtle::ConstantTimeEq;
                    key.len() == request.auth_key.len()
                        && bool::from(key.as_bytes().ct_eq(request.auth_key.as_bytes()))
                };
                if self
                    .options
                    .auth_key
                    .as_deref()
                    .is_some_and(|k| !matches(k))
                {
                    return Err("Invalid authentication token".into());
                }
                self.authenticated = true;
                Ok(None)
            }
            "members" => {
                let members = agent.members().await.map_err(|e| e.to_string())?;
                let members = members.iter().map(RpcMember::from).collect();
                Ok(encoded(&MembersResponse { members }))
            }
            "members-filtered" => {
                let request: MembersFilteredRequest = body_of(body)?;
                let members = agent.members().await.map_err(|e| e.to_string())?;
                let filter = MemberFilter::new(&request.tags, &request.status, &request.name)?;
                let members = members
                    .iter()
                    .filter(|m| filter.matches(m))
                    .map(RpcMember::from)
                    .collect();
                Ok(encoded(&MembersResponse { members }))
            }
            "join" => {
                let request: JoinRequest = body_of(body)?;
                let mut num = 0;
                for address in &request.existing {
                    let addr = resolve(address)?;
                    if agent
                        .join(addr, Duration::from_secs(5))
                        .await
                        .map_err(|e| e.to_string())?
                    {
                        num += 1;
                        if request.replay {
                            agent.replay_from(addr).await.map_err(|e| e.to_string())?;
                        }
                    }
                }
                if num == 0 && !request.existing.is_empty() {
                    return Err(
                        format!("no member answered at {}", request.existing.join(", ")).into(),
                    );
                }
                Ok(encoded(&JoinResponse { num }))
            }
            "leave" => {
                agent.leave().await.map_err(|e| e.to_string())?;
                Ok(None)
            }
            "force-leave" => {
                let request: ForceLeaveRequest = body_of(body)?;
                agent
                    .force_leave(&request.node, request.prune)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(None)
            }
            "query" => {
                let request: QueryRequest = body_of(body)?;
                let params = QueryParams {
                    name: request.name,
                    payload: request.payload,
                    filter_nodes: request.filter_nodes,
                    filter_tags: request.filter_tags,
                    ack: request.request_ack,
                    relay_factor: request.relay_factor,
                    timeout: u64::try_from(request.timeout)
                        .ok()
                        .filter(|&nanos| nanos > 0)
                        .map(Duration::from_nanos),
                };
                let handle = agent.query(params).await.map_err(|e| e.to_string())?;
                self.forward_replies(seq, out, handle);
                Ok(None)
            }
            "respond" => {
                let request: RespondRequest = body_of(body)?;
                agent
                    .respond(request.id, request.payload)
                    .await
                    .map_err(|e| match e {
                        GossipError::UnknownQuery(_) => "No pending queries matching ID".into(),
                        other => other.to_string(),
                    })?;
                Ok(None)
            }
            "event" => {
                let request: EventRequest = body_of(body)?;
                agent
                    .event(&request.name, &request.payload, request.coalesce)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(None)
            }
            "tags" => {
                let request: TagsRequest = body_of(body)?;
                let me = agent
                    .members()
                    .await
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .find(|m| m.name == agent.name())
                    .ok_or("this agent is not in its own member list")?;
                let mut tags = me.tags;
                tags.extend(request.tags);
                for name in &request.delete_tags {
                    tags.remove(name);
                }
                agent.set_tags(tags).await.map_err(|e| e.to_string())?;
                Ok(None)
            }
            "install-key" | "use-key" | "remove-key" | "list-keys" => {
                let key = if command == "list-keys" {
                    None
                } else {
                    let request: KeyRequest = body_of(body)?;
                    Some(Key::from_base64(&request.key).map_err(|e| e.to_string())?)
                };
                let op = match (command, key) {
                    ("install-key", Some(key)) => KeyOp::Install(key),
                    ("use-key", Some(key)) => KeyOp::Use(key),
                    ("remove-key", Some(key)) => KeyOp::Remove(key),
                    _ => KeyOp::List,
                };
                let report = agent
                    .change_keys_everywhere(op)
                    .await
                    .map_err(|e| e.to_string())?;
                let answer = KeyResponse {
                    messages: report
                        .errors()
                        .map(|(node, error)| (node.clone(), error.clone()))
                        .collect(),
                    keys: report
                        .key_counts()
                        .into_iter()
                        .map(|(key, count)| (key, count as i32))
                        .collect(),
                    num_nodes: report.members as i32,
                    num_err: report.errors().count() as i32,
                    num_resp: report.answers.len() as i32,
                };
                if answer.num_err > 0 {
                    // Serf's clients print the body's messages after this error.
                    return Err(Failure {
                        error: format!(
                            "{}/{} nodes reported failure",
                            answer.num_err, answer.num_nodes
                        ),
                        body: encoded(&answer),
                    });
                }
                Ok(encoded(&answer))
            }
            "stream" => {
                let request: StreamRequest = body_of(body)?;
                let filter = EventFilter::parse(&request.kind)?;
                self.forward_events(seq, out, move |event| filter.record(event));
                Ok(None)
            }
            "monitor" => {
                let request: MonitorRequest = body_of(body)?;
                let level = logbook::monitor_level(&request.log_level)?;
                if self.monitor.is_some() {
                    return Err("Monitor already exists".into());
                }
                self.monitor = Some(seq);
                self.follow_log(seq, out, level);
                Ok(None)
            }
            "stop" => {
                let request: StopRequest = body_of(body)?;
                if self.monitor == Some(request.stop) {
                    self.monitor = None;
                }
                if let Some(task) = self.streams.remove(&request.stop) {
                    task.abort();
                }
                Ok(None)
            }
            "stats" => {
                let stats = agent.stats();
                let load = |c: &std::sync::atomic::AtomicU64| {
                    c.load(std::sync::atomic::Ordering::Relaxed).to_string()
                };
                let members = agent.members().await.map_err(|e| e.to_string())?;
                let count =
                    |s: Status| members.iter().filter(|m| m.status == s).count().to_string();
                let section = |pairs: &[(&str, String)]| -> BTreeMap<String, String> {
                    pairs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.clone()))
                        .collect()
                };
                let me = members.iter().find(|m| m.name == agent.name());
                let mut all: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
                all.insert(
                    "agent".into(),
                    section(&[("name", agent.name().to_string())]),
                );
                all.insert(
                    "serf".into(),
                    section(&[
                        ("members", members.len().to_string()),
                        ("failed", count(Status::Failed)),
                        ("left", count(Status::Left)),
                        ("member_time", load(&stats.member_time)),
                        ("event_time", load(&stats.event_time)),
                        ("query_time", load(&stats.query_time)),
                        ("intent_queue", load(&stats.intent_queue)),
                        ("event_queue", load(&stats.event_queue)),
                        // Queries share the user events' queue; it is counted there.
                        ("query_queue", "0".into()),
                        ("packets_received", load(&stats.packets_received)),
                        ("packets_sent", load(&stats.packets_sent)),
                        ("packets_dropped", load(&stats.packets_dropped)),
                        ("health_score", load(&stats.health_score)),
                        ("coordinate_resets", load(&stats.coordinate_resets)),
                        (
                            "encrypted",
                            agent.keys(KeyOp::List).await.is_ok().to_string(),
                        ),
                    ]),
                );
                all.insert(
                    "tags".into(),
                    me.map(|m| m.tags.clone()).unwrap_or_default(),
                );
                all.insert("event_handlers".into(), self.options.event_handlers.clone());
                all.insert("runtime".into(), runtime_stats());
                Ok(encoded(&all))
            }
            // An unknown coordinate is `Ok: false` with a body: `serf rtt` reads the body,
            // error or not, and says it could not find a coordinate.
            "get-coordinate" => {
                let request: CoordinateRequest = body_of(body)?;
                let known = agent
                    .coordinate(&request.node)
                    .await
                    .map_err(|e| e.to_string())?;
                let response = match known {
                    Some(coord) => CoordinateResponse {
                        coord: Coordinate {
                            vec: coord.vec.to_vec(),
                            error: coord.error,
                            adjustment: coord.adjustment,
                            height: coord.height,
                        },
                        ok: true,
                    },
                    None => CoordinateResponse::default(),
                };
                Ok(encoded(&response))
            }
            // Serf answers an unknown command and closes the connection: a client waiting for
            // a body it will never get is released.
            _ => {
                self.close = true;
                Err("Unsupported command".into())
            }
        }
    }
}

/// Serf's `runtime` section, in Go's words where they apply: the operating system and
/// architecture as Go names them, the version, the threads the runtime may use
/// (`max_procs`), its live tasks (`goroutines`) and the CPUs.
fn runtime_stats() -> BTreeMap<String, String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (threads, tasks) = match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            let metrics = handle.metrics();
            (metrics.num_workers(), metrics.num_alive_tasks())
        }
        Err(_) => (cpus, 0),
    };
    BTreeMap::from([
        ("os".into(), std::env::consts::OS.into()),
        ("arch".into(), arch.into()),
        (
            "version".into(),
            format!("phoenix {}", env!("CARGO_PKG_VERSION")),
        ),
        ("max_procs".into(), threads.to_string()),
        ("goroutines".into(), tasks.to_string()),
        ("cpu_count".into(), cpus.to_string()),
    ])
}

/// Type erasure for encoding bodies of different types through one closure.
pub mod erased {
    pub trait Encode {
        fn encode_into(&self, out: &mut Vec<u8>);
    }

    impl<T: serde::Serialize> Encode for T {
        fn encode_into(&self, out: &mut Vec<u8>) {
            super::encode(out, self);
        }
    }
}

/// Skips one msgpack value of any shape (to find where a body ends).
mod rmpv_skip {
    use serde::de::{Deserialize, Deserializer, IgnoredAny};

    pub struct Any;

    impl<'de> Deserialize<'de> for Any {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            IgnoredAny::deserialize(deserializer).map(|_| Any)
        }
    }
}

/// Why a command failed, and the body to send after the error when there is one.
struct Failure {
    error: String,
    body: Option<Vec<u8>>,
}

impl From<String> for Failure {
    fn from(error: String) -> Self {
        Failure { error, body: None }
    }
}

impl From<&str> for Failure {
    fn from(error: &str) -> Self {
        error.to_string().into()
    }
}

/// The empty response body of commands that always answer with one.
fn empty_body(command: &str) -> Option<Vec<u8>> {
    match command {
        "members" | "members-filtered" => encoded(&MembersResponse::default()),
        "join" => encoded(&JoinResponse::default()),
        "install-key" | "use-key" | "remove-key" | "list-keys" => encoded(&KeyResponse::default()),
        "stats" => encoded(&BTreeMap::<String, String>::new()),
        _ => None,
    }
}

/// A response body: one encoded value.
fn encoded(value: &impl Serialize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    encode(&mut out, value);
    Some(out)
}

/// A response frame: its header, then its body if any.
fn response(seq: u64, error: String, body: Option<&[u8]>) -> Vec<u8> {
    let mut frame = Vec::new();
    encode(&mut frame, &ResponseHeader { seq, error });
    frame.extend_from_slice(body.unwrap_or_default());
    frame
}

fn body_of<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    decode::<T>(body)?
        .map(|(value, _)| value)
        .ok_or_else(|| "truncated request body".to_string())
}

/// An agent address: `host:port`, a bare IP (IPv6 too) or host on Serf's default port 7946.
pub fn resolve(address: &str) -> Result<SocketAddr, String> {
    crate::address::socket_address(address, crate::address::DEFAULT_PORT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_decode_only_when_complete() {
        let mut buf = Vec::new();
        encode(
            &mut buf,
            &RequestHeader {
                command: "event".into(),
                seq: 7,
            },
        );
        let header_len = buf.len();
        encode(
            &mut buf,
            &EventRequest {
                name: "deploy".into(),
                payload: b"v2".to_vec(),
                coalesce: true,
            },
        );
        for cut in 0..header_len {
            assert!(
                decode::<RequestHeader>(&buf[..cut]).unwrap().is_none(),
                "cut {cut}"
            );
        }
        let (header, used) = decode::<RequestHeader>(&buf).unwrap().unwrap();
        assert_eq!(
            (header.command.as_str(), header.seq, used),
            ("event", 7, header_len)
        );
        let (event, _) = decode::<EventRequest>(&buf[used..]).unwrap().unwrap();
        assert_eq!(
            (event.name.as_str(), &event.payload[..], event.coalesce),
            ("deploy", &b"v2"[..], true)
        );
        assert!(
            decode::<RequestHeader>(&[0xc1]).is_err(),
            "0xc1 is never valid msgpack"
        );
    }

    #[test]
    fn filters_follow_serf() {
        let filter = EventFilter::parse("member-join,user:deploy").unwrap();
        assert!(filter.allows("member-join", None));
        assert!(filter.allows("user", Some("deploy")));
        assert!(!filter.allows("user", Some("other")));
        assert!(!filter.allows("member-failed", None));
        assert!(EventFilter::parse("*").unwrap().allows("query", Some("x")));
        assert!(EventFilter::parse("bogus").is_err());
    }
}
