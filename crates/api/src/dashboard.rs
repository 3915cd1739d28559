//! The web dashboard `phoenix up` serves on a loopback TCP address: roles with their live
//! generation, image and instances; the deploy timeline from the journal; per-role graphs from
//! `metrics.db` (SVG drawn here); a live log tail per role. It updates itself by server-sent
//! events. Everything it needs is in the binary (no CDN, works offline).
//!
//! Getting in works as Jupyter's does: the owner asks the API (its 0600 socket) for a login
//! URL (`phoenix dashboard`); the one-time token in it, good for two minutes, becomes an
//! HttpOnly, SameSite=Strict session cookie, so no credential sits in the page or its links.
//! An API bearer token is taken too. Host and Origin must name the listener (no DNS
//! rebinding), and a content security policy keeps the page to its own scripts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use phoenix_fleet::Controller;
use phoenix_observe::logs::{LogLine, Position, Query as LogQuery};
use phoenix_observe::{MetricsDb, Resolution};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::access::Token;
use crate::listen::Connection;

mod svg;

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

/// How long a login URL works.
const LOGIN_TTL: Duration = Duration::from_secs(120);
/// How long a session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Logins and sessions held at once: older ones go first past it.
const MAX_HELD: usize = 1024;
const COOKIE: &str = "phoenix_session";

/// Login tokens not yet used and open sessions, each kept as the SHA-256 of its secret.
#[derive(Default)]
pub struct Sessions {
    logins: Mutex<HashMap<[u8; 32], Instant>>,
    sessions: Mutex<HashMap<[u8; 32], Instant>>,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// 32 random bytes, hex.
fn secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the kernel's random source");
    phoenix_image::hex(&bytes)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Adds `key` valid until `until`, dropping expired entries and, past [`MAX_HELD`], the ones
/// nearest their end.
fn hold(map: &mut HashMap<[u8; 32], Instant>, key: [u8; 32], until: Instant) {
    let now = Instant::now();
    map.retain(|_, end| *end > now);
    while map.len() >= MAX_HELD {
        let Some(oldest) = map.iter().min_by_key(|(_, end)| **end).map(|(k, _)| *k) else {
            break;
        };
        map.remove(&oldest);
    }
    map.insert(key, until);
}

impl Sessions {
    pub fn new() -> Arc<Sessions> {
        Arc::default()
    }

    /// A new one-time login token.
    pub fn mint_login(&self) -> String {
        let token = secret();
        hold(
            &mut lock(&self.logins),
            digest(&token),
            Instant::now() + LOGIN_TTL,
        );
        token
    }

    /// Uses up login token `token`: a new session's secret, if the token was good.
    fn redeem(&self, token: &str) -> Option<String> {
        let until = lock(&self.logins).remove(&digest(token))?;
        if until <= Instant::now() {
            return None;
        }
        let session = secret();
        hold(
            &mut lock(&self.sessions),
            digest(&session),
            Instant::now() + SESSION_TTL,
        );
        Some(session)
    }

    fn is_open(&self, session: &str) -> bool {
        lock(&self.sessions)
            .get(&digest(session))
            .is_some_and(|until| *until > Instant::now())
    }
}

#[derive(Clone)]
struct Dash {
    controller: Controller,
    sessions: Arc<Sessions>,
    tokens: Arc<[Token]>,
}

/// The dashboard's routes, behind its guard.
pub fn router(controller: Controller, sessions: Arc<Sessions>, tokens: Vec<Token>) -> Router {
    let state = Dash {
        controller,
        sessions,
        tokens: tokens.into(),
    };
    Router::new()
        .route("/", get(index))
        .route("/login", get(login))
        .route(
            "/app.js",
            get(|| async { asset(SCRIPT, "text/javascript") }),
        )
        .route("/app.css", get(|| async { asset(STYLE, "text/css") }))
        .route("/api/state", get(state_json))
        .route("/api/events", get(events))
        .route("/api/graph/{role}/{graph}", get(graph))
        .route("/api/logs/{role}", get(logs))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(middleware::from_fn(headers))
        .with_state(state)
}

/// Headers every answer carries: the page runs only its own script and style, is never
/// framed, cached or sent as a referrer.
async fn headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let policy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                  connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, policy),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Host and Origin name the listener; then a session cookie or an API token, except for the
/// login itself.
async fn guard(State(dash): State<Dash>, request: Request, next: Next) -> Response {
    if let Some(connection) = request.extensions().get::<Connection>()
        && let Some(refusal) = crate::host_refusal(connection, &request)
    {
        return refusal;
    }
    if request.uri().path() == "/login" || signed_in(&dash, &request) {
        return next.run(request).await;
    }
    let page = "<!doctype html><html lang=\"en\"><title>Phoenix: sign in</title>\
                <p>Not signed in. Run <code>phoenix dashboard</code> on the machine running \
                <code>phoenix up</code> and open the URL it prints.</p></html>\n";
    let mut response = (StatusCode::UNAUTHORIZED, page).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

fn signed_in(dash: &Dash, request: &Request) -> bool {
    let cookie = request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value);
    if cookie.is_some_and(|session| dash.sessions.is_open(session)) {
        return true;
    }
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .and_then(|(_, token)| crate::access::find_token(&dash.tokens, token.trim().as_bytes()))
        .is_some()
}

