//! make-vm-disk OUT [SIZE_MIB]: a realistic VM disk image (see the crate's documentation).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use cairn_vmdisk::{DiskSpec, ImageLayout};
use clap::Parser;

/// Builds a realistic VM disk without root, loop devices or mounts: GPT with an EFI system
/// partition (FAT32), an ext4 root filled with real files of this machine and a swap
/// partition of random pages, the root's free space left sparse. Same inputs, same layout and
/// generated content; copied files are whatever the source folders hold.
#[derive(Debug, Parser)]
#[command(name = "make-vm-disk", version)]
struct Args {
    /// The image to write (replaced when it exists).
    out: PathBuf,
    /// Disk size in MiB.
    #[arg(default_value_t = 4096)]
    size_mib: u32,
    /// Folder whose files fill the root, under their own paths (repeat for more) [/usr/lib].
    #[arg(long = "source", value_name = "DIR")]
    sources: Vec<PathBuf>,
    /// How full the root gets with copied files, in percent (1-90).
    #[arg(long, default_value_t = 60)]
    fill: u8,
    /// Largest file copied, in KiB.
    #[arg(long, default_value_t = 8192)]
    max_file_kib: u64,
    /// Smallest file copied, in KiB.
    #[arg(long, default_value_t = 0)]
    min_file_kib: u64,
    /// Size of the EFI system partition in MiB.
    #[arg(long, default_value_t = 64)]
    esp_mib: u32,
    /// Size of the swap partition in MiB.
    #[arg(long, default_value_t = 256)]
    swap_mib: u32,
    /// A data disk: one ext4 file system over the whole disk, no partition table.
    #[arg(long)]
    data: bool,
    /// Seed of the generated content (boot loader, swap pages).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output format: raw, qcow2, vhdx or vpc.
    #[arg(long, default_value = "raw")]
    format: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let spec = DiskSpec {
        size_mib: args.size_mib,
        layout: if args.data {
            ImageLayout::Ext4
        } else {
            ImageLayout::Gpt {
                esp_mib: args.esp_mib,
                swap_mib: args.swap_mib,
            }
        },
        sources: if args.sources.is_empty() {
            DiskSpec::default().sources
        } else {
            args.sources
        },
        fill_percent: args.fill,
        file_sizes: (args.min_file_kib * 1024, args.max_file_kib * 1024),
        seed: args.seed,
        format: args.format,
    };
    let started = Instant::now();
    let report = cairn_vmdisk::build(&spec, &args.out, &mut |stage| {
        eprintln!(
            "make-vm-disk: {stage} ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
    })
    .with_context(|| format!("building {}", args.out.display()))?;
    println!(
        "{}: {} MiB, {} files ({} MiB) in the root, {} KiB allocated",
        args.out.display(),
        spec.size_mib,
        report.files,
        report.file_bytes / (1024 * 1024),
        report.allocated_bytes / 1024
    );
    Ok(())
}
