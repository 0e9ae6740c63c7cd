//! The client commands (`cairn vm list`, `cairn backup web-01 --wait`, `cairn jobs`, ...):
//! a synchronous front end to a running orchestrator's HTTP API (`cairn up`, or a cluster's
//! orchestrators). They send the API's request types and read its views, and print tables
//! for people or, with `--json`, the server's JSON for scripts. They hold no state and make
//! no decision of their own; every check that matters is the server's.
//!
//! Exit codes: 0 success; 1 an error, or a waited-for job that failed or was cancelled;
//! 2 a `--wait` that ran out of time while the job still runs; 3 `audit verify` found the
//! event log's hash chain broken.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use cairn_orchestrator::api::wire::{
    BackupModeWire, BackupRequest, CancelRequest, ErrorBody, EventsPage, RestoreRequest, parse_sync,
};
use cairn_orchestrator::views::{
    Accepted, AuditReport, EventView, GroupView, JobView, RpView, StepView, VmView,
};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::repo_cmd::format_ms;
use crate::units::human;

/// Where `cairn up` serves its API unless told otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7480";

/// Longest single long poll of `GET /v1/events` the client asks for, in milliseconds. The
/// HTTP timeout is well above it.
const POLL_WAIT_MS: u64 = 20_000;

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// VMs that the nodes report.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Protection groups: members and policy.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Back up a VM now.
    Backup(BackupArgs),
    /// List jobs, newest first.
    Jobs(JobsArgs),
    /// Show or cancel one job.
    Job {
        #[command(subcommand)]
        command: JobCommand,
    },
    /// Recovery points.
    Rp {
        #[command(subcommand)]
        command: RpCommand,
    },
    /// Restore a recovery point's disks into a folder on a node.
    Restore(RestoreArgs),
    /// The event log.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Tamper evidence of the event log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Check a VM's replica against its source and repair it (a consistency check).
    Check(crate::policy_cmd::VmJobArgs),
    /// Re-hash a VM's stored chunks; damage makes its replica inconsistent.
    Verify(crate::policy_cmd::VmJobArgs),
    /// Alerts: active ones, and with --all resolved ones.
    Alerts(crate::policy_cmd::AlertsArgs),
    /// Seeding a replica offline: export on the VM's node, import on the server.
    Seed {
        #[command(subcommand)]
        command: SeedCommand,
    },
    /// Recover a recovery point to the original VM, to another host or to a folder, with
    /// throttling and notification.
    Recover(crate::recover_cmd::RecoverArgs),
    /// Extract files and folders of a recovery point into a folder on a node (a job).
    RecoverItems(crate::items_cmd::RecoverItemsArgs),
    /// API tokens: make (admin, operator, viewer, app-owner), list, revoke.
    Token {
        #[command(subcommand)]
        command: crate::token_cmd::TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum SeedCommand {
    /// Write a VM's disks to a folder (e.g. removable media), on the VM's node, no server
    /// needed.
    Export(crate::policy_cmd::SeedExportArgs),
    /// Make the VM's replica from a seed folder; a consistency check follows.
    Import(crate::policy_cmd::SeedImportArgs),
}

impl ServerOpts {
    pub(crate) fn json(&self) -> bool {
        self.json
    }
}

impl WaitOpts {
    pub(crate) fn wait(&self) -> bool {
        self.wait
    }
}

/// Options of every client command.
#[derive(Debug, Clone, Args)]
pub struct ServerOpts {
    /// URL of the orchestrator's HTTP API: http://HOST:PORT or https://HOST:PORT.
    #[arg(long, env = "CAIRN_SERVER", default_value = DEFAULT_SERVER)]
    pub(crate) server: String,
    /// PEM file of the CA certificate(s) that an https:// server's certificate must chain to
    /// (default: the system's trusted roots).
    #[arg(long, env = "CAIRN_CA_FILE", value_name = "FILE")]
    pub(crate) ca_file: Option<PathBuf>,
    /// Print the server's JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// File holding the API token (0600). Without it: CAIRN_TOKEN, then the token `cairn up`
    /// saved for this server in ~/.config/cairn/tokens/.
    #[arg(long, env = "CAIRN_TOKEN_FILE")]
    pub(crate) token_file: Option<std::path::PathBuf>,
    /// Name this invocation's request (1-240 visible ASCII characters), so that running the
    /// same command again with the same key does nothing twice. Without it each invocation
    /// makes a key of its own, which its retries reuse.
    #[arg(long, env = "CAIRN_IDEMPOTENCY_KEY", value_name = "KEY")]
    pub(crate) idempotency_key: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// List VMs with their node, disks, group and protection state.
    List {
        #[command(flatten)]
        opts: ServerOpts,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a protection group.
    Create {
        /// Display name, unique among groups.
        name: String,
        /// A member VM (id or unique name); repeat for more.
        #[arg(long = "vm", value_name = "VM")]
        vms: Vec<String>,
        /// Keep recovery points this many days (default 5).
        #[arg(long)]
        retention_days: Option<u32>,
        /// Synchronization frequency: 15m, 30m, 45m, 1h, 2h, 4h, 6h, 12h, 1d or
        /// before-recovery-point (default 15m).
        #[arg(long, value_parser = check_sync)]
        sync: Option<String>,
        /// Repository to write to (default: the server's).
        #[arg(long)]
        repository: Option<String>,
        #[command(flatten)]
        policy: crate::policy_cmd::PolicyFlags,
        #[command(flatten)]
        locks: crate::policy_cmd::LockFlags,
        #[command(flatten)]
        opts: ServerOpts,
    },
    /// List protection groups.
    List {
        #[command(flatten)]
        opts: ServerOpts,
    },
    /// Show a group's policy, next runs and members' retention.
    Show {
        /// The group (name or id).
        name: String,
        #[command(flatten)]
        opts: ServerOpts,
    },
    /// Change a group's policy (only the settings given); it applies from the next run.
    SetPolicy {
        /// The group (name or id).
        name: String,
        /// Keep recovery points this many days.
        #[arg(long)]
        retention_days: Option<u32>,
        /// Synchronization frequency (15m ... 1d, or before-recovery-point).
        #[arg(long, value_parser = check_sync)]
        sync: Option<String>,
        #[command(flatten)]
        policy: crate::policy_cmd::PolicyFlags,
        #[command(flatten)]
        locks: crate::policy_cmd::LockFlags,
        #[command(flatten)]
        opts: ServerOpts,
    },
    /// Delete a group: its VMs are no longer protected. With --delete-recovery-points their
    /// recovery points are soft-deleted too (refused while its retention lock holds any).
    Delete {
        /// The group (name or id).
        name: String,
        /// Also soft-delete the members' recovery points.
        #[arg(long)]
        delete_recovery_points: bool,
        #[command(flatten)]
        opts: ServerOpts,
    },
    /// Protect more VMs in a group (from its next run).
    AddVm {
        /// The group (name or id).
        name: String,
        /// A VM (id or unique name); repeat for more.
        #[arg(long = "vm", value_name = "VM", required = true)]
        vms: Vec<String>,
        #[command(flatten)]
        opts: ServerOpts,
    },
    /// Stop protecting members of a group. Their recovery points stay, unless
    /// --delete-recovery-points: then they are soft-deleted (restorable with `cairn rp
    /// undelete` until the group's soft-delete period ends).
    RemoveVm {
        /// The group (name or id).
        name: String,
        /// A member (id or unique name); repeat for more.
        #[arg(long = "vm", value_name = "VM", required = true)]
        vms: Vec<String>,
        /// Also soft-delete their recovery points.
        #[arg(long)]
        delete_recovery_points: bool,
        #[command(flatten)]
        opts: ServerOpts,
    },
    /// Disk allocation review: data size, recommended space, free space, what is missing.
    Plan {
        /// The group (name or id).
        name: String,
        #[command(flatten)]
        opts: ServerOpts,
    },
}

/// How a backup reads its disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Only the blocks changed since the last backup.
    Incremental,
    /// Read everything, store only what changed.
    ExpressFull,
}

/// Waiting for a job to end.
#[derive(Debug, Clone, Args)]
pub struct WaitOpts {
    /// Wait for the job to end, printing its progress; exit 0 when it succeeded, 1 when it
    /// failed or was cancelled.
    #[arg(long)]
    pub(crate) wait: bool,
    /// Give up waiting after this long (e.g. 90s, 30m, 6h) and exit 2; the job goes on.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The VM (id or unique name).
    vm: String,
    /// How to read the disks.
    #[arg(long, value_enum, default_value = "incremental")]
    mode: Mode,
    #[command(flatten)]
    wait: WaitOpts,
    #[command(flatten)]
    opts: ServerOpts,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Only jobs in this state (Queued, Running, Succeeded, Failed, ...).
    #[arg(long)]
    state: Option<String>,
    /// Only jobs of this VM (id or unique name).
    #[arg(long)]
    vm: Option<String>,
    /// At most this many jobs.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    #[command(flatten)]
    opts: ServerOpts,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Show a job with its steps.
    Show {
        /// The job id.
        job: String,
        #[command(flatten)]
        opts: ServerOpts,
    },
    /// Ask for a job to be cancelled.
    Cancel {
        /// The job id.
        job: String,
        /// Why, for the record.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        opts: ServerOpts,
    },
}

#[derive(Debug, Subcommand)]
pub enum RpCommand {
    /// List a VM's recovery points, oldest first.
    List {
        /// The VM (id or unique name).
        vm: String,
        /// Show recovery points per day, a month per block.
        #[arg(long)]
        calendar: bool,
        #[command(flatten)]
        opts: ServerOpts,
    },
    /// List partitions, folders and files inside a recovery point, without restoring it.
    Browse(crate::items_cmd::RpBrowseArgs),
    /// Serve a recovery point's disk read-only over NBD (from the repository folder).
    Export(crate::items_cmd::RpExportArgs),
    /// Soft-delete recovery points: they stay listed as deleted and restorable with
    /// `cairn rp undelete` for the group's soft-delete period (14 days unless set), then are
    /// purged. Points younger than a group's retention lock cannot be deleted.
    Delete {
        /// The VM (id or unique name).
        vm: String,
        /// Recovery points: ids or unique prefixes of at least 8 characters.
        #[arg(required = true, value_name = "RP")]
        rps: Vec<String>,
        #[command(flatten)]
        opts: ServerOpts,
    },
    /// Restore soft-deleted recovery points before they are purged.
    Undelete {
        /// The VM (id or unique name).
        vm: String,
        /// Recovery points: ids or unique prefixes of at least 8 characters.
        #[arg(required = true, value_name = "RP")]
        rps: Vec<String>,
        #[command(flatten)]
        opts: ServerOpts,
    },
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The VM (id or unique name).
    vm: String,
    /// Recovery point: its id, a unique prefix of at least 8 characters, or `latest`.
    #[arg(long)]
    rp: String,
    /// Absolute folder on the node to write the disk images into.
    #[arg(long)]
    to: String,
    /// Node that writes (default: the node hosting the VM).
    #[arg(long)]
    node: Option<String>,
    #[command(flatten)]
    wait: WaitOpts,
    #[command(flatten)]
    opts: ServerOpts,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print the latest events (or those from --from on), and with --follow new ones as
    /// they are appended.
    Tail {
        /// Keep printing new events until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// Start at this sequence number instead of the last --lines events.
        #[arg(long, value_name = "SEQ")]
        from: Option<u64>,
        /// How many of the latest events to print when --from is not given.
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: usize,
        #[command(flatten)]
        opts: ServerOpts,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk the event log's keyed hash chain and check it against the signed checkpoints;
    /// exit 3 and name the first changed event, or the first checkpoint the log no longer
    /// matches. Through the server by default (which checks its own checkpoint folder), or
    /// offline with --log, while no cairn runs on that log.
    Verify {
        #[command(flatten)]
        opts: ServerOpts,
        /// Verify this sled event log folder directly (e.g. DATA/events of a stopped `cairn up`)
        /// instead of asking the server.
        #[arg(long, value_name = "DIR")]
        log: Option<PathBuf>,
        /// With --log: the audit key file the log is keyed with.
        #[arg(long, value_name = "FILE", requires = "log")]
        audit_key: Option<PathBuf>,
        /// With --log: the checkpoint folder to check the log against (e.g. DATA/checkpoints).
        #[arg(long, value_name = "DIR", requires = "log")]
        checkpoints: Option<PathBuf>,
        /// With --checkpoints: trust only these public key files (SIGNER.pub), not the keys
        /// listed in the folder's keys/ (repeat).
        #[arg(long = "trust-key", value_name = "FILE", requires = "checkpoints")]
        trust_keys: Vec<PathBuf>,
    },
}

/// Runs a client command; returns the process exit code.
pub fn run(command: ClientCommand) -> Result<i32> {
    match command {
        ClientCommand::Token { command } => crate::token_cmd::run(command),
        ClientCommand::Vm {
            command: VmCommand::List { opts },
        } => vm_list(&opts),
        ClientCommand::Group { command } => match command {
            GroupCommand::Create {
                name,
                vms,
                retention_days,
                sync,
                repository,
                policy,
                locks,
                opts,
            } => {
                let client = Client::new(&opts)?;
                let vms = resolve_vms(&client, &vms)?;
                let request = crate::policy_cmd::create_request(
                    name.clone(),
                    vms,
                    retention_days,
                    sync,
                    repository,
                    &policy,
                )?;
                let value = client.post("/v1/groups", Some(&request))?;
                if opts.json {
                    print_json(&value);
                } else {
                    let accepted: Accepted = from_value(value.clone())?;
                    println!("created group {name} ({})", accepted.id);
                }
                let accepted: Accepted = from_value(value)?;
                crate::policy_cmd::apply_lock_flags(&client, &accepted.id, &locks, opts.json)?;
                Ok(0)
            }
            GroupCommand::List { opts } => group_list(&opts),
            GroupCommand::Show { name, opts } => crate::policy_cmd::group_show(&name, &opts),
            GroupCommand::SetPolicy {
                name,
                retention_days,
                sync,
                policy,
                locks,
                opts,
            } => crate::policy_cmd::group_set_policy(
                &name,
                retention_days,
                sync,
                &policy,
                &locks,
                &opts,
            ),
            GroupCommand::Delete {
                name,
                delete_recovery_points,
                opts,
            } => crate::policy_cmd::group_delete(&name, delete_recovery_points, &opts),
            GroupCommand::Plan { name, opts } => crate::policy_cmd::group_plan(&name, &opts),
            GroupCommand::AddVm { name, vms, opts } => {
                crate::policy_cmd::group_members(&name, &vms, &[], false, &opts)
            }
            GroupCommand::RemoveVm {
                name,
                vms,
                delete_recovery_points,
                opts,
            } => crate::policy_cmd::group_members(&name, &[], &vms, delete_recovery_points, &opts),
        },
        ClientCommand::Check(args) => crate::policy_cmd::vm_job(&args, "check"),
        ClientCommand::Verify(args) => crate::policy_cmd::vm_job(&args, "verify"),
        ClientCommand::Alerts(args) => crate::policy_cmd::alerts(&args),
        ClientCommand::Seed { command } => match command {
            SeedCommand::Export(args) => crate::policy_cmd::seed_export(&args),
            SeedCommand::Import(args) => crate::policy_cmd::seed_import(&args),
        },
        ClientCommand::Backup(args) => backup(&args),
        ClientCommand::Jobs(args) => jobs(&args),
        ClientCommand::Job { command } => match command {
            JobCommand::Show { job, opts } => {
                let client = Client::new(&opts)?;
                let value = client.get(&format!("/v1/jobs/{}", segment(&job)?), &[])?;
                if opts.json {
                    print_json(&value);
                } else {
                    print!("{}", render_job(&from_value::<JobView>(value)?));
                }
                Ok(0)
            }
            JobCommand::Cancel { job, reason, opts } => {
                let client = Client::new(&opts)?;
                let request = CancelRequest { reason };
                let path = format!("/v1/jobs/{}/cancel", segment(&job)?);
                let value = client.post(&path, Some(&request))?;
                if opts.json {
                    print_json(&value);
                } else {
                    println!("cancellation of job {job} requested");
                }
                Ok(0)
            }
        },
        ClientCommand::Rp {
            command: RpCommand::List { vm, calendar, opts },
        } => {
            let client = Client::new(&opts)?;
            let vm = resolve_vm(&client, &vm)?;
            if calendar {
                return crate::policy_cmd::calendar(&client, &vm, &opts);
            }
            let value = client.get(&format!("/v1/vms/{vm}/recovery-points"), &[])?;
            if opts.json {
                print_json(&value);
            } else {
                print!("{}", render_rps(&from_value::<Vec<RpView>>(value)?));
            }
            Ok(0)
        }
        ClientCommand::Rp {
            command: RpCommand::Delete { vm, rps, opts },
        } => rp_delete(&vm, &rps, &opts, "delete"),
        ClientCommand::Rp {
            command: RpCommand::Undelete { vm, rps, opts },
        } => rp_delete(&vm, &rps, &opts, "undelete"),
        ClientCommand::Rp {
            command: RpCommand::Browse(args),
        } => crate::items_cmd::rp_browse(&args),
        ClientCommand::Rp {
            command: RpCommand::Export(args),
        } => crate::items_cmd::rp_export(&args),
        ClientCommand::RecoverItems(args) => crate::items_cmd::recover_items(&args),
        ClientCommand::Restore(args) => restore(&args),
        ClientCommand::Recover(args) => crate::recover_cmd::recover(&args),
        ClientCommand::Events {
            command:
                EventsCommand::Tail {
                    follow,
                    from,
                    lines,
                    opts,
                },
        } => events_tail(&opts, follow, from, lines),
        ClientCommand::Audit {
            command:
                AuditCommand::Verify {
                    opts,
                    log,
                    audit_key,
                    checkpoints,
                    trust_keys,
                },
        } => {
            let value = match log {
                Some(log) => serde_json::to_value(crate::audit_cmd::verify_offline(
                    &log,
                    audit_key.as_deref(),
                    checkpoints.as_deref(),
                    &trust_keys,
                )?)?,
                None => Client::new(&opts)?.get("/v1/audit/verify", &[])?,
            };
            let report: AuditReport = from_value(value.clone())?;
            if opts.json {
                print_json(&value);
            } else {
                println!("{}", render_audit(&report));
            }
            Ok(if report.ok { 0 } else { 3 })
        }
    }
}

fn vm_list(opts: &ServerOpts) -> Result<i32> {
    let client = Client::new(opts)?;
    let value = client.get("/v1/vms", &[])?;
    if opts.json {
        print_json(&value);
        return Ok(0);
    }
    let vms: Vec<VmView> = from_value(value)?;
    let groups: Vec<GroupView> = from_value(client.get("/v1/groups", &[])?)?;
    let group_names: HashMap<String, String> =
        groups.into_iter().map(|g| (g.group, g.name)).collect();
    print!("{}", render_vms(&vms, &group_names));
    Ok(0)
}

fn group_list(opts: &ServerOpts) -> Result<i32> {
    let client = Client::new(opts)?;
    let value = client.get("/v1/groups", &[])?;
    if opts.json {
        print_json(&value);
    } else {
        print!("{}", render_groups(&from_value::<Vec<GroupView>>(value)?));
    }
    Ok(0)
}

fn backup(args: &BackupArgs) -> Result<i32> {
    let client = Client::new(&args.opts)?;
    let vm = resolve_vm(&client, &args.vm)?;
    let request = BackupRequest {
        mode: Some(match args.mode {
            Mode::Incremental => BackupModeWire::Incremental,
            Mode::ExpressFull => BackupModeWire::ExpressFull,
        }),
    };
    let value = client.post(&format!("/v1/vms/{vm}/backup"), Some(&request))?;
    let accepted: Accepted = from_value(value.clone())?;
    if !args.wait.wait {
        if args.opts.json {
            print_json(&value);
        } else {
            println!(
                "backup job {} accepted for vm {}{}",
                accepted.id,
                args.vm,
                replay_note(&accepted)
            );
        }
        return Ok(0);
    }
    if !args.opts.json {
        println!(
            "backup job {} accepted for vm {}{}",
            accepted.id,
            args.vm,
            replay_note(&accepted)
        );
    }
    wait_for_job(&client, &accepted, &args.wait, args.opts.json)
}

/// What an answer replayed for a repeated idempotency key says about itself.
fn replay_note(accepted: &Accepted) -> &'static str {
    if accepted.replayed {
        " (an earlier request with the same idempotency key made it; nothing new was done)"
    } else {
        ""
    }
}

fn jobs(args: &JobsArgs) -> Result<i32> {
    let client = Client::new(&args.opts)?;
    let mut query = vec![("limit", args.limit.to_string())];
    if let Some(state) = &args.state {
        query.push(("state", state.clone()));
    }
    if let Some(vm) = &args.vm {
        query.push(("vm", resolve_vm(&client, vm)?));
    }
    let value = client.get("/v1/jobs", &query)?;
    if args.opts.json {
        print_json(&value);
    } else {
        print!("{}", render_jobs(&from_value::<Vec<JobView>>(value)?));
    }
    Ok(0)
}

fn restore(args: &RestoreArgs) -> Result<i32> {
    let client = Client::new(&args.opts)?;
    let vm = resolve_vm(&client, &args.vm)?;
    let rps: Vec<RpView> = from_value(client.get(&format!("/v1/vms/{vm}/recovery-points"), &[])?)?;
    let rp = pick_rp(&rps, &args.rp).map_err(|message| anyhow!(message))?;
    let request = RestoreRequest {
        rp: rp.clone(),
        to: args.to.clone(),
        node: args.node.clone(),
    };
    let value = client.post(&format!("/v1/vms/{vm}/restore"), Some(&request))?;
    let accepted: Accepted = from_value(value.clone())?;
    if !args.opts.json {
        println!(
            "restore job {} accepted: recovery point {rp} of vm {} to {}",
            accepted.id, args.vm, args.to
        );
    }
    if !args.wait.wait {
        if args.opts.json {
            print_json(&value);
        }
        return Ok(0);
    }
    wait_for_job(&client, &accepted, &args.wait, args.opts.json)
}

/// Follows a job until it ends or the deadline passes: long-polls the event log and
/// re-reads the job whenever one of its events (or nothing for a while) comes by.
pub(crate) fn wait_for_job(
    client: &Client,
    accepted: &Accepted,
    wait: &WaitOpts,
    json: bool,
) -> Result<i32> {
    let started = Instant::now();
    let deadline = started + wait.timeout;
    let job_path = format!("/v1/jobs/{}", segment(&accepted.id)?);
    let mut from = accepted.seq + 1;
    let mut printer = ProgressPrinter::default();
    loop {
        let value = client.get(&job_path, &[])?;
        let job: JobView = from_value(value.clone())?;
        if !json {
            for line in printer.update(&job) {
                println!("{line}");
            }
        }
        if is_terminal(&job.state) {
            if json {
                print_json(&value);
            } else if job.state == "Succeeded" {
                println!("{}", render_outcome(&job));
            } else {
                eprintln!("{}", render_outcome(&job));
            }
            return Ok(if job.state == "Succeeded" { 0 } else { 1 });
        }
        // Long-poll until an event of this job arrives, or a while has passed (a safety net
        // in case the job changes without an event that names it).
        let recheck_at = Instant::now() + Duration::from_millis(POLL_WAIT_MS);
        loop {
            let now = Instant::now();
            if now >= deadline {
                eprintln!(
                    "gave up waiting after {}: job {} is still {}",
                    format_duration(started.elapsed()),
                    job.job,
                    job.state
                );
                return Ok(2);
            }
            let wait_ms = deadline
                .min(recheck_at)
                .saturating_duration_since(now)
                .as_millis()
                .min(u128::from(POLL_WAIT_MS)) as u64;
            let query = [
                ("from", from.to_string()),
                ("limit", "1000".to_owned()),
                ("wait_ms", wait_ms.to_string()),
            ];
            let page: EventsPage = from_value(client.get("/v1/events", &query)?)?;
            from = page.next_from;
            let ours = page
                .events
                .iter()
                .any(|event| event_concerns_job(event, &job.job));
            if ours || Instant::now() >= recheck_at {
                break;
            }
        }
    }
}

fn event_concerns_job(event: &EventView, job: &str) -> bool {
    event.correlation.as_deref() == Some(job) || event.aggregate.ends_with(job)
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "Succeeded" | "Failed" | "Cancelled")
}

