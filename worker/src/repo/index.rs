//! Recovery point index files: chunk position → chunk reference.
//!
//! Layout:
//! ```text
//! "CAIRNRPI" | version u8 = 1 | records (64 B each, ascending position)
//!            | header (postcard) | header length u32 LE | checksum [32] | "CAIRNRPE"
//! record:  position u64 | chunk id [32] | pack u64 | offset u64 | stored length u32 | plaintext length u32
//! ```
//! A record whose pack is `u64::MAX` says "this position is zero". The checksum is BLAKE3 (keyed
//! in an encrypted repository) of every byte before it. A *full* index lists every non-zero
//! position; a *delta* index lists the positions that differ from its parent. [`ChainReader`]
//! merges a delta with its ancestors up to the nearest full index, streaming, in memory
//! independent of the disk's size.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::crypto::{ChunkId, Keys};
use super::fsutil::{create_file, publish, temp_path};
use super::{Error, io_err};

const MAGIC: &[u8; 8] = b"CAIRNRPI";
const END_MAGIC: &[u8; 8] = b"CAIRNRPE";
const VERSION: u8 = 1;
const RECORDS_START: u64 = 9;
pub const RECORD_LEN: usize = 64;
const ZERO_PACK: u64 = u64::MAX;
/// Upper bound on a header, so a damaged length cannot make us allocate gigabytes.
const MAX_HEADER_LEN: u32 = 16 * 1024 * 1024;

/// What one chunk position holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRef {
    Zero,
    Stored {
        id: ChunkId,
        pack: u64,
        offset: u64,
        stored_len: u32,
        raw_len: u32,
    },
}

impl ChunkRef {
    pub fn id(&self) -> Option<&ChunkId> {
        match self {
            ChunkRef::Zero => None,
            ChunkRef::Stored { id, .. } => Some(id),
        }
    }
}

/// One record of an index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub pos: u64,
    pub chunk: ChunkRef,
}

/// The header of an index: what the recovery point is. Postcard-encoded; fields are only ever
/// added at the end (with a new format version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexHeader {
    pub rp: String,
    pub disk: String,
    pub parent: Option<String>,
    pub full: bool,
    pub created_at_ms: u64,
    pub disk_size: u64,
    pub chunk_size: u32,
    pub n_records: u64,
    /// Delta indexes between this one and the nearest full index (0 for a full index).
    pub chain_depth: u32,
    pub source: String,
    pub bytes_read: u64,
    pub bytes_stored: u64,
    pub chunks_stored: u64,
    /// Packs that this index's own records reference.
    pub packs: Vec<u64>,
}

impl IndexHeader {
    pub fn n_chunks(&self) -> u64 {
        self.disk_size.div_ceil(self.chunk_size as u64)
    }

    /// Plaintext length of the chunk at `pos` (the last one may be short).
    pub fn raw_len_at(&self, pos: u64) -> u32 {
        let cs = self.chunk_size as u64;
        (self.disk_size - pos * cs).min(cs) as u32
    }
}

fn encode_record(record: &Record, out: &mut [u8; RECORD_LEN]) {
    out[..8].copy_from_slice(&record.pos.to_le_bytes());
    match record.chunk {
        ChunkRef::Zero => {
            out[8..40].fill(0);
            out[40..48].copy_from_slice(&ZERO_PACK.to_le_bytes());
            out[48..64].fill(0);
        }
        ChunkRef::Stored {
            id,
            pack,
            offset,
            stored_len,
            raw_len,
        } => {
            out[8..40].copy_from_slice(&id);
            out[40..48].copy_from_slice(&pack.to_le_bytes());
            out[48..56].copy_from_slice(&offset.to_le_bytes());
            out[56..60].copy_from_slice(&stored_len.to_le_bytes());
            out[60..64].copy_from_slice(&raw_len.to_le_bytes());
        }
    }
}

fn decode_record(raw: &[u8; RECORD_LEN]) -> Record {
    let u64_at = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_le_bytes(raw[i..i + 4].try_into().expect("4 bytes"));
    let pack = u64_at(40);
    let chunk = if pack == ZERO_PACK {
        ChunkRef::Zero
    } else {
        ChunkRef::Stored {
            id: raw[8..40].try_into().expect("32 bytes"),
            pack,
            offset: u64_at(48),
            stored_len: u32_at(56),
            raw_len: u32_at(60),
        }
    };
    Record {
        pos: u64_at(0),
        chunk,
    }
}

