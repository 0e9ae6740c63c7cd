//! Writes items of an image's file system below a target folder, treating every name, link
//! target, size and count from the image as hostile.
//!
//! - Names must be 1–255 bytes, not `.`/`..`, without `/` or NUL; anything else is skipped and
//!   reported.
//! - Everything goes through folder descriptors ([`crate::safefs`]): the target folder is one
//!   open descriptor, each folder is made with `mkdirat` and opened with `openat2`
//!   (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`) from its parent's, and no path string is ever
//!   resolved. Files are written under a temporary name with a random suffix
//!   (`.cairn-partial-….tmp`, created with `O_CREAT|O_EXCL|O_NOFOLLOW`) and renamed into place
//!   with `renameat2(RENAME_NOREPLACE)` in their folder's descriptor. So nothing is ever written
//!   through an existing entry or a link, a crash never leaves a half-written file under an
//!   item's name, and a name that already exists is skipped and reported. We only descend into
//!   folders this run created. All of it is made durable by one `syncfs` at the end.
//! - A symlink is recreated only when its target is relative, made of leading `..` components
//!   that stay within the target folder followed by plain names; such a link resolves inside the
//!   target folder whatever the other links point to (each of them obeys the same rule). Others
//!   (absolute, escaping, `..` after a name) are skipped and reported. Links are never followed.
//! - Device nodes, fifos and sockets are skipped and reported.
//! - Permissions are capped (no set-uid/set-gid/sticky, no write for group or others; owners
//!   keep write access to folders) and set, with modification times, through the open file,
//!   never through a path.
//! - [`Limits`] bound entries, bytes and depth. A folder deeper than the depth limit, and a
//!   folder already entered for this item (one of its own ancestors, or a second name of a
//!   folder already extracted), is skipped and reported, never descended, and the walk goes on
//!   with the rest (see `walk`). Reaching the totals (entries, bytes) or the entries of one
//!   folder stops the extraction.

use std::fs::{File, FileTimes};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use super::walk::Visited;
use super::{Error, Limits, Node, NodeKind, Tree};
use crate::repo::Progress;
use crate::safefs::{self, Dir, Entry};

/// Something that was not extracted, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The item path inside the image.
    pub path: String,
    pub reason: String,
}

/// What an extraction did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExtractReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub skipped: Vec<Skipped>,
}

pub(super) struct Extractor<'p> {
    /// The target folder, open; everything is written below it through descriptors.
    root: Dir,
    limits: Limits,
    report: ExtractReport,
    entries: u64,
    /// The folders entered for the item being extracted; reset for each item.
    visited: Visited,
    progress: &'p dyn Progress,
}

/// Why `name` cannot be a file name in the target folder, if it cannot.
pub fn invalid_name(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty name")
    } else if name.len() > 255 {
        Some("name longer than 255 bytes")
    } else if name == b"." || name == b".." {
        Some("name is . or ..")
    } else if name.contains(&b'/') {
        Some("name contains /")
    } else if name.contains(&0) {
        Some("name contains a NUL byte")
    } else {
        None
    }
}

/// Whether a symlink at `depth` folders below the target root, pointing at `target`, stays
/// inside the root under the rule in the module docs.
pub fn link_stays_inside(target: &[u8], depth: usize) -> bool {
    if target.is_empty() || target.len() > 4095 || target.starts_with(b"/") || target.contains(&0) {
        return false;
    }
    let mut ups = 0usize;
    let mut seen_name = false;
    for comp in target.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." if seen_name => return false,
            b".." => ups += 1,
            _ => seen_name = true,
        }
    }
    ups <= depth
}

fn to_os(name: &[u8]) -> &std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(name)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.into(),
        source,
    }
}

fn safe_error(e: safefs::Error) -> Error {
    match e {
        safefs::Error::Io { path, source } => Error::Io { path, source },
        safefs::Error::BadPath { path, reason } => Error::BadTarget {
            path,
            reason: reason.into(),
        },
    }
}

/// The mode an extracted item gets: permission bits only (no set-uid, set-gid or sticky), no
/// write for group or others; folders stay usable by their owner.
pub fn capped_mode(mode: u32, dir: bool) -> u32 {
    let mode = mode & 0o755;
    if dir { mode | 0o700 } else { mode }
}

