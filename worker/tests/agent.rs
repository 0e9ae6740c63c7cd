//! The step executor and the `image` adapter against real images (raw files and qcow2 made by
//! `qemu-img`) and a real repository in a temp dir: the plan of a backup job step by step,
//! restores, retries, changed images, cancellation, heartbeats, and descriptor validation.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cairn_schemas::ids::{DiskId, JobId, NodeId, RecoveryPointId, StepId, VmId};
use cairn_schemas::v1::{
    Consistency, ConsistencyWanted, DiskSource, FailureClass, ImageFormat, PowerState,
    RecoveryTarget, ReportBody, StepResult, StepSpec, StepWork, VmInventory,
};
use cairn_worker::agent::descriptor::{self, Descriptor, DescriptorDisk};
use cairn_worker::agent::{Agent, AgentConfig, FaultDelays};
use cairn_worker::boundary::{Encryption, NodeSettings, RegisteredRepository};
use cairn_worker::repo::{self, NoProgress, Repository};
use cairn_worker::source;

const MIB: u64 = 1 << 20;
const NODE: &str = "kvm-01";

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deterministic non-repeating bytes (xorshift): incompressible, and misplaced data is caught.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A sparse raw image of `size` bytes with pattern data at `(offset, len)` places.
fn make_raw(path: &Path, size: u64, data: &[(u64, u64)], seed: u64) {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    for &(offset, len) in data {
        file.write_all_at(&pattern(seed ^ offset, len as usize), offset)
            .unwrap();
    }
}

/// A qcow2 image made by `qemu-img convert` from a raw one with data.
fn make_qcow2(path: &Path, size: u64, data: &[(u64, u64)], seed: u64) {
    let raw = path.with_extension("src.raw");
    make_raw(&raw, size, data, seed);
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(path));
    std::fs::remove_file(raw).unwrap();
}

/// A raw image of `size` bytes of random-looking data, written in 8 MiB pieces.
fn make_random_raw(path: &Path, size: u64) {
    let file = std::fs::File::create(path).unwrap();
    let piece = 8 * MIB;
    for i in 0..size / piece {
        file.write_all_at(&pattern(0x5eed + i, piece as usize), i * piece)
            .unwrap();
    }
}

fn read_image(path: &Path, format: ImageFormat) -> Vec<u8> {
    let mut image = source::open_source(path, Some(to_source(format))).unwrap();
    let mut buf = vec![0u8; image.size() as usize];
    for (i, piece) in buf.chunks_mut(4 * MIB as usize).enumerate() {
        image.read_at(i as u64 * 4 * MIB, piece).unwrap();
    }
    buf
}

fn to_source(format: ImageFormat) -> source::ImageFormat {
    descriptor::to_source_format(format)
}

fn disk_id(name: &str) -> DiskId {
    DiskId::new(name).unwrap()
}

/// The settings of a test node in `dir`: repository `default` at `dir/repo` (plain), and
/// `dir` as its recovery, image and seed root.
fn node_settings(dir: &Path) -> NodeSettings {
    let mut settings = NodeSettings {
        recovery_roots: vec![dir.to_path_buf()],
        image_roots: vec![dir.to_path_buf()],
        seed_roots: vec![dir.to_path_buf()],
        ..NodeSettings::default()
    };
    settings.repositories.insert(
        "default".into(),
        RegisteredRepository {
            path: dir.join("repo"),
            encryption: Encryption::None,
        },
    );
    settings
}

/// A node: its descriptor folder, a repository and an agent.
struct Node {
    dir: tempfile::TempDir,
    agent: Agent,
    seq: std::cell::Cell<u64>,
}

impl Node {
    fn new() -> Node {
        Node::with_settings(node_settings)
    }

