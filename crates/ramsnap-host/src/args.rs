//! The host agent's settings, as flags: one definition, flattened into the
//! agent's binary (`ramsnap-host`) and into `ramsnapd`, so the two cannot
//! drift. Long names are unique across the host and storage agents
//! (`--host-run-dir`, `--storage-run-dir`); the agent binary also takes its
//! historical short names (`--run-dir`, `--state-dir`), see
//! [`agent_aliases`]. The address of the host's storage agent is not here:
//! ramsnapd knows it.
use crate::Config;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Host agent")]
pub struct HostArgs {
    /// libvirt connection URI (test:///default for a simulated host).
    #[arg(long, env = "RAMSNAP_HOST_LIBVIRT_URI", default_value = "qemu:///system")]
    pub libvirt_uri: String,
    /// Directory of the kernels and initrds that VM specs name [default:
    /// <root>/boot: /var/lib/ramsnap/boot, or <data-dir>/boot in ramsnapd].
    #[arg(long, env = "RAMSNAP_HOST_BOOT_DIR", value_name = "DIR")]
    pub boot_dir: Option<PathBuf>,
    /// Console logs go to <host-run-dir>/<vm_id>/console.log.
    #[arg(
        long = "host-run-dir",
        env = "RAMSNAP_HOST_RUN_DIR",
        default_value = "/run/ramsnap/host",
        value_name = "DIR"
    )]
    pub host_run_dir: PathBuf,
    /// Where the agent keeps its host id [default: <root>/host].
    #[arg(long = "host-state-dir", env = "RAMSNAP_HOST_STATE_DIR", value_name = "DIR")]
    pub host_state_dir: Option<PathBuf>,
    /// The host id [default: a UUID kept in <host-state-dir>/host-id].
    #[arg(long, env = "RAMSNAP_HOST_ID")]
    pub host_id: Option<String>,
    /// libvirt domain type for QEMU: qemu (TCG) or kvm.
    #[arg(long, env = "RAMSNAP_HOST_DOMAIN_TYPE", default_value = "qemu", value_parser = ["qemu", "kvm"])]
    pub domain_type: String,
    /// Domains are named <prefix><vm_id>; the agent only looks at these.
    #[arg(long, env = "RAMSNAP_HOST_DOMAIN_PREFIX", default_value = "ramsnap-")]
    pub domain_prefix: String,
}

impl HostArgs {
    /// The agent's configuration, reaching its storage agent at `storage`,
    /// the directories not given under `root`.
    pub fn config(&self, storage: &str, root: &Path) -> Config {
        let mut c = Config::new(
            &self.libvirt_uri,
            storage,
            self.boot_dir.clone().unwrap_or_else(|| root.join("boot")),
            self.host_run_dir.clone(),
            self.host_state_dir.clone().unwrap_or_else(|| root.join("host")),
        );
        c.host_id = self.host_id.clone();
        c.domain_type = self.domain_type.clone();
        c.domain_prefix = self.domain_prefix.clone();
        c
    }
}

/// The host agent binary's historical flag names, kept as aliases (not in
/// ramsnapd, whose storage agent has its own run and state directories).
pub fn agent_aliases(cmd: clap::Command) -> clap::Command {
    cmd.mut_arg("host_run_dir", |a| a.visible_alias("run-dir"))
        .mut_arg("host_state_dir", |a| a.visible_alias("state-dir"))
}
