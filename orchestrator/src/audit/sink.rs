//! The folder sink of checkpoints: one file per checkpoint, `SEQ-SIGNER.json` (the sequence
//! zero-padded to 20 digits, so names sort in log order), created `O_EXCL` with mode 0600,
//! fsynced, and the folder fsynced, before the checkpoint counts as written. Signers' public
//! keys are in `keys/SIGNER.pub` (64 hex digits), published by each writer at its start.
//!
//! The folder is meant to lie outside the reach of whoever can write the event log (another
//! machine's mount, a folder only the orchestrator's user may add to, storage with retention
//! locks); the sink never deletes or rewrites a file.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;

use super::checkpoint::{SignedCheckpoint, TrustedKey, valid_signer};
use super::keys::{hex, sync_parent, unhex};

/// Errors of the folder sink.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the folder failed.
    #[error("checkpoint folder {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The sink already lists another public key for this signer.
    #[error(
        "checkpoint folder {path} already trusts another key for signer {signer:?}; give this \
         orchestrator another name, or move the old key file away if the key was replaced on \
         purpose"
    )]
    KeyConflict { path: PathBuf, signer: String },
    /// A signer name that cannot be a file name.
    #[error(
        "signer name {0:?} is not valid: use 1-64 of a-z A-Z 0-9 - _ . (not starting with a dot)"
    )]
    BadSigner(String),
}

/// A file of the sink that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub file: String,
    pub reason: String,
}

/// Everything the sink holds, parsed (signatures not checked yet).
#[derive(Debug, Default)]
pub struct SinkContents {
    /// Checkpoints that parse, with their file names, in file name order.
    pub checkpoints: Vec<(String, SignedCheckpoint)>,
    /// Public keys listed in `keys/`.
    pub keys: Vec<TrustedKey>,
    /// Files that do not parse.
    pub rejected: Vec<Rejected>,
}

/// A checkpoint folder.
#[derive(Debug, Clone)]
pub struct FolderSink {
    dir: PathBuf,
}

impl FolderSink {
    /// The sink in `dir` (nothing is touched until it is used).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Its folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    }

    /// Makes the folder and its `keys/` (0700) if missing.
    pub fn create(&self) -> Result<(), Error> {
        for dir in [self.dir.clone(), self.dir.join("keys")] {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .map_err(self.io(&dir))?;
                sync_parent(&dir).map_err(self.io(&dir))?;
            }
        }
        Ok(())
    }

    /// Lists `key` as `signer`'s public key; already listed is fine, another key for the
    /// same signer is refused.
    pub fn publish_key(&self, signer: &str, key: &VerifyingKey) -> Result<(), Error> {
        if !valid_signer(signer) {
            return Err(Error::BadSigner(signer.to_owned()));
        }
        self.create()?;
        let path = self.dir.join("keys").join(format!("{signer}.pub"));
        let content = format!("{}\n", hex(key.as_bytes()));
        match std::fs::read(&path) {
            Ok(existing) if existing == content.as_bytes() => return Ok(()),
            Ok(_) => {
                return Err(Error::KeyConflict {
                    path: self.dir.clone(),
                    signer: signer.to_owned(),
                });
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(self.io(&path)(err)),
        }
        write_new(&path, content.as_bytes())
            .map(|_| ())
            .map_err(self.io(&path))
    }

    /// Writes a checkpoint as a new file; `Ok(false)` if this signer's checkpoint of that
    /// sequence exists already (it is left as it is). Durable when it returns.
    pub fn write(&self, checkpoint: &SignedCheckpoint) -> Result<bool, Error> {
        let c = &checkpoint.checkpoint;
        if !valid_signer(&c.signer) {
            return Err(Error::BadSigner(c.signer.clone()));
        }
        self.create()?;
        let path = self.dir.join(file_name(c.seq, &c.signer));
        write_new(&path, &checkpoint.to_file()).map_err(self.io(&path))
    }

    /// Reads every checkpoint and key of the folder (a missing folder holds nothing).
    pub fn read(&self) -> Result<SinkContents, Error> {
        let mut contents = SinkContents::default();
        let mut names = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries
                .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(self.io(&self.dir))?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(contents),
            Err(err) => return Err(self.io(&self.dir)(err)),
        };
        names.sort();
        for name in names {
            if name == "keys" || name.starts_with('.') {
                continue;
            }
            let path = self.dir.join(&name);
            let reject = |reason: String| Rejected {
                file: name.clone(),
                reason,
            };
            if !name.ends_with(".json") {
                contents
                    .rejected
                    .push(reject("it is not a checkpoint file (NAME.json)".into()));
                continue;
            }
            let bytes = match read_small(&path) {
                Ok(bytes) => bytes,
                Err(reason) => {
                    contents.rejected.push(reject(reason));
                    continue;
                }
            };
            match SignedCheckpoint::from_file(&bytes) {
                Ok(signed) => {
                    let c = &signed.checkpoint;
                    if name != file_name(c.seq, &c.signer) {
                        contents.rejected.push(reject(format!(
                            "its name does not match its content (event {}, signer {})",
                            c.seq, c.signer
                        )));
                    } else {
                        contents.checkpoints.push((name, signed));
                    }
                }
                Err(reason) => contents.rejected.push(reject(reason)),
            }
        }
        let keys_dir = self.dir.join("keys");
        let mut key_names = match std::fs::read_dir(&keys_dir) {
            Ok(entries) => entries
                .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(self.io(&keys_dir))?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => return Err(self.io(&keys_dir)(err)),
        };
        key_names.sort();
        for name in key_names {
            let file = format!("keys/{name}");
            match read_public_key(&keys_dir.join(&name), &name) {
                Ok(key) => contents.keys.push(key),
                Err(reason) => contents.rejected.push(Rejected { file, reason }),
            }
        }
        Ok(contents)
    }
}

/// `SEQ-SIGNER.json`.
pub fn file_name(seq: u64, signer: &str) -> String {
    format!("{seq:020}-{signer}.json")
}

/// Reads a public key file `SIGNER.pub` (64 hex digits and a newline).
pub fn read_public_key(path: &Path, name: &str) -> Result<TrustedKey, String> {
    let Some(signer) = name.strip_suffix(".pub").filter(|s| valid_signer(s)) else {
        return Err("it is not a public key file (SIGNER.pub)".into());
    };
    let bytes = read_small(path)?;
    let text = String::from_utf8_lossy(&bytes);
    let key =
        unhex::<32>(text.trim_end()).ok_or_else(|| "it does not hold 64 hex digits".to_string())?;
    let key = VerifyingKey::from_bytes(&key)
        .map_err(|_| "it does not hold a valid ed25519 public key".to_string())?;
    Ok(TrustedKey {
        signer: signer.to_owned(),
        key,
    })
}

/// A file's bytes, at most 64 KiB (checkpoints and keys are far smaller).
fn read_small(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(64 * 1024 + 1).read_to_end(&mut bytes))
        .map_err(|err| format!("it cannot be read: {err}"))?;
    if bytes.len() > 64 * 1024 {
        return Err("it is larger than 64 KiB".into());
    }
    Ok(bytes)
}

/// Creates `path` with `bytes` (O_EXCL, 0600), fsyncs it and its folder. `Ok(false)` if it
/// exists.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(err) => return Err(err),
    };
    file.write_all(bytes)?;
    file.sync_all()?;
    sync_parent(path)?;
    Ok(true)
}
