//! The `qemu` hypervisor adapter: running VMs (QEMU or `qemu-storage-daemon` processes)
//! reached through their QMP socket, whose disks are read point-in-time over NBD while the guest
//! keeps writing, with persistent dirty bitmaps for incremental backups.
//!
//! Per disk and backup (the recipe proven in the project's QEMU notes):
//! - Snapshot: undo what an interrupted earlier backup left (export, fleecing job, overlay), fold
//!   leftover bitmaps back so no change is lost, create a qcow2 fleecing overlay backed by the
//!   disk, freeze the guest's file systems when it has a guest agent, and run **one** QMP
//!   `transaction` for all disks: `block-dirty-bitmap-add` the next bitmap `cairn-<job>`,
//!   `block-dirty-bitmap-disable` the current one, `blockdev-backup sync=none` into the overlay.
//!   Thaw (always, even when the transaction failed). Export the overlay read-only over NBD with
//!   the frozen bitmap. The handle records, per disk, the frozen bitmap.
//! - Transfer: reads the export. When the orchestrator's bitmap (the one started by the
//!   snapshot of the parent recovery point) is the frozen one, it asks `NBD_CMD_BLOCK_STATUS`
//!   for `qemu:dirty-bitmap:<name>` and reads only dirty chunks; clean chunks reuse the parent's
//!   chunks unread. Otherwise (first backup, change tracking lost) it reads everything that
//!   `base:allocation` does not report as zero and stores only what changed (an express full).
//!   Once the recovery point's index is durable the export is removed and the frozen bitmap is
//!   dropped: the new bitmap now records changes since this recovery point.
//! - Release: removes the export, the fleecing job, the overlay node and file; when a frozen
//!   bitmap is still there (its transfer did not finish) it merges the new bitmap into it and
//!   enables it again, in one transaction, so the next backup reads a superset of the changes.
//!
//! Invariant kept on every disk: a bitmap named `cairn-<job>` that exists records at least every
//! write since the snapshot of job `<job>`. Merges only add bits; a missing or inconsistent
//! bitmap means an express full, never a wrong incremental.
//!
//! Must not: write to a guest disk, leave a guest frozen, drop a bitmap that a failed backup
//! still needs, or trust anything QEMU answers without checking it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_schemas::ids::{DiskId, JobId, VmId};
use cairn_schemas::v1::{
    Consistency, ConsistencyWanted, DiskInfo, DiskSource, DiskTracking, ImageFormat, PowerState,
    StepResult, StepSpec, VmInventory,
};
use serde_json::{Value, json};

use super::descriptor::{Descriptor, DescriptorDisk, QemuVm};
use super::image::TransferWork;
use super::progress::StepProgress;
use super::{Agent, Error, lineage_id};
use crate::nbd::{self, BASE_ALLOCATION, Client, ConnectOptions, STATE_DIRTY, STATE_ZERO};
use crate::qmp::{self, Qmp};
use crate::repo::{self, BackupOptions};
use crate::source::{self, Extent, ExtentKind, Source};

/// Prefix (and version) of the snapshot handles this adapter makes.
pub(crate) const HANDLE_PREFIX: &str = "qemu1";
/// Prefix of the dirty bitmaps cairn owns; the rest of the name is a job id.
const BITMAP_PREFIX: &str = "cairn-";
/// Longest accepted snapshot handle.
const MAX_HANDLE_LEN: usize = 16 * 1024;
/// Longest wait for one QMP answer.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the guest agent to freeze or thaw the guest's file systems.
const GUEST_AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a cancelled job or a deleted export to go away.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Backup window assumed by the fleecing-space estimate when nothing better is known.
pub const DEFAULT_BACKUP_WINDOW: Duration = Duration::from_secs(3600);

/// Names of the QEMU objects of one disk's fleecing, derived from the VM and the disk so that a
/// retry or a later backup finds what an interrupted one left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FleeceNames {
    /// Overlay block node (QEMU node names have at most 31 characters).
    pub(crate) overlay_node: String,
    /// The `blockdev-backup` job.
    pub(crate) job: String,
    /// The NBD export's id and name.
    pub(crate) export: String,
    /// The overlay file's name inside the scratch folder.
    pub(crate) overlay_file: String,
}

impl FleeceNames {
    pub(crate) fn of(vm: VmId, disk: &DiskId) -> FleeceNames {
        let mut hasher = blake3::Hasher::new_derive_key("cairn 2024 qemu fleece names v1");
        hasher.update(vm.to_string().as_bytes());
        hasher.update(b"/");
        hasher.update(disk.as_str().as_bytes());
        let key = hex::encode(&hasher.finalize().as_bytes()[..6]);
        FleeceNames {
            overlay_node: format!("cairn-fl-{key}"),
            job: format!("cairn-job-{key}"),
            export: format!("cairn-exp-{key}"),
            overlay_file: format!(".cairn-fleece-{key}.qcow2"),
        }
    }
}

/// The name of the bitmap a job's snapshot starts.
pub(crate) fn bitmap_name(job: JobId) -> String {
    format!("{BITMAP_PREFIX}{job}")
}

/// Whether `name` is a bitmap cairn made.
fn is_cairn_bitmap(name: &str) -> bool {
    name.strip_prefix(BITMAP_PREFIX)
        .is_some_and(|rest| uuid::Uuid::parse_str(rest).is_ok())
}

/// One dirty bitmap of a block node, as `query-named-block-nodes` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BitmapInfo {
    pub(crate) name: String,
    pub(crate) recording: bool,
    pub(crate) inconsistent: bool,
    /// Dirty bytes.
    pub(crate) count: u64,
}

