//! Start benchmark: the durable append rate and the replay rate of a realistic event log, the
//! raw sled write rate of the same bytes as a baseline, and how long `cairn up` takes to start
//! on that log, with and without a projection snapshot.
//!
//! `cargo run --release -p cairn-orchestrator --example start_bench [-- --events N] [--dir DIR]`
//!
//! The log is an installation's history: a node registers, reports 1,000 VMs with two disks
//! each, protection groups are created, then backup jobs run until the log holds `N` events
//! (default 1,000,000). The job events are made by the engine's own pure code (`request_backup`,
//! `reconcile`, `on_report`) against a private copy of the projections, so plans, step specs,
//! results and recovery points are what the engine would record: a backup of a VM with two disks
//! is JobRequested, JobStarted, then per step (snapshot, two transfers, release, commit)
//! StepDispatched, StepStarted, StepSucceeded, then RecoveryPointCommitted and JobSucceeded:
//! 19 events, stored as one append per job by 32 concurrent appenders (group commit).
//!
//! Runs in a temporary directory under DIR (default: the system temp dir), which should be on
//! the disk the log would live on: flush rates are fsync rates of that disk. The OS page cache
//! is warm throughout (the log was just written); "cold" means sled's own cache is empty (the
//! log was just opened).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_orchestrator::clock::SystemClock;
use cairn_orchestrator::engine::decide::{Emit, decide, request_backup};
use cairn_orchestrator::engine::jobs::{EngineConfig, Liveness, on_report, reconcile};
use cairn_orchestrator::engine::ports::StepSink;
use cairn_orchestrator::engine::service::{Engine, EngineOptions};
use cairn_orchestrator::engine::snapshot;
use cairn_orchestrator::engine::state::{State, StepStatus};
use cairn_orchestrator::log::{
    AppendRequest, EventLog, NewEvent, SledLog, SledLogConfig, StoredEvent,
};
use cairn_schemas::{
    Aggregate, BackupMode, Command, Consistency, DiskId, DiskInfo, DiskTracking, Envelope, Event,
    EventId, GroupId, GroupPolicy, ImageFormat, JobId, JobReason, NodeId, PowerState, Report,
    ReportBody, StepKind, StepResult, StepSpec, VmId, VmInventory,
};

/// 2026-01-01T00:00:00Z: the installation's first event.
const T0: u64 = 1_767_225_600_000;
const N_VMS: usize = 1_000;
const N_GROUPS: usize = 10;
/// Concurrent appenders while building the log.
const APPENDERS: usize = 32;
/// Events per `read_from` in the replay measurements (what `Engine::start` uses).
const READ_BATCH: usize = 16_384;
/// Events appended after the snapshot, before the snapshot start.
const TAIL_EVENTS: u64 = 10_000;
/// How often each VM is backed up (the default policy's synchronization frequency).
const SYNC_EVERY_MS: u64 = 15 * 60_000;
const REPOSITORY: &str = "/var/lib/cairn/repo";
const NODE: &str = "kvm-01";
const EPOCH: u64 = T0;
const ENGINE_ACTOR: &str = "orchestrator";

struct Args {
    events: u64,
    dir: PathBuf,
    repeat: usize,
    keep: bool,
    reuse: Option<PathBuf>,
}

const USAGE: &str =
    "usage: start_bench [--events N] [--dir DIR] [--repeat R] [--keep] [--reuse DIR]

  --events N    events in the log (default 1,000,000)
  --dir DIR     make the temporary directory under DIR (default: the system temp dir)
  --repeat R    runs of each replay and start measurement; the table shows the median
                (default 3)
  --keep        keep the directory (for --reuse)
  --reuse DIR   measure replay and start on the log of a --keep run (DIR/events) without
                building it: no append rates, and the snapshot is made at the tip minus
                10,000 events instead of before an append";

fn parse_args() -> Args {
    let mut args = Args {
        events: 1_000_000,
        dir: std::env::temp_dir(),
        repeat: 3,
        keep: false,
        reuse: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .unwrap_or_else(|| panic!("{name} needs a value\n{USAGE}"))
        };
        let mut number = |name: &str| {
            let text = value(name).replace(['_', ','], "");
            text.parse::<u64>()
                .unwrap_or_else(|_| panic!("{name} {text:?} is not a number\n{USAGE}"))
        };
        match arg.as_str() {
            "--events" => args.events = number("--events"),
            "--repeat" => args.repeat = number("--repeat").max(1) as usize,
            "--dir" => args.dir = PathBuf::from(value("--dir")),
            "--reuse" => args.reuse = Some(PathBuf::from(value("--reuse"))),
            "--keep" => args.keep = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    args
}

/// Ten bytes for a v7 id: a tag (what the id is for) and a counter, so every id is unique and
/// a run is reproducible.
fn rand10(tag: u8, n: u64) -> [u8; 10] {
    let mut bytes = [0u8; 10];
    bytes[0] = tag;
    bytes[2..].copy_from_slice(&n.to_be_bytes());
    bytes
}

fn node_id() -> NodeId {
    NodeId::new(NODE).unwrap()
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        repository: REPOSITORY.into(),
        orphan_grace_ms: 0,
        ..EngineConfig::default()
    }
}

