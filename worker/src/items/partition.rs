//! Partition tables of a disk image: GPT (primary header, or the backup one when the primary is
//! damaged) and MBR with extended partitions; and a disk without a table that holds one file
//! system. Pure parsing over a [`DiskView`]: every number read from the image is checked against
//! the disk's size before it is used, lists and chains are bounded, and nothing here writes.

use super::Error;
use crate::repo::image::DiskView;

const SECTOR: u64 = 512;
/// More partitions than any real table holds; a damaged table cannot make us loop or allocate.
const MAX_GPT_ENTRIES: u32 = 1024;
const MAX_LOGICAL: usize = 128;

/// Which table a partition comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Gpt,
    Mbr,
    /// No partition table: the whole disk is one file system.
    None,
}

/// One partition (or the whole disk), in bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Partition {
    /// 1-based partition number (MBR logical partitions start at 5); 0 = the whole disk.
    pub number: u32,
    pub scheme: Scheme,
    pub start: u64,
    pub len: u64,
    /// GPT partition name, or the MBR type as `type 0x83`.
    pub label: String,
}

impl Partition {
    /// The name browse paths use: `p1`, `p2`, … or `disk` for an unpartitioned disk.
    pub fn volume_name(&self) -> String {
        if self.scheme == Scheme::None {
            "disk".into()
        } else {
            format!("p{}", self.number)
        }
    }
}

fn read(view: &dyn DiskView, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; len];
    view.read_at(offset, &mut buf)
        .map_err(|e| Error::Read(format!("{len} bytes at {offset}: {e}")))?;
    Ok(buf)
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// The partitions of the disk, in table order. A disk with no table but a file system at its
/// start gives one whole-disk entry; a disk with neither gives an empty list.
pub fn partitions(view: &dyn DiskView) -> Result<Vec<Partition>, Error> {
    let size = view.size();
    if size < SECTOR {
        return Ok(Vec::new());
    }
    let probe_len = size.min(4096) as usize;
    let head = read(view, 0, probe_len)?;
    if super::probe::probe(&head).is_some_and(|k| k.is_browsable()) {
        return Ok(vec![Partition {
            number: 0,
            scheme: Scheme::None,
            start: 0,
            len: size,
            label: String::new(),
        }]);
    }
    let mbr = &head[..SECTOR as usize];
    if mbr[510] != 0x55 || mbr[511] != 0xAA {
        return Ok(Vec::new());
    }
    let entries: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + 16 * i..462 + 16 * i]).collect();
    if entries.iter().any(|e| e[4] == 0xEE) {
        return gpt(view);
    }
    mbr_partitions(view, &entries)
}

fn gpt(view: &dyn DiskView) -> Result<Vec<Partition>, Error> {
    let last_lba = view.size() / SECTOR - 1;
    match gpt_at(view, 1) {
        Ok(parts) => Ok(parts),
        Err(primary) => {
            tracing::warn!(%primary, "primary GPT header unusable, trying the backup header");
            gpt_at(view, last_lba).map_err(|backup| {
                Error::Damaged(format!(
                    "GPT: primary header: {primary}; backup header: {backup}"
                ))
            })
        }
    }
}

