//! Restore of a recovery point onto a sink: a fresh image (every stored chunk written, zeros
//! left as holes), or *delta* onto an existing image of the same size, writing only the chunks
//! whose content differs from the recovery point.
//!
//! The calling thread owns the sink and the index chain; worker threads read blobs from the
//! packs, decrypt, decompress and check them against their ids (and, for a delta restore,
//! compare with what the target holds). A damaged chunk stops the restore with an error naming
//! its position and id.

use crossbeam_channel::{Receiver, Sender, bounded};
use serde::Serialize;

use super::backup::ExtentCursor;
use super::crypto::{BlobDecoder, Keys};
use super::fsutil::LockMode;
use super::index::{ChainReader, ChunkRef, IndexHeader, PositionCursor};
use super::lineage::{LockKind, Repository};
use super::pack::PackReader;
use super::{Error, Progress, is_zero};
use crate::source::Sink;
use crate::source::raw::AlignedBuf;

/// Which recovery point to restore, and how.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub disk: String,
    /// Id or unique prefix; `None` = the latest.
    pub rp: Option<String>,
    /// Write only what differs on an existing target.
    pub delta: bool,
    /// Delta restore: the recovery point the target is known to hold (a valid content stamp,
    /// see [`super::stamp`]). Only the positions where the two differ are written, and the
    /// target is not read. Ignored when that recovery point is not in the lineage or has
    /// another disk size.
    pub known: Option<String>,
    /// Worker threads; 0 = one per core.
    pub threads: usize,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RestoreSummary {
    pub rp: String,
    pub disk: String,
    pub disk_size: u64,
    pub delta: bool,
    pub bytes_written: u64,
    pub chunks_written: u64,
    /// Delta restore: chunks that already held the right content.
    pub chunks_same: u64,
    /// Delta restore: the recovery point the target was known to hold (it was not read).
    pub known: Option<String>,
}

/// The header of the recovery point a restore would use (to size a new target first).
pub fn resolve(repo: &Repository, disk: &str, rp: Option<&str>) -> Result<IndexHeader, Error> {
    repo.require_disk(disk)?;
    let catalog = repo.catalog(disk)?;
    Ok(repo.resolve_rp(disk, &catalog, rp)?.header.clone())
}

const CHUNKS_PER_JOB: u64 = 64;

struct Job {
    first_pos: u64,
    /// One per position from `first_pos`; `None` = zero.
    expected: Vec<Option<ChunkRef>>,
    /// Delta restore: what the target holds now (`None` when the range is known to be zero).
    current: Option<Vec<u8>>,
    /// Write every position of the job, zeros included (the target is known to differ there).
    force: bool,
}

enum Write {
    /// Bytes `range` of the job's output buffer go to `offset`.
    Data {
        offset: u64,
        range: std::ops::Range<usize>,
    },
    Zero {
        offset: u64,
        len: u64,
    },
}

struct Done {
    out: AlignedBuf,
    writes: Vec<Write>,
    chunks_written: u64,
    chunks_same: u64,
    bytes: u64,
}

/// Restores `opts.rp` of `opts.disk` onto `sink`, which must have the disk's size.
pub fn restore(
    repo: &Repository,
    opts: &RestoreOptions,
    sink: &mut dyn Sink,
    progress: &dyn Progress,
) -> Result<RestoreSummary, Error> {
    repo.require_disk(&opts.disk)?;
    let _read_lock = repo.lock(&opts.disk, LockKind::Read, LockMode::Shared)?;
    let catalog = repo.catalog(&opts.disk)?;
    let index = repo.resolve_rp(&opts.disk, &catalog, opts.rp.as_deref())?;
    let chain = repo.chain(&catalog, index)?;
    let header = index.header.clone();
    if sink.size() != header.disk_size {
        return Err(Error::SizeMismatch {
            target: sink.describe(),
            target_size: sink.size(),
            rp_size: header.disk_size,
        });
    }
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    progress.start("restore", header.disk_size);
    let (job_tx, job_rx) = bounded::<Job>(threads * 2);
    let (done_tx, done_rx) = bounded::<Result<Done, Error>>(threads * 2);
    let mut summary = RestoreSummary {
        rp: header.rp.clone(),
        disk: opts.disk.clone(),
        disk_size: header.disk_size,
        delta: opts.delta,
        bytes_written: 0,
        chunks_written: 0,
        chunks_same: 0,
        known: None,
    };
    // A target known to hold another recovery point of the lineage: diff the two indexes.
    let known_chain = match (opts.delta, opts.known.as_deref()) {
        (true, Some(known)) => match repo.resolve_rp(&opts.disk, &catalog, Some(known)) {
            Ok(index)
                if index.header.disk_size == header.disk_size
                    && index.header.chunk_size == header.chunk_size =>
            {
                summary.known = Some(index.header.rp.clone());
                Some(repo.chain(&catalog, index)?)
            }
            _ => None,
        },
        _ => None,
    };
    let packs_dir = repo.packs_dir(&opts.disk);
    let keys = &repo.keys;
    let header_ref = &header;
    let disk = opts.disk.as_str();
    let result = std::thread::scope(|scope| {
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let packs_dir = packs_dir.clone();
            scope
                .spawn(move || restore_worker(keys, header_ref, disk, &packs_dir, job_rx, done_tx));
        }
        drop(job_rx);
        drop(done_tx);
        let chain_reader = ChainReader::new(&chain)?;
        let mut owner = Owner {
            sink,
            done_rx,
            in_flight: 0,
            cap: threads * 2,
            summary: &mut summary,
            progress,
        };
        if let Some(known) = &known_chain {
            feed_known(
                &mut owner,
                chain_reader,
                ChainReader::new(known)?,
                header_ref,
                &job_tx,
            )?;
        } else if opts.delta {
            feed_delta(&mut owner, chain_reader, header_ref, &job_tx)?;
        } else {
            feed_full(&mut owner, chain_reader, &job_tx)?;
        }
        drop(job_tx);
        owner.drain()?;
        owner.sink.flush()?;
        Ok::<(), Error>(())
    });
    result?;
    progress.finish();
    tracing::info!(
        rp = %summary.rp, disk = %summary.disk, delta = summary.delta,
        bytes_written = summary.bytes_written, chunks_same = summary.chunks_same, "restore finished"
    );
    Ok(summary)
}

