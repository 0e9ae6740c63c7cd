//! Events: facts the orchestrator recorded, one enum per aggregate kind, wrapped in [`Event`].
//!
//! Events are past tense and never rejected: a state machine's `apply` must accept every
//! event its `decide` ever produced, including those of older versions.

use serde::{Deserialize, Serialize};

use super::aggregate::AggregateKind;
use super::domain::{
    Consistency, DataSourceState, DiskInfo, FailureClass, JobKind, JobReason, RecoveryOptions,
    VmInventory, WaitReason,
};
use super::policy::GroupPolicy;
use super::step::{PlannedStep, StepResult, StepSpec};
use super::token::TokenEvent;
use crate::ids::{DiskId, GroupId, JobId, NodeId, RecoveryPointId, StepId, VmId};

/// Events of a protection group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupEvent {
    /// The group was created.
    GroupCreated {
        /// Display name.
        name: String,
        /// Member VMs.
        members: Vec<VmId>,
        /// Its policy.
        policy: GroupPolicy,
    },
    /// VMs joined or left the group.
    GroupMembersChanged {
        /// VMs that joined.
        added: Vec<VmId>,
        /// VMs that left (their recovery points stay until retention removes them).
        removed: Vec<VmId>,
    },
    /// The policy was replaced.
    GroupPolicyChanged {
        /// The new policy.
        policy: GroupPolicy,
    },
    /// The group was deleted.
    GroupDeleted {
        /// Whether its recovery points are to be deleted too. Since soft delete, the deletion
        /// itself is a `RecoveryPointsDeleted` event of each member VM, recorded with this one.
        delete_recovery_points: bool,
    },
    /// The group's retention lock changed: retention may not be set below `days`, and no
    /// recovery point younger than `days` may be deleted. A raise takes effect at once
    /// (`effective_at` is the time it was recorded); a lowering only once the old lock's
    /// period has passed (`effective_at` in the future: a pending change until then).
    RetentionLockChanged {
        /// The lock in days (0 = no lock).
        days: u16,
        /// When it takes effect (Unix milliseconds).
        effective_at: u64,
    },
    /// How long recovery points of the group's VMs stay soft-deleted before they are purged.
    SoftDeletePeriodChanged {
        /// Days, 1-90.
        days: u16,
    },
}

/// Events of a VM (data source).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmEvent {
    /// A worker reported the VM for the first time.
    VmDiscovered {
        /// The node that hosts it.
        node: NodeId,
        /// The hypervisor's name for it.
        name: String,
        /// Its disks.
        disks: Vec<DiskInfo>,
    },
    /// The VM now runs on another node of the same cluster.
    VmMoved {
        /// Previous node.
        from: NodeId,
        /// New node.
        to: NodeId,
    },
    /// The VM is gone from the inventory.
    VmRemoved,
    /// A disk changed size.
    DiskResized {
        /// The disk.
        disk: DiskId,
        /// Previous size in bytes.
        old_size_bytes: u64,
        /// New size in bytes.
        new_size_bytes: u64,
    },
    /// A disk's change-tracking bitmap is missing or invalid; the next backup reads
    /// everything.
    ChangeTrackingLost {
        /// The disk.
        disk: DiskId,
        /// Why, for humans.
        reason: String,
    },
    /// A disk's protection state changed.
    DataSourceStateChanged {
        /// The disk.
        disk: DiskId,
        /// The new state.
        state: DataSourceState,
        /// Why, for humans.
        reason: String,
    },
    /// Recovery points of the VM were soft-deleted: listed as deleted, refused for recovery,
    /// not counted by retention, kept in the repository until `purge_after`, restorable until
    /// then. The actor of the event is who deleted them.
    RecoveryPointsDeleted {
        /// The deleted recovery points.
        rps: Vec<RecoveryPointId>,
        /// From this time on (Unix milliseconds) they are purged (pruned from the repository)
        /// and can no longer be undeleted.
        purge_after: u64,
        /// Why, for humans (`cairn rp delete`, the group was deleted, ...).
        reason: String,
    },
    /// Soft-deleted recovery points were restored: usable again, counted by retention.
    RecoveryPointsUndeleted {
        /// The restored recovery points.
        rps: Vec<RecoveryPointId>,
    },
}

