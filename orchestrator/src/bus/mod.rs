//! The NATS bus outside the event log: the connection, the step queues (`CAIRN_STEPS`), the
//! report stream (`CAIRN_REPORTS`), worker heartbeats (KV `CAIRN_NODES`), browse requests and
//! cancel notices, for both ends: the orchestrator side ([`NatsStepSink`], [`ReportConsumer`],
//! [`NodeWatcher`]) and the worker side ([`WorkerBus`]); partition leases (`lease`) and commands
//! forwarded to partition owners (`commands`).
//!
//! All NATS code of cairn lives here and in `log::jetstream`. This module moves encoded
//! `schemas` values and validates everything it receives (a bad message is logged and
//! terminated, never a panic); it takes no decisions: what a report means is the engine's
//! business, how a step runs is the worker's. It must not depend on the worker crate: the
//! `cairn` binary glues [`WorkerBus`] to the worker's agent.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;

pub mod commands;
pub mod lease;
pub mod lease_value;
pub mod nodes;
pub mod permissions;
pub mod reports;
pub mod steps;
pub mod worker;

#[cfg(test)]
mod tests;

pub use lease_value::LeaseValue;
pub use nodes::{Heartbeat, NodeWatcher};
pub use reports::{ReportCallback, ReportConsumer, ReportConsumerConfig, ReportConsumerHandle};
pub use steps::NatsStepSink;
pub use worker::{StepLease, WorkerBus, WorkerBusConfig};

/// Work-queue stream of step specs, subjects `cairn.step.<node>`.
pub const STEPS_STREAM: &str = "CAIRN_STEPS";
/// Work-queue stream of worker reports, subjects `cairn.report.<partition>.<node>`.
pub const REPORTS_STREAM: &str = "CAIRN_REPORTS";
/// KV bucket of worker heartbeats: key = [`Heartbeat::key`], value = [`Heartbeat`].
pub const NODES_BUCKET: &str = "CAIRN_NODES";
/// KV bucket of partition leases (owned by the lease module): `partition.<p>` = [`LeaseValue`].
pub const LEASES_BUCKET: &str = "CAIRN_LEASES";
/// Core NATS subject of cancel notices; the payload is the job id as text.
pub const CANCEL_SUBJECT: &str = "cairn.cancel";

/// `cairn.browse.<node token>`: browse requests for one node's worker.
pub fn browse_subject(node: &cairn_schemas::NodeId) -> String {
    format!(
        "cairn.browse.{}",
        cairn_schemas::subjects::subject_token(node.as_str())
    )
}

/// The KV key of a partition's lease in [`LEASES_BUCKET`].
pub fn lease_key(partition: u16) -> String {
    format!("partition.{partition}")
}

/// The JetStream context of a connection.
pub fn jetstream(client: &async_nats::Client) -> jetstream::Context {
    jetstream::new(client.clone())
}

/// How to reach NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsOptions {
    /// One server URL, or several separated by commas (a cluster).
    pub url: String,
    /// A `.creds` file (JWT + NKey seed).
    pub creds: Option<PathBuf>,
    /// CA certificate that signed the servers' certificates; TLS is required when given.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (mutual TLS); needs `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// Client certificate's key; needs `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Connection name shown by the server (`cairn-worker-kvm-01`).
    pub name: String,
    /// Prefix of the connection's reply subjects instead of `_INBOX`: a node's worker uses
    /// [`node_inbox_prefix`], so that its NATS user may subscribe to its own replies only.
    pub inbox_prefix: Option<String>,
}

/// `_INBOX.node.<node token>`: the reply subjects of a node's worker. A node user's
/// permissions (`cairn ops nats-init`) allow subscribing to this prefix and no other inbox.
pub fn node_inbox_prefix(node: &cairn_schemas::NodeId) -> String {
    format!(
        "_INBOX.node.{}",
        cairn_schemas::subjects::subject_token(node.as_str())
    )
}

/// What went wrong on the bus.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL list is unusable.
    #[error("bad NATS URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    /// A credentials or TLS file cannot be used.
    #[error("NATS {what} {path}: {reason}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The client could not be set up for these servers.
    #[error("connecting to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    /// A stream, consumer or bucket could not be created or found.
    #[error("NATS {what} {name}: {reason}")]
    Setup {
        what: &'static str,
        name: String,
        reason: String,
    },
    /// A publish was not acknowledged.
    #[error("publishing to {subject}: {reason}")]
    Publish { subject: String, reason: String },
    /// A request got no answer.
    #[error("request on {subject}: {reason}")]
    Request { subject: String, reason: String },
    /// A KV read or write failed.
    #[error("NATS KV {bucket} key {key}: {reason}")]
    Kv {
        bucket: &'static str,
        key: String,
        reason: String,
    },
    /// A value read from the bus is malformed.
    #[error("bad {what}: {reason}")]
    BadValue { what: &'static str, reason: String },
    /// A subscription could not be made.
    #[error("subscribing to {subject}: {reason}")]
    Subscribe { subject: String, reason: String },
    /// A message could not be acknowledged.
    #[error("acknowledging {what}: {reason}")]
    Ack { what: String, reason: String },
}

/// Splits and checks a comma-separated URL list.
fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, Error> {
    let parts: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if parts.is_empty() {
        return Err(Error::BadUrl {
            url: url.into(),
            reason: "no server given".into(),
        });
    }
    parts
        .into_iter()
        .map(|part| {
            part.parse::<async_nats::ServerAddr>()
                .map_err(|e| Error::BadUrl {
                    url: part.into(),
                    reason: e.to_string(),
                })
        })
        .collect()
}

