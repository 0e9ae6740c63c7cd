//! Read models of protection policies: a group with its policy, schedule and members'
//! retention; the disk allocation review; alerts; the recovery point calendar. Pure: state and
//! `now` in, views out.

use cairn_schemas::{DataSourceState, GroupId, VmId};

use super::protect;
use super::state::{Group, State};
use crate::policy::alerts::Alert;
use crate::policy::retention::RetentionMark;
use crate::policy::schedule;
use crate::policy::tz::TimeZone;
use crate::views::{
    AlertView, CalendarDayView, CapacityView, GroupDetailView, MemberView, PolicyView,
};

fn worst_state(states: impl Iterator<Item = DataSourceState>) -> DataSourceState {
    let rank = |s: &DataSourceState| match s {
        DataSourceState::ReplicaInconsistent => 0,
        DataSourceState::PendingReplicaCreation => 1,
        DataSourceState::InitialReplication => 2,
        DataSourceState::Protected => 3,
    };
    states
        .min_by_key(rank)
        .unwrap_or(DataSourceState::PendingReplicaCreation)
}

/// Finds a live group by id.
pub fn live_group(state: &State, id: GroupId) -> Option<&Group> {
    state.groups.get(&id).filter(|g| !g.deleted)
}

pub fn group_detail(
    state: &State,
    group: &Group,
    repository: &str,
    tz: &TimeZone,
    now: u64,
) -> GroupDetailView {
    let in_use = protect::rps_in_use(state);
    let mut policy = PolicyView::from_policy(&group.policy);
    if policy.repository.is_empty() {
        policy.repository = repository.to_owned();
    }
    let members = group
        .members
        .iter()
        .filter_map(|vm| state.vms.get(vm))
        .map(|vm| {
            let marks = protect::retention_marks(state, vm, &in_use, now).unwrap_or_default();
            let count =
                |f: fn(&RetentionMark) -> bool| marks.iter().filter(|(_, m)| f(m)).count() as u64;
            MemberView {
                vm: vm.id.to_string(),
                name: vm.name.clone(),
                state: format!("{:?}", worst_state(vm.disk_states.values().copied())),
                last_backup_at: vm.last_backup_at,
                recovery_points: state.rps.get(&vm.id).map_or(0, |l| l.len() as u64),
                keep: count(|m| *m == RetentionMark::Keep),
                protected: count(|m| matches!(m, RetentionMark::Protected(_))),
                remove: count(|m| *m == RetentionMark::Remove),
                retention_paused_since: state
                    .protection
                    .get(&vm.id)
                    .and_then(|p| p.inconsistent_since),
            }
        })
        .collect();
    GroupDetailView {
        group: group.id.to_string(),
        name: group.name.clone(),
        created_at: group.created_at,
        policy,
        timezone: tz.to_string(),
        next_sync: schedule::next_sync(&group.policy, tz, now),
        next_recovery_point: schedule::next_wall_slot(&group.policy.recovery_points, tz, now),
        members,
        retention_lock_days: group.lock_days(now),
        retention_lock_pending: group
            .lock_pending
            .filter(|p| p.effective_at > now)
            .map(|p| crate::views::PendingLockView {
                days: p.days,
                effective_at: p.effective_at,
            }),
        soft_delete_days: group.soft_delete_days,
    }
}

pub fn group_plan(state: &State, group: &Group, repository: &str, now: u64) -> CapacityView {
    let plan = protect::group_capacity(state, &group.members, &group.policy, repository, now);
    CapacityView {
        group: group.id.to_string(),
        name: group.name.clone(),
        repository: repository.to_owned(),
        retention_days: group.policy.retention_days,
        data_bytes: plan.data_bytes,
        replica_bytes: plan.replica_bytes,
        stored_bytes: plan.stored_bytes,
        churn_bytes_per_day: plan.churn_bytes_per_day,
        churn_measured: plan.churn_measured,
        recommended_bytes: plan.recommended_bytes,
        free_bytes: plan.free_bytes,
        under_provisioned_bytes: plan.under_provisioned_bytes,
        overlay_bytes: plan.overlay_bytes,
    }
}

fn alert_view(state: &State, alert: &Alert, now: u64) -> AlertView {
    AlertView {
        id: alert.id,
        severity: format!("{:?}", alert.severity),
        kind: format!("{:?}", alert.kind),
        subject: alert.subject.clone(),
        vm_name: alert
            .vm
            .and_then(|vm| state.vms.get(&vm))
            .map(|v| v.name.clone()),
        message: alert.message.clone(),
        recommended_action: alert.recommended_action.clone(),
        raised_at: alert.raised_at,
        updated_at: alert.updated_at,
        occurrences: alert.occurrences,
        active: alert.is_active(now),
        resolved_at: alert.resolved_at,
        resolution: alert.resolution.clone(),
    }
}

/// Active alerts, most severe and newest first; with `all`, resolved ones after them.
pub fn alerts(state: &State, all: bool, now: u64) -> Vec<AlertView> {
    let mut active: Vec<&Alert> = state
        .alerts
        .active
        .values()
        .filter(|a| all || a.is_active(now))
        .collect();
    active.sort_by(|a, b| {
        (a.severity, std::cmp::Reverse(a.raised_at))
            .cmp(&(b.severity, std::cmp::Reverse(b.raised_at)))
    });
    let mut views: Vec<AlertView> = active
        .into_iter()
        .map(|a| alert_view(state, a, now))
        .collect();
    if all {
        views.extend(
            state
                .alerts
                .resolved
                .iter()
                .rev()
                .map(|a| alert_view(state, a, now)),
        );
    }
    views
}

pub fn calendar(state: &State, vm: VmId, tz: &TimeZone) -> Vec<CalendarDayView> {
    protect::calendar(state, vm, tz)
        .into_iter()
        .map(|(day, count)| CalendarDayView {
            date: day.strftime("%Y-%m-%d").to_string(),
            recovery_points: count,
        })
        .collect()
}
