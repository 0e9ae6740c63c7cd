//! The audit trail of the event log beyond its hash chain: the audit key that keys the chain,
//! the running digest, signed checkpoints, their folder sink, the writer task, and checking a
//! log against checkpoints.
//!
//! This module owns key files, checkpoint formats and the checkpoint policy. It does not know
//! how a log stores its events: it reads them only through [`crate::log::EventLog`]
//! (`last_seq`, `keyed_from`, `extend_digest`); the log uses [`chain::link_hash`] for its links.
//! Pure parts (`chain`, `checkpoint`, `trigger`) do no IO; `keys` and `sink` touch files;
//! `writer` and `verify` read the log.

pub mod chain;
pub mod checkpoint;
pub mod keys;
pub mod sink;
#[cfg(test)]
mod tests;
pub mod trigger;
pub mod verify;
pub mod writer;

pub use self::chain::{RunningDigest, link_hash};
pub use self::checkpoint::{Checkpoint, SignedCheckpoint, TrustedKey};
pub use self::keys::AuditKey;
pub use self::sink::FolderSink;
pub use self::trigger::CheckpointPolicy;
pub use self::writer::{Checkpointer, CheckpointerConfig};

/// Where a verifier finds checkpoints and whom it trusts.
#[derive(Debug, Clone)]
pub struct CheckpointTrust {
    pub sink: FolderSink,
    /// Public keys trusted besides (or instead of) the sink's `keys/`.
    pub extra_keys: Vec<TrustedKey>,
    /// Whether the keys listed in the sink are trusted.
    pub trust_sink_keys: bool,
}

impl CheckpointTrust {
    /// Checks `log` against the sink's checkpoints (blocking reads of the folder run on the
    /// blocking pool).
    pub async fn verify<L: crate::log::EventLog>(
        &self,
        log: &L,
    ) -> Result<crate::views::CheckpointReport, String> {
        let sink = self.sink.clone();
        let contents = tokio::task::spawn_blocking(move || sink.read())
            .await
            .map_err(|err| err.to_string())?
            .map_err(|err| err.to_string())?;
        verify::verify_checkpoints(
            log,
            &self.sink.dir().display().to_string(),
            contents,
            &self.extra_keys,
            self.trust_sink_keys,
        )
        .await
        .map_err(|err| err.to_string())
    }
}
