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
    /// `active`, `none` or `lost: <reason>` (the next backup is an express full).
    #[serde(default)]
    pub change_tracking: String,
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
    /// Recovery jobs: target, options, outcome, notifications.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoveryView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryView {
    /// `original`, `host`, `folder` or `items`.
    pub target: String,
    /// The target in words.
    pub target_text: String,
    /// Node that writes.
    pub node: Option<String>,
    /// Options in words (`no recovery options` when none).
    pub options: String,
    /// Bytes the restore steps wrote (a delta restore writes only what differs).
    pub bytes_written: u64,
    /// Descriptor (new VM) or manifest (folder) written on the node.
    pub written: Option<String>,
    /// Alternate host: the new VM's id and name.
    pub new_vm: Option<String>,
    pub new_vm_name: Option<String>,
    /// What the user must know (not protected, not highly available, ...).
    pub note: Option<String>,
    pub notifications: Vec<NotificationView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationView {
    pub target: String,
    pub delivered: bool,
    pub detail: String,
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
    /// `live`, or `deleted` (soft-deleted: refused for recovery, restorable until
    /// `purge_after`).
    #[serde(default = "live")]
    pub state: String,
    /// When it was deleted (Unix ms), if it is.
    #[serde(default)]
    pub deleted_at: Option<u64>,
    /// From then on it is purged and can no longer be undeleted.
    #[serde(default)]
    pub purge_after: Option<u64>,
    /// Who deleted it.
    #[serde(default)]
    pub deleted_by: Option<String>,
}

fn live() -> String {
    "live".into()
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
    /// The first event whose link is keyed with the audit key; links before it are plain
    /// BLAKE3 (a log written before it had a key). `None`: the log is not keyed.
    #[serde(default)]
    pub keyed_from: Option<u64>,
    /// The check of the log against signed checkpoints, when there is a checkpoint sink.
    #[serde(default)]
    pub checkpoints: Option<CheckpointReport>,
}

/// The log checked against the signed checkpoints of a sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReport {
    /// Where the checkpoints are (a folder).
    pub sink: String,
    /// Every checkpoint verified and matched the log, and no file of the sink was refused.
    pub ok: bool,
    /// Checkpoints whose signature verified and that the log matches.
    pub matched: u64,
    /// The highest event a matching checkpoint covers.
    pub last_matched_seq: Option<u64>,
    /// The first checkpoint (in log order) that the log no longer matches.
    pub first_mismatch: Option<CheckpointMismatch>,
    /// Files of the sink that were not trusted (malformed, unknown key, bad signature).
    pub rejected: Vec<RejectedCheckpoint>,
}

/// A checkpoint that the log does not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointMismatch {
    pub file: String,
    pub seq: u64,
    pub signer: String,
    pub detail: String,
}

/// A file of the checkpoint sink that was not trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedCheckpoint {
    pub file: String,
    pub reason: String,
}

/// What a command that was accepted returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The id of what the command created or acted on (group id, job id).
    pub id: String,
    /// Sequence of the last event the command appended (read-your-writes for `events tail`).
    pub seq: u64,
    /// The command was made before under the same idempotency key: this is the first answer,
    /// and nothing new happened.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}

/// Times of day (`HH:MM`) on days of the week (`mon` ... `sun`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleView {
    pub times: Vec<String>,
    pub days: Vec<String>,
}

