//! The data source state machine's reactions to job outcomes (MABS's, §9 of the notes):
//!
//! ```text
//! PendingReplicaCreation ─(initial replication starts)→ InitialReplication
//! InitialReplication ─(its recovery point commits)→ Protected ─(fails)→ PendingReplicaCreation
//! Protected ─(crash mid-backup | change tracking lost | verify finds damage | check fails)→
//!     ReplicaInconsistent ─(consistency check commits its repaired recovery point)→ Protected
//! seed import commits → ReplicaInconsistent, and a consistency check is requested at once
//! ```
//!
//! [`after_job_events`] looks at one job's freshly applied events and returns the
//! `DataSourceStateChanged` events to append to its VM, plus the jobs that must follow (the
//! mandatory check after a seed import, garbage collection after a prune). Commits set
//! `Protected` in `State::apply` itself, and `ChangeTrackingLost` sets `ReplicaInconsistent`
//! there, because those events already say so.
//!
//! Must not: append anything itself or read a clock.

use cairn_schemas::{
    Aggregate, DataSourceState, DiskId, JobEvent, JobId, JobKind, StepKind, VmEvent, VmId,
};

use crate::engine::decide::Emit;
use crate::engine::state::{State, StepStatus};

/// What the engine must do after a job's events.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FollowUp {
    /// State changes of the job's VM, as one emit on the VM aggregate (or none).
    pub emit: Option<Emit>,
    /// Request a consistency check of this VM (after a seed import).
    pub check: Option<VmId>,
    /// Request garbage collection for this VM's repository (after a prune).
    pub gc: Option<VmId>,
}

/// Reactions to `events` of `job`, which `state` already contains.
pub fn after_job_events(state: &State, job: JobId, events: &[JobEvent]) -> FollowUp {
    let mut out = FollowUp::default();
    let Some(found) = state.jobs.get(&job) else {
        return out;
    };
    let Some(vm) = state.vms.get(&found.vm) else {
        return out;
    };
    let mut changes: Vec<(DiskId, DataSourceState, String)> = Vec::new();
    let mut change = |disk: &DiskId, to: DataSourceState, reason: String| {
        let current = vm.disk_states.get(disk).copied();
        if current != Some(to) && !changes.iter().any(|(d, s, _)| d == disk && *s == to) {
            changes.push((disk.clone(), to, reason));
        }
    };
    for event in events {
        match event {
            JobEvent::JobStarted { .. } if found.makes_rp() => {
                for (disk, s) in &vm.disk_states {
                    if *s == DataSourceState::PendingReplicaCreation {
                        change(
                            disk,
                            DataSourceState::InitialReplication,
                            format!("initial replication started (job {job})"),
                        );
                    }
                }
            }
            JobEvent::ReplicaDamageFound {
                disks,
                n_damaged_chunks,
                ..
            } => {
                for disk in disks {
                    change(
                        disk,
                        DataSourceState::ReplicaInconsistent,
                        format!("verify found {n_damaged_chunks} damaged chunks (job {job})"),
                    );
                }
            }
            JobEvent::JobFailed { reason } => match &found.kind {
                JobKind::Backup { .. }
                | JobKind::InitialReplication
                | JobKind::SeedImport { .. } => {
                    let crashed: Vec<&DiskId> = found
                        .steps
                        .iter()
                        .filter(|s| s.status == StepStatus::Failed)
                        .filter(|s| {
                            s.error
                                .as_deref()
                                .is_some_and(|e| e.contains("stopped reporting"))
                        })
                        .filter_map(|s| match &s.kind {
                            StepKind::Transfer { disk } | StepKind::ImportSeed { disk } => {
                                Some(disk)
                            }
                            _ => None,
                        })
                        .collect();
                    for (disk, s) in &vm.disk_states {
                        if *s == DataSourceState::InitialReplication {
                            change(
                                disk,
                                DataSourceState::PendingReplicaCreation,
                                format!("initial replication failed: {reason}"),
                            );
                        } else if *s == DataSourceState::Protected && crashed.contains(&disk) {
                            change(
                                disk,
                                DataSourceState::ReplicaInconsistent,
                                format!(
                                    "the backup crashed while transferring this disk (job {job})"
                                ),
                            );
                        }
                    }
                }
                JobKind::ConsistencyCheck => {
                    for disk in vm.disk_states.keys() {
                        change(
                            disk,
                            DataSourceState::ReplicaInconsistent,
                            format!("consistency check failed: {reason}"),
                        );
                    }
                }
                _ => {}
            },
            JobEvent::JobSucceeded => match &found.kind {
                JobKind::SeedImport { .. } => {
                    for disk in vm.disk_states.keys() {
                        change(
                            disk,
                            DataSourceState::ReplicaInconsistent,
                            "replica seeded from a folder: a consistency check is mandatory \
                             before protection starts"
                                .into(),
                        );
                    }
                    out.check = Some(vm.id);
                }
                JobKind::Prune => out.gc = Some(vm.id),
                _ => {}
            },
            _ => {}
        }
    }
    if !changes.is_empty() {
        out.emit = Some(Emit::new(
            Aggregate::Vm(vm.id),
            changes
                .into_iter()
                .map(|(disk, state, reason)| {
                    VmEvent::DataSourceStateChanged {
                        disk,
                        state,
                        reason,
                    }
                    .into()
                })
                .collect(),
        ));
    }
    out
}
