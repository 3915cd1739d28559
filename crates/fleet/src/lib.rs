//! The fleet: the fleet file, and the controller that converges to it — blue-green deploys,
//! rollback, crash replacement, recovery after a restart, and membership by gossip.

mod apply;
mod autoscale;
mod autoscale_loop;
mod bake;
mod canary;
mod capture;
mod clock;
pub mod cluster;
pub mod config;
mod controller;
mod deploy;
mod drift;
mod drivers;
mod forward;
mod handover;
mod health;
mod hooks;
mod instance;
mod lifecycle;
mod listeners;
mod load_test;
mod membership;
mod metrics;
mod plan;
mod recover;
mod roles;
mod rolling;
mod sampling;
mod scale;
mod secrets;
mod status;
pub mod test_util;
mod verify;
mod webhooks;

pub use apply::ApplyReport;
pub use autoscale::{AutoscaleConfig, Autoscaler, Decision, Observation, Policy, ScaleMetric};
pub use bake::{BAKE_LOGS, BakeOutcome, bake_image, refresh_index};
pub use capture::store_dir as log_store_dir;
pub use clock::{Clock, ManualClock, Namer, SystemClock};
pub use config::{
    AgentSettings, CheckKind, ClusterConfig, ConfigError, DeployConfig, DriverKind, FleetFile,
    HealthConfig, ListenerConfig, NetworkConfig, NetworkMode, ProxyMode, ProxySettings,
    ResourcesConfig, RoleConfig, RunConfig, SecretSource, Strategy, parse_duration, parse_size,
};
pub use controller::{Controller, Options};
pub use deploy::{DeployOptions, DeployReport, Progress, RollbackTo, Verified};
pub use drivers::ID_OFFSET;
pub use forward::positions_path as forward_positions_path;
pub use handover::{Handed, HandedBridge, HandedInstance, Handover};
pub use instance::Flags;
pub use lifecycle::ChaosConfig;
pub use plan::{Change, How, Op, Plan};
pub use scale::{FlagChange, ScaleReport};
pub use status::{
    ClusterView, DeniedView, FleetStatus, GenerationView, InstanceView, PolicyView, RemoteView,
    RoleStatus,
};
pub use verify::{VERIFY_LOGS, Verification, Verifier, VerifyOptions, checks_of, gate};
pub use webhooks::sign as sign_webhook;

/// If this process was started as one of Phoenix's helpers (a container's shim, checks run
/// inside an instance), runs it and exits; otherwise returns at once. Call it first thing in
/// `main`, before any thread starts.
pub fn run_helper_if_asked() {
    phoenix_driver::run_helper_if_asked();
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(verify::CHECK_IN_ARG)) {
        std::process::exit(verify::check_in_main());
    }
}

/// What can go wrong in the fleet.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("apply: {0}")]
    Apply(String),
    #[error(transparent)]
    Image(#[from] phoenix_image::ImageError),
    #[error(transparent)]
    Store(#[from] phoenix_store::StoreError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(
        "this fleet runs on one machine: hosts exist only with a [cluster] table in the fleet file"
    )]
    NoCluster,
    #[error(transparent)]
    Driver(#[from] phoenix_driver::DriverError),
    #[error(transparent)]
    Checks(#[from] phoenix_check::SuiteError),
    #[error("[image.{name}] in {file} has no `checks = \"PATH\"` to verify with")]
    NoChecks { name: String, file: String },
    #[error("image {image} cannot be deployed: {reason}")]
    NotVerified { image: String, reason: String },
    #[error("no role {role:?} (roles: {known})")]
    UnknownRole { role: String, known: String },
    #[error("deploy of {role} stopped before it began (nothing changed): {reason}")]
    StoppedBeforeStart { role: String, reason: String },
    #[error(
        "role {role}: strategy = \"{strategy}\" deploys on one machine only for now; in a cluster, deploys are blue-green"
    )]
    StrategyInCluster {
        role: String,
        strategy: &'static str,
    },
    #[error("no [image.{name}] in {file} (images: {known})")]
    UnknownImage {
        name: String,
        file: String,
        known: String,
    },
    #[error(transparent)]
    Metrics(#[from] phoenix_observe::ObserveError),
    #[error("cannot scale {0}")]
    Scale(String),
    #[error("recipes are their own base: {0}")]
    BaseLoop(String),
    #[error(
        "role {role} is no longer in the fleet file; `phoenix apply` or `phoenix restart` removes it"
    )]
    RoleNotInFile { role: String },
    #[error("no instance {0} in a live generation")]
    UnknownInstance(String),
    #[error("no image matches {0:?}: see `phoenix images`")]
    ImageNotFound(String),
    #[error("role {role} has no earlier generation with another image to roll back to")]
    NoPrevious { role: String },
    #[error("role {role} has no generation {generation} that served: see `phoenix history {role}`")]
    NoSuchGeneration { role: String, generation: i64 },
    #[error("role {role} already serves {image}: nothing to roll back to")]
    AlreadyLive { role: String, image: String },
    #[error("a deploy of role {role} is already running; wait for it to finish")]
    Busy { role: String },
    #[error("deploy of {role} aborted ({}): {reason}", match .serving { Some(g) => format!("generation {g} keeps serving"), None => "no generation was serving".into() })]
    DeployAborted {
        role: String,
        reason: String,
        serving: Option<i64>,
    },
    #[error("role {role}: cannot listen on {addr}: {cause}")]
    Listen {
        role: String,
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
    #[error("secret {name}: {reason}")]
    Secret { name: String, reason: String },
    #[error("gossip agent: {0}")]
    Agent(String),
    #[error("restart: {0}")]
    Restart(String),
    #[error("phoenix is shutting down")]
    ShuttingDown,
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
    #[error("internal error: {0}")]
    Internal(String),
}

/// The fleet file parser for `cargo fuzz` (see `fuzz/`) and the seeded test. Not part of the
/// API.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    use crate::config::{ConfigError, FleetFile};

    /// Any bytes as a fleet file: parsing returns a value or an error whose line and column
    /// are inside the file; it never panics.
    pub fn fleet_file(data: &[u8]) {
        let text = String::from_utf8_lossy(data);
        if let Err(ConfigError::Invalid {
            line,
            column,
            message,
            ..
        }) = FleetFile::parse(Path::new("fuzz/phoenix.toml"), &text)
        {
            let lines = text.split('\n').count();
            assert!(
                (1..=lines).contains(&line),
                "line {line} outside the file ({lines} lines): {message}"
            );
            assert!(column >= 1, "column {column}: {message}");
            assert!(!message.is_empty());
        }
    }
}
