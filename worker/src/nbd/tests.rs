//! Client tests against a scripted fake server on a Unix socket: a thread that speaks just enough
//! of the protocol, then misbehaves. Every misbehaviour must give an error, never a panic or a
//! hang. (Tests against the real qemu-nbd live in `worker/tests/sources.rs`.)

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use super::proto::*;
use super::*;

/// A server-side socket of either kind.
trait FakeStream: Read + Write + Send {
    fn set_timeout(&self, timeout: Duration);
}

impl FakeStream for UnixStream {
    fn set_timeout(&self, timeout: Duration) {
        self.set_read_timeout(Some(timeout)).unwrap();
    }
}

impl FakeStream for TcpStream {
    fn set_timeout(&self, timeout: Duration) {
        self.set_read_timeout(Some(timeout)).unwrap();
    }
}

/// Server side of one connection.
struct Fake {
    s: Box<dyn FakeStream>,
}

#[derive(Debug, Clone, Copy)]
struct Request {
    command: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

type Io<T> = std::io::Result<T>;

impl Fake {
    fn greet(&mut self) -> Io<()> {
        self.s.write_all(&NBDMAGIC.to_be_bytes())?;
        self.s.write_all(&IHAVEOPT.to_be_bytes())?;
        self.s
            .write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
        let mut flags = [0u8; 4];
        self.s.read_exact(&mut flags)?;
        assert_eq!(
            u32::from_be_bytes(flags),
            FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
        );
        Ok(())
    }

    fn read_option(&mut self) -> Io<(u32, Vec<u8>)> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        assert_eq!(be_u64(&h), IHAVEOPT);
        let mut data = vec![0u8; be_u32(&h[12..16]) as usize];
        self.s.read_exact(&mut data)?;
        Ok((be_u32(&h[8..12]), data))
    }

    fn reply_option(&mut self, option: u32, reply_type: u32, data: &[u8]) -> Io<()> {
        let mut b = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&reply_type.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b)
    }

    /// Answers options like a cooperative server until NBD_OPT_GO: structured replies yes, the
    /// contexts in `grant` (name, id), export of `size` bytes, writable, flush and write-zeroes.
    fn negotiate(&mut self, size: u64, grant: &[(&str, u32)]) -> Io<()> {
        self.greet()?;
        loop {
            let (option, _) = self.read_option()?;
            match option {
                OPT_STRUCTURED_REPLY => self.reply_option(option, REP_ACK, &[])?,
                OPT_SET_META_CONTEXT => {
                    for (name, id) in grant {
                        let mut p = id.to_be_bytes().to_vec();
                        p.extend_from_slice(name.as_bytes());
                        self.reply_option(option, REP_META_CONTEXT, &p)?;
                    }
                    self.reply_option(option, REP_ACK, &[])?;
                }
                OPT_GO => {
                    let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                    p.extend_from_slice(&size.to_be_bytes());
                    let flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_WRITE_ZEROES;
                    p.extend_from_slice(&flags.to_be_bytes());
                    self.reply_option(option, REP_INFO, &p)?;
                    self.reply_option(option, REP_ACK, &[])?;
                    return Ok(());
                }
                OPT_ABORT => {
                    self.reply_option(option, REP_ACK, &[])?;
                    return Err(std::io::Error::other("client aborted"));
                }
                other => panic!("unexpected option {other}"),
            }
        }
    }

    fn read_request(&mut self) -> Io<Request> {
        let mut b = [0u8; 28];
        self.s.read_exact(&mut b)?;
        assert_eq!(be_u32(&b), REQUEST_MAGIC);
        let r = Request {
            command: be_u16(&b[6..8]),
            cookie: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            len: be_u32(&b[24..28]),
        };
        if r.command == CMD_WRITE {
            let mut data = vec![0u8; r.len as usize];
            self.s.read_exact(&mut data)?;
        }
        Ok(r)
    }

    fn chunk(&mut self, flags: u16, reply_type: u16, cookie: u64, payload: &[u8]) -> Io<()> {
        let mut b = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&reply_type.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b)
    }

    fn data(&mut self, done: bool, cookie: u64, offset: u64, data: &[u8]) -> Io<()> {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(data);
        self.chunk(
            if done { REPLY_FLAG_DONE } else { 0 },
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            &p,
        )
    }

    fn hole(&mut self, done: bool, cookie: u64, offset: u64, len: u32) -> Io<()> {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&len.to_be_bytes());
        self.chunk(
            if done { REPLY_FLAG_DONE } else { 0 },
            REPLY_TYPE_OFFSET_HOLE,
            cookie,
            &p,
        )
    }

    fn status(&mut self, done: bool, cookie: u64, ctx: u32, descs: &[(u32, u32)]) -> Io<()> {
        let mut p = ctx.to_be_bytes().to_vec();
        for (l, f) in descs {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        self.chunk(
            if done { REPLY_FLAG_DONE } else { 0 },
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            &p,
        )
    }

    fn done(&mut self, cookie: u64) -> Io<()> {
        self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, &[])
    }

    fn simple(&mut self, error: u32, cookie: u64) -> Io<()> {
        let mut b = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&error.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        self.s.write_all(&b)
    }

    /// Blocks until the client closes the connection (or 10 s pass).
    fn wait_closed(&mut self) {
        self.s.set_timeout(Duration::from_secs(10));
        let mut sink = Vec::new();
        let _ = self.s.read_to_end(&mut sink);
    }
}

