//! The audit key files: the shared audit key that keys the log's hash chain, and each
//! orchestrator's checkpoint signing key.
//!
//! Both are files of 64 hex digits (32 bytes) and a newline, created `O_EXCL` with mode 0600,
//! fsynced with their folder. Reading one refuses a file that is missing, owned by another user
//! than the one running cairn, open to group or others, or not exactly 32 bytes of hex: a
//! refusal says which file and why, and changes nothing.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};

/// Errors of reading or creating a key file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No file at the path.
    #[error("{what} {path} does not exist ({hint})")]
    Missing {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    /// Group or others may read (or write) it.
    #[error(
        "{what} {path} is open to group or others (mode {mode:04o}); it was not used: make it \
         private with `chmod 600 {path}`"
    )]
    Exposed {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    /// Owned by another user.
    #[error("{what} {path} is owned by uid {owner}, not by the user running cairn (uid {euid})")]
    ForeignOwner {
        what: &'static str,
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    /// Not a regular file.
    #[error("{what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
    /// Its content is not 32 bytes of hex.
    #[error("{what} {path} must hold 64 hex digits (a 32-byte key) and a newline: {detail}")]
    Malformed {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    /// A key file to create exists already.
    #[error("{what} {path} exists already; it was left as it is")]
    Exists { what: &'static str, path: PathBuf },
    /// Reading, writing or syncing failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// No randomness for a new key.
    #[error("no randomness for a new {what}: {detail}")]
    Random { what: &'static str, detail: String },
}

/// The audit key: 32 secret bytes shared by the orchestrators of one log. The chain's links
/// are keyed BLAKE3 (`blake3::keyed_hash`) with it.
#[derive(Clone, PartialEq, Eq)]
pub struct AuditKey([u8; 32]);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(..)")
    }
}

impl AuditKey {
    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key's bytes (for `blake3::keyed_hash`).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

const AUDIT_KEY: &str = "audit key file";
const SIGNING_KEY: &str = "checkpoint signing key file";
const AUDIT_HINT: &str = "create one with `cairn ops audit-key --out FILE`; every orchestrator \
                          of one log needs the same file";
const SIGNING_HINT: &str = "`cairn orchestrator` and `cairn up` create one at their first start";

/// Reads the audit key from `path`, refusing an unsafe or malformed file.
pub fn read_audit_key(path: &Path) -> Result<AuditKey, Error> {
    read_key(path, AUDIT_KEY, AUDIT_HINT).map(AuditKey)
}

/// Reads a checkpoint signing key (an ed25519 secret key) from `path`.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, Error> {
    read_key(path, SIGNING_KEY, SIGNING_HINT).map(|seed| SigningKey::from_bytes(&seed))
}

/// Creates a new random audit key file at `path` (refused if it exists).
pub fn create_audit_key(path: &Path) -> Result<AuditKey, Error> {
    let bytes = random_key(AUDIT_KEY)?;
    write_key_file(path, AUDIT_KEY, &bytes)?;
    Ok(AuditKey(bytes))
}

/// Creates a new random signing key file at `path` (refused if it exists).
pub fn create_signing_key(path: &Path) -> Result<SigningKey, Error> {
    let bytes = random_key(SIGNING_KEY)?;
    write_key_file(path, SIGNING_KEY, &bytes)?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// The audit key at `path`, created there first if no file exists. `true` when created.
pub fn ensure_audit_key(path: &Path) -> Result<(AuditKey, bool), Error> {
    if exists(path, AUDIT_KEY)? {
        return read_audit_key(path).map(|key| (key, false));
    }
    create_audit_key(path).map(|key| (key, true))
}

/// The signing key at `path`, created there first if no file exists. `true` when created.
pub fn ensure_signing_key(path: &Path) -> Result<(SigningKey, bool), Error> {
    if exists(path, SIGNING_KEY)? {
        return read_signing_key(path).map(|key| (key, false));
    }
    create_signing_key(path).map(|key| (key, true))
}

/// The short id of a public key: the first 8 bytes of its BLAKE3 hash, in hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex(&blake3::hash(key.as_bytes()).as_bytes()[..8])
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from hex; `None` unless the text is exactly `N` bytes of hex.
pub fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (idx, pair) in text.chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[idx] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

fn exists(path: &Path, what: &'static str) -> Result<bool, Error> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::Io {
            what,
            path: path.to_owned(),
            source,
        }),
    }
}

fn random_key(what: &'static str) -> Result<[u8; 32], Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|err| Error::Random {
        what,
        detail: err.to_string(),
    })?;
    Ok(bytes)
}

