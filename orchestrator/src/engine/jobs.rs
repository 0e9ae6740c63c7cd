//! Jobs as step plans, driven by a pure reconciler.
//!
//! [`reconcile`] looks at one job in the current state and returns the events that move it on:
//! start it when its node has room, dispatch the steps whose predecessors are done, time out
//! steps that stopped reporting, schedule retries, run `always` steps (release a snapshot) even
//! after a failure or a cancel, and end the job. [`on_report`] turns a worker's report into
//! events, ignoring reports of superseded attempts or epochs. Both are pure; the engine applies
//! their events and calls them again until nothing changes.
//!
//! A backup of a VM with disks d0, d1 is
//! `Snapshot → Transfer(d0) ∥ Transfer(d1) → ReleaseSnapshot (always) → CommitRecoveryPoint`.
//! Its recovery point id is derived from the job id, so a retried transfer finds what an earlier
//! attempt stored and no job ever commits two recovery points.

use std::collections::HashMap;

use cairn_schemas::{
    BackupMode, CommittedDisk, Consistency, ConsistencyWanted, DiskId, DiskSource, FailureClass,
    ImageFormat, JobEvent, JobKind, JobState, NodeId, PlannedStep, RecoveryPointId, RecoveryTarget,
    Report, ReportBody, StepId, StepKind, StepResult, StepSpec, StepWork, VmId, WaitReason,
};

use super::state::{Job, RecoveryPoint, State, Step, StepStatus, Vm};

/// Tunables of the job engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Repository path used when a group's policy names none.
    pub repository: String,
    pub chunk_size: u32,
    /// A step with no report for this long is timed out and retried.
    pub heartbeat_timeout_ms: u64,
    /// How long steps dispatched by an earlier epoch get before they count as lost. The
    /// embedded server restarts with its worker, so there it is short.
    pub orphan_grace_ms: u64,
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to five minutes.
    pub retry_base_ms: u64,
    pub backups_per_node: usize,
    pub recoveries_per_node: usize,
    /// The zone protection-group schedules are written in.
    pub timezone: crate::policy::tz::TimeZone,
    /// How often (clock time) retention looks for recovery points to prune.
    pub retention_every_ms: u64,
    /// Number of partitions VMs, groups and nodes hash into (fixed for a cluster's life).
    pub partitions: std::num::NonZeroU16,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            repository: String::new(),
            chunk_size: 64 * 1024,
            heartbeat_timeout_ms: 60_000,
            orphan_grace_ms: 60_000,
            max_attempts: 5,
            retry_base_ms: 2_000,
            backups_per_node: 3,
            recoveries_per_node: 8,
            timezone: crate::policy::tz::TimeZone::UTC,
            retention_every_ms: 60_000,
            partitions: cairn_schemas::subjects::DEFAULT_PARTITIONS,
        }
    }
}

/// What the engine knows beyond the log: when each in-flight step last reported in this
/// process, and when this process started.
#[derive(Debug, Default, Clone)]
pub struct Liveness {
    pub last_report: HashMap<(StepId, u32), u64>,
    pub started_at: u64,
    /// When each node's last refused report was recorded.
    pub last_refused: HashMap<NodeId, u64>,
}

/// The recovery point a backup job commits: the job id's bytes.
pub fn rp_of(job: &Job) -> RecoveryPointId {
    RecoveryPointId::from_bytes(*job.id.as_bytes()).expect("a job id is a v7 uuid")
}

/// Step ids derived from the job id, so planning needs no randomness.
fn step_id(job: &Job, index: u8) -> StepId {
    let mut bytes = *job.id.as_bytes();
    bytes[15] = bytes[15].wrapping_add(index + 1);
    StepId::from_bytes(bytes).expect("still a v7 uuid")
}

/// One step per disk of `vm`, of the kind `make` builds, with no order between them.
fn per_disk(
    job: &Job,
    vm: &Vm,
    first_index: u8,
    make: impl Fn(DiskId) -> StepKind,
) -> Vec<PlannedStep> {
    vm.disks
        .iter()
        .enumerate()
        .map(|(i, d)| PlannedStep {
            step: step_id(job, first_index + i as u8),
            kind: make(d.disk.clone()),
            after: vec![],
            always: false,
        })
        .collect()
}

/// The disks a recovery of `rp` writes: the recovery point's disks (from the catalog), or the
/// VM's disks when the catalog does not list them.
fn recovery_disks(vm: &Vm, rp: RecoveryPointId, rps: &[RecoveryPoint]) -> Vec<DiskId> {
    rps.iter()
        .find(|r| r.rp == rp)
        .map(|r| r.disks.iter().map(|d| d.disk.clone()).collect::<Vec<_>>())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| vm.disks.iter().map(|d| d.disk.clone()).collect())
}

/// A recovery: `PrepareRecovery → Restore(d0) ∥ Restore(d1) → FinishRecovery`. Jobs of the
/// first release (restore steps only) keep the plan their `JobStarted` recorded.
fn recovery_plan(job: &Job, _vm: &Vm, disks: &[DiskId]) -> Vec<PlannedStep> {
    let prepare = step_id(job, 0);
    let mut steps = vec![PlannedStep {
        step: prepare,
        kind: StepKind::PrepareRecovery,
        after: vec![],
        always: false,
    }];
    let mut restores = Vec::new();
    for (i, disk) in disks.iter().enumerate() {
        let id = step_id(job, 3 + i as u8);
        restores.push(id);
        steps.push(PlannedStep {
            step: id,
            kind: StepKind::Restore { disk: disk.clone() },
            after: vec![prepare],
            always: false,
        });
    }
    steps.push(PlannedStep {
        step: step_id(job, 1),
        kind: StepKind::FinishRecovery,
        after: restores,
        always: false,
    });
    steps
}

