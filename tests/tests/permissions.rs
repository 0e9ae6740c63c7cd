//! Data at rest is private, with the real binary on real files: repository files are 0600 and
//! folders 0700 whatever the umask; a key file that group or others may read, or that another
//! user owns, is refused wherever a key is read (`cairn repo`, `cairn worker`, `cairn up`) with
//! the fix in the message, and nothing changes; `cairn repo key export` gives a key that opens
//! the repository; `cairn up` makes new repositories encrypted unless `--no-encrypt`, and keeps
//! an existing repository as it is. (The demo's data folder is checked in `up.rs`.)

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cairn_tests::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs `cairn ARGS` with umask 000, so that only the modes cairn gives its files protect them.
fn cairn_umask_000(args: &[&str]) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 000 && exec \"$0\" \"$@\"")
        .arg(cairn_bin())
        .args(args)
        .env("XDG_CONFIG_HOME", cairn_tests::config_home())
        .env("CAIRN_LOG", "warn")
        .output()
        .expect("sh runs");
    assert!(
        out.status.success(),
        "cairn {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn assert_names(stderr: &str, needle: &str, what: &str) {
    assert!(
        stderr.contains(needle),
        "{what}: the error does not say {needle:?}: {stderr}"
    );
}

/// A folder's entries with their modes, and every file's content: what "nothing changed"
/// compares.
type TreeSnapshot = (Vec<(PathBuf, u32, bool)>, Vec<(PathBuf, (u64, u64))>);

fn snapshot(root: &Path) -> TreeSnapshot {
    let mut modes = walk_modes(root);
    modes.sort();
    (modes, tree_state(root))
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[test]
fn repository_files_are_0600_and_folders_0700_even_with_umask_000() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("new").join("repo");
    let key = dir.path().join("repo.key");
    let image = dir.path().join("disk.raw");
    random_file(&image, 8 << 20, 11);
    let k = s(&key);
    cairn_umask_000(&["repo", "init", s(&repo), "--encrypt", "--key-file", k]);
    assert_eq!(mode_of(&key), 0o600, "the generated key");
    for round in 0..3 {
        churn_disk(&image, 10.0, round);
        cairn_umask_000(&[
            "repo",
            "backup",
            s(&repo),
            "--source",
            s(&image),
            "--disk",
            "d",
            "--key-file",
            k,
        ]);
    }
    cairn_umask_000(&["repo", "verify", s(&repo), "--key-file", k]);
    cairn_umask_000(&[
        "repo",
        "forget",
        s(&repo),
        "--disk",
        "d",
        "--keep-last",
        "1",
        "--key-file",
        k,
    ]);
    cairn_umask_000(&["repo", "gc", s(&repo), "--key-file", k]);
    let entries = walk_modes(&repo);
    for ext in ["pack", "rpi", "lock", "json"] {
        assert!(
            entries
                .iter()
                .any(|(p, ..)| p.extension().is_some_and(|e| e == ext)),
            "no .{ext} file in {entries:#?}"
        );
    }
    for (path, mode, is_dir) in entries {
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{mode:o} {}", path.display());
    }
    // An existing empty folder becomes private when a repository is made in it.
    let premade = dir.path().join("premade");
    std::fs::create_dir(&premade).unwrap();
    chmod(&premade, 0o755);
    cairn_umask_000(&["repo", "init", s(&premade)]);
    assert_eq!(mode_of(&premade), 0o700);
}

