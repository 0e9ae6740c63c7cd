//! Webhook notifications: an HTTPS `POST` of a JSON body, through hyper's HTTP/1.1 client
//! over rustls. A 2xx status is a delivery; its status line is the answer recorded in the log.
//!
//! One delivery is: parse the URL ([`Target::parse`], which applies
//! [`crate::engine::recovery::check_webhook`]); resolve the host; refuse it when an address is
//! not public and not allow-listed ([`super::address::AllowList::vet`]); connect to one of
//! exactly those vetted addresses (the host is not resolved a second time, so a DNS answer that
//! changes between the check and the connection cannot redirect it); verify the server's
//! certificate for the host name against the system's roots plus the configured extra CA;
//! send one request on a fresh connection; read at most [`MAX_RESPONSE`] bytes of the answer.
//!
//! Must not: speak plain HTTP, follow redirects (a 3xx is a failed delivery that names the
//! status and where it pointed), read an unbounded response, take longer than its timeout, or
//! connect to an address it did not vet.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
pub use rustls::pki_types::CertificateDer;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpStream;

use super::address::{AddressClass, AllowList};

/// Most response bytes read (headers are bounded by the connection's buffer, the body here).
pub const MAX_RESPONSE: usize = 16 * 1024;
/// Most bytes of a refusing answer's body quoted in the error.
const QUOTED: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadUrl(String),
    #[error("webhook {url}: cannot resolve host {host}: {source}")]
    Resolve {
        url: String,
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("webhook {url}: host {host} has no address")]
    NoAddress { url: String, host: String },
    #[error(
        "webhook {url} refused: host {host} has address {address}, {class}; allow it with \
         [orchestrator] webhook_allow or --webhook-allow"
    )]
    Refused {
        url: String,
        host: String,
        address: IpAddr,
        class: AddressClass,
    },
    #[error("webhook {url}: cannot connect to {address}: {source}")]
    Connect {
        url: String,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("webhook {url}: TLS with {host} failed: {source}")]
    Tls {
        url: String,
        host: String,
        #[source]
        source: rustls::Error,
    },
    #[error("webhook {url}: {source}")]
    Io {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("webhook {url}: HTTP: {source}")]
    Http {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("webhook {url} answered {status}{detail}")]
    Status {
        url: String,
        status: StatusCode,
        /// What follows the status in the message: where a redirect pointed, or the start of
        /// the answer's body.
        detail: String,
    },
    #[error("webhook {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("webhook CA file {path}: {problem}")]
    CaFile { path: PathBuf, problem: String },
    #[error("webhook TLS setup: {0}")]
    Setup(String),
}

impl Error {
    /// Connection problems, timeouts and 5xx/429/408 answers may pass; a refused or bad URL,
    /// a certificate that does not verify and any other answer will not.
    pub fn retryable(&self) -> bool {
        match self {
            Error::BadUrl(_)
            | Error::Refused { .. }
            | Error::Tls { .. }
            | Error::CaFile { .. }
            | Error::Setup(_) => false,
            Error::Resolve { .. }
            | Error::NoAddress { .. }
            | Error::Connect { .. }
            | Error::Io { .. }
            | Error::Http { .. }
            | Error::Timeout { .. } => true,
            Error::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
            }
        }
    }
}

/// The host of a webhook URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A name to resolve, lower case.
    Name(String),
    /// An address written in the URL (`https://192.0.2.1/`, `https://[2001:db8::1]/`).
    Ip(IpAddr),
}

/// A webhook URL taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: u16,
    /// `host[:port]` as written, for the `Host` header.
    pub authority: String,
    /// Path and query, at least `/`.
    pub path: String,
}

impl Target {
    /// Parses an `https://` URL that [`crate::engine::recovery::check_webhook`] accepts.
    pub fn parse(url: &str) -> Result<Target, Error> {
        crate::engine::recovery::check_webhook(url).map_err(Error::BadUrl)?;
        let bad = |problem: &str| Error::BadUrl(format!("webhook URL {url:?} {problem}"));
        let uri: hyper::Uri = url.parse().map_err(|_| bad("is not a valid URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("must start with https://"));
        }
        let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
        let host_text = authority.host();
        let host = match host_text
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
        {
            Some(v6) => Host::Ip(IpAddr::V6(
                v6.parse().map_err(|_| bad("has an invalid IPv6 address"))?,
            )),
            None => match host_text.parse::<IpAddr>() {
                Ok(ip) => Host::Ip(ip),
                Err(_) => Host::Name(host_text.to_ascii_lowercase()),
            },
        };
        Ok(Target {
            host,
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().to_string(),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
        })
    }

    /// The host as the allow-list and the messages name it.
    pub fn host_text(&self) -> String {
        match &self.host {
            Host::Name(name) => name.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }

    fn server_name(&self) -> Result<ServerName<'static>, String> {
        match &self.host {
            Host::Ip(ip) => Ok(ServerName::IpAddress((*ip).into())),
            Host::Name(name) => ServerName::try_from(name.clone()).map_err(|e| e.to_string()),
        }
    }
}

/// Reads the extra CA certificates for webhooks from a PEM file (one or more `CERTIFICATE`
/// blocks). Each must be usable as a trust anchor.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let problem = |problem: String| Error::CaFile {
        path: path.to_owned(),
        problem,
    };
    let pem = std::fs::read(path).map_err(|e| problem(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(format!("is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(problem("holds no PEM CERTIFICATE block".into()));
    }
    let mut store = rustls::RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        store
            .add(cert.clone())
            .map_err(|e| problem(format!("certificate {} is not a usable CA: {e}", i + 1)))?;
    }
    Ok(certs)
}

/// What the webhook client needs: the allow-list, extra trust anchors, and the timeout of
/// one delivery attempt.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub allow: AllowList,
    /// Extra CA certificates ([`read_ca_file`]), trusted besides the system's roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
    pub timeout: Duration,
}

