//! Steps: the plan of a job, the spec that tells a worker everything it needs to run one step
//! attempt, the result it returns, and the reports it sends while running.
//!
//! A worker holds no state between steps: what a step needs is in its [`StepSpec`], in the
//! hypervisor or in the repository. The `partition`, `epoch` and `attempt` of a spec are
//! echoed in every [`Report`] so that the orchestrator can refuse reports from superseded
//! attempts or from a partition owner that has been replaced (fencing).

use serde::{Deserialize, Serialize};

use super::domain::{Consistency, DiskInfo, FailureClass, ImageFormat, RecoveryTarget, Throttle};
use super::policy::ConsistencyWanted;
use crate::ids::{DiskId, JobId, NodeId, RecoveryPointId, StepId, VmId};

/// What a step does, without the details a worker needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StepKind {
    /// Freeze a point-in-time view of all the VM's disks and start fresh change tracking.
    Snapshot,
    /// Copy one disk's changed blocks from the snapshot into the repository.
    Transfer {
        /// The disk.
        disk: DiskId,
    },
    /// Drop the snapshot view (runs whether transfers succeeded or not).
    ReleaseSnapshot,
    /// Write the recovery point's manifest; after it the recovery point exists.
    CommitRecoveryPoint,
    /// Write one disk of a recovery point to its target.
    Restore {
        /// The disk.
        disk: DiskId,
    },
    /// Re-hash one disk's stored chunks and name the damaged recovery points.
    VerifyDisk {
        /// The disk.
        disk: DiskId,
    },
    /// Read one disk of the snapshot, compare its chunk ids with the replica and store what
    /// differs as a repaired recovery point (a consistency check).
    CheckDisk {
        /// The disk.
        disk: DiskId,
    },
    /// Remove one disk's recovery points past retention.
    Prune {
        /// The disk.
        disk: DiskId,
    },
    /// Reclaim the repository space no recovery point references any more.
    CollectGarbage,
    /// Copy one disk of a seed (made offline) into the repository as a recovery point.
    ImportSeed {
        /// The disk.
        disk: DiskId,
    },
    /// Check, before anything is written, that the recovery can go ahead (the original VM is
    /// stopped, the targets are usable).
    PrepareRecovery,
    /// After the disks: write the new VM's descriptor (alternate host) or the folder's
    /// manifest (copy to a folder).
    FinishRecovery,
    /// Extract files and folders out of one disk of a recovery point (item-level recovery).
    ExtractItems {
        /// The disk.
        disk: DiskId,
    },
}

/// One step in a job's plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedStep {
    /// The step's id (stable across attempts).
    pub step: StepId,
    /// What it does.
    pub kind: StepKind,
    /// Steps that must be finished first.
    pub after: Vec<StepId>,
    /// Runs once the steps in `after` are finished, even if they failed (a `finally`).
    pub always: bool,
}

/// A disk as a worker reads or writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSource {
    /// The disk's name within its VM.
    pub disk: DiskId,
    /// Image path on the node (or QEMU block node name).
    pub image_path: String,
    /// Image format.
    pub format: ImageFormat,
    /// Virtual size in bytes.
    pub size_bytes: u64,
}

impl From<DiskInfo> for DiskSource {
    fn from(info: DiskInfo) -> Self {
        Self {
            disk: info.disk,
            image_path: info.image_path,
            format: info.format,
            size_bytes: info.size_bytes,
        }
    }
}

/// The change-tracking bitmap that a snapshot started for one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskTracking {
    /// The disk.
    pub disk: DiskId,
    /// Name of the persistent dirty bitmap, handed to the next incremental transfer.
    pub bitmap: String,
}

