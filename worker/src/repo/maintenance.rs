//! Forget (drop old recovery points), gc (reclaim the space nobody references) and stats.
//!
//! Forget only deletes index files; before it deletes the ancestor of a recovery point it
//! keeps, it rewrites that recovery point as a full index, so every kept recovery point stays
//! restorable at every moment. Gc works one lineage at a time under that lineage's exclusive
//! locks (a lineage in use is skipped, never waited for): packs that no index references are
//! deleted, and packs that are mostly dead are rewritten with their live blobs, the indexes
//! moved to the new packs, and only then the old packs deleted.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;

use super::fsutil::{LockMode, remove_temp_files, sync_dir};
use super::index::{ChainReader, ChunkRef, IndexFile, IndexHeader, IndexWriter, Record};
use super::lineage::{LockKind, Repository};
use super::pack::{self, PackReader, PackWriter, TARGET_PACK_SIZE};
use super::{Error, io_err};

/// What a forget did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ForgetSummary {
    pub disk: String,
    pub kept: Vec<String>,
    pub removed: Vec<String>,
    /// A kept recovery point rewritten as a full index because its ancestors went.
    pub consolidated: Option<String>,
}

/// Keeps the `keep_last` newest recovery points of `disk` and forgets the rest.
pub fn forget(repo: &Repository, disk: &str, keep_last: usize) -> Result<ForgetSummary, Error> {
    if keep_last == 0 {
        return Err(Error::Invalid(
            "--keep-last must be at least 1; a disk keeps at least one recovery point".into(),
        ));
    }
    repo.require_disk(disk)?;
    let _write_lock = repo.lock(disk, LockKind::Write, LockMode::Exclusive)?;
    let catalog = repo.catalog(disk)?;
    let n = catalog.indexes.len();
    let split = n.saturating_sub(keep_last);
    let (old, kept) = catalog.indexes.split_at(split);
    let mut summary = ForgetSummary {
        disk: disk.into(),
        kept: kept.iter().map(|i| i.header.rp.clone()).collect(),
        removed: old.iter().map(|i| i.header.rp.clone()).collect(),
        consolidated: None,
    };
    if old.is_empty() {
        return Ok(summary);
    }
    let oldest_kept = &kept[0];
    if !oldest_kept.header.full {
        let chain = repo.chain(&catalog, oldest_kept)?;
        let mut writer = IndexWriter::create(&oldest_kept.path, &repo.keys)?;
        let mut packs = BTreeSet::new();
        for record in ChainReader::new(&chain)? {
            let record = record?;
            if let ChunkRef::Stored { pack, .. } = record.chunk {
                packs.insert(pack);
                writer.push(&record)?;
            }
        }
        let header = IndexHeader {
            parent: None,
            full: true,
            chain_depth: 0,
            packs: packs.into_iter().collect(),
            ..oldest_kept.header.clone()
        };
        writer.finish(header)?;
        summary.consolidated = Some(oldest_kept.header.rp.clone());
    }
    for index in old {
        std::fs::remove_file(&index.path).map_err(io_err(&index.path))?;
    }
    sync_dir(&repo.rps_dir(disk))?;
    tracing::info!(
        disk,
        removed = summary.removed.len(),
        kept = summary.kept.len(),
        "forget finished"
    );
    Ok(summary)
}