impl Default for WebhookConfig {
    fn default() -> WebhookConfig {
        WebhookConfig {
            allow: AllowList::default(),
            extra_roots: Vec::new(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Posts webhooks. The TLS configuration (system roots plus the extra CA) is built at the
/// first delivery, on a blocking thread, and kept.
#[derive(Debug)]
pub struct Client {
    config: WebhookConfig,
    tls: tokio::sync::OnceCell<Arc<rustls::ClientConfig>>,
}

impl Client {
    pub fn new(config: WebhookConfig) -> Client {
        Client {
            config,
            tls: tokio::sync::OnceCell::new(),
        }
    }

    /// Posts `body` (JSON) to `url`; returns the answer's status line.
    pub async fn post(&self, url: &str, body: &[u8]) -> Result<String, Error> {
        let timeout = self.config.timeout;
        match tokio::time::timeout(timeout, self.exchange(url, body)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                url: url.to_string(),
                timeout,
            }),
        }
    }

    async fn tls(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        let extra = self.config.extra_roots.clone();
        self.tls
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || tls_config(&extra))
                    .await
                    .map_err(|e| Error::Setup(e.to_string()))?
            })
            .await
            .cloned()
    }

    async fn exchange(&self, url: &str, body: &[u8]) -> Result<String, Error> {
        let target = Target::parse(url)?;
        let host = target.host_text();
        let addresses = match &target.host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(name) => resolve(url, name, target.port).await?,
        };
        self.config
            .allow
            .vet(&host, &addresses)
            .map_err(|refusal| Error::Refused {
                url: url.to_string(),
                host: host.clone(),
                address: refusal.address,
                class: refusal.class,
            })?;
        let server_name = target.server_name().map_err(|problem| {
            Error::BadUrl(format!("webhook URL {url:?}: host {host:?}: {problem}"))
        })?;
        let tls = self.tls().await?;
        let tcp = connect(url, &addresses, target.port).await?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(|e| tls_error(url, &host, e))?;
        let request = Request::post(target.path.as_str())
            .header(header::HOST, target.authority.as_str())
            .header(
                header::USER_AGENT,
                concat!("cairn/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, body.len())
            .header(header::CONNECTION, "close")
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| Error::BadUrl(format!("webhook URL {url:?}: {e}")))?;
        let http = |source| Error::Http {
            url: url.to_string(),
            source,
        };
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(64 * 1024)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        // The connection is driven here, next to the exchange, and dropped with it: no task
        // outlives the delivery.
        let exchange = async {
            let response = sender.send_request(request).await.map_err(http)?;
            let status = response.status();
            let version = response.version();
            let location = response
                .headers()
                .get(header::LOCATION)
                .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned());
            let answer = read_bounded(response.into_body()).await.map_err(http)?;
            Ok::<_, Error>((version, status, location, answer))
        };
        tokio::pin!(connection);
        tokio::pin!(exchange);
        let (version, status, location, answer) = tokio::select! {
            result = &mut exchange => result?,
            // The server closed the connection: whatever it answered is buffered.
            _ = &mut connection => exchange.await?,
        };
        if status.is_success() {
            return Ok(format!("{version:?} {status}"));
        }
        let detail = if status.is_redirection() {
            format!(
                " (to {}; redirects are not followed)",
                printable(location.as_deref().unwrap_or("nowhere"))
            )
        } else {
            let text = printable(&String::from_utf8_lossy(&answer));
            if text.is_empty() {
                String::new()
            } else {
                format!(": {text}")
            }
        };
        Err(Error::Status {
            url: url.to_string(),
            status,
            detail,
        })
    }
}

