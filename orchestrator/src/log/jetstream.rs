//! The event log on NATS JetStream, for the distributed orchestrator: several orchestrators
//! share one log, each appending to the aggregates of the partitions it owns.
//!
//! This module owns the layout of the events in JetStream and the append protocol. It must not
//! decide anything about partitions or ownership (the engine does) and it talks to NATS only
//! through the `async_nats` client it is given.
//!
//! **Layout.** Stream `CAIRN_EVENTS` (subjects `cairn.evt.>`, file storage, `allow_direct`,
//! duplicate window 2 min, replicas from the config). One JetStream message ("record") per
//! append, on the aggregate's subject `cairn.evt.<partition>.<kind>.<id>`, holding all the
//! append's encoded envelopes, so an append is all or nothing. Record format: see
//! [`record`] (a version byte, then postcard; the hash chain covers the envelope bytes).
//! Event sequence numbers are `stream_seq * 1000 + index in the record` (an append holds at
//! most 1000 events): increasing, not consecutive.
//!
//! **Appends.** Optimistic concurrency per aggregate: the publish carries
//! `Nats-Expected-Last-Subject-Sequence` = the stream sequence of the aggregate's last record
//! (0 = none), checked by the server against every partition's subject of the aggregate
//! (`Nats-Expected-Last-Subject-Sequence-Subject: cairn.evt.*.<kind>.<id>`). The log caches
//! per aggregate (version, last record's stream sequence, hash of the last event); on a miss,
//! on a version mismatch or on `wrong last sequence` it reads the aggregate's last record from
//! the stream leader to learn the truth, and answers [`Error::Conflict`] if the version moved.
//! `Nats-Msg-Id` is the command id, or the first event's id: a publish is retried with the same
//! id and the same expected sequence on timeouts and "no responders" (leader elections, server
//! restarts) for up to `retry_for`. The server checks the expected sequence before the msg id,
//! so a retry whose first attempt was stored meets `wrong last sequence`: the log then reads the
//! record that follows the expected one (only one publish could be stored there) and, if it
//! carries the append's msg id, succeeds with it. A `duplicate` ack (the same msg id on another
//! subject) returns the events of the record it names. The wildcard check needs nats-server
//! 2.11 or newer (older servers ignore the header and check the exact subject only).
//!
//! **Processed commands.** The server deduplicates msg ids only for the duplicate window. KV
//! bucket `CAIRN_COMMANDS` (key = command id, value = the record's stream sequence, 8 bytes
//! big-endian) is checked before an append that carries a command id and written after it, so
//! a repeated command returns its first events for as long as the log exists. A crash between
//! the publish and the KV write leaves the command to the duplicate window. (The envelopes carry
//! the command id, so the index could be rebuilt from the stream; nothing does that yet.)
//!
//! **Hash chain.** Per aggregate: an envelope's `prev_hash` is the link to the previous event
//! of the same aggregate (zeros for its first event): its BLAKE3 hash, or, in a log opened with
//! the audit key (`audit_key`, a file every orchestrator shares), the key's keyed BLAKE3 MAC,
//! in records of format 2. The first orchestrator that opens the log with the key records in
//! `CAIRN_COMMANDS` (key `audit-keyed-from`) the first event sequence whose records must be
//! keyed; from then on the log does not open without the key, and an orchestrator without it
//! refuses to append after a keyed record. [`EventLog::verify_chain`] walks the stream and names
//! the first missing record (a gap in stream sequences: deleted or purged), broken link (a
//! version gap or a `prev_hash` mismatch: with a keyed log, also any rewrite made without the
//! key) or unkeyed record after the log was keyed.
//!
//! **Reads** go to the stream leader (`STREAM.MSG.GET`) or to consumers, never to a possibly
//! stale replica, so an append is visible to the reads that follow it. `read_from` reads a few
//! records by sequence, or many through a short-lived consumer; `tail` follows the stream with
//! an ordered consumer, recreated from the last record it returned when it fails.
//!
//! **Durability.** An append returns once the stream leader (and a quorum of replicas) stored
//! the record. nats-server fsyncs its files every `sync_interval` (2 min by default): a
//! `kill -9` of the server loses nothing acknowledged (the tests check it), but surviving power
//! loss needs `sync_interval: always` in the server's
//! `jetstream` block, or replicas 3 on separate machines.

pub(crate) mod record;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishErrorKind, RequestErrorKind};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use cairn_schemas::subjects::{ALL_EVENTS, event_subject};
use cairn_schemas::{Aggregate, CommandId, Envelope};
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;

use self::record::{
    MAX_EVENTS, Record, SEQ_STRIDE, aggregate_filter, decode_record, decode_record_with,
    encode_keyed_record, encode_record,
};
use super::{AppendRequest, Error, EventLog, NextBatch, StoredEvent, Tail, TailSource, validate};
use crate::audit::{AuditKey, RunningDigest, link_hash};

/// Header that applies the expected-last-subject-sequence check to a wildcard subject
/// (nats-server 2.11+).
const EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: &str = "Nats-Expected-Last-Subject-Sequence-Subject";
/// Aggregate heads cached at most; the cache is emptied when it is full (a miss costs one read).
const HEAD_CACHE: usize = 65_536;
/// `read_from` reads ranges of at most this many records by sequence, larger ones through a
/// consumer (creating one costs a few round trips).
const SMALL_RANGE: u64 = 16;
/// Records fetched per pull of a `read_from` or `verify_chain` consumer.
const FETCH_BATCH: usize = 1024;
/// Records a tail returns per batch at most.
const TAIL_BATCH: usize = 512;

