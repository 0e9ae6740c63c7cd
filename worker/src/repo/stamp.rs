//! Content stamps: which recovery point an image file holds, recorded on the file itself as the
//! extended attribute `user.cairn.content` together with the file's identity (device, inode,
//! size, mtime in nanoseconds) at the time of the stamp.
//!
//! A restore stamps its target when it is complete and durable; a backup stamps a disk it read
//! unchanged. A later delta restore onto a file whose stamp is still valid (same identity: no
//! write since, because every write moves the mtime) knows the file's content without reading
//! it, and writes only the positions where the two recovery points differ. A stamp that does
//! not match, does not parse or cannot be read is ignored: the delta restore then reads and
//! compares the whole target, as without stamps.
//!
//! Before it stamps, [`write`] waits for the file system's coarse clock to move past the last
//! write, so that a write right after the stamp cannot keep the same mtime.
//!
//! Limitation: a tool that rewrites a file and then sets its mtime back to the stamped
//! nanosecond (with the same size, on the same inode) would go unnoticed.
//!
//! Must not: fail a restore or a backup because stamps are unsupported (file systems without
//! user xattrs, read-only images): stamping is best effort.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

const NAME: &[u8] = b"user.cairn.content\0";
const VERSION: &str = "cairn-stamp-1";
/// Longest stamp value read.
const MAX_LEN: usize = 512;

/// A file's identity as a stamp records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl Identity {
    fn of(path: &Path) -> Option<Identity> {
        let meta = std::fs::metadata(path).ok()?;
        meta.is_file().then(|| Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }
}

fn c_path(path: &Path) -> Option<CString> {
    CString::new(path.as_os_str().as_bytes()).ok()
}

fn value(lineage: &str, rp: &str, id: Identity) -> String {
    format!(
        "{VERSION} {lineage} {rp} {} {} {} {}",
        id.dev, id.ino, id.size, id.mtime_ns
    )
}

/// The recovery point of `lineage` that `path` holds, when its stamp is valid.
pub fn current(path: &Path, lineage: &str) -> Option<String> {
    let c = c_path(path)?;
    let mut buf = vec![0u8; MAX_LEN];
    // SAFETY: `c` and `NAME` are NUL-terminated; `buf` has `buf.len()` writable bytes.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            NAME.as_ptr().cast(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n <= 0 {
        return None;
    }
    let text = std::str::from_utf8(&buf[..n as usize]).ok()?;
    let parts: Vec<&str> = text.split(' ').collect();
    let [version, stamped_lineage, rp, dev, ino, size, mtime_ns] = parts.as_slice() else {
        return None;
    };
    let stamped = Identity {
        dev: dev.parse().ok()?,
        ino: ino.parse().ok()?,
        size: size.parse().ok()?,
        mtime_ns: mtime_ns.parse().ok()?,
    };
    let valid = *version == VERSION
        && *stamped_lineage == lineage
        && !rp.is_empty()
        && rp.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        && Identity::of(path) == Some(stamped);
    valid.then(|| (*rp).to_string())
}

/// Removes `path`'s stamp (before it is written to).
pub fn clear(path: &Path) {
    if let Some(c) = c_path(path) {
        // SAFETY: both strings are NUL-terminated.
        unsafe { libc::removexattr(c.as_ptr(), NAME.as_ptr().cast()) };
    }
}

/// Records that `path` holds recovery point `rp` of `lineage`. Call after the content is
/// durable. Best effort: returns whether the stamp was written.
pub fn write(path: &Path, lineage: &str, rp: &str) -> bool {
    // Let the coarse clock that stamps mtimes move past the last write.
    std::thread::sleep(std::time::Duration::from_millis(25));
    stamp_as(path, lineage, rp, None)
}

/// Records the stamp only if the file still has the identity it had when `then_mtime_ns` was
/// read (a backup read it unchanged).
pub fn write_if_unchanged(path: &Path, lineage: &str, rp: &str, then_mtime_ns: i128) -> bool {
    stamp_as(path, lineage, rp, Some(then_mtime_ns))
}

fn stamp_as(path: &Path, lineage: &str, rp: &str, mtime_ns: Option<i128>) -> bool {
    let Some(id) = Identity::of(path) else {
        return false;
    };
    if mtime_ns.is_some_and(|t| t != id.mtime_ns) {
        return false;
    }
    let Some(c) = c_path(path) else {
        return false;
    };
    let text = value(lineage, rp, id);
    // SAFETY: `c` and `NAME` are NUL-terminated; `text` has `text.len()` readable bytes.
    let rc = unsafe {
        libc::setxattr(
            c.as_ptr(),
            NAME.as_ptr().cast(),
            text.as_ptr().cast(),
            text.len(),
            0,
        )
    };
    if rc != 0 {
        tracing::debug!(path = %path.display(), error = %std::io::Error::last_os_error(),
            "content stamp not written");
    }
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_holds_until_the_file_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![1u8; 4096]).unwrap();
        if !write(&path, "vm.disk0", "0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d00") {
            // No user xattrs on this file system: stamps are best effort.
            assert_eq!(current(&path, "vm.disk0"), None);
            return;
        }
        assert_eq!(
            current(&path, "vm.disk0").as_deref(),
            Some("0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d00")
        );
        assert_eq!(current(&path, "vm.disk1"), None, "another lineage");
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[2], 100).unwrap();
        drop(file);
        assert_eq!(current(&path, "vm.disk0"), None, "written after the stamp");
        assert!(write(
            &path,
            "vm.disk0",
            "0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d01"
        ));
        clear(&path);
        assert_eq!(current(&path, "vm.disk0"), None);
    }
}
