//! `allow_from` and `allow_cidrs` of a role: the network policy that guards it. Checked once
//! every role is read, since `allow_from` may name a role further down the file.

use std::collections::BTreeMap;
use std::ops::Range;

use phoenix_driver::{Cidr, Guard};
use toml::Spanned;

use super::{ConfigError, NetworkMode, RoleConfig};

/// A role's policy keys as written, kept with their places for errors.
pub(super) struct RawGuard {
    role: String,
    key_span: Range<usize>,
    allow_from: Vec<Spanned<String>>,
    allow_cidrs: Vec<Cidr>,
}

type At<'a> = &'a dyn Fn(Range<usize>, String) -> ConfigError;

/// Reads a role's keys; the networks are checked here, the role names later.
pub(super) fn read(
    role: &str,
    allow_from: Option<Spanned<Vec<Spanned<String>>>>,
    allow_cidrs: Option<Spanned<Vec<Spanned<String>>>>,
    at: At,
) -> Result<Option<RawGuard>, ConfigError> {
    if allow_from.is_none() && allow_cidrs.is_none() {
        return Ok(None);
    }
    let key_span = allow_from
        .as_ref()
        .or(allow_cidrs.as_ref())
        .map(|key| key.span())
        .unwrap_or(0..0);
    let mut cidrs = Vec::new();
    for cidr in allow_cidrs.map(Spanned::into_inner).unwrap_or_default() {
        let parsed = Cidr::parse(cidr.get_ref()).map_err(|why| {
            at(
                cidr.span(),
                format!("[role.{role}] key `allow_cidrs`: {why}"),
            )
        })?;
        cidrs.push(parsed);
    }
    Ok(Some(RawGuard {
        role: role.to_string(),
        key_span,
        allow_from: allow_from.map(Spanned::into_inner).unwrap_or_default(),
        allow_cidrs: cidrs,
    }))
}

/// Checks that every allowed role exists and that the guarded role and the roles it allows run
/// on the bridge (only there can the kernel tell instances apart), then sets each role's guard.
pub(super) fn apply(
    guards: Vec<RawGuard>,
    roles: &mut BTreeMap<String, RoleConfig>,
    at: At,
) -> Result<(), ConfigError> {
    for raw in guards {
        let role = &raw.role;
        if roles[role].run.network != NetworkMode::Bridge {
            return Err(at(
                raw.key_span,
                format!(
                    "[role.{role}]: a network policy (allow_from, allow_cidrs) guards instances on \
                     the bridge, and this role runs on the host's network: remove network = \
                     \"host\" / driver = \"process\", or the policy"
                ),
            ));
        }
        let mut allow_from = Vec::new();
        for name in &raw.allow_from {
            let Some(allowed) = roles.get(name.get_ref()) else {
                let known: Vec<_> = roles.keys().map(String::as_str).collect();
                return Err(at(
                    name.span(),
                    format!(
                        "[role.{role}] key `allow_from`: no [role.{}] in this file (roles: {})",
                        name.get_ref(),
                        known.join(", ")
                    ),
                ));
            };
            if allowed.run.network != NetworkMode::Bridge {
                return Err(at(
                    name.span(),
                    format!(
                        "[role.{role}] key `allow_from`: role {} runs on the host's network, where \
                         its instances cannot be told from other local processes: run it on the \
                         bridge, or allow its address with allow_cidrs",
                        name.get_ref()
                    ),
                ));
            }
            allow_from.push(name.get_ref().clone());
        }
        roles.get_mut(role).expect("read from this map").guard = Some(Guard {
            allow_from,
            allow_cidrs: raw.allow_cidrs,
        });
    }
    Ok(())
}
