//! Which host runs each new instance: spread a role over hosts first (anti-affinity), then
//! prefer the least loaded by what the role's `resources` ask, among the hosts that are alive,
//! not draining, match the role's `hosts` constraint and have room.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

/// A host's score for one more instance of a role (see `Placer::score`).
type Score = (u32, u64, u32);

/// A host as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub name: String,
    pub tags: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub draining: bool,
    pub alive: bool,
}

/// CPU in thousandths of a core and memory in bytes: what a host offers or an instance asks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    pub cpu_millis: u64,
    pub memory: u64,
}

impl Capacity {
    /// What an instance of a role asks for: its limits, or nothing when it sets none.
    pub fn of(resources: &crate::ResourcesConfig) -> Self {
        Capacity {
            cpu_millis: resources.cpus.map_or(0, |c| (c * 1000.0).round() as u64),
            memory: resources.memory.unwrap_or(0),
        }
    }

    fn plus(self, other: Capacity) -> Capacity {
        Capacity {
            cpu_millis: self.cpu_millis + other.cpu_millis,
            memory: self.memory + other.memory,
        }
    }
}

/// `[role.X] hosts = { tag = "zone=a" }`: every tag must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConstraint {
    pub tags: Vec<(String, String)>,
}

impl HostConstraint {
    /// `KEY=VALUE` pairs.
    pub fn parse(tags: &[String]) -> Result<Self, String> {
        let tags = tags
            .iter()
            .map(|tag| match tag.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => Err(format!("tag {tag:?} must be KEY=VALUE, like \"zone=a\"")),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { tags })
    }

    /// Whether `host` has every tag.
    pub fn matches(&self, host: &HostView) -> bool {
        self.mismatch(host).is_none()
    }

    /// Why `host` does not match, if it does not.
    fn mismatch(&self, host: &HostView) -> Option<String> {
        self.tags.iter().find_map(|(k, v)| match host.tags.get(k) {
            Some(have) if have == v => None,
            Some(have) => Some(format!("tag {k}={have}, wanted {k}={v}")),
            None => Some(format!("no tag {k}, wanted {k}={v}")),
        })
    }
}

/// No host could take an instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot place instance {} of {wanted} of role {role}: {}",
    placed + 1,
    describe(reasons)
)]
pub struct PlacementError {
    pub role: String,
    pub placed: usize,
    pub wanted: usize,
    /// Each host and why it cannot take one more.
    pub reasons: Vec<(String, String)>,
}

fn describe(reasons: &[(String, String)]) -> String {
    if reasons.is_empty() {
        return "no host has joined the cluster".into();
    }
    let shown: Vec<String> = reasons
        .iter()
        .take(8)
        .map(|(host, why)| format!("{host}: {why}"))
        .collect();
    let more = reasons.len().saturating_sub(shown.len());
    let tail = if more > 0 {
        format!("; and {more} more hosts")
    } else {
        String::new()
    };
    format!("{}{tail}", shown.join("; "))
}

#[derive(Debug, Default, Clone)]
struct Load {
    used: Capacity,
    total: u32,
    by_role: HashMap<String, u32>,
}

/// The hosts and what already runs on them; places instances one at a time, counting each.
#[derive(Debug, Clone)]
pub struct Placer {
    hosts: Vec<HostView>,
    load: Vec<Load>,
}

impl Placer {
    /// `hosts` in any order (they are sorted by name, so ties break the same way everywhere).
    pub fn new(mut hosts: Vec<HostView>) -> Self {
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        let load = vec![Load::default(); hosts.len()];
        Self { hosts, load }
    }

    /// Counts an instance that already runs (or is being started) on `host`.
    pub fn add_existing(&mut self, host: &str, role: &str, demand: Capacity) {
        if let Ok(at) = self.hosts.binary_search_by(|h| h.name.as_str().cmp(host)) {
            self.count(at, role, demand);
        }
    }