/// Writes an index under a temporary name; [`IndexWriter::finish`] publishes it.
#[derive(Debug)]
pub struct IndexWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    hasher: blake3::Hasher,
    n_records: u64,
    last_pos: Option<u64>,
}

impl IndexWriter {
    pub fn create(path: &Path, keys: &Keys) -> Result<IndexWriter, Error> {
        let tmp = temp_path(path);
        let file = create_file(&tmp)?;
        let mut writer = IndexWriter {
            path: path.into(),
            tmp,
            file: Some(BufWriter::with_capacity(256 * 1024, file)),
            hasher: keys.file_hasher(),
            n_records: 0,
            last_pos: None,
        };
        let mut start = Vec::with_capacity(RECORDS_START as usize);
        start.extend_from_slice(MAGIC);
        start.push(VERSION);
        writer.write(&start)?;
        Ok(writer)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.hasher.update(bytes);
        let file = self
            .file
            .as_mut()
            .expect("index writer is open until finish");
        file.write_all(bytes).map_err(io_err(&self.tmp))
    }

    /// Appends a record; positions must ascend strictly.
    pub fn push(&mut self, record: &Record) -> Result<(), Error> {
        assert!(
            self.last_pos.is_none_or(|last| record.pos > last),
            "index records must ascend"
        );
        self.last_pos = Some(record.pos);
        let mut raw = [0u8; RECORD_LEN];
        encode_record(record, &mut raw);
        self.n_records += 1;
        self.write(&raw)
    }

    pub fn n_records(&self) -> u64 {
        self.n_records
    }

    /// Writes the header and checksum, fsyncs and renames the index into place.
    pub fn finish(mut self, mut header: IndexHeader) -> Result<(), Error> {
        header.n_records = self.n_records;
        let encoded = postcard::to_allocvec(&header).expect("index header serialises");
        self.write(&encoded)?;
        self.write(&(encoded.len() as u32).to_le_bytes())?;
        let checksum = *self.hasher.finalize().as_bytes();
        let mut file = self.file.take().expect("index writer is open until finish");
        file.write_all(&checksum).map_err(io_err(&self.tmp))?;
        file.write_all(END_MAGIC).map_err(io_err(&self.tmp))?;
        let file = file.into_inner().map_err(|e| Error::Io {
            path: self.tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_err(&self.tmp))?;
        drop(file);
        publish(&self.tmp, &self.path)
    }
}

impl Drop for IndexWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A checked index file: its header has been read and its checksum verified.
#[derive(Debug, Clone)]
pub struct IndexFile {
    pub path: PathBuf,
    pub header: IndexHeader,
}

impl IndexFile {
    /// Opens an index, verifying the checksum over the whole file.
    pub fn open(path: &Path, keys: &Keys) -> Result<IndexFile, Error> {
        let corrupt = |reason: String| Error::CorruptIndex {
            path: path.into(),
            reason,
        };
        let mut file = File::open(path).map_err(io_err(path))?;
        let size = file.metadata().map_err(io_err(path))?.len();
        let tail_len = 4 + 32 + 8;
        if size < RECORDS_START + tail_len {
            return Err(corrupt(format!("{size} bytes is too short for an index")));
        }
        let mut hasher = keys.file_hasher();
        let mut reader = BufReader::with_capacity(256 * 1024, &mut file);
        let mut remaining = size - 32 - 8;
        let mut head = [0u8; RECORDS_START as usize];
        reader.read_exact(&mut head).map_err(io_err(path))?;
        if &head[..8] != MAGIC {
            return Err(corrupt(
                "bad magic: not a cairn recovery point index".into(),
            ));
        }
        if head[8] != VERSION {
            return Err(corrupt(format!(
                "index version {} is not supported",
                head[8]
            )));
        }
        hasher.update(&head);
        remaining -= RECORDS_START;
        let mut buf = vec![0u8; 256 * 1024];
        let mut last_bytes = Vec::new();
        while remaining > 0 {
            let n = (remaining as usize).min(buf.len());
            reader.read_exact(&mut buf[..n]).map_err(io_err(path))?;
            hasher.update(&buf[..n]);
            remaining -= n as u64;
            if remaining < MAX_HEADER_LEN as u64 + 4 {
                last_bytes.extend_from_slice(&buf[..n]);
                let keep = MAX_HEADER_LEN as usize + 4;
                if last_bytes.len() > keep {
                    last_bytes.drain(..last_bytes.len() - keep);
                }
            }
        }
        let mut tail = [0u8; 40];
        reader.read_exact(&mut tail).map_err(io_err(path))?;
        if &tail[32..] != END_MAGIC {
            return Err(corrupt(
                "bad end magic: the index is truncated or damaged".into(),
            ));
        }
        if hasher.finalize().as_bytes() != &tail[..32] {
            return Err(corrupt(
                "checksum mismatch (damaged, or written with another key)".into(),
            ));
        }
        let n = last_bytes.len();
        if n < 4 {
            return Err(corrupt("no header".into()));
        }
        let header_len =
            u32::from_le_bytes(last_bytes[n - 4..].try_into().expect("4 bytes")) as usize;
        if header_len + 4 > n {
            return Err(corrupt(format!("header length {header_len} does not fit")));
        }
        let header: IndexHeader = postcard::from_bytes(&last_bytes[n - 4 - header_len..n - 4])
            .map_err(|e| corrupt(format!("header does not decode: {e}")))?;
        let records_len = size - RECORDS_START - header_len as u64 - 4 - 32 - 8;
        if records_len != header.n_records * RECORD_LEN as u64 {
            return Err(corrupt(format!(
                "{} records announced but {records_len} bytes of records present",
                header.n_records
            )));
        }
        if super::config::validate_chunk_size(header.chunk_size as u64).is_err() {
            return Err(corrupt(format!(
                "chunk size {} is invalid",
                header.chunk_size
            )));
        }
        Ok(IndexFile {
            path: path.into(),
            header,
        })
    }

