//! In-process tests of the repository over an in-memory image.

use proptest::prelude::*;

use super::backup::BackupOptions;
use super::restore::RestoreOptions;
use super::*;
use crate::source::{self, Extent, ExtentKind, Sink, Source};

/// An in-memory disk. `holes` marks 4 KiB blocks the "format" reports as unallocated.
#[derive(Clone)]
struct MemImage {
    data: Vec<u8>,
    fail_after: Option<u64>,
    reads: u64,
}

impl MemImage {
    fn new(data: Vec<u8>) -> MemImage {
        MemImage {
            data,
            fail_after: None,
            reads: 0,
        }
    }
}

impl Source for MemImage {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>, source::Error> {
        // Report 4 KiB-aligned all-zero blocks as zero extents, like a sparse file would.
        let mut out: Vec<Extent> = Vec::new();
        let end = (offset + len).min(self.size());
        let mut at = offset;
        while at < end {
            let next = ((at / 4096 + 1) * 4096).min(end);
            let kind = if is_zero(&self.data[at as usize..next as usize]) {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            };
            match out.last_mut() {
                Some(e) if e.kind == kind => e.len += next - at,
                _ => out.push(Extent {
                    offset: at,
                    len: next - at,
                    kind,
                }),
            }
            at = next;
        }
        Ok(out)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), source::Error> {
        self.reads += 1;
        if self.fail_after.is_some_and(|n| self.reads > n) {
            return Err(source::Error::Io {
                path: "mem".into(),
                source: std::io::Error::other("simulated read failure"),
            });
        }
        buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn describe(&self) -> String {
        "memory image".into()
    }
}

impl Sink for MemImage {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), source::Error> {
        self.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), source::Error> {
        self.data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), source::Error> {
        Ok(())
    }
}

fn repo_in(dir: &std::path::Path, chunk: u64, encrypted: bool) -> Repository {
    let key = dir.join("key");
    let repo_dir = dir.join("repo");
    Repository::init(&repo_dir, chunk, encrypted.then_some(key.as_path())).unwrap()
}

fn do_backup(repo: &Repository, image: &MemImage, disk: &str, now_ms: u64) -> BackupSummary {
    let mut source = image.clone();
    backup(
        repo,
        &mut source,
        &BackupOptions {
            disk: disk.into(),
            now_ms,
            threads: 2,
            rp: None,
            unchanged_since: None,
        },
        &NoProgress,
    )
    .unwrap()
}

fn do_restore(repo: &Repository, disk: &str, rp: &str, size: usize) -> Vec<u8> {
    let mut sink = MemImage::new(vec![0; size]);
    let opts = RestoreOptions {
        disk: disk.into(),
        rp: Some(rp.into()),
        delta: false,
        threads: 2,
        known: None,
    };
    restore(repo, &opts, &mut sink, &NoProgress).unwrap();
    sink.data
}

/// Pseudo-random bytes from a seed (xorshift), compressible when `text` is set.
fn fill(seed: u64, len: usize, text: bool) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if text {
                b"cairn backs up virtual machines "[(x % 32) as usize]
            } else {
                x as u8
            }
        })
        .collect()
}

