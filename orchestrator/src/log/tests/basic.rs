//! Appends and reads: order, versions, envelopes, idempotency, validation, reopen, tails.

use std::time::Duration;

use cairn_schemas::{Aggregate, GroupEvent, GroupId, JobEvent};

use super::*;
use crate::log::{Error, EventLog};

#[tokio::test]
async fn append_assigns_sequences_versions_and_chain_links() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    assert_eq!(log.last_seq().await.unwrap(), 0);
    let mut first = progress(1);
    first.correlation = Some(JobId::new_v7(T0, [1; 10]));
    first.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    let cmd = command();
    let stored = log
        .append(AppendRequest {
            partition: 0,
            command: Some(cmd),
            recorded_at: T0 + 5,
            ..request(&job(1), 0, vec![first.clone(), progress(2)])
        })
        .await
        .unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!((stored[0].seq, stored[1].seq), (1, 2));
    let envelope = &stored[0].envelope;
    assert_eq!(envelope.event_id, first.event_id);
    assert_eq!(envelope.aggregate, job(1));
    assert_eq!(envelope.aggregate_version, 1);
    assert_eq!(envelope.recorded_at, T0 + 5);
    assert_eq!(envelope.actor, "system:test");
    assert_eq!(envelope.correlation, first.correlation);
    assert_eq!(envelope.traceparent, first.traceparent);
    assert_eq!(envelope.command, Some(cmd));
    assert_eq!(envelope.prev_hash, [0; 32]);
    assert_eq!(envelope.payload, first.payload);
    assert_eq!(stored[1].envelope.aggregate_version, 2);
    // Event 2 links to the exact stored bytes of event 1.
    let bytes_1 = cairn_schemas::encode(&stored[0].envelope);
    assert_eq!(
        stored[1].envelope.prev_hash,
        *blake3::hash(&bytes_1).as_bytes()
    );

    let more = log
        .append(request(&node("kvm-01"), 0, vec![heartbeat_lost(3)]))
        .await
        .unwrap();
    assert_eq!(more[0].seq, 3);
    assert_eq!(more[0].envelope.aggregate_version, 1);
    assert_eq!(log.last_seq().await.unwrap(), 3);
    assert_eq!(
        log.read_from(1, 100).await.unwrap(),
        [stored, more].concat()
    );
}

#[tokio::test]
async fn read_from_and_read_aggregate_return_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let aggregates = [job(1), job(2), node("kvm-01.lab"), node("kvm-01")];
    let mut versions = [0u64; 4];
    let mut all = Vec::new();
    for tag in 0..40u64 {
        let idx = (tag * 7 % 4) as usize;
        let aggregate = &aggregates[idx];
        let events = (0..1 + tag % 3)
            .map(|n| {
                let tag = tag * 10 + n;
                match aggregate {
                    Aggregate::Node(_) => heartbeat_lost(tag),
                    _ => progress(tag),
                }
            })
            .collect::<Vec<_>>();
        let stored = log
            .append(request(aggregate, versions[idx], events))
            .await
            .unwrap();
        versions[idx] += stored.len() as u64;
        all.extend(stored);
    }
    let n = all.len() as u64;
    assert_eq!(log.last_seq().await.unwrap(), n);
    assert!(all.iter().map(|e| e.seq).eq(1..=n));
    assert_eq!(log.read_from(1, usize::MAX).await.unwrap(), all);
    assert_eq!(log.read_from(0, usize::MAX).await.unwrap(), all);
    assert_eq!(log.read_from(5, 3).await.unwrap(), all[4..7]);
    assert!(log.read_from(n + 1, 10).await.unwrap().is_empty());
    assert!(log.read_from(1, 0).await.unwrap().is_empty());
    for (idx, aggregate) in aggregates.iter().enumerate() {
        let expected: Vec<_> = all
            .iter()
            .filter(|e| &e.envelope.aggregate == aggregate)
            .cloned()
            .collect();
        let read = log.read_aggregate(aggregate).await.unwrap();
        // "kvm-01" must not pick up "kvm-01.lab"'s events (keys are length-prefixed).
        assert_eq!(read, expected, "{aggregate}");
        assert!(
            read.iter()
                .map(|e| e.envelope.aggregate_version)
                .eq(1..=versions[idx])
        );
    }
    assert!(log.read_aggregate(&job(99)).await.unwrap().is_empty());
}

#[tokio::test]
async fn repeated_command_returns_the_first_events_and_appends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = command();
    let first = {
        let log = open(dir.path());
        let first = log
            .append(AppendRequest {
                partition: 0,
                command: Some(cmd),
                ..request(&job(1), 0, vec![progress(1), progress(2)])
            })
            .await
            .unwrap();
        // Same command, now stale version and other events: still the first result.
        let again = log
            .append(AppendRequest {
                partition: 0,
                command: Some(cmd),
                ..request(&job(1), 0, vec![progress(3)])
            })
            .await
            .unwrap();
        assert_eq!(again, first);
        assert_eq!(log.last_seq().await.unwrap(), 2);
        assert_eq!(log.stats().n_appends, 1);
        first
    };
    // The index is durable too.
    let log = open(dir.path());
    let again = log
        .append(AppendRequest {
            partition: 0,
            command: Some(cmd),
            ..request(&job(7), 5, vec![progress(4)])
        })
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(log.last_seq().await.unwrap(), 2);
    // A new command id appends.
    let next = log
        .append(AppendRequest {
            partition: 0,
            command: Some(command()),
            ..request(&job(1), 2, vec![progress(5)])
        })
        .await
        .unwrap();
    assert_eq!(next[0].seq, 3);
}

