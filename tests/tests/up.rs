//! `cairn up` end to end: the real binary with its sled log, in-process worker and HTTP API.
//! VMs are descriptor files over real images; the server is killed with SIGKILL at chosen
//! steps of a backup and must finish the job after a restart with exactly one recovery point.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_tests::*;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

struct Lab {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    disks: Vec<PathBuf>,
}

/// A data folder with one VM "alpha" of two raw disks: a small one and a big random one.
fn lab(big_mib: u64) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let data = root.join("data");
    let small = root.join("alpha-boot.raw");
    let big = root.join("alpha-data.raw");
    random_file(&small, 16 << 20, 1);
    random_file(&big, big_mib << 20, 2);
    write_vm(
        &data.join("vms"),
        "alpha",
        "6f1c2d3e-4a5b-4c6d-8e7f-901a2b3c4d5e",
        &[("boot", &small), ("data", &big)],
    );
    Lab {
        _dir: dir,
        root,
        data,
        disks: vec![small, big],
    }
}

fn vm_id(server: &UpServer, name: &str) -> String {
    let mut found = None;
    wait_until(Duration::from_secs(60), "the VM in the inventory", || {
        found = server
            .get("/v1/vms")
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .map(|v| v["vm"].as_str().unwrap().to_string());
        found.is_some()
    });
    found.unwrap()
}

fn job(server: &UpServer, id: &str) -> Value {
    server.get(&format!("/v1/jobs/{id}"))
}

fn wait_job_state(server: &UpServer, id: &str, state: &str, timeout: Duration) -> Value {
    let mut last = Value::Null;
    wait_until(timeout, &format!("job {id} to reach {state}"), || {
        last = job(server, id);
        if last["state"] == "Failed" && state != "Failed" {
            panic!("job failed: {last:#}");
        }
        last["state"] == state
    });
    last
}

