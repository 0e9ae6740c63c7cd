//! The two digests of the audit trail, pure.
//!
//! - A **link** is what an event's `prev_hash` holds about the event before it: the keyed
//!   BLAKE3 MAC of its stored bytes under the audit key (`blake3::keyed_hash`), or, for the
//!   links of a log written before it had a key, the plain BLAKE3 hash. Only a holder of the
//!   key can make keyed links, so a rewrite without it fails the chain.
//! - The **running digest** covers every event of the log in log order:
//!   `D(0) = 0`, `D(n) = BLAKE3("cairn-audit-digest/1" ‖ D(n-1) ‖ seq ‖ BLAKE3(bytes))`. It
//!   does not depend on the key or on how the chain is cut (one chain per log in sled, per
//!   aggregate in JetStream), so every orchestrator of a log computes the same value at the
//!   same sequence number; signed checkpoints record it.

use super::keys::AuditKey;

/// The link to an event with these stored bytes: keyed when `key` is given.
pub fn link_hash(key: Option<&AuditKey>, bytes: &[u8]) -> [u8; 32] {
    match key {
        Some(key) => *blake3::keyed_hash(key.as_bytes(), bytes).as_bytes(),
        None => *blake3::hash(bytes).as_bytes(),
    }
}

/// Whether the link held by event `seq` must be keyed, for a log keyed from `keyed_from`.
pub fn link_is_keyed(keyed_from: Option<u64>, seq: u64) -> bool {
    keyed_from.is_some_and(|from| seq >= from)
}

/// The running digest of the log up to (and including) event `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunningDigest {
    /// The last event covered (0 = none).
    pub seq: u64,
    /// `D(seq)`.
    pub digest: [u8; 32],
    /// How many events it covers (sequence numbers need not be consecutive).
    pub events: u64,
}

impl RunningDigest {
    /// The digest of the empty log.
    pub const EMPTY: RunningDigest = RunningDigest {
        seq: 0,
        digest: [0; 32],
        events: 0,
    };

    /// Covers one more event, whose stored bytes hash (plain BLAKE3) to `event_hash`.
    pub fn push(&mut self, seq: u64, event_hash: &[u8; 32]) {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"cairn-audit-digest/1");
        hasher.update(&self.digest);
        hasher.update(&seq.to_be_bytes());
        hasher.update(event_hash);
        self.digest = *hasher.finalize().as_bytes();
        self.seq = seq;
        self.events += 1;
    }

    /// Covers one more event with these stored bytes.
    pub fn push_bytes(&mut self, seq: u64, bytes: &[u8]) {
        self.push(seq, blake3::hash(bytes).as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_keyed_only_with_a_key_and_differ_by_key() {
        let key = AuditKey::from_bytes([7; 32]);
        let other = AuditKey::from_bytes([8; 32]);
        let plain = link_hash(None, b"event");
        assert_eq!(plain, *blake3::hash(b"event").as_bytes());
        let keyed = link_hash(Some(&key), b"event");
        assert_ne!(keyed, plain);
        assert_ne!(keyed, link_hash(Some(&other), b"event"));
        assert!(!link_is_keyed(None, 5));
        assert!(!link_is_keyed(Some(6), 5));
        assert!(link_is_keyed(Some(5), 5));
    }

    #[test]
    fn the_running_digest_depends_on_every_event_and_its_place() {
        let mut a = RunningDigest::EMPTY;
        let mut b = RunningDigest::EMPTY;
        a.push_bytes(1, b"one");
        a.push_bytes(2, b"two");
        b.push_bytes(1, b"one");
        b.push_bytes(3, b"two");
        assert_ne!(a.digest, b.digest, "sequence numbers count");
        let mut c = RunningDigest::EMPTY;
        c.push_bytes(1, b"onE");
        c.push_bytes(2, b"two");
        assert_ne!(a.digest, c.digest, "an earlier change carries on");
        let mut d = RunningDigest::EMPTY;
        d.push_bytes(1, b"one");
        d.push_bytes(2, b"two");
        assert_eq!(a, d);
        assert_eq!(a.seq, 2);
    }
}
