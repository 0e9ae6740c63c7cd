//! Raw images (regular files or block devices) read and written in place: `pread`/`pwrite`,
//! extents from `lseek(SEEK_DATA/SEEK_HOLE)`, zeroing by punching holes. Must not go through
//! qemu, and must not change a file's size after opening or creating it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::detect::disk_file_size;
use super::mapped::MappedWindow;
use super::{Error, Extent, ExtentKind, Sink, Source, check_range, io_error};

/// Zeros written per call when hole punching is unavailable.
const ZERO_BUF: usize = 1 << 20;

pub(crate) struct RawImage {
    file: File,
    path: PathBuf,
    size: u64,
    /// Set by `create`: the new directory entry is made durable by the first `flush`.
    parent_unsynced: bool,
    /// A second descriptor opened with `O_DIRECT` (new images only): aligned writes go through
    /// it without a copy into the page cache. `None` where the file system refuses direct I/O.
    /// Reads stay buffered: a warm page cache serves them faster than any disk.
    direct: Option<File>,
    /// Opened read-only and a regular file: backups may map it instead of reading it.
    mappable: bool,
}

/// Alignment direct I/O needs for buffers, offsets and lengths.
pub(crate) const DIRECT_ALIGN: usize = 4096;

impl RawImage {
    /// Opens an existing raw image (read-write if `writable`). The size must be a multiple of 512.
    pub(crate) fn open(path: &Path, writable: bool) -> Result<RawImage, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| io_error(path, e))?;
        RawImage::from_file(file, path, writable)
    }

    /// An existing raw image already open (`path` for messages).
    pub(crate) fn from_file(file: File, path: &Path, writable: bool) -> Result<RawImage, Error> {
        let size = disk_file_size(&file, path)?;
        if size % 512 != 0 {
            return Err(Error::Invalid {
                path: path.to_path_buf(),
                reason: format!("not a disk image: size {size} is not a multiple of 512"),
            });
        }
        let mappable = !writable && file.metadata().is_ok_and(|m| m.file_type().is_file());
        Ok(RawImage {
            file,
            path: path.to_path_buf(),
            size,
            parent_unsynced: false,
            direct: None,
            mappable,
        })
    }

    /// Makes the new empty file `file` a sparse raw image of `size` bytes. Its directory entry
    /// is the caller's to make durable; the `O_DIRECT` descriptor is a reopen of the inode
    /// itself (`/proc/<pid>/fd/<fd>`), not of a name.
    pub(crate) fn create_on(file: File, path: &Path, size: u64) -> Result<RawImage, Error> {
        file.set_len(size).map_err(|e| io_error(path, e))?;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(crate::safefs::proc_path(&file))
            .ok();
        Ok(RawImage {
            file,
            path: path.to_path_buf(),
            size,
            parent_unsynced: false,
            direct,
            mappable: false,
        })
    }

    /// Creates a new sparse raw image of `size` bytes; fails if `path` exists.
    pub(crate) fn create(path: &Path, size: u64) -> Result<RawImage, Error> {
        let file = create_new(path)?;
        if let Err(e) = file.set_len(size) {
            let _ = std::fs::remove_file(path);
            return Err(io_error(path, e));
        }
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(RawImage {
            file,
            path: path.to_path_buf(),
            size,
            parent_unsynced: true,
            direct,
            mappable: false,
        })
    }

    fn zero_by_writing(&self, offset: u64, len: u64) -> Result<(), Error> {
        let zeros = vec![0u8; len.min(ZERO_BUF as u64) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], pos)
                .map_err(|e| io_error(&self.path, e))?;
            pos += n as u64;
        }
        Ok(())
    }
}

/// Creates `path` exclusively (mode 0600: restored disks hold guest data), with a clear error if
/// it exists.
pub(crate) fn create_new(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Invalid {
                    path: path.to_path_buf(),
                    reason: "already exists; refusing to overwrite it".to_string(),
                }
            } else {
                io_error(path, e)
            }
        })
}

/// `lseek` with SEEK_DATA/SEEK_HOLE; `None` when there is no data/hole at or after `offset`
/// (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on a file descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Whether an I/O of `buf` at `offset` meets direct I/O's alignment.
fn is_aligned(offset: u64, buf: &[u8]) -> bool {
    offset.is_multiple_of(DIRECT_ALIGN as u64)
        && buf.len().is_multiple_of(DIRECT_ALIGN)
        && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
}

/// Appends an extent, merging it into the previous one if it has the same kind.
fn push(out: &mut Vec<Extent>, offset: u64, len: u64, kind: ExtentKind) {
    if len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.kind == kind && last.offset + last.len == offset => last.len += len,
        _ => out.push(Extent { offset, len, kind }),
    }
}

