//! `decide`: commands → events, or a rejection with a stable code. Pure: no IO, no clock (the
//! caller passes `now`), no randomness (ids of created things come in the command).

use crate::error_code::ErrorCode;
use std::collections::BTreeSet;

use cairn_schemas::{
    Aggregate, BackupMode, Command, DataSourceState, DiskInfo, Event, GroupEvent, GroupId,
    JobEvent, JobId, JobKind, JobReason, NodeEvent, NodeId, RecoveryTarget, VmEvent, VmId,
    VmInventory,
};

use super::state::{State, Vm};
use crate::control::ControlError;

/// Events to append to one aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct Emit {
    pub aggregate: Aggregate,
    pub events: Vec<Event>,
}

impl Emit {
    pub fn new(aggregate: Aggregate, events: Vec<Event>) -> Emit {
        Emit { aggregate, events }
    }
}

pub(super) fn not_found(code: ErrorCode, message: String) -> ControlError {
    ControlError::NotFound { code, message }
}

pub(super) fn conflict(code: ErrorCode, message: String) -> ControlError {
    ControlError::Conflict { code, message }
}

pub(super) fn invalid(code: ErrorCode, message: String) -> ControlError {
    ControlError::Invalid { code, message }
}

/// Limits on what a worker may report, so a confused or hostile worker cannot bloat the log.
const MAX_VMS_PER_NODE: usize = 10_000;
const MAX_DISKS_PER_VM: usize = 16;

