//! Protection policies against the real engine (sled log, the job reconciler, the scheduler,
//! retention) and a real worker (repository backups, verify, consistency checks, prune, gc),
//! in one process with an injected clock that the test moves in jumps ("accelerated time").
//!
//! - A day of hourly schedules across the autumn DST change in Europe/Berlin (a 25-hour local
//!   day): one recovery point per slot, one catch-up after five hours of downtime, retention
//!   pruning what is older than a day from the catalog *and* the repository, then gc.
//! - A corrupted replica: verify finds the damage, the data source turns inconsistent, an
//!   alert is raised, retention is paused (nothing is marked for removal however old), the
//!   consistency check window opens and the automatic check repairs the replica (what differed
//!   is reported), the alert resolves, and the repaired recovery point restores byte-identical.

use cairn_orchestrator::error_code::ErrorCode;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_orchestrator::clock::Clock;
use cairn_orchestrator::control::Control;
use cairn_orchestrator::engine::jobs::EngineConfig;
use cairn_orchestrator::engine::ports::StepSink;
use cairn_orchestrator::engine::service::{Engine, EngineOptions, Handle};
use cairn_orchestrator::engine::state::State;
use cairn_orchestrator::log::{SledLog, SledLogConfig};
use cairn_orchestrator::policy::retention::RetentionMark;
use cairn_orchestrator::policy::tz::{TimeZone, utc_midnight_ms};
use cairn_schemas::{
    Command, ConsistencyCheckPolicy, ConsistencyCheckWindow, DataSourceState, GroupPolicy, JobKind,
    JobState, NodeId, Report, Schedule, StepSpec, SyncFrequency, TimeOfDay, VmId, Weekdays,
};
use cairn_worker::agent::{Agent, AgentConfig};
use cairn_worker::repo::{self, Repository};
use tokio::sync::{mpsc, watch};

const HOUR: u64 = 3_600_000;
const DISK_BYTES: usize = 4 << 20;
const CHUNK: usize = 64 << 10;

struct ManualClock(AtomicU64);

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

struct Bus(mpsc::UnboundedSender<StepSpec>);

impl StepSink for Bus {
    fn dispatch(&self, spec: StepSpec) {
        let _ = self.0.send(spec);
    }
}

/// Deterministic bytes that do not compress to nothing.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct World {
    _dir: tempfile::TempDir,
    repo_dir: PathBuf,
    disk: PathBuf,
    clock: Arc<ManualClock>,
    handle: Handle<SledLog>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    vm: VmId,
}

