//! The domain layer: the VMs this host runs and what can be done to them.
//! It knows nothing of tonic. Operations on one VM (run, stop, snapshot)
//! are serialized by the VM's operation lock; status changes are published
//! on a watch channel (current status) and a broadcast channel (every
//! transition, so that a watcher sees RESTORING_STATE even when UP follows
//! quickly).
//!
//! Status rules (VDSM's, as the feature specifies them):
//! - boot: POWERING_UP once the domain is created, UP at the guest's first
//!   console output, or after `boot_grace` (60 s) without any: oVirt's
//!   "powering up until the guest agent answers, at most a minute", with the
//!   console as the sign of life since there is no agent;
//! - restore: RESTORING_STATE while the memory is verified and loaded, then
//!   UP; never POWERING_UP;
//! - snapshot with memory: SAVING_STATE during the dump, then UP;
//! - stop: POWERING_DOWN during the graceful wait, then DOWN;
//! - PAUSED when libvirt reports a pause that is not one of ours, DOWN when
//!   the domain goes away by itself (the monitor notices within a second and
//!   tears the VM's volumes down).
use crate::error::{HostError, Result};
use crate::libvirt::{self, DomainState, Hypervisor};
use crate::model::{now_unix_ms, StatusEvent, VmSpec, VmStatus, VolumeRef};
use crate::volumes::Volumes;
use crate::xml::{self, DiskFormat, DiskKind};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

mod adopt;
mod forget;
mod merge;
mod run;
mod snapshot;
mod suspend;
mod verify;

pub use merge::CommitOutcome;
pub use snapshot::JobView;
pub use suspend::{SuspendOutcome, SuspendRequest};

/// How the host agent runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The host's id; None reads (or creates) `<state_dir>/host-id`.
    pub host_id: Option<String>,
    /// qemu:///system; test:///default for a simulated host.
    pub libvirt_uri: String,
    /// The StorageService of this host: http://127.0.0.1:50052.
    pub storage: String,
    /// Where kernels and initrds are; a VM spec names files in it.
    pub boot_dir: PathBuf,
    /// Console logs go to `<run_dir>/<vm_id>/console.log`.
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Domain names are `<prefix><vm_id>`; only domains with this prefix are
    /// the agent's (rediscovered on start).
    pub domain_prefix: String,
    /// libvirt's domain type for QEMU hosts: "qemu" (TCG) or "kvm".
    pub domain_type: String,
    /// A booting guest is reported UP at its first console output, or
    /// after this long.
    pub boot_grace: Duration,
    /// How often the monitor compares the VMs with libvirt.
    pub monitor_interval: Duration,
    /// How the agent reaches its storage agent (TLS with its certificate).
    pub storage_transport: ramsnap_common::tls::ClientTransport,
    /// How long a watch of a VM this host does not know stays open for the
    /// VM to be run here (then it ends).
    pub unknown_watch_wait: Duration,
}

impl Config {
    pub fn new(
        libvirt_uri: &str,
        storage: &str,
        boot_dir: PathBuf,
        run_dir: PathBuf,
        state_dir: PathBuf,
    ) -> Config {
        Config {
            host_id: None,
            libvirt_uri: libvirt_uri.to_string(),
            storage: storage.to_string(),
            boot_dir,
            run_dir,
            state_dir,
            domain_prefix: "ramsnap-".into(),
            domain_type: "qemu".into(),
            boot_grace: Duration::from_secs(60),
            monitor_interval: Duration::from_secs(1),
            storage_transport: ramsnap_common::tls::ClientTransport::Insecure,
            unknown_watch_wait: UNKNOWN_WATCH_WAIT,
        }
    }
}

/// Host identity and capabilities.
#[derive(Debug, Clone)]
pub struct HostInfo {
    pub host_id: String,
    pub hostname: String,
    pub libvirt_uri: String,
    pub libvirt_version: String,
    pub hypervisor_version: String,
    pub hypervisor_type: String,
    pub memory_snapshots_supported: bool,
}

