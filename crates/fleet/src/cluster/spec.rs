//! `roles/ROLE`: each role as the controller's fleet file defines it, so that the desired state
//! lives in etcd and every host can tell when its own fleet file says otherwise. Secrets are
//! kept by reference (their names), never their values.

use std::collections::BTreeMap;

use phoenix_store::etcd::Op;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Cluster, ClusterError};
use crate::config::RoleConfig;

/// What every host must agree on about a role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleSpec {
    /// The `[image.NAME]` recipe it runs.
    pub image: String,
    pub instances: u32,
    pub listen: String,
    /// `hosts = { tag = ... }`, as `KEY=VALUE`.
    #[serde(default)]
    pub hosts: Vec<String>,
    pub cpu_millis: u64,
    pub memory: u64,
    /// The names of the secrets it is given (their values stay on the hosts).
    #[serde(default)]
    pub secrets: Vec<String>,
}

impl RoleSpec {
    pub fn of(config: &RoleConfig) -> Self {
        let demand = super::Capacity::of(&config.run.resources);
        RoleSpec {
            image: config.image.clone(),
            instances: config.instances,
            listen: config.listen.to_string(),
            hosts: config
                .hosts
                .tags
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            cpu_millis: demand.cpu_millis,
            memory: demand.memory,
            secrets: config.run.secrets.clone(),
        }
    }
}

/// How `ours` differs from `theirs`, key by key (`instances: 3 there, 4 here`), or `None`.
pub fn difference(theirs: &RoleSpec, ours: &RoleSpec) -> Option<String> {
    let (theirs, ours) = (json!(theirs), json!(ours));
    let (Some(theirs), Some(ours)) = (theirs.as_object(), ours.as_object()) else {
        return None;
    };
    let differences: Vec<String> = theirs
        .iter()
        .filter(|(key, value)| ours.get(*key) != Some(*value))
        .map(|(key, value)| {
            let here = ours.get(key).cloned().unwrap_or_default();
            format!("{key}: {value} there, {here} here")
        })
        .collect();
    (!differences.is_empty()).then(|| differences.join("; "))
}

impl Cluster {
    /// The roles as the controller defined them.
    pub async fn role_specs(&self) -> Result<BTreeMap<String, RoleSpec>, ClusterError> {
        self.read_under("roles/").await
    }

    /// Writes the leader's definition of every role (fenced): changed ones are put, roles no
    /// longer defined are deleted. How many keys changed.
    pub async fn define_roles(
        &self,
        specs: &BTreeMap<String, RoleSpec>,
    ) -> Result<usize, ClusterError> {
        let current = self.role_specs().await?;
        let mut ops = Vec::new();
        for (role, spec) in specs {
            if current.get(role) != Some(spec) {
                let value = serde_json::to_vec(spec).unwrap_or_default();
                ops.push(Op::put(self.key(&format!("roles/{role}")), value));
            }
        }
        for role in current.keys().filter(|r| !specs.contains_key(*r)) {
            ops.push(Op::delete(self.key(&format!("roles/{role}"))));
        }
        if ops.is_empty() {
            return Ok(0);
        }
        self.write_fenced(&ops).await?;
        let roles: Vec<&String> = specs.keys().collect();
        self.journal(
            "roles.defined",
            json!({"roles": roles, "changed": ops.len()}),
        )
        .await?;
        Ok(ops.len())
    }

    /// Where this host's roles differ from the controller's definitions: role → how.
    pub async fn divergence(
        &self,
        ours: &BTreeMap<String, RoleSpec>,
    ) -> Result<BTreeMap<String, String>, ClusterError> {
        let theirs = self.role_specs().await?;
        let mut found = BTreeMap::new();
        // Nothing defined yet (the controller has not had its first round): nothing to say.
        if theirs.is_empty() {
            return Ok(found);
        }
        for (role, spec) in &theirs {
            match ours.get(role) {
                Some(mine) => {
                    if let Some(how) = difference(spec, mine) {
                        found.insert(role.clone(), how);
                    }
                }
                None => {
                    found.insert(role.clone(), "not in this host's fleet file".into());
                }
            }
        }
        for role in ours.keys().filter(|r| !theirs.contains_key(*r)) {
            found.insert(role.clone(), "not in the controller's fleet file".into());
        }
        Ok(found)
    }
}
