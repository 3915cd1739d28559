//! A client of Serf's RPC protocol.

use std::net::SocketAddr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::messages::{AuthRequest, HandshakeRequest, RequestHeader, ResponseHeader};
use super::{decode, encode, erased};

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