    /// Streams this file's own records, checking each one.
    pub fn records(&self) -> Result<RecordIter, Error> {
        let mut file = File::open(&self.path).map_err(io_err(&self.path))?;
        file.seek(SeekFrom::Start(RECORDS_START))
            .map_err(io_err(&self.path))?;
        Ok(RecordIter {
            path: self.path.clone(),
            reader: BufReader::with_capacity(256 * 1024, file),
            remaining: self.header.n_records,
            header: self.header.clone(),
            last_pos: None,
        })
    }
}

/// The records of one index file, in order.
#[derive(Debug)]
pub struct RecordIter {
    path: PathBuf,
    reader: BufReader<File>,
    remaining: u64,
    header: IndexHeader,
    last_pos: Option<u64>,
}

impl Iterator for RecordIter {
    type Item = Result<Record, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let mut raw = [0u8; RECORD_LEN];
        if let Err(e) = self.reader.read_exact(&mut raw) {
            self.remaining = 0;
            return Some(Err(Error::Io {
                path: self.path.clone(),
                source: e,
            }));
        }
        let record = decode_record(&raw);
        let problem = if self.last_pos.is_some_and(|last| record.pos <= last) {
            Some(format!("record positions do not ascend at {}", record.pos))
        } else if record.pos >= self.header.n_chunks() {
            Some(format!(
                "position {} is past the disk's {} chunks",
                record.pos,
                self.header.n_chunks()
            ))
        } else if let ChunkRef::Stored {
            raw_len,
            stored_len,
            ..
        } = record.chunk
        {
            let expected = self.header.raw_len_at(record.pos);
            if raw_len != expected {
                Some(format!(
                    "chunk at {} claims {raw_len} bytes, expected {expected}",
                    record.pos
                ))
            } else if stored_len == 0 || stored_len > expected + 4096 {
                Some(format!(
                    "chunk at {} has an impossible stored length {stored_len}",
                    record.pos
                ))
            } else {
                None
            }
        } else {
            None
        };
        if let Some(reason) = problem {
            self.remaining = 0;
            return Some(Err(Error::CorruptIndex {
                path: self.path.clone(),
                reason,
            }));
        }
        self.last_pos = Some(record.pos);
        Some(Ok(record))
    }
}