impl World {
    async fn start(now: u64, tz: TimeZone) -> World {
        let dir = tempfile::tempdir().unwrap();
        let repo_dir = dir.path().join("repo");
        Repository::init(&repo_dir, CHUNK as u64, None).unwrap();
        let vms_dir = dir.path().join("vms");
        std::fs::create_dir_all(&vms_dir).unwrap();
        let disk = dir.path().join("web01-disk0.raw");
        std::fs::write(&disk, noise(1, DISK_BYTES)).unwrap();
        let descriptor = serde_json::json!({
            "name": "web01",
            "uuid": "7a1d2c34-5e6f-4a8b-9c0d-1e2f3a4b5c6d",
            "disks": [{"id": "disk0", "path": disk, "format": "raw"}],
        });
        std::fs::write(vms_dir.join("web01.json"), descriptor.to_string()).unwrap();

        let clock = Arc::new(ManualClock(AtomicU64::new(now)));
        let log = SledLog::open(SledLogConfig::new(dir.path().join("events"))).unwrap();
        let (steps_tx, mut steps_rx) = mpsc::unbounded_channel();
        let options = EngineOptions {
            config: EngineConfig {
                repository: repo_dir.display().to_string(),
                orphan_grace_ms: 0,
                // The clock jumps by hours while nothing runs; a step must never count as
                // silent because of a jump.
                heartbeat_timeout_ms: 30 * 24 * HOUR,
                timezone: tz,
                ..EngineConfig::default()
            },
            epoch: 1,
            actor: "orchestrator".into(),
            snapshot_path: None,
            snapshot_every: 1_000_000,
            tick: Duration::from_millis(5),
            ownership: None,
        };
        let (engine, handle) = Engine::start(log, options, clock.clone(), Arc::new(Bus(steps_tx)))
            .await
            .unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let mut engine_stop = stop_rx.clone();
        let mut tasks = vec![tokio::spawn(engine.run(async move {
            let _ = engine_stop.wait_for(|s| *s).await;
        }))];
        let node = NodeId::new("local").unwrap();
        let agent = Arc::new(
            Agent::new(AgentConfig {
                node: node.clone(),
                vms_dir: vms_dir.clone(),
                key_file: None,
                threads: 2,
                settings: cairn_worker::boundary::NodeSettings {
                    image_roots: vec![dir.path().to_path_buf()],
                    ..Default::default()
                }
                .with_repository(
                    "default",
                    &repo_dir,
                    cairn_worker::boundary::Encryption::None,
                ),
            })
            .unwrap(),
        );
        let worker_handle = handle.clone();
        let worker_agent = agent.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(spec) = steps_rx.recv().await {
                let handle = worker_handle.clone();
                let agent = worker_agent.clone();
                tokio::spawn(async move {
                    let (tx, mut rx) = mpsc::unbounded_channel();
                    let header = spec.clone();
                    let work = tokio::task::spawn_blocking(move || {
                        let cancel = AtomicBool::new(false);
                        let progress = tx.clone();
                        let last = agent.execute(
                            &spec,
                            &mut |b| {
                                let _ = progress.send(b);
                            },
                            &cancel,
                        );
                        let _ = tx.send(last);
                    });
                    while let Some(body) = rx.recv().await {
                        handle
                            .report(Report {
                                step: header.step,
                                attempt: header.attempt,
                                job: header.job,
                                partition: header.partition,
                                epoch: header.epoch,
                                node: header.node.clone(),
                                body,
                            })
                            .await;
                    }
                    let _ = work.await;
                });
            }
        }));
        handle
            .submit_as(
                "worker".into(),
                None,
                Command::RegisterNode {
                    node: node.clone(),
                    cluster: "local".into(),
                    worker_version: "test".into(),
                },
            )
            .await
            .unwrap();
        let inventory = agent.inventory();
        assert!(inventory.problems.is_empty(), "{:?}", inventory.problems);
        let vm = inventory.vms[0].vm;
        handle
            .submit_as(
                "worker".into(),
                None,
                Command::ReportInventory {
                    node,
                    vms: inventory.vms,
                },
            )
            .await
            .unwrap();
        World {
            _dir: dir,
            repo_dir,
            disk,
            clock,
            handle,
            stop,
            tasks,
            vm,
        }
    }

    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn set_clock(&self, at: u64) {
        self.clock.0.store(at, Ordering::SeqCst);
    }

    async fn create_group(&self, policy: GroupPolicy) {
        let group = self.handle.new_group_id();
        self.handle
            .submit_as(
                "user:test".into(),
                None,
                Command::CreateGroup {
                    group,
                    name: "gold".into(),
                    members: vec![self.vm],
                    policy,
                },
            )
            .await
            .unwrap();
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        self.handle.read(f)
    }

    /// Polls (with a deadline) until `check` holds and no job is open.
    async fn settle(&self, what: &str, check: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let done = self.read(|s| check(s) && s.jobs.values().all(|j| j.state.is_terminal()));
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for: {what}\n{}",
                self.jobs_text()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn jobs_text(&self) -> String {
        self.read(|s| {
            s.jobs
                .values()
                .map(|j| format!("{:?} {:?} {:?} {:?}", j.kind, j.reason, j.state, j.error))
                .collect::<Vec<_>>()
                .join("\n")
        })
    }

    /// Recovery points committed so far (also those pruned since).
    fn committed(&self) -> Vec<u64> {
        self.read(|s| {
            let mut at: Vec<u64> = s
                .jobs
                .values()
                .filter(|j| j.committed_rp.is_some())
                .filter_map(|j| {
                    j.steps.iter().find_map(|st| {
                        (st.kind == cairn_schemas::StepKind::Snapshot)
                            .then_some(st.finished_at)
                            .flatten()
                    })
                })
                .collect();
            at.sort();
            at
        })
    }

    fn catalog(&self) -> Vec<(String, u64)> {
        self.read(|s| {
            s.rps
                .get(&self.vm)
                .map(|l| l.iter().map(|r| (r.rp.to_string(), r.taken_at)).collect())
                .unwrap_or_default()
        })
    }

    fn lineage(&self) -> String {
        format!("{}.disk0", self.vm)
    }

    /// Recovery points of the disk in the repository itself.
    fn repo_rps(&self) -> Vec<String> {
        let repo = Repository::open(&self.repo_dir, None).unwrap();
        let mut rps: Vec<String> = repo
            .catalog(&self.lineage())
            .unwrap()
            .indexes
            .iter()
            .map(|i| i.header.rp.clone())
            .collect();
        rps.sort();
        rps
    }

    /// A guest write: one chunk of new content.
    fn churn(&self, seed: u64) {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.disk)
            .unwrap();
        let offset = (seed as usize * 7 % (DISK_BYTES / CHUNK)) * CHUNK;
        file.write_all_at(&noise(seed + 1000, CHUNK), offset as u64)
            .unwrap();
        file.sync_all().unwrap();
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
    }
}

