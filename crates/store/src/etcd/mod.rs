//! A client of etcd v3 through its JSON gateway (`POST /v3/...` over HTTP/1.1, TLS optional).
//!
//! Why the gateway and not gRPC: the `etcd-client` crate compiles etcd's protobufs at build
//! time and so needs `protoc`, which a fresh machine with only the Rust toolchain lacks; the
//! gateway is served by every etcd since 3.4 on the same client port, speaks the same requests
//! and needs nothing but hyper, which Phoenix already has. What it lacks is multiplexing: a
//! watch takes a connection of its own.
//!
//! Endpoints are tried in turn: a member that cannot be reached, has no leader or times out
//! sends the request to the next one. Requests carry etcd's `hasleader` metadata, so a member
//! cut off from the quorum refuses at once instead of answering from stale state.

mod conn;
mod leader;
pub mod test_util;
mod wire;

pub use conn::Endpoint;
pub use leader::{Candidate, Leadership};
pub use wire::{Compare, KeyValue, Op, WatchEvent, prefix_end};

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};

use conn::Pool;

/// A failure talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd endpoint {endpoint:?}: {what}")]
    BadEndpoint { endpoint: String, what: String },
    #[error("no etcd endpoint could be used ({tried}); the last said: {last}. {hint}")]
    Unavailable {
        tried: String,
        last: String,
        /// What to do: fix the TLS settings, or wait for a quorum.
        hint: &'static str,
    },
    #[error("etcd {endpoint} refused {path}: {message} (gRPC code {code})")]
    Refused {
        endpoint: String,
        path: &'static str,
        code: i64,
        message: String,
    },
    #[error("etcd {endpoint}: {path} answered something that is not etcd's: {what}")]
    Protocol {
        endpoint: String,
        path: &'static str,
        what: String,
    },
    #[error(
        "etcd watch of {key}: revision {revision} is compacted away; read the current state again"
    )]
    Compacted { key: String, revision: i64 },
    #[error(
        "this host no longer leads: {key} is held by {} now, so the change was not made",
        holder.as_deref().unwrap_or("nobody")
    )]
    Deposed { key: String, holder: Option<String> },
    #[error("etcd watch of {key} ended: {why}")]
    WatchEnded { key: String, why: String },
}

pub type Result<T> = std::result::Result<T, EtcdError>;

/// How to reach an etcd cluster.
#[derive(Clone)]
pub struct EtcdOptions {
    /// `http://host:port` or `https://host:port`, one per member.
    pub endpoints: Vec<String>,
    /// Required for `https://` endpoints: the CA (and the client certificate, if any).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// etcd's user and password, when its authentication is on.
    pub credentials: Option<(String, String)>,
    /// How long one request to one member may take before the next member is tried.
    pub timeout: Duration,
}

impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A handle on an etcd cluster; cheap to clone.
#[derive(Clone)]
pub struct Etcd(Arc<Pool>);

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Etcd({})", self.0.describe())
    }
}

/// What a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether every comparison held (then the `success` operations ran, else `failure`'s).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    /// The keys read by each `Op::Get` of the branch that ran, in order.
    pub reads: Vec<Vec<KeyValue>>,
}

impl Etcd {
    /// Checks the endpoints; connects lazily, on the first request.
    pub fn new(options: EtcdOptions) -> Result<Self> {
        Ok(Self(Arc::new(Pool::new(options)?)))
    }

