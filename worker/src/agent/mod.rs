//! The worker side of jobs: a node's inventory and the step executor.
//!
//! The orchestrator dispatches [`StepSpec`]s to the worker of a node; [`Agent::execute`] runs one
//! attempt and reports [`ReportBody`]s: `Started`, then `Progress` heartbeats, and returns the
//! final `Succeeded { result }` or `Failed { class, message }`. The agent holds no state between
//! steps: what a step needs is in its spec, in the repository or in the hypervisor (today the
//! `image` adapter: VMs described by [`descriptor`] files). Every step is idempotent:
//! a retried attempt finds what an earlier one left and finishes it (a transfer's recovery point
//! id is chosen by the orchestrator; a restore continues with a delta restore).
//!
//! The API is synchronous and free of tokio: the binary calls it from `spawn_blocking`. The step
//! runs on a thread of its own; the calling thread sends a heartbeat about once per
//! [`DEFAULT_PROGRESS_INTERVAL`] while it runs (so the orchestrator sees progress at least every
//! few seconds even when a read stalls briefly), and stops heartbeating when no byte has moved
//! for [`progress::STALL_LIMIT`]. Cancellation is a flag the caller sets; backup and restore
//! poll it once per batch and stop, leaving the repository as a crash would (nothing
//! half-published), and the step fails *retryably* with a message saying it was cancelled.
//!
//! Failure classes: source IO errors, a busy lineage, an image changed since the snapshot, a
//! repository IO error and cancellation are `Retryable`; a bad spec, an unknown VM or disk, a
//! bad or missing image, a corrupt repository, a wrong key and a missing recovery point are
//! `Permanent`.
//!
//! # Test fault hook
//!
//! `CAIRN_FAULT_STEP_DELAY_MS=<StepKind>=<ms>[,<StepKind>=<ms>…]`, e.g.
//! `Snapshot=3000,CommitRecoveryPoint=3000,Transfer=0`, delays the work of each named step kind
//! by that many milliseconds *after* `Started` is reported (heartbeats continue meanwhile), so
//! end-to-end crash tests can `kill -9` a process while a chosen step runs. See [`fault`]. It is
//! read by [`Agent::new`]; a malformed value is an error. Production workers leave it unset.
//!
//! Must not: read the event log, keep state between steps, or read an image that is not a
//! described disk of the step's VM on this node.

pub mod descriptor;
pub mod fault;
mod image;
pub mod items;
mod progress;
pub mod qemu;
mod recovery;
mod upkeep;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use cairn_schemas::ids::{DiskId, NodeId, RecoveryPointId, VmId};
use cairn_schemas::v1::{FailureClass, PowerState};
use cairn_schemas::v1::{ReportBody, StepResult, StepSpec, StepWork};
use crossbeam_channel::{RecvTimeoutError, bounded};

pub use descriptor::{
    Descriptor, DescriptorDisk, DescriptorProblem, Inventory, QemuVm, ReplicaState,
};
pub use fault::{FAULT_DELAY_ENV, FaultDelays, FaultHookError};
pub use progress::STALL_LIMIT;

use crate::boundary::{self, Encryption, NodeSettings};
use crate::repo;
use crate::source;
use progress::{Heartbeat, StepProgress};

/// How often a running step reports progress by default.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// How an agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The node this worker runs on; steps for another node are refused.
    pub node: NodeId,
    /// The folder of VM descriptors (`*.json`).
    pub vms_dir: PathBuf,
    /// The repositories' key file (encrypted repositories).
    pub key_file: Option<PathBuf>,
    /// Hashing/compression threads of backups and restores; 0 = one per core.
    pub threads: usize,
    /// The node's boundary: registered repositories, roots and limits. Steps asking for
    /// anything outside it are refused before anything is touched.
    pub settings: NodeSettings,
}

