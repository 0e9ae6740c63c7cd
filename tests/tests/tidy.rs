//! Tidy checks over the repository's own files: the tests, benchmarks and scripts must need
//! nothing beside the repository, so a user's clone runs them as they are.
//!
//! - No file refers to a `shared/` folder beside the repository.
//! - No test, benchmark or script names an absolute path outside the system's own locations
//!   (`/dev`, `/proc`, `/usr`, `/etc`, `/tmp`, `/var/lib/cairn`, …): paths on one particular
//!   machine would make the suite pass only there. URL paths of the HTTP APIs and paths inside
//!   a disk image (as `cairn repo browse` names them) are not paths of the machine.

use std::path::{Path, PathBuf};

use cairn_tests::workspace;

/// First components of the system's own locations, which every machine has.
const SYSTEM: &[&str] = &[
    "dev",
    "proc",
    "sys",
    "usr",
    "etc",
    "run",
    "tmp",
    "bin",
    "sbin",
    "lib",
    "lib64",
    "boot",
    // A path that must not exist, for refusal tests.
    "nonexistent",
];
/// `/var/...`: only the parts that are system locations or cairn's own.
const VAR: &[&str] = &["tmp", "lib/cairn", "lib/libvirt", "lib/nats", "log", "run"];
/// First components that are not paths of the machine: the HTTP routes of cairn's API and of
/// nats-server's monitor, the folders at the top of a backed-up disk (`/disk` for a disk
/// without partitions, `/p1`… for partitions, `/EFI` on an EFI system partition), and the
/// subject of a certificate (`openssl -subj /CN=…`).
const NOT_HOST: &[&str] = &[
    "v1",
    "healthz",
    "openapi.yaml",
    "metrics",
    "jsz",
    "varz",
    "routez",
    "hooks",
    "disk",
    "EFI",
];
/// Files whose absolute paths are frozen values, never opened: the recorded events of the
/// schema corpus (changing them would change its checked-in bytes).
const FROZEN: &[&str] = &["schemas/tests/corpus/"];

/// The repository's files: `git ls-files` where this is a clone, else a walk that leaves out
/// `target/` and `.git/`.
fn repository_files() -> Vec<PathBuf> {
    let root = workspace();
    let listed = std::process::Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(&root)
        .output();
    if let Ok(out) = listed
        && out.status.success()
    {
        return out
            .stdout
            .split(|&b| b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| PathBuf::from(String::from_utf8_lossy(p).into_owned()))
            .filter(|p| root.join(p).is_file())
            .collect();
    }
    let mut files = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&dir)).unwrap() {
            let entry = entry.unwrap();
            let relative = dir.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                if !matches!(entry.file_name().to_str(), Some("target" | ".git")) {
                    stack.push(relative);
                }
            } else {
                files.push(relative);
            }
        }
    }
    files
}

/// Whether a file is a test, a benchmark or a script (where a path outside the repository
/// would be followed when it runs).
fn runs(path: &Path, text: &str) -> bool {
    let name = path.to_string_lossy();
    let rust_test = name.ends_with(".rs")
        && (name.starts_with("tests/")
            || name.starts_with("ops/")
            || ["/tests/", "/examples/", "/benches/"]
                .iter()
                .any(|d| name.contains(d)));
    let script = name.ends_with(".sh") || name.ends_with(".py") || text.starts_with("#!");
    rust_test || script || name.starts_with(".ci/")
}

/// Absolute paths in one line: a `/` at the start of a word (after a space, a quote, `=`, an
/// opening bracket, a backquote or a shell redirection) followed by a name.
fn absolute_paths(line: &str) -> Vec<&str> {
    let bytes = line.as_bytes();
    let is_path_byte = |b: u8| b.is_ascii_alphanumeric() || b"._+-/=".contains(&b);
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0
            || b" \t\"'=([{,`".contains(&bytes[i - 1])
            || (bytes[i - 1] == b'>' && (i < 2 || b" 12&>".contains(&bytes[i - 2])));
        let named = bytes.get(i + 1).is_some_and(|&b| b.is_ascii_alphanumeric());
        if bytes[i] == b'/' && starts_word && named {
            let end = (i + 1..bytes.len())
                .find(|&j| !is_path_byte(bytes[j]))
                .unwrap_or(bytes.len());
            // A sentence may end right after a path.
            found.push(line[i..end].trim_end_matches(['.', ',']));
            i = end;
        } else {
            i += 1;
        }
    }
    found
}

