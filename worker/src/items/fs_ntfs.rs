//! NTFS volumes through the `ntfs` crate (read-only). Lists the Win32/POSIX names of folder
//! indexes (DOS 8.3 aliases and the system metafiles `$MFT`, … are hidden), reads the unnamed
//! `$DATA` stream of files; reparse points (links, junctions) are listed as special and never
//! followed. Folders carry their file record number as [`NodeId::NtfsRecord`]. Never writes.

use std::io::Read;

use ntfs::structured_values::{NtfsFileAttributeFlags, NtfsFileName, NtfsFileNamespace};
use ntfs::{Ntfs, NtfsFile};

use super::slice::Slice;
use super::{Error, Node, NodeId, NodeKind, Tree, display_path as display};

/// File record numbers below this are NTFS's own metafiles.
const FIRST_USER_RECORD: u64 = 24;
/// 100 ns intervals between 1601-01-01 and 1970-01-01.
const NT_EPOCH_OFFSET: u64 = 116_444_736_000_000_000;

pub(super) struct NtfsTree {
    ntfs: Ntfs,
    io: Slice,
}

fn damaged(path: &[Vec<u8>], e: impl std::fmt::Display) -> Error {
    Error::Damaged(format!("NTFS {}: {e}", display(path)))
}

/// The node of index key `key`, an entry for file record `record`.
fn node(key: &NtfsFileName, record: u64) -> Node {
    let attrs = key.file_attributes();
    let kind = if attrs.contains(NtfsFileAttributeFlags::REPARSE_POINT) {
        NodeKind::Special
    } else if key.is_directory() {
        NodeKind::Dir
    } else {
        NodeKind::File
    };
    let mut node = Node::new(key.name().to_string_lossy().into_bytes(), kind);
    node.size = if kind == NodeKind::File {
        key.data_size()
    } else {
        0
    };
    let t = key.modification_time().nt_timestamp();
    node.mtime = Some((t.saturating_sub(NT_EPOCH_OFFSET) / 10_000_000) as i64);
    node.mode = Some(
        match (kind, attrs.contains(NtfsFileAttributeFlags::READ_ONLY)) {
            (NodeKind::Dir, _) => 0o755,
            (_, true) => 0o444,
            _ => 0o644,
        },
    );
    if kind == NodeKind::Dir {
        node.id = Some(NodeId::NtfsRecord(record));
    }
    node
}

fn root_node(record: u64) -> Node {
    let mut n = Node::new(b"/".to_vec(), NodeKind::Dir);
    n.mode = Some(0o755);
    n.id = Some(NodeId::NtfsRecord(record));
    n
}

impl NtfsTree {
    pub(super) fn open(mut io: Slice) -> Result<NtfsTree, Error> {
        let ntfs = Ntfs::new(&mut io).map_err(|e| damaged(&[], e))?;
        Ok(NtfsTree { ntfs, io })
    }