struct Server {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    thread: Option<JoinHandle<()>>,
}

/// Runs `script` on the first connection accepted by `accept`.
fn serve(
    accept: impl FnOnce() -> Box<dyn FakeStream> + Send + 'static,
    script: impl FnOnce(&mut Fake) -> Io<()> + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let s = accept();
        s.set_timeout(Duration::from_secs(10));
        let mut fake = Fake { s };
        let _ = script(&mut fake);
    })
}

impl Server {
    /// Runs `script` on the first connection. I/O errors in the script (the client went away)
    /// end it quietly; assertion failures surface in `join`.
    fn start(script: impl FnOnce(&mut Fake) -> Io<()> + Send + 'static) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let thread = serve(move || Box::new(listener.accept().unwrap().0), script);
        Server {
            _dir: dir,
            socket,
            thread: Some(thread),
        }
    }

    fn connect(&self, opts: &ConnectOptions) -> Result<Client, Error> {
        Client::connect_unix(&self.socket, opts)
    }

    fn join(mut self) {
        self.thread.take().unwrap().join().unwrap();
    }
}

fn opts() -> ConnectOptions {
    ConnectOptions::new("img")
        .with_meta_contexts([BASE_ALLOCATION.to_string()])
        .with_timeout(Duration::from_secs(5))
}

#[test]
fn reads_reassemble_out_of_order_data_and_hole_chunks() {
    let server = Server::start(|f| {
        f.negotiate(1 << 20, &[(BASE_ALLOCATION, 1)])?;
        let r = f.read_request()?;
        assert_eq!((r.command, r.offset, r.len), (CMD_READ, 4096, 8192));
        f.data(false, r.cookie, 4096 + 6144, &[0xcd; 2048])?;
        f.hole(false, r.cookie, 4096 + 2048, 4096)?;
        f.data(false, r.cookie, 4096, &[0xab; 2048])?;
        f.done(r.cookie)?;
        let d = f.read_request()?;
        assert_eq!(d.command, CMD_DISC);
        Ok(())
    });
    let mut c = server.connect(&opts()).unwrap();
    assert_eq!(c.size(), 1 << 20);
    assert!(c.structured_replies());
    assert_eq!(
        c.meta_contexts(),
        &[MetaContext {
            id: 1,
            name: BASE_ALLOCATION.into()
        }]
    );
    let mut buf = vec![0xffu8; 8192];
    c.read_at(4096, &mut buf).unwrap();
    assert!(buf[..2048].iter().all(|&b| b == 0xab));
    assert!(buf[2048..6144].iter().all(|&b| b == 0));
    assert!(buf[6144..].iter().all(|&b| b == 0xcd));
    drop(c);
    server.join();
}

