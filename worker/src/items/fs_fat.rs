//! FAT12/16/32 volumes (long names included) through the `fatfs` crate, opened over a
//! write-refusing [`Slice`]. Names are matched exactly first, then ASCII case-insensitively as
//! FAT does. Never writes: the slice refuses every write.
//!
//! FAT has no hard links, but a damaged or hostile one can still make a folder its own child
//! (an entry whose first cluster is an ancestor's, or 0, the root) or cross-link two folders,
//! and can make a folder's cluster chain loop back on itself. `fatfs` hides cluster numbers,
//! so both are found through where reads land on the volume ([`ReadProbe`]): a folder's
//! [`NodeId::FatData`] is where the first read of its entries starts (its first cluster, or the
//! FAT12/16 root area), and a listing whose reads come back to a position already read stops
//! as damaged instead of repeating its entries until the entry limit.

use std::collections::HashSet;
use std::io::Read;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use super::slice::{ReadProbe, Slice};
use super::{Error, Node, NodeId, NodeKind, Tree, display_path as display};

type Fs = fatfs::FileSystem<Slice>;
type Dir<'a> = fatfs::Dir<'a, Slice>;
type Entry<'a> = fatfs::DirEntry<'a, Slice>;

pub(super) struct FatTree {
    fs: Fs,
    /// Watches the reads `fs` makes through its slice.
    probe: Arc<ReadProbe>,
}

fn damaged(path: &[Vec<u8>], e: std::io::Error) -> Error {
    Error::Damaged(format!("FAT {}: {e}", display(path)))
}

/// Unix seconds of a FAT timestamp (FAT stores local time without a zone; it is read as
/// UTC), or `None` for a date that does not exist.
fn fat_unix_secs(m: &fatfs::DateTime) -> Option<i64> {
    let civil = jiff::civil::DateTime::new(
        i16::try_from(m.date.year).ok()?,
        i8::try_from(m.date.month).ok()?,
        i8::try_from(m.date.day).ok()?,
        i8::try_from(m.time.hour).ok()?,
        i8::try_from(m.time.min).ok()?,
        i8::try_from(m.time.sec).ok()?,
        0,
    )
    .ok()?;
    civil
        .to_zoned(jiff::tz::TimeZone::UTC)
        .ok()
        .map(|z| z.timestamp().as_second())
}

fn node(entry: &Entry<'_>) -> Node {
    let mut node = Node::new(
        entry.file_name().into_bytes(),
        if entry.is_dir() {
            NodeKind::Dir
        } else {
            NodeKind::File
        },
    );
    node.size = if entry.is_dir() { 0 } else { entry.len() };
    node.mtime = fat_unix_secs(&entry.modified());
    let read_only = entry
        .attributes()
        .contains(fatfs::FileAttributes::READ_ONLY);
    node.mode = Some(match (entry.is_dir(), read_only) {
        (true, _) => 0o755,
        (false, true) => 0o444,
        (false, false) => 0o644,
    });
    node
}

