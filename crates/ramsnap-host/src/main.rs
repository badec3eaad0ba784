use clap::Parser;
use ramsnap_common::server;
use std::net::SocketAddr;

/// ramsnap host agent: runs VMs and dumps/restores their memory via libvirt.
#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "RAMSNAP_HOST_LISTEN", default_value = "127.0.0.1:50053")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = ramsnap_common::telemetry::init("host");
    let args = Args::parse();
    let listener = server::bind("host", args.listen).await?;
    server::serve(listener, Vec::new(), server::shutdown_signal()).await
}
