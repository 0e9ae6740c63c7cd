//! An opened repository and its disk lineages: paths, locks, the catalog of recovery points of
//! each disk and the resolution of a recovery point's index chain.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::config::{self, RepoConfig};
use super::crypto::Keys;
use super::fsutil::{FileLock, LockMode, create_dirs, sync_dir};
use super::index::IndexFile;
use super::{Error, io_err};

/// An open repository: its folder, config and keys.
#[derive(Debug, Clone)]
pub struct Repository {
    pub root: PathBuf,
    pub config: RepoConfig,
    pub keys: Keys,
}

/// A recovery point as listed by `cairn repo list`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RecoveryPointInfo {
    pub rp: String,
    pub disk: String,
    pub parent: Option<String>,
    pub full_index: bool,
    pub created_at_ms: u64,
    pub disk_size: u64,
    pub bytes_read: u64,
    pub bytes_stored: u64,
    pub chunks_stored: u64,
    pub source: String,
}

/// The recovery points of one disk, oldest first, and the index files that could not be read.
#[derive(Debug, Default)]
pub struct Catalog {
    pub indexes: Vec<IndexFile>,
    pub damaged: Vec<(PathBuf, Error)>,
}

impl Catalog {
    pub fn latest(&self) -> Option<&IndexFile> {
        self.indexes.last()
    }

    pub fn find(&self, rp: &str) -> Option<&IndexFile> {
        self.indexes.iter().find(|i| i.header.rp == rp)
    }
}

