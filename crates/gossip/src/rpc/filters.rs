//! Which members and events an RPC client asked for.

use std::collections::BTreeMap;

use regex::Regex;

use super::encode;
use super::messages::{MemberEventRecord, QueryEventRecord, RpcMember, UserEventRecord};
use crate::agent::{Event, Member};
use crate::filter::{TagPatterns, anchored};

/// `members-filtered`: tags, status and name are regular expressions anchored as Serf
/// anchors them (see [`crate::filter`]); an empty status or name matches any.
pub struct MemberFilter {
    tags: TagPatterns,
    status: Option<Regex>,
    name: Option<Regex>,
}

impl MemberFilter {
    pub fn new(tags: &BTreeMap<String, String>, status: &str, name: &str) -> Result<Self, String> {
        let optional = |pattern: &str| (!pattern.is_empty()).then(|| anchored(pattern)).transpose();
        Ok(MemberFilter {
            tags: TagPatterns::new(tags, anchored)?,
            status: optional(status)?,
            name: optional(name)?,
        })
    }

    pub fn matches(&self, member: &Member) -> bool {
        self.status
            .as_ref()
            .is_none_or(|s| s.is_match(member.status.as_str()))
            && self.name.as_ref().is_none_or(|n| n.is_match(&member.name))
            && self.tags.match_all(&member.tags)
    }
}

/// Serf's event filter: `*`, or a comma list of `member-join`, `member-leave`,
/// `member-failed`, `member-update`, `member-reap`, `user`, `user:NAME`, `query`, `query:NAME`.
#[derive(Debug, Clone)]
pub struct EventFilter(Vec<(String, Option<String>)>);

impl EventFilter {
    /// The filter as Serf's `info` lists handlers: `EVENT:NAME` for each part (`user:deploy`,
    /// `member-join:`, `*:`).
    pub fn serf_keys(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|(kind, name)| format!("{kind}:{}", name.as_deref().unwrap_or("")))
            .collect()
    }

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
    pub(super) fn record(&self, event: &Event) -> Option<Vec<u8>> {
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
