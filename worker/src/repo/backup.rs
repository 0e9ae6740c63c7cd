//! Backup of one disk image into its lineage: full, or incremental against the disk's latest
//! recovery point.
//!
//! The pipeline keeps every core busy with memory bounded independent of the disk's size:
//!
//! ```text
//! reader (1 thread)          workers (1 per core)              writer (1 thread)
//! extents + read 4 MiB   →   zero test, hash, compare with  →  reorder, append new blobs to
//! batches, parent refs       parent, compress, encrypt         packs, write index records
//! ```
//! Batches travel in bounded channels and their buffers come from a fixed pool, so at most a
//! few dozen MiB are in flight. A raw image is not read but mapped a batch at a time
//! ([`crate::source::mapped`]): the workers hash and compress the page cache's pages in place. Only chunks whose id differs from the parent's at the same
//! position are stored; chunks that an interrupted earlier backup already made durable (packs no
//! index references yet) are referenced instead of stored again. The new recovery point exists
//! once its index is published, after all its packs are durable.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender, bounded};
use serde::Serialize;

use super::crypto::{BlobEncoder, ChunkId, Keys};
use super::fsutil::{LockMode, remove_temp_files};
use super::index::{ChainReader, ChunkRef, IndexHeader, IndexWriter, PositionCursor, Record};
use super::lineage::{LockKind, Repository};
use super::pack::{self, PackEntry, PackWriter, TARGET_PACK_SIZE};
use super::{Error, Progress, is_zero};
use crate::source::mapped::MappedWindow;
use crate::source::{ExtentKind, Source};

/// What to back up and when.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub disk: String,
    /// The recovery point's time (unix milliseconds), from the caller's clock.
    pub now_ms: u64,
    /// Hashing/compression threads; 0 = one per core.
    pub threads: usize,
    /// The recovery point id to create (a job's step chooses it, so a retried step finds the
    /// recovery point its earlier attempt made instead of making a second one). `None` = new.
    pub rp: Option<String>,
    /// The recovery point that the source's [`ExtentKind::Unchanged`] extents are relative to
    /// (the snapshot that started its change-tracking bitmap). Trusted only when it is the
    /// parent this backup builds on; otherwise they are read like data (an express full).
    pub unchanged_since: Option<String>,
}

/// What a backup did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BackupSummary {
    pub rp: String,
    pub disk: String,
    pub parent: Option<String>,
    pub full_index: bool,
    pub disk_size: u64,
    /// Bytes read from the source (zero extents the source reported are not read).
    pub bytes_read: u64,
    /// Bytes added to the repository (compressed, encrypted).
    pub bytes_stored: u64,
    pub chunks_total: u64,
    pub chunks_zero: u64,
    pub chunks_unchanged: u64,
    pub chunks_new: u64,
    /// Chunks found durable from an interrupted earlier backup and not stored again.
    pub chunks_reused: u64,
    pub packs_written: u64,
    /// Whether the source's unchanged extents were trusted (only changed chunks were read).
    pub tracked: bool,
}

/// Bytes per batch handed between the pipeline's stages.
const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Extents are asked of the source this many bytes at a time.
const EXTENT_WINDOW: u64 = 1 << 30;

struct Batch {
    seq: u64,
    first_pos: u64,
    n: usize,
    data: BatchData,
    known_zero: Vec<bool>,
    /// Chunks the change tracking says are the parent's: not read, the parent's ref is kept.
    clean: Vec<bool>,
    parent: Vec<Option<ChunkRef>>,
}

/// The bytes of a batch: read into a buffer from the pool, or the source's own pages mapped.
enum BatchData {
    Read(Vec<u8>),
    Mapped(MappedWindow),
}

enum Outcome {
    Zero {
        parent_present: bool,
    },
    Unchanged(ChunkRef),
    Reused(u64, PackEntry),
    New {
        id: ChunkId,
        blob: Vec<u8>,
        raw_len: u32,
    },
}

struct Processed {
    seq: u64,
    first_pos: u64,
    bytes: u64,
    outcomes: Vec<Outcome>,
}

