//! A private `qemu-nbd` process serving one image file on a Unix socket.
//!
//! Owns: the process (spawned in the foreground, killed and reaped on drop), a private 0700
//! directory under the temp dir holding its socket and its stderr log (removed on drop), and the
//! first connection (polled for with a deadline until the socket accepts). When qemu-nbd fails to
//! open an image, our error carries its stderr.
//!
//! Read-only servers run `--persistent --shared=8` and are stopped with SIGTERM. Writable
//! servers run without `--persistent`: once the client sends `NBD_CMD_DISC`, qemu-nbd closes the
//! image cleanly and exits by itself, and [`QemuNbd::wait_exit`] waits for that before falling back
//! to SIGTERM (qemu-nbd also closes the image cleanly on SIGTERM), then SIGKILL.
//!
//! Must not: speak NBD itself (that is [`crate::nbd`]), or decide formats.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{Error, ImageFormat, io_error};
use crate::nbd::{self, Client, ConnectOptions};

/// Export name qemu-nbd is started with.
pub const EXPORT_NAME: &str = "img";
/// How often the socket and the process are polled while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How long to wait for qemu-nbd to exit after it dropped a connection during the handshake.
const EXIT_AFTER_CLOSE: Duration = Duration::from_secs(5);
/// How long qemu-nbd gets to exit after SIGTERM before SIGKILL.
const TERM_TIMEOUT: Duration = Duration::from_secs(10);
/// qemu-nbd allocates a bounce buffer per request. With glibc's default (dynamic) mmap and trim
/// thresholds, MiB-sized buffers are mapped or trimmed and page-faulted again on every request,
/// which costs more than half the read throughput (1 GiB random qcow2 through our client on this
/// 2-core machine: 0.3–0.7 GiB/s without, 1.0–1.9 GiB/s with). Fixed thresholds above our
/// largest request (32 MiB) keep the buffers in the heap.
const MALLOC_TUNABLES: &str =
    "glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=268435456";
/// Longest unix socket path (sun_path is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How to serve the image.
#[derive(Debug, Clone)]
pub struct QemuNbdOptions {
    pub format: ImageFormat,
    pub writable: bool,
    /// Persistent dirty bitmaps to expose (`-B NAME`, as `qemu:dirty-bitmap:NAME`).
    pub bitmaps: Vec<String>,
    /// Deadline for qemu-nbd to open the image and accept the first connection.
    pub start_timeout: Duration,
}

impl QemuNbdOptions {
    pub fn new(format: ImageFormat, writable: bool) -> Self {
        QemuNbdOptions {
            format,
            writable,
            bitmaps: Vec::new(),
            start_timeout: Duration::from_secs(30),
        }
    }
}

/// A running qemu-nbd. Dropping it stops the process and removes its directory.
#[derive(Debug)]
pub struct QemuNbd {
    /// The process; `None` once reaped. Owned here and reaped by `stop` (or Drop).
    child: Option<Child>,
    /// Holds the socket and the log; dropped (removed) after `drop` has stopped the process.
    _dir: PrivateDir,
    socket: PathBuf,
    log: PathBuf,
    image: PathBuf,
    opts: QemuNbdOptions,
}

