//! Policy planning benchmark: one scheduler tick and one retention pass over 10,000 VMs in
//! 200 protection groups, each measured against a baseline that only iterates the same
//! projections (group → member → VM, its protection record and its recovery point catalog)
//! without planning anything, in the same run.
//!
//! `cargo run --release -p cairn-orchestrator --example policy_bench [-- --vms N --groups G --rps R]`
//!
//! The projections are what a busy installation holds: every VM has two disks, `R` recovery
//! points (default 48, one every 3 hours, so a 5-day retention finds some to remove) and one
//! finished backup job; 2% of the VMs have a backup running, 1% have an inconsistent replica
//! (retention paused). Policies: synchronization every 15 minutes, recovery points at 08:00 and
//! 20:00, 5 days of retention, schedules in Europe/Berlin. The clock sits 7 minutes after a
//! synchronization slot, so most VMs are due (the worst case for a tick).
//!
//! Each measurement is the median of 15 runs after 3 warm-up runs.

use std::time::Instant;

use cairn_orchestrator::engine::protect;
use cairn_orchestrator::engine::state::{Group, Job, RecoveryPoint, State, Vm, VmProtection};
use cairn_orchestrator::policy::tz::TimeZone;
use cairn_schemas::{
    BackupMode, CommittedDisk, Consistency, DataSourceState, DiskId, DiskInfo, GroupId,
    GroupPolicy, ImageFormat, JobId, JobKind, JobReason, JobState, NodeId, PowerState,
    RecoveryPointId, SyncFrequency, VmId,
};

const HOUR: u64 = 3_600_000;
/// 2026-06-10 10:07 UTC.
const NOW: u64 = 1_781_085_600_000 + 7 * 60_000;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn rand10(n: u64) -> [u8; 10] {
    let mut r = [0u8; 10];
    r[2..].copy_from_slice(&n.to_be_bytes());
    r
}

fn build(n_vms: usize, n_groups: usize, n_rps: usize) -> State {
    let mut state = State::default();
    let node = NodeId::new("kvm-01").unwrap();
    let mut policy = GroupPolicy::with_defaults("/var/lib/cairn/repo");
    policy.sync = SyncFrequency::EveryMinutes(15);
    policy.recovery_points.times = vec![
        cairn_schemas::TimeOfDay::hm(8, 0),
        cairn_schemas::TimeOfDay::hm(20, 0),
    ];
    let groups: Vec<GroupId> = (0..n_groups)
        .map(|g| GroupId::new_v7(NOW - 400 * HOUR, rand10(g as u64)))
        .collect();
    for (g, id) in groups.iter().enumerate() {
        state.groups.insert(
            *id,
            Group {
                id: *id,
                name: format!("group-{g}"),
                members: Vec::new(),
                policy: policy.clone(),
                created_at: NOW - 400 * HOUR,
                deleted: false,
                lock_days: 0,
                lock_pending: None,
                soft_delete_days: 14,
            },
        );
    }
    let mut counter = 1_000_000u64;
    for v in 0..n_vms {
        let vm = VmId::new_v7(NOW - 400 * HOUR, rand10(v as u64));
        let group = groups[v % n_groups];
        state.groups.get_mut(&group).unwrap().members.push(vm);
        let disks: Vec<DiskInfo> = (0..2)
            .map(|d| DiskInfo {
                disk: DiskId::new(format!("disk{d}")).unwrap(),
                size_bytes: 100 << 30,
                format: ImageFormat::Qcow2,
                image_path: format!("/var/lib/libvirt/images/vm{v}-disk{d}.qcow2"),
            })
            .collect();
        let inconsistent = v % 100 == 7;
        let disk_states = disks
            .iter()
            .map(|d| {
                let s = if inconsistent {
                    DataSourceState::ReplicaInconsistent
                } else {
                    DataSourceState::Protected
                };
                (d.disk.clone(), s)
            })
            .collect();
        let rps: Vec<RecoveryPoint> = (0..n_rps)
            .map(|i| {
                counter += 1;
                let taken_at = NOW - (n_rps - i) as u64 * 3 * HOUR;
                RecoveryPoint {
                    rp: RecoveryPointId::new_v7(taken_at, rand10(counter)),
                    vm,
                    job: None,
                    taken_at,
                    consistency: Consistency::Crash,
                    repository: "default".into(),
                    deleted: None,
                    disks: disks
                        .iter()
                        .map(|d| CommittedDisk {
                            disk: d.disk.clone(),
                            parent_rp: None,
                            bytes_read: 1 << 30,
                            bytes_stored: 200 << 20,
                        })
                        .collect(),
                }
            })
            .collect();
        let last = rps.last().map(|r| r.taken_at);
        state.rps.insert(vm, rps);
        counter += 1;
        let job = JobId::new_v7(NOW - HOUR, rand10(counter));
        let running = v % 50 == 3;
        state.jobs.insert(
            job,
            Job {
                id: job,
                kind: JobKind::Backup {
                    mode: BackupMode::Incremental,
                },
                vm,
                group: Some(group),
                reason: JobReason::Scheduled,
                state: if running {
                    JobState::Running
                } else {
                    JobState::Succeeded
                },
                wait: None,
                node: Some(node.clone()),
                requested_at: NOW - 22 * 60_000,
                not_before: None,
                started_at: Some(NOW - 22 * 60_000),
                finished_at: (!running).then_some(NOW - 20 * 60_000),
                error: None,
                cancel_requested: false,
                steps: Vec::new(),
                committed_rp: None,
            },
        );
        state.protection.insert(
            vm,
            VmProtection {
                inconsistent_since: inconsistent.then_some(NOW - 30 * HOUR),
                paused: vec![(NOW - 100 * HOUR, NOW - 90 * HOUR)],
                last_rp_request: Some(NOW - 22 * 60_000),
                last_check_request: None,
                rp_job: running.then_some(job),
                maintenance_job: None,
                last_check: None,
            },
        );
        state.vms.insert(
            vm,
            Vm {
                id: vm,
                name: format!("vm{v}"),
                node: node.clone(),
                disks,
                power: PowerState::Running,
                present: true,
                group: Some(group),
                disk_states,
                last_backup_at: last,
                tracking: Default::default(),
                tracking_lost: Default::default(),
            },
        );
    }
    state
}