/// Random access to one index file's records: a binary search over its fixed-size, ascending
/// records with positional reads, so looking up a position reads a few hundred bytes rather
/// than the whole file. The file's checksum was verified when it was opened ([`IndexFile::open`]).
#[derive(Debug)]
pub struct IndexLookup {
    path: PathBuf,
    file: File,
    header: IndexHeader,
}

impl IndexLookup {
    pub fn open(index: &IndexFile) -> Result<IndexLookup, Error> {
        let file = File::open(&index.path).map_err(io_err(&index.path))?;
        Ok(IndexLookup {
            path: index.path.clone(),
            file,
            header: index.header.clone(),
        })
    }

    fn record(&self, i: u64) -> Result<Record, Error> {
        use std::os::unix::fs::FileExt;
        let mut raw = [0u8; RECORD_LEN];
        self.file
            .read_exact_at(&mut raw, RECORDS_START + i * RECORD_LEN as u64)
            .map_err(io_err(&self.path))?;
        Ok(decode_record(&raw))
    }

    /// This file's record for `pos`, if it has one (`Some(ChunkRef::Zero)` = became zero).
    pub fn find(&self, pos: u64, n_chunks: u64) -> Result<Option<ChunkRef>, Error> {
        let (mut lo, mut hi) = (0u64, self.header.n_records);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let record = self.record(mid)?;
            if record.pos == pos {
                if let Some(reason) = check_record(&self.header, &record, n_chunks) {
                    return Err(Error::CorruptIndex {
                        path: self.path.clone(),
                        reason,
                    });
                }
                return Ok(Some(record.chunk));
            }
            if record.pos < pos {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(None)
    }
}

/// What is wrong with a record of an index with `header`, if anything.
fn check_record(header: &IndexHeader, record: &Record, n_chunks: u64) -> Option<String> {
    if record.pos >= n_chunks.min(header.n_chunks()) {
        return Some(format!(
            "position {} is past the disk's {} chunks",
            record.pos,
            header.n_chunks()
        ));
    }
    if let ChunkRef::Stored {
        raw_len,
        stored_len,
        ..
    } = record.chunk
    {
        let expected = header.raw_len_at(record.pos);
        if raw_len != expected {
            return Some(format!(
                "chunk at {} claims {raw_len} bytes, expected {expected}",
                record.pos
            ));
        }
        if stored_len == 0 || stored_len > expected + 4096 {
            return Some(format!(
                "chunk at {} has an impossible stored length {stored_len}",
                record.pos
            ));
        }
    }
    None
}

/// Merges an index with its ancestors (newest first) into the recovery point's view: for each
/// position, the record of the newest index that has one. Yields zero records too.
#[derive(Debug)]
pub struct ChainReader {
    heads: Vec<(Option<Record>, RecordIter)>,
    n_chunks: u64,
}

impl ChainReader {
    /// `chain[0]` is the recovery point, `chain.last()` a full index.
    pub fn new(chain: &[IndexFile]) -> Result<ChainReader, Error> {
        let n_chunks = chain.first().map(|i| i.header.n_chunks()).unwrap_or(0);
        let mut heads = Vec::with_capacity(chain.len());
        for index in chain {
            let mut iter = index.records()?;
            let first = iter.next().transpose()?;
            heads.push((first, iter));
        }
        Ok(ChainReader { heads, n_chunks })
    }
}

impl Iterator for ChainReader {
    type Item = Result<Record, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let min_pos = self
                .heads
                .iter()
                .filter_map(|(r, _)| r.map(|r| r.pos))
                .min()?;
            let mut winner = None;
            for (head, iter) in &mut self.heads {
                if head.is_some_and(|r| r.pos == min_pos) {
                    if winner.is_none() {
                        winner = *head;
                    }
                    match iter.next().transpose() {
                        Ok(next) => *head = next,
                        Err(e) => return Some(Err(e)),
                    }
                }
            }
            // A shrunken disk keeps ancestors' records past its end; they are not part of it.
            if min_pos < self.n_chunks {
                return winner.map(Ok);
            }
        }
    }
}

/// Pulls the view of an index chain position by position, for callers that walk the disk in
/// order (backup compares with the parent, delta restore with the target).
#[derive(Debug)]
pub struct PositionCursor {
    inner: Option<ChainReader>,
    pending: Option<Record>,
}

impl PositionCursor {
    pub fn new(chain: Option<ChainReader>) -> PositionCursor {
        PositionCursor {
            inner: chain,
            pending: None,
        }
    }

