//! Image sources and sinks against real images made by `qemu-img`, read and written through a
//! real `qemu-nbd` and our NBD client. Each test works in its own temp dir.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cairn_worker::nbd::{self, BASE_ALLOCATION, ConnectOptions, StatusExtent};
use cairn_worker::source::qemu_nbd::{EXPORT_NAME, QemuNbd, QemuNbdOptions};
use cairn_worker::source::{
    Error, ExtentKind, ImageFormat, Sink, Source, create_sink, open_sink, open_source,
};

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 16 * MIB;
/// `(offset, len)` of the data written into the test disk; everything else is a hole.
const DATA: &[(u64, u64)] = &[
    (0, MIB),
    (5 * MIB, MIB / 2),
    (12 * MIB + 4096, 65536),
    (DISK_SIZE - 65536, 65536),
];

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

/// Deterministic non-repeating bytes (xorshift), so misplaced data is caught.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A sparse raw disk with [`DATA`] written.
fn make_raw(dir: &Path) -> PathBuf {
    let path = dir.join("src.raw");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(DISK_SIZE).unwrap();
    for &(offset, len) in DATA {
        std::os::unix::fs::FileExt::write_all_at(&file, &pattern(offset, len as usize), offset)
            .unwrap();
    }
    path
}

fn convert(raw: &Path, format: &str, options: &[&str], name: &str) -> PathBuf {
    let out = raw.with_file_name(name);
    let mut args = vec!["convert", "-f", "raw", "-O", format];
    args.extend_from_slice(options);
    args.push(raw.to_str().unwrap());
    args.push(out.to_str().unwrap());
    qemu_img(&args);
    out
}

fn read_all(source: &mut dyn Source) -> Vec<u8> {
    let mut buf = vec![0u8; source.size() as usize];
    for (i, piece) in buf.chunks_mut(4 * MIB as usize).enumerate() {
        source.read_at(i as u64 * 4 * MIB, piece).unwrap();
    }
    buf
}

