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
    CommittedDisk, Consistency, ConsistencyWanted, DiskSource, FailureClass, ImageFormat, JobEvent,
    JobKind, JobState, NodeId, PlannedStep, RecoveryPointId, RecoveryTarget, Report, ReportBody,
    StepId, StepKind, StepResult, StepSpec, StepWork, WaitReason,
};

use super::state::{Job, State, Step, StepStatus, Vm};

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
        }
    }
}

/// What the engine knows beyond the log: when each in-flight step last reported in this
/// process, and when this process started.
#[derive(Debug, Default, Clone)]
pub struct Liveness {
    pub last_report: HashMap<(StepId, u32), u64>,
    pub started_at: u64,
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

/// The plan of a job for its VM.
pub fn plan(job: &Job, vm: &Vm) -> Vec<PlannedStep> {
    match &job.kind {
        JobKind::Recovery {
            target: RecoveryTarget::ItemLevel { disk, .. },
            ..
        } => vec![PlannedStep {
            step: step_id(job, 0),
            kind: StepKind::ExtractItems { disk: disk.clone() },
            after: vec![],
            always: false,
        }],
        JobKind::Recovery { .. } => vm
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| PlannedStep {
                step: step_id(job, i as u8),
                kind: StepKind::Restore {
                    disk: d.disk.clone(),
                },
                after: vec![],
                always: false,
            })
            .collect(),
        _ => {
            let snapshot = step_id(job, 0);
            let mut steps = vec![PlannedStep {
                step: snapshot,
                kind: StepKind::Snapshot,
                after: vec![],
                always: false,
            }];
            let mut transfers = Vec::new();
            for (i, d) in vm.disks.iter().enumerate() {
                let id = step_id(job, 3 + i as u8);
                transfers.push(id);
                steps.push(PlannedStep {
                    step: id,
                    kind: StepKind::Transfer {
                        disk: d.disk.clone(),
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
    if state.nodes.get(&vm.node).is_none_or(|n| !n.online) {
        return queue(WaitReason::NodeOffline);
    }
    let recovery = matches!(job.kind, JobKind::Recovery { .. });
    let limit = if recovery {
        cfg.recoveries_per_node
    } else {
        cfg.backups_per_node
    };
    let running = state
        .jobs
        .values()
        .filter(|j| {
            j.id != job.id
                && j.node.as_ref() == Some(&vm.node)
                && matches!(j.state, JobState::Running | JobState::Retrying)
                && matches!(j.kind, JobKind::Recovery { .. }) == recovery
        })
        .count();
    if running >= limit {
        return queue(WaitReason::NodeBusy);
    }
    let started = JobEvent::JobStarted {
        node: vm.node.clone(),
        plan: plan(job, vm),
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
            match build_spec(state, cfg, epoch, job, step) {
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
        if job.cancel_requested {
            return vec![JobEvent::JobCancelled];
        }
        let step = failed.expect("winding down without cancel means a step failed");
        return vec![JobEvent::JobFailed {
            reason: format!(
                "{} failed: {}",
                step_label(&step.kind),
                step.error.clone().unwrap_or_default()
            ),
        }];
    }
    if job.steps.iter().all(|s| s.status == StepStatus::Succeeded) {
        let mut done = Vec::new();
        if job.is_backup() {
            done.push(committed(job));
        }
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
        StepKind::ExtractItems { disk } => format!("ExtractItems {disk}"),
    }
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
        .filter_map(|s| match (&s.result, &s.spec) {
            (
                Some(StepResult::Transfer {
                    disk,
                    bytes_read,
                    bytes_stored,
                    ..
                }),
                Some(spec),
            ) => Some(CommittedDisk {
                disk: disk.clone(),
                parent_rp: match &spec.work {
                    StepWork::Transfer { parent_rp, .. } => *parent_rp,
                    _ => None,
                },
                bytes_read: *bytes_read,
                bytes_stored: *bytes_stored,
            }),
            _ => None,
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

fn repository(state: &State, cfg: &EngineConfig, job: &Job) -> String {
    job.group
        .and_then(|g| state.groups.get(&g))
        .map(|g| g.policy.repository.clone())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| cfg.repository.clone())
}

fn extension(format: ImageFormat) -> &'static str {
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
            parent_rp: state.rps.get(&job.vm).and_then(|l| l.last()).map(|r| r.rp),
            change_tracking: snapshot
                .and_then(|(_, _, tracking)| tracking.iter().find(|t| &t.disk == disk))
                .map(|t| t.bitmap.clone()),
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
        StepKind::Restore { disk } => {
            let JobKind::Recovery { rp, target } = &job.kind else {
                return Err("a restore step outside a recovery job".into());
            };
            let RecoveryTarget::CopyToFolder { path, .. } = target else {
                return Err(format!(
                    "recovery target {target:?} is not available in this release"
                ));
            };
            let source = disk_source(disk)?;
            StepWork::Restore {
                disk: disk.clone(),
                repository,
                rp: *rp,
                target_path: format!(
                    "{}/{}-{}.{}",
                    path.trim_end_matches('/'),
                    vm.name,
                    disk,
                    extension(source.format)
                ),
                target_format: source.format,
            }
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
                repository,
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
        partition: 0,
        epoch,
        node,
        vm: job.vm,
        work,
    })
}

/// Events for a worker's report. Reports of another attempt or epoch, or for a step that is
/// not in flight, are ignored (an empty list).
pub fn on_report(state: &State, cfg: &EngineConfig, report: &Report, now: u64) -> Vec<JobEvent> {
    let Some(job) = state.jobs.get(&report.job) else {
        return vec![];
    };
    let Some(step) = job.step(report.step) else {
        return vec![];
    };
    let current = step.attempt == report.attempt
        && step.spec.as_ref().is_some_and(|s| s.epoch == report.epoch);
    if !current || !step.status.in_flight() || job.state.is_terminal() {
        return vec![];
    }
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