/// Backs up `source` as a new recovery point of `opts.disk`.
pub fn backup(
    repo: &Repository,
    source: &mut dyn Source,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupSummary, Error> {
    repo.ensure_lineage(&opts.disk)?;
    let _write_lock = repo.lock(&opts.disk, LockKind::Write, LockMode::Exclusive)?;
    let packs_dir = repo.packs_dir(&opts.disk);
    let rps_dir = repo.rps_dir(&opts.disk);
    remove_temp_files(&packs_dir)?;
    remove_temp_files(&rps_dir)?;

    let size = source.size();
    let chunk_size = repo.config.chunk_size as u64;
    let n_chunks = size.div_ceil(chunk_size);
    let catalog = repo.catalog(&opts.disk)?;
    if let Some(done) = opts.rp.as_deref().and_then(|rp| catalog.find(rp)) {
        tracing::info!(rp = %done.header.rp, disk = %opts.disk, "recovery point already committed; nothing to do");
        let h = &done.header;
        return Ok(BackupSummary {
            rp: h.rp.clone(),
            disk: opts.disk.clone(),
            parent: h.parent.clone(),
            full_index: h.full,
            disk_size: h.disk_size,
            bytes_read: h.bytes_read,
            bytes_stored: h.bytes_stored,
            chunks_total: h.n_chunks(),
            chunks_zero: 0,
            chunks_unchanged: 0,
            chunks_new: h.chunks_stored,
            chunks_reused: 0,
            packs_written: 0,
            tracked: h.parent.is_some() && h.bytes_read < h.disk_size,
        });
    }
    for (path, err) in &catalog.damaged {
        tracing::warn!(path = %path.display(), error = %err, "ignoring a damaged recovery point index");
    }

    // The parent: the latest recovery point whose chain is intact.
    let parent = catalog.latest().and_then(|latest| match repo.chain(&catalog, latest) {
        Ok(chain) => Some(chain),
        Err(err) => {
            tracing::warn!(rp = %latest.header.rp, error = %err, "parent chain unusable; storing a full backup");
            None
        }
    });
    let parent_header = parent.as_ref().map(|chain| chain[0].header.clone());
    let full_index = match &parent_header {
        None => true,
        Some(p) => p.disk_size != size || p.chain_depth + 1 >= repo.config.full_every,
    };
    let chain_depth = if full_index {
        0
    } else {
        parent_header.as_ref().map_or(0, |p| p.chain_depth + 1)
    };

    // Chunks made durable by an interrupted backup: packs that no index references.
    let referenced: HashSet<u64> = catalog
        .indexes
        .iter()
        .flat_map(|i| i.header.packs.iter().copied())
        .collect();
    let existing = pack::list_packs(&packs_dir)?;
    let mut reusable: HashMap<ChunkId, (u64, PackEntry)> = HashMap::new();
    for &seq in existing.iter().filter(|s| !referenced.contains(s)) {
        match pack::read_trailer(&pack::pack_path(&packs_dir, seq)) {
            Ok(entries) => reusable.extend(entries.into_iter().map(|e| (e.id, (seq, e)))),
            Err(err) => {
                tracing::warn!(pack = seq, error = %err, "skipping an unreadable unreferenced pack")
            }
        }
    }
    if !reusable.is_empty() {
        tracing::info!(
            chunks = reusable.len(),
            "reusing chunks of an interrupted backup"
        );
    }
    let damaged = load_damaged(&repo.disk_dir(&opts.disk));
    let next_pack = existing.last().map_or(0, |s| s + 1);

    let created_at_ms = opts
        .now_ms
        .max(parent_header.as_ref().map_or(0, |p| p.created_at_ms + 1));
    let rp = match &opts.rp {
        Some(rp) => {
            uuid::Uuid::parse_str(rp)
                .map_err(|e| Error::Invalid(format!("recovery point id {rp:?}: {e}")))?;
            rp.clone()
        }
        None => new_rp_id(created_at_ms),
    };
    let tracked = match (&opts.unchanged_since, &parent_header) {
        (Some(since), Some(p)) if *since == p.rp && p.disk_size == size => true,
        (Some(since), parent) => {
            tracing::warn!(
                disk = %opts.disk, tracked_since = %since, parent = ?parent.as_ref().map(|p| &p.rp),
                "change tracking is relative to another recovery point than the parent; reading everything"
            );
            false
        }
        (None, _) => false,
    };
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    let source_desc = source.describe();
    progress.start("backup", size);

    let chunks_per_batch = (BATCH_BYTES as u64 / chunk_size).max(1) as usize;
    let pool_size = threads * 2 + 2;
    let (pool_tx, pool_rx) = bounded::<Vec<u8>>(pool_size);
    for _ in 0..pool_size {
        pool_tx
            .send(vec![0u8; chunks_per_batch * chunk_size as usize])
            .expect("pool has room");
    }
    let (work_tx, work_rx) = bounded::<Batch>(threads * 2);
    let (done_tx, done_rx) = bounded::<Processed>(threads * 2);
    let parent_chain = match &parent {
        Some(chain) => Some(ChainReader::new(chain)?),
        None => None,
    };

    let ctx = WorkerCtx {
        keys: &repo.keys,
        zstd_level: repo.config.zstd_level,
        chunk_size,
        size,
        reusable: &reusable,
        damaged: &damaged,
        shrank: AtomicBool::new(false),
    };
    let writer_ctx = WriterCtx {
        packs_dir: &packs_dir,
        index_path: rps_dir.join(format!("{rp}.rpi")),
        keys: &repo.keys,
        full_index,
        n_chunks,
        next_pack,
        progress,
    };

    let (reader_result, writer_result) = std::thread::scope(|scope| {
        let damaged = &damaged;
        let reader_source = &mut *source;
        let reader = scope.spawn(move || {
            read_batches(
                reader_source,
                progress,
                parent_chain,
                ReadPlan {
                    chunk_size,
                    chunks_per_batch,
                    tracked,
                    damaged,
                },
                pool_rx,
                work_tx,
            )
        });
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            let pool_tx = pool_tx.clone();
            let ctx = &ctx;
            scope.spawn(move || process_batches(ctx, work_rx, done_tx, pool_tx));
        }
        // Only the workers may keep the pool and the queues alive: when they are gone the reader
        // and the writer must see closed channels, not wait forever.
        drop(pool_tx);
        drop(done_tx);
        drop(work_rx);
        let writer = scope.spawn(move || write_batches(writer_ctx, done_rx));
        (join(reader), join(writer))
    });
    let bytes_read = reader_result?;
    let written = writer_result?;
    source.recheck()?;
    if ctx.shrank.load(Ordering::Acquire) {
        return Err(Error::Invalid(format!(
            "{source_desc}: the image became shorter while the backup read it; nothing was \
             published"
        )));
    }

    let header = IndexHeader {
        rp: rp.clone(),
        disk: opts.disk.clone(),
        parent: parent_header.as_ref().map(|p| p.rp.clone()),
        full: full_index,
        created_at_ms,
        disk_size: size,
        chunk_size: repo.config.chunk_size,
        n_records: 0,
        chain_depth,
        source: source_desc,
        bytes_read,
        bytes_stored: written.bytes_stored,
        chunks_stored: written.chunks_new,
        packs: written.packs.iter().copied().collect(),
    };
    written.index.finish(header)?;
    progress.finish();
    let summary = BackupSummary {
        rp,
        disk: opts.disk.clone(),
        parent: parent_header.map(|p| p.rp),
        full_index,
        disk_size: size,
        bytes_read,
        bytes_stored: written.bytes_stored,
        chunks_total: n_chunks,
        chunks_zero: written.chunks_zero,
        chunks_unchanged: written.chunks_unchanged,
        chunks_new: written.chunks_new,
        chunks_reused: written.chunks_reused,
        packs_written: written.packs_written,
        tracked,
    };
    tracing::info!(
        rp = %summary.rp, disk = %summary.disk, bytes_read, bytes_stored = summary.bytes_stored,
        chunks_new = summary.chunks_new, full_index, "backup committed"
    );
    Ok(summary)
}

