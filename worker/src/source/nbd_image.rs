//! qcow2, VHDX and VHD images as [`Source`]/[`Sink`]: a private qemu-nbd serves the image and our
//! NBD client reads (with `base:allocation` extents) and writes it. New images are made with
//! `qemu-img create`. Must not parse image formats itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::detect::check_qcow2;
use super::qemu_nbd::{EXPORT_NAME, QemuNbd, QemuNbdOptions};
use super::raw::{create_new, sync_parent_dir};
use super::{Error, Extent, ExtentKind, ImageFormat, Sink, Source, check_range, io_error};
use crate::nbd::{self, BASE_ALLOCATION, Client, ConnectOptions};

/// How long a writable qemu-nbd gets to close the image and exit after our disconnect.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) struct NbdImage {
    /// `None` only during drop. Disconnected before the server is stopped.
    client: Option<Client>,
    server: QemuNbd,
    path: PathBuf,
    format: ImageFormat,
    size: u64,
    writable: bool,
    /// Set by `create`: the new directory entry is made durable by the first `flush`.
    parent_unsynced: bool,
}

impl NbdImage {
    /// Serves `path` with qemu-nbd and connects to it.
    pub(crate) fn open(
        path: &Path,
        format: ImageFormat,
        writable: bool,
    ) -> Result<NbdImage, Error> {
        if format == ImageFormat::Qcow2 {
            check_qcow2(path)?;
        }
        let mut server = QemuNbd::start(path, &QemuNbdOptions::new(format, writable))?;
        let opts =
            ConnectOptions::new(EXPORT_NAME).with_meta_contexts([BASE_ALLOCATION.to_string()]);
        let client = server.connect(&opts)?;
        if writable && client.info().read_only() {
            return Err(Error::Invalid {
                path: path.to_path_buf(),
                reason: "qemu-nbd exported the image read-only".to_string(),
            });
        }
        Ok(NbdImage {
            size: client.size(),
            client: Some(client),
            server,
            path: path.to_path_buf(),
            format,
            writable,
            parent_unsynced: false,
        })
    }

    /// Creates a new image with `qemu-img create` (refusing to overwrite `path`) and opens it
    /// writable. On failure the new file is removed.
    pub(crate) fn create(path: &Path, format: ImageFormat, size: u64) -> Result<NbdImage, Error> {
        // Claim the name first so that a concurrent creator or an existing file makes us fail
        // instead of qemu-img overwriting it.
        drop(create_new(path)?);
        let result =
            qemu_img_create(path, format, size).and_then(|()| NbdImage::open(path, format, true));
        match result {
            Ok(mut image) => {
                image.parent_unsynced = true;
                Ok(image)
            }
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// Serves the open image `file` writable through its `/proc/<pid>/fd/<fd>` path, so
    /// qemu-nbd opens that inode whatever its name has become (`shown` for messages).
    pub(crate) fn open_on(
        file: &std::fs::File,
        shown: &Path,
        format: ImageFormat,
    ) -> Result<NbdImage, Error> {
        let mut image = NbdImage::open(&crate::safefs::proc_path(file), format, true)?;
        image.path = shown.to_path_buf();
        Ok(image)
    }

    /// Formats the new empty file `file` with `qemu-img create` (on its `/proc` path) and
    /// opens it writable as [`NbdImage::open_on`]. The caller made the file exclusively and
    /// removes it on failure.
    pub(crate) fn create_on(
        file: &std::fs::File,
        shown: &Path,
        format: ImageFormat,
        size: u64,
    ) -> Result<NbdImage, Error> {
        qemu_img_create_at(&crate::safefs::proc_path(file), shown, format, size)?;
        NbdImage::open_on(file, shown, format)
    }

    fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("client is only taken in drop")
    }

    fn nbd_error(&self, source: nbd::Error) -> Error {
        Error::Nbd {
            path: self.path.clone(),
            source,
        }
    }
}

/// `qemu-img create -f FMT PATH SIZE`: VHDX dynamic, VHD dynamic with the exact size (no CHS
/// rounding).
fn qemu_img_create(path: &Path, format: ImageFormat, size: u64) -> Result<(), Error> {
    let abs = std::fs::canonicalize(path).map_err(|e| io_error(path, e))?;
    qemu_img_create_at(&abs, path, format, size)
}

/// `qemu-img create` on the absolute path `abs` (`path` for messages).
fn qemu_img_create_at(
    abs: &Path,
    path: &Path,
    format: ImageFormat,
    size: u64,
) -> Result<(), Error> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", format.qemu_name()]);
    match format {
        ImageFormat::Vhdx => {
            cmd.args(["-o", "subformat=dynamic"]);
        }
        ImageFormat::Vpc => {
            cmd.args(["-o", "subformat=dynamic,force_size=on"]);
        }
        ImageFormat::Raw | ImageFormat::Qcow2 => {}
    }
    cmd.arg(abs).arg(size.to_string());
    let out = cmd.output().map_err(|e| Error::Tool {
        path: path.to_path_buf(),
        program: "qemu-img",
        message: format!("cannot run qemu-img: {e}"),
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Tool {
            path: path.to_path_buf(),
            program: "qemu-img",
            message: format!("create failed ({}): {}", out.status, stderr.trim()),
        });
    }
    Ok(())
}

