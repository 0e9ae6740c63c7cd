//! The envelope around every stored event: identity, position in its aggregate, time, who and
//! why, trace context and the hash chain link.

use serde::{Deserialize, Serialize};

use super::aggregate::Aggregate;
use super::event::Event;
use crate::ids::{CommandId, EventId, JobId};

/// One event as stored in the log (DESIGN §5).
///
/// The log's global sequence number is not in the envelope: it is the event's position in the
/// log (the sled key, the JetStream stream sequence) and is assigned on append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The event's id.
    pub event_id: EventId,
    /// The aggregate it belongs to.
    pub aggregate: Aggregate,
    /// Its version within the aggregate: 1 for the aggregate's first event.
    pub aggregate_version: u64,
    /// When the log recorded it (Unix milliseconds, from the orchestrator's clock).
    pub recorded_at: u64,
    /// Who caused it: a user (`user:alice`), a node (`node:kvm-01`), or `system:scheduler`.
    pub actor: String,
    /// The job it belongs to or was caused by, for correlating across aggregates.
    pub correlation: Option<JobId>,
    /// The event that caused it, if any.
    pub causation: Option<EventId>,
    /// The command that produced it, if any. With it the log's processed-command index can be
    /// rebuilt from the events alone.
    pub command: Option<CommandId>,
    /// W3C trace context of the span that produced it (`00-<trace>-<span>-<flags>`).
    pub traceparent: Option<String>,
    /// BLAKE3 hash of the previous event's stored bytes in its chain (all zeros for the first
    /// event). Editing or removing any stored event breaks every later link.
    pub prev_hash: [u8; 32],
    /// The event itself.
    pub payload: Event,
}