pub fn decide(state: &State, command: &Command, now: u64) -> Result<Vec<Emit>, ControlError> {
    match command {
        Command::CreateToken { .. } | Command::RevokeToken { .. } => {
            super::tokens::decide(state, command, now)
        }
        Command::CreateGroup {
            group,
            name,
            members,
            policy,
        } => {
            let name = name.trim();
            if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
                return Err(invalid(
                    ErrorCode::InvalidRequest,
                    format!("group name {name:?} must be 1 to 64 printable characters"),
                ));
            }
            if let Some(existing) = state.groups.values().find(|g| !g.deleted && g.name == name) {
                return Err(conflict(
                    ErrorCode::DuplicateGroup,
                    format!("a protection group named {name:?} exists ({})", existing.id),
                ));
            }
            if state.groups.contains_key(group) {
                return Err(conflict(
                    ErrorCode::DuplicateGroup,
                    format!("group id {group} is taken"),
                ));
            }
            check_members(state, members, None)?;
            policy
                .validate()
                .map_err(|e| invalid(ErrorCode::InvalidPolicy, e.to_string()))?;
            check_repository(state, &policy.repository)?;
            Ok(vec![Emit::new(
                Aggregate::Group(*group),
                vec![
                    GroupEvent::GroupCreated {
                        name: name.to_string(),
                        members: members.clone(),
                        policy: policy.clone(),
                    }
                    .into(),
                ],
            )])
        }
        Command::ChangeGroupMembers { group, members } => {
            let current = live_group(state, *group)?;
            check_members(state, members, Some(*group))?;
            let added: Vec<VmId> = members
                .iter()
                .filter(|m| !current.members.contains(m))
                .copied()
                .collect();
            let removed: Vec<VmId> = current
                .members
                .iter()
                .filter(|m| !members.contains(m))
                .copied()
                .collect();
            if added.is_empty() && removed.is_empty() {
                return Ok(vec![]);
            }
            Ok(vec![Emit::new(
                Aggregate::Group(*group),
                vec![GroupEvent::GroupMembersChanged { added, removed }.into()],
            )])
        }
        Command::EditGroupMembers {
            group,
            add,
            remove,
            delete_recovery_points,
        } => edit_members(state, *group, add, remove, *delete_recovery_points, now),
        Command::ChangeGroupPolicy { group, policy } => {
            let current = live_group(state, *group)?;
            policy
                .validate()
                .map_err(|e| invalid(ErrorCode::InvalidPolicy, e.to_string()))?;
            super::softdelete::check_retention(current, policy.retention_days, now)?;
            // A policy that keeps its repository stays editable even if no node names it now.
            if current.policy.repository != policy.repository {
                check_repository(state, &policy.repository)?;
            }
            Ok(vec![Emit::new(
                Aggregate::Group(*group),
                vec![
                    GroupEvent::GroupPolicyChanged {
                        policy: policy.clone(),
                    }
                    .into(),
                ],
            )])
        }
        Command::DeleteGroup {
            group,
            delete_recovery_points,
        } => {
            let found = live_group(state, *group)?;
            // With its recovery points: every member's live points are soft-deleted with the
            // group (refused as a whole while the group's retention lock holds any of them).
            let deletions = if *delete_recovery_points {
                super::softdelete::delete_all_of(
                    state,
                    &found.members,
                    &format!(
                        "group {:?} was deleted with its recovery points",
                        found.name
                    ),
                    now,
                )?
            } else {
                Vec::new()
            };
            let mut out = vec![Emit::new(
                Aggregate::Group(*group),
                vec![
                    GroupEvent::GroupDeleted {
                        delete_recovery_points: *delete_recovery_points,
                    }
                    .into(),
                ],
            )];
            out.extend(deletions);
            Ok(out)
        }
        Command::DeleteRecoveryPoints { vm, rps } => {
            super::softdelete::delete(state, *vm, rps, now)
        }
        Command::UndeleteRecoveryPoints { vm, rps } => {
            super::softdelete::undelete(state, *vm, rps, now)
        }
        Command::SetRetentionLock {
            group,
            days,
            by_admin,
        } => super::softdelete::set_lock(state, *group, *days, *by_admin, now),
        Command::SetSoftDeletePeriod { group, days } => {
            super::softdelete::set_period(state, *group, *days)
        }
        Command::RequestBackup { job, vm, mode } => {
            request_backup(state, *job, *vm, *mode, JobReason::Manual, now).map(|e| vec![e])
        }
        Command::RequestConsistencyCheck { job, vm } => request_job(
            state,
            *job,
            *vm,
            JobKind::ConsistencyCheck,
            JobReason::Manual,
        )
        .map(|e| vec![e]),
        Command::RequestVerify { job, vm } => {
            request_job(state, *job, *vm, JobKind::Verify, JobReason::Manual).map(|e| vec![e])
        }
        Command::ImportSeed { job, vm, seed } => {
            check_path(seed)?;
            request_job(
                state,
                *job,
                *vm,
                JobKind::SeedImport { seed: seed.clone() },
                JobReason::Manual,
            )
            .map(|e| vec![e])
        }
        Command::ReportRepositorySpace {
            node,
            repository,
            total_bytes,
            free_bytes,
        } => {
            if !state.nodes.contains_key(node) {
                return Err(not_found(
                    ErrorCode::UnknownNode,
                    format!("node {node} reported repository space before registering"),
                ));
            }
            if repository.is_empty() || repository.len() > 4096 || free_bytes > total_bytes {
                return Err(invalid(
                    ErrorCode::InvalidRequest,
                    format!(
                        "node {node}: repository space report for {repository:?} is invalid \
                         ({free_bytes} free of {total_bytes})"
                    ),
                ));
            }
            // Small changes are not worth an event: the log records a change of 1% of the
            // filesystem or more (and every change of its size).
            if let Some(known) = state.space.get(repository)
                && known.total_bytes == *total_bytes
                && known.free_bytes.abs_diff(*free_bytes) < total_bytes / 100
            {
                return Ok(vec![]);
            }
            Ok(vec![Emit::new(
                Aggregate::Node(node.clone()),
                vec![
                    NodeEvent::RepositorySpaceReported {
                        repository: repository.clone(),
                        total_bytes: *total_bytes,
                        free_bytes: *free_bytes,
                    }
                    .into(),
                ],
            )])
        }
        Command::RequestRestore {
            job,
            vm,
            rp,
            target,
        } => {
            let known = present_vm(state, *vm)?;
            let Some(point) = state
                .rps
                .get(vm)
                .and_then(|list| list.iter().find(|r| r.rp == *rp))
            else {
                return Err(not_found(
                    ErrorCode::UnknownRp,
                    format!("VM {} has no recovery point {rp}", known.name),
                ));
            };
            super::softdelete::check_usable(point, &known.name)?;
            if state.jobs.contains_key(job) {
                return Err(conflict(
                    ErrorCode::Conflict,
                    format!("job id {job} is taken"),
                ));
            }
            match target {
                RecoveryTarget::CopyToFolder { node, path } => {
                    if !state.nodes.contains_key(node) {
                        return Err(not_found(ErrorCode::UnknownNode, format!("no node {node}")));
                    }
                    check_path(path)?;
                }
                RecoveryTarget::ItemLevel {
                    node,
                    disk,
                    items,
                    path,
                } => {
                    if !state.nodes.contains_key(node) {
                        return Err(not_found(ErrorCode::UnknownNode, format!("no node {node}")));
                    }
                    check_path(path)?;
                    check_items(items)?;
                    let rp_has_disk = state.rps.get(vm).is_some_and(|list| {
                        list.iter()
                            .any(|r| r.rp == *rp && r.disks.iter().any(|d| &d.disk == disk))
                    });
                    if !rp_has_disk {
                        return Err(not_found(
                            ErrorCode::UnknownDisk,
                            format!(
                                "recovery point {rp} of VM {} has no disk {disk}",
                                known.name
                            ),
                        ));
                    }
                }
                other => {
                    return Err(invalid(
                        ErrorCode::Unsupported,
                        format!("recovery target {other:?} is not available in this release"),
                    ));
                }
            }
            Ok(vec![Emit::new(
                Aggregate::Job(*job),
                vec![
                    JobEvent::JobRequested {
                        kind: JobKind::Recovery {
                            rp: *rp,
                            target: target.clone(),
                        },
                        vm: *vm,
                        group: known.group,
                        reason: JobReason::Manual,
                        not_before: None,
                    }
                    .into(),
                ],
            )])
        }
        Command::CancelJob { job, reason } => {
            let found = state
                .jobs
                .get(job)
                .ok_or_else(|| not_found(ErrorCode::UnknownJob, format!("no job {job}")))?;
            if found.state.is_terminal() {
                return Err(conflict(
                    ErrorCode::JobFinished,
                    format!("job {job} already ended ({:?})", found.state),
                ));
            }
            if found.cancel_requested {
                return Ok(vec![]);
            }
            Ok(vec![Emit::new(
                Aggregate::Job(*job),
                vec![
                    JobEvent::JobCancelRequested {
                        reason: reason.clone(),
                    }
                    .into(),
                ],
            )])
        }
        Command::RegisterNode {
            node,
            cluster,
            worker_version,
        } => {
            if state.nodes.get(node).is_some_and(|n| {
                &n.cluster == cluster && &n.worker_version == worker_version && n.online
            }) {
                return Ok(vec![]);
            }
            Ok(vec![Emit::new(
                Aggregate::Node(node.clone()),
                vec![
                    NodeEvent::NodeRegistered {
                        cluster: cluster.clone(),
                        worker_version: worker_version.clone(),
                    }
                    .into(),
                ],
            )])
        }
        Command::ReportInventory { node, vms } => inventory(state, node, vms),
        Command::RecordRefusedReport {
            node,
            claimed_node,
            dispatched_to,
            job,
            step,
        } => {
            // Recorded whether or not the node ever registered: a NATS identity that never
            // ran a worker sending reports is as alarming as one that did.
            Ok(vec![Emit::new(
                Aggregate::Node(node.clone()),
                vec![
                    NodeEvent::ReportRefused {
                        claimed_node: claimed_node.clone(),
                        dispatched_to: dispatched_to.clone(),
                        job: *job,
                        step: *step,
                    }
                    .into(),
                ],
            )])
        }
        Command::RegisterRepositories {
            node,
            names,
            app_owner_roots,
        } => {
            if names.len() > MAX_REPOSITORIES_PER_NODE {
                return Err(invalid(
                    ErrorCode::InvalidRequest,
                    format!(
                        "node {node} registers {} repositories, at most {MAX_REPOSITORIES_PER_NODE}",
                        names.len()
                    ),
                ));
            }
            if let Some(bad) = names.iter().find(|n| !is_repository_name(n)) {
                return Err(invalid(
                    ErrorCode::InvalidRequest,
                    format!("{bad:?} is not a repository name (A-Z a-z 0-9 . _ -, 1 to 64)"),
                ));
            }
            if app_owner_roots.len() > MAX_REPOSITORIES_PER_NODE {
                return Err(invalid(
                    ErrorCode::InvalidRequest,
                    format!(
                        "node {node} registers {} app-owner roots, at most {MAX_REPOSITORIES_PER_NODE}",
                        app_owner_roots.len()
                    ),
                ));
            }
            if let Some(bad) = app_owner_roots.iter().find(|r| !is_root_folder(r)) {
                return Err(invalid(
                    ErrorCode::InvalidRequest,
                    format!(
                        "app-owner root {bad:?} is not an absolute folder (no .., at most 4096 bytes)"
                    ),
                ));
            }
            let mut names = names.clone();
            names.sort();
            names.dedup();
            let mut app_owner_roots = app_owner_roots.clone();
            app_owner_roots.sort();
            app_owner_roots.dedup();
            if state
                .nodes
                .get(node)
                .is_some_and(|n| n.repositories == names && n.app_owner_roots == app_owner_roots)
            {
                return Ok(vec![]);
            }
            Ok(vec![Emit::new(
                Aggregate::Node(node.clone()),
                vec![
                    NodeEvent::RepositoriesRegistered {
                        names,
                        app_owner_roots,
                    }
                    .into(),
                ],
            )])
        }
        Command::RequestRecovery {
            job,
            vm,
            rp,
            target,
            options,
        } => super::recovery::decide_recovery(state, *job, *vm, *rp, target, options, None),
        Command::RequestRecoveryInZone {
            job,
            vm,
            rp,
            target,
            options,
            timezone,
        } => {
            super::recovery::decide_recovery(state, *job, *vm, *rp, target, options, Some(timezone))
        }
    }
}

