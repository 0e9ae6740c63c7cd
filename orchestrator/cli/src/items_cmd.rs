//! `cairn repo browse | extract | export`: item-level recovery and the instant read-only NBD
//! export, straight from a repository folder without a server. Also the shared text output of
//! listings and extraction reports, which the client commands (`cairn rp browse`,
//! `cairn recover-items`) reuse.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_worker::items::{Disk, ExtractReport, Limits, Node, NodeKind};
use cairn_worker::nbd::server::{self, Listener, ServerConfig};
use cairn_worker::repo::image::{DEFAULT_CACHE_CHUNKS, DiskView, RpImage};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::progress::Bar;
use crate::repo_cmd::{Common, open};
use crate::units::{human, parse_size};

#[derive(Debug, Subcommand)]
pub enum RepoItemsCommand {
    /// List the partitions, folders and files of a recovery point, without restoring it.
    Browse {
        dir: PathBuf,
        #[arg(long)]
        disk: String,
        /// Recovery point id (or a unique prefix of at least 8 characters); default: the latest.
        #[arg(long)]
        rp: Option<String>,
        /// Folder to list: `/` lists the volumes (p1, p2, … or `disk`), `/p2/etc` a folder.
        #[arg(long, default_value = "/")]
        path: String,
        #[command(flatten)]
        common: Common,
    },
    /// Extract files and folders of a recovery point into a folder, without restoring it.
    Extract {
        dir: PathBuf,
        #[arg(long)]
        disk: String,
        #[arg(long)]
        rp: Option<String>,
        /// An item to extract (repeatable): `/p2/etc/hosts`, `/p2/home`, `/p1` (a whole volume).
        #[arg(long = "item", required = true)]
        items: Vec<String>,
        /// The folder to extract into (created if missing); each item lands in `DIR/<its name>`.
        #[arg(long)]
        to: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Serve a recovery point's disk read-only over NBD until interrupted.
    Export {
        dir: PathBuf,
        #[arg(long)]
        disk: String,
        #[arg(long)]
        rp: Option<String>,
        #[command(flatten)]
        target: ExportTarget,
        #[command(flatten)]
        common: Common,
    },
}

/// Where an export listens.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct ExportTarget {
    /// A Unix socket to create.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// A TCP address, e.g. 127.0.0.1:10809 (no TLS: keep it on a trusted network).
    #[arg(long)]
    pub listen: Option<String>,
}

/// Bounds of an extraction; the defaults suit a whole system volume.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Most files, folders and links extracted.
    #[arg(long, default_value_t = Limits::default().max_entries)]
    pub max_entries: u64,
    /// Most bytes extracted in total (e.g. 10GiB).
    #[arg(long, default_value = "1TiB", value_parser = parse_size)]
    pub max_bytes: u64,
    /// Largest single file extracted; larger ones are skipped and reported.
    #[arg(long, default_value = "1TiB", value_parser = parse_size)]
    pub max_file_size: u64,
    /// Deepest folder nesting below an item.
    #[arg(long, default_value_t = Limits::default().max_depth)]
    pub max_depth: u32,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            max_entries: self.max_entries,
            max_total_bytes: self.max_bytes,
            max_file_bytes: self.max_file_size,
            max_depth: self.max_depth,
            ..Limits::default()
        }
    }
}

fn open_image(dir: &Path, common: &Common, disk: &str, rp: Option<&str>) -> Result<Arc<RpImage>> {
    let repo = open(dir, common)?;
    Ok(Arc::new(RpImage::open(
        &repo,
        disk,
        rp,
        DEFAULT_CACHE_CHUNKS,
    )?))
}

/// Prints a listing as a table.
pub fn print_nodes(path: &str, nodes: &[Node]) {
    println!("{path}");
    for n in nodes {
        let kind = match n.kind {
            NodeKind::File => "-",
            NodeKind::Dir => "d",
            NodeKind::Symlink => "l",
            NodeKind::Special => "s",
            NodeKind::Volume => "v",
        };
        let mode = n
            .mode
            .map_or_else(|| "    ".to_string(), |m| format!("{m:04o}"));
        // Names come from the image: show control characters escaped.
        let name = if n.name.chars().any(char::is_control) {
            format!("{:?}", n.name)
        } else {
            n.name.clone()
        };
        let detail = n
            .detail
            .as_deref()
            .map(|d| format!("  ({d})"))
            .unwrap_or_default();
        println!("  {kind} {mode} {:>10}  {name}{detail}", human(n.size));
    }
}

