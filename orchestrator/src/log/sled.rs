//! The event log on sled 0.34, for the single-machine mode (`cairn up`) and for tests.
//!
//! Layout, one sled tree each (integers big-endian so that byte order is numeric order):
//!
//! | tree         | key                              | value                                   |
//! |--------------|----------------------------------|-----------------------------------------|
//! | `events`     | page number (u64)                | up to 32 event records, in seq order    |
//! | `aggregates` | aggregate key ++ version (u64)   | global seq (u64)                        |
//! | `heads`      | aggregate key                    | current version (u64)                   |
//! | `commands`   | command id (16 bytes)            | first seq (u64) ++ event count (u32)    |
//! | `meta`       | `layout`, `last_seq`, `last_hash`, `keyed_from` | layout name, u64, link to the last event's bytes, u64 |
//!
//! An event record is its seq (u64), the length of its bytes (u32) and its stored bytes (the
//! encoded envelope, version byte + postcard); the hash chain covers exactly those bytes.
//!
//! **Keyed chain.** Link `k` (event `k`'s `prev_hash`, or for `k = last + 1` the `last_hash`
//! tip in `meta`) is the audit key's MAC of event `k - 1` when `k >= keyed_from`, else its
//! plain BLAKE3 hash. A log opened with a key for the first time gets `keyed_from = last + 1`
//! and its tip re-linked with the key, in one batch, flushed before open returns; a log with
//! `keyed_from` refuses to open without a key ([`Error::AuditKeyRequired`]).
//! Event `seq` lives in page `(seq - 1) / 32`. Pages rather than one sled entry per event,
//! because sled's cost per entry (allocations, node walks, space) dominated replay: with one
//! entry per event, replay of 1,000,000 events ran at 350,000-500,000 events/s on a 2-core
//! machine; with pages it is bounded by envelope decoding. The price is that an append
//! rewrites the last, partly filled page (at most 31 other events, a few KiB).
//!
//! The aggregate key is a kind byte, a length byte and the id bytes, so that one aggregate's
//! key is never a prefix of another's.
//!
//! **Appends.** One append at a time per process (the `commit` mutex; sled allows one
//! process per database), each a single sled transaction over all five trees that re-checks
//! the expected version, the command index and the chain tip, so an append is all or nothing,
//! also across a crash (sled recovers a transaction's writes together or not at all). After
//! the commit the appender waits until the events are durable: one flush (write + fsync) at a
//! time, and every appender whose events a running flush already covers just waits for it
//! (group commit). Only then is the durable sequence number raised, which is
//! what readers and tails see.
//!
//! **Damaged tail on open.** Open checks that the last event decodes, that its hash is the
//! chain tip in `meta` and that it links to the event before it. If not, open fails with
//! [`Error::CorruptTail`] naming the event, and changes nothing. It never truncates: sled's
//! transactions are recovered whole or not at all, so a half-written append cannot appear
//! after a crash; a damaged last event is therefore damage or tampering, not an interrupted
//! write, and it (like the events before it) may have been acknowledged. Dropping it would
//! silently lose acknowledged history, so an operator decides (verify, restore from backup).
//!
//! Blocking sled work (commits, reads, chain verification) runs on tokio's blocking pool.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use ::sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use ::sled::{Db, Transactional, Tree};
use cairn_schemas::{Aggregate, CommandId, Envelope};
use tokio::sync::watch;

use crate::audit::chain::{link_hash, link_is_keyed};
use crate::audit::{AuditKey, RunningDigest};

use super::{AppendRequest, Error, EventLog, NextBatch, StoredEvent, Tail, TailSource, validate};

/// Name of this on-disk layout, stored in `meta` and checked on open.
const LAYOUT: &[u8] = b"cairn-event-log-sled/1";
/// Events per page of the `events` tree (part of the layout).
const PAGE_EVENTS: u64 = 32;
/// Bytes of a record's header: seq (u64) and length (u32).
const RECORD_HEADER: usize = 12;
const META_LAYOUT: &[u8] = b"layout";
const META_LAST_SEQ: &[u8] = b"last_seq";
const META_LAST_HASH: &[u8] = b"last_hash";
const META_KEYED_FROM: &[u8] = b"keyed_from";
/// How long open waits for sled's file lock before giving up.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Events per read when a tail catches up.
const TAIL_BATCH: usize = 1024;

/// Where and how to open a [`SledLog`].
#[derive(Debug, Clone)]
pub struct SledLogConfig {
    /// Directory of the sled database (created if missing).
    pub path: PathBuf,
    /// Upper bound of sled's page cache, in bytes.
    pub cache_capacity_bytes: u64,
    /// The audit key that keys the chain's links (`None`: plain BLAKE3, for a log that never
    /// had a key).
    pub audit_key: Option<AuditKey>,
}

impl SledLogConfig {
    /// Defaults for `path`: a cache of up to 1 GiB (sled's default; it is a bound, not an
    /// allocation). A cache smaller than the log makes replay fetch pages again: measured
    /// with an earlier one-entry-per-event layout, 1,000,000 events replayed 2-2.5 times
    /// slower with a 256 MiB cache than with 1 GiB.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cache_capacity_bytes: 1 << 30,
            audit_key: None,
        }
    }

    /// The same, with the chain keyed by `key`.
    pub fn with_audit_key(mut self, key: Option<AuditKey>) -> Self {
        self.audit_key = key;
        self
    }
}

/// Counters for metrics and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SledLogStats {
    /// Appends committed (not counting idempotent repeats or conflicts).
    pub n_appends: u64,
    /// Flushes (fsyncs) done; fewer than appends when group commit kicks in.
    pub n_flushes: u64,
}

