//! Domain types shared by events, commands and steps: disk descriptions, data source states,
//! job kinds and states, recovery targets, failure classes.

use serde::{Deserialize, Serialize};

use crate::ids::{DiskId, NodeId, RecoveryPointId, VmId};

/// Format of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImageFormat {
    /// Raw image (or a block device).
    Raw,
    /// QEMU copy-on-write v2.
    Qcow2,
    /// Hyper-V VHDX.
    Vhdx,
    /// Legacy VHD (VPC).
    Vhd,
}

/// One disk of a VM as the hypervisor reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The disk's name within its VM.
    pub disk: DiskId,
    /// Virtual size in bytes.
    pub size_bytes: u64,
    /// Image format.
    pub format: ImageFormat,
    /// Path of the image on its node (or the QEMU block node name for live VMs).
    pub image_path: String,
}

/// Power state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PowerState {
    /// Running.
    Running,
    /// Stopped (offline backups read the images directly).
    Stopped,
    /// Paused or suspended.
    Paused,
}

/// One VM in a node's inventory report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInventory {
    /// cairn's id for the VM (the worker derives or remembers it; the hypervisor UUID is not
    /// guaranteed to be v7).
    pub vm: VmId,
    /// The hypervisor's name for the VM.
    pub name: String,
    /// Its disks.
    pub disks: Vec<DiskInfo>,
    /// Its power state.
    pub power: PowerState,
}

/// Protection state of one VM disk (data source), as MABS defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DataSourceState {
    /// Member of a group, no replica yet.
    PendingReplicaCreation,
    /// The first full copy is being made.
    InitialReplication,
    /// The replica is consistent; backups are incremental.
    Protected,
    /// The replica cannot be trusted (crash mid-backup, lost change tracking, failed check,
    /// damaged chunks); a consistency check repairs it. Retention is paused meanwhile.
    ReplicaInconsistent,
}

/// How a backup reads a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BackupMode {
    /// Read only the blocks that the change-tracking bitmap marks as changed.
    Incremental,
    /// Read everything (no valid bitmap, or scheduled express full), store only what changed.
    ExpressFull,
}

/// Where a recovery writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecoveryTarget {
    /// Over the original VM's disks (the VM must be stopped).
    OriginalVm,
    /// New images on another host (or the same one) at `path`, in `format`.
    AlternateHost {
        /// Node that writes the images.
        node: NodeId,
        /// Folder for the new images.
        path: String,
        /// Image format to write.
        format: ImageFormat,
    },
    /// Copy of the recovery point's disks as files in a folder.
    CopyToFolder {
        /// Node that writes the files.
        node: NodeId,
        /// Target folder.
        path: String,
    },
    /// Single files and folders out of one disk's filesystems.
    ItemLevel {
        /// Node that writes the files.
        node: NodeId,
        /// Disk to read from.
        disk: DiskId,
        /// Paths inside the guest filesystems, e.g. `part2:/etc/fstab`.
        items: Vec<String>,
        /// Target folder; extracted paths never escape it.
        path: String,
    },
}

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    /// First full copy of a VM's disks.
    InitialReplication,
    /// A synchronization (incremental) or express full backup.
    Backup {
        /// How the disks are read.
        mode: BackupMode,
    },
    /// Compare the replica with the source and repair it.
    ConsistencyCheck,
    /// Restore a recovery point.
    Recovery {
        /// The recovery point to restore.
        rp: RecoveryPointId,
        /// Where to write.
        target: RecoveryTarget,
    },
    /// Re-hash a VM's stored chunks and mark damaged recovery points.
    Verify,
    /// Remove recovery points past retention.
    Prune,
    /// Delete chunks that no recovery point references any more.
    GarbageCollect,
    /// Copy a recovery point to the offsite repository.
    OffsiteCopy {
        /// The recovery point to copy.
        rp: RecoveryPointId,
    },
    /// Make the replica from a seed exported offline (`cairn seed export`); a consistency
    /// check must follow before the data source counts as protected.
    SeedImport {
        /// The seed folder on the VM's node.
        seed: String,
    },
}

/// Why a job was requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobReason {
    /// The group's schedule asked for it.
    Scheduled,
    /// An operator or a script asked for it.
    Manual,
    /// A replica became inconsistent and the policy repairs automatically.
    ReplicaInconsistent,
}

/// Why a queued job waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitReason {
    /// The node already runs its maximum of parallel backups.
    NodeBusy,
    /// The node's worker is not heartbeating.
    NodeOffline,
    /// The repository is out of space.
    StorageFull,
    /// The shared volume already runs its maximum of parallel backups.
    VolumeBusy,
    /// Another job holds the VM (e.g. a restore while a backup runs).
    VmBusy,
}