/// How to open a [`JetStreamLog`].
#[derive(Debug, Clone)]
pub struct JetStreamLogConfig {
    /// The stream's name (`CAIRN_EVENTS`).
    pub stream: String,
    /// Replicas of the stream and of the command index (1, or 3 in a cluster).
    pub replicas: usize,
    /// How long one publish or read waits for the server's answer.
    pub publish_timeout: Duration,
    /// How long an append (or a read) retries through timeouts and "no responders" before it
    /// gives up with [`Error::Storage`].
    pub retry_for: Duration,
    /// The stream's duplicate window, used when the log creates the stream (2 min).
    pub duplicate_window: Duration,
    /// The KV bucket of processed commands (`CAIRN_COMMANDS`).
    pub commands_bucket: String,
    /// The audit key that keys the hash chain's links (see the module's "Hash chain").
    pub audit_key: Option<AuditKey>,
}

impl Default for JetStreamLogConfig {
    fn default() -> Self {
        Self {
            stream: "CAIRN_EVENTS".into(),
            replicas: 1,
            publish_timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(20),
            duplicate_window: Duration::from_secs(120),
            commands_bucket: "CAIRN_COMMANDS".into(),
            audit_key: None,
        }
    }
}

/// The JetStream event log. A cheap handle: clones share one connection and one head cache.
#[derive(Clone)]
pub struct JetStreamLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JetStreamLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamLog")
            .field("stream", &self.inner.config.stream)
            .finish_non_exhaustive()
    }
}

/// What the log knows about an aggregate's last record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    /// The aggregate's version (0 = no events).
    version: u64,
    /// Stream sequence of its last record (0 = none).
    stream_seq: u64,
    /// The link to its last event's bytes (zeros = none).
    hash: [u8; 32],
    /// Whether its last record's links are keyed.
    keyed: bool,
}

const EMPTY_HEAD: Head = Head {
    version: 0,
    stream_seq: 0,
    hash: [0; 32],
    keyed: false,
};

/// The `CAIRN_COMMANDS` key that holds the first event sequence of the keyed chain (8 bytes,
/// big-endian). Command ids are UUIDs, so it cannot clash with one.
const KEYED_FROM_KEY: &str = "audit-keyed-from";

/// State shared by every handle. Dropping it (with the last handle) ends the tails.
struct Inner {
    config: JetStreamLogConfig,
    js: jetstream::Context,
    stream: stream::Stream,
    commands: kv::Store,
    /// The KV bucket's stream, for reads from its leader.
    commands_stream: stream::Stream,
    heads: Mutex<HashMap<Aggregate, Head>>,
    /// The first event sequence whose record must be keyed (`None`: an unkeyed log).
    keyed_from: Option<u64>,
    /// Never sent on; tails watch it to learn that the log was dropped.
    closed: watch::Sender<()>,
}

fn storage(
    context: impl Into<String>,
    err: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> Error {
    Error::Storage {
        context: context.into(),
        source: err.into(),
    }
}

/// Whether an error from the client is worth retrying: the server did not answer in time, has
/// no stream leader right now, or is restarting.
fn is_transient(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(err) = err.downcast_ref::<jetstream::context::PublishError>() {
            return matches!(
                err.kind(),
                PublishErrorKind::TimedOut
                    | PublishErrorKind::StreamNotFound
                    | PublishErrorKind::BrokenPipe
            ) || std::error::Error::source(err).is_some_and(is_transient);
        }
        if let Some(err) = err.downcast_ref::<jetstream::context::RequestError>()
            && matches!(
                err.kind(),
                RequestErrorKind::TimedOut | RequestErrorKind::NoResponders
            )
        {
            return true;
        }
        if let Some(err) = err.downcast_ref::<async_nats::RequestError>()
            && matches!(
                err.kind(),
                async_nats::RequestErrorKind::TimedOut | async_nats::RequestErrorKind::NoResponders
            )
        {
            return true;
        }
        if let Some(err) = err.downcast_ref::<jetstream::Error>() {
            // 503: JetStream temporarily unavailable (recovering after a restart, no leader);
            // 10059: stream not found, while a restarted server is still loading its streams.
            return err.code() == 503 || err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND;
        }
        let text = err.to_string();
        if text.contains("timed out") || text.contains("no responders") {
            return true;
        }
        current = err.source();
    }
    false
}

/// Runs `attempt` until it succeeds, fails with a lasting error, or `retry_for` has passed.
async fn retrying<T, E, F, Fut>(
    retry_for: Duration,
    what: &(dyn Fn() -> String + Sync),
    mut attempt: F,
) -> Result<T, Error>
where
    E: std::error::Error + Send + Sync + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    let mut backoff = Duration::from_millis(25);
    let mut n_attempts = 1u32;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(err) if is_transient(&err) && started.elapsed() < retry_for => {
                tracing::warn!(error = %err, attempt = n_attempts, "event log: {} failed, retrying", what());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                n_attempts += 1;
            }
            Err(err) => {
                return Err(storage(
                    format!("{} (after {n_attempts} attempts)", what()),
                    err,
                ));
            }
        }
    }
}

/// A message read from a stream: subject, stream sequence, payload and msg id.
struct RawRecord {
    subject: String,
    stream_seq: u64,
    payload: Bytes,
    msg_id: Option<String>,
}

impl From<jetstream::message::StreamMessage> for RawRecord {
    fn from(message: jetstream::message::StreamMessage) -> Self {
        let msg_id = message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|value| value.as_str().to_owned());
        RawRecord {
            subject: message.subject.to_string(),
            stream_seq: message.sequence,
            payload: message.payload,
            msg_id,
        }
    }
}

impl RawRecord {
    /// The record, for its events (a keyed record's links are not computed).
    fn decode(&self) -> Result<Record, Error> {
        decode_record(&self.subject, self.stream_seq, &self.payload)
    }

    /// The record with its links, keyed ones computed with `key`.
    fn decode_links(&self, key: Option<&AuditKey>) -> Result<Record, Error> {
        decode_record_with(&self.subject, self.stream_seq, &self.payload, key)
    }
}

/// What a publish did.
enum Published {
    /// Stored as a new record at this stream sequence.
    Stored(u64),
    /// The server already had a record with this msg id, at this stream sequence.
    Duplicate(u64),
    /// The aggregate's last record is not the one we expected.
    WrongLastSequence,
}

