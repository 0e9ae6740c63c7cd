//! Soft delete of recovery points and retention locks: the decisions of
//! `DeleteRecoveryPoints`, `UndeleteRecoveryPoints`, `SetRetentionLock`, `SetSoftDeletePeriod`
//! and the deleting half of `DeleteGroup`, and the rules retention and purging read. Pure.
//!
//! - A deleted recovery point stays in the catalog (listed as deleted) and in the repository
//!   until its `purge_after`; until then `UndeleteRecoveryPoints` restores it. Recoveries,
//!   restores and browsing refuse it (`rp_deleted`), retention does not count it, and the next
//!   prune job after `purge_after` removes it from the repository (`RecoveryPointsPruned`).
//! - The period is the soft-delete period of the VM's group (or, for a VM no longer in one,
//!   of the group the point was made for); 14 days when neither sets one.
//! - A retention lock of N days is a promise that the points a group made stay N days: its
//!   retention cannot be set below N, and no point younger than N days (of the group's VMs or
//!   made for the group, even after the group is deleted) can be deleted. Raising it is
//!   immediate; lowering it needs an admin and takes effect only after the old lock's period,
//!   so nobody can lower it and delete at once.
//!
//! Must not: read a clock (`now` comes in) or know who the issuer is beyond `by_admin`.

use crate::error_code::ErrorCode;
use std::collections::BTreeMap;

use cairn_schemas::{Aggregate, GroupEvent, GroupId, RecoveryPointId, VmEvent, VmId};

use super::decide::{Emit, conflict, invalid, not_found};
use super::state::{
    DAY_MS, DEFAULT_SOFT_DELETE_DAYS, Group, MAX_LOCK_DAYS, RecoveryPoint, SOFT_DELETE_DAYS, State,
};
use crate::control::ControlError;

/// Most recovery points one command may name.
const MAX_RPS_PER_COMMAND: usize = 1000;

/// The groups whose rules apply to `point` of `vm`: the VM's current live group, and the
/// group the point was made for (deleted or not).
fn groups_of<'s>(state: &'s State, vm: VmId, point: &RecoveryPoint) -> Vec<&'s Group> {
    let current = state
        .vms
        .get(&vm)
        .and_then(|v| v.group)
        .and_then(|g| state.groups.get(&g))
        .filter(|g| !g.deleted);
    let made_for = point
        .job
        .and_then(|j| state.jobs.get(&j))
        .and_then(|j| j.group)
        .and_then(|g| state.groups.get(&g));
    let mut out: Vec<&Group> = current.into_iter().collect();
    if let Some(group) = made_for
        && !out.iter().any(|g| g.id == group.id)
    {
        out.push(group);
    }
    out
}

/// The strongest lock over `point` at `now`: (days, the group that sets it).
pub fn lock_of<'s>(
    state: &'s State,
    vm: VmId,
    point: &RecoveryPoint,
    now: u64,
) -> Option<(u16, &'s Group)> {
    groups_of(state, vm, point)
        .into_iter()
        .map(|g| (g.lock_days(now), g))
        .filter(|(days, _)| *days > 0)
        .max_by_key(|(days, _)| *days)
}

/// How long a deletion of `point` stays restorable, in days.
pub fn period_of(state: &State, vm: VmId, point: &RecoveryPoint) -> u16 {
    groups_of(state, vm, point)
        .first()
        .map_or(DEFAULT_SOFT_DELETE_DAYS, |g| g.soft_delete_days)
}

/// Refuses deleting `point` while a lock holds it.
fn check_unlocked(
    state: &State,
    vm: VmId,
    point: &RecoveryPoint,
    now: u64,
) -> Result<(), ControlError> {
    if let Some((days, group)) = lock_of(state, vm, point, now) {
        let until = point.taken_at.saturating_add(u64::from(days) * DAY_MS);
        if now < until {
            return Err(conflict(
                ErrorCode::RetentionLocked,
                format!(
                    "recovery point {} is held by the retention lock of {days} days of group \
                     {:?} until {}: it cannot be deleted before then",
                    point.rp,
                    group.name,
                    crate::policy::tz::rfc3339_utc(until)
                ),
            ));
        }
    }
    Ok(())
}

fn vm_name(state: &State, vm: VmId) -> Result<&str, ControlError> {
    state
        .vms
        .get(&vm)
        .map(|v| v.name.as_str())
        .ok_or_else(|| not_found(ErrorCode::UnknownVm, format!("no VM {vm} in the inventory")))
}