fn join<T>(handle: std::thread::ScopedJoinHandle<'_, Result<T, Error>>) -> Result<T, Error> {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// A recovery point id: a UUID v7 at `ms`.
pub(crate) fn new_rp_id(ms: u64) -> String {
    let ts =
        uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, ((ms % 1000) * 1_000_000) as u32);
    uuid::Uuid::new_v7(ts).hyphenated().to_string()
}

/// Chunk ids that the last verify found damaged: a backup stores these again even when the
/// parent has the same id at that position, which heals the lineage.
pub(crate) fn load_damaged(disk_dir: &Path) -> HashSet<ChunkId> {
    let path = disk_dir.join("damaged.json");
    let Ok(bytes) = std::fs::read(&path) else {
        return HashSet::new();
    };
    match serde_json::from_slice::<Vec<String>>(&bytes) {
        Ok(ids) => ids
            .iter()
            .filter_map(|h| {
                hex::decode(h)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
            })
            .collect(),
        Err(err) => {
            tracing::warn!(path = %path.display(), error = %err, "ignoring an unreadable damaged-chunk list");
            HashSet::new()
        }
    }
}

/// Answers "which parts of this range hold data" from the source's extents, asking the source
/// a window at a time.
pub(crate) struct ExtentCursor {
    extents: VecDeque<(u64, u64, ExtentKind)>,
    fetched_to: u64,
    size: u64,
}

