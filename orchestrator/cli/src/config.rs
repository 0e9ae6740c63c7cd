//! `cairn.toml`: the configuration file of the distributed processes (`cairn orchestrator`,
//! `cairn worker`). This module owns the file's format (sections `[nats]`, `[orchestrator]`,
//! `[worker]` with the node's boundary — roots, limits, block devices — and the node's
//! registered repositories `[repositories.NAME]`), reads it, and validates every value, naming the file, the key and what is
//! wrong. It does not connect to anything, open the files the configuration names (a worker's
//! key file need not exist on an orchestrator host) or read the environment.
//!
//! Precedence, for every setting of the commands that read this file:
//!
//! 1. a command-line flag,
//! 2. the flag's `CAIRN_*` environment variable (clap fills the flag from it, so 1 and 2 reach
//!    this module as one `Option`),
//! 3. the value in the file given by `--config` (or `CAIRN_CONFIG`),
//! 4. the built-in default.
//!
//! The commands merge with [`pick`] (settings with a default) and [`pick_opt`] (settings that
//! may stay unset, such as `creds`). A key the file does not know is refused rather than
//! ignored, so a misspelt setting never silently falls back to its default. Secrets (NATS
//! credentials, TLS keys, the repository key) are given as paths to files, never inline.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_orchestrator::api::host::ApiHost;
use cairn_orchestrator::notify::address::{AllowEntry, AllowList};
use cairn_orchestrator::policy::tz::TimeZone;
use cairn_schemas::NodeId;
use cairn_worker::boundary::Encryption;
use serde::Deserialize;

/// Partition counts a cluster may be created with.
pub const PARTITIONS: std::ops::RangeInclusive<u32> = 1..=1024;
/// Lease time-to-live, in seconds.
pub const LEASE_TTL_SECS: std::ops::RangeInclusive<u64> = 2..=300;
/// JetStream replica counts (a stream has at most 5 replicas).
pub const REPLICAS: std::ops::RangeInclusive<u32> = 1..=5;
/// Parallel backups, recoveries or steps per node.
pub const PER_NODE: std::ops::RangeInclusive<u32> = 1..=256;

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML, has an unknown key or a value of the wrong type.
    #[error("{path}{location}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// `:line:column`, when known.
        location: String,
        /// The TOML parser's message (it names an unknown key and the keys it expected).
        message: String,
    },
    /// A value has the right type but is not acceptable.
    #[error("{path}: {key} = {value}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// `section.key`, e.g. `nats.url`.
        key: String,
        /// The value as written (quoted when it is a string).
        value: String,
        /// What is wrong with it and what is accepted.
        problem: String,
    },
}

/// The validated configuration. Every field is `None` when the file does not set it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CairnConfig {
    /// `[nats]`: how both processes reach NATS.
    pub nats: NatsConfig,
    /// `[orchestrator]`: `cairn orchestrator`.
    pub orchestrator: OrchestratorConfig,
    /// `[worker]`: `cairn worker`.
    pub worker: WorkerConfig,
    /// `[repositories.NAME]`: the repositories this node's worker registers, by name.
    pub repositories: BTreeMap<String, RepositoryConfig>,
}

/// `[repositories.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryConfig {
    /// Its folder (absolute).
    pub path: PathBuf,
    /// Whether it must be encrypted (`encryption = "required" | "none"`, default required).
    pub encryption: Encryption,
}

/// `[nats]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsConfig {
    /// Server URLs (`nats://host:port` or `tls://host:port`), comma separated in the file.
    pub url: Option<Vec<String>>,
    /// NATS credentials file (JWT and NKey seed).
    pub creds: Option<PathBuf>,
    /// CA certificate that signs the servers' TLS certificates.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// Client key for mutual TLS (with `tls_cert`).
    pub tls_key: Option<PathBuf>,
    /// Replicas of cairn's streams and buckets when they are created (1, or 3 in a cluster).
    pub replicas: Option<u32>,
}

/// `[orchestrator]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrchestratorConfig {
    /// Address of the HTTP API.
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain of the HTTPS API (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP off loopback.
    pub insecure_http: Option<bool>,
    /// Names the API answers to besides its address (`Host`).
    pub api_hosts: Option<Vec<ApiHost>>,
    /// This instance's name in the lease bucket (default: the host name).
    pub instance: Option<NodeId>,
    /// Local folder for projection snapshots.
    pub data_dir: Option<PathBuf>,
    /// Partition count of a new cluster.
    pub partitions: Option<u32>,
    /// Partition lease time-to-live.
    pub lease_ttl: Option<Duration>,
    /// The repository, as the workers see it.
    pub repository: Option<PathBuf>,
    /// Time zone of protection groups' schedules.
    pub timezone: Option<TimeZone>,
    /// Parallel backups per node.
    pub backups_per_node: Option<u32>,
    /// Parallel recoveries per node.
    pub recoveries_per_node: Option<u32>,
    /// SMTP relay, `host:port`.
    pub smtp: Option<String>,
    /// Sender address of notification e-mail.
    pub smtp_from: Option<String>,
    /// Hosts, addresses and CIDR networks webhooks may reach although they are not public.
    pub webhook_allow: Option<AllowList>,
    /// Extra CA certificates (PEM) for webhooks' servers.
    pub webhook_ca_file: Option<PathBuf>,
    /// The audit key file that keys the event log's hash chain (the same on every
    /// orchestrator).
    pub audit_key: Option<PathBuf>,
    /// Folder of signed audit checkpoints.
    pub checkpoints: Option<PathBuf>,
}

