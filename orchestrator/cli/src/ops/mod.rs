//! `cairn ops`: setting up a deployment's NATS. `nats-init` makes, in one new folder, a
//! server CA and a client CA, each server's certificate and nats-server configuration (TLS,
//! JetStream, one user per identity with its permissions), and for each orchestrator, node
//! and the automation identity its certificate, key (0600) and the `[nats]` section of its
//! `cairn.toml`. `nats-add-node` adds a node to that folder later and rewrites the servers'
//! configurations. What is made is described by `nats-init.toml` ([`plan`]); certificates
//! come from [`pki`].
//!
//! Nothing is overwritten unless asked: `nats-init` refuses a folder that is not empty,
//! `nats-add-node` a node that exists (`--renew` issues it a new certificate).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cairn_orchestrator::bus::permissions::Identity;
use cairn_schemas::NodeId;
use clap::{Args, Subcommand};

use crate::files::{make_dir, write_atomic};

pub mod pki;
pub mod plan;

use pki::Authority;
use plan::{CLIENT_CA, Layout, MANIFEST, Manifest, SERVER_CA};

/// `cairn ops ...`.
#[derive(Debug, Subcommand)]
pub enum OpsCommand {
    /// Make the NATS servers' configurations, the CAs and one certificate per identity.
    NatsInit(NatsInitArgs),
    /// Add a node (its certificate and user) to a folder made by nats-init.
    NatsAddNode(AddNodeArgs),
    /// Make a new audit key file (32 random bytes, 0600) for `--audit-key`: give every
    /// orchestrator the same file.
    AuditKey(AuditKeyArgs),
}

/// `cairn ops audit-key`.
#[derive(Debug, Args)]
pub struct AuditKeyArgs {
    /// The new file (refused if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `cairn ops nats-init`.
#[derive(Debug, Args)]
pub struct NatsInitArgs {
    /// A new (or empty) folder for everything made.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Orchestrator instances, comma separated (ctl-01,ctl-02).
    #[arg(long, value_name = "NAMES", value_delimiter = ',', required = true)]
    pub orchestrators: Vec<String>,
    /// Nodes (their workers), comma separated (kvm-01,kvm-02); more can be added later.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Number of NATS servers: 1, or 3 or 5 for a JetStream cluster.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cluster: usize,
    /// Host of each server, comma separated (one host: every server on it, on consecutive
    /// ports).
    #[arg(
        long,
        value_name = "HOSTS",
        value_delimiter = ',',
        default_value = "localhost"
    )]
    pub servers: Vec<String>,
    /// Client port.
    #[arg(long, default_value_t = 4222)]
    pub port: u16,
    /// Route port between the servers of a cluster.
    #[arg(long, default_value_t = 6222)]
    pub cluster_port: u16,
    /// Monitoring port (loopback).
    #[arg(long, default_value_t = 8222)]
    pub monitor_port: u16,
    /// JetStream's folder on the servers (each keeps its store in a subfolder of its name).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/nats")]
    pub store_dir: String,
    /// Where a server's folder will be installed on its host (default: where it is made).
    #[arg(long, value_name = "DIR")]
    pub server_dir: Option<String>,
    /// Where a client's folder will be installed on its host (default: where it is made).
    #[arg(long, value_name = "DIR")]
    pub client_dir: Option<String>,
    /// Lifetime of the certificates, in days.
    #[arg(long, default_value_t = 825)]
    pub days: u32,
}

/// `cairn ops nats-add-node`.
#[derive(Debug, Args)]
pub struct AddNodeArgs {
    /// The node's name.
    pub name: String,
    /// The folder nats-init made.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Issue a new certificate to a node that exists (its old one stays valid until it
    /// expires: replace it on the node).
    #[arg(long)]
    pub renew: bool,
}

/// Runs an ops command.
pub fn run(command: OpsCommand) -> Result<i32> {
    match command {
        OpsCommand::NatsInit(args) => nats_init(args),
        OpsCommand::NatsAddNode(args) => add_node(args),
        OpsCommand::AuditKey(args) => {
            cairn_orchestrator::audit::keys::create_audit_key(&args.out)?;
            println!(
                "made the audit key {}: give every orchestrator this file (--audit-key, or \
                 [orchestrator] audit_key) before it starts, and keep a copy offline",
                args.out.display()
            );
            Ok(())
        }
    }
    .map(|()| 0)
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("the folder {}", path.display()))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    write_atomic(path, text.as_bytes(), mode).with_context(|| format!("writing {}", path.display()))
}

fn dir(path: &Path, mode: u32) -> Result<()> {
    make_dir(path, mode).with_context(|| format!("making {}", path.display()))
}

