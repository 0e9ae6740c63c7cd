//! The versioned binary codec of everything cairn persists or transmits.
//!
//! Layout: one format version byte, then the postcard encoding of the value with that
//! version's types. Version 1 is [`crate::v1`]. [`decode`] dispatches on the version byte;
//! when version 2 exists it will decode version-1 bytes with the frozen `v1` types and upcast
//! them to the current ones, so callers always get current types. Encoding always writes the
//! current version.
//!
//! Decoding is strict: bytes after the value are an error (the version byte, not trailing
//! data, is how formats evolve), and an envelope whose payload belongs to another aggregate
//! kind than its `aggregate` is rejected.
//!
//! The rules for changing the types are in [`crate::v1`].

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::v1;

/// The version byte written by the encoders of this build.
pub const FORMAT_VERSION: u8 = 1;

/// Why bytes do not decode.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// No bytes at all.
    #[error("cannot decode {what}: input is empty (no format version byte)")]
    Empty {
        /// What was being decoded (`event envelope`, `step spec`, ...).
        what: &'static str,
    },
    /// A version byte this build does not know (newer software wrote it, or garbage).
    #[error(
        "cannot decode {what}: unknown format version {version} (this build reads 1 to {FORMAT_VERSION})"
    )]
    UnknownVersion {
        /// What was being decoded.
        what: &'static str,
        /// The version byte found.
        version: u8,
    },
    /// The bytes after the version byte are not a valid value.
    #[error("cannot decode {what} (format version {version}): {source}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// The version byte.
        version: u8,
        /// postcard's reason.
        source: postcard::Error,
    },
    /// A valid value followed by more bytes.
    #[error("cannot decode {what} (format version {version}): {n_bytes} bytes after the value")]
    TrailingBytes {
        /// What was being decoded.
        what: &'static str,
        /// The version byte.
        version: u8,
        /// How many bytes were left over.
        n_bytes: usize,
    },
    /// An envelope whose payload does not belong to its aggregate.
    #[error("event envelope for {aggregate} carries a {payload_kind} event ({event_name})")]
    AggregateMismatch {
        /// The envelope's aggregate, as `kind/id`.
        aggregate: String,
        /// The payload's aggregate kind.
        payload_kind: v1::AggregateKind,
        /// The payload's variant name.
        event_name: &'static str,
    },
}

fn encode_current<T: Serialize>(value: &T) -> Vec<u8> {
    let out = vec![FORMAT_VERSION];
    // Serializing schema types into a Vec cannot fail: they have no maps with unsupported keys,
    // no sequences of unknown length and no custom error paths in binary mode.
    postcard::to_extend(value, out).expect("schema types always serialize with postcard")
}

fn decode_strict<T: DeserializeOwned>(
    what: &'static str,
    version: u8,
    body: &[u8],
) -> Result<T, CodecError> {
    let (value, rest) =
        postcard::take_from_bytes::<T>(body).map_err(|source| CodecError::Malformed {
            what,
            version,
            source,
        })?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes {
            what,
            version,
            n_bytes: rest.len(),
        });
    }
    Ok(value)
}

/// Splits the version byte off and decodes the rest with the types of that version,
/// upcasting to the current types.
fn decode_versioned<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty { what })?;
    match version {
        // Version 1 is current: its types are the crate root's types, nothing to upcast.
        1 => decode_strict::<T>(what, version, body),
        _ => Err(CodecError::UnknownVersion { what, version }),
    }
}

/// The format version byte of encoded bytes, without decoding them.
pub fn format_version(bytes: &[u8]) -> Option<u8> {
    bytes.first().copied()
}

/// Encodes an event envelope: version byte + postcard.
pub fn encode(envelope: &v1::Envelope) -> Vec<u8> {
    encode_current(envelope)
}

/// Decodes an event envelope written by [`encode`] of this or an older version.
pub fn decode(bytes: &[u8]) -> Result<v1::Envelope, CodecError> {
    let envelope: v1::Envelope = decode_versioned("event envelope", bytes)?;
    if envelope.payload.aggregate_kind() != envelope.aggregate.kind() {
        return Err(CodecError::AggregateMismatch {
            aggregate: envelope.aggregate.to_string(),
            payload_kind: envelope.payload.aggregate_kind(),
            event_name: envelope.payload.name(),
        });
    }
    Ok(envelope)
}

/// Encodes a step spec (orchestrator → worker).
pub fn encode_spec(spec: &v1::StepSpec) -> Vec<u8> {
    encode_current(spec)
}

/// Decodes a step spec.
pub fn decode_spec(bytes: &[u8]) -> Result<v1::StepSpec, CodecError> {
    decode_versioned("step spec", bytes)
}

/// Encodes a worker report (worker → orchestrator).
pub fn encode_report(report: &v1::Report) -> Vec<u8> {
    encode_current(report)
}

/// Decodes a worker report.
pub fn decode_report(bytes: &[u8]) -> Result<v1::Report, CodecError> {
    decode_versioned("worker report", bytes)
}

