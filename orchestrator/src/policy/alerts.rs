//! Alerts: `Critical`, `Warning` and `Info` conditions, raised and resolved by events and kept
//! as a projection (so they are rebuilt by replay like everything else). Each alert has a key
//! (kind + subject): a condition that happens again updates its alert instead of adding one,
//! and the event that ends the condition resolves it (a later successful backup resolves a
//! failed-backup alert, a repaired replica resolves the inconsistency alert). Every alert says
//! what to do about it.
//!
//! Must not: notify anyone (notifications are effects of the committed events) or read a
//! clock: `on_event` is part of `State::apply`.

use std::collections::BTreeMap;

use cairn_schemas::{
    Aggregate, DataSourceState, Event, JobEvent, JobKind, NodeEvent, VmEvent, VmId,
};
use serde::{Deserialize, Serialize};

use crate::engine::state::State;

/// How bad it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    Critical,
    Warning,
    Info,
}

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AlertKind {
    ReplicaInconsistent,
    ReplicaDamaged,
    BackupFailed,
    CheckFailed,
    RecoveryFailed,
    MaintenanceFailed,
    StorageLow,
    CheckRepaired,
    /// A node's identity sent a report about another node's work.
    ForeignReport,
    /// Recovery points were soft-deleted; resolved when none of the VM's is deleted any more
    /// (undeleted, or purged).
    RecoveryPointsDeleted,
}

/// One alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub id: u64,
    pub kind: AlertKind,
    pub severity: Severity,
    /// A VM id or a repository location.
    pub subject: String,
    pub vm: Option<VmId>,
    pub message: String,
    pub recommended_action: String,
    pub raised_at: u64,
    pub updated_at: u64,
    /// How often the condition was seen while the alert was active.
    pub occurrences: u32,
    pub resolved_at: Option<u64>,
    pub resolution: Option<String>,
}

/// Informational alerts stop being active after this long (MABS lets them lapse too).
pub const INFO_LIFETIME_MS: u64 = 3 * 86_400_000;
/// Resolved alerts kept for `cairn alerts --all`; older ones are dropped.
const MAX_RESOLVED: usize = 1_000;

/// The alert projection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alerts {
    /// Active alerts by (kind, subject).
    pub active: BTreeMap<(AlertKind, String), Alert>,
    /// Resolved alerts, oldest first.
    pub resolved: Vec<Alert>,
    next_id: u64,
}

impl Alert {
    /// Whether the alert is active at `now` (info alerts lapse).
    pub fn is_active(&self, now: u64) -> bool {
        self.resolved_at.is_none()
            && !(self.severity == Severity::Info
                && now.saturating_sub(self.raised_at) > INFO_LIFETIME_MS)
    }
}

impl Alerts {
    #[allow(clippy::too_many_arguments)] // reason: one call site per rule, all fields named
    fn raise(
        &mut self,
        kind: AlertKind,
        severity: Severity,
        subject: String,
        vm: Option<VmId>,
        message: String,
        recommended_action: String,
        at: u64,
    ) {
        match self.active.get_mut(&(kind, subject.clone())) {
            Some(alert) => {
                alert.severity = severity;
                alert.message = message;
                alert.recommended_action = recommended_action;
                alert.updated_at = at;
                alert.occurrences += 1;
            }
            None => {
                self.next_id += 1;
                self.active.insert(
                    (kind, subject.clone()),
                    Alert {
                        id: self.next_id,
                        kind,
                        severity,
                        subject,
                        vm,
                        message,
                        recommended_action,
                        raised_at: at,
                        updated_at: at,
                        occurrences: 1,
                        resolved_at: None,
                        resolution: None,
                    },
                );
            }
        }
    }

    fn resolve(&mut self, kind: AlertKind, subject: &str, resolution: String, at: u64) {
        if let Some(mut alert) = self.active.remove(&(kind, subject.to_owned())) {
            alert.resolved_at = Some(at);
            alert.resolution = Some(resolution);
            self.resolved.push(alert);
            if self.resolved.len() > MAX_RESOLVED {
                let excess = self.resolved.len() - MAX_RESOLVED;
                self.resolved.drain(..excess);
            }
        }
    }
}

fn vm_name(state: &State, vm: VmId) -> String {
    state
        .vms
        .get(&vm)
        .map_or_else(|| vm.to_string(), |v| v.name.clone())
}

fn auto_check(state: &State, vm: VmId) -> bool {
    state
        .vms
        .get(&vm)
        .and_then(|v| v.group)
        .and_then(|g| state.groups.get(&g))
        .is_some_and(|g| !g.deleted && g.policy.consistency_check.when_inconsistent)
}

