//! Recovery end to end through `cairn up` (real binary, sled log, in-process workers, HTTP API,
//! CLI): to the original VM after damage (only the damage is written, a running VM is refused,
//! the next backup is right), to another node as qcow2 and VHDX (compared with `qemu-img
//! compare`, the new VM in that node's inventory), to a folder with its manifest, e-mail to a
//! real SMTP server (`aiosmtpd`) and a webhook, and `kill -9` in the middle of a throttled
//! recovery (the restarted recovery continues and writes only what was missing).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_tests::*;
use serde_json::{Value, json};

const DISK_MIB: u32 = 400;
const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

struct Lab {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    disk: PathBuf,
}

const UUID: &str = "5a1d2c34-5e6f-4a8b-9c0d-1e2f3a4b5c6d";

/// A data folder with VM "alpha": one raw disk, a copy of the make-vm-disk image or random data.
fn lab(random_mib: Option<u64>) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let data = root.join("data");
    let disk = root.join("alpha-disk0.raw");
    match random_mib {
        Some(mib) => random_file(&disk, mib * MIB, 7),
        None => sparse_copy(&vm_disk(DISK_MIB), &disk),
    }
    describe(&data, &disk, "stopped");
    Lab {
        _dir: dir,
        root,
        data,
        disk,
    }
}

fn describe(data: &Path, disk: &Path, power: &str) {
    let doc = json!({"name": "alpha", "uuid": UUID, "power": power,
        "disks": [{"id": "disk0", "path": disk, "format": "raw"}]});
    std::fs::create_dir_all(data.join("vms")).unwrap();
    std::fs::write(
        data.join("vms/alpha.json"),
        serde_json::to_vec_pretty(&doc).unwrap(),
    )
    .unwrap();
}

fn find_vm(server: &UpServer, name: &str) -> Value {
    let mut found = Value::Null;
    wait_until(
        Duration::from_secs(60),
        &format!("VM {name} in the inventory"),
        || {
            found = server
                .get("/v1/vms")
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == name && v["present"] == true)
                .cloned()
                .unwrap_or(Value::Null);
            !found.is_null()
        },
    );
    found
}

fn post(server: &UpServer, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = server.http("POST", path, Some(&body.to_string()));
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn accepted_id(server: &UpServer, path: &str, body: Value) -> String {
    let (status, answer) = post(server, path, body);
    assert_eq!(status, 202, "{answer}");
    answer["id"].as_str().unwrap().to_string()
}

fn wait_job(server: &UpServer, id: &str, state: &str, timeout: Duration) -> Value {
    let mut last = Value::Null;
    wait_until(timeout, &format!("job {id} to reach {state}"), || {
        last = server.get(&format!("/v1/jobs/{id}"));
        if last["state"] != state
            && ["Succeeded", "Failed", "Cancelled"].contains(&last["state"].as_str().unwrap())
        {
            panic!("job ended {} instead of {state}: {last:#}", last["state"]);
        }
        last["state"] == state
    });
    last
}

fn backup(server: &UpServer, vm: &str) -> String {
    let job = accepted_id(server, &format!("/v1/vms/{vm}/backup"), json!({}));
    let done = wait_job(server, &job, "Succeeded", Duration::from_secs(300));
    done["rp"].as_str().unwrap().to_string()
}

fn overwrite(path: &Path, offset: u64, len: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let tmp = path.with_extension("junk");
    random_file(&tmp, len, seed);
    let junk = std::fs::read(&tmp).unwrap();
    std::fs::remove_file(&tmp).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&junk, offset).unwrap();
    file.sync_all().unwrap();
}

