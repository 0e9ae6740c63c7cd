//! Verify: re-read and re-hash every chunk that any recovery point of a disk needs, and name
//! each damaged recovery point with its damaged chunks.
//!
//! Each blob is checked once per lineage however many recovery points share it: verify first
//! collects the distinct (pack, offset) references of every index, checks them pack by pack on
//! every core, then walks each recovery point's chain to attribute the damage. Memory is
//! proportional to one disk lineage. The ids of damaged chunks are written to the lineage's
//! `damaged.json`, so the next backup stores those chunks afresh instead of reusing them.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crossbeam_channel::bounded;
use serde::Serialize;

use super::crypto::{BlobDecoder, ChunkId, Keys};
use super::fsutil::{LockMode, write_atomic};
use super::index::{ChainReader, ChunkRef, IndexFile};
use super::lineage::{LockKind, Repository};
use super::pack::{PackReader, pack_path};
use super::{Error, Progress};

/// The outcome of `cairn repo verify`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub ok: bool,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub disks: Vec<DiskReport>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DiskReport {
    pub disk: String,
    pub recovery_points: u64,
    pub damaged_rps: Vec<DamagedRp>,
    /// Set when the disk could not be verified at all (e.g. a gc holds it).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DamagedRp {
    pub rp: String,
    pub reason: String,
    pub n_damaged_chunks: u64,
    /// The first damaged chunks (at most [`MAX_LISTED`]).
    pub damaged_chunks: Vec<DamagedChunk>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DamagedChunk {
    pub pos: u64,
    pub id: String,
    pub pack: String,
    pub reason: String,
}

pub const MAX_LISTED: usize = 100;

/// Verifies one disk, or every disk of the repository.
pub fn verify(
    repo: &Repository,
    disk: Option<&str>,
    threads: usize,
    progress: &dyn Progress,
) -> Result<VerifyReport, Error> {
    let disks = match disk {
        Some(d) => {
            repo.require_disk(d)?;
            vec![d.to_string()]
        }
        None => repo.list_disks()?,
    };
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        threads
    };
    let mut report = VerifyReport {
        ok: true,
        chunks_checked: 0,
        bytes_checked: 0,
        disks: Vec::new(),
    };
    for disk in disks {
        let disk_report = match verify_disk(repo, &disk, threads, progress, &mut report) {
            Ok(r) => r,
            Err(e @ Error::Busy { .. }) => DiskReport {
                disk: disk.clone(),
                recovery_points: 0,
                damaged_rps: vec![],
                error: Some(e.to_string()),
            },
            Err(e) => return Err(e),
        };
        if !disk_report.damaged_rps.is_empty() || disk_report.error.is_some() {
            report.ok = false;
        }
        report.disks.push(disk_report);
    }
    Ok(report)
}

type BlobKey = (u64, u64);

struct BlobRef {
    id: ChunkId,
    stored_len: u32,
    raw_len: u32,
}

