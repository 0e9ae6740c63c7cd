//! Samples of every event, step spec, worker report and command variant with fixed ids and
//! times. `examples/write_corpus.rs` writes their encoding once into `tests/corpus/v1/`;
//! `tests/corpus.rs` checks that the checked-in bytes still decode to exactly these values.
//!
//! Shared by the example and the test through `#[path]`, so it is not part of the library.
//! Do not change a sample whose file is checked in: the file is the frozen truth, this code
//! only describes it. New variants get new samples (and new files).

#![allow(dead_code)] // reason: the example and the test each use a part of it

use cairn_schemas::*;

/// One corpus entry.
pub struct Sample {
    /// File name inside `tests/corpus/v1/`.
    pub file: String,
    /// The value the file must decode to.
    pub value: Value,
}

/// A value of one of the encoded kinds.
#[derive(Debug, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "a few hundred samples in a test; boxing would only add noise"
)]
pub enum Value {
    Event(Envelope),
    Spec(StepSpec),
    Report(Report),
    Command(CommandEnvelope),
}

impl Value {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Value::Event(v) => encode(v),
            Value::Spec(v) => encode_spec(v),
            Value::Report(v) => encode_report(v),
            Value::Command(v) => encode_command(v),
        }
    }

    /// Decodes `bytes` as the same kind as `self`.
    pub fn decode_like(&self, bytes: &[u8]) -> Result<Value, CodecError> {
        Ok(match self {
            Value::Event(_) => Value::Event(decode(bytes)?),
            Value::Spec(_) => Value::Spec(decode_spec(bytes)?),
            Value::Report(_) => Value::Report(decode_report(bytes)?),
            Value::Command(_) => Value::Command(decode_command(bytes)?),
        })
    }
}

/// Index and name of an event variant. Exhaustive on purpose: a new variant does not compile
/// until it gets an index here, and `N_EVENT_VARIANTS` makes the test demand a sample for it.
pub fn event_variant(event: &Event) -> (usize, &'static str) {
    match event {
        Event::Group(GroupEvent::GroupCreated { .. }) => (0, "group_created"),
        Event::Group(GroupEvent::GroupMembersChanged { .. }) => (1, "group_members_changed"),
        Event::Group(GroupEvent::GroupPolicyChanged { .. }) => (2, "group_policy_changed"),
        Event::Group(GroupEvent::GroupDeleted { .. }) => (3, "group_deleted"),
        Event::Vm(VmEvent::VmDiscovered { .. }) => (4, "vm_discovered"),
        Event::Vm(VmEvent::VmMoved { .. }) => (5, "vm_moved"),
        Event::Vm(VmEvent::VmRemoved) => (6, "vm_removed"),
        Event::Vm(VmEvent::DiskResized { .. }) => (7, "disk_resized"),
        Event::Vm(VmEvent::ChangeTrackingLost { .. }) => (8, "change_tracking_lost"),
        Event::Vm(VmEvent::DataSourceStateChanged { .. }) => (9, "data_source_state_changed"),
        Event::Job(JobEvent::JobRequested { .. }) => (10, "job_requested"),
        Event::Job(JobEvent::JobQueued { .. }) => (11, "job_queued"),
        Event::Job(JobEvent::JobStarted { .. }) => (12, "job_started"),
        Event::Job(JobEvent::StepDispatched { .. }) => (13, "step_dispatched"),
        Event::Job(JobEvent::StepStarted { .. }) => (14, "step_started"),
        Event::Job(JobEvent::StepProgressed { .. }) => (15, "step_progressed"),
        Event::Job(JobEvent::StepSucceeded { .. }) => (16, "step_succeeded"),
        Event::Job(JobEvent::StepFailed { .. }) => (17, "step_failed"),
        Event::Job(JobEvent::StepTimedOut { .. }) => (18, "step_timed_out"),
        Event::Job(JobEvent::StepRetryScheduled { .. }) => (19, "step_retry_scheduled"),
        Event::Job(JobEvent::JobCancelRequested { .. }) => (20, "job_cancel_requested"),
        Event::Job(JobEvent::JobSucceeded) => (21, "job_succeeded"),
        Event::Job(JobEvent::JobFailed { .. }) => (22, "job_failed"),
        Event::Job(JobEvent::JobCancelled) => (23, "job_cancelled"),
        Event::Job(JobEvent::RecoveryPointCommitted { .. }) => (24, "recovery_point_committed"),
        Event::Node(NodeEvent::NodeRegistered { .. }) => (25, "node_registered"),
        Event::Node(NodeEvent::NodeHeartbeatLost { .. }) => (26, "node_heartbeat_lost"),
        Event::Node(NodeEvent::NodeInventoryReported { .. }) => (27, "node_inventory_reported"),
        Event::Job(JobEvent::RecoveryPointsPruned { .. }) => (28, "recovery_points_pruned"),
        Event::Job(JobEvent::ConsistencyChecked { .. }) => (29, "consistency_checked"),
        Event::Job(JobEvent::ReplicaDamageFound { .. }) => (30, "replica_damage_found"),
        Event::Node(NodeEvent::RepositorySpaceReported { .. }) => (31, "repository_space_reported"),
        Event::Job(JobEvent::RecoveryOptionsSet { .. }) => (32, "recovery_options_set"),
        Event::Job(JobEvent::NotificationSent { .. }) => (33, "notification_sent"),
        Event::Token(TokenEvent::TokenCreated { .. }) => (34, "token_created"),
        Event::Token(TokenEvent::TokenRevoked) => (35, "token_revoked"),
        Event::Node(NodeEvent::RepositoriesRegistered { .. }) => (36, "repositories_registered"),
        Event::Group(GroupEvent::RetentionLockChanged { .. }) => (37, "retention_lock_changed"),
        Event::Group(GroupEvent::SoftDeletePeriodChanged { .. }) => {
            (38, "soft_delete_period_changed")
        }
        Event::Vm(VmEvent::RecoveryPointsDeleted { .. }) => (39, "recovery_points_deleted"),
        Event::Vm(VmEvent::RecoveryPointsUndeleted { .. }) => (40, "recovery_points_undeleted"),
        Event::Node(NodeEvent::ReportRefused { .. }) => (41, "report_refused"),
        Event::Job(JobEvent::RecoveryTimeZoneSet { .. }) => (42, "recovery_time_zone_set"),
    }
}

