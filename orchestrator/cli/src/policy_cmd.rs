//! Client commands of protection policies: `cairn group show|set-policy|plan`, the policy
//! flags of `cairn group create`, `cairn check`, `cairn verify`, `cairn alerts`,
//! `cairn rp list --calendar` and `cairn seed import`; and `cairn seed export`, which runs
//! on the VM's node without a server and writes the VM's disks to a folder (removable media)
//! as a small repository that `cairn seed import` turns into the first recovery point.
//!
//! Like the other client commands they hold no state and decide nothing: every check that
//! matters is the server's (flags are only turned into the API's policy JSON).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cairn_orchestrator::api::wire::{CreateGroupRequest, SeedRequest};
use cairn_orchestrator::views::{
    Accepted, AlertView, CalendarDayView, CapacityView, CheckWindowView, GroupDetailView,
    GroupView, PolicyView, ScheduleView,
};
use cairn_schemas::GroupPolicy;
use cairn_worker::agent::{Descriptor, lineage_id};
use cairn_worker::repo::{self, Repository};
use clap::Args;

use crate::client_cmd::{
    Client, ServerOpts, Table, WaitOpts, from_value, print_json, resolve_vm, time_or_dash,
    wait_for_job,
};
use crate::progress::Bar;
use crate::repo_cmd::format_ms;
use crate::units::human;

/// A group's deletion protection (`group create`, `group set-policy`): set after the policy,
/// each through its own route.
#[derive(Debug, Clone, Default, Args)]
pub struct LockFlags {
    /// Retention lock: retention cannot be set below it and younger recovery points cannot be
    /// deleted, e.g. 30d (0 = none). Raising is immediate; lowering needs an admin and takes
    /// effect after the current lock's period.
    #[arg(long, value_name = "DAYS", value_parser = parse_days)]
    retention_lock: Option<u32>,
    /// How long deleted recovery points stay restorable, 1d to 90d (admin only; default 14d).
    #[arg(long, value_name = "DAYS", value_parser = parse_days)]
    soft_delete: Option<u32>,
}

/// `30d`, `30` or another whole number of days (`2w`, `48h`): a number of days.
fn parse_days(text: &str) -> std::result::Result<u32, crate::units::Error> {
    let days = crate::units::parse_whole(text, std::time::Duration::from_secs(86_400), "days")?;
    u32::try_from(days).map_err(|_| crate::units::Error::TooLarge {
        text: text.to_owned(),
    })
}

/// Sends the lock flags given for group `id`; says what changed unless `json`.
pub fn apply_lock_flags(client: &Client, id: &str, flags: &LockFlags, json: bool) -> Result<()> {
    if let Some(days) = flags.retention_lock {
        let body = serde_json::json!({ "days": days });
        client.post(&format!("/v1/groups/{id}/retention-lock"), Some(&body))?;
        let g: GroupDetailView = from_value(client.get(&format!("/v1/groups/{id}"), &[])?)?;
        if !json {
            match &g.retention_lock_pending {
                Some(p) => println!(
                    "retention lock of {} days takes effect at {} (until then {} days hold)",
                    p.days,
                    format_ms(p.effective_at),
                    g.retention_lock_days
                ),
                None => println!("retention lock {} days", g.retention_lock_days),
            }
        }
    }
    if let Some(days) = flags.soft_delete {
        let body = serde_json::json!({ "days": days });
        client.post(&format!("/v1/groups/{id}/soft-delete"), Some(&body))?;
        if !json {
            println!("deleted recovery points stay restorable for {days} days");
        }
    }
    Ok(())
}

/// `cairn group delete GROUP [--delete-recovery-points]`.
pub fn group_delete(name: &str, delete_rps: bool, opts: &ServerOpts) -> Result<i32> {
    let client = Client::new(opts)?;
    let id = resolve_group(&client, name)?;
    let body = serde_json::json!({ "delete_recovery_points": delete_rps });
    let value = client.post(&format!("/v1/groups/{id}/delete"), Some(&body))?;
    if opts.json() {
        print_json(&value);
    } else if delete_rps {
        println!(
            "deleted group {name}; its recovery points are soft-deleted (`cairn rp list VM` \
             shows until when `cairn rp undelete` restores them)"
        );
    } else {
        println!("deleted group {name}; its recovery points stay until deleted");
    }
    Ok(0)
}

