//! Our NBD client: synchronous, over a Unix or TCP socket, speaking the fixed-newstyle handshake
//! with structured replies and metadata contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`).
//!
//! Owns: the protocol (handshake, requests, reply parsing and validation) and the connection's
//! life (timeouts, `NBD_CMD_DISC` on drop). Every message from the server is checked — magic,
//! cookie, lengths, offsets inside the request, block status descriptors — so a broken or hostile
//! server yields an [`Error`], never a panic, an out-of-bounds write or a hang (socket timeouts).
//! After a protocol or I/O error the connection is marked broken and refuses further requests.
//!
//! Must not: start servers (see `crate::source::qemu_nbd`), know image formats, or interpret
//! metadata flags beyond the `base:allocation` constants below.
//!
//! Not implemented: TLS, 64-bit extended headers (never requested), `NBD_OPT_LIST`.
//!
//! - [`proto`]: wire constants and pure encoders/decoders.
//! - `handshake`: option negotiation up to the transmission phase.
//! - `wire`: the socket, its timeouts and the mapping of socket errors.
//! - `client`: [`Client`], the transmission phase.

mod client;
mod handshake;
pub mod proto;
pub mod server;
#[cfg(test)]
mod server_tests;
#[cfg(test)]
mod tests;
mod wire;

use std::time::Duration;

pub use client::Client;

/// The metadata context that tells allocated data from holes and zeros.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is not allocated (it may still not read as zeros).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME` flag: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The context name qemu uses to expose the dirty bitmap `bitmap`.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Export to select with `NBD_OPT_GO` (empty = the server's default export).
    pub export_name: String,
    /// Metadata contexts to select; every one must be granted or connecting fails.
    pub meta_contexts: Vec<String>,
    /// Longest wait for any single read from or write to the socket.
    pub timeout: Duration,
    /// Requests kept in flight by one `read_at`/`write_at`/`write_zeroes` call.
    pub pipeline_depth: usize,
    /// Payload of one read or write request: larger calls are split into requests of this size
    /// (capped by the server's maximum payload and 32 MiB) and pipelined.
    pub request_size: u32,
}

impl ConnectOptions {
    pub fn new(export_name: impl Into<String>) -> Self {
        ConnectOptions {
            export_name: export_name.into(),
            meta_contexts: Vec::new(),
            timeout: Duration::from_secs(60),
            pipeline_depth: 4,
            request_size: 1 << 20,
        }
    }

    pub fn with_meta_contexts(mut self, contexts: impl IntoIterator<Item = String>) -> Self {
        self.meta_contexts = contexts.into_iter().collect();
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// What the server told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`proto::TFLAG_*`).
    pub flags: u16,
    /// Requests must be aligned to this (1 when the server did not say).
    pub min_block: u32,
    pub preferred_block: u32,
    /// Largest read or write payload the server accepts (32 MiB when the server did not say).
    pub max_payload: u32,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.flags & proto::TFLAG_READ_ONLY != 0
    }

    pub fn can_flush(&self) -> bool {
        self.flags & proto::TFLAG_SEND_FLUSH != 0
    }

    pub fn can_write_zeroes(&self) -> bool {
        self.flags & proto::TFLAG_SEND_WRITE_ZEROES != 0
    }
}

/// A metadata context the server granted, with the id it uses in block status replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

/// One extent of a block status answer: `flags` as defined by the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub offset: u64,
    pub len: u64,
    pub flags: u32,
}

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NBD connection failed while {doing}: {source}")]
    Io {
        doing: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD server did not answer within {timeout:?} while {doing}")]
    Timeout {
        doing: &'static str,
        timeout: Duration,
    },
    #[error("NBD server closed the connection while {doing}")]
    Closed { doing: &'static str },
    #[error("NBD server broke the protocol: {0}")]
    Protocol(String),
    #[error("NBD server does not support {0}")]
    Unsupported(&'static str),
    #[error("NBD server refused {option}: {reason}{}", fmt_message(.message))]
    Refused {
        option: &'static str,
        reason: &'static str,
        message: String,
    },
    #[error("NBD server did not grant meta context {0:?}")]
    ContextNotGranted(String),
    #[error(
        "NBD {command} of {len} bytes at offset {offset} failed: {}{}",
        proto::errno_name(*.errno),
        fmt_message(.message)
    )]
    Command {
        command: &'static str,
        offset: u64,
        len: u64,
        errno: u32,
        message: String,
    },
    #[error("NBD request of {len} bytes at offset {offset} is outside the export of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error(
        "NBD request of {len} bytes at offset {offset} is not aligned to the server's minimum \
         block size {min_block}"
    )]
    Unaligned {
        offset: u64,
        len: u64,
        min_block: u32,
    },
    #[error("the NBD export is read-only")]
    ReadOnly,
    #[error("meta context {0:?} was not selected on this connection")]
    NoSuchContext(String),
    #[error("invalid NBD client option: {0}")]
    InvalidOption(String),
    #[error("the NBD connection is unusable after an earlier error")]
    Broken,
}

fn fmt_message(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(" ({message})")
    }
}
