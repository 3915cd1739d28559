//! Memberlist's TCP exchanges on tokio streams: a push-pull sent and its answer read (a join,
//! or the periodic anti-entropy sync), a peer's push-pull read and answered, and the fallback
//! probe (a ping and its ack over TCP, when UDP gets no answer). Every read is bounded in
//! size and time.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::keyring::Keyring;
use crate::memberlist::{self, Ack, MessageType, Ping, PushPull, StreamMessage, WireError};

/// Memberlist's TCP timeout.
pub(super) const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a stream exchange failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum StreamError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Connects to `addr`, sends `ours` and reads the answer.
pub(super) async fn exchange(
    addr: SocketAddr,
    ours: &PushPull,
    keyring: Option<&Keyring>,
) -> Result<PushPull, StreamError> {
    let work = async {
        let mut stream = TcpStream::connect(addr).await?;
        write(&mut stream, ours, keyring).await?;
        match read(&mut stream, keyring).await? {
            StreamMessage::PushPull(theirs) => Ok(theirs),
            other => Err(unexpected(MessageType::PushPull, &other)),
        }
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| StreamError::Timeout)?
}

/// Memberlist's TCP fallback probe: sends `ping` to `addr` on a stream and reads the ack
/// (within `patience`).
pub(super) async fn ping(
    addr: SocketAddr,
    ping: &Ping,
    keyring: Option<&Keyring>,
    patience: Duration,
) -> Result<Ack, StreamError> {
    let work = async {
        let mut stream = TcpStream::connect(addr).await?;
        write_message(&mut stream, MessageType::Ping, ping, keyring).await?;
        match read(&mut stream, keyring).await? {
            StreamMessage::Ack(ack) => Ok(ack),
            other => Err(unexpected(MessageType::Ack, &other)),
        }
    };
    tokio::time::timeout(patience, work)
        .await
        .map_err(|_| StreamError::Timeout)?
}

/// Writes one message (an ack to a ping) on a stream.
pub(super) async fn write_message<T: serde::Serialize>(
    stream: &mut TcpStream,
    kind: MessageType,
    body: &T,
    keyring: Option<&Keyring>,
) -> Result<(), StreamError> {
    let mut bytes = Vec::new();
    memberlist::write_stream(&mut bytes, &memberlist::encode(kind, body)?, "", keyring)?;
    stream.write_all(&bytes).await?;
    stream.flush().await?;
    Ok(())
}

fn unexpected(expected: MessageType, got: &StreamMessage) -> StreamError {
    let got = match got {
        StreamMessage::PushPull(_) => MessageType::PushPull,
        StreamMessage::Ping(_) => MessageType::Ping,
        StreamMessage::Ack(_) => MessageType::Ack,
    };
    WireError::Unexpected { expected, got }.into()
}

/// Writes a push-pull exchange.
pub(super) async fn write(
    stream: &mut TcpStream,
    push: &PushPull,
    keyring: Option<&Keyring>,
) -> Result<(), StreamError> {
    let mut bytes = Vec::new();
    memberlist::write_push_pull(&mut bytes, push, "", keyring)?;
    stream.write_all(&bytes).await?;
    stream.flush().await?;
    Ok(())
}

/// Reads one message (a push-pull, a ping or an ack). Memberlist does not frame a plain one,
/// so the bytes read so far are parsed whenever the sender pauses (a read short of a full
/// chunk) or they have doubled, until they make a whole one, the stream ends, or memberlist's
/// bound on a push-pull is passed. Callers bound the time.
pub(super) async fn read(
    stream: &mut TcpStream,
    keyring: Option<&Keyring>,
) -> Result<StreamMessage, StreamError> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut next_try = 0;
    loop {
        let n = stream.read(&mut chunk).await?;
        buf.extend_from_slice(&chunk[..n]);
        if n == chunk.len() && buf.len() < next_try {
            continue;
        }
        next_try = buf.len() * 2;
        match memberlist::read_stream(&mut buf.as_slice(), keyring) {
            Ok(message) => return Ok(message),
            Err(e) if n == 0 => return Err(e.into()),
            Err(_) if buf.len() > 2 * memberlist::MAX_PUSH_STATE_BYTES => {
                return Err(WireError::TooLarge.into());
            }
            Err(_) => {}
        }
    }
}