/// `[worker]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerConfig {
    /// This node's name.
    pub node: Option<NodeId>,
    /// The cluster the node belongs to (VMs move only within a cluster).
    pub cluster: Option<NodeId>,
    /// Folder of this node's VM descriptors.
    pub vms_dir: Option<PathBuf>,
    /// Repository key file, when the repository is encrypted.
    pub key_file: Option<PathBuf>,
    /// Steps this worker runs at once.
    pub parallel: Option<u32>,
    /// Folders recoveries may write below.
    pub recovery_roots: Option<Vec<PathBuf>>,
    /// Recovery roots where app-owners' recoveries may write.
    pub app_owner_roots: Option<Vec<PathBuf>>,
    /// Folders seed imports may read from.
    pub seed_roots: Option<Vec<PathBuf>>,
    /// Folders VM descriptors' disks may lie in.
    pub image_roots: Option<Vec<PathBuf>>,
    /// Whether descriptor disks may be block devices.
    pub allow_block_devices: Option<bool>,
    /// Most entries one item extraction writes.
    pub max_item_entries: Option<u64>,
    /// Most bytes one item extraction writes.
    pub max_item_bytes: Option<u64>,
    /// Largest file one item extraction writes.
    pub max_item_file_size: Option<u64>,
    /// Deepest folder nesting one item extraction writes.
    pub max_item_depth: Option<u32>,
}

/// The value of a setting: the flag (already filled from its environment variable by clap)
/// if given, else the file's, else `default`.
pub fn pick<T>(flag: Option<T>, file: Option<T>, default: T) -> T {
    flag.or(file).unwrap_or(default)
}

