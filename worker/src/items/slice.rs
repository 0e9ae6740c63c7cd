//! A window onto one volume of a disk: `Read + Seek` (and a `Write` that always fails, for
//! drivers whose types demand one) over `[start, start + len)` of a [`DiskView`]. Reads past the
//! window's end return what is left; nothing can be written. A [`ReadProbe`] shared by a slice
//! and its clones tells where the next read starts, for drivers that hide the position of what
//! they read.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::repo::image::DiskView;

#[derive(Clone)]
pub(crate) struct Slice {
    view: Arc<dyn DiskView>,
    start: u64,
    len: u64,
    pos: u64,
    /// Shared with every clone and with whoever called [`Slice::probe`].
    probe: Arc<ReadProbe>,
}

/// Records the position of the first `Read::read` after [`ReadProbe::arm`].
#[derive(Debug, Default)]
pub(crate) struct ReadProbe {
    armed: AtomicBool,
    at: AtomicU64,
}

impl ReadProbe {
    /// Watches for the next read, forgetting any earlier one.
    pub(crate) fn arm(&self) {
        self.at.store(u64::MAX, Ordering::Relaxed);
        self.armed.store(true, Ordering::Relaxed);
    }

    /// Where the first read since [`ReadProbe::arm`] started, in bytes from the window's start;
    /// stops watching.
    pub(crate) fn take(&self) -> Option<u64> {
        self.armed.store(false, Ordering::Relaxed);
        Some(self.at.swap(u64::MAX, Ordering::Relaxed)).filter(|&at| at != u64::MAX)
    }
}

impl std::fmt::Debug for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slice")
            .field("start", &self.start)
            .field("len", &self.len)
            .finish()
    }
}

impl Slice {
    pub(crate) fn new(view: Arc<dyn DiskView>, start: u64, len: u64) -> Slice {
        let len = len.min(view.size().saturating_sub(start));
        Slice {
            view,
            start,
            len,
            pos: 0,
            probe: Arc::default(),
        }
    }

    /// The probe that watches this slice's reads (and its clones').
    pub(crate) fn probe(&self) -> Arc<ReadProbe> {
        self.probe.clone()
    }

    /// Exactly `buf.len()` bytes at `offset` of the window.
    pub(crate) fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {offset} is past the end of the {}-byte volume",
                    buf.len(),
                    self.len
                ),
            ));
        }
        self.view.read_at(self.start + offset, buf)
    }
}

impl Read for Slice {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.probe.armed.swap(false, Ordering::Relaxed) {
            self.probe.at.store(self.pos, Ordering::Relaxed);
        }
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.read_exact_at(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Slice {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let new = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the volume start",
            )
        })?;
        Ok(self.pos)
    }
}

impl Write for Slice {
    fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "recovery points are read-only",
        ))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ext4_view::Ext4Read for Slice {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.read_exact_at(start_byte, dst)
            .map_err(|e| Box::new(e) as _)
    }
}
