//! `ramsnap`: the operator's command line for the ramsnap services.
//!
//! One module per resource ([`storage`] for domains and volumes); [`output`]
//! prints tables and JSON, [`error`] prints a failed call with its details.

mod args;
mod error;
mod output;
mod storage;

use clap::{Parser, Subcommand};
use output::Format;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "ramsnap",
    version,
    about = "VM snapshots with guest RAM: storage domains and volumes"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// What every command may need: where the services are and how to print.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Global options")]
pub struct Global {
    /// Address of the storage service.
    #[arg(
        long,
        global = true,
        env = "RAMSNAP_STORAGE",
        default_value = "http://127.0.0.1:50052",
        value_name = "ADDR"
    )]
    pub storage: String,
    /// Address of the snapshot service.
    // Read by the snapshot commands to come; accepted now so scripts and
    // environments can set every address at once.
    #[allow(dead_code)]
    #[arg(
        long,
        global = true,
        env = "RAMSNAP_SNAPSHOT",
        default_value = "http://127.0.0.1:50051",
        value_name = "ADDR"
    )]
    pub snapshot: String,
    /// Address of the host agent.
    #[allow(dead_code)]
    #[arg(
        long,
        global = true,
        env = "RAMSNAP_HOST",
        default_value = "http://127.0.0.1:50053",
        value_name = "ADDR"
    )]
    pub host: String,
    /// How to print results: aligned tables for people, JSON for scripts.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Storage domains: where volumes live (FILE directories, BLOCK volume groups).
    #[command(subcommand)]
    Domain(storage::DomainCommand),
    /// Volumes on storage domains: disks and memory dumps.
    #[command(subcommand)]
    Volume(storage::VolumeCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Domain(cmd) => storage::run_domain(&cli.global, cmd).await,
            Command::Volume(cmd) => storage::run_volume(&cli.global, cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error::report(&e);
            ExitCode::FAILURE
        }
    }
}
