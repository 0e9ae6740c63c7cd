//! VM descriptors of the `image` hypervisor adapter: a node's VMs are small JSON files `*.json`
//! in one folder (`cairn worker --vms DIR`), each naming a VM and its disk image files.
//!
//! ```json
//! {
//!   "name": "web01",
//!   "uuid": "0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d00",
//!   "disks": [
//!     {"id": "disk0", "path": "/var/lib/cairn/web01-disk0.qcow2", "format": "qcow2"}
//!   ],
//!   "power": "stopped"
//! }
//! ```
//!
//! A running QEMU VM (the `qemu` adapter) adds a `qemu` section and names each disk's block
//! node; its disks are read through QEMU, never opened directly:
//!
//! ```json
//! {
//!   "name": "db01", "uuid": "…", "power": "running",
//!   "disks": [{"id": "disk0", "path": "/vm/db01.qcow2", "format": "qcow2", "node": "drive0"}],
//!   "qemu": {
//!     "qmp": "/run/vm/db01/qmp.sock",
//!     "nbd": "/run/vm/db01/nbd.sock",
//!     "guest_agent": "/run/vm/db01/qga.sock",
//!     "scratch": "/var/lib/cairn/fleece",
//!     "replica": "normal"
//!   }
//! }
//! ```
//! `qmp` is required; `nbd` names the VM's running NBD server (without it cairn starts one next
//! to the QMP socket); `guest_agent` enables freezing the guest's file systems; `scratch` is the
//! folder of the fleecing overlays (default: the disk image's folder); `replica` marks a replica
//! VM and gives its replication state (`normal`, `resynchronizing`, `resync-required`,
//! `initial-replication`, `initial-replication-pending`, `applying-logs`, `apply-logs-failed`,
//! `failover-in-progress`, `migration-in-progress`, `critical`).
//!
//! `format` (`raw`, `qcow2`, `vhdx`, `vhd`) is optional and detected from the image's magic bytes
//! when missing; give it whenever it is known, because a raw disk whose guest wrote an image
//! header into its first sector would otherwise be read as that format. `power` (`running`,
//! `stopped`, `paused`) defaults to `stopped`.
//!
//! Owns: parsing and validating descriptors (they are hostile input: size-limited, unknown fields
//! refused, every value checked), scanning a folder into a node's inventory, writing a descriptor
//! atomically, and the mapping from a descriptor's UUID to cairn's [`VmId`]. Must not: hold an
//! image open after it has measured it, or let one bad descriptor hide the good ones.
//!
//! Files whose names start with `.` (temp files of [`write_descriptor`]) are ignored.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cairn_schemas::ids::{DiskId, VmId};
use cairn_schemas::v1::{DiskInfo, ImageFormat, PowerState, VmInventory};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::source;

/// Largest accepted descriptor file, in bytes.
pub const MAX_DESCRIPTOR_BYTES: u64 = 64 * 1024;
/// Longest accepted VM name, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Most disks a VM may have.
pub const MAX_DISKS: usize = 16;
/// Longest accepted disk id: a disk's repository lineage is `<vm id>.<disk id>` (36 + 1 + id
/// characters), and lineage ids are at most 128 characters long.
pub const MAX_DISK_ID_LEN: usize = 128 - 37;