/// The sled event log. A cheap handle: clones share one database.
#[derive(Clone)]
pub struct SledLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SledLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledLog")
            .field("path", &self.inner.path)
            .field("durable_seq", &*self.inner.durable.borrow())
            .finish_non_exhaustive()
    }
}

/// State shared by every handle. Dropped (and the database closed, after a final flush by
/// sled) when the last [`SledLog`] handle goes; tails hold only a `Weak` and end then.
struct Inner {
    path: PathBuf,
    db: Db,
    events: Tree,
    aggregates: Tree,
    heads: Tree,
    commands: Tree,
    meta: Tree,
    /// Held by the appender that is committing; makes appends of this process one at a time,
    /// so sled's optimistic transactions never have to re-run.
    commit: Mutex<()>,
    /// Highest sequence number committed to sled (durable or not).
    committed_seq: AtomicU64,
    /// Held by the appender that is flushing; the others wait here (on their blocking
    /// threads) and usually find their events flushed by it.
    flush: Mutex<()>,
    /// Highest sequence number known durable. Readers see events up to here. Sent after each
    /// flush; tails subscribe to it.
    durable: watch::Sender<u64>,
    n_appends: AtomicU64,
    n_flushes: AtomicU64,
    /// The audit key (fixed at open).
    key: Option<AuditKey>,
    /// The first keyed link (fixed at open).
    keyed_from: Option<u64>,
}

/// Link `k` of a log keyed from `keyed_from`: to `bytes`, the stored bytes of event `k - 1`.
fn link(key: Option<&AuditKey>, keyed_from: Option<u64>, k: u64, bytes: &[u8]) -> [u8; 32] {
    if link_is_keyed(keyed_from, k) {
        link_hash(key, bytes)
    } else {
        link_hash(None, bytes)
    }
}

fn storage(context: impl Into<String>, err: ::sled::Error) -> Error {
    Error::Storage {
        context: context.into(),
        source: Box::new(err),
    }
}

fn be_u64(bytes: &[u8], what: &str) -> Result<u64, Error> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| Error::Storage {
        context: format!("reading {what}"),
        source: format!("expected 8 bytes, found {}", bytes.len()).into(),
    })?;
    Ok(u64::from_be_bytes(array))
}

/// Kind byte ++ id length ++ id bytes. Stable: it is part of the on-disk layout.
fn aggregate_key(aggregate: &Aggregate) -> Vec<u8> {
    let kind: u8 = match aggregate {
        Aggregate::Group(_) => 1,
        Aggregate::Vm(_) => 2,
        Aggregate::Job(_) => 3,
        Aggregate::Node(_) => 4,
        Aggregate::Token(_) => 5,
    };
    let id = aggregate.id_bytes();
    let mut key = Vec::with_capacity(2 + id.len() + 8);
    key.push(kind);
    // Ids are at most 64 bytes (node names), so the length fits in a byte.
    key.push(id.len() as u8);
    key.extend_from_slice(id);
    key
}

/// What a commit did.
enum Committed {
    /// New events were stored.
    Appended(Vec<StoredEvent>),
    /// The command was appended before, as events `first_seq..first_seq + count`.
    Duplicate { first_seq: u64, count: u32 },
}

/// Why a commit transaction gave up (all checked again inside the transaction).
enum Refusal {
    Conflict { actual: u64 },
    Duplicate { first_seq: u64, count: u32 },
    TipMoved,
    Corrupt(String),
}

fn tx_u64(
    tree: &TransactionalTree,
    key: &[u8],
) -> Result<Option<u64>, ConflictableTransactionError<Refusal>> {
    match tree.get(key)? {
        None => Ok(None),
        Some(bytes) => match <[u8; 8]>::try_from(bytes.as_ref()) {
            Ok(array) => Ok(Some(u64::from_be_bytes(array))),
            Err(_) => Err(ConflictableTransactionError::Abort(Refusal::Corrupt(
                format!(
                    "value of {:?} has {} bytes, expected 8",
                    String::from_utf8_lossy(key),
                    bytes.len()
                ),
            ))),
        },
    }
}

fn parse_command_entry(bytes: &[u8]) -> Option<(u64, u32)> {
    if bytes.len() != 12 {
        return None;
    }
    let first_seq = u64::from_be_bytes(bytes[..8].try_into().ok()?);
    let count = u32::from_be_bytes(bytes[8..].try_into().ok()?);
    Some((first_seq, count))
}

/// The page holding event `seq` (from 1).
fn page_of(seq: u64) -> u64 {
    (seq.max(1) - 1) / PAGE_EVENTS
}

/// One event record of a page.
struct Record<'a> {
    seq: u64,
    bytes: &'a [u8],
}

/// The records of a page, in order; an error says where the page is malformed.
struct Records<'a> {
    page: &'a [u8],
    offset: usize,
}

fn records(page: &[u8]) -> Records<'_> {
    Records { page, offset: 0 }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self
            .page
            .get(self.offset..)
            .filter(|rest| !rest.is_empty())?;
        let offset = self.offset;
        let Some((header, body)) = rest.split_at_checked(RECORD_HEADER) else {
            self.offset = self.page.len();
            return Some(Err(format!("truncated record header at byte {offset}")));
        };
        let seq = u64::from_be_bytes(header[..8].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(header[8..].try_into().unwrap_or_default()) as usize;
        let Some(bytes) = body.get(..len) else {
            self.offset = self.page.len();
            return Some(Err(format!(
                "record of event {seq} at byte {offset} claims {len} bytes, the page has {}",
                body.len()
            )));
        };
        self.offset += RECORD_HEADER + len;
        Some(Ok(Record { seq, bytes }))
    }
}

