//! The `cairn` binary: command-line front end. It parses arguments, sets up logging and calls
//! into the worker (data plane) and orchestrator (control plane) libraries.

mod api_server;
mod audit_cmd;
mod client_cmd;
mod config;
mod demo;
mod docs_cmd;
mod files;
mod items_cmd;
mod ops;
mod orchestrator_cmd;
mod policy_cmd;
mod progress;
mod recover_cmd;
mod repo_cmd;
mod step_runner;
mod token_cmd;
mod units;
mod up;
mod worker_cmd;

use clap::{CommandFactory, Parser, Subcommand};

/// cairn: backup and recovery of KVM/QEMU virtual machines.
#[derive(Debug, Parser)]
#[command(name = "cairn", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run orchestrator, worker, event log, repository and HTTP API in one process.
    Up(up::UpArgs),
    /// Run one orchestrator instance of a distributed deployment on NATS JetStream; several
    /// share the load and take over from each other.
    Orchestrator(orchestrator_cmd::OrchestratorArgs),
    /// Run this node's worker of a distributed deployment: take its steps from NATS, run
    /// them, report back.
    Worker(worker_cmd::WorkerArgs),
    /// Work with a repository folder directly: backup, restore, verify, forget, gc.
    Repo {
        #[command(subcommand)]
        command: repo_cmd::RepoCommand,
    },
    /// Client commands of a running orchestrator (`--server`, `CAIRN_SERVER`): vm, group,
    /// backup, jobs, job, rp, restore, recover, events, audit, check, verify, alerts, seed.
    #[command(flatten)]
    Client(client_cmd::ClientCommand),
    /// Set up a deployment: `nats-init` makes the NATS servers' configurations, a CA and one
    /// certificate per orchestrator and node; `nats-add-node` adds a node later.
    Ops {
        #[command(subcommand)]
        command: ops::OpsCommand,
    },
    /// Print the completion script of a shell (bash, zsh, fish, elvish, powershell).
    Completions(docs_cmd::CompletionsArgs),
    /// Print cairn's man page (roff), or write it and every subcommand's page into a folder.
    Man(docs_cmd::ManArgs),
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Up(args) => up::run(args),
        Command::Worker(args) => worker_cmd::run(args),
        Command::Orchestrator(args) => orchestrator_cmd::run(args),
        Command::Repo { command } => repo_cmd::run(command),
        Command::Client(command) => client_cmd::run(command),
        Command::Ops { command } => ops::run(command),
        Command::Completions(args) => docs_cmd::run_completions(args, Cli::command()),
        Command::Man(args) => docs_cmd::run_man(args, Cli::command()),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(1);
        }
    }
}