#[test]
fn servers_without_structured_replies_get_simple_reads() {
    let server = Server::start(|f| {
        f.greet()?;
        let (o, _) = f.read_option()?;
        assert_eq!(o, OPT_STRUCTURED_REPLY);
        f.reply_option(o, REP_ERR_UNSUP, &[])?;
        let (o, _) = f.read_option()?;
        assert_eq!(o, OPT_GO);
        let mut p = INFO_EXPORT.to_be_bytes().to_vec();
        p.extend_from_slice(&(1u64 << 20).to_be_bytes());
        p.extend_from_slice(&TFLAG_HAS_FLAGS.to_be_bytes());
        f.reply_option(o, REP_INFO, &p)?;
        f.reply_option(o, REP_ACK, &[])?;
        let r = f.read_request()?;
        f.simple(0, r.cookie)?;
        f.s.write_all(&vec![3u8; r.len as usize])?;
        let r = f.read_request()?;
        f.simple(5, r.cookie)?;
        f.wait_closed();
        Ok(())
    });
    let mut c = server.connect(&ConnectOptions::new("img")).unwrap();
    assert!(!c.structured_replies());
    let mut buf = vec![0u8; 4096];
    c.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 3));
    let err = c.read_at(0, &mut buf).unwrap_err();
    assert!(matches!(err, Error::Command { errno: 5, .. }), "{err}");
    // Without SEND_FLUSH, flush is a no-op; block status needs a context.
    c.flush().unwrap();
    assert!(matches!(
        c.block_status(BASE_ALLOCATION, 0, 4096),
        Err(Error::NoSuchContext(_))
    ));
    drop(c);
    server.join();
}

#[test]
fn pipelined_reads_accept_replies_in_any_order() {
    let server = Server::start(|f| {
        f.negotiate(1 << 20, &[])?;
        let reqs: Vec<Request> = (0..4).map(|_| f.read_request()).collect::<Io<_>>()?;
        for r in reqs.iter().rev() {
            f.data(
                true,
                r.cookie,
                r.offset,
                &vec![(r.offset / 4096) as u8; r.len as usize],
            )?;
        }
        f.wait_closed();
        Ok(())
    });
    let mut o = ConnectOptions::new("img").with_timeout(Duration::from_secs(5));
    o.request_size = 4096;
    let mut c = server.connect(&o).unwrap();
    let mut buf = vec![0u8; 4 * 4096];
    c.read_at(0, &mut buf).unwrap();
    for (i, piece) in buf.chunks(4096).enumerate() {
        assert!(piece.iter().all(|&b| b == i as u8), "piece {i}");
    }
    drop(c);
    server.join();
}

#[test]
fn wrong_greeting_magic_is_a_protocol_error() {
    let server = Server::start(|f| {
        f.s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")?;
        f.wait_closed();
        Ok(())
    });
    let err = server.connect(&opts()).unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err}");
    assert!(err.to_string().contains("not an NBD server"), "{err}");
    server.join();
}

#[test]
fn reply_with_unknown_cookie_breaks_the_connection() {
    let server = Server::start(|f| {
        f.negotiate(1 << 20, &[(BASE_ALLOCATION, 1)])?;
        let r = f.read_request()?;
        f.data(true, r.cookie + 1000, r.offset, &vec![0; r.len as usize])?;
        f.wait_closed();
        Ok(())
    });
    let mut c = server.connect(&opts()).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = c.read_at(0, &mut buf).unwrap_err();
    assert!(err.to_string().contains("matches no request"), "{err}");
    assert!(matches!(c.read_at(0, &mut buf), Err(Error::Broken)));
    drop(c);
    server.join();
}