/// Everything a worker needs for one step, by step kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepWork {
    /// Freeze a point-in-time view of the disks.
    Snapshot {
        /// The hypervisor's name for the VM.
        vm_name: String,
        /// The disks to include.
        disks: Vec<DiskSource>,
        /// Consistency level wanted.
        consistency: ConsistencyWanted,
    },
    /// Copy one disk into the repository.
    Transfer {
        /// The disk to read.
        source: DiskSource,
        /// Handle of the snapshot view, from the snapshot step's result.
        snapshot: String,
        /// Repository location (path or URL).
        repository: String,
        /// The recovery point being made.
        rp: RecoveryPointId,
        /// The previous recovery point of this disk, if any; unchanged positions reuse its
        /// chunks.
        parent_rp: Option<RecoveryPointId>,
        /// Change-tracking bitmap to read only changed blocks; `None` reads everything.
        change_tracking: Option<String>,
        /// Chunk size in bytes.
        chunk_size: u32,
    },
    /// Drop a snapshot view.
    ReleaseSnapshot {
        /// The handle from the snapshot step's result.
        snapshot: String,
    },
    /// Write the recovery point's manifest into the repository.
    CommitRecoveryPoint {
        /// Repository location.
        repository: String,
        /// The recovery point.
        rp: RecoveryPointId,
        /// Its disks (each transferred by a transfer step of the same job).
        disks: Vec<DiskId>,
        /// Consistency level reached by the snapshot.
        consistency: Consistency,
    },
    /// Write one disk of a recovery point to a target.
    Restore {
        /// The disk.
        disk: DiskId,
        /// Repository location.
        repository: String,
        /// The recovery point to read.
        rp: RecoveryPointId,
        /// Where to write (image path or folder).
        target_path: String,
        /// Format to write.
        target_format: ImageFormat,
    },
    /// Re-hash one disk's lineage.
    VerifyDisk {
        /// Repository location.
        repository: String,
        /// The disk.
        disk: DiskId,
    },
    /// A consistency check of one disk: read all of it from the snapshot, store every chunk
    /// whose id differs from the replica's at that position as recovery point `rp`.
    CheckDisk {
        /// The disk to read.
        source: DiskSource,
        /// Handle of the snapshot view.
        snapshot: String,
        /// Repository location.
        repository: String,
        /// The repaired recovery point being made.
        rp: RecoveryPointId,
        /// The replica's latest recovery point, compared against.
        parent_rp: Option<RecoveryPointId>,
        /// Chunk size in bytes.
        chunk_size: u32,
    },
    /// Remove recovery points of one disk (kept ones stay restorable).
    Prune {
        /// Repository location.
        repository: String,
        /// The disk.
        disk: DiskId,
        /// The recovery points to remove.
        remove: Vec<RecoveryPointId>,
    },
    /// Garbage-collect the repository.
    CollectGarbage {
        /// Repository location.
        repository: String,
    },
    /// Copy the latest recovery point of one disk in a seed folder into the repository.
    ImportSeed {
        /// The disk.
        disk: DiskId,
        /// The seed folder (a repository written by `cairn seed export`).
        seed: String,
        /// Repository location.
        repository: String,
        /// The recovery point being made.
        rp: RecoveryPointId,
    },
    /// Write one disk of a recovery point to a target, with options.
    RestoreDisk {
        /// The disk.
        disk: DiskId,
        /// Repository location.
        repository: String,
        /// The recovery point to read.
        rp: RecoveryPointId,
        /// Image path to write.
        target_path: String,
        /// Format to write.
        target_format: ImageFormat,
        /// The target is the original VM's disk: it must exist and is overwritten with a delta
        /// restore (only chunks that differ are written).
        overwrite: bool,
        /// Bandwidth limit of the writes.
        throttle: Option<Throttle>,
    },
    /// Check that a recovery can go ahead before anything is written.
    PrepareRecovery {
        /// Where the recovery writes.
        target: RecoveryTarget,
        /// The recovered VM's name.
        vm_name: String,
        /// The disks as the target will hold them (`image_path` = the target path).
        disks: Vec<DiskSource>,
    },
    /// Finish a recovery: the new VM's descriptor or the folder's manifest.
    FinishRecovery {
        /// Where the recovery wrote.
        target: RecoveryTarget,
        /// The recovery point.
        rp: RecoveryPointId,
        /// When the recovery point was taken (Unix milliseconds).
        taken_at: u64,
        /// The source VM's name.
        source_name: String,
        /// The recovered VM: its id (a new one for an alternate host) and name.
        vm: VmId,
        /// Its name.
        vm_name: String,
        /// The disks as written (`image_path` = the target path).
        disks: Vec<DiskSource>,
    },
    /// Extract items out of one disk of a recovery point, read straight from the repository.
    ExtractItems {
        /// The disk.
        disk: DiskId,
        /// Repository location.
        repository: String,
        /// The recovery point to read.
        rp: RecoveryPointId,
        /// Paths inside the disk: `/<volume>/<path>` with volume `p1`, `p2`, … or `disk`.
        items: Vec<String>,
        /// Target folder; nothing is written outside it.
        target_path: String,
    },
    /// [`StepWork::RestoreDisk`] whose throttle's work hours follow a named time zone.
    RestoreDiskInZone {
        /// The disk.
        disk: DiskId,
        /// Repository location.
        repository: String,
        /// The recovery point to read.
        rp: RecoveryPointId,
        /// Image path to write.
        target_path: String,
        /// Format to write.
        target_format: ImageFormat,
        /// The target is the original VM's disk (a delta restore, as in `RestoreDisk`).
        overwrite: bool,
        /// Bandwidth limit of the writes.
        throttle: Option<Throttle>,
        /// The zone of the throttle's work hours: an IANA name or a POSIX TZ rule. A worker
        /// that cannot read it falls back to the throttle's `utc_offset_minutes`.
        timezone: String,
    },
}