/// What the host keeps about a running VM. It is also stored, as JSON, in
/// the domain's `<metadata>`, so that a restarted agent finds it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Running {
    pub version: u32,
    /// The agent that runs it: a restarted agent adopts only its own
    /// domains, never those of another agent on the same libvirt.
    #[serde(default)]
    pub host_id: String,
    pub domain_name: String,
    pub spec: VmSpec,
    pub disks: Vec<RunningDisk>,
    pub console_log: PathBuf,
    /// Set while the guest is restored from this memory and not yet
    /// resumed: an agent that finds a domain paused with it set (its
    /// predecessor died during the restore) knows the guest never ran on
    /// that memory, and destroys it so that the restore can be made again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restoring: Option<crate::model::MemoryVolumes>,
}

const RUNNING_VERSION: u32 = 1;

/// How a domain left by an interrupted restore was settled.
enum Settled {
    /// The guest had resumed: adopted with this record; the memory volumes
    /// (given) are to be released.
    Adopted(Box<Running>, Vec<VolumeRef>),
    /// The guest had not resumed: destroyed; these volumes are to be
    /// released.
    Destroyed(Vec<VolumeRef>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunningDisk {
    pub dev: String,
    /// The volume the guest writes to now.
    pub leaf: VolumeRef,
    pub path: String,
    pub kind: DiskKind,
    pub format: DiskFormat,
    /// Every volume prepared for this disk (the boot leaf, then each
    /// snapshot's overlay): torn down, last first, when the VM stops.
    pub prepared: Vec<VolumeRef>,
}

impl Running {
    fn json(&self) -> String {
        serde_json::to_string(self).expect("running record serializes")
    }

    /// For a new domain's `<metadata>`.
    fn metadata_element(&self) -> String {
        xml::metadata_element(&self.json())
    }

    /// For virDomainSetMetadata on a running domain.
    fn metadata_body(&self) -> String {
        xml::metadata_body(&self.json())
    }
}

pub(crate) struct Vm {
    pub id: Uuid,
    pub op: Arc<tokio::sync::Mutex<()>>,
    status: watch::Sender<StatusEvent>,
    events: broadcast::Sender<StatusEvent>,
    pub running: Mutex<Option<Running>>,
    /// Bumped at every run and stop: a boot watcher of an older run stops.
    pub generation: AtomicU64,
    pub job: Mutex<Option<Arc<snapshot::Job>>>,
    /// Found running at start (a domain an earlier agent process ran): its
    /// first snapshot job first asks libvirt what an earlier process may
    /// have left under way (see `resolve_earlier_attempt`). Cleared once
    /// that is settled; a VM this process ran needs no such look.
    pub adopted: AtomicBool,
}

impl Vm {
    fn new(id: Uuid, status: VmStatus) -> Vm {
        let ev = StatusEvent {
            status,
            at_unix_ms: now_unix_ms(),
        };
        Vm {
            id,
            op: Arc::new(tokio::sync::Mutex::new(())),
            status: watch::channel(ev).0,
            events: broadcast::channel(64).0,
            running: Mutex::new(None),
            generation: AtomicU64::new(0),
            job: Mutex::new(None),
            adopted: AtomicBool::new(false),
        }
    }

    pub fn status(&self) -> VmStatus {
        self.status.borrow().status
    }

    pub fn set_status(&self, status: VmStatus) {
        self.transition(None, status);
    }

    /// Sets `to` if the status is `from` (any when None); true if it changed.
    pub fn transition(&self, from: Option<VmStatus>, to: VmStatus) -> bool {
        let mut ev = None;
        self.status.send_if_modified(|cur| {
            if cur.status == to || from.is_some_and(|f| f != cur.status) {
                return false;
            }
            *cur = StatusEvent {
                status: to,
                at_unix_ms: now_unix_ms(),
            };
            ev = Some(*cur);
            true
        });
        if let Some(ev) = ev {
            tracing::info!(vm = %self.id, status = ?ev.status, "status");
            let _ = self.events.send(ev);
            true
        } else {
            false
        }
    }

    pub fn running(&self) -> Option<Running> {
        self.running.lock().expect("vm lock").clone()
    }
}

pub(crate) struct Inner {
    pub config: Config,
    pub host_id: String,
    pub hv: Hypervisor,
    pub volumes: Volumes,
    /// libvirt's test driver: no guest, no console, no memory dumps.
    pub simulated: bool,
    pub virt_type: String,
    vms: Mutex<HashMap<Uuid, Arc<Vm>>>,
    pub jobs: Mutex<HashMap<Uuid, Arc<snapshot::Job>>>,
    /// A VM got an entry in the table (its id): wakes watchers that
    /// subscribed before it was run here.
    added: broadcast::Sender<Uuid>,
}

/// The host agent. Cheap to clone.
#[derive(Clone)]
pub struct Host {
    pub(crate) inner: Arc<Inner>,
}

fn host_id(config: &Config) -> Result<String> {
    if let Some(id) = &config.host_id {
        return Ok(id.clone());
    }
    let path = config.state_dir.join("host-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(HostError::io(format!("reading {}", path.display()), e)),
    }
    let id = Uuid::new_v4().to_string();
    let tmp = config.state_dir.join("host-id.tmp");
    std::fs::create_dir_all(&config.state_dir)
        .and_then(|_| std::fs::write(&tmp, format!("{id}\n")))
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| HostError::io(format!("writing {}", path.display()), e))?;
    Ok(id)
}

impl Host {
    /// Connects to libvirt, rediscovers the VMs this host already runs and
    /// starts the monitor.
    pub async fn open(config: Config) -> Result<Host> {
        let host_id = host_id(&config)?;
        let hv = Hypervisor::open(&config.libvirt_uri).await?;
        let facts = hv.facts().await?;
        let simulated = facts.driver.eq_ignore_ascii_case("test");
        let virt_type = if simulated {
            "test".to_string()
        } else {
            config.domain_type.clone()
        };
        let volumes = Volumes::connect_lazy(&config.storage, &config.storage_transport)?;
        let inner = Arc::new(Inner {
            config,
            host_id,
            hv,
            volumes,
            simulated,
            virt_type,
            vms: Mutex::new(HashMap::new()),
            jobs: Mutex::new(HashMap::new()),
            added: broadcast::channel(256).0,
        });
        let host = Host { inner };
        host.rediscover().await?;
        tokio::spawn(monitor(Arc::downgrade(&host.inner)));
        Ok(host)
    }

