//! `ramsnap`: the operator's command line for the ramsnap services.
//!
//! One module per service, with one module per resource inside: [`storage`]
//! for domains and volumes; [`coordinator`] for clusters, hosts, VMs, their
//! snapshots and the long operations that change them. [`output`] prints
//! tables and JSON, [`error`] prints a failed call with its details,
//! [`client`] connects to the services.

mod args;
mod client;
mod coordinator;
mod error;
mod names;
mod output;
mod storage;

use clap::{CommandFactory, Parser, Subcommand};
use output::Format;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "ramsnap",
    version,
    about = "VM snapshots with guest RAM: clusters, VMs, snapshots, storage domains and volumes"
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
    /// Address of the snapshot service (the coordinator).
    #[arg(
        long,
        global = true,
        env = "RAMSNAP_SNAPSHOT",
        default_value = "http://127.0.0.1:50051",
        value_name = "ADDR"
    )]
    pub snapshot: String,
    /// Address of the host agent.
    // Read by the host agent commands to come; accepted now so scripts and
    // environments can set every address at once.
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
    #[command(flatten)]
    pub security: ramsnap_common::security::ClientSecurityArgs,
    #[command(flatten)]
    pub config: ramsnap_common::config::ConfigArg,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Clusters: their compatibility version decides whether snapshots can
    /// save memory (3.3 and above).
    #[command(subcommand)]
    Cluster(coordinator::ClusterCommand),
    /// Hypervisor hosts of a cluster.
    #[command(subcommand)]
    Host(coordinator::HostCommand),
    /// VMs: create, run, stop, remove, watch their status, read their console; export and import them.
    #[command(subcommand)]
    Vm(coordinator::VmCommand),
    /// A VM's snapshots, with or without its memory: create, preview, undo,
    /// commit, clone, remove.
    #[command(subcommand)]
    Snapshot(coordinator::SnapshotCommand),
    /// The coordinator's long operations: follow or cancel them.
    #[command(subcommand)]
    Operation(coordinator::OperationCommand),
    /// Storage domains: where volumes live (FILE directories, BLOCK volume groups).
    #[command(subcommand)]
    Domain(storage::DomainCommand),
    /// Volumes on storage domains: disks and memory dumps.
    #[command(subcommand)]
    Volume(storage::VolumeCommand),
    /// Prints the completion script for a shell, e.g.
    /// `ramsnap completions bash > /etc/bash_completion.d/ramsnap`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Writes the man pages (ramsnap.1, and ramsnap-vm-create.1 and so on
    /// for each command) into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    // Like any Unix filter: a closed pipe (`ramsnap ... | head`) ends the
    // process quietly instead of a panic in println!.
    // SAFETY: setting a signal disposition to the default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Settings from a config file (ramsnap_common::config): flags, then
    // the environment, then the file, then the defaults.
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if let Err(e) = ramsnap_common::config::apply(&Cli::command(), &argv) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    // Generated from the clap definitions; no service is needed.
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "ramsnap", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            return match write_man_pages(dir) {
                Ok(n) => {
                    println!("wrote {n} man pages into {}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: writing man pages into {}: {e}", dir.display());
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Cluster(cmd) => coordinator::run_cluster(&cli.global, cmd).await,
            Command::Host(cmd) => coordinator::run_host(&cli.global, cmd).await,
            Command::Vm(cmd) => coordinator::run_vm(&cli.global, cmd).await,
            Command::Snapshot(cmd) => coordinator::run_snapshot(&cli.global, cmd).await,
            Command::Operation(cmd) => coordinator::run_operation(&cli.global, cmd).await,
            Command::Domain(cmd) => storage::run_domain(&cli.global, cmd).await,
            Command::Volume(cmd) => storage::run_volume(&cli.global, cmd).await,
            Command::Completions { .. } | Command::Man { .. } => Ok(()),
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

/// One page for `ramsnap` and one per command and subcommand, named as
/// man does (`ramsnap-vm-create.1`); how many were written.
fn write_man_pages(dir: &std::path::Path) -> std::io::Result<usize> {
    fn write(dir: &std::path::Path, cmd: clap::Command, name: String) -> std::io::Result<usize> {
        let cmd = cmd.name(name.clone());
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
        std::fs::write(dir.join(format!("{name}.1")), page)?;
        let mut n = 1;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            n += write(dir, sub.clone(), format!("{name}-{}", sub.get_name()))?;
        }
        Ok(n)
    }
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command();
    cmd.build();
    write(dir, cmd, "ramsnap".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_and_man_pages_come_from_the_definitions() {
        let mut bash = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "ramsnap",
            &mut bash,
        );
        let bash = String::from_utf8(bash).unwrap();
        assert!(
            bash.contains("--restore-memory") && bash.contains("ramsnap__subcmd__snapshot__subcmd__preview")
        );
        let dir = tempfile::tempdir().unwrap();
        let n = write_man_pages(dir.path()).unwrap();
        assert!(n > 30, "{n}");
        let page = std::fs::read_to_string(dir.path().join("ramsnap-snapshot-preview.1")).unwrap();
        assert!(page.contains("restore\\-memory"), "{page}");
    }

    /// Every command's flags fit together (no flag spelled twice, e.g. a
    /// subcommand's `--host` against the global one).
    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// No argument shares its id with a global flag (`snapshot`, `host`,
    /// `storage`, `output`): clap would hand one's value to the other.
    #[test]
    fn arguments_do_not_shadow_global_flags() {
        let (vm, snap, host) = (
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().to_string(),
        );
        let baseline = Cli::try_parse_from(["ramsnap", "cluster", "list"]).unwrap();
        for args in [
            vec!["snapshot", "preview", &vm, &snap, "--restore-memory"],
            vec!["snapshot", "remove", &vm, &snap],
            vec!["snapshot", "clone", &vm, &snap, "--name", "copy"],
            vec!["snapshot", "get", &snap],
            vec!["vm", "run", &vm, "--on-host", &host],
            vec!["host", "remove", &host],
            vec!["vm", "update", &vm, "--vcpus", "2"],
            vec![
                "host",
                "add",
                "--cluster",
                &vm,
                "--name",
                "h",
                "--host-address",
                "x",
                "--storage-address",
                "y",
            ],
        ] {
            let cli = Cli::try_parse_from(std::iter::once("ramsnap").chain(args.iter().copied()))
                .unwrap_or_else(|e| panic!("{args:?}: {e}"));
            // As without these arguments (defaults, or RAMSNAP_* variables).
            assert_eq!(cli.global.snapshot, baseline.global.snapshot, "{args:?}");
            assert_eq!(cli.global.host, baseline.global.host, "{args:?}");
            assert_eq!(cli.global.storage, baseline.global.storage, "{args:?}");
        }
    }
}
