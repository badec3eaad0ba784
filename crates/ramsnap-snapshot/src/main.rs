use clap::Parser;
use ramsnap_common::server;
use std::net::SocketAddr;

/// ramsnap coordinator.
#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "RAMSNAP_SNAPSHOT_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = ramsnap_common::telemetry::init("snapshot");
    let args = Args::parse();
    let listener = server::bind("snapshot", args.listen).await?;
    server::serve(listener, Vec::new(), server::shutdown_signal()).await
}