/// Whether an absolute path is allowed in a test, benchmark or script.
fn allowed(path: &str) -> bool {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let first = parts.next().unwrap_or_default();
    let rest = parts.next().unwrap_or_default();
    let partition =
        first.len() > 1 && first.starts_with('p') && first[1..].bytes().all(|b| b.is_ascii_digit());
    if first == "var" {
        return VAR
            .iter()
            .any(|v| rest == *v || rest.starts_with(&format!("{v}/")));
    }
    let subject = first.starts_with("CN=");
    SYSTEM.contains(&first) || NOT_HOST.contains(&first) || partition || subject
}

#[test]
fn the_tests_benchmarks_and_scripts_need_nothing_beside_the_repository() {
    let root = workspace();
    let this_file = Path::new("tests/tests/tidy.rs");
    let beside = ["../", "shared/"].concat();
    let bench_folder = ["shared", "/bench"].concat();
    let mut problems = Vec::new();
    let files = repository_files();
    assert!(
        files.iter().any(|f| f == this_file),
        "the file list misses this test: {files:?}"
    );
    for file in &files {
        let Ok(text) = std::fs::read_to_string(root.join(file)) else {
            continue; // not text
        };
        if file == this_file {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            let at = format!("{}:{}", file.display(), n + 1);
            if line.contains(&beside) || line.contains(&bench_folder) {
                problems.push(format!(
                    "{at}: refers to a shared/ folder beside the repository"
                ));
            }
            let frozen = FROZEN.iter().any(|f| file.starts_with(f));
            // A guest's /etc/passwd inside a built image names /root and /home.
            let passwd_entry = line.contains(":x:");
            if !runs(file, &text) || frozen || passwd_entry {
                continue;
            }
            for path in absolute_paths(line) {
                if !allowed(path) {
                    problems.push(format!("{at}: absolute path {path} outside the repository"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checks_find_what_they_look_for() {
    // The scanner itself: what counts as an absolute path, and what is allowed.
    assert_eq!(
        absolute_paths(r#"cp "/srv/x" a >/dev/null 2>/tmp/log; x=/opt/y `/home/z`, in /tmp."#),
        [
            "/srv/x",
            "/dev/null",
            "/tmp/log",
            "/opt/y",
            "/home/z",
            "/tmp"
        ]
    );
    assert!(absolute_paths("target/<profile>/deps, $repo/x, {dir}/y, http://h:1/v1").is_empty());
    assert!(absolute_paths("// a comment, nats://127.0.0.1:4222").is_empty());
    for ok in [
        "/usr/lib",
        "/var/lib/cairn/repo",
        "/var/tmp/bench",
        "/v1/jobs",
        "/p2/etc/hosts",
        "/dev",
        "/CN=cairn-worker",
    ] {
        assert!(allowed(ok), "{ok}");
    }
    for bad in [
        "/work/shared/bench",
        "/home/user/x",
        "/root/.cache",
        "/srv/cairn",
        "/var/lib/other",
        "/px/y",
        "/opt",
    ] {
        assert!(!allowed(bad), "{bad}");
    }
    let script = Path::new("ops/bench/x.sh");
    assert!(runs(script, ""));
    assert!(runs(Path::new("ops/tool"), "#!/usr/bin/env bash\n"));
    assert!(runs(Path::new("worker/examples/live_bench.rs"), ""));
    assert!(!runs(Path::new("worker/src/lib.rs"), "//! x"));
    assert!(!runs(Path::new("README.md"), "# cairn"));
}