fn churn(image: &mut [u8], seed: u64, writes: usize) {
    let mut x = seed | 1;
    for _ in 0..writes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = (x as usize) % image.len();
        let len = ((x >> 32) as usize % 20_000).min(image.len() - at);
        let kind = (x >> 60) % 3;
        let bytes = match kind {
            0 => vec![0; len],
            1 => fill(x, len, true),
            _ => fill(x, len, false),
        };
        image[at..at + len].copy_from_slice(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    /// restore(backup(x)) == x for every recovery point of a lineage under random churn.
    #[test]
    fn every_recovery_point_restores_exactly(
        seed in any::<u64>(),
        size_blocks in 1usize..200,
        tail in 0usize..4096,
        rounds in 1usize..12,
        encrypted in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo_in(dir.path(), 4096, encrypted);
        let size = size_blocks * 4096 + tail / 512 * 512;
        let mut image = vec![0u8; size];
        churn(&mut image, seed, 8);
        let mut history = Vec::new();
        for round in 0..rounds {
            let summary = do_backup(&repo, &MemImage::new(image.clone()), "disk0", 1000 + round as u64);
            history.push((summary.rp, image.clone()));
            churn(&mut image, seed.wrapping_add(round as u64 + 1), 3);
        }
        for (rp, expected) in &history {
            prop_assert!(do_restore(&repo, "disk0", rp, size) == *expected, "recovery point {} differs", rp);
        }
        let report = verify(&repo, None, 2, &NoProgress).unwrap();
        prop_assert!(report.ok);
    }
}

#[test]
fn incremental_stores_only_changed_chunks_and_zeros_cost_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path(), 65536, false);
    let mut image = vec![0u8; 64 * 65536];
    image[..16 * 65536].copy_from_slice(&fill(1, 16 * 65536, false));
    let full = do_backup(&repo, &MemImage::new(image.clone()), "d", 1);
    assert_eq!(full.chunks_new, 16);
    assert_eq!(full.chunks_zero, 48);
    assert_eq!(full.bytes_read, 16 * 65536, "zero extents are not read");
    image[5 * 65536 + 10] ^= 1;
    image[40 * 65536..41 * 65536].copy_from_slice(&fill(2, 65536, false));
    let incr = do_backup(&repo, &MemImage::new(image.clone()), "d", 2);
    assert_eq!(incr.chunks_new, 2);
    assert_eq!(incr.chunks_unchanged, 15);
    assert!(!incr.full_index);
    assert!(incr.bytes_stored < 3 * 65536);
    assert_eq!(do_restore(&repo, "d", &incr.rp, image.len()), image);
}

#[test]
fn full_index_is_consolidated_every_n_recovery_points() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path(), 4096, false);
    let mut image = fill(3, 100 * 4096, true);
    let mut fulls = Vec::new();
    for i in 0..20u64 {
        image[(i as usize * 4096)..(i as usize * 4096 + 10)].copy_from_slice(b"0123456789");
        fulls.push(do_backup(&repo, &MemImage::new(image.clone()), "d", i + 1).full_index);
    }
    let expected: Vec<bool> = (0..20).map(|i| i % 8 == 0).collect();
    assert_eq!(fulls, expected);
}

#[test]
fn delta_restore_writes_only_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path(), 65536, true);
    let image = fill(4, 32 * 65536, true);
    let rp = do_backup(&repo, &MemImage::new(image.clone()), "d", 1).rp;
    let mut target = image.clone();
    target[3 * 65536] ^= 0xff;
    target[20 * 65536..21 * 65536].fill(0);
    let mut sink = MemImage::new(target);
    let opts = RestoreOptions {
        disk: "d".into(),
        rp: Some(rp),
        delta: true,
        threads: 2,
        known: None,
    };
    let summary = restore(&repo, &opts, &mut sink, &NoProgress).unwrap();
    assert_eq!(sink.data, image);
    assert_eq!(summary.chunks_written, 2);
    assert_eq!(summary.chunks_same, 30);
    assert_eq!(summary.bytes_written, 2 * 65536);
    let mut wrong_size = MemImage::new(vec![0; 65536]);
    let opts = RestoreOptions {
        disk: "d".into(),
        rp: None,
        delta: true,
        threads: 2,
        known: None,
    };
    assert!(matches!(
        restore(&repo, &opts, &mut wrong_size, &NoProgress),
        Err(Error::SizeMismatch { .. })
    ));
}

#[test]
fn delta_restore_onto_a_known_recovery_point_writes_the_index_difference_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path(), 65536, true);
    let first = fill(5, 32 * 65536, true);
    let rp1 = do_backup(&repo, &MemImage::new(first.clone()), "d", 1).rp;
    let mut second = first.clone();
    second[7 * 65536 + 1] ^= 0x55;
    second[9 * 65536..10 * 65536].fill(0);
    second[30 * 65536..31 * 65536].copy_from_slice(&fill(6, 65536, false));
    let rp2 = do_backup(&repo, &MemImage::new(second.clone()), "d", 2).rp;
    // The target holds rp1 (as its stamp would say); restore rp2 onto it and back.
    for (holds, wanted, image) in [(&rp1, &rp2, &second), (&rp2, &rp1, &first)] {
        let start = if image == &second { &first } else { &second };
        let mut sink = MemImage::new(start.clone());
        let opts = RestoreOptions {
            disk: "d".into(),
            rp: Some(wanted.clone()),
            delta: true,
            threads: 2,
            known: Some(holds.clone()),
        };
        let summary = restore(&repo, &opts, &mut sink, &NoProgress).unwrap();
        assert_eq!(&sink.data, image);
        assert_eq!(sink.reads, 0, "a known target is not read");
        assert_eq!(summary.known.as_deref(), Some(holds.as_str()));
        assert_eq!(summary.chunks_written, 3);
        assert_eq!(summary.bytes_written, 3 * 65536);
    }
    // An unknown recovery point falls back to reading and comparing.
    let mut sink = MemImage::new(first.clone());
    let opts = RestoreOptions {
        disk: "d".into(),
        rp: Some(rp2.clone()),
        delta: true,
        threads: 2,
        known: Some("0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d00".into()),
    };
    let summary = restore(&repo, &opts, &mut sink, &NoProgress).unwrap();
    assert_eq!(sink.data, second);
    assert_eq!(summary.known, None);
    assert!(sink.reads > 0);
}

