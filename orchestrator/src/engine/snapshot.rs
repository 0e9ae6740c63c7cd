//! Snapshots of the projections for fast start: `State` with its last applied sequence, in a
//! versioned, checksummed file. A snapshot that is missing, of another version or damaged is
//! ignored (the log is replayed from the start); it is never trusted over the log.
//!
//! Layout: `"CAIRNSNP"`, format version u8, postcard(`State`), BLAKE3 of everything before [32].

use std::path::Path;

use super::state::State;

const MAGIC: &[u8; 8] = b"CAIRNSNP";
const VERSION: u8 = 6;

pub fn encode(state: &State) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 << 16);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    let body = postcard::to_allocvec(state).expect("state serialises");
    out.extend_from_slice(&body);
    let hash = blake3::hash(&out);
    out.extend_from_slice(hash.as_bytes());
    out
}

/// Decodes a snapshot; `Err` says why it is not usable.
pub fn decode(bytes: &[u8]) -> Result<State, String> {
    if bytes.len() < MAGIC.len() + 1 + 32 || &bytes[..8] != MAGIC {
        return Err("not a cairn snapshot".into());
    }
    if bytes[8] != VERSION {
        return Err(format!(
            "snapshot format {} (this cairn reads {VERSION})",
            bytes[8]
        ));
    }
    let (body, hash) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != hash {
        return Err("checksum mismatch".into());
    }
    postcard::from_bytes(&body[9..]).map_err(|e| format!("does not decode: {e}"))
}

/// Writes a snapshot atomically (temp file, fsync, rename, fsync of the folder). The file is
/// created 0600: it holds the whole projected state (VMs, paths, the recovery point catalog).
pub fn save(path: &Path, state: &State) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = encode(state);
    let tmp = path.with_extension("tmp");
    // A leftover temp file of a crashed save goes first, so the new one gets the new mode.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Loads a usable snapshot, or `None` (with the reason logged).
pub fn load(path: &Path) -> Option<State> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the snapshot; replaying the whole log");
            return None;
        }
    };
    match decode(&bytes) {
        Ok(state) => Some(state),
        Err(reason) => {
            tracing::warn!(path = %path.display(), %reason, "ignoring the snapshot; replaying the whole log");
            None
        }
    }
}
