//! Tests of the `qemu` adapter: its pure parts by tables, its steps against a real
//! `qemu-storage-daemon` as the VM, with writes through the daemon's writable NBD export as the
//! guest, and a scripted guest agent speaking QGA's JSON protocol.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use cairn_schemas::ids::{NodeId, StepId};
use cairn_schemas::v1::{ReportBody, StepWork};

use super::*;
use crate::agent::descriptor::{ReplicaState, write_descriptor};
use crate::agent::{AgentConfig, FaultDelays};
use crate::boundary::{Encryption, NodeSettings};
use crate::qmp::tests::Qsd;
use crate::repo::Repository;
use cairn_schemas::ids::RecoveryPointId;

const MIB: u64 = 1 << 20;

fn bm(name: &str, recording: bool) -> BitmapInfo {
    BitmapInfo {
        name: name.into(),
        recording,
        inconsistent: false,
        count: 0,
    }
}

const B1: &str = "cairn-01900000-0000-7000-8000-000000000001";
const B2: &str = "cairn-01900000-0000-7000-8000-000000000002";
const B3: &str = "cairn-01900000-0000-7000-8000-000000000003";

#[test]
fn folding_keeps_every_change_in_one_recording_bitmap() {
    // (bitmaps, expected target, expected action kinds)
    let cases: Vec<(Vec<BitmapInfo>, Option<&str>, Vec<&str>)> = vec![
        (vec![], None, vec![]),
        (vec![bm("user", true)], None, vec![]),
        (vec![bm(B1, true)], Some(B1), vec![]),
        // A failed backup: B1 frozen, B2 recording → B2 merged into B1, B1 enabled, B2 gone.
        (
            vec![bm(B2, true), bm(B1, false)],
            Some(B1),
            vec![
                "block-dirty-bitmap-merge",
                "block-dirty-bitmap-enable",
                "block-dirty-bitmap-remove",
            ],
        ),
        // Two failed backups in a row.
        (
            vec![bm(B1, false), bm(B2, false), bm(B3, true)],
            Some(B1),
            vec![
                "block-dirty-bitmap-merge",
                "block-dirty-bitmap-enable",
                "block-dirty-bitmap-remove",
                "block-dirty-bitmap-remove",
            ],
        ),
        // Two recording (should not happen): merged into the oldest.
        (
            vec![bm(B2, true), bm(B1, true)],
            Some(B1),
            vec!["block-dirty-bitmap-merge", "block-dirty-bitmap-remove"],
        ),
        // Inconsistent bitmaps are dropped.
        (
            vec![
                BitmapInfo {
                    inconsistent: true,
                    ..bm(B1, true)
                },
                bm(B2, true),
            ],
            Some(B2),
            vec!["block-dirty-bitmap-remove"],
        ),
    ];
    for (i, (bitmaps, target, kinds)) in cases.into_iter().enumerate() {
        let (actions, got) = fold_actions("disk0", &bitmaps);
        assert_eq!(got.as_deref(), target, "case {i}");
        let got_kinds: Vec<&str> = actions
            .iter()
            .map(|a| a["type"].as_str().unwrap())
            .collect();
        assert_eq!(got_kinds, kinds, "case {i}: {actions:?}");
    }
}

#[test]
fn handles_round_trip_and_bad_ones_are_refused() {
    let vm = VmId::new_v7(1_700_000_000_000, [3; 10]);
    let handle = LiveHandle {
        vm,
        bitmap: B2.into(),
        disks: vec![
            (DiskId::new("disk0").unwrap(), Some(B1.into()), 64 * MIB),
            (DiskId::new("disk1").unwrap(), None, 0),
        ],
    };
    assert_eq!(LiveHandle::parse(&handle.encode()).unwrap(), handle);
    for (text, wanted) in [
        ("image1;vm=x".to_string(), "not made by the qemu adapter"),
        (format!("qemu1;vm={vm}"), "no valid bitmap"),
        (format!("qemu1;vm={vm};bitmap=user"), "no valid bitmap"),
        (format!("qemu1;vm={vm};bitmap={B1}"), "no disks"),
        (format!("qemu1;vm={vm};bitmap={B1};d=-"), "lacks a size"),
        (
            format!("qemu1;vm={vm};bitmap={B1};d=evil,1"),
            "not a cairn bitmap",
        ),
        (format!("qemu1;vm={vm};bitmap={B1};d=-,x"), "size"),
        (format!("qemu1;vm={vm};bitmap={B1};d=-,1;d=-,1"), "twice"),
        (format!("qemu1;vm={vm};bitmap={B1};../x=-,1"), "DiskId"),
        ("qemu1;".repeat(5000), "longer than"),
    ] {
        let err = LiveHandle::parse(&text).unwrap_err().to_string();
        assert!(err.contains(wanted), "{text:.80}: {err}");
    }
}

