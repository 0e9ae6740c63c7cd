//! The `Host` allow-list, against DNS rebinding: a page on `evil.example` whose name the
//! attacker re-points at this server's address would otherwise reach the API from a browser
//! with the browser's network position. Such a request carries `Host: evil.example`, so the
//! server answers only requests whose `Host` is one it is known by:
//!
//! - the listen address, `IP:PORT` (also `0.0.0.0:PORT` on a wildcard address), and the
//!   address the connection arrived on (on a wildcard address, the interface's address);
//! - `localhost:PORT` when that address is a loopback address;
//! - a configured name (`--api-host NAME`, `api_hosts` in `cairn.toml`): `NAME` accepts any
//!   port (the server may sit behind a proxy on another port), `NAME:PORT` only that port.
//!
//! A `Host` without a port counts as port 80 or 443, the defaults of `http` and `https`.
//! Anything else, and a request without `Host` (HTTP/1.0), is refused with 421
//! `bad_host`. `GET /healthz` is answered whatever the `Host`, for load balancers that probe
//! by address.
//!
//! The check is pure ([`HostAllowList::allows`]); the middleware only finds the connection's
//! local address ([`LocalAddr`], set by the server as connection info) and the header.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Json;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::HOST;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;

use super::wire::{ErrorBody, ErrorDetail};

/// The stable code of a refused `Host`.
pub const BAD_HOST: &str = "bad_host";

/// A configured name is not a host name, an IP address, or `NAME:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("API host name {name:?}: {problem}")]
pub struct Error {
    /// The name as given.
    pub name: String,
    /// What is wrong with it.
    pub problem: String,
}

/// One configured name: a lowercase host name or IP address, and a port or any port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiHost {
    host: String,
    port: Option<u16>,
}

impl ApiHost {
    /// Parses `NAME`, `NAME:PORT`, an IPv4 address with an optional port, or `[IPv6]` with an
    /// optional port. Names are 1-253 characters of letters, digits, `-` and `.`; case does not
    /// matter.
    pub fn parse(text: &str) -> Result<ApiHost, Error> {
        let bad = |problem: &str| Error {
            name: text.to_owned(),
            problem: problem.to_owned(),
        };
        let (host, port) = split_host_port(text).ok_or_else(|| {
            bad("not NAME, NAME:PORT, an IP address or [IPv6]:PORT (e.g. cairn.example.net:7480)")
        })?;
        if let Some(port) = port
            && port == 0
        {
            return Err(bad("port 0 is not a port a client can use"));
        }
        let host = host.to_ascii_lowercase();
        if host.parse::<IpAddr>().is_err() && !is_dns_name(&host) {
            return Err(bad(
                "a host name has 1 to 253 characters: letters, digits, '-' and '.'",
            ));
        }
        Ok(ApiHost { host, port })
    }
}

impl ApiHost {
    /// The port, when the name was given with one.
    pub fn port(&self) -> Option<u16> {
        self.port
    }
}

impl std::fmt::Display for ApiHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bracketed = self.host.contains(':');
        match (bracketed, self.port) {
            (false, None) => write!(f, "{}", self.host),
            (false, Some(port)) => write!(f, "{}:{port}", self.host),
            (true, None) => write!(f, "[{}]", self.host),
            (true, Some(port)) => write!(f, "[{}]:{port}", self.host),
        }
    }
}

/// Whether `host` is a DNS name: labels of letters, digits and inner '-', up to 63 bytes
/// each and 253 in all (a trailing '.' allowed).
pub fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Splits `host[:port]` or `[v6][:port]`; `None` when the text is not of that shape. The host
/// of a bracketed IPv6 address comes back without brackets.
fn split_host_port(text: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':')?.parse().ok()?),
        };
        return Some((host, port));
    }
    match text.split_once(':') {
        None if !text.is_empty() => Some((text, None)),
        Some((host, port)) if !host.is_empty() && !port.contains(':') => {
            Some((host, Some(port.parse().ok()?)))
        }
        _ => None,
    }
}

/// Which `Host` values the API answers. Built by the server from its settings; see the
/// module documentation for the rules.
#[derive(Debug, Clone, Default)]
pub struct HostAllowList {
    /// Off only for a router without a server ([`super::router`] with no configured names),
    /// as in-memory tests use; every real server checks.
    enforce: bool,
    /// The address the server listens on, when it is known.
    listen: Option<SocketAddr>,
    names: Vec<ApiHost>,
}

