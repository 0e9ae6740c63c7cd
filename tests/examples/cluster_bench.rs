//! Benchmarks of the distributed mode, reported in BENCHMARKS.md ("Distributed: failover and
//! 10,000 VMs"). Everything runs for real on loopback ports in a temporary folder: a
//! `nats-server` with JetStream, the release `cairn orchestrator` processes, and either a real
//! `cairn worker` (failover) or a load generator that plays many nodes through the real bus
//! API (`WorkerBus`), answering every step at once with a plausible successful report.
//!
//! ```text
//! cargo build --release -p cairn
//! cargo run --release -p cairn-tests --example cluster_bench -- failover [RUNS]
//! cargo run --release -p cairn-tests --example cluster_bench -- load [SECONDS] [NODES] [VMS_PER_NODE]
//! ```
//!
//! `failover`: two orchestrators (default lease TTL), one worker with 40 small VMs whose
//! transfers take 4 s; backups of every VM; `kill -9` of one orchestrator while its jobs run;
//! the time until the survivor has appended an event to every unfinished job of the dead
//! instance's partitions, and until they all succeeded.
//!
//! `load`: one orchestrator, 50 nodes × 200 VMs, backups requested at 10,000 per hour; the
//! orchestrator's CPU time and memory against the nats-server's and the load generator's in
//! the same window.
//!
//! A benchmark program, not a test: it measures and prints, it asserts only what must hold
//! for the numbers to mean anything (every job succeeded, one recovery point each).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroU16;
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_orchestrator::bus::{self, LeaseValue, NatsOptions, WorkerBus};
use cairn_schemas::{
    Command as CairnCommand, Consistency, DiskId, DiskInfo, DiskTracking, FailureClass,
    ImageFormat, NodeId, PowerState, ReportBody, StepResult, StepSpec, StepWork, VmId, VmInventory,
};
use cairn_tests::nats::NatsServer;
use cairn_tests::{cairn_bin, cairn_ok, http, random_file, spawn_cairn, write_vm};
use serde_json::Value;

const PARTITIONS: u16 = 16;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map(String::as_str).unwrap_or("");
    let num = |i: usize, default: u64| -> Result<u64> {
        args.get(i)
            .map(|a| a.parse().with_context(|| format!("argument {a:?}")))
            .transpose()
            .map(|v| v.unwrap_or(default))
    };
    println!("cairn binary: {}", cairn_bin().display());
    println!("{}", machine_load());
    match which {
        "failover" => failover(num(1, 3)? as usize),
        "load" => load(num(1, 300)?, num(2, 50)? as usize, num(3, 200)? as usize),
        _ => bail!("usage: cluster_bench failover [RUNS] | load [SECONDS] [NODES] [VMS_PER_NODE]"),
    }
}

// ---------------------------------------------------------------------------------------------
// Processes and measurements

fn now_ms() -> u64 {
    cairn_orchestrator::clock::wall_ms()
}

fn machine_load() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("machine: {cores} cores, load average {}", load.trim())
}

/// A `cairn` process logging to a file; killed on drop.
struct Proc {
    child: Child,
    addr: Option<String>,
}

