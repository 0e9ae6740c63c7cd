//! Item-level recovery and the instant NBD export, end to end: the real binary on `make-vm-disk`
//! images (GPT, FAT32, ext4, swap), an MBR disk with an extended partition holding NTFS written
//! through ntfs-3g, crafted hostile ext4 images (names and links; folder loops and a chain past
//! the depth limit), damaged file systems, and `qemu-img` reading a recovery point over NBD.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cairn_tests::*;

const DISK_MIB: u32 = 400;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Start sector of GPT partition `n` of `image`.
fn gpt_start(image: &Path, n: u32) -> u64 {
    let info = sh("sgdisk", &["-i", &n.to_string(), s(image)]);
    info.lines()
        .find_map(|l| l.strip_prefix("First sector: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("first sector")
}

/// Copies `count` sectors from `start` of `image` into a file of their own.
fn cut(image: &Path, start: u64, count: u64, out: &Path) {
    sh(
        "dd",
        &[
            &format!("if={}", s(image)),
            &format!("of={}", s(out)),
            "bs=512",
            &format!("skip={start}"),
            &format!("count={count}"),
            "conv=sparse",
            "status=none",
        ],
    );
}

fn backup(repo: &Path, image: &Path, disk: &str) -> String {
    let summary = cairn_json(&[
        "repo",
        "backup",
        s(repo),
        "--source",
        s(image),
        "--disk",
        disk,
    ]);
    summary["rp"].as_str().expect("rp").to_string()
}

fn names(listing: &serde_json::Value) -> Vec<String> {
    listing["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

/// Every regular file below `root`, relative, with its bytes.
fn files_below(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                out.push((
                    path.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&path).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn ext4_and_fat_items_come_out_byte_identical_without_a_restore() {
    let dir = tempfile::tempdir().unwrap();
    let raw = vm_disk(DISK_MIB);
    let repo = dir.path().join("repo");
    cairn_ok(&["repo", "init", s(&repo)]);
    let rp = backup(&repo, &raw, "vm-disk0");

    let volumes = cairn_json(&[
        "repo",
        "browse",
        s(&repo),
        "--disk",
        "vm-disk0",
        "--rp",
        &rp,
    ]);
    let entries = volumes["entries"].as_array().unwrap();
    let detail = |name: &str| {
        entries
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["detail"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no volume {name}: {volumes}"))
    };
    assert_eq!(detail("p1"), "fat, esp");
    assert_eq!(detail("p2"), "ext4, root");
    assert_eq!(detail("p3"), "swap, swap");
    let etc = cairn_json(&[
        "repo",
        "browse",
        s(&repo),
        "--disk",
        "vm-disk0",
        "--path",
        "/p2/etc",
    ]);
    assert_eq!(names(&etc), ["hosts", "passwd"]);
    let swap = cairn(&[
        "repo",
        "browse",
        s(&repo),
        "--disk",
        "vm-disk0",
        "--path",
        "/p3",
    ]);
    assert!(!swap.status.success());
    assert!(String::from_utf8_lossy(&swap.stderr).contains("swap space holds no files"));

    // A folder tree of a few dozen files out of the ext4 root (the first folder of /usr/lib).
    let lib = cairn_json(&[
        "repo",
        "browse",
        s(&repo),
        "--disk",
        "vm-disk0",
        "--path",
        "/p2/usr/lib",
    ]);
    let tree = lib["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "dir")
        .map(|e| e["name"].as_str().unwrap().to_string())
        .expect("a folder in /usr/lib");
    let out = dir.path().join("out");
    let report = cairn_json(&[
        "repo",
        "extract",
        s(&repo),
        "--disk",
        "vm-disk0",
        "--rp",
        &rp,
        "--item",
        "/p2/etc/hosts",
        "--item",
        &format!("/p2/usr/lib/{tree}"),
        "--item",
        "/p1/EFI/BOOT/BOOTX64.EFI",
        "--to",
        s(&out),
    ]);
    assert_eq!(report["skipped"].as_array().unwrap().len(), 0, "{report}");
    assert!(report["files"].as_u64().unwrap() >= 3, "{report}");

    // Originals, read without mounting: debugfs on the ext4 partition, mcopy on the FAT one.
    let reference = dir.path().join("reference");
    std::fs::create_dir(&reference).unwrap();
    let p2 = dir.path().join("p2.img");
    cut(&raw, gpt_start(&raw, 2), 190 * 2048, &p2);
    sh(
        "debugfs",
        &[
            "-R",
            &format!("dump /etc/hosts {}", s(&reference.join("hosts"))),
            s(&p2),
        ],
    );
    sh(
        "debugfs",
        &[
            "-R",
            &format!("rdump /usr/lib/{tree} {}", s(&reference)),
            s(&p2),
        ],
    );
    let p1 = dir.path().join("p1.img");
    cut(&raw, gpt_start(&raw, 1), 64 * 2048, &p1);
    let efi = reference.join("BOOTX64.EFI");
    let status = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", s(&p1), "::/EFI/BOOT/BOOTX64.EFI", s(&efi)])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        std::fs::read(out.join("hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    let extracted = files_below(&out);
    let expected = files_below(&reference);
    assert_eq!(extracted.len(), expected.len());
    for (a, b) in extracted.iter().zip(&expected) {
        assert_eq!(a.0, b.0);
        assert!(a.1 == b.1, "{} differs from the original", a.0.display());
    }
    // Permissions and modification times of the ext4 files are kept.
    let hosts_meta = std::fs::metadata(out.join("hosts")).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(hosts_meta.permissions().mode() & 0o777, 0o644);
    let stat = sh("debugfs", &["-R", "stat /etc/hosts", s(&p2)]);
    let mtime_hex = stat
        .lines()
        .find_map(|l| l.trim().strip_prefix("mtime: 0x"))
        .and_then(|l| l.split(':').next())
        .expect("debugfs mtime");
    assert_eq!(
        hosts_meta.mtime(),
        i64::from_str_radix(mtime_hex, 16).unwrap()
    );

    // A second extraction into the same folder never overwrites: it reports instead.
    let again = cairn_json(&[
        "repo",
        "extract",
        s(&repo),
        "--disk",
        "vm-disk0",
        "--item",
        "/p2/etc/hosts",
        "--to",
        s(&out),
    ]);
    assert_eq!(again["files"], 0);
    assert!(
        again["skipped"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("already exists")
    );
    // Bad item paths are refused by name.
    let bad = cairn(&[
        "repo",
        "extract",
        s(&repo),
        "--disk",
        "vm-disk0",
        "--item",
        "/p2/../etc",
        "--to",
        s(&out),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains(". and .. are not allowed"));
    let missing = cairn(&[
        "repo",
        "browse",
        s(&repo),
        "--disk",
        "vm-disk0",
        "--path",
        "/p2/nonexistent",
    ]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such file or folder"));
}

/// An MBR disk: p1 FAT16, an extended partition with logical p5 = NTFS written by ntfs-3g.
fn mbr_ntfs_disk(dir: &Path) -> (PathBuf, Vec<(PathBuf, Vec<u8>)>) {
    let disk = dir.join("mbr.raw");
    sh("truncate", &["-s", "80M", s(&disk)]);
    let layout = "label: dos\nstart=2048, size=32768, type=6\nstart=36864, size=122880, type=5\nstart=38912, size=81920, type=7\n";
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", s(&disk)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(layout.as_bytes())
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    // FAT16 with a long file name.
    let fat = dir.join("fat.img");
    sh("truncate", &["-s", "16M", s(&fat)]);
    sh("mkfs.vfat", &["-F", "16", s(&fat)]);
    let note = dir.join("A long name for a note.txt");
    std::fs::write(&note, b"fat16 says hi\n").unwrap();
    let status = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", s(&fat), s(&note), "::/"])
        .status()
        .unwrap();
    assert!(status.success());
    // NTFS, written through the ntfs-3g FUSE driver.
    let ntfs = dir.join("ntfs.img");
    sh("truncate", &["-s", "40M", s(&ntfs)]);
    sh("mkntfs", &["-F", "-Q", "-q", s(&ntfs)]);
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    sh("ntfs-3g", &[s(&ntfs), s(&mnt)]);
    let mut files = Vec::new();
    {
        let mut put = |rel: &str, bytes: Vec<u8>| {
            let path = mnt.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
            files.push((PathBuf::from(rel), bytes));
        };
        put("Docs/readme.txt", b"hello from NTFS\n".to_vec());
        let mut big = Vec::with_capacity(1_500_000);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        while big.len() < 1_500_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            big.extend_from_slice(&x.to_le_bytes());
        }
        put("Docs/Sub/big.bin", big);
        put(
            "Docs/Sub/Résumé with spaces.txt",
            "ünïcode\n".as_bytes().to_vec(),
        );
    }
    sh("umount", &[s(&mnt)]);
    sh(
        "dd",
        &[
            &format!("if={}", s(&fat)),
            &format!("of={}", s(&disk)),
            "bs=512",
            "seek=2048",
            "conv=notrunc",
            "status=none",
        ],
    );
    sh(
        "dd",
        &[
            &format!("if={}", s(&ntfs)),
            &format!("of={}", s(&disk)),
            "bs=512",
            "seek=38912",
            "conv=notrunc",
            "status=none",
        ],
    );
    (disk, files)
}

#[test]
fn mbr_with_extended_partition_fat16_and_ntfs_written_by_ntfs3g() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, ntfs_files) = mbr_ntfs_disk(dir.path());
    let repo = dir.path().join("repo");
    cairn_ok(&["repo", "init", s(&repo)]);
    backup(&repo, &disk, "mbr");
    let volumes = cairn_json(&["repo", "browse", s(&repo), "--disk", "mbr"]);
    assert_eq!(names(&volumes), ["p1", "p5"], "{volumes}");
    assert_eq!(volumes["entries"][1]["detail"], "ntfs, type 0x07");
    let root = cairn_json(&["repo", "browse", s(&repo), "--disk", "mbr", "--path", "/p5"]);
    assert_eq!(names(&root), ["Docs"], "system files stay hidden: {root}");
    let fat = cairn_json(&["repo", "browse", s(&repo), "--disk", "mbr", "--path", "/p1"]);
    assert_eq!(names(&fat), ["A long name for a note.txt"]);

    let out = dir.path().join("out");
    let report = cairn_json(&[
        "repo",
        "extract",
        s(&repo),
        "--disk",
        "mbr",
        "--item",
        "/p5/Docs",
        "--item",
        "/p1/A long name for a note.txt",
        "--to",
        s(&out),
    ]);
    assert_eq!(report["files"], 4, "{report}");
    assert_eq!(
        std::fs::read(out.join("A long name for a note.txt")).unwrap(),
        b"fat16 says hi\n"
    );
    let got = files_below(&out.join("Docs"));
    let mut want: Vec<(PathBuf, Vec<u8>)> = ntfs_files
        .into_iter()
        .map(|(p, b)| (p.strip_prefix("Docs").unwrap().to_path_buf(), b))
        .collect();
    want.sort();
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert_eq!(a.0, b.0);
        assert!(a.1 == b.1, "{} differs", a.0.display());
    }
}

/// Overwrites every occurrence of `from` in `image` with `to` (same length).
fn patch_bytes(image: &Path, from: &[u8], to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(image).unwrap();
    let mut n = 0;
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            n += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    std::fs::write(image, bytes).unwrap();
    n
}

/// An ext4 file system without metadata checksums (so renamed entries stay valid) with
/// names holding `..` and `/`, symlinks out, absolute, up and in loops, and a device node.
fn hostile_ext4(dir: &Path) -> PathBuf {
    let image = dir.join("hostile.img");
    sh("truncate", &["-s", "8M", s(&image)]);
    sh(
        "mkfs.ext4",
        &["-q", "-F", "-O", "^metadata_csum,^dir_index", s(&image)],
    );
    let payload = dir.join("payload");
    std::fs::write(&payload, b"must not escape\n").unwrap();
    let script = dir.join("debugfs.cmds");
    std::fs::write(
        &script,
        format!(
            "mkdir d\nmkdir d/e\nmkdir d/bad\nwrite {p} d/bad/DOTDOTNAME1\nwrite {p} d/bad/ABSOLUTEXX2\nwrite {p} d/e/kept.txt\n\
             symlink d/out ../../../../../../tmp/cairn-escape\nsymlink d/abs /etc/passwd\n\
             symlink d/up2 ../..\nsymlink d/up1 ..\nsymlink d/loop1 loop2\nsymlink d/loop2 loop1\n\
             symlink d/via up1/../..\nsymlink d/inside e/kept.txt\ncd d\nmknod null c 1 3\n",
            p = s(&payload)
        ),
    )
    .unwrap();
    sh("debugfs", &["-w", "-f", s(&script), s(&image)]);
    // Rename entries in the raw directory block: "DOTDOTNAME1" → "../../esc01", and
    // "ABSOLUTEXX2" → "/tmp/abs002".
    assert_eq!(patch_bytes(&image, b"DOTDOTNAME1", b"../../esc01"), 1);
    assert_eq!(patch_bytes(&image, b"ABSOLUTEXX2", b"/tmp/abs002"), 1);
    image
}

#[test]
fn hostile_names_and_links_never_reach_outside_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let image = hostile_ext4(dir.path());
    let repo = dir.path().join("repo");
    cairn_ok(&["repo", "init", s(&repo)]);
    backup(&repo, &image, "hostile");
    let jail = dir.path().join("jail");
    let out = jail.join("out");
    let report = cairn_json(&[
        "repo",
        "extract",
        s(&repo),
        "--disk",
        "hostile",
        "--item",
        "/disk/d",
        "--to",
        s(&out),
    ]);
    let skipped: Vec<String> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap().to_string())
        .collect();
    for hostile in ["d/bad", "d/out", "d/abs", "up2", "via", "null"] {
        assert!(
            skipped.iter().any(|p| p.ends_with(&format!("/{hostile}"))),
            "{hostile} not reported as skipped: {report}"
        );
    }
    let bad = &report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["path"] == "/disk/d/bad")
        .unwrap()["reason"];
    assert!(bad.as_str().unwrap().contains("path separator"), "{bad}");
    assert!(!Path::new("/tmp/cairn-escape").exists());
    assert!(!Path::new("/tmp/abs002").exists());
    // Only `out` was created beside nothing else; everything below it stays below it.
    let beside: Vec<_> = std::fs::read_dir(&jail)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(beside, ["out"]);
    let root = out.canonicalize().unwrap();
    let mut stack = vec![root.clone()];
    let mut links = 0;
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                links += 1;
                // Resolving may fail for loops; whatever resolves stays inside.
                if let Ok(real) = path.canonicalize() {
                    assert!(
                        real.starts_with(&root),
                        "{} → {}",
                        path.display(),
                        real.display()
                    );
                }
            } else if meta.is_dir() {
                stack.push(path);
            } else {
                assert!(meta.is_file(), "{} is not a regular file", path.display());
            }
        }
    }
    assert_eq!(links, 4, "up1, loop1, loop2 and inside are kept: {report}");
    assert_eq!(
        std::fs::read(out.join("d/e/kept.txt")).unwrap(),
        b"must not escape\n"
    );
    assert_eq!(
        std::fs::read(out.join("d/inside")).unwrap(),
        b"must not escape\n"
    );
    // FAT long names holding `/` and `..` (the long-name entries carry no checksum of their own).
    let fat = dir.path().join("hostile-fat.img");
    sh("truncate", &["-s", "4M", s(&fat)]);
    sh("mkfs.vfat", &["-F", "12", s(&fat)]);
    for name in ["abcdefghijkl.txt", "mnopqrstuvwx.txt", "fine.txt"] {
        let file = dir.path().join(name);
        std::fs::write(&file, b"fat payload\n").unwrap();
        let status = Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-i", s(&fat), s(&file), "::/"])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let utf16 = |t: &str| {
        t.encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect::<Vec<u8>>()
    };
    assert_eq!(patch_bytes(&fat, &utf16("abcde"), &utf16("../..")), 1);
    assert_eq!(patch_bytes(&fat, &utf16("mnopq"), &utf16("/tmp/")), 1);
    backup(&repo, &fat, "hostile-fat");
    let listing = cairn_json(&[
        "repo",
        "browse",
        s(&repo),
        "--disk",
        "hostile-fat",
        "--path",
        "/disk",
    ]);
    assert!(
        names(&listing).contains(&"../..fghijkl.txt".to_string()),
        "{listing}"
    );
    let fat_out = jail.join("fat");
    let report = cairn_json(&[
        "repo",
        "extract",
        s(&repo),
        "--disk",
        "hostile-fat",
        "--item",
        "/disk",
        "--to",
        s(&fat_out),
    ]);
    assert_eq!(report["files"], 1, "{report}");
    let reasons: Vec<&str> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["name contains /", "name contains /"], "{report}");
    assert_eq!(files_below(&fat_out).len(), 1);
    assert!(!Path::new("/tmp/rstuvwx.txt").exists());
    let mut beside: Vec<_> = std::fs::read_dir(&jail)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    beside.sort();
    assert_eq!(beside, ["fat", "out"]);
    // Limits are enforced: an extraction of more entries than allowed stops with an error.
    let limited = cairn(&[
        "repo",
        "extract",
        s(&repo),
        "--disk",
        "hostile",
        "--item",
        "/disk/d",
        "--to",
        s(&dir.path().join("lim")),
        "--max-entries",
        "3",
    ]);
    assert!(!limited.status.success());
    assert!(String::from_utf8_lossy(&limited.stderr).contains("exceeds the limit of 3"));
}

