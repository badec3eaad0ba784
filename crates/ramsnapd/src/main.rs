//! ramsnapd: the embedded default. The coordinator (snapshot), the storage
//! agent and the host agent run in one process, each on its own port, so
//! that clients address them exactly as they would separate deployments.
use anyhow::{anyhow, Context};
use clap::{CommandFactory, FromArgMatches, Parser};
use ramsnap_common::security::{ServerKind, ServerSecurityArgs};
use ramsnap_common::server::{self, ServiceSet};
use ramsnap_host::service::{HostApi, SERVICE_NAME as HOST_SERVICE};
use ramsnap_host::Host;
use ramsnap_snapshot::db::{CompatibilityVersion, Database, NewCluster, NewHost};
use ramsnap_snapshot::Coordinator;
use ramsnap_storage::model::{DomainRole, DomainType};
use ramsnap_storage::service::{StorageApi, SERVICE_NAME as STORAGE_SERVICE};
use ramsnap_storage::Storage;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

/// ramsnap, all in one: snapshot, storage and host services in one process.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address of the snapshot service (the coordinator).
    #[arg(long, env = "RAMSNAP_SNAPSHOT_LISTEN", default_value = "127.0.0.1:50051")]
    snapshot_listen: SocketAddr,
    /// Address of the storage service.
    #[arg(long, env = "RAMSNAP_STORAGE_LISTEN", default_value = "127.0.0.1:50052")]
    storage_listen: SocketAddr,
    /// Address of the host service.
    #[arg(long, env = "RAMSNAP_HOST_LISTEN", default_value = "127.0.0.1:50053")]
    host_listen: SocketAddr,
    /// Root of the local data: the coordinator's SQLite database, FILE domains
    /// under <data-dir>/domains and the storage agent's state under
    /// <data-dir>/storage, unless overridden.
    #[arg(long, env = "RAMSNAP_DATA_DIR", default_value = "/var/lib/ramsnap")]
    data_dir: PathBuf,
    /// The coordinator's database: `sqlite:PATH` or `postgres://...`
    /// [default: sqlite:<data-dir>/coordinator.db].
    #[arg(long, env = "RAMSNAP_DATABASE_URL")]
    database_url: Option<String>,
    #[command(flatten)]
    storage: ramsnap_storage::args::StorageArgs,
    /// A storage domain to attach at start (repeatable): NAME=file:DIR,
    /// NAME=export:DIR (an EXPORT domain, FILE) or NAME=block:DEVICE. One
    /// already attached under NAME is kept; one found at the location is
    /// adopted; else a new one is laid out there.
    #[arg(long = "domain", env = "RAMSNAP_DOMAINS", value_delimiter = ',', value_name = "NAME=KIND:LOCATION", value_parser = parse_domain)]
    domains: Vec<DomainArg>,
    /// Plain-HTTP address for GET /livez, /readyz and /metrics (Prometheus:
    /// the three services' metrics); off by default.
    #[arg(long, env = "RAMSNAP_PROBE_LISTEN")]
    probe_listen: Option<SocketAddr>,
    #[command(flatten)]
    host: ramsnap_host::args::HostArgs,
    /// How long calls in flight get to finish after SIGTERM/SIGINT (server
    /// streams end at once; a second signal exits at once). Keep it well
    /// under the supervisor's kill timeout.
    #[arg(long, env = "RAMSNAP_SHUTDOWN_GRACE", default_value = "10s", value_parser = server::parse_duration)]
    shutdown_grace: Duration,
    /// Security: by default the dev certificates in <data-dir>/tls (a local
    /// CA and a certificate per service and per role, made on first start;
    /// the CLI finds them there), or --insecure on loopback.
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
    let cmd = command();
    if let Err(e) = ramsnap_common::config::apply(&cmd, &argv) {
        eprintln!("ramsnapd: error: {e}");
        return std::process::ExitCode::from(2);
    }
    let args = match Args::from_arg_matches(&cmd.get_matches()) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    server::main("ramsnapd", run(args))
}

