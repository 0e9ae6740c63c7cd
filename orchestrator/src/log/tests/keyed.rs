//! The keyed chain: a log written with the audit key is caught when one byte changes, when it
//! is rewritten without the key (plain hashes) or with another key; a log written before it had
//! a key keeps verifying, keyed from the point where the key came; the running digest.

use super::*;
use crate::audit::{AuditKey, RunningDigest};
use crate::log::{Error, EventLog};

fn key(byte: u8) -> AuditKey {
    AuditKey::from_bytes([byte; 32])
}

fn config(dir: &Path, key: Option<AuditKey>) -> SledLogConfig {
    SledLogConfig::new(dir.join("log")).with_audit_key(key)
}

async fn append_n(log: &SledLog, aggregate: &Aggregate, from_version: u64, n: u64) {
    for version in from_version..from_version + n {
        log.append(request(aggregate, version, vec![progress(version)]))
            .await
            .unwrap();
    }
}

/// Reopens a log without the tail check, as `cairn audit verify --log` does.
fn audit_open(dir: &Path, key: Option<AuditKey>) -> SledLog {
    SledLog::open_for_audit(config(dir, key)).unwrap()
}

fn broken_at(result: Result<u64, Error>) -> (u64, String) {
    match result {
        Err(Error::ChainBroken { seq, detail, .. }) => (seq, detail),
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

#[tokio::test]
async fn a_new_log_with_a_key_is_keyed_from_its_first_event() {
    let dir = tempfile::tempdir().unwrap();
    let log = SledLog::open(config(dir.path(), Some(key(1)))).unwrap();
    assert_eq!(log.keyed_from(), Some(1));
    append_n(&log, &job(1), 0, 10).await;
    assert_eq!(log.verify_chain().await.unwrap(), 10);
    // The links are not plain BLAKE3.
    let events = log.read_from(1, 10).await.unwrap();
    let plain = blake3::hash(&cairn_schemas::encode(&events[0].envelope));
    assert_ne!(events[1].envelope.prev_hash, *plain.as_bytes());
    drop(log);
    let log = SledLog::open(config(dir.path(), Some(key(1)))).unwrap();
    assert_eq!(log.keyed_from(), Some(1));
    append_n(&log, &job(1), 10, 5).await;
    assert_eq!(log.verify_chain().await.unwrap(), 15);
}

#[tokio::test]
async fn one_changed_byte_is_caught_by_the_keyed_chain_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let log = SledLog::open(config(dir.path(), Some(key(1)))).unwrap();
    append_n(&log, &job(1), 0, 40).await;
    let events = log.read_from(1, 40).await.unwrap();
    log.edit_page(7, |records| {
        let (_, bytes) = records.iter_mut().find(|(s, _)| *s == 7).unwrap();
        let at = bytes.windows(11).position(|w| w == b"system:test").unwrap();
        bytes[at] ^= 0x01;
    });
    let (seq, detail) = broken_at(log.verify_chain().await);
    assert_eq!(seq, 7, "{detail}");
    assert!(detail.contains("keyed link"), "{detail}");
    match log.verify_chain().await {
        Err(Error::ChainBroken { event_id, .. }) => {
            assert_eq!(event_id, Some(events[6].envelope.event_id));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_rewrite_without_the_key_or_with_another_key_is_caught() {
    for attacker_key in [None, Some(key(9))] {
        let dir = tempfile::tempdir().unwrap();
        let log = SledLog::open(config(dir.path(), Some(key(1)))).unwrap();
        append_n(&log, &job(1), 0, 40).await;
        // Change one event and recompute every link (and the tip) without the right key.
        log.rewrite_all(attacker_key.as_ref(), |seq, envelope| {
            if seq == 12 {
                envelope.actor = "user:mallory".into();
            }
        });
        drop(log);
        // The orchestrator refuses to open it: its tip is not the key's MAC.
        let err = SledLog::open(config(dir.path(), Some(key(1)))).unwrap_err();
        assert!(
            matches!(err, Error::CorruptTail { seq: 40, .. }),
            "{attacker_key:?}: {err}"
        );
        assert!(err.to_string().contains("audit key"), "{err}");
        // The audit names the first event whose keyed link fails.
        let audit = audit_open(dir.path(), Some(key(1)));
        let (seq, detail) = broken_at(audit.verify_chain().await);
        assert_eq!(seq, 2, "{attacker_key:?}: {detail}");
        drop(audit);
        // With the attacker's own key given, it would pass: only the real key catches it.
        let fooled = audit_open(dir.path(), attacker_key.clone());
        match attacker_key {
            Some(_) => assert_eq!(fooled.verify_chain().await.unwrap(), 40),
            None => assert!(matches!(
                fooled.verify_chain().await,
                Err(Error::AuditKeyRequired { keyed_from: 1, .. })
            )),
        }
    }
}

#[tokio::test]
async fn a_log_written_before_the_key_stays_valid_and_is_keyed_from_then_on() {
    let dir = tempfile::tempdir().unwrap();
    let log = SledLog::open(config(dir.path(), None)).unwrap();
    assert_eq!(log.keyed_from(), None);
    append_n(&log, &job(1), 0, 10).await;
    drop(log);
    let log = SledLog::open(config(dir.path(), Some(key(1)))).unwrap();
    assert_eq!(log.keyed_from(), Some(11));
    assert_eq!(log.verify_chain().await.unwrap(), 10);
    append_n(&log, &job(1), 10, 10).await;
    assert_eq!(log.verify_chain().await.unwrap(), 20);
    // Event 11's link to event 10 is keyed.
    let events = log.read_from(10, 2).await.unwrap();
    let bytes_10 = cairn_schemas::encode(&events[0].envelope);
    assert_eq!(
        events[1].envelope.prev_hash,
        crate::audit::link_hash(Some(&key(1)), &bytes_10)
    );
    drop(log);

    // From now on the log refuses to open without the key, so nobody appends unkeyed links.
    let err = SledLog::open(config(dir.path(), None)).unwrap_err();
    assert!(
        matches!(err, Error::AuditKeyRequired { keyed_from: 11, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("--audit-key"), "{err}");

    // A rewrite that makes the keyed part plain again is caught at the first keyed link.
    let audit = audit_open(dir.path(), Some(key(1)));
    audit.rewrite_all(None, |_, _| {});
    let (seq, detail) = broken_at(audit.verify_chain().await);
    assert_eq!(seq, 11, "{detail}");
}

#[tokio::test]
async fn the_running_digest_extends_and_changes_with_any_event() {
    let dir = tempfile::tempdir().unwrap();
    let log = SledLog::open(config(dir.path(), Some(key(1)))).unwrap();
    append_n(&log, &job(1), 0, 70).await;
    let all = log.extend_digest(RunningDigest::EMPTY, 70).await.unwrap();
    assert_eq!(all.seq, 70);
    let half = log.extend_digest(RunningDigest::EMPTY, 33).await.unwrap();
    assert_eq!(half.seq, 33);
    assert_eq!(log.extend_digest(half, 70).await.unwrap(), all);
    // Beyond the end it stops at the last event.
    assert_eq!(log.extend_digest(half, 500).await.unwrap(), all);
    let mut by_hand = RunningDigest::EMPTY;
    for event in log.read_from(1, 70).await.unwrap() {
        by_hand.push_bytes(event.seq, &cairn_schemas::encode(&event.envelope));
    }
    assert_eq!(by_hand, all);
    log.rewrite_all(Some(&key(1)), |seq, envelope| {
        if seq == 50 {
            envelope.actor = "user:mallory".into();
        }
    });
    assert_eq!(
        log.verify_chain().await.unwrap(),
        70,
        "the key holder's rewrite passes the chain"
    );
    assert_eq!(
        log.extend_digest(RunningDigest::EMPTY, 49)
            .await
            .unwrap()
            .digest,
        {
            let mut d = RunningDigest::EMPTY;
            for event in by_hand_events(&log, 49).await {
                d.push_bytes(event.0, &event.1);
            }
            d.digest
        }
    );
    assert_ne!(
        log.extend_digest(RunningDigest::EMPTY, 70).await.unwrap(),
        all
    );
}

async fn by_hand_events(log: &SledLog, to: u64) -> Vec<(u64, Vec<u8>)> {
    log.read_from(1, to as usize)
        .await
        .unwrap()
        .into_iter()
        .map(|event| (event.seq, cairn_schemas::encode(&event.envelope)))
        .collect()
}