/// A backup request, from a user or the scheduler.
pub fn request_backup(
    state: &State,
    job: JobId,
    vm: VmId,
    mode: BackupMode,
    reason: JobReason,
    _now: u64,
) -> Result<Emit, ControlError> {
    request_job(state, job, vm, JobKind::Backup { mode }, reason)
}

/// Whether every inconsistent disk of `vm` is inconsistent only because its change tracking
/// was lost. A backup then reads those disks whole and compares every chunk with the replica
/// (an express full), which repairs them as a consistency check would.
fn only_tracking_lost(vm: &Vm) -> bool {
    vm.disk_states
        .iter()
        .filter(|(_, s)| **s == DataSourceState::ReplicaInconsistent)
        .all(|(disk, _)| vm.tracking_lost.contains_key(disk))
}

/// A job request for `vm`, from a user, the scheduler or retention. Jobs that make a recovery
/// point exclude each other per VM, as do maintenance jobs; backups wait for an inconsistent
/// replica's consistency check (as in MABS, they could not make a trustworthy recovery point).
pub fn request_job(
    state: &State,
    job: JobId,
    vm: VmId,
    kind: JobKind,
    reason: JobReason,
) -> Result<Emit, ControlError> {
    let known = present_vm(state, vm)?;
    if state.jobs.contains_key(&job) {
        return Err(conflict(
            ErrorCode::Conflict,
            format!("job id {job} is taken"),
        ));
    }
    let protection = state.protection.get(&vm);
    let has_rps = state.rps.get(&vm).is_some_and(|l| !l.is_empty());
    let makes_rp = matches!(
        kind,
        JobKind::Backup { .. }
            | JobKind::InitialReplication
            | JobKind::ConsistencyCheck
            | JobKind::SeedImport { .. }
    );
    let active = if makes_rp {
        protection.and_then(|p| p.rp_job)
    } else if matches!(
        kind,
        JobKind::Verify | JobKind::Prune | JobKind::GarbageCollect
    ) {
        protection.and_then(|p| p.maintenance_job)
    } else {
        None
    };
    if let Some(active) = active.and_then(|id| state.jobs.get(&id)) {
        let what = if makes_rp {
            "backup or consistency check"
        } else {
            "maintenance job"
        };
        return Err(conflict(
            ErrorCode::JobRunning,
            format!(
                "a {what} of VM {} is already queued or running (job {})",
                known.name, active.id
            ),
        ));
    }
    match &kind {
        JobKind::Backup { .. } | JobKind::InitialReplication
            if protection.is_some_and(|p| p.inconsistent_since.is_some())
                && !only_tracking_lost(known) =>
        {
            return Err(conflict(
                ErrorCode::ReplicaInconsistent,
                format!(
                    "the replica of VM {} is inconsistent: backups wait for a consistency check \
                     (`cairn check {}`)",
                    known.name, known.name
                ),
            ));
        }
        JobKind::ConsistencyCheck | JobKind::Verify | JobKind::Prune if !has_rps => {
            return Err(conflict(
                ErrorCode::NoReplica,
                format!(
                    "VM {} has no replica yet; its initial replication (or a seed import) makes one",
                    known.name
                ),
            ));
        }
        JobKind::SeedImport { .. } if has_rps => {
            return Err(conflict(
                ErrorCode::HasReplica,
                format!(
                    "VM {} already has a replica; seeding is only for VMs without one",
                    known.name
                ),
            ));
        }
        _ => {}
    }
    Ok(Emit::new(
        Aggregate::Job(job),
        vec![
            JobEvent::JobRequested {
                kind,
                vm,
                group: known.group,
                reason,
                not_before: None,
            }
            .into(),
        ],
    ))
}