/// Why a descriptor could not be read, accepted or written. Messages name the value at fault;
/// the descriptor's file is named by the caller ([`DescriptorProblem::file`]) or by the variant.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The descriptor file (or the folder) could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The descriptor is not a regular file (a FIFO, a device, a folder named `*.json`).
    #[error("{path}: not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The descriptor is larger than [`MAX_DESCRIPTOR_BYTES`].
    #[error("descriptor is larger than {max} bytes")]
    TooLarge {
        /// The limit.
        max: u64,
    },
    /// The file is not JSON of the descriptor's shape (includes unknown fields).
    #[error("not a valid VM descriptor: {reason}")]
    Json {
        /// serde_json's message, with line and column.
        reason: String,
    },
    /// A field has a value the descriptor does not accept.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, e.g. `name` or `disks[1].path`.
        field: String,
        /// What is wrong, with the value.
        reason: String,
    },
    /// A disk image is missing, unreadable or not a disk image.
    #[error("disk {disk}: {source}")]
    Disk {
        /// The disk's id.
        disk: DiskId,
        /// Names the image path and what is wrong with it.
        #[source]
        source: source::Error,
    },
    /// A live VM could not be asked about its disks through QMP.
    #[error("live VM: {reason}")]
    Live {
        /// What failed, naming the socket and the node.
        reason: String,
    },
    /// Another descriptor in the folder already describes the VM with this UUID.
    #[error("VM uuid {uuid} is already described by {other}")]
    DuplicateUuid {
        /// The UUID.
        uuid: Uuid,
        /// The descriptor that has it.
        other: PathBuf,
    },
}

/// One disk of a described VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorDisk {
    /// The disk's name within its VM.
    pub id: DiskId,
    /// Absolute path of the image file (or block device).
    pub path: PathBuf,
    /// Its format; `None` = detect from the file's magic bytes.
    pub format: Option<ImageFormat>,
    /// The QEMU block node that serves it (live VMs only).
    pub node: Option<String>,
}

/// Replication state of a replica VM (MABS's Hyper-V Replica states that forbid a backup, and
/// `Normal`, which allows a crash-consistent one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// Replicating normally.
    Normal,
    /// Resynchronization in progress.
    Resynchronizing,
    /// Resynchronization required.
    ResyncRequired,
    /// Initial replication in progress.
    InitialReplication,
    /// Initial replication pending.
    InitialReplicationPending,
    /// Replication logs are being applied.
    ApplyingLogs,
    /// Applying replication logs failed, was cancelled or interrupted.
    ApplyLogsFailed,
    /// A failover of the replica is in progress.
    FailoverInProgress,
    /// A migration of the replica is in progress.
    MigrationInProgress,
    /// Replication health is critical.
    Critical,
}

impl ReplicaState {
    /// Why a backup cannot be crash-consistent in this state, or `None` when it can.
    pub fn refusal(self) -> Option<&'static str> {
        match self {
            ReplicaState::Normal => None,
            ReplicaState::Resynchronizing => Some("resynchronization is in progress"),
            ReplicaState::ResyncRequired => Some("resynchronization is required"),
            ReplicaState::InitialReplication => Some("initial replication is in progress"),
            ReplicaState::InitialReplicationPending => Some("initial replication is pending"),
            ReplicaState::ApplyingLogs => Some("replication logs are being applied"),
            ReplicaState::ApplyLogsFailed => {
                Some("applying replication logs failed, was cancelled or was interrupted")
            }
            ReplicaState::FailoverInProgress => Some("a failover is in progress"),
            ReplicaState::MigrationInProgress => Some("a migration is in progress"),
            ReplicaState::Critical => Some("replication health is critical"),
        }
    }
}

/// How to reach a running QEMU VM (the `qemu` adapter).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuVm {
    /// The QMP monitor socket.
    pub qmp: PathBuf,
    /// The VM's running NBD server socket; `None` = cairn starts one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<PathBuf>,
    /// The QEMU guest agent socket; `None` = crash-consistent backups only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<PathBuf>,
    /// Folder of the fleecing overlays; `None` = each disk image's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch: Option<PathBuf>,
    /// Set for a replica VM: its replication state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaState>,
}

/// A validated VM descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// The VM's name (1–128 printable characters).
    pub name: String,
    /// The hypervisor's UUID of the VM (any version; see [`vm_id_for_uuid`]).
    pub uuid: Uuid,
    /// 1–16 disks with unique ids.
    pub disks: Vec<DescriptorDisk>,
    /// Power state.
    pub power: PowerState,
    /// Set for a running QEMU VM read through QMP and NBD (the `qemu` adapter).
    pub qemu: Option<QemuVm>,
}