/// What a block node looks like to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeInfo {
    pub(crate) size: u64,
    pub(crate) bitmaps: Vec<BitmapInfo>,
}

/// The QMP actions that bring a disk's cairn bitmaps back to one recording bitmap holding every
/// change any of them holds, and the name of that bitmap. Pure.
///
/// - Inconsistent cairn bitmaps (QEMU found them unclean after a crash) are removed: their
///   content cannot be trusted, so the next backup must read everything.
/// - Disabled cairn bitmaps were frozen by a snapshot whose transfer never finished: the oldest
///   one becomes the recording bitmap again, with every younger bitmap merged into it.
/// - With none frozen, several recording ones (should not happen) are merged into the oldest.
pub(crate) fn fold_actions(node: &str, bitmaps: &[BitmapInfo]) -> (Vec<Value>, Option<String>) {
    let mut actions = Vec::new();
    let mut ours: Vec<&BitmapInfo> = bitmaps
        .iter()
        .filter(|b| is_cairn_bitmap(&b.name))
        .collect();
    for bad in ours.iter().filter(|b| b.inconsistent) {
        actions.push(action(
            "block-dirty-bitmap-remove",
            json!({"node": node, "name": bad.name}),
        ));
    }
    ours.retain(|b| !b.inconsistent);
    // Job ids are UUID v7: name order is creation order.
    ours.sort_by(|a, b| a.name.cmp(&b.name));
    let target = ours
        .iter()
        .find(|b| !b.recording)
        .or_else(|| ours.first())
        .map(|b| b.name.clone());
    let Some(target) = target else {
        return (actions, None);
    };
    let others: Vec<&str> = ours
        .iter()
        .map(|b| b.name.as_str())
        .filter(|n| *n != target)
        .collect();
    if !others.is_empty() {
        actions.push(action(
            "block-dirty-bitmap-merge",
            json!({"node": node, "target": target, "bitmaps": others}),
        ));
    }
    if ours.iter().any(|b| b.name == target && !b.recording) {
        actions.push(action(
            "block-dirty-bitmap-enable",
            json!({"node": node, "name": target}),
        ));
    }
    for other in others {
        actions.push(action(
            "block-dirty-bitmap-remove",
            json!({"node": node, "name": other}),
        ));
    }
    (actions, Some(target))
}

fn action(kind: &str, data: Value) -> Value {
    json!({"type": kind, "data": data})
}

/// Space the fleecing overlay of a disk may need: every cluster the guest overwrites during the
/// backup window is copied there first (MABS's rule of thumb: disk size × churn × window).
/// `churn_per_hour` is the fraction of the disk written per hour.
pub fn fleece_space_bytes(disk_size: u64, churn_per_hour: f64, window: Duration) -> u64 {
    if !churn_per_hour.is_finite() || churn_per_hour <= 0.0 {
        return 0;
    }
    let fraction = (churn_per_hour * window.as_secs_f64() / 3600.0).min(1.0);
    (disk_size as f64 * fraction).ceil() as u64
}

/// The snapshot handle: `qemu1;vm=<vm>;bitmap=<new bitmap>;<disk>=<frozen bitmap or ->,<size>;…`.
/// Opaque to the orchestrator; parsed strictly here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LiveHandle {
    pub(crate) vm: VmId,
    /// The bitmap the snapshot started on every disk.
    pub(crate) bitmap: String,
    /// Per disk: the bitmap frozen by the snapshot (changes since the previous backup's
    /// snapshot), if there was one, and the disk's size.
    pub(crate) disks: Vec<(DiskId, Option<String>, u64)>,
}

impl LiveHandle {
    pub(crate) fn encode(&self) -> String {
        let mut out = format!("{HANDLE_PREFIX};vm={};bitmap={}", self.vm, self.bitmap);
        for (disk, frozen, size) in &self.disks {
            out.push_str(&format!(
                ";{disk}={},{size}",
                frozen.as_deref().unwrap_or("-")
            ));
        }
        out
    }

    pub(crate) fn parse(handle: &str) -> Result<LiveHandle, Error> {
        let bad = |reason: String| Error::BadSnapshotHandle {
            handle: handle.chars().take(200).collect(),
            reason,
        };
        if handle.len() > MAX_HANDLE_LEN {
            return Err(bad(format!("longer than {MAX_HANDLE_LEN} bytes")));
        }
        let mut parts = handle.split(';');
        if parts.next() != Some(HANDLE_PREFIX) {
            return Err(bad("not made by the qemu adapter".into()));
        }
        let vm = parts
            .next()
            .and_then(|p| p.strip_prefix("vm="))
            .ok_or_else(|| bad("no vm= part".into()))?;
        let vm = uuid::Uuid::parse_str(vm)
            .ok()
            .and_then(|u| VmId::from_uuid(u).ok())
            .ok_or_else(|| bad(format!("vm {vm:?} is not a UUID v7")))?;
        let bitmap = parts
            .next()
            .and_then(|p| p.strip_prefix("bitmap="))
            .filter(|b| is_cairn_bitmap(b))
            .ok_or_else(|| bad("no valid bitmap= part".into()))?
            .to_owned();
        let mut disks: Vec<(DiskId, Option<String>, u64)> = Vec::new();
        for part in parts {
            let (disk, rest) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("disk part {part:?} has no '='")))?;
            let disk = DiskId::new(disk.to_owned()).map_err(|e| bad(e.to_string()))?;
            let (frozen, size) = rest
                .split_once(',')
                .ok_or_else(|| bad(format!("disk part {part:?} lacks a size")))?;
            let frozen = match frozen {
                "-" => None,
                name if is_cairn_bitmap(name) => Some(name.to_owned()),
                other => return Err(bad(format!("{other:?} is not a cairn bitmap"))),
            };
            let size = size
                .parse::<u64>()
                .map_err(|_| bad(format!("size {size:?} in disk part {part:?}")))?;
            if disks.iter().any(|(d, _, _)| *d == disk) {
                return Err(bad(format!("disk {disk} appears twice")));
            }
            disks.push((disk, frozen, size));
        }
        if disks.is_empty() {
            return Err(bad("no disks".into()));
        }
        Ok(LiveHandle { vm, bitmap, disks })
    }
}

