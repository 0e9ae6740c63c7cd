//! Tamper evidence: `verify_chain` names the first changed event; open refuses a damaged tail.

use cairn_schemas::EventId;

use super::*;
use crate::log::{Error, EventLog, StoredEvent};

/// A log with `n` events on two aggregates, returned with its events.
async fn log_with(n: u64, dir: &Path) -> (SledLog, Vec<StoredEvent>) {
    let log = open(dir);
    for version in 0..n / 2 {
        log.append(request(&job(1), version, vec![progress(version)]))
            .await
            .unwrap();
        log.append(request(&job(2), version, vec![progress(1000 + version)]))
            .await
            .unwrap();
    }
    let events = log.read_from(1, usize::MAX).await.unwrap();
    assert_eq!(events.len() as u64, n);
    (log, events)
}

/// Changes the stored bytes of event `seq` directly in the sled tree, as an attacker would.
fn tamper(log: &SledLog, seq: u64, change: impl FnOnce(&mut Vec<u8>)) {
    log.edit_page(seq, |records| {
        let (_, bytes) = records.iter_mut().find(|(s, _)| *s == seq).unwrap();
        change(bytes);
    });
}

/// Removes event `seq` from its page.
fn remove(log: &SledLog, seq: u64) {
    log.edit_page(seq, |records| records.retain(|(s, _)| *s != seq));
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
        .unwrap()
}

/// Flips one bit inside the actor string ("system:test" -> "rystem:test"): still decodes.
fn flip_actor(bytes: &mut [u8]) {
    let at = find(bytes, b"system:test");
    bytes[at] ^= 0x01;
}

fn assert_broken_at(result: Result<u64, Error>, seq: u64, event_id: Option<EventId>) {
    match result {
        Err(Error::ChainBroken {
            seq: found,
            event_id: found_id,
            detail,
        }) => {
            assert_eq!((found, found_id), (seq, event_id), "{detail}");
        }
        other => panic!("expected the chain to break at {seq}, got {other:?}"),
    }
}

#[tokio::test]
async fn intact_chain_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = log_with(20, dir.path()).await;
    assert_eq!(log.verify_chain().await.unwrap(), 20);
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(open(empty.path()).verify_chain().await.unwrap(), 0);
}

#[tokio::test]
async fn flipped_byte_in_the_body_names_its_event() {
    // Pages hold 32 events: cover both sides of page boundaries.
    for seq in [1, 7, 31, 32, 33, 64, 65, 79] {
        let dir = tempfile::tempdir().unwrap();
        let (log, events) = log_with(80, dir.path()).await;
        tamper(&log, seq, |bytes| flip_actor(bytes));
        let id = events[seq as usize - 1].envelope.event_id;
        assert_broken_at(log.verify_chain().await, seq, Some(id));
    }
}

#[tokio::test]
async fn flipped_byte_in_the_last_event_is_caught_by_the_tip() {
    let dir = tempfile::tempdir().unwrap();
    let (log, events) = log_with(20, dir.path()).await;
    tamper(&log, 20, |bytes| flip_actor(bytes));
    assert_broken_at(
        log.verify_chain().await,
        20,
        Some(events[19].envelope.event_id),
    );
}

#[tokio::test]
async fn flipped_byte_in_a_prev_hash_names_its_event() {
    for seq in [1, 2, 10, 32, 33, 80] {
        let dir = tempfile::tempdir().unwrap();
        let (log, events) = log_with(80, dir.path()).await;
        let prev_hash = events[seq as usize - 1].envelope.prev_hash;
        tamper(&log, seq, |bytes| {
            let at = find(bytes, &prev_hash);
            bytes[at + 31] ^= 0x80;
        });
        let id = events[seq as usize - 1].envelope.event_id;
        assert_broken_at(log.verify_chain().await, seq, Some(id));
    }
}