pub(super) fn present_vm(state: &State, vm: VmId) -> Result<&super::state::Vm, ControlError> {
    match state.vms.get(&vm) {
        None => Err(not_found(
            ErrorCode::UnknownVm,
            format!("no VM {vm} in the inventory"),
        )),
        Some(v) if !v.present => Err(conflict(
            ErrorCode::VmAbsent,
            format!(
                "VM {} ({vm}) is no longer reported by node {}",
                v.name, v.node
            ),
        )),
        Some(v) => Ok(v),
    }
}

/// Most repositories one node may register.
const MAX_REPOSITORIES_PER_NODE: usize = 256;

/// Whether `root` is an absolute folder path without `.`/`..` parts, as app-owner roots must be.
fn is_root_folder(root: &str) -> bool {
    root.starts_with('/')
        && root.len() <= 4096
        && !root.contains('\0')
        && root.split('/').all(|part| part != "." && part != "..")
}

/// A repository name as nodes register them: `[A-Za-z0-9._-]{1,64}`, not starting with '.'.
fn is_repository_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A policy's repository must be a name some node registers. An absolute path is let through
/// (groups made before repositories had names): the worker takes it only when it is a
/// registered repository's folder, and refuses the step otherwise.
fn check_repository(state: &State, repository: &str) -> Result<(), ControlError> {
    if repository.is_empty() || repository.starts_with('/') {
        return Ok(());
    }
    if state
        .nodes
        .values()
        .any(|n| n.repositories.iter().any(|r| r == repository))
    {
        return Ok(());
    }
    let mut known: Vec<&str> = state
        .nodes
        .values()
        .flat_map(|n| n.repositories.iter().map(String::as_str))
        .collect();
    known.sort();
    known.dedup();
    Err(invalid(
        ErrorCode::UnknownRepository,
        format!(
            "no node registers a repository named {repository:?} (registered: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ),
    ))
}

fn live_group(state: &State, group: GroupId) -> Result<&super::state::Group, ControlError> {
    state
        .groups
        .get(&group)
        .filter(|g| !g.deleted)
        .ok_or_else(|| {
            not_found(
                ErrorCode::UnknownGroup,
                format!("no protection group {group}"),
            )
        })
}

/// Most VMs one membership change may name.
const MAX_MEMBER_CHANGES: usize = 1000;

/// `EditGroupMembers`: the new members are checked as at creation, the removed ones must be
/// members; with `delete_recovery_points` the removed members' points are soft-deleted in the
/// same decision (all or nothing).
fn edit_members(
    state: &State,
    group: GroupId,
    add: &[VmId],
    remove: &[VmId],
    delete_recovery_points: bool,
    now: u64,
) -> Result<Vec<Emit>, ControlError> {
    let current = live_group(state, group)?;
    if add.is_empty() && remove.is_empty() {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            "name at least one VM to add or remove".into(),
        ));
    }
    if add.len() + remove.len() > MAX_MEMBER_CHANGES {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            format!("at most {MAX_MEMBER_CHANGES} VMs per change"),
        ));
    }
    if delete_recovery_points && remove.is_empty() {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            "delete_recovery_points applies to removed VMs; none is removed".into(),
        ));
    }
    let mut seen = BTreeSet::new();
    for vm in remove {
        if !seen.insert(*vm) {
            return Err(invalid(
                ErrorCode::InvalidRequest,
                format!("VM {vm} is listed twice"),
            ));
        }
        if !current.members.contains(vm) {
            let name = state
                .vms
                .get(vm)
                .map_or_else(|| vm.to_string(), |v| v.name.clone());
            return Err(invalid(
                ErrorCode::NotAMember,
                format!("VM {name} is not a member of group {:?}", current.name),
            ));
        }
    }
    if let Some(both) = add.iter().find(|vm| seen.contains(*vm)) {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            format!("VM {both} is both added and removed"),
        ));
    }
    let added: Vec<VmId> = add
        .iter()
        .filter(|vm| !current.members.contains(vm))
        .copied()
        .collect();
    check_members(state, &added, Some(group))?;
    if added.is_empty() && remove.is_empty() {
        return Ok(vec![]);
    }
    let deletions = if delete_recovery_points {
        super::softdelete::delete_all_of(
            state,
            remove,
            &format!(
                "removed from group {:?} with its recovery points",
                current.name
            ),
            now,
        )?
    } else {
        Vec::new()
    };
    let mut out = vec![Emit::new(
        Aggregate::Group(group),
        vec![
            GroupEvent::GroupMembersChanged {
                added,
                removed: remove.to_vec(),
            }
            .into(),
        ],
    )];
    out.extend(deletions);
    Ok(out)
}

