//! Layers around every route: the request log and identification.
//!
//! Identification is the slot where authentication goes (DESIGN §7: tokens or mTLS, roles
//! `admin`/`operator`/`viewer`/`app-owner`): today it only takes the actor from the
//! `X-Cairn-Actor` header (or [`super::ApiConfig::default_actor`]); later it will check a
//! token, refuse with 401/403, and attach the principal alongside the [`Actor`] so that
//! handlers can check roles. Handlers read only the [`Actor`] extension, never headers.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::extract::{Actor, parse_actor};

/// Sets the request's [`Actor`], or refuses a malformed `X-Cairn-Actor` with 400.
pub(super) async fn identify(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let actor = match request.headers().get(super::ACTOR_HEADER) {
        None => Actor(state.config.default_actor.clone()),
        Some(value) => match parse_actor(value) {
            Ok(actor) => actor,
            Err(err) => return err.into_response(),
        },
    };
    request.extensions_mut().insert(actor);
    next.run(request).await
}

/// Logs every request with its method, path, status and duration.
pub(super) async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    // A duration for the log, not a time of day: the injected clock is for the latter.
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    if response.status().is_server_error() {
        tracing::warn!(target: "cairn::api", %method, path, status, ms, "request");
    } else {
        tracing::info!(target: "cairn::api", %method, path, status, ms, "request");
    }
    response
}
