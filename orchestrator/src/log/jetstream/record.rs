//! The record format of the JetStream log: one JetStream message per append. Pure: bytes in,
//! bytes out, no NATS.
//!
//! A record is a format version byte (1, or 2 when its links are keyed with the audit key:
//! each event's hash, what the aggregate's next event chains to, is then the audit key's
//! keyed BLAKE3 MAC of its bytes), then the postcard encoding of the list of the
//! append's encoded envelopes (each one `cairn_schemas::encode` bytes: its own version byte
//! and postcard), in order: a varint count, then per envelope a varint length and its bytes.
//! The hash chain covers exactly the envelope bytes, so a record can be re-framed in a later
//! record version without breaking the chain.
//!
//! Decoding treats the message as untrusted input (anything may be published on a
//! `cairn.evt.` subject): every fault is an [`Error::Corrupt`] or [`Error::Decode`] naming the
//! event sequence number `stream_seq * 1000 + index`, never a panic.

use cairn_schemas::Aggregate;
use cairn_schemas::subjects::event_subject;
use serde::{Deserialize, Serialize};

use crate::audit::AuditKey;
use crate::audit::chain::link_hash;
use crate::log::{Error, StoredEvent};

/// The record format version of records whose links are plain BLAKE3.
pub(crate) const RECORD_VERSION: u8 = 1;
/// The same body, its links keyed with the audit key.
pub(crate) const KEYED_RECORD_VERSION: u8 = 2;

/// Events per record at most; event sequence numbers are `stream_seq * SEQ_STRIDE + index`.
pub(crate) const SEQ_STRIDE: u64 = 1000;

/// Most events one append (one record) may hold.
pub(crate) const MAX_EVENTS: usize = SEQ_STRIDE as usize;

/// An envelope's bytes, written as postcard bytes (varint length, then the bytes).
struct EnvelopeBytes<'a>(&'a [u8]);

impl Serialize for EnvelopeBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// Version 1 of the record body, as decoded (borrowing the message payload).
#[derive(Deserialize)]
struct RecordV1<'a> {
    #[serde(borrow)]
    envelopes: Vec<&'a [u8]>,
}

/// Encodes a record of already encoded envelopes whose links are plain.
pub(crate) fn encode_record(envelopes: &[Vec<u8>]) -> Vec<u8> {
    encode_versioned(envelopes, RECORD_VERSION)
}

/// Encodes a record of already encoded envelopes whose links are keyed.
pub(crate) fn encode_keyed_record(envelopes: &[Vec<u8>]) -> Vec<u8> {
    encode_versioned(envelopes, KEYED_RECORD_VERSION)
}

fn encode_versioned(envelopes: &[Vec<u8>], version: u8) -> Vec<u8> {
    let body: Vec<EnvelopeBytes<'_>> = envelopes.iter().map(|e| EnvelopeBytes(e)).collect();
    let out = vec![version];
    // A list of byte strings always serializes into a Vec.
    postcard::to_extend(&body, out).expect("a list of byte strings serializes with postcard")
}

/// The sequence number of event `index` of the record at `stream_seq`.
pub(crate) fn event_seq(stream_seq: u64, index: usize) -> Option<u64> {
    stream_seq
        .checked_mul(SEQ_STRIDE)?
        .checked_add(u64::try_from(index).ok()?)
}

/// A decoded record: its events and the BLAKE3 hash of each event's stored bytes.
#[derive(Debug)]
pub(crate) struct Record {
    /// The aggregate every event belongs to.
    pub aggregate: Aggregate,
    /// The events, by version.
    pub events: Vec<StoredEvent>,
    /// `hashes[i]` = the link to `events[i]`'s stored bytes (what the next event chains to):
    /// plain BLAKE3, or in a keyed record the audit key's MAC (plain when decoded without
    /// the key, and then useless for the chain).
    pub hashes: Vec<[u8; 32]>,
    /// Whether the record's links are keyed (format version 2).
    pub keyed: bool,
}

impl Record {
    /// The aggregate's version after this record.
    pub fn last_version(&self) -> u64 {
        self.events
            .last()
            .map_or(0, |event| event.envelope.aggregate_version)
    }

    /// Hash of the record's last event.
    pub fn last_hash(&self) -> [u8; 32] {
        self.hashes.last().copied().unwrap_or([0; 32])
    }
}