/// Forgets the recovery points `remove` of `disk` (ids not in the catalog are skipped, so a
/// retried prune is a no-op). Every kept recovery point whose chain would lose an ancestor is
/// first rewritten as a full index, oldest first, so each kept recovery point stays restorable
/// at every moment. Refuses to remove every recovery point of a disk.
pub fn forget_rps(
    repo: &Repository,
    disk: &str,
    remove: &[String],
) -> Result<ForgetSummary, Error> {
    repo.require_disk(disk)?;
    let _write_lock = repo.lock(disk, LockKind::Write, LockMode::Exclusive)?;
    let catalog = repo.catalog(disk)?;
    let (old, kept): (Vec<&IndexFile>, Vec<&IndexFile>) = catalog
        .indexes
        .iter()
        .partition(|i| remove.contains(&i.header.rp));
    let mut summary = ForgetSummary {
        disk: disk.into(),
        kept: kept.iter().map(|i| i.header.rp.clone()).collect(),
        removed: old.iter().map(|i| i.header.rp.clone()).collect(),
        consolidated: None,
    };
    if old.is_empty() {
        return Ok(summary);
    }
    if kept.is_empty() {
        return Err(Error::Invalid(format!(
            "refusing to remove all {} recovery points of {disk}; a disk keeps at least one",
            old.len()
        )));
    }
    let removed: HashSet<&str> = old.iter().map(|i| i.header.rp.as_str()).collect();
    // Kept recovery points rewritten as full so far, reopened: later chains stop at them.
    let mut made_full: HashMap<String, IndexFile> = HashMap::new();
    for index in &kept {
        if index.header.full {
            continue;
        }
        let chain = repo.chain(&catalog, index)?;
        let mut effective = vec![chain[0].clone()];
        let mut needs_rewrite = false;
        for ancestor in chain.iter().skip(1) {
            if let Some(full) = made_full.get(&ancestor.header.rp) {
                effective.push(full.clone());
                break;
            }
            needs_rewrite |= removed.contains(ancestor.header.rp.as_str());
            effective.push(ancestor.clone());
        }
        if !needs_rewrite {
            continue;
        }
        let chain = effective;
        let mut writer = IndexWriter::create(&index.path, &repo.keys)?;
        let mut packs = BTreeSet::new();
        for record in ChainReader::new(&chain)? {
            let record = record?;
            if let ChunkRef::Stored { pack, .. } = record.chunk {
                packs.insert(pack);
                writer.push(&record)?;
            }
        }
        writer.finish(IndexHeader {
            parent: None,
            full: true,
            chain_depth: 0,
            packs: packs.into_iter().collect(),
            ..index.header.clone()
        })?;
        made_full.insert(
            index.header.rp.clone(),
            IndexFile::open(&index.path, &repo.keys)?,
        );
        summary
            .consolidated
            .get_or_insert_with(|| index.header.rp.clone());
    }
    for index in old {
        std::fs::remove_file(&index.path).map_err(io_err(&index.path))?;
    }
    sync_dir(&repo.rps_dir(disk))?;
    tracing::info!(
        disk,
        removed = summary.removed.len(),
        kept = summary.kept.len(),
        "forget finished"
    );
    Ok(summary)
}

/// What gc did to one disk lineage.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DiskGc {
    pub disk: String,
    pub packs_deleted: u64,
    pub packs_rewritten: u64,
    pub bytes_freed: u64,
    /// Why the lineage was left alone, if it was.
    pub skipped: Option<String>,
}

/// What gc did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GcSummary {
    pub bytes_freed: u64,
    pub disks: Vec<DiskGc>,
}

/// A pack whose live blobs fill less than this share of it is rewritten.
const REWRITE_BELOW_LIVE_SHARE: f64 = 0.5;

/// Reclaims unreferenced space in every lineage.
pub fn gc(repo: &Repository) -> Result<GcSummary, Error> {
    let mut summary = GcSummary {
        bytes_freed: 0,
        disks: Vec::new(),
    };
    for disk in repo.list_disks()? {
        let result = gc_disk(repo, &disk);
        let disk_gc = match result {
            Ok(d) => d,
            Err(
                e @ (Error::Busy { .. } | Error::CorruptIndex { .. } | Error::CorruptPack { .. }),
            ) => DiskGc {
                disk: disk.clone(),
                packs_deleted: 0,
                packs_rewritten: 0,
                bytes_freed: 0,
                skipped: Some(e.to_string()),
            },
            Err(e) => return Err(e),
        };
        summary.bytes_freed += disk_gc.bytes_freed;
        summary.disks.push(disk_gc);
    }
    Ok(summary)
}

