//! The JetStream log against the log contract, on real `nats-server` processes: appends and
//! reads across partitions, optimistic concurrency between two handles, idempotent commands
//! (also past the duplicate window), tails, the per-aggregate hash chain, hostile messages on
//! the event subjects, `kill -9` of the server during appends, and a three-node cluster that
//! loses a node.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use cairn_schemas::subjects::event_subject;
use cairn_tests::nats::{NatsCluster, NatsServer};

use super::*;
use crate::log::{Error, EventLog, JetStreamLog, JetStreamLogConfig, StoredEvent};

async fn connect(urls: &str) -> async_nats::Client {
    let addrs: Vec<async_nats::ServerAddr> = urls.split(',').map(|u| u.parse().unwrap()).collect();
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(addrs)
        .await
        .unwrap()
}

fn fast_config() -> JetStreamLogConfig {
    JetStreamLogConfig {
        publish_timeout: Duration::from_millis(1500),
        retry_for: Duration::from_secs(25),
        ..JetStreamLogConfig::default()
    }
}

async fn open_log(urls: &str, config: JetStreamLogConfig) -> JetStreamLog {
    JetStreamLog::open(connect(urls).await, config)
        .await
        .unwrap()
}

/// An append to `aggregate` filed under `partition`.
fn request_in(
    partition: u16,
    aggregate: &Aggregate,
    version: u64,
    events: Vec<NewEvent>,
) -> AppendRequest {
    AppendRequest {
        partition,
        ..request(aggregate, version, events)
    }
}

fn event_for(aggregate: &Aggregate, tag: u64) -> NewEvent {
    match aggregate {
        Aggregate::Node(_) => heartbeat_lost(tag),
        _ => progress(tag),
    }
}

fn ids(events: &[StoredEvent]) -> Vec<cairn_schemas::EventId> {
    events.iter().map(|e| e.envelope.event_id).collect()
}

#[tokio::test]
async fn appends_and_reads_across_aggregates_and_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let log = open_log(&server.url(), fast_config()).await;
    assert_eq!(log.last_seq().await.unwrap(), 0);
    assert!(log.read_from(1, 10).await.unwrap().is_empty());

    let aggregates = [
        (3u16, job(1)),
        (7, job(2)),
        (3, node("kvm-01.lab")),
        (15, node("kvm-02")),
    ];
    let mut versions = [0u64; 4];
    let mut all: Vec<StoredEvent> = Vec::new();
    let mut last_hash: HashMap<Aggregate, [u8; 32]> = HashMap::new();
    // 40 records: enough that a full read goes through a consumer, not reads by sequence.
    for tag in 0..40u64 {
        let idx = (tag * 7 % 4) as usize;
        let (partition, aggregate) = &aggregates[idx];
        let events: Vec<NewEvent> = (0..1 + tag % 3)
            .map(|n| event_for(aggregate, tag * 10 + n))
            .collect();
        let n = events.len() as u64;
        let stored = log
            .append(request_in(*partition, aggregate, versions[idx], events))
            .await
            .unwrap();
        assert_eq!(stored.len() as u64, n);
        // One record per append: consecutive indexes of one stream sequence.
        let stream_seq = stored[0].seq / 1000;
        for (i, event) in stored.iter().enumerate() {
            assert_eq!(event.seq, stream_seq * 1000 + i as u64);
            assert_eq!(
                event.envelope.aggregate_version,
                versions[idx] + 1 + i as u64
            );
        }
        // The chain links to the aggregate's previous event, also across records.
        let expected_prev = last_hash.get(aggregate).copied().unwrap_or([0; 32]);
        assert_eq!(stored[0].envelope.prev_hash, expected_prev);
        for pair in stored.windows(2) {
            let bytes = cairn_schemas::encode(&pair[0].envelope);
            assert_eq!(pair[1].envelope.prev_hash, *blake3::hash(&bytes).as_bytes());
        }
        let last_bytes = cairn_schemas::encode(&stored.last().unwrap().envelope);
        last_hash.insert(aggregate.clone(), *blake3::hash(&last_bytes).as_bytes());
        if let Some(previous) = all.last() {
            assert!(stored[0].seq > previous.seq);
        }
        versions[idx] += n;
        all.extend(stored);
    }

    assert_eq!(log.last_seq().await.unwrap(), all.last().unwrap().seq);
    assert_eq!(log.read_from(0, usize::MAX).await.unwrap(), all);
    // From the middle of a record, with a limit that ends inside another one.
    let from = all.iter().position(|e| e.seq % 1000 == 1).unwrap();
    assert_eq!(
        log.read_from(all[from].seq, 5).await.unwrap(),
        all[from..from + 5]
    );
    // Short ranges near the end are read record by record.
    let tail_start = all.len() - 3;
    assert_eq!(
        log.read_from(all[tail_start].seq, 100).await.unwrap(),
        all[tail_start..]
    );
    assert!(
        log.read_from(all.last().unwrap().seq + 1, 100)
            .await
            .unwrap()
            .is_empty()
    );

    // A second handle (another orchestrator) sees the same log.
    let other = open_log(&server.url(), fast_config()).await;
    for (idx, (_, aggregate)) in aggregates.iter().enumerate() {
        let expected: Vec<StoredEvent> = all
            .iter()
            .filter(|e| e.envelope.aggregate == *aggregate)
            .cloned()
            .collect();
        assert_eq!(expected.len() as u64, versions[idx]);
        assert_eq!(other.read_aggregate(aggregate).await.unwrap(), expected);
    }
    assert!(other.read_aggregate(&job(99)).await.unwrap().is_empty());
    assert_eq!(other.verify_chain().await.unwrap(), all.len() as u64);

    // Refusals before anything is stored.
    let too_many: Vec<NewEvent> = (0..1001).map(progress).collect();
    assert!(matches!(
        log.append(request(&job(1), versions[0], too_many)).await,
        Err(Error::TooManyEvents {
            count: 1001,
            max: 1000,
            ..
        })
    ));
    assert!(matches!(
        log.append(request(&job(1), versions[0], vec![])).await,
        Err(Error::NoEvents { .. })
    ));
    assert!(matches!(
        log.append(request(&job(1), versions[0], vec![heartbeat_lost(1)]))
            .await,
        Err(Error::WrongAggregate { .. })
    ));
    assert_eq!(log.read_from(0, usize::MAX).await.unwrap(), all);
}