/// A disk of a committed recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedDisk {
    /// The disk.
    pub disk: DiskId,
    /// The recovery point whose chunks this disk's index builds on, if any.
    pub parent_rp: Option<RecoveryPointId>,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes written to the repository.
    pub bytes_stored: u64,
}

/// Events of a job and its steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobEvent {
    /// Someone or something asked for the job.
    JobRequested {
        /// What to do.
        kind: JobKind,
        /// The VM.
        vm: VmId,
        /// The protection group it runs for, if any.
        group: Option<GroupId>,
        /// Why.
        reason: JobReason,
        /// Not before this time (Unix milliseconds); `None` = now.
        not_before: Option<u64>,
    },
    /// The job waits for a slot.
    JobQueued {
        /// What it waits for; `None` = just its turn.
        wait: Option<WaitReason>,
    },
    /// The job got its slot and its plan.
    JobStarted {
        /// The node that runs its steps.
        node: NodeId,
        /// Its steps.
        plan: Vec<PlannedStep>,
    },
    /// A step attempt was sent to a worker.
    StepDispatched {
        /// The step.
        step: StepId,
        /// The attempt, from 1.
        attempt: u32,
        /// The node it was sent to.
        node: NodeId,
        /// Exactly what was sent.
        spec: StepSpec,
    },
    /// The worker began the attempt.
    StepStarted {
        /// The step.
        step: StepId,
        /// The attempt.
        attempt: u32,
    },
    /// The worker reported progress (recorded sparsely, not for every heartbeat).
    StepProgressed {
        /// The step.
        step: StepId,
        /// The attempt.
        attempt: u32,
        /// Bytes done.
        bytes_done: u64,
        /// Bytes in total.
        bytes_total: u64,
    },
    /// The attempt succeeded.
    StepSucceeded {
        /// The step.
        step: StepId,
        /// The attempt.
        attempt: u32,
        /// What it produced.
        result: StepResult,
    },
    /// The attempt failed.
    StepFailed {
        /// The step.
        step: StepId,
        /// The attempt.
        attempt: u32,
        /// Whether it may be retried.
        class: FailureClass,
        /// What went wrong.
        message: String,
    },
    /// The attempt's heartbeats stopped.
    StepTimedOut {
        /// The step.
        step: StepId,
        /// The attempt.
        attempt: u32,
    },
    /// The step will be tried again.
    StepRetryScheduled {
        /// The step.
        step: StepId,
        /// The next attempt's number.
        attempt: u32,
        /// When (Unix milliseconds).
        at: u64,
    },
    /// Someone asked to cancel the job.
    JobCancelRequested {
        /// Why, for humans.
        reason: String,
    },
    /// All steps succeeded.
    JobSucceeded,
    /// The job failed.
    JobFailed {
        /// Why, for humans.
        reason: String,
    },
    /// The job was cancelled.
    JobCancelled,
    /// A backup's recovery point is complete and may be restored.
    RecoveryPointCommitted {
        /// The VM.
        vm: VmId,
        /// The new recovery point.
        rp: RecoveryPointId,
        /// Its disks.
        disks: Vec<CommittedDisk>,
        /// Consistency level reached.
        consistency: Consistency,
        /// Point in time the recovery point represents (snapshot time, Unix milliseconds).
        taken_at: u64,
    },
    /// Recovery points past retention were removed from the repository.
    RecoveryPointsPruned {
        /// The VM.
        vm: VmId,
        /// The removed recovery points.
        rps: Vec<RecoveryPointId>,
    },
    /// A consistency check compared the source with the replica.
    ConsistencyChecked {
        /// The VM.
        vm: VmId,
        /// Chunks compared, over all disks.
        chunks_compared: u64,
        /// Chunks that differed from the replica and were stored again.
        chunks_differing: u64,
        /// Bytes written to the repository by the repair.
        bytes_stored: u64,
    },
    /// A verify found damaged chunks in recovery points of the VM.
    ReplicaDamageFound {
        /// The VM.
        vm: VmId,
        /// The damaged disks.
        disks: Vec<DiskId>,
        /// The damaged recovery points.
        rps: Vec<RecoveryPointId>,
        /// Damaged chunks, over all disks.
        n_damaged_chunks: u64,
    },
    /// A recovery job's options (recorded right after `JobRequested`).
    RecoveryOptionsSet {
        /// The options.
        options: RecoveryOptions,
    },
    /// A notification about the job's end was delivered, or given up on.
    NotificationSent {
        /// `mailto:ADDRESS` or the webhook's URL.
        target: String,
        /// Whether the receiver accepted it.
        delivered: bool,
        /// The receiver's answer or the error, for humans.
        detail: String,
    },
    /// The time zone of a recovery's throttle work hours (recorded right after
    /// `RecoveryOptionsSet` by `RequestRecoveryInZone`); it replaces the throttle's fixed
    /// `utc_offset_minutes`.
    RecoveryTimeZoneSet {
        /// An IANA name or a POSIX TZ rule, as in `Command::RequestRecoveryInZone`.
        timezone: String,
    },
}