#[derive(Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

/// Trades a one-time token for a session cookie, and sends the browser to the page (so the
/// token leaves the address bar and the history's current entry).
async fn login(State(dash): State<Dash>, Query(query): Query<LoginQuery>) -> Response {
    let Some(session) = query.token.as_deref().and_then(|t| dash.sessions.redeem(t)) else {
        return (
            StatusCode::UNAUTHORIZED,
            "This login link was used already or has expired: run `phoenix dashboard` again.\n",
        )
            .into_response();
    };
    let cookie = format!(
        "{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    let mut response = (StatusCode::SEE_OTHER, "").into_response();
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static("/"));
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        headers.insert(header::SET_COOKIE, value);
    }
    response
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

/// Roles, their generations and instances, and the journal's last entries.
async fn snapshot(controller: &Controller) -> serde_json::Value {
    let status = controller.status().await;
    let store = controller.store().clone();
    let history = tokio::task::spawn_blocking(move || store.history(None, 40))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    json!({ "status": status, "history": history })
}

async fn state_json(State(dash): State<Dash>) -> Json<serde_json::Value> {
    Json(snapshot(&dash.controller).await)
}

/// A body of server-sent events fed by `rx`.
fn event_stream(rx: mpsc::Receiver<Bytes>) -> Response {
    let mut response = Response::new(axum::body::Body::new(crate::stream::ChannelBody::bounded(
        rx,
    )));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
}

fn event(name: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// The fleet's state each time it changes (looked at twice a second), and a comment every
/// 15 s that keeps proxies from closing an idle stream.
async fn events(State(dash): State<Dash>) -> Response {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut last = String::new();
        let mut quiet = Duration::ZERO;
        loop {
            let now = snapshot(&dash.controller).await.to_string();
            let sent = if now != last {
                quiet = Duration::ZERO;
                let frame = event("state", &now);
                last = now;
                tx.send(frame).await
            } else if quiet >= Duration::from_secs(15) {
                quiet = Duration::ZERO;
                tx.send(Bytes::from_static(b": idle\n\n")).await
            } else {
                Ok(())
            };
            if sent.is_err() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => quiet += Duration::from_millis(500),
                _ = tx.closed() => return,
            }
        }
    });
    event_stream(rx)
}

#[derive(Deserialize)]
struct GraphQuery {
    range: Option<String>,
}

