//! Recognises what a partition holds from its first 4 KiB (magic numbers only; pure). The file
//! system drivers check the rest when a volume is opened.

use super::partition::le16;

/// What a volume holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ext4,
    Fat,
    Ntfs,
    Swap,
}

impl FsKind {
    /// Whether cairn can list and extract files of this kind.
    pub fn is_browsable(self) -> bool {
        !matches!(self, FsKind::Swap)
    }

    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Fat => "fat",
            FsKind::Ntfs => "ntfs",
            FsKind::Swap => "swap",
        }
    }
}

/// The kind of file system whose first bytes are `head` (at least 512 bytes; 4096 to see swap
/// and ext superblocks), if recognised.
pub fn probe(head: &[u8]) -> Option<FsKind> {
    if head.len() >= 1082 && le16(head, 1080) == 0xEF53 {
        return Some(FsKind::Ext4);
    }
    if head.len() >= 4096 && &head[4086..4096] == b"SWAPSPACE2" {
        return Some(FsKind::Swap);
    }
    if head.len() < 512 {
        return None;
    }
    if &head[3..11] == b"NTFS    " {
        return Some(FsKind::Ntfs);
    }
    let boot_jump = head[0] == 0xEB || head[0] == 0xE9;
    let signed = head[510] == 0x55 && head[511] == 0xAA;
    let bytes_per_sector = le16(head, 11);
    let fat_label = head[54..57] == *b"FAT" || head[82..87] == *b"FAT32";
    if boot_jump
        && signed
        && fat_label
        && bytes_per_sector.is_power_of_two()
        && (512..=4096).contains(&bytes_per_sector)
    {
        return Some(FsKind::Fat);
    }
    None
}