impl Source for NbdImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        check_range(&self.path, self.size, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let status = self
            .client()
            .block_status(BASE_ALLOCATION, offset, len)
            .map_err(|e| self.nbd_error(e))?;
        let mut out: Vec<Extent> = Vec::with_capacity(status.len());
        for s in status {
            // Only NBD_STATE_ZERO promises zeros; a hole without it may read as anything.
            let kind = if s.flags & nbd::STATE_ZERO != 0 {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            };
            match out.last_mut() {
                Some(last) if last.kind == kind => last.len += s.len,
                _ => out.push(Extent {
                    offset: s.offset,
                    len: s.len,
                    kind,
                }),
            }
        }
        Ok(out)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        check_range(&self.path, self.size, offset, buf.len() as u64)?;
        self.client()
            .read_at(offset, buf)
            .map_err(|e| self.nbd_error(e))
    }

    fn describe(&self) -> String {
        format!("{} image {}", self.format, self.path.display())
    }
}

impl Sink for NbdImage {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        check_range(&self.path, self.size, offset, data.len() as u64)?;
        self.client()
            .write_at(offset, data)
            .map_err(|e| self.nbd_error(e))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        check_range(&self.path, self.size, offset, len)?;
        self.client()
            .write_zeroes(offset, len)
            .map_err(|e| self.nbd_error(e))
    }

    fn flush(&mut self) -> Result<(), Error> {
        self.client().flush().map_err(|e| self.nbd_error(e))?;
        if self.parent_unsynced {
            sync_parent_dir(&self.path)?;
            self.parent_unsynced = false;
        }
        Ok(())
    }
}

impl Drop for NbdImage {
    /// Flushes a writable image, disconnects, and lets qemu-nbd close the image and exit (or
    /// stops it). Errors can only be logged here; callers who care call `flush` first.
    fn drop(&mut self) {
        let Some(mut client) = self.client.take() else {
            return;
        };
        let mut clean = true;
        if self.writable
            && let Err(e) = client.flush()
        {
            tracing::warn!(path = %self.path.display(), "final NBD flush failed: {e}");
            clean = false;
        }
        if let Err(e) = client.disconnect() {
            tracing::warn!(path = %self.path.display(), "NBD disconnect failed: {e}");
            clean = false;
        }
        let stopped = if self.writable && clean {
            self.server.wait_exit(EXIT_TIMEOUT)
        } else {
            self.server.stop()
        };
        if let Err(e) = stopped {
            tracing::warn!("{e}");
        }
    }
}