impl JetStreamLog {
    /// Connects the log to its stream and command index, creating them if missing.
    ///
    /// An existing stream is used as it is (an operator may have tuned it) as long as it
    /// captures `cairn.evt.>`.
    pub async fn open(
        client: async_nats::Client,
        config: JetStreamLogConfig,
    ) -> Result<Self, Error> {
        let js = jetstream::ContextBuilder::new()
            .timeout(config.publish_timeout)
            .build(client);
        let wanted = stream::Config {
            name: config.stream.clone(),
            description: Some("cairn events: one record per append (see log::jetstream)".into()),
            subjects: vec![ALL_EVENTS.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            duplicate_window: config.duplicate_window,
            allow_direct: true,
            // Acknowledged history is never removed through the API, by anyone.
            deny_delete: true,
            deny_purge: true,
            ..Default::default()
        };
        let stream_name = config.stream.clone();
        let stream = retrying(
            config.retry_for,
            &|| format!("opening stream {stream_name}"),
            || js.get_or_create_stream(wanted.clone()),
        )
        .await?;
        let subjects = &stream.cached_info().config.subjects;
        if !subjects.iter().any(|s| s == ALL_EVENTS || s == ">") {
            return Err(storage(
                format!("opening stream {stream_name}"),
                format!("the stream exists but captures {subjects:?}, not {ALL_EVENTS:?}"),
            ));
        }
        let existing = &stream.cached_info().config;
        if !existing.deny_delete || !existing.deny_purge {
            // A stream made by an earlier cairn, or by hand: say so at every start, since
            // nats-server does not let a stream's deny flags be changed after its creation.
            tracing::warn!(
                stream = %stream_name,
                deny_delete = existing.deny_delete,
                deny_purge = existing.deny_purge,
                "the event stream allows deleting or purging its messages; a new stream made by \
                 this cairn refuses both (migrate by mirroring it into a new stream)"
            );
        }

        let bucket = config.commands_bucket.clone();
        let commands =
            match js.get_key_value(bucket.clone()).await {
                Ok(store) => store,
                Err(_) => {
                    let kv_config = kv::Config {
                        bucket: bucket.clone(),
                        description: "cairn: processed command id -> stream sequence of its record"
                            .into(),
                        history: 1,
                        storage: stream::StorageType::File,
                        num_replicas: config.replicas,
                        ..Default::default()
                    };
                    match js.create_key_value(kv_config).await {
                        Ok(store) => store,
                        // Another orchestrator may have created it meanwhile.
                        Err(create_err) => retrying(
                            config.retry_for,
                            &|| {
                                format!(
                                    "opening KV bucket {bucket} (creating it failed: {create_err})"
                                )
                            },
                            || js.get_key_value(bucket.clone()),
                        )
                        .await?,
                    }
                }
            };
        let commands_stream_name = format!("KV_{bucket}");
        let commands_stream = retrying(
            config.retry_for,
            &|| format!("opening stream {commands_stream_name}"),
            || js.get_stream(commands_stream_name.clone()),
        )
        .await?;
        let keyed_from = keyed_from(&config, &stream, &commands).await?;
        let (closed, _) = watch::channel(());
        tracing::info!(stream = %config.stream, replicas = config.replicas, ?keyed_from, "event log on JetStream opened");
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                js,
                stream,
                commands,
                commands_stream,
                heads: Mutex::new(HashMap::new()),
                keyed_from,
                closed,
            }),
        })
    }

    /// The JetStream stream handle, for tests that damage the log on purpose.
    #[cfg(test)]
    pub(crate) fn stream(&self) -> &stream::Stream {
        &self.inner.stream
    }
}

/// The first event sequence of the keyed chain, recorded by the first orchestrator that opens
/// the log with the audit key (`None` while nobody did); refuses a keyed log without the key.
async fn keyed_from(
    config: &JetStreamLogConfig,
    stream: &stream::Stream,
    commands: &kv::Store,
) -> Result<Option<u64>, Error> {
    let context = || format!("reading {KEYED_FROM_KEY} in {}", config.commands_bucket);
    let decode = |value: &[u8]| -> Result<u64, Error> {
        <[u8; 8]>::try_from(value)
            .map(u64::from_be_bytes)
            .map_err(|_| storage(context(), format!("{} bytes, not 8", value.len())))
    };
    let read = || async {
        match commands.entry(KEYED_FROM_KEY).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                decode(&entry.value).map(Some)
            }
            Ok(_) => Ok(None),
            Err(err) => Err(storage(context(), err)),
        }
    };
    let known = read().await?;
    match (known, &config.audit_key) {
        (Some(from), None) => Err(Error::AuditKeyRequired {
            path: format!("stream {}", config.stream),
            keyed_from: from,
        }),
        (known @ Some(_), Some(_)) | (known @ None, None) => Ok(known),
        (None, Some(_)) => {
            let mut stream = stream.clone();
            let info = stream
                .info()
                .await
                .map_err(|err| storage(format!("reading stream {}", config.stream), err))?;
            let from = (info.state.last_sequence + 1).saturating_mul(SEQ_STRIDE);
            match commands
                .create(KEYED_FROM_KEY, Bytes::copy_from_slice(&from.to_be_bytes()))
                .await
            {
                Ok(_) => {
                    tracing::warn!(stream = %config.stream, keyed_from = from, "event log: the hash chain is keyed with the audit key from now on; the links of the events before are plain BLAKE3");
                    Ok(Some(from))
                }
                // Another orchestrator recorded it first.
                Err(_) => read()
                    .await?
                    .map(Some)
                    .ok_or_else(|| storage(context(), "it could neither be created nor read")),
            }
        }
    }
}

impl Inner {
    fn cached_head(&self, aggregate: &Aggregate) -> Option<Head> {
        self.heads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(aggregate)
            .copied()
    }

