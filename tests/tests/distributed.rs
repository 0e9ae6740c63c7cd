//! Distributed cairn end to end: real `nats-server` (single, and a three-node cluster),
//! several `cairn orchestrator` processes sharing the partitions through leases, one
//! `cairn worker` per node, VMs over real images, and a repository folder they share.
//! Processes and servers are killed with SIGKILL while backups run; every job must end
//! Succeeded with exactly one recovery point. The suite runs on NATS as `cairn ops nats-init`
//! sets it up (TLS, one identity per orchestrator and node, each process given its generated
//! `cairn.toml`) and on a plain development server; a node that forges a report for another
//! node through its own credentials is refused and alerted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use cairn_tests::nats::{NatsServer, SecureNats};
use cairn_tests::*;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A `cairn orchestrator` or `cairn worker` process, logging to a file; killed on drop.
struct Proc {
    child: Child,
    name: String,
    log: PathBuf,
    /// The API address (orchestrators).
    addr: Option<String>,
}

impl Proc {
    fn spawn(name: &str, args: &[String], log: &Path, env: &[(&str, &str)]) -> Proc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let (mut child, rx) = spawn_cairn(args, out, env).expect("cairn starts");
        let mut addr = None;
        if args[0] == "orchestrator" {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(line) => {
                        if let Some(rest) =
                            line.strip_prefix("cairn orchestrator is up: API on http://")
                        {
                            addr = Some(rest.split(',').next().expect("address").to_string());
                            break;
                        }
                    }
                    Err(_) => {
                        let _ = child.kill();
                        panic!(
                            "{name} did not start; log:\n{}",
                            std::fs::read_to_string(log).unwrap_or_default()
                        );
                    }
                }
            }
        }
        Proc {
            child,
            name: name.into(),
            log: log.into(),
            addr,
        }
    }

    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
        std::mem::forget(self);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("---- {} log (last lines) ----", self.name);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

fn get(addr: &str, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path, None);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: bad JSON {body:?}: {e}"))
}

/// How the lab's processes reach NATS.
enum LabNats {
    /// A plain server: `--nats URL`.
    Plain(String),
    /// A deployment made by `cairn ops nats-init`: each process gets its identity's
    /// generated `cairn.toml` (`[nats]` with TLS), which it reads with `--config`.
    Secure(PathBuf),
}

struct Lab {
    dir: tempfile::TempDir,
    repo: PathBuf,
    nats: LabNats,
}

impl Lab {
    /// `nodes` nodes with `per_node` VMs of one small random raw disk each, and a repository.
    fn new(nats: LabNats, nodes: usize, per_node: usize, dir: tempfile::TempDir) -> Lab {
        let repo = dir.path().join("repo");
        cairn_ok(&["repo", "init", s(&repo)]);
        for node in 0..nodes {
            for i in 0..per_node {
                let name = format!("vm-{node}-{i}");
                let disk = dir.path().join("disks").join(format!("{name}.raw"));
                std::fs::create_dir_all(disk.parent().unwrap()).unwrap();
                random_file(&disk, 2 << 20, (node * 100 + i) as u64);
                let uuid = format!("6f1c2d3e-4a5b-4c6d-8e7f-{:06x}{:06x}", node + 1, i + 1);
                write_vm(
                    &self_vms(dir.path(), node),
                    &name,
                    &uuid,
                    &[("disk0", &disk)],
                );
            }
        }
        Lab { dir, repo, nats }
    }

    /// The lab on `nats`'s generated identities.
    fn secure(nats: &SecureNats, nodes: usize, per_node: usize, dir: tempfile::TempDir) -> Lab {
        Lab::new(LabNats::Secure(nats.dir.clone()), nodes, per_node, dir)
    }

