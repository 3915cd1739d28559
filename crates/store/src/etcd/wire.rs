//! The JSON shapes of etcd's gRPC gateway (`/v3/...`): bytes are base64, 64-bit integers are
//! strings in answers (numbers are accepted too), and absent fields mean zero.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};

/// One key and its value, with etcd's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct KeyValue {
    #[serde(deserialize_with = "bytes")]
    pub key: Vec<u8>,
    #[serde(default, deserialize_with = "bytes")]
    pub value: Vec<u8>,
    #[serde(default, deserialize_with = "int")]
    pub create_revision: i64,
    #[serde(default, deserialize_with = "int")]
    pub mod_revision: i64,
    #[serde(default, deserialize_with = "int")]
    pub version: i64,
    #[serde(default, deserialize_with = "int")]
    pub lease: i64,
}

impl KeyValue {
    /// The key as text (Phoenix's keys are always UTF-8).
    pub fn key_str(&self) -> &str {
        std::str::from_utf8(&self.key).unwrap_or("")
    }
}

/// What a transaction compares, and how.
#[derive(Debug, Clone)]
pub struct Compare {
    key: Vec<u8>,
    target: Target,
    result: &'static str,
}

#[derive(Debug, Clone)]
enum Target {
    Value(Vec<u8>),
    CreateRevision(i64),
    ModRevision(i64),
    Lease(i64),
}

impl Compare {
    /// The key does not exist.
    pub fn absent(key: impl Into<Vec<u8>>) -> Self {
        Self::equal(key, Target::CreateRevision(0))
    }
    /// The key's value is `value`.
    pub fn value(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self::equal(key, Target::Value(value.into()))
    }
    /// The key was last written at `revision` (0: it does not exist).
    pub fn mod_revision(key: impl Into<Vec<u8>>, revision: i64) -> Self {
        Self::equal(key, Target::ModRevision(revision))
    }
    /// The key is attached to `lease`: the fence of a leader, whose key disappears with its
    /// lease.
    pub fn lease(key: impl Into<Vec<u8>>, lease: i64) -> Self {
        Self::equal(key, Target::Lease(lease))
    }
    fn equal(key: impl Into<Vec<u8>>, target: Target) -> Self {
        Self {
            key: key.into(),
            target,
            result: "EQUAL",
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        let key = STANDARD.encode(&self.key);
        let result = self.result;
        match &self.target {
            Target::Value(v) => {
                json!({"key": key, "result": result, "target": "VALUE", "value": STANDARD.encode(v)})
            }
            Target::CreateRevision(r) => {
                json!({"key": key, "result": result, "target": "CREATE", "create_revision": r.to_string()})
            }
            Target::ModRevision(r) => {
                json!({"key": key, "result": result, "target": "MOD", "mod_revision": r.to_string()})
            }
            Target::Lease(l) => {
                json!({"key": key, "result": result, "target": "LEASE", "lease": l.to_string()})
            }
        }
    }
}

/// One operation of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Writes `value` at `key`, attached to `lease` unless it is 0.
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    /// Deletes `key`, or every key under it when `prefix`.
    Delete { key: Vec<u8>, prefix: bool },
    /// Reads `key`, or every key under it when `prefix`.
    Get { key: Vec<u8>, prefix: bool },
}

impl Op {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }
    pub fn put_with_lease(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: i64) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Op::Delete {
            key: key.into(),
            prefix: false,
        }
    }
    pub fn delete_prefix(key: impl Into<Vec<u8>>) -> Self {
        Op::Delete {
            key: key.into(),
            prefix: true,
        }
    }
    pub fn get(key: impl Into<Vec<u8>>) -> Self {
        Op::Get {
            key: key.into(),
            prefix: false,
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        match self {
            Op::Put { key, value, lease } => json!({"request_put": put(key, value, *lease)}),
            Op::Delete { key, prefix } => json!({"request_delete_range": range(key, *prefix)}),
            Op::Get { key, prefix } => json!({"request_range": range(key, *prefix)}),
        }
    }
}

pub(crate) fn put(key: &[u8], value: &[u8], lease: i64) -> Value {
    let mut body = json!({"key": STANDARD.encode(key), "value": STANDARD.encode(value)});
    if lease != 0 {
        body["lease"] = json!(lease.to_string());
    }
    body
}

/// A range request: one key, or every key that starts with it.
pub(crate) fn range(key: &[u8], prefix: bool) -> Value {
    let mut body = json!({"key": STANDARD.encode(key)});
    if prefix {
        body["range_end"] = json!(STANDARD.encode(prefix_end(key)));
    }
    body
}

/// The first key after every key that starts with `prefix` (etcd's `range_end`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key: etcd reads "\0" as "to the end"
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Header {
    #[serde(default, deserialize_with = "int")]
    pub revision: i64,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RangeAnswer {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub kvs: Vec<KeyValue>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct TxnAnswer {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub succeeded: bool,
    #[serde(default)]
    pub responses: Vec<OpAnswer>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct OpAnswer {
    #[serde(default)]
    pub response_range: Option<RangeAnswer>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct LeaseAnswer {
    #[serde(default, rename = "ID", deserialize_with = "int")]
    pub id: i64,
    #[serde(default, rename = "TTL", deserialize_with = "int")]
    pub ttl: i64,
}

/// One message of a watch stream.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct WatchAnswer {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub created: bool,
    #[serde(default)]
    pub canceled: bool,
    #[serde(default, deserialize_with = "int")]
    pub compact_revision: i64,
    #[serde(default)]
    pub cancel_reason: String,
    #[serde(default)]
    pub events: Vec<WatchEvent>,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct WatchEvent {
    /// Absent for a put, `"DELETE"` for a delete.
    #[serde(default, rename = "type")]
    kind: Option<String>,
    pub kv: KeyValue,
}

impl WatchEvent {
    pub fn is_delete(&self) -> bool {
        self.kind.as_deref() == Some("DELETE")
    }
}

/// The gateway's error body.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ErrorAnswer {
    #[serde(default)]
    pub code: i64,
    #[serde(default, alias = "error")]
    pub message: String,
}

#[derive(Serialize)]
pub(crate) struct Authenticate<'a> {
    pub name: &'a str,
    pub password: &'a str,
}

#[derive(Deserialize)]
pub(crate) struct Token {
    pub token: String,
}

fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(d)?;
    STANDARD
        .decode(text.as_bytes())
        .map_err(serde::de::Error::custom)
}

fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => s.parse().map_err(serde::de::Error::custom),
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| serde::de::Error::custom("not a 64-bit integer")),
        Value::Null => Ok(0),
        other => Err(serde::de::Error::custom(format!("not an integer: {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_that_can_be() {
        assert_eq!(prefix_end(b"/phoenix/"), b"/phoenix0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn answers_parse_strings_numbers_and_absent_fields() {
        let kv: KeyValue = serde_json::from_str(
            r#"{"key":"Zm9v","create_revision":"2","mod_revision":3,"version":"1","value":"YmFy"}"#,
        )
        .unwrap();
        assert_eq!(kv.key, b"foo");
        assert_eq!(kv.value, b"bar");
        assert_eq!((kv.create_revision, kv.mod_revision, kv.lease), (2, 3, 0));
        let lease: LeaseAnswer = serde_json::from_str(r#"{"header":{},"ID":"7"}"#).unwrap();
        assert_eq!((lease.id, lease.ttl), (7, 0));
        let bad = serde_json::from_str::<KeyValue>(r#"{"key":"!!"}"#);
        assert!(bad.is_err());
    }
}
