//! The API over TLS (rustls, HTTP/1.1): the certificate and key files, checked and loaded
//! into a [`TlsFiles`] before anything is served, and [`serve_tls`], the same router and
//! graceful shutdown as [`super::serve_with`] on a listener that completes TLS handshakes.
//!
//! Handshakes run on their own tasks (owned by the accept loop, at most
//! [`MAX_HANDSHAKES`] at a time, each at most [`HANDSHAKE_TIMEOUT`]), so a client that
//! connects and says nothing delays nobody else. A failed handshake (a client that does not
//! trust the certificate, a plain-HTTP client) is logged and the connection dropped.
//!
//! The private key must be private: a regular file owned by the user running cairn with no
//! permission for group or others, checked on the opened file. This module reads only the two
//! files it is given; it knows nothing of where they come from.

use std::fmt;
use std::future::Future;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;

use super::ApiConfig;
use super::host::LocalAddr;
use crate::control::Control;

/// Longest a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; further connections wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 256;

/// Largest certificate or key file read, in bytes.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Why the certificate or key cannot be used. Each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be opened or read.
    #[error("TLS {what} file {}: {reason}", path.display())]
    Read {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// The certificate file holds no usable PEM certificate.
    #[error("TLS certificate file {}: {reason}", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file holds no usable PEM private key.
    #[error("TLS key file {}: {reason}", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file may be read or changed by other users.
    #[error(
        "TLS key file {} is {who} (mode {mode:04o}); it must be private: chmod 600 {}",
        path.display(),
        path.display()
    )]
    KeyExposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Who else may use it.
        who: &'static str,
    },
    /// The key file belongs to another user.
    #[error(
        "TLS key file {} is owned by uid {owner}, not by the user running cairn (uid {euid})",
        path.display()
    )]
    KeyOwner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The effective uid of this process.
        euid: u32,
    },
    /// rustls refuses the pair (e.g. the key does not belong to the certificate).
    #[error(
        "TLS certificate {} with key {}: {reason}",
        cert.display(),
        key.display()
    )]
    Refused {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        reason: String,
    },
}

/// A checked certificate chain and key, ready to serve.
#[derive(Clone)]
pub struct TlsFiles {
    config: Arc<ServerConfig>,
}

impl fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFiles").finish_non_exhaustive()
    }
}

impl TlsFiles {
    /// Reads the PEM certificate chain (the server's certificate first) and its PEM private
    /// key (PKCS#8, PKCS#1 or SEC1), checks that the key is private and belongs to the
    /// certificate.
    pub fn load(cert: &Path, key: &Path) -> Result<TlsFiles, Error> {
        let cert_pem = read_pem("certificate", cert, false)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| Error::BadCertificate {
                path: cert.into(),
                reason: format!("not valid PEM: {e}"),
            })?;
        if chain.is_empty() {
            return Err(Error::BadCertificate {
                path: cert.into(),
                reason: "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
            });
        }
        let key_pem = read_pem("key", key, true)?;
        let private_key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| Error::BadKey {
            path: key.into(),
            reason: match e {
                rustls::pki_types::pem::Error::NoItemsFound => {
                    "holds no PEM private key (-----BEGIN PRIVATE KEY-----)".into()
                }
                other => format!("not a valid PEM private key: {other}"),
            },
        })?;
        let refused = |reason: String| Error::Refused {
            cert: cert.into(),
            key: key.into(),
            reason,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| refused(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, private_key)
            .map_err(|e| refused(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsFiles {
            config: Arc::new(config),
        })
    }
}

/// Reads a PEM file of at most [`MAX_PEM_BYTES`]; a key must also be private.
fn read_pem(what: &'static str, path: &Path, private: bool) -> Result<Vec<u8>, Error> {
    let bad = |reason: String| Error::Read {
        what,
        path: path.into(),
        reason,
    };
    // Non-blocking, so a FIFO in the file's place fails below instead of hanging.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| bad(e.to_string()))?;
    let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if private {
        check_private(path, meta.uid(), meta.mode())?;
    }
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(bad(format!(
            "larger than {MAX_PEM_BYTES} bytes; a PEM {what} file is a few KiB"
        )));
    }
    Ok(bytes)
}

/// Refuses a key owned by another user than the effective uid, or with any permission for
/// group or others.
fn check_private(path: &Path, owner: u32, mode: u32) -> Result<(), Error> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if owner != euid {
        return Err(Error::KeyOwner {
            path: path.into(),
            owner,
            euid,
        });
    }
    let mode = mode & 0o7777;
    if mode & 0o077 != 0 {
        let who = if mode & 0o004 != 0 {
            "readable by others"
        } else if mode & 0o040 != 0 {
            "readable by its group"
        } else {
            "writable or usable by its group or others"
        };
        return Err(Error::KeyExposed {
            path: path.into(),
            mode,
            who,
        });
    }
    Ok(())
}

/// Serves the API over TLS on `listener` until `shutdown` resolves, then finishes the
/// requests in flight (long polls answer at once) and returns, as [`super::serve_with`] does.
pub async fn serve_tls(
    listener: TcpListener,
    tls: TlsFiles,
    control: Arc<dyn Control>,
    config: ApiConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local_addr = listener.local_addr()?;
    tracing::info!(addr = %local_addr, "HTTP API listening (TLS)");
    let (ready_tx, ready) = mpsc::channel(64);
    // The accept loop belongs to this function: it is stopped and awaited below, after the
    // server has stopped taking connections, so the port is closed when this returns.
    let accept_loop = tokio::spawn(accept_loop(
        listener,
        TlsAcceptor::from(tls.config),
        ready_tx,
    ));
    let tls_listener = TlsListener { local_addr, ready };
    let served = super::serve_on(tls_listener, local_addr, control, config, shutdown).await;
    accept_loop.abort();
    let _ = accept_loop.await;
    served
}

/// Accepts TCP connections and hands those whose handshake succeeds to `ready`. Handshakes
/// are tasks of this loop's [`JoinSet`], dropped (cancelled) with it.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let mut handshakes = JoinSet::new();
    loop {
        // At the limit, wait for a handshake to end before accepting more.
        if handshakes.len() >= MAX_HANDSHAKES {
            let _ = handshakes.join_next().await;
            continue;
        }
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // Reaps ended handshakes.
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
        };
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        handshakes.spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    // The receiver is gone only when the server stops; the stream is dropped.
                    let _ = ready.send((stream, peer)).await;
                }
                Ok(Err(e)) => {
                    tracing::info!(target: "cairn::api", %peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    tracing::info!(target: "cairn::api", %peer, "TLS handshake timed out");
                }
            }
        });
    }
}

/// The connections of [`accept_loop`] whose handshake is done, as axum's listener.
struct TlsListener {
    local_addr: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept loop ends only when `serve_tls` stops it, after axum stopped
            // accepting; until then there is nothing to hand out.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for LocalAddr {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        LocalAddr(stream.io().get_ref().0.local_addr().ok())
    }
}
