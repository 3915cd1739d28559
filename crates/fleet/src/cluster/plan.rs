//! What the controller decides for one role: how many instances each host runs. Pure, so the
//! rules are tested without etcd: instances stay where they are while their host is fit; a
//! dead host's are placed again at once; a draining (or no longer matching) host keeps its
//! instances until the ones replacing them elsewhere are healthy, so traffic never has fewer
//! than it had.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::placement::{Capacity, HostConstraint, HostView, PlacementError, Placer};

/// `placements/ROLE`: instances per host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolePlacement {
    /// The role's size the placement was made for.
    pub total: u32,
    /// Instances per host; hosts with none are left out.
    pub hosts: BTreeMap<String, u32>,
    /// Hosts whose instances are on their way out (draining, or no longer matching): they
    /// keep them until the replacements are healthy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leaving: Vec<String>,
}

impl RolePlacement {
    /// Instances on `host`.
    pub fn on(&self, host: &str) -> u32 {
        self.hosts.get(host).copied().unwrap_or(0)
    }
}

/// What placement needs to know of a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleDemand {
    pub instances: u32,
    pub demand: Capacity,
    pub constraint: HostConstraint,
}

/// The next placement of `role`. `placer` holds every host and what other roles' kept
/// instances use; `healthy` is how many healthy instances of the role each host reports.
pub fn plan_role(
    role: &str,
    want: &RoleDemand,
    current: Option<&RolePlacement>,
    hosts: &[HostView],
    placer: &mut Placer,
    healthy: &BTreeMap<String, u32>,
) -> Result<RolePlacement, PlacementError> {
    let by_name: std::collections::HashMap<&str, &HostView> =
        hosts.iter().map(|h| (h.name.as_str(), h)).collect();
    let fit = |name: &str| {
        by_name
            .get(name)
            .is_some_and(|h| h.alive && !h.draining && want.constraint.matches(h))
    };
    let alive = |name: &str| by_name.get(name).is_some_and(|h| h.alive);
    let mut kept: BTreeMap<String, u32> = BTreeMap::new();
    let mut leaving: BTreeMap<String, u32> = BTreeMap::new();
    for (host, count) in current.map(|c| &c.hosts).into_iter().flatten() {
        if fit(host) {
            kept.insert(host.clone(), *count);
        } else if alive(host) {
            leaving.insert(host.clone(), *count);
        }
    }
    // Fewer wanted: take from the hosts with the most (the first by name among equals).
    let mut total: u32 = kept.values().sum();
    while total > want.instances {
        let (host, _) = kept
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(h, c)| (h.clone(), *c))
            .expect("a host with instances");
        let count = kept.get_mut(&host).expect("kept host");
        *count -= 1;
        if *count == 0 {
            kept.remove(&host);
        }
        total -= 1;
    }
    for (host, count) in &kept {
        for _ in 0..*count {
            placer.add_existing(host, role, want.demand);
        }
    }
    // More wanted: place the rest.
    if total < want.instances {
        let missing = (want.instances - total) as usize;
        for host in placer.place(role, want.demand, &want.constraint, missing)? {
            *kept.entry(host).or_default() += 1;
        }
    }
    // Leaving hosts let go once every placed instance elsewhere is healthy.
    let ready = kept
        .iter()
        .all(|(host, count)| healthy.get(host).copied().unwrap_or(0) >= *count);
    let mut placement = RolePlacement {
        total: want.instances,
        hosts: kept,
        leaving: Vec::new(),
    };
    if !ready {
        for (host, count) in leaving {
            placement.hosts.insert(host.clone(), count);
            placement.leaving.push(host);
        }
    }
    Ok(placement)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(names: &[&str]) -> Vec<HostView> {
        names
            .iter()
            .map(|name| HostView {
                name: name.to_string(),
                tags: [("zone".to_string(), "a".to_string())].into(),
                capacity: Capacity {
                    cpu_millis: 4000,
                    memory: 8 << 30,
                },
                draining: false,
                alive: true,
            })
            .collect()
    }

    fn web(instances: u32) -> RoleDemand {
        RoleDemand {
            instances,
            demand: Capacity::default(),
            constraint: HostConstraint::default(),
        }
    }

    fn plan(
        want: &RoleDemand,
        current: Option<&RolePlacement>,
        hosts: &[HostView],
        healthy: &[(&str, u32)],
    ) -> RolePlacement {
        let healthy = healthy.iter().map(|(h, n)| (h.to_string(), *n)).collect();
        let mut placer = Placer::new(hosts.to_vec());
        plan_role("web", want, current, hosts, &mut placer, &healthy).unwrap()
    }

    fn counts(placement: &RolePlacement) -> Vec<(&str, u32)> {
        placement
            .hosts
            .iter()
            .map(|(h, n)| (h.as_str(), *n))
            .collect()
    }

    #[test]
    fn first_placement_spreads_and_a_stable_one_stays_put() {
        let all = hosts(&["h1", "h2", "h3"]);
        let first = plan(&web(4), None, &all, &[]);
        assert_eq!(counts(&first), [("h1", 2), ("h2", 1), ("h3", 1)]);
        // A host that joins does not take instances from others until the next change.
        let more = hosts(&["h1", "h2", "h3", "h4"]);
        assert_eq!(plan(&web(4), Some(&first), &more, &[]), first);
        // Scaling out gives the new host work first; scaling in takes from the fullest.
        let five = plan(&web(5), Some(&first), &more, &[]);
        assert_eq!(counts(&five), [("h1", 2), ("h2", 1), ("h3", 1), ("h4", 1)]);
        let two = plan(&web(2), Some(&five), &more, &[]);
        assert_eq!(counts(&two), [("h3", 1), ("h4", 1)]);
    }

    #[test]
    fn a_dead_hosts_instances_move_at_once() {
        let all = hosts(&["h1", "h2", "h3"]);
        let first = plan(&web(3), None, &all, &[]);
        let mut after = all.clone();
        after[1].alive = false;
        let replaced = plan(&web(3), Some(&first), &after, &[]);
        assert_eq!(counts(&replaced), [("h1", 2), ("h3", 1)]);
        assert!(replaced.leaving.is_empty());
    }

    #[test]
    fn a_draining_host_keeps_its_instances_until_their_replacements_are_healthy() {
        let all = hosts(&["h1", "h2", "h3"]);
        let first = plan(&web(3), None, &all, &[]);
        let mut draining = all.clone();
        draining[0].draining = true;
        let moving = plan(&web(3), Some(&first), &draining, &[("h2", 1), ("h3", 1)]);
        assert_eq!(counts(&moving), [("h1", 1), ("h2", 2), ("h3", 1)]);
        assert_eq!(moving.leaving, ["h1"]);
        // Still starting on h2: h1 keeps its instance.
        let still = plan(&web(3), Some(&moving), &draining, &[("h2", 1), ("h3", 1)]);
        assert_eq!(still, moving);
        // h2's second instance is healthy: h1 lets go.
        let done = plan(&web(3), Some(&still), &draining, &[("h2", 2), ("h3", 1)]);
        assert_eq!(counts(&done), [("h2", 2), ("h3", 1)]);
        assert!(done.leaving.is_empty());
        assert_eq!(done.on("h1"), 0);
    }

    #[test]
    fn no_room_is_an_error_naming_each_host() {
        let mut all = hosts(&["h1", "h2"]);
        all[0].alive = false;
        all[1].draining = true;
        let mut placer = Placer::new(all.clone());
        let error =
            plan_role("web", &web(1), None, &all, &mut placer, &BTreeMap::new()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot place instance 1 of 1 of role web: h1: down; h2: draining"
        );
    }
}
