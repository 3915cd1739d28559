//! The agent's snapshot (`--snapshot PATH`), as Serf keeps one: the members alive when it was
//! written and the Lamport clocks of user events and queries, so a restarted agent rejoins by itself and does
//! not take old events for new ones. A graceful leave is recorded too: an agent that left on
//! purpose does not rejoin on its next start.

use std::net::SocketAddr;
use std::path::Path;

/// What a snapshot holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub clock: u64,
    pub query_clock: u64,
    pub alive: Vec<(String, SocketAddr)>,
    pub left: bool,
}

impl Snapshot {
    /// Reads `path`; a missing file is an empty snapshot. Lines that cannot be read are
    /// skipped with a warning naming the file and line (the rest still helps to rejoin).
    pub fn read(path: &Path) -> Snapshot {
        let Ok(text) = std::fs::read_to_string(path) else {
            return Snapshot::default();
        };
        let mut snapshot = Snapshot::default();
        for (number, line) in text.lines().enumerate() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let parsed = match fields.as_slice() {
                ["clock", time] => time.parse().map(|t| snapshot.clock = t).is_ok(),
                ["query-clock", time] => time.parse().map(|t| snapshot.query_clock = t).is_ok(),
                ["alive", name, addr] => addr
                    .parse()
                    .map(|addr| snapshot.alive.push((name.to_string(), addr)))
                    .is_ok(),
                ["left"] => {
                    snapshot.left = true;
                    true
                }
                [] => true,
                _ => false,
            };
            if !parsed {
                tracing::warn!(
                    "{}:{}: unreadable snapshot line {line:?}, skipped",
                    path.display(),
                    number + 1
                );
            }
        }
        snapshot
    }

    /// Writes the snapshot atomically (a temporary file renamed over the old one).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut text = format!("clock {}\nquery-clock {}\n", self.clock, self.query_clock);
        for (name, addr) in &self.alive {
            text.push_str(&format!("alive {name} {addr}\n"));
        }
        if self.left {
            text.push_str("left\n");
        }
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, text)?;
        std::fs::rename(&temporary, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_skips_unreadable_lines() {
        let dir = std::env::temp_dir().join(format!("phoenix-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("snapshot");
        let snapshot = Snapshot {
            clock: 42,
            query_clock: 7,
            alive: vec![("a".into(), "127.0.0.1:7946".parse().unwrap())],
            left: false,
        };
        snapshot.write(&path).unwrap();
        assert_eq!(Snapshot::read(&path), snapshot);
        std::fs::write(&path, "clock x\nalive b 127.0.0.1:1\nbogus\nleft\n").unwrap();
        let read = Snapshot::read(&path);
        assert_eq!((read.clock, read.alive.len(), read.left), (0, 1, true));
        assert_eq!(Snapshot::read(&dir.join("missing")), Snapshot::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
