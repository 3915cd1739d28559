//! Which driver and network each role runs on: what the fleet file asks for, and what this
//! host can do. The isolating driver is the default; where it cannot run (Phoenix is not root,
//! no cgroup memory controller), a role that did not name its driver falls back to the
//! process driver, with a warning that says why. A role that names a driver gets it or an
//! error.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use phoenix_driver::{
    Bridge, BridgeConfig, ContainerDriver, Driver, DriverError, Guard, Network, PolicyConfig,
    ProcessDriver, Recorded, RoleRule, Runtime, Subnet,
};

use crate::config::{DriverKind, NetworkMode};
use crate::{FleetError, FleetFile, RoleConfig};

/// The host uid and gid that uid 0 of every instance's user namespace maps to; the 65,536
/// ids from here on are the instances'. High, to stay clear of users and of the subordinate
/// ranges `useradd` hands out.
pub const ID_OFFSET: u32 = 1_800_000_000;

/// Where one role's instances run.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    pub driver: Arc<dyn Driver>,
    pub network: Network,
}

/// The drivers of one `phoenix up`, and the bridge they share.
pub(crate) struct Drivers {
    by_name: BTreeMap<String, Arc<dyn Driver>>,
    containers: Vec<Arc<ContainerDriver>>,
    placements: BTreeMap<String, Placement>,
    bridge: Option<Arc<Bridge>>,
    /// What could not be done as asked, and what was done instead.
    pub warnings: Vec<String>,
}

impl Drivers {
    /// Chooses every role's driver and network; creates the bridge when a role needs one and
    /// `bridge` allows it (else every role runs on the host's network: what a CLI command that
    /// runs beside `phoenix up` may do).
    /// A bridge handed over by the previous program of this process (`adopt`) is taken over
    /// when the fleet file still asks for it. In a cluster (`publish_on`: this host's
    /// address) the bridge's instances are published to the other hosts.
    pub fn open(
        fleet: &FleetFile,
        state_dir: &Path,
        bridge: bool,
        adopt: Option<&crate::handover::HandedBridge>,
        publish_on: Option<Ipv4Addr>,
    ) -> Result<Drivers, FleetError> {
        let mut drivers = Drivers::empty();
        let process: Arc<dyn Driver> = Arc::new(ProcessDriver);
        drivers.by_name.insert("process".into(), process.clone());
        let mut needs_bridge = false;
        let mut chosen = Vec::new();
        for (name, role) in &fleet.roles {
            let (driver, fell_back) = drivers.driver_for(name, role, state_dir, &process)?;
            let network = match (fell_back, role.run.network) {
                (false, NetworkMode::Bridge) if bridge => {
                    needs_bridge = true;
                    NetworkMode::Bridge
                }
                _ => NetworkMode::Host,
            };
            chosen.push((name.clone(), driver, network));
        }
        if needs_bridge {
            let config = bridge_config(fleet, state_dir)?;
            let kept = adopt
                .filter(|handed| handed.name == config.name)
                .and_then(|handed| Subnet::parse(&handed.subnet).ok())
                .and_then(|subnet| match Bridge::adopt(&config, subnet) {
                    Ok(bridge) => Some(bridge),
                    Err(error) => {
                        tracing::warn!(%error, "the bridge is made again");
                        None
                    }
                });
            let bridge = match kept {
                Some(bridge) => bridge,
                None => Bridge::create(&config)?,
            };
            if let Some(host_ip) = publish_on {
                publish(fleet, &bridge, host_ip)?;
            }
            drivers.bridge = Some(bridge);
        }
        for (name, driver, network) in chosen {
            let network = match (network, &drivers.bridge) {
                (NetworkMode::Bridge, Some(bridge)) => Network::Bridge(bridge.clone()),
                _ => Network::Host,
            };
            drivers
                .placements
                .insert(name, Placement { driver, network });
        }
        Ok(drivers)
    }

