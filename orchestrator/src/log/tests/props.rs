//! Property: whatever sequence of appends (with conflicts and repeated commands) a log sees,
//! it returns exactly the acknowledged events, before and after reopening, and its chain
//! verifies.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::log::{EventLog, StoredEvent};

#[derive(Debug, Clone)]
struct Op {
    aggregate_idx: usize,
    n_events: usize,
    /// Added to the correct expected version: 0 is right, anything else must conflict.
    version_skew: i8,
    /// Index into a small pool of command ids, so that some repeat.
    command: Option<usize>,
}

fn op() -> impl Strategy<Value = Op> {
    (
        0..3usize,
        1..4usize,
        prop_oneof![4 => Just(0i8), 1 => Just(-1i8), 1 => Just(1i8)],
        proptest::option::of(0..6usize),
    )
        .prop_map(|(aggregate_idx, n_events, version_skew, command)| Op {
            aggregate_idx,
            n_events,
            version_skew,
            command,
        })
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let aggregates = [job(1), job(2), node("kvm-01")];
    let commands: Vec<_> = (0..6).map(|_| command()).collect();
    runtime.block_on(async {
        let mut versions = [0u64; 3];
        let mut acknowledged: Vec<StoredEvent> = Vec::new();
        let mut by_command: HashMap<usize, Vec<StoredEvent>> = HashMap::new();
        {
            let log = open(dir.path());
            for (tag, op) in ops.iter().enumerate() {
                let aggregate = &aggregates[op.aggregate_idx];
                let events = (0..op.n_events)
                    .map(|n| match aggregate {
                        cairn_schemas::Aggregate::Node(_) => heartbeat_lost((tag * 10 + n) as u64),
                        _ => progress((tag * 10 + n) as u64),
                    })
                    .collect();
                let expected =
                    versions[op.aggregate_idx].saturating_add_signed(op.version_skew.into());
                let result = log
                    .append(AppendRequest {
                        partition: 0,
                        command: op.command.map(|idx| commands[idx]),
                        ..request(aggregate, expected, events)
                    })
                    .await;
                match (op.command.and_then(|idx| by_command.get(&idx)), result) {
                    (Some(first), Ok(stored)) => prop_assert_eq!(first, &stored),
                    (Some(_), Err(err)) => prop_assert!(false, "repeated command failed: {}", err),
                    (None, Ok(stored)) => {
                        prop_assert_eq!(expected, versions[op.aggregate_idx]);
                        versions[op.aggregate_idx] += stored.len() as u64;
                        if let Some(idx) = op.command {
                            by_command.insert(idx, stored.clone());
                        }
                        acknowledged.extend(stored);
                    }
                    (None, Err(err)) => {
                        prop_assert!(err.is_conflict(), "{}", err);
                        prop_assert_ne!(expected, versions[op.aggregate_idx]);
                    }
                }
            }
            prop_assert_eq!(&log.read_from(1, usize::MAX).await.unwrap(), &acknowledged);
        }
        let log = open(dir.path());
        prop_assert_eq!(log.last_seq().await.unwrap(), acknowledged.len() as u64);
        prop_assert_eq!(&log.read_from(1, usize::MAX).await.unwrap(), &acknowledged);
        for (idx, aggregate) in aggregates.iter().enumerate() {
            let expected: Vec<_> = acknowledged
                .iter()
                .filter(|e| &e.envelope.aggregate == aggregate)
                .cloned()
                .collect();
            prop_assert_eq!(log.read_aggregate(aggregate).await.unwrap(), expected);
            prop_assert_eq!(
                log.read_aggregate(aggregate).await.unwrap().len() as u64,
                versions[idx]
            );
        }
        prop_assert_eq!(log.verify_chain().await.unwrap(), acknowledged.len() as u64);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn appends_survive_reopen_exactly(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops)?;
    }
}
