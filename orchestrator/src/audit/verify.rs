//! The log checked against signed checkpoints: which checkpoints are trusted, and the first
//! one the log no longer matches.
//!
//! A checkpoint is trusted when its signature verifies with a trusted key of its signer
//! ([`SignedCheckpoint::check`]); every other file is reported as rejected and ignored. The
//! trusted checkpoints are then taken in log order: the log's running digest is extended to
//! each one's sequence number and compared with what it signed, with the sequence where the
//! chain turns keyed. The first difference names the checkpoint; later ones are not looked
//! at (the digest carries the difference on).

use crate::control::ControlError;
use crate::log::{Error as LogError, EventLog};
use crate::views::{AuditReport, CheckpointMismatch, CheckpointReport, RejectedCheckpoint};

use super::chain::RunningDigest;
use super::checkpoint::{SignedCheckpoint, TrustedKey};
use super::keys::hex;
use super::sink::SinkContents;

/// Walks the log's (keyed) hash chain: the report names the first broken link's event.
pub async fn chain_report<L: EventLog>(log: &L) -> Result<AuditReport, ControlError> {
    let keyed_from = log.keyed_from();
    match log.verify_chain().await {
        Ok(n) => Ok(AuditReport {
            ok: true,
            events_checked: n,
            first_broken_seq: None,
            first_broken_event: None,
            detail: None,
            keyed_from,
            checkpoints: None,
        }),
        Err(LogError::ChainBroken {
            seq,
            event_id,
            detail,
        }) => Ok(AuditReport {
            ok: false,
            events_checked: seq.saturating_sub(1),
            first_broken_seq: Some(seq),
            first_broken_event: event_id.map(|e| e.to_string()),
            detail: Some(detail),
            keyed_from,
            checkpoints: None,
        }),
        Err(err) => Err(ControlError::Internal(err.to_string())),
    }
}

/// Checks `log` against the checkpoints of a sink, trusting the sink's keys and `extra`.
pub async fn verify_checkpoints<L: EventLog>(
    log: &L,
    sink_name: &str,
    contents: SinkContents,
    extra: &[TrustedKey],
    trust_sink_keys: bool,
) -> Result<CheckpointReport, LogError> {
    let mut trusted: Vec<TrustedKey> = extra.to_vec();
    if trust_sink_keys {
        trusted.extend(contents.keys.iter().cloned());
    }
    let mut rejected: Vec<RejectedCheckpoint> = contents
        .rejected
        .into_iter()
        .map(|r| RejectedCheckpoint {
            file: r.file,
            reason: r.reason,
        })
        .collect();
    let mut valid: Vec<(String, SignedCheckpoint)> = Vec::new();
    for (file, signed) in contents.checkpoints {
        match signed.check(&trusted) {
            Ok(()) => valid.push((file, signed)),
            Err(reason) => rejected.push(RejectedCheckpoint { file, reason }),
        }
    }
    valid.sort_by(|a, b| {
        (a.1.checkpoint.seq, &a.1.checkpoint.signer)
            .cmp(&(b.1.checkpoint.seq, &b.1.checkpoint.signer))
    });

    let last_seq = log.last_seq().await?;
    let keyed_from = log.keyed_from();
    let mut digest = RunningDigest::EMPTY;
    let mut matched = 0u64;
    let mut last_matched_seq = None;
    let mut first_mismatch = None;
    for (file, signed) in valid {
        let c = &signed.checkpoint;
        let mismatch = |detail: String| CheckpointMismatch {
            file: file.clone(),
            seq: c.seq,
            signer: c.signer.clone(),
            detail,
        };
        if c.seq > last_seq {
            first_mismatch = Some(mismatch(format!(
                "it covers the log up to event {}, but the log ends at event {last_seq}: events \
                 were removed",
                c.seq
            )));
            break;
        }
        if c.seq > digest.seq {
            digest = log.extend_digest(digest, c.seq).await?;
        }
        if digest.seq != c.seq {
            first_mismatch = Some(mismatch(format!(
                "the log has no event {} (the events before it end at {})",
                c.seq, digest.seq
            )));
            break;
        }
        if digest.digest != c.digest {
            first_mismatch = Some(mismatch(format!(
                "the log's digest up to event {} is {}, the checkpoint signed {}: an event up \
                 to {} was changed, added or removed since it was signed",
                c.seq,
                hex(&digest.digest),
                hex(&c.digest),
                c.seq
            )));
            break;
        }
        if keyed_from != c.keyed_from {
            first_mismatch = Some(mismatch(format!(
                "the log says its chain is keyed from {}, the checkpoint signed {}",
                describe(keyed_from),
                describe(c.keyed_from)
            )));
            break;
        }
        matched += 1;
        last_matched_seq = Some(c.seq);
    }
    Ok(CheckpointReport {
        sink: sink_name.to_owned(),
        ok: first_mismatch.is_none() && rejected.is_empty(),
        matched,
        last_matched_seq,
        first_mismatch,
        rejected,
    })
}

fn describe(keyed_from: Option<u64>) -> String {
    match keyed_from {
        Some(seq) => format!("event {seq}"),
        None => "nowhere (unkeyed)".into(),
    }
}