fn engine_options(snapshot_path: &Path) -> EngineOptions {
    EngineOptions {
        config: engine_config(),
        epoch: EPOCH,
        actor: ENGINE_ACTOR.into(),
        snapshot_path: Some(snapshot_path.to_path_buf()),
        snapshot_every: 50_000,
        tick: Duration::from_millis(250),
        ownership: None,
    }
}

/// Steps go nowhere: the engine is started, never run.
struct NoSteps;

impl StepSink for NoSteps {
    fn dispatch(&self, _spec: StepSpec) {}
}

fn new_event(n: u64, at: u64, actor: &str, correlation: Option<JobId>, payload: Event) -> NewEvent {
    NewEvent {
        event_id: EventId::new_v7(at, rand10(0xe0, n)),
        actor: actor.into(),
        correlation,
        causation: None,
        traceparent: None,
        payload,
    }
}

// ------------------------------------------------------------------------------------------
// The job generator.

/// Makes backup jobs' events with the engine's pure code, against a private copy of the
/// projections that holds the installation plus the job being made (finished jobs are dropped
/// again, keeping only each VM's last recovery point, which the next transfer names as its
/// parent).
#[derive(Clone)]
struct JobMaker {
    state: State,
    /// The VMs, in id order.
    vms: Vec<VmId>,
    cfg: EngineConfig,
    now: u64,
    n_ids: u64,
    /// This maker's index: makes its ids unique among makers.
    index: u64,
}

/// The jobs of one appender.
struct Work {
    requests: Vec<AppendRequest>,
    n_events: u64,
}

impl JobMaker {
    fn new(base: &State, index: usize) -> Self {
        Self {
            state: base.clone(),
            vms: base.vms.keys().copied().collect(),
            cfg: engine_config(),
            now: T0,
            n_ids: 0,
            index: index as u64,
        }
    }

    fn next_id(&mut self, tag: u8) -> [u8; 10] {
        self.n_ids += 1;
        rand10(tag, (self.index << 40) | self.n_ids)
    }

    /// Applies events to the private projections (the way the engine's commit does) and
    /// records them for the append.
    fn record(&mut self, job: JobId, payloads: Vec<Event>, actor: &str, out: &mut Vec<NewEvent>) {
        let aggregate = Aggregate::Job(job);
        for payload in payloads {
            let event_id = EventId::new_v7(self.now, self.next_id(0xe1));
            let stored = StoredEvent {
                seq: self.state.last_seq + 1,
                envelope: Envelope {
                    event_id,
                    aggregate: aggregate.clone(),
                    aggregate_version: self.state.version(&aggregate) + 1,
                    recorded_at: self.now,
                    actor: actor.into(),
                    correlation: Some(job),
                    causation: None,
                    command: None,
                    traceparent: None,
                    prev_hash: [0; 32],
                    payload: payload.clone(),
                },
            };
            self.state.apply(&stored);
            out.push(NewEvent {
                event_id,
                actor: actor.into(),
                correlation: Some(job),
                causation: None,
                traceparent: None,
                payload,
            });
        }
    }

    /// Reconciles the job until it has nothing more to say, as `Engine::reconcile_job`.
    fn settle(&mut self, job: JobId, out: &mut Vec<NewEvent>) {
        for _ in 0..16 {
            let live = Liveness {
                last_report: HashMap::new(),
                started_at: self.now,
                last_refused: HashMap::new(),
            };
            let events = reconcile(
                &self.state,
                &self.cfg,
                EPOCH,
                &self.state.jobs[&job],
                &live,
                self.now,
            );
            if events.is_empty() {
                return;
            }
            self.record(
                job,
                events.into_iter().map(Event::from).collect(),
                ENGINE_ACTOR,
                out,
            );
        }
        panic!("job {job} did not settle");
    }

    /// What the worker returns for a step of `job`.
    fn result(&self, job: JobId, kind: &StepKind, round: u64) -> StepResult {
        let vm = &self.state.vms[&self.state.jobs[&job].vm];
        match kind {
            StepKind::Snapshot => {
                // Shaped like the image adapter's handle: vm, then per disk its identity.
                let mut handle = format!("image1;vm={}", vm.id);
                for (i, disk) in vm.disks.iter().enumerate() {
                    handle.push_str(&format!(
                        ";{}={},{},{}",
                        disk.disk,
                        disk.size_bytes,
                        1_700_000_000_000_000_000u64 + round * 1_000_000_007,
                        4_194_304 + i as u64
                    ));
                }
                StepResult::Snapshot {
                    snapshot: handle,
                    consistency: Consistency::Application,
                    tracking: vm
                        .disks
                        .iter()
                        .map(|d| DiskTracking {
                            disk: d.disk.clone(),
                            bitmap: format!("cairn-{job}-{}", d.disk),
                        })
                        .collect(),
                }
            }
            StepKind::Transfer { disk } => {
                let read = (64 << 20) + (round % 97) * (3 << 20);
                StepResult::Transfer {
                    disk: disk.clone(),
                    bytes_read: read,
                    bytes_stored: read / 3,
                    incremental: round > 0,
                }
            }
            StepKind::ReleaseSnapshot => StepResult::ReleaseSnapshot,
            StepKind::CommitRecoveryPoint => StepResult::CommitRecoveryPoint,
            StepKind::Restore { disk } => StepResult::Restore {
                disk: disk.clone(),
                bytes_written: 0,
            },
            StepKind::ExtractItems { disk } => StepResult::ExtractItems {
                disk: disk.clone(),
                files: 0,
                dirs: 0,
                bytes: 0,
                skipped: vec![],
            },
            StepKind::PrepareRecovery => StepResult::PrepareRecovery,
            StepKind::FinishRecovery => StepResult::FinishRecovery {
                written: String::new(),
            },
            other => {
                unreachable!("the benchmark's history has backups and restores only, not {other:?}")
            }
        }
    }

