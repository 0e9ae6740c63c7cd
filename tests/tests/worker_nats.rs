//! `cairn worker` end to end: the real binary against a real nats-server, with a raw-image VM
//! descriptor. The test plays the orchestrators' part on the bus: it answers `cairn.api.cmd`
//! (RegisterNode, ReportInventory), dispatches a Snapshot → Transfer → Commit sequence built
//! from the reported inventory through `NatsStepSink`, consumes the reports of the partition
//! and checks the repository holds the recovery point. Then browse goes through the worker,
//! and SIGTERM stops it cleanly.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cairn_orchestrator::bus::commands::WireReply;
use cairn_orchestrator::bus::{self, NatsOptions, NatsStepSink, ReportCallback, ReportConsumer};
use cairn_orchestrator::engine::ports::StepSink;
use cairn_orchestrator::views::Accepted;
use cairn_schemas::{
    BrowseRequest, Command as CairnCommand, Consistency, ConsistencyWanted, DiskSource, JobId,
    NodeId, RecoveryPointId, Report, ReportBody, StepId, StepResult, StepSpec, StepWork,
    VmInventory, codec,
};
use cairn_tests::nats::NatsServer;
use cairn_tests::*;
use futures::StreamExt;
use tokio::sync::mpsc;

const PARTITION: u16 = 5;
const DISK_MIB: u64 = 24;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The worker process; killed if the test ends early.
struct Worker {
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl Worker {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Receives the next report, failing after 60 s with the worker's log.
async fn next_report(reports: &mut mpsc::UnboundedReceiver<Report>, worker: &Worker) -> Report {
    match tokio::time::timeout(Duration::from_secs(60), reports.recv()).await {
        Ok(Some(report)) => report,
        _ => panic!("no report within 60 s; worker log:\n{}", worker.log()),
    }
}

/// Dispatches `spec` and waits for its final report; checks `Started` came first.
async fn run(
    sink: &NatsStepSink,
    reports: &mut mpsc::UnboundedReceiver<Report>,
    worker: &Worker,
    spec: StepSpec,
) -> StepResult {
    sink.dispatch(spec.clone());
    let mut started = false;
    loop {
        let report = next_report(reports, worker).await;
        assert_eq!(
            (report.step, report.attempt, report.job, report.epoch),
            (spec.step, spec.attempt, spec.job, spec.epoch),
            "a report of another step"
        );
        assert_eq!(report.node, spec.node);
        match report.body {
            ReportBody::Started => started = true,
            ReportBody::Progress { .. } => assert!(started, "progress before Started"),
            ReportBody::Succeeded { result } => {
                assert!(started, "Succeeded without Started");
                return result;
            }
            ReportBody::Failed { class, message } => panic!(
                "step {:?} failed ({class:?}): {message}\nworker log:\n{}",
                spec.kind(),
                worker.log()
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_runs_through_the_worker_over_nats() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let nats = NatsServer::start(root);
    let disk = root.join("alpha-boot.raw");
    random_file(&disk, DISK_MIB << 20, 7);
    let vms = root.join("vms");
    write_vm(
        &vms,
        "alpha",
        "0b6f7c2e-1d3a-4e5f-8a9b-0c1d2e3f4a5b",
        &[("boot", &disk)],
    );
    let repo = root.join("repo");
    cairn_ok(&["repo", "init", s(&repo)]);

    let client = bus::connect(&NatsOptions {
        url: nats.url(),
        name: "test-orchestrator".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let js = async_nats::jetstream::new(client.clone());
    bus::ensure_bus(&js, 1).await.unwrap();
    // The orchestrators' command endpoint: record and acknowledge.
    let mut commands = client
        .subscribe(cairn_schemas::subjects::ALL_NODE_COMMANDS)
        .await
        .unwrap();
    client.flush().await.unwrap();

    let log = root.join("worker.log");
    let child = Command::new(cairn_bin())
        .env("XDG_CONFIG_HOME", cairn_tests::config_home())
        .args([
            "worker",
            "--nats",
            &nats.url(),
            "--node",
            "kvm-01.lab",
            "--vms",
            s(&vms),
            "--cluster",
            "lab",
            "--parallel",
            "2",
            "--config",
            s(&worker_config(root, &repo)),
        ])
        .env("CAIRN_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("cairn worker starts");
    let worker = Worker {
        child: Some(child),
        log,
    };

    // Registration first, then the registered repositories, then the inventory.
    let mut inventory: Option<Vec<VmInventory>> = None;
    let mut registered = false;
    let mut repositories = false;
    while inventory.is_none() {
        let request = tokio::time::timeout(Duration::from_secs(60), commands.next())
            .await
            .unwrap_or_else(|_| panic!("no command within 60 s:\n{}", worker.log()))
            .unwrap();
        // On the node's own subject, so that nats-server can tie it to the node's identity.
        assert_eq!(request.subject.as_str(), "cairn.node.kvm-01%2Elab.cmd");
        let envelope = codec::decode_command(&request.payload).unwrap();
        assert_eq!(envelope.actor, "node:kvm-01.lab");
        match envelope.command {
            CairnCommand::RegisterNode {
                node,
                cluster,
                worker_version,
            } => {
                assert_eq!(node.as_str(), "kvm-01.lab");
                assert_eq!(cluster, "lab");
                assert!(!worker_version.is_empty());
                registered = true;
            }
            CairnCommand::RegisterRepositories { node, names, .. } => {
                assert!(registered, "repositories before registration");
                assert_eq!(node.as_str(), "kvm-01.lab");
                assert_eq!(names, ["default"]);
                repositories = true;
            }
            CairnCommand::ReportInventory { node, vms } => {
                assert!(registered, "inventory before registration");
                assert!(repositories, "inventory before the registered repositories");
                assert_eq!(node.as_str(), "kvm-01.lab");
                inventory = Some(vms);
            }
            other => panic!("unexpected command {other:?}"),
        }
        let accepted = WireReply::of(&Ok(Accepted {
            id: String::new(),
            seq: 1,
            replayed: false,
        }));
        client
            .publish(request.reply.unwrap(), accepted.encode().into())
            .await
            .unwrap();
    }
    let vms = inventory.unwrap();
    assert_eq!(vms.len(), 1, "{vms:?}");
    let vm = &vms[0];
    assert_eq!(vm.name, "alpha");
    assert_eq!(vm.disks.len(), 1);
    assert_eq!(vm.disks[0].size_bytes, DISK_MIB << 20);

    let (report_tx, mut reports) = mpsc::unbounded_channel();
    let callback: ReportCallback = Arc::new(move |report, _sender| {
        let _ = report_tx.send(report);
        Box::pin(async { true })
    });
    let _consumer = ReportConsumer::start(js.clone(), PARTITION, callback);
    let sink = NatsStepSink::new(client.clone());

    let node = NodeId::new("kvm-01.lab").unwrap();
    let job = JobId::new_v7(1_700_000_000_000, [1; 10]);
    let rp = RecoveryPointId::from_bytes(*job.as_bytes()).unwrap();
    let spec = |seed: u8, work: StepWork| StepSpec {
        step: StepId::new_v7(1_700_000_000_000, [seed; 10]),
        attempt: 1,
        job,
        partition: PARTITION,
        epoch: 1,
        node: node.clone(),
        vm: vm.vm,
        work,
    };
    let source = DiskSource::from(vm.disks[0].clone());
    let snapshot = run(
        &sink,
        &mut reports,
        &worker,
        spec(
            1,
            StepWork::Snapshot {
                vm_name: vm.name.clone(),
                disks: vec![source.clone()],
                consistency: ConsistencyWanted::CrashOnly,
            },
        ),
    )
    .await;
    let StepResult::Snapshot { snapshot, .. } = snapshot else {
        panic!("not a snapshot result: {snapshot:?}");
    };
    let transfer = run(
        &sink,
        &mut reports,
        &worker,
        spec(
            2,
            StepWork::Transfer {
                source: source.clone(),
                snapshot,
                repository: repo.display().to_string(),
                rp,
                parent_rp: None,
                change_tracking: None,
                chunk_size: 64 * 1024,
            },
        ),
    )
    .await;
    let StepResult::Transfer {
        bytes_read,
        incremental,
        ..
    } = transfer
    else {
        panic!("not a transfer result: {transfer:?}");
    };
    assert_eq!(bytes_read, DISK_MIB << 20);
    assert!(!incremental);
    let commit = run(
        &sink,
        &mut reports,
        &worker,
        spec(
            3,
            StepWork::CommitRecoveryPoint {
                repository: repo.display().to_string(),
                rp,
                disks: vec![source.disk.clone()],
                consistency: Consistency::Crash,
            },
        ),
    )
    .await;
    assert_eq!(commit, StepResult::CommitRecoveryPoint);

    let listed = cairn_json(&["repo", "list", s(&repo)]);
    let rps = listed["recovery_points"].as_array().unwrap();
    assert_eq!(rps.len(), 1, "{listed:#}");
    assert_eq!(rps[0]["rp"], rp.to_string());
    assert_eq!(rps[0]["disk_size"], DISK_MIB << 20);
    // The recovery point restores to the disk's bytes.
    let restored = root.join("restored.raw");
    let lineage = rps[0]["disk"].as_str().unwrap();
    cairn_ok(&[
        "repo",
        "restore",
        s(&repo),
        "--disk",
        lineage,
        "--to",
        s(&restored),
    ]);
    assert_eq!(fingerprint(&restored), fingerprint(&disk));

    // Browsing goes to the worker (a disk of random bytes holds no volume it can read, but
    // the answer comes from the worker, not from the bus).
    let answer = sink
        .browse(
            node.clone(),
            BrowseRequest {
                vm: vm.vm,
                rp,
                disk: source.disk.clone(),
                repository: repo.display().to_string(),
                path: "/".into(),
            },
        )
        .await;
    if let Err(message) = &answer {
        assert!(
            !message.contains("no worker of node") && !message.contains("did not answer"),
            "{message}"
        );
    }

    // SIGTERM: the worker stops and exits 0.
    let mut worker = worker;
    let mut child = worker.child.take().unwrap();
    // SAFETY: plain kill(2) on the child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let mut status = None;
    wait_until(Duration::from_secs(20), "the worker to exit", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "{}", worker.log());
}
