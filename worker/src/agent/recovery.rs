//! The worker side of recoveries (besides the restore of each disk, in [`super::image`]):
//!
//! - `PrepareRecovery` checks, before anything is written, that the recovery can go ahead: for
//!   the original VM, that it is described on this node and *stopped* and that every disk the
//!   recovery point holds is one of its disks; for a new VM or a folder, that no target image
//!   exists yet (nothing is ever overwritten there) and that none is another VM's disk. It
//!   creates the target folder.
//! - `FinishRecovery` writes the new VM's descriptor into this node's descriptor folder
//!   (alternate host: the VM then appears in the node's inventory, stopped, in no protection
//!   group) or the folder's manifest `cairn-recovery-<rp>.json` (copy to a folder). Both are
//!   written atomically and durably, and rewriting them on a retry gives the same file.
//!
//! Every folder target, new image and manifest lies below one of the node's recovery roots
//! ([`crate::boundary`]); a target outside them is refused before anything is created, and the
//! folders and files are made through the root's descriptor ([`crate::safefs`]). The file name
//! of a new image (VM name + disk id) must be a plain safe name directly in the target folder.
//!
//! Must not: write over an existing file except the original VM's own disks (and those only
//! while it is stopped), write outside the recovery roots, or describe a VM whose images are
//! missing.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use cairn_schemas::ids::{DiskId, RecoveryPointId, VmId};
use cairn_schemas::v1::{DiskSource, PowerState, RecoveryTarget, StepResult, StepSpec};
use serde::Serialize;

use super::descriptor::{self, Descriptor, DescriptorDisk};
use super::{Agent, Error};
use crate::boundary::{self, BelowRoot, RootKind};
use crate::safefs::{self, Dir, Entry};

fn power_text(power: PowerState) -> String {
    match power {
        PowerState::Running => "running",
        PowerState::Stopped => "stopped",
        PowerState::Paused => "paused",
    }
    .into()
}

/// The original VM's disk `disk` at `target`: described on this node for `vm`, and the VM is
/// stopped.
pub(crate) fn check_original_disk(
    agent: &Agent,
    vm: VmId,
    disk: &DiskId,
    target: &Path,
) -> Result<(), Error> {
    let described = agent.described_vm(vm)?;
    if described.power != PowerState::Stopped {
        return Err(Error::VmNotStopped {
            vm,
            name: described.name.clone(),
            power: power_text(described.power),
            node: agent.config.node.clone(),
        });
    }
    if !described
        .disks
        .iter()
        .any(|d| &d.id == disk && d.path == target)
    {
        return Err(Error::UnknownDisk {
            vm,
            disk: disk.clone(),
            path: target.display().to_string(),
            node: agent.config.node.clone(),
        });
    }
    Ok(())
}

