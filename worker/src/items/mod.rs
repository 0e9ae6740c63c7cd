//! Item-level recovery: list and extract files and folders of the file systems inside a disk
//! image (GPT/MBR partitions with ext4, FAT12/16/32 or NTFS), read through a [`DiskView`] such
//! as a recovery point opened straight from the repository ([`crate::repo::image::RpImage`]).
//!
//! Everything read from an image is hostile input. Paths are addressed as
//! `/<volume>/<name>/…` where a volume is `p1`, `p2`, … (partition numbers) or `disk` (a disk
//! without a partition table). The file system drivers run inside a panic guard: a damaged file
//! system gives [`Error::Damaged`], never a crash. Extraction ([`extract`]) writes only below
//! the target folder: names are validated, symlinks are recreated only when they cannot lead
//! out, device nodes are skipped and reported, counts and sizes are bounded by [`Limits`], and
//! a folder reached a second time (a loop, a directory hard link) or deeper than the limit is
//! skipped and reported while the rest comes out (the decisions are in `walk`). Browsing lists
//! one folder and never recurses, so loops cannot trap it.
//!
//! This module never writes to the image or the repository.

mod extract;
mod fs_ext4;
mod fs_fat;
mod fs_ntfs;
pub mod partition;
pub mod probe;
mod slice;
#[cfg(test)]
mod tests;
mod walk;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

pub use extract::{ExtractReport, Skipped};
pub use partition::{Partition, Scheme};
pub use probe::FsKind;

use crate::repo::image::DiskView;

/// Errors of item-level recovery.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad item path {path:?}: {reason}")]
    BadPath { path: String, reason: String },
    #[error("{path}: no such file or folder")]
    NotFound { path: String },
    #[error("{path}: not a folder")]
    NotADirectory { path: String },
    #[error("volume {volume}: {reason}")]
    Unsupported { volume: String, reason: String },
    #[error("damaged file system or partition table: {0}")]
    Damaged(String),
    #[error("reading the disk: {0}")]
    Read(String),
    #[error("{what} exceeds the limit of {limit} (raise it with the matching option)")]
    Limit { what: String, limit: u64 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("target folder {path}: {reason}")]
    BadTarget { path: PathBuf, reason: String },
    /// The caller asked the extraction to stop; what was written so far stays.
    #[error("extraction cancelled")]
    Cancelled,
}

/// Bounds on what one browse or extraction may do, whatever the image claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Limits {
    /// Files, folders and links extracted in total.
    pub max_entries: u64,
    /// Bytes extracted in total.
    pub max_total_bytes: u64,
    /// Bytes of one file.
    pub max_file_bytes: u64,
    /// Folder nesting below an extracted item (the item's own folder counts as one); deeper
    /// folders are skipped and reported.
    pub max_depth: u32,
    /// Entries of one folder (browse and extract).
    pub max_dir_entries: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_entries: 1_000_000,
            max_total_bytes: 1 << 40,
            max_file_bytes: 1 << 40,
            max_depth: 128,
            max_dir_entries: 1_000_000,
        }
    }
}

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    /// Device nodes, fifos, sockets: listed, never extracted.
    Special,
    /// A volume that cannot be browsed (swap, unknown content).
    Volume,
}

/// What tells one folder of a file system from another, whatever names lead to it: the same
/// folder reached twice (a directory hard link, a loop, cross-linked FAT clusters) has the same
/// id. Only meaningful within one volume. An [exact](NodeId::is_exact) id is the file system's
/// own number for the folder; an inexact one is a digest of what the folder looks like, which
/// two distinct folders may share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeId {
    /// ext2/3/4: a digest of the folder's inode metadata (size, mode, owner and the access,
    /// change, modification and creation times to the nanosecond) and of its entries' names
    /// and types, in on-disk order. `ext4-view` keeps inode numbers to itself; a hard link
    /// shares its inode, so it has the same digest, and two distinct folders share one only
    /// when all of that is equal (images built with fixed timestamps can have such twins).
    Ext4Look(u64),
    /// FAT: where the folder's first cluster (or the FAT12/16 root folder) lies, in bytes from
    /// the volume start.
    FatData(u64),
    /// NTFS: the file record number.
    NtfsRecord(u64),
}

impl NodeId {
    /// Whether two folders with this id are surely one. An inexact id is trusted only where
    /// the other folder is an ancestor (a loop: walking on would never end), never to skip a
    /// folder as a second name of one extracted elsewhere.
    pub fn is_exact(self) -> bool {
        !matches!(self, NodeId::Ext4Look(_))
    }