fn set_meta(file: &File, node: &Node, dir: bool) {
    if let Some(mode) = node.mode {
        let mode = capped_mode(mode, dir);
        if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(mode)) {
            tracing::debug!(error = %e, "could not set permissions");
        }
    }
    if let Some(mtime) = node.mtime.filter(|&t| t >= 0) {
        let t = UNIX_EPOCH + Duration::from_secs(mtime as u64);
        if let Err(e) = file.set_times(FileTimes::new().set_modified(t).set_accessed(t)) {
            tracing::debug!(error = %e, "could not set times");
        }
    }
}

impl<'p> Extractor<'p> {
    pub(super) fn new(
        root: Dir,
        limits: Limits,
        progress: &'p dyn Progress,
    ) -> Result<Extractor<'p>, Error> {
        Ok(Extractor {
            root,
            limits,
            report: ExtractReport::default(),
            entries: 0,
            visited: Visited::default(),
            progress,
        })
    }

    /// Makes everything written durable (one `syncfs` of the target's file system rather than
    /// an fsync per file) and returns the report.
    pub(super) fn finish(self) -> Result<ExtractReport, Error> {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs on a valid, owned descriptor has no memory-safety preconditions.
        if unsafe { libc::syncfs(self.root.as_fd().as_raw_fd()) } != 0 {
            return Err(io_error(self.root.shown())(std::io::Error::last_os_error()));
        }
        Ok(self.report)
    }

    fn skip(&mut self, path: &str, reason: impl Into<String>) {
        let reason = reason.into();
        tracing::warn!(path, %reason, "item skipped");
        self.report.skipped.push(Skipped {
            path: path.into(),
            reason,
        });
    }

    fn count(&mut self) -> Result<(), Error> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(Error::Limit {
                what: "number of extracted entries".into(),
                limit: self.limits.max_entries,
            });
        }
        if self.progress.cancelled() {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    /// Below an item, a file or folder the file system cannot give (damaged, or a name the
    /// driver refuses) is skipped and reported so the rest still comes out; limits, errors of
    /// the target and errors of the item itself stop the extraction.
    fn skip_or_fail(&mut self, shown: &str, depth: usize, e: Error) -> Result<(), Error> {
        match e {
            Error::Damaged(_)
            | Error::Read(_)
            | Error::NotFound { .. }
            | Error::Unsupported { .. }
                if depth > 0 =>
            {
                self.skip(shown, e.to_string());
                Ok(())
            }
            e => Err(e),
        }
    }

    /// Extracts the item at `src` (inside its volume) as `root/<name>`.
    pub(super) fn extract_item(
        &mut self,
        tree: &mut dyn Tree,
        item: &str,
        src: &[Vec<u8>],
        name: &[u8],
    ) -> Result<(), Error> {
        let node = tree.stat(src)?;
        let root = self.root.try_clone().map_err(safe_error)?;
        self.visited = Visited::default();
        self.copy(
            tree,
            item.trim_end_matches('/'),
            src.to_vec(),
            &node,
            name,
            &root,
            0,
        )
    }

    #[allow(clippy::too_many_arguments)] // reason: one recursive walk; a struct would only rename them
    fn copy(
        &mut self,
        tree: &mut dyn Tree,
        shown: &str,
        src: Vec<Vec<u8>>,
        node: &Node,
        name: &[u8],
        parent: &Dir,
        depth: usize,
    ) -> Result<(), Error> {
        if let Some(reason) = invalid_name(name) {
            self.skip(shown, reason);
            return Ok(());
        }
        self.count()?;
        let leaf = Path::new(to_os(name));
        let dest = parent.shown_join(leaf);
        match node.kind {
            NodeKind::File => {
                if node.size > self.limits.max_file_bytes {
                    self.skip(
                        shown,
                        format!(
                            "{} bytes is more than the file size limit {}",
                            node.size, self.limits.max_file_bytes
                        ),
                    );
                    return Ok(());
                }
                if self.report.bytes + node.size > self.limits.max_total_bytes {
                    return Err(Error::Limit {
                        what: "bytes extracted".into(),
                        limit: self.limits.max_total_bytes,
                    });
                }
                if parent.entry(leaf).map_err(safe_error)? != Entry::Missing {
                    self.skip(shown, format!("{} already exists", dest.display()));
                    return Ok(());
                }
                // Written under a temporary name and renamed into place without replacing, so
                // a crash never leaves a half-written file under the item's name.
                let partial_name = safefs::temp_name(Path::new("cairn-partial"));
                let partial = parent.shown_join(&partial_name);
                let mut file = parent
                    .create_new(&partial_name, crate::perms::FILE_MODE)
                    .map_err(safe_error)?;
                let budget = self
                    .limits
                    .max_file_bytes
                    .min(self.limits.max_total_bytes - self.report.bytes);
                let progress = self.progress;
                let written = {
                    let mut sink = |bytes: &[u8]| -> Result<(), Error> {
                        file.write_all(bytes).map_err(io_error(&partial))?;
                        progress.advance(bytes.len() as u64);
                        Ok(())
                    };
                    tree.read_file(&src, budget, &mut sink)
                };
                let written = match written {
                    Ok(n) => n,
                    Err(e) => {
                        drop(file);
                        let _ = parent.remove_file(&partial_name);
                        return self.skip_or_fail(shown, depth, e);
                    }
                };
                match parent.rename(&partial_name, leaf, true) {
                    Ok(()) => {}
                    Err(e) => {
                        let _ = parent.remove_file(&partial_name);
                        if e.io_kind() == Some(std::io::ErrorKind::AlreadyExists) {
                            self.skip(shown, format!("{} already exists", dest.display()));
                            return Ok(());
                        }
                        return Err(safe_error(e));
                    }
                }
                set_meta(&file, node, false);
                self.report.files += 1;
                self.report.bytes += written;
            }
            NodeKind::Dir => {
                let decision = self
                    .visited
                    .decide(shown, node.id, depth, self.limits.max_depth);
                if let Some(reason) = decision.skip_reason() {
                    self.skip(shown, reason);
                    return Ok(());
                }
                // Made here (never an existing folder, never through a link) and opened from
                // its parent's descriptor; its mode is capped below once its content is in.
                let dir = match parent.mkdir_mode(leaf, crate::perms::DIR_MODE) {
                    Ok(dir) => dir,
                    Err(e) if e.io_kind() == Some(std::io::ErrorKind::AlreadyExists) => {
                        self.skip(shown, format!("{} already exists", dest.display()));
                        return Ok(());
                    }
                    Err(e) => return Err(safe_error(e)),
                };
                self.report.dirs += 1;
                self.visited.entered(shown, node.id);
                let children = match tree.list(&src, self.limits.max_dir_entries) {
                    Ok(children) => children,
                    Err(e) => return self.skip_or_fail(shown, depth, e),
                };
                for child in &children {
                    let mut child_src = src.clone();
                    child_src.push(child.raw_name.clone());
                    let child_shown = format!("{shown}/{}", child.name);
                    self.copy(
                        tree,
                        &child_shown,
                        child_src,
                        child,
                        &child.raw_name,
                        &dir,
                        depth + 1,
                    )?;
                }
                let dir_file =
                    File::from(dir.as_fd().try_clone_to_owned().map_err(io_error(&dest))?);
                set_meta(&dir_file, node, true);
            }
            NodeKind::Symlink => {
                let target = tree.read_link(&src)?;
                // Depth of the link's folder below the target root.
                let link_depth = depth;
                if !link_stays_inside(&target, link_depth) {
                    self.skip(
                        shown,
                        format!(
                            "symlink to {:?} would lead outside the target folder",
                            String::from_utf8_lossy(&target)
                        ),
                    );
                    return Ok(());
                }
                match parent.symlink(to_os(&target), leaf) {
                    Ok(()) => self.report.symlinks += 1,
                    Err(e) if e.io_kind() == Some(std::io::ErrorKind::AlreadyExists) => {
                        self.skip(shown, format!("{} already exists", dest.display()));
                    }
                    Err(e) => return Err(safe_error(e)),
                }
            }
            NodeKind::Special | NodeKind::Volume => {
                self.skip(
                    shown,
                    "device node, fifo, socket or reparse point: not extracted",
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b", &[b'x'; 256]] {
            assert!(invalid_name(bad).is_some(), "{bad:?}");
        }
        for good in [
            &b"hosts"[..],
            b"..hidden",
            b"a b",
            "ünï".as_bytes(),
            &[b'x'; 255],
        ] {
            assert!(invalid_name(good).is_none(), "{good:?}");
        }
    }

    #[test]
    fn links_must_stay_inside() {
        let cases: &[(&[u8], usize, bool)] = &[
            (b"hosts", 0, true),
            (b"../x", 0, false),
            (b"../x", 1, true),
            (b"../../x", 1, false),
            (b"/etc/passwd", 5, false),
            (b"a/../../x", 5, false),
            (b"a/./b", 0, true),
            (b"", 0, false),
            (b"..", 1, true),
            (b"s/..", 3, false),
        ];
        for &(target, depth, ok) in cases {
            assert_eq!(
                link_stays_inside(target, depth),
                ok,
                "{:?} at {depth}",
                String::from_utf8_lossy(target)
            );
        }
    }
}
