//! `cairn up`: the whole system in one process, with no server to install: the orchestrator
//! engine on a sled event log, an in-process step bus, a worker for this node, the repository
//! in the data folder, and the HTTP API.
//!
//! Data folder layout: `events/` (sled event log), `snapshot.bin` (projection snapshot),
//! `repo/` (repository), `repo.key` (its generated key, when `cairn up` made it encrypted),
//! `audit.key` (the audit key that keys the event log's hash chain), `checkpoint.key` (this
//! orchestrator's checkpoint signing key), `checkpoints/` (signed checkpoints of the log; move
//! it elsewhere with `--checkpoints DIR`), `vms/` (this node's VM descriptors), `images/` (demo disks), `recovered/` (the default
//! recovery root), `seeds/` (the default seed root), `nodes/NAME/vms/` (descriptors of the
//! `--extra-node`s).
//!
//! The repository is registered as `default` (groups name it so); recoveries write only below
//! `DATA/recovered` and the `--recovery-root`s, seeds are read only from `DATA/seeds` and the
//! `--seed-root`s, and descriptors' disks must lie in `DATA/vms`, `DATA/images` or an
//! `--image-root` (see `cairn_worker::boundary`).
//!
//! Everything in the data folder is private to the user running cairn: the folder is 0700,
//! and the process's umask gains `077` before anything is created, so files made without an
//! explicit mode (the event log's, the demo's images) are 0600 as well. A new repository is
//! encrypted unless `--no-encrypt` is given; an existing one keeps what it is.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_orchestrator::audit::keys as audit_keys;
use cairn_orchestrator::audit::{
    CheckpointPolicy, CheckpointTrust, Checkpointer, CheckpointerConfig, FolderSink,
};
use cairn_orchestrator::clock::{Clock, SystemClock};
use cairn_orchestrator::control::BoxFuture;
use cairn_orchestrator::engine::jobs::EngineConfig;
use cairn_orchestrator::engine::ports::StepSink;
use cairn_orchestrator::engine::service::{Engine, EngineOptions, Handle};
use cairn_orchestrator::log::{SledLog, SledLogConfig};
use cairn_orchestrator::notify::address::{AllowEntry, AllowList};
use cairn_orchestrator::notify::webhook;
use cairn_orchestrator::notify::{Notifier, NotifyConfig};
use cairn_orchestrator::policy::tz::TimeZone;
use cairn_schemas::{BrowseEntry, BrowseRequest, Command, JobId, NodeId, StepSpec};
use cairn_worker::agent::{Agent, AgentConfig, fault::FaultDelays};
use cairn_worker::boundary::{Encryption, NodeSettings};
use cairn_worker::perms::{self, PrivateDir};
use cairn_worker::repo::Repository;
use clap::Args;
use tokio::sync::{mpsc, watch};

