//! Webhook notifications: an HTTP/1.1 `POST` of a JSON body to an `http://` URL, over a plain
//! TCP connection (`Connection: close`). A 2xx status is a delivery; the status line is the
//! answer recorded in the log.
//!
//! Must not: follow redirects, read an unbounded response, or send to a URL that
//! [`crate::engine::recovery::check_webhook`] would refuse.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most response bytes read (the status line is all that matters).
const MAX_RESPONSE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("webhook URL {0:?} is not a usable http:// URL")]
    BadUrl(String),
    #[error("webhook {url}: {source}")]
    Io {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("webhook {url} answered {status}")]
    Status { url: String, status: String },
    #[error("webhook {url} sent no HTTP status line")]
    Malformed { url: String },
}

impl Error {
    /// Connection problems and 5xx/429 may pass.
    pub fn retryable(&self) -> bool {
        match self {
            Error::BadUrl(_) => false,
            Error::Io { .. } | Error::Malformed { .. } => true,
            Error::Status { status, .. } => status.starts_with('5') || status.starts_with("429"),
        }
    }
}

/// `(host:port, host header, path)` of an `http://` URL.
pub fn split_url(url: &str) -> Result<(String, String, String), Error> {
    crate::engine::recovery::check_webhook(url).map_err(|_| Error::BadUrl(url.into()))?;
    let rest = url.strip_prefix("http://").expect("checked");
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let address = if authority.rsplit_once(':').is_some_and(|(_, p)| {
        !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) && !authority.ends_with(']')
    }) {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((address, authority.to_string(), path.to_string()))
}

/// Posts `body` (JSON) to `url`; returns the status line.
pub async fn post(url: &str, body: &[u8]) -> Result<String, Error> {
    let (address, host, path) = split_url(url)?;
    let io = |source| Error::Io {
        url: url.to_string(),
        source,
    };
    let mut stream = TcpStream::connect(&address).await.map_err(io)?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: cairn/{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    stream.write_all(body).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while response.len() < MAX_RESPONSE && !response.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&response);
    let status_line = text.lines().next().unwrap_or_default().to_string();
    let mut parts = status_line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(Error::Malformed { url: url.into() });
    };
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(Error::Malformed { url: url.into() });
    }
    let status = status_line
        .split_once(' ')
        .map_or(code.to_string(), |(_, rest)| rest.to_string());
    if code.starts_with('2') {
        Ok(status_line)
    } else {
        Err(Error::Status {
            url: url.into(),
            status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split() {
        assert_eq!(
            split_url("http://127.0.0.1:8080/hooks/cairn?x=1").unwrap(),
            (
                "127.0.0.1:8080".into(),
                "127.0.0.1:8080".into(),
                "/hooks/cairn?x=1".into()
            )
        );
        assert_eq!(
            split_url("http://example.com").unwrap(),
            ("example.com:80".into(), "example.com".into(), "/".into())
        );
        assert!(split_url("https://example.com").is_err());
    }
}