fn events_tail(opts: &ServerOpts, follow: bool, from: Option<u64>, lines: usize) -> Result<i32> {
    let client = Client::new(opts)?;
    let fetch = |from: u64, wait_ms: u64| -> Result<EventsPage> {
        let query = [
            ("from", from.to_string()),
            ("limit", "1000".to_owned()),
            ("wait_ms", wait_ms.to_string()),
        ];
        from_value(client.get("/v1/events", &query)?)
    };
    let print = |event: &EventView| {
        if opts.json {
            // One event per line (NDJSON), so scripts can read a follow stream.
            println!("{}", serde_json::to_string(event).unwrap_or_default());
        } else {
            println!("{}", render_event(event));
        }
    };
    let mut next = match from {
        Some(seq) => seq,
        None => {
            // The API pages forward only, so the last N events are found by reading to the
            // end and keeping a window of N.
            let mut window = std::collections::VecDeque::with_capacity(lines);
            let mut cursor = 0;
            loop {
                let page = fetch(cursor, 0)?;
                let done = page.events.is_empty();
                for event in page.events {
                    if window.len() == lines {
                        window.pop_front();
                    }
                    if lines > 0 {
                        window.push_back(event);
                    }
                }
                cursor = page.next_from;
                if done {
                    break;
                }
            }
            window.iter().for_each(print);
            cursor
        }
    };
    loop {
        let page = fetch(next, if follow { POLL_WAIT_MS } else { 0 })?;
        page.events.iter().for_each(print);
        let caught_up = page.events.is_empty();
        next = page.next_from;
        if caught_up && !follow {
            return Ok(0);
        }
    }
}