use crate::step_runner::{
    CancelFlags, inventory_command, recovery_finished, repositories_command, run_step,
    space_command,
};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where cairn keeps its event log, repository and VM descriptors.
    #[arg(long, env = "CAIRN_DATA_DIR", default_value = "cairn-data")]
    pub data_dir: PathBuf,
    /// Address of the HTTP API. Off loopback it needs --tls-cert/--tls-key (or
    /// --insecure-http).
    #[arg(long, env = "CAIRN_LISTEN", default_value = "127.0.0.1:7480")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub api: crate::api_server::ApiServerArgs,
    /// Create two demo VMs with realistic disks and a protection group, and back them up.
    #[arg(long)]
    pub demo: bool,
    /// This node's name.
    #[arg(long, env = "CAIRN_NODE", default_value = "local")]
    pub node: String,
    /// Key file of the repository (default: `DATA/repo.key`, generated with a new repository).
    /// It must be owned by the user running cairn and private to it (mode 0600).
    #[arg(long, env = "CAIRN_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Make a new repository without encryption (an existing repository keeps what it is).
    #[arg(long, conflicts_with = "key_file")]
    pub no_encrypt: bool,
    /// Parallel backups per node.
    #[arg(long, default_value_t = 3)]
    pub backups_per_node: usize,
    /// Time zone of protection groups' schedules: UTC, a fixed offset (+02:00), an offset
    /// with a daylight-saving rule (+01:00/eu, -05:00/us) or a name like Europe/Berlin.
    #[arg(long, env = "CAIRN_TIMEZONE", default_value = "UTC", value_parser = parse_timezone)]
    pub timezone: TimeZone,
    /// Parallel recoveries per node; more wait in the queue (reason NodeBusy).
    #[arg(long, default_value_t = 8)]
    pub recoveries_per_node: usize,
    /// More nodes served by this process, each with its descriptor folder
    /// `DATA/nodes/NAME/vms` (a lab, or one host with several hypervisor folders). Repeat.
    #[arg(long = "extra-node", value_name = "NAME")]
    pub extra_nodes: Vec<String>,
    /// SMTP relay (`host:port`, plain SMTP) for recovery e-mail notifications.
    #[arg(long, env = "CAIRN_SMTP")]
    pub smtp: Option<String>,
    /// Sender address of notification e-mail (default `cairn@<node>.localdomain`).
    #[arg(long, env = "CAIRN_SMTP_FROM")]
    pub smtp_from: Option<String>,
    /// A host, address or CIDR network webhooks may reach although it is loopback, link-local
    /// or private (e.g. 127.0.0.1, hooks.internal, 10.0.0.0/8). Repeat, or separate with
    /// commas.
    #[arg(long = "webhook-allow", env = "CAIRN_WEBHOOK_ALLOW", value_name = "HOST|ADDRESS|CIDR",
          value_delimiter = ',', value_parser = AllowEntry::parse)]
    pub webhook_allow: Vec<AllowEntry>,
    /// Extra CA certificates (PEM) trusted for webhooks' servers, besides the system's.
    #[arg(long, env = "CAIRN_WEBHOOK_CA_FILE", value_name = "PEM")]
    pub webhook_ca_file: Option<PathBuf>,
    /// Another folder recoveries may write below, besides `DATA/recovered` (repeat).
    #[arg(long = "recovery-root", value_name = "DIR")]
    pub recovery_roots: Vec<PathBuf>,
    /// Another folder recoveries asked by app-owner tokens may write below, besides
    /// `DATA/recovered/owners`; each inside a recovery root (repeat).
    #[arg(long = "app-owner-root", value_name = "DIR")]
    pub app_owner_roots: Vec<PathBuf>,
    /// Another folder seed imports may read from, besides `DATA/seeds` (repeat).
    #[arg(long = "seed-root", value_name = "DIR")]
    pub seed_roots: Vec<PathBuf>,
    /// Another folder VM descriptors' disks may lie in, besides `DATA/vms` and `DATA/images`
    /// (repeat).
    #[arg(long = "image-root", value_name = "DIR")]
    pub image_roots: Vec<PathBuf>,
    /// Folder of the signed audit checkpoints (default `DATA/checkpoints`); best on another
    /// disk or machine than the event log.
    #[arg(long, env = "CAIRN_CHECKPOINTS", value_name = "DIR")]
    pub checkpoints: Option<PathBuf>,
    /// Sign a checkpoint of the event log after this many new events.
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_every_events: u64,
    /// Sign a checkpoint after this many minutes when there were new events.
    #[arg(long, default_value_t = 10)]
    pub checkpoint_every_minutes: u64,
}

/// The audit key in the data folder, made at the first start.
pub const AUDIT_KEY_FILE: &str = "audit.key";
/// The checkpoint signing key in the data folder, made at the first start.
pub const SIGNING_KEY_FILE: &str = "checkpoint.key";

/// The name `cairn up` registers its repository (`DATA/repo`) under.
pub const REPOSITORY_NAME: &str = "default";