/// Number of event variants; bump it together with `event_variant`.
pub const N_EVENT_VARIANTS: usize = 43;

/// Index and name of a step work variant (exhaustive, see `event_variant`).
pub fn work_variant(work: &StepWork) -> (usize, &'static str) {
    match work {
        StepWork::Snapshot { .. } => (0, "snapshot"),
        StepWork::Transfer { .. } => (1, "transfer"),
        StepWork::ReleaseSnapshot { .. } => (2, "release_snapshot"),
        StepWork::CommitRecoveryPoint { .. } => (3, "commit_recovery_point"),
        StepWork::Restore { .. } => (4, "restore"),
        StepWork::VerifyDisk { .. } => (5, "verify_disk"),
        StepWork::CheckDisk { .. } => (6, "check_disk"),
        StepWork::Prune { .. } => (7, "prune"),
        StepWork::CollectGarbage { .. } => (8, "collect_garbage"),
        StepWork::ImportSeed { .. } => (9, "import_seed"),
        StepWork::RestoreDisk { .. } => (10, "restore_disk"),
        StepWork::PrepareRecovery { .. } => (11, "prepare_recovery"),
        StepWork::FinishRecovery { .. } => (12, "finish_recovery"),
        StepWork::ExtractItems { .. } => (13, "extract_items"),
        StepWork::RestoreDiskInZone { .. } => (14, "restore_disk_in_zone"),
    }
}

/// Number of step work variants.
pub const N_WORK_VARIANTS: usize = 15;

/// Index and name of a report variant, by body and, for successes, by result kind.
pub fn report_variant(body: &ReportBody) -> (usize, &'static str) {
    match body {
        ReportBody::Started => (0, "started"),
        ReportBody::Progress { .. } => (1, "progress"),
        ReportBody::Succeeded { result } => match result {
            StepResult::Snapshot { .. } => (2, "succeeded_snapshot"),
            StepResult::Transfer { .. } => (3, "succeeded_transfer"),
            StepResult::ReleaseSnapshot => (4, "succeeded_release_snapshot"),
            StepResult::CommitRecoveryPoint => (5, "succeeded_commit_recovery_point"),
            StepResult::Restore { .. } => (6, "succeeded_restore"),
            StepResult::VerifyDisk { .. } => (8, "succeeded_verify_disk"),
            StepResult::CheckDisk { .. } => (9, "succeeded_check_disk"),
            StepResult::Prune { .. } => (10, "succeeded_prune"),
            StepResult::CollectGarbage { .. } => (11, "succeeded_collect_garbage"),
            StepResult::ImportSeed { .. } => (12, "succeeded_import_seed"),
            StepResult::ExtractItems { .. } => (15, "succeeded_extract_items"),
            late => report_variant_late(late).expect("every result kind has an index"),
        },
        ReportBody::Failed { .. } => (7, "failed"),
    }
}

