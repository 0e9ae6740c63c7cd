//! ext2/3/4 volumes through the `ext4-view` crate (read-only, checks metadata checksums). Maps
//! its errors onto [`Error`]; folders carry their inode number as [`NodeId::Inode`], taken from
//! the directory entry that leads to them (the vendored crate's one addition). Never writes.

use ext4_view::{Ext4, Ext4Error, Metadata};

use super::slice::Slice;
use super::{Error, Node, NodeId, NodeKind, Tree, display_path as display};

/// The root folder's inode, fixed by the on-disk format.
const ROOT_INODE: u32 = 2;

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

    /// The inode number of the entry at `path`, from its folder's entry of that name; `None`
    /// when that folder cannot be read (the caller then has no identity for it, and the walk
    /// falls back on the depth limit).
    fn inode_of(&self, path: &[Vec<u8>]) -> Option<u32> {
        let Some((name, parent)) = path.split_last() else {
            return Some(ROOT_INODE);
        };
        let entries = self.fs.read_dir(path_bytes(parent).as_slice()).ok()?;
        entries
            .filter_map(Result::ok)
            .find(|entry| {
                let entry_name = entry.file_name();
                let entry_name: &[u8] = entry_name.as_ref();
                entry_name == name.as_slice()
            })
            .map(|entry| entry.inode())
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
                child.id = Some(NodeId::Inode(entry.inode().into()));
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
            found.id = self.inode_of(path).map(|n| NodeId::Inode(n.into()));
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