impl HostAllowList {
    /// A list that the server checks: its own address plus `names`.
    pub fn new(names: Vec<ApiHost>) -> Self {
        Self {
            enforce: true,
            listen: None,
            names,
        }
    }

    /// Also allows the listen address itself as `Host`.
    pub fn with_listen(mut self, listen: SocketAddr) -> Self {
        self.listen = Some(listen);
        self
    }

    /// No check at all.
    pub fn off() -> Self {
        Self::default()
    }

    /// Whether a request whose `Host` header is `host` (`None`: no header), arriving on a
    /// connection whose local address is `local` (`None`: unknown, as in memory), is answered.
    pub fn allows(&self, host: Option<&str>, local: Option<SocketAddr>) -> bool {
        if !self.enforce {
            return true;
        }
        let Some((name, port)) = host.and_then(split_host_port) else {
            return false;
        };
        let name = name.to_ascii_lowercase();
        let name = name.strip_suffix('.').unwrap_or(&name);
        let ip = name.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
        let names_own = |own: SocketAddr, localhost_too: bool| {
            let port_matches = match port {
                Some(port) => port == own.port(),
                None => matches!(own.port(), 80 | 443),
            };
            let own_ip = own.ip().to_canonical();
            let is_own_address = ip == Some(own_ip);
            let is_localhost = localhost_too && name == "localhost" && own_ip.is_loopback();
            port_matches && (is_own_address || is_localhost)
        };
        if local.is_some_and(|local| names_own(local, true))
            || self.listen.is_some_and(|listen| names_own(listen, false))
        {
            return true;
        }
        self.names.iter().any(|allowed| {
            let allowed_name = allowed.host.strip_suffix('.').unwrap_or(&allowed.host);
            let port_matches = match (allowed.port, port) {
                (None, _) => true,
                (Some(allowed), Some(port)) => allowed == port,
                (Some(allowed), None) => matches!(allowed, 80 | 443),
            };
            allowed_name == name && port_matches
        })
    }
}

/// The local address of the connection a request came on: set by the server as connection
/// info ([`axum::Router::into_make_service_with_connect_info`]); `None` when the socket could
/// not tell.
#[derive(Debug, Clone, Copy)]
pub struct LocalAddr(pub Option<SocketAddr>);

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for LocalAddr {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        LocalAddr(stream.io().local_addr().ok())
    }
}

/// The state of [`check_host`].
#[derive(Debug, Clone)]
pub(super) struct HostGuard(pub(super) Arc<HostAllowList>);

