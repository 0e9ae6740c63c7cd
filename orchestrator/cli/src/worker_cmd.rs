//! `cairn worker`: one node's worker in a distributed deployment. It takes the node's steps
//! from NATS ([`WorkerBus`]), runs them on the worker agent exactly as `cairn up` does
//! ([`crate::step_runner`]), publishes the reports, answers browse requests and cancel
//! notices, and keeps the orchestrators informed: `RegisterNode` at start and after every
//! reconnect, `ReportInventory` every 30 s and after a recovery described a new VM,
//! `ReportRepositorySpace` for the repositories its steps write to.
//!
//! A service: no progress bars, everything logs through tracing. On SIGTERM it stops taking
//! steps and gives the running ones up to 30 s to finish; a step still running then is
//! handed to the node's next worker by NATS (its message was never acknowledged).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_orchestrator::bus::commands::WireReply;
use cairn_orchestrator::bus::{self, NatsOptions, WorkerBus};
use cairn_schemas::{Command, NodeId};
use cairn_worker::agent::{Agent, AgentConfig, fault::FaultDelays};
use cairn_worker::boundary::NodeSettings;
use clap::Args;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::step_runner::{
    CancelFlags, inventory_command, recovery_finished, repositories_command, run_step,
    space_command, written_repository,
};

/// Most steps one worker runs at once.
const MAX_PARALLEL: usize = 64;
/// How long running steps may take to finish after SIGTERM.
const DRAIN_FOR: Duration = Duration::from_secs(30);
/// How often the inventory and the repositories' space are reported.
const REPORT_EVERY: Duration = Duration::from_secs(30);
/// How long a command to the orchestrators is retried while none answers.
const COMMAND_FOR: Duration = Duration::from_secs(15);

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// A TOML configuration file (`ops/cairn.toml`); flags and environment win over it.
    #[arg(long, env = "CAIRN_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS server URL; several separated by commas for a cluster.
    #[arg(long, env = "CAIRN_NATS")]
    pub nats: Option<String>,
    /// This node's name (the hypervisor host).
    #[arg(long, env = "CAIRN_NODE")]
    pub node: Option<String>,
    /// Folder of this node's VM descriptors.
    #[arg(long, env = "CAIRN_VMS_DIR")]
    pub vms: Option<PathBuf>,
    /// The hypervisor cluster this node belongs to.
    #[arg(long, env = "CAIRN_CLUSTER")]
    pub cluster: Option<String>,
    /// Key file, when repositories are encrypted.
    #[arg(long, env = "CAIRN_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Steps run at once (default 3).
    #[arg(long)]
    pub parallel: Option<usize>,
    /// NATS credentials file (JWT and NKey seed).
    #[arg(long, env = "CAIRN_NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// CA certificate of the NATS servers (TLS is required when given).
    #[arg(long, visible_alias = "nats-tls-ca", env = "CAIRN_NATS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate for NATS (mutual TLS).
    #[arg(long, visible_alias = "nats-tls-cert", env = "CAIRN_NATS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Key of the client certificate.
    #[arg(long, visible_alias = "nats-tls-key", env = "CAIRN_NATS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// A folder recoveries may write below (repeat; replaces `[worker] recovery_roots`).
    #[arg(long = "recovery-root", value_name = "DIR")]
    pub recovery_roots: Vec<PathBuf>,
    /// A folder seed imports may read from (repeat; replaces `[worker] seed_roots`).
    #[arg(long = "seed-root", value_name = "DIR")]
    pub seed_roots: Vec<PathBuf>,
    /// A folder VM descriptors' disks may lie in (repeat; replaces `[worker] image_roots`).
    #[arg(long = "image-root", value_name = "DIR")]
    pub image_roots: Vec<PathBuf>,
}

/// The worker's settings after merging flags, environment, the configuration file and
/// defaults (see `config`).
#[derive(Debug)]
pub struct WorkerSettings {
    pub nats: String,
    pub node: String,
    pub vms: PathBuf,
    pub cluster: String,
    pub key_file: Option<PathBuf>,
    pub parallel: usize,
    pub creds: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The node's boundary: registered repositories, roots, limits.
    pub boundary: NodeSettings,
}