/// Index and name of the result kinds added after the first corpus (numbered after `failed`).
fn report_variant_late(result: &StepResult) -> Option<(usize, &'static str)> {
    match result {
        StepResult::PrepareRecovery => Some((13, "succeeded_prepare_recovery")),
        StepResult::FinishRecovery { .. } => Some((14, "succeeded_finish_recovery")),
        _ => None,
    }
}

/// Number of report variants.
pub const N_REPORT_VARIANTS: usize = 16;

/// Index and name of a command variant.
pub fn command_variant(command: &Command) -> (usize, &'static str) {
    match command {
        Command::CreateGroup { .. } => (0, "create_group"),
        Command::ChangeGroupMembers { .. } => (1, "change_group_members"),
        Command::ChangeGroupPolicy { .. } => (2, "change_group_policy"),
        Command::DeleteGroup { .. } => (3, "delete_group"),
        Command::RequestBackup { .. } => (4, "request_backup"),
        Command::RequestConsistencyCheck { .. } => (5, "request_consistency_check"),
        Command::RequestRestore { .. } => (6, "request_restore"),
        Command::CancelJob { .. } => (7, "cancel_job"),
        Command::RegisterNode { .. } => (8, "register_node"),
        Command::ReportInventory { .. } => (9, "report_inventory"),
        Command::ReportRepositorySpace { .. } => (10, "report_repository_space"),
        Command::ImportSeed { .. } => (11, "import_seed"),
        Command::RequestVerify { .. } => (12, "request_verify"),
        Command::RequestRecovery { .. } => (13, "request_recovery"),
        Command::CreateToken { .. } => (14, "create_token"),
        Command::RevokeToken { .. } => (15, "revoke_token"),
        Command::RegisterRepositories { .. } => (16, "register_repositories"),
        Command::DeleteRecoveryPoints { .. } => (17, "delete_recovery_points"),
        Command::UndeleteRecoveryPoints { .. } => (18, "undelete_recovery_points"),
        Command::SetRetentionLock { .. } => (19, "set_retention_lock"),
        Command::SetSoftDeletePeriod { .. } => (20, "set_soft_delete_period"),
        Command::RecordRefusedReport { .. } => (21, "record_refused_report"),
        Command::EditGroupMembers { .. } => (22, "edit_group_members"),
        Command::RequestRecoveryInZone { .. } => (23, "request_recovery_in_zone"),
    }
}

/// Number of command variants.
pub const N_COMMAND_VARIANTS: usize = 24;

fn throttle() -> Throttle {
    Throttle {
        work_bytes_per_sec: 10 << 20,
        off_bytes_per_sec: 0,
        work_days: Throttle::WEEKDAYS,
        work_start_minute: 8 * 60,
        work_end_minute: 18 * 60,
        utc_offset_minutes: 60,
    }
}

fn recovery_options() -> RecoveryOptions {
    RecoveryOptions {
        throttle: Some(throttle()),
        notify_email: vec!["ops@example.com".into()],
        webhooks: vec!["http://hooks.example.com/cairn".into()],
        new_name: Some("web-01-dr".into()),
    }
}

const T0: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

fn rand(tag: u8) -> [u8; 10] {
    [tag, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, tag]
}

fn group() -> GroupId {
    GroupId::new_v7(T0, rand(1))
}
fn vm() -> VmId {
    VmId::new_v7(T0, rand(2))
}
fn job() -> JobId {
    JobId::new_v7(T0 + 1, rand(3))
}
fn step(n: u8) -> StepId {
    StepId::new_v7(T0 + 2, rand(0x40 + n))
}
fn rp() -> RecoveryPointId {
    RecoveryPointId::new_v7(T0 + 3, rand(5))
}
fn parent_rp() -> RecoveryPointId {
    RecoveryPointId::new_v7(T0 - 86_400_000, rand(6))
}
fn node() -> NodeId {
    NodeId::new("kvm-01.lab").unwrap()
}
fn other_node() -> NodeId {
    NodeId::new("kvm-02").unwrap()
}
fn disk(name: &str) -> DiskId {
    DiskId::new(name).unwrap()
}

fn disk_info(name: &str, format: ImageFormat) -> DiskInfo {
    DiskInfo {
        disk: disk(name),
        size_bytes: 107_374_182_400,
        format,
        image_path: format!("/var/lib/libvirt/images/web-01-{name}.img"),
    }
}

