//! State-machine tests of decide / reconcile / on_report, and property tests of the
//! projection laws: replay is deterministic, incremental = full rebuild, duplicates are no-ops,
//! snapshot + tail = full replay.

use crate::error_code::ErrorCode;
use cairn_schemas::{
    Aggregate, BackupMode, Command, Consistency, DiskInfo, Envelope, Event, FailureClass, GroupId,
    GroupPolicy, ImageFormat, JobEvent, JobId, JobState, NodeId, PowerState, RecoveryTarget,
    Report, ReportBody, StepId, StepKind, StepResult, StepWork, VmId, VmInventory,
};
use proptest::prelude::*;

use super::decide::{Emit, decide};
use super::jobs::{EngineConfig, Liveness, on_report, reconcile};
use super::snapshot;
use super::state::{State, StepStatus};
use crate::control::ControlError;
use crate::log::StoredEvent;

/// An in-memory log + state, applying emits the way the service does.
struct World {
    state: State,
    log: Vec<StoredEvent>,
    now: u64,
    epoch: u64,
    cfg: EngineConfig,
    counter: u64,
    /// Append the data source reactions to job events, as the service does.
    follow_ups: bool,
}

impl World {
    fn new() -> World {
        World {
            state: State::default(),
            log: vec![],
            now: 1_000_000,
            epoch: 7,
            cfg: EngineConfig {
                repository: "/repo".into(),
                ..EngineConfig::default()
            },
            counter: 0,
            follow_ups: false,
        }
    }

    fn id<T>(&mut self, make: fn(u64, [u8; 10]) -> T) -> T {
        self.counter += 1;
        let mut rand = [0u8; 10];
        rand[..8].copy_from_slice(&self.counter.to_le_bytes());
        make(self.now, rand)
    }