impl ExtentCursor {
    pub(crate) fn new(size: u64) -> ExtentCursor {
        ExtentCursor {
            extents: VecDeque::new(),
            fetched_to: 0,
            size,
        }
    }

    /// The data ranges within `[start, end)` (unchanged extents count as data); calls must ask
    /// ascending, non-overlapping ranges.
    pub(crate) fn data_ranges(
        &mut self,
        source: &mut dyn Source,
        start: u64,
        end: u64,
    ) -> Result<Vec<(u64, u64)>, Error> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (a, b, kind) in self.extents_between(source, start, end)? {
            if kind != ExtentKind::Zero {
                match ranges.last_mut() {
                    Some((_, last_end)) if *last_end == a => *last_end = b,
                    _ => ranges.push((a, b)),
                }
            }
        }
        Ok(ranges)
    }

    /// The extents within `[start, end)`, clipped to it, covering it exactly; calls must ask
    /// ascending, non-overlapping ranges.
    pub(crate) fn extents_between(
        &mut self,
        source: &mut dyn Source,
        start: u64,
        end: u64,
    ) -> Result<Vec<(u64, u64, ExtentKind)>, Error> {
        while self.fetched_to < end {
            let window = EXTENT_WINDOW.min(self.size - self.fetched_to);
            let extents = source.extents(self.fetched_to, window)?;
            let mut at = self.fetched_to;
            for e in extents {
                // Be lenient with sources: clip to what was asked and fill gaps as data.
                let e_start = e.offset.max(at);
                let e_end = (e.offset + e.len).min(self.fetched_to + window);
                if e_start > at {
                    self.extents.push_back((at, e_start, ExtentKind::Data));
                }
                if e_end > e_start {
                    self.extents.push_back((e_start, e_end, e.kind));
                    at = e_end;
                }
            }
            if at < self.fetched_to + window {
                self.extents
                    .push_back((at, self.fetched_to + window, ExtentKind::Data));
            }
            self.fetched_to += window;
        }
        let mut ranges = Vec::new();
        while let Some(&(e_start, e_end, kind)) = self.extents.front() {
            if e_start >= end {
                break;
            }
            let (a, b) = (e_start.max(start), e_end.min(end));
            if b > a {
                ranges.push((a, b, kind));
            }
            if e_end <= end {
                self.extents.pop_front();
            } else {
                break;
            }
        }
        Ok(ranges)
    }
}

/// How the reader cuts and reads the source.
struct ReadPlan<'a> {
    chunk_size: u64,
    chunks_per_batch: usize,
    /// Trust the source's unchanged extents (they are relative to the parent).
    tracked: bool,
    /// Chunks a verify found damaged: always read, never taken from the parent unread.
    damaged: &'a HashSet<ChunkId>,
}

