//! Memberlist's wire format, as Debian's `serf agent` speaks it (the groundwork of
//! `protocol = "serf"`): the message types, the msgpack bodies (Go structs as maps keyed by
//! field name), packets with an optional label header, CRC and compound framing, LZW-compressed
//! messages, AES-GCM sealing with Serf's keyring, the TCP push-pull exchange with Serf's own
//! state inside it, and Serf's messages (user events, joins, leaves, queries) inside
//! memberlist's user messages.
//!
//! Everything here parses bytes from the network: every length is checked against what is
//! left, decompression stops at a bound, and compound messages do not nest.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::keyring::{Keyring, NONCE_LEN, TAG_LEN};

/// Memberlist's message types (its `net.go`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    Ping = 0,
    IndirectPing = 1,
    Ack = 2,
    Suspect = 3,
    Alive = 4,
    Dead = 5,
    PushPull = 6,
    Compound = 7,
    User = 8,
    Compress = 9,
    Encrypt = 10,
    Nack = 11,
    HasCrc = 12,
    Err = 13,
}

impl MessageType {
    fn from_byte(byte: u8) -> Result<MessageType, WireError> {
        use MessageType::*;
        const ALL: [MessageType; 14] = [
            Ping,
            IndirectPing,
            Ack,
            Suspect,
            Alive,
            Dead,
            PushPull,
            Compound,
            User,
            Compress,
            Encrypt,
            Nack,
            HasCrc,
            Err,
        ];
        ALL.get(usize::from(byte))
            .copied()
            .ok_or(WireError::UnknownType(byte))
    }
}

/// The first byte of a packet or stream that carries a label.
const HAS_LABEL: u8 = 244;
/// Serf's tag encoding starts with this byte (older agents sent the bare role).
const TAG_MAGIC: u8 = 255;
/// Memberlist's own bound on a push-pull's state.
pub const MAX_PUSH_STATE_BYTES: usize = 20 * 1024 * 1024;
/// Memberlist's bound on a decompressed message: user state plus as much again of nodes.
const MAX_DECOMPRESSED: usize = 2 * MAX_PUSH_STATE_BYTES;
/// Memberlist's bound on the nodes of one push-pull.
const MAX_PUSH_NODES: usize = 1024 * 1024;

/// Why bytes from a peer were refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("empty message")]
    Empty,
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("checksum mismatch: the packet says {expected:08x}, its bytes give {actual:08x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("compressed or compound messages nested deeper than memberlist sends them")]
    NestedCompound,
    #[error("unknown compression algorithm {0}")]
    Compression(u8),
    #[error("compressed message is corrupt")]
    Lzw,
    #[error("decompressed message is larger than {MAX_DECOMPRESSED} bytes")]
    TooLarge,
    #[error("an encrypted message, and no keyring to open it")]
    Encrypted,
    #[error("a plain message where the keyring requires encryption")]
    NotEncrypted,
    #[error("no installed key opens the message (or it was altered)")]
    Decrypt,
    #[error("unsupported encryption version {0}")]
    EncryptionVersion(u8),
    #[error("no random bytes for a nonce")]
    Random,
    #[error("{0} too long for memberlist's framing")]
    TooLong(&'static str),
    #[error("push-pull state too large: {nodes} nodes, {user_state} bytes of user state")]
    PushTooLarge { nodes: usize, user_state: usize },
    #[error("expected a {expected:?} message, got {got:?}")]
    Unexpected {
        expected: MessageType,
        got: MessageType,
    },
    #[error("bad msgpack body")]
    Decode(#[source] rmp_serde::decode::Error),
    #[error("cannot encode msgpack body")]
    Encode(#[source] rmp_serde::encode::Error),
    #[error("stream")]
    Io(#[source] std::io::Error),
}

/// A direct probe (`ping`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Ping {
    pub seq_no: u32,
    /// The node the sender means to reach (a restarted agent under another name says no).
    pub node: String,
    #[serde(with = "bytes_or_nil", skip_serializing_if = "Vec::is_empty")]
    pub source_addr: Vec<u8>,
    #[serde(skip_serializing_if = "is_zero")]
    pub source_port: u16,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source_node: String,
}

/// The answer to a ping; Serf puts its network coordinate in the payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Ack {
    pub seq_no: u32,
    #[serde(with = "bytes_or_nil")]
    pub payload: Vec<u8>,
}

/// A node announcing itself alive (also how a join is gossiped).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Alive {
    pub incarnation: u32,
    pub node: String,
    #[serde(with = "bytes_or_nil")]
    pub addr: Vec<u8>,
    pub port: u16,
    #[serde(with = "bytes_or_nil")]
    pub meta: Vec<u8>,
    /// Protocol versions: min, max, current of memberlist, then of the delegate (Serf).
    #[serde(with = "bytes_or_nil")]
    pub vsn: Vec<u8>,
}

/// A node suspected of failure, and who suspects it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Suspect {
    pub incarnation: u32,
    pub node: String,
    pub from: String,
}

/// A node declared dead; `from` equal to `node` is a graceful leave.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Dead {
    pub incarnation: u32,
    pub node: String,
    pub from: String,
}

/// A request to probe `target` on the sender's behalf (memberlist's indirect probe).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct IndirectPing {
    pub seq_no: u32,
    #[serde(with = "bytes_or_nil")]
    pub target: Vec<u8>,
    pub port: u16,
    pub node: String,
    /// The sender wants a nack when the target does not answer in time.
    pub nack: bool,
    #[serde(with = "bytes_or_nil", skip_serializing_if = "Vec::is_empty")]
    pub source_addr: Vec<u8>,
    #[serde(skip_serializing_if = "is_zero")]
    pub source_port: u16,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source_node: String,
}

impl IndirectPing {
    /// Where the answer goes, when the sender said.
    pub fn source(&self) -> Option<SocketAddr> {
        socket_address(&self.source_addr, self.source_port)
    }

    /// The node to probe.
    pub fn target(&self) -> Option<SocketAddr> {
        socket_address(&self.target, self.port)
    }
}

impl Ping {
    /// Where the answer goes, when the sender said.
    pub fn source(&self) -> Option<SocketAddr> {
        socket_address(&self.source_addr, self.source_port)
    }
}

impl Alive {
    /// The node's gossip address.
    pub fn address(&self) -> Option<SocketAddr> {
        socket_address(&self.addr, self.port)
    }
}

/// No answer from the target of an indirect probe.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Nack {
    pub seq_no: u32,
}

/// The state of a node as memberlist keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "u8", into = "u8")]
pub enum NodeState {
    #[default]
    Alive,
    Suspect,
    Dead,
    Left,
}

impl From<u8> for NodeState {
    fn from(value: u8) -> NodeState {
        match value {
            0 => NodeState::Alive,
            1 => NodeState::Suspect,
            3 => NodeState::Left,
            _ => NodeState::Dead,
        }
    }
}