    /// Remembers a head unless a newer one is known.
    fn remember_head(&self, aggregate: &Aggregate, head: Head) {
        let mut heads = self
            .heads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(known) = heads.get_mut(aggregate) {
            if known.stream_seq <= head.stream_seq {
                *known = head;
            }
            return;
        }
        if heads.len() >= HEAD_CACHE {
            heads.clear();
        }
        heads.insert(aggregate.clone(), head);
    }

    /// A message of the events stream by stream sequence, from the leader; `None` if there
    /// is none (deleted, or beyond the end).
    async fn get_record(&self, stream_seq: u64) -> Result<Option<RawRecord>, Error> {
        let result = retrying(
            self.config.retry_for,
            &|| {
                format!(
                    "reading record {stream_seq} of stream {}",
                    self.config.stream
                )
            },
            || async {
                match self.stream.get_raw_message(stream_seq).await {
                    Ok(message) => Ok(Some(RawRecord::from(message))),
                    Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                    Err(err) => Err(err),
                }
            },
        )
        .await?;
        Ok(result)
    }

    /// The last message on subjects matching `filter`, from the leader.
    async fn last_record(&self, filter: &str) -> Result<Option<RawRecord>, Error> {
        retrying(
            self.config.retry_for,
            &|| {
                format!(
                    "reading the last record on {filter} of stream {}",
                    self.config.stream
                )
            },
            || async {
                match self.stream.get_last_raw_message_by_subject(filter).await {
                    Ok(message) => Ok(Some(RawRecord::from(message))),
                    Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                    Err(err) => Err(err),
                }
            },
        )
        .await
    }

    /// Reads the aggregate's last record from the leader and caches what it says.
    async fn load_head(&self, aggregate: &Aggregate) -> Result<(Head, Option<RawRecord>), Error> {
        let Some(raw) = self.last_record(&aggregate_filter(aggregate)).await? else {
            return Ok((EMPTY_HEAD, None));
        };
        let record = raw.decode_links(self.config.audit_key.as_ref())?;
        let head = Head {
            version: record.last_version(),
            stream_seq: raw.stream_seq,
            hash: record.last_hash(),
            keyed: record.keyed,
        };
        self.remember_head(aggregate, head);
        Ok((head, Some(raw)))
    }

    /// Forgets the cached head of an aggregate (the next append reads it from the leader).
    fn forget_head(&self, aggregate: &Aggregate) {
        self.heads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(aggregate);
    }

    /// The first message on subjects matching `filter` after stream sequence `after`, from the
    /// leader.
    async fn first_record_after(
        &self,
        filter: &str,
        after: u64,
    ) -> Result<Option<RawRecord>, Error> {
        retrying(
            self.config.retry_for,
            &|| {
                format!(
                    "reading the record after {after} on {filter} of stream {}",
                    self.config.stream
                )
            },
            || async {
                match self
                    .stream
                    .get_first_raw_message_by_subject(filter, after + 1)
                    .await
                {
                    Ok(message) => Ok(Some(RawRecord::from(message))),
                    Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                    Err(err) => Err(err),
                }
            },
        )
        .await
    }

    /// The stream sequence a processed command's record is at, from the index.
    async fn command_record(&self, command: CommandId) -> Result<Option<u64>, Error> {
        let subject = format!("$KV.{}.{command}", self.config.commands_bucket);
        let found = retrying(
            self.config.retry_for,
            &|| {
                format!(
                    "reading command {command} from KV {}",
                    self.config.commands_bucket
                )
            },
            || async {
                match self
                    .commands_stream
                    .get_last_raw_message_by_subject(&subject)
                    .await
                {
                    Ok(message) => Ok(Some(message)),
                    Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                    Err(err) => Err(err),
                }
            },
        )
        .await?;
        let Some(message) = found else {
            return Ok(None);
        };
        // A deleted or purged key leaves a marker with an operation header and no value.
        if message.headers.get("KV-Operation").is_some() {
            return Ok(None);
        }
        let bytes: [u8; 8] = message.payload.as_ref().try_into().map_err(|_| {
            storage(
                format!(
                    "reading command {command} from KV {}",
                    self.config.commands_bucket
                ),
                format!("the entry has {} bytes, expected 8", message.payload.len()),
            )
        })?;
        Ok(Some(u64::from_be_bytes(bytes)))
    }

    /// Records that `command` was appended as the record at `stream_seq`. Best effort after
    /// the retries: the events are durable whatever happens here.
    async fn remember_command(&self, command: CommandId, stream_seq: u64) {
        let value = Bytes::copy_from_slice(&stream_seq.to_be_bytes());
        let key = command.to_string();
        let result = retrying(
            self.config.retry_for,
            &|| {
                format!(
                    "writing command {command} to KV {}",
                    self.config.commands_bucket
                )
            },
            || self.commands.put(&key, value.clone()),
        )
        .await;
        if let Err(err) = result {
            tracing::warn!(
                %command, stream_seq, error = %err,
                "event log: the command index misses a command; the stream's duplicate window \
                 still catches a repeat for its remaining time"
            );
        }
    }

    /// The events of the record at `stream_seq` that an earlier append of the same command
    /// (or msg id) stored.
    async fn earlier_append(
        &self,
        stream_seq: u64,
        command: Option<CommandId>,
    ) -> Result<Vec<StoredEvent>, Error> {
        let raw = self
            .get_record(stream_seq)
            .await?
            .ok_or_else(|| Error::Corrupt {
                seq: stream_seq.saturating_mul(SEQ_STRIDE),
                detail: format!(
                    "the record at stream sequence {stream_seq} of an earlier append{} is missing",
                    command
                        .map(|c| format!(" of command {c}"))
                        .unwrap_or_default()
                ),
            })?;
        let record = raw.decode()?;
        if let Some(command) = command
            && record.events[0].envelope.command != Some(command)
        {
            return Err(Error::Corrupt {
                seq: record.events[0].seq,
                detail: format!(
                    "command {command} leads to the record at stream sequence \
                         {stream_seq} (by the command index or the stream's msg id \
                         deduplication), but that record's events belong to another command"
                ),
            });
        }
        Ok(record.events)
    }

