//! The byte stream under the NBD client: a Unix or TCP socket with read/write timeouts, and the
//! mapping of socket errors to [`Error`]. Must not parse NBD messages.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::Error;

/// A connected socket.
pub(crate) trait Conn: Read + Write + Send {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()>;
    fn shutdown_both(&self);
}

impl Conn for UnixStream {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }

    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Conn for TcpStream {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        self.set_nodelay(true)?;
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }

    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

/// A socket plus the timeout it was configured with (for error messages).
pub(crate) struct Wire {
    conn: Box<dyn Conn>,
    timeout: Duration,
}

impl Wire {
    pub(crate) fn new(conn: Box<dyn Conn>, timeout: Duration) -> Result<Wire, Error> {
        if timeout.is_zero() {
            return Err(Error::InvalidOption("timeout must be positive".to_string()));
        }
        conn.set_timeouts(timeout).map_err(|source| Error::Io {
            doing: "setting socket timeouts",
            source,
        })?;
        Ok(Wire { conn, timeout })
    }

    pub(crate) fn read_exact(&mut self, buf: &mut [u8], doing: &'static str) -> Result<(), Error> {
        self.conn.read_exact(buf).map_err(|e| self.map(e, doing))
    }

    pub(crate) fn write_all(&mut self, buf: &[u8], doing: &'static str) -> Result<(), Error> {
        self.conn.write_all(buf).map_err(|e| self.map(e, doing))
    }

    pub(crate) fn shutdown(&self) {
        self.conn.shutdown_both();
    }

    fn map(&self, e: io::Error, doing: &'static str) -> Error {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout {
                doing,
                timeout: self.timeout,
            },
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset => Error::Closed { doing },
            _ => Error::Io { doing, source: e },
        }
    }
}
