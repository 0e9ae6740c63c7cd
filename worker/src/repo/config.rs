//! The repository config file `cairn-repo.json`: format version, chunk size, compression,
//! consolidation interval and, for an encrypted repository, the key salt and key check.
//!
//! The config is JSON so that an administrator can read it; it holds no secret. The key itself
//! lives in a key file outside the repository and is never written into it. A key file is read
//! only when its owner is the process's effective user and neither group nor others have any
//! permission on it ([`read_key_file`]).

use std::fs::DirBuilder;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::crypto::Keys;
use super::fsutil::{DIR_MODE, FILE_MODE, create_dirs, sync_dir, write_atomic};
use super::{Error, io_err};

pub const CONFIG_FILE: &str = "cairn-repo.json";
pub const FORMAT_NAME: &str = "cairn-repository";
pub const FORMAT_VERSION: u32 = 1;
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
pub const DEFAULT_FULL_EVERY: u32 = 8;
pub const DEFAULT_ZSTD_LEVEL: i32 = 2;

/// Encryption parameters stored in the config (no secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EncryptionConfig {
    /// `xchacha20poly1305+blake3-keyed`.
    pub scheme: String,
    /// Hex, 32 bytes: mixed into the key derivation so two repositories never share keys.
    pub salt: String,
    /// Hex, 32 bytes: a MAC of the repository id under the derived key; tells a wrong key.
    pub key_check: String,
}

/// The contents of `cairn-repo.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepoConfig {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub chunk_size: u32,
    pub zstd_level: i32,
    pub full_every: u32,
    pub encryption: Option<EncryptionConfig>,
}

/// Checks a chunk size: a power of two from 4 KiB to 16 MiB.
pub fn validate_chunk_size(chunk_size: u64) -> Result<u32, Error> {
    if chunk_size.is_power_of_two() && (4096..=16 * 1024 * 1024).contains(&chunk_size) {
        Ok(chunk_size as u32)
    } else {
        Err(Error::InvalidChunkSize(chunk_size))
    }
}

/// Creates a repository in `dir` (which must not exist or be empty). With `key_file`, the
/// repository is encrypted: the file is read when it exists (and refused unless only this
/// user can read it, see [`read_key_file`]), or created with 32 random bytes (hex, mode 0600)
/// when it does not. The key is read before anything is created, so a refused key leaves no
/// folder behind. The repository folder is made 0700 (an existing empty one is restricted to
/// 0700 before anything is put in it).
pub fn init(dir: &Path, chunk_size: u64, key_file: Option<&Path>) -> Result<RepoConfig, Error> {
    let chunk_size = validate_chunk_size(chunk_size)?;
    let exists = match std::fs::read_dir(dir) {
        Ok(entries) => {
            let names = entries
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(io_err(dir))?;
            match interrupted_init(&names) {
                Leftovers::None => {}
                Leftovers::OfInit => remove_init_leftovers(dir, &names)?,
                Leftovers::Other => return Err(Error::AlreadyExists { path: dir.into() }),
            }
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            return Err(Error::Io {
                path: dir.into(),
                source: e,
            });
        }
    };
    let secret = key_file.map(read_or_create_key_file).transpose()?;
    if exists {
        restrict_dir(dir)?;
    } else {
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        DirBuilder::new()
            .mode(DIR_MODE)
            .create(dir)
            .map_err(io_err(dir))?;
        if let Some(parent) = parent {
            sync_dir(parent)?;
        }
    }
    let id = uuid::Uuid::from_bytes(random_bytes::<16>())
        .hyphenated()
        .to_string();
    let encryption = secret.map(|secret| {
        let salt = random_bytes::<32>();
        let keys = Keys::derive(&secret, &salt);
        EncryptionConfig {
            scheme: "xchacha20poly1305+blake3-keyed".into(),
            salt: hex::encode(salt),
            key_check: hex::encode(keys.key_check(&id)),
        }
    });
    let config = RepoConfig {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        id,
        chunk_size,
        zstd_level: DEFAULT_ZSTD_LEVEL,
        full_every: DEFAULT_FULL_EVERY,
        encryption,
    };
    create_dirs(&dir.join("disks"))?;
    let json = serde_json::to_vec_pretty(&config).expect("config serialises");
    write_atomic(&dir.join(CONFIG_FILE), &json)?;
    Ok(config)
}

