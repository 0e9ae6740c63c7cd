//! Partition tables and panics on damage, over in-memory and sgdisk-made images.

use std::sync::Arc;

use super::partition::{Scheme, partitions};
use super::*;
use crate::repo::image::{DiskView, FileView};

struct Mem(Vec<u8>);

impl DiskView for Mem {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = (offset as usize)
            .checked_add(buf.len())
            .filter(|&e| e <= self.0.len());
        let end = end.ok_or_else(|| std::io::Error::other("past the end"))?;
        buf.copy_from_slice(&self.0[offset as usize..end]);
        Ok(())
    }
}

fn entry(mbr: &mut [u8], at: usize, kind: u8, first: u32, count: u32) {
    let e = &mut mbr[at..at + 16];
    e[4] = kind;
    e[8..12].copy_from_slice(&first.to_le_bytes());
    e[12..16].copy_from_slice(&count.to_le_bytes());
}

fn signed(disk: &mut [u8], lba: usize) {
    disk[lba * 512 + 510] = 0x55;
    disk[lba * 512 + 511] = 0xAA;
}

/// 8 MiB: p1 at 2048+2048, extended at 4096+8192 with logicals at +1 (EBR 4096) and +2049
/// (EBR 6144).
fn mbr_disk() -> Vec<u8> {
    let mut d = vec![0u8; 8 << 20];
    signed(&mut d, 0);
    entry(&mut d, 446, 0x83, 2048, 2048);
    entry(&mut d, 462, 0x05, 4096, 8192);
    signed(&mut d, 4096);
    entry(&mut d, 4096 * 512 + 446, 0x07, 1, 1000);
    entry(&mut d, 4096 * 512 + 462, 0x05, 2048, 2000);
    signed(&mut d, 6144);
    entry(&mut d, 6144 * 512 + 446, 0x0b, 1, 500);
    d
}

#[test]
fn mbr_with_logical_partitions() {
    let parts = partitions(&Mem(mbr_disk())).unwrap();
    let got: Vec<(u32, u64, u64)> = parts
        .iter()
        .map(|p| (p.number, p.start / 512, p.len / 512))
        .collect();
    assert_eq!(got, [(1, 2048, 2048), (5, 4097, 1000), (6, 6145, 500)]);
    assert!(parts.iter().all(|p| p.scheme == Scheme::Mbr));
}

#[test]
fn damaged_mbr_chains_are_errors() {
    // The second EBR links to itself (relative 2048): a loop.
    let mut looped = mbr_disk();
    entry(&mut looped, 6144 * 512 + 462, 0x05, 2048, 1);
    assert!(matches!(partitions(&Mem(looped)), Err(Error::Damaged(m)) if m.contains("loops")));
    // A partition past the disk end.
    let mut past = mbr_disk();
    entry(&mut past, 446, 0x83, 2048, 1 << 30);
    assert!(matches!(partitions(&Mem(past)), Err(Error::Damaged(_))));
    // A logical partition outside its extended partition.
    let mut outside = mbr_disk();
    entry(&mut outside, 4096 * 512 + 446, 0x07, 1, 100_000);
    assert!(matches!(partitions(&Mem(outside)), Err(Error::Damaged(_))));
    // No signature: no table, no error.
    assert!(partitions(&Mem(vec![0u8; 1 << 20])).unwrap().is_empty());
    assert!(partitions(&Mem(vec![0u8; 100])).unwrap().is_empty());
}

#[test]
fn gpt_falls_back_to_the_backup_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let status = std::process::Command::new("sgdisk")
        .args([
            "-o", "-n", "1:1M:+4M", "-c", "1:alpha", "-n", "2:0:+2M", "-c", "2:beta",
        ])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let parts = partitions(&FileView::open(&path).unwrap()).unwrap();
    let got: Vec<(u32, u64, String)> = parts
        .iter()
        .map(|p| (p.number, p.start, p.label.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (1, 1 << 20, "alpha".to_string()),
            (2, 5 << 20, "beta".to_string())
        ]
    );
    // Damage the primary header: the backup one still gives the same table.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[512 + 40] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(partitions(&FileView::open(&path).unwrap()).unwrap(), parts);
    // Damage the backup header too: an error naming both.
    let last = bytes.len() - 512;
    bytes[last + 40] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let err = partitions(&FileView::open(&path).unwrap()).unwrap_err();
    assert!(err.to_string().contains("backup header"), "{err}");
}

