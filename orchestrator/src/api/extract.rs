//! Extractors that refuse bad input with the API's JSON errors instead of axum's plain-text
//! rejections: JSON bodies (content type, size, syntax, unknown fields, with the path of the
//! offending field), ids in the path, query strings, the actor and the principal.

use std::str::FromStr;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::{AppState, Error};

/// Who issued a request: recorded as the actor of the events its command appends, and the
/// command id its `Idempotency-Key` names, if it sent one. Set by the authentication layer
/// ([`super::middleware::authenticate`]) from the token and the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The principal's actor text (`user:alice (token …)`).
    pub name: String,
    /// The command id of the request's idempotency key ([`super::idempotency`]).
    pub command_id: Option<cairn_schemas::CommandId>,
}

/// A JSON request body that must be present.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// A JSON request body that may be absent (empty): then `T::default()`.
#[derive(Debug)]
pub struct OptionalJsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = Error;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Error> {
        let (headers, bytes) = read_body(request, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(Error::invalid_request(
                "a JSON request body is required (Content-Type: application/json)",
            ));
        }
        check_json_content_type(&headers)?;
        parse_json(&bytes).map(JsonBody)
    }
}

impl<T: DeserializeOwned + Default> FromRequest<AppState> for OptionalJsonBody<T> {
    type Rejection = Error;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Error> {
        let (headers, bytes) = read_body(request, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        check_json_content_type(&headers)?;
        parse_json(&bytes).map(OptionalJsonBody)
    }
}

async fn read_body(request: Request, state: &AppState) -> Result<(HeaderMap, Bytes), Error> {
    let headers = request.headers().clone();
    let bytes = Bytes::from_request(request, state)
        .await
        .map_err(|rejection| body_error(&rejection, state.config.body_limit_bytes))?;
    Ok((headers, bytes))
}

fn body_error(rejection: &BytesRejection, limit: usize) -> Error {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Error::PayloadTooLarge { limit }
    } else {
        Error::invalid_request(format!(
            "could not read the request body: {}",
            rejection.body_text()
        ))
    }
}

/// Accepts `application/json` (with parameters such as `charset`) and `application/*+json`.
pub(super) fn check_json_content_type(headers: &HeaderMap) -> Result<(), Error> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let is_json =
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"));
    if is_json {
        Ok(())
    } else if content_type.is_empty() {
        Err(Error::invalid_request(
            "the request body needs Content-Type: application/json",
        ))
    } else {
        Err(Error::invalid_request(format!(
            "Content-Type {content_type:?} is not application/json"
        )))
    }
}

/// Parses a JSON body; the error names the field at fault (`vms[2]`, `retention_days`).
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            Error::invalid_request(format!("the request body is not valid JSON: {inner}"))
        } else if path == "." {
            Error::invalid_request(format!("invalid request body: {inner}"))
        } else {
            Error::invalid_request(format!("invalid request body at {path}: {inner}"))
        }
    })?;
    deserializer.end().map_err(|err| {
        Error::invalid_request(format!("the request body is not valid JSON: {err}"))
    })?;
    Ok(value)
}

/// An id in the path (`/v1/vms/{vm}`), parsed; a bad one is 400 `invalid_id` naming the
/// parameter. Routes using it have exactly one path parameter.
#[derive(Debug)]
pub struct IdPath<T>(pub T);

impl<T, S> FromRequestParts<S> for IdPath<T>
where
    T: FromStr,
    T::Err: std::fmt::Display,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        let Path(params) = Path::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| {
                Error::invalid_request(format!("bad path: {}", rejection.body_text()))
            })?;
        let Some((name, value)) = params.into_iter().next() else {
            return Err(Error::invalid_request("the path has no id"));
        };
        value
            .parse()
            .map(IdPath)
            .map_err(|err| Error::invalid_id(format!("path parameter {name}: {err}")))
    }
}

/// A query string, parsed into `T` (whose unknown fields are refused).
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<T, S> FromRequestParts<S> for QueryParams<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        let Query(query) =
            Query::<T>::from_request_parts(parts, state)
                .await
                .map_err(|rejection| {
                    let text = rejection.body_text();
                    let detail = text
                        .strip_prefix("Failed to deserialize query string: ")
                        .unwrap_or(&text);
                    Error::invalid_request(format!("invalid query string: {detail}"))
                })?;
        Ok(QueryParams(query))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Error> {
        // The identification layer always sets it; its absence is a wiring bug.
        parts.extensions.get::<Actor>().cloned().ok_or_else(|| {
            Error::Control(crate::control::ControlError::Internal(
                "the request reached a handler without an actor".to_owned(),
            ))
        })
    }
}

/// The authenticated principal of a request (set by the authentication layer).
#[derive(Debug, Clone)]
pub struct Caller(pub crate::auth::Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Error> {
        parts
            .extensions
            .get::<crate::auth::Principal>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| {
                Error::Control(crate::control::ControlError::Internal(
                    "the request reached a handler without a principal".to_owned(),
                ))
            })
    }
}
