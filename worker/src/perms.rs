//! Private files and folders: the modes cairn gives what it keeps at rest (files 0600, folders
//! 0700), a process umask that can only tighten, and a private data folder.
//!
//! Modes are given when a file or folder is created (`open` with a mode, `DirBuilder::mode`),
//! never set by a `chmod` afterwards, so there is no moment when another user could open it.
//! This module knows nothing of repositories, jobs or keys; the repository's key file checks
//! are in [`crate::repo::config`].

use std::fs::DirBuilder;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The mode of every file cairn creates for itself: read and write for its owner only.
pub const FILE_MODE: u32 = 0o600;
/// The mode of every folder cairn creates for itself.
pub const DIR_MODE: u32 = 0o700;

/// Errors of this module, naming the folder concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is open to group or others (mode {mode:04o}) and owned by uid {owner}, not by \
         uid {euid} that runs cairn, so cairn cannot make it private: chmod 700 it"
    )]
    NotPrivate {
        path: PathBuf,
        mode: u32,
        owner: u32,
        euid: u32,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.into(),
        source,
    }
}

/// Adds group and others to the process's umask (`umask |= 0o077`), so that files made by
/// libraries and tools that take no mode (the event log's files, images built by `qemu-img`)
/// are private too. A stricter umask stays as it is. Returns the previous umask.
///
/// The umask is per process: every file the process creates afterwards, anywhere, is created
/// without group or others' permissions unless its mode is set explicitly.
pub fn restrict_umask() -> libc::mode_t {
    // SAFETY: umask has no preconditions and cannot fail. It is called twice to read and then
    // set the mask; a file another thread creates in between gets 0o077, which also keeps
    // group and others out.
    let old = unsafe { libc::umask(0o077) };
    // SAFETY: as above.
    unsafe { libc::umask(old | 0o077) };
    old
}

/// What [`private_dir`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrivateDir {
    /// The folder was created with mode 0700.
    Created,
    /// The folder existed and was private already.
    Existed,
    /// The folder existed with permissions for group or others (made by an older cairn or by
    /// hand); they were taken away. What it already held was visible until now.
    Restricted { from: u32 },
}

/// Makes sure `dir` exists and only its owner may enter it: a missing folder is created 0700
/// (missing parents get the usual mode, they are not cairn's); an existing one open to group or
/// others is restricted to its owner's bits when this process's user owns it, else refused.
pub fn private_dir(dir: &Path) -> Result<PrivateDir, Error> {
    match std::fs::metadata(dir) {
        Ok(meta) => {
            let mode = meta.mode() & 0o7777;
            if mode & 0o077 == 0 {
                return Ok(PrivateDir::Existed);
            }
            // SAFETY: geteuid has no preconditions and cannot fail.
            let euid = unsafe { libc::geteuid() };
            if meta.uid() != euid && euid != 0 {
                return Err(Error::NotPrivate {
                    path: dir.into(),
                    mode,
                    owner: meta.uid(),
                    euid,
                });
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o7700))
                .map_err(io_err(dir))?;
            Ok(PrivateDir::Restricted { from: mode })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            match DirBuilder::new().mode(DIR_MODE).create(dir) {
                Ok(()) => Ok(PrivateDir::Created),
                // Created by someone else meanwhile: check it as an existing one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => private_dir(dir),
                Err(e) => Err(io_err(dir)(e)),
            }
        }
        Err(e) => Err(io_err(dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dir_creates_restricts_and_keeps() {
        let root = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        let new = root.path().join("a/b/data");
        assert_eq!(private_dir(&new).unwrap(), PrivateDir::Created);
        assert_eq!(mode(&new) & 0o077, 0);
        assert_eq!(private_dir(&new).unwrap(), PrivateDir::Existed);
        let open = root.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            private_dir(&open).unwrap(),
            PrivateDir::Restricted { from: 0o755 }
        );
        assert_eq!(mode(&open), 0o700);
    }
}