fn verify_disk(
    repo: &Repository,
    disk: &str,
    threads: usize,
    progress: &dyn Progress,
    totals: &mut VerifyReport,
) -> Result<DiskReport, Error> {
    let _read_lock = repo.lock(disk, LockKind::Read, LockMode::Shared)?;
    let catalog = repo.catalog(disk)?;
    let mut damaged_rps = Vec::new();
    for (path, err) in &catalog.damaged {
        damaged_rps.push(DamagedRp {
            rp: rp_name(path),
            reason: err.to_string(),
            n_damaged_chunks: 0,
            damaged_chunks: vec![],
        });
    }
    // Every distinct blob referenced by any index's own records.
    let mut blobs: HashMap<BlobKey, BlobRef> = HashMap::new();
    let mut usable: Vec<(&IndexFile, Vec<IndexFile>)> = Vec::new();
    for index in &catalog.indexes {
        let collected = (|| {
            let chain = repo.chain(&catalog, index)?;
            for record in index.records()? {
                if let ChunkRef::Stored {
                    id,
                    pack,
                    offset,
                    stored_len,
                    raw_len,
                } = record?.chunk
                {
                    blobs.entry((pack, offset)).or_insert(BlobRef {
                        id,
                        stored_len,
                        raw_len,
                    });
                }
            }
            Ok::<_, Error>(chain)
        })();
        match collected {
            Ok(chain) => usable.push((index, chain)),
            Err(e) => damaged_rps.push(DamagedRp {
                rp: index.header.rp.clone(),
                reason: e.to_string(),
                n_damaged_chunks: 0,
                damaged_chunks: vec![],
            }),
        }
    }

    let bad = check_blobs(repo, disk, &blobs, threads, progress, totals)?;

    // Attribute damaged blobs to the recovery points whose chains use them.
    let mut damaged_ids: Vec<String> = Vec::new();
    for (index, chain) in &usable {
        let mut rp = DamagedRp {
            rp: index.header.rp.clone(),
            reason: String::new(),
            n_damaged_chunks: 0,
            damaged_chunks: vec![],
        };
        for record in ChainReader::new(chain)? {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    rp.reason = e.to_string();
                    break;
                }
            };
            if let ChunkRef::Stored {
                id, pack, offset, ..
            } = record.chunk
                && let Some(reason) = bad.get(&(pack, offset))
            {
                rp.n_damaged_chunks += 1;
                let id = hex::encode(id);
                if !damaged_ids.contains(&id) {
                    damaged_ids.push(id.clone());
                }
                if rp.damaged_chunks.len() < MAX_LISTED {
                    rp.damaged_chunks.push(DamagedChunk {
                        pos: record.pos,
                        id,
                        pack: pack_path(&repo.packs_dir(disk), pack).display().to_string(),
                        reason: reason.clone(),
                    });
                }
            }
        }
        if rp.n_damaged_chunks > 0 && rp.reason.is_empty() {
            rp.reason = format!("{} damaged chunk(s)", rp.n_damaged_chunks);
        }
        if !rp.reason.is_empty() {
            damaged_rps.push(rp);
        }
    }
    let damaged_file = repo.disk_dir(disk).join("damaged.json");
    if damaged_ids.is_empty() {
        match std::fs::remove_file(&damaged_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Io {
                    path: damaged_file,
                    source: e,
                });
            }
        }
    } else {
        write_atomic(
            &damaged_file,
            &serde_json::to_vec(&damaged_ids).expect("strings serialise"),
        )?;
    }
    for rp in &damaged_rps {
        tracing::warn!(disk, rp = %rp.rp, reason = %rp.reason, "damaged recovery point");
    }
    Ok(DiskReport {
        disk: disk.into(),
        recovery_points: (catalog.indexes.len() + catalog.damaged.len()) as u64,
        damaged_rps,
        error: None,
    })
}

fn rp_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads and checks every blob; returns the damaged ones with the reason.
fn check_blobs(
    repo: &Repository,
    disk: &str,
    blobs: &HashMap<BlobKey, BlobRef>,
    threads: usize,
    progress: &dyn Progress,
    totals: &mut VerifyReport,
) -> Result<HashMap<BlobKey, String>, Error> {
    let mut by_pack: BTreeMap<u64, Vec<(u64, &BlobRef)>> = BTreeMap::new();
    let mut total_bytes = 0u64;
    for (&(pack, offset), blob) in blobs {
        by_pack.entry(pack).or_default().push((offset, blob));
        total_bytes += blob.stored_len as u64;
    }
    progress.start(&format!("verify {disk}"), total_bytes);
    let packs_dir = repo.packs_dir(disk);
    let keys: &Keys = &repo.keys;
    let (work_tx, work_rx) = bounded::<(u64, Vec<(u64, &BlobRef)>)>(threads * 2);
    let (bad_tx, bad_rx) = bounded::<(BlobKey, String)>(1024);
    let mut bad = HashMap::new();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let bad_tx = bad_tx.clone();
            let packs_dir = &packs_dir;
            scope.spawn(move || {
                let mut reader = PackReader::new(packs_dir);
                let mut decoder = BlobDecoder::new();
                let mut blob_buf = Vec::new();
                let mut plain = Vec::new();
                for (pack, entries) in work_rx {
                    for (offset, blob) in entries {
                        let problem =
                            match reader.read(pack, offset, blob.stored_len, &mut blob_buf) {
                                Err(e) => Some(e.to_string()),
                                Ok(()) => {
                                    plain.resize(blob.raw_len as usize, 0);
                                    keys.decode_blob_into(
                                        &blob.id,
                                        &blob_buf,
                                        &mut plain,
                                        &mut decoder,
                                    )
                                    .err()
                                    .map(|e| e.to_string())
                                }
                            };
                        progress.advance(blob.stored_len as u64);
                        if let Some(reason) = problem {
                            let _ = bad_tx.send(((pack, offset), reason));
                        }
                    }
                }
            });
        }
        drop(work_rx);
        drop(bad_tx);
        let collector = scope.spawn(move || bad_rx.into_iter().collect::<HashMap<_, _>>());
        for (pack, mut entries) in by_pack {
            entries.sort_by_key(|(offset, _)| *offset);
            for part in entries.chunks(512) {
                totals.chunks_checked += part.len() as u64;
                totals.bytes_checked += part.iter().map(|(_, b)| b.stored_len as u64).sum::<u64>();
                if work_tx.send((pack, part.to_vec())).is_err() {
                    break;
                }
            }
        }
        drop(work_tx);
        bad = collector.join().expect("collector does not panic");
    });
    progress.finish();
    Ok(bad)
}