#[test]
fn garbage_reply_magic_is_a_protocol_error() {
    let server = Server::start(|f| {
        f.negotiate(1 << 20, &[])?;
        f.read_request()?;
        f.s.write_all(&[0x5a; 64])?;
        f.wait_closed();
        Ok(())
    });
    let mut c = server.connect(&opts().with_meta_contexts([])).unwrap();
    let err = c.flush().unwrap_err();
    assert!(err.to_string().contains("unknown magic"), "{err}");
    drop(c);
    server.join();
}

#[test]
fn data_chunk_outside_the_request_is_rejected_before_it_is_copied() {
    let server = Server::start(|f| {
        f.negotiate(1 << 20, &[])?;
        let r = f.read_request()?;
        // Claims to be at the end of the request but carries twice its length.
        f.data(true, r.cookie, r.offset + 4096, &[1u8; 8192])?;
        f.wait_closed();
        Ok(())
    });
    let mut c = server.connect(&opts().with_meta_contexts([])).unwrap();
    let mut buf = vec![0u8; 8192];
    let err = c.read_at(0, &mut buf).unwrap_err();
    assert!(err.to_string().contains("outside its request"), "{err}");
    drop(c);
    server.join();
}

#[test]
fn read_reply_that_leaves_a_gap_is_rejected() {
    let server = Server::start(|f| {
        f.negotiate(1 << 20, &[])?;
        let r = f.read_request()?;
        f.data(false, r.cookie, r.offset, &[1u8; 1024])?;
        f.done(r.cookie)?;
        f.wait_closed();
        Ok(())
    });
    let mut c = server.connect(&opts().with_meta_contexts([])).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = c.read_at(0, &mut buf).unwrap_err();
    assert!(err.to_string().contains("ended after 1024 bytes"), "{err}");
    drop(c);
    server.join();
}

#[test]
fn overlapping_read_chunks_are_rejected() {
    let server = Server::start(|f| {
        f.negotiate(1 << 20, &[])?;
        let r = f.read_request()?;
        f.data(false, r.cookie, r.offset, &[1u8; 4096])?;
        f.hole(false, r.cookie, r.offset, 4096)?;
        f.wait_closed();
        Ok(())
    });
    let mut c = server.connect(&opts().with_meta_contexts([])).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = c.read_at(0, &mut buf).unwrap_err();
    assert!(err.to_string().contains("overlapping"), "{err}");
    drop(c);
    server.join();
}

#[test]
fn block_status_descriptor_past_the_request_end_is_rejected() {
    let server = Server::start(|f| {
        f.negotiate(1 << 20, &[(BASE_ALLOCATION, 1)])?;
        let r = f.read_request()?;
        assert_eq!(r.command, CMD_BLOCK_STATUS);
        f.status(true, r.cookie, 1, &[(r.len, 0), (4096, 3)])?;
        f.wait_closed();
        Ok(())
    });
    let mut c = server.connect(&opts()).unwrap();
    let err = c.block_status(BASE_ALLOCATION, 0, 65536).unwrap_err();
    assert!(err.to_string().contains("past the request end"), "{err}");
    drop(c);
    server.join();
}