#[test]
fn a_key_file_open_to_group_or_others_is_refused_everywhere_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    // A cairn up data folder with an encrypted repository and its key, as `cairn up` lays it
    // out: DATA/repo and DATA/repo.key.
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    chmod(&data, 0o755);
    let repo = data.join("repo");
    let key = data.join("repo.key");
    let k = s(&key);
    let image = dir.path().join("disk.raw");
    encrypted_repo_with_one_backup(&repo, &key, &image, 12);
    let vms = dir.path().join("vms");
    std::fs::create_dir(&vms).unwrap();
    for (mode, who) in [
        (0o644, "readable by others"),
        (0o604, "readable by others"),
        (0o640, "readable by its group"),
        (0o620, "writable by its group or others"),
    ] {
        chmod(&key, mode);
        let message = format!("key file {k} is {who} (mode {mode:04o}): chmod 600 it");
        let before = snapshot(&data);
        let commands: Vec<Vec<&str>> = vec![
            vec!["repo", "list", s(&repo), "--key-file", k],
            // The key beside the repository is found, and refused, without --key-file.
            vec!["repo", "list", s(&repo)],
            vec![
                "repo",
                "backup",
                s(&repo),
                "--source",
                s(&image),
                "--disk",
                "d",
                "--key-file",
                k,
            ],
            vec!["repo", "verify", s(&repo)],
            vec!["repo", "key", "export", s(&repo)],
            // cairn up on that data folder: refused before anything is created or changed.
            vec!["up", "--data-dir", s(&data), "--listen", "127.0.0.1:0"],
            vec![
                "up",
                "--data-dir",
                s(&data),
                "--listen",
                "127.0.0.1:0",
                "--key-file",
                k,
            ],
            // The worker refuses to start (before it connects to NATS).
            vec![
                "worker",
                "--nats",
                "nats://127.0.0.1:1",
                "--node",
                "n1",
                "--vms",
                s(&vms),
                "--key-file",
                k,
            ],
        ];
        for args in &commands {
            let stderr = cairn_refused(args);
            assert_names(&stderr, &message, &format!("{args:?}"));
            assert_eq!(snapshot(&data), before, "{args:?} changed the data folder");
        }
        // A new repository or data folder with that key is not made at all.
        let new_repo = dir.path().join("new-repo");
        let stderr = cairn_refused(&["repo", "init", s(&new_repo), "--encrypt", "--key-file", k]);
        assert_names(&stderr, &message, "repo init");
        assert!(!new_repo.exists(), "repo init left {}", new_repo.display());
        let new_data = dir.path().join("new-data");
        let stderr = cairn_refused(&[
            "up",
            "--data-dir",
            s(&new_data),
            "--listen",
            "127.0.0.1:0",
            "--key-file",
            k,
        ]);
        assert_names(&stderr, &message, "cairn up on a new data folder");
        assert!(!new_data.exists(), "cairn up left {}", new_data.display());
    }
    // Made private again, the same key works.
    chmod(&key, 0o600);
    let listed = cairn_json(&["repo", "list", s(&repo)]);
    assert_eq!(listed["recovery_points"].as_array().unwrap().len(), 1);
}

#[test]
fn a_key_file_owned_by_another_user_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let key = dir.path().join("key");
    cairn_ok(&["repo", "init", s(&repo), "--encrypt", "--key-file", s(&key)]);
    let (foreign, owner) = if euid() == 0 {
        // As root: the same key, private, but owned by nobody.
        let foreign = dir.path().join("nobody.key");
        std::fs::copy(&key, &foreign).unwrap();
        chmod(&foreign, 0o600);
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
        (foreign, 65534)
    } else {
        // As another user: a file root owns.
        (Path::new("/etc/passwd").to_path_buf(), 0)
    };
    let before = snapshot(&repo);
    let message = format!(
        "key file {} is owned by uid {owner}, but cairn runs as uid {}",
        foreign.display(),
        euid()
    );
    for args in [
        vec!["repo", "list", s(&repo), "--key-file", s(&foreign)],
        vec!["repo", "key", "export", s(&repo), "--key-file", s(&foreign)],
        vec![
            "up",
            "--data-dir",
            s(&dir.path().join("data")),
            "--listen",
            "127.0.0.1:0",
            "--key-file",
            s(&foreign),
        ],
    ] {
        let stderr = cairn_refused(&args);
        assert_names(&stderr, &message, &format!("{args:?}"));
        assert_names(&stderr, "chown it", &format!("{args:?}"));
    }
    assert_eq!(snapshot(&repo), before);
    assert!(!dir.path().join("data").exists());
}

