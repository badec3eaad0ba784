use anyhow::Context;
use clap::{CommandFactory, Parser};
use ramsnap_common::security::{ServerKind, ServerSecurityArgs};
use ramsnap_common::server::{self, ServiceSet};
use ramsnap_storage::service::{StorageApi, SERVICE_NAME};
use ramsnap_storage::{Config, Storage};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// ramsnap storage agent: memory and disk volumes on FILE and BLOCK domains.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Plain-HTTP address for GET /livez, /readyz and /metrics (Prometheus);
    /// off by default.
    #[arg(long, env = "RAMSNAP_PROBE_LISTEN")]
    probe_listen: Option<SocketAddr>,
    /// Address to listen on.
    #[arg(long, env = "RAMSNAP_STORAGE_LISTEN", default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
    /// Where the agent remembers attached domains.
    #[arg(
        long,
        env = "RAMSNAP_STORAGE_STATE_DIR",
        default_value = "/var/lib/ramsnap/storage"
    )]
    state_dir: PathBuf,
    /// Where prepared BLOCK volumes get their paths.
    #[arg(long, env = "RAMSNAP_STORAGE_RUN_DIR", default_value = "/run/ramsnap/storage")]
    run_dir: PathBuf,
    /// Directories FILE domains may live in (repeatable).
    #[arg(
        long = "file-root",
        env = "RAMSNAP_STORAGE_FILE_ROOTS",
        value_delimiter = ',',
        default_value = "/var/lib/ramsnap/domains"
    )]
    file_roots: Vec<PathBuf>,
    /// Block devices BLOCK domains may be on (repeatable). RegisterDomain
    /// takes only these (any other device: PERMISSION_DENIED, untouched);
    /// when given, also the only devices whose domains are adopted at start.
    /// Default: none may be registered; every ramsnap VG the host sees is
    /// adopted at start.
    #[arg(
        long = "block-device",
        env = "RAMSNAP_STORAGE_BLOCK_DEVICES",
        value_delimiter = ','
    )]
    block_devices: Vec<PathBuf>,
    /// How long calls in flight get to finish after SIGTERM/SIGINT (server
    /// streams end at once; a second signal exits at once). Keep it well
    /// under the supervisor's kill timeout.
    #[arg(long, env = "RAMSNAP_SHUTDOWN_GRACE", default_value = "10s", value_parser = server::parse_duration)]
    shutdown_grace: Duration,
    #[command(flatten)]
    security: ServerSecurityArgs,
    #[command(flatten)]
    _config: ramsnap_common::config::ConfigArg,
}

fn main() -> std::process::ExitCode {
    // Settings from a config file first (see ramsnap_common::config):
    // flags, then the environment, then the file, then the defaults.
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if let Err(e) = ramsnap_common::config::apply(&Args::command(), &argv) {
        eprintln!("ramsnap-storage: error: {e}");
        return std::process::ExitCode::from(2);
    }
    server::main("ramsnap-storage", run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _telemetry = ramsnap_common::telemetry::init("storage");
    let stop = server::stop_on_signals()?;
    let listener = server::listen(args.listen).await?;
    ramsnap_common::probe::serve_agent(args.probe_listen, stop.clone()).await?;
    let security = args
        .security
        .server(ServerKind::Agent, "storage", listener.local_addr()?)?;
    let storage = Storage::open(Config {
        state_dir: args.state_dir,
        run_dir: args.run_dir,
        file_roots: args.file_roots,
        block_devices: args.block_devices,
    })
    .await
    .context("cannot start the storage agent")?;
    server::announce("storage", &listener)?;
    let set = ServiceSet::new(SERVICE_NAME, StorageApi::new(storage).into_server());
    server::serve_with_grace(
        listener,
        vec![set],
        stop.cancelled_owned(),
        args.shutdown_grace,
        security,
    )
    .await
}
