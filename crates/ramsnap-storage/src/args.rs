//! The storage agent's settings, as flags: one definition, flattened into
//! the agent's binary (`ramsnap-storage`) and into `ramsnapd`, so the two
//! cannot drift. Long names are unique across the host and storage agents
//! (`--storage-run-dir`, `--host-run-dir`); the agent binary also takes its
//! historical short names (`--run-dir`, `--state-dir`), see
//! [`agent_aliases`].
use crate::Config;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Storage agent")]
pub struct StorageArgs {
    /// Where the agent remembers attached domains [default: <root>/storage:
    /// /var/lib/ramsnap/storage, or <data-dir>/storage in ramsnapd].
    #[arg(
        long = "storage-state-dir",
        env = "RAMSNAP_STORAGE_STATE_DIR",
        value_name = "DIR"
    )]
    pub storage_state_dir: Option<PathBuf>,
    /// Where prepared BLOCK volumes get their paths.
    #[arg(
        long = "storage-run-dir",
        env = "RAMSNAP_STORAGE_RUN_DIR",
        default_value = "/run/ramsnap/storage",
        value_name = "DIR"
    )]
    pub storage_run_dir: PathBuf,
    /// Directories FILE domains may live in (repeatable) [default:
    /// <root>/domains].
    #[arg(
        long = "file-root",
        env = "RAMSNAP_STORAGE_FILE_ROOTS",
        value_delimiter = ',',
        value_name = "DIR"
    )]
    pub file_roots: Vec<PathBuf>,
    /// Block devices BLOCK domains may be on (repeatable). RegisterDomain
    /// takes only these (any other device: PERMISSION_DENIED, untouched);
    /// when given, also the only devices whose domains are adopted at start.
    /// Default: none may be registered; every ramsnap VG the host sees is
    /// adopted at start.
    #[arg(
        long = "block-device",
        env = "RAMSNAP_STORAGE_BLOCK_DEVICES",
        value_delimiter = ',',
        value_name = "DEVICE"
    )]
    pub block_devices: Vec<PathBuf>,
}

impl StorageArgs {
    /// The agent's configuration, the directories not given under `root`.
    pub fn config(&self, root: &Path) -> Config {
        Config {
            state_dir: self
                .storage_state_dir
                .clone()
                .unwrap_or_else(|| root.join("storage")),
            run_dir: self.storage_run_dir.clone(),
            file_roots: if self.file_roots.is_empty() {
                vec![root.join("domains")]
            } else {
                self.file_roots.clone()
            },
            block_devices: self.block_devices.clone(),
        }
    }
}

/// The storage agent binary's historical flag names, kept as aliases (not
/// in ramsnapd, whose host agent has its own run and state directories).
pub fn agent_aliases(cmd: clap::Command) -> clap::Command {
    cmd.mut_arg("storage_state_dir", |a| a.visible_alias("state-dir"))
        .mut_arg("storage_run_dir", |a| a.visible_alias("run-dir"))
}