/// Raises or resolves the alerts that `event` (already applied) concerns.
pub fn on_event(state: &mut State, aggregate: &Aggregate, event: &Event, at: u64) {
    match (aggregate, event) {
        (Aggregate::Vm(vm), Event::Vm(e)) => {
            if let VmEvent::RecoveryPointsDeleted {
                rps, purge_after, ..
            } = e
            {
                deletion_alert(state, *vm, rps.len(), *purge_after, at);
                return;
            }
            if let VmEvent::RecoveryPointsUndeleted { .. } = e {
                resolve_deletion(state, *vm, "the deleted recovery points were undeleted", at);
                return;
            }
            let reason = match e {
                VmEvent::DataSourceStateChanged { disk, reason, .. } => format!("{disk}: {reason}"),
                VmEvent::ChangeTrackingLost { disk, reason } => {
                    format!("{disk}: change tracking lost ({reason})")
                }
                _ => return,
            };
            replica_alert(state, *vm, &reason, at);
        }
        (Aggregate::Job(job), Event::Job(e)) => {
            let Some(found) = state.jobs.get(job) else {
                return;
            };
            let (vm, kind) = (found.vm, found.kind.clone());
            let name = vm_name(state, vm);
            let subject = vm.to_string();
            match e {
                JobEvent::JobFailed { reason } => {
                    let (alert, severity, what, action) = match kind {
                        JobKind::Backup { .. } | JobKind::InitialReplication => (
                            AlertKind::BackupFailed,
                            Severity::Critical,
                            "Backup",
                            format!(
                                "Fix the cause above, then run `cairn backup {name}`; the next \
                                 scheduled synchronization also retries"
                            ),
                        ),
                        JobKind::ConsistencyCheck => (
                            AlertKind::CheckFailed,
                            Severity::Critical,
                            "Consistency check",
                            format!("Fix the cause above, then run `cairn check {name}`"),
                        ),
                        JobKind::SeedImport { .. } => (
                            AlertKind::BackupFailed,
                            Severity::Critical,
                            "Seed import",
                            "Check the seed folder, then run `cairn seed import` again".into(),
                        ),
                        JobKind::Recovery { .. } => (
                            AlertKind::RecoveryFailed,
                            Severity::Critical,
                            "Recovery",
                            "Fix the cause above and start the recovery again".into(),
                        ),
                        _ => (
                            AlertKind::MaintenanceFailed,
                            Severity::Warning,
                            "Maintenance",
                            "Check the repository (`cairn repo verify`); the job runs again on \
                             its next occasion"
                                .into(),
                        ),
                    };
                    state.alerts.raise(
                        alert,
                        severity,
                        subject,
                        Some(vm),
                        format!("{what} of VM {name} failed: {reason}"),
                        action,
                        at,
                    );
                }
                JobEvent::JobSucceeded => {
                    let resolved = match kind {
                        JobKind::Recovery { .. } => Some(AlertKind::RecoveryFailed),
                        JobKind::Verify | JobKind::Prune | JobKind::GarbageCollect => {
                            Some(AlertKind::MaintenanceFailed)
                        }
                        _ => None,
                    };
                    if let Some(alert) = resolved {
                        state
                            .alerts
                            .resolve(alert, &subject, format!("job {job} succeeded"), at);
                    }
                }
                JobEvent::RecoveryPointsPruned { .. } => {
                    resolve_deletion(state, vm, "the deleted recovery points were purged", at);
                }
                JobEvent::RecoveryPointCommitted { rp, .. } => {
                    let by = format!("recovery point {rp} committed by job {job}");
                    state
                        .alerts
                        .resolve(AlertKind::BackupFailed, &subject, by.clone(), at);
                    if kind == JobKind::ConsistencyCheck {
                        state
                            .alerts
                            .resolve(AlertKind::CheckFailed, &subject, by, at);
                    }
                    replica_alert(state, vm, "", at);
                }
                JobEvent::ConsistencyChecked {
                    chunks_compared,
                    chunks_differing,
                    bytes_stored,
                    ..
                } => {
                    state.alerts.raise(
                        AlertKind::CheckRepaired,
                        Severity::Info,
                        subject,
                        Some(vm),
                        format!(
                            "Consistency check of VM {name} compared {chunks_compared} chunks; \
                             {chunks_differing} differed and were stored again ({bytes_stored} \
                             bytes)"
                        ),
                        "None needed".into(),
                        at,
                    );
                }
                JobEvent::ReplicaDamageFound {
                    rps,
                    n_damaged_chunks,
                    ..
                } => {
                    let action = if auto_check(state, vm) {
                        format!(
                            "A consistency check runs automatically and repairs the replica; \
                             `cairn check {name}` runs it now. Older recovery points with damaged \
                             chunks cannot be restored in full"
                        )
                    } else {
                        format!("Run `cairn check {name}` to repair the replica")
                    };
                    state.alerts.raise(
                        AlertKind::ReplicaDamaged,
                        Severity::Critical,
                        subject,
                        Some(vm),
                        format!(
                            "Verify found {n_damaged_chunks} damaged chunks in {} recovery points \
                             of VM {name}",
                            rps.len()
                        ),
                        action,
                        at,
                    );
                    // The inconsistency alert follows with the data source state change.
                }
                _ => {}
            }
        }
        (
            Aggregate::Node(_),
            Event::Node(NodeEvent::RepositorySpaceReported {
                repository,
                total_bytes,
                free_bytes,
            }),
        ) => {
            let low = *total_bytes > 0 && free_bytes.saturating_mul(10) < *total_bytes;
            if low {
                state.alerts.raise(
                    AlertKind::StorageLow,
                    Severity::Warning,
                    repository.clone(),
                    None,
                    format!(
                        "Repository {repository} has {free_bytes} of {total_bytes} bytes free \
                         (under 10%)"
                    ),
                    "Add storage or shorten retention; `cairn group plan GROUP` shows what each \
                     group needs"
                        .into(),
                    at,
                );
            } else {
                state.alerts.resolve(
                    AlertKind::StorageLow,
                    repository,
                    "free space is above 10% again".into(),
                    at,
                );
            }
        }
        (
            Aggregate::Node(node),
            Event::Node(NodeEvent::ReportRefused {
                claimed_node,
                dispatched_to,
                job,
                step,
            }),
        ) => {
            // The node whose work the report was about: the one it named, or (when it named
            // its sender) the one its step was dispatched to.
            let target = match dispatched_to {
                Some(to) if claimed_node == node => to,
                _ => claimed_node,
            };
            let whose = match dispatched_to {
                Some(to) => format!("step {step} of job {job}, dispatched to node {to}"),
                None => format!("step {step} of job {job}, which does not exist"),
            };
            state.alerts.raise(
                AlertKind::ForeignReport,
                Severity::Critical,
                node.to_string(),
                None,
                format!(
                    "Node {node} reported for node {target} (its report named node \
                     {claimed_node}, for {whose}); the report was refused"
                ),
                format!(
                    "Only node {node}'s NATS identity can publish on its report subject: check \
                     that host for compromise, and if in doubt give the node new credentials \
                     (`cairn ops nats-add-node {node} --renew`) and restart its worker"
                ),
                at,
            );
        }
        _ => {}
    }
}