/// `cairn group add-vm` and `remove-vm`.
pub fn group_members(
    name: &str,
    add: &[String],
    remove: &[String],
    delete_rps: bool,
    opts: &ServerOpts,
) -> Result<i32> {
    let client = Client::new(opts)?;
    let id = resolve_group(&client, name)?;
    let add = crate::client_cmd::resolve_vms(&client, add)?;
    let remove = crate::client_cmd::resolve_vms(&client, remove)?;
    let body = serde_json::json!({
        "add": add,
        "remove": remove,
        "delete_recovery_points": delete_rps,
    });
    let value = client.post(&format!("/v1/groups/{id}/members"), Some(&body))?;
    if opts.json() {
        print_json(&value);
    } else if !add.is_empty() {
        println!(
            "group {name} protects {} more VM(s) from its next run",
            add.len()
        );
    } else if delete_rps {
        println!(
            "group {name} no longer protects {} VM(s); their recovery points are soft-deleted \
             (`cairn rp list VM` shows until when `cairn rp undelete` restores them)",
            remove.len()
        );
    } else {
        println!(
            "group {name} no longer protects {} VM(s); their recovery points stay until deleted",
            remove.len()
        );
    }
    Ok(0)
}

/// Policy settings beyond retention, sync and repository (`group create`, `group set-policy`).
#[derive(Debug, Clone, Default, Args)]
pub struct PolicyFlags {
    /// Recovery point times of day, e.g. 08:00,20:00 (in the server's time zone).
    #[arg(long, value_name = "HH:MM,...")]
    rp_times: Option<String>,
    /// Days with recovery points: mon,tue,... or all, workdays, weekend.
    #[arg(long, value_name = "DAYS")]
    rp_days: Option<String>,
    /// Express full backups, e.g. "sun 22:00" or "sat,sun 23:00,03:00", or "none".
    #[arg(long, value_name = "DAYS TIMES")]
    express_full: Option<String>,
    /// Consistency checks: auto (when a replica is inconsistent), manual, or
    /// window:START/HOURSh/DAYS (e.g. window:02:00/4h/sat,sun), or auto+window:...
    #[arg(long, value_name = "MODE")]
    cc: Option<String>,
    /// Replica creation: now, manual-seed, or at:YYYY-MM-DDTHH:MMZ.
    #[arg(long, value_name = "WHEN")]
    replica: Option<String>,
    /// Parallel backups per node.
    #[arg(long)]
    per_node: Option<u16>,
    /// Parallel backups per shared volume (folder of the images).
    #[arg(long)]
    per_volume: Option<u16>,
    /// Consistency wanted: application (guest freeze, crash fallback) or crash.
    #[arg(long)]
    consistency: Option<String>,
}

impl PolicyFlags {
    fn any(&self) -> bool {
        self.rp_times.is_some()
            || self.rp_days.is_some()
            || self.express_full.is_some()
            || self.cc.is_some()
            || self.replica.is_some()
            || self.per_node.is_some()
            || self.per_volume.is_some()
            || self.consistency.is_some()
    }