#[test]
fn flipped_byte_names_damaged_recovery_points_and_others_still_restore() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path(), 65536, false);
    let base = fill(5, 8 * 65536, false);
    let rp_a = do_backup(&repo, &MemImage::new(base.clone()), "a", 1).rp;
    let other = fill(6, 8 * 65536, false);
    let rp_b = do_backup(&repo, &MemImage::new(other.clone()), "b", 1).rp;
    let pack_dir = repo.packs_dir("a");
    let pack = std::fs::read_dir(&pack_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[pack::HEADER_LEN as usize + 100] ^= 0x01;
    std::fs::write(&pack, bytes).unwrap();

    let report = verify(&repo, None, 2, &NoProgress).unwrap();
    assert!(!report.ok);
    let a = report.disks.iter().find(|d| d.disk == "a").unwrap();
    assert_eq!(a.damaged_rps.len(), 1);
    assert_eq!(a.damaged_rps[0].rp, rp_a);
    assert_eq!(a.damaged_rps[0].n_damaged_chunks, 1);
    assert_eq!(a.damaged_rps[0].damaged_chunks[0].pos, 0);
    let b = report.disks.iter().find(|d| d.disk == "b").unwrap();
    assert!(b.damaged_rps.is_empty());
    assert_eq!(do_restore(&repo, "b", &rp_b, other.len()), other);

    let mut sink = MemImage::new(vec![0; base.len()]);
    let opts = RestoreOptions {
        disk: "a".into(),
        rp: None,
        delta: false,
        threads: 2,
        known: None,
    };
    let err = restore(&repo, &opts, &mut sink, &NoProgress).unwrap_err();
    assert!(matches!(err, Error::DamagedChunk { pos: 0, .. }), "{err}");

    // The next backup heals: the damaged chunk is stored again although the parent "has" it.
    let healed = do_backup(&repo, &MemImage::new(base.clone()), "a", 2);
    assert_eq!(healed.chunks_new, 1);
    assert_eq!(do_restore(&repo, "a", &healed.rp, base.len()), base);
}

#[test]
fn interrupted_backup_leaves_repository_consistent_and_rerun_reuses_durable_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path(), 65536, false);
    // 3 packs' worth of incompressible data, so some packs are durable before the failure.
    let image = fill(7, 1600 * 65536, false);
    let mut failing = MemImage::new(image.clone());
    failing.fail_after = Some(15);
    let opts = BackupOptions {
        disk: "d".into(),
        now_ms: 1,
        threads: 2,
        rp: None,
        unchanged_since: None,
    };
    let err = backup(&repo, &mut failing, &opts, &NoProgress).unwrap_err();
    assert!(err.to_string().contains("simulated read failure"), "{err}");
    assert!(
        repo.list(Some("d")).unwrap().is_empty(),
        "no recovery point from a failed backup"
    );
    assert!(
        !pack::list_packs(&repo.packs_dir("d")).unwrap().is_empty(),
        "finished packs are durable"
    );
    assert!(verify(&repo, None, 2, &NoProgress).unwrap().ok);

    let rerun = do_backup(&repo, &MemImage::new(image.clone()), "d", 2);
    assert!(
        rerun.chunks_reused >= 500,
        "reused only {}",
        rerun.chunks_reused
    );
    assert_eq!(rerun.chunks_new + rerun.chunks_reused, 1600);
    assert_eq!(do_restore(&repo, "d", &rerun.rp, image.len()), image);
}

/// A progress that truncates a file the second time the backup asks whether to go on.
struct TruncateMidway {
    path: std::path::PathBuf,
    to: u64,
    asked: std::sync::atomic::AtomicU32,
}

impl Progress for TruncateMidway {
    fn start(&self, _what: &str, _total: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
    fn cancelled(&self) -> bool {
        let n = self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n == 1 {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.path)
                .unwrap();
            file.set_len(self.to).unwrap();
        }
        false
    }
}