/// Announces a soft deletion: a Warning (deleting recovery points is what an attacker or a
/// mistake does first), naming who deleted them and until when they can be undeleted. It
/// reads the deletion from the projection, which `apply` updated just before.
fn deletion_alert(state: &mut State, vm: VmId, n_rps: usize, purge_after: u64, at: u64) {
    let name = vm_name(state, vm);
    let by = state
        .rps
        .get(&vm)
        .into_iter()
        .flatten()
        .filter_map(|r| r.deleted.as_ref())
        .filter(|d| d.at == at)
        .map(|d| d.by.clone())
        .next()
        .unwrap_or_else(|| "unknown".into());
    let n_deleted = state
        .rps
        .get(&vm)
        .into_iter()
        .flatten()
        .filter(|r| r.deleted.is_some())
        .count();
    let until = crate::policy::tz::rfc3339_utc(purge_after);
    state.alerts.raise(
        AlertKind::RecoveryPointsDeleted,
        Severity::Warning,
        vm.to_string(),
        Some(vm),
        format!(
            "{n_rps} recovery points of VM {name} deleted by {by}, purged after {until}              ({n_deleted} deleted in all)"
        ),
        format!(
            "If this was not intended, `cairn rp list {name}` shows them and `cairn rp undelete              {name} RP` restores each until {until}"
        ),
        at,
    );
}

/// Resolves the deletion alert of `vm` once none of its recovery points is deleted.
fn resolve_deletion(state: &mut State, vm: VmId, why: &str, at: u64) {
    let any_deleted = state
        .rps
        .get(&vm)
        .into_iter()
        .flatten()
        .any(|r| r.deleted.is_some());
    if !any_deleted {
        state.alerts.resolve(
            AlertKind::RecoveryPointsDeleted,
            &vm.to_string(),
            why.into(),
            at,
        );
    }
}

/// Raises the inconsistency alert of `vm` when its replica is inconsistent, resolves it (and
/// the damage alert) when it is consistent again.
fn replica_alert(state: &mut State, vm: VmId, reason: &str, at: u64) {
    let inconsistent = state.vms.get(&vm).is_some_and(|v| {
        v.disk_states
            .values()
            .any(|s| *s == DataSourceState::ReplicaInconsistent)
    });
    let subject = vm.to_string();
    let name = vm_name(state, vm);
    if inconsistent {
        if state
            .alerts
            .active
            .contains_key(&(AlertKind::ReplicaInconsistent, subject.clone()))
            || reason.is_empty()
        {
            return;
        }
        let action = if auto_check(state, vm) {
            format!(
                "A consistency check runs automatically; `cairn check {name}` runs it now. \
                 Backups wait until the replica is consistent; recoveries from existing recovery \
                 points work"
            )
        } else {
            format!(
                "Run `cairn check {name}`: backups wait until the replica is consistent; \
                 recoveries from existing recovery points work"
            )
        };
        state.alerts.raise(
            AlertKind::ReplicaInconsistent,
            Severity::Critical,
            subject,
            Some(vm),
            format!("Replica of VM {name} is inconsistent ({reason})"),
            action,
            at,
        );
    } else {
        for kind in [AlertKind::ReplicaInconsistent, AlertKind::ReplicaDamaged] {
            state
                .alerts
                .resolve(kind, &subject, "the replica is consistent again".into(), at);
        }
    }
}