fn check_list(rps: &[RecoveryPointId]) -> Result<(), ControlError> {
    if rps.is_empty() || rps.len() > MAX_RPS_PER_COMMAND {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            format!(
                "name 1 to {MAX_RPS_PER_COMMAND} recovery points (got {})",
                rps.len()
            ),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = rps.iter().find(|rp| !seen.insert(**rp)) {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            format!("recovery point {twice} is listed twice"),
        ));
    }
    Ok(())
}

/// The catalog entry of `rp`, or why there is none.
fn find<'s>(
    state: &'s State,
    vm: VmId,
    name: &str,
    rp: RecoveryPointId,
) -> Result<&'s RecoveryPoint, ControlError> {
    if let Some(point) = state
        .rps
        .get(&vm)
        .and_then(|list| list.iter().find(|r| r.rp == rp))
    {
        return Ok(point);
    }
    if let Some(purge_after) = state.purged.get(&rp) {
        return Err(conflict(
            ErrorCode::RpPurged,
            format!(
                "recovery point {rp} of VM {name} was deleted and purged after {}; it is gone",
                crate::policy::tz::rfc3339_utc(*purge_after)
            ),
        ));
    }
    Err(not_found(
        ErrorCode::UnknownRp,
        format!("VM {name} has no recovery point {rp}"),
    ))
}

/// Refuses using a deleted recovery point for a recovery, restore or browse.
pub fn check_usable(point: &RecoveryPoint, vm_name: &str) -> Result<(), ControlError> {
    match &point.deleted {
        Some(deletion) => Err(conflict(
            ErrorCode::RpDeleted,
            format!(
                "recovery point {} of VM {vm_name} was deleted by {} and cannot be used for a \
                 recovery; `cairn rp undelete {}` restores it until {}",
                point.rp,
                deletion.by,
                point.rp,
                crate::policy::tz::rfc3339_utc(deletion.purge_after)
            ),
        )),
        None => Ok(()),
    }
}

/// Deletion events of `points` of `vm`: one per distinct purge time.
fn deletion_events(
    state: &State,
    vm: VmId,
    points: &[&RecoveryPoint],
    reason: &str,
    now: u64,
) -> Vec<Emit> {
    let mut by_purge: BTreeMap<u64, Vec<RecoveryPointId>> = BTreeMap::new();
    for point in points {
        let days = period_of(state, vm, point);
        by_purge
            .entry(now.saturating_add(u64::from(days) * DAY_MS))
            .or_default()
            .push(point.rp);
    }
    let events = by_purge
        .into_iter()
        .map(|(purge_after, rps)| {
            VmEvent::RecoveryPointsDeleted {
                rps,
                purge_after,
                reason: reason.to_string(),
            }
            .into()
        })
        .collect::<Vec<_>>();
    if events.is_empty() {
        Vec::new()
    } else {
        vec![Emit::new(Aggregate::Vm(vm), events)]
    }
}

/// `DeleteRecoveryPoints`.
pub fn delete(
    state: &State,
    vm: VmId,
    rps: &[RecoveryPointId],
    now: u64,
) -> Result<Vec<Emit>, ControlError> {
    let name = vm_name(state, vm)?;
    check_list(rps)?;
    let in_use = super::protect::rps_in_use(state);
    let mut points = Vec::with_capacity(rps.len());
    for rp in rps {
        let point = find(state, vm, name, *rp)?;
        if let Some(deletion) = &point.deleted {
            return Err(conflict(
                ErrorCode::RpDeleted,
                format!(
                    "recovery point {rp} of VM {name} is already deleted (by {}; purged after {})",
                    deletion.by,
                    crate::policy::tz::rfc3339_utc(deletion.purge_after)
                ),
            ));
        }
        if in_use.contains(rp) {
            return Err(conflict(
                ErrorCode::RpInUse,
                format!(
                    "recovery point {rp} of VM {name} is being recovered; delete it once the \
                     recovery has ended"
                ),
            ));
        }
        check_unlocked(state, vm, point, now)?;
        points.push(point);
    }
    Ok(deletion_events(
        state,
        vm,
        &points,
        "recovery points deleted on request",
        now,
    ))
}

/// `UndeleteRecoveryPoints`.
pub fn undelete(
    state: &State,
    vm: VmId,
    rps: &[RecoveryPointId],
    now: u64,
) -> Result<Vec<Emit>, ControlError> {
    let name = vm_name(state, vm)?;
    check_list(rps)?;
    for rp in rps {
        let point = find(state, vm, name, *rp)?;
        let Some(deletion) = &point.deleted else {
            return Err(conflict(
                ErrorCode::RpNotDeleted,
                format!("recovery point {rp} of VM {name} is not deleted"),
            ));
        };
        if now >= deletion.purge_after {
            return Err(conflict(
                ErrorCode::RpPurged,
                format!(
                    "recovery point {rp} of VM {name} was deleted by {}; its soft-delete period \
                     ended at {} and it is being purged: it can no longer be undeleted",
                    deletion.by,
                    crate::policy::tz::rfc3339_utc(deletion.purge_after)
                ),
            ));
        }
    }
    Ok(vec![Emit::new(
        Aggregate::Vm(vm),
        vec![VmEvent::RecoveryPointsUndeleted { rps: rps.to_vec() }.into()],
    )])
}