// ---- HTTP --------------------------------------------------------------------------------

/// An error answer of the API: printed as `error: <message> (<code>)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// Reads an error answer; a body that is not the API's error shape (a proxy's page, an
    /// older server) still gives a useful message.
    fn from_body(status: u16, body: &str) -> ApiError {
        match serde_json::from_str::<ErrorBody>(body) {
            Ok(parsed) => ApiError {
                status,
                code: parsed.error.code,
                message: parsed.error.message,
            },
            Err(_) => {
                let mut text: String = body.trim().chars().take(200).collect();
                if text.is_empty() {
                    text = format!("the server answered HTTP {status}");
                }
                ApiError {
                    status,
                    code: format!("http_{status}"),
                    message: text,
                }
            }
        }
    }
}

/// A blocking client of one server.
pub(crate) struct Client {
    agent: ureq::Agent,
    base: String,
    /// The API token sent as `Authorization: Bearer`, if one was found.
    token: Option<String>,
    /// Where each POST's `Idempotency-Key` comes from.
    keys: RequestKeys,
}

/// The `Idempotency-Key`s of one invocation: its first POST is sent with the invocation's
/// key, the n-th with `key/n`; a POST's retries reuse its key.
#[derive(Debug)]
struct RequestKeys {
    base: String,
    sent: std::sync::atomic::AtomicU32,
}

/// Longest `--idempotency-key` (the server takes 255 bytes; room is left for `/n`).
const MAX_KEY_LEN: usize = 240;

impl RequestKeys {
    /// `given`, checked, or a fresh random key.
    fn new(given: Option<&str>) -> Result<RequestKeys> {
        let base = match given {
            Some(key) => {
                if key.is_empty()
                    || key.len() > MAX_KEY_LEN
                    || !key.bytes().all(|b| (0x21..=0x7e).contains(&b))
                {
                    bail!(
                        "--idempotency-key {key:?} must be 1-{MAX_KEY_LEN} visible ASCII \
                         characters (no spaces)"
                    );
                }
                key.to_owned()
            }
            None => {
                let mut random = [0u8; 16];
                getrandom::getrandom(&mut random).context("no randomness for a request key")?;
                random.iter().map(|b| format!("{b:02x}")).collect()
            }
        };
        Ok(RequestKeys {
            base,
            sent: std::sync::atomic::AtomicU32::new(0),
        })
    }