impl From<NodeState> for u8 {
    fn from(state: NodeState) -> u8 {
        match state {
            NodeState::Alive => 0,
            NodeState::Suspect => 1,
            NodeState::Dead => 2,
            NodeState::Left => 3,
        }
    }
}

/// One node in a push-pull exchange.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct PushNodeState {
    pub name: String,
    #[serde(with = "bytes_or_nil")]
    pub addr: Vec<u8>,
    pub port: u16,
    #[serde(with = "bytes_or_nil")]
    pub meta: Vec<u8>,
    pub incarnation: u32,
    pub state: NodeState,
    #[serde(with = "bytes_or_nil")]
    pub vsn: Vec<u8>,
}

impl PushNodeState {
    /// The node's gossip address.
    pub fn address(&self) -> Option<SocketAddr> {
        socket_address(&self.addr, self.port)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct PushPullHeader {
    nodes: usize,
    user_state_len: usize,
    join: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Compress {
    algo: u8,
    #[serde(with = "bytes_or_nil")]
    buf: Vec<u8>,
}

/// Serf's part of a push-pull (its `messagePushPull`): its clocks and who left.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct SerfPushPull {
    #[serde(rename = "LTime")]
    pub ltime: u64,
    #[serde(rename = "StatusLTimes", deserialize_with = "nil_default")]
    pub status_ltimes: BTreeMap<String, u64>,
    #[serde(deserialize_with = "nil_default")]
    pub left_members: Vec<String>,
    #[serde(rename = "EventLTime")]
    pub event_ltime: u64,
    /// The user events the sender remembers, by Lamport time (Serf sends its whole event
    /// buffer, empty slots as nil).
    #[serde(deserialize_with = "nil_default")]
    pub events: Vec<Option<SerfUserEvents>>,
    #[serde(rename = "QueryLTime")]
    pub query_ltime: u64,
}

/// A push-pull exchange: the sender's nodes and its Serf state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PushPull {
    pub join: bool,
    pub nodes: Vec<PushNodeState>,
    /// Serf's state, when the user state is Serf's (it starts with its push-pull type).
    pub serf: Option<SerfPushPull>,
}

/// Serf's message type of its push-pull state (its `messagePushPullType`).
const SERF_PUSH_PULL: u8 = 2;

/// A message body with its type byte in front, as memberlist's `encode` writes it.
pub fn encode<T: Serialize>(kind: MessageType, body: &T) -> Result<Vec<u8>, WireError> {
    let mut out = vec![kind as u8];
    rmp_serde::encode::write_named(&mut out, body).map_err(WireError::Encode)?;
    Ok(out)
}

/// Decodes a message body (without its type byte).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    rmp_serde::from_slice(body).map_err(WireError::Decode)
}

/// Puts messages into one packet (a compound one when there are several), sealed with the
/// keyring's primary key when there is one, the label authenticated with it.
pub fn packet(
    messages: &[Vec<u8>],
    label: &str,
    keyring: Option<&Keyring>,
) -> Result<Vec<u8>, WireError> {
    let mut body = Vec::new();
    if let [single] = messages {
        body.extend_from_slice(single);
    } else {
        let count = u8::try_from(messages.len()).map_err(|_| WireError::TooLong("compound"))?;
        body.extend_from_slice(&[MessageType::Compound as u8, count]);
        for message in messages {
            let len =
                u16::try_from(message.len()).map_err(|_| WireError::TooLong("compound part"))?;
            body.extend_from_slice(&len.to_be_bytes());
        }
        for message in messages {
            body.extend_from_slice(message);
        }
    }
    let mut out = label_header(label)?;
    match keyring {
        Some(keyring) => out.extend(encrypt(keyring, &body, label.as_bytes())?),
        None => out.extend(body),
    }
    Ok(out)
}

fn label_header(label: &str) -> Result<Vec<u8>, WireError> {
    if label.is_empty() {
        return Ok(Vec::new());
    }
    let len = u8::try_from(label.len()).map_err(|_| WireError::TooLong("label"))?;
    let mut out = vec![HAS_LABEL, len];
    out.extend_from_slice(label.as_bytes());
    Ok(out)
}

/// Memberlist's encryption version 1 (the one it sends): the version byte, a random nonce,
/// then AES-GCM over `plain` with `aad` authenticated.
pub fn encrypt(keyring: &Keyring, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|_| WireError::Random)?;
    let mut out = vec![1];
    out.extend_from_slice(&nonce);
    out.extend(keyring.seal(&nonce, aad, plain));
    Ok(out)
}

/// Opens a payload of encryption version 0 (PKCS7-padded, from old agents) or 1 with any
/// installed key.
pub fn decrypt(keyring: &Keyring, payload: &[u8], aad: &[u8]) -> Result<Vec<u8>, WireError> {
    let (&version, rest) = payload.split_first().ok_or(WireError::Empty)?;
    if version > 1 {
        return Err(WireError::EncryptionVersion(version));
    }
    if rest.len() < NONCE_LEN + TAG_LEN {
        return Err(WireError::Truncated("encrypted message"));
    }
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    let mut plain = keyring.open(nonce, aad, sealed).ok_or(WireError::Decrypt)?;
    if version == 0 {
        let pad = usize::from(*plain.last().ok_or(WireError::Truncated("padding"))?);
        if pad == 0 || pad > plain.len() {
            return Err(WireError::Truncated("padding"));
        }
        plain.truncate(plain.len() - pad);
    }
    Ok(plain)
}

/// A packet taken apart: its label and its messages (type and body), decompressed.
#[derive(Debug, Default, PartialEq)]
pub struct Packet {
    pub label: String,
    pub messages: Vec<(MessageType, Vec<u8>)>,
    /// Messages of a compound packet cut off by the packet's end (memberlist counts these).
    pub truncated: usize,
}

/// Takes a UDP packet apart; with a keyring, only a packet sealed with one of its keys (as
/// memberlist with `GossipVerifyIncoming`, its default).
pub fn parse_packet(buf: &[u8], keyring: Option<&Keyring>) -> Result<Packet, WireError> {
    let (label, buf) = strip_label(buf)?;
    let opened;
    let buf = match keyring {
        Some(keyring) => {
            opened = decrypt(keyring, buf, label.as_bytes())?;
            opened.as_slice()
        }
        None => buf,
    };
    let buf = strip_crc(buf)?;
    let mut packet = Packet {
        label,
        ..Packet::default()
    };
    // Memberlist compresses a whole packet, piggybacked gossip included: compression
    // outside, then a compound, then plain messages; nothing nests deeper.
    let (kind, body) = split_type(buf)?;
    let decompressed;
    let (kind, body) = if kind == MessageType::Compress {
        decompressed = decompress(body)?;
        split_type(&decompressed)?
    } else {
        (kind, body)
    };
    if kind != MessageType::Compound {
        packet.messages.push(plain(kind, body)?);
        return Ok(packet);
    }
    let (parts, truncated) = compound_parts(body)?;
    packet.truncated = truncated;
    for part in parts {
        let (kind, body) = split_type(part)?;
        packet.messages.push(plain(kind, body)?);
    }
    Ok(packet)
}