#[test]
fn a_raw_image_truncated_during_its_backup_fails_it_and_publishes_nothing() {
    // The raw image is mapped batch by batch: batches mapped before the truncation fault past
    // the new end (the guard turns that into zeros and a mark), those after it see holes; both
    // must fail the backup, not store zeros as the disk's content.
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path(), 65536, false);
    let path = dir.path().join("disk.raw");
    let image = fill(11, 64 * 65536 * 6, true);
    std::fs::write(&path, &image).unwrap();
    let mut source = source::open_source(&path, Some(source::ImageFormat::Raw)).unwrap();
    let opts = BackupOptions {
        disk: "d".into(),
        now_ms: 1,
        threads: 2,
        rp: None,
        unchanged_since: None,
    };
    let progress = TruncateMidway {
        path: path.clone(),
        to: 64 * 65536,
        asked: Default::default(),
    };
    let err = backup(&repo, source.as_mut(), &opts, &progress).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("became shorter"), "{text}");
    assert!(text.contains("disk.raw"), "names the image: {text}");
    assert!(
        repo.list(Some("d")).unwrap().is_empty(),
        "nothing published"
    );
    assert!(verify(&repo, None, 2, &NoProgress).unwrap().ok);

    // The same file, whole again, backs up and restores exactly: mapped reads are the bytes.
    std::fs::write(&path, &image).unwrap();
    let mut source = source::open_source(&path, Some(source::ImageFormat::Raw)).unwrap();
    let summary = backup(&repo, source.as_mut(), &opts, &NoProgress).unwrap();
    assert_eq!(do_restore(&repo, "d", &summary.rp, image.len()), image);
}

#[test]
fn forget_keeps_the_newest_restorable_and_gc_reclaims() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path(), 65536, false);
    let mut image = fill(8, 600 * 65536, false);
    let mut history = Vec::new();
    for i in 0..5u64 {
        let rp = do_backup(&repo, &MemImage::new(image.clone()), "d", i + 1).rp;
        history.push((rp, image.clone()));
        // Replace a third of the disk each time so old packs become mostly dead.
        let start = (i as usize % 3) * 200 * 65536;
        image[start..start + 200 * 65536].copy_from_slice(&fill(100 + i, 200 * 65536, false));
    }
    let before = maintenance::stats(&repo).unwrap();
    let forgot = maintenance::forget(&repo, "d", 2).unwrap();
    assert_eq!(forgot.removed.len(), 3);
    assert_eq!(forgot.consolidated.as_deref(), Some(history[3].0.as_str()));
    for (rp, expected) in &history[3..] {
        assert_eq!(&do_restore(&repo, "d", rp, expected.len()), expected);
    }
    let gc = maintenance::gc(&repo).unwrap();
    assert!(gc.bytes_freed > 0, "{gc:?}");
    let after = maintenance::stats(&repo).unwrap();
    assert!(
        after.pack_bytes < before.pack_bytes * 3 / 4,
        "{} vs {}",
        after.pack_bytes,
        before.pack_bytes
    );
    for (rp, expected) in &history[3..] {
        assert_eq!(&do_restore(&repo, "d", rp, expected.len()), expected);
    }
    assert!(verify(&repo, None, 2, &NoProgress).unwrap().ok);
    assert!(matches!(
        maintenance::forget(&repo, "d", 0),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn locks_exclude_gc_while_a_backup_holds_the_lineage() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path(), 65536, false);
    do_backup(&repo, &MemImage::new(fill(9, 4 * 65536, false)), "d", 1);
    let held = repo
        .lock("d", lineage::LockKind::Write, fsutil::LockMode::Exclusive)
        .unwrap();
    let gc = maintenance::gc(&repo).unwrap();
    assert!(
        gc.disks[0]
            .skipped
            .as_deref()
            .unwrap_or("")
            .contains("busy"),
        "{gc:?}"
    );
    let mut source = MemImage::new(vec![0; 65536]);
    let err = backup(
        &repo,
        &mut source,
        &BackupOptions {
            disk: "d".into(),
            now_ms: 2,
            threads: 1,
            rp: None,
            unchanged_since: None,
        },
        &NoProgress,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Busy { .. }));
    drop(held);
}