fn step_state(job: &Value, kind: &str) -> String {
    job["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == kind)
        .map(|s| s["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

fn request_backup(server: &UpServer, vm: &str) -> String {
    let (status, body) = server.http("POST", &format!("/v1/vms/{vm}/backup"), Some("{}"));
    assert_eq!(status, 202, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// After a restart: the job ends Succeeded with exactly one recovery point, the repository
/// holds one recovery point per disk, and the recovery point restores byte-identical.
fn check_one_recovery_point(lab: &Lab, server: &UpServer, vm: &str, job_id: &str) {
    let done = wait_job_state(server, job_id, "Succeeded", Duration::from_secs(300));
    let rps = server.get(&format!("/v1/vms/{vm}/recovery-points"));
    let rps = rps.as_array().unwrap();
    assert_eq!(rps.len(), 1, "{rps:#?}");
    assert_eq!(rps[0]["job"], job_id);
    assert_eq!(done["rp"], rps[0]["rp"]);
    let listed = cairn_json(&["repo", "list", s(&lab.data.join("repo"))]);
    assert_eq!(
        listed["recovery_points"].as_array().unwrap().len(),
        2,
        "one recovery point per disk: {listed:#}"
    );
    assert_eq!(
        cairn(&["repo", "verify", s(&lab.data.join("repo"))])
            .status
            .code(),
        Some(0)
    );
    let rp = rps[0]["rp"].as_str().unwrap();
    let out = lab.root.join("restored");
    let body = serde_json::json!({"rp": rp, "to": out}).to_string();
    let (status, accepted) = server.http("POST", &format!("/v1/vms/{vm}/restore"), Some(&body));
    assert_eq!(status, 202, "{accepted}");
    let restore_job = serde_json::from_str::<Value>(&accepted).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_job_state(server, &restore_job, "Succeeded", Duration::from_secs(300));
    assert_eq!(
        fingerprint(&out.join("alpha-boot.raw")),
        fingerprint(&lab.disks[0])
    );
    assert_eq!(
        fingerprint(&out.join("alpha-data.raw")),
        fingerprint(&lab.disks[1])
    );
}

#[test]
fn kill_9_during_the_snapshot_step_then_restart_finishes_the_job() {
    let lab = lab(64);
    let server = UpServer::start(
        &lab.data,
        &[],
        &[("CAIRN_FAULT_STEP_DELAY_MS", "Snapshot=30000")],
    );
    let vm = vm_id(&server, "alpha");
    let job_id = request_backup(&server, &vm);
    wait_until(Duration::from_secs(60), "the snapshot step to run", || {
        step_state(&job(&server, &job_id), "Snapshot") == "Running"
    });
    server.kill9();
    let server = UpServer::start(&lab.data, &[], &[]);
    check_one_recovery_point(&lab, &server, &vm, &job_id);
}

#[test]
fn kill_9_during_a_transfer_then_restart_finishes_the_job() {
    let lab = lab(768);
    let server = UpServer::start(&lab.data, &[], &[]);
    let vm = vm_id(&server, "alpha");
    let job_id = request_backup(&server, &vm);
    let packs = |dir: &Path| {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
                    .count()
            })
            .unwrap_or(0)
    };
    let disks_dir = lab.data.join("repo/disks");
    wait_until(
        Duration::from_secs(120),
        "the transfer to store a pack",
        || {
            std::fs::read_dir(&disks_dir)
                .map(|d| {
                    d.flatten().any(|e| {
                        e.file_name().to_string_lossy().ends_with(".data")
                            && packs(&e.path().join("packs")) >= 2
                    })
                })
                .unwrap_or(false)
        },
    );
    assert_ne!(
        job(&server, &job_id)["state"],
        "Succeeded",
        "the backup finished before the kill; use a bigger disk"
    );
    server.kill9();
    let server = UpServer::start(&lab.data, &[], &[]);
    check_one_recovery_point(&lab, &server, &vm, &job_id);
    let done = job(&server, &job_id);
    let transfer = done["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "Transfer data")
        .unwrap()
        .clone();
    assert!(transfer["attempt"].as_u64().unwrap() >= 2, "{transfer:#}");
}

#[test]
fn kill_9_during_the_commit_step_then_restart_finishes_the_job() {
    let lab = lab(32);
    let server = UpServer::start(
        &lab.data,
        &[],
        &[("CAIRN_FAULT_STEP_DELAY_MS", "CommitRecoveryPoint=30000")],
    );
    let vm = vm_id(&server, "alpha");
    let job_id = request_backup(&server, &vm);
    wait_until(Duration::from_secs(120), "the commit step to run", || {
        step_state(&job(&server, &job_id), "CommitRecoveryPoint") == "Running"
    });
    server.kill9();
    let server = UpServer::start(&lab.data, &[], &[]);
    check_one_recovery_point(&lab, &server, &vm, &job_id);
}

/// POST a backup with an `Idempotency-Key`; the status and the JSON answer.
fn keyed_backup(server: &UpServer, vm: &str, key: &str) -> (u16, Value) {
    let (status, body) = http_with(
        &server.addr,
        token_for(&server.addr).as_deref(),
        &[("Idempotency-Key", key)],
        "POST",
        &format!("/v1/vms/{vm}/backup"),
        Some("{}"),
    );
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
    (status, value)
}

fn backup_jobs(server: &UpServer, vm: &str) -> Vec<String> {
    server
        .get("/v1/jobs")
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["vm"] == vm && j["kind"] == "Backup")
        .map(|j| j["job"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_repeated_post_makes_one_job_even_across_a_kill_9() {
    let lab = lab(8);
    // The snapshot step waits, so the job is still running when the repeats come.
    let server = UpServer::start(
        &lab.data,
        &[],
        &[("CAIRN_FAULT_STEP_DELAY_MS", "Snapshot=30000")],
    );
    let vm = vm_id(&server, "alpha");
    let (status, first) = keyed_backup(&server, &vm, "nightly-alpha-1");
    assert_eq!(status, 202, "{first}");
    let job_id = first["id"].as_str().unwrap().to_string();
    assert!(first.get("replayed").is_none(), "{first}");

    let (status, again) = keyed_backup(&server, &vm, "nightly-alpha-1");
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["id"], job_id.as_str(), "the first answer: {again}");
    assert_eq!(again["replayed"], true, "{again}");
    // The replay names the first command's own events, not anything newer.
    assert!(
        again["seq"].as_u64().unwrap() <= first["seq"].as_u64().unwrap(),
        "{again} after {first}"
    );

    // Without the key the same request is a new command, refused while the job runs.
    let (status, body) = server.http("POST", &format!("/v1/vms/{vm}/backup"), Some("{}"));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("job_running"), "{body}");
    // A malformed key is refused before anything is decided.
    for bad in ["has space", &"k".repeat(300)] {
        let (status, body) = http_with(
            &server.addr,
            token_for(&server.addr).as_deref(),
            &[("Idempotency-Key", bad)],
            "POST",
            &format!("/v1/vms/{vm}/backup"),
            Some("{}"),
        );
        assert_eq!(status, 400, "{body}");
        assert!(
            body.contains("invalid_request") && body.contains("Idempotency-Key"),
            "{body}"
        );
    }
    assert_eq!(backup_jobs(&server, &vm), vec![job_id.clone()]);

    // The client retries after the server died: the restarted server remembers the key.
    server.kill9();
    let server = UpServer::start(&lab.data, &[], &[]);
    let (status, after) = keyed_backup(&server, &vm, "nightly-alpha-1");
    assert_eq!(status, 202, "{after}");
    assert_eq!(after["id"], job_id.as_str(), "{after}");
    assert_eq!(after["replayed"], true, "{after}");
    check_one_recovery_point(&lab, &server, &vm, &job_id);
    assert_eq!(backup_jobs(&server, &vm), vec![job_id.clone()]);

    // The CLI: a script that runs the same command twice with one key gets one job.
    let url = server.url();
    let args = [
        "backup",
        "alpha",
        "--idempotency-key",
        "cli-run-7",
        "--server",
        url.as_str(),
    ];
    let out = cairn_ok(&args);
    assert!(out.contains("accepted for vm alpha"), "{out}");
    let again = cairn_ok(&args);
    assert!(again.contains("same idempotency key"), "{again}");
    let cli_job = |out: &str| out.split_whitespace().nth(2).unwrap().to_string();
    assert_eq!(cli_job(&out), cli_job(&again));
    assert_eq!(backup_jobs(&server, &vm).len(), 2);
    server.stop();
}

#[test]
fn the_cli_drives_groups_backups_restores_and_events() {
    let lab = lab(8);
    let server = UpServer::start(&lab.data, &[], &[]);
    let url = server.url();
    let vm = vm_id(&server, "alpha");
    let listed = cairn_ok(&["vm", "list", "--server", &url]);
    assert!(listed.contains("alpha"), "{listed}");
    cairn_ok(&[
        "group",
        "create",
        "gold",
        "--vm",
        "alpha",
        "--retention-days",
        "14",
        "--sync",
        "1h",
        "--server",
        &url,
    ]);
    let groups = cairn_ok(&["group", "list", "--server", &url]);
    assert!(groups.contains("gold"), "{groups}");
    // The group's schedule requests a first backup by itself; wait for it, then one by hand.
    wait_until(Duration::from_secs(120), "the scheduled backup", || {
        server
            .get("/v1/jobs")
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["reason"] == "Scheduled" && j["state"] == "Succeeded")
    });
    let out = cairn_ok(&["backup", "alpha", "--wait", "--server", &url]);
    assert!(out.contains("Succeeded"), "{out}");
    let rps = server.get(&format!("/v1/vms/{vm}/recovery-points"));
    assert_eq!(rps.as_array().unwrap().len(), 2);
    let rp_list = cairn_ok(&["rp", "list", "alpha", "--server", &url]);
    let first_rp = rps[0]["rp"].as_str().unwrap();
    assert!(rp_list.contains(first_rp), "{rp_list}");
    let to = lab.root.join("out");
    cairn_ok(&[
        "restore",
        "alpha",
        "--rp",
        first_rp,
        "--to",
        s(&to),
        "--wait",
        "--server",
        &url,
    ]);
    assert_eq!(
        fingerprint(&to.join("alpha-boot.raw")),
        fingerprint(&lab.disks[0])
    );
    let jobs = cairn_ok(&["jobs", "--server", &url]);
    assert!(jobs.lines().count() >= 4, "{jobs}");
    let jobs_json = server.get("/v1/jobs");
    let backup_job = jobs_json
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "Backup")
        .expect("a backup job");
    let job_id = backup_job["job"].as_str().unwrap().to_string();
    let shown = cairn_ok(&["job", "show", &job_id, "--server", &url]);
    assert!(
        shown.contains("Snapshot") && shown.contains("CommitRecoveryPoint"),
        "{shown}"
    );
    let events = cairn_ok(&["events", "tail", "--server", &url]);
    assert!(events.contains("RecoveryPointCommitted"), "{events}");
    let audit = cairn(&["audit", "verify", "--server", &url]);
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );
}

#[test]
fn bad_input_gets_4xx_with_a_code_and_the_server_keeps_serving() {
    let lab = lab(8);
    // A descriptor that points at a missing disk is reported, not fatal.
    write_vm(
        &lab.data.join("vms"),
        "ghost",
        "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
        &[("disk0", Path::new("/nonexistent/ghost.raw"))],
    );
    let server = UpServer::start(&lab.data, &[], &[]);
    let vm = vm_id(&server, "alpha");
    let cases: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
        (
            "POST",
            "/v1/vms/0190a000-0000-7000-8000-000000000000/backup".into(),
            Some("{}"),
            404,
            "unknown_vm",
        ),
        (
            "POST",
            format!("/v1/vms/{vm}/backup"),
            Some("{not json"),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/groups".into(),
            Some(r#"{"name":"g","vms":[],"retention_days":0}"#),
            400,
            "invalid_policy",
        ),
        (
            "POST",
            "/v1/groups".into(),
            Some(r#"{"name":"g","vms":[],"bogus":1}"#),
            400,
            "invalid_request",
        ),
        ("GET", "/v1/jobs/not-an-id".into(), None, 400, "invalid_id"),
        ("GET", "/v1/nope".into(), None, 404, "not_found"),
    ];
    for (method, path, body, status, code) in cases {
        let (got, text) = server.http(method, &path, body);
        assert_eq!(got, status, "{method} {path}: {text}");
        let err: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON {text:?}: {e}"));
        assert_eq!(err["error"]["code"], code, "{method} {path}: {text}");
        assert!(!err["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    let (status, _) = server.http(
        "POST",
        "/v1/groups",
        Some(&format!(r#"{{"name":"dup","vms":["{vm}"]}}"#)),
    );
    assert_eq!(status, 201);
    let (status, text) = server.http("POST", "/v1/groups", Some(r#"{"name":"dup","vms":[]}"#));
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("duplicate_group"));
    // Still serving, and the ghost VM never appeared.
    let vms = server.get("/v1/vms");
    assert_eq!(vms.as_array().unwrap().len(), 1);
    assert!(
        server.log().contains("ghost.raw"),
        "the bad descriptor is logged"
    );
}

#[test]
fn the_demo_protects_two_vms_with_realistic_disks_in_a_private_encrypted_data_folder() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = UpServer::start(&data, &["--demo"], &[]);
    // A new repository is encrypted, with a generated key in the data folder and a hint to
    // back it up.
    let banner = server.banner.join("\n");
    assert!(
        banner.contains("created an encrypted repository")
            && banner.contains("cairn repo key export"),
        "{banner}"
    );
    wait_until(
        Duration::from_secs(300),
        "both demo VMs to have a recovery point",
        || {
            let vms = server.get("/v1/vms");
            let vms = vms.as_array().unwrap();
            vms.len() == 2
                && vms
                    .iter()
                    .all(|v| v["recovery_points"].as_u64().unwrap_or(0) >= 1)
        },
    );
    let groups = server.get("/v1/groups");
    assert_eq!(groups[0]["name"], "demo");
    assert_eq!(groups[0]["members"].as_array().unwrap().len(), 2);
    // The demo disks are real: GPT with an EFI system partition, ext4 and swap.
    let image = dir.path().join("data/images/web01-disk0.qcow2");
    let raw = dir.path().join("web01.raw");
    sh(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", s(&image), s(&raw)],
    );
    let table = sh("sfdisk", &["--dump", s(&raw)]);
    assert!(
        table.contains("label: gpt")
            && table.contains("name=\"esp\"")
            && table.contains("name=\"root\""),
        "{table}"
    );
    server.stop();
    // Nothing in the data folder is open to group or others (`find` with `-perm` for any of
    // 077 finds nothing): event log, snapshot, repository, key, descriptors, demo images, and
    // the test's own log.
    assert_eq!(open_to_others(&data), Vec::<String>::new());
    assert!(data.join("snapshot.bin").exists() && data.join("events").is_dir());
    // The repository's own files are exactly 0600 and its folders 0700.
    let repo = data.join("repo");
    let entries = walk_modes(&repo);
    assert!(
        entries
            .iter()
            .any(|(p, ..)| p.extension().is_some_and(|e| e == "pack"))
    );
    assert!(
        entries
            .iter()
            .any(|(p, ..)| p.extension().is_some_and(|e| e == "rpi"))
    );
    assert!(
        entries
            .iter()
            .any(|(p, ..)| p.extension().is_some_and(|e| e == "lock"))
    );
    for (path, mode, is_dir) in entries {
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{:o} {}", mode, path.display());
    }
    assert_eq!(mode_of(&data.join("repo.key")), 0o600);
    // `cairn repo` finds the key beside the repository folder.
    let stats = cairn_json(&["repo", "stats", s(&repo)]);
    assert_eq!(stats["encrypted"], true, "{stats:#}");
    assert_eq!(stats["recovery_points"], 3, "{stats:#}");
}