fn strip_label(buf: &[u8]) -> Result<(String, &[u8]), WireError> {
    if buf.first() != Some(&HAS_LABEL) {
        return Ok((String::new(), buf));
    }
    let len = usize::from(*buf.get(1).ok_or(WireError::Truncated("label"))?);
    let label = buf.get(2..2 + len).ok_or(WireError::Truncated("label"))?;
    Ok((String::from_utf8_lossy(label).into_owned(), &buf[2 + len..]))
}

fn strip_crc(buf: &[u8]) -> Result<&[u8], WireError> {
    if buf.len() < 5 || buf[0] != MessageType::HasCrc as u8 {
        return Ok(buf);
    }
    let expected = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let actual = crc32fast::hash(&buf[5..]);
    if expected != actual {
        return Err(WireError::Checksum { expected, actual });
    }
    Ok(&buf[5..])
}

fn split_type(buf: &[u8]) -> Result<(MessageType, &[u8]), WireError> {
    let (&first, rest) = buf.split_first().ok_or(WireError::Empty)?;
    Ok((MessageType::from_byte(first)?, rest))
}

/// The parts of a compound message, and how many were cut off.
fn compound_parts(buf: &[u8]) -> Result<(Vec<&[u8]>, usize), WireError> {
    let (&count, rest) = buf
        .split_first()
        .ok_or(WireError::Truncated("compound count"))?;
    let count = usize::from(count);
    let lengths = rest
        .get(..count * 2)
        .ok_or(WireError::Truncated("compound lengths"))?;
    let mut body = &rest[count * 2..];
    let mut parts = Vec::with_capacity(count);
    for (index, pair) in lengths.chunks_exact(2).enumerate() {
        let len = usize::from(u16::from_be_bytes([pair[0], pair[1]]));
        if body.len() < len {
            return Ok((parts, count - index));
        }
        parts.push(&body[..len]);
        body = &body[len..];
    }
    Ok((parts, 0))
}

/// A message that is neither compressed nor compound (those come apart in [`parse_packet`]).
fn plain(kind: MessageType, body: &[u8]) -> Result<(MessageType, Vec<u8>), WireError> {
    match kind {
        MessageType::Compress | MessageType::Compound => Err(WireError::NestedCompound),
        MessageType::Encrypt => Err(WireError::Encrypted),
        kind => Ok((kind, body.to_vec())),
    }
}

/// Undoes memberlist's compression: Go's `compress/lzw`, least significant bit first, 8-bit
/// literals; stops at memberlist's own bound.
fn decompress(body: &[u8]) -> Result<Vec<u8>, WireError> {
    let compress: Compress = decode(body)?;
    if compress.algo != 0 {
        return Err(WireError::Compression(compress.algo));
    }
    let mut decoder = weezl::decode::Decoder::new(weezl::BitOrder::Lsb, 8);
    let mut out = Vec::new();
    let mut input = compress.buf.as_slice();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let result = decoder.decode_bytes(input, &mut chunk);
        input = &input[result.consumed_in..];
        out.extend_from_slice(&chunk[..result.consumed_out]);
        if out.len() > MAX_DECOMPRESSED {
            return Err(WireError::TooLarge);
        }
        match result.status {
            Ok(weezl::LzwStatus::Done) => return Ok(out),
            Ok(weezl::LzwStatus::NoProgress) if input.is_empty() => return Ok(out),
            Ok(weezl::LzwStatus::NoProgress) => return Err(WireError::Lzw),
            Ok(weezl::LzwStatus::Ok) => {}
            Err(_) => return Err(WireError::Lzw),
        }
    }
}

/// Writes a push-pull exchange as memberlist's `sendLocalState` does (uncompressed, which
/// every memberlist reads).
pub fn write_push_pull(
    stream: &mut impl Write,
    push: &PushPull,
    label: &str,
    keyring: Option<&Keyring>,
) -> Result<(), WireError> {
    let mut user_state = Vec::new();
    if let Some(serf) = &push.serf {
        user_state.push(SERF_PUSH_PULL);
        rmp_serde::encode::write_named(&mut user_state, serf).map_err(WireError::Encode)?;
    }
    let header = PushPullHeader {
        nodes: push.nodes.len(),
        user_state_len: user_state.len(),
        join: push.join,
    };
    let mut body = encode(MessageType::PushPull, &header)?;
    for node in &push.nodes {
        rmp_serde::encode::write_named(&mut body, node).map_err(WireError::Encode)?;
    }
    body.extend_from_slice(&user_state);
    write_stream(stream, &body, label, keyring)
}

/// Writes one message (its type byte, then its body) on a stream as memberlist does: after
/// the label, sealed with the keyring's primary key when there is one.
pub fn write_stream(
    stream: &mut impl Write,
    body: &[u8],
    label: &str,
    keyring: Option<&Keyring>,
) -> Result<(), WireError> {
    let mut out = label_header(label)?;
    match keyring {
        Some(keyring) => {
            // Memberlist authenticates the stream's type byte, its length and the label.
            let sealed_len = u32::try_from(1 + NONCE_LEN + body.len() + TAG_LEN)
                .map_err(|_| WireError::TooLong("push-pull state"))?;
            let mut aad = vec![MessageType::Encrypt as u8];
            aad.extend_from_slice(&sealed_len.to_be_bytes());
            out.extend_from_slice(&aad);
            aad.extend_from_slice(label.as_bytes());
            out.extend(encrypt(keyring, body, &aad)?);
        }
        None => out.extend_from_slice(body),
    }
    stream.write_all(&out).map_err(WireError::Io)
}

/// What a peer sends on a TCP stream: a push-pull, or (memberlist's fallback probe when UDP
/// fails) a ping and its ack.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamMessage {
    PushPull(PushPull),
    Ping(Ping),
    Ack(Ack),
}

/// Reads a push-pull exchange from a stream (a reply, or a peer's join), compressed or not;
/// with a keyring, only an encrypted one.
pub fn read_push_pull(
    stream: &mut impl Read,
    keyring: Option<&Keyring>,
) -> Result<PushPull, WireError> {
    match read_stream(stream, keyring)? {
        StreamMessage::PushPull(push) => Ok(push),
        StreamMessage::Ping(_) => Err(WireError::Unexpected {
            expected: MessageType::PushPull,
            got: MessageType::Ping,
        }),
        StreamMessage::Ack(_) => Err(WireError::Unexpected {
            expected: MessageType::PushPull,
            got: MessageType::Ack,
        }),
    }
}