/// The boundary of `cairn up`'s nodes: repository `default` at `DATA/repo` (encryption
/// required unless it is plain), recovery roots `DATA/recovered` and `--recovery-root`s,
/// app-owner roots `DATA/recovered/owners` and `--app-owner-root`s, seed
/// roots `DATA/seeds` and `--seed-root`s, image roots `DATA/vms`, `DATA/images` and
/// `--image-root`s. `data` is the canonical data folder.
fn node_settings(args: &UpArgs, data: &Path, encrypted: bool) -> Result<NodeSettings> {
    let absolute = |flag: &str, dirs: &[PathBuf]| -> Result<Vec<PathBuf>> {
        dirs.iter()
            .map(|d| std::path::absolute(d).with_context(|| format!("{flag} {}", d.display())))
            .collect()
    };
    let mut recovery_roots = vec![data.join("recovered")];
    recovery_roots.extend(absolute("--recovery-root", &args.recovery_roots)?);
    let mut app_owner_roots = vec![data.join("recovered").join("owners")];
    app_owner_roots.extend(absolute("--app-owner-root", &args.app_owner_roots)?);
    let mut seed_roots = vec![data.join("seeds")];
    seed_roots.extend(absolute("--seed-root", &args.seed_roots)?);
    let mut image_roots = vec![data.join("vms"), data.join("images")];
    image_roots.extend(absolute("--image-root", &args.image_roots)?);
    let encryption = if encrypted {
        Encryption::Required
    } else {
        Encryption::None
    };
    let settings = NodeSettings {
        recovery_roots,
        app_owner_roots,
        seed_roots,
        image_roots,
        ..NodeSettings::default()
    }
    .with_repository(REPOSITORY_NAME, data.join("repo"), encryption);
    settings.validate()?;
    Ok(settings)
}

fn parse_timezone(text: &str) -> Result<TimeZone, String> {
    TimeZone::parse(text).map_err(|e| e.to_string())
}

/// The in-process bus: steps go to this node's worker, cancels to its running steps.
struct LocalBus {
    steps: mpsc::UnboundedSender<StepSpec>,
    running: Arc<CancelFlags>,
    /// This node's worker, for quick queries (browse) that are not steps.
    agent: Arc<Agent>,
}

impl StepSink for LocalBus {
    fn dispatch(&self, spec: StepSpec) {
        let _ = self.steps.send(spec);
    }

    fn cancel(&self, job: JobId) {
        self.running.cancel(job);
    }

    /// Browsing runs on this process's worker, on a blocking thread: it reads the repository.
    fn browse(
        &self,
        node: NodeId,
        request: BrowseRequest,
    ) -> BoxFuture<'static, Result<Vec<BrowseEntry>, String>> {
        let agent = self.agent.clone();
        Box::pin(async move {
            if &node != agent.node() {
                return Err(format!("node {node} has no worker in this process"));
            }
            tokio::task::spawn_blocking(move || {
                crate::items_cmd::browse_on_worker(&agent, &request)
            })
            .await
            .map_err(|e| format!("browse worker failed: {e}"))?
        })
    }
}