/// The calling thread's side: owns the sink, hands out jobs, applies results.
struct Owner<'a> {
    sink: &'a mut dyn Sink,
    done_rx: Receiver<Result<Done, Error>>,
    in_flight: usize,
    cap: usize,
    summary: &'a mut RestoreSummary,
    progress: &'a dyn Progress,
}

impl Owner<'_> {
    fn submit(&mut self, jobs: &Sender<Job>, job: Job) -> Result<(), Error> {
        // The target keeps what was written so far; a later delta restore finishes it.
        if self.progress.cancelled() {
            return Err(Error::Cancelled {
                operation: "restore",
            });
        }
        while self.in_flight >= self.cap {
            self.apply_one()?;
        }
        jobs.send(job)
            .map_err(|_| Error::Invalid("restore workers stopped".into()))?;
        self.in_flight += 1;
        Ok(())
    }

    fn apply_one(&mut self) -> Result<(), Error> {
        let done = self
            .done_rx
            .recv()
            .map_err(|_| Error::Invalid("restore workers stopped".into()))??;
        self.in_flight -= 1;
        for write in done.writes {
            match write {
                Write::Data { offset, range } => {
                    self.sink.write_at(offset, &done.out[range.clone()])?;
                    self.summary.bytes_written += range.len() as u64;
                }
                Write::Zero { offset, len } => {
                    self.sink.write_zeroes(offset, len)?;
                    self.summary.bytes_written += len;
                }
            }
        }
        self.summary.chunks_written += done.chunks_written;
        self.summary.chunks_same += done.chunks_same;
        self.progress.advance(done.bytes);
        Ok(())
    }

    fn drain(&mut self) -> Result<(), Error> {
        while self.in_flight > 0 {
            self.apply_one()?;
        }
        Ok(())
    }
}

/// Full restore onto a blank target: only stored chunks, in runs of adjacent positions.
fn feed_full(owner: &mut Owner<'_>, chain: ChainReader, jobs: &Sender<Job>) -> Result<(), Error> {
    let mut run: Option<Job> = None;
    for record in chain {
        let record = record?;
        if matches!(record.chunk, ChunkRef::Zero) {
            continue;
        }
        let extend = run.as_ref().is_some_and(|j| {
            j.first_pos + j.expected.len() as u64 == record.pos
                && (j.expected.len() as u64) < CHUNKS_PER_JOB
        });
        if !extend && let Some(job) = run.take() {
            owner.submit(jobs, job)?;
        }
        run.get_or_insert_with(|| Job {
            first_pos: record.pos,
            expected: Vec::new(),
            current: None,
            force: false,
        })
        .expected
        .push(Some(record.chunk));
    }
    if let Some(job) = run.take() {
        owner.submit(jobs, job)?;
    }
    Ok(())
}

/// Delta restore: walk every position, reading what the target holds (holes are not read).
fn feed_delta(
    owner: &mut Owner<'_>,
    chain: ChainReader,
    header: &IndexHeader,
    jobs: &Sender<Job>,
) -> Result<(), Error> {
    let chunk_size = header.chunk_size as u64;
    let n_chunks = header.n_chunks();
    let mut expected = PositionCursor::new(Some(chain));
    let mut extents = ExtentCursor::new(header.disk_size);
    let mut first_pos = 0;
    while first_pos < n_chunks {
        let n = CHUNKS_PER_JOB.min(n_chunks - first_pos);
        let start = first_pos * chunk_size;
        let end = ((first_pos + n) * chunk_size).min(header.disk_size);
        let ranges = extents.data_ranges(owner.sink, start, end)?;
        let current = if ranges.is_empty() {
            None
        } else {
            let mut buf = vec![0u8; (end - start) as usize];
            for (a, b) in ranges {
                owner
                    .sink
                    .read_at(a, &mut buf[(a - start) as usize..(b - start) as usize])?;
            }
            Some(buf)
        };
        let mut refs = Vec::with_capacity(n as usize);
        for pos in first_pos..first_pos + n {
            refs.push(expected.at(pos)?);
        }
        owner.submit(
            jobs,
            Job {
                first_pos,
                expected: refs,
                current,
                force: false,
            },
        )?;
        first_pos += n;
    }
    Ok(())
}

