//! Glue between the projections and the pure policy planners (`crate::policy`): what the
//! scheduler, retention, capacity review and calendar need, read out of [`State`]. Pure.
//!
//! Must not: decide anything itself; it only shapes inputs and reads answers.

use std::collections::BTreeMap;

use cairn_schemas::{
    BackupMode, DataSourceState, GroupPolicy, JobKind, JobReason, RecoveryPointId, VmId,
};

use super::state::{State, Vm};
use crate::policy::capacity::{self, CapacityPlan, RpUsage, VmUsage};
use crate::policy::retention::{self, Paused, RetentionMark, RpAge};
use crate::policy::schedule::{self, ReplicaStatus, RunKind, VmHistory};
use crate::policy::tz::TimeZone;

/// The policy that governs `vm`, if it is in a live group.
pub fn policy_of<'s>(state: &'s State, vm: &Vm) -> Option<&'s GroupPolicy> {
    vm.group
        .and_then(|g| state.groups.get(&g))
        .filter(|g| !g.deleted)
        .map(|g| &g.policy)
}

/// What the scheduler needs to know about `vm`.
pub fn vm_history(state: &State, vm: &Vm) -> VmHistory {
    let protection = state.protection.get(&vm.id);
    let replica = match protection.and_then(|p| p.inconsistent_since) {
        Some(since) => ReplicaStatus::InconsistentSince(since),
        None if vm
            .disk_states
            .values()
            .all(|s| *s == DataSourceState::Protected)
            && state.rps.get(&vm.id).is_some_and(|l| !l.is_empty()) =>
        {
            ReplicaStatus::Consistent
        }
        None => ReplicaStatus::None,
    };
    VmHistory {
        replica,
        last_rp_request: protection.and_then(|p| p.last_rp_request),
        last_check_request: protection.and_then(|p| p.last_check_request),
        active: protection.is_some_and(|p| p.rp_job.is_some()),
    }
}

/// Recovery points that queued or running recoveries read.
pub fn rps_in_use(state: &State) -> Vec<RecoveryPointId> {
    state
        .jobs
        .values()
        .filter(|j| !j.state.is_terminal())
        .filter_map(|j| match &j.kind {
            JobKind::Recovery { rp, .. } => Some(*rp),
            _ => None,
        })
        .collect()
}

/// Retention marks of `vm`'s live recovery points (oldest first), `None` when it has no
/// policy. Soft-deleted points are not retention's: they are neither counted (the newest live
/// point is the protected one) nor marked; [`removals`] purges them when their period ends.
pub fn retention_marks(
    state: &State,
    vm: &Vm,
    in_use: &[RecoveryPointId],
    now: u64,
) -> Option<Vec<(RecoveryPointId, RetentionMark)>> {
    let policy = policy_of(state, vm)?;
    let rps: Vec<_> = state
        .rps
        .get(&vm.id)?
        .iter()
        .filter(|r| r.deleted.is_none())
        .collect();
    let ages: Vec<RpAge> = rps
        .iter()
        .map(|r| RpAge {
            taken_at: r.taken_at,
            in_use: in_use.contains(&r.rp),
        })
        .collect();
    let protection = state.protection.get(&vm.id);
    let paused = Paused {
        closed: protection.map_or(&[][..], |p| &p.paused[..]),
        open_since: protection.and_then(|p| p.inconsistent_since),
    };
    let marks = retention::plan(&ages, policy.retention_days, &paused, now);
    Some(rps.iter().map(|r| r.rp).zip(marks).collect())
}

/// The recovery points of `vm` that a prune removes now: those past retention, and the
/// soft-deleted ones whose period ended. The repository keeps at least one point of a disk, so
/// when that would be all of them the newest stays (deleted, purged once a newer one exists).
pub fn removals(state: &State, vm: &Vm, now: u64) -> Vec<RecoveryPointId> {
    let mut remove: Vec<RecoveryPointId> = retention_marks(state, vm, &rps_in_use(state), now)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, m)| *m == RetentionMark::Remove)
        .map(|(rp, _)| rp)
        .collect();
    remove.extend(super::softdelete::purge_due(state, vm.id, now));
    let all = state.rps.get(&vm.id).map_or(&[][..], |l| &l[..]);
    if !all.is_empty() && all.iter().all(|r| remove.contains(&r.rp)) {
        let newest = all.iter().max_by_key(|r| r.taken_at).map(|r| r.rp);
        remove.retain(|rp| Some(*rp) != newest);
    }
    remove
}