    /// One driver for every role, on the host's network (tests inject theirs so).
    pub fn single(fleet: &FleetFile, driver: Arc<dyn Driver>) -> Drivers {
        let mut drivers = Drivers::empty();
        drivers
            .by_name
            .insert(driver.name().to_string(), driver.clone());
        for name in fleet.roles.keys() {
            let placement = Placement {
                driver: driver.clone(),
                network: Network::Host,
            };
            drivers.placements.insert(name.clone(), placement);
        }
        drivers
    }

    fn empty() -> Drivers {
        Drivers {
            by_name: BTreeMap::new(),
            containers: Vec::new(),
            placements: BTreeMap::new(),
            bridge: None,
            warnings: Vec::new(),
        }
    }

    /// The driver of one role, and whether it is the process driver in place of containers.
    fn driver_for(
        &mut self,
        role_name: &str,
        role: &RoleConfig,
        state_dir: &Path,
        process: &Arc<dyn Driver>,
    ) -> Result<(Arc<dyn Driver>, bool), FleetError> {
        let run = &role.run;
        let runtime = match run.driver {
            DriverKind::Process => return Ok((process.clone(), false)),
            DriverKind::Isolating => Runtime::Builtin,
            DriverKind::Runc => {
                Runtime::Oci(find_program(run.runtime.as_deref().unwrap_or("runc")))
            }
        };
        if let Some(existing) = self.containers.iter().find(|d| *d.runtime() == runtime) {
            return Ok((existing.clone(), false));
        }
        match ContainerDriver::new(runtime, state_dir, ID_OFFSET) {
            Ok(driver) => {
                let driver = Arc::new(driver);
                self.containers.push(driver.clone());
                self.by_name
                    .insert(driver.name().to_string(), driver.clone());
                Ok((driver, false))
            }
            Err(why) if !run.driver_explicit => {
                self.warnings.push(format!(
                    "role {role_name}: instances run with the process driver, without isolation \
                     (no own root, user, namespaces, network, limits): the isolating driver \
                     cannot run here: {why}"
                ));
                Ok((process.clone(), true))
            }
            Err(why) => Err(FleetError::Driver(
                phoenix_driver::DriverError::Unsupported(format!(
                    "role {role_name}: driver = \"{}\" cannot run here: {why}",
                    run.driver.name()
                )),
            )),
        }
    }

    /// Where `role` runs; roles not known when `phoenix up` started run on the default.
    pub fn placement(&self, role: &str) -> Placement {
        self.placements
            .get(role)
            .cloned()
            .or_else(|| self.placements.values().next().cloned())
            .unwrap_or_else(|| Placement {
                driver: self
                    .by_name
                    .get("process")
                    .cloned()
                    .unwrap_or_else(|| Arc::new(ProcessDriver)),
                network: Network::Host,
            })
    }

    pub fn bridge(&self) -> Option<&Arc<Bridge>> {
        self.bridge.as_ref()
    }

    /// Installs the network policy on the bridge once every role's proxy has its address
    /// (`listen`, as bound). A guarded role whose instances would not be on the bridge (the
    /// isolating driver cannot run here) is an error: a policy is never silently dropped.
    pub fn guard(&self, roles: &[(String, SocketAddr, Option<Guard>)]) -> Result<(), FleetError> {
        let bridged = |name: &str| {
            self.placements
                .get(name)
                .is_some_and(|p| matches!(p.network, Network::Bridge(_)))
        };
        if let Some((name, _, _)) = roles
            .iter()
            .find(|(name, _, guard)| guard.is_some() && !bridged(name))
        {
            let why = self
                .warnings
                .iter()
                .find(|w| w.starts_with(&format!("role {name}:")))
                .cloned()
                .unwrap_or_else(|| format!("role {name}: its instances do not run on the bridge"));
            return Err(FleetError::Driver(DriverError::Unsupported(format!(
                "role {name} has a network policy (allow_from, allow_cidrs), which only containers \
                 on Phoenix's bridge can have, and cannot be enforced here ({why})"
            ))));
        }
        let Some(bridge) = &self.bridge else {
            return Ok(());
        };
        let policy = PolicyConfig {
            roles: roles
                .iter()
                .filter(|(name, _, _)| bridged(name))
                .map(|(name, listen, guard)| RoleRule {
                    name: name.clone(),
                    listen: *listen,
                    guard: guard.clone(),
                })
                .collect(),
        };
        Ok(bridge.guard(&policy)?)
    }

