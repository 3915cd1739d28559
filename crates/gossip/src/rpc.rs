//! Serf's RPC protocol (IPC version 1): msgpack maps over TCP, a `{Command, Seq}` header then
//! an optional body per request, a `{Seq, Error}` header then an optional body per response.
//! The stock `serf` CLI (`serf members`, `serf event`, `serf tags`, `serf keys`, …) talks to a
//! Phoenix agent through it unchanged.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::GossipError;
use crate::agent::{Agent, Event, KeyOp, Member, Status};
use crate::filter::{glob, tags_match};
use crate::keyring::Key;
use crate::query::{QueryHandle, QueryParams, QueryReply};

/// Protocol versions this agent reports, as Serf 0.8 does (memberlist 2, Serf 2 to 5).
const PROTOCOL: [u8; 6] = [1, 5, 2, 2, 5, 4];
/// Largest request accepted (a body past this closes the connection).
const MAX_REQUEST: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestHeader {
    pub command: String,
    pub seq: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ResponseHeader {
    pub seq: u64,
    pub error: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HandshakeRequest {
    pub version: i32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AuthRequest {
    pub auth_key: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct EventRequest {
    pub name: String,
    #[serde(with = "nil_or_bytes")]
    pub payload: Vec<u8>,
    pub coalesce: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct JoinRequest {
    #[serde(deserialize_with = "nil_default")]
    pub existing: Vec<String>,
    pub replay: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct JoinResponse {
    pub num: i32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct MembersFilteredRequest {
    #[serde(deserialize_with = "nil_default")]
    pub tags: BTreeMap<String, String>,
    pub status: String,
    pub name: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct MembersResponse {
    #[serde(deserialize_with = "nil_default")]
    pub members: Vec<RpcMember>,
}

/// A member as Serf's RPC describes it.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RpcMember {
    pub name: String,
    #[serde(with = "nil_or_bytes")]
    pub addr: Vec<u8>,
    pub port: u16,
    #[serde(deserialize_with = "nil_default")]
    pub tags: BTreeMap<String, String>,
    pub status: String,
    pub protocol_min: u8,
    pub protocol_max: u8,
    pub protocol_cur: u8,
    pub delegate_min: u8,
    pub delegate_max: u8,
    pub delegate_cur: u8,
}

impl From<&Member> for RpcMember {
    fn from(member: &Member) -> Self {
        let addr = match member.addr.ip() {
            std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
            std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
        };
        let [
            protocol_min,
            protocol_max,
            protocol_cur,
            delegate_min,
            delegate_max,
            delegate_cur,
        ] = PROTOCOL;
        RpcMember {
            name: member.name.clone(),
            addr,
            port: member.addr.port(),
            tags: member.tags.clone(),
            status: member.status.as_str().to_string(),
            protocol_min,
            protocol_max,
            protocol_cur,
            delegate_min,
            delegate_max,
            delegate_cur,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct TagsRequest {
    #[serde(deserialize_with = "nil_default")]
    pub tags: BTreeMap<String, String>,
    #[serde(deserialize_with = "nil_default")]
    pub delete_tags: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct KeyRequest {
    pub key: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct KeyResponse {
    #[serde(deserialize_with = "nil_default")]
    pub messages: BTreeMap<String, String>,
    #[serde(deserialize_with = "nil_default")]
    pub keys: BTreeMap<String, i32>,
    pub num_nodes: i32,
    pub num_err: i32,
    pub num_resp: i32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct StreamRequest {
    #[serde(rename = "Type")]
    pub kind: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct MonitorRequest {
    pub log_level: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct StopRequest {
    pub stop: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ForceLeaveRequest {
    pub node: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UserEventRecord {
    pub event: String,
    #[serde(rename = "LTime")]
    pub ltime: u64,
    pub name: String,
    #[serde(with = "nil_or_bytes")]
    pub payload: Vec<u8>,
    pub coalesce: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct QueryEventRecord {
    pub event: String,
    /// The agent's handle on the query, for `respond`.
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(rename = "LTime")]
    pub ltime: u64,
    pub name: String,
    #[serde(with = "nil_or_bytes")]
    pub payload: Vec<u8>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct QueryRequest {
    #[serde(deserialize_with = "nil_default")]
    pub filter_nodes: Vec<String>,
    #[serde(deserialize_with = "nil_default")]
    pub filter_tags: BTreeMap<String, String>,
    pub request_ack: bool,
    pub relay_factor: u8,
    /// Nanoseconds, as Go's `time.Duration`; 0 for the agent's default.
    pub timeout: i64,
    pub name: String,
    #[serde(with = "nil_or_bytes")]
    pub payload: Vec<u8>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RespondRequest {
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(with = "nil_or_bytes")]
    pub payload: Vec<u8>,
}

/// One record of a running query: `ack`, `response`, then `done`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct QueryRecord {
    #[serde(rename = "Type")]
    pub kind: String,
    pub from: String,
    #[serde(with = "nil_or_bytes")]
    pub payload: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct MemberEventRecord {
    pub event: String,
    #[serde(deserialize_with = "nil_default")]
    pub members: Vec<RpcMember>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct LogRecord {
    pub log: String,
}

/// Serves the RPC protocol for `agent` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, agent: Agent, auth_key: Option<String>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        let auth_key = auth_key.clone();
        tokio::spawn(async move {
            if let Err(error) = Session::new(agent, auth_key).run(stream).await {
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
    auth_key: Option<String>,
    handshaken: bool,
    authenticated: bool,
    /// Open streams, monitors and queries by the `Seq` that started them.
    streams: HashMap<u64, tokio::task::JoinHandle<()>>,
    /// The command just run sent its own response header (it goes on streaming records).
    replied: bool,
}

impl Session {
    fn new(agent: Agent, auth_key: Option<String>) -> Self {
        let authenticated = auth_key.is_none();
        Session {
            agent,
            auth_key,
            handshaken: false,
            authenticated,
            streams: HashMap::new(),
            replied: false,
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
            let close = header.command == "leave";
            self.handle(header, &body, &out).await;
            if close {
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
            Err(error) => reply(error, empty_body(&header.command)),
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
    ) -> Result<Option<Vec<u8>>, String> {
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
                if self
                    .auth_key
                    .as_deref()
                    .is_some_and(|k| k != request.auth_key)
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
                let filter = MemberFilter::new(&request.tags, &request.status, &request.name);
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
                    }
                }
                if num == 0 && !request.existing.is_empty() {
                    return Err(format!(
                        "no member answered at {}",
                        request.existing.join(", ")
                    ));
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
                    .force_leave(&request.node)
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
                    let error = format!(
                        "{}/{} nodes reported failure",
                        answer.num_err, answer.num_nodes
                    );
                    let _ = out.send(response(seq, error, encoded(&answer).as_deref()));
                    self.replied = true;
                    return Ok(None);
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
                let _: MonitorRequest = body_of(body)?;
                self.forward_events(seq, out, |event| {
                    encoded(&LogRecord {
                        log: log_line(event),
                    })
                });
                Ok(None)
            }
            "stop" => {
                let request: StopRequest = body_of(body)?;
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
                        ("packets_received", load(&stats.packets_received)),
                        ("packets_sent", load(&stats.packets_sent)),
                        ("packets_dropped", load(&stats.packets_dropped)),
                        ("health_score", load(&stats.health_score)),
                        (
                            "encrypted",
                            agent.keys(KeyOp::List).await.is_ok().to_string(),
                        ),
                    ]),
                );
                Ok(encoded(&all))
            }
            other => Err(format!("Unsupported command: {other}")),
        }
    }
}

/// Go encodes an empty slice or map as nil.
fn nil_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Byte fields as Go encodes them: bin, or nil for an empty slice.
mod nil_or_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serde_bytes::serialize(bytes, serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        Ok(Option::<serde_bytes::ByteBuf>::deserialize(deserializer)?
            .map(serde_bytes::ByteBuf::into_vec)
            .unwrap_or_default())
    }
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

/// An agent address: `host:port`, or a host on Serf's default port 7946.
pub fn resolve(address: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let with_port = if address.contains(':') {
        address.to_string()
    } else {
        format!("{address}:7946")
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| format!("bad address {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("bad address {address}"))
}

/// `members-filtered`: tags and name are anchored regular expressions in Serf; here they
/// match whole values, with `*` as a wildcard (see [`crate::filter`]).
pub struct MemberFilter<'a> {
    tags: &'a BTreeMap<String, String>,
    status: &'a str,
    name: &'a str,
}

impl<'a> MemberFilter<'a> {
    pub fn new(tags: &'a BTreeMap<String, String>, status: &'a str, name: &'a str) -> Self {
        MemberFilter { tags, status, name }
    }

    pub fn matches(&self, member: &Member) -> bool {
        (self.status.is_empty() || glob(self.status, member.status.as_str()))
            && (self.name.is_empty() || glob(self.name, &member.name))
            && tags_match(self.tags, &member.tags)
    }
}

/// Serf's event filter: `*`, or a comma list of `member-join`, `member-leave`,
/// `member-failed`, `member-update`, `member-reap`, `user`, `user:NAME`, `query`, `query:NAME`.
#[derive(Debug, Clone)]
pub struct EventFilter(Vec<(String, Option<String>)>);

impl EventFilter {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut filters = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (kind, name) = match part.split_once(':') {
                Some((kind, name)) => (kind, Some(name.to_string())),
                None => (part, None),
            };
            let known = matches!(
                kind,
                "*" | "member-join"
                    | "member-leave"
                    | "member-failed"
                    | "member-update"
                    | "member-reap"
                    | "user"
                    | "query"
            );
            if !known {
                return Err(format!("Invalid event filter: {part}"));
            }
            filters.push((kind.to_string(), name));
        }
        if filters.is_empty() {
            filters.push(("*".into(), None));
        }
        Ok(EventFilter(filters))
    }

    pub fn allows(&self, kind: &str, name: Option<&str>) -> bool {
        self.0
            .iter()
            .any(|(k, n)| k == "*" || (k == kind && (n.is_none() || n.as_deref() == name)))
    }

    /// The stream record of `event`, when the filter lets it through.
    fn record(&self, event: &Event) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        match event {
            Event::User(user) => {
                if !self.allows("user", Some(&user.name)) {
                    return None;
                }
                encode(
                    &mut out,
                    &UserEventRecord {
                        event: "user".into(),
                        ltime: user.ltime,
                        name: user.name.clone(),
                        payload: user.payload.clone(),
                        coalesce: user.coalesce,
                    },
                );
            }
            Event::Query(query) => {
                if !self.allows("query", Some(&query.name)) {
                    return None;
                }
                encode(
                    &mut out,
                    &QueryEventRecord {
                        event: "query".into(),
                        id: query.id,
                        ltime: query.ltime,
                        name: query.name.clone(),
                        payload: query.payload.clone(),
                    },
                );
            }
            member_event => {
                let (kind, member) = member_event_parts(member_event)?;
                if !self.allows(kind, None) {
                    return None;
                }
                encode(
                    &mut out,
                    &MemberEventRecord {
                        event: kind.into(),
                        members: vec![RpcMember::from(member)],
                    },
                );
            }
        }
        Some(out)
    }
}

/// Serf's name for a member event, and its member.
pub fn member_event_parts(event: &Event) -> Option<(&'static str, &Member)> {
    Some(match event {
        Event::MemberJoin(m) => ("member-join", m),
        Event::MemberLeave(m) => ("member-leave", m),
        Event::MemberFailed(m) => ("member-failed", m),
        Event::MemberUpdate(m) => ("member-update", m),
        Event::MemberReap(m) => ("member-reap", m),
        Event::User(_) | Event::Query(_) => return None,
    })
}

/// One line for `monitor`.
fn log_line(event: &Event) -> String {
    match event {
        Event::User(user) => format!(
            "[INFO] phoenix: received user event: {} (ltime {})",
            user.name, user.ltime
        ),
        Event::Query(query) => format!(
            "[INFO] phoenix: received query: {} from {} (ltime {})",
            query.name, query.origin, query.ltime
        ),
        other => match member_event_parts(other) {
            Some((kind, member)) => {
                format!("[INFO] phoenix: {kind}: {} {}", member.name, member.addr)
            }
            None => String::new(),
        },
    }
}

/// A client of the RPC protocol (Phoenix's own CLI uses it, as `serf` does).
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    seq: u64,
}

impl Client {
    /// Connects, handshakes and, with a key, authenticates.
    pub async fn connect(addr: SocketAddr, auth_key: Option<&str>) -> Result<Client, String> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| format!("no answer from the agent's RPC at {addr} within 10 s"))?
            .map_err(|e| format!("cannot reach the agent's RPC at {addr}: {e}"))?;
        let mut client = Client {
            stream,
            buf: Vec::new(),
            seq: 0,
        };
        client
            .call::<()>("handshake", Some(&HandshakeRequest { version: 1 }))
            .await?;
        if let Some(key) = auth_key {
            let auth = AuthRequest {
                auth_key: key.to_string(),
            };
            client.call::<()>("auth", Some(&auth)).await?;
        }
        Ok(client)
    }

    /// Sends a command and waits for its response header; `T` is its body (`()` for none).
    pub async fn call<T: DeserializeOwned + 'static>(
        &mut self,
        command: &str,
        body: Option<&dyn erased::Encode>,
    ) -> Result<T, String> {
        let seq = self.send(command, body).await?;
        let header: ResponseHeader = self.read().await?;
        if header.seq != seq {
            return Err(format!("response {} to request {seq}", header.seq));
        }
        if !header.error.is_empty() {
            return Err(header.error);
        }
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<()>() {
            // No body follows: `()` decodes from msgpack's nil.
            return decode::<T>(&[0xc0])?
                .map(|(unit, _)| unit)
                .ok_or_else(|| "empty response".to_string());
        }
        self.read().await
    }

    /// Sends a request; returns its `Seq`.
    pub async fn send(
        &mut self,
        command: &str,
        body: Option<&dyn erased::Encode>,
    ) -> Result<u64, String> {
        let seq = self.seq;
        self.seq += 1;
        let mut frame = Vec::new();
        encode(
            &mut frame,
            &RequestHeader {
                command: command.into(),
                seq,
            },
        );
        if let Some(body) = body {
            body.encode_into(&mut frame);
        }
        self.stream
            .write_all(&frame)
            .await
            .map_err(|e| format!("RPC write: {e}"))?;
        Ok(seq)
    }

    /// Reads the next value from the connection.
    pub async fn read<T: DeserializeOwned>(&mut self) -> Result<T, String> {
        loop {
            if let Some((value, used)) = decode::<T>(&self.buf)? {
                self.buf.drain(..used);
                return Ok(value);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk).await {
                Ok(0) => return Err("the agent closed the RPC connection".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("RPC read: {e}")),
            }
        }
    }
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
