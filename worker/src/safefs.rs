//! Writes below a trusted folder through directory descriptors, never through path strings.
//!
//! A [`Dir`] is an open folder. Every name or relative path under it is resolved by the kernel
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, so no `..`,
//! absolute path, symlink or `/proc` magic link can lead outside it, whatever another process
//! renames or links in the meantime. New files are created `O_CREAT|O_EXCL|O_NOFOLLOW` (never
//! through an existing entry), new folders with `mkdirat` and fsynced into their parent,
//! temporary files get an unpredictable name (random suffix), and renames stay inside one
//! folder descriptor (`renameat2`, optionally `RENAME_NOREPLACE`).
//!
//! The folder a `Dir` is first opened from ([`Dir::open_root`]) is the node's own setting (a
//! recovery root): it is opened by path once, and everything after goes through descriptors.
//! A caller that must hand a file to another program (`qemu-img`, `qemu-nbd`) gives it
//! [`proc_path`] of the open descriptor, which names that very inode, not a path that could
//! be swapped.
//!
//! Linux only (openat2 is Linux 5.6+). Must not: resolve anything by path below a `Dir`, or
//! follow a link.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Why a descriptor-based operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path that cannot be resolved below a folder (absolute, `..`, empty, NUL).
    #[error("{path}: {reason}")]
    BadPath {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// The kernel refused or failed the operation.
    #[error("{path}: {source}")]
    Io {
        /// The path, for humans (root + relative path).
        path: PathBuf,
        /// What failed. `ELOOP`/`EXDEV` mean a symlink or an escape was refused.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The IO error kind, when there is one.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            Error::Io { source, .. } => Some(source.kind()),
            Error::BadPath { .. } => None,
        }
    }

    /// Whether the kernel refused to follow a symlink or leave the folder (`ELOOP`, `EXDEV`).
    pub fn is_escape(&self) -> bool {
        matches!(self, Error::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ELOOP) | Some(libc::EXDEV)))
    }
}

const RESOLVE: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

/// An open folder; everything below it is reached through its descriptor.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    /// Where it is, for messages only (never used to open anything).
    shown: PathBuf,
}

/// What is at a name in a folder (not following a link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Nothing.
    Missing,
    /// A folder.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A device, fifo or socket.
    Other,
}

fn cstring(path: &Path, shown: &Path) -> Result<CString, Error> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::BadPath {
        path: shown.to_path_buf(),
        reason: "contains a NUL byte",
    })
}

/// Checks that `rel` is a relative path of plain names (no `..`, no root, no `.` after the
/// first component) and returns its names.
pub fn plain_components(rel: &Path) -> Result<Vec<&OsStr>, Error> {
    let mut names = Vec::new();
    for component in rel.components() {
        match component {
            Component::Normal(name) => names.push(name),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(Error::BadPath {
                    path: rel.to_path_buf(),
                    reason: "contains `..`",
                });
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(Error::BadPath {
                    path: rel.to_path_buf(),
                    reason: "is not a relative path",
                });
            }
        }
    }
    Ok(names)
}

fn last_error(path: &Path) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::last_os_error(),
    }
}

/// `openat2(dirfd, rel, flags, mode)` with [`RESOLVE`].
fn openat2(
    dir: BorrowedFd<'_>,
    rel: &Path,
    flags: i32,
    mode: u32,
    shown: &Path,
) -> Result<OwnedFd, Error> {
    let name = cstring(rel, shown)?;
    // SAFETY: open_how is a plain C struct; zeroed is a valid value for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        u64::from(mode)
    } else {
        0
    };
    how.resolve = RESOLVE;
    loop {
        // SAFETY: `name` is NUL-terminated and `how` lives across the call; the size passed is
        // the size of the struct passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                name.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if rc >= 0 {
            // SAFETY: the kernel returned a new descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) });
        }
        let err = std::io::Error::last_os_error();
        // EAGAIN: a concurrent rename somewhere in the file system; the kernel asks to retry.
        if err.raw_os_error() != Some(libc::EAGAIN) {
            return Err(Error::Io {
                path: shown.to_path_buf(),
                source: err,
            });
        }
    }
}