/// The reader stage: returns the number of bytes read from the source.
fn read_batches(
    source: &mut dyn Source,
    progress: &dyn Progress,
    parent: Option<ChainReader>,
    plan: ReadPlan<'_>,
    pool: Receiver<Vec<u8>>,
    work: Sender<Batch>,
) -> Result<u64, Error> {
    let ReadPlan {
        chunk_size,
        chunks_per_batch,
        tracked,
        damaged,
    } = plan;
    let size = source.size();
    let n_chunks = size.div_ceil(chunk_size);
    let mut parent = PositionCursor::new(parent);
    let mut extents = ExtentCursor::new(size);
    let mut bytes_read = 0u64;
    let mut first_pos = 0u64;
    let mut seq = 0u64;
    while first_pos < n_chunks {
        // Stopping here, before the batch is read, leaves the writer short of chunks: it
        // publishes nothing, and what it already made durable is reused by the next backup.
        if progress.cancelled() {
            return Err(Error::Cancelled {
                operation: "backup",
            });
        }
        let n = (chunks_per_batch as u64).min(n_chunks - first_pos) as usize;
        let start = first_pos * chunk_size;
        let end = ((first_pos + n as u64) * chunk_size).min(size);
        let mut parent_refs = Vec::with_capacity(n);
        for i in 0..n as u64 {
            parent_refs.push(parent.at(first_pos + i)?);
        }
        let kinds = extents.extents_between(source, start, end)?;
        // A chunk is clean when change tracking is trusted, every byte of it is unchanged, and
        // the parent's chunk there is not known to be damaged.
        let mut clean = vec![tracked; n];
        if tracked {
            for &(a, b, kind) in &kinds {
                if kind != ExtentKind::Unchanged {
                    let first = ((a - start) / chunk_size) as usize;
                    let last = ((b - 1 - start) / chunk_size) as usize;
                    clean[first..=last].fill(false);
                }
            }
            for (i, parent_ref) in parent_refs.iter().enumerate() {
                if parent_ref
                    .as_ref()
                    .and_then(ChunkRef::id)
                    .is_some_and(|id| damaged.contains(id))
                {
                    clean[i] = false;
                }
            }
        }
        // What must be read: data everywhere, unchanged ranges of chunks that are not clean.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for &(a, b, kind) in &kinds {
            let mut pieces = Vec::new();
            match kind {
                ExtentKind::Zero => {}
                ExtentKind::Data => pieces.push((a, b)),
                ExtentKind::Unchanged => {
                    let mut at = a;
                    while at < b {
                        let i = ((at - start) / chunk_size) as usize;
                        let chunk_end = (start + (i as u64 + 1) * chunk_size).min(b);
                        if !clean[i] {
                            pieces.push((at, chunk_end));
                        }
                        at = chunk_end;
                    }
                }
            }
            for (a, b) in pieces {
                match ranges.last_mut() {
                    Some((_, last_end)) if *last_end == a => *last_end = b,
                    _ => ranges.push((a, b)),
                }
            }
        }
        // A chunk none of whose bytes is read is zero: the workers take it as such unlooked.
        let mut known_zero = vec![true; n];
        for &(a, b) in &ranges {
            let first = ((a - start) / chunk_size) as usize;
            let last = ((b - 1 - start) / chunk_size) as usize;
            known_zero[first..=last].fill(false);
        }
        // A raw image is mapped rather than read: the workers hash and compress the page
        // cache's own pages, and no byte is copied. Anything else is read into a pool buffer.
        let mapped = if ranges.is_empty() {
            None
        } else {
            source.map_window(start, end - start)
        };
        let data = match mapped {
            Some(window) => {
                bytes_read += ranges.iter().map(|&(a, b)| b - a).sum::<u64>();
                BatchData::Mapped(window)
            }
            None => {
                let Ok(mut buf) = pool.recv() else {
                    return Ok(bytes_read);
                };
                // Zero-fill the unread bytes of chunks that are partly read (buffers are reused). Clean
                // and known-zero chunks are skipped: no stage looks at their bytes, and filling them
                // would spend a full backup's time on the disk's holes in memset.
                let zero_unread = |buf: &mut [u8], from: u64, to: u64| {
                    let mut at = from;
                    while at < to {
                        let i = ((at - start) / chunk_size) as usize;
                        let chunk_end = (start + (i as u64 + 1) * chunk_size).min(to);
                        if !clean[i] && !known_zero[i] {
                            buf[(at - start) as usize..(chunk_end - start) as usize].fill(0);
                        }
                        at = chunk_end;
                    }
                };
                let mut filled_to = start;
                for &(a, b) in &ranges {
                    zero_unread(&mut buf, filled_to, a);
                    source.read_at(a, &mut buf[(a - start) as usize..(b - start) as usize])?;
                    bytes_read += b - a;
                    filled_to = b;
                }
                zero_unread(&mut buf, filled_to, end);
                BatchData::Read(buf)
            }
        };
        let batch = Batch {
            seq,
            first_pos,
            n,
            data,
            known_zero,
            clean,
            parent: parent_refs,
        };
        if work.send(batch).is_err() {
            // The writer stopped; its error is the one to report.
            return Ok(bytes_read);
        }
        first_pos += n as u64;
        seq += 1;
    }
    Ok(bytes_read)
}

