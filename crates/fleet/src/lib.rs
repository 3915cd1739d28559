//! The fleet: the fleet file, and the controller that converges to it.

pub mod config;

pub use config::{ConfigError, DeployConfig, FleetFile, HealthConfig, RoleConfig, Strategy};