/// The node that runs a job's steps: the target node of a recovery elsewhere, else the VM's.
pub fn job_node(job: &Job, vm: &Vm) -> NodeId {
    match &job.kind {
        JobKind::Recovery {
            target:
                RecoveryTarget::AlternateHost { node, .. }
                | RecoveryTarget::CopyToFolder { node, .. }
                | RecoveryTarget::ItemLevel { node, .. },
            ..
        } => node.clone(),
        _ => vm.node.clone(),
    }
}

/// Whether `job` overwrites its VM's own disks.
pub fn writes_original(job: &Job) -> bool {
    matches!(
        job.kind,
        JobKind::Recovery {
            target: RecoveryTarget::OriginalVm,
            ..
        }
    )
}

/// The plan of a job for its VM.
///
/// A consistency check is planned like a backup whose transfers are `CheckDisk` steps:
/// `Snapshot → CheckDisk(d0) ∥ CheckDisk(d1) → ReleaseSnapshot (always) → CommitRecoveryPoint`.
/// Verify and prune run one step per disk, gc one step, a seed import
/// `ImportSeed(d0) ∥ ImportSeed(d1) → CommitRecoveryPoint`.
pub fn plan(job: &Job, vm: &Vm, rps: &[RecoveryPoint]) -> Vec<PlannedStep> {
    match &job.kind {
        JobKind::Verify => per_disk(job, vm, 0, |disk| StepKind::VerifyDisk { disk }),
        JobKind::Prune => per_disk(job, vm, 0, |disk| StepKind::Prune { disk }),
        JobKind::GarbageCollect => vec![PlannedStep {
            step: step_id(job, 0),
            kind: StepKind::CollectGarbage,
            after: vec![],
            always: false,
        }],
        JobKind::SeedImport { .. } => {
            let mut steps = per_disk(job, vm, 3, |disk| StepKind::ImportSeed { disk });
            let after = steps.iter().map(|s| s.step).collect();
            steps.push(PlannedStep {
                step: step_id(job, 2),
                kind: StepKind::CommitRecoveryPoint,
                after,
                always: false,
            });
            steps
        }
        JobKind::Recovery {
            target: RecoveryTarget::ItemLevel { disk, .. },
            ..
        } => vec![PlannedStep {
            step: step_id(job, 0),
            kind: StepKind::ExtractItems { disk: disk.clone() },
            after: vec![],
            always: false,
        }],
        JobKind::Recovery { rp, .. } => recovery_plan(job, vm, &recovery_disks(vm, *rp, rps)),
        _ => {
            let snapshot = step_id(job, 0);
            let mut steps = vec![PlannedStep {
                step: snapshot,
                kind: StepKind::Snapshot,
                after: vec![],
                always: false,
            }];
            let mut transfers = Vec::new();
            let check = job.kind == JobKind::ConsistencyCheck;
            for (i, d) in vm.disks.iter().enumerate() {
                let id = step_id(job, 3 + i as u8);
                transfers.push(id);
                let disk = d.disk.clone();
                steps.push(PlannedStep {
                    step: id,
                    kind: if check {
                        StepKind::CheckDisk { disk }
                    } else {
                        StepKind::Transfer { disk }
                    },
                    after: vec![snapshot],
                    always: false,
                });
            }
            let release = step_id(job, 1);
            let mut release_after = vec![snapshot];
            release_after.extend(transfers.iter().copied());
            steps.push(PlannedStep {
                step: release,
                kind: StepKind::ReleaseSnapshot,
                after: release_after,
                always: true,
            });
            steps.push(PlannedStep {
                step: step_id(job, 2),
                kind: StepKind::CommitRecoveryPoint,
                after: vec![release],
                always: false,
            });
            steps
        }
    }
}

/// Events that move `job` on, given the state and the time.
pub fn reconcile(
    state: &State,
    cfg: &EngineConfig,
    epoch: u64,
    job: &Job,
    live: &Liveness,
    now: u64,
) -> Vec<JobEvent> {
    match job.state {
        JobState::Succeeded | JobState::Failed | JobState::Cancelled => vec![],
        JobState::Scheduled | JobState::Queued => start(state, cfg, epoch, job, now),
        JobState::Running | JobState::Retrying => advance(state, cfg, epoch, job, live, now),
    }
}

