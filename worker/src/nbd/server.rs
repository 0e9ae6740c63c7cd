//! A small read-only NBD server: serves one [`DiskView`] (e.g. a recovery point opened from the
//! repository) to any number of clients over a Unix or TCP socket, one thread per connection.
//!
//! Speaks the fixed-newstyle handshake (`NBD_OPT_EXPORT_NAME`, `GO`, `INFO`, `LIST`, `ABORT`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT`/`SET_META_CONTEXT` with `base:allocation`), and in
//! transmission `NBD_CMD_READ`, `FLUSH` (a no-op), `BLOCK_STATUS` and `DISC`; writes, trims
//! and write-zeroes are refused with `EPERM`. Every client message is validated (magic, lengths,
//! offsets inside the export, request size); a client that breaks the protocol is disconnected
//! and the server keeps serving the others.
//!
//! Must not: write to the view, or hold state shared between connections beyond the view.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::proto::*;
use crate::repo::image::DiskView;

const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_LIST_META_CONTEXT: u32 = 9;
const REP_SERVER: u32 = 2;
const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT | 9;
const INFO_NAME: u16 = 1;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
const CMD_TRIM: u16 = 4;
const EPERM: u32 = 1;
const EIO: u32 = 5;
/// Largest read we serve (and write payload we swallow before refusing it).
const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Options a client may send before it must pick an export.
const MAX_OPTIONS: usize = 256;
/// Granule of block status answers.
const STATUS_GRANULE: u64 = 64 * 1024;
/// Most descriptors in one block status reply.
const MAX_DESCRIPTORS: usize = 4096;
const BASE_ALLOCATION_ID: u32 = 1;

/// Where the server listens.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// What the server serves and how.
#[derive(Clone)]
pub struct ServerConfig {
    pub view: Arc<dyn DiskView>,
    /// The export's name; clients asking for `""` get it too.
    pub export_name: String,
    /// Connections served at once; more wait in the listen backlog.
    pub max_clients: usize,
    /// A client silent this long (in the handshake or between requests) is disconnected.
    pub idle_timeout: Duration,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("export_name", &self.export_name)
            .field("size", &self.view.size())
            .finish()
    }
}

/// A running server; [`ServerHandle::shutdown`] stops it and joins its threads.
#[derive(Debug)]
pub struct ServerHandle {
    stop: Arc<AtomicBool>,
    wake: Wake,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Clone)]
enum Wake {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl ServerHandle {
    /// Stops accepting, lets running connections finish their current request, and joins.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        match &self.wake {
            Wake::Unix(path) => drop(std::os::unix::net::UnixStream::connect(path)),
            Wake::Tcp(addr) => drop(std::net::TcpStream::connect_timeout(
                addr,
                Duration::from_secs(1),
            )),
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Blocks until the server stops (it runs until [`ServerHandle::shutdown`] or the process ends).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_now();
        }
    }
}

/// Starts serving on `listener` in a background thread.
pub fn serve(listener: Listener, config: ServerConfig) -> std::io::Result<ServerHandle> {
    let stop = Arc::new(AtomicBool::new(false));
    let wake = match &listener {
        Listener::Unix(_, path) => Wake::Unix(path.clone()),
        Listener::Tcp(l) => Wake::Tcp(l.local_addr()?),
    };
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("nbd-accept".into())
        .spawn(move || accept_loop(listener, config, stop2))?;
    Ok(ServerHandle {
        stop,
        wake,
        thread: Some(thread),
    })
}

trait Conn: Read + Write + Send {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()>;
    fn close(&self);
}

impl Conn for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Conn for std::net::TcpStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_nodelay(true)?;
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

