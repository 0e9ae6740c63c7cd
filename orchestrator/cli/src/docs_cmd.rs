//! `cairn completions SHELL` and `cairn man`: shell completion scripts and roff man pages,
//! generated from the same clap model that parses the command line, so they never drift from
//! it. `ops/package-deb` installs their output; they read and change no cairn state.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use clap_complete::Shell;
use clap_mangen::roff::{Roff, bold, roman};

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to write a completion script for.
    shell: Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write cairn.1 and one page per subcommand (cairn-up.1, cairn-repo-backup.1, ...) into
    /// this folder, printing each file written, instead of printing cairn.1.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Writes the completion script of `cli` (the whole `cairn` command) for the chosen shell to
/// stdout.
pub fn run_completions(args: CompletionsArgs, mut cli: clap::Command) -> Result<i32> {
    // Into memory first: clap_complete panics when its writer fails (a closed pipe), and a
    // closed pipe is an error to report, not a crash.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cli, "cairn", &mut script);
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&script)
        .and_then(|()| stdout.flush())
        .context("writing the completion script")?;
    Ok(0)
}

/// Prints the man page of `cli` to stdout, or writes every page into `--out`.
pub fn run_man(args: ManArgs, cli: clap::Command) -> Result<i32> {
    // `help` is clap's, not one of cairn's commands: no page for it, and not listed.
    let cli = cli.disable_help_subcommand(true);
    match args.out {
        None => {
            let mut stdout = std::io::stdout().lock();
            write_main_page(cli, &mut stdout).context("writing the man page")?;
            stdout.flush().context("writing the man page")?;
        }
        Some(dir) => {
            for path in write_all_pages(cli, &dir)? {
                println!("{}", path.display());
            }
        }
    }
    Ok(0)
}

/// `cairn.1`: clap's sections, then FILES (where the package puts the configuration, the state
/// and the units) and SEE ALSO.
fn write_main_page(cli: clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
    // `--help` shows the crate's description; a man page's NAME line wants what cairn is.
    let cli = cli
        .about("back up and recover KVM/QEMU virtual machines")
        .long_about(
            "cairn backs up the virtual machines of KVM/QEMU clusters from the host, with no \
             agent in the guest: protection groups with retention and a synchronization \
             schedule, incremental backups that store only what changed, and recovery of whole \
             VMs, disks or single files to any folder or host. On one machine, cairn up runs \
             everything in one process; a distributed deployment runs cairn orchestrator on \
             control hosts and cairn worker on each KVM node, with NATS JetStream between \
             them. Each subcommand has its own page, named under SUBCOMMANDS.",
        );
    clap_mangen::Man::new(cli).render(out)?;
    let mut extra = Roff::new();
    extra.control("SH", ["FILES"]);
    for (path, what) in [
        (
            "/etc/cairn/cairn.toml",
            "Settings of cairn orchestrator and cairn worker ([nats], [orchestrator], [worker]); \
             --config FILE or CAIRN_CONFIG names another file.",
        ),
        (
            "/var/lib/cairn",
            "State of the packaged services: the orchestrator's projection snapshots \
             (orchestrator/), the worker's VM descriptors (vms/).",
        ),
        (
            "/usr/lib/systemd/system/cairn-orchestrator.service",
            "The orchestrator's systemd unit (user cairn); not enabled when the package is \
             installed.",
        ),
        (
            "/usr/lib/systemd/system/cairn-worker.service",
            "The worker's systemd unit (root); not enabled when the package is installed.",
        ),
        (
            "/usr/share/cairn/",
            "nats-server configurations (nats/) and an example nats-server unit (systemd/).",
        ),
    ] {
        extra.control("TP", []);
        extra.text([bold(path)]);
        extra.text([roman(what)]);
    }
    extra.control("SH", ["SEE ALSO"]);
    extra.text([roman(
        "cairn-up(1), cairn-orchestrator(1), cairn-worker(1), cairn-repo(1) and the other \
         pages named under SUBCOMMANDS; /usr/share/doc/cairn/README.md.",
    )]);
    extra.to_writer(out)
}

/// Writes `cairn.1` and a page for every visible subcommand, at any depth, into `dir`;
/// returns the files written, `cairn.1` first.
fn write_all_pages(cli: clap::Command, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Built, every subcommand knows its display name ("cairn-repo-backup"), which names its
    // page.
    let mut cli = cli;
    cli.build();
    let main = dir.join("cairn.1");
    let mut file =
        std::fs::File::create(&main).with_context(|| format!("creating {}", main.display()))?;
    write_main_page(cli.clone(), &mut file)
        .and_then(|()| file.flush())
        .with_context(|| format!("writing {}", main.display()))?;
    // Every page's footer names the package ("cairn 0.1.0"), not its subcommand's own name.
    let source = format!("cairn {}", cli.get_version().unwrap_or_default());
    let mut written = vec![main];
    let mut pending: Vec<clap::Command> = cli.get_subcommands().cloned().collect();
    while let Some(command) = pending.pop() {
        if command.is_hide_set() {
            continue;
        }
        pending.extend(command.get_subcommands().cloned());
        let page = clap_mangen::Man::new(command).source(source.clone());
        let path = dir.join(page.get_filename());
        page.generate_to(dir)
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    written[1..].sort();
    Ok(written)
}