#[test]
fn block_status_follows_short_answers_and_clamps_the_last_descriptor() {
    let server = Server::start(|f| {
        f.negotiate(1 << 20, &[(BASE_ALLOCATION, 7), ("qemu:dirty-bitmap:b", 9)])?;
        // First answer covers only 64 KiB; the client must ask again from there.
        let r = f.read_request()?;
        assert_eq!((r.offset, r.len), (0, 1 << 20));
        f.status(false, r.cookie, 9, &[(r.len, 1)])?;
        f.status(true, r.cookie, 7, &[(4096, 0), (61440, 3)])?;
        let r = f.read_request()?;
        assert_eq!((r.offset, r.len), (65536, (1 << 20) - 65536));
        f.status(false, r.cookie, 7, &[(4096, 3), (1 << 30, 0)])?;
        f.status(false, r.cookie, 9, &[(r.len, 1)])?;
        f.done(r.cookie)?;
        f.wait_closed();
        Ok(())
    });
    let o = opts().with_meta_contexts([BASE_ALLOCATION.to_string(), dirty_bitmap_context("b")]);
    let mut c = server.connect(&o).unwrap();
    let extents = c.block_status(BASE_ALLOCATION, 0, 1 << 20).unwrap();
    assert_eq!(
        extents,
        vec![
            StatusExtent {
                offset: 0,
                len: 4096,
                flags: 0
            },
            StatusExtent {
                offset: 4096,
                len: 65536,
                flags: 3
            },
            StatusExtent {
                offset: 69632,
                len: (1 << 20) - 69632,
                flags: 0
            },
        ]
    );
    assert!(matches!(
        c.block_status("base:other", 0, 4096),
        Err(Error::NoSuchContext(_))
    ));
    drop(c);
    server.join();
}

#[test]
fn error_chunk_fails_the_request_but_keeps_the_connection() {
    let server = Server::start(|f| {
        f.negotiate(1 << 20, &[])?;
        let r = f.read_request()?;
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&10u16.to_be_bytes());
        p.extend_from_slice(b"disk on fire");
        p.truncate(16);
        f.chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, r.cookie, &p)?;
        let r = f.read_request()?;
        f.data(true, r.cookie, r.offset, &vec![7u8; r.len as usize])?;
        let w = f.read_request()?;
        assert_eq!(w.command, CMD_WRITE);
        f.simple(28, w.cookie)?;
        f.wait_closed();
        Ok(())
    });
    let mut c = server.connect(&opts().with_meta_contexts([])).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = c.read_at(0, &mut buf).unwrap_err();
    assert!(matches!(err, Error::Command { errno: 5, .. }), "{err}");
    assert!(err.to_string().contains("disk on fi"), "{err}");
    c.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 7));
    let err = c.write_at(0, &buf).unwrap_err();
    assert!(err.to_string().contains("ENOSPC"), "{err}");
    drop(c);
    server.join();
}

#[test]
fn write_zeroes_falls_back_to_writing_zeros_on_enotsup() {
    let server = Server::start(|f| {
        f.negotiate(1 << 20, &[])?;
        let z = f.read_request()?;
        assert_eq!(
            (z.command, z.offset, z.len),
            (CMD_WRITE_ZEROES, 4096, 65536)
        );
        f.simple(ENOTSUP, z.cookie)?;
        let mut written = 0;
        while written < 65536 {
            let w = f.read_request()?;
            assert_eq!(
                (w.command, w.offset),
                (CMD_WRITE, 4096 + u64::from(written))
            );
            written += w.len;
            f.simple(0, w.cookie)?;
        }
        let fl = f.read_request()?;
        assert_eq!(fl.command, CMD_FLUSH);
        f.done(fl.cookie)?;
        f.wait_closed();
        Ok(())
    });
    let mut c = server.connect(&opts().with_meta_contexts([])).unwrap();
    c.write_zeroes(4096, 65536).unwrap();
    c.flush().unwrap();
    drop(c);
    server.join();
}

#[test]
fn silent_server_times_out() {
    let server = Server::start(|f| {
        f.negotiate(1 << 20, &[])?;
        f.read_request()?;
        f.wait_closed();
        Ok(())
    });
    let o = ConnectOptions::new("img").with_timeout(Duration::from_secs(1));
    let mut c = server.connect(&o).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = c.read_at(0, &mut buf).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    drop(c);
    server.join();
}

#[test]
fn server_closing_mid_reply_is_reported() {
    let server = Server::start(|f| {
        f.negotiate(1 << 20, &[])?;
        let r = f.read_request()?;
        // Header of a data chunk announcing 4096 bytes, then only 100 of them.
        let mut b = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        b.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        b.extend_from_slice(&r.cookie.to_be_bytes());
        b.extend_from_slice(&(8 + 4096u32).to_be_bytes());
        b.extend_from_slice(&r.offset.to_be_bytes());
        b.extend_from_slice(&[0u8; 100]);
        f.s.write_all(&b)
    });
    let mut c = server.connect(&opts().with_meta_contexts([])).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = c.read_at(0, &mut buf).unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err}");
    drop(c);
    server.join();
}

