//! Running steps on this machine's worker agent, shared by `cairn up` (reports go straight to
//! the in-process engine) and `cairn worker` (reports go over NATS): the agent runs the step
//! on a blocking thread, its report bodies are forwarded in order, and a cancel flag per
//! running step lets a cancelled job stop it. Also the node reports both send: the inventory
//! scan and the repository's free space.
//!
//! This module knows neither the engine nor NATS: the caller says where reports go.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cairn_schemas::{
    Command, JobId, NodeId, Report, ReportBody, StepResult, StepSpec, StepWork, VmInventory,
};
use cairn_worker::agent::Agent;
use tokio::sync::mpsc;

/// Cancel flags of the running steps, by job.
#[derive(Debug, Default)]
pub struct CancelFlags {
    flags: Mutex<HashMap<JobId, Vec<Arc<AtomicBool>>>>,
}

impl CancelFlags {
    /// Asks every running step of `job` to stop.
    pub fn cancel(&self, job: JobId) {
        if let Some(flags) = self.flags.lock().expect("cancel map").get(&job) {
            for flag in flags {
                flag.store(true, Ordering::Relaxed);
            }
        }
    }

    fn register(&self, job: JobId) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        self.flags
            .lock()
            .expect("cancel map")
            .entry(job)
            .or_default()
            .push(flag.clone());
        flag
    }

    fn unregister(&self, job: JobId, flag: &Arc<AtomicBool>) {
        let mut flags = self.flags.lock().expect("cancel map");
        if let Some(of_job) = flags.get_mut(&job) {
            of_job.retain(|f| !Arc::ptr_eq(f, flag));
            if of_job.is_empty() {
                flags.remove(&job);
            }
        }
    }
}

/// Whether a report body says a recovery finished (a new VM may be described on the node, so
/// its inventory should be reported again).
pub fn recovery_finished(body: &ReportBody) -> bool {
    matches!(
        body,
        ReportBody::Succeeded {
            result: StepResult::FinishRecovery { .. }
        }
    )
}

/// Runs `spec` on `agent` on a blocking thread and hands every report to `forward` in order,
/// with `true` for the final one (`Succeeded` or `Failed`); `forward` says whether the report
/// was delivered. The step's cancel flag is registered before this returns, so a cancel that
/// arrives right after is not missed. The future resolves to whether the final report was
/// delivered (`false` also when the agent died without one).
pub fn run_step<F, Fut>(
    agent: Arc<Agent>,
    spec: StepSpec,
    cancels: Arc<CancelFlags>,
    mut forward: F,
) -> impl Future<Output = bool> + Send + 'static
where
    F: FnMut(Report, bool) -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let cancel = cancels.register(spec.job);
    async move {
        let (body_tx, mut body_rx) = mpsc::unbounded_channel();
        let header = spec.clone();
        let step_cancel = cancel.clone();
        let work = tokio::task::spawn_blocking(move || {
            let progress_tx = body_tx.clone();
            let last = agent.execute(
                &spec,
                &mut |body| {
                    let _ = progress_tx.send((body, false));
                },
                &step_cancel,
            );
            let _ = body_tx.send((last, true));
        });
        let mut final_delivered = false;
        while let Some((body, is_final)) = body_rx.recv().await {
            let delivered = forward(header.report(body), is_final).await;
            if is_final {
                final_delivered = delivered;
            }
        }
        let _ = work.await;
        cancels.unregister(header.job, &cancel);
        final_delivered
    }
}

/// The repository a step writes to, if it writes to one.
pub fn written_repository(work: &StepWork) -> Option<&str> {
    match work {
        StepWork::Transfer { repository, .. }
        | StepWork::CommitRecoveryPoint { repository, .. }
        | StepWork::CheckDisk { repository, .. }
        | StepWork::Prune { repository, .. }
        | StepWork::CollectGarbage { repository }
        | StepWork::ImportSeed { repository, .. } => Some(repository),
        _ => None,
    }
}

/// Scans the agent's descriptors (on a blocking thread: probing an image may start
/// `qemu-nbd`); descriptor problems are logged. `None` if the scan could not run.
pub async fn scan_inventory(agent: &Arc<Agent>) -> Option<Vec<VmInventory>> {
    let scan_agent = agent.clone();
    let inventory = tokio::task::spawn_blocking(move || scan_agent.inventory())
        .await
        .ok()?;
    for problem in &inventory.problems {
        tracing::warn!(file = %problem.file.display(), "{}", problem.message);
    }
    Some(inventory.vms)
}

/// The `ReportInventory` command of `node` (`None` if the scan could not run).
pub async fn inventory_command(agent: &Arc<Agent>, node: &NodeId) -> Option<Command> {
    let vms = scan_inventory(agent).await?;
    Some(Command::ReportInventory {
        node: node.clone(),
        vms,
    })
}

/// Measures the filesystem of the repository at `repo_dir` for a `ReportRepositorySpace`
/// command; a repository that cannot be measured here is logged and skipped.
/// `repository` is the name it is reported under (the name steps use), `repo_dir` its folder.
pub async fn space_command(node: &NodeId, repository: &str, repo_dir: &Path) -> Option<Command> {
    let dir = repo_dir.to_path_buf();
    let measured =
        tokio::task::spawn_blocking(move || cairn_worker::repo::maintenance::space(&dir)).await;
    let Ok(Ok((total_bytes, free_bytes))) = measured else {
        tracing::warn!(repo = %repo_dir.display(), "could not measure the repository's free space");
        return None;
    };
    Some(Command::ReportRepositorySpace {
        node: node.clone(),
        repository: repository.to_owned(),
        total_bytes,
        free_bytes,
    })
}

/// The repositories the agent's node registers, by name, for the orchestrators (which refuse
/// a policy naming a repository no node registers).
pub fn repositories_command(node: &NodeId, agent: &Agent) -> Command {
    let settings = &agent.config().settings;
    Command::RegisterRepositories {
        node: node.clone(),
        names: settings.repositories.keys().cloned().collect(),
        app_owner_roots: settings
            .app_owner_roots
            .iter()
            .map(|root| root.to_string_lossy().into_owned())
            .collect(),
    }
}