/// What a folder given to [`init`] already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leftovers {
    None,
    /// Only what an `init` interrupted by a crash leaves: `disks/` and temp files of the
    /// config. The config's rename is the moment a repository exists, so these are no
    /// repository yet and a new `init` may clear them.
    OfInit,
    /// Anything else: the folder is not cairn's to take.
    Other,
}

/// Classifies the entry names of a folder given to [`init`] (pure).
fn interrupted_init(names: &[String]) -> Leftovers {
    if names.is_empty() {
        return Leftovers::None;
    }
    let config_temp = format!(".{CONFIG_FILE}.");
    let of_init = names
        .iter()
        .all(|n| n == "disks" || (n.starts_with(&config_temp) && n.ends_with(".tmp")));
    if of_init {
        Leftovers::OfInit
    } else {
        Leftovers::Other
    }
}

/// Removes what an interrupted `init` left: its config temp files and `disks/`, which must
/// still be empty (a non-empty one is refused, and nothing is removed).
fn remove_init_leftovers(dir: &Path, names: &[String]) -> Result<(), Error> {
    let disks = dir.join("disks");
    if names.iter().any(|n| n == "disks")
        && std::fs::read_dir(&disks)
            .map_err(io_err(&disks))?
            .next()
            .is_some()
    {
        return Err(Error::AlreadyExists { path: dir.into() });
    }
    for name in names {
        let path = dir.join(name);
        if name == "disks" {
            std::fs::remove_dir(&path).map_err(io_err(&path))?;
        } else {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    sync_dir(dir)
}

/// Takes group and others' permissions off an existing, still empty folder that becomes a
/// repository.
fn restrict_dir(dir: &Path) -> Result<(), Error> {
    let mode = std::fs::metadata(dir).map_err(io_err(dir))?.mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o7700))
            .map_err(io_err(dir))?;
    }
    Ok(())
}

/// Reads and validates the config of the repository in `dir`, and derives the keys when the
/// repository is encrypted.
pub fn open(dir: &Path, key_file: Option<&Path>) -> Result<(RepoConfig, Keys), Error> {
    let config = load(dir)?;
    let path = dir.join(CONFIG_FILE);
    let corrupt = |reason: String| Error::CorruptConfig {
        path: path.clone(),
        reason,
    };
    let keys = match (&config.encryption, key_file) {
        (None, _) => Keys::plain(),
        (Some(_), None) => return Err(Error::KeyRequired { path: dir.into() }),
        (Some(enc), Some(key_file)) => {
            let salt = decode_hex32(&enc.salt)
                .ok_or_else(|| corrupt("salt is not 32 hex bytes".into()))?;
            let check = decode_hex32(&enc.key_check)
                .ok_or_else(|| corrupt("key_check is not 32 hex bytes".into()))?;
            let secret = read_key_file(key_file)?;
            let keys = Keys::derive(&secret, &salt);
            if keys.key_check(&config.id) != check {
                return Err(Error::WrongKey {
                    key_file: key_file.into(),
                    repo: dir.into(),
                });
            }
            keys
        }
    };
    Ok((config, keys))
}