/// A repeatable flag given at least once, else `None`.
fn flag_list(values: Vec<PathBuf>) -> Option<Vec<PathBuf>> {
    (!values.is_empty()).then_some(values)
}

/// The node's boundary from the flags and the file: roots (a flag replaces the file's list),
/// limits and the registered repositories (`[repositories.NAME]`; none by default, so a
/// worker without them refuses every step that names a repository).
fn boundary(
    args: &mut WorkerArgs,
    worker: &crate::config::WorkerConfig,
    repositories: &std::collections::BTreeMap<String, crate::config::RepositoryConfig>,
) -> NodeSettings {
    use crate::config::pick_opt;
    let defaults = cairn_worker::items::Limits::default();
    let mut settings = NodeSettings {
        recovery_roots: pick_opt(
            flag_list(std::mem::take(&mut args.recovery_roots)),
            worker.recovery_roots.clone(),
        )
        .unwrap_or_default(),
        app_owner_roots: worker.app_owner_roots.clone().unwrap_or_default(),
        seed_roots: pick_opt(
            flag_list(std::mem::take(&mut args.seed_roots)),
            worker.seed_roots.clone(),
        )
        .unwrap_or_default(),
        image_roots: pick_opt(
            flag_list(std::mem::take(&mut args.image_roots)),
            worker.image_roots.clone(),
        )
        .unwrap_or_default(),
        allow_block_devices: worker.allow_block_devices.unwrap_or(false),
        item_limits: cairn_worker::items::Limits {
            max_entries: worker.max_item_entries.unwrap_or(defaults.max_entries),
            max_total_bytes: worker.max_item_bytes.unwrap_or(defaults.max_total_bytes),
            max_file_bytes: worker.max_item_file_size.unwrap_or(defaults.max_file_bytes),
            max_depth: worker.max_item_depth.unwrap_or(defaults.max_depth),
            max_dir_entries: defaults.max_dir_entries,
        },
        ..NodeSettings::default()
    };
    for (name, repo) in repositories {
        settings = settings.with_repository(name, &repo.path, repo.encryption);
    }
    settings
}

fn settings(mut args: WorkerArgs) -> Result<WorkerSettings> {
    use crate::config::{pick, pick_opt};
    let file = match &args.config {
        Some(path) => crate::config::load(path)?,
        None => crate::config::CairnConfig::default(),
    };
    let boundary = boundary(&mut args, &file.worker, &file.repositories);
    let (nats, worker) = (file.nats, file.worker);
    Ok(WorkerSettings {
        boundary,
        nats: pick_opt(args.nats, nats.url.map(|urls| urls.join(",")))
            .context("--nats URL is required (or [nats] url in the configuration file)")?,
        node: pick_opt(args.node, worker.node.map(|n| n.to_string()))
            .context("--node NAME is required (or [worker] node in the configuration file)")?,
        vms: pick_opt(args.vms, worker.vms_dir)
            .context("--vms DIR is required (or [worker] vms_dir in the configuration file)")?,
        cluster: pick(
            args.cluster,
            worker.cluster.map(|c| c.to_string()),
            "default".into(),
        ),
        key_file: pick_opt(args.key_file, worker.key_file),
        parallel: pick(args.parallel, worker.parallel.map(|p| p as usize), 3),
        creds: pick_opt(args.creds, nats.creds),
        tls_ca: pick_opt(args.tls_ca, nats.tls_ca),
        tls_cert: pick_opt(args.tls_cert, nats.tls_cert),
        tls_key: pick_opt(args.tls_key, nats.tls_key),
    })
}