/// Reads one message from a stream: a push-pull, a ping or an ack, compressed or not; with a
/// keyring, only an encrypted one.
pub fn read_stream(
    stream: &mut impl Read,
    keyring: Option<&Keyring>,
) -> Result<StreamMessage, WireError> {
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).map_err(WireError::Io)?;
    let mut label = Vec::new();
    if first[0] == HAS_LABEL {
        let mut len = [0u8; 1];
        stream.read_exact(&mut len).map_err(WireError::Io)?;
        label = vec![0u8; usize::from(len[0])];
        stream.read_exact(&mut label).map_err(WireError::Io)?;
        stream.read_exact(&mut first).map_err(WireError::Io)?;
    }
    let kind = MessageType::from_byte(first[0])?;
    let body = match (kind, keyring) {
        (MessageType::Encrypt, Some(keyring)) => read_sealed(stream, keyring, &label)?,
        (MessageType::Encrypt, None) => return Err(WireError::Encrypted),
        (_, Some(_)) => return Err(WireError::NotEncrypted),
        (kind, None) => {
            let mut body = vec![kind as u8];
            read_bounded(stream, &mut body)?;
            body
        }
    };
    let (kind, rest) = split_type(&body)?;
    let (kind, body) = match kind {
        MessageType::Compress => {
            let inner = decompress(rest)?;
            let (kind, body) = split_type(&inner)?;
            (kind, body.to_vec())
        }
        MessageType::Encrypt => return Err(WireError::NestedCompound),
        kind => (kind, rest.to_vec()),
    };
    match kind {
        MessageType::PushPull => parse_push_pull(&body).map(StreamMessage::PushPull),
        MessageType::Ping => decode(&body).map(StreamMessage::Ping),
        MessageType::Ack => decode(&body).map(StreamMessage::Ack),
        got => Err(WireError::Unexpected {
            expected: MessageType::PushPull,
            got,
        }),
    }
}

/// The rest of a stream, up to memberlist's bound on what a peer may send.
fn read_bounded(stream: &mut impl Read, into: &mut Vec<u8>) -> Result<(), WireError> {
    stream
        .take(MAX_DECOMPRESSED as u64 + 1)
        .read_to_end(into)
        .map_err(WireError::Io)?;
    if into.len() > MAX_DECOMPRESSED {
        return Err(WireError::TooLarge);
    }
    Ok(())
}

/// An encrypted stream after its type byte: a length, then that many sealed bytes.
fn read_sealed(
    stream: &mut impl Read,
    keyring: &Keyring,
    label: &[u8],
) -> Result<Vec<u8>, WireError> {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).map_err(WireError::Io)?;
    let len = u32::from_be_bytes(length) as usize;
    if len > MAX_PUSH_STATE_BYTES {
        return Err(WireError::TooLarge);
    }
    let mut sealed = Vec::new();
    stream
        .take(len as u64)
        .read_to_end(&mut sealed)
        .map_err(WireError::Io)?;
    if sealed.len() < len {
        return Err(WireError::Truncated("encrypted stream"));
    }
    let mut aad = vec![MessageType::Encrypt as u8];
    aad.extend_from_slice(&length);
    aad.extend_from_slice(label);
    decrypt(keyring, &sealed, &aad)
}

/// A push-pull body: the header, the nodes, then the user state.
fn parse_push_pull(body: &[u8]) -> Result<PushPull, WireError> {
    let mut cursor = std::io::Cursor::new(body);
    let header: PushPullHeader = rmp_serde::from_read(&mut cursor).map_err(WireError::Decode)?;
    if header.nodes > MAX_PUSH_NODES || header.user_state_len > MAX_PUSH_STATE_BYTES {
        return Err(WireError::PushTooLarge {
            nodes: header.nodes,
            user_state: header.user_state_len,
        });
    }
    let mut nodes = Vec::with_capacity(header.nodes.min(1024));
    for _ in 0..header.nodes {
        nodes.push(rmp_serde::from_read(&mut cursor).map_err(WireError::Decode)?);
    }
    let start = cursor.position() as usize;
    let user_state = body
        .get(start..start + header.user_state_len)
        .ok_or(WireError::Truncated("push-pull user state"))?;
    let serf = match user_state.split_first() {
        Some((&SERF_PUSH_PULL, state)) => Some(decode(state)?),
        _ => None,
    };
    Ok(PushPull {
        join: header.join,
        nodes,
        serf,
    })
}

/// Serf's message types, the first byte of a memberlist user message (Serf's `messages.go`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SerfMessageType {
    Leave = 0,
    Join = 1,
    PushPull = 2,
    UserEvent = 3,
    Query = 4,
    QueryResponse = 5,
    ConflictResponse = 6,
    KeyRequest = 7,
    KeyResponse = 8,
    Relay = 9,
}

/// A user event as Serf gossips it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SerfUserEvent {
    #[serde(rename = "LTime")]
    pub ltime: u64,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Payload", with = "bytes_or_nil")]
    pub payload: Vec<u8>,
    /// "Can coalesce".
    #[serde(rename = "CC")]
    pub cc: bool,
}

/// The user events of one Lamport time, as Serf keeps them (its `userEvents`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SerfUserEvents {
    #[serde(rename = "LTime")]
    pub ltime: u64,
    #[serde(rename = "Events", deserialize_with = "nil_default")]
    pub events: Vec<SerfEventItem>,
}

/// One remembered user event (Serf's `userEvent`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SerfEventItem {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Payload", with = "bytes_or_nil")]
    pub payload: Vec<u8>,
}

/// A member's intent to join, with the Lamport time of its status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SerfJoin {
    #[serde(rename = "LTime")]
    pub ltime: u64,
    #[serde(rename = "Node")]
    pub node: String,
}

/// A member's intent to leave (or a force-leave, pruned or not).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SerfLeave {
    #[serde(rename = "LTime")]
    pub ltime: u64,
    #[serde(rename = "Node")]
    pub node: String,
    #[serde(rename = "Prune")]
    pub prune: bool,
}

/// A query as Serf gossips it; answers go to `addr`:`port` directly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SerfQuery {
    #[serde(rename = "LTime")]
    pub ltime: u64,
    #[serde(rename = "ID")]
    pub id: u32,
    #[serde(rename = "Addr", with = "bytes_or_nil")]
    pub addr: Vec<u8>,
    #[serde(rename = "Port")]
    pub port: u16,
    #[serde(rename = "SourceNode")]
    pub source_node: String,
    /// Node and tag filters, each its type byte and msgpack (not applied by this codec).
    #[serde(rename = "Filters", deserialize_with = "nil_default")]
    pub filters: Vec<serde_bytes::ByteBuf>,
    #[serde(rename = "Flags")]
    pub flags: u32,
    #[serde(rename = "RelayFactor")]
    pub relay_factor: u8,
    /// Go's `time.Duration`: nanoseconds.
    #[serde(rename = "Timeout")]
    pub timeout: i64,
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Payload", with = "bytes_or_nil")]
    pub payload: Vec<u8>,
}

impl SerfQuery {
    /// The asker wants an ack from every member the query reaches.
    pub fn wants_ack(&self) -> bool {
        self.flags & QUERY_FLAG_ACK != 0
    }

