//! The HTTP API's transport with the real binary: `cairn up --tls-cert --tls-key` serves
//! HTTPS that `cairn vm list --server https://… --ca-file` talks to, and that a client without
//! the CA refuses with a clear error; a key others can read, or a bad certificate, stops
//! `cairn up` (and `cairn orchestrator`) before anything is created; plain HTTP off loopback is
//! refused unless `--insecure-http`; a request whose `Host` is not the server's is refused.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_tests::hook::{ServerFiles, TestCa};
use cairn_tests::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A test CA (`ca.pem`) and a server certificate for `localhost`, 127.0.0.1 and ::1 signed by
/// it (`cert.pem`, key `key.pem` with mode 0600), in `dir`.
fn make_pki(dir: &Path) -> ServerFiles {
    TestCa::new().write_server_files(dir)
}

/// Writes a new file with `mode`.
fn write_file(path: &Path, text: &str, mode: u32) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

/// Runs `cairn ARGS` with extra environment (and without `CAIRN_CA_FILE` from outside).
fn cairn_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = cairn_command();
    command.args(args).env_remove("CAIRN_CA_FILE");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("cairn runs")
}

#[track_caller]
fn assert_says(text: &str, words: &[&str]) {
    for word in words {
        assert!(text.contains(word), "{text:?} should say {word:?}");
    }
}