/// A role's graph over the last hour, day or week, as SVG.
async fn graph(
    State(dash): State<Dash>,
    Path((role, graph)): Path<(String, String)>,
    Query(query): Query<GraphQuery>,
) -> Response {
    let Some(kind) = svg::Graph::named(&graph) else {
        let known = svg::Graph::ALL.map(|g| g.name()).join(", ");
        return (
            StatusCode::NOT_FOUND,
            format!("no graph {graph:?}: graphs are {known}\n"),
        )
            .into_response();
    };
    let range = match query.range.as_deref().unwrap_or("1h") {
        "1h" => Duration::from_secs(3600),
        "1d" => Duration::from_secs(86_400),
        "1w" => Duration::from_secs(7 * 86_400),
        other => {
            return (
                StatusCode::BAD_REQUEST,
                format!("range {other:?}: use 1h, 1d or 1w\n"),
            )
                .into_response();
        }
    };
    let path = dash.controller.state_dir().join("metrics.db");
    let now = dash.controller.now_ms();
    let drawn = tokio::task::spawn_blocking(move || -> Result<String, String> {
        let db = MetricsDb::open(&path).map_err(|e| e.to_string())?;
        let since = now - range.as_millis() as i64;
        let resolution = Resolution::for_window(now, since);
        let mut series = Vec::new();
        for (metric, label) in kind.series() {
            let mut points = db
                .query(&role, metric, since, resolution)
                .map_err(|e| e.to_string())?;
            // Roll-ups lag behind: the newest stretch comes from the per-second samples.
            if resolution != Resolution::Raw {
                let rolled_to = points.last().map_or(since, |p| p.t + 1);
                let recent = db
                    .query(
                        &role,
                        metric,
                        rolled_to.max(now - 3_600_000),
                        Resolution::Raw,
                    )
                    .map_err(|e| e.to_string())?;
                points.extend(recent);
            }
            let values: Vec<(i64, f64)> = points
                .iter()
                .filter_map(|p| Some((p.t, kind.value(p)?)))
                .collect();
            series.push((*label, values));
        }
        Ok(svg::draw(kind, &role, &series, since, now))
    })
    .await;
    match drawn {
        Ok(Ok(svg)) => {
            let mut response = svg.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("image/svg+xml"),
            );
            response
        }
        Ok(Err(error)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
    }
}

fn log_json(line: &LogLine) -> String {
    json!({
        "at": phoenix_image::rfc3339_ms(line.at),
        "instance": line.instance,
        "generation": line.generation,
        "stream": line.stream,
        "text": line.text,
    })
    .to_string()
}

/// A role's last 100 lines, then each new line as it is written.
async fn logs(State(dash): State<Dash>, Path(role): Path<String>) -> Response {
    let store = phoenix_fleet::log_store_dir(dash.controller.state_dir());
    let plain = !role.is_empty()
        && role
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !plain {
        return (StatusCode::BAD_REQUEST, "not a role name\n").into_response();
    }
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let query = LogQuery {
            role,
            ..LogQuery::default()
        };
        let (store_dir, first) = (store.clone(), query.clone());
        let Ok(Ok((lines, mut position))) =
            tokio::task::spawn_blocking(move || phoenix_observe::logs::read(&store_dir, &first))
                .await
        else {
            return;
        };
        let skip = lines.len().saturating_sub(100);
        for line in &lines[skip..] {
            if tx.send(event("line", &log_json(line))).await.is_err() {
                return;
            }
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                _ = tx.closed() => return,
            }
            let (store_dir, next) = (store.clone(), query.clone());
            let from: Position = position;
            let Ok(Ok((lines, after))) = tokio::task::spawn_blocking(move || {
                phoenix_observe::logs::read_from(&store_dir, &next, from, 500)
            })
            .await
            else {
                return;
            };
            position = after;
            for line in &lines {
                if tx.send(event("line", &log_json(line))).await.is_err() {
                    return;
                }
            }
        }
    });
    event_stream(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_token_works_once_and_gives_a_session() {
        let sessions = Sessions::new();
        let token = sessions.mint_login();
        assert_eq!(token.len(), 64);
        let session = sessions.redeem(&token).unwrap();
        assert!(sessions.is_open(&session));
        assert!(sessions.redeem(&token).is_none(), "used twice");
        assert!(sessions.redeem("0000").is_none());
        assert!(!sessions.is_open(&token), "a login token is not a session");
        assert!(!sessions.is_open("nope"));
    }

    #[test]
    fn held_logins_are_bounded() {
        let sessions = Sessions::new();
        let first = sessions.mint_login();
        for _ in 0..MAX_HELD {
            sessions.mint_login();
        }
        assert_eq!(lock(&sessions.logins).len(), MAX_HELD);
        assert!(sessions.redeem(&first).is_none(), "the oldest went");
    }
}
