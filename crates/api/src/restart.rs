//! `POST /v1/restart` and `GET /v1/up`: the running `phoenix up` re-executes itself (or a new
//! binary, from the owner's socket only) without stopping its instances or closing its
//! listeners. The program that serves the API carries the restart out.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::{AppState, Connection, Peer};

/// A restart asked through the API: the answer says whether the handover is ready (then the
/// process re-executes itself) or why not.
#[derive(Debug)]
pub struct RestartRequest {
    /// A new binary (`phoenix upgrade`), or `None` for this one again.
    pub binary: Option<PathBuf>,
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// Where restart requests go, and what `GET /v1/up` answers.
#[derive(Debug, Clone)]
pub struct Restarts {
    pub requests: mpsc::Sender<RestartRequest>,
    pub info: Arc<Mutex<UpInfo>>,
}

/// The running program: which one it is, and how the last restart went.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UpInfo {
    pub pid: u32,
    pub version: String,
    /// The binary it runs.
    pub binary: String,
    /// When this program started (the process may be older: restarts keep it).
    #[serde(with = "phoenix_image::wire_time")]
    pub started_at: i64,
    /// Programs this process ran before this one.
    pub restarts: u32,
    /// The handover this program started from, if any.
    pub last_restart: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RestartBody {
    #[serde(default)]
    binary: Option<PathBuf>,
}

pub(crate) async fn up_info(State(state): State<AppState>) -> Response {
    match &state.restarts {
        Some(restarts) => {
            let info = restarts
                .info
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            Json(info).into_response()
        }
        None => crate::failure(StatusCode::NOT_FOUND, "this API does not restart"),
    }
}

pub(crate) async fn restart(
    State(state): State<AppState>,
    Extension(connection): Extension<Connection>,
    body: Bytes,
) -> Response {
    let Some(restarts) = state.restarts.clone() else {
        return crate::failure(StatusCode::NOT_FOUND, "this API does not restart");
    };
    let local = matches!(connection.peer, Peer::Local { .. });
    let body: RestartBody = match crate::optional_request(&body, "restart") {
        Ok(body) => body,
        Err(response) => return *response,
    };
    // Running another program as Phoenix's user is for the owner at the machine.
    if body.binary.is_some() && !local {
        return crate::failure(
            StatusCode::FORBIDDEN,
            "an upgrade to another binary is only taken on the owner's socket",
        );
    }
    let (reply, answer) = oneshot::channel();
    let asked = RestartRequest {
        binary: body.binary,
        reply,
    };
    if restarts.requests.send(asked).await.is_err() {
        return crate::failure(StatusCode::SERVICE_UNAVAILABLE, "phoenix up is stopping");
    }
    match answer.await {
        Ok(Ok(())) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"restarting": true})),
        )
            .into_response(),
        Ok(Err(message)) => crate::failure(StatusCode::CONFLICT, &message),
        Err(_) => crate::failure(StatusCode::SERVICE_UNAVAILABLE, "phoenix up is stopping"),
    }
}
