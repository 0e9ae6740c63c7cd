//! The worker's end of the bus: [`WorkerBus`] takes this node's steps one at a time from its
//! durable consumer `worker-<node>` on `CAIRN_STEPS`, keeps each taken step's message alive
//! ([`StepLease`]: `+WPI` progress acks) until the step's final report is durable, publishes
//! reports to their partition's subject, fences steps dispatched by a deposed partition owner,
//! puts heartbeats into `CAIRN_NODES`, and serves cancel notices and browse requests.
//!
//! NATS only: how a step runs is the caller's (the `cairn worker` binary glues this to the
//! worker crate's agent); this module holds no state between steps beyond the leases in hand.
//! A worker that dies leaves its step unacknowledged, so the server gives it to the node's
//! next worker after `ack_wait`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::message::PublishMessage;
use cairn_schemas::subjects::{node_command_subject, report_subject, step_subject, subject_token};
use cairn_schemas::{
    BrowseEntry, BrowseRequest, Command, CommandEnvelope, CommandId, FailureClass, JobId, NodeId,
    Report, ReportBody, StepId, StepSpec, codec,
};
use futures::StreamExt;

use super::nodes::Heartbeat;
use super::{
    CANCEL_SUBJECT, Error, LEASES_BUCKET, LeaseValue, NODES_BUCKET, STEPS_STREAM, backoff,
    browse_subject, lease_key,
};
use crate::clock::{Clock, SystemClock};
use crate::control::BoxFuture;

/// Browse requests answered at the same time, at most (each reads the repository).
const MAX_CONCURRENT_BROWSES: usize = 4;

/// Tuning of a worker's bus; [`WorkerBusConfig::new`] has the production values.
#[derive(Clone)]
pub struct WorkerBusConfig {
    /// Steps this worker runs at once (the consumer's `max_ack_pending`).
    pub parallel: usize,
    /// How long the server waits for an ack (or progress) before giving the step to another
    /// worker of the node.
    pub ack_wait: Duration,
    /// How often a taken step's message is kept alive (`+WPI`); well inside `ack_wait`.
    pub progress_every: Duration,
    /// How often the heartbeat is put into `CAIRN_NODES`.
    pub heartbeat_every: Duration,
    /// How long one pull waits for a step before pulling again.
    pub pull_wait: Duration,
    /// How long a final report is retried before the step is handed back.
    pub final_report_for: Duration,
    /// The version written into heartbeats.
    pub worker_version: String,
    /// Where heartbeat times come from.
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for WorkerBusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBusConfig")
            .field("parallel", &self.parallel)
            .field("ack_wait", &self.ack_wait)
            .field("progress_every", &self.progress_every)
            .field("heartbeat_every", &self.heartbeat_every)
            .finish_non_exhaustive()
    }
}

impl WorkerBusConfig {
    /// Production values: ack_wait 30 s, progress every 10 s, heartbeat every 2 s.
    pub fn new(parallel: usize) -> WorkerBusConfig {
        WorkerBusConfig {
            parallel: parallel.max(1),
            ack_wait: Duration::from_secs(30),
            progress_every: Duration::from_secs(10),
            heartbeat_every: Duration::from_secs(2),
            pull_wait: Duration::from_secs(5),
            final_report_for: Duration::from_secs(60),
            worker_version: env!("CARGO_PKG_VERSION").into(),
            clock: Arc::new(SystemClock),
        }
    }
}

/// Report counters per taken step attempt: (delivery number, next report number).
type ReportSeqs = Arc<Mutex<HashMap<(StepId, u32), (u64, u64)>>>;

/// The name of a node's durable step consumer.
pub fn consumer_name(node: &NodeId) -> String {
    format!("worker-{}", subject_token(node.as_str()))
}