pub fn run(args: WorkerArgs) -> Result<i32> {
    let args = settings(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: WorkerSettings) -> Result<i32> {
    let node = NodeId::new(args.node.clone())
        .map_err(|e| anyhow::anyhow!("--node {:?}: {e}", args.node))?;
    if !(1..=MAX_PARALLEL).contains(&args.parallel) {
        anyhow::bail!("--parallel {}: must be 1 to {MAX_PARALLEL}", args.parallel);
    }
    if args.cluster.trim().is_empty() || args.cluster.chars().any(char::is_control) {
        anyhow::bail!("--cluster {:?}: must be a non-empty name", args.cluster);
    }
    if !args.vms.is_dir() {
        anyhow::bail!(
            "--vms {}: not a folder (the node's VM descriptors)",
            args.vms.display()
        );
    }
    let faults = FaultDelays::from_env().map_err(|e| anyhow::anyhow!("{e}"))?;
    let agent = Arc::new(
        Agent::new(AgentConfig {
            node: node.clone(),
            vms_dir: args.vms.clone(),
            key_file: args.key_file.clone(),
            threads: 0,
            settings: args.boundary.clone(),
        })?
        .with_fault_delays(faults),
    );
    let client = bus::connect(&NatsOptions {
        url: args.nats.clone(),
        creds: args.creds.clone(),
        tls_ca: args.tls_ca.clone(),
        tls_cert: args.tls_cert.clone(),
        tls_key: args.tls_key.clone(),
        name: format!("cairn-worker-{node}"),
        inbox_prefix: Some(bus::node_inbox_prefix(&node)),
    })
    .await?;
    let bus = Arc::new(WorkerBus::connect(client, node.clone(), args.parallel).await?);

    let cancels: Arc<CancelFlags> = Arc::default();
    let cancel_flags = cancels.clone();
    bus.on_cancel(move |job| cancel_flags.cancel(job)).await?;
    let browse_agent = agent.clone();
    bus.serve_browse(move |request| {
        let agent = browse_agent.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                crate::items_cmd::browse_on_worker(&agent, &request)
            })
            .await
            .map_err(|e| format!("browse worker failed: {e}"))?
        })
    })
    .await?;

    // Repositories the node's steps wrote to, whose free space is reported.
    let repositories: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let (rescan_tx, rescan_rx) = mpsc::unbounded_channel::<()>();
    let (stop_tx, stop_rx) = watch::channel(false);
    let reports_task = tokio::spawn(node_reports(
        bus.clone(),
        agent.clone(),
        args.cluster.clone(),
        repositories.clone(),
        rescan_rx,
        stop_rx,
    ));
    // The handlers are installed before the line that tells a supervisor we are up, so a
    // SIGTERM right after it is a clean stop, never the default action.
    let shutdown = crate::up::shutdown_signal();
    println!(
        "cairn worker of node {node}: steps from NATS at {}, VMs in {}",
        args.nats,
        args.vms.display()
    );

    let slots = Arc::new(Semaphore::new(args.parallel));
    let mut running = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while running.try_join_next().is_some() {}
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.expect("the step slots are never closed"),
        };
        let (spec, lease) = tokio::select! {
            () = &mut shutdown => break,
            taken = bus.next_step() => taken,
        };
        tracing::info!(step = %spec.step, attempt = spec.attempt, job = %spec.job,
            kind = ?spec.kind(), delivered = lease.delivered(), "step taken");
        if let Some(repository) = written_repository(&spec.work) {
            repositories
                .lock()
                .expect("repository set")
                .insert(repository.to_string());
        }
        let report_bus = bus.clone();
        let rescan = rescan_tx.clone();
        let step = spec.step;
        let run = run_step(
            agent.clone(),
            spec,
            cancels.clone(),
            move |report, is_final| {
                if recovery_finished(&report.body) {
                    let _ = rescan.send(());
                }
                let bus = report_bus.clone();
                async move {
                    match bus.report(&report, is_final).await {
                        Ok(()) => true,
                        Err(e) if is_final => {
                            tracing::warn!(step = %report.step, error = %e, "final report not delivered");
                            false
                        }
                        Err(e) => {
                            tracing::debug!(step = %report.step, error = %e, "progress report lost");
                            false
                        }
                    }
                }
            },
        );
        running.spawn(async move {
            let delivered = run.await;
            if delivered {
                if let Err(e) = lease.finish().await {
                    // The report is durable; a redelivered step reruns idempotently.
                    tracing::warn!(%step, error = %e, "could not acknowledge the step");
                }
            } else {
                lease.release(Duration::from_secs(5)).await;
            }
            drop(slot);
        });
    }

    let n_running = running.len();
    if n_running > 0 {
        tracing::warn!(
            steps = n_running,
            "stopping: no new steps; waiting up to {} s for the running ones",
            DRAIN_FOR.as_secs()
        );
    }
    let drained = tokio::time::timeout(DRAIN_FOR, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            steps = running.len(),
            "steps still running at exit; NATS hands them to the node's next worker"
        );
    }
    let _ = stop_tx.send(true);
    let _ = reports_task.await;
    Ok(0)
}