/// Like [`pick`], for settings that may stay unset.
pub fn pick_opt<T>(flag: Option<T>, file: Option<T>) -> Option<T> {
    flag.or(file)
}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<CairnConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses and validates `text`, the contents of the file `path` (named in errors).
pub fn parse(path: &Path, text: &str) -> Result<CairnConfig, Error> {
    let raw: RawFile = toml::from_str(text).map_err(|e| Error::Syntax {
        path: path.to_owned(),
        location: e
            .span()
            .map(|span| {
                let (line, column) = line_column(text, span.start);
                format!(":{line}:{column}")
            })
            .unwrap_or_default(),
        message: e.message().trim().to_owned(),
    })?;
    raw.validate(path)
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

// The file as written: plain types, every key optional, unknown keys refused.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    nats: RawNats,
    #[serde(default)]
    orchestrator: RawOrchestrator,
    #[serde(default)]
    worker: RawWorker,
    #[serde(default)]
    repositories: BTreeMap<String, RawRepository>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    path: Option<String>,
    encryption: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNats {
    url: Option<String>,
    creds: Option<String>,
    tls_ca: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    replicas: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrchestrator {
    listen: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    insecure_http: Option<bool>,
    api_hosts: Option<Vec<String>>,
    instance: Option<String>,
    data_dir: Option<String>,
    partitions: Option<i64>,
    lease_ttl_secs: Option<i64>,
    repository: Option<String>,
    timezone: Option<String>,
    backups_per_node: Option<i64>,
    recoveries_per_node: Option<i64>,
    smtp: Option<String>,
    smtp_from: Option<String>,
    webhook_allow: Option<Vec<String>>,
    webhook_ca_file: Option<String>,
    audit_key: Option<String>,
    checkpoints: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    node: Option<String>,
    cluster: Option<String>,
    vms_dir: Option<String>,
    key_file: Option<String>,
    parallel: Option<i64>,
    recovery_roots: Option<Vec<String>>,
    app_owner_roots: Option<Vec<String>>,
    seed_roots: Option<Vec<String>>,
    image_roots: Option<Vec<String>>,
    allow_block_devices: Option<bool>,
    max_item_entries: Option<i64>,
    max_item_bytes: Option<RawSize>,
    max_item_file_size: Option<RawSize>,
    max_item_depth: Option<i64>,
}

/// A size in the file: a number of bytes or a text like `1TiB`, `1.5GiB`, `500MB`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

/// Most roots of one kind.
pub const MAX_ROOTS: usize = 64;

/// Builds [`Error::Invalid`] for one key of one file.
struct Checker<'a> {
    path: &'a Path,
}

impl Checker<'_> {
    fn invalid(&self, key: &str, value: &dyn fmt::Debug, problem: String) -> Error {
        Error::Invalid {
            path: self.path.to_owned(),
            key: key.to_owned(),
            value: format!("{value:?}"),
            problem,
        }
    }

    /// Applies `check` to a text value when it is set.
    fn text<T>(
        &self,
        key: &'static str,
        raw: Option<String>,
        check: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, Error> {
        raw.map(|value| check(&value).map_err(|problem| self.invalid(key, &value, problem)))
            .transpose()
    }

    /// Applies `check` to each item of a list of texts when it is set; an error names the
    /// first bad item.
    fn list<T>(
        &self,
        key: &'static str,
        raw: Option<Vec<String>>,
        check: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<Vec<T>>, Error> {
        raw.map(|items| {
            items
                .iter()
                .map(|item| check(item).map_err(|problem| self.invalid(key, item, problem)))
                .collect()
        })
        .transpose()
    }

    /// Applies [`root_value`] to each folder of a list, when it is set.
    fn roots(
        &self,
        key: &'static str,
        raw: Option<Vec<String>>,
    ) -> Result<Option<Vec<PathBuf>>, Error> {
        let Some(values) = raw else {
            return Ok(None);
        };
        if values.len() > MAX_ROOTS {
            return Err(self.invalid(key, &values.len(), format!("at most {MAX_ROOTS} folders")));
        }
        values
            .iter()
            .map(|value| root_value(value).map_err(|problem| self.invalid(key, value, problem)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Checks that a number, when set, lies in `range`.
    /// A size of at least one byte, as a number or a text ([`crate::units::parse_size`]).
    fn size(&self, key: &'static str, raw: Option<RawSize>) -> Result<Option<u64>, Error> {
        match raw {
            None => Ok(None),
            Some(RawSize::Bytes(bytes)) => self.number(key, Some(bytes), 1..=u64::MAX),
            Some(RawSize::Text(text)) => match crate::units::parse_size(&text) {
                Ok(0) => Err(self.invalid(key, &text, "must be at least 1 byte".into())),
                Ok(bytes) => Ok(Some(bytes)),
                Err(err) => Err(self.invalid(key, &text, err.to_string())),
            },
        }
    }

    fn number<T>(
        &self,
        key: &'static str,
        raw: Option<i64>,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<Option<T>, Error>
    where
        T: TryFrom<i64> + PartialOrd + fmt::Display + Copy,
    {
        raw.map(|value| {
            in_range(value, &range).map_err(|problem| self.invalid(key, &value, problem))
        })
        .transpose()
    }
}

fn path_value(value: &str) -> Result<PathBuf, String> {
    if value.trim().is_empty() {
        return Err("a path must not be empty".into());
    }
    if value.contains('\0') {
        return Err("a path must not contain NUL".into());
    }
    Ok(PathBuf::from(value))
}

/// A root folder: an absolute path of plain names, not `/`.
fn root_value(value: &str) -> Result<PathBuf, String> {
    let path = path_value(value)?;
    cairn_worker::boundary::check_plain_absolute(&path).map_err(|e| e.to_string())?;
    if path == Path::new("/") {
        return Err("/ is not a root: name the folders cairn may use".into());
    }
    Ok(path)
}

fn encryption_value(value: &str) -> Result<Encryption, String> {
    match value {
        "required" => Ok(Encryption::Required),
        "none" => Ok(Encryption::None),
        _ => Err("must be \"required\" or \"none\"".into()),
    }
}

fn name_value(value: &str) -> Result<NodeId, String> {
    NodeId::new(value).map_err(|e| e.to_string())
}

fn in_range<T>(value: i64, range: &std::ops::RangeInclusive<T>) -> Result<T, String>
where
    T: TryFrom<i64> + PartialOrd + fmt::Display + Copy,
{
    match T::try_from(value) {
        Ok(v) if range.contains(&v) => Ok(v),
        _ => Err(format!(
            "must be between {} and {}",
            range.start(),
            range.end()
        )),
    }
}

/// A port number from text: 1..=65535.
fn port_value(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) => Err("port 0 is not a usable port".into()),
        Ok(port) => Ok(port),
        Err(_) => Err(format!("port {text:?} is not a number from 1 to 65535")),
    }
}

/// Splits `host:port` (host may be `[v6]`); both parts required.
fn host_port(text: &str) -> Result<(&str, u16), String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "an IPv6 address needs a closing ']'".to_string())?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| "needs a port: host:port".to_string())?;
        (host, port)
    } else {
        text.rsplit_once(':')
            .ok_or_else(|| "needs a port: host:port".to_string())?
    };
    if host.is_empty() {
        return Err("needs a host name or address before the port".into());
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c))
    {
        return Err(format!("host {host:?} is not a host name or address"));
    }
    Ok((host, port_value(port)?))
}