fn start(state: &State, cfg: &EngineConfig, epoch: u64, job: &Job, now: u64) -> Vec<JobEvent> {
    if job.cancel_requested {
        return vec![JobEvent::JobCancelled];
    }
    if job.not_before.is_some_and(|t| t > now) {
        return vec![];
    }
    let Some(vm) = state.vms.get(&job.vm).filter(|v| v.present) else {
        return vec![JobEvent::JobFailed {
            reason: format!("VM {} is not in the inventory of any node", job.vm),
        }];
    };
    let queue = |wait: WaitReason| {
        if job.wait.as_ref() == Some(&wait) && job.state == JobState::Queued {
            vec![]
        } else {
            vec![JobEvent::JobQueued { wait: Some(wait) }]
        }
    };
    let node = job_node(job, vm);
    if state.nodes.get(&node).is_none_or(|n| !n.online) {
        return queue(WaitReason::NodeOffline);
    }
    if matches!(job.kind, JobKind::OffsiteCopy { .. }) {
        return vec![JobEvent::JobFailed {
            reason: "offsite copies are not available in this release".into(),
        }];
    }
    let policy = super::protect::policy_of(state, vm);
    if job.makes_rp()
        && let Some(reason) = out_of_space(state, cfg, job, vm)
    {
        return vec![JobEvent::JobFailed { reason }];
    }
    // Backups and checks write a VM's lineages, verify and prune need them to themselves: one
    // waits for the other rather than failing on the repository's lock and retrying.
    let lineage_user = |j: &Job| j.makes_rp() || matches!(j.kind, JobKind::Verify | JobKind::Prune);
    // Garbage collection locks each lineage of its repository in turn, so they wait for it too
    // (it skips lineages in use, so it need not wait for them).
    let my_repository = repository(state, cfg, job);
    if lineage_user(job)
        && state.jobs.values().any(|j| {
            j.id != job.id
                && matches!(j.state, JobState::Running | JobState::Retrying)
                && ((j.vm == job.vm && lineage_user(j))
                    || (j.kind == JobKind::GarbageCollect
                        && repository(state, cfg, j) == my_repository))
        })
    {
        return queue(WaitReason::VmBusy);
    }
    // A recovery over the VM's disks runs alone: no backup of the VM, no second such recovery.
    let clash = |other: &Job| {
        (writes_original(job) && (other.is_backup() || writes_original(other)))
            || (writes_original(other) && job.is_backup())
    };
    if state.jobs.values().any(|j| {
        j.id != job.id
            && j.vm == job.vm
            && matches!(j.state, JobState::Running | JobState::Retrying)
            && clash(j)
    }) {
        return queue(WaitReason::VmBusy);
    }
    let recovery = matches!(job.kind, JobKind::Recovery { .. });
    let limit = match (recovery, policy) {
        (true, Some(p)) => cfg
            .recoveries_per_node
            .min(usize::from(p.limits.recoveries)),
        (true, None) => cfg.recoveries_per_node,
        (false, Some(p)) => cfg
            .backups_per_node
            .min(usize::from(p.limits.backups_per_node)),
        (false, None) => cfg.backups_per_node,
    };
    let running = state
        .jobs
        .values()
        .filter(|j| {
            j.id != job.id
                && j.node.as_ref() == Some(&node)
                && matches!(j.state, JobState::Running | JobState::Retrying)
                && matches!(j.kind, JobKind::Recovery { .. }) == recovery
        })
        .count();
    if running >= limit {
        return queue(WaitReason::NodeBusy);
    }
    if let (false, Some(p)) = (recovery, policy) {
        // Backups of VMs whose disks share a volume (folder) count against its limit.
        let mine = super::protect::volumes(vm);
        let on_volume = state
            .jobs
            .values()
            .filter(|j| {
                j.id != job.id
                    && j.makes_rp()
                    && matches!(j.state, JobState::Running | JobState::Retrying)
            })
            .filter_map(|j| state.vms.get(&j.vm))
            .filter(|other| {
                super::protect::volumes(other)
                    .iter()
                    .any(|v| mine.contains(v))
            })
            .count();
        if on_volume >= usize::from(p.limits.backups_per_volume) {
            return queue(WaitReason::VolumeBusy);
        }
    }
    let rps = state.rps.get(&job.vm).map_or(&[][..], |l| l.as_slice());
    let started = JobEvent::JobStarted {
        node,
        plan: plan(job, vm, rps),
    };
    // Dispatch the first steps in the same breath, against the job as it will be.
    let mut after = job.clone();
    if let JobEvent::JobStarted { node, plan } = &started {
        after.state = JobState::Running;
        after.node = Some(node.clone());
        after.steps = plan.iter().map(super::state::step_from_plan).collect();
    }
    let mut events = vec![started];
    events.extend(advance(
        state,
        cfg,
        epoch,
        &after,
        &Liveness {
            last_report: HashMap::new(),
            started_at: now,
            last_refused: HashMap::new(),
        },
        now,
    ));
    events
}

