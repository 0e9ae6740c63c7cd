//! JetStream event log benchmark: append and replay rates of `JetStreamLog`, against raw
//! JetStream publishes and a raw consumer on the same server in the same run.
//!
//! `cargo run --release -p cairn-orchestrator --example jetstream_bench [-- SCALE]`
//!
//! Starts its own `nats-server` (2.10 or newer on `PATH`, or `$NATS_SERVER`) with JetStream in
//! a temporary directory. SCALE (default 1.0) multiplies every message count.

use std::time::Instant;

use async_nats::jetstream;
use cairn_orchestrator::log::{
    AppendRequest, EventLog, JetStreamLog, JetStreamLogConfig, NewEvent,
};
use cairn_schemas::{Aggregate, CommandId, Envelope, EventId, JobEvent, JobId, StepId};
use cairn_tests::nats::NatsServer;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

const T0: u64 = 1_767_225_600_000;
const PARTITIONS: u16 = 16;
const AGGREGATES_PER_PARTITION: u64 = 100;
const RAW_IN_FLIGHT: usize = 256;

type AckFuture = std::pin::Pin<
    Box<
        dyn Future<
                Output = Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
            > + Send,
    >,
>;

fn rand_of(n: u64) -> [u8; 10] {
    let mut rand = [0u8; 10];
    rand[2..].copy_from_slice(&n.to_be_bytes());
    rand
}

/// A realistic job event: progress of a transfer, with correlation and trace context.
fn event(n: u64, job: JobId) -> NewEvent {
    NewEvent {
        event_id: EventId::new_v7(T0 + n, rand_of(n)),
        actor: "node:kvm-01".into(),
        correlation: Some(job),
        causation: None,
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        payload: JobEvent::StepProgressed {
            step: StepId::new_v7(T0, [7; 10]),
            attempt: 1,
            bytes_done: n << 20,
            bytes_total: 100 << 30,
        }
        .into(),
    }
}

fn job(partition: u16, idx: u64) -> JobId {
    JobId::new_v7(T0, rand_of((u64::from(partition) << 32) | idx))
}