/// Prints what an extraction did.
pub fn print_report(report: &ExtractReport, to: &Path, secs: f64) {
    println!(
        "extracted {} files, {} folders, {} links ({}) into {} in {secs:.2} s",
        report.files,
        report.dirs,
        report.symlinks,
        human(report.bytes),
        to.display()
    );
    for s in &report.skipped {
        println!("  skipped {}: {}", s.path, s.reason);
    }
}

/// Creates the target folder when missing.
pub fn prepare_target(to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))
}

/// Binds the listener of an export.
pub fn bind(target: &ExportTarget) -> Result<(Listener, String)> {
    if let Some(path) = &target.socket {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                bail!("{} exists and is not a socket", path.display());
            }
            std::fs::remove_file(path)?;
        }
        let l = std::os::unix::net::UnixListener::bind(path)
            .with_context(|| format!("binding {}", path.display()))?;
        let abs = std::path::absolute(path)?;
        return Ok((
            Listener::Unix(l, path.clone()),
            format!("socket={}", abs.display()),
        ));
    }
    let addr = target.listen.as_deref().unwrap_or("127.0.0.1:10809");
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let local = l.local_addr()?;
    Ok((Listener::Tcp(l), local.to_string()))
}

/// The NBD URI of an export, as qemu spells it.
pub fn nbd_uri(where_: &str, name: &str) -> String {
    match where_.strip_prefix("socket=") {
        Some(path) => format!("nbd+unix:///{name}?socket={path}"),
        None => format!("nbd://{where_}/{name}"),
    }
}