fn advance(
    state: &State,
    cfg: &EngineConfig,
    epoch: u64,
    job: &Job,
    live: &Liveness,
    now: u64,
) -> Vec<JobEvent> {
    if let Some(reason) = window_closed(state, job, now) {
        return vec![JobEvent::JobCancelRequested { reason }];
    }
    let mut events = Vec::new();
    // Silent steps time out; steps of an earlier epoch get the orphan grace.
    for step in job.steps.iter().filter(|s| s.status.in_flight()) {
        let from_this_epoch = step.spec.as_ref().is_some_and(|s| s.epoch == epoch);
        let last = [
            step.dispatched_at,
            step.started_at,
            step.progress_at,
            live.last_report.get(&(step.id, step.attempt)).copied(),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0);
        let (last, timeout) = if from_this_epoch {
            (last, cfg.heartbeat_timeout_ms)
        } else {
            (last.max(live.started_at), cfg.orphan_grace_ms)
        };
        if now.saturating_sub(last) >= timeout {
            events.push(JobEvent::StepTimedOut {
                step: step.id,
                attempt: step.attempt,
            });
            if step.attempt < cfg.max_attempts && !job.cancel_requested {
                events.push(JobEvent::StepRetryScheduled {
                    step: step.id,
                    attempt: step.attempt,
                    at: now,
                });
            }
        }
    }
    if !events.is_empty() {
        return events;
    }
    let failed = job.steps.iter().find(|s| s.status == StepStatus::Failed);
    let winding_down = job.cancel_requested || failed.is_some();
    let in_flight = job.steps.iter().any(|s| s.status.in_flight());
    for step in &job.steps {
        let ready = match step.status {
            StepStatus::RetryScheduled { at } => at <= now && (step.always || !winding_down),
            StepStatus::Pending => {
                let deps: Vec<&Step> = step.after.iter().filter_map(|id| job.step(*id)).collect();
                if step.always {
                    // Runs once every predecessor has ended or will never run, and (when
                    // winding down) nothing else is still running.
                    let settled = |d: &&Step| {
                        d.status.terminal()
                            || (winding_down
                                && !d.always
                                && matches!(
                                    d.status,
                                    StepStatus::Pending | StepStatus::RetryScheduled { .. }
                                ))
                    };
                    deps.iter().all(settled) && !(winding_down && in_flight)
                } else {
                    !winding_down && deps.iter().all(|d| d.status == StepStatus::Succeeded)
                }
            }
            _ => false,
        };
        if ready {
            match build_spec(state, cfg, epoch, job, step, now) {
                Ok(spec) => events.push(JobEvent::StepDispatched {
                    step: step.id,
                    attempt: step.attempt + 1,
                    node: spec.node.clone(),
                    spec,
                }),
                Err(reason) => return vec![JobEvent::JobFailed { reason }],
            }
        }
    }
    if !events.is_empty() || in_flight {
        return events;
    }
    let waiting_retry = job
        .steps
        .iter()
        .any(|s| matches!(s.status, StepStatus::RetryScheduled { .. }));
    if waiting_retry && !winding_down {
        return events;
    }
    if winding_down {
        // Everything that will run has run once no `always` step is left open.
        if job.steps.iter().any(|s| s.always && !s.status.terminal()) {
            return events;
        }
        let mut done = maintenance_outcome(job);
        if job.cancel_requested {
            done.push(JobEvent::JobCancelled);
            return done;
        }
        let step = failed.expect("winding down without cancel means a step failed");
        done.push(JobEvent::JobFailed {
            reason: format!(
                "{} failed: {}",
                step_label(&step.kind),
                step.error.clone().unwrap_or_default()
            ),
        });
        return done;
    }
    if job.steps.iter().all(|s| s.status == StepStatus::Succeeded) {
        let mut done = Vec::new();
        if job.makes_rp() {
            done.push(committed(job));
        }
        if job.kind == JobKind::ConsistencyCheck {
            done.push(check_outcome(job));
        }
        done.extend(maintenance_outcome(job));
        done.push(JobEvent::JobSucceeded);
        return done;
    }
    events
}

/// A human label of a step kind: `Transfer disk0`.
pub fn step_label(kind: &StepKind) -> String {
    match kind {
        StepKind::Snapshot => "Snapshot".into(),
        StepKind::Transfer { disk } => format!("Transfer {disk}"),
        StepKind::ReleaseSnapshot => "ReleaseSnapshot".into(),
        StepKind::CommitRecoveryPoint => "CommitRecoveryPoint".into(),
        StepKind::Restore { disk } => format!("Restore {disk}"),
        StepKind::VerifyDisk { disk } => format!("VerifyDisk {disk}"),
        StepKind::CheckDisk { disk } => format!("CheckDisk {disk}"),
        StepKind::Prune { disk } => format!("Prune {disk}"),
        StepKind::CollectGarbage => "CollectGarbage".into(),
        StepKind::ImportSeed { disk } => format!("ImportSeed {disk}"),
        StepKind::PrepareRecovery => "PrepareRecovery".into(),
        StepKind::FinishRecovery => "FinishRecovery".into(),
        StepKind::ExtractItems { disk } => format!("ExtractItems {disk}"),
    }
}

/// A consistency check that the policy's window started (not an automatic one) is stopped
/// once it has run the window's maximum duration; the next window tries again.
fn window_closed(state: &State, job: &Job, now: u64) -> Option<String> {
    if job.kind != JobKind::ConsistencyCheck
        || job.reason != cairn_schemas::JobReason::ReplicaInconsistent
        || job.cancel_requested
    {
        return None;
    }
    let vm = state.vms.get(&job.vm)?;
    let policy = super::protect::policy_of(state, vm)?;
    if policy.consistency_check.when_inconsistent {
        return None;
    }
    let window = policy.consistency_check.window.as_ref()?;
    let limit = u64::from(window.max_duration_minutes) * 60_000;
    let started = job.started_at?;
    (now.saturating_sub(started) >= limit).then(|| {
        format!(
            "the consistency check window allows {} minutes; the check stops and runs again in \
             the next window",
            window.max_duration_minutes
        )
    })
}

/// Why a job that makes a recovery point cannot fit in its repository, if it cannot: the
/// worker's last report of free space against the VM's estimate.
fn out_of_space(state: &State, cfg: &EngineConfig, job: &Job, vm: &Vm) -> Option<String> {
    let repository = repository(state, cfg, job);
    let space = state.space.get(&repository)?;
    let need = crate::policy::capacity::job_estimate(&super::protect::vm_usage(state, vm));
    (need > space.free_bytes).then(|| {
        format!(
            "repository {repository} would run out of space: {} bytes free, this job needs about \
             {need} bytes (estimated from VM {}'s recent recovery points); add storage or \
             shorten retention (`cairn group plan` shows what each group needs)",
            space.free_bytes, vm.name
        )
    })
}

/// Totals of a consistency check's `CheckDisk` results.
fn check_outcome(job: &Job) -> JobEvent {
    let (mut compared, mut differing, mut stored) = (0, 0, 0);
    for step in &job.steps {
        if let Some(StepResult::CheckDisk {
            chunks_compared,
            chunks_differing,
            bytes_stored,
            ..
        }) = &step.result
        {
            compared += chunks_compared;
            differing += chunks_differing;
            stored += bytes_stored;
        }
    }
    JobEvent::ConsistencyChecked {
        vm: job.vm,
        chunks_compared: compared,
        chunks_differing: differing,
        bytes_stored: stored,
    }
}