/// A policy that sets every optional part, so the corpus covers them.
fn full_policy() -> GroupPolicy {
    GroupPolicy {
        repository: "local".into(),
        retention_days: 14,
        recovery_points: Schedule {
            times: vec![TimeOfDay::hm(8, 0), TimeOfDay::hm(20, 30)],
            days: Weekdays::WORKDAYS,
        },
        sync: SyncFrequency::EveryMinutes(30),
        express_full: Schedule {
            times: vec![TimeOfDay::hm(23, 0)],
            days: Weekdays::WEEKEND,
        },
        consistency_check: ConsistencyCheckPolicy {
            when_inconsistent: true,
            window: Some(ConsistencyCheckWindow {
                start: TimeOfDay::hm(1, 0),
                max_duration_minutes: 240,
                days: Weekdays::ALL,
            }),
        },
        replica_creation: ReplicaCreation::At {
            unix_millis: T0 + 3_600_000,
        },
        online: Some(OnlineProtection {
            repository: "azure-offsite".into(),
            daily_days: 30,
            weekly_weeks: 8,
            monthly_months: 12,
            yearly_years: 3,
        }),
        limits: Limits {
            backups_per_node: 4,
            backups_per_volume: 2,
            recoveries: 8,
        },
        consistency: ConsistencyWanted::ApplicationWithCrashFallback,
        chunk_size: 65_536,
    }
}

fn transfer_spec() -> StepSpec {
    StepSpec {
        step: step(2),
        attempt: 2,
        job: job(),
        partition: 4,
        epoch: 17,
        node: node(),
        vm: vm(),
        work: StepWork::Transfer {
            source: disk_info("vda", ImageFormat::Qcow2).into(),
            snapshot: "cairn-snap-1".into(),
            repository: "/srv/cairn/repo".into(),
            rp: rp(),
            parent_rp: Some(parent_rp()),
            change_tracking: Some("cairn-bitmap-7".into()),
            chunk_size: 65_536,
        },
    }
}

fn specs() -> Vec<StepSpec> {
    let base = transfer_spec();
    let with = |n: u8, work: StepWork| StepSpec {
        step: step(n),
        work,
        ..base.clone()
    };
    vec![
        with(
            1,
            StepWork::Snapshot {
                vm_name: "web-01".into(),
                disks: vec![
                    disk_info("vda", ImageFormat::Qcow2).into(),
                    disk_info("vdb", ImageFormat::Raw).into(),
                ],
                consistency: ConsistencyWanted::CrashOnly,
            },
        ),
        base.clone(),
        with(
            3,
            StepWork::ReleaseSnapshot {
                snapshot: "cairn-snap-1".into(),
            },
        ),
        with(
            4,
            StepWork::CommitRecoveryPoint {
                repository: "/srv/cairn/repo".into(),
                rp: rp(),
                disks: vec![disk("vda"), disk("vdb")],
                consistency: Consistency::Crash,
            },
        ),
        with(
            5,
            StepWork::Restore {
                disk: disk("vdb"),
                repository: "/srv/cairn/repo".into(),
                rp: parent_rp(),
                target_path: "/restore/web-01-vdb.vhdx".into(),
                target_format: ImageFormat::Vhdx,
            },
        ),
        with(
            6,
            StepWork::VerifyDisk {
                repository: "/srv/cairn/repo".into(),
                disk: disk("vda"),
            },
        ),
        with(
            7,
            StepWork::CheckDisk {
                source: disk_info("vda", ImageFormat::Qcow2).into(),
                snapshot: "cairn-snap-1".into(),
                repository: "/srv/cairn/repo".into(),
                rp: rp(),
                parent_rp: Some(parent_rp()),
                chunk_size: 65_536,
            },
        ),
        with(
            8,
            StepWork::Prune {
                repository: "/srv/cairn/repo".into(),
                disk: disk("vdb"),
                remove: vec![parent_rp()],
            },
        ),
        with(
            9,
            StepWork::CollectGarbage {
                repository: "/srv/cairn/repo".into(),
            },
        ),
        with(
            10,
            StepWork::ImportSeed {
                disk: disk("vda"),
                seed: "/media/usb0/cairn-seed".into(),
                repository: "/srv/cairn/repo".into(),
                rp: rp(),
            },
        ),
        with(
            11,
            StepWork::RestoreDisk {
                disk: disk("vda"),
                repository: "/srv/cairn/repo".into(),
                rp: rp(),
                target_path: "/var/lib/libvirt/images/web-01-vda.qcow2".into(),
                target_format: ImageFormat::Qcow2,
                overwrite: true,
                throttle: Some(throttle()),
            },
        ),
        with(
            12,
            StepWork::PrepareRecovery {
                target: RecoveryTarget::OriginalVm,
                vm_name: "web-01".into(),
                disks: vec![disk_info("vda", ImageFormat::Qcow2).into()],
            },
        ),
        with(
            13,
            StepWork::FinishRecovery {
                target: RecoveryTarget::AlternateHost {
                    node: other_node(),
                    path: "/srv/dr".into(),
                    format: ImageFormat::Vhdx,
                },
                rp: rp(),
                taken_at: T0 + 2,
                source_name: "web-01".into(),
                vm: VmId::new_v7(T0 + 5, rand(9)),
                vm_name: "web-01-dr".into(),
                disks: vec![disk_info("vda", ImageFormat::Vhdx).into()],
            },
        ),
        with(
            14,
            StepWork::ExtractItems {
                disk: disk("vda"),
                repository: "/srv/cairn/repo".into(),
                rp: parent_rp(),
                items: vec!["/p2/etc/hosts".into(), "/p1/EFI".into()],
                target_path: "/restore/items".into(),
            },
        ),
        with(
            15,
            StepWork::RestoreDiskInZone {
                disk: disk("vda"),
                repository: "/srv/cairn/repo".into(),
                rp: rp(),
                target_path: "/var/lib/libvirt/images/web-01-vda.qcow2".into(),
                target_format: ImageFormat::Qcow2,
                overwrite: false,
                throttle: Some(throttle()),
                timezone: "Australia/Sydney".into(),
            },
        ),
    ]
}

