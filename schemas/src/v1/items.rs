//! The browse query of item-level recovery: the orchestrator asks the worker of a node to list
//! a folder inside one disk of a recovery point. A request/reply, never persisted in events;
//! versioned with the rest of v1 (same rules: new variants and types only at the end).

use serde::{Deserialize, Serialize};

use crate::ids::{DiskId, RecoveryPointId, VmId};

/// List `path` of disk `disk` of recovery point `rp` of VM `vm`, stored in `repository`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrowseRequest {
    /// The VM.
    pub vm: VmId,
    /// The recovery point.
    pub rp: RecoveryPointId,
    /// The disk.
    pub disk: DiskId,
    /// Repository location.
    pub repository: String,
    /// `/` for the volumes, `/p2/etc` for a folder.
    pub path: String,
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrowseEntry {
    /// The name as stored in the image (lossy UTF-8).
    pub name: String,
    /// `file`, `dir`, `symlink`, `special` or `volume`.
    pub kind: String,
    /// Bytes (files, volumes).
    pub size: u64,
    /// Unix permission bits, when the file system has them.
    pub mode: Option<u32>,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: Option<i64>,
    /// Volumes: file system and partition label.
    pub detail: Option<String>,
}
