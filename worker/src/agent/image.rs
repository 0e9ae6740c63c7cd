//! The `image` hypervisor adapter: VMs described by descriptor files ([`super::descriptor`])
//! whose disks are image files that no running guest writes.
//!
//! - Snapshot: there is nothing to freeze. The step checks each disk (described on this node,
//!   readable, of the size the step expects) and records its *identity* (file size, mtime in
//!   nanoseconds, inode) in the snapshot handle. Reported consistency is
//!   [`Consistency::Crash`]: the adapter cannot know whether the guest shut down cleanly.
//! - Transfer: refuses (retryably) a disk whose identity differs from the handle's, then backs
//!   the disk up into its lineage `<vm id>.<disk id>` as recovery point `rp`; a retried transfer
//!   finds the recovery point its earlier attempt made and reports it again.
//! - ReleaseSnapshot: nothing to release.
//! - CommitRecoveryPoint: checks that every disk's lineage holds recovery point `rp`.
//! - Restore: creates the target and restores onto it, or continues with a delta restore when
//!   the target exists with the right size (an earlier attempt died midway, or the recovery
//!   overwrites the original VM's disk).
//!
//! Must not: read an image that is not a described disk of the step's VM on this node, overwrite
//! a disk of another described VM (or of the step's VM while it runs), or write over a file of
//! a size other than the recovery point's.
//!
//! Limitation: the identity is checked before the read. A disk written while it is being read
//! (the descriptor lied about the VM being stopped) yields a recovery point with a torn image;
//! the change is logged when the read ends. The live `qemu` adapter is the one for running VMs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cairn_schemas::ids::{DiskId, RecoveryPointId, VmId};
use cairn_schemas::v1::{Consistency, ImageFormat, PowerState, Throttle};
use cairn_schemas::v1::{DiskSource, StepResult, StepSpec};

use super::descriptor::{Descriptor, DescriptorDisk, to_source_format};
use super::progress::StepProgress;
use super::{Agent, Error, lineage_id};
use crate::repo::index::{IndexFile, IndexHeader};
use crate::repo::restore::RestoreOptions;
use crate::repo::{self, BackupOptions, Repository};
use crate::source;
use crate::source::throttle::{ThrottledSink, WallClock, WorkSchedule};

/// Prefix (and version) of the snapshot handles this adapter makes.
const HANDLE_PREFIX: &str = "image1";
/// Longest snapshot handle accepted.
const MAX_HANDLE_LEN: usize = 8 * 1024;

/// What identifies one version of an image file: a rewrite changes its mtime (or its inode, when
/// replaced by rename), a resize its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileIdentity {
    pub(crate) len: u64,
    pub(crate) mtime_ns: i128,
    pub(crate) ino: u64,
}

impl FileIdentity {
    pub(crate) fn of(path: &Path) -> std::io::Result<FileIdentity> {
        let meta = std::fs::metadata(path)?;
        Ok(FileIdentity {
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ino: meta.ino(),
        })
    }

    /// What differs from `then`, in words.
    fn differences(&self, then: &FileIdentity) -> String {
        let mut what = Vec::new();
        if self.len != then.len {
            what.push(format!("size {} → {}", then.len, self.len));
        }
        if self.mtime_ns != then.mtime_ns {
            what.push(format!("mtime {} ns → {} ns", then.mtime_ns, self.mtime_ns));
        }
        if self.ino != then.ino {
            what.push(format!("inode {} → {}", then.ino, self.ino));
        }
        what.join(", ")
    }
}

/// The snapshot handle: `image1;vm=<vm id>;<disk>=<len>,<mtime_ns>,<inode>;…`. Opaque to the
/// orchestrator, which hands it back to the transfer and release steps; parsed strictly here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotHandle {
    pub(crate) vm: VmId,
    pub(crate) disks: Vec<(DiskId, FileIdentity)>,
}

impl SnapshotHandle {
    pub(crate) fn encode(&self) -> String {
        let mut out = format!("{HANDLE_PREFIX};vm={}", self.vm);
        for (disk, id) in &self.disks {
            out.push_str(&format!(";{disk}={},{},{}", id.len, id.mtime_ns, id.ino));
        }
        out
    }