    async fn rediscover(&self) -> Result<()> {
        let entries = self
            .inner
            .hv
            .list(self.inner.config.domain_prefix.clone())
            .await?;
        for e in entries {
            let Some(mut record) = self.our_record(&e) else {
                continue;
            };
            let mut release = Vec::new();
            if record.restoring.is_some() {
                match self.finish_interrupted_restore(&e, record).await? {
                    Settled::Destroyed(refs) => {
                        self.release_in_background(self.vm_entry(e.uuid), refs);
                        continue;
                    }
                    Settled::Adopted(adopted, memory) => {
                        record = *adopted;
                        release = memory;
                    }
                }
            }
            let status = match e.state {
                DomainState::Paused { by_user: true } => VmStatus::Paused,
                _ => VmStatus::Up,
            };
            let vm = Arc::new(Vm::new(e.uuid, status));
            *vm.running.lock().expect("vm lock") = Some(record);
            vm.adopted.store(true, Ordering::SeqCst);
            tracing::info!(vm = %e.uuid, domain = %e.name, "rediscovered a running VM");
            self.inner
                .vms
                .lock()
                .expect("vm table")
                .insert(e.uuid, vm.clone());
            if !release.is_empty() {
                self.release_in_background(vm, release);
            }
        }
        Ok(())
    }