pub fn run(args: UpArgs) -> Result<i32> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: UpArgs) -> Result<i32> {
    // The API's settings and TLS files are checked first too: a refusal changes nothing.
    let api = crate::api_server::ApiServer::new(args.listen, args.api.clone())?;
    cairn_worker::perms::restrict_umask();
    // The key is checked before anything is created: a refused key changes nothing.
    let plan = RepoPlan::new(&args)?;
    // So are existing audit keys.
    let audit_path = args.data_dir.join(AUDIT_KEY_FILE);
    if audit_path.symlink_metadata().is_ok() {
        audit_keys::read_audit_key(&audit_path)?;
    }
    let signing_path = args.data_dir.join(SIGNING_KEY_FILE);
    if signing_path.symlink_metadata().is_ok() {
        audit_keys::read_signing_key(&signing_path)?;
    }
    // So is the webhook CA file.
    let webhook_roots = match &args.webhook_ca_file {
        Some(path) => webhook::read_ca_file(path)?,
        None => Vec::new(),
    };
    let data = args.data_dir.clone();
    if let PrivateDir::Restricted { from } = perms::private_dir(&data)? {
        tracing::warn!(data = %data.display(), from = format!("{from:04o}"), "the data folder was open to group or others; it is 0700 now");
    }
    let data = data
        .canonicalize()
        .with_context(|| format!("{}", data.display()))?;
    for sub in [
        "events",
        "vms",
        "images",
        "recovered",
        "recovered/owners",
        "seeds",
    ] {
        perms::private_dir(&data.join(sub))?;
    }
    let repo_dir = data.join("repo");
    let key_file = plan.key_file(&data);
    if plan.create {
        Repository::init(&repo_dir, 64 * 1024, key_file.as_deref())?;
        tracing::info!(repo = %repo_dir.display(), "created the repository");
        print_new_repository(&repo_dir, key_file.as_deref());
    }
    Repository::open(&repo_dir, key_file.as_deref())?;
    let settings = node_settings(&args, &data, key_file.is_some())?;
    let node = NodeId::new(args.node.clone())
        .map_err(|e| anyhow::anyhow!("--node {:?}: {e}", args.node))?;

    let (audit_key, created) = audit_keys::ensure_audit_key(&data.join(AUDIT_KEY_FILE))?;
    if created {
        tracing::info!(file = %data.join(AUDIT_KEY_FILE).display(), "made the audit key");
    }
    let (signing_key, _) = audit_keys::ensure_signing_key(&data.join(SIGNING_KEY_FILE))?;
    let log =
        SledLog::open(SledLogConfig::new(data.join("events")).with_audit_key(Some(audit_key)))
            .context("opening the event log")?;
    let checkpoint_sink = FolderSink::new(
        args.checkpoints
            .clone()
            .unwrap_or_else(|| data.join("checkpoints")),
    );
    let checkpointer = Checkpointer::new(
        log.clone(),
        Arc::new(SystemClock),
        CheckpointerConfig {
            sink: checkpoint_sink.clone(),
            signing_key,
            signer: args.node.clone(),
            policy: CheckpointPolicy {
                every_events: args.checkpoint_every_events,
                every_ms: args.checkpoint_every_minutes.saturating_mul(60_000),
            },
            poll: Duration::from_secs(1),
        },
    )
    .context("starting the checkpoint writer")?;
    let epoch = SystemClock.now_ms();
    let options = EngineOptions {
        config: EngineConfig {
            repository: REPOSITORY_NAME.into(),
            // The worker runs in this process: steps of an earlier run died with it.
            orphan_grace_ms: 0,
            backups_per_node: args.backups_per_node,
            timezone: args.timezone,
            recoveries_per_node: args.recoveries_per_node.max(1),
            ..EngineConfig::default()
        },
        epoch,
        actor: "orchestrator".into(),
        snapshot_path: Some(data.join("snapshot.bin")),
        snapshot_every: 50_000,
        tick: Duration::from_millis(250),
        ownership: None,
    };
    let faults = FaultDelays::from_env().map_err(|e| anyhow::anyhow!("{e}"))?;
    let agent = Arc::new(
        Agent::new(AgentConfig {
            node: node.clone(),
            vms_dir: data.join("vms"),
            key_file: key_file.clone(),
            threads: 0,
            settings: settings.clone(),
        })?
        .with_fault_delays(faults.clone()),
    );
    let mut agents: HashMap<NodeId, Arc<Agent>> = HashMap::new();
    agents.insert(node.clone(), agent.clone());
    for name in &args.extra_nodes {
        let extra =
            NodeId::new(name.clone()).map_err(|e| anyhow::anyhow!("--extra-node {name:?}: {e}"))?;
        if agents.contains_key(&extra) {
            anyhow::bail!("node {extra} is named twice");
        }
        let vms_dir = data.join("nodes").join(extra.as_str()).join("vms");
        perms::private_dir(&data.join("nodes"))?;
        perms::private_dir(&data.join("nodes").join(extra.as_str()))?;
        perms::private_dir(&vms_dir)?;
        let extra_agent = Agent::new(AgentConfig {
            node: extra.clone(),
            vms_dir,
            key_file: key_file.clone(),
            threads: 0,
            settings: settings.clone(),
        })?
        .with_fault_delays(faults.clone());
        agents.insert(extra, Arc::new(extra_agent));
    }
    let agents = Arc::new(agents);
    // Nodes whose inventory should be reported now (a recovery described a new VM there).
    let (rescan_tx, mut rescan_rx) = mpsc::unbounded_channel::<NodeId>();

    let (steps_tx, mut steps_rx) = mpsc::unbounded_channel();
    let running: Arc<CancelFlags> = Arc::default();
    let bus = Arc::new(LocalBus {
        steps: steps_tx,
        running: running.clone(),
        agent: agent.clone(),
    });
    let (engine, handle) = Engine::start(log, options, Arc::new(SystemClock), bus).await?;
    handle.set_checkpoint_trust(CheckpointTrust {
        sink: checkpoint_sink,
        extra_keys: Vec::new(),
        trust_sink_keys: true,
    });
    let from = args
        .smtp_from
        .clone()
        .unwrap_or_else(|| format!("cairn@{node}.localdomain"));
    if cairn_orchestrator::engine::recovery::check_email(&from).is_err() {
        anyhow::bail!("--smtp-from {from:?} is not a plain local@domain address");
    }
    let mut notify = NotifyConfig::new(args.smtp.clone(), from);
    notify.hostname = format!("{node}.localdomain");
    notify.webhook_allow = AllowList::new(args.webhook_allow.clone());
    notify.webhook_roots = webhook_roots;
    let engine = engine.with_notifier(Notifier::new(notify));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let wait_shutdown = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let engine_task = tokio::spawn(engine.run(wait_shutdown(shutdown_rx.clone())));
    let checkpoint_task = tokio::spawn(checkpointer.run(wait_shutdown(shutdown_rx.clone())));

    // Worker: run each dispatched step on a blocking thread; forward its reports.
    let worker_handle = handle.clone();
    let worker_agents = agents.clone();
    let worker_task = tokio::spawn(async move {
        while let Some(spec) = steps_rx.recv().await {
            let handle = worker_handle.clone();
            let rescan = rescan_tx.clone();
            // A step for a node this process does not serve goes to this node's agent, which
            // refuses it (wrong node) with a clear report.
            let agent = worker_agents
                .get(&spec.node)
                .or_else(|| worker_agents.values().next())
                .expect("at least this node's agent")
                .clone();
            let step = run_step(agent, spec, running.clone(), move |report, _final| {
                if recovery_finished(&report.body) {
                    let _ = rescan.send(report.node.clone());
                }
                let handle = handle.clone();
                async move {
                    handle.report(report).await;
                    true
                }
            });
            tokio::spawn(step);
        }
    });

    // Inventory: register the nodes, then report their VMs now, every 30 seconds, and when a
    // recovery has described a new VM.
    let inventory_handle = handle.clone();
    let inventory_agents = agents.clone();
    let inventory_node = node.clone();
    let inventory_repo = repo_dir.clone();
    let mut inventory_stop = shutdown_rx.clone();
    let inventory_task = tokio::spawn(async move {
        let mut nodes: Vec<&NodeId> = inventory_agents.keys().collect();
        nodes.sort();
        for node in &nodes {
            let register = Command::RegisterNode {
                node: (*node).clone(),
                cluster: "local".into(),
                worker_version: env!("CARGO_PKG_VERSION").into(),
            };
            if let Err(e) = inventory_handle
                .submit_as(format!("node:{node}"), None, register)
                .await
            {
                tracing::error!(node = %node, error = %e, "could not register the node");
            }
            let repositories = repositories_command(node, &inventory_agents[*node]);
            if let Err(e) = inventory_handle
                .submit_as(format!("node:{node}"), None, repositories)
                .await
            {
                tracing::error!(node = %node, error = %e, "could not register the node's repositories");
            }
        }
        // Probing a non-raw disk starts a qemu-nbd, so the inventory is not rescanned too often.
        let mut every = tokio::time::interval(Duration::from_secs(30));
        let stop = async move {
            let _ = inventory_stop.wait_for(|stop| *stop).await;
        };
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = every.tick() => {
                    for node in &nodes {
                        report_inventory(&inventory_handle, &inventory_agents[*node], node).await;
                    }
                    report_space(&inventory_handle, &inventory_node, &inventory_repo).await;
                }
                Some(node) = rescan_rx.recv() => {
                    if let Some(agent) = inventory_agents.get(&node) {
                        report_inventory(&inventory_handle, agent, &node).await;
                    }
                }
                () = &mut stop => return,
            }
        }
    });

    // The admin token, before the API serves anyone: made at the first start, kept after.
    let token_file = data.join(crate::token_cmd::DATA_TOKEN_FILE);
    let secret = crate::token_cmd::bootstrap(&handle, &token_file, "cairn up (bootstrap)").await?;
    let api = api
        .serve(Arc::new(handle.clone()), shutdown_rx.clone())
        .await?;
    // Where this user's CLI finds it for this address; the data folder's copy stays the truth.
    match crate::token_cmd::save_for_cli(&secret, api.addr, &api.client_url) {
        Ok(paths) => tracing::info!(paths = ?paths, "saved the admin token for the CLI"),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "could not save the admin token for the CLI; use --token-file DATA/admin.token")
        }
    }
    let stop_signal = shutdown_signal();
    println!(
        "cairn is up: API on {}, data in {}",
        api.url,
        data.display()
    );
    println!("  try: cairn vm list --server {}", api.client_url);
    println!(
        "  admin token: {} (the CLI of this user finds it by itself)",
        token_file.display()
    );

    if args.demo {
        let demo_handle = handle.clone();
        let demo_agent = agent.clone();
        let demo_node = node.clone();
        let server = api.client_url.clone();
        tokio::spawn(async move {
            if let Err(e) =
                crate::demo::run(&demo_handle, &demo_agent, &demo_node, &data, &server).await
            {
                eprintln!("demo failed: {e:#}");
            }
        });
    }

    stop_signal.await;
    println!("shutting down");
    let _ = shutdown_tx.send(true);
    let _ = engine_task.await;
    // After the engine: the last checkpoint covers everything it appended.
    let _ = checkpoint_task.await;
    let _ = api.task.await;
    inventory_task.abort();
    worker_task.abort();
    Ok(0)
}

