//! Building one disk image: the layout (pure), the choice of files for the root (pure), and
//! the assembly by the system's file-system tools into a temporary file that is renamed over
//! the output only when complete, so a reader never sees half an image.

use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::rng::Rng;
use crate::{Error, io_err};

const MIB: u64 = 1024 * 1024;
/// Changes whenever the same spec would build a different image; caches of built images
/// (the tests') name it.
pub const BUILDER_VERSION: u32 = 1;
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const SWAP_TYPE: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";
/// The boot loader's configuration, as the tests read it back from the ESP.
pub const GRUB_CFG: &str = "default=linux\ntimeout=3\n";
/// The guest's /etc/hosts.
pub const ETC_HOSTS: &str = "127.0.0.1 localhost\n";
/// The guest's /etc/passwd.
pub const ETC_PASSWD: &str =
    "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n";

/// How the disk is divided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageLayout {
    /// A guest's boot disk: GPT with `esp` (FAT32), `root` (ext4, the rest) and `swap`.
    Gpt { esp_mib: u32, swap_mib: u32 },
    /// A data disk: one ext4 file system labelled `data` over the whole disk, no partitions.
    Ext4,
}

/// What to build.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskSpec {
    pub size_mib: u32,
    pub layout: ImageLayout,
    /// Folders of this machine whose files fill the root, each copied under its own path
    /// (`/usr/lib/x` stays `/usr/lib/x` in the guest), in sorted order.
    pub sources: Vec<PathBuf>,
    /// How full the root file system gets with copied files, in percent (1–90).
    pub fill_percent: u8,
    /// Only files of this many bytes (inclusive) are copied.
    pub file_sizes: (u64, u64),
    /// Seeds the generated content: boot loader, swap pages.
    pub seed: u64,
    /// Image format of the output: raw, qcow2, vhdx or vpc (qemu-img's names).
    pub format: String,
}

impl Default for DiskSpec {
    /// A 4 GiB boot disk: 64 MiB ESP, 256 MiB swap, a root 60% full of /usr/lib's files.
    fn default() -> Self {
        DiskSpec {
            size_mib: 4096,
            layout: ImageLayout::Gpt {
                esp_mib: 64,
                swap_mib: 256,
            },
            sources: vec![PathBuf::from("/usr/lib")],
            fill_percent: 60,
            file_sizes: (0, 8 * MIB - 1),
            seed: 1,
            format: "raw".into(),
        }
    }
}

/// One GPT partition, in whole MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub name: &'static str,
    pub type_guid: &'static str,
    pub start_mib: u64,
    pub size_mib: u64,
}

impl DiskSpec {
    /// The GPT partitions (empty for [`ImageLayout::Ext4`]). The first starts at 1 MiB; the
    /// last MiB stays free for the backup GPT.
    pub fn partitions(&self) -> Result<Vec<Partition>, Error> {
        self.validate()?;
        let ImageLayout::Gpt { esp_mib, swap_mib } = self.layout else {
            return Ok(Vec::new());
        };
        let root_mib = self.root_mib();
        let (esp, swap) = (u64::from(esp_mib), u64::from(swap_mib));
        Ok(vec![
            Partition {
                name: "esp",
                type_guid: ESP_TYPE,
                start_mib: 1,
                size_mib: esp,
            },
            Partition {
                name: "root",
                type_guid: LINUX_TYPE,
                start_mib: 1 + esp,
                size_mib: root_mib,
            },
            Partition {
                name: "swap",
                type_guid: SWAP_TYPE,
                start_mib: 1 + esp + root_mib,
                size_mib: swap,
            },
        ])
    }

    /// Size of the ext4 file system (the root partition, or the whole data disk).
    pub fn root_mib(&self) -> u64 {
        match self.layout {
            ImageLayout::Gpt { esp_mib, swap_mib } => u64::from(self.size_mib)
                .saturating_sub(u64::from(esp_mib) + u64::from(swap_mib) + 2),
            ImageLayout::Ext4 => u64::from(self.size_mib),
        }
    }

    fn validate(&self) -> Result<(), Error> {
        if let ImageLayout::Gpt { esp_mib, .. } = self.layout
            && esp_mib < 33
        {
            return Err(Error::Spec(format!(
                "the EFI system partition needs at least 33 MiB for FAT32, not {esp_mib}"
            )));
        }
        if self.root_mib() < 32 {
            return Err(Error::Spec(format!(
                "a {} MiB disk leaves {} MiB for ext4; it needs at least 32",
                self.size_mib,
                self.root_mib()
            )));
        }
        if !(1..=90).contains(&self.fill_percent) {
            return Err(Error::Spec(format!(
                "fill must be 1 to 90 percent of the root, not {}",
                self.fill_percent
            )));
        }
        if !["raw", "qcow2", "vhdx", "vpc"].contains(&self.format.as_str()) {
            return Err(Error::Spec(format!(
                "unknown image format {:?} (raw, qcow2, vhdx or vpc)",
                self.format
            )));
        }
        Ok(())
    }

