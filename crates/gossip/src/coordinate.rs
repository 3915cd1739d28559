//! Vivaldi network coordinates, as Serf computes them (its `coordinate` package, with its
//! defaults): each agent measures round trips to other members and moves its own coordinate
//! so that distances between coordinates estimate round-trip times. `serf rtt` reads them.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};

/// Serf's dimensionality.
pub const DIMENSIONS: usize = 8;
const ERROR_MAX: f64 = 1.5;
const CE: f64 = 0.25;
const CC: f64 = 0.25;
const ADJUSTMENT_WINDOW: usize = 20;
const HEIGHT_MIN: f64 = 10.0e-6;
const LATENCY_FILTER: usize = 3;
const GRAVITY_RHO: f64 = 150.0;
const ZERO: f64 = 1.0e-6;
/// Round trips above this are measurement errors, not distances (Serf's limit).
const MAX_RTT: Duration = Duration::from_secs(10);
/// Beyond this (in seconds) a component is hostile input, not a position.
const MAX_COMPONENT: f64 = 1.0e6;

/// A network coordinate: a position in 8 dimensions, plus a height (the access link), an
/// adjustment, and how wrong it is believed to be (all in seconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coordinate {
    pub vec: [f64; DIMENSIONS],
    pub error: f64,
    pub adjustment: f64,
    pub height: f64,
}

impl Default for Coordinate {
    fn default() -> Self {
        Coordinate {
            vec: [0.0; DIMENSIONS],
            error: ERROR_MAX,
            adjustment: 0.0,
            height: HEIGHT_MIN,
        }
    }
}

impl Coordinate {
    /// Finite and within bounds: a coordinate from a peer is checked before it is used.
    pub fn is_valid(&self) -> bool {
        let sane = |f: f64| f.is_finite() && f.abs() < MAX_COMPONENT;
        self.vec.iter().all(|&c| sane(c))
            && sane(self.error)
            && sane(self.adjustment)
            && sane(self.height)
            && self.error >= 0.0
            && self.height >= 0.0
    }

    /// The estimated round trip to `other`, as Serf's `DistanceTo`.
    pub fn distance_to(&self, other: &Coordinate) -> Duration {
        let raw = self.raw_distance_to(other);
        let adjusted = raw + self.adjustment + other.adjustment;
        let seconds = if adjusted > 0.0 { adjusted } else { raw };
        Duration::try_from_secs_f64(seconds).unwrap_or(Duration::ZERO)
    }

    fn raw_distance_to(&self, other: &Coordinate) -> f64 {
        magnitude(&diff(&self.vec, &other.vec)) + self.height + other.height
    }

    /// Moves by `force` along the unit vector from `other`, as Serf's `ApplyForce`.
    fn apply_force(&self, rng: &mut SmallRng, force: f64, other: &Coordinate) -> Coordinate {
        let mut moved = self.clone();
        let (unit, mag) = unit_vector_at(rng, &self.vec, &other.vec);
        for (c, u) in moved.vec.iter_mut().zip(unit) {
            *c += u * force;
        }
        if mag > ZERO {
            moved.height = (moved.height + other.height) * force / mag + moved.height;
            moved.height = moved.height.max(HEIGHT_MIN);
        }
        moved
    }
}

fn diff(a: &[f64; DIMENSIONS], b: &[f64; DIMENSIONS]) -> [f64; DIMENSIONS] {
    std::array::from_fn(|i| a[i] - b[i])
}

fn magnitude(v: &[f64; DIMENSIONS]) -> f64 {
    v.iter().map(|c| c * c).sum::<f64>().sqrt()
}