/// Events of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeEvent {
    /// A worker registered (first time or after being lost).
    NodeRegistered {
        /// The hypervisor cluster it belongs to; VMs move only within a cluster.
        cluster: String,
        /// The worker's version.
        worker_version: String,
    },
    /// The worker stopped heartbeating.
    NodeHeartbeatLost {
        /// Last heartbeat seen (Unix milliseconds).
        last_seen: u64,
    },
    /// The worker reported its VMs.
    NodeInventoryReported {
        /// Every VM on the node.
        vms: Vec<VmInventory>,
    },
    /// The worker measured a repository's space.
    RepositorySpaceReported {
        /// The repository location.
        repository: String,
        /// Size of its filesystem in bytes.
        total_bytes: u64,
        /// Bytes available to cairn.
        free_bytes: u64,
    },
    /// The worker said which repositories its node registers, by name (the names groups and
    /// jobs may use on that node).
    RepositoriesRegistered {
        /// The registered names, sorted.
        names: Vec<String>,
        /// The node's app-owner roots, sorted: where recoveries asked by app owners may write.
        app_owner_roots: Vec<String>,
    },
    /// A report that came from this node's NATS identity was about another node's work and
    /// was refused (see `Command::RecordRefusedReport`).
    ReportRefused {
        /// The node the report claimed to come from.
        claimed_node: NodeId,
        /// The node the step was dispatched to, when the step exists.
        dispatched_to: Option<NodeId>,
        /// The job the report named.
        job: JobId,
        /// The step the report named.
        step: StepId,
    },
}

/// Any event, by aggregate kind. The payload of an [`Envelope`](super::Envelope).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A protection group's event.
    Group(GroupEvent),
    /// A VM's event.
    Vm(VmEvent),
    /// A job's event.
    Job(JobEvent),
    /// A node's event.
    Node(NodeEvent),
    /// An API token's event.
    Token(TokenEvent),
}

impl Event {
    /// The kind of aggregate this event belongs to; the envelope's aggregate must match.
    pub const fn aggregate_kind(&self) -> AggregateKind {
        match self {
            Event::Group(_) => AggregateKind::Group,
            Event::Vm(_) => AggregateKind::Vm,
            Event::Job(_) => AggregateKind::Job,
            Event::Node(_) => AggregateKind::Node,
            Event::Token(_) => AggregateKind::Token,
        }
    }