    /// Bytes of copied files the root may hold.
    fn file_budget(&self) -> u64 {
        self.root_mib() * MIB * u64::from(self.fill_percent) / 100
    }
}

/// Whether a file offered to a [`FileBudget`] is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Take,
    /// Its size is outside the wanted range; later files may still fit.
    Skip,
    /// It would overflow the budget: the root is full, stop looking.
    Full,
}

/// The choice of files for the root, offered in sorted order.
#[derive(Debug, Clone)]
pub struct FileBudget {
    cap: u64,
    used: u64,
    sizes: (u64, u64),
}

impl FileBudget {
    pub fn new(cap: u64, sizes: (u64, u64)) -> Self {
        FileBudget {
            cap,
            used: 0,
            sizes,
        }
    }

    pub fn offer(&mut self, size: u64) -> Offer {
        if size < self.sizes.0 || size > self.sizes.1 {
            Offer::Skip
        } else if self.used + size > self.cap {
            Offer::Full
        } else {
            self.used += size;
            Offer::Take
        }
    }

    /// A file that was taken could not be copied after all: give its bytes back.
    pub fn refund(&mut self, size: u64) {
        self.used -= size;
    }

    pub fn used(&self) -> u64 {
        self.used
    }
}

/// The files (path, size) taken from `candidates`, in order, as [`FileBudget`] decides.
pub fn select_files(
    candidates: impl IntoIterator<Item = (PathBuf, u64)>,
    cap: u64,
    sizes: (u64, u64),
) -> Vec<(PathBuf, u64)> {
    let mut budget = FileBudget::new(cap, sizes);
    let mut taken = Vec::new();
    for (path, size) in candidates {
        match budget.offer(size) {
            Offer::Take => taken.push((path, size)),
            Offer::Skip => {}
            Offer::Full => break,
        }
    }
    taken
}

/// What a build made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildReport {
    /// Files copied into the root, and their bytes.
    pub files: u64,
    pub file_bytes: u64,
    /// Bytes the output occupies on disk (it is sparse).
    pub allocated_bytes: u64,
}

/// Builds the image `spec` describes at `out` (replacing it), telling `progress` each stage.
/// Scratch files live in a temporary folder beside `out` and are removed, whatever happens.
pub fn build(
    spec: &DiskSpec,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<BuildReport, Error> {
    let partitions = spec.partitions()?;
    let sources = spec
        .sources
        .iter()
        .map(|s| {
            std::fs::canonicalize(s)
                .map_err(|e| Error::Spec(format!("source folder {} is unusable: {e}", s.display())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let scratch = tempfile::Builder::new()
        .prefix(".vmdisk-")
        .tempdir_in(parent)
        .map_err(io_err(parent))?;
    let scratch = scratch.path();

    progress("copying files into the root file system");
    let staged = scratch.join("tree");
    let (files, file_bytes) = stage_root(&staged, &sources, spec)?;
    let raw = scratch.join("disk.raw");
    create_sized(&raw, u64::from(spec.size_mib) * MIB)?;
    if partitions.is_empty() {
        progress("making the ext4 file system");
        mkfs_ext4(&staged, &raw, "data")?;
    } else {
        progress("partitioning (GPT: esp, root, swap)");
        sfdisk(&raw, &partitions)?;
        let mut rng = Rng::new(spec.seed);
        for part in &partitions {
            let image = scratch.join(format!("{}.part", part.name));
            create_sized(&image, part.size_mib * MIB)?;
            match part.name {
                "esp" => {
                    progress("making the EFI system partition (FAT32)");
                    make_esp(&image, scratch, &mut rng)?;
                }
                "root" => {
                    progress("making the root file system (ext4)");
                    mkfs_ext4(&staged, &image, "root")?;
                }
                _ => {
                    progress("filling swap with random pages");
                    make_swap(&image, part.size_mib * MIB, &mut rng)?;
                }
            }
            copy_sparse(&image, &raw, part.start_mib * MIB)?;
            std::fs::remove_file(&image).map_err(io_err(&image))?;
        }
    }
    let finished = if spec.format == "raw" {
        raw
    } else {
        progress(&format!("converting to {}", spec.format));
        let converted = scratch.join("disk.converted");
        tool(
            "qemu-img",
            &[
                "convert".as_ref(),
                "-f".as_ref(),
                "raw".as_ref(),
                "-O".as_ref(),
                spec.format.as_ref(),
                raw.as_os_str(),
                converted.as_os_str(),
            ],
        )?;
        converted
    };
    std::fs::File::open(&finished)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&finished))?;
    std::fs::rename(&finished, out).map_err(io_err(out))?;
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io_err(parent))?;
    let allocated_bytes =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(out).map_err(io_err(out))?) * 512;
    Ok(BuildReport {
        files,
        file_bytes,
        allocated_bytes,
    })
}

/// The guest's /etc and home, then real files from the sources up to the budget.
fn stage_root(staged: &Path, sources: &[PathBuf], spec: &DiskSpec) -> Result<(u64, u64), Error> {
    for dir in ["etc", "home/user", "var/log", "tmp"] {
        let path = staged.join(dir);
        std::fs::create_dir_all(&path).map_err(io_err(&path))?;
    }
    write_file(&staged.join("etc/hosts"), ETC_HOSTS.as_bytes())?;
    write_file(&staged.join("etc/passwd"), ETC_PASSWD.as_bytes())?;
    let mut budget = FileBudget::new(spec.file_budget(), spec.file_sizes);
    let mut files = 0;
    for source in sources {
        let inside = staged.join(source.strip_prefix("/").unwrap_or(source));
        if !copy_tree(source, &inside, &mut budget, &mut files)? {
            break;
        }
    }
    Ok((files, budget.used()))
}

/// Copies `from`'s regular files in sorted order (depth first) while the budget takes them.
/// Returns false once the budget is full. Unreadable files and folders are passed over.
fn copy_tree(
    from: &Path,
    to: &Path,
    budget: &mut FileBudget,
    files: &mut u64,
) -> Result<bool, Error> {
    let Ok(entries) = std::fs::read_dir(from) else {
        return Ok(true);
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            if !copy_tree(&entry.path(), &target, budget, files)? {
                return Ok(false);
            }
        } else if kind.is_file() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            match budget.offer(meta.len()) {
                Offer::Skip => continue,
                Offer::Full => return Ok(false),
                Offer::Take => {}
            }
            std::fs::create_dir_all(to).map_err(io_err(to))?;
            match std::fs::copy(entry.path(), &target) {
                Ok(_) => *files += 1,
                Err(_) => budget.refund(meta.len()),
            }
        }
    }
    Ok(true)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    std::fs::write(path, bytes).map_err(io_err(path))
}

