//! The bus against a real `nats-server` (one per test, on a free loopback port): step routing,
//! progress acks past `ack_wait`, redelivery after a killed worker, reports acknowledged only
//! when the engine took them, epoch fencing, heartbeats and silence, browse, cancel, commands
//! sent before any orchestrator listens, and malformed messages.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use cairn_schemas::subjects::{report_subject, step_subject};
use cairn_schemas::{
    BrowseEntry, BrowseRequest, Command, DiskId, FailureClass, JobId, NodeId, RecoveryPointId,
    Report, ReportBody, StepId, StepResult, StepSpec, StepWork, VmId, codec,
};
use cairn_tests::nats::NatsServer;
use futures::StreamExt;

use super::*;
use crate::clock::{Clock, SystemClock};
use crate::engine::ports::StepSink;

struct Lab {
    _dir: tempfile::TempDir,
    server: NatsServer,
    client: async_nats::Client,
    js: jetstream::Context,
}

async fn lab() -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let client = connect(&NatsOptions {
        url: server.url(),
        name: "bus-test".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let js = jetstream::new(client.clone());
    ensure_bus(&js, 1).await.unwrap();
    // Idempotent: a second orchestrator starting does the same.
    ensure_bus(&js, 1).await.unwrap();
    Lab {
        _dir: dir,
        server,
        client,
        js,
    }
}

impl Lab {
    async fn new_client(&self) -> async_nats::Client {
        connect(&NatsOptions {
            url: self.server.url(),
            name: "bus-test-worker".into(),
            ..Default::default()
        })
        .await
        .unwrap()
    }

    /// A worker bus with short timers, on its own connection (as a worker process has).
    async fn worker(&self, node: &str, parallel: usize) -> WorkerBus {
        WorkerBus::connect_with(self.new_client().await, node_id(node), fast(parallel))
            .await
            .unwrap()
    }

    async fn stream_messages(&self, stream: &str) -> u64 {
        let mut stream = self.js.get_stream(stream).await.unwrap();
        stream.info().await.unwrap().state.messages
    }
}

fn fast(parallel: usize) -> WorkerBusConfig {
    WorkerBusConfig {
        ack_wait: Duration::from_secs(2),
        progress_every: Duration::from_millis(400),
        heartbeat_every: Duration::from_millis(200),
        pull_wait: Duration::from_millis(500),
        final_report_for: Duration::from_secs(5),
        ..WorkerBusConfig::new(parallel)
    }
}

fn node_id(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn spec(node: &str, partition: u16, epoch: u64, seed: u8) -> StepSpec {
    StepSpec {
        step: StepId::new_v7(1_000 + u64::from(seed), [seed; 10]),
        attempt: 1,
        job: JobId::new_v7(2_000, [seed; 10]),
        partition,
        epoch,
        node: node_id(node),
        vm: VmId::new_v7(3_000, [seed; 10]),
        work: StepWork::ReleaseSnapshot {
            snapshot: format!("snap-{seed}"),
        },
    }
}

async fn within<T>(seconds: u64, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(seconds), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {seconds} s"))
}

/// Polls `check` every 50 ms until it holds, for at most `seconds`.
async fn until(seconds: u64, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {seconds} s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A report consumer that records what it is given; `refuse_first` makes it refuse (not
/// acknowledge) that many reports first.
fn recording(
    js: &jetstream::Context,
    partition: u16,
    refuse_first: usize,
) -> (ReportConsumerHandle, Arc<Mutex<Vec<Report>>>) {
    let seen: Arc<Mutex<Vec<Report>>> = Arc::default();
    let record = seen.clone();
    let callback: ReportCallback = Arc::new(move |report, _sender| {
        let mut seen = record.lock().unwrap();
        seen.push(report);
        let take = seen.len() > refuse_first;
        Box::pin(async move { take })
    });
    let handle = ReportConsumer::start_with(
        js.clone(),
        partition,
        callback,
        ReportConsumerConfig {
            retry_delay: Duration::from_millis(200),
            // A report that a stopped consumer's last pull took comes back after ack_wait;
            // short here, so the consumer that takes over gets it within the tests' deadlines.
            ack_wait: Duration::from_secs(2),
            ..Default::default()
        },
    );
    (handle, seen)
}

#[tokio::test]
async fn connect_refuses_bad_options_with_clear_errors() {
    let err = connect(&NatsOptions {
        url: " , ".into(),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("no server given"), "{err}");
    let err = connect(&NatsOptions {
        url: "nats://127.0.0.1:4222,nats://[bad".into(),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("nats://[bad"), "{err}");
    let err = connect(&NatsOptions {
        url: "nats://127.0.0.1:4222".into(),
        creds: Some("/nonexistent/cairn.creds".into()),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("credentials file /nonexistent/cairn.creds"),
        "{err}"
    );
    let err = connect(&NatsOptions {
        url: "nats://127.0.0.1:4222".into(),
        tls_cert: Some("/etc/hostname".into()),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("without a TLS key"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let client = connect(&NatsOptions {
        url: server.url(),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = ensure_steps_stream(&jetstream::new(client), 6)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("1 to 5"), "{err}");
}

#[tokio::test]
async fn a_dispatched_step_reaches_its_node_only() {
    let lab = lab().await;
    let sink = NatsStepSink::new(lab.client.clone());
    let bus_a = lab.worker("kvm-a.lab", 2).await;
    let bus_b = lab.worker("kvm-b", 2).await;
    let for_a = spec("kvm-a.lab", 1, 1, 1);
    let for_b = spec("kvm-b", 1, 1, 2);
    sink.dispatch(for_a.clone());
    // The same attempt dispatched twice is one message (same message id).
    sink.dispatch(for_a.clone());
    sink.dispatch(for_b.clone());

    let (got_b, lease_b) = within(10, "node b's step", bus_b.next_step()).await;
    assert_eq!(got_b, for_b);
    let (got_a, lease_a) = within(10, "node a's step", bus_a.next_step()).await;
    assert_eq!(got_a, for_a);
    assert_eq!(lease_a.delivered(), 1);
    assert_eq!(bus_a.running_steps(), 1);
    lease_a.finish().await.unwrap();
    lease_b.finish().await.unwrap();
    assert_eq!(bus_a.running_steps(), 0);
    // Nothing else for either node: the duplicate was dropped by the stream.
    for bus in [&bus_a, &bus_b] {
        assert!(
            tokio::time::timeout(Duration::from_millis(1500), bus.next_step())
                .await
                .is_err(),
            "no second step for {}",
            bus.node()
        );
    }
    until(5, "the step queue to be empty", async || {
        lab.stream_messages(STEPS_STREAM).await == 0
    })
    .await;
}

#[tokio::test]
async fn a_lease_held_past_ack_wait_is_not_redelivered() {
    let lab = lab().await;
    let first = lab.worker("kvm-a", 1).await;
    let second = lab.worker("kvm-a", 1).await;
    let step = spec("kvm-a", 0, 1, 3);
    steps::publish_step(&lab.js, &step).await.unwrap();
    let (got, lease) = within(10, "the step", first.next_step()).await;
    assert_eq!(got, step);
    // Held for 2.5 × ack_wait (2 s) while the node's other worker pulls all the time.
    let stolen = tokio::time::timeout(Duration::from_secs(5), second.next_step()).await;
    assert!(stolen.is_err(), "the step was redelivered: {stolen:?}");
    lease.finish().await.unwrap();
    let mut consumer: jetstream::consumer::PullConsumer = lab
        .js
        .get_stream(STEPS_STREAM)
        .await
        .unwrap()
        .get_consumer(&worker::consumer_name(&node_id("kvm-a")))
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(lab.stream_messages(STEPS_STREAM).await, 0);
}

#[tokio::test]
async fn a_killed_workers_step_goes_to_the_nodes_next_worker() {
    let lab = lab().await;
    let step = spec("kvm-a", 0, 1, 4);
    steps::publish_step(&lab.js, &step).await.unwrap();
    let doomed = lab.worker("kvm-a", 1).await;
    let (got, lease) = within(10, "the step", doomed.next_step()).await;
    assert_eq!(got, step);
    // The worker dies mid-step: nothing is acknowledged, its progress acks stop.
    drop(lease);
    drop(doomed);
    let next = lab.worker("kvm-a", 1).await;
    let (again, lease) = within(10, "the redelivered step", next.next_step()).await;
    assert_eq!(again, step);
    assert_eq!(lease.delivered(), 2);
    lease.finish().await.unwrap();
    assert_eq!(lab.stream_messages(STEPS_STREAM).await, 0);
}

#[tokio::test]
async fn reports_reach_the_partition_consumer_and_come_back_when_refused() {
    let lab = lab().await;
    let bus = lab.worker("kvm-a", 1).await;
    let (consumer, seen) = recording(&lab.js, 3, 1);
    let (other, seen_other) = recording(&lab.js, 4, 0);
    let step = spec("kvm-a", 3, 1, 5);
    steps::publish_step(&lab.js, &step).await.unwrap();
    let (got, lease) = within(10, "the step", bus.next_step()).await;
    let started = got.report(ReportBody::Started);
    let done = got.report(ReportBody::Succeeded {
        result: StepResult::ReleaseSnapshot,
    });
    bus.report(&started, false).await.unwrap();
    bus.report(&done, true).await.unwrap();
    lease.finish().await.unwrap();
    // The first delivery of `Started` was refused, so it came back; then all acknowledged.
    until(10, "both reports taken", async || {
        let seen = seen.lock().unwrap();
        seen.iter().filter(|r| **r == done).count() == 1
            && seen.iter().filter(|r| **r == started).count() == 2
    })
    .await;
    until(5, "the report stream to be empty", async || {
        lab.stream_messages(REPORTS_STREAM).await == 0
    })
    .await;
    assert!(seen_other.lock().unwrap().is_empty());
    // A stopped consumer takes nothing more; a new one for the partition takes over.
    consumer.stop().await;
    other.stop().await;
    let later = got.report(ReportBody::Started);
    bus.report(&later, true).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seen.lock().unwrap().len(), 3);
    let (_again, seen_again) = recording(&lab.js, 3, 0);
    until(10, "the new consumer to take the report", async || {
        seen_again.lock().unwrap().as_slice() == [later.clone()]
    })
    .await;
}

#[tokio::test]
async fn a_step_of_a_deposed_owner_is_refused_with_a_retryable_report() {
    let lab = lab().await;
    let leases = lab
        .js
        .create_key_value(jetstream::kv::Config {
            bucket: LEASES_BUCKET.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let lease = LeaseValue {
        instance: "orch-b".into(),
        epoch: 10,
    };
    leases
        .put(lease_key(2), lease.encode().into())
        .await
        .unwrap();
    let (_consumer, seen) = recording(&lab.js, 2, 0);
    let bus = lab.worker("kvm-a", 1).await;
    let stale = spec("kvm-a", 2, 7, 6);
    let current = spec("kvm-a", 2, 10, 7);
    let unowned = spec("kvm-a", 5, 3, 8);
    for step in [&stale, &current, &unowned] {
        steps::publish_step(&lab.js, step).await.unwrap();
    }
    let (got, lease) = within(10, "the current owner's step", bus.next_step()).await;
    assert_eq!(got, current);
    lease.finish().await.unwrap();
    let (got, lease) = within(10, "the unowned partition's step", bus.next_step()).await;
    assert_eq!(got, unowned);
    lease.finish().await.unwrap();
    until(10, "the refusal report", async || {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    let refusal = seen.lock().unwrap()[0].clone();
    assert_eq!(refusal.step, stale.step);
    assert_eq!(refusal.epoch, 7);
    let ReportBody::Failed { class, message } = refusal.body else {
        panic!("not a failure: {refusal:?}");
    };
    assert_eq!(class, FailureClass::Retryable);
    assert_eq!(
        message,
        "dispatched by partition 2 owner epoch 7, the partition is now at epoch 10"
    );
    assert_eq!(lab.stream_messages(STEPS_STREAM).await, 0);
}

#[tokio::test]
async fn heartbeats_show_in_the_watcher_and_go_silent_when_the_worker_stops() {
    let lab = lab().await;
    let watcher = NodeWatcher::start(lab.js.clone(), Arc::new(SystemClock))
        .await
        .unwrap();
    let nodes = lab.js.get_key_value(NODES_BUCKET).await.unwrap();
    // Junk in the bucket is ignored.
    nodes.put("junk", "not a heartbeat".into()).await.unwrap();
    let bus = lab.worker("kvm-a.lab", 2).await;
    let step = spec("kvm-a.lab", 0, 1, 9);
    steps::publish_step(&lab.js, &step).await.unwrap();
    let (_got, lease) = within(10, "the step", bus.next_step()).await;
    until(10, "a heartbeat with the running step", async || {
        watcher
            .heartbeats()
            .get(&node_id("kvm-a.lab"))
            .is_some_and(|h| h.running_steps == 1 && h.worker_version == env!("CARGO_PKG_VERSION"))
    })
    .await;
    let now = || SystemClock.now_ms();
    assert!(watcher.silent_nodes(now(), 1_000).is_empty());
    assert_eq!(watcher.heartbeats().len(), 1, "{:?}", watcher.heartbeats());
    drop(lease);
    drop(bus);
    let stopped_at = now();
    until(10, "the node to go silent", async || {
        watcher
            .silent_nodes(now(), 1_000)
            .iter()
            .any(|(node, _)| node == &node_id("kvm-a.lab"))
    })
    .await;
    let silent = watcher.silent_nodes(now(), 1_000);
    assert!(
        silent[0].1 <= stopped_at + 500,
        "{silent:?} vs {stopped_at}"
    );
    // Still following: a new node shows up.
    let _other = lab.worker("kvm-b", 1).await;
    until(10, "the second node", async || {
        watcher.heartbeats().contains_key(&node_id("kvm-b"))
    })
    .await;
}

#[tokio::test]
async fn browse_requests_and_cancel_notices_reach_the_worker() {
    let lab = lab().await;
    let bus = lab.worker("kvm-a.lab", 1).await;
    let entry = BrowseEntry {
        name: "etc".into(),
        kind: "dir".into(),
        size: 0,
        mode: Some(0o755),
        mtime: Some(1),
        detail: None,
    };
    let listing = entry.clone();
    bus.serve_browse(move |request: BrowseRequest| {
        let listing = listing.clone();
        Box::pin(async move {
            if request.path == "/" {
                Ok(vec![listing])
            } else {
                Err(format!("no folder {}", request.path))
            }
        })
    })
    .await
    .unwrap();
    let cancelled: Arc<Mutex<Vec<JobId>>> = Arc::default();
    let record = cancelled.clone();
    bus.on_cancel(move |job| record.lock().unwrap().push(job))
        .await
        .unwrap();
    lab.client.flush().await.unwrap();

    let sink = NatsStepSink::new(lab.client.clone()).with_browse_timeout(Duration::from_secs(5));
    let mut request = BrowseRequest {
        vm: VmId::new_v7(1, [1; 10]),
        rp: RecoveryPointId::new_v7(2, [2; 10]),
        disk: DiskId::new("root").unwrap(),
        repository: "/srv/repo".into(),
        path: "/".into(),
    };
    let answer = sink.browse(node_id("kvm-a.lab"), request.clone()).await;
    assert_eq!(answer, Ok(vec![entry]));
    request.path = "/p9".into();
    let answer = sink.browse(node_id("kvm-a.lab"), request.clone()).await;
    assert_eq!(answer, Err("no folder /p9".into()));
    let answer = sink.browse(node_id("kvm-z"), request).await;
    assert_eq!(answer, Err("no worker of node kvm-z is connected".into()));
    // Bytes that are not a request get the reason back.
    let reply = lab
        .client
        .request(browse_subject(&node_id("kvm-a.lab")), "junk".into())
        .await
        .unwrap();
    let answer = codec::decode_browse_reply(&reply.payload).unwrap();
    assert!(
        answer
            .as_ref()
            .is_err_and(|e| e.starts_with("bad browse request")),
        "{answer:?}"
    );

    let job = JobId::new_v7(77, [7; 10]);
    lab.client
        .publish(CANCEL_SUBJECT, "no job id".into())
        .await
        .unwrap();
    sink.cancel(job);
    until(5, "the cancel notice", async || {
        !cancelled.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(cancelled.lock().unwrap().as_slice(), [job]);
}

#[tokio::test]
async fn a_command_waits_for_an_orchestrator_to_answer() {
    let lab = lab().await;
    let bus = lab.worker("kvm-a", 1).await;
    let client = lab.client.clone();
    let sent = tokio::spawn(async move {
        bus.send_command(
            Command::RegisterNode {
                node: node_id("kvm-a"),
                cluster: "lab".into(),
                worker_version: "0.1.0".into(),
            },
            Duration::from_secs(20),
        )
        .await
    });
    // No orchestrator yet: the worker keeps asking.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!sent.is_finished());
    let mut orchestrator = client
        .subscribe(cairn_schemas::subjects::ALL_NODE_COMMANDS)
        .await
        .unwrap();
    let request = within(10, "the command", orchestrator.next())
        .await
        .unwrap();
    let envelope = codec::decode_command(&request.payload).unwrap();
    assert_eq!(envelope.actor, "node:kvm-a");
    assert!(
        matches!(envelope.command, Command::RegisterNode { ref cluster, .. } if cluster == "lab")
    );
    client
        .publish(request.reply.unwrap(), "ok".into())
        .await
        .unwrap();
    let reply = within(10, "the reply", sent).await.unwrap().unwrap();
    assert_eq!(&reply[..], b"ok");
}

#[tokio::test]
async fn malformed_steps_and_reports_are_terminated_and_the_consumers_go_on() {
    let lab = lab().await;
    let (_consumer, seen) = recording(&lab.js, 1, 0);
    let bus = lab.worker("kvm-a", 1).await;
    let good = spec("kvm-a", 1, 1, 10);
    lab.js
        .publish(step_subject(&node_id("kvm-a")), "garbage".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut wrong_version = codec::encode_spec(&good);
    wrong_version[0] = 99;
    lab.js
        .publish(step_subject(&node_id("kvm-a")), wrong_version.into())
        .await
        .unwrap()
        .await
        .unwrap();
    steps::publish_step(&lab.js, &good).await.unwrap();
    let (got, lease) = within(10, "the good step", bus.next_step()).await;
    assert_eq!(got, good);
    lease.finish().await.unwrap();

    lab.js
        .publish(report_subject(1, &node_id("kvm-a")), vec![1, 200, 3].into())
        .await
        .unwrap()
        .await
        .unwrap();
    // A report whose partition is not its subject's is dropped too.
    let misfiled = spec("kvm-a", 6, 1, 11).report(ReportBody::Started);
    lab.js
        .publish(
            report_subject(1, &node_id("kvm-a")),
            codec::encode_report(&misfiled).into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let report = good.report(ReportBody::Started);
    bus.report(&report, true).await.unwrap();
    until(10, "the good report", async || {
        seen.lock().unwrap().as_slice() == [report.clone()]
    })
    .await;
    until(5, "both streams to be empty", async || {
        lab.stream_messages(STEPS_STREAM).await == 0
            && lab.stream_messages(REPORTS_STREAM).await == 0
    })
    .await;
}
