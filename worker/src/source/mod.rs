//! Disk image sources and sinks: the byte-level view of a VM disk that backup reads from and
//! restore writes to. Formats other than raw go through `qemu-nbd` and [`crate::nbd`].

use std::path::PathBuf;

/// What a range of a disk holds, as far as the image format can tell without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated; must be read.
    Data,
    /// Reads as zeros (a hole, or an extent the format knows to be zero).
    Zero,
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
}

/// A writable disk image (restore target). It is readable too, so delta restore can compare.
pub trait Sink: Source {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), Error>;
    /// Makes `[offset, offset + len)` read as zeros, deallocating where the format can.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Error>;
    /// Makes every write so far durable.
    fn flush(&mut self) -> Result<(), Error>;
}
