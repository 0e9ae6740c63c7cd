//! Routes of item-level recovery: browse a recovery point's file systems (a quick query that
//! the orchestrator forwards to the worker of the VM's node) and request an item recovery (a
//! job). Input checks only; what is allowed is `decide`'s business.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use cairn_schemas::{Command, DiskId, NodeId, RecoveryPointId, RecoveryTarget, VmId};
use serde::{Deserialize, Serialize};

use super::extract::{Actor, Caller, IdPath, JsonBody, QueryParams};
use super::wire::check_target_path;
use super::{AppState, Error};
use crate::views::{Accepted, BrowseView};

/// Query of `GET /v1/vms/{vm}/browse`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrowseQuery {
    /// The recovery point id.
    pub rp: String,
    /// The disk (default: the recovery point's first disk).
    pub disk: Option<String>,
    /// `/` for the volumes, `/p2/etc` for a folder (default `/`).
    pub path: Option<String>,
}

/// Body of `POST /v1/vms/{vm}/recover-items`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverItemsRequest {
    /// The recovery point id.
    pub rp: String,
    /// The disk to read (default: the recovery point's first disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Paths inside the disk, e.g. `/p2/etc/hosts`.
    pub items: Vec<String>,
    /// Absolute folder on the node; nothing is written outside it.
    pub to: String,
    /// Node that writes (default: the node hosting the VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

pub(super) async fn browse(
    State(state): State<AppState>,
    IdPath(vm): IdPath<VmId>,
    QueryParams(query): QueryParams<BrowseQuery>,
) -> Result<Json<BrowseView>, Error> {
    let rp: RecoveryPointId = query
        .rp
        .parse()
        .map_err(|err| Error::invalid_id(format!("rp: {err}")))?;
    let path = query.path.unwrap_or_else(|| "/".into());
    let view = state
        .control
        .browse(
            &vm.to_string(),
            &rp.to_string(),
            query.disk.as_deref(),
            &path,
        )
        .await?;
    Ok(Json(view))
}

pub(super) async fn recover_items(
    State(state): State<AppState>,
    actor: Actor,
    Caller(caller): Caller,
    IdPath(vm): IdPath<VmId>,
    JsonBody(request): JsonBody<RecoverItemsRequest>,
) -> Result<(StatusCode, Json<Accepted>), Error> {
    let rp: RecoveryPointId = request
        .rp
        .parse()
        .map_err(|err| Error::invalid_id(format!("rp: {err}")))?;
    check_target_path("to", &request.to)?;
    let vm_text = vm.to_string();
    let disk = match &request.disk {
        Some(d) => d.clone(),
        None => state
            .control
            .recovery_points(&vm_text)?
            .into_iter()
            .find(|r| r.rp == rp.to_string())
            .and_then(|r| r.disks.into_iter().next())
            .map(|d| d.disk)
            .ok_or_else(|| {
                Error::invalid_request(format!("recovery point {rp} of VM {vm_text} has no disk"))
            })?,
    };
    let disk =
        DiskId::new(disk.as_str()).map_err(|err| Error::invalid_id(format!("disk: {err}")))?;
    let node = match &request.node {
        Some(text) => {
            NodeId::new(text.as_str()).map_err(|err| Error::invalid_id(format!("node: {err}")))?
        }
        None => {
            let view = state
                .control
                .vms()
                .into_iter()
                .find(|v| v.vm == vm_text)
                .ok_or_else(|| Error::invalid_request(format!("no vm {vm_text}")))?;
            NodeId::new(view.node.as_str())
                .map_err(|err| Error::invalid_id(format!("node: {err}")))?
        }
    };
    let target = RecoveryTarget::ItemLevel {
        node,
        disk,
        items: request.items,
        path: request.to,
    };
    super::scope::check_recovery_target(&caller, state.control.as_ref(), &target)?;
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