    /// Visits the user-visible entries of folder `dir` (`f` returns `true` to stop).
    fn each_entry(
        ntfs: &Ntfs,
        io: &mut Slice,
        dir: &NtfsFile<'_>,
        at: &[Vec<u8>],
        max: u64,
        f: &mut dyn FnMut(&NtfsFileName, u64) -> bool,
    ) -> Result<(), Error> {
        let _ = ntfs;
        let index = dir.directory_index(io).map_err(|e| damaged(at, e))?;
        let mut entries = index.entries();
        let mut seen = 0u64;
        while let Some(entry) = entries.next(io) {
            seen += 1;
            if seen > max {
                return Err(Error::Limit {
                    what: format!("entries of folder {}", display(at)),
                    limit: max,
                });
            }
            let entry = entry.map_err(|e| damaged(at, e))?;
            let record = entry.file_reference().file_record_number();
            let Some(key) = entry.key() else { continue };
            let key: NtfsFileName = key.map_err(|e| damaged(at, e))?;
            if key.namespace() == NtfsFileNamespace::Dos || record < FIRST_USER_RECORD {
                continue;
            }
            if f(&key, record) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The file at `path` and its index key (`None` for the root).
    fn walk(&mut self, path: &[Vec<u8>]) -> Result<(NtfsFile<'_>, Option<NtfsFileName>), Error> {
        let ntfs = &self.ntfs;
        let io = &mut self.io;
        let mut file = ntfs.root_directory(io).map_err(|e| damaged(&[], e))?;
        let mut key = None;
        for (i, comp) in path.iter().enumerate() {
            let at = &path[..i];
            if !file.is_directory() {
                return Err(Error::NotADirectory { path: display(at) });
            }
            let wanted = String::from_utf8_lossy(comp).into_owned();
            let mut exact = None;
            let mut loose = None;
            Self::each_entry(
                ntfs,
                io,
                &file,
                at,
                super::Limits::default().max_dir_entries,
                &mut |k, record| {
                    let name = k.name().to_string_lossy();
                    if name == wanted {
                        exact = Some((k.clone(), record));
                        return true;
                    }
                    if loose.is_none() && name.eq_ignore_ascii_case(&wanted) {
                        loose = Some((k.clone(), record));
                    }
                    false
                },
            )?;
            let (k, record) = exact.or(loose).ok_or_else(|| Error::NotFound {
                path: display(&path[..=i]),
            })?;
            file = ntfs.file(io, record).map_err(|e| damaged(&path[..=i], e))?;
            key = Some(k);
        }
        Ok((file, key))
    }
}

impl Tree for NtfsTree {
    fn list(&mut self, dir: &[Vec<u8>], max: u64) -> Result<Vec<Node>, Error> {
        let (file, _) = self.walk(dir)?;
        if !file.is_directory() {
            return Err(Error::NotADirectory { path: display(dir) });
        }
        // `walk` borrowed self; list with a fresh borrow of the parts.
        let record = file.file_record_number();
        let ntfs = &self.ntfs;
        let io = &mut self.io;
        let file = ntfs.file(io, record).map_err(|e| damaged(dir, e))?;
        let mut out = Vec::new();
        Self::each_entry(ntfs, io, &file, dir, max, &mut |k, record| {
            if k.name().to_string_lossy() != "." {
                out.push(node(k, record));
            }
            false
        })?;
        out.sort_by(|a, b| a.raw_name.cmp(&b.raw_name));
        out.dedup_by(|a, b| a.raw_name == b.raw_name);
        Ok(out)
    }

    fn stat(&mut self, path: &[Vec<u8>]) -> Result<Node, Error> {
        let (file, key) = self.walk(path)?;
        let record = file.file_record_number();
        Ok(match key {
            Some(key) => node(&key, record),
            None => root_node(record),
        })
    }

    fn read_file(
        &mut self,
        path: &[Vec<u8>],
        max: u64,
        out: &mut dyn FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<u64, Error> {
        let (file, _) = self.walk(path)?;
        let record = file.file_record_number();
        let ntfs = &self.ntfs;
        let io = &mut self.io;
        let file = ntfs.file(io, record).map_err(|e| damaged(path, e))?;
        let Some(item) = file.data(io, "") else {
            return Ok(0);
        };
        let item = item.map_err(|e| damaged(path, e))?;
        let attribute = item.to_attribute().map_err(|e| damaged(path, e))?;
        let value = attribute.value(io).map_err(|e| damaged(path, e))?;
        let len = value.len();
        if len > max {
            return Err(Error::Limit {
                what: format!("size of {}", display(path)),
                limit: max,
            });
        }
        let mut reader = value.attach(io);
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        while total < len {
            let want = buf.len().min((len - total) as usize);
            let n = reader
                .read(&mut buf[..want])
                .map_err(|e| damaged(path, e))?;
            if n == 0 {
                return Err(damaged(
                    path,
                    format!("data ends at {total} of {len} bytes"),
                ));
            }
            total += n as u64;
            out(&buf[..n])?;
        }
        Ok(total)
    }

    fn read_link(&mut self, path: &[Vec<u8>]) -> Result<Vec<u8>, Error> {
        Err(Error::Unsupported {
            volume: display(path),
            reason: "NTFS reparse points are not followed".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn nt_epoch_offset_is_1970() {
        assert_eq!(super::NT_EPOCH_OFFSET / 10_000_000, 11_644_473_600);
    }
}