fn push_record(page: &mut Vec<u8>, seq: u64, bytes: &[u8]) {
    page.extend_from_slice(&seq.to_be_bytes());
    // An encoded event is far below 4 GiB (bus messages are at most a few MiB).
    page.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    page.extend_from_slice(bytes);
}

fn damaged(seq: u64, detail: impl Into<String>) -> Error {
    Error::Corrupt {
        seq,
        detail: detail.into(),
    }
}

/// The stored bytes of event `seq`, from its page (blocking).
fn event_bytes(events: &Tree, seq: u64) -> Result<Option<Vec<u8>>, Error> {
    let Some(page) = events
        .get(page_of(seq).to_be_bytes())
        .map_err(|err| storage("reading an event page", err))?
    else {
        return Ok(None);
    };
    for record in records(&page) {
        let record = record.map_err(|detail| damaged(seq, detail))?;
        if record.seq == seq {
            return Ok(Some(record.bytes.to_vec()));
        }
    }
    Ok(None)
}

impl SledLog {
    /// Opens (or creates) the log. Blocking: call it at startup or from `spawn_blocking`.
    ///
    /// Fails with [`Error::CorruptTail`] if the last event is damaged (see the module docs).
    pub fn open(config: SledLogConfig) -> Result<Self, Error> {
        Self::open_with(config, false)
    }

    /// Opens the log to audit it (`cairn audit verify --log`): it writes nothing, not even the
    /// layout entry of an empty database, and does not check the tail, so that a damaged log
    /// can be examined. Appending to a log opened this way is a bug; call only the reads,
    /// [`EventLog::verify_chain`] and [`EventLog::extend_digest`].
    pub fn open_for_audit(config: SledLogConfig) -> Result<Self, Error> {
        Self::open_with(config, true)
    }

    fn open_with(config: SledLogConfig, audit_only: bool) -> Result<Self, Error> {
        let path_text = config.path.display().to_string();
        let sled_config = ::sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_capacity_bytes);
        // sled releases its file lock only when its background writer threads let go of the
        // files, a moment after the last handle is dropped: a log closed and reopened in one
        // process (tests, `cairn audit verify` after a stop) may find it still held.
        let started = std::time::Instant::now();
        let db = loop {
            match sled_config.open() {
                Ok(db) => break db,
                Err(::sled::Error::Io(err))
                    if err.to_string().contains("could not acquire lock")
                        && started.elapsed() < LOCK_WAIT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(err) => {
                    return Err(storage(
                        format!("opening {path_text} (is another cairn process using it?)"),
                        err,
                    ));
                }
            }
        };
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|err| storage(format!("opening tree {name} of {path_text}"), err))
        };
        let (events, aggregates, heads, commands, meta) = (
            tree("events")?,
            tree("aggregates")?,
            tree("heads")?,
            tree("commands")?,
            tree("meta")?,
        );
        match meta
            .get(META_LAYOUT)
            .map_err(|err| storage("reading meta", err))?
        {
            Some(layout) if layout.as_ref() == LAYOUT => {}
            Some(layout) => {
                return Err(Error::Storage {
                    context: format!("opening {path_text}"),
                    source: format!(
                        "unknown layout {:?}, this build reads {:?}",
                        String::from_utf8_lossy(&layout),
                        String::from_utf8_lossy(LAYOUT)
                    )
                    .into(),
                });
            }
            None if audit_only => {}
            None => {
                if !events.is_empty() {
                    return Err(Error::CorruptTail {
                        path: path_text,
                        seq: 0,
                        detail: "events exist but the meta tree has no layout entry".into(),
                    });
                }
                meta.insert(META_LAYOUT, LAYOUT)
                    .map_err(|err| storage("writing meta", err))?;
            }
        }

        let mut keyed_from = meta
            .get(META_KEYED_FROM)
            .map_err(|err| storage("reading meta", err))?
            .map(|bytes| be_u64(&bytes, "meta keyed_from"))
            .transpose()?;
        let key = config.audit_key.clone();
        let last_seq = if audit_only {
            meta_last_seq(&meta)?
        } else {
            if let (Some(from), None) = (keyed_from, &key) {
                return Err(Error::AuditKeyRequired {
                    path: path_text,
                    keyed_from: from,
                });
            }
            let last_seq = check_tail(&path_text, &events, &meta, key.as_ref(), keyed_from)?;
            if let (Some(key), None) = (&key, keyed_from) {
                // From now on every link is keyed: record where that starts and re-link the
                // tip (the link the next event will hold) with the key, in one batch.
                let from = last_seq + 1;
                let mut batch = ::sled::Batch::default();
                batch.insert(META_KEYED_FROM, &from.to_be_bytes());
                if last_seq > 0 {
                    let bytes = event_bytes(&events, last_seq)?
                        .ok_or_else(|| damaged(last_seq, "the last event is missing"))?;
                    batch.insert(META_LAST_HASH, &link_hash(Some(key), &bytes));
                }
                meta.apply_batch(batch)
                    .map_err(|err| storage("recording where the keyed chain starts", err))?;
                db.flush()
                    .map_err(|err| storage("recording where the keyed chain starts", err))?;
                if last_seq > 0 {
                    tracing::warn!(log = %path_text, keyed_from = from, "event log: the hash chain is keyed with the audit key from now on; the links of the events before are plain BLAKE3");
                }
                keyed_from = Some(from);
            }
            last_seq
        };
        let (durable, _) = watch::channel(last_seq);
        Ok(Self {
            inner: Arc::new(Inner {
                path: config.path,
                db,
                events,
                aggregates,
                heads,
                commands,
                meta,
                commit: Mutex::new(()),
                committed_seq: AtomicU64::new(last_seq),
                flush: Mutex::new(()),
                durable,
                n_appends: AtomicU64::new(0),
                n_flushes: AtomicU64::new(0),
                key,
                keyed_from,
            }),
        })
    }

    /// Where the log lives.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Counters since open.
    pub fn stats(&self) -> SledLogStats {
        SledLogStats {
            n_appends: self.inner.n_appends.load(Ordering::Relaxed),
            n_flushes: self.inner.n_flushes.load(Ordering::Relaxed),
        }
    }

    /// Runs blocking sled work on tokio's blocking pool; a panic there is re-raised here.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let inner = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || work(&inner)).await {
            Ok(result) => result,
            Err(err) => match err.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(err) => Err(Error::Storage {
                    context: "running a blocking task".into(),
                    source: Box::new(err),
                }),
            },
        }
    }

    /// The sled tree of event pages, for tests that damage it on purpose.
    #[cfg(test)]
    pub(crate) fn events_tree(&self) -> &Tree {
        &self.inner.events
    }

    /// Rewrites the records of the page holding `seq` as a test (or an attacker) would:
    /// `edit` gets `(seq, bytes)` of every record in the page.
    #[cfg(test)]
    pub(crate) fn edit_page(&self, seq: u64, edit: impl FnOnce(&mut Vec<(u64, Vec<u8>)>)) {
        let key = page_of(seq).to_be_bytes();
        let page = self.inner.events.get(key).unwrap().unwrap();
        let mut list: Vec<(u64, Vec<u8>)> = records(&page)
            .map(|record| record.map(|r| (r.seq, r.bytes.to_vec())).unwrap())
            .collect();
        edit(&mut list);
        let mut rebuilt = Vec::new();
        for (seq, bytes) in &list {
            push_record(&mut rebuilt, *seq, bytes);
        }
        self.inner.events.insert(key, rebuilt).unwrap();
    }
}