/// One HTTP/1.1 GET over TLS (trusting `ca`) with the given `Host` and the admin token saved
/// for `addr`; the status and body.
fn https_get(addr: &str, ca: &Path, host: &str, path: &str) -> (u16, String) {
    let token = token_for(addr).expect("the admin token saved for the server");
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    // The server may close without close_notify after `Connection: close`; the bytes are in.
    let _ = tls.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

#[test]
fn the_cli_talks_https_with_the_ca_file_and_refuses_an_unknown_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let data = dir.path().join("data");
    let server = UpServer::start(
        &data,
        &["--tls-cert", s(&pki.cert), "--tls-key", s(&pki.key)],
        &[],
    );
    assert_eq!(server.scheme, "https");
    let url = server.url();
    let port = server.addr.rsplit(':').next().unwrap().to_owned();

    // With the CA, by flag and by environment.
    let out = cairn_env(
        &[
            "vm",
            "list",
            "--server",
            &url,
            "--ca-file",
            s(&pki.ca),
            "--json",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vms: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(vms.is_array(), "{vms}");
    let out = cairn_env(
        &["jobs", "--server", &url],
        &[("CAIRN_CA_FILE", s(&pki.ca))],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without it the system roots do not know the test CA: refused, with the fix.
    let out = cairn_env(&["vm", "list", "--server", &url], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_says(&stderr, &[&url, "certificate", "--ca-file"]);
    // Another CA is refused the same way.
    let other = tempfile::tempdir().unwrap();
    let other_pki = make_pki(other.path());
    let out = cairn_env(
        &[
            "vm",
            "list",
            "--server",
            &url,
            "--ca-file",
            s(&other_pki.ca),
        ],
        &[],
    );
    assert!(!out.status.success());
    assert_says(
        &String::from_utf8_lossy(&out.stderr),
        &["certificate", "--ca-file"],
    );
    // Plain HTTP to the TLS port gets no answer from the API.
    let plain = format!("http://{}", server.addr);
    let out = cairn_env(&["vm", "list", "--server", &plain], &[]);
    assert!(!out.status.success());
    assert_says(
        &String::from_utf8_lossy(&out.stderr),
        &[&plain, "does not answer plain HTTP", "https://"],
    );

    // The Host allow-list over TLS: the address and localhost pass, another name does not.
    let (status, body) = https_get(&server.addr, &pki.ca, &server.addr, "/v1/vms");
    assert_eq!(status, 200, "{body}");
    let localhost = format!("localhost:{port}");
    let (status, body) = https_get(&server.addr, &pki.ca, &localhost, "/v1/vms");
    assert_eq!(status, 200, "{body}");
    let evil = format!("rebound.evil.example:{port}");
    let (status, body) = https_get(&server.addr, &pki.ca, &evil, "/v1/vms");
    assert_eq!(status, 421, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], "bad_host", "{body}");
    assert_says(error["error"]["message"].as_str().unwrap(), &[&evil]);
    let (status, _) = https_get(&server.addr, &pki.ca, &evil, "/healthz");
    assert_eq!(status, 200);
    // The server still serves.
    let out = cairn_env(
        &["vm", "list", "--server", &url, "--ca-file", s(&pki.ca)],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop();
}

#[test]
fn bad_certificate_or_key_files_stop_cairn_up_and_orchestrator_before_anything_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let data = dir.path().join("data");
    let up = |cert: &Path, key: &Path| {
        cairn_refused(&[
            "up",
            "--data-dir",
            s(&data),
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            s(cert),
            "--tls-key",
            s(key),
        ])
    };
    // A key that others can read.
    std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let stderr = up(&pki.cert, &pki.key);
    assert_says(&stderr, &[s(&pki.key), "readable by others", "chmod 600"]);
    assert!(!data.exists(), "cairn up made {}", data.display());
    std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Not a certificate; a missing key; a key of another certificate.
    let garbage = dir.path().join("garbage.pem");
    write_file(&garbage, "not a certificate\n", 0o600);
    assert_says(
        &up(&garbage, &pki.key),
        &[s(&garbage), "no PEM certificate"],
    );
    let missing = dir.path().join("missing.key");
    assert_says(&up(&pki.cert, &missing), &[s(&missing), "key"]);
    let other = tempfile::tempdir().unwrap();
    let other_pki = make_pki(other.path());
    assert_says(
        &up(&pki.cert, &other_pki.key),
        &[s(&pki.cert), s(&other_pki.key)],
    );
    // Half a pair.
    let stderr = cairn_refused(&["up", "--data-dir", s(&data), "--tls-cert", s(&pki.cert)]);
    assert_says(&stderr, &["--tls-cert needs --tls-key"]);
    assert!(!data.exists(), "cairn up made {}", data.display());

    // cairn orchestrator reads the same settings from cairn.toml, before it connects to NATS.
    std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let config = dir.path().join("cairn.toml");
    write_file(
        &config,
        &format!(
            "[orchestrator]\nlisten = \"0.0.0.0:7481\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            s(&pki.cert),
            s(&pki.key)
        ),
        0o600,
    );
    let orchestrator_data = dir.path().join("orchestrator");
    let stderr = cairn_refused(&[
        "orchestrator",
        "--config",
        s(&config),
        "--nats",
        "nats://127.0.0.1:1",
        "--data-dir",
        s(&orchestrator_data),
    ]);
    assert_says(&stderr, &[s(&pki.key), "readable by its group"]);
    assert!(!orchestrator_data.exists());
}

#[test]
fn plain_http_off_loopback_needs_insecure_http() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let stderr = cairn_refused(&["up", "--data-dir", s(&data), "--listen", "0.0.0.0:0"]);
    assert_says(
        &stderr,
        &[
            "0.0.0.0:0",
            "not a loopback address",
            "--tls-cert",
            "--insecure-http",
        ],
    );
    assert!(!data.exists(), "cairn up made {}", data.display());
    let stderr = cairn_refused(&[
        "orchestrator",
        "--nats",
        "nats://127.0.0.1:1",
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        s(&data),
    ]);
    assert_says(&stderr, &["not a loopback address", "--insecure-http"]);
    assert!(!data.exists());

    // With --insecure-http it serves, with a warning; a client reaches it on a loopback
    // address, which is the address its connection arrives on.
    std::fs::create_dir_all(&data).unwrap();
    let log_path = data.join("cairn.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .unwrap();
    let args = [
        "up",
        "--data-dir",
        s(&data),
        "--listen",
        "0.0.0.0:0",
        "--insecure-http",
    ];
    let (mut child, lines) = spawn_cairn(args, log, &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let port = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "cairn up did not start; log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        };
        if let Some(rest) = line.strip_prefix("cairn is up: API on http://0.0.0.0:") {
            break rest.split(',').next().unwrap().to_owned();
        }
    };
    let addr = format!("127.0.0.1:{port}");
    let (status, body) = http(&addr, "GET", "/v1/vms", None);
    assert_eq!(status, 200, "{body}");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill has no memory-safety preconditions; the child is ours and not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_says(&log, &["WARNING", "plain HTTP"]);
}