fn accept_loop(listener: Listener, config: ServerConfig, stop: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    let workers: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());
    loop {
        let conn: std::io::Result<Box<dyn Conn>> = match &listener {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "NBD accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.load(Ordering::SeqCst) >= config.max_clients {
            tracing::warn!(
                max = config.max_clients,
                "NBD client refused: too many connections"
            );
            conn.close();
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let config = config.clone();
        let active2 = active.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                let mut conn = conn;
                match serve_client(conn.as_mut(), &config) {
                    Ok(()) => tracing::debug!("NBD client disconnected"),
                    Err(e) => tracing::info!(error = %e, "NBD client dropped"),
                }
                conn.close();
                active2.fetch_sub(1, Ordering::SeqCst);
            });
        let mut list = workers.lock().expect("worker list lock");
        list.retain(|h| !h.is_finished());
        match spawned {
            Ok(h) => list.push(h),
            Err(e) => {
                tracing::warn!(error = %e, "could not start an NBD connection thread");
                active.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    for h in workers.into_inner().expect("worker list lock") {
        let _ = h.join();
    }
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

fn read_u32(c: &mut dyn Conn) -> Result<u32, ConnError> {
    let mut b = [0u8; 4];
    c.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(c: &mut dyn Conn) -> Result<u64, ConnError> {
    let mut b = [0u8; 8];
    c.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply(c: &mut dyn Conn, option: u32, reply: u32, data: &[u8]) -> Result<(), ConnError> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    c.write_all(&out)?;
    Ok(())
}

/// Reads a length-prefixed (u32) string at `*at` of `data`.
fn take_string(data: &[u8], at: &mut usize) -> Option<String> {
    let len = u32::from_be_bytes(data.get(*at..*at + 4)?.try_into().ok()?) as usize;
    *at += 4;
    if len > MAX_STRING {
        return None;
    }
    let s = std::str::from_utf8(data.get(*at..*at + len)?)
        .ok()?
        .to_string();
    *at += len;
    Some(s)
}

struct Session {
    no_zeroes: bool,
    structured: bool,
    base_allocation: bool,
}

fn export_flags() -> u16 {
    TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN
}

fn serve_client(c: &mut dyn Conn, config: &ServerConfig) -> Result<(), ConnError> {
    c.set_timeouts(config.idle_timeout)?;
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    c.write_all(&hello)?;
    let client_flags = read_u32(c)?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let mut s = Session {
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        base_allocation: false,
    };
    let size = config.view.size();
    for _ in 0..MAX_OPTIONS {
        if read_u64(c)? != IHAVEOPT {
            return Err(ConnError::Protocol("option without IHAVEOPT magic".into()));
        }
        let option = read_u32(c)?;
        let len = read_u32(c)?;
        if len > MAX_OPTION_REPLY {
            if option == OPT_EXPORT_NAME {
                return Err(ConnError::Protocol(format!("export name of {len} bytes")));
            }
            // Swallow it, then refuse.
            std::io::copy(&mut (&mut *c).take(len as u64), &mut std::io::sink())?;
            option_reply(c, option, REP_ERR_TOO_BIG, b"option too long")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data)?;
        let name_ok = |name: &str| name.is_empty() || name == config.export_name;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                if !name_ok(&name) {
                    return Err(ConnError::Protocol(format!("unknown export {name:?}")));
                }
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&export_flags().to_be_bytes());
                if !s.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                c.write_all(&out)?;
                return transmission(c, config, &s);
            }
            OPT_ABORT => {
                let _ = option_reply(c, option, REP_ACK, &[]);
                return Ok(());
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(c, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                let mut d = (config.export_name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(config.export_name.as_bytes());
                option_reply(c, option, REP_SERVER, &d)?;
                option_reply(c, option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let mut at = 0;
                let parsed = take_string(&data, &mut at).and_then(|name| {
                    let n = u16::from_be_bytes(data.get(at..at + 2)?.try_into().ok()?) as usize;
                    at += 2;
                    let reqs: Vec<u16> = data
                        .get(at..)?
                        .chunks_exact(2)
                        .map(|b| u16::from_be_bytes([b[0], b[1]]))
                        .collect();
                    (reqs.len() == n && at + 2 * n == data.len()).then_some((name, reqs))
                });
                let Some((name, reqs)) = parsed else {
                    option_reply(c, option, REP_ERR_INVALID, b"malformed request")?;
                    continue;
                };
                if !name_ok(&name) {
                    option_reply(c, option, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let mut export = INFO_EXPORT.to_be_bytes().to_vec();
                export.extend_from_slice(&size.to_be_bytes());
                export.extend_from_slice(&export_flags().to_be_bytes());
                option_reply(c, option, REP_INFO, &export)?;
                if reqs.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(config.export_name.as_bytes());
                    option_reply(c, option, REP_INFO, &d)?;
                }
                if reqs.contains(&INFO_BLOCK_SIZE) {
                    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    d.extend_from_slice(&1u32.to_be_bytes());
                    d.extend_from_slice(&4096u32.to_be_bytes());
                    d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    option_reply(c, option, REP_INFO, &d)?;
                }
                option_reply(c, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    return transmission(c, config, &s);
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(c, option, REP_ERR_INVALID, b"takes no data")?;
                } else {
                    s.structured = true;
                    option_reply(c, option, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !s.structured {
                    option_reply(
                        c,
                        option,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    )?;
                    continue;
                }
                let mut at = 0;
                let parsed = take_string(&data, &mut at).and_then(|name| {
                    let n = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?);
                    at += 4;
                    let mut queries = Vec::new();
                    for _ in 0..n.min(1024) {
                        queries.push(take_string(&data, &mut at)?);
                    }
                    (queries.len() == n as usize && at == data.len()).then_some((name, queries))
                });
                let Some((name, queries)) = parsed else {
                    option_reply(c, option, REP_ERR_INVALID, b"malformed request")?;
                    continue;
                };
                if !name_ok(&name) {
                    option_reply(c, option, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let wants = (option == OPT_LIST_META_CONTEXT && queries.is_empty())
                    || queries
                        .iter()
                        .any(|q| q == super::BASE_ALLOCATION || q == "base:");
                if option == OPT_SET_META_CONTEXT {
                    s.base_allocation = wants;
                }
                if wants {
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(super::BASE_ALLOCATION.as_bytes());
                    option_reply(c, option, REP_META_CONTEXT, &d)?;
                }
                option_reply(c, option, REP_ACK, &[])?;
            }
            _ => {
                let reply = if option == 5 {
                    REP_ERR_POLICY
                } else {
                    REP_ERR_UNSUP
                };
                option_reply(c, option, reply, &[])?;
            }
        }
    }
    Err(ConnError::Protocol(format!(
        "more than {MAX_OPTIONS} options"
    )))
}

fn simple_reply(c: &mut dyn Conn, cookie: u64, error: u32, data: &[u8]) -> Result<(), ConnError> {
    let mut head = [0u8; 16];
    head[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    head[4..8].copy_from_slice(&error.to_be_bytes());
    head[8..].copy_from_slice(&cookie.to_be_bytes());
    c.write_all(&head)?;
    if !data.is_empty() {
        c.write_all(data)?;
    }
    Ok(())
}

fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..].copy_from_slice(&len.to_be_bytes());
    h
}

/// An error answer (simple or a structured error chunk).
fn error_reply(
    c: &mut dyn Conn,
    s: &Session,
    cookie: u64,
    errno: u32,
    msg: &str,
) -> Result<(), ConnError> {
    if !s.structured {
        return simple_reply(c, cookie, errno, &[]);
    }
    let msg = &msg.as_bytes()[..msg.len().min(1024)];
    let mut out = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    )
    .to_vec();
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    c.write_all(&out)?;
    Ok(())
}

fn transmission(c: &mut dyn Conn, config: &ServerConfig, s: &Session) -> Result<(), ConnError> {
    let size = config.view.size();
    let mut buf = Vec::new();
    loop {
        let mut req = [0u8; 28];
        match c.read_exact(&mut req) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        if be_u32(&req[..4]) != REQUEST_MAGIC {
            return Err(ConnError::Protocol(
                "request without the request magic".into(),
            ));
        }
        let command = be_u16(&req[6..8]);
        let cookie = be_u64(&req[8..16]);
        let offset = be_u64(&req[16..24]);
        let len = be_u32(&req[24..28]);
        let in_range = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size);
        match command {
            CMD_DISC => return Ok(()),
            CMD_READ => {
                if !in_range {
                    error_reply(c, s, cookie, EINVAL, "read outside the export")?;
                    continue;
                }
                if len > MAX_PAYLOAD {
                    error_reply(c, s, cookie, EOVERFLOW, "read larger than 32 MiB")?;
                    continue;
                }
                buf.resize(len as usize, 0);
                if let Err(e) = config.view.read_at(offset, &mut buf) {
                    tracing::warn!(offset, len, error = %e, "NBD read failed");
                    error_reply(c, s, cookie, EIO, &e.to_string())?;
                    continue;
                }
                if s.structured && len > 0 {
                    let mut head =
                        chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + len)
                            .to_vec();
                    head.extend_from_slice(&offset.to_be_bytes());
                    c.write_all(&head)?;
                    c.write_all(&buf)?;
                } else if s.structured {
                    c.write_all(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0))?;
                } else {
                    simple_reply(c, cookie, 0, &buf)?;
                }
            }
            CMD_WRITE => {
                if len > MAX_PAYLOAD {
                    return Err(ConnError::Protocol(format!("write payload of {len} bytes")));
                }
                std::io::copy(&mut (&mut *c).take(len as u64), &mut std::io::sink())?;
                error_reply(c, s, cookie, EPERM, "the export is read-only")?;
            }
            CMD_WRITE_ZEROES | CMD_TRIM => {
                error_reply(c, s, cookie, EPERM, "the export is read-only")?;
            }
            CMD_FLUSH => {
                if s.structured {
                    c.write_all(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0))?;
                } else {
                    simple_reply(c, cookie, 0, &[])?;
                }
            }
            CMD_BLOCK_STATUS => {
                if !s.base_allocation {
                    error_reply(c, s, cookie, EINVAL, "no meta context selected")?;
                    continue;
                }
                if !in_range || len == 0 {
                    error_reply(c, s, cookie, EINVAL, "block status outside the export")?;
                    continue;
                }
                let descriptors = block_status(config.view.as_ref(), offset, len as u64);
                let mut out = chunk_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS,
                    cookie,
                    4 + 8 * descriptors.len() as u32,
                )
                .to_vec();
                out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
                for (len, flags) in descriptors {
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(&flags.to_be_bytes());
                }
                c.write_all(&out)?;
            }
            other => {
                error_reply(c, s, cookie, EINVAL, &format!("unknown command {other}"))?;
            }
        }
    }
}

/// `base:allocation` descriptors for `[offset, offset + len)`: granule-aligned runs of zero
/// (hole|zero) and data. Lengths are non-zero and sum to at most `len`.
fn block_status(view: &dyn DiskView, offset: u64, len: u64) -> Vec<(u32, u32)> {
    let end = offset + len;
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut at = offset;
    while at < end && out.len() < MAX_DESCRIPTORS {
        let next = ((at / STATUS_GRANULE + 1) * STATUS_GRANULE).min(end);
        let flags = if view.is_zero_range(at, next - at) {
            super::STATE_HOLE | super::STATE_ZERO
        } else {
            0
        };
        let n = (next - at) as u32;
        match out.last_mut() {
            Some((l, f)) if *f == flags && l.checked_add(n).is_some() => *l += n,
            _ => out.push((n, flags)),
        }
        at = next;
    }
    out
}
