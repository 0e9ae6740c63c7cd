//! The steps of consistency checks, verify, prune, gc and seed imports.
//!
//! - `CheckDisk`: a consistency check of one disk is a transfer that reads the whole disk of
//!   the snapshot and compares each chunk's id with the replica's at that position; chunks that
//!   differ (or that verify found damaged) are stored as the repaired recovery point. It
//!   reports how many chunks it compared and how many differed.
//! - `VerifyDisk`: re-hashes the disk's lineage and names damaged recovery points (their
//!   chunk ids go to the lineage's damaged list, so the check stores them again).
//! - `Prune`: forgets the listed recovery points of one disk, keeping the rest restorable.
//! - `CollectGarbage`: reclaims space nobody references, lineage by lineage.
//! - `ImportSeed`: copies the latest recovery point of one disk from a seed folder written by
//!   `cairn seed export` into the repository, through a temporary sparse raw image in the
//!   repository's own folder (removed afterwards). The seed folder must lie below one of the
//!   node's seed roots.
//!
//! Must not: decide what to remove or check (the orchestrator does), or touch lineages of
//! other VMs than the step's (gc excepted, which only drops what nothing references).

use std::path::{Path, PathBuf};

use cairn_schemas::ids::{DiskId, RecoveryPointId};
use cairn_schemas::v1::{DiskSource, StepResult, StepSpec};

use super::image::{self, TransferWork, open_repository};
use super::progress::StepProgress;
use super::{Agent, Error, lineage_id};
use crate::repo::{self, Repository};
use crate::source;

fn repo_error(repository: &str) -> impl Fn(repo::Error) -> Error + '_ {
    move |source| Error::Repo {
        repository: repository.to_owned(),
        source,
    }
}

/// What a check step needs besides the spec.
pub(crate) struct CheckWork<'a> {
    pub(crate) source: &'a DiskSource,
    pub(crate) snapshot: &'a str,
    pub(crate) repository: &'a str,
    pub(crate) rp: RecoveryPointId,
    pub(crate) parent_rp: Option<RecoveryPointId>,
    pub(crate) chunk_size: u32,
}

pub(crate) fn check_disk(
    agent: &Agent,
    spec: &StepSpec,
    work: &CheckWork<'_>,
    progress: &StepProgress<'_>,
) -> Result<StepResult, Error> {
    let transfer = TransferWork {
        source: work.source,
        snapshot: work.snapshot,
        repository: work.repository,
        rp: work.rp,
        parent_rp: work.parent_rp,
        chunk_size: work.chunk_size,
    };
    let outcome = if super::is_live_handle(work.snapshot) {
        super::qemu::check(agent, spec, &transfer, progress)?
    } else {
        image::transfer_outcome(agent, spec, &transfer, progress)?
    };
    tracing::info!(
        disk = %work.source.disk,
        chunks = outcome.chunks_total,
        differing = outcome.chunks_differing,
        "consistency check compared the disk with its replica"
    );
    Ok(StepResult::CheckDisk {
        disk: work.source.disk.clone(),
        chunks_compared: outcome.chunks_total,
        chunks_differing: outcome.chunks_differing,
        bytes_read: outcome.bytes_read,
        bytes_stored: outcome.bytes_stored,
    })
}

pub(crate) fn verify_disk(
    agent: &Agent,
    spec: &StepSpec,
    repository: &str,
    disk: &DiskId,
    progress: &StepProgress<'_>,
) -> Result<StepResult, Error> {
    let lineage = lineage_id(spec.vm, disk)?;
    let repo = open_repository(agent, repository)?;
    let report = repo::verify::verify(&repo, Some(&lineage), agent.config.threads, progress)
        .map_err(repo_error(repository))?;
    let disk_report = report
        .disks
        .into_iter()
        .next()
        .ok_or_else(|| Error::InvalidStep(format!("verify of {lineage} reported no disk")))?;
    if let Some(error) = disk_report.error {
        // The lineage is in use (a backup or gc holds it): try again later.
        return Err(Error::Repo {
            repository: repository.to_owned(),
            source: repo::Error::Busy {
                disk: lineage,
                what: error,
            },
        });
    }
    let mut damaged_rps = Vec::new();
    let mut n_damaged_chunks = 0;
    for damaged in &disk_report.damaged_rps {
        n_damaged_chunks = n_damaged_chunks.max(damaged.n_damaged_chunks);
        match damaged.rp.parse::<RecoveryPointId>() {
            Ok(rp) => damaged_rps.push(rp),
            Err(_) => {
                tracing::warn!(rp = %damaged.rp, "a damaged recovery point with an id cairn did not make")
            }
        }
    }
    Ok(StepResult::VerifyDisk {
        disk: disk.clone(),
        chunks_checked: report.chunks_checked,
        damaged_rps,
        n_damaged_chunks,
    })
}

