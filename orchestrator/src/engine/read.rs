//! Views of the projections for the API (see [`crate::views`]).

use cairn_schemas::{
    Consistency, DataSourceState, Event, ImageFormat, JobEvent, JobKind, PowerState, SyncFrequency,
};

use super::jobs::step_label;
use super::state::{Job, State, StepStatus};
use crate::log::StoredEvent;
use crate::views::{
    DiskView, EventView, GroupView, JobView, NodeView, RpDiskView, RpView, StepView, VmView,
};

pub fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Raw => "raw",
        ImageFormat::Qcow2 => "qcow2",
        ImageFormat::Vhdx => "vhdx",
        ImageFormat::Vhd => "vhd",
    }
}

pub fn vms(state: &State) -> Vec<VmView> {
    state
        .vms
        .values()
        .map(|vm| VmView {
            vm: vm.id.to_string(),
            name: vm.name.clone(),
            node: vm.node.to_string(),
            power: match vm.power {
                PowerState::Running => "running",
                PowerState::Stopped => "stopped",
                PowerState::Paused => "paused",
            }
            .into(),
            disks: vm
                .disks
                .iter()
                .map(|d| DiskView {
                    disk: d.disk.to_string(),
                    size_bytes: d.size_bytes,
                    format: format_name(d.format).into(),
                    image_path: d.image_path.clone(),
                    state: format!(
                        "{:?}",
                        vm.disk_states
                            .get(&d.disk)
                            .copied()
                            .unwrap_or(DataSourceState::PendingReplicaCreation)
                    ),
                    change_tracking: match (vm.tracking.get(&d.disk), vm.tracking_lost.get(&d.disk))
                    {
                        (Some(_), _) => "active".into(),
                        (None, Some(reason)) => format!("lost: {reason}"),
                        (None, None) => "none".into(),
                    },
                })
                .collect(),
            group: vm
                .group
                .and_then(|g| state.groups.get(&g))
                .filter(|g| !g.deleted)
                .map(|g| g.name.clone()),
            last_backup_at: vm.last_backup_at,
            recovery_points: state.rps.get(&vm.id).map_or(0, |l| l.len() as u64),
            present: vm.present,
        })
        .collect()
}

pub fn groups(state: &State) -> Vec<GroupView> {
    state
        .groups
        .values()
        .filter(|g| !g.deleted)
        .map(|g| GroupView {
            group: g.id.to_string(),
            name: g.name.clone(),
            members: g.members.iter().map(|m| m.to_string()).collect(),
            retention_days: g.policy.retention_days as u32,
            sync: match g.policy.sync {
                SyncFrequency::EveryMinutes(m) => format!("{m}m"),
                SyncFrequency::JustBeforeRecoveryPoint => "before-recovery-point".into(),
            },
            created_at: g.created_at,
        })
        .collect()
}

pub fn job(state: &State, job: &Job) -> JobView {
    let kind = match &job.kind {
        JobKind::InitialReplication => "InitialReplication".to_string(),
        JobKind::Backup { .. } => "Backup".to_string(),
        JobKind::ConsistencyCheck => "ConsistencyCheck".to_string(),
        JobKind::Recovery { .. } => "Recovery".to_string(),
        JobKind::SeedImport { .. } => "SeedImport".to_string(),
        other => format!("{other:?}")
            .split([' ', '{'])
            .next()
            .unwrap_or_default()
            .to_string(),
    };
    let rp = match &job.kind {
        JobKind::Recovery { rp, .. } => Some(rp.to_string()),
        _ => job.committed_rp.map(|r| r.to_string()),
    };
    JobView {
        job: job.id.to_string(),
        kind,
        vm: job.vm.to_string(),
        vm_name: state
            .vms
            .get(&job.vm)
            .map(|v| v.name.clone())
            .unwrap_or_default(),
        state: format!("{:?}", job.state),
        wait_reason: job.wait.as_ref().map(|w| format!("{w:?}")),
        reason: format!("{:?}", job.reason),
        node: job.node.as_ref().map(|n| n.to_string()),
        requested_at: job.requested_at,
        started_at: job.started_at,
        finished_at: job.finished_at,
        error: job.error.clone(),
        cancel_requested: job.cancel_requested,
        rp,
        steps: job
            .steps
            .iter()
            .map(|s| StepView {
                step: s.id.to_string(),
                kind: step_label(&s.kind),
                state: match s.status {
                    StepStatus::Pending if job.state.is_terminal() => "Skipped".into(),
                    StepStatus::RetryScheduled { .. } => "RetryScheduled".into(),
                    other => format!("{other:?}"),
                },
                attempt: s.attempt,
                node: s.node.as_ref().map(|n| n.to_string()),
                started_at: s.started_at.or(s.dispatched_at),
                finished_at: s.finished_at,
                bytes_done: s.bytes_done,
                bytes_total: s.bytes_total,
                error: s.error.clone(),
            })
            .collect(),
        recovery: recovery_view(state, job),
    }
}

