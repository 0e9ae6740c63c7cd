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
use super::wire::{DeleteGroupRequest, RetentionLockRequest, RpsRequest, SoftDeleteRequest};
use super::{AppState, Error};
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
    let accepted = state.control.submit(actor.0, command).await?;
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
    let accepted = state.control.submit(actor.0, command).await?;
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
    let accepted = state.control.submit(actor.0, command).await?;
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
    let accepted = state.control.submit(actor.0, command).await?;
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
    let accepted = state.control.submit(actor.0, command).await?;
    Ok((StatusCode::OK, Json(accepted)))
}
