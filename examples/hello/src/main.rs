//! `hello`: the example app Phoenix deploys.
//!
//! - `GET /` answers `hello from INSTANCE version VERSION`; with `ERROR_PERCENT=N` exactly N in
//!   every 100 of them (evenly spread) answer 500 instead (a bad release, for canary tests).
//! - `GET /healthz` answers 200, or 503 when started with `--fail-health` or `FAIL_HEALTH=1`.
//! - `GET /slow/MS` answers after MS milliseconds (to watch requests finish during a drain).
//! - `GET /alloc/MIB` takes MIB mebibytes of memory and keeps them (to watch a memory limit).
//!
//! With `TICKS=N` it also prints `tick 1` to `tick N` on stdout, one every `TICK_MS`
//! milliseconds (default 1): a numbered stream to follow through the log store and beyond.
//!
//! It listens on `HOST`:`PORT` (`HOST` defaults to 127.0.0.1), takes its instance name from
//! `PHOENIX_INSTANCE` and its version from `VERSION`. On SIGTERM it stops accepting and lets
//! in-flight requests finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

struct App {
    instance: String,
    version: String,
    fail_health: bool,
    /// Of every 100 answers to `/`, how many are 500s.
    error_percent: u64,
    answered: std::sync::atomic::AtomicU64,
}

fn env_flag(name: &str) -> bool {
    matches!(std::env::var(name).as_deref(), Ok("1" | "true" | "yes"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "usage: hello [--fail-health]   (env: PORT, HOST, VERSION, PHOENIX_INSTANCE, FAIL_HEALTH, ERROR_PERCENT, START_DELAY_MS, TICKS, TICK_MS)"
        );
        return;
    }
    if let Some(bad) = args.iter().find(|a| *a != "--fail-health") {
        eprintln!("hello: unknown argument {bad:?} (try --help)");
        std::process::exit(2);
    }
    let port: u16 = match std::env::var("PORT").map(|p| p.parse()) {
        Ok(Ok(port)) => port,
        _ => {
            eprintln!("hello: PORT must be set to a port number");
            std::process::exit(2);
        }
    };
    let app = Arc::new(App {
        instance: std::env::var("PHOENIX_INSTANCE").unwrap_or_else(|_| "local".into()),
        version: std::env::var("VERSION").unwrap_or_else(|_| env!("CARGO_PKG_VERSION").into()),
        fail_health: args.iter().any(|a| a == "--fail-health") || env_flag("FAIL_HEALTH"),
        error_percent: match std::env::var("ERROR_PERCENT").map(|p| p.parse::<u64>()) {
            Ok(Ok(percent)) if percent <= 100 => percent,
            Ok(_) => {
                eprintln!("hello: ERROR_PERCENT must be a whole number from 0 to 100");
                std::process::exit(2);
            }
            Err(_) => 0,
        },
        answered: std::sync::atomic::AtomicU64::new(0),
    });
    let host: std::net::IpAddr = match std::env::var("HOST").map(|h| h.parse()) {
        Ok(Ok(host)) => host,
        Ok(Err(_)) => {
            eprintln!("hello: HOST must be an IP address");
            std::process::exit(2);
        }
        Err(_) => [127, 0, 0, 1].into(),
    };
    let addr = SocketAddr::new(host, port);
    // A slow start, for tests that need a deploy to be under way for a while.
    if let Some(ms) = std::env::var("START_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hello: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "hello {} version {} listening on {addr} (healthy: {})",
        app.instance, app.version, !app.fail_health
    );
    if let Some(ticks) = std::env::var("TICKS")
        .ok()
        .and_then(|n| n.parse::<u64>().ok())
    {
        let every = std::env::var("TICK_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(1);
        tokio::spawn(tick(ticks, Duration::from_millis(every)));
    }
    serve(listener, app).await;
    println!("hello: stopped");
}

async fn tick(count: u64, every: Duration) {
    let mut interval = tokio::time::interval(every);
    for n in 1..=count {
        interval.tick().await;
        println!("tick {n}");
    }
}

async fn serve(listener: TcpListener, app: Arc<App>) {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            accepted = listener.accept() => {
                // Finished connections leave the set (it counts the open ones at SIGTERM).
                while connections.try_join_next().is_some() {}
                let Ok((stream, _)) = accepted else { continue };
                let app = app.clone();
                let mut stop = stop_rx.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(app.clone(), req));
                    // A client that sends its request and shuts its side (`printf ... | nc`)
                    // still gets the answer.
                    let conn = http1::Builder::new()
                        .half_close(true)
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = stop.changed() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        }
    }
    println!(
        "hello: SIGTERM, finishing {} connection(s)",
        connections.len()
    );
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
}

async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    let (status, body) = if path == "/healthz" {
        if app.fail_health {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "unhealthy (--fail-health)\n".to_string(),
            )
        } else {
            (StatusCode::OK, "ok\n".to_string())
        }
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        match ms.parse::<u64>() {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
                (StatusCode::OK, greeting(&app))
            }
            Err(_) => (
                StatusCode::BAD_REQUEST,
                "usage: /slow/MILLISECONDS\n".to_string(),
            ),
        }
    } else if let Some(mib) = path.strip_prefix("/alloc/") {
        match mib.parse::<usize>() {
            Ok(mib) if mib <= 4096 => {
                let taken = hold(mib);
                (StatusCode::OK, format!("holding {taken} MiB\n"))
            }
            _ => (
                StatusCode::BAD_REQUEST,
                "usage: /alloc/MEBIBYTES (at most 4096)\n".to_string(),
            ),
        }
    } else if path == "/" {
        let n = app
            .answered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Request n fails when it crosses the next multiple of 100 / ERROR_PERCENT.
        if (n + 1) * app.error_percent / 100 > n * app.error_percent / 100 {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("failing (ERROR_PERCENT={})\n", app.error_percent),
            )
        } else {
            (StatusCode::OK, greeting(&app))
        }
    } else {
        (StatusCode::NOT_FOUND, "not found\n".to_string())
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        "x-instance",
        http::HeaderValue::from_str(&app.instance).unwrap_or(http::HeaderValue::from_static("?")),
    );
    Ok(response)
}

/// Takes `mib` more mebibytes, touched page by page so that they are really in use; returns
/// how many are held in all.
fn hold(mib: usize) -> usize {
    static HELD: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..mib {
        let mut block = vec![0u8; 1 << 20];
        for page in block.iter_mut().step_by(4096) {
            *page = 1;
        }
        held.push(block);
    }
    held.len()
}

fn greeting(app: &App) -> String {
    format!("hello from {} version {}\n", app.instance, app.version)
}