    pub(crate) fn parse(handle: &str) -> Result<SnapshotHandle, Error> {
        let bad = |reason: String| Error::BadSnapshotHandle {
            handle: handle.chars().take(200).collect(),
            reason,
        };
        if handle.len() > MAX_HANDLE_LEN {
            return Err(bad(format!("longer than {MAX_HANDLE_LEN} bytes")));
        }
        let mut parts = handle.split(';');
        if parts.next() != Some(HANDLE_PREFIX) {
            return Err(bad(format!(
                "not made by the image adapter (no {HANDLE_PREFIX:?} prefix)"
            )));
        }
        let vm = parts
            .next()
            .and_then(|p| p.strip_prefix("vm="))
            .ok_or_else(|| bad("no vm= part".into()))?
            .parse::<VmId>()
            .map_err(|e| bad(e.to_string()))?;
        let mut disks: Vec<(DiskId, FileIdentity)> = Vec::new();
        for part in parts {
            let (disk, fields) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("disk part {part:?} has no '='")))?;
            let disk = DiskId::new(disk).map_err(|e| bad(e.to_string()))?;
            let numbers: Vec<&str> = fields.split(',').collect();
            let [len, mtime_ns, ino] = numbers.as_slice() else {
                return Err(bad(format!("disk part {part:?} does not hold 3 numbers")));
            };
            let number =
                |text: &str| bad(format!("{text:?} in disk part {part:?} is not a number"));
            let identity = FileIdentity {
                len: len.parse().map_err(|_| number(len))?,
                mtime_ns: mtime_ns.parse().map_err(|_| number(mtime_ns))?,
                ino: ino.parse().map_err(|_| number(ino))?,
            };
            if disks.iter().any(|(d, _)| *d == disk) {
                return Err(bad(format!("disk {disk} appears twice")));
            }
            disks.push((disk, identity));
        }
        if disks.is_empty() {
            return Err(bad("no disks".into()));
        }
        Ok(SnapshotHandle { vm, disks })
    }
}

/// Opens the registered repository a step names (by name, or by a registered repository's
/// folder), refusing an unregistered one and one registered `required` whose config says
/// plain, before anything is read or written.
pub(crate) fn open_repository(agent: &Agent, location: &str) -> Result<Repository, Error> {
    let (name, registered) = agent.config.settings.repository(location)?;
    super::check_encryption(name, registered)?;
    Repository::open(&registered.path, agent.config.key_file.as_deref()).map_err(|source| {
        Error::Repo {
            repository: location.to_owned(),
            source,
        }
    })
}

/// The index of recovery point `rp` in `lineage`, if it is committed. Opens that one index only
/// (and checks it), not the lineage's whole catalog.
pub(crate) fn committed(
    repo: &Repository,
    location: &str,
    lineage: &str,
    rp: RecoveryPointId,
) -> Result<Option<IndexHeader>, Error> {
    let path = repo.rps_dir(lineage).join(format!("{rp}.rpi"));
    if !path.exists() {
        return Ok(None);
    }
    let index = IndexFile::open(&path, &repo.keys).map_err(|source| Error::Repo {
        repository: location.to_owned(),
        source,
    })?;
    if index.header.rp != rp.to_string() || index.header.disk != lineage {
        return Err(Error::Repo {
            repository: location.to_owned(),
            source: repo::Error::CorruptIndex {
                path,
                reason: format!(
                    "holds recovery point {} of {} instead",
                    index.header.rp, index.header.disk
                ),
            },
        });
    }
    Ok(Some(index.header))
}

/// The described disk a step reads, after checking that its path and format match the VM's
/// descriptor on this node.
fn described_disk<'d>(
    agent: &Agent,
    descriptor: &'d Descriptor,
    source: &DiskSource,
) -> Result<&'d DescriptorDisk, Error> {
    let disk = descriptor
        .disks
        .iter()
        .find(|d| d.id == source.disk && d.path == Path::new(&source.image_path))
        .ok_or_else(|| Error::UnknownDisk {
            vm: descriptor.vm_id(),
            disk: source.disk.clone(),
            path: source.image_path.clone(),
            node: agent.config.node.clone(),
        })?;
    if let Some(format) = disk.format
        && format != source.format
    {
        return Err(Error::InvalidStep(format!(
            "disk {} of VM {} is {format:?} by its descriptor, the step says {:?}",
            source.disk, descriptor.name, source.format
        )));
    }
    Ok(disk)
}