    /// A worker's report on a step, handled as `Engine::report` does.
    fn report(&mut self, job: JobId, step_index: usize, body: ReportBody, out: &mut Vec<NewEvent>) {
        let step = &self.state.jobs[&job].steps[step_index];
        let report = Report {
            step: step.id,
            attempt: step.attempt,
            job,
            partition: 0,
            epoch: step.spec.as_ref().map_or(0, |s| s.epoch),
            node: step.node.clone().unwrap_or_else(node_id),
            body,
        };
        let events = on_report(&self.state, &self.cfg, &report, self.now);
        self.record(
            job,
            events.into_iter().map(Event::from).collect(),
            &format!("node:{}", report.node),
            out,
        );
        self.settle(job, out);
    }

    /// One scheduled backup of VM `vm_index`, from request to success, as one append. At most
    /// `max_events` events: a shorter job is one still running when the log ends.
    fn backup(&mut self, job_index: u64, vm_index: usize, max_events: usize) -> AppendRequest {
        let round = job_index / N_VMS as u64;
        self.now = T0 + 3_600_000 + round * SYNC_EVERY_MS + vm_index as u64 * 800;
        let vm = self.vms[vm_index];
        let job = JobId::new_v7(self.now, rand10(0x70, job_index));
        let before = (
            self.state.vms[&vm].clone(),
            self.state.rps.get(&vm).cloned(),
        );
        let mut out = Vec::with_capacity(20);

        let emit = request_backup(
            &self.state,
            job,
            vm,
            BackupMode::Incremental,
            JobReason::Scheduled,
            self.now,
        )
        .expect("the backup is accepted");
        self.record(
            job,
            emit.events,
            &format!("{ENGINE_ACTOR}/scheduler"),
            &mut out,
        );
        self.settle(job, &mut out);
        while !self.state.jobs[&job].state.is_terminal() {
            let dispatched: Vec<(usize, StepKind)> = self.state.jobs[&job]
                .steps
                .iter()
                .enumerate()
                .filter(|(_, s)| s.status == StepStatus::Dispatched)
                .map(|(i, s)| (i, s.kind.clone()))
                .collect();
            assert!(!dispatched.is_empty(), "job {job} is stuck");
            for (index, _) in &dispatched {
                self.now += 150;
                self.report(job, *index, ReportBody::Started, &mut out);
            }
            for (index, kind) in &dispatched {
                self.now += 2_000;
                let result = self.result(job, kind, round);
                self.report(job, *index, ReportBody::Succeeded { result }, &mut out);
            }
        }

        // Forget the job; keep the VM's last recovery point as the next parent.
        self.state.jobs.remove(&job);
        self.state.versions.remove(&Aggregate::Job(job));
        if out.len() > max_events {
            // The job is still running in the log: nothing it would commit happened.
            out.truncate(max_events);
            self.state.vms.insert(vm, before.0);
            match before.1 {
                Some(list) => self.state.rps.insert(vm, list),
                None => self.state.rps.remove(&vm),
            };
        } else if let Some(list) = self.state.rps.get_mut(&vm) {
            let n = list.len();
            list.drain(..n.saturating_sub(1));
        }
        AppendRequest {
            partition: 0,
            aggregate: Aggregate::Job(job),
            expected_version: 0,
            command: None,
            recorded_at: self.now,
            events: out,
        }
    }
}

/// Appender (and maker) of a VM's jobs: every job of a VM is made by one maker, in order, so
/// that its recovery points chain.
fn appender_of(vm_index: usize) -> usize {
    vm_index % APPENDERS
}