struct WorkerCtx<'a> {
    keys: &'a Keys,
    zstd_level: i32,
    chunk_size: u64,
    size: u64,
    reusable: &'a HashMap<ChunkId, (u64, PackEntry)>,
    damaged: &'a HashSet<ChunkId>,
    /// Set when a mapped image turned out shorter than it was (truncated during the backup).
    shrank: AtomicBool,
}

/// The worker stage: classify each chunk and encode the new ones.
fn process_batches(
    ctx: &WorkerCtx<'_>,
    work: Receiver<Batch>,
    done: Sender<Processed>,
    pool: Sender<Vec<u8>>,
) {
    let mut encoder = BlobEncoder::new(ctx.zstd_level);
    for batch in work {
        let mut outcomes = Vec::with_capacity(batch.n);
        let mut bytes = 0u64;
        for i in 0..batch.n {
            let pos = batch.first_pos + i as u64;
            let start = pos * ctx.chunk_size;
            let raw_len = (ctx.size - start).min(ctx.chunk_size) as usize;
            bytes += raw_len as u64;
            let offset = i * ctx.chunk_size as usize;
            let bytes: &[u8] = match &batch.data {
                BatchData::Read(buf) => buf,
                BatchData::Mapped(window) => window,
            };
            let data = &bytes[offset..offset + raw_len];
            let parent = batch.parent[i];
            if batch.clean[i] {
                outcomes.push(match parent {
                    Some(chunk) => Outcome::Unchanged(chunk),
                    // Zero in the parent and unchanged since: nothing to record.
                    None => Outcome::Zero {
                        parent_present: false,
                    },
                });
                continue;
            }
            if batch.known_zero[i] || is_zero(data) {
                outcomes.push(Outcome::Zero {
                    parent_present: parent.is_some(),
                });
                continue;
            }
            let id = ctx.keys.chunk_id(data);
            if let Some(
                parent @ ChunkRef::Stored {
                    id: parent_id,
                    raw_len: parent_len,
                    ..
                },
            ) = parent
                && parent_id == id
                && parent_len as usize == raw_len
                && !ctx.damaged.contains(&id)
            {
                outcomes.push(Outcome::Unchanged(parent));
                continue;
            }
            if let Some(&(seq, entry)) = ctx.reusable.get(&id)
                && entry.raw_len as usize == raw_len
            {
                outcomes.push(Outcome::Reused(seq, entry));
                continue;
            }
            let mut blob = Vec::new();
            ctx.keys.encode_blob(&id, data, &mut encoder, &mut blob);
            outcomes.push(Outcome::New {
                id,
                blob,
                raw_len: raw_len as u32,
            });
        }
        match batch.data {
            BatchData::Read(buf) => {
                let _ = pool.send(buf);
            }
            BatchData::Mapped(window) => {
                if window.shrank() {
                    ctx.shrank.store(true, Ordering::Release);
                }
            }
        }
        if done
            .send(Processed {
                seq: batch.seq,
                first_pos: batch.first_pos,
                bytes,
                outcomes,
            })
            .is_err()
        {
            return;
        }
    }
}

struct WriterCtx<'a> {
    packs_dir: &'a Path,
    index_path: std::path::PathBuf,
    keys: &'a Keys,
    full_index: bool,
    n_chunks: u64,
    next_pack: u64,
    progress: &'a dyn Progress,
}

struct Written {
    index: IndexWriter,
    packs: BTreeSet<u64>,
    bytes_stored: u64,
    chunks_zero: u64,
    chunks_unchanged: u64,
    chunks_new: u64,
    chunks_reused: u64,
    packs_written: u64,
}

