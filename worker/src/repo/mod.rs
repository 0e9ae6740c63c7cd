//! The repository: where cairn keeps the recovery points of VM disks.
//!
//! A repository is a local (or NFS) folder. It owns the on-disk format described here and every
//! operation on it: backup, restore, delta restore, verify, forget, gc and stats. It knows nothing
//! of jobs, events or the orchestrator; callers hand it image sources and sinks
//! ([`crate::source`]) and get plain results back.
//!
//! # Format, version 1
//!
//! ```text
//! DIR/cairn-repo.json                      repository config (JSON; see [`config`])
//! DIR/disks/<disk-id>/                     one disk lineage: every recovery point of one disk
//! DIR/disks/<disk-id>/packs/<seq>.pack     pack files: chunks of this lineage (see [`pack`])
//! DIR/disks/<disk-id>/rps/<rp-id>.rpi      one index per recovery point (see [`index`])
//! DIR/disks/<disk-id>/damaged.json         chunk ids the last verify found damaged (healing)
//! DIR/disks/<disk-id>/write.lock           flock: backup, forget and gc (exclusive)
//! DIR/disks/<disk-id>/read.lock            flock: restore, verify (shared); gc (exclusive)
//! DIR.key                                  the key file looked for when none is given
//!                                          (beside the folder, never inside it)
//! ```
//!
//! - Every file the repository creates is mode 0600 and every folder 0700, given to `open` and
//!   `mkdir` (a umask can only tighten them), so there is no moment when another user could
//!   open one. A key file is read only when the process's effective user owns it and group and
//!   others have no permission on it.
//!
//! - A disk is cut into fixed-size chunks (default 64 KiB, set at `init`, a power of two from
//!   4 KiB to 16 MiB). Chunk *position* `p` covers bytes `[p * chunk_size, (p + 1) * chunk_size)`.
//! - A chunk's id is BLAKE3 of its plaintext; keyed BLAKE3 when the repository is encrypted, so
//!   the store cannot confirm that it holds some known content.
//! - All-zero chunks are never stored: an index records them as zero (or omits them).
//! - Stored chunks are zstd-compressed (kept raw when that does not help) and, when encrypted,
//!   sealed with XChaCha20-Poly1305 (random 192-bit nonce, the chunk id as associated data).
//! - Chunks are appended to pack files of about 32 MiB. A pack is written to a temporary file,
//!   fsynced, renamed into place and its folder fsynced before any index may reference it.
//! - An index maps chunk position → (chunk id, pack, offset, length). A *full* index lists every
//!   non-zero position; a *delta* index lists only the positions that changed since its parent
//!   (a zero record marks a position that became zero). Every `full_every` recovery points
//!   (default 8) the backup writes a full index, so a restore merges at most that many files.
//! - Dedup is positional within a lineage: an unchanged position reuses its parent's chunk.
//!   GC and verify work on one lineage at a time, in memory proportional to one disk.
//!
//! # Crash safety
//!
//! Every file is written as temp file → fsync → rename → fsync of the folder. A recovery point
//! exists once its index is renamed into place, and an index is written only after every pack
//! it references is durable. A backup that dies leaves complete packs that no index references;
//! the next backup of that disk reuses the chunks in them instead of storing them again, and gc
//! removes what nobody reused.
//!
//! # Locks (per disk lineage)
//!
//! | running ↓ / wants →  | backup | restore | verify | forget | gc   |
//! |----------------------|--------|---------|--------|--------|------|
//! | backup               | no     | yes     | yes    | no     | no   |
//! | restore              | yes    | yes     | yes    | yes    | no   |
//! | verify               | yes    | yes     | yes    | yes    | no   |
//! | forget               | no     | yes     | yes    | no     | no   |
//! | gc                   | no     | no      | no     | no     | no   |
//!
//! Backup, forget and gc hold `write.lock` exclusively; restore and verify hold `read.lock`
//! shared and gc holds it exclusively (gc is the only operation that deletes or rewrites packs).
//! A forget may delete an index a restore has open; the restore keeps its open file. Locks are
//! `flock`s, released by the kernel when a process dies, so a crash never leaves a stale lock.

