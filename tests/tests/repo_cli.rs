//! `cairn repo` end to end: the real binary, realistic VM disks in every supported format,
//! guest churn (`ops/vmdisk`), damage, bad input and `kill -9`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cairn_tests::*;

const DISK_MIB: u32 = 400;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn qemu_img(args: &[&str]) -> String {
    sh("qemu-img", args)
}

#[test]
fn every_source_format_backs_up_and_restores_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let raw = vm_disk(DISK_MIB);
    let repo = dir.path().join("repo");
    cairn_ok(&["repo", "init", s(&repo)]);
    let expected = fingerprint(&raw);
    let mut sources = vec![("raw".to_string(), raw.clone())];
    for (fmt, opts) in [
        ("qcow2", None),
        ("vhdx", None),
        ("vpc", Some("force_size=on")),
    ] {
        let image = dir.path().join(format!("disk.{fmt}"));
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        if let Some(o) = opts {
            args.extend(["-o", o]);
        }
        args.extend([s(&raw), s(&image)]);
        qemu_img(&args);
        sources.push((fmt.to_string(), image));
    }
    for (fmt, image) in &sources {
        let summary = cairn_json(&[
            "repo",
            "backup",
            s(&repo),
            "--source",
            s(image),
            "--disk",
            fmt,
        ]);
        assert_eq!(summary["disk_size"], (DISK_MIB as u64) << 20, "{fmt}");
        assert!(
            summary["bytes_stored"].as_u64().unwrap() > 1 << 20,
            "{fmt}: {summary}"
        );
        let out = dir.path().join(format!("restored-{fmt}.raw"));
        cairn_ok(&["repo", "restore", s(&repo), "--disk", fmt, "--to", s(&out)]);
        assert_eq!(
            fingerprint(&out),
            expected,
            "{fmt} restore differs from the source"
        );
        std::fs::remove_file(&out).unwrap();
    }
    // Zero and unallocated extents are not read: a sparse qcow2 reads about what a raw does.
    let read_raw = cairn_json(&["repo", "list", s(&repo), "--disk", "raw"])["recovery_points"][0]["bytes_read"]
        .as_u64()
        .unwrap();
    let read_qcow2 = cairn_json(&["repo", "list", s(&repo), "--disk", "qcow2"])["recovery_points"]
        [0]["bytes_read"]
        .as_u64()
        .unwrap();
    assert!(read_raw < (DISK_MIB as u64) << 20, "raw holes were read");
    assert!(
        read_qcow2 <= read_raw + (8 << 20),
        "qcow2 read {read_qcow2}, raw {read_raw}"
    );

    // Restore into other formats; qemu-img agrees they hold the same disk.
    for fmt in ["qcow2", "vhdx"] {
        let out = dir.path().join(format!("out.{fmt}"));
        cairn_ok(&[
            "repo",
            "restore",
            s(&repo),
            "--disk",
            "raw",
            "--to",
            s(&out),
            "--format",
            fmt,
        ]);
        let info = qemu_img(&["info", "--output=json", s(&out)]);
        assert!(info.contains(&format!("\"format\": \"{fmt}\"")), "{info}");
        let cmp = qemu_img(&["compare", "-f", "raw", "-F", fmt, s(&raw), s(&out)]);
        assert!(cmp.contains("identical"), "{cmp}");
    }
}