/// Decodes the record stored at `stream_seq` on `subject`, checking that it is well framed,
/// that every envelope decodes, that all belong to one aggregate with consecutive versions,
/// and that the subject is that aggregate's event subject.
pub(crate) fn decode_record(
    subject: &str,
    stream_seq: u64,
    payload: &[u8],
) -> Result<Record, Error> {
    decode_record_with(subject, stream_seq, payload, None)
}

/// [`decode_record`], computing a keyed record's links with `key`.
pub(crate) fn decode_record_with(
    subject: &str,
    stream_seq: u64,
    payload: &[u8],
    key: Option<&AuditKey>,
) -> Result<Record, Error> {
    let first_seq = event_seq(stream_seq, 0).ok_or_else(|| Error::Corrupt {
        seq: u64::MAX,
        detail: format!("stream sequence {stream_seq} is too large for event sequence numbers"),
    })?;
    let corrupt = |detail: String| Error::Corrupt {
        seq: first_seq,
        detail: format!("record at stream sequence {stream_seq} on {subject:?}: {detail}"),
    };
    let (&version, body) = payload
        .split_first()
        .ok_or_else(|| corrupt("the message is empty".into()))?;
    if version != RECORD_VERSION && version != KEYED_RECORD_VERSION {
        return Err(corrupt(format!(
            "unknown record format version {version} (this build reads {RECORD_VERSION} and \
             {KEYED_RECORD_VERSION})"
        )));
    }
    let keyed = version == KEYED_RECORD_VERSION;
    let link_key = if keyed { key } else { None };
    let (record, rest) = postcard::take_from_bytes::<RecordV1<'_>>(body)
        .map_err(|err| corrupt(format!("malformed record body: {err}")))?;
    if !rest.is_empty() {
        return Err(corrupt(format!(
            "{} bytes after the record body",
            rest.len()
        )));
    }
    if record.envelopes.is_empty() || record.envelopes.len() > MAX_EVENTS {
        return Err(corrupt(format!(
            "it holds {} events, a record holds 1 to {MAX_EVENTS}",
            record.envelopes.len()
        )));
    }
    let mut events = Vec::with_capacity(record.envelopes.len());
    let mut hashes = Vec::with_capacity(record.envelopes.len());
    for (index, bytes) in record.envelopes.iter().enumerate() {
        // index < MAX_EVENTS, so this cannot overflow once first_seq did not.
        let seq = first_seq + index as u64;
        let envelope =
            cairn_schemas::decode(bytes).map_err(|source| Error::Decode { seq, source })?;
        if let Some(first) = events.first() {
            let first: &StoredEvent = first;
            if envelope.aggregate != first.envelope.aggregate {
                return Err(Error::Corrupt {
                    seq,
                    detail: format!(
                        "record at stream sequence {stream_seq} mixes aggregates: {} after {}",
                        envelope.aggregate, first.envelope.aggregate
                    ),
                });
            }
            let expected = first.envelope.aggregate_version + index as u64;
            if envelope.aggregate_version != expected {
                return Err(Error::Corrupt {
                    seq,
                    detail: format!(
                        "record at stream sequence {stream_seq}: event {index} has version {}, \
                         expected {expected}",
                        envelope.aggregate_version
                    ),
                });
            }
        }
        hashes.push(link_hash(link_key, bytes));
        events.push(StoredEvent { seq, envelope });
    }
    let aggregate = events[0].envelope.aggregate.clone();
    if !subject_matches(subject, &aggregate) {
        return Err(corrupt(format!(
            "its events belong to {aggregate}, whose events are not filed under this subject"
        )));
    }
    Ok(Record {
        aggregate,
        events,
        hashes,
        keyed,
    })
}

/// Whether `subject` is `cairn.evt.<partition>.<kind>.<id>` of `aggregate`, for any partition.
fn subject_matches(subject: &str, aggregate: &Aggregate) -> bool {
    let Some(rest) = subject.strip_prefix("cairn.evt.") else {
        return false;
    };
    let Some((partition, _)) = rest.split_once('.') else {
        return false;
    };
    match partition.parse::<u16>() {
        Ok(partition) => event_subject(partition, aggregate) == subject,
        Err(_) => false,
    }
}

/// The filter matching an aggregate's events in every partition:
/// `cairn.evt.*.<kind>.<id token>`.
pub(crate) fn aggregate_filter(aggregate: &Aggregate) -> String {
    format!(
        "cairn.evt.*.{}.{}",
        aggregate.kind(),
        cairn_schemas::subjects::subject_token(&aggregate.id_string())
    )
}

