//! Small file-system helpers with the durability and permission rules of the repository: temp
//! file, fsync, rename, fsync of the folder; every file created 0600 and every folder 0700 (the
//! mode is given to `open`/`mkdir`, so there is no moment when others could open it; a umask can
//! only tighten it); and `flock`-based locks that die with their process.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{Error, io_err};

pub(crate) use crate::perms::{DIR_MODE, FILE_MODE};

/// Creates a new file for writing with mode [`FILE_MODE`]. A file already at `path` is a
/// dead writer's leftover under a name only this writer uses (see [`temp_path`]): it is
/// removed first, so the new file never inherits its mode.
pub(crate) fn create_file(path: &Path) -> Result<File, Error> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(path)
    };
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path).map_err(io_err(path))?;
            open().map_err(io_err(path))
        }
        other => other.map_err(io_err(path)),
    }
}

/// Creates `dir` and its missing parents with mode [`DIR_MODE`]; an existing folder keeps its
/// mode. Only for folders inside the repository, whose root exists already.
pub(crate) fn create_dirs(dir: &Path) -> Result<(), Error> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io_err(dir))
}

/// Fsyncs a folder so that a rename or a new file in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// A temporary name beside `path` that no other writer uses (pid + counter).
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}-{n}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` atomically and durably.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = create_file(&tmp)?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        publish(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Renames a finished, fsynced temp file into place and fsyncs the folder.
pub(crate) fn publish(tmp: &Path, path: &Path) -> Result<(), Error> {
    std::fs::rename(tmp, path).map_err(io_err(path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Removes leftover temp files of dead writers in `dir`. Call only while holding the lock that
/// excludes every writer of that folder.
pub(crate) fn remove_temp_files(dir: &Path) -> Result<usize, Error> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => {
            return Err(Error::Io {
                path: dir.into(),
                source: e,
            });
        }
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") {
            std::fs::remove_file(entry.path()).map_err(io_err(entry.path()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// How a lock is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockMode {
    Shared,
    Exclusive,
}

/// A held `flock`. Dropping it (or the process dying) releases it.
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    /// Takes the lock without waiting; `Ok(None)` when someone else holds it.
    pub(crate) fn try_lock(path: &Path, mode: LockMode) -> Result<Option<FileLock>, Error> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(FILE_MODE)
            .open(path)
            .map_err(io_err(path))?;
        let op = match mode {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        } | libc::LOCK_NB;
        // SAFETY: flock on a valid, owned file descriptor has no memory-safety preconditions.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(Some(FileLock { _file: file }));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(Error::Io {
                path: path.into(),
                source: err,
            })
        }
    }
}
