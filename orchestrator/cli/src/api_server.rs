//! How `cairn up` and `cairn orchestrator` serve the HTTP API: the listen address, TLS
//! (`--tls-cert`/`--tls-key`, PEM), the names the API answers to besides its address
//! (`--api-host`, against DNS rebinding) and the rule that plain HTTP is served only on a
//! loopback address unless `--insecure-http` says otherwise, loudly.
//!
//! Everything is checked, and the certificate and key are read, by [`ApiServer::new`], before
//! the caller touches its data folder or connects anywhere; [`ApiServer::serve`] only binds
//! and serves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cairn_orchestrator::api::host::ApiHost;
use cairn_orchestrator::api::tls::TlsFiles;
use cairn_orchestrator::api::{self, ApiConfig};
use cairn_orchestrator::control::Control;
use clap::Args;
use tokio::sync::watch;

/// The API server's flags, the same on `cairn up` and `cairn orchestrator` (which also reads
/// them from `[orchestrator]` in `cairn.toml`).
#[derive(Debug, Clone, Default, Args)]
pub struct ApiServerArgs {
    /// Serve the API over HTTPS with this PEM certificate chain (server certificate first);
    /// needs --tls-key.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert: owned by the user running cairn, mode 0600.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP on an address other than loopback (refused otherwise): requests and
    /// answers cross the network unencrypted.
    #[arg(long)]
    pub insecure_http: bool,
    /// A name the API answers to besides its own address (the Host header clients send):
    /// NAME (any port) or NAME:PORT. Repeat for several.
    #[arg(long = "api-host", value_name = "NAME", value_parser = parse_api_host)]
    pub api_hosts: Vec<ApiHost>,
}

fn parse_api_host(text: &str) -> Result<ApiHost, String> {
    ApiHost::parse(text).map_err(|e| e.problem)
}

/// A checked API server, TLS files loaded.
#[derive(Debug)]
pub struct ApiServer {
    listen: SocketAddr,
    tls: Option<TlsFiles>,
    api_hosts: Vec<ApiHost>,
}

impl ApiServer {
    /// Checks the settings and reads the certificate and key. Refuses a certificate without a
    /// key (or the reverse), `--insecure-http` with TLS, and plain HTTP off loopback without
    /// `--insecure-http`; warns on stderr when plain HTTP is served off loopback.
    pub fn new(listen: SocketAddr, args: ApiServerArgs) -> Result<ApiServer> {
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles::load(cert, key)?),
            (None, None) => None,
            (Some(_), None) => bail!("--tls-cert needs --tls-key (the certificate's private key)"),
            (None, Some(_)) => bail!("--tls-key needs --tls-cert (the certificate it belongs to)"),
        };
        if tls.is_some() && args.insecure_http {
            bail!("--insecure-http contradicts --tls-cert/--tls-key: give one or the other");
        }
        if tls.is_none() {
            check_plain_http(listen, args.insecure_http)?;
            if !listen.ip().is_loopback() {
                tracing::warn!(%listen, "serving the API over plain HTTP off loopback");
                eprintln!(
                    "WARNING: --insecure-http: the API on {listen} is plain HTTP; anyone on the \
                     network path can read and change requests and answers. Use --tls-cert and \
                     --tls-key."
                );
            }
        }
        Ok(ApiServer {
            listen,
            tls,
            api_hosts: args.api_hosts,
        })
    }

    /// `https` with TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// A URL for clients on this machine, for hints: with TLS the first `--api-host` (the
    /// name the certificate is likely made for), else the bound address, with 127.0.0.1 (or
    /// ::1) in place of a wildcard address.
    pub fn client_url(&self, bound: SocketAddr) -> String {
        if self.tls.is_some()
            && let Some(name) = self.api_hosts.first()
        {
            return match name.port() {
                Some(_) => format!("https://{name}"),
                None => format!("https://{name}:{}", bound.port()),
            };
        }
        let mut addr = bound;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("{}://{addr}", self.scheme())
    }

    /// Binds the listen address and serves the API until `shutdown` turns true.
    pub async fn serve(
        self,
        control: Arc<dyn Control>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Serving> {
        let listen = self.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let addr = listener.local_addr()?;
        let url = format!("{}://{addr}", self.scheme());
        let client_url = self.client_url(addr);
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        let config = ApiConfig {
            api_hosts: self.api_hosts,
            ..ApiConfig::default()
        };
        let task = match self.tls {
            Some(tls) => tokio::spawn(api::tls::serve_tls(listener, tls, control, config, stop)),
            None => tokio::spawn(api::serve_with(listener, control, config, stop)),
        };
        Ok(Serving {
            addr,
            url,
            client_url,
            task,
        })
    }
}