/// Lifecycle state of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobState {
    /// Requested for a later time.
    Scheduled,
    /// Waiting for a slot (see [`WaitReason`]).
    Queued,
    /// Steps are running.
    Running,
    /// A step failed retryably and waits for its next attempt.
    Retrying,
    /// Done, all steps succeeded.
    Succeeded,
    /// Done, a step failed permanently or retries ran out.
    Failed,
    /// Done, cancelled on request.
    Cancelled,
}

impl JobState {
    /// Whether the job is over.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// Whether a failed step may succeed if tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureClass {
    /// Transient (node busy, network, lock held): retry with backoff.
    Retryable,
    /// Will fail again (VM gone, bad image, permission): do not retry.
    Permanent,
}

/// Consistency level a recovery point actually has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Consistency {
    /// The guest agent froze the filesystems (application/file consistent).
    Application,
    /// As after a power loss.
    Crash,
}

/// A bandwidth limit of a recovery's writes, by work hours and non-work hours (MABS's recovery
/// throttle with its work schedule). A limit of 0 means unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttle {
    /// Limit during work hours, in bytes per second (0 = unlimited).
    pub work_bytes_per_sec: u64,
    /// Limit outside work hours, in bytes per second (0 = unlimited).
    pub off_bytes_per_sec: u64,
    /// Work days as a bit set: bit 0 = Monday … bit 6 = Sunday.
    pub work_days: u8,
    /// Start of work hours, in minutes after local midnight (0–1439).
    pub work_start_minute: u16,
    /// End of work hours, in minutes after local midnight (1–1440), after the start.
    pub work_end_minute: u16,
    /// The schedule's time zone as an offset from UTC in minutes (e.g. 60 for CET); for
    /// work hours in a named zone (`RestoreDiskInZone`), the zone's offset when the recovery
    /// was requested, used only by a worker that cannot read the zone.
    pub utc_offset_minutes: i16,
}

impl Throttle {
    /// Monday to Friday.
    pub const WEEKDAYS: u8 = 0b001_1111;
    /// Lowest limit accepted (64 KiB/s): slower writes would look like a stalled step.
    pub const MIN_BYTES_PER_SEC: u64 = 64 * 1024;

    /// Checks the schedule's fields; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.work_days & 0x80 != 0 {
            return Err(format!(
                "work_days {:#x} has a bit above Sunday",
                self.work_days
            ));
        }
        if self.work_start_minute >= 1440 {
            return Err(format!(
                "work_start_minute {} is not a minute of the day (0-1439)",
                self.work_start_minute
            ));
        }
        if self.work_end_minute > 1440 || self.work_end_minute <= self.work_start_minute {
            return Err(format!(
                "work_end_minute {} must be after work_start_minute {} and at most 1440",
                self.work_end_minute, self.work_start_minute
            ));
        }
        for (name, rate) in [
            ("work_bytes_per_sec", self.work_bytes_per_sec),
            ("off_bytes_per_sec", self.off_bytes_per_sec),
        ] {
            if rate != 0 && rate < Self::MIN_BYTES_PER_SEC {
                return Err(format!(
                    "{name} {rate} is below the minimum of {} bytes/s (0 = unlimited)",
                    Self::MIN_BYTES_PER_SEC
                ));
            }
        }
        if !(-14 * 60..=14 * 60).contains(&self.utc_offset_minutes) {
            return Err(format!(
                "utc_offset_minutes {} is outside -840..=840",
                self.utc_offset_minutes
            ));
        }
        Ok(())
    }

    /// Whether local wall time `minute_of_day` (0–1439) on `weekday` (0 = Monday … 6 =
    /// Sunday) falls in work hours. The caller turns an instant into local time with the
    /// zone of the schedule (the fixed `utc_offset_minutes`, or the named zone of a
    /// `RestoreDiskInZone` step): this crate has no calendar.
    pub fn is_work_minute(&self, weekday: u8, minute_of_day: u16) -> bool {
        weekday < 7
            && self.work_days & (1 << weekday) != 0
            && minute_of_day >= self.work_start_minute
            && minute_of_day < self.work_end_minute
    }

    /// The limit in force at local wall time `minute_of_day` on `weekday`, in bytes per
    /// second (0 = unlimited).
    pub fn limit_in(&self, weekday: u8, minute_of_day: u16) -> u64 {
        if self.is_work_minute(weekday, minute_of_day) {
            self.work_bytes_per_sec
        } else {
            self.off_bytes_per_sec
        }
    }
}

/// Options of a recovery (MABS's "Specify Recovery Options" page).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryOptions {
    /// Bandwidth limit of the writes; `None` = unlimited.
    pub throttle: Option<Throttle>,
    /// E-mail addresses told when the recovery ends.
    pub notify_email: Vec<String>,
    /// `http://` URLs that receive a JSON POST when the recovery ends.
    pub webhooks: Vec<String>,
    /// Alternate-host recovery: the new VM's name (default `<name>-recovered`).
    pub new_name: Option<String>,
}