    /// `--nats URL`, or `--config FILE` with the identity's generated `[nats]` section
    /// followed by `extra` (the rest of a cairn.toml).
    fn nats_args(&self, identity: &str, extra: &str) -> Vec<String> {
        match &self.nats {
            LabNats::Plain(url) => {
                let mut args = vec!["--nats".to_string(), url.clone()];
                if !extra.is_empty() {
                    let file = self
                        .dir
                        .path()
                        .join(format!("{}.toml", identity.replace('/', "-")));
                    std::fs::write(&file, extra).unwrap();
                    args.extend(["--config".to_string(), s(&file).to_string()]);
                }
                args
            }
            LabNats::Secure(pki) => {
                let generated =
                    std::fs::read_to_string(pki.join(identity).join("cairn.toml")).unwrap();
                let file = self
                    .dir
                    .path()
                    .join(format!("{}.toml", identity.replace('/', "-")));
                std::fs::write(&file, format!("{generated}\n{extra}")).unwrap();
                vec!["--config".to_string(), s(&file).to_string()]
            }
        }
    }

    fn orchestrator(&self, index: usize, extra: &[&str]) -> Proc {
        let name = format!("o{index}");
        let data = self.dir.path().join(&name);
        let mut args: Vec<String> = vec!["orchestrator".to_string()];
        args.extend(self.nats_args(&format!("orchestrators/{name}"), ""));
        args.extend(
            [
                "--listen",
                "127.0.0.1:0",
                "--instance",
                &name,
                "--data-dir",
                s(&data),
                "--repository",
                s(&self.repo),
                "--heartbeat-timeout-secs",
                "15",
                "--bootstrap-token",
                s(&self.dir.path().join("admin.token")),
            ]
            .iter()
            .map(|a| a.to_string()),
        );
        args.extend(extra.iter().map(|a| a.to_string()));
        let log = self.dir.path().join(format!("{name}.log"));
        Proc::spawn(&name, &args, &log, &[])
    }

