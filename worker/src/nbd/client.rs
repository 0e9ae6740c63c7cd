//! The transmission phase: [`Client`] sends requests, reads and validates replies.
//!
//! Large reads, writes and write-zeroes are split into requests of at most the server's maximum
//! payload and kept a few deep in flight (`ConnectOptions::pipeline_depth`), which is what makes a
//! single synchronous connection fast. Each call drains everything it sent before returning, so
//! between calls nothing is in flight. Replies are matched to requests by cookie; structured read
//! chunks are written straight into the caller's buffer after checking that they lie inside their
//! request, and on the final chunk the content chunks must tile the request exactly.

use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::handshake;
use super::proto::{self, ReplyStart};
use super::wire::{Conn, Wire};
use super::{ConnectOptions, Error, ExportInfo, MetaContext, StatusExtent};

/// Payload cap per request even when the server allows more: bounds memory per chunk and keeps
/// one request's latency short.
const MAX_REQUEST: u64 = 32 << 20;
/// Effect length of one write-zeroes request (no payload travels).
const MAX_ZEROES_REQUEST: u64 = 1 << 30;
/// Range of one block status request; the server may answer for less.
const MAX_STATUS_REQUEST: u64 = 1 << 31;
/// Largest error chunk: error, message length, a 4096-byte message, an offset.
const MAX_ERROR_CHUNK: u32 = 6 + proto::MAX_STRING as u32 + 8;

/// A connection to one NBD export in the transmission phase. Not thread-safe by design: one
/// owner issues requests one call at a time.
pub struct Client {
    wire: Wire,
    info: ExportInfo,
    structured: bool,
    contexts: Vec<MetaContext>,
    next_cookie: u64,
    /// Set on any I/O or protocol error: the stream may be out of sync, so no more requests.
    broken: bool,
    /// Set once `NBD_CMD_DISC` was sent; Drop then only closes the socket.
    disconnected: bool,
    depth: usize,
    /// Payload of one read/write request: min(options, server max, 32 MiB), aligned.
    piece: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.info)
            .field("structured", &self.structured)
            .field("contexts", &self.contexts)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// One request in flight and what its replies said so far.
struct Pending {
    cookie: u64,
    command: u16,
    offset: u64,
    len: u64,
    /// Reads: index in the caller's buffer of byte `offset`.
    buf_start: usize,
    /// Reads: `(start, end)` of every content chunk received, and their total length.
    content: Vec<(u64, u64)>,
    covered: u64,
    /// Block status: `(context id, descriptors)` per chunk.
    status: Vec<(u32, Vec<(u64, u32)>)>,
    /// The first error the server reported for this request.
    error: Option<Error>,
}

impl Pending {
    fn new(cookie: u64, command: u16, offset: u64, len: u64, buf_start: usize) -> Pending {
        Pending {
            cookie,
            command,
            offset,
            len,
            buf_start,
            content: Vec::new(),
            covered: 0,
            status: Vec::new(),
            error: None,
        }
    }

    fn set_error(&mut self, errno: u32, message: String) {
        if self.error.is_none() {
            self.error = Some(Error::Command {
                command: proto::command_name(self.command),
                offset: self.offset,
                len: self.len,
                errno,
                message,
            });
        }
    }

    /// Checks that `[start, start + len)` lies inside the request.
    fn check_inside(&self, start: u64, len: u64, what: &str) -> Result<(), Error> {
        let end = start.checked_add(len);
        match end {
            Some(end) if start >= self.offset && end <= self.offset + self.len => Ok(()),
            _ => Err(Error::Protocol(format!(
                "{what} [{start}, +{len}) lies outside its request [{}, +{})",
                self.offset, self.len
            ))),
        }
    }

    /// Records a content chunk. More bytes than requested means chunks overlap; catching that
    /// here also bounds `content` against a server that never sends the final chunk.
    fn add_content(&mut self, start: u64, len: u64) -> Result<(), Error> {
        self.covered += len;
        if self.covered > self.len {
            return Err(Error::Protocol(format!(
                "read reply for [{}, +{}) has overlapping chunks ({} bytes)",
                self.offset, self.len, self.covered
            )));
        }
        self.content.push((start, start + len));
        Ok(())
    }

