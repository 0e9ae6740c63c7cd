//! Event log benchmark: durable append rates, replay rate, and raw sled as a baseline.
//!
//! `cargo run --release -p cairn-orchestrator --example log_bench [-- DIR]`
//!
//! Runs in a temporary directory under DIR (default: the system temp dir), which should be on
//! the disk the log would live on: flush rates are fsync rates of that disk.

use std::path::Path;
use std::time::Instant;

use cairn_orchestrator::log::{AppendRequest, EventLog, NewEvent, SledLog, SledLogConfig};
use cairn_schemas::{Aggregate, EventId, JobEvent, JobId, StepId};

const T0: u64 = 1_767_225_600_000;
const N_AGGREGATES: u64 = 1_000;
const REPLAY_EVENTS: u64 = 1_000_000;

/// A realistic job event: progress of a transfer, with correlation and trace context.
fn event(n: u64, job: JobId) -> NewEvent {
    let mut rand = [0u8; 10];
    rand[2..].copy_from_slice(&n.to_be_bytes());
    NewEvent {
        event_id: EventId::new_v7(T0 + n, rand),
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

fn job(idx: u64) -> JobId {
    let mut rand = [0u8; 10];
    rand[2..].copy_from_slice(&idx.to_be_bytes());
    JobId::new_v7(T0, rand)
}

/// Appends `n_events` in appends of `batch` events, one appender, round-robin over
/// aggregates. Returns events/s.
async fn append_sequential(log: &SledLog, n_events: u64, batch: u64, seq_base: u64) -> f64 {
    let mut versions = vec![0u64; N_AGGREGATES as usize];
    // Start from the versions already in the log (the log may hold earlier runs).
    for (idx, version) in versions.iter_mut().enumerate() {
        *version = log
            .read_aggregate(&Aggregate::Job(job(idx as u64)))
            .await
            .unwrap()
            .len() as u64;
    }
    let started = Instant::now();
    let mut n_done = 0;
    let mut append_idx = 0u64;
    while n_done < n_events {
        let agg_idx = (append_idx % N_AGGREGATES) as usize;
        let job_id = job(agg_idx as u64);
        let events = (0..batch.min(n_events - n_done))
            .map(|n| event(seq_base + n_done + n, job_id))
            .collect();
        let stored = log
            .append(AppendRequest {
                partition: 0,
                aggregate: Aggregate::Job(job_id),
                expected_version: versions[agg_idx],
                command: None,
                recorded_at: T0 + n_done,
                events,
            })
            .await
            .unwrap();
        versions[agg_idx] += stored.len() as u64;
        n_done += stored.len() as u64;
        append_idx += 1;
    }
    n_done as f64 / started.elapsed().as_secs_f64()
}

/// `n_tasks` appenders of one event each, concurrently (group commit). Returns events/s.
async fn append_concurrent(log: &SledLog, n_tasks: u64, per_task: u64) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..n_tasks)
        .map(|task_idx| {
            let log = log.clone();
            tokio::spawn(async move {
                let job_id = job(1_000_000 + task_idx);
                for version in 0..per_task {
                    log.append(AppendRequest {
                        partition: 0,
                        aggregate: Aggregate::Job(job_id),
                        expected_version: version,
                        command: None,
                        recorded_at: T0,
                        events: vec![event(version, job_id)],
                    })
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (n_tasks * per_task) as f64 / started.elapsed().as_secs_f64()
}

/// Raw sled: insert `n` values of `value_len` bytes, flushing every `batch` inserts.
fn sled_baseline(dir: &Path, n: u64, batch: u64, value_len: usize) -> f64 {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(256 << 20)
        .open()
        .unwrap();
    let tree = db.open_tree("raw").unwrap();
    let value = vec![0x5au8; value_len];
    let started = Instant::now();
    for idx in 0..n {
        tree.insert(idx.to_be_bytes(), value.as_slice()).unwrap();
        if (idx + 1) % batch == 0 {
            db.flush().unwrap();
        }
    }
    db.flush().unwrap();
    n as f64 / started.elapsed().as_secs_f64()
}

fn report(name: &str, rate: f64) {
    println!("{name:<58} {rate:>12.0} events/s");
}

#[tokio::main]
async fn main() {
    let base = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base).unwrap();
    println!("benchmark directory: {}", dir.path().display());
    let sample = cairn_schemas::encode(&cairn_schemas::Envelope {
        event_id: EventId::new_v7(T0, [0; 10]),
        aggregate: Aggregate::Job(job(0)),
        aggregate_version: 1,
        recorded_at: T0,
        actor: "node:kvm-01".into(),
        correlation: Some(job(0)),
        causation: None,
        command: None,
        traceparent: event(0, job(0)).traceparent,
        prev_hash: [0; 32],
        payload: event(0, job(0)).payload,
    });
    println!("encoded event size: {} bytes", sample.len());

    // Raw sled, same value size, same flush pattern.
    let raw_batched = sled_baseline(&dir.path().join("raw-256"), 200_000, 256, sample.len());
    report("raw sled insert, flush every 256", raw_batched);
    let raw_single = sled_baseline(&dir.path().join("raw-1"), 2_000, 1, sample.len());
    report("raw sled insert, flush every 1", raw_single);

    let log_path = dir.path().join("log");
    {
        let log = SledLog::open(SledLogConfig::new(&log_path)).unwrap();
        let rate = append_sequential(&log, 2_000, 1, 0).await;
        report("log append, 1 event per append (1 flush each)", rate);
        let before = log.stats();
        let rate = append_concurrent(&log, 64, 50).await;
        let after = log.stats();
        report("log append, 64 concurrent appenders of 1 event", rate);
        println!(
            "    group commit: {} appends, {} flushes",
            after.n_appends - before.n_appends,
            after.n_flushes - before.n_flushes
        );
        let n_so_far = log.last_seq().await.unwrap();
        let rate = append_sequential(&log, REPLAY_EVENTS - n_so_far, 256, n_so_far).await;
        report("log append, 256 events per append (1 flush each)", rate);
        assert_eq!(log.last_seq().await.unwrap(), REPLAY_EVENTS);
    }

    // Replay after reopening (sled's cache cold, the OS page cache warm), then again (both
    // warm): read_from in pages, decoding every envelope.
    let log = SledLog::open(SledLogConfig::new(&log_path)).unwrap();
    for pass in ["cold", "warm"] {
        let started = Instant::now();
        let mut next = 1;
        let mut n_read = 0u64;
        let mut bytes_done_sum = 0u64;
        loop {
            let page = log.read_from(next, 10_000).await.unwrap();
            let Some(last) = page.last() else { break };
            next = last.seq + 1;
            n_read += page.len() as u64;
            for stored in &page {
                if let cairn_schemas::Event::Job(JobEvent::StepProgressed { bytes_done, .. }) =
                    stored.envelope.payload
                {
                    bytes_done_sum = bytes_done_sum.wrapping_add(bytes_done);
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(n_read, REPLAY_EVENTS);
        report(
            &format!("replay 1,000,000 events, {pass} (read_from 10,000 + decode)"),
            n_read as f64 / elapsed,
        );
        println!("    checksum {bytes_done_sum:#x}");
    }

    let started = Instant::now();
    let n = log.verify_chain().await.unwrap();
    report(
        "verify_chain over 1,000,000 events",
        n as f64 / started.elapsed().as_secs_f64(),
    );
    let size: u64 = walk_size(&log_path);
    println!("log size on disk: {} MiB", size >> 20);
}

fn walk_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| {
                    let meta = entry.metadata().unwrap();
                    if meta.is_dir() {
                        walk_size(&entry.path())
                    } else {
                        meta.len()
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}