    /// The reference at `pos`; positions must be asked in ascending order. `None` = zero.
    pub fn at(&mut self, pos: u64) -> Result<Option<ChunkRef>, Error> {
        let Some(inner) = self.inner.as_mut() else {
            return Ok(None);
        };
        loop {
            if self.pending.is_none() {
                match inner.next() {
                    None => return Ok(None),
                    Some(record) => self.pending = Some(record?),
                }
            }
            let record = self.pending.expect("filled above");
            if record.pos < pos {
                self.pending = None;
                continue;
            }
            if record.pos > pos {
                return Ok(None);
            }
            return Ok(match record.chunk {
                ChunkRef::Zero => None,
                stored => Some(stored),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(rp: &str, full: bool, disk_size: u64) -> IndexHeader {
        IndexHeader {
            rp: rp.into(),
            disk: "d".into(),
            parent: None,
            full,
            created_at_ms: 1,
            disk_size,
            chunk_size: 4096,
            n_records: 0,
            chain_depth: 0,
            source: "test".into(),
            bytes_read: 0,
            bytes_stored: 0,
            chunks_stored: 0,
            packs: vec![],
        }
    }

    fn stored(pos: u64, tag: u8) -> Record {
        Record {
            pos,
            chunk: ChunkRef::Stored {
                id: [tag; 32],
                pack: 1,
                offset: 16,
                stored_len: 10,
                raw_len: 4096,
            },
        }
    }

    fn write(dir: &Path, name: &str, h: IndexHeader, records: &[Record]) -> IndexFile {
        let keys = Keys::plain();
        let path = dir.join(name);
        let mut w = IndexWriter::create(&path, &keys).unwrap();
        for r in records {
            w.push(r).unwrap();
        }
        w.finish(h).unwrap();
        IndexFile::open(&path, &keys).unwrap()
    }

    #[test]
    fn chain_merges_newest_first_and_zero_records_win() {
        let dir = tempfile::tempdir().unwrap();
        let full = write(
            dir.path(),
            "a",
            header("a", true, 10 * 4096),
            &[stored(0, 1), stored(3, 1), stored(5, 1)],
        );
        let delta = write(
            dir.path(),
            "b",
            header("b", false, 10 * 4096),
            &[
                stored(1, 2),
                Record {
                    pos: 3,
                    chunk: ChunkRef::Zero,
                },
                stored(5, 2),
            ],
        );
        let merged: Vec<Record> = ChainReader::new(&[delta.clone(), full.clone()])
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(
            merged,
            vec![
                stored(0, 1),
                stored(1, 2),
                Record {
                    pos: 3,
                    chunk: ChunkRef::Zero
                },
                stored(5, 2)
            ]
        );
        let mut cursor = PositionCursor::new(Some(ChainReader::new(&[delta, full]).unwrap()));
        assert_eq!(cursor.at(0).unwrap(), Some(stored(0, 1).chunk));
        assert_eq!(cursor.at(2).unwrap(), None);
        assert_eq!(cursor.at(3).unwrap(), None);
        assert_eq!(cursor.at(5).unwrap(), Some(stored(5, 2).chunk));
        assert_eq!(cursor.at(9).unwrap(), None);
    }

    #[test]
    fn damage_anywhere_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let index = write(
            dir.path(),
            "a",
            header("a", true, 10 * 4096),
            &[stored(0, 1), stored(3, 1)],
        );
        let clean = std::fs::read(&index.path).unwrap();
        for i in 0..clean.len() {
            let mut bytes = clean.clone();
            bytes[i] ^= 0x40;
            std::fs::write(&index.path, &bytes).unwrap();
            assert!(
                IndexFile::open(&index.path, &Keys::plain()).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        std::fs::write(&index.path, &clean[..clean.len() - 3]).unwrap();
        assert!(IndexFile::open(&index.path, &Keys::plain()).is_err());
    }

    #[test]
    fn records_past_the_disk_end_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let index = write(
            dir.path(),
            "a",
            header("a", true, 2 * 4096),
            &[stored(5, 1)],
        );
        let err = index.records().unwrap().next().unwrap().unwrap_err();
        assert!(err.to_string().contains("past the disk"), "{err}");
    }
}