/// Serves `view` until the process is interrupted.
pub fn run_export(
    view: Arc<dyn DiskView>,
    target: &ExportTarget,
    name: &str,
    json_out: bool,
    what: &str,
) -> Result<i32> {
    let (listener, where_) = bind(target)?;
    let uri = nbd_uri(&where_, name);
    let handle = server::serve(
        listener,
        ServerConfig {
            view: view.clone(),
            export_name: name.into(),
            max_clients: 64,
            idle_timeout: Duration::from_secs(3600),
        },
    )?;
    if json_out {
        println!(
            "{}",
            json!({"uri": uri, "export": name, "size": view.size(), "read_only": true})
        );
    } else {
        println!("serving {what} read-only ({}) at {uri}", human(view.size()));
        if std::io::stdout().is_terminal() {
            println!("e.g. qemu-img convert -O qcow2 '{uri}' copy.qcow2   (Ctrl-C stops)");
        }
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    handle.wait();
    Ok(0)
}

pub fn run_repo(command: RepoItemsCommand) -> Result<i32> {
    match command {
        RepoItemsCommand::Browse {
            dir,
            disk,
            rp,
            path,
            common,
        } => {
            let image = open_image(&dir, &common, &disk, rp.as_deref())?;
            let disk_view = Disk::open(image.clone())?;
            let nodes = disk_view.browse(&path, &Limits::default())?;
            if common.json {
                println!(
                    "{}",
                    json!({"rp": image.header().rp, "disk": disk, "path": path, "entries": nodes})
                );
            } else {
                print_nodes(&path, &nodes);
            }
        }
        RepoItemsCommand::Extract {
            dir,
            disk,
            rp,
            items,
            to,
            limits,
            common,
        } => {
            let started = Instant::now();
            let image = open_image(&dir, &common, &disk, rp.as_deref())?;
            let disk_view = Disk::open(image.clone())?;
            prepare_target(&to)?;
            let bar = Bar::new(!common.json);
            let report = disk_view.extract(&items, &to, &limits.limits(), &bar)?;
            cairn_worker::repo::Progress::finish(&bar);
            let secs = started.elapsed().as_secs_f64();
            if common.json {
                let mut value = serde_json::to_value(&report)?;
                value["rp"] = json!(image.header().rp);
                value["seconds"] = json!(secs);
                println!("{value}");
            } else {
                print_report(&report, &to, secs);
            }
        }
        RepoItemsCommand::Export {
            dir,
            disk,
            rp,
            target,
            common,
        } => {
            let image = open_image(&dir, &common, &disk, rp.as_deref())?;
            let what = format!("disk {disk} at recovery point {}", image.header().rp);
            return run_export(image, &target, &disk, common.json, &what);
        }
    }
    Ok(0)
}

/// The worker side of `GET /v1/vms/{vm}/browse` in `cairn up`: lists a folder through the agent.
pub fn browse_on_worker(
    agent: &cairn_worker::agent::Agent,
    request: &cairn_schemas::BrowseRequest,
) -> Result<Vec<cairn_schemas::BrowseEntry>, String> {
    let nodes = cairn_worker::agent::items::browse(
        agent,
        &request.repository,
        request.vm,
        &request.disk,
        request.rp,
        &request.path,
    )
    .map_err(|e| e.to_string())?;
    Ok(nodes
        .into_iter()
        .map(|n| cairn_schemas::BrowseEntry {
            name: n.name,
            kind: serde_json::to_value(n.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            size: n.size,
            mode: n.mode,
            mtime: n.mtime,
            detail: n.detail,
        })
        .collect())
}

/// `cairn rp browse VM --rp RP [--disk D] [--path P]`.
#[derive(Debug, Args)]
pub struct RpBrowseArgs {
    /// The VM (id or unique name).
    vm: String,
    /// Recovery point: its id, a unique prefix of at least 8 characters, or `latest`.
    #[arg(long)]
    rp: String,
    /// The disk (default: the recovery point's first disk).
    #[arg(long)]
    disk: Option<String>,
    /// `/` lists the volumes (p1, p2, … or `disk`), `/p2/etc` a folder.
    #[arg(long, default_value = "/")]
    path: String,
    #[command(flatten)]
    opts: crate::client_cmd::ServerOpts,
}

/// `cairn recover-items VM --rp RP --item PATH... --to DIR`.
#[derive(Debug, Args)]
pub struct RecoverItemsArgs {
    /// The VM (id or unique name).
    vm: String,
    /// Recovery point: its id, a unique prefix of at least 8 characters, or `latest`.
    #[arg(long)]
    rp: String,
    /// The disk (default: the recovery point's first disk).
    #[arg(long)]
    disk: Option<String>,
    /// An item to extract (repeatable), e.g. `/p2/etc/hosts`, `/p2/home`.
    #[arg(long = "item", required = true)]
    items: Vec<String>,
    /// Absolute folder on the node; each item lands in `DIR/<its name>`.
    #[arg(long)]
    to: String,
    /// Node that writes (default: the node hosting the VM).
    #[arg(long)]
    node: Option<String>,
    #[command(flatten)]
    wait: crate::client_cmd::WaitOpts,
    #[command(flatten)]
    opts: crate::client_cmd::ServerOpts,
}

/// `cairn rp export VM --rp RP [--disk D] --socket PATH | --listen ADDR --repository DIR`.
#[derive(Debug, Args)]
pub struct RpExportArgs {
    /// The VM (id or unique name).
    vm: String,
    /// Recovery point: its id, a unique prefix of at least 8 characters, or `latest`.
    #[arg(long)]
    rp: String,
    /// The disk (default: the recovery point's first disk).
    #[arg(long)]
    disk: Option<String>,
    /// The repository folder that holds the recovery point (this process reads it and serves
    /// the export; with `cairn up` it is `DATA_DIR/repo`).
    #[arg(long, env = "CAIRN_REPOSITORY")]
    repository: PathBuf,
    /// Key file of an encrypted repository (default: `REPOSITORY.key` when it exists, as
    /// `cairn up` keeps `DATA_DIR/repo.key`).
    #[arg(long, env = "CAIRN_KEY_FILE")]
    key_file: Option<PathBuf>,
    #[command(flatten)]
    target: ExportTarget,
    #[command(flatten)]
    opts: crate::client_cmd::ServerOpts,
}

/// Resolves VM and recovery point names with the server; returns (vm id, rp id, disk).
fn resolve_rp(
    client: &crate::client_cmd::Client,
    vm: &str,
    rp: &str,
    disk: Option<&str>,
) -> Result<(String, String, String)> {
    use crate::client_cmd::{from_value, pick_rp, resolve_vm};
    let vm = resolve_vm(client, vm)?;
    let rps: Vec<cairn_orchestrator::views::RpView> =
        from_value(client.get(&format!("/v1/vms/{vm}/recovery-points"), &[])?)?;
    let rp = pick_rp(&rps, rp).map_err(|message| anyhow::anyhow!(message))?;
    let view = rps
        .iter()
        .find(|r| r.rp == rp)
        .context("recovery point vanished")?;
    let disk = match disk {
        Some(d) => {
            if !view.disks.iter().any(|x| x.disk == d) {
                bail!(
                    "recovery point {rp} has no disk {d}; it has {}",
                    view.disks
                        .iter()
                        .map(|x| x.disk.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            d.to_string()
        }
        None => view
            .disks
            .first()
            .map(|x| x.disk.clone())
            .context("the recovery point has no disk")?,
    };
    Ok((vm, rp, disk))
}

pub fn rp_browse(args: &RpBrowseArgs) -> Result<i32> {
    let client = crate::client_cmd::Client::new(&args.opts)?;
    let (vm, rp, disk) = resolve_rp(&client, &args.vm, &args.rp, args.disk.as_deref())?;
    let value = client.get(
        &format!("/v1/vms/{vm}/browse"),
        &[("rp", rp), ("disk", disk), ("path", args.path.clone())],
    )?;
    if args.opts.json {
        crate::client_cmd::print_json(&value);
    } else {
        let view: cairn_orchestrator::views::BrowseView = crate::client_cmd::from_value(value)?;
        println!("recovery point {} disk {}", view.rp, view.disk);
        for e in &view.entries {
            let kind = match e.kind.as_str() {
                "file" => "-",
                "dir" => "d",
                "symlink" => "l",
                "volume" => "v",
                _ => "s",
            };
            let mode = e
                .mode
                .map_or_else(|| "    ".to_string(), |m| format!("{m:04o}"));
            let name = if e.name.chars().any(char::is_control) {
                format!("{:?}", e.name)
            } else {
                e.name.clone()
            };
            let detail = e
                .detail
                .as_deref()
                .map(|d| format!("  ({d})"))
                .unwrap_or_default();
            println!("  {kind} {mode} {:>10}  {name}{detail}", human(e.size));
        }
    }
    Ok(0)
}

pub fn recover_items(args: &RecoverItemsArgs) -> Result<i32> {
    let client = crate::client_cmd::Client::new(&args.opts)?;
    let (vm, rp, disk) = resolve_rp(&client, &args.vm, &args.rp, args.disk.as_deref())?;
    let body =
        json!({"rp": rp, "disk": disk, "items": args.items, "to": args.to, "node": args.node});
    let value = client.post(&format!("/v1/vms/{vm}/recover-items"), Some(&body))?;
    let accepted: cairn_orchestrator::views::Accepted =
        crate::client_cmd::from_value(value.clone())?;
    if !args.opts.json {
        println!(
            "item recovery job {} accepted: {} item(s) of recovery point {rp} disk {disk} to {}",
            accepted.id,
            args.items.len(),
            args.to
        );
    }
    if !args.wait.wait {
        if args.opts.json {
            crate::client_cmd::print_json(&value);
        }
        return Ok(0);
    }
    crate::client_cmd::wait_for_job(&client, &accepted, &args.wait, args.opts.json)
}

pub fn rp_export(args: &RpExportArgs) -> Result<i32> {
    let client = crate::client_cmd::Client::new(&args.opts)?;
    let (vm, rp, disk) = resolve_rp(&client, &args.vm, &args.rp, args.disk.as_deref())?;
    let key_file = crate::repo_cmd::key_file_for(&args.repository, args.key_file.as_deref());
    let repo = cairn_worker::repo::Repository::open(&args.repository, key_file.as_deref())?;
    let vm_id: cairn_schemas::VmId = vm.parse().map_err(|e| anyhow::anyhow!("vm {vm}: {e}"))?;
    let disk_id = cairn_schemas::DiskId::new(disk.as_str())
        .map_err(|e| anyhow::anyhow!("disk {disk}: {e}"))?;
    let lineage = cairn_worker::agent::lineage_id(vm_id, &disk_id)?;
    let image = RpImage::open(&repo, &lineage, Some(&rp), DEFAULT_CACHE_CHUNKS)?;
    let what = format!("disk {disk} of VM {} at recovery point {rp}", args.vm);
    run_export(Arc::new(image), &args.target, &disk, args.opts.json, &what)
}