    /// A node whose settings `settings` makes from its folder.
    fn with_settings(settings: impl FnOnce(&Path) -> NodeSettings) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let repo_dir = dir.path().join("repo");
        Repository::init(&repo_dir, 65536, None).unwrap();
        let agent = Agent::new(AgentConfig {
            node: NodeId::new(NODE).unwrap(),
            vms_dir: dir.path().join("vms"),
            key_file: None,
            threads: 2,
            settings: settings(dir.path()),
        })
        .unwrap()
        .with_fault_delays(FaultDelays::default())
        .with_progress_interval(Duration::from_millis(10));
        Node {
            dir,
            agent,
            seq: std::cell::Cell::new(0),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The repository's registered name.
    fn repository(&self) -> String {
        "default".into()
    }

    fn repo(&self) -> Repository {
        Repository::open(&self.path("repo"), None).unwrap()
    }

    /// Describes a VM with these `(disk id, image, format)`s and returns its inventory entry.
    fn describe(
        &self,
        name: &str,
        uuid: &str,
        disks: &[(&str, &Path, ImageFormat)],
    ) -> VmInventory {
        let descriptor = Descriptor {
            name: name.into(),
            uuid: uuid::Uuid::parse_str(uuid).unwrap(),
            disks: disks
                .iter()
                .map(|&(id, path, format)| DescriptorDisk {
                    id: disk_id(id),
                    path: path.to_path_buf(),
                    format: Some(format),
                    node: None,
                })
                .collect(),
            power: PowerState::Stopped,
            qemu: None,
        };
        descriptor::write_descriptor(&self.path("vms"), &descriptor).unwrap();
        let inventory = self.agent.inventory();
        assert_eq!(inventory.problems, vec![]);
        inventory
            .vms
            .into_iter()
            .find(|vm| vm.vm == descriptor.vm_id())
            .unwrap()
    }

    fn id(&self) -> u64 {
        self.seq.set(self.seq.get() + 1);
        self.seq.get()
    }

    fn spec(&self, vm: VmId, work: StepWork) -> StepSpec {
        let n = self.id();
        StepSpec {
            step: StepId::new_v7(1_700_000_000_000 + n, [n as u8; 10]),
            attempt: 1,
            job: JobId::new_v7(1_700_000_000_000, [1; 10]),
            partition: 3,
            epoch: 7,
            node: NodeId::new(NODE).unwrap(),
            vm,
            work,
        }
    }

    /// Executes a step; returns the reports sent through the callback and the final body.
    fn execute(&self, spec: &StepSpec) -> (Vec<ReportBody>, ReportBody) {
        let mut reports = Vec::new();
        let cancel = AtomicBool::new(false);
        let last = self
            .agent
            .execute(spec, &mut |body| reports.push(body), &cancel);
        assert_eq!(reports.first(), Some(&ReportBody::Started));
        (reports, last)
    }

    fn succeed(&self, spec: &StepSpec) -> StepResult {
        match self.execute(spec).1 {
            ReportBody::Succeeded { result } => result,
            other => panic!("{:?} failed: {other:?}", spec.kind()),
        }
    }

    fn fail(&self, spec: &StepSpec) -> (FailureClass, String) {
        match self.execute(spec).1 {
            ReportBody::Failed { class, message } => (class, message),
            other => panic!("{:?} should have failed: {other:?}", spec.kind()),
        }
    }

    fn snapshot(&self, vm: &VmInventory) -> String {
        let spec = self.spec(
            vm.vm,
            StepWork::Snapshot {
                vm_name: vm.name.clone(),
                disks: vm.disks.iter().cloned().map(DiskSource::from).collect(),
                consistency: ConsistencyWanted::ApplicationWithCrashFallback,
            },
        );
        match self.succeed(&spec) {
            StepResult::Snapshot {
                snapshot,
                consistency,
                tracking,
            } => {
                assert_eq!(consistency, Consistency::Crash);
                assert!(tracking.is_empty());
                snapshot
            }
            other => panic!("{other:?}"),
        }
    }

    fn transfer_spec(
        &self,
        vm: &VmInventory,
        disk: usize,
        snapshot: &str,
        rp: RecoveryPointId,
    ) -> StepSpec {
        self.spec(
            vm.vm,
            StepWork::Transfer {
                source: vm.disks[disk].clone().into(),
                snapshot: snapshot.into(),
                repository: self.repository(),
                rp,
                parent_rp: None,
                change_tracking: None,
                chunk_size: 65536,
            },
        )
    }

    fn commit_spec(&self, vm: &VmInventory, rp: RecoveryPointId, disks: Vec<DiskId>) -> StepSpec {
        self.spec(
            vm.vm,
            StepWork::CommitRecoveryPoint {
                repository: self.repository(),
                rp,
                disks,
                consistency: Consistency::Crash,
            },
        )
    }

    fn restore_spec(
        &self,
        vm: VmId,
        disk: &str,
        rp: RecoveryPointId,
        target: &Path,
        format: ImageFormat,
    ) -> StepSpec {
        self.spec(
            vm,
            StepWork::Restore {
                disk: disk_id(disk),
                repository: self.repository(),
                rp,
                target_path: target.to_str().unwrap().into(),
                target_format: format,
            },
        )
    }

    fn rps(&self) -> Vec<repo::RecoveryPointInfo> {
        self.repo().list(None).unwrap()
    }
}

fn rp_id(n: u64) -> RecoveryPointId {
    RecoveryPointId::new_v7(1_700_000_100_000 + n * 1000, [n as u8; 10])
}

/// Not a v7 UUID: the worker derives a stable v7 VM id from it.
const WEB01_UUID: &str = "9b2e4c4a-3f4e-4b8e-9d1a-2c3b4d5e6f70";

/// A VM with a raw and a qcow2 disk of 8 MiB each, data in a few places, holes elsewhere.
fn two_disk_vm(node: &Node) -> VmInventory {
    let raw = node.path("images/web01-disk0.raw");
    let qcow2 = node.path("images/web01-disk1.qcow2");
    std::fs::create_dir_all(raw.parent().unwrap()).unwrap();
    make_raw(&raw, 8 * MIB, &[(0, MIB), (5 * MIB + 4096, 70_000)], 1);
    make_qcow2(
        &qcow2,
        8 * MIB,
        &[(MIB, 2 * MIB), (8 * MIB - 65536, 65536)],
        2,
    );
    node.describe(
        "web01",
        WEB01_UUID,
        &[
            ("disk0", &raw, ImageFormat::Raw),
            ("disk1", &qcow2, ImageFormat::Qcow2),
        ],
    )
}

/// Runs the plan of a backup job: Snapshot → Transfer ∥ Transfer → Release → Commit.
fn backup_job(node: &Node, vm: &VmInventory, rp: RecoveryPointId) -> Vec<StepResult> {
    let snapshot = node.snapshot(vm);
    let transfers: Vec<StepResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..vm.disks.len())
            .map(|i| {
                let spec = node.transfer_spec(vm, i, &snapshot, rp);
                let agent = &node.agent;
                scope.spawn(move || {
                    let cancel = AtomicBool::new(false);
                    agent.execute(&spec, &mut |_| {}, &cancel)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join().unwrap() {
                ReportBody::Succeeded { result } => result,
                other => panic!("transfer failed: {other:?}"),
            })
            .collect()
    });
    let release = node.spec(vm.vm, StepWork::ReleaseSnapshot { snapshot });
    assert_eq!(node.succeed(&release), StepResult::ReleaseSnapshot);
    let disks = vm.disks.iter().map(|d| d.disk.clone()).collect();
    assert_eq!(
        node.succeed(&node.commit_spec(vm, rp, disks)),
        StepResult::CommitRecoveryPoint
    );
    transfers
}

#[test]
fn a_backup_plan_of_two_disks_then_restores_give_back_the_disks() {
    let node = Node::new();
    let vm = two_disk_vm(&node);
    assert_eq!(vm.disks[1].format, ImageFormat::Qcow2);
    assert_eq!(vm.disks[1].size_bytes, 8 * MIB);

    let rp1 = rp_id(1);
    let results = backup_job(&node, &vm, rp1);
    for (i, result) in results.iter().enumerate() {
        let StepResult::Transfer {
            disk,
            bytes_read,
            bytes_stored,
            incremental,
        } = result
        else {
            panic!("{result:?}")
        };
        assert_eq!(*disk, vm.disks[i].disk);
        assert!(*bytes_read > 0 && *bytes_stored > 0, "{result:?}");
        assert!(!incremental, "the first backup has no parent");
    }
    let rps = node.rps();
    assert_eq!(rps.len(), 2);
    for info in &rps {
        assert_eq!(info.rp, rp1.to_string());
        assert!(
            info.disk.starts_with(&format!("{}.", vm.vm)),
            "{}",
            info.disk
        );
        assert_eq!(
            info.created_at_ms,
            rp1.unix_millis(),
            "the rp's time comes from its id"
        );
    }

    // The raw disk changes; the next recovery point is incremental.
    let raw = PathBuf::from(&vm.disks[0].image_path);
    let first_raw = std::fs::read(&raw).unwrap();
    let first_raw_again = first_raw.clone();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .write_all_at(&pattern(99, 200_000), 3 * MIB)
        .unwrap();
    let rp2 = rp_id(2);
    let results = backup_job(&node, &vm, rp2);
    let StepResult::Transfer {
        bytes_stored,
        incremental,
        ..
    } = &results[0]
    else {
        panic!()
    };
    assert!(*incremental);
    assert!(
        *bytes_stored < 400_000,
        "only the changed chunks are stored: {bytes_stored}"
    );
    assert_eq!(node.rps().len(), 4);

    // Restore each disk of both recovery points into new images, in other formats too.
    let restored = node.path("restored/deep/folder");
    for (rp, raw_content) in [(rp1, first_raw), (rp2, std::fs::read(&raw).unwrap())] {
        for (i, target_format) in [(0, ImageFormat::Qcow2), (1, ImageFormat::Raw)] {
            let disk = vm.disks[i].disk.as_str();
            let target = restored.join(format!("{rp}-{disk}.img"));
            let spec = node.restore_spec(vm.vm, disk, rp, &target, target_format);
            let StepResult::Restore {
                disk: restored_disk,
                bytes_written,
            } = node.succeed(&spec)
            else {
                panic!()
            };
            assert_eq!(restored_disk, vm.disks[i].disk);
            assert!(bytes_written > 0);
            let expected = if i == 0 {
                raw_content.clone()
            } else {
                read_image(Path::new(&vm.disks[1].image_path), ImageFormat::Qcow2)
            };
            assert!(
                read_image(&target, target_format) == expected,
                "{disk} of {rp} differs"
            );
        }
    }

    // Recovery to the original (stopped) VM: a delta restore over its own disk.
    let spec = node.restore_spec(vm.vm, "disk0", rp1, &raw, ImageFormat::Raw);
    let StepResult::Restore { bytes_written, .. } = node.succeed(&spec) else {
        panic!()
    };
    assert!(
        bytes_written < MIB,
        "only the changed chunks are written back: {bytes_written}"
    );
    assert!(std::fs::read(&raw).unwrap() == first_raw_again);
}

#[test]
fn a_retried_restore_continues_on_the_target_it_left() {
    let node = Node::new();
    let vm = two_disk_vm(&node);
    let rp = rp_id(1);
    backup_job(&node, &vm, rp);
    let target = node.path("restore/disk1.raw");
    let spec = node.restore_spec(vm.vm, "disk1", rp, &target, ImageFormat::Raw);
    let StepResult::Restore {
        bytes_written: full,
        ..
    } = node.succeed(&spec)
    else {
        panic!()
    };

    // An earlier attempt died midway: part of the target is wrong or missing.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    file.write_all_at(&vec![0u8; 65536], MIB).unwrap();
    file.write_all_at(&pattern(7, 4096), 6 * MIB).unwrap();
    drop(file);
    let mut retry = spec.clone();
    retry.attempt = 2;
    let StepResult::Restore { bytes_written, .. } = node.succeed(&retry) else {
        panic!()
    };
    assert!(
        bytes_written < full,
        "a delta restore rewrites only what differs: {bytes_written} of {full}"
    );
    let expected = read_image(Path::new(&vm.disks[1].image_path), ImageFormat::Qcow2);
    assert!(read_image(&target, ImageFormat::Raw) == expected);

    // A target of another size is never overwritten.
    let other = node.path("restore/other.raw");
    make_raw(&other, 4 * MIB, &[(0, 4096)], 3);
    let (class, message) =
        node.fail(&node.restore_spec(vm.vm, "disk1", rp, &other, ImageFormat::Raw));
    assert_eq!(class, FailureClass::Permanent);
    assert!(message.contains("refusing to overwrite"), "{message}");
    assert_eq!(std::fs::metadata(&other).unwrap().len(), 4 * MIB);
}

#[test]
fn a_rerun_transfer_makes_no_second_recovery_point() {
    let node = Node::new();
    let vm = two_disk_vm(&node);
    let rp = rp_id(1);
    let snapshot = node.snapshot(&vm);
    let spec = node.transfer_spec(&vm, 0, &snapshot, rp);
    let first = node.succeed(&spec);
    let mut retry = spec.clone();
    retry.attempt = 2;
    assert_eq!(
        node.succeed(&retry),
        first,
        "the retry reports the same recovery point"
    );
    assert_eq!(node.rps().len(), 1);

    // Even when the image changed after the first attempt committed it.
    let raw = &vm.disks[0].image_path;
    std::fs::OpenOptions::new()
        .write(true)
        .open(raw)
        .unwrap()
        .write_all_at(b"new", 0)
        .unwrap();
    retry.attempt = 3;
    assert_eq!(node.succeed(&retry), first);
    assert_eq!(node.rps().len(), 1);
}

#[test]
fn a_transfer_after_the_image_changed_fails_retryably() {
    let node = Node::new();
    let vm = two_disk_vm(&node);
    let snapshot = node.snapshot(&vm);
    let qcow2 = &vm.disks[1].image_path;
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 0 64k", qcow2]));
    let (class, message) = node.fail(&node.transfer_spec(&vm, 1, &snapshot, rp_id(1)));
    assert_eq!(class, FailureClass::Retryable);
    assert!(message.contains("changed since the snapshot"), "{message}");
    assert!(message.contains("disk1"), "{message}");
    assert!(node.rps().is_empty());
    // The untouched disk still transfers.
    node.succeed(&node.transfer_spec(&vm, 0, &snapshot, rp_id(1)));
}

#[test]
fn a_commit_with_a_missing_disk_fails_permanently() {
    let node = Node::new();
    let vm = two_disk_vm(&node);
    let rp = rp_id(1);
    let snapshot = node.snapshot(&vm);
    node.succeed(&node.transfer_spec(&vm, 0, &snapshot, rp));
    let (class, message) =
        node.fail(&node.commit_spec(&vm, rp, vec![disk_id("disk0"), disk_id("disk1")]));
    assert_eq!(class, FailureClass::Permanent);
    assert!(message.contains("has no disk disk1"), "{message}");
    assert!(message.contains(&rp.to_string()), "{message}");
    // The other recovery point of the same lineage does not count.
    let (_, message) = node.fail(&node.commit_spec(&vm, rp_id(2), vec![disk_id("disk0")]));
    assert!(message.contains("has no disk disk0"), "{message}");
    assert_eq!(
        node.succeed(&node.commit_spec(&vm, rp, vec![disk_id("disk0")])),
        StepResult::CommitRecoveryPoint
    );
}

/// A VM with one 512 MiB disk of random data.
fn big_vm(node: &Node) -> VmInventory {
    let path = node.path("big.raw");
    make_random_raw(&path, 512 * MIB);
    node.describe(
        "big",
        "0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d00",
        &[("disk0", &path, ImageFormat::Raw)],
    )
}

#[test]
fn cancelling_stops_a_big_transfer_quickly_and_leaves_the_repository_clean() {
    let node = Node::new();
    let vm = big_vm(&node);
    let snapshot = node.snapshot(&vm);
    let spec = node.transfer_spec(&vm, 0, &snapshot, rp_id(1));
    let cancel = AtomicBool::new(false);
    let mut cancelled_at = None;
    let mut progress_seen = 0;
    let last = node.agent.execute(
        &spec,
        &mut |body| {
            if let ReportBody::Progress { bytes_done, .. } = body {
                progress_seen += 1;
                // Cancel once the transfer is demonstrably under way.
                if bytes_done > 0 && cancelled_at.is_none() {
                    cancel.store(true, Ordering::Relaxed);
                    cancelled_at = Some((Instant::now(), bytes_done));
                }
            }
        },
        &cancel,
    );
    let (at, bytes_done) = cancelled_at.expect("the transfer reported progress before it ended");
    let stop_time = at.elapsed();
    match last {
        ReportBody::Failed { class, message } => {
            assert_eq!(class, FailureClass::Retryable);
            assert!(message.contains("cancelled"), "{message}");
        }
        other => panic!("a cancelled transfer ended with {other:?}"),
    }
    assert!(bytes_done < 512 * MIB && progress_seen >= 1);
    assert!(
        stop_time < Duration::from_secs(5),
        "took {stop_time:?} to stop"
    );
    let repo = node.repo();
    assert!(repo.list(None).unwrap().is_empty(), "nothing was published");
    let report = repo::verify(&repo, None, 2, &NoProgress).unwrap();
    assert!(report.ok, "{report:?}");

    // The retry completes, reusing what the cancelled attempt made durable.
    let mut retry = spec.clone();
    retry.attempt = 2;
    assert!(matches!(node.succeed(&retry), StepResult::Transfer { .. }));
    assert_eq!(node.rps().len(), 1);
    assert!(repo::verify(&repo, None, 2, &NoProgress).unwrap().ok);
}

#[test]
fn heartbeats_arrive_while_a_long_transfer_runs_and_a_cancelled_restore_resumes() {
    let node = Node::new();
    let vm = big_vm(&node);
    let snapshot = node.snapshot(&vm);
    let (reports, last) = node.execute(&node.transfer_spec(&vm, 0, &snapshot, rp_id(1)));
    assert!(matches!(last, ReportBody::Succeeded { .. }), "{last:?}");
    let progress: Vec<(u64, u64)> = reports
        .iter()
        .filter_map(|r| match r {
            ReportBody::Progress {
                bytes_done,
                bytes_total,
            } => Some((*bytes_done, *bytes_total)),
            _ => None,
        })
        .collect();
    assert!(progress.len() >= 2, "{progress:?}");
    assert!(
        progress.windows(2).all(|w| w[0].0 <= w[1].0),
        "{progress:?}"
    );
    assert!(
        progress
            .iter()
            .all(|&(done, total)| total == 512 * MIB && done <= total),
        "{progress:?}"
    );
    assert!(
        matches!(reports.last(), Some(ReportBody::Progress { .. })),
        "final body is returned, not reported"
    );

    // A restore cancelled midway leaves a partial target; the retry finishes it by delta.
    let target = node.path("restored/big.raw");
    let rp = rp_id(1);
    let spec = node.restore_spec(vm.vm, "disk0", rp, &target, ImageFormat::Raw);
    let cancel = AtomicBool::new(false);
    let last = node.agent.execute(
        &spec,
        &mut |body| {
            if matches!(body, ReportBody::Progress { bytes_done, .. } if bytes_done > 0) {
                cancel.store(true, Ordering::Relaxed);
            }
        },
        &cancel,
    );
    match last {
        ReportBody::Failed { class, message } => {
            assert_eq!(class, FailureClass::Retryable);
            assert!(message.contains("restore cancelled"), "{message}");
        }
        other => panic!("a cancelled restore ended with {other:?}"),
    }
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 512 * MIB);
    let mut retry = spec.clone();
    retry.attempt = 2;
    let StepResult::Restore { bytes_written, .. } = node.succeed(&retry) else {
        panic!()
    };
    assert!(
        bytes_written < 512 * MIB,
        "the retry continued: {bytes_written}"
    );
    assert!(std::fs::read(&target).unwrap() == std::fs::read(node.path("big.raw")).unwrap());
}