/// Checks a disk id: 1–128 characters of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn validate_disk_id(id: &str) -> Result<(), Error> {
    let bad = |reason| {
        Err(Error::InvalidDiskId {
            id: id.into(),
            reason,
        })
    };
    if id.is_empty() || id.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    if id.starts_with('.') {
        return bad("must not start with a dot");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("may hold only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

impl Repository {
    /// Creates a repository (see [`config::init`]) and opens it.
    pub fn init(dir: &Path, chunk_size: u64, key_file: Option<&Path>) -> Result<Repository, Error> {
        config::init(dir, chunk_size, key_file)?;
        Repository::open(dir, key_file)
    }

    pub fn open(dir: &Path, key_file: Option<&Path>) -> Result<Repository, Error> {
        let (config, keys) = config::open(dir, key_file)?;
        Ok(Repository {
            root: dir.into(),
            config,
            keys,
        })
    }

    pub fn disks_dir(&self) -> PathBuf {
        self.root.join("disks")
    }

    pub fn disk_dir(&self, disk: &str) -> PathBuf {
        self.disks_dir().join(disk)
    }

    pub fn packs_dir(&self, disk: &str) -> PathBuf {
        self.disk_dir(disk).join("packs")
    }

    pub fn rps_dir(&self, disk: &str) -> PathBuf {
        self.disk_dir(disk).join("rps")
    }

    /// The disks that have a lineage, sorted.
    pub fn list_disks(&self) -> Result<Vec<String>, Error> {
        let dir = self.disks_dir();
        let mut disks = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(disks),
            Err(e) => {
                return Err(Error::Io {
                    path: dir,
                    source: e,
                });
            }
        };
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if validate_disk_id(&name).is_ok() && entry.path().is_dir() {
                disks.push(name);
            }
        }
        disks.sort();
        Ok(disks)
    }

    /// Fails with `NoSuchDisk` unless the disk has a lineage.
    pub fn require_disk(&self, disk: &str) -> Result<(), Error> {
        validate_disk_id(disk)?;
        if self.disk_dir(disk).is_dir() {
            Ok(())
        } else {
            Err(Error::NoSuchDisk { disk: disk.into() })
        }
    }

    /// Creates the lineage folders of a disk if needed (durably).
    pub fn ensure_lineage(&self, disk: &str) -> Result<(), Error> {
        validate_disk_id(disk)?;
        let dir = self.disk_dir(disk);
        if dir.join("rps").is_dir() && dir.join("packs").is_dir() {
            return Ok(());
        }
        for sub in ["packs", "rps"] {
            create_dirs(&dir.join(sub))?;
        }
        sync_dir(&dir)?;
        sync_dir(&self.disks_dir())
    }

    /// Takes a lineage lock without waiting; `Busy` names who holds it.
    pub(crate) fn lock(
        &self,
        disk: &str,
        which: LockKind,
        mode: LockMode,
    ) -> Result<FileLock, Error> {
        let path = self.disk_dir(disk).join(which.file_name());
        FileLock::try_lock(&path, mode)?.ok_or_else(|| Error::Busy {
            disk: disk.into(),
            what: match (which, mode) {
                (LockKind::Write, _) => "a backup, forget or gc of this disk is running".into(),
                (LockKind::Read, LockMode::Exclusive) => {
                    "a restore or verify of this disk is running".into()
                }
                (LockKind::Read, LockMode::Shared) => "a gc of this disk is running".into(),
            },
        })
    }

    /// Reads every index of a disk, oldest first. Damaged indexes are returned aside.
    pub fn catalog(&self, disk: &str) -> Result<Catalog, Error> {
        let dir = self.rps_dir(disk);
        let mut catalog = Catalog::default();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(catalog),
            Err(e) => {
                return Err(Error::Io {
                    path: dir,
                    source: e,
                });
            }
        };
        for entry in entries {
            let path = entry.map_err(io_err(&dir))?.path();
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if hidden || path.extension().is_none_or(|e| e != "rpi") {
                continue;
            }
            match IndexFile::open(&path, &self.keys) {
                Ok(index)
                    if index.header.disk == disk
                        && index.header.chunk_size == self.config.chunk_size =>
                {
                    catalog.indexes.push(index)
                }
                Ok(index) => {
                    let reason = format!(
                        "belongs to disk {} with chunk size {}",
                        index.header.disk, index.header.chunk_size
                    );
                    catalog
                        .damaged
                        .push((path.clone(), Error::CorruptIndex { path, reason }));
                }
                Err(e) => catalog.damaged.push((path, e)),
            }
        }
        catalog.indexes.sort_by(|a, b| {
            (a.header.created_at_ms, &a.header.rp).cmp(&(b.header.created_at_ms, &b.header.rp))
        });
        Ok(catalog)
    }

    /// The chain of `index`: itself, then its ancestors up to the nearest full index.
    pub fn chain(&self, catalog: &Catalog, index: &IndexFile) -> Result<Vec<IndexFile>, Error> {
        let mut chain = vec![index.clone()];
        while !chain.last().expect("non-empty").header.full {
            let child = chain.last().expect("non-empty");
            let parent_id = child
                .header
                .parent
                .clone()
                .ok_or_else(|| Error::CorruptIndex {
                    path: child.path.clone(),
                    reason: "a delta index without a parent".into(),
                })?;
            let parent = catalog
                .find(&parent_id)
                .ok_or_else(|| Error::CorruptIndex {
                    path: child.path.clone(),
                    reason: format!("its parent recovery point {parent_id} is missing or damaged"),
                })?;
            if chain.len() > 10_000 || chain.iter().any(|i| i.header.rp == parent_id) {
                return Err(Error::CorruptIndex {
                    path: child.path.clone(),
                    reason: "parent chain loops".into(),
                });
            }
            chain.push(parent.clone());
        }
        Ok(chain)
    }

    /// Finds a recovery point by id or unique id prefix (at least 8 characters); `None` = latest.
    pub fn resolve_rp<'c>(
        &self,
        disk: &str,
        catalog: &'c Catalog,
        rp: Option<&str>,
    ) -> Result<&'c IndexFile, Error> {
        match rp {
            None | Some("latest") => catalog.latest().ok_or_else(|| Error::NoSuchRp {
                disk: disk.into(),
                rp: "latest (the disk has no recovery point)".into(),
            }),
            Some(wanted) => {
                let matches: Vec<&IndexFile> = catalog
                    .indexes
                    .iter()
                    .filter(|i| {
                        i.header.rp == wanted
                            || (wanted.len() >= 8 && i.header.rp.starts_with(wanted))
                    })
                    .collect();
                match matches.as_slice() {
                    [one] => Ok(one),
                    [] => Err(Error::NoSuchRp {
                        disk: disk.into(),
                        rp: wanted.into(),
                    }),
                    _ => Err(Error::Invalid(format!(
                        "recovery point prefix {wanted} is ambiguous"
                    ))),
                }
            }
        }
    }

    /// The recovery points of one disk (or all disks), oldest first.
    pub fn list(&self, disk: Option<&str>) -> Result<Vec<RecoveryPointInfo>, Error> {
        let disks = match disk {
            Some(d) => {
                self.require_disk(d)?;
                vec![d.to_string()]
            }
            None => self.list_disks()?,
        };
        let mut out = Vec::new();
        for disk in disks {
            for index in self.catalog(&disk)?.indexes {
                let h = index.header;
                out.push(RecoveryPointInfo {
                    rp: h.rp,
                    disk: h.disk,
                    parent: h.parent,
                    full_index: h.full,
                    created_at_ms: h.created_at_ms,
                    disk_size: h.disk_size,
                    bytes_read: h.bytes_read,
                    bytes_stored: h.bytes_stored,
                    chunks_stored: h.chunks_stored,
                    source: h.source,
                });
            }
        }
        Ok(out)
    }
}

/// The two lock files of a lineage (see the lock matrix in [`super`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockKind {
    Write,
    Read,
}

impl LockKind {
    fn file_name(self) -> &'static str {
        match self {
            LockKind::Write => "write.lock",
            LockKind::Read => "read.lock",
        }
    }
}