    /// This agent's record of a listed domain (its `<metadata>`), if the
    /// domain is one this agent ran.
    fn our_record(&self, e: &libvirt::DomainEntry) -> Option<Running> {
        let element = e.metadata.as_ref()?;
        let record = xml::metadata_text(element)
            .ok()
            .and_then(|t| serde_json::from_str::<Running>(&t).ok());
        let Some(record) = record else {
            tracing::warn!(domain = %e.name, "domain with an unreadable ramsnap record; left alone");
            return None;
        };
        (record.spec.vm_id == e.uuid && record.host_id == self.inner.host_id).then_some(record)
    }

    /// A domain left by a restore that was under way when an agent process
    /// died: found at start, or by a run that meets a domain it has no
    /// record of (libvirt may create it only after the agent restarted).
    /// Called with the VM's operation lock held, or before anything runs.
    pub(crate) async fn settle_unrecorded_restore(&self, vm: &Vm) -> Result<bool> {
        let entries = self
            .inner
            .hv
            .list(self.inner.config.domain_prefix.clone())
            .await?;
        let Some(e) = entries.into_iter().find(|e| e.uuid == vm.id) else {
            return Ok(false);
        };
        let Some(record) = self.our_record(&e).filter(|r| r.restoring.is_some()) else {
            return Ok(false);
        };
        match self.finish_interrupted_restore(&e, record).await? {
            Settled::Destroyed(refs) => {
                self.inner.volumes.teardown_all(&refs).await;
                Ok(true)
            }
            Settled::Adopted(record, memory) => {
                *vm.running.lock().expect("vm lock") = Some(*record);
                vm.adopted.store(true, Ordering::SeqCst);
                vm.set_status(VmStatus::Up);
                self.inner.volumes.teardown_all(&memory).await;
                Ok(false)
            }
        }
    }

    /// Settles a domain whose restore was under way when the previous
    /// agent process died. Paused: the guest never ran on the memory (it
    /// is resumed only once the dump's checksum matched), so the domain is
    /// destroyed; its volumes are to be released, and the engine's retried
    /// run restores it again. Running: it was resumed; the mark is cleared
    /// and the memory volumes are to be released.
    async fn finish_interrupted_restore(
        &self,
        e: &libvirt::DomainEntry,
        mut record: Running,
    ) -> Result<Settled> {
        let hv = &self.inner.hv;
        // libvirt may still be loading the memory for the dead process.
        if !self.inner.simulated {
            hv.wait_for_jobs(e.uuid, Duration::from_secs(600)).await?;
        }
        let state = hv.state(e.uuid).await?;
        let memory: Vec<VolumeRef> = record
            .restoring
            .take()
            .into_iter()
            .flat_map(|m| [m.dump, m.metadata])
            .collect();
        match state {
            Some(DomainState::Running) => {
                tracing::warn!(vm = %e.uuid, "a restore interrupted after the guest resumed: adopting it");
                if let Err(err) = hv.set_metadata(e.uuid, record.metadata_body()).await {
                    tracing::warn!(vm = %e.uuid, error = %err, "clearing the restore mark failed");
                }
                Ok(Settled::Adopted(Box::new(record), memory))
            }
            _ => {
                tracing::warn!(vm = %e.uuid, "a restore interrupted before the guest resumed: destroying the paused domain");
                if state.is_some() {
                    hv.destroy(e.uuid).await?;
                }
                let mut refs: Vec<VolumeRef> = record.disks.iter().flat_map(|d| d.prepared.clone()).collect();
                refs.extend(memory);
                Ok(Settled::Destroyed(refs))
            }
        }
    }