/// Refuses a request whose `Host` is not on the allow-list with 421 `bad_host`.
pub(super) async fn check_host(
    State(HostGuard(allowed)): State<HostGuard>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let local = request
        .extensions()
        .get::<ConnectInfo<LocalAddr>>()
        .and_then(|info| info.0.0);
    let host = request.headers().get(HOST).map(|value| value.to_str());
    let answered = match host {
        None => allowed.allows(None, local),
        Some(Ok(text)) => allowed.allows(Some(text), local),
        Some(Err(_)) => false,
    };
    // An absolute-form target (`GET http://name/ HTTP/1.1`) names a host too; it must pass.
    let target_ok = request
        .uri()
        .authority()
        .is_none_or(|authority| allowed.allows(Some(authority.as_str()), local));
    if answered && target_ok {
        return next.run(request).await;
    }
    let message = match host {
        _ if answered => format!(
            "the request target {:?} is not a name this server answers to",
            request.uri().to_string()
        ),
        None => "the request has no Host header; this server answers only requests that \
                 name it (HTTP/1.1 with Host)"
            .to_owned(),
        Some(Ok(text)) => format!(
            "Host {text:?} is not a name this server answers to; use its address, or add \
             the name with --api-host (api_hosts in cairn.toml)"
        ),
        Some(Err(_)) => "the Host header is not ASCII text".to_owned(),
    };
    let shown = host.and_then(Result::ok).unwrap_or("");
    tracing::warn!(target: "cairn::api", host = shown, "refused: bad Host");
    let body = ErrorBody {
        error: ErrorDetail {
            code: BAD_HOST.to_owned(),
            message,
        },
    };
    (StatusCode::MISDIRECTED_REQUEST, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> HostAllowList {
        HostAllowList::new(list.iter().map(|n| ApiHost::parse(n).unwrap()).collect())
    }

    fn addr(text: &str) -> Option<SocketAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn own_address_and_localhost_on_loopback() {
        let list = names(&[]);
        let local = addr("127.0.0.1:7480");
        for ok in [
            "127.0.0.1:7480",
            "localhost:7480",
            "LOCALHOST:7480",
            "localhost.:7480",
        ] {
            assert!(list.allows(Some(ok), local), "{ok}");
        }
        for refused in [
            "127.0.0.1:7481",
            "127.0.0.2:7480",
            "127.0.0.1",
            "localhost",
            "evil.example:7480",
            "evil.example",
            "",
            ":7480",
            "127.0.0.1:7480:1",
            "127.0.0.1:port",
        ] {
            assert!(!list.allows(Some(refused), local), "{refused:?}");
        }
        assert!(!list.allows(None, local), "no Host header");
        assert!(
            !list.allows(Some("127.0.0.1:7480"), None),
            "unknown local address"
        );
    }

    #[test]
    fn localhost_only_on_loopback_and_default_ports() {
        let list = names(&[]);
        assert!(!list.allows(Some("localhost:7480"), addr("192.0.2.10:7480")));
        assert!(list.allows(Some("192.0.2.10:7480"), addr("192.0.2.10:7480")));
        assert!(list.allows(Some("192.0.2.10"), addr("192.0.2.10:443")));
        assert!(list.allows(Some("localhost"), addr("127.0.0.1:80")));
        // IPv6, and an IPv4 client on a dual-stack wildcard socket.
        assert!(list.allows(Some("[::1]:7480"), addr("[::1]:7480")));
        assert!(list.allows(Some("localhost:7480"), addr("[::1]:7480")));
        assert!(list.allows(Some("192.0.2.10:7480"), addr("[::ffff:192.0.2.10]:7480")));
        assert!(!list.allows(Some("[::2]:7480"), addr("[::1]:7480")));
    }

    #[test]
    fn configured_names_with_and_without_port() {
        let list = names(&["cairn.example.net", "Backup.Example.Net:8443", "192.0.2.7"]);
        let local = addr("10.0.0.5:7480");
        for ok in [
            "cairn.example.net",
            "cairn.example.net:7480",
            "CAIRN.example.net:443",
            "backup.example.net:8443",
            "192.0.2.7:9000",
            "10.0.0.5:7480",
        ] {
            assert!(list.allows(Some(ok), local), "{ok}");
        }
        for refused in [
            "backup.example.net",
            "backup.example.net:7480",
            "example.net",
            "cairn.example.net.evil.example",
            "localhost:7480",
        ] {
            assert!(!list.allows(Some(refused), local), "{refused}");
        }
        // In memory (no local address) only the names count.
        assert!(list.allows(Some("cairn.example.net"), None));
        assert!(!list.allows(Some("10.0.0.5:7480"), None));
    }

    #[test]
    fn the_listen_address_itself_even_when_it_is_a_wildcard() {
        let list = names(&[]).with_listen("0.0.0.0:7480".parse().unwrap());
        let local = addr("192.0.2.10:7480");
        assert!(list.allows(Some("0.0.0.0:7480"), local));
        assert!(list.allows(Some("0.0.0.0:7480"), None));
        assert!(list.allows(Some("192.0.2.10:7480"), local));
        assert!(!list.allows(Some("0.0.0.0:7481"), local));
        assert!(!list.allows(Some("localhost:7480"), local));
        assert!(!list.allows(Some("192.0.2.11:7480"), local));
    }

    #[test]
    fn off_allows_everything() {
        assert!(HostAllowList::off().allows(None, None));
        assert!(HostAllowList::off().allows(Some("evil.example"), addr("127.0.0.1:1")));
    }

    #[test]
    fn configured_names_are_validated() {
        for (ok, shown) in [
            ("cairn.example.net", "cairn.example.net"),
            ("Cairn-1.Example.NET:7480", "cairn-1.example.net:7480"),
            ("192.0.2.7", "192.0.2.7"),
            ("[2001:db8::1]:7480", "[2001:db8::1]:7480"),
            ("[::1]", "[::1]"),
        ] {
            assert_eq!(ApiHost::parse(ok).unwrap().to_string(), shown);
        }
        for bad in [
            "",
            "http://cairn.example.net",
            "cairn.example.net/",
            "cairn.example.net:0",
            "cairn.example.net:70000",
            "cairn..example.net",
            "-cairn.example.net",
            "cairn_example.net",
            "2001:db8::1",
            "[not-v6]:1",
            "*.example.net",
            "a b",
        ] {
            let err = ApiHost::parse(bad).unwrap_err();
            assert_eq!(err.name, bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }
}