/// The writer stage: put batches back in order, append new blobs to packs, write the index.
/// Returns the unfinished index (to be published once the caller has the header) after every
/// pack it references is durable.
fn write_batches(ctx: WriterCtx<'_>, done: Receiver<Processed>) -> Result<Written, Error> {
    // Full packs are sealed (fsync, rename) on a thread of their own, so the disk flushes one
    // pack while the next fills. The index is published only after the sealer has finished.
    let (seal_tx, seal_rx) = bounded::<PackWriter>(2);
    std::thread::scope(|scope| {
        let sealer = scope.spawn(move || {
            for pack in seal_rx {
                pack.finish()?;
            }
            Ok::<(), Error>(())
        });
        let written = fill_packs(ctx, done, &seal_tx);
        drop(seal_tx);
        let sealed = join(sealer);
        let written = written?;
        sealed?;
        Ok(written)
    })
}

fn fill_packs(
    ctx: WriterCtx<'_>,
    done: Receiver<Processed>,
    seal: &Sender<PackWriter>,
) -> Result<Written, Error> {
    let sealer_gone = || Error::Invalid("the pack sealer stopped".into());
    let mut out = Written {
        index: IndexWriter::create(&ctx.index_path, ctx.keys)?,
        packs: BTreeSet::new(),
        bytes_stored: 0,
        chunks_zero: 0,
        chunks_unchanged: 0,
        chunks_new: 0,
        chunks_reused: 0,
        packs_written: 0,
    };
    let mut next_pack = ctx.next_pack;
    let mut pack: Option<PackWriter> = None;
    let mut pending: BTreeMap<u64, Processed> = BTreeMap::new();
    let mut next_seq = 0u64;
    let mut next_pos = 0u64;
    for processed in done {
        pending.insert(processed.seq, processed);
        while let Some(batch) = pending.remove(&next_seq) {
            for (i, outcome) in batch.outcomes.into_iter().enumerate() {
                let pos = batch.first_pos + i as u64;
                match outcome {
                    Outcome::Zero { parent_present } => {
                        out.chunks_zero += 1;
                        if !ctx.full_index && parent_present {
                            out.index.push(&Record {
                                pos,
                                chunk: ChunkRef::Zero,
                            })?;
                        }
                    }
                    Outcome::Unchanged(chunk) => {
                        out.chunks_unchanged += 1;
                        if ctx.full_index {
                            if let ChunkRef::Stored { pack, .. } = chunk {
                                out.packs.insert(pack);
                            }
                            out.index.push(&Record { pos, chunk })?;
                        }
                    }
                    Outcome::Reused(seq, e) => {
                        out.chunks_reused += 1;
                        out.packs.insert(seq);
                        let chunk = ChunkRef::Stored {
                            id: e.id,
                            pack: seq,
                            offset: e.offset,
                            stored_len: e.stored_len,
                            raw_len: e.raw_len,
                        };
                        out.index.push(&Record { pos, chunk })?;
                    }
                    Outcome::New { id, blob, raw_len } => {
                        out.chunks_new += 1;
                        if pack.is_none() {
                            pack = Some(PackWriter::create(ctx.packs_dir, next_pack)?);
                            next_pack += 1;
                        }
                        let writer = pack.as_mut().expect("created above");
                        let stored_len = blob.len() as u32;
                        let offset = writer.append_owned(&id, blob, raw_len)?;
                        out.bytes_stored += u64::from(stored_len);
                        out.packs.insert(writer.seq());
                        let chunk = ChunkRef::Stored {
                            id,
                            pack: writer.seq(),
                            offset,
                            stored_len,
                            raw_len,
                        };
                        out.index.push(&Record { pos, chunk })?;
                        if writer.len() >= TARGET_PACK_SIZE {
                            seal.send(pack.take().expect("open"))
                                .map_err(|_| sealer_gone())?;
                            out.packs_written += 1;
                        }
                    }
                }
                next_pos = pos + 1;
            }
            ctx.progress.advance(batch.bytes);
            next_seq += 1;
        }
    }
    if next_pos != ctx.n_chunks || !pending.is_empty() {
        // The reader or a worker stopped early; its error is reported by the caller. Nothing is
        // published, and packs already finished stay for the next run to reuse.
        return Err(Error::Invalid(format!(
            "backup pipeline stopped at chunk {next_pos} of {}",
            ctx.n_chunks
        )));
    }
    if let Some(writer) = pack.take() {
        seal.send(writer).map_err(|_| sealer_gone())?;
        out.packs_written += 1;
    }
    Ok(out)
}