    /// Applies the flags given to `view`.
    fn apply(&self, view: &mut PolicyView) -> Result<()> {
        let list = |text: &str| -> Vec<String> {
            text.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        if let Some(times) = &self.rp_times {
            view.recovery_points.times = list(times);
        }
        if let Some(days) = &self.rp_days {
            view.recovery_points.days = list(days);
        }
        if let Some(full) = &self.express_full {
            view.express_full = if full.trim() == "none" {
                ScheduleView {
                    times: vec![],
                    days: vec![],
                }
            } else {
                let (days, times) = full
                    .trim()
                    .split_once(' ')
                    .context("--express-full: use \"DAYS TIMES\", e.g. \"sun 22:00\", or none")?;
                ScheduleView {
                    times: list(times),
                    days: list(days),
                }
            };
        }
        if let Some(cc) = &self.cc {
            view.consistency_check.when_inconsistent = false;
            view.consistency_check.window = None;
            for part in cc.split('+') {
                match part.trim() {
                    "auto" => view.consistency_check.when_inconsistent = true,
                    "manual" => {}
                    other => {
                        let spec = other.strip_prefix("window:").with_context(|| {
                            format!(
                                "--cc: {other:?} is not auto, manual or window:START/HOURSh/DAYS"
                            )
                        })?;
                        let mut parts = spec.splitn(3, '/');
                        let (Some(start), Some(hours), Some(days)) =
                            (parts.next(), parts.next(), parts.next())
                        else {
                            bail!(
                                "--cc window: use window:START/HOURSh/DAYS, e.g. window:02:00/4h/sat,sun"
                            );
                        };
                        let hours: u32 =
                            hours.trim_end_matches('h').parse().with_context(|| {
                                format!("--cc window: {hours:?} is not a number of hours")
                            })?;
                        view.consistency_check.window = Some(CheckWindowView {
                            start: start.to_owned(),
                            max_duration_minutes: hours.saturating_mul(60),
                            days: list(days),
                        });
                    }
                }
            }
        }
        if let Some(replica) = &self.replica {
            view.replica_creation = match replica.trim() {
                "now" => "now".to_owned(),
                "manual-seed" | "manual" => "manual-seed".to_owned(),
                other => {
                    let at = other
                        .strip_prefix("at:")
                        .and_then(parse_utc)
                        .with_context(|| {
                            format!("--replica: {other:?} is not now, manual-seed or at:YYYY-MM-DDTHH:MMZ")
                        })?;
                    format!("at:{at}")
                }
            };
        }
        if let Some(n) = self.per_node {
            view.limits.backups_per_node = n;
        }
        if let Some(n) = self.per_volume {
            view.limits.backups_per_volume = n;
        }
        if let Some(c) = &self.consistency {
            view.consistency = c.clone();
        }
        Ok(())
    }
}

/// `YYYY-MM-DDTHH:MMZ` (UTC; the `Z` may be left out, seconds may be given) as Unix
/// milliseconds.
fn parse_utc(text: &str) -> Option<u64> {
    let civil: jiff::civil::DateTime = text.strip_suffix('Z').unwrap_or(text).parse().ok()?;
    let zoned = civil.to_zoned(jiff::tz::TimeZone::UTC).ok()?;
    u64::try_from(zoned.timestamp().as_millisecond()).ok()
}

/// The policy JSON of `group create` when policy flags are given: the server's defaults
/// (its default repository when none is named) with the flags applied.
pub fn create_request(
    name: String,
    vms: Vec<String>,
    retention_days: Option<u32>,
    sync: Option<String>,
    repository: Option<String>,
    flags: &PolicyFlags,
) -> Result<CreateGroupRequest> {
    if !flags.any() {
        return Ok(CreateGroupRequest {
            name,
            vms,
            retention_days,
            sync,
            repository,
            policy: None,
        });
    }
    let mut view =
        PolicyView::from_policy(&GroupPolicy::with_defaults(repository.unwrap_or_default()));
    if let Some(days) = retention_days {
        view.retention_days = u16::try_from(days).context("--retention-days is out of range")?;
    }
    if let Some(sync) = sync {
        view.sync = sync;
    }
    flags.apply(&mut view)?;
    Ok(CreateGroupRequest {
        name,
        vms,
        retention_days: None,
        sync: None,
        repository: None,
        policy: Some(view),
    })
}

/// The id of the group that `arg` names (id or name).
pub(crate) fn resolve_group(client: &Client, arg: &str) -> Result<String> {
    let groups: Vec<GroupView> = from_value(client.get("/v1/groups", &[])?)?;
    groups
        .iter()
        .find(|g| g.group == arg || g.name == arg)
        .map(|g| g.group.clone())
        .with_context(|| format!("no protection group {arg:?} (see `cairn group list`)"))
}

pub fn group_show(name: &str, opts: &ServerOpts) -> Result<i32> {
    let client = Client::new(opts)?;
    let id = resolve_group(&client, name)?;
    let value = client.get(&format!("/v1/groups/{id}"), &[])?;
    if opts.json() {
        print_json(&value);
        return Ok(0);
    }
    let g: GroupDetailView = from_value(value)?;
    let p = &g.policy;
    println!("group       {} ({})", g.name, g.group);
    println!("repository  {}", p.repository);
    println!("retention   {} days", p.retention_days);
    match &g.retention_lock_pending {
        Some(pending) => println!(
            "retention lock   {} days; lowered to {} days at {} (pending)",
            g.retention_lock_days,
            pending.days,
            format_ms(pending.effective_at)
        ),
        None if g.retention_lock_days > 0 => {
            println!("retention lock   {} days", g.retention_lock_days)
        }
        None => println!("retention lock   none"),
    }
    println!("soft delete      {} days", g.soft_delete_days);
    println!(
        "recovery points  {} on {}   (times in {})",
        p.recovery_points.times.join(", "),
        p.recovery_points.days.join(","),
        g.timezone
    );
    println!("synchronization  {}", p.sync);
    if p.express_full.times.is_empty() {
        println!("express full     none");
    } else {
        println!(
            "express full     {} on {}",
            p.express_full.times.join(", "),
            p.express_full.days.join(",")
        );
    }
    let window = p.consistency_check.window.as_ref().map(|w| {
        format!(
            "window {} for {} min on {}",
            w.start,
            w.max_duration_minutes,
            w.days.join(",")
        )
    });
    let cc = match (p.consistency_check.when_inconsistent, window) {
        (true, Some(w)) => format!("automatic when inconsistent, and {w}"),
        (true, None) => "automatic when inconsistent".to_owned(),
        (false, Some(w)) => w,
        (false, None) => "manual only".to_owned(),
    };
    println!("consistency checks  {cc}");
    println!("replica creation    {}", p.replica_creation);
    println!(
        "limits              {} backups per node, {} per volume, {} recoveries",
        p.limits.backups_per_node, p.limits.backups_per_volume, p.limits.recoveries
    );
    println!("next sync           {}", time_or_dash(g.next_sync));
    println!(
        "next recovery point {}",
        time_or_dash(g.next_recovery_point)
    );
    let mut table = Table::new(&[
        "VM",
        "STATE",
        "LAST BACKUP",
        "RPS",
        "KEEP",
        "PROTECTED",
        "REMOVE",
        "PAUSED SINCE",
    ]);
    for m in &g.members {
        table.row(vec![
            m.name.clone(),
            m.state.clone(),
            time_or_dash(m.last_backup_at),
            m.recovery_points.to_string(),
            m.keep.to_string(),
            m.protected.to_string(),
            m.remove.to_string(),
            time_or_dash(m.retention_paused_since),
        ]);
    }
    print!("\n{}", table.render());
    Ok(0)
}

pub fn group_set_policy(
    name: &str,
    retention_days: Option<u32>,
    sync: Option<String>,
    flags: &PolicyFlags,
    locks: &LockFlags,
    opts: &ServerOpts,
) -> Result<i32> {
    let client = Client::new(opts)?;
    let id = resolve_group(&client, name)?;
    let current: GroupDetailView = from_value(client.get(&format!("/v1/groups/{id}"), &[])?)?;
    let mut view = current.policy;
    let policy_given = retention_days.is_some() || sync.is_some() || flags.any();
    let locks_given = locks.retention_lock.is_some() || locks.soft_delete.is_some();
    if let Some(days) = retention_days {
        view.retention_days = u16::try_from(days).context("--retention-days is out of range")?;
    }
    if let Some(sync) = sync {
        view.sync = sync;
    }
    flags.apply(&mut view)?;
    if policy_given || !locks_given {
        let value = client.post(&format!("/v1/groups/{id}/policy"), Some(&view))?;
        if opts.json() {
            print_json(&value);
        } else {
            let accepted: Accepted = from_value(value)?;
            println!(
                "policy of group {name} changed (event {}); it applies from the next run",
                accepted.seq
            );
        }
    }
    apply_lock_flags(&client, &id, locks, opts.json())?;
    Ok(0)
}

pub fn group_plan(name: &str, opts: &ServerOpts) -> Result<i32> {
    let client = Client::new(opts)?;
    let id = resolve_group(&client, name)?;
    let value = client.get(&format!("/v1/groups/{id}/plan"), &[])?;
    if opts.json() {
        print_json(&value);
        return Ok(0);
    }
    let p: CapacityView = from_value(value)?;
    let or_unknown =
        |v: Option<u64>| v.map_or_else(|| "unknown (no worker report yet)".into(), human);
    println!(
        "disk allocation review of group {} ({} days of retention)",
        p.name, p.retention_days
    );
    println!("  total data size             {}", human(p.data_bytes));
    println!("  replicas as stored          {}", human(p.replica_bytes));
    println!(
        "  churn per day               {} ({})",
        human(p.churn_bytes_per_day),
        if p.churn_measured {
            "measured over the last 7 days"
        } else {
            "estimated: 10% of the replicas"
        }
    );
    println!("  stored now                  {}", human(p.stored_bytes));
    println!(
        "  recommended space           {}",
        human(p.recommended_bytes)
    );
    println!("  free in {}  {}", p.repository, or_unknown(p.free_bytes));
    println!(
        "  under-provisioned           {}",
        or_unknown(p.under_provisioned_bytes)
    );
    println!(
        "  fleecing overlay per backup {} (largest member: disk × churn × 1 h window)",
        human(p.overlay_bytes)
    );
    Ok(0)
}

/// `cairn check VM` and `cairn verify VM`.
#[derive(Debug, Args)]
pub struct VmJobArgs {
    /// The VM (id or unique name).
    vm: String,
    #[command(flatten)]
    wait: WaitOpts,
    #[command(flatten)]
    opts: ServerOpts,
}

pub fn vm_job(args: &VmJobArgs, what: &str) -> Result<i32> {
    let client = Client::new(&args.opts)?;
    let vm = resolve_vm(&client, &args.vm)?;
    let value = client.post::<()>(&format!("/v1/vms/{vm}/{what}"), None)?;
    let accepted: Accepted = from_value(value.clone())?;
    if args.wait.wait() {
        return wait_for_job(&client, &accepted, &args.wait, args.opts.json());
    }
    if args.opts.json() {
        print_json(&value);
    } else {
        println!("job {} requested", accepted.id);
    }
    Ok(0)
}

/// `cairn alerts`.
#[derive(Debug, Args)]
pub struct AlertsArgs {
    /// Also resolved alerts.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    opts: ServerOpts,
}

pub fn alerts(args: &AlertsArgs) -> Result<i32> {
    let client = Client::new(&args.opts)?;
    let query = [("all", args.all.to_string())];
    let value = client.get("/v1/alerts", &query)?;
    if args.opts.json() {
        print_json(&value);
        return Ok(0);
    }
    let alerts: Vec<AlertView> = from_value(value)?;
    if alerts.is_empty() {
        println!("no active alerts");
        return Ok(0);
    }
    for a in &alerts {
        let status = if a.active {
            "active".to_owned()
        } else {
            format!("resolved {}", time_or_dash(a.resolved_at))
        };
        println!(
            "{:<8} {}  {}  [{}]",
            a.severity,
            format_ms(a.raised_at),
            a.message,
            status
        );
        println!("         recommended: {}", a.recommended_action);
        if let Some(resolution) = &a.resolution {
            println!("         resolution: {resolution}");
        }
    }
    Ok(0)
}

/// `cairn rp list VM --calendar`: recovery points per day, one line per month.
pub fn calendar(client: &Client, vm: &str, opts: &ServerOpts) -> Result<i32> {
    let value = client.get(&format!("/v1/vms/{vm}/calendar"), &[])?;
    if opts.json() {
        print_json(&value);
        return Ok(0);
    }
    let days: Vec<CalendarDayView> = from_value(value)?;
    print!("{}", render_calendar(&days));
    Ok(0)
}

/// A month per block, like MABS's recovery calendar: days with recovery points show their
/// count, the others a dot.
pub fn render_calendar(days: &[CalendarDayView]) -> String {
    use std::collections::BTreeMap;
    if days.is_empty() {
        return "no recovery points yet\n".to_owned();
    }
    let mut months: BTreeMap<&str, BTreeMap<u32, u32>> = BTreeMap::new();
    for day in days {
        let (month, d) = day.date.split_at(7);
        let d: u32 = d.trim_start_matches('-').parse().unwrap_or(0);
        months
            .entry(month)
            .or_default()
            .insert(d, day.recovery_points);
    }
    let mut out = String::new();
    for (month, counts) in months {
        let first: jiff::civil::Date = format!("{month}-01")
            .parse()
            .unwrap_or(jiff::civil::Date::constant(1970, 1, 1));
        let n_days = first.days_in_month() as u32;
        out.push_str(&format!("{month}      Mo  Tu  We  Th  Fr  Sa  Su\n"));
        let lead = cairn_orchestrator::policy::tz::weekday(first) as usize;
        let mut line = format!("{:<12}", "");
        line.push_str(&"    ".repeat(lead));
        for d in 1..=n_days {
            let cell = counts
                .get(&d)
                .map_or_else(|| ".".to_owned(), |n| n.to_string());
            line.push_str(&format!("{cell:>4}"));
            if (lead + d as usize).is_multiple_of(7) {
                out.push_str(line.trim_end());
                out.push('\n');
                line = format!("{:<12}", "");
            }
        }
        if line.trim().is_empty() {
            out.push('\n');
        } else {
            out.push_str(line.trim_end());
            out.push_str("\n\n");
        }
    }
    out.push_str("(recovery points per day; . = none)\n");
    out
}

/// `cairn seed import`.
#[derive(Debug, Args)]
pub struct SeedImportArgs {
    /// The seed folder on the VM's node (absolute path).
    seed: PathBuf,
    /// The VM (id or unique name).
    #[arg(long)]
    vm: String,
    #[command(flatten)]
    wait: WaitOpts,
    #[command(flatten)]
    opts: ServerOpts,
}

pub fn seed_import(args: &SeedImportArgs) -> Result<i32> {
    let client = Client::new(&args.opts)?;
    let vm = resolve_vm(&client, &args.vm)?;
    let seed =
        std::path::absolute(&args.seed).with_context(|| format!("{}", args.seed.display()))?;
    let request = SeedRequest {
        seed: seed.display().to_string(),
    };
    let value = client.post(&format!("/v1/vms/{vm}/seed"), Some(&request))?;
    let accepted: Accepted = from_value(value.clone())?;
    if args.wait.wait() {
        return wait_for_job(&client, &accepted, &args.wait, args.opts.json());
    }
    if args.opts.json() {
        print_json(&value);
    } else {
        println!(
            "seed import job {} requested; a consistency check follows it",
            accepted.id
        );
    }
    Ok(0)
}

/// `cairn seed export`.
#[derive(Debug, Args)]
pub struct SeedExportArgs {
    /// The VM (its name or uuid in the node's descriptor folder).
    vm: String,
    /// The folder to write the seed to (e.g. on removable media); created, must be empty.
    #[arg(long)]
    to: PathBuf,
    /// The node's data folder (its `vms/` holds the VM descriptors).
    #[arg(long, env = "CAIRN_DATA_DIR", default_value = "cairn-data")]
    data_dir: PathBuf,
    /// Key file to encrypt the seed with (the repository's key, when it is encrypted; default:
    /// the data folder's `repo.key` when it exists).
    #[arg(long, env = "CAIRN_KEY_FILE")]
    key_file: Option<PathBuf>,
}

pub fn seed_export(args: &SeedExportArgs) -> Result<i32> {
    let vms_dir = args.data_dir.join("vms");
    let inventory = cairn_worker::agent::descriptor::read_all(&vms_dir).0;
    let descriptor: Descriptor = inventory
        .into_iter()
        .map(|(_, d)| d)
        .find(|d| d.name == args.vm || d.vm_id().to_string() == args.vm)
        .with_context(|| format!("no VM {:?} is described in {}", args.vm, vms_dir.display()))?;
    if args.to.exists()
        && std::fs::read_dir(&args.to)
            .with_context(|| format!("{}", args.to.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} is not empty; a seed goes into an empty folder",
            args.to.display()
        );
    }
    // A seed travels on removable media: it is encrypted with the repository's key when the
    // node's repository has one.
    let key_file =
        crate::repo_cmd::key_file_for(&args.data_dir.join("repo"), args.key_file.as_deref());
    let repo = Repository::init(&args.to, 64 * 1024, key_file.as_deref())
        .with_context(|| format!("initialising the seed in {}", args.to.display()))?;
    for disk in &descriptor.disks {
        let lineage = lineage_id(descriptor.vm_id(), &disk.id)?;
        let mut source = cairn_worker::source::open_source(Path::new(&disk.path), None)
            .with_context(|| format!("opening disk {} ({})", disk.id, disk.path.display()))?;
        let bar = Bar::new(true);
        let summary = repo::backup(
            &repo,
            source.as_mut(),
            &repo::BackupOptions {
                disk: lineage,
                now_ms: cairn_orchestrator::clock::wall_ms(),
                threads: 0,
                rp: None,
                unchanged_since: None,
            },
            &bar,
        )
        .with_context(|| format!("exporting disk {}", disk.id))?;
        println!(
            "disk {}: {} read, {} written",
            disk.id,
            human(summary.bytes_read),
            human(summary.bytes_stored)
        );
    }
    println!(
        "seed of VM {} ({}) written to {}; on the server: cairn seed import {} --vm {}",
        descriptor.name,
        descriptor.vm_id(),
        args.to.display(),
        args.to.display(),
        descriptor.vm_id()
    );
    Ok(0)
}