/// What verify and prune steps found or did, also when the job as a whole failed: damage
/// found on some disks is damage, and recovery points removed from some disks are gone.
fn maintenance_outcome(job: &Job) -> Vec<JobEvent> {
    let mut removed: Vec<RecoveryPointId> = Vec::new();
    let mut damaged_disks = Vec::new();
    let mut damaged_rps: Vec<RecoveryPointId> = Vec::new();
    let mut n_damaged = 0;
    for step in &job.steps {
        match &step.result {
            Some(StepResult::Prune { removed: r, .. }) => {
                for rp in r {
                    if !removed.contains(rp) {
                        removed.push(*rp);
                    }
                }
            }
            Some(StepResult::VerifyDisk {
                disk,
                damaged_rps: rps,
                n_damaged_chunks,
                ..
            }) if *n_damaged_chunks > 0 || !rps.is_empty() => {
                damaged_disks.push(disk.clone());
                n_damaged += n_damaged_chunks;
                for rp in rps {
                    if !damaged_rps.contains(rp) {
                        damaged_rps.push(*rp);
                    }
                }
            }
            _ => {}
        }
    }
    let mut events = Vec::new();
    if !removed.is_empty() {
        events.push(JobEvent::RecoveryPointsPruned {
            vm: job.vm,
            rps: removed,
        });
    }
    if !damaged_disks.is_empty() {
        events.push(JobEvent::ReplicaDamageFound {
            vm: job.vm,
            disks: damaged_disks,
            rps: damaged_rps,
            n_damaged_chunks: n_damaged,
        });
    }
    events
}

fn snapshot_result(
    job: &Job,
) -> Option<(&String, &Consistency, &Vec<cairn_schemas::DiskTracking>)> {
    job.steps.iter().find_map(|s| match &s.result {
        Some(StepResult::Snapshot {
            snapshot,
            consistency,
            tracking,
        }) => Some((snapshot, consistency, tracking)),
        _ => None,
    })
}

fn committed(job: &Job) -> JobEvent {
    let consistency = snapshot_result(job).map_or(Consistency::Crash, |(_, c, _)| *c);
    let taken_at = job
        .steps
        .iter()
        .find(|s| s.kind == StepKind::Snapshot)
        .and_then(|s| s.finished_at)
        .unwrap_or(job.requested_at);
    let disks = job
        .steps
        .iter()
        .filter_map(|s| {
            let parent_rp = match s.spec.as_ref().map(|spec| &spec.work) {
                Some(
                    StepWork::Transfer { parent_rp, .. } | StepWork::CheckDisk { parent_rp, .. },
                ) => *parent_rp,
                _ => None,
            };
            let (disk, bytes_read, bytes_stored) = match s.result.as_ref()? {
                StepResult::Transfer {
                    disk,
                    bytes_read,
                    bytes_stored,
                    ..
                }
                | StepResult::CheckDisk {
                    disk,
                    bytes_read,
                    bytes_stored,
                    ..
                } => (disk, *bytes_read, *bytes_stored),
                StepResult::ImportSeed { disk, bytes_stored } => (disk, 0, *bytes_stored),
                _ => return None,
            };
            Some(CommittedDisk {
                disk: disk.clone(),
                parent_rp,
                bytes_read,
                bytes_stored,
            })
        })
        .collect();
    JobEvent::RecoveryPointCommitted {
        vm: job.vm,
        rp: rp_of(job),
        disks,
        consistency,
        taken_at,
    }
}

/// The repository a recovery of `rp` reads: the one the point was written to, else (a point
/// whose job named none) the one its VM's group writes to now.
fn source_repository(state: &State, cfg: &EngineConfig, job: &Job, rp: RecoveryPointId) -> String {
    state
        .rps
        .get(&job.vm)
        .and_then(|list| list.iter().find(|r| r.rp == rp))
        .map(|r| r.repository.clone())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| repository(state, cfg, job))
}

fn repository(state: &State, cfg: &EngineConfig, job: &Job) -> String {
    job.group
        .and_then(|g| state.groups.get(&g))
        .map(|g| g.policy.repository.clone())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| cfg.repository.clone())
}

pub(crate) fn extension(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Raw => "raw",
        ImageFormat::Qcow2 => "qcow2",
        ImageFormat::Vhdx => "vhdx",
        ImageFormat::Vhd => "vhd",
    }
}