    /// On the final chunk of a successful read: the content chunks must cover the request
    /// exactly once.
    fn check_read_complete(&mut self) -> Result<(), Error> {
        if self.command != proto::CMD_READ || self.error.is_some() {
            return Ok(());
        }
        self.content.sort_unstable();
        let mut pos = self.offset;
        for &(start, end) in &self.content {
            if start != pos {
                return Err(Error::Protocol(format!(
                    "read reply for [{}, +{}) {} at offset {pos}",
                    self.offset,
                    self.len,
                    if start < pos {
                        "has overlapping chunks"
                    } else {
                        "has a gap"
                    }
                )));
            }
            pos = end;
        }
        if pos != self.offset + self.len {
            return Err(Error::Protocol(format!(
                "read reply for [{}, +{}) ended after {} bytes",
                self.offset,
                self.len,
                pos - self.offset
            )));
        }
        Ok(())
    }
}

/// What a pipelined transfer carries.
enum Payload<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
    None,
}

impl Client {
    /// Connects to a Unix socket and negotiates.
    pub fn connect_unix(path: &Path, opts: &ConnectOptions) -> Result<Client, Error> {
        let stream = UnixStream::connect(path).map_err(|source| Error::Io {
            doing: "connecting to the Unix socket",
            source,
        })?;
        Client::from_unix_stream(stream, opts)
    }

    /// Connects over TCP (first address that answers) and negotiates.
    pub fn connect_tcp(addr: impl ToSocketAddrs, opts: &ConnectOptions) -> Result<Client, Error> {
        let mut last = None;
        let addrs = addr.to_socket_addrs().map_err(|source| Error::Io {
            doing: "resolving the server address",
            source,
        })?;
        for a in addrs {
            match TcpStream::connect_timeout(&a, opts.timeout) {
                Ok(stream) => return Client::from_conn(Box::new(stream), opts),
                Err(e) => last = Some(e),
            }
        }
        Err(Error::Io {
            doing: "connecting over TCP",
            source: last.unwrap_or_else(|| std::io::Error::other("no address to connect to")),
        })
    }

    /// Negotiates over an already connected Unix socket.
    pub fn from_unix_stream(stream: UnixStream, opts: &ConnectOptions) -> Result<Client, Error> {
        Client::from_conn(Box::new(stream), opts)
    }

