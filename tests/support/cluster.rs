//! A whole ramsnap system for one end-to-end test: the three real binaries as
//! separate processes (storage agent, host agent on the local libvirt, the
//! coordinator on SQLite or PostgreSQL), a FILE and a BLOCK storage domain,
//! the test guest's kernel and initramfs in the host's boot directory, and a
//! cluster with the host added. Everything is per test (a temp dir, a loop
//! device, a database, unique names) and is torn down on drop, also when the
//! test fails: the guests first (libvirt outlives the processes), then the
//! processes, the database, the VG and the loop devices, the files.
//!
//! Guests are CPU-bound under TCG and the machines have 2 cores: a fixture
//! holds one of [`GUEST_SLOTS`] for its lifetime, and the tests run at most
//! one guest at a time each.
//!
//! A test process that is killed runs no drop: its services get SIGTERM
//! from the kernel (see `spawn`), and the first fixture of the next test
//! process cleans the rest ([`sweep_stale`]). `RAMSNAP_E2E_KEEP=1` keeps
//! each fixture's directory (service logs, console logs, the database).
use crate::console::{ConsoleLog, Tick};
use crate::guest::{self, CMDLINE, INITRD, KERNEL};
use crate::{spawn_env, Running};
use ramsnap_proto::common::v1::VolumeRef;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::cluster_service_client::ClusterServiceClient;
use ramsnap_proto::snapshot::v1::operation_service_client::OperationServiceClient;
use ramsnap_proto::snapshot::v1::snapshot_service_client::SnapshotServiceClient;
use ramsnap_proto::snapshot::v1::vm_service_client::VmServiceClient;
use ramsnap_proto::storage::v1 as spb;
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::sync::{Semaphore, SemaphorePermit};
use tonic::transport::Channel;
use uuid::Uuid;

pub use pb::VmStatus;

pub const MIB: u64 = 1024 * 1024;
/// The acceptance VMs: 256 MiB, 1 vCPU, one 64 MiB disk.
pub const VM_MEMORY_BYTES: u64 = 256 * MIB;
pub const VM_DISK_BYTES: u64 = 64 * MIB;
/// The BLOCK domain's PV: a sparse file, so only what is written costs.
/// A 256 MiB guest's paused-mode dump volume is 456 MiB, preallocated.
/// `RAMSNAP_E2E_BLOCK_PV_BYTES` sets another size (benchmarks whose
/// memory volumes must all fit on BLOCK).
const BLOCK_PV_BYTES: u64 = 4 << 30;

fn block_pv_bytes() -> u64 {
    std::env::var("RAMSNAP_E2E_BLOCK_PV_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(BLOCK_PV_BYTES)
}

/// Longest wait for an operation to end.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest wait for a VM status (a boot under TCG on a busy machine).
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for console output.
pub const CONSOLE_TIMEOUT: Duration = Duration::from_secs(120);

/// At most this many fixtures (so guests) at once in this process.
pub static GUEST_SLOTS: Semaphore = Semaphore::const_new(2);

/// The host agent names its libvirt domains `<prefix><vm_id>`
/// (crates/ramsnap-host/src/host.rs, `Config::domain_prefix`).
pub const DOMAIN_PREFIX: &str = "ramsnap-";
const LIBVIRT_URI: &str = "qemu:///system";
/// The variable that names the PostgreSQL server for the PG variants.
pub const PG_URL_VAR: &str = "RAMSNAP_TEST_PG_URL";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// How the system's services run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Three processes: storage agent, host agent, coordinator.
    Separate,
    /// One `ramsnapd` process (the embedded default).
    Embedded,
}

/// One of the system's processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Process {
    /// The coordinator, or the whole `ramsnapd` in the embedded layout.
    Coordinator,
    HostAgent,
    StorageAgent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainKind {
    File,
    Block,
}

impl DomainKind {
    pub fn other(self) -> DomainKind {
        match self {
            DomainKind::File => DomainKind::Block,
            DomainKind::Block => DomainKind::File,
        }
    }
}

pub fn request_id() -> String {
    Uuid::new_v4().to_string()
}

async fn connect(addr: &str) -> Channel {
    crate::connect_as(addr, "admin").await
}

// ---------------------------------------------------------------------------
// Loop device with an LVM PV (the BLOCK domain's LUN)
// ---------------------------------------------------------------------------

/// A loop device over a sparse file. On drop: every loop device made over it
/// (the storage agent's activations of LVs), the VG on it, the PV label, the
/// device itself.
pub struct LoopDevice {
    pub device: PathBuf,
}

impl LoopDevice {
    pub fn new(file: &Path, size: u64) -> LoopDevice {
        std::fs::File::create(file)
            .and_then(|f| f.set_len(size))
            .unwrap_or_else(|e| panic!("creating {}: {e}", file.display()));
        // Direct I/O to the file, as a PV on a real device has no page
        // cache beneath it (see the storage agent's loop attach).
        let out = Command::new("losetup")
            .args(["--direct-io=on", "--find", "--show"])
            .arg(file)
            .output()
            .expect("running losetup (root and util-linux needed)");
        assert!(
            out.status.success(),
            "losetup --find --show {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice {
            device: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let dev = self.device.display().to_string();
        for loop_dev in loops_over(&self.device) {
            let _ = Command::new("losetup").arg("-d").arg(loop_dev).output();
        }
        let cfg = ["--config", "global { activation = 0 }"];
        if let Ok(out) = Command::new("pvs")
            .args(cfg)
            .args(["--noheadings", "-o", "vg_name"])
            .arg(&dev)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .output()
        {
            let vg = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !vg.is_empty() {
                let _ = Command::new("vgremove")
                    .args(cfg)
                    .args(["-f", &vg])
                    .env("LVM_SUPPRESS_FD_WARNINGS", "1")
                    .output();
            }
        }
        let _ = Command::new("pvremove")
            .args(cfg)
            .args(["-ff", "-y", &dev])
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .output();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
    }
}

/// Loop devices whose backing file is `pv` (prepared BLOCK volumes).
pub fn loops_over(pv: &Path) -> Vec<PathBuf> {
    let dev = pv.display().to_string();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("loop/backing_file"))
                .map(|b| b.trim() == dev)
                .unwrap_or(false)
        })
        .map(|e| PathBuf::from("/dev").join(e.file_name()))
        .collect()
}

// ---------------------------------------------------------------------------
// A PostgreSQL database per test
// ---------------------------------------------------------------------------

/// A fresh database on the server RAMSNAP_TEST_PG_URL names, dropped (with
/// FORCE) on drop.
pub struct PgDatabase {
    admin_url: String,
    pub name: String,
    pub url: String,
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    format!("{server}/{name}{query}")
}

/// Runs `f` on a runtime of its own on another thread (usable from Drop,
/// inside or outside a runtime).
fn on_own_runtime<T: Send + 'static>(
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>> + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(f())
    })
    .join()
    .expect("the database thread panicked")
}

impl PgDatabase {
    pub fn create() -> PgDatabase {
        let admin_url = std::env::var(PG_URL_VAR).unwrap_or_else(|_| {
            panic!(
                "{PG_URL_VAR} is not set: the PostgreSQL variants of the end-to-end tests need a \
                 PostgreSQL server whose user may CREATE DATABASE (scripts/setup/postgres.sh starts \
                 one and prints its URL; scripts/test.sh sets {PG_URL_VAR} to it)"
            )
        });
        let name = format!("ramsnap_e2e_{}", Uuid::new_v4().simple());
        let (admin, db) = (admin_url.clone(), name.clone());
        let created: Result<(), String> = on_own_runtime(move || {
            Box::pin(async move {
                use sqlx::{Connection, Executor};
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .map_err(|e| format!("connecting to {PG_URL_VAR}: {e}"))?;
                conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
                    .await
                    .map_err(|e| format!("CREATE DATABASE {db}: {e}"))?;
                let _ = conn.close().await;
                Ok(())
            })
        });
        if let Err(e) = created {
            panic!("{e} (is PostgreSQL running? scripts/setup/postgres.sh)");
        }
        let url = with_database(&admin_url, &name);
        PgDatabase { admin_url, name, url }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (admin, db) = (self.admin_url.clone(), self.name.clone());
        let dropped: Result<(), String> = on_own_runtime(move || {
            Box::pin(async move {
                use sqlx::{Connection, Executor};
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .map_err(|e| e.to_string())?;
                conn.execute(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
                )))
                .await
                .map_err(|e| e.to_string())?;
                let _ = conn.close().await;
                Ok(())
            })
        });
        if let Err(e) = dropped {
            eprintln!("warning: dropping test database {}: {e}", self.name);
        }
    }
}