    /// One publish, retried through timeouts and "no responders" with the same headers.
    async fn publish(
        &self,
        subject: &str,
        headers: &HeaderMap,
        payload: &Bytes,
        what: &(dyn Fn() -> String + Sync),
    ) -> Result<Published, Error> {
        retrying(self.config.retry_for, what, || async {
            let ack = self
                .js
                .send_publish(
                    subject.to_owned(),
                    jetstream::message::PublishMessage::build()
                        .payload(payload.clone())
                        .headers(headers.clone()),
                )
                .await?
                .await;
            match ack {
                Ok(ack) if ack.duplicate => Ok(Published::Duplicate(ack.sequence)),
                Ok(ack) => Ok(Published::Stored(ack.sequence)),
                Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {
                    Ok(Published::WrongLastSequence)
                }
                Err(err) => Err(err),
            }
        })
        .await
    }

    async fn append(&self, request: AppendRequest) -> Result<Vec<StoredEvent>, Error> {
        validate(&request)?;
        let n_events = request.events.len();
        if n_events > MAX_EVENTS {
            return Err(Error::TooManyEvents {
                aggregate: request.aggregate,
                count: n_events,
                max: MAX_EVENTS,
            });
        }
        if let Some(command) = request.command
            && let Some(stream_seq) = self.command_record(command).await?
        {
            tracing::debug!(%command, stream_seq, "event log: command already appended");
            return self.earlier_append(stream_seq, Some(command)).await;
        }

        let aggregate = &request.aggregate;
        let subject = event_subject(request.partition, aggregate);
        let filter = aggregate_filter(aggregate);
        let msg_id = match request.command {
            Some(command) => command.to_string(),
            None => request.events[0].event_id.to_string(),
        };
        let mut head = match self.cached_head(aggregate) {
            Some(head) => head,
            None => self.load_head(aggregate).await?.0,
        };
        // At most a few rounds: each one learns the aggregate's current head.
        for round in 0..4 {
            if head.version != request.expected_version {
                // The cache may be behind another orchestrator's appends: ask the leader.
                head = self.load_head(aggregate).await?.0;
                if head.version != request.expected_version {
                    return Err(Error::Conflict {
                        aggregate: request.aggregate,
                        expected: request.expected_version,
                        actual: head.version,
                    });
                }
            }
            let key = self.config.audit_key.as_ref();
            if head.keyed && key.is_none() {
                // Appending plain links after keyed ones would break the chain.
                return Err(Error::AuditKeyRequired {
                    path: format!("stream {}", self.config.stream),
                    keyed_from: self.keyed_from.unwrap_or(head.stream_seq * SEQ_STRIDE),
                });
            }
            let mut prev_hash = head.hash;
            let mut encoded = Vec::with_capacity(n_events);
            let mut envelopes = Vec::with_capacity(n_events);
            for (idx, event) in request.events.iter().enumerate() {
                let envelope = Envelope {
                    event_id: event.event_id,
                    aggregate: aggregate.clone(),
                    aggregate_version: request.expected_version + 1 + idx as u64,
                    recorded_at: request.recorded_at,
                    actor: event.actor.clone(),
                    correlation: event.correlation,
                    causation: event.causation,
                    command: request.command,
                    traceparent: event.traceparent.clone(),
                    prev_hash,
                    payload: event.payload.clone(),
                };
                let bytes = cairn_schemas::encode(&envelope);
                prev_hash = link_hash(key, &bytes);
                encoded.push(bytes);
                envelopes.push(envelope);
            }
            let payload = Bytes::from(if key.is_some() {
                encode_keyed_record(&encoded)
            } else {
                encode_record(&encoded)
            });
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id.as_str());
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                head.stream_seq.to_string().as_str(),
            );
            headers.insert(EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT, filter.as_str());
            let what = || {
                format!(
                    "appending {n_events} events to {aggregate} at version {} on {subject}",
                    request.expected_version
                )
            };
            let published = match self.publish(&subject, &headers, &payload, &what).await {
                Err(Error::Storage { context, source })
                    if source.to_string().contains("max payload") =>
                {
                    return Err(Error::Storage {
                        context: format!(
                            "{context}: the record is {} bytes, more than the server accepts; \
                             append fewer or smaller events",
                            payload.len()
                        ),
                        source,
                    });
                }
                other => other?,
            };
            let stored = match published {
                Published::Stored(stream_seq) => {
                    self.remember_head(
                        aggregate,
                        Head {
                            version: request.expected_version + n_events as u64,
                            stream_seq,
                            hash: prev_hash,
                            keyed: key.is_some(),
                        },
                    );
                    let mut stored = Vec::with_capacity(n_events);
                    for (idx, envelope) in envelopes.into_iter().enumerate() {
                        let seq = record::event_seq(stream_seq, idx).ok_or_else(|| {
                            storage(what(), format!("stream sequence {stream_seq} is too large"))
                        })?;
                        stored.push(StoredEvent { seq, envelope });
                    }
                    tracing::debug!(%aggregate, stream_seq, n_events, "event log: appended");
                    Some((stream_seq, stored))
                }
                Published::Duplicate(stream_seq) => {
                    tracing::debug!(%aggregate, stream_seq, %msg_id, "event log: duplicate msg id, returning the first append");
                    Some((
                        stream_seq,
                        self.earlier_append(stream_seq, request.command).await?,
                    ))
                }
                Published::WrongLastSequence => {
                    // The record that follows the one we expected is the only one that was
                    // published expecting it. If it carries our msg id, it is a retried
                    // publish whose first attempt was stored after all (the server checks the
                    // expected sequence before the msg id, so such a retry is refused rather
                    // than answered "duplicate"), even if more records followed it since.
                    match self.first_record_after(&filter, head.stream_seq).await? {
                        Some(raw) if raw.msg_id.as_deref() == Some(msg_id.as_str()) => {
                            tracing::debug!(%aggregate, stream_seq = raw.stream_seq, "event log: a retried publish was stored by an earlier attempt");
                            self.forget_head(aggregate);
                            let events = raw.decode()?.events;
                            Some((raw.stream_seq, events))
                        }
                        _ => {
                            head = self.load_head(aggregate).await?.0;
                            tracing::debug!(%aggregate, round, ?head, "event log: wrong last sequence, re-read the head");
                            None
                        }
                    }
                }
            };
            if let Some((stream_seq, events)) = stored {
                if let Some(command) = request.command {
                    self.remember_command(command, stream_seq).await;
                }
                return Ok(events);
            }
        }
        Err(storage(
            format!("appending to {aggregate}"),
            "the aggregate's last record kept moving while its version stayed the same",
        ))
    }

    /// The stream sequence of the last record (0 when the stream has none).
    async fn last_stream_seq(&self) -> Result<Option<RawRecord>, Error> {
        self.last_record(ALL_EVENTS).await
    }

    async fn read_from(&self, from_seq: u64, limit: usize) -> Result<Vec<StoredEvent>, Error> {
        let first_stream_seq = (from_seq / SEQ_STRIDE).max(1);
        let Some(last) = self.last_stream_seq().await? else {
            return Ok(Vec::new());
        };
        let last_stream_seq = last.stream_seq;
        if limit == 0 || first_stream_seq > last_stream_seq {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let push = |raw: &RawRecord, out: &mut Vec<StoredEvent>| -> Result<bool, Error> {
            for event in raw.decode()?.events {
                if event.seq >= from_seq {
                    out.push(event);
                    if out.len() >= limit {
                        return Ok(true);
                    }
                }
            }
            Ok(false)
        };
        if last_stream_seq - first_stream_seq < SMALL_RANGE {
            let mut reads = futures::stream::iter(first_stream_seq..=last_stream_seq)
                .map(|stream_seq| self.get_record(stream_seq))
                .buffered(SMALL_RANGE as usize);
            while let Some(raw) = reads.next().await {
                // A missing record (deleted) is a gap; verify_chain reports it.
                if let Some(raw) = raw?
                    && push(&raw, &mut out)?
                {
                    break;
                }
            }
            return Ok(out);
        }
        let mut records = self.consume(first_stream_seq, last_stream_seq).await?;
        while let Some(raw) = records.next().await? {
            if push(&raw, &mut out)? {
                break;
            }
        }
        records.finish().await;
        Ok(out)
    }

    /// Every record from `first` to `last` (stream sequences) through a short-lived consumer.
    async fn consume(&self, first: u64, last: u64) -> Result<RecordReader, Error> {
        let config = consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: first,
            },
            ack_policy: consumer::AckPolicy::None,
            filter_subject: ALL_EVENTS.into(),
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        let consumer = retrying(
            self.config.retry_for,
            &|| {
                format!(
                    "creating a consumer on stream {} from {first}",
                    self.config.stream
                )
            },
            || self.stream.create_consumer(config.clone()),
        )
        .await?;
        Ok(RecordReader {
            stream: self.stream.clone(),
            consumer,
            last,
            next: first,
            batch: None,
            done: false,
        })
    }

    async fn read_aggregate(&self, aggregate: &Aggregate) -> Result<Vec<StoredEvent>, Error> {
        let filter = aggregate_filter(aggregate);
        let mut out = Vec::new();
        let mut after = 0u64;
        loop {
            let found = self.first_record_after(&filter, after).await?;
            let Some(raw) = found else {
                return Ok(out);
            };
            let record = raw.decode()?;
            if record.aggregate != *aggregate {
                return Err(Error::Corrupt {
                    seq: record.events[0].seq,
                    detail: format!(
                        "a record on {}'s subject holds events of {}",
                        aggregate, record.aggregate
                    ),
                });
            }
            out.extend(record.events);
            after = raw.stream_seq;
        }
    }

    async fn last_seq(&self) -> Result<u64, Error> {
        let Some(raw) = self.last_stream_seq().await? else {
            return Ok(0);
        };
        let record = raw.decode()?;
        Ok(record.events.last().map_or(0, |event| event.seq))
    }

    async fn verify_chain(&self) -> Result<u64, Error> {
        let info = retrying(
            self.config.retry_for,
            &|| format!("reading the state of stream {}", self.config.stream),
            || self.stream.get_info(),
        )
        .await?;
        let (first, last) = (info.state.first_sequence.max(1), info.state.last_sequence);
        let missing = |stream_seq: u64| Error::ChainBroken {
            seq: stream_seq.saturating_mul(SEQ_STRIDE),
            event_id: None,
            detail: format!(
                "the record at stream sequence {stream_seq} is missing (deleted or purged from \
                 stream {})",
                self.config.stream
            ),
        };
        if last == 0 {
            return Ok(0);
        }
        if first > 1 {
            return Err(missing(1));
        }
        // Per aggregate: version, hash and sequence number of its last event so far.
        let mut chains: HashMap<Aggregate, (u64, [u8; 32], u64)> = HashMap::new();
        let mut n_events = 0u64;
        let mut expected_stream_seq = 1u64;
        let mut records = self.consume(1, last).await?;
        let result = loop {
            let raw = match records.next().await {
                Ok(Some(raw)) => raw,
                Ok(None) => break Ok(()),
                Err(err) => break Err(err),
            };
            if raw.stream_seq != expected_stream_seq {
                break Err(missing(expected_stream_seq));
            }
            expected_stream_seq += 1;
            let record = match raw.decode_links(self.config.audit_key.as_ref()) {
                Ok(record) => record,
                Err(err) => {
                    break Err(Error::ChainBroken {
                        seq: raw.stream_seq.saturating_mul(SEQ_STRIDE),
                        event_id: None,
                        detail: format!("the record does not decode: {err}"),
                    });
                }
            };
            let first_seq = raw.stream_seq.saturating_mul(SEQ_STRIDE);
            if !record.keyed && self.keyed_from.is_some_and(|from| first_seq >= from) {
                break Err(Error::ChainBroken {
                    seq: first_seq,
                    event_id: record.events.first().map(|e| e.envelope.event_id),
                    detail: format!(
                        "its links are not keyed, but the log is keyed from event {}: it was \
                         written without the audit key, or rewritten",
                        self.keyed_from.unwrap_or_default()
                    ),
                });
            }
            let mut broken = None;
            for (event, hash) in record.events.iter().zip(&record.hashes) {
                let (version, prev_hash, prev_seq) = chains
                    .get(&record.aggregate)
                    .copied()
                    .unwrap_or((0, [0; 32], 0));
                let envelope = &event.envelope;
                if envelope.aggregate_version != version + 1 {
                    broken = Some(Error::ChainBroken {
                        seq: event.seq,
                        event_id: Some(envelope.event_id),
                        detail: format!(
                            "it is version {} of {}, but the aggregate's previous event (seq \
                             {prev_seq}) is version {version}: events are missing",
                            envelope.aggregate_version, record.aggregate
                        ),
                    });
                    break;
                }
                if envelope.prev_hash != prev_hash {
                    broken = Some(Error::ChainBroken {
                        seq: event.seq,
                        event_id: Some(envelope.event_id),
                        detail: format!(
                            "its prev_hash does not match the previous event of {} (seq \
                             {prev_seq}): one of the two was changed",
                            record.aggregate
                        ),
                    });
                    break;
                }
                chains.insert(
                    record.aggregate.clone(),
                    (envelope.aggregate_version, *hash, event.seq),
                );
                n_events += 1;
            }
            if let Some(err) = broken {
                break Err(err);
            }
        };
        records.finish().await;
        result?;
        if expected_stream_seq <= last {
            return Err(missing(expected_stream_seq));
        }
        Ok(n_events)
    }
}