/// One NATS server URL: `nats://host:port` or `tls://host:port` (port defaults to 4222).
fn nats_url(url: &str) -> Result<String, String> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "{url:?} is not a URL: write nats://host:port or tls://host:port"
        ));
    };
    if scheme != "nats" && scheme != "tls" {
        return Err(format!(
            "scheme {scheme}:// is not supported: use nats:// or tls://"
        ));
    }
    if rest.contains('@') {
        return Err(
            "credentials do not belong in the URL: put them in a file named by \
                    nats.creds"
                .into(),
        );
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') || authority.contains('?') {
        return Err(format!(
            "{url:?} has a path or query; a server URL has neither"
        ));
    }
    let has_port = match authority.strip_prefix('[') {
        Some(rest) => rest.contains("]:"),
        None => authority.contains(':'),
    };
    if has_port {
        host_port(authority)?;
    } else {
        host_port(&format!("{authority}:4222"))?;
    }
    Ok(url.to_owned())
}

/// The API's listening address: an IP address and a port (not 0).
fn listen_address(value: &str) -> Result<SocketAddr, String> {
    host_port(value)?;
    value
        .parse()
        .map_err(|_| format!("{value:?} is not an IP address and port, e.g. 0.0.0.0:7481"))
}

const CERT_AND_KEY: &str = "a client certificate needs both nats.tls_cert and nats.tls_key";
const API_CERT_AND_KEY: &str =
    "the HTTPS API needs both orchestrator.tls_cert and orchestrator.tls_key";

fn nats_urls(value: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = value.split(',').map(nats_url).collect::<Result<_, _>>()?;
    Ok(urls)
}