impl Proc {
    fn spawn(args: &[String], log: &Path, env: &[(&str, &str)]) -> Result<Proc> {
        let out = std::fs::File::create(log)?;
        let (child, rx) = spawn_cairn(args, out, env).context("cairn starts")?;
        let mut proc = Proc { child, addr: None };
        if args[0] == "orchestrator" {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let line = rx.recv_timeout(left).with_context(|| {
                    format!(
                        "orchestrator did not start; log:\n{}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    )
                })?;
                if let Some(rest) = line.strip_prefix("cairn orchestrator is up: API on http://") {
                    proc.addr = Some(rest.split(',').next().unwrap_or_default().to_string());
                    break;
                }
            }
        }
        Ok(proc)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn addr(&self) -> &str {
        self.addr.as_deref().expect("an orchestrator")
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// CPU time (user + system) of a process in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name and state.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

/// `VmRSS` and `VmHWM` of a process, in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The pid of the nats-server whose command line names a file under `dir`.
fn nats_pid(dir: &Path) -> Result<u32> {
    let needle = dir.display().to_string();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("nats-server") && cmdline.contains(&needle) {
            return Ok(pid);
        }
    }
    bail!("no nats-server process for {}", dir.display())
}

fn get(addr: &str, path: &str) -> Result<Value> {
    let (status, body) = http(addr, "GET", path, None);
    if status != 200 {
        bail!("GET {path}: {status} {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("GET {path}: bad JSON"))
}

fn request_backup(addr: &str, vm: &str) -> Result<String> {
    let (status, body) = http(addr, "POST", &format!("/v1/vms/{vm}/backup"), Some("{}"));
    if status != 202 {
        bail!("backup of {vm}: {status} {body}");
    }
    let v: Value = serde_json::from_str(&body)?;
    Ok(v["id"].as_str().context("job id")?.to_string())
}

/// Reads events from `addr` starting at a cursor.
struct EventReader {
    addr: String,
    from: u64,
    errors: u64,
}

impl EventReader {
    /// Every event appended since the last call; a failed page is counted and retried at
    /// the next call (the events endpoint can fail under load, see BENCHMARKS.md).
    fn poll(&mut self) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        loop {
            let path = format!("/v1/events?from={}&limit=1000", self.from);
            let page = match get(&self.addr, &path) {
                Ok(page) => page,
                Err(e) => {
                    self.errors += 1;
                    if self.errors <= 3 {
                        eprintln!("events page failed ({} so far): {e:#}", self.errors);
                    }
                    return Ok(out);
                }
            };
            let events = page["events"].as_array().cloned().unwrap_or_default();
            if events.is_empty() {
                return Ok(out);
            }
            self.from = page["next_from"].as_u64().context("next_from")?;
            let full = events.len() == 1000;
            out.extend(events);
            if !full {
                return Ok(out);
            }
        }
    }
}

fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn vm_ids(addr: &str, expected: usize, timeout: Duration) -> Result<BTreeMap<String, String>> {
    wait_for(timeout, "every VM in the inventory", || {
        let vms = get(addr, "/v1/vms")?;
        let ids: BTreeMap<String, String> = vms
            .as_array()
            .context("VM list")?
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap_or_default().to_string(),
                    v["vm"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        Ok((ids.len() >= expected).then_some(ids))
    })
}

/// Partition → owning instance, from KV `CAIRN_LEASES`.
async fn lease_owners(client: &async_nats::Client) -> Result<BTreeMap<u16, String>> {
    let js = bus::jetstream(client);
    let kv = js.get_key_value(bus::LEASES_BUCKET).await?;
    let mut owners = BTreeMap::new();
    for p in 0..PARTITIONS {
        if let Some(bytes) = kv.get(bus::lease_key(p)).await? {
            let lease = LeaseValue::decode(&bytes)?;
            owners.insert(p, lease.instance);
        }
    }
    Ok(owners)
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

// ---------------------------------------------------------------------------------------------
// Failover

const FAILOVER_VMS: usize = 40;

struct FailoverRun {
    jobs_of_dead: usize,
    driven_again_s: f64,
    succeeded_s: f64,
}

fn failover(runs: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut results = Vec::new();
    for run in 1..=runs {
        let r = failover_run(&rt, run)?;
        println!(
            "run {run}: {} unfinished jobs on the killed instance's partitions; all driven \
             again by the survivor after {:.2} s, all succeeded after {:.2} s",
            r.jobs_of_dead, r.driven_again_s, r.succeeded_s
        );
        results.push(r);
    }
    let (a, b, c) = stats(results.iter().map(|r| r.driven_again_s).collect());
    let (d, e, f) = stats(results.iter().map(|r| r.succeeded_s).collect());
    println!(
        "kill -9 → every job of the dead instance driven again: min {a:.2} s, median {b:.2} s, max {c:.2} s (goal ≤ 10 s)"
    );
    println!(
        "kill -9 → all of them Succeeded:                      min {d:.2} s, median {e:.2} s, max {f:.2} s"
    );
    println!(
        "jobs of the dead instance per run: {:?}",
        results.iter().map(|r| r.jobs_of_dead).collect::<Vec<_>>()
    );
    Ok(())
}

fn failover_run(rt: &tokio::runtime::Runtime, run: usize) -> Result<FailoverRun> {
    let dir = tempfile::tempdir()?;
    let result = failover_in(rt, run, dir.path());
    if result.is_err() {
        eprintln!("logs kept in {}", dir.keep().display());
    }
    result
}

fn failover_in(rt: &tokio::runtime::Runtime, run: usize, root: &Path) -> Result<FailoverRun> {
    let nats = NatsServer::start(root);
    let repo = root.join("repo");
    cairn_ok(&["repo", "init", repo.to_str().context("utf-8")?]);
    let vms_dir = root.join("vms");
    for i in 0..FAILOVER_VMS {
        let name = format!("vm-{i}");
        let disk = root.join("disks").join(format!("{name}.raw"));
        std::fs::create_dir_all(disk.parent().expect("parent"))?;
        // 1 to 2 MiB.
        random_file(
            &disk,
            (1 << 20) + (i as u64 % 5) * (256 << 10),
            (run * 1000 + i) as u64,
        );
        let uuid = format!("6f1c2d3e-4a5b-4c6d-8e7f-{:012x}", i + 1);
        write_vm(&vms_dir, &name, &uuid, &[("disk0", &disk)]);
    }
    let s = |p: &Path| p.display().to_string();
    let orchestrator = |name: &str| -> Result<Proc> {
        let args: Vec<String> = [
            "orchestrator",
            "--nats",
            &nats.url(),
            "--listen",
            "127.0.0.1:0",
            "--instance",
            name,
            "--data-dir",
            &s(&root.join(name)),
            "--repository",
            &s(&repo),
            "--backups-per-node",
            "64",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        Proc::spawn(&args, &root.join(format!("{name}.log")), &[])
    };
    let mut o0 = orchestrator("o0")?;
    let o1 = orchestrator("o1")?;
    let worker_args: Vec<String> = [
        "worker",
        "--nats",
        &nats.url(),
        "--node",
        "kvm-0",
        "--vms",
        &s(&vms_dir),
        "--parallel",
        "64",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let _worker = Proc::spawn(
        &worker_args,
        &root.join("kvm-0.log"),
        &[("CAIRN_FAULT_STEP_DELAY_MS", "Transfer=4000")],
    )?;
    let survivor = o1.addr().to_string();
    let ids = vm_ids(&survivor, FAILOVER_VMS, Duration::from_secs(90))?;
    let client = rt.block_on(bus::connect(&NatsOptions {
        url: nats.url(),
        name: "cluster-bench".into(),
        ..Default::default()
    }))?;
    // Both instances hold their fair share before the backups start.
    wait_for(Duration::from_secs(60), "the partitions shared 8/8", || {
        let owners = rt.block_on(lease_owners(&client))?;
        let o0n = owners.values().filter(|i| *i == "o0").count();
        let o1n = owners.values().filter(|i| *i == "o1").count();
        Ok((o0n == 8 && o1n == 8).then_some(()))
    })?;

    let mut events = EventReader {
        addr: survivor.clone(),
        from: 0,
        errors: 0,
    };
    let mut job_vm: HashMap<String, String> = HashMap::new();
    for (i, vm) in ids.values().enumerate() {
        let api = if i % 2 == 0 { o0.addr() } else { o1.addr() };
        job_vm.insert(request_backup(api, vm)?, vm.clone());
    }
    // Jobs are running on both instances: both dispatched steps, and at least a quarter of
    // the jobs have their transfer (second step) started.
    let mut started: HashMap<String, usize> = HashMap::new();
    let mut dispatchers: BTreeSet<String> = BTreeSet::new();
    let mut succeeded_before: BTreeSet<String> = BTreeSet::new();
    let mut last_seq = 0u64;
    wait_for(
        Duration::from_secs(120),
        "jobs running on both instances",
        || {
            for e in events.poll()? {
                last_seq = e["seq"].as_u64().unwrap_or(last_seq);
                let Some(job) = e["correlation"].as_str() else {
                    continue;
                };
                match e["name"].as_str() {
                    Some("StepStarted") => {
                        *started.entry(job.to_string()).or_default() += 1;
                    }
                    Some("StepDispatched") => {
                        dispatchers.insert(e["actor"].as_str().unwrap_or_default().to_string());
                    }
                    Some("JobSucceeded") => {
                        succeeded_before.insert(job.to_string());
                    }
                    _ => {}
                }
            }
            let transfers = started.values().filter(|n| **n >= 2).count();
            Ok((dispatchers.len() >= 2 && transfers * 4 >= FAILOVER_VMS).then_some(()))
        },
    )?;
    let owners = rt.block_on(lease_owners(&client))?;
    let dead_partitions: BTreeSet<u16> = owners
        .iter()
        .filter(|(_, i)| *i == "o0")
        .map(|(p, _)| *p)
        .collect();
    let n = NonZeroU16::new(PARTITIONS).expect("non-zero");
    let dead_jobs: BTreeSet<String> = job_vm
        .iter()
        .filter(|(job, vm)| {
            let vm: VmId = vm.parse().expect("VM id");
            dead_partitions.contains(&cairn_schemas::subjects::partition_of_vm(&vm, n))
                && !succeeded_before.contains(*job)
        })
        .map(|(job, _)| job.clone())
        .collect();
    let killed_ms = now_ms();
    o0.kill9();
    println!(
        "run {run}: killed o0 (partitions {dead_partitions:?}) with {} of its jobs unfinished, \
         {} jobs succeeded before",
        dead_jobs.len(),
        succeeded_before.len()
    );

    // Poll the survivor's events: the first event it appends to each dead job, and each job's
    // JobSucceeded; times are the events' `recorded_at` against the kill.
    let mut driven: HashMap<String, u64> = HashMap::new();
    let mut done: HashMap<String, u64> = HashMap::new();
    wait_for(Duration::from_secs(180), "every job succeeded", || {
        for e in events.poll()? {
            let Some(job) = e["correlation"].as_str() else {
                continue;
            };
            let at = e["recorded_at"].as_u64().unwrap_or(0);
            let seq = e["seq"].as_u64().unwrap_or(0);
            if seq > last_seq && e["actor"] == "orchestrator/o1" && dead_jobs.contains(job) {
                driven.entry(job.to_string()).or_insert(at);
            }
            match e["name"].as_str() {
                Some("JobSucceeded") => {
                    done.insert(job.to_string(), at);
                }
                Some("JobFailed") | Some("JobCancelled") => {
                    bail!("job {job} ended {}: {e}", e["name"]);
                }
                _ => {}
            }
        }
        Ok((done.len() + succeeded_before.len() >= job_vm.len()).then_some(()))
    })?;
    let since_kill = |at: u64| at.saturating_sub(killed_ms) as f64 / 1000.0;
    let driven_again_s = dead_jobs
        .iter()
        .map(|j| driven.get(j).map_or(f64::NAN, |at| since_kill(*at)))
        .fold(0.0, f64::max);
    if dead_jobs.iter().any(|j| !driven.contains_key(j)) {
        bail!("a job of the dead instance got no event from the survivor");
    }
    let succeeded_s = dead_jobs
        .iter()
        .map(|j| since_kill(done[j]))
        .fold(0.0, f64::max);
    // One recovery point per VM.
    for vm in ids.values() {
        let rps = get(&survivor, &format!("/v1/vms/{vm}/recovery-points"))?;
        let n = rps.as_array().map_or(0, Vec::len);
        if n != 1 {
            bail!("VM {vm} has {n} recovery points");
        }
    }
    drop(o1);
    Ok(FailoverRun {
        jobs_of_dead: dead_jobs.len(),
        driven_again_s,
        succeeded_s,
    })
}

// ---------------------------------------------------------------------------------------------
// 10,000 VMs

/// The successful result a worker would report for `spec`.
fn plausible_result(spec: &StepSpec) -> ReportBody {
    let result = match &spec.work {
        StepWork::Snapshot { disks, .. } => StepResult::Snapshot {
            snapshot: format!("cairn-snap-{}", spec.step),
            consistency: Consistency::Crash,
            tracking: disks
                .iter()
                .map(|d| DiskTracking {
                    disk: d.disk.clone(),
                    bitmap: format!("cairn-{}", spec.job),
                })
                .collect(),
        },
        StepWork::Transfer {
            source, parent_rp, ..
        } => StepResult::Transfer {
            disk: source.disk.clone(),
            // A day's change of a 100 GiB disk: about 2 % read, half of it stored.
            bytes_read: source.size_bytes / 50,
            bytes_stored: source.size_bytes / 100,
            incremental: parent_rp.is_some(),
        },
        StepWork::ReleaseSnapshot { .. } => StepResult::ReleaseSnapshot,
        StepWork::CommitRecoveryPoint { .. } => StepResult::CommitRecoveryPoint,
        other => {
            return ReportBody::Failed {
                class: FailureClass::Permanent,
                message: format!("the load generator does not play {other:?}"),
            };
        }
    };
    ReportBody::Succeeded { result }
}

/// One simulated node: registers, reports its VMs, then answers every step at once
/// (`Started`, then the final `Succeeded`), acknowledging the step after the report is durable.
async fn play_node(
    url: String,
    index: usize,
    vms: usize,
    steps: Arc<AtomicU64>,
    ready: Arc<AtomicU64>,
) -> Result<()> {
    let node = NodeId::new(format!("kvm-{index:02}"))?;
    let client = bus::connect(&NatsOptions {
        url,
        name: format!("cairn-worker-{node}"),
        ..Default::default()
    })
    .await?;
    let bus = Arc::new(WorkerBus::connect(client, node.clone(), 3).await?);
    bus.send_command(
        CairnCommand::RegisterNode {
            node: node.clone(),
            cluster: "default".into(),
            worker_version: env!("CARGO_PKG_VERSION").into(),
        },
        Duration::from_secs(60),
    )
    .await?;
    let inventory: Vec<VmInventory> = (0..vms)
        .map(|i| {
            let mut rand = [0u8; 10];
            rand[..4].copy_from_slice(&(index as u32).to_be_bytes());
            rand[4..8].copy_from_slice(&(i as u32).to_be_bytes());
            VmInventory {
                vm: VmId::new_v7(1_700_000_000_000, rand),
                name: format!("vm-{index:02}-{i:03}"),
                disks: vec![DiskInfo {
                    disk: "disk0".parse::<DiskId>().expect("disk id"),
                    size_bytes: 100 << 30,
                    format: ImageFormat::Qcow2,
                    image_path: format!("/var/lib/libvirt/images/vm-{index:02}-{i:03}.qcow2"),
                }],
                power: PowerState::Running,
            }
        })
        .collect();
    bus.send_command(
        CairnCommand::ReportInventory {
            node: node.clone(),
            vms: inventory,
        },
        Duration::from_secs(60),
    )
    .await?;
    ready.fetch_add(1, Ordering::Relaxed);
    loop {
        let (spec, lease) = bus.next_step().await;
        bus.report(&spec.report(ReportBody::Started), false)
            .await
            .ok();
        bus.report(&spec.report(plausible_result(&spec)), true)
            .await?;
        lease.finish().await?;
        steps.fetch_add(1, Ordering::Relaxed);
    }
}

fn load(secs: u64, nodes: usize, per_node: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let result = load_in(secs, nodes, per_node, dir.path());
    if result.is_err() {
        eprintln!("logs kept in {}", dir.keep().display());
    }
    result
}

fn load_in(secs: u64, nodes: usize, per_node: usize, root: &Path) -> Result<()> {
    let total_vms = nodes * per_node;
    let nats = NatsServer::start(root);
    let nats_pid = nats_pid(&nats.dir)?;
    let args: Vec<String> = [
        "orchestrator",
        "--nats",
        &nats.url(),
        "--listen",
        "127.0.0.1:0",
        "--instance",
        "o0",
        "--data-dir",
        &root.join("o0").display().to_string(),
        "--repository",
        &root.join("repo").display().to_string(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let orchestrator = Proc::spawn(&args, &root.join("o0.log"), &[])?;
    let pid = orchestrator.pid();
    let addr = orchestrator.addr().to_string();

    // The load generator: its own runtime on two threads (the machine's cores).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let steps = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(AtomicU64::new(0));
    let setup_started = Instant::now();
    let setup_cpu = cpu_secs(pid);
    let mut players = Vec::new();
    for index in 0..nodes {
        players.push(rt.spawn(play_node(
            nats.url(),
            index,
            per_node,
            steps.clone(),
            ready.clone(),
        )));
    }
    wait_for(Duration::from_secs(600), "every node registered", || {
        if players.iter().any(|p| p.is_finished()) {
            bail!("a simulated node stopped early (connect, register or inventory failed)");
        }
        Ok((ready.load(Ordering::Relaxed) as usize == nodes).then_some(()))
    })?;
    let ids = vm_ids(&addr, total_vms, Duration::from_secs(600))?;
    let setup_s = setup_started.elapsed().as_secs_f64();
    println!(
        "setup: {nodes} nodes × {per_node} VMs registered in {setup_s:.1} s, orchestrator CPU \
         {:.1} s",
        cpu_secs(pid) - setup_cpu
    );
    let vms: Vec<String> = ids.into_values().collect();
    // Settle: heartbeats and registrations behind us.
    std::thread::sleep(Duration::from_secs(5));

    // Event watcher: counts events and records each job's JobSucceeded time.
    let mut reader = EventReader {
        addr: addr.clone(),
        from: 0,
        errors: 0,
    };
    let before = reader.poll()?.len();
    let stop = Arc::new(AtomicBool::new(false));
    let succeeded: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let event_count = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (stop, succeeded, event_count) = (stop.clone(), succeeded.clone(), event_count.clone());
        std::thread::spawn(move || -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                for e in reader.poll()? {
                    event_count.fetch_add(1, Ordering::Relaxed);
                    if e["name"] == "JobSucceeded"
                        && let Some(job) = e["correlation"].as_str()
                    {
                        let at = e["recorded_at"].as_u64().unwrap_or(0);
                        succeeded.lock().expect("map").insert(job.to_string(), at);
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            Ok(())
        })
    };

    // Steady phase: backups at 10,000 per hour (one every 360 ms), round robin over the VMs.
    let interval = Duration::from_secs_f64(3600.0 / 10_000.0);
    let cpu0 = (
        cpu_secs(pid),
        cpu_secs(nats_pid),
        cpu_secs(std::process::id()),
    );
    let steps0 = steps.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut requested: Vec<(String, u64)> = Vec::new();
    let mut peak_rss = 0.0f64;
    let mut next = started;
    let mut next_sample = started;
    while started.elapsed() < Duration::from_secs(secs) {
        let now = Instant::now();
        if now >= next {
            let vm = &vms[requested.len() % vms.len()];
            let at = now_ms();
            requested.push((request_backup(&addr, vm)?, at));
            next += interval;
        }
        if now >= next_sample {
            peak_rss = peak_rss.max(memory_mib(pid).0);
            next_sample += Duration::from_secs(1);
        }
        std::thread::sleep(
            next.min(next_sample)
                .saturating_duration_since(Instant::now()),
        );
    }
    let window = started.elapsed().as_secs_f64();
    let cpu1 = (
        cpu_secs(pid),
        cpu_secs(nats_pid),
        cpu_secs(std::process::id()),
    );
    let steps_in_window = steps.load(Ordering::Relaxed) - steps0;
    let (rss, hwm) = memory_mib(pid);
    let done_in_window = {
        let map = succeeded.lock().expect("map");
        requested
            .iter()
            .filter(|(j, _)| map.contains_key(j))
            .count()
    };
    // Let the last jobs finish (not part of the CPU window).
    let _ = wait_for(Duration::from_secs(60), "the last jobs", || {
        let map = succeeded.lock().expect("map");
        Ok(requested
            .iter()
            .all(|(j, _)| map.contains_key(j))
            .then_some(()))
    });
    stop.store(true, Ordering::Relaxed);
    watcher.join().expect("watcher thread")?;
    let map = succeeded.lock().expect("map").clone();
    let mut latencies: Vec<f64> = requested
        .iter()
        .filter_map(|(j, at)| {
            map.get(j)
                .map(|done| done.saturating_sub(*at) as f64 / 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let orch_pct = (cpu1.0 - cpu0.0) / window * 100.0;
    let nats_pct = (cpu1.1 - cpu0.1) / window * 100.0;
    let gen_pct = (cpu1.2 - cpu0.2) / window * 100.0;
    let events = event_count.load(Ordering::Relaxed);
    println!("{}", machine_load());
    println!(
        "steady phase: {window:.0} s, {} backups requested ({:.2}/s)",
        requested.len(),
        requested.len() as f64 / window
    );
    println!(
        "orchestrator CPU: {orch_pct:.1} % of one core; RSS {rss:.0} MiB at the end, peak sampled {peak_rss:.0} MiB, VmHWM {hwm:.0} MiB"
    );
    println!(
        "nats-server CPU:  {nats_pct:.1} % of one core (ratio orchestrator/nats-server {:.2})",
        orch_pct / nats_pct
    );
    println!(
        "load generator CPU (bench process, {nodes} simulated nodes + HTTP client): {gen_pct:.1} % (ratio orchestrator/generator {:.2})",
        orch_pct / gen_pct
    );
    println!(
        "events appended in the window (and the drain): {events} ({:.1}/s); {before} events before (registration)",
        events as f64 / window
    );
    println!("steps answered in the window: {steps_in_window}");
    println!(
        "jobs: {} requested, {done_in_window} succeeded within the window, {} after the drain",
        requested.len(),
        latencies.len()
    );
    println!(
        "request → Succeeded: p50 {:.2} s, p99 {:.2} s, max {:.2} s",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    for p in players {
        p.abort();
    }
    drop(rt);
    drop(orchestrator);
    Ok(())
}