fn build_spec(
    state: &State,
    cfg: &EngineConfig,
    epoch: u64,
    job: &Job,
    step: &Step,
    now: u64,
) -> Result<StepSpec, String> {
    let vm = state
        .vms
        .get(&job.vm)
        .ok_or_else(|| format!("VM {} disappeared from the inventory", job.vm))?;
    let node: NodeId = job.node.clone().unwrap_or_else(|| vm.node.clone());
    let repository = repository(state, cfg, job);
    let snapshot = snapshot_result(job);
    let disk_source = |disk: &cairn_schemas::DiskId| {
        vm.disks
            .iter()
            .find(|d| &d.disk == disk)
            .cloned()
            .map(DiskSource::from)
            .ok_or_else(|| format!("VM {} has no disk {disk} any more", vm.name))
    };
    let work = match &step.kind {
        StepKind::Snapshot => StepWork::Snapshot {
            vm_name: vm.name.clone(),
            disks: vm.disks.iter().cloned().map(DiskSource::from).collect(),
            consistency: job
                .group
                .and_then(|g| state.groups.get(&g))
                .map_or(ConsistencyWanted::CrashOnly, |g| g.policy.consistency),
        },
        StepKind::Transfer { disk } => StepWork::Transfer {
            source: disk_source(disk)?,
            snapshot: snapshot
                .map(|(s, _, _)| s.clone())
                .ok_or("the snapshot step has no result")?,
            repository,
            rp: rp_of(job),
            parent_rp: parent_rp(state, job),
            // The bitmap the parent's snapshot started holds every write since the parent;
            // without a parent (or for an express full) there is nothing to trust. After a
            // recovery over the VM's disks it no longer describes what changed since the last
            // recovery point either: read everything.
            change_tracking: if recovered_since_last_rp(state, job.vm) {
                None
            } else {
                change_tracking(vm, job, disk, parent_rp(state, job))
            },
            chunk_size: cfg.chunk_size,
        },
        StepKind::ReleaseSnapshot => StepWork::ReleaseSnapshot {
            snapshot: snapshot.map(|(s, _, _)| s.clone()).unwrap_or_default(),
        },
        StepKind::CommitRecoveryPoint => StepWork::CommitRecoveryPoint {
            repository,
            rp: rp_of(job),
            disks: vm.disks.iter().map(|d| d.disk.clone()).collect(),
            consistency: snapshot.map_or(Consistency::Crash, |(_, c, _)| *c),
        },
        StepKind::VerifyDisk { disk } => StepWork::VerifyDisk {
            repository,
            disk: disk_source(disk)?.disk,
        },
        StepKind::CheckDisk { disk } => StepWork::CheckDisk {
            source: disk_source(disk)?,
            snapshot: snapshot
                .map(|(s, _, _)| s.clone())
                .ok_or("the snapshot step has no result")?,
            repository,
            rp: rp_of(job),
            parent_rp: state.rps.get(&job.vm).and_then(|l| l.last()).map(|r| r.rp),
            chunk_size: cfg.chunk_size,
        },
        StepKind::Prune { disk } => StepWork::Prune {
            repository,
            disk: disk_source(disk)?.disk,
            remove: super::protect::removals(state, vm, now),
        },
        StepKind::CollectGarbage => StepWork::CollectGarbage { repository },
        StepKind::ImportSeed { disk } => {
            let JobKind::SeedImport { seed } = &job.kind else {
                return Err("a seed import step outside a seed import job".into());
            };
            StepWork::ImportSeed {
                disk: disk_source(disk)?.disk,
                seed: seed.clone(),
                repository,
                rp: rp_of(job),
            }
        }
        StepKind::Restore { .. } | StepKind::PrepareRecovery | StepKind::FinishRecovery => {
            let JobKind::Recovery { rp, target } = &job.kind else {
                return Err("a recovery step outside a recovery job".into());
            };
            let repository = source_repository(state, cfg, job, *rp);
            recovery_work(state, job, vm, &step.kind, *rp, target, repository)?
        }
        StepKind::ExtractItems { disk } => {
            let JobKind::Recovery {
                rp,
                target: RecoveryTarget::ItemLevel { items, path, .. },
            } = &job.kind
            else {
                return Err("an item extraction outside an item-level recovery job".into());
            };
            StepWork::ExtractItems {
                disk: disk.clone(),
                repository: source_repository(state, cfg, job, *rp),
                rp: *rp,
                items: items.clone(),
                target_path: path.clone(),
            }
        }
    };
    Ok(StepSpec {
        step: step.id,
        attempt: step.attempt + 1,
        job: job.id,
        partition: cairn_schemas::subjects::partition_of_vm(&job.vm, cfg.partitions),
        epoch,
        node,
        vm: job.vm,
        work,
    })
}

/// The recovery point a backup builds on: the VM's latest.
fn parent_rp(state: &State, job: &Job) -> Option<RecoveryPointId> {
    state.rps.get(&job.vm).and_then(|l| l.last()).map(|r| r.rp)
}

/// The change-tracking bitmap an incremental transfer of `disk` may trust: the one started by
/// the parent recovery point's snapshot, unless the job is an express full.
pub fn change_tracking(
    vm: &Vm,
    job: &Job,
    disk: &cairn_schemas::DiskId,
    parent: Option<RecoveryPointId>,
) -> Option<String> {
    if matches!(
        job.kind,
        JobKind::Backup {
            mode: BackupMode::ExpressFull
        }
    ) {
        return None;
    }
    parent?;
    vm.tracking.get(disk).cloned()
}

/// The job and step a report is about, if it is for the step's current attempt and epoch, comes
/// from the node the step was dispatched to, and the step is still in flight; `None` for
/// reports to ignore.
fn reported_step<'s>(state: &'s State, report: &Report) -> Option<(&'s Job, &'s Step)> {
    let job = state.jobs.get(&report.job)?;
    let step = job.step(report.step)?;
    let current = step.attempt == report.attempt
        && step
            .spec
            .as_ref()
            .is_some_and(|s| s.epoch == report.epoch && s.node == report.node);
    (current && step.status.in_flight() && !job.state.is_terminal()).then_some((job, step))
}

/// Why a report is refused as another node's: the command that records it (raising a
/// Critical alert on the sending node), or `None` for a report a node may send.
///
/// `sender` is the node whose NATS subject the report came on (only that node's identity may
/// publish there), `None` when the worker runs in-process. A report is refused when it names
/// another node than its sender, or when its step was dispatched to another node than the
/// one it names. Pure.
pub fn refused_report(
    state: &State,
    report: &Report,
    sender: Option<&NodeId>,
) -> Option<cairn_schemas::Command> {
    let dispatched_to = state
        .jobs
        .get(&report.job)
        .and_then(|job| job.step(report.step))
        .and_then(|step| step.spec.as_ref())
        .map(|spec| spec.node.clone());
    let node = sender.unwrap_or(&report.node);
    let foreign =
        *node != report.node || dispatched_to.as_ref().is_some_and(|to| *to != report.node);
    foreign.then(|| cairn_schemas::Command::RecordRefusedReport {
        node: node.clone(),
        claimed_node: report.node.clone(),
        dispatched_to,
        job: report.job,
        step: report.step,
    })
}

