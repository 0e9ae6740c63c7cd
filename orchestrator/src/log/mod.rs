//! The event log: the only source of truth of the control plane (DESIGN §5).
//!
//! This module owns appending events with optimistic concurrency (an expected version per
//! aggregate), idempotent appends by command id, reading back in global order or per
//! aggregate, following new events ([`Tail`]), and the tamper-evident hash chain
//! ([`EventLog::verify_chain`]). It decides nothing about what the events mean: state
//! machines and projections live elsewhere and only see [`StoredEvent`]s.
//!
//! Contract shared by every implementation:
//!
//! - **Durable before acknowledged**: `append` returns `Ok` only once the events would survive
//!   a crash. Readers ([`EventLog::read_from`], [`EventLog::read_aggregate`], [`Tail`],
//!   [`EventLog::last_seq`]) see only durable events, so no effect is ever derived from an
//!   event that a crash could take back.
//! - **Global order**: events get increasing sequence numbers from 1 (consecutive in the sled
//!   log; `stream_seq * 1000 + index` in the JetStream log, so with gaps); an aggregate's
//!   events get consecutive versions from 1. `expected_version` 0 means "the aggregate has no
//!   events". The JetStream log refuses an append of more than 1000 events.
//! - **Idempotency**: an append carrying a [`CommandId`] that was already appended returns the
//!   events stored the first time and appends nothing, whatever the new request contains.
//! - **Hash chain**: each envelope's `prev_hash` is the link to the previous event's stored
//!   bytes: to the previous event in the log (sled: one chain per log), or to the previous
//!   event of the same aggregate (JetStream: one chain per aggregate, since several
//!   orchestrators append to one stream concurrently). With an audit key the link is the
//!   keyed BLAKE3 MAC ([`crate::audit::link_hash`]); a log opened with a key for the first time
//!   records durably the first event whose link is keyed ([`EventLog::keyed_from`]; the links
//!   before it stay plain BLAKE3), and refuses to open without the key from then on, so no
//!   unkeyed link is ever written or accepted after that point.
//! - **Running digest**: [`EventLog::extend_digest`] covers the stored bytes of every event in
//!   log order ([`crate::audit::RunningDigest`]), what signed checkpoints record.
//! - Time comes from the caller (`recorded_at`); the log reads no clock.
//!
//! If `append` fails with [`Error::Storage`] the outcome is unknown (the events may be stored
//! and become durable later): retry with the same command id.

pub(crate) mod jetstream;
mod sled;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use cairn_schemas::{
    Aggregate, AggregateKind, CodecError, CommandId, Envelope, Event, EventId, JobId,
};

use crate::audit::RunningDigest;

pub use self::jetstream::{JetStreamLog, JetStreamLogConfig};
pub use self::sled::{SledLog, SledLogConfig, SledLogStats};

/// An event to append, before the log gives it a place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The event's id (UUID v7, made by the caller from its clock and RNG).
    pub event_id: EventId,
    /// Who caused it (`user:alice`, `node:kvm-01`, `system:scheduler`).
    pub actor: String,
    /// The job it belongs to or was caused by.
    pub correlation: Option<JobId>,
    /// The event that caused it.
    pub causation: Option<EventId>,
    /// W3C trace context of the span that produced it.
    pub traceparent: Option<String>,
    /// The event.
    pub payload: Event,
}

impl NewEvent {
    /// An event with no correlation, causation or trace context.
    pub fn new(event_id: EventId, actor: impl Into<String>, payload: impl Into<Event>) -> Self {
        Self {
            event_id,
            actor: actor.into(),
            correlation: None,
            causation: None,
            traceparent: None,
            payload: payload.into(),
        }
    }
}

/// One append: events for one aggregate, all or nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRequest {
    /// The aggregate; every event's payload must belong to its kind.
    pub aggregate: Aggregate,
    /// The partition the aggregate's events are filed under (the JetStream log's subject
    /// `cairn.evt.<partition>.…`). It must be the same for every append to one aggregate; the
    /// engine derives it from ids ([`cairn_schemas::subjects`]). The sled log ignores it.
    pub partition: u16,
    /// The aggregate's version the caller decided on (0 = no events yet). Anything else
    /// fails with [`Error::Conflict`].
    pub expected_version: u64,
    /// The command that produced the events; a repeated id returns the first append's events.
    pub command: Option<CommandId>,
    /// The caller's clock, Unix milliseconds; becomes every envelope's `recorded_at`.
    pub recorded_at: u64,
    /// The events, at least one.
    pub events: Vec<NewEvent>,
}

