//! The agent's log as `monitor` serves it, as Serf keeps it: the last 512 lines of every level
//! (whatever level the agent prints at), replayed to a new monitor before the live ones, each
//! monitor keeping the lines at or above its own level.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use tracing::Level;

/// Lines kept for a new monitor (Serf's `NewLogWriter(512)`).
pub const BACKLOG: usize = 512;

/// One line of the log, with its level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: Level,
    pub text: Arc<str>,
}

/// A shared handle on the log: writers push, monitors follow.
#[derive(Debug, Clone)]
pub struct LogBook(Arc<Mutex<Book>>);

#[derive(Debug)]
struct Book {
    backlog: VecDeque<LogLine>,
    live: broadcast::Sender<LogLine>,
}

impl Default for LogBook {
    fn default() -> Self {
        let (live, _) = broadcast::channel(1024);
        LogBook(Arc::new(Mutex::new(Book {
            backlog: VecDeque::with_capacity(BACKLOG),
            live,
        })))
    }
}

impl LogBook {
    pub fn push(&self, level: Level, text: impl Into<Arc<str>>) {
        let line = LogLine {
            level,
            text: text.into(),
        };
        let mut book = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if book.backlog.len() == BACKLOG {
            book.backlog.pop_front();
        }
        book.backlog.push_back(line.clone());
        let _ = book.live.send(line);
    }

    /// The lines kept so far and every line from now on, with none lost or doubled between.
    pub fn follow(&self) -> (Vec<LogLine>, broadcast::Receiver<LogLine>) {
        let book = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (
            book.backlog.iter().cloned().collect(),
            book.live.subscribe(),
        )
    }
}

/// A monitor's level by Serf's names (`TRACE`, `DEBUG`, `INFO`, `WARN`, `ERR`, any case).
pub fn monitor_level(name: &str) -> Result<Level, String> {
    match name.to_ascii_uppercase().as_str() {
        "TRACE" => Ok(Level::TRACE),
        "DEBUG" => Ok(Level::DEBUG),
        "INFO" => Ok(Level::INFO),
        "WARN" => Ok(Level::WARN),
        "ERR" => Ok(Level::ERROR),
        other => Err(format!("Unknown log level: {other}")),
    }
}

/// Serf's name of a level, as its log lines write it (`[ERR]`).
pub fn serf_level_name(level: Level) -> &'static str {
    match level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => "INFO",
        Level::WARN => "WARN",
        Level::ERROR => "ERR",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_and_hands_over_to_live_ones_without_a_gap() {
        let book = LogBook::default();
        for i in 0..BACKLOG + 10 {
            book.push(Level::DEBUG, format!("line {i}"));
        }
        let (backlog, mut live) = book.follow();
        assert_eq!(backlog.len(), BACKLOG);
        assert_eq!(&*backlog[0].text, "line 10");
        book.push(Level::ERROR, "after");
        let next = live.try_recv().unwrap();
        assert_eq!((next.level, &*next.text), (Level::ERROR, "after"));
    }

    #[test]
    fn levels_are_serfs() {
        assert_eq!(monitor_level("err"), Ok(Level::ERROR));
        assert_eq!(monitor_level("Debug"), Ok(Level::DEBUG));
        assert_eq!(
            monitor_level("error"),
            Err("Unknown log level: ERROR".into())
        );
        // A line reaches a monitor when it is at least as severe as the monitor's level.
        assert!(Level::ERROR <= Level::INFO && Level::DEBUG > Level::INFO);
    }
}
