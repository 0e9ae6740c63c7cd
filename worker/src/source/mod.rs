//! Disk image sources and sinks: the byte-level view of a VM disk that backup reads from and
//! restore writes to. Formats other than raw go through `qemu-nbd` and [`crate::nbd`].
//!
//! Owns: format detection ([`open_source`] with no format), raw images read and written in
//! place (`pread`/`pwrite`, `SEEK_DATA`/`SEEK_HOLE`, hole punching), and qcow2/VHDX/VHD images
//! served by a private `qemu-nbd` process ([`qemu_nbd`]) and read or written with our NBD client.
//! Must not: know about chunks, repositories or backups; overwrite an existing file when creating
//! a restore target; leave a `qemu-nbd` process or socket behind once a source/sink is dropped.
//!
//! Security note: format detection trusts the file's first bytes. A raw disk whose guest wrote a
//! qcow2 header into sector 0 would be detected as qcow2 (and qcow2 may name backing files), so
//! callers that know the format (VM descriptors) must pass it; detection is for files an
//! operator hands us.
//!
//! - `detect`: magic-byte format detection (pure) and the checks on the file itself.
//! - `raw`: [`Source`]/[`Sink`] over a raw file or block device.
//! - [`qemu_nbd`]: the `qemu-nbd` process wrapper.
//! - `nbd_image`: [`Source`]/[`Sink`] over a qemu-nbd export; `qemu-img create`.
//! - [`throttle`]: a [`Sink`] wrapper that paces writes by a work-hours bandwidth schedule.

mod detect;
pub mod mapped;
mod nbd_image;
pub mod qemu_nbd;
pub(crate) mod raw;
pub mod throttle;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// What a range of a disk holds, as far as the image format can tell without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated; must be read.
    Data,
    /// Reads as zeros (a hole, or an extent the format knows to be zero).
    Zero,
    /// Unchanged since the recovery point the backup names as
    /// `BackupOptions::unchanged_since` (a clean range of a change-tracking bitmap): a chunk
    /// made only of such ranges reuses the parent's chunk and is not read. Read like `Data` by
    /// anything else.
    Unchanged,
}

/// A contiguous range of a disk with one [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

/// Image formats cairn reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Raw,
    Qcow2,
    Vhdx,
    /// Microsoft VHD ("Virtual PC"), dynamic or fixed.
    Vpc,
}

