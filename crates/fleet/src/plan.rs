//! `phoenix plan`: what applying a fleet file would change on the running fleet, key by key,
//! with how each change is applied (Terraform's plan → review → apply).

use serde::{Deserialize, Serialize};

use crate::{FleetFile, RoleConfig};

/// The changes a fleet file makes to the running fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// A digest of the running fleet's settings the plan was made against: applying a saved
    /// plan is refused once it moved.
    pub base: String,
    /// The fleet file's text the plan applies.
    pub fleet_text: String,
    pub changes: Vec<Change>,
}

/// One change: a role added or removed, or one key of a role (or `[agent]`, `[network]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub op: Op,
    /// The role; `None` for `[agent]` and `[network]`.
    pub role: Option<String>,
    pub key: Option<String>,
    pub old: Option<String>,
    pub new: Option<String>,
    pub how: How,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Add,
    Remove,
    Change,
}

/// How a change takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum How {
    /// At once, on the running role (read at each use).
    InPlace,
    /// The live generation is scaled to the new size.
    Scale,
    /// A new generation, blue-green.
    NewGeneration,
    /// A role added: its frontend starts, then its first generation.
    Start,
    /// A role removed: its frontend drains, then its instances stop.
    DrainAndRemove,
    /// The frontend moves: the new address serves before the old one drains.
    NewListener,
    /// By `phoenix restart` (instances and open connections kept; not by `apply`).
    Restart,
}

impl How {
    pub fn describe(self) -> &'static str {
        match self {
            How::InPlace => "in place",
            How::Scale => "in place (scale)",
            How::NewGeneration => "new generation (blue-green)",
            How::Start => "start: new listener, first generation",
            How::DrainAndRemove => "drain and remove",
            How::NewListener => "new listener, then the old one drains",
            How::Restart => "phoenix restart (no request dropped)",
        }
    }
}

impl Plan {
    /// True when applying it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The changes that cannot be applied live.
    pub fn needs_restart(&self) -> Vec<&Change> {
        self.changes
            .iter()
            .filter(|c| c.how == How::Restart)
            .collect()
    }

    /// The plan as `terraform plan` shows one: `+`, `-`, `~` lines, old → new.
    pub fn render(&self) -> String {
        if self.changes.is_empty() {
            return "No changes: the running fleet matches the fleet file.\n".into();
        }
        let mut out = String::new();
        for change in &self.changes {
            let what = match (&change.role, &change.key) {
                (Some(role), Some(key)) => format!("role {role} {key}"),
                (Some(role), None) => format!("role {role}"),
                (None, Some(key)) => format!("[{key}]"),
                (None, None) => "fleet".into(),
            };
            let line = match change.op {
                Op::Add => format!("+ {what}"),
                Op::Remove => format!("- {what}"),
                Op::Change => format!(
                    "~ {what}: {} -> {}",
                    change.old.as_deref().unwrap_or("-"),
                    change.new.as_deref().unwrap_or("-")
                ),
            };
            out.push_str(&format!("{line}\n    ({})\n", change.how.describe()));
        }
        let restart = self.needs_restart().len();
        out.push_str(&format!(
            "\nPlan: {} change(s){}.\n",
            self.changes.len(),
            if restart > 0 {
                format!(", {restart} of them only by `phoenix restart`")
            } else {
                String::new()
            }
        ));
        out
    }
}

/// What the running fleet is: its roles' current settings and the file parts it started with.
pub(crate) struct Running<'a> {
    pub applied: &'a FleetFile,
    pub roles: Vec<(String, RoleConfig, u32)>,
    /// A network policy is installed: its rules name roles and ports, so roles and listen
    /// addresses change only with a restart.
    pub policy: bool,
}