#[cfg(test)]
mod tests {
    use cairn_schemas::{Envelope, EventId, JobEvent, JobId, StepId};

    use super::*;

    fn envelope(aggregate: &Aggregate, version: u64) -> Envelope {
        Envelope {
            event_id: EventId::new_v7(1_767_225_600_000 + version, [7; 10]),
            aggregate: aggregate.clone(),
            aggregate_version: version,
            recorded_at: 1_767_225_600_000,
            actor: "system:test".into(),
            correlation: None,
            causation: None,
            command: None,
            traceparent: None,
            prev_hash: [0; 32],
            payload: JobEvent::StepProgressed {
                step: StepId::new_v7(1_767_225_600_000, [9; 10]),
                attempt: 1,
                bytes_done: version,
                bytes_total: 10,
            }
            .into(),
        }
    }

    fn job() -> Aggregate {
        Aggregate::Job(JobId::new_v7(1_767_225_600_000, [1; 10]))
    }

    #[test]
    fn round_trip_and_sequence_numbers() {
        let aggregate = job();
        let bytes: Vec<Vec<u8>> = (1..=3)
            .map(|v| cairn_schemas::encode(&envelope(&aggregate, v)))
            .collect();
        let record = encode_record(&bytes);
        assert_eq!(record[0], RECORD_VERSION);
        let subject = event_subject(5, &aggregate);
        let decoded = decode_record(&subject, 7, &record).unwrap();
        assert_eq!(decoded.aggregate, aggregate);
        let seqs: Vec<u64> = decoded.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [7000, 7001, 7002]);
        assert_eq!(decoded.last_version(), 3);
        assert_eq!(decoded.last_hash(), *blake3::hash(&bytes[2]).as_bytes());
        assert_eq!(decoded.events[1].envelope, envelope(&aggregate, 2));
        // The same aggregate filed under another partition still matches its filter.
        assert!(decode_record(&event_subject(0, &aggregate), 7, &record).is_ok());
        assert_eq!(
            aggregate_filter(&aggregate),
            format!("cairn.evt.*.job.{}", aggregate.id_string())
        );
    }

    #[test]
    fn hostile_bytes_are_named_errors() {
        let aggregate = job();
        let subject = event_subject(1, &aggregate);
        let good = encode_record(&[cairn_schemas::encode(&envelope(&aggregate, 1))]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "empty"),
            (vec![9, 1, 2], "unknown record format version 9"),
            (vec![1, 0xff, 0xff, 0xff], "malformed record body"),
            (vec![1, 0], "holds 0 events"),
            ([good.clone(), vec![0]].concat(), "1 bytes after"),
        ];
        for (bytes, expected) in cases {
            let err = decode_record(&subject, 42, &bytes).unwrap_err();
            match &err {
                Error::Corrupt { seq, detail } => {
                    assert_eq!(*seq, 42_000);
                    assert!(detail.contains(expected), "{detail}");
                    assert!(detail.contains("stream sequence 42"), "{detail}");
                }
                other => panic!("{bytes:?}: {other}"),
            }
        }
        // A well-framed record whose envelope is garbage names the event.
        let garbage = encode_record(&[
            cairn_schemas::encode(&envelope(&aggregate, 1)),
            vec![1, 2, 3],
        ]);
        assert!(matches!(
            decode_record(&subject, 42, &garbage),
            Err(Error::Decode { seq: 42_001, .. })
        ));
        // The events of another aggregate on this subject.
        let other = Aggregate::Job(JobId::new_v7(1_767_225_600_000, [2; 10]));
        let wrong = encode_record(&[cairn_schemas::encode(&envelope(&other, 1))]);
        assert!(matches!(
            decode_record(&subject, 42, &wrong),
            Err(Error::Corrupt { seq: 42_000, .. })
        ));
        // Versions with a hole inside one record.
        let holes = encode_record(&[
            cairn_schemas::encode(&envelope(&aggregate, 1)),
            cairn_schemas::encode(&envelope(&aggregate, 3)),
        ]);
        assert!(matches!(
            decode_record(&subject, 42, &holes),
            Err(Error::Corrupt { seq: 42_001, .. })
        ));
        assert!(matches!(
            decode_record(&subject, u64::MAX / 10, &good),
            Err(Error::Corrupt { .. })
        ));
    }
}