    fn worker(&self, node: usize, env: &[(&str, &str)]) -> Proc {
        let name = format!("kvm-{node}");
        let boundary = std::fs::read_to_string(worker_config(self.dir.path(), &self.repo)).unwrap();
        let mut args: Vec<String> = ["worker", "--node", &name, "--vms"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.push(s(&self_vms(self.dir.path(), node)).to_string());
        args.extend(self.nats_args(&format!("nodes/{name}"), &boundary));
        let log = self.dir.path().join(format!("{name}.log"));
        Proc::spawn(&name, &args, &log, env)
    }
}

fn self_vms(root: &Path, node: usize) -> PathBuf {
    root.join(format!("vms-{node}"))
}

/// VM name → VM id, once every VM is in the inventory.
fn vm_ids(addr: &str, expected: usize) -> BTreeMap<String, String> {
    let mut ids = BTreeMap::new();
    wait_until(Duration::from_secs(90), "every VM in the inventory", || {
        ids = get(addr, "/v1/vms")
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().to_string(),
                    v["vm"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        ids.len() == expected
    });
    ids
}

fn request_backup(addr: &str, vm: &str) -> String {
    let (status, body) = http(addr, "POST", &format!("/v1/vms/{vm}/backup"), Some("{}"));
    assert_eq!(status, 202, "backup of {vm} via {addr}: {body}");
    serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn job_state(addr: &str, job: &str) -> String {
    let (status, body) = http(addr, "GET", &format!("/v1/jobs/{job}"), None);
    if status != 200 {
        return String::new();
    }
    let job: Value = serde_json::from_str(&body).unwrap();
    job["state"].as_str().unwrap_or_default().to_string()
}

/// Waits until every job ended; fails on any job that did not succeed.
fn wait_all_succeeded(addr: &str, jobs: &[String], timeout: Duration) {
    wait_until(timeout, "every job to end", || {
        jobs.iter().all(|j| {
            let state = job_state(addr, j);
            assert!(
                state != "Failed" && state != "Cancelled",
                "job {j} ended {state}: {:#}",
                get(addr, &format!("/v1/jobs/{j}"))
            );
            state == "Succeeded"
        })
    });
}

/// Every event of the log, through one orchestrator's API.
fn all_events(addr: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut from = 0u64;
    loop {
        let page = get(addr, &format!("/v1/events?from={from}&limit=1000"));
        let events = page["events"].as_array().unwrap().clone();
        if events.is_empty() {
            return out;
        }
        from = page["next_from"].as_u64().unwrap();
        out.extend(events);
    }
}

/// Each VM has `per_vm` recovery points, each job made exactly one, the repository agrees
/// and verifies clean.
fn check_recovery_points(lab: &Lab, addr: &str, ids: &BTreeMap<String, String>, per_vm: usize) {
    let mut jobs_seen = BTreeSet::new();
    for (name, vm) in ids {
        let rps = get(addr, &format!("/v1/vms/{vm}/recovery-points"));
        let rps = rps.as_array().unwrap();
        assert_eq!(rps.len(), per_vm, "{name}: {rps:#?}");
        for rp in rps {
            assert!(
                jobs_seen.insert(rp["job"].as_str().unwrap().to_string()),
                "a job committed two recovery points: {rp}"
            );
        }
    }
    let listed = cairn_json(&["repo", "list", s(&lab.repo)]);
    assert_eq!(
        listed["recovery_points"].as_array().unwrap().len(),
        ids.len() * per_vm,
        "one recovery point per disk and backup in the repository"
    );
    assert_eq!(
        cairn(&["repo", "verify", s(&lab.repo)]).status.code(),
        Some(0)
    );
}

#[test]
fn three_orchestrators_and_three_workers_survive_kills_and_a_nats_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = SecureNats::start(
        dir.path(),
        1,
        &["o0", "o1", "o2"],
        &["kvm-0", "kvm-1", "kvm-2"],
    );
    let lab = Lab::secure(&nats, 3, 10, dir);
    // The orchestrators share one checkpoint folder; their generated cairn.toml gives them
    // the deployment's audit key.
    let checkpoints = lab.dir.path().join("checkpoints");
    let audit = [
        "--checkpoints",
        s(&checkpoints),
        "--checkpoint-every-events",
        "40",
    ];
    let mut orchestrators: Vec<Option<Proc>> =
        (0..3).map(|i| Some(lab.orchestrator(i, &audit))).collect();
    // Transfers take a second each, so kills land mid-backup.
    let slow = [("CAIRN_FAULT_STEP_DELAY_MS", "Transfer=1000")];
    let mut workers: Vec<Option<Proc>> = (0..3).map(|n| Some(lab.worker(n, &slow))).collect();
    let addr =
        |o: &[Option<Proc>], i: usize| -> String { o[i].as_ref().unwrap().addr.clone().unwrap() };
    let ids = vm_ids(&addr(&orchestrators, 0), 30);
    // The instances share the partitions before the load starts.
    wait_until(
        Duration::from_secs(60),
        "every orchestrator owning partitions",
        || {
            orchestrators.iter().all(|o| {
                let o = o.as_ref().unwrap();
                std::fs::read_to_string(&o.log).is_ok_and(|log| log.contains("owning partition"))
            })
        },
    );

    // Round 1: 30 backups requested through all three APIs; one orchestrator is killed
    // while they run.
    let mut jobs = Vec::new();
    for (i, vm) in ids.values().enumerate() {
        jobs.push(request_backup(&addr(&orchestrators, i % 3), vm));
    }
    let a0 = addr(&orchestrators, 0);
    wait_until(Duration::from_secs(60), "some backups running", || {
        jobs.iter()
            .filter(|j| job_state(&a0, j) == "Succeeded")
            .count()
            >= 3
    });
    let killed_at = Instant::now();
    orchestrators[1].take().unwrap().kill9();
    wait_all_succeeded(&a0, &jobs, Duration::from_secs(240));
    eprintln!(
        "round 1: all 30 jobs succeeded {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    check_recovery_points(&lab, &a0, &ids, 1);
    // The load was spread: steps were dispatched by every instance, including the one that
    // was killed (before it died) and the survivors (after).
    let events = all_events(&a0);
    let dispatchers: BTreeSet<String> = events
        .iter()
        .filter(|e| e["name"] == "StepDispatched")
        .map(|e| e["actor"].as_str().unwrap().to_string())
        .collect();
    assert!(
        dispatchers.len() >= 3,
        "steps dispatched by every orchestrator: {dispatchers:?}"
    );

    // The killed orchestrator comes back and gets a share again.
    orchestrators[1] = Some(lab.orchestrator(1, &audit));

    // A worker killed mid-transfer: its step is retried on that node when it returns.
    let node0_vm = &ids["vm-0-0"];
    workers[0].take().unwrap().kill9();
    workers[0] = Some(lab.worker(0, &[("CAIRN_FAULT_STEP_DELAY_MS", "Transfer=20000")]));
    let job = request_backup(&addr(&orchestrators, 2), node0_vm);
    wait_until(Duration::from_secs(60), "the transfer running", || {
        // The job was requested through another orchestrator: this one knows it once it has
        // applied the job's events from the log (404 until then).
        let (status, body) = http(&a0, "GET", &format!("/v1/jobs/{job}"), None);
        if status == 404 {
            return false;
        }
        assert_eq!(status, 200, "GET /v1/jobs/{job}: {body}");
        let j: Value = serde_json::from_str(&body).unwrap();
        j["steps"].as_array().unwrap().iter().any(|s| {
            s["kind"].as_str().unwrap_or("").starts_with("Transfer") && s["state"] == "Running"
        })
    });
    workers[0].take().unwrap().kill9();
    workers[0] = Some(lab.worker(0, &[]));
    wait_all_succeeded(&a0, std::slice::from_ref(&job), Duration::from_secs(180));
    let rps = get(&a0, &format!("/v1/vms/{node0_vm}/recovery-points"));
    assert_eq!(rps.as_array().unwrap().len(), 2);

    // nats-server killed and restarted in the middle of a round: nothing is lost.
    let mut round = Vec::new();
    for (i, (name, vm)) in ids.iter().enumerate() {
        if name != "vm-0-0" {
            round.push(request_backup(&addr(&orchestrators, i % 3), vm));
        }
    }
    nats.servers[0].kill9();
    nats.servers[0].restart();
    wait_all_succeeded(&a0, &round, Duration::from_secs(300));
    check_recovery_points(&lab, &a0, &ids, 2);
    // Every orchestrator sees the same log.
    let n = all_events(&a0).len();
    for i in 1..3 {
        let other = addr(&orchestrators, i);
        wait_until(Duration::from_secs(30), "the same log everywhere", || {
            all_events(&other).len() == n
        });
    }
    // The log is keyed, and matches the checkpoints the orchestrators signed while it grew.
    let report = get(&a0, "/v1/audit/verify");
    assert_eq!(report["ok"], true, "{report:#}");
    assert!(report["keyed_from"].is_u64(), "{report:#}");
    let signed = &report["checkpoints"];
    assert_eq!(signed["ok"], true, "{report:#}");
    assert!(signed["matched"].as_u64().unwrap() >= 2, "{report:#}");
    drop(workers);
}

#[test]
fn a_three_node_nats_cluster_keeps_working_with_one_node_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = SecureNats::start(dir.path(), 3, &["o0"], &["kvm-0"]);
    let lab = Lab::secure(&cluster, 1, 3, dir);
    let orchestrator = lab.orchestrator(0, &["--replicas", "3"]);
    let _worker = lab.worker(0, &[]);
    let addr = orchestrator.addr.clone().unwrap();
    let ids = vm_ids(&addr, 3);
    let jobs: Vec<String> = ids.values().map(|vm| request_backup(&addr, vm)).collect();
    wait_all_succeeded(&addr, &jobs, Duration::from_secs(120));
    cluster.servers[0].kill9();
    let jobs: Vec<String> = ids.values().map(|vm| request_backup(&addr, vm)).collect();
    wait_all_succeeded(&addr, &jobs, Duration::from_secs(180));
    check_recovery_points(&lab, &addr, &ids, 2);
}

/// POST a backup of `vm` through `addr` with `key`; the job id and whether it was replayed.
fn keyed_backup(addr: &str, vm: &str, key: &str) -> (String, bool) {
    let (status, body) = http_with(
        addr,
        token_for(addr).as_deref(),
        &[("Idempotency-Key", key)],
        "POST",
        &format!("/v1/vms/{vm}/backup"),
        Some("{}"),
    );
    assert_eq!(status, 202, "keyed backup of {vm} via {addr}: {body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    (
        answer["id"].as_str().unwrap().to_string(),
        answer["replayed"] == true,
    )
}

#[test]
fn a_post_repeated_through_each_of_two_orchestrators_makes_one_job() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path());
    let lab = Lab::new(LabNats::Plain(nats.url()), 1, 4, dir);
    let orchestrators = [lab.orchestrator(0, &[]), lab.orchestrator(1, &[])];
    let _worker = lab.worker(0, &[]);
    let [a, b] = orchestrators.each_ref().map(|o| o.addr.clone().unwrap());
    let ids = vm_ids(&a, 4);
    wait_until(
        Duration::from_secs(60),
        "both orchestrators owning partitions",
        || {
            orchestrators.iter().all(|o| {
                std::fs::read_to_string(&o.log).is_ok_and(|log| log.contains("owning partition"))
            })
        },
    );
    // Each VM's partition has one owner, so for every VM one of the two requests is
    // forwarded over NATS: first through A then B for half of them, the other way round for
    // the rest. Then once more through the first.
    let mut jobs = Vec::new();
    for (i, vm) in ids.values().enumerate() {
        let (first, second) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let key = format!("run-42-{i}");
        let (job, replayed) = keyed_backup(first, vm, &key);
        assert!(!replayed, "the first request of {vm} is new");
        assert_eq!(keyed_backup(second, vm, &key), (job.clone(), true), "{vm}");
        assert_eq!(keyed_backup(first, vm, &key), (job.clone(), true), "{vm}");
        jobs.push(job);
    }
    wait_all_succeeded(&a, &jobs, Duration::from_secs(120));
    let backups: Vec<String> = get(&b, "/v1/jobs")
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["kind"] == "Backup")
        .map(|j| j["job"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        backups.iter().collect::<BTreeSet<_>>(),
        jobs.iter().collect::<BTreeSet<_>>(),
        "one job per VM, whichever orchestrator was asked"
    );
    assert_eq!(backups.len(), 4, "{backups:?}");
}

