//! A role's graph drawn as SVG on the server: a few lines over time, with a scale, a legend
//! and a text alternative. No script and no library on the page.

use std::fmt::Write;

use phoenix_observe::Point;

/// The graphs a role has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Graph {
    Requests,
    Latency,
    Cpu,
    Memory,
}

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 180.0;
const LEFT: f64 = 48.0;
const BOTTOM: f64 = 22.0;
const TOP: f64 = 24.0;
/// Points drawn at most: more are averaged into this many buckets.
const BUCKETS: usize = 300;
const COLOURS: [&str; 2] = ["#2563eb", "#dc2626"];

impl Graph {
    pub const ALL: [Graph; 4] = [Graph::Requests, Graph::Latency, Graph::Cpu, Graph::Memory];

    pub fn name(self) -> &'static str {
        match self {
            Graph::Requests => "requests",
            Graph::Latency => "latency",
            Graph::Cpu => "cpu",
            Graph::Memory => "memory",
        }
    }

    pub fn named(name: &str) -> Option<Graph> {
        Graph::ALL.into_iter().find(|g| g.name() == name)
    }

    fn title(self) -> &'static str {
        match self {
            Graph::Requests => "Requests and errors per second",
            Graph::Latency => "Latency p50 and p99 (ms)",
            Graph::Cpu => "CPU (cores, all instances)",
            Graph::Memory => "Memory (MiB, all instances)",
        }
    }

    /// The metrics drawn, with their legend.
    pub fn series(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Graph::Requests => &[("rps", "requests/s"), ("errors", "errors/s")],
            Graph::Latency => &[("p50_ms", "p50"), ("p99_ms", "p99")],
            Graph::Cpu => &[("cpu", "cores")],
            Graph::Memory => &[("memory", "MiB")],
        }
    }

    /// A point's value: the proxy's own for traffic, the instances' total for resources.
    pub fn value(self, point: &Point) -> Option<f64> {
        match self {
            Graph::Requests | Graph::Latency => point.role,
            Graph::Cpu => point.sum,
            Graph::Memory => point.sum.map(|bytes| bytes / (1024.0 * 1024.0)),
        }
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round number at least `max` (1, 2 or 5 times a power of ten).
fn nice_ceiling(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|v| *v >= max)
        .unwrap_or(10.0 * power)
}