#[tokio::test]
async fn one_of_two_handles_wins_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let first = open_log(&server.url(), fast_config()).await;
    let second = open_log(&server.url(), fast_config()).await;
    let aggregate = job(1);
    first
        .append(request_in(2, &aggregate, 0, vec![progress(1), progress(2)]))
        .await
        .unwrap();
    // `second` has never seen the aggregate; both now append at version 2.
    second.read_aggregate(&aggregate).await.unwrap();
    let (a, b) = tokio::join!(
        first.append(request_in(2, &aggregate, 2, vec![progress(3)])),
        second.append(request_in(2, &aggregate, 2, vec![progress(4), progress(5)])),
    );
    let (winner, loser_err, actual) = match (a, b) {
        (Ok(won), Err(err)) => (won, err, 3),
        (Err(err), Ok(won)) => (won, err, 4),
        other => panic!("exactly one append must win: {other:?}"),
    };
    match loser_err {
        Error::Conflict {
            aggregate: agg,
            expected,
            actual: got,
        } => {
            assert_eq!((agg, expected, got), (aggregate.clone(), 2, actual));
        }
        other => panic!("expected a conflict, got {other}"),
    }
    assert_eq!(winner[0].envelope.aggregate_version, 3);

    // Each handle, at a stale version, gets the current one; at the current one, it wins.
    for log in [&first, &second] {
        let actual = log.read_aggregate(&aggregate).await.unwrap().len() as u64;
        match log
            .append(request_in(2, &aggregate, 1, vec![progress(6)]))
            .await
        {
            Err(Error::Conflict { actual: got, .. }) => assert_eq!(got, actual),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    let version = first.read_aggregate(&aggregate).await.unwrap().len() as u64;
    // `first`'s cache may be behind `second`'s append: it must learn the truth, not conflict.
    let stored = first
        .append(request_in(2, &aggregate, version, vec![progress(7)]))
        .await
        .unwrap();
    assert_eq!(stored[0].envelope.aggregate_version, version + 1);
    let stored = second
        .append(request_in(2, &aggregate, version + 1, vec![progress(8)]))
        .await
        .unwrap();
    assert_eq!(stored[0].envelope.aggregate_version, version + 2);

    // An append retried after its first attempt was stored: the server answers "wrong last
    // sequence" (it checks the expected sequence before the msg id), and the log recognises
    // its own record by the msg id. Here the first attempt went through the other handle,
    // so `second`'s head cache is stale, as after a lost acknowledgement.
    let retried = request_in(2, &aggregate, version + 2, vec![progress(10)]);
    let stored = first.append(retried.clone()).await.unwrap();
    assert_eq!(second.append(retried).await.unwrap(), stored);

    // The same aggregate filed under another partition is checked against the same version.
    match second
        .append(request_in(9, &aggregate, 1, vec![progress(9)]))
        .await
    {
        Err(Error::Conflict { actual, .. }) => assert_eq!(actual, version + 3),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(first.verify_chain().await.unwrap(), version + 3);
}

#[tokio::test]
async fn a_repeated_command_returns_its_first_events_also_past_the_duplicate_window() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let config = JetStreamLogConfig {
        duplicate_window: Duration::from_secs(1),
        ..fast_config()
    };
    let log = open_log(&server.url(), config.clone()).await;
    let other = open_log(&server.url(), config).await;
    let js = jetstream::new(connect(&server.url()).await);
    let aggregate = job(1);
    let cmd = command();
    // A probe: a valid first record of another aggregate, published raw with the command's
    // msg id. While the server remembers the id it answers "duplicate" and stores nothing;
    // once it has forgotten, the probe is stored (harmlessly: a valid record).
    let probe_aggregate = job(77);
    let probe_subject = event_subject(0, &probe_aggregate);
    let probe_record = {
        let new = progress(77);
        let envelope = cairn_schemas::Envelope {
            event_id: new.event_id,
            aggregate: probe_aggregate.clone(),
            aggregate_version: 1,
            recorded_at: T0,
            actor: new.actor,
            correlation: None,
            causation: None,
            command: None,
            traceparent: None,
            prev_hash: [0; 32],
            payload: new.payload,
        };
        crate::log::jetstream::record::encode_record(&[cairn_schemas::encode(&envelope)])
    };
    let probe = || async {
        js.send_publish(
            probe_subject.clone(),
            jetstream::message::PublishMessage::build()
                .payload(probe_record.clone().into())
                .message_id(cmd.to_string())
                .expected_last_subject_sequence(0),
        )
        .await
        .unwrap()
        .await
        .unwrap()
    };
    let first = log
        .append(AppendRequest {
            command: Some(cmd),
            ..request(&aggregate, 0, vec![progress(1), progress(2)])
        })
        .await
        .unwrap();
    let remembered = probe().await;
    let last = log.last_seq().await.unwrap();
    // Same handle, then another handle, with different events and even another version.
    for handle in [&log, &other] {
        let again = handle
            .append(AppendRequest {
                command: Some(cmd),
                ..request(&aggregate, 2, vec![progress(3)])
            })
            .await
            .unwrap();
        assert_eq!(again, first);
        assert_eq!(handle.last_seq().await.unwrap(), last);
    }
    assert!(
        remembered.duplicate,
        "right after the append the server remembers the msg id: {remembered:?}"
    );

    // Wait until the server forgot the msg id (the probe is stored).
    let deadline = Instant::now() + Duration::from_secs(15);
    while probe().await.duplicate {
        assert!(
            Instant::now() < deadline,
            "the server still remembers the msg id"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        other.read_aggregate(&probe_aggregate).await.unwrap().len(),
        1
    );
    let last = other.last_seq().await.unwrap();

    // Past the window, the command index alone answers: still the first events. (The server
    // now maps the msg id to the probe's record, which it would answer with instead.)
    let again = other
        .append(AppendRequest {
            command: Some(cmd),
            ..request(&aggregate, 2, vec![progress(4)])
        })
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(other.last_seq().await.unwrap(), last);
    let commands = js.get_key_value("CAIRN_COMMANDS").await.unwrap();
    let entry = commands.get(cmd.to_string()).await.unwrap().unwrap();
    assert_eq!(entry.as_ref(), (first[0].seq / 1000).to_be_bytes());
}

#[tokio::test]
async fn tail_follows_old_then_new_events_of_every_handle() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let log = open_log(&server.url(), fast_config()).await;
    let other = open_log(&server.url(), fast_config()).await;
    let mut all = Vec::new();
    all.extend(
        log.append(request(&job(1), 0, vec![progress(1), progress(2)]))
            .await
            .unwrap(),
    );
    all.extend(
        log.append(request(&job(2), 0, vec![progress(3)]))
            .await
            .unwrap(),
    );

    let mut tail = log.tail(0);
    // From the second event of the first record: the first one is skipped.
    let mut late_tail = other.tail(all[1].seq);
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(tail.next().await.unwrap().unwrap());
    }
    assert_eq!(seen, all);

    let appended = other
        .append(request(
            &node("kvm-01"),
            0,
            vec![heartbeat_lost(4), heartbeat_lost(5)],
        ))
        .await
        .unwrap();
    all.extend(appended.clone());
    for expected in &appended {
        let got = tokio::time::timeout(Duration::from_secs(10), tail.next())
            .await
            .expect("the tail sees another handle's append")
            .unwrap()
            .unwrap();
        assert_eq!(&got, expected);
    }
    let mut late = Vec::new();
    for _ in 0..4 {
        late.push(late_tail.next().await.unwrap().unwrap());
    }
    assert_eq!(late, all[1..]);

    // Once every handle of the log is gone, the tail ends.
    drop(log);
    assert!(
        tokio::time::timeout(Duration::from_secs(10), tail.next())
            .await
            .expect("the tail ends when the log is dropped")
            .is_none()
    );
}

