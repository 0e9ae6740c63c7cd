//! The partition owner's end of `CAIRN_REPORTS`: [`ReportConsumer`] pulls one partition's
//! reports from the durable consumer `reports-<p>` and hands each one to the engine through a
//! callback, in stream order, one at a time.
//!
//! A report is acknowledged only after the callback says its events are appended; otherwise
//! it is negatively acknowledged with a delay and comes back. Bytes that are not a report are
//! logged with their subject and terminated, so they never block the partition. Each report
//! goes to the engine with the node its subject names (`cairn.report.<p>.<node>`, which
//! nats-server lets only that node's identity publish); whether the report's own node and its
//! step agree with that sender, and whether it still matters (attempt, epoch), is the engine's
//! call.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::AckKind;
use cairn_schemas::subjects::{node_of_report_subject, partition_reports_filter};
use cairn_schemas::{NodeId, Report, codec};
use futures::StreamExt;
use tokio::sync::watch;

use super::{Error, REPORTS_STREAM, backoff};
use crate::control::BoxFuture;

/// What the engine does with a report and the node whose subject it came on; `true` once
/// its events are appended (the report is then acknowledged), `false` to get it again later.
pub type ReportCallback = Arc<dyn Fn(Report, NodeId) -> BoxFuture<'static, bool> + Send + Sync>;

/// Tuning of a report consumer.
#[derive(Debug, Clone)]
pub struct ReportConsumerConfig {
    /// How long the server waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Delay before a report the engine could not take comes back.
    pub retry_delay: Duration,
    /// Reports delivered but not yet acknowledged, at most.
    pub max_ack_pending: i64,
}

impl Default for ReportConsumerConfig {
    fn default() -> Self {
        ReportConsumerConfig {
            ack_wait: Duration::from_secs(30),
            retry_delay: Duration::from_secs(1),
            max_ack_pending: 256,
        }
    }
}

/// Reports requested per pull.
const PULL_BATCH: usize = 32;

/// The name of partition `p`'s durable report consumer.
pub fn consumer_name(partition: u16) -> String {
    format!("reports-{partition}")
}

/// Starts and stops report consumers.
#[derive(Debug)]
pub struct ReportConsumer;

/// A running report consumer; dropping it stops it at once, [`ReportConsumerHandle::stop`]
/// after the report in hand.
#[derive(Debug)]
pub struct ReportConsumerHandle {
    partition: u16,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ReportConsumerHandle {
    /// The partition it consumes.
    pub fn partition(&self) -> u16 {
        self.partition
    }

    /// Stops after the report being handled (if any); waits for the task to end.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ReportConsumerHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl ReportConsumer {
    /// Starts consuming partition `partition`'s reports (the stream must exist: see
    /// [`super::ensure_reports_stream`]; until it does, the task retries and logs).
    pub fn start(
        js: jetstream::Context,
        partition: u16,
        callback: ReportCallback,
    ) -> ReportConsumerHandle {
        Self::start_with(js, partition, callback, ReportConsumerConfig::default())
    }

    /// [`ReportConsumer::start`] with tuning.
    pub fn start_with(
        js: jetstream::Context,
        partition: u16,
        callback: ReportCallback,
        config: ReportConsumerConfig,
    ) -> ReportConsumerHandle {
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(consume(js, partition, callback, config, stop_rx));
        ReportConsumerHandle {
            partition,
            stop,
            task: Some(task),
        }
    }
}

async fn open(
    js: &jetstream::Context,
    partition: u16,
    config: &ReportConsumerConfig,
) -> Result<jetstream::consumer::PullConsumer, Error> {
    let name = consumer_name(partition);
    let setup = |what: &'static str, reason: String| Error::Setup {
        what,
        name: name.clone(),
        reason,
    };
    let stream = js
        .get_stream(REPORTS_STREAM)
        .await
        .map_err(|e| setup("stream of consumer", e.to_string()))?;
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: partition_reports_filter(partition),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            max_ack_pending: config.max_ack_pending,
            ..Default::default()
        })
        .await
        .map_err(|e| setup("consumer", e.to_string()))
}

async fn consume(
    js: jetstream::Context,
    partition: u16,
    callback: ReportCallback,
    config: ReportConsumerConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    while !*stop.borrow() {
        let messages = match open(&js, partition, &config).await {
            // Small pulls: a report's ack_wait runs from its delivery, so a big prefetch
            // behind a slow engine would time out and come back as duplicates.
            Ok(consumer) => consumer
                .stream()
                .max_messages_per_batch(PULL_BATCH)
                .messages()
                .await
                .map_err(|e| Error::Setup {
                    what: "pull of consumer",
                    name: consumer_name(partition),
                    reason: e.to_string(),
                }),
            Err(e) => Err(e),
        };
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(partition, error = %e, "report consumer not ready; retrying");
                let pause = backoff(failures, Duration::from_millis(250), Duration::from_secs(5));
                failures += 1;
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    () = tokio::time::sleep(pause) => continue,
                }
            }
        };
        let mut errors_in_row = 0u32;
        loop {
            let next = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    errors_in_row = 0;
                    failures = 0;
                    handle(partition, &callback, &config, message).await;
                }
                Some(Err(e)) => {
                    errors_in_row += 1;
                    tracing::warn!(partition, error = %e, "report pull error");
                    if errors_in_row >= 3 {
                        break;
                    }
                }
                None => break,
            }
        }
        // The pull ended or kept failing: open the consumer again.
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn handle(
    partition: u16,
    callback: &ReportCallback,
    config: &ReportConsumerConfig,
    message: jetstream::Message,
) {
    let subject = message.subject.to_string();
    let Some(sender) = node_of_report_subject(&subject) else {
        tracing::warn!(%subject, partition, "report on a subject that names no node; dropped");
        terminate(&message, &subject).await;
        return;
    };
    let report = match codec::decode_report(&message.payload) {
        Ok(report) if report.partition == partition => report,
        Ok(report) => {
            tracing::warn!(%subject, partition, report_partition = report.partition,
                step = %report.step, "report on another partition's subject; dropped");
            terminate(&message, &subject).await;
            return;
        }
        Err(e) => {
            tracing::warn!(%subject, bytes = message.payload.len(), error = %e,
                "undecodable report; dropped");
            terminate(&message, &subject).await;
            return;
        }
    };
    let step = report.step;
    if callback(report, sender).await {
        if let Err(e) = message.ack().await {
            // Not acknowledged: it comes back after ack_wait, and the engine ignores a
            // report it already has.
            tracing::warn!(%subject, %step, error = %e, "could not acknowledge a report");
        }
    } else if let Err(e) = message
        .ack_with(AckKind::Nak(Some(config.retry_delay)))
        .await
    {
        tracing::warn!(%subject, %step, error = %e, "could not return a report");
    }
}

async fn terminate(message: &jetstream::Message, subject: &str) {
    if let Err(e) = message.ack_with(AckKind::Term).await {
        tracing::warn!(%subject, error = %e, "could not terminate a bad message");
    }
}
