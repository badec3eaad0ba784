use clap::Parser;
use ramsnap_common::server;
use ramsnap_snapshot::db::Database;
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
    if let Some(path) = args.database_url.strip_prefix("sqlite:") {
        let path = path.trim_start_matches("//");
        if let Some(dir) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let db = Database::connect(&args.database_url).await?;
    db.migrate().await?;
    tracing::info!(backend = ?db.backend(), "database ready");
    let listener = server::bind("snapshot", args.listen).await?;
    server::serve(listener, Vec::new(), server::shutdown_signal()).await?;
    db.close().await;
    Ok(())
}
