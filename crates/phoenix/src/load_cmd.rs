//! `phoenix load URL --rps N --duration D`: an open-loop HTTP load generator.
//!
//! Requests are scheduled at a fixed rate whatever the server does (as wrk2 does, unlike a
//! closed loop that slows down with the server), and each latency is measured from the time
//! the request was due, so a stalled server shows up as latency instead of hiding as fewer
//! requests ("coordinated omission").

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// `http://HOST:PORT/PATH` (plain HTTP/1.1).
    pub url: String,
    /// Requests per second, sent on schedule whatever the answers.
    #[arg(long)]
    pub rps: u32,
    /// How long to send, e.g. `30s`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Keep-alive connections (the most requests in flight at once).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// A request without a complete answer by then is an error.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[arg(long)]
    pub json: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    phoenix_fleet::parse_duration(text)
}

/// What a run saw.
#[derive(Debug, Default, Serialize)]
pub struct LoadReport {
    pub scheduled: u64,
    pub ok: u64,
    pub errors: u64,
    /// Errors by kind: `status 503`, `timeout`, `connect`, ….
    pub error_kinds: BTreeMap<String, u64>,
    /// Completed requests (ok or not) per second of the run.
    pub achieved_rps: f64,
    /// Latency from when each request was due, in milliseconds.
    pub latency_ms: Percentiles,
}

#[derive(Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `micros` (sorted in place).
    fn of(micros: &mut [u64]) -> Percentiles {
        micros.sort_unstable();
        let at = |q: f64| -> f64 {
            if micros.is_empty() {
                return 0.0;
            }
            let rank = ((q * micros.len() as f64).ceil() as usize).clamp(1, micros.len());
            micros[rank - 1] as f64 / 1000.0
        };
        Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        }
    }
}

/// One request's outcome.
struct Outcome {
    micros: u64,
    error: Option<String>,
}

pub async fn run(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let target = Target::parse(&args.url)?;
    if args.rps == 0 || args.connections == 0 {
        bail!("--rps and --connections must be at least 1");
    }
    let report = generate(&target, &args).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&args, &report);
    }
    Ok(if report.errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_report(args: &LoadArgs, report: &LoadReport) {
    let l = &report.latency_ms;
    println!(
        "{} requests scheduled at {} rps for {:?}: {} ok, {} errors, {:.1} rps achieved",
        report.scheduled, args.rps, args.duration, report.ok, report.errors, report.achieved_rps
    );
    println!(
        "latency from schedule: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        l.p50, l.p90, l.p99, l.p999, l.max
    );
    for (kind, count) in &report.error_kinds {
        println!("  {count:>8}  {kind}");
    }
}

/// Sends `args.rps` requests a second for `args.duration` over `args.connections` workers.
async fn generate(target: &Target, args: &LoadArgs) -> LoadReport {
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rps));
    let scheduled = (args.duration.as_secs_f64() * f64::from(args.rps)).round() as u64;
    let (due_tx, due_rx) = tokio::sync::mpsc::unbounded_channel();
    let due_rx: Schedule = Arc::new(tokio::sync::Mutex::new(due_rx));
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(scheduled as usize)));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.connections)
        .map(|_| {
            let (due, outcomes, target) = (due_rx.clone(), outcomes.clone(), target.clone());
            let timeout = args.timeout;
            tokio::spawn(async move { worker(target, due, outcomes, timeout).await })
        })
        .collect();
    for n in 0..scheduled {
        let due = started + interval.mul_f64(n as f64);
        tokio::time::sleep_until(due).await;
        // Unbounded: when every connection is busy, requests queue and their wait counts.
        if due_tx.send(due).is_err() {
            break;
        }
    }
    drop(due_tx);
    for worker in workers {
        let _ = worker.await;
    }
    // Over the whole schedule at least: the last request is due just before its end.
    let elapsed = started.elapsed().max(args.duration).as_secs_f64();
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap_or_else(|p| p.into_inner()));
    let mut report = LoadReport {
        scheduled,
        ..LoadReport::default()
    };
    let mut micros = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        micros.push(outcome.micros);
        match outcome.error {
            None => report.ok += 1,
            Some(kind) => {
                report.errors += 1;
                *report.error_kinds.entry(kind).or_default() += 1;
            }
        }
    }
    report.achieved_rps = micros.len() as f64 / elapsed.max(f64::EPSILON);
    report.latency_ms = Percentiles::of(&mut micros);
    report
}

/// The schedule: one due time per request, shared by the workers.
type Schedule = Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Instant>>>;

async fn next_due(schedule: &Schedule) -> Option<Instant> {
    schedule.lock().await.recv().await
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn worker(
    target: Target,
    schedule: Schedule,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    timeout: Duration,
) {
    let mut connection: Option<Sender> = None;
    while let Some(due) = next_due(&schedule).await {
        let result = tokio::time::timeout(timeout, send(&target, &mut connection)).await;
        let error = match result {
            Ok(Ok(status)) if status < 400 => None,
            Ok(Ok(status)) => Some(format!("status {status}")),
            Ok(Err(kind)) => {
                connection = None;
                Some(kind)
            }
            Err(_) => {
                connection = None;
                Some("timeout".into())
            }
        };
        let micros = due.elapsed().as_micros() as u64;
        outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Outcome { micros, error });
    }
}

/// One GET on the worker's keep-alive connection (opened on first use or after an error);
/// returns the status code, or the kind of failure.
async fn send(target: &Target, connection: &mut Option<Sender>) -> Result<u16, String> {
    if connection.as_ref().is_none_or(|c| c.is_closed()) {
        let stream = TcpStream::connect(target.addr)
            .await
            .map_err(|_| "connect".to_string())?;
        let _ = stream.set_nodelay(true);
        let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| "connect".to_string())?;
        tokio::spawn(driver);
        *connection = Some(sender);
    }
    let sender = connection.as_mut().expect("connected above");
    sender.ready().await.map_err(|_| "connection".to_string())?;
    let request = http::Request::get(&target.path)
        .header(http::header::HOST, &target.host)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|_| "connection".to_string())?;
    let status = response.status().as_u16();
    response
        .into_body()
        .collect()
        .await
        .map_err(|_| "body".to_string())?;
    Ok(status)
}

/// Where the load goes.
#[derive(Debug, Clone)]
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Target> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url:?}: only http:// URLs are supported"))?;
        let (host, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
            .with_context(|| format!("{url:?}: give HOST:PORT"))?
            .next()
            .with_context(|| format!("{url:?}: {host} resolves to no address"))?;
        Ok(Target {
            addr,
            host: host.to_string(),
            path: path.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut micros: Vec<u64> = (1..=1000).rev().map(|n| n * 1000).collect();
        let p = Percentiles::of(&mut micros);
        assert_eq!(
            (p.p50, p.p90, p.p99, p.p999, p.max),
            (500.0, 900.0, 990.0, 999.0, 1000.0)
        );
        assert_eq!(Percentiles::of(&mut []).max, 0.0);
    }

    #[test]
    fn urls_parse() {
        let t = Target::parse("http://127.0.0.1:8080/slow/5").unwrap();
        assert_eq!((t.addr.port(), t.path.as_str()), (8080, "/slow/5"));
        assert_eq!(Target::parse("http://127.0.0.1:1").unwrap().path, "/");
        assert!(Target::parse("https://x:1/").is_err());
    }
}
