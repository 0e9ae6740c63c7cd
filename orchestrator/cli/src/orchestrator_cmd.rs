//! `cairn orchestrator`: one orchestrator instance of a distributed cluster on NATS
//! JetStream. Several instances share the partitions through leases; every instance applies
//! the whole event log and answers the HTTP API for all partitions, forwarding commands to
//! the owner of their partition.
//!
//! Per partition it owns, an instance consumes the partition's worker reports and answers
//! the partition's command subject; these start when a lease is won and stop when it is lost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_orchestrator::audit::keys as audit_keys;
use cairn_orchestrator::audit::{
    CheckpointPolicy, CheckpointTrust, Checkpointer, CheckpointerConfig, FolderSink,
};
use cairn_orchestrator::bus::commands::{self, Decider, Entry, NatsRouter, QUEUE_GROUP};
use cairn_orchestrator::bus::lease::{LeaseChange, LeaseConfig, LeaseManager, lease_bucket};
use cairn_orchestrator::bus::{self, NatsOptions};
use cairn_orchestrator::clock::SystemClock;
use cairn_orchestrator::control::Control;
use cairn_orchestrator::engine::jobs::EngineConfig;
use cairn_orchestrator::engine::ownership::Ownership;
use cairn_orchestrator::engine::service::{Engine, EngineOptions};
use cairn_orchestrator::log::{JetStreamLog, JetStreamLogConfig};
use cairn_orchestrator::notify::address::{AllowEntry, AllowList};
use cairn_orchestrator::notify::webhook::{self, CertificateDer};
use cairn_orchestrator::notify::{Notifier, NotifyConfig};
use cairn_orchestrator::policy::tz::TimeZone;
use clap::Args;
use tokio::sync::{mpsc, watch};

#[derive(Debug, Args)]
pub struct OrchestratorArgs {
    /// A TOML configuration file (`ops/cairn.toml`); flags and environment win over it.
    #[arg(long, env = "CAIRN_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS server URL(s), comma separated (`nats://host:4222`, `tls://host:4222`).
    #[arg(long, env = "CAIRN_NATS")]
    pub nats: Option<String>,
    /// Address of the HTTP API (default 127.0.0.1:7480). Off loopback it needs
    /// --tls-cert/--tls-key (or --insecure-http).
    #[arg(long, env = "CAIRN_LISTEN")]
    pub listen: Option<SocketAddr>,
    #[command(flatten)]
    pub api: crate::api_server::ApiServerArgs,
    /// This instance's id, unique in the cluster (default: host name and process id).
    #[arg(long, env = "CAIRN_INSTANCE")]
    pub instance: Option<String>,
    /// Where this instance keeps its projection snapshot.
    #[arg(long, env = "CAIRN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Number of partitions (fixed for the cluster's life; every instance must agree).
    #[arg(long)]
    pub partitions: Option<u16>,
    /// Lease TTL in seconds: a dead instance's partitions move this long after it died.
    #[arg(long)]
    pub lease_ttl_secs: Option<u64>,
    /// JetStream replicas of cairn's streams and buckets (1, or 3 in a NATS cluster).
    #[arg(long)]
    pub replicas: Option<usize>,
    /// The repository jobs write to when a group's policy names none: a name the workers
    /// register (`[repositories.NAME]`), or the folder of one.
    #[arg(long, env = "CAIRN_REPOSITORY")]
    pub repository: Option<String>,
    /// Time zone of protection groups' schedules.
    #[arg(long, env = "CAIRN_TIMEZONE")]
    pub timezone: Option<String>,
    /// Parallel backups per node.
    #[arg(long)]
    pub backups_per_node: Option<usize>,
    /// Parallel recoveries per node.
    #[arg(long)]
    pub recoveries_per_node: Option<usize>,
    /// Seconds without a report before a running step counts as lost and is retried.
    #[arg(long)]
    pub heartbeat_timeout_secs: Option<u64>,
    /// SMTP relay for recovery notifications.
    #[arg(long, env = "CAIRN_SMTP")]
    pub smtp: Option<String>,
    /// Sender address of notification e-mail.
    #[arg(long, env = "CAIRN_SMTP_FROM")]
    pub smtp_from: Option<String>,
    /// A host, address or CIDR network webhooks may reach although it is loopback, link-local
    /// or private (e.g. 10.0.0.0/8, hooks.internal). Repeat, or separate with commas.
    #[arg(long = "webhook-allow", env = "CAIRN_WEBHOOK_ALLOW", value_name = "HOST|ADDRESS|CIDR",
          value_delimiter = ',', value_parser = AllowEntry::parse)]
    pub webhook_allow: Vec<AllowEntry>,
    /// Extra CA certificates (PEM) trusted for webhooks' servers, besides the system's.
    #[arg(long, env = "CAIRN_WEBHOOK_CA_FILE", value_name = "PEM")]
    pub webhook_ca_file: Option<PathBuf>,
    /// Make an admin token at the first start and keep its secret in this file (0600); at
    /// later starts the file's token is made again if the cluster does not know it.
    #[arg(long, env = "CAIRN_BOOTSTRAP_TOKEN", value_name = "FILE")]
    pub bootstrap_token: Option<PathBuf>,
    /// The audit key file (32 bytes, 0600) that keys the event log's hash chain; the same
    /// file on every orchestrator (`cairn ops audit-key --out FILE`). Without it the chain's
    /// links are plain BLAKE3, which a rewrite of the whole log can recompute.
    #[arg(long, env = "CAIRN_AUDIT_KEY", value_name = "FILE")]
    pub audit_key: Option<PathBuf>,
    /// Folder of the signed audit checkpoints (default DATA/checkpoints); best one every
    /// orchestrator shares and no single host can rewrite.
    #[arg(long, env = "CAIRN_CHECKPOINTS", value_name = "DIR")]
    pub checkpoints: Option<PathBuf>,
    /// Sign a checkpoint of the event log after this many new events.
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_every_events: u64,
    /// Sign a checkpoint after this many minutes when there were new events.
    #[arg(long, default_value_t = 10)]
    pub checkpoint_every_minutes: u64,
    /// NATS credentials file.
    #[arg(long, env = "CAIRN_NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// CA certificate for TLS to NATS.
    #[arg(long, value_name = "FILE")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate for TLS to NATS.
    #[arg(long, value_name = "FILE")]
    pub nats_tls_cert: Option<PathBuf>,
    /// Client key for TLS to NATS.
    #[arg(long, value_name = "FILE")]
    pub nats_tls_key: Option<PathBuf>,
}