#[cfg(test)]
impl SledLog {
    /// Rewrites the whole log as an attacker who can write the database would: every event
    /// through `edit`, every link recomputed with `key` (plain BLAKE3 without one), and the
    /// chain tip in `meta` to match. `keyed_from` is left as it is.
    pub(crate) fn rewrite_all(
        &self,
        key: Option<&AuditKey>,
        mut edit: impl FnMut(u64, &mut Envelope),
    ) {
        let inner = &self.inner;
        let mut prev = [0u8; 32];
        let pages: Vec<(::sled::IVec, ::sled::IVec)> =
            inner.events.iter().map(|item| item.unwrap()).collect();
        for (page_key, page) in pages {
            let mut rebuilt = Vec::new();
            for record in records(&page) {
                let record = record.unwrap();
                let mut envelope: Envelope = cairn_schemas::decode(record.bytes).unwrap();
                edit(record.seq, &mut envelope);
                envelope.prev_hash = prev;
                let bytes = cairn_schemas::encode(&envelope);
                prev = link_hash(key, &bytes);
                push_record(&mut rebuilt, record.seq, &bytes);
            }
            inner.events.insert(page_key, rebuilt).unwrap();
        }
        inner.meta.insert(META_LAST_HASH, &prev).unwrap();
        inner.db.flush().unwrap();
    }
}

/// The last durable sequence recorded in the meta tree (0 for an empty log).
fn meta_last_seq(meta: &Tree) -> Result<u64, Error> {
    meta.get(META_LAST_SEQ)
        .map_err(|err| storage("reading meta", err))?
        .map(|bytes| be_u64(&bytes, "meta last_seq"))
        .transpose()
        .map(|seq| seq.unwrap_or(0))
}

/// Checks the last event on open; returns the last sequence number.
fn check_tail(
    path: &str,
    events: &Tree,
    meta: &Tree,
    key: Option<&AuditKey>,
    keyed_from: Option<u64>,
) -> Result<u64, Error> {
    let corrupt = |seq, detail: String| Error::CorruptTail {
        path: path.to_owned(),
        seq,
        detail,
    };
    let meta_last = meta_last_seq(meta)?;
    let last_page = events
        .last()
        .map_err(|err| storage("reading the last event page", err))?;
    let (page_no, page) = match last_page {
        None if meta_last == 0 => return Ok(0),
        None => {
            return Err(corrupt(
                meta_last,
                format!("the log records {meta_last} events but holds none"),
            ));
        }
        Some((key, page)) => (be_u64(&key, "an event page key")?, page),
    };
    let mut page_records = Vec::new();
    for record in records(&page) {
        page_records.push(record.map_err(|detail| {
            corrupt(
                meta_last,
                format!("its page {page_no} is malformed: {detail}"),
            )
        })?);
    }
    let Some(last) = page_records.last() else {
        return Err(corrupt(meta_last, format!("its page {page_no} is empty")));
    };
    if last.seq != meta_last || page_of(last.seq) != page_no {
        return Err(corrupt(
            last.seq.max(meta_last),
            format!(
                "the last stored event is {} (in page {page_no}) but the log records {meta_last}",
                last.seq
            ),
        ));
    }
    let seq = last.seq;
    let envelope = cairn_schemas::decode(last.bytes)
        .map_err(|err| corrupt(seq, format!("it does not decode: {err}")))?;
    let tip = meta
        .get(META_LAST_HASH)
        .map_err(|err| storage("reading meta", err))?;
    if tip.as_deref() != Some(link(key, keyed_from, seq + 1, last.bytes).as_slice()) {
        let why = if link_is_keyed(keyed_from, seq + 1) {
            "its bytes do not match the keyed chain tip recorded in meta (changed after it was \
             stored, rewritten without the audit key, or the audit key is not this log's)"
        } else {
            "its bytes do not hash to the chain tip recorded in meta (changed after it was stored)"
        };
        return Err(corrupt(seq, why.into()));
    }
    let expected_prev = if seq == 1 {
        [0u8; 32]
    } else {
        let prev_bytes = match page_records.len().checked_sub(2) {
            Some(idx) if page_records[idx].seq == seq - 1 => Some(page_records[idx].bytes.to_vec()),
            _ => event_bytes(events, seq - 1).map_err(|err| corrupt(seq - 1, err.to_string()))?,
        };
        match prev_bytes {
            Some(prev) => link(key, keyed_from, seq, &prev),
            None => {
                return Err(corrupt(
                    seq - 1,
                    "the event before the last one is missing".into(),
                ));
            }
        }
    };
    if envelope.prev_hash != expected_prev {
        return Err(corrupt(
            seq,
            format!(
                "its prev_hash does not match event {} (one of the two was changed)",
                seq - 1
            ),
        ));
    }
    Ok(seq)
}