#[tokio::test]
async fn invalid_appends_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let err = log.append(request(&job(1), 0, vec![])).await.unwrap_err();
    assert!(matches!(err, Error::NoEvents { .. }), "{err}");
    let err = log
        .append(request(&job(1), 0, vec![progress(1), heartbeat_lost(2)]))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("event 1 is a node event (NodeHeartbeatLost)"),
        "{err}"
    );
    let err = log
        .append(request(&job(1), 3, vec![progress(1)]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Conflict {
                expected: 3,
                actual: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_conflict());
    assert_eq!(
        err.to_string(),
        format!(
            "version conflict on {}: expected version 3, but it is at 0",
            job(1)
        )
    );
    // A conflicting command is not recorded as processed.
    let cmd = command();
    let group = Aggregate::Group(GroupId::new_v7(T0, [4; 10]));
    let deleted = NewEvent::new(
        cairn_schemas::EventId::new_v7(T0, fresh_rand()),
        "user:alice",
        GroupEvent::GroupDeleted {
            delete_recovery_points: false,
        },
    );
    let refused = log
        .append(AppendRequest {
            partition: 0,
            command: Some(cmd),
            ..request(&group, 1, vec![deleted.clone()])
        })
        .await;
    assert!(refused.unwrap_err().is_conflict());
    let stored = log
        .append(AppendRequest {
            partition: 0,
            command: Some(cmd),
            ..request(&group, 0, vec![deleted])
        })
        .await
        .unwrap();
    assert_eq!(stored[0].seq, 1);
    assert_eq!(log.last_seq().await.unwrap(), 1);
}

#[tokio::test]
async fn reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let log = open(dir.path());
        for version in 0..20 {
            log.append(request(&job(1), version, vec![progress(version)]))
                .await
                .unwrap();
            log.append(request(
                &job(2),
                version * 2,
                vec![progress(100), progress(101)],
            ))
            .await
            .unwrap();
        }
        log.read_from(1, usize::MAX).await.unwrap()
    };
    let log = open(dir.path());
    assert_eq!(log.last_seq().await.unwrap(), 60);
    assert_eq!(log.read_from(1, usize::MAX).await.unwrap(), before);
    assert_eq!(log.verify_chain().await.unwrap(), 60);
    // Versions and the chain continue where they were.
    let err = log
        .append(request(&job(1), 19, vec![progress(1)]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { actual: 20, .. }), "{err}");
    let next = log
        .append(request(&job(1), 20, vec![progress(1)]))
        .await
        .unwrap();
    assert_eq!(next[0].seq, 61);
    assert_eq!(next[0].envelope.aggregate_version, 21);
    assert_eq!(log.verify_chain().await.unwrap(), 61);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_returns_old_then_new_events_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    for version in 0..5 {
        log.append(request(&job(1), version, vec![progress(version)]))
            .await
            .unwrap();
    }
    let mut from_start = log.tail(1);
    let mut from_four = log.tail(4);
    let writer = {
        let log = log.clone();
        tokio::spawn(async move {
            for version in 5..200u64 {
                let events = vec![progress(version)];
                log.append(request(&job(1), version, events)).await.unwrap();
                if version % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    for expected in 1..=200u64 {
        let event = tokio::time::timeout(Duration::from_secs(20), from_start.next())
            .await
            .expect("tail stalled")
            .unwrap()
            .unwrap();
        assert_eq!(event.seq, expected);
        assert!(matches!(
            event.envelope.payload,
            cairn_schemas::Event::Job(JobEvent::StepProgressed { bytes_done, .. })
                if bytes_done == expected - 1
        ));
    }
    writer.await.unwrap();
    let seqs: Vec<u64> = {
        let mut seqs = Vec::new();
        while seqs.len() < 197 {
            seqs.push(from_four.next().await.unwrap().unwrap().seq);
        }
        seqs
    };
    assert!(seqs.into_iter().eq(4..=200));
    // Nothing more is durable: the tail waits...
    let waiting = tokio::time::timeout(Duration::from_millis(50), from_start.next()).await;
    assert!(
        waiting.is_err(),
        "tail returned an event that was never appended"
    );
    // ...and ends when the log is closed.
    drop(log);
    let end = tokio::time::timeout(Duration::from_secs(5), from_start.next())
        .await
        .expect("tail did not end when the log was dropped");
    assert!(end.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_share_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let mut tasks = Vec::new();
    for task_idx in 0..16u8 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for version in 0..20 {
                log.append(request(&job(task_idx), version, vec![progress(version)]))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stats = log.stats();
    assert_eq!(stats.n_appends, 320);
    assert_eq!(log.last_seq().await.unwrap(), 320);
    assert_eq!(log.verify_chain().await.unwrap(), 320);
    // Not a hard guarantee of timing, but with 16 appenders in flight group commit should
    // merge at least some flushes.
    assert!(stats.n_flushes < stats.n_appends, "{stats:?}");
}