impl Inner {
    /// The running digest over the stored events of every record, in stream order.
    async fn extend_digest(
        &self,
        from: RunningDigest,
        to_seq: u64,
    ) -> Result<RunningDigest, Error> {
        let mut digest = from;
        let Some(last) = self.last_stream_seq().await? else {
            return Ok(digest);
        };
        let first_stream = (from.seq / SEQ_STRIDE).max(1);
        let last_stream = (to_seq / SEQ_STRIDE).min(last.stream_seq);
        if first_stream > last_stream {
            return Ok(digest);
        }
        let mut records = self.consume(first_stream, last_stream).await?;
        let result = loop {
            let raw = match records.next().await {
                Ok(Some(raw)) => raw,
                Ok(None) => break Ok(()),
                Err(err) => break Err(err),
            };
            // Over the events' plain hashes, as every log's digest: a checkpoint verifies
            // without the audit key.
            match raw.decode() {
                Ok(record) => {
                    for (event, hash) in record.events.iter().zip(&record.hashes) {
                        if event.seq > digest.seq && event.seq <= to_seq {
                            digest.push(event.seq, hash);
                        }
                    }
                }
                Err(err) => break Err(err),
            }
        };
        records.finish().await;
        result.map(|()| digest)
    }
}

/// Reads records in order through a consumer without acks, up to a last stream sequence.
struct RecordReader {
    stream: stream::Stream,
    consumer: consumer::Consumer<consumer::pull::Config>,
    last: u64,
    /// Lowest stream sequence not returned yet.
    next: u64,
    /// The running fetch and whether it delivered anything yet.
    batch: Option<(consumer::pull::Batch, bool)>,
    done: bool,
}