/// This node's connection to the bus. Dropping it stops its heartbeats and subscriptions.
pub struct WorkerBus {
    client: async_nats::Client,
    js: jetstream::Context,
    node: NodeId,
    config: WorkerBusConfig,
    consumer: jetstream::consumer::PullConsumer,
    leases: tokio::sync::Mutex<Option<jetstream::kv::Store>>,
    running: Arc<AtomicU32>,
    report_seqs: ReportSeqs,
    /// Heartbeat and subscription tasks; owned here, aborted on drop.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for WorkerBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBus")
            .field("node", &self.node)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Drop for WorkerBus {
    fn drop(&mut self) {
        for task in self.tasks.lock().expect("worker bus tasks").drain(..) {
            task.abort();
        }
    }
}

/// Waits (logging) until `get` finds what an orchestrator creates.
async fn wait_for<T, E: std::fmt::Display, F, Fut>(what: &str, mut get: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut waited = 0u32;
    loop {
        match get().await {
            Ok(found) => return found,
            Err(e) => {
                if waited.is_multiple_of(30) {
                    tracing::warn!(error = %e,
                        "waiting for {what} (an orchestrator creates it at start)");
                }
                waited += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

impl WorkerBus {
    /// Connects `node`'s worker with the production tuning; see [`WorkerBus::connect_with`].
    pub async fn connect(
        client: async_nats::Client,
        node: NodeId,
        parallel: usize,
    ) -> Result<WorkerBus, Error> {
        Self::connect_with(client, node, WorkerBusConfig::new(parallel)).await
    }

    /// Waits for the streams and the heartbeat bucket (an orchestrator creates them), creates
    /// or updates the node's durable step consumer and starts heartbeats.
    pub async fn connect_with(
        client: async_nats::Client,
        node: NodeId,
        config: WorkerBusConfig,
    ) -> Result<WorkerBus, Error> {
        let js = jetstream::new(client.clone());
        let stream = wait_for(&format!("stream {STEPS_STREAM}"), || {
            js.get_stream(STEPS_STREAM)
        })
        .await;
        let nodes = wait_for(&format!("KV bucket {NODES_BUCKET}"), || {
            js.get_key_value(NODES_BUCKET)
        })
        .await;
        let name = consumer_name(&node);
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: step_subject(&node),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait,
                max_ack_pending: config.parallel as i64,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Setup {
                what: "consumer",
                name,
                reason: e.to_string(),
            })?;
        let bus = WorkerBus {
            client,
            js,
            node,
            config,
            consumer,
            leases: tokio::sync::Mutex::new(None),
            running: Arc::default(),
            report_seqs: Arc::default(),
            tasks: Mutex::new(Vec::new()),
        };
        let heartbeat = tokio::spawn(heartbeats(
            nodes,
            bus.node.clone(),
            bus.config.clone(),
            bus.running.clone(),
        ));
        bus.own(heartbeat);
        Ok(bus)
    }

    fn own(&self, task: tokio::task::JoinHandle<()>) {
        self.tasks.lock().expect("worker bus tasks").push(task);
    }

    /// The node this bus serves.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// How many times the client has connected to a server (the first connect included);
    /// a change means it reconnected.
    pub fn connects(&self) -> u64 {
        self.client.statistics().connects.load(Ordering::Relaxed)
    }

    /// Steps taken and not yet finished or released.
    pub fn running_steps(&self) -> u32 {
        self.running.load(Ordering::Relaxed)
    }

    /// Waits for this node's next step and takes it. An undecodable spec is logged and
    /// terminated; a step dispatched by a deposed partition owner is refused (a retryable
    /// failure report naming both epochs) and not returned. Pull errors are logged and
    /// retried, so this returns only with a step; cancel it by dropping the future.
    pub async fn next_step(&self) -> (StepSpec, StepLease) {
        let mut failures = 0u32;
        loop {
            let batch = self
                .consumer
                .batch()
                .max_messages(1)
                .expires(self.config.pull_wait)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(node = %self.node, error = %e, "cannot pull steps; retrying");
                    tokio::time::sleep(backoff(
                        failures,
                        Duration::from_millis(250),
                        Duration::from_secs(5),
                    ))
                    .await;
                    failures += 1;
                    continue;
                }
            };
            while let Some(message) = batch.next().await {
                let message = match message {
                    Ok(message) => message,
                    Err(e) => {
                        tracing::warn!(node = %self.node, error = %e, "step pull error");
                        continue;
                    }
                };
                failures = 0;
                if let Some(taken) = self.take(message).await {
                    return taken;
                }
            }
        }
    }

    /// Turns one delivered message into a step to run, or deals with it.
    async fn take(&self, message: jetstream::Message) -> Option<(StepSpec, StepLease)> {
        let subject = message.subject.to_string();
        let spec = match codec::decode_spec(&message.payload) {
            Ok(spec) => spec,
            Err(e) => {
                tracing::warn!(%subject, bytes = message.payload.len(), error = %e,
                    "undecodable step spec; dropped");
                if let Err(e) = message.ack_with(AckKind::Term).await {
                    tracing::warn!(%subject, error = %e, "could not terminate a bad step");
                }
                return None;
            }
        };
        let delivered = message
            .info()
            .map_or(1, |info| info.delivered.max(1) as u64);
        let lease = StepLease::new(
            message,
            (spec.step, spec.attempt),
            delivered,
            self.config.progress_every,
            self.running.clone(),
            self.report_seqs.clone(),
        );
        match self.owner_epoch(spec.partition).await {
            Ok(Some(epoch)) if epoch > spec.epoch => {
                tracing::warn!(step = %spec.step, attempt = spec.attempt, partition = spec.partition,
                    spec_epoch = spec.epoch, owner_epoch = epoch,
                    "step dispatched by a deposed partition owner; refused");
                let report = Report {
                    step: spec.step,
                    attempt: spec.attempt,
                    job: spec.job,
                    partition: spec.partition,
                    epoch: spec.epoch,
                    node: self.node.clone(),
                    body: ReportBody::Failed {
                        class: FailureClass::Retryable,
                        message: format!(
                            "dispatched by partition {} owner epoch {}, the partition is now at epoch {epoch}",
                            spec.partition, spec.epoch
                        ),
                    },
                };
                match self.report(&report, true).await {
                    Ok(()) => {
                        if let Err(e) = lease.finish().await {
                            tracing::warn!(step = %spec.step, error = %e,
                                "could not acknowledge a refused step");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(step = %spec.step, error = %e,
                            "could not report a refused step; it comes back");
                        lease.release(Duration::from_secs(5)).await;
                    }
                }
                None
            }
            Ok(_) => Some((spec, lease)),
            Err(e) => {
                tracing::warn!(step = %spec.step, partition = spec.partition, error = %e,
                    "cannot read the partition's lease to fence the step; trying later");
                lease.release(Duration::from_secs(5)).await;
                None
            }
        }
    }

    /// The epoch of partition `partition`'s current owner; `None` when it has no owner (or
    /// leases are not in use).
    async fn owner_epoch(&self, partition: u16) -> Result<Option<u64>, Error> {
        let key = lease_key(partition);
        let kv_error = |reason: String| Error::Kv {
            bucket: LEASES_BUCKET,
            key: key.clone(),
            reason,
        };
        let mut leases = self.leases.lock().await;
        if leases.is_none() {
            match self.js.get_key_value(LEASES_BUCKET).await {
                Ok(store) => *leases = Some(store),
                Err(e) => {
                    // No lease bucket: no partition has an owner that could fence.
                    tracing::debug!(error = %e, "no {LEASES_BUCKET} bucket; steps are not fenced");
                    return Ok(None);
                }
            }
        }
        let store = leases.as_ref().expect("set above");
        let entry = store
            .entry(key.clone())
            .await
            .map_err(|e| kv_error(e.to_string()))?;
        let Some(entry) = entry else {
            return Ok(None);
        };
        if entry.operation != jetstream::kv::Operation::Put {
            return Ok(None);
        }
        let value = LeaseValue::decode(&entry.value)?;
        Ok(Some(value.epoch))
    }

    /// Publishes a report to its partition's subject with message id
    /// `rep-<step>-<attempt>-<delivery>.<n>` (`n` counts the reports of this delivery of the
    /// step, so a rerun after a crash never collides with the first run's ids). A final
    /// report is retried until the stream acknowledges it or `final_report_for` passes; a
    /// progress report is tried once.
    pub async fn report(&self, report: &Report, final_report: bool) -> Result<(), Error> {
        let msg_id = {
            let mut seqs = self.report_seqs.lock().expect("report counters");
            let entry = seqs.entry((report.step, report.attempt)).or_insert((0, 0));
            let n = entry.1;
            entry.1 += 1;
            format!("rep-{}-{}-{}.{n}", report.step, report.attempt, entry.0)
        };
        let subject = report_subject(report.partition, &self.node);
        let payload: bytes::Bytes = codec::encode_report(report).into();
        let deadline = tokio::time::Instant::now() + self.config.final_report_for;
        let mut attempt = 0u32;
        loop {
            let message = PublishMessage::build()
                .payload(payload.clone())
                .message_id(&msg_id);
            let sent = match self.js.send_publish(subject.clone(), message).await {
                Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match sent {
                Ok(()) => return Ok(()),
                Err(reason) if !final_report || tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Publish { subject, reason });
                }
                Err(reason) => {
                    tracing::debug!(%subject, %reason, "final report not acknowledged; retrying");
                    tokio::time::sleep(backoff(
                        attempt,
                        Duration::from_millis(100),
                        Duration::from_secs(2),
                    ))
                    .await;
                    attempt += 1;
                }
            }
        }
    }

    /// Calls `on_cancel` with the job of every cancel notice (`cairn.cancel`); malformed
    /// notices are logged and ignored.
    pub async fn on_cancel(
        &self,
        on_cancel: impl Fn(JobId) + Send + Sync + 'static,
    ) -> Result<(), Error> {
        let mut subscription =
            self.client
                .subscribe(CANCEL_SUBJECT)
                .await
                .map_err(|e| Error::Subscribe {
                    subject: CANCEL_SUBJECT.into(),
                    reason: e.to_string(),
                })?;
        self.flush_subscription(CANCEL_SUBJECT).await?;
        let task = tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                match std::str::from_utf8(&message.payload)
                    .ok()
                    .and_then(|text| text.trim().parse::<JobId>().ok())
                {
                    Some(job) => on_cancel(job),
                    None => tracing::warn!(subject = CANCEL_SUBJECT,
                        payload = %String::from_utf8_lossy(&message.payload[..message.payload.len().min(80)]),
                        "cancel notice without a job id; ignored"),
                }
            }
        });
        self.own(task);
        Ok(())
    }

    /// Answers this node's browse requests (`cairn.browse.<node>`) with `browse`; a request
    /// that does not decode is answered with the reason.
    pub async fn serve_browse(
        &self,
        browse: impl Fn(BrowseRequest) -> BoxFuture<'static, Result<Vec<BrowseEntry>, String>>
        + Send
        + Sync
        + 'static,
    ) -> Result<(), Error> {
        let subject = browse_subject(&self.node);
        let mut subscription =
            self.client
                .subscribe(subject.clone())
                .await
                .map_err(|e| Error::Subscribe {
                    subject: subject.clone(),
                    reason: e.to_string(),
                })?;
        self.flush_subscription(&subject).await?;
        let client = self.client.clone();
        let browse = Arc::new(browse);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_BROWSES));
        let task = tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                let Some(reply_to) = message.reply.clone() else {
                    tracing::warn!(%subject, "browse request without a reply subject; ignored");
                    continue;
                };
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let client = client.clone();
                let browse = browse.clone();
                let subject = subject.clone();
                tokio::spawn(async move {
                    let answer = match codec::decode_browse_request(&message.payload) {
                        Ok(request) => browse(request).await,
                        Err(e) => {
                            tracing::warn!(%subject, error = %e, "undecodable browse request");
                            Err(format!("bad browse request: {e}"))
                        }
                    };
                    let payload = codec::encode_browse_reply(&answer);
                    if let Err(e) = client.publish(reply_to, payload.into()).await {
                        tracing::warn!(%subject, error = %e, "could not answer a browse request");
                    }
                    drop(slot);
                });
            }
        });
        self.own(task);
        Ok(())
    }

    /// Makes sure the server has processed a new subscription before it is relied on: the
    /// server handles a connection's messages in order, so a message to a probe subscription
    /// made after it coming back proves it. (`flush` only empties the client's buffer.)
    async fn flush_subscription(&self, subject: &str) -> Result<(), Error> {
        let fail = |reason: String| Error::Subscribe {
            subject: subject.into(),
            reason,
        };
        let inbox = self.client.new_inbox();
        let mut probe = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| fail(e.to_string()))?;
        self.client
            .publish(inbox, bytes::Bytes::new())
            .await
            .map_err(|e| fail(e.to_string()))?;
        match tokio::time::timeout(Duration::from_secs(10), probe.next()).await {
            Ok(Some(_)) => Ok(()),
            _ => Err(fail("the server did not confirm it within 10 s".into())),
        }
    }

    /// Sends a command about this node to the orchestrators (`cairn.node.<node>.cmd`, which
    /// they record as the node's own: `node:<name>`), retrying
    /// while no orchestrator answers, for up to `give_up_after`. Returns the reply's bytes
    /// (the orchestrator's encoding of the outcome).
    pub async fn send_command(
        &self,
        command: Command,
        give_up_after: Duration,
    ) -> Result<bytes::Bytes, Error> {
        let envelope = CommandEnvelope {
            id: CommandId::new_v7(self.config.clock.now_ms(), crate::clock::random10()),
            actor: format!("node:{}", self.node),
            traceparent: None,
            command,
        };
        let payload: bytes::Bytes = codec::encode_command(&envelope).into();
        let deadline = tokio::time::Instant::now() + give_up_after;
        let subject = node_command_subject(&self.node);
        let mut attempt = 0u32;
        loop {
            match self.client.request(subject.clone(), payload.clone()).await {
                Ok(reply) => return Ok(reply.payload),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Request {
                        subject,
                        reason: e.to_string(),
                    });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "command not answered; retrying");
                    tokio::time::sleep(backoff(
                        attempt,
                        Duration::from_millis(250),
                        Duration::from_secs(3),
                    ))
                    .await;
                    attempt += 1;
                }
            }
        }
    }
}

