use anyhow::Context;
use clap::{CommandFactory, Parser};
use ramsnap_common::security::{ServerKind, ServerSecurityArgs};
use ramsnap_common::server;
use ramsnap_snapshot::Coordinator;
use std::net::SocketAddr;
use std::time::Duration;

/// ramsnap coordinator.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "RAMSNAP_SNAPSHOT_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// The coordinator's database: `sqlite:PATH` (the embedded default) or
    /// `postgres://...` (production).
    #[arg(
        long,
        env = "RAMSNAP_DATABASE_URL",
        default_value = "sqlite:/var/lib/ramsnap/coordinator.db"
    )]
    database_url: String,
    /// How long calls in flight get to finish after SIGTERM/SIGINT (server
    /// streams end at once; a second signal exits at once). Keep it well
    /// under the supervisor's kill timeout.
    #[arg(long, env = "RAMSNAP_SHUTDOWN_GRACE", default_value = "10s", value_parser = server::parse_duration)]
    shutdown_grace: Duration,
    /// Also serve plain-HTTP probes here: `GET /livez`, and `GET /readyz`
    /// (200 while this replica holds its lease, else 503), for Kubernetes,
    /// whose probes cannot speak the gRPC port's mutual TLS. Off by default.
    #[arg(long, env = "RAMSNAP_PROBE_LISTEN")]
    probe_listen: Option<SocketAddr>,
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
        eprintln!("ramsnap-snapshot: error: {e}");
        return std::process::ExitCode::from(2);
    }
    server::main("ramsnap-snapshot", run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _telemetry = ramsnap_common::telemetry::init("snapshot");
    let stop = server::stop_on_signals()?;
    let listener = server::listen(args.listen).await?;
    let security = args
        .security
        .server(ServerKind::Coordinator, "coordinator", listener.local_addr()?)?;
    let agents = args.security.client("coordinator")?;
    let coordinator = Coordinator::connect_with(&args.database_url, agents)
        .await
        .with_context(|| {
            format!(
                "cannot open the database {}",
                server::redact_url(&args.database_url)
            )
        })?;
    if let Some(addr) = args.probe_listen {
        let probes = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for probes on {addr}"))?;
        tracing::info!(addr = %probes.local_addr()?, "serving /livez and /readyz");
        tokio::spawn(ramsnap_common::probe::serve(
            probes,
            coordinator.ready_check(),
            stop.clone(),
        ));
    }
    coordinator.resume().await?;
    server::announce("snapshot", &listener)?;
    let result = server::serve_with_grace(
        listener,
        vec![coordinator.service_set()],
        stop.cancelled_owned(),
        args.shutdown_grace,
        security,
    )
    .await;
    // The pool waits for connections still checked out (a call abandoned
    // with the grace period): bounded too.
    if tokio::time::timeout(Duration::from_secs(2), coordinator.close())
        .await
        .is_err()
    {
        tracing::warn!("the database did not close within 2 s; exiting anyway");
    }
    result
}