#[test]
fn bad_repositories_and_keys_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let not_repo = dir.path().join("empty");
    std::fs::create_dir(&not_repo).unwrap();
    assert!(matches!(
        Repository::open(&not_repo, None),
        Err(Error::NotARepository { .. })
    ));
    let key = dir.path().join("key");
    let repo_dir = dir.path().join("enc");
    Repository::init(&repo_dir, 65536, Some(&key)).unwrap();
    assert!(matches!(
        Repository::open(&repo_dir, None),
        Err(Error::KeyRequired { .. })
    ));
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "f".repeat(64)).unwrap();
    // Open to group or others: refused before it is tried, with the fix in the message.
    use std::os::unix::fs::PermissionsExt;
    for (mode, who) in [
        (0o644, "readable by others"),
        (0o640, "readable by its group"),
    ] {
        std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = Repository::open(&repo_dir, Some(&wrong)).unwrap_err();
        assert!(matches!(err, Error::KeyFileExposed { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "key file {} is {who} (mode {mode:04o}): chmod 600 it",
                wrong.display()
            )
        );
    }
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(
        Repository::open(&repo_dir, Some(&wrong)),
        Err(Error::WrongKey { .. })
    ));
    std::fs::write(&wrong, "short").unwrap();
    assert!(matches!(
        Repository::open(&repo_dir, Some(&wrong)),
        Err(Error::BadKeyFile { .. })
    ));
    assert!(matches!(
        Repository::init(&repo_dir, 65536, None),
        Err(Error::AlreadyExists { .. })
    ));
    assert!(matches!(
        Repository::init(&dir.path().join("x"), 5000, None),
        Err(Error::InvalidChunkSize(5000))
    ));
    // What an init killed before its config was renamed into place leaves (an empty disks/,
    // a config temp file) is no repository: a new init takes the folder. Anything more, or a
    // disks/ with something in it, is refused and kept.
    let interrupted = dir.path().join("interrupted");
    std::fs::create_dir_all(interrupted.join("disks")).unwrap();
    std::fs::write(interrupted.join(".cairn-repo.json.4242-0.tmp"), b"{ half").unwrap();
    Repository::init(&interrupted, 65536, None).unwrap();
    assert!(Repository::open(&interrupted, None).is_ok());
    for (extra, inside_disks) in [(Some("notes.txt"), false), (None, true)] {
        let taken = dir.path().join(format!("taken-{inside_disks}"));
        std::fs::create_dir_all(taken.join("disks")).unwrap();
        if let Some(extra) = extra {
            std::fs::write(taken.join(extra), b"mine").unwrap();
        }
        if inside_disks {
            std::fs::create_dir(taken.join("disks/vm")).unwrap();
        }
        assert!(matches!(
            Repository::init(&taken, 65536, None),
            Err(Error::AlreadyExists { .. })
        ));
        assert!(taken.join("disks").is_dir(), "nothing removed");
    }
    std::fs::write(repo_dir.join("cairn-repo.json"), b"{ not json").unwrap();
    assert!(matches!(
        Repository::open(&repo_dir, Some(&key)),
        Err(Error::CorruptConfig { .. })
    ));
    for bad in ["", ".hidden", "a/b", "../x", &"x".repeat(129)] {
        assert!(lineage::validate_disk_id(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn backup_with_a_given_rp_id_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path(), 65536, false);
    let image = MemImage::new(fill(10, 8 * 65536, false));
    let rp = backup::new_rp_id(5);
    let opts = BackupOptions {
        disk: "d".into(),
        now_ms: 5,
        threads: 2,
        rp: Some(rp.clone()),
        unchanged_since: None,
    };
    let first = backup(&repo, &mut image.clone(), &opts, &NoProgress).unwrap();
    let again = backup(&repo, &mut image.clone(), &opts, &NoProgress).unwrap();
    assert_eq!(first.rp, rp);
    assert_eq!(again.rp, rp);
    assert_eq!(
        repo.list(Some("d")).unwrap().len(),
        1,
        "a retried step makes no second recovery point"
    );
    let bad = BackupOptions {
        rp: Some("not-a-uuid".into()),
        ..opts
    };
    assert!(matches!(
        backup(&repo, &mut image.clone(), &bad, &NoProgress),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn forget_of_chosen_recovery_points_keeps_the_others_restorable() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path(), 65536, false);
    let mut image = fill(9, 120 * 65536, false);
    let mut history = Vec::new();
    for i in 0..5u64 {
        let rp = do_backup(&repo, &MemImage::new(image.clone()), "d", i + 1).rp;
        history.push((rp, image.clone()));
        churn(&mut image, 200 + i, 20);
    }
    // Remove the first and the third: the second and fourth lose ancestors and are rewritten
    // full; an id not in the catalog (a retried prune) is skipped.
    let remove = vec![
        history[0].0.clone(),
        history[2].0.clone(),
        "0190aaaa-0000-7000-8000-000000000000".to_owned(),
    ];
    let forgot = maintenance::forget_rps(&repo, "d", &remove).unwrap();
    assert_eq!(
        forgot.removed,
        vec![history[0].0.clone(), history[2].0.clone()]
    );
    assert_eq!(forgot.kept.len(), 3);
    for i in [1, 3, 4] {
        let (rp, expected) = &history[i];
        assert_eq!(
            &do_restore(&repo, "d", rp, expected.len()),
            expected,
            "rp {i}"
        );
    }
    // Again: nothing left to remove.
    let again = maintenance::forget_rps(&repo, "d", &remove).unwrap();
    assert!(again.removed.is_empty());
    // Never every recovery point of a disk.
    let all: Vec<String> = forgot.kept.clone();
    let err = maintenance::forget_rps(&repo, "d", &all).unwrap_err();
    assert!(err.to_string().contains("keeps at least one"), "{err}");
    let gc = maintenance::gc(&repo).unwrap();
    assert!(gc.disks.iter().all(|d| d.skipped.is_none()), "{gc:?}");
    for i in [1, 3, 4] {
        let (rp, expected) = &history[i];
        assert_eq!(
            &do_restore(&repo, "d", rp, expected.len()),
            expected,
            "rp {i} after gc"
        );
    }
}
proptest! {
    #![proptest_config(ProptestConfig { cases: 10, .. ProptestConfig::default() })]

    /// Random reads of every recovery point of a lineage (delta chains included) through
    /// [`image::RpImage`] equal the bytes that were backed up, with a cache smaller than the disk.
    #[test]
    fn random_access_reads_every_recovery_point_exactly(
        seed in any::<u64>(),
        size_blocks in 1usize..120,
        tail in 0usize..4096,
        rounds in 1usize..6,
        encrypted in any::<bool>(),
        reads in proptest::collection::vec((any::<u64>(), 0usize..20_000), 1..40),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo_in(dir.path(), 4096, encrypted);
        let size = size_blocks * 4096 + tail / 512 * 512;
        let mut image = vec![0u8; size];
        churn(&mut image, seed, 8);
        let mut history = Vec::new();
        for round in 0..rounds {
            let summary = do_backup(&repo, &MemImage::new(image.clone()), "disk0", 1000 + round as u64);
            history.push((summary.rp, image.clone()));
            churn(&mut image, seed.wrapping_add(round as u64 + 1), 3);
        }
        for (rp, expected) in &history {
            let view = image::RpImage::open(&repo, "disk0", Some(rp), 3).unwrap();
            prop_assert_eq!(view.header().disk_size, size as u64);
            for &(at, len) in &reads {
                let at = (at % size as u64) as usize;
                let len = len.min(size - at);
                let mut buf = vec![0xAAu8; len];
                view.read_exact_at(at as u64, &mut buf).unwrap();
                prop_assert!(buf == expected[at..at + len], "rp {} differs at {}+{}", rp, at, len);
            }
            let mut past = [0u8; 2];
            prop_assert!(view.read_exact_at(size as u64 - 1, &mut past).is_err());
        }
    }
}

#[test]
fn random_access_reports_a_damaged_chunk_and_holds_off_gc() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo_in(dir.path(), 4096, false);
    let data = fill(9, 8 * 4096, false);
    let rp = do_backup(&repo, &MemImage::new(data.clone()), "d", 1).rp;
    let view = image::RpImage::open(&repo, "d", Some(&rp), 4).unwrap();
    let gc = maintenance::gc(&repo).unwrap();
    assert!(
        gc.disks[0]
            .skipped
            .as_deref()
            .is_some_and(|s| s.contains("busy")),
        "gc must skip a disk being read: {gc:?}"
    );
    drop(view);
    let pack = std::fs::read_dir(repo.packs_dir("d"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "pack"))
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&pack, bytes).unwrap();
    let view = image::RpImage::open(&repo, "d", Some(&rp), 4).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = view.read_exact_at(0, &mut buf).unwrap_err();
    assert!(matches!(err, Error::DamagedChunk { pos: 0, .. }), "{err}");
}
