//! Our NBD server against our NBD client (handshake, reads, block status, many clients) and
//! against a hostile client speaking raw bytes: every bad request gets an error or a closed
//! connection, and the server keeps serving everyone else.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use super::proto::*;
use super::server::{Listener, ServerConfig, ServerHandle, serve};
use super::*;
use crate::repo::image::DiskView;

/// A disk in memory: data in the first half of every 256 KiB, zeros in the rest.
struct MemDisk(Vec<u8>);

impl DiskView for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset as usize + buf.len();
        if end > self.0.len() {
            return Err(std::io::Error::other("past the end"));
        }
        buf.copy_from_slice(&self.0[offset as usize..end]);
        Ok(())
    }
    fn is_zero_range(&self, offset: u64, len: u64) -> bool {
        self.0[offset as usize..(offset + len) as usize]
            .iter()
            .all(|&b| b == 0)
    }
}

fn disk() -> Vec<u8> {
    let mut data = vec![0u8; 4 << 20];
    let mut x = 0x1234_5678_9abc_def1u64;
    for block in data.chunks_mut(256 * 1024) {
        for b in &mut block[..128 * 1024] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8 | 1;
        }
    }
    data
}

fn start(dir: &std::path::Path, data: &[u8]) -> (ServerHandle, std::path::PathBuf) {
    let path = dir.join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = serve(
        Listener::Unix(listener, path.clone()),
        ServerConfig {
            view: Arc::new(MemDisk(data.to_vec())),
            export_name: "rp".into(),
            max_clients: 8,
            idle_timeout: Duration::from_secs(10),
        },
    )
    .unwrap();
    (handle, path)
}

fn connect(path: &std::path::Path) -> Client {
    let opts = ConnectOptions::new("rp")
        .with_meta_contexts([BASE_ALLOCATION.to_string()])
        .with_timeout(Duration::from_secs(10));
    Client::connect_unix(path, &opts).unwrap()
}

#[test]
fn clients_read_exactly_and_see_holes() {
    let dir = tempfile::tempdir().unwrap();
    let data = disk();
    let (server, path) = start(dir.path(), &data);
    let readers: Vec<_> = (0..4u64)
        .map(|seed| {
            let path = path.clone();
            let data = data.clone();
            std::thread::spawn(move || {
                let mut client = connect(&path);
                assert!(client.info().read_only());
                assert_eq!(client.size(), data.len() as u64);
                let mut x = seed + 7;
                for _ in 0..50 {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let at = (x >> 20) as usize % data.len();
                    let len = ((x >> 8) as usize % 300_000).min(data.len() - at).max(1);
                    let mut buf = vec![0u8; len];
                    client.read_at(at as u64, &mut buf).unwrap();
                    assert!(buf == data[at..at + len], "read {at}+{len}");
                }
                client.disconnect().unwrap();
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let mut client = connect(&path);
    let extents = client.block_status(BASE_ALLOCATION, 0, 1 << 20).unwrap();
    let total: u64 = extents.iter().map(|e| e.len).sum();
    assert_eq!(total, 1 << 20);
    for e in &extents {
        let zero = data[e.offset as usize..(e.offset + e.len) as usize]
            .iter()
            .all(|&b| b == 0);
        assert_eq!(e.flags & STATE_ZERO != 0, zero, "{e:?}");
    }
    assert!(extents.iter().any(|e| e.flags & STATE_ZERO != 0));
    assert!(matches!(
        client.write_at(0, &[1, 2, 3]),
        Err(Error::ReadOnly)
    ));
    drop(client);
    server.shutdown();
    assert!(!path.exists(), "the socket is removed on shutdown");
}

/// Handshake by hand up to transmission (NBD_OPT_EXPORT_NAME, no zero padding).
fn raw_session(path: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(be_u64(&hello[..8]), NBDMAGIC);
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    s.write_all(&encode_option(OPT_EXPORT_NAME, b"rp")).unwrap();
    let mut export = [0u8; 10];
    s.read_exact(&mut export).unwrap();
    s
}

fn simple_reply(s: &mut UnixStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(be_u32(&r[..4]), SIMPLE_REPLY_MAGIC);
    (be_u32(&r[4..8]), be_u64(&r[8..16]))
}

#[test]
fn hostile_requests_get_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let data = disk();
    let (server, path) = start(dir.path(), &data);
    // Garbage instead of a handshake: that connection is closed.
    let mut junk = UnixStream::connect(&path).unwrap();
    junk.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut hello = [0u8; 18];
    junk.read_exact(&mut hello).unwrap();
    junk.write_all(&[0xff; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = junk.read_to_end(&mut rest);
    // Reads out of range, overflowing, too big; writes and an unknown command.
    let mut s = raw_session(&path);
    let size = data.len() as u64;
    for (i, (command, offset, len)) in [
        (CMD_READ, size - 10, 20u32),
        (CMD_READ, u64::MAX - 5, 10),
        (CMD_READ, 0, 64 << 20),
        (CMD_WRITE_ZEROES, 0, 4096),
        (99u16, 0, 0),
    ]
    .into_iter()
    .enumerate()
    {
        s.write_all(&encode_request(0, command, i as u64, offset, len))
            .unwrap();
        let (error, cookie) = simple_reply(&mut s);
        assert_eq!(cookie, i as u64);
        assert_ne!(error, 0, "request {i} must fail");
    }
    // The same connection still reads correctly.
    s.write_all(&encode_request(0, CMD_READ, 77, 4096, 512))
        .unwrap();
    let (error, cookie) = simple_reply(&mut s);
    assert_eq!((error, cookie), (0, 77));
    let mut buf = vec![0u8; 512];
    s.read_exact(&mut buf).unwrap();
    assert!(buf == data[4096..4608]);
    // A write's payload is swallowed, then refused with EPERM.
    s.write_all(&encode_request(0, CMD_WRITE, 78, 0, 8))
        .unwrap();
    s.write_all(&[0u8; 8]).unwrap();
    assert_eq!(simple_reply(&mut s), (1, 78));
    // Bad request magic closes only this connection.
    s.write_all(&[0u8; 28]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    // Others are still served.
    let mut client = connect(&path);
    let mut buf = vec![0u8; 1000];
    client.read_at(123, &mut buf).unwrap();
    assert!(buf == data[123..1123]);
    drop(client);
    server.shutdown();
}