/// The command, with the storage agent's names ramsnapd has always taken
/// (`--state-dir`, `--run-dir`) kept as aliases of `--storage-state-dir`
/// and `--storage-run-dir`.
fn command() -> clap::Command {
    ramsnap_storage::args::agent_aliases(Args::command())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _telemetry = ramsnap_common::telemetry::init("embedded");
    // Handlers first: a SIGTERM right after the "listening" lines must stop
    // the process cleanly, not kill it. One signal stops all three services
    // (a second one exits at once); so does any one of them failing.
    let stop = server::stop_on_signals()?;

    // Bind all three before anything else, so that a taken port fails the
    // start at once, with one line and nothing half-opened.
    let snapshot = server::listen(args.snapshot_listen).await?;
    let storage_listener = server::listen(args.storage_listen).await?;
    let host = server::listen(args.host_listen).await?;
    ramsnap_common::probe::serve_agent(args.probe_listen, stop.clone()).await?;

    std::fs::create_dir_all(&args.data_dir).map_err(|e| {
        anyhow!(
            "cannot create the data directory {}: {}",
            args.data_dir.display(),
            server::io_reason(&e)
        )
    })?;
    let mut security = args.security.clone();
    if security.tls_cert.is_none() && security.tls_dir.is_none() && !security.insecure {
        security.tls_dir = Some(args.data_dir.join("tls"));
    }
    let snapshot_security =
        security.server(ServerKind::Coordinator, "coordinator", snapshot.local_addr()?)?;
    let storage_security = security.server(ServerKind::Agent, "storage", storage_listener.local_addr()?)?;
    let host_security = security.server(ServerKind::Agent, "host", host.local_addr()?)?;
    let to_agents = security.client("coordinator")?;
    let to_storage = security.client("host")?;
    let database_url = args
        .database_url
        .unwrap_or_else(|| format!("sqlite:{}", args.data_dir.join("coordinator.db").display()));
    // Sagas are resumed only once this process's own agents answer (below).
    let coordinator = Coordinator::connect_with(&database_url, to_agents.clone())
        .await
        .with_context(|| format!("cannot open the database {}", server::redact_url(&database_url)))?;

    let storage_config = args.storage.config(&args.data_dir);
    if args.storage.file_roots.is_empty() {
        // The default root is ours to create; explicit roots (NFS mounts) are not.
        for root in &storage_config.file_roots {
            std::fs::create_dir_all(root)
                .map_err(|e| anyhow!("cannot create {}: {}", root.display(), server::io_reason(&e)))?;
        }
    }
    let storage = Storage::open(storage_config)
        .await
        .context("cannot start the storage agent")?;
    attach_domains(&storage, &args.domains).await?;

    // The host agent reaches its storage agent over gRPC, as a separate
    // deployment does: at the port just bound (loopback for a wildcard).
    let mut storage_addr = storage_listener.local_addr()?;
    if storage_addr.ip().is_unspecified() {
        storage_addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut host_config = args
        .host
        .config(&format!("http://{storage_addr}"), &args.data_dir);
    host_config.storage_transport = to_storage;
    let host_agent = Host::open(host_config)
        .await
        .context("cannot start the host agent")?;
    let mut host_addr = host.local_addr()?;
    if host_addr.ip().is_unspecified() {
        host_addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    default_cluster(
        &coordinator.app.db,
        &format!("http://{host_addr}"),
        &format!("http://{storage_addr}"),
    )
    .await
    .context("cannot create the default cluster")?;

    server::announce("snapshot", &snapshot)?;
    server::announce("storage", &storage_listener)?;
    server::announce("host", &host)?;
    let grace = args.shutdown_grace;
    let run = |listener, sets, security| {
        let stop = stop.clone();
        async move {
            let result =
                server::serve_with_grace(listener, sets, stop.clone().cancelled_owned(), grace, security)
                    .await;
            stop.cancel();
            result
        }
    };
    let storage_set = ServiceSet::new(STORAGE_SERVICE, StorageApi::new(storage).into_server());
    let host_set = ServiceSet::new(HOST_SERVICE, HostApi::new(host_agent).into_server());
    let resume = async {
        for (addr, service) in [(storage_addr, STORAGE_SERVICE), (host_addr, HOST_SERVICE)] {
            if let Err(e) =
                ramsnap_common::ready::wait_serving_over(&to_agents, addr, service, Duration::from_secs(60))
                    .await
            {
                tracing::error!(error = %e, "an agent of this process does not answer; stopping");
                stop.cancel();
                return Err(e);
            }
        }
        coordinator.resume().await.inspect_err(|_| stop.cancel())
    };
    let (a, b, c, d) = tokio::join!(
        run(snapshot, vec![coordinator.service_set()], snapshot_security),
        run(storage_listener, vec![storage_set], storage_security),
        run(host, vec![host_set], host_security),
        resume
    );
    // The database pool waits for connections still checked out (a saga
    // step abandoned with the grace period): bounded too.
    if tokio::time::timeout(Duration::from_secs(2), coordinator.close())
        .await
        .is_err()
    {
        tracing::warn!("the database did not close within 2 s; exiting anyway");
    }
    a.and(b).and(c).and(d)
}

/// `--domain NAME=KIND:LOCATION`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DomainArg {
    name: String,
    kind: DomainType,
    role: DomainRole,
    location: String,
}

fn parse_domain(text: &str) -> Result<DomainArg, String> {
    let usage = "expected NAME=file:DIR, NAME=export:DIR or NAME=block:DEVICE";
    let (name, rest) = text.split_once('=').ok_or(usage)?;
    let (kind, location) = rest.split_once(':').ok_or(usage)?;
    let (kind, role) = match kind {
        "file" => (DomainType::File, DomainRole::Data),
        "export" => (DomainType::File, DomainRole::Export),
        "block" => (DomainType::Block, DomainRole::Data),
        other => return Err(format!("unknown kind {other:?}: {usage}")),
    };
    if name.is_empty() || location.is_empty() {
        return Err(usage.into());
    }
    Ok(DomainArg {
        name: name.into(),
        kind,
        role,
        location: location.into(),
    })
}

/// Attaches the `--domain`s: each one not attached under its name yet is
/// registered (adopted when a domain is at its location). A refusal stops
/// the start with the domain's name and the reason.
async fn attach_domains(storage: &Storage, domains: &[DomainArg]) -> anyhow::Result<()> {
    for d in domains {
        let known = storage.list_domains().await?;
        if let Some(k) = known.iter().find(|k| k.name == d.name) {
            tracing::info!(domain = %k.id, name = %d.name, location = %k.location, "storage domain already attached");
            continue;
        }
        let (info, adopted) = storage
            .register_domain(
                None,
                d.name.clone(),
                d.kind,
                d.location.clone(),
                Some(d.role),
                None,
            )
            .await
            .map_err(|e| anyhow!("cannot attach storage domain {} at {}: {e}", d.name, d.location))?;
        tracing::info!(
            domain = %info.id, name = %info.name, location = %info.location, adopted,
            "storage domain attached"
        );
    }
    Ok(())
}

/// On the first start, a cluster "default" at compatibility 3.3 with this
/// machine as its host "local", so that VMs can be made at once. Later
/// starts keep what is there (the default ports are fixed).
async fn default_cluster(db: &Database, host_address: &str, storage_address: &str) -> anyhow::Result<()> {
    if !db.list_clusters().await?.is_empty() {
        return Ok(());
    }
    let cluster = db
        .create_cluster(&NewCluster {
            id: Uuid::new_v4(),
            name: "default".into(),
            compatibility_version: CompatibilityVersion::MEMORY_SNAPSHOTS,
        })
        .await?;
    db.create_host(&NewHost {
        id: Uuid::new_v4(),
        name: "local".into(),
        cluster_id: cluster.id,
        host_address: host_address.into(),
        storage_address: storage_address.into(),
    })
    .await?;
    tracing::info!(cluster = %cluster.id, "created cluster \"default\" (3.3) with host \"local\"");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_flags() {
        assert_eq!(
            parse_domain("local-file=file:/var/lib/ramsnap/domains/local").unwrap(),
            DomainArg {
                name: "local-file".into(),
                kind: DomainType::File,
                role: DomainRole::Data,
                location: "/var/lib/ramsnap/domains/local".into(),
            }
        );
        let e = parse_domain("x=export:/d").unwrap();
        assert_eq!((e.kind, e.role), (DomainType::File, DomainRole::Export));
        assert_eq!(
            parse_domain("b=block:/dev/loop3").unwrap().kind,
            DomainType::Block
        );
        for bad in ["", "x", "x=/d", "=file:/d", "x=file:", "x=nfs:/d"] {
            assert!(parse_domain(bad).is_err(), "{bad}");
        }
    }
}
