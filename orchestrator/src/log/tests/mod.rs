//! Tests of the event log against its contract (`super` module docs), on the sled
//! implementation: appends and reads, concurrency, idempotency, the hash chain, crash safety.

mod basic;
mod chain;
mod conflict;
mod crash;
mod jetstream;
mod keyed;
mod props;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use cairn_schemas::{Aggregate, CommandId, EventId, JobEvent, JobId, NodeEvent, NodeId, StepId};

use super::{AppendRequest, NewEvent, SledLog, SledLogConfig};

/// Fixed base time for ids and `recorded_at`.
const T0: u64 = 1_767_225_600_000;

fn open(dir: &Path) -> SledLog {
    SledLog::open(SledLogConfig::new(dir.join("log"))).unwrap()
}

/// A fresh id each call, unique within the test process.
fn fresh_rand() -> [u8; 10] {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut rand = [0u8; 10];
    rand[2..].copy_from_slice(&n.to_be_bytes());
    rand
}

fn job(n: u8) -> Aggregate {
    Aggregate::Job(JobId::new_v7(T0, [n; 10]))
}

fn node(name: &str) -> Aggregate {
    Aggregate::Node(NodeId::new(name).unwrap())
}

fn command() -> CommandId {
    CommandId::new_v7(T0, fresh_rand())
}

/// A job event whose content identifies it (`bytes_done = tag`).
fn progress(tag: u64) -> NewEvent {
    NewEvent::new(
        EventId::new_v7(T0 + tag, fresh_rand()),
        "system:test",
        JobEvent::StepProgressed {
            step: StepId::new_v7(T0, [9; 10]),
            attempt: 1,
            bytes_done: tag,
            bytes_total: 1 << 40,
        },
    )
}

fn heartbeat_lost(tag: u64) -> NewEvent {
    NewEvent::new(
        EventId::new_v7(T0 + tag, fresh_rand()),
        "system:test",
        NodeEvent::NodeHeartbeatLost { last_seen: tag },
    )
}

/// An append of `events` to `aggregate` at `expected_version`, recorded at `T0`.
fn request(aggregate: &Aggregate, expected_version: u64, events: Vec<NewEvent>) -> AppendRequest {
    AppendRequest {
        partition: 0,
        aggregate: aggregate.clone(),
        expected_version,
        command: None,
        recorded_at: T0,
        events,
    }
}