/// Delta restore onto a target known to hold another recovery point: only the positions whose
/// chunk differs between the two, in runs of adjacent positions; the target is not read.
fn feed_known(
    owner: &mut Owner<'_>,
    chain: ChainReader,
    known: ChainReader,
    header: &IndexHeader,
    jobs: &Sender<Job>,
) -> Result<(), Error> {
    let mut wanted = PositionCursor::new(Some(chain));
    let mut holds = PositionCursor::new(Some(known));
    let mut run: Option<Job> = None;
    let mut same = 0u64;
    for pos in 0..header.n_chunks() {
        let expected = wanted.at(pos)?;
        let current = holds.at(pos)?;
        if expected.as_ref().and_then(ChunkRef::id) == current.as_ref().and_then(ChunkRef::id) {
            same += 1;
            continue;
        }
        let extend = run.as_ref().is_some_and(|j| {
            j.first_pos + j.expected.len() as u64 == pos
                && (j.expected.len() as u64) < CHUNKS_PER_JOB
        });
        if !extend && let Some(job) = run.take() {
            owner.submit(jobs, job)?;
        }
        run.get_or_insert_with(|| Job {
            first_pos: pos,
            expected: Vec::new(),
            current: None,
            force: true,
        })
        .expected
        .push(expected);
    }
    if let Some(job) = run.take() {
        owner.submit(jobs, job)?;
    }
    owner.summary.chunks_same += same;
    owner.progress.advance(
        same.saturating_mul(header.chunk_size as u64)
            .min(header.disk_size),
    );
    Ok(())
}

fn restore_worker(
    keys: &Keys,
    header: &IndexHeader,
    disk: &str,
    packs_dir: &std::path::Path,
    jobs: Receiver<Job>,
    done: Sender<Result<Done, Error>>,
) {
    let mut packs = PackReader::new(packs_dir);
    let mut decoder = BlobDecoder::new();
    let mut blob = Vec::new();
    for job in jobs {
        let result = run_job(keys, header, disk, &mut packs, &mut decoder, &mut blob, job);
        let failed = result.is_err();
        if done.send(result).is_err() || failed {
            return;
        }
    }
}

fn run_job(
    keys: &Keys,
    header: &IndexHeader,
    disk: &str,
    packs: &mut PackReader,
    decoder: &mut BlobDecoder,
    blob: &mut Vec<u8>,
    job: Job,
) -> Result<Done, Error> {
    let chunk_size = header.chunk_size as u64;
    let start = job.first_pos * chunk_size;
    let end = ((job.first_pos + job.expected.len() as u64) * chunk_size).min(header.disk_size);
    let mut out = AlignedBuf::zeroed((end - start) as usize);
    let mut writes = Vec::new();
    let (mut chunks_written, mut chunks_same) = (0, 0);
    // Runs of chunks to write, as (first index, end index) into `out`.
    let mut dirty: Vec<(usize, usize, bool)> = Vec::new();
    for (i, expected) in job.expected.iter().enumerate() {
        let pos = job.first_pos + i as u64;
        let a = i * chunk_size as usize;
        let b = (a + chunk_size as usize).min(out.len());
        let current = job.current.as_ref().map(|c| &c[a..b]);
        let zero_write = match expected {
            None => {
                if !job.force && current.is_none_or(is_zero) {
                    chunks_same += job.current.is_some() as u64;
                    continue;
                }
                true
            }
            Some(ChunkRef::Zero) => unreachable!("the cursor maps zero records to None"),
            Some(ChunkRef::Stored {
                id,
                pack,
                offset,
                stored_len,
                ..
            }) => {
                if let Some(current) = current
                    && !is_zero(current)
                    && &keys.chunk_id(current) == id
                {
                    chunks_same += 1;
                    continue;
                }
                packs.read(*pack, *offset, *stored_len, blob)?;
                keys.decode_blob_into(id, blob, &mut out[a..b], decoder)
                    .map_err(|e| Error::DamagedChunk {
                        disk: disk.into(),
                        pos,
                        id: hex::encode(id),
                        reason: format!("{e} (pack {})", packs.path(*pack).display()),
                    })?;
                false
            }
        };
        chunks_written += 1;
        match dirty.last_mut() {
            Some((_, run_end, run_zero)) if *run_end == a && *run_zero == zero_write => {
                *run_end = b
            }
            _ => dirty.push((a, b, zero_write)),
        }
    }
    for (a, b, zero) in dirty {
        writes.push(if zero {
            Write::Zero {
                offset: start + a as u64,
                len: (b - a) as u64,
            }
        } else {
            Write::Data {
                offset: start + a as u64,
                range: a..b,
            }
        });
    }
    let done = Done {
        out,
        writes,
        chunks_written,
        chunks_same,
        bytes: end - start,
    };
    Ok(done)
}
