//! Crash safety: a process appending in a loop is killed with SIGKILL; every append it had
//! acknowledged must be there after reopening, and the chain must verify.
//!
//! The test runs itself as the appender: it starts its own test binary with an environment
//! variable that turns this same test function into the appender loop.
//!
//! SIGKILL loses what sled still holds in its own write buffers, so this catches an
//! acknowledgement before the flush; it does not simulate power loss (the kernel's page cache
//! survives a killed process).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cairn_schemas::JobId;

use super::*;
use crate::log::EventLog;

/// Set in the child: the log directory to append to.
const CHILD_ENV: &str = "CAIRN_TEST_LOG_APPENDER_DIR";
/// Acknowledged events after which the child is killed, per round.
const KILL_AFTER: usize = 400;
/// How long the parent waits for the next acknowledgement before giving up.
const STALL_LIMIT: Duration = Duration::from_secs(120);

/// The child: four tasks append forever, printing `ACK <seq>` once an event is acknowledged.
fn run_appender(dir: &str) -> ! {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let log = SledLog::open(SledLogConfig::new(dir)).unwrap();
        // Fresh aggregates per run, so versions start at 0 after every restart.
        let now = crate::clock::wall_ms();
        for task_idx in 0..4u8 {
            let log = log.clone();
            tokio::spawn(async move {
                let mut rand = [task_idx; 10];
                rand[..4].copy_from_slice(&std::process::id().to_be_bytes());
                let aggregate = cairn_schemas::Aggregate::Job(JobId::new_v7(now, rand));
                let mut version = 0u64;
                loop {
                    let n_events = 1 + (version % 3) as usize;
                    let events = (0..n_events)
                        .map(|n| progress(version + n as u64))
                        .collect();
                    let stored = match log.append(request(&aggregate, version, events)).await {
                        Ok(stored) => stored,
                        Err(err) => {
                            // The parent sees stdout close and fails the round.
                            eprintln!("appender: {err}");
                            std::process::exit(1);
                        }
                    };
                    version += stored.len() as u64;
                    let mut out = std::io::stdout().lock();
                    for event in &stored {
                        writeln!(out, "ACK {}", event.seq).unwrap();
                    }
                    out.flush().unwrap();
                }
            });
        }
        std::future::pending::<()>().await;
    });
    unreachable!("the appender loops until it is killed")
}

#[test]
fn kill_9_loses_no_acknowledged_event() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        run_appender(&dir);
    }
    // Test names are module paths without the crate name.
    let test_name = format!(
        "{}::kill_9_loses_no_acknowledged_event",
        module_path!().split_once("::").unwrap().1
    );
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let mut all_acked = Vec::new();
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([&test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &log_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Lines come through a thread so that a silent child cannot hang the test.
        let (line_tx, line_rx) = mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let reader = std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut acked = Vec::new();
        while acked.len() < KILL_AFTER {
            match line_rx.recv_timeout(STALL_LIMIT) {
                Ok(line) => {
                    if let Some(seq) = line.strip_prefix("ACK ") {
                        acked.push(seq.parse::<u64>().unwrap());
                    }
                }
                Err(_) => break,
            }
        }
        // SIGKILL: no destructors, no final flush by sled.
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        assert!(
            acked.len() >= KILL_AFTER,
            "round {round}: the appender stalled or died after {} acknowledgements",
            acked.len()
        );

        let log = SledLog::open(SledLogConfig::new(&log_dir))
            .unwrap_or_else(|err| panic!("round {round}: reopening after kill -9: {err}"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let n_events = log.verify_chain().await.unwrap();
            assert_eq!(log.last_seq().await.unwrap(), n_events);
            let stored: std::collections::HashSet<u64> = log
                .read_from(1, usize::MAX)
                .await
                .unwrap()
                .iter()
                .map(|event| event.seq)
                .collect();
            all_acked.extend(acked);
            let lost: Vec<_> = all_acked
                .iter()
                .filter(|seq| !stored.contains(seq))
                .collect();
            assert!(
                lost.is_empty(),
                "round {round}: acknowledged but lost: {lost:?}"
            );
        });
    }
}
