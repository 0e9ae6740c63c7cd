//! The repository config file `cairn-repo.json`: format version, chunk size, compression,
//! consolidation interval and, for an encrypted repository, the key salt and key check.
//!
//! The config is JSON so that an administrator can read it; it holds no secret. The key itself
//! lives in a key file outside the repository and is never written into it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::crypto::Keys;
use super::fsutil::{sync_dir, write_atomic};
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
/// repository is encrypted: the file is read when it exists, or created with 32 random bytes
/// (hex, mode 0600) when it does not.
pub fn init(dir: &Path, chunk_size: u64, key_file: Option<&Path>) -> Result<RepoConfig, Error> {
    let chunk_size = validate_chunk_size(chunk_size)?;
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::AlreadyExists { path: dir.into() });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        Err(e) => {
            return Err(Error::Io {
                path: dir.into(),
                source: e,
            });
        }
    }
    let id = uuid::Uuid::from_bytes(random_bytes::<16>())
        .hyphenated()
        .to_string();
    let encryption = match key_file {
        None => None,
        Some(key_file) => {
            let secret = read_or_create_key_file(key_file)?;
            let salt = random_bytes::<32>();
            let keys = Keys::derive(&secret, &salt);
            Some(EncryptionConfig {
                scheme: "xchacha20poly1305+blake3-keyed".into(),
                salt: hex::encode(salt),
                key_check: hex::encode(keys.key_check(&id)),
            })
        }
    };
    let config = RepoConfig {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        id,
        chunk_size,
        zstd_level: DEFAULT_ZSTD_LEVEL,
        full_every: DEFAULT_FULL_EVERY,
        encryption,
    };
    std::fs::create_dir_all(dir.join("disks")).map_err(io_err(dir.join("disks")))?;
    let json = serde_json::to_vec_pretty(&config).expect("config serialises");
    write_atomic(&dir.join(CONFIG_FILE), &json)?;
    Ok(config)
}

/// Reads and validates the config of the repository in `dir`, and derives the keys when the
/// repository is encrypted.
pub fn open(dir: &Path, key_file: Option<&Path>) -> Result<(RepoConfig, Keys), Error> {
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

fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::getrandom(&mut buf).expect("the OS random source works");
    buf
}

fn read_key_file(path: &Path) -> Result<Vec<u8>, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::BadKeyFile {
        path: PathBuf::from(path),
        reason: e.to_string(),
    })?;
    let trimmed = bytes.trim_ascii();
    if trimmed.len() < 32 {
        return Err(Error::BadKeyFile {
            path: path.into(),
            reason: format!("holds {} bytes; a key needs at least 32", trimmed.len()),
        });
    }
    Ok(trimmed.to_vec())
}

fn read_or_create_key_file(path: &Path) -> Result<Vec<u8>, Error> {
    if path.exists() {
        return read_key_file(path);
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let secret = hex::encode(random_bytes::<32>());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(format!("{secret}\n").as_bytes())
        .map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    Ok(secret.into_bytes())
}
