//! Random access into one recovery point of one disk, straight from the repository: the disk as
//! it was, readable at any offset without restoring it first.
//!
//! A read looks up the chunk positions it covers in the recovery point's index chain (newest
//! index first, a binary search in each; see [`IndexLookup`]), then reads, decrypts, decompresses
//! and checks only those chunks from their packs. A small cache of decoded chunks (bounded by a
//! chunk count) serves the many small, repeated reads of a file system driver.
//!
//! An open [`RpImage`] holds the lineage's read lock shared, like a restore: backups and
//! forgets may run meanwhile, gc may not (it is the only operation that rewrites packs). It
//! never writes to the repository.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::crypto::{BlobDecoder, Keys};
use super::fsutil::{FileLock, LockMode};
use super::index::{ChunkRef, IndexHeader, IndexLookup};
use super::lineage::{LockKind, Repository};
use super::pack::pack_path;
use super::{Error, io_err};

/// A disk that can be read at any offset from several threads at once.
pub trait DiskView: Send + Sync {
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Whether `[offset, offset + len)` is known to read as zeros (a hole); `false` when unsure.
    fn is_zero_range(&self, _offset: u64, _len: u64) -> bool {
        false
    }
}

/// A raw image file (or block device) as a [`DiskView`].
#[derive(Debug)]
pub struct FileView {
    file: File,
    size: u64,
}

impl FileView {
    pub fn open(path: &Path) -> std::io::Result<FileView> {
        let file = File::open(path)?;
        let size = {
            use std::io::Seek;
            let mut f = &file;
            f.seek(std::io::SeekFrom::End(0))?
        };
        Ok(FileView { file, size })
    }
}

impl DiskView for FileView {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        check_range(offset, buf.len(), self.size)?;
        self.file.read_exact_at(buf, offset)
    }
}

fn check_range(offset: u64, len: usize, size: u64) -> std::io::Result<()> {
    if offset.checked_add(len as u64).is_none_or(|end| end > size) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("read of {len} bytes at {offset} is past the end of the {size}-byte disk"),
        ));
    }
    Ok(())
}

/// Default number of decoded chunks an [`RpImage`] keeps (4 MiB with 64 KiB chunks).
pub const DEFAULT_CACHE_CHUNKS: usize = 64;

/// One recovery point of one disk, readable at any offset. See the module docs.
#[derive(Debug)]
pub struct RpImage {
    disk: String,
    header: IndexHeader,
    /// The recovery point's index first, then its ancestors up to a full index.
    chain: Vec<IndexLookup>,
    keys: Keys,
    packs_dir: PathBuf,
    packs: Mutex<HashMap<u64, Arc<File>>>,
    decoders: Mutex<Vec<BlobDecoder>>,
    cache: Mutex<ChunkCache>,
    /// The lineage's read lock, held shared for as long as the image is open; dropped with it.
    _read_lock: FileLock,
}

impl RpImage {
    /// Opens recovery point `rp` (id, unique prefix, or `None` = latest) of `disk`.
    pub fn open(
        repo: &Repository,
        disk: &str,
        rp: Option<&str>,
        cache_chunks: usize,
    ) -> Result<RpImage, Error> {
        repo.require_disk(disk)?;
        let read_lock = repo.lock(disk, LockKind::Read, LockMode::Shared)?;
        let catalog = repo.catalog(disk)?;
        let index = repo.resolve_rp(disk, &catalog, rp)?;
        let chain = repo
            .chain(&catalog, index)?
            .iter()
            .map(IndexLookup::open)
            .collect::<Result<Vec<_>, Error>>()?;
        tracing::debug!(disk, rp = %index.header.rp, chain = chain.len(), "recovery point opened for random access");
        Ok(RpImage {
            disk: disk.into(),
            header: index.header.clone(),
            chain,
            keys: repo.keys.clone(),
            packs_dir: repo.packs_dir(disk),
            packs: Mutex::new(HashMap::new()),
            decoders: Mutex::new(Vec::new()),
            cache: Mutex::new(ChunkCache::new(cache_chunks.max(1))),
            _read_lock: read_lock,
        })
    }

    /// The recovery point's index header (its id, size, chunk size, …).
    pub fn header(&self) -> &IndexHeader {
        &self.header
    }

    fn chunk_size(&self) -> u64 {
        self.header.chunk_size as u64
    }

    /// What position `pos` holds in the recovery point: the newest index's record wins.
    fn lookup(&self, pos: u64) -> Result<ChunkRef, Error> {
        let n_chunks = self.header.n_chunks();
        for index in &self.chain {
            if let Some(chunk) = index.find(pos, n_chunks)? {
                return Ok(chunk);
            }
        }
        Ok(ChunkRef::Zero)
    }

    fn pack(&self, seq: u64) -> Result<Arc<File>, Error> {
        let mut packs = self.packs.lock().expect("pack table lock");
        if let Some(file) = packs.get(&seq) {
            return Ok(file.clone());
        }
        if packs.len() >= 32 {
            packs.clear();
        }
        let path = pack_path(&self.packs_dir, seq);
        let file = Arc::new(File::open(&path).map_err(io_err(&path))?);
        packs.insert(seq, file.clone());
        Ok(file)
    }

