//! The projections: everything the orchestrator knows, rebuilt by applying events in log
//! order. `apply` is pure and total: it never fails and never does IO, so replay is
//! deterministic, a duplicate event (a sequence already applied) is a no-op, and
//! snapshot + tail equals a full replay.

use std::collections::BTreeMap;

use cairn_schemas::{
    Aggregate, CommittedDisk, Consistency, DataSourceState, DiskId, DiskInfo, Event, GroupEvent,
    GroupId, GroupPolicy, JobEvent, JobId, JobKind, JobReason, JobState, NodeEvent, NodeId,
    PlannedStep, PowerState, RecoveryOptions, RecoveryPointId, StepId, StepKind, StepResult,
    StepSpec, StepWork, VmEvent, VmId, WaitReason,
};
use serde::{Deserialize, Serialize};

use crate::log::StoredEvent;

/// All projections, plus the version of every aggregate (for optimistic concurrency).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub last_seq: u64,
    pub versions: BTreeMap<Aggregate, u64>,
    pub groups: BTreeMap<GroupId, Group>,
    pub vms: BTreeMap<VmId, Vm>,
    pub jobs: BTreeMap<JobId, Job>,
    pub nodes: BTreeMap<NodeId, Node>,
    /// Recovery point catalog, oldest first per VM.
    pub rps: BTreeMap<VmId, Vec<RecoveryPoint>>,
    /// Per-VM protection history the scheduler and retention need (see [`VmProtection`]).
    pub protection: BTreeMap<VmId, VmProtection>,
    /// Alerts, raised and resolved by events.
    pub alerts: crate::policy::alerts::Alerts,
    /// Space of each repository, as workers last measured it.
    pub space: BTreeMap<String, RepositorySpace>,
    /// Options and notification outcomes of recovery jobs made by `RequestRecovery`.
    pub recoveries: BTreeMap<JobId, Recovery>,
    /// API tokens (identities with roles).
    pub tokens: super::tokens::Tokens,
    /// Soft-deleted recovery points that were purged, with the time their period ended, so
    /// that an undelete after the purge is told so (not "unknown").
    pub purged: BTreeMap<RecoveryPointId, u64>,
}

/// What the scheduler and the retention planner need to know about one VM, kept up to date
/// by `apply` so that a tick costs O(VMs), not O(jobs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProtection {
    /// When a disk of the VM became inconsistent (and none has been repaired since).
    pub inconsistent_since: Option<u64>,
    /// Earlier intervals during which the replica was inconsistent: retention's paused time.
    pub paused: Vec<(u64, u64)>,
    /// When the latest job that makes a recovery point was requested.
    pub last_rp_request: Option<u64>,
    /// When the latest consistency check was requested.
    pub last_check_request: Option<u64>,
    /// A job that makes a recovery point (backup, check, seed import) is not finished.
    pub rp_job: Option<JobId>,
    /// A maintenance job (verify, prune, gc) is not finished.
    pub maintenance_job: Option<JobId>,
    /// The latest consistency check's outcome.
    pub last_check: Option<CheckOutcome>,
}

/// What a consistency check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckOutcome {
    pub at: u64,
    pub chunks_compared: u64,
    pub chunks_differing: u64,
    pub bytes_stored: u64,
}

/// A repository's filesystem space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositorySpace {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub reported_at: u64,
}

/// What a recovery job carries beyond its kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    pub options: RecoveryOptions,
    /// The named zone of the throttle's work hours (`RecoveryTimeZoneSet`): an IANA name or a
    /// POSIX TZ rule; `None` = the throttle's fixed `utc_offset_minutes`.
    pub timezone: Option<String>,
    /// Notification targets already handled (delivered or given up), with the outcome.
    pub notified: Vec<Notified>,
    /// Bytes its restore steps wrote.
    pub bytes_written: u64,
    /// The descriptor or manifest its finish step wrote.
    pub written: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notified {
    pub target: String,
    pub delivered: bool,
    pub detail: String,
}

