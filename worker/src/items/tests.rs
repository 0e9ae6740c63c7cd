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
            *b = if x % 3 == 0 { x as u8 } else { 0 };
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
