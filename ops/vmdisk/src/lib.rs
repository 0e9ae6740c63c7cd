//! Realistic VM disk images and guest churn, built without root, loop devices or mounts.
//!
//! A disk is what a guest leaves on its virtual disk: a GPT with an EFI system partition
//! (FAT32 with a boot loader), an ext4 root filled with real files copied from this machine,
//! and a swap partition of random pages, with the root's free space left as holes; or one ext4
//! file system over the whole disk, as on a data disk. Churn overwrites scattered blocks, as a
//! guest does between two backups. `cairn up --demo` builds its VMs with this crate, and the
//! tests and benchmarks build theirs with it (as a library, or through the `make-vm-disk` and
//! `churn-disk` tools), so nothing they use lives outside the repository.
//!
//! The layout and the file selection are pure ([`DiskSpec::partitions`], [`select_files`]);
//! the rest runs the system's tools (sfdisk, mkfs.vfat, mcopy, mkfs.ext4, mkswap, qemu-img).

pub mod churn;
pub mod disk;
pub mod rng;

use std::path::{Path, PathBuf};

pub use churn::{ChurnSpec, churn};
pub use disk::{DiskSpec, ImageLayout, Partition, build, select_files};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{program} could not be run (ops/install-deps installs it): {source}")]
    ToolMissing {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} {args} failed: {stderr}")]
    ToolFailed {
        program: String,
        args: String,
        stderr: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Spec(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