    /// The variant's name, e.g. `StepDispatched`, for logs and metrics.
    pub const fn name(&self) -> &'static str {
        match self {
            Event::Group(event) => match event {
                GroupEvent::GroupCreated { .. } => "GroupCreated",
                GroupEvent::GroupMembersChanged { .. } => "GroupMembersChanged",
                GroupEvent::GroupPolicyChanged { .. } => "GroupPolicyChanged",
                GroupEvent::GroupDeleted { .. } => "GroupDeleted",
                GroupEvent::RetentionLockChanged { .. } => "RetentionLockChanged",
                GroupEvent::SoftDeletePeriodChanged { .. } => "SoftDeletePeriodChanged",
            },
            Event::Vm(event) => match event {
                VmEvent::VmDiscovered { .. } => "VmDiscovered",
                VmEvent::VmMoved { .. } => "VmMoved",
                VmEvent::VmRemoved => "VmRemoved",
                VmEvent::DiskResized { .. } => "DiskResized",
                VmEvent::ChangeTrackingLost { .. } => "ChangeTrackingLost",
                VmEvent::DataSourceStateChanged { .. } => "DataSourceStateChanged",
                VmEvent::RecoveryPointsDeleted { .. } => "RecoveryPointsDeleted",
                VmEvent::RecoveryPointsUndeleted { .. } => "RecoveryPointsUndeleted",
            },
            Event::Job(event) => match event {
                JobEvent::JobRequested { .. } => "JobRequested",
                JobEvent::JobQueued { .. } => "JobQueued",
                JobEvent::JobStarted { .. } => "JobStarted",
                JobEvent::StepDispatched { .. } => "StepDispatched",
                JobEvent::StepStarted { .. } => "StepStarted",
                JobEvent::StepProgressed { .. } => "StepProgressed",
                JobEvent::StepSucceeded { .. } => "StepSucceeded",
                JobEvent::StepFailed { .. } => "StepFailed",
                JobEvent::StepTimedOut { .. } => "StepTimedOut",
                JobEvent::StepRetryScheduled { .. } => "StepRetryScheduled",
                JobEvent::JobCancelRequested { .. } => "JobCancelRequested",
                JobEvent::JobSucceeded => "JobSucceeded",
                JobEvent::JobFailed { .. } => "JobFailed",
                JobEvent::JobCancelled => "JobCancelled",
                JobEvent::RecoveryPointCommitted { .. } => "RecoveryPointCommitted",
                JobEvent::RecoveryPointsPruned { .. } => "RecoveryPointsPruned",
                JobEvent::ConsistencyChecked { .. } => "ConsistencyChecked",
                JobEvent::ReplicaDamageFound { .. } => "ReplicaDamageFound",
                JobEvent::RecoveryOptionsSet { .. } => "RecoveryOptionsSet",
                JobEvent::RecoveryTimeZoneSet { .. } => "RecoveryTimeZoneSet",
                JobEvent::NotificationSent { .. } => "NotificationSent",
            },
            Event::Node(event) => match event {
                NodeEvent::NodeRegistered { .. } => "NodeRegistered",
                NodeEvent::NodeHeartbeatLost { .. } => "NodeHeartbeatLost",
                NodeEvent::NodeInventoryReported { .. } => "NodeInventoryReported",
                NodeEvent::RepositorySpaceReported { .. } => "RepositorySpaceReported",
                NodeEvent::RepositoriesRegistered { .. } => "RepositoriesRegistered",
                NodeEvent::ReportRefused { .. } => "ReportRefused",
            },
            Event::Token(event) => match event {
                TokenEvent::TokenCreated { .. } => "TokenCreated",
                TokenEvent::TokenRevoked => "TokenRevoked",
            },
        }
    }
}

impl From<GroupEvent> for Event {
    fn from(event: GroupEvent) -> Self {
        Event::Group(event)
    }
}

impl From<VmEvent> for Event {
    fn from(event: VmEvent) -> Self {
        Event::Vm(event)
    }
}

impl From<JobEvent> for Event {
    fn from(event: JobEvent) -> Self {
        Event::Job(event)
    }
}

impl From<NodeEvent> for Event {
    fn from(event: NodeEvent) -> Self {
        Event::Node(event)
    }
}

impl From<TokenEvent> for Event {
    fn from(event: TokenEvent) -> Self {
        Event::Token(event)
    }
}