/// Why a step failed. [`Error::class`] says whether a retry may succeed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The test fault hook's value is malformed.
    #[error(transparent)]
    FaultHook(#[from] FaultHookError),
    /// The step was dispatched to the wrong node.
    #[error("the step is for node {wanted}, this worker is node {this}")]
    WrongNode {
        /// The spec's node.
        wanted: NodeId,
        /// This agent's node.
        this: NodeId,
    },
    /// The spec asks for something that cannot be done as asked.
    #[error("{0}")]
    InvalidStep(String),
    /// No descriptor on this node describes the VM.
    #[error("VM {vm} is not described on node {node} (no valid descriptor in {dir} has its uuid)")]
    UnknownVm {
        /// The VM.
        vm: VmId,
        /// This node.
        node: NodeId,
        /// The descriptor folder.
        dir: PathBuf,
    },
    /// The VM's descriptor has no such disk at that path.
    #[error("VM {vm} has no disk {disk} at {path} on node {node}")]
    UnknownDisk {
        /// The VM.
        vm: VmId,
        /// The disk the step names.
        disk: DiskId,
        /// The path the step names.
        path: String,
        /// This node.
        node: NodeId,
    },
    /// The snapshot handle was not made by this adapter for this VM and disk.
    #[error("unusable snapshot handle {handle:?}: {reason}")]
    BadSnapshotHandle {
        /// The handle (truncated).
        handle: String,
        /// What is wrong.
        reason: String,
    },
    /// The image was modified, resized or replaced after the snapshot step.
    #[error(
        "disk {disk} ({path}) changed since the snapshot was taken ({what}); a new snapshot is needed"
    )]
    ChangedSinceSnapshot {
        /// The disk.
        disk: DiskId,
        /// Its image.
        path: String,
        /// What changed.
        what: String,
    },
    /// The image's virtual size is not the one the step expects.
    #[error(
        "disk {disk} ({path}) is {actual} bytes, the step expects {expected} bytes (resized? the inventory will report it)"
    )]
    SizeMismatch {
        /// The disk.
        disk: DiskId,
        /// Its image.
        path: String,
        /// Its size now.
        actual: u64,
        /// The spec's size.
        expected: u64,
    },
    /// A disk of the recovery point is not in the repository.
    #[error(
        "recovery point {rp} has no disk {disk} in repository {repository} (lineage {lineage} lacks it)"
    )]
    MissingDisk {
        /// The recovery point.
        rp: RecoveryPointId,
        /// The disk.
        disk: DiskId,
        /// Its lineage.
        lineage: String,
        /// The repository.
        repository: String,
    },
    /// The restore target cannot be used.
    #[error("restore target {path}: {reason}")]
    Target {
        /// The target.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// Reading or writing an image failed.
    #[error("disk {disk}: {source}")]
    Source {
        /// The disk.
        disk: String,
        /// What failed.
        #[source]
        source: source::Error,
    },
    /// A repository operation failed.
    #[error("repository {repository}: {source}")]
    Repo {
        /// The repository's location.
        repository: String,
        /// What failed.
        #[source]
        source: repo::Error,
    },
    /// The node's settings refuse what the step asks for (a target outside the roots, an
    /// unregistered repository).
    #[error(transparent)]
    Boundary(#[from] boundary::Error),
    /// A registered repository cannot be used as its registration says.
    #[error("repository {name} ({path}): {reason}")]
    Registered {
        /// Its registered name.
        name: String,
        /// Its folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A write below a root failed or was refused by the kernel (a link, an escape).
    #[error("{what}: {source}")]
    SafeFs {
        /// What we were writing.
        what: String,
        /// What failed.
        #[source]
        source: crate::safefs::Error,
    },
    /// Item-level recovery failed (a path, the image's file systems or the target folder).
    #[error(transparent)]
    Items(crate::items::Error),
    /// The caller set the cancel flag.
    #[error("step cancelled")]
    Cancelled,
    /// A recovery over a VM's disks needs the VM stopped.
    #[error("VM {name} ({vm}) is {power} on node {node}; stop it before recovering over its disks")]
    VmNotStopped {
        /// The VM.
        vm: VmId,
        /// Its name.
        name: String,
        /// Its power state, in words.
        power: String,
        /// This node.
        node: NodeId,
    },
    /// The configured key file is unusable: missing, too short, not private to this user.
    #[error(transparent)]
    KeyFile(repo::Error),
    /// The step's thread could not be started.
    #[error("cannot start the step's thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The step's thread panicked (a bug).
    #[error("internal error: the step panicked: {0}")]
    Panicked(String),
    /// Talking to a running VM's QEMU failed.
    #[error("{what}: {source}")]
    Live {
        /// What we were doing.
        what: String,
        /// What QMP or QEMU said.
        #[source]
        source: crate::qmp::Error,
    },
    /// A replica VM is in a state in which a crash-consistent backup cannot be guaranteed.
    #[error("replica VM {vm} cannot be backed up now: {reason}")]
    Replica {
        /// The VM.
        vm: String,
        /// Its replication state, in words.
        reason: String,
    },
}

impl Error {
    /// Whether the orchestrator may retry the step.
    pub fn class(&self) -> FailureClass {
        match self {
            Error::ChangedSinceSnapshot { .. } | Error::Cancelled | Error::Thread(_) => {
                FailureClass::Retryable
            }
            Error::Source { source, .. } => source_class(source),
            // A VM that does not answer may be restarting; QEMU refusing a command will refuse
            // it again.
            Error::Live { source, .. } => match source {
                crate::qmp::Error::Command { .. } | crate::qmp::Error::Protocol { .. } => {
                    FailureClass::Permanent
                }
                _ => FailureClass::Retryable,
            },
            Error::Repo { source, .. } => repo_class(source),
            Error::Items(crate::items::Error::Io { source, .. }) => io_class(source),
            Error::Items(_) => FailureClass::Permanent,
            Error::SafeFs { source, .. } => match source {
                crate::safefs::Error::Io { source, .. }
                    if !matches!(source.raw_os_error(), Some(libc::ELOOP) | Some(libc::EXDEV)) =>
                {
                    io_class(source)
                }
                _ => FailureClass::Permanent,
            },
            Error::FaultHook(_)
            | Error::WrongNode { .. }
            | Error::InvalidStep(_)
            | Error::UnknownVm { .. }
            | Error::UnknownDisk { .. }
            | Error::BadSnapshotHandle { .. }
            | Error::SizeMismatch { .. }
            | Error::MissingDisk { .. }
            | Error::Target { .. }
            | Error::Replica { .. }
            | Error::VmNotStopped { .. }
            | Error::KeyFile(_)
            | Error::Boundary(_)
            | Error::Registered { .. }
            | Error::Panicked(_) => FailureClass::Permanent,
        }
    }
}

/// IO errors: a missing or forbidden file will stay so; anything else (EIO, ENOSPC, a stale NFS
/// handle, a timeout) may pass.
fn io_class(err: &std::io::Error) -> FailureClass {
    use std::io::ErrorKind;
    match err.kind() {
        ErrorKind::NotFound | ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => {
            FailureClass::Permanent
        }
        _ => FailureClass::Retryable,
    }
}

/// Source errors: a missing or forbidden image and a bad image are permanent; other IO, a failed
/// `qemu-nbd` (e.g. the image is locked by a running QEMU) and NBD errors may pass.
fn source_class(err: &source::Error) -> FailureClass {
    match err {
        source::Error::Io { source, .. } => io_class(source),
        source::Error::Invalid { .. } | source::Error::UnsupportedFormat { .. } => {
            FailureClass::Permanent
        }
        source::Error::Tool { .. } | source::Error::Nbd { .. } => FailureClass::Retryable,
    }
}

/// Repository errors: a busy lineage, IO (storage full, NFS down) and cancellation may pass;
/// a missing, forbidden or damaged repository, a wrong key, unknown disks and recovery points
/// do not.
fn repo_class(err: &repo::Error) -> FailureClass {
    match err {
        repo::Error::Io { source, .. } => io_class(source),
        repo::Error::Busy { .. } | repo::Error::Cancelled { .. } => FailureClass::Retryable,
        repo::Error::Source(source) => source_class(source),
        _ => FailureClass::Permanent,
    }
}

/// The repository lineage (repo disk id) of a VM's disk: `<vm id>.<disk id>`.
pub fn lineage_id(vm: VmId, disk: &DiskId) -> Result<String, Error> {
    let lineage = format!("{vm}.{disk}");
    repo::lineage::validate_disk_id(&lineage).map_err(|e| {
        Error::InvalidStep(format!(
            "disk {disk} of VM {vm} has no usable repository lineage: {e} (disk ids of VMs are \
             at most {} characters)",
            descriptor::MAX_DISK_ID_LEN
        ))
    })?;
    Ok(lineage)
}

/// The worker's step executor and inventory for one node. Cheap to share by reference between
/// threads; it holds configuration only.
#[derive(Debug, Clone)]
pub struct Agent {
    config: AgentConfig,
    faults: FaultDelays,
    progress_interval: Duration,
}

impl Agent {
    /// An agent for `config`, with the test fault hook read from [`FAULT_DELAY_ENV`].
    /// Checks the configuration: the key file, when one is given, must be readable and private
    /// to this user (see [`repo::config::read_key_file`]), so a worker with an exposed key
    /// refuses to start rather than failing every step.
    ///
    /// The node's settings are validated, and every registered repository is checked: one
    /// that does not exist yet is initialised (encrypted with the node's key when its
    /// registration requires it), and one registered `required` whose config says plain is
    /// refused, naming it.
    pub fn new(config: AgentConfig) -> Result<Agent, Error> {
        config.settings.validate()?;
        // A key file that exists is checked before anything is made; a missing one is
        // generated by the first encrypted repository initialised here.
        if let Some(key_file) = config
            .key_file
            .as_deref()
            .filter(|k| k.symlink_metadata().is_ok())
        {
            repo::config::read_key_file(key_file).map_err(Error::KeyFile)?;
        }
        for (name, registered) in &config.settings.repositories {
            prepare_repository(name, registered, config.key_file.as_deref())?;
        }
        if let Some(key_file) = &config.key_file {
            repo::config::read_key_file(key_file).map_err(Error::KeyFile)?;
        }
        let faults = FaultDelays::from_env()?;
        if faults != FaultDelays::default() {
            tracing::warn!(
                hook = FAULT_DELAY_ENV,
                ?faults,
                "test fault hook active: steps are delayed"
            );
        }
        Ok(Agent {
            config,
            faults,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
        })
    }

    /// The node this agent works for.
    pub fn node(&self) -> &NodeId {
        &self.config.node
    }

    /// Replaces the fault delays (tests that cannot set the environment).
    pub fn with_fault_delays(mut self, faults: FaultDelays) -> Agent {
        self.faults = faults;
        self
    }

    /// Replaces the heartbeat interval (tests; the default suits the orchestrator).
    pub fn with_progress_interval(mut self, interval: Duration) -> Agent {
        self.progress_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The agent's configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The node's VMs, from its descriptor folder; bad descriptors are listed as problems.
    ///
    /// A VM with a disk outside the node's image roots (or a block device the node does not
    /// allow) is left out, with the reason among the problems.
    pub fn inventory(&self) -> Inventory {
        let settings = &self.config.settings;
        descriptor::scan_allowed(&self.config.vms_dir, &|disk| {
            settings.image_disk_allowed(disk)
        })
    }

    /// Runs one step attempt. Reports `Started` first and `Progress` heartbeats while the step
    /// runs through `report`, and returns the final body (`Succeeded` or `Failed`), which the
    /// caller sends. Setting `cancel` stops the step soon after.
    pub fn execute(
        &self,
        spec: &StepSpec,
        report: &mut dyn FnMut(ReportBody),
        cancel: &AtomicBool,
    ) -> ReportBody {
        let span = tracing::info_span!("step", step = %spec.step, attempt = spec.attempt,
            job = %spec.job, vm = %spec.vm, kind = ?spec.kind());
        report(ReportBody::Started);
        let started = Instant::now();
        let initial_total = match &spec.work {
            StepWork::Transfer { source, .. } => source.size_bytes,
            _ => 0,
        };
        let progress = StepProgress::new(cancel, initial_total);
        let (done_tx, done_rx) = bounded::<()>(1);
        let outcome = std::thread::scope(|scope| {
            let progress = &progress;
            let step_span = span.clone();
            let runner = std::thread::Builder::new()
                .name("cairn-step".into())
                .spawn_scoped(scope, move || {
                    let _entered = step_span.enter();
                    let result = self.run(spec, progress);
                    // The receiver may be gone only if the executing thread panicked.
                    let _ = done_tx.send(());
                    result
                });
            let runner = match runner {
                Ok(runner) => runner,
                Err(err) => return Err(Error::Thread(err)),
            };
            let mut heartbeat = Heartbeat::new(Instant::now(), STALL_LIMIT);
            loop {
                match done_rx.recv_timeout(self.progress_interval) {
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                    Err(RecvTimeoutError::Timeout) => {
                        let (bytes_done, bytes_total) = progress.counts();
                        if heartbeat.due(Instant::now(), bytes_done) {
                            report(ReportBody::Progress {
                                bytes_done,
                                bytes_total,
                            });
                        }
                    }
                }
            }
            runner
                .join()
                .unwrap_or_else(|panic| Err(Error::Panicked(panic_message(&*panic))))
        });
        let _entered = span.enter();
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match outcome {
            Ok(result) => {
                tracing::info!(elapsed_ms, "step succeeded");
                ReportBody::Succeeded { result }
            }
            Err(err) => {
                let class = err.class();
                tracing::warn!(elapsed_ms, ?class, error = %err, "step failed");
                ReportBody::Failed {
                    class,
                    message: err.to_string(),
                }
            }
        }
    }

    /// The step's work, on the step thread.
    fn run(&self, spec: &StepSpec, progress: &StepProgress<'_>) -> Result<StepResult, Error> {
        if spec.node != self.config.node {
            return Err(Error::WrongNode {
                wanted: spec.node.clone(),
                this: self.config.node.clone(),
            });
        }
        if let Some(delay) = self.faults.delay_for(&spec.work) {
            tracing::warn!(
                delay_ms = delay.as_millis() as u64,
                "test fault hook: delaying the step"
            );
            wait_unless_cancelled(delay, progress)?;
        }
        if progress.is_cancelled() {
            return Err(Error::Cancelled);
        }
        match &spec.work {
            StepWork::Snapshot {
                vm_name,
                disks,
                consistency,
            } => {
                let descriptor = self.described_vm(spec.vm)?;
                if descriptor.qemu.is_some() {
                    qemu::snapshot(self, spec, &descriptor, disks, *consistency)
                } else {
                    image::snapshot(self, spec, vm_name, disks)
                }
            }
            StepWork::Transfer {
                source,
                snapshot,
                repository,
                rp,
                parent_rp,
                change_tracking,
                chunk_size,
            } => {
                let work = image::TransferWork {
                    source,
                    snapshot,
                    repository,
                    rp: *rp,
                    parent_rp: *parent_rp,
                    chunk_size: *chunk_size,
                };
                if is_live_handle(snapshot) {
                    qemu::transfer(self, spec, &work, change_tracking.as_deref(), progress)
                } else {
                    image::transfer(self, spec, &work, progress)
                }
            }
            // Image VMs have no snapshot view to drop; this must succeed even if the snapshot
            // step never ran (an empty handle).
            StepWork::ReleaseSnapshot { snapshot } if is_live_handle(snapshot) => {
                qemu::release(self, spec, snapshot)
            }
            StepWork::ReleaseSnapshot { .. } => Ok(StepResult::ReleaseSnapshot),
            StepWork::CommitRecoveryPoint {
                repository,
                rp,
                disks,
                ..
            } => image::commit(self, spec, repository, *rp, disks),
            StepWork::Restore {
                disk,
                repository,
                rp,
                target_path,
                target_format,
            } => image::restore(
                self,
                spec,
                &image::RestoreWork {
                    disk,
                    repository,
                    rp: *rp,
                    target_path,
                    target_format: *target_format,
                    overwrite: false,
                    throttle: None,
                    timezone: None,
                },
                progress,
            ),
            StepWork::VerifyDisk { repository, disk } => {
                upkeep::verify_disk(self, spec, repository, disk, progress)
            }
            StepWork::CheckDisk {
                source,
                snapshot,
                repository,
                rp,
                parent_rp,
                chunk_size,
            } => upkeep::check_disk(
                self,
                spec,
                &upkeep::CheckWork {
                    source,
                    snapshot,
                    repository,
                    rp: *rp,
                    parent_rp: *parent_rp,
                    chunk_size: *chunk_size,
                },
                progress,
            ),
            StepWork::Prune {
                repository,
                disk,
                remove,
            } => upkeep::prune(self, spec, repository, disk, remove),
            StepWork::CollectGarbage { repository } => upkeep::collect_garbage(self, repository),
            StepWork::ImportSeed {
                disk,
                seed,
                repository,
                rp,
            } => upkeep::import_seed(
                self,
                spec,
                &upkeep::SeedWork {
                    disk,
                    seed,
                    repository,
                    rp: *rp,
                },
                progress,
            ),
            StepWork::RestoreDisk {
                disk,
                repository,
                rp,
                target_path,
                target_format,
                overwrite,
                throttle,
            } => image::restore(
                self,
                spec,
                &image::RestoreWork {
                    disk,
                    repository,
                    rp: *rp,
                    target_path,
                    target_format: *target_format,
                    overwrite: *overwrite,
                    throttle: throttle.as_ref(),
                    timezone: None,
                },
                progress,
            ),
            StepWork::RestoreDiskInZone {
                disk,
                repository,
                rp,
                target_path,
                target_format,
                overwrite,
                throttle,
                timezone,
            } => image::restore(
                self,
                spec,
                &image::RestoreWork {
                    disk,
                    repository,
                    rp: *rp,
                    target_path,
                    target_format: *target_format,
                    overwrite: *overwrite,
                    throttle: throttle.as_ref(),
                    timezone: Some(timezone),
                },
                progress,
            ),
            StepWork::PrepareRecovery {
                target,
                vm_name,
                disks,
            } => recovery::prepare(self, spec, target, vm_name, disks),
            StepWork::FinishRecovery {
                target,
                rp,
                taken_at,
                source_name,
                vm,
                vm_name,
                disks,
            } => recovery::finish(
                self,
                spec,
                &recovery::Finish {
                    target,
                    rp: *rp,
                    taken_at: *taken_at,
                    source_name,
                    vm: *vm,
                    vm_name,
                    disks,
                },
            ),
            StepWork::ExtractItems {
                disk,
                repository,
                rp,
                items: paths,
                target_path,
            } => items::extract(
                self,
                spec,
                &items::ExtractWork {
                    disk,
                    repository,
                    rp: *rp,
                    items: paths,
                    target_path,
                },
                progress,
            ),
        }
    }

    /// The descriptor of `vm` on this node (disks not opened).
    /// A VM with a disk outside the node's image roots is refused, with the reason.
    pub(crate) fn described_vm(&self, vm: VmId) -> Result<Descriptor, Error> {
        let (descriptors, _) = descriptor::read_all(&self.config.vms_dir);
        let descriptor = descriptors
            .into_iter()
            .map(|(_, d)| d)
            .find(|d| d.vm_id() == vm)
            .ok_or_else(|| Error::UnknownVm {
                vm,
                node: self.config.node.clone(),
                dir: self.config.vms_dir.clone(),
            })?;
        let settings = &self.config.settings;
        if let Some(refusal) =
            descriptor::refused_disk(&descriptor, &|disk| settings.image_disk_allowed(disk))
        {
            return Err(Error::InvalidStep(refusal));
        }
        Ok(descriptor)
    }

    /// Refuses a restore target that is a disk of another VM described on this node, or a disk
    /// of the step's own VM while that VM runs.
    pub(crate) fn refuse_described_disk(&self, vm: VmId, target: &Path) -> Result<(), Error> {
        let (descriptors, _) = descriptor::read_all(&self.config.vms_dir);
        for (_, owner) in &descriptors {
            let Some(disk) = owner.disks.iter().find(|d| same_file(&d.path, target)) else {
                continue;
            };
            let reason = if owner.vm_id() != vm {
                "refusing to overwrite another VM's disk"
            } else if owner.power == PowerState::Running {
                "the VM is running; stop it before restoring over its disks"
            } else {
                continue;
            };
            return Err(Error::Target {
                path: target.to_path_buf(),
                reason: format!(
                    "is disk {} of VM {} ({}); {reason}",
                    disk.id,
                    owner.name,
                    owner.vm_id()
                ),
            });
        }
        Ok(())
    }
}

/// Makes sure a registered repository exists and is what its registration says: one that is
/// missing (no folder, or an empty one) is initialised, encrypted with `key_file` when
/// encryption is required; an existing one registered `required` must be encrypted.
fn prepare_repository(
    name: &str,
    registered: &boundary::RegisteredRepository,
    key_file: Option<&Path>,
) -> Result<(), Error> {
    let refuse = |reason: String| Error::Registered {
        name: name.to_owned(),
        path: registered.path.clone(),
        reason,
    };
    let config_file = registered.path.join(repo::config::CONFIG_FILE);
    if config_file.exists() {
        return check_encryption(name, registered);
    }
    let key = match registered.encryption {
        Encryption::Required => Some(key_file.ok_or_else(|| {
            refuse(
                "does not exist and must be encrypted, but this worker has no key file \
                 (give one, or register it with encryption = \"none\")"
                    .into(),
            )
        })?),
        Encryption::None => None,
    };
    repo::Repository::init(
        &registered.path,
        u64::from(repo::config::DEFAULT_CHUNK_SIZE),
        key,
    )
    .map_err(|e| refuse(format!("cannot initialise it: {e}")))?;
    tracing::info!(repository = name, path = %registered.path.display(),
        encrypted = key.is_some(), "initialised a registered repository");
    Ok(())
}

/// Refuses a repository registered `required` whose config says it is plain.
fn check_encryption(name: &str, registered: &boundary::RegisteredRepository) -> Result<(), Error> {
    if registered.encryption != Encryption::Required {
        return Ok(());
    }
    let config = repo::config::load(&registered.path).map_err(|source| Error::Repo {
        repository: name.to_owned(),
        source,
    })?;
    if config.encryption.is_none() {
        return Err(Error::Registered {
            name: name.to_owned(),
            path: registered.path.clone(),
            reason: "is registered with encryption = \"required\" but its config says it is \
                     not encrypted; refusing to use it"
                .into(),
        });
    }
    Ok(())
}

/// Whether a snapshot handle was made by the `qemu` adapter.
fn is_live_handle(handle: &str) -> bool {
    handle
        .strip_prefix(qemu::HANDLE_PREFIX)
        .is_some_and(|rest| rest.starts_with(';'))
}

/// Whether two paths name the same file: the same inode when both exist, else the same path.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(ma), Ok(mb)) => ma.dev() == mb.dev() && ma.ino() == mb.ino(),
        _ => a == b,
    }
}

/// Waits `delay` (the fault hook), returning early with `Cancelled` when the flag is set.
fn wait_unless_cancelled(delay: Duration, progress: &StepProgress<'_>) -> Result<(), Error> {
    let until = Instant::now() + delay;
    loop {
        if progress.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        std::thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}