    /// The value at `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let (_, mut kvs) = self.range(key.as_bytes(), false).await?;
        Ok(kvs.pop())
    }

    /// Every key under `prefix`, in key order, and the revision they were read at.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(i64, Vec<KeyValue>)> {
        self.range(prefix.as_bytes(), true).await
    }

    /// The last key under `prefix`, in key order (a journal's newest entry).
    pub async fn last_under(&self, prefix: &str) -> Result<Option<KeyValue>> {
        let mut body = wire::range(prefix.as_bytes(), true);
        body["limit"] = json!("1");
        body["sort_order"] = json!("DESCEND");
        body["sort_target"] = json!("KEY");
        let answer: wire::RangeAnswer = self.call("kv/range", body).await?;
        Ok(answer.kvs.into_iter().next())
    }

    async fn range(&self, key: &[u8], prefix: bool) -> Result<(i64, Vec<KeyValue>)> {
        let answer: wire::RangeAnswer = self.call("kv/range", wire::range(key, prefix)).await?;
        Ok((answer.header.revision, answer.kvs))
    }

    /// Writes `value` at `key` (attached to `lease` unless 0); the new revision.
    pub async fn put(&self, key: &str, value: impl AsRef<[u8]>, lease: i64) -> Result<i64> {
        let body = wire::put(key.as_bytes(), value.as_ref(), lease);
        let answer: wire::RangeAnswer = self.call("kv/put", body).await?;
        Ok(answer.header.revision)
    }

    /// Deletes `key`, or everything under it when `prefix`.
    pub async fn delete(&self, key: &str, prefix: bool) -> Result<i64> {
        let body = wire::range(key.as_bytes(), prefix);
        let answer: wire::RangeAnswer = self.call("kv/deleterange", body).await?;
        Ok(answer.header.revision)
    }

    /// Runs `success` if every comparison holds, else `failure`, atomically.
    pub async fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResult> {
        let body = json!({
            "compare": compare.iter().map(Compare::to_json).collect::<Vec<_>>(),
            "success": success.iter().map(Op::to_json).collect::<Vec<_>>(),
            "failure": failure.iter().map(Op::to_json).collect::<Vec<_>>(),
        });
        let answer: wire::TxnAnswer = self.call("kv/txn", body).await?;
        Ok(TxnResult {
            succeeded: answer.succeeded,
            revision: answer.header.revision,
            reads: answer
                .responses
                .into_iter()
                .filter_map(|r| r.response_range.map(|r| r.kvs))
                .collect(),
        })
    }

    /// A lease of `ttl` seconds; keys attached to it vanish when it is not kept alive.
    pub async fn grant(&self, ttl: Duration) -> Result<i64> {
        let seconds = ttl.as_secs().max(1);
        let answer: wire::LeaseAnswer = self.call("lease/grant", json!({"TTL": seconds})).await?;
        Ok(answer.id)
    }

    /// Renews a lease; the seconds it has left, or 0 when it has already expired.
    pub async fn keep_alive(&self, lease: i64) -> Result<i64> {
        // The gateway's keepalive is a stream: one request gives one `{"result": ...}` line.
        let body = json!({"ID": lease.to_string()});
        let answer: Value = self.call("lease/keepalive", body).await?;
        let result = answer.get("result").cloned().unwrap_or(answer);
        let answer: wire::LeaseAnswer =
            serde_json::from_value(result).map_err(|e| self.0.protocol("lease/keepalive", e))?;
        Ok(answer.ttl)
    }

    /// Ends a lease now, deleting its keys.
    pub async fn revoke(&self, lease: i64) -> Result<()> {
        let _: Value = self
            .call("lease/revoke", json!({"ID": lease.to_string()}))
            .await?;
        Ok(())
    }

    /// Watches `key` (or every key under it) from `revision` on (0: from now).
    pub async fn watch(&self, key: &str, prefix: bool, revision: i64) -> Result<Watch> {
        let mut request = wire::range(key.as_bytes(), prefix);
        if revision > 0 {
            request["start_revision"] = json!(revision.to_string());
        }
        let body = json!({ "create_request": request });
        let stream = self.0.stream("watch", body).await?;
        Ok(Watch {
            key: key.to_string(),
            stream,
            buffer: Vec::new(),
        })
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        path: &'static str,
        body: Value,
    ) -> Result<T> {
        let (endpoint, bytes) = self.0.request(path, body).await?;
        // A streaming call (keepalive) answers with one JSON line per message: the first is ours.
        let first = bytes.split(|b| *b == b'\n').next().unwrap_or(&[]);
        serde_json::from_slice(first).map_err(|e| EtcdError::Protocol {
            endpoint,
            path,
            what: e.to_string(),
        })
    }
}

/// A watch's stream of changes.
pub struct Watch {
    key: String,
    stream: conn::Stream,
    buffer: Vec<u8>,
}

/// The changes of one revision range, and the revision they bring the watcher to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    pub revision: i64,
    pub events: Vec<WatchEvent>,
}

impl Watch {
    /// The next batch of changes. An error ends the watch: read the state again and watch from
    /// the revision read.
    pub async fn next(&mut self) -> Result<WatchBatch> {
        loop {
            if let Some(line) = self.take_line() {
                let message: Value = serde_json::from_slice(&line).map_err(|e| self.ended(e))?;
                if let Some(error) = message.get("error") {
                    return Err(self.ended(error));
                }
                let result = message.get("result").cloned().unwrap_or(Value::Null);
                let answer: wire::WatchAnswer =
                    serde_json::from_value(result).map_err(|e| self.ended(e))?;
                if answer.compact_revision > 0 {
                    return Err(EtcdError::Compacted {
                        key: self.key.clone(),
                        revision: answer.compact_revision,
                    });
                }
                if answer.canceled {
                    return Err(self.ended(format!("canceled: {}", answer.cancel_reason)));
                }
                if answer.created && answer.events.is_empty() {
                    continue;
                }
                return Ok(WatchBatch {
                    revision: answer.header.revision,
                    events: answer.events,
                });
            }
            match self.stream.chunk().await {
                Ok(Some(chunk)) => self.push(chunk)?,
                Ok(None) => return Err(self.ended("the member closed the stream")),
                Err(e) => return Err(self.ended(e)),
            }
        }
    }

    fn push(&mut self, chunk: Bytes) -> Result<()> {
        // One message is one revision's events; a bound keeps a hostile peer from growing it.
        const MAX_MESSAGE: usize = 64 << 20;
        self.buffer.extend_from_slice(&chunk);
        if self.buffer.len() > MAX_MESSAGE {
            return Err(self.ended("a message over 64 MiB"));
        }
        Ok(())
    }

    fn take_line(&mut self) -> Option<Vec<u8>> {
        let end = self.buffer.iter().position(|b| *b == b'\n')?;
        let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
        line.pop();
        if line.iter().all(u8::is_ascii_whitespace) {
            return self.take_line();
        }
        Some(line)
    }

    fn ended(&self, why: impl std::fmt::Display) -> EtcdError {
        EtcdError::WatchEnded {
            key: self.key.clone(),
            why: why.to_string(),
        }
    }
}

#[cfg(test)]
mod tests;
