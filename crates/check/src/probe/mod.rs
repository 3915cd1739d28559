//! Observing the system: what each resource type reads, and the tables (users, groups,
//! packages, processes, listening ports, mounts, interfaces) read at most once per run and
//! shared by every check of that run.

pub(crate) mod command;
pub(crate) mod dns;
pub(crate) mod file;
pub(crate) mod host;
pub(crate) mod http;
pub(crate) mod net;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value as Json;

use crate::kind::Kind;
use crate::suite::Check;

/// What the checks look at: this machine, or an instance's root.
///
/// Files, users, groups, packages and services are read under `root`. Processes, ports,
/// mounts, interfaces, kernel parameters, HTTP, addresses and DNS are those of the machine the
/// checks run on: an instance of the process driver shares them with it.
#[derive(Debug, Clone)]
pub struct Target {
    pub root: PathBuf,
    /// The environment of `command` checks; `None` inherits this process's environment.
    pub env: Option<Vec<(String, String)>>,
    /// The working directory of `command` checks.
    pub workdir: Option<PathBuf>,
}

impl Target {
    /// This machine.
    pub fn host() -> Target {
        Target {
            root: PathBuf::from("/"),
            env: None,
            workdir: None,
        }
    }

    pub fn is_host(&self) -> bool {
        self.root == Path::new("/")
    }

    /// `path` (absolute, as written in the check) under the root, symlinks resolved inside it.
    pub fn path(&self, path: &str) -> PathBuf {
        if self.is_host() {
            return PathBuf::from(path);
        }
        file::resolve_in_root(&self.root, path)
    }
}

type Table<T> = OnceLock<Result<T, String>>;

/// Reads one attribute's value of a check.
type Lookup<'a> = Box<dyn Fn(&str) -> Result<Json, String> + 'a>;

/// One run's view of the system. Tables are read on first use, once.
pub struct System<'a> {
    pub target: &'a Target,
    users: Table<Vec<host::User>>,
    groups: Table<Vec<host::Group>>,
    packages: Table<host::Packages>,
    processes: Table<Vec<String>>,
    ports: Table<Vec<net::Listener>>,
    mounts: Table<Vec<host::Mount>>,
    interfaces: Table<Vec<net::Interface>>,
}

impl<'a> System<'a> {
    pub fn new(target: &'a Target) -> System<'a> {
        System {
            target,
            users: OnceLock::new(),
            groups: OnceLock::new(),
            packages: OnceLock::new(),
            processes: OnceLock::new(),
            ports: OnceLock::new(),
            mounts: OnceLock::new(),
            interfaces: OnceLock::new(),
        }
    }

    pub fn users(&self) -> Result<&[host::User], String> {
        table(&self.users, || host::read_users(self.target)).map(Vec::as_slice)
    }

    pub fn groups(&self) -> Result<&[host::Group], String> {
        table(&self.groups, || host::read_groups(self.target)).map(Vec::as_slice)
    }

    pub fn packages(&self) -> Result<&host::Packages, String> {
        table(&self.packages, || host::read_packages(self.target))
    }

    pub fn processes(&self) -> Result<&[String], String> {
        table(&self.processes, host::read_processes).map(Vec::as_slice)
    }

    pub fn ports(&self) -> Result<&[net::Listener], String> {
        table(&self.ports, net::read_listeners).map(Vec::as_slice)
    }

    pub fn mounts(&self) -> Result<&[host::Mount], String> {
        table(&self.mounts, host::read_mounts).map(Vec::as_slice)
    }

    pub fn interfaces(&self) -> Result<&[net::Interface], String> {
        table(&self.interfaces, net::read_interfaces).map(Vec::as_slice)
    }
}

fn table<T>(cell: &Table<T>, read: impl FnOnce() -> Result<T, String>) -> Result<&T, String> {
    cell.get_or_init(read).as_ref().map_err(Clone::clone)
}

/// What the system shows for each of the check's attributes, in order. An `Err` is a value
/// that could not be read (the attribute fails with that message).
pub fn observe(check: &Check, system: &System) -> Vec<Result<Json, String>> {
    let names: Vec<&str> = check.attributes.iter().map(|a| a.name).collect();
    let lookup: Lookup = match check.kind {
        Kind::File => Box::new(file::observe(check, system)),
        Kind::Package => Box::new(host::package(check, system)),
        Kind::Service => Box::new(host::service(check, system)),
        Kind::Port => Box::new(net::port(check, system)),
        Kind::Process => Box::new(host::process(check, system)),
        Kind::Command => Box::new(command::observe(check, system)),
        Kind::Http => Box::new(http::observe(check)),
        Kind::User => Box::new(host::user(check, system)),
        Kind::Group => Box::new(host::group(check, system)),
        Kind::Addr => Box::new(net::addr(check)),
        Kind::Dns => Box::new(net::dns(check)),
        Kind::KernelParam => Box::new(host::kernel_param(check)),
        Kind::Mount => Box::new(host::mount(check, system)),
        Kind::Interface => Box::new(net::interface(check, system)),
        Kind::Matching => {
            let content = check.options.get("content").cloned().unwrap_or_default();
            Box::new(move |_: &str| Ok(content.clone()))
        }
    };
    names.into_iter().map(lookup).collect()
}
