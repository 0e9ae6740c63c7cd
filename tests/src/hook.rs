//! HTTPS webhook receivers for tests: a certificate authority made with rcgen for the test
//! ([`TestCa`]) and a small TLS server on a free loopback port ([`HookServer`]) that answers
//! every request with one fixed HTTP response and keeps what it received.
//!
//! The server's certificate names `localhost`, `127.0.0.1` and `::1`; a client trusts it
//! through the CA's PEM file (`cairn up --webhook-ca-file`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The PEM files of [`TestCa::write_server_files`].
#[derive(Debug, Clone)]
pub struct ServerFiles {
    /// The CA certificate, for clients (`--ca-file`).
    pub ca: PathBuf,
    /// The server certificate (`--tls-cert`).
    pub cert: PathBuf,
    /// Its private key, mode 0600 (`--tls-key`).
    pub key: PathBuf,
}

/// A certificate authority that exists only for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "cairn test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Writes the CA certificate to `dir/webhook-ca.pem` and returns that path.
    pub fn write_pem(&self, dir: &Path) -> PathBuf {
        let path = dir.join("webhook-ca.pem");
        std::fs::write(&path, &self.pem).expect("write the CA file");
        path
    }

    /// A server certificate for `localhost`, `127.0.0.1` and `::1` signed by this CA, written
    /// to `dir` as PEM files: `ca.pem`, `cert.pem` and `key.pem` (mode 0600, as cairn wants a
    /// private key), for a cairn that serves TLS itself.
    pub fn write_server_files(&self, dir: &Path) -> ServerFiles {
        use std::os::unix::fs::OpenOptionsExt;
        let (cert, key) = self.server_certificate();
        let write = |name: &str, text: &str, mode: u32| {
            let path = dir.join(name);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
                .expect("a new PEM file");
            file.write_all(text.as_bytes()).expect("write the PEM file");
            path
        };
        ServerFiles {
            ca: write("ca.pem", &self.pem, 0o644),
            cert: write("cert.pem", &cert.pem(), 0o644),
            key: write("key.pem", &key.serialize_pem(), 0o600),
        }
    }

    /// A certificate for `localhost`, `127.0.0.1` and `::1`, with its key.
    fn server_identity(&self) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let (cert, key) = self.server_certificate();
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    fn server_certificate(&self) -> (rcgen::Certificate, KeyPair) {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        (cert, key)
    }

    /// Starts an HTTPS server on `127.0.0.1:0` that answers every request with `response`
    /// (a whole HTTP/1.1 response, e.g. `HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n`).
    pub fn hook_server(&self, response: &str) -> HookServer {
        HookServer::start(self.server_identity(), response.as_bytes().to_vec())
    }
}

/// One request a [`HookServer`] received.
#[derive(Debug, Clone)]
pub struct HookRequest {
    /// Request line and headers, as sent.
    pub head: String,
    pub body: String,
}

impl HookRequest {
    /// The value of header `name` (case-insensitive), if sent.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }
}

/// A running HTTPS receiver. Dropping it stops its thread.
pub struct HookServer {
    pub port: u16,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<HookRequest>>>,
    stop: Arc<AtomicBool>,
    /// The accept loop; joined on drop, after `stop` is set and the accept is woken.
    thread: Option<JoinHandle<()>>,
}

impl HookServer {
    fn start(
        (cert, key): (CertificateDer<'static>, PrivateKeyDer<'static>),
        response: Vec<u8>,
    ) -> HookServer {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server certificate");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the hook server");
        let port = listener.local_addr().expect("address").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (connections, requests, stop) =
                (connections.clone(), requests.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    serve_one(&config, stream, &response, &requests);
                }
            })
        };
        HookServer {
            port,
            connections,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// `https://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// TCP connections accepted so far (also those whose handshake failed).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The requests received so far.
    pub fn requests(&self) -> Vec<HookRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for the first request.
    pub fn wait_request(&self, timeout: Duration) -> HookRequest {
        let mut first = None;
        crate::wait_until(timeout, "a request to the webhook server", || {
            first = self.requests().into_iter().next();
            first.is_some()
        });
        first.expect("waited for it")
    }
}

impl Drop for HookServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Handshakes, reads one request (head and `Content-Length` body), records it in `requests`
/// and only then answers `response`, so a client that has its answer finds its request there.
fn serve_one(
    config: &Arc<rustls::ServerConfig>,
    stream: TcpStream,
    response: &[u8],
    requests: &Mutex<Vec<HookRequest>>,
) -> Option<()> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let connection = rustls::ServerConnection::new(config.clone()).ok()?;
    let mut tls = rustls::StreamOwned::new(connection, stream);
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let request = loop {
        let n = tls.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&data).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let request = HookRequest {
                head: head.to_string(),
                body: body.to_string(),
            };
            let length: usize = request
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if body.len() >= length {
                break request;
            }
        }
    };
    requests.lock().unwrap().push(request);
    let _ = tls.write_all(response);
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Some(())
}