impl Inner {
    /// Commits one append (blocking). The caller waits for durability afterwards.
    fn commit(&self, request: AppendRequest) -> Result<Committed, Error> {
        // A poisoned lock only means another appender panicked; the state it guards is in
        // sled, which the transaction below checks again, so carry on.
        let _guard = self
            .commit
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let agg_key = aggregate_key(&request.aggregate);

        // Outside the transaction (we hold the commit lock, so nothing changes meanwhile):
        // the quick refusals, then the events with their final places and hashes, so the
        // transaction below only checks and writes.
        if let Some(command) = request.command
            && let Some(entry) = self
                .commands
                .get(command.as_bytes())
                .map_err(|err| storage("reading the command index", err))?
        {
            let (first_seq, count) = parse_command_entry(&entry).ok_or_else(|| Error::Storage {
                context: format!("reading the command index entry of {command}"),
                source: "malformed entry".into(),
            })?;
            return Ok(Committed::Duplicate { first_seq, count });
        }
        let actual = self
            .heads
            .get(&agg_key)
            .map_err(|err| storage("reading the aggregate head", err))?
            .map(|bytes| be_u64(&bytes, "an aggregate head"))
            .transpose()?
            .unwrap_or(0);
        if actual != request.expected_version {
            return Err(Error::Conflict {
                aggregate: request.aggregate,
                expected: request.expected_version,
                actual,
            });
        }
        let last_seq = meta_last_seq(&self.meta)?;
        let mut prev_hash = [0u8; 32];
        if let Some(tip) = self
            .meta
            .get(META_LAST_HASH)
            .map_err(|err| storage("reading meta", err))?
        {
            prev_hash.copy_from_slice(tip.as_ref().get(..32).unwrap_or(&[0; 32]));
        }

        let n_events = request.events.len();
        let first_seq = last_seq + 1;
        // The new events go at the end of the last page if it has room, then into new pages.
        let mut page_no = page_of(first_seq);
        let mut page = if (first_seq - 1) % PAGE_EVENTS == 0 {
            Vec::new()
        } else {
            self.events
                .get(page_no.to_be_bytes())
                .map_err(|err| storage("reading the last event page", err))?
                .ok_or_else(|| damaged(last_seq, "the page of the last event is missing"))?
                .to_vec()
        };
        let mut pages = Vec::with_capacity(1 + n_events / PAGE_EVENTS as usize);
        let mut index_rows = Vec::with_capacity(n_events);
        let mut stored = Vec::with_capacity(n_events);
        for (idx, event) in request.events.into_iter().enumerate() {
            let seq = first_seq + idx as u64;
            let version = request.expected_version + 1 + idx as u64;
            let envelope = Envelope {
                event_id: event.event_id,
                aggregate: request.aggregate.clone(),
                aggregate_version: version,
                recorded_at: request.recorded_at,
                actor: event.actor,
                correlation: event.correlation,
                causation: event.causation,
                command: request.command,
                traceparent: event.traceparent,
                prev_hash,
                payload: event.payload,
            };
            let bytes = cairn_schemas::encode(&envelope);
            // Every link this process writes is keyed when it has the key: open made sure
            // that `keyed_from` is at most the next sequence number.
            prev_hash = link_hash(self.key.as_ref(), &bytes);
            if page_of(seq) != page_no {
                pages.push((page_no, std::mem::take(&mut page)));
                page_no = page_of(seq);
            }
            push_record(&mut page, seq, &bytes);
            let mut index_key = agg_key.clone();
            index_key.extend_from_slice(&version.to_be_bytes());
            index_rows.push((index_key, seq.to_be_bytes()));
            stored.push(StoredEvent { seq, envelope });
        }
        pages.push((page_no, page));
        let last_new_seq = first_seq + n_events as u64 - 1;
        let new_version = request.expected_version + n_events as u64;
        let command_entry = request.command.map(|command| {
            let mut entry = Vec::with_capacity(12);
            entry.extend_from_slice(&first_seq.to_be_bytes());
            // An append never holds anywhere near 4 billion events.
            entry.extend_from_slice(&(n_events as u32).to_be_bytes());
            (command, entry)
        });

        let outcome = (
            &self.events,
            &self.aggregates,
            &self.heads,
            &self.commands,
            &self.meta,
        )
            .transaction(|(events, aggregates, heads, commands, meta)| {
                // Check again what was read above, so that the transaction alone guarantees
                // that exactly one of two appends with the same expected version wins.
                if let Some((command, _)) = &command_entry
                    && let Some(entry) = commands.get(command.as_bytes())?
                {
                    let (first_seq, count) = parse_command_entry(&entry).ok_or_else(|| {
                        ConflictableTransactionError::Abort(Refusal::Corrupt(format!(
                            "malformed command index entry of {command}"
                        )))
                    })?;
                    return Err(ConflictableTransactionError::Abort(Refusal::Duplicate {
                        first_seq,
                        count,
                    }));
                }
                let head = tx_u64(heads, &agg_key)?.unwrap_or(0);
                if head != request.expected_version {
                    return Err(ConflictableTransactionError::Abort(Refusal::Conflict {
                        actual: head,
                    }));
                }
                if tx_u64(meta, META_LAST_SEQ)?.unwrap_or(0) != last_seq {
                    return Err(ConflictableTransactionError::Abort(Refusal::TipMoved));
                }
                for (page_no, page) in &pages {
                    events.insert(&page_no.to_be_bytes(), page.as_slice())?;
                }
                for (index_key, seq_key) in &index_rows {
                    aggregates.insert(index_key.as_slice(), seq_key.as_slice())?;
                }
                heads.insert(agg_key.as_slice(), &new_version.to_be_bytes())?;
                meta.insert(META_LAST_SEQ, &last_new_seq.to_be_bytes())?;
                meta.insert(META_LAST_HASH, &prev_hash)?;
                if let Some((command, entry)) = &command_entry {
                    commands.insert(command.as_bytes(), entry.as_slice())?;
                }
                Ok(())
            });
        match outcome {
            Ok(()) => {
                self.committed_seq.fetch_max(last_new_seq, Ordering::SeqCst);
                self.n_appends.fetch_add(1, Ordering::Relaxed);
                Ok(Committed::Appended(stored))
            }
            Err(TransactionError::Storage(err)) => Err(storage("committing an append", err)),
            Err(TransactionError::Abort(refusal)) => match refusal {
                Refusal::Conflict { actual } => Err(Error::Conflict {
                    aggregate: request.aggregate,
                    expected: request.expected_version,
                    actual,
                }),
                Refusal::Duplicate { first_seq, count } => {
                    Ok(Committed::Duplicate { first_seq, count })
                }
                Refusal::TipMoved => Err(Error::Storage {
                    context: "committing an append".into(),
                    source: "the log's last sequence moved under the commit lock: is another \
                             process writing to this database?"
                        .into(),
                }),
                Refusal::Corrupt(detail) => Err(damaged(last_new_seq, detail)),
            },
        }
    }

