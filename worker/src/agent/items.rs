//! Item-level recovery on the worker: the `ExtractItems` step (files and folders of one disk of
//! a recovery point into a target folder) and the quick browse query, both read straight from
//! the repository through [`RpImage`] — no restore first.
//!
//! The target folder must lie below one of the node's recovery roots; it is opened (created)
//! from the root's descriptor and everything is written below it through descriptors. The
//! limits are the node's ([`crate::boundary::NodeSettings::item_limits`]).
//!
//! Must not: write anywhere but below the step's target folder, or change the repository.

use std::path::Path;
use std::sync::Arc;

use cairn_schemas::ids::{DiskId, RecoveryPointId, VmId};
use cairn_schemas::v1::{StepResult, StepSpec};

use super::progress::StepProgress;
use super::{Agent, Error, lineage_id};
use crate::items::{Disk, Limits, Node};
use crate::repo::image::{DEFAULT_CACHE_CHUNKS, RpImage};

/// Most skipped-item lines carried back in a step result.
const MAX_SKIPPED_REPORTED: usize = 200;

/// A step's item extraction.
pub(crate) struct ExtractWork<'a> {
    pub disk: &'a DiskId,
    pub repository: &'a str,
    pub rp: RecoveryPointId,
    pub items: &'a [String],
    pub target_path: &'a str,
}

fn open_disk(
    agent: &Agent,
    repository: &str,
    vm: VmId,
    disk: &DiskId,
    rp: RecoveryPointId,
) -> Result<Disk, Error> {
    let repo = super::image::open_repository(agent, repository)?;
    let lineage = lineage_id(vm, disk)?;
    let image = RpImage::open(&repo, &lineage, Some(&rp.to_string()), DEFAULT_CACHE_CHUNKS)
        .map_err(|source| Error::Repo {
            repository: repository.to_owned(),
            source,
        })?;
    Disk::open(Arc::new(image)).map_err(Error::Items)
}

pub(crate) fn extract(
    agent: &Agent,
    spec: &StepSpec,
    work: &ExtractWork<'_>,
    progress: &StepProgress<'_>,
) -> Result<StepResult, Error> {
    let target = Path::new(work.target_path);
    if !target.is_absolute() {
        return Err(Error::InvalidStep(format!(
            "target folder {:?} is not an absolute path",
            work.target_path
        )));
    }
    // The target must lie below a recovery root: refused before the repository is opened.
    agent
        .config
        .settings
        .below(crate::boundary::RootKind::Recovery, target)?;
    let disk = open_disk(agent, work.repository, spec.vm, work.disk, work.rp)?;
    let root = super::recovery::target_folder(agent, target, true)?;
    let limits = agent.config.settings.item_limits(None);
    let report = disk
        .extract_into(work.items, root, &limits, progress)
        .map_err(|e| match e {
            crate::items::Error::Cancelled => Error::Cancelled,
            e => Error::Items(e),
        })?;
    tracing::info!(
        files = report.files, dirs = report.dirs, bytes = report.bytes,
        skipped = report.skipped.len(), target = %target.display(), "items extracted"
    );
    let mut skipped: Vec<String> = report
        .skipped
        .iter()
        .take(MAX_SKIPPED_REPORTED)
        .map(|s| format!("{}: {}", s.path, s.reason))
        .collect();
    if report.skipped.len() > MAX_SKIPPED_REPORTED {
        skipped.push(format!(
            "… and {} more",
            report.skipped.len() - MAX_SKIPPED_REPORTED
        ));
    }
    Ok(StepResult::ExtractItems {
        disk: work.disk.clone(),
        files: report.files,
        dirs: report.dirs,
        bytes: report.bytes,
        skipped,
    })
}

/// Lists `path` inside disk `disk` of recovery point `rp` of VM `vm` (a quick query, not a
/// step: nothing is written).
pub fn browse(
    agent: &Agent,
    repository: &str,
    vm: VmId,
    disk: &DiskId,
    rp: RecoveryPointId,
    path: &str,
) -> Result<Vec<Node>, Error> {
    let disk = open_disk(agent, repository, vm, disk, rp)?;
    disk.browse(path, &Limits::default()).map_err(Error::Items)
}