fn create_sized(path: &Path, len: u64) -> Result<(), Error> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|f| f.set_len(len))
        .map_err(io_err(path))
}

/// Runs a system tool, failing with its stderr.
fn tool(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), Error> {
    tool_with_env(program, args, &[])
}

fn tool_with_env(
    program: &str,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
) -> Result<(), Error> {
    let out = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::ToolMissing {
            program: program.into(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::ToolFailed {
        program: program.into(),
        args: args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

fn sfdisk(raw: &Path, partitions: &[Partition]) -> Result<(), Error> {
    let mut script = String::from("label: gpt\n");
    for p in partitions {
        script.push_str(&format!(
            "start={}MiB, size={}MiB, type={}, name={}\n",
            p.start_mib, p.size_mib, p.type_guid, p.name
        ));
    }
    let mut child = Command::new("sfdisk")
        .arg("-q")
        .arg(raw)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::ToolMissing {
            program: "sfdisk".into(),
            source,
        })?;
    let written = child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes());
    let out = child.wait_with_output().map_err(io_err(raw))?;
    if out.status.success() && written.is_ok() {
        return Ok(());
    }
    Err(Error::ToolFailed {
        program: "sfdisk".into(),
        args: format!("-q {} <<< {script:?}", raw.display()),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

fn mkfs_ext4(staged: &Path, image: &Path, label: &str) -> Result<(), Error> {
    tool(
        "mkfs.ext4",
        &[
            "-q".as_ref(),
            "-F".as_ref(),
            "-L".as_ref(),
            label.as_ref(),
            "-d".as_ref(),
            staged.as_os_str(),
            image.as_os_str(),
        ],
    )
}

/// FAT32 with a boot loader (a random binary) and its configuration.
fn make_esp(image: &Path, scratch: &Path, rng: &mut Rng) -> Result<(), Error> {
    tool(
        "mkfs.vfat",
        &[
            "-F".as_ref(),
            "32".as_ref(),
            "-n".as_ref(),
            "EFI".as_ref(),
            image.as_os_str(),
        ],
    )?;
    let efi = scratch.join("efi");
    let boot = efi.join("EFI/BOOT");
    std::fs::create_dir_all(&boot).map_err(io_err(&boot))?;
    write_file(&boot.join("grub.cfg"), GRUB_CFG.as_bytes())?;
    let mut loader = vec![0u8; 300_000];
    rng.fill(&mut loader);
    write_file(&boot.join("BOOTX64.EFI"), &loader)?;
    let from = efi.join("EFI");
    tool_with_env(
        "mcopy",
        &[
            "-s".as_ref(),
            "-i".as_ref(),
            image.as_os_str(),
            from.as_os_str(),
            "::/".as_ref(),
        ],
        &[("MTOOLS_SKIP_CHECK", "1")],
    )
}

/// Random pages, as a running guest leaves its swap, under a swap signature.
fn make_swap(image: &Path, len: u64, rng: &mut Rng) -> Result<(), Error> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(io_err(image))?;
    let mut page_run = vec![0u8; MIB as usize];
    let mut at = 0;
    while at < len {
        rng.fill(&mut page_run);
        file.write_all_at(&page_run, at).map_err(io_err(image))?;
        at += MIB;
    }
    drop(file);
    tool(
        "mkswap",
        &["-L".as_ref(), "swap".as_ref(), image.as_os_str()],
    )
}

/// Writes `from` into `to` at `offset`, leaving its all-zero 4 KiB pages as holes.
fn copy_sparse(from: &Path, to: &Path, offset: u64) -> Result<(), Error> {
    const PAGE: usize = 4096;
    let mut input = std::fs::File::open(from).map_err(io_err(from))?;
    let output = std::fs::OpenOptions::new()
        .write(true)
        .open(to)
        .map_err(io_err(to))?;
    let mut buf = vec![0u8; MIB as usize];
    let mut at = offset;
    loop {
        let n = read_full(&mut input, &mut buf).map_err(io_err(from))?;
        if n == 0 {
            break;
        }
        let mut page = 0;
        while page * PAGE < n {
            let is_zero = |p: usize| {
                buf[p * PAGE..((p + 1) * PAGE).min(n)]
                    .iter()
                    .all(|&b| b == 0)
            };
            if is_zero(page) {
                page += 1;
                continue;
            }
            let run_start = page;
            while page * PAGE < n && !is_zero(page) {
                page += 1;
            }
            let (start, end) = (run_start * PAGE, (page * PAGE).min(n));
            output
                .write_all_at(&buf[start..end], at + start as u64)
                .map_err(io_err(to))?;
        }
        at += n as u64;
    }
    Ok(())
}

fn read_full(input: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt_layout_leaves_room_for_both_tables() {
        let spec = DiskSpec {
            size_mib: 400,
            ..DiskSpec::default()
        };
        let parts = spec.partitions().unwrap();
        let names: Vec<_> = parts.iter().map(|p| p.name).collect();
        assert_eq!(names, ["esp", "root", "swap"]);
        assert_eq!(parts[0].start_mib, 1);
        assert_eq!(parts[1].size_mib, 400 - 64 - 256 - 2);
        for pair in parts.windows(2) {
            assert_eq!(pair[0].start_mib + pair[0].size_mib, pair[1].start_mib);
        }
        let last = parts[2];
        assert_eq!(
            last.start_mib + last.size_mib,
            399,
            "the last MiB holds the backup GPT"
        );
        let data = DiskSpec {
            size_mib: 256,
            layout: ImageLayout::Ext4,
            ..DiskSpec::default()
        };
        assert!(data.partitions().unwrap().is_empty());
        assert_eq!(data.root_mib(), 256);
    }

    #[test]
    fn impossible_specs_are_refused_naming_the_value() {
        let cases = [
            (
                DiskSpec {
                    size_mib: 300,
                    ..DiskSpec::default()
                },
                "leaves 0 MiB",
            ),
            (
                DiskSpec {
                    layout: ImageLayout::Gpt {
                        esp_mib: 8,
                        swap_mib: 16,
                    },
                    ..DiskSpec::default()
                },
                "not 8",
            ),
            (
                DiskSpec {
                    fill_percent: 95,
                    ..DiskSpec::default()
                },
                "not 95",
            ),
            (
                DiskSpec {
                    format: "vmdk".into(),
                    ..DiskSpec::default()
                },
                "\"vmdk\"",
            ),
        ];
        for (spec, needle) in cases {
            let err = spec.partitions().unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn files_are_taken_in_order_until_the_budget_is_full() {
        let offered = [("a", 10), ("big", 500), ("b", 30), ("c", 50), ("d", 1)]
            .map(|(n, s)| (PathBuf::from(n), s));
        let taken = select_files(offered, 85, (1, 100));
        let names: Vec<_> = taken.iter().map(|(p, _)| p.to_str().unwrap()).collect();
        // "big" is out of range and skipped; "c" would overflow, which ends the choice.
        assert_eq!(names, ["a", "b"]);
        let mut budget = FileBudget::new(100, (0, 100));
        assert_eq!(budget.offer(60), Offer::Take);
        budget.refund(60);
        assert_eq!(budget.offer(100), Offer::Take);
        assert_eq!(budget.used(), 100);
    }
}
