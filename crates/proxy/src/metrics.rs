//! Traffic metrics of a role and of each backend, and their Prometheus text exposition.
//!
//! Plain atomics, recorded on the request path without locks or label lookups.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of every histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A latency histogram with the fixed [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last slot is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn record(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|le| seconds <= *le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Observations per bucket so far; the difference of two snapshots is an interval's.
    pub fn snapshot(&self) -> [u64; LATENCY_BUCKETS.len() + 1] {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }

    /// The upper bound (seconds) of the bucket holding the `q`-quantile of per-bucket
    /// `counts` (a snapshot or a difference of two), if they hold any observation.
    pub fn quantile_of(counts: &[u64], q: f64) -> Option<f64> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(
                    LATENCY_BUCKETS
                        .get(bucket)
                        .copied()
                        .unwrap_or(f64::INFINITY),
                );
            }
        }
        None
    }

    /// The upper bound of the bucket holding the `q`-quantile (e.g. 0.99), if any observation.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        Histogram::quantile_of(&self.snapshot(), q)
    }
}

/// Counters of traffic through a role or to one backend.
#[derive(Debug, Default)]
pub struct TrafficMetrics {
    /// Responses by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    responses: [AtomicU64; 5],
    /// Time from receiving a request to the response head.
    latency: Histogram,
    /// Request body bytes received from clients.
    received_bytes: AtomicU64,
    /// Response body bytes sent to clients.
    sent_bytes: AtomicU64,
}

impl TrafficMetrics {
    /// Counts one response head: its status class and the time it took to arrive.
    pub fn record_response(&self, status: u16, latency: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
        self.latency.record(latency);
    }

    pub fn add_received(&self, bytes: u64) {
        self.received_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_sent(&self, bytes: u64) {
        self.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Response body bytes sent so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes.load(Ordering::Relaxed)
    }

    /// Request body bytes received so far.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes.load(Ordering::Relaxed)
    }

    /// Responses of status class `class` (1 to 5).
    pub fn responses(&self, class: usize) -> u64 {
        self.responses[class - 1].load(Ordering::Relaxed)
    }

    /// Time to the response head.
    pub fn latency(&self) -> &Histogram {
        &self.latency
    }

    pub fn total_responses(&self) -> u64 {
        self.responses
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// Collects samples by metric family so that each family's lines come together, after its
/// `# HELP` and `# TYPE`, as the Prometheus text format requires.
#[derive(Debug, Default)]
pub struct Exposition {
    families: BTreeMap<&'static str, (&'static str, &'static str, String)>,
}

impl Exposition {
    /// Adds one sample; `labels` is already rendered (`role="web",class="2xx"`).
    pub fn sample(
        &mut self,
        family: &'static str,
        kind: &'static str,
        help: &'static str,
        suffix: &str,
        labels: &str,
        value: impl std::fmt::Display,
    ) {
        let entry = self
            .families
            .entry(family)
            .or_insert((kind, help, String::new()));
        let _ = writeln!(entry.2, "{family}{suffix}{{{labels}}} {value}");
    }

    /// Adds a histogram's cumulative buckets, sum and count.
    pub fn histogram(
        &mut self,
        family: &'static str,
        help: &'static str,
        labels: &str,
        histogram: &Histogram,
    ) {
        let mut cumulative = 0;
        for (bucket, count) in histogram.buckets.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = LATENCY_BUCKETS
                .get(bucket)
                .map_or("+Inf".to_string(), |le| le.to_string());
            self.sample(
                family,
                "histogram",
                help,
                "_bucket",
                &format!("{labels},le=\"{le}\""),
                cumulative,
            );
        }
        let sum = histogram.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        self.sample(family, "histogram", help, "_sum", labels, sum);
        self.sample(family, "histogram", help, "_count", labels, cumulative);
    }

    /// Adds the counters, histogram, in-flight gauge and bytes of one role or backend.
    pub fn traffic(
        &mut self,
        scope: Scope,
        labels: &str,
        metrics: &TrafficMetrics,
        in_flight: usize,
    ) {
        let names = scope.names();
        for (class, counter) in metrics.responses.iter().enumerate() {
            let labels = format!("{labels},class=\"{}xx\"", class + 1);
            let value = counter.load(Ordering::Relaxed);
            self.sample(
                names.responses,
                "counter",
                "Responses by status class.",
                "",
                &labels,
                value,
            );
        }
        let help = "Time from receiving a request to the response head, in seconds.";
        self.histogram(names.latency, help, labels, &metrics.latency);
        self.sample(
            names.in_flight,
            "gauge",
            "Requests and tunnels in flight.",
            "",
            labels,
            in_flight,
        );
        let received = metrics.received_bytes.load(Ordering::Relaxed);
        self.sample(
            names.received,
            "counter",
            "Request body bytes received from clients.",
            "",
            labels,
            received,
        );
        let sent = metrics.sent_bytes.load(Ordering::Relaxed);
        self.sample(
            names.sent,
            "counter",
            "Response body bytes sent to clients.",
            "",
            labels,
            sent,
        );
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (family, (kind, help, samples)) in &self.families {
            let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} {kind}");
            out.push_str(samples);
        }
        out
    }
}

/// Whose traffic a set of samples describes.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    Role,
    Backend,
}

struct Names {
    responses: &'static str,
    latency: &'static str,
    in_flight: &'static str,
    received: &'static str,
    sent: &'static str,
}

impl Scope {
    fn names(self) -> Names {
        match self {
            Scope::Role => Names {
                responses: "phoenix_role_responses_total",
                latency: "phoenix_role_response_seconds",
                in_flight: "phoenix_role_in_flight",
                received: "phoenix_role_received_bytes_total",
                sent: "phoenix_role_sent_bytes_total",
            },
            Scope::Backend => Names {
                responses: "phoenix_backend_responses_total",
                latency: "phoenix_backend_response_seconds",
                in_flight: "phoenix_backend_in_flight",
                received: "phoenix_backend_received_bytes_total",
                sent: "phoenix_backend_sent_bytes_total",
            },
        }
    }
}

/// Escapes a label value for the text format.
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