#[tokio::test]
async fn undecodable_and_missing_events_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = log_with(20, dir.path()).await;
    tamper(&log, 12, |bytes| bytes[0] = 9);
    let err = log.verify_chain().await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("hash chain broken at event 12: it does not decode"),
        "{err}"
    );
    assert_broken_at(Err(err), 12, None);

    let dir = tempfile::tempdir().unwrap();
    let (log, _) = log_with(20, dir.path()).await;
    remove(&log, 5);
    assert_broken_at(log.verify_chain().await, 5, None);

    let dir = tempfile::tempdir().unwrap();
    let (log, _) = log_with(20, dir.path()).await;
    remove(&log, 20);
    assert_broken_at(log.verify_chain().await, 20, None);

    // A whole page gone.
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = log_with(80, dir.path()).await;
    log.events_tree().remove(1u64.to_be_bytes()).unwrap();
    assert_broken_at(log.verify_chain().await, 33, None);
    let err = log.read_from(1, 100).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { seq: 33, .. }), "{err}");
}

#[tokio::test]
async fn reopen_checks_the_tail_on_both_sides_of_page_boundaries() {
    for n in [2, 30, 32, 34, 64, 66] {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_log, _) = log_with(n, dir.path()).await;
        }
        let log = open(dir.path());
        assert_eq!(log.verify_chain().await.unwrap(), n);
        tamper(&log, n, |bytes| flip_actor(bytes));
        log.events_tree().flush().unwrap();
        drop(log);
        let err = SledLog::open(SledLogConfig::new(dir.path().join("log"))).unwrap_err();
        assert!(
            matches!(err, Error::CorruptTail { seq, .. } if seq == n),
            "{n}: {err}"
        );
    }
    // The last event is the first of its page: open checks its link to the last event of the
    // page before.
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = log_with(32, dir.path()).await;
        let stored = log
            .append(request(&job(3), 0, vec![progress(7)]))
            .await
            .unwrap();
        assert_eq!(stored[0].seq, 33);
    }
    let log = open(dir.path());
    assert_eq!(log.last_seq().await.unwrap(), 33);
    let prev_hash = log.read_from(33, 1).await.unwrap()[0].envelope.prev_hash;
    tamper(&log, 33, |bytes| {
        let at = find(bytes, &prev_hash);
        bytes[at] ^= 0x01;
    });
    log.events_tree().flush().unwrap();
    drop(log);
    let err = SledLog::open(SledLogConfig::new(dir.path().join("log"))).unwrap_err();
    assert!(matches!(err, Error::CorruptTail { seq: 33, .. }), "{err}");
}

#[tokio::test]
async fn open_refuses_a_damaged_last_event_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let original = {
        let (log, _) = log_with(10, dir.path()).await;
        // Events 1..=10 share page 0.
        let original = log.events_tree().get(0u64.to_be_bytes()).unwrap().unwrap();
        tamper(&log, 10, |bytes| flip_actor(bytes));
        log.events_tree().flush().unwrap();
        original
    };
    let err = SledLog::open(SledLogConfig::new(dir.path().join("log"))).unwrap_err();
    assert!(matches!(err, Error::CorruptTail { seq: 10, .. }), "{err}");
    assert!(err.to_string().contains("last event 10"), "{err}");
    // Repair by hand (as an operator restoring the event would), and it opens again.
    {
        let db = ::sled::open(dir.path().join("log")).unwrap();
        let events = db.open_tree("events").unwrap();
        assert_ne!(events.get(0u64.to_be_bytes()).unwrap().unwrap(), original);
        events.insert(0u64.to_be_bytes(), original).unwrap();
        db.flush().unwrap();
    }
    let log = open(dir.path());
    assert_eq!(log.verify_chain().await.unwrap(), 10);
}

#[tokio::test]
async fn open_refuses_an_undecodable_last_event() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = log_with(4, dir.path()).await;
        tamper(&log, 4, |bytes| bytes.truncate(bytes.len() / 2));
        log.events_tree().flush().unwrap();
    }
    let err = SledLog::open(SledLogConfig::new(dir.path().join("log"))).unwrap_err();
    assert!(matches!(err, Error::CorruptTail { seq: 4, .. }), "{err}");
    assert!(err.to_string().contains("does not decode"), "{err}");
}

#[tokio::test]
async fn damage_before_the_tail_opens_but_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = log_with(10, dir.path()).await;
        tamper(&log, 3, |bytes| flip_actor(bytes));
        log.events_tree().flush().unwrap();
    }
    let log = open(dir.path());
    assert_broken_at(
        log.verify_chain().await,
        3,
        log.read_from(3, 1)
            .await
            .unwrap()
            .first()
            .map(|e| e.envelope.event_id),
    );
}
