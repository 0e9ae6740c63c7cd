//! QMP client tests against a real `qemu-storage-daemon`, and hostile-server tests against a
//! scripted socket. Also home of [`Qsd`], the daemon the `qemu` adapter's tests use as a VM.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Error, Qmp};

/// A running `qemu-storage-daemon` serving one disk as block node `disk0`: QMP on `qmp.sock`,
/// an NBD server on `nbd.sock` with a writable export `guest` (the guest's view). Killed by PID
/// on drop.
pub(crate) struct Qsd {
    pub(crate) dir: PathBuf,
    pub(crate) image: PathBuf,
    child: Option<Child>,
}

impl Qsd {
    /// Creates a new image of `size` bytes in `dir` and serves it.
    pub(crate) fn new(dir: &Path, format: &'static str, size: u64) -> Qsd {
        let image = dir.join(format!("disk.{format}"));
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(&image)
            .arg(size.to_string())
            .output()
            .expect("qemu-img runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Qsd::serve(dir, &image, format)
    }

    /// Serves an existing image.
    pub(crate) fn serve(dir: &Path, image: &Path, format: &'static str) -> Qsd {
        let qmp = dir.join("qmp.sock");
        let nbd = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&nbd);
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                image.display()
            ))
            .arg("--blockdev")
            .arg(format!("driver={format},node-name=disk0,file=file0"))
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
            .arg("--export")
            .arg("type=nbd,id=guest,node-name=disk0,name=guest,writable=on")
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                qmp.display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-storage-daemon starts");
        let qsd = Qsd {
            dir: dir.to_path_buf(),
            image: image.to_path_buf(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(qmp.exists() && nbd.exists()) {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        qsd
    }

    pub(crate) fn qmp_path(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    pub(crate) fn nbd_path(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    /// The guest's writable NBD URI.
    pub(crate) fn guest_uri(&self) -> String {
        format!("nbd+unix:///guest?socket={}", self.nbd_path().display())
    }

    /// Runs qemu-io commands against the guest export (the guest writing).
    pub(crate) fn guest_io(&self, commands: &[String]) {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for c in commands {
            cmd.arg("-c").arg(c);
        }
        let out = cmd.arg(self.guest_uri()).output().expect("qemu-io runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !stdout.contains("failed"),
            "qemu-io {commands:?}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Copies the guest's current disk into a raw file.
    pub(crate) fn guest_copy(&self, to: &Path) {
        let out = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(self.guest_uri())
            .arg(to)
            .output()
            .expect("qemu-img runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Asks the daemon to quit (persistent bitmaps are written to a qcow2) and waits.
    pub(crate) fn quit(mut self) {
        let qmp = self.qmp_path();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = Qmp::connect(&qmp, Duration::from_secs(10)).await.unwrap();
            let _ = c.execute("quit", None).await;
        });
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "qemu-storage-daemon did not quit"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn commands_errors_and_events_against_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let qsd = Qsd::new(dir.path(), "qcow2", 16 << 20);
    rt().block_on(async {
        let mut qmp = Qmp::connect(&qsd.qmp_path(), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(qmp.version.0 >= 7, "{:?}", qmp.version);
        let nodes = qmp
            .execute("query-named-block-nodes", Some(json!({"flat": true})))
            .await
            .unwrap();
        assert!(
            nodes
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["node-name"] == "disk0"),
            "{nodes}"
        );
        let err = qmp
            .execute(
                "block-dirty-bitmap-add",
                Some(json!({"node": "nosuchnode", "name": "b"})),
            )
            .await
            .unwrap_err();
        match &err {
            Error::Command { class, desc, .. } => {
                assert_eq!(class, "GenericError");
                assert!(desc.contains("nosuchnode"), "{desc}");
            }
            other => panic!("{other}"),
        }
        // The connection stays usable after a refused command; events are collected.
        qmp.execute("block-export-del", Some(json!({"id": "guest"})))
            .await
            .unwrap();
        // The deletion event may trail the answer: poll with a deadline.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut events = Vec::new();
        while !events
            .iter()
            .any(|e: &serde_json::Value| e["event"] == "BLOCK_EXPORT_DELETED")
        {
            assert!(
                Instant::now() < deadline,
                "no BLOCK_EXPORT_DELETED: {events:?}"
            );
            qmp.execute("query-block-exports", None).await.unwrap();
            events.extend(qmp.take_events());
        }
        let err = qmp.execute("no-such-command", None).await.unwrap_err();
        assert_eq!(err.class(), Some("CommandNotFound"), "{err}");
        let err = qmp
            .execute("query-version", Some(json!([1])))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("must be an object"), "{err}");
    });
}

/// A scripted server: sends `greeting`, then answers each request line with the next answer.
fn scripted(dir: &Path, greeting: &'static str, answers: Vec<String>) -> PathBuf {
    let path = dir.join(format!("fake-{}.sock", answers.len()));
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut writer = stream.try_clone().unwrap();
        writer.write_all(greeting.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        for answer in answers {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                return;
            }
            if writer.write_all(answer.as_bytes()).is_err() {
                return;
            }
        }
        // Keep the connection open without answering (timeouts).
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        std::thread::sleep(Duration::from_secs(3));
    });
    path
}

const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"major\": 10, \"minor\": 0, \"micro\": 2}}, \"capabilities\": []}}\n";

#[test]
fn hostile_servers_yield_errors_not_panics_or_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let caps = "{\"return\": {}, \"id\": 1}\n".to_string();
    let cases: Vec<(&'static str, Vec<String>, &str)> = vec![
        ("not json\n", vec![], "not JSON"),
        ("[1,2]\n", vec![], "not a JSON object"),
        ("{\"hello\": 1}\n", vec![], "not QMP's"),
        (
            GREETING,
            vec!["{\"return\": {}, \"id\": 7}\n".into()],
            "carries id 7",
        ),
        (
            GREETING,
            vec![caps.clone(), "{\"id\": 2}\n".into()],
            "neither return nor error",
        ),
        (
            GREETING,
            vec![
                caps.clone(),
                "{\"error\": {\"desc\": \"x\"}, \"id\": 2}\n".into(),
            ],
            "lacks class or desc",
        ),
        (GREETING, vec![caps.clone()], "no answer within"),
        (
            GREETING,
            vec![
                caps.clone(),
                format!(
                    "{{\"return\": \"{}\"",
                    "x".repeat(super::MAX_LINE_BYTES + 10)
                ),
            ],
            "longer than",
        ),
    ];
    rt().block_on(async {
        for (i, (greeting, answers, wanted)) in cases.into_iter().enumerate() {
            let sub = dir.path().join(i.to_string());
            std::fs::create_dir(&sub).unwrap();
            let path = scripted(&sub, greeting, answers);
            let result = async {
                let mut qmp = Qmp::connect(&path, Duration::from_millis(500)).await?;
                qmp.execute("query-version", None).await
            }
            .await;
            let err = result.unwrap_err().to_string();
            assert!(err.contains(wanted), "case {i}: {err}");
        }
        let err = Qmp::connect(&dir.path().join("missing.sock"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("missing.sock"), "{err}");
    });
}
