//! Commands: requests to change something, which the orchestrator's `decide` accepts (turning
//! them into events) or rejects. Every command carries a [`CommandId`]; a command id seen
//! twice is processed once.
//!
//! Ids of things a command creates (group, job) are chosen by the caller (the API edge), so
//! that `decide` needs no randomness and a retried command creates the same thing.

use serde::{Deserialize, Serialize};

use super::domain::{BackupMode, RecoveryOptions, RecoveryTarget, VmInventory};
use super::policy::GroupPolicy;
use super::token::Role;
use crate::ids::{CommandId, GroupId, JobId, NodeId, RecoveryPointId, StepId, TokenId, VmId};

/// A command to the orchestrator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create a protection group.
    CreateGroup {
        /// Id of the new group.
        group: GroupId,
        /// Display name.
        name: String,
        /// Member VMs.
        members: Vec<VmId>,
        /// Policy.
        policy: GroupPolicy,
    },
    /// Replace a group's member list.
    ChangeGroupMembers {
        /// The group.
        group: GroupId,
        /// The complete new member list.
        members: Vec<VmId>,
    },
    /// Replace a group's policy.
    ChangeGroupPolicy {
        /// The group.
        group: GroupId,
        /// The new policy.
        policy: GroupPolicy,
    },
    /// Stop protecting a group's VMs.
    DeleteGroup {
        /// The group.
        group: GroupId,
        /// Also delete its members' recovery points (a soft delete: they are purged after the
        /// group's soft-delete period and can be undeleted until then).
        delete_recovery_points: bool,
    },
    /// Back up a VM now.
    RequestBackup {
        /// Id of the new job.
        job: JobId,
        /// The VM.
        vm: VmId,
        /// Incremental or express full.
        mode: BackupMode,
    },
    /// Check (and repair) a VM's replica now.
    RequestConsistencyCheck {
        /// Id of the new job.
        job: JobId,
        /// The VM.
        vm: VmId,
    },
    /// Restore a recovery point.
    RequestRestore {
        /// Id of the new job.
        job: JobId,
        /// The VM the recovery point belongs to.
        vm: VmId,
        /// The recovery point.
        rp: RecoveryPointId,
        /// Where to write.
        target: RecoveryTarget,
    },
    /// Cancel a job.
    CancelJob {
        /// The job.
        job: JobId,
        /// Why, for humans.
        reason: String,
    },
    /// A worker announces itself.
    RegisterNode {
        /// The node.
        node: NodeId,
        /// Its hypervisor cluster.
        cluster: String,
        /// The worker's version.
        worker_version: String,
    },
    /// A worker reports every VM on its node.
    ReportInventory {
        /// The node.
        node: NodeId,
        /// Its VMs.
        vms: Vec<VmInventory>,
    },
    /// A worker reports a repository's free space.
    ReportRepositorySpace {
        /// The node.
        node: NodeId,
        /// The repository location.
        repository: String,
        /// Size of its filesystem in bytes.
        total_bytes: u64,
        /// Bytes available.
        free_bytes: u64,
    },
    /// Make a VM's replica from a seed folder exported offline.
    ImportSeed {
        /// Id of the new job.
        job: JobId,
        /// The VM.
        vm: VmId,
        /// The seed folder on the VM's node.
        seed: String,
    },
    /// Re-hash a VM's stored chunks now and mark damaged recovery points.
    RequestVerify {
        /// Id of the new job.
        job: JobId,
        /// The VM.
        vm: VmId,
    },
    /// Recover a recovery point to the original VM, another host or a folder, with options.
    RequestRecovery {
        /// Id of the new job.
        job: JobId,
        /// The VM the recovery point belongs to.
        vm: VmId,
        /// The recovery point.
        rp: RecoveryPointId,
        /// Where to write.
        target: RecoveryTarget,
        /// Throttle, notifications, new name.
        options: RecoveryOptions,
    },
    /// Make an API token.
    CreateToken {
        /// Id of the new token.
        token: TokenId,
        /// Its name (`[A-Za-z0-9._-]{1,64}`, unique among live tokens).
        name: String,
        /// Its role.
        role: Role,
        /// For app owners: the VMs of its scope.
        vms: Vec<VmId>,
        /// For app owners: the groups of its scope.
        groups: Vec<GroupId>,
        /// BLAKE3 of its secret (the API edge makes the secret and keeps only this).
        secret_hash: [u8; 32],
        /// Lifetime from its creation, in seconds; `None`: it does not expire.
        expires_in_secs: Option<u64>,
    },
    /// Revoke an API token.
    RevokeToken {
        /// The token.
        token: TokenId,
    },
    /// A worker reports the repositories its node registers, by name, and the folders where
    /// it lets recoveries asked by app owners write.
    RegisterRepositories {
        /// The node.
        node: NodeId,
        /// The registered names.
        names: Vec<String>,
        /// The node's app-owner roots (absolute folders, each inside a recovery root).
        app_owner_roots: Vec<String>,
    },
    /// Soft-delete recovery points of a VM (purged after the soft-delete period).
    DeleteRecoveryPoints {
        /// The VM.
        vm: VmId,
        /// The recovery points (at least one).
        rps: Vec<RecoveryPointId>,
    },
    /// Restore soft-deleted recovery points of a VM before they are purged.
    UndeleteRecoveryPoints {
        /// The VM.
        vm: VmId,
        /// The recovery points (at least one).
        rps: Vec<RecoveryPointId>,
    },
    /// Set a group's retention lock (0 = none). A raise is immediate; a lowering needs
    /// `by_admin` and takes effect after the current lock's period.
    SetRetentionLock {
        /// The group.
        group: GroupId,
        /// The lock in days, 0-448.
        days: u16,
        /// Whether the issuer has the admin role; set by the API edge from the authenticated
        /// principal, never taken from a request body.
        by_admin: bool,
    },
    /// Set how long the group's deleted recovery points stay restorable (1-90 days).
    SetSoftDeletePeriod {
        /// The group.
        group: GroupId,
        /// Days.
        days: u16,
    },
    /// An orchestrator refused a report that came on `node`'s subject (so from its NATS
    /// identity) but was about another node's work: the report named another node, or its
    /// step was dispatched to another node. Recorded on `node`, which raises a Critical
    /// alert. Sent by orchestrators only; no node may send it and no API route makes it.
    RecordRefusedReport {
        /// The node whose identity sent the report.
        node: NodeId,
        /// The node the report claimed to come from.
        claimed_node: NodeId,
        /// The node the step was dispatched to, when the step exists.
        dispatched_to: Option<NodeId>,
        /// The job and step the report named.
        job: JobId,
        /// The step the report named.
        step: StepId,
    },
    /// Add VMs to a group and stop protecting others (as MABS's "modify protection group").
    /// A removed VM keeps its recovery points unless `delete_recovery_points`: then they are
    /// soft-deleted (purged after the group's soft-delete period, restorable until then;
    /// refused as a whole while the group's retention lock holds any of them).
    EditGroupMembers {
        /// The group.
        group: GroupId,
        /// VMs to protect in it (each in no other group).
        add: Vec<VmId>,
        /// Members to stop protecting.
        remove: Vec<VmId>,
        /// Also soft-delete the removed members' recovery points.
        delete_recovery_points: bool,
    },
    /// [`Command::RequestRecovery`] whose throttle's work hours follow a named time zone
    /// (with its daylight-saving changes) instead of the throttle's fixed
    /// `utc_offset_minutes`. A variant of its own because `Throttle` is a frozen struct.
    RequestRecoveryInZone {
        /// Id of the new job.
        job: JobId,
        /// The VM the recovery point belongs to.
        vm: VmId,
        /// The recovery point.
        rp: RecoveryPointId,
        /// Where to write.
        target: RecoveryTarget,
        /// Throttle, notifications, new name.
        options: RecoveryOptions,
        /// The zone of the throttle's work hours: an IANA name (`Europe/Paris`) or a POSIX
        /// TZ rule (`<STD>-3<DST>-4,M3.5.0/4:00,M10.5.0/5:00`).
        timezone: String,
    },
}

/// A command with its id and origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandEnvelope {
    /// The command's id; retries reuse it.
    pub id: CommandId,
    /// Who issued it (`user:alice`, `node:kvm-01`, `system:scheduler`); recorded in its events.
    pub actor: String,
    /// W3C trace context of the span that issued it.
    pub traceparent: Option<String>,
    /// The command.
    pub command: Command,
}
