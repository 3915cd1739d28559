//! The local HTTP API that the CLI (and later the dashboard) talks to.
//!
//! It binds loopback unless a token is set; with a token every request must carry
//! `Authorization: Bearer TOKEN`. Deploys stream progress as newline-delimited JSON and run in
//! their own task, so a client that goes away never leaves a deploy half done.

mod stream;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use phoenix_fleet::{Controller, DeployOptions, Progress};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// An API that may not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "refusing to serve the API on {0} without a token: it is not a loopback address (pass --token)"
    )]
    NeedsToken(SocketAddr),
}

#[derive(Clone)]
struct AppState {
    controller: Controller,
    token: Option<Arc<str>>,
}

/// One line of a deploy stream.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamLine {
    Progress(String),
    Done(serde_json::Value),
    Error(String),
}

/// Checks that a listener on `addr` is allowed with or without a token.
pub fn check_listen(addr: SocketAddr, token: Option<&str>) -> Result<(), ApiError> {
    if addr.ip().is_loopback() || token.is_some_and(|t| !t.is_empty()) {
        Ok(())
    } else {
        Err(ApiError::NeedsToken(addr))
    }
}

/// The API's routes.
pub fn router(controller: Controller, token: Option<String>) -> Router {
    let state = AppState {
        controller,
        token: token.filter(|t| !t.is_empty()).map(Arc::from),
    };
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/images", get(images))
        .route("/v1/history", get(history))
        .route("/v1/roles/{role}/deploy", post(deploy))
        .route("/v1/roles/{role}/rollback", post(rollback))
        .route("/v1/roles/{role}/scale", post(scale))
        .route("/v1/roles/{role}/heal-drift", post(heal_drift))
        .route("/v1/instances/{name}/protect", post(protect))
        .route("/v1/instances/{name}/standby", post(standby))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// Serves the API until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    controller: Controller,
    token: Option<String>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router(controller, token))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return (StatusCode::UNAUTHORIZED, "missing or wrong API token\n").into_response();
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn status(State(state): State<AppState>) -> Json<phoenix_fleet::FleetStatus> {
    Json(state.controller.status())
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut response = state.controller.metrics_text().into_response();
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployRequest {
    image: Option<String>,
}

async fn deploy(State(state): State<AppState>, Path(role): Path<String>, body: Bytes) -> Response {
    let request: DeployRequest = if body.is_empty() {
        DeployRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(error) => {
                return failure(
                    StatusCode::BAD_REQUEST,
                    &format!("bad deploy request: {error}"),
                );
            }
        }
    };
    run_deploy(
        state,
        role,
        DeployOptions {
            image: request.image,
            rollback: false,
        },
    )
}

async fn rollback(State(state): State<AppState>, Path(role): Path<String>) -> Response {
    run_deploy(
        state,
        role,
        DeployOptions {
            image: None,
            rollback: true,
        },
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleRequest {
    instances: u32,
}

async fn scale(State(state): State<AppState>, Path(role): Path<String>, body: Bytes) -> Response {
    let request: ScaleRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            return failure(
                StatusCode::BAD_REQUEST,
                &format!("bad scale request: {error}"),
            );
        }
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

/// 404 for an unknown role or instance, 409 for a busy role, 422 otherwise.
fn error_status(error: &phoenix_fleet::FleetError) -> StatusCode {
    use phoenix_fleet::FleetError;
    match error {
        FleetError::UnknownRole { .. } | FleetError::UnknownInstance(_) => StatusCode::NOT_FOUND,
        FleetError::Busy { .. } => StatusCode::CONFLICT,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

fn run_deploy(state: AppState, role: String, options: DeployOptions) -> Response {
    if !state.controller.listen_addrs().contains_key(&role) {
        return failure(StatusCode::NOT_FOUND, &format!("no role {role:?}"));
    }
    let (progress, mut lines) = Progress::channel();
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let controller = state.controller.clone();
    let work = tokio::spawn(async move { controller.deploy(&role, options, &progress).await });
    tokio::spawn(async move {
        while let Some(line) = lines.recv().await {
            let _ = tx.send(encode(&StreamLine::Progress(line)));
        }
        let last = match work.await {
            Ok(Ok(report)) => StreamLine::Done(serde_json::to_value(report).unwrap_or_default()),
            Ok(Err(error)) => StreamLine::Error(error.to_string()),
            Err(error) => StreamLine::Error(format!("deploy task failed: {error}")),
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

fn encode(line: &StreamLine) -> Bytes {
    let mut bytes = serde_json::to_vec(line).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn failure(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}