fn images_identical(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) {
    let out = qemu_img(&[
        "compare",
        "-f",
        a_fmt,
        "-F",
        b_fmt,
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert!(out.contains("identical"), "{out}");
}

/// Every test format: (file name, qemu-img output format, options, our format).
fn formats() -> Vec<(&'static str, &'static str, Vec<&'static str>, ImageFormat)> {
    vec![
        ("src.qcow2", "qcow2", vec![], ImageFormat::Qcow2),
        ("src.vhdx", "vhdx", vec![], ImageFormat::Vhdx),
        (
            "src.vhd",
            "vpc",
            vec!["-o", "force_size=on"],
            ImageFormat::Vpc,
        ),
        (
            "src-fixed.vhd",
            "vpc",
            vec!["-o", "subformat=fixed,force_size=on"],
            ImageFormat::Vpc,
        ),
    ]
}

#[test]
fn every_format_reads_like_the_raw_original_with_and_without_a_format_hint() {
    let dir = tempfile::tempdir().unwrap();
    let raw = make_raw(dir.path());
    let expected = std::fs::read(&raw).unwrap();
    let mut images = vec![(raw.clone(), ImageFormat::Raw)];
    for (name, fmt, opts, ours) in formats() {
        images.push((convert(&raw, fmt, &opts, name), ours));
    }
    for (path, format) in images {
        for hint in [None, Some(format)] {
            let mut source = open_source(&path, hint).unwrap();
            assert_eq!(source.size(), DISK_SIZE, "{}", path.display());
            assert!(
                source.describe().contains(path.to_str().unwrap()),
                "{}",
                source.describe()
            );
            assert!(
                read_all(source.as_mut()) == expected,
                "{} differs",
                path.display()
            );
            let extents = source.extents(0, DISK_SIZE).unwrap();
            assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), DISK_SIZE);
            // Whatever a format calls zero must read as zeros.
            for e in extents.iter().filter(|e| e.kind == ExtentKind::Zero) {
                let range = e.offset as usize..(e.offset + e.len) as usize;
                assert!(
                    expected[range].iter().all(|&b| b == 0),
                    "{} {e:?}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn sparse_qcow2_and_raw_report_zero_extents_where_unwritten() {
    let dir = tempfile::tempdir().unwrap();
    let raw = make_raw(dir.path());
    let qcow2 = convert(&raw, "qcow2", &[], "src.qcow2");
    for path in [&raw, &qcow2] {
        let mut source = open_source(path, None).unwrap();
        let extents = source.extents(0, DISK_SIZE).unwrap();
        let kind_at = |off: u64| {
            extents
                .iter()
                .find(|e| e.offset <= off && off < e.offset + e.len)
                .unwrap()
                .kind
        };
        for &(offset, len) in DATA {
            assert_eq!(
                kind_at(offset),
                ExtentKind::Data,
                "{} at {offset}",
                path.display()
            );
            assert_eq!(kind_at(offset + len - 1), ExtentKind::Data);
        }
        for off in [2 * MIB, 4 * MIB, 8 * MIB, 14 * MIB] {
            assert_eq!(
                kind_at(off),
                ExtentKind::Zero,
                "{} at {off}",
                path.display()
            );
        }
        // A sub-range is answered exactly.
        let part = source.extents(3 * MIB, MIB).unwrap();
        assert_eq!(part.len(), 1);
        assert_eq!(
            (part[0].offset, part[0].len, part[0].kind),
            (3 * MIB, MIB, ExtentKind::Zero)
        );
        // Out of range.
        assert!(source.extents(DISK_SIZE - 512, 1024).is_err());
        let mut buf = [0u8; 1024];
        assert!(source.read_at(DISK_SIZE - 512, &mut buf).is_err());
    }
}

/// Copies `source` into `sink` the way restore does: data written, zero extents zeroed.
fn copy(source: &mut dyn Source, sink: &mut dyn Sink) {
    for e in source.extents(0, source.size()).unwrap() {
        match e.kind {
            ExtentKind::Zero => sink.write_zeroes(e.offset, e.len).unwrap(),
            ExtentKind::Data | ExtentKind::Unchanged => {
                let mut pos = e.offset;
                while pos < e.offset + e.len {
                    let n = (e.offset + e.len - pos).min(3 * MIB + 512);
                    let mut buf = vec![0u8; n as usize];
                    source.read_at(pos, &mut buf).unwrap();
                    sink.write_at(pos, &buf).unwrap();
                    pos += n;
                }
            }
        }
    }
    sink.flush().unwrap();
}

#[test]
fn create_sink_writes_images_qemu_img_finds_identical() {
    let dir = tempfile::tempdir().unwrap();
    let raw = make_raw(dir.path());
    let targets = [
        ("out.raw", ImageFormat::Raw, "raw"),
        ("out.qcow2", ImageFormat::Qcow2, "qcow2"),
        ("out.vhdx", ImageFormat::Vhdx, "vhdx"),
        ("out.vhd", ImageFormat::Vpc, "vpc"),
    ];
    for (name, format, qemu_fmt) in targets {
        let out = dir.path().join(name);
        {
            let mut source = open_source(&raw, Some(ImageFormat::Raw)).unwrap();
            let mut sink = create_sink(&out, format, DISK_SIZE).unwrap();
            assert_eq!(sink.size(), DISK_SIZE);
            copy(source.as_mut(), sink.as_mut());
        }
        images_identical(&raw, "raw", &out, qemu_fmt);
        let info = qemu_img(&["info", "--output=json", out.to_str().unwrap()]);
        assert!(
            info.contains(&format!("\"virtual-size\": {DISK_SIZE}")),
            "{info}"
        );
        if format == ImageFormat::Qcow2 {
            // Zero extents were not written as data: the file stays small.
            let len = std::fs::metadata(&out).unwrap().len();
            assert!(len < 4 * MIB, "qcow2 of {len} bytes");
        }
        let err = create_sink(&out, format, DISK_SIZE).err().unwrap();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    }
    let err = create_sink(&dir.path().join("odd.qcow2"), ImageFormat::Qcow2, 1000)
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a multiple of 512"), "{err}");
    assert!(!dir.path().join("odd.qcow2").exists());
}

#[test]
fn open_sink_overwrites_a_range_of_an_existing_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let raw = make_raw(dir.path());
    let qcow2 = convert(&raw, "qcow2", &[], "disk.qcow2");
    let new_data = pattern(99, (MIB + 4096) as usize);
    {
        let mut sink = open_sink(&qcow2, None).unwrap();
        sink.write_at(3 * MIB - 4096, &new_data).unwrap();
        sink.write_zeroes(0, 65536).unwrap();
        sink.write_zeroes(5 * MIB, 4096).unwrap();
        sink.flush().unwrap();
        // A sink reads back what it wrote.
        let mut back = vec![0u8; new_data.len()];
        sink.read_at(3 * MIB - 4096, &mut back).unwrap();
        assert!(back == new_data);
    }
    // Same edits on the raw original, then compare.
    {
        let mut sink = open_sink(&raw, Some(ImageFormat::Raw)).unwrap();
        sink.write_at(3 * MIB - 4096, &new_data).unwrap();
        sink.write_zeroes(0, 65536).unwrap();
        sink.write_zeroes(5 * MIB, 4096).unwrap();
        sink.flush().unwrap();
    }
    images_identical(&raw, "raw", &qcow2, "qcow2");
    let mut source = open_source(&qcow2, Some(ImageFormat::Qcow2)).unwrap();
    assert!(read_all(source.as_mut()) == std::fs::read(&raw).unwrap());
    let check = qemu_img(&["check", qcow2.to_str().unwrap()]);
    assert!(check.contains("No errors"), "{check}");
}

fn assert_names_path(err: &Error, path: &Path) {
    assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
}

#[test]
fn bad_inputs_give_clear_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("missing.qcow2");
    for hint in [None, Some(ImageFormat::Qcow2), Some(ImageFormat::Raw)] {
        let err = open_source(&missing, hint).err().unwrap();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert_names_path(&err, &missing);
    }
    assert!(matches!(
        open_sink(&missing, None).err().unwrap(),
        Error::Io { .. }
    ));

    let text = dir.path().join("notes.txt");
    let words = "these are not the sectors you are looking for\n";
    std::fs::write(&text, words).unwrap();
    let err = open_source(&text, None).err().unwrap();
    let expected = format!(
        "not a disk image: size {} is not a multiple of 512",
        words.len()
    );
    assert!(err.to_string().contains(&expected), "{err}");
    assert_names_path(&err, &text);

    let vmdk = dir.path().join("disk.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", vmdk.to_str().unwrap(), "16M"]);
    let err = open_source(&vmdk, None).err().unwrap();
    assert!(
        matches!(err, Error::UnsupportedFormat { format: "VMDK", .. }),
        "{err}"
    );
    assert_names_path(&err, &vmdk);

    // qemu itself would open this and read zeros past the end of the file.
    let raw = make_raw(dir.path());
    let full = convert(&raw, "qcow2", &[], "full.qcow2");
    let truncated = dir.path().join("truncated.qcow2");
    std::fs::write(&truncated, &std::fs::read(&full).unwrap()[..1024]).unwrap();
    for hint in [None, Some(ImageFormat::Qcow2)] {
        let err = open_source(&truncated, hint).err().unwrap();
        assert!(
            err.to_string().contains("corrupt or truncated qcow2"),
            "{err}"
        );
        assert_names_path(&err, &truncated);
    }

    // A qcow2 with a broken header that qemu-nbd refuses: its message comes through.
    let mut broken = std::fs::read(&full).unwrap();
    broken[4..8].copy_from_slice(&9u32.to_be_bytes()); // version 9
    let bad_version = dir.path().join("version9.qcow2");
    std::fs::write(&bad_version, &broken).unwrap();
    let err = open_source(&bad_version, None).err().unwrap();
    assert!(
        matches!(
            err,
            Error::Tool {
                program: "qemu-nbd",
                ..
            }
        ),
        "{err}"
    );
    assert_names_path(&err, &bad_version);
    assert!(
        err.to_string().contains("qemu-nbd: "),
        "no qemu-nbd message in: {err}"
    );

    // A raw file opened as VHDX: qemu-nbd's refusal comes through.
    let err = open_source(&raw, Some(ImageFormat::Vhdx)).err().unwrap();
    assert!(matches!(err, Error::Tool { .. }), "{err}");

    let err = open_source(dir.path(), None).err().unwrap();
    assert!(
        err.to_string()
            .contains("not a regular file or block device"),
        "{err}"
    );
}

#[test]
fn format_names_parse_and_print() {
    for (s, f) in [
        ("raw", ImageFormat::Raw),
        ("qcow2", ImageFormat::Qcow2),
        ("VHDX", ImageFormat::Vhdx),
        ("vhd", ImageFormat::Vpc),
        ("vpc", ImageFormat::Vpc),
    ] {
        assert_eq!(s.parse::<ImageFormat>().unwrap(), f);
        assert_eq!(f.to_string().parse::<ImageFormat>().unwrap(), f);
    }
    assert_eq!(ImageFormat::Vpc.qemu_name(), "vpc");
    assert_eq!(ImageFormat::Vpc.to_string(), "vhd");
    let err = "vmdk".parse::<ImageFormat>().unwrap_err();
    assert!(err.to_string().contains("vmdk"), "{err}");
}

#[test]
fn dirty_bitmap_context_lists_exactly_the_changed_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "16M"]);
    qemu_img(&["bitmap", "--add", disk.to_str().unwrap(), "bm0"]);
    {
        let mut sink = open_sink(&disk, Some(ImageFormat::Qcow2)).unwrap();
        sink.write_at(MIB, &pattern(1, 65536)).unwrap();
        sink.write_at(10 * MIB + 4096, &pattern(2, 4096)).unwrap();
        sink.flush().unwrap();
    }
    let mut opts = QemuNbdOptions::new(ImageFormat::Qcow2, false);
    opts.bitmaps = vec!["bm0".to_string()];
    let mut server = QemuNbd::start(&disk, &opts).unwrap();
    let bitmap = nbd::dirty_bitmap_context("bm0");
    let connect = ConnectOptions::new(EXPORT_NAME)
        .with_meta_contexts([BASE_ALLOCATION.into(), bitmap.clone()]);
    let mut client = server.connect(&connect).unwrap();
    assert!(client.info().read_only());
    let dirty: Vec<StatusExtent> = client
        .block_status(&bitmap, 0, DISK_SIZE)
        .unwrap()
        .into_iter()
        .filter(|e| e.flags & nbd::STATE_DIRTY != 0)
        .collect();
    let ranges: Vec<(u64, u64)> = dirty.iter().map(|e| (e.offset, e.len)).collect();
    assert_eq!(ranges, vec![(MIB, 65536), (10 * MIB, 65536)]);
    let allocation = client.block_status(BASE_ALLOCATION, 0, DISK_SIZE).unwrap();
    assert_eq!(allocation.iter().map(|e| e.len).sum::<u64>(), DISK_SIZE);
    assert!(allocation.iter().any(|e| e.flags & nbd::STATE_ZERO != 0));
    let err = client.write_at(0, &[0u8; 512]).unwrap_err();
    assert!(matches!(err, nbd::Error::ReadOnly), "{err}");
    client.disconnect().unwrap();
    server.stop().unwrap();
}