#[test]
fn a_token_revoked_through_one_orchestrator_is_refused_by_the_other_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path());
    let lab = Lab::new(LabNats::Plain(nats.url()), 0, 0, dir);
    let a = lab.orchestrator(0, &[]);
    let b = lab.orchestrator(1, &[]);
    let (a, b) = (a.addr.clone().unwrap(), b.addr.clone().unwrap());
    // The second start found the first one's bootstrap token: one admin, known to both.
    let tokens = get(&b, "/v1/tokens");
    let admins: Vec<&Value> = tokens
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"] == "bootstrap-admin")
        .collect();
    assert_eq!(admins.len(), 1, "{tokens}");

    let (status, made) = http(
        &a,
        "POST",
        "/v1/tokens",
        Some(r#"{"name": "automation", "role": "operator"}"#),
    );
    assert_eq!(status, 201, "{made}");
    let made: Value = serde_json::from_str(&made).unwrap();
    let secret = made["token"].as_str().unwrap().to_owned();
    let id = made["id"].as_str().unwrap().to_owned();
    // B learns of the new token from the log.
    wait_until(Duration::from_secs(10), "the token working on B", || {
        http_as(&b, Some(&secret), "GET", "/v1/jobs", None).0 == 200
    });
    let (status, body) = http(&a, "POST", &format!("/v1/tokens/{id}/revoke"), None);
    assert_eq!(status, 200, "{body}");
    let revoked = Instant::now();
    let refused = loop {
        let (status, body) = http_as(&b, Some(&secret), "GET", "/v1/jobs", None);
        if status == 401 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "B still accepts the token {:?} after A revoked it",
            revoked.elapsed()
        );
    };
    let refused: Value = serde_json::from_str(&refused).unwrap();
    assert_eq!(refused["error"]["code"], "unauthenticated", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{refused}"
    );
    // A refuses it too, and the revocation's actor is the admin that made it.
    assert_eq!(http_as(&a, Some(&secret), "GET", "/v1/jobs", None).0, 401);
    let listed = get(&b, "/v1/tokens");
    let row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id.as_str())
        .unwrap();
    assert_eq!(row["live"], false, "{row}");
}