/// Reads and validates the config of the repository in `dir`, without its key: enough to tell
/// whether it is encrypted.
pub fn load(dir: &Path) -> Result<RepoConfig, Error> {
    let path = dir.join(CONFIG_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !dir.exists() {
                return Err(Error::Io {
                    path: dir.into(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
                });
            }
            return Err(Error::NotARepository { path: dir.into() });
        }
        Err(e) => return Err(Error::Io { path, source: e }),
    };
    let corrupt = |reason: String| Error::CorruptConfig {
        path: path.clone(),
        reason,
    };
    let config: RepoConfig =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
    if config.format != FORMAT_NAME {
        return Err(corrupt(format!(
            "format is {:?}, expected {FORMAT_NAME:?}",
            config.format
        )));
    }
    if config.version != FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            path: dir.into(),
            version: config.version,
        });
    }
    validate_chunk_size(config.chunk_size as u64).map_err(|e| corrupt(e.to_string()))?;
    if !(1..=1000).contains(&config.full_every) {
        return Err(corrupt(format!(
            "full_every {} is outside 1..=1000",
            config.full_every
        )));
    }
    if !(-7..=22).contains(&config.zstd_level) {
        return Err(corrupt(format!(
            "zstd_level {} is outside -7..=22",
            config.zstd_level
        )));
    }
    Ok(config)
}

fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::getrandom(&mut buf).expect("the OS random source works");
    buf
}

/// The longest key file read; a key is 32 to a few hundred bytes.
const MAX_KEY_FILE_LEN: u64 = 64 * 1024;

/// Where a repository's key file is looked for when none is given: beside the repository
/// folder, named after it (`/backup/repo` → `/backup/repo.key`; `cairn up` keeps its key in
/// `DATA/repo.key`). `None` for a path without a final name (`/`, `.`, `..`).
pub fn default_key_file(dir: &Path) -> Option<PathBuf> {
    let mut name = dir.file_name()?.to_os_string();
    name.push(".key");
    Some(dir.with_file_name(name))
}

/// Reads a key file: a regular file of 32 to 64 KiB bytes (surrounding whitespace aside) that
/// only this process's user can read or change: owned by the effective uid, with no
/// permission for group or others. Anything else is refused with the fix in the message.
/// The checks are made on the opened file, so a file swapped in between cannot slip past.
pub fn read_key_file(path: &Path) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let bad = |reason: String| Error::BadKeyFile {
        path: path.into(),
        reason,
    };
    // Non-blocking, so a FIFO put in the key's place fails below instead of hanging.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| bad(e.to_string()))?;
    let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    check_key_file_access(path, meta.uid(), meta.mode())?;
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > MAX_KEY_FILE_LEN {
        return Err(bad(format!(
            "longer than {MAX_KEY_FILE_LEN} bytes; a key file holds one key"
        )));
    }
    let trimmed = bytes.trim_ascii();
    if trimmed.len() < 32 {
        return Err(bad(format!(
            "holds {} bytes; a key needs at least 32",
            trimmed.len()
        )));
    }
    Ok(trimmed.to_vec())
}

/// Refuses a key file owned by another user than the effective uid, or with any permission
/// bit for group or others.
fn check_key_file_access(path: &Path, owner: u32, mode: u32) -> Result<(), Error> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if owner != euid {
        return Err(Error::KeyFileOwner {
            path: path.into(),
            owner,
            euid,
        });
    }
    let mode = mode & 0o7777;
    if mode & 0o077 != 0 {
        let who = if mode & 0o004 != 0 {
            "readable by others"
        } else if mode & 0o040 != 0 {
            "readable by its group"
        } else {
            "writable by its group or others"
        };
        return Err(Error::KeyFileExposed {
            path: path.into(),
            mode,
            who,
        });
    }
    Ok(())
}

fn read_or_create_key_file(path: &Path) -> Result<Vec<u8>, Error> {
    use std::io::Write;
    let secret = hex::encode(random_bytes::<32>());
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return read_key_file(path),
        Err(e) => {
            return Err(Error::Io {
                path: path.into(),
                source: e,
            });
        }
    };
    file.write_all(format!("{secret}\n").as_bytes())
        .map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(secret.into_bytes())
}