fn gpt_at(view: &dyn DiskView, lba: u64) -> Result<Vec<Partition>, String> {
    let sectors = view.size() / SECTOR;
    let hdr = read(view, lba * SECTOR, SECTOR as usize).map_err(|e| e.to_string())?;
    if &hdr[..8] != b"EFI PART" {
        return Err(format!("no GPT signature at LBA {lba}"));
    }
    let hdr_len = u32_at(&hdr, 12) as usize;
    if !(92..=SECTOR as usize).contains(&hdr_len) {
        return Err(format!("header size {hdr_len} is invalid"));
    }
    let mut crc_input = hdr[..hdr_len].to_vec();
    crc_input[16..20].fill(0);
    if crc32fast::hash(&crc_input) != u32_at(&hdr, 16) {
        return Err("header checksum mismatch".into());
    }
    let entries_lba = u64_at(&hdr, 72);
    let n_entries = u32_at(&hdr, 80);
    let entry_len = u32_at(&hdr, 84);
    if n_entries > MAX_GPT_ENTRIES {
        return Err(format!(
            "{n_entries} partition entries is more than {MAX_GPT_ENTRIES}"
        ));
    }
    if !(128..=4096).contains(&entry_len) || !entry_len.is_multiple_of(8) {
        return Err(format!("partition entry size {entry_len} is invalid"));
    }
    let table_len = n_entries as u64 * entry_len as u64;
    if entries_lba >= sectors || entries_lba * SECTOR + table_len > view.size() {
        return Err(format!(
            "partition entries at LBA {entries_lba} are past the disk end"
        ));
    }
    let table = read(view, entries_lba * SECTOR, table_len as usize).map_err(|e| e.to_string())?;
    if crc32fast::hash(&table) != u32_at(&hdr, 88) {
        return Err("partition entries checksum mismatch".into());
    }
    let mut out = Vec::new();
    for (i, entry) in table.chunks_exact(entry_len as usize).enumerate() {
        if entry[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let first = u64_at(entry, 32);
        let last = u64_at(entry, 40);
        if first > last || last >= sectors {
            return Err(format!(
                "partition {} spans LBA {first}..={last}, past the disk's {sectors} sectors",
                i + 1
            ));
        }
        let name: Vec<u16> = entry[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        out.push(Partition {
            number: i as u32 + 1,
            scheme: Scheme::Gpt,
            start: first * SECTOR,
            len: (last - first + 1) * SECTOR,
            label: String::from_utf16_lossy(&name),
        });
    }
    Ok(out)
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0F | 0x85)
}

fn mbr_partitions(view: &dyn DiskView, entries: &[&[u8]]) -> Result<Vec<Partition>, Error> {
    let sectors = view.size() / SECTOR;
    let check = |what: &str, first: u64, count: u64| -> Result<(), Error> {
        if count == 0 || first.checked_add(count).is_none_or(|end| end > sectors) {
            return Err(Error::Damaged(format!(
                "MBR: {what} spans sectors {first}+{count}, past the disk's {sectors} sectors"
            )));
        }
        Ok(())
    };
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let kind = e[4];
        let first = u32_at(e, 8) as u64;
        let count = u32_at(e, 12) as u64;
        if kind == 0 {
            continue;
        }
        check(&format!("partition {}", i + 1), first, count)?;
        if is_extended(kind) {
            out.extend(logical_partitions(view, first, count)?);
            continue;
        }
        out.push(Partition {
            number: i as u32 + 1,
            scheme: Scheme::Mbr,
            start: first * SECTOR,
            len: count * SECTOR,
            label: format!("type {kind:#04x}"),
        });
    }
    out.sort_by_key(|p| p.number);
    Ok(out)
}

/// Follows the chain of extended boot records inside an extended partition. Links are relative
/// to the extended partition's start; a link outside it, a loop or a too-long chain is damage.
fn logical_partitions(
    view: &dyn DiskView,
    ext_first: u64,
    ext_count: u64,
) -> Result<Vec<Partition>, Error> {
    let mut out = Vec::new();
    let mut ebr_rel = 0u64;
    let mut seen = std::collections::HashSet::new();
    loop {
        if !seen.insert(ebr_rel) || out.len() >= MAX_LOGICAL {
            return Err(Error::Damaged(
                "MBR: the chain of logical partitions loops or is too long".into(),
            ));
        }
        if ebr_rel >= ext_count {
            return Err(Error::Damaged(format!(
                "MBR: extended boot record at +{ebr_rel} is outside the extended partition"
            )));
        }
        let ebr_lba = ext_first + ebr_rel;
        let ebr = read(view, ebr_lba * SECTOR, SECTOR as usize)?;
        if ebr[510] != 0x55 || ebr[511] != 0xAA {
            return Err(Error::Damaged(format!(
                "MBR: extended boot record at sector {ebr_lba} has no signature"
            )));
        }
        let this = &ebr[446..462];
        let next = &ebr[462..478];
        if this[4] != 0 {
            let first = ebr_lba + u32_at(this, 8) as u64;
            let count = u32_at(this, 12) as u64;
            if count == 0 || first + count > ext_first + ext_count {
                return Err(Error::Damaged(format!(
                    "MBR: logical partition {} spans sectors {first}+{count}, outside its extended partition",
                    5 + out.len()
                )));
            }
            out.push(Partition {
                number: 5 + out.len() as u32,
                scheme: Scheme::Mbr,
                start: first * SECTOR,
                len: count * SECTOR,
                label: format!("type {:#04x}", this[4]),
            });
        }
        if next[4] == 0 || u32_at(next, 8) == 0 {
            return Ok(out);
        }
        ebr_rel = u32_at(next, 8) as u64;
    }
}

/// Little-endian u16 helper for the probe module.
pub(super) fn le16(b: &[u8], i: usize) -> u16 {
    u16_at(b, i)
}