/// The jobs `first_job..` up to `n_events` events in total (the last one cut short if need
/// be), made by `makers` on all cores, as each appender's list of appends.
fn make_jobs(makers: &mut [JobMaker], first_job: u64, n_events: u64, per_job: u64) -> Vec<Work> {
    let n_full = n_events / per_job;
    let rest = (n_events % per_job) as usize;
    let n_jobs = n_full + u64::from(rest > 0);
    let n_threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per_thread = makers.len().div_ceil(n_threads);
    let mut works: Vec<Work> = Vec::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = makers
            .chunks_mut(per_thread)
            .enumerate()
            .map(|(chunk_index, chunk)| {
                scope.spawn(move || {
                    chunk
                        .iter_mut()
                        .enumerate()
                        .map(|(i, maker)| {
                            let appender = chunk_index * per_thread + i;
                            let mut work = Work {
                                requests: Vec::new(),
                                n_events: 0,
                            };
                            for job_index in first_job..first_job + n_jobs {
                                let vm_index = (job_index % N_VMS as u64) as usize;
                                if appender_of(vm_index) != appender {
                                    continue;
                                }
                                let last = job_index == first_job + n_jobs - 1;
                                let max = if last && rest > 0 { rest } else { usize::MAX };
                                let request = maker.backup(job_index, vm_index, max);
                                assert!(
                                    (rest > 0 && last) || request.events.len() as u64 == per_job,
                                    "a job made {} events, not {per_job}",
                                    request.events.len()
                                );
                                work.n_events += request.events.len() as u64;
                                work.requests.push(request);
                            }
                            work
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            works.extend(handle.join().unwrap());
        }
    });
    assert_eq!(works.iter().map(|w| w.n_events).sum::<u64>(), n_events);
    works
}

// ------------------------------------------------------------------------------------------
// Appending.

/// What a concurrent append run did.
struct Appended {
    elapsed: Duration,
    n_events: u64,
    n_appends: u64,
    n_flushes: u64,
    /// Per appender, its appends as (first seq, event count), in its order.
    batches: Vec<Vec<(u64, u32)>>,
}

impl Appended {
    fn events_per_s(&self) -> f64 {
        self.n_events as f64 / self.elapsed.as_secs_f64()
    }

    fn appends_per_s(&self) -> f64 {
        self.n_appends as f64 / self.elapsed.as_secs_f64()
    }
}

/// Each appender appends its list in order, all of them concurrently.
async fn append_all(log: &SledLog, works: Vec<Vec<AppendRequest>>) -> Appended {
    let before = log.stats();
    let started = Instant::now();
    let tasks: Vec<_> = works
        .into_iter()
        .map(|requests| {
            let log = log.clone();
            tokio::spawn(async move {
                let mut batches = Vec::with_capacity(requests.len());
                for request in requests {
                    let stored = log.append(request).await.expect("append");
                    batches.push((stored[0].seq, stored.len() as u32));
                }
                batches
            })
        })
        .collect();
    let mut batches = Vec::new();
    for task in tasks {
        batches.push(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    let after = log.stats();
    Appended {
        elapsed,
        n_events: batches.iter().flatten().map(|(_, n)| u64::from(*n)).sum(),
        n_appends: after.n_appends - before.n_appends,
        n_flushes: after.n_flushes - before.n_flushes,
        batches,
    }
}

/// Appends what `decide` made of a command (one append per emit, `APPENDERS` at a time), then
/// brings `base` up to date from the log.
async fn submit(log: &SledLog, base: &mut State, command: Command, actor: &str) -> Appended {
    let emits: Vec<Emit> = decide(base, &command, T0).expect("the command is accepted");
    let mut works: Vec<Vec<AppendRequest>> = (0..APPENDERS).map(|_| Vec::new()).collect();
    for (i, emit) in emits.into_iter().enumerate() {
        let n = base.last_seq + i as u64;
        let request = AppendRequest {
            partition: 0,
            expected_version: base.version(&emit.aggregate),
            aggregate: emit.aggregate,
            command: None,
            recorded_at: T0 + n,
            events: emit
                .events
                .into_iter()
                .enumerate()
                .map(|(k, payload)| new_event(n << 8 | k as u64, T0 + n, actor, None, payload))
                .collect(),
        };
        works[i % APPENDERS].push(request);
    }
    let appended = append_all(log, works).await;
    replay_into(log, base).await;
    appended
}

/// Applies every event after `state.last_seq` to `state`; returns how many.
async fn replay_into(log: &SledLog, state: &mut State) -> u64 {
    let mut n = 0;
    loop {
        let batch = log.read_from(state.last_seq + 1, READ_BATCH).await.unwrap();
        if batch.is_empty() {
            return n;
        }
        n += batch.len() as u64;
        for stored in &batch {
            state.apply(stored);
        }
    }
}

/// The installation: a node, its VMs, protection groups. Returns the projections after it.
async fn install(log: &SledLog) -> (State, Vec<Appended>) {
    let mut base = State::default();
    let mut runs = Vec::new();
    runs.push(
        submit(
            log,
            &mut base,
            Command::RegisterNode {
                node: node_id(),
                cluster: "prod-east".into(),
                worker_version: "0.1.0".into(),
            },
            &format!("node:{NODE}"),
        )
        .await,
    );
    let vms: Vec<VmInventory> = (0..N_VMS)
        .map(|i| {
            let name = format!("vm-{i:04}");
            VmInventory {
                vm: VmId::new_v7(T0, rand10(0x56, i as u64)),
                disks: (0..2)
                    .map(|d| DiskInfo {
                        disk: DiskId::new(format!("vd{}", char::from(b'a' + d))).unwrap(),
                        size_bytes: (40 + (i as u64 % 8) * 20) << 30,
                        format: ImageFormat::Qcow2,
                        image_path: format!(
                            "/var/lib/libvirt/images/{name}-vd{}.qcow2",
                            char::from(b'a' + d)
                        ),
                    })
                    .collect(),
                name,
                power: PowerState::Running,
            }
        })
        .collect();
    runs.push(
        submit(
            log,
            &mut base,
            Command::ReportInventory {
                node: node_id(),
                vms,
            },
            &format!("node:{NODE}"),
        )
        .await,
    );
    let vm_ids: Vec<VmId> = base.vms.keys().copied().collect();
    for (g, members) in vm_ids.chunks(N_VMS.div_ceil(N_GROUPS)).enumerate() {
        runs.push(
            submit(
                log,
                &mut base,
                Command::CreateGroup {
                    group: GroupId::new_v7(T0, rand10(0x67, g as u64)),
                    name: format!("tier-{g:02}"),
                    members: members.to_vec(),
                    policy: GroupPolicy::with_defaults(REPOSITORY),
                },
                "user:admin",
            )
            .await,
        );
    }
    assert_eq!(base.vms.len(), N_VMS);
    assert!(base.vms.values().all(|vm| vm.group.is_some()));
    (base, runs)
}

// ------------------------------------------------------------------------------------------
// The raw sled baseline.

/// The stored bytes of every event (index seq - 1): `bytes[offsets[i]..offsets[i + 1]]`.
struct EventBytes {
    bytes: Vec<u8>,
    offsets: Vec<usize>,
}

impl EventBytes {
    fn get(&self, seq: u64) -> &[u8] {
        let i = (seq - 1) as usize;
        &self.bytes[self.offsets[i]..self.offsets[i + 1]]
    }
}

/// Reads the log back and encodes every envelope again: the bytes the log stored.
async fn stored_bytes(log: &SledLog) -> EventBytes {
    let mut out = EventBytes {
        bytes: Vec::new(),
        offsets: vec![0],
    };
    let mut next = 1;
    loop {
        let batch = log.read_from(next, READ_BATCH).await.unwrap();
        let Some(last) = batch.last() else { break };
        next = last.seq + 1;
        for stored in &batch {
            out.bytes
                .extend_from_slice(&cairn_schemas::encode(&stored.envelope));
            out.offsets.push(out.bytes.len());
        }
    }
    out
}

fn open_raw(dir: &Path) -> (sled::Db, sled::Tree) {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(1 << 30)
        .open()
        .unwrap();
    let tree = db.open_tree("raw").unwrap();
    (db, tree)
}

fn raw_batch(events: &EventBytes, first_seq: u64, count: u32) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for seq in first_seq..first_seq + u64::from(count) {
        batch.insert(&seq.to_be_bytes(), events.get(seq));
    }
    batch
}

/// Raw sled, one writer: the same events in the same appends (one `apply_batch` each, one key
/// per event), in log order, with as many flushes as the log did, evenly spread.
fn raw_one_writer(dir: &Path, events: &EventBytes, appended: &Appended) -> Duration {
    let (db, tree) = open_raw(dir);
    let mut appends: Vec<(u64, u32)> = appended.batches.iter().flatten().copied().collect();
    appends.sort_unstable();
    let (n_appends, n_flushes) = (appends.len() as u64, appended.n_flushes.max(1));
    let started = Instant::now();
    for (i, &(first_seq, count)) in appends.iter().enumerate() {
        tree.apply_batch(raw_batch(events, first_seq, count))
            .unwrap();
        let i = i as u64;
        if (i + 1) * n_flushes / n_appends > i * n_flushes / n_appends {
            db.flush().unwrap();
        }
    }
    db.flush().unwrap();
    started.elapsed()
}

/// Raw sled, as many writers as appenders: each writes its appender's appends, one
/// `apply_batch` and one `flush` each (sled coalesces concurrent flushes as it can).
fn raw_concurrent(dir: &Path, events: &EventBytes, appended: &Appended) -> Duration {
    let (db, tree) = open_raw(dir);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for batches in &appended.batches {
            let (db, tree) = (db.clone(), tree.clone());
            scope.spawn(move || {
                for &(first_seq, count) in batches {
                    tree.apply_batch(raw_batch(events, first_seq, count))
                        .unwrap();
                    db.flush().unwrap();
                }
            });
        }
    });
    started.elapsed()
}

// ------------------------------------------------------------------------------------------
// Replay.

/// Reads the whole log with `read_from` (decoding every envelope), applying it to a fresh
/// `State` when `apply`. Returns (events, time, state).
async fn replay(log: &SledLog, apply: bool) -> (u64, Duration, State) {
    let mut state = State::default();
    let started = Instant::now();
    let mut next = 1;
    let mut n = 0u64;
    let mut checksum = 0u64;
    loop {
        let batch = log.read_from(next, READ_BATCH).await.unwrap();
        let Some(last) = batch.last() else { break };
        next = last.seq + 1;
        n += batch.len() as u64;
        if apply {
            for stored in &batch {
                state.apply(stored);
            }
        } else {
            // Touch every event so that nothing is optimised away.
            for stored in &batch {
                checksum = checksum.wrapping_add(stored.envelope.recorded_at);
            }
        }
    }
    let elapsed = started.elapsed();
    std::hint::black_box(checksum);
    (n, elapsed, state)
}

fn open_log(path: &Path) -> (SledLog, Duration) {
    let started = Instant::now();
    let log = SledLog::open(SledLogConfig::new(path)).expect("open the log");
    (log, started.elapsed())
}

// ------------------------------------------------------------------------------------------
// Reporting.

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn rate(n: u64, elapsed: Duration) -> String {
    format!(
        "{} events/s",
        thousands((n as f64 / elapsed.as_secs_f64()).round() as u64)
    )
}

fn secs(elapsed: Duration) -> String {
    format!("{:.3} s", elapsed.as_secs_f64())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| match entry.metadata() {
                    Ok(meta) if meta.is_dir() => dir_size(&entry.path()),
                    Ok(meta) => meta.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

struct Table {
    rows: Vec<[String; 4]>,
}

impl Table {
    fn row(&mut self, what: impl Into<String>, value: impl Into<String>, goal: &str, result: &str) {
        self.rows
            .push([what.into(), value.into(), goal.into(), result.into()]);
    }

    fn print(&self) {
        println!("| measurement | value | goal | result |");
        println!("|---|---:|---|---|");
        for [a, b, c, d] in &self.rows {
            println!("| {a} | {b} | {c} | {d} |");
        }
    }
}

fn progress(text: impl AsRef<str>) {
    eprintln!("[start_bench] {}", text.as_ref());
}

// ------------------------------------------------------------------------------------------

// Runs of a measurement.

/// Median, fastest and slowest of some runs.
fn spread(runs: &[Duration]) -> (Duration, Duration, Duration) {
    let mut sorted = runs.to_vec();
    sorted.sort();
    (
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1],
    )
}

/// The median rate, with the range when there are several runs.
fn rate_runs(n: u64, runs: &[Duration]) -> String {
    let (median, fastest, slowest) = spread(runs);
    let per_s = |d: Duration| thousands((n as f64 / d.as_secs_f64()).round() as u64);
    if runs.len() == 1 {
        rate(n, median)
    } else {
        format!(
            "{} (runs {}-{})",
            rate(n, median),
            per_s(slowest),
            per_s(fastest)
        )
    }
}

/// The median time, with the range when there are several runs.
fn secs_runs(runs: &[Duration]) -> String {
    let (median, fastest, slowest) = spread(runs);
    if runs.len() == 1 {
        secs(median)
    } else {
        format!(
            "{} (runs {:.3}-{:.3})",
            secs(median),
            fastest.as_secs_f64(),
            slowest.as_secs_f64()
        )
    }
}

fn median_rate(n: u64, runs: &[Duration]) -> f64 {
    n as f64 / spread(runs).0.as_secs_f64()
}

// ------------------------------------------------------------------------------------------
// Phases.

/// What building the log leaves for the tail.
struct Built {
    makers: Vec<JobMaker>,
    n_jobs: u64,
    per_job: u64,
}

/// Builds the log (the installation, then jobs) and measures the append rates and the raw
/// sled baseline.
async fn build(n_events: u64, root: &Path, log_path: &Path, table: &mut Table) -> Built {
    let setup_events = 1 + N_VMS as u64 + N_GROUPS as u64;
    let (log, _) = open_log(log_path);
    let started = Instant::now();
    let (base, setup_runs) = install(&log).await;
    let setup_time = started.elapsed();
    assert_eq!(base.last_seq, setup_events);
    let setup_appends: u64 = setup_runs.iter().map(|r| r.n_appends).sum();

    let mut makers: Vec<JobMaker> = (0..APPENDERS).map(|i| JobMaker::new(&base, i)).collect();
    let per_job = makers[0].clone().backup(0, 0, usize::MAX).events.len() as u64;
    let job_events = n_events - setup_events;
    let n_jobs = job_events.div_ceil(per_job);
    progress(format!(
        "setup: {setup_events} events in {setup_appends} appends, {}; making {} jobs of {per_job} events",
        secs(setup_time),
        thousands(n_jobs)
    ));
    let started = Instant::now();
    let works = make_jobs(&mut makers, 0, job_events, per_job);
    progress(format!(
        "jobs made in {}; appending",
        secs(started.elapsed())
    ));
    let appended = append_all(&log, works.into_iter().map(|w| w.requests).collect()).await;
    assert_eq!(log.last_seq().await.unwrap(), n_events);
    progress(format!(
        "appended {} events in {} appends, {} flushes, {}",
        thousands(appended.n_events),
        thousands(appended.n_appends),
        thousands(appended.n_flushes),
        secs(appended.elapsed)
    ));
    drop(log);

    // The raw sled baseline, on the bytes the log stored.
    let (log, _) = open_log(log_path);
    let events = stored_bytes(&log).await;
    drop(log);
    let n_bytes = events.bytes.len() as u64;
    let raw_dir = root.join("raw-1");
    let raw_one = raw_one_writer(&raw_dir, &events, &appended);
    let _ = std::fs::remove_dir_all(&raw_dir);
    progress(format!("raw sled, one writer: {}", secs(raw_one)));
    let raw_dir = root.join("raw-n");
    let raw_many = raw_concurrent(&raw_dir, &events, &appended);
    let _ = std::fs::remove_dir_all(&raw_dir);
    progress(format!("raw sled, {APPENDERS} writers: {}", secs(raw_many)));
    drop(events);

    let durable = appended.events_per_s();
    let raw_one_rate = appended.n_events as f64 / raw_one.as_secs_f64();
    let raw_many_rate = appended.n_events as f64 / raw_many.as_secs_f64();
    table.row(
        "log",
        format!(
            "{} events ({} backup jobs of {per_job} events); {} of event bytes (avg {} B/event); {} on disk",
            thousands(n_events),
            thousands(n_jobs),
            mib(n_bytes),
            n_bytes / n_events,
            mib(dir_size(log_path))
        ),
        "",
        "",
    );
    table.row(
        format!("setup appends: node, {N_VMS} VMs, {N_GROUPS} groups (one append each, up to {APPENDERS} at a time)"),
        format!(
            "{setup_events} events in {setup_appends} appends, {}",
            secs(setup_time)
        ),
        "",
        "",
    );
    table.row(
        format!("durable append: one append per job, {APPENDERS} concurrent appenders"),
        format!(
            "{} = {} appends/s ({} appends in {} flushes)",
            rate(appended.n_events, appended.elapsed),
            thousands(appended.appends_per_s().round() as u64),
            thousands(appended.n_appends),
            thousands(appended.n_flushes)
        ),
        "",
        "",
    );
    table.row(
        "raw sled baseline: same bytes, one `apply_batch` per append, same number of flushes, 1 writer",
        rate(appended.n_events, raw_one),
        "",
        "",
    );
    table.row(
        format!("raw sled: same bytes and appends, {APPENDERS} writers, `flush` after each append"),
        rate(appended.n_events, raw_many),
        "",
        "",
    );
    table.row(
        "durable append ÷ raw sled baseline (1 writer, same flushes)",
        format!("{:.2}", durable / raw_one_rate),
        "",
        "",
    );
    table.row(
        format!("durable append ÷ raw sled ({APPENDERS} writers)"),
        format!("{:.2}", durable / raw_many_rate),
        "",
        "",
    );
    Built {
        makers,
        n_jobs,
        per_job,
    }
}

/// Replay rates: read+decode and read+decode+apply, each just after an open (sled's cache
/// cold) and again (warm). Returns the number of jobs in the projections.
async fn measure_replay(log_path: &Path, n_events: u64, repeat: usize, table: &mut Table) -> usize {
    let (mut opens, mut cold, mut warm, mut apply_cold, mut apply_warm) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut n_jobs = 0;
    for _ in 0..repeat {
        let (log, open) = open_log(log_path);
        opens.push(open);
        let (n, elapsed, _) = replay(&log, false).await;
        assert_eq!(n, n_events);
        cold.push(elapsed);
        warm.push(replay(&log, false).await.1);
        drop(log);
        let (log, _) = open_log(log_path);
        let (_, elapsed, state) = replay(&log, true).await;
        apply_cold.push(elapsed);
        drop(state);
        let (_, elapsed, state) = replay(&log, true).await;
        apply_warm.push(elapsed);
        assert_eq!(state.last_seq, n_events);
        n_jobs = state.jobs.len();
        drop(state);
        drop(log);
        progress(format!(
            "replay: read+decode cold {} warm {}; +apply cold {} warm {}",
            secs(cold[cold.len() - 1]),
            secs(warm[warm.len() - 1]),
            secs(apply_cold[apply_cold.len() - 1]),
            secs(apply_warm[apply_warm.len() - 1])
        ));
    }
    table.row("`SledLog::open` of the log", secs_runs(&opens), "", "");
    table.row(
        "replay read+decode (`read_from` 16,384 at a time), sled cache cold",
        rate_runs(n_events, &cold),
        "",
        "",
    );
    table.row(
        "replay read+decode, sled cache warm",
        rate_runs(n_events, &warm),
        "",
        "",
    );
    for (what, runs) in [("cold", &apply_cold), ("warm", &apply_warm)] {
        table.row(
            format!("replay read+decode+`State::apply`, sled cache {what}"),
            rate_runs(n_events, runs),
            "≥ 500,000 events/s",
            pass(median_rate(n_events, runs) >= 500_000.0),
        );
    }
    n_jobs
}

type Started = (
    Engine<SledLog>,
    cairn_orchestrator::engine::service::Handle<SledLog>,
);

/// `SledLog::open` + `Engine::start`, as `cairn up` does; returns (total, open) times.
async fn start_engine(log_path: &Path, snapshot_path: &Path) -> (Duration, Duration, Started) {
    let started = Instant::now();
    let (log, open) = open_log(log_path);
    let engine = Engine::start(
        log,
        engine_options(snapshot_path),
        Arc::new(SystemClock),
        Arc::new(NoSteps),
    )
    .await
    .expect("engine start");
    (started.elapsed(), open, engine)
}

/// Applies the events up to `until` to a fresh `State`.
async fn replay_until(log: &SledLog, until: u64) -> State {
    let mut state = State::default();
    while state.last_seq < until {
        let limit = READ_BATCH.min((until - state.last_seq) as usize);
        let batch = log.read_from(state.last_seq + 1, limit).await.unwrap();
        assert!(!batch.is_empty(), "the log ends at {}", state.last_seq);
        for stored in &batch {
            state.apply(stored);
        }
    }
    state
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let (tmp, root) = match &args.reuse {
        Some(dir) => (None, dir.clone()),
        None => {
            let tmp = tempfile::tempdir_in(&args.dir).unwrap();
            let root = tmp.path().to_path_buf();
            (Some(tmp), root)
        }
    };
    let log_path = root.join("events");
    let snapshot_path = root.join("snapshot.bin");
    let _ = std::fs::remove_file(&snapshot_path);
    let mut table = Table { rows: Vec::new() };

    // 1. Build the log and measure appends (unless reusing one).
    let mut built = match args.reuse {
        Some(_) => None,
        None => {
            progress(format!(
                "directory {}, building a log of {} events",
                root.display(),
                thousands(args.events)
            ));
            Some(build(args.events, &root, &log_path, &mut table).await)
        }
    };
    let (log, _) = open_log(&log_path);
    let n_events = log.last_seq().await.unwrap();
    drop(log);
    if built.is_none() {
        progress(format!(
            "reusing {} ({} events)",
            root.display(),
            thousands(n_events)
        ));
        table.row(
            "log (reused)",
            format!(
                "{} events; {} on disk",
                thousands(n_events),
                mib(dir_size(&log_path))
            ),
            "",
            "",
        );
    }

    // 2. Replay.
    let n_jobs = measure_replay(&log_path, n_events, args.repeat, &mut table).await;

    // 3. Start with no snapshot file: full replay.
    let (mut full, mut full_opens) = (Vec::new(), Vec::new());
    let mut last_started = None;
    for run in 0..args.repeat {
        let (total, open, (engine, handle)) = start_engine(&log_path, &snapshot_path).await;
        assert_eq!(handle.last_seq(), n_events);
        assert_eq!(handle.read(|s| s.jobs.len()), n_jobs);
        full.push(total);
        full_opens.push(open);
        progress(format!("start, full replay: {}", secs(total)));
        // The last engine gives the snapshot; the others close the log for the next run.
        if run + 1 == args.repeat {
            last_started = Some((engine, handle));
        }
    }
    let full_replay: Vec<Duration> = full.iter().zip(&full_opens).map(|(t, o)| *t - *o).collect();
    table.row(
        "start without snapshot: `SledLog::open` + `Engine::start` (full replay)",
        format!("{}; open {}", secs_runs(&full), secs(spread(&full_opens).0)),
        "",
        "",
    );
    table.row(
        "replay inside `Engine::start` (start minus open)",
        rate_runs(n_events, &full_replay),
        "≥ 500,000 events/s",
        pass(median_rate(n_events, &full_replay) >= 500_000.0),
    );

    // The snapshot: at the tip, then the tail is appended; or, reusing a log, made at the tip
    // minus the tail.
    let (engine, handle) = last_started.take().expect("started");
    let (state, clone_time) = match &built {
        Some(_) => {
            let started = Instant::now();
            let state = handle.read(|s| s.clone());
            let clone_time = started.elapsed();
            drop((engine, handle));
            (state, Some(clone_time))
        }
        None => {
            drop((engine, handle));
            let (log, _) = open_log(&log_path);
            let state = replay_until(&log, n_events.saturating_sub(TAIL_EVENTS)).await;
            drop(log);
            (state, None)
        }
    };
    let snapshot_seq = state.last_seq;
    let started = Instant::now();
    snapshot::save(&snapshot_path, &state).expect("write the snapshot");
    let save_time = started.elapsed();
    drop(state);
    let snapshot_size = std::fs::metadata(&snapshot_path).unwrap().len();
    let mut loads = Vec::new();
    for _ in 0..args.repeat {
        let started = Instant::now();
        let loaded = snapshot::load(&snapshot_path).expect("the snapshot loads");
        loads.push(started.elapsed());
        assert_eq!(loaded.last_seq, snapshot_seq);
    }
    progress(format!(
        "snapshot {} at {} written in {}, loads in {}",
        mib(snapshot_size),
        thousands(snapshot_seq),
        secs(save_time),
        secs(spread(&loads).0)
    ));
    table.row(
        "snapshot file (`snapshot::save`; `snapshot::load` alone)",
        format!(
            "{} at seq {}; save {}{}; load {}",
            mib(snapshot_size),
            thousands(snapshot_seq),
            secs(save_time),
            clone_time.map_or(String::new(), |t| format!(" + state clone {}", secs(t))),
            secs_runs(&loads)
        ),
        "",
        "",
    );

    let total = match built.as_mut() {
        Some(built) => {
            let (log, _) = open_log(&log_path);
            let works = make_jobs(&mut built.makers, built.n_jobs, TAIL_EVENTS, built.per_job);
            let tail = append_all(&log, works.into_iter().map(|w| w.requests).collect()).await;
            let total = log.last_seq().await.unwrap();
            drop(log);
            table.row(
                "tail appended after the snapshot",
                format!(
                    "{} events, {} appends, {} flushes, {}",
                    thousands(tail.n_events),
                    thousands(tail.n_appends),
                    thousands(tail.n_flushes),
                    rate(tail.n_events, tail.elapsed)
                ),
                "",
                "",
            );
            total
        }
        None => n_events,
    };
    assert_eq!(total, snapshot_seq + TAIL_EVENTS.min(n_events));

    // 4. Start with the snapshot: load it, replay the tail.
    let (mut snap, mut snap_opens) = (Vec::new(), Vec::new());
    let mut from_snapshot = None;
    for _ in 0..args.repeat {
        let (elapsed, open, (engine, handle)) = start_engine(&log_path, &snapshot_path).await;
        assert_eq!(handle.last_seq(), total);
        snap.push(elapsed);
        snap_opens.push(open);
        progress(format!("start, snapshot + tail: {}", secs(elapsed)));
        from_snapshot = Some(handle.read(|s| s.clone()));
        drop((engine, handle));
    }
    table.row(
        format!(
            "start with snapshot + {} tail events: `SledLog::open` + `Engine::start`",
            thousands(total - snapshot_seq)
        ),
        format!("{}; open {}", secs_runs(&snap), secs(spread(&snap_opens).0)),
        "≤ 2 s",
        pass(spread(&snap).0 <= Duration::from_secs(2)),
    );

    // Snapshot + tail must be the full replay (not timed).
    let (log, _) = open_log(&log_path);
    let replayed = replay_until(&log, total).await;
    drop(log);
    let same = from_snapshot.as_ref() == Some(&replayed);
    table.row(
        "state after snapshot + tail == state after full replay",
        if same { "yes" } else { "NO" },
        "",
        "",
    );

    println!();
    println!(
        "{} runs per replay/start measurement: median (slowest-fastest); 2 cores",
        args.repeat
    );
    println!();
    table.print();
    if args.keep
        && let Some(tmp) = tmp
    {
        println!("\nkept {}", tmp.keep().display());
    }
    assert!(same, "snapshot + tail differs from a full replay");
}
