//! Signed checkpoints, pure: what one says, the bytes its signature covers, its file format
//! (JSON, version 1), and checking a signature against trusted public keys.
//!
//! A checkpoint says "the log's running digest at event `seq` was `digest`, and its chain was
//! keyed from `keyed_from`", signed with ed25519 by one orchestrator (`signer`, whose public
//! key has the id `key_id`). The signature covers a fixed binary form
//! ([`Checkpoint::signed_bytes`]), never the JSON text, so the file's layout may change
//! without invalidating signatures.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::keys::{hex, key_id, unhex};

/// The format version of checkpoint files this build writes and reads.
pub const CHECKPOINT_VERSION: u32 = 1;

/// What a checkpoint states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The last event covered.
    pub seq: u64,
    /// The running digest at `seq` ([`super::chain::RunningDigest`]).
    pub digest: [u8; 32],
    /// The first event whose link is keyed (`None`: the log was unkeyed).
    pub keyed_from: Option<u64>,
    /// When it was made, Unix milliseconds (the signer's clock).
    pub time_ms: u64,
    /// The orchestrator that signed it.
    pub signer: String,
    /// The id of the signer's public key ([`key_id`]).
    pub key_id: String,
}

/// A checkpoint with its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    pub checkpoint: Checkpoint,
    pub signature: [u8; 64],
}

/// A public key trusted to sign checkpoints, with the signer name it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub signer: String,
    pub key: VerifyingKey,
}

impl TrustedKey {
    /// Its id ([`key_id`]).
    pub fn id(&self) -> String {
        key_id(&self.key)
    }
}

/// The JSON form of a checkpoint file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointFile {
    version: u32,
    seq: u64,
    digest: String,
    keyed_from: Option<u64>,
    time_ms: u64,
    signer: String,
    key_id: String,
    signature: String,
}

/// Whether a signer name is acceptable: 1-64 of `a-z A-Z 0-9 - _ .`, not starting with a dot
/// (it becomes part of file names).
pub fn valid_signer(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Checkpoint {
    /// The bytes the signature covers: a domain tag, then every field in a fixed order.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(b"cairn-audit-checkpoint/1\0");
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&self.keyed_from.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&self.time_ms.to_be_bytes());
        out.extend_from_slice(&(self.signer.len() as u64).to_be_bytes());
        out.extend_from_slice(self.signer.as_bytes());
        out.extend_from_slice(&(self.key_id.len() as u64).to_be_bytes());
        out.extend_from_slice(self.key_id.as_bytes());
        out
    }

    /// Signs it with `key` (its `key_id` should be that key's).
    pub fn sign(self, key: &SigningKey) -> SignedCheckpoint {
        let signature = key.sign(&self.signed_bytes()).to_bytes();
        SignedCheckpoint {
            checkpoint: self,
            signature,
        }
    }
}