/// Errors of the source module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{path}: {format} images are not supported; convert it first (e.g. `qemu-img convert \
         -O qcow2`) or restore it elsewhere"
    )]
    UnsupportedFormat { path: PathBuf, format: &'static str },
    #[error("{path}: {program} failed: {message}")]
    Tool {
        path: PathBuf,
        program: &'static str,
        message: String,
    },
    #[error("{path}: {source}")]
    Nbd {
        path: PathBuf,
        #[source]
        source: crate::nbd::Error,
    },
}

/// A string that names no [`ImageFormat`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown image format {0:?}: expected raw, qcow2, vhdx or vhd")]
pub struct UnknownFormat(pub String);

impl ImageFormat {
    /// The name `qemu-img`/`qemu-nbd` use with `-f`.
    pub fn qemu_name(&self) -> &str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vpc => "vpc",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vpc => "vhd",
        })
    }
}

/// Accepts `raw`, `qcow2`, `vhdx`, `vhd` and qemu's name `vpc`, in any case.
impl FromStr for ImageFormat {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            "vhdx" => Ok(ImageFormat::Vhdx),
            "vhd" | "vpc" => Ok(ImageFormat::Vpc),
            _ => Err(UnknownFormat(s.to_string())),
        }
    }
}

/// Opens a disk image for reading. With `format: None` the format is detected from the file's
/// magic bytes; known formats cairn does not read (VMDK, VDI, archives…) are refused by name, and
/// anything else must look like a raw disk (a regular file or block device whose size is a
/// multiple of 512).
pub fn open_source(path: &Path, format: Option<ImageFormat>) -> Result<Box<dyn Source>, Error> {
    Ok(match resolve_format(path, format)? {
        ImageFormat::Raw => Box::new(raw::RawImage::open(path, false)?),
        f => Box::new(nbd_image::NbdImage::open(path, f, false)?),
    })
}

/// Creates a new disk image of `size` bytes (a multiple of 512) as a restore target. Refuses to
/// overwrite an existing file. qcow2, VHDX (dynamic) and VHD (dynamic, exact size) are created
/// with `qemu-img create` and written through a writable `qemu-nbd`.
pub fn create_sink(path: &Path, format: ImageFormat, size: u64) -> Result<Box<dyn Sink>, Error> {
    if !size.is_multiple_of(512) {
        return Err(Error::Invalid {
            path: path.to_path_buf(),
            reason: format!("disk size {size} is not a multiple of 512"),
        });
    }
    Ok(match format {
        ImageFormat::Raw => Box::new(raw::RawImage::create(path, size)?),
        f => Box::new(nbd_image::NbdImage::create(path, f, size)?),
    })
}

/// Opens an existing disk image read-write (delta restore onto it). Format as in
/// [`open_source`].
pub fn open_sink(path: &Path, format: Option<ImageFormat>) -> Result<Box<dyn Sink>, Error> {
    Ok(match resolve_format(path, format)? {
        ImageFormat::Raw => Box::new(raw::RawImage::open(path, true)?),
        f => Box::new(nbd_image::NbdImage::open(path, f, true)?),
    })
}

/// Makes the new, empty file `file` (created by the caller below a root, and kept open by it
/// for the whole restore) a disk image of `size` bytes and opens it writable. Nothing is
/// reopened by name: raw images are written through a second descriptor of `file`, and
/// `qemu-img`/`qemu-nbd` get [`crate::safefs::proc_path`] of it, which names the inode itself.
/// `shown` is the path for messages.
pub fn create_sink_on(
    file: &std::fs::File,
    shown: &Path,
    format: ImageFormat,
    size: u64,
) -> Result<Box<dyn Sink>, Error> {
    if !size.is_multiple_of(512) {
        return Err(Error::Invalid {
            path: shown.to_path_buf(),
            reason: format!("disk size {size} is not a multiple of 512"),
        });
    }
    let dup = file.try_clone().map_err(|e| io_error(shown, e))?;
    Ok(match format {
        ImageFormat::Raw => Box::new(raw::RawImage::create_on(dup, shown, size)?),
        f => Box::new(nbd_image::NbdImage::create_on(&dup, shown, f, size)?),
    })
}

/// Opens the existing image `file` (opened by the caller below a root) read-write, for a delta
/// restore onto it; as [`create_sink_on`], nothing is reopened by name.
pub fn open_sink_on(
    file: &std::fs::File,
    shown: &Path,
    format: ImageFormat,
) -> Result<Box<dyn Sink>, Error> {
    let dup = file.try_clone().map_err(|e| io_error(shown, e))?;
    Ok(match format {
        ImageFormat::Raw => Box::new(raw::RawImage::from_file(dup, shown, true)?),
        f => Box::new(nbd_image::NbdImage::open_on(&dup, shown, f)?),
    })
}

fn resolve_format(path: &Path, format: Option<ImageFormat>) -> Result<ImageFormat, Error> {
    match format {
        Some(f) => {
            // Fail on a missing file with our error naming the path, not qemu's.
            std::fs::metadata(path).map_err(|e| io_error(path, e))?;
            Ok(f)
        }
        None => detect::probe(path),
    }
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
fn check_range(path: &Path, size: u64, offset: u64, len: u64) -> Result<(), Error> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::Invalid {
            path: path.to_path_buf(),
            reason: format!(
                "range of {len} bytes at offset {offset} is past the end of the disk ({size} bytes)"
            ),
        }),
    }
}

/// A readable disk image. Offsets are bytes from the start of the virtual disk.
pub trait Source: Send {
    /// Virtual size of the disk in bytes.
    fn size(&self) -> u64;
    /// The extents covering `[offset, offset + len)`, in order and without gaps. A source that
    /// cannot tell returns one `Data` extent.
    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>, Error>;
    /// Fills `buf` with the bytes at `offset`. Reads past the end are an error.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error>;
    /// A short human description, e.g. `qcow2 image /var/lib/vm/a.qcow2`.
    fn describe(&self) -> String;
    /// The bytes `[offset, offset + len)` mapped read-only, when the source is a file that can
    /// be mapped (raw images); `None` means: use [`Source::read_at`].
    fn map_window(&self, _offset: u64, _len: u64) -> Option<mapped::MappedWindow> {
        None
    }
    /// Checks, after everything was read, that the source still has the size it had when it
    /// was opened: a raw image truncated during a backup reads as zeros past its new end.
    fn recheck(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

/// A writable disk image (restore target). It is readable too, so delta restore can compare.
pub trait Sink: Source {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), Error>;
    /// Makes `[offset, offset + len)` read as zeros, deallocating where the format can.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Error>;
    /// Makes every write so far durable.
    fn flush(&mut self) -> Result<(), Error>;
}