/// What `cairn up` does with its repository, decided before anything is written.
#[derive(Debug)]
struct RepoPlan {
    /// No repository yet: make one.
    create: bool,
    key: KeyChoice,
}

#[derive(Debug)]
enum KeyChoice {
    /// A plain repository (an existing one, or `--no-encrypt`).
    None,
    /// `--key-file`.
    Given(PathBuf),
    /// `DATA/repo.key`: read, or generated with a new repository.
    Default,
}

impl RepoPlan {
    /// Reads the repository's config (if any) and the key file it will use, so that a key
    /// cairn would refuse is refused before the data folder is touched.
    fn new(args: &UpArgs) -> Result<RepoPlan> {
        let repo_dir = args.data_dir.join("repo");
        let default_key = args.data_dir.join(DEFAULT_KEY_FILE);
        let create = !repo_dir
            .join(cairn_worker::repo::config::CONFIG_FILE)
            .exists();
        let key = if create {
            match (&args.key_file, args.no_encrypt) {
                (Some(key), _) => KeyChoice::Given(key.clone()),
                (None, true) => KeyChoice::None,
                (None, false) => KeyChoice::Default,
            }
        } else {
            let config = cairn_worker::repo::config::load(&repo_dir)?;
            match (&config.encryption, &args.key_file) {
                (None, Some(key)) => KeyChoice::Given(key.clone()),
                (None, None) => KeyChoice::None,
                (Some(_), _) if args.no_encrypt => anyhow::bail!(
                    "{} is an encrypted repository; --no-encrypt applies only when cairn up \
                     creates one",
                    repo_dir.display()
                ),
                (Some(_), Some(key)) => KeyChoice::Given(key.clone()),
                (Some(_), None) if default_key.symlink_metadata().is_ok() => KeyChoice::Default,
                (Some(_), None) => anyhow::bail!(
                    "{} is encrypted and {} does not exist: pass its key with --key-file",
                    repo_dir.display(),
                    default_key.display()
                ),
            }
        };
        let plan = RepoPlan { create, key };
        // A key file that exists is read now, and refused unless it is private; a missing one
        // is generated with a new repository, or named by the error of opening an existing one.
        if let Some(key) = plan
            .key_file(&args.data_dir)
            .filter(|k| k.symlink_metadata().is_ok())
        {
            cairn_worker::repo::config::read_key_file(&key)?;
        }
        Ok(plan)
    }

