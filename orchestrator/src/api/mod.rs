//! The HTTP API: JSON over HTTP/1.1, versioned under `/v1`, served with axum over any
//! [`Control`]. It turns requests into queries of the projections and into [`Command`]s, and
//! responses and errors into JSON. It owns nothing else: it never decides (the engine's
//! `decide` does, behind [`Control::submit`]), never reads the event log directly and never
//! touches disk data. It is the only module that knows JSON over HTTP.
//!
//! Routes (the hand-written `orchestrator/api/openapi.yaml` describes each; a test keeps the
//! two in step):
//!
//! | method | path | what |
//! |---|---|---|
//! | GET  | `/healthz` | liveness |
//! | GET  | `/openapi.yaml` | this API's description |
//! | GET  | `/v1/vms` | inventory |
//! | GET  | `/v1/vms/{vm}/recovery-points` | a VM's recovery points |
//! | POST | `/v1/vms/{vm}/backup` | back a VM up now (202, job id) |
//! | POST | `/v1/vms/{vm}/restore` | restore a recovery point to a folder (202, job id) |
//! | POST | `/v1/vms/{vm}/recover` | recover to the original VM, another host or a folder, with options (202) |
//! | GET  | `/v1/groups` | protection groups |
//! | POST | `/v1/groups` | create a protection group (201, group id) |
//! | GET  | `/v1/groups/{group}` | a group's policy, next runs, members' retention |
//! | POST | `/v1/groups/{group}/policy` | replace a group's policy (applies from the next run) |
//! | GET  | `/v1/groups/{group}/plan` | disk allocation review |
//! | POST | `/v1/vms/{vm}/check` | consistency check now (202, job id) |
//! | POST | `/v1/vms/{vm}/verify` | verify the VM's stored chunks (202, job id) |
//! | POST | `/v1/vms/{vm}/seed` | import a seed made offline (202, job id) |
//! | GET  | `/v1/vms/{vm}/calendar` | recovery points per day |
//! | GET  | `/v1/alerts` | alerts (`?all=true` adds resolved ones) |
//! | GET  | `/v1/nodes` | nodes and their workers |
//! | GET  | `/v1/jobs` | jobs, newest first (`?state=&vm=&limit=`) |
//! | GET  | `/v1/jobs/{job}` | one job with its steps |
//! | POST | `/v1/jobs/{job}/cancel` | cancel a job (202) |
//! | GET  | `/v1/events` | the event log from a sequence number, with long poll |
//! | GET  | `/v1/audit/verify` | walk the log's hash chain |
//!
//! Every client fault is `{"error": {"code": "...", "message": "..."}}` with a 4xx status
//! and a stable code (see [`Error`]); internal faults are 5xx and their details go to the log,
//! not to the client.
//!
//! Layers, outermost first: request log (method, path, status, ms) → `Host` allow-list
//! (`host`, against DNS rebinding) → JSON-only bodies (`json_only`, so a plain form cannot
//! post) → identification (the actor recorded on events; authentication will sit in the same
//! place) → body size limit → routes. Handlers never see a request that the outer layers
//! refused. No layer sends CORS headers.
//!
//! [`serve_with`] serves plain HTTP; [`tls::serve_tls`] the same router over TLS (rustls).
//! Which addresses may be served without TLS is the caller's decision.

mod error;
mod extract;
mod handlers;
pub mod host;
mod items;
mod json_only;
mod middleware;
mod policy_handlers;
pub mod recover;
pub mod tls;
pub mod wire;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::routing::{MethodFilter, MethodRouter, on};
use tokio::sync::watch;

use crate::control::Control;

pub use error::Error;

#[cfg(doc)]
use cairn_schemas::Command;

/// The API's description, served at `/openapi.yaml`.
pub const OPENAPI_YAML: &str = include_str!("../../api/openapi.yaml");

/// The header a caller may use to name the actor recorded on the events its commands append.
pub const ACTOR_HEADER: &str = "x-cairn-actor";

/// Settings of the HTTP API. The defaults suit every deployment; tests shorten them.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest accepted request body, in bytes; larger ones get 413 `payload_too_large`.
    pub body_limit_bytes: usize,
    /// Longest long poll of `GET /v1/events`, in milliseconds; longer `wait_ms` are cut to it.
    pub max_wait_ms: u64,
    /// Actor recorded on commands whose request names none (no `X-Cairn-Actor` header).
    pub default_actor: String,
    /// Names the API answers to besides its own address (see [`host`]). A server always
    /// checks the `Host` header; a [`router`] without a server checks it only when this list
    /// is not empty.
    pub api_hosts: Vec<host::ApiHost>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            body_limit_bytes: 1 << 20,
            max_wait_ms: 30_000,
            default_actor: "api".to_owned(),
            api_hosts: Vec::new(),
        }
    }
}

/// What every handler can reach. Cloned per request (two `Arc`s and a channel receiver).
#[derive(Clone)]
struct AppState {
    control: Arc<dyn Control>,
    config: Arc<ApiConfig>,
    /// Turns `true` when the server begins to shut down, so long polls answer at once instead
    /// of holding the graceful shutdown up for their whole wait. The sender belongs to
    /// [`serve_with`]; once it is dropped (or for a router built by [`router`], which has
    /// none) long polls end only by their timeout.
    stopping: watch::Receiver<bool>,
}

/// One route of the API: its method and path as the OpenAPI description names them, and its
/// handler. The router is built from this table, and a test checks the table against the
/// OpenAPI description, so neither can drift from the other.
struct Route {
    method: &'static str,
    path: &'static str,
    handler: MethodRouter<AppState>,
}