    fn from_conn(conn: Box<dyn Conn>, opts: &ConnectOptions) -> Result<Client, Error> {
        let mut wire = Wire::new(conn, opts.timeout)?;
        let negotiated = match handshake::negotiate(&mut wire, opts) {
            Ok(n) => n,
            Err(e) => {
                // A refusal leaves the stream in sync: end it politely (soft disconnect).
                if matches!(e, Error::Refused { .. } | Error::ContextNotGranted(_)) {
                    let _ = wire.write_all(
                        &proto::encode_option(proto::OPT_ABORT, &[]),
                        "sending NBD_OPT_ABORT",
                    );
                }
                wire.shutdown();
                return Err(e);
            }
        };
        let info = negotiated.info;
        let min = u64::from(info.min_block);
        let cap = u64::from(info.max_payload)
            .min(MAX_REQUEST)
            .min(u64::from(opts.request_size));
        let piece = (cap / min * min).max(min);
        Ok(Client {
            wire,
            info,
            structured: negotiated.structured,
            contexts: negotiated.contexts,
            next_cookie: 1,
            broken: false,
            disconnected: false,
            depth: opts.pipeline_depth,
            piece,
        })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Whether structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// The metadata contexts the server granted.
    pub fn meta_contexts(&self) -> &[MetaContext] {
        &self.contexts
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let len = buf.len() as u64;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.transfer(proto::CMD_READ, offset, len, self.piece, Payload::Read(buf))
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let len = data.len() as u64;
        self.check_request(offset, len)?;
        if self.info.read_only() {
            return Err(Error::ReadOnly);
        }
        if len == 0 {
            return Ok(());
        }
        self.transfer(
            proto::CMD_WRITE,
            offset,
            len,
            self.piece,
            Payload::Write(data),
        )
    }

    /// Makes `[offset, offset + len)` read as zeros, letting the server deallocate (no
    /// `NO_HOLE`, no `FAST_ZERO`). Falls back to writing zeros when the server lacks
    /// `NBD_CMD_WRITE_ZEROES` or answers it with ENOTSUP/EOVERFLOW.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        self.check_request(offset, len)?;
        if self.info.read_only() {
            return Err(Error::ReadOnly);
        }
        if len == 0 {
            return Ok(());
        }
        if self.info.can_write_zeroes() {
            let min = u64::from(self.info.min_block);
            let piece = MAX_ZEROES_REQUEST / min * min;
            match self.transfer(proto::CMD_WRITE_ZEROES, offset, len, piece, Payload::None) {
                Ok(()) => return Ok(()),
                Err(Error::Command {
                    errno: proto::ENOTSUP | proto::EOVERFLOW,
                    ..
                }) => {
                    tracing::debug!("NBD write-zeroes refused; writing zeros instead");
                }
                Err(e) => return Err(e),
            }
        }
        let zeros = vec![0u8; len.min(self.piece * self.depth as u64) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64);
            self.write_at(pos, &zeros[..n as usize])?;
            pos += n;
        }
        Ok(())
    }

    /// Makes every completed write durable. A no-op if the server does not offer flush.
    pub fn flush(&mut self) -> Result<(), Error> {
        self.usable()?;
        if !self.info.can_flush() {
            return Ok(());
        }
        let pending = self.single(proto::CMD_FLUSH, 0, 0)?;
        pending.error.map_or(Ok(()), Err)
    }

    /// The extents of `[offset, offset + len)` in metadata context `context`, in order, covering
    /// the range exactly, with adjacent extents of equal flags merged. Issues as many requests as
    /// the server needs.
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<StatusExtent>, Error> {
        self.usable()?;
        let context_id = self
            .contexts
            .iter()
            .find(|c| c.name == context)
            .map(|c| c.id)
            .ok_or_else(|| Error::NoSuchContext(context.to_string()))?;
        self.check_request(offset, len)?;
        let end = offset + len;
        let mut out: Vec<StatusExtent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let request = (end - pos).min(MAX_STATUS_REQUEST);
            let pending = self.single(proto::CMD_BLOCK_STATUS, pos, request)?;
            if let Some(e) = pending.error {
                return Err(e);
            }
            let Some((_, descriptors)) =
                pending.status.into_iter().find(|(id, _)| *id == context_id)
            else {
                self.broken = true;
                return Err(Error::Protocol(format!(
                    "block status reply for [{pos}, +{request}) has no chunk for {context}"
                )));
            };
            for (dlen, flags) in descriptors {
                match out.last_mut() {
                    Some(last) if last.flags == flags => last.len += dlen,
                    _ => out.push(StatusExtent {
                        offset: pos,
                        len: dlen,
                        flags,
                    }),
                }
                pos += dlen;
            }
        }
        Ok(out)
    }

    /// Sends `NBD_CMD_DISC` and closes the connection. Dropping the client does the same but
    /// cannot report errors.
    pub fn disconnect(mut self) -> Result<(), Error> {
        self.usable()?;
        self.disconnected = true;
        let header = proto::encode_request(0, proto::CMD_DISC, 0, 0, 0);
        let r = self.wire.write_all(&header, "sending NBD_CMD_DISC");
        self.wire.shutdown();
        r
    }

    fn usable(&self) -> Result<(), Error> {
        if self.broken || self.disconnected {
            Err(Error::Broken)
        } else {
            Ok(())
        }
    }

    /// Bounds and alignment of a request against the export.
    fn check_request(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.usable()?;
        let size = self.info.size;
        match offset.checked_add(len) {
            Some(end) if end <= size => {
                let min = u64::from(self.info.min_block);
                if !offset.is_multiple_of(min) || (!len.is_multiple_of(min) && end != size) {
                    return Err(Error::Unaligned {
                        offset,
                        len,
                        min_block: self.info.min_block,
                    });
                }
                Ok(())
            }
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    /// Sends `[offset, offset + len)` as requests of at most `piece` bytes, up to `depth` in
    /// flight, and waits for all of them. The first server-reported error is returned after
    /// everything sent has been answered.
    fn transfer(
        &mut self,
        command: u16,
        offset: u64,
        len: u64,
        piece: u64,
        mut payload: Payload<'_>,
    ) -> Result<(), Error> {
        let mut pending: Vec<Pending> = Vec::with_capacity(self.depth);
        let mut sent = 0u64;
        let mut failure: Option<Error> = None;
        loop {
            while failure.is_none() && sent < len && pending.len() < self.depth {
                let n = piece.min(len - sent);
                let data: &[u8] = match &payload {
                    Payload::Write(d) => &d[sent as usize..(sent + n) as usize],
                    _ => &[],
                };
                let cookie = self.send(command, offset + sent, n, data)?;
                pending.push(Pending::new(
                    cookie,
                    command,
                    offset + sent,
                    n,
                    sent as usize,
                ));
                sent += n;
            }
            if pending.is_empty() {
                break;
            }
            let buf: &mut [u8] = match &mut payload {
                Payload::Read(b) => b,
                _ => &mut [],
            };
            if let Some(i) = self.receive(&mut pending, buf)? {
                let done = pending.swap_remove(i);
                if let Some(e) = done.error {
                    failure.get_or_insert(e);
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// One request without payload, waited for.
    fn single(&mut self, command: u16, offset: u64, len: u64) -> Result<Pending, Error> {
        let cookie = self.send(command, offset, len, &[])?;
        let mut pending = vec![Pending::new(cookie, command, offset, len, 0)];
        while self.receive(&mut pending, &mut [])?.is_none() {}
        Ok(pending.remove(0))
    }

    fn send(&mut self, command: u16, offset: u64, len: u64, data: &[u8]) -> Result<u64, Error> {
        self.usable()?;
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let len32 = u32::try_from(len).map_err(|_| {
            Error::InvalidOption(format!("request length {len} does not fit in 32 bits"))
        })?;
        let header = proto::encode_request(0, command, cookie, offset, len32);
        let mut r = self.wire.write_all(&header, "sending a request");
        if r.is_ok() && !data.is_empty() {
            r = self.wire.write_all(data, "sending write data");
        }
        if r.is_err() {
            self.broken = true;
        }
        r.map(|()| cookie)
    }

    /// Reads one reply message (simple reply or one structured chunk) and applies it to its
    /// pending request. Returns the index of the request if this message completed it.
    fn receive(&mut self, pending: &mut [Pending], buf: &mut [u8]) -> Result<Option<usize>, Error> {
        let r = self.receive_message(pending, buf);
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    fn receive_message(
        &mut self,
        pending: &mut [Pending],
        buf: &mut [u8],
    ) -> Result<Option<usize>, Error> {
        let mut start = [0u8; 16];
        self.wire.read_exact(&mut start, "waiting for a reply")?;
        match proto::parse_reply_start(&start).map_err(Error::Protocol)? {
            ReplyStart::Simple { error, cookie } => {
                let i = find(pending, cookie)?;
                let p = &mut pending[i];
                match p.command {
                    proto::CMD_READ if self.structured => {
                        return Err(Error::Protocol(
                            "simple reply to a read although structured replies were negotiated"
                                .to_string(),
                        ));
                    }
                    proto::CMD_READ if error == 0 => {
                        let range = p.buf_start..p.buf_start + p.len as usize;
                        self.wire.read_exact(&mut buf[range], "reading read data")?;
                        p.content.push((p.offset, p.offset + p.len));
                    }
                    proto::CMD_BLOCK_STATUS if error == 0 => {
                        return Err(Error::Protocol(
                            "simple success reply to a block status request".to_string(),
                        ));
                    }
                    _ => {}
                }
                if error != 0 {
                    p.set_error(error, String::new());
                }
                Ok(Some(i))
            }
            ReplyStart::Structured {
                flags,
                reply_type,
                cookie,
            } => {
                let mut len_bytes = [0u8; 4];
                self.wire
                    .read_exact(&mut len_bytes, "reading a reply chunk header")?;
                let len = u32::from_be_bytes(len_bytes);
                if !self.structured {
                    return Err(Error::Protocol(
                        "structured reply although structured replies were not negotiated"
                            .to_string(),
                    ));
                }
                let i = find(pending, cookie)?;
                self.receive_chunk(&mut pending[i], reply_type, len, buf)?;
                if flags & proto::REPLY_FLAG_DONE != 0 {
                    pending[i].check_read_complete()?;
                    return Ok(Some(i));
                }
                if reply_type == proto::REPLY_TYPE_NONE {
                    return Err(Error::Protocol(
                        "NBD_REPLY_TYPE_NONE without the DONE flag".into(),
                    ));
                }
                Ok(None)
            }
        }
    }

    /// The payload of one structured chunk of `len` bytes.
    fn receive_chunk(
        &mut self,
        p: &mut Pending,
        reply_type: u16,
        len: u32,
        buf: &mut [u8],
    ) -> Result<(), Error> {
        let wrong_command = |what: &str| {
            Error::Protocol(format!(
                "{what} chunk in the reply to a {} request",
                proto::command_name(p.command)
            ))
        };
        match reply_type {
            proto::REPLY_TYPE_NONE => {
                if len != 0 {
                    return Err(Error::Protocol(format!(
                        "NBD_REPLY_TYPE_NONE with {len} bytes"
                    )));
                }
            }
            proto::REPLY_TYPE_OFFSET_DATA => {
                if p.command != proto::CMD_READ {
                    return Err(wrong_command("data"));
                }
                if len < 9 {
                    return Err(Error::Protocol(format!("data chunk of {len} bytes")));
                }
                let mut off = [0u8; 8];
                self.wire.read_exact(&mut off, "reading a data chunk")?;
                let start = u64::from_be_bytes(off);
                let data_len = u64::from(len - 8);
                p.check_inside(start, data_len, "data chunk")?;
                let at = p.buf_start + (start - p.offset) as usize;
                self.wire
                    .read_exact(&mut buf[at..at + data_len as usize], "reading read data")?;
                p.add_content(start, data_len)?;
            }
            proto::REPLY_TYPE_OFFSET_HOLE => {
                if p.command != proto::CMD_READ {
                    return Err(wrong_command("hole"));
                }
                if len != 12 {
                    return Err(Error::Protocol(format!(
                        "hole chunk of {len} bytes, not 12"
                    )));
                }
                let mut b = [0u8; 12];
                self.wire.read_exact(&mut b, "reading a hole chunk")?;
                let start = proto::be_u64(&b[0..8]);
                let hole_len = u64::from(proto::be_u32(&b[8..12]));
                if hole_len == 0 {
                    return Err(Error::Protocol("hole chunk of length 0".to_string()));
                }
                p.check_inside(start, hole_len, "hole chunk")?;
                let at = p.buf_start + (start - p.offset) as usize;
                buf[at..at + hole_len as usize].fill(0);
                p.add_content(start, hole_len)?;
            }
            proto::REPLY_TYPE_BLOCK_STATUS => {
                if p.command != proto::CMD_BLOCK_STATUS {
                    return Err(wrong_command("block status"));
                }
                if len > proto::MAX_BLOCK_STATUS_CHUNK {
                    return Err(Error::Protocol(format!(
                        "block status chunk of {len} bytes"
                    )));
                }
                let mut payload = vec![0u8; len as usize];
                self.wire
                    .read_exact(&mut payload, "reading a block status chunk")?;
                let (id, descriptors) =
                    proto::parse_block_status(&payload, p.len).map_err(Error::Protocol)?;
                if !self.contexts.iter().any(|c| c.id == id) {
                    return Err(Error::Protocol(format!(
                        "block status for context id {id}, which was not negotiated"
                    )));
                }
                if p.status.iter().any(|(seen, _)| *seen == id) {
                    return Err(Error::Protocol(format!(
                        "two block status chunks for context id {id}"
                    )));
                }
                p.status.push((id, descriptors));
            }
            t if t & proto::REPLY_TYPE_ERROR_BIT != 0 => {
                if !(6..=MAX_ERROR_CHUNK).contains(&len) {
                    return Err(Error::Protocol(format!("error chunk of {len} bytes")));
                }
                let mut payload = vec![0u8; len as usize];
                self.wire
                    .read_exact(&mut payload, "reading an error chunk")?;
                let chunk = proto::parse_error_chunk(t, &payload).map_err(Error::Protocol)?;
                if let Some(at) = chunk.offset {
                    p.check_inside(at, 1, "error offset")?;
                }
                p.set_error(chunk.errno, chunk.message);
            }
            t => return Err(Error::Protocol(format!("unknown reply chunk type {t}"))),
        }
        Ok(())
    }
}

fn find(pending: &[Pending], cookie: u64) -> Result<usize, Error> {
    pending
        .iter()
        .position(|p| p.cookie == cookie)
        .ok_or_else(|| {
            Error::Protocol(format!(
                "reply for cookie {cookie:#x}, which matches no request in flight"
            ))
        })
}

impl Drop for Client {
    fn drop(&mut self) {
        if !self.broken && !self.disconnected {
            let header = proto::encode_request(0, proto::CMD_DISC, 0, 0, 0);
            let _ = self.wire.write_all(&header, "sending NBD_CMD_DISC");
        }
        self.wire.shutdown();
    }
}