impl Source for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        check_range(&self.path, self.size, offset, len)?;
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match seek(&self.file, pos, libc::SEEK_DATA) {
                Ok(Some(d)) => d.min(end),
                Ok(None) => end,
                // Filesystems or devices without SEEK_DATA: everything is data.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                    push(&mut out, pos, end - pos, ExtentKind::Data);
                    break;
                }
                Err(e) => return Err(io_error(&self.path, e)),
            };
            push(&mut out, pos, data - pos, ExtentKind::Zero);
            pos = data;
            if pos >= end {
                break;
            }
            let hole = match seek(&self.file, pos, libc::SEEK_HOLE) {
                Ok(Some(h)) => h.min(end),
                Ok(None) => end,
                Err(e) => return Err(io_error(&self.path, e)),
            };
            // A hole at `pos` right after SEEK_DATA said data: the file changed under us; call
            // the byte data and move on so the loop always progresses.
            let hole = if hole <= pos {
                (pos + 512).min(end)
            } else {
                hole
            };
            push(&mut out, pos, hole - pos, ExtentKind::Data);
            pos = hole;
        }
        Ok(out)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        check_range(&self.path, self.size, offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| io_error(&self.path, e))
    }

    fn describe(&self) -> String {
        format!("raw image {}", self.path.display())
    }

    fn recheck(&mut self) -> Result<(), Error> {
        let now = disk_file_size(&self.file, &self.path)?;
        if now < self.size {
            return Err(Error::Invalid {
                path: self.path.clone(),
                reason: format!(
                    "the image became shorter while it was read ({} bytes, now {now})",
                    self.size
                ),
            });
        }
        Ok(())
    }

    fn map_window(&self, offset: u64, len: u64) -> Option<MappedWindow> {
        if !self.mappable || offset.checked_add(len)? > self.size {
            return None;
        }
        MappedWindow::map(&self.file, offset, usize::try_from(len).ok()?)
    }
}

impl Sink for RawImage {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        check_range(&self.path, self.size, offset, data.len() as u64)?;
        if let Some(direct) = &self.direct
            && is_aligned(offset, data)
        {
            match direct.write_all_at(data, offset) {
                Ok(()) => return Ok(()),
                // Some file systems accept O_DIRECT at open but not the write.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
                Err(e) => return Err(io_error(&self.path, e)),
            }
        }
        self.file
            .write_all_at(data, offset)
            .map_err(|e| io_error(&self.path, e))?;
        // Let the disk work while we compute the next chunks; the final fsync then waits
        // for little.
        start_writeback(&self.file, offset, data.len() as u64);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        check_range(&self.path, self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => {
                self.zero_by_writing(offset, len)
            }
            _ => Err(io_error(&self.path, e)),
        }
    }

    fn flush(&mut self) -> Result<(), Error> {
        self.file.sync_all().map_err(|e| io_error(&self.path, e))?;
        if self.parent_unsynced {
            sync_parent_dir(&self.path)?;
            self.parent_unsynced = false;
        }
        Ok(())
    }
}

/// Asks the kernel to start writing `[offset, offset + len)` of `file` to disk now, without
/// waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). Durability still comes from a later
/// fsync; this only spreads the disk work over the operation instead of leaving it all to the
/// end. Errors are ignored: it is a hint.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: sync_file_range on a file descriptor we own; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// fsyncs the directory holding `path`, so that a newly created entry survives a crash.
pub(crate) fn sync_parent_dir(path: &Path) -> Result<(), Error> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(parent, e))
}

/// A zeroed byte buffer aligned to [`DIRECT_ALIGN`], so a raw image opened for direct I/O can
/// write it without copying it into the page cache.
pub(crate) struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively; it is moved between threads, never shared.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(1), DIRECT_ALIGN)
            .expect("an I/O buffer has a valid layout")
    }

    pub(crate) fn zeroed(len: usize) -> AlignedBuf {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed, then written) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_follow_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let mut sink = RawImage::create(&path, 4 << 20).unwrap();
        sink.write_at(1 << 20, &vec![0xab; 65536]).unwrap();
        sink.write_at(3 << 20, &vec![0xcd; 4096]).unwrap();
        sink.flush().unwrap();
        let mut source = RawImage::open(&path, false).unwrap();
        let extents = source.extents(0, 4 << 20).unwrap();
        let kind_at = |off: u64| {
            extents
                .iter()
                .find(|e| e.offset <= off && off < e.offset + e.len)
                .unwrap()
                .kind
        };
        assert_eq!(kind_at(0), ExtentKind::Zero);
        assert_eq!(kind_at(1 << 20), ExtentKind::Data);
        assert_eq!(kind_at(2 << 20), ExtentKind::Zero);
        assert_eq!(kind_at(3 << 20), ExtentKind::Data);
        let covered: u64 = extents.iter().map(|e| e.len).sum();
        assert_eq!(covered, 4 << 20);
        let mut buf = vec![0u8; 65536];
        source.read_at(1 << 20, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0xab));
        // Sub-ranges start and end where asked.
        let part = source.extents(4096, 8192).unwrap();
        assert_eq!(
            part,
            vec![Extent {
                offset: 4096,
                len: 8192,
                kind: ExtentKind::Zero
            }]
        );
        assert!(source.read_at((4 << 20) - 512, &mut buf).is_err());
    }

    #[test]
    fn write_zeroes_punches_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let mut sink = RawImage::create(&path, 1 << 20).unwrap();
        sink.write_at(0, &vec![0xee; 1 << 20]).unwrap();
        sink.write_zeroes(4096, 8192).unwrap();
        let mut buf = vec![0u8; 16384];
        sink.read_at(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0xee));
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert!(buf[12288..].iter().all(|&b| b == 0xee));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        sink.flush().unwrap();
        assert!(matches!(
            RawImage::create(&path, 512),
            Err(Error::Invalid { .. })
        ));
    }
}
