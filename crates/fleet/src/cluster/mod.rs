//! A fleet across hosts: hosts register in etcd, one of them leads as the controller, and
//! placement decides which host runs each instance.

mod placement;

pub use placement::{Capacity, HostConstraint, HostView, PlacementError, Placer};