impl RecordReader {
    /// The next record, `None` after `last` (or when the stream has nothing more).
    async fn next(&mut self) -> Result<Option<RawRecord>, Error> {
        loop {
            if self.done || self.next > self.last {
                return Ok(None);
            }
            let (batch, yielded) = match self.batch.as_mut() {
                Some(batch) => batch,
                None => {
                    let remaining =
                        usize::try_from(self.last - self.next + 1).unwrap_or(usize::MAX);
                    let batch = self
                        .consumer
                        .fetch()
                        .max_messages(remaining.min(FETCH_BATCH))
                        .messages()
                        .await
                        .map_err(|err| {
                            storage(format!("fetching records from {}", self.next), err)
                        })?;
                    self.batch.insert((batch, false))
                }
            };
            match batch.next().await {
                Some(Ok(message)) => {
                    *yielded = true;
                    let stream_seq = message
                        .info()
                        .map_err(|err| storage("reading a delivered record's metadata", err))?
                        .stream_sequence;
                    self.next = stream_seq + 1;
                    if stream_seq > self.last {
                        self.done = true;
                        return Ok(None);
                    }
                    return Ok(Some(RawRecord {
                        subject: message.subject.to_string(),
                        stream_seq,
                        msg_id: message
                            .headers
                            .as_ref()
                            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                            .map(|v| v.as_str().to_owned()),
                        payload: message.payload.clone(),
                    }));
                }
                Some(Err(err)) => {
                    return Err(storage(format!("fetching records from {}", self.next), err));
                }
                None => {
                    // A fetch that delivered nothing: nothing more is stored up to `last`
                    // (the rest was deleted). Otherwise fetch the next batch.
                    self.done = !*yielded;
                    self.batch = None;
                }
            }
        }
    }

    /// Deletes the consumer (it would expire by itself after its inactive threshold).
    async fn finish(self) {
        let name = self.consumer.cached_info().name.clone();
        if let Err(err) = self.stream.delete_consumer(&name).await {
            tracing::debug!(consumer = %name, error = %err, "event log: deleting a read consumer failed; it expires by itself");
        }
    }
}

impl EventLog for JetStreamLog {
    async fn append(&self, request: AppendRequest) -> Result<Vec<StoredEvent>, Error> {
        self.inner.append(request).await
    }