fn readable(what: &'static str, path: &std::path::Path) -> Result<(), Error> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| Error::File {
            what,
            path: path.into(),
            reason: e.to_string(),
        })
}

/// Connects to NATS: several servers when `url` lists them, the credentials file and TLS
/// options when given. The client connects in the background (the servers may start later)
/// and reconnects forever; connection changes are logged with the URL.
pub async fn connect(options: &NatsOptions) -> Result<async_nats::Client, Error> {
    let addrs = server_addrs(&options.url)?;
    let url = options.url.clone();
    let logged_url = url.clone();
    let mut connect = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let url = logged_url.clone();
            async move {
                match event {
                    async_nats::Event::Connected => tracing::info!(%url, "connected to NATS"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!(%url, "disconnected from NATS; reconnecting")
                    }
                    other => tracing::warn!(%url, "NATS: {other}"),
                }
            }
        });
    if !options.name.is_empty() {
        connect = connect.name(&options.name);
    }
    if let Some(prefix) = &options.inbox_prefix {
        connect = connect.custom_inbox_prefix(prefix);
    }
    if let Some(creds) = &options.creds {
        readable("credentials file", creds)?;
        connect = connect
            .credentials_file(creds)
            .await
            .map_err(|e| Error::File {
                what: "credentials file",
                path: creds.clone(),
                reason: e.to_string(),
            })?;
    }
    if let Some(ca) = &options.tls_ca {
        readable("TLS CA file", ca)?;
        connect = connect.add_root_certificates(ca.clone()).require_tls(true);
    }
    match (&options.tls_cert, &options.tls_key) {
        (Some(cert), Some(key)) => {
            readable("TLS certificate", cert)?;
            readable("TLS key", key)?;
            connect = connect
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        (None, None) => {}
        (Some(cert), None) => {
            return Err(Error::File {
                what: "TLS certificate",
                path: cert.clone(),
                reason: "given without a TLS key".into(),
            });
        }
        (None, Some(key)) => {
            return Err(Error::File {
                what: "TLS key",
                path: key.clone(),
                reason: "given without a TLS certificate".into(),
            });
        }
    }
    connect.connect(addrs).await.map_err(|e| Error::Connect {
        url,
        reason: e.to_string(),
    })
}

fn check_replicas(replicas: usize) -> Result<(), Error> {
    if (1..=5).contains(&replicas) {
        Ok(())
    } else {
        Err(Error::BadValue {
            what: "replica count",
            reason: format!("{replicas} (JetStream allows 1 to 5; use 1, or 3 in a cluster)"),
        })
    }
}

/// Creates a stream unless it exists (an existing one is used as it is).
async fn ensure_stream(
    js: &jetstream::Context,
    config: jetstream::stream::Config,
) -> Result<jetstream::stream::Stream, Error> {
    let name = config.name.clone();
    js.get_or_create_stream(config)
        .await
        .map_err(|e| Error::Setup {
            what: "stream",
            name,
            reason: e.to_string(),
        })
}

fn work_queue(name: &str, subject: &str, replicas: usize) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        retention: jetstream::stream::RetentionPolicy::WorkQueue,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

/// Makes sure the `CAIRN_STEPS` work queue exists (`replicas`: 1, or 3 in a cluster).
pub async fn ensure_steps_stream(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<jetstream::stream::Stream, Error> {
    check_replicas(replicas)?;
    ensure_stream(js, work_queue(STEPS_STREAM, "cairn.step.>", replicas)).await
}

/// Makes sure the `CAIRN_REPORTS` work queue exists.
pub async fn ensure_reports_stream(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<jetstream::stream::Stream, Error> {
    check_replicas(replicas)?;
    ensure_stream(js, work_queue(REPORTS_STREAM, "cairn.report.>", replicas)).await
}

/// Makes sure the `CAIRN_NODES` KV bucket exists (one value per node, no expiry: a node that
/// stops heartbeating keeps its last value, which is how it is noticed).
pub async fn ensure_nodes_bucket(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<jetstream::kv::Store, Error> {
    check_replicas(replicas)?;
    if let Ok(store) = js.get_key_value(NODES_BUCKET).await {
        return Ok(store);
    }
    let created = js
        .create_key_value(jetstream::kv::Config {
            bucket: NODES_BUCKET.into(),
            description: "cairn worker heartbeats".into(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            max_value_size: 4096,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Another process created it meanwhile (with another configuration): use theirs.
        Err(err) => js
            .get_key_value(NODES_BUCKET)
            .await
            .map_err(|_| Error::Setup {
                what: "KV bucket",
                name: NODES_BUCKET.into(),
                reason: err.to_string(),
            }),
    }
}

/// Makes sure every stream and bucket of the bus exists (the orchestrator calls this at
/// start; workers wait for them).
pub async fn ensure_bus(js: &jetstream::Context, replicas: usize) -> Result<(), Error> {
    ensure_steps_stream(js, replicas).await?;
    ensure_reports_stream(js, replicas).await?;
    ensure_nodes_bucket(js, replicas).await?;
    Ok(())
}

/// Milliseconds of a backoff that doubles from `first` up to `max`.
fn backoff(attempt: u32, first: Duration, max: Duration) -> Duration {
    first
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(max)
}