/// The window scheduled consistency checks run in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckWindowView {
    /// `HH:MM`.
    pub start: String,
    pub max_duration_minutes: u32,
    pub days: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckPolicyView {
    /// Run a consistency check as soon as a replica becomes inconsistent.
    pub when_inconsistent: bool,
    /// Run them in this window; none and `when_inconsistent: false` means manual only.
    #[serde(default)]
    pub window: Option<CheckWindowView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsView {
    pub backups_per_node: u16,
    pub backups_per_volume: u16,
    pub recoveries: u16,
}

/// A protection group's whole policy, as JSON (the API's read and write form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyView {
    /// Empty in a request: the server's default repository.
    #[serde(default)]
    pub repository: String,
    pub retention_days: u16,
    pub recovery_points: ScheduleView,
    /// `15m` ... `1440m`, or `before-recovery-point`.
    pub sync: String,
    /// Express full backups; empty times and days for none.
    pub express_full: ScheduleView,
    pub consistency_check: CheckPolicyView,
    /// `now`, `manual-seed`, or `at:<Unix milliseconds>`.
    pub replica_creation: String,
    pub limits: LimitsView,
    /// `application` (guest freeze, crash-consistent fallback) or `crash`.
    pub consistency: String,
    pub chunk_size: u32,
}

/// A group member's protection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub vm: String,
    pub name: String,
    /// The worst data source state of its disks.
    pub state: String,
    pub last_backup_at: Option<u64>,
    pub recovery_points: u64,
    /// Retention marks now: kept, protected whatever their age, to be removed.
    pub keep: u64,
    pub protected: u64,
    pub remove: u64,
    /// Retention is paused (the replica is inconsistent) since this time.
    pub retention_paused_since: Option<u64>,
}

/// `GET /v1/groups/{group}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupDetailView {
    pub group: String,
    pub name: String,
    pub created_at: u64,
    pub policy: PolicyView,
    /// The zone schedule times are in (`cairn up --timezone`).
    pub timezone: String,
    pub next_sync: Option<u64>,
    pub next_recovery_point: Option<u64>,
    pub members: Vec<MemberView>,
    /// The retention lock in force, in days (0 = none).
    #[serde(default)]
    pub retention_lock_days: u16,
    /// A lowering of the lock recorded but not yet in force.
    #[serde(default)]
    pub retention_lock_pending: Option<PendingLockView>,
    /// How long its VMs' deleted recovery points stay restorable.
    #[serde(default)]
    pub soft_delete_days: u16,
}

/// A retention lock change that takes effect later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingLockView {
    pub days: u16,
    pub effective_at: u64,
}

/// `GET /v1/groups/{group}/plan`: the disk allocation review.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityView {
    pub group: String,
    pub name: String,
    pub repository: String,
    pub retention_days: u16,
    /// Virtual size of the members' disks.
    pub data_bytes: u64,
    /// The replicas as stored (virtual size where none is stored yet).
    pub replica_bytes: u64,
    /// What the members' recovery points hold now.
    pub stored_bytes: u64,
    pub churn_bytes_per_day: u64,
    /// Measured from the last 7 days of recovery points, or estimated (10% a day).
    pub churn_measured: bool,
    pub recommended_bytes: u64,
    /// From the worker's last report; `None` when none came yet.
    pub free_bytes: Option<u64>,
    pub under_provisioned_bytes: Option<u64>,
    /// Space the fleecing overlay of the largest member's backup needs beside its disks
    /// (disk size × churn rate × a one-hour backup window).
    pub overlay_bytes: u64,
}

/// An alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertView {
    pub id: u64,
    /// `Critical`, `Warning`, `Info`.
    pub severity: String,
    /// `ReplicaInconsistent`, `BackupFailed`, ...
    pub kind: String,
    /// A VM id or a repository.
    pub subject: String,
    pub vm_name: Option<String>,
    pub message: String,
    pub recommended_action: String,
    pub raised_at: u64,
    pub updated_at: u64,
    pub occurrences: u32,
    pub active: bool,
    pub resolved_at: Option<u64>,
    pub resolution: Option<String>,
}

/// Recovery points of one day (in the orchestrator's time zone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalendarDayView {
    /// `YYYY-MM-DD`.
    pub date: String,
    pub recovery_points: u32,
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn time_text(t: cairn_schemas::TimeOfDay) -> String {
    t.label()
}

fn days_text(days: cairn_schemas::Weekdays) -> Vec<String> {
    (0..7u8)
        .filter(|d| days.contains(*d))
        .map(|d| DAY_NAMES[usize::from(d)].to_owned())
        .collect()
}