/// A descriptor that could not be turned into an inventory entry, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorProblem {
    /// The descriptor file (or the folder, when it cannot be listed).
    pub file: PathBuf,
    /// What is wrong, for humans.
    pub message: String,
}

/// A node's VMs as its descriptor folder describes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// The VMs whose descriptors and disks are fine, in descriptor file name order.
    pub vms: Vec<VmInventory>,
    /// The descriptors that are not.
    pub problems: Vec<DescriptorProblem>,
}

/// On-disk shape of a descriptor. Kept apart from [`Descriptor`] so that parsing only checks the
/// shape, and validation produces the typed value.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorFile {
    name: String,
    uuid: String,
    disks: Vec<DiskFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    power: Option<PowerFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    qemu: Option<QemuVm>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskFile {
    id: String,
    path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum PowerFile {
    Running,
    Stopped,
    Paused,
}

impl From<PowerFile> for PowerState {
    fn from(power: PowerFile) -> Self {
        match power {
            PowerFile::Running => PowerState::Running,
            PowerFile::Stopped => PowerState::Stopped,
            PowerFile::Paused => PowerState::Paused,
        }
    }
}

impl From<PowerState> for PowerFile {
    fn from(power: PowerState) -> Self {
        match power {
            PowerState::Running => PowerFile::Running,
            PowerState::Stopped => PowerFile::Stopped,
            PowerState::Paused => PowerFile::Paused,
        }
    }
}

/// The worker's image format type for a schema one.
pub fn to_source_format(format: ImageFormat) -> source::ImageFormat {
    match format {
        ImageFormat::Raw => source::ImageFormat::Raw,
        ImageFormat::Qcow2 => source::ImageFormat::Qcow2,
        ImageFormat::Vhdx => source::ImageFormat::Vhdx,
        ImageFormat::Vhd => source::ImageFormat::Vpc,
    }
}

/// The schema's image format type for a worker one.
pub fn from_source_format(format: source::ImageFormat) -> ImageFormat {
    match format {
        source::ImageFormat::Raw => ImageFormat::Raw,
        source::ImageFormat::Qcow2 => ImageFormat::Qcow2,
        source::ImageFormat::Vhdx => ImageFormat::Vhdx,
        source::ImageFormat::Vpc => ImageFormat::Vhd,
    }
}

/// cairn's id for the VM with hypervisor UUID `uuid`: the UUID itself when it is a v7 UUID, else
/// a v7 UUID derived from it by hashing, so every worker that sees the VM (after a move to
/// another node, too) gives it the same id. The derived id's timestamp bits are hash bits, not a
/// time.
pub fn vm_id_for_uuid(uuid: Uuid) -> VmId {
    if let Ok(id) = VmId::from_uuid(uuid) {
        return id;
    }
    let mut hasher = blake3::Hasher::new_derive_key("cairn 2024 image adapter vm id v1");
    hasher.update(uuid.as_bytes());
    let hash = hasher.finalize();
    let bytes = hash.as_bytes();
    let mut millis = 0u64;
    for byte in &bytes[..6] {
        millis = (millis << 8) | u64::from(*byte);
    }
    let mut rand = [0u8; 10];
    rand.copy_from_slice(&bytes[6..16]);
    VmId::new_v7(millis, rand)
}

impl Descriptor {
    /// Parses and validates a descriptor's bytes. Checks everything that does not need the
    /// disks themselves ([`Descriptor::probe`] does that).
    pub fn parse(bytes: &[u8]) -> Result<Descriptor, Error> {
        if bytes.len() as u64 > MAX_DESCRIPTOR_BYTES {
            return Err(Error::TooLarge {
                max: MAX_DESCRIPTOR_BYTES,
            });
        }
        let file: DescriptorFile = serde_json::from_slice(bytes).map_err(|e| Error::Json {
            reason: e.to_string(),
        })?;
        let uuid = Uuid::parse_str(&file.uuid)
            .map_err(|e| invalid("uuid", format!("{:?} is not a UUID: {e}", file.uuid)))?;
        let mut disks = Vec::with_capacity(file.disks.len());
        for (i, disk) in file.disks.into_iter().enumerate() {
            let field = |name: &str| format!("disks[{i}].{name}");
            let id = DiskId::new(disk.id).map_err(|e| invalid(&field("id"), e.to_string()))?;
            let format = match disk.format {
                None => None,
                Some(text) => Some(from_source_format(
                    text.parse::<source::ImageFormat>()
                        .map_err(|e| invalid(&field("format"), e.to_string()))?,
                )),
            };
            disks.push(DescriptorDisk {
                id,
                path: PathBuf::from(disk.path),
                format,
                node: disk.node,
            });
        }
        let descriptor = Descriptor {
            name: file.name,
            uuid,
            disks,
            power: file.power.map_or(PowerState::Stopped, PowerState::from),
            qemu: file.qemu,
        };
        descriptor.validate()?;
        Ok(descriptor)
    }

    /// Checks the rules of a descriptor that do not need the disks: name, uuid, number of
    /// disks, unique disk ids short enough for a lineage id, absolute paths.
    pub fn validate(&self) -> Result<(), Error> {
        let n_chars = self.name.chars().count();
        if n_chars == 0 || n_chars > MAX_NAME_CHARS {
            return Err(invalid(
                "name",
                format!("must be 1 to {MAX_NAME_CHARS} characters, {n_chars} given"),
            ));
        }
        if self.name.chars().any(char::is_control) {
            return Err(invalid(
                "name",
                format!("{:?} holds control characters", self.name),
            ));
        }
        if self.name.trim() != self.name {
            return Err(invalid(
                "name",
                format!("{:?} starts or ends with white space", self.name),
            ));
        }
        if self.uuid.is_nil() || self.uuid.is_max() {
            return Err(invalid(
                "uuid",
                format!("{} is not a usable VM UUID", self.uuid),
            ));
        }
        if self.disks.is_empty() || self.disks.len() > MAX_DISKS {
            return Err(invalid(
                "disks",
                format!(
                    "a VM must have 1 to {MAX_DISKS} disks, {} given",
                    self.disks.len()
                ),
            ));
        }
        let mut seen = HashSet::new();
        for (i, disk) in self.disks.iter().enumerate() {
            if disk.id.as_str().len() > MAX_DISK_ID_LEN {
                return Err(invalid(
                    &format!("disks[{i}].id"),
                    format!(
                        "{:?} is {} bytes long; disk ids of VMs are at most {MAX_DISK_ID_LEN}",
                        disk.id.as_str(),
                        disk.id.as_str().len()
                    ),
                ));
            }
            if !seen.insert(&disk.id) {
                return Err(invalid(
                    &format!("disks[{i}].id"),
                    format!("disk id {:?} is used twice", disk.id.as_str()),
                ));
            }
            let path_text = disk.path.to_string_lossy();
            if !disk.path.is_absolute() {
                return Err(invalid(
                    &format!("disks[{i}].path"),
                    format!("{path_text:?} is not an absolute path"),
                ));
            }
            if path_text.contains('\0') || disk.path.to_str().is_none() {
                return Err(invalid(
                    &format!("disks[{i}].path"),
                    format!("{path_text:?} is not a usable path"),
                ));
            }
        }
        if let Some(qemu) = &self.qemu {
            validate_live(self, qemu)?;
        } else if let Some(i) = self.disks.iter().position(|d| d.node.is_some()) {
            return Err(invalid(
                &format!("disks[{i}].node"),
                "a block node is only meaningful for a VM with a qemu section",
            ));
        }
        Ok(())
    }

    /// cairn's id for the VM.
    pub fn vm_id(&self) -> VmId {
        vm_id_for_uuid(self.uuid)
    }

    /// The descriptor as pretty JSON, as [`Descriptor::parse`] reads it.
    pub fn to_json(&self) -> Vec<u8> {
        let file = DescriptorFile {
            name: self.name.clone(),
            uuid: self.uuid.hyphenated().to_string(),
            disks: self
                .disks
                .iter()
                .map(|d| DiskFile {
                    id: d.id.to_string(),
                    path: d.path.to_string_lossy().into_owned(),
                    format: d.format.map(|f| to_source_format(f).to_string()),
                    node: d.node.clone(),
                })
                .collect(),
            power: Some(self.power.into()),
            qemu: self.qemu.clone(),
        };
        let mut json = serde_json::to_vec_pretty(&file).expect("a descriptor serialises");
        json.push(b'\n');
        json
    }

    /// Opens every disk to learn its format (when not given) and virtual size, and closes it
    /// again. The result is the VM as the node's inventory reports it.
    pub fn probe(&self) -> Result<VmInventory, Error> {
        if let Some(qemu) = &self.qemu {
            return super::qemu::probe(self, qemu).map_err(|e| Error::Live {
                reason: e.to_string(),
            });
        }
        let mut disks = Vec::with_capacity(self.disks.len());
        for disk in &self.disks {
            let (format, size_bytes) =
                probe_disk(&disk.path, disk.format).map_err(|source| Error::Disk {
                    disk: disk.id.clone(),
                    source,
                })?;
            disks.push(DiskInfo {
                disk: disk.id.clone(),
                size_bytes,
                format,
                image_path: disk.path.to_string_lossy().into_owned(),
            });
        }
        Ok(VmInventory {
            vm: self.vm_id(),
            name: self.name.clone(),
            disks,
            power: self.power,
        })
    }
}

/// The rules of a live VM's descriptor: absolute socket paths, a block node name QEMU accepts
/// for every disk, and a known format (a running VM's image is never probed).
fn validate_live(descriptor: &Descriptor, qemu: &QemuVm) -> Result<(), Error> {
    let paths = [
        ("qemu.qmp", Some(&qemu.qmp)),
        ("qemu.nbd", qemu.nbd.as_ref()),
        ("qemu.guest_agent", qemu.guest_agent.as_ref()),
        ("qemu.scratch", qemu.scratch.as_ref()),
    ];
    for (field, path) in paths {
        let Some(path) = path else { continue };
        let text = path.to_string_lossy();
        if !path.is_absolute() || path.to_str().is_none() || text.contains('\0') {
            return Err(invalid(field, format!("{text:?} is not an absolute path")));
        }
        // Unix socket paths are limited to 107 bytes.
        if field != "qemu.scratch" && text.len() > 107 {
            return Err(invalid(
                field,
                format!("{text:?} is longer than the 107 bytes a Unix socket path may have"),
            ));
        }
    }
    for (i, disk) in descriptor.disks.iter().enumerate() {
        let field = format!("disks[{i}].node");
        let Some(node) = &disk.node else {
            return Err(invalid(
                &field,
                "a disk of a qemu VM must name its QEMU block node",
            ));
        };
        if !valid_node_name(node) {
            return Err(invalid(
                &field,
                format!(
                    "{node:?} is not a QEMU node name (1-31 letters, digits, '-', '_', '.', \
                     starting with a letter)"
                ),
            ));
        }
        if disk.format.is_none() {
            return Err(invalid(
                &format!("disks[{i}].format"),
                "a disk of a qemu VM must give its format (a running VM's image is not probed)",
            ));
        }
        if descriptor.disks[..i].iter().any(|d| d.node == disk.node) {
            return Err(invalid(
                &field,
                format!("block node {node:?} is used twice"),
            ));
        }
    }
    Ok(())
}

/// QEMU's rule for node names: an id of at most 31 characters.
pub(crate) fn valid_node_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 31
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn invalid(field: &str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The format (given or detected) and virtual size of an image; the image is closed on return.
fn probe_disk(
    path: &Path,
    format: Option<ImageFormat>,
) -> Result<(ImageFormat, u64), source::Error> {
    let image = source::open_source(path, format.map(to_source_format))?;
    let size = image.size();
    let format = match format {
        Some(format) => format,
        None => detected_format(path, image.describe())?,
    };
    Ok((format, size))
}

/// The format `open_source` detected, from its description (`"<format> image <path>"`).
fn detected_format(path: &Path, description: String) -> Result<ImageFormat, source::Error> {
    description
        .split_once(' ')
        .and_then(|(format, _)| format.parse::<source::ImageFormat>().ok())
        .map(from_source_format)
        .ok_or_else(|| source::Error::Invalid {
            path: path.to_path_buf(),
            reason: format!("cannot tell the image format from {description:?}"),
        })
}

/// Reads one descriptor file: a regular file of at most [`MAX_DESCRIPTOR_BYTES`], opened without
/// blocking (a FIFO named `*.json` must not hang the scan), parsed and validated.
pub fn read_descriptor(path: &Path) -> Result<Descriptor, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(Error::NotAFile {
            path: path.to_path_buf(),
        });
    }
    if meta.len() > MAX_DESCRIPTOR_BYTES {
        return Err(Error::TooLarge {
            max: MAX_DESCRIPTOR_BYTES,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow between the size check and the read.
    file.take(MAX_DESCRIPTOR_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    Descriptor::parse(&bytes)
}

/// The descriptor files of a folder (`*.json`, not starting with `.`), sorted by name.
fn descriptor_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with('.') && name.ends_with(".json") {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// The descriptors of a folder that parse and validate, with their files, in file name order;
/// and the problems of the others. Disks are not opened. A UUID described twice is kept for the
/// first file only.
pub fn read_all(dir: &Path) -> (Vec<(PathBuf, Descriptor)>, Vec<DescriptorProblem>) {
    let mut good = Vec::new();
    let mut problems = Vec::new();
    let files = match descriptor_files(dir) {
        Ok(files) => files,
        Err(err) => {
            problems.push(DescriptorProblem {
                file: dir.to_path_buf(),
                message: format!("cannot list the VM descriptor folder: {err}"),
            });
            return (good, problems);
        }
    };
    let mut first_with_uuid: HashMap<Uuid, PathBuf> = HashMap::new();
    for file in files {
        match read_descriptor(&file) {
            Ok(descriptor) => {
                if let Some(other) = first_with_uuid.get(&descriptor.uuid) {
                    problems.push(DescriptorProblem {
                        message: Error::DuplicateUuid {
                            uuid: descriptor.uuid,
                            other: other.clone(),
                        }
                        .to_string(),
                        file,
                    });
                    continue;
                }
                first_with_uuid.insert(descriptor.uuid, file.clone());
                good.push((file, descriptor));
            }
            Err(err) => problems.push(DescriptorProblem {
                file,
                message: err.to_string(),
            }),
        }
    }
    (good, problems)
}

/// Reads every descriptor of `dir` and measures its disks. One bad descriptor (or a missing
/// disk) becomes a [`DescriptorProblem`] and never hides the others.
pub fn scan(dir: &Path) -> Inventory {
    scan_allowed(dir, &|_| Ok(()))
}

/// [`scan`], leaving out (as a problem naming the disk and the reason) every VM with a disk
/// that `allowed` refuses, before any of its disks is opened.
pub fn scan_allowed(dir: &Path, allowed: &dyn Fn(&Path) -> Result<(), String>) -> Inventory {
    let (descriptors, mut problems) = read_all(dir);
    let mut vms = Vec::with_capacity(descriptors.len());
    for (file, descriptor) in descriptors {
        if let Some(refusal) = refused_disk(&descriptor, allowed) {
            problems.push(DescriptorProblem {
                file,
                message: refusal,
            });
            continue;
        }
        match descriptor.probe() {
            Ok(vm) => vms.push(vm),
            Err(err) => problems.push(DescriptorProblem {
                file,
                message: err.to_string(),
            }),
        }
    }
    problems.sort_by(|a, b| a.file.cmp(&b.file));
    Inventory { vms, problems }
}

/// Why one of the descriptor's disks may not be read, if one may not.
pub fn refused_disk(
    descriptor: &Descriptor,
    allowed: &dyn Fn(&Path) -> Result<(), String>,
) -> Option<String> {
    descriptor.disks.iter().find_map(|disk| {
        allowed(&disk.path).err().map(|reason| {
            format!(
                "VM {} left out of the inventory: disk {}: {reason}",
                descriptor.name, disk.id
            )
        })
    })
}

/// The file name [`write_descriptor`] gives a VM's descriptor: `<uuid>.json`.
pub fn descriptor_file_name(uuid: Uuid) -> String {
    format!("{}.json", uuid.hyphenated())
}

/// Writes `descriptor` as `dir/<uuid>.json` (creating `dir`), atomically and durably: temp
/// file, fsync, rename, fsync of the folder. Rewriting the same VM replaces its file; a VM whose
/// UUID another descriptor file of the folder already holds is refused, since the scan would
/// ignore one of the two. Returns the file's path.
pub fn write_descriptor(dir: &Path, descriptor: &Descriptor) -> Result<PathBuf, Error> {
    descriptor.validate()?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(descriptor_file_name(descriptor.uuid));
    let (existing, _) = read_all(dir);
    if let Some((other, _)) = existing
        .iter()
        .find(|(file, d)| d.uuid == descriptor.uuid && *file != path)
    {
        return Err(Error::DuplicateUuid {
            uuid: descriptor.uuid,
            other: other.clone(),
        });
    }
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        descriptor_file_name(descriptor.uuid),
        std::process::id()
    ));
    let result = (|| {
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&descriptor.to_json()).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V7: &str = "0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d00";
    const V4: &str = "9b2e4c4a-3f4e-4b8e-9d1a-2c3b4d5e6f70";

    fn parse(json: &str) -> Result<Descriptor, Error> {
        Descriptor::parse(json.as_bytes())
    }

    #[test]
    fn a_minimal_descriptor_gets_defaults() {
        let d = parse(&format!(
            r#"{{"name": "web01", "uuid": "{V7}", "disks": [{{"id": "disk0", "path": "/x/a.img"}}]}}"#
        ))
        .unwrap();
        assert_eq!(d.power, PowerState::Stopped);
        assert_eq!(d.disks[0].format, None);
        assert_eq!(d.vm_id().to_string(), V7, "a v7 uuid is the VM id itself");
        assert_eq!(
            Descriptor::parse(&d.to_json()).unwrap().power,
            PowerState::Stopped
        );
    }

    #[test]
    fn non_v7_uuids_map_to_a_stable_v7_vm_id() {
        let uuid = Uuid::parse_str(V4).unwrap();
        let id = vm_id_for_uuid(uuid);
        assert_eq!(id, vm_id_for_uuid(uuid));
        assert_eq!(id.as_uuid().get_version_num(), 7);
        assert_ne!(
            id,
            vm_id_for_uuid(Uuid::parse_str("9b2e4c4a-3f4e-4b8e-9d1a-2c3b4d5e6f71").unwrap())
        );
    }

    #[test]
    fn json_round_trips() {
        let d = Descriptor {
            name: "db 01 (prod)".into(),
            uuid: Uuid::parse_str(V4).unwrap(),
            disks: vec![
                DescriptorDisk {
                    id: DiskId::new("vda").unwrap(),
                    path: "/vm/db.qcow2".into(),
                    format: Some(ImageFormat::Qcow2),
                    node: None,
                },
                DescriptorDisk {
                    id: DiskId::new("vdb").unwrap(),
                    path: "/vm/db-data.vhd".into(),
                    format: Some(ImageFormat::Vhd),
                    node: None,
                },
            ],
            power: PowerState::Running,
            qemu: None,
        };
        let json = d.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains(r#""format": "vhd""#), "{text}");
        assert!(text.contains(r#""power": "running""#), "{text}");
        assert_eq!(Descriptor::parse(&json).unwrap(), d);
    }

    #[test]
    fn bad_descriptors_are_refused_with_the_field_and_value() {
        let disk = r#"{"id": "disk0", "path": "/x/a.img"}"#;
        let with = |name: &str, uuid: &str, disks: &str, extra: &str| {
            format!(r#"{{"name": {name}, "uuid": "{uuid}", "disks": [{disks}]{extra}}}"#)
        };
        let long_id = "d".repeat(MAX_DISK_ID_LEN + 1);
        let seventeen = vec![disk; 17].join(",");
        let cases: Vec<(String, &str)> = vec![
            ("{".into(), "not a valid VM descriptor"),
            ("[]".into(), "not a valid VM descriptor"),
            (
                with(r#""a""#, V7, disk, r#", "colour": "red""#),
                "unknown field `colour`",
            ),
            (
                with(r#""a""#, V7, r#"{"id": "d", "path": "/a", "size": 1}"#, ""),
                "unknown field `size`",
            ),
            (
                with(r#""""#, V7, disk, ""),
                "name: must be 1 to 128 characters",
            ),
            (
                with(&format!("{:?}", "n".repeat(129)), V7, disk, ""),
                "129 given",
            ),
            (with(r#""a\u0007b""#, V7, disk, ""), "control characters"),
            (with(r#"" web""#, V7, disk, ""), "white space"),
            (
                with(r#""a""#, "not-a-uuid", disk, ""),
                "uuid: \"not-a-uuid\" is not a UUID",
            ),
            (
                with(r#""a""#, "00000000-0000-0000-0000-000000000000", disk, ""),
                "not a usable VM UUID",
            ),
            (
                with(r#""a""#, V7, "", ""),
                "disks: a VM must have 1 to 16 disks, 0 given",
            ),
            (with(r#""a""#, V7, &seventeen, ""), "17 given"),
            (
                with(r#""a""#, V7, &format!("{disk}, {disk}"), ""),
                "disks[1].id: disk id \"disk0\" is used twice",
            ),
            (
                with(r#""a""#, V7, r#"{"id": "../x", "path": "/a"}"#, ""),
                "disks[0].id",
            ),
            (
                with(
                    r#""a""#,
                    V7,
                    &format!(r#"{{"id": "{long_id}", "path": "/a"}}"#),
                    "",
                ),
                "at most 91",
            ),
            (
                with(r#""a""#, V7, r#"{"id": "d", "path": "disks/a.img"}"#, ""),
                "disks[0].path: \"disks/a.img\" is not an absolute path",
            ),
            (
                with(r#""a""#, V7, r#"{"id": "d", "path": "/a\u0000b"}"#, ""),
                "not a usable path",
            ),
            (
                with(
                    r#""a""#,
                    V7,
                    r#"{"id": "d", "path": "/a", "format": "vmdk"}"#,
                    "",
                ),
                "disks[0].format: unknown image format \"vmdk\"",
            ),
            (
                with(r#""a""#, V7, disk, r#", "power": "off""#),
                "unknown variant `off`",
            ),
        ];
        for (json, wanted) in cases {
            let err = parse(&json).expect_err(&json).to_string();
            assert!(
                err.contains(wanted),
                "{json}: got {err:?}, wanted {wanted:?}"
            );
        }
        let huge = format!(
            r#"{{"name": "a", "uuid": "{V7}", "disks": [{disk}], "pad": "{}"}}"#,
            " ".repeat(MAX_DESCRIPTOR_BYTES as usize)
        );
        assert!(matches!(parse(&huge), Err(Error::TooLarge { .. })));
    }
}