/// An event as stored: its global sequence number and its envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Position in the log, from 1, increasing (without gaps in the sled log).
    pub seq: u64,
    /// The event with its metadata.
    pub envelope: Envelope,
}

/// Errors of the event log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The aggregate moved on since the caller read it: reload, decide again, retry.
    #[error("version conflict on {aggregate}: expected version {expected}, but it is at {actual}")]
    Conflict {
        /// The aggregate.
        aggregate: Aggregate,
        /// The version the caller expected.
        expected: u64,
        /// The aggregate's current version.
        actual: u64,
    },
    /// An append with no events.
    #[error("append to {aggregate} has no events")]
    NoEvents {
        /// The aggregate.
        aggregate: Aggregate,
    },
    /// An event whose payload belongs to another aggregate kind.
    #[error("append to {aggregate}: event {index} is a {payload_kind} event ({event_name})")]
    WrongAggregate {
        /// The aggregate.
        aggregate: Aggregate,
        /// Index of the offending event in the request.
        index: usize,
        /// The payload's aggregate kind.
        payload_kind: AggregateKind,
        /// The payload's variant name.
        event_name: &'static str,
    },
    /// A stored event does not decode.
    #[error("event {seq} in the log does not decode: {source}")]
    Decode {
        /// Its sequence number.
        seq: u64,
        /// Why.
        source: CodecError,
    },
    /// The hash chain is broken: the named event was changed or removed after it was stored.
    #[error("hash chain broken at event {seq}{}: {detail}", event_id.map(|id| format!(" ({id})")).unwrap_or_default())]
    ChainBroken {
        /// The first event found changed or missing.
        seq: u64,
        /// Its id, when its bytes still decode.
        event_id: Option<EventId>,
        /// What is wrong, in words.
        detail: String,
    },
    /// A read found the stored log damaged (an event missing or malformed).
    #[error(
        "event log is damaged at event {seq}: {detail} (run `cairn audit verify` for the first \
         damaged event)"
    )]
    Corrupt {
        /// The event at fault.
        seq: u64,
        /// What is wrong.
        detail: String,
    },
    /// The log's last event is damaged; the log refuses to open rather than guess.
    #[error(
        "event log {path} is damaged at its last event {seq}: {detail}; it was not opened \
         (nothing was changed): find the damage with `cairn audit verify`, then restore the log \
         from a backup"
    )]
    CorruptTail {
        /// Where the log is.
        path: String,
        /// The event at fault.
        seq: u64,
        /// What is wrong.
        detail: String,
    },
    /// The storage failed (IO error, full disk, a bug in the storage engine).
    #[error("event log storage failed while {context}: {source}")]
    Storage {
        /// What the log was doing.
        context: String,
        /// The storage engine's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The log's chain is keyed, but no audit key was given.
    #[error(
        "event log {path} is keyed with an audit key from event {keyed_from} on, but no audit \
         key was given (--audit-key FILE, or [audit] key_file); it was not opened"
    )]
    AuditKeyRequired {
        /// Where the log is.
        path: String,
        /// The first keyed link.
        keyed_from: u64,
    },
    /// An append with more events than one append may hold.
    #[error("append to {aggregate} has {count} events, at most {max} are allowed in one append")]
    TooManyEvents {
        /// The aggregate.
        aggregate: Aggregate,
        /// Events in the request.
        count: usize,
        /// The most one append may hold.
        max: usize,
    },
}

impl Error {
    /// Whether this is [`Error::Conflict`] (the caller should reload and decide again).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }
}

