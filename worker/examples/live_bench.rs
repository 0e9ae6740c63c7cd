//! Benchmark of live-VM backups: a full and an incremental backup of the same running disk in
//! the same run, through the `qemu` adapter's real steps (QMP snapshot, NBD transfer, release).
//!
//! `cargo run --release -p cairn-worker --example live_bench -- IMAGE.qcow2 [PERCENT] [SEED]`
//! (`ops/bench/live-bench.sh` builds the image). A `qemu-storage-daemon` serves the image as a
//! running VM; between the two backups the "guest" overwrites PERCENT (default 1) of the disk in
//! scattered 64 KiB blocks of random data through the daemon's writable NBD export, the way
//! `churn-disk` does on a file. Prints a markdown table: wall seconds and bytes read of each
//! backup, and their ratios; then restores the incremental and checks it byte for byte against
//! the guest's disk at its snapshot.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use cairn_schemas::ids::{DiskId, JobId, NodeId, RecoveryPointId, StepId};
use cairn_schemas::v1::{
    ConsistencyWanted, DiskSource, ImageFormat, ReportBody, StepResult, StepSpec, StepWork,
};
use cairn_worker::agent::{Agent, AgentConfig, Descriptor, DescriptorDisk, QemuVm};
use cairn_worker::nbd::{Client, ConnectOptions};
use cairn_worker::repo::Repository;

struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let image = PathBuf::from(
        args.first()
            .ok_or_else(|| anyhow::anyhow!("usage: live_bench IMAGE.qcow2 [PERCENT] [SEED]"))?,
    );
    let image = std::fs::canonicalize(&image)?;
    let percent: f64 = args.get(1).map_or(Ok(1.0), |p| p.parse())?;
    let seed: u64 = args.get(2).map_or(Ok(1), |s| s.parse())?;
    let work = tempfile::tempdir_in(image.parent().unwrap_or(Path::new("/var/tmp")))?;
    let dir = work.path();
    let (qmp, nbd) = (dir.join("qmp.sock"), dir.join("nbd.sock"));
    let _qsd = Qsd(Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            image.display()
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=disk0,file=file0")
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
        .arg("--export")
        .arg("type=nbd,id=guest,node-name=disk0,name=guest,writable=on")
        .arg("--chardev")
        .arg(format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            qmp.display()
        ))
        .arg("--monitor")
        .arg("chardev=qmp0")
        .stdin(Stdio::null())
        .spawn()?);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(qmp.exists() && nbd.exists()) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let repo = dir.join("repo");
    Repository::init(&repo, 64 * 1024, None)?;
    let vms = dir.join("vms");
    std::fs::create_dir(&vms)?;
    let descriptor = Descriptor {
        name: "bench".into(),
        uuid: "0190b2a4-6f0e-7c3a-9d1e-5b8f4a2c1d99".parse()?,
        disks: vec![DescriptorDisk {
            id: DiskId::new("disk0")?,
            path: image.clone(),
            format: Some(ImageFormat::Qcow2),
            node: Some("disk0".into()),
        }],
        power: cairn_schemas::v1::PowerState::Running,
        qemu: Some(QemuVm {
            qmp: qmp.clone(),
            nbd: Some(nbd.clone()),
            guest_agent: None,
            scratch: None,
            replica: None,
        }),
    };
    cairn_worker::agent::descriptor::write_descriptor(&vms, &descriptor)?;
    let agent = Agent::new(AgentConfig {
        node: NodeId::new("bench")?,
        vms_dir: vms,
        key_file: None,
        threads: 0,
        settings: cairn_worker::boundary::NodeSettings {
            image_roots: vec![std::env::temp_dir()],
            ..Default::default()
        }
        .with_repository("bench", &repo, cairn_worker::boundary::Encryption::None),
    })?;
    let inventory = agent.inventory();
    anyhow::ensure!(inventory.problems.is_empty(), "{:?}", inventory.problems);
    let vm = inventory.vms[0].clone();
    let size = vm.disks[0].size_bytes;
    let mut n = 0u64;
    let mut run = |job: JobId, work: StepWork| -> anyhow::Result<StepResult> {
        n += 1;
        let spec = StepSpec {
            step: StepId::new_v7(1_700_000_000_000 + n, [n as u8; 10]),
            attempt: 1,
            job,
            partition: 0,
            epoch: 1,
            node: NodeId::new("bench")?,
            vm: vm.vm,
            work,
        };
        match agent.execute(&spec, &mut |_| {}, &AtomicBool::new(false)) {
            ReportBody::Succeeded { result } => Ok(result),
            other => anyhow::bail!("{:?}: {other:?}", spec.kind()),
        }
    };
    let rp_of = |job: JobId| RecoveryPointId::from_bytes(*job.as_bytes()).expect("v7");
    // One backup: snapshot, transfer, release; timed end to end.
    let mut backup =
        |job: JobId, parent: Option<(JobId, String)>| -> anyhow::Result<(f64, u64, bool, String)> {
            let started = Instant::now();
            let StepResult::Snapshot {
                snapshot, tracking, ..
            } = run(
                job,
                StepWork::Snapshot {
                    vm_name: vm.name.clone(),
                    disks: vec![DiskSource::from(vm.disks[0].clone())],
                    consistency: ConsistencyWanted::CrashOnly,
                },
            )?
            else {
                anyhow::bail!("not a snapshot result");
            };
            let snapped = started.elapsed().as_secs_f64();
            let StepResult::Transfer {
                bytes_read,
                incremental,
                ..
            } = run(
                job,
                StepWork::Transfer {
                    source: vm.disks[0].clone().into(),
                    snapshot: snapshot.clone(),
                    repository: repo.to_string_lossy().into_owned(),
                    rp: rp_of(job),
                    parent_rp: parent.as_ref().map(|(j, _)| rp_of(*j)),
                    change_tracking: parent.map(|(_, b)| b),
                    chunk_size: 65536,
                },
            )?
            else {
                anyhow::bail!("not a transfer result");
            };
            let transferred = started.elapsed().as_secs_f64();
            run(job, StepWork::ReleaseSnapshot { snapshot })?;
            eprintln!(
                "  snapshot {snapped:.3} s, transfer {:.3} s, release {:.3} s",
                transferred - snapped,
                started.elapsed().as_secs_f64() - transferred
            );
            Ok((
                started.elapsed().as_secs_f64(),
                bytes_read,
                incremental,
                tracking[0].bitmap.clone(),
            ))
        };
    let job1 = JobId::new_v7(1_700_000_000_000, [1; 10]);
    let job2 = JobId::new_v7(1_700_000_060_000, [2; 10]);
    let (full_s, full_read, _, bitmap) = backup(job1, None)?;
    eprintln!("full backup: {full_s:.2} s, {full_read} bytes read");

    // The guest's writes: scattered 64 KiB blocks of random data through NBD.
    let block = 64 * 1024u64;
    let blocks = size / block;
    let count = ((blocks as f64 * percent / 100.0) as u64).max(1);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < count {
        chosen.insert(next() % blocks);
    }
    let mut guest = Client::connect_unix(&nbd, &ConnectOptions::new("guest"))?;
    let mut data = vec![0u8; block as usize];
    for b in &chosen {
        for word in data.chunks_exact_mut(8) {
            word.copy_from_slice(&next().to_le_bytes());
        }
        guest.write_at(b * block, &data)?;
    }
    guest.flush()?;
    drop(guest);
    let expected = dir.join("at-snapshot.raw");
    let convert = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd+unix:///guest?socket={}", nbd.display()))
        .arg(&expected)
        .status()?;
    anyhow::ensure!(convert.success(), "qemu-img convert failed");

    let (incr_s, incr_read, incremental, _) = backup(job2, Some((job1, bitmap)))?;
    anyhow::ensure!(incremental, "the second backup was not incremental");
    eprintln!("incremental backup: {incr_s:.2} s, {incr_read} bytes read");

    let restored = dir.join("restored.raw");
    run(
        job2,
        StepWork::Restore {
            disk: DiskId::new("disk0")?,
            repository: repo.to_string_lossy().into_owned(),
            rp: rp_of(job2),
            target_path: restored.to_string_lossy().into_owned(),
            target_format: ImageFormat::Raw,
        },
    )?;
    let same = Command::new("cmp").arg(&expected).arg(&restored).status()?;
    anyhow::ensure!(
        same.success(),
        "the restored incremental differs from the disk at its snapshot"
    );

    let churn = count * block;
    let read_share = incr_read as f64 / size as f64 * 100.0;
    let speedup = full_s / incr_s;
    println!("| measurement | value | goal |");
    println!("|---|---:|---|");
    println!(
        "| disk | {} MiB qcow2, {} MiB churn in {count} writes of 64 KiB | |",
        size >> 20,
        churn >> 20
    );
    println!(
        "| full backup (snapshot → release) | {full_s:.2} s, {} MiB read | baseline |",
        full_read >> 20
    );
    println!(
        "| incremental backup (snapshot → release) | {incr_s:.3} s, {:.1} MiB read | |",
        incr_read as f64 / (1 << 20) as f64
    );
    println!(
        "| incremental reads | {read_share:.2}% of the disk | ≤ 2%: {} |",
        if read_share <= 2.0 { "PASS" } else { "FAIL" }
    );
    println!(
        "| full / incremental time | {speedup:.1}× | ≥ 20×: {} |",
        if speedup >= 20.0 { "PASS" } else { "FAIL" }
    );
    println!("| restored incremental = disk at its snapshot | yes (cmp) | |");
    Ok(())
}
