//! `cairn repo ...`: direct use of a repository folder, without a server.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cairn_worker::repo::{self, Repository, backup::BackupOptions, restore::RestoreOptions};
use cairn_worker::source::{self, ImageFormat};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::progress::Bar;
use crate::units::{human, parse_size};

#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Create a repository in an empty or new folder.
    Init {
        dir: PathBuf,
        /// Chunk size: a power of two from 4KiB to 16MiB.
        #[arg(long, default_value = "64KiB", value_parser = parse_size)]
        chunk_size: u64,
        /// Encrypt the repository (needs --key-file; the file is created if it does not exist).
        #[arg(long, requires = "key_file")]
        encrypt: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Back up a disk image as a new recovery point of disk ID.
    Backup {
        dir: PathBuf,
        /// The image to read (raw, qcow2, vhdx or vhd).
        #[arg(long)]
        source: PathBuf,
        /// The disk this image is (its lineage in the repository).
        #[arg(long)]
        disk: String,
        /// The image's format; detected from its contents when absent.
        #[arg(long)]
        format: Option<ImageFormat>,
        #[command(flatten)]
        common: Common,
    },
    /// Restore a recovery point to an image file.
    Restore {
        dir: PathBuf,
        #[arg(long)]
        disk: String,
        /// Recovery point id (or a unique prefix of at least 8 characters); default: the latest.
        #[arg(long)]
        rp: Option<String>,
        /// The image to write.
        #[arg(long)]
        to: PathBuf,
        /// Output format (raw, qcow2, vhdx); default from the file name, else raw.
        #[arg(long)]
        format: Option<ImageFormat>,
        /// Update an existing image in place, writing only the chunks that differ.
        #[arg(long)]
        delta: bool,
        #[command(flatten)]
        common: Common,
    },
    /// List recovery points.
    List {
        dir: PathBuf,
        #[arg(long)]
        disk: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Re-read and re-hash every stored chunk; exit code 3 when anything is damaged.
    Verify {
        dir: PathBuf,
        #[arg(long)]
        disk: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Forget old recovery points of a disk, keeping the newest N.
    Forget {
        dir: PathBuf,
        #[arg(long)]
        disk: String,
        #[arg(long)]
        keep_last: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Reclaim the space of forgotten data, one disk at a time.
    Gc {
        dir: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Show sizes and the data reduction of a repository.
    Stats {
        dir: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Item-level recovery and instant export: browse, extract, export.
    #[command(flatten)]
    Items(crate::items_cmd::RepoItemsCommand),
    /// The key of an encrypted repository.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Print the key of an encrypted repository, or write it to a new file, to keep a copy
    /// apart from the repository: without its key no recovery point in it can be read.
    Export {
        dir: PathBuf,
        /// Write the key to this new file (created 0600; an existing file is never
        /// overwritten) instead of printing it.
        #[arg(long)]
        to: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
}

/// Options every repo command takes.
#[derive(Debug, Args)]
pub struct Common {
    /// Key file of an encrypted repository (default: `DIR.key` beside the repository folder,
    /// when it exists, as `cairn up` keeps `DATA/repo.key`). It must be owned by the user
    /// running cairn and private to it (mode 0600 or stricter).
    #[arg(long, env = "CAIRN_KEY_FILE")]
    pub(crate) key_file: Option<PathBuf>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn open(dir: &Path, common: &Common) -> Result<Repository> {
    let key_file = key_file_for(dir, common.key_file.as_deref());
    Ok(Repository::open(dir, key_file.as_deref())?)
}

/// The key file of the repository in `dir`: the one given, else `DIR.key` when it exists
/// ([`repo::config::default_key_file`]).
pub(crate) fn key_file_for(dir: &Path, given: Option<&Path>) -> Option<PathBuf> {
    given.map(Path::to_path_buf).or_else(|| {
        repo::config::default_key_file(dir).filter(|key| key.symlink_metadata().is_ok())
    })
}

fn now_ms() -> u64 {
    cairn_orchestrator::clock::wall_ms()
}

fn rate(bytes: u64, started: Instant) -> String {
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    format!("{:.1} s, {}/s", secs, human((bytes as f64 / secs) as u64))
}

/// Runs a repo command; returns the process exit code.
pub fn run(command: RepoCommand) -> Result<i32> {
    match command {
        RepoCommand::Init {
            dir,
            chunk_size,
            encrypt,
            common,
        } => {
            let key_file = if encrypt {
                common.key_file.as_deref()
            } else {
                None
            };
            if !encrypt && common.key_file.is_some() {
                bail!(
                    "--key-file without --encrypt: add --encrypt to create an encrypted repository"
                );
            }
            let repo = Repository::init(&dir, chunk_size, key_file)?;
            if common.json {
                println!(
                    "{}",
                    json!({"repository": dir, "id": repo.config.id, "chunk_size": repo.config.chunk_size, "encrypted": encrypt})
                );
            } else {
                println!(
                    "created repository {} (chunk size {}, {})",
                    dir.display(),
                    human(repo.config.chunk_size as u64),
                    if encrypt {
                        "encrypted"
                    } else {
                        "not encrypted"
                    }
                );
            }
        }
        RepoCommand::Backup {
            dir,
            source: image,
            disk,
            format,
            common,
        } => {
            let repo = open(&dir, &common)?;
            let mut source = source::open_source(&image, format)?;
            let started = Instant::now();
            let opts = BackupOptions {
                disk,
                now_ms: now_ms(),
                threads: 0,
                rp: None,
                unchanged_since: None,
            };
            let summary = repo::backup(&repo, source.as_mut(), &opts, &Bar::new(!common.json))?;
            if common.json {
                let mut value = serde_json::to_value(&summary)?;
                value["seconds"] = json!(started.elapsed().as_secs_f64());
                println!("{value}");
            } else {
                println!("recovery point {}  disk {}", summary.rp, summary.disk);
                println!(
                    "read {}, stored {} ({} new chunks, {} unchanged, {} zero{}) in {}",
                    human(summary.bytes_read),
                    human(summary.bytes_stored),
                    summary.chunks_new,
                    summary.chunks_unchanged,
                    summary.chunks_zero,
                    if summary.chunks_reused > 0 {
                        format!(
                            ", {} recovered from an interrupted backup",
                            summary.chunks_reused
                        )
                    } else {
                        String::new()
                    },
                    rate(summary.disk_size, started)
                );
            }
        }
        RepoCommand::Restore {
            dir,
            disk,
            rp,
            to,
            format,
            delta,
            common,
        } => {
            let repo = open(&dir, &common)?;
            let header = repo::restore::resolve(&repo, &disk, rp.as_deref())?;
            let mut sink = if delta {
                source::open_sink(&to, format)?
            } else {
                let format = format.unwrap_or_else(|| format_from_name(&to));
                source::create_sink(&to, format, header.disk_size)?
            };
            let started = Instant::now();
            // A target whose content stamp is still valid is not read: only the chunks that
            // differ between the two recovery points are written.
            let known = if delta {
                repo::stamp::current(&to, &disk)
            } else {
                None
            };
            repo::stamp::clear(&to);
            let lineage = disk.clone();
            let opts = RestoreOptions {
                disk,
                rp: Some(header.rp.clone()),
                delta,
                threads: 0,
                known,
            };
            let summary = repo::restore(&repo, &opts, sink.as_mut(), &Bar::new(!common.json));
            drop(sink);
            if let Ok(done) = &summary {
                repo::stamp::write(&to, &lineage, &done.rp);
            }
            let summary = match summary {
                Ok(s) => s,
                Err(e) => {
                    if !delta {
                        // A partial new image is worse than none: it looks like a restored disk.
                        let _ = std::fs::remove_file(&to);
                    }
                    return Err(e).with_context(|| format!("restore to {} failed", to.display()));
                }
            };
            if common.json {
                let mut value = serde_json::to_value(&summary)?;
                value["to"] = json!(to);
                value["seconds"] = json!(started.elapsed().as_secs_f64());
                println!("{value}");
            } else {
                println!(
                    "restored recovery point {} of disk {} to {}",
                    summary.rp,
                    summary.disk,
                    to.display()
                );
                if delta {
                    println!(
                        "wrote {} ({} chunks differed, {} already right) in {}",
                        human(summary.bytes_written),
                        summary.chunks_written,
                        summary.chunks_same,
                        rate(summary.disk_size, started)
                    );
                } else {
                    println!(
                        "wrote {} of a {} disk in {}",
                        human(summary.bytes_written),
                        human(summary.disk_size),
                        rate(summary.disk_size, started)
                    );
                }
            }
        }
        RepoCommand::List { dir, disk, common } => {
            let repo = open(&dir, &common)?;
            let rps = repo.list(disk.as_deref())?;
            if common.json {
                println!("{}", json!({"recovery_points": rps}));
            } else if rps.is_empty() {
                println!("no recovery points");
            } else {
                println!(
                    "{:<36}  {:<20}  {:<24}  {:>10}  {:>10}  {:>10}  index",
                    "recovery point", "disk", "created (UTC)", "size", "read", "stored"
                );
                for rp in rps {
                    println!(
                        "{:<36}  {:<20}  {:<24}  {:>10}  {:>10}  {:>10}  {}",
                        rp.rp,
                        rp.disk,
                        format_ms(rp.created_at_ms),
                        human(rp.disk_size),
                        human(rp.bytes_read),
                        human(rp.bytes_stored),
                        if rp.full_index { "full" } else { "delta" }
                    );
                }
            }
        }
        RepoCommand::Verify { dir, disk, common } => {
            let repo = open(&dir, &common)?;
            let report = repo::verify(&repo, disk.as_deref(), 0, &Bar::new(!common.json))?;
            if common.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "checked {} chunks ({})",
                    report.chunks_checked,
                    human(report.bytes_checked)
                );
                for d in &report.disks {
                    if let Some(err) = &d.error {
                        println!("disk {}: not verified: {err}", d.disk);
                        continue;
                    }
                    if d.damaged_rps.is_empty() {
                        println!(
                            "disk {}: {} recovery points, all intact",
                            d.disk, d.recovery_points
                        );
                    }
                    for rp in &d.damaged_rps {
                        println!(
                            "disk {}: recovery point {} DAMAGED: {}",
                            d.disk, rp.rp, rp.reason
                        );
                        for c in &rp.damaged_chunks {
                            println!(
                                "    chunk {} at position {} (offset {}): {}",
                                c.id,
                                c.pos,
                                c.pos * repo.config.chunk_size as u64,
                                c.reason
                            );
                        }
                        if rp.n_damaged_chunks as usize > rp.damaged_chunks.len() {
                            println!(
                                "    ... and {} more",
                                rp.n_damaged_chunks as usize - rp.damaged_chunks.len()
                            );
                        }
                    }
                }
                println!(
                    "{}",
                    if report.ok {
                        "repository verified: no damage"
                    } else {
                        "DAMAGE FOUND"
                    }
                );
            }
            if !report.ok {
                return Ok(3);
            }
        }
        RepoCommand::Forget {
            dir,
            disk,
            keep_last,
            common,
        } => {
            let repo = open(&dir, &common)?;
            let summary = repo::maintenance::forget(&repo, &disk, keep_last)?;
            if common.json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                println!(
                    "disk {}: kept {}, forgot {} recovery points",
                    summary.disk,
                    summary.kept.len(),
                    summary.removed.len()
                );
                for rp in &summary.removed {
                    println!("    forgot {rp}");
                }
                if !summary.removed.is_empty() {
                    println!("run `cairn repo gc` to reclaim their space");
                }
            }
        }
        RepoCommand::Gc { dir, common } => {
            let repo = open(&dir, &common)?;
            let summary = repo::maintenance::gc(&repo)?;
            if common.json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                for d in &summary.disks {
                    match &d.skipped {
                        Some(why) => println!("disk {}: skipped: {why}", d.disk),
                        None => println!(
                            "disk {}: {} packs deleted, {} rewritten, {} freed",
                            d.disk,
                            d.packs_deleted,
                            d.packs_rewritten,
                            human(d.bytes_freed)
                        ),
                    }
                }
                println!("freed {}", human(summary.bytes_freed));
            }
        }
        RepoCommand::Stats { dir, common } => {
            let repo = open(&dir, &common)?;
            let stats = repo::maintenance::stats(&repo)?;
            if common.json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                println!("disks            {}", stats.disks);
                println!("recovery points  {}", stats.recovery_points);
                println!(
                    "packs            {} ({})",
                    stats.packs,
                    human(stats.pack_bytes)
                );
                println!("indexes          {}", human(stats.index_bytes));
                println!("logical size     {}", human(stats.logical_bytes));
                println!("data reduction   {:.1}x", stats.reduction_ratio);
                println!("chunk size       {}", human(stats.chunk_size as u64));
                println!(
                    "encrypted        {}",
                    if stats.encrypted { "yes" } else { "no" }
                );
            }
        }
        RepoCommand::Items(command) => return crate::items_cmd::run_repo(command),
        RepoCommand::Key {
            command: KeyCommand::Export { dir, to, common },
        } => key_export(&dir, to.as_deref(), &common)?,
    }
    Ok(0)
}

/// `cairn repo key export`: the key is checked against the repository before it is shown, so
/// what is exported opens it.
fn key_export(dir: &Path, to: Option<&Path>, common: &Common) -> Result<()> {
    let config = repo::config::load(dir)?;
    if config.encryption.is_none() {
        bail!(
            "{}: the repository is not encrypted, so it has no key to export",
            dir.display()
        );
    }
    let key_file = key_file_for(dir, common.key_file.as_deref())
        .ok_or_else(|| repo::Error::KeyRequired { path: dir.into() })?;
    Repository::open(dir, Some(&key_file))?;
    let key = repo::config::read_key_file(&key_file)?;
    let Some(to) = to else {
        if common.json {
            let key = String::from_utf8_lossy(&key);
            println!(
                "{}",
                json!({"repository": dir, "key_file": key_file, "key": key})
            );
        } else {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(&key)?;
            out.write_all(b"\n")?;
        }
        return Ok(());
    };
    write_new_private(to, &key)?;
    if common.json {
        println!(
            "{}",
            json!({"repository": dir, "key_file": key_file, "to": to})
        );
    } else {
        println!(
            "wrote the key of repository {} to {} (mode 0600); keep it apart from the repository",
            dir.display(),
            to.display()
        );
    }
    Ok(())
}

/// Writes `bytes` and a newline to a new file created 0600 (`O_EXCL`: an existing file or a
/// symlink at `path` is refused, never followed or overwritten), durably.
fn write_new_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(cairn_worker::perms::FILE_MODE)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (the key is written only to a new file)",
                path.display()
            )
        })?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    std::fs::File::open(parent.unwrap_or(Path::new(".")))
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("syncing the folder of {}", path.display()))?;
    Ok(())
}

fn format_from_name(path: &Path) -> ImageFormat {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("qcow2") => ImageFormat::Qcow2,
        Some("vhdx") => ImageFormat::Vhdx,
        _ => ImageFormat::Raw,
    }
}

/// Unix milliseconds as `2026-11-25 16:04:05` (UTC).
pub fn format_ms(ms: u64) -> String {
    cairn_orchestrator::policy::tz::timestamp(i64::try_from(ms).unwrap_or(i64::MAX))
        .strftime("%Y-%m-%d %H:%M:%S")
        .to_string()
}