fn check_members(
    state: &State,
    members: &[VmId],
    group: Option<GroupId>,
) -> Result<(), ControlError> {
    let mut seen = BTreeSet::new();
    for vm in members {
        if !seen.insert(vm) {
            return Err(invalid(
                ErrorCode::InvalidRequest,
                format!("VM {vm} is listed twice"),
            ));
        }
        let known = state.vms.get(vm).ok_or_else(|| {
            not_found(ErrorCode::UnknownVm, format!("no VM {vm} in the inventory"))
        })?;
        if let Some(other) = known.group.filter(|g| Some(*g) != group)
            && state.groups.get(&other).is_some_and(|g| !g.deleted)
        {
            let other_name = &state.groups[&other].name;
            return Err(conflict(
                ErrorCode::VmInGroup,
                format!(
                    "VM {} is already protected by group {other_name:?}",
                    known.name
                ),
            ));
        }
    }
    Ok(())
}

pub(super) fn check_path(path: &str) -> Result<(), ControlError> {
    let p = std::path::Path::new(path);
    if !p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        || path.contains('\0')
    {
        return Err(invalid(
            ErrorCode::InvalidPath,
            format!("{path:?} must be an absolute path without '..'"),
        ));
    }
    Ok(())
}

/// Most items one item-level recovery may name.
const MAX_ITEMS: usize = 1000;