#[test]
fn churn_rounds_restore_every_recovery_point_and_store_little() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_copy(&vm_disk(DISK_MIB), &image);
    let repo = dir.path().join("repo");
    cairn_ok(&["repo", "init", s(&repo), "--chunk-size", "64KiB"]);
    let mut history = Vec::new();
    for round in 0..4u32 {
        if round > 0 {
            let churned: u64 = churn_disk(&image, 1.0, u64::from(round))
                .iter()
                .map(|&(_, len)| len)
                .sum();
            let summary = cairn_json(&[
                "repo",
                "backup",
                s(&repo),
                "--source",
                s(&image),
                "--disk",
                "vm",
            ]);
            let stored = summary["bytes_stored"].as_u64().unwrap();
            assert!(
                stored <= 2 * churned,
                "round {round}: stored {stored} for {churned} churned bytes"
            );
            assert_eq!(summary["full_index"], false);
            history.push((
                summary["rp"].as_str().unwrap().to_string(),
                fingerprint(&image),
            ));
        } else {
            let summary = cairn_json(&[
                "repo",
                "backup",
                s(&repo),
                "--source",
                s(&image),
                "--disk",
                "vm",
            ]);
            history.push((
                summary["rp"].as_str().unwrap().to_string(),
                fingerprint(&image),
            ));
        }
    }
    for (i, (rp, expected)) in history.iter().enumerate() {
        let out = dir.path().join(format!("rp{i}.raw"));
        cairn_ok(&[
            "repo",
            "restore",
            s(&repo),
            "--disk",
            "vm",
            "--rp",
            rp,
            "--to",
            s(&out),
        ]);
        assert_eq!(
            &fingerprint(&out),
            expected,
            "recovery point {i} ({rp}) differs"
        );
        std::fs::remove_file(&out).unwrap();
    }
    // Delta restore of the first recovery point onto the current disk writes only the churn.
    let delta = cairn_json(&[
        "repo",
        "restore",
        s(&repo),
        "--disk",
        "vm",
        "--rp",
        &history[0].0,
        "--to",
        s(&image),
        "--delta",
    ]);
    assert_eq!(fingerprint(&image), history[0].1);
    let written = delta["bytes_written"].as_u64().unwrap();
    assert!(
        written < ((DISK_MIB as u64) << 20) / 20,
        "delta restore wrote {written} bytes"
    );

    let listed = cairn_json(&["repo", "list", s(&repo), "--disk", "vm"]);
    assert_eq!(listed["recovery_points"].as_array().unwrap().len(), 4);
    let forget = cairn_json(&[
        "repo",
        "forget",
        s(&repo),
        "--disk",
        "vm",
        "--keep-last",
        "2",
    ]);
    assert_eq!(forget["removed"].as_array().unwrap().len(), 2);
    cairn_json(&["repo", "gc", s(&repo)]);
    let out = dir.path().join("after-gc.raw");
    cairn_ok(&[
        "repo",
        "restore",
        s(&repo),
        "--disk",
        "vm",
        "--rp",
        &history[2].0,
        "--to",
        s(&out),
    ]);
    assert_eq!(fingerprint(&out), history[2].1);
    assert_eq!(cairn(&["repo", "verify", s(&repo)]).status.code(), Some(0));
    let stats = cairn_json(&["repo", "stats", s(&repo)]);
    assert_eq!(stats["recovery_points"], 2);
}