fn report_bodies() -> Vec<ReportBody> {
    vec![
        ReportBody::Started,
        ReportBody::Progress {
            bytes_done: 1 << 30,
            bytes_total: 100 << 30,
        },
        ReportBody::Succeeded {
            result: StepResult::Snapshot {
                snapshot: "cairn-snap-1".into(),
                consistency: Consistency::Application,
                tracking: vec![DiskTracking {
                    disk: disk("vda"),
                    bitmap: "cairn-bitmap-8".into(),
                }],
            },
        },
        ReportBody::Succeeded {
            result: StepResult::Transfer {
                disk: disk("vda"),
                bytes_read: 5 << 30,
                bytes_stored: 1 << 30,
                incremental: true,
            },
        },
        ReportBody::Succeeded {
            result: StepResult::ReleaseSnapshot,
        },
        ReportBody::Succeeded {
            result: StepResult::CommitRecoveryPoint,
        },
        ReportBody::Succeeded {
            result: StepResult::Restore {
                disk: disk("vdb"),
                bytes_written: 100 << 30,
            },
        },
        ReportBody::Failed {
            class: FailureClass::Retryable,
            message: "NBD connection reset by peer".into(),
        },
        ReportBody::Succeeded {
            result: StepResult::VerifyDisk {
                disk: disk("vda"),
                chunks_checked: 1_638_400,
                damaged_rps: vec![parent_rp(), rp()],
                n_damaged_chunks: 2,
            },
        },
        ReportBody::Succeeded {
            result: StepResult::CheckDisk {
                disk: disk("vda"),
                chunks_compared: 1_638_400,
                chunks_differing: 12,
                bytes_read: 100 << 30,
                bytes_stored: 412_337,
            },
        },
        ReportBody::Succeeded {
            result: StepResult::Prune {
                disk: disk("vdb"),
                removed: vec![parent_rp()],
            },
        },
        ReportBody::Succeeded {
            result: StepResult::CollectGarbage {
                bytes_freed: 3 << 30,
            },
        },
        ReportBody::Succeeded {
            result: StepResult::ImportSeed {
                disk: disk("vda"),
                bytes_stored: 40 << 30,
            },
        },
        ReportBody::Succeeded {
            result: StepResult::PrepareRecovery,
        },
        ReportBody::Succeeded {
            result: StepResult::FinishRecovery {
                written: "/var/lib/cairn/vms/0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d00.json".into(),
            },
        },
        ReportBody::Succeeded {
            result: StepResult::ExtractItems {
                disk: disk("vda"),
                files: 12,
                dirs: 3,
                bytes: 1 << 20,
                skipped: vec!["/p2/dev/null: device node".into()],
            },
        },
    ]
}

