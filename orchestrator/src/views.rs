//! Read models served by the HTTP API and printed by the CLI client: plain, JSON-friendly
//! snapshots of the projections. Ids are strings; times are Unix milliseconds.
//!
//! These types are the API's wire format (JSON). Fields are only ever added, with
//! `#[serde(default)]`, so older clients keep working.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskView {
    pub disk: String,
    pub size_bytes: u64,
    pub format: String,
    pub image_path: String,
    /// `PendingReplicaCreation`, `InitialReplication`, `Protected`, `ReplicaInconsistent`.
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmView {
    pub vm: String,
    pub name: String,
    pub node: String,
    pub power: String,
    pub disks: Vec<DiskView>,
    /// The protection group the VM belongs to, if any.
    pub group: Option<String>,
    pub last_backup_at: Option<u64>,
    pub recovery_points: u64,
    /// False once the node stopped reporting it.
    pub present: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    pub group: String,
    pub name: String,
    pub members: Vec<String>,
    pub retention_days: u32,
    /// Synchronization frequency, e.g. `60m`, or `before-recovery-point`.
    pub sync: String,
    pub created_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepView {
    pub step: String,
    /// `Snapshot`, `Transfer disk0`, `ReleaseSnapshot`, `CommitRecoveryPoint`, `Restore disk0`.
    pub kind: String,
    /// `Pending`, `Dispatched`, `Running`, `RetryScheduled`, `Succeeded`, `Failed`, `Skipped`.
    pub state: String,
    pub attempt: u32,
    pub node: Option<String>,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub job: String,
    /// `Backup`, `Recovery`, `ConsistencyCheck`, ...
    pub kind: String,
    pub vm: String,
    pub vm_name: String,
    /// `Scheduled`, `Queued`, `Running`, `Retrying`, `Succeeded`, `Failed`, `Cancelled`.
    pub state: String,
    /// Why a queued job waits (node busy, node offline, ...).
    pub wait_reason: Option<String>,
    pub reason: String,
    pub node: Option<String>,
    pub requested_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub error: Option<String>,
    pub cancel_requested: bool,
    /// The recovery point a backup committed (or a recovery restores).
    pub rp: Option<String>,
    pub steps: Vec<StepView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpDiskView {
    pub disk: String,
    pub bytes_read: u64,
    pub bytes_stored: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpView {
    pub rp: String,
    pub vm: String,
    pub job: String,
    pub taken_at: u64,
    /// `CrashConsistent`, `FileConsistent`, `ApplicationConsistent`.
    pub consistency: String,
    pub disks: Vec<RpDiskView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub node: String,
    pub cluster: String,
    pub online: bool,
    pub last_seen: Option<u64>,
    pub vms: u64,
    pub running_backups: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    pub seq: u64,
    pub event_id: String,
    pub recorded_at: u64,
    /// e.g. `job/0193…`.
    pub aggregate: String,
    pub version: u64,
    /// e.g. `StepSucceeded`.
    pub name: String,
    pub actor: String,
    pub correlation: Option<String>,
    /// A human one-liner of the payload.
    pub summary: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReport {
    pub ok: bool,
    pub events_checked: u64,
    /// Set when the chain is broken: the first event whose bytes were changed.
    pub first_broken_seq: Option<u64>,
    pub first_broken_event: Option<String>,
    pub detail: Option<String>,
}

/// What a command that was accepted returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The id of what the command created or acted on (group id, job id).
    pub id: String,
    /// Sequence of the last event the command appended (read-your-writes for `events tail`).
    pub seq: u64,
}

/// A folder listing inside a recovery point (item-level recovery).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrowseView {
    pub vm: String,
    pub rp: String,
    pub disk: String,
    pub path: String,
    pub entries: Vec<cairn_schemas::BrowseEntry>,
}