/// Errors of this adapter that are not the agent's general ones.
fn live_error(what: impl Into<String>, source: qmp::Error) -> Error {
    Error::Live {
        what: what.into(),
        source,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Thread)
}

async fn connect(qemu: &QemuVm) -> Result<Qmp, Error> {
    Qmp::connect(&qemu.qmp, QMP_TIMEOUT)
        .await
        .map_err(|e| live_error("connecting to the VM's QMP socket", e))
}

/// `query-named-block-nodes`, checked: the size and bitmaps of `node`.
async fn node_info(qmp: &mut Qmp, node: &str) -> Result<NodeInfo, Error> {
    let nodes = qmp
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .await
        .map_err(|e| live_error("listing block nodes", e))?;
    parse_node_info(&nodes, node)
}

/// Finds `node` in a `query-named-block-nodes` answer. Pure; refuses malformed answers.
pub(crate) fn parse_node_info(nodes: &Value, node: &str) -> Result<NodeInfo, Error> {
    let malformed = |why: String| Error::InvalidStep(format!("QEMU's block node list {why}"));
    let list = nodes
        .as_array()
        .ok_or_else(|| malformed("is not a list".into()))?;
    let entry = list
        .iter()
        .find(|n| n.get("node-name").and_then(Value::as_str) == Some(node))
        .ok_or_else(|| Error::InvalidStep(format!("the VM has no block node {node:?}")))?;
    let size = entry
        .get("image")
        .and_then(|i| i.get("virtual-size"))
        .and_then(Value::as_u64)
        .ok_or_else(|| malformed(format!("gives no virtual size for {node:?}")))?;
    let mut bitmaps = Vec::new();
    if let Some(list) = entry.get("dirty-bitmaps") {
        let list = list
            .as_array()
            .ok_or_else(|| malformed(format!("has a bad bitmap list for {node:?}")))?;
        for b in list {
            let name = b
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| malformed(format!("has a bitmap without a name on {node:?}")))?;
            bitmaps.push(BitmapInfo {
                name: name.to_owned(),
                recording: b.get("recording").and_then(Value::as_bool).unwrap_or(false),
                inconsistent: b
                    .get("inconsistent")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                count: b.get("count").and_then(Value::as_u64).unwrap_or(0),
            });
        }
    }
    Ok(NodeInfo { size, bitmaps })
}

/// The inventory entry of a live VM: disk sizes from QEMU, formats from the descriptor.
pub(crate) fn probe(descriptor: &Descriptor, qemu: &QemuVm) -> Result<VmInventory, Error> {
    runtime()?.block_on(async {
        let mut qmp = connect(qemu).await?;
        let mut disks = Vec::with_capacity(descriptor.disks.len());
        for disk in &descriptor.disks {
            let node = disk_node(disk)?;
            let info = node_info(&mut qmp, node).await?;
            disks.push(DiskInfo {
                disk: disk.id.clone(),
                size_bytes: info.size,
                format: disk.format.unwrap_or(ImageFormat::Raw),
                image_path: disk.path.to_string_lossy().into_owned(),
            });
        }
        Ok(VmInventory {
            vm: descriptor.vm_id(),
            name: descriptor.name.clone(),
            disks,
            power: PowerState::Running,
        })
    })
}

fn disk_node(disk: &DescriptorDisk) -> Result<&str, Error> {
    disk.node
        .as_deref()
        .ok_or_else(|| Error::InvalidStep(format!("disk {} names no QEMU block node", disk.id)))
}

fn qemu_of(descriptor: &Descriptor) -> Result<&QemuVm, Error> {
    descriptor
        .qemu
        .as_ref()
        .ok_or_else(|| Error::InvalidStep(format!("VM {} is not a qemu VM", descriptor.name)))
}

fn scratch_dir(qemu: &QemuVm, disk: &DescriptorDisk) -> PathBuf {
    qemu.scratch.clone().unwrap_or_else(|| {
        disk.path
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
    })
}

/// The NBD server socket of the VM, starting one when the descriptor names none.
async fn nbd_socket(qmp: &mut Qmp, qemu: &QemuVm) -> Result<PathBuf, Error> {
    if let Some(path) = &qemu.nbd {
        return Ok(path.clone());
    }
    let path = qemu
        .qmp
        .parent()
        .unwrap_or(Path::new("/"))
        .join("cairn-nbd.sock");
    if path.exists() {
        return Ok(path);
    }
    qmp.execute(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": path}}})),
    )
    .await
    .map_err(|e| {
        live_error(
            format!(
                "starting an NBD server at {} (if the VM already runs one, name its socket as \
                 qemu.nbd in the descriptor)",
                path.display()
            ),
            e,
        )
    })?;
    Ok(path)
}

