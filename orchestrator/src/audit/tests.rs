//! The checkpoint writer and the check of a log against checkpoints, on a real sled log and a
//! real folder, with an injected clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cairn_schemas::{Aggregate, EventId, JobEvent, JobId, StepId};
use ed25519_dalek::SigningKey;

use super::*;
use crate::clock::Clock;
use crate::log::{AppendRequest, EventLog, NewEvent, SledLog, SledLogConfig};

const T0: u64 = 1_767_225_600_000;

#[derive(Debug, Default)]
struct ManualClock(AtomicU64);

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl ManualClock {
    fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

struct Lab {
    _dir: tempfile::TempDir,
    log: SledLog,
    sink: FolderSink,
    clock: Arc<ManualClock>,
    version: u64,
}

fn audit_key() -> AuditKey {
    AuditKey::from_bytes([5; 32])
}

fn lab() -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let log =
        SledLog::open(SledLogConfig::new(dir.path().join("log")).with_audit_key(Some(audit_key())))
            .unwrap();
    let sink = FolderSink::new(dir.path().join("checkpoints"));
    let clock = Arc::new(ManualClock(AtomicU64::new(T0)));
    Lab {
        _dir: dir,
        log,
        sink,
        clock,
        version: 0,
    }
}

impl Lab {
    async fn append(&mut self, n: u64) {
        let job = Aggregate::Job(JobId::new_v7(T0, [1; 10]));
        for _ in 0..n {
            let v = self.version;
            self.log
                .append(AppendRequest {
                    partition: 0,
                    aggregate: job.clone(),
                    expected_version: v,
                    command: None,
                    recorded_at: T0,
                    events: vec![NewEvent::new(
                        EventId::new_v7(T0 + v, [2; 10]),
                        "system:test",
                        JobEvent::StepProgressed {
                            step: StepId::new_v7(T0, [9; 10]),
                            attempt: 1,
                            bytes_done: v,
                            bytes_total: 1 << 40,
                        },
                    )],
                })
                .await
                .unwrap();
            self.version += 1;
        }
    }

    fn writer(
        &self,
        signer: &str,
        key: &SigningKey,
        policy: CheckpointPolicy,
    ) -> Checkpointer<SledLog> {
        Checkpointer::new(
            self.log.clone(),
            self.clock.clone(),
            CheckpointerConfig {
                sink: self.sink.clone(),
                signing_key: key.clone(),
                signer: signer.into(),
                policy,
                poll: Duration::from_millis(10),
            },
        )
        .unwrap()
    }

    fn trust(&self) -> CheckpointTrust {
        CheckpointTrust {
            sink: self.sink.clone(),
            extra_keys: Vec::new(),
            trust_sink_keys: true,
        }
    }

    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.sink.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".json"))
            .collect();
        names.sort();
        names
    }
}

fn policy(every_events: u64, every_minutes: u64) -> CheckpointPolicy {
    CheckpointPolicy {
        every_events,
        every_ms: every_minutes * 60_000,
    }
}

#[tokio::test]
async fn checkpoints_are_written_after_n_events_and_after_m_minutes_with_new_events() {
    let mut lab = lab();
    let key = SigningKey::from_bytes(&[7; 32]);
    let mut writer = lab.writer("ctl-01", &key, policy(10, 10));
    assert!(writer.step(false).await.unwrap().is_none(), "empty log");
    lab.append(9).await;
    assert!(
        writer.step(false).await.unwrap().is_none(),
        "9 events, 0 minutes"
    );
    lab.append(1).await;
    let first = writer.step(false).await.unwrap().expect("10 events");
    assert_eq!(first.checkpoint.seq, 10);
    assert_eq!(first.checkpoint.keyed_from, Some(1));
    assert_eq!(first.checkpoint.time_ms, T0);
    assert!(writer.step(false).await.unwrap().is_none(), "nothing new");
    lab.append(3).await;
    lab.clock.advance(9 * 60_000 + 59_999);
    assert!(
        writer.step(false).await.unwrap().is_none(),
        "3 events, 9:59.999"
    );
    lab.clock.advance(1);
    let second = writer.step(false).await.unwrap().expect("10 minutes");
    assert_eq!(second.checkpoint.seq, 13);
    lab.clock.advance(60 * 60_000);
    assert!(
        writer.step(false).await.unwrap().is_none(),
        "an hour, but no new event"
    );
    assert_eq!(
        lab.files(),
        vec![
            "00000000000000000010-ctl-01.json".to_string(),
            "00000000000000000013-ctl-01.json".to_string()
        ]
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(lab.sink.dir().join(&lab.files()[0]))
            .unwrap()
            .permissions(),
    ) & 0o777;
    assert_eq!(mode, 0o600);
    // A restarted writer picks up after its last checkpoint.
    let mut again = lab.writer("ctl-01", &key, policy(10, 10));
    assert!(
        again.step(true).await.unwrap().is_none(),
        "nothing new since 13"
    );
    lab.append(1).await;
    assert_eq!(again.step(true).await.unwrap().unwrap().checkpoint.seq, 14);
    let report = lab.trust().verify(&lab.log).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!((report.matched, report.last_matched_seq), (3, Some(14)));
}

#[tokio::test]
async fn the_writer_task_signs_on_its_trigger_and_at_shutdown() {
    let mut lab = lab();
    let key = SigningKey::from_bytes(&[7; 32]);
    let writer = lab.writer("ctl-01", &key, policy(5, 10));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(writer.run(async {
        let _ = stop_rx.await;
    }));
    lab.append(5).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lab.files().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint after 5 events"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    lab.append(2).await;
    stop_tx.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(
        lab.files(),
        vec![
            "00000000000000000005-ctl-01.json".to_string(),
            "00000000000000000007-ctl-01.json".to_string()
        ]
    );
}