fn events() -> Vec<Event> {
    let plan = vec![
        PlannedStep {
            step: step(1),
            kind: StepKind::Snapshot,
            after: vec![],
            always: false,
        },
        PlannedStep {
            step: step(2),
            kind: StepKind::Transfer { disk: disk("vda") },
            after: vec![step(1)],
            always: false,
        },
        PlannedStep {
            step: step(3),
            kind: StepKind::ReleaseSnapshot,
            after: vec![step(2)],
            always: true,
        },
        PlannedStep {
            step: step(4),
            kind: StepKind::CommitRecoveryPoint,
            after: vec![step(3)],
            always: false,
        },
        PlannedStep {
            step: step(5),
            kind: StepKind::Restore { disk: disk("vdb") },
            after: vec![],
            always: false,
        },
    ];
    vec![
        GroupEvent::GroupCreated {
            name: "Web servers".into(),
            members: vec![vm()],
            policy: full_policy(),
        }
        .into(),
        GroupEvent::GroupMembersChanged {
            added: vec![VmId::new_v7(T0 + 10, rand(7))],
            removed: vec![vm()],
        }
        .into(),
        GroupEvent::GroupPolicyChanged {
            policy: GroupPolicy::with_defaults("local"),
        }
        .into(),
        GroupEvent::GroupDeleted {
            delete_recovery_points: true,
        }
        .into(),
        VmEvent::VmDiscovered {
            node: node(),
            name: "web-01".into(),
            disks: vec![
                disk_info("vda", ImageFormat::Qcow2),
                disk_info("vdb", ImageFormat::Raw),
            ],
        }
        .into(),
        VmEvent::VmMoved {
            from: node(),
            to: other_node(),
        }
        .into(),
        VmEvent::VmRemoved.into(),
        VmEvent::DiskResized {
            disk: disk("vdb"),
            old_size_bytes: 10 << 30,
            new_size_bytes: 20 << 30,
        }
        .into(),
        VmEvent::ChangeTrackingLost {
            disk: disk("vda"),
            reason: "bitmap cairn-bitmap-7 is inconsistent after host crash".into(),
        }
        .into(),
        VmEvent::DataSourceStateChanged {
            disk: disk("vda"),
            state: DataSourceState::ReplicaInconsistent,
            reason: "change tracking lost".into(),
        }
        .into(),
        JobEvent::JobRequested {
            kind: JobKind::Recovery {
                rp: rp(),
                target: RecoveryTarget::ItemLevel {
                    node: other_node(),
                    disk: disk("vda"),
                    items: vec!["part2:/etc/fstab".into(), "part2:/home".into()],
                    path: "/restore/items".into(),
                },
            },
            vm: vm(),
            group: Some(group()),
            reason: JobReason::Manual,
            not_before: Some(T0 + 60_000),
        }
        .into(),
        JobEvent::JobQueued {
            wait: Some(WaitReason::NodeBusy),
        }
        .into(),
        JobEvent::JobStarted { node: node(), plan }.into(),
        JobEvent::StepDispatched {
            step: step(2),
            attempt: 2,
            node: node(),
            spec: transfer_spec(),
        }
        .into(),
        JobEvent::StepStarted {
            step: step(2),
            attempt: 2,
        }
        .into(),
        JobEvent::StepProgressed {
            step: step(2),
            attempt: 2,
            bytes_done: 3 << 30,
            bytes_total: 100 << 30,
        }
        .into(),
        JobEvent::StepSucceeded {
            step: step(2),
            attempt: 2,
            result: StepResult::Transfer {
                disk: disk("vda"),
                bytes_read: 5 << 30,
                bytes_stored: 1 << 30,
                incremental: false,
            },
        }
        .into(),
        JobEvent::StepFailed {
            step: step(2),
            attempt: 1,
            class: FailureClass::Permanent,
            message: "image /var/lib/libvirt/images/web-01-vda.img: not a qcow2 file".into(),
        }
        .into(),
        JobEvent::StepTimedOut {
            step: step(2),
            attempt: 1,
        }
        .into(),
        JobEvent::StepRetryScheduled {
            step: step(2),
            attempt: 2,
            at: T0 + 5_000,
        }
        .into(),
        JobEvent::JobCancelRequested {
            reason: "maintenance window".into(),
        }
        .into(),
        JobEvent::JobSucceeded.into(),
        JobEvent::JobFailed {
            reason: "step transfer vda failed permanently".into(),
        }
        .into(),
        JobEvent::JobCancelled.into(),
        JobEvent::RecoveryPointCommitted {
            vm: vm(),
            rp: rp(),
            disks: vec![
                CommittedDisk {
                    disk: disk("vda"),
                    parent_rp: Some(parent_rp()),
                    bytes_read: 5 << 30,
                    bytes_stored: 1 << 30,
                },
                CommittedDisk {
                    disk: disk("vdb"),
                    parent_rp: None,
                    bytes_read: 10 << 30,
                    bytes_stored: 2 << 30,
                },
            ],
            consistency: Consistency::Application,
            taken_at: T0 + 2,
        }
        .into(),
        NodeEvent::NodeRegistered {
            cluster: "lab".into(),
            worker_version: "0.1.0".into(),
        }
        .into(),
        NodeEvent::NodeHeartbeatLost {
            last_seen: T0 + 30_000,
        }
        .into(),
        NodeEvent::NodeInventoryReported {
            vms: vec![VmInventory {
                vm: vm(),
                name: "web-01".into(),
                disks: vec![disk_info("vda", ImageFormat::Qcow2)],
                power: PowerState::Running,
            }],
        }
        .into(),
        JobEvent::RecoveryPointsPruned {
            vm: vm(),
            rps: vec![parent_rp(), rp()],
        }
        .into(),
        JobEvent::ConsistencyChecked {
            vm: vm(),
            chunks_compared: 1_638_400,
            chunks_differing: 12,
            bytes_stored: 412_337,
        }
        .into(),
        JobEvent::ReplicaDamageFound {
            vm: vm(),
            disks: vec![disk("vda")],
            rps: vec![parent_rp(), rp()],
            n_damaged_chunks: 3,
        }
        .into(),
        NodeEvent::RepositorySpaceReported {
            repository: "/srv/cairn/repo".into(),
            total_bytes: 4 << 40,
            free_bytes: 1 << 40,
        }
        .into(),
        JobEvent::RecoveryOptionsSet {
            options: recovery_options(),
        }
        .into(),
        JobEvent::NotificationSent {
            target: "mailto:ops@example.com".into(),
            delivered: true,
            detail: "250 Message accepted for delivery".into(),
        }
        .into(),
        TokenEvent::TokenCreated {
            name: "app-web".into(),
            role: Role::AppOwner,
            vms: vec![vm()],
            groups: vec![group()],
            secret_hash: [0x5c; 32],
            expires_at: Some(T0 + 90 * 86_400_000),
        }
        .into(),
        TokenEvent::TokenRevoked.into(),
        NodeEvent::RepositoriesRegistered {
            names: vec!["default".into(), "offsite".into()],
            app_owner_roots: vec!["/srv/recovered/apps".into()],
        }
        .into(),
        GroupEvent::RetentionLockChanged {
            days: 30,
            effective_at: T0 + 30 * 86_400_000,
        }
        .into(),
        GroupEvent::SoftDeletePeriodChanged { days: 14 }.into(),
        VmEvent::RecoveryPointsDeleted {
            rps: vec![rp(), parent_rp()],
            purge_after: T0 + 14 * 86_400_000,
            reason: "cairn rp delete".into(),
        }
        .into(),
        VmEvent::RecoveryPointsUndeleted { rps: vec![rp()] }.into(),
        NodeEvent::ReportRefused {
            claimed_node: NodeId::new("kvm-02").unwrap(),
            dispatched_to: Some(NodeId::new("kvm-02").unwrap()),
            job: job(),
            step: step(9),
        }
        .into(),
        JobEvent::RecoveryTimeZoneSet {
            timezone: "America/Santiago".into(),
        }
        .into(),
    ]
}