/// The good files of [`looped_ext4`], relative to the extracted volume, with their bytes.
const LOOPED_GOOD: &[(&str, &[u8])] = &[
    ("a-before/one.txt", b"before the loop\n"),
    ("b-loop/inner.txt", b"inside the loop\n"),
    ("c-deep/l1/l2/mid.txt", b"within the depth limit\n"),
    ("z-after.txt", b"after everything\n"),
];

/// An ext4 file system with folders that must not be walked twice, made with `debugfs`:
/// `b-loop/self` is a hard link to `b-loop` and `b-loop/up` one to the root (loops),
/// `d-hardlink` a hard link to `a-before` (the same folder twice, no loop: ext4 folders are
/// told apart by what they look like, so it comes out as a second copy), and `c-deep` a
/// chain `l1/…/l10` with `bottom.txt` at its end. The good files of [`LOOPED_GOOD`] lie before
/// and after them in name order.
fn looped_ext4(dir: &Path) -> PathBuf {
    let image = dir.join("looped.img");
    sh("truncate", &["-s", "8M", s(&image)]);
    sh("mkfs.ext4", &["-q", "-F", s(&image)]);
    let mut cmds = String::new();
    for (i, (rel, bytes)) in LOOPED_GOOD.iter().enumerate() {
        let payload = dir.join(format!("payload-{i}"));
        std::fs::write(&payload, bytes).unwrap();
        let mut folder = String::new();
        for part in rel.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            folder = if folder.is_empty() {
                part.to_string()
            } else {
                format!("{folder}/{part}")
            };
            cmds.push_str(&format!("mkdir {folder}\n"));
        }
        cmds.push_str(&format!("write {} {rel}\n", s(&payload)));
    }
    let mut chain = "c-deep/l1/l2".to_string();
    for level in 3..=10 {
        chain = format!("{chain}/l{level}");
        cmds.push_str(&format!("mkdir {chain}\n"));
    }
    let bottom = dir.join("payload-bottom");
    std::fs::write(&bottom, b"at the bottom\n").unwrap();
    cmds.push_str(&format!("write {} {chain}/bottom.txt\n", s(&bottom)));
    // Directory hard links; `sif` gives the folders the link counts such links would have.
    cmds.push_str("link b-loop b-loop/self\nlink / b-loop/up\nlink a-before d-hardlink\n");
    cmds.push_str("sif b-loop links_count 3\nsif a-before links_count 3\n");
    let script = dir.join("looped.cmds");
    std::fs::write(&script, cmds).unwrap();
    sh("debugfs", &["-w", "-f", s(&script), s(&image)]);
    image
}