/// The addresses of `name`, without duplicates, in the resolver's order.
async fn resolve(url: &str, name: &str, port: u16) -> Result<Vec<IpAddr>, Error> {
    let found = tokio::net::lookup_host((name, port))
        .await
        .map_err(|source| Error::Resolve {
            url: url.to_string(),
            host: name.to_string(),
            source,
        })?;
    let mut addresses: Vec<IpAddr> = Vec::new();
    for address in found {
        if !addresses.contains(&address.ip()) {
            addresses.push(address.ip());
        }
    }
    if addresses.is_empty() {
        return Err(Error::NoAddress {
            url: url.to_string(),
            host: name.to_string(),
        });
    }
    Ok(addresses)
}

/// A connection to the first of the vetted `addresses` that accepts one.
async fn connect(url: &str, addresses: &[IpAddr], port: u16) -> Result<TcpStream, Error> {
    let mut last = None;
    for &ip in addresses {
        let address = SocketAddr::new(ip, port);
        match TcpStream::connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(source) => last = Some((address, source)),
        }
    }
    let (address, source) = last.expect("vet saw at least one address");
    Err(Error::Connect {
        url: url.to_string(),
        address,
        source,
    })
}

/// A TLS failure: rustls's own errors (an untrusted or mismatched certificate, a protocol
/// error) are final; IO errors during the handshake may pass.
fn tls_error(url: &str, host: &str, error: std::io::Error) -> Error {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => Error::Tls {
            url: url.to_string(),
            host: host.to_string(),
            source: tls.clone(),
        },
        None => Error::Io {
            url: url.to_string(),
            source: error,
        },
    }
}

/// At most [`MAX_RESPONSE`] bytes of a body; the rest is never read.
async fn read_bounded(mut body: hyper::body::Incoming) -> Result<Vec<u8>, hyper::Error> {
    let mut data = Vec::new();
    while data.len() < MAX_RESPONSE {
        let Some(frame) = body.frame().await else {
            break;
        };
        if let Ok(chunk) = frame?.into_data() {
            let room = MAX_RESPONSE - data.len();
            data.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
    }
    Ok(data)
}

/// The start of a text from a remote server, safe to put in a message: control characters
/// become spaces, at most [`QUOTED`] characters.
fn printable(text: &str) -> String {
    let text: String = text
        .trim()
        .chars()
        .take(QUOTED)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    text
}

/// The client's TLS configuration: the system's roots and `extra`, ring as the provider,
/// HTTP/1.1 by ALPN.
fn tls_config(extra: &[CertificateDer<'static>]) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::warn!(%error, "a system CA certificate could not be loaded for webhooks");
    }
    roots.add_parsable_certificates(native.certs);
    for cert in extra {
        if let Err(error) = roots.add(cert.clone()) {
            tracing::warn!(%error, "an extra webhook CA certificate was not added");
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Setup(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_taken_apart() {
        assert_eq!(
            Target::parse("https://127.0.0.1:8443/hooks/cairn?x=1").unwrap(),
            Target {
                host: Host::Ip("127.0.0.1".parse().unwrap()),
                port: 8443,
                authority: "127.0.0.1:8443".into(),
                path: "/hooks/cairn?x=1".into(),
            }
        );
        assert_eq!(
            Target::parse("https://Hooks.Example.com").unwrap(),
            Target {
                host: Host::Name("hooks.example.com".into()),
                port: 443,
                authority: "Hooks.Example.com".into(),
                path: "/".into(),
            }
        );
        let v6 = Target::parse("https://[::1]:9443/h").unwrap();
        assert_eq!(v6.host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(v6.port, 9443);
        assert_eq!(v6.host_text(), "::1");
        for bad in [
            "http://example.com/",
            "https://",
            "https://u:p@x/",
            "https://[::1/",
            "https://x:99999/",
        ] {
            assert!(
                matches!(Target::parse(bad), Err(Error::BadUrl(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn refusals_and_certificates_are_final_server_errors_are_not() {
        let url = || "https://h/".to_string();
        let status = |code: u16| Error::Status {
            url: url(),
            status: StatusCode::from_u16(code).unwrap(),
            detail: String::new(),
        };
        assert!(status(503).retryable());
        assert!(status(429).retryable());
        assert!(!status(302).retryable());
        assert!(!status(404).retryable());
        let refused = Error::Refused {
            url: url(),
            host: "localhost".into(),
            address: "127.0.0.1".parse().unwrap(),
            class: AddressClass::Loopback,
        };
        assert!(!refused.retryable());
        let text = refused.to_string();
        assert!(
            text.contains("host localhost has address 127.0.0.1, a loopback address"),
            "{text}"
        );
        assert!(!Error::BadUrl("x".into()).retryable());
    }

    #[test]
    fn ca_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = read_ca_file(&missing).unwrap_err().to_string();
        assert!(e.starts_with("webhook CA file "), "{e}");
        assert!(e.contains("missing.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "just text\n").unwrap();
        let e = read_ca_file(&empty).unwrap_err().to_string();
        assert!(e.contains("holds no PEM CERTIFICATE block"), "{e}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = read_ca_file(&garbage).unwrap_err().to_string();
        assert!(e.contains("certificate 1 is not a usable CA"), "{e}");
    }
}