/// Removes one disk's fleecing leftovers: export, job, overlay node and file. Tolerates any of
/// them being absent.
async fn teardown(qmp: &mut Qmp, names: &FleeceNames, overlay: &Path) -> Result<(), Error> {
    let exports = qmp
        .execute("query-block-exports", None)
        .await
        .map_err(|e| live_error("listing NBD exports", e))?;
    let has_export = |exports: &Value| {
        exports.as_array().is_some_and(|l| {
            l.iter()
                .any(|e| e.get("id").and_then(Value::as_str) == Some(&names.export))
        })
    };
    if has_export(&exports) {
        match qmp
            .execute(
                "block-export-del",
                Some(json!({"id": names.export, "mode": "hard"})),
            )
            .await
        {
            Ok(_) => {}
            // Already being deleted.
            Err(e) if e.class() == Some("GenericError") => {
                tracing::debug!(error = %e, "export deletion already under way")
            }
            Err(e) => return Err(live_error("removing the snapshot's NBD export", e)),
        }
        wait_until(
            qmp,
            "query-block-exports",
            |v| !has_export(v),
            "the export to go",
        )
        .await?;
    }
    let jobs = qmp
        .execute("query-block-jobs", None)
        .await
        .map_err(|e| live_error("listing block jobs", e))?;
    let has_job = |jobs: &Value| {
        jobs.as_array().is_some_and(|l| {
            l.iter()
                .any(|j| j.get("device").and_then(Value::as_str) == Some(&names.job))
        })
    };
    if has_job(&jobs) {
        if let Err(e) = qmp
            .execute(
                "block-job-cancel",
                Some(json!({"device": names.job, "force": true})),
            )
            .await
        {
            tracing::debug!(error = %e, "fleecing job cancel refused (already ending?)");
        }
        wait_until(
            qmp,
            "query-block-jobs",
            |v| !has_job(v),
            "the fleecing job to end",
        )
        .await?;
    }
    let nodes = qmp
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .await
        .map_err(|e| live_error("listing block nodes", e))?;
    if nodes.as_array().is_some_and(|l| {
        l.iter()
            .any(|n| n.get("node-name").and_then(Value::as_str) == Some(&names.overlay_node))
    }) {
        qmp.execute(
            "blockdev-del",
            Some(json!({"node-name": names.overlay_node})),
        )
        .await
        .map_err(|e| live_error("removing the fleecing overlay node", e))?;
    }
    match std::fs::remove_file(overlay) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(overlay = %overlay.display(), error = %e, "cannot remove a fleecing overlay")
        }
    }
    Ok(())
}

