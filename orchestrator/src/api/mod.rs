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
//! | POST | `/v1/vms/{vm}/recovery-points/delete` | soft-delete recovery points |
//! | POST | `/v1/vms/{vm}/recovery-points/undelete` | restore soft-deleted recovery points |
//! | POST | `/v1/groups/{group}/delete` | delete a group (and soft-delete its recovery points) |
//! | POST | `/v1/groups/{group}/members` | add VMs, remove members (with their recovery points: soft delete) |
//! | POST | `/v1/groups/{group}/retention-lock` | set its retention lock (lowering: admin, deferred) |
//! | POST | `/v1/groups/{group}/soft-delete` | set its soft-delete period (admin) |
//!
//! Every client fault is `{"error": {"code": "...", "message": "..."}}` with a 4xx status
//! and a stable code (see [`Error`]); internal faults are 5xx and their details go to the log,
//! not to the client.
//!
//! Layers, outermost first: request log (method, path, status, ms) → `Host` allow-list
//! (`host`, against DNS rebinding) → JSON-only bodies (`json_only`, so a plain form cannot
//! post) → authentication (a bearer token → the principal, whose name and token id are the
//! actor recorded on events; 401 without one) → body size limit → routes, each with its
//! [`Access`] rule (403 for a right the role lacks, 404 for an app owner's out-of-scope VM,
//! group or job). Handlers never see a request that the outer layers refused. `/healthz`
//! alone is open. No layer sends CORS headers.
//!
//! [`serve_with`] serves plain HTTP; [`tls::serve_tls`] the same router over TLS (rustls).
//! Which addresses may be served without TLS is the caller's decision.

mod error;
mod extract;
mod handlers;
pub mod host;
pub mod idempotency;
mod items;
mod json_only;
mod middleware;
mod policy_handlers;
pub mod recover;
mod scope;
mod softdelete;
pub mod tls;
mod tokens;
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

use crate::auth::Right;
use crate::control::Control;
use middleware::{Access, Target};

pub use error::Error;

#[cfg(doc)]
use cairn_schemas::Command;

/// The API's description, served at `/openapi.yaml`.
pub const OPENAPI_YAML: &str = include_str!("../../api/openapi.yaml");

/// Settings of the HTTP API. The defaults suit every deployment; tests shorten them.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest accepted request body, in bytes; larger ones get 413 `payload_too_large`.
    pub body_limit_bytes: usize,
    /// Longest long poll of `GET /v1/events`, in milliseconds; longer `wait_ms` are cut to it.
    pub max_wait_ms: u64,
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
    /// Paths of the routes that need no token ([`Access::Open`]).
    open_paths: Arc<std::collections::HashSet<&'static str>>,
}

/// One route of the API: its method and path as the OpenAPI description names them, and its
/// handler. The router is built from this table, and a test checks the table against the
/// OpenAPI description, so neither can drift from the other.
struct Route {
    method: &'static str,
    path: &'static str,
    /// Who may call it; every route has a rule, and a test checks each against each role.
    access: Access,
    handler: MethodRouter<AppState>,
}

/// A route whose handler answers `method` (`get` or `post`), so the method that the table
/// names is the one that is served.
fn route<H, T>(method: &'static str, path: &'static str, access: Access, handler: H) -> Route
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
        access,
        handler: on(filter, handler),
    }
}