    fn next(&self) -> String {
        match self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
            0 => self.base.clone(),
            n => format!("{}/{}", self.base, n + 1),
        }
    }
}

/// How often a request is sent at most when the server's answer is lost or it is briefly
/// unavailable (with its key, a repeat cannot act twice).
const SEND_ATTEMPTS: u32 = 4;

/// Whether a failed exchange may be sent again: the connection broke after the request went
/// out, no answer came in time, or a proxy or the orchestrator said it is briefly unable.
/// A refused connection is not retried: nothing was sent, and the hint to start the server
/// should come at once.
fn is_transient(result: &Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> bool {
    match result {
        Ok(response) => matches!(response.status().as_u16(), 502..=504),
        Err(ureq::Error::Timeout(_)) => true,
        Err(ureq::Error::Io(io)) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
        ),
        Err(_) => false,
    }
}

impl Client {
    /// A client of `opts.server` with the token that `opts` names or that is found for it,
    /// verifying an https:// server with `opts.ca_file`.
    pub(crate) fn new(opts: &ServerOpts) -> Result<Client> {
        let mut client = Client::connect(
            &opts.server,
            opts.ca_file.as_deref(),
            opts.token_file.as_deref(),
        )?;
        client.keys = RequestKeys::new(opts.idempotency_key.as_deref())?;
        Ok(client)
    }

    /// A client of `server` (`http://` or `https://`) with the token of `token_file`, else the
    /// one found for it (`CAIRN_TOKEN_FILE`, `CAIRN_TOKEN`, the config folder); an https
    /// server's certificate must chain to a certificate in `ca_file`, or without one to the
    /// system's trusted roots.
    pub(crate) fn connect(
        server: &str,
        ca_file: Option<&Path>,
        token_file: Option<&Path>,
    ) -> Result<Client> {
        let base = server.trim_end_matches('/').to_owned();
        let https = base.starts_with("https://");
        if !https && !base.starts_with("http://") {
            bail!("--server {server:?} is not an http:// or https:// URL (e.g. {DEFAULT_SERVER})");
        }
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            // Above the longest long poll the client asks for.
            .timeout_global(Some(Duration::from_millis(POLL_WAIT_MS + 30_000)))
            .user_agent(concat!("cairn/", env!("CARGO_PKG_VERSION")));
        if https {
            config = config.tls_config(tls_config(ca_file)?);
        }
        let agent: ureq::Agent = config.build().into();
        let env_file = std::env::var_os("CAIRN_TOKEN_FILE").map(std::path::PathBuf::from);
        let token = crate::token_cmd::discover(&base, token_file.or(env_file.as_deref()))?;
        Ok(Client {
            agent,
            base,
            token,
            keys: RequestKeys::new(None)?,
        })
    }

    fn authorize<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(token) => request.header("authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    pub(crate) fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        let mut request = self.authorize(self.agent.get(format!("{}{path}", self.base)));
        for (key, value) in query {
            request = request.query(*key, value);
        }
        self.finish(request.call())
    }

    /// Sends a command with an `Idempotency-Key`, again (with the same key) while the
    /// exchange fails in a way that leaves its outcome unknown ([`is_transient`]).
    pub(crate) fn post<B: Serialize>(&self, path: &str, body: Option<&B>) -> Result<Value> {
        let bytes = body
            .map(serde_json::to_vec)
            .transpose()
            .context("encoding the request")?;
        let key = self.keys.next();
        let mut delay = Duration::from_millis(250);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let request = self
                .authorize(self.agent.post(format!("{}{path}", self.base)))
                .header("idempotency-key", &key);
            let result = match &bytes {
                Some(bytes) => request
                    .header("content-type", "application/json")
                    .send(&bytes[..]),
                None => request.send_empty(),
            };
            if attempt < SEND_ATTEMPTS && is_transient(&result) {
                tracing::warn!(
                    path,
                    attempt,
                    "no usable answer from {} ({}); sending the request again with the same \
                     idempotency key",
                    self.base,
                    match &result {
                        Ok(response) => format!("status {}", response.status()),
                        Err(err) => err.to_string(),
                    }
                );
                std::thread::sleep(delay);
                delay *= 2;
                continue;
            }
            return self.finish(result);
        }
    }

    fn finish(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value> {
        let mut response = result.map_err(|err| transport_error(&self.base, err))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_string()
            .map_err(|err| transport_error(&self.base, err))?;
        if status == 401 && self.token.is_none() {
            return Err(anyhow::anyhow!(
                "{}; no token was found for {}: pass --token-file FILE, set CAIRN_TOKEN, or run \
                 this on the machine whose `cairn up` serves it",
                ApiError::from_body(status, &text),
                self.base
            ));
        }
        if status >= 400 {
            return Err(ApiError::from_body(status, &text).into());
        }
        serde_json::from_str(&text)
            .with_context(|| format!("the server at {} answered with invalid JSON", self.base))
    }
}

/// Largest CA file read, in bytes.
const MAX_CA_FILE_BYTES: u64 = 4 << 20;

/// TLS for an https:// server: the roots are the certificates of `ca_file`, or the system's
/// trusted roots (Mozilla's bundle when the system has none).
fn tls_config(ca_file: Option<&Path>) -> Result<ureq::tls::TlsConfig> {
    use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};
    let roots = match ca_file {
        Some(path) => {
            use std::io::Read;
            let name = path.display();
            let file = std::fs::File::open(path).with_context(|| format!("--ca-file {name}"))?;
            let mut pem = Vec::new();
            file.take(MAX_CA_FILE_BYTES + 1)
                .read_to_end(&mut pem)
                .with_context(|| format!("--ca-file {name}"))?;
            if pem.len() as u64 > MAX_CA_FILE_BYTES {
                bail!("--ca-file {name} is larger than {MAX_CA_FILE_BYTES} bytes");
            }
            let mut certs = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                match item.with_context(|| format!("--ca-file {name}: not valid PEM"))? {
                    PemItem::Certificate(cert) => certs.push(cert),
                    PemItem::PrivateKey(_) => bail!(
                        "--ca-file {name} holds a private key; it should hold only the CA's \
                         certificate (and the key should not be on this machine)"
                    ),
                    _ => {}
                }
            }
            if certs.is_empty() {
                bail!("--ca-file {name} holds no PEM certificate (-----BEGIN CERTIFICATE-----)");
            }
            RootCerts::Specific(Arc::new(certs))
        }
        None => {
            let system = rustls_native_certs::load_native_certs();
            if system.certs.is_empty() {
                RootCerts::WebPki
            } else {
                let certs = system
                    .certs
                    .iter()
                    .map(|der| Certificate::from_der(der).to_owned())
                    .collect();
                RootCerts::Specific(Arc::new(certs))
            }
        }
    };
    Ok(TlsConfig::builder().root_certs(roots).build())
}

/// Explains a failure to talk to the server at all.
fn transport_error(base: &str, err: ureq::Error) -> anyhow::Error {
    let unreachable = match &err {
        ureq::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::AddrNotAvailable
        ),
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => true,
        _ => false,
    };
    let tls_failed = base.starts_with("https://")
        && match &err {
            ureq::Error::Rustls(_) => true,
            ureq::Error::Io(io) => io.kind() == std::io::ErrorKind::InvalidData,
            _ => false,
        };
    if tls_failed {
        anyhow!(
            "TLS with the cairn server at {base} failed ({err}); if its certificate is signed by \
             a CA of your own, give that CA's certificate with --ca-file FILE or CAIRN_CA_FILE"
        )
    } else if base.starts_with("http://") && matches!(err, ureq::Error::Protocol(_)) {
        anyhow!(
            "the server at {base} does not answer plain HTTP ({err}); if it serves HTTPS, use \
             --server https://…"
        )
    } else if unreachable {
        anyhow!(
            "cannot reach the cairn server at {base} ({err}); is `cairn up` running? \
             set --server or CAIRN_SERVER"
        )
    } else if matches!(err, ureq::Error::Timeout(_)) {
        anyhow!("the cairn server at {base} did not answer in time ({err})")
    } else {
        anyhow!("request to the cairn server at {base} failed: {err}")
    }
}

pub(crate) fn from_value<T: DeserializeOwned>(value: Value) -> Result<T> {
    serde_json::from_value(value).context("the server's answer is not what this client expects")
}

pub(crate) fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// An id typed by the user, checked to be safe as one path segment.
fn segment(id: &str) -> Result<&str> {
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || id.starts_with('.')
    {
        bail!("{id:?} is not an id");
    }
    Ok(id)
}

// ---- names -------------------------------------------------------------------------------

