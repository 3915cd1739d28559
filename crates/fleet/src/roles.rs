//! Roles at run time: their frontends (bound, served, stopped with a drain), their background
//! loops, and the changes `apply` makes without a restart — a role added, a role removed, a
//! role's listen address moved.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use phoenix_proxy::{Leftover, Parked, Stop};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::controller::{Controller, Inner, Role};
use crate::deploy::{DeployOptions, DeployReport, Progress};
use crate::{FleetError, RoleConfig};

/// One listening socket of a role's proxy, served until told to stop.
#[derive(Debug)]
pub(crate) struct Frontend {
    pub addr: SocketAddr,
    stop: watch::Sender<Stop>,
    task: tokio::task::JoinHandle<Leftover>,
}

/// Binds a role's frontend on `listen` (port 0: any free port), and, when that is loopback and
/// instances live on a bridge, on the bridge's address at the same port (instances reach the
/// role there). Returns the address bound.
pub(crate) async fn bind(
    role: &str,
    listen: SocketAddr,
    gateway: Option<Ipv4Addr>,
) -> Result<(SocketAddr, Vec<TcpListener>), FleetError> {
    let failed = |addr, cause| FleetError::Listen {
        role: role.to_string(),
        addr,
        cause,
    };
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|cause| failed(listen, cause))?;
    let bound = listener
        .local_addr()
        .map_err(|cause| failed(listen, cause))?;
    let mut listeners = vec![listener];
    if let Some(gateway) = gateway
        && bound.ip().is_loopback()
    {
        let addr = SocketAddr::from((gateway, bound.port()));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|cause| failed(addr, cause))?;
        listeners.push(listener);
    }
    Ok((bound, listeners))
}

/// The listeners the previous program handed over for `role`, when they still fit its
/// `listen` (the same address, or any port when it asks for port 0): the address bound and
/// the listeners.
pub(crate) fn take_inherited(
    inherited: &mut crate::handover::Handed,
    role: &str,
    listen: SocketAddr,
) -> Option<(SocketAddr, Vec<TcpListener>)> {
    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut inherited.frontends)
        .into_iter()
        .partition(|(r, _)| r == role);
    inherited.frontends = rest;
    let mut listeners = Vec::new();
    let mut bound = None;
    for (_, listener) in mine {
        let Ok(addr) = listener.local_addr() else {
            continue;
        };
        // The first is the role's own address; a second is the bridge's side of it.
        let fits = match bound {
            None => {
                addr.ip() == listen.ip() && (listen.port() == 0 || listen.port() == addr.port())
            }
            Some(first) => addr.port() == SocketAddr::port(&first),
        };
        if !fits {
            continue;
        }
        if let Ok(listener) = crate::handover::listener_to_tokio(listener) {
            bound.get_or_insert(addr);
            listeners.push(listener);
        }
    }
    bound.map(|bound| (bound, listeners))
}

impl Role {
    /// Serves the role's proxy on `listeners`, and on the client connections a previous
    /// program parked (each with the listener that accepted it).
    pub(crate) fn serve(&self, listeners: Vec<TcpListener>, mut parked: Vec<Parked>) {
        let grace = self.config().deploy.drain;
        let mut frontends = self.frontends();
        for listener in listeners {
            let Ok(addr) = listener.local_addr() else {
                continue;
            };
            let (mine, rest) = parked
                .into_iter()
                .partition(|p| p.stream.local_addr().is_ok_and(|local| local == addr));
            parked = rest;
            let (stop, stopped) = watch::channel(Stop::Serve);
            let task = tokio::spawn(phoenix_proxy::serve(
                listener,
                self.proxy.clone(),
                stopped,
                grace,
                mine,
            ));
            frontends.push(Frontend { addr, stop, task });
        }
    }

    /// Stops the frontends not on `keep` (all when `None`): no new connections; those open
    /// finish their requests within the drain grace.
    pub(crate) async fn stop_frontends_except(&self, keep: Option<u16>) {
        let stopping: Vec<Frontend> = {
            let mut frontends = self.frontends();
            let (kept, stopping) = frontends
                .drain(..)
                .partition(|f| keep.is_some_and(|port| f.addr.port() == port));
            *frontends = kept;
            stopping
        };
        for frontend in &stopping {
            frontend.stop.send_replace(Stop::Drain);
        }
        for frontend in stopping {
            let _ = frontend.task.await;
        }
    }

    pub(crate) async fn stop_frontends(&self) {
        self.stop_frontends_except(None).await;
    }