    /// Whether the member `node` with `tags` is asked, by Serf's rules: every filter must
    /// pass — a node filter lists the name, a tag filter's pattern (unanchored) matches the
    /// tag's value ("" when absent). A filter that does not decode or compile passes nothing.
    pub fn addressed_to(&self, node: &str, tags: &BTreeMap<String, String>) -> bool {
        self.filters
            .iter()
            .all(|filter| match filter.split_first() {
                Some((&FILTER_NODE, names)) => {
                    decode::<Vec<String>>(names).is_ok_and(|names| names.iter().any(|n| n == node))
                }
                Some((&FILTER_TAG, tag)) => decode::<FilterTag>(tag).is_ok_and(|filter| {
                    let patterns = BTreeMap::from([(filter.tag, filter.expr)]);
                    crate::filter::query_tags_match(&patterns, tags)
                }),
                _ => false,
            })
    }

    /// Where answers go.
    pub fn reply_to(&self) -> Option<SocketAddr> {
        socket_address(&self.addr, self.port)
    }

    /// An ack (`ack`) or an answer to this query from `from`.
    pub fn response(&self, from: &str, ack: bool, payload: Vec<u8>) -> SerfQueryResponse {
        SerfQueryResponse {
            ltime: self.ltime,
            id: self.id,
            from: from.to_string(),
            flags: if ack { QUERY_FLAG_ACK } else { 0 },
            payload,
        }
    }
}

/// A query's filters as Serf encodes them: one listing the nodes (when any), one per tag.
pub fn query_filters(
    nodes: &[String],
    tags: &BTreeMap<String, String>,
) -> Result<Vec<serde_bytes::ByteBuf>, WireError> {
    let mut filters = Vec::new();
    if !nodes.is_empty() {
        let mut filter = vec![FILTER_NODE];
        rmp_serde::encode::write(&mut filter, nodes).map_err(WireError::Encode)?;
        filters.push(serde_bytes::ByteBuf::from(filter));
    }
    for (tag, expr) in tags {
        let mut filter = vec![FILTER_TAG];
        let body = FilterTag {
            tag: tag.clone(),
            expr: expr.clone(),
        };
        rmp_serde::encode::write_named(&mut filter, &body).map_err(WireError::Encode)?;
        filters.push(serde_bytes::ByteBuf::from(filter));
    }
    Ok(filters)
}

/// Serf's filter types, the first byte of each of a query's filters.
const FILTER_NODE: u8 = 0;
const FILTER_TAG: u8 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct FilterTag {
    tag: String,
    expr: String,
}

/// Serf's flag for "ack wanted" on a query, and "this is an ack" on a response.
pub const QUERY_FLAG_ACK: u32 = 1;

/// An ack or an answer to a query.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SerfQueryResponse {
    #[serde(rename = "LTime")]
    pub ltime: u64,
    #[serde(rename = "ID")]
    pub id: u32,
    #[serde(rename = "From")]
    pub from: String,
    #[serde(rename = "Flags")]
    pub flags: u32,
    #[serde(rename = "Payload", with = "bytes_or_nil")]
    pub payload: Vec<u8>,
}

/// Serf's version byte before the coordinate in an ack's payload (its `PingVersion`).
pub const PING_VERSION: u8 = 1;

/// A network coordinate in Serf's shape, as its ping delegate puts it in acks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct SerfCoordinate {
    #[serde(deserialize_with = "nil_default")]
    pub vec: Vec<f64>,
    pub error: f64,
    pub adjustment: f64,
    pub height: f64,
}

/// What a Serf agent puts in its acks: the version byte, then its coordinate.
pub fn coordinate_payload(coordinate: &crate::coordinate::Coordinate) -> Vec<u8> {
    let serf = SerfCoordinate {
        vec: coordinate.vec.to_vec(),
        error: coordinate.error,
        adjustment: coordinate.adjustment,
        height: coordinate.height,
    };
    let mut out = vec![PING_VERSION];
    // Plain numbers: encoding them cannot fail.
    let _ = rmp_serde::encode::write_named(&mut out, &serf);
    out
}

/// The coordinate in an ack's payload; `None` when there is none or it is not Serf's shape
/// (another version, another number of dimensions). It is not checked for sanity here.
pub fn read_coordinate_payload(payload: &[u8]) -> Option<crate::coordinate::Coordinate> {
    let (&version, body) = payload.split_first()?;
    if version != PING_VERSION {
        return None;
    }
    let serf: SerfCoordinate = decode(body).ok()?;
    Some(crate::coordinate::Coordinate {
        vec: serf.vec.try_into().ok()?,
        error: serf.error,
        adjustment: serf.adjustment,
        height: serf.height,
    })
}

/// A member as Serf describes it to others (its `Member`), in answers to its name-conflict
/// query. `Status` is Serf's number: 1 alive, 2 leaving, 3 left, 4 failed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct SerfMember {
    pub name: String,
    #[serde(with = "bytes_or_nil")]
    pub addr: Vec<u8>,
    pub port: u16,
    #[serde(deserialize_with = "nil_default")]
    pub tags: BTreeMap<String, String>,
    pub status: u8,
    pub protocol_min: u8,
    pub protocol_max: u8,
    pub protocol_cur: u8,
    pub delegate_min: u8,
    pub delegate_max: u8,
    pub delegate_cur: u8,
}

/// The payload of Serf's keyring queries (`_serf_install-key`, `use-key`, `remove-key`):
/// the raw key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SerfKeyRequest {
    #[serde(rename = "Key", with = "bytes_or_nil")]
    pub key: Vec<u8>,
}

/// A member's answer to a keyring query: whether it did it (else why), and its keys
/// (base64, for `list-keys`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SerfKeyResponse {
    #[serde(rename = "Result")]
    pub result: bool,
    #[serde(rename = "Message")]
    pub message: String,
    #[serde(rename = "Keys", deserialize_with = "nil_default")]
    pub keys: Vec<String>,
    #[serde(rename = "PrimaryKey")]
    pub primary_key: String,
}

/// A query payload or answer as Serf frames them: its message type, then the msgpack body.
pub fn encode_serf_payload<T: Serialize>(
    kind: SerfMessageType,
    body: &T,
) -> Result<Vec<u8>, WireError> {
    let mut out = vec![kind as u8];
    rmp_serde::encode::write_named(&mut out, body).map_err(WireError::Encode)?;
    Ok(out)
}

/// Reads a query payload or answer of type `kind` (see [`encode_serf_payload`]).
pub fn decode_serf_payload<T: DeserializeOwned>(
    kind: SerfMessageType,
    payload: &[u8],
) -> Result<T, WireError> {
    match payload.split_first() {
        Some((&k, body)) if k == kind as u8 => decode(body),
        Some((&k, _)) => Err(WireError::UnknownType(k)),
        None => Err(WireError::Empty),
    }
}

/// A Serf message read from a memberlist user message.
#[derive(Debug, Clone, PartialEq)]
pub enum SerfMessage {
    UserEvent(SerfUserEvent),
    Join(SerfJoin),
    Leave(SerfLeave),
    Query(SerfQuery),
    QueryResponse(SerfQueryResponse),
    /// A message to pass on to another node (a query response sent the long way round).
    Relay(SerfRelay),
    /// A type this codec does not decode yet (key requests, conflicts).
    Other(u8),
}