    /// The events of an earlier append of `command`, once durable (blocking).
    fn processed(&self, command: CommandId) -> Result<Option<Vec<StoredEvent>>, Error> {
        let Some(entry) = self
            .commands
            .get(command.as_bytes())
            .map_err(|err| storage("reading the command index", err))?
        else {
            return Ok(None);
        };
        let (first_seq, count) = parse_command_entry(&entry).ok_or_else(|| Error::Storage {
            context: format!("reading the command index entry of {command}"),
            source: "malformed entry".into(),
        })?;
        let last = first_seq + u64::from(count) - 1;
        self.wait_durable(last)?;
        self.read_range(first_seq, last, count as usize).map(Some)
    }

    /// Commits, then waits until the events are durable (blocking).
    fn append(&self, request: AppendRequest) -> Result<Vec<StoredEvent>, Error> {
        let stored = match self.commit(request)? {
            Committed::Appended(stored) => stored,
            Committed::Duplicate { first_seq, count } => {
                let last = first_seq + u64::from(count) - 1;
                // read_range fails if any of them is missing.
                self.read_range(first_seq, last, count as usize)?
            }
        };
        // The first append of a repeated command may still be flushing: wait for it too.
        if let Some(last) = stored.last() {
            self.wait_durable(last.seq)?;
        }
        Ok(stored)
    }

    /// Returns once every event up to `seq` is durable, flushing if nobody else is (blocking).
    fn wait_durable(&self, seq: u64) -> Result<(), Error> {
        if *self.durable.borrow() >= seq {
            return Ok(());
        }
        // Poisoning only means a flusher panicked; the next flush is as good as any.
        let _flushing = self
            .flush
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // The flush we waited for may have covered us.
        if *self.durable.borrow() >= seq {
            return Ok(());
        }
        // Everything committed so far is in sled's buffers, and the flush writes and fsyncs
        // all of it; read the mark before flushing so that it never claims more.
        let covered = self.committed_seq.load(Ordering::SeqCst);
        self.db
            .flush()
            .map_err(|err| storage("flushing appended events to disk", err))?;
        self.n_flushes.fetch_add(1, Ordering::Relaxed);
        self.durable.send_if_modified(|durable| {
            let raised = covered > *durable;
            *durable = (*durable).max(covered);
            raised
        });
        Ok(())
    }

    /// Reads stored events `from..=to`, at most `limit` (blocking). Every one of them must
    /// exist: callers pass a `to` that is durable.
    fn read_range(&self, from: u64, to: u64, limit: usize) -> Result<Vec<StoredEvent>, Error> {
        let from = from.max(1);
        if from > to || limit == 0 {
            return Ok(Vec::new());
        }
        let wanted = limit.min(usize::try_from(to - from + 1).unwrap_or(usize::MAX));
        let mut out = Vec::with_capacity(wanted.min(64 * 1024));
        let mut expected_seq = from;
        'pages: for item in self
            .events
            .range(page_of(from).to_be_bytes()..=page_of(to).to_be_bytes())
        {
            let (_, page) = item.map_err(|err| storage("reading event pages", err))?;
            for record in records(&page) {
                let record = record.map_err(|detail| damaged(expected_seq, detail))?;
                if record.seq < expected_seq {
                    continue;
                }
                if record.seq != expected_seq {
                    break 'pages;
                }
                let envelope =
                    cairn_schemas::decode(record.bytes).map_err(|source| Error::Decode {
                        seq: record.seq,
                        source,
                    })?;
                out.push(StoredEvent {
                    seq: record.seq,
                    envelope,
                });
                expected_seq += 1;
                if out.len() == wanted {
                    return Ok(out);
                }
            }
        }
        Err(damaged(expected_seq, "the event is missing"))
    }

