//! `Idempotency-Key`: a client's name for one request, so that sending it again (after a
//! timeout, through a retrying proxy, to another orchestrator) does not do it twice.
//!
//! The key becomes the command's id: a keyed BLAKE3 hash of the principal's actor and the
//! key, shaped as a UUID v7 (its "time" bits are hash bits). The same principal sending the
//! same key makes the same command id, which the engine answers once and replays after; two
//! principals' keys never meet. Pure.

use cairn_schemas::CommandId;

/// The header's name.
pub const HEADER: &str = "idempotency-key";
/// Longest key accepted, in bytes.
pub const MAX_LEN: usize = 255;

/// Why an `Idempotency-Key` header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the Idempotency-Key header is empty")]
    Empty,
    #[error("the Idempotency-Key header is {0} bytes long; at most {MAX_LEN} are allowed")]
    TooLong(usize),
    #[error(
        "the Idempotency-Key header may hold only visible ASCII characters (no spaces or \
         control characters)"
    )]
    BadCharacter,
    #[error("the Idempotency-Key header is sent more than once")]
    Repeated,
}

/// Checks a key's text.
pub fn check(key: &[u8]) -> Result<&str, KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_LEN {
        return Err(KeyError::TooLong(key.len()));
    }
    if !key.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(KeyError::BadCharacter);
    }
    Ok(std::str::from_utf8(key).expect("visible ASCII is UTF-8"))
}

/// The command id of `actor`'s request with `key`.
pub fn command_id(actor: &str, key: &str) -> CommandId {
    let mut hasher = blake3::Hasher::new_derive_key("cairn 2026 idempotency key to command id");
    hasher.update(&(actor.len() as u64).to_le_bytes());
    hasher.update(actor.as_bytes());
    hasher.update(key.as_bytes());
    let hash = hasher.finalize();
    let bytes = hash.as_bytes();
    let millis = bytes[..6]
        .iter()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    let mut rand = [0u8; 10];
    rand.copy_from_slice(&bytes[6..16]);
    CommandId::new_v7(millis, rand)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_key_of_the_same_actor_is_the_same_command() {
        let a = command_id("user:alice (token 1)", "retry-me");
        assert_eq!(a, command_id("user:alice (token 1)", "retry-me"));
        assert_ne!(a, command_id("user:bob (token 2)", "retry-me"));
        assert_ne!(a, command_id("user:alice (token 1)", "retry-me-2"));
        // The length prefix keeps (actor, key) pairs apart that concatenate alike.
        assert_ne!(command_id("ab", "c"), command_id("a", "bc"));
        // It is a valid v7 id: it survives the text round trip that the log's index uses.
        assert_eq!(a.to_string().parse::<CommandId>().unwrap(), a);
    }

    #[test]
    fn bad_keys_are_refused_naming_why() {
        assert_eq!(check(b"0f6c-4a1e"), Ok("0f6c-4a1e"));
        assert_eq!(check(&[b'k'; MAX_LEN]).map(str::len), Ok(MAX_LEN));
        assert_eq!(check(b""), Err(KeyError::Empty));
        assert_eq!(
            check(&[b'k'; MAX_LEN + 1]),
            Err(KeyError::TooLong(MAX_LEN + 1))
        );
        for bad in [&b"with space"[..], b"tab\t", b"nul\0", "é".as_bytes()] {
            assert_eq!(check(bad), Err(KeyError::BadCharacter), "{bad:?}");
        }
    }
}