/// How often one node's refused reports are recorded as events (others are only logged): a
/// node that floods forged reports raises one alert, not a flood of events.
pub const REFUSED_REPORT_EVERY_MS: u64 = 60_000;

/// VM events a worker's report implies: a transfer that was handed a bitmap but could not use
/// it (the worker read everything) means the disk's change tracking was lost. Pure; empty for
/// reports that [`on_report`] ignores.
pub fn tracking_events(state: &State, report: &Report) -> Vec<cairn_schemas::VmEvent> {
    let Some((_, step)) = reported_step(state, report) else {
        return vec![];
    };
    let (
        ReportBody::Succeeded {
            result:
                StepResult::Transfer {
                    disk,
                    incremental: false,
                    ..
                },
        },
        Some(StepWork::Transfer {
            change_tracking: Some(bitmap),
            ..
        }),
    ) = (&report.body, step.spec.as_ref().map(|s| &s.work))
    else {
        return vec![];
    };
    vec![cairn_schemas::VmEvent::ChangeTrackingLost {
        disk: disk.clone(),
        reason: format!(
            "bitmap {bitmap} was missing or unusable on node {} (deleted, inconsistent after a \
             crash, or the VM moved without it); the backup read the whole disk (express full)",
            report.node
        ),
    }]
}

/// Whether a recovery over `vm`'s own disks ended (succeeded or not: a failed one may have
/// written some disks) after its latest recovery point was taken.
pub fn recovered_since_last_rp(state: &State, vm: VmId) -> bool {
    let last_rp = state
        .rps
        .get(&vm)
        .and_then(|l| l.iter().map(|r| r.taken_at).max())
        .unwrap_or(0);
    state.jobs.values().any(|j| {
        j.vm == vm
            && writes_original(j)
            && j.started_at.is_some()
            && j.finished_at.is_some_and(|t| t >= last_rp)
    })
}

/// The new VM an alternate-host recovery creates: its id is derived from the job id, so a
/// retried finish step writes the same descriptor.
pub fn recovered_vm_id(job: &Job) -> VmId {
    let mut bytes = *job.id.as_bytes();
    bytes[15] = bytes[15].wrapping_add(0x80);
    VmId::from_bytes(bytes).expect("still a v7 uuid")
}

/// The name of the VM an alternate-host recovery creates.
pub fn recovered_vm_name(state: &State, job: &Job, source_name: &str) -> String {
    state
        .recoveries
        .get(&job.id)
        .and_then(|r| r.options.new_name.clone())
        .unwrap_or_else(|| format!("{source_name}-recovered"))
}

/// The spec of one step of a recovery job.
fn recovery_work(
    state: &State,
    job: &Job,
    vm: &Vm,
    kind: &StepKind,
    rp: RecoveryPointId,
    target: &RecoveryTarget,
    repository: String,
) -> Result<StepWork, String> {
    let rps = state.rps.get(&job.vm).map_or(&[][..], |l| l.as_slice());
    let disks = recovery_disks(vm, rp, rps);
    let new_name = recovered_vm_name(state, job, &vm.name);
    let recovery = state.recoveries.get(&job.id);
    let throttle = recovery.and_then(|r| r.options.throttle.clone());
    let timezone = recovery.and_then(|r| r.timezone.clone());
    // Where each disk goes, and in which format.
    let placed = |disk: &DiskId| -> Result<DiskSource, String> {
        let current = vm.disks.iter().find(|d| &d.disk == disk);
        let size_bytes = current.map_or(0, |d| d.size_bytes);
        match target {
            RecoveryTarget::OriginalVm => current.cloned().map(DiskSource::from).ok_or_else(|| {
                format!(
                    "VM {} has no disk {disk} any more; recover it to another host instead",
                    vm.name
                )
            }),
            RecoveryTarget::AlternateHost { path, format, .. } => Ok(DiskSource {
                disk: disk.clone(),
                image_path: format!(
                    "{}/{new_name}-{disk}.{}",
                    path.trim_end_matches('/'),
                    extension(*format)
                ),
                format: *format,
                size_bytes,
            }),
            RecoveryTarget::CopyToFolder { path, .. } => {
                let format = current.map_or(ImageFormat::Raw, |d| d.format);
                Ok(DiskSource {
                    disk: disk.clone(),
                    image_path: format!(
                        "{}/{}-{disk}.{}",
                        path.trim_end_matches('/'),
                        vm.name,
                        extension(format)
                    ),
                    format,
                    size_bytes,
                })
            }
            RecoveryTarget::ItemLevel { .. } => {
                Err("item-level recovery is not a whole-disk recovery".into())
            }
        }
    };
    let all: Vec<DiskSource> = disks.iter().map(placed).collect::<Result<_, _>>()?;
    let recovered_name = match target {
        RecoveryTarget::AlternateHost { .. } => new_name.clone(),
        _ => vm.name.clone(),
    };
    Ok(match kind {
        StepKind::PrepareRecovery => StepWork::PrepareRecovery {
            target: target.clone(),
            vm_name: recovered_name,
            disks: all,
        },
        StepKind::Restore { disk } => {
            let placed = all
                .into_iter()
                .find(|d| &d.disk == disk)
                .ok_or_else(|| format!("recovery point {rp} has no disk {disk}"))?;
            let overwrite = matches!(target, RecoveryTarget::OriginalVm);
            match timezone {
                // Work hours in a named zone need a worker that knows the variant; without a
                // throttle the zone changes nothing, so the old variant keeps old workers
                // working.
                Some(timezone) if throttle.is_some() => StepWork::RestoreDiskInZone {
                    disk: disk.clone(),
                    repository,
                    rp,
                    target_path: placed.image_path,
                    target_format: placed.format,
                    overwrite,
                    throttle,
                    timezone,
                },
                _ => StepWork::RestoreDisk {
                    disk: disk.clone(),
                    repository,
                    rp,
                    target_path: placed.image_path,
                    target_format: placed.format,
                    overwrite,
                    throttle,
                },
            }
        }
        _ => StepWork::FinishRecovery {
            target: target.clone(),
            rp,
            taken_at: rps
                .iter()
                .find(|r| r.rp == rp)
                .map_or(rp.unix_millis(), |r| r.taken_at),
            source_name: vm.name.clone(),
            vm: match target {
                RecoveryTarget::AlternateHost { .. } => recovered_vm_id(job),
                _ => job.vm,
            },
            vm_name: recovered_name,
            disks: all,
        },
    })
}

