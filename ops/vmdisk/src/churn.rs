//! Guest churn between two backups: overwrite a given share of a raw image with fresh
//! pseudo-random blocks at scattered places, deterministically by seed, and say which byte
//! ranges were written so a test can check that an incremental backup saw them.
//!
//! Writes go to the image file itself. A live disk behind qemu-storage-daemon must be written
//! through its NBD export instead (qemu-io), so that its dirty bitmaps record the writes.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::rng::Rng;
use crate::{Error, io_err};

/// What to churn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChurnSpec {
    /// Share of the image to overwrite, in percent (0 < percent ≤ 100).
    pub percent: f64,
    /// The seed: the same seed on the same image size writes the same blocks with the same bytes.
    pub seed: u64,
    /// Size of each written block in bytes (a multiple of 512).
    pub block: u64,
}

impl ChurnSpec {
    pub const DEFAULT_BLOCK: u64 = 64 * 1024;

    fn validate(&self) -> Result<(), Error> {
        if !(self.percent > 0.0 && self.percent <= 100.0) {
            return Err(Error::Spec(format!(
                "churn percent must be above 0 and at most 100, not {}",
                self.percent
            )));
        }
        if self.block == 0 || !self.block.is_multiple_of(512) {
            return Err(Error::Spec(format!(
                "churn block must be a positive multiple of 512 bytes, not {}",
                self.block
            )));
        }
        Ok(())
    }
}

/// The blocks to overwrite: `percent` of `n_blocks`, rounded down but at least one; distinct,
/// sorted.
/// Floyd's sampling, so the cost follows the number picked, not the image size.
pub fn pick_blocks(n_blocks: u64, percent: f64, rng: &mut Rng) -> Vec<u64> {
    let count = ((n_blocks as f64 * percent / 100.0) as u64).clamp(1, n_blocks);
    let mut picked = BTreeSet::new();
    for upper in (n_blocks - count)..n_blocks {
        let candidate = rng.below(upper + 1);
        if !picked.insert(candidate) {
            picked.insert(upper);
        }
    }
    picked.into_iter().collect()
}

/// Overwrites blocks of `image` as `spec` says, fsyncs, and returns the written ranges as
/// `(offset, length)` in offset order.
pub fn churn(image: &Path, spec: &ChurnSpec) -> Result<Vec<(u64, u64)>, Error> {
    spec.validate()?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(io_err(image))?;
    let meta = file.metadata().map_err(io_err(image))?;
    if !meta.is_file() {
        return Err(Error::Spec(format!(
            "{} is not a regular file (churn writes raw image files only)",
            image.display()
        )));
    }
    let n_blocks = meta.len() / spec.block;
    if n_blocks == 0 {
        return Err(Error::Spec(format!(
            "{} ({} bytes) is smaller than one {}-byte block",
            image.display(),
            meta.len(),
            spec.block
        )));
    }
    let mut rng = Rng::new(spec.seed);
    let blocks = pick_blocks(n_blocks, spec.percent, &mut rng);
    let mut buf = vec![0u8; spec.block as usize];
    let mut written = Vec::with_capacity(blocks.len());
    for block_idx in blocks {
        rng.fill(&mut buf);
        let offset = block_idx * spec.block;
        file.write_all_at(&buf, offset).map_err(io_err(image))?;
        written.push((offset, spec.block));
    }
    file.sync_all().map_err(io_err(image))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_share_asked_distinct_sorted_and_reproducible() {
        for (n_blocks, percent, want) in [(1000, 1.0, 10), (1000, 100.0, 1000), (7, 0.01, 1)] {
            let blocks = pick_blocks(n_blocks, percent, &mut Rng::new(3));
            assert_eq!(blocks.len() as u64, want, "{n_blocks} blocks at {percent}%");
            assert!(blocks.windows(2).all(|w| w[0] < w[1]));
            assert!(blocks.iter().all(|&b| b < n_blocks));
            assert_eq!(blocks, pick_blocks(n_blocks, percent, &mut Rng::new(3)));
        }
        assert_ne!(
            pick_blocks(1000, 5.0, &mut Rng::new(1)),
            pick_blocks(1000, 5.0, &mut Rng::new(2))
        );
    }

    #[test]
    fn churn_writes_exactly_the_ranges_it_reports() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        let spec = ChurnSpec {
            percent: 10.0,
            seed: 9,
            block: 4096,
        };
        let ranges = churn(&image, &spec).unwrap();
        assert_eq!(ranges.len(), 25);
        let after = std::fs::read(&image).unwrap();
        for (i, block) in after.chunks(4096).enumerate() {
            let offset = i as u64 * 4096;
            let churned = ranges.iter().any(|&(o, _)| o == offset);
            assert_eq!(block.iter().any(|&b| b != 0), churned, "block at {offset}");
        }
        // Same seed on a fresh copy: the same bytes.
        let again = dir.path().join("again.raw");
        std::fs::write(&again, vec![0u8; 1 << 20]).unwrap();
        assert_eq!(churn(&again, &spec).unwrap(), ranges);
        assert_eq!(std::fs::read(&again).unwrap(), after);
    }

    #[test]
    fn bad_input_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, vec![0u8; 8192]).unwrap();
        for (percent, block, needle) in [
            (0.0, 4096, "percent"),
            (101.0, 4096, "percent"),
            (f64::NAN, 4096, "percent"),
            (5.0, 1000, "multiple of 512"),
            (5.0, 1 << 20, "smaller than one"),
        ] {
            let spec = ChurnSpec {
                percent,
                seed: 1,
                block,
            };
            let err = churn(&image, &spec).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 0));
        let err = churn(
            &dir.path().join("missing.raw"),
            &ChurnSpec {
                percent: 1.0,
                seed: 1,
                block: 4096,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("missing.raw"), "{err}");
    }
}
