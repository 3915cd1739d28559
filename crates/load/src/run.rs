//! Sending a scenario: a schedule of due times, shared by one worker per keep-alive
//! connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::report::{Outcome, summarise};
use crate::{Report, RequestSpec, Scenario};

/// Where the load goes: connections are spread over `addrs` in turn.
#[derive(Debug, Clone)]
pub struct Target {
    pub addrs: Vec<SocketAddr>,
    /// The `Host` header, unless a request sets its own.
    pub host: String,
}

impl Target {
    /// `http://HOST:PORT/PATH`: the target and the path.
    pub fn parse(url: &str) -> Result<(Target, String), String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?}: only http:// URLs are supported"))?;
        let (host, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
            .map_err(|_| format!("{url:?}: give HOST:PORT"))?
            .next()
            .ok_or_else(|| format!("{url:?}: {host} resolves to no address"))?;
        let target = Target {
            addrs: vec![addr],
            host: host.to_string(),
        };
        Ok((target, path.to_string()))
    }
}

/// Runs `scenario` against `target` and reports what it saw.
pub async fn run(scenario: &Scenario, target: &Target) -> Report {
    let due_times = crate::due_times(scenario.start_rate, &scenario.stages);
    let scheduled = due_times.len() as u64;
    let order = weighted_order(&scenario.requests);
    let (due_tx, due_rx) = tokio::sync::mpsc::unbounded_channel();
    let due_rx: Schedule = Arc::new(tokio::sync::Mutex::new(due_rx));
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(due_times.len())));
    let requests: Arc<[RequestSpec]> = scenario.requests.clone().into();
    let started = Instant::now();
    let workers: Vec<_> = (0..scenario.connections)
        .map(|n| {
            let worker = Worker {
                addr: target.addrs[n % target.addrs.len().max(1)],
                host: target.host.clone(),
                requests: requests.clone(),
                timeout: scenario.timeout,
                outcomes: outcomes.clone(),
            };
            let schedule = due_rx.clone();
            tokio::spawn(async move { worker.run(schedule).await })
        })
        .collect();
    for (n, offset) in due_times.into_iter().enumerate() {
        let due = started + offset;
        tokio::time::sleep_until(due).await;
        // Unbounded: when every connection is busy, requests queue and their wait counts.
        if due_tx.send((due, order[n % order.len()])).is_err() {
            break;
        }
    }
    drop(due_tx);
    for worker in workers {
        let _ = worker.await;
    }
    // Over the whole schedule at least: the last request is due just before its end.
    let seconds = started.elapsed().max(scenario.duration()).as_secs_f64();
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap_or_else(|p| p.into_inner()));
    summarise(scenario, scheduled, outcomes, seconds)
}

/// One cycle of request indices in which each appears `weight` times, spread out (smooth
/// weighted round robin): weights 3 and 1 give `[0, 0, 1, 0]`.
fn weighted_order(requests: &[RequestSpec]) -> Vec<usize> {
    let total: i64 = requests.iter().map(|r| i64::from(r.weight)).sum();
    let mut current = vec![0_i64; requests.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, r) in current.iter_mut().zip(requests) {
            *c += i64::from(r.weight);
        }
        let Some(best) = (0..current.len()).max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
        else {
            break;
        };
        current[best] -= total;
        order.push(best);
    }
    if order.is_empty() {
        order.push(0);
    }
    order
}

/// The schedule: one due time and request per entry, shared by the workers.
type Schedule = Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<(Instant, usize)>>>;

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

struct Worker {
    addr: SocketAddr,
    host: String,
    requests: Arc<[RequestSpec]>,
    timeout: Duration,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
}

impl Worker {
    async fn run(self, schedule: Schedule) {
        let mut connection: Option<Sender> = None;
        loop {
            let next = schedule.lock().await.recv().await;
            let Some((due, request)) = next else { break };
            let spec = &self.requests[request];
            let sent = tokio::time::timeout(self.timeout, self.send(spec, &mut connection));
            let error = match sent.await {
                Ok(Ok(status)) if succeeded(spec, status) => None,
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
            let outcome = Outcome {
                request,
                micros,
                error,
            };
            self.outcomes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(outcome);
        }
    }

    /// One request on the worker's keep-alive connection (opened on first use or after an
    /// error); the status code, or the kind of failure.
    async fn send(
        &self,
        spec: &RequestSpec,
        connection: &mut Option<Sender>,
    ) -> Result<u16, String> {
        if connection.as_ref().is_none_or(|c| c.is_closed()) {
            let stream = TcpStream::connect(self.addr)
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
        let mut request = http::Request::builder()
            .method(spec.method.clone())
            .uri(&spec.path);
        let headers = request.headers_mut().expect("a fresh builder");
        for (name, value) in &spec.headers {
            headers.append(name, value.clone());
        }
        if !headers.contains_key(http::header::HOST) {
            let host = http::HeaderValue::from_str(&self.host).map_err(|e| e.to_string())?;
            headers.insert(http::header::HOST, host);
        }
        let request = request
            .body(Full::new(spec.body.clone()))
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
}

fn succeeded(spec: &RequestSpec, status: u16) -> bool {
    if spec.expect_status.is_empty() {
        status < 400
    } else {
        spec.expect_status.contains(&status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_spread_exactly() {
        let mut requests = vec![RequestSpec::get("/a"), RequestSpec::get("/b")];
        requests[0].weight = 3;
        assert_eq!(weighted_order(&requests), vec![0, 0, 1, 0]);
        requests[1].weight = 3;
        assert_eq!(weighted_order(&requests), vec![0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn urls_parse() {
        let (t, path) = Target::parse("http://127.0.0.1:8080/slow/5").unwrap();
        assert_eq!((t.addrs[0].port(), path.as_str()), (8080, "/slow/5"));
        assert_eq!(Target::parse("http://127.0.0.1:1").unwrap().1, "/");
        assert!(Target::parse("https://x:1/").is_err());
    }
}