/// A running API server.
#[derive(Debug)]
pub struct Serving {
    /// The bound address.
    pub addr: SocketAddr,
    /// `SCHEME://ADDR` of the bound address (the port when `--listen` named port 0).
    pub url: String,
    /// What a client on this machine would use ([`ApiServer::client_url`]).
    pub client_url: String,
    /// The server; it ends after the requests in flight are answered.
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Plain HTTP is for loopback addresses; elsewhere only with `--insecure-http`.
fn check_plain_http(listen: SocketAddr, insecure_http: bool) -> Result<()> {
    if listen.ip().is_loopback() || insecure_http {
        return Ok(());
    }
    bail!(
        "--listen {listen} is not a loopback address, and the API would be plain HTTP there: \
         give --tls-cert FILE --tls-key FILE to serve HTTPS, or --insecure-http to serve \
         plain HTTP anyway"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn plain_http_only_on_loopback_unless_insecure() {
        for ok in ["127.0.0.1:7480", "127.1.2.3:0", "[::1]:7480"] {
            check_plain_http(addr(ok), false).unwrap();
        }
        for refused in ["0.0.0.0:7480", "[::]:7480", "192.0.2.10:7480"] {
            let message = check_plain_http(addr(refused), false)
                .unwrap_err()
                .to_string();
            assert!(message.contains(refused), "{message}");
            assert!(message.contains("--tls-cert"), "{message}");
            assert!(message.contains("--insecure-http"), "{message}");
            check_plain_http(addr(refused), true).unwrap();
        }
    }

    #[test]
    fn certificate_and_key_come_together_and_exclude_insecure_http() {
        let listen = addr("0.0.0.0:7480");
        let cert_only = ApiServerArgs {
            tls_cert: Some("c.pem".into()),
            ..ApiServerArgs::default()
        };
        let message = ApiServer::new(listen, cert_only).unwrap_err().to_string();
        assert!(message.contains("--tls-cert needs --tls-key"), "{message}");
        let key_only = ApiServerArgs {
            tls_key: Some("k.pem".into()),
            ..ApiServerArgs::default()
        };
        let message = ApiServer::new(listen, key_only).unwrap_err().to_string();
        assert!(message.contains("--tls-key needs --tls-cert"), "{message}");
        // The files are read (and here missing), named in the error.
        let missing = ApiServerArgs {
            tls_cert: Some("/nonexistent/c.pem".into()),
            tls_key: Some("/nonexistent/k.pem".into()),
            insecure_http: true,
            ..ApiServerArgs::default()
        };
        let message = format!("{:#}", ApiServer::new(listen, missing).unwrap_err());
        assert!(message.contains("/nonexistent/c.pem"), "{message}");
        let plain = ApiServer::new(addr("127.0.0.1:0"), ApiServerArgs::default()).unwrap();
        assert_eq!(plain.scheme(), "http");
        assert_eq!(
            plain.client_url(addr("127.0.0.1:7480")),
            "http://127.0.0.1:7480"
        );
        assert_eq!(
            plain.client_url(addr("0.0.0.0:7480")),
            "http://127.0.0.1:7480"
        );
        assert_eq!(plain.client_url(addr("[::]:7480")), "http://[::1]:7480");
    }
}