#[test]
fn item_paths_are_checked() {
    assert_eq!(
        parse_path("/p2/etc//hosts/").unwrap(),
        [b"p2".to_vec(), b"etc".to_vec(), b"hosts".to_vec()]
    );
    for bad in [
        "p2/etc",
        "/p2/../etc",
        "/p2/./x",
        "/a\0b",
        &format!("/{}", "x".repeat(5000)),
    ] {
        assert!(
            matches!(parse_path(bad), Err(Error::BadPath { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn random_bytes_never_panic() {
    // Random images with plausible magic numbers in front of every driver: each answer is a
    // listing or an error.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for round in 0..60 {
        let mut d = vec![0u8; 1 << 20];
        for b in d.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = if x.is_multiple_of(3) { x as u8 } else { 0 };
        }
        match round % 3 {
            0 => {
                d[1080] = 0x53;
                d[1081] = 0xEF;
            }
            1 => d[3..11].copy_from_slice(b"NTFS    "),
            _ => {
                d[0] = 0xEB;
                d[11..13].copy_from_slice(&512u16.to_le_bytes());
                d[82..87].copy_from_slice(b"FAT32");
                d[510] = 0x55;
                d[511] = 0xAA;
            }
        }
        let disk = Disk::open(Arc::new(Mem(d))).unwrap();
        let _ = disk.browse("/disk", &Limits::default());
        let _ = disk.browse("/disk/a/b", &Limits::default());
    }
}

/// Runs an mtools command on the FAT image `image`.
fn mtools(tool: &str, image: &std::path::Path, args: &[&str]) {
    let status = std::process::Command::new(tool)
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(image)
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "{tool} {args:?}");
}

/// Where the 32-byte short entry of folder `name` (8.3, padded to 11 bytes) lies; the only one.
fn short_entry(disk: &[u8], name: &[u8; 11]) -> usize {
    let found: Vec<usize> = (0..disk.len() - 32)
        .step_by(32)
        .filter(|&at| &disk[at..at + 11] == name && disk[at + 11] & 0x10 != 0)
        .collect();
    assert_eq!(found.len(), 1, "{}", String::from_utf8_lossy(name));
    found[0]
}

fn first_cluster(disk: &[u8], entry: usize) -> u16 {
    u16::from_le_bytes([disk[entry + 26], disk[entry + 27]])
}

fn set_first_cluster(disk: &mut [u8], entry: usize, cluster: u16) {
    disk[entry + 26..entry + 28].copy_from_slice(&cluster.to_le_bytes());
}

#[test]
fn fat_folders_that_are_their_own_ancestors_are_walked_once() {
    // FAT16: /A holding f.txt, B and C; /D; /E; /z.txt. Then, in the raw bytes: A/B points at
    // A's clusters and A/C at cluster 0 (the root), D at A's clusters (cross-linked), and E's
    // only cluster is chained to itself with no end marker in it.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("fat.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let status = std::process::Command::new("mkfs.vfat")
        .args(["-F", "16"])
        .arg(&image)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    for folder in ["::/A", "::/A/B", "::/A/C", "::/D", "::/E"] {
        mtools("mmd", &image, &[folder]);
    }
    let payload = dir.path().join("f.txt");
    std::fs::write(&payload, b"inside A\n").unwrap();
    mtools("mcopy", &image, &[payload.to_str().unwrap(), "::/A/f.txt"]);
    std::fs::write(&payload, b"after the loops\n").unwrap();
    mtools("mcopy", &image, &[payload.to_str().unwrap(), "::/z.txt"]);

    let mut disk = std::fs::read(&image).unwrap();
    let a = short_entry(&disk, b"A          ");
    let a_cluster = first_cluster(&disk, a);
    let b = short_entry(&disk, b"B          ");
    set_first_cluster(&mut disk, b, a_cluster);
    let c = short_entry(&disk, b"C          ");
    set_first_cluster(&mut disk, c, 0);
    let d = short_entry(&disk, b"D          ");
    set_first_cluster(&mut disk, d, a_cluster);
    let e = short_entry(&disk, b"E          ");
    let e_cluster = first_cluster(&disk, e);
    let bytes_per_sector = usize::from(u16::from_le_bytes([disk[11], disk[12]]));
    let reserved = usize::from(u16::from_le_bytes([disk[14], disk[15]]));
    let fat_sectors = usize::from(u16::from_le_bytes([disk[22], disk[23]]));
    for copy in 0..usize::from(disk[16]) {
        let at = (reserved + copy * fat_sectors) * bytes_per_sector + 2 * usize::from(e_cluster);
        disk[at..at + 2].copy_from_slice(&e_cluster.to_le_bytes());
    }
    // E's data: `.`, `..`, then deleted entries (never an end marker) to the cluster's end.
    // E's data starts with the `.` entry that names E's own cluster.
    let e_data = (0..disk.len() - 32)
        .step_by(32)
        .find(|&at| &disk[at..at + 11] == b".          " && first_cluster(&disk, at) == e_cluster)
        .unwrap();
    let cluster_bytes = usize::from(disk[13]) * bytes_per_sector;
    for record in (e_data + 64..e_data + cluster_bytes).step_by(32) {
        disk[record] = 0xE5;
    }

    let disk = Disk::open(Arc::new(Mem(disk))).unwrap();
    let out = tempfile::tempdir().unwrap();
    let report = disk
        .extract(
            &["/disk".to_string()],
            out.path(),
            &Limits::default(),
            &crate::repo::NoProgress,
        )
        .unwrap();
    let skipped: Vec<(&str, &str)> = report
        .skipped
        .iter()
        .map(|s| (s.path.as_str(), s.reason.as_str()))
        .collect();
    assert_eq!(skipped.len(), 4, "{skipped:#?}");
    let reason = |path: &str| {
        skipped
            .iter()
            .find(|s| s.0 == path)
            .unwrap_or_else(|| panic!("{path} not skipped: {skipped:#?}"))
            .1
    };
    assert!(
        reason("/disk/A/B").starts_with("directory loop: the folder whose data starts at byte ")
    );
    assert!(reason("/disk/A/B").ends_with(" is already extracted at /disk/A"));
    assert!(reason("/disk/A/C").starts_with("directory loop: "));
    assert!(reason("/disk/A/C").ends_with(" is already extracted at /disk"));
    assert!(reason("/disk/D").starts_with("cross-linked folder: "));
    assert!(reason("/disk/D").ends_with(" is already extracted at /disk/A"));
    assert!(
        reason("/disk/E").contains("cluster chain loops back"),
        "{skipped:#?}"
    );
    assert_eq!(report.files, 2, "{report:?}");
    assert_eq!(
        std::fs::read(out.path().join("disk/A/f.txt")).unwrap(),
        b"inside A\n"
    );
    assert_eq!(
        std::fs::read(out.path().join("disk/z.txt")).unwrap(),
        b"after the loops\n"
    );
}