fn gc_disk(repo: &Repository, disk: &str) -> Result<DiskGc, Error> {
    let _write_lock = repo.lock(disk, LockKind::Write, LockMode::Exclusive)?;
    let _read_lock = repo.lock(disk, LockKind::Read, LockMode::Exclusive)?;
    let packs_dir = repo.packs_dir(disk);
    remove_temp_files(&packs_dir)?;
    remove_temp_files(&repo.rps_dir(disk))?;
    let catalog = repo.catalog(disk)?;
    if let Some((path, err)) = catalog.damaged.first() {
        // A damaged index may still reference packs: deleting them would make it unrecoverable.
        return Err(Error::CorruptIndex {
            path: path.clone(),
            reason: format!(
                "{err}; gc leaves this disk alone until the index is removed or repaired"
            ),
        });
    }
    // Live blobs: every record of every index (each recovery point may be restored).
    let mut live: HashMap<u64, BTreeMap<u64, u32>> = HashMap::new();
    for index in &catalog.indexes {
        for record in index.records()? {
            if let ChunkRef::Stored {
                pack,
                offset,
                stored_len,
                ..
            } = record?.chunk
            {
                live.entry(pack).or_default().insert(offset, stored_len);
            }
        }
    }
    let mut result = DiskGc {
        disk: disk.into(),
        packs_deleted: 0,
        packs_rewritten: 0,
        bytes_freed: 0,
        skipped: None,
    };
    let existing = pack::list_packs(&packs_dir)?;
    let mut next_seq = existing.last().map_or(0, |s| s + 1);
    let mut to_delete = Vec::new();
    let mut to_rewrite = Vec::new();
    for &seq in &existing {
        let path = pack::pack_path(&packs_dir, seq);
        let size = std::fs::metadata(&path).map_err(io_err(&path))?.len();
        match live.get(&seq) {
            None => to_delete.push((seq, size)),
            Some(blobs) => {
                let live_bytes: u64 = blobs.values().map(|&l| l as u64).sum();
                if (live_bytes as f64) < REWRITE_BELOW_LIVE_SHARE * size as f64 {
                    to_rewrite.push((seq, size, live_bytes));
                }
            }
        }
    }

    if !to_rewrite.is_empty() {
        // Copy live blobs into new packs; remember where each went.
        let mut moved: HashMap<(u64, u64), (u64, u64)> = HashMap::new();
        let mut reader = PackReader::new(&packs_dir);
        let mut writer: Option<PackWriter> = None;
        let mut blob = Vec::new();
        let mut trailers: HashMap<u64, HashMap<u64, pack::PackEntry>> = HashMap::new();
        for &(seq, _, _) in &to_rewrite {
            let entries = pack::read_trailer(&pack::pack_path(&packs_dir, seq))?;
            trailers.insert(seq, entries.into_iter().map(|e| (e.offset, e)).collect());
        }
        for &(seq, _, _) in &to_rewrite {
            for (&offset, &len) in &live[&seq] {
                let entry =
                    trailers[&seq]
                        .get(&offset)
                        .copied()
                        .ok_or_else(|| Error::CorruptPack {
                            path: pack::pack_path(&packs_dir, seq),
                            reason: format!(
                                "an index references offset {offset}, which the pack does not list"
                            ),
                        })?;
                reader.read(seq, offset, len, &mut blob)?;
                if writer.is_none() {
                    writer = Some(PackWriter::create(&packs_dir, next_seq)?);
                    next_seq += 1;
                }
                let w = writer.as_mut().expect("created above");
                let new_offset = w.append(&entry.id, &blob, entry.raw_len)?;
                moved.insert((seq, offset), (w.seq(), new_offset));
                if w.len() >= TARGET_PACK_SIZE {
                    writer.take().expect("open").finish()?;
                }
            }
        }
        if let Some(w) = writer.take() {
            w.finish()?;
        }
        // Point the indexes at the new packs (each rewrite is atomic), then drop the old packs.
        let rewritten: HashSet<u64> = to_rewrite.iter().map(|&(seq, _, _)| seq).collect();
        for index in &catalog.indexes {
            if index.header.packs.iter().any(|p| rewritten.contains(p)) {
                rewrite_index(repo, index, &moved)?;
            }
        }
        for &(seq, size, live_bytes) in &to_rewrite {
            let path = pack::pack_path(&packs_dir, seq);
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            result.packs_rewritten += 1;
            result.bytes_freed += size.saturating_sub(live_bytes);
        }
    }
    for (seq, size) in to_delete {
        let path = pack::pack_path(&packs_dir, seq);
        std::fs::remove_file(&path).map_err(io_err(&path))?;
        result.packs_deleted += 1;
        result.bytes_freed += size;
    }
    sync_dir(&packs_dir)?;
    tracing::info!(
        disk,
        deleted = result.packs_deleted,
        rewritten = result.packs_rewritten,
        freed = result.bytes_freed,
        "gc finished"
    );
    Ok(result)
}

