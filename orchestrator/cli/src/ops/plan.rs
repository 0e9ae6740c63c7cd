//! What `cairn ops nats-init` makes, as data and text: the manifest of a NATS deployment
//! (`nats-init.toml`: servers, ports, identities), the folder layout, each server's
//! nats-server configuration and each process's `[nats]` section. Pure: no files, no keys;
//! the same manifest always renders the same text, so `nats-add-node` can rewrite the
//! servers' configurations from it.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use cairn_orchestrator::bus::permissions::{Identity, Permissions};
use cairn_schemas::NodeId;
use serde::{Deserialize, Serialize};

/// The manifest's file name in the output folder.
pub const MANIFEST: &str = "nats-init.toml";
/// Cluster sizes offered: one server, or a JetStream cluster with a majority that survives
/// the loss of one (3) or two (5) servers.
pub const CLUSTER_SIZES: [usize; 3] = [1, 3, 5];
/// Certificate lifetimes, in days.
pub const DAYS: std::ops::RangeInclusive<u32> = 1..=3650;
/// Common names of the two authorities.
pub const SERVER_CA: &str = "cairn NATS server CA";
/// See [`SERVER_CA`].
pub const CLIENT_CA: &str = "cairn NATS client CA";

/// A deployment that cannot be made as asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One setting is unusable.
    #[error("{setting}: {problem}")]
    Invalid {
        /// The flag or manifest key.
        setting: String,
        /// What is wrong, and what would be right.
        problem: String,
    },
}

fn invalid(setting: &str, problem: impl Into<String>) -> Error {
    Error::Invalid {
        setting: setting.into(),
        problem: problem.into(),
    }
}

/// `nats-init.toml`: everything the configurations are rendered from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The host of each server, in order (`nats-1` first); a host may repeat (servers on one
    /// machine then take consecutive ports).
    pub servers: Vec<String>,
    /// Client port of the first server on each host.
    pub port: u16,
    /// Route port (clusters).
    pub cluster_port: u16,
    /// Monitoring port (loopback only).
    pub monitor_port: u16,
    /// JetStream's folder; each server keeps its store in `<store_dir>/<server name>`.
    pub store_dir: String,
    /// Where each server's folder is installed on its host (default: the output folder).
    pub server_dir: Option<String>,
    /// Where each client's folder is installed on its host (default: the output folder).
    pub client_dir: Option<String>,
    /// Lifetime of the certificates, in days.
    pub days: u32,
    /// Orchestrator identities.
    pub orchestrators: Vec<String>,
    /// Node identities.
    pub nodes: Vec<String>,
}

/// One server of the deployment, with its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// `nats-1`, `nats-2`, ...
    pub name: String,
    /// Host clients and other servers reach it at.
    pub host: String,
    /// Client port.
    pub port: u16,
    /// Route port.
    pub cluster_port: u16,
    /// Monitoring port.
    pub monitor_port: u16,
}

impl Slot {
    /// Whether the server is only reachable from its own machine.
    fn loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// `host:port` with IPv6 addresses in brackets.
    fn address(&self, port: u16) -> String {
        if self.host.contains(':') {
            format!("[{}]:{port}", self.host)
        } else {
            format!("{}:{port}", self.host)
        }
    }
}

/// A host name or an IP address, as it goes into a URL and a certificate.
fn check_host(host: &str) -> Result<(), String> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let labels_ok = cairn_orchestrator::api::host::is_dns_name(host) && !host.ends_with('.');
    if labels_ok {
        Ok(())
    } else {
        Err(format!(
            "{host:?} is neither an IP address nor a host name (letters, digits, '-', \
             labels separated by '.')"
        ))
    }
}

fn check_names(setting: &str, names: &[String]) -> Result<(), Error> {
    let mut seen = BTreeSet::new();
    for name in names {
        NodeId::new(name.as_str()).map_err(|e| invalid(setting, e.to_string()))?;
        if !seen.insert(name) {
            return Err(invalid(setting, format!("{name:?} is listed twice")));
        }
    }
    Ok(())
}

