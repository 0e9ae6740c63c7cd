//! Image format detection: magic bytes at the start (and, for fixed VHD and DMG, the last 512
//! bytes) of a file. [`detect`] is pure; [`probe`] reads the file and checks that it is a regular
//! file or block device. Must not open images through qemu.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use super::{Error, ImageFormat, io_error};

/// Bytes read from the start of the file: enough for every magic below (tar's is at 257).
pub(crate) const HEAD_LEN: usize = 4096;

/// What the magic bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detected {
    Format(ImageFormat),
    /// A format we recognise but do not read; the name is for the error message.
    Unsupported(&'static str),
}

/// Detects the format from the first bytes of the file (`head`, up to [`HEAD_LEN`]) and its last
/// 512 bytes (`tail`, empty if the file is shorter). Anything unrecognised is raw.
pub(crate) fn detect(head: &[u8], tail: &[u8]) -> Detected {
    let starts = |magic: &[u8]| head.starts_with(magic);
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if starts(b"QFI\xfb") {
        // qcow version 1 shares the magic; its version field (big-endian u32 at 4) is 1.
        return if at(4, &[0, 0, 0, 1]) {
            Detected::Unsupported("qcow (version 1)")
        } else {
            Detected::Format(ImageFormat::Qcow2)
        };
    }
    if starts(b"vhdxfile") {
        return Detected::Format(ImageFormat::Vhdx);
    }
    if starts(b"conectix") || tail.starts_with(b"conectix") {
        return Detected::Format(ImageFormat::Vpc);
    }
    let unsupported: &[(usize, &[u8], &'static str)] = &[
        (0, b"KDMV", "VMDK"),
        (0, b"COWD", "VMDK (ESX sparse)"),
        (0, b"# Disk DescriptorFile", "VMDK (descriptor)"),
        (0x40, b"\x7f\x10\xda\xbe", "VDI"),
        (0, b"QED\0", "QED"),
        (0, b"WithoutFreeSpace", "Parallels"),
        (0, b"WithouFreSpacExt", "Parallels"),
        (0, b"\x1f\x8b\x08", "gzip-compressed"),
        (0, b"\xfd7zXZ\0", "xz-compressed"),
        (0, b"\x28\xb5\x2f\xfd", "zstd-compressed"),
        (0, b"PK\x03\x04", "zip archive"),
        (257, b"ustar", "tar archive (an OVA?)"),
    ];
    for &(offset, magic, name) in unsupported {
        if at(offset, magic) {
            return Detected::Unsupported(name);
        }
    }
    if starts(b"BZh") && head.get(3).is_some_and(|d| (b'1'..=b'9').contains(d)) && at(4, b"1AY&SY")
    {
        return Detected::Unsupported("bzip2-compressed");
    }
    if tail.starts_with(b"koly") {
        return Detected::Unsupported("DMG");
    }
    Detected::Format(ImageFormat::Raw)
}

/// Opens `path`, checks it is a regular file or block device, and detects its format. Errors
/// name the path: missing/unreadable file (`Io`), wrong file type (`Invalid`), a known format we
/// do not read (`UnsupportedFormat`).
pub(crate) fn probe(path: &Path) -> Result<ImageFormat, Error> {
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    let size = disk_file_size(&file, path)?;
    let mut head = Vec::with_capacity(HEAD_LEN);
    (&file)
        .take(HEAD_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|e| io_error(path, e))?;
    let mut tail = [0u8; 512];
    let tail: &[u8] = if size >= 512 {
        file.read_exact_at(&mut tail, size - 512)
            .map_err(|e| io_error(path, e))?;
        &tail
    } else {
        &[]
    };
    match detect(&head, tail) {
        Detected::Format(f) => Ok(f),
        Detected::Unsupported(format) => Err(Error::UnsupportedFormat {
            path: path.to_path_buf(),
            format,
        }),
    }
}

/// Sanity checks of a qcow2 header against the file length, because qemu reads past the end of a
/// truncated qcow2 as zeros: the first 1 KiB of a real image opens fine and reads as an empty
/// disk. Returns what is wrong, or `None`. (Data clusters lost to a truncation further in are not
/// detected here; `qemu-img check` finds those.)
pub(crate) fn qcow2_header_problem(head: &[u8], file_len: u64) -> Option<String> {
    let u32_at = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        head.get(o..o + 8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
    };
    let (Some(cluster_bits), Some(l1_size), Some(l1_offset), Some(rt_offset), Some(rt_clusters)) =
        (u32_at(20), u32_at(36), u64_at(40), u64_at(48), u32_at(56))
    else {
        return Some(format!("qcow2 header cut short ({} bytes)", head.len()));
    };
    if !(9..=21).contains(&cluster_bits) {
        return Some(format!("qcow2 header has cluster_bits {cluster_bits}"));
    }
    let tables = [
        ("L1 table", l1_offset, u64::from(l1_size) * 8),
        (
            "refcount table",
            rt_offset,
            u64::from(rt_clusters) << cluster_bits,
        ),
    ];
    for (name, offset, len) in tables {
        if len > 0 && offset.checked_add(len).is_none_or(|end| end > file_len) {
            return Some(format!(
                "corrupt or truncated qcow2: its {name} ({len} bytes at offset {offset}) ends \
                 past the end of the file ({file_len} bytes)"
            ));
        }
    }
    None
}

/// Reads the start of a qcow2 file and applies [`qcow2_header_problem`].
pub(crate) fn check_qcow2(path: &Path) -> Result<(), Error> {
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    let file_len = disk_file_size(&file, path)?;
    let mut head = Vec::with_capacity(HEAD_LEN);
    (&file)
        .take(HEAD_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|e| io_error(path, e))?;
    match qcow2_header_problem(&head, file_len) {
        Some(reason) => Err(Error::Invalid {
            path: path.to_path_buf(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Size of a regular file or block device; other file types are refused.
pub(crate) fn disk_file_size(file: &File, path: &Path) -> Result<u64, Error> {
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    let kind = meta.file_type();
    if kind.is_file() {
        Ok(meta.len())
    } else if kind.is_block_device() {
        // st_size is 0 for block devices; seeking to the end gives the device size.
        let end = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(file), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(io_error(path, std::io::Error::last_os_error()));
        }
        Ok(end as u64)
    } else {
        Err(Error::Invalid {
            path: path.to_path_buf(),
            reason: "not a disk image: not a regular file or block device".to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; HEAD_LEN];
        h[offset..offset + magic.len()].copy_from_slice(magic);
        h
    }

    #[test]
    fn known_formats_are_detected_from_their_magic() {
        let f = |h: &[u8], t: &[u8]| detect(h, t);
        use Detected::*;
        assert_eq!(
            f(&head_with(0, b"QFI\xfb\0\0\0\x03"), &[]),
            Format(ImageFormat::Qcow2)
        );
        assert_eq!(
            f(&head_with(0, b"QFI\xfb\0\0\0\x01"), &[]),
            Unsupported("qcow (version 1)")
        );
        assert_eq!(
            f(&head_with(0, b"vhdxfile"), &[]),
            Format(ImageFormat::Vhdx)
        );
        assert_eq!(f(&head_with(0, b"conectix"), &[]), Format(ImageFormat::Vpc));
        assert_eq!(
            f(&[0u8; 4096], &head_with(0, b"conectix")[..512]),
            Format(ImageFormat::Vpc)
        );
        assert_eq!(f(&head_with(0, b"KDMV"), &[]), Unsupported("VMDK"));
        assert_eq!(
            f(b"# Disk DescriptorFile\nversion=1", &[]),
            Unsupported("VMDK (descriptor)")
        );
        assert_eq!(
            f(&head_with(0x40, b"\x7f\x10\xda\xbe"), &[]),
            Unsupported("VDI")
        );
        assert_eq!(f(&head_with(0, b"QED\0"), &[]), Unsupported("QED"));
        assert_eq!(
            f(&head_with(0, b"\x1f\x8b\x08\0"), &[]),
            Unsupported("gzip-compressed")
        );
        assert_eq!(
            f(&head_with(0, b"\xfd7zXZ\0"), &[]),
            Unsupported("xz-compressed")
        );
        assert_eq!(
            f(&head_with(0, b"\x28\xb5\x2f\xfd"), &[]),
            Unsupported("zstd-compressed")
        );
        assert_eq!(
            f(&head_with(0, b"BZh91AY&SY"), &[]),
            Unsupported("bzip2-compressed")
        );
        assert_eq!(
            f(&head_with(0, b"PK\x03\x04"), &[]),
            Unsupported("zip archive")
        );
        assert_eq!(
            f(&head_with(257, b"ustar"), &[]),
            Unsupported("tar archive (an OVA?)")
        );
        assert_eq!(
            f(&[0u8; 4096], &head_with(0, b"koly")[..512]),
            Unsupported("DMG")
        );
    }

    fn qcow2_header(l1_offset: u64, l1_size: u32, rt_offset: u64, rt_clusters: u32) -> Vec<u8> {
        let mut h = head_with(0, b"QFI\xfb\0\0\0\x03");
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[36..40].copy_from_slice(&l1_size.to_be_bytes());
        h[40..48].copy_from_slice(&l1_offset.to_be_bytes());
        h[48..56].copy_from_slice(&rt_offset.to_be_bytes());
        h[56..60].copy_from_slice(&rt_clusters.to_be_bytes());
        h
    }

    #[test]
    fn qcow2_tables_must_lie_inside_the_file() {
        // A fresh 16 MiB image: refcount table at 64 KiB, L1 (one entry) at 192 KiB.
        let h = qcow2_header(0x30000, 1, 0x10000, 1);
        assert_eq!(qcow2_header_problem(&h, 0x30008), None);
        let p = qcow2_header_problem(&qcow2_header(0x30000, 1, 0x10000, 4), 0x30008).unwrap();
        assert!(p.contains("refcount table"), "{p}");
        let p = qcow2_header_problem(&h, 1024).unwrap();
        assert!(p.contains("corrupt or truncated qcow2"), "{p}");
        let p = qcow2_header_problem(&h, 0x30004).unwrap();
        assert!(p.contains("L1 table"), "{p}");
        let p = qcow2_header_problem(&qcow2_header(u64::MAX, 1, 0x10000, 1), 1 << 30).unwrap();
        assert!(p.contains("L1 table"), "{p}");
        assert!(
            qcow2_header_problem(&h[..40], 1 << 30)
                .unwrap()
                .contains("cut short")
        );
        let mut bad = h.clone();
        bad[20..24].copy_from_slice(&40u32.to_be_bytes());
        assert!(
            qcow2_header_problem(&bad, 1 << 30)
                .unwrap()
                .contains("cluster_bits")
        );
    }

    #[test]
    fn anything_else_is_raw() {
        assert_eq!(detect(&[], &[]), Detected::Format(ImageFormat::Raw));
        // An MBR boot sector, and a "BZh" that is not followed by bzip2's block magic.
        let mut mbr = vec![0u8; 512];
        mbr[0..3].copy_from_slice(&[0xeb, 0x63, 0x90]);
        mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(detect(&mbr, &mbr), Detected::Format(ImageFormat::Raw));
        assert_eq!(
            detect(b"BZh9 hello", &[]),
            Detected::Format(ImageFormat::Raw)
        );
        // Short files do not index out of bounds.
        assert_eq!(detect(b"QF", &[]), Detected::Format(ImageFormat::Raw));
    }
}