    /// Stops every frontend for `phoenix restart`: each finishes the requests it has and
    /// leaves its listener and its idle connections, open.
    pub(crate) async fn hand_over_frontends(&self) -> Vec<Leftover> {
        let frontends: Vec<Frontend> = self.frontends().drain(..).collect();
        for frontend in &frontends {
            frontend.stop.send_replace(Stop::HandOver);
        }
        let mut leftovers = Vec::new();
        for frontend in frontends {
            if let Ok(leftover) = frontend.task.await {
                leftovers.push(leftover);
            }
        }
        leftovers
    }
}

/// The loops every role has while Phoenix runs: drift checks, the autoscaler, renewal by age
/// and chaos. Each ends when its role is gone.
pub(crate) fn spawn_loops(inner: &Arc<Inner>, role: &str) {
    let weak = || Arc::downgrade(inner);
    inner.spawn(crate::drift::watch(weak(), role.to_string()));
    inner.spawn(crate::autoscale_loop::run(weak(), role.to_string()));
    inner.spawn(crate::lifecycle::renew(weak(), role.to_string()));
    inner.spawn(crate::lifecycle::chaos(weak(), role.to_string()));
}

impl Controller {
    /// Starts a role the fleet file gained: its frontend, its loops, and its first generation.
    pub(crate) async fn add_role(
        &self,
        name: &str,
        config: RoleConfig,
        progress: &Progress,
    ) -> Result<DeployReport, FleetError> {
        let inner = &self.inner;
        let gateway = inner.drivers.bridge().map(|b| b.gateway());
        let (listen, listeners) = bind(name, config.listen, gateway).await?;
        let config_run = config.run.clone();
        let role = Role::new(
            name,
            config,
            listen,
            None,
            inner.membership_wake(),
            inner
                .placement_like(&config_run)
                .unwrap_or_else(|| inner.drivers.placement(name)),
        );
        if inner.cluster.is_some() {
            role.choose_remote_by_image();
        }
        inner.insert_role(role.clone());
        role.serve(listeners, Vec::new());
        spawn_loops(inner, name);
        inner
            .journal(
                Some(name),
                "role.added",
                json!({"listen": listen.to_string()}),
            )
            .await;
        progress.say(format!(
            "role {name}: serving on {listen}, first generation"
        ));
        match self.deploy(name, DeployOptions::default(), progress).await {
            Ok(report) => Ok(report),
            Err(error) => {
                // Nothing half-made stays: the role goes again.
                self.remove_role(name, &Progress::none()).await?;
                Err(error)
            }
        }
    }

    /// Stops a role the fleet file lost: its frontend stops accepting and drains, then its
    /// instances stop, and it is forgotten (its history stays in the journal and metrics).
    pub(crate) async fn remove_role(
        &self,
        name: &str,
        progress: &Progress,
    ) -> Result<(), FleetError> {
        let inner = &self.inner;
        let role = inner.role(name)?;
        let _deploying = role.deploy_guard().await;
        progress.say(format!(
            "role {name}: draining, then stopping its instances"
        ));
        role.stop_frontends().await;
        inner.remove_role(name);
        let generations: Vec<_> = role.live().into_iter().chain(role.others()).collect();
        let instances: Vec<_> = generations.iter().flat_map(|g| g.instances()).collect();
        let stopped = instances.len();
        crate::deploy::stop_all(&instances).await;
        for generation in &generations {
            let id = generation.id;
            let now = inner.clock.now_ms();
            inner
                .db(move |s| {
                    s.set_generation_status(id, phoenix_store::GenerationStatus::Retired, now)
                })
                .await?;
        }
        inner
            .journal(
                Some(name),
                "role.removed",
                json!({"instances_stopped": stopped}),
            )
            .await;
        Ok(())
    }

    /// Moves a role's frontend to `listen`: the new address serves before the old one stops
    /// (and drains), so no request between them is refused.
    pub(crate) async fn move_role(
        &self,
        name: &str,
        listen: SocketAddr,
        progress: &Progress,
    ) -> Result<SocketAddr, FleetError> {
        let inner = &self.inner;
        let role = inner.role(name)?;
        let gateway = inner.drivers.bridge().map(|b| b.gateway());
        let (bound, listeners) = bind(name, listen, gateway).await?;
        let old = role.listen();
        role.serve(listeners, Vec::new());
        role.set_listen(bound);
        role.stop_frontends_except(Some(bound.port())).await;
        progress.say(format!("role {name}: listens on {bound} (was {old})"));
        inner
            .journal(
                Some(name),
                "role.moved",
                json!({"from": old.to_string(), "to": bound.to_string()}),
            )
            .await;
        Ok(bound)
    }
}