fn token() -> TokenId {
    TokenId::new_v7(T0 + 4, rand(7))
}

fn aggregate_for(event: &Event) -> Aggregate {
    match event.aggregate_kind() {
        AggregateKind::Group => Aggregate::Group(group()),
        AggregateKind::Vm => Aggregate::Vm(vm()),
        AggregateKind::Job => Aggregate::Job(job()),
        AggregateKind::Node => Aggregate::Node(node()),
        AggregateKind::Token => Aggregate::Token(token()),
    }
}

fn commands() -> Vec<Command> {
    vec![
        Command::CreateGroup {
            group: group(),
            name: "Web servers".into(),
            members: vec![vm()],
            policy: full_policy(),
        },
        Command::ChangeGroupMembers {
            group: group(),
            members: vec![],
        },
        Command::ChangeGroupPolicy {
            group: group(),
            policy: GroupPolicy::with_defaults("local"),
        },
        Command::DeleteGroup {
            group: group(),
            delete_recovery_points: false,
        },
        Command::RequestBackup {
            job: job(),
            vm: vm(),
            mode: BackupMode::ExpressFull,
        },
        Command::RequestConsistencyCheck {
            job: job(),
            vm: vm(),
        },
        Command::RequestRestore {
            job: job(),
            vm: vm(),
            rp: rp(),
            target: RecoveryTarget::AlternateHost {
                node: other_node(),
                path: "/var/lib/libvirt/images/restored".into(),
                format: ImageFormat::Qcow2,
            },
        },
        Command::CancelJob {
            job: job(),
            reason: "wrong VM".into(),
        },
        Command::RegisterNode {
            node: node(),
            cluster: "lab".into(),
            worker_version: "0.1.0".into(),
        },
        Command::ReportInventory {
            node: node(),
            vms: vec![VmInventory {
                vm: vm(),
                name: "db-01".into(),
                disks: vec![disk_info("sda", ImageFormat::Vhdx)],
                power: PowerState::Stopped,
            }],
        },
        Command::ReportRepositorySpace {
            node: node(),
            repository: "/srv/cairn/repo".into(),
            total_bytes: 4 << 40,
            free_bytes: 1 << 40,
        },
        Command::ImportSeed {
            job: job(),
            vm: vm(),
            seed: "/media/usb0/cairn-seed".into(),
        },
        Command::RequestVerify {
            job: job(),
            vm: vm(),
        },
        Command::RequestRecovery {
            job: job(),
            vm: vm(),
            rp: rp(),
            target: RecoveryTarget::OriginalVm,
            options: recovery_options(),
        },
        Command::CreateToken {
            token: token(),
            name: "viewer-1".into(),
            role: Role::Viewer,
            vms: vec![],
            groups: vec![],
            secret_hash: [0xa5; 32],
            expires_in_secs: None,
        },
        Command::RevokeToken { token: token() },
        Command::RegisterRepositories {
            node: node(),
            names: vec!["default".into(), "offsite".into()],
            app_owner_roots: vec!["/srv/recovered/apps".into()],
        },
        Command::DeleteRecoveryPoints {
            vm: vm(),
            rps: vec![rp(), parent_rp()],
        },
        Command::UndeleteRecoveryPoints {
            vm: vm(),
            rps: vec![rp()],
        },
        Command::SetRetentionLock {
            group: group(),
            days: 30,
            by_admin: true,
        },
        Command::SetSoftDeletePeriod {
            group: group(),
            days: 21,
        },
        Command::RecordRefusedReport {
            node: node(),
            claimed_node: NodeId::new("kvm-02").unwrap(),
            dispatched_to: None,
            job: job(),
            step: step(9),
        },
        Command::EditGroupMembers {
            group: group(),
            add: vec![vm()],
            remove: vec![VmId::new_v7(T0, rand(0x33))],
            delete_recovery_points: true,
        },
        Command::RequestRecoveryInZone {
            job: job(),
            vm: vm(),
            rp: rp(),
            target: RecoveryTarget::OriginalVm,
            options: recovery_options(),
            timezone: "Europe/Paris".into(),
        },
    ]
}