fn qemu_img_compare(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", s(a), s(b)])
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn recovery_to_the_original_vm_writes_only_the_damage_and_the_next_backup_is_right() {
    let lab = lab(None);
    let server = UpServer::start(&lab.data, &[], &[]);
    let vm = find_vm(&server, "alpha")["vm"]
        .as_str()
        .unwrap()
        .to_string();
    // A protection group: its first scheduled backup makes the recovery point.
    let (status, group) = post(
        &server,
        "/v1/groups",
        json!({"name": "gold", "vms": [vm], "sync": "1d"}),
    );
    assert_eq!(status, 201, "{group}");
    let mut rp = String::new();
    wait_until(Duration::from_secs(300), "the group's first backup", || {
        let rps = server.get(&format!("/v1/vms/{vm}/recovery-points"));
        rp = rps[0]["rp"].as_str().unwrap_or_default().to_string();
        !rp.is_empty()
    });
    let pristine = fingerprint(&lab.disk);

    // Damage: 1 MiB in the root file system and 256 KiB elsewhere.
    overwrite(&lab.disk, 100 * MIB, MIB, 11);
    overwrite(&lab.disk, 300 * MIB + 12_345, 256 << 10, 12);
    let damaged = fingerprint(&lab.disk);
    assert_ne!(damaged, pristine);

    // The VM runs: refused before anything is written, with the reason.
    describe(&lab.data, &lab.disk, "running");
    let refused = accepted_id(
        &server,
        &format!("/v1/vms/{vm}/recover"),
        json!({"rp": rp, "target": "original"}),
    );
    let failed = wait_job(&server, &refused, "Failed", Duration::from_secs(60));
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("is running") && error.contains("stop it"),
        "{error}"
    );
    assert_eq!(fingerprint(&lab.disk), damaged, "a refused recovery wrote");

    // Stopped: the CLI recovers it, writing about the damage and not the disk.
    describe(&lab.data, &lab.disk, "stopped");
    let out = cairn_json(&[
        "recover",
        "alpha",
        "--rp",
        &rp,
        "--to-original",
        "--wait",
        "--server",
        &server.url(),
    ]);
    assert_eq!(out["state"], "Succeeded", "{out:#}");
    assert_eq!(
        fingerprint(&lab.disk),
        pristine,
        "not byte-identical to the RP"
    );
    let recovery = &out["recovery"];
    let written = recovery["bytes_written"].as_u64().unwrap();
    assert!(
        (MIB + (256 << 10)..=2 * MIB).contains(&written),
        "wrote {written} bytes for 1.25 MiB of damage on a {DISK_MIB} MiB disk"
    );
    assert_eq!(recovery["target"], "original");
    assert!(
        recovery["note"]
            .as_str()
            .unwrap()
            .contains("stays in its protection group")
    );
    let steps: Vec<&str> = out["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["PrepareRecovery", "Restore disk0", "FinishRecovery"]
    );
    // Still protected by its group.
    let after = find_vm(&server, "alpha");
    assert_eq!(after["group"], "gold", "{after:#}");
    let jobs = cairn_ok(&["jobs", "--server", &server.url()]);
    assert!(jobs.contains("Recovery"), "{jobs}");

    // The next backup is consistent: change the disk, back up, recover that point elsewhere.
    overwrite(&lab.disk, 200 * MIB, 2 * MIB, 13);
    let changed = fingerprint(&lab.disk);
    let rp2 = backup(&server, &vm);
    let folder = lab.root.join("copy");
    let copy = accepted_id(
        &server,
        &format!("/v1/vms/{vm}/recover"),
        json!({"rp": rp2, "target": "folder", "path": folder}),
    );
    let done = wait_job(&server, &copy, "Succeeded", Duration::from_secs(300));
    assert_eq!(fingerprint(&folder.join("alpha-disk0.raw")), changed);
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(folder.join(format!("cairn-recovery-{rp2}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["rp"], rp2.as_str());
    assert_eq!(manifest["disks"][0]["file"], "alpha-disk0.raw");
    assert_eq!(
        manifest["disks"][0]["size_bytes"],
        u64::from(DISK_MIB) * MIB
    );
    assert_eq!(
        done["recovery"]["written"],
        s(&folder.join(format!("cairn-recovery-{rp2}.json")))
    );
    // And the first point still restores to the pristine disk.
    let first = lab.root.join("first");
    let job = accepted_id(
        &server,
        &format!("/v1/vms/{vm}/recover"),
        json!({"rp": rp, "target": "folder", "path": first}),
    );
    wait_job(&server, &job, "Succeeded", Duration::from_secs(300));
    assert_eq!(fingerprint(&first.join("alpha-disk0.raw")), pristine);

    // Back to the first point over the VM: its disk is unchanged since the backup of rp2, so
    // the recovery knows what it holds, reads nothing and writes the 2 MiB that differ.
    let back = accepted_id(
        &server,
        &format!("/v1/vms/{vm}/recover"),
        json!({"rp": rp, "target": "original"}),
    );
    let done = wait_job(&server, &back, "Succeeded", Duration::from_secs(300));
    assert_eq!(fingerprint(&lab.disk), pristine);
    assert_eq!(done["recovery"]["bytes_written"], 2 * MIB, "{done:#}");
    assert!(
        server.log().contains("target holds a known recovery point"),
        "the stamp was not used"
    );
}

#[test]
fn recovery_to_another_node_creates_a_new_unprotected_vm_in_qcow2_and_vhdx() {
    let lab = lab(None);
    let server = UpServer::start(&lab.data, &["--extra-node", "dr"], &[]);
    let vm = find_vm(&server, "alpha")["vm"]
        .as_str()
        .unwrap()
        .to_string();
    let rp = backup(&server, &vm);
    let dr = lab.root.join("dr-images");
    for (format, name) in [("qcow2", None), ("vhdx", Some("alpha-vhdx"))] {
        let mut body = json!({"rp": rp, "target": "host", "node": "dr", "path": dr,
            "format": format});
        if let Some(name) = name {
            body["name"] = json!(name);
        }
        let job = accepted_id(&server, &format!("/v1/vms/{vm}/recover"), body);
        let done = wait_job(&server, &job, "Succeeded", Duration::from_secs(300));
        let name = name.unwrap_or("alpha-recovered");
        let image = dr.join(format!("{name}-disk0.{format}"));
        qemu_img_compare(&lab.disk, &image);
        let info = sh("qemu-img", &["info", "--output=json", s(&image)]);
        assert!(
            info.contains(&format!("\"format\": \"{format}\"")),
            "{info}"
        );
        let recovery = &done["recovery"];
        assert_eq!(recovery["node"], "dr");
        assert_eq!(recovery["new_vm_name"], name);
        let note = recovery["note"].as_str().unwrap();
        assert!(
            note.contains("not highly available") && note.contains("not protected"),
            "{note}"
        );
        // The new VM is in the dr node's inventory, with a new identity and no group.
        let new_vm = find_vm(&server, name);
        assert_eq!(new_vm["node"], "dr");
        assert_eq!(new_vm["vm"], recovery["new_vm"]);
        assert_ne!(new_vm["vm"], vm.as_str());
        assert!(new_vm["group"].is_null(), "{new_vm:#}");
        assert_eq!(new_vm["disks"][0]["format"], format);
        let descriptor = recovery["written"].as_str().unwrap();
        assert!(
            descriptor.starts_with(s(&lab.data.join("nodes/dr/vms"))),
            "{descriptor}"
        );
    }
    // The original stays where it was.
    assert_eq!(find_vm(&server, "alpha")["node"], "local");
    // A second recovery into the same place never overwrites the first.
    let again = accepted_id(
        &server,
        &format!("/v1/vms/{vm}/recover"),
        json!({"rp": rp, "target": "host", "node": "dr", "path": dr, "format": "qcow2"}),
    );
    let failed = wait_job(&server, &again, "Failed", Duration::from_secs(60));
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("refusing to overwrite another VM's disk"),
        "{error}"
    );
    // Bad requests are refused with a code and change nothing.
    for (body, code) in [
        (
            json!({"rp": rp, "target": "host", "path": dr}),
            "invalid_request",
        ),
        (
            json!({"rp": rp, "target": "host", "node": "nowhere", "path": dr}),
            "unknown_node",
        ),
        (
            json!({"rp": rp, "target": "folder", "path": "rel/x"}),
            "invalid_path",
        ),
        (
            json!({"rp": rp, "target": "original", "webhooks": ["http://hooks.example.com/x"]}),
            "invalid_request",
        ),
        (
            json!({"rp": rp, "target": "original", "throttle": {"work_bytes_per_sec": 10}}),
            "invalid_request",
        ),
        (
            json!({"rp": rp, "target": "folder", "path": "/tmp/x", "notify_email": ["a\r\nRCPT TO:<b@c>"]}),
            "invalid_request",
        ),
    ] {
        let (status, answer) = post(&server, &format!("/v1/vms/{vm}/recover"), body.clone());
        assert!((400..500).contains(&status), "{body}: {status} {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
    }
    // Webhooks are https only: a plain http:// URL is a 400 that says so.
    let (status, answer) = post(
        &server,
        &format!("/v1/vms/{vm}/recover"),
        json!({"rp": rp, "target": "folder", "path": "/tmp/x",
               "webhooks": ["http://127.0.0.1:8080/hook"]}),
    );
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("must use https://"), "{message}");
}

/// A real SMTP server (aiosmtpd, from PyPI) that stores mail in a maildir.
struct SmtpServer {
    child: Child,
    port: u16,
    maildir: PathBuf,
}

impl SmtpServer {
    fn start(root: &Path) -> SmtpServer {
        let port = free_port();
        let maildir = root.join("maildir");
        let child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "aiosmtpd.handlers.Mailbox", s(&maildir)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m aiosmtpd (pip install aiosmtpd)");
        wait_until(Duration::from_secs(30), "aiosmtpd to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        SmtpServer {
            child,
            port,
            maildir,
        }
    }

    fn messages(&self) -> Vec<String> {
        std::fs::read_dir(self.maildir.join("new"))
            .map(|d| {
                d.flatten()
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_finished_recovery_is_mailed_through_smtp_and_posted_to_a_webhook() {
    let lab = lab(Some(8));
    let smtp = SmtpServer::start(&lab.root);
    let ca = hook::TestCa::new();
    let ca_file = ca.write_pem(&lab.root);
    let hook = ca.hook_server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let server = UpServer::start(
        &lab.data,
        &[
            "--smtp",
            &format!("127.0.0.1:{}", smtp.port),
            "--smtp-from",
            "backup@lab.example",
            "--webhook-allow",
            "127.0.0.1",
            "--webhook-ca-file",
            s(&ca_file),
        ],
        &[],
    );
    let vm = find_vm(&server, "alpha")["vm"]
        .as_str()
        .unwrap()
        .to_string();
    let rp = backup(&server, &vm);
    let url = hook.url("/hooks/cairn");
    let folder = lab.root.join("out");
    let job = accepted_id(
        &server,
        &format!("/v1/vms/{vm}/recover"),
        json!({"rp": rp, "target": "folder", "path": folder,
               "notify_email": ["ops@example.com"], "webhooks": [url]}),
    );
    wait_job(&server, &job, "Succeeded", Duration::from_secs(120));
    let posted = hook.wait_request(Duration::from_secs(60));
    assert!(
        posted.head.starts_with("POST /hooks/cairn HTTP/1.1"),
        "{}",
        posted.head
    );
    assert!(
        posted
            .header("user-agent")
            .is_some_and(|agent| agent.starts_with("cairn/")),
        "{}",
        posted.head
    );
    let body: Value = serde_json::from_str(&posted.body).unwrap();
    assert_eq!(body["event"], "recovery.finished");
    assert_eq!(body["job"], job.as_str());
    assert_eq!(body["state"], "Succeeded");
    assert_eq!(body["bytes_written"], 8 * MIB);
    let mut mail = Vec::new();
    wait_until(Duration::from_secs(60), "the mail in the maildir", || {
        mail = smtp.messages();
        !mail.is_empty()
    });
    assert_eq!(mail.len(), 1);
    let message = &mail[0];
    assert!(
        message.contains("Subject: cairn: recovery of VM alpha succeeded"),
        "{message}"
    );
    assert!(message.contains("From: backup@lab.example"), "{message}");
    assert!(message.contains("To: ops@example.com"), "{message}");
    assert!(message.contains(&job), "{message}");
    // Both outcomes are events of the job.
    let mut view = Value::Null;
    wait_until(
        Duration::from_secs(30),
        "both notifications recorded",
        || {
            view = server.get(&format!("/v1/jobs/{job}"));
            view["recovery"]["notifications"].as_array().unwrap().len() == 2
        },
    );
    for n in view["recovery"]["notifications"].as_array().unwrap() {
        assert_eq!(n["delivered"], true, "{n}");
    }
}

/// The same webhook without `--webhook-allow`: the recovery succeeds, its notification is
/// recorded as not delivered with the host and the loopback address, and nothing reaches the
/// receiver.
#[test]
fn a_webhook_to_loopback_is_refused_unless_allow_listed() {
    let lab = lab(Some(8));
    let ca = hook::TestCa::new();
    let ca_file = ca.write_pem(&lab.root);
    let hook = ca.hook_server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let server = UpServer::start(&lab.data, &["--webhook-ca-file", s(&ca_file)], &[]);
    let vm = find_vm(&server, "alpha")["vm"]
        .as_str()
        .unwrap()
        .to_string();
    let rp = backup(&server, &vm);
    let url = hook.url("/hooks/cairn");
    let job = accepted_id(
        &server,
        &format!("/v1/vms/{vm}/recover"),
        json!({"rp": rp, "target": "folder", "path": lab.root.join("out"), "webhooks": [url]}),
    );
    wait_job(&server, &job, "Succeeded", Duration::from_secs(120));
    let mut view = Value::Null;
    wait_until(Duration::from_secs(30), "the notification recorded", || {
        view = server.get(&format!("/v1/jobs/{job}"));
        !view["recovery"]["notifications"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    let notifications = view["recovery"]["notifications"].as_array().unwrap();
    assert_eq!(notifications.len(), 1, "{view}");
    let outcome = &notifications[0];
    assert_eq!(outcome["delivered"], false, "{outcome}");
    let detail = outcome["detail"].as_str().unwrap();
    assert!(
        detail.contains("host 127.0.0.1 has address 127.0.0.1, a loopback address"),
        "{detail}"
    );
    assert_eq!(hook.connections(), 0, "nothing reached the receiver");
    // A bad allow-list entry or CA file is refused at start, naming it.
    let other = lab.root.join("other-data");
    let not_pem = lab.root.join("not-a-ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    for (args, problem) in [
        (vec!["--webhook-allow", "10.0.0.0/33"], "is not a network"),
        (
            vec!["--webhook-ca-file", s(&not_pem)],
            "holds no PEM CERTIFICATE block",
        ),
    ] {
        let mut command = vec!["up", "--data-dir", s(&other), "--listen", "127.0.0.1:0"];
        command.extend(args);
        let out = cairn(&command);
        assert!(!out.status.success(), "{command:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(problem), "{command:?}: {stderr}");
        assert!(!other.exists(), "a refused start creates no data folder");
    }
}

#[test]
fn kill_9_mid_recovery_then_restart_continues_where_it_stopped() {
    const RATE: u64 = 8 * MIB;
    let lab = lab(Some(64));
    let server = UpServer::start(&lab.data, &[], &[]);
    let vm = find_vm(&server, "alpha")["vm"]
        .as_str()
        .unwrap()
        .to_string();
    let rp = backup(&server, &vm);
    let folder = lab.root.join("out");
    let throttle = json!({"work_bytes_per_sec": RATE, "off_bytes_per_sec": RATE,
        "work_days": "mon-sun", "work_hours": "00:00-24:00"});
    let job = accepted_id(
        &server,
        &format!("/v1/vms/{vm}/recover"),
        json!({"rp": rp, "target": "folder", "path": folder, "throttle": throttle}),
    );
    let target = folder.join("alpha-disk0.raw");
    let allocated = |path: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
    };
    wait_until(
        Duration::from_secs(60),
        "16 MiB of the restore written",
        || allocated(&target) >= 16 * MIB,
    );
    let before_kill = allocated(&target);
    assert!(
        before_kill < 60 * MIB,
        "the throttle did not hold: {before_kill} bytes"
    );
    server.kill9();

    let restarted = Instant::now();
    let server = UpServer::start(&lab.data, &[], &[]);
    let done = wait_job(&server, &job, "Succeeded", Duration::from_secs(120));
    let took = restarted.elapsed();
    assert_eq!(fingerprint(&target), fingerprint(&lab.disk));
    let restore = done["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "Restore disk0")
        .unwrap()
        .clone();
    assert!(restore["attempt"].as_u64().unwrap() >= 2, "{restore:#}");
    // The continuing attempt wrote only what was missing, at the throttled rate.
    let written = done["recovery"]["bytes_written"].as_u64().unwrap();
    assert!(
        written <= 64 * MIB - 16 * MIB + 4 * MIB,
        "the restarted restore wrote {written} bytes: it started over"
    );
    assert!(written > 0);
    let minimum = Duration::from_millis((written.saturating_sub(RATE)) * 1000 / RATE);
    assert!(
        took >= minimum,
        "{written} bytes in {took:?}: not throttled to {RATE} B/s"
    );

    // A throttled recovery can be cancelled.
    let slow = json!({"work_bytes_per_sec": 65_536, "off_bytes_per_sec": 65_536});
    let job = accepted_id(
        &server,
        &format!("/v1/vms/{vm}/recover"),
        json!({"rp": rp, "target": "folder", "path": lab.root.join("slow"), "throttle": slow}),
    );
    wait_job(&server, &job, "Running", Duration::from_secs(30));
    let out = cairn_ok(&["job", "cancel", &job, "--server", &server.url()]);
    assert!(out.contains("cancel"), "{out}");
    // A deadline, not a wait: on a loaded 2-core machine running the other recovery tests
    // beside this one, the cancelled step's report can take longer than a minute.
    wait_job(&server, &job, "Cancelled", Duration::from_secs(180));
}

#[test]
fn targets_outside_the_nodes_roots_and_unregistered_repositories_are_refused() {
    let lab = lab(Some(4));
    let server = UpServer::start(&lab.data, &[], &[]);
    let vm = find_vm(&server, "alpha")["vm"]
        .as_str()
        .unwrap()
        .to_string();
    let rp = backup(&server, &vm);
    // A folder outside the test's folder and the data folder: outside every recovery root.
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("dr");
    for (route, body) in [
        (
            "recover",
            json!({"rp": rp, "target": "folder", "path": target}),
        ),
        (
            "recover",
            json!({"rp": rp, "target": "host", "node": "local", "path": target}),
        ),
        (
            "recover-items",
            json!({"rp": rp, "disk": "disk0", "items": ["/disk"], "to": target}),
        ),
    ] {
        let job = accepted_id(&server, &format!("/v1/vms/{vm}/{route}"), body.clone());
        let done = wait_job(&server, &job, "Failed", Duration::from_secs(120));
        let error = done["error"].as_str().unwrap_or_default().to_string();
        assert!(
            error.contains(&format!(
                "outside the node's recovery roots: {}",
                target.display()
            )),
            "{body}: {done:#}"
        );
    }
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "nothing was written outside the roots"
    );
    // A seed folder outside the seed roots.
    let (status, answer) = post(
        &server,
        &format!("/v1/vms/{vm}/seed"),
        json!({"seed": outside.path()}),
    );
    if status == 202 {
        let done = wait_job(
            &server,
            answer["id"].as_str().unwrap(),
            "Failed",
            Duration::from_secs(120),
        );
        assert!(
            done["error"]
                .as_str()
                .unwrap_or_default()
                .contains("outside the node's seed roots"),
            "{done:#}"
        );
    }
    // A group naming a repository the node does not register is refused when it is made.
    let (status, answer) = post(
        &server,
        "/v1/groups",
        json!({"name": "elsewhere", "vms": [vm], "sync": "1d", "repository": "offsite"}),
    );
    assert!((400..500).contains(&status), "{status} {answer}");
    assert_eq!(answer["error"]["code"], "unknown_repository", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("registered: default"),
        "{answer}"
    );
}

/// Waits until `job`'s PrepareRecovery step succeeded (its Restore is then held by the fault
/// hook), failing if the job ends first.
fn wait_prepared(server: &UpServer, job: &str) {
    wait_until(
        Duration::from_secs(120),
        &format!("job {job} past PrepareRecovery"),
        || {
            let view = server.get(&format!("/v1/jobs/{job}"));
            assert!(
                !["Succeeded", "Failed", "Cancelled"].contains(&view["state"].as_str().unwrap()),
                "the job ended before the swap: {view:#}"
            );
            view["steps"]
                .as_array()
                .unwrap()
                .iter()
                .any(|step| step["kind"] == "PrepareRecovery" && step["state"] == "Succeeded")
        },
    );
}

#[test]
fn a_symlink_swapped_in_between_prepare_and_restore_does_not_redirect_the_write() {
    let lab = lab(Some(4));
    // Each Restore step waits 5 s at its start: the window of the swap.
    let server = UpServer::start(
        &lab.data,
        &[],
        &[("CAIRN_FAULT_STEP_DELAY_MS", "Restore=5000")],
    );
    let vm = find_vm(&server, "alpha")["vm"]
        .as_str()
        .unwrap()
        .to_string();
    let rp = backup(&server, &vm);
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("alpha-recovered-disk0.raw");
    random_file(&victim, 4 * MIB, 99);
    let victim_bytes = std::fs::read(&victim).unwrap();
    let recovered = server.data.join("recovered");

    // 1. The target file itself becomes a link to the victim.
    let target = recovered.join("dr-file");
    let job = accepted_id(
        &server,
        &format!("/v1/vms/{vm}/recover"),
        json!({"rp": rp, "target": "host", "node": "local", "path": target, "format": "raw"}),
    );
    wait_prepared(&server, &job);
    let image = target.join("alpha-recovered-disk0.raw");
    if image.symlink_metadata().is_ok() {
        std::fs::remove_file(&image).unwrap();
    }
    std::fs::create_dir_all(&target).unwrap();
    std::os::unix::fs::symlink(&victim, &image).unwrap();
    let done = wait_job(&server, &job, "Failed", Duration::from_secs(120));
    let error = done["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("symbolic link")
            || error.contains("Too many levels")
            || error.contains("exists"),
        "{done:#}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), victim_bytes);

    // 2. The target folder is moved away and a link to the outside folder put in its place.
    let target = recovered.join("dr-folder");
    let job = accepted_id(
        &server,
        &format!("/v1/vms/{vm}/recover"),
        json!({"rp": rp, "target": "host", "node": "local", "path": target, "format": "raw"}),
    );
    wait_prepared(&server, &job);
    if target.symlink_metadata().is_ok() {
        std::fs::rename(&target, recovered.join("dr-folder.moved")).unwrap();
    }
    std::os::unix::fs::symlink(outside.path(), &target).unwrap();
    let done = wait_job(&server, &job, "Failed", Duration::from_secs(120));
    assert!(done["error"].as_str().is_some(), "{done:#}");
    assert_eq!(std::fs::read(&victim).unwrap(), victim_bytes);
    let names: Vec<_> = std::fs::read_dir(outside.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["alpha-recovered-disk0.raw"], "nothing new outside");
    // The server goes on serving.
    assert!(server.get("/v1/vms").is_array());
}
