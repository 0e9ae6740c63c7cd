//! A small SMTP client (RFC 5321) for notification mail: one message to one recipient per
//! connection, `EHLO` (falling back to `HELO`), `MAIL FROM`, `RCPT TO`, `DATA` with
//! dot-stuffing, `QUIT`. Every server reply is read with bounded line length and line count
//! and checked against the codes the step allows.
//!
//! Plain SMTP only, meant for a relay on the same host or a trusted network. The `EHLO` reply's
//! extensions are kept ([`Session::extensions`]) so that `STARTTLS` can be added as one more
//! step between `EHLO` and `MAIL FROM` without changing the rest.
//!
//! Must not: put caller text into a command or a header unchecked (CR/LF would inject
//! commands or headers).

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest reply line accepted (RFC 5321 allows 512 octets).
const MAX_LINE: usize = 4096;
/// Most lines of one multi-line reply.
const MAX_LINES: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("SMTP server {server}: {source}")]
    Connect {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("SMTP connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("SMTP server answered {code} to {command}: {text}")]
    Rejected {
        command: &'static str,
        code: u16,
        text: String,
    },
    #[error("SMTP server sent a malformed reply: {0:?}")]
    Malformed(String),
    #[error("SMTP: {0}")]
    Invalid(String),
    #[error("timed out")]
    Timeout,
}

impl Error {
    /// Connection problems and 4xx replies may pass; 5xx and bad input do not.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Io(_) | Error::Timeout | Error::Malformed(_) => true,
            Error::Rejected { code, .. } => (400..500).contains(code),
            Error::Invalid(_) => false,
        }
    }
}

/// One message.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: String,
    pub subject: String,
    pub body: String,
    /// For the `Date:` header (Unix milliseconds).
    pub date_ms: u64,
    pub message_id: String,
}

/// A reply: its code and its text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    fn text(&self) -> String {
        self.lines.join(" / ")
    }
}

/// An open SMTP conversation.
pub struct Session {
    stream: BufReader<TcpStream>,
    /// Extensions the server announced in its `EHLO` reply (upper-cased keywords).
    pub extensions: Vec<String>,
}

impl Session {
    async fn reply(&mut self) -> Result<Reply, Error> {
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = AsyncReadExt::take(&mut self.stream, MAX_LINE as u64 + 2)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return Err(Error::Malformed("connection closed mid-reply".into()));
            }
            if !line.ends_with(b"\n") {
                return Err(Error::Malformed(format!(
                    "reply line longer than {MAX_LINE} bytes"
                )));
            }
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            let code = parse_code(&line)?;
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line.get(4..).unwrap_or_default().to_string());
            if lines.len() > MAX_LINES {
                return Err(Error::Malformed(format!(
                    "reply of more than {MAX_LINES} lines"
                )));
            }
            if !more {
                return Ok(Reply { code, lines });
            }
        }
    }

    async fn command(
        &mut self,
        name: &'static str,
        line: &str,
        ok: &[u16],
    ) -> Result<Reply, Error> {
        self.stream
            .get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await?;
        let reply = self.reply().await?;
        if ok.contains(&reply.code) {
            Ok(reply)
        } else {
            Err(Error::Rejected {
                command: name,
                code: reply.code,
                text: reply.text(),
            })
        }
    }
}

fn parse_code(line: &str) -> Result<u16, Error> {
    let bytes = line.as_bytes();
    if bytes.len() < 3
        || !bytes[..3].iter().all(u8::is_ascii_digit)
        || !matches!(bytes.get(3), None | Some(b' ' | b'-'))
    {
        return Err(Error::Malformed(line.chars().take(200).collect()));
    }
    Ok(line[..3].parse().expect("three digits"))
}

fn check_header_text(what: &str, text: &str) -> Result<(), Error> {
    if text.chars().any(|c| c == '\r' || c == '\n' || c == '\0') {
        return Err(Error::Invalid(format!("{what} contains a line break")));
    }
    Ok(())
}

/// The message as sent after `DATA`: headers, body with CRLF line ends and leading dots
/// doubled, and the final `.` line.
pub fn message_data(mail: &Mail) -> String {
    // Non-ASCII in the subject would need RFC 2047 words; notification subjects are replaced
    // by '?' there rather than sent raw.
    let subject: String = mail
        .subject
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_control() {
                c
            } else {
                '?'
            }
        })
        .collect();
    let mut out = String::new();
    out.push_str(&format!("From: {}\r\n", mail.from));
    out.push_str(&format!("To: {}\r\n", mail.to));
    out.push_str(&format!("Subject: {subject}\r\n"));
    out.push_str(&format!("Date: {}\r\n", rfc2822_date(mail.date_ms)));
    out.push_str(&format!("Message-ID: <{}>\r\n", mail.message_id));
    out.push_str("MIME-Version: 1.0\r\n");
    out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    out.push_str("Content-Transfer-Encoding: 8bit\r\n");
    out.push_str("\r\n");
    for line in mail.body.replace("\r\n", "\n").split('\n') {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(".\r\n");
    out
}