    async fn processed(&self, command: CommandId) -> Result<Option<Vec<StoredEvent>>, Error> {
        match self.inner.command_record(command).await? {
            Some(stream_seq) => self
                .inner
                .earlier_append(stream_seq, Some(command))
                .await
                .map(Some),
            None => Ok(None),
        }
    }

    async fn read_from(&self, from_seq: u64, limit: usize) -> Result<Vec<StoredEvent>, Error> {
        self.inner.read_from(from_seq, limit).await
    }

    async fn read_aggregate(&self, aggregate: &Aggregate) -> Result<Vec<StoredEvent>, Error> {
        self.inner.read_aggregate(aggregate).await
    }

    async fn last_seq(&self) -> Result<u64, Error> {
        self.inner.last_seq().await
    }

    fn tail(&self, from_seq: u64) -> Tail {
        Tail::new(Box::new(JetStreamTail {
            inner: Arc::downgrade(&self.inner),
            stream: self.inner.stream.clone(),
            retry_for: self.inner.config.retry_for,
            closed: self.inner.closed.subscribe(),
            messages: None,
            next_stream_seq: (from_seq / SEQ_STRIDE).max(1),
            from_seq,
            pending_error: None,
        }))
    }

    async fn verify_chain(&self) -> Result<u64, Error> {
        self.inner.verify_chain().await
    }

    fn keyed_from(&self) -> Option<u64> {
        self.inner.keyed_from
    }

    async fn extend_digest(
        &self,
        from: RunningDigest,
        to_seq: u64,
    ) -> Result<RunningDigest, Error> {
        self.inner.extend_digest(from, to_seq).await
    }
}

/// A tail of a [`JetStreamLog`]: an ordered consumer from the next record it has not returned,
/// recreated from there when it fails. Holds only a `Weak` of the log.
struct JetStreamTail {
    inner: Weak<Inner>,
    stream: stream::Stream,
    retry_for: Duration,
    /// Ends the tail when the log is dropped.
    closed: watch::Receiver<()>,
    messages: Option<consumer::pull::Ordered>,
    /// Lowest stream sequence not returned yet.
    next_stream_seq: u64,
    /// Events below this are skipped (the first record may be partly before it).
    from_seq: u64,
    /// A record that did not decode while a batch was being gathered: returned next.
    pending_error: Option<Error>,
}

impl JetStreamTail {
    async fn open_consumer(&mut self) -> Result<consumer::pull::Ordered, Error> {
        let config = consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: self.next_stream_seq,
            },
            filter_subject: ALL_EVENTS.into(),
            ..Default::default()
        };
        let stream = self.stream.clone();
        let start = self.next_stream_seq;
        let what = || format!("starting a tail at stream sequence {start}");
        let consumer = retrying(self.retry_for, &what, || {
            stream.create_consumer(config.clone())
        })
        .await?;
        retrying(self.retry_for, &what, || consumer.clone().messages()).await
    }

    /// Decodes a delivered message; `Ok(None)` for a record wholly before `from_seq`.
    fn take(&mut self, message: &jetstream::Message) -> Result<Vec<StoredEvent>, Error> {
        let stream_seq = message
            .info()
            .map_err(|err| storage("reading a delivered record's metadata", err))?
            .stream_sequence;
        self.next_stream_seq = stream_seq + 1;
        let record = decode_record(message.subject.as_str(), stream_seq, &message.payload)?;
        let from_seq = self.from_seq;
        Ok(record
            .events
            .into_iter()
            .filter(|event| event.seq >= from_seq)
            .collect())
    }
}

impl TailSource for JetStreamTail {
    fn next_batch(&mut self) -> NextBatch<'_> {
        Box::pin(async move {
            if let Some(err) = self.pending_error.take() {
                return Err(err);
            }
            let mut backoff = Duration::from_millis(50);
            loop {
                if self.inner.strong_count() == 0 {
                    return Ok(None);
                }
                // The consumer stays in `self` across every await, so a caller that drops
                // this future (a `select!` over several inputs) keeps it: no consumer is
                // created per call.
                if self.messages.is_none() {
                    let mut closed = self.closed.clone();
                    tokio::select! {
                        _ = closed.changed() => return Ok(None),
                        opened = self.open_consumer() => match opened {
                            Ok(messages) => self.messages = Some(messages),
                            Err(err) => {
                                tracing::warn!(error = %err, "event log tail: cannot start a consumer, retrying");
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_secs(2));
                                continue;
                            }
                        },
                    }
                }
                let mut closed = self.closed.clone();
                let first = {
                    let messages = self.messages.as_mut().expect("opened above");
                    tokio::select! {
                        _ = closed.changed() => return Ok(None),
                        message = messages.next() => message,
                    }
                };
                match first {
                    Some(Ok(message)) => {
                        let mut batch = self.take(&message)?;
                        // Take what else is already delivered, without waiting.
                        while batch.len() < TAIL_BATCH {
                            let next = self
                                .messages
                                .as_mut()
                                .expect("opened above")
                                .next()
                                .now_or_never();
                            let Some(Some(Ok(message))) = next else {
                                break;
                            };
                            match self.take(&message) {
                                Ok(more) => batch.extend(more),
                                Err(err) => {
                                    // Return the events before it now, the error next time.
                                    self.pending_error = Some(err);
                                    break;
                                }
                            }
                        }
                        if !batch.is_empty() {
                            return Ok(Some(batch));
                        }
                        if let Some(err) = self.pending_error.take() {
                            return Err(err);
                        }
                    }
                    Some(Err(err)) => {
                        self.messages = None;
                        tracing::warn!(error = %err, next = self.next_stream_seq, "event log tail: consumer failed, recreating it");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    None => {
                        self.messages = None;
                        tracing::warn!(
                            next = self.next_stream_seq,
                            "event log tail: consumer ended, recreating it"
                        );
                    }
                }
            }
        })
    }
}
