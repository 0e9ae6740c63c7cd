//! ext2/3/4 volumes through the `ext4-view` crate (read-only, checks metadata checksums). Maps
//! its errors onto [`Error`]; folders carry [`NodeId::Ext4Look`], a digest of their inode
//! metadata and entries (the crate does not give inode numbers). Never writes.

use std::hash::{DefaultHasher, Hash, Hasher};

use ext4_view::{Ext4, Ext4Error, Metadata};

use super::slice::Slice;
use super::{Error, Node, NodeId, NodeKind, Tree, display_path as display};

/// Entries of a folder that go into its digest: enough to tell folders apart, bounded so a
/// huge folder is not read twice in full.
const LOOK_ENTRIES: usize = 4096;

pub(super) struct Ext4Tree {
    fs: Ext4,
}

fn path_bytes(path: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(b'/');
    for (i, comp) in path.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(comp);
    }
    out
}

fn map_err(path: &[Vec<u8>], e: Ext4Error) -> Error {
    match e {
        Ext4Error::NotFound => Error::NotFound {
            path: display(path),
        },
        Ext4Error::NotADirectory => Error::NotADirectory {
            path: display(path),
        },
        Ext4Error::Io(e) => Error::Read(format!("{}: {e}", display(path))),
        Ext4Error::MalformedPath | Ext4Error::PathTooLong => Error::BadPath {
            path: display(path),
            reason: e.to_string(),
        },
        other => Error::Damaged(format!("ext4 {}: {other}", display(path))),
    }
}

fn node(name: Vec<u8>, meta: &Metadata) -> Node {
    let ft = meta.file_type();
    let kind = if ft.is_regular_file() {
        NodeKind::File
    } else if ft.is_dir() {
        NodeKind::Dir
    } else if ft.is_symlink() {
        NodeKind::Symlink
    } else {
        NodeKind::Special
    };
    let mut node = Node::new(name, kind);
    node.size = meta.len();
    node.mode = Some(u32::from(meta.mode()) & 0o7777);
    node.mtime = Some(meta.modified().seconds());
    node
}

impl Ext4Tree {
    pub(super) fn open(slice: Slice) -> Result<Ext4Tree, Error> {
        let fs = Ext4::load(Box::new(slice)).map_err(|e| match e {
            Ext4Error::Io(e) => Error::Read(format!("ext4 superblock: {e}")),
            other => Error::Damaged(format!("ext4: {other}")),
        })?;
        Ok(Ext4Tree { fs })
    }

    /// The identity of the folder at `path` whose metadata is `meta`: a digest of that
    /// metadata (all of the inode's times to the nanosecond, size, mode, owner) and of its
    /// first entries' names and types in on-disk order. A hard link to the folder reads the
    /// same inode and the same blocks, so it has the same digest. `None` when the folder cannot
    /// be read (then only the depth limit bounds it).
    fn look(&self, path: &[u8], meta: &Metadata) -> Option<NodeId> {
        let entries = self.fs.read_dir(path).ok()?;
        let mut digest = DefaultHasher::new();
        meta.hash(&mut digest);
        for entry in entries.take(LOOK_ENTRIES) {
            let entry = entry.ok()?;
            let name = entry.file_name();
            let name: &[u8] = name.as_ref();
            name.hash(&mut digest);
            entry.file_type().ok().hash(&mut digest);
        }
        Some(NodeId::Ext4Look(digest.finish()))
    }
}

impl Tree for Ext4Tree {
    fn list(&mut self, dir: &[Vec<u8>], max: u64) -> Result<Vec<Node>, Error> {
        let p = path_bytes(dir);
        let entries = self
            .fs
            .read_dir(p.as_slice())
            .map_err(|e| map_err(dir, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| map_err(dir, e))?;
            let file_name = entry.file_name();
            let name: &[u8] = file_name.as_ref();
            if name == b"." || name == b".." {
                continue;
            }
            if out.len() as u64 >= max {
                return Err(Error::Limit {
                    what: format!("entries of folder {}", display(dir)),
                    limit: max,
                });
            }
            let name = name.to_vec();
            let meta = entry.metadata().map_err(|e| map_err(dir, e))?;
            let mut child = node(name, &meta);
            if child.kind == NodeKind::Dir {
                let mut child_path = p.clone();
                if child_path.len() > 1 {
                    child_path.push(b'/');
                }
                child_path.extend_from_slice(&child.raw_name);
                child.id = self.look(&child_path, &meta);
            }
            out.push(child);
        }
        out.sort_by(|a, b| a.raw_name.cmp(&b.raw_name));
        Ok(out)
    }

    fn stat(&mut self, path: &[Vec<u8>]) -> Result<Node, Error> {
        let p = path_bytes(path);
        let meta = self
            .fs
            .symlink_metadata(p.as_slice())
            .map_err(|e| map_err(path, e))?;
        let mut found = node(path.last().cloned().unwrap_or_else(|| b"/".to_vec()), &meta);
        if found.kind == NodeKind::Dir {
            found.id = self.look(&p, &meta);
        }
        Ok(found)
    }

    fn read_file(
        &mut self,
        path: &[Vec<u8>],
        max: u64,
        out: &mut dyn FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<u64, Error> {
        let p = path_bytes(path);
        let mut file = self.fs.open(p.as_slice()).map_err(|e| map_err(path, e))?;
        super::copy_bounded(
            path,
            max,
            |buf| file.read_bytes(buf).map_err(|e| map_err(path, e)),
            out,
        )
    }

    fn read_link(&mut self, path: &[Vec<u8>]) -> Result<Vec<u8>, Error> {
        let p = path_bytes(path);
        let target = self
            .fs
            .read_link(p.as_slice())
            .map_err(|e| map_err(path, e))?;
        Ok(target.as_ref().to_vec())
    }
}
