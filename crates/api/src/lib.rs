//! The HTTP API that the CLI talks to, and the web dashboard (`dashboard`).
//!
//! By default it is served only on a Unix socket in the state directory, mode 0600, to its
//! owner (peer credentials are checked too). TCP is opt-in and always authenticated: a bearer
//! token (read-only or operator) or a client certificate (mutual TLS); Host and Origin must
//! name the listener, so neither a web page nor DNS rebinding can drive it. Every
//! state-changing call is journaled with who made it. Deploys stream progress as
//! newline-delimited JSON and run in their own task, so a client that goes away never leaves a
//! deploy half done.

pub mod access;
pub mod dashboard;
mod listen;
mod restart;
mod stream;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use phoenix_fleet::{Controller, DeployOptions, Progress, RollbackTo};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

pub use access::{Caller, HostPolicy, Peer, Scope, Token, TokenError};
use listen::Connection;
pub use listen::{bind_owner_socket, serve_tcp, serve_unix};
pub use restart::{RestartRequest, Restarts, UpInfo};

/// An API that may not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "refusing to serve the API on TCP {0} without authentication: give tokens (--api-tokens FILE or PHOENIX_API_TOKEN) or mutual TLS (--api-tls-cert, --api-tls-key, --api-client-ca)"
    )]
    NeedsAuth(SocketAddr),
}

#[derive(Clone)]
struct AppState {
    controller: Controller,
    tokens: Arc<[Token]>,
    /// The uid that owns the state (this process's): the Unix socket admits it and root.
    owner: u32,
    /// Where `phoenix restart` and `phoenix upgrade` go (only `phoenix up` restarts).
    restarts: Option<Restarts>,
    /// The dashboard whose login URLs `POST /v1/dashboard/login` makes, when one is served.
    dashboard: Option<DashboardLink>,
}

/// What the API needs to hand out dashboard logins: the sessions and where the page is.
#[derive(Clone)]
pub struct DashboardLink {
    pub sessions: Arc<dashboard::Sessions>,
    pub addr: SocketAddr,
}

/// One line of a deploy stream.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamLine {
    Progress(String),
    Done(serde_json::Value),
    Error(String),
}

/// Checks that a TCP listener on `addr` has a way to authenticate its clients.
pub fn check_tcp(addr: SocketAddr, tokens: &[Token], mutual_tls: bool) -> Result<(), ApiError> {
    if tokens.is_empty() && !mutual_tls {
        return Err(ApiError::NeedsAuth(addr));
    }
    Ok(())
}

/// The API's routes, behind the authorization layer.
pub fn router(
    controller: Controller,
    tokens: Vec<Token>,
    restarts: Option<Restarts>,
    dashboard: Option<DashboardLink>,
) -> Router {
    let state = AppState {
        controller,
        tokens: tokens.into(),
        // SAFETY: geteuid has no preconditions.
        owner: unsafe { libc::geteuid() },
        restarts,
        dashboard,
    };
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/images", get(images))
        .route("/v1/history", get(history))
        .route("/v1/cluster/history", get(cluster_history))
        .route("/v1/plan", post(plan))
        .route("/v1/apply", post(apply))
        .route("/v1/up", get(restart::up_info))
        .route("/v1/restart", post(restart::restart))
        .route("/v1/dashboard/login", post(dashboard_login))
        .route("/v1/roles/{role}/deploy", post(deploy))
        .route("/v1/roles/{role}/rollback", post(rollback))
        .route("/v1/roles/{role}/scale", post(scale))
        .route("/v1/roles/{role}/heal-drift", post(heal_drift))
        .route("/v1/instances/{name}/protect", post(protect))
        .route("/v1/instances/{name}/standby", post(standby))
        .route("/v1/hosts/{name}/drain", post(drain_host))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// Admits a request or answers why not: the connection's Host and Origin (TCP), then who the
/// caller is and whether their scope allows the method; state-changing calls are journaled.
async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(connection) = request.extensions().get::<Connection>().cloned() else {
        return refuse(StatusCode::FORBIDDEN, "no connection information");
    };
    if let Some(refusal) = host_refusal(&connection, &request) {
        return refusal;
    }
    let (caller, scope) = match caller(&state, &connection.peer, &request) {
        Ok(found) => found,
        Err((status, message)) => return refuse(status, &message),
    };
    let reads = matches!(*request.method(), Method::GET | Method::HEAD);
    if !reads {
        if scope == Scope::Read {
            return refuse(
                StatusCode::FORBIDDEN,
                &format!(
                    "{caller} is read-only: it cannot {} {}",
                    request.method(),
                    request.uri().path()
                ),
            );
        }
        let path = request.uri().path();
        let role = path
            .strip_prefix("/v1/roles/")
            .and_then(|rest| rest.split('/').next());
        let call = format!("{} {path}", request.method());
        state
            .controller
            .journal_api_call(role, &caller.to_string(), &call)
            .await;
    }
    next.run(request).await
}