fn nats_init(args: NatsInitArgs) -> Result<()> {
    let servers = match args.servers.len() {
        1 => vec![args.servers[0].clone(); args.cluster],
        n if n == args.cluster => args.servers.clone(),
        n => bail!(
            "--servers: {n} hosts for --cluster {}: give one host, or one per server",
            args.cluster
        ),
    };
    let manifest = Manifest {
        servers,
        port: args.port,
        cluster_port: args.cluster_port,
        monitor_port: args.monitor_port,
        store_dir: args.store_dir,
        server_dir: args.server_dir,
        client_dir: args.client_dir,
        days: args.days,
        orchestrators: args.orchestrators,
        nodes: args.nodes,
    };
    manifest.validate()?;
    let layout = Layout {
        out: absolute(&args.out)?,
    };
    if let Ok(mut entries) = std::fs::read_dir(&layout.out)
        && entries.next().is_some()
    {
        bail!(
            "{} is not empty: nats-init makes a new CA and never overwrites one; give a new \
             folder (or use nats-add-node on the folder nats-init made)",
            layout.out.display()
        );
    }
    dir(&layout.out, 0o755)?;
    dir(&layout.ca_dir(), 0o700)?;
    let (server_ca, server_ca_files) = Authority::create(SERVER_CA, manifest.days)?;
    let (client_ca, client_ca_files) = Authority::create(CLIENT_CA, manifest.days)?;
    let ca = layout.ca_dir();
    write(&ca.join("server-ca.pem"), &server_ca_files.cert_pem, 0o644)?;
    write(
        &ca.join("server-ca-key.pem"),
        &server_ca_files.key_pem,
        0o600,
    )?;
    write(&ca.join("client-ca.pem"), &client_ca_files.cert_pem, 0o644)?;
    write(
        &ca.join("client-ca-key.pem"),
        &client_ca_files.key_pem,
        0o600,
    )?;

    for slot in manifest.slots()? {
        let folder = layout.server_dir(&slot);
        dir(&folder, 0o755)?;
        let mut hosts = vec![slot.host.clone()];
        hosts.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
        let cert = server_ca.issue_server(&slot.name, &hosts, manifest.days)?;
        write(&folder.join("server.pem"), &cert.cert_pem, 0o644)?;
        write(&folder.join("server-key.pem"), &cert.key_pem, 0o600)?;
        write(
            &folder.join("server-ca.pem"),
            &server_ca_files.cert_pem,
            0o644,
        )?;
        write(
            &folder.join("client-ca.pem"),
            &client_ca_files.cert_pem,
            0o644,
        )?;
    }
    write_server_configs(&manifest, &layout)?;
    for identity in manifest.identities() {
        write_client(
            &manifest,
            &layout,
            &client_ca,
            &server_ca_files.cert_pem,
            &identity,
        )?;
    }
    // One audit key that every orchestrator shares, in each orchestrator's folder.
    let audit_key = layout.ca_dir().join("audit.key");
    cairn_orchestrator::audit::keys::create_audit_key(&audit_key)?;
    let audit_bytes =
        std::fs::read(&audit_key).with_context(|| format!("reading {}", audit_key.display()))?;
    for identity in manifest.identities() {
        if matches!(identity, Identity::Orchestrator(_)) {
            let path = layout.client_dir(&identity).join("audit.key");
            write_atomic(&path, &audit_bytes, 0o600)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    write_manifest(&manifest, &layout)?;
    let slots = manifest.slots()?;
    println!(
        "made {} server configuration{}, {} orchestrator and {} node certificates and the \
         automation certificate in {}",
        slots.len(),
        if slots.len() == 1 { "" } else { "s" },
        manifest.orchestrators.len(),
        manifest.nodes.len(),
        layout.out.display()
    );
    for slot in &slots {
        println!(
            "  {} on {}: nats-server -c {}",
            slot.name,
            slot.host,
            layout
                .server_installed(&manifest, slot)
                .join("nats.conf")
                .display()
        );
    }
    println!(
        "  each process: the [nats] section in {}/<name>/cairn.toml (with ca.pem, cert.pem, \
         key.pem)\n  keep {} offline: it signs new nodes (cairn ops nats-add-node)",
        layout.out.join("{orchestrators,nodes}").display(),
        layout.ca_dir().display()
    );
    Ok(())
}

fn write_server_configs(manifest: &Manifest, layout: &Layout) -> Result<()> {
    for slot in manifest.slots()? {
        let text = plan::server_config(manifest, &slot, &layout.server_installed(manifest, &slot))?;
        write(&layout.server_dir(&slot).join("nats.conf"), &text, 0o644)?;
    }
    Ok(())
}

fn write_client(
    manifest: &Manifest,
    layout: &Layout,
    client_ca: &Authority,
    server_ca_pem: &str,
    identity: &Identity,
) -> Result<()> {
    let folder = layout.client_dir(identity);
    dir(&folder, 0o700)?;
    let cert = client_ca.issue_client(&identity.common_name(), manifest.days)?;
    write(&folder.join("ca.pem"), server_ca_pem, 0o644)?;
    write(&folder.join("cert.pem"), &cert.cert_pem, 0o644)?;
    write(&folder.join("key.pem"), &cert.key_pem, 0o600)?;
    let config = plan::client_config(
        manifest,
        identity,
        &layout.client_installed(manifest, identity),
    )?;
    write(&folder.join("cairn.toml"), &config, 0o644)
}

fn write_manifest(manifest: &Manifest, layout: &Layout) -> Result<()> {
    let text = format!(
        "# What `cairn ops nats-init` made here; `cairn ops nats-add-node` reads and extends it.\n{}",
        toml::to_string(manifest).context("encoding the manifest")?
    );
    write(&layout.out.join(MANIFEST), &text, 0o644)
}

fn read_manifest(layout: &Layout) -> Result<Manifest> {
    let path = layout.out.join(MANIFEST);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is {} a folder made by cairn ops nats-init?)",
            path.display(),
            layout.out.display()
        )
    })?;
    let manifest: Manifest =
        toml::from_str(&text).with_context(|| format!("{} is not a manifest", path.display()))?;
    manifest
        .validate()
        .with_context(|| format!("{}", path.display()))?;
    Ok(manifest)
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn add_node(args: AddNodeArgs) -> Result<()> {
    let node = NodeId::new(args.name.as_str()).with_context(|| format!("node {:?}", args.name))?;
    let layout = Layout {
        out: absolute(&args.out)?,
    };
    let mut manifest = read_manifest(&layout)?;
    let known = manifest.nodes.iter().any(|n| n == node.as_str());
    if known && !args.renew {
        bail!(
            "node {node} is already in {}: use --renew to issue it a new certificate",
            layout.out.display()
        );
    }
    let ca = layout.ca_dir();
    let client_ca = Authority::load(CLIENT_CA, &read_text(&ca.join("client-ca-key.pem"))?)?;
    let server_ca_pem = read_text(&ca.join("server-ca.pem"))?;
    if !known {
        manifest.nodes.push(node.to_string());
    }
    let identity = Identity::Node(node.clone());
    write_client(&manifest, &layout, &client_ca, &server_ca_pem, &identity)?;
    if !known {
        // The manifest first: if the rewrite stops half-way, running this again (with
        // --renew) renders every server from it.
        write_manifest(&manifest, &layout)?;
    }
    write_server_configs(&manifest, &layout)?;
    println!(
        "{} node {node}: its files are in {}",
        if known { "renewed" } else { "added" },
        layout.client_dir(&identity).display()
    );
    if !known {
        println!(
            "install the rewritten nats.conf of every server (in {}) and reload each: \
             nats-server --signal reload",
            layout.out.join("servers").display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn init_args(out: &Path) -> NatsInitArgs {
        NatsInitArgs {
            out: out.into(),
            orchestrators: vec!["ctl-01".into(), "ctl-02".into()],
            nodes: vec!["kvm-01".into()],
            cluster: 1,
            servers: vec!["localhost".into()],
            port: 4222,
            cluster_port: 6222,
            monitor_port: 8222,
            store_dir: "/var/lib/nats".into(),
            server_dir: None,
            client_dir: None,
            days: 30,
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_makes_every_file_with_private_keys_closed() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("nats");
        nats_init(init_args(&out)).unwrap();
        for key in [
            "ca/server-ca-key.pem",
            "ca/client-ca-key.pem",
            "ca/audit.key",
            "orchestrators/ctl-01/audit.key",
            "orchestrators/ctl-02/audit.key",
            "servers/nats-1/server-key.pem",
            "orchestrators/ctl-01/key.pem",
            "orchestrators/ctl-02/key.pem",
            "nodes/kvm-01/key.pem",
            "automation/key.pem",
        ] {
            assert_eq!(mode(&out.join(key)), 0o600, "{key}");
        }
        assert_eq!(mode(&out.join("ca")), 0o700);
        let conf = read_text(&out.join("servers/nats-1/nats.conf")).unwrap();
        assert!(conf.contains("CN=cairn-node-kvm-01"), "{conf}");
        assert!(conf.contains(&format!(
            "{}",
            out.join("servers/nats-1/server.pem").display()
        )));
        // Each process's file is a cairn.toml that cairn reads.
        let node_toml = out.join("nodes/kvm-01/cairn.toml");
        let config = crate::config::load(&node_toml).unwrap();
        assert_eq!(
            config.nats.url.as_deref(),
            Some(&["tls://localhost:4222".to_string()][..])
        );
        assert_eq!(config.nats.tls_key, Some(out.join("nodes/kvm-01/key.pem")));
        let orch = crate::config::load(&out.join("orchestrators/ctl-01/cairn.toml")).unwrap();
        assert_eq!(orch.nats.replicas, Some(1));
        assert_eq!(
            orch.orchestrator.audit_key,
            Some(out.join("orchestrators/ctl-01/audit.key"))
        );
        // Every orchestrator has the same audit key; the key file reads as one.
        let key = std::fs::read(out.join("orchestrators/ctl-01/audit.key")).unwrap();
        assert_eq!(
            std::fs::read(out.join("orchestrators/ctl-02/audit.key")).unwrap(),
            key
        );
        cairn_orchestrator::audit::keys::read_audit_key(
            &out.join("orchestrators/ctl-02/audit.key"),
        )
        .unwrap();
        assert!(!out.join("nodes/kvm-01/audit.key").exists());
        // A second run never replaces the CA.
        let ca = read_text(&out.join("ca/client-ca-key.pem")).unwrap();
        let err = nats_init(init_args(&out)).unwrap_err().to_string();
        assert!(err.contains("is not empty"), "{err}");
        assert_eq!(read_text(&out.join("ca/client-ca-key.pem")).unwrap(), ca);
    }

    #[test]
    fn bad_input_is_refused_before_anything_is_made() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("nats");
        let cases: Vec<(NatsInitArgs, &str)> = vec![
            (
                NatsInitArgs {
                    cluster: 3,
                    servers: vec!["a".into(), "b".into()],
                    ..init_args(&out)
                },
                "--servers: 2 hosts for --cluster 3",
            ),
            (
                NatsInitArgs {
                    nodes: vec!["kvm/01".into()],
                    ..init_args(&out)
                },
                "--nodes",
            ),
            (
                NatsInitArgs {
                    cluster: 2,
                    ..init_args(&out)
                },
                "--cluster",
            ),
        ];
        for (args, words) in cases {
            let err = format!("{:#}", nats_init(args).unwrap_err());
            assert!(err.contains(words), "{err:?} should say {words:?}");
            assert!(!out.exists(), "{err}: made {}", out.display());
        }
    }

    #[test]
    fn add_node_issues_a_certificate_and_rewrites_every_server() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("nats");
        nats_init(NatsInitArgs {
            cluster: 3,
            servers: vec!["127.0.0.1".into()],
            ..init_args(&out)
        })
        .unwrap();
        let add = |name: &str, renew: bool| {
            add_node(AddNodeArgs {
                name: name.into(),
                out: out.clone(),
                renew,
            })
        };
        add("kvm-02", false).unwrap();
        for server in ["nats-1", "nats-2", "nats-3"] {
            let conf = read_text(&out.join(format!("servers/{server}/nats.conf"))).unwrap();
            assert!(conf.contains("CN=cairn-node-kvm-02"), "{server}");
            assert!(conf.contains("CN=cairn-node-kvm-01"), "{server}");
        }
        assert_eq!(mode(&out.join("nodes/kvm-02/key.pem")), 0o600);
        let manifest = read_manifest(&Layout { out: out.clone() }).unwrap();
        assert_eq!(manifest.nodes, ["kvm-01", "kvm-02"]);

        let key = read_text(&out.join("nodes/kvm-02/key.pem")).unwrap();
        let err = add("kvm-02", false).unwrap_err().to_string();
        assert!(err.contains("--renew"), "{err}");
        assert_eq!(read_text(&out.join("nodes/kvm-02/key.pem")).unwrap(), key);
        add("kvm-02", true).unwrap();
        assert_ne!(read_text(&out.join("nodes/kvm-02/key.pem")).unwrap(), key);
        let manifest = read_manifest(&Layout { out: out.clone() }).unwrap();
        assert_eq!(manifest.nodes, ["kvm-01", "kvm-02"]);

        let err = format!("{:#}", add("bad name", false).unwrap_err());
        assert!(err.contains("bad name"), "{err}");
        let elsewhere = tmp.path().join("elsewhere");
        let err = format!(
            "{:#}",
            add_node(AddNodeArgs {
                name: "kvm-03".into(),
                out: elsewhere,
                renew: false
            })
            .unwrap_err()
        );
        assert!(err.contains("nats-init"), "{err}");
    }
}