#[test]
fn folder_loops_and_too_deep_folders_are_skipped_and_the_rest_comes_out() {
    let dir = tempfile::tempdir().unwrap();
    let image = looped_ext4(dir.path());
    let repo = dir.path().join("repo");
    cairn_ok(&["repo", "init", s(&repo)]);
    backup(&repo, &image, "looped");
    let same = "directory loop: the same folder (same inode metadata and entries) is already \
                extracted at";

    // Browsing lists one folder and never recurses: a path through the loop is just a path.
    let listing = cairn_json(&[
        "repo",
        "browse",
        s(&repo),
        "--disk",
        "looped",
        "--path",
        "/disk/b-loop/self/up/b-loop/self",
    ]);
    assert_eq!(names(&listing), ["inner.txt", "self", "up"]);

    // With a depth limit of 8, `l7` of the chain is the first folder too deep.
    let out = dir.path().join("out");
    let report = cairn_json(&[
        "repo",
        "extract",
        s(&repo),
        "--disk",
        "looped",
        "--item",
        "/disk",
        "--to",
        s(&out),
        "--max-depth",
        "8",
    ]);
    let skipped: Vec<(&str, &str)> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["path"].as_str().unwrap(), s["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        skipped,
        [
            ("/disk/b-loop/self", format!("{same} /disk/b-loop").as_str()),
            ("/disk/b-loop/up", format!("{same} /disk").as_str()),
            (
                "/disk/c-deep/l1/l2/l3/l4/l5/l6/l7",
                "deeper than 8 folders (the depth limit): skipped with everything in it"
            ),
        ],
        "{report}"
    );
    // Every good file once, byte-identical, and nothing else: no second copy of a loop; the
    // folder with a second name comes out under both.
    let got = files_below(&out.join("disk"));
    let mut want: Vec<(PathBuf, Vec<u8>)> = LOOPED_GOOD
        .iter()
        .map(|(rel, bytes)| (PathBuf::from(rel), bytes.to_vec()))
        .collect();
    want.push(("d-hardlink/one.txt".into(), LOOPED_GOOD[0].1.to_vec()));
    want.sort();
    assert_eq!(got, want, "{report}");
    assert_eq!(report["files"], 5, "{report}");
    // disk, a-before, b-loop, c-deep, l1…l6, d-hardlink and lost+found.
    assert_eq!(report["dirs"], 12, "{report}");
    assert!(out.join("disk/c-deep/l1/l2/l3/l4/l5/l6").is_dir());
    assert!(!out.join("disk/c-deep/l1/l2/l3/l4/l5/l6/l7").exists());

    // With the default limit the whole chain comes out; the loops are still walked once.
    let full = dir.path().join("full");
    let report = cairn_json(&[
        "repo",
        "extract",
        s(&repo),
        "--disk",
        "looped",
        "--item",
        "/disk",
        "--to",
        s(&full),
    ]);
    let paths: Vec<&str> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/disk/b-loop/self", "/disk/b-loop/up"], "{report}");
    let got = files_below(&full.join("disk"));
    assert_eq!(got.len(), LOOPED_GOOD.len() + 2, "{report}");
    assert_eq!(
        std::fs::read(full.join("disk/c-deep/l1/l2/l3/l4/l5/l6/l7/l8/l9/l10/bottom.txt")).unwrap(),
        b"at the bottom\n"
    );
}