/// The unit vector from `b` to `a` and the distance between them; a random direction when
/// they coincide.
fn unit_vector_at(
    rng: &mut SmallRng,
    a: &[f64; DIMENSIONS],
    b: &[f64; DIMENSIONS],
) -> ([f64; DIMENSIONS], f64) {
    let d = diff(a, b);
    let mag = magnitude(&d);
    if mag > ZERO {
        return (d.map(|c| c / mag), mag);
    }
    // Uniform in [0, 1): the top 53 bits of a random u64.
    let mut uniform = || (rand::Rng::next_u64(rng) >> 11) as f64 / (1u64 << 53) as f64;
    let random: [f64; DIMENSIONS] = std::array::from_fn(|_| uniform() - 0.5);
    let mag = magnitude(&random);
    if mag > ZERO {
        return (random.map(|c| c / mag), 0.0);
    }
    let mut unit = [0.0; DIMENSIONS];
    unit[0] = 1.0;
    (unit, 0.0)
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CoordinateError {
    #[error("coordinate is invalid")]
    Invalid,
    #[error("round trip time {0:?} is not between 0 and 10 s")]
    BadRtt(Duration),
}

/// One agent's Vivaldi state: its coordinate, and what smooths the updates.
#[derive(Debug)]
pub struct Client {
    coord: Coordinate,
    origin: Coordinate,
    adjustment_samples: [f64; ADJUSTMENT_WINDOW],
    adjustment_index: usize,
    latency_samples: HashMap<String, VecDeque<f64>>,
    resets: u64,
    rng: SmallRng,
}

impl Client {
    pub fn new(rng: SmallRng) -> Client {
        Client {
            coord: Coordinate::default(),
            origin: Coordinate::default(),
            adjustment_samples: [0.0; ADJUSTMENT_WINDOW],
            adjustment_index: 0,
            latency_samples: HashMap::new(),
            resets: 0,
            rng,
        }
    }

    pub fn coordinate(&self) -> &Coordinate {
        &self.coord
    }

    /// How often the coordinate went invalid and started over (Serf's `coordinate_resets`).
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Forgets a member's samples (it was reaped).
    pub fn forget(&mut self, node: &str) {
        self.latency_samples.remove(node);
    }

    /// Takes a round trip to `node`, whose coordinate is `other`, as Serf's `Update`.
    pub fn update(
        &mut self,
        node: &str,
        other: &Coordinate,
        rtt: Duration,
    ) -> Result<(), CoordinateError> {
        if !other.is_valid() {
            return Err(CoordinateError::Invalid);
        }
        if rtt > MAX_RTT {
            return Err(CoordinateError::BadRtt(rtt));
        }
        let rtt = self.latency_filter(node, rtt.as_secs_f64());
        self.update_vivaldi(other, rtt);
        self.update_adjustment(other, rtt);
        self.update_gravity();
        if !self.coord.is_valid() {
            self.resets += 1;
            self.coord = Coordinate::default();
        }
        Ok(())
    }

    /// The median of the last three samples to `node`.
    fn latency_filter(&mut self, node: &str, rtt: f64) -> f64 {
        if !self.latency_samples.contains_key(node) && self.latency_samples.len() >= 4096 {
            // Bounded: the samples of members never seen again go first.
            self.latency_samples.clear();
        }
        let samples = self.latency_samples.entry(node.to_string()).or_default();
        samples.push_back(rtt);
        if samples.len() > LATENCY_FILTER {
            samples.pop_front();
        }
        let mut sorted: Vec<f64> = samples.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }

    fn update_vivaldi(&mut self, other: &Coordinate, rtt: f64) {
        let rtt = rtt.max(ZERO);
        let dist = self.coord.distance_to(other).as_secs_f64();
        let wrongness = (dist - rtt).abs() / rtt;
        let total_error = (self.coord.error + other.error).max(ZERO);
        let weight = self.coord.error / total_error;
        self.coord.error =
            (CE * weight * wrongness + self.coord.error * (1.0 - CE * weight)).min(ERROR_MAX);
        let force = CC * weight * (rtt - dist);
        self.coord = self.coord.apply_force(&mut self.rng, force, other);
    }

    fn update_adjustment(&mut self, other: &Coordinate, rtt: f64) {
        let dist = self.coord.raw_distance_to(other);
        self.adjustment_samples[self.adjustment_index] = rtt - dist;
        self.adjustment_index = (self.adjustment_index + 1) % ADJUSTMENT_WINDOW;
        let sum: f64 = self.adjustment_samples.iter().sum();
        self.coord.adjustment = sum / (2.0 * ADJUSTMENT_WINDOW as f64);
    }

    fn update_gravity(&mut self) {
        let dist = self.origin.distance_to(&self.coord).as_secs_f64();
        let force = -(dist / GRAVITY_RHO).powi(2);
        let origin = self.origin.clone();
        self.coord = self.coord.apply_force(&mut self.rng, force, &origin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Four nodes at the corners of a rectangle 10 ms by 20 ms: after a few hundred rounds
    /// of measurements each estimate is within 15 % of the true round trip.
    #[test]
    fn coordinates_converge_to_the_true_round_trips() {
        let positions = [(0.0, 0.0), (0.010, 0.0), (0.0, 0.020), (0.010, 0.020)];
        let rtt = |a: usize, b: usize| {
            let (pa, pb): ((f64, f64), (f64, f64)) = (positions[a], positions[b]);
            Duration::from_secs_f64(((pa.0 - pb.0).powi(2) + (pa.1 - pb.1).powi(2)).sqrt())
        };
        let mut clients: Vec<Client> = (0..4)
            .map(|i| Client::new(SmallRng::seed_from_u64(i)))
            .collect();
        for round in 0..500 {
            for a in 0..4 {
                let b = (a + 1 + round % 3) % 4;
                let other = clients[b].coordinate().clone();
                clients[a]
                    .update(&format!("n{b}"), &other, rtt(a, b))
                    .unwrap();
            }
        }
        for a in 0..4 {
            for b in (a + 1)..4 {
                let estimate = clients[a].coordinate().distance_to(clients[b].coordinate());
                let truth = rtt(a, b).as_secs_f64();
                let off = (estimate.as_secs_f64() - truth).abs() / truth;
                assert!(
                    off < 0.15,
                    "n{a}-n{b}: {estimate:?} for {truth}s ({off:.2})"
                );
            }
        }
    }

    #[test]
    fn hostile_coordinates_and_round_trips_are_refused() {
        let mut client = Client::new(SmallRng::seed_from_u64(1));
        let mut bad = Coordinate::default();
        bad.vec[3] = f64::NAN;
        assert_eq!(
            client.update("x", &bad, Duration::from_millis(1)),
            Err(CoordinateError::Invalid)
        );
        bad.vec[3] = 1.0e300;
        assert_eq!(
            client.update("x", &bad, Duration::from_millis(1)),
            Err(CoordinateError::Invalid)
        );
        assert!(matches!(
            client.update("x", &Coordinate::default(), Duration::from_secs(11)),
            Err(CoordinateError::BadRtt(_))
        ));
        assert_eq!(client.coordinate(), &Coordinate::default());
    }
}
