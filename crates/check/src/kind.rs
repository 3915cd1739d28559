//! The resource types and the attributes each one knows, as goss defines them.

use crate::matcher::{Invalid, Shape};
use crate::suite::Check;
use crate::yaml::{Node, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Package,
    Service,
    Port,
    Process,
    Command,
    Http,
    User,
    Group,
    Addr,
    Dns,
    KernelParam,
    Mount,
    Interface,
    Matching,
}

/// What an attribute is for.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    /// Compared with the system's value.
    Checked(Shape),
    /// Changes how the check runs.
    Setting(Setting),
}

#[derive(Debug, Clone, Copy)]
pub enum Setting {
    Bool,
    /// Milliseconds.
    Millis,
    Text,
    TextList,
    Any,
    /// A non-negative whole number.
    Count,
    /// Milliseconds as a number, or a Go duration (`250ms`, `2s`), as goss's `retry_delay`.
    Delay,
}

impl Setting {
    pub fn validate(self, node: &Node) -> Result<(), Invalid> {
        let ok = match (self, &node.value) {
            (Setting::Bool, Value::Bool(_)) | (Setting::Any, _) => true,
            // 0 means the default, as in goss (`resource/command.go`).
            (Setting::Millis, Value::Int(n)) => *n >= 0,
            (Setting::Text, v) => !matches!(v, Value::Null | Value::Seq(_) | Value::Map(_)),
            (Setting::TextList, Value::Seq(items)) => items.iter().all(|i| i.as_text().is_some()),
            (Setting::Count, Value::Int(n)) => *n >= 0,
            (Setting::Delay, Value::Int(n)) => *n >= 0,
            (Setting::Delay, Value::Float(n)) => *n >= 0.0,
            (Setting::Delay, Value::Str(text)) => crate::go_duration(text.trim()).is_ok(),
            _ => false,
        };
        let wanted = match self {
            Setting::Bool => "true or false",
            Setting::Millis => "a number of milliseconds (0: the default)",
            Setting::Text => "a string",
            Setting::TextList => "a list of strings",
            Setting::Any => "anything",
            Setting::Count => "a whole number, 0 or more",
            Setting::Delay => "milliseconds or a duration like 250ms or 2s",
        };
        match ok {
            true => Ok(()),
            false => Err(Invalid::at(
                node,
                format!("expected {wanted}, found {}", node.kind()),
            )),
        }
    }
}

const S: Role = Role::Checked(Shape::Scalar);
const L: Role = Role::Checked(Shape::List);
const T: Role = Role::Checked(Shape::Text);
const MILLIS: Role = Role::Setting(Setting::Millis);
const RETRY_COUNT: (&str, Role) = ("retry_count", Role::Setting(Setting::Count));
const RETRY_DELAY: (&str, Role) = ("retry_delay", Role::Setting(Setting::Delay));

const ALL: &[(Kind, &str, &str)] = &[
    (Kind::File, "file", "File"),
    (Kind::Package, "package", "Package"),
    (Kind::Service, "service", "Service"),
    (Kind::Port, "port", "Port"),
    (Kind::Process, "process", "Process"),
    (Kind::Command, "command", "Command"),
    (Kind::Http, "http", "HTTP"),
    (Kind::User, "user", "User"),
    (Kind::Group, "group", "Group"),
    (Kind::Addr, "addr", "Addr"),
    (Kind::Dns, "dns", "DNS"),
    (Kind::KernelParam, "kernel-param", "KernelParam"),
    (Kind::Mount, "mount", "Mount"),
    (Kind::Interface, "interface", "Interface"),
    (Kind::Matching, "matching", "Matching"),
];

impl Kind {
    pub fn from_key(key: &str) -> Option<Kind> {
        ALL.iter()
            .find(|(_, name, _)| *name == key)
            .map(|(kind, _, _)| *kind)
    }