fn identity_of(disk: &DiskId, path: &Path) -> Result<FileIdentity, Error> {
    FileIdentity::of(path).map_err(|e| Error::Source {
        disk: disk.to_string(),
        source: source::Error::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })
}

pub(crate) fn open_image(source: &DiskSource) -> Result<Box<dyn source::Source>, Error> {
    source::open_source(
        Path::new(&source.image_path),
        Some(to_source_format(source.format)),
    )
    .map_err(|e| Error::Source {
        disk: source.disk.to_string(),
        source: e,
    })
}

fn check_size(source: &DiskSource, actual: u64) -> Result<(), Error> {
    if actual == source.size_bytes {
        Ok(())
    } else {
        Err(Error::SizeMismatch {
            disk: source.disk.clone(),
            path: source.image_path.clone(),
            actual,
            expected: source.size_bytes,
        })
    }
}

pub(crate) fn snapshot(
    agent: &Agent,
    spec: &StepSpec,
    vm_name: &str,
    disks: &[DiskSource],
) -> Result<StepResult, Error> {
    if disks.is_empty() {
        return Err(Error::InvalidStep("a snapshot of no disks".into()));
    }
    let descriptor = agent.described_vm(spec.vm)?;
    if descriptor.name != vm_name {
        tracing::warn!(vm = %spec.vm, step_name = vm_name, described_name = %descriptor.name,
            "the VM's name differs from its descriptor's; the descriptor's uuid is what counts");
    }
    if descriptor.power == PowerState::Running {
        return Err(Error::InvalidStep(format!(
            "VM {} is running; the image adapter backs up only stopped VMs",
            descriptor.name
        )));
    }
    let mut handle = SnapshotHandle {
        vm: spec.vm,
        disks: Vec::with_capacity(disks.len()),
    };
    for source in disks {
        let disk = described_disk(agent, &descriptor, source)?;
        if handle.disks.iter().any(|(d, _)| *d == source.disk) {
            return Err(Error::InvalidStep(format!(
                "disk {} is listed twice",
                source.disk
            )));
        }
        let image = open_image(source)?;
        let size = image.size();
        drop(image);
        check_size(source, size)?;
        handle
            .disks
            .push((source.disk.clone(), identity_of(&disk.id, &disk.path)?));
    }
    Ok(StepResult::Snapshot {
        snapshot: handle.encode(),
        consistency: Consistency::Crash,
        tracking: Vec::new(),
    })
}

/// What a transfer step needs besides the spec.
pub(crate) struct TransferWork<'a> {
    pub(crate) source: &'a DiskSource,
    pub(crate) snapshot: &'a str,
    pub(crate) repository: &'a str,
    pub(crate) rp: RecoveryPointId,
    pub(crate) parent_rp: Option<RecoveryPointId>,
    pub(crate) chunk_size: u32,
}

/// What a transfer did, in the detail a consistency check reports.
pub(crate) struct TransferOutcome {
    pub(crate) bytes_read: u64,
    pub(crate) bytes_stored: u64,
    pub(crate) incremental: bool,
    pub(crate) chunks_total: u64,
    /// Chunks stored because their id differed from the parent's at that position (or were
    /// damaged there), including ones an interrupted attempt had stored already.
    pub(crate) chunks_differing: u64,
}

pub(crate) fn transfer(
    agent: &Agent,
    spec: &StepSpec,
    work: &TransferWork<'_>,
    progress: &StepProgress<'_>,
) -> Result<StepResult, Error> {
    let outcome = transfer_outcome(agent, spec, work, progress)?;
    Ok(StepResult::Transfer {
        disk: work.source.disk.clone(),
        bytes_read: outcome.bytes_read,
        bytes_stored: outcome.bytes_stored,
        incremental: outcome.incremental,
    })
}

