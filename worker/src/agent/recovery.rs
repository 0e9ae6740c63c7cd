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
//! Must not: write over an existing file except the original VM's own disks (and those only
//! while it is stopped), or describe a VM whose images are missing.

use std::io::Write;
use std::path::{Path, PathBuf};

use cairn_schemas::ids::{DiskId, RecoveryPointId, VmId};
use cairn_schemas::v1::{DiskSource, PowerState, RecoveryTarget, StepResult, StepSpec};
use serde::Serialize;

use super::descriptor::{self, Descriptor, DescriptorDisk};
use super::{Agent, Error};
use crate::source;

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
    if let Some(folder) = folder_of(target) {
        let folder = Path::new(folder);
        if !folder.is_absolute() {
            return Err(target_error(folder, "not an absolute path"));
        }
        std::fs::create_dir_all(folder)
            .map_err(|e| target_error(folder, format!("cannot create the folder: {e}")))?;
    }
    for disk in disks {
        let path = PathBuf::from(&disk.image_path);
        if !path.is_absolute() {
            return Err(target_error(&path, "not an absolute path"));
        }
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
                if path.exists() {
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
            for disk in work.disks {
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
            let target = folder.join(format!("cairn-recovery-{}.json", work.rp));
            write_durably(&target, &bytes)?;
            Ok(StepResult::FinishRecovery {
                written: target.display().to_string(),
            })
        }
        RecoveryTarget::ItemLevel { .. } => Err(Error::InvalidStep(
            "item-level recovery has no finish step".into(),
        )),
    }
}

/// Temp file, fsync, rename, fsync of the folder.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io = |e: std::io::Error| Error::Source {
        disk: "manifest".into(),
        source: source::Error::Io {
            path: path.to_path_buf(),
            source: e,
        },
    };
    let folder = path.parent().unwrap_or(Path::new("/"));
    let tmp = folder.join(format!(
        ".{}.{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(folder)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}
