//! Helpers shared by the end-to-end tests: the `cairn` binary, realistic disk images and guest
//! churn (`ops/vmdisk`), hashing and polling with deadlines, HTTPS webhook receivers (`hook`).

pub mod hook;
pub mod nats;

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

/// The config folder (`XDG_CONFIG_HOME`) of every `cairn` the tests run, under the target
/// folder: `cairn up` saves its admin token there for the address it serves, and the CLI
/// finds it there, as on an administrator's machine, without touching the real user's.
pub fn config_home() -> PathBuf {
    static HOME: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    HOME.get_or_init(|| {
        use std::os::unix::fs::DirBuilderExt;
        let exe = std::env::current_exe().expect("test executable path");
        let target = exe.ancestors().nth(3).expect("target folder");
        let dir = target.join("tmp").join("cairn-config");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .expect("config folder");
        dir
    })
    .clone()
}

/// The admin token the `cairn up` or `cairn orchestrator --bootstrap-token` at `addr`
/// (`host:port`) saved for the CLI, if any.
pub fn token_for(addr: &str) -> Option<String> {
    let name: String = addr
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = config_home().join("cairn").join("tokens").join(name);
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_string())
}

/// `cairn` with the tests' environment: quiet logs, the tests' config folder, no token from
/// outside.
pub fn cairn_command() -> Command {
    let mut command = Command::new(cairn_bin());
    command
        .env("CAIRN_LOG", "warn")
        .env("XDG_CONFIG_HOME", config_home())
        .env_remove("CAIRN_TOKEN")
        .env_remove("CAIRN_TOKEN_FILE");
    command
}

/// Runs `cairn ARGS`, which must fail at once (a server that starts instead is killed and
/// fails the test rather than hanging it); returns its stderr.
pub fn cairn_refused(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let stderr_path = dir.path().join("stderr");
    let mut child = cairn_command()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("cairn runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cairn {args:?} did not exit within a minute");
        }
        // Polling a child's exit with a deadline; nothing else signals it.
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(!status.success(), "cairn {args:?} succeeded: {stderr}");
    stderr
}

/// Runs `cairn ARGS`; returns its output whatever the exit code.
pub fn cairn(args: &[&str]) -> Output {
    cairn_command().args(args).output().expect("cairn runs")
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

/// A realistic raw VM disk of `size_mib` MiB (GPT, FAT ESP, ext4 root of /usr/lib's files,
/// swap), built once per target folder by `cairn-vmdisk` and reused. Callers copy it before
/// changing it.
pub fn vm_disk(size_mib: u32) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/tmp/images, shared by every test binary.
    let target = exe.ancestors().nth(3).expect("target folder");
    let dir = target.join("tmp").join("images");
    std::fs::create_dir_all(&dir).expect("image folder");
    // The builder's version is in the name: a changed builder never reuses an old image.
    let path = dir.join(format!(
        "vm-{size_mib}-v{}.raw",
        cairn_vmdisk::disk::BUILDER_VERSION
    ));
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_builder = BUILDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if path.exists() {
        return path;
    }
    // Other test processes may build the same image: `build` renames a complete image into
    // place, so a reader never sees half of one.
    let spec = cairn_vmdisk::DiskSpec {
        size_mib,
        ..cairn_vmdisk::DiskSpec::default()
    };
    cairn_vmdisk::build(&spec, &path, &mut |_| {})
        .unwrap_or_else(|e| panic!("building {}: {e}", path.display()));
    path
}