/// One attempt of one step, as dispatched to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    /// The step.
    pub step: StepId,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// The job it belongs to.
    pub job: JobId,
    /// The partition that owns the job.
    pub partition: u16,
    /// The partition owner's epoch (lease revision) when it dispatched the step.
    pub epoch: u64,
    /// The node that must run it.
    pub node: NodeId,
    /// The VM.
    pub vm: VmId,
    /// What to do.
    pub work: StepWork,
}

impl StepSpec {
    /// The kind of step this spec runs.
    pub fn kind(&self) -> StepKind {
        match &self.work {
            StepWork::Snapshot { .. } => StepKind::Snapshot,
            StepWork::Transfer { source, .. } => StepKind::Transfer {
                disk: source.disk.clone(),
            },
            StepWork::ReleaseSnapshot { .. } => StepKind::ReleaseSnapshot,
            StepWork::CommitRecoveryPoint { .. } => StepKind::CommitRecoveryPoint,
            StepWork::VerifyDisk { disk, .. } => StepKind::VerifyDisk { disk: disk.clone() },
            StepWork::CheckDisk { source, .. } => StepKind::CheckDisk {
                disk: source.disk.clone(),
            },
            StepWork::Prune { disk, .. } => StepKind::Prune { disk: disk.clone() },
            StepWork::CollectGarbage { .. } => StepKind::CollectGarbage,
            StepWork::ImportSeed { disk, .. } => StepKind::ImportSeed { disk: disk.clone() },
            StepWork::Restore { disk, .. }
            | StepWork::RestoreDisk { disk, .. }
            | StepWork::RestoreDiskInZone { disk, .. } => StepKind::Restore { disk: disk.clone() },
            StepWork::PrepareRecovery { .. } => StepKind::PrepareRecovery,
            StepWork::FinishRecovery { .. } => StepKind::FinishRecovery,
            StepWork::ExtractItems { disk, .. } => StepKind::ExtractItems { disk: disk.clone() },
        }
    }

    /// The report of this attempt, by the node it was sent to, with `body`.
    pub fn report(&self, body: ReportBody) -> Report {
        Report {
            step: self.step,
            attempt: self.attempt,
            job: self.job,
            partition: self.partition,
            epoch: self.epoch,
            node: self.node.clone(),
            body,
        }
    }
}