pub mod backup;
pub mod config;
pub mod crypto;
pub mod image;
pub mod index;
pub mod lineage;
pub mod maintenance;
pub mod pack;
pub mod restore;
pub mod stamp;
pub mod verify;

mod fsutil;

use std::path::PathBuf;

pub use backup::{BackupOptions, BackupSummary, backup};
pub use config::{EncryptionConfig, RepoConfig};
pub use lineage::{RecoveryPointInfo, Repository};
pub use maintenance::{ForgetSummary, GcSummary, RepoStats};
pub use restore::{RestoreSummary, restore};
pub use verify::{VerifyReport, verify};

/// Errors of repository operations. Each names the file, disk or recovery point concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: not a cairn repository (no cairn-repo.json)")]
    NotARepository { path: PathBuf },
    #[error("{path}: already exists and is not empty; a repository needs an empty folder")]
    AlreadyExists { path: PathBuf },
    #[error(
        "{path}: repository format version {version} is not supported (this cairn reads version 1)"
    )]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: damaged repository config: {reason}")]
    CorruptConfig { path: PathBuf, reason: String },
    #[error("{path}: the repository is encrypted; pass --key-file")]
    KeyRequired { path: PathBuf },
    #[error("{key_file}: wrong key for repository {repo}")]
    WrongKey { key_file: PathBuf, repo: PathBuf },
    #[error("{path}: unusable key file: {reason}")]
    BadKeyFile { path: PathBuf, reason: String },
    #[error("key file {path} is {who} (mode {mode:04o}): chmod 600 it")]
    KeyFileExposed {
        path: PathBuf,
        mode: u32,
        who: &'static str,
    },
    #[error(
        "key file {path} is owned by uid {owner}, but cairn runs as uid {euid}: chown it to uid \
         {euid} (and chmod 600 it), or run cairn as its owner"
    )]
    KeyFileOwner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error("invalid chunk size {0}: must be a power of two from 4 KiB to 16 MiB")]
    InvalidChunkSize(u64),
    #[error("invalid disk id {id:?}: {reason}")]
    InvalidDiskId { id: String, reason: &'static str },
    #[error("disk {disk}: no such disk in the repository")]
    NoSuchDisk { disk: String },
    #[error("disk {disk}: no recovery point {rp}")]
    NoSuchRp { disk: String, rp: String },
    #[error("disk {disk}: busy: {what}")]
    Busy { disk: String, what: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: damaged pack: {reason}")]
    CorruptPack { path: PathBuf, reason: String },
    #[error("{path}: damaged recovery point index: {reason}")]
    CorruptIndex { path: PathBuf, reason: String },
    #[error("disk {disk}: chunk {id} at position {pos} is damaged: {reason}")]
    DamagedChunk {
        disk: String,
        pos: u64,
        id: String,
        reason: String,
    },
    #[error("{target}: size {target_size} differs from the recovery point's disk size {rp_size}")]
    SizeMismatch {
        target: String,
        target_size: u64,
        rp_size: u64,
    },
    #[error(transparent)]
    Source(#[from] crate::source::Error),
    #[error("{0}")]
    Invalid(String),
    /// The caller asked the operation to stop ([`Progress::cancelled`]). Nothing half-done was
    /// published: the repository is as a crash at that moment would have left it.
    #[error("{operation} cancelled")]
    Cancelled { operation: &'static str },
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// Progress of a long operation, reported by the repository and shown by the caller (a
/// terminal progress bar, a step heartbeat). Implementations must be cheap: `advance` and
/// `cancelled` are called once per batch of chunks, from any of the operation's threads.
pub trait Progress: Send + Sync {
    /// The operation starts; `total` is in bytes.
    fn start(&self, what: &str, total: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
    /// Whether the caller wants the operation to stop. Backup and restore ask once per batch
    /// and then return [`Error::Cancelled`].
    fn cancelled(&self) -> bool {
        false
    }
}

/// A [`Progress`] that shows nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _what: &str, _total: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// Whether every byte of `buf` is zero. Folds 256-byte blocks word-wise so the compiler
/// vectorises it, and stops at the first non-zero block.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(256);
    for block in blocks.by_ref() {
        let acc = block.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().expect("8-byte word"))
        });
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests;