    /// Every top-level key, `gossfile` included.
    pub fn names() -> Vec<&'static str> {
        ALL.iter()
            .map(|(_, name, _)| *name)
            .chain(["gossfile"])
            .collect()
    }

    /// The key in a goss file (`kernel-param`).
    pub fn name(self) -> &'static str {
        ALL.iter()
            .find(|(k, _, _)| *k == self)
            .map_or("", |(_, name, _)| name)
    }

    /// The name in reports (`KernelParam`), as goss prints it.
    pub fn title(self) -> &'static str {
        ALL.iter()
            .find(|(k, _, _)| *k == self)
            .map_or("", |(_, _, title)| title)
    }

    fn schema(self) -> &'static [(&'static str, Role)] {
        match self {
            Kind::File => &[
                ("exists", S),
                ("mode", S),
                ("size", S),
                ("owner", S),
                ("group", S),
                ("uid", S),
                ("gid", S),
                ("filetype", S),
                ("contents", T),
                ("contains", T),
                ("md5", S),
                ("sha256", S),
                ("sha512", S),
                ("linked-to", S),
                ("path", Role::Setting(Setting::Text)),
            ],
            Kind::Package => &[
                ("installed", S),
                ("versions", L),
                ("name", Role::Setting(Setting::Text)),
                RETRY_COUNT,
                RETRY_DELAY,
            ],
            Kind::Service => &[
                ("enabled", S),
                ("running", S),
                ("name", Role::Setting(Setting::Text)),
            ],
            Kind::Port => &[("listening", S), ("ip", L)],
            Kind::Process => &[("running", S), ("comm", Role::Setting(Setting::Text))],
            Kind::Command => &[
                ("exit-status", S),
                ("stdout", T),
                ("stderr", T),
                ("exec", Role::Setting(Setting::Text)),
                ("timeout", MILLIS),
                RETRY_COUNT,
                RETRY_DELAY,
            ],
            Kind::Http => &[
                ("status", S),
                ("body", T),
                ("headers", T),
                ("allow-insecure", Role::Setting(Setting::Bool)),
                ("no-follow-redirects", Role::Setting(Setting::Bool)),
                ("timeout", MILLIS),
                ("method", Role::Setting(Setting::Text)),
                ("request-headers", Role::Setting(Setting::TextList)),
                ("request-body", Role::Setting(Setting::Text)),
                ("username", Role::Setting(Setting::Text)),
                ("password", Role::Setting(Setting::Text)),
                ("url", Role::Setting(Setting::Text)),
                ("ca-file", Role::Setting(Setting::Text)),
                ("cert-file", Role::Setting(Setting::Text)),
                ("key-file", Role::Setting(Setting::Text)),
                ("proxy", Role::Setting(Setting::Text)),
            ],
            Kind::User => &[
                ("exists", S),
                ("uid", S),
                ("gid", S),
                ("groups", L),
                ("home", S),
                ("shell", S),
                ("username", Role::Setting(Setting::Text)),
            ],
            Kind::Group => &[
                ("exists", S),
                ("gid", S),
                ("groupname", Role::Setting(Setting::Text)),
            ],
            Kind::Addr => &[
                ("reachable", S),
                ("timeout", MILLIS),
                ("address", Role::Setting(Setting::Text)),
            ],
            Kind::Dns => &[
                ("resolvable", S),
                ("addrs", L),
                ("timeout", MILLIS),
                ("resolve", Role::Setting(Setting::Text)),
                ("server", Role::Setting(Setting::Text)),
                RETRY_COUNT,
                RETRY_DELAY,
            ],
            Kind::KernelParam => &[("value", S), ("name", Role::Setting(Setting::Text))],
            Kind::Mount => &[
                ("exists", S),
                ("opts", L),
                ("vfs-opts", L),
                ("source", S),
                ("filesystem", S),
                ("usage", S),
                ("mountpoint", Role::Setting(Setting::Text)),
            ],
            Kind::Interface => &[
                ("exists", S),
                ("addrs", L),
                ("mtu", S),
                ("name", Role::Setting(Setting::Text)),
            ],
            Kind::Matching => &[("matches", S), ("content", Role::Setting(Setting::Any))],
        }
    }

    /// The setting that names what is checked when it is not the key (goss's attributes that
    /// default to the key: `service: {sshd: {name: ssh}}` checks `ssh`, reported as `sshd`).
    pub fn target_setting(self) -> Option<&'static str> {
        Some(match self {
            Kind::File => "path",
            Kind::Command => "exec",
            Kind::Package | Kind::Service | Kind::KernelParam | Kind::Interface => "name",
            Kind::Process => "comm",
            Kind::User => "username",
            Kind::Group => "groupname",
            Kind::Addr => "address",
            Kind::Dns => "resolve",
            Kind::Mount => "mountpoint",
            Kind::Http => "url",
            Kind::Port | Kind::Matching => return None,
        })
    }

    /// The attribute goss checks first: when it fails, or finds `false` (no such file, package
    /// not installed), the others are skipped, as goss's `shouldSkip` does.
    pub fn gate(self) -> Option<&'static str> {
        Some(match self {
            Kind::File | Kind::User | Kind::Group | Kind::Mount | Kind::Interface => "exists",
            Kind::Package => "installed",
            Kind::Port => "listening",
            Kind::Dns => "resolvable",
            Kind::Http => "status",
            _ => return None,
        })
    }

    /// The attribute's canonical name and role, if this type has it.
    pub fn role(self, attribute: &str) -> Option<(&'static str, Role)> {
        // goss's old spelling, reported under the new one as goss does.
        let attribute = match (self, attribute) {
            (Kind::Dns, "resolveable") => "resolvable",
            _ => attribute,
        };
        self.schema()
            .iter()
            .find(|(name, _)| *name == attribute)
            .copied()
    }

    pub fn attribute_names(self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.schema().iter().map(|(name, _)| *name).collect();
        names.extend(["skip", "title", "meta"]);
        names
    }

    /// Checks a resource key's form (`tcp:22`, `tcp://host:80`, `http://...`).
    pub fn validate_id(self, id: &str) -> Result<(), String> {
        if id.is_empty() {
            return Err(format!("{} needs a non-empty key", self.name()));
        }
        match self {
            Kind::Port => crate::probe::net::parse_port(id).map(|_| ()),
            Kind::Addr => crate::probe::net::parse_addr(id).map(|_| ()),
            Kind::Http => crate::probe::http::Url::parse(id).map(|_| ()),
            Kind::Dns => crate::probe::net::parse_dns(id).map(|_| ()),
            _ => Ok(()),
        }
    }

    /// Checks what the schema alone cannot: required settings.
    pub fn validate(self, check: &Check) -> Result<(), String> {
        if self == Kind::Matching && !check.options.contains_key("content") {
            return Err(format!("matching {:?} needs `content`", check.id));
        }
        Ok(())
    }
}