    fn count(&mut self, at: usize, role: &str, demand: Capacity) {
        let load = &mut self.load[at];
        load.used = load.used.plus(demand);
        load.total += 1;
        *load.by_role.entry(role.to_string()).or_default() += 1;
    }

    /// Hosts for `count` new instances of `role`, in order; all or nothing.
    pub fn place(
        &mut self,
        role: &str,
        demand: Capacity,
        constraint: &HostConstraint,
        count: usize,
    ) -> Result<Vec<String>, PlacementError> {
        // Placing on a host changes only that host's score, so the hosts that can take one
        // more wait in a heap, best first: O(count log hosts) rather than count × hosts.
        let mut ready: BinaryHeap<Reverse<(Score, usize)>> = (0..self.hosts.len())
            .filter(|at| self.fits(*at, demand, constraint))
            .map(|at| Reverse((self.score(at, role, demand), at)))
            .collect();
        let before = self.load.clone();
        let mut chosen = Vec::with_capacity(count);
        for placed in 0..count {
            let Some(Reverse((_, at))) = ready.pop() else {
                let reasons = self.reasons(demand, constraint);
                self.load = before;
                return Err(PlacementError {
                    role: role.to_string(),
                    placed,
                    wanted: count,
                    reasons,
                });
            };
            self.count(at, role, demand);
            chosen.push(self.hosts[at].name.clone());
            if self.fits(at, demand, constraint) {
                ready.push(Reverse((self.score(at, role, demand), at)));
            }
        }
        Ok(chosen)
    }

    /// Lower is better: fewer instances of the role, then less full after placing, then
    /// fewer instances in all (ties go to the host first by name).
    fn score(&self, at: usize, role: &str, demand: Capacity) -> Score {
        let load = &self.load[at];
        let same_role = load.by_role.get(role).copied().unwrap_or(0);
        let full = fullness(load.used.plus(demand), self.hosts[at].capacity);
        (same_role, full, load.total)
    }

    fn fits(&self, at: usize, demand: Capacity, constraint: &HostConstraint) -> bool {
        self.refusal(&self.hosts[at], &self.load[at], demand, constraint)
            .is_none()
    }

    /// Why each host cannot take one more.
    fn reasons(&self, demand: Capacity, constraint: &HostConstraint) -> Vec<(String, String)> {
        self.hosts
            .iter()
            .zip(&self.load)
            .filter_map(|(host, load)| {
                let why = self.refusal(host, load, demand, constraint)?;
                Some((host.name.clone(), why))
            })
            .collect()
    }

    fn refusal(
        &self,
        host: &HostView,
        load: &Load,
        demand: Capacity,
        constraint: &HostConstraint,
    ) -> Option<String> {
        if !host.alive {
            return Some("down".into());
        }
        if host.draining {
            return Some("draining".into());
        }
        if let Some(why) = constraint.mismatch(host) {
            return Some(why);
        }
        let after = load.used.plus(demand);
        if demand.memory > 0 && after.memory > host.capacity.memory {
            return Some(format!(
                "needs {} MiB of memory, {} MiB free",
                demand.memory >> 20,
                host.capacity.memory.saturating_sub(load.used.memory) >> 20
            ));
        }
        if demand.cpu_millis > 0 && after.cpu_millis > host.capacity.cpu_millis {
            return Some(format!(
                "needs {:.2} CPUs, {:.2} free",
                demand.cpu_millis as f64 / 1000.0,
                host.capacity
                    .cpu_millis
                    .saturating_sub(load.used.cpu_millis) as f64
                    / 1000.0
            ));
        }
        None
    }
}

