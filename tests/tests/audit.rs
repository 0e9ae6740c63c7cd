//! The audit trail of a real `cairn up`: its event log is keyed with `DATA/audit.key` and
//! signed into `DATA/checkpoints`; `cairn audit verify --log` catches one changed byte with the
//! keyed chain alone, a rewrite without the audit key, and a rewrite by a holder of the audit
//! key (who lacks the signing key) through the checkpoints. The rewrites open the stopped
//! log's sled database directly, as an attacker with write access to the data folder would.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use cairn_tests::*;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs a cairn up until its log holds a few events and it signed checkpoints, then stops it.
fn stopped_up(data: &Path) {
    let server = UpServer::start(data, &["--checkpoint-every-events", "3"], &[]);
    wait_until(Duration::from_secs(60), "the node registered", || {
        server.get("/v1/audit/verify")["events_checked"]
            .as_u64()
            .unwrap_or(0)
            >= 4
    });
    let report = server.get("/v1/audit/verify");
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["keyed_from"], 1, "{report:#}");
    server.stop();
}

fn verify(data: &Path, key: &Path) -> (i32, Value, String) {
    let out = cairn(&[
        "audit",
        "verify",
        "--log",
        s(&data.join("events")),
        "--audit-key",
        s(key),
        "--checkpoints",
        s(&data.join("checkpoints")),
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        value,
        format!("{stdout}{stderr}"),
    )
}

/// Rewrites every event of the sled log at `events` through `edit`, with links recomputed
/// with `key` (plain BLAKE3 without one) and the tip to match.
fn rewrite(events: &Path, key: Option<[u8; 32]>, mut edit: impl FnMut(u64, &mut Vec<u8>)) {
    let db = sled::open(events).unwrap();
    let tree = db.open_tree("events").unwrap();
    let meta = db.open_tree("meta").unwrap();
    let mut prev = [0u8; 32];
    let pages: Vec<_> = tree.iter().map(|item| item.unwrap()).collect();
    for (page_key, page) in pages {
        let mut rebuilt = Vec::new();
        let mut at = 0;
        while at < page.len() {
            let seq = u64::from_be_bytes(page[at..at + 8].try_into().unwrap());
            let len = u32::from_be_bytes(page[at + 8..at + 12].try_into().unwrap()) as usize;
            let mut bytes = page[at + 12..at + 12 + len].to_vec();
            at += 12 + len;
            edit(seq, &mut bytes);
            let mut envelope: cairn_schemas::Envelope = cairn_schemas::decode(&bytes).unwrap();
            envelope.prev_hash = prev;
            let bytes = cairn_schemas::encode(&envelope);
            prev = match &key {
                Some(key) => *blake3::keyed_hash(key, &bytes).as_bytes(),
                None => *blake3::hash(&bytes).as_bytes(),
            };
            rebuilt.extend_from_slice(&seq.to_be_bytes());
            rebuilt.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            rebuilt.extend_from_slice(&bytes);
        }
        tree.insert(page_key, rebuilt).unwrap();
    }
    meta.insert("last_hash", &prev).unwrap();
    db.flush().unwrap();
}

/// Changes the actor of event 2 (its envelope still decodes).
fn forge_actor(seq: u64, bytes: &mut Vec<u8>) {
    if seq == 2 {
        let mut envelope: cairn_schemas::Envelope = cairn_schemas::decode(bytes).unwrap();
        envelope.actor = "user:mallory".into();
        *bytes = cairn_schemas::encode(&envelope);
    }
}

fn read_key(path: &Path) -> [u8; 32] {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.trim();
    let mut key = [0u8; 32];
    for (idx, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * idx..2 * idx + 2], 16).unwrap();
    }
    key
}