/// A transfer: the snapshot's disk read whole, only chunks that differ from the parent
/// recovery point stored, as recovery point `work.rp`.
pub(crate) fn transfer_outcome(
    agent: &Agent,
    spec: &StepSpec,
    work: &TransferWork<'_>,
    progress: &StepProgress<'_>,
) -> Result<TransferOutcome, Error> {
    let source = work.source;
    let handle = SnapshotHandle::parse(work.snapshot)?;
    if handle.vm != spec.vm {
        return Err(Error::BadSnapshotHandle {
            handle: work.snapshot.into(),
            reason: format!(
                "it is a snapshot of VM {}, not of VM {}",
                handle.vm, spec.vm
            ),
        });
    }
    let then = handle
        .disks
        .iter()
        .find(|(d, _)| *d == source.disk)
        .map(|(_, id)| *id)
        .ok_or_else(|| Error::BadSnapshotHandle {
            handle: work.snapshot.into(),
            reason: format!("the snapshot does not include disk {}", source.disk),
        })?;
    let lineage = lineage_id(spec.vm, &source.disk)?;
    let repo = open_repository(agent, work.repository)?;
    if work.chunk_size != repo.config.chunk_size {
        tracing::warn!(
            step_chunk_size = work.chunk_size,
            repo_chunk_size = repo.config.chunk_size,
            "the repository's chunk size is fixed at init and wins over the step's"
        );
    }
    // A retried attempt whose predecessor committed the recovery point reports it again, even
    // if the image has changed since (e.g. the VM was started after the backup).
    if let Some(done) = committed(&repo, work.repository, &lineage, work.rp)? {
        tracing::info!(rp = %work.rp, lineage, "recovery point already committed by an earlier attempt");
        return Ok(TransferOutcome {
            bytes_read: done.bytes_read,
            bytes_stored: done.bytes_stored,
            incremental: done.parent.is_some(),
            chunks_total: done.n_chunks(),
            chunks_differing: done.chunks_stored,
        });
    }
    let descriptor = agent.described_vm(spec.vm)?;
    let disk = described_disk(agent, &descriptor, source)?;
    let now = identity_of(&disk.id, &disk.path)?;
    if now != then {
        return Err(Error::ChangedSinceSnapshot {
            disk: source.disk.clone(),
            path: source.image_path.clone(),
            what: now.differences(&then),
        });
    }
    let mut image = open_image(source)?;
    check_size(source, image.size())?;
    let options = BackupOptions {
        disk: lineage.clone(),
        // The recovery point's time is the one its id carries: every attempt agrees on it.
        now_ms: work.rp.unix_millis(),
        threads: agent.config.threads,
        rp: Some(work.rp.to_string()),
        unchanged_since: None,
    };
    let summary =
        repo::backup(&repo, image.as_mut(), &options, progress).map_err(|source| Error::Repo {
            repository: work.repository.to_owned(),
            source,
        })?;
    drop(image);
    match FileIdentity::of(&disk.path) {
        Ok(after) if after == then => {
            // Read unchanged: the disk holds this recovery point, until it is written again.
            repo::stamp::write_if_unchanged(&disk.path, &lineage, &summary.rp, then.mtime_ns);
        }
        Ok(after) => tracing::error!(
            disk = %source.disk, path = %source.image_path, changes = after.differences(&then),
            "the image changed while it was being read; recovery point {} may hold a torn image",
            summary.rp
        ),
        Err(err) => tracing::error!(disk = %source.disk, path = %source.image_path, error = %err,
            "the image vanished while it was being read"),
    }
    let expected_parent = work.parent_rp.map(|p| p.to_string());
    if summary.parent.is_some() && summary.parent != expected_parent {
        tracing::info!(
            lineage, parent = ?summary.parent, step_parent = ?expected_parent,
            "the lineage's latest recovery point served as parent"
        );
    }
    Ok(TransferOutcome {
        bytes_read: summary.bytes_read,
        bytes_stored: summary.bytes_stored,
        incremental: summary.parent.is_some(),
        chunks_total: summary.chunks_total,
        chunks_differing: summary.chunks_new + summary.chunks_reused,
    })
}