/// A digest of what a plan is made against.
pub(crate) fn base(running: &Running) -> String {
    let mut text = String::new();
    for (name, config, size) in &running.roles {
        text.push_str(&format!("{name} {config:?} {size}\n"));
    }
    for (name, recipe) in &running.applied.images {
        text.push_str(&format!("image {name} {recipe:?}\n"));
    }
    text.push_str(&format!(
        "{:?} {:?} {:?} {:?} {:?}",
        running.applied.agent,
        running.applied.network,
        running.applied.logs,
        running.applied.listeners,
        running.applied.webhooks
    ));
    phoenix_image::sha256_digest(text.as_bytes())
}

/// The changes from `running` to `desired` (whose text is `text`).
pub(crate) fn plan(running: &Running, desired: &FleetFile, text: &str) -> Plan {
    let mut changes = Vec::new();
    for (name, config, _) in &running.roles {
        if !desired.roles.contains_key(name) {
            changes.push(role_change(Op::Remove, name, config, running.policy));
        }
    }
    for (name, new) in &desired.roles {
        match running.roles.iter().find(|(n, _, _)| n == name) {
            None => changes.push(role_change(Op::Add, name, new, running.policy)),
            Some((_, old, size)) => {
                let mut diff = role_diff(name, old, new, running.applied, desired);
                for change in &mut diff {
                    if change.key.as_deref() == Some("instances") && *size != old.instances {
                        change.old = Some(format!(
                            "{} (now {size}, set by `phoenix scale`)",
                            old.instances
                        ));
                    }
                }
                for change in &mut diff {
                    if change.how == How::NewListener && running.policy {
                        change.how = How::Restart;
                    }
                }
                changes.extend(diff);
            }
        }
    }
    if running.applied.agent != desired.agent {
        changes.push(section_change("agent"));
    }
    if running.applied.network != desired.network {
        changes.push(section_change("network"));
    }
    if running.applied.logs != desired.logs {
        changes.push(section_change("logs"));
    }
    changes.extend(listener_changes(
        &running.applied.listeners,
        &desired.listeners,
    ));
    if running.applied.webhooks != desired.webhooks {
        // Senders start over with the new settings, each where it left off.
        changes.push(Change {
            how: How::InPlace,
            ..section_change("webhooks")
        });
    }
    Plan {
        base: base(running),
        fleet_text: text.to_string(),
        changes,
    }
}

fn role_change(op: Op, name: &str, config: &RoleConfig, policy: bool) -> Change {
    let summary = format!(
        "image {}, {} instance(s), listen {}",
        config.image, config.instances, config.listen
    );
    let (old, new) = match op {
        Op::Remove => (Some(summary), None),
        _ => (None, Some(summary)),
    };
    let how = match (op, policy) {
        (_, true) => How::Restart,
        (Op::Remove, false) => How::DrainAndRemove,
        (_, false) => How::Start,
    };
    Change {
        op,
        role: Some(name.into()),
        key: None,
        old,
        new,
        how,
    }
}

/// `[listener.NAME]`: routes change in place; a listener added or removed, or its address,
/// certificates, redirect or HSTS changed, waits for a restart.
fn listener_changes(
    old: &std::collections::BTreeMap<String, crate::ListenerConfig>,
    new: &std::collections::BTreeMap<String, crate::ListenerConfig>,
) -> Vec<Change> {
    let names: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let mut changes = Vec::new();
    for name in names {
        let (before, after) = (old.get(name), new.get(name));
        let frame = |l: &crate::ListenerConfig| (l.listen, l.tls.clone(), l.redirect_http, l.hsts);
        let routes = |l: &crate::ListenerConfig| l.describe_routes();
        let (key, how) = match (before, after) {
            (Some(a), Some(b)) if frame(a) != frame(b) => {
                (format!("listener {name}"), How::Restart)
            }
            (Some(a), Some(b)) if routes(a) != routes(b) => {
                (format!("listener {name} routes"), How::InPlace)
            }
            (Some(_), Some(_)) => continue,
            _ => (format!("listener {name}"), How::Restart),
        };
        changes.push(Change {
            op: Op::Change,
            role: None,
            new: after.map(routes),
            old: before.map(routes),
            key: Some(key),
            how,
        });
    }
    changes
}