#[test]
fn damaged_file_systems_give_errors_not_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    cairn_ok(&["repo", "init", "--chunk-size", "4KiB", s(&repo)]);
    let base = dir.path().join("base.img");
    sh("truncate", &["-s", "8M", s(&base)]);
    sh("mkfs.ext4", &["-q", "-F", s(&base)]);
    let script = dir.path().join("cmds");
    std::fs::write(
        &script,
        "mkdir a\nmkdir a/b\nwrite /etc/hostname a/b/f\nsymlink a/l b/f\n",
    )
    .unwrap();
    sh("debugfs", &["-w", "-f", s(&script), s(&base)]);
    let fat = dir.path().join("fat.img");
    sh("truncate", &["-s", "8M", s(&fat)]);
    sh("mkfs.vfat", &["-F", "12", s(&fat)]);
    let mut errors = 0;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (round, template) in [&base, &fat, &base, &fat, &base, &base].iter().enumerate() {
        let image = dir.path().join(format!("damaged-{round}.img"));
        std::fs::copy(template, &image).unwrap();
        let mut bytes = std::fs::read(&image).unwrap();
        // Scribble over metadata: superblock/boot sector area, group descriptors / FATs, inode
        // tables / root folder.
        for _ in 0..40 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = 512 + (x % (300 * 1024)) as usize;
            bytes[at] ^= (x >> 56) as u8 | 1;
        }
        std::fs::write(&image, &bytes).unwrap();
        let disk = format!("damaged{round}");
        backup(&repo, &image, &disk);
        for args in [
            vec![
                "repo",
                "browse",
                s(&repo),
                "--disk",
                &disk,
                "--path",
                "/disk",
            ],
            vec![
                "repo",
                "browse",
                s(&repo),
                "--disk",
                &disk,
                "--path",
                "/disk/a/b",
            ],
        ] {
            let out = cairn(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.code() == Some(0) || out.status.code() == Some(1),
                "{args:?} crashed ({}): {stderr}",
                out.status
            );
            assert!(!stderr.contains("RUST_BACKTRACE"), "{args:?}: {stderr}");
            errors += usize::from(!out.status.success());
        }
        let out_dir = dir.path().join(format!("out-{round}"));
        let out = cairn(&[
            "repo",
            "extract",
            s(&repo),
            "--disk",
            &disk,
            "--item",
            "/disk",
            "--to",
            s(&out_dir),
        ]);
        assert!(
            out.status.code() == Some(0) || out.status.code() == Some(1),
            "extract crashed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(errors > 0, "scribbled metadata went unnoticed every time");
    // A torn superblock is named as damage.
    let torn = dir.path().join("torn.img");
    std::fs::copy(&base, &torn).unwrap();
    let mut bytes = std::fs::read(&torn).unwrap();
    bytes[1024 + 0x58..1024 + 0x70].fill(0xff);
    std::fs::write(&torn, bytes).unwrap();
    backup(&repo, &torn, "torn");
    let out = cairn(&[
        "repo",
        "browse",
        s(&repo),
        "--disk",
        "torn",
        "--path",
        "/disk",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("damaged"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `cairn repo export` child; killed on drop.
struct Export {
    child: Child,
    uri: String,
}

impl Export {
    fn start(args: &[&str]) -> Export {
        let mut child = Command::new(cairn_bin())
            .env("XDG_CONFIG_HOME", cairn_tests::config_home())
            .args(args)
            .arg("--json")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("export printed {line:?}: {e}"));
        Export {
            child,
            uri: v["uri"].as_str().unwrap().to_string(),
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nbd_export_of_a_recovery_point_reads_like_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let raw = vm_disk(DISK_MIB);
    let repo = dir.path().join("repo");
    cairn_ok(&["repo", "init", s(&repo)]);
    backup(&repo, &raw, "d0");
    let socket = dir.path().join("export.sock");
    let export = Export::start(&[
        "repo",
        "export",
        s(&repo),
        "--disk",
        "d0",
        "--socket",
        s(&socket),
    ]);
    assert!(
        export.uri.starts_with("nbd+unix:///d0?socket="),
        "{}",
        export.uri
    );
    // Two clients at once: qemu-img compare and qemu-img convert.
    let uri = export.uri.clone();
    let compare = std::thread::spawn(move || {
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(raw)
            .arg(&uri)
            .output()
            .unwrap()
    });
    let copy = dir.path().join("copy.qcow2");
    sh(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &export.uri, s(&copy)],
    );
    let compared = compare.join().unwrap();
    assert!(
        compared.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&compared.stdout),
        String::from_utf8_lossy(&compared.stderr)
    );
    sh(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            s(&vm_disk(DISK_MIB)),
            s(&copy),
        ],
    );
    // Block status made the copy sparse: the free space of the ext4 partition was not written.
    let info: serde_json::Value =
        serde_json::from_str(&sh("qemu-img", &["info", "--output=json", s(&copy)])).unwrap();
    assert!(
        info["actual-size"].as_u64().unwrap() < (DISK_MIB as u64) << 20,
        "copy not sparse: {info}"
    );
    // Writes are refused.
    let write = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xab 0 4096", &export.uri])
        .output();
    if let Ok(out) = write {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success() || text.contains("ermission") || text.contains("read-only"),
            "{text}"
        );
    }
    drop(export);
}

#[test]
fn through_the_server_browse_recover_items_as_a_job_and_export() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let disk = dir.path().join("web-root.raw");
    sparse_copy(&vm_disk(DISK_MIB), &disk);
    write_vm(
        &data.join("vms"),
        "web",
        "0b3c6f1e-2a5b-4c6d-8e7f-901a2b3c4d5f",
        &[("root", &disk)],
    );
    let server = UpServer::start(&data, &[], &[]);
    let url = server.url();
    wait_until(Duration::from_secs(60), "the VM in the inventory", || {
        server
            .get("/v1/vms")
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "web")
    });
    cairn_ok(&[
        "group",
        "create",
        "items",
        "--vm",
        "web",
        "--retention-days",
        "7",
        "--sync",
        "24h",
        "--server",
        &url,
    ]);
    wait_until(Duration::from_secs(180), "the first backup", || {
        server
            .get("/v1/jobs")
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["state"] == "Succeeded")
    });
    let listing = cairn_json(&[
        "rp", "browse", "web", "--rp", "latest", "--path", "/p2/etc", "--server", &url,
    ]);
    assert_eq!(listing["disk"], "root");
    let names: Vec<&str> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hosts", "passwd"]);
    let text = cairn_ok(&["rp", "browse", "web", "--rp", "latest", "--server", &url]);
    assert!(text.contains("p2") && text.contains("ext4, root"), "{text}");
    // A bad path is a 400 naming the problem, and the server keeps serving.
    let bad = cairn(&[
        "rp", "browse", "web", "--rp", "latest", "--path", "/p9", "--server", &url,
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("/p9"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    let to = dir.path().join("recovered");
    let out = cairn_ok(&[
        "recover-items",
        "web",
        "--rp",
        "latest",
        "--item",
        "/p2/etc/hosts",
        "--item",
        "/p1/EFI",
        "--to",
        s(&to),
        "--wait",
        "--server",
        &url,
    ]);
    assert!(out.contains("Succeeded"), "{out}");
    assert_eq!(
        std::fs::read(to.join("hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    assert_eq!(
        std::fs::read(to.join("EFI/BOOT/grub.cfg")).unwrap(),
        b"default=linux\ntimeout=3\n"
    );
    let jobs = server.get("/v1/jobs");
    let job = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"].as_str().unwrap_or_default().contains("Recovery"))
        .unwrap_or_else(|| panic!("no recovery job: {jobs}"))
        .clone();
    let shown = server.get(&format!("/v1/jobs/{}", job["job"].as_str().unwrap()));
    assert!(shown.to_string().contains("ExtractItems root"), "{shown}");
    // Items with `..` are refused before a job exists.
    let refused = cairn(&[
        "recover-items",
        "web",
        "--rp",
        "latest",
        "--item",
        "/p2/../etc",
        "--to",
        s(&to),
        "--server",
        &url,
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("invalid_path")
            || String::from_utf8_lossy(&refused.stderr).contains("must look like")
    );

    // The instant export of the same recovery point, compared with the original disk.
    let socket = dir.path().join("rp.sock");
    let export = Export::start(&[
        "rp",
        "export",
        "web",
        "--rp",
        "latest",
        "--repository",
        s(&data.join("repo")),
        "--socket",
        s(&socket),
        "--server",
        &url,
    ]);
    sh(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&disk), &export.uri],
    );
}
