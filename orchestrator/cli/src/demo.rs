//! `cairn up --demo`: two small VMs with realistic disks (GPT, EFI system partition, ext4 root
//! full of real files, swap), a protection group with a short schedule, and their first
//! backups, so a newcomer sees cairn work within a minute.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_orchestrator::engine::service::Handle;
use cairn_orchestrator::log::SledLog;
use cairn_schemas::{Command, GroupPolicy, NodeId, SyncFrequency};
use cairn_vmdisk::{DiskSpec, ImageLayout};
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
    std::fs::create_dir_all(&images).with_context(|| format!("creating {}", images.display()))?;
    let mut seed = 0;
    for vm in &VMS {
        let mut disks = Vec::new();
        for (id, mib, format) in vm.disks {
            seed += 1;
            let path = images.join(format!("{}-{id}.{format}", vm.name));
            if !path.exists() {
                println!(
                    "demo: building {} ({mib} MiB {format} disk of VM {})",
                    path.display(),
                    vm.name
                );
                let (path2, format2, mib2) = (path.clone(), format.to_string(), *mib);
                tokio::task::spawn_blocking(move || build_disk(&path2, mib2, &format2, seed))
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
        let mut policy = GroupPolicy::with_defaults(crate::up::REPOSITORY_NAME.to_string());
        policy.retention_days = 7;
        policy.sync = SyncFrequency::EveryMinutes(15);
        let group = cairn_orchestrator::control::Control::new_group_id(handle);
        handle
            .submit_as(
                "demo".into(),
                None,
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
    println!(
        "  cairn restore web01 --rp <RP> --to {} --wait --server {server}",
        data.join("recovered").join("web01").display()
    );
    println!("  cairn events tail --server {server}");
    Ok(())
}

/// Builds a realistic disk image with `cairn-vmdisk`: GPT with an EFI system partition
/// (FAT32), an ext4 root filled with real files from /usr/share, and random swap; or, for a
/// `raw` data disk, an ext4 file system over the whole disk.
fn build_disk(path: &Path, size_mib: u32, format: &str, seed: u64) -> Result<()> {
    let layout = if format == "raw" {
        ImageLayout::Ext4
    } else {
        ImageLayout::Gpt {
            esp_mib: 64,
            swap_mib: size_mib / 16,
        }
    };
    let spec = DiskSpec {
        size_mib,
        layout,
        sources: vec!["/usr/share".into()],
        // Mid-sized files fill the disk quickly: few files, real content.
        file_sizes: (16 * 1024, 1024 * 1024),
        fill_percent: 40,
        seed,
        format: format.into(),
    };
    cairn_vmdisk::build(
        &spec,
        path,
        &mut |stage| tracing::debug!(%stage, "demo disk"),
    )
    .with_context(|| format!("building the demo disk {}", path.display()))?;
    Ok(())
}