fn target_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Target {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn folder_of(target: &RecoveryTarget) -> Option<&str> {
    match target {
        RecoveryTarget::AlternateHost { path, .. }
        | RecoveryTarget::CopyToFolder { path, .. }
        | RecoveryTarget::ItemLevel { path, .. } => Some(path),
        RecoveryTarget::OriginalVm => None,
    }
}

fn safefs_error(what: impl Into<String>) -> impl FnOnce(safefs::Error) -> Error {
    let what = what.into();
    move |source| Error::SafeFs { what, source }
}

/// Checks, without touching anything, that a new image `target` lies below a recovery root
/// and that its file name (made of a VM name and a disk id) is a plain, safe name.
pub(crate) fn check_image_target(agent: &Agent, target: &Path) -> Result<BelowRoot, Error> {
    let below = agent.config.settings.below(RootKind::Recovery, target)?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if below.rel.as_os_str().is_empty() || !boundary::is_safe_file_name(&name) {
        return Err(target_error(
            target,
            "the image's file name must be made of A-Z, a-z, 0-9, '.', '_' and '-' (rename the \
             VM or the disk), and lie below a recovery root",
        ));
    }
    Ok(below)
}

/// Opens a recovery root, with the error naming it.
fn open_root(root: &Path) -> Result<Dir, Error> {
    Dir::open_root(root).map_err(safefs_error(format!("recovery root {}", root.display())))
}

/// The folder a new image `target` goes into, opened from its recovery root (created, each new
/// folder fsynced into its parent, when `create`), and the image's file name.
pub(crate) fn target_parent(
    agent: &Agent,
    target: &Path,
    create: bool,
) -> Result<(Dir, OsString), Error> {
    let below = check_image_target(agent, target)?;
    let root = open_root(&below.root)?;
    let parent_rel = below.rel.parent().unwrap_or(Path::new(""));
    let what = format!("target folder {}", root.shown_join(parent_rel).display());
    let parent = if create {
        root.create_dirs(parent_rel)
    } else {
        root.open_dir(parent_rel)
    }
    .map_err(safefs_error(what))?;
    let name = below.rel.file_name().expect("checked above").to_os_string();
    Ok((parent, name))
}

/// Opens the image `name` in `parent` for writing, creating it (`O_CREAT|O_EXCL|O_NOFOLLOW`,
/// 0600, the folder fsynced) when it does not exist. Returns whether it existed. A link, a
/// folder or a device at that name is refused.
pub(crate) fn open_or_create_target(
    parent: &Dir,
    name: &OsStr,
    target: &Path,
) -> Result<(std::fs::File, bool), Error> {
    let name = Path::new(name);
    let what = || format!("restore target {}", target.display());
    match parent.entry(name).map_err(safefs_error(what()))? {
        Entry::Missing => {}
        Entry::File => {
            let file = parent.open_file(name, true).map_err(safefs_error(what()))?;
            return Ok((file, true));
        }
        Entry::Dir => {
            return Err(target_error(
                target,
                "is a folder; a restore needs the path of an image file",
            ));
        }
        Entry::Symlink => {
            return Err(target_error(
                target,
                "is a symbolic link; a restore never writes through a link",
            ));
        }
        Entry::Other => {
            return Err(target_error(
                target,
                "is a device, fifo or socket; a restore writes only regular files",
            ));
        }
    }
    match parent.create_new(name, crate::perms::FILE_MODE) {
        Ok(file) => {
            parent.sync().map_err(safefs_error(what()))?;
            Ok((file, false))
        }
        // Another attempt created it between our look and now: continue on it, through no link.
        Err(e) if e.io_kind() == Some(std::io::ErrorKind::AlreadyExists) => {
            let file = parent.open_file(name, true).map_err(safefs_error(what()))?;
            Ok((file, true))
        }
        Err(e) => Err(safefs_error(what())(e)),
    }
}

/// The folder of a folder target (copy, items, new VM), below a recovery root: checked, and
/// opened (created when `create`) from the root's descriptor.
pub(crate) fn target_folder(agent: &Agent, folder: &Path, create: bool) -> Result<Dir, Error> {
    let below = agent.config.settings.below(RootKind::Recovery, folder)?;
    let root = open_root(&below.root)?;
    let what = format!("target folder {}", folder.display());
    if create {
        root.create_dirs(&below.rel)
    } else {
        root.open_dir(&below.rel)
    }
    .map_err(safefs_error(what))
}

pub(crate) fn prepare(
    agent: &Agent,
    spec: &StepSpec,
    target: &RecoveryTarget,
    vm_name: &str,
    disks: &[DiskSource],
) -> Result<StepResult, Error> {
    if disks.is_empty() {
        return Err(Error::InvalidStep("a recovery of no disks".into()));
    }
    // Every check first: nothing is created unless the whole recovery lies inside the roots.
    let folder = folder_of(target).map(Path::new);
    if let Some(folder) = folder {
        if !folder.is_absolute() {
            return Err(target_error(folder, "not an absolute path"));
        }
        agent.config.settings.below(RootKind::Recovery, folder)?;
    }
    for disk in disks {
        let path = PathBuf::from(&disk.image_path);
        if !path.is_absolute() {
            return Err(target_error(&path, "not an absolute path"));
        }
        if !matches!(target, RecoveryTarget::OriginalVm) {
            check_image_target(agent, &path)?;
            if let Some(folder) = folder
                && path.parent() != Some(folder)
            {
                return Err(target_error(
                    &path,
                    format!(
                        "is not directly in the target folder {} (a VM name or disk id with \
                         a '/'?)",
                        folder.display()
                    ),
                ));
            }
        }
    }
    let dir = match folder {
        Some(folder) => Some(target_folder(agent, folder, true)?),
        None => None,
    };
    for disk in disks {
        let path = PathBuf::from(&disk.image_path);
        match target {
            RecoveryTarget::OriginalVm => {
                check_original_disk(agent, spec.vm, &disk.disk, &path)?;
                if !path.exists() {
                    return Err(target_error(
                        &path,
                        "the original VM's disk image is missing; recover to another host instead",
                    ));
                }
            }
            _ => {
                agent.refuse_described_disk(spec.vm, &path)?;
                let dir = dir.as_ref().expect("a folder target has a folder");
                let name = Path::new(path.file_name().unwrap_or_default());
                let entry = dir
                    .entry(name)
                    .map_err(safefs_error(format!("restore target {}", path.display())))?;
                if entry != Entry::Missing {
                    return Err(target_error(
                        &path,
                        "exists; a recovery to another host or a folder never overwrites a file \
                         (choose another folder or remove it)",
                    ));
                }
            }
        }
    }
    tracing::info!(
        vm_name,
        disks = disks.len(),
        ?target,
        "recovery may go ahead"
    );
    Ok(StepResult::PrepareRecovery)
}

/// What a finish step needs besides the spec.
pub(crate) struct Finish<'a> {
    pub(crate) target: &'a RecoveryTarget,
    pub(crate) rp: RecoveryPointId,
    pub(crate) taken_at: u64,
    pub(crate) source_name: &'a str,
    pub(crate) vm: VmId,
    pub(crate) vm_name: &'a str,
    pub(crate) disks: &'a [DiskSource],
}