#[test]
fn extents_combine_allocation_and_dirtiness() {
    let st = |offset, len, flags| nbd::StatusExtent { offset, len, flags };
    let alloc = [st(0, 100, 0), st(100, 100, STATE_ZERO | 1), st(200, 56, 0)];
    let dirty = [st(0, 50, 0), st(50, 100, STATE_DIRTY), st(150, 106, 0)];
    let got = combine_extents(&alloc, Some(&dirty), 0, 256);
    let want = vec![
        (0, 50, ExtentKind::Unchanged),
        (50, 50, ExtentKind::Data),
        (100, 50, ExtentKind::Zero),
        (150, 106, ExtentKind::Unchanged),
    ];
    let got: Vec<_> = got.iter().map(|e| (e.offset, e.len, e.kind)).collect();
    assert_eq!(got, want);
    let full = combine_extents(&alloc, None, 0, 256);
    let full: Vec<_> = full.iter().map(|e| (e.offset, e.len, e.kind)).collect();
    assert_eq!(
        full,
        vec![
            (0, 100, ExtentKind::Data),
            (100, 100, ExtentKind::Zero),
            (200, 56, ExtentKind::Data)
        ]
    );
    // A server that answers short: the rest counts as dirty data (read, never skipped).
    let short = combine_extents(&[st(0, 10, STATE_ZERO)], Some(&[]), 0, 20);
    let short: Vec<_> = short.iter().map(|e| (e.offset, e.len, e.kind)).collect();
    assert_eq!(
        short,
        vec![(0, 10, ExtentKind::Zero), (10, 10, ExtentKind::Data)]
    );
}

#[test]
fn fleece_space_is_size_times_churn_times_window() {
    let hour = Duration::from_secs(3600);
    assert_eq!(fleece_space_bytes(100 * MIB, 0.01, hour), MIB);
    assert_eq!(fleece_space_bytes(100 * MIB, 0.01, 2 * hour), 2 * MIB);
    assert_eq!(fleece_space_bytes(100 * MIB, 5.0, hour), 100 * MIB);
    assert_eq!(fleece_space_bytes(100 * MIB, f64::NAN, hour), 0);
    assert_eq!(fleece_space_bytes(100 * MIB, -1.0, hour), 0);
}

#[test]
fn node_lists_from_qemu_are_checked() {
    let good = json!([{"node-name": "d", "image": {"virtual-size": 5},
        "dirty-bitmaps": [{"name": B1, "recording": true, "count": 3}]}]);
    let info = parse_node_info(&good, "d").unwrap();
    assert_eq!(info.size, 5);
    assert_eq!(info.bitmaps[0].count, 3);
    for (answer, wanted) in [
        (json!({}), "not a list"),
        (json!([]), "no block node"),
        (json!([{"node-name": "d"}]), "no virtual size"),
        (
            json!([{"node-name": "d", "image": {"virtual-size": 1}, "dirty-bitmaps": 3}]),
            "bad bitmap list",
        ),
        (
            json!([{"node-name": "d", "image": {"virtual-size": 1}, "dirty-bitmaps": [{}]}]),
            "without a name",
        ),
    ] {
        let err = parse_node_info(&answer, "d").unwrap_err().to_string();
        assert!(err.contains(wanted), "{answer}: {err}");
    }
}