fn number(value: f64) -> String {
    if value >= 100.0 || value == value.trunc() {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// `values` averaged into at most [`BUCKETS`] buckets across `[since, now]`.
fn buckets(values: &[(i64, f64)], since: i64, now: i64) -> Vec<(i64, f64)> {
    let span = (now - since).max(1);
    let mut sums = vec![(0.0, 0u32, 0i64); BUCKETS];
    for (t, v) in values {
        let i = ((t - since).clamp(0, span - 1) as i128 * BUCKETS as i128 / span as i128) as usize;
        let bucket = &mut sums[i.min(BUCKETS - 1)];
        bucket.0 += v;
        bucket.1 += 1;
        bucket.2 = *t;
    }
    sums.into_iter()
        .filter(|(_, n, _)| *n > 0)
        .map(|(sum, n, t)| (t, sum / f64::from(n)))
        .collect()
}

fn ago(ms: i64) -> String {
    let minutes = ms / 60_000;
    if minutes >= 1440 {
        format!("-{}d", minutes / 1440)
    } else if minutes >= 60 {
        format!("-{}h", minutes / 60)
    } else {
        format!("-{minutes}m")
    }
}

/// The SVG of `graph` for `role`: each series a line over `[since, now]`.
pub fn draw(
    graph: Graph,
    role: &str,
    series: &[(&str, Vec<(i64, f64)>)],
    since: i64,
    now: i64,
) -> String {
    let drawn: Vec<(&str, Vec<(i64, f64)>)> = series
        .iter()
        .map(|(label, values)| (*label, buckets(values, since, now)))
        .collect();
    let max = drawn
        .iter()
        .flat_map(|(_, v)| v.iter().map(|(_, y)| *y))
        .fold(0.0f64, f64::max);
    let top = nice_ceiling(max);
    let plot_w = WIDTH - LEFT - 8.0;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let span = (now - since).max(1) as f64;
    let x = |t: i64| LEFT + (t - since) as f64 / span * plot_w;
    let y = |v: f64| TOP + plot_h - (v / top).clamp(0.0, 1.0) * plot_h;
    let latest: Vec<String> = drawn
        .iter()
        .map(|(label, v)| match v.last() {
            Some((_, value)) => format!("{label} {}", number(*value)),
            None => format!("{label} no data"),
        })
        .collect();
    let title = format!(
        "{}: {} ({})",
        escape(role),
        graph.title(),
        latest.join(", ")
    );
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{title}\" font-family=\"system-ui, sans-serif\" font-size=\"11\">\
         <title>{title}</title><rect width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"#ffffff\"/>\
         <text x=\"{LEFT}\" y=\"14\" font-size=\"12\" font-weight=\"600\" fill=\"#111827\">{}</text>",
        graph.title()
    );
    for step in 0..=2 {
        let value = top * f64::from(step) / 2.0;
        let gy = y(value);
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{gy:.1}\" y2=\"{gy:.1}\" stroke=\"#e5e7eb\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#374151\">{}</text>",
            WIDTH - 8.0,
            LEFT - 4.0,
            gy + 4.0,
            number(value)
        );
    }
    let span_ms = now - since;
    for (fraction, label) in [
        (0.0, ago(span_ms)),
        (0.5, ago(span_ms / 2)),
        (1.0, "now".to_string()),
    ] {
        let anchor = if fraction == 0.0 {
            "start"
        } else if fraction == 1.0 {
            "end"
        } else {
            "middle"
        };
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"{anchor}\" fill=\"#374151\">{label}</text>",
            LEFT + fraction * plot_w,
            HEIGHT - 6.0
        );
    }
    // A gap in the samples (Phoenix stopped, the role absent) breaks the line.
    let gap = (span / BUCKETS as f64 * 3.0) as i64;
    for (i, (label, values)) in drawn.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut runs: Vec<Vec<(i64, f64)>> = Vec::new();
        for point in values {
            match runs.last_mut() {
                Some(run) if point.0 - run.last().map_or(point.0, |p| p.0) <= gap.max(2_000) => {
                    run.push(*point)
                }
                _ => runs.push(vec![*point]),
            }
        }
        for run in runs {
            if let [(t, v)] = run[..] {
                // One point alone makes no line: a dot.
                let _ = write!(
                    svg,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\" fill=\"{colour}\"/>",
                    x(t),
                    y(v)
                );
                continue;
            }
            let points: Vec<String> = run
                .iter()
                .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
                .collect();
            let _ = write!(
                svg,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
                points.join(" ")
            );
        }
        let lx = WIDTH - 8.0 - 110.0 * (drawn.len() - i) as f64;
        let _ = write!(
            svg,
            "<rect x=\"{lx:.1}\" y=\"6\" width=\"10\" height=\"3\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"12\" fill=\"#111827\" class=\"legend\">{}</text>",
            lx + 14.0,
            escape(&latest[i])
        );
        let _ = label;
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_graph_draws_each_series_and_says_its_latest_values() {
        let rps: Vec<(i64, f64)> = (0..3600).map(|s| (s * 1000, 50.0)).collect();
        let errors: Vec<(i64, f64)> = (0..3600).map(|s| (s * 1000, 0.5)).collect();
        let svg = draw(
            Graph::Requests,
            "web<1>",
            &[("requests/s", rps), ("errors/s", errors)],
            0,
            3_600_000,
        );
        assert!(svg.starts_with("<svg "), "{svg}");
        assert!(svg.contains("aria-label=\"web&lt;1&gt;: Requests and errors per second (requests/s 50, errors/s 0.50)\""), "{svg}");
        assert_eq!(svg.matches("<polyline").count(), 2);
        // 50 requests/s on a scale of 50: the line runs along the top of the plot.
        let line = svg.split("points=\"").nth(1).unwrap();
        let first_y: f64 = line
            .split(',')
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((first_y - TOP).abs() < 0.01, "{first_y}");
        assert!(svg.contains(">-1h<") && svg.contains(">-30m<") && svg.contains(">now<"));
    }

    #[test]
    fn a_gap_in_the_samples_breaks_the_line_and_no_data_says_so() {
        let mut values: Vec<(i64, f64)> = (0..600).map(|s| (s * 1000, 1.0)).collect();
        values.extend((3000..3600).map(|s| (s * 1000, 2.0)));
        let svg = draw(Graph::Cpu, "web", &[("cores", values)], 0, 3_600_000);
        assert_eq!(svg.matches("<polyline").count(), 2);
        let empty = draw(Graph::Memory, "web", &[("MiB", Vec::new())], 0, 3_600_000);
        assert!(empty.contains("MiB no data"));
        assert_eq!(empty.matches("<polyline").count(), 0);
    }

    #[test]
    fn scales_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(50.0), 50.0);
        assert_eq!(nice_ceiling(51.0), 100.0);
        assert_eq!(nice_ceiling(0.3), 0.5);
        assert_eq!(nice_ceiling(1200.0), 2000.0);
    }
}