impl Manifest {
    /// Checks every setting; the first problem is named.
    pub fn validate(&self) -> Result<(), Error> {
        if !CLUSTER_SIZES.contains(&self.servers.len()) {
            return Err(invalid(
                "--cluster",
                format!(
                    "{} servers: use 1, or 3 or 5 for a cluster (a majority must survive a \
                     server's loss)",
                    self.servers.len()
                ),
            ));
        }
        for host in &self.servers {
            check_host(host).map_err(|p| invalid("--servers", p))?;
        }
        for (setting, port) in [
            ("--port", self.port),
            ("--cluster-port", self.cluster_port),
            ("--monitor-port", self.monitor_port),
        ] {
            if port == 0 {
                return Err(invalid(setting, "port 0 is not a usable port"));
            }
        }
        let mut taken = BTreeSet::new();
        let slots = self.slots()?;
        for slot in &slots {
            let mut ports = vec![slot.port, slot.monitor_port];
            if slots.len() > 1 {
                ports.push(slot.cluster_port);
            }
            for port in ports {
                if !taken.insert((slot.host.clone(), port)) {
                    return Err(invalid(
                        "--port",
                        format!(
                            "{} would use port {port} on {} twice; choose ports further apart",
                            slot.name, slot.host
                        ),
                    ));
                }
            }
        }
        for (setting, dir) in [
            ("--store-dir", Some(&self.store_dir)),
            ("--server-dir", self.server_dir.as_ref()),
            ("--client-dir", self.client_dir.as_ref()),
        ] {
            if let Some(dir) = dir
                && (!Path::new(dir).is_absolute() || dir.contains(['"', '\\', '\n']))
            {
                return Err(invalid(
                    setting,
                    format!("{dir:?} is not an absolute path without quotes or backslashes"),
                ));
            }
        }
        if !DAYS.contains(&self.days) {
            return Err(invalid(
                "--days",
                format!("{} days: certificates last 1 to 3650 days", self.days),
            ));
        }
        if self.orchestrators.is_empty() {
            return Err(invalid("--orchestrators", "name at least one orchestrator"));
        }
        check_names("--orchestrators", &self.orchestrators)?;
        check_names("--nodes", &self.nodes)?;
        Ok(())
    }

    /// The servers with their ports: a host's first server takes the given ports, its next
    /// ones the following numbers.
    pub fn slots(&self) -> Result<Vec<Slot>, Error> {
        let mut slots = Vec::new();
        for (i, host) in self.servers.iter().enumerate() {
            let offset = self.servers[..i].iter().filter(|h| *h == host).count() as u16;
            let port = |base: u16, setting: &str| {
                base.checked_add(offset)
                    .ok_or_else(|| invalid(setting, format!("{base} + {offset} is past 65535")))
            };
            slots.push(Slot {
                name: format!("nats-{}", i + 1),
                host: host.clone(),
                port: port(self.port, "--port")?,
                cluster_port: port(self.cluster_port, "--cluster-port")?,
                monitor_port: port(self.monitor_port, "--monitor-port")?,
            });
        }
        Ok(slots)
    }

    /// Every identity, orchestrators first.
    pub fn identities(&self) -> Vec<Identity> {
        let name = |n: &String| NodeId::new(n.as_str()).expect("validated names");
        self.orchestrators
            .iter()
            .map(|n| Identity::Orchestrator(name(n)))
            .chain(self.nodes.iter().map(|n| Identity::Node(name(n))))
            .chain([Identity::Automation])
            .collect()
    }

    /// Replicas of cairn's streams: 1 on one server, 3 in a cluster.
    pub fn replicas(&self) -> u32 {
        if self.servers.len() == 1 { 1 } else { 3 }
    }

    /// Client URLs of every server.
    pub fn urls(&self) -> Result<String, Error> {
        Ok(self
            .slots()?
            .iter()
            .map(|s| format!("tls://{}", s.address(s.port)))
            .collect::<Vec<_>>()
            .join(","))
    }
}

/// Where things go below the output folder.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The output folder (absolute).
    pub out: PathBuf,
}

impl Layout {
    /// The authorities' folder (mode 0700).
    pub fn ca_dir(&self) -> PathBuf {
        self.out.join("ca")
    }

    /// A server's folder.
    pub fn server_dir(&self, slot: &Slot) -> PathBuf {
        self.out.join("servers").join(&slot.name)
    }

    /// An identity's folder.
    pub fn client_dir(&self, identity: &Identity) -> PathBuf {
        match identity {
            Identity::Orchestrator(name) => self.out.join("orchestrators").join(name.as_str()),
            Identity::Node(name) => self.out.join("nodes").join(name.as_str()),
            Identity::Automation => self.out.join("automation"),
        }
    }