#[test]
fn a_report_forged_for_another_node_with_a_nodes_own_credentials_is_refused_and_alerted() {
    use cairn_schemas::{JobId, NodeId, Report, ReportBody, StepId, codec};
    let dir = tempfile::tempdir().unwrap();
    let nats = SecureNats::start(dir.path(), 1, &["o0"], &["kvm-0", "kvm-1"]);
    let lab = Lab::secure(&nats, 2, 1, dir);
    let orchestrator = lab.orchestrator(0, &[]);
    let _worker = lab.worker(1, &[]);
    let addr = orchestrator.addr.clone().unwrap();
    let vm = vm_ids(&addr, 1)["vm-1-0"].clone();
    let job = request_backup(&addr, &vm);
    wait_all_succeeded(&addr, std::slice::from_ref(&job), Duration::from_secs(120));

    // The attacker holds kvm-0's certificate and reports on kvm-1's job, once on its own
    // subject (the server accepts it, the orchestrator refuses it) and once on kvm-1's (the
    // server refuses it).
    let identity = nats.identity("nodes/kvm-0");
    let forged = Report {
        step: StepId::new_v7(1_700_000_000_000, [7; 10]),
        attempt: 1,
        job: job.parse::<JobId>().unwrap(),
        partition: 0,
        epoch: 1,
        node: NodeId::new("kvm-1").unwrap(),
        body: ReportBody::Started,
    };
    let payload = codec::encode_report(&forged);
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = errors.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = async_nats::ConnectOptions::new()
            .add_root_certificates(nats.dir.join("ca/server-ca.pem"))
            .add_client_certificate(identity.join("cert.pem"), identity.join("key.pem"))
            .require_tls(true)
            .custom_inbox_prefix("_INBOX.node.kvm-0")
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(event.to_string());
                }
            })
            .connect(nats.urls())
            .await
            .expect("kvm-0 connects with its certificate");
        let js = async_nats::jetstream::new(client.clone());
        js.publish("cairn.report.0.kvm-0", payload.clone().into())
            .await
            .unwrap()
            .await
            .expect("kvm-0 may publish on its own report subject");
        client
            .publish("cairn.report.0.kvm-1", payload.clone().into())
            .await
            .unwrap();
        client.flush().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !errors
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.contains("Permissions Violation for Publish to \"cairn.report.0.kvm-1\""))
        {
            assert!(
                Instant::now() < deadline,
                "no permissions violation: {:?}",
                errors.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let alert = |alerts: &Value| {
        alerts.as_array().and_then(|all| {
            all.iter()
                .find(|a| {
                    a["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("Node kvm-0 reported for node kvm-1"))
                })
                .cloned()
        })
    };
    wait_until(Duration::from_secs(30), "the forged report alerted", || {
        alert(&get(&addr, "/v1/alerts")).is_some()
    });
    let found = alert(&get(&addr, "/v1/alerts")).unwrap();
    assert_eq!(found["severity"], "Critical", "{found}");
    // The refusal is recorded as node kvm-0's doing, and kvm-1's job is untouched.
    let events = all_events(&addr);
    let refused: Vec<&Value> = events
        .iter()
        .filter(|e| e["name"] == "ReportRefused")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(job_state(&addr, &job), "Succeeded");
    check_recovery_points(
        &lab,
        &addr,
        &BTreeMap::from([("vm-1-0".to_string(), vm)]),
        1,
    );
}