/// The bytes of a typical one-event record: what the raw publish sends.
fn typical_record_len() -> usize {
    let job = job(0, 0);
    let new = event(1, job);
    let envelope = Envelope {
        event_id: new.event_id,
        aggregate: Aggregate::Job(job),
        aggregate_version: 12,
        recorded_at: T0,
        actor: new.actor,
        correlation: new.correlation,
        causation: new.causation,
        command: None,
        traceparent: new.traceparent,
        prev_hash: [0xab; 32],
        payload: new.payload,
    };
    // Version byte, count, length, envelope.
    3 + cairn_schemas::encode(&envelope).len()
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Raw JetStream publishes, `RAW_IN_FLIGHT` acks outstanding (like `nats bench js pub
/// --batch`). Returns msgs/s.
async fn raw_publish(js: &jetstream::Context, n: u64, payload: bytes::Bytes) -> f64 {
    let started = Instant::now();
    let mut in_flight: FuturesUnordered<AckFuture> = FuturesUnordered::new();
    for idx in 0..n {
        if in_flight.len() >= RAW_IN_FLIGHT {
            in_flight.next().await.unwrap().unwrap();
        }
        let ack = js
            .publish(format!("bench.raw.{}", idx % 16), payload.clone())
            .await
            .unwrap();
        in_flight.push(ack.into_future());
    }
    while let Some(ack) = in_flight.next().await {
        ack.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Raw replay of the `BENCH` stream with an ordered consumer. Returns msgs/s.
async fn raw_replay(js: &jetstream::Context, n: u64) -> f64 {
    let stream = js.get_stream("BENCH").await.unwrap();
    let started = Instant::now();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    for _ in 0..n {
        messages.next().await.unwrap().unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// One owner appending to its partition's aggregates, one append at a time, `batch` events
/// each. Returns events/s.
async fn append_partition(
    log: &JetStreamLog,
    partition: u16,
    n_appends: u64,
    batch: u64,
    with_commands: bool,
    versions: &mut [u64],
) -> f64 {
    let started = Instant::now();
    for idx in 0..n_appends {
        let agg = (idx % AGGREGATES_PER_PARTITION) as usize;
        let job = job(partition, agg as u64);
        let tag = (u64::from(partition) << 40) | (versions[agg] << 8) | (agg as u64) << 24;
        let events: Vec<NewEvent> = (0..batch).map(|n| event(tag + n, job)).collect();
        let command = with_commands.then(|| CommandId::new_v7(T0 + idx, rand_of(tag | 0xff)));
        let stored = log
            .append(AppendRequest {
                aggregate: Aggregate::Job(job),
                partition,
                expected_version: versions[agg],
                command,
                recorded_at: T0 + idx,
                events,
            })
            .await
            .unwrap();
        versions[agg] += stored.len() as u64;
    }
    (n_appends * batch) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let scale: f64 = std::env::args().nth(1).map_or(Ok(1.0), |s| s.parse())?;
    let count = |n: u64| ((n as f64 * scale) as u64).max(100);
    let dir = tempfile::tempdir()?;
    let server = NatsServer::start(dir.path());
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client.clone());
    let load_before = load();

    let record_len = typical_record_len();
    let payload = bytes::Bytes::from(vec![0x5a; record_len]);
    js.create_stream(jetstream::stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.raw.>".into()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let n_raw = count(100_000);
    // Warm-up, then the measured run.
    raw_publish(&js, count(5_000), payload.clone()).await;
    let raw = raw_publish(&js, n_raw, payload.clone()).await;
    let raw_sync = {
        let n = count(2_000);
        let started = Instant::now();
        for idx in 0..n {
            js.publish(format!("bench.raw.{}", idx % 16), payload.clone())
                .await?
                .await?;
        }
        n as f64 / started.elapsed().as_secs_f64()
    };
    let raw_replay_rate = raw_replay(&js, n_raw).await;

    let log = JetStreamLog::open(client.clone(), JetStreamLogConfig::default()).await?;
    let mut versions = vec![vec![0u64; AGGREGATES_PER_PARTITION as usize]; PARTITIONS as usize];
    // Warm-up: every aggregate's head is cached afterwards, as in a running owner.
    for (partition, v) in versions.iter_mut().enumerate() {
        append_partition(
            &log,
            partition as u16,
            AGGREGATES_PER_PARTITION,
            1,
            false,
            v,
        )
        .await;
    }
    let n_seq = count(5_000);
    let one = append_partition(&log, 0, n_seq, 1, false, &mut versions[0]).await;
    let one_cmd = append_partition(&log, 1, count(2_000), 1, true, &mut versions[1]).await;
    let one_batch10 = append_partition(&log, 2, count(1_000), 10, false, &mut versions[2]).await;

    let n_each = count(1_000);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (partition, mut v) in versions.into_iter().enumerate() {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            append_partition(&log, partition as u16, n_each, 1, false, &mut v).await;
        }));
    }
    for task in tasks {
        task.await?;
    }
    let all16 = (n_each * u64::from(PARTITIONS)) as f64 / started.elapsed().as_secs_f64();

    let last = log.last_seq().await?;
    let started = Instant::now();
    let mut n_replayed = 0u64;
    let mut next = 1;
    loop {
        let batch = log.read_from(next, 16_384).await?;
        let Some(tail) = batch.last() else { break };
        next = tail.seq + 1;
        n_replayed += batch.len() as u64;
    }
    let replay = n_replayed as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut tail = log.tail(0);
    let mut n_tailed = 0u64;
    while let Some(event) = tail.next().await {
        n_tailed += 1;
        if event?.seq >= last {
            break;
        }
    }
    let tail_rate = n_tailed as f64 / started.elapsed().as_secs_f64();
    let load_after = load();
    assert_eq!(n_tailed, n_replayed);

    let verify_started = Instant::now();
    let n_verified = log.verify_chain().await?;
    let verify = n_verified as f64 / verify_started.elapsed().as_secs_f64();

    println!("nats-server: {}", server.url());
    println!("record payload: {record_len} bytes; log size: {n_replayed} events");
    println!("load average before: {load_before}; after: {load_after}");
    println!();
    println!("| measurement | events/s | ratio to raw pipelined publish |");
    println!("|---|---:|---:|");
    let row = |name: &str, rate: f64, base: f64| {
        println!("| {name} | {rate:.0} | {:.3} |", rate / base);
    };
    row("raw JetStream publish, 256 in flight (baseline)", raw, raw);
    row("raw JetStream publish, 1 in flight", raw_sync, raw);
    row("append, one partition, 1 event per append", one, raw);
    row(
        "append, one partition, 1 event, with command id",
        one_cmd,
        raw,
    );
    row(
        "append, one partition, 10 events per append",
        one_batch10,
        raw,
    );
    row(
        "append, 16 partitions concurrently, 1 event per append",
        all16,
        raw,
    );
    println!();
    println!("| replay | events/s | ratio to raw ordered-consumer replay |");
    println!("|---|---:|---:|");
    row(
        "raw ordered consumer (baseline)",
        raw_replay_rate,
        raw_replay_rate,
    );
    row("read_from, batches of 16,384", replay, raw_replay_rate);
    row("tail from 0", tail_rate, raw_replay_rate);
    row("verify_chain", verify, raw_replay_rate);
    Ok(())
}