impl RawFile {
    fn validate(self, path: &Path) -> Result<CairnConfig, Error> {
        let c = Checker { path };
        let n = self.nats;
        let nats = NatsConfig {
            url: c.text("nats.url", n.url, nats_urls)?,
            creds: c.text("nats.creds", n.creds, path_value)?,
            tls_ca: c.text("nats.tls_ca", n.tls_ca, path_value)?,
            tls_cert: c.text("nats.tls_cert", n.tls_cert, path_value)?,
            tls_key: c.text("nats.tls_key", n.tls_key, path_value)?,
            replicas: c.number("nats.replicas", n.replicas, REPLICAS)?,
        };
        match (&nats.tls_cert, &nats.tls_key) {
            (Some(cert), None) => {
                return Err(c.invalid("nats.tls_cert", cert, CERT_AND_KEY.into()));
            }
            (None, Some(key)) => {
                return Err(c.invalid("nats.tls_key", key, CERT_AND_KEY.into()));
            }
            _ => {}
        }
        let o = self.orchestrator;
        let api_hosts = o
            .api_hosts
            .map(|names| {
                names
                    .into_iter()
                    .map(|name| {
                        ApiHost::parse(&name)
                            .map_err(|e| c.invalid("orchestrator.api_hosts", &name, e.problem))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let orchestrator = OrchestratorConfig {
            listen: c.text("orchestrator.listen", o.listen, listen_address)?,
            tls_cert: c.text("orchestrator.tls_cert", o.tls_cert, path_value)?,
            tls_key: c.text("orchestrator.tls_key", o.tls_key, path_value)?,
            insecure_http: o.insecure_http,
            api_hosts,
            instance: c.text("orchestrator.instance", o.instance, name_value)?,
            data_dir: c.text("orchestrator.data_dir", o.data_dir, path_value)?,
            partitions: c.number("orchestrator.partitions", o.partitions, PARTITIONS)?,
            lease_ttl: c
                .number(
                    "orchestrator.lease_ttl_secs",
                    o.lease_ttl_secs,
                    LEASE_TTL_SECS,
                )?
                .map(Duration::from_secs),
            repository: c.text("orchestrator.repository", o.repository, path_value)?,
            timezone: c.text("orchestrator.timezone", o.timezone, |v| {
                TimeZone::parse(v).map_err(|e| e.to_string())
            })?,
            backups_per_node: c.number(
                "orchestrator.backups_per_node",
                o.backups_per_node,
                PER_NODE,
            )?,
            recoveries_per_node: c.number(
                "orchestrator.recoveries_per_node",
                o.recoveries_per_node,
                PER_NODE,
            )?,
            smtp: c.text("orchestrator.smtp", o.smtp, |v| {
                host_port(v).map(|_| v.to_owned())
            })?,
            smtp_from: c.text("orchestrator.smtp_from", o.smtp_from, |v| {
                cairn_orchestrator::engine::recovery::check_email(v).map(|()| v.to_owned())
            })?,
            webhook_allow: c
                .list(
                    "orchestrator.webhook_allow",
                    o.webhook_allow,
                    AllowEntry::parse,
                )?
                .map(AllowList::new),
            webhook_ca_file: c.text(
                "orchestrator.webhook_ca_file",
                o.webhook_ca_file,
                path_value,
            )?,
            audit_key: c.text("orchestrator.audit_key", o.audit_key, path_value)?,
            checkpoints: c.text("orchestrator.checkpoints", o.checkpoints, path_value)?,
        };
        match (&orchestrator.tls_cert, &orchestrator.tls_key) {
            (Some(cert), None) => {
                return Err(c.invalid("orchestrator.tls_cert", cert, API_CERT_AND_KEY.into()));
            }
            (None, Some(key)) => {
                return Err(c.invalid("orchestrator.tls_key", key, API_CERT_AND_KEY.into()));
            }
            _ => {}
        }
        let w = self.worker;
        let worker = WorkerConfig {
            node: c.text("worker.node", w.node, name_value)?,
            cluster: c.text("worker.cluster", w.cluster, name_value)?,
            vms_dir: c.text("worker.vms_dir", w.vms_dir, path_value)?,
            key_file: c.text("worker.key_file", w.key_file, path_value)?,
            parallel: c.number("worker.parallel", w.parallel, PER_NODE)?,
            recovery_roots: c.roots("worker.recovery_roots", w.recovery_roots)?,
            app_owner_roots: c.roots("worker.app_owner_roots", w.app_owner_roots)?,
            seed_roots: c.roots("worker.seed_roots", w.seed_roots)?,
            image_roots: c.roots("worker.image_roots", w.image_roots)?,
            allow_block_devices: w.allow_block_devices,
            max_item_entries: c.number(
                "worker.max_item_entries",
                w.max_item_entries,
                1..=u64::MAX,
            )?,
            max_item_bytes: c.size("worker.max_item_bytes", w.max_item_bytes)?,
            max_item_file_size: c.size("worker.max_item_file_size", w.max_item_file_size)?,
            max_item_depth: c.number("worker.max_item_depth", w.max_item_depth, 1..=4096)?,
        };
        if let (Some(owner_roots), Some(recovery_roots)) =
            (&worker.app_owner_roots, &worker.recovery_roots)
        {
            for root in owner_roots {
                if !recovery_roots.iter().any(|r| root.starts_with(r)) {
                    return Err(c.invalid(
                        "worker.app_owner_roots",
                        root,
                        "is not below one of worker.recovery_roots".into(),
                    ));
                }
            }
        }
        let mut repositories = BTreeMap::new();
        let mut folders: BTreeMap<PathBuf, String> = BTreeMap::new();
        for (name, raw) in self.repositories {
            let key = |field: &str| format!("repositories.{name}.{field}");
            cairn_worker::boundary::check_repository_name(&name)
                .map_err(|problem| c.invalid(&format!("repositories.{name}"), &name, problem))?;
            let path = raw.path.ok_or_else(|| {
                c.invalid(
                    &key("path"),
                    &"(missing)",
                    "every registered repository needs its folder".into(),
                )
            })?;
            let folder =
                root_value(&path).map_err(|problem| c.invalid(&key("path"), &path, problem))?;
            if let Some(other) = folders.insert(folder.clone(), name.clone()) {
                return Err(c.invalid(
                    &key("path"),
                    &path,
                    format!("is already registered as repository {other}"),
                ));
            }
            let encryption = match raw.encryption {
                None => Encryption::Required,
                Some(value) => encryption_value(&value)
                    .map_err(|problem| c.invalid(&key("encryption"), &value, problem))?,
            };
            repositories.insert(
                name,
                RepositoryConfig {
                    path: folder,
                    encryption,
                },
            );
        }
        Ok(CairnConfig {
            nats,
            orchestrator,
            worker,
            repositories,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ops/cairn.toml")
    }

    fn err(text: &str) -> String {
        parse(Path::new("/etc/cairn/cairn.toml"), text)
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn zones_and_sizes_as_people_write_them() {
        let config = parse(
            Path::new("/etc/cairn/cairn.toml"),
            "[orchestrator]\ntimezone = \"australia/sydney\"\n\
             [worker]\nmax_item_bytes = \"1.5GiB\"\nmax_item_file_size = \"500MB\"\n",
        )
        .unwrap();
        let zone = config.orchestrator.timezone.unwrap();
        assert_eq!(zone.to_string(), "Australia/Sydney");
        assert_eq!(config.worker.max_item_bytes, Some(3 << 29));
        assert_eq!(config.worker.max_item_file_size, Some(500_000_000));
        // The older forms still work.
        let config = parse(
            Path::new("/etc/cairn/cairn.toml"),
            "[orchestrator]\ntimezone = \"+01:00/eu\"\n[worker]\nmax_item_bytes = 4096\n",
        )
        .unwrap();
        assert_eq!(
            config.orchestrator.timezone.unwrap().to_string(),
            "Europe/Berlin"
        );
        assert_eq!(config.worker.max_item_bytes, Some(4096));
    }

    #[test]
    fn the_example_file_parses_with_every_setting() {
        let config = load(&example()).unwrap();
        let nats = &config.nats;
        assert_eq!(
            nats.url.as_deref(),
            Some(&["nats://127.0.0.1:4222".to_string()][..])
        );
        assert_eq!(nats.replicas, Some(1));
        let o = &config.orchestrator;
        assert_eq!(o.listen, Some("127.0.0.1:7481".parse().unwrap()));
        assert_eq!(o.partitions, Some(16));
        assert_eq!(o.lease_ttl, Some(Duration::from_secs(6)));
        assert_eq!(o.timezone, Some(TimeZone::parse("UTC").unwrap()));
        assert_eq!(o.backups_per_node, Some(3));
        assert_eq!(o.recoveries_per_node, Some(8));
        assert_eq!(
            o.webhook_allow, None,
            "nothing is allowed unless the operator says so"
        );
        let w = &config.worker;
        assert_eq!(w.node.as_ref().map(NodeId::as_str), Some("kvm-01"));
        assert_eq!(w.vms_dir.as_deref(), Some(Path::new("/var/lib/cairn/vms")));
        assert_eq!(w.parallel, Some(3));
        assert_eq!(
            w.recovery_roots.as_deref(),
            Some(&[PathBuf::from("/var/lib/cairn/recovered")][..])
        );
        assert_eq!(w.allow_block_devices, Some(false));
        assert_eq!(w.max_item_depth, Some(128));
        let repo = &config.repositories["default"];
        assert_eq!(repo.path, Path::new("/srv/cairn/repo"));
        assert_eq!(repo.encryption, Encryption::Required);
    }

    #[test]
    fn repositories_and_roots_are_checked() {
        let config = parse(
            Path::new("c.toml"),
            "[repositories.plain]\npath = \"/srv/plain\"\nencryption = \"none\"\n\
             [repositories.secure]\npath = \"/srv/secure\"\n",
        )
        .unwrap();
        assert_eq!(config.repositories["plain"].encryption, Encryption::None);
        assert_eq!(
            config.repositories["secure"].encryption,
            Encryption::Required
        );
        let cases: &[(&str, &str, &str)] = &[
            (
                "[repositories.a]\npath = \"relative\"",
                "repositories.a.path = \"relative\"",
                "not an absolute path",
            ),
            (
                "[repositories.a]\nencryption = \"none\"",
                "repositories.a.path",
                "needs its folder",
            ),
            (
                "[repositories.a]\npath = \"/r\"\nencryption = \"maybe\"",
                "repositories.a.encryption = \"maybe\"",
                "\"required\" or \"none\"",
            ),
            (
                "[repositories.a]\npath = \"/r\"\n[repositories.b]\npath = \"/r\"",
                "repositories.b.path",
                "already registered as repository a",
            ),
            (
                "[repositories.\"a b\"]\npath = \"/r\"",
                "repositories.a b",
                "a repository name has only",
            ),
            (
                "[worker]\nrecovery_roots = [\"/srv/r\", \"srv\"]",
                "worker.recovery_roots = \"srv\"",
                "not an absolute path",
            ),
            (
                "[worker]\nimage_roots = [\"/\"]",
                "worker.image_roots",
                "/ is not a root",
            ),
            (
                "[worker]\nseed_roots = [\"/a/../b\"]",
                "worker.seed_roots",
                "contains `.` or `..`",
            ),
            (
                "[worker]\nrecovery_roots = [\"/srv/r\"]\napp_owner_roots = [\"/srv/apps\"]",
                "worker.app_owner_roots",
                "not below one of worker.recovery_roots",
            ),
            (
                "[worker]\nmax_item_depth = 0",
                "worker.max_item_depth",
                "between 1 and 4096",
            ),
        ];
        for (text, key, problem) in cases {
            let e = err(text);
            assert!(
                e.starts_with(&format!("/etc/cairn/cairn.toml: {key}")),
                "{text:?} gave {e}"
            );
            assert!(e.contains(problem), "{text:?} gave {e}");
        }
        let e = err("[repositories.a]\npath = \"/r\"\nencrypt = \"none\"\n");
        assert!(e.contains("unknown field `encrypt`"), "{e}");
    }

    #[test]
    fn an_empty_file_sets_nothing() {
        let config = parse(Path::new("empty.toml"), "").unwrap();
        assert_eq!(config, CairnConfig::default());
    }

    #[test]
    fn a_cluster_url_list_and_tls_parse() {
        let config = parse(
            Path::new("c.toml"),
            "[nats]\nurl = \"tls://n1.example.net:4222, tls://n2.example.net,tls://[::1]:4223\"\n\
             tls_ca = \"/etc/cairn/ca.pem\"\ntls_cert = \"/etc/cairn/c.pem\"\n\
             tls_key = \"/etc/cairn/c.key\"\nreplicas = 3\n",
        )
        .unwrap();
        assert_eq!(config.nats.url.unwrap().len(), 3);
        assert_eq!(config.nats.replicas, Some(3));
    }

    #[test]
    fn webhook_settings_parse() {
        let config = parse(
            Path::new("c.toml"),
            "[orchestrator]\nwebhook_allow = [\"127.0.0.1\", \"hooks.internal\", \"10.0.0.0/8\"]\n\
             webhook_ca_file = \"/etc/cairn/hooks-ca.pem\"\n",
        )
        .unwrap();
        let o = config.orchestrator;
        let allow = o.webhook_allow.unwrap();
        let entries: Vec<String> = allow.entries().iter().map(|e| e.to_string()).collect();
        assert_eq!(entries, ["127.0.0.1", "hooks.internal", "10.0.0.0/8"]);
        assert_eq!(
            o.webhook_ca_file.as_deref(),
            Some(Path::new("/etc/cairn/hooks-ca.pem"))
        );
        let empty = parse(Path::new("c.toml"), "[orchestrator]\nwebhook_allow = []\n").unwrap();
        assert_eq!(empty.orchestrator.webhook_allow, Some(AllowList::default()));
    }

    #[test]
    fn the_https_api_settings_parse() {
        let config = parse(
            Path::new("c.toml"),
            "[orchestrator]\nlisten = \"0.0.0.0:7481\"\ntls_cert = \"/etc/cairn/api.pem\"\n\
             tls_key = \"/etc/cairn/api.key\"\napi_hosts = [\"cairn.example.net\", \
             \"CTL-01.example.net:7481\"]\n",
        )
        .unwrap();
        let o = config.orchestrator;
        assert_eq!(o.tls_cert.as_deref(), Some(Path::new("/etc/cairn/api.pem")));
        assert_eq!(o.tls_key.as_deref(), Some(Path::new("/etc/cairn/api.key")));
        let hosts: Vec<String> = o.api_hosts.unwrap().iter().map(|h| h.to_string()).collect();
        assert_eq!(hosts, ["cairn.example.net", "ctl-01.example.net:7481"]);
        assert_eq!(o.insecure_http, None);
        let plain = parse(
            Path::new("c.toml"),
            "[orchestrator]\ninsecure_http = true\n",
        )
        .unwrap();
        assert_eq!(plain.orchestrator.insecure_http, Some(true));
    }

    #[test]
    fn precedence_flag_then_file_then_default() {
        assert_eq!(pick(Some(1), Some(2), 3), 1);
        assert_eq!(pick(None, Some(2), 3), 2);
        assert_eq!(pick(None::<u32>, None, 3), 3);
        assert_eq!(pick_opt(None, Some("file")), Some("file"));
        assert_eq!(pick_opt(Some("flag"), Some("file")), Some("flag"));
        assert_eq!(pick_opt::<u8>(None, None), None);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name_and_place() {
        let e = err("[nats]\nurl = \"nats://h:4222\"\nreplica = 3\n");
        assert!(e.starts_with("/etc/cairn/cairn.toml:3:1:"), "{e}");
        assert!(e.contains("unknown field `replica`"), "{e}");
        assert!(e.contains("replicas"), "the expected keys are listed: {e}");
        let e = err("[orchestrator]\nlease_ttl = 6\n");
        assert!(e.contains("unknown field `lease_ttl`"), "{e}");
        let e = err("[workers]\nnode = \"a\"\n");
        assert!(e.contains("unknown field `workers`"), "{e}");
    }

    #[test]
    fn wrong_types_and_bad_toml_are_refused() {
        let e = err("[orchestrator]\npartitions = \"16\"\n");
        assert!(e.starts_with("/etc/cairn/cairn.toml:2:"), "{e}");
        assert!(e.contains("invalid type"), "{e}");
        let e = err("[nats\nurl = 1\n");
        assert!(e.starts_with("/etc/cairn/cairn.toml:1:"), "{e}");
    }

    #[test]
    fn hostile_text_gives_errors_not_panics() {
        let e = err("# Grüße\n[worker]\nnode = \"kvm-01\"\nnöde = 1\n");
        assert!(e.starts_with("/etc/cairn/cairn.toml:4:"), "{e}");
        let e = err("[worker]\nnode = \"knoten-ü\"\n");
        assert!(e.contains("worker.node = \"knoten-ü\""), "{e}");
        let e = err("[nats]\nurl = \"nats://hôte:4222\"\n");
        assert!(e.contains("is not a host name"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("cairn.toml");
        std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x5b]).unwrap();
        let e = load(&binary).unwrap_err().to_string();
        assert!(e.contains("cannot read the configuration file"), "{e}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = load(Path::new("/nonexistent/cairn.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read the configuration file /nonexistent/cairn.toml"),
            "{e}"
        );
    }

    #[test]
    fn each_bad_value_names_file_key_value_and_problem() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[nats]\nurl = \"http://h:4222\"",
                "nats.url = \"http://h:4222\"",
                "use nats:// or tls://",
            ),
            ("[nats]\nurl = \"h:4222\"", "nats.url", "is not a URL"),
            ("[nats]\nurl = \"nats://h:99999\"", "nats.url", "1 to 65535"),
            ("[nats]\nurl = \"nats://h:0\"", "nats.url", "port 0"),
            ("[nats]\nurl = \"nats://:4222\"", "nats.url", "needs a host"),
            ("[nats]\nurl = \"\"", "nats.url", "is not a URL"),
            (
                "[nats]\nurl = \"nats://a:4222,\"",
                "nats.url",
                "is not a URL",
            ),
            (
                "[nats]\nurl = \"nats://u:secret@h:4222\"",
                "nats.url",
                "credentials do not belong",
            ),
            ("[nats]\ncreds = \"\"", "nats.creds", "must not be empty"),
            ("[nats]\nreplicas = 0", "nats.replicas", "between 1 and 5"),
            (
                "[nats]\ntls_cert = \"/c.pem\"",
                "nats.tls_cert",
                "needs both",
            ),
            ("[nats]\ntls_key = \"/c.key\"", "nats.tls_key", "needs both"),
            (
                "[orchestrator]\nlisten = \"127.0.0.1\"",
                "orchestrator.listen",
                "needs a port",
            ),
            (
                "[orchestrator]\nlisten = \"127.0.0.1:70000\"",
                "orchestrator.listen",
                "1 to 65535",
            ),
            (
                "[orchestrator]\nlisten = \"localhost:7481\"",
                "orchestrator.listen",
                "not an IP address",
            ),
            (
                "[orchestrator]\ntls_cert = \"/etc/cairn/api.pem\"",
                "orchestrator.tls_cert",
                "needs both",
            ),
            (
                "[orchestrator]\ntls_key = \"/etc/cairn/api.key\"",
                "orchestrator.tls_key",
                "needs both",
            ),
            (
                "[orchestrator]\napi_hosts = [\"cairn.example.net\", \"http://x\"]",
                "orchestrator.api_hosts = \"http://x\"",
                "NAME:PORT",
            ),
            (
                "[orchestrator]\napi_hosts = [\"cairn.example.net:0\"]",
                "orchestrator.api_hosts",
                "port 0",
            ),
            (
                "[orchestrator]\npartitions = 0",
                "orchestrator.partitions = 0",
                "between 1 and 1024",
            ),
            (
                "[orchestrator]\npartitions = 1025",
                "orchestrator.partitions",
                "between 1 and 1024",
            ),
            (
                "[orchestrator]\nlease_ttl_secs = 1",
                "orchestrator.lease_ttl_secs",
                "between 2 and 300",
            ),
            (
                "[orchestrator]\nlease_ttl_secs = 301",
                "orchestrator.lease_ttl_secs",
                "between 2 and 300",
            ),
            (
                "[orchestrator]\ninstance = \"orch 1\"",
                "orchestrator.instance",
                "only A-Z",
            ),
            (
                "[orchestrator]\ndata_dir = \" \"",
                "orchestrator.data_dir",
                "must not be empty",
            ),
            (
                "[orchestrator]\ntimezone = \"Mars/Olympus\"",
                "orchestrator.timezone",
                "is not understood",
            ),
            (
                "[orchestrator]\ntimezone = \"Europe/Pariss\"",
                "orchestrator.timezone",
                "\"Europe/Pariss\" is not understood",
            ),
            (
                "[orchestrator]\ntimezone = \"+01:00/xx\"",
                "orchestrator.timezone",
                "is not understood",
            ),
            (
                "[worker]\nmax_item_bytes = \"1 parsec\"",
                "worker.max_item_bytes",
                "is not a size",
            ),
            (
                "[worker]\nmax_item_file_size = \"0KiB\"",
                "worker.max_item_file_size",
                "at least 1 byte",
            ),
            (
                "[orchestrator]\nbackups_per_node = -1",
                "orchestrator.backups_per_node",
                "between 1 and 256",
            ),
            (
                "[orchestrator]\nrecoveries_per_node = 0",
                "orchestrator.recoveries_per_node",
                "between 1 and 256",
            ),
            (
                "[orchestrator]\nsmtp = \"mail.example.net\"",
                "orchestrator.smtp",
                "needs a port",
            ),
            (
                "[orchestrator]\nsmtp_from = \"cairn\"",
                "orchestrator.smtp_from",
                "has no '@'",
            ),
            (
                "[orchestrator]\nwebhook_allow = [\"127.0.0.1\", \"10.0.0.0/33\"]",
                "orchestrator.webhook_allow = \"10.0.0.0/33\"",
                "is not a network",
            ),
            (
                "[orchestrator]\nwebhook_allow = [\"hooks internal\"]",
                "orchestrator.webhook_allow = \"hooks internal\"",
                "neither an IP address",
            ),
            (
                "[orchestrator]\nwebhook_ca_file = \"\"",
                "orchestrator.webhook_ca_file",
                "must not be empty",
            ),
            ("[worker]\nnode = \"\"", "worker.node", "must not be empty"),
            ("[worker]\nnode = \".kvm\"", "worker.node", "must not start"),
            ("[worker]\ncluster = \"a/b\"", "worker.cluster", "only A-Z"),
            (
                "[worker]\nvms_dir = \"\"",
                "worker.vms_dir",
                "must not be empty",
            ),
            (
                "[worker]\nkey_file = \"\"",
                "worker.key_file",
                "must not be empty",
            ),
            (
                "[worker]\nparallel = 0",
                "worker.parallel",
                "between 1 and 256",
            ),
            (
                "[worker]\nparallel = 9999999999999",
                "worker.parallel",
                "between 1 and 256",
            ),
        ];
        for (text, key, problem) in cases {
            let e = err(text);
            assert!(
                e.starts_with(&format!("/etc/cairn/cairn.toml: {key}")),
                "{text:?} gave {e}"
            );
            assert!(e.contains(problem), "{text:?} gave {e}");
        }
    }
}