/// The settings after merging flags, environment, the configuration file and defaults.
struct Settings {
    nats: NatsOptions,
    audit_key: Option<PathBuf>,
    checkpoints: Option<PathBuf>,
    checkpoint_policy: CheckpointPolicy,
    api: crate::api_server::ApiServer,
    instance: String,
    data_dir: PathBuf,
    partitions: NonZeroU16,
    lease_ttl: Duration,
    replicas: usize,
    repository: String,
    timezone: TimeZone,
    backups_per_node: usize,
    recoveries_per_node: usize,
    heartbeat_timeout: Duration,
    smtp: Option<String>,
    smtp_from: Option<String>,
    webhook_allow: AllowList,
    webhook_roots: Vec<CertificateDer<'static>>,
}

fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    format!(
        "{}-{}",
        if host.is_empty() { "orch" } else { &host },
        std::process::id()
    )
}

fn settings(args: OrchestratorArgs) -> Result<Settings> {
    use crate::config::{pick, pick_opt};
    let file = match &args.config {
        Some(path) => crate::config::load(path)?,
        None => crate::config::CairnConfig::default(),
    };
    let nats_file = file.nats;
    let orch = file.orchestrator;
    let url = pick_opt(args.nats, nats_file.url.map(|urls| urls.join(",")))
        .context("--nats URL is required (or [nats] url in the configuration file)")?;
    let partitions = pick(
        args.partitions.map(u32::from),
        orch.partitions,
        u32::from(cairn_schemas::subjects::DEFAULT_PARTITIONS.get()),
    );
    let partitions = u16::try_from(partitions)
        .ok()
        .and_then(NonZeroU16::new)
        .filter(|p| p.get() <= 1024)
        .with_context(|| format!("--partitions {partitions}: must be 1 to 1024"))?;
    let ttl = pick(
        args.lease_ttl_secs.map(Duration::from_secs),
        orch.lease_ttl,
        Duration::from_secs(6),
    );
    if !(Duration::from_secs(2)..=Duration::from_secs(300)).contains(&ttl) {
        anyhow::bail!("--lease-ttl-secs {}: must be 2 to 300", ttl.as_secs());
    }
    let replicas = pick(args.replicas, nats_file.replicas.map(|r| r as usize), 1);
    if !(1..=5).contains(&replicas) {
        anyhow::bail!("--replicas {replicas}: must be 1 to 5");
    }
    let timezone = match args.timezone {
        Some(text) => {
            TimeZone::parse(&text).map_err(|e| anyhow::anyhow!("--timezone {text:?}: {e}"))?
        }
        None => orch.timezone.unwrap_or(TimeZone::UTC),
    };
    let heartbeat = args.heartbeat_timeout_secs.unwrap_or(60);
    if !(5..=3600).contains(&heartbeat) {
        anyhow::bail!("--heartbeat-timeout-secs {heartbeat}: must be 5 to 3600");
    }
    let instance = pick_opt(args.instance, orch.instance.map(|i| i.to_string()))
        .unwrap_or_else(default_instance);
    let webhook_allow = pick(
        (!args.webhook_allow.is_empty()).then(|| AllowList::new(args.webhook_allow)),
        orch.webhook_allow,
        AllowList::default(),
    );
    let webhook_roots = match pick_opt(args.webhook_ca_file, orch.webhook_ca_file) {
        Some(path) => webhook::read_ca_file(&path)?,
        None => Vec::new(),
    };
    let listen = pick(
        args.listen,
        orch.listen,
        "127.0.0.1:7480".parse().expect("address"),
    );
    // A certificate and its key come from the same place: both flags, or both from the file.
    let (tls_cert, tls_key) = if args.api.tls_cert.is_some() || args.api.tls_key.is_some() {
        (args.api.tls_cert, args.api.tls_key)
    } else {
        (orch.tls_cert, orch.tls_key)
    };
    let api = crate::api_server::ApiServer::new(
        listen,
        crate::api_server::ApiServerArgs {
            tls_cert,
            tls_key,
            insecure_http: args.api.insecure_http || orch.insecure_http.unwrap_or(false),
            api_hosts: if args.api.api_hosts.is_empty() {
                orch.api_hosts.unwrap_or_default()
            } else {
                args.api.api_hosts
            },
        },
    )?;
    if args.checkpoint_every_events == 0 || args.checkpoint_every_minutes == 0 {
        anyhow::bail!(
            "--checkpoint-every-events and --checkpoint-every-minutes must be at least 1"
        );
    }
    Ok(Settings {
        audit_key: pick_opt(args.audit_key, orch.audit_key),
        checkpoints: pick_opt(args.checkpoints, orch.checkpoints),
        checkpoint_policy: CheckpointPolicy {
            every_events: args.checkpoint_every_events,
            every_ms: args.checkpoint_every_minutes.saturating_mul(60_000),
        },
        nats: NatsOptions {
            url,
            creds: pick_opt(args.creds, nats_file.creds),
            tls_ca: pick_opt(args.nats_tls_ca, nats_file.tls_ca),
            tls_cert: pick_opt(args.nats_tls_cert, nats_file.tls_cert),
            tls_key: pick_opt(args.nats_tls_key, nats_file.tls_key),
            name: format!("cairn-orchestrator-{instance}"),
            inbox_prefix: None,
        },
        api,
        data_dir: pick(
            args.data_dir,
            orch.data_dir,
            PathBuf::from("cairn-orchestrator"),
        ),
        instance,
        partitions,
        lease_ttl: ttl,
        replicas,
        repository: pick(
            args.repository,
            orch.repository.map(|p| p.display().to_string()),
            "default".into(),
        ),
        timezone,
        backups_per_node: pick(
            args.backups_per_node,
            orch.backups_per_node.map(|n| n as usize),
            3,
        ),
        recoveries_per_node: pick(
            args.recoveries_per_node,
            orch.recoveries_per_node.map(|n| n as usize),
            8,
        )
        .max(1),
        heartbeat_timeout: Duration::from_secs(heartbeat),
        smtp: pick_opt(args.smtp, orch.smtp),
        smtp_from: pick_opt(args.smtp_from, orch.smtp_from),
        webhook_allow,
        webhook_roots,
    })
}