/// Parses `HH:MM` (00:00 to 23:59).
pub fn parse_time(field: &str, text: &str) -> Result<cairn_schemas::TimeOfDay, String> {
    let bad = || format!("{field}: {text:?} is not a time of day; use HH:MM, 00:00 to 23:59");
    let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
    let digits = |s: &str| (1..=2).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(h) || m.len() != 2 || !digits(m) {
        return Err(bad());
    }
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(cairn_schemas::TimeOfDay::hm(h, m))
}

/// Parses day names (`mon` ... `sun`, or `all`, `workdays`, `weekend`).
pub fn parse_days(field: &str, names: &[String]) -> Result<cairn_schemas::Weekdays, String> {
    let mut bits = 0u8;
    for name in names {
        let lower = name.trim().to_ascii_lowercase();
        bits |= match lower.as_str() {
            "all" | "daily" => cairn_schemas::Weekdays::ALL.bits,
            "workdays" => cairn_schemas::Weekdays::WORKDAYS.bits,
            "weekend" => cairn_schemas::Weekdays::WEEKEND.bits,
            other => {
                let idx = DAY_NAMES
                    .iter()
                    .position(|d| other.len() >= 3 && other.starts_with(d))
                    .ok_or_else(|| {
                        format!(
                            "{field}: {name:?} is not a day; use mon, tue, wed, thu, fri, sat, \
                             sun, all, workdays or weekend"
                        )
                    })?;
                1 << idx
            }
        };
    }
    Ok(cairn_schemas::Weekdays { bits })
}

fn schedule_view(s: &cairn_schemas::Schedule) -> ScheduleView {
    let mut times = s.times.clone();
    times.sort();
    ScheduleView {
        times: times.into_iter().map(time_text).collect(),
        days: days_text(s.days),
    }
}

fn schedule_from(field: &str, v: &ScheduleView) -> Result<cairn_schemas::Schedule, String> {
    if v.times.len() > 96 {
        return Err(format!("{field}.times: at most 96 times a day"));
    }
    Ok(cairn_schemas::Schedule {
        times: v
            .times
            .iter()
            .map(|t| parse_time(&format!("{field}.times"), t))
            .collect::<Result<_, _>>()?,
        days: parse_days(&format!("{field}.days"), &v.days)?,
    })
}

impl PolicyView {
    /// The JSON form of a policy.
    pub fn from_policy(p: &cairn_schemas::GroupPolicy) -> PolicyView {
        use cairn_schemas::{ConsistencyWanted, ReplicaCreation, SyncFrequency};
        PolicyView {
            repository: p.repository.clone(),
            retention_days: p.retention_days,
            recovery_points: schedule_view(&p.recovery_points),
            sync: match p.sync {
                SyncFrequency::EveryMinutes(m) => format!("{m}m"),
                SyncFrequency::JustBeforeRecoveryPoint => "before-recovery-point".into(),
            },
            express_full: schedule_view(&p.express_full),
            consistency_check: CheckPolicyView {
                when_inconsistent: p.consistency_check.when_inconsistent,
                window: p
                    .consistency_check
                    .window
                    .as_ref()
                    .map(|w| CheckWindowView {
                        start: time_text(w.start),
                        max_duration_minutes: w.max_duration_minutes,
                        days: days_text(w.days),
                    }),
            },
            replica_creation: match p.replica_creation {
                ReplicaCreation::Now => "now".into(),
                ReplicaCreation::ManualSeed => "manual-seed".into(),
                ReplicaCreation::At { unix_millis } => format!("at:{unix_millis}"),
            },
            limits: LimitsView {
                backups_per_node: p.limits.backups_per_node,
                backups_per_volume: p.limits.backups_per_volume,
                recoveries: p.limits.recoveries,
            },
            consistency: match p.consistency {
                ConsistencyWanted::ApplicationWithCrashFallback => "application".into(),
                ConsistencyWanted::CrashOnly => "crash".into(),
            },
            chunk_size: p.chunk_size,
        }
    }