// ---------------------------------------------------------------------------
// libvirt clean-up
// ---------------------------------------------------------------------------

fn virsh(args: &[&str]) -> Option<String> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(LIBVIRT_URI)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Destroys and undefines the domains of `vm_ids` and every ramsnap domain
/// whose definition mentions `marker` (the fixture's directory: the console
/// log lives there), and removes their QEMU logs.
pub fn destroy_domains(vm_ids: &[String], marker: &str) {
    let mut names: BTreeSet<String> = vm_ids.iter().map(|id| format!("{DOMAIN_PREFIX}{id}")).collect();
    let listed = if marker.is_empty() {
        None
    } else {
        virsh(&["list", "--all", "--name"])
    };
    if let Some(list) = listed {
        for name in list
            .lines()
            .map(str::trim)
            .filter(|n| n.starts_with(DOMAIN_PREFIX))
        {
            if names.contains(name) {
                continue;
            }
            if virsh(&["dumpxml", name]).is_some_and(|xml| xml.contains(marker)) {
                names.insert(name.to_string());
            }
        }
    }
    for name in &names {
        let _ = virsh(&["destroy", name]);
        let _ = virsh(&["undefine", name, "--snapshots-metadata"]);
        let _ = std::fs::remove_file(format!("/var/log/libvirt/qemu/{name}.log"));
    }
}

// ---------------------------------------------------------------------------
// Leftovers of killed test processes
// ---------------------------------------------------------------------------

/// In each fixture's directory: "<pid> <start time>" of the test process.
const OWNER_FILE: &str = "owner";
/// In each fixture's directory, for PostgreSQL: the database's name.
const PG_FILE: &str = "pg-database";
const ROOT_PREFIX: &str = "ramsnap-e2e-";

/// A fresh temp directory for a test's fixture, named and owned so that
/// [`sweep_stale`] cleans what a killed run left in it (its processes,
/// guests and loop devices).
pub fn fixture_dir(label: &str) -> tempfile::TempDir {
    sweep_stale();
    let root = tempfile::Builder::new()
        .prefix(&format!("{ROOT_PREFIX}{label}-"))
        .tempdir()
        .expect("creating the test's temp dir");
    write_owner(root.path());
    root
}

/// A process's start time (clock ticks since boot), which tells it apart
/// from a later process with the same pid.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; the fields after the command's closing parenthesis start at 3.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

fn write_owner(root: &Path) {
    let pid = std::process::id();
    let start = process_start_time(pid).unwrap_or(0);
    std::fs::write(root.join(OWNER_FILE), format!("{pid} {start}\n")).expect("writing the owner file");
}

/// Whether the process that made fixture directory `dir` is gone.
fn owner_gone(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(OWNER_FILE)) else {
        // Being created, or not ours.
        return false;
    };
    let mut it = text.split_whitespace().map(|x| x.parse::<u64>().ok());
    match (it.next().flatten(), it.next().flatten()) {
        (Some(pid), Some(start)) => process_start_time(pid as u32) != Some(start),
        _ => false,
    }
}

/// SIGKILLs the processes whose command line mentions `marker` (services a
/// killed test left running).
fn kill_processes_mentioning(marker: &str) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            // SAFETY: kill(2) of a process that runs on a stale test's files.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Cleans what test processes that were killed (no drop ran) left: their
/// guests, loop devices, VGs, databases and directories. Once per process.
pub fn sweep_stale() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let dir = e.path();
            // The dev certificates of a test process that has ended
            // (`tls_dir`, named by its pid).
            if let Some(pid) = e
                .file_name()
                .to_string_lossy()
                .strip_prefix("ramsnap-tls-e2e-")
                .and_then(|p| p.parse::<u32>().ok())
            {
                if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                continue;
            }
            let stale =
                e.file_name().to_string_lossy().starts_with(ROOT_PREFIX) && dir.is_dir() && owner_gone(&dir);
            if !stale {
                continue;
            }
            eprintln!("cleaning the leftovers of a killed test run: {}", dir.display());
            let marker = format!("{}/", dir.display());
            kill_processes_mentioning(&marker);
            destroy_domains(&[], &marker);
            if let Ok(blocks) = std::fs::read_dir("/sys/block") {
                for b in blocks.flatten() {
                    let backing =
                        std::fs::read_to_string(b.path().join("loop/backing_file")).unwrap_or_default();
                    if backing.starts_with(&marker) {
                        drop(LoopDevice {
                            device: PathBuf::from("/dev").join(b.file_name()),
                        });
                    }
                }
            }
            if let (Ok(name), Ok(admin_url)) = (
                std::fs::read_to_string(dir.join(PG_FILE)),
                std::env::var(PG_URL_VAR),
            ) {
                drop(PgDatabase {
                    admin_url,
                    name: name.trim().to_string(),
                    url: String::new(),
                });
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    });
}

// ---------------------------------------------------------------------------
// The fixture
// ---------------------------------------------------------------------------