fn section_change(key: &str) -> Change {
    // Values are not shown: `[agent]` may hold the cluster key.
    Change {
        op: Op::Change,
        role: None,
        key: Some(key.into()),
        old: None,
        new: Some("changed".into()),
        how: How::Restart,
    }
}

/// Every key of a role that differs, with how it is applied.
fn role_diff(
    name: &str,
    old: &RoleConfig,
    new: &RoleConfig,
    applied: &FleetFile,
    desired: &FleetFile,
) -> Vec<Change> {
    let keys = |c: &RoleConfig, fleet: &FleetFile| -> Vec<(&'static str, String, How)> {
        let recipe = fleet
            .images
            .get(&c.image)
            .map(|r| {
                phoenix_image::short_digest(&phoenix_image::sha256_digest(
                    format!("{r:?}").as_bytes(),
                ))
                .to_string()
            })
            .unwrap_or_default();
        vec![
            ("image", c.image.clone(), How::NewGeneration),
            ("recipe", recipe, How::NewGeneration),
            ("instances", c.instances.to_string(), How::Scale),
            ("listen", c.listen.to_string(), How::NewListener),
            (
                "stop_timeout",
                format!("{:?}", c.stop_timeout),
                How::InPlace,
            ),
            // What is checked depends on the version; how often and how strictly does not.
            (
                "health.check",
                format!("{:?}", c.health.check),
                How::NewGeneration,
            ),
            ("health.path", c.health.path.clone(), How::NewGeneration),
            (
                "health.interval",
                format!("{:?}", c.health.interval),
                How::InPlace,
            ),
            (
                "health.timeout",
                format!("{:?}", c.health.timeout),
                How::InPlace,
            ),
            (
                "health.healthy_threshold",
                c.health.healthy_threshold.to_string(),
                How::InPlace,
            ),
            (
                "health.unhealthy_threshold",
                c.health.unhealthy_threshold.to_string(),
                How::InPlace,
            ),
            ("deploy", format!("{:?}", c.deploy), How::InPlace),
            // A frontend's mode and slots are its listener's; the rest is read per request.
            ("proxy.mode", format!("{:?}", c.proxy.mode), How::Restart),
            (
                "proxy.max_connections",
                format!("{:?}", c.proxy.max_connections),
                How::Restart,
            ),
            (
                "proxy.connect_timeout",
                format!("{:?}", c.proxy.connect_timeout),
                How::InPlace,
            ),
            (
                "proxy.request_timeout",
                format!("{:?}", c.proxy.request_timeout),
                How::InPlace,
            ),
            (
                "proxy.idle_timeout",
                format!("{:?}", c.proxy.idle_timeout),
                How::InPlace,
            ),
            (
                "proxy.request_head_timeout",
                format!("{:?}", c.proxy.request_head_timeout),
                How::InPlace,
            ),
            ("proxy.max_body", c.proxy.max_body.to_string(), How::InPlace),
            (
                "proxy.max_connections_per_client",
                format!("{:?}", c.proxy.max_connections_per_client),
                How::InPlace,
            ),
            ("drift_check", format!("{:?}", c.drift_check), How::InPlace),
            ("autoscale", format!("{:?}", c.autoscale), How::InPlace),
            ("max_age", format!("{:?}", c.max_age), How::InPlace),
            ("chaos", format!("{:?}", c.chaos), How::InPlace),
            // The store takes a role's retention when Phoenix starts.
            ("logs", format!("{:?}", c.logs), How::Restart),
            ("driver", format!("{:?}", c.run.driver), How::Restart),
            ("runtime", format!("{:?}", c.run.runtime), How::Restart),
            ("network", format!("{:?}", c.run.network), How::Restart),
            ("port", format!("{:?}", c.run.port), How::NewGeneration),
            ("user", format!("{:?}", c.run.user), How::NewGeneration),
            (
                "allow_root",
                c.run.allow_root.to_string(),
                How::NewGeneration,
            ),
            (
                "resources",
                format!("{:?}", c.run.resources),
                How::NewGeneration,
            ),
            ("env", format!("{:?}", c.run.env), How::NewGeneration),
            (
                "secrets",
                format!("{:?}", c.run.secrets),
                How::NewGeneration,
            ),
            (
                "allow_from",
                format!("{:?}", c.guard.as_ref().map(|g| &g.allow_from)),
                How::Restart,
            ),
            (
                "allow_cidrs",
                format!(
                    "{:?}",
                    c.guard.as_ref().map(|g| g
                        .allow_cidrs
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>())
                ),
                How::Restart,
            ),
        ]
    };
    keys(old, applied)
        .into_iter()
        .zip(keys(new, desired))
        .filter(|((_, a, _), (_, b, _))| a != b)
        .map(|((key, a, how), (_, b, _))| Change {
            op: Op::Change,
            role: Some(name.into()),
            key: Some(key.into()),
            old: Some(a),
            new: Some(b),
            how,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fleet(extra: &str, instances: u32, version: &str) -> (FleetFile, String) {
        let text = format!(
            "[image.hello]\nfrom = \"scratch\"\nentrypoint = [\"/bin/hello\"]\nenv = {{ VERSION = \"{version}\" }}\n\n\
             [role.web]\nimage = \"hello\"\ninstances = {instances}\nlisten = \"127.0.0.1:8080\"\n\n{extra}"
        );
        (
            FleetFile::parse(Path::new("phoenix.toml"), &text).unwrap(),
            text,
        )
    }

    fn running(file: &FleetFile) -> Running<'_> {
        Running {
            applied: file,
            roles: file
                .roles
                .iter()
                .map(|(n, c)| (n.clone(), c.clone(), c.instances))
                .collect(),
            policy: false,
        }
    }

    #[test]
    fn the_same_file_plans_nothing() {
        let (file, text) = fleet("", 2, "v1");
        let plan = plan(&running(&file), &file, &text);
        assert!(plan.is_empty());
        assert!(plan.render().starts_with("No changes"));
    }

    #[test]
    fn each_change_says_how_it_is_applied() {
        let (old, _) = fleet("", 2, "v1");
        let api = "[role.api]\nimage = \"hello\"\nlisten = \"127.0.0.1:8081\"\n";
        let (new, text) = fleet(api, 3, "v2");
        let plan = plan(&running(&old), &new, &text);
        let find = |role: &str, key: Option<&str>| {
            plan.changes
                .iter()
                .find(|c| c.role.as_deref() == Some(role) && c.key.as_deref() == key)
                .unwrap_or_else(|| panic!("{role} {key:?} in {plan:?}"))
                .clone()
        };
        let instances = find("web", Some("instances"));
        assert_eq!(
            (instances.old.as_deref(), instances.new.as_deref()),
            (Some("2"), Some("3"))
        );
        assert_eq!(instances.how, How::Scale);
        assert_eq!(find("web", Some("recipe")).how, How::NewGeneration);
        assert_eq!(find("api", None).op, Op::Add);
        assert_eq!(plan.changes.len(), 3, "{plan:?}");
        let shown = plan.render();
        assert!(
            shown.contains("~ role web instances: 2 -> 3\n    (in place (scale))"),
            "{shown}"
        );
        assert!(
            shown.contains("+ role api\n    (start: new listener, first generation)"),
            "{shown}"
        );
        assert!(shown.contains("new generation (blue-green)"), "{shown}");
        assert!(plan.needs_restart().is_empty());
        // With a network policy, roles come and go only with a restart.
        let mut guarded = running(&old);
        guarded.policy = true;
        let restart = super::plan(&guarded, &new, &text);
        assert_eq!(restart.needs_restart().len(), 1);
        // Removing a role; a base that moves with the running state.
        let back = super::plan(&running(&new), &old, "");
        assert!(
            back.changes
                .iter()
                .any(|c| c.op == Op::Remove && c.role.as_deref() == Some("api"))
        );
        assert_ne!(base(&running(&old)), base(&running(&new)));
    }
}