    /// How a second name of an already extracted folder is called on this file system.
    fn second_name(self) -> &'static str {
        match self {
            NodeId::Ext4Look(_) | NodeId::NtfsRecord(_) => "directory hard link",
            NodeId::FatData(_) => "cross-linked folder",
        }
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeId::Ext4Look(_) => {
                write!(f, "the same folder (same inode metadata and entries)")
            }
            NodeId::FatData(at) => write!(f, "the folder whose data starts at byte {at}"),
            NodeId::NtfsRecord(n) => write!(f, "file record {n}"),
        }
    }
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// The name as stored (lossy UTF-8 for display; extraction uses the raw bytes).
    pub name: String,
    #[serde(skip)]
    pub raw_name: Vec<u8>,
    pub kind: NodeKind,
    pub size: u64,
    /// Unix permission bits, when the file system has them.
    pub mode: Option<u32>,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: Option<i64>,
    /// Volumes: the file system and partition label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Folders: the file system's identity of the folder, when the driver can tell it.
    #[serde(skip)]
    pub id: Option<NodeId>,
}

impl Node {
    fn new(raw_name: Vec<u8>, kind: NodeKind) -> Node {
        Node {
            name: String::from_utf8_lossy(&raw_name).into_owned(),
            raw_name,
            kind,
            size: 0,
            mode: None,
            mtime: None,
            detail: None,
            id: None,
        }
    }
}

/// A file system driver, over the bytes of one volume. Paths are lists of raw names below the
/// volume's root (empty = root). Implementations return errors for anything damaged; the
/// callers in this module also contain panics. Folders they return carry a [`NodeId`] where
/// the file system has one, so that extraction walks each folder once.
trait Tree {
    /// The entries of folder `dir` (without `.` and `..`), at most `max` of them.
    fn list(&mut self, dir: &[Vec<u8>], max: u64) -> Result<Vec<Node>, Error>;
    /// The entry at `path`, not following a final symlink.
    fn stat(&mut self, path: &[Vec<u8>]) -> Result<Node, Error>;
    /// Streams the content of the regular file at `path` into `out`; at most `max` bytes.
    fn read_file(
        &mut self,
        path: &[Vec<u8>],
        max: u64,
        out: &mut dyn FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<u64, Error>;
    /// The target of the symlink at `path`.
    fn read_link(&mut self, path: &[Vec<u8>]) -> Result<Vec<u8>, Error>;
}

const MAX_PATH_LEN: usize = 4096;

/// A path inside a volume as text, for messages: `/a/b`, names decoded lossily.
fn display_path(path: &[Vec<u8>]) -> String {
    let mut text = String::from("/");
    for (i, comp) in path.iter().enumerate() {
        if i > 0 {
            text.push('/');
        }
        text.push_str(&String::from_utf8_lossy(comp));
    }
    text
}

/// Streams a file of unknown length from `read` (0 = end) to `out` in 256 KiB pieces,
/// refusing it once it grows past `max` bytes; returns its length.
fn copy_bounded(
    path: &[Vec<u8>],
    max: u64,
    mut read: impl FnMut(&mut [u8]) -> Result<usize, Error>,
    out: &mut dyn FnMut(&[u8]) -> Result<(), Error>,
) -> Result<u64, Error> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        if total > max {
            return Err(Error::Limit {
                what: format!("size of {}", display_path(path)),
                limit: max,
            });
        }
        out(&buf[..n])?;
    }
}

/// Splits an item path (`/p2/etc/hosts`) into components; `.`/`..` and NUL are refused.
pub fn parse_path(path: &str) -> Result<Vec<Vec<u8>>, Error> {
    let bad = |reason: &str| Error::BadPath {
        path: path.into(),
        reason: reason.into(),
    };
    if path.len() > MAX_PATH_LEN {
        return Err(bad("longer than 4096 bytes"));
    }
    if !path.starts_with('/') {
        return Err(bad("must start with / (e.g. /p2/etc/hosts)"));
    }
    if path.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    let mut out = Vec::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return Err(bad(". and .. are not allowed"));
        }
        out.push(part.as_bytes().to_vec());
    }
    Ok(out)
}

/// Runs a file system operation, turning a panic of a driver on damaged data into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "driver panicked".into());
            tracing::warn!(what, %msg, "file system driver failed on damaged data");
            Err(Error::Damaged(format!("{what}: {msg}")))
        }
    }
}

/// A disk image whose volumes can be listed and opened.
pub struct Disk {
    view: Arc<dyn DiskView>,
    partitions: Vec<Partition>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("partitions", &self.partitions)
            .finish()
    }
}

impl Disk {
    pub fn open(view: Arc<dyn DiskView>) -> Result<Disk, Error> {
        let partitions = guarded("partition table", || partition::partitions(view.as_ref()))?;
        Ok(Disk { view, partitions })
    }

    pub fn partitions(&self) -> &[Partition] {
        &self.partitions
    }

    fn kind_of(&self, part: &Partition) -> Option<FsKind> {
        let len = part.len.min(4096) as usize;
        let mut head = vec![0u8; len];
        self.view.read_at(part.start, &mut head).ok()?;
        probe::probe(&head)
    }

