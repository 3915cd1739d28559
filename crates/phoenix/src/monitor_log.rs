//! The agent's log for `serf monitor`: every event of the gossip agent and its handlers, at
//! every level, goes into the process's [`LogBook`] as a line in Serf's form
//! (`2026/12/04 08:25:46 [INFO] serf: EventMemberJoin: n2 127.0.0.1`, UTC), whatever level
//! stderr shows.

use std::fmt::Write;
use std::sync::OnceLock;

use phoenix_gossip::rpc::LogBook;
use phoenix_gossip::rpc::logbook::serf_level_name;
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::Context;

/// The process's log book (one per process, as the log is).
pub fn logs() -> LogBook {
    static LOGS: OnceLock<LogBook> = OnceLock::new();
    LOGS.get_or_init(LogBook::default).clone()
}

/// The layer that writes the log book: the gossip agent (`serf`), the agent's handlers and
/// RPC (`agent`) and Phoenix's gossip crate, at every level.
pub fn layer<S>() -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let targets = Targets::new()
        .with_target("serf", tracing::Level::TRACE)
        .with_target("agent", tracing::Level::TRACE)
        .with_target("phoenix_gossip", tracing::Level::TRACE);
    BookLayer(logs()).with_filter(targets)
}

struct BookLayer(LogBook);

impl<S: tracing::Subscriber> Layer<S> for BookLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let metadata = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let target = match metadata.target() {
            "serf" | "agent" => metadata.target(),
            _ => "serf",
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let stamp = phoenix_image::rfc3339(now);
        // 2026-12-04T08:25:46Z → 2026/12/04 08:25:46, as Go's log package writes it.
        let stamp = stamp[..19].replace('-', "/").replace('T', " ");
        let level = serf_level_name(*metadata.level());
        self.0.push(
            *metadata.level(),
            format!(
                "{stamp} [{level}] {target}: {}{}",
                fields.message, fields.rest
            ),
        );
    }
}

/// An event's message, then its other fields as ` key=value`.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            name => {
                let _ = write!(self.rest, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }
}
