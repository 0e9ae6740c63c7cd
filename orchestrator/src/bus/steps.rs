//! The orchestrator's end of the step seam on NATS: [`NatsStepSink`] publishes dispatched
//! steps to their node's queue in `CAIRN_STEPS`, cancel notices on `cairn.cancel`, and asks a
//! node's worker to browse a recovery point (request/reply on `cairn.browse.<node>`).
//!
//! Publishing is retried with the same message id (`step-<step>-<attempt>`), so a retry after
//! a lost acknowledgement is deduplicated by the stream. A step that still cannot be published
//! is only logged: its `StepDispatched` event is durable, and the engine's heartbeat timeout
//! dispatches the step again. This module decides nothing about steps.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::message::PublishMessage;
use cairn_schemas::subjects::step_subject;
use cairn_schemas::{BrowseEntry, BrowseRequest, JobId, NodeId, StepSpec, codec};

use super::{CANCEL_SUBJECT, Error, backoff, browse_subject};
use crate::control::BoxFuture;
use crate::engine::ports::StepSink;

/// How long a step publish is retried before the step is left to the heartbeat timeout.
const PUBLISH_FOR: Duration = Duration::from_secs(20);
/// How long a browse request waits for the worker's answer.
const BROWSE_TIMEOUT: Duration = Duration::from_secs(30);

/// The message id of a step attempt: a republished attempt is deduplicated.
pub fn step_message_id(spec: &StepSpec) -> String {
    format!("step-{}-{}", spec.step, spec.attempt)
}

/// Publishes one step attempt to its node's queue and waits for the stream's ack.
pub async fn publish_step(js: &jetstream::Context, spec: &StepSpec) -> Result<(), Error> {
    let subject = step_subject(&spec.node);
    let fail = |reason: String| Error::Publish {
        subject: subject.clone(),
        reason,
    };
    let message = PublishMessage::build()
        .payload(codec::encode_spec(spec).into())
        .message_id(step_message_id(spec));
    js.send_publish(subject.clone(), message)
        .await
        .map_err(|e| fail(e.to_string()))?
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok(())
}

/// Publishes a step attempt, retrying with backoff for up to `retry_for`.
pub async fn publish_step_with_retries(
    js: &jetstream::Context,
    spec: &StepSpec,
    retry_for: Duration,
) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + retry_for;
    let mut attempt = 0;
    loop {
        match publish_step(js, spec).await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(e) => {
                tracing::debug!(step = %spec.step, attempt = spec.attempt, error = %e,
                    "step publish failed; retrying");
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

/// Steps, cancels and browse requests over NATS.
#[derive(Debug, Clone)]
pub struct NatsStepSink {
    client: async_nats::Client,
    js: jetstream::Context,
    runtime: tokio::runtime::Handle,
    publish_for: Duration,
    browse_timeout: Duration,
}

impl NatsStepSink {
    /// A sink on `client`. Must be called inside the tokio runtime that publishes.
    pub fn new(client: async_nats::Client) -> NatsStepSink {
        NatsStepSink {
            js: jetstream::new(client.clone()),
            client,
            runtime: tokio::runtime::Handle::current(),
            publish_for: PUBLISH_FOR,
            browse_timeout: BROWSE_TIMEOUT,
        }
    }

    /// Changes how long a browse request waits for the worker.
    pub fn with_browse_timeout(mut self, timeout: Duration) -> NatsStepSink {
        self.browse_timeout = timeout;
        self
    }
}

impl StepSink for NatsStepSink {
    fn dispatch(&self, spec: StepSpec) {
        let js = self.js.clone();
        let retry_for = self.publish_for;
        self.runtime.spawn(async move {
            if let Err(e) = publish_step_with_retries(&js, &spec, retry_for).await {
                tracing::error!(step = %spec.step, attempt = spec.attempt, job = %spec.job,
                    node = %spec.node, error = %e,
                    "could not dispatch the step; the heartbeat timeout will dispatch it again");
            }
        });
    }

    fn cancel(&self, job: JobId) {
        let client = self.client.clone();
        self.runtime.spawn(async move {
            let sent = client.publish(CANCEL_SUBJECT, job.to_string().into()).await;
            if let Err(e) = sent {
                tracing::warn!(%job, error = %e, "could not send the cancel notice");
            }
        });
    }

    fn browse(
        &self,
        node: NodeId,
        request: BrowseRequest,
    ) -> BoxFuture<'static, Result<Vec<BrowseEntry>, String>> {
        let client = self.client.clone();
        let timeout = self.browse_timeout;
        Box::pin(async move {
            let subject = browse_subject(&node);
            let request = async_nats::Request::new()
                .payload(codec::encode_browse_request(&request).into())
                .timeout(Some(timeout));
            let reply =
                client
                    .send_request(subject, request)
                    .await
                    .map_err(|e| match e.kind() {
                        async_nats::RequestErrorKind::NoResponders => {
                            format!("no worker of node {node} is connected")
                        }
                        async_nats::RequestErrorKind::TimedOut => format!(
                            "the worker of node {node} did not answer within {} s",
                            timeout.as_secs()
                        ),
                        _ => format!("asking the worker of node {node}: {e}"),
                    })?;
            codec::decode_browse_reply(&reply.payload)
                .map_err(|e| format!("the worker of node {node} answered badly: {e}"))?
        })
    }
}
