//! Our QMP client: the JSON line protocol that QEMU and `qemu-storage-daemon` speak on their
//! monitor socket, and the same framing for the QEMU guest agent (QGA).
//!
//! Owns: the connection (a Unix socket), the greeting and `qmp_capabilities` negotiation,
//! commands with unique ids, skipping and collecting asynchronous events, timeouts, and the
//! validation of every message: a reply must be one JSON object of bounded size with either a
//! `return` or an `error` with `class` and `desc`, and carry the id of the command it answers.
//! A server that breaks the protocol yields an [`Error`], never a panic or a hang; after a
//! protocol or I/O error the connection is marked broken and refuses further commands.
//!
//! Must not: know what commands mean (the `qemu` adapter in [`crate::agent`] builds them), or
//! start or stop QEMU.
//!
//! It is async (tokio); synchronous callers run it on a current-thread runtime.

#[cfg(test)]
pub(crate) mod tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest accepted message line. `query-qmp-schema` answers about 200 KiB; anything far above
/// that is a broken or hostile server.
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;
/// Most events kept between two calls of [`Qmp::take_events`]; older ones are dropped.
pub const MAX_EVENTS: usize = 1024;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be opened, read or written.
    #[error("QMP socket {path}: {doing}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What we were doing.
        doing: &'static str,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("QMP socket {path}: no answer within {timeout:?} while {doing}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// What we waited for.
        doing: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The server closed the connection.
    #[error("QMP socket {path}: the server closed the connection while {doing}")]
    Closed {
        /// The socket.
        path: PathBuf,
        /// What we waited for.
        doing: String,
    },
    /// The server sent something that is not QMP.
    #[error("QMP socket {path}: protocol violation: {reason}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// QEMU refused a command: its error class (`GenericError`, `DeviceNotFound`, …) and
    /// description.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// An earlier error left the connection unusable.
    #[error("QMP socket {path}: the connection is unusable after an earlier error")]
    Broken {
        /// The socket.
        path: PathBuf,
    },
}

impl Error {
    /// QEMU's error class when QEMU refused the command.
    pub fn class(&self) -> Option<&str> {
        match self {
            Error::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// Which protocol variant the socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    /// QEMU monitor: greeting, capabilities negotiation, ids echoed, events.
    Monitor,
    /// Guest agent: no greeting; a `guest-sync` with a random id resynchronises the stream.
    GuestAgent,
}

/// A connection to a QMP monitor or a QEMU guest agent.
#[derive(Debug)]
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
    next_id: u64,
    flavour: Flavour,
    events: Vec<Value>,
    broken: bool,
    /// QEMU's version from the greeting (`major`, `minor`, `micro`); zeros for a guest agent.
    pub version: (u64, u64, u64),
}

impl Qmp {
    /// Connects to a QMP monitor socket, reads the greeting and leaves capabilities negotiation
    /// mode. `timeout` bounds every single wait.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, Error> {
        let mut qmp = Qmp::open(path, timeout, Flavour::Monitor).await?;
        let greeting = qmp.read_message("reading the greeting").await?;
        let version = greeting
            .get("QMP")
            .and_then(|q| q.get("version"))
            .and_then(|v| v.get("qemu"))
            .ok_or_else(|| {
                qmp.protocol(format!("the greeting is not QMP's: {}", clip(&greeting)))
            })?;
        let number = |key: &str| version.get(key).and_then(Value::as_u64).unwrap_or(0);
        qmp.version = (number("major"), number("minor"), number("micro"));
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Connects to a QEMU guest agent socket and synchronises the stream with `guest-sync`.
    pub async fn connect_guest_agent(path: &Path, timeout: Duration) -> Result<Qmp, Error> {
        let mut qga = Qmp::open(path, timeout, Flavour::GuestAgent).await?;
        let token = u64::from(std::process::id()) << 20 | u64::from(rand_u16());
        let answer = qga
            .execute("guest-sync", Some(json!({ "id": token })))
            .await?;
        if answer.as_u64() != Some(token) {
            return Err(qga.protocol(format!(
                "guest-sync answered {} instead of {token}",
                clip(&answer)
            )));
        }
        Ok(qga)
    }