pub fn jobs(state: &State) -> Vec<JobView> {
    state.jobs.values().map(|j| job(state, j)).collect()
}

pub fn rps(state: &State, vm: &cairn_schemas::VmId) -> Vec<RpView> {
    state
        .rps
        .get(vm)
        .map(|list| {
            list.iter()
                .map(|r| RpView {
                    rp: r.rp.to_string(),
                    vm: r.vm.to_string(),
                    job: r.job.map(|j| j.to_string()).unwrap_or_default(),
                    taken_at: r.taken_at,
                    consistency: match r.consistency {
                        Consistency::Application => "ApplicationConsistent".into(),
                        Consistency::Crash => "CrashConsistent".into(),
                    },
                    disks: r
                        .disks
                        .iter()
                        .map(|d| RpDiskView {
                            disk: d.disk.to_string(),
                            bytes_read: d.bytes_read,
                            bytes_stored: d.bytes_stored,
                        })
                        .collect(),
                    state: if r.deleted.is_some() {
                        "deleted"
                    } else {
                        "live"
                    }
                    .into(),
                    deleted_at: r.deleted.as_ref().map(|d| d.at),
                    purge_after: r.deleted.as_ref().map(|d| d.purge_after),
                    deleted_by: r.deleted.as_ref().map(|d| d.by.clone()),
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn nodes(state: &State) -> Vec<NodeView> {
    state
        .nodes
        .values()
        .map(|n| NodeView {
            node: n.id.to_string(),
            cluster: n.cluster.clone(),
            online: n.online,
            last_seen: Some(n.last_seen),
            vms: state
                .vms
                .values()
                .filter(|v| v.node == n.id && v.present)
                .count() as u64,
            running_backups: state
                .jobs
                .values()
                .filter(|j| {
                    j.node.as_ref() == Some(&n.id)
                        && j.is_backup()
                        && !j.state.is_terminal()
                        && j.started_at.is_some()
                })
                .count() as u64,
        })
        .collect()
}

pub fn event(stored: &StoredEvent) -> EventView {
    let env = &stored.envelope;
    EventView {
        seq: stored.seq,
        event_id: env.event_id.to_string(),
        recorded_at: env.recorded_at,
        aggregate: env.aggregate.to_string(),
        version: env.aggregate_version,
        name: env.payload.name().to_string(),
        actor: env.actor.clone(),
        correlation: env.correlation.map(|c| c.to_string()),
        summary: summary(&env.payload),
    }
}

fn summary(event: &Event) -> String {
    use cairn_schemas::{GroupEvent, NodeEvent, VmEvent};
    let step_name = |step: &cairn_schemas::StepId| format!("step {step}");
    match event {
        Event::Job(job) => match job {
            JobEvent::JobRequested {
                kind, vm, reason, ..
            } => {
                format!(
                    "{} of VM {vm} ({reason:?})",
                    format!("{kind:?}")
                        .split([' ', '{'])
                        .next()
                        .unwrap_or_default()
                )
            }
            JobEvent::JobQueued { wait } => match wait {
                Some(w) => format!("queued: {w:?}"),
                None => "queued".into(),
            },
            JobEvent::JobStarted { node, plan } => {
                format!("started on node {node}, {} steps", plan.len())
            }
            JobEvent::StepDispatched {
                spec,
                attempt,
                node,
                ..
            } => {
                format!(
                    "{} attempt {attempt} to node {node}",
                    step_label(&spec.kind())
                )
            }
            JobEvent::StepStarted { step, attempt } => {
                format!("{} attempt {attempt} started", step_name(step))
            }
            JobEvent::StepProgressed {
                step,
                bytes_done,
                bytes_total,
                ..
            } => {
                format!("{}: {bytes_done} of {bytes_total} bytes", step_name(step))
            }
            JobEvent::StepSucceeded {
                step,
                attempt,
                result,
            } => {
                let detail = match result {
                    cairn_schemas::StepResult::Transfer {
                        disk,
                        bytes_read,
                        bytes_stored,
                        ..
                    } => {
                        format!(": disk {disk}, {bytes_read} bytes read, {bytes_stored} stored")
                    }
                    cairn_schemas::StepResult::Restore {
                        disk,
                        bytes_written,
                    } => {
                        format!(": disk {disk}, {bytes_written} bytes written")
                    }
                    cairn_schemas::StepResult::CheckDisk {
                        disk,
                        chunks_compared,
                        chunks_differing,
                        ..
                    } => format!(
                        ": disk {disk}, {chunks_differing} of {chunks_compared} chunks differed"
                    ),
                    cairn_schemas::StepResult::VerifyDisk {
                        disk,
                        n_damaged_chunks,
                        ..
                    } => format!(": disk {disk}, {n_damaged_chunks} damaged chunks"),
                    cairn_schemas::StepResult::Prune { disk, removed } => {
                        format!(": disk {disk}, {} recovery points removed", removed.len())
                    }
                    cairn_schemas::StepResult::CollectGarbage { bytes_freed } => {
                        format!(": {bytes_freed} bytes freed")
                    }
                    cairn_schemas::StepResult::ExtractItems {
                        disk,
                        files,
                        bytes,
                        skipped,
                        ..
                    } => {
                        format!(
                            ": disk {disk}, {files} files ({bytes} bytes) extracted, {} skipped",
                            skipped.len()
                        )
                    }
                    _ => String::new(),
                };
                format!("{} attempt {attempt} succeeded{detail}", step_name(step))
            }
            JobEvent::StepFailed {
                message,
                class,
                attempt,
                ..
            } => format!("attempt {attempt} failed ({class:?}): {message}"),
            JobEvent::StepTimedOut { step, attempt } => {
                format!("{} attempt {attempt} timed out", step_name(step))
            }
            JobEvent::StepRetryScheduled { step, at, .. } => {
                format!("{} retry at {at}", step_name(step))
            }
            JobEvent::JobCancelRequested { reason } => format!("cancel requested: {reason}"),
            JobEvent::JobSucceeded => "succeeded".into(),
            JobEvent::JobFailed { reason } => reason.clone(),
            JobEvent::JobCancelled => "cancelled".into(),
            JobEvent::RecoveryPointCommitted { rp, disks, .. } => format!(
                "recovery point {rp} ({} disks, {} bytes stored)",
                disks.len(),
                disks.iter().map(|d| d.bytes_stored).sum::<u64>()
            ),
            JobEvent::RecoveryPointsPruned { rps, .. } => {
                format!("{} recovery points past retention removed", rps.len())
            }
            JobEvent::ConsistencyChecked {
                chunks_compared,
                chunks_differing,
                bytes_stored,
                ..
            } => format!(
                "consistency check: {chunks_differing} of {chunks_compared} chunks differed, \
                 {bytes_stored} bytes stored"
            ),
            JobEvent::ReplicaDamageFound {
                disks,
                rps,
                n_damaged_chunks,
                ..
            } => format!(
                "verify: {n_damaged_chunks} damaged chunks on {} disks, {} recovery points affected",
                disks.len(),
                rps.len()
            ),
            JobEvent::RecoveryOptionsSet { options } => recovery_options_summary(options, None),
            JobEvent::RecoveryTimeZoneSet { timezone } => {
                format!("throttle work hours in time zone {timezone}")
            }
            JobEvent::NotificationSent {
                target,
                delivered,
                detail,
            } => {
                if *delivered {
                    format!("notified {target}: {detail}")
                } else {
                    format!("could not notify {target}: {detail}")
                }
            }
        },
        Event::Vm(vm) => match vm {
            VmEvent::VmDiscovered { node, name, disks } => {
                format!("{name} on node {node}, {} disks", disks.len())
            }
            VmEvent::VmMoved { from, to } => format!("moved from node {from} to {to}"),
            VmEvent::VmRemoved => "no longer reported by its node".into(),
            VmEvent::DiskResized {
                disk,
                old_size_bytes,
                new_size_bytes,
            } => {
                format!("disk {disk} resized from {old_size_bytes} to {new_size_bytes} bytes")
            }
            VmEvent::ChangeTrackingLost { disk, reason } => {
                format!("change tracking of disk {disk} lost: {reason}")
            }
            VmEvent::DataSourceStateChanged {
                disk,
                state,
                reason,
            } => format!("disk {disk} is {state:?}: {reason}"),
            VmEvent::RecoveryPointsDeleted {
                rps,
                purge_after,
                reason,
            } => format!(
                "{} recovery points deleted ({reason}), purged after {}",
                rps.len(),
                crate::policy::tz::rfc3339_utc(*purge_after)
            ),
            VmEvent::RecoveryPointsUndeleted { rps } => {
                format!("{} recovery points undeleted", rps.len())
            }
        },
        Event::Group(group) => match group {
            GroupEvent::GroupCreated { name, members, .. } => {
                format!("group {name:?} with {} VMs", members.len())
            }
            GroupEvent::GroupMembersChanged { added, removed } => {
                format!("{} VMs added, {} removed", added.len(), removed.len())
            }
            GroupEvent::GroupPolicyChanged { .. } => "policy changed".into(),
            GroupEvent::GroupDeleted {
                delete_recovery_points,
            } => if *delete_recovery_points {
                "deleted with its recovery points"
            } else {
                "deleted"
            }
            .into(),
            GroupEvent::RetentionLockChanged { days, effective_at } => format!(
                "retention lock of {days} days from {}",
                crate::policy::tz::rfc3339_utc(*effective_at)
            ),
            GroupEvent::SoftDeletePeriodChanged { days } => {
                format!("soft-delete period {days} days")
            }
        },
        Event::Node(node) => match node {
            NodeEvent::NodeRegistered {
                cluster,
                worker_version,
            } => format!("registered in cluster {cluster}, worker {worker_version}"),
            NodeEvent::NodeHeartbeatLost { last_seen } => {
                format!("heartbeat lost (last seen {last_seen})")
            }
            NodeEvent::NodeInventoryReported { vms } => format!("{} VMs reported", vms.len()),
            NodeEvent::RepositorySpaceReported {
                repository,
                total_bytes,
                free_bytes,
            } => format!("repository {repository}: {free_bytes} of {total_bytes} bytes free"),
            NodeEvent::RepositoriesRegistered {
                names,
                app_owner_roots,
            } => {
                if app_owner_roots.is_empty() {
                    format!("repositories registered: {}", names.join(", "))
                } else {
                    format!(
                        "repositories registered: {}; app-owner roots: {}",
                        names.join(", "),
                        app_owner_roots.join(", ")
                    )
                }
            }
            NodeEvent::ReportRefused {
                claimed_node,
                dispatched_to,
                job,
                step,
            } => match dispatched_to {
                Some(to) => format!(
                    "refused its report for node {claimed_node} (step {step} of job {job}, \
                     dispatched to {to})"
                ),
                None => format!(
                    "refused its report for node {claimed_node} (step {step} of job {job}, \
                     no such step)"
                ),
            },
        },
        Event::Token(token) => match token {
            cairn_schemas::TokenEvent::TokenCreated {
                name,
                role,
                vms,
                groups,
                expires_at,
                ..
            } => {
                let scope = if vms.is_empty() && groups.is_empty() {
                    String::new()
                } else {
                    format!(", scope {} VMs and {} groups", vms.len(), groups.len())
                };
                let expiry = expires_at
                    .map_or_else(|| ", no expiry".to_string(), |at| format!(", expires {at}"));
                format!("token {name:?} created, role {role}{scope}{expiry}")
            }
            cairn_schemas::TokenEvent::TokenRevoked => "token revoked".into(),
        },
    }
}

/// `throttle 10.0 MiB/s in work hours (Mon-Fri 08:00-18:00 UTC+60 min), unlimited otherwise;
/// notify mailto:ops@example.com`.
pub fn recovery_options_summary(
    options: &cairn_schemas::RecoveryOptions,
    timezone: Option<&str>,
) -> String {
    let rate = |bps: u64| {
        if bps == 0 {
            "unlimited".to_string()
        } else {
            format!("{:.1} MiB/s", bps as f64 / (1024.0 * 1024.0))
        }
    };
    let mut parts = Vec::new();
    if let Some(t) = &options.throttle {
        let zone = timezone.map_or_else(
            || format!("UTC{:+} min", t.utc_offset_minutes),
            str::to_owned,
        );
        parts.push(format!(
            "throttle {} in work hours ({:02}:{:02}-{:02}:{:02}, days {:#09b}, {zone}), {} otherwise",
            rate(t.work_bytes_per_sec),
            t.work_start_minute / 60,
            t.work_start_minute % 60,
            t.work_end_minute / 60,
            t.work_end_minute % 60,
            t.work_days,
            rate(t.off_bytes_per_sec)
        ));
    }
    let targets: Vec<String> = options
        .notify_email
        .iter()
        .map(|a| format!("mailto:{a}"))
        .chain(options.webhooks.iter().cloned())
        .collect();
    if !targets.is_empty() {
        parts.push(format!("notify {}", targets.join(", ")));
    }
    if let Some(name) = &options.new_name {
        parts.push(format!("new VM name {name:?}"));
    }
    if parts.is_empty() {
        "no recovery options".into()
    } else {
        parts.join("; ")
    }
}

fn recovery_view(state: &State, job: &Job) -> Option<crate::views::RecoveryView> {
    use cairn_schemas::RecoveryTarget;
    let JobKind::Recovery { target, .. } = &job.kind else {
        return None;
    };
    let recovery = state.recoveries.get(&job.id);
    let vm_name = state.vms.get(&job.vm).map_or("", |v| v.name.as_str());
    let (kind, node) = match target {
        RecoveryTarget::OriginalVm => ("original", job.node.clone()),
        RecoveryTarget::AlternateHost { node, .. } => ("host", Some(node.clone())),
        RecoveryTarget::CopyToFolder { node, .. } => ("folder", Some(node.clone())),
        RecoveryTarget::ItemLevel { node, .. } => ("items", Some(node.clone())),
    };
    let alternate = matches!(target, RecoveryTarget::AlternateHost { .. });
    Some(crate::views::RecoveryView {
        target: kind.into(),
        target_text: crate::notify::describe_target(target),
        node: node.map(|n| n.to_string()),
        options: recovery.map_or_else(
            || "no recovery options".into(),
            |r| recovery_options_summary(&r.options, r.timezone.as_deref()),
        ),
        bytes_written: recovery.map_or(0, |r| r.bytes_written),
        written: recovery.and_then(|r| r.written.clone()),
        new_vm: alternate.then(|| super::jobs::recovered_vm_id(job).to_string()),
        new_vm_name: alternate.then(|| super::jobs::recovered_vm_name(state, job, vm_name)),
        note: crate::notify::recovery_note(target, job.state),
        notifications: recovery
            .map(|r| {
                r.notified
                    .iter()
                    .map(|n| crate::views::NotificationView {
                        target: n.target.clone(),
                        delivered: n.delivered,
                        detail: n.detail.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    })
}