/// The deletion of every live recovery point of `vms`, refused as a whole when a lock holds
/// any of them.
pub fn delete_all_of(
    state: &State,
    vms: &[VmId],
    reason: &str,
    now: u64,
) -> Result<Vec<Emit>, ControlError> {
    let in_use = super::protect::rps_in_use(state);
    let mut out = Vec::new();
    for vm in vms {
        let points: Vec<&RecoveryPoint> = state
            .rps
            .get(vm)
            .into_iter()
            .flatten()
            .filter(|r| r.deleted.is_none())
            .collect();
        for point in &points {
            check_unlocked(state, *vm, point, now)?;
            if in_use.contains(&point.rp) {
                return Err(conflict(
                    ErrorCode::RpInUse,
                    format!(
                        "recovery point {} of VM {} is being recovered; delete once the \
                         recovery has ended",
                        point.rp,
                        vm_name(state, *vm).unwrap_or("?")
                    ),
                ));
            }
        }
        out.extend(deletion_events(state, *vm, &points, reason, now));
    }
    Ok(out)
}

fn live_group(state: &State, group: GroupId) -> Result<&Group, ControlError> {
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

/// `SetRetentionLock`.
pub fn set_lock(
    state: &State,
    group: GroupId,
    days: u16,
    by_admin: bool,
    now: u64,
) -> Result<Vec<Emit>, ControlError> {
    let found = live_group(state, group)?;
    if days > MAX_LOCK_DAYS {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            format!("a retention lock of {days} days is longer than {MAX_LOCK_DAYS} days"),
        ));
    }
    let current = found.lock_days(now);
    let pending = found.lock_pending.filter(|p| p.effective_at > now);
    let effective_at = if days >= current {
        if days > found.policy.retention_days {
            return Err(invalid(
                ErrorCode::LockAboveRetention,
                format!(
                    "a retention lock of {days} days is longer than group {:?}'s retention of \
                     {} days; raise its retention first",
                    found.name, found.policy.retention_days
                ),
            ));
        }
        if days == current && pending.is_none() {
            return Ok(vec![]);
        }
        now
    } else {
        if !by_admin {
            return Err(ControlError::Forbidden {
                code: ErrorCode::AdminRequired,
                message: format!(
                    "lowering group {:?}'s retention lock from {current} to {days} days needs \
                     the admin role",
                    found.name
                ),
            });
        }
        if pending.is_some_and(|p| p.days == days) {
            return Ok(vec![]);
        }
        now.saturating_add(u64::from(current) * DAY_MS)
    };
    Ok(vec![Emit::new(
        Aggregate::Group(group),
        vec![GroupEvent::RetentionLockChanged { days, effective_at }.into()],
    )])
}

/// `SetSoftDeletePeriod`.
pub fn set_period(state: &State, group: GroupId, days: u16) -> Result<Vec<Emit>, ControlError> {
    let found = live_group(state, group)?;
    if !SOFT_DELETE_DAYS.contains(&days) {
        return Err(invalid(
            ErrorCode::InvalidRequest,
            format!(
                "a soft-delete period of {days} days is outside {} to {} days",
                SOFT_DELETE_DAYS.start(),
                SOFT_DELETE_DAYS.end()
            ),
        ));
    }
    if found.soft_delete_days == days {
        return Ok(vec![]);
    }
    Ok(vec![Emit::new(
        Aggregate::Group(group),
        vec![GroupEvent::SoftDeletePeriodChanged { days }.into()],
    )])
}

/// Refuses a retention below the group's lock.
pub fn check_retention(group: &Group, retention_days: u16, now: u64) -> Result<(), ControlError> {
    let lock = group.lock_days(now);
    if retention_days < lock {
        return Err(conflict(
            ErrorCode::RetentionLocked,
            format!(
                "retention of {retention_days} days is below group {:?}'s retention lock of \
                 {lock} days",
                group.name
            ),
        ));
    }
    Ok(())
}

/// The deleted recovery points of `vm` whose period ended by `now`: to purge.
pub fn purge_due(state: &State, vm: VmId, now: u64) -> Vec<RecoveryPointId> {
    state
        .rps
        .get(&vm)
        .into_iter()
        .flatten()
        .filter(|r| r.deleted.as_ref().is_some_and(|d| now >= d.purge_after))
        .map(|r| r.rp)
        .collect()
}