    fn volume(&self, name: &[u8]) -> Result<&Partition, Error> {
        self.partitions
            .iter()
            .find(|p| p.volume_name().as_bytes() == name)
            .ok_or_else(|| Error::NotFound {
                path: format!("/{}", String::from_utf8_lossy(name)),
            })
    }

    fn tree(&self, part: &Partition) -> Result<Box<dyn Tree>, Error> {
        let volume = part.volume_name();
        let slice = slice::Slice::new(self.view.clone(), part.start, part.len);
        match self.kind_of(part) {
            Some(FsKind::Ext4) => guarded("ext4", || {
                Ok(Box::new(fs_ext4::Ext4Tree::open(slice)?) as Box<dyn Tree>)
            }),
            Some(FsKind::Fat) => guarded("fat", || {
                Ok(Box::new(fs_fat::FatTree::open(slice)?) as Box<dyn Tree>)
            }),
            Some(FsKind::Ntfs) => guarded("ntfs", || {
                Ok(Box::new(fs_ntfs::NtfsTree::open(slice)?) as Box<dyn Tree>)
            }),
            Some(FsKind::Swap) => Err(Error::Unsupported {
                volume,
                reason: "swap space holds no files".into(),
            }),
            None => Err(Error::Unsupported {
                volume,
                reason: "no ext4, FAT or NTFS file system recognised".into(),
            }),
        }
    }

    fn volume_nodes(&self) -> Vec<Node> {
        self.partitions
            .iter()
            .map(|p| {
                let kind = self.kind_of(p);
                let mut node = Node::new(
                    p.volume_name().into_bytes(),
                    if kind.is_some_and(FsKind::is_browsable) {
                        NodeKind::Dir
                    } else {
                        NodeKind::Volume
                    },
                );
                node.size = p.len;
                let fs = kind.map_or("unknown", FsKind::name);
                node.detail = Some(if p.label.is_empty() {
                    fs.to_string()
                } else {
                    format!("{fs}, {}", p.label)
                });
                node
            })
            .collect()
    }

    /// Lists a folder (`/` lists the volumes). A file path lists that one entry.
    pub fn browse(&self, path: &str, limits: &Limits) -> Result<Vec<Node>, Error> {
        let comps = parse_path(path)?;
        let Some((volume, rest)) = comps.split_first() else {
            return Ok(self.volume_nodes());
        };
        let part = self.volume(volume)?;
        let mut tree = self.tree(part)?;
        guarded("browse", || {
            let node = tree.stat(rest)?;
            match node.kind {
                NodeKind::Dir => tree.list(rest, limits.max_dir_entries),
                _ => Ok(vec![node]),
            }
        })
    }

    /// Extracts each item (file, folder or symlink; a volume extracts its whole tree) into
    /// `target` as `target/<last name of the item>`. `target` must be an existing folder.
    pub fn extract(
        &self,
        items: &[String],
        target: &std::path::Path,
        limits: &Limits,
        progress: &dyn crate::repo::Progress,
    ) -> Result<ExtractReport, Error> {
        // Bad item paths are refused before the target is looked at.
        for item in items {
            parse_path(item)?;
        }
        let meta = std::fs::symlink_metadata(target).map_err(|e| Error::BadTarget {
            path: target.into(),
            reason: e.to_string(),
        })?;
        if !meta.is_dir() {
            return Err(Error::BadTarget {
                path: target.into(),
                reason: "not a folder (create it first)".into(),
            });
        }
        let root = crate::safefs::Dir::open_root(target).map_err(|e| Error::BadTarget {
            path: target.into(),
            reason: e.to_string(),
        })?;
        self.extract_into(items, root, limits, progress)
    }

    /// [`Disk::extract`] into an open folder: everything is written below it through
    /// descriptors (see `extract`).
    pub fn extract_into(
        &self,
        items: &[String],
        root: crate::safefs::Dir,
        limits: &Limits,
        progress: &dyn crate::repo::Progress,
    ) -> Result<ExtractReport, Error> {
        let parsed = items
            .iter()
            .map(|i| parse_path(i))
            .collect::<Result<Vec<_>, _>>()?;
        let mut ex = extract::Extractor::new(root, *limits, progress)?;
        for (item, comps) in items.iter().zip(&parsed) {
            let Some((volume, rest)) = comps.split_first() else {
                return Err(Error::BadPath {
                    path: item.clone(),
                    reason: "name a volume or something in one (e.g. /p2/etc)".into(),
                });
            };
            let part = self.volume(volume)?;
            let mut tree = self.tree(part)?;
            let name = rest.last().unwrap_or(volume).clone();
            guarded("extract", || {
                ex.extract_item(tree.as_mut(), item, rest, &name)
            })?;
        }
        ex.finish()
    }
}
