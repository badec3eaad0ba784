use anyhow::Context;
use clap::{CommandFactory, Parser};
use ramsnap_common::security::{ServerKind, ServerSecurityArgs};
use ramsnap_common::server::{self, ServiceSet};
use ramsnap_host::service::{HostApi, SERVICE_NAME};
use ramsnap_host::{Config, Host};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// ramsnap host agent: runs VMs and dumps/restores their memory via libvirt.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Plain-HTTP address for GET /livez, /readyz and /metrics (Prometheus);
    /// off by default.
    #[arg(long, env = "RAMSNAP_PROBE_LISTEN")]
    probe_listen: Option<SocketAddr>,
    /// Address to listen on.
    #[arg(long, env = "RAMSNAP_HOST_LISTEN", default_value = "127.0.0.1:50053")]
    listen: SocketAddr,
    /// How long calls in flight get to finish after SIGTERM/SIGINT (server
    /// streams end at once; a second signal exits at once). Keep it well
    /// under the supervisor's kill timeout.
    #[arg(long, env = "RAMSNAP_SHUTDOWN_GRACE", default_value = "10s", value_parser = server::parse_duration)]
    shutdown_grace: Duration,
    #[command(flatten)]
    host: HostArgs,
    #[command(flatten)]
    security: ServerSecurityArgs,
    #[command(flatten)]
    _config: ramsnap_common::config::ConfigArg,
}

/// The host agent's settings (shared with ramsnapd).
#[derive(clap::Args)]
struct HostArgs {
    /// libvirt connection URI (test:///default for a simulated host).
    #[arg(long, env = "RAMSNAP_HOST_LIBVIRT_URI", default_value = "qemu:///system")]
    libvirt_uri: String,
    /// This host's StorageService.
    #[arg(long, env = "RAMSNAP_HOST_STORAGE", default_value = "http://127.0.0.1:50052")]
    storage: String,
    /// Directory of the kernels and initrds that VM specs name.
    #[arg(long, env = "RAMSNAP_HOST_BOOT_DIR", default_value = "/var/lib/ramsnap/boot")]
    boot_dir: PathBuf,
    /// Console logs go to <run-dir>/<vm_id>/console.log.
    #[arg(long, env = "RAMSNAP_HOST_RUN_DIR", default_value = "/run/ramsnap/host")]
    run_dir: PathBuf,
    /// Where the agent keeps its host id.
    #[arg(long, env = "RAMSNAP_HOST_STATE_DIR", default_value = "/var/lib/ramsnap/host")]
    state_dir: PathBuf,
    /// The host id [default: a UUID kept in <state-dir>/host-id].
    #[arg(long, env = "RAMSNAP_HOST_ID")]
    host_id: Option<String>,
    /// libvirt domain type for QEMU: qemu (TCG) or kvm.
    #[arg(long, env = "RAMSNAP_HOST_DOMAIN_TYPE", default_value = "qemu", value_parser = ["qemu", "kvm"])]
    domain_type: String,
    /// Domains are named <prefix><vm_id>; the agent only looks at these.
    #[arg(long, env = "RAMSNAP_HOST_DOMAIN_PREFIX", default_value = "ramsnap-")]
    domain_prefix: String,
}

fn main() -> std::process::ExitCode {
    // Settings from a config file first (see ramsnap_common::config):
    // flags, then the environment, then the file, then the defaults.
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if let Err(e) = ramsnap_common::config::apply(&Args::command(), &argv) {
        eprintln!("ramsnap-host: error: {e}");
        return std::process::ExitCode::from(2);
    }
    server::main("ramsnap-host", run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _telemetry = ramsnap_common::telemetry::init("host");
    let stop = server::stop_on_signals()?;
    let listener = server::listen(args.listen).await?;
    ramsnap_common::probe::serve_agent(args.probe_listen, stop.clone()).await?;
    let security = args
        .security
        .server(ServerKind::Agent, "host", listener.local_addr()?)?;
    let a = args.host;
    let mut config = Config::new(&a.libvirt_uri, &a.storage, a.boot_dir, a.run_dir, a.state_dir);
    config.host_id = a.host_id;
    config.domain_type = a.domain_type;
    config.domain_prefix = a.domain_prefix;
    config.storage_transport = args.security.client("host")?;
    let host = Host::open(config).await.context("cannot start the host agent")?;
    server::announce("host", &listener)?;
    let set = ServiceSet::new(SERVICE_NAME, HostApi::new(host).into_server());
    server::serve_with_grace(
        listener,
        vec![set],
        stop.cancelled_owned(),
        args.shutdown_grace,
        security,
    )
    .await
}