impl SignedCheckpoint {
    /// The file's bytes (JSON and a newline).
    pub fn to_file(&self) -> Vec<u8> {
        let c = &self.checkpoint;
        let file = CheckpointFile {
            version: CHECKPOINT_VERSION,
            seq: c.seq,
            digest: hex(&c.digest),
            keyed_from: c.keyed_from,
            time_ms: c.time_ms,
            signer: c.signer.clone(),
            key_id: c.key_id.clone(),
            signature: hex(&self.signature),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// Parses a file's bytes; the error says what is malformed. Says nothing about the
    /// signature: see [`SignedCheckpoint::check`].
    pub fn from_file(bytes: &[u8]) -> Result<Self, String> {
        let file: CheckpointFile = serde_json::from_slice(bytes)
            .map_err(|err| format!("it is not a checkpoint: {err}"))?;
        if file.version != CHECKPOINT_VERSION {
            return Err(format!(
                "it is a version {} checkpoint, this build reads version {CHECKPOINT_VERSION}",
                file.version
            ));
        }
        let digest = unhex::<32>(&file.digest)
            .ok_or_else(|| "its digest is not 64 hex digits".to_string())?;
        let signature = unhex::<64>(&file.signature)
            .ok_or_else(|| "its signature is not 128 hex digits".to_string())?;
        if !valid_signer(&file.signer) {
            return Err(format!("its signer {:?} is not a valid name", file.signer));
        }
        Ok(SignedCheckpoint {
            checkpoint: Checkpoint {
                seq: file.seq,
                digest,
                keyed_from: file.keyed_from,
                time_ms: file.time_ms,
                signer: file.signer,
                key_id: file.key_id,
            },
            signature,
        })
    }

    /// Checks the signature against the trusted keys: the key with the checkpoint's id must be
    /// trusted, belong to the checkpoint's signer, and verify the signature (strictly).
    pub fn check(&self, trusted: &[TrustedKey]) -> Result<(), String> {
        let c = &self.checkpoint;
        let Some(key) = trusted.iter().find(|key| key.id() == c.key_id) else {
            return Err(format!(
                "it is signed by key {} (signer {:?}), which is not trusted",
                c.key_id, c.signer
            ));
        };
        if key.signer != c.signer {
            return Err(format!(
                "it names signer {:?}, but key {} belongs to {:?}",
                c.signer, c.key_id, key.signer
            ));
        }
        key.key
            .verify_strict(&c.signed_bytes(), &Signature::from_bytes(&self.signature))
            .map_err(|_| {
                format!(
                    "its signature does not verify with {}'s key {}",
                    key.signer, c.key_id
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> (SigningKey, TrustedKey) {
        let key = SigningKey::from_bytes(&[3; 32]);
        let trusted = TrustedKey {
            signer: "ctl-01".into(),
            key: key.verifying_key(),
        };
        (key, trusted)
    }

    fn checkpoint(trusted: &TrustedKey) -> Checkpoint {
        Checkpoint {
            seq: 1000,
            digest: [9; 32],
            keyed_from: Some(1),
            time_ms: 1_700_000_000_000,
            signer: "ctl-01".into(),
            key_id: trusted.id(),
        }
    }

    #[test]
    fn a_signed_checkpoint_round_trips_and_verifies() {
        let (key, trusted) = signer();
        let signed = checkpoint(&trusted).sign(&key);
        let parsed = SignedCheckpoint::from_file(&signed.to_file()).unwrap();
        assert_eq!(parsed, signed);
        parsed.check(std::slice::from_ref(&trusted)).unwrap();
    }

    #[test]
    fn a_changed_field_or_an_unknown_key_fails_the_check() {
        let (key, trusted) = signer();
        let trusted = vec![trusted];
        let signed = checkpoint(&trusted[0]).sign(&key);
        type Change = Box<dyn Fn(&mut Checkpoint)>;
        let mut changes: Vec<(&str, Change)> = vec![
            ("seq", Box::new(|c| c.seq += 1)),
            ("digest", Box::new(|c| c.digest[0] ^= 1)),
            ("keyed_from", Box::new(|c| c.keyed_from = None)),
            ("time", Box::new(|c| c.time_ms += 1)),
        ];
        for (what, change) in changes.drain(..) {
            let mut forged = signed.clone();
            change(&mut forged.checkpoint);
            let err = forged.check(&trusted).unwrap_err();
            assert!(err.contains("does not verify"), "{what}: {err}");
        }
        let mut renamed = signed.clone();
        renamed.checkpoint.signer = "ctl-02".into();
        assert!(renamed.check(&trusted).unwrap_err().contains("belongs to"));
        let stranger = SigningKey::from_bytes(&[4; 32]);
        let mut foreign = checkpoint(&trusted[0]);
        foreign.key_id = key_id(&stranger.verifying_key());
        let err = foreign.sign(&stranger).check(&trusted).unwrap_err();
        assert!(err.contains("not trusted"), "{err}");
        // A checkpoint made with the attacker's key but naming the trusted key id.
        let err = checkpoint(&trusted[0])
            .sign(&stranger)
            .check(&trusted)
            .unwrap_err();
        assert!(err.contains("does not verify"), "{err}");
    }

    #[test]
    fn malformed_files_are_named() {
        let (key, trusted) = signer();
        let good = String::from_utf8(checkpoint(&trusted).sign(&key).to_file()).unwrap();
        for (text, detail) in [
            ("not json".to_string(), "not a checkpoint"),
            (
                good.replace("\"version\": 1", "\"version\": 2"),
                "version 2",
            ),
            (
                good.replace("\"signer\": \"ctl-01\"", "\"signer\": \"../x\""),
                "not a valid name",
            ),
            (
                good.replace("\"digest\": \"09", "\"digest\": \"zz"),
                "digest",
            ),
        ] {
            let err = SignedCheckpoint::from_file(text.as_bytes()).unwrap_err();
            assert!(err.contains(detail), "{text}: {err}");
        }
    }

    #[test]
    fn signer_names() {
        assert!(valid_signer("ctl-01"));
        assert!(valid_signer("local.host_1"));
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_signer(bad), "{bad:?}");
        }
    }
}