/// Every sample, in a fixed order.
pub fn samples() -> Vec<Sample> {
    let mut out = Vec::new();
    for (idx, payload) in events().into_iter().enumerate() {
        let idx = idx as u64;
        let (_, name) = event_variant(&payload);
        // Alternate present and absent optional fields so both encodings are covered.
        let full = idx.is_multiple_of(2);
        let envelope = Envelope {
            event_id: EventId::new_v7(T0 + 1_000 + idx, rand(0x80 + idx as u8)),
            aggregate: aggregate_for(&payload),
            aggregate_version: idx + 1,
            recorded_at: T0 + 1_000 + idx,
            actor: if full {
                "user:alice"
            } else {
                "system:scheduler"
            }
            .into(),
            correlation: full.then(job),
            causation: full.then(|| EventId::new_v7(T0 + 999, rand(0x7f))),
            command: full.then(|| CommandId::new_v7(T0 + 998, rand(0x7e))),
            traceparent: full
                .then(|| "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            prev_hash: if full { [0xab; 32] } else { [0; 32] },
            payload,
        };
        out.push(Sample {
            file: format!("event_{name}.bin"),
            value: Value::Event(envelope),
        });
    }
    for spec in specs() {
        let (_, name) = work_variant(&spec.work);
        out.push(Sample {
            file: format!("spec_{name}.bin"),
            value: Value::Spec(spec),
        });
    }
    for (idx, body) in report_bodies().into_iter().enumerate() {
        let (_, name) = report_variant(&body);
        out.push(Sample {
            file: format!("report_{name}.bin"),
            value: Value::Report(Report {
                step: step(idx as u8),
                attempt: 1 + idx as u32,
                job: job(),
                partition: 4,
                epoch: 17,
                node: node(),
                body,
            }),
        });
    }
    for (idx, command) in commands().into_iter().enumerate() {
        let (_, name) = command_variant(&command);
        out.push(Sample {
            file: format!("command_{name}.bin"),
            value: Value::Command(CommandEnvelope {
                id: CommandId::new_v7(T0 + 2_000 + idx as u64, rand(0xc0 + idx as u8)),
                actor: "user:alice".into(),
                traceparent: (idx % 2 == 0)
                    .then(|| "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
                command,
            }),
        });
    }
    out
}
