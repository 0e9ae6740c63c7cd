//! One function per route: check the input, ask the [`Control`](crate::control::Control)
//! or build a command and submit it, answer in JSON. No decision is made here beyond input
//! validation; whether a command is allowed is `decide`'s business.

use crate::error_code::ErrorCode;
use std::collections::HashSet;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{Method, StatusCode, Uri};
use axum::response::IntoResponse;
use cairn_schemas::{Command, JobId, NodeId, RecoveryPointId, RecoveryTarget, VmId};

use super::extract::{Actor, Caller, IdPath, JsonBody, OptionalJsonBody, QueryParams};
use super::scope;
use super::wire::{
    BackupRequest, CancelRequest, CreateGroupRequest, DEFAULT_EVENTS_LIMIT, DEFAULT_JOBS_LIMIT,
    EventsPage, EventsQuery, Health, JOB_STATES, JobsQuery, MAX_EVENTS_LIMIT, MAX_JOBS_LIMIT,
    MAX_REASON_CHARS, RestoreRequest, check_target_path,
};
use super::{AppState, Error, OPENAPI_YAML};
use crate::control::ControlError;
use crate::views::{Accepted, AuditReport, GroupView, JobView, NodeView, RpView, VmView};

type Answer<T> = Result<Json<T>, Error>;
type Created = Result<(StatusCode, Json<Accepted>), Error>;

pub(super) async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
    })
}

pub(super) async fn openapi() -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/yaml")], OPENAPI_YAML)
}