#[test]
fn refused_export_carries_the_server_message() {
    let server = Server::start(|f| {
        f.greet()?;
        let (o, _) = f.read_option()?;
        f.reply_option(o, REP_ACK, &[])?;
        let (o, data) = f.read_option()?;
        assert_eq!(o, OPT_GO);
        assert_eq!(&data[4..8], b"nope");
        f.reply_option(o, REP_ERR_BIT | 6, b"export 'nope' not present")?;
        let (o, _) = f.read_option()?;
        assert_eq!(o, OPT_ABORT);
        Ok(())
    });
    let err = server.connect(&ConnectOptions::new("nope")).unwrap_err();
    assert!(matches!(err, Error::Refused { .. }), "{err}");
    assert!(
        err.to_string().contains("export 'nope' not present"),
        "{err}"
    );
    server.join();
}

#[test]
fn ungranted_meta_context_fails_the_connection() {
    let server = Server::start(|f| {
        f.negotiate(1 << 20, &[(BASE_ALLOCATION, 1)])?;
        Ok(())
    });
    let o = opts().with_meta_contexts([BASE_ALLOCATION.to_string(), dirty_bitmap_context("x")]);
    // The fake answers GO after the abort; the client must fail before that.
    let err = server.connect(&o).unwrap_err();
    assert!(
        matches!(err, Error::ContextNotGranted(ref n) if n == "qemu:dirty-bitmap:x"),
        "{err}"
    );
    server.join();
}

#[test]
fn requests_outside_the_export_or_on_read_only_exports_are_refused_locally() {
    let server = Server::start(|f| {
        f.greet()?;
        let (o, _) = f.read_option()?;
        f.reply_option(o, REP_ACK, &[])?;
        let (o, _) = f.read_option()?;
        let mut p = INFO_EXPORT.to_be_bytes().to_vec();
        p.extend_from_slice(&(1u64 << 20).to_be_bytes());
        p.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
        f.reply_option(o, REP_INFO, &p)?;
        let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [512u32, 4096, 1 << 20] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        f.reply_option(o, REP_INFO, &b)?;
        f.reply_option(o, REP_ACK, &[])?;
        f.wait_closed();
        Ok(())
    });
    let mut c = server.connect(&ConnectOptions::new("img")).unwrap();
    assert_eq!((c.info().min_block, c.info().max_payload), (512, 1 << 20));
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        c.read_at((1 << 20) - 512, &mut buf),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        c.read_at(100, &mut buf),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(c.write_at(0, &buf), Err(Error::ReadOnly)));
    assert!(matches!(c.write_zeroes(0, 4096), Err(Error::ReadOnly)));
    drop(c);
    server.join();
}

#[test]
fn tcp_connections_work_like_unix_ones() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = serve(
        move || Box::new(listener.accept().unwrap().0),
        |f| {
            f.negotiate(1 << 20, &[])?;
            let r = f.read_request()?;
            f.data(true, r.cookie, r.offset, &vec![9u8; r.len as usize])?;
            let w = f.read_request()?;
            assert_eq!((w.command, w.len), (CMD_WRITE_ZEROES, 65536));
            f.simple(0, w.cookie)?;
            let d = f.read_request()?;
            assert_eq!(d.command, CMD_DISC);
            Ok(())
        },
    );
    let mut c = Client::connect_tcp(addr, &ConnectOptions::new("img")).unwrap();
    let mut buf = vec![0u8; 4096];
    c.read_at(8192, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 9));
    c.write_zeroes(0, 65536).unwrap();
    c.disconnect().unwrap();
    thread.join().unwrap();
}