    /// Every durable event of one aggregate (blocking).
    fn read_aggregate(&self, aggregate: &Aggregate) -> Result<Vec<StoredEvent>, Error> {
        let durable = *self.durable.borrow();
        let mut out = Vec::new();
        // Events of one aggregate often share pages; keep the last page read.
        let mut page: Option<(u64, ::sled::IVec)> = None;
        for item in self.aggregates.scan_prefix(aggregate_key(aggregate)) {
            let (_, seq_bytes) = item.map_err(|err| storage("reading the aggregate index", err))?;
            let seq = be_u64(&seq_bytes, "an aggregate index entry")?;
            if seq > durable {
                // Versions grow with sequence numbers: the rest is not durable yet either.
                break;
            }
            let page_no = page_of(seq);
            if page.as_ref().is_none_or(|(cached, _)| *cached != page_no) {
                let bytes = self
                    .events
                    .get(page_no.to_be_bytes())
                    .map_err(|err| storage("reading an event page", err))?
                    .ok_or_else(|| {
                        damaged(
                            seq,
                            format!("the event is missing, but {aggregate} lists it"),
                        )
                    })?;
                page = Some((page_no, bytes));
            }
            let page_bytes = page
                .as_ref()
                .map(|(_, bytes)| bytes.as_ref())
                .unwrap_or_default();
            let mut found = None;
            for record in records(page_bytes) {
                let record = record.map_err(|detail| damaged(seq, detail))?;
                if record.seq == seq {
                    found = Some(record.bytes);
                    break;
                }
            }
            let bytes = found.ok_or_else(|| {
                damaged(
                    seq,
                    format!("the event is missing, but {aggregate} lists it"),
                )
            })?;
            let envelope =
                cairn_schemas::decode(bytes).map_err(|source| Error::Decode { seq, source })?;
            out.push(StoredEvent { seq, envelope });
        }
        Ok(out)
    }

    /// The hash chain walk of [`EventLog::verify_chain`] (blocking).
    ///
    /// Link `k` holds when event `k`'s `prev_hash` is the hash of event `k - 1`'s bytes
    /// (zeros for `k = 1`); link `n + 1` holds when the chain tip in `meta` is the hash of
    /// event `n`. Changing the bytes of one event `j` breaks link `j + 1`, and also link `j`
    /// when the change hits `j`'s own `prev_hash`. So at the first broken link `k`: if link
    /// `k + 1` holds, event `k - 1` was changed; otherwise event `k` was.
    fn verify_chain(&self) -> Result<u64, Error> {
        if let (Some(from), None) = (self.keyed_from, &self.key) {
            return Err(Error::AuditKeyRequired {
                path: self.path.display().to_string(),
                keyed_from: from,
            });
        }
        let (audit_key, keyed_from) = (self.key.as_ref(), self.keyed_from);
        let keyed_note = |k: u64| {
            if link_is_keyed(keyed_from, k) {
                " (a keyed link: the event was changed, the log rewritten without the audit \
                 key, or the key is not this log's)"
            } else {
                ""
            }
        };
        let anchor_seq = meta_last_seq(&self.meta)?;
        let anchor_hash = self
            .meta
            .get(META_LAST_HASH)
            .map_err(|err| storage("reading meta", err))?
            .map(|bytes| bytes.to_vec())
            .unwrap_or_else(|| vec![0; 32]);
        let changed = |seq: u64, event_id, detail: &str| Error::ChainBroken {
            seq,
            event_id,
            detail: detail.to_owned(),
        };
        if anchor_seq == 0 {
            if self.events.is_empty() {
                return Ok(0);
            }
            return Err(changed(1, None, "events exist but the log records none"));
        }

        // The first broken link: (k, id of event k - 1, id of event k).
        let mut first_broken: Option<(u64, Option<_>, Option<_>)> = None;
        let resolve = |(k, id_before, id_k): (u64, Option<_>, Option<_>), next_link_ok: bool| {
            if next_link_ok && k > 1 {
                changed(
                    k - 1,
                    id_before,
                    &format!(
                        "its bytes no longer hash to the prev_hash stored in event {k}{}",
                        keyed_note(k)
                    ),
                )
            } else {
                changed(
                    k,
                    id_k,
                    &format!(
                        "its prev_hash does not match the event before it, and its own hash \
                         does not match the event after it{}",
                        keyed_note(k)
                    ),
                )
            }
        };
        let mut prev_hash = [0u8; 32];
        let mut prev_id = None;
        let mut expected_seq = 1u64;
        // Events are immutable once stored (appends only add records to the last page), so
        // walking up to the tip read above is consistent while appends go on.
        'pages: for item in self.events.range(..=page_of(anchor_seq).to_be_bytes()) {
            let (key, page) = item.map_err(|err| storage("reading event pages", err))?;
            let page_no = be_u64(&key, "an event page key")?;
            for record in records(&page) {
                let record = match record {
                    Ok(record) => record,
                    Err(detail) => {
                        if let Some(broken) = first_broken {
                            return Err(resolve(broken, false));
                        }
                        return Err(changed(
                            expected_seq,
                            None,
                            &format!("its page {page_no} is malformed: {detail}"),
                        ));
                    }
                };
                if record.seq > anchor_seq {
                    break 'pages;
                }
                if record.seq != expected_seq || page_of(record.seq) != page_no {
                    if let Some(broken) = first_broken {
                        return Err(resolve(broken, false));
                    }
                    return Err(changed(expected_seq, None, "the event is missing"));
                }
                let decoded = cairn_schemas::decode(record.bytes);
                let link_ok = matches!(&decoded, Ok(envelope) if envelope.prev_hash == prev_hash);
                let event_id = decoded.as_ref().ok().map(|envelope| envelope.event_id);
                if let Some(broken) = first_broken {
                    return Err(resolve(broken, link_ok));
                }
                if let Err(err) = &decoded {
                    // Bytes that do not decode were certainly changed; nothing earlier was.
                    return Err(changed(
                        record.seq,
                        None,
                        &format!("it does not decode: {err}"),
                    ));
                }
                if !link_ok {
                    first_broken = Some((record.seq, prev_id, event_id));
                }
                prev_hash = link(audit_key, keyed_from, record.seq + 1, record.bytes);
                prev_id = event_id;
                expected_seq += 1;
            }
        }
        let n_events = expected_seq - 1;
        if n_events != anchor_seq {
            if let Some(broken) = first_broken {
                return Err(resolve(broken, false));
            }
            return Err(changed(expected_seq, None, "the event is missing"));
        }
        let anchor_ok = anchor_hash.as_slice() == prev_hash.as_slice();
        if let Some(broken) = first_broken {
            return Err(resolve(broken, anchor_ok));
        }
        if !anchor_ok {
            return Err(changed(
                n_events,
                prev_id,
                &format!(
                    "its bytes no longer hash to the chain tip recorded in meta{}",
                    keyed_note(n_events + 1)
                ),
            ));
        }
        Ok(n_events)
    }

    /// The running digest of [`EventLog::extend_digest`] (blocking).
    fn extend_digest(&self, from: RunningDigest, to_seq: u64) -> Result<RunningDigest, Error> {
        let to_seq = to_seq.min(*self.durable.borrow());
        let mut digest = from;
        if to_seq <= from.seq {
            return Ok(digest);
        }
        let first = from.seq + 1;
        for item in self
            .events
            .range(page_of(first).to_be_bytes()..=page_of(to_seq).to_be_bytes())
        {
            let (_, page) = item.map_err(|err| storage("reading event pages", err))?;
            for record in records(&page) {
                let record = record.map_err(|detail| damaged(digest.seq + 1, detail))?;
                if record.seq <= digest.seq {
                    continue;
                }
                if record.seq != digest.seq + 1 || record.seq > to_seq {
                    return Ok(digest);
                }
                digest.push_bytes(record.seq, record.bytes);
            }
        }
        Ok(digest)
    }
}