/// What a successful step produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepResult {
    /// The snapshot view exists.
    Snapshot {
        /// Handle for the transfer and release steps.
        snapshot: String,
        /// Consistency level reached.
        consistency: Consistency,
        /// New change-tracking bitmaps, one per disk.
        tracking: Vec<DiskTracking>,
    },
    /// A disk was copied.
    Transfer {
        /// The disk.
        disk: DiskId,
        /// Bytes read from the source.
        bytes_read: u64,
        /// Bytes written to the repository (after dedup and compression).
        bytes_stored: u64,
        /// Whether only changed blocks were read.
        incremental: bool,
    },
    /// The snapshot view is gone.
    ReleaseSnapshot,
    /// The recovery point's manifest is written.
    CommitRecoveryPoint,
    /// A disk was restored.
    Restore {
        /// The disk.
        disk: DiskId,
        /// Bytes written to the target.
        bytes_written: u64,
    },
    /// A disk was verified.
    VerifyDisk {
        /// The disk.
        disk: DiskId,
        /// Chunks re-hashed.
        chunks_checked: u64,
        /// Recovery points with at least one damaged chunk.
        damaged_rps: Vec<RecoveryPointId>,
        /// Damaged chunks found.
        n_damaged_chunks: u64,
    },
    /// A disk was checked against its replica and the differences stored.
    CheckDisk {
        /// The disk.
        disk: DiskId,
        /// Chunks compared.
        chunks_compared: u64,
        /// Chunks whose id differed from the replica's (or that were damaged there).
        chunks_differing: u64,
        /// Bytes read from the source.
        bytes_read: u64,
        /// Bytes written to the repository.
        bytes_stored: u64,
    },
    /// Recovery points of a disk were removed.
    Prune {
        /// The disk.
        disk: DiskId,
        /// What was removed.
        removed: Vec<RecoveryPointId>,
    },
    /// The repository was garbage-collected.
    CollectGarbage {
        /// Bytes given back to the filesystem.
        bytes_freed: u64,
    },
    /// A seed disk was imported.
    ImportSeed {
        /// The disk.
        disk: DiskId,
        /// Bytes written to the repository.
        bytes_stored: u64,
    },
    /// The recovery may go ahead.
    PrepareRecovery,
    /// The recovery is finished on the node.
    FinishRecovery {
        /// The file written: the new VM's descriptor or the folder's manifest (empty for the
        /// original VM).
        written: String,
    },
    /// Items were extracted.
    ExtractItems {
        /// The disk.
        disk: DiskId,
        /// Files written.
        files: u64,
        /// Folders created.
        dirs: u64,
        /// Bytes written.
        bytes: u64,
        /// What was not extracted and why (`path: reason`), at most a few hundred lines.
        skipped: Vec<String>,
    },
}

/// What a worker says about a step attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportBody {
    /// The worker began the attempt.
    Started,
    /// Progress; also the heartbeat that keeps the attempt from timing out.
    Progress {
        /// Bytes done so far.
        bytes_done: u64,
        /// Bytes to do in total (may grow as the worker learns more).
        bytes_total: u64,
    },
    /// The attempt succeeded.
    Succeeded {
        /// What it produced.
        result: StepResult,
    },
    /// The attempt failed.
    Failed {
        /// Whether to retry.
        class: FailureClass,
        /// What went wrong, for humans.
        message: String,
    },
}

/// A report from a worker about one step attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The step.
    pub step: StepId,
    /// The attempt, copied from the spec.
    pub attempt: u32,
    /// The job, copied from the spec.
    pub job: JobId,
    /// The partition, copied from the spec.
    pub partition: u16,
    /// The owner epoch, copied from the spec.
    pub epoch: u64,
    /// The node that ran it.
    pub node: NodeId,
    /// What happened.
    pub body: ReportBody,
}