    fn commit(&mut self, emit: Emit) {
        let job_events: Vec<JobEvent> = match (&emit.aggregate, self.follow_ups) {
            (Aggregate::Job(_), true) => emit
                .events
                .iter()
                .filter_map(|e| match e {
                    Event::Job(j) => Some(j.clone()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let job = match emit.aggregate {
            Aggregate::Job(job) => Some(job),
            _ => None,
        };
        self.commit_only(emit);
        if let (Some(job), false) = (job, job_events.is_empty()) {
            let follow = crate::policy::datasource::after_job_events(&self.state, job, &job_events);
            if let Some(emit) = follow.emit {
                self.commit_only(emit);
            }
        }
    }

    fn commit_only(&mut self, emit: Emit) {
        let first = self.state.version(&emit.aggregate) + 1;
        for (version, payload) in (first..).zip(emit.events) {
            let event_id = self.id(cairn_schemas::EventId::new_v7);
            let stored = StoredEvent {
                seq: self.log.len() as u64 + 1,
                envelope: Envelope {
                    event_id,
                    aggregate: emit.aggregate.clone(),
                    aggregate_version: version,
                    recorded_at: self.now,
                    actor: "test".into(),
                    correlation: None,
                    causation: None,
                    command: None,
                    traceparent: None,
                    prev_hash: [0; 32],
                    payload,
                },
            };
            self.state.apply(&stored);
            self.log.push(stored);
        }
    }

    fn submit(&mut self, command: Command) -> Result<(), ControlError> {
        for emit in decide(&self.state, &command, self.now)? {
            self.commit(emit);
        }
        Ok(())
    }

    /// Reconciles every open job until nothing changes; returns the events appended.
    fn settle(&mut self) -> Vec<JobEvent> {
        let live = Liveness {
            last_report: Default::default(),
            started_at: self.now,
            last_refused: Default::default(),
        };
        let mut all = Vec::new();
        for _ in 0..50 {
            let mut any = false;
            let open: Vec<JobId> = self
                .state
                .jobs
                .values()
                .filter(|j| !j.state.is_terminal())
                .map(|j| j.id)
                .collect();
            for job in open {
                let events = reconcile(
                    &self.state,
                    &self.cfg,
                    self.epoch,
                    &self.state.jobs[&job],
                    &live,
                    self.now,
                );
                if !events.is_empty() {
                    any = true;
                    all.extend(events.clone());
                    self.commit(Emit::new(
                        Aggregate::Job(job),
                        events.into_iter().map(Event::from).collect(),
                    ));
                }
            }
            if !any {
                break;
            }
        }
        all
    }

    fn report(&mut self, job: JobId, kind: &StepKind, body: ReportBody) -> Vec<JobEvent> {
        let step = self.state.jobs[&job]
            .steps
            .iter()
            .find(|s| &s.kind == kind)
            .unwrap()
            .clone();
        // A finished job no longer keeps its specs; a late report then carries what it had.
        let (epoch, node) = step
            .spec
            .as_ref()
            .map_or((self.epoch, node()), |s| (s.epoch, s.node.clone()));
        let report = Report {
            step: step.id,
            attempt: step.attempt,
            job,
            partition: 0,
            epoch,
            node,
            body,
        };
        let events = on_report(&self.state, &self.cfg, &report, self.now);
        if !events.is_empty() {
            self.commit(Emit::new(
                Aggregate::Job(job),
                events.clone().into_iter().map(Event::from).collect(),
            ));
        }
        self.settle();
        events
    }

    fn dispatched(&self, job: JobId) -> Vec<StepKind> {
        self.state.jobs[&job]
            .steps
            .iter()
            .filter(|s| s.status.in_flight())
            .map(|s| s.kind.clone())
            .collect()
    }
}

fn node() -> NodeId {
    "node-a".parse().unwrap()
}

fn disk(name: &str) -> DiskInfo {
    DiskInfo {
        disk: name.parse().unwrap(),
        size_bytes: 1 << 30,
        format: ImageFormat::Qcow2,
        image_path: format!("/vms/{name}.qcow2"),
    }
}

fn setup(world: &mut World, n_vms: usize) -> Vec<VmId> {
    world
        .submit(Command::RegisterNode {
            node: node(),
            cluster: "c1".into(),
            worker_version: "1".into(),
        })
        .unwrap();
    let vms: Vec<VmInventory> = (0..n_vms)
        .map(|i| VmInventory {
            vm: world.id(VmId::new_v7),
            name: format!("vm{i}"),
            disks: vec![disk("disk0"), disk("disk1")],
            power: PowerState::Stopped,
        })
        .collect();
    let ids = vms.iter().map(|v| v.vm).collect();
    world
        .submit(Command::ReportInventory { node: node(), vms })
        .unwrap();
    ids
}

fn transfer(d: &str) -> StepKind {
    StepKind::Transfer {
        disk: d.parse().unwrap(),
    }
}

fn ok_snapshot() -> ReportBody {
    ReportBody::Succeeded {
        result: StepResult::Snapshot {
            snapshot: "snap".into(),
            consistency: Consistency::Crash,
            tracking: vec![],
        },
    }
}

/// A success for the steps of consistency checks, verify, prune, gc and seed imports.
fn ok_policy_step(kind: &StepKind) -> ReportBody {
    let result = match kind {
        StepKind::VerifyDisk { disk } => StepResult::VerifyDisk {
            disk: disk.clone(),
            chunks_checked: 10,
            damaged_rps: vec![],
            n_damaged_chunks: 0,
        },
        StepKind::CheckDisk { disk } => StepResult::CheckDisk {
            disk: disk.clone(),
            chunks_compared: 10,
            chunks_differing: 1,
            bytes_read: 100,
            bytes_stored: 10,
        },
        StepKind::Prune { disk } => StepResult::Prune {
            disk: disk.clone(),
            removed: vec![],
        },
        StepKind::CollectGarbage => StepResult::CollectGarbage { bytes_freed: 0 },
        StepKind::ImportSeed { disk } => StepResult::ImportSeed {
            disk: disk.clone(),
            bytes_stored: 10,
        },
        other => panic!("not a policy step: {other:?}"),
    };
    ReportBody::Succeeded { result }
}

fn ok_transfer(d: &str) -> ReportBody {
    ReportBody::Succeeded {
        result: StepResult::Transfer {
            disk: d.parse().unwrap(),
            bytes_read: 100,
            bytes_stored: 10,
            incremental: false,
        },
    }
}

fn backup(world: &mut World, vm: VmId) -> JobId {
    let job = world.id(JobId::new_v7);
    world
        .submit(Command::RequestBackup {
            job,
            vm,
            mode: BackupMode::Incremental,
        })
        .unwrap();
    world.settle();
    job
}

fn run_backup_to_success(world: &mut World, job: JobId) {
    world.report(job, &StepKind::Snapshot, ok_snapshot());
    world.report(job, &transfer("disk0"), ok_transfer("disk0"));
    world.report(job, &transfer("disk1"), ok_transfer("disk1"));
    world.report(
        job,
        &StepKind::ReleaseSnapshot,
        ReportBody::Succeeded {
            result: StepResult::ReleaseSnapshot,
        },
    );
    world.report(
        job,
        &StepKind::CommitRecoveryPoint,
        ReportBody::Succeeded {
            result: StepResult::CommitRecoveryPoint,
        },
    );
}

#[test]
fn inventory_discovers_moves_and_removes_vms() {
    let mut w = World::new();
    let vms = setup(&mut w, 2);
    assert_eq!(w.state.vms.len(), 2);
    let before = w.log.len();
    let again: Vec<VmInventory> = w
        .state
        .vms
        .values()
        .map(|v| VmInventory {
            vm: v.id,
            name: v.name.clone(),
            disks: v.disks.clone(),
            power: v.power,
        })
        .collect();
    w.submit(Command::ReportInventory {
        node: node(),
        vms: again.clone(),
    })
    .unwrap();
    assert_eq!(
        w.log.len(),
        before,
        "an unchanged inventory appends nothing"
    );
    w.submit(Command::ReportInventory {
        node: node(),
        vms: again[..1].to_vec(),
    })
    .unwrap();
    assert!(!w.state.vms[&again[1].vm].present);
    let other: NodeId = "node-b".parse().unwrap();
    w.submit(Command::RegisterNode {
        node: other.clone(),
        cluster: "c1".into(),
        worker_version: "1".into(),
    })
    .unwrap();
    w.submit(Command::ReportInventory {
        node: other.clone(),
        vms: again[..1].to_vec(),
    })
    .unwrap();
    assert_eq!(w.state.vms[&vms[0]].node, other);
    let err = w
        .submit(Command::ReportInventory {
            node: "ghost".parse().unwrap(),
            vms: vec![],
        })
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::UnknownNode);
}

#[test]
fn groups_reject_duplicates_unknown_vms_and_bad_policies() {
    let mut w = World::new();
    let vms = setup(&mut w, 2);
    let policy = GroupPolicy::with_defaults("/repo");
    let g1 = w.id(GroupId::new_v7);
    w.submit(Command::CreateGroup {
        group: g1,
        name: "gold".into(),
        members: vec![vms[0]],
        policy: policy.clone(),
    })
    .unwrap();
    let g2 = w.id(GroupId::new_v7);
    let dup = w.submit(Command::CreateGroup {
        group: g2,
        name: "gold".into(),
        members: vec![vms[1]],
        policy: policy.clone(),
    });
    assert_eq!(dup.unwrap_err().code(), ErrorCode::DuplicateGroup);
    let taken = w.submit(Command::CreateGroup {
        group: g2,
        name: "silver".into(),
        members: vec![vms[0]],
        policy: policy.clone(),
    });
    assert_eq!(taken.unwrap_err().code(), ErrorCode::VmInGroup);
    let ghost = w.id(VmId::new_v7);
    let unknown = w.submit(Command::CreateGroup {
        group: g2,
        name: "silver".into(),
        members: vec![ghost],
        policy: policy.clone(),
    });
    assert_eq!(unknown.unwrap_err().code(), ErrorCode::UnknownVm);
    let mut bad = policy;
    bad.retention_days = 0;
    let invalid = w.submit(Command::CreateGroup {
        group: g2,
        name: "silver".into(),
        members: vec![vms[1]],
        policy: bad,
    });
    assert_eq!(invalid.unwrap_err().code(), ErrorCode::InvalidPolicy);
    assert_eq!(w.state.vms[&vms[0]].group, Some(g1));
}

#[test]
fn a_backup_runs_its_plan_and_commits_exactly_one_recovery_point() {
    let mut w = World::new();
    let vm = setup(&mut w, 1)[0];
    let job = backup(&mut w, vm);
    assert_eq!(w.state.jobs[&job].state, JobState::Running);
    assert_eq!(w.dispatched(job), vec![StepKind::Snapshot]);
    w.report(job, &StepKind::Snapshot, ok_snapshot());
    assert_eq!(
        w.dispatched(job),
        vec![transfer("disk0"), transfer("disk1")],
        "transfers run in parallel"
    );
    let spec = w.state.jobs[&job]
        .steps
        .iter()
        .find(|s| s.kind == transfer("disk0"))
        .unwrap()
        .spec
        .clone()
        .unwrap();
    let StepWork::Transfer {
        rp,
        snapshot,
        repository,
        ..
    } = spec.work
    else {
        panic!("{spec:?}")
    };
    assert_eq!((snapshot.as_str(), repository.as_str()), ("snap", "/repo"));
    assert_eq!(spec.epoch, 7);
    w.report(job, &transfer("disk0"), ok_transfer("disk0"));
    assert_eq!(
        w.dispatched(job),
        vec![transfer("disk1")],
        "release waits for every transfer"
    );
    w.report(job, &transfer("disk1"), ok_transfer("disk1"));
    assert_eq!(w.dispatched(job), vec![StepKind::ReleaseSnapshot]);
    w.report(
        job,
        &StepKind::ReleaseSnapshot,
        ReportBody::Succeeded {
            result: StepResult::ReleaseSnapshot,
        },
    );
    w.report(
        job,
        &StepKind::CommitRecoveryPoint,
        ReportBody::Succeeded {
            result: StepResult::CommitRecoveryPoint,
        },
    );
    assert_eq!(w.state.jobs[&job].state, JobState::Succeeded);
    let rps = &w.state.rps[&vm];
    assert_eq!(rps.len(), 1);
    assert_eq!(rps[0].rp, rp);
    assert_eq!(rps[0].disks.len(), 2);
    // A late duplicate report changes nothing.
    let n = w.log.len();
    let events = w.report(
        job,
        &StepKind::CommitRecoveryPoint,
        ReportBody::Succeeded {
            result: StepResult::CommitRecoveryPoint,
        },
    );
    assert!(events.is_empty());
    assert_eq!(w.log.len(), n);
}

#[test]
fn retryable_failures_back_off_and_stale_attempts_are_ignored() {
    let mut w = World::new();
    let vm = setup(&mut w, 1)[0];
    let job = backup(&mut w, vm);
    w.report(job, &StepKind::Snapshot, ok_snapshot());
    let failed = w.report(
        job,
        &transfer("disk0"),
        ReportBody::Failed {
            class: FailureClass::Retryable,
            message: "io".into(),
        },
    );
    let JobEvent::StepRetryScheduled { at, .. } = failed[1] else {
        panic!("{failed:?}")
    };
    assert_eq!(at, w.now + w.cfg.retry_base_ms);
    assert_eq!(w.state.jobs[&job].state, JobState::Retrying);
    let stale = w.state.jobs[&job]
        .steps
        .iter()
        .find(|s| s.kind == transfer("disk0"))
        .unwrap()
        .clone();
    w.now = at;
    w.settle();
    let step = w.state.jobs[&job]
        .steps
        .iter()
        .find(|s| s.kind == transfer("disk0"))
        .unwrap()
        .clone();
    assert_eq!((step.status, step.attempt), (StepStatus::Dispatched, 2));
    let old = Report {
        step: stale.id,
        attempt: 1,
        job,
        partition: 0,
        epoch: 7,
        node: node(),
        body: ok_transfer("disk0"),
    };
    assert!(
        on_report(&w.state, &w.cfg, &old, w.now).is_empty(),
        "attempt 1 was superseded"
    );
    let wrong_epoch = Report {
        attempt: 2,
        epoch: 6,
        ..old
    };
    assert!(
        on_report(&w.state, &w.cfg, &wrong_epoch, w.now).is_empty(),
        "epoch 6 was superseded"
    );
    run_rest(&mut w, job);
    assert_eq!(w.state.jobs[&job].state, JobState::Succeeded);
}

fn run_rest(w: &mut World, job: JobId) {
    for kind in [transfer("disk0"), transfer("disk1")] {
        if w.state.jobs[&job]
            .steps
            .iter()
            .any(|s| s.kind == kind && s.status.in_flight())
        {
            let d = match &kind {
                StepKind::Transfer { disk } => disk.to_string(),
                _ => unreachable!(),
            };
            w.report(job, &kind, ok_transfer(&d));
        }
    }
    w.report(
        job,
        &StepKind::ReleaseSnapshot,
        ReportBody::Succeeded {
            result: StepResult::ReleaseSnapshot,
        },
    );
    w.report(
        job,
        &StepKind::CommitRecoveryPoint,
        ReportBody::Succeeded {
            result: StepResult::CommitRecoveryPoint,
        },
    );
}

#[test]
fn a_permanent_failure_still_releases_the_snapshot_then_fails_the_job() {
    let mut w = World::new();
    let vm = setup(&mut w, 1)[0];
    let job = backup(&mut w, vm);
    w.report(job, &StepKind::Snapshot, ok_snapshot());
    w.report(
        job,
        &transfer("disk0"),
        ReportBody::Failed {
            class: FailureClass::Permanent,
            message: "bad image".into(),
        },
    );
    assert_eq!(
        w.dispatched(job),
        vec![transfer("disk1")],
        "release waits for the running transfer"
    );
    w.report(job, &transfer("disk1"), ok_transfer("disk1"));
    assert_eq!(w.dispatched(job), vec![StepKind::ReleaseSnapshot]);
    w.report(
        job,
        &StepKind::ReleaseSnapshot,
        ReportBody::Succeeded {
            result: StepResult::ReleaseSnapshot,
        },
    );
    let j = &w.state.jobs[&job];
    assert_eq!(j.state, JobState::Failed);
    assert!(
        j.error
            .as_deref()
            .unwrap()
            .contains("Transfer disk0 failed: bad image"),
        "{:?}",
        j.error
    );
    assert!(!w.state.rps.contains_key(&vm));
}

#[test]
fn cancel_stops_new_steps_releases_and_ends_cancelled() {
    let mut w = World::new();
    let vm = setup(&mut w, 1)[0];
    let job = backup(&mut w, vm);
    w.report(job, &StepKind::Snapshot, ok_snapshot());
    w.submit(Command::CancelJob {
        job,
        reason: "operator".into(),
    })
    .unwrap();
    w.settle();
    w.report(
        job,
        &transfer("disk0"),
        ReportBody::Failed {
            class: FailureClass::Retryable,
            message: "cancelled".into(),
        },
    );
    assert_eq!(
        w.dispatched(job),
        vec![transfer("disk1")],
        "no retry after a cancel"
    );
    w.report(job, &transfer("disk1"), ok_transfer("disk1"));
    assert_eq!(w.dispatched(job), vec![StepKind::ReleaseSnapshot]);
    w.report(
        job,
        &StepKind::ReleaseSnapshot,
        ReportBody::Succeeded {
            result: StepResult::ReleaseSnapshot,
        },
    );
    assert_eq!(w.state.jobs[&job].state, JobState::Cancelled);
    assert_eq!(
        w.submit(Command::CancelJob {
            job,
            reason: "again".into()
        })
        .unwrap_err()
        .code(),
        ErrorCode::JobFinished
    );
}

#[test]
fn silent_steps_time_out_and_orphans_of_an_old_epoch_are_redispatched() {
    let mut w = World::new();
    let vm = setup(&mut w, 1)[0];
    let job = backup(&mut w, vm);
    w.now += w.cfg.heartbeat_timeout_ms;
    let events = w.settle();
    assert!(
        matches!(events[0], JobEvent::StepTimedOut { attempt: 1, .. }),
        "{events:?}"
    );
    let snap = w.state.jobs[&job].steps[0].clone();
    assert_eq!((snap.status, snap.attempt), (StepStatus::Dispatched, 2));
    // A restart: new epoch; the engine's grace for orphans is zero in the embedded server.
    w.epoch = 8;
    w.cfg.orphan_grace_ms = 0;
    w.settle();
    let snap = w.state.jobs[&job].steps[0].clone();
    assert_eq!(snap.attempt, 3);
    assert_eq!(snap.spec.unwrap().epoch, 8);
}

#[test]
fn per_node_limit_queues_the_fourth_backup_with_a_reason() {
    let mut w = World::new();
    let vms = setup(&mut w, 4);
    let jobs: Vec<JobId> = vms.iter().map(|vm| backup(&mut w, *vm)).collect();
    let states: Vec<JobState> = jobs.iter().map(|j| w.state.jobs[j].state).collect();
    assert_eq!(
        states,
        vec![
            JobState::Running,
            JobState::Running,
            JobState::Running,
            JobState::Queued
        ]
    );
    assert_eq!(
        w.state.jobs[&jobs[3]].wait,
        Some(cairn_schemas::WaitReason::NodeBusy)
    );
    let extra = w.id(JobId::new_v7);
    assert_eq!(
        w.submit(Command::RequestBackup {
            job: extra,
            vm: vms[0],
            mode: BackupMode::Incremental
        })
        .unwrap_err()
        .code(),
        ErrorCode::JobRunning
    );
    run_backup_to_success(&mut w, jobs[0]);
    assert_eq!(
        w.state.jobs[&jobs[3]].state,
        JobState::Running,
        "the queued job starts when a slot frees"
    );
}

#[test]
fn restore_requests_are_validated_and_planned_per_disk() {
    let mut w = World::new();
    let vm = setup(&mut w, 1)[0];
    let job = backup(&mut w, vm);
    run_backup_to_success(&mut w, job);
    let rp = w.state.rps[&vm][0].rp;
    let restore = w.id(JobId::new_v7);
    let bad = w.submit(Command::RequestRestore {
        job: restore,
        vm,
        rp,
        target: RecoveryTarget::CopyToFolder {
            node: node(),
            path: "relative/x".into(),
        },
    });
    assert_eq!(bad.unwrap_err().code(), ErrorCode::InvalidPath);
    let other_rp = cairn_schemas::RecoveryPointId::new_v7(1, [9; 10]);
    let unknown = w.submit(Command::RequestRestore {
        job: restore,
        vm,
        rp: other_rp,
        target: RecoveryTarget::CopyToFolder {
            node: node(),
            path: "/restore".into(),
        },
    });
    assert_eq!(unknown.unwrap_err().code(), ErrorCode::UnknownRp);
    w.submit(Command::RequestRestore {
        job: restore,
        vm,
        rp,
        target: RecoveryTarget::CopyToFolder {
            node: node(),
            path: "/restore".into(),
        },
    })
    .unwrap();
    w.settle();
    assert_eq!(w.dispatched(restore), vec![StepKind::PrepareRecovery]);
    w.report(restore, &StepKind::PrepareRecovery, ok_prepare());
    let specs: Vec<String> = w.state.jobs[&restore]
        .steps
        .iter()
        .filter_map(|s| match &s.spec.as_ref()?.work {
            StepWork::RestoreDisk {
                target_path,
                overwrite,
                ..
            } => {
                assert!(!overwrite);
                Some(target_path.clone())
            }
            StepWork::PrepareRecovery { .. } => None,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        specs,
        vec![
            "/restore/vm0-disk0.qcow2".to_string(),
            "/restore/vm0-disk1.qcow2".to_string()
        ]
    );
}

fn ok_prepare() -> ReportBody {
    ReportBody::Succeeded {
        result: StepResult::PrepareRecovery,
    }
}

fn ok_restore(d: &str, bytes_written: u64) -> ReportBody {
    ReportBody::Succeeded {
        result: StepResult::Restore {
            disk: d.parse().unwrap(),
            bytes_written,
        },
    }
}

fn restore_kind(d: &str) -> StepKind {
    StepKind::Restore {
        disk: d.parse().unwrap(),
    }
}

fn recover(
    w: &mut World,
    vm: VmId,
    target: RecoveryTarget,
    options: cairn_schemas::RecoveryOptions,
) -> Result<JobId, ControlError> {
    let rp = w.state.rps[&vm].last().unwrap().rp;
    let job = w.id(JobId::new_v7);
    w.submit(Command::RequestRecovery {
        job,
        vm,
        rp,
        target,
        options,
    })?;
    w.settle();
    Ok(job)
}

fn run_recovery_to_success(w: &mut World, job: JobId) {
    w.report(job, &StepKind::PrepareRecovery, ok_prepare());
    w.report(job, &restore_kind("disk0"), ok_restore("disk0", 4096));
    w.report(job, &restore_kind("disk1"), ok_restore("disk1", 0));
    w.report(
        job,
        &StepKind::FinishRecovery,
        ReportBody::Succeeded {
            result: StepResult::FinishRecovery {
                written: "/x.json".into(),
            },
        },
    );
}

#[test]
fn a_throttle_in_a_named_zone_reaches_the_restore_steps() {
    let mut w = World::new();
    let vm = setup(&mut w, 1)[0];
    let first = backup(&mut w, vm);
    run_backup_to_success(&mut w, first);
    let options = cairn_schemas::RecoveryOptions {
        throttle: Some(cairn_schemas::Throttle {
            work_bytes_per_sec: 1 << 20,
            off_bytes_per_sec: 0,
            work_days: cairn_schemas::Throttle::WEEKDAYS,
            work_start_minute: 480,
            work_end_minute: 1080,
            utc_offset_minutes: 600,
        }),
        ..Default::default()
    };
    let rp = w.state.rps[&vm].last().unwrap().rp;
    let in_zone = |job, timezone: &str| Command::RequestRecoveryInZone {
        job,
        vm,
        rp,
        target: RecoveryTarget::OriginalVm,
        options: options.clone(),
        timezone: timezone.into(),
    };
    // A zone the orchestrator cannot read is refused, naming it.
    let bad = w.id(JobId::new_v7);
    let err = w.submit(in_zone(bad, "Mars/Olympus")).unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidRequest);
    assert!(err.to_string().contains("\"Mars/Olympus\""), "{err}");
    // Refused, the id is still free.
    let job = bad;
    w.submit(in_zone(job, "Australia/Sydney")).unwrap();
    w.settle();
    assert_eq!(
        w.state.recoveries[&job].timezone.as_deref(),
        Some("Australia/Sydney")
    );
    w.report(job, &StepKind::PrepareRecovery, ok_prepare());
    let zones: Vec<&str> = w.state.jobs[&job]
        .steps
        .iter()
        .filter_map(|step| match step.spec.as_ref().map(|s| &s.work) {
            Some(StepWork::RestoreDiskInZone { timezone, .. }) => Some(timezone.as_str()),
            Some(StepWork::RestoreDisk { .. }) => panic!("a restore step without its zone"),
            _ => None,
        })
        .collect();
    assert!(!zones.is_empty());
    assert!(zones.iter().all(|z| *z == "Australia/Sydney"), "{zones:?}");
    run_recovery_to_success(&mut w, job);
    assert_eq!(w.state.jobs[&job].state, JobState::Succeeded);
}

#[test]
fn recovery_to_the_original_vm_overwrites_its_disks_and_excludes_backups() {
    let mut w = World::new();
    let vm = setup(&mut w, 1)[0];
    let first = backup(&mut w, vm);
    run_backup_to_success(&mut w, first);
    let throttle = cairn_schemas::Throttle {
        work_bytes_per_sec: 1 << 20,
        off_bytes_per_sec: 0,
        work_days: cairn_schemas::Throttle::WEEKDAYS,
        work_start_minute: 480,
        work_end_minute: 1080,
        utc_offset_minutes: 0,
    };
    let options = cairn_schemas::RecoveryOptions {
        throttle: Some(throttle.clone()),
        notify_email: vec!["ops@example.com".into()],
        ..Default::default()
    };
    // A backup is running: the recovery waits for the VM.
    let running = backup(&mut w, vm);
    let job = recover(&mut w, vm, RecoveryTarget::OriginalVm, options.clone()).unwrap();
    assert_eq!(w.state.jobs[&job].state, JobState::Queued);
    assert_eq!(
        w.state.jobs[&job].wait,
        Some(cairn_schemas::WaitReason::VmBusy)
    );
    // A second recovery over the same disks is refused while the first is open.
    let again = recover(&mut w, vm, RecoveryTarget::OriginalVm, options.clone());
    assert_eq!(again.unwrap_err().code(), ErrorCode::JobRunning);
    run_backup_to_success(&mut w, running);
    w.settle();
    assert_eq!(w.state.jobs[&job].state, JobState::Running);
    assert_eq!(w.state.recoveries[&job].options, options);
    // While it runs, a new backup of the VM waits.
    let blocked = backup(&mut w, vm);
    assert_eq!(
        w.state.jobs[&blocked].wait,
        Some(cairn_schemas::WaitReason::VmBusy)
    );
    w.report(job, &StepKind::PrepareRecovery, ok_prepare());
    for step in &w.state.jobs[&job].steps {
        if let Some(StepWork::RestoreDisk {
            target_path,
            overwrite,
            throttle: t,
            ..
        }) = step.spec.as_ref().map(|s| &s.work)
        {
            assert!(overwrite);
            assert!(target_path.starts_with("/vms/disk"), "{target_path}");
            assert_eq!(t.as_ref(), Some(&throttle));
        }
    }
    run_recovery_to_success(&mut w, job);
    assert_eq!(w.state.jobs[&job].state, JobState::Succeeded);
    assert_eq!(w.state.recoveries[&job].bytes_written, 4096);
    assert_eq!(
        w.state.recoveries[&job].pending(),
        vec!["mailto:ops@example.com"]
    );
    // The VM keeps its group; the queued backup now runs and reads every block.
    assert!(super::jobs::recovered_since_last_rp(&w.state, vm));
    w.settle();
    assert_eq!(w.state.jobs[&blocked].state, JobState::Running);
    w.report(
        blocked,
        &StepKind::Snapshot,
        ReportBody::Succeeded {
            result: StepResult::Snapshot {
                snapshot: "snap".into(),
                consistency: Consistency::Crash,
                tracking: vec![cairn_schemas::DiskTracking {
                    disk: "disk0".parse().unwrap(),
                    bitmap: "b0".into(),
                }],
            },
        },
    );
    let transfer_spec = w.state.jobs[&blocked]
        .steps
        .iter()
        .find_map(|s| match s.spec.as_ref().map(|s| &s.work) {
            Some(StepWork::Transfer {
                change_tracking,
                parent_rp,
                ..
            }) => Some((change_tracking.clone(), *parent_rp)),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        transfer_spec.0, None,
        "no bitmap after a recovery over the disks"
    );
    assert_eq!(transfer_spec.1, Some(w.state.rps[&vm].last().unwrap().rp));
}

#[test]
fn a_report_from_another_node_than_the_steps_is_refused_and_recorded() {
    let mut w = World::new();
    let vm = setup(&mut w, 1)[0];
    let job = backup(&mut w, vm);
    let step = w.state.jobs[&job].steps[0].clone();
    let spec = step.spec.clone().unwrap();
    let z: NodeId = "node-z".parse().unwrap();
    let forged = Report {
        step: step.id,
        attempt: step.attempt,
        job,
        partition: 0,
        epoch: spec.epoch,
        node: z.clone(),
        body: ok_snapshot(),
    };
    let refusal = |sender: Option<&NodeId>, claimed: &NodeId| Command::RecordRefusedReport {
        node: sender.unwrap_or(claimed).clone(),
        claimed_node: claimed.clone(),
        dispatched_to: Some(node()),
        job,
        step: step.id,
    };
    // Node z names itself, for a step dispatched to another node (in-process or on its own
    // subject).
    assert_eq!(
        super::jobs::refused_report(&w.state, &forged, None),
        Some(refusal(None, &z))
    );
    assert_eq!(
        super::jobs::refused_report(&w.state, &forged, Some(&z)),
        Some(refusal(Some(&z), &z))
    );
    assert!(on_report(&w.state, &w.cfg, &forged, w.now).is_empty());
    // The report names the step's own node, but came on node z's subject: forged.
    let own = Report {
        node: node(),
        ..forged
    };
    assert_eq!(
        super::jobs::refused_report(&w.state, &own, Some(&z)),
        Some(refusal(Some(&z), &node()))
    );
    // From the step's own node, on its own subject, it is taken.
    assert_eq!(super::jobs::refused_report(&w.state, &own, None), None);
    assert_eq!(
        super::jobs::refused_report(&w.state, &own, Some(&node())),
        None
    );
    assert!(!on_report(&w.state, &w.cfg, &own, w.now).is_empty());
    // A report for a step that does not exist, from another node's subject, is refused too.
    let unknown = Report {
        step: StepId::new_v7(1, [9; 10]),
        ..own.clone()
    };
    assert!(matches!(
        super::jobs::refused_report(&w.state, &unknown, Some(&z)),
        Some(Command::RecordRefusedReport {
            dispatched_to: None,
            ..
        })
    ));

    // Recorded on node z (registered or not), the refusal raises a Critical alert naming
    // both nodes.
    assert!(!w.state.nodes.contains_key(&z));
    w.submit(refusal(Some(&z), &node())).unwrap();
    assert!(
        !w.state.nodes.contains_key(&z),
        "a refusal registers nothing"
    );
    let alert = w
        .state
        .alerts
        .active
        .values()
        .find(|a| a.kind == crate::policy::alerts::AlertKind::ForeignReport)
        .expect("a foreign-report alert");
    assert_eq!(alert.severity, crate::policy::alerts::Severity::Critical);
    assert_eq!(alert.subject, "node-z");
    assert!(
        alert
            .message
            .starts_with(&format!("Node node-z reported for node {}", node())),
        "{}",
        alert.message
    );
}

#[test]
fn a_recovery_reads_the_repository_its_point_was_written_to() {
    let mut w = World::new();
    let vm = setup(&mut w, 1)[0];
    let first = backup(&mut w, vm);
    run_backup_to_success(&mut w, first);
    assert_eq!(w.state.rps[&vm][0].repository, "/repo");
    // The VM then joins a group that writes elsewhere.
    w.submit(Command::RegisterRepositories {
        node: node(),
        names: vec!["offsite".into()],
        app_owner_roots: vec![],
    })
    .unwrap();
    let group = w.id(GroupId::new_v7);
    w.submit(Command::CreateGroup {
        group,
        name: "moved".into(),
        members: vec![vm],
        policy: GroupPolicy::with_defaults("offsite"),
    })
    .unwrap();
    w.settle();
    let target = RecoveryTarget::CopyToFolder {
        node: node(),
        path: "/copies".into(),
    };
    let job = recover(&mut w, vm, target, Default::default()).unwrap();
    w.report(job, &StepKind::PrepareRecovery, ok_prepare());
    let restores: Vec<String> = w.state.jobs[&job]
        .steps
        .iter()
        .filter_map(|s| match s.spec.as_ref().map(|spec| &spec.work) {
            Some(StepWork::RestoreDisk { repository, .. }) => Some(repository.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(restores, ["/repo", "/repo"]);
}

#[test]
fn recovery_to_another_host_names_a_new_vm_and_runs_there() {
    let mut w = World::new();
    let vm = setup(&mut w, 1)[0];
    let first = backup(&mut w, vm);
    run_backup_to_success(&mut w, first);
    let other: NodeId = "node-b".parse().unwrap();
    let target = RecoveryTarget::AlternateHost {
        node: other.clone(),
        path: "/dr".into(),
        format: ImageFormat::Vhdx,
    };
    assert_eq!(
        recover(&mut w, vm, target.clone(), Default::default())
            .unwrap_err()
            .code(),
        ErrorCode::UnknownNode
    );
    w.submit(Command::RegisterNode {
        node: other.clone(),
        cluster: "c1".into(),
        worker_version: "1".into(),
    })
    .unwrap();
    let bad = cairn_schemas::RecoveryOptions {
        webhooks: vec!["http://x.org/".into()],
        ..Default::default()
    };
    assert_eq!(
        recover(&mut w, vm, target.clone(), bad).unwrap_err().code(),
        ErrorCode::InvalidRequest
    );
    let job = recover(&mut w, vm, target, Default::default()).unwrap();
    let prepare = w.state.jobs[&job].steps[0].spec.clone().unwrap();
    assert_eq!(prepare.node, other);
    let StepWork::PrepareRecovery { disks, vm_name, .. } = &prepare.work else {
        panic!("{prepare:?}");
    };
    assert_eq!(vm_name, "vm0-recovered");
    assert_eq!(disks[0].image_path, "/dr/vm0-recovered-disk0.vhdx");
    run_recovery_to_success(&mut w, job);
    let view = super::read::job(&w.state, &w.state.jobs[&job]);
    let recovery = view.recovery.unwrap();
    assert_eq!(recovery.target, "host");
    assert!(recovery.note.unwrap().contains("not highly available"));
    assert_ne!(recovery.new_vm.unwrap(), vm.to_string());
}

#[test]
fn recoveries_beyond_the_limit_wait_for_a_slot() {
    let mut w = World::new();
    w.cfg.recoveries_per_node = 2;
    let vm = setup(&mut w, 1)[0];
    let first = backup(&mut w, vm);
    run_backup_to_success(&mut w, first);
    let folder = |i: usize| RecoveryTarget::CopyToFolder {
        node: node(),
        path: format!("/out/{i}"),
    };
    let jobs: Vec<JobId> = (0..3)
        .map(|i| recover(&mut w, vm, folder(i), Default::default()).unwrap())
        .collect();
    let states: Vec<JobState> = jobs.iter().map(|j| w.state.jobs[j].state).collect();
    assert_eq!(
        states,
        vec![JobState::Running, JobState::Running, JobState::Queued]
    );
    assert_eq!(
        w.state.jobs[&jobs[2]].wait,
        Some(cairn_schemas::WaitReason::NodeBusy)
    );
    run_recovery_to_success(&mut w, jobs[0]);
    w.settle();
    assert_eq!(w.state.jobs[&jobs[2]].state, JobState::Running);
}

#[test]
fn item_recoveries_are_validated_and_planned_as_one_extract_step() {
    let mut w = World::new();
    let vm = setup(&mut w, 1)[0];
    let job = backup(&mut w, vm);
    run_backup_to_success(&mut w, job);
    let rp = w.state.rps[&vm][0].rp;
    let disk = w.state.rps[&vm][0].disks[0].disk.clone();
    let target = |items: Vec<&str>, disk: &str| RecoveryTarget::ItemLevel {
        node: node(),
        disk: cairn_schemas::DiskId::new(disk).unwrap(),
        items: items.into_iter().map(String::from).collect(),
        path: "/srv/items".into(),
    };
    let recovery = w.id(JobId::new_v7);
    for (items, disk_name, code) in [
        (vec!["/p2/../etc"], disk.as_str(), ErrorCode::InvalidPath),
        (vec!["etc/hosts"], disk.as_str(), ErrorCode::InvalidPath),
        (vec!["/"], disk.as_str(), ErrorCode::InvalidPath),
        (vec![], disk.as_str(), ErrorCode::InvalidRequest),
        (vec!["/p2/etc/hosts"], "nodisk", ErrorCode::UnknownDisk),
    ] {
        let refused = w.submit(Command::RequestRestore {
            job: recovery,
            vm,
            rp,
            target: target(items.clone(), disk_name),
        });
        assert_eq!(refused.unwrap_err().code(), code, "{items:?} {disk_name}");
    }
    w.submit(Command::RequestRestore {
        job: recovery,
        vm,
        rp,
        target: target(vec!["/p2/etc/hosts", "/p1/EFI"], disk.as_str()),
    })
    .unwrap();
    w.settle();
    let steps = &w.state.jobs[&recovery].steps;
    assert_eq!(steps.len(), 1);
    match &steps[0].spec.as_ref().unwrap().work {
        StepWork::ExtractItems {
            disk: d,
            rp: r,
            items,
            target_path,
            ..
        } => {
            assert_eq!((d, r), (&disk, &rp));
            assert_eq!(items, &["/p2/etc/hosts".to_string(), "/p1/EFI".to_string()]);
            assert_eq!(target_path, "/srv/items");
        }
        other => panic!("{other:?}"),
    }
}

/// Drives a random mix of commands and worker outcomes and returns the log it produced.
fn random_history(seed: u64, steps: usize) -> Vec<StoredEvent> {
    let mut w = World::new();
    let vms = setup(&mut w, 3);
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..steps {
        let r = next();
        w.now += r % 5_000;
        match r % 7 {
            0 | 1 => {
                let vm = vms[(r >> 8) as usize % vms.len()];
                let job = w.id(JobId::new_v7);
                let _ = w.submit(Command::RequestBackup {
                    job,
                    vm,
                    mode: BackupMode::Incremental,
                });
            }
            2 => {
                if let Some(job) = w
                    .state
                    .jobs
                    .values()
                    .find(|j| !j.state.is_terminal())
                    .map(|j| j.id)
                {
                    let _ = w.submit(Command::CancelJob {
                        job,
                        reason: "random".into(),
                    });
                }
            }
            _ => {
                let in_flight: Vec<(JobId, StepKind)> = w
                    .state
                    .jobs
                    .values()
                    .flat_map(|j| {
                        j.steps
                            .iter()
                            .filter(|s| s.status.in_flight())
                            .map(move |s| (j.id, s.kind.clone()))
                    })
                    .collect();
                if let Some((job, kind)) = in_flight
                    .get((r >> 16) as usize % in_flight.len().max(1))
                    .cloned()
                {
                    let body = match (r >> 24) % 4 {
                        0 => ReportBody::Failed {
                            class: FailureClass::Retryable,
                            message: "flaky".into(),
                        },
                        1 if (r >> 30) % 3 == 0 => ReportBody::Failed {
                            class: FailureClass::Permanent,
                            message: "broken".into(),
                        },
                        _ => match &kind {
                            StepKind::Snapshot => ok_snapshot(),
                            StepKind::Transfer { disk } => ok_transfer(disk.as_str()),
                            StepKind::ReleaseSnapshot => ReportBody::Succeeded {
                                result: StepResult::ReleaseSnapshot,
                            },
                            StepKind::CommitRecoveryPoint => ReportBody::Succeeded {
                                result: StepResult::CommitRecoveryPoint,
                            },
                            StepKind::Restore { disk } => ReportBody::Succeeded {
                                result: StepResult::Restore {
                                    disk: disk.clone(),
                                    bytes_written: 1,
                                },
                            },
                            StepKind::PrepareRecovery => ReportBody::Succeeded {
                                result: StepResult::PrepareRecovery,
                            },
                            StepKind::FinishRecovery => ReportBody::Succeeded {
                                result: StepResult::FinishRecovery {
                                    written: String::new(),
                                },
                            },
                            StepKind::ExtractItems { disk } => ReportBody::Succeeded {
                                result: StepResult::ExtractItems {
                                    disk: disk.clone(),
                                    files: 1,
                                    dirs: 0,
                                    bytes: 1,
                                    skipped: vec![],
                                },
                            },
                            other => ok_policy_step(other),
                        },
                    };
                    w.report(job, &kind, body);
                }
            }
        }
        w.settle();
    }
    w.log
}

fn replay(events: &[StoredEvent]) -> State {
    let mut state = State::default();
    for e in events {
        state.apply(e);
    }
    state
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    #[test]
    fn projection_laws_hold(seed in any::<u64>(), steps in 10usize..120, cut in 0.0f64..1.0) {
        let log = random_history(seed, steps);
        // Deterministic: two replays agree.
        let full = replay(&log);
        prop_assert_eq!(&replay(&log), &full);
        // Duplicates are no-ops: every event delivered twice gives the same state.
        let mut doubled = State::default();
        for e in &log {
            doubled.apply(e);
            doubled.apply(e);
        }
        prop_assert_eq!(&doubled, &full);
        // Snapshot + tail = full replay, at any cut.
        let at = (log.len() as f64 * cut) as usize;
        let mut from_snapshot = snapshot::decode(&snapshot::encode(&replay(&log[..at]))).unwrap();
        for e in &log[at..] {
            from_snapshot.apply(e);
        }
        prop_assert_eq!(&from_snapshot, &full);
        // At most one recovery point per job, and only for succeeded backups.
        for (vm, rps) in &full.rps {
            for rp in rps {
                let job = &full.jobs[&rp.job.unwrap()];
                prop_assert_eq!(job.vm, *vm);
                prop_assert_eq!(job.state, JobState::Succeeded);
            }
            let mut jobs: Vec<_> = rps.iter().map(|r| r.job).collect();
            jobs.dedup();
            prop_assert_eq!(jobs.len(), rps.len());
        }
    }
}

#[test]
fn a_damaged_snapshot_is_refused() {
    let log = random_history(3, 40);
    let mut bytes = snapshot::encode(&replay(&log));
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    assert!(snapshot::decode(&bytes).is_err());
    assert!(snapshot::decode(b"CAIRNSNP\x02").is_err());
}

/// What a transfer spec was handed: (parent recovery point, change-tracking bitmap).
type TransferInputs = (Option<cairn_schemas::RecoveryPointId>, Option<String>);

fn tracked_snapshot(bitmap: &str) -> ReportBody {
    ReportBody::Succeeded {
        result: StepResult::Snapshot {
            snapshot: format!("qemu1;{bitmap}"),
            consistency: Consistency::Application,
            tracking: ["disk0", "disk1"]
                .iter()
                .map(|d| cairn_schemas::DiskTracking {
                    disk: d.parse().unwrap(),
                    bitmap: bitmap.into(),
                })
                .collect(),
        },
    }
}

fn transfer_read(d: &str, incremental: bool) -> ReportBody {
    ReportBody::Succeeded {
        result: StepResult::Transfer {
            disk: d.parse().unwrap(),
            bytes_read: 100,
            bytes_stored: 10,
            incremental,
        },
    }
}

/// The transfer spec of `disk` in `job`: (parent, change tracking).
fn transfer_inputs(world: &World, job: JobId, d: &str) -> TransferInputs {
    let step = world.state.jobs[&job]
        .steps
        .iter()
        .find(|s| s.kind == transfer(d))
        .unwrap();
    match &step.spec.as_ref().expect("dispatched").work {
        StepWork::Transfer {
            parent_rp,
            change_tracking,
            ..
        } => (*parent_rp, change_tracking.clone()),
        other => panic!("{other:?}"),
    }
}

/// Runs a backup whose snapshot starts `bitmap`; transfers report `incremental`. Applies the
/// VM events the service derives from each report (lost change tracking).
fn tracked_backup(
    world: &mut World,
    vm: VmId,
    bitmap: &str,
    incremental: bool,
) -> (JobId, Vec<TransferInputs>) {
    let job = backup(world, vm);
    world.report(job, &StepKind::Snapshot, tracked_snapshot(bitmap));
    let inputs = vec![
        transfer_inputs(world, job, "disk0"),
        transfer_inputs(world, job, "disk1"),
    ];
    for d in ["disk0", "disk1"] {
        let step = world.state.jobs[&job]
            .steps
            .iter()
            .find(|s| s.kind == transfer(d))
            .unwrap()
            .clone();
        let spec = step.spec.clone().unwrap();
        let report = Report {
            step: step.id,
            attempt: step.attempt,
            job,
            partition: 0,
            epoch: spec.epoch,
            node: spec.node,
            body: transfer_read(d, incremental),
        };
        let lost = super::jobs::tracking_events(&world.state, &report);
        if !lost.is_empty() {
            world.commit(Emit::new(
                Aggregate::Vm(vm),
                lost.into_iter().map(Event::from).collect(),
            ));
        }
        world.report(job, &transfer(d), transfer_read(d, incremental));
    }
    for (kind, result) in [
        (StepKind::ReleaseSnapshot, StepResult::ReleaseSnapshot),
        (
            StepKind::CommitRecoveryPoint,
            StepResult::CommitRecoveryPoint,
        ),
    ] {
        world.report(job, &kind, ReportBody::Succeeded { result });
    }
    assert_eq!(world.state.jobs[&job].state, JobState::Succeeded);
    (job, inputs)
}

fn tracking_view(world: &World, vm: VmId) -> Vec<String> {
    super::read::vms(&world.state)
        .into_iter()
        .find(|v| v.vm == vm.to_string())
        .unwrap()
        .disks
        .into_iter()
        .map(|d| d.change_tracking)
        .collect()
}

#[test]
fn the_parent_snapshots_bitmap_flows_into_the_next_transfer() {
    let mut w = World::new();
    let vm = setup(&mut w, 1)[0];
    assert_eq!(tracking_view(&w, vm), vec!["none", "none"]);
    let (job1, inputs1) = tracked_backup(&mut w, vm, "cairn-b1", false);
    // First backup: no parent, nothing to trust; not a loss either.
    assert_eq!(inputs1, vec![(None, None), (None, None)]);
    assert_eq!(tracking_view(&w, vm), vec!["active", "active"]);
    let rp1 = w.state.jobs[&job1].committed_rp;
    let (job2, inputs2) = tracked_backup(&mut w, vm, "cairn-b2", true);
    assert_eq!(
        inputs2,
        vec![
            (rp1, Some("cairn-b1".into())),
            (rp1, Some("cairn-b1".into()))
        ]
    );
    let rp2 = w.state.jobs[&job2].committed_rp;
    // A failed backup does not move tracking: the next one still reads since rp2 with b2.
    let failed = backup(&mut w, vm);
    w.report(failed, &StepKind::Snapshot, tracked_snapshot("cairn-b3"));
    w.report(
        failed,
        &transfer("disk0"),
        ReportBody::Failed {
            class: FailureClass::Permanent,
            message: "disk gone".into(),
        },
    );
    run_rest(&mut w, failed);
    assert_eq!(w.state.jobs[&failed].state, JobState::Failed);
    let (_, inputs4) = tracked_backup(&mut w, vm, "cairn-b4", true);
    assert_eq!(inputs4[0], (rp2, Some("cairn-b2".into())));
    // An express full trusts no bitmap, and starts a new one.
    let job = w.id(JobId::new_v7);
    w.submit(Command::RequestBackup {
        job,
        vm,
        mode: BackupMode::ExpressFull,
    })
    .unwrap();
    w.settle();
    w.report(job, &StepKind::Snapshot, tracked_snapshot("cairn-b5"));
    assert_eq!(transfer_inputs(&w, job, "disk0").1, None);
}

#[test]
fn lost_change_tracking_is_recorded_shown_and_healed_by_the_next_backup() {
    // (what happens after a tracked backup, expected event reason fragment)
    let cases: Vec<(&str, &str)> = vec![
        (
            "worker-read-everything",
            "bitmap cairn-b1 was missing or unusable",
        ),
        (
            "disk-resized",
            "resized from 1073741824 to 2147483648 bytes",
        ),
    ];
    for (case, wanted) in cases {
        let mut w = World::new();
        let vm = setup(&mut w, 1)[0];
        tracked_backup(&mut w, vm, "cairn-b1", false);
        let next_incremental = match case {
            "worker-read-everything" => {
                // The worker was handed b1 but could not use it.
                let (_, inputs) = tracked_backup(&mut w, vm, "cairn-b2", false);
                assert_eq!(inputs[0].1.as_deref(), Some("cairn-b1"));
                // That backup started b2: tracking is active again.
                assert_eq!(tracking_view(&w, vm), vec!["active", "active"]);
                None
            }
            _ => {
                let mut big = disk("disk0");
                big.size_bytes = 2 << 30;
                w.submit(Command::ReportInventory {
                    node: node(),
                    vms: vec![VmInventory {
                        vm,
                        name: "vm0".into(),
                        disks: vec![big, disk("disk1")],
                        power: PowerState::Running,
                    }],
                })
                .unwrap();
                let view = tracking_view(&w, vm);
                assert!(
                    view[0].starts_with("lost: ") && view[0].contains(wanted),
                    "{view:?}"
                );
                assert_eq!(view[1], "active");
                Some(())
            }
        };
        let lost: Vec<String> = w
            .log
            .iter()
            .filter_map(|e| match &e.envelope.payload {
                Event::Vm(cairn_schemas::VmEvent::ChangeTrackingLost { reason, .. }) => {
                    Some(reason.clone())
                }
                _ => None,
            })
            .collect();
        assert!(
            !lost.is_empty() && lost.iter().all(|r| r.contains(wanted)),
            "{case}: {lost:?}"
        );
        if next_incremental.is_some() {
            // The resized disk's next transfer trusts nothing; the other disk keeps b1.
            let (_, inputs) = tracked_backup(&mut w, vm, "cairn-b2", true);
            assert_eq!(inputs[0].1, None, "{case}");
            assert_eq!(inputs[1].1.as_deref(), Some("cairn-b1"), "{case}");
            assert_eq!(tracking_view(&w, vm), vec!["active", "active"]);
        }
    }
}

#[test]
fn vms_move_within_a_cluster_with_their_tracking_and_never_across() {
    let mut w = World::new();
    let vm = setup(&mut w, 1)[0];
    tracked_backup(&mut w, vm, "cairn-b1", false);
    let inventory = |name: &str| VmInventory {
        vm,
        name: name.into(),
        disks: vec![disk("disk0"), disk("disk1")],
        power: PowerState::Running,
    };
    // (node, cluster, accepted)
    for (other, cluster, accepted) in [("node-c", "c2", false), ("node-b", "c1", true)] {
        w.submit(Command::RegisterNode {
            node: other.parse().unwrap(),
            cluster: cluster.into(),
            worker_version: "1".into(),
        })
        .unwrap();
        let result = w.submit(Command::ReportInventory {
            node: other.parse().unwrap(),
            vms: vec![inventory("vm0")],
        });
        let here = w.state.vms[&vm].node.to_string();
        if accepted {
            result.unwrap();
            assert_eq!(here, other);
        } else {
            let err = result.unwrap_err();
            assert_eq!(err.code(), ErrorCode::VmMovedAcrossClusters, "{err:?}");
            assert!(
                err.to_string().contains("move only within a cluster"),
                "{err}"
            );
            assert_eq!(here, "node-a", "nothing changed");
        }
    }
    // The next backup runs on node-b and stays incremental.
    let job = backup(&mut w, vm);
    w.report(job, &StepKind::Snapshot, tracked_snapshot("cairn-b2"));
    let spec = w.state.jobs[&job].steps[0].spec.clone().unwrap();
    assert_eq!(spec.node.to_string(), "node-b");
    assert_eq!(
        transfer_inputs(&w, job, "disk0").1.as_deref(),
        Some("cairn-b1")
    );
}

fn space_report(free_bytes: u64) -> Command {
    Command::ReportRepositorySpace {
        node: node(),
        repository: "/repo".into(),
        total_bytes: 100 << 30,
        free_bytes,
    }
}

#[test]
fn policy_commands_are_validated_and_jobs_fail_early_without_space() {
    let mut w = World::new();
    let vms = setup(&mut w, 2);
    for command in [
        Command::RequestConsistencyCheck {
            job: w.id(JobId::new_v7),
            vm: vms[0],
        },
        Command::RequestVerify {
            job: w.id(JobId::new_v7),
            vm: vms[0],
        },
    ] {
        assert_eq!(w.submit(command).unwrap_err().code(), ErrorCode::NoReplica);
    }
    let bad_seed = Command::ImportSeed {
        job: w.id(JobId::new_v7),
        vm: vms[0],
        seed: "relative/seed".into(),
    };
    assert_eq!(
        w.submit(bad_seed).unwrap_err().code(),
        ErrorCode::InvalidPath
    );

    // Space reports: recorded, small changes not worth an event, nonsense refused.
    w.submit(space_report(1 << 20)).unwrap();
    let events = w.log.len();
    w.submit(space_report((1 << 20) + 4096)).unwrap();
    assert_eq!(w.log.len(), events, "a change under 1% is not recorded");
    assert_eq!(w.state.space["/repo"].free_bytes, 1 << 20);
    let err = w
        .submit(Command::ReportRepositorySpace {
            node: node(),
            repository: "/repo".into(),
            total_bytes: 10,
            free_bytes: 11,
        })
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidRequest);

    // A first backup of 2 GiB into 1 MiB fails before it starts, saying why.
    let job = backup(&mut w, vms[0]);
    let found = &w.state.jobs[&job];
    assert_eq!(found.state, JobState::Failed);
    assert!(found.steps.is_empty(), "nothing was started");
    let error = found.error.clone().unwrap();
    assert!(error.contains("would run out of space"), "{error}");
    assert!(error.contains("2147483648"), "{error}");
    use crate::policy::alerts::AlertKind;
    let mut kinds: Vec<AlertKind> = w.state.alerts.active.keys().map(|(k, _)| *k).collect();
    kinds.sort();
    assert_eq!(kinds, vec![AlertKind::BackupFailed, AlertKind::StorageLow]);
    // With room it runs, and the success resolves the alert.
    w.submit(space_report(50 << 30)).unwrap();
    let job = backup(&mut w, vms[0]);
    run_backup_to_success(&mut w, job);
    assert_eq!(w.state.jobs[&job].state, JobState::Succeeded);
    assert!(
        w.state.alerts.active.is_empty(),
        "space and backup alerts resolved"
    );
    assert_eq!(w.state.alerts.resolved.len(), 2);
}

#[test]
fn a_crash_mid_backup_makes_the_replica_inconsistent_until_a_check_repairs_it() {
    let mut w = World::new();
    w.follow_ups = true;
    w.cfg.max_attempts = 1;
    let vm = setup(&mut w, 1)[0];
    let group = w.id(GroupId::new_v7);
    w.submit(Command::CreateGroup {
        group,
        name: "gold".into(),
        members: vec![vm],
        policy: GroupPolicy::with_defaults("/repo"),
    })
    .unwrap();
    let first = backup(&mut w, vm);
    run_backup_to_success(&mut w, first);
    assert!(
        w.state.vms[&vm]
            .disk_states
            .values()
            .all(|s| *s == cairn_schemas::DataSourceState::Protected)
    );

    // The worker dies during the transfer of disk0: the attempt times out, the job fails.
    let crashed = backup(&mut w, vm);
    w.report(crashed, &StepKind::Snapshot, ok_snapshot());
    w.report(crashed, &transfer("disk1"), ok_transfer("disk1"));
    w.now += w.cfg.heartbeat_timeout_ms + 1;
    w.settle();
    w.report(
        crashed,
        &StepKind::ReleaseSnapshot,
        ReportBody::Succeeded {
            result: StepResult::ReleaseSnapshot,
        },
    );
    assert_eq!(w.state.jobs[&crashed].state, JobState::Failed);
    let states = &w.state.vms[&vm].disk_states;
    assert_eq!(
        states[&"disk0".parse().unwrap()],
        cairn_schemas::DataSourceState::ReplicaInconsistent
    );
    assert_eq!(
        states[&"disk1".parse().unwrap()],
        cairn_schemas::DataSourceState::Protected,
        "disk1 was transferred completely"
    );
    let since = w.state.protection[&vm].inconsistent_since.unwrap();
    let kinds: Vec<_> = w.state.alerts.active.keys().map(|(k, _)| *k).collect();
    assert!(
        kinds.contains(&crate::policy::alerts::AlertKind::ReplicaInconsistent),
        "{kinds:?}"
    );
    // Backups wait; the scheduler asks for a check.
    let job = w.id(JobId::new_v7);
    let refused = w.submit(Command::RequestBackup {
        job,
        vm,
        mode: BackupMode::Incremental,
    });
    assert_eq!(refused.unwrap_err().code(), ErrorCode::ReplicaInconsistent);
    let due = super::protect::due_runs(&w.state, &crate::policy::tz::TimeZone::UTC, w.now);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].1, cairn_schemas::JobKind::ConsistencyCheck);

    // The check: snapshot, CheckDisk per disk, release, commit: a repaired recovery point.
    let check = w.id(JobId::new_v7);
    w.submit(Command::RequestConsistencyCheck { job: check, vm })
        .unwrap();
    w.settle();
    w.report(check, &StepKind::Snapshot, ok_snapshot());
    for d in ["disk0", "disk1"] {
        let kind = StepKind::CheckDisk {
            disk: d.parse().unwrap(),
        };
        let body = ok_policy_step(&kind);
        w.report(check, &kind, body);
    }
    w.report(
        check,
        &StepKind::ReleaseSnapshot,
        ReportBody::Succeeded {
            result: StepResult::ReleaseSnapshot,
        },
    );
    w.report(
        check,
        &StepKind::CommitRecoveryPoint,
        ReportBody::Succeeded {
            result: StepResult::CommitRecoveryPoint,
        },
    );
    assert_eq!(w.state.jobs[&check].state, JobState::Succeeded);
    assert!(
        w.state.vms[&vm]
            .disk_states
            .values()
            .all(|s| *s == cairn_schemas::DataSourceState::Protected)
    );
    let protection = &w.state.protection[&vm];
    assert_eq!(protection.inconsistent_since, None);
    assert_eq!(
        protection.paused,
        vec![(since, w.now)],
        "the retention pause is recorded"
    );
    let outcome = protection.last_check.unwrap();
    assert_eq!((outcome.chunks_compared, outcome.chunks_differing), (20, 2));
    assert_eq!(
        w.state.rps[&vm].len(),
        2,
        "the repaired recovery point is in the catalog"
    );
    assert!(
        !w.state
            .alerts
            .active
            .keys()
            .any(|(k, _)| *k == crate::policy::alerts::AlertKind::ReplicaInconsistent)
    );
}

#[test]
fn a_windowed_check_stops_when_its_window_has_run_out() {
    let mut w = World::new();
    let vm = setup(&mut w, 1)[0];
    let mut policy = GroupPolicy::with_defaults("/repo");
    policy.consistency_check = cairn_schemas::ConsistencyCheckPolicy {
        when_inconsistent: false,
        window: Some(cairn_schemas::ConsistencyCheckWindow {
            start: cairn_schemas::TimeOfDay::hm(2, 0),
            max_duration_minutes: 30,
            days: cairn_schemas::Weekdays::ALL,
        }),
    };
    let group = w.id(GroupId::new_v7);
    w.submit(Command::CreateGroup {
        group,
        name: "gold".into(),
        members: vec![vm],
        policy,
    })
    .unwrap();
    let first = backup(&mut w, vm);
    run_backup_to_success(&mut w, first);
    let check = w.id(JobId::new_v7);
    let emit = super::decide::request_job(
        &w.state,
        check,
        vm,
        cairn_schemas::JobKind::ConsistencyCheck,
        cairn_schemas::JobReason::ReplicaInconsistent,
    )
    .unwrap();
    w.commit(emit);
    w.settle();
    w.report(check, &StepKind::Snapshot, ok_snapshot());
    assert_eq!(w.state.jobs[&check].state, JobState::Running);
    w.now += 29 * 60_000;
    w.settle();
    assert!(
        !w.state.jobs[&check].cancel_requested,
        "still inside the window"
    );
    w.now += 2 * 60_000;
    w.settle();
    assert!(w.state.jobs[&check].cancel_requested);
    for d in ["disk0", "disk1"] {
        let kind = StepKind::CheckDisk {
            disk: d.parse().unwrap(),
        };
        w.report(
            check,
            &kind,
            ReportBody::Failed {
                class: FailureClass::Retryable,
                message: "step cancelled".into(),
            },
        );
    }
    w.report(
        check,
        &StepKind::ReleaseSnapshot,
        ReportBody::Succeeded {
            result: StepResult::ReleaseSnapshot,
        },
    );
    assert_eq!(w.state.jobs[&check].state, JobState::Cancelled);
}

#[test]
fn a_policy_naming_a_repository_no_node_registers_is_refused() {
    let mut w = World::new();
    let vms = setup(&mut w, 1);
    let create = |w: &mut World, name: &str, repository: &str| {
        let group = w.id(GroupId::new_v7);
        w.submit(Command::CreateGroup {
            group,
            name: name.into(),
            members: vec![],
            policy: GroupPolicy::with_defaults(repository),
        })
        .map(|_| group)
    };
    let err = create(&mut w, "g1", "default").unwrap_err();
    assert_eq!(err.code(), ErrorCode::UnknownRepository);
    assert!(err.to_string().contains("registered: none"), "{err}");
    // Bad registrations change nothing.
    for names in [
        vec![".hidden".to_string()],
        vec!["a/b".into()],
        vec![String::new()],
    ] {
        let err = w
            .submit(Command::RegisterRepositories {
                node: node(),
                names,
                app_owner_roots: vec![],
            })
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRequest);
    }
    w.submit(Command::RegisterRepositories {
        node: node(),
        names: vec!["offsite".into(), "default".into(), "default".into()],
        app_owner_roots: vec![],
    })
    .unwrap();
    assert_eq!(w.state.nodes[&node()].repositories, ["default", "offsite"]);
    let before = w.log.len();
    w.submit(Command::RegisterRepositories {
        node: node(),
        names: vec!["default".into(), "offsite".into()],
        app_owner_roots: vec![],
    })
    .unwrap();
    assert_eq!(
        w.log.len(),
        before,
        "an unchanged registration appends nothing"
    );
    let group = create(&mut w, "g1", "default").unwrap();
    let err = create(&mut w, "g2", "elsewhere").unwrap_err();
    assert_eq!(err.code(), ErrorCode::UnknownRepository);
    assert!(
        err.to_string().contains("registered: default, offsite"),
        "{err}"
    );
    // A path is left to the worker (groups made before repositories had names).
    create(&mut w, "g3", "/srv/cairn/repo").unwrap();
    // Changing a policy to an unregistered repository is refused; keeping it is not.
    let err = w
        .submit(Command::ChangeGroupPolicy {
            group,
            policy: GroupPolicy::with_defaults("elsewhere"),
        })
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::UnknownRepository);
    w.submit(Command::RegisterRepositories {
        node: node(),
        names: vec![],
        app_owner_roots: vec![],
    })
    .unwrap();
    let mut policy = GroupPolicy::with_defaults("default");
    policy.retention_days = 30;
    w.submit(Command::ChangeGroupPolicy { group, policy })
        .unwrap();
    let _ = vms;
}

const DAY: u64 = 86_400_000;

/// A VM in group "g" (retention `retention_days`) with two recovery points, a day apart.
fn protected_vm_with_two_rps(w: &mut World, retention_days: u16) -> (VmId, GroupId) {
    let vm = setup(w, 1)[0];
    let group = w.id(GroupId::new_v7);
    let mut policy = GroupPolicy::with_defaults("/repo");
    policy.retention_days = retention_days;
    w.submit(Command::CreateGroup {
        group,
        name: "g".into(),
        members: vec![vm],
        policy,
    })
    .unwrap();
    for _ in 0..2 {
        let job = backup(w, vm);
        run_backup_to_success(w, job);
        w.now += DAY;
    }
    assert_eq!(w.state.rps[&vm].len(), 2);
    (vm, group)
}

fn restore_to_folder(w: &mut World, vm: VmId, rp: cairn_schemas::RecoveryPointId) -> Command {
    Command::RequestRestore {
        job: w.id(JobId::new_v7),
        vm,
        rp,
        target: RecoveryTarget::CopyToFolder {
            node: node(),
            path: "/restore".into(),
        },
    }
}

fn deletion_alert_active(w: &World, vm: VmId) -> bool {
    w.state.alerts.active.contains_key(&(
        crate::policy::alerts::AlertKind::RecoveryPointsDeleted,
        vm.to_string(),
    ))
}

#[test]
fn a_deleted_recovery_point_is_listed_refused_for_recovery_and_can_be_undeleted() {
    let mut w = World::new();
    let (vm, _) = protected_vm_with_two_rps(&mut w, 30);
    let (old, newest) = (w.state.rps[&vm][0].rp, w.state.rps[&vm][1].rp);
    let deleted_at = w.now;
    w.submit(Command::DeleteRecoveryPoints { vm, rps: vec![old] })
        .unwrap();
    let deletion = w.state.rps[&vm][0].deleted.clone().expect("soft-deleted");
    assert_eq!(
        (deletion.at, deletion.purge_after, deletion.by.as_str()),
        (deleted_at, deleted_at + 14 * DAY, "test"),
        "14 days by default, and who deleted it"
    );
    let view = super::read::rps(&w.state, &vm);
    assert_eq!(
        (
            view[0].state.as_str(),
            view[0].purge_after,
            view[1].state.as_str()
        ),
        ("deleted", Some(deleted_at + 14 * DAY), "live")
    );
    let alert = &w.state.alerts.active[&(
        crate::policy::alerts::AlertKind::RecoveryPointsDeleted,
        vm.to_string(),
    )];
    assert_eq!(alert.severity, crate::policy::alerts::Severity::Warning);
    assert!(
        alert.message.contains("deleted by test") && alert.message.contains("purged after"),
        "{}",
        alert.message
    );

    // Not usable while deleted; the newest point still is.
    let refused = restore_to_folder(&mut w, vm, old);
    assert_eq!(w.submit(refused).unwrap_err().code(), ErrorCode::RpDeleted);
    let recovery = Command::RequestRecovery {
        job: w.id(JobId::new_v7),
        vm,
        rp: old,
        target: RecoveryTarget::CopyToFolder {
            node: node(),
            path: "/restore".into(),
        },
        options: Default::default(),
    };
    assert_eq!(w.submit(recovery).unwrap_err().code(), ErrorCode::RpDeleted);

    // Refusals that change nothing.
    let events = w.log.len();
    for (command, code) in [
        (
            Command::DeleteRecoveryPoints { vm, rps: vec![old] },
            ErrorCode::RpDeleted,
        ),
        (
            Command::UndeleteRecoveryPoints {
                vm,
                rps: vec![newest],
            },
            ErrorCode::RpNotDeleted,
        ),
        (
            Command::DeleteRecoveryPoints { vm, rps: vec![] },
            ErrorCode::InvalidRequest,
        ),
        (
            Command::DeleteRecoveryPoints {
                vm,
                rps: vec![newest, newest],
            },
            ErrorCode::InvalidRequest,
        ),
        (
            Command::DeleteRecoveryPoints {
                vm,
                rps: vec![cairn_schemas::RecoveryPointId::new_v7(1, [9; 10])],
            },
            ErrorCode::UnknownRp,
        ),
    ] {
        assert_eq!(w.submit(command).unwrap_err().code(), code);
    }
    assert_eq!(w.log.len(), events);

    // Retention does not count it (nothing is past retention), and nothing is purged yet.
    let known = w.state.vms[&vm].clone();
    let marks = super::protect::retention_marks(&w.state, &known, &[], w.now).unwrap();
    assert_eq!(
        marks.len(),
        1,
        "only the live point is retention's: {marks:?}"
    );
    assert!(super::protect::removals(&w.state, &known, w.now).is_empty());

    w.submit(Command::UndeleteRecoveryPoints { vm, rps: vec![old] })
        .unwrap();
    assert_eq!(w.state.rps[&vm][0].deleted, None);
    assert!(!deletion_alert_active(&w, vm), "resolved on undelete");
    let usable = restore_to_folder(&mut w, vm, old);
    w.submit(usable).unwrap();
}

#[test]
fn deleted_points_are_purged_by_prune_after_their_period_and_then_cannot_be_undeleted() {
    let mut w = World::new();
    let (vm, group) = protected_vm_with_two_rps(&mut w, 30);
    let old = w.state.rps[&vm][0].rp;
    w.submit(Command::SetSoftDeletePeriod { group, days: 3 })
        .unwrap();
    w.submit(Command::DeleteRecoveryPoints { vm, rps: vec![old] })
        .unwrap();
    let purge_after = w.now + 3 * DAY;
    assert_eq!(
        w.state.rps[&vm][0].deleted.as_ref().unwrap().purge_after,
        purge_after
    );
    assert!(super::protect::prune_candidates(&w.state, purge_after - 1).is_empty());

    w.now = purge_after;
    assert_eq!(super::protect::prune_candidates(&w.state, w.now), vec![vm]);
    let late = w.submit(Command::UndeleteRecoveryPoints { vm, rps: vec![old] });
    assert_eq!(late.unwrap_err().code(), ErrorCode::RpPurged);

    // The prune job removes it from the repository; the catalog forgets it.
    let prune = w.id(JobId::new_v7);
    let emit = super::decide::request_job(
        &w.state,
        prune,
        vm,
        cairn_schemas::JobKind::Prune,
        cairn_schemas::JobReason::Scheduled,
    )
    .unwrap();
    w.commit(emit);
    w.settle();
    for kind in w.dispatched(prune) {
        let StepKind::Prune { disk } = &kind else {
            panic!("a prune job prunes: {kind:?}");
        };
        let spec = w.state.jobs[&prune]
            .steps
            .iter()
            .find(|s| s.kind == kind)
            .and_then(|s| s.spec.clone())
            .unwrap();
        let StepWork::Prune { remove, .. } = &spec.work else {
            panic!("{spec:?}");
        };
        assert_eq!(remove, &vec![old], "only the purge-due point goes");
        let body = ReportBody::Succeeded {
            result: StepResult::Prune {
                disk: disk.clone(),
                removed: vec![old],
            },
        };
        w.report(prune, &kind, body);
    }
    assert_eq!(w.state.jobs[&prune].state, JobState::Succeeded);
    assert!(w.state.rps[&vm].iter().all(|r| r.rp != old), "purged");
    assert!(!deletion_alert_active(&w, vm), "resolved after the purge");
    let gone = w.submit(Command::UndeleteRecoveryPoints { vm, rps: vec![old] });
    assert_eq!(gone.unwrap_err().code(), ErrorCode::RpPurged);
}

#[test]
fn the_last_point_of_a_vm_stays_in_the_repository_when_every_point_is_deleted() {
    let mut w = World::new();
    let (vm, group) = protected_vm_with_two_rps(&mut w, 30);
    let rps: Vec<_> = w.state.rps[&vm].iter().map(|r| r.rp).collect();
    w.submit(Command::DeleteGroup {
        group,
        delete_recovery_points: true,
    })
    .unwrap();
    assert!(w.state.groups[&group].deleted);
    assert!(w.state.rps[&vm].iter().all(|r| r.deleted.is_some()));
    assert!(deletion_alert_active(&w, vm));
    w.now += 15 * DAY;
    let known = w.state.vms[&vm].clone();
    assert_eq!(
        super::protect::removals(&w.state, &known, w.now),
        vec![rps[0]],
        "a disk keeps one point: the newest stays (deleted) until a newer one exists"
    );
}

#[test]
fn soft_delete_periods_are_validated() {
    let mut w = World::new();
    let (_, group) = protected_vm_with_two_rps(&mut w, 30);
    let events = w.log.len();
    for days in [0, 91] {
        let refused = w.submit(Command::SetSoftDeletePeriod { group, days });
        assert_eq!(refused.unwrap_err().code(), ErrorCode::InvalidRequest);
    }
    let unknown = w.submit(Command::SetSoftDeletePeriod {
        group: GroupId::new_v7(1, [3; 10]),
        days: 7,
    });
    assert_eq!(unknown.unwrap_err().code(), ErrorCode::UnknownGroup);
    assert_eq!(w.log.len(), events);
    w.submit(Command::SetSoftDeletePeriod { group, days: 90 })
        .unwrap();
    assert_eq!(w.state.groups[&group].soft_delete_days, 90);
}

#[test]
fn a_retention_lock_holds_retention_and_deletions_and_is_lowered_only_later_by_an_admin() {
    let mut w = World::new();
    let (vm, group) = protected_vm_with_two_rps(&mut w, 30);
    let old = w.state.rps[&vm][0].rp;
    let lock = |days, by_admin| Command::SetRetentionLock {
        group,
        days,
        by_admin,
    };
    // An operator may raise it: immediate.
    w.submit(lock(20, false)).unwrap();
    assert_eq!(w.state.groups[&group].lock_days(w.now), 20);
    assert_eq!(
        w.submit(lock(31, false)).unwrap_err().code(),
        ErrorCode::LockAboveRetention
    );
    assert_eq!(
        w.submit(lock(449, true)).unwrap_err().code(),
        ErrorCode::InvalidRequest
    );

    // Retention below the lock is refused, naming the lock; at the lock is fine.
    let mut policy = w.state.groups[&group].policy.clone();
    policy.retention_days = 19;
    let refused = w
        .submit(Command::ChangeGroupPolicy {
            group,
            policy: policy.clone(),
        })
        .unwrap_err();
    assert_eq!(refused.code(), ErrorCode::RetentionLocked);
    assert!(refused.to_string().contains("lock of 20 days"), "{refused}");

    // Deleting younger points is refused, alone or with the group; nothing changes.
    let events = w.log.len();
    let refused = w
        .submit(Command::DeleteRecoveryPoints { vm, rps: vec![old] })
        .unwrap_err();
    assert_eq!(refused.code(), ErrorCode::RetentionLocked);
    assert!(refused.to_string().contains("retention lock of 20 days"));
    let refused = w.submit(Command::DeleteGroup {
        group,
        delete_recovery_points: true,
    });
    assert_eq!(refused.unwrap_err().code(), ErrorCode::RetentionLocked);
    assert_eq!(w.log.len(), events);
    assert!(!w.state.groups[&group].deleted);

    // Lowering: not for an operator; for an admin, only after the old lock's period.
    let refused = w.submit(lock(5, false)).unwrap_err();
    assert_eq!(
        (refused.code(), refused.status()),
        (ErrorCode::AdminRequired, 403)
    );
    assert_eq!(w.log.len(), events);
    let asked_at = w.now;
    w.submit(lock(5, true)).unwrap();
    let g = &w.state.groups[&group];
    assert_eq!(g.lock_days(w.now), 20, "the old lock still holds");
    assert_eq!(
        g.lock_pending.map(|p| (p.days, p.effective_at)),
        Some((5, asked_at + 20 * DAY))
    );
    let view = super::read_policy::group_detail(
        &w.state,
        g,
        "/repo",
        &crate::policy::tz::TimeZone::UTC,
        w.now,
    );
    assert_eq!(
        (
            view.retention_lock_days,
            view.retention_lock_pending.map(|p| p.days)
        ),
        (20, Some(5))
    );
    policy.retention_days = 10;
    let still = w.submit(Command::ChangeGroupPolicy {
        group,
        policy: policy.clone(),
    });
    assert_eq!(still.unwrap_err().code(), ErrorCode::RetentionLocked);

    // Once the period passed the lower lock is in force.
    w.now = asked_at + 20 * DAY;
    assert_eq!(w.state.groups[&group].lock_days(w.now), 5);
    w.submit(Command::ChangeGroupPolicy { group, policy })
        .unwrap();
    w.submit(Command::DeleteRecoveryPoints { vm, rps: vec![old] })
        .unwrap();

    // A raise cancels a pending lowering.
    w.submit(lock(8, false)).unwrap();
    w.submit(lock(2, true)).unwrap();
    w.submit(lock(8, false)).unwrap();
    let g = &w.state.groups[&group];
    assert_eq!((g.lock_days(w.now + 30 * DAY), g.lock_pending), (8, None));
}

#[test]
fn the_lock_of_the_group_a_point_was_made_for_outlives_the_group() {
    let mut w = World::new();
    let (vm, group) = protected_vm_with_two_rps(&mut w, 30);
    w.submit(Command::SetRetentionLock {
        group,
        days: 30,
        by_admin: false,
    })
    .unwrap();
    // Deleting the group without its points, then deleting them one by one, is still refused.
    w.submit(Command::DeleteGroup {
        group,
        delete_recovery_points: false,
    })
    .unwrap();
    let newest = w.state.rps[&vm][1].rp;
    let refused = w.submit(Command::DeleteRecoveryPoints {
        vm,
        rps: vec![newest],
    });
    assert_eq!(refused.unwrap_err().code(), ErrorCode::RetentionLocked);
}

#[test]
fn a_member_removed_with_its_data_has_its_points_soft_deleted_and_restorable() {
    let mut w = World::new();
    let (vm, group) = protected_vm_with_two_rps(&mut w, 30);
    let other = setup(&mut w, 1)[0];
    let edit =
        |add: Vec<VmId>, remove: Vec<VmId>, delete_recovery_points| Command::EditGroupMembers {
            group,
            add,
            remove,
            delete_recovery_points,
        };
    // Refusals change nothing.
    let events = w.log.len();
    for (command, code) in [
        (edit(vec![], vec![], false), ErrorCode::InvalidRequest),
        (edit(vec![], vec![other], false), ErrorCode::NotAMember),
        (edit(vec![other], vec![], true), ErrorCode::InvalidRequest),
        (edit(vec![vm], vec![vm], false), ErrorCode::InvalidRequest),
        (edit(vec![], vec![vm, vm], true), ErrorCode::InvalidRequest),
    ] {
        assert_eq!(w.submit(command).unwrap_err().code(), code);
    }
    assert_eq!(w.log.len(), events);

    // Added, then removed with its data: both points soft-deleted, the VM unprotected.
    w.submit(edit(vec![other], vec![], false)).unwrap();
    assert_eq!(w.state.vms[&other].group, Some(group));
    w.submit(edit(vec![], vec![vm], true)).unwrap();
    assert_eq!(w.state.vms[&vm].group, None);
    assert!(w.state.groups[&group].members == vec![other]);
    assert!(w.state.rps[&vm].iter().all(|r| r.deleted.is_some()));
    assert!(deletion_alert_active(&w, vm));
    let rps: Vec<_> = w.state.rps[&vm].iter().map(|r| r.rp).collect();
    w.submit(Command::UndeleteRecoveryPoints { vm, rps })
        .unwrap();
    assert!(w.state.rps[&vm].iter().all(|r| r.deleted.is_none()));

    // Without its data: the points stay live.
    let job = backup(&mut w, other);
    run_backup_to_success(&mut w, job);
    w.submit(edit(vec![], vec![other], false)).unwrap();
    assert_eq!(w.state.vms[&other].group, None);
    assert!(w.state.rps[&other].iter().all(|r| r.deleted.is_none()));
}

#[test]
fn a_retention_lock_refuses_removing_a_member_with_its_data() {
    let mut w = World::new();
    let (vm, group) = protected_vm_with_two_rps(&mut w, 30);
    w.submit(Command::SetRetentionLock {
        group,
        days: 7,
        by_admin: false,
    })
    .unwrap();
    let events = w.log.len();
    let err = w
        .submit(Command::EditGroupMembers {
            group,
            add: vec![],
            remove: vec![vm],
            delete_recovery_points: true,
        })
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::RetentionLocked, "{err}");
    assert_eq!(w.log.len(), events, "the whole change was refused");
    assert_eq!(w.state.vms[&vm].group, Some(group));
}