/// Touches what the planners read, plans nothing.
fn baseline(state: &State) -> u64 {
    let mut sum = 0u64;
    for group in state.groups.values().filter(|g| !g.deleted) {
        sum = sum.wrapping_add(u64::from(group.policy.retention_days));
        for vm in &group.members {
            let Some(known) = state.vms.get(vm).filter(|v| v.present) else {
                continue;
            };
            sum = sum.wrapping_add(known.disk_states.len() as u64);
            if let Some(p) = state.protection.get(vm) {
                sum = sum.wrapping_add(p.last_rp_request.unwrap_or(0));
            }
            if let Some(rps) = state.rps.get(vm) {
                for rp in rps {
                    sum = sum.wrapping_add(rp.taken_at);
                }
            }
        }
    }
    sum
}

fn median_ms(mut f: impl FnMut() -> usize) -> (f64, usize) {
    let mut out = 0;
    for _ in 0..3 {
        out = f();
    }
    let mut times: Vec<f64> = (0..15)
        .map(|_| {
            let t = Instant::now();
            out = std::hint::black_box(f());
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], out)
}

fn main() {
    let n_vms = arg("--vms", 10_000);
    let n_groups = arg("--groups", 200);
    let n_rps = arg("--rps", 48);
    let t = Instant::now();
    let state = build(n_vms, n_groups, n_rps);
    println!(
        "projections: {n_vms} VMs in {n_groups} groups, {} recovery points, {} jobs (built in {:.1} s)",
        state.rps.values().map(Vec::len).sum::<usize>(),
        state.jobs.len(),
        t.elapsed().as_secs_f64()
    );
    let tz = TimeZone::parse("Europe/Berlin").unwrap();
    let (base_ms, _) = median_ms(|| baseline(&state) as usize);
    let (tick_ms, due) = median_ms(|| protect::due_runs(&state, &tz, NOW).len());
    let (retention_ms, prune) = median_ms(|| protect::prune_candidates(&state, NOW).len());
    println!("baseline (iterate the projections)   {base_ms:>8.2} ms");
    println!(
        "scheduler tick                       {tick_ms:>8.2} ms  {:>5.1}x baseline  ({due} runs due; goal <= 50 ms)",
        tick_ms / base_ms
    );
    println!(
        "retention pass                       {retention_ms:>8.2} ms  {:>5.1}x baseline  ({prune} VMs to prune; goal <= 200 ms)",
        retention_ms / base_ms
    );
}
