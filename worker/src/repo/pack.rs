//! Pack files: many blobs of one disk lineage in one file, so that a 100 GB disk is not
//! millions of files.
//!
//! Layout (little-endian):
//! ```text
//! header   16 B   "CAIRNPAK", version u32 = 1, reserved u32 = 0
//! blobs           concatenated blobs (see [`super::crypto`])
//! trailer  48 B × n   chunk id [32], offset u64, stored length u32, plaintext length u32
//! footer   56 B   n u64, trailer offset u64, BLAKE3 of the trailer [32], "CAIRNEND"
//! ```
//! The trailer lets a backup that follows a crash find chunks that are durable but not yet
//! referenced, and lets gc and verify list a pack without reading its blobs. A pack is written
//! under a temporary name and renamed into place only once complete and fsynced.

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::crypto::ChunkId;
use super::fsutil::{create_file, publish, temp_path};
use super::{Error, io_err};

const MAGIC: &[u8; 8] = b"CAIRNPAK";
const END_MAGIC: &[u8; 8] = b"CAIRNEND";
const VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 16;
const ENTRY_LEN: usize = 48;
const FOOTER_LEN: u64 = 56;
/// A pack is closed once it holds this many bytes.
pub const TARGET_PACK_SIZE: u64 = 32 * 1024 * 1024;

/// Where one blob lives in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
}

/// The path of pack `seq` in a lineage's pack folder.
pub fn pack_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.pack"))
}