/// Sends one command; `true` if an orchestrator accepted it. A refusal (a command this
/// node's identity may not send, an invalid inventory) is logged as an error with the
/// orchestrator's code, and counts as a failure: registration is tried again later.
async fn send(bus: &WorkerBus, command: Command) -> bool {
    let what = command_name(&command);
    match bus.send_command(command, COMMAND_FOR).await {
        Ok(reply) => match WireReply::decode(&reply).map(WireReply::into_result) {
            Ok(Ok(accepted)) => {
                tracing::debug!(command = what, seq = accepted.seq, "command accepted");
                true
            }
            Ok(Err(refused)) => {
                tracing::error!(
                    command = what,
                    code = %refused.code(),
                    "the orchestrators refused the command: {refused}"
                );
                false
            }
            Err(e) => {
                tracing::error!(command = what, error = %e, "unreadable answer to a command");
                false
            }
        },
        Err(e) => {
            tracing::warn!(command = what, error = %e, "no orchestrator answered");
            false
        }
    }
}

fn command_name(command: &Command) -> &'static str {
    match command {
        Command::RegisterNode { .. } => "RegisterNode",
        Command::ReportInventory { .. } => "ReportInventory",
        Command::ReportRepositorySpace { .. } => "ReportRepositorySpace",
        Command::RegisterRepositories { .. } => "RegisterRepositories",
        _ => "command",
    }
}

async fn report_inventory(bus: &WorkerBus, agent: &Arc<Agent>) {
    if let Some(command) = inventory_command(agent, bus.node()).await {
        send(bus, command).await;
    }
}

async fn report_spaces(
    bus: &WorkerBus,
    settings: &NodeSettings,
    repositories: &Mutex<BTreeSet<String>>,
) {
    let repositories: Vec<String> = repositories
        .lock()
        .expect("repository set")
        .iter()
        .cloned()
        .collect();
    for repository in repositories {
        // Measured at the registered folder, reported under the name the steps used.
        let Ok((_, registered)) = settings.repository(&repository) else {
            continue;
        };
        if let Some(command) = space_command(bus.node(), &repository, &registered.path).await {
            send(bus, command).await;
        }
    }
}

/// Registration and inventory: `RegisterNode` whenever the client has (re)connected and no
/// registration went through since, then the inventory; the inventory and repository space
/// every 30 s; the inventory again when a recovery finished.
async fn node_reports(
    bus: Arc<WorkerBus>,
    agent: Arc<Agent>,
    cluster: String,
    repositories: Arc<Mutex<BTreeSet<String>>>,
    mut rescan: mpsc::UnboundedReceiver<()>,
    mut stop: watch::Receiver<bool>,
) {
    let mut registered_at_connect = 0u64;
    let mut every = tokio::time::interval(REPORT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        let connects = bus.connects();
        if connects != registered_at_connect {
            let register = Command::RegisterNode {
                node: bus.node().clone(),
                cluster: cluster.clone(),
                worker_version: env!("CARGO_PKG_VERSION").into(),
            };
            let registered = tokio::select! {
                _ = stop.changed() => return,
                ok = send(&bus, register) => ok,
            };
            if registered {
                tracing::info!(node = %bus.node(), "registered with the orchestrators");
                registered_at_connect = connects;
                send(&bus, repositories_command(bus.node(), &agent)).await;
                report_inventory(&bus, &agent).await;
                report_spaces(&bus, &agent.config().settings, &repositories).await;
                every.reset();
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = every.tick() => {
                report_inventory(&bus, &agent).await;
                report_spaces(&bus, &agent.config().settings, &repositories).await;
            }
            Some(()) = rescan.recv() => report_inventory(&bus, &agent).await,
            _ = check.tick() => {}
        }
    }
}