impl FatTree {
    pub(super) fn open(slice: Slice) -> Result<FatTree, Error> {
        let probe = slice.probe();
        let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new())
            .map_err(|e| Error::Damaged(format!("FAT boot sector: {e}")))?;
        Ok(FatTree { fs, probe })
    }

    /// The identity of folder `dir`: where the first read of its entries lands. `None` when
    /// nothing could be read (the driver failing on a cluster number outside the volume
    /// included); the walk then bounds the folder by the depth limit alone.
    fn folder_id(probe: &ReadProbe, dir: &Dir<'_>) -> Option<NodeId> {
        probe.arm();
        let read = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let _ = dir.iter().next();
        }));
        let at = probe.take();
        read.ok().and(at).map(NodeId::FatData)
    }

    /// Visits the entries of `dir` (`.` and `..` included) until `f` returns `true`, at most
    /// `max` of them. Where each entry's reads start is watched: coming back to a position
    /// means the cluster chain loops, and the folder is damaged.
    fn each_entry<'a>(
        probe: &ReadProbe,
        dir: &Dir<'a>,
        at: &[Vec<u8>],
        max: u64,
        mut f: impl FnMut(Entry<'a>) -> bool,
    ) -> Result<(), Error> {
        let mut iter = dir.iter();
        let mut read_at = HashSet::new();
        for i in 0.. {
            probe.arm();
            let next = iter.next();
            if let Some(pos) = probe.take()
                && !read_at.insert(pos)
            {
                return Err(damaged(
                    at,
                    std::io::Error::other(format!(
                        "the folder's cluster chain loops back to byte {pos}"
                    )),
                ));
            }
            let Some(entry) = next else {
                return Ok(());
            };
            if i >= max {
                return Err(Error::Limit {
                    what: format!("entries of folder {}", display(at)),
                    limit: max,
                });
            }
            if f(entry.map_err(|e| damaged(at, e))?) {
                return Ok(());
            }
        }
        Ok(())
    }

    fn find<'a>(
        probe: &ReadProbe,
        dir: &Dir<'a>,
        name: &[u8],
        max: u64,
        at: &[Vec<u8>],
    ) -> Result<Option<Entry<'a>>, Error> {
        let mut exact = None;
        let mut loose = None;
        Self::each_entry(probe, dir, at, max, |entry| {
            let entry_name = entry.file_name();
            if entry_name.as_bytes() == name {
                exact = Some(entry);
                return true;
            }
            if loose.is_none() && entry_name.as_bytes().eq_ignore_ascii_case(name) {
                loose = Some(entry);
            }
            false
        })?;
        Ok(exact.or(loose))
    }

    /// The entry at `path` (`None` = the root folder).
    fn walk(&self, path: &[Vec<u8>]) -> Result<Option<Entry<'_>>, Error> {
        let mut dir = self.fs.root_dir();
        let mut found = None;
        for (i, comp) in path.iter().enumerate() {
            let at = &path[..=i];
            let entry = Self::find(
                &self.probe,
                &dir,
                comp,
                super::Limits::default().max_dir_entries,
                &path[..i],
            )?
            .ok_or_else(|| Error::NotFound { path: display(at) })?;
            if i + 1 < path.len() {
                if !entry.is_dir() {
                    return Err(Error::NotADirectory { path: display(at) });
                }
                dir = entry.to_dir();
            }
            found = Some(entry);
        }
        Ok(found)
    }
}

impl Tree for FatTree {
    fn list(&mut self, dir_path: &[Vec<u8>], max: u64) -> Result<Vec<Node>, Error> {
        let dir = match self.walk(dir_path)? {
            None => self.fs.root_dir(),
            Some(e) if e.is_dir() => e.to_dir(),
            Some(_) => {
                return Err(Error::NotADirectory {
                    path: display(dir_path),
                });
            }
        };
        let mut entries = Vec::new();
        // `.` and `..` count towards the limit here; the two extra entries do not matter.
        Self::each_entry(
            &self.probe,
            &dir,
            dir_path,
            max.saturating_add(2),
            |entry| {
                let name = entry.file_name();
                if name != "." && name != ".." {
                    entries.push(entry);
                }
                false
            },
        )?;
        if entries.len() as u64 > max {
            return Err(Error::Limit {
                what: format!("entries of folder {}", display(dir_path)),
                limit: max,
            });
        }
        Ok(entries
            .iter()
            .map(|entry| {
                let mut n = node(entry);
                if entry.is_dir() {
                    n.id = Self::folder_id(&self.probe, &entry.to_dir());
                }
                n
            })
            .collect())
    }

    fn stat(&mut self, path: &[Vec<u8>]) -> Result<Node, Error> {
        Ok(match self.walk(path)? {
            None => {
                let mut n = Node::new(b"/".to_vec(), NodeKind::Dir);
                n.mode = Some(0o755);
                n.id = Self::folder_id(&self.probe, &self.fs.root_dir());
                n
            }
            Some(entry) => {
                let mut n = node(&entry);
                if entry.is_dir() {
                    n.id = Self::folder_id(&self.probe, &entry.to_dir());
                }
                n
            }
        })
    }

    fn read_file(
        &mut self,
        path: &[Vec<u8>],
        max: u64,
        out: &mut dyn FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<u64, Error> {
        let entry = self.walk(path)?.ok_or_else(|| Error::NotFound {
            path: display(path),
        })?;
        if !entry.is_file() {
            return Err(Error::NotFound {
                path: display(path),
            });
        }
        if entry.len() > max {
            return Err(Error::Limit {
                what: format!("size of {}", display(path)),
                limit: max,
            });
        }
        let mut file = entry.to_file();
        super::copy_bounded(
            path,
            max,
            |buf| file.read(buf).map_err(|e| damaged(path, e)),
            out,
        )
    }

    fn read_link(&mut self, path: &[Vec<u8>]) -> Result<Vec<u8>, Error> {
        Err(Error::Unsupported {
            volume: display(path),
            reason: "FAT has no symbolic links".into(),
        })
    }
}