fn utc(y: i16, m: i8, d: i8, h: u64) -> u64 {
    utc_midnight_ms(jiff::civil::date(y, m, d)) as u64 + h * HOUR
}

fn hourly_policy(repo: &Path) -> GroupPolicy {
    let mut policy = GroupPolicy::with_defaults(repo.display().to_string());
    policy.retention_days = 1;
    policy.sync = SyncFrequency::EveryMinutes(60);
    policy.recovery_points = Schedule {
        times: vec![TimeOfDay::hm(8, 0), TimeOfDay::hm(20, 0)],
        days: Weekdays::ALL,
    };
    policy.express_full = Schedule {
        times: vec![],
        days: Weekdays { bits: 0 },
    };
    policy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_of_hourly_schedules_across_the_dst_change_with_downtime_and_retention() {
    // 2026-10-25 00:00 CEST; the local day has 25 hours (03:00 CEST → 02:00 CET).
    let t0 = utc(2026, 10, 24, 22);
    let world = World::start(t0, TimeZone::parse("Europe/Berlin").unwrap()).await;
    world.create_group(hourly_policy(&world.repo_dir)).await;
    world
        .settle("the initial replication", |_| world.committed().len() == 1)
        .await;
    assert_eq!(world.committed(), vec![t0]);

    // The local day, hour by hour in accelerated time: one recovery point per slot.
    for hour in 1..=25u64 {
        world.churn(hour);
        world.set_clock(t0 + hour * HOUR + 60_000);
        world
            .settle(&format!("the backup of hour {hour}"), |_| {
                world.committed().len() == 1 + hour as usize
            })
            .await;
    }
    let expected: Vec<u64> = (0..=25)
        .map(|h| t0 + h * HOUR + if h == 0 { 0 } else { 60_000 })
        .collect();
    assert_eq!(
        world.committed(),
        expected,
        "one recovery point per hourly slot, none twice"
    );
    let scheduled = world.read(|s| {
        s.jobs
            .values()
            .filter(|j| matches!(j.kind, JobKind::Backup { .. } | JobKind::InitialReplication))
            .count()
    });
    assert_eq!(scheduled, 26);
    // Calendar in local time: all 26 on 25 October except the last (00:01 CET on the 26th).
    let calendar = world.handle.calendar(&world.vm.to_string()).unwrap();
    let dates: Vec<(String, u32)> = calendar
        .iter()
        .map(|d| (d.date.clone(), d.recovery_points))
        .collect();
    assert!(dates.iter().all(|(_, n)| *n > 0));

    // Five hours of downtime: one catch-up, not five.
    world.churn(99);
    world.set_clock(t0 + 30 * HOUR + 120_000);
    world
        .settle("the catch-up after downtime", |_| {
            world.committed().len() == 27
        })
        .await;
    world.set_clock(t0 + 31 * HOUR + 60_000);
    world
        .settle("the next slot", |_| world.committed().len() == 28)
        .await;
    assert_eq!(world.committed().len(), 28, "no burst of missed runs");

    // Retention (1 day): everything older than a day is gone from the catalog and the
    // repository, and gc ran after the prune.
    let now = world.now();
    world
        .settle("prune and gc", |s| {
            s.rps[&world.vm]
                .iter()
                .all(|r| now - r.taken_at <= 24 * HOUR)
                && s.jobs
                    .values()
                    .any(|j| j.kind == JobKind::GarbageCollect && j.state == JobState::Succeeded)
        })
        .await;
    let catalog = world.catalog();
    let mut ids: Vec<String> = catalog.iter().map(|(rp, _)| rp.clone()).collect();
    ids.sort();
    assert_eq!(
        ids,
        world.repo_rps(),
        "the repository holds exactly the catalog's recovery points"
    );
    assert!(
        catalog.len() >= 20 && catalog.len() <= 26,
        "kept {}",
        catalog.len()
    );
    let pruned = world.read(|s| {
        s.jobs
            .values()
            .filter(|j| j.kind == JobKind::Prune && j.state == JobState::Succeeded)
            .count()
    });
    assert!(pruned >= 1);
    // The latest recovery point restores to the disk as it is now.
    let latest = catalog.last().unwrap().0.clone();
    assert_restores_to_disk(&world, &latest);
    world.stop().await;
}

fn assert_restores_to_disk(world: &World, rp: &str) {
    let repo = Repository::open(&world.repo_dir, None).unwrap();
    let target = world
        .repo_dir
        .parent()
        .unwrap()
        .join(format!("restored-{rp}.raw"));
    let mut sink = cairn_worker::source::create_sink(
        &target,
        cairn_worker::source::ImageFormat::Raw,
        DISK_BYTES as u64,
    )
    .unwrap();
    repo::restore(
        &repo,
        &repo::restore::RestoreOptions {
            disk: world.lineage(),
            rp: Some(rp.to_owned()),
            delta: false,
            known: None,
            threads: 2,
        },
        sink.as_mut(),
        &repo::NoProgress,
    )
    .unwrap();
    drop(sink);
    assert!(
        std::fs::read(&target).unwrap() == std::fs::read(&world.disk).unwrap(),
        "restored {rp} differs from the disk"
    );
}

/// Flips bytes in the middle of the lineage's largest pack.
fn corrupt_a_pack(world: &World) {
    let packs = world
        .repo_dir
        .join("disks")
        .join(world.lineage())
        .join("packs");
    let mut files: Vec<(u64, PathBuf)> = walk(&packs)
        .into_iter()
        .map(|p| (std::fs::metadata(&p).unwrap().len(), p))
        .collect();
    files.sort();
    let (len, pack) = files.pop().expect("a pack file");
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let mut buf = vec![0u8; 64];
    file.read_exact_at(&mut buf, len / 2).unwrap();
    for b in &mut buf {
        *b ^= 0xff;
    }
    file.write_all_at(&buf, len / 2).unwrap();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_replica_is_caught_paused_and_repaired_by_an_automatic_check() {
    let t0 = utc(2026, 6, 1, 0);
    let world = World::start(t0, TimeZone::UTC).await;
    let mut policy = hourly_policy(&world.repo_dir);
    // Automatic checks in a window at 03:00 for an hour, so the paused state can be seen.
    policy.consistency_check = ConsistencyCheckPolicy {
        when_inconsistent: false,
        window: Some(ConsistencyCheckWindow {
            start: TimeOfDay::hm(3, 0),
            max_duration_minutes: 60,
            days: Weekdays::ALL,
        }),
    };
    world.create_group(policy).await;
    world
        .settle("the initial replication", |_| world.committed().len() == 1)
        .await;
    world.churn(1);
    world.set_clock(t0 + HOUR + 60_000);
    world
        .settle("a backup", |_| world.committed().len() == 2)
        .await;
    let before = world.catalog();

    corrupt_a_pack(&world);
    world.set_clock(t0 + HOUR + 10 * 60_000);
    let job = world.handle.new_job_id();
    world
        .handle
        .submit_as(
            "user:test".into(),
            None,
            Command::RequestVerify { job, vm: world.vm },
        )
        .await
        .unwrap();
    world
        .settle("verify marks the replica inconsistent", |s| {
            s.vms[&world.vm]
                .disk_states
                .values()
                .all(|d| *d == DataSourceState::ReplicaInconsistent)
        })
        .await;
    let alerts = world.handle.alerts(false);
    assert!(
        alerts
            .iter()
            .any(|a| a.kind == "ReplicaDamaged" && a.severity == "Critical"),
        "{alerts:?}"
    );
    assert!(
        alerts.iter().any(|a| a.kind == "ReplicaInconsistent"),
        "{alerts:?}"
    );
    // Backups wait for the check: a manual one is refused with the reason.
    let refused = world
        .handle
        .submit_as(
            "user:test".into(),
            None,
            Command::RequestBackup {
                job: world.handle.new_job_id(),
                vm: world.vm,
                mode: cairn_schemas::BackupMode::Incremental,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), ErrorCode::ReplicaInconsistent);

    // Two days later, before the window opens: far past the 1-day retention, yet the clock
    // is paused, so nothing is marked for removal and nothing is pruned.
    world.set_clock(t0 + 2 * 24 * HOUR + 2 * HOUR);
    world.settle("idle while paused", |_| true).await;
    let marks = world.read(|s| {
        cairn_orchestrator::engine::protect::retention_marks(s, &s.vms[&world.vm], &[], world.now())
            .unwrap()
    });
    assert!(
        marks
            .iter()
            .all(|(_, m)| matches!(m, RetentionMark::Protected(_))),
        "{marks:?}"
    );
    assert_eq!(world.catalog(), before);
    assert_eq!(world.committed().len(), 2, "no backups while inconsistent");

    // The window opens: the automatic check repairs the replica.
    world.set_clock(t0 + 2 * 24 * HOUR + 3 * HOUR + 60_000);
    world
        .settle("the automatic consistency check", |s| {
            s.vms[&world.vm]
                .disk_states
                .values()
                .all(|d| *d == DataSourceState::Protected)
        })
        .await;
    let (check, outcome) = world.read(|s| {
        let check = s
            .jobs
            .values()
            .find(|j| j.kind == JobKind::ConsistencyCheck)
            .map(|j| (j.reason, j.state))
            .unwrap();
        (check, s.protection[&world.vm].last_check.unwrap())
    });
    assert_eq!(
        check,
        (
            cairn_schemas::JobReason::ReplicaInconsistent,
            JobState::Succeeded
        )
    );
    assert!(
        outcome.chunks_differing >= 1,
        "the damaged chunks were stored again: {outcome:?}"
    );
    assert_eq!(outcome.chunks_compared, (DISK_BYTES / CHUNK) as u64);
    assert!(
        world
            .handle
            .alerts(false)
            .iter()
            .all(|a| a.kind != "ReplicaInconsistent" && a.kind != "ReplicaDamaged")
    );
    let catalog = world.catalog();
    assert_eq!(
        catalog.len(),
        3,
        "the repaired recovery point joined the two old ones"
    );
    assert_eq!(
        &catalog[..2],
        &before[..],
        "the paused days did not count: nothing was pruned"
    );
    assert_restores_to_disk(&world, &catalog[2].0);
    // A later verify finds the repaired recovery point whole.
    let repo = Repository::open(&world.repo_dir, None).unwrap();
    let report = repo::verify(&repo, Some(&world.lineage()), 2, &repo::NoProgress).unwrap();
    let damaged: Vec<&str> = report.disks[0]
        .damaged_rps
        .iter()
        .map(|d| d.rp.as_str())
        .collect();
    assert!(!damaged.contains(&catalog[2].0.as_str()), "{damaged:?}");
    world.stop().await;
}
