//! JSON-only request bodies, so that a plain HTML form on another site cannot post to the
//! API. A browser lets a page send a cross-site request without asking the server first only
//! with the content types a form can produce (`application/x-www-form-urlencoded`,
//! `multipart/form-data`, `text/plain`); `application/json` always needs a CORS preflight,
//! which this server never grants (it sends no `Access-Control-*` header at all).
//!
//! So every request with a method that may change something (anything but `GET`, `HEAD` and
//! `OPTIONS`) is refused with 400 `invalid_request` before any handler runs when it names a
//! content type that is not JSON, even with an empty body, and when it carries a body with no
//! content type. A request with neither body nor content type (`curl -X POST URL`) passes: the
//! handler decides what an absent body means. The body extractors
//! ([`super::extract::JsonBody`]) check the same again for the routes that read a body.

use axum::body::HttpBody;
use axum::extract::Request;
use axum::http::Method;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::extract::check_json_content_type;

/// Refuses a non-JSON body (or content type) on a method that is not read-only.
pub(super) async fn require_json(request: Request, next: Next) -> Response {
    if matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) {
        return next.run(request).await;
    }
    let has_content_type = request.headers().contains_key(CONTENT_TYPE);
    // `upper() == Some(0)`: the body is known to be empty (no body, or `Content-Length: 0`).
    let has_body = request.body().size_hint().upper() != Some(0);
    if (has_content_type || has_body)
        && let Err(err) = check_json_content_type(request.headers())
    {
        return err.into_response();
    }
    next.run(request).await
}