/// A guest's writes between two backups: overwrites `percent` of a raw image with fresh
/// blocks of 64 KiB, deterministically by `seed`; returns the written `(offset, length)`s.
pub fn churn_disk(image: &Path, percent: f64, seed: u64) -> Vec<(u64, u64)> {
    let spec = cairn_vmdisk::ChurnSpec {
        percent,
        seed,
        block: cairn_vmdisk::ChurnSpec::DEFAULT_BLOCK,
    };
    cairn_vmdisk::churn(image, &spec)
        .unwrap_or_else(|e| panic!("churning {}: {e}", image.display()))
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

/// Makes the encrypted repository `repo` with its key in `key`, and backs up `image` (made
/// here: 4 MiB of random bytes from `seed`) into it as disk `d`.
pub fn encrypted_repo_with_one_backup(repo: &Path, key: &Path, image: &Path, seed: u64) {
    let arg = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    let (repo, key) = (arg(repo), arg(key));
    cairn_ok(&["repo", "init", &repo, "--encrypt", "--key-file", &key]);
    random_file(image, 4 << 20, seed);
    let image = arg(image);
    cairn_ok(&[
        "repo",
        "backup",
        &repo,
        "--source",
        &image,
        "--disk",
        "d",
        "--key-file",
        &key,
    ]);
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

/// The permission bits (`0o7777`) of a file or folder, not following a symlink.
pub fn mode_of(path: &Path) -> u32 {
    mode_of_meta(
        &std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
}

/// Every file, folder and link at or below `root` with its mode, `root` first (what
/// `find ROOT` lists), without following links.
pub fn walk_modes(root: &Path) -> Vec<(PathBuf, u32, bool)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta =
            std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read_dir") {
                stack.push(entry.expect("entry").path());
            }
        }
        out.push((path, mode_of_meta(&meta), meta.is_dir()));
    }
    out
}

fn mode_of_meta(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::MetadataExt;
    meta.mode() & 0o7777
}

/// What `find` prints for `root` when asked for any of the permission bits 077 (`-perm` in its
/// any-bit form): everything at or below `root` that gives group or others any permission.
/// Symlinks are left out (their mode means nothing).
pub fn open_to_others(root: &Path) -> Vec<String> {
    walk_modes(root)
        .into_iter()
        .filter(|(path, mode, _)| {
            mode & 0o077 != 0 && !std::fs::symlink_metadata(path).unwrap().is_symlink()
        })
        .map(|(path, mode, _)| format!("{mode:04o} {}", path.display()))
        .collect()
}

/// Starts the `cairn` binary with `args` at log level info, its log going to `log`, with a
/// thread that forwards each line it prints on stdout to the returned channel.
pub fn spawn_cairn<I, S>(
    args: I,
    log: std::fs::File,
    env: &[(&str, &str)],
) -> std::io::Result<(std::process::Child, std::sync::mpsc::Receiver<String>)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    use std::io::BufRead;
    let mut command = Command::new(cairn_bin());
    command
        .args(args)
        .env("CAIRN_LOG", "info")
        .env("XDG_CONFIG_HOME", config_home())
        .env_remove("CAIRN_TOKEN")
        .env_remove("CAIRN_TOKEN_FILE")
        .stdout(std::process::Stdio::piped())
        .stderr(log);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn()?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    Ok((child, rx))
}

/// A running `cairn up` started by a test, on a loopback port chosen by the kernel. Its log is
/// kept in the data folder (`cairn.log`, private like everything there) and printed when the
/// test fails. Dropping it kills it.
pub struct UpServer {
    child: std::process::Child,
    pub addr: String,
    /// `http`, or `https` when it serves TLS.
    pub scheme: String,
    pub data: PathBuf,
    /// What it printed on stdout before it said it is up (e.g. a new repository's key hint).
    pub banner: Vec<String>,
}

