//! `cairn up --demo`: two small VMs with realistic disks (GPT, EFI system partition, ext4 root
//! full of real files, swap), a protection group with a short schedule, and their first
//! backups, so a newcomer sees cairn work within a minute.

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_orchestrator::engine::service::Handle;
use cairn_orchestrator::log::SledLog;
use cairn_schemas::{Command, GroupPolicy, NodeId, SyncFrequency};
use cairn_worker::agent::Agent;
use cairn_worker::agent::descriptor::{Descriptor, DescriptorDisk, write_descriptor};

const GROUP: &str = "demo";

struct DemoVm {
    name: &'static str,
    uuid: &'static str,
    disks: &'static [(&'static str, u32, &'static str)],
}

const VMS: [DemoVm; 2] = [
    DemoVm {
        name: "web01",
        uuid: "7a1d2c34-5e6f-4a8b-9c0d-1e2f3a4b5c6d",
        disks: &[("disk0", 384, "qcow2")],
    },
    DemoVm {
        name: "db01",
        uuid: "0b9c8d7e-6f5a-4b3c-8d2e-1f0a9b8c7d6e",
        disks: &[("disk0", 320, "qcow2"), ("data", 256, "raw")],
    },
];

pub async fn run(
    handle: &Handle<SledLog>,
    agent: &Arc<Agent>,
    node: &NodeId,
    data: &Path,
    server: &str,
) -> Result<()> {
    let images = data.join("images");
    let vms_dir = data.join("vms");
    for vm in &VMS {
        let mut disks = Vec::new();
        for (id, mib, format) in vm.disks {
            let path = images.join(format!("{}-{id}.{format}", vm.name));
            if !path.exists() {
                println!(
                    "demo: building {} ({mib} MiB {format} disk of VM {})",
                    path.display(),
                    vm.name
                );
                let (path2, images2, format2, mib2) =
                    (path.clone(), images.clone(), format.to_string(), *mib);
                tokio::task::spawn_blocking(move || build_disk(&path2, &images2, mib2, &format2))
                    .await??;
            }
            disks.push(DescriptorDisk {
                id: id.parse().expect("valid disk id"),
                path,
                format: None,
                node: None,
            });
        }
        let descriptor = Descriptor {
            name: vm.name.into(),
            uuid: vm.uuid.parse().expect("valid uuid"),
            disks,
            power: cairn_schemas::PowerState::Stopped,
            qemu: None,
        };
        write_descriptor(&vms_dir, &descriptor)?;
    }
    crate::up::report_inventory(handle, agent, node).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let ids = loop {
        let ids: Vec<_> = handle.read(|s| {
            VMS.iter()
                .filter_map(|d| {
                    s.vms
                        .values()
                        .find(|v| v.name == d.name && v.present)
                        .map(|v| v.id)
                })
                .collect()
        });
        if ids.len() == VMS.len() {
            break ids;
        }
        if Instant::now() > deadline {
            bail!("the demo VMs did not appear in the inventory within a minute");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let exists = handle.read(|s| s.groups.values().any(|g| !g.deleted && g.name == GROUP));
    if !exists {
        let mut policy = GroupPolicy::with_defaults(data.join("repo").display().to_string());
        policy.retention_days = 7;
        policy.sync = SyncFrequency::EveryMinutes(15);
        let group = cairn_orchestrator::control::Control::new_group_id(handle);
        handle
            .submit_as(
                "demo".into(),
                Command::CreateGroup {
                    group,
                    name: GROUP.into(),
                    members: ids.clone(),
                    policy,
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        println!(
            "demo: protection group {GROUP:?} created: web01 and db01, a backup every 15 minutes, 7 days kept"
        );
    }
    // The scheduler starts the first backups right away; follow them.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (done, failed, lines) = handle.read(|s| {
            let mut done = 0;
            let mut failed = Vec::new();
            let mut lines = Vec::new();
            for id in &ids {
                let latest = s
                    .jobs
                    .values()
                    .filter(|j| j.vm == *id && j.is_backup())
                    .max_by_key(|j| j.requested_at);
                let name = &s.vms[id].name;
                match latest {
                    Some(j) if j.state == cairn_schemas::JobState::Succeeded => done += 1,
                    Some(j) if j.state.is_terminal() => {
                        failed.push(format!("{name}: {}", j.error.clone().unwrap_or_default()))
                    }
                    Some(j) => lines.push(format!("{name}: {:?}", j.state)),
                    None => lines.push(format!("{name}: waiting for the scheduler")),
                }
            }
            (done, failed, lines)
        });
        if !failed.is_empty() {
            bail!("demo backups failed: {}", failed.join("; "));
        }
        if done == ids.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "demo backups still running after 10 minutes: {}",
                lines.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("demo: both VMs are protected. Next, in another terminal:");
    println!("  cairn vm list --server {server}");
    println!("  cairn jobs --server {server}");
    println!("  cairn rp list web01 --server {server}");
    println!("  cairn backup db01 --wait --server {server}          # an incremental backup");
    println!("  cairn restore web01 --rp <RP> --to /tmp/restored --wait --server {server}");
    println!("  cairn events tail --server {server}");
    Ok(())
}

/// Builds a realistic disk image: GPT with an EFI system partition (FAT32), an ext4 root
/// filled with real files from /usr/share, and random swap; or, for a `raw` data disk, an ext4
/// file system over the whole disk.
fn build_disk(path: &Path, scratch_parent: &Path, size_mib: u32, format: &str) -> Result<()> {
    let scratch = tempfile_dir(scratch_parent)?;
    let result = build_disk_in(path, &scratch, size_mib, format);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn tempfile_dir(parent: &Path) -> Result<PathBuf> {
    let dir = parent.join(format!(".build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn tool(program: &str, args: &[&str]) -> Result<()> {
    let out = Process::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (install it with ops/install-deps)"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn build_disk_in(path: &Path, scratch: &Path, size_mib: u32, format: &str) -> Result<()> {
    let raw = scratch.join("disk.raw");
    let raw_s = raw.to_str().context("utf-8 path")?;
    let file = std::fs::File::create(&raw)?;
    file.set_len(size_mib as u64 * 1024 * 1024)?;
    drop(file);
    let root = scratch.join("root");
    fill_root(&root, size_mib as u64 * 1024 * 1024 / 3)?;
    if format == "raw" {
        tool(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-L",
                "data",
                "-d",
                root.to_str().context("utf-8")?,
                raw_s,
            ],
        )?;
    } else {
        let esp_mib = 64u32;
        let swap_mib = size_mib / 16;
        let root_mib = size_mib - esp_mib - swap_mib - 2;
        let layout = format!(
            "label: gpt\nstart=1MiB, size={esp_mib}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp\n\
             size={root_mib}MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n\
             size={swap_mib}MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name=swap\n"
        );
        let mut sfdisk = Process::new("sfdisk")
            .args(["-q", raw_s])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("running sfdisk (install it with ops/install-deps)")?;
        std::io::Write::write_all(
            sfdisk.stdin.as_mut().context("sfdisk stdin")?,
            layout.as_bytes(),
        )?;
        drop(sfdisk.stdin.take());
        if !sfdisk.wait()?.success() {
            bail!("sfdisk failed to partition {}", raw.display());
        }
        let esp = scratch.join("esp");
        std::fs::File::create(&esp)?.set_len(esp_mib as u64 * 1024 * 1024)?;
        tool(
            "mkfs.vfat",
            &["-F", "32", "-n", "ESP", esp.to_str().context("utf-8")?],
        )?;
        let efi = scratch.join("efi/EFI/cairn");
        std::fs::create_dir_all(&efi)?;
        std::fs::write(
            efi.join("loader.conf"),
            "title cairn demo guest\nlinux /vmlinuz\n",
        )?;
        std::fs::write(efi.join("shimx64.efi"), pseudo_random(262_144, 11))?;
        let out = Process::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args([
                "-s",
                "-i",
                esp.to_str().context("utf-8")?,
                scratch.join("efi/EFI").to_str().context("utf-8")?,
                "::/",
            ])
            .output()
            .context("running mcopy")?;
        if !out.status.success() {
            bail!("mcopy: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let rootfs = scratch.join("rootfs");
        std::fs::File::create(&rootfs)?.set_len(root_mib as u64 * 1024 * 1024)?;
        tool(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-L",
                "root",
                "-d",
                root.to_str().context("utf-8")?,
                rootfs.to_str().context("utf-8")?,
            ],
        )?;
        let swap = scratch.join("swap");
        std::fs::write(&swap, pseudo_random(swap_mib as usize * 1024 * 1024, 7))?;
        tool("mkswap", &["-L", "swap", swap.to_str().context("utf-8")?])?;
        let mut offset = 1024 * 1024u64;
        for (part, mib) in [(&esp, esp_mib), (&rootfs, root_mib), (&swap, swap_mib)] {
            copy_sparse(part, &raw, offset)?;
            offset += mib as u64 * 1024 * 1024;
        }
    }
    let tmp = path.with_extension("building");
    let fmt = if format == "raw" { "raw" } else { format };
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            fmt,
            raw_s,
            tmp.to_str().context("utf-8")?,
        ],
    )?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Copies real files (16 KiB to 1 MiB) from /usr/share into `root` until `cap` bytes, plus the
/// /etc files a guest has.
fn fill_root(root: &Path, cap: u64) -> Result<()> {
    std::fs::create_dir_all(root.join("etc"))?;
    std::fs::write(
        root.join("etc/hosts"),
        "127.0.0.1 localhost\n10.0.0.5 db01.example.internal db01\n",
    )?;
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/bash\nadmin:x:1000:1000::/home/admin:/bin/bash\n",
    )?;
    let mut used = 0u64;
    let mut stack = vec![PathBuf::from("/usr/share")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let source = entry.path();
            if kind.is_dir() {
                stack.push(source);
            } else if kind.is_file() {
                let Ok(meta) = entry.metadata() else { continue };
                // Mid-sized files fill the disk quickly (few files, real content).
                if !(16 * 1024..=1024 * 1024).contains(&meta.len()) {
                    continue;
                }
                if used + meta.len() > cap {
                    return Ok(());
                }
                let relative = source.strip_prefix("/").expect("absolute");
                let target = root.join(relative);
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                if std::fs::copy(&source, &target).is_ok() {
                    used += meta.len();
                }
            }
        }
    }
    Ok(())
}

fn copy_sparse(from: &Path, to: &Path, offset: u64) -> Result<()> {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let mut input = std::fs::File::open(from)?;
    let output = std::fs::OpenOptions::new().write(true).open(to)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = offset;
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        if buf[..n].iter().any(|&b| b != 0) {
            output.write_all_at(&buf[..n], at)?;
        }
        at += n as u64;
    }
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
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