#[tokio::test]
async fn the_event_stream_refuses_deleting_and_purging_its_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let log = open_log(&server.url(), fast_config()).await;
    let stored = log
        .append(request(&job(1), 0, vec![progress(1), progress(2)]))
        .await
        .unwrap();
    let config = &log.stream().cached_info().config;
    assert!(config.deny_delete && config.deny_purge, "{config:?}");
    let stream_seq = stored[0].seq / 1000;
    let deleted = log.stream().delete_message(stream_seq).await;
    assert!(
        deleted.is_err(),
        "deleting a message succeeded: {deleted:?}"
    );
    let purged = log.stream().purge().await;
    assert!(purged.is_err(), "purging succeeded: {purged:?}");
    // Everything is still there and the chain holds.
    assert_eq!(log.verify_chain().await.unwrap(), 2);
    assert_eq!(log.read_from(0, 10).await.unwrap().len(), 2);
}

/// A stream that allows deleting messages (made by hand, or by an older cairn, which the log
/// uses as it is): a deleted record is named by `verify_chain`.
#[tokio::test]
async fn verify_chain_names_a_deleted_record() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let config = fast_config();
    let js = jetstream::new(connect(&server.url()).await);
    js.create_stream(jetstream::stream::Config {
        name: config.stream.clone(),
        subjects: vec!["cairn.evt.>".into()],
        allow_direct: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let log = open_log(&server.url(), config).await;
    let mut records = Vec::new();
    for round in 0..4u64 {
        for n in 1..=3u8 {
            let stored = log
                .append(request(
                    &job(n),
                    round * 2,
                    vec![progress(round), progress(round + 100)],
                ))
                .await
                .unwrap();
            records.push(stored);
        }
    }
    assert_eq!(log.verify_chain().await.unwrap(), 24);

    // Delete the second record of job 2 (stream sequence 5).
    let victim = &records[4];
    assert_eq!(victim[0].envelope.aggregate, job(2));
    let victim_stream_seq = victim[0].seq / 1000;
    assert!(
        log.stream()
            .delete_message(victim_stream_seq)
            .await
            .unwrap()
    );
    match log.verify_chain().await {
        Err(Error::ChainBroken {
            seq,
            event_id,
            detail,
        }) => {
            assert_eq!(seq, victim[0].seq);
            assert_eq!(event_id, None);
            assert!(detail.contains("missing"), "{detail}");
            assert!(
                detail.contains(&format!("stream sequence {victim_stream_seq}")),
                "{detail}"
            );
        }
        other => panic!("expected a broken chain, got {other:?}"),
    }
    // Deleting the last record of an aggregate is found too.
    let last = records.last().unwrap();
    assert!(
        log.stream()
            .delete_message(last[0].seq / 1000)
            .await
            .unwrap()
    );
    match log.verify_chain().await {
        Err(Error::ChainBroken { seq, .. }) => assert_eq!(seq, victim[0].seq),
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

#[tokio::test]
async fn a_malformed_message_on_an_event_subject_is_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let log = open_log(&server.url(), fast_config()).await;
    let good = log
        .append(request(&job(1), 0, vec![progress(1)]))
        .await
        .unwrap();
    let js = jetstream::new(connect(&server.url()).await);
    let subject = event_subject(0, &job(2));
    let ack = js
        .publish(
            subject.clone(),
            b"\x01\xff\xffnot a record".as_slice().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let bad_seq = ack.sequence * 1000;
    let expect_corrupt = |result: Result<_, Error>, what: &str| match result {
        Err(Error::Corrupt { seq, detail }) => {
            assert_eq!(seq, bad_seq, "{what}");
            assert!(
                detail.contains(&format!("stream sequence {}", ack.sequence)),
                "{what}: {detail}"
            );
            assert!(detail.contains(&subject), "{what}: {detail}");
        }
        Err(other) => panic!("{what}: expected a corrupt record, got {other}"),
        Ok(_) => panic!("{what}: a malformed record was accepted"),
    };
    expect_corrupt(log.read_from(0, 100).await.map(drop), "read_from");
    expect_corrupt(log.last_seq().await.map(drop), "last_seq");
    expect_corrupt(
        log.read_aggregate(&job(2)).await.map(drop),
        "read_aggregate",
    );
    expect_corrupt(
        log.append(request(&job(2), 0, vec![progress(2)]))
            .await
            .map(drop),
        "append to the damaged aggregate",
    );
    match log.verify_chain().await {
        Err(Error::ChainBroken { seq, detail, .. }) => {
            assert_eq!(seq, bad_seq);
            assert!(detail.contains("does not decode"), "{detail}");
        }
        other => panic!("expected a broken chain, got {other:?}"),
    }
    // The rest of the log keeps working, and a tail reports the record and goes on.
    let later = log
        .append(request(&job(1), 1, vec![progress(3)]))
        .await
        .unwrap();
    assert_eq!(
        log.read_aggregate(&job(1)).await.unwrap(),
        [good.clone(), later.clone()].concat()
    );
    let mut tail = log.tail(0);
    assert_eq!(tail.next().await.unwrap().unwrap(), good[0]);
    assert!(matches!(tail.next().await, Some(Err(Error::Corrupt { seq, .. })) if seq == bad_seq));
    assert_eq!(tail.next().await.unwrap().unwrap(), later[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_acknowledged_across_a_server_kill_are_stored_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = NatsServer::start(dir.path());
    let url = server.url();
    let log = open_log(&url, fast_config()).await;
    const WRITERS: u8 = 6;
    const APPENDS: u64 = 40;
    let done = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let log = log.clone();
        let done = Arc::clone(&done);
        writers.push(tokio::spawn(async move {
            let aggregate = job(writer + 1);
            let mut acknowledged = Vec::new();
            let mut n_retries = 0;
            for n in 0..APPENDS {
                let append = AppendRequest {
                    command: Some(command()),
                    ..request(&aggregate, n, vec![progress(n)])
                };
                // The contract: after a storage error, retry with the same command id.
                let stored = loop {
                    match log.append(append.clone()).await {
                        Ok(stored) => break stored,
                        Err(Error::Storage { .. }) => n_retries += 1,
                        Err(other) => panic!("append {n} of {aggregate}: {other}"),
                    }
                };
                assert_eq!(stored[0].envelope.aggregate_version, n + 1);
                acknowledged.push(stored[0].clone());
                done.fetch_add(1, Ordering::SeqCst);
            }
            (acknowledged, n_retries)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.load(Ordering::SeqCst) < 30 {
        assert!(Instant::now() < deadline, "appends do not progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before_kill = done.load(Ordering::SeqCst);
    tokio::task::block_in_place(|| {
        server.kill9();
        server.restart();
        server.wait_healthy();
    });
    let mut acknowledged = Vec::new();
    for writer in writers {
        let (events, _) = writer.await.unwrap();
        acknowledged.extend(events);
    }
    assert!(
        before_kill < usize::from(WRITERS) * APPENDS as usize,
        "the kill came too late"
    );

    let all = log.read_from(0, usize::MAX).await.unwrap();
    assert_eq!(
        all.len(),
        usize::from(WRITERS) * APPENDS as usize,
        "every append exactly once"
    );
    let unique: HashSet<_> = ids(&all).into_iter().collect();
    assert_eq!(unique.len(), all.len());
    for event in &acknowledged {
        assert!(
            all.contains(event),
            "acknowledged event {} is stored as returned",
            event.seq
        );
    }
    for writer in 0..WRITERS {
        let versions: Vec<u64> = log
            .read_aggregate(&job(writer + 1))
            .await
            .unwrap()
            .iter()
            .map(|e| e.envelope.aggregate_version)
            .collect();
        assert_eq!(versions, (1..=APPENDS).collect::<Vec<_>>());
    }
    assert_eq!(log.verify_chain().await.unwrap(), all.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_keeps_appending_with_one_node_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = NatsCluster::start(dir.path());
    let urls = cluster.urls();
    let config = JetStreamLogConfig {
        replicas: 3,
        ..fast_config()
    };
    let log = open_log(&urls, config).await;
    let aggregate = job(1);
    let mut all = Vec::new();
    for n in 0..5 {
        all.extend(
            log.append(request(&aggregate, n, vec![progress(n)]))
                .await
                .unwrap(),
        );
    }
    // Kill the stream's leader: the worst single node to lose.
    let info = log.stream().get_info().await.unwrap();
    let leader = info
        .cluster
        .and_then(|c| c.leader)
        .expect("a stream leader");
    let victim = cluster
        .servers
        .iter()
        .position(|s| {
            s.dir
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("nats-{leader}-"))
        })
        .expect("the leader is one of the servers");
    tokio::task::block_in_place(|| cluster.servers[victim].kill9());
    for n in 5..15 {
        all.extend(
            log.append(request(&aggregate, n, vec![progress(n)]))
                .await
                .unwrap(),
        );
    }
    assert_eq!(log.read_aggregate(&aggregate).await.unwrap(), all);
    assert_eq!(log.read_from(0, usize::MAX).await.unwrap(), all);
    assert_eq!(log.verify_chain().await.unwrap(), 15);
}

/// A tail polled inside `select!` loses its pending `next()` future every time another branch
/// wins; it must keep its consumer (not open a new one per call) and lose no event.
#[tokio::test]
async fn a_tail_whose_next_is_dropped_keeps_one_consumer_and_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let log = open_log(&server.url(), fast_config()).await;
    let mut tail = log.tail(0);
    let first = log
        .append(request(&job(1), 0, vec![progress(1)]))
        .await
        .unwrap();
    assert_eq!(tail.next().await.unwrap().unwrap(), first[0]);
    for _ in 0..50 {
        // Nothing new: the wait is cut short, as a select! over a timer would.
        assert!(
            tokio::time::timeout(Duration::from_millis(5), tail.next())
                .await
                .is_err()
        );
    }
    let client = connect(&server.url()).await;
    let js = jetstream::new(client);
    let mut stream = js.get_stream("CAIRN_EVENTS").await.unwrap();
    let consumers = stream.info().await.unwrap().state.consumer_count;
    assert!(
        consumers <= 1,
        "{consumers} consumers after 50 dropped waits"
    );
    let second = log
        .append(request(&job(1), 1, vec![progress(2)]))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), tail.next())
        .await
        .expect("the tail still delivers")
        .unwrap()
        .unwrap();
    assert_eq!(got, second[0]);
}

fn audit_key(byte: u8) -> crate::audit::AuditKey {
    crate::audit::AuditKey::from_bytes([byte; 32])
}

fn keyed_config(byte: u8) -> JetStreamLogConfig {
    JetStreamLogConfig {
        audit_key: Some(audit_key(byte)),
        ..fast_config()
    }
}

fn chain_broken(result: Result<u64, Error>) -> (u64, String) {
    match result {
        Err(Error::ChainBroken { seq, detail, .. }) => (seq, detail),
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

#[tokio::test]
async fn a_log_opened_with_the_audit_key_is_keyed_from_then_on_and_needs_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    // Written without a key first: those links stay plain.
    let plain = open_log(&server.url(), fast_config()).await;
    assert_eq!(plain.keyed_from(), None);
    plain
        .append(request(&job(1), 0, vec![progress(1), progress(2)]))
        .await
        .unwrap();
    let old_handle = plain.clone();
    drop(plain);

    let keyed = open_log(&server.url(), keyed_config(1)).await;
    let from = keyed.keyed_from().expect("keyed from now on");
    assert_eq!(from, 2 * 1000, "the first record after the plain one");
    // The same aggregate continues across the switch; a new one starts keyed.
    keyed
        .append(request(&job(1), 2, vec![progress(3)]))
        .await
        .unwrap();
    keyed
        .append(request(&job(2), 0, vec![progress(4)]))
        .await
        .unwrap();
    assert_eq!(keyed.verify_chain().await.unwrap(), 4);
    // A second orchestrator with the key learns the same starting point.
    let other = open_log(&server.url(), keyed_config(1)).await;
    assert_eq!(other.keyed_from(), Some(from));
    other
        .append(request(&job(2), 1, vec![progress(5)]))
        .await
        .unwrap();
    assert_eq!(keyed.verify_chain().await.unwrap(), 5);

    // Without the key the log does not open, and a handle opened before the switch refuses
    // to append plain links after keyed ones.
    let refused = JetStreamLog::open(connect(&server.url()).await, fast_config()).await;
    match refused {
        Err(Error::AuditKeyRequired { keyed_from, .. }) => assert_eq!(keyed_from, from),
        other => panic!("opened without the audit key: {other:?}"),
    }
    let err = old_handle
        .append(request(&job(2), 2, vec![progress(6)]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AuditKeyRequired { .. }), "{err:?}");
    assert_eq!(keyed.verify_chain().await.unwrap(), 5);

    // Another key: the first link to a keyed event (job 2's second event, to its first) does
    // not match. (The first keyed record links to a plain event with a plain hash.)
    let wrong = open_log(&server.url(), keyed_config(2)).await;
    let (seq, detail) = chain_broken(wrong.verify_chain().await);
    assert_eq!(seq, from + 2000, "{detail}");
    assert!(detail.contains("prev_hash"), "{detail}");
}

#[tokio::test]
async fn a_record_rewritten_without_the_key_breaks_a_keyed_chain() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let log = open_log(&server.url(), keyed_config(1)).await;
    log.append(request(&job(1), 0, vec![progress(1)]))
        .await
        .unwrap();
    // Someone with the bus's credentials but not the audit key publishes the aggregate's next
    // event with a plain link, as a rewrite with recomputed hashes would.
    let first = log.read_from(1, 1).await.unwrap().remove(0);
    let forged = {
        let new = progress(2);
        let envelope = cairn_schemas::Envelope {
            event_id: new.event_id,
            aggregate: job(1),
            aggregate_version: 2,
            recorded_at: T0,
            actor: new.actor,
            correlation: None,
            causation: None,
            command: None,
            traceparent: None,
            prev_hash: *blake3::hash(&cairn_schemas::encode(&first.envelope)).as_bytes(),
            payload: new.payload,
        };
        crate::log::jetstream::record::encode_record(&[cairn_schemas::encode(&envelope)])
    };
    let js = jetstream::new(connect(&server.url()).await);
    js.publish(event_subject(0, &job(1)), forged.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let (seq, detail) = chain_broken(log.verify_chain().await);
    assert_eq!(seq, 2000, "{detail}");
    assert!(detail.contains("not keyed"), "{detail}");
}

#[tokio::test]
async fn the_running_digest_of_a_jetstream_log_counts_its_events() {
    use crate::audit::RunningDigest;
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let log = open_log(&server.url(), keyed_config(1)).await;
    for n in 0..5u64 {
        log.append(request(
            &job(n as u8),
            0,
            vec![progress(n), progress(n + 10)],
        ))
        .await
        .unwrap();
    }
    let last = log.last_seq().await.unwrap();
    let whole = log.extend_digest(RunningDigest::EMPTY, last).await.unwrap();
    assert_eq!(whole.seq, last);
    // Extending in two steps gives the same digest as in one.
    let events = log.read_from(1, 100).await.unwrap();
    let middle = events[4].seq;
    let half = log
        .extend_digest(RunningDigest::EMPTY, middle)
        .await
        .unwrap();
    assert_eq!(half.seq, middle);
    assert_eq!(log.extend_digest(half, last).await.unwrap(), whole);
    assert_eq!(
        whole.events, 10,
        "sequence numbers are not consecutive, events are counted"
    );
    // The digest is over the events' bytes: a verifier needs no audit key.
    let plain = JetStreamLog::open(connect(&server.url()).await, keyed_config(9))
        .await
        .unwrap();
    assert_eq!(
        plain
            .extend_digest(RunningDigest::EMPTY, last)
            .await
            .unwrap(),
        whole
    );
}
