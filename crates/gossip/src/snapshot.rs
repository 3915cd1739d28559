//! The agent's snapshot (`--snapshot PATH`), in Serf's format, so a Serf agent's snapshot
//! moves to Phoenix and back: `alive: NAME ADDR` and `not-alive: NAME` lines for members, the
//! Lamport clocks (`clock:` of members, `event-clock:` of user events, `query-clock:` of
//! queries), `leave` after a graceful leave and `#` comments. Serf appends to the file and
//! compacts it; a reader replays the lines in order. A restarted agent rejoins through the
//! members still alive and does not take old events for new; one that left on purpose does
//! not rejoin (unless `rejoin_after_leave`).

use std::net::SocketAddr;
use std::path::Path;

/// What a snapshot holds, once its lines are replayed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Serf's member clock (Phoenix keeps members by incarnation; kept to write it back).
    pub member_clock: u64,
    pub event_clock: u64,
    pub query_clock: u64,
    /// Members alive at the last write, in the order they were first seen.
    pub alive: Vec<(String, SocketAddr)>,
    /// The agent left gracefully after the last member line.
    pub left: bool,
}

impl Snapshot {
    /// Reads `path`; a missing file is an empty snapshot. Lines that cannot be read are
    /// skipped with a warning naming the file and line (the rest still helps to rejoin). With
    /// `rejoin_after_leave`, a `leave` line is ignored, as in Serf.
    pub fn read(path: &Path, rejoin_after_leave: bool) -> Snapshot {
        let Ok(text) = std::fs::read_to_string(path) else {
            return Snapshot::default();
        };
        let mut snapshot = Snapshot::default();
        for (number, line) in text.lines().enumerate() {
            if rejoin_after_leave && line == "leave" {
                continue;
            }
            if !snapshot.replay(line) {
                tracing::warn!(
                    "{}:{}: unreadable snapshot line {line:?}, skipped",
                    path.display(),
                    number + 1
                );
            }
        }
        snapshot
    }

    /// Applies one line as Serf's `replay` does; false when the line cannot be read.
    fn replay(&mut self, line: &str) -> bool {
        if let Some(rest) = line.strip_prefix("alive: ") {
            // The name may hold spaces: the address is after the last one.
            let Some((name, addr)) = rest.rsplit_once(' ') else {
                return false;
            };
            let Ok(addr) = addr.parse() else {
                return false;
            };
            self.alive.retain(|(known, _)| known != name);
            self.alive.push((name.to_string(), addr));
            self.left = false;
        } else if let Some(name) = line.strip_prefix("not-alive: ") {
            self.alive.retain(|(known, _)| known != name);
        } else if let Some(time) = line.strip_prefix("clock: ") {
            return parse_into(time, &mut self.member_clock);
        } else if let Some(time) = line.strip_prefix("event-clock: ") {
            return parse_into(time, &mut self.event_clock);
        } else if let Some(time) = line.strip_prefix("query-clock: ") {
            return parse_into(time, &mut self.query_clock);
        } else if line == "leave" {
            // Serf forgets the members (and, unlike Phoenix, the clocks: keeping them can only
            // keep an old event from being taken for new).
            self.alive.clear();
            self.left = true;
        } else if let Some(known) = self.replay_legacy(line) {
            return known;
        } else if line.starts_with("coordinate: ") || line.starts_with('#') || line.is_empty() {
            // Serf ignores old coordinates too: they converge again.
        } else {
            return false;
        }
        true
    }