    /// Tears volumes down without holding up the agent's start (its storage
    /// agent may not answer yet), under the VM's operation lock, taken here:
    /// a run of the VM waits until they are released, so that a late
    /// teardown never takes away what that run prepared.
    fn release_in_background(&self, vm: Arc<Vm>, refs: Vec<VolumeRef>) {
        let Ok(guard) = vm.op.clone().try_lock_owned() else {
            tracing::error!(vm = %vm.id, "the VM is busy at start; its volumes are left prepared");
            return;
        };
        let host = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            for r in refs.iter().rev() {
                let mut attempt = 0u32;
                while let Err(e) = host.inner.volumes.teardown(r).await {
                    attempt += 1;
                    tracing::warn!(vm = %vm.id, volume = %r, attempt, error = %e, "teardown failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(25)))).await;
                }
            }
            tracing::info!(vm = %vm.id, volumes = refs.len(), "released the volumes of an interrupted restore");
        });
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub(crate) fn vm(&self, id: Uuid) -> Option<Arc<Vm>> {
        self.inner.vms.lock().expect("vm table").get(&id).cloned()
    }

    pub(crate) fn vm_entry(&self, id: Uuid) -> Arc<Vm> {
        let mut added = false;
        let vm = self
            .inner
            .vms
            .lock()
            .expect("vm table")
            .entry(id)
            .or_insert_with(|| {
                added = true;
                Arc::new(Vm::new(id, VmStatus::Down))
            })
            .clone();
        if added {
            let _ = self.inner.added.send(id);
        }
        vm
    }

    pub(crate) fn domain_name(&self, id: Uuid) -> String {
        format!("{}{}", self.inner.config.domain_prefix, id)
    }

    pub(crate) fn console_log(&self, id: Uuid) -> PathBuf {
        self.inner.config.run_dir.join(id.to_string()).join("console.log")
    }

    pub async fn info(&self) -> Result<HostInfo> {
        let f = self.inner.hv.facts().await?;
        let qemu = f.driver.eq_ignore_ascii_case("qemu");
        Ok(HostInfo {
            host_id: self.inner.host_id.clone(),
            hostname: f.hostname,
            libvirt_uri: self.inner.hv.uri().to_string(),
            libvirt_version: libvirt::version_string(f.lib_version),
            hypervisor_version: libvirt::version_string(f.hyp_version),
            hypervisor_type: f.driver,
            // External memory snapshots: QEMU driver, libvirt >= 1.0.1.
            memory_snapshots_supported: qemu && f.lib_version >= 1_000_001,
        })
    }

    /// The VM's status; DOWN for a VM this host does not run.
    pub fn status(&self, id: Uuid) -> VmStatus {
        self.vm(id).map(|v| v.status()).unwrap_or(VmStatus::Down)
    }

    /// The VMs that are not DOWN: (id, name, status).
    pub fn list(&self) -> Vec<(Uuid, String, VmStatus)> {
        let vms: Vec<Arc<Vm>> = self
            .inner
            .vms
            .lock()
            .expect("vm table")
            .values()
            .cloned()
            .collect();
        let mut out: Vec<_> = vms
            .into_iter()
            .filter_map(|vm| {
                let status = vm.status();
                if status == VmStatus::Down {
                    return None;
                }
                let name = vm.running().map(|r| r.spec.name).unwrap_or_default();
                Some((vm.id, name, status))
            })
            .collect();
        out.sort_by_key(|(id, _, _)| *id);
        out
    }