    /// The policy this JSON describes (with `online` carried over), not yet validated as a
    /// whole: [`cairn_schemas::GroupPolicy::validate`] does that. Errors name the field.
    pub fn to_policy(
        &self,
        online: Option<cairn_schemas::OnlineProtection>,
    ) -> Result<cairn_schemas::GroupPolicy, String> {
        use cairn_schemas::{
            ConsistencyCheckPolicy, ConsistencyCheckWindow, ConsistencyWanted, Limits,
            ReplicaCreation, SyncFrequency,
        };
        let sync = match self.sync.trim() {
            "before-recovery-point" => SyncFrequency::JustBeforeRecoveryPoint,
            text => {
                let (digits, unit) = text.split_at(
                    text.find(|c: char| !c.is_ascii_digit())
                        .unwrap_or(text.len()),
                );
                let per_unit = match unit {
                    "" | "m" | "min" => 1,
                    "h" => 60,
                    "d" => 1440,
                    _ => 0,
                };
                let minutes = digits
                    .parse::<u32>()
                    .ok()
                    .and_then(|v| v.checked_mul(per_unit))
                    .and_then(|m| u16::try_from(m).ok())
                    .filter(|m| *m > 0)
                    .ok_or_else(|| {
                        format!(
                            "sync: {text:?} is not a frequency; use e.g. 15m, 1h, 1d or \
                             before-recovery-point"
                        )
                    })?;
                SyncFrequency::EveryMinutes(minutes)
            }
        };
        let replica_creation = match self.replica_creation.trim() {
            "now" => ReplicaCreation::Now,
            "manual-seed" => ReplicaCreation::ManualSeed,
            other => match other.strip_prefix("at:").and_then(|ms| ms.parse().ok()) {
                Some(unix_millis) => ReplicaCreation::At { unix_millis },
                None => {
                    return Err(format!(
                        "replica_creation: {other:?} is not now, manual-seed or at:<Unix ms>"
                    ));
                }
            },
        };
        let consistency = match self.consistency.trim() {
            "application" => ConsistencyWanted::ApplicationWithCrashFallback,
            "crash" => ConsistencyWanted::CrashOnly,
            other => {
                return Err(format!(
                    "consistency: {other:?} is not application or crash"
                ));
            }
        };
        let window = match &self.consistency_check.window {
            None => None,
            Some(w) => Some(ConsistencyCheckWindow {
                start: parse_time("consistency_check.window.start", &w.start)?,
                max_duration_minutes: w.max_duration_minutes,
                days: parse_days("consistency_check.window.days", &w.days)?,
            }),
        };
        Ok(cairn_schemas::GroupPolicy {
            repository: self.repository.clone(),
            retention_days: self.retention_days,
            recovery_points: schedule_from("recovery_points", &self.recovery_points)?,
            sync,
            express_full: schedule_from("express_full", &self.express_full)?,
            consistency_check: ConsistencyCheckPolicy {
                when_inconsistent: self.consistency_check.when_inconsistent,
                window,
            },
            replica_creation,
            online,
            limits: Limits {
                backups_per_node: self.limits.backups_per_node,
                backups_per_volume: self.limits.backups_per_volume,
                recoveries: self.limits.recoveries,
            },
            consistency,
            chunk_size: self.chunk_size,
        })
    }
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

/// An API token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    /// The token's id (not its secret).
    pub id: String,
    pub name: String,
    /// `admin`, `operator`, `viewer` or `app-owner`.
    pub role: String,
    /// An app owner's VMs (ids).
    pub vms: Vec<String>,
    /// An app owner's groups (ids).
    pub groups: Vec<String>,
    pub created_at: u64,
    pub created_by: String,
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
    pub revoked_by: Option<String>,
    /// Accepted now: neither revoked nor expired.
    pub live: bool,
}

/// A token just made: its secret, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTokenView {
    #[serde(flatten)]
    pub view: TokenView,
    /// The secret to send as `Authorization: Bearer ...`; cairn keeps only its hash.
    pub token: String,
}