/// Go's `net.UDPAddr`, as msgpack encodes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct SerfUdpAddr {
    #[serde(rename = "IP", with = "bytes_or_nil")]
    ip: Vec<u8>,
    #[serde(rename = "Port")]
    port: i64,
    #[serde(rename = "Zone")]
    zone: String,
}

/// Where a relayed message goes (Serf's `relayHeader`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct SerfRelayHeader {
    #[serde(rename = "DestAddr")]
    dest_addr: SerfUdpAddr,
    #[serde(rename = "DestName")]
    dest_name: String,
}

/// A relayed Serf message: where it goes, and the message itself (its type byte, then its
/// body) to send there as a memberlist user message.
#[derive(Debug, Clone, PartialEq)]
pub struct SerfRelay {
    pub to: SocketAddr,
    pub node: String,
    pub message: Vec<u8>,
}

impl SerfRelay {
    /// Wraps `message` (a Serf message as [`encode_serf`] gives it) for `to`, as Serf's
    /// `encodeRelayMessage`: a memberlist user message for the relaying member.
    pub fn wrap(to: SocketAddr, node: &str, message: &[u8]) -> Result<Vec<u8>, WireError> {
        let header = SerfRelayHeader {
            dest_addr: SerfUdpAddr {
                ip: ip_bytes(to.ip()),
                port: i64::from(to.port()),
                zone: String::new(),
            },
            dest_name: node.to_string(),
        };
        let mut out = vec![MessageType::User as u8, SerfMessageType::Relay as u8];
        rmp_serde::encode::write_named(&mut out, &header).map_err(WireError::Encode)?;
        out.extend_from_slice(message.get(1..).unwrap_or_default());
        Ok(out)
    }

    /// The message to send on, as a memberlist user message.
    pub fn user_message(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.message.len() + 1);
        out.push(MessageType::User as u8);
        out.extend_from_slice(&self.message);
        out
    }

    /// Reads a relay's body (after its type byte): the header, then the message.
    fn decode(body: &[u8]) -> Result<SerfRelay, WireError> {
        let mut cursor = std::io::Cursor::new(body);
        let header: SerfRelayHeader =
            Deserialize::deserialize(&mut rmp_serde::Deserializer::new(&mut cursor))
                .map_err(WireError::Decode)?;
        let used = usize::try_from(cursor.position()).unwrap_or(body.len());
        let port = u16::try_from(header.dest_addr.port)
            .map_err(|_| WireError::Truncated("relay destination port"))?;
        let to = socket_address(&header.dest_addr.ip, port)
            .ok_or(WireError::Truncated("relay destination address"))?;
        Ok(SerfRelay {
            to,
            node: header.dest_name,
            message: body.get(used..).unwrap_or_default().to_vec(),
        })
    }
}

/// A Serf message as a memberlist user message, ready to go in a packet.
pub fn encode_serf<T: Serialize>(kind: SerfMessageType, body: &T) -> Result<Vec<u8>, WireError> {
    let mut out = vec![MessageType::User as u8, kind as u8];
    rmp_serde::encode::write_named(&mut out, body).map_err(WireError::Encode)?;
    Ok(out)
}

/// Reads the Serf message in a memberlist user message's body.
pub fn decode_serf(body: &[u8]) -> Result<SerfMessage, WireError> {
    use SerfMessageType as T;
    let (&kind, rest) = body.split_first().ok_or(WireError::Empty)?;
    Ok(match kind {
        k if k == T::UserEvent as u8 => SerfMessage::UserEvent(decode(rest)?),
        k if k == T::Query as u8 => SerfMessage::Query(decode(rest)?),
        k if k == T::QueryResponse as u8 => SerfMessage::QueryResponse(decode(rest)?),
        k if k == T::Join as u8 => SerfMessage::Join(decode(rest)?),
        k if k == T::Leave as u8 => SerfMessage::Leave(decode(rest)?),
        k if k == T::Relay as u8 => SerfMessage::Relay(SerfRelay::decode(rest)?),
        other => SerfMessage::Other(other),
    })
}

/// Serf's tags as a node's meta: the magic byte, then a msgpack map.
pub fn encode_tags(tags: &BTreeMap<String, String>) -> Result<Vec<u8>, WireError> {
    let mut out = vec![TAG_MAGIC];
    rmp_serde::encode::write(&mut out, tags).map_err(WireError::Encode)?;
    Ok(out)
}

/// A node's meta as Serf's tags (a meta without the magic byte is an old agent's role).
pub fn decode_tags(meta: &[u8]) -> Result<BTreeMap<String, String>, WireError> {
    match meta.split_first() {
        Some((&TAG_MAGIC, map)) => decode(map),
        _ => Ok(BTreeMap::from([(
            "role".to_string(),
            String::from_utf8_lossy(meta).into_owned(),
        )])),
    }
}

/// An address as memberlist sends it: 4 bytes for IPv4, 16 for IPv6.
pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Memberlist's address fields (4 or 16 bytes) and a port, as one address.
fn socket_address(bytes: &[u8], port: u16) -> Option<SocketAddr> {
    // Go's 16-byte form of an IPv4 address is the IPv4 address.
    ip_from_bytes(bytes).map(|ip| SocketAddr::new(ip.to_canonical(), port))
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?).into()),
        16 => Some(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).into()),
        _ => None,
    }
}

/// Go writes a nil slice or map as msgpack nil: read it as empty.
fn nil_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

/// Bytes as msgpack bin; read from bin, str (Go's older encoding of `[]byte`) or nil.
mod bytes_or_nil {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serde_bytes::serialize(bytes, serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        Option::<serde_bytes::ByteBuf>::deserialize(deserializer).map(|bytes| {
            bytes
                .map(serde_bytes::ByteBuf::into_vec)
                .unwrap_or_default()
        })
    }
}