/// Capacity planning's view of one VM.
pub fn vm_usage(state: &State, vm: &Vm) -> VmUsage {
    VmUsage {
        disk_bytes: vm.disks.iter().map(|d| d.size_bytes).sum(),
        rps: state
            .rps
            .get(&vm.id)
            .map(|list| {
                list.iter()
                    .map(|r| RpUsage {
                        taken_at: r.taken_at,
                        bytes_stored: r.disks.iter().map(|d| d.bytes_stored).sum(),
                        full: r.disks.iter().all(|d| d.parent_rp.is_none()),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// The disk allocation review of a group's members on `repository`.
pub fn group_capacity(
    state: &State,
    members: &[VmId],
    policy: &GroupPolicy,
    repository: &str,
    now: u64,
) -> CapacityPlan {
    let usages: Vec<VmUsage> = members
        .iter()
        .filter_map(|vm| state.vms.get(vm))
        .map(|vm| vm_usage(state, vm))
        .collect();
    let free = state.space.get(repository).map(|s| s.free_bytes);
    capacity::plan(&usages, policy.retention_days, free, now)
}

/// Recovery points per local day of `tz`: (date, count).
pub fn calendar(state: &State, vm: VmId, tz: &TimeZone) -> BTreeMap<jiff::civil::Date, u32> {
    let mut days = BTreeMap::new();
    for rp in state.rps.get(&vm).into_iter().flatten() {
        let (day, _) = tz.local(rp.taken_at as i64);
        *days.entry(day).or_insert(0) += 1;
    }
    days
}

/// The "shared volumes" of a VM: the folders its disk images live in. Backups of VMs on the
/// same volume count against the policy's per-volume limit.
pub fn volumes(vm: &Vm) -> Vec<&str> {
    vm.disks
        .iter()
        .map(|d| d.image_path.rsplit_once('/').map_or("", |(dir, _)| dir))
        .collect()
}

/// One scheduler tick: the runs the groups' policies make due now, one at most per VM.
pub fn due_runs(state: &State, tz: &TimeZone, now: u64) -> Vec<(VmId, JobKind, JobReason)> {
    let mut out = Vec::new();
    for group in state.groups.values().filter(|g| !g.deleted) {
        let slots = schedule::group_slots(&group.policy, tz, now);
        for vm in &group.members {
            let Some(known) = state.vms.get(vm).filter(|v| v.present) else {
                continue;
            };
            let history = vm_history(state, known);
            let Some(due) = schedule::due_for_vm(&group.policy, &slots, &history, now) else {
                continue;
            };
            let (kind, reason) = match due.kind {
                RunKind::InitialReplication => (JobKind::InitialReplication, JobReason::Scheduled),
                RunKind::Sync => (
                    JobKind::Backup {
                        mode: BackupMode::Incremental,
                    },
                    JobReason::Scheduled,
                ),
                RunKind::ExpressFull => (
                    JobKind::Backup {
                        mode: BackupMode::ExpressFull,
                    },
                    JobReason::Scheduled,
                ),
                RunKind::ConsistencyCheck => {
                    (JobKind::ConsistencyCheck, JobReason::ReplicaInconsistent)
                }
            };
            out.push((known.id, kind, reason));
        }
    }
    out
}

/// One retention pass: the VMs (present, with no maintenance job running) that have recovery
/// points past retention or soft-deleted ones past their period, in or out of a group.
pub fn prune_candidates(state: &State, now: u64) -> Vec<VmId> {
    state
        .vms
        .values()
        .filter(|v| v.present)
        .filter(|v| {
            state
                .protection
                .get(&v.id)
                .is_none_or(|p| p.maintenance_job.is_none())
        })
        .filter(|v| !removals(state, v, now).is_empty())
        .map(|v| v.id)
        .collect()
}