    /// Where a server's files are on its host.
    pub fn server_installed(&self, manifest: &Manifest, slot: &Slot) -> PathBuf {
        manifest
            .server_dir
            .as_ref()
            .map_or_else(|| self.server_dir(slot), PathBuf::from)
    }

    /// Where an identity's files are on its host.
    pub fn client_installed(&self, manifest: &Manifest, identity: &Identity) -> PathBuf {
        manifest
            .client_dir
            .as_ref()
            .map_or_else(|| self.client_dir(identity), PathBuf::from)
    }
}

/// A string in nats-server's configuration syntax.
fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

fn list(items: &[String], indent: &str) -> String {
    if items.is_empty() {
        return "[]".into();
    }
    let mut out = String::from("[\n");
    for item in items {
        let _ = writeln!(out, "{indent}  {}", quote(item));
    }
    out.push_str(indent);
    out.push(']');
    out
}

fn permissions_block(p: &Permissions) -> String {
    let indent = "        ";
    let mut out = String::from("{\n");
    out.push_str("      publish: {\n");
    // (An empty allow list would mean "everything".)
    if !p.publish_allow.is_empty() {
        let _ = writeln!(out, "        allow: {}", list(&p.publish_allow, indent));
    }
    if !p.publish_deny.is_empty() {
        let _ = writeln!(out, "        deny: {}", list(&p.publish_deny, indent));
    }
    out.push_str("      }\n      subscribe: {\n");
    if p.subscribe_allow.is_empty() {
        out.push_str("        deny: [\">\"]\n");
    } else {
        let _ = writeln!(out, "        allow: {}", list(&p.subscribe_allow, indent));
    }
    out.push_str("      }\n");
    let _ = writeln!(out, "      allow_responses: {}", p.allow_responses);
    out.push_str("    }");
    out
}

fn path_text(path: &Path) -> String {
    quote(&path.to_string_lossy())
}

/// The nats-server configuration of one server, its files in `dir` on its host.
pub fn server_config(manifest: &Manifest, slot: &Slot, dir: &Path) -> Result<String, Error> {
    let slots = manifest.slots()?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# {} of cairn's NATS ({} server{}), written by `cairn ops nats-init` from {MANIFEST};\n\
         # `cairn ops nats-add-node` rewrites it. Start it with\n\
         #   nats-server -c {}\n\
         # and after a rewrite apply the new users with `nats-server --signal reload`.\n\
         #\n\
         # Clients authenticate with certificates of the client CA (mutual TLS); each\n\
         # certificate's subject is a user below with its own permissions (see cairn's\n\
         # ARCHITECTURE.md, \"NATS identities\"). No other client can log in.",
        slot.name,
        slots.len(),
        if slots.len() == 1 { "" } else { "s" },
        dir.join("nats.conf").display(),
    );
    out.push('\n');
    let bind = if slot.loopback() {
        "127.0.0.1"
    } else {
        "0.0.0.0"
    };
    let _ = writeln!(out, "server_name: {}", quote(&slot.name));
    let _ = writeln!(out, "listen: {}", quote(&format!("{bind}:{}", slot.port)));
    out.push_str("# Monitoring (GET /healthz), local only.\n");
    let _ = writeln!(
        out,
        "http: {}",
        quote(&format!("127.0.0.1:{}", slot.monitor_port))
    );
    out.push('\n');
    let _ = write!(
        out,
        "tls {{\n  cert_file: {}\n  key_file: {}\n  # Clients must present a certificate of \
         the client CA; its subject names the user.\n  ca_file: {}\n  verify_and_map: true\n  \
         timeout: 2\n}}\n\n",
        path_text(&dir.join("server.pem")),
        path_text(&dir.join("server-key.pem")),
        path_text(&dir.join("client-ca.pem")),
    );
    let store = Path::new(&manifest.store_dir).join(&slot.name);
    let _ = write!(
        out,
        "jetstream {{\n  store_dir: {}\n  # fsync before acknowledging: an acknowledged event \
         survives a power cut.\n  sync_interval: always\n}}\n",
        path_text(&store)
    );
    if slots.len() > 1 {
        let routes: Vec<String> = slots
            .iter()
            .map(|s| format!("nats-route://{}", s.address(s.cluster_port)))
            .collect();
        let _ = write!(
            out,
            "\ncluster {{\n  name: \"cairn\"\n  listen: {}\n  # Routes are mutual TLS with \
             certificates of the server CA only: a client's certificate cannot join.\n  \
             tls {{\n    cert_file: {}\n    key_file: {}\n    ca_file: {}\n    verify: true\n    \
             timeout: 2\n  }}\n  routes: {}\n}}\n",
            quote(&format!("{bind}:{}", slot.cluster_port)),
            path_text(&dir.join("server.pem")),
            path_text(&dir.join("server-key.pem")),
            path_text(&dir.join("server-ca.pem")),
            list(&routes, "  "),
        );
    }
    out.push_str("\nauthorization {\n");
    // Every orchestrator has the same permissions: written once.
    let orchestrators = Identity::Orchestrator(NodeId::new("any").expect("a valid name"));
    let _ = writeln!(
        out,
        "  ORCHESTRATOR = {}\n",
        permissions_block(&orchestrators.permissions())
    );
    out.push_str("  users: [\n");
    for identity in manifest.identities() {
        let permissions = match identity {
            Identity::Orchestrator(_) => "$ORCHESTRATOR".to_string(),
            _ => permissions_block(&identity.permissions()),
        };
        let _ = writeln!(
            out,
            "    {{ user: {}, permissions: {permissions} }}",
            quote(&identity.user())
        );
    }
    out.push_str("  ]\n}\n");
    Ok(out)
}