#[test]
fn kill_9_mid_backup_leaves_a_clean_repository_and_the_rerun_completes() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("random.raw");
    random_file(&image, 1 << 30, 42);
    let repo = dir.path().join("repo");
    cairn_ok(&["repo", "init", s(&repo)]);
    let mut child = Command::new(cairn_bin())
        .env("XDG_CONFIG_HOME", cairn_tests::config_home())
        .args([
            "repo",
            "backup",
            s(&repo),
            "--source",
            s(&image),
            "--disk",
            "big",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let packs = repo.join("disks/big/packs");
    let n_packs = || {
        std::fs::read_dir(&packs)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".pack")
                })
                .count()
            })
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(120), "two durable packs", || {
        n_packs() >= 2
    });
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the backup finished before it was killed; use a bigger image"
    );

    assert_eq!(
        cairn_json(&["repo", "list", s(&repo)])["recovery_points"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let verify = cairn(&["repo", "verify", s(&repo)]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let rerun = cairn_json(&[
        "repo",
        "backup",
        s(&repo),
        "--source",
        s(&image),
        "--disk",
        "big",
    ]);
    assert!(
        rerun["chunks_reused"].as_u64().unwrap() >= 2 * 500,
        "{rerun}"
    );
    assert!(rerun["bytes_stored"].as_u64().unwrap() < 1 << 30);
    let out = dir.path().join("out.raw");
    cairn_ok(&[
        "repo",
        "restore",
        s(&repo),
        "--disk",
        "big",
        "--to",
        s(&out),
    ]);
    assert_eq!(fingerprint(&out), fingerprint(&image));
    // The chunks nobody reused are reclaimed by gc; nothing else is.
    cairn_json(&["repo", "gc", s(&repo)]);
    assert_eq!(cairn(&["repo", "verify", s(&repo)]).status.code(), Some(0));
}

#[test]
fn a_flipped_byte_is_named_by_verify_and_other_recovery_points_still_restore() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    cairn_ok(&["repo", "init", s(&repo)]);
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    random_file(&a, 8 << 20, 1);
    random_file(&b, 8 << 20, 2);
    let rp_a = cairn_json(&["repo", "backup", s(&repo), "--source", s(&a), "--disk", "a"])["rp"]
        .as_str()
        .unwrap()
        .to_string();
    cairn_json(&["repo", "backup", s(&repo), "--source", s(&b), "--disk", "b"]);
    let pack_dir = repo.join("disks/a/packs");
    let pack = std::fs::read_dir(&pack_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[1000] ^= 0x20;
    std::fs::write(&pack, bytes).unwrap();

    let verify = cairn(&["repo", "verify", s(&repo)]);
    assert_eq!(verify.status.code(), Some(3));
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(text.contains(&rp_a) && text.contains("DAMAGED"), "{text}");
    let report: serde_json::Value =
        serde_json::from_slice(&cairn(&["repo", "verify", s(&repo), "--json"]).stdout).unwrap();
    assert_eq!(report["ok"], false);
    let disk_a = report["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["disk"] == "a")
        .unwrap();
    assert_eq!(disk_a["damaged_rps"][0]["rp"], rp_a.as_str());
    assert_eq!(disk_a["damaged_rps"][0]["n_damaged_chunks"], 1);

    let out = dir.path().join("b-out.raw");
    cairn_ok(&["repo", "restore", s(&repo), "--disk", "b", "--to", s(&out)]);
    assert_eq!(fingerprint(&out), fingerprint(&b));
    let failed = cairn(&[
        "repo",
        "restore",
        s(&repo),
        "--disk",
        "a",
        "--to",
        s(&dir.path().join("a-out.raw")),
    ]);
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(err.contains("damaged") && err.contains(s(&pack)), "{err}");
    assert!(
        !dir.path().join("a-out.raw").exists(),
        "a failed restore leaves no half image"
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let key = dir.path().join("key");
    let good = dir.path().join("good.raw");
    encrypted_repo_with_one_backup(&repo, &key, &good, 3);
    let before = tree_state(&repo);

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a disk image\n").unwrap();
    let vmdk = dir.path().join("disk.vmdk");
    qemu_img(&["create", "-f", "vmdk", s(&vmdk), "16M"]);
    let truncated = dir.path().join("truncated.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        s(&dir.path().join("full.qcow2")),
        "64M",
    ]);
    let qcow2 = std::fs::read(dir.path().join("full.qcow2")).unwrap();
    std::fs::write(&truncated, &qcow2[..1024]).unwrap();
    let wrong_key = dir.path().join("wrong-key");
    std::fs::write(&wrong_key, "0".repeat(64)).unwrap();
    // Private, as every key file must be, so that what is refused is the key itself.
    std::fs::set_permissions(
        &wrong_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let not_repo = dir.path().join("not-a-repo");
    std::fs::create_dir(&not_repo).unwrap();
    let missing = dir.path().join("missing.raw");
    let new_repo = dir.path().join("x");

    let k = s(&key);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "repo",
                "backup",
                s(&repo),
                "--source",
                s(&missing),
                "--disk",
                "d",
                "--key-file",
                k,
            ],
            s(&missing),
        ),
        (
            vec![
                "repo",
                "backup",
                s(&repo),
                "--source",
                s(&text),
                "--disk",
                "d",
                "--key-file",
                k,
            ],
            s(&text),
        ),
        (
            vec![
                "repo",
                "backup",
                s(&repo),
                "--source",
                s(&vmdk),
                "--disk",
                "d",
                "--key-file",
                k,
            ],
            s(&vmdk),
        ),
        (
            vec![
                "repo",
                "backup",
                s(&repo),
                "--source",
                s(&truncated),
                "--disk",
                "d",
                "--key-file",
                k,
            ],
            s(&truncated),
        ),
        (
            vec![
                "repo",
                "backup",
                s(&repo),
                "--source",
                s(&good),
                "--disk",
                "d",
                "--key-file",
                s(&wrong_key),
            ],
            "wrong key",
        ),
        (
            vec![
                "repo",
                "backup",
                s(&repo),
                "--source",
                s(&good),
                "--disk",
                "d",
            ],
            "--key-file",
        ),
        (
            vec![
                "repo",
                "backup",
                s(&repo),
                "--source",
                s(&good),
                "--disk",
                "../escape",
                "--key-file",
                k,
            ],
            "invalid disk id",
        ),
        (
            vec![
                "repo",
                "backup",
                s(&not_repo),
                "--source",
                s(&good),
                "--disk",
                "d",
            ],
            "not a cairn repository",
        ),
        (
            vec![
                "repo",
                "restore",
                s(&repo),
                "--disk",
                "nope",
                "--to",
                "/tmp/x",
                "--key-file",
                k,
            ],
            "no such disk",
        ),
        (
            vec![
                "repo",
                "restore",
                s(&repo),
                "--disk",
                "d",
                "--rp",
                "0000000000",
                "--to",
                "/tmp/x",
                "--key-file",
                k,
            ],
            "no recovery point",
        ),
        (
            vec![
                "repo",
                "restore",
                s(&repo),
                "--disk",
                "d",
                "--to",
                s(&good),
                "--key-file",
                k,
            ],
            s(&good),
        ),
        (vec!["repo", "init", s(&repo)], "not empty"),
        (
            vec!["repo", "init", s(&new_repo), "--chunk-size", "3000"],
            "chunk size",
        ),
        (
            vec![
                "repo",
                "forget",
                s(&repo),
                "--disk",
                "d",
                "--keep-last",
                "0",
                "--key-file",
                k,
            ],
            "at least 1",
        ),
    ];
    for (args, needle) in cases {
        let out = cairn(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains("error"), "{args:?}: {stderr}");
        assert!(
            stderr.to_lowercase().contains(&needle.to_lowercase()),
            "{args:?}: error does not name {needle:?}: {stderr}"
        );
        assert_eq!(tree_state(&repo), before, "{args:?} changed the repository");
    }
    // A truncated pack: verify names the file; the repository's other files are untouched.
    let pack_dir = repo.join("disks/d/packs");
    let pack = std::fs::read_dir(&pack_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let len = std::fs::metadata(&pack).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let verify = cairn(&["repo", "verify", s(&repo), "--key-file", k]);
    assert_eq!(verify.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&verify.stdout).contains(s(&pack)));
}

#[test]
fn encrypted_repository_round_trip_and_ids_are_keyed() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let key = dir.path().join("key");
    let init = cairn_json(&["repo", "init", s(&repo), "--encrypt", "--key-file", s(&key)]);
    assert_eq!(init["encrypted"], true);
    let key_mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(key_mode & 0o077, 0, "the generated key file is private");
    let image = dir.path().join("disk.raw");
    sparse_copy(&vm_disk(DISK_MIB), &image);
    backup_with_key_from_env(&repo, &key, &image);
    let out = dir.path().join("out.raw");
    cairn_ok(&[
        "repo",
        "restore",
        s(&repo),
        "--disk",
        "vm",
        "--to",
        s(&out),
        "--key-file",
        s(&key),
    ]);
    assert_eq!(fingerprint(&out), fingerprint(&image));
    // No plaintext of the image appears in the packs: look for the ext4 root's /etc/passwd line.
    let needle = b"root:x:0:0:root:/root:/bin/bash";
    for pack in std::fs::read_dir(repo.join("disks/vm/packs")).unwrap() {
        let bytes = std::fs::read(pack.unwrap().path()).unwrap();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "plaintext found in a pack"
        );
    }
}

fn backup_with_key_from_env(repo: &Path, key: &Path, image: &Path) {
    // The key file may come from the environment instead of argv.
    let out = Command::new(cairn_bin())
        .env("XDG_CONFIG_HOME", cairn_tests::config_home())
        .args([
            "repo",
            "backup",
            s(repo),
            "--source",
            s(image),
            "--disk",
            "vm",
        ])
        .env("CAIRN_KEY_FILE", key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