#[test]
fn an_intact_log_verifies_offline_with_its_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    stopped_up(&data);
    for file in ["audit.key", "checkpoint.key"] {
        let mode = std::fs::metadata(data.join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
    let (code, report, text) = verify(&data, &data.join("audit.key"));
    assert_eq!(code, 0, "{text}");
    assert_eq!(report["ok"], true, "{text}");
    assert!(
        report["checkpoints"]["matched"].as_u64().unwrap() >= 1,
        "{text}"
    );
    // A restart keeps the same keys and goes on verifying.
    stopped_up(&data);
    let (code, _, text) = verify(&data, &data.join("audit.key"));
    assert_eq!(code, 0, "{text}");
}

#[test]
fn one_changed_byte_is_caught_by_the_keyed_chain_alone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    stopped_up(&data);
    {
        let db = sled::open(data.join("events")).unwrap();
        let tree = db.open_tree("events").unwrap();
        let (page_key, page) = tree.first().unwrap().unwrap();
        let mut page = page.to_vec();
        // Event 2 of the first page: flip one byte of its actor text.
        let len1 = u32::from_be_bytes(page[8..12].try_into().unwrap()) as usize;
        let start = 12 + len1 + 12;
        let len2 =
            u32::from_be_bytes(page[12 + len1 + 8..12 + len1 + 12].try_into().unwrap()) as usize;
        let event = &mut page[start..start + len2];
        let at = event
            .windows(5)
            .position(|w| w == b"node:" || w == b"orche" || w == b"cairn")
            .expect("an actor in event 2");
        event[at] ^= 0x01;
        tree.insert(page_key, page).unwrap();
        db.flush().unwrap();
    }
    let out = cairn(&[
        "audit",
        "verify",
        "--log",
        s(&data.join("events")),
        "--audit-key",
        s(&data.join("audit.key")),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("breaks at event 2"), "{text}");
}

#[test]
fn a_rewrite_without_the_audit_key_is_caught_and_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    stopped_up(&data);
    rewrite(&data.join("events"), None, forge_actor);
    let (code, report, text) = verify(&data, &data.join("audit.key"));
    assert_eq!(code, 3, "{text}");
    assert_eq!(report["first_broken_seq"], 2, "{text}");
    // cairn up refuses to start on it, and says why.
    let refused = cairn_refused(&["up", "--data-dir", s(&data), "--listen", "127.0.0.1:0"]);
    assert!(refused.contains("audit key"), "{refused}");
}

#[test]
fn a_rewrite_with_the_audit_key_but_without_the_signing_key_is_caught_by_the_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    stopped_up(&data);
    let key = read_key(&data.join("audit.key"));
    rewrite(&data.join("events"), Some(key), forge_actor);
    let (code, report, text) = verify(&data, &data.join("audit.key"));
    assert_eq!(code, 3, "{text}");
    assert_eq!(
        report["first_broken_seq"],
        Value::Null,
        "the chain alone passes: {text}"
    );
    let mismatch = &report["checkpoints"]["first_mismatch"];
    assert!(mismatch["seq"].as_u64().unwrap() >= 2, "{text}");
    assert!(
        mismatch["file"].as_str().unwrap().ends_with("-local.json"),
        "{text}"
    );
    // A checkpoint forged to match, signed with another key, is reported and not trusted.
    let forged = data
        .join("checkpoints")
        .join("00000000000000999999-local.json");
    let first = std::fs::read_dir(data.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    let mut value: Value = serde_json::from_slice(&std::fs::read(first).unwrap()).unwrap();
    value["seq"] = 999999.into();
    std::fs::write(&forged, serde_json::to_vec(&value).unwrap()).unwrap();
    let (code, report, text) = verify(&data, &data.join("audit.key"));
    assert_eq!(code, 3, "{text}");
    let rejected = report["checkpoints"]["rejected"].as_array().unwrap();
    assert!(
        rejected
            .iter()
            .any(|r| r["file"] == "00000000000000999999-local.json"
                && r["reason"].as_str().unwrap().contains("signature")),
        "{text}"
    );
}

#[test]
fn unsafe_or_malformed_audit_keys_are_refused_with_nothing_changed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let key = data.join("audit.key");
    std::fs::write(&key, format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = cairn_refused(&["up", "--data-dir", s(&data), "--listen", "127.0.0.1:0"]);
    assert!(refused.contains("open to group or others"), "{refused}");
    assert!(!data.join("events").exists(), "nothing was made");
    std::fs::write(&key, "abcd\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let refused = cairn_refused(&["up", "--data-dir", s(&data), "--listen", "127.0.0.1:0"]);
    assert!(refused.contains("64 hex digits"), "{refused}");
    assert!(!data.join("events").exists(), "nothing was made");
    // The offline verify names a missing key file.
    let out = cairn(&[
        "audit",
        "verify",
        "--log",
        s(&data),
        "--audit-key",
        s(&data.join("nothing.key")),
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