    /// Ends what a previous run left of an instance, with the driver that ran it (or every
    /// container driver when that one is not here now).
    pub fn clean_up(&self, driver: &str, recorded: &Recorded) -> bool {
        match self.by_name.get(driver) {
            Some(driver) => driver.cleanup(recorded),
            None if driver == "process" => ProcessDriver.cleanup(recorded),
            None => self.containers.iter().any(|d| d.cleanup(recorded)),
        }
    }

    /// Ends the containers a killed Phoenix left that no record names (verifications'
    /// throwaway instances); returns their names.
    pub fn clean_orphans(&self) -> Vec<String> {
        let mut cleaned = Vec::new();
        for container in &self.containers {
            for name in container.orphans() {
                let recorded = Recorded {
                    name: name.clone(),
                    pid: None,
                    pid_start: None,
                };
                container.cleanup(&recorded);
                cleaned.push(name);
            }
        }
        cleaned
    }

    /// At shutdown, once every instance stopped: the bridge and the parent cgroups go.
    pub fn shut_down(&self) {
        for container in &self.containers {
            container.shut_down();
        }
        if let Some(bridge) = &self.bridge
            && let Err(error) = bridge.remove()
        {
            tracing::warn!(%error, "removing the bridge");
        }
    }
}

/// Publishes the bridge's instances at `host_ip`, on ports no role listens on there.
fn publish(fleet: &FleetFile, bridge: &Bridge, host_ip: Ipv4Addr) -> Result<(), FleetError> {
    let first = fleet
        .network
        .first_host_port
        .unwrap_or(crate::config::DEFAULT_FIRST_HOST_PORT);
    let last = u32::from(first) + (1u32 << (32 - u32::from(bridge.subnet().prefix))) - 1;
    let clash = fleet.roles.iter().find(|(_, role)| {
        let ip = role.listen.ip();
        (ip.is_unspecified() || ip == std::net::IpAddr::V4(host_ip))
            && (u32::from(first)..=last).contains(&u32::from(role.listen.port()))
    });
    if let Some((name, role)) = clash {
        return Err(FleetError::Driver(DriverError::Network(format!(
            "[role.{name}] listen = \"{}\" in {}: other hosts reach this host's instances on \
             ports {first} to {last}: choose a port outside them, or move them with \
             `[network] first_host_port`",
            role.listen,
            fleet.path.display()
        ))));
    }
    Ok(bridge.publish(host_ip, first)?)
}

fn bridge_config(fleet: &FleetFile, state_dir: &Path) -> Result<BridgeConfig, FleetError> {
    let subnet = match &fleet.network.subnet {
        Some(text) => Some(Subnet::parse(text).map_err(|why| {
            FleetError::Driver(phoenix_driver::DriverError::Network(format!(
                "[network] subnet in {}: {why}",
                fleet.path.display()
            )))
        })?),
        None => None,
    };
    Ok(BridgeConfig {
        name: fleet
            .network
            .bridge
            .clone()
            .unwrap_or_else(|| format!("phx{}", phoenix_driver::state_hash(state_dir))),
        subnet,
    })
}

/// A program by name on the PATH (and the sbin directories, where runc lives), or the path as
/// given.
fn find_program(program: &str) -> std::path::PathBuf {
    if program.contains('/') {
        return program.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| program.into())
}