impl UpServer {
    /// Starts `cairn up --data-dir DATA --listen 127.0.0.1:0 EXTRA...` with extra environment,
    /// with the folder that holds DATA (the test's) as a recovery, image and seed root.
    /// The data folder is made with the test's umask (usually 0755), as an administrator might
    /// have made it; `cairn up` makes it 0700.
    pub fn start(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> UpServer {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(data).expect("data folder");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(data.join("cairn.log"))
            .expect("log file");
        let mut args: Vec<std::ffi::OsString> = vec!["up".into(), "--data-dir".into()];
        args.push(data.into());
        args.extend(["--listen", "127.0.0.1:0"].map(Into::into));
        // The test's folder (where its images, seeds and recovery targets are) is registered
        // as a recovery, seed and image root, besides the data folder's defaults.
        let lab = data
            .parent()
            .map(|p| std::path::absolute(p).expect("absolute test folder"))
            .expect("the data folder is inside the test's folder");
        for flag in ["--recovery-root", "--image-root", "--seed-root"] {
            args.push(flag.into());
            args.push(lab.clone().into());
        }
        args.extend(extra.iter().map(Into::into));
        let (mut child, rx) = spawn_cairn(args, log, env).expect("cairn up starts");
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut banner = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("cairn is up: API on ") {
                        let url = url.split(',').next().expect("address");
                        let (scheme, addr) = url.split_once("://").expect("a URL");
                        return UpServer {
                            child,
                            addr: addr.to_string(),
                            scheme: scheme.to_string(),
                            data: data.into(),
                            banner,
                        };
                    }
                    banner.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "cairn up did not start; log:\n{}",
                        std::fs::read_to_string(data.join("cairn.log")).unwrap_or_default()
                    );
                }
            }
        }
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// SIGTERM, as an administrator stops it; waits until it has exited.
    pub fn stop(mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: kill has no memory-safety preconditions; the child is ours and not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM");
        let status = self.child.wait().expect("reaped");
        assert!(status.success(), "cairn up exited with {status}");
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("cairn.log")).unwrap_or_default()
    }

    /// An HTTP request to the API; returns the status and the body.
    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        http(&self.addr, method, path, body)
    }

    /// GET a JSON document; fails the test unless the status is 200.
    pub fn get(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.http("GET", path, None);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: bad JSON {body:?}: {e}"))
    }
}

impl Drop for UpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- cairn up log ({}) ----\n{}",
                self.data.display(),
                self.log()
            );
        }
    }
}

/// A minimal HTTP/1.1 client (one request per connection), so tests can send malformed bodies.
/// It sends the admin token saved for `addr` (see [`token_for`]), if there is one.
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http_as(addr, token_for(addr).as_deref(), method, path, body)
}

/// [`http`] with a given token, or none.
pub fn http_as(
    addr: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    http_with(addr, token, &[], method, path, body)
}

/// [`http_as`] with extra request headers (`("Idempotency-Key", "k")`).
pub fn http_with(
    addr: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the API");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let body = body.unwrap_or("");
    let mut authorization =
        token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    for (name, value) in headers {
        authorization.push_str(&format!("{name}: {value}\r\n"));
    }
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{authorization}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read response");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

fn dechunk(mut text: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = text.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        text = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Writes a VM descriptor for the `image` adapter.
pub fn write_vm(vms_dir: &Path, name: &str, uuid: &str, disks: &[(&str, &Path)]) {
    std::fs::create_dir_all(vms_dir).expect("vms folder");
    let disks: Vec<serde_json::Value> = disks
        .iter()
        .map(|(id, path)| serde_json::json!({"id": id, "path": path}))
        .collect();
    let doc = serde_json::json!({"name": name, "uuid": uuid, "disks": disks});
    std::fs::write(
        vms_dir.join(format!("{name}.json")),
        serde_json::to_vec_pretty(&doc).expect("json"),
    )
    .expect("write descriptor");
}

/// Writes `dir/cairn-worker.toml` for a `cairn worker` of a test: `dir` as its recovery,
/// image and seed root, and the plain repository `repo` registered as `default`. Returns the
/// file, for `--config`.
pub fn worker_config(dir: &Path, repo: &Path) -> PathBuf {
    let dir = std::path::absolute(dir).expect("absolute test folder");
    let repo = std::path::absolute(repo).expect("absolute repository folder");
    let file = dir.join("cairn-worker.toml");
    let root = toml_string(&dir);
    std::fs::write(
        &file,
        format!(
            "[worker]\nrecovery_roots = [{root}]\nimage_roots = [{root}]\nseed_roots = [{root}]\n\n\
             [repositories.default]\npath = {}\nencryption = \"none\"\n",
            toml_string(&repo)
        ),
    )
    .expect("worker configuration");
    file
}

/// A path as a TOML basic string.
fn toml_string(path: &Path) -> String {
    let text = path.to_str().expect("UTF-8 test path");
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}
