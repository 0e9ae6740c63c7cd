//! Handlers of soft delete and retention locks: deleting and undeleting recovery points,
//! deleting a group (with or without its recovery points), a group's retention lock and its
//! soft-delete period. Input is checked here; whether a deletion or a lock change is allowed
//! (locks, purges, a lowering without admin) is `decide`'s business.

use std::collections::HashSet;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use cairn_schemas::{Command, GroupId, RecoveryPointId, Role, VmId};

use super::extract::{Actor, Caller, IdPath, JsonBody};
use super::wire::{
    DeleteGroupRequest, MembersRequest, RetentionLockRequest, RpsRequest, SoftDeleteRequest,
};
use super::{AppState, Error};
use crate::auth::Right;
use crate::views::Accepted;

type Done = Result<(StatusCode, Json<Accepted>), Error>;

fn parse_rps(request: &RpsRequest) -> Result<Vec<RecoveryPointId>, Error> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(request.rps.len());
    for (idx, text) in request.rps.iter().enumerate() {
        let rp: RecoveryPointId = text
            .parse()
            .map_err(|err| Error::invalid_id(format!("rps[{idx}]: {err}")))?;
        if !seen.insert(rp) {
            return Err(Error::invalid_request(format!(
                "rps[{idx}]: recovery point {rp} is listed twice"
            )));
        }
        out.push(rp);
    }
    if out.is_empty() {
        return Err(Error::invalid_request(
            "rps: name at least one recovery point",
        ));
    }
    Ok(out)
}

/// `POST /v1/vms/{vm}/recovery-points/delete`.
pub(super) async fn delete_rps(
    State(state): State<AppState>,
    actor: Actor,
    IdPath(vm): IdPath<VmId>,
    JsonBody(request): JsonBody<RpsRequest>,
) -> Done {
    let rps = parse_rps(&request)?;
    let command = Command::DeleteRecoveryPoints { vm, rps };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    Ok((StatusCode::OK, Json(accepted)))
}

/// `POST /v1/vms/{vm}/recovery-points/undelete`.
pub(super) async fn undelete_rps(
    State(state): State<AppState>,
    actor: Actor,
    IdPath(vm): IdPath<VmId>,
    JsonBody(request): JsonBody<RpsRequest>,
) -> Done {
    let rps = parse_rps(&request)?;
    let command = Command::UndeleteRecoveryPoints { vm, rps };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    Ok((StatusCode::OK, Json(accepted)))
}

/// `POST /v1/groups/{group}/delete`.
pub(super) async fn delete_group(
    State(state): State<AppState>,
    actor: Actor,
    IdPath(group): IdPath<GroupId>,
    JsonBody(request): JsonBody<DeleteGroupRequest>,
) -> Done {
    let command = Command::DeleteGroup {
        group,
        delete_recovery_points: request.delete_recovery_points,
    };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    Ok((StatusCode::OK, Json(accepted)))
}

fn parse_vms(field: &str, texts: &[String]) -> Result<Vec<VmId>, Error> {
    texts
        .iter()
        .enumerate()
        .map(|(idx, text)| {
            text.parse()
                .map_err(|err| Error::invalid_id(format!("{field}[{idx}]: {err}")))
        })
        .collect()
}

/// `POST /v1/groups/{group}/members`: add VMs, remove members, the latter with their
/// recovery points (a soft delete, which needs the right `delete` besides `policy`). Every
/// VM named must be visible to the caller.
pub(super) async fn edit_members(
    State(state): State<AppState>,
    actor: Actor,
    Caller(caller): Caller,
    IdPath(group): IdPath<GroupId>,
    JsonBody(request): JsonBody<MembersRequest>,
) -> Done {
    let add = parse_vms("add", &request.add)?;
    let remove = parse_vms("remove", &request.remove)?;
    if add.is_empty() && remove.is_empty() {
        return Err(Error::invalid_request(
            "name at least one VM in add or remove",
        ));
    }
    if request.delete_recovery_points && !caller.may(Right::Delete) {
        return Err(Error::forbidden(
            Right::Delete,
            "removing VMs with their recovery points",
        ));
    }
    if let Some(vm) = add.iter().chain(&remove).find(|vm| !caller.sees_vm(vm)) {
        return Err(Error::forbidden(
            Right::Policy,
            format_args!("changing the protection of VM {vm}, outside this token's scope,"),
        ));
    }
    let command = Command::EditGroupMembers {
        group,
        add,
        remove,
        delete_recovery_points: request.delete_recovery_points,
    };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    Ok((StatusCode::OK, Json(accepted)))
}

/// `POST /v1/groups/{group}/retention-lock`. Whether the caller is an admin comes from its
/// token, never from the body.
pub(super) async fn set_retention_lock(
    State(state): State<AppState>,
    actor: Actor,
    Caller(caller): Caller,
    IdPath(group): IdPath<GroupId>,
    JsonBody(request): JsonBody<RetentionLockRequest>,
) -> Done {
    let days = u16::try_from(request.days)
        .map_err(|_| Error::invalid_request(format!("days {} is too large", request.days)))?;
    let command = Command::SetRetentionLock {
        group,
        days,
        by_admin: caller.role == Role::Admin,
    };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    Ok((StatusCode::OK, Json(accepted)))
}

/// `POST /v1/groups/{group}/soft-delete`.
pub(super) async fn set_soft_delete(
    State(state): State<AppState>,
    actor: Actor,
    IdPath(group): IdPath<GroupId>,
    JsonBody(request): JsonBody<SoftDeleteRequest>,
) -> Done {
    let days = u16::try_from(request.days)
        .map_err(|_| Error::invalid_request(format!("days {} is too large", request.days)))?;
    let command = Command::SetSoftDeletePeriod { group, days };
    let accepted = state
        .control
        .submit(actor.name, actor.command_id, command)
        .await?;
    Ok((StatusCode::OK, Json(accepted)))
}