    /// The lines of earlier Phoenix snapshots (`alive NAME ADDR`, `clock N`, `query-clock N`,
    /// `left`), so an agent upgraded in place still rejoins; `None` for anything else.
    fn replay_legacy(&mut self, line: &str) -> Option<bool> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        Some(match fields.as_slice() {
            ["alive", name, addr] => self.replay(&format!("alive: {name} {addr}")),
            ["clock", time] => parse_into(time, &mut self.event_clock),
            ["query-clock", time] => parse_into(time, &mut self.query_clock),
            ["left"] => self.replay("leave"),
            _ => return None,
        })
    }

    /// Writes the snapshot atomically, owner-only and synced (a temporary file renamed over the
    /// old one), as Serf's compaction writes it: peer addresses are not for other local users.
    pub fn write(&self, path: &Path) -> Result<(), crate::persist::FileError> {
        let mut text = String::new();
        for (name, addr) in &self.alive {
            text.push_str(&format!("alive: {name} {addr}\n"));
        }
        text.push_str(&format!(
            "clock: {}\nevent-clock: {}\nquery-clock: {}\n",
            self.member_clock, self.event_clock, self.query_clock
        ));
        if self.left {
            text.push_str("leave\n");
        }
        crate::persist::write_private(path, text.as_bytes())
    }
}

/// Sets `into` to the decimal `text`; false when it is not one.
fn parse_into(text: &str, into: &mut u64) -> bool {
    text.parse().map(|time| *into = time).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temporary_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("phoenix-snapshot-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn round_trips_and_skips_unreadable_lines() {
        let dir = temporary_dir("round");
        let path = dir.join("snapshot");
        let snapshot = Snapshot {
            member_clock: 3,
            event_clock: 42,
            query_clock: 7,
            alive: vec![("a b".into(), "127.0.0.1:7946".parse().unwrap())],
            left: false,
        };
        snapshot.write(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "alive: a b 127.0.0.1:7946\nclock: 3\nevent-clock: 42\nquery-clock: 7\n"
        );
        assert_eq!(Snapshot::read(&path, false), snapshot);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "peer addresses are for the owner only");
        std::fs::write(
            &path,
            "clock: x\nalive: b 127.0.0.1:1\nbogus\nalive: nospace\n",
        )
        .unwrap();
        let read = Snapshot::read(&path, false);
        assert_eq!(
            (read.member_clock, read.alive.len(), read.left),
            (0, 1, false)
        );
        assert_eq!(
            Snapshot::read(&dir.join("missing"), false),
            Snapshot::default()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The lines a Serf agent appends over its life, replayed as Serf replays them.
    #[test]
    fn replays_a_serf_journal_in_order() {
        let dir = temporary_dir("serf");
        let path = dir.join("snapshot");
        let journal = "\
# written by serf
alive: n1 127.0.0.1:7946
alive: n2 127.0.0.1:7947
clock: 2
alive: n3 [::1]:7948
not-alive: n2
event-clock: 5
query-clock: 1
coordinate: {\"Vec\":[0]}
leave
alive: n4 127.0.0.1:7949
alive: n1 127.0.0.1:7950
clock: 9
";
        std::fs::write(&path, journal).unwrap();
        let read = Snapshot::read(&path, false);
        assert_eq!(
            read.alive,
            vec![
                ("n4".to_string(), "127.0.0.1:7949".parse().unwrap()),
                ("n1".to_string(), "127.0.0.1:7950".parse().unwrap()),
            ]
        );
        assert_eq!(
            (read.member_clock, read.event_clock, read.query_clock),
            (9, 5, 1)
        );
        assert!(!read.left, "members after the leave: joined again");
        std::fs::write(&path, "alive: n1 127.0.0.1:7946\nleave\n").unwrap();
        let read = Snapshot::read(&path, false);
        assert!(read.left && read.alive.is_empty());
        let read = Snapshot::read(&path, true);
        assert!(!read.left && read.alive.len() == 1, "rejoin_after_leave");
        // A snapshot of an earlier Phoenix is still read.
        std::fs::write(&path, "clock 42\nquery-clock 7\nalive a 127.0.0.1:7946\n").unwrap();
        let read = Snapshot::read(&path, false);
        assert_eq!(
            (read.event_clock, read.query_clock, read.alive.len()),
            (42, 7, 1)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
