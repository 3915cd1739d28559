//! Who a member is, as gossiped: name, address, tags. Tags travel in the identity, so every
//! membership update carries them and a member that joins late learns everyone's tags without
//! a separate exchange. A change of tags (or a graceful leave) is a new identity with a higher
//! `bump`, which foca disseminates as a rename.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Most bytes of tags (keys and values), as Serf: the identity rides in every SWIM packet.
pub const MAX_TAGS_SIZE: usize = 512;

/// The size tags take against [`MAX_TAGS_SIZE`]; an error past it.
pub fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), crate::GossipError> {
    let size: usize = tags.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    if size > MAX_TAGS_SIZE {
        return Err(crate::GossipError::TagsTooLarge(size));
    }
    Ok(())
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeId {
    pub name: String,
    pub addr: SocketAddr,
    /// Raised on every change and on every rejoin; the higher one wins.
    pub bump: u64,
    pub tags: BTreeMap<String, String>,
    /// Set just before a graceful leave: when this identity goes down it has `left`, not failed.
    pub leaving: bool,
}

impl std::fmt::Debug for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}#{}", self.name, self.addr, self.bump)
    }
}

impl NodeId {
    /// The same member with a higher bump.
    pub fn next(&self) -> NodeId {
        NodeId {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        }
    }
}

impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    /// Declared down by mistake (or restarted): come back as a newer identity.
    fn renew(&self) -> Option<Self> {
        Some(NodeId {
            leaving: false,
            ..self.next()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}
