//! Layers around every route: the request log, authentication and authorization.
//!
//! - [`authenticate`] (outer, every request but the open routes): `Authorization: Bearer
//!   <secret>` → the token's [`Principal`], or 401 `unauthenticated`. It sets the
//!   [`Principal`] and the [`Actor`] (its name and token id) as request extensions; nothing
//!   a client sends names the actor.
//! - [`authorize`] (per route, after routing): the route's [`Access`] rule. A right the
//!   principal's role lacks is 403 `forbidden`, naming it; for an app owner, a VM, group or
//!   job outside its scope is 404, exactly as if it did not exist, so names do not leak.
//!
//! It also reads `Idempotency-Key` into the [`Actor`] (400 `invalid_request` if malformed).
//! Handlers read only the [`Principal`] and [`Actor`] extensions, never headers.

use crate::error_code::ErrorCode;
use std::time::Instant;

use axum::extract::{RawPathParams, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::extract::Actor;
use super::{AppState, Error};
use crate::auth::{self, Principal, Right};
use crate::control::ControlError;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token: liveness.
    Open,
    /// A token whose role has the right; for app owners the path's thing must be in scope.
    Needs(Right, Target),
}

/// The thing in a route's path that an app owner's scope must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Nothing in the path (lists filter by scope instead).
    None,
    /// `{vm}`.
    Vm,
    /// `{group}`.
    Group,
    /// `{job}`: its VM.
    Job,
    /// `{token}`: admins only, no scope.
    Token,
}

/// Authenticates every request on a route that is not open.
pub(super) async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    if state.open_paths.contains(request.uri().path()) {
        return next.run(request).await;
    }
    let principal = match principal_of(&state, &request) {
        Ok(principal) => principal,
        Err(err) => {
            tracing::info!(target: "cairn::api", path = request.uri().path(), error = %err, "unauthenticated request refused");
            return err.into_response();
        }
    };
    let name = principal.actor();
    let command_id = match idempotency_key(&request) {
        Ok(key) => key.map(|key| super::idempotency::command_id(&name, key)),
        Err(err) => {
            let err = Error::invalid_request(err.to_string());
            tracing::info!(target: "cairn::api", path = request.uri().path(), error = %err, "request refused");
            return err.into_response();
        }
    };
    request.extensions_mut().insert(Actor { name, command_id });
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// The request's `Idempotency-Key`, checked.
fn idempotency_key(request: &Request) -> Result<Option<&str>, super::idempotency::KeyError> {
    let mut values = request.headers().get_all(super::idempotency::HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(super::idempotency::KeyError::Repeated);
    }
    super::idempotency::check(value.as_bytes()).map(Some)
}

fn principal_of(state: &AppState, request: &Request) -> Result<Principal, Error> {
    let header = request.headers().get(AUTHORIZATION).ok_or_else(|| {
        Error::Unauthenticated(
            "no token: send Authorization: Bearer <token> (cairn token create makes one)".into(),
        )
    })?;
    let text = header
        .to_str()
        .map_err(|_| Error::Unauthenticated("the Authorization header is not text".into()))?;
    let (scheme, secret) = text.split_once(' ').ok_or_else(|| {
        Error::Unauthenticated("the Authorization header is not Bearer <token>".into())
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Error::Unauthenticated(format!(
            "Authorization scheme {scheme:?} is not Bearer"
        )));
    }
    let secret = secret.trim();
    if !auth::looks_like_secret(secret) {
        return Err(Error::Unauthenticated(format!(
            "the bearer token is not a cairn token ({}…)",
            auth::SECRET_PREFIX
        )));
    }
    state
        .control
        .authenticate(&auth::secret_hash(secret))
        .map_err(|refusal| Error::Unauthenticated(refusal.to_string()))
}

/// The state of one route's [`authorize`] layer.
#[derive(Clone)]
pub(super) struct RouteAccess {
    pub(super) state: AppState,
    pub(super) right: Right,
    pub(super) target: Target,
    pub(super) what: std::sync::Arc<str>,
}

/// Checks the route's rule against the request's principal.
pub(super) async fn authorize(
    State(access): State<RouteAccess>,
    params: RawPathParams,
    request: Request,
    next: Next,
) -> Response {
    let Some(principal) = request.extensions().get::<Principal>() else {
        return Error::Control(ControlError::Internal(
            "a protected route was reached without a principal".into(),
        ))
        .into_response();
    };
    if !principal.may(access.right) {
        tracing::info!(target: "cairn::api", token = %principal.token, role = %principal.role,
            right = access.right.as_str(), "forbidden");
        return Error::forbidden(access.right, &access.what).into_response();
    }
    if principal.scope.is_some()
        && let Some((_, value)) = params.iter().next()
        && let Err(err) = in_scope(&access, principal, value)
    {
        tracing::info!(target: "cairn::api", token = %principal.token, value, "out of scope");
        return err.into_response();
    }
    next.run(request).await
}

/// For an app owner: 404 unless the path's thing is in its scope. A malformed id is let
/// through, for the handler to refuse with 400 as it does for everyone.
fn in_scope(access: &RouteAccess, principal: &Principal, value: &str) -> Result<(), Error> {
    let not_found = |code: ErrorCode, what: &str| {
        Err(Error::Control(ControlError::NotFound {
            code,
            message: format!("no {what} {value}"),
        }))
    };
    match access.target {
        Target::None | Target::Token => Ok(()),
        Target::Vm => match value.parse() {
            Ok(vm) if !principal.sees_vm(&vm) => not_found(ErrorCode::UnknownVm, "VM"),
            _ => Ok(()),
        },
        Target::Group => match value.parse() {
            Ok(group) if !principal.sees_group(&group) => {
                not_found(ErrorCode::UnknownGroup, "group")
            }
            _ => Ok(()),
        },
        Target::Job => match access.state.control.job(value) {
            Ok(job) if !principal.sees_vm_text(&job.vm) => not_found(ErrorCode::UnknownJob, "job"),
            _ => Ok(()),
        },
    }
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