#[test]
fn the_fault_hook_delays_a_step_and_cancelling_ends_the_delay() {
    let node = Node::new();
    let vm = two_disk_vm(&node);
    let agent = node
        .agent
        .clone()
        .with_fault_delays(FaultDelays::parse("ReleaseSnapshot=600000,Transfer=0").unwrap());
    let spec = node.spec(
        vm.vm,
        StepWork::ReleaseSnapshot {
            snapshot: "never-made".into(),
        },
    );
    let cancel = AtomicBool::new(false);
    let mut heartbeats = 0;
    let last = agent.execute(
        &spec,
        &mut |body| {
            if matches!(body, ReportBody::Progress { .. }) {
                heartbeats += 1;
                if heartbeats == 3 {
                    cancel.store(true, Ordering::Relaxed);
                }
            }
        },
        &cancel,
    );
    assert!(
        heartbeats >= 3,
        "the delayed step heartbeats until it is cancelled"
    );
    assert!(
        matches!(
            last,
            ReportBody::Failed {
                class: FailureClass::Retryable,
                ..
            }
        ),
        "{last:?}"
    );
    // Without the hook the same release succeeds, whatever the handle.
    assert_eq!(node.succeed(&spec), StepResult::ReleaseSnapshot);
}

#[test]
fn steps_that_must_not_run_fail_permanently_with_a_reason() {
    let node = Node::new();
    let vm = two_disk_vm(&node);
    let snapshot = node.snapshot(&vm);
    let rp = rp_id(1);
    let check = |spec: StepSpec, wanted: &str| {
        let (class, message) = node.fail(&spec);
        assert_eq!(class, FailureClass::Permanent, "{message}");
        assert!(
            message.contains(wanted),
            "{:?}: got {message:?}, wanted {wanted:?}",
            spec.kind()
        );
    };

    let mut wrong_node = node.spec(
        vm.vm,
        StepWork::ReleaseSnapshot {
            snapshot: snapshot.clone(),
        },
    );
    wrong_node.node = NodeId::new("kvm-02").unwrap();
    check(wrong_node, "is for node kvm-02");

    let stranger = VmId::new_v7(1, [9; 10]);
    let mut snap = node.spec(
        stranger,
        StepWork::Snapshot {
            vm_name: "stranger".into(),
            disks: vm.disks.iter().cloned().map(DiskSource::from).collect(),
            consistency: ConsistencyWanted::CrashOnly,
        },
    );
    check(snap.clone(), "is not described on node kvm-01");

    // A path that is not the described disk's: the worker reads only described disks.
    snap.vm = vm.vm;
    if let StepWork::Snapshot { disks, .. } = &mut snap.work {
        disks[0].image_path = "/etc/shadow".into();
    }
    check(snap.clone(), "has no disk disk0 at /etc/shadow");

    if let StepWork::Snapshot { disks, .. } = &mut snap.work {
        *disks = vm.disks.iter().cloned().map(DiskSource::from).collect();
        disks[1].format = ImageFormat::Raw;
    }
    check(snap.clone(), "is Qcow2 by its descriptor");

    if let StepWork::Snapshot { disks, .. } = &mut snap.work {
        *disks = vm.disks.iter().cloned().map(DiskSource::from).collect();
        disks[0].size_bytes += 512;
    }
    check(snap, "the step expects 8389120 bytes");

    let mut transfer = node.transfer_spec(&vm, 0, "image1;vm=garbage", rp);
    check(transfer.clone(), "unusable snapshot handle");
    if let StepWork::Transfer {
        snapshot: handle,
        repository,
        ..
    } = &mut transfer.work
    {
        *handle = snapshot.clone();
        *repository = "s3://bucket/repo".into();
    }
    check(
        transfer.clone(),
        "repository \"s3://bucket/repo\" is not registered on this node (registered: default)",
    );
    if let StepWork::Transfer { repository, .. } = &mut transfer.work {
        *repository = node.path("no-repo-here").to_str().unwrap().into();
    }
    check(transfer.clone(), "is not registered on this node");
    // The registered repository's folder names it too (groups made before names).
    if let StepWork::Transfer { repository, .. } = &mut transfer.work {
        *repository = node.path("repo").to_str().unwrap().into();
    }
    let config = node.path("repo/cairn-repo.json");
    let aside = node.path("cairn-repo.json.aside");
    std::fs::rename(&config, &aside).unwrap();
    check(transfer, "not a cairn repository");
    std::fs::rename(&aside, &config).unwrap();

    check(
        node.restore_spec(vm.vm, "disk0", rp, &node.path("r/x.raw"), ImageFormat::Raw),
        "no such disk",
    );
    check(
        node.restore_spec(
            vm.vm,
            "disk0",
            rp,
            Path::new("relative/x.raw"),
            ImageFormat::Raw,
        ),
        "not an absolute path",
    );
    node.succeed(&node.transfer_spec(&vm, 0, &snapshot, rp));
    check(
        node.restore_spec(
            vm.vm,
            "disk0",
            rp_id(5),
            &node.path("r/x.raw"),
            ImageFormat::Raw,
        ),
        "no recovery point",
    );
    check(
        node.restore_spec(vm.vm, "disk0", rp, &node.path("vms"), ImageFormat::Raw),
        "is a folder",
    );
    // Another VM's disk of the same size is not a restore target.
    let other_disk = node.path("images/other.raw");
    make_raw(&other_disk, 8 * MIB, &[], 0);
    node.describe(
        "other",
        "0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d01",
        &[("vda", &other_disk, ImageFormat::Raw)],
    );
    check(
        node.restore_spec(vm.vm, "disk0", rp, &other_disk, ImageFormat::Raw),
        "refusing to overwrite another VM's disk",
    );

    // A running VM is neither snapshotted nor restored over.
    let vms = node.path("vms");
    let file = vms.join(descriptor::descriptor_file_name(
        uuid::Uuid::parse_str(WEB01_UUID).unwrap(),
    ));
    let mut web01 = descriptor::read_descriptor(&file).unwrap();
    web01.power = PowerState::Running;
    descriptor::write_descriptor(&vms, &web01).unwrap();
    check(
        node.spec(
            vm.vm,
            StepWork::Snapshot {
                vm_name: vm.name.clone(),
                disks: vm.disks.iter().cloned().map(DiskSource::from).collect(),
                consistency: ConsistencyWanted::CrashOnly,
            },
        ),
        "VM web01 is running",
    );
    check(
        node.restore_spec(
            vm.vm,
            "disk0",
            rp,
            Path::new(&vm.disks[0].image_path),
            ImageFormat::Raw,
        ),
        "stop it before restoring over its disks",
    );
    assert!(
        read_image(&other_disk, ImageFormat::Raw)
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn the_inventory_lists_good_descriptors_and_names_the_bad_ones() {
    let node = Node::new();
    let vms = node.path("vms");
    std::fs::create_dir_all(&vms).unwrap();
    let disk = node.path("d.raw");
    make_raw(&disk, MIB, &[(0, 4096)], 1);
    let qcow2 = node.path("d.qcow2");
    make_qcow2(&qcow2, 2 * MIB, &[(0, 4096)], 2);
    let d = disk.to_str().unwrap();
    let q = qcow2.to_str().unwrap();
    let uuid = |n: u32| format!("0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c{n:04x}");
    let write = |name: &str, text: &str| std::fs::write(vms.join(name), text).unwrap();

    write(
        "good.json",
        &format!(
            r#"{{"name": "web 01", "uuid": "{}", "disks": [{{"id": "disk0", "path": "{d}"}}, {{"id": "disk1", "path": "{q}"}}], "power": "paused"}}"#,
            uuid(1)
        ),
    );
    let bad: Vec<(&str, String, &str)> = vec![
        (
            "bad-json.json",
            "{\"name\": ".into(),
            "not a valid VM descriptor",
        ),
        (
            "unknown-field.json",
            format!(
                r#"{{"name": "a", "uuid": "{}", "disks": [{{"id": "d", "path": "{d}"}}], "memory": 4096}}"#,
                uuid(2)
            ),
            "unknown field `memory`",
        ),
        (
            "missing-disk.json",
            format!(
                r#"{{"name": "a", "uuid": "{}", "disks": [{{"id": "d", "path": "/nonexistent/a.qcow2"}}]}}"#,
                uuid(3)
            ),
            "disk d: /nonexistent/a.qcow2",
        ),
        (
            "duplicate-disk.json",
            format!(
                r#"{{"name": "a", "uuid": "{}", "disks": [{{"id": "d", "path": "{d}"}}, {{"id": "d", "path": "{q}"}}]}}"#,
                uuid(4)
            ),
            "disk id \"d\" is used twice",
        ),
        (
            "relative.json",
            format!(
                r#"{{"name": "a", "uuid": "{}", "disks": [{{"id": "d", "path": "d.raw"}}]}}"#,
                uuid(5)
            ),
            "\"d.raw\" is not an absolute path",
        ),
        (
            "huge.json",
            format!("{{\"name\": \"{}\"}}", "x".repeat(70_000)),
            "larger than 65536 bytes",
        ),
        (
            "bad-uuid.json",
            format!(r#"{{"name": "a", "uuid": "web01", "disks": [{{"id": "d", "path": "{d}"}}]}}"#),
            "\"web01\" is not a UUID",
        ),
        (
            "same-uuid.json",
            format!(
                r#"{{"name": "b", "uuid": "{}", "disks": [{{"id": "d", "path": "{d}"}}]}}"#,
                uuid(1)
            ),
            "is already described by",
        ),
        (
            "not-an-image.json",
            format!(
                r#"{{"name": "a", "uuid": "{}", "disks": [{{"id": "d", "path": "{}"}}]}}"#,
                uuid(6),
                vms.display()
            ),
            "disk d:",
        ),
    ];
    for (name, text, _) in &bad {
        write(name, text);
    }
    // A FIFO must not hang the scan; hidden and non-JSON files are not descriptors.
    run(Command::new("mkfifo").arg(vms.join("fifo.json")));
    write(".tmp.json", "garbage");
    write("notes.txt", "garbage");

    let inventory = node.agent.inventory();
    assert_eq!(inventory.vms.len(), 1, "{inventory:?}");
    let vm = &inventory.vms[0];
    assert_eq!(vm.name, "web 01");
    assert_eq!(vm.vm.to_string(), uuid(1));
    assert_eq!(vm.power, PowerState::Paused);
    assert_eq!(
        vm.disks
            .iter()
            .map(|d| (d.disk.as_str(), d.size_bytes, d.format))
            .collect::<Vec<_>>(),
        vec![
            ("disk0", MIB, ImageFormat::Raw),
            ("disk1", 2 * MIB, ImageFormat::Qcow2)
        ],
        "formats are detected when the descriptor does not give them"
    );
    assert_eq!(
        inventory.problems.len(),
        bad.len() + 1,
        "{:#?}",
        inventory.problems
    );
    for (name, _, wanted) in &bad {
        let problem = inventory
            .problems
            .iter()
            .find(|p| p.file == vms.join(name))
            .unwrap_or_else(|| panic!("no problem for {name}: {:#?}", inventory.problems));
        assert!(
            problem.message.contains(wanted),
            "{name}: {:?}, wanted {wanted:?}",
            problem.message
        );
    }
    let fifo = inventory
        .problems
        .iter()
        .find(|p| p.file.ends_with("fifo.json"))
        .unwrap();
    assert!(
        fifo.message.contains("not a regular file"),
        "{}",
        fifo.message
    );

    // A missing folder is one problem, not a panic.
    let empty = descriptor::scan(&node.path("nowhere"));
    assert!(empty.vms.is_empty());
    assert!(
        empty.problems[0].message.contains("cannot list"),
        "{:?}",
        empty.problems
    );
}

#[test]
fn written_descriptors_are_read_back_and_uuids_stay_unique() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("a.raw");
    make_raw(&disk, MIB, &[], 0);
    let descriptor = Descriptor {
        name: "restored-web01".into(),
        uuid: uuid::Uuid::parse_str("0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d00").unwrap(),
        disks: vec![DescriptorDisk {
            id: disk_id("disk0"),
            path: disk.clone(),
            format: None,
            node: None,
        }],
        power: PowerState::Stopped,
        qemu: None,
    };
    let vms = dir.path().join("vms");
    let path = descriptor::write_descriptor(&vms, &descriptor).unwrap();
    assert_eq!(descriptor::read_descriptor(&path).unwrap(), descriptor);
    // Rewriting the same VM replaces its file.
    descriptor::write_descriptor(&vms, &descriptor).unwrap();
    let names: Vec<_> = std::fs::read_dir(&vms)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // Another file with the same uuid is refused.
    std::fs::rename(&path, vms.join("web01.json")).unwrap();
    let err = descriptor::write_descriptor(&vms, &descriptor)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already described by"), "{err}");
    // Invalid descriptors are not written.
    let bad = Descriptor {
        disks: vec![],
        ..descriptor
    };
    assert!(descriptor::write_descriptor(&vms, &bad).is_err());
    assert_eq!(descriptor::scan(&vms).vms.len(), 1);
}

/// A node whose recovery root is `r/`, seed root `seeds/`, image roots `images/` and `vms/`.
fn bounded_node() -> Node {
    Node::with_settings(|dir| {
        NodeSettings {
            recovery_roots: vec![dir.join("r")],
            seed_roots: vec![dir.join("seeds")],
            image_roots: vec![dir.join("images")],
            ..NodeSettings::default()
        }
        .with_repository("default", dir.join("repo"), Encryption::None)
    })
}

/// Every file and folder below `dir`, as relative paths.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(dir).unwrap().to_path_buf());
            if path.symlink_metadata().unwrap().is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn targets_outside_the_recovery_roots_are_refused_and_nothing_is_written() {
    let node = bounded_node();
    std::fs::create_dir_all(node.path("r")).unwrap();
    let vm = two_disk_vm(&node);
    let rp = rp_id(1);
    backup_job(&node, &vm, rp);
    let outside = tempfile::tempdir().unwrap();
    let before = tree(outside.path());
    let elsewhere = outside.path().join("dr");
    let image = |name: &str| format!("{}/{name}", elsewhere.display());
    let disks = |folder: &str| -> Vec<DiskSource> {
        vm.disks
            .iter()
            .map(|d| DiskSource {
                disk: d.disk.clone(),
                image_path: format!("{folder}/web01-{}.raw", d.disk),
                format: ImageFormat::Raw,
                size_bytes: d.size_bytes,
            })
            .collect()
    };
    let outside_folder = elsewhere.display().to_string();
    let refusals = [
        // A restore of one disk.
        node.restore_spec(
            vm.vm,
            "disk0",
            rp,
            Path::new(&image("x.raw")),
            ImageFormat::Raw,
        ),
        // A new VM on this node (alternate host).
        node.spec(
            vm.vm,
            StepWork::PrepareRecovery {
                target: RecoveryTarget::AlternateHost {
                    node: NodeId::new(NODE).unwrap(),
                    path: outside_folder.clone(),
                    format: ImageFormat::Raw,
                },
                vm_name: "web01-recovered".into(),
                disks: disks(&outside_folder),
            },
        ),
        // A copy to a folder.
        node.spec(
            vm.vm,
            StepWork::PrepareRecovery {
                target: RecoveryTarget::CopyToFolder {
                    node: NodeId::new(NODE).unwrap(),
                    path: outside_folder.clone(),
                },
                vm_name: "web01".into(),
                disks: disks(&outside_folder),
            },
        ),
        // Item extraction.
        node.spec(
            vm.vm,
            StepWork::ExtractItems {
                disk: disk_id("disk0"),
                repository: node.repository(),
                rp,
                items: vec!["/disk".into()],
                target_path: outside_folder.clone(),
            },
        ),
        // `..` out of a root is outside it too.
        node.restore_spec(
            vm.vm,
            "disk0",
            rp,
            &node.path("r/../escaped.raw"),
            ImageFormat::Raw,
        ),
    ];
    for spec in refusals {
        let (class, message) = node.fail(&spec);
        assert_eq!(class, FailureClass::Permanent, "{message}");
        assert!(
            message.contains("outside the node's recovery roots")
                || message.contains("contains `.` or `..`"),
            "{:?}: {message}",
            spec.kind()
        );
    }
    assert_eq!(
        tree(outside.path()),
        before,
        "nothing was written outside the roots"
    );
    assert!(!node.path("escaped.raw").exists());
    assert_eq!(tree(&node.path("r")), Vec::<PathBuf>::new());

    // A seed folder outside the seed roots is refused before anything is read.
    let seed = node.spec(
        vm.vm,
        StepWork::ImportSeed {
            disk: disk_id("disk0"),
            seed: node.path("r").display().to_string(),
            repository: node.repository(),
            rp: rp_id(2),
        },
    );
    let (class, message) = node.fail(&seed);
    assert_eq!(class, FailureClass::Permanent);
    assert!(
        message.contains(&format!(
            "outside the node's seed roots: {}",
            node.path("r").display()
        )),
        "{message}"
    );

    // Inside the root the same restore works, creating the folders it needs.
    let inside = node.path("r/dr/deep/web01-disk0.raw");
    node.succeed(&node.restore_spec(vm.vm, "disk0", rp, &inside, ImageFormat::Raw));
    assert_eq!(
        std::fs::read(&inside).unwrap(),
        std::fs::read(node.path("images/web01-disk0.raw")).unwrap()
    );
    // A VM name that would become more than one path part is refused.
    let (_, message) = node.fail(&node.restore_spec(
        vm.vm,
        "disk0",
        rp,
        &node.path("r/dr/bad name.raw"),
        ImageFormat::Raw,
    ));
    assert!(message.contains("file name must be made of"), "{message}");
}

#[test]
fn a_symlink_at_a_restore_target_does_not_redirect_the_write() {
    let node = bounded_node();
    let vm = two_disk_vm(&node);
    let rp = rp_id(1);
    backup_job(&node, &vm, rp);
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim.raw");
    make_raw(&victim, 8 * MIB, &[(0, 4096)], 9);
    let victim_bytes = std::fs::read(&victim).unwrap();
    // A link as the target file, and a link as a folder on the way to it.
    std::fs::create_dir_all(node.path("r/dr")).unwrap();
    std::os::unix::fs::symlink(&victim, node.path("r/dr/web01-disk0.raw")).unwrap();
    std::os::unix::fs::symlink(outside.path(), node.path("r/linked")).unwrap();
    for (target, format) in [
        (node.path("r/dr/web01-disk0.raw"), ImageFormat::Raw),
        (node.path("r/dr/web01-disk0.raw"), ImageFormat::Qcow2),
        (node.path("r/linked/victim.raw"), ImageFormat::Raw),
        (node.path("r/linked/new.raw"), ImageFormat::Raw),
    ] {
        let (class, message) = node.fail(&node.restore_spec(vm.vm, "disk0", rp, &target, format));
        assert_eq!(class, FailureClass::Permanent, "{message}");
        assert!(
            message.contains("symbolic link") || message.contains("Too many levels"),
            "{}: {message}",
            target.display()
        );
    }
    assert_eq!(std::fs::read(&victim).unwrap(), victim_bytes);
    assert!(!outside.path().join("new.raw").exists());
}

#[test]
fn a_descriptor_disk_outside_the_image_roots_is_left_out_with_its_reason() {
    let node = bounded_node();
    let inside = node.path("images/in.raw");
    std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
    make_raw(&inside, MIB, &[], 0);
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.raw");
    make_raw(&secret, MIB, &[(0, 4096)], 3);
    let link = node.path("images/link.raw");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    for (name, uuid, path) in [
        ("good", "0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d10", &inside),
        ("outside", "0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d11", &secret),
        ("linked", "0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d12", &link),
    ] {
        let descriptor = Descriptor {
            name: name.into(),
            uuid: uuid::Uuid::parse_str(uuid).unwrap(),
            disks: vec![DescriptorDisk {
                id: disk_id("disk0"),
                path: path.clone(),
                format: Some(ImageFormat::Raw),
                node: None,
            }],
            power: PowerState::Stopped,
            qemu: None,
        };
        descriptor::write_descriptor(&node.path("vms"), &descriptor).unwrap();
    }
    let inventory = node.agent.inventory();
    let names: Vec<_> = inventory.vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["good"]);
    assert_eq!(inventory.problems.len(), 2, "{:?}", inventory.problems);
    for problem in &inventory.problems {
        assert!(
            problem.message.contains("left out of the inventory")
                && problem.message.contains("outside the node's image roots"),
            "{problem:?}"
        );
    }
    // A step naming that VM is refused too: its disk is never read.
    let outside_vm = descriptor::vm_id_for_uuid(
        uuid::Uuid::parse_str("0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d11").unwrap(),
    );
    let (_, message) = node.fail(&node.spec(
        outside_vm,
        StepWork::Snapshot {
            vm_name: "outside".into(),
            disks: vec![DiskSource {
                disk: disk_id("disk0"),
                image_path: secret.display().to_string(),
                format: ImageFormat::Raw,
                size_bytes: MIB,
            }],
            consistency: ConsistencyWanted::CrashOnly,
        },
    ));
    assert!(
        message.contains("outside the node's image roots"),
        "{message}"
    );
}

#[test]
fn registered_repositories_are_initialised_or_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("repo.key");
    std::fs::write(&key, "00".repeat(32)).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = |settings: NodeSettings, key_file: Option<PathBuf>| AgentConfig {
        node: NodeId::new(NODE).unwrap(),
        vms_dir: dir.path().join("vms"),
        key_file,
        threads: 1,
        settings,
    };
    // Missing: made at start, encrypted when required.
    let settings = NodeSettings::default()
        .with_repository("secure", dir.path().join("secure"), Encryption::Required)
        .with_repository("plain", dir.path().join("plain"), Encryption::None);
    Agent::new(config(settings.clone(), Some(key.clone()))).unwrap();
    assert!(
        repo::config::load(&dir.path().join("secure"))
            .unwrap()
            .encryption
            .is_some()
    );
    assert!(
        repo::config::load(&dir.path().join("plain"))
            .unwrap()
            .encryption
            .is_none()
    );
    // Required without a key: refused, naming it, and nothing made.
    let err = Agent::new(config(
        NodeSettings::default().with_repository(
            "nokey",
            dir.path().join("nokey"),
            Encryption::Required,
        ),
        None,
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("repository nokey") && err.contains("no key file"),
        "{err}"
    );
    assert!(!dir.path().join("nokey").exists());
    // Registered `required` but plain: refused at start, naming it.
    let err = Agent::new(config(
        NodeSettings::default().with_repository(
            "plain",
            dir.path().join("plain"),
            Encryption::Required,
        ),
        Some(key.clone()),
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("repository plain") && err.contains("config says it is not encrypted"),
        "{err}"
    );
    // Bad settings are refused with the setting named.
    let err = Agent::new(config(
        NodeSettings {
            recovery_roots: vec!["relative".into()],
            ..NodeSettings::default()
        },
        None,
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("recovery_roots"), "{err}");
}