/// A scripted QEMU guest agent: answers `guest-sync`, records freeze/thaw, and refuses the
/// freeze when told to.
struct FakeGuestAgent {
    path: PathBuf,
    calls: Arc<Mutex<Vec<String>>>,
}

impl FakeGuestAgent {
    fn start(path: &Path, refuse_freeze: bool) -> FakeGuestAgent {
        let listener = UnixListener::bind(path).unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = calls.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut writer = stream.try_clone().unwrap();
                let reader = BufReader::new(stream);
                for line in reader.lines() {
                    let Ok(line) = line else { break };
                    let request: Value = serde_json::from_str(&line).unwrap();
                    let command = request["execute"].as_str().unwrap().to_owned();
                    let answer = match command.as_str() {
                        "guest-sync" => json!({"return": request["arguments"]["id"]}),
                        "guest-fsfreeze-freeze" if refuse_freeze => json!({"error":
                            {"class": "GenericError", "desc": "failed to freeze /: Device busy"}}),
                        "guest-fsfreeze-freeze" | "guest-fsfreeze-thaw" => json!({"return": 2}),
                        _ => json!({"error": {"class": "CommandNotFound", "desc": "no"}}),
                    };
                    if command != "guest-sync" {
                        log.lock().unwrap().push(command);
                    }
                    let mut text = answer.to_string();
                    text.push('\n');
                    if writer.write_all(text.as_bytes()).is_err() {
                        break;
                    }
                }
            }
        });
        FakeGuestAgent {
            path: path.to_path_buf(),
            calls,
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

/// A node with a repository and a live VM served by `qsd`.
struct Live {
    dir: tempfile::TempDir,
    agent: Agent,
    vm: VmInventory,
    n: std::cell::Cell<u64>,
}

fn descriptor_for(
    qsd: &Qsd,
    format: ImageFormat,
    qga: Option<&Path>,
    replica: Option<ReplicaState>,
) -> Descriptor {
    Descriptor {
        name: "live01".into(),
        uuid: uuid::Uuid::parse_str("0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d00").unwrap(),
        disks: vec![DescriptorDisk {
            id: DiskId::new("disk0").unwrap(),
            path: qsd.image.clone(),
            format: Some(format),
            node: Some("disk0".into()),
        }],
        power: PowerState::Running,
        qemu: Some(QemuVm {
            qmp: qsd.qmp_path(),
            nbd: Some(qsd.nbd_path()),
            guest_agent: qga.map(Path::to_path_buf),
            scratch: None,
            replica,
        }),
    }
}

impl Live {
    fn new(node: &str, descriptor: &Descriptor, repo_dir: Option<&Path>) -> Live {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        match repo_dir {
            Some(shared) => std::os::unix::fs::symlink(shared, &repo).unwrap(),
            None => {
                Repository::init(&repo, 64 * 1024, None).unwrap();
            }
        }
        let vms = dir.path().join("vms");
        std::fs::create_dir(&vms).unwrap();
        write_descriptor(&vms, descriptor).unwrap();
        let agent = Agent::new(AgentConfig {
            node: NodeId::new(node).unwrap(),
            vms_dir: vms,
            key_file: None,
            threads: 2,
            // The live images are in temp folders.
            settings: NodeSettings {
                image_roots: vec![std::env::temp_dir()],
                recovery_roots: vec![std::env::temp_dir()],
                ..NodeSettings::default()
            }
            .with_repository("default", &repo, Encryption::None),
        })
        .unwrap()
        .with_fault_delays(FaultDelays::default())
        .with_progress_interval(Duration::from_millis(10));
        let inventory = agent.inventory();
        assert!(inventory.problems.is_empty(), "{:?}", inventory.problems);
        let vm = inventory.vms[0].clone();
        assert_eq!(vm.power, PowerState::Running);
        Live {
            dir,
            agent,
            vm,
            n: std::cell::Cell::new(0),
        }
    }

    fn repository(&self) -> String {
        self.dir.path().join("repo").to_str().unwrap().to_owned()
    }

    fn spec(&self, job: JobId, work: StepWork) -> StepSpec {
        self.n.set(self.n.get() + 1);
        let n = self.n.get();
        StepSpec {
            step: StepId::new_v7(1_700_000_000_000 + n, [n as u8; 10]),
            attempt: 1,
            job,
            partition: 0,
            epoch: 1,
            node: self.agent.config().node.clone(),
            vm: self.vm.vm,
            work,
        }
    }

    fn run(&self, spec: &StepSpec, cancel: bool) -> ReportBody {
        let flag = AtomicBool::new(cancel);
        self.agent.execute(spec, &mut |_| {}, &flag)
    }

    fn snapshot(
        &self,
        job: JobId,
        wanted: ConsistencyWanted,
    ) -> Result<(String, Consistency, String), String> {
        let spec = self.spec(
            job,
            StepWork::Snapshot {
                vm_name: self.vm.name.clone(),
                disks: self
                    .vm
                    .disks
                    .iter()
                    .cloned()
                    .map(DiskSource::from)
                    .collect(),
                consistency: wanted,
            },
        );
        match self.run(&spec, false) {
            ReportBody::Succeeded {
                result:
                    StepResult::Snapshot {
                        snapshot,
                        consistency,
                        tracking,
                    },
            } => Ok((snapshot, consistency, tracking[0].bitmap.clone())),
            ReportBody::Failed { message, .. } => Err(message),
            other => panic!("{other:?}"),
        }
    }

    fn transfer(
        &self,
        job: JobId,
        snapshot: &str,
        parent: Option<RecoveryPointId>,
        tracking: Option<&str>,
        cancel: bool,
    ) -> Result<(u64, bool), String> {
        let spec = self.spec(
            job,
            StepWork::Transfer {
                source: self.vm.disks[0].clone().into(),
                snapshot: snapshot.into(),
                repository: self.repository(),
                rp: rp_of(job),
                parent_rp: parent,
                change_tracking: tracking.map(str::to_owned),
                chunk_size: 65536,
            },
        );
        match self.run(&spec, cancel) {
            ReportBody::Succeeded {
                result:
                    StepResult::Transfer {
                        bytes_read,
                        incremental,
                        ..
                    },
            } => Ok((bytes_read, incremental)),
            ReportBody::Failed { message, .. } => Err(message),
            other => panic!("{other:?}"),
        }
    }

    fn release(&self, job: JobId, snapshot: &str) {
        let spec = self.spec(
            job,
            StepWork::ReleaseSnapshot {
                snapshot: snapshot.into(),
            },
        );
        match self.run(&spec, false) {
            ReportBody::Succeeded { .. } => {}
            other => panic!("release: {other:?}"),
        }
    }

    /// Restores recovery point `rp` into a new raw file and returns it.
    fn restore(&self, job: JobId) -> PathBuf {
        let target = self
            .dir
            .path()
            .join(format!("restored-{}.raw", self.n.get() + 1));
        let spec = self.spec(
            job,
            StepWork::Restore {
                disk: DiskId::new("disk0").unwrap(),
                repository: self.repository(),
                rp: rp_of(job),
                target_path: target.to_str().unwrap().into(),
                target_format: ImageFormat::Raw,
            },
        );
        match self.run(&spec, false) {
            ReportBody::Succeeded { .. } => target,
            other => panic!("restore: {other:?}"),
        }
    }
}

fn job(n: u64) -> JobId {
    JobId::new_v7(1_700_000_000_000 + n * 60_000, [n as u8; 10])
}

fn rp_of(job: JobId) -> RecoveryPointId {
    RecoveryPointId::from_bytes(*job.as_bytes()).unwrap()
}

fn writes(pattern: u8, offsets_mib: &[u64]) -> Vec<String> {
    offsets_mib
        .iter()
        .map(|o| format!("write -P {pattern} {}M 64k", o))
        .collect()
}

fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len());
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{} and {} differ first at byte {i}",
            a.display(),
            b.display()
        );
    }
}

