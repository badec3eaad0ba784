use clap::Parser;
use ramsnap_common::server;
use ramsnap_snapshot::Coordinator;
use std::net::SocketAddr;

/// ramsnap coordinator.
#[derive(Parser)]
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = ramsnap_common::telemetry::init("snapshot");
    let args = Args::parse();
    let coordinator = Coordinator::open(&args.database_url).await?;
    let listener = server::bind("snapshot", args.listen).await?;
    server::serve(
        listener,
        vec![coordinator.service_set()],
        server::shutdown_signal(),
    )
    .await?;
    coordinator.close().await;
    Ok(())
}