    /// The key file, with the default one inside the (canonical) data folder `data`.
    fn key_file(&self, data: &Path) -> Option<PathBuf> {
        match &self.key {
            KeyChoice::None => None,
            KeyChoice::Given(key) => Some(key.clone()),
            KeyChoice::Default => Some(data.join(DEFAULT_KEY_FILE)),
        }
    }
}

/// The generated key of `cairn up`'s repository, in the data folder: `DATA/repo.key`, the
/// name `cairn repo` looks for beside `DATA/repo`.
const DEFAULT_KEY_FILE: &str = "repo.key";

/// Says what kind of repository was made, and how to back up its key.
fn print_new_repository(repo_dir: &Path, key_file: Option<&Path>) {
    match key_file {
        None => println!(
            "created a repository without encryption in {} (--no-encrypt)",
            repo_dir.display()
        ),
        Some(key) => {
            println!(
                "created an encrypted repository in {}; its key is {}",
                repo_dir.display(),
                key.display()
            );
            let key_arg =
                if cairn_worker::repo::config::default_key_file(repo_dir).as_deref() == Some(key) {
                    String::new()
                } else {
                    format!(" --key-file {}", key.display())
                };
            println!(
                "  back the key up now, away from this machine: without it no backup can be read\n  \
                 cairn repo key export {}{key_arg} --to /somewhere/safe/cairn-repo.key",
                repo_dir.display()
            );
        }
    }
}

/// Scans this node's descriptors and reports the inventory; descriptor problems are logged.
pub async fn report_inventory(handle: &Handle<SledLog>, agent: &Arc<Agent>, node: &NodeId) {
    let Some(command) = inventory_command(agent, node).await else {
        return;
    };
    if let Err(e) = handle
        .submit_as(format!("node:{node}"), None, command)
        .await
    {
        tracing::warn!(error = %e, "inventory report refused");
    }
}

/// Measures the repository's filesystem and reports it (the engine records changes of 1% or
/// more), so capacity planning and jobs' early space checks see real numbers.
pub async fn report_space(handle: &Handle<SledLog>, node: &NodeId, repo_dir: &std::path::Path) {
    let Some(command) = space_command(node, REPOSITORY_NAME, repo_dir).await else {
        return;
    };
    if let Err(e) = handle
        .submit_as(format!("node:{node}"), None, command)
        .await
    {
        tracing::warn!(error = %e, "repository space report refused");
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed when this is called, not when the future is first polled: call
/// it before saying the process is up, so that a SIGTERM sent right after that is a clean stop
/// rather than the default death.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = term.recv() => {}
        }
    }
}