#[tokio::test]
async fn a_rewrite_with_the_audit_key_but_without_the_signing_key_fails_the_checkpoints() {
    let mut lab = lab();
    let key = SigningKey::from_bytes(&[7; 32]);
    let mut writer = lab.writer("ctl-01", &key, policy(10, 10));
    for _ in 0..3 {
        lab.append(10).await;
        writer.step(false).await.unwrap().unwrap();
    }
    lab.log.rewrite_all(Some(&audit_key()), |seq, envelope| {
        if seq == 15 {
            envelope.actor = "user:mallory".into();
        }
    });
    assert_eq!(
        lab.log.verify_chain().await.unwrap(),
        30,
        "the chain alone passes"
    );
    let report = lab.trust().verify(&lab.log).await.unwrap();
    assert!(!report.ok);
    assert_eq!((report.matched, report.last_matched_seq), (1, Some(10)));
    let mismatch = report.first_mismatch.unwrap();
    assert_eq!(mismatch.seq, 20);
    assert_eq!(mismatch.file, "00000000000000000020-ctl-01.json");
    assert!(mismatch.detail.contains("changed"), "{}", mismatch.detail);
}

#[tokio::test]
async fn forged_and_corrupt_checkpoint_files_are_reported_and_not_trusted() {
    let mut lab = lab();
    let key = SigningKey::from_bytes(&[7; 32]);
    let mut writer = lab.writer("ctl-01", &key, policy(10, 10));
    lab.append(10).await;
    writer.step(false).await.unwrap().unwrap();
    // The attacker rewrites the log and signs a matching checkpoint with their own key,
    // claiming to be ctl-01.
    lab.append(10).await;
    lab.log.rewrite_all(Some(&audit_key()), |seq, envelope| {
        if seq == 3 {
            envelope.actor = "user:mallory".into();
        }
    });
    let digest = lab
        .log
        .extend_digest(RunningDigest::EMPTY, 20)
        .await
        .unwrap();
    let mallory = SigningKey::from_bytes(&[66; 32]);
    let forged = Checkpoint {
        seq: 20,
        digest: digest.digest,
        keyed_from: Some(1),
        time_ms: T0,
        signer: "ctl-01".into(),
        key_id: keys::key_id(&key.verifying_key()),
    }
    .sign(&mallory);
    assert!(lab.sink.write(&forged).unwrap());
    std::fs::write(
        lab.sink.dir().join("00000000000000000030-ctl-01.json"),
        b"{ broken",
    )
    .unwrap();
    std::fs::write(lab.sink.dir().join("notes.txt"), b"hello").unwrap();
    let report = lab.trust().verify(&lab.log).await.unwrap();
    assert!(!report.ok);
    let rejected: Vec<(&str, &str)> = report
        .rejected
        .iter()
        .map(|r| (r.file.as_str(), r.reason.as_str()))
        .collect();
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    assert!(
        rejected
            .iter()
            .any(|(file, reason)| *file == "00000000000000000020-ctl-01.json"
                && reason.contains("signature does not verify")),
        "{rejected:?}"
    );
    assert!(
        rejected
            .iter()
            .any(|(file, reason)| *file == "00000000000000000030-ctl-01.json"
                && reason.contains("not a checkpoint")),
        "{rejected:?}"
    );
    assert!(
        rejected.iter().any(|(file, _)| *file == "notes.txt"),
        "{rejected:?}"
    );
    // The genuine checkpoint still catches the rewrite.
    let mismatch = report.first_mismatch.unwrap();
    assert_eq!(mismatch.seq, 10);
    // Trusting only a configured key, a key the attacker added to the sink counts for nothing.
    let mallory_trust = CheckpointTrust {
        sink: lab.sink.clone(),
        extra_keys: vec![TrustedKey {
            signer: "ctl-01".into(),
            key: key.verifying_key(),
        }],
        trust_sink_keys: false,
    };
    let report = mallory_trust.verify(&lab.log).await.unwrap();
    assert_eq!(report.first_mismatch.unwrap().seq, 10);
}

#[tokio::test]
async fn a_log_shorter_than_a_checkpoint_is_named() {
    let mut lab = lab();
    let key = SigningKey::from_bytes(&[7; 32]);
    let mut writer = lab.writer("ctl-01", &key, policy(10, 10));
    lab.append(10).await;
    writer.step(false).await.unwrap().unwrap();
    // The same sink, checked against a fresh log (the whole log replaced by a shorter one).
    let other = tempfile::tempdir().unwrap();
    let short = SledLog::open(
        SledLogConfig::new(other.path().join("log")).with_audit_key(Some(audit_key())),
    )
    .unwrap();
    let report = lab.trust().verify(&short).await.unwrap();
    let mismatch = report.first_mismatch.unwrap();
    assert!(
        mismatch.detail.contains("events were removed"),
        "{}",
        mismatch.detail
    );
}

#[tokio::test]
async fn another_key_for_a_listed_signer_is_refused() {
    let lab = lab();
    let key = SigningKey::from_bytes(&[7; 32]);
    let _writer = lab.writer("ctl-01", &key, policy(10, 10));
    let other = SigningKey::from_bytes(&[8; 32]);
    let err = Checkpointer::new(
        lab.log.clone(),
        lab.clock.clone(),
        CheckpointerConfig {
            sink: lab.sink.clone(),
            signing_key: other,
            signer: "ctl-01".into(),
            policy: CheckpointPolicy::default(),
            poll: Duration::from_secs(1),
        },
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("another key for signer"), "{err}");
}