fn is_zero(value: &u16) -> bool {
    *value == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ping_round_trips_with_go_field_names() {
        let ping = Ping {
            seq_no: 7,
            node: "s1".into(),
            ..Ping::default()
        };
        let bytes = encode(MessageType::Ping, &ping).unwrap();
        assert_eq!(bytes[0], 0);
        // A fixmap of two entries: SeqNo and Node (empty optional fields are left out).
        assert_eq!(bytes[1], 0x82);
        assert!(bytes.windows(5).any(|w| w == b"SeqNo"));
        let packet = parse_packet(&bytes, None).unwrap();
        assert_eq!(packet.messages.len(), 1);
        assert_eq!(decode::<Ping>(&packet.messages[0].1).unwrap(), ping);
    }

    #[test]
    fn compound_packets_with_a_label_and_a_crc_come_apart() {
        let ack = encode(
            MessageType::Ack,
            &Ack {
                seq_no: 1,
                payload: vec![1, 2],
            },
        )
        .unwrap();
        let ping = encode(MessageType::Ping, &Ping::default()).unwrap();
        let framed = packet(&[ack.clone(), ping.clone()], "blue", None).unwrap();
        let parsed = parse_packet(&framed, None).unwrap();
        assert_eq!(parsed.label, "blue");
        let long = "x".repeat(256);
        assert!(matches!(
            packet(std::slice::from_ref(&ack), &long, None),
            Err(WireError::TooLong("label"))
        ));
        let huge = vec![0u8; 70_000];
        assert!(matches!(
            packet(&[ack.clone(), huge], "", None),
            Err(WireError::TooLong("compound part"))
        ));
        assert_eq!(parsed.messages[0], (MessageType::Ack, ack[1..].to_vec()));
        assert_eq!(parsed.messages[1], (MessageType::Ping, ping[1..].to_vec()));

        let mut with_crc = vec![MessageType::HasCrc as u8];
        with_crc.extend_from_slice(&crc32fast::hash(&ack).to_be_bytes());
        with_crc.extend_from_slice(&ack);
        assert_eq!(parse_packet(&with_crc, None).unwrap().messages.len(), 1);
        *with_crc.last_mut().unwrap() ^= 1;
        assert!(matches!(
            parse_packet(&with_crc, None),
            Err(WireError::Checksum { .. })
        ));
    }

    #[test]
    fn hostile_packets_are_refused_without_panicking() {
        assert!(parse_packet(&[], None).is_err());
        assert!(parse_packet(&[HAS_LABEL, 200, b'x'], None).is_err());
        assert!(parse_packet(&[99], None).is_err());
        assert!(matches!(
            parse_packet(&[7, 7, 7], None),
            Err(WireError::Truncated(_))
        ));
        let nested = packet(&[packet(&[vec![0], vec![0]], "", None).unwrap()], "", None).unwrap();
        assert!(parse_packet(&packet(&[nested, vec![2]], "", None).unwrap(), None).is_err());
        // A cut-off compound part is counted, as memberlist counts it.
        let parsed = parse_packet(&[7, 2, 0, 1, 0, 9, 2], None).unwrap();
        assert_eq!((parsed.messages.len(), parsed.truncated), (1, 1));
        // Seeded random bytes: errors, never a panic.
        let keyring = Keyring::new(crate::Key::from_bytes(vec![3; 16]).unwrap());
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let len = (state % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8 % 16
                })
                .collect();
            let _ = parse_packet(&bytes, None);
            let _ = parse_packet(&bytes, Some(&keyring));
            let _ = read_push_pull(&mut bytes.as_slice(), None);
            let _ = read_push_pull(&mut bytes.as_slice(), Some(&keyring));
        }
    }

    #[test]
    fn coordinates_in_acks_round_trip_in_serfs_shape_and_others_are_ignored() {
        let mut coordinate = crate::coordinate::Coordinate::default();
        coordinate.vec[2] = 0.25;
        coordinate.height = 0.001;
        let payload = coordinate_payload(&coordinate);
        assert_eq!(payload[0], PING_VERSION);
        assert!(payload.windows(3).any(|w| w == b"Vec"), "{payload:?}");
        assert_eq!(read_coordinate_payload(&payload), Some(coordinate));
        let mut other_version = payload.clone();
        other_version[0] = 2;
        assert_eq!(read_coordinate_payload(&other_version), None);
        let three_dimensions = SerfCoordinate {
            vec: vec![0.0; 3],
            ..SerfCoordinate::default()
        };
        let mut short = vec![PING_VERSION];
        rmp_serde::encode::write_named(&mut short, &three_dimensions).unwrap();
        assert_eq!(read_coordinate_payload(&short), None);
        assert_eq!(read_coordinate_payload(&[]), None);
    }

    #[test]
    fn relays_wrap_and_unwrap_a_response_as_serf_does() {
        let response = SerfQueryResponse {
            ltime: 3,
            id: 9,
            from: "p1".into(),
            flags: 0,
            payload: b"up".to_vec(),
        };
        let message = encode_serf(SerfMessageType::QueryResponse, &response).unwrap();
        let to: SocketAddr = "127.0.0.1:7946".parse().unwrap();
        let wrapped = SerfRelay::wrap(to, "s1", &message).unwrap();
        assert_eq!(
            wrapped[..2],
            [MessageType::User as u8, SerfMessageType::Relay as u8]
        );
        let SerfMessage::Relay(relay) = decode_serf(&wrapped[1..]).unwrap() else {
            panic!("not a relay");
        };
        assert_eq!((relay.to, relay.node.as_str()), (to, "s1"));
        assert_eq!(relay.user_message(), message);
        // Go's header: the IPv4 address in its 16-byte form, as a raw string.
        let mut from_go = vec![SerfMessageType::Relay as u8];
        from_go.extend_from_slice(b"\x82\xa8DestAddr\x83\xa2IP\xb0");
        from_go.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 2]);
        from_go.extend_from_slice(b"\xa4Port\xcd\x1f\x0a\xa4Zone\xa0\xa8DestName\xa2s2");
        from_go.extend_from_slice(&message[1..]);
        let SerfMessage::Relay(relay) = decode_serf(&from_go).unwrap() else {
            panic!("not a relay");
        };
        assert_eq!(relay.to, "127.0.0.2:7946".parse::<SocketAddr>().unwrap());
        assert_eq!(relay.message, message[1..]);
        assert!(decode_serf(&from_go[..12]).is_err());
    }

    #[test]
    fn keyring_queries_are_framed_as_serfs_key_manager_frames_them() {
        let request = SerfKeyRequest { key: vec![1, 2, 3] };
        let payload = encode_serf_payload(SerfMessageType::KeyRequest, &request).unwrap();
        assert_eq!(payload, b"\x07\x81\xa3Key\xc4\x03\x01\x02\x03");
        // Go's msgpack writes []byte as a raw string: read either way.
        let from_go = b"\x07\x81\xa3Key\xa3\x01\x02\x03";
        let read: SerfKeyRequest =
            decode_serf_payload(SerfMessageType::KeyRequest, from_go).unwrap();
        assert_eq!(read, request);
        assert!(matches!(
            decode_serf_payload::<SerfKeyRequest>(SerfMessageType::KeyResponse, from_go),
            Err(WireError::UnknownType(7))
        ));
        // A refusal as Serf sends it (nil keys).
        let answer = b"\x08\x84\xa6Result\xc2\xa7Message\xa2no\xa4Keys\xc0\xaaPrimaryKey\xa0";
        let read: SerfKeyResponse =
            decode_serf_payload(SerfMessageType::KeyResponse, answer).unwrap();
        assert_eq!(
            read,
            SerfKeyResponse {
                result: false,
                message: "no".into(),
                keys: Vec::new(),
                primary_key: String::new(),
            }
        );
    }

    #[test]
    fn a_push_pull_round_trips_with_serf_state_and_tags() {
        let tags = BTreeMap::from([("role".to_string(), "web".to_string())]);
        let push = PushPull {
            join: true,
            nodes: vec![PushNodeState {
                name: "p1".into(),
                addr: vec![127, 0, 0, 1],
                port: 7946,
                meta: encode_tags(&tags).unwrap(),
                incarnation: 1,
                state: NodeState::Alive,
                vsn: vec![1, 5, 2, 2, 5, 4],
            }],
            serf: Some(SerfPushPull {
                ltime: 3,
                status_ltimes: BTreeMap::from([("p1".to_string(), 2)]),
                ..SerfPushPull::default()
            }),
        };
        let mut wire = Vec::new();
        write_push_pull(&mut wire, &push, "", None).unwrap();
        let read = read_push_pull(&mut wire.as_slice(), None).unwrap();
        assert_eq!(read, push);
        assert_eq!(decode_tags(&read.nodes[0].meta).unwrap(), tags);
        assert_eq!(
            read.nodes[0].address().unwrap(),
            "127.0.0.1:7946".parse().unwrap()
        );
        assert_eq!(
            decode_tags(b"db").unwrap()["role"],
            "db",
            "an old agent's bare role"
        );
    }

    #[test]
    fn serf_messages_ride_in_memberlist_user_messages() {
        let event = SerfUserEvent {
            ltime: 12,
            name: "deploy".into(),
            payload: b"v2".to_vec(),
            cc: true,
        };
        let message = encode_serf(SerfMessageType::UserEvent, &event).unwrap();
        let parsed = parse_packet(&message, None).unwrap();
        let (kind, body) = &parsed.messages[0];
        assert_eq!(*kind, MessageType::User);
        assert_eq!(decode_serf(body).unwrap(), SerfMessage::UserEvent(event));
        let leave = SerfLeave {
            ltime: 3,
            node: "n4".into(),
            prune: true,
        };
        let message = encode_serf(SerfMessageType::Leave, &leave).unwrap();
        assert_eq!(
            decode_serf(&message[1..]).unwrap(),
            SerfMessage::Leave(leave)
        );
        let query = SerfQuery {
            ltime: 2,
            id: 99,
            addr: vec![127, 0, 0, 1],
            port: 7946,
            flags: QUERY_FLAG_ACK,
            timeout: 15_000_000_000,
            name: "uptime".into(),
            ..SerfQuery::default()
        };
        let message = encode_serf(SerfMessageType::Query, &query).unwrap();
        assert_eq!(
            decode_serf(&message[1..]).unwrap(),
            SerfMessage::Query(query.clone())
        );
        assert!(query.wants_ack());
        assert_eq!(query.reply_to(), Some("127.0.0.1:7946".parse().unwrap()));
        let answer = query.response("p1", false, b"up".to_vec());
        assert_eq!((answer.ltime, answer.id, answer.flags), (2, 99, 0));
        assert_eq!(decode_serf(&[6, 0x80]).unwrap(), SerfMessage::Other(6));
        // Filters as Serf writes them: a type byte, then msgpack.
        let tags = BTreeMap::from([("role".to_string(), "web".to_string())]);
        let node_filter = |names: &[&str]| {
            let mut filter = vec![FILTER_NODE];
            rmp_serde::encode::write(&mut filter, names).unwrap();
            serde_bytes::ByteBuf::from(filter)
        };
        let tag_filter = |tag: &str, expr: &str| {
            let mut filter = vec![FILTER_TAG];
            let map = BTreeMap::from([("Tag", tag), ("Expr", expr)]);
            rmp_serde::encode::write(&mut filter, &map).unwrap();
            serde_bytes::ByteBuf::from(filter)
        };
        let asked = |filters: Vec<serde_bytes::ByteBuf>| {
            let query = SerfQuery {
                filters,
                ..SerfQuery::default()
            };
            query.addressed_to("p1", &tags)
        };
        assert!(asked(vec![]));
        assert!(asked(vec![node_filter(&["s1", "p1"])]));
        assert!(!asked(vec![node_filter(&["s1"])]));
        assert!(
            asked(vec![tag_filter("role", "we")]),
            "unanchored, as in Serf"
        );
        assert!(!asked(vec![tag_filter("role", "^db$")]));
        assert!(asked(vec![tag_filter("dc", "^$")]), "an absent tag is \"\"");
        assert!(
            !asked(vec![tag_filter("role", "(")]),
            "a bad pattern passes nothing"
        );
        assert!(!asked(vec![node_filter(&["p1"]), tag_filter("role", "db")]));
        assert!(!asked(vec![serde_bytes::ByteBuf::from(vec![7])]));
        // Go writes nil slices as nil: {"Filters": nil, "Payload": nil} reads as empty.
        let mut nils = vec![4, 0x82, 0xa7];
        nils.extend_from_slice(b"Filters");
        nils.extend_from_slice(&[0xc0, 0xa7]);
        nils.extend_from_slice(b"Payload");
        nils.push(0xc0);
        assert_eq!(
            decode_serf(&nils).unwrap(),
            SerfMessage::Query(SerfQuery::default())
        );
        assert!(decode_serf(&[]).is_err() && decode_serf(&[3, 0xc1]).is_err());
    }

    #[test]
    fn sealed_packets_and_streams_open_with_the_keyring_and_only_with_it() {
        let keyring = Keyring::new(crate::Key::from_bytes(vec![5; 32]).unwrap());
        let other = Keyring::new(crate::Key::from_bytes(vec![6; 32]).unwrap());
        let ping = Ping {
            seq_no: 9,
            node: "s1".into(),
            ..Ping::default()
        };
        let ping = encode(MessageType::Ping, &ping).unwrap();
        let sealed = packet(std::slice::from_ref(&ping), "lab", Some(&keyring)).unwrap();
        assert!(
            !sealed.windows(ping.len()).any(|w| w == ping),
            "no plain text on the wire"
        );
        let opened = parse_packet(&sealed, Some(&keyring)).unwrap();
        assert_eq!(
            opened.messages,
            vec![(MessageType::Ping, ping[1..].to_vec())]
        );
        assert!(matches!(
            parse_packet(&sealed, Some(&other)),
            Err(WireError::Decrypt)
        ));
        // The label is authenticated: the same bytes under another label do not open.
        let mut relabelled = sealed.clone();
        relabelled[2..5].copy_from_slice(b"dev");
        assert!(matches!(
            parse_packet(&relabelled, Some(&keyring)),
            Err(WireError::Decrypt)
        ));

        let push = PushPull {
            join: true,
            ..PushPull::default()
        };
        let mut wire = Vec::new();
        write_push_pull(&mut wire, &push, "", Some(&keyring)).unwrap();
        assert_eq!(
            read_push_pull(&mut wire.as_slice(), Some(&keyring)).unwrap(),
            push
        );
        assert!(matches!(
            read_push_pull(&mut wire.as_slice(), None),
            Err(WireError::Encrypted)
        ));
        let mut plain = Vec::new();
        write_push_pull(&mut plain, &push, "", None).unwrap();
        assert!(matches!(
            read_push_pull(&mut plain.as_slice(), Some(&keyring)),
            Err(WireError::NotEncrypted)
        ));
    }
}