fn bitmaps(qsd: &Qsd) -> Vec<BitmapInfo> {
    runtime().unwrap().block_on(async {
        let mut qmp = Qmp::connect(&qsd.qmp_path(), QMP_TIMEOUT).await.unwrap();
        node_info(&mut qmp, "disk0").await.unwrap().bitmaps
    })
}

fn qmp_do(qsd: &Qsd, command: &str, args: Value) {
    runtime().unwrap().block_on(async {
        let mut qmp = Qmp::connect(&qsd.qmp_path(), QMP_TIMEOUT).await.unwrap();
        qmp.execute(command, Some(args)).await.unwrap();
    });
}

/// Full, then incremental while the guest keeps writing; a failed transfer loses nothing; a
/// bitmap deleted behind cairn's back gives an express full. Every restore is compared with
/// the guest's disk as it was at its snapshot.
fn live_cycle(format: &'static str, image_format: ImageFormat) {
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::new(dir.path(), format, 32 * MIB);
    let live = Live::new("n1", &descriptor_for(&qsd, image_format, None, None), None);
    qsd.guest_io(&writes(0x11, &[0, 5, 17, 30]));

    // 1. Full backup. The guest writes between snapshot and transfer: not in the backup.
    let at_snap1 = dir.path().join("snap1.raw");
    qsd.guest_copy(&at_snap1);
    let (h1, consistency, b1) = live
        .snapshot(job(1), ConsistencyWanted::ApplicationWithCrashFallback)
        .unwrap();
    assert_eq!(consistency, Consistency::Crash, "no guest agent");
    qsd.guest_io(&writes(0x22, &[0, 9]));
    let (read1, incremental1) = live.transfer(job(1), &h1, None, None, false).unwrap();
    assert!(!incremental1);
    assert!(
        (4 * 64 * 1024..32 * MIB).contains(&read1),
        "zeros skipped: read {read1}"
    );
    live.release(job(1), &h1);
    assert_same(&live.restore(job(1)), &at_snap1);
    assert_eq!(
        bitmaps(&qsd)
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>(),
        vec![b1.as_str()]
    );

    // 2. Incremental: reads only the dirty 64 KiB chunks, although the guest writes meanwhile.
    qsd.guest_io(&writes(0x33, &[12, 20]));
    let at_snap2 = dir.path().join("snap2.raw");
    qsd.guest_copy(&at_snap2);
    let (h2, _, b2) = live.snapshot(job(2), ConsistencyWanted::CrashOnly).unwrap();
    qsd.guest_io(&writes(0x44, &[12, 25]));
    let (read2, incremental2) = live
        .transfer(job(2), &h2, Some(rp_of(job(1))), Some(&b1), false)
        .unwrap();
    assert!(incremental2);
    // Dirty since snapshot 1: 0, 9 (after it), 12, 20 → four 64 KiB chunks.
    assert_eq!(read2, 4 * 64 * 1024, "only the dirty chunks are read");
    live.release(job(2), &h2);
    assert_same(&live.restore(job(2)), &at_snap2);

    // 3. A failed transfer (cancelled) loses no dirty block: the release folds the bitmaps.
    let (h3, _, b3) = live.snapshot(job(3), ConsistencyWanted::CrashOnly).unwrap();
    assert_ne!(b3, b2);
    let err = live
        .transfer(job(3), &h3, Some(rp_of(job(2))), Some(&b2), true)
        .unwrap_err();
    assert!(err.contains("cancelled"), "{err}");
    live.release(job(3), &h3);
    let after = bitmaps(&qsd);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].name, b2, "the parent's bitmap records again");
    assert!(after[0].recording);
    qsd.guest_io(&writes(0x55, &[3]));
    let at_snap4 = dir.path().join("snap4.raw");
    qsd.guest_copy(&at_snap4);
    let (h4, _, b4) = live.snapshot(job(4), ConsistencyWanted::CrashOnly).unwrap();
    let (read4, incremental4) = live
        .transfer(job(4), &h4, Some(rp_of(job(2))), Some(&b2), false)
        .unwrap();
    assert!(incremental4);
    // Dirty since snapshot 2: 12, 25 (during transfer 2), 3 → three chunks.
    assert_eq!(read4, 3 * 64 * 1024);
    live.release(job(4), &h4);
    assert_same(&live.restore(job(4)), &at_snap4);

    // 4. Bitmap deleted behind cairn's back: express full, restored image correct.
    qmp_do(
        &qsd,
        "block-dirty-bitmap-remove",
        json!({"node": "disk0", "name": b4}),
    );
    qsd.guest_io(&writes(0x66, &[7]));
    let at_snap5 = dir.path().join("snap5.raw");
    qsd.guest_copy(&at_snap5);
    let (h5, _, _) = live.snapshot(job(5), ConsistencyWanted::CrashOnly).unwrap();
    let (read5, incremental5) = live
        .transfer(job(5), &h5, Some(rp_of(job(4))), Some(&b4), false)
        .unwrap();
    assert!(!incremental5, "express full");
    assert!(read5 > 6 * 64 * 1024, "read everything allocated: {read5}");
    live.release(job(5), &h5);
    assert_same(&live.restore(job(5)), &at_snap5);
    // No leftovers in QEMU: no export, no job, no overlay node or file.
    runtime().unwrap().block_on(async {
        let mut qmp = Qmp::connect(&qsd.qmp_path(), QMP_TIMEOUT).await.unwrap();
        let exports = qmp.execute("query-block-exports", None).await.unwrap();
        assert_eq!(exports.as_array().unwrap().len(), 1, "{exports}");
        let jobs = qmp.execute("query-block-jobs", None).await.unwrap();
        assert_eq!(jobs, json!([]));
    });
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".cairn-fleece"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn live_qcow2_full_incremental_failed_and_lost_tracking() {
    live_cycle("qcow2", ImageFormat::Qcow2);
}