fn read_key(path: &Path, what: &'static str, hint: &'static str) -> Result<[u8; 32], Error> {
    let io = |source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Missing {
                what,
                path: path.to_owned(),
                hint,
            });
        }
        Err(err) => return Err(io(err)),
    };
    if !meta.is_file() {
        return Err(Error::NotAFile {
            what,
            path: path.to_owned(),
        });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(Error::ForeignOwner {
            what,
            path: path.to_owned(),
            owner: meta.uid(),
            euid,
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::Exposed {
            what,
            path: path.to_owned(),
            mode,
        });
    }
    // A key file is 65 bytes; read a little more so that a longer one is named as such.
    let mut text = Vec::new();
    use std::io::Read;
    std::fs::File::open(path)
        .map_err(io)?
        .take(4096)
        .read_to_end(&mut text)
        .map_err(io)?;
    parse_key(&text).map_err(|detail| Error::Malformed {
        what,
        path: path.to_owned(),
        detail,
    })
}

/// The 32 bytes of a key file's content (pure).
fn parse_key(content: &[u8]) -> Result<[u8; 32], String> {
    let text = std::str::from_utf8(content).map_err(|_| "it is not text".to_string())?;
    let digits = text.strip_suffix('\n').unwrap_or(text);
    if digits.len() != 64 {
        return Err(format!("it holds {} characters", digits.len()));
    }
    unhex::<32>(digits).ok_or_else(|| "it holds characters that are not hex digits".to_string())
}

fn write_key_file(path: &Path, what: &'static str, bytes: &[u8; 32]) -> Result<(), Error> {
    let io = |source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::Exists {
                what,
                path: path.to_owned(),
            });
        }
        Err(err) => return Err(io(err)),
    };
    file.write_all(format!("{}\n", hex(bytes)).as_bytes())
        .map_err(io)?;
    file.sync_all().map_err(io)?;
    sync_parent(path).map_err(io)
}

/// Fsyncs the folder holding `path`, so that a new entry in it is durable.
pub(crate) fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_content_is_64_hex_digits_and_an_optional_newline() {
        let good = format!("{}\n", "ab".repeat(32));
        assert_eq!(parse_key(good.as_bytes()).unwrap(), [0xab; 32]);
        assert_eq!(parse_key("cd".repeat(32).as_bytes()).unwrap(), [0xcd; 32]);
        for (content, detail) in [
            ("ab".repeat(31), "it holds 62 characters"),
            ("ab".repeat(33), "it holds 66 characters"),
            (String::new(), "it holds 0 characters"),
            (format!("{}zz", "ab".repeat(31)), "not hex digits"),
            (format!("{}\n\n", "ab".repeat(32)), "it holds 65 characters"),
        ] {
            let err = parse_key(content.as_bytes()).unwrap_err();
            assert!(err.contains(detail), "{content:?}: {err}");
        }
        assert_eq!(parse_key(&[0xff; 64]).unwrap_err(), "it is not text");
    }

    #[test]
    fn key_files_are_created_private_and_refused_when_unsafe() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        let (key, created) = ensure_audit_key(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, created) = ensure_audit_key(&path).unwrap();
        assert!(!created);
        assert_eq!(again, key);
        assert!(matches!(create_audit_key(&path), Err(Error::Exists { .. })));
        assert_eq!(read_audit_key(&path).unwrap(), key);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_audit_key(&path).unwrap_err();
        assert!(matches!(err, Error::Exposed { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        // A refused file is left as it is.
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);

        let missing = dir.path().join("nothing.key");
        let err = read_audit_key(&missing).unwrap_err();
        assert!(matches!(err, Error::Missing { .. }), "{err}");
        assert!(err.to_string().contains("cairn ops audit-key"), "{err}");
        assert!(!missing.exists());

        let short = dir.path().join("short.key");
        std::fs::write(&short, "abcd\n").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = read_audit_key(&short).unwrap_err();
        assert!(matches!(err, Error::Malformed { .. }), "{err}");
        assert!(err.to_string().contains("it holds 4 characters"), "{err}");

        let err = read_audit_key(dir.path()).unwrap_err();
        assert!(matches!(err, Error::NotAFile { .. }), "{err}");
    }

    #[test]
    fn signing_keys_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.key");
        let (key, created) = ensure_signing_key(&path).unwrap();
        assert!(created);
        let read = read_signing_key(&path).unwrap();
        assert_eq!(read.to_bytes(), key.to_bytes());
        assert_eq!(key_id(&read.verifying_key()).len(), 16);
    }
}