impl Dir {
    /// Opens a trusted folder (a root from the node's settings) by path. It must be a folder;
    /// a symlink to one is followed only here, for the root itself.
    pub fn open_root(path: &Path) -> Result<Dir, Error> {
        let c = cstring(path, path)?;
        // SAFETY: `c` is NUL-terminated and lives across the call.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(last_error(path));
        }
        Ok(Dir {
            // SAFETY: a new descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            shown: path.to_path_buf(),
        })
    }

    /// Where this folder is, for messages.
    pub fn shown(&self) -> &Path {
        &self.shown
    }

    /// The path of `rel` below this folder, for messages.
    pub fn shown_join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.shown.join(rel)
    }

    /// Opens the existing folder `rel` below this one.
    pub fn open_dir(&self, rel: &Path) -> Result<Dir, Error> {
        let shown = self.shown.join(rel);
        plain_components(rel)?;
        if rel.as_os_str().is_empty() {
            return self.try_clone();
        }
        let fd = openat2(
            self.fd.as_fd(),
            rel,
            // RESOLVE_NO_SYMLINKS refuses a link anywhere, the last name included (ELOOP).
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
            &shown,
        )?;
        Ok(Dir { fd, shown })
    }

    /// A second descriptor of this folder.
    pub fn try_clone(&self) -> Result<Dir, Error> {
        Ok(Dir {
            fd: self.fd.try_clone().map_err(|source| Error::Io {
                path: self.shown.clone(),
                source,
            })?,
            shown: self.shown.clone(),
        })
    }

    /// Opens folder `rel` below this one, creating each missing folder (mode 0700) and
    /// fsyncing it into its parent. Whether anything was created is returned too.
    pub fn create_dirs(&self, rel: &Path) -> Result<Dir, Error> {
        let mut dir = self.try_clone()?;
        for name in plain_components(rel)? {
            dir = match dir.mkdir(Path::new(name)) {
                Ok(child) => child,
                Err(e) if e.io_kind() == Some(std::io::ErrorKind::AlreadyExists) => {
                    dir.open_dir(Path::new(name))?
                }
                Err(e) => return Err(e),
            };
        }
        Ok(dir)
    }

    /// Creates the new folder `name` (mode 0700; an existing entry is `AlreadyExists`), fsyncs
    /// this folder so the new entry is durable, and opens it.
    pub fn mkdir(&self, name: &Path) -> Result<Dir, Error> {
        self.mkdir_mode(name, crate::perms::DIR_MODE)
    }

    /// [`Dir::mkdir`] with a mode (the umask may tighten it).
    pub fn mkdir_mode(&self, name: &Path, mode: u32) -> Result<Dir, Error> {
        let shown = self.shown.join(name);
        self.single_name(name)?;
        let c = cstring(name, &shown)?;
        // SAFETY: `c` is NUL-terminated; the descriptor is ours and open.
        if unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) } != 0 {
            return Err(last_error(&shown));
        }
        self.sync()?;
        self.open_dir(name)
    }

    /// Refuses a name that is not one plain component.
    fn single_name(&self, name: &Path) -> Result<(), Error> {
        let names = plain_components(name)?;
        if names.len() != 1 || name.as_os_str().as_bytes().contains(&b'/') {
            return Err(Error::BadPath {
                path: self.shown.join(name),
                reason: "is not a single file name",
            });
        }
        Ok(())
    }

    /// Creates the new file `name` (`O_CREAT|O_EXCL|O_NOFOLLOW`, read-write, mode `mode`).
    pub fn create_new(&self, name: &Path, mode: u32) -> Result<File, Error> {
        let shown = self.shown.join(name);
        self.single_name(name)?;
        let fd = openat2(
            self.fd.as_fd(),
            name,
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            mode,
            &shown,
        )?;
        Ok(File::from(fd))
    }

    /// Opens the existing regular file `rel` (read-write if `writable`), not through a link.
    pub fn open_file(&self, rel: &Path, writable: bool) -> Result<File, Error> {
        let shown = self.shown.join(rel);
        plain_components(rel)?;
        let access = if writable {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        let fd = openat2(self.fd.as_fd(), rel, access | libc::O_NOFOLLOW, 0, &shown)?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(|source| Error::Io {
            path: shown.clone(),
            source,
        })?;
        if !meta.file_type().is_file() {
            return Err(Error::BadPath {
                path: shown,
                reason: "is not a regular file",
            });
        }
        Ok(file)
    }

    /// What is at `name` in this folder, without following a link.
    pub fn entry(&self, name: &Path) -> Result<Entry, Error> {
        let shown = self.shown.join(name);
        self.single_name(name)?;
        let c = cstring(name, &shown)?;
        // SAFETY: zeroed is a valid `stat`; the kernel fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, NUL-terminated name, `st` lives across the call.
        let rc = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::NotFound {
                return Ok(Entry::Missing);
            }
            return Err(Error::Io {
                path: shown,
                source: err,
            });
        }
        Ok(match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => Entry::Dir,
            libc::S_IFREG => Entry::File,
            libc::S_IFLNK => Entry::Symlink,
            _ => Entry::Other,
        })
    }

    /// Renames `from` to `to`, both in this folder; with `no_replace` an existing `to` is
    /// `AlreadyExists` instead of being replaced.
    pub fn rename(&self, from: &Path, to: &Path, no_replace: bool) -> Result<(), Error> {
        let shown = self.shown.join(to);
        self.single_name(from)?;
        self.single_name(to)?;
        let from_c = cstring(from, &shown)?;
        let to_c = cstring(to, &shown)?;
        let flags = if no_replace {
            libc::RENAME_NOREPLACE
        } else {
            0
        };
        // SAFETY: valid descriptors and NUL-terminated names that live across the call.
        let rc = unsafe {
            libc::renameat2(
                self.fd.as_raw_fd(),
                from_c.as_ptr(),
                self.fd.as_raw_fd(),
                to_c.as_ptr(),
                flags,
            )
        };
        if rc != 0 {
            return Err(last_error(&shown));
        }
        Ok(())
    }

    /// Removes the file (or link) `name` from this folder.
    pub fn remove_file(&self, name: &Path) -> Result<(), Error> {
        let shown = self.shown.join(name);
        self.single_name(name)?;
        let c = cstring(name, &shown)?;
        // SAFETY: valid descriptor and NUL-terminated name.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            return Err(last_error(&shown));
        }
        Ok(())
    }

    /// Creates the symlink `name` pointing at `target` (the target is not resolved).
    pub fn symlink(&self, target: &OsStr, name: &Path) -> Result<(), Error> {
        let shown = self.shown.join(name);
        self.single_name(name)?;
        let c = cstring(name, &shown)?;
        let t = cstring(Path::new(target), &shown)?;
        // SAFETY: valid descriptor and NUL-terminated strings.
        if unsafe { libc::symlinkat(t.as_ptr(), self.fd.as_raw_fd(), c.as_ptr()) } != 0 {
            return Err(last_error(&shown));
        }
        Ok(())
    }

    /// Fsyncs this folder (its entries become durable).
    pub fn sync(&self) -> Result<(), Error> {
        // SAFETY: fsync of a descriptor we own.
        if unsafe { libc::fsync(self.fd.as_raw_fd()) } != 0 {
            return Err(last_error(&self.shown));
        }
        Ok(())
    }

    /// Writes `bytes` to `name` atomically and durably: a temporary file with a random name,
    /// fsync, rename over `name`, fsync of this folder.
    pub fn write_atomic(&self, name: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
        use std::io::Write;
        self.single_name(name)?;
        let tmp = temp_name(name);
        let shown = self.shown.join(&tmp);
        let result = (|| {
            let mut file = self.create_new(&tmp, mode)?;
            file.write_all(bytes)
                .and_then(|()| file.sync_all())
                .map_err(|source| Error::Io {
                    path: shown.clone(),
                    source,
                })?;
            drop(file);
            self.rename(&tmp, name, false)?;
            self.sync()
        })();
        if result.is_err() {
            let _ = self.remove_file(&tmp);
        }
        result
    }

    /// The raw descriptor (for `*at` calls by callers in this crate).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An unpredictable temporary name beside `name`: `.NAME.<16 random hex>.tmp`.