fn rewrite_index(
    repo: &Repository,
    index: &IndexFile,
    moved: &HashMap<(u64, u64), (u64, u64)>,
) -> Result<(), Error> {
    let mut writer = IndexWriter::create(&index.path, &repo.keys)?;
    let mut packs = BTreeSet::new();
    for record in index.records()? {
        let mut record: Record = record?;
        if let ChunkRef::Stored { pack, offset, .. } = &mut record.chunk {
            if let Some(&(new_pack, new_offset)) = moved.get(&(*pack, *offset)) {
                *pack = new_pack;
                *offset = new_offset;
            }
            packs.insert(*pack);
        }
        writer.push(&record)?;
    }
    writer.finish(IndexHeader {
        packs: packs.into_iter().collect(),
        ..index.header.clone()
    })
}

/// Sizes of the repository, for `cairn repo stats`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RepoStats {
    pub chunk_size: u32,
    pub encrypted: bool,
    pub disks: u64,
    pub recovery_points: u64,
    pub packs: u64,
    /// Bytes of pack files on disk.
    pub pack_bytes: u64,
    /// Bytes of index files on disk.
    pub index_bytes: u64,
    /// Sum of the disk sizes of all recovery points: what restoring all of them would write.
    pub logical_bytes: u64,
    /// `logical_bytes` / (`pack_bytes` + `index_bytes`).
    pub reduction_ratio: f64,
}

pub fn stats(repo: &Repository) -> Result<RepoStats, Error> {
    let mut stats = RepoStats {
        chunk_size: repo.config.chunk_size,
        encrypted: repo.keys.is_encrypted(),
        disks: 0,
        recovery_points: 0,
        packs: 0,
        pack_bytes: 0,
        index_bytes: 0,
        logical_bytes: 0,
        reduction_ratio: 0.0,
    };
    for disk in repo.list_disks()? {
        stats.disks += 1;
        let catalog = repo.catalog(&disk)?;
        for index in &catalog.indexes {
            stats.recovery_points += 1;
            stats.logical_bytes += index.header.disk_size;
            stats.index_bytes += std::fs::metadata(&index.path)
                .map_err(io_err(&index.path))?
                .len();
        }
        let packs_dir = repo.packs_dir(&disk);
        for seq in pack::list_packs(&packs_dir)? {
            let path = pack::pack_path(&packs_dir, seq);
            stats.packs += 1;
            stats.pack_bytes += std::fs::metadata(&path).map_err(io_err(&path))?.len();
        }
    }
    let stored = stats.pack_bytes + stats.index_bytes;
    stats.reduction_ratio = if stored == 0 {
        0.0
    } else {
        stats.logical_bytes as f64 / stored as f64
    };
    Ok(stats)
}

/// Size and free space (bytes available to this process) of the filesystem holding `dir`.
pub fn space(dir: &std::path::Path) -> Result<(u64, u64), Error> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("{} contains a NUL byte", dir.display())))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `path` is a valid NUL-terminated string and `stat` points to writable memory of
    // the right type; statvfs writes only into it.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io_err(dir)(std::io::Error::last_os_error()));
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let stat = unsafe { stat.assume_init() };
    let block = stat.f_frsize;
    Ok((
        stat.f_blocks.saturating_mul(block),
        stat.f_bavail.saturating_mul(block),
    ))
}
