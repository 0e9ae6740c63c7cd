//! The checkpoint writer: one task per orchestrator that signs a checkpoint of the log every
//! N events or M minutes (when there were new events), and a last one at shutdown.
//!
//! It reads the log only through [`EventLog::last_seq`] and [`EventLog::extend_digest`], so it
//! never blocks appends; the decision is [`trigger::due`] (pure), the time comes from the
//! injected [`Clock`].

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;

use crate::clock::Clock;
use crate::log::EventLog;

use super::chain::RunningDigest;
use super::checkpoint::{Checkpoint, SignedCheckpoint};
use super::keys::key_id;
use super::sink::{self, FolderSink};
use super::trigger::{self, CheckpointPolicy, TriggerState};

/// Errors of the writer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sink(#[from] sink::Error),
    #[error("reading the event log for a checkpoint: {0}")]
    Log(#[from] crate::log::Error),
}

/// How the writer signs and where it writes.
#[derive(Debug, Clone)]
pub struct CheckpointerConfig {
    pub sink: FolderSink,
    pub signing_key: SigningKey,
    /// This orchestrator's name in checkpoints (and its key's file name in the sink).
    pub signer: String,
    pub policy: CheckpointPolicy,
    /// How often the trigger is looked at.
    pub poll: Duration,
}

/// The writer; `run` it on a task.
pub struct Checkpointer<L> {
    log: L,
    clock: Arc<dyn Clock>,
    config: CheckpointerConfig,
    key_id: String,
    state: TriggerState,
    /// The sequence number the last checkpoint covers.
    checkpointed_seq: u64,
    digest: RunningDigest,
}

impl<L: EventLog> Checkpointer<L> {
    /// Publishes the signer's public key in the sink and picks up after this signer's last
    /// checkpoint there, so a restart does not sign the same sequence again.
    pub fn new(log: L, clock: Arc<dyn Clock>, config: CheckpointerConfig) -> Result<Self, Error> {
        let public = config.signing_key.verifying_key();
        config.sink.publish_key(&config.signer, &public)?;
        let last_seq = config
            .sink
            .read()?
            .checkpoints
            .iter()
            .filter(|(_, c)| c.checkpoint.signer == config.signer)
            .map(|(_, c)| c.checkpoint.seq)
            .max()
            .unwrap_or(0);
        let state = TriggerState {
            last_events: 0,
            last_ms: clock.now_ms(),
        };
        Ok(Self {
            log,
            clock,
            key_id: key_id(&public),
            config,
            state,
            checkpointed_seq: last_seq,
            digest: RunningDigest::EMPTY,
        })
    }

    /// Writes a checkpoint if one is due (or, with `force`, if there is any new event).
    pub async fn step(&mut self, force: bool) -> Result<Option<SignedCheckpoint>, Error> {
        let log_seq = self.log.last_seq().await?;
        let now = self.clock.now_ms();
        if log_seq <= self.checkpointed_seq {
            return Ok(None);
        }
        if log_seq < self.digest.seq {
            // Only a log replaced under a running orchestrator moves back; start over.
            self.digest = RunningDigest::EMPTY;
        }
        if self.digest.seq < self.checkpointed_seq {
            // After a restart: new events count from this signer's last checkpoint.
            self.digest = self
                .log
                .extend_digest(self.digest, self.checkpointed_seq)
                .await?;
            self.state.last_events = self.digest.events;
        }
        if self.digest.seq < log_seq {
            self.digest = self.log.extend_digest(self.digest, log_seq).await?;
        }
        // Counted in events, not sequence numbers (which need not be consecutive).
        let due = force || trigger::due(&self.config.policy, &self.state, self.digest.events, now);
        if !due {
            return Ok(None);
        }
        let signed = Checkpoint {
            seq: self.digest.seq,
            digest: self.digest.digest,
            keyed_from: self.log.keyed_from(),
            time_ms: now,
            signer: self.config.signer.clone(),
            key_id: self.key_id.clone(),
        }
        .sign(&self.config.signing_key);
        let sink = self.config.sink.clone();
        let to_write = signed.clone();
        let written = tokio::task::spawn_blocking(move || sink.write(&to_write))
            .await
            .map_err(|err| sink::Error::Io {
                path: self.config.sink.dir().to_owned(),
                source: std::io::Error::other(err.to_string()),
            })??;
        self.checkpointed_seq = signed.checkpoint.seq;
        self.state = TriggerState {
            last_events: self.digest.events,
            last_ms: now,
        };
        if written {
            tracing::info!(seq = signed.checkpoint.seq, sink = %self.config.sink.dir().display(), "audit: signed a checkpoint");
        }
        Ok(Some(signed))
    }

    /// Runs until `shutdown` resolves, then signs a last checkpoint of what is new. A failure
    /// is logged and tried again at the next poll.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()> + Send) {
        let mut every = tokio::time::interval(self.config.poll);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = every.tick() => {
                    if let Err(err) = self.step(false).await {
                        tracing::error!(error = %err, "audit: could not write a checkpoint");
                    }
                }
            }
        }
        if let Err(err) = self.step(true).await {
            tracing::error!(error = %err, "audit: could not write the last checkpoint");
        }
    }
}
