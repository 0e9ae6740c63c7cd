//! The two command-line tools end to end: real images built by the system's tools, and bad
//! input refused with a message naming it, writing nothing.

use std::path::Path;
use std::process::{Command, Output};

fn run(tool: &str, args: &[&str]) -> Output {
    let exe = match tool {
        "make-vm-disk" => env!("CARGO_BIN_EXE_make-vm-disk"),
        _ => env!("CARGO_BIN_EXE_churn-disk"),
    };
    Command::new(exe)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn a_boot_disk_has_the_partitions_and_files_of_a_guest() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("boot.raw");
    let out = run("make-vm-disk", &[s(&image), "160", "--swap-mib", "16"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = Command::new("sfdisk")
        .args(["--dump", s(&image)])
        .output()
        .unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    for name in ["esp", "root", "swap"] {
        assert!(table.contains(&format!("name=\"{name}\"")), "{table}");
    }
    // Sparse: the root's free space is holes.
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), 160 << 20);
    assert!(std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < meta.len());
    // The root holds the guest's /etc and real files: read back with debugfs from the
    // partition's offset (1 MiB + 64 MiB ESP).
    let root = dir.path().join("root.img");
    let status = Command::new("dd")
        .args([
            &format!("if={}", s(&image)),
            &format!("of={}", s(&root)),
            "bs=1M",
            "skip=65",
            "count=78",
            "status=none",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let cat = Command::new("debugfs")
        .args(["-R", "cat /etc/hosts", s(&root)])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&cat.stdout),
        cairn_vmdisk::disk::ETC_HOSTS
    );
    let ls = Command::new("debugfs")
        .args(["-R", "ls -p /usr/lib", s(&root)])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ls.stdout).lines().count() > 3);
    // No scratch files stay behind.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn a_data_disk_in_qcow2_is_one_ext4_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("data.qcow2");
    let out = run(
        "make-vm-disk",
        &[
            s(&image),
            "64",
            "--data",
            "--format",
            "qcow2",
            "--fill",
            "20",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", s(&image)])
        .output()
        .unwrap();
    let info = String::from_utf8(info.stdout).unwrap();
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 64 << 20)),
        "{info}"
    );
}

#[test]
fn bad_input_is_refused_by_name_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("x.raw");
    for (args, needle) in [
        (vec!["100"], "leaves"),
        (vec!["1024", "--format", "vmdk"], "\"vmdk\""),
        (vec!["1024", "--fill", "0"], "not 0"),
        (
            vec!["1024", "--source", "/nonexistent/folder"],
            "/nonexistent/folder",
        ),
    ] {
        let mut all = vec![s(&image)];
        all.extend(args);
        let out = run("make-vm-disk", &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{all:?}: {err}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{all:?}");
    }
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    for (percent, needle) in [("0", "percent"), ("250", "percent"), ("x", "invalid")] {
        let out = run("churn-disk", &[s(&image), percent]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{percent}: {err}"
        );
    }
    assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn churn_prints_the_ranges_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("x.raw");
    std::fs::write(&image, vec![0u8; 4 << 20]).unwrap();
    let out = run("churn-disk", &[s(&image), "5", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ranges: Vec<(u64, u64)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (o, n) = l.split_once(' ').unwrap();
            (o.parse().unwrap(), n.parse().unwrap())
        })
        .collect();
    assert_eq!(ranges.len(), 3, "5% of 64 blocks of 64 KiB");
    let bytes = std::fs::read(&image).unwrap();
    for (offset, len) in ranges {
        let block = &bytes[offset as usize..(offset + len) as usize];
        assert!(block.iter().any(|&b| b != 0), "{offset}");
    }
}
