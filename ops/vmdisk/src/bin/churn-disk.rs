//! churn-disk IMAGE PERCENT [SEED]: a guest's writes between two backups.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use cairn_vmdisk::ChurnSpec;
use clap::Parser;

/// Overwrites PERCENT of a raw image with fresh pseudo-random blocks at scattered places,
/// deterministically for a SEED, fsyncs, and prints each written range as "OFFSET LENGTH".
/// For a live disk behind qemu-storage-daemon, write through its NBD export instead (qemu-io),
/// so that its dirty bitmaps record the writes.
#[derive(Debug, Parser)]
#[command(name = "churn-disk", version)]
struct Args {
    /// The raw image to change in place.
    image: PathBuf,
    /// Share of the image to overwrite, in percent (above 0, at most 100).
    percent: f64,
    /// Seed: the same seed writes the same blocks with the same bytes.
    #[arg(default_value_t = 1)]
    seed: u64,
    /// Size of each written block in KiB.
    #[arg(long, default_value_t = 64)]
    block: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let spec = ChurnSpec {
        percent: args.percent,
        seed: args.seed,
        block: args.block.saturating_mul(1024),
    };
    let ranges = cairn_vmdisk::churn(&args.image, &spec)
        .with_context(|| format!("churning {}", args.image.display()))?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (offset, len) in ranges {
        writeln!(out, "{offset} {len}")?;
    }
    out.flush()?;
    Ok(())
}