pub fn temp_name(name: &Path) -> PathBuf {
    let mut random = [0u8; 8];
    // A failing getrandom leaves zeros: the name is still exclusive (O_EXCL), only guessable.
    let _ = getrandom::getrandom(&mut random);
    PathBuf::from(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        hex::encode(random)
    ))
}

/// A path naming the open file itself for another process of the same user:
/// `/proc/<this pid>/fd/<fd>`. Opening it reaches the same inode however the name it was
/// created under has been renamed or replaced since.
pub fn proc_path(file: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        file.as_raw_fd()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> (tempfile::TempDir, Dir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_root(tmp.path()).unwrap();
        (tmp, dir)
    }

    #[test]
    fn creates_folders_and_files_below_the_root() {
        let (tmp, root) = root();
        let sub = root.create_dirs(Path::new("a/b")).unwrap();
        let again = root.create_dirs(Path::new("a/b")).unwrap();
        drop(again);
        sub.write_atomic(Path::new("f"), b"hello", 0o600).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("a/b/f")).unwrap(), b"hello");
        assert_eq!(sub.entry(Path::new("f")).unwrap(), Entry::File);
        assert_eq!(sub.entry(Path::new("nope")).unwrap(), Entry::Missing);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(tmp.path().join("a/b")).unwrap().collect();
        assert_eq!(names.len(), 1);
        let err = sub.create_new(Path::new("f"), 0o600).unwrap_err();
        assert_eq!(err.io_kind(), Some(std::io::ErrorKind::AlreadyExists));
    }

    #[test]
    fn refuses_dotdot_absolute_and_symlinks() {
        let (tmp, root) = root();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), b"keep").unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("victim"), tmp.path().join("flink"))
            .unwrap();
        assert!(matches!(
            root.open_dir(Path::new("../x")),
            Err(Error::BadPath { .. })
        ));
        assert!(matches!(
            root.open_dir(Path::new("/etc")),
            Err(Error::BadPath { .. })
        ));
        assert!(root.open_dir(Path::new("link")).unwrap_err().is_escape());
        assert!(
            root.create_dirs(Path::new("link/sub"))
                .unwrap_err()
                .is_escape()
        );
        assert!(
            root.open_file(Path::new("flink"), true)
                .unwrap_err()
                .is_escape()
        );
        assert!(
            root.open_file(Path::new("link/victim"), true)
                .unwrap_err()
                .is_escape()
        );
        let err = root.create_new(Path::new("flink"), 0o600).unwrap_err();
        assert_eq!(err.io_kind(), Some(std::io::ErrorKind::AlreadyExists));
        assert_eq!(root.entry(Path::new("flink")).unwrap(), Entry::Symlink);
        assert!(matches!(
            root.create_new(Path::new("a/b"), 0o600),
            Err(Error::BadPath { .. })
        ));
        assert_eq!(
            std::fs::read(outside.path().join("victim")).unwrap(),
            b"keep"
        );
        assert!(!outside.path().join("sub").exists());
    }

    #[test]
    fn renames_without_replacing() {
        let (tmp, root) = root();
        drop(root.create_new(Path::new("a"), 0o600).unwrap());
        drop(root.create_new(Path::new("b"), 0o600).unwrap());
        let err = root
            .rename(Path::new("a"), Path::new("b"), true)
            .unwrap_err();
        assert_eq!(err.io_kind(), Some(std::io::ErrorKind::AlreadyExists));
        root.rename(Path::new("a"), Path::new("c"), true).unwrap();
        assert!(tmp.path().join("c").exists());
        root.symlink(OsStr::new("c"), Path::new("l")).unwrap();
        assert_eq!(
            std::fs::read_link(tmp.path().join("l")).unwrap(),
            Path::new("c")
        );
    }

    #[test]
    fn temp_names_differ() {
        assert_ne!(temp_name(Path::new("x")), temp_name(Path::new("x")));
    }

    #[test]
    fn proc_path_reaches_the_open_file() {
        let (tmp, root) = root();
        let file = root.create_new(Path::new("img"), 0o600).unwrap();
        std::fs::rename(tmp.path().join("img"), tmp.path().join("moved")).unwrap();
        std::fs::write(proc_path(&file), b"through the descriptor").unwrap();
        assert_eq!(
            std::fs::read(tmp.path().join("moved")).unwrap(),
            b"through the descriptor"
        );
    }
}
