//! Optimistic concurrency: of two appends with the same expected version exactly one wins.

use std::sync::Arc;

use tokio::sync::Barrier;

use super::*;
use crate::log::{Error, EventLog};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_expected_version_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let aggregate = job(1);
    for round in 0..50u64 {
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = (0..2u64)
            .map(|racer| {
                let (log, aggregate, barrier) = (log.clone(), aggregate.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let events = vec![progress(round * 10 + racer)];
                    log.append(request(&aggregate, round, events)).await
                })
            })
            .collect();
        let mut n_won = 0;
        for racer in racers {
            match racer.await.unwrap() {
                Ok(stored) => {
                    n_won += 1;
                    assert_eq!(stored[0].envelope.aggregate_version, round + 1);
                    assert_eq!(stored[0].seq, round + 1);
                }
                Err(Error::Conflict {
                    expected, actual, ..
                }) => {
                    assert_eq!((expected, actual), (round, round + 1));
                }
                Err(err) => panic!("round {round}: unexpected error {err}"),
            }
        }
        assert_eq!(n_won, 1, "round {round}");
    }
    let events = log.read_aggregate(&aggregate).await.unwrap();
    assert!(
        events
            .iter()
            .map(|e| e.envelope.aggregate_version)
            .eq(1..=50)
    );
    assert_eq!(log.verify_chain().await.unwrap(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_racers_on_many_aggregates_never_fork_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    // 8 tasks race on 2 aggregates, each re-reading the version after a conflict.
    let tasks: Vec<_> = (0..8u64)
        .map(|task_idx| {
            let log = log.clone();
            tokio::spawn(async move {
                let aggregate = job((task_idx % 2) as u8);
                let mut n_ok = 0;
                while n_ok < 10 {
                    let version = log.read_aggregate(&aggregate).await.unwrap().len() as u64;
                    match log
                        .append(request(&aggregate, version, vec![progress(task_idx)]))
                        .await
                    {
                        Ok(_) => n_ok += 1,
                        Err(err) if err.is_conflict() => {}
                        Err(err) => panic!("{err}"),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    for aggregate in [job(0), job(1)] {
        let events = log.read_aggregate(&aggregate).await.unwrap();
        assert!(
            events
                .iter()
                .map(|e| e.envelope.aggregate_version)
                .eq(1..=40)
        );
    }
    assert_eq!(log.verify_chain().await.unwrap(), 80);
}