/// On TCP, the request's Host names the listener and its Origin (when sent) is the listener
/// itself: no other site, and no DNS rebinding, reaches the API or the dashboard.
pub(crate) fn host_refusal(connection: &Connection, request: &Request) -> Option<Response> {
    let hosts = connection.hosts.as_ref()?;
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    match host {
        Some(host) if hosts.allows(host) => {}
        Some(host) => {
            return Some(refuse(
                StatusCode::MISDIRECTED_REQUEST,
                &format!("Host {host:?} is not this API's address"),
            ));
        }
        None => return Some(refuse(StatusCode::BAD_REQUEST, "the request has no Host")),
    }
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("?");
        if !hosts.allows_origin(origin) {
            return Some(refuse(
                StatusCode::FORBIDDEN,
                &format!("requests from origin {origin:?} are refused"),
            ));
        }
    }
    None
}

/// Who made `request`, and what they may do; or why they are turned away.
fn caller(
    state: &AppState,
    peer: &Peer,
    request: &Request,
) -> Result<(Caller, Scope), (StatusCode, String)> {
    match peer {
        Peer::Local { uid } if *uid == state.owner || *uid == 0 => {
            Ok((Caller::Uid(*uid), Scope::Operate))
        }
        Peer::Local { uid } => Err((
            StatusCode::FORBIDDEN,
            format!(
                "uid {uid} may not use this API: it belongs to uid {}",
                state.owner
            ),
        )),
        Peer::Certificate { fingerprint } => {
            Ok((Caller::Certificate(fingerprint.clone()), Scope::Operate))
        }
        Peer::Remote => {
            let given = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                // The scheme is case-insensitive (RFC 9110, 11.1).
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim())
                .filter(|t| !t.is_empty());
            match given.and_then(|g| access::find_token(&state.tokens, g.as_bytes())) {
                Some(token) => Ok((Caller::Token(token.name.clone()), token.scope)),
                None => Err((
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong API token".into(),
                )),
            }
        }
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, format!("{message}\n")).into_response()
}

/// A one-time login URL for the dashboard (an operator's call: it opens a session).
async fn dashboard_login(State(state): State<AppState>) -> Response {
    let Some(link) = &state.dashboard else {
        return failure(
            StatusCode::NOT_FOUND,
            "this phoenix up serves no dashboard (it was started with --no-dashboard)",
        );
    };
    let token = link.sessions.mint_login();
    Json(json!({
        "url": format!("http://{}/login?token={token}", link.addr),
        "expires_in_seconds": 120,
    }))
    .into_response()
}

async fn status(State(state): State<AppState>) -> Json<phoenix_fleet::FleetStatus> {
    Json(state.controller.status().await)
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut response = state.controller.metrics_text().await.into_response();
    let content_type = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}

