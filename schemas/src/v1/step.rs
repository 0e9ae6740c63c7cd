//! Steps: the plan of a job, the spec that tells a worker everything it needs to run one step
//! attempt, the result it returns, and the reports it sends while running.
//!
//! A worker holds no state between steps: what a step needs is in its [`StepSpec`], in the
//! hypervisor or in the repository. The `partition`, `epoch` and `attempt` of a spec are
//! echoed in every [`Report`] so that the orchestrator can refuse reports from superseded
//! attempts or from a partition owner that has been replaced (fencing).

use serde::{Deserialize, Serialize};

use super::domain::{Consistency, DiskInfo, FailureClass, ImageFormat};
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
            StepWork::Restore { disk, .. } => StepKind::Restore { disk: disk.clone() },
            StepWork::ExtractItems { disk, .. } => StepKind::ExtractItems { disk: disk.clone() },
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