async fn heartbeats(
    nodes: jetstream::kv::Store,
    node: NodeId,
    config: WorkerBusConfig,
    running: Arc<AtomicU32>,
) {
    let key = Heartbeat::key(&node);
    let mut every = tokio::time::interval(config.heartbeat_every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        every.tick().await;
        let heartbeat = Heartbeat {
            node: node.clone(),
            at_ms: config.clock.now_ms(),
            worker_version: config.worker_version.clone(),
            running_steps: running.load(Ordering::Relaxed),
        };
        match nodes.put(&key, heartbeat.encode().into()).await {
            Ok(_) if failing => {
                tracing::info!(%node, "heartbeats are written again");
                failing = false;
            }
            Ok(_) => {}
            Err(e) if !failing => {
                tracing::warn!(%node, error = %e, "cannot write the heartbeat");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// A taken step: its message is kept alive with progress acks until [`StepLease::finish`]
/// (after the final report is durable) or [`StepLease::release`]. Dropping a lease without
/// either stops the progress acks, so the server redelivers the step after `ack_wait` (as
/// when the worker dies).
pub struct StepLease {
    message: jetstream::Message,
    key: (StepId, u32),
    delivered: u64,
    progress: tokio::task::JoinHandle<()>,
    running: Arc<AtomicU32>,
    report_seqs: ReportSeqs,
}

impl std::fmt::Debug for StepLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepLease")
            .field("step", &self.key.0)
            .field("attempt", &self.key.1)
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

impl StepLease {
    fn new(
        message: jetstream::Message,
        key: (StepId, u32),
        delivered: u64,
        progress_every: Duration,
        running: Arc<AtomicU32>,
        report_seqs: ReportSeqs,
    ) -> StepLease {
        running.fetch_add(1, Ordering::Relaxed);
        report_seqs
            .lock()
            .expect("report counters")
            .insert(key, (delivered, 0));
        let keep_alive = message.clone();
        let progress = tokio::spawn(async move {
            let mut every = tokio::time::interval(progress_every);
            every.tick().await;
            loop {
                every.tick().await;
                if let Err(e) = keep_alive.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %e, "progress ack failed");
                }
            }
        });
        StepLease {
            message,
            key,
            delivered,
            progress,
            running,
            report_seqs,
        }
    }

    /// How many times the server has delivered this step message (1 = first time).
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The step is done and its final report durable: acknowledge the message (confirmed by
    /// the server; retried a few times).
    pub async fn finish(self) -> Result<(), Error> {
        self.progress.abort();
        let mut last = String::new();
        for attempt in 0..3 {
            match self.message.double_ack().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = e.to_string();
                    tokio::time::sleep(backoff(
                        attempt,
                        Duration::from_millis(200),
                        Duration::from_secs(1),
                    ))
                    .await;
                }
            }
        }
        Err(Error::Ack {
            what: format!("step {} attempt {}", self.key.0, self.key.1),
            reason: last,
        })
    }

    /// Hands the step back: the server delivers it again after `delay`.
    pub async fn release(self, delay: Duration) {
        self.progress.abort();
        if let Err(e) = self.message.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::warn!(step = %self.key.0, error = %e,
                "could not hand a step back; it comes back after ack_wait");
        }
    }
}

impl Drop for StepLease {
    fn drop(&mut self) {
        self.progress.abort();
        self.running.fetch_sub(1, Ordering::Relaxed);
        self.report_seqs
            .lock()
            .expect("report counters")
            .remove(&self.key);
    }
}