#[test]
fn live_raw_full_incremental_failed_and_lost_tracking() {
    live_cycle("raw", ImageFormat::Raw);
}

#[test]
fn guest_agent_freezes_and_always_thaws() {
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::new(dir.path(), "qcow2", 8 * MIB);
    let qga = FakeGuestAgent::start(&dir.path().join("qga.sock"), false);
    let live = Live::new(
        "n1",
        &descriptor_for(&qsd, ImageFormat::Qcow2, Some(&qga.path), None),
        None,
    );
    let (h, consistency, _) = live
        .snapshot(job(1), ConsistencyWanted::ApplicationWithCrashFallback)
        .unwrap();
    assert_eq!(consistency, Consistency::Application);
    assert_eq!(
        qga.calls(),
        vec!["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    );
    live.release(job(1), &h);
    // Crash-only groups do not involve the guest.
    let (h, consistency, _) = live.snapshot(job(2), ConsistencyWanted::CrashOnly).unwrap();
    assert_eq!(consistency, Consistency::Crash);
    assert_eq!(qga.calls().len(), 2);
    live.release(job(2), &h);

    // A guest that cannot freeze: crash-consistent, and thawed anyway.
    let refusing = FakeGuestAgent::start(&dir.path().join("qga2.sock"), true);
    let live2 = Live::new(
        "n1",
        &descriptor_for(&qsd, ImageFormat::Qcow2, Some(&refusing.path), None),
        None,
    );
    let (h, consistency, _) = live2
        .snapshot(job(3), ConsistencyWanted::ApplicationWithCrashFallback)
        .unwrap();
    assert_eq!(consistency, Consistency::Crash);
    assert_eq!(
        refusing.calls(),
        vec!["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    );
    live2.release(job(3), &h);

    // The snapshot transaction fails after the freeze (a raw image cannot store the persistent
    // bitmap a qcow2 descriptor asks for): the guest is thawed all the same, and nothing changed.
    let raw_dir = tempfile::tempdir().unwrap();
    let raw = Qsd::new(raw_dir.path(), "raw", 8 * MIB);
    let qga3 = FakeGuestAgent::start(&raw_dir.path().join("qga3.sock"), false);
    let live3 = Live::new(
        "n1",
        &descriptor_for(&raw, ImageFormat::Qcow2, Some(&qga3.path), None),
        None,
    );
    let err = live3
        .snapshot(job(4), ConsistencyWanted::ApplicationWithCrashFallback)
        .unwrap_err();
    assert!(err.contains("taking the point-in-time snapshot"), "{err}");
    assert_eq!(
        qga3.calls(),
        vec!["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    );
    assert!(bitmaps(&raw).is_empty());
}

#[test]
fn replicas_are_crash_consistent_and_refused_in_unsafe_states() {
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::new(dir.path(), "qcow2", 8 * MIB);
    let qga = FakeGuestAgent::start(&dir.path().join("qga.sock"), false);
    let normal = Live::new(
        "n1",
        &descriptor_for(
            &qsd,
            ImageFormat::Qcow2,
            Some(&qga.path),
            Some(ReplicaState::Normal),
        ),
        None,
    );
    let (h, consistency, _) = normal
        .snapshot(job(1), ConsistencyWanted::ApplicationWithCrashFallback)
        .unwrap();
    assert_eq!(
        consistency,
        Consistency::Crash,
        "replicas are crash-consistent only"
    );
    assert!(
        qga.calls().is_empty(),
        "a replica's guest is not asked to freeze"
    );
    normal.release(job(1), &h);
    for (state, wanted) in [
        (
            ReplicaState::Resynchronizing,
            "resynchronization is in progress",
        ),
        (
            ReplicaState::ResyncRequired,
            "resynchronization is required",
        ),
        (
            ReplicaState::InitialReplication,
            "initial replication is in progress",
        ),
        (
            ReplicaState::InitialReplicationPending,
            "initial replication is pending",
        ),
        (ReplicaState::ApplyingLogs, "logs are being applied"),
        (
            ReplicaState::ApplyLogsFailed,
            "applying replication logs failed",
        ),
        (ReplicaState::FailoverInProgress, "failover is in progress"),
        (
            ReplicaState::MigrationInProgress,
            "migration is in progress",
        ),
        (ReplicaState::Critical, "health is critical"),
    ] {
        let live = Live::new(
            "n1",
            &descriptor_for(&qsd, ImageFormat::Qcow2, None, Some(state)),
            None,
        );
        let err = live
            .snapshot(job(2), ConsistencyWanted::CrashOnly)
            .unwrap_err();
        assert!(
            err.contains("replica VM live01 cannot be backed up now") && err.contains(wanted),
            "{err}"
        );
    }
}

/// The VM moves from node A to node B on shared storage: QEMU on A stops (its persistent
/// bitmap is written into the qcow2), QEMU on B opens the same image, the descriptor moves.
/// The next backup runs on B and stays incremental.
#[test]
fn a_moved_vm_stays_incremental_when_its_bitmap_moved_with_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let qsd_a = Qsd::new(&dir.path().join("a").tap_mkdir(), "qcow2", 16 * MIB);
    let image = qsd_a.image.clone();
    let node_a = Live::new(
        "node-a",
        &descriptor_for(&qsd_a, ImageFormat::Qcow2, None, None),
        None,
    );
    qsd_a.guest_io(&writes(0x11, &[1, 2]));
    let (h1, _, b1) = node_a
        .snapshot(job(1), ConsistencyWanted::CrashOnly)
        .unwrap();
    node_a.transfer(job(1), &h1, None, None, false).unwrap();
    node_a.release(job(1), &h1);
    qsd_a.guest_io(&writes(0x22, &[4]));
    qsd_a.quit();

    let b_dir = dir.path().join("b").tap_mkdir();
    let qsd_b = Qsd::serve(&b_dir, &image, "qcow2");
    let node_b = Live::new(
        "node-b",
        &descriptor_for(&qsd_b, ImageFormat::Qcow2, None, None),
        Some(&node_a.dir.path().join("repo")),
    );
    assert_eq!(node_b.vm.vm, node_a.vm.vm, "the same VM id on both nodes");
    let at_snap2 = dir.path().join("snap2.raw");
    qsd_b.guest_copy(&at_snap2);
    let (h2, _, _) = node_b
        .snapshot(job(2), ConsistencyWanted::CrashOnly)
        .unwrap();
    let (read, incremental) = node_b
        .transfer(job(2), &h2, Some(rp_of(job(1))), Some(&b1), false)
        .unwrap();
    assert!(incremental, "the bitmap moved with the disk");
    assert_eq!(read, 64 * 1024);
    node_b.release(job(2), &h2);
    assert_same(&node_b.restore(job(2)), &at_snap2);
    // The old node no longer describes the VM: a late release there succeeds without touching it.
    let gone = Live {
        dir: tempfile::tempdir().unwrap(),
        agent: Agent::new(AgentConfig {
            node: NodeId::new("node-a").unwrap(),
            vms_dir: dir.path().join("empty"),
            key_file: None,
            threads: 1,
            settings: NodeSettings::default(),
        })
        .unwrap(),
        vm: node_a.vm.clone(),
        n: std::cell::Cell::new(100),
    };
    gone.release(job(2), &h2);
}

trait TapMkdir {
    fn tap_mkdir(self) -> PathBuf;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn descriptors_of_live_vms_are_validated() {
    let base =
        r#"{"name": "v", "uuid": "0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d00", "power": "running","#;
    for (rest, wanted) in [
        (
            r#""disks": [{"id": "d", "path": "/x", "format": "qcow2"}], "qemu": {"qmp": "/q.sock"}}"#,
            "must name its QEMU block node",
        ),
        (
            r#""disks": [{"id": "d", "path": "/x", "format": "qcow2", "node": "1bad"}], "qemu": {"qmp": "/q.sock"}}"#,
            "not a QEMU node name",
        ),
        (
            r#""disks": [{"id": "d", "path": "/x", "format": "qcow2", "node": "a-very-long-node-name-over-31-chars"}], "qemu": {"qmp": "/q.sock"}}"#,
            "not a QEMU node name",
        ),
        (
            r#""disks": [{"id": "d", "path": "/x", "node": "n"}], "qemu": {"qmp": "/q.sock"}}"#,
            "must give its format",
        ),
        (
            r#""disks": [{"id": "d", "path": "/x", "format": "raw", "node": "n"}], "qemu": {"qmp": "q.sock"}}"#,
            "qemu.qmp",
        ),
        (
            r#""disks": [{"id": "d", "path": "/x", "format": "raw", "node": "n"}], "qemu": {"qmp": "/q", "replica": "sleepy"}}"#,
            "unknown variant",
        ),
        (
            r#""disks": [{"id": "d", "path": "/x", "format": "raw", "node": "n"}], "qemu": {"qmp": "/q", "extra": 1}}"#,
            "unknown field",
        ),
        (
            r#""disks": [{"id": "d", "path": "/x", "format": "raw", "node": "n"}]}"#,
            "only meaningful for a VM with a qemu section",
        ),
        (
            r#""disks": [{"id": "d", "path": "/x", "format": "raw", "node": "n"}, {"id": "e", "path": "/y", "format": "raw", "node": "n"}], "qemu": {"qmp": "/q"}}"#,
            "used twice",
        ),
    ] {
        let text = format!("{base}{rest}");
        let err = Descriptor::parse(text.as_bytes()).unwrap_err().to_string();
        assert!(err.contains(wanted), "{rest}: {err}");
    }
    let long = format!("/{}", "s".repeat(120));
    let text = format!(
        r#"{base}"disks": [{{"id": "d", "path": "/x", "format": "raw", "node": "n"}}], "qemu": {{"qmp": "{long}"}}}}"#
    );
    let err = Descriptor::parse(text.as_bytes()).unwrap_err().to_string();
    assert!(err.contains("107 bytes"), "{err}");
    // A VM whose QMP socket does not answer is a descriptor problem, not a crash.
    let dir = tempfile::tempdir().unwrap();
    let d = Descriptor::parse(
        format!(
            r#"{base}"disks": [{{"id": "d", "path": "/x", "format": "raw", "node": "n"}}], "qemu": {{"qmp": "{}"}}}}"#,
            dir.path().join("none.sock").display()
        )
        .as_bytes(),
    )
    .unwrap();
    let err = d.probe().unwrap_err().to_string();
    assert!(err.contains("none.sock"), "{err}");
}
