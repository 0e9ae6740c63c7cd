//! The API's errors and their one JSON shape, `{"error": {"code": "...", "message": "..."}}`.
//!
//! Client faults (4xx) carry a stable `code` and a message that says what was wrong with
//! which value; internal faults (5xx) are logged in full and answered with a generic message,
//! because their details (paths, database errors) are for the operator, not the caller.

use crate::error_code::ErrorCode;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::wire::{ErrorBody, ErrorDetail};
use crate::control::ControlError;

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Refused by the orchestrator, or by the API's own checks with the same codes
    /// (`invalid_request`, `invalid_id`, `invalid_path`, `invalid_policy`, `unknown_vm`, ...).
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The body is larger than [`super::ApiConfig::body_limit_bytes`] (413 `payload_too_large`).
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// No route has this path (404 `not_found`).
    #[error("no route for {method} {path}")]
    NoRoute {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
    /// No valid token (401 `unauthenticated`): none sent, malformed, unknown, revoked or
    /// expired.
    #[error("{0}")]
    Unauthenticated(String),
    /// The token's role lacks a right the request needs (403 `forbidden`).
    #[error("{message}")]
    Forbidden {
        /// The right that is missing.
        right: &'static str,
        /// What was refused, naming the right.
        message: String,
    },
    /// The path exists but not with this method (405 `method_not_allowed`).
    #[error("{path} does not accept {method}")]
    MethodNotAllowed {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
}

impl Error {
    /// 403 `forbidden`: the principal's role lacks `right`.
    pub fn forbidden(right: crate::auth::Right, what: impl std::fmt::Display) -> Self {
        Self::Forbidden {
            right: right.as_str(),
            message: format!(
                "{what} needs the right {:?}, which this token's role lacks",
                right.as_str()
            ),
        }
    }

    /// 400 `invalid_request`: a malformed body, query or header.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::invalid(ErrorCode::InvalidRequest, message)
    }

    /// 400 `invalid_id`: an id that does not parse.
    pub fn invalid_id(message: impl Into<String>) -> Self {
        Self::invalid(ErrorCode::InvalidId, message)
    }

    /// 400 `invalid_path`: a target path that is not absolute or climbs out with `..`.
    pub fn invalid_path(message: impl Into<String>) -> Self {
        Self::invalid(ErrorCode::InvalidPath, message)
    }

    /// 400 `invalid_policy`: a group policy that does not validate.
    pub fn invalid_policy(message: impl Into<String>) -> Self {
        Self::invalid(ErrorCode::InvalidPolicy, message)
    }

    fn invalid(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Control(ControlError::Invalid {
            code,
            message: message.into(),
        })
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Control(err) => {
                StatusCode::from_u16(err.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::NoRoute { .. } => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Control(err) => err.code(),
            Error::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            Error::NoRoute { .. } => ErrorCode::NotFound,
            Error::MethodNotAllowed { .. } => ErrorCode::MethodNotAllowed,
            Error::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Error::Forbidden { .. } => ErrorCode::Forbidden,
        }
    }

    /// The body sent to the client.
    pub fn body(&self) -> ErrorBody {
        let message = match self {
            Error::Control(ControlError::Internal(_)) => {
                "internal error; the orchestrator's log has the details".to_owned()
            }
            other => other.to_string(),
        };
        ErrorBody {
            error: ErrorDetail {
                code: self.code().to_string(),
                message,
            },
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(code = %self.code(), error = %self, "request failed");
        }
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750: say which scheme is wanted.
            return (
                status,
                [(
                    axum::http::header::WWW_AUTHENTICATE,
                    "Bearer realm=\"cairn\"",
                )],
                Json(self.body()),
            )
                .into_response();
        }
        (status, Json(self.body())).into_response()
    }
}
