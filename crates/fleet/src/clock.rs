//! Injectable time and randomness.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time for records and the journal.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told: tests assert the times the journal records.
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    pub fn new(now_ms: i64) -> Self {
        ManualClock(std::sync::atomic::AtomicI64::new(now_ms))
    }

    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Generates instance names like `web-3f9a1c` from a seedable RNG.
#[derive(Debug)]
pub struct Namer {
    rng: Mutex<fastrand::Rng>,
}

impl Namer {
    pub fn new(rng: fastrand::Rng) -> Self {
        Namer {
            rng: Mutex::new(rng),
        }
    }

    /// A uniform number in [0, 1) from the same seeded generator (chaos picks with it).
    pub fn fraction(&self) -> f64 {
        self.rng.lock().unwrap_or_else(|p| p.into_inner()).f64()
    }

    pub fn instance_name(&self, role: &str) -> String {
        let n = self
            .rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .u32(..0x100_0000);
        format!("{role}-{n:06x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_deterministic_for_a_seed() {
        let a = Namer::new(fastrand::Rng::with_seed(7));
        let b = Namer::new(fastrand::Rng::with_seed(7));
        let name = a.instance_name("web");
        assert_eq!(name, b.instance_name("web"));
        assert!(name.starts_with("web-") && name.len() == 10, "{name}");
        assert!(name[4..].bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