/// A step dispatched under an earlier owner epoch and refused by the worker for that reason
/// never ran: whatever `on_report` decided, it is retried at once and the refusal does not
/// use up its attempts (up to four times the attempts a step has, so that a partition whose
/// ownership keeps moving still ends its jobs). `current_epoch` is the partition owner's epoch
/// now. Pure.
pub fn retry_superseded(
    mut events: Vec<JobEvent>,
    report: &Report,
    current_epoch: u64,
    max_attempts: u32,
    now: u64,
) -> Vec<JobEvent> {
    let refused = matches!(
        &report.body,
        ReportBody::Failed {
            class: FailureClass::Retryable,
            ..
        }
    ) && report.epoch < current_epoch
        && report.attempt < max_attempts.saturating_mul(4);
    if !refused {
        return events;
    }
    let Some(JobEvent::StepFailed { step, attempt, .. }) = events.first().cloned() else {
        return events;
    };
    events.retain(|e| !matches!(e, JobEvent::StepRetryScheduled { .. }));
    events.push(JobEvent::StepRetryScheduled {
        step,
        attempt,
        at: now,
    });
    events
}

/// Events for a worker's report. Reports of another attempt or epoch, or for a step that is
/// not in flight, are ignored (an empty list).
pub fn on_report(state: &State, cfg: &EngineConfig, report: &Report, now: u64) -> Vec<JobEvent> {
    let Some((job, step)) = reported_step(state, report) else {
        return vec![];
    };
    match &report.body {
        ReportBody::Started => {
            if step.status == StepStatus::Dispatched {
                vec![JobEvent::StepStarted {
                    step: step.id,
                    attempt: step.attempt,
                }]
            } else {
                vec![]
            }
        }
        ReportBody::Progress {
            bytes_done,
            bytes_total,
        } => {
            // Heartbeats keep the step alive in memory; the log gets a progress event at most
            // every ten seconds per step.
            if step
                .progress_at
                .is_none_or(|t| now.saturating_sub(t) >= 10_000)
            {
                vec![JobEvent::StepProgressed {
                    step: step.id,
                    attempt: step.attempt,
                    bytes_done: *bytes_done,
                    bytes_total: *bytes_total,
                }]
            } else {
                vec![]
            }
        }
        ReportBody::Succeeded { result } => vec![JobEvent::StepSucceeded {
            step: step.id,
            attempt: step.attempt,
            result: result.clone(),
        }],
        ReportBody::Failed { class, message } => {
            let mut events = vec![JobEvent::StepFailed {
                step: step.id,
                attempt: step.attempt,
                class: *class,
                message: message.clone(),
            }];
            if *class == FailureClass::Retryable
                && step.attempt < cfg.max_attempts
                && !job.cancel_requested
            {
                let delay = cfg
                    .retry_base_ms
                    .saturating_mul(1 << (step.attempt.saturating_sub(1)).min(16))
                    .min(300_000);
                events.push(JobEvent::StepRetryScheduled {
                    step: step.id,
                    attempt: step.attempt,
                    at: now + delay,
                });
            }
            events
        }
    }
}

#[cfg(test)]
mod superseded_tests {
    use super::*;
    use cairn_schemas::JobId;

    #[test]
    fn a_step_refused_for_its_old_epoch_is_retried_at_once_whatever_its_attempts() {
        let step = StepId::new_v7(1, [1; 10]);
        let report = |epoch: u64| Report {
            step,
            attempt: 5,
            job: JobId::new_v7(1, [2; 10]),
            partition: 3,
            epoch,
            node: NodeId::new("kvm-1").unwrap(),
            body: ReportBody::Failed {
                class: FailureClass::Retryable,
                message: "dispatched by an earlier owner".into(),
            },
        };
        let failed = vec![JobEvent::StepFailed {
            step,
            attempt: 5,
            class: FailureClass::Retryable,
            message: "x".into(),
        }];
        let out = retry_superseded(failed.clone(), &report(2), 14, 5, 1000);
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[1],
            JobEvent::StepRetryScheduled {
                step,
                attempt: 5,
                at: 1000
            }
        );
        // The current epoch's own failures keep their retry budget.
        assert_eq!(
            retry_superseded(failed.clone(), &report(14), 14, 5, 1000),
            failed
        );
    }
}