/// A VM status stream, recorded from before a call until the wanted status.
pub struct StatusRecorder {
    seen: tokio::sync::watch::Receiver<Vec<VmStatus>>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusRecorder {
    /// Waits until a status after the first one (the status when the watch
    /// began) is `until`; returns every status seen so far.
    pub async fn until(&mut self, until: VmStatus, timeout: Duration, what: &str) -> Vec<VmStatus> {
        let waited = tokio::time::timeout(
            timeout,
            self.seen.wait_for(|v| v.iter().skip(1).any(|s| *s == until)),
        )
        .await
        .map(|r| r.map(|_| ()));
        let seen = self.seen.borrow().clone();
        match waited {
            Ok(Ok(_)) => {
                let end = seen.iter().skip(1).position(|s| *s == until).expect("present") + 2;
                seen[..end].to_vec()
            }
            Ok(Err(_)) => panic!("{what}: the WatchVm stream ended before {until:?}; seen {seen:?}"),
            Err(_) => panic!("{what}: no {until:?} within {timeout:?}; seen {seen:?}"),
        }
    }
}

impl Drop for StatusRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The statuses from the first one after the VM left DOWN (leading DOWN and
/// IMAGE_LOCKED, the run's preparation, dropped), consecutive repeats merged.
pub fn startup_sequence(statuses: &[VmStatus]) -> Vec<VmStatus> {
    let mut out: Vec<VmStatus> = Vec::new();
    for s in statuses {
        if out.is_empty()
            && matches!(
                s,
                VmStatus::Down | VmStatus::ImageLocked | VmStatus::Suspended | VmStatus::Unspecified
            )
        {
            continue;
        }
        if out.last() != Some(s) {
            out.push(*s);
        }
    }
    out
}

/// A run of a VM: what WatchVm showed from the RunVm call until UP, and the
/// console offset where this run's output begins.
#[derive(Debug)]
pub struct Run {
    pub statuses: Vec<VmStatus>,
    pub console_offset: u64,
    pub operation: pb::Operation,
}

impl Run {
    /// What to add to a failure message about this run.
    pub fn context(&self) -> String {
        format!(
            "(RunVm statuses {:?}; operation warnings {:?})",
            self.statuses, self.operation.warnings
        )
    }

    /// Asserts "the initial status is `first` and then 'up'".
    pub fn assert_started_as(&self, first: VmStatus) {
        assert_eq!(
            startup_sequence(&self.statuses),
            vec![first, VmStatus::Up],
            "the run's statuses (WatchVm, from the RunVm call until UP) were {:?}",
            self.statuses
        );
    }
}

/// The guest as seen on its console.
#[derive(Debug, Clone)]
pub struct GuestState {
    pub token: String,
    pub counter: u64,
}

/// A snapshot taken of a running guest, with what the console showed
/// around it.
#[derive(Debug, Clone)]
pub struct Taken {
    pub snapshot_id: String,
    pub token: String,
    /// The last counter printed before CreateSnapshot was called.
    pub counter_before: u64,
    /// The last counter printed when the operation had succeeded.
    pub counter_after: u64,
    pub operation: pb::Operation,
}

pub struct Cluster {
    pub label: String,
    pub db: Db,
    pub compatibility_version: String,
    pub cluster_id: String,
    pub host_id: String,
    pub file_domain: String,
    pub block_domain: String,
    /// An EXPORT domain (FILE) for export and import.
    pub export_domain: String,
    /// The storage agent's file root: a FILE domain (or an oVirt export
    /// domain) laid out in a directory under it may be registered.
    pub file_root: PathBuf,
    coordinator: Channel,
    storage_channel: Channel,
    /// The services' addresses, to connect as another identity.
    pub coordinator_url: String,
    pub storage_url: String,
    pub host_url: String,
    vm_ids: Mutex<Vec<String>>,
    // Torn down in this order (Drop takes them in turn).
    snapshot: Option<Running>,
    host: Option<Running>,
    storage: Option<Running>,
    pg: Option<PgDatabase>,
    loop_dev: Option<LoopDevice>,
    root: Option<TempDir>,
    _slot: SemaphorePermit<'static>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids = self.vm_ids.lock().map(|v| v.clone()).unwrap_or_default();
        let marker = self
            .root
            .as_ref()
            .map(|r| format!("{}/", r.path().display()))
            .unwrap_or_default();
        destroy_domains(&ids, &marker);
        let keep = std::env::var_os("RAMSNAP_E2E_KEEP").is_some();
        if keep {
            for r in [&mut self.snapshot, &mut self.host, &mut self.storage]
                .into_iter()
                .flatten()
            {
                r.dir.disable_cleanup(true);
            }
        }
        drop(self.snapshot.take());
        drop(self.host.take());
        drop(self.storage.take());
        drop(self.pg.take());
        drop(self.loop_dev.take());
        if keep {
            if let Some(root) = self.root.take() {
                eprintln!("RAMSNAP_E2E_KEEP: kept {}", root.keep().display());
            }
        }
        drop(self.root.take());
    }
}

/// The last `n` lines of a process's stderr log.
fn log_tail(running: &Running, n: usize) -> String {
    let text = std::fs::read_to_string(running.dir.path().join("stderr.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Cluster {
    /// Starts the system for one test. `label` names the test (temp dirs,
    /// cluster and domain names); `compatibility_version` is the cluster's.
    pub async fn start(db: Db, compatibility_version: &str, label: &str) -> Cluster {
        Cluster::start_as(db, compatibility_version, label, Layout::Separate, &[]).await
    }

    /// [`Cluster::start`] with the all-in-one `ramsnapd` in place of the
    /// three binaries (the embedded default), started with `env`.
    pub async fn start_embedded(
        db: Db,
        compatibility_version: &str,
        label: &str,
        env: &[(&str, &str)],
    ) -> Cluster {
        Cluster::start_as(db, compatibility_version, label, Layout::Embedded, env).await
    }

    /// [`Cluster::start`] in `layout`, every process started with `env`.
    pub async fn start_as(
        db: Db,
        compatibility_version: &str,
        label: &str,
        layout: Layout,
        env: &[(&str, &str)],
    ) -> Cluster {
        let slot = GUEST_SLOTS
            .acquire()
            .await
            .expect("the guest semaphore is never closed");
        let started = Instant::now();
        sweep_stale();
        let guest_dir = guest::guest_dir();
        let root = tempfile::Builder::new()
            .prefix(&format!("{ROOT_PREFIX}{label}-"))
            .tempdir()
            .expect("creating the test's temp dir");
        let r = root.path().to_path_buf();
        write_owner(&r);
        // The coordinator's database first: a missing PostgreSQL fails fast.
        let pg = match db {
            Db::Sqlite => None,
            Db::Postgres => Some(PgDatabase::create()),
        };
        if let Some(pg) = &pg {
            std::fs::write(r.join(PG_FILE), &pg.name).expect("recording the database's name");
        }
        let suffix = Uuid::new_v4().simple().to_string()[..8].to_string();

        // The host's boot-image directory: the guest's kernel and initramfs.
        let boot = r.join("boot");
        std::fs::create_dir_all(&boot).expect("creating the boot dir");
        for f in [KERNEL, INITRD] {
            std::os::unix::fs::symlink(guest_dir.join(f), boot.join(f)).expect("linking a boot image");
        }

        let loop_dev = LoopDevice::new(&r.join("pv.img"), block_pv_bytes());

        // Storage agent: adopts only this test's device; FILE domains live
        // under this test's file root.
        let sdir = subdir(&r, "storage-");
        let s = sdir.path().to_path_buf();
        let file_root = s.join("domains");
        std::fs::create_dir_all(file_root.join("files")).expect("creating the FILE domain's directory");
        std::fs::create_dir_all(file_root.join("export")).expect("creating the export domain's directory");
        let database_url = |dir: &Path| match &pg {
            Some(pg) => pg.url.clone(),
            None => format!("sqlite:{}", dir.join("coordinator.db").display()),
        };
        let mut embedded = None;
        let storage = match layout {
            Layout::Separate => Some(spawn_env(
                "ramsnap-storage",
                os_args(&[
                    "--listen",
                    "127.0.0.1:0",
                    "--state-dir",
                    &s.join("state").display().to_string(),
                    "--run-dir",
                    &s.join("run").display().to_string(),
                    "--file-root",
                    &file_root.display().to_string(),
                    "--block-device",
                    &loop_dev.device.display().to_string(),
                ]),
                1,
                sdir,
                env,
            )),
            Layout::Embedded => {
                let d = sdir.path().to_path_buf();
                embedded = Some(spawn_env(
                    "ramsnapd",
                    os_args(&[
                        "--snapshot-listen",
                        "127.0.0.1:0",
                        "--storage-listen",
                        "127.0.0.1:0",
                        "--host-listen",
                        "127.0.0.1:0",
                        "--data-dir",
                        &d.join("data").display().to_string(),
                        "--database-url",
                        &database_url(&d),
                        "--run-dir",
                        &d.join("run").display().to_string(),
                        "--file-root",
                        &file_root.display().to_string(),
                        "--block-device",
                        &loop_dev.device.display().to_string(),
                        "--boot-dir",
                        &boot.display().to_string(),
                        "--host-run-dir",
                        &d.join("host-run").display().to_string(),
                        "--domain-type",
                        "qemu",
                    ]),
                    3,
                    sdir,
                    env,
                ));
                None
            }
        };
        let storage_addr = match (&storage, &embedded) {
            (Some(s), _) => s.addr,
            (None, Some(e)) => e.addr_of("storage"),
            (None, None) => unreachable!("one layout or the other"),
        };
        let storage_url = format!("http://{storage_addr}");
        let storage_channel = connect(&storage_url).await;
        let mut sc = StorageServiceClient::new(storage_channel.clone());
        let register = |name: String, kind: spb::DomainType, location: String, role: spb::DomainRole| {
            let mut sc = sc.clone();
            async move {
                sc.register_domain(spb::RegisterDomainRequest {
                    domain_id: String::new(),
                    name: name.clone(),
                    r#type: kind as i32,
                    location: location.clone(),
                    role: role as i32,
                    format: spb::DomainFormat::Unspecified as i32,
                })
                .await
                .unwrap_or_else(|e| panic!("RegisterDomain {name} ({kind:?} at {location}): {e}"))
                .into_inner()
                .domain
                .expect("RegisterDomain returns the domain")
                .domain_id
            }
        };
        let file_domain = register(
            format!("e2e-file-{suffix}"),
            spb::DomainType::File,
            file_root.join("files").display().to_string(),
            spb::DomainRole::Data,
        )
        .await;
        let block_domain = register(
            format!("e2e-block-{suffix}"),
            spb::DomainType::Block,
            loop_dev.device.display().to_string(),
            spb::DomainRole::Data,
        )
        .await;
        // The export domain (oVirt's: FILE, shared between data centers).
        let export_domain = register(
            format!("e2e-export-{suffix}"),
            spb::DomainType::File,
            file_root.join("export").display().to_string(),
            spb::DomainRole::Export,
        )
        .await;
        let listed = sc
            .list_domains(spb::ListDomainsRequest {})
            .await
            .expect("ListDomains")
            .into_inner()
            .domains;
        assert_eq!(
            listed.len(),
            3,
            "the storage agent sees other domains: {listed:?}"
        );

        let (host, snapshot, host_addr) = match embedded {
            Some(e) => {
                let host_addr = e.addr_of("host");
                (None, e, host_addr)
            }
            None => {
                // Host agent on the real libvirt, TCG.
                let hdir = subdir(&r, "host-");
                let h = hdir.path().to_path_buf();
                let host = spawn_env(
                    "ramsnap-host",
                    os_args(&[
                        "--listen",
                        "127.0.0.1:0",
                        "--libvirt-uri",
                        LIBVIRT_URI,
                        "--storage",
                        &storage_url,
                        "--boot-dir",
                        &boot.display().to_string(),
                        "--run-dir",
                        &h.join("run").display().to_string(),
                        "--state-dir",
                        &h.join("state").display().to_string(),
                        "--domain-type",
                        "qemu",
                    ]),
                    1,
                    hdir,
                    env,
                );
                // Coordinator.
                let cdir = subdir(&r, "snapshot-");
                let url = database_url(cdir.path());
                let snapshot = spawn_env(
                    "ramsnap-snapshot",
                    os_args(&["--listen", "127.0.0.1:0", "--database-url", &url]),
                    1,
                    cdir,
                    env,
                );
                let host_addr = host.addr;
                (Some(host), snapshot, host_addr)
            }
        };
        let snapshot_addr = snapshot.addr;
        let coordinator = connect(&format!("http://{snapshot_addr}")).await;

        let mut c = Cluster {
            label: label.to_string(),
            db,
            compatibility_version: compatibility_version.to_string(),
            cluster_id: String::new(),
            host_id: String::new(),
            file_domain,
            block_domain,
            export_domain,
            file_root: file_root.clone(),
            coordinator,
            storage_channel,
            storage_url: storage_url.clone(),
            coordinator_url: format!("http://{}", snapshot_addr),
            host_url: format!("http://{host_addr}"),
            vm_ids: Mutex::new(Vec::new()),
            snapshot: Some(snapshot),
            host,
            storage,
            pg,
            loop_dev: Some(loop_dev),
            root: Some(root),
            _slot: slot,
        };
        let cluster = ClusterServiceClient::new(c.coordinator.clone())
            .create_cluster(pb::CreateClusterRequest {
                request_id: request_id(),
                name: format!("e2e-{label}-{suffix}"),
                compatibility_version: compatibility_version.to_string(),
            })
            .await
            .unwrap_or_else(|e| c.fail(&format!("CreateCluster({compatibility_version}): {e}")))
            .into_inner()
            .cluster
            .expect("CreateCluster returns the cluster");
        c.cluster_id = cluster.cluster_id;
        let host = ClusterServiceClient::new(c.coordinator.clone())
            .add_host(pb::AddHostRequest {
                request_id: request_id(),
                name: format!("e2e-host-{suffix}"),
                cluster_id: c.cluster_id.clone(),
                host_address: format!("http://{host_addr}"),
                storage_address: storage_url.clone(),
            })
            .await
            .unwrap_or_else(|e| c.fail(&format!("AddHost: {e}")))
            .into_inner()
            .host
            .expect("AddHost returns the host");
        c.host_id = host.host_id;
        eprintln!(
            "[{label}] system up in {:.1}s ({db:?}, compatibility {compatibility_version}) in {}",
            started.elapsed().as_secs_f64(),
            r.display()
        );
        c
    }

    // --- processes ---------------------------------------------------------

    /// The process, to kill, wait on or restart.
    pub fn process(&mut self, which: Process) -> &mut Running {
        let p = match which {
            Process::Coordinator => self.snapshot.as_mut(),
            Process::HostAgent => self.host.as_mut(),
            Process::StorageAgent => self.storage.as_mut(),
        };
        p.unwrap_or_else(|| panic!("{which:?} is not a process of its own in this layout"))
    }

    /// The BLOCK domain's device (the shared LUN).
    pub fn block_device(&self) -> &Path {
        &self
            .loop_dev
            .as_ref()
            .expect("the loop device lives as long as the system")
            .device
    }

    /// A second storage agent on this system's BLOCK device, as a second
    /// hypervisor host on the same LUN has one: its own state and run
    /// directories, and its own LVM system directory whose `lvm.conf` puts
    /// LVM's locks in a directory of its own (LVM's locking is local to a
    /// host), so nothing serializes its LVM commands with the first
    /// agent's. It adopts the BLOCK domain at start. Drop it before the system.
    pub async fn second_storage_agent(&self) -> Running {
        let root = self
            .root
            .as_ref()
            .expect("the system's root")
            .path()
            .to_path_buf();
        let dir = subdir(&root, "storage2-");
        let d = dir.path().to_path_buf();
        let lvm = d.join("lvm");
        std::fs::create_dir_all(lvm.join("lock")).expect("creating the LVM lock dir");
        std::fs::write(
            lvm.join("lvm.conf"),
            format!(
                "global {{\n    locking_dir = \"{}\"\n}}\n",
                lvm.join("lock").display()
            ),
        )
        .expect("writing lvm.conf");
        std::fs::create_dir_all(d.join("domains")).expect("creating the file root");
        let device = self.block_device().display().to_string();
        let lvm_dir = lvm.display().to_string();
        let agent = spawn_env(
            "ramsnap-storage",
            os_args(&[
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
                &d.join("state").display().to_string(),
                "--run-dir",
                &d.join("run").display().to_string(),
                "--file-root",
                &d.join("domains").display().to_string(),
                "--block-device",
                &device,
            ]),
            1,
            dir,
            &[("LVM_SYSTEM_DIR", &lvm_dir)],
        );
        // It adopts the domains on its --block-device at start.
        let mut sc = StorageServiceClient::new(connect(&format!("http://{}", agent.addr)).await);
        let listed = sc
            .list_domains(spb::ListDomainsRequest {})
            .await
            .unwrap_or_else(|e| self.fail(&format!("ListDomains on the second agent: {e}")))
            .into_inner()
            .domains;
        assert!(
            listed.iter().any(|d| d.domain_id == self.block_domain),
            "the second agent adopted the BLOCK domain at start: {listed:?}"
        );
        agent
    }

    /// A second host agent on this machine's libvirt (a run directory,
    /// state directory, host id and port of its own; the same storage agent,
    /// so it sees the same domains), added to the cluster under `name`.
    /// Returns the process (stopped on drop) and its host id.
    pub async fn second_host_agent(&self, name: &str) -> (Running, String) {
        let root = self
            .root
            .as_ref()
            .expect("the system's root")
            .path()
            .to_path_buf();
        let dir = subdir(&root, "host2-");
        let h = dir.path().to_path_buf();
        let agent = spawn_env(
            "ramsnap-host",
            os_args(&[
                "--listen",
                "127.0.0.1:0",
                "--libvirt-uri",
                LIBVIRT_URI,
                "--storage",
                &self.storage_url,
                "--boot-dir",
                &root.join("boot").display().to_string(),
                "--run-dir",
                &h.join("run").display().to_string(),
                "--state-dir",
                &h.join("state").display().to_string(),
                "--domain-type",
                "qemu",
            ]),
            1,
            dir,
            &[],
        );
        let host = self
            .clusters()
            .add_host(pb::AddHostRequest {
                request_id: request_id(),
                name: name.to_string(),
                cluster_id: self.cluster_id.clone(),
                host_address: format!("http://{}", agent.addr),
                storage_address: self.storage_url.clone(),
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("AddHost {name}: {e}")))
            .into_inner()
            .host
            .expect("AddHost returns the host");
        (agent, host.host_id)
    }

    /// The end of the VM's console log on that host (0 if it has none),
    /// read from the host agent itself.
    pub async fn console_end_on(&self, vm_id: &str, host_id: &str) -> u64 {
        use ramsnap_proto::host::v1 as hpb;
        let hosts = self
            .clusters()
            .list_hosts(pb::ListHostsRequest {
                cluster_id: self.cluster_id.clone(),
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("ListHosts: {e}")))
            .into_inner()
            .hosts;
        let address = hosts
            .iter()
            .find(|h| h.host_id == host_id)
            .unwrap_or_else(|| self.fail(&format!("no host {host_id} in the cluster")))
            .host_address
            .clone();
        let mut host = hpb::host_service_client::HostServiceClient::new(connect(&address).await);
        let mut at = 0;
        loop {
            match host
                .read_console(hpb::ReadConsoleRequest {
                    vm_id: vm_id.to_string(),
                    offset: at,
                    max_bytes: 1 << 20,
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.data.is_empty() {
                        return at;
                    }
                    at = r.next_offset;
                }
                Err(e) if e.code() == tonic::Code::NotFound => return 0,
                Err(e) => self.fail(&format!("ReadConsole on host {host_id}: {e}")),
            }
        }
    }

    /// RunVm on that host; waits for UP as [`Cluster::run_vm`] does.
    pub async fn run_vm_on(&self, vm_id: &str, host_id: &str) -> Run {
        self.step(&format!("RunVm on host {host_id}"));
        // Each host keeps a console log of its own: where the target's ends.
        let console_offset = self.console_end_on(vm_id, host_id).await;
        let mut recorder = self.watch_vm(vm_id).await;
        let resp = self
            .vms()
            .run_vm(pb::RunVmRequest {
                request_id: request_id(),
                vm_id: vm_id.to_string(),
                host_id: host_id.to_string(),
                run_stateless: false,
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("RunVm on {host_id}: {e}")))
            .into_inner();
        let operation = self.succeed(resp.operation, "RunVm").await;
        let statuses = recorder.until(VmStatus::Up, STATUS_TIMEOUT, "RunVm").await;
        self.step(&format!("RunVm: statuses {statuses:?}"));
        Run {
            statuses,
            console_offset,
            operation,
        }
    }

    // --- clients -----------------------------------------------------------

    pub fn clusters(&self) -> ClusterServiceClient<Channel> {
        ClusterServiceClient::new(self.coordinator.clone())
    }

    pub fn vms(&self) -> VmServiceClient<Channel> {
        VmServiceClient::new(self.coordinator.clone())
    }

    pub fn snapshots_api(&self) -> SnapshotServiceClient<Channel> {
        SnapshotServiceClient::new(self.coordinator.clone())
    }

    pub fn operations(&self) -> OperationServiceClient<Channel> {
        OperationServiceClient::new(self.coordinator.clone())
    }

    pub fn storage(&self) -> StorageServiceClient<Channel> {
        StorageServiceClient::new(self.storage_channel.clone())
    }

    /// The storage agent as the host agent sees it (the `host` identity:
    /// prepare and teardown, which the admin may not do), for tests that
    /// reach into a volume's bytes.
    /// Tears down (as the host) and deletes (as the coordinator) volumes a
    /// test or benchmark made through the storage agent, in order.
    pub async fn drop_volumes(&self, volumes: &[VolumeRef]) {
        for v in volumes {
            self.storage_as_host()
                .await
                .teardown_volume(spb::TeardownVolumeRequest {
                    r#ref: Some(v.clone()),
                })
                .await
                .expect("TeardownVolume");
            self.storage_as("coordinator")
                .await
                .delete_volume(spb::DeleteVolumeRequest {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    r#ref: Some(v.clone()),
                })
                .await
                .expect("DeleteVolume");
        }
    }

    pub async fn storage_as_host(&self) -> StorageServiceClient<Channel> {
        self.storage_as("host").await
    }

    /// The storage agent as one of the dev identities sees it (`host`,
    /// `coordinator`, ...).
    pub async fn storage_as(&self, identity: &str) -> StorageServiceClient<Channel> {
        let addr = self.storage_url.clone();
        StorageServiceClient::new(crate::connect_as(&addr, identity).await)
    }

    pub fn domain(&self, kind: DomainKind) -> &str {
        match kind {
            DomainKind::File => &self.file_domain,
            DomainKind::Block => &self.block_domain,
        }
    }

    /// The tail of every service's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (name, r) in [
            ("ramsnap-snapshot", &self.snapshot),
            ("ramsnap-host", &self.host),
            ("ramsnap-storage", &self.storage),
        ] {
            if let Some(r) = r {
                let _ = write!(
                    out,
                    "\n--- {name} stderr (last 60 lines) ---\n{}",
                    log_tail(r, 60)
                );
            }
        }
        out
    }

    /// Fails the test with `message` and the services' logs.
    pub fn fail(&self, message: &str) -> ! {
        panic!("[{}] {message}\n{}", self.label, self.logs())
    }

    fn step(&self, what: &str) {
        eprintln!("[{}] {what}", self.label);
    }

    // --- operations ----------------------------------------------------------

    /// Follows an operation (WatchOperation) until it ends and returns it.
    pub async fn finish(&self, op: Option<pb::Operation>, what: &str) -> pb::Operation {
        let op = op.unwrap_or_else(|| self.fail(&format!("{what}: the response carries no operation")));
        let id = op.operation_id.clone();
        let deadline = Instant::now() + OPERATION_TIMEOUT;
        let mut stream = self
            .operations()
            .watch_operation(pb::WatchOperationRequest {
                operation_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("{what}: WatchOperation({id}): {e}")))
            .into_inner();
        let mut last = op;
        loop {
            if last.state() != pb::OperationState::Running && last.state() != pb::OperationState::Unspecified
            {
                return last;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.message()).await {
                Ok(Ok(Some(m))) => {
                    if let Some(op) = m.operation {
                        last = op;
                    }
                }
                Ok(Ok(None)) => {
                    // The stream ended: the operation as it is now.
                    last = self
                        .operations()
                        .get_operation(pb::GetOperationRequest {
                            operation_id: id.clone(),
                        })
                        .await
                        .unwrap_or_else(|e| self.fail(&format!("{what}: GetOperation({id}): {e}")))
                        .into_inner()
                        .operation
                        .expect("GetOperation returns the operation");
                    if last.state() == pb::OperationState::Running {
                        self.fail(&format!(
                            "{what}: WatchOperation ended while the operation runs: {last:?}"
                        ));
                    }
                }
                Ok(Err(e)) => self.fail(&format!("{what}: WatchOperation({id}) failed: {e}")),
                Err(_) => self.fail(&format!(
                    "{what}: operation {id} still running after {OPERATION_TIMEOUT:?}: {last:?}"
                )),
            }
        }
    }

    /// [`Cluster::finish`], asserting that the operation SUCCEEDED.
    pub async fn succeed(&self, op: Option<pb::Operation>, what: &str) -> pb::Operation {
        let op = self.finish(op, what).await;
        if op.state() != pb::OperationState::Succeeded {
            self.fail(&format!(
                "{what}: operation {} ({}) ended {:?}: {}: {}\n(operation: {op:?})",
                op.operation_id,
                op.kind,
                op.state(),
                op.error_code,
                op.error_message
            ));
        }
        op
    }

    // --- VMs -----------------------------------------------------------------

    /// Creates the acceptance VM (256 MiB, 1 vCPU, one 64 MiB disk on
    /// `kind`'s domain, the test guest's kernel and initramfs).
    pub async fn create_vm(&self, name: &str, kind: DomainKind) -> String {
        self.create_vm_sized(name, kind, VM_MEMORY_BYTES, CMDLINE).await
    }

    /// [`Cluster::create_vm`] with this much RAM and this kernel command
    /// line (e.g. with `ramsnap.fill=<MiB>` for benchmark-size memory).
    pub async fn create_vm_sized(
        &self,
        name: &str,
        kind: DomainKind,
        memory_bytes: u64,
        cmdline: &str,
    ) -> String {
        self.step(&format!("CreateVm {name} on the {kind:?} domain"));
        let resp = self
            .vms()
            .create_vm(pb::CreateVmRequest {
                request_id: request_id(),
                name: name.to_string(),
                cluster_id: self.cluster_id.clone(),
                memory_bytes,
                vcpus: 1,
                stateless: false,
                disks: vec![pb::DiskSpec {
                    domain_id: self.domain(kind).to_string(),
                    capacity_bytes: VM_DISK_BYTES,
                }],
                kernel: KERNEL.into(),
                initrd: INITRD.into(),
                cmdline: cmdline.into(),
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("CreateVm: {e}")))
            .into_inner();
        if let Some(id) = resp
            .operation
            .as_ref()
            .map(|o| o.vm_id.clone())
            .filter(|v| !v.is_empty())
        {
            self.vm_ids.lock().expect("vm ids").push(id);
        }
        let op = self.succeed(resp.operation, "CreateVm").await;
        let vm_id = if op.result_vm_id.is_empty() {
            op.vm_id.clone()
        } else {
            op.result_vm_id.clone()
        };
        assert!(!vm_id.is_empty(), "CreateVm's operation names no VM: {op:?}");
        {
            let mut ids = self.vm_ids.lock().expect("vm ids");
            if !ids.contains(&vm_id) {
                ids.push(vm_id.clone());
            }
        }
        let vm = self.get_vm(&vm_id).await;
        assert_eq!(vm.status(), VmStatus::Down, "a new VM is down: {vm:?}");
        assert_eq!(vm.disks.len(), 1, "the new VM's disks: {vm:?}");
        assert_eq!(
            vm.disks[0].domain_id,
            self.domain(kind),
            "the new VM's disk domain: {vm:?}"
        );
        vm_id
    }

    pub async fn get_vm(&self, vm_id: &str) -> pb::Vm {
        self.vms()
            .get_vm(pb::GetVmRequest {
                vm_id: vm_id.to_string(),
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("GetVm({vm_id}): {e}")))
            .into_inner()
            .vm
            .expect("GetVm returns the VM")
    }

    /// Starts recording the VM's statuses (WatchVm); returns once the stream
    /// has delivered the current status, so nothing after is missed.
    pub async fn watch_vm(&self, vm_id: &str) -> StatusRecorder {
        let mut stream = self
            .vms()
            .watch_vm(pb::WatchVmRequest {
                vm_id: vm_id.to_string(),
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("WatchVm({vm_id}): {e}")))
            .into_inner();
        let (tx, mut rx) = tokio::sync::watch::channel(Vec::new());
        let task = tokio::spawn(async move {
            while let Ok(Some(m)) = stream.message().await {
                let s = m.status();
                tx.send_modify(|v| v.push(s));
            }
        });
        if tokio::time::timeout(STATUS_TIMEOUT, rx.wait_for(|v| !v.is_empty()))
            .await
            .map(|r| r.is_err())
            .unwrap_or(true)
        {
            self.fail(&format!("WatchVm({vm_id}) sent no current status"));
        }
        StatusRecorder { seen: rx, task }
    }

    /// Runs the VM (optionally stateless, Run Once style) and waits for UP,
    /// recording the statuses from the call on.
    pub async fn run_vm(&self, vm_id: &str, run_stateless: bool) -> Run {
        self.step(&format!("RunVm (stateless: {run_stateless})"));
        let console_offset = self.console_end(vm_id).await;
        let mut recorder = self.watch_vm(vm_id).await;
        let resp = self
            .vms()
            .run_vm(pb::RunVmRequest {
                request_id: request_id(),
                vm_id: vm_id.to_string(),
                host_id: String::new(),
                run_stateless,
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("RunVm: {e}")))
            .into_inner();
        let operation = self.succeed(resp.operation, "RunVm").await;
        let statuses = recorder.until(VmStatus::Up, STATUS_TIMEOUT, "RunVm").await;
        self.step(&format!("RunVm: statuses {statuses:?}"));
        Run {
            statuses,
            console_offset,
            operation,
        }
    }

    /// Stops the VM at once (graceful timeout 0) and waits for DOWN.
    pub async fn stop_vm(&self, vm_id: &str) {
        self.step("StopVm (graceful timeout 0)");
        let mut recorder = self.watch_vm(vm_id).await;
        let resp = self
            .vms()
            .stop_vm(pb::StopVmRequest {
                request_id: request_id(),
                vm_id: vm_id.to_string(),
                graceful_timeout_seconds: 0,
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("StopVm: {e}")))
            .into_inner();
        self.succeed(resp.operation, "StopVm").await;
        if self.get_vm(vm_id).await.status() != VmStatus::Down {
            recorder.until(VmStatus::Down, STATUS_TIMEOUT, "StopVm").await;
        }
    }

    /// SuspendVm: SAVING_STATE, then SUSPENDED, the memory on the ACTIVE
    /// snapshot. Returns the console around it as a [`Taken`] (no snapshot
    /// id), for [`Cluster::assert_restored`] after the next run.
    pub async fn suspend_vm(&self, vm_id: &str) -> Taken {
        self.step("SuspendVm");
        let before = self.console_now(vm_id).await;
        let mut recorder = self.watch_vm(vm_id).await;
        let resp = self
            .vms()
            .suspend_vm(pb::SuspendVmRequest {
                request_id: request_id(),
                vm_id: vm_id.to_string(),
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("SuspendVm: {e}")))
            .into_inner();
        let operation = self.succeed(resp.operation, "SuspendVm").await;
        let statuses = recorder
            .until(VmStatus::Suspended, STATUS_TIMEOUT, "SuspendVm")
            .await;
        assert_eq!(
            &statuses[statuses.len() - 2..],
            &[VmStatus::SavingState, VmStatus::Suspended],
            "SuspendVm's statuses: {statuses:?}"
        );
        let after = self.console_now(vm_id).await;
        assert_eq!(
            after.token, before.token,
            "the guest rebooted before it was suspended"
        );
        self.step(&format!(
            "suspended between counters {} and {}",
            before.counter, after.counter
        ));
        Taken {
            snapshot_id: String::new(),
            token: before.token,
            counter_before: before.counter,
            counter_after: after.counter,
            operation,
        }
    }

    // --- console -------------------------------------------------------------

    /// Reads the console from `offset` to its current end.
    async fn console_bytes(&self, vm_id: &str, offset: u64) -> (Vec<u8>, u64) {
        let mut data = Vec::new();
        let mut at = offset;
        loop {
            let r = match self
                .vms()
                .read_console(pb::ReadConsoleRequest {
                    vm_id: vm_id.to_string(),
                    offset: at,
                    max_bytes: 1 << 20,
                })
                .await
            {
                Ok(r) => r.into_inner(),
                // No console log before the first run.
                Err(e) if e.code() == tonic::Code::NotFound && at == 0 => return (data, 0),
                Err(e) => self.fail(&format!("ReadConsole({vm_id}, offset {at}): {e}")),
            };
            if r.data.is_empty() {
                return (data, at);
            }
            at = r.next_offset;
            data.extend_from_slice(&r.data);
        }
    }

    /// The console's current end (0 before the first run).
    pub async fn console_end(&self, vm_id: &str) -> u64 {
        self.console_bytes(vm_id, 0).await.1
    }

    /// The records of the complete lines from `offset` on, and the raw text.
    pub async fn console_since(&self, vm_id: &str, offset: u64) -> (ConsoleLog, String) {
        let (data, _) = self.console_bytes(vm_id, offset).await;
        let complete = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let text = String::from_utf8_lossy(&data[..complete]).into_owned();
        (ConsoleLog::parse(&text), text)
    }

    /// Polls the console from `offset` until `done` holds.
    pub async fn wait_console(
        &self,
        vm_id: &str,
        offset: u64,
        what: &str,
        done: impl Fn(&ConsoleLog) -> bool,
    ) -> ConsoleLog {
        let deadline = Instant::now() + CONSOLE_TIMEOUT;
        loop {
            let (log, text) = self.console_since(vm_id, offset).await;
            if done(&log) {
                return log;
            }
            if Instant::now() > deadline {
                let tail: String = text
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                self.fail(&format!(
                    "console of VM {vm_id}: no {what} within {CONSOLE_TIMEOUT:?} (from offset {offset}); \
                     last lines:\n{tail}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits for a TICK whose counter is at least `min_counter` in the output
    /// from `offset`, and returns the latest tick.
    pub async fn wait_counter(&self, vm_id: &str, offset: u64, min_counter: u64) -> GuestState {
        let log = self
            .wait_console(
                vm_id,
                offset,
                &format!("TICK with counter >= {min_counter}"),
                |l| l.last_tick().is_some_and(|t| t.counter >= min_counter),
            )
            .await;
        let t = log.last_tick().expect("waited for it");
        GuestState {
            token: t.token.clone(),
            counter: t.counter,
        }
    }

    /// Checks that the run `run` booted the guest: a new BOOT token not in
    /// `old_tokens`, its ticks counting from 1, no tick of an older token, no
    /// disk mismatch. Returns the guest once it has ticked a few times.
    pub async fn assert_booted(&self, vm_id: &str, run: &Run, old_tokens: &[&str]) -> GuestState {
        let log = self
            .wait_console(vm_id, run.console_offset, "BOOT followed by 3 TICKs", |l| {
                l.ticks().len() >= 3 || !l.problems().is_empty()
            })
            .await;
        let ctx = run.context();
        let boots = log.boots();
        assert_eq!(
            boots.len(),
            1,
            "expected one BOOT (a fresh boot) after the run, the console shows {:?} {ctx}",
            log.records
        );
        let token = boots[0];
        assert!(
            !old_tokens.contains(&token),
            "the run booted with an old token {token} (old: {old_tokens:?}) {ctx}"
        );
        assert!(
            log.problems().is_empty(),
            "the guest reported {:?} {ctx}",
            log.problems()
        );
        let ticks = log.ticks();
        assert!(
            ticks.iter().all(|t| t.token == token),
            "TICKs of another token after the boot: {ticks:?} {ctx}"
        );
        assert_eq!(
            ticks[0].counter, 1,
            "after a boot the counter starts at 1; the ticks are {ticks:?} {ctx}"
        );
        self.step(&format!("guest booted: new token {token}, counter from 1"));
        let t: &Tick = ticks.last().expect("waited for ticks");
        GuestState {
            token: t.token.clone(),
            counter: t.counter,
        }
    }

    /// Checks that the run `run` resumed the guest from the memory of
    /// `taken`: no BOOT, the same token, the counter continuing from the
    /// snapshot's (at least the one seen before it, at most a few past the
    /// one seen when it was done), no disk mismatch.
    pub async fn assert_restored(&self, vm_id: &str, run: &Run, taken: &Taken) -> GuestState {
        let log = self
            .wait_console(vm_id, run.console_offset, "3 TICKs after the run", |l| {
                l.ticks().len() >= 3 || !l.problems().is_empty() || !l.boots().is_empty()
            })
            .await;
        let ctx = run.context();
        assert!(
            log.boots().is_empty(),
            "the guest booted instead of resuming from memory: {:?} {ctx}",
            log.records
        );
        assert!(
            log.problems().is_empty(),
            "the guest reported {:?} {ctx}",
            log.problems()
        );
        let ticks = log.ticks();
        assert!(
            ticks.iter().all(|t| t.token == taken.token),
            "the restored guest's ticks carry another token than the snapshot's {}: {ticks:?} {ctx}",
            taken.token
        );
        let first = ticks[0].counter;
        assert!(
            first >= taken.counter_before && first <= taken.counter_after + 3,
            "the restored guest's counter resumed at {first}; the snapshot was taken between counters \
             {} and {} (ticks {ticks:?}) {ctx}",
            taken.counter_before,
            taken.counter_after
        );
        assert!(
            ticks.windows(2).all(|w| w[1].counter > w[0].counter),
            "the restored guest's counter does not go on: {ticks:?} {ctx}"
        );
        self.step(&format!(
            "guest resumed from memory: token {}, counter {first} (snapshot between {} and {})",
            taken.token, taken.counter_before, taken.counter_after
        ));
        let t = ticks.last().expect("waited for ticks");
        GuestState {
            token: t.token.clone(),
            counter: t.counter,
        }
    }

    /// Runs a new VM's first boot: POWERING_UP then UP, a fresh token, and
    /// waits until it has ticked a few times (its disk written).
    pub async fn boot(&self, vm_id: &str) -> GuestState {
        let run = self.run_vm(vm_id, false).await;
        run.assert_started_as(VmStatus::PoweringUp);
        let g = self.assert_booted(vm_id, &run, &[]).await;
        self.wait_counter(vm_id, run.console_offset, g.counter.max(5))
            .await
    }

    // --- snapshots -----------------------------------------------------------

    pub async fn list_snapshots(&self, vm_id: &str) -> Vec<pb::Snapshot> {
        self.snapshots_api()
            .list_snapshots(pb::ListSnapshotsRequest {
                vm_id: vm_id.to_string(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("ListSnapshots({vm_id}): {e}")))
            .into_inner()
            .snapshots
    }

    pub async fn snapshot(&self, vm_id: &str, snapshot_id: &str) -> pb::Snapshot {
        let all = self.list_snapshots(vm_id).await;
        all.iter()
            .find(|s| s.snapshot_id == snapshot_id)
            .cloned()
            .unwrap_or_else(|| self.fail(&format!("ListSnapshots shows no snapshot {snapshot_id}: {all:?}")))
    }

    /// The VM's ACTIVE snapshot (exactly one).
    pub async fn active_snapshot(&self, vm_id: &str) -> pb::Snapshot {
        let all = self.list_snapshots(vm_id).await;
        let active: Vec<_> = all
            .iter()
            .filter(|s| s.r#type() == pb::SnapshotType::Active)
            .collect();
        assert_eq!(active.len(), 1, "a VM has exactly one ACTIVE snapshot: {all:?}");
        assert_eq!(
            all.last().map(|s| &s.snapshot_id),
            Some(&active[0].snapshot_id),
            "ListSnapshots lists the ACTIVE snapshot last: {all:?}"
        );
        active[0].clone()
    }

    /// CreateSnapshot as the caller gives it; the handler's answer.
    pub async fn create_snapshot_call(
        &self,
        vm_id: &str,
        save_memory: bool,
        description: &str,
    ) -> Result<pb::CreateSnapshotResponse, tonic::Status> {
        self.step(&format!("CreateSnapshot (save_memory: {save_memory})"));
        self.snapshots_api()
            .create_snapshot(pb::CreateSnapshotRequest {
                request_id: request_id(),
                vm_id: vm_id.to_string(),
                description: description.to_string(),
                save_memory,
                memory_mode: pb::MemoryMode::Unspecified as i32,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Takes a snapshot of the running guest and records the console around
    /// it; the guest must go on running afterwards (same token).
    pub async fn take_snapshot(&self, vm_id: &str, save_memory: bool, description: &str) -> Taken {
        let before = self.console_now(vm_id).await;
        let resp = self
            .create_snapshot_call(vm_id, save_memory, description)
            .await
            .unwrap_or_else(|e| self.fail(&format!("CreateSnapshot(save_memory: {save_memory}): {e}")));
        let operation = self.succeed(resp.operation, "CreateSnapshot").await;
        assert!(
            !operation.snapshot_id.is_empty(),
            "CreateSnapshot's operation names no snapshot: {operation:?}"
        );
        let after = self.console_now(vm_id).await;
        assert_eq!(
            after.token, before.token,
            "the guest rebooted during the snapshot (token {} -> {})",
            before.token, after.token
        );
        self.step(&format!(
            "snapshot {} taken between counters {} and {}",
            operation.snapshot_id, before.counter, after.counter
        ));
        Taken {
            snapshot_id: operation.snapshot_id.clone(),
            token: before.token,
            counter_before: before.counter,
            counter_after: after.counter,
            operation,
        }
    }

    /// The last TICK on the console now.
    pub async fn console_now(&self, vm_id: &str) -> GuestState {
        let (log, _) = self.console_since(vm_id, 0).await;
        let t = log
            .last_tick()
            .unwrap_or_else(|| self.fail(&format!("VM {vm_id}'s console shows no TICK yet")));
        GuestState {
            token: t.token.clone(),
            counter: t.counter,
        }
    }

    /// PreviewSnapshot; returns the operation and every warning given (in
    /// the response and on the operation).
    pub async fn preview(&self, vm_id: &str, snapshot_id: &str, restore_memory: bool) -> Vec<String> {
        self.step(&format!("PreviewSnapshot (restore_memory: {restore_memory})"));
        let resp = self
            .snapshots_api()
            .preview_snapshot(pb::PreviewSnapshotRequest {
                request_id: request_id(),
                vm_id: vm_id.to_string(),
                snapshot_id: snapshot_id.to_string(),
                restore_memory,
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("PreviewSnapshot(restore_memory: {restore_memory}): {e}")))
            .into_inner();
        let op = self.succeed(resp.operation, "PreviewSnapshot").await;
        let mut warnings = resp.warnings;
        warnings.extend(op.warnings);
        warnings
    }

    pub async fn commit(&self, vm_id: &str) {
        self.step("CommitSnapshot");
        let resp = self
            .snapshots_api()
            .commit_snapshot(pb::CommitSnapshotRequest {
                request_id: request_id(),
                vm_id: vm_id.to_string(),
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("CommitSnapshot: {e}")))
            .into_inner();
        self.succeed(resp.operation, "CommitSnapshot").await;
    }

    // --- storage checks --------------------------------------------------------

    pub async fn volumes(&self, domain_id: &str) -> Vec<spb::Volume> {
        self.storage()
            .list_volumes(spb::ListVolumesRequest {
                domain_id: domain_id.to_string(),
                image_id: String::new(),
                // Every volume: these tests make fewer than a page's maximum.
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("ListVolumes({domain_id}): {e}")))
            .into_inner()
            .volumes
    }

    pub async fn volume(&self, r: &VolumeRef) -> spb::Volume {
        self.storage()
            .get_volume(spb::GetVolumeRequest {
                r#ref: Some(r.clone()),
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("GetVolume({r:?}): {e}")))
            .into_inner()
            .volume
            .expect("GetVolume returns the volume")
    }

    /// Checks that a snapshot's memory volumes exist: a MEMORY_DUMP and a
    /// MEMORY_METADATA volume, legal.
    pub async fn assert_memory_volumes(&self, snapshot: &pb::Snapshot) {
        let m = snapshot
            .memory
            .as_ref()
            .unwrap_or_else(|| panic!("snapshot with has_memory but no memory volumes: {snapshot:?}"));
        for (r, purpose) in [
            (&m.dump, spb::VolumePurpose::MemoryDump),
            (&m.metadata, spb::VolumePurpose::MemoryMetadata),
        ] {
            let r = r
                .as_ref()
                .unwrap_or_else(|| panic!("memory volume ref missing: {snapshot:?}"));
            let v = self.volume(r).await;
            assert_eq!(v.purpose(), purpose, "memory volume {r:?}: {v:?}");
            assert_eq!(
                v.legality(),
                spb::VolumeLegality::Legal,
                "memory volume {r:?}: {v:?}"
            );
        }
    }

    /// The orphan check: every volume on the test's domains is referenced by
    /// some VM's snapshot (a disk volume or a memory volume) or is an
    /// ancestor of one (the active chain); every referenced volume exists;
    /// none is ILLEGAL. Call it when no operation runs.
    pub async fn assert_no_orphans(&self) {
        let key = |r: &VolumeRef| (r.domain_id.clone(), r.image_id.clone(), r.volume_id.clone());
        let mut volumes: HashMap<(String, String, String), spb::Volume> = HashMap::new();
        for d in [&self.file_domain, &self.block_domain] {
            for v in self.volumes(d).await {
                let r = v.r#ref.clone().expect("a volume has a ref");
                volumes.insert(key(&r), v);
            }
        }
        let vms = self
            .vms()
            .list_vms(pb::ListVmsRequest {
                cluster_id: self.cluster_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("ListVms: {e}")))
            .into_inner()
            .vms;
        let mut referenced: Vec<((String, String, String), String)> = Vec::new();
        for vm in &vms {
            for s in self.list_snapshots(&vm.vm_id).await {
                let who = format!("VM {} snapshot {} ({:?})", vm.name, s.snapshot_id, s.r#type());
                for d in &s.disks {
                    if let Some(r) = &d.volume {
                        referenced.push((key(r), format!("{who} disk {}", d.disk_id)));
                    }
                }
                if let Some(m) = &s.memory {
                    for r in [&m.dump, &m.metadata].into_iter().flatten() {
                        referenced.push((key(r), format!("{who} memory")));
                    }
                }
            }
        }
        let mut problems = Vec::new();
        let mut reachable: HashSet<(String, String, String)> = HashSet::new();
        for (k, who) in &referenced {
            if !volumes.contains_key(k) {
                problems.push(format!(
                    "{who} references a volume the storage does not have: {k:?}"
                ));
                continue;
            }
            // The volume and its ancestors (same domain and image).
            let mut at = Some(k.clone());
            while let Some(k) = at.take() {
                if !reachable.insert(k.clone()) {
                    break;
                }
                match volumes.get(&k) {
                    Some(v) if !v.parent_volume_id.is_empty() => {
                        at = Some((k.0.clone(), k.1.clone(), v.parent_volume_id.clone()));
                    }
                    Some(_) => {}
                    None => problems.push(format!("{who}: the chain names a missing parent {k:?}")),
                }
            }
        }
        let mut orphans: Vec<String> = volumes
            .iter()
            .filter(|(k, _)| !reachable.contains(*k))
            .map(|(k, v)| {
                format!(
                    "orphan volume {k:?} ({:?}, {:?}, parent {:?}, {:?})",
                    v.purpose(),
                    v.format(),
                    v.parent_volume_id,
                    v.description
                )
            })
            .collect();
        orphans.sort();
        problems.extend(orphans);
        for (k, v) in &volumes {
            if v.legality() != spb::VolumeLegality::Legal {
                problems.push(format!("volume {k:?} is {:?}: {v:?}", v.legality()));
            }
        }
        if !problems.is_empty() {
            self.fail(&format!(
                "orphan check failed:\n  {}\n(volumes: {}, referenced: {})",
                problems.join("\n  "),
                volumes.len(),
                referenced.len()
            ));
        }
        self.step(&format!(
            "orphan check: {} volumes, all referenced or in a referenced chain",
            volumes.len()
        ));
    }
}

fn subdir(root: &Path, prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(root)
        .expect("creating a service dir")
}

fn os_args(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

// --- export and import -------------------------------------------------------

impl Cluster {
    /// ExportVm to the export domain; waits for success.
    pub async fn export_vm(&self, vm_id: &str, collapse: bool) -> pb::Operation {
        self.step(&format!("ExportVm (collapse snapshots: {collapse})"));
        let resp = self
            .vms()
            .export_vm(pb::ExportVmRequest {
                request_id: request_id(),
                vm_id: vm_id.to_string(),
                export_domain_id: self.export_domain.clone(),
                collapse_snapshots: collapse,
                force_override: false,
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("ExportVm: {e}")))
            .into_inner();
        self.succeed(resp.operation, "ExportVm").await
    }

    /// The export domain's VM list; fails the test on unreadable entries.
    pub async fn exported(&self, vm_id: &str) -> pb::ExportedVm {
        let r = self
            .vms()
            .list_exported_vms(pb::ListExportedVmsRequest {
                export_domain_id: self.export_domain.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("ListExportedVms: {e}")))
            .into_inner();
        assert!(
            r.unreadable.is_empty(),
            "unreadable descriptors: {:?}",
            r.unreadable
        );
        r.vms
            .into_iter()
            .find(|v| v.vm_id == vm_id)
            .unwrap_or_else(|| self.fail(&format!("ListExportedVms does not list VM {vm_id}")))
    }

    /// RemoveVm; waits for success.
    /// Destroys the VM's libvirt domain when the cluster goes, as for the
    /// VMs it created (a clone made through the API).
    pub fn track_vm(&self, vm_id: &str) {
        let mut ids = self.vm_ids.lock().expect("vm ids");
        if !ids.iter().any(|v| v == vm_id) {
            ids.push(vm_id.to_string());
        }
    }

    pub async fn remove_vm(&self, vm_id: &str) {
        self.step("RemoveVm");
        let resp = self
            .vms()
            .remove_vm(pb::RemoveVmRequest {
                request_id: request_id(),
                vm_id: vm_id.to_string(),
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("RemoveVm: {e}")))
            .into_inner();
        self.succeed(resp.operation, "RemoveVm").await;
    }

    /// The ImportVm request for `vm_id` of the export domain into `kind`'s
    /// data domain of this cluster.
    pub fn import_request(
        &self,
        vm_id: &str,
        kind: DomainKind,
        as_clone: bool,
        collapse: bool,
        name: &str,
    ) -> pb::ImportVmRequest {
        pb::ImportVmRequest {
            request_id: request_id(),
            export_domain_id: self.export_domain.clone(),
            vm_id: vm_id.to_string(),
            cluster_id: self.cluster_id.clone(),
            target_domain_id: self.domain(kind).to_string(),
            as_clone,
            collapse_snapshots: collapse,
            name: name.to_string(),
            keep_memory: false,
        }
    }

    /// ImportVm; waits for success. Returns the imported VM's id and the
    /// response's warnings.
    pub async fn import_vm(
        &self,
        vm_id: &str,
        kind: DomainKind,
        as_clone: bool,
        collapse: bool,
        name: &str,
    ) -> (String, Vec<String>) {
        self.step(&format!(
            "ImportVm into the {kind:?} domain (as clone: {as_clone}, collapse snapshots: {collapse})"
        ));
        let resp = self
            .vms()
            .import_vm(self.import_request(vm_id, kind, as_clone, collapse, name))
            .await
            .unwrap_or_else(|e| self.fail(&format!("ImportVm: {e}")))
            .into_inner();
        if let Some(op) = &resp.operation {
            let mut ids = self.vm_ids.lock().expect("vm ids");
            if !ids.contains(&op.vm_id) {
                ids.push(op.vm_id.clone());
            }
        }
        let op = self.succeed(resp.operation, "ImportVm").await;
        assert_eq!(
            op.warnings, resp.warnings,
            "the operation's warnings are the response's"
        );
        (op.result_vm_id, resp.warnings)
    }

    /// Every volume on the export domain.
    pub async fn export_volumes(&self) -> Vec<spb::Volume> {
        self.volumes(&self.export_domain).await
    }
}

impl Cluster {
    /// RemoveSnapshot; waits for success.
    pub async fn remove_snapshot(&self, vm_id: &str, snapshot_id: &str) {
        self.step(&format!("RemoveSnapshot {snapshot_id}"));
        let resp = self
            .snapshots_api()
            .remove_snapshot(pb::RemoveSnapshotRequest {
                request_id: request_id(),
                vm_id: vm_id.to_string(),
                snapshot_id: snapshot_id.to_string(),
            })
            .await
            .unwrap_or_else(|e| self.fail(&format!("RemoveSnapshot: {e}")))
            .into_inner();
        self.succeed(resp.operation, "RemoveSnapshot").await;
    }
}
