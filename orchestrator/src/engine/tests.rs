//! State-machine tests of decide / reconcile / on_report, and property tests of the
//! projection laws: replay is deterministic, incremental = full rebuild, duplicates are no-ops,
//! snapshot + tail = full replay.

use cairn_schemas::{
    Aggregate, BackupMode, Command, Consistency, DiskInfo, Envelope, Event, FailureClass, GroupId,
    GroupPolicy, ImageFormat, JobEvent, JobId, JobState, NodeId, PowerState, RecoveryTarget,
    Report, ReportBody, StepKind, StepResult, StepWork, VmId, VmInventory,
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
        }
    }

    fn id<T>(&mut self, make: fn(u64, [u8; 10]) -> T) -> T {
        self.counter += 1;
        let mut rand = [0u8; 10];
        rand[..8].copy_from_slice(&self.counter.to_le_bytes());
        make(self.now, rand)
    }

    fn commit(&mut self, emit: Emit) {
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
    assert_eq!(err.code(), "unknown_node");
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
    assert_eq!(dup.unwrap_err().code(), "duplicate_group");
    let taken = w.submit(Command::CreateGroup {
        group: g2,
        name: "silver".into(),
        members: vec![vms[0]],
        policy: policy.clone(),
    });
    assert_eq!(taken.unwrap_err().code(), "vm_in_group");
    let ghost = w.id(VmId::new_v7);
    let unknown = w.submit(Command::CreateGroup {
        group: g2,
        name: "silver".into(),
        members: vec![ghost],
        policy: policy.clone(),
    });
    assert_eq!(unknown.unwrap_err().code(), "unknown_vm");
    let mut bad = policy;
    bad.retention_days = 0;
    let invalid = w.submit(Command::CreateGroup {
        group: g2,
        name: "silver".into(),
        members: vec![vms[1]],
        policy: bad,
    });
    assert_eq!(invalid.unwrap_err().code(), "invalid_policy");
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
        "job_finished"
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
        "job_running"
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
    assert_eq!(bad.unwrap_err().code(), "invalid_path");
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
    assert_eq!(unknown.unwrap_err().code(), "unknown_rp");
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
    let specs: Vec<String> = w.state.jobs[&restore]
        .steps
        .iter()
        .map(|s| match &s.spec.as_ref().unwrap().work {
            StepWork::Restore { target_path, .. } => target_path.clone(),
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
        (vec!["/p2/../etc"], disk.as_str(), "invalid_path"),
        (vec!["etc/hosts"], disk.as_str(), "invalid_path"),
        (vec!["/"], disk.as_str(), "invalid_path"),
        (vec![], disk.as_str(), "invalid_request"),
        (vec!["/p2/etc/hosts"], "nodisk", "unknown_disk"),
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
                            StepKind::ExtractItems { disk } => ReportBody::Succeeded {
                                result: StepResult::ExtractItems {
                                    disk: disk.clone(),
                                    files: 1,
                                    dirs: 0,
                                    bytes: 1,
                                    skipped: vec![],
                                },
                            },
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