    async fn open(path: &Path, timeout: Duration, flavour: Flavour) -> Result<Qmp, Error> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| Error::Timeout {
                path: path.to_path_buf(),
                doing: "connecting".into(),
                timeout,
            })?
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                doing: "connecting",
                source,
            })?;
        let (read, write) = stream.into_split();
        Ok(Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(read),
            writer: write,
            timeout,
            next_id: 1,
            flavour,
            events: Vec::new(),
            broken: false,
            version: (0, 0, 0),
        })
    }

    /// Runs `command` with `arguments` (an object, or `None`) and returns its `return` value.
    /// Events that arrive meanwhile are kept for [`Qmp::take_events`].
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, Error> {
        if self.broken {
            return Err(Error::Broken {
                path: self.path.clone(),
            });
        }
        if let Some(args) = &arguments
            && !args.is_object()
        {
            return Err(Error::Protocol {
                path: self.path.clone(),
                reason: format!("arguments of {command} must be an object"),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut request = Map::new();
        request.insert("execute".into(), Value::String(command.into()));
        if let Some(args) = arguments {
            request.insert("arguments".into(), args);
        }
        if self.flavour == Flavour::Monitor {
            request.insert("id".into(), json!(id));
        }
        let mut line = serde_json::to_vec(&Value::Object(request)).expect("JSON serialises");
        line.push(b'\n');
        tracing::debug!(socket = %self.path.display(), command, "QMP command");
        let write = tokio::time::timeout(self.timeout, self.writer.write_all(&line)).await;
        match write {
            Err(_) => {
                self.broken = true;
                return Err(Error::Timeout {
                    path: self.path.clone(),
                    doing: format!("sending {command}"),
                    timeout: self.timeout,
                });
            }
            Ok(Err(source)) => {
                self.broken = true;
                return Err(Error::Io {
                    path: self.path.clone(),
                    doing: "sending a command",
                    source,
                });
            }
            Ok(Ok(())) => {}
        }
        let doing = format!("waiting for the answer to {command}");
        loop {
            let message = self.read_message(&doing).await?;
            if message.get("event").is_some() {
                if self.events.len() >= MAX_EVENTS {
                    self.events.remove(0);
                }
                self.events.push(message);
                continue;
            }
            if self.flavour == Flavour::Monitor {
                match message.get("id") {
                    Some(got) if got.as_u64() == Some(id) => {}
                    other => {
                        return Err(self.protocol(format!(
                            "answer to {command} carries id {} instead of {id}",
                            other.map_or_else(|| "none".into(), clip)
                        )));
                    }
                }
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let class = error.get("class").and_then(Value::as_str);
                let desc = error.get("desc").and_then(Value::as_str);
                let (Some(class), Some(desc)) = (class, desc) else {
                    return Err(self.protocol(format!(
                        "error answer to {command} lacks class or desc: {}",
                        clip(error)
                    )));
                };
                return Err(Error::Command {
                    command: command.into(),
                    class: class.into(),
                    desc: desc.into(),
                });
            }
            return Err(self.protocol(format!(
                "answer to {command} has neither return nor error: {}",
                clip(&message)
            )));
        }
    }

    /// The events received so far (oldest first), removing them.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Reads one message: a line holding one JSON object.
    async fn read_message(&mut self, doing: &str) -> Result<Value, Error> {
        let mut line = Vec::new();
        let read = tokio::time::timeout(self.timeout, read_line(&mut self.reader, &mut line)).await;
        let result = match read {
            Err(_) => Err(Error::Timeout {
                path: self.path.clone(),
                doing: doing.into(),
                timeout: self.timeout,
            }),
            Ok(Err(LineError::Io(source))) => Err(Error::Io {
                path: self.path.clone(),
                doing: "reading",
                source,
            }),
            Ok(Err(LineError::TooLong)) => Err(Error::Protocol {
                path: self.path.clone(),
                reason: format!("a message is longer than {MAX_LINE_BYTES} bytes"),
            }),
            Ok(Err(LineError::Eof)) => Err(Error::Closed {
                path: self.path.clone(),
                doing: doing.into(),
            }),
            Ok(Ok(())) => match serde_json::from_slice::<Value>(&line) {
                Ok(value) if value.is_object() => return Ok(value),
                Ok(value) => Err(Error::Protocol {
                    path: self.path.clone(),
                    reason: format!("a message is not a JSON object: {}", clip(&value)),
                }),
                Err(e) => Err(Error::Protocol {
                    path: self.path.clone(),
                    reason: format!("a message is not JSON: {e}"),
                }),
            },
        };
        self.broken = true;
        result
    }

    fn protocol(&mut self, reason: String) -> Error {
        self.broken = true;
        Error::Protocol {
            path: self.path.clone(),
            reason,
        }
    }
}

enum LineError {
    Io(std::io::Error),
    TooLong,
    Eof,
}

/// Reads up to and excluding `\n`, refusing lines over [`MAX_LINE_BYTES`]. Blank lines are
/// skipped (QGA may send a 0xFF sync byte line after `guest-sync-delimited`; we use plain
/// `guest-sync`, so only whitespace is tolerated).
async fn read_line(
    reader: &mut BufReader<OwnedReadHalf>,
    line: &mut Vec<u8>,
) -> Result<(), LineError> {
    loop {
        line.clear();
        loop {
            let available = reader.fill_buf().await.map_err(LineError::Io)?;
            if available.is_empty() {
                return Err(LineError::Eof);
            }
            let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..i], Some(i + 1)),
                None => (available, None),
            };
            if line.len() + chunk.len() > MAX_LINE_BYTES {
                return Err(LineError::TooLong);
            }
            line.extend_from_slice(chunk);
            let consumed = done.unwrap_or(chunk.len());
            reader.consume(consumed);
            if done.is_some() {
                break;
            }
        }
        if line.iter().any(|b| !b.is_ascii_whitespace()) {
            return Ok(());
        }
    }
}

/// A value for messages: at most 300 characters of its JSON.
fn clip(value: &Value) -> String {
    let text = value.to_string();
    if text.len() <= 300 {
        text
    } else {
        let mut end = 300;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &text[..end])
    }
}

fn rand_u16() -> u16 {
    let mut bytes = [0u8; 2];
    // A fixed token still works; randomness only guards against a stale answer matching.
    let _ = getrandom::getrandom(&mut bytes);
    u16::from_le_bytes(bytes)
}