impl QemuNbd {
    /// Spawns `qemu-nbd` for `image`. Returns once the process is started; [`QemuNbd::connect`]
    /// waits for it to listen.
    pub fn start(image: &Path, opts: &QemuNbdOptions) -> Result<QemuNbd, Error> {
        // An absolute path: qemu would read a relative "nbd:..." or "json:..." as a protocol.
        let abs = std::fs::canonicalize(image).map_err(|e| io_error(image, e))?;
        let dir = PrivateDir::new().map_err(|e| io_error(&std::env::temp_dir(), e))?;
        let socket = dir.path.join("nbd.sock");
        let log = dir.path.join("qemu-nbd.log");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::Invalid {
                path: socket,
                reason: "socket path too long; set TMPDIR to a shorter directory".to_string(),
            });
        }
        let stderr = File::create(&log).map_err(|e| io_error(&log, e))?;
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg(format!("--format={}", opts.format.qemu_name()))
            .arg(format!("--export-name={EXPORT_NAME}"))
            .arg("--socket")
            .arg(&socket);
        if opts.writable {
            cmd.args(["--cache=writeback", "--discard=unmap"]);
        } else {
            cmd.args(["--read-only", "--persistent", "--shared=8"]);
        }
        for bitmap in &opts.bitmaps {
            cmd.arg(format!("--bitmap={bitmap}"));
        }
        cmd.arg(&abs)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // An operator's own tunables win.
        if std::env::var_os("GLIBC_TUNABLES").is_none() {
            cmd.env("GLIBC_TUNABLES", MALLOC_TUNABLES);
        }
        // qemu-nbd must not outlive a worker killed with SIGKILL (its drop never runs then):
        // the kernel kills it when the thread that started it dies. Steps and inventory probes
        // keep their qemu-nbd on the thread that started it, and drop it before returning.
        // SAFETY: between fork and exec the closure only makes async-signal-safe calls
        // (prctl, getppid) and allocates nothing.
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before the prctl took effect.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other(
                        "the worker exited while starting qemu-nbd",
                    ));
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| Error::Tool {
            path: image.to_path_buf(),
            program: "qemu-nbd",
            message: format!("cannot run qemu-nbd: {e}"),
        })?;
        tracing::debug!(pid = child.id(), image = %abs.display(), "started qemu-nbd");
        Ok(QemuNbd {
            child: Some(child),
            _dir: dir,
            socket,
            log,
            image: image.to_path_buf(),
            opts: opts.clone(),
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Process id, while the process has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Connects a client, polling until the socket accepts or the start deadline passes. Fails
    /// early, with qemu-nbd's stderr, if the process exits.
    pub fn connect(&mut self, nbd: &ConnectOptions) -> Result<Client, Error> {
        let deadline = Instant::now() + self.opts.start_timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Err(self.tool_error(format!("qemu-nbd exited ({})", describe(status))));
            }
            match UnixStream::connect(&self.socket) {
                Ok(stream) => {
                    return Client::from_unix_stream(stream, nbd)
                        .map_err(|source| self.handshake_error(source));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => return Err(io_error(&self.socket, e)),
            }
            if Instant::now() >= deadline {
                return Err(self.tool_error(format!(
                    "qemu-nbd did not accept connections within {:?}",
                    self.opts.start_timeout
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// For a writable server whose client has disconnected: waits up to `timeout` for qemu-nbd
    /// to close the image and exit by itself, then reaps it. Falls back to [`QemuNbd::stop`].
    /// Anything but a successful exit is an error.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(), Error> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        match wait_until(child, timeout)? {
            Some(status) => {
                self.child = None;
                if status.success() {
                    Ok(())
                } else {
                    Err(self.tool_error(format!("qemu-nbd ended badly ({})", describe(status))))
                }
            }
            None => {
                tracing::warn!("qemu-nbd did not exit within {timeout:?} after the disconnect");
                self.stop()
            }
        }
    }

    /// Stops the server now: SIGTERM (on which qemu-nbd closes its image cleanly), then SIGKILL
    /// if it has not exited within a few seconds, and reaps it. A writable server must exit with
    /// success; a read-only one may also die of our SIGTERM.
    pub fn stop(&mut self) -> Result<(), Error> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let pid = child.id();
        if let Some(status) = child.try_wait().map_err(|e| io_error(&self.image, e))? {
            self.child = None;
            return if status.success() {
                Ok(())
            } else {
                Err(self.tool_error(format!("qemu-nbd ended badly ({})", describe(status))))
            };
        }
        signal(pid, libc::SIGTERM);
        let status = match wait_until(child, TERM_TIMEOUT)? {
            Some(s) => s,
            None => {
                tracing::warn!(pid, "qemu-nbd ignored SIGTERM; killing it");
                let _ = child.kill();
                child.wait().map_err(|e| io_error(&self.image, e))?
            }
        };
        self.child = None;
        let by_our_term = status.signal() == Some(libc::SIGTERM) && !self.opts.writable;
        if !(status.success() || by_our_term) {
            return Err(self.tool_error(format!("qemu-nbd ended badly ({})", describe(status))));
        }
        tracing::debug!(pid, "qemu-nbd stopped");
        Ok(())
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>, Error> {
        match self.child.as_mut() {
            Some(child) => {
                let status = child.try_wait().map_err(|e| io_error(&self.image, e))?;
                if status.is_some() {
                    self.child = None;
                }
                Ok(status)
            }
            None => Ok(Some(ExitStatus::from_raw(0))),
        }
    }

    /// qemu-nbd listens before it opens the image, so a connection can be accepted and then
    /// dropped when the open fails. If the process exits shortly after a failed handshake, its
    /// stderr is the real error.
    fn handshake_error(&mut self, source: nbd::Error) -> Error {
        if matches!(source, nbd::Error::Closed { .. } | nbd::Error::Io { .. }) {
            let exited = match self.child.as_mut() {
                Some(child) => wait_until(child, EXIT_AFTER_CLOSE).ok().flatten(),
                None => Some(ExitStatus::from_raw(0)),
            };
            if let Some(status) = exited {
                self.child = None;
                return self.tool_error(format!("qemu-nbd exited ({})", describe(status)));
            }
        }
        Error::Nbd {
            path: self.image.clone(),
            source,
        }
    }

    /// An error carrying the tail of qemu-nbd's stderr.
    fn tool_error(&self, what: String) -> Error {
        let stderr = read_log(&self.log);
        let message = if stderr.is_empty() {
            what
        } else {
            format!("{what}: {stderr}")
        };
        Error::Tool {
            path: self.image.clone(),
            program: "qemu-nbd",
            message,
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("{e}");
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child we have not reaped yet, so it cannot be recycled.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Polls `child` until it exits or `timeout` passes.
fn wait_until(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| io_error(Path::new("qemu-nbd"), e))?
        {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// The last 4 KiB of the log, trimmed, on one line.
fn read_log(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(f) = File::open(path) {
        let _ = f.take(1 << 20).read_to_string(&mut text);
    }
    let text = text.trim();
    let start = text.len().saturating_sub(4096);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].replace('\n', "; ")
}

/// A fresh 0700 directory under the temp dir, removed with everything in it on drop.
#[derive(Debug)]
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    fn new() -> std::io::Result<PrivateDir> {
        let base = std::env::temp_dir();
        for _ in 0..16 {
            let mut random = [0u8; 8];
            getrandom::getrandom(&mut random).map_err(|e| std::io::Error::other(e.to_string()))?;
            let path = base.join(format!("cairn-nbd-{}", hex::encode(random)));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PrivateDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other(
            "could not create a unique temporary directory",
        ))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