fn routes() -> Vec<Route> {
    use Right::*;
    use Target as T;
    let needs = Access::Needs;
    vec![
        route("get", "/healthz", Access::Open, handlers::healthz),
        route(
            "get",
            "/openapi.yaml",
            needs(Authenticated, T::None),
            handlers::openapi,
        ),
        route("get", "/v1/vms", needs(Read, T::None), handlers::list_vms),
        route(
            "get",
            "/v1/vms/{vm}/recovery-points",
            needs(Read, T::Vm),
            handlers::list_recovery_points,
        ),
        route(
            "post",
            "/v1/vms/{vm}/backup",
            needs(Backup, T::Vm),
            handlers::request_backup,
        ),
        route(
            "post",
            "/v1/vms/{vm}/restore",
            needs(Recover, T::Vm),
            handlers::request_restore,
        ),
        route(
            "post",
            "/v1/vms/{vm}/recover",
            needs(Recover, T::Vm),
            recover::request_recover,
        ),
        route(
            "get",
            "/v1/groups",
            needs(Read, T::None),
            handlers::list_groups,
        ),
        route(
            "post",
            "/v1/groups",
            needs(Policy, T::None),
            handlers::create_group,
        ),
        route(
            "get",
            "/v1/groups/{group}",
            needs(Read, T::Group),
            policy_handlers::get_group,
        ),
        route(
            "post",
            "/v1/groups/{group}/policy",
            needs(Policy, T::Group),
            policy_handlers::set_policy,
        ),
        route(
            "get",
            "/v1/groups/{group}/plan",
            needs(Read, T::Group),
            policy_handlers::group_plan,
        ),
        route(
            "post",
            "/v1/vms/{vm}/check",
            needs(Maintain, T::Vm),
            policy_handlers::request_check,
        ),
        route(
            "post",
            "/v1/vms/{vm}/verify",
            needs(Maintain, T::Vm),
            policy_handlers::request_verify,
        ),
        route(
            "post",
            "/v1/vms/{vm}/seed",
            needs(Policy, T::Vm),
            policy_handlers::import_seed,
        ),
        route(
            "get",
            "/v1/vms/{vm}/calendar",
            needs(Read, T::Vm),
            policy_handlers::calendar,
        ),
        route(
            "get",
            "/v1/alerts",
            needs(Read, T::None),
            policy_handlers::alerts,
        ),
        route(
            "get",
            "/v1/nodes",
            needs(Read, T::None),
            handlers::list_nodes,
        ),
        route("get", "/v1/jobs", needs(Read, T::None), handlers::list_jobs),
        route(
            "get",
            "/v1/jobs/{job}",
            needs(Read, T::Job),
            handlers::get_job,
        ),
        route(
            "post",
            "/v1/jobs/{job}/cancel",
            needs(Backup, T::Job),
            handlers::cancel_job,
        ),
        route(
            "get",
            "/v1/events",
            needs(Events, T::None),
            handlers::events,
        ),
        route(
            "get",
            "/v1/audit/verify",
            needs(Audit, T::None),
            handlers::audit_verify,
        ),
        route(
            "get",
            "/v1/vms/{vm}/browse",
            needs(Recover, T::Vm),
            items::browse,
        ),
        route(
            "post",
            "/v1/vms/{vm}/recover-items",
            needs(Recover, T::Vm),
            items::recover_items,
        ),
        route(
            "post",
            "/v1/vms/{vm}/recovery-points/delete",
            needs(Delete, T::Vm),
            softdelete::delete_rps,
        ),
        route(
            "post",
            "/v1/vms/{vm}/recovery-points/undelete",
            needs(Delete, T::Vm),
            softdelete::undelete_rps,
        ),
        route(
            "post",
            "/v1/groups/{group}/delete",
            needs(Delete, T::Group),
            softdelete::delete_group,
        ),
        route(
            "post",
            "/v1/groups/{group}/members",
            needs(Policy, T::Group),
            softdelete::edit_members,
        ),
        route(
            "post",
            "/v1/groups/{group}/retention-lock",
            needs(Policy, T::Group),
            softdelete::set_retention_lock,
        ),
        route(
            "post",
            "/v1/groups/{group}/soft-delete",
            needs(Settings, T::Group),
            softdelete::set_soft_delete,
        ),
        route(
            "get",
            "/v1/tokens",
            needs(Tokens, T::None),
            tokens::list_tokens,
        ),
        route(
            "post",
            "/v1/tokens",
            needs(Tokens, T::None),
            tokens::create_token,
        ),
        route(
            "post",
            "/v1/tokens/{token}/revoke",
            needs(Tokens, T::Token),
            tokens::revoke_token,
        ),
    ]
}

fn build_router(
    control: Arc<dyn Control>,
    config: ApiConfig,
    stopping: watch::Receiver<bool>,
    hosts: host::HostAllowList,
) -> Router {
    let routes = routes();
    let open_paths = routes
        .iter()
        .filter(|r| r.access == Access::Open)
        .map(|r| r.path)
        .collect();
    let hosts = host::HostGuard(Arc::new(hosts));
    let state = AppState {
        control,
        config: Arc::new(config),
        stopping,
        open_paths: Arc::new(open_paths),
    };
    let mut router = Router::new();
    for Route {
        method,
        path,
        access,
        handler,
    } in routes
    {
        tracing::trace!(method, path, ?access, "route");
        let handler = match access {
            Access::Open => handler,
            Access::Needs(right, target) => handler.layer(axum::middleware::from_fn_with_state(
                middleware::RouteAccess {
                    state: state.clone(),
                    right,
                    target,
                    what: route_label(method, path),
                },
                middleware::authorize,
            )),
        };
        // Routes on one path (GET and POST `/v1/groups`) are merged by axum.
        router = router.route(path, handler);
    }
    router
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .fallback(handlers::no_route)
        .layer(DefaultBodyLimit::max(state.config.body_limit_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::authenticate,
        ))
        .layer(axum::middleware::from_fn(json_only::require_json))
        .layer(axum::middleware::from_fn_with_state(
            hosts,
            host::check_host,
        ))
        .layer(axum::middleware::from_fn(middleware::log_request))
        .with_state(state)
}

/// `POST /v1/vms/{vm}/backup`, for messages; made once per route when the router is built.
fn route_label(method: &str, path: &str) -> Arc<str> {
    format!("{} {path}", method.to_ascii_uppercase()).into()
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