/// A route whose handler answers `method` (`get` or `post`), so the method that the table
/// names is the one that is served.
fn route<H, T>(method: &'static str, path: &'static str, handler: H) -> Route
where
    H: Handler<T, AppState>,
    T: 'static,
{
    let filter = match method {
        "get" => MethodFilter::GET,
        "post" => MethodFilter::POST,
        other => unreachable!("the route table names method {other:?}"),
    };
    Route {
        method,
        path,
        handler: on(filter, handler),
    }
}

fn routes() -> Vec<Route> {
    vec![
        route("get", "/healthz", handlers::healthz),
        route("get", "/openapi.yaml", handlers::openapi),
        route("get", "/v1/vms", handlers::list_vms),
        route(
            "get",
            "/v1/vms/{vm}/recovery-points",
            handlers::list_recovery_points,
        ),
        route("post", "/v1/vms/{vm}/backup", handlers::request_backup),
        route("post", "/v1/vms/{vm}/restore", handlers::request_restore),
        route("post", "/v1/vms/{vm}/recover", recover::request_recover),
        route("get", "/v1/groups", handlers::list_groups),
        route("post", "/v1/groups", handlers::create_group),
        route("get", "/v1/groups/{group}", policy_handlers::get_group),
        route(
            "post",
            "/v1/groups/{group}/policy",
            policy_handlers::set_policy,
        ),
        route(
            "get",
            "/v1/groups/{group}/plan",
            policy_handlers::group_plan,
        ),
        route("post", "/v1/vms/{vm}/check", policy_handlers::request_check),
        route(
            "post",
            "/v1/vms/{vm}/verify",
            policy_handlers::request_verify,
        ),
        route("post", "/v1/vms/{vm}/seed", policy_handlers::import_seed),
        route("get", "/v1/vms/{vm}/calendar", policy_handlers::calendar),
        route("get", "/v1/alerts", policy_handlers::alerts),
        route("get", "/v1/nodes", handlers::list_nodes),
        route("get", "/v1/jobs", handlers::list_jobs),
        route("get", "/v1/jobs/{job}", handlers::get_job),
        route("post", "/v1/jobs/{job}/cancel", handlers::cancel_job),
        route("get", "/v1/events", handlers::events),
        route("get", "/v1/audit/verify", handlers::audit_verify),
        route("get", "/v1/vms/{vm}/browse", items::browse),
        route("post", "/v1/vms/{vm}/recover-items", items::recover_items),
    ]
}

fn build_router(
    control: Arc<dyn Control>,
    config: ApiConfig,
    stopping: watch::Receiver<bool>,
    hosts: host::HostAllowList,
) -> Router {
    let hosts = host::HostGuard(Arc::new(hosts));
    let state = AppState {
        control,
        config: Arc::new(config),
        stopping,
    };
    let mut router = Router::new();
    for Route {
        method,
        path,
        handler,
    } in routes()
    {
        tracing::trace!(method, path, "route");
        // Routes on one path (GET and POST `/v1/groups`) are merged by axum.
        router = router.route(path, handler);
    }
    router
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .fallback(handlers::no_route)
        .layer(DefaultBodyLimit::max(state.config.body_limit_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::identify,
        ))
        .layer(axum::middleware::from_fn(json_only::require_json))
        .layer(axum::middleware::from_fn_with_state(
            hosts,
            host::check_host,
        ))
        .layer(axum::middleware::from_fn(middleware::log_request))
        .with_state(state)
}

/// The API's router, for embedding it in another server or calling it in tests without a
/// socket. Its long polls end only by their timeout; [`serve_with`] also ends them on shutdown.
/// It checks the `Host` header only against [`ApiConfig::api_hosts`], and not at all when
/// that is empty: it has no connection whose address it could allow.
pub fn router(control: Arc<dyn Control>, config: ApiConfig) -> Router {
    let (_no_shutdown, stopping) = watch::channel(false);
    let hosts = if config.api_hosts.is_empty() {
        host::HostAllowList::off()
    } else {
        host::HostAllowList::new(config.api_hosts.clone())
    };
    build_router(control, config, stopping, hosts)
}

/// Serves the API with the default [`ApiConfig`] on `listener` until `shutdown` resolves,
/// then finishes the requests in flight and returns. The caller binds the listener (tests
/// bind port 0).
pub async fn serve(
    listener: tokio::net::TcpListener,
    control: Arc<dyn Control>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, control, ApiConfig::default(), shutdown).await
}

/// [`serve`] with explicit settings.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    control: Arc<dyn Control>,
    config: ApiConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listen = listener.local_addr()?;
    tracing::info!(addr = %listen, "HTTP API listening");
    serve_on(listener, listen, control, config, shutdown).await
}

/// Serves the router on any listener whose connections tell their local address, with the
/// `Host` check on (`listen` is the address it is bound to), until `shutdown` resolves; then
/// finishes the requests in flight.
async fn serve_on<L>(
    listener: L,
    listen: std::net::SocketAddr,
    control: Arc<dyn Control>,
    config: ApiConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
    host::LocalAddr:
        for<'a> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, L>>,
{
    // `stop` lives in the shutdown future below, which axum owns and drops when it returns.
    let (stop, stopping) = watch::channel(false);
    let hosts = host::HostAllowList::new(config.api_hosts.clone()).with_listen(listen);
    let app = build_router(control, config, stopping, hosts);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<host::LocalAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("HTTP API shutting down");
        stop.send_replace(true);
    })
    .await
}