pub fn run(args: OrchestratorArgs) -> Result<i32> {
    let bootstrap = args.bootstrap_token.clone();
    let settings = settings(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(settings, bootstrap))
}

/// Per-partition work started when a lease is won.
struct PartitionWork {
    reports: bus::ReportConsumerHandle,
    commands: tokio::task::JoinHandle<()>,
}

async fn serve(settings: Settings, args_bootstrap: Option<PathBuf>) -> Result<i32> {
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating {}", settings.data_dir.display()))?;
    // Keys before anything connects: a refused key changes nothing.
    let audit_key = match &settings.audit_key {
        Some(path) => Some(audit_keys::read_audit_key(path)?),
        None => {
            tracing::warn!(
                "no audit key (--audit-key FILE): the event log's hash chain is not keyed"
            );
            None
        }
    };
    let (signing_key, _) =
        audit_keys::ensure_signing_key(&settings.data_dir.join(crate::up::SIGNING_KEY_FILE))?;
    let client = bus::connect(&settings.nats).await?;
    let js = bus::jetstream(&client);
    bus::ensure_bus(&js, settings.replicas).await?;
    let log = JetStreamLog::open(
        client.clone(),
        JetStreamLogConfig {
            replicas: settings.replicas,
            audit_key,
            ..JetStreamLogConfig::default()
        },
    )
    .await
    .context("opening the event log on JetStream")?;
    let checkpoint_sink = FolderSink::new(
        settings
            .checkpoints
            .clone()
            .unwrap_or_else(|| settings.data_dir.join("checkpoints")),
    );
    let checkpointer = Checkpointer::new(
        log.clone(),
        Arc::new(SystemClock),
        CheckpointerConfig {
            sink: checkpoint_sink.clone(),
            signing_key,
            signer: settings.instance.clone(),
            policy: settings.checkpoint_policy,
            poll: Duration::from_secs(1),
        },
    )
    .context("starting the checkpoint writer")?;
    let ownership = Arc::new(Ownership::none(settings.partitions));
    let sink = Arc::new(bus::NatsStepSink::new(client.clone()));
    let options = EngineOptions {
        config: EngineConfig {
            repository: settings.repository.clone(),
            backups_per_node: settings.backups_per_node,
            recoveries_per_node: settings.recoveries_per_node,
            timezone: settings.timezone,
            partitions: settings.partitions,
            heartbeat_timeout_ms: settings.heartbeat_timeout.as_millis() as u64,
            // Steps of a previous owner are adopted: their reports keep them alive; silent
            // ones are retried after this.
            orphan_grace_ms: (settings.lease_ttl * 2).as_millis() as u64,
            ..EngineConfig::default()
        },
        epoch: 0,
        actor: format!("orchestrator/{}", settings.instance),
        snapshot_path: Some(settings.data_dir.join("snapshot.bin")),
        snapshot_every: 50_000,
        tick: Duration::from_millis(250),
        ownership: Some(ownership.clone()),
    };
    let (engine, handle) = Engine::start(log, options, Arc::new(SystemClock), sink)
        .await
        .context("replaying the event log")?;
    handle.set_router(Arc::new(NatsRouter::new(client.clone())));
    handle.set_checkpoint_trust(CheckpointTrust {
        sink: checkpoint_sink,
        extra_keys: Vec::new(),
        trust_sink_keys: true,
    });
    let from = settings
        .smtp_from
        .clone()
        .unwrap_or_else(|| format!("cairn@{}.localdomain", settings.instance));
    let mut notify = NotifyConfig::new(settings.smtp.clone(), from);
    notify.hostname = format!("{}.localdomain", settings.instance);
    notify.webhook_allow = settings.webhook_allow.clone();
    notify.webhook_roots = settings.webhook_roots.clone();
    let engine = engine.with_notifier(Notifier::new(notify));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let wait_shutdown = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let (engine_stop_tx, engine_stop_rx) = watch::channel(false);
    let engine_task = tokio::spawn(engine.run(wait_shutdown(engine_stop_rx.clone())));
    let checkpoint_task = tokio::spawn(checkpointer.run(wait_shutdown(engine_stop_rx)));

    // Commands that arrive over NATS: decided here, or routed to the owner.
    let decider: Decider = {
        let handle = handle.clone();
        Arc::new(move |actor, id, command, local_only| {
            let handle = handle.clone();
            Box::pin(async move {
                if local_only {
                    handle.submit_local(actor, id, command).await
                } else {
                    handle.submit_as(actor, id, command).await
                }
            })
        })
    };
    let node_sub = client
        .queue_subscribe(
            cairn_schemas::subjects::ALL_NODE_COMMANDS,
            QUEUE_GROUP.into(),
        )
        .await
        .context("subscribing to the nodes' commands")?;
    let api_cmd_task = tokio::spawn(commands::serve(
        node_sub,
        client.clone(),
        decider.clone(),
        Entry::Node,
    ));

    // Leases: ownership of partitions, and the work that goes with each one.
    let store = lease_bucket(&js, settings.lease_ttl, settings.replicas).await?;
    let (changes_tx, mut changes_rx) = mpsc::unbounded_channel();
    let leases = LeaseManager::new(
        store,
        LeaseConfig {
            instance: settings.instance.clone(),
            ttl: settings.lease_ttl,
            replicas: settings.replicas,
        },
        ownership.clone(),
        changes_tx,
    )?;
    let lease_task = tokio::spawn(leases.run(shutdown_rx.clone()));
    let partition_client = client.clone();
    let partition_js = js.clone();
    let partition_handle = handle.clone();
    let partition_task = tokio::spawn(async move {
        let mut work: HashMap<u16, PartitionWork> = HashMap::new();
        while let Some(change) = changes_rx.recv().await {
            match change {
                LeaseChange::Granted { partition, epoch } => {
                    tracing::info!(partition, epoch, "owning partition");
                    let report_handle = partition_handle.clone();
                    let reports = bus::ReportConsumer::start(
                        partition_js.clone(),
                        partition,
                        Arc::new(move |report, sender| {
                            let handle = report_handle.clone();
                            Box::pin(async move { handle.report_acked_from(report, sender).await })
                        }),
                    );
                    let commands = match partition_client
                        .subscribe(commands::command_subject(partition))
                        .await
                    {
                        Ok(sub) => tokio::spawn(commands::serve(
                            sub,
                            partition_client.clone(),
                            decider.clone(),
                            Entry::Owner,
                        )),
                        Err(e) => {
                            tracing::error!(partition, error = %e, "could not take commands");
                            continue;
                        }
                    };
                    work.insert(partition, PartitionWork { reports, commands });
                }
                LeaseChange::Revoked { partition } => {
                    tracing::info!(partition, "no longer owning partition");
                    if let Some(old) = work.remove(&partition) {
                        old.commands.abort();
                        old.reports.stop().await;
                    }
                }
            }
        }
    });

    // Worker liveness: nodes that stopped heartbeating are marked offline by their owner.
    let watcher = bus::NodeWatcher::start(js.clone(), Arc::new(SystemClock)).await?;
    let liveness_handle = handle.clone();
    let liveness_task = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(2));
        loop {
            every.tick().await;
            let now = cairn_orchestrator::clock::wall_ms();
            let silent = watcher.silent_nodes(now, 10_000);
            liveness_handle.nodes_silent(silent).await;
        }
    });

    let bootstrap_secret = match &args_bootstrap {
        Some(file) => Some(
            crate::token_cmd::bootstrap(&handle, file, "cairn orchestrator (bootstrap)").await?,
        ),
        None => None,
    };
    let control: Arc<dyn Control> = Arc::new(handle.clone());
    let api = settings.api.serve(control, shutdown_rx.clone()).await?;
    if let Some(secret) = &bootstrap_secret {
        // Also where this user's CLI on this host finds it for this address.
        if let Err(e) = crate::token_cmd::save_for_cli(secret, api.addr, &api.client_url) {
            tracing::warn!(error = %format!("{e:#}"), "could not save the admin token for the CLI");
        }
    }
    // The handlers are installed before the line that tells a supervisor we are up, so a
    // SIGTERM right after it is a clean stop, never the default action.
    let stop_signal = crate::up::shutdown_signal();
    println!(
        "cairn orchestrator is up: API on {}, instance {}, {} partitions",
        api.url, settings.instance, settings.partitions
    );

    stop_signal.await;
    println!("shutting down");
    // Hand the partitions over first, then stop the engine.
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), lease_task).await;
    let _ = engine_stop_tx.send(true);
    let _ = engine_task.await;
    // After the engine: the last checkpoint covers everything it appended.
    let _ = checkpoint_task.await;
    let _ = api.task.await;
    partition_task.abort();
    api_cmd_task.abort();
    liveness_task.abort();
    Ok(0)
}