/// Polls `query` until `done` holds for its answer.
async fn wait_until(
    qmp: &mut Qmp,
    query: &str,
    done: impl Fn(&Value) -> bool,
    what: &str,
) -> Result<(), Error> {
    let deadline = Instant::now() + TEARDOWN_TIMEOUT;
    loop {
        let answer = qmp
            .execute(query, None)
            .await
            .map_err(|e| live_error(format!("waiting for {what}"), e))?;
        if done(&answer) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::InvalidStep(format!(
                "QEMU did not let {what} within {TEARDOWN_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the fold of [`fold_actions`] on one disk; returns the recording bitmap left, if any.
async fn fold_bitmaps(qmp: &mut Qmp, node: &str) -> Result<Option<String>, Error> {
    let info = node_info(qmp, node).await?;
    let (actions, target) = fold_actions(node, &info.bitmaps);
    if !actions.is_empty() {
        tracing::info!(
            node,
            ?target,
            n_actions = actions.len(),
            "folding change-tracking bitmaps left by an unfinished backup"
        );
        qmp.execute("transaction", Some(json!({"actions": actions})))
            .await
            .map_err(|e| live_error("folding leftover change-tracking bitmaps", e))?;
    }
    Ok(target)
}

/// The guest agent's freeze: `Some(true)` frozen, `Some(false)` asked but refused (crash
/// consistency), `None` not asked.
async fn freeze(qemu: &QemuVm, wanted: ConsistencyWanted) -> Option<Result<(), qmp::Error>> {
    if wanted == ConsistencyWanted::CrashOnly || qemu.replica.is_some() {
        return None;
    }
    let path = qemu.guest_agent.as_ref()?;
    Some(
        async {
            let mut qga = Qmp::connect_guest_agent(path, GUEST_AGENT_TIMEOUT).await?;
            let frozen = qga.execute("guest-fsfreeze-freeze", None).await?;
            tracing::info!(file_systems = %frozen, "guest file systems frozen");
            Ok(())
        }
        .await,
    )
}

async fn thaw(qemu: &QemuVm) -> Result<(), qmp::Error> {
    let Some(path) = &qemu.guest_agent else {
        return Ok(());
    };
    let mut qga = Qmp::connect_guest_agent(path, GUEST_AGENT_TIMEOUT).await?;
    let thawed = qga.execute("guest-fsfreeze-thaw", None).await?;
    tracing::info!(file_systems = %thawed, "guest file systems thawed");
    Ok(())
}

/// One disk as the snapshot prepares it.
struct Prepared {
    disk: DiskId,
    node: String,
    names: FleeceNames,
    overlay: PathBuf,
    frozen: Option<String>,
    size: u64,
    persistent: bool,
}

pub(crate) fn snapshot(
    agent: &Agent,
    spec: &StepSpec,
    descriptor: &Descriptor,
    disks: &[DiskSource],
    wanted: ConsistencyWanted,
) -> Result<StepResult, Error> {
    let qemu = qemu_of(descriptor)?;
    if let Some(state) = qemu.replica
        && let Some(reason) = state.refusal()
    {
        return Err(Error::Replica {
            vm: descriptor.name.clone(),
            reason: reason.to_owned(),
        });
    }
    let bitmap = bitmap_name(spec.job);
    runtime()?.block_on(async {
        let mut qmp = connect(qemu).await?;
        let mut prepared: Vec<Prepared> = Vec::with_capacity(disks.len());
        for source in disks {
            let disk = descriptor
                .disks
                .iter()
                .find(|d| d.id == source.disk)
                .ok_or_else(|| Error::UnknownDisk {
                    vm: spec.vm,
                    disk: source.disk.clone(),
                    path: source.image_path.clone(),
                    node: agent.config.node.clone(),
                })?;
            if prepared.iter().any(|p| p.disk == source.disk) {
                return Err(Error::InvalidStep(format!("disk {} is listed twice", source.disk)));
            }
            let node = disk_node(disk)?.to_owned();
            let names = FleeceNames::of(spec.vm, &disk.id);
            let scratch = scratch_dir(qemu, disk);
            let overlay = scratch.join(&names.overlay_file);
            teardown(&mut qmp, &names, &overlay).await?;
            let frozen = fold_bitmaps(&mut qmp, &node).await?;
            // A retried snapshot of this job finds its own bitmap recording: it already holds
            // this job's point in time and the fold kept it; start it afresh below.
            let frozen = match frozen {
                Some(name) if name == bitmap => {
                    qmp.execute(
                        "block-dirty-bitmap-remove",
                        Some(json!({"node": node, "name": name})),
                    )
                    .await
                    .map_err(|e| live_error("removing this job's earlier bitmap", e))?;
                    fold_bitmaps(&mut qmp, &node).await?
                }
                other => other,
            };
            let info = node_info(&mut qmp, &node).await?;
            if info.size != source.size_bytes {
                return Err(Error::SizeMismatch {
                    disk: source.disk.clone(),
                    path: source.image_path.clone(),
                    actual: info.size,
                    expected: source.size_bytes,
                });
            }
            if let Some(name) = &frozen
                && let Some(b) = info.bitmaps.iter().find(|b| &b.name == name)
            {
                let since_ms = name
                    .strip_prefix(BITMAP_PREFIX)
                    .and_then(|id| id.parse::<JobId>().ok())
                    .map(|job| job.unix_millis());
                let hours = since_ms
                    .map(|ms| spec.job.unix_millis().saturating_sub(ms) as f64 / 3.6e6)
                    .filter(|h| *h > 0.0);
                if let Some(hours) = hours {
                    let churn = b.count as f64 / info.size.max(1) as f64 / hours;
                    let need = fleece_space_bytes(info.size, churn, DEFAULT_BACKUP_WINDOW);
                    tracing::info!(disk = %disk.id, dirty_bytes = b.count, churn_per_hour = churn,
                        overlay_bytes_per_hour_of_backup = need,
                        "fleecing overlay space needed (disk size × churn × backup window)");
                }
            }
            std::fs::create_dir_all(&scratch).map_err(|e| source_io(&disk.id, &scratch, e))?;
            create_overlay(&overlay, info.size).map_err(|e| Error::Source {
                disk: disk.id.to_string(),
                source: e,
            })?;
            let added = qmp
                .execute(
                    "blockdev-add",
                    Some(json!({
                        "driver": "qcow2",
                        "node-name": names.overlay_node,
                        "file": {"driver": "file", "filename": overlay},
                        "backing": node,
                    })),
                )
                .await;
            if let Err(e) = added {
                let _ = std::fs::remove_file(&overlay);
                return Err(live_error("adding the fleecing overlay", e));
            }
            let persistent = disk.format == Some(ImageFormat::Qcow2);
            prepared.push(Prepared {
                disk: disk.id.clone(),
                node,
                names,
                overlay,
                frozen,
                size: info.size,
                persistent,
            });
        }
        let mut actions = Vec::new();
        for p in &prepared {
            // Raw images cannot store bitmaps: theirs live as long as the QEMU process.
            actions.push(action(
                "block-dirty-bitmap-add",
                json!({"node": p.node, "name": bitmap, "persistent": p.persistent}),
            ));
            if let Some(frozen) = &p.frozen {
                actions.push(action(
                    "block-dirty-bitmap-disable",
                    json!({"node": p.node, "name": frozen}),
                ));
            }
            actions.push(action(
                "blockdev-backup",
                json!({"job-id": p.names.job, "device": p.node, "target": p.names.overlay_node,
                       "sync": "none", "auto-dismiss": true}),
            ));
        }
        let frozen_guest = freeze(qemu, wanted).await;
        let snapped = qmp
            .execute("transaction", Some(json!({"actions": actions})))
            .await
            .map_err(|e| live_error("taking the point-in-time snapshot", e));
        // Thaw whatever happened, even when freezing itself failed half-way.
        let consistency = match frozen_guest {
            None => Consistency::Crash,
            Some(result) => {
                if let Err(e) = thaw(qemu).await {
                    tracing::error!(error = %e, vm = %descriptor.name,
                        "could not thaw the guest's file systems");
                    if snapped.is_ok() {
                        undo(&mut qmp, &prepared).await;
                        return Err(live_error("thawing the guest's file systems", e));
                    }
                }
                match result {
                    Ok(()) => Consistency::Application,
                    Err(e) => {
                        tracing::warn!(error = %e, vm = %descriptor.name,
                            "the guest agent did not freeze the guest; the backup is crash-consistent");
                        Consistency::Crash
                    }
                }
            }
        };
        if let Err(e) = snapped {
            for p in &prepared {
                let _ = teardown(&mut qmp, &p.names, &p.overlay).await;
            }
            return Err(e);
        }
        let socket = match nbd_socket(&mut qmp, qemu).await {
            Ok(socket) => socket,
            Err(e) => {
                undo(&mut qmp, &prepared).await;
                return Err(e);
            }
        };
        for p in &prepared {
            let bitmaps: Vec<&str> = p.frozen.iter().map(String::as_str).collect();
            let exported = qmp
                .execute(
                    "block-export-add",
                    Some(json!({"type": "nbd", "id": p.names.export, "node-name": p.names.overlay_node,
                           "name": p.names.export, "writable": false, "bitmaps": bitmaps})),
                )
                .await;
            if let Err(e) = exported {
                undo(&mut qmp, &prepared).await;
                return Err(live_error(
                    format!("exporting the snapshot of disk {} on {}", p.disk, socket.display()),
                    e,
                ));
            }
        }
        let handle = LiveHandle {
            vm: spec.vm,
            bitmap: bitmap.clone(),
            disks: prepared
                .iter()
                .map(|p| (p.disk.clone(), p.frozen.clone(), p.size))
                .collect(),
        };
        tracing::info!(vm = %descriptor.name, ?consistency, bitmap, "point-in-time snapshot taken");
        Ok(StepResult::Snapshot {
            snapshot: handle.encode(),
            consistency,
            tracking: prepared
                .iter()
                .map(|p| DiskTracking {
                    disk: p.disk.clone(),
                    bitmap: bitmap.clone(),
                })
                .collect(),
        })
    })
}

/// Undoes a snapshot after its transaction ran: teardown and fold the bitmaps back.
async fn undo(qmp: &mut Qmp, prepared: &[Prepared]) {
    for p in prepared {
        if let Err(e) = teardown(qmp, &p.names, &p.overlay).await {
            tracing::error!(disk = %p.disk, error = %e, "could not undo a snapshot");
        }
        if let Err(e) = fold_bitmaps(qmp, &p.node).await {
            tracing::error!(disk = %p.disk, error = %e, "could not fold bitmaps back");
        }
    }
}

fn source_io(disk: &DiskId, path: &Path, e: std::io::Error) -> Error {
    Error::Source {
        disk: disk.to_string(),
        source: source::Error::Io {
            path: path.to_path_buf(),
            source: e,
        },
    }
}

/// `qemu-img create -f qcow2` of the overlay (its backing is set when QEMU opens it).
fn create_overlay(path: &Path, size: u64) -> Result<(), source::Error> {
    let _ = std::fs::remove_file(path);
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .output()
        .map_err(|e| source::Error::Tool {
            path: path.to_path_buf(),
            program: "qemu-img",
            message: format!("cannot run qemu-img: {e}"),
        })?;
    if !out.status.success() {
        return Err(source::Error::Tool {
            path: path.to_path_buf(),
            program: "qemu-img",
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// The snapshot export as a [`Source`]: `base:allocation` tells data from zeros, the frozen
/// bitmap (when trusted) tells changed from unchanged.
struct SnapshotSource {
    client: Client,
    size: u64,
    bitmap_context: Option<String>,
    describe: String,
}

impl SnapshotSource {
    fn nbd_error(&self, source: nbd::Error) -> source::Error {
        source::Error::Nbd {
            path: PathBuf::from(&self.describe),
            source,
        }
    }
}

/// Combines allocation and dirty extents of the same range into source extents. Pure.
pub(crate) fn combine_extents(
    allocation: &[nbd::StatusExtent],
    dirty: Option<&[nbd::StatusExtent]>,
    offset: u64,
    len: u64,
) -> Vec<Extent> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |offset: u64, len: u64, kind: ExtentKind| match out.last_mut() {
        Some(last) if last.kind == kind && last.offset + last.len == offset => last.len += len,
        _ => out.push(Extent { offset, len, kind }),
    };
    let kind_at = |list: &[nbd::StatusExtent], pos: u64| {
        list.iter()
            .find(|e| e.offset <= pos && pos < e.offset + e.len)
            .map(|e| (e.flags, e.offset + e.len))
    };
    let mut pos = offset;
    while pos < end {
        let (alloc_flags, alloc_end) = kind_at(allocation, pos).unwrap_or((0, end));
        let (dirty_flags, dirty_end) = match dirty {
            Some(list) => kind_at(list, pos).unwrap_or((STATE_DIRTY, end)),
            None => (STATE_DIRTY, end),
        };
        let next = alloc_end.min(dirty_end).min(end).max(pos + 1);
        let kind = if dirty_flags & STATE_DIRTY == 0 {
            ExtentKind::Unchanged
        } else if alloc_flags & STATE_ZERO != 0 {
            ExtentKind::Zero
        } else {
            ExtentKind::Data
        };
        push(pos, next - pos, kind);
        pos = next;
    }
    out
}

impl Source for SnapshotSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>, source::Error> {
        let allocation = self
            .client
            .block_status(BASE_ALLOCATION, offset, len)
            .map_err(|e| self.nbd_error(e))?;
        let dirty = match &self.bitmap_context {
            Some(context) => Some(
                self.client
                    .block_status(context, offset, len)
                    .map_err(|e| self.nbd_error(e))?,
            ),
            None => None,
        };
        Ok(combine_extents(&allocation, dirty.as_deref(), offset, len))
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), source::Error> {
        self.client
            .read_at(offset, buf)
            .map_err(|e| self.nbd_error(e))
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

pub(crate) fn transfer(
    agent: &Agent,
    spec: &StepSpec,
    work: &TransferWork<'_>,
    change_tracking: Option<&str>,
    progress: &StepProgress<'_>,
) -> Result<StepResult, Error> {
    let outcome = transfer_outcome(agent, spec, work, change_tracking, progress)?;
    Ok(StepResult::Transfer {
        disk: work.source.disk.clone(),
        bytes_read: outcome.bytes_read,
        bytes_stored: outcome.bytes_stored,
        incremental: outcome.incremental,
    })
}

/// A consistency check of a running VM's disk: the snapshot read whole (no bitmap), each
/// chunk's id compared with the replica's; what differs is stored.
pub(crate) fn check(
    agent: &Agent,
    spec: &StepSpec,
    work: &TransferWork<'_>,
    progress: &StepProgress<'_>,
) -> Result<super::image::TransferOutcome, Error> {
    transfer_outcome(agent, spec, work, None, progress)
}

fn transfer_outcome(
    agent: &Agent,
    spec: &StepSpec,
    work: &TransferWork<'_>,
    change_tracking: Option<&str>,
    progress: &StepProgress<'_>,
) -> Result<super::image::TransferOutcome, Error> {
    let source = work.source;
    let handle = LiveHandle::parse(work.snapshot)?;
    if handle.vm != spec.vm {
        return Err(Error::BadSnapshotHandle {
            handle: work.snapshot.into(),
            reason: format!(
                "it is a snapshot of VM {}, not of VM {}",
                handle.vm, spec.vm
            ),
        });
    }
    let (_, frozen, size) = handle
        .disks
        .iter()
        .find(|(d, _, _)| *d == source.disk)
        .cloned()
        .ok_or_else(|| Error::BadSnapshotHandle {
            handle: work.snapshot.into(),
            reason: format!("the snapshot does not include disk {}", source.disk),
        })?;
    let lineage = lineage_id(spec.vm, &source.disk)?;
    let repo = super::image::open_repository(agent, work.repository)?;
    if let Some(done) = super::image::committed(&repo, work.repository, &lineage, work.rp)? {
        tracing::info!(rp = %work.rp, lineage, "recovery point already committed by an earlier attempt");
        // The earlier attempt may have died before retiring the consumed bitmap.
        if let Ok(descriptor) = agent.described_vm(spec.vm)
            && let Some(qemu) = &descriptor.qemu
            && let Some(disk) = descriptor.disks.iter().find(|d| d.id == source.disk)
        {
            retire_consumed(
                qemu,
                disk,
                &FleeceNames::of(spec.vm, &disk.id),
                frozen.as_deref(),
            );
        }
        return Ok(super::image::TransferOutcome {
            bytes_read: done.bytes_read,
            bytes_stored: done.bytes_stored,
            incremental: done.parent.is_some() && done.bytes_read < done.disk_size,
            chunks_total: done.n_chunks(),
            chunks_differing: done.chunks_stored,
        });
    }
    let descriptor = agent.described_vm(spec.vm)?;
    let qemu = qemu_of(&descriptor)?;
    let disk = descriptor
        .disks
        .iter()
        .find(|d| d.id == source.disk)
        .ok_or_else(|| Error::UnknownDisk {
            vm: spec.vm,
            disk: source.disk.clone(),
            path: source.image_path.clone(),
            node: agent.config.node.clone(),
        })?;
    if size != source.size_bytes {
        return Err(Error::SizeMismatch {
            disk: source.disk.clone(),
            path: source.image_path.clone(),
            actual: size,
            expected: source.size_bytes,
        });
    }
    let names = FleeceNames::of(spec.vm, &disk.id);
    // Incremental only when the bitmap the snapshot froze is the one that started at the
    // parent recovery point.
    let tracked = match (change_tracking, frozen.as_deref(), work.parent_rp) {
        (Some(wanted), Some(frozen), Some(_)) if wanted == frozen => true,
        (Some(wanted), frozen, _) => {
            tracing::warn!(disk = %disk.id, wanted, ?frozen,
                "change tracking lost: the bitmap of the parent recovery point is not the one \
                 this snapshot froze; reading everything (express full)");
            false
        }
        (None, _, _) => false,
    };
    let rt = runtime()?;
    let socket = rt.block_on(async {
        let mut qmp = connect(qemu).await?;
        nbd_socket(&mut qmp, qemu).await
    })?;
    let mut contexts = vec![BASE_ALLOCATION.to_string()];
    let bitmap_context = frozen
        .as_deref()
        .filter(|_| tracked)
        .map(nbd::dirty_bitmap_context);
    contexts.extend(bitmap_context.clone());
    let options = ConnectOptions::new(names.export.clone()).with_meta_contexts(contexts);
    let client = Client::connect_unix(&socket, &options).map_err(|e| Error::Source {
        disk: disk.id.to_string(),
        source: source::Error::Nbd {
            path: socket.clone(),
            source: e,
        },
    })?;
    if client.size() != size {
        return Err(Error::ChangedSinceSnapshot {
            disk: source.disk.clone(),
            path: source.image_path.clone(),
            what: format!(
                "the snapshot export has {} bytes, not {size}",
                client.size()
            ),
        });
    }
    let mut snapshot = SnapshotSource {
        client,
        size,
        bitmap_context,
        describe: format!(
            "snapshot of {} (QEMU node {:?})",
            disk.id,
            disk.node.as_deref().unwrap_or("")
        ),
    };
    let options = BackupOptions {
        disk: lineage.clone(),
        now_ms: work.rp.unix_millis(),
        threads: agent.config.threads,
        rp: Some(work.rp.to_string()),
        unchanged_since: work.parent_rp.filter(|_| tracked).map(|p| p.to_string()),
    };
    let summary =
        repo::backup(&repo, &mut snapshot, &options, progress).map_err(|source| Error::Repo {
            repository: work.repository.to_owned(),
            source,
        })?;
    drop(snapshot);
    // The recovery point is durable: the frozen bitmap has served. Dropping it makes the new
    // bitmap the one covering changes since this recovery point; if this fails, the release
    // folds it back and the next backup is an express full at worst.
    retire_consumed(qemu, disk, &names, frozen.as_deref());
    Ok(super::image::TransferOutcome {
        bytes_read: summary.bytes_read,
        bytes_stored: summary.bytes_stored,
        incremental: summary.tracked,
        chunks_total: summary.chunks_total,
        chunks_differing: summary.chunks_new + summary.chunks_reused,
    })
}

/// Best effort, once a disk's recovery point is durable: removes the snapshot's export and the
/// frozen bitmap it consumed, so the bitmap the snapshot started covers changes since this
/// recovery point. On failure the release folds the frozen bitmap back, and the next backup is
/// an express full at worst.
fn retire_consumed(
    qemu: &QemuVm,
    disk: &DescriptorDisk,
    names: &FleeceNames,
    frozen: Option<&str>,
) {
    let retired = runtime().and_then(|rt| {
        rt.block_on(async {
            let mut qmp = connect(qemu).await?;
            let node = disk_node(disk)?;
            teardown_export_only(&mut qmp, names).await?;
            if let Some(frozen) = frozen {
                let info = node_info(&mut qmp, node).await?;
                if info.bitmaps.iter().any(|b| b.name == frozen) {
                    qmp.execute(
                        "block-dirty-bitmap-remove",
                        Some(json!({"node": node, "name": frozen})),
                    )
                    .await
                    .map_err(|e| live_error("dropping the bitmap this backup consumed", e))?;
                }
            }
            Ok::<(), Error>(())
        })
    });
    if let Err(e) = retired {
        tracing::warn!(disk = %disk.id, error = %e,
            "could not retire the consumed bitmap; the next backup may read everything");
    }
}

/// Removes only the export of a disk's snapshot (its bitmap is busy while exported).
async fn teardown_export_only(qmp: &mut Qmp, names: &FleeceNames) -> Result<(), Error> {
    let has_export = |exports: &Value| {
        exports.as_array().is_some_and(|l| {
            l.iter()
                .any(|e| e.get("id").and_then(Value::as_str) == Some(&names.export))
        })
    };
    let exports = qmp
        .execute("query-block-exports", None)
        .await
        .map_err(|e| live_error("listing NBD exports", e))?;
    if has_export(&exports) {
        qmp.execute(
            "block-export-del",
            Some(json!({"id": names.export, "mode": "hard"})),
        )
        .await
        .map_err(|e| live_error("removing the snapshot's NBD export", e))?;
        wait_until(
            qmp,
            "query-block-exports",
            |v| !has_export(v),
            "the export to go",
        )
        .await?;
    }
    Ok(())
}

pub(crate) fn release(agent: &Agent, spec: &StepSpec, snapshot: &str) -> Result<StepResult, Error> {
    let handle = LiveHandle::parse(snapshot)?;
    if handle.vm != spec.vm {
        return Err(Error::BadSnapshotHandle {
            handle: snapshot.into(),
            reason: format!(
                "it is a snapshot of VM {}, not of VM {}",
                handle.vm, spec.vm
            ),
        });
    }
    let descriptor = match agent.described_vm(spec.vm) {
        Ok(d) => d,
        Err(Error::UnknownVm { .. }) => {
            // The VM moved or is gone: its next snapshot, wherever it runs, folds the leftovers.
            tracing::warn!(vm = %spec.vm, "VM no longer on this node; its next snapshot cleans up");
            return Ok(StepResult::ReleaseSnapshot);
        }
        Err(e) => return Err(e),
    };
    let qemu = qemu_of(&descriptor)?;
    runtime()?.block_on(async {
        let mut qmp = connect(qemu).await?;
        for (disk_id, frozen, _) in &handle.disks {
            let Some(disk) = descriptor.disks.iter().find(|d| &d.id == disk_id) else {
                continue;
            };
            let node = disk_node(disk)?;
            let names = FleeceNames::of(spec.vm, disk_id);
            let overlay = scratch_dir(qemu, disk).join(&names.overlay_file);
            teardown(&mut qmp, &names, &overlay).await?;
            let info = node_info(&mut qmp, node).await?;
            let still_frozen = frozen
                .as_ref()
                .is_some_and(|f| info.bitmaps.iter().any(|b| &b.name == f && !b.recording));
            if still_frozen {
                tracing::info!(disk = %disk_id, "the transfer did not finish: merging the new bitmap back into the frozen one");
            }
            fold_bitmaps(&mut qmp, node).await?;
        }
        Ok(StepResult::ReleaseSnapshot)
    })
}

#[cfg(test)]
mod tests;