impl EventLog for SledLog {
    async fn append(&self, request: AppendRequest) -> Result<Vec<StoredEvent>, Error> {
        validate(&request)?;
        // Commit and flush on one blocking thread: every thread hop costs more than the
        // commit itself on small machines.
        self.blocking(move |inner| inner.append(request)).await
    }

    async fn processed(&self, command: CommandId) -> Result<Option<Vec<StoredEvent>>, Error> {
        self.blocking(move |inner| inner.processed(command)).await
    }

    async fn read_from(&self, from_seq: u64, limit: usize) -> Result<Vec<StoredEvent>, Error> {
        let durable = *self.inner.durable.borrow();
        let from_seq = from_seq.max(1);
        self.blocking(move |inner| inner.read_range(from_seq, durable, limit))
            .await
    }

    async fn read_aggregate(&self, aggregate: &Aggregate) -> Result<Vec<StoredEvent>, Error> {
        let aggregate = aggregate.clone();
        self.blocking(move |inner| inner.read_aggregate(&aggregate))
            .await
    }

    async fn last_seq(&self) -> Result<u64, Error> {
        Ok(*self.inner.durable.borrow())
    }

    fn tail(&self, from_seq: u64) -> Tail {
        Tail::new(Box::new(SledTail {
            inner: Arc::downgrade(&self.inner),
            durable: self.inner.durable.subscribe(),
            next_seq: from_seq.max(1),
        }))
    }

    async fn verify_chain(&self) -> Result<u64, Error> {
        self.blocking(|inner| inner.verify_chain()).await
    }

    fn keyed_from(&self) -> Option<u64> {
        self.inner.keyed_from
    }

    async fn extend_digest(
        &self,
        from: RunningDigest,
        to_seq: u64,
    ) -> Result<RunningDigest, Error> {
        self.blocking(move |inner| inner.extend_digest(from, to_seq))
            .await
    }
}

/// A tail of a [`SledLog`]: re-reads the log whenever the durable mark moves past what it has
/// returned. Holds only a `Weak` so it never keeps the database open.
struct SledTail {
    inner: Weak<Inner>,
    durable: watch::Receiver<u64>,
    /// The next sequence number to return.
    next_seq: u64,
}

impl TailSource for SledTail {
    fn next_batch(&mut self) -> NextBatch<'_> {
        Box::pin(async move {
            loop {
                // Mark the current value seen before reading, so an append that becomes
                // durable after this line wakes `changed()` below.
                let durable = *self.durable.borrow_and_update();
                if durable >= self.next_seq {
                    let Some(inner) = self.inner.upgrade() else {
                        return Ok(None);
                    };
                    let from = self.next_seq;
                    let batch = tokio::task::spawn_blocking(move || {
                        inner.read_range(from, durable, TAIL_BATCH)
                    })
                    .await
                    .map_err(|err| Error::Storage {
                        context: "reading events for a tail".into(),
                        source: Box::new(err),
                    })??;
                    if let Some(last) = batch.last() {
                        self.next_seq = last.seq + 1;
                        return Ok(Some(batch));
                    }
                    return Err(damaged(
                        from,
                        format!("the event is missing, but the log is durable up to {durable}"),
                    ));
                }
                if self.durable.changed().await.is_err() {
                    // The log was dropped.
                    return Ok(None);
                }
            }
        })
    }
}