    /// The plaintext of chunk `pos` (`None` = all zeros), from the cache or the pack.
    fn chunk(&self, pos: u64) -> Result<Plain, Error> {
        if let Some(hit) = self.cache.lock().expect("chunk cache lock").get(pos) {
            return Ok(hit);
        }
        let plain = match self.lookup(pos)? {
            ChunkRef::Zero => None,
            ChunkRef::Stored {
                id,
                pack,
                offset,
                stored_len,
                raw_len,
            } => {
                let file = self.pack(pack)?;
                let mut blob = vec![0u8; stored_len as usize];
                file.read_exact_at(&mut blob, offset).map_err(|e| {
                    let path = pack_path(&self.packs_dir, pack);
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        Error::CorruptPack {
                            path,
                            reason: format!("truncated: blob at {offset} is missing"),
                        }
                    } else {
                        Error::Io { path, source: e }
                    }
                })?;
                let mut out = vec![0u8; raw_len as usize];
                let mut decoder = self
                    .decoders
                    .lock()
                    .expect("decoder pool lock")
                    .pop()
                    .unwrap_or_default();
                let result = self
                    .keys
                    .decode_blob_into(&id, &blob, &mut out, &mut decoder);
                self.decoders
                    .lock()
                    .expect("decoder pool lock")
                    .push(decoder);
                result.map_err(|e| Error::DamagedChunk {
                    disk: self.disk.clone(),
                    pos,
                    id: hex::encode(id),
                    reason: e.to_string(),
                })?;
                // A chunk of an ancestor of another size may be shorter; the rest reads as zero.
                out.resize(self.header.raw_len_at(pos) as usize, 0);
                Some(Arc::new(out))
            }
        };
        self.cache
            .lock()
            .expect("chunk cache lock")
            .put(pos, plain.clone());
        Ok(plain)
    }

    /// Fills `buf` from `offset` of the recovery point's disk.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        check_range(offset, buf.len(), self.header.disk_size)
            .map_err(|e| Error::Invalid(format!("disk {}: {e}", self.disk)))?;
        let cs = self.chunk_size();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let pos = at / cs;
            let within = (at % cs) as usize;
            let n = (buf.len() - done).min(cs as usize - within);
            match self.chunk(pos)? {
                None => buf[done..done + n].fill(0),
                Some(plain) => buf[done..done + n].copy_from_slice(&plain[within..within + n]),
            }
            done += n;
        }
        Ok(())
    }

    /// Whether every chunk touching `[offset, offset + len)` is zero in the recovery point.
    pub fn is_zero(&self, offset: u64, len: u64) -> Result<bool, Error> {
        if len == 0 {
            return Ok(true);
        }
        let cs = self.chunk_size();
        let first = offset / cs;
        let last = (offset + len - 1) / cs;
        for pos in first..=last {
            if pos >= self.header.n_chunks() || self.lookup(pos)? != ChunkRef::Zero {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl DiskView for RpImage {
    fn size(&self) -> u64 {
        self.header.disk_size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.read_exact_at(offset, buf).map_err(|e| match e {
            Error::Io { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        })
    }

    fn is_zero_range(&self, offset: u64, len: u64) -> bool {
        self.is_zero(offset, len).unwrap_or(false)
    }
}

/// A decoded chunk; `None` = all zeros.
type Plain = Option<Arc<Vec<u8>>>;

/// Decoded chunks by position, least recently used evicted first. Small (tens of entries), so
/// eviction scans.
#[derive(Debug)]
struct ChunkCache {
    cap: usize,
    tick: u64,
    /// Position → (last use, chunk).
    entries: HashMap<u64, (u64, Plain)>,
}

impl ChunkCache {
    fn new(cap: usize) -> ChunkCache {
        ChunkCache {
            cap,
            tick: 0,
            entries: HashMap::with_capacity(cap),
        }
    }

    /// `Some(None)` is a cached zero chunk.
    fn get(&mut self, pos: u64) -> Option<Plain> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(&pos).map(|(used, chunk)| {
            *used = tick;
            chunk.clone()
        })
    }

    fn put(&mut self, pos: u64, chunk: Plain) {
        if self.entries.len() >= self.cap
            && !self.entries.contains_key(&pos)
            && let Some((&oldest, _)) = self.entries.iter().min_by_key(|(_, (used, _))| *used)
        {
            self.entries.remove(&oldest);
        }
        self.tick += 1;
        self.entries.insert(pos, (self.tick, chunk));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_evicts_least_recently_used() {
        let mut cache = ChunkCache::new(2);
        cache.put(1, Some(Arc::new(vec![1])));
        cache.put(2, None);
        assert!(cache.get(1).is_some());
        cache.put(3, Some(Arc::new(vec![3])));
        assert!(cache.get(2).is_none(), "2 was least recently used");
        assert_eq!(cache.get(1).unwrap().unwrap()[0], 1);
        assert_eq!(cache.get(3).unwrap().unwrap()[0], 3);
    }
}