/// Encodes a command with its envelope.
pub fn encode_command(command: &v1::CommandEnvelope) -> Vec<u8> {
    encode_current(command)
}

/// Decodes a command with its envelope.
pub fn decode_command(bytes: &[u8]) -> Result<v1::CommandEnvelope, CodecError> {
    decode_versioned("command", bytes)
}

/// Encodes a browse request (orchestrator → worker, `cairn.browse.<node>`).
pub fn encode_browse_request(request: &v1::BrowseRequest) -> Vec<u8> {
    encode_current(request)
}

/// Decodes a browse request.
pub fn decode_browse_request(bytes: &[u8]) -> Result<v1::BrowseRequest, CodecError> {
    decode_versioned("browse request", bytes)
}

/// Encodes a worker's answer to a browse request: the listing, or why there is none.
pub fn encode_browse_reply(reply: &Result<Vec<v1::BrowseEntry>, String>) -> Vec<u8> {
    encode_current(reply)
}

/// Decodes a worker's answer to a browse request.
pub fn decode_browse_reply(
    bytes: &[u8],
) -> Result<Result<Vec<v1::BrowseEntry>, String>, CodecError> {
    decode_versioned("browse reply", bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{EventId, JobId};
    use crate::v1::{Aggregate, Envelope, Event, GroupEvent, JobEvent};

    fn sample() -> Envelope {
        Envelope {
            event_id: EventId::new_v7(1_000, [1; 10]),
            aggregate: Aggregate::Job(JobId::new_v7(999, [2; 10])),
            aggregate_version: 1,
            recorded_at: 1_000,
            actor: "user:alice".into(),
            correlation: None,
            causation: None,
            command: None,
            traceparent: None,
            prev_hash: [0; 32],
            payload: Event::Job(JobEvent::JobSucceeded),
        }
    }

    #[test]
    fn round_trip_writes_version_byte_first() {
        let envelope = sample();
        let bytes = encode(&envelope);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(format_version(&bytes), Some(1));
        assert_eq!(decode(&bytes).unwrap(), envelope);
    }

    #[test]
    fn bad_inputs_get_named_errors() {
        assert!(matches!(decode(&[]), Err(CodecError::Empty { .. })));
        let mut bytes = encode(&sample());
        bytes[0] = 2;
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::UnknownVersion { version: 2, .. }));
        assert!(
            err.to_string().contains("unknown format version 2"),
            "{err}"
        );

        let mut bytes = encode(&sample());
        bytes.push(0);
        assert!(matches!(
            decode(&bytes),
            Err(CodecError::TrailingBytes { n_bytes: 1, .. })
        ));

        let bytes = encode(&sample());
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(CodecError::Malformed { version: 1, .. })
        ));
    }

    #[test]
    fn payload_must_match_aggregate_kind() {
        let mut envelope = sample();
        envelope.payload = Event::Group(GroupEvent::GroupDeleted {
            delete_recovery_points: false,
        });
        let err = decode(&encode(&envelope)).unwrap_err();
        assert!(
            err.to_string()
                .contains("carries a group event (GroupDeleted)"),
            "{err}"
        );
    }

    #[test]
    fn browse_request_and_reply_round_trip() {
        use crate::ids::{DiskId, RecoveryPointId, VmId};
        use crate::v1::{BrowseEntry, BrowseRequest};
        let request = BrowseRequest {
            vm: VmId::new_v7(5, [3; 10]),
            rp: RecoveryPointId::new_v7(6, [4; 10]),
            disk: DiskId::new("root").unwrap(),
            repository: "/srv/repo".into(),
            path: "/p2/etc".into(),
        };
        let bytes = encode_browse_request(&request);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode_browse_request(&bytes).unwrap(), request);
        assert!(matches!(
            decode_browse_request(&bytes[..bytes.len() - 1]),
            Err(CodecError::Malformed { .. })
        ));

        let listing: Result<Vec<BrowseEntry>, String> = Ok(vec![BrowseEntry {
            name: "passwd".into(),
            kind: "file".into(),
            size: 1234,
            mode: Some(0o644),
            mtime: Some(1_700_000_000),
            detail: None,
        }]);
        let bytes = encode_browse_reply(&listing);
        assert_eq!(decode_browse_reply(&bytes).unwrap(), listing);
        let refused: Result<Vec<BrowseEntry>, String> = Err("no such folder".into());
        assert_eq!(
            decode_browse_reply(&encode_browse_reply(&refused)).unwrap(),
            refused
        );

        let mut bytes = encode_browse_reply(&refused);
        bytes.push(7);
        assert!(matches!(
            decode_browse_reply(&bytes),
            Err(CodecError::TrailingBytes { n_bytes: 1, .. })
        ));
        assert!(matches!(
            decode_browse_reply(&[]),
            Err(CodecError::Empty {
                what: "browse reply"
            })
        ));
        assert!(matches!(
            decode_browse_request(&[9, 1, 2]),
            Err(CodecError::UnknownVersion { version: 9, .. })
        ));
    }
}
