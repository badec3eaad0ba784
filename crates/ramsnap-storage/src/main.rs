use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};
use ramsnap_common::security::{ServerKind, ServerSecurityArgs};
use ramsnap_common::server::{self, ServiceSet};
use ramsnap_storage::service::{StorageApi, SERVICE_NAME};
use ramsnap_storage::Storage;
use std::net::SocketAddr;
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
    #[command(flatten)]
    storage: ramsnap_storage::args::StorageArgs,
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
    let cmd = ramsnap_storage::args::agent_aliases(Args::command());
    if let Err(e) = ramsnap_common::config::apply(&cmd, &argv) {
        eprintln!("ramsnap-storage: error: {e}");
        return std::process::ExitCode::from(2);
    }
    let args = match Args::from_arg_matches(&cmd.get_matches()) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    server::main("ramsnap-storage", run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _telemetry = ramsnap_common::telemetry::init("storage");
    let stop = server::stop_on_signals()?;
    let listener = server::listen(args.listen).await?;
    ramsnap_common::probe::serve_agent(args.probe_listen, stop.clone()).await?;
    let security = args
        .security
        .server(ServerKind::Agent, "storage", listener.local_addr()?)?;
    let storage = Storage::open(args.storage.config(std::path::Path::new("/var/lib/ramsnap")))
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