#[test]
fn qemu_nbd_processes_and_sockets_are_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "16M"]);

    // Read-only: stopped with SIGTERM on drop.
    let mut server =
        QemuNbd::start(&disk, &QemuNbdOptions::new(ImageFormat::Qcow2, false)).unwrap();
    let pid = server.pid().unwrap();
    let socket = server.socket_path().to_path_buf();
    let client = server.connect(&ConnectOptions::new(EXPORT_NAME)).unwrap();
    assert_eq!(client.size(), DISK_SIZE);
    // Persistent: a second client can connect after the first leaves.
    drop(client);
    let client = server.connect(&ConnectOptions::new(EXPORT_NAME)).unwrap();
    drop(client);
    drop(server);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "qemu-nbd {pid} still there"
    );
    assert!(!socket.parent().unwrap().exists());

    // Writable: exits by itself once the client disconnects.
    let mut server = QemuNbd::start(&disk, &QemuNbdOptions::new(ImageFormat::Qcow2, true)).unwrap();
    let pid = server.pid().unwrap();
    let mut client = server.connect(&ConnectOptions::new(EXPORT_NAME)).unwrap();
    client.write_at(0, &pattern(5, 4096)).unwrap();
    client.flush().unwrap();
    client.disconnect().unwrap();
    server.wait_exit(Duration::from_secs(30)).unwrap();
    assert_eq!(server.pid(), None);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    let check = qemu_img(&["check", disk.to_str().unwrap()]);
    assert!(check.contains("No errors"), "{check}");
}

#[test]
fn large_reads_and_writes_are_split_and_pipelined_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    let size = 80 * MIB;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        disk.to_str().unwrap(),
        &size.to_string(),
    ]);
    let data = pattern(7, (70 * MIB) as usize);
    {
        let mut sink = open_sink(&disk, None).unwrap();
        // 70 MiB in one call: more than two maximum-size requests.
        sink.write_at(4 * MIB + 512, &data).unwrap();
        sink.write_zeroes(10 * MIB, 3 * MIB).unwrap();
        sink.flush().unwrap();
    }
    let mut expected = data.clone();
    expected[(6 * MIB - 512) as usize..(9 * MIB - 512) as usize].fill(0);
    let mut source = open_source(&disk, None).unwrap();
    let mut back = vec![0u8; data.len()];
    source.read_at(4 * MIB + 512, &mut back).unwrap();
    assert!(back == expected);
}