impl Recovery {
    /// Every notification target: `mailto:` addresses, then webhook URLs.
    pub fn targets(&self) -> Vec<String> {
        self.options
            .notify_email
            .iter()
            .map(|a| format!("mailto:{a}"))
            .chain(self.options.webhooks.iter().cloned())
            .collect()
    }

    /// Targets not yet handled.
    pub fn pending(&self) -> Vec<String> {
        self.targets()
            .into_iter()
            .filter(|t| !self.notified.iter().any(|n| &n.target == t))
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub id: GroupId,
    pub name: String,
    pub members: Vec<VmId>,
    pub policy: GroupPolicy,
    pub created_at: u64,
    pub deleted: bool,
    /// The retention lock in force, in days (0 = none); see [`Group::lock_days`].
    pub lock_days: u16,
    /// A lowering of the lock that takes effect later.
    pub lock_pending: Option<PendingLock>,
    /// How long deleted recovery points of its VMs stay restorable, in days.
    pub soft_delete_days: u16,
}

/// A retention lock lowering recorded but not yet in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingLock {
    pub days: u16,
    /// When it takes effect (Unix ms): the old lock's period after it was asked for.
    pub effective_at: u64,
}

/// Soft-delete period of a group that never set one.
pub const DEFAULT_SOFT_DELETE_DAYS: u16 = 14;
/// Bounds of a group's soft-delete period, in days.
pub const SOFT_DELETE_DAYS: std::ops::RangeInclusive<u16> = 1..=90;
/// Longest retention lock, in days (the longest retention MABS offers).
pub const MAX_LOCK_DAYS: u16 = 448;
pub const DAY_MS: u64 = 86_400_000;