pub(crate) fn commit(
    agent: &Agent,
    spec: &StepSpec,
    repository: &str,
    rp: RecoveryPointId,
    disks: &[DiskId],
) -> Result<StepResult, Error> {
    if disks.is_empty() {
        return Err(Error::InvalidStep(
            "a recovery point of no disks cannot be committed".into(),
        ));
    }
    let repo = open_repository(agent, repository)?;
    for disk in disks {
        let lineage = lineage_id(spec.vm, disk)?;
        if committed(&repo, repository, &lineage, rp)?.is_none() {
            return Err(Error::MissingDisk {
                rp,
                disk: disk.clone(),
                lineage,
                repository: repository.to_owned(),
            });
        }
    }
    Ok(StepResult::CommitRecoveryPoint)
}

/// What a restore step needs besides the spec.
pub(crate) struct RestoreWork<'a> {
    pub(crate) disk: &'a DiskId,
    pub(crate) repository: &'a str,
    pub(crate) rp: RecoveryPointId,
    pub(crate) target_path: &'a str,
    pub(crate) target_format: ImageFormat,
    /// The target is the original VM's disk: it must exist, the VM must be stopped, and it is
    /// overwritten by a delta restore.
    pub(crate) overwrite: bool,
    /// Bandwidth limit of the writes.
    pub(crate) throttle: Option<&'a Throttle>,
    /// The named zone of the throttle's work hours (`RestoreDiskInZone`); `None` = the
    /// throttle's fixed offset.
    pub(crate) timezone: Option<&'a str>,
}