/// The fuller of CPU and memory after placing, in millionths (0 when the host declares none).
fn fullness(used: Capacity, capacity: Capacity) -> u64 {
    let share = |used: u64, capacity: u64| {
        used.saturating_mul(1_000_000)
            .checked_div(capacity)
            .unwrap_or(0)
    };
    share(used.cpu_millis, capacity.cpu_millis).max(share(used.memory, capacity.memory))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn host(name: &str, zone: &str, cpus: u64, memory: u64) -> HostView {
        HostView {
            name: name.into(),
            tags: [("zone".to_string(), zone.to_string())].into(),
            capacity: Capacity {
                cpu_millis: cpus * 1000,
                memory,
            },
            draining: false,
            alive: true,
        }
    }

    fn counts(chosen: &[String]) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for host in chosen {
            *counts.entry(host.as_str()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn a_role_spreads_evenly_before_any_host_gets_a_second() {
        let hosts = (1..=5)
            .map(|n| host(&format!("h{n}"), "a", 4, 8 * GIB))
            .collect();
        let mut placer = Placer::new(hosts);
        let web = placer
            .place("web", Capacity::default(), &HostConstraint::default(), 3)
            .unwrap();
        assert_eq!(web, ["h1", "h2", "h3"]);
        // A second role also starts on the emptiest hosts; a third web instance then goes to
        // a host without web, even though it runs the other role.
        let api = placer
            .place("api", Capacity::default(), &HostConstraint::default(), 2)
            .unwrap();
        assert_eq!(api, ["h4", "h5"]);
        let more = placer
            .place("web", Capacity::default(), &HostConstraint::default(), 7)
            .unwrap();
        let all: Vec<String> = web.into_iter().chain(more).collect();
        assert_eq!(
            counts(&all),
            [("h1", 2), ("h2", 2), ("h3", 2), ("h4", 2), ("h5", 2)].into()
        );
    }

    #[test]
    fn among_equals_the_least_loaded_by_resources_wins() {
        let mut placer = Placer::new(vec![
            host("big", "a", 8, 16 * GIB),
            host("small", "a", 2, 4 * GIB),
        ]);
        let heavy = Capacity {
            cpu_millis: 500,
            memory: GIB,
        };
        placer.add_existing(
            "big",
            "db",
            Capacity {
                cpu_millis: 2000,
                memory: 4 * GIB,
            },
        );
        // big is 25% full, small empty: the first goes to small (12.5% → 25%), the second to
        // big (spread first), the third to big (small would be 50%, big 37.5%).
        let chosen = placer
            .place("web", heavy, &HostConstraint::default(), 3)
            .unwrap();
        assert_eq!(chosen, ["small", "big", "big"]);
    }

    #[test]
    fn constraints_draining_and_dead_hosts_are_skipped_with_reasons() {
        let mut hosts = vec![
            host("a1", "a", 4, 8 * GIB),
            host("a2", "a", 4, 8 * GIB),
            host("a3", "a", 4, 8 * GIB),
            host("b1", "b", 4, 8 * GIB),
        ];
        hosts[1].draining = true;
        hosts[2].alive = false;
        let zone_a = HostConstraint::parse(&["zone=a".into()]).unwrap();
        let mut placer = Placer::new(hosts);
        let chosen = placer
            .place("web", Capacity::default(), &zone_a, 3)
            .unwrap();
        assert_eq!(chosen, ["a1", "a1", "a1"]);

        let huge = Capacity {
            cpu_millis: 0,
            memory: 6 * GIB,
        };
        let error = placer.place("db", huge, &zone_a, 2).unwrap_err();
        assert_eq!((error.placed, error.wanted), (1, 2));
        assert_eq!(
            error.to_string(),
            "cannot place instance 2 of 2 of role db: a1: needs 6144 MiB of memory, 2048 MiB free; a2: draining; a3: down; b1: tag zone=b, wanted zone=a"
        );
        // All or nothing: the failed call counted nothing, so a 1-instance db still fits.
        assert_eq!(placer.place("db", huge, &zone_a, 1).unwrap(), ["a1"]);
        assert!(
            HostConstraint::parse(&["zone".into()])
                .unwrap_err()
                .contains("KEY=VALUE")
        );
    }

    #[test]
    fn no_hosts_says_so() {
        let error =
            Placer::new(vec![]).place("web", Capacity::default(), &HostConstraint::default(), 1);
        assert_eq!(
            error.unwrap_err().to_string(),
            "cannot place instance 1 of 1 of role web: no host has joined the cluster"
        );
    }
}