pub(crate) fn prune(
    agent: &Agent,
    spec: &StepSpec,
    repository: &str,
    disk: &DiskId,
    remove: &[RecoveryPointId],
) -> Result<StepResult, Error> {
    let lineage = lineage_id(spec.vm, disk)?;
    let repo = open_repository(agent, repository)?;
    let remove: Vec<String> = remove.iter().map(ToString::to_string).collect();
    let summary =
        repo::maintenance::forget_rps(&repo, &lineage, &remove).map_err(repo_error(repository))?;
    let removed = summary
        .removed
        .iter()
        .filter_map(|rp| rp.parse().ok())
        .collect();
    Ok(StepResult::Prune {
        disk: disk.clone(),
        removed,
    })
}

pub(crate) fn collect_garbage(agent: &Agent, repository: &str) -> Result<StepResult, Error> {
    let repo = open_repository(agent, repository)?;
    let summary = repo::maintenance::gc(&repo).map_err(repo_error(repository))?;
    Ok(StepResult::CollectGarbage {
        bytes_freed: summary.bytes_freed,
    })
}

/// What a seed import step needs besides the spec.
pub(crate) struct SeedWork<'a> {
    pub(crate) disk: &'a DiskId,
    pub(crate) seed: &'a str,
    pub(crate) repository: &'a str,
    pub(crate) rp: RecoveryPointId,
}

/// Removes the temporary image of a seed import when dropped.
struct TempImage(PathBuf);

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(crate) fn import_seed(
    agent: &Agent,
    spec: &StepSpec,
    work: &SeedWork<'_>,
    progress: &StepProgress<'_>,
) -> Result<StepResult, Error> {
    let lineage = lineage_id(spec.vm, work.disk)?;
    let seed_dir = Path::new(work.seed);
    if !seed_dir.is_absolute() {
        return Err(Error::InvalidStep(format!(
            "seed folder {:?} is not an absolute path",
            work.seed
        )));
    }
    // Seeds are read only below the node's seed roots; refused before anything is opened.
    agent
        .config
        .settings
        .below(crate::boundary::RootKind::Seed, seed_dir)?;
    let repo = open_repository(agent, work.repository)?;
    let seed = Repository::open(seed_dir, agent.config.key_file.as_deref())
        .map_err(repo_error(work.seed))?;
    // A retried attempt whose predecessor stored the recovery point reports it again.
    if let Ok(done) = repo::restore::resolve(&repo, &lineage, Some(&work.rp.to_string())) {
        return Ok(StepResult::ImportSeed {
            disk: work.disk.clone(),
            bytes_stored: done.bytes_stored,
        });
    }
    let header = repo::restore::resolve(&seed, &lineage, None).map_err(repo_error(work.seed))?;
    progress.start_total(header.disk_size * 2);
    let temp = TempImage(
        repo.root
            .join(format!(".seed-{}-{}.raw", spec.vm, work.disk)),
    );
    let _ = std::fs::remove_file(&temp.0);
    let source_error = |source| Error::Source {
        disk: work.disk.to_string(),
        source,
    };
    let mut sink = source::create_sink(&temp.0, source::ImageFormat::Raw, header.disk_size)
        .map_err(source_error)?;
    repo::restore(
        &seed,
        &repo::restore::RestoreOptions {
            disk: lineage.clone(),
            rp: None,
            delta: false,
            known: None,
            threads: agent.config.threads,
        },
        sink.as_mut(),
        progress,
    )
    .map_err(repo_error(work.seed))?;
    drop(sink);
    let mut image =
        source::open_source(&temp.0, Some(source::ImageFormat::Raw)).map_err(source_error)?;
    let summary = repo::backup(
        &repo,
        image.as_mut(),
        &repo::BackupOptions {
            disk: lineage,
            now_ms: work.rp.unix_millis(),
            threads: agent.config.threads,
            rp: Some(work.rp.to_string()),
            unchanged_since: None,
        },
        progress,
    )
    .map_err(repo_error(work.repository))?;
    Ok(StepResult::ImportSeed {
        disk: work.disk.clone(),
        bytes_stored: summary.bytes_stored,
    })
}