/// Item paths of an item-level recovery: `/<volume>/<path>`, no `.`/`..`, no NUL, bounded.
/// The worker checks them again against the image; this refuses what can never work.
fn check_items(items: &[String]) -> Result<(), ControlError> {
    if items.is_empty() || items.len() > MAX_ITEMS {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            format!("name 1 to {MAX_ITEMS} items (got {})", items.len()),
        ));
    }
    for item in items {
        let bad = !item.starts_with('/')
            || item.len() > 4096
            || item.contains('\0')
            || item.split('/').any(|c| c == "." || c == "..")
            || item.split('/').all(str::is_empty);
        if bad {
            return Err(invalid(
                ErrorCode::InvalidPath,
                format!(
                    "item {item:?} must look like /p2/etc/hosts: a volume, then a path, without . or .."
                ),
            ));
        }
    }
    Ok(())
}

/// Turns a node's inventory report into VM events: discovered, moved, resized, removed.
fn inventory(state: &State, node: &NodeId, vms: &[VmInventory]) -> Result<Vec<Emit>, ControlError> {
    if !state.nodes.contains_key(node) {
        return Err(not_found(
            ErrorCode::UnknownNode,
            format!("node {node} reported inventory before registering"),
        ));
    }
    if vms.len() > MAX_VMS_PER_NODE {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            format!(
                "node {node} reported {} VMs; the limit is {MAX_VMS_PER_NODE}",
                vms.len()
            ),
        ));
    }
    let mut emits = Vec::new();
    let mut reported = BTreeSet::new();
    for inv in vms {
        if !reported.insert(inv.vm) {
            return Err(invalid(
                ErrorCode::InvalidRequest,
                format!("node {node} reported VM {} twice", inv.vm),
            ));
        }
        if inv.disks.is_empty()
            || inv.disks.len() > MAX_DISKS_PER_VM
            || inv.name.is_empty()
            || inv.name.len() > 128
        {
            return Err(invalid(
                ErrorCode::InvalidRequest,
                format!(
                    "node {node}: VM {} has an invalid name or disk list",
                    inv.vm
                ),
            ));
        }
        let mut events: Vec<Event> = Vec::new();
        match state.vms.get(&inv.vm) {
            None => events.push(
                VmEvent::VmDiscovered {
                    node: node.clone(),
                    name: inv.name.clone(),
                    disks: inv.disks.clone(),
                }
                .into(),
            ),
            Some(known) => {
                if &known.node != node
                    && let Some(cluster) = moved_across_clusters(state, &known.node, node)
                {
                    return Err(invalid(
                        ErrorCode::VmMovedAcrossClusters,
                        format!(
                            "node {node} (cluster {}) reports VM {} ({}), which cairn protects on \
                             node {} of cluster {cluster}; VMs move only within a cluster. Remove \
                             the VM from node {node}'s inventory, or remove it from cairn and \
                             protect it again there",
                            state.nodes[node].cluster, inv.name, inv.vm, known.node
                        ),
                    ));
                }
                if &known.node != node {
                    events.push(
                        VmEvent::VmMoved {
                            from: known.node.clone(),
                            to: node.clone(),
                        }
                        .into(),
                    );
                } else if !known.present {
                    events.push(
                        VmEvent::VmDiscovered {
                            node: node.clone(),
                            name: inv.name.clone(),
                            disks: inv.disks.clone(),
                        }
                        .into(),
                    );
                }
                if known.name != inv.name || !same_layout(&known.disks, &inv.disks) {
                    for disk in &inv.disks {
                        if let Some(old) = known.disks.iter().find(|d| d.disk == disk.disk)
                            && old.size_bytes != disk.size_bytes
                        {
                            events.push(
                                VmEvent::DiskResized {
                                    disk: disk.disk.clone(),
                                    old_size_bytes: old.size_bytes,
                                    new_size_bytes: disk.size_bytes,
                                }
                                .into(),
                            );
                            // A bitmap says nothing about a disk of another size.
                            if known.tracking.contains_key(&disk.disk) {
                                events.push(
                                    VmEvent::ChangeTrackingLost {
                                        disk: disk.disk.clone(),
                                        reason: format!(
                                            "the disk was resized from {} to {} bytes",
                                            old.size_bytes, disk.size_bytes
                                        ),
                                    }
                                    .into(),
                                );
                            }
                        }
                    }
                    events.push(
                        VmEvent::VmDiscovered {
                            node: node.clone(),
                            name: inv.name.clone(),
                            disks: inv.disks.clone(),
                        }
                        .into(),
                    );
                }
            }
        }
        if !events.is_empty() {
            emits.push(Emit::new(Aggregate::Vm(inv.vm), events));
        }
    }
    for vm in state
        .vms
        .values()
        .filter(|v| &v.node == node && v.present && !reported.contains(&v.id))
    {
        emits.push(Emit::new(
            Aggregate::Vm(vm.id),
            vec![VmEvent::VmRemoved.into()],
        ));
    }
    Ok(emits)
}

/// The cluster of `from` when `to` belongs to another one (both registered).
fn moved_across_clusters(state: &State, from: &NodeId, to: &NodeId) -> Option<String> {
    let (from, to) = (state.nodes.get(from)?, state.nodes.get(to)?);
    (from.cluster != to.cluster).then(|| from.cluster.clone())
}

fn same_layout(a: &[DiskInfo], b: &[DiskInfo]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}