/// The manifest of a copy to a folder.
#[derive(Debug, Serialize)]
struct Manifest<'a> {
    format: &'static str,
    vm: String,
    vm_name: &'a str,
    rp: String,
    taken_at_ms: u64,
    disks: Vec<ManifestDisk>,
}

#[derive(Debug, Serialize)]
struct ManifestDisk {
    disk: String,
    /// File name inside the folder.
    file: String,
    format: &'static str,
    size_bytes: u64,
}

fn format_name(format: cairn_schemas::v1::ImageFormat) -> &'static str {
    use cairn_schemas::v1::ImageFormat;
    match format {
        ImageFormat::Raw => "raw",
        ImageFormat::Qcow2 => "qcow2",
        ImageFormat::Vhdx => "vhdx",
        ImageFormat::Vhd => "vhd",
    }
}

/// The virtual size of a written image (it must exist).
fn virtual_size(disk: &DiskSource) -> Result<u64, Error> {
    let image = super::image::open_image(disk)?;
    Ok(image.size())
}

pub(crate) fn finish(
    agent: &Agent,
    spec: &StepSpec,
    work: &Finish<'_>,
) -> Result<StepResult, Error> {
    match work.target {
        RecoveryTarget::OriginalVm => {
            for disk in work.disks {
                check_original_disk(agent, spec.vm, &disk.disk, Path::new(&disk.image_path))?;
            }
            Ok(StepResult::FinishRecovery {
                written: String::new(),
            })
        }
        RecoveryTarget::AlternateHost { .. } => {
            for disk in work.disks {
                check_image_target(agent, Path::new(&disk.image_path))?;
                virtual_size(disk)?;
            }
            let descriptor = Descriptor {
                name: work.vm_name.to_string(),
                uuid: uuid::Uuid::from_bytes(*work.vm.as_bytes()),
                disks: work
                    .disks
                    .iter()
                    .map(|d| DescriptorDisk {
                        id: d.disk.clone(),
                        path: PathBuf::from(&d.image_path),
                        format: Some(d.format),
                        node: None,
                    })
                    .collect(),
                power: PowerState::Stopped,
                // A recovered VM is described stopped; whoever starts it under QEMU adds the
                // section that names its QMP socket.
                qemu: None,
            };
            let path =
                descriptor::write_descriptor(&agent.config.vms_dir, &descriptor).map_err(|e| {
                    Error::InvalidStep(format!(
                        "cannot describe the recovered VM {}: {e}",
                        work.vm_name
                    ))
                })?;
            tracing::info!(vm = %work.vm, name = work.vm_name, descriptor = %path.display(),
                "recovered VM described on this node");
            Ok(StepResult::FinishRecovery {
                written: path.display().to_string(),
            })
        }
        RecoveryTarget::CopyToFolder { path, .. } => {
            let folder = Path::new(path);
            let mut disks = Vec::new();
            agent.config.settings.below(RootKind::Recovery, folder)?;
            for disk in work.disks {
                check_image_target(agent, Path::new(&disk.image_path))?;
                let file = Path::new(&disk.image_path)
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                disks.push(ManifestDisk {
                    disk: disk.disk.to_string(),
                    file,
                    format: format_name(disk.format),
                    size_bytes: virtual_size(disk)?,
                });
            }
            let manifest = Manifest {
                format: "cairn-recovery-manifest/1",
                vm: spec.vm.to_string(),
                vm_name: work.source_name,
                rp: work.rp.to_string(),
                taken_at_ms: work.taken_at,
                disks,
            };
            let bytes = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
            let name = format!("cairn-recovery-{}.json", work.rp);
            let target = folder.join(&name);
            let dir = target_folder(agent, folder, false)?;
            dir.write_atomic(Path::new(&name), &bytes, crate::perms::FILE_MODE)
                .map_err(safefs_error(format!("manifest {}", target.display())))?;
            Ok(StepResult::FinishRecovery {
                written: target.display().to_string(),
            })
        }
        RecoveryTarget::ItemLevel { .. } => Err(Error::InvalidStep(
            "item-level recovery has no finish step".into(),
        )),
    }
}
