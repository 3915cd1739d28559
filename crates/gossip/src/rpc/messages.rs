//! The msgpack maps of Serf's RPC protocol, with Go's field names and Go's habit of encoding
//! empty slices, maps and byte strings as nil.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::agent::Member;

/// Protocol versions this agent reports, as Serf 0.8 does (memberlist 2, Serf 2 to 5).
pub(super) const PROTOCOL: [u8; 6] = [1, 5, 2, 2, 5, 4];
/// Largest request accepted (a body past this closes the connection).
pub(super) const MAX_REQUEST: usize = 1 << 20;

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

/// `get-coordinate`: whose coordinate.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CoordinateRequest {
    pub node: String,
}

/// `get-coordinate`'s answer: a node's network coordinate, when one is known (`Ok`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CoordinateResponse {
    pub coord: Coordinate,
    pub ok: bool,
}

/// A Vivaldi coordinate in Serf's shape (8 dimensions, error, adjustment, height).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Coordinate {
    pub vec: Vec<f64>,
    pub error: f64,
    pub adjustment: f64,
    pub height: f64,
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
        let addr = crate::memberlist::ip_bytes(member.addr.ip());
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
    /// Forget the member at once rather than list it as left (`force-leave -prune`).
    pub prune: bool,
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

/// Go encodes an empty slice or map as nil.
pub(super) fn nil_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Byte fields as Go encodes them: bin, or nil for an empty slice.
pub(super) mod nil_or_bytes {
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
