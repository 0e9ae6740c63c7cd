//! Handlers of the protection-policy routes: group details and policy changes, the disk
//! allocation review, consistency checks, verify, seed imports, the recovery point calendar
//! and alerts. Input is checked here; whether a command is allowed is `decide`'s business.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use cairn_schemas::{Command, GroupId, VmId};

use super::extract::{Actor, Caller, IdPath, JsonBody, QueryParams};
use super::wire::{AlertsQuery, SeedRequest, check_target_path, policy_from_view};
use super::{AppState, Error};
use crate::views::{
    Accepted, AlertView, CalendarDayView, CapacityView, GroupDetailView, PolicyView,
};

type Answer<T> = Result<Json<T>, Error>;
type Created = Result<(StatusCode, Json<Accepted>), Error>;

pub(super) async fn get_group(
    State(state): State<AppState>,
    IdPath(group): IdPath<GroupId>,
) -> Answer<GroupDetailView> {
    Ok(Json(state.control.group(&group.to_string())?))
}

/// Replaces the whole policy. Online protection is not part of this API yet and is left
/// unset.
pub(super) async fn set_policy(
    State(state): State<AppState>,
    actor: Actor,
    IdPath(group): IdPath<GroupId>,
    JsonBody(view): JsonBody<PolicyView>,
) -> Created {
    // 404 for an unknown group before complaining about the body.
    state.control.group(&group.to_string())?;
    let policy = policy_from_view(&view, None, &state.control.default_repository())?;
    let command = Command::ChangeGroupPolicy { group, policy };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    Ok((StatusCode::OK, Json(accepted)))
}

pub(super) async fn group_plan(
    State(state): State<AppState>,
    IdPath(group): IdPath<GroupId>,
) -> Answer<CapacityView> {
    Ok(Json(state.control.group_plan(&group.to_string())?))
}

pub(super) async fn request_check(
    State(state): State<AppState>,
    actor: Actor,
    IdPath(vm): IdPath<VmId>,
) -> Created {
    let command = Command::RequestConsistencyCheck {
        job: state.control.new_job_id(),
        vm,
    };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

pub(super) async fn request_verify(
    State(state): State<AppState>,
    actor: Actor,
    IdPath(vm): IdPath<VmId>,
) -> Created {
    let command = Command::RequestVerify {
        job: state.control.new_job_id(),
        vm,
    };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

pub(super) async fn import_seed(
    State(state): State<AppState>,
    actor: Actor,
    IdPath(vm): IdPath<VmId>,
    JsonBody(request): JsonBody<SeedRequest>,
) -> Created {
    check_target_path("seed", &request.seed)?;
    let command = Command::ImportSeed {
        job: state.control.new_job_id(),
        vm,
        seed: request.seed,
    };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

pub(super) async fn calendar(
    State(state): State<AppState>,
    IdPath(vm): IdPath<VmId>,
) -> Answer<Vec<CalendarDayView>> {
    Ok(Json(state.control.calendar(&vm.to_string())?))
}

pub(super) async fn alerts(
    State(state): State<AppState>,
    Caller(caller): Caller,
    QueryParams(query): QueryParams<AlertsQuery>,
) -> Answer<Vec<AlertView>> {
    let alerts = state.control.alerts(query.all.unwrap_or(false));
    Ok(Json(super::scope::alerts(&caller, alerts)))
}
