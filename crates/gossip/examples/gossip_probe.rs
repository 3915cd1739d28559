//! Measures a running cluster through Serf's RPC protocol, so the same probe measures Serf and
//! Phoenix agents (bench/gossip/run.sh starts them):
//!
//! - event propagation: `EVENTS` user events (no coalescing) fired at the first agent; for
//!   each, the time from the origin's own delivery until the last agent has it;
//! - failure detection: `kill -9` of each victim in turn (the next once the last is detected
//!   everywhere, after a second), then the time until every surviving agent reports it
//!   failed: median and max over the victims;
//! - false failures: any other member reported failed meanwhile.
//!
//! Usage: gossip_probe EVENTS PID:NAME[,PID:NAME...] RPC_ADDR...   (prints one JSON object)
//! The victims are the agents at the last RPC addresses, as many as there are victims.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phoenix_gossip::rpc::{self, Client, ResponseHeader, RpcMember, StreamRequest};
use serde::Deserialize;

/// A stream record, user or member event (fields not present stay empty).
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct Record {
    event: String,
    name: String,
    #[serde(deserialize_with = "nil_members")]
    members: Vec<RpcMember>,
}

fn nil_members<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<RpcMember>, D::Error> {
    Ok(Option::<Vec<RpcMember>>::deserialize(d)?.unwrap_or_default())
}

/// When each agent (by index) saw each event name, and every failure report.
#[derive(Default)]
struct Seen {
    events: HashMap<String, HashMap<usize, Instant>>,
    failed: Vec<(usize, String, Instant)>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        return Err("usage: gossip_probe EVENTS PID:NAME[,PID:NAME...] RPC_ADDR...".into());
    }
    let events: usize = args[0].parse().map_err(|e| format!("EVENTS: {e}"))?;
    let victims: Vec<(i32, String)> = args[1]
        .split(',')
        .map(|v| {
            let (pid, name) = v.split_once(':').ok_or(format!("victim {v}: PID:NAME"))?;
            let pid = pid.parse().map_err(|e| format!("victim {v}: {e}"))?;
            Ok((pid, name.to_string()))
        })
        .collect::<Result<_, String>>()?;
    let addrs: Vec<SocketAddr> = args[2..]
        .iter()
        .map(|a| a.parse().map_err(|e| format!("{a}: {e}")))
        .collect::<Result<_, _>>()?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    for (index, addr) in addrs.iter().enumerate() {
        let mut client = Client::connect(*addr, None).await?;
        let filter = StreamRequest {
            kind: "user,member-failed".into(),
        };
        client.send("stream", Some(&filter)).await?;
        let ack: ResponseHeader = client.read().await?;
        if !ack.error.is_empty() {
            return Err(format!("{addr}: {}", ack.error));
        }
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok(_header) = client.read::<ResponseHeader>().await else {
                    return;
                };
                let Ok(record) = client.read::<Record>().await else {
                    return;
                };
                let now = Instant::now();
                let mut seen = seen.lock().unwrap();
                if record.event == "user" {
                    seen.events
                        .entry(record.name)
                        .or_default()
                        .insert(index, now);
                } else {
                    for member in record.members {
                        seen.failed.push((index, member.name, now));
                    }
                }
            }
        });
    }
    // The victims are the last addresses: they neither fire nor are waited for.
    let observers = addrs.len().saturating_sub(victims.len());
    let mut origin = Client::connect(addrs[0], None).await?;
    let mut spreads = Vec::new();
    for i in 0..events {
        let name = format!("probe-{i}");
        let request = rpc::EventRequest {
            name: name.clone(),
            payload: Vec::new(),
            coalesce: false,
        };
        origin.call::<()>("event", Some(&request)).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spread = {
                let seen = seen.lock().unwrap();
                seen.events.get(&name).and_then(|by_agent| {
                    let at_origin = by_agent.get(&0)?;
                    let complete = (0..observers).all(|a| by_agent.contains_key(&a));
                    complete.then(|| {
                        (0..observers)
                            .map(|a| by_agent[&a].saturating_duration_since(*at_origin))
                            .max()
                            .unwrap_or_default()
                    })
                })
            };
            if let Some(spread) = spread {
                spreads.push(spread.as_secs_f64());
                break;
            }
            if Instant::now() > deadline {
                spreads.push(f64::INFINITY);
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Failure detection, one victim after the other.
    let mut detections = Vec::new();
    for (pid, victim) in &victims {
        detections.push(detect(&seen, *pid, victim, observers).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let false_failures = {
        let seen = seen.lock().unwrap();
        let mut names: Vec<&str> = seen
            .failed
            .iter()
            .filter(|(_, name, _)| !victims.iter().any(|(_, v)| v == name))
            .map(|(_, name, _)| name.as_str())
            .collect();
        names.sort();
        names.dedup();
        names.len()
    };
    spreads.sort_by(f64::total_cmp);
    let median = spreads.get(spreads.len() / 2).copied().unwrap_or(f64::NAN);
    let max = spreads.last().copied().unwrap_or(f64::NAN);
    // A timeout shows as null.
    let json = |v: f64| {
        if v.is_finite() {
            format!("{v:.4}")
        } else {
            "null".into()
        }
    };
    detections.sort_by(f64::total_cmp);
    let detection = detections
        .get(detections.len() / 2)
        .copied()
        .unwrap_or(f64::NAN);
    let detection_max = detections.last().copied().unwrap_or(f64::NAN);
    println!(
        "{{\"event_p50_s\": {}, \"event_max_s\": {}, \"failure_detection_s\": {}, \"failure_detection_max_s\": {}, \"kills\": {}, \"false_failures\": {false_failures}}}",
        json(median),
        json(max),
        json(detection),
        json(detection_max),
        detections.len()
    );
    Ok(())
}

/// Kills `pid` and waits until every observer reported `victim` failed; the seconds that took
/// (infinite past a minute).
async fn detect(seen: &Mutex<Seen>, pid: i32, victim: &str, observers: usize) -> f64 {
    let killed = Instant::now();
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    unsafe { libc_kill(pid, 9) };
    let deadline = killed + Duration::from_secs(60);
    loop {
        let done = {
            let seen = seen.lock().unwrap();
            let reported: Vec<&(usize, String, Instant)> = seen
                .failed
                .iter()
                .filter(|(_, name, _)| name == victim)
                .collect();
            let observers_done = (0..observers).all(|a| reported.iter().any(|(i, ..)| *i == a));
            observers_done.then(|| {
                reported
                    .iter()
                    .map(|(_, _, at)| at.saturating_duration_since(killed))
                    .max()
                    .unwrap_or_default()
            })
        };
        if let Some(detection) = done {
            return detection.as_secs_f64();
        }
        if Instant::now() > deadline {
            return f64::INFINITY;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}