pub(crate) fn restore(
    agent: &Agent,
    spec: &StepSpec,
    work: &RestoreWork<'_>,
    progress: &StepProgress<'_>,
) -> Result<StepResult, Error> {
    let target = PathBuf::from(work.target_path);
    let target_error = |reason: String| Error::Target {
        path: target.clone(),
        reason,
    };
    if !target.is_absolute() {
        return Err(target_error("not an absolute path".into()));
    }
    if !work.overwrite {
        // A new image goes below a recovery root, refused before anything is opened.
        super::recovery::check_image_target(agent, &target)?;
    }
    let lineage = lineage_id(spec.vm, work.disk)?;
    let repo = open_repository(agent, work.repository)?;
    let repo_error = |source| Error::Repo {
        repository: work.repository.to_owned(),
        source,
    };
    let rp = work.rp.to_string();
    let header = repo::restore::resolve(&repo, &lineage, Some(&rp)).map_err(repo_error)?;
    progress.start_total(header.disk_size);
    if work.overwrite {
        super::recovery::check_original_disk(agent, spec.vm, work.disk, &target)?;
    } else {
        agent.refuse_described_disk(spec.vm, &target)?;
    }
    let format = to_source_format(work.target_format);
    let sink_error = |source| Error::Source {
        disk: work.disk.to_string(),
        source,
    };
    // The target's descriptor, kept for the whole step: every later access (format, write,
    // content stamp) goes through it, so nothing renamed or linked in after the checks can
    // redirect the write.
    let (target_file, existing, parent) = if work.overwrite {
        // The original VM's own disk, where its descriptor (checked above) says it is.
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(target_error(
                    "the original VM's disk image is missing; recover to another host instead"
                        .into(),
                ));
            }
            Err(e) => {
                return Err(sink_error(source::Error::Io {
                    path: target,
                    source: e,
                }));
            }
        };
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(target_error(
                "is a folder; a restore needs the path of an image file".into(),
            ));
        }
        (file, true, None)
    } else {
        let (parent, name) = super::recovery::target_parent(agent, &target, true)?;
        let (file, existing) = super::recovery::open_or_create_target(&parent, &name, &target)?;
        (file, existing, Some(parent))
    };
    let stamp_path = crate::safefs::proc_path(&target_file);
    let created = !existing;
    let opened = if existing {
        source::open_sink_on(&target_file, &target, format)
    } else {
        source::create_sink_on(&target_file, &target, format, header.disk_size)
    };
    let (mut sink, delta) = match opened {
        Ok(sink) => (sink, existing),
        Err(e) => {
            if created && let Some(parent) = &parent {
                // Our own new, empty file: nothing of anyone else's is removed.
                let _ = parent.remove_file(Path::new(target.file_name().unwrap_or_default()));
            }
            return Err(sink_error(e));
        }
    };
    if sink.size() != header.disk_size {
        return Err(target_error(format!(
            "exists with size {} bytes, the recovery point's disk has {} bytes; refusing to \
             overwrite it",
            sink.size(),
            header.disk_size
        )));
    }
    if delta {
        tracing::info!(target = %target.display(), "target exists with the right size; continuing with a delta restore");
    }
    // A target whose content stamp is still valid (restored or backed up by cairn, not written
    // since) is not read: only the chunks that differ between the two recovery points are.
    let known = if delta {
        repo::stamp::current(&stamp_path, &lineage)
    } else {
        None
    };
    if let Some(known) = &known {
        tracing::info!(target = %target.display(), known, "target holds a known recovery point");
    }
    repo::stamp::clear(&stamp_path);
    let options = RestoreOptions {
        disk: lineage.clone(),
        rp: Some(rp),
        delta,
        threads: agent.config.threads,
        known,
    };
    let summary = match work.throttle {
        None => {
            let summary = repo::restore(&repo, &options, sink.as_mut(), progress);
            drop(sink);
            summary
        }
        Some(schedule) => {
            let cancelled = || progress.is_cancelled();
            let schedule = match work.timezone {
                Some(zone) => WorkSchedule::in_zone(schedule.clone(), zone),
                None => WorkSchedule::fixed(schedule.clone()),
            };
            let mut throttled = ThrottledSink::new(sink, schedule, &WallClock, &cancelled);
            let summary = repo::restore(&repo, &options, &mut throttled, progress);
            tracing::info!(waited_ms = throttled.waited_ms, "throttled restore");
            summary
        }
    }
    .map_err(repo_error)?;
    // The sink is closed (its qemu-nbd gone) and the content durable: stamp it.
    repo::stamp::write(&stamp_path, &lineage, &summary.rp);
    drop(target_file);
    drop(parent);
    Ok(StepResult::Restore {
        disk: work.disk.clone(),
        bytes_written: summary.bytes_written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> VmId {
        VmId::new_v7(1_700_000_000_000, [3; 10])
    }

    #[test]
    fn handles_round_trip() {
        let handle = SnapshotHandle {
            vm: vm(),
            disks: vec![
                (
                    DiskId::new("disk0").unwrap(),
                    FileIdentity {
                        len: 1 << 30,
                        mtime_ns: -5,
                        ino: 42,
                    },
                ),
                (
                    DiskId::new("scsi0-0-0.x_y").unwrap(),
                    FileIdentity {
                        len: 0,
                        mtime_ns: 1_700_000_000_123_456_789,
                        ino: u64::MAX,
                    },
                ),
            ],
        };
        let text = handle.encode();
        assert!(text.starts_with("image1;vm="), "{text}");
        assert_eq!(SnapshotHandle::parse(&text).unwrap(), handle);
    }

    #[test]
    fn bad_handles_are_refused() {
        let vm = vm();
        for (handle, wanted) in [
            (String::new(), "not made by the image adapter"),
            ("qemu1;vm=x".into(), "not made by the image adapter"),
            ("image1".into(), "no vm= part"),
            ("image1;vm=nope;d=1,2,3".into(), "not a UUID"),
            (format!("image1;vm={vm}"), "no disks"),
            (format!("image1;vm={vm};d=1,2"), "does not hold 3 numbers"),
            (format!("image1;vm={vm};d=1,x,3"), "\"x\" in disk part"),
            (format!("image1;vm={vm};../d=1,2,3"), "DiskId"),
            (format!("image1;vm={vm};d=1,2,3;d=1,2,3"), "appears twice"),
            (format!("image1;vm={vm};d"), "has no '='"),
            ("image1;".repeat(2000), "longer than"),
        ] {
            let err = SnapshotHandle::parse(&handle).unwrap_err().to_string();
            assert!(err.contains(wanted), "{handle:?}: {err}");
        }
    }
}