#[test]
fn cairn_repo_key_export_gives_a_key_that_opens_the_repository() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let key = dir.path().join("repo.key");
    let image = dir.path().join("disk.raw");
    encrypted_repo_with_one_backup(&repo, &key, &image, 13);
    let stored = std::fs::read_to_string(&key).unwrap();

    // Printed (the key beside the repository is found without --key-file) ...
    let printed = cairn_ok(&["repo", "key", "export", s(&repo)]);
    assert_eq!(printed.trim(), stored.trim());
    let json = cairn_json(&["repo", "key", "export", s(&repo)]);
    assert_eq!(json["key"], stored.trim());
    // ... or written to a new private file.
    let exported = dir.path().join("exported.key");
    let out = cairn_ok(&["repo", "key", "export", s(&repo), "--to", s(&exported)]);
    assert!(out.contains(s(&exported)), "{out}");
    assert_eq!(mode_of(&exported), 0o600);
    assert_eq!(
        std::fs::read_to_string(&exported).unwrap().trim(),
        stored.trim()
    );

    // The exported key alone opens the repository: verify re-reads and decrypts every chunk,
    // restore gives the image back.
    let away = dir.path().join("original.key");
    std::fs::rename(&key, &away).unwrap();
    let stderr = String::from_utf8_lossy(&cairn(&["repo", "list", s(&repo)]).stderr).into_owned();
    assert_names(&stderr, "encrypted", "list without any key");
    cairn_ok(&["repo", "verify", s(&repo), "--key-file", s(&exported)]);
    let restored = dir.path().join("restored.raw");
    cairn_ok(&[
        "repo",
        "restore",
        s(&repo),
        "--disk",
        "d",
        "--to",
        s(&restored),
        "--key-file",
        s(&exported),
    ]);
    assert_eq!(fingerprint(&restored), fingerprint(&image));

    // An existing file, or a symlink where the new file would go, is never written through.
    let existing = dir.path().join("existing");
    std::fs::write(&existing, "keep me\n").unwrap();
    let link = dir.path().join("link.key");
    let link_target = dir.path().join("link-target");
    std::os::unix::fs::symlink(&link_target, &link).unwrap();
    for to in [&existing, &link] {
        let stderr = cairn_refused(&[
            "repo",
            "key",
            "export",
            s(&repo),
            "--key-file",
            s(&exported),
            "--to",
            s(to),
        ]);
        assert_names(
            &stderr,
            "only to a new file",
            &format!("--to {}", to.display()),
        );
    }
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "keep me\n");
    assert!(!link_target.exists());

    // A wrong key is not exported; a plain repository has no key to export.
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, "0".repeat(64)).unwrap();
    chmod(&wrong, 0o600);
    let stderr = cairn_refused(&["repo", "key", "export", s(&repo), "--key-file", s(&wrong)]);
    assert_names(&stderr, "wrong key", "export with a wrong key");
    let plain = dir.path().join("plain");
    cairn_ok(&["repo", "init", s(&plain)]);
    let stderr = cairn_refused(&["repo", "key", "export", s(&plain)]);
    assert_names(&stderr, "is not encrypted", "export of a plain repository");
}

#[test]
fn cairn_up_encrypts_a_new_repository_unless_no_encrypt_and_keeps_an_existing_one_as_it_is() {
    let dir = tempfile::tempdir().unwrap();

    // --no-encrypt: a plain repository and no key; restarted without the flag, it stays plain.
    let plain = dir.path().join("plain");
    let server = UpServer::start(&plain, &["--no-encrypt"], &[]);
    let banner = server.banner.join("\n");
    assert!(banner.contains("without encryption"), "{banner}");
    server.stop();
    let server = UpServer::start(&plain, &[], &[]);
    assert!(server.banner.is_empty(), "{:?}", server.banner);
    server.stop();
    assert!(!plain.join("repo.key").exists());
    let stats = cairn_json(&["repo", "stats", s(&plain.join("repo"))]);
    assert_eq!(stats["encrypted"], false, "{stats:#}");
    assert_eq!(open_to_others(&plain), Vec::<String>::new());

    // By default: encrypted, and a restart finds its key in the data folder.
    let encrypted = dir.path().join("encrypted");
    UpServer::start(&encrypted, &[], &[]).stop();
    assert_eq!(mode_of(&encrypted.join("repo.key")), 0o600);
    let server = UpServer::start(&encrypted, &[], &[]);
    assert!(server.banner.is_empty(), "{:?}", server.banner);
    server.stop();
    let stats = cairn_json(&["repo", "stats", s(&encrypted.join("repo"))]);
    assert_eq!(stats["encrypted"], true, "{stats:#}");

    // What cannot be done is refused, naming the reason, and changes nothing.
    let before = snapshot(&encrypted);
    let stderr = cairn_refused(&[
        "up",
        "--data-dir",
        s(&encrypted),
        "--listen",
        "127.0.0.1:0",
        "--no-encrypt",
    ]);
    assert_names(
        &stderr,
        "--no-encrypt applies only",
        "--no-encrypt on an encrypted one",
    );
    let stderr = cairn_refused(&[
        "up",
        "--data-dir",
        s(&dir.path().join("other")),
        "--no-encrypt",
        "--key-file",
        s(&encrypted.join("repo.key")),
    ]);
    assert_names(
        &stderr,
        "cannot be used with",
        "--no-encrypt with --key-file",
    );
    let key_away = dir.path().join("key-away");
    std::fs::rename(encrypted.join("repo.key"), &key_away).unwrap();
    let stderr = cairn_refused(&["up", "--data-dir", s(&encrypted), "--listen", "127.0.0.1:0"]);
    assert_names(&stderr, "pass its key with --key-file", "a missing key");
    std::fs::rename(&key_away, encrypted.join("repo.key")).unwrap();
    assert_eq!(snapshot(&encrypted), before);
}