/// Checks what every implementation must reject before touching storage.
pub(crate) fn validate(request: &AppendRequest) -> Result<(), Error> {
    if request.events.is_empty() {
        return Err(Error::NoEvents {
            aggregate: request.aggregate.clone(),
        });
    }
    let kind = request.aggregate.kind();
    if let Some((index, event)) = request
        .events
        .iter()
        .enumerate()
        .find(|(_, event)| event.payload.aggregate_kind() != kind)
    {
        return Err(Error::WrongAggregate {
            aggregate: request.aggregate.clone(),
            index,
            payload_kind: event.payload.aggregate_kind(),
            event_name: event.payload.name(),
        });
    }
    Ok(())
}

/// An append-only, durable, hash-chained event log.
///
/// Implementations are cheap handles (`Clone` by `Arc`), shared by the tasks of one
/// orchestrator. Futures are `Send` so that callers can spawn them.
pub trait EventLog: Send + Sync {
    /// Appends events to one aggregate if it is at `expected_version`; returns them with their
    /// sequence numbers once they are durable. See the module docs for the contract.
    fn append(
        &self,
        request: AppendRequest,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, Error>> + Send;

    /// The events an earlier append carrying `command` stored, once durable; `None` if no
    /// append carried it. The index behind it outlives the log's own deduplication windows.
    fn processed(
        &self,
        command: CommandId,
    ) -> impl Future<Output = Result<Option<Vec<StoredEvent>>, Error>> + Send;

    /// Up to `limit` durable events with `seq >= from_seq`, in order.
    fn read_from(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, Error>> + Send;

    /// Every durable event of one aggregate, by version.
    fn read_aggregate(
        &self,
        aggregate: &Aggregate,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, Error>> + Send;

    /// Sequence number of the last durable event (0 when the log is empty).
    fn last_seq(&self) -> impl Future<Output = Result<u64, Error>> + Send;

    /// Follows the log: every durable event with `seq >= from_seq`, the old ones first, then
    /// new ones as they become durable.
    fn tail(&self, from_seq: u64) -> Tail;

    /// Walks the whole hash chain. `Ok(n_events)`, or [`Error::ChainBroken`] naming the first
    /// event whose bytes were changed (or that is missing).
    fn verify_chain(&self) -> impl Future<Output = Result<u64, Error>> + Send;

    /// The first event whose link is keyed with the audit key; `None` for an unkeyed log.
    fn keyed_from(&self) -> Option<u64>;

    /// `from` (the running digest up to event `from.seq`) extended over every durable event
    /// with `from.seq < seq <= to_seq`, in log order. It stops early at a missing event (its
    /// `seq` then says how far it got).
    fn extend_digest(
        &self,
        from: RunningDigest,
        to_seq: u64,
    ) -> impl Future<Output = Result<RunningDigest, Error>> + Send;
}

/// A boxed future of the next batch of a tail; `Ok(None)` once the log is closed.
type NextBatch<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Vec<StoredEvent>>, Error>> + Send + 'a>>;

/// Where a [`Tail`] gets its events from; one implementation per log.
pub(crate) trait TailSource: Send {
    /// Waits until at least one new event is durable and returns the next events in order.
    fn next_batch(&mut self) -> NextBatch<'_>;
}

/// A follower of the log, from [`EventLog::tail`]. Pull-based: it reads only when asked, so
/// a slow consumer never makes the log buffer or drop events.
pub struct Tail {
    source: Box<dyn TailSource>,
    buffered: VecDeque<StoredEvent>,
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail")
            .field("buffered", &self.buffered.len())
            .finish_non_exhaustive()
    }
}

impl Tail {
    pub(crate) fn new(source: Box<dyn TailSource>) -> Self {
        Self {
            source,
            buffered: VecDeque::new(),
        }
    }

    /// The next event, waiting for it if needed. `None` once the log is closed (every handle
    /// to it dropped). Cancel-safe: dropping the future loses no event.
    pub async fn next(&mut self) -> Option<Result<StoredEvent, Error>> {
        if self.buffered.is_empty() {
            match self.source.next_batch().await {
                Ok(Some(batch)) => self.buffered.extend(batch),
                Ok(None) => return None,
                Err(err) => return Some(Err(err)),
            }
        }
        self.buffered.pop_front().map(Ok)
    }
}