/// The sequence numbers of the complete packs in `dir`, ascending.
pub fn list_packs(dir: &Path) -> Result<Vec<u64>, Error> {
    let mut seqs = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(seqs),
        Err(e) => {
            return Err(Error::Io {
                path: dir.into(),
                source: e,
            });
        }
    };
    for entry in entries {
        let name = entry.map_err(io_err(dir))?.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".pack")
            && stem.len() == 16
            && let Ok(seq) = u64::from_str_radix(stem, 16)
        {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Writes one pack. Dropping it without [`PackWriter::finish`] removes the temporary file.
#[derive(Debug)]
pub struct PackWriter {
    seq: u64,
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    /// Blobs appended but not yet written: written together with one `writev` once they add
    /// up to [`WRITE_EVERY`], so that a blob is never copied into a buffer of ours first.
    pending: Vec<Vec<u8>>,
    pending_len: usize,
    offset: u64,
    /// Bytes handed to the kernel's writeback so far.
    written_back: u64,
    entries: Vec<PackEntry>,
}

/// How much a pack writer buffers before it starts the disk writing it.
const WRITEBACK_EVERY: u64 = 8 * 1024 * 1024;
/// How many bytes of appended blobs a pack writer holds before it writes them.
const WRITE_EVERY: usize = 1 << 20;

impl PackWriter {
    pub fn create(dir: &Path, seq: u64) -> Result<PackWriter, Error> {
        let path = pack_path(dir, seq);
        let tmp = temp_path(&path);
        let file = create_file(&tmp)?;
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        Ok(PackWriter {
            seq,
            path,
            tmp,
            file: Some(file),
            pending_len: header.len(),
            pending: vec![header],
            offset: HEADER_LEN,
            written_back: 0,
            entries: Vec::new(),
        })
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.offset
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends a blob; returns its offset in the pack.
    pub fn append(&mut self, id: &ChunkId, blob: &[u8], raw_len: u32) -> Result<u64, Error> {
        self.append_owned(id, blob.to_vec(), raw_len)
    }

    /// Appends a blob the writer may keep until it is written; returns its offset in the pack.
    pub fn append_owned(
        &mut self,
        id: &ChunkId,
        blob: Vec<u8>,
        raw_len: u32,
    ) -> Result<u64, Error> {
        let offset = self.offset;
        let stored_len = u32::try_from(blob.len()).expect("a blob is smaller than 4 GiB");
        self.offset += blob.len() as u64;
        self.pending_len += blob.len();
        self.pending.push(blob);
        self.entries.push(PackEntry {
            id: *id,
            offset,
            stored_len,
            raw_len,
        });
        if self.pending_len >= WRITE_EVERY {
            self.write_pending()?;
        }
        // Start writing out every few MiB, so the fsync at `finish` has little left to do.
        let written = self.offset - self.pending_len as u64;
        if written - self.written_back >= WRITEBACK_EVERY {
            let file = self
                .file
                .as_ref()
                .expect("pack writer is open until finish");
            crate::source::raw::start_writeback(
                file,
                self.written_back,
                written - self.written_back,
            );
            self.written_back = written;
        }
        Ok(offset)
    }

    /// Writes the pending blobs at the end of the file, with as few `writev` calls as it takes.
    fn write_pending(&mut self) -> Result<(), Error> {
        let file = self
            .file
            .as_mut()
            .expect("pack writer is open until finish");
        let mut slices: Vec<IoSlice<'_>> = self.pending.iter().map(|b| IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match file.write_vectored(rest) {
                Ok(0) => {
                    return Err(Error::Io {
                        path: self.tmp.clone(),
                        source: std::io::ErrorKind::WriteZero.into(),
                    });
                }
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(&self.tmp)(e)),
            }
        }
        self.pending.clear();
        self.pending_len = 0;
        Ok(())
    }

    /// Writes the trailer, fsyncs, renames the pack into place and fsyncs its folder. Once this
    /// returns the pack is durable and may be referenced.
    pub fn finish(mut self) -> Result<(u64, Vec<PackEntry>), Error> {
        let trailer = encode_trailer(&self.entries);
        let mut footer = Vec::with_capacity(FOOTER_LEN as usize);
        footer.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        footer.extend_from_slice(&self.offset.to_le_bytes());
        footer.extend_from_slice(blake3::hash(&trailer).as_bytes());
        footer.extend_from_slice(END_MAGIC);
        self.pending.push(trailer);
        self.pending.push(footer);
        self.write_pending()?;
        let file = self.file.take().expect("pack writer is open until finish");
        file.sync_all().map_err(io_err(&self.tmp))?;
        drop(file);
        publish(&self.tmp, &self.path)?;
        Ok((self.seq, std::mem::take(&mut self.entries)))
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn encode_trailer(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in entries {
        out.extend_from_slice(&e.id);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
    }
    out
}

/// Reads and checks the trailer of a pack: the list of its blobs.
pub fn read_trailer(path: &Path) -> Result<Vec<PackEntry>, Error> {
    let corrupt = |reason: String| Error::CorruptPack {
        path: path.into(),
        reason,
    };
    let file = File::open(path).map_err(io_err(path))?;
    let size = file.metadata().map_err(io_err(path))?.len();
    if size < HEADER_LEN + FOOTER_LEN {
        return Err(corrupt(format!("{size} bytes is too short for a pack")));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut header, 0).map_err(io_err(path))?;
    if &header[..8] != MAGIC {
        return Err(corrupt("bad magic: not a cairn pack".into()));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(corrupt(format!("pack version {version} is not supported")));
    }
    let mut footer = [0u8; FOOTER_LEN as usize];
    file.read_exact_at(&mut footer, size - FOOTER_LEN)
        .map_err(io_err(path))?;
    if &footer[48..] != END_MAGIC {
        return Err(corrupt(
            "bad end magic: the pack is truncated or damaged".into(),
        ));
    }
    let n = u64::from_le_bytes(footer[..8].try_into().expect("8 bytes"));
    let trailer_offset = u64::from_le_bytes(footer[8..16].try_into().expect("8 bytes"));
    let trailer_len = n
        .checked_mul(ENTRY_LEN as u64)
        .ok_or_else(|| corrupt(format!("entry count {n} overflows")))?;
    if trailer_offset < HEADER_LEN
        || trailer_offset.checked_add(trailer_len) != Some(size - FOOTER_LEN)
    {
        return Err(corrupt(format!(
            "trailer of {n} entries at {trailer_offset} does not fit a pack of {size} bytes"
        )));
    }
    let mut trailer = vec![0u8; trailer_len as usize];
    file.read_exact_at(&mut trailer, trailer_offset)
        .map_err(io_err(path))?;
    if blake3::hash(&trailer).as_bytes() != &footer[16..48] {
        return Err(corrupt("trailer checksum mismatch".into()));
    }
    let mut entries = Vec::with_capacity(n as usize);
    for raw in trailer.chunks_exact(ENTRY_LEN) {
        let entry = PackEntry {
            id: raw[..32].try_into().expect("32 bytes"),
            offset: u64::from_le_bytes(raw[32..40].try_into().expect("8 bytes")),
            stored_len: u32::from_le_bytes(raw[40..44].try_into().expect("4 bytes")),
            raw_len: u32::from_le_bytes(raw[44..48].try_into().expect("4 bytes")),
        };
        if entry.offset < HEADER_LEN || entry.offset + entry.stored_len as u64 > trailer_offset {
            return Err(corrupt(format!(
                "blob at {} of {} bytes lies outside the data area",
                entry.offset, entry.stored_len
            )));
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// Reads blobs out of the packs of one lineage, keeping a few files open.
#[derive(Debug)]
pub struct PackReader {
    dir: PathBuf,
    open: HashMap<u64, File>,
}

impl PackReader {
    pub fn new(dir: &Path) -> PackReader {
        PackReader {
            dir: dir.into(),
            open: HashMap::new(),
        }
    }

    pub fn path(&self, seq: u64) -> PathBuf {
        pack_path(&self.dir, seq)
    }

    /// Reads the blob at `offset` of `len` bytes into `out` (resized).
    pub fn read(
        &mut self,
        seq: u64,
        offset: u64,
        len: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        if !self.open.contains_key(&seq) {
            if self.open.len() >= 16 {
                self.open.clear();
            }
            let path = self.path(seq);
            let file = File::open(&path).map_err(io_err(&path))?;
            self.open.insert(seq, file);
        }
        let file = &self.open[&seq];
        out.resize(len as usize, 0);
        file.read_exact_at(out, offset).map_err(|e| {
            let path = pack_path(&self.dir, seq);
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::CorruptPack {
                    path,
                    reason: format!("truncated: blob at {offset} of {len} bytes is missing"),
                }
            } else {
                Error::Io { path, source: e }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_finish_read_back_and_detect_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(dir.path(), 7).unwrap();
        let a = w.append(&[1; 32], b"hello", 5).unwrap();
        let b = w.append(&[2; 32], b"world!", 6).unwrap();
        assert_eq!(a, HEADER_LEN);
        let (seq, entries) = w.finish().unwrap();
        assert_eq!(seq, 7);
        assert_eq!(list_packs(dir.path()).unwrap(), vec![7]);
        assert_eq!(read_trailer(&pack_path(dir.path(), 7)).unwrap(), entries);
        let mut reader = PackReader::new(dir.path());
        let mut buf = Vec::new();
        reader.read(7, b, 6, &mut buf).unwrap();
        assert_eq!(buf, b"world!");

        let path = pack_path(dir.path(), 7);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 60] ^= 0xff; // inside the trailer
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            read_trailer(&path),
            Err(Error::CorruptPack { .. })
        ));
        std::fs::write(&path, &bytes[..n / 2]).unwrap();
        assert!(matches!(
            read_trailer(&path),
            Err(Error::CorruptPack { .. })
        ));
    }

    #[test]
    fn thousands_of_pending_blobs_are_written_in_order_through_several_writev_calls() {
        // More blobs than one writev takes (IOV_MAX is 1024), then one big enough to make the
        // writer write them all at once, then a few that stay pending until `finish`.
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(dir.path(), 3).unwrap();
        let blob = |i: u32| -> Vec<u8> { (0..(i % 97 + 1)).map(|j| (i + j) as u8).collect() };
        let mut expected = Vec::new();
        for i in 0..5000u32 {
            let id = *blake3::hash(&i.to_le_bytes()).as_bytes();
            let offset = w.append_owned(&id, blob(i), i).unwrap();
            expected.push((offset, blob(i)));
        }
        let big = vec![0xa5u8; WRITE_EVERY];
        let big_offset = w.append(&[9; 32], &big, big.len() as u32).unwrap();
        assert_eq!(w.pending_len, 0, "a full buffer is written at once");
        let tail_offset = w.append(&[8; 32], b"tail", 4).unwrap();
        let (_, entries) = w.finish().unwrap();
        assert_eq!(entries.len(), 5002);
        let mut reader = PackReader::new(dir.path());
        let mut buf = Vec::new();
        for (offset, data) in &expected {
            reader
                .read(3, *offset, data.len() as u32, &mut buf)
                .unwrap();
            assert_eq!(&buf, data);
        }
        reader
            .read(3, big_offset, big.len() as u32, &mut buf)
            .unwrap();
        assert_eq!(buf, big);
        reader.read(3, tail_offset, 4, &mut buf).unwrap();
        assert_eq!(buf, b"tail");
        assert_eq!(read_trailer(&pack_path(dir.path(), 3)).unwrap(), entries);
    }

    #[test]
    fn abandoned_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(dir.path(), 1).unwrap();
        w.append(&[1; 32], b"x", 1).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