/// `Thu, 01 Jan 1970 00:00:00 +0000`.
pub fn rfc2822_date(unix_ms: u64) -> String {
    crate::policy::tz::timestamp(i64::try_from(unix_ms).unwrap_or(i64::MAX))
        .strftime("%a, %d %b %Y %H:%M:%S +0000")
        .to_string()
}

/// Sends `mail` through the server at `server` (`host:port`). Returns the server's answer to
/// the message (e.g. `250 OK queued as …`).
pub async fn send(server: &str, hostname: &str, mail: &Mail) -> Result<String, Error> {
    for (what, text) in [
        ("sender", &mail.from),
        ("recipient", &mail.to),
        ("subject", &mail.subject),
        ("message id", &mail.message_id),
        ("host name", &hostname.to_string()),
    ] {
        check_header_text(what, text)?;
    }
    if mail.to.contains(['<', '>', ' ']) || mail.from.contains(['<', '>', ' ']) {
        return Err(Error::Invalid(
            "addresses must be bare local@domain addresses".into(),
        ));
    }
    let stream = TcpStream::connect(server)
        .await
        .map_err(|source| Error::Connect {
            server: server.to_string(),
            source,
        })?;
    let mut session = Session {
        stream: BufReader::new(stream),
        extensions: Vec::new(),
    };
    let greeting = session.reply().await?;
    if greeting.code != 220 {
        return Err(Error::Rejected {
            command: "greeting",
            code: greeting.code,
            text: greeting.text(),
        });
    }
    match session
        .command("EHLO", &format!("EHLO {hostname}"), &[250])
        .await
    {
        Ok(reply) => {
            session.extensions = reply
                .lines
                .iter()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_ascii_uppercase)
                .collect();
        }
        Err(Error::Rejected { code, .. }) if (500..600).contains(&code) => {
            session
                .command("HELO", &format!("HELO {hostname}"), &[250])
                .await?;
        }
        Err(other) => return Err(other),
    }
    session
        .command("MAIL FROM", &format!("MAIL FROM:<{}>", mail.from), &[250])
        .await?;
    session
        .command("RCPT TO", &format!("RCPT TO:<{}>", mail.to), &[250, 251])
        .await?;
    session.command("DATA", "DATA", &[354]).await?;
    session
        .stream
        .get_mut()
        .write_all(message_data(mail).as_bytes())
        .await?;
    let accepted = session.reply().await?;
    if accepted.code != 250 {
        return Err(Error::Rejected {
            command: "message",
            code: accepted.code,
            text: accepted.text(),
        });
    }
    // The message is accepted; a failed QUIT changes nothing.
    let _ = session.command("QUIT", "QUIT", &[221]).await;
    Ok(format!("{} {}", accepted.code, accepted.text()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc2822() {
        assert_eq!(rfc2822_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc2822_date(1_767_225_600_000 + 3_723_000),
            "Thu, 01 Jan 2026 01:02:03 +0000"
        );
        assert_eq!(
            rfc2822_date(951_782_400_000),
            "Tue, 29 Feb 2000 00:00:00 +0000"
        );
    }

    #[test]
    fn data_is_dot_stuffed_and_crlf() {
        let mail = Mail {
            from: "cairn@h".into(),
            to: "ops@example.com".into(),
            subject: "VM dé01 done".into(),
            body: "line 1\n.hidden\r\n..two\nend".into(),
            date_ms: 0,
            message_id: "x@h".into(),
        };
        let data = message_data(&mail);
        assert!(data.contains("Subject: VM d?01 done\r\n"), "{data}");
        assert!(
            data.ends_with("\r\n\r\nline 1\r\n..hidden\r\n...two\r\nend\r\n.\r\n"),
            "{data:?}"
        );
        assert!(!data.replace("\r\n", "").contains('\n'));
    }

    #[test]
    fn reply_codes_are_checked() {
        assert_eq!(parse_code("250 OK").unwrap(), 250);
        assert_eq!(parse_code("250-PIPELINING").unwrap(), 250);
        assert_eq!(parse_code("354").unwrap(), 354);
        for bad in ["", "25", "abc ok", "2500 x", "250x"] {
            assert!(parse_code(bad).is_err(), "{bad:?}");
        }
    }
}