/// The `[nats]` section of an identity's `cairn.toml`, its files in `dir` on its host.
pub fn client_config(
    manifest: &Manifest,
    identity: &Identity,
    dir: &Path,
) -> Result<String, Error> {
    let toml_path =
        |file: &str| toml::Value::String(dir.join(file).to_string_lossy().into_owned()).to_string();
    let mut out = String::new();
    let (who, note) = match identity {
        Identity::Orchestrator(name) => (
            format!("orchestrator {name}"),
            format!(
                "Add your other [orchestrator] settings at the end; run it as --instance {name}."
            ),
        ),
        Identity::Node(name) => (
            format!("node {name}"),
            format!(
                "The certificate is node {name}'s: run its worker as that node \
                 ([worker] node = \"{name}\" or --node {name})."
            ),
        ),
        Identity::Automation => (
            "automation".to_string(),
            "It may only subscribe to cairn.public.>.".to_string(),
        ),
    };
    let _ = writeln!(
        out,
        "# NATS for {who}, written by `cairn ops nats-init`.\n# {note}\n[nats]"
    );
    let _ = writeln!(out, "url = {}", toml::Value::String(manifest.urls()?));
    let _ = writeln!(out, "tls_ca = {}", toml_path("ca.pem"));
    let _ = writeln!(out, "tls_cert = {}", toml_path("cert.pem"));
    let _ = writeln!(out, "tls_key = {}", toml_path("key.pem"));
    if matches!(identity, Identity::Orchestrator(_)) {
        let _ = writeln!(out, "replicas = {}", manifest.replicas());
        let _ = writeln!(
            out,
            "\n# The audit key every orchestrator shares (it keys the event log's hash chain).\n\
             [orchestrator]\naudit_key = {}",
            toml_path("audit.key")
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            servers: vec!["127.0.0.1".into()],
            port: 4222,
            cluster_port: 6222,
            monitor_port: 8222,
            store_dir: "/var/lib/nats".into(),
            server_dir: None,
            client_dir: None,
            days: 825,
            orchestrators: vec!["ctl-01".into(), "ctl-02".into()],
            nodes: vec!["kvm-01".into(), "kvm-02".into()],
        }
    }

    fn problem(m: &Manifest) -> String {
        m.validate().unwrap_err().to_string()
    }

    #[test]
    fn servers_on_one_host_take_consecutive_ports() {
        let m = Manifest {
            servers: vec!["127.0.0.1".into(); 3],
            ..manifest()
        };
        m.validate().unwrap();
        let ports: Vec<(u16, u16, u16)> = m
            .slots()
            .unwrap()
            .iter()
            .map(|s| (s.port, s.cluster_port, s.monitor_port))
            .collect();
        assert_eq!(
            ports,
            [(4222, 6222, 8222), (4223, 6223, 8223), (4224, 6224, 8224)]
        );
        assert_eq!(
            m.urls().unwrap(),
            "tls://127.0.0.1:4222,tls://127.0.0.1:4223,tls://127.0.0.1:4224"
        );
        let spread = Manifest {
            servers: vec!["a.example".into(), "b.example".into(), "::1".into()],
            ..manifest()
        };
        assert_eq!(
            spread.urls().unwrap(),
            "tls://a.example:4222,tls://b.example:4222,tls://[::1]:4222"
        );
        assert_eq!(spread.replicas(), 3);
    }

    #[test]
    fn bad_settings_are_named() {
        let m = manifest();
        m.validate().unwrap();
        for (bad, words) in [
            (
                Manifest {
                    servers: vec!["a".into(), "b".into()],
                    ..m.clone()
                },
                "--cluster: 2 servers",
            ),
            (
                Manifest {
                    servers: vec!["bad host".into()],
                    ..m.clone()
                },
                "--servers: \"bad host\"",
            ),
            (
                Manifest {
                    nodes: vec!["kvm-01".into(), "kvm-01".into()],
                    ..m.clone()
                },
                "listed twice",
            ),
            (
                Manifest {
                    nodes: vec!["kvm 01".into()],
                    ..m.clone()
                },
                "--nodes",
            ),
            (
                Manifest {
                    orchestrators: vec![],
                    ..m.clone()
                },
                "--orchestrators",
            ),
            (
                Manifest {
                    days: 0,
                    ..m.clone()
                },
                "--days",
            ),
            (
                Manifest {
                    store_dir: "relative".into(),
                    ..m.clone()
                },
                "--store-dir",
            ),
            (
                Manifest {
                    port: 8222,
                    ..m.clone()
                },
                "port 8222 on 127.0.0.1 twice",
            ),
            (
                Manifest {
                    servers: vec!["h".into(); 3],
                    port: 65535,
                    ..m.clone()
                },
                "past 65535",
            ),
        ] {
            let p = problem(&bad);
            assert!(p.contains(words), "{p:?} should say {words:?}");
        }
    }

    #[test]
    fn a_server_config_lists_every_identity_with_its_permissions() {
        let m = manifest();
        let slot = &m.slots().unwrap()[0];
        let text = server_config(&m, slot, Path::new("/etc/nats/cairn")).unwrap();
        assert!(text.contains("listen: \"127.0.0.1:4222\""), "{text}");
        assert!(text.contains("verify_and_map: true"));
        assert!(text.contains("sync_interval: always"));
        assert!(text.contains("store_dir: \"/var/lib/nats/nats-1\""));
        assert!(!text.contains("cluster {"), "one server has no routes");
        for user in [
            "CN=cairn-orchestrator-ctl-01",
            "CN=cairn-orchestrator-ctl-02",
            "CN=cairn-node-kvm-01",
            "CN=cairn-node-kvm-02",
            "CN=cairn-automation",
        ] {
            assert!(text.contains(&format!("user: \"{user}\"")), "{user}");
        }
        assert!(text.contains("\"cairn.report.*.kvm-02\""));
        assert_eq!(
            text,
            server_config(&m, slot, Path::new("/etc/nats/cairn")).unwrap()
        );
    }

    #[test]
    fn a_cluster_config_routes_to_every_server_over_tls() {
        let m = Manifest {
            servers: vec![
                "n1.example".into(),
                "n2.example".into(),
                "n3.example".into(),
            ],
            ..manifest()
        };
        let slots = m.slots().unwrap();
        let text = server_config(&m, &slots[1], Path::new("/etc/nats/cairn")).unwrap();
        assert!(text.contains("server_name: \"nats-2\""));
        assert!(text.contains("listen: \"0.0.0.0:4222\""));
        assert!(text.contains("\"nats-route://n3.example:6222\""));
        assert!(text.contains("ca_file: \"/etc/nats/cairn/server-ca.pem\""));
    }

    #[test]
    fn client_configs_name_their_files_and_urls() {
        let m = manifest();
        let node = Identity::Node(NodeId::new("kvm-01").unwrap());
        let text = client_config(&m, &node, Path::new("/etc/cairn/nats")).unwrap();
        assert!(text.contains("url = \"tls://127.0.0.1:4222\""), "{text}");
        assert!(text.contains("tls_key = \"/etc/cairn/nats/key.pem\""));
        assert!(!text.contains("replicas"));
        let orch = Identity::Orchestrator(NodeId::new("ctl-01").unwrap());
        let text = client_config(&m, &orch, Path::new("/x")).unwrap();
        assert!(text.contains("replicas = 1"));
    }
}