pub(super) async fn no_route(method: Method, uri: Uri) -> Error {
    Error::NoRoute {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

pub(super) async fn method_not_allowed(method: Method, uri: Uri) -> Error {
    Error::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

pub(super) async fn list_vms(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> Json<Vec<VmView>> {
    Json(scope::vms(&caller, state.control.vms()))
}

pub(super) async fn list_recovery_points(
    State(state): State<AppState>,
    IdPath(vm): IdPath<VmId>,
) -> Answer<Vec<RpView>> {
    Ok(Json(state.control.recovery_points(&vm.to_string())?))
}

pub(super) async fn list_groups(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> Json<Vec<GroupView>> {
    Json(scope::groups(&caller, state.control.groups()))
}

pub(super) async fn list_nodes(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> Json<Vec<NodeView>> {
    Json(scope::nodes(
        &caller,
        state.control.nodes(),
        &state.control.vms(),
    ))
}

pub(super) async fn list_jobs(
    State(state): State<AppState>,
    Caller(caller): Caller,
    QueryParams(query): QueryParams<JobsQuery>,
) -> Answer<Vec<JobView>> {
    if let Some(wanted) = &query.state
        && !JOB_STATES.contains(&wanted.as_str())
    {
        return Err(Error::invalid_request(format!(
            "state {wanted:?} is not a job state, use one of {}",
            JOB_STATES.join(", ")
        )));
    }
    let vm = query
        .vm
        .as_deref()
        .map(|text| {
            text.parse::<VmId>()
                .map_err(|err| Error::invalid_id(format!("query parameter vm: {err}")))
        })
        .transpose()?
        .map(|vm| vm.to_string());
    let limit = checked_limit(query.limit, DEFAULT_JOBS_LIMIT, MAX_JOBS_LIMIT)?;
    let mut jobs: Vec<JobView> = state
        .control
        .jobs()
        .into_iter()
        .filter(|job| query.state.as_ref().is_none_or(|s| &job.state == s))
        .filter(|job| vm.as_ref().is_none_or(|vm| &job.vm == vm))
        .filter(|job| caller.sees_vm_text(&job.vm))
        .collect();
    // Newest first: v7 job ids sort by creation time, so they break ties of `requested_at`.
    jobs.sort_by(|a, b| (b.requested_at, b.job.as_str()).cmp(&(a.requested_at, a.job.as_str())));
    jobs.truncate(limit);
    Ok(Json(jobs))
}

fn checked_limit(limit: Option<usize>, default: usize, max: usize) -> Result<usize, Error> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(Error::invalid_request(format!(
            "limit {n} is out of range, use 1 to {max}"
        ))),
    }
}

pub(super) async fn get_job(
    State(state): State<AppState>,
    IdPath(job): IdPath<JobId>,
) -> Answer<JobView> {
    Ok(Json(state.control.job(&job.to_string())?))
}

pub(super) async fn create_group(
    State(state): State<AppState>,
    actor: Actor,
    JsonBody(request): JsonBody<CreateGroupRequest>,
) -> Created {
    request.check_name()?;
    let mut members = Vec::with_capacity(request.vms.len());
    let mut seen = HashSet::new();
    for (idx, text) in request.vms.iter().enumerate() {
        let vm: VmId = text
            .parse()
            .map_err(|err| Error::invalid_id(format!("vms[{idx}]: {err}")))?;
        if !seen.insert(vm) {
            return Err(Error::invalid_request(format!(
                "vms[{idx}]: vm {vm} is listed twice"
            )));
        }
        members.push(vm);
    }
    let policy = request.policy(&state.control.default_repository())?;
    let command = Command::CreateGroup {
        group: state.control.new_group_id(),
        name: request.name,
        members,
        policy,
    };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    Ok((StatusCode::CREATED, Json(accepted)))
}

pub(super) async fn request_backup(
    State(state): State<AppState>,
    actor: Actor,
    IdPath(vm): IdPath<VmId>,
    OptionalJsonBody(request): OptionalJsonBody<BackupRequest>,
) -> Created {
    let command = Command::RequestBackup {
        job: state.control.new_job_id(),
        vm,
        mode: request.mode.unwrap_or_default().into(),
    };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

pub(super) async fn request_restore(
    State(state): State<AppState>,
    actor: Actor,
    Caller(caller): Caller,
    IdPath(vm): IdPath<VmId>,
    JsonBody(request): JsonBody<RestoreRequest>,
) -> Created {
    let rp: RecoveryPointId = request
        .rp
        .parse()
        .map_err(|err| Error::invalid_id(format!("rp: {err}")))?;
    check_target_path("to", &request.to)?;
    let node = match &request.node {
        Some(text) => {
            NodeId::new(text.as_str()).map_err(|err| Error::invalid_id(format!("node: {err}")))?
        }
        None => vm_node(&state, vm)?,
    };
    let target = RecoveryTarget::CopyToFolder {
        node,
        path: request.to,
    };
    scope::check_recovery_target(&caller, state.control.as_ref(), &target)?;
    let command = Command::RequestRestore {
        job: state.control.new_job_id(),
        vm,
        rp,
        target,
    };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

/// The node that hosts `vm` now, from the inventory.
pub(super) fn vm_node(state: &AppState, vm: VmId) -> Result<NodeId, Error> {
    let vm_text = vm.to_string();
    let view = state
        .control
        .vms()
        .into_iter()
        .find(|view| view.vm == vm_text)
        .ok_or_else(|| ControlError::NotFound {
            code: ErrorCode::UnknownVm,
            message: format!("no vm {vm_text}"),
        })?;
    NodeId::new(view.node.as_str()).map_err(|err| {
        Error::Control(ControlError::Internal(format!(
            "vm {vm_text} has an invalid node name in the inventory: {err}"
        )))
    })
}

pub(super) async fn cancel_job(
    State(state): State<AppState>,
    actor: Actor,
    IdPath(job): IdPath<JobId>,
    OptionalJsonBody(request): OptionalJsonBody<CancelRequest>,
) -> Created {
    let reason = request
        .reason
        .unwrap_or_else(|| format!("cancelled by {}", actor.name));
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(Error::invalid_request(format!(
            "reason is longer than {MAX_REASON_CHARS} characters"
        )));
    }
    let command = Command::CancelJob { job, reason };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

pub(super) async fn events(
    State(state): State<AppState>,
    Caller(caller): Caller,
    QueryParams(query): QueryParams<EventsQuery>,
) -> Answer<EventsPage> {
    let from = query.from.unwrap_or(0);
    let limit = checked_limit(query.limit, DEFAULT_EVENTS_LIMIT, MAX_EVENTS_LIMIT)?;
    let wait_ms = query.wait_ms.unwrap_or(0).min(state.config.max_wait_ms);
    let mut events = state.control.events(from, limit).await?;
    if events.is_empty() && wait_ms > 0 {
        let mut stopping = state.stopping.clone();
        tokio::select! {
            () = state.control.wait_for_events(from, wait_ms) => {}
            () = async {
                // Without a sender (no server shutdown to follow) only the timeout ends it.
                if stopping.wait_for(|stop| *stop).await.is_err() {
                    std::future::pending::<()>().await;
                }
            } => {}
            // A bound of our own in case a `Control` overstays its timeout.
            () = tokio::time::sleep(Duration::from_millis(wait_ms.saturating_add(1000))) => {}
        }
        events = state.control.events(from, limit).await?;
    }
    // Past every event read, shown or not, so an app owner's reader moves on.
    let next_from = events.last().map_or(from, |event| event.seq + 1);
    let events = scope::events(&caller, events, || state.control.jobs());
    Ok(Json(EventsPage { events, next_from }))
}

pub(super) async fn audit_verify(State(state): State<AppState>) -> Answer<AuditReport> {
    Ok(Json(state.control.audit_verify().await?))
}