impl Group {
    /// The retention lock in force at `now`: a pending lowering counts from its effective
    /// time on.
    pub fn lock_days(&self, now: u64) -> u16 {
        match self.lock_pending {
            Some(pending) if now >= pending.effective_at => pending.days,
            _ => self.lock_days,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub id: VmId,
    pub name: String,
    pub node: NodeId,
    pub disks: Vec<DiskInfo>,
    pub power: PowerState,
    pub present: bool,
    pub group: Option<GroupId>,
    pub disk_states: BTreeMap<DiskId, DataSourceState>,
    pub last_backup_at: Option<u64>,
    /// Per disk: the change-tracking bitmap started by the snapshot of the VM's last recovery
    /// point (it records every write since); handed to the next incremental transfer.
    pub tracking: BTreeMap<DiskId, String>,
    /// Per disk: why change tracking was lost, until a backup starts a new bitmap.
    pub tracking_lost: BTreeMap<DiskId, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepStatus {
    Pending,
    Dispatched,
    Running,
    RetryScheduled { at: u64 },
    Succeeded,
    Failed,
}

impl StepStatus {
    pub fn in_flight(self) -> bool {
        matches!(self, StepStatus::Dispatched | StepStatus::Running)
    }

    pub fn terminal(self) -> bool {
        matches!(self, StepStatus::Succeeded | StepStatus::Failed)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub id: StepId,
    pub kind: StepKind,
    pub after: Vec<StepId>,
    pub always: bool,
    pub status: StepStatus,
    pub attempt: u32,
    pub node: Option<NodeId>,
    pub spec: Option<StepSpec>,
    pub dispatched_at: Option<u64>,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub progress_at: Option<u64>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub error: Option<String>,
    pub result: Option<StepResult>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub kind: JobKind,
    pub vm: VmId,
    pub group: Option<GroupId>,
    pub reason: JobReason,
    pub state: JobState,
    pub wait: Option<WaitReason>,
    pub node: Option<NodeId>,
    pub requested_at: u64,
    pub not_before: Option<u64>,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub steps: Vec<Step>,
    pub committed_rp: Option<RecoveryPointId>,
}

impl Job {
    pub fn step(&self, id: StepId) -> Option<&Step> {
        self.steps.iter().find(|s| s.id == id)
    }

    fn step_mut(&mut self, id: StepId) -> Option<&mut Step> {
        self.steps.iter_mut().find(|s| s.id == id)
    }

    /// A finished job keeps what its views show (states, times, errors, bytes) but not the
    /// step specs and results it needed while running: they are in the log, and keeping them
    /// would make memory and snapshots grow by kilobytes per job of history.
    fn forget_step_details(&mut self) {
        for step in &mut self.steps {
            step.spec = None;
            step.result = None;
        }
    }

    pub fn is_backup(&self) -> bool {
        matches!(
            self.kind,
            JobKind::Backup { .. } | JobKind::InitialReplication
        )
    }

    /// Whether the job commits a recovery point when it succeeds: backups, consistency checks
    /// (the repaired replica) and seed imports.
    pub fn makes_rp(&self) -> bool {
        self.is_backup()
            || matches!(
                self.kind,
                JobKind::ConsistencyCheck | JobKind::SeedImport { .. }
            )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub cluster: String,
    pub worker_version: String,
    pub registered_at: u64,
    pub last_seen: u64,
    pub online: bool,
    /// The repository names the node's worker registers (sorted).
    pub repositories: Vec<String>,
    /// Where the node lets recoveries asked by app owners write (sorted).
    pub app_owner_roots: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    pub rp: RecoveryPointId,
    pub vm: VmId,
    pub job: Option<JobId>,
    pub taken_at: u64,
    pub consistency: Consistency,
    pub disks: Vec<CommittedDisk>,
    /// The repository it was written to (the one its job's commit step named); recoveries
    /// read it from there whatever the group names later. Empty when its job said none.
    pub repository: String,
    /// Set while the point is soft-deleted.
    pub deleted: Option<Deletion>,
}

/// A soft deletion of a recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deletion {
    pub at: u64,
    /// From then on it is purged from the repository and cannot be undeleted.
    pub purge_after: u64,
    /// The actor who deleted it.
    pub by: String,
    pub reason: String,
}

impl State {
    /// Applies one stored event. Events at or below `last_seq` were applied already.
    pub fn apply(&mut self, stored: &StoredEvent) {
        if stored.seq <= self.last_seq {
            return;
        }
        self.last_seq = stored.seq;
        let env = &stored.envelope;
        self.versions
            .insert(env.aggregate.clone(), env.aggregate_version);
        let at = env.recorded_at;
        match (&env.aggregate, &env.payload) {
            (Aggregate::Group(id), Event::Group(e)) => self.apply_group(*id, e, at),
            (Aggregate::Vm(id), Event::Vm(e)) => self.apply_vm(*id, e, &env.actor, at),
            (Aggregate::Job(id), Event::Job(e)) => {
                self.apply_job(*id, e, at);
                self.apply_job_protection(*id, e, at);
            }
            (Aggregate::Node(id), Event::Node(e)) => self.apply_node(id, e, at),
            (Aggregate::Token(id), Event::Token(e)) => self.tokens.apply(*id, e, &env.actor, at),
            // The log refuses events of another aggregate kind; nothing to do if one slipped in.
            _ => {}
        }
        crate::policy::alerts::on_event(self, &env.aggregate, &env.payload, at);
    }

    /// Sets one disk's data source state and keeps the VM's retention pause up to date: the
    /// clock pauses when the first disk becomes inconsistent and resumes when the last is
    /// consistent again.
    pub(crate) fn set_disk_state(
        &mut self,
        vm: VmId,
        disk: &DiskId,
        state: DataSourceState,
        at: u64,
    ) {
        let Some(known) = self.vms.get_mut(&vm) else {
            return;
        };
        known.disk_states.insert(disk.clone(), state);
        let inconsistent = known
            .disk_states
            .values()
            .any(|s| *s == DataSourceState::ReplicaInconsistent);
        let protection = self.protection.entry(vm).or_default();
        match (inconsistent, protection.inconsistent_since) {
            (true, None) => protection.inconsistent_since = Some(at),
            (false, Some(since)) => {
                protection.paused.push((since, at));
                protection.inconsistent_since = None;
            }
            _ => {}
        }
    }

    /// The scheduler's and retention's per-VM bookkeeping of job events.
    fn apply_job_protection(&mut self, id: JobId, event: &JobEvent, at: u64) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let (vm, makes_rp, kind) = (job.vm, job.makes_rp(), job.kind.clone());
        match event {
            JobEvent::JobRequested { .. } => {
                let p = self.protection.entry(vm).or_default();
                if makes_rp {
                    p.last_rp_request = Some(at);
                    p.rp_job = Some(id);
                    if kind == JobKind::ConsistencyCheck {
                        p.last_check_request = Some(at);
                    }
                } else if matches!(
                    kind,
                    JobKind::Verify | JobKind::Prune | JobKind::GarbageCollect
                ) {
                    p.maintenance_job = Some(id);
                }
            }
            JobEvent::JobSucceeded | JobEvent::JobFailed { .. } | JobEvent::JobCancelled => {
                if let Some(p) = self.protection.get_mut(&vm) {
                    if p.rp_job == Some(id) {
                        p.rp_job = None;
                    }
                    if p.maintenance_job == Some(id) {
                        p.maintenance_job = None;
                    }
                }
            }
            JobEvent::ConsistencyChecked {
                chunks_compared,
                chunks_differing,
                bytes_stored,
                ..
            } => {
                self.protection.entry(vm).or_default().last_check = Some(CheckOutcome {
                    at,
                    chunks_compared: *chunks_compared,
                    chunks_differing: *chunks_differing,
                    bytes_stored: *bytes_stored,
                });
            }
            JobEvent::RecoveryPointsPruned { vm, rps } => {
                if let Some(list) = self.rps.get_mut(vm) {
                    for gone in list.iter().filter(|r| rps.contains(&r.rp)) {
                        if let Some(deletion) = &gone.deleted {
                            self.purged.insert(gone.rp, deletion.purge_after);
                        }
                    }
                    list.retain(|r| !rps.contains(&r.rp));
                }
            }
            _ => {}
        }
    }

    pub fn version(&self, aggregate: &Aggregate) -> u64 {
        self.versions.get(aggregate).copied().unwrap_or(0)
    }

    /// The partition an aggregate's events are filed under, and whose owner acts on it: a
    /// group's own; a VM's own; a job's is its VM's (from the projection, or from the
    /// `JobRequested` among `new_events` for a job that is being created); a node's own.
    pub fn partition_of(
        &self,
        aggregate: &Aggregate,
        new_events: &[Event],
        n_partitions: std::num::NonZeroU16,
    ) -> u16 {
        use cairn_schemas::subjects;
        match aggregate {
            Aggregate::Group(group) => subjects::partition_of(group, n_partitions),
            Aggregate::Vm(vm) => subjects::partition_of_vm(vm, n_partitions),
            Aggregate::Node(node) => subjects::partition_of_node(node, n_partitions),
            Aggregate::Token(token) => subjects::partition_of_key(token.as_bytes(), n_partitions),
            Aggregate::Job(job) => {
                let vm = self.jobs.get(job).map(|j| j.vm).or_else(|| {
                    new_events.iter().find_map(|e| match e {
                        Event::Job(JobEvent::JobRequested { vm, .. }) => Some(*vm),
                        _ => None,
                    })
                });
                // A job event for a job nobody requested is refused by `decide`; file it by
                // its own id rather than guess.
                vm.map_or_else(
                    || subjects::partition_of_key(job.as_bytes(), n_partitions),
                    |vm| subjects::partition_of_vm(&vm, n_partitions),
                )
            }
        }
    }

    fn apply_group(&mut self, id: GroupId, event: &GroupEvent, at: u64) {
        match event {
            GroupEvent::GroupCreated {
                name,
                members,
                policy,
            } => {
                for vm in members {
                    if let Some(vm) = self.vms.get_mut(vm) {
                        vm.group = Some(id);
                    }
                }
                self.groups.insert(
                    id,
                    Group {
                        id,
                        name: name.clone(),
                        members: members.clone(),
                        policy: policy.clone(),
                        created_at: at,
                        deleted: false,
                        lock_days: 0,
                        lock_pending: None,
                        soft_delete_days: DEFAULT_SOFT_DELETE_DAYS,
                    },
                );
            }
            GroupEvent::GroupMembersChanged { added, removed } => {
                if let Some(group) = self.groups.get_mut(&id) {
                    group.members.retain(|m| !removed.contains(m));
                    for vm in added {
                        if !group.members.contains(vm) {
                            group.members.push(*vm);
                        }
                    }
                }
                for vm in removed {
                    if let Some(vm) = self.vms.get_mut(vm).filter(|v| v.group == Some(id)) {
                        vm.group = None;
                    }
                }
                for vm in added {
                    if let Some(vm) = self.vms.get_mut(vm) {
                        vm.group = Some(id);
                    }
                }
            }
            GroupEvent::GroupPolicyChanged { policy } => {
                if let Some(group) = self.groups.get_mut(&id) {
                    group.policy = policy.clone();
                }
            }
            GroupEvent::RetentionLockChanged { days, effective_at } => {
                if let Some(group) = self.groups.get_mut(&id) {
                    // A lowering that came due is in force from now on.
                    group.lock_days = group.lock_days(at);
                    if *effective_at <= at {
                        group.lock_days = *days;
                        group.lock_pending = None;
                    } else {
                        group.lock_pending = Some(PendingLock {
                            days: *days,
                            effective_at: *effective_at,
                        });
                    }
                }
            }
            GroupEvent::SoftDeletePeriodChanged { days } => {
                if let Some(group) = self.groups.get_mut(&id) {
                    group.soft_delete_days = *days;
                }
            }
            GroupEvent::GroupDeleted { .. } => {
                if let Some(group) = self.groups.get_mut(&id) {
                    group.deleted = true;
                    for vm in &group.members {
                        if let Some(vm) = self.vms.get_mut(vm) {
                            vm.group = None;
                        }
                    }
                }
            }
        }
    }

    fn apply_vm(&mut self, id: VmId, event: &VmEvent, actor: &str, at: u64) {
        match event {
            VmEvent::VmDiscovered { node, name, disks } => {
                let group = self
                    .groups
                    .values()
                    .find(|g| !g.deleted && g.members.contains(&id))
                    .map(|g| g.id);
                let previous = self.vms.get(&id);
                let disk_states = previous.map(|v| v.disk_states.clone()).unwrap_or_else(|| {
                    disks
                        .iter()
                        .map(|d| (d.disk.clone(), DataSourceState::PendingReplicaCreation))
                        .collect()
                });
                let last_backup_at = previous.and_then(|v| v.last_backup_at);
                let tracking = previous.map(|v| v.tracking.clone()).unwrap_or_default();
                let tracking_lost = previous
                    .map(|v| v.tracking_lost.clone())
                    .unwrap_or_default();
                self.vms.insert(
                    id,
                    Vm {
                        id,
                        name: name.clone(),
                        node: node.clone(),
                        disks: disks.clone(),
                        power: PowerState::Stopped,
                        present: true,
                        group,
                        disk_states,
                        last_backup_at,
                        tracking,
                        tracking_lost,
                    },
                );
            }
            VmEvent::VmMoved { to, .. } => {
                if let Some(vm) = self.vms.get_mut(&id) {
                    vm.node = to.clone();
                    vm.present = true;
                }
            }
            VmEvent::VmRemoved => {
                if let Some(vm) = self.vms.get_mut(&id) {
                    vm.present = false;
                }
            }
            VmEvent::DiskResized {
                disk,
                new_size_bytes,
                ..
            } => {
                if let Some(d) = self
                    .vms
                    .get_mut(&id)
                    .and_then(|vm| vm.disks.iter_mut().find(|d| &d.disk == disk))
                {
                    d.size_bytes = *new_size_bytes;
                }
            }
            VmEvent::ChangeTrackingLost { disk, reason } => {
                // Without change tracking the replica cannot be trusted to hold every change
                // since the last backup: it stays inconsistent until a backup that read the
                // whole disk (express full) or a consistency check has compared it with the
                // source.
                let protected = match self.vms.get_mut(&id) {
                    Some(vm) => {
                        vm.tracking.remove(disk);
                        vm.tracking_lost.insert(disk.clone(), reason.clone());
                        vm.disk_states.get(disk) == Some(&DataSourceState::Protected)
                    }
                    None => false,
                };
                if protected {
                    self.set_disk_state(id, disk, DataSourceState::ReplicaInconsistent, at);
                }
            }
            VmEvent::DataSourceStateChanged { disk, state, .. } => {
                self.set_disk_state(id, disk, *state, at);
            }
            VmEvent::RecoveryPointsDeleted {
                rps,
                purge_after,
                reason,
            } => {
                for point in self.rps.entry(id).or_default() {
                    if rps.contains(&point.rp) && point.deleted.is_none() {
                        point.deleted = Some(Deletion {
                            at,
                            purge_after: *purge_after,
                            by: actor.to_string(),
                            reason: reason.clone(),
                        });
                    }
                }
            }
            VmEvent::RecoveryPointsUndeleted { rps } => {
                for point in self.rps.entry(id).or_default() {
                    if rps.contains(&point.rp) {
                        point.deleted = None;
                    }
                }
            }
        }
    }

    fn apply_node(&mut self, id: &NodeId, event: &NodeEvent, at: u64) {
        match event {
            NodeEvent::NodeRegistered {
                cluster,
                worker_version,
            } => {
                let node = self.nodes.entry(id.clone()).or_insert_with(|| Node {
                    id: id.clone(),
                    cluster: cluster.clone(),
                    worker_version: worker_version.clone(),
                    registered_at: at,
                    last_seen: at,
                    online: true,
                    repositories: Vec::new(),
                    app_owner_roots: Vec::new(),
                });
                node.cluster = cluster.clone();
                node.worker_version = worker_version.clone();
                node.last_seen = at;
                node.online = true;
            }
            NodeEvent::NodeHeartbeatLost { last_seen } => {
                if let Some(node) = self.nodes.get_mut(id) {
                    node.online = false;
                    node.last_seen = *last_seen;
                }
            }
            NodeEvent::NodeInventoryReported { .. } => {
                if let Some(node) = self.nodes.get_mut(id) {
                    node.last_seen = at;
                    node.online = true;
                }
            }
            NodeEvent::RepositorySpaceReported {
                repository,
                total_bytes,
                free_bytes,
            } => {
                self.space.insert(
                    repository.clone(),
                    RepositorySpace {
                        total_bytes: *total_bytes,
                        free_bytes: *free_bytes,
                        reported_at: at,
                    },
                );
            }
            NodeEvent::RepositoriesRegistered {
                names,
                app_owner_roots,
            } => {
                if let Some(node) = self.nodes.get_mut(id) {
                    node.repositories = names.clone();
                    node.app_owner_roots = app_owner_roots.clone();
                }
            }
            // Raises an alert (policy::alerts); nothing else changes.
            NodeEvent::ReportRefused { .. } => {}
        }
    }

    fn apply_job(&mut self, id: JobId, event: &JobEvent, at: u64) {
        if let JobEvent::JobRequested {
            kind,
            vm,
            group,
            reason,
            not_before,
        } = event
        {
            self.jobs.insert(
                id,
                Job {
                    id,
                    kind: kind.clone(),
                    vm: *vm,
                    group: *group,
                    reason: *reason,
                    state: JobState::Scheduled,
                    wait: None,
                    node: None,
                    requested_at: at,
                    not_before: *not_before,
                    started_at: None,
                    finished_at: None,
                    error: None,
                    cancel_requested: false,
                    steps: Vec::new(),
                    committed_rp: None,
                },
            );
            return;
        }
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        match event {
            JobEvent::JobRequested { .. } => unreachable!("handled above"),
            JobEvent::JobQueued { wait } => {
                job.state = JobState::Queued;
                job.wait = wait.clone();
            }
            JobEvent::JobStarted { node, plan } => {
                job.state = JobState::Running;
                job.wait = None;
                job.node = Some(node.clone());
                job.started_at = Some(at);
                job.steps = plan.iter().map(step_from_plan).collect();
            }
            JobEvent::StepDispatched {
                step,
                attempt,
                node,
                spec,
            } => {
                if let Some(s) = job.step_mut(*step) {
                    s.status = StepStatus::Dispatched;
                    s.attempt = *attempt;
                    s.node = Some(node.clone());
                    s.spec = Some(spec.clone());
                    s.dispatched_at = Some(at);
                    s.error = None;
                }
                if job.state == JobState::Retrying {
                    job.state = JobState::Running;
                }
            }
            JobEvent::StepStarted { step, attempt } => {
                if let Some(s) = job.step_mut(*step).filter(|s| s.attempt == *attempt) {
                    s.status = StepStatus::Running;
                    s.started_at.get_or_insert(at);
                }
            }
            JobEvent::StepProgressed {
                step,
                attempt,
                bytes_done,
                bytes_total,
            } => {
                if let Some(s) = job.step_mut(*step).filter(|s| s.attempt == *attempt) {
                    s.bytes_done = *bytes_done;
                    s.bytes_total = *bytes_total;
                    s.progress_at = Some(at);
                }
            }
            JobEvent::StepSucceeded {
                step,
                attempt,
                result,
            } => {
                if matches!(job.kind, JobKind::Recovery { .. })
                    && job
                        .step(*step)
                        .is_some_and(|s| s.attempt == *attempt && s.status.in_flight())
                {
                    let recovery = self.recoveries.entry(id).or_default();
                    match result {
                        StepResult::Restore { bytes_written, .. } => {
                            recovery.bytes_written += bytes_written;
                        }
                        StepResult::FinishRecovery { written } if !written.is_empty() => {
                            recovery.written = Some(written.clone());
                        }
                        _ => {}
                    }
                }
                if let Some(s) = job.step_mut(*step).filter(|s| s.attempt == *attempt) {
                    s.status = StepStatus::Succeeded;
                    s.finished_at = Some(at);
                    s.result = Some(result.clone());
                    s.error = None;
                    if s.bytes_total > 0 {
                        s.bytes_done = s.bytes_total;
                    }
                }
            }
            JobEvent::StepFailed {
                step,
                attempt,
                message,
                ..
            } => {
                if let Some(s) = job.step_mut(*step).filter(|s| s.attempt == *attempt) {
                    s.status = StepStatus::Failed;
                    s.finished_at = Some(at);
                    s.error = Some(message.clone());
                }
            }
            JobEvent::StepTimedOut { step, attempt } => {
                if let Some(s) = job.step_mut(*step).filter(|s| s.attempt == *attempt) {
                    s.status = StepStatus::Failed;
                    s.finished_at = Some(at);
                    s.error = Some(format!("attempt {attempt} stopped reporting (timed out)"));
                }
            }
            JobEvent::StepRetryScheduled {
                step, at: retry_at, ..
            } => {
                if let Some(s) = job.step_mut(*step) {
                    s.status = StepStatus::RetryScheduled { at: *retry_at };
                    s.finished_at = None;
                }
                job.state = JobState::Retrying;
            }
            JobEvent::JobCancelRequested { .. } => job.cancel_requested = true,
            JobEvent::JobSucceeded => {
                job.state = JobState::Succeeded;
                job.finished_at = Some(at);
                job.error = None;
                job.forget_step_details();
            }
            JobEvent::JobFailed { reason } => {
                job.state = JobState::Failed;
                job.finished_at = Some(at);
                job.error = Some(reason.clone());
                job.forget_step_details();
            }
            JobEvent::JobCancelled => {
                job.state = JobState::Cancelled;
                job.finished_at = Some(at);
                job.forget_step_details();
            }
            // Their effects on other projections are in `apply_job_protection`.
            JobEvent::RecoveryPointsPruned { .. }
            | JobEvent::ConsistencyChecked { .. }
            | JobEvent::ReplicaDamageFound { .. } => {}
            JobEvent::RecoveryPointCommitted {
                vm,
                rp,
                disks,
                consistency,
                taken_at,
            } => {
                job.committed_rp = Some(*rp);
                // The snapshot of this recovery point started the bitmaps the next backup reads.
                let started: Vec<cairn_schemas::DiskTracking> = job
                    .steps
                    .iter()
                    .find_map(|s| match &s.result {
                        Some(StepResult::Snapshot { tracking, .. }) => Some(tracking.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                // Disks whose transfer in this job read everything (a full or express full).
                let read_whole: Vec<DiskId> = job
                    .steps
                    .iter()
                    .filter_map(|s| match &s.result {
                        Some(StepResult::Transfer {
                            disk,
                            incremental: false,
                            ..
                        }) => Some(disk.clone()),
                        _ => None,
                    })
                    .collect();
                let repository = written_to(job);
                let list = self.rps.entry(*vm).or_default();
                if !list.iter().any(|r| r.rp == *rp) {
                    list.push(RecoveryPoint {
                        rp: *rp,
                        vm: *vm,
                        job: Some(id),
                        taken_at: *taken_at,
                        consistency: *consistency,
                        disks: disks.clone(),
                        repository,
                        deleted: None,
                    });
                }
                // A backup makes an inconsistent replica no better (only a consistency check
                // repairs it) and a seeded replica still needs its check; anything else that
                // commits leaves the disks protected.
                let repairs = job.kind == JobKind::ConsistencyCheck;
                let seeded = matches!(job.kind, JobKind::SeedImport { .. });
                let vm = *vm;
                if let Some(known) = self.vms.get_mut(&vm) {
                    known.last_backup_at = Some(*taken_at);
                }
                if !seeded {
                    for d in disks {
                        // A transfer that read the whole disk compared every chunk with the
                        // replica: it repairs a replica that lost its change tracking.
                        let read_all = read_whole.contains(&d.disk);
                        let lost_tracking = match self.vms.get_mut(&vm) {
                            Some(known) => {
                                let lost = known.tracking_lost.contains_key(&d.disk);
                                match started.iter().find(|t| t.disk == d.disk) {
                                    Some(t) => {
                                        known.tracking.insert(d.disk.clone(), t.bitmap.clone());
                                        known.tracking_lost.remove(&d.disk);
                                    }
                                    None => {
                                        known.tracking.remove(&d.disk);
                                    }
                                }
                                lost
                            }
                            None => false,
                        };
                        let current = self.vms.get(&vm).and_then(|v| v.disk_states.get(&d.disk));
                        if repairs
                            || (lost_tracking && read_all)
                            || current != Some(&DataSourceState::ReplicaInconsistent)
                        {
                            self.set_disk_state(vm, &d.disk, DataSourceState::Protected, at);
                        }
                    }
                }
            }
            JobEvent::RecoveryOptionsSet { options } => {
                self.recoveries.entry(id).or_default().options = options.clone();
            }
            JobEvent::RecoveryTimeZoneSet { timezone } => {
                self.recoveries.entry(id).or_default().timezone = Some(timezone.clone());
            }
            JobEvent::NotificationSent {
                target,
                delivered,
                detail,
            } => {
                let recovery = self.recoveries.entry(id).or_default();
                recovery.notified.retain(|n| &n.target != target);
                recovery.notified.push(Notified {
                    target: target.clone(),
                    delivered: *delivered,
                    detail: detail.clone(),
                });
            }
        }
    }
}

/// A fresh step for a planned one.
pub(crate) fn step_from_plan(plan: &PlannedStep) -> Step {
    Step {
        id: plan.step,
        kind: plan.kind.clone(),
        after: plan.after.clone(),
        always: plan.always,
        status: StepStatus::Pending,
        attempt: 0,
        node: None,
        spec: None,
        dispatched_at: None,
        started_at: None,
        finished_at: None,
        progress_at: None,
        bytes_done: 0,
        bytes_total: 0,
        error: None,
        result: None,
    }
}

/// The repository a job's recovery point is written to: the one its commit step was
/// dispatched with (or, without one, any step that wrote to a repository).
fn written_to(job: &Job) -> String {
    fn repository_of(work: &StepWork) -> Option<(u8, &String)> {
        match work {
            StepWork::CommitRecoveryPoint { repository, .. } => Some((0, repository)),
            StepWork::Transfer { repository, .. }
            | StepWork::CheckDisk { repository, .. }
            | StepWork::ImportSeed { repository, .. } => Some((1, repository)),
            _ => None,
        }
    }
    job.steps
        .iter()
        .filter_map(|s| s.spec.as_ref().and_then(|spec| repository_of(&spec.work)))
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, repository)| repository.clone())
        .unwrap_or_default()
}
