//! Live VMs end to end: `cairn up` backs up a running VM — a real `qemu-storage-daemon` whose
//! writable NBD export is written by `qemu-io` as the guest — through QMP snapshots and dirty
//! bitmaps. The guest keeps writing during transfers; the worker is killed with SIGKILL in the
//! middle of one; a bitmap is deleted behind cairn's back. Every recovery point is restored and
//! compared with the guest's disk as it was at its snapshot.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cairn_tests::*;
use serde_json::{Value, json};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A `qemu-storage-daemon` serving `disk.qcow2` as node `disk0`, killed by PID on drop.
struct Qsd {
    dir: PathBuf,
    child: Child,
}

impl Qsd {
    fn start(dir: &Path, size_mib: u64) -> Qsd {
        let image = dir.join("disk.qcow2");
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                s(&image),
                &format!("{size_mib}M"),
            ],
        );
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                image.display()
            ))
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=disk0,file=file0")
            .arg("--nbd-server")
            .arg(format!(
                "addr.type=unix,addr.path={}",
                dir.join("nbd.sock").display()
            ))
            .arg("--export")
            .arg("type=nbd,id=guest,node-name=disk0,name=guest,writable=on")
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                dir.join("qmp.sock").display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon starts");
        let qsd = Qsd {
            dir: dir.to_path_buf(),
            child,
        };
        wait_until(Duration::from_secs(20), "qemu-storage-daemon", || {
            qsd.dir.join("qmp.sock").exists() && qsd.dir.join("nbd.sock").exists()
        });
        qsd
    }

    fn guest_uri(&self) -> String {
        format!(
            "nbd+unix:///guest?socket={}",
            self.dir.join("nbd.sock").display()
        )
    }

    /// The guest writes 64 KiB of `pattern` at each offset (MiB).
    fn write(&self, pattern: u8, offsets_mib: &[u64]) {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for o in offsets_mib {
            cmd.arg("-c").arg(format!("write -P {pattern} {o}M 64k"));
        }
        let out = cmd.arg(self.guest_uri()).output().expect("qemu-io runs");
        assert!(
            out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The guest's disk now, as a raw file.
    fn copy(&self, to: &Path) {
        sh(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &self.guest_uri(),
                s(to),
            ],
        );
    }

    /// One QMP command over a fresh connection.
    fn qmp(&self, command: &str, arguments: Value) -> Value {
        let stream = UnixStream::connect(self.dir.join("qmp.sock")).expect("QMP socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut read = || loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("QMP answer");
            let value: Value = serde_json::from_str(&line).expect("QMP JSON");
            if value.get("event").is_none() {
                return value;
            }
        };
        read();
        for request in [
            json!({"execute": "qmp_capabilities"}),
            json!({"execute": command, "arguments": arguments}),
        ] {
            writer.write_all(format!("{request}\n").as_bytes()).unwrap();
            let answer = read();
            assert!(answer.get("return").is_some(), "{command}: {answer}");
            if request["execute"] == command {
                return answer["return"].clone();
            }
        }
        unreachable!()
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn request_backup(server: &UpServer, vm: &str) -> String {
    let (status, body) = server.http("POST", &format!("/v1/vms/{vm}/backup"), Some("{}"));
    assert_eq!(status, 202, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn job(server: &UpServer, id: &str) -> Value {
    server.get(&format!("/v1/jobs/{id}"))
}

fn wait_job(server: &UpServer, id: &str) -> Value {
    let mut last = Value::Null;
    wait_until(
        Duration::from_secs(120),
        &format!("job {id} to succeed"),
        || {
            last = job(server, id);
            assert_ne!(last["state"], "Failed", "{last:#}\n{}", server.log());
            last["state"] == "Succeeded"
        },
    );
    last
}

fn step(job: &Value, kind: &str) -> Value {
    job["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == kind)
        .cloned()
        .unwrap_or(Value::Null)
}

fn wait_step_running(server: &UpServer, id: &str, kind: &str) {
    wait_until(Duration::from_secs(60), &format!("{kind} to run"), || {
        step(&job(server, id), kind)["state"] == "Running"
    });
}

/// The recovery point's disk0 entry: (bytes read).
fn bytes_read(server: &UpServer, vm: &str, rp: &str) -> u64 {
    let rps = server.get(&format!("/v1/vms/{vm}/recovery-points"));
    let rp = rps
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rp"] == rp)
        .unwrap_or_else(|| panic!("no recovery point {rp}: {rps:#}"));
    rp["disks"][0]["bytes_read"].as_u64().unwrap()
}

/// Restores recovery point `rp` and checks it equals `expected` (a raw copy of the guest disk).
fn check_restore(server: &UpServer, root: &Path, vm: &str, rp: &str, expected: &Path) {
    let to = root.join(format!("restore-{rp}"));
    let body = json!({"rp": rp, "to": to}).to_string();
    let (status, accepted) = server.http("POST", &format!("/v1/vms/{vm}/restore"), Some(&body));
    assert_eq!(status, 202, "{accepted}");
    let id = serde_json::from_str::<Value>(&accepted).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_job(server, &id);
    let restored = to.join("live01-disk0.qcow2");
    let out = Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            s(&restored),
            s(expected),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "recovery point {rp} differs from the disk at its snapshot: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn disk_tracking(server: &UpServer, vm: &str) -> String {
    server
        .get("/v1/vms")
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == vm)
        .unwrap()["disks"][0]["change_tracking"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_running_vm_is_backed_up_incrementally_while_it_writes_and_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let qsd = Qsd::start(root, 64);
    qsd.write(0x11, &[0, 3, 17, 40, 63]);
    let data = root.join("data");
    std::fs::create_dir_all(data.join("vms")).unwrap();
    let descriptor = json!({
        "name": "live01",
        "uuid": "0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d11",
        "power": "running",
        "disks": [{"id": "disk0", "path": root.join("disk.qcow2"), "format": "qcow2", "node": "disk0"}],
        "qemu": {"qmp": root.join("qmp.sock"), "nbd": root.join("nbd.sock")},
    });
    std::fs::write(data.join("vms/live01.json"), descriptor.to_string()).unwrap();
    let delayed = [("CAIRN_FAULT_STEP_DELAY_MS", "Transfer=2000")];
    let server = UpServer::start(&data, &[], &delayed);
    let mut vm = String::new();
    wait_until(
        Duration::from_secs(60),
        "the live VM in the inventory",
        || {
            let vms = server.get("/v1/vms");
            vm = vms
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == "live01")
                .map(|v| v["vm"].as_str().unwrap().to_string())
                .unwrap_or_default();
            !vm.is_empty()
        },
    );
    assert_eq!(disk_tracking(&server, &vm), "none");

    // 1. Full backup; the guest writes while the transfer runs (held by the fault hook).
    let at1 = root.join("at1.raw");
    qsd.copy(&at1);
    let job1 = request_backup(&server, &vm);
    wait_step_running(&server, &job1, "Transfer disk0");
    qsd.write(0x22, &[3, 30]);
    let done1 = wait_job(&server, &job1);
    let rp1 = done1["rp"].as_str().unwrap().to_string();
    assert_eq!(disk_tracking(&server, &vm), "active");

    // 2. Incremental, killed with SIGKILL mid-transfer; after the restart the retry reads the
    //    same snapshot and stays incremental.
    qsd.write(0x33, &[10, 50]);
    let at2 = root.join("at2.raw");
    qsd.copy(&at2);
    let job2 = request_backup(&server, &vm);
    wait_step_running(&server, &job2, "Transfer disk0");
    qsd.write(0x44, &[12]);
    server.kill9();
    qsd.write(0x55, &[20]);
    let server = UpServer::start(&data, &[], &delayed);
    let done2 = wait_job(&server, &job2);
    assert!(
        step(&done2, "Transfer disk0")["attempt"].as_u64().unwrap() >= 2,
        "{done2:#}"
    );
    let rp2 = done2["rp"].as_str().unwrap().to_string();
    // Dirty since snapshot 1: 3 and 30 (written during transfer 1), 10, 50.
    assert_eq!(bytes_read(&server, &vm, &rp2), 4 * 65536);
    assert_eq!(disk_tracking(&server, &vm), "active");

    // 3. A failed (cancelled) transfer loses no dirty block: the next backup reads every
    //    change since rp2.
    let cancelled = request_backup(&server, &vm);
    wait_step_running(&server, &cancelled, "Transfer disk0");
    let (status, body) = server.http("POST", &format!("/v1/jobs/{cancelled}/cancel"), Some("{}"));
    assert_eq!(status, 202, "{body}");
    wait_until(Duration::from_secs(60), "the cancelled job to end", || {
        job(&server, &cancelled)["state"] == "Cancelled"
    });
    qsd.write(0x77, &[45]);
    let at_after = root.join("at-after-cancel.raw");
    qsd.copy(&at_after);
    let job_after = request_backup(&server, &vm);
    let done_after = wait_job(&server, &job_after);
    let rp_after = done_after["rp"].as_str().unwrap().to_string();
    // Dirty since snapshot 2: 12 and 20 (during and after the killed transfer) and 45.
    assert_eq!(bytes_read(&server, &vm, &rp_after), 3 * 65536);

    // 4. The bitmap is deleted behind cairn's back: an express full, recorded and healed.
    let nodes = qsd.qmp("query-named-block-nodes", json!({"flat": true}));
    let bitmap = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk0")
        .unwrap()["dirty-bitmaps"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    qsd.qmp(
        "block-dirty-bitmap-remove",
        json!({"node": "disk0", "name": bitmap}),
    );
    qsd.write(0x66, &[33]);
    let at3 = root.join("at3.raw");
    qsd.copy(&at3);
    let job3 = request_backup(&server, &vm);
    let done3 = wait_job(&server, &job3);
    let rp3 = done3["rp"].as_str().unwrap().to_string();
    assert!(
        bytes_read(&server, &vm, &rp3) > 8 * 65536,
        "read everything"
    );
    let events = server.get("/v1/events?limit=1000").to_string();
    assert!(
        events.contains("change tracking of disk disk0 lost") && events.contains(&bitmap),
        "{events}"
    );
    assert_eq!(
        disk_tracking(&server, &vm),
        "active",
        "the express full started a new bitmap"
    );

    for (rp, expected) in [
        (&rp1, &at1),
        (&rp2, &at2),
        (&rp_after, &at_after),
        (&rp3, &at3),
    ] {
        check_restore(&server, root, &vm, rp, expected);
    }
}