/// Whether `text` has the shape of a UUID (`8-4-4-4-12` hex digits).
fn looks_like_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The id of the VM that `arg` names: its id, or its name when exactly one VM has it.
fn pick_vm(vms: &[VmView], arg: &str) -> Result<String, String> {
    if let Some(vm) = vms.iter().find(|vm| vm.vm == arg) {
        return Ok(vm.vm.clone());
    }
    let named: Vec<&VmView> = vms.iter().filter(|vm| vm.name == arg).collect();
    match named.as_slice() {
        [one] => Ok(one.vm.clone()),
        [] => Err(format!("no vm named {arg:?} (see `cairn vm list`)")),
        many => Err(format!(
            "the vm name {arg:?} is ambiguous, it names {}; use an id",
            many.iter()
                .map(|vm| format!("{} on {}", vm.vm, vm.node))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Resolves a VM argument; ids are passed through without asking the server.
pub(crate) fn resolve_vm(client: &Client, arg: &str) -> Result<String> {
    Ok(resolve_vms(client, std::slice::from_ref(&arg.to_owned()))?.remove(0))
}

pub(crate) fn resolve_vms(client: &Client, args: &[String]) -> Result<Vec<String>> {
    if args.iter().all(|arg| looks_like_uuid(arg)) {
        return Ok(args.to_vec());
    }
    let vms: Vec<VmView> = from_value(client.get("/v1/vms", &[])?)?;
    args.iter()
        .map(|arg| {
            if looks_like_uuid(arg) {
                Ok(arg.clone())
            } else {
                pick_vm(&vms, arg).map_err(|message| anyhow!(message))
            }
        })
        .collect()
}

/// The recovery point that `arg` names among a VM's: `latest`, an id, or a unique prefix of
/// at least 8 characters.
pub(crate) fn pick_rp(rps: &[RpView], arg: &str) -> Result<String, String> {
    if arg == "latest" {
        // The newest usable one: a deleted point cannot be recovered.
        return rps
            .iter()
            .filter(|rp| rp.state != "deleted")
            .max_by_key(|rp| rp.taken_at)
            .map(|rp| rp.rp.clone())
            .ok_or_else(|| "the vm has no recovery point yet".to_owned());
    }
    if let Some(rp) = rps.iter().find(|rp| rp.rp == arg) {
        return Ok(rp.rp.clone());
    }
    if arg.len() < 8 {
        return Err(format!(
            "recovery point {arg:?}: give its id, a prefix of at least 8 characters, or latest"
        ));
    }
    let matching: Vec<&RpView> = rps.iter().filter(|rp| rp.rp.starts_with(arg)).collect();
    match matching.as_slice() {
        [one] => Ok(one.rp.clone()),
        [] => Err(format!(
            "the vm has no recovery point {arg:?} (see `cairn rp list`)"
        )),
        _ => Err(format!(
            "recovery point prefix {arg:?} matches {} recovery points; give more characters",
            matching.len()
        )),
    }
}

// ---- argument parsers --------------------------------------------------------------------

fn check_sync(text: &str) -> Result<String, String> {
    parse_sync(text)
        .map(|_| text.to_owned())
        .map_err(|err| err.to_string())
}

/// Parses `90`, `90s`, `30m`, `6h`, `2d`, `1h30m` (see [`crate::units::parse_duration`]).
fn parse_duration(text: &str) -> Result<Duration, crate::units::Error> {
    crate::units::parse_duration(text)
}

// ---- rendering ---------------------------------------------------------------------------

/// Columns aligned on the width of their widest cell; the last column is not padded.
pub(crate) struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn render(&self) -> String {
        let n_cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..n_cols)
            .map(|col| {
                self.rows
                    .iter()
                    .filter_map(|row| row.get(col))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (col, cell) in row.iter().enumerate() {
                if col + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    let pad = widths[col] - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

pub(crate) fn time_or_dash(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".to_owned(), format_ms)
}

fn or_dash(text: Option<&str>) -> String {
    text.filter(|t| !t.is_empty())
        .map_or_else(|| "-".to_owned(), str::to_owned)
}

/// `4.2s`, `3m05s`, `1h02m`.
fn format_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs < 60 {
        format!("{:.1}s", duration.as_secs_f64())
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    }
}

/// The protection state a VM shows: its worst disk state.
fn vm_protection(vm: &VmView) -> &str {
    const WORST_FIRST: [&str; 4] = [
        "ReplicaInconsistent",
        "InitialReplication",
        "PendingReplicaCreation",
        "Protected",
    ];
    if vm.group.is_none() {
        return "unprotected";
    }
    WORST_FIRST
        .iter()
        .find(|state| vm.disks.iter().any(|disk| disk.state == **state))
        .copied()
        .unwrap_or("-")
}

fn render_vms(vms: &[VmView], group_names: &HashMap<String, String>) -> String {
    if vms.is_empty() {
        return "no vms reported yet\n".to_owned();
    }
    let mut table = Table::new(&[
        "NAME",
        "VM",
        "NODE",
        "POWER",
        "DISKS",
        "SIZE",
        "GROUP",
        "PROTECTION",
        "LAST BACKUP",
        "RPS",
    ]);
    let mut sorted: Vec<&VmView> = vms.iter().collect();
    sorted.sort_by(|a, b| (&a.name, &a.vm).cmp(&(&b.name, &b.vm)));
    for vm in sorted {
        let group = vm
            .group
            .as_ref()
            .map(|id| group_names.get(id).cloned().unwrap_or_else(|| id.clone()));
        table.row(vec![
            vm.name.clone(),
            vm.vm.clone(),
            vm.node.clone(),
            if vm.present {
                vm.power.clone()
            } else {
                "gone".to_owned()
            },
            vm.disks.len().to_string(),
            human(vm.disks.iter().map(|d| d.size_bytes).sum()),
            or_dash(group.as_deref()),
            vm_protection(vm).to_owned(),
            time_or_dash(vm.last_backup_at),
            vm.recovery_points.to_string(),
        ]);
    }
    table.render()
}

fn render_groups(groups: &[GroupView]) -> String {
    if groups.is_empty() {
        return "no protection groups (create one with `cairn group create`)\n".to_owned();
    }
    let mut table = Table::new(&["NAME", "GROUP", "VMS", "RETENTION", "SYNC", "CREATED"]);
    for group in groups {
        table.row(vec![
            group.name.clone(),
            group.group.clone(),
            group.members.len().to_string(),
            format!("{} days", group.retention_days),
            group.sync.clone(),
            format_ms(group.created_at),
        ]);
    }
    table.render()
}

/// What a job waits for or why it failed, in one cell.
fn job_detail(job: &JobView) -> String {
    if let Some(error) = &job.error {
        return error.clone();
    }
    if let Some(reason) = &job.wait_reason {
        return format!("waiting: {reason}");
    }
    if job.cancel_requested && !is_terminal(&job.state) {
        return "cancel requested".to_owned();
    }
    "-".to_owned()
}

fn render_jobs(jobs: &[JobView]) -> String {
    if jobs.is_empty() {
        return "no jobs\n".to_owned();
    }
    let mut table = Table::new(&[
        "JOB",
        "KIND",
        "VM",
        "STATE",
        "REQUESTED",
        "FINISHED",
        "DETAIL",
    ]);
    for job in jobs {
        table.row(vec![
            job.job.clone(),
            job.kind.clone(),
            job.vm_name.clone(),
            job.state.clone(),
            format_ms(job.requested_at),
            time_or_dash(job.finished_at),
            job_detail(job),
        ]);
    }
    table.render()
}

fn step_progress(step: &StepView) -> String {
    if let Some(percent) = step
        .bytes_done
        .saturating_mul(100)
        .checked_div(step.bytes_total)
    {
        format!(
            "{} / {} ({percent}%)",
            human(step.bytes_done),
            human(step.bytes_total)
        )
    } else if step.bytes_done > 0 {
        human(step.bytes_done)
    } else {
        "-".to_owned()
    }
}

fn render_job(job: &JobView) -> String {
    let mut state = job.state.clone();
    if let Some(reason) = &job.wait_reason {
        state.push_str(&format!(" (waiting: {reason})"));
    }
    if job.cancel_requested && !is_terminal(&job.state) {
        state.push_str(" (cancel requested)");
    }
    let fields = [
        ("job", job.job.clone()),
        ("kind", job.kind.clone()),
        ("vm", format!("{} ({})", job.vm_name, job.vm)),
        ("state", state),
        ("reason", job.reason.clone()),
        ("node", or_dash(job.node.as_deref())),
        ("requested", format_ms(job.requested_at)),
        ("started", time_or_dash(job.started_at)),
        ("finished", time_or_dash(job.finished_at)),
        ("recovery point", or_dash(job.rp.as_deref())),
        ("error", or_dash(job.error.as_deref())),
    ];
    let mut out = String::new();
    for (name, value) in fields {
        out.push_str(&format!("{name:<15} {value}\n"));
    }
    if job.steps.is_empty() {
        out.push_str("\nno steps planned yet\n");
        return out;
    }
    let mut table = Table::new(&[
        "#", "STEP", "STATE", "ATTEMPT", "NODE", "STARTED", "FINISHED", "PROGRESS", "ERROR",
    ]);
    for (idx, step) in job.steps.iter().enumerate() {
        table.row(vec![
            (idx + 1).to_string(),
            step.kind.clone(),
            step.state.clone(),
            step.attempt.to_string(),
            or_dash(step.node.as_deref()),
            time_or_dash(step.started_at),
            time_or_dash(step.finished_at),
            step_progress(step),
            or_dash(step.error.as_deref()),
        ]);
    }
    out.push('\n');
    out.push_str(&table.render());
    out
}

/// `cairn rp delete|undelete VM RP...` (`what` is the route's last part).
fn rp_delete(vm: &str, rps: &[String], opts: &ServerOpts, what: &str) -> Result<i32> {
    let client = Client::new(opts)?;
    let vm = resolve_vm(&client, vm)?;
    let known: Vec<RpView> =
        from_value(client.get(&format!("/v1/vms/{vm}/recovery-points"), &[])?)?;
    let mut ids = Vec::with_capacity(rps.len());
    for arg in rps {
        if arg == "latest" {
            bail!("name recovery points by id (or a unique prefix), not `latest`");
        }
        ids.push(pick_rp(&known, arg).map_err(|message| anyhow::anyhow!(message))?);
    }
    let body = serde_json::json!({ "rps": ids });
    let value = client.post(&format!("/v1/vms/{vm}/recovery-points/{what}"), Some(&body))?;
    if opts.json {
        print_json(&value);
        return Ok(0);
    }
    let after: Vec<RpView> =
        from_value(client.get(&format!("/v1/vms/{vm}/recovery-points"), &[])?)?;
    for id in &ids {
        match after.iter().find(|r| &r.rp == id) {
            Some(RpView {
                purge_after: Some(purge_after),
                ..
            }) if what == "delete" => println!(
                "deleted {id}; `cairn rp undelete` restores it until {}",
                format_ms(*purge_after)
            ),
            _ => println!("{what}d {id}"),
        }
    }
    Ok(0)
}

fn render_rps(rps: &[RpView]) -> String {
    if rps.is_empty() {
        return "no recovery points\n".to_owned();
    }
    let mut sorted: Vec<&RpView> = rps.iter().collect();
    sorted.sort_by_key(|rp| rp.taken_at);
    let mut table = Table::new(&[
        "RECOVERY POINT",
        "TAKEN",
        "CONSISTENCY",
        "DISKS",
        "READ",
        "STORED",
        "JOB",
        "STATE",
    ]);
    for rp in sorted {
        let state = match (&rp.deleted_by, rp.purge_after) {
            (Some(by), Some(purge_after)) => {
                format!("deleted by {by}, purged after {}", format_ms(purge_after))
            }
            _ => rp.state.clone(),
        };
        table.row(vec![
            rp.rp.clone(),
            format_ms(rp.taken_at),
            rp.consistency.clone(),
            rp.disks.len().to_string(),
            human(rp.disks.iter().map(|d| d.bytes_read).sum()),
            human(rp.disks.iter().map(|d| d.bytes_stored).sum()),
            rp.job.clone(),
            state,
        ]);
    }
    table.render()
}

fn render_event(event: &EventView) -> String {
    format!(
        "{:>8}  {}  {}  {}  {}  {}",
        event.seq,
        format_ms(event.recorded_at),
        event.aggregate,
        event.name,
        event.actor,
        event.summary
    )
}

fn render_audit(report: &AuditReport) -> String {
    let mut text = render_chain(report);
    if let Some(from) = report.keyed_from {
        if from > 1 {
            text.push_str(&format!(
                "\n  keyed with the audit key from event {from}; the links of events 1 to {} \
                 are plain BLAKE3 (written before the log had a key)",
                from - 1
            ));
        } else {
            text.push_str("\n  keyed with the audit key from the first event");
        }
    } else {
        text.push_str("\n  the chain is not keyed (no audit key)");
    }
    if let Some(cp) = &report.checkpoints {
        text.push_str(&format!("\ncheckpoints in {}: ", cp.sink));
        match &cp.first_mismatch {
            None => text.push_str(&format!(
                "{} match the log{}",
                cp.matched,
                cp.last_matched_seq
                    .map(|seq| format!(" (up to event {seq})"))
                    .unwrap_or_default()
            )),
            Some(m) => text.push_str(&format!(
                "BROKEN: the log no longer matches checkpoint {} (event {}, signed by {}): {}; \
                 {} earlier checkpoints match",
                m.file, m.seq, m.signer, m.detail, cp.matched
            )),
        }
        for rejected in &cp.rejected {
            text.push_str(&format!(
                "\n  NOT TRUSTED: {}: {}",
                rejected.file, rejected.reason
            ));
        }
    }
    text
}

fn render_chain(report: &AuditReport) -> String {
    if report.first_broken_seq.is_none() && report.first_broken_event.is_none() {
        return format!(
            "ok: {} events checked, the hash chain is intact",
            report.events_checked
        );
    }
    let mut text = String::from("BROKEN: the hash chain breaks");
    match (report.first_broken_seq, &report.first_broken_event) {
        (Some(seq), Some(event)) => text.push_str(&format!(" at event {seq} ({event})")),
        (Some(seq), None) => text.push_str(&format!(" at event {seq}")),
        (None, Some(event)) => text.push_str(&format!(" at event {event}")),
        (None, None) => {}
    }
    if let Some(detail) = &report.detail {
        text.push_str(&format!(": {detail}"));
    }
    text.push_str(&format!("; {} events checked", report.events_checked));
    text
}

/// The last line of a waited-for job.
fn render_outcome(job: &JobView) -> String {
    let start = job.started_at.unwrap_or(job.requested_at);
    let took = match job.finished_at {
        Some(end) if end >= start => {
            format!(
                " in {}",
                format_duration(Duration::from_millis(end - start))
            )
        }
        _ => String::new(),
    };
    match job.state.as_str() {
        "Succeeded" => match (&job.rp, job.kind.as_str()) {
            (Some(rp), "Recovery") => {
                format!(
                    "job {} succeeded{took}: restored recovery point {rp}",
                    job.job
                )
            }
            (Some(rp), _) => format!("job {} succeeded{took}: recovery point {rp}", job.job),
            (None, _) => format!("job {} succeeded{took}", job.job),
        },
        state => format!(
            "job {} {}{took}: {}",
            job.job,
            state.to_lowercase(),
            job.error.as_deref().unwrap_or("no error recorded")
        ),
    }
}

/// Prints what changed in a job since the last look: its state, each step's state, and a
/// step's progress in steps of 10%.
#[derive(Debug, Default)]
struct ProgressPrinter {
    job_state: Option<String>,
    /// Per step id: the last state printed and the last tenth of progress printed.
    steps: HashMap<String, (String, u64)>,
}

impl ProgressPrinter {
    fn update(&mut self, job: &JobView) -> Vec<String> {
        let mut lines = Vec::new();
        let job_state = match &job.wait_reason {
            Some(reason) => format!("{} (waiting: {reason})", job.state),
            None => job.state.clone(),
        };
        if self.job_state.as_deref() != Some(job_state.as_str()) && !is_terminal(&job.state) {
            lines.push(format!("job {job_state}"));
        }
        self.job_state = Some(job_state);
        for step in &job.steps {
            let tenth = step
                .bytes_done
                .saturating_mul(10)
                .checked_div(step.bytes_total)
                .unwrap_or(0);
            let changed = match self.steps.get(&step.step) {
                None => step.state != "Pending",
                Some((state, last_tenth)) => {
                    *state != step.state || (step.state == "Running" && tenth > *last_tenth)
                }
            };
            if changed {
                let mut line = format!("  {:<22} {:<14}", step.kind, step.state);
                if step.attempt > 1 {
                    line.push_str(&format!(" attempt {}", step.attempt));
                }
                let progress = step_progress(step);
                if progress != "-" {
                    line.push_str(&format!(" {progress}"));
                }
                if let Some(error) = &step.error {
                    line.push_str(&format!(" {error}"));
                }
                lines.push(line.trim_end().to_owned());
                self.steps
                    .insert(step.step.clone(), (step.state.clone(), tenth));
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_orchestrator::views::{DiskView, RpDiskView};
    use clap::Parser;

    /// The client commands as the `cairn` binary parses them.
    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(subcommand)]
        command: ClientCommand,
    }

    fn parse(args: &[&str]) -> Result<ClientCommand, clap::Error> {
        TestCli::try_parse_from(std::iter::once("cairn").chain(args.iter().copied()))
            .map(|cli| cli.command)
    }

    const VM_1: &str = "0190a000-0000-7000-8000-000000000001";
    const VM_2: &str = "0190a000-0000-7000-8000-000000000002";
    const VM_3: &str = "0190a000-0000-7000-8000-000000000003";

    fn vm(id: &str, name: &str, node: &str) -> VmView {
        VmView {
            vm: id.into(),
            name: name.into(),
            node: node.into(),
            power: "Running".into(),
            disks: vec![DiskView {
                disk: "disk0".into(),
                size_bytes: 10 << 30,
                format: "Qcow2".into(),
                image_path: "/vms/x.qcow2".into(),
                state: "Protected".into(),
                change_tracking: "active".into(),
            }],
            group: None,
            last_backup_at: None,
            recovery_points: 0,
            present: true,
        }
    }

    fn rp(id: &str, taken_at: u64) -> RpView {
        RpView {
            rp: id.into(),
            vm: VM_1.into(),
            job: "0190b000-0000-7000-8000-000000000001".into(),
            taken_at,
            consistency: "CrashConsistent".into(),
            disks: vec![RpDiskView {
                disk: "disk0".into(),
                bytes_read: 3 << 30,
                bytes_stored: 1 << 29,
            }],
            state: "live".into(),
            deleted_at: None,
            purge_after: None,
            deleted_by: None,
        }
    }

    fn step(id: &str, kind: &str, state: &str, done: u64, total: u64) -> StepView {
        StepView {
            step: id.into(),
            kind: kind.into(),
            state: state.into(),
            attempt: 1,
            node: Some("kvm-01".into()),
            started_at: Some(1_764_086_645_000),
            finished_at: None,
            bytes_done: done,
            bytes_total: total,
            error: None,
        }
    }

    fn job(state: &str, steps: Vec<StepView>) -> JobView {
        JobView {
            job: "0190b000-0000-7000-8000-000000000009".into(),
            kind: "Backup".into(),
            vm: VM_1.into(),
            vm_name: "web-01".into(),
            state: state.into(),
            wait_reason: None,
            reason: "Manual".into(),
            node: Some("kvm-01".into()),
            requested_at: 1_764_086_640_000,
            started_at: Some(1_764_086_645_000),
            finished_at: None,
            error: None,
            cancel_requested: false,
            rp: None,
            steps,
            recovery: None,
        }
    }

    #[test]
    fn commands_parse() {
        let ClientCommand::Group {
            command:
                GroupCommand::Create {
                    name,
                    vms,
                    retention_days,
                    sync,
                    opts,
                    ..
                },
        } = parse(&[
            "group",
            "create",
            "web",
            "--vm",
            "web-01",
            "--vm",
            VM_2,
            "--retention-days",
            "14",
            "--sync",
            "1h",
            "--json",
            "--server",
            "http://orch:7480",
        ])
        .unwrap()
        else {
            panic!("expected group create");
        };
        assert_eq!(name, "web");
        assert_eq!(vms, ["web-01", VM_2]);
        assert_eq!(retention_days, Some(14));
        assert_eq!(sync.as_deref(), Some("1h"));
        assert!(opts.json);
        assert_eq!(opts.server, "http://orch:7480");

        let ClientCommand::Backup(args) =
            parse(&["backup", "web-01", "--wait", "--timeout", "30m"]).unwrap()
        else {
            panic!("expected backup");
        };
        assert_eq!(args.vm, "web-01");
        assert_eq!(args.mode, Mode::Incremental);
        assert!(args.wait.wait);
        assert_eq!(args.wait.timeout, Duration::from_secs(1800));
        assert!(!args.opts.json);

        let ClientCommand::Backup(args) =
            parse(&["backup", "db", "--mode", "express-full"]).unwrap()
        else {
            panic!("expected backup");
        };
        assert_eq!(args.mode, Mode::ExpressFull);
        assert_eq!(args.wait.timeout, Duration::from_secs(24 * 3600));

        let ClientCommand::Restore(args) = parse(&[
            "restore", "web-01", "--rp", "latest", "--to", "/srv/r", "--node", "kvm-02",
        ])
        .unwrap() else {
            panic!("expected restore");
        };
        assert_eq!(
            (args.rp.as_str(), args.to.as_str(), args.node.as_deref()),
            ("latest", "/srv/r", Some("kvm-02"))
        );

        let ClientCommand::Events {
            command:
                EventsCommand::Tail {
                    follow,
                    from,
                    lines,
                    ..
                },
        } = parse(&["events", "tail", "--follow", "--from", "42"]).unwrap()
        else {
            panic!("expected events tail");
        };
        assert_eq!((follow, from, lines), (true, Some(42), 20));

        for ok in [
            &["vm", "list"][..],
            &["group", "list"],
            &[
                "jobs", "--state", "Running", "--vm", "web-01", "--limit", "5",
            ],
            &["job", "show", VM_1],
            &["job", "cancel", VM_1, "--reason", "maintenance"],
            &["rp", "list", "web-01"],
            &["audit", "verify", "--json"],
        ] {
            assert!(parse(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            &["group", "create", "web", "--sync", "20 parsecs"][..],
            &["backup"],
            &["backup", "web-01", "--mode", "full"],
            &["backup", "web-01", "--timeout", "soon"],
            &["restore", "web-01", "--to", "/srv"],
            &["vm", "remove"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("6h"), Ok(Duration::from_secs(6 * 3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(2 * 86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        for bad in ["", "m", "5 parsecs", "-5s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_duration(Duration::from_millis(4_200)), "4.2s");
        assert_eq!(format_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(format_duration(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn vms_are_named_by_id_or_unique_name() {
        let vms = [
            vm(VM_1, "web-01", "kvm-01"),
            vm(VM_2, "db", "kvm-01"),
            vm(VM_3, "db", "kvm-02"),
        ];
        assert_eq!(pick_vm(&vms, VM_2), Ok(VM_2.to_owned()));
        assert_eq!(pick_vm(&vms, "web-01"), Ok(VM_1.to_owned()));
        let err = pick_vm(&vms, "db").unwrap_err();
        assert!(
            err.contains("ambiguous") && err.contains(VM_2) && err.contains(VM_3),
            "{err}"
        );
        let err = pick_vm(&vms, "mail").unwrap_err();
        assert!(err.contains("no vm named \"mail\""), "{err}");
        assert!(looks_like_uuid(VM_1));
        assert!(!looks_like_uuid("web-01"));
        assert!(!looks_like_uuid("0190a000-0000-7000-8000-00000000000g"));
        assert!(!looks_like_uuid("0190a000-0000-7000-8000-0000000000011"));
    }

    #[test]
    fn recovery_points_are_named_by_id_prefix_or_latest() {
        let rps = [
            rp("0190c000-aaaa-7000-8000-000000000001", 1_000),
            rp("0190c000-bbbb-7000-8000-000000000002", 3_000),
            rp("0190c111-cccc-7000-8000-000000000003", 2_000),
        ];
        assert_eq!(pick_rp(&rps, "latest"), Ok(rps[1].rp.clone()));
        assert_eq!(pick_rp(&rps, &rps[2].rp), Ok(rps[2].rp.clone()));
        assert_eq!(pick_rp(&rps, "0190c111"), Ok(rps[2].rp.clone()));
        assert_eq!(pick_rp(&rps, "0190c000-b"), Ok(rps[1].rp.clone()));
        assert!(pick_rp(&rps, "0190c000").unwrap_err().contains("matches 2"));
        assert!(pick_rp(&rps, "0190c").unwrap_err().contains("at least 8"));
        assert!(
            pick_rp(&rps, "0190dddd")
                .unwrap_err()
                .contains("no recovery point")
        );
        assert!(
            pick_rp(&[], "latest")
                .unwrap_err()
                .contains("no recovery point")
        );
    }

    #[test]
    fn tables_align_their_columns() {
        let mut table = Table::new(&["NAME", "STATE", "NOTE"]);
        table.row(vec!["web-01".into(), "Running".into(), "-".into()]);
        table.row(vec!["db".into(), "Failed".into(), "disk full".into()]);
        assert_eq!(
            table.render(),
            "NAME    STATE    NOTE\n\
             web-01  Running  -\n\
             db      Failed   disk full\n"
        );
    }

    #[test]
    fn vm_list_shows_group_names_and_protection() {
        let mut protected = vm(VM_1, "web-01", "kvm-01");
        protected.group = Some("g1".into());
        protected.last_backup_at = Some(1_764_086_645_000);
        protected.recovery_points = 3;
        let mut gone = vm(VM_2, "old", "kvm-02");
        gone.present = false;
        let names = HashMap::from([("g1".to_owned(), "web".to_owned())]);
        let text = render_vms(&[protected, gone], &names);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{text}");
        // Sorted by name: "old" before "web-01".
        assert!(
            lines[1].starts_with("old ") && lines[1].contains("gone"),
            "{text}"
        );
        assert!(lines[1].contains("unprotected"), "{text}");
        assert!(lines[2].contains(" web "), "{text}");
        assert!(lines[2].contains("Protected"), "{text}");
        assert!(lines[2].contains("2025-11-25 16:04:05"), "{text}");
        assert!(lines[2].contains("10.0 GiB"), "{text}");
        assert_eq!(render_vms(&[], &names), "no vms reported yet\n");
    }

    #[test]
    fn job_show_is_a_readable_table() {
        let mut failed = step("s2", "Transfer disk0", "Failed", 1 << 30, 4 << 30);
        failed.attempt = 3;
        failed.error = Some("read error at offset 1048576".into());
        let mut shown = job(
            "Failed",
            vec![step("s1", "Snapshot", "Succeeded", 0, 0), failed],
        );
        shown.error = Some("step Transfer disk0 failed".into());
        shown.finished_at = Some(1_764_086_705_000);
        let text = render_job(&shown);
        assert!(text.contains("vm              web-01 (0190a000"), "{text}");
        assert!(text.contains("state           Failed\n"), "{text}");
        assert!(
            text.contains("requested       2025-11-25 16:04:00"),
            "{text}"
        );
        assert!(
            text.contains("finished        2025-11-25 16:05:05"),
            "{text}"
        );
        assert!(
            text.contains("error           step Transfer disk0 failed"),
            "{text}"
        );
        let step_line = text
            .lines()
            .find(|line| line.starts_with("2 "))
            .unwrap_or_else(|| panic!("no line of step 2 in {text}"));
        for word in [
            "Transfer disk0",
            "Failed",
            " 3 ",
            "1.0 GiB / 4.0 GiB (25%)",
            "read error at offset 1048576",
        ] {
            assert!(step_line.contains(word), "{step_line:?} lacks {word:?}");
        }
        assert!(render_jobs(&[shown]).contains("step Transfer disk0 failed"));
    }

    #[test]
    fn waiting_prints_changes_only() {
        let mut printer = ProgressPrinter::default();
        let mut current = job(
            "Running",
            vec![
                step("s1", "Snapshot", "Running", 0, 0),
                step("s2", "Transfer disk0", "Pending", 0, 0),
            ],
        );
        assert_eq!(
            printer.update(&current),
            ["job Running", "  Snapshot               Running"]
        );
        assert!(printer.update(&current).is_empty());
        current.steps[0].state = "Succeeded".into();
        current.steps[1] = step("s2", "Transfer disk0", "Running", 5 << 20, 100 << 20);
        let lines = printer.update(&current);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[1].ends_with("5.0 MiB / 100.0 MiB (5%)"), "{lines:?}");
        // Less than another tenth: nothing; past it: one line.
        current.steps[1].bytes_done = 9 << 20;
        assert!(printer.update(&current).is_empty());
        current.steps[1].bytes_done = 31 << 20;
        assert_eq!(printer.update(&current).len(), 1);
        current.wait_reason = Some("NodeBusy".into());
        assert_eq!(
            printer.update(&current),
            ["job Running (waiting: NodeBusy)"]
        );

        current.state = "Succeeded".into();
        current.finished_at = Some(1_764_086_717_000);
        current.rp = Some("0190c000-0000-7000-8000-000000000001".into());
        assert_eq!(
            render_outcome(&current),
            "job 0190b000-0000-7000-8000-000000000009 succeeded in 1m12s: \
             recovery point 0190c000-0000-7000-8000-000000000001"
        );
        current.kind = "Recovery".into();
        assert!(render_outcome(&current).ends_with(
            "succeeded in 1m12s: restored recovery point 0190c000-0000-7000-8000-000000000001"
        ));
        current.state = "Cancelled".into();
        current.error = Some("cancelled by user:alice".into());
        assert!(render_outcome(&current).ends_with("cancelled in 1m12s: cancelled by user:alice"));
    }

    #[test]
    fn audit_names_the_first_broken_event() {
        let mut report = AuditReport {
            ok: true,
            events_checked: 12,
            first_broken_seq: None,
            first_broken_event: None,
            detail: None,
            keyed_from: Some(1),
            checkpoints: None,
        };
        assert_eq!(
            render_audit(&report),
            "ok: 12 events checked, the hash chain is intact\n  keyed with the audit key from \
             the first event"
        );
        report.ok = false;
        report.first_broken_seq = Some(7);
        report.first_broken_event = Some("0190e000-0000-7000-8000-000000000007".into());
        report.detail = Some("prev_hash does not match".into());
        report.keyed_from = Some(5);
        report.checkpoints = Some(cairn_orchestrator::views::CheckpointReport {
            sink: "/data/checkpoints".into(),
            ok: false,
            matched: 1,
            last_matched_seq: Some(4),
            first_mismatch: Some(cairn_orchestrator::views::CheckpointMismatch {
                file: "00000000000000000010-local.json".into(),
                seq: 10,
                signer: "local".into(),
                detail: "digests differ".into(),
            }),
            rejected: vec![cairn_orchestrator::views::RejectedCheckpoint {
                file: "x.json".into(),
                reason: "bad signature".into(),
            }],
        });
        assert_eq!(
            render_audit(&report),
            "BROKEN: the hash chain breaks at event 7 (0190e000-0000-7000-8000-000000000007): \
             prev_hash does not match; 12 events checked\n  keyed with the audit key from event \
             5; the links of events 1 to 4 are plain BLAKE3 (written before the log had a key)\n\
             checkpoints in /data/checkpoints: BROKEN: the log no longer matches checkpoint \
             00000000000000000010-local.json (event 10, signed by local): digests differ; 1 \
             earlier checkpoints match\n  NOT TRUSTED: x.json: bad signature"
        );
    }

    #[test]
    fn error_bodies_become_messages() {
        let body = r#"{"error":{"code":"unknown_vm","message":"no vm 0190"}}"#;
        let err = ApiError::from_body(404, body);
        assert_eq!(err.to_string(), "no vm 0190 (unknown_vm)");
        let err = ApiError::from_body(502, "<html>Bad Gateway</html>");
        assert_eq!(err.to_string(), "<html>Bad Gateway</html> (http_502)");
        assert_eq!(
            ApiError::from_body(503, "").to_string(),
            "the server answered HTTP 503 (http_503)"
        );
        assert!(segment("../../etc").is_err());
        assert!(segment(VM_1).is_ok());
    }

    /// Reads one HTTP request (head and announced body) from `stream`.
    fn read_request(stream: &mut std::net::TcpStream) -> String {
        use std::io::Read;
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).unwrap();
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_owned)
                    })
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        String::from_utf8_lossy(&request).into_owned()
    }

    fn header_of(request: &str, name: &str) -> Option<String> {
        request.lines().find_map(|l| {
            let (key, value) = l.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    }

    #[test]
    fn a_lost_answer_is_asked_again_with_the_same_key() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            // 1: the request arrives and the connection drops before any answer.
            let (mut stream, _) = listener.accept().unwrap();
            seen.push(read_request(&mut stream));
            drop(stream);
            // 2: a proxy in front says the orchestrator is briefly unavailable.
            let (mut stream, _) = listener.accept().unwrap();
            seen.push(read_request(&mut stream));
            let body = r#"{"error":{"code":"unavailable","message":"moving"}}"#;
            write!(
                stream,
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            drop(stream);
            // 3: the answer.
            let (mut stream, _) = listener.accept().unwrap();
            seen.push(read_request(&mut stream));
            let body = r#"{"id":"j","seq":4,"replayed":true}"#;
            write!(
                stream,
                "HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            seen
        });
        let client = Client::connect(&url, None, None).unwrap();
        let value = client
            .post::<BackupRequest>(&format!("/v1/vms/{VM_1}/backup"), None)
            .unwrap();
        assert_eq!(value["id"], "j");
        let seen = server.join().unwrap();
        let keys: Vec<_> = seen
            .iter()
            .map(|r| header_of(r, "idempotency-key").expect("every attempt has a key"))
            .collect();
        assert_eq!(keys.len(), 3);
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
        assert_eq!(keys[0].len(), 32, "a random key of 16 bytes in hex");
    }

    #[test]
    fn an_invocation_key_names_each_post_and_bad_keys_are_refused() {
        let keys = RequestKeys::new(Some("nightly-2026-12-03")).unwrap();
        assert_eq!(keys.next(), "nightly-2026-12-03");
        assert_eq!(keys.next(), "nightly-2026-12-03/2");
        assert_eq!(keys.next(), "nightly-2026-12-03/3");
        let random = RequestKeys::new(None).unwrap();
        assert_ne!(random.next(), RequestKeys::new(None).unwrap().next());
        for bad in ["", "has space", "tab\t", &"k".repeat(MAX_KEY_LEN + 1)] {
            let message = RequestKeys::new(Some(bad)).unwrap_err().to_string();
            assert!(message.contains("--idempotency-key"), "{message}");
        }
    }

    /// Serves one canned HTTP answer on a loopback port; returns the URL and the thread that
    /// hands back the request it read.
    fn one_shot_server(
        status: &'static str,
        body: &'static str,
    ) -> (String, std::thread::JoinHandle<String>) {
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let request = read_request(&mut stream);
            stream.write_all(answer.as_bytes()).unwrap();
            request
        });
        (url, handle)
    }

    #[test]
    fn client_reads_answers_and_error_bodies() {
        let (url, server) = one_shot_server(
            "409 Conflict",
            r#"{"error":{"code":"job_running","message":"a backup is running"}}"#,
        );
        let client = Client::connect(&format!("{url}/"), None, None).unwrap();
        let request = BackupRequest {
            mode: Some(BackupModeWire::ExpressFull),
        };
        let err = client
            .post(&format!("/v1/vms/{VM_1}/backup"), Some(&request))
            .unwrap_err();
        let api = err.downcast_ref::<ApiError>().expect("an ApiError");
        assert_eq!((api.status, api.code.as_str()), (409, "job_running"));
        let sent = server.join().unwrap();
        assert!(
            sent.starts_with(&format!("POST /v1/vms/{VM_1}/backup HTTP/1.1")),
            "{sent}"
        );
        assert!(sent.ends_with(r#"{"mode":"express-full"}"#), "{sent}");

        let (url, server) = one_shot_server("200 OK", "[]");
        let client = Client::connect(&url, None, None).unwrap();
        let value = client
            .get(
                "/v1/jobs",
                &[("state", "Running".into()), ("limit", "5".into())],
            )
            .unwrap();
        assert_eq!(value, serde_json::json!([]));
        let sent = server.join().unwrap();
        assert!(
            sent.starts_with("GET /v1/jobs?state=Running&limit=5 HTTP/1.1"),
            "{sent}"
        );
    }

    #[test]
    fn an_absent_server_gets_a_hint() {
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = Client::connect(&format!("http://127.0.0.1:{port}"), None, None).unwrap();
        let message = client.get("/v1/vms", &[]).unwrap_err().to_string();
        assert!(message.contains("is `cairn up` running?"), "{message}");
        assert!(message.contains("CAIRN_SERVER"), "{message}");
        assert!(Client::connect("https://orch:7480", None, None).is_ok());
        for bad in ["orch:7480", "ftp://orch:7480", "HTTP//orch"] {
            let message = Client::connect(bad, None, None).err().unwrap().to_string();
            assert!(message.contains("http:// or https://"), "{message}");
        }
    }

    #[test]
    fn a_ca_file_must_hold_certificates_and_nothing_secret() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIHi4w8YCc0cQ2LhEYb2kG3c4x1c5F7xNn0bq2m3xXqQb\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        for (file, words) in [
            (&missing, &["--ca-file", "missing.pem"][..]),
            (&empty, &["empty.pem", "holds no PEM certificate"][..]),
            (&key, &["key.pem", "private key"][..]),
        ] {
            let message = format!(
                "{:#}",
                Client::connect("https://orch:7480", Some(file), None)
                    .err()
                    .unwrap()
            );
            for word in words {
                assert!(
                    message.contains(word),
                    "{message:?} should contain {word:?}"
                );
            }
        }
        // An http:// server needs no CA: the file is not read.
        Client::connect("http://orch:7480", Some(&missing), None).unwrap();
    }
}