    /// The current status, then every transition. For a VM the host has
    /// no entry for (not running, not being started, forgotten): DOWN, and
    /// the stream ends unless the VM is run here within
    /// `Config::unknown_watch_wait` (a watcher that subscribes before the run).
    pub fn watch(&self, id: Uuid) -> impl futures::Stream<Item = StatusEvent> + Send + 'static {
        // Subscribed before looking, so that an entry made in between is seen.
        let mut added = self.inner.added.subscribe();
        let host = self.clone();
        let wait = self.inner.config.unknown_watch_wait;
        async_stream::stream! {
            let mut said_down = false;
            let vm = match host.vm(id) {
                Some(vm) => vm,
                None => {
                    said_down = true;
                    yield StatusEvent { status: VmStatus::Down, at_unix_ms: now_unix_ms() };
                    let appeared = tokio::time::timeout(wait, async {
                        loop {
                            match added.recv().await {
                                Ok(a) if a == id => return host.vm(id),
                                Ok(_) => {}
                                Err(broadcast::error::RecvError::Lagged(_)) => {
                                    if let Some(vm) = host.vm(id) {
                                        return Some(vm);
                                    }
                                }
                                Err(broadcast::error::RecvError::Closed) => return None,
                            }
                        }
                    })
                    .await;
                    match appeared {
                        Ok(Some(vm)) => vm,
                        _ => return,
                    }
                }
            };
            drop(host);
            let (mut events, current, mut status) =
                (vm.events.subscribe(), *vm.status.borrow(), vm.status.subscribe());
            // Only the receivers stay: when the VM's entry goes (ForgetVm,
            // prune), its sender goes with it and this stream ends.
            drop(vm);
            let mut last = current;
            if !(said_down && current.status == VmStatus::Down) {
                yield current;
            }
            loop {
                match events.recv().await {
                    Ok(ev) => {
                        if ev != last {
                            last = ev;
                            yield ev;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let ev = *status.borrow_and_update();
                        if ev != last {
                            last = ev;
                            yield ev;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        }
    }

    /// Up to `max` bytes of the VM's console log from `offset`, and the
    /// offset to read from next.
    pub async fn read_console(&self, id: Uuid, offset: u64, max: usize) -> Result<(Vec<u8>, u64)> {
        let path = self.console_log(id);
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(HostError::VmNotFound(id)),
                Err(e) => return Err(HostError::io(format!("opening {}", path.display()), e)),
            };
            let len = f.metadata().map_err(|e| HostError::io("console log", e))?.len();
            if offset >= len {
                return Ok((Vec::new(), offset));
            }
            f.seek(SeekFrom::Start(offset))
                .map_err(|e| HostError::io("console log", e))?;
            let mut buf = Vec::new();
            f.take(max as u64)
                .read_to_end(&mut buf)
                .map_err(|e| HostError::io("console log", e))?;
            let next = offset + buf.len() as u64;
            Ok((buf, next))
        })
        .await
        .map_err(|e| HostError::Internal(e.to_string()))?
    }

    /// (target dev, source path) of the disks the VM's domain runs on now,
    /// as libvirt reports them.
    pub async fn live_disks(&self, id: Uuid) -> Result<Vec<(String, String)>> {
        let xml = self.inner.hv.live_xml(id).await?;
        xml::disk_sources(&xml).map_err(|e| HostError::Internal(e.to_string()))
    }

    /// Stops the VM: ACPI shutdown, wait up to `graceful`, then destroy;
    /// tears its volumes down. True when the guest went down by itself.
    /// A running snapshot of the VM is cancelled first.
    pub async fn stop(&self, id: Uuid, graceful: Duration) -> Result<bool> {
        let hv = &self.inner.hv;
        let Some(vm) = self.vm(id) else {
            // Not ours (or from before a lost record): still make sure it is down.
            if hv.state(id).await?.is_some() {
                hv.destroy(id).await?;
            }
            return Ok(false);
        };
        let job = vm.job.lock().expect("vm lock").clone();
        if let Some(job) = job {
            self.cancel_job(&job).await;
        }
        let _op = vm.op.lock().await;
        let mut went_down = false;
        if hv.state(id).await?.is_some() {
            vm.set_status(VmStatus::PoweringDown);
            if !graceful.is_zero() {
                match hv.shutdown(id).await {
                    Ok(()) => {
                        let deadline = Instant::now() + graceful;
                        while Instant::now() < deadline {
                            if hv.state(id).await?.is_none() {
                                went_down = true;
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                    Err(e) if e.is_no_domain() => went_down = true,
                    Err(e) => tracing::warn!(vm = %id, error = %e, "graceful shutdown refused; destroying"),
                }
            }
            if !went_down {
                if let Err(e) = hv.destroy(id).await {
                    vm.set_status(VmStatus::Up);
                    return Err(e);
                }
            }
        }
        self.release(&vm).await;
        Ok(went_down)
    }

    /// After the domain is gone: tear down what the VM had prepared and
    /// report DOWN.
    pub(crate) async fn release(&self, vm: &Vm) {
        vm.generation.fetch_add(1, Ordering::SeqCst);
        let running = vm.running.lock().expect("vm lock").take();
        if let Some(r) = running {
            for d in r.disks.iter().rev() {
                self.inner.volumes.teardown_all(&d.prepared).await;
            }
        }
        vm.set_status(VmStatus::Down);
    }

    pub(crate) fn boot_path(&self, name: &str) -> PathBuf {
        self.inner.config.boot_dir.join(name)
    }
}

/// Compares the VMs with libvirt once a `monitor_interval`: a domain that
/// went away by itself (poweroff, crash) is reported DOWN and its volumes
/// torn down; pauses that are not ours are reported. Skips a VM while an
/// operation holds it. Ends when the host is dropped.
async fn monitor(inner: Weak<Inner>) {
    loop {
        let interval = match inner.upgrade() {
            Some(i) => i.config.monitor_interval,
            None => return,
        };
        tokio::time::sleep(interval).await;
        let Some(inner) = inner.upgrade() else { return };
        let host = Host { inner };
        if let Err(e) = host.reconcile().await {
            tracing::warn!(error = %e, "monitor: listing domains failed");
        }
        host.prune();
    }
}

impl Host {
    async fn reconcile(&self) -> Result<()> {
        let entries = self
            .inner
            .hv
            .list(self.inner.config.domain_prefix.clone())
            .await?;
        let present: HashMap<Uuid, DomainState> = entries.iter().map(|e| (e.uuid, e.state)).collect();
        let vms: Vec<Arc<Vm>> = self
            .inner
            .vms
            .lock()
            .expect("vm table")
            .values()
            .cloned()
            .collect();
        for vm in vms {
            let Ok(_op) = vm.op.try_lock() else { continue };
            if vm.running().is_none() {
                continue;
            }
            match present.get(&vm.id) {
                None => {
                    // Listed while it was going away? Ask once more.
                    if self.inner.hv.state(vm.id).await?.is_none() {
                        tracing::info!(vm = %vm.id, "domain went away by itself");
                        self.release(&vm).await;
                    }
                }
                Some(DomainState::Paused { by_user: true }) => {
                    vm.transition(Some(VmStatus::Up), VmStatus::Paused);
                }
                Some(DomainState::Running) => {
                    vm.transition(Some(VmStatus::Paused), VmStatus::Up);
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Forgets DOWN VMs nobody watches and snapshot jobs finished long ago.
    fn prune(&self) {
        self.inner.vms.lock().expect("vm table").retain(|_, vm| {
            vm.status() != VmStatus::Down
                || vm.running.lock().expect("vm lock").is_some()
                || vm.events.receiver_count() > 0
                || vm.job.lock().expect("vm lock").is_some()
                || vm.op.try_lock().is_err()
        });
        self.inner
            .jobs
            .lock()
            .expect("job table")
            .retain(|_, job| !job.expired());
    }
}

/// The default of `Config::unknown_watch_wait`.
pub const UNKNOWN_WATCH_WAIT: Duration = Duration::from_secs(60);

/// Logs how long each step of an operation took (debug level).
pub(crate) struct Lap {
    vm: Uuid,
    what: &'static str,
    at: Instant,
}

impl Lap {
    pub fn new(vm: Uuid, what: &'static str) -> Lap {
        Lap {
            vm,
            what,
            at: Instant::now(),
        }
    }

    pub fn done(&mut self, step: &str) {
        tracing::debug!(vm = %self.vm, step, ms = self.at.elapsed().as_millis() as u64, "{}", self.what);
        self.at = Instant::now();
    }
}

/// Makes sure the console log exists (QEMU appends to it) and returns its
/// current length: output past it is this run's.
pub(crate) fn prepare_console_log(path: &Path) -> std::io::Result<u64> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    Ok(f.metadata()?.len())
}
