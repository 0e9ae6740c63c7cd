//! Helpers shared by the end-to-end tests: the `cairn` binary, realistic disk images built by
//! the project's shared bench tools, hashing and polling with deadlines.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .into()
}

/// The `cairn` binary of this build profile, (re)built once per test process so a test never
/// runs a stale binary.
pub fn cairn_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("test executable path");
            // target/<profile>/deps/<test> → target/<profile>/cairn
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("target/<profile>");
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let mut build = Command::new(env!("CARGO"));
            build
                .args(["build", "--quiet", "-p", "cairn"])
                .current_dir(workspace());
            if release {
                build.arg("--release");
            }
            assert!(
                build.status().expect("cargo runs").success(),
                "building cairn failed"
            );
            profile_dir.join("cairn")
        })
        .clone()
}

/// Runs `cairn ARGS`; returns its output whatever the exit code.
pub fn cairn(args: &[&str]) -> Output {
    Command::new(cairn_bin())
        .args(args)
        .env("CAIRN_LOG", "warn")
        .output()
        .expect("cairn runs")
}

/// Runs `cairn ARGS`, fails the test unless it exits 0, and returns stdout.
pub fn cairn_ok(args: &[&str]) -> String {
    let out = cairn(args);
    assert!(
        out.status.success(),
        "cairn {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs `cairn ARGS --json` and parses stdout.
pub fn cairn_json(args: &[&str]) -> serde_json::Value {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let stdout = cairn_ok(&with_json);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("cairn {args:?}: bad JSON {stdout:?}: {e}"))
}

/// A tool from the project's shared bench folder (`../shared/bench` beside the repository).
pub fn bench_tool(name: &str) -> PathBuf {
    let path = workspace()
        .parent()
        .expect("workspace has a parent")
        .join("shared/bench")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: the tests need the shared bench tools",
        path.display()
    );
    path
}

/// A realistic raw VM disk of `size_mib` MiB (GPT, FAT ESP, ext4 root, swap), built once per
/// target folder with `make-vm-disk` and reused. Callers copy it before changing it.
pub fn vm_disk(size_mib: u32) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/tmp/images, shared by every test binary.
    let target = exe.ancestors().nth(3).expect("target folder");
    let dir = target.join("tmp").join("images");
    std::fs::create_dir_all(&dir).expect("image folder");
    let path = dir.join(format!("vm-{size_mib}.raw"));
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_builder = BUILDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if path.exists() {
        return path;
    }
    // Build under a unique name and rename, so concurrent tests never see a half-built image.
    let tmp = dir.join(format!(".build-{}-{size_mib}.raw", std::process::id()));
    let status = Command::new(bench_tool("make-vm-disk"))
        .arg(&tmp)
        .arg(size_mib.to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .expect("make-vm-disk runs");
    assert!(status.success(), "make-vm-disk failed");
    std::fs::rename(&tmp, &path).expect("rename image");
    path
}

/// Copies an image keeping it sparse.
pub fn sparse_copy(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp runs");
    assert!(status.success(), "cp {} failed", from.display());
}

/// Runs a command and fails the test unless it succeeds; returns stdout.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Content fingerprint (FNV-1a over 64-bit words) of a file, for comparing images
/// at different times without keeping copies.
pub fn fingerprint(path: &Path) -> (u64, u64) {
    use std::io::Read;
    let mut file = std::fs::File::open(path).expect("open for fingerprint");
    let mut buf = vec![0u8; 1 << 20];
    let (mut hash, mut len) = (0xcbf2_9ce4_8422_2325u64, 0u64);
    loop {
        let n = file.read(&mut buf).expect("read for fingerprint");
        if n == 0 {
            return (hash, len);
        }
        len += n as u64;
        for word in buf[..n].chunks(8) {
            let mut w = [0u8; 8];
            w[..word.len()].copy_from_slice(word);
            hash = (hash ^ u64::from_le_bytes(w)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Polls `check` every 10 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes `len` bytes of incompressible pseudo-random data (xorshift) to `path`.
pub fn random_file(path: &Path, len: u64, seed: u64) {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut x = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < len {
        for word in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = (len - written).min(block.len() as u64) as usize;
        file.write_all(&block[..n]).expect("write");
        written += n as u64;
    }
    file.flush().expect("flush");
}

/// A snapshot of a folder tree (relative path → fingerprint) to prove an operation changed
/// nothing. Lock files are left out: taking a lock creates them.
pub fn tree_state(root: &Path) -> Vec<(PathBuf, (u64, u64))> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_none_or(|e| e != "lock") {
                out.push((
                    path.strip_prefix(root).expect("under root").into(),
                    fingerprint(&path),
                ));
            }
        }
    }
    out.sort();
    out
}