async fn images(State(state): State<AppState>) -> Response {
    let store = state.controller.store().clone();
    match tokio::task::spawn_blocking(move || store.images()).await {
        Ok(Ok(images)) => Json(images).into_response(),
        Ok(Err(error)) => failure(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
        Err(error) => failure(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    }
}

#[derive(Deserialize)]
struct HistoryQuery {
    role: Option<String>,
    limit: Option<u32>,
}

async fn history(State(state): State<AppState>, Query(query): Query<HistoryQuery>) -> Response {
    let store = state.controller.store().clone();
    let limit = query.limit.unwrap_or(200);
    match tokio::task::spawn_blocking(move || store.history(query.role.as_deref(), limit)).await {
        Ok(Ok(rows)) => Json(rows).into_response(),
        Ok(Err(error)) => failure(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
        Err(error) => failure(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    }
}

/// The cluster's journal (in etcd): `?limit=N`, 200 by default.
async fn cluster_history(
    State(state): State<AppState>,
    Query(query): Query<HistoryQuery>,
) -> Response {
    let limit = query.limit.unwrap_or(200) as usize;
    match state.controller.cluster_history(limit).await {
        Ok(events) => Json(events).into_response(),
        Err(error) => failure(error_status(&error), &error.to_string()),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployRequest {
    image: Option<String>,
}

async fn deploy(State(state): State<AppState>, Path(role): Path<String>, body: Bytes) -> Response {
    let request: DeployRequest = match optional_request(&body, "deploy") {
        Ok(request) => request,
        Err(response) => return *response,
    };
    run_deploy(
        state,
        role,
        DeployOptions {
            image: request.image,
            rollback: None,
        },
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    /// A generation number or an image reference; the previous other image when left out.
    to: Option<String>,
}

async fn rollback(
    State(state): State<AppState>,
    Path(role): Path<String>,
    body: Bytes,
) -> Response {
    let request: RollbackRequest = match optional_request(&body, "rollback") {
        Ok(request) => request,
        Err(response) => return *response,
    };
    run_deploy(
        state,
        role,
        DeployOptions {
            image: None,
            rollback: Some(RollbackTo::parse(request.to.as_deref())),
        },
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleRequest {
    instances: u32,
}

async fn scale(State(state): State<AppState>, Path(role): Path<String>, body: Bytes) -> Response {
    let request: ScaleRequest = match parse_request(&body, "scale") {
        Ok(request) => request,
        Err(response) => return *response,
    };
    match state
        .controller
        .scale(&role, request.instances, &Progress::none())
        .await
    {
        Ok(report) => Json(report).into_response(),
        Err(error) => failure(error_status(&error), &error.to_string()),
    }
}

/// Checks the role's live root for drift and, when drifted, replaces its instances; answers
/// `{"report": DeployReport}`, or `{"report": null}` when nothing drifted.
async fn heal_drift(State(state): State<AppState>, Path(role): Path<String>) -> Response {
    match state.controller.heal_drift(&role).await {
        Ok(report) => Json(serde_json::json!({ "report": report })).into_response(),
        Err(error) => failure(error_status(&error), &error.to_string()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlagRequest {
    on: bool,
}

async fn protect(state: State<AppState>, name: Path<String>, body: Bytes) -> Response {
    set_flag(state, name, body, phoenix_fleet::FlagChange::Protect).await
}

async fn standby(state: State<AppState>, name: Path<String>, body: Bytes) -> Response {
    set_flag(state, name, body, phoenix_fleet::FlagChange::Standby).await
}

async fn set_flag(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
    change: fn(bool) -> phoenix_fleet::FlagChange,
) -> Response {
    let request: FlagRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => return failure(StatusCode::BAD_REQUEST, &format!("bad request: {error}")),
    };
    match state.controller.set_flag(&name, change(request.on)).await {
        Ok(flags) => Json(flags).into_response(),
        Err(error) => failure(error_status(&error), &error.to_string()),
    }
}

/// `phoenix host drain|undrain`: `{"on": bool}`.
async fn drain_host(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let request: FlagRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => return failure(StatusCode::BAD_REQUEST, &format!("bad request: {error}")),
    };
    match state.controller.set_host_draining(&name, request.on).await {
        Ok(()) => Json(serde_json::json!({"host": name, "draining": request.on})).into_response(),
        Err(error) => failure(error_status(&error), &error.to_string()),
    }
}

/// 404 for an unknown role or instance, 409 for a busy role, 422 otherwise.
fn error_status(error: &phoenix_fleet::FleetError) -> StatusCode {
    use phoenix_fleet::FleetError;
    match error {
        FleetError::UnknownRole { .. }
        | FleetError::UnknownInstance(_)
        | FleetError::Cluster(phoenix_fleet::cluster::ClusterError::UnknownHost { .. }) => {
            StatusCode::NOT_FOUND
        }
        FleetError::Cluster(phoenix_fleet::cluster::ClusterError::Etcd(_)) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        FleetError::Busy { .. } => StatusCode::CONFLICT,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

fn run_deploy(state: AppState, role: String, options: DeployOptions) -> Response {
    let roles = state.controller.listen_addrs();
    if !roles.contains_key(&role) {
        let known: Vec<&str> = roles.keys().map(String::as_str).collect();
        return failure(
            StatusCode::NOT_FOUND,
            &format!("no role {role:?} (roles: {})", known.join(", ")),
        );
    }
    let controller = state.controller.clone();
    stream_progress(
        move |progress| async move { controller.deploy(&role, options, &progress).await },
    )
}

/// Runs `work` with a progress channel, streaming its lines and then its report (or error) as
/// newline-delimited JSON.
fn stream_progress<T, F, Fut>(work: F) -> Response
where
    T: serde::Serialize + Send + 'static,
    F: FnOnce(Progress) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, phoenix_fleet::FleetError>> + Send + 'static,
{
    let (progress, mut lines) = Progress::channel();
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let work = tokio::spawn(work(progress));
    tokio::spawn(async move {
        while let Some(line) = lines.recv().await {
            let _ = tx.send(encode(&StreamLine::Progress(line)));
        }
        let last = match work.await {
            Ok(Ok(report)) => StreamLine::Done(serde_json::to_value(report).unwrap_or_default()),
            Ok(Err(error)) => StreamLine::Error(error.to_string()),
            Err(error) => StreamLine::Error(format!("task failed: {error}")),
        };
        let _ = tx.send(encode(&last));
    });
    let mut response = Response::new(Body::new(stream::ChannelBody::new(rx)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanRequest {
    /// The fleet file's text.
    fleet: String,
    /// The base of a saved plan: apply only if the fleet is still what it was made against.
    #[serde(default)]
    base: Option<String>,
}

/// A request's JSON body, or the 400 naming what was wrong with it.
fn parse_request<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|error| {
        Box::new(failure(
            StatusCode::BAD_REQUEST,
            &format!("bad {what} request: {error}"),
        ))
    })
}

/// The same, where an empty body means every field's default.
fn optional_request<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
    what: &str,
) -> Result<T, Box<Response>> {
    if body.is_empty() {
        Ok(T::default())
    } else {
        parse_request(body, what)
    }
}

async fn plan(State(state): State<AppState>, body: Bytes) -> Response {
    let request: PlanRequest = match parse_request(&body, "plan") {
        Ok(request) => request,
        Err(response) => return *response,
    };
    match state.controller.plan(&request.fleet).await {
        Ok(plan) => Json(plan).into_response(),
        Err(error) => failure(error_status(&error), &error.to_string()),
    }
}

async fn apply(State(state): State<AppState>, body: Bytes) -> Response {
    let request: PlanRequest = match parse_request(&body, "plan") {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let controller = state.controller.clone();
    stream_progress(move |progress| async move {
        controller
            .apply(&request.fleet, request.base.as_deref(), &progress)
            .await
    })
}

fn encode(line: &StreamLine) -> Bytes {
    let mut bytes = serde_json::to_vec(line).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn failure(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}
