//! What the simulation tests share (`sagas_sim.rs`, with the coordinator
//! in-process, and `crash_restart.rs`, with the coordinator as a process of
//! its own): a real StorageService in-process on a FILE domain in a
//! temporary directory, a SIMULATED HostService ([`SimulatedHost`]) that
//! records what it is asked, reports the statuses a real host reports
//! (RESTORING_STATE then UP when it restores memory, POWERING_UP then UP
//! when it boots) and takes snapshots without a guest; gRPC clients of the
//! coordinator ([`Env`]) with the flows the tests drive, the storage
//! inventory check (no orphan volume, no missing one), and each saga's
//! scenario ([`setup`], [`act`]).
//!
//! Each test crate uses its own part of it.
#![allow(dead_code)]

pub mod inproc;
pub mod process;

use ramsnap_common::server::{self, ServiceSet};
use ramsnap_proto::common::v1 as common;
use ramsnap_proto::host::v1 as host;
use ramsnap_proto::host::v1::host_service_server::{HostService, HostServiceServer};
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::cluster_service_client::ClusterServiceClient;
use ramsnap_proto::snapshot::v1::operation_service_client::OperationServiceClient;
use ramsnap_proto::snapshot::v1::snapshot_service_client::SnapshotServiceClient;
use ramsnap_proto::snapshot::v1::vm_service_client::VmServiceClient;
use ramsnap_proto::storage::v1 as storage;
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use ramsnap_storage::service::{StorageApi, SERVICE_NAME as STORAGE_SERVICE};
use ramsnap_storage::{Config, Storage};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tempfile::TempDir;
use tokio::sync::{oneshot, watch, Notify};
use tokio_stream::Stream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_types::StatusExt;
use uuid::Uuid;

pub const MIB: u64 = 1024 * 1024;
pub const HOST_SERVICE: &str = "ramsnap.host.v1.HostService";
/// Simulated boot (or restore) time: long enough for watchers to see the
/// transitional status.
pub const UP_DELAY: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------
// The simulated host.

/// What the coordinator asked the simulated host.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a test's call log
pub enum HostCall {
    Run {
        vm_id: String,
        name: String,
        disks: Vec<common::VolumeRef>,
        restore_memory: Option<common::MemoryVolumeRef>,
        kernel: String,
    },
    Stop {
        vm_id: String,
    },
    Snapshot {
        vm_id: String,
        job_id: String,
        memory: bool,
        memory_saved: bool,
    },
    /// VerifyMemory of a memory pair where an export or import put it.
    Verify {
        dump: common::VolumeRef,
        rebind_disk_domain_id: String,
        rebind_disks: Vec<common::VolumeRef>,
    },
    /// A repeated SnapshotVm that joined the job of the same id.
    SnapshotJoin {
        vm_id: String,
        job_id: String,
    },
    /// CommitVolume (live merge): `top` into `base`.
    Commit {
        vm_id: String,
        top: common::VolumeRef,
        base: common::VolumeRef,
        done_earlier: bool,
    },
    /// SuspendVm: the guest's memory into `memory`, the guest stopped.
    Suspend {
        vm_id: String,
        disks: Vec<common::VolumeRef>,
        memory: Option<common::MemoryVolumeRef>,
    },
}

/// A HostService without libvirt: VMs are status machines. RunVm checks
/// that every disk volume (and the memory to restore) exists on storage, as
/// a real host preparing them would; SnapshotVm checks the overlays and
/// reports `memory_saved` when it was given memory and the cluster is 3.3+.
#[derive(Clone)]
pub struct SimulatedHost {
    pub inner: Arc<SimInner>,
}

pub struct SimInner {
    pub storage: Mutex<Option<StorageServiceClient<Channel>>>,
    pub vms: Mutex<HashMap<String, watch::Sender<i32>>>,
    pub calls: Mutex<Vec<HostCall>>,
    /// While set, SnapshotVm waits for it to be notified.
    pub snapshot_gate: Mutex<Option<Arc<Notify>>>,
    /// Refuse the next restore as a real host does when the memory's
    /// metadata does not match the disks.
    pub refuse_restore: Mutex<bool>,
    /// Snapshot jobs by job id.
    jobs: Mutex<HashMap<String, SnapshotJob>>,
    /// Suspended VMs: the snapshot id and memory pair each was saved with
    /// (what a real host finds in the pair's metadata on a retry).
    suspended: Mutex<HashMap<String, (String, Option<common::MemoryVolumeRef>)>>,
}

/// A snapshot job: `done` holds `memory_saved` once it is taken.
struct SnapshotJob {
    vm_id: String,
    snapshot_id: String,
    done: watch::Receiver<Option<bool>>,
}

impl SimulatedHost {
    pub fn new() -> SimulatedHost {
        SimulatedHost {
            inner: Arc::new(SimInner {
                storage: Mutex::new(None),
                vms: Mutex::new(HashMap::new()),
                calls: Mutex::new(Vec::new()),
                snapshot_gate: Mutex::new(None),
                refuse_restore: Mutex::new(false),
                jobs: Mutex::new(HashMap::new()),
                suspended: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn calls(&self) -> Vec<HostCall> {
        self.inner.calls.lock().unwrap().clone()
    }

    pub fn runs(&self, vm_id: &str) -> Vec<HostCall> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c, HostCall::Run { vm_id: v, .. } if v == vm_id))
            .collect()
    }

    pub fn last_run(&self, vm_id: &str) -> HostCall {
        self.runs(vm_id).pop().expect("the host ran the VM")
    }

    /// The VerifyMemory calls that passed, of dumps on that domain:
    /// (dump, rebind_disk_domain_id, rebind_disks).
    pub fn verifies_on(&self, domain_id: &str) -> Vec<(common::VolumeRef, String, Vec<common::VolumeRef>)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                HostCall::Verify {
                    dump,
                    rebind_disk_domain_id,
                    rebind_disks,
                } if dump.domain_id == domain_id => Some((dump, rebind_disk_domain_id, rebind_disks)),
                _ => None,
            })
            .collect()
    }

    pub fn status(&self, vm_id: &str) -> i32 {
        self.inner
            .vms
            .lock()
            .unwrap()
            .get(vm_id)
            .map(|s| *s.borrow())
            .unwrap_or(host::VmStatus::Down as i32)
    }

    pub fn set_status(&self, vm_id: &str, status: host::VmStatus) {
        let mut vms = self.inner.vms.lock().unwrap();
        match vms.get(vm_id) {
            Some(tx) => {
                tx.send_replace(status as i32);
            }
            None => {
                vms.insert(vm_id.to_string(), watch::channel(status as i32).0);
            }
        }
    }

    /// The job of that id if there is one: joined (recorded as such), or
    /// ALREADY_EXISTS if it is another VM's or snapshot's.
    fn join_job(
        &self,
        req: &host::SnapshotVmRequest,
    ) -> Result<Option<watch::Receiver<Option<bool>>>, Status> {
        let jobs = self.inner.jobs.lock().unwrap();
        let Some(job) = jobs.get(&req.job_id) else {
            return Ok(None);
        };
        if job.vm_id != req.vm_id || job.snapshot_id != req.snapshot_id {
            return Err(Status::already_exists(format!(
                "job {} is a snapshot of another VM or snapshot",
                req.job_id
            )));
        }
        let done = job.done.clone();
        drop(jobs);
        self.record(HostCall::SnapshotJoin {
            vm_id: req.vm_id.clone(),
            job_id: req.job_id.clone(),
        });
        Ok(Some(done))
    }

    fn record(&self, c: HostCall) {
        self.inner.calls.lock().unwrap().push(c);
    }

    async fn require_volume(&self, r: &common::VolumeRef) -> Result<(), Status> {
        let mut client = self
            .inner
            .storage
            .lock()
            .unwrap()
            .clone()
            .expect("storage attached");
        client
            .get_volume(storage::GetVolumeRequest {
                r#ref: Some(r.clone()),
            })
            .await
            .map(|_| ())
            .map_err(|s| Status::failed_precondition(format!("volume {}: {}", r.volume_id, s.message())))
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<host::WatchVmStatusResponse, Status>> + Send>>;
type SnapshotStream = Pin<Box<dyn Stream<Item = Result<host::SnapshotVmResponse, Status>> + Send>>;

#[tonic::async_trait]
impl HostService for SimulatedHost {
    async fn get_host_info(
        &self,
        _: Request<host::GetHostInfoRequest>,
    ) -> Result<Response<host::GetHostInfoResponse>, Status> {
        Ok(Response::new(host::GetHostInfoResponse {
            host_id: "simulated".into(),
            hostname: "simulated".into(),
            hypervisor_type: "simulated".into(),
            memory_snapshots_supported: true,
            ..Default::default()
        }))
    }

    async fn run_vm(
        &self,
        req: Request<host::RunVmRequest>,
    ) -> Result<Response<host::RunVmResponse>, Status> {
        let req = req.into_inner();
        let spec = req.spec.ok_or_else(|| Status::invalid_argument("spec"))?;
        if self.status(&spec.vm_id) != host::VmStatus::Down as i32 {
            // As the HostService contract says.
            return Err(Status::already_exists("the VM is already running"));
        }
        let disks: Vec<common::VolumeRef> = spec.disks.iter().filter_map(|d| d.volume.clone()).collect();
        for d in &disks {
            self.require_volume(d).await?;
        }
        if let Some(m) = &req.restore_memory {
            self.require_volume(m.dump.as_ref().unwrap()).await?;
            self.require_volume(m.metadata.as_ref().unwrap()).await?;
            if std::mem::take(&mut *self.inner.refuse_restore.lock().unwrap()) {
                return Err(ramsnap_common::status::failed_precondition(
                    "MEMORY_DISKS_MISMATCH",
                    "spec.disks",
                    "the VM's disks do not match the memory snapshot",
                ));
            }
        }
        let first = if req.restore_memory.is_some() {
            host::VmStatus::RestoringState
        } else {
            host::VmStatus::PoweringUp
        };
        self.record(HostCall::Run {
            vm_id: spec.vm_id.clone(),
            name: spec.name.clone(),
            disks,
            restore_memory: req.restore_memory.clone(),
            kernel: spec.kernel.clone(),
        });
        self.set_status(&spec.vm_id, first);
        let this = self.clone();
        let vm_id = spec.vm_id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(UP_DELAY).await;
            if this.status(&vm_id) == first as i32 {
                this.set_status(&vm_id, host::VmStatus::Up);
            }
        });
        Ok(Response::new(host::RunVmResponse { status: first as i32 }))
    }

    async fn stop_vm(
        &self,
        req: Request<host::StopVmRequest>,
    ) -> Result<Response<host::StopVmResponse>, Status> {
        let vm_id = req.into_inner().vm_id;
        self.record(HostCall::Stop { vm_id: vm_id.clone() });
        let running = self.status(&vm_id) != host::VmStatus::Down as i32;
        if running {
            self.set_status(&vm_id, host::VmStatus::Down);
        }
        Ok(Response::new(host::StopVmResponse { graceful: running }))
    }

    async fn get_vm_status(
        &self,
        req: Request<host::GetVmStatusRequest>,
    ) -> Result<Response<host::GetVmStatusResponse>, Status> {
        // DOWN for a VM this host does not run, as the contract says.
        let vm_id = req.into_inner().vm_id;
        Ok(Response::new(host::GetVmStatusResponse {
            status: self.status(&vm_id),
        }))
    }

    async fn list_vms(
        &self,
        _: Request<host::ListVmsRequest>,
    ) -> Result<Response<host::ListVmsResponse>, Status> {
        let vms = self.inner.vms.lock().unwrap();
        Ok(Response::new(host::ListVmsResponse {
            // Every status but DOWN, as the contract says.
            vms: vms
                .iter()
                .filter(|(_, s)| *s.borrow() != host::VmStatus::Down as i32)
                .map(|(id, s)| host::VmInfo {
                    vm_id: id.clone(),
                    name: String::new(),
                    status: *s.borrow(),
                })
                .collect(),
        }))
    }

    type WatchVmStatusStream = StatusStream;

    async fn watch_vm_status(
        &self,
        req: Request<host::WatchVmStatusRequest>,
    ) -> Result<Response<StatusStream>, Status> {
        let vm_id = req.into_inner().vm_id;
        let mut rx = self
            .inner
            .vms
            .lock()
            .unwrap()
            .get(&vm_id)
            .map(|tx| tx.subscribe())
            .ok_or_else(|| Status::not_found(format!("vm {vm_id}")))?;
        let stream = async_stream::stream! {
            loop {
                let status = *rx.borrow_and_update();
                yield Ok(host::WatchVmStatusResponse { status, at_unix_ms: 0 });
                if rx.changed().await.is_err() {
                    break;
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn read_console(
        &self,
        _: Request<host::ReadConsoleRequest>,
    ) -> Result<Response<host::ReadConsoleResponse>, Status> {
        Ok(Response::new(host::ReadConsoleResponse {
            data: b"simulated console\n".to_vec(),
            next_offset: 18,
        }))
    }

    type SnapshotVmStream = SnapshotStream;

    /// A repeated call with the job id of an earlier one joins that job, as
    /// a real host does (a coordinator that resumes the step after a crash
    /// asks again): its outcome, no second snapshot.
    async fn snapshot_vm(
        &self,
        req: Request<host::SnapshotVmRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let req = req.into_inner();
        let done = match self.join_job(&req)? {
            Some(done) => done,
            None => {
                for d in &req.disks {
                    self.require_volume(d.current.as_ref().unwrap()).await?;
                    self.require_volume(d.overlay.as_ref().unwrap()).await?;
                }
                let memory = req.memory.is_some();
                if let Some(m) = &req.memory {
                    self.require_volume(m.dump.as_ref().unwrap()).await?;
                }
                let compat_33 = req
                    .compatibility_version
                    .split_once('.')
                    .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
                    .is_some_and(|v| v >= (3, 3));
                let memory_saved = memory && compat_33;
                let mut jobs = self.inner.jobs.lock().unwrap();
                if let Some(twin) = jobs.get(&req.job_id) {
                    // A twin call started it meanwhile.
                    twin.done.clone()
                } else {
                    let (tx, rx) = watch::channel(None);
                    jobs.insert(
                        req.job_id.clone(),
                        SnapshotJob {
                            vm_id: req.vm_id.clone(),
                            snapshot_id: req.snapshot_id.clone(),
                            done: rx.clone(),
                        },
                    );
                    drop(jobs);
                    self.record(HostCall::Snapshot {
                        vm_id: req.vm_id.clone(),
                        job_id: req.job_id.clone(),
                        memory,
                        memory_saved,
                    });
                    // The job runs on its own, whether or not its caller stays.
                    let gate = self.inner.snapshot_gate.lock().unwrap().clone();
                    tokio::spawn(async move {
                        if let Some(g) = gate {
                            g.notified().await;
                        }
                        tx.send_replace(Some(memory_saved));
                    });
                    rx
                }
            }
        };
        let stream = async_stream::stream! {
            yield Ok(host::SnapshotVmResponse {
                progress: Some(common::Progress { processed_bytes: 0, total_bytes: 1 }),
                result: None,
            });
            let mut done = done;
            let outcome = done.wait_for(|d| d.is_some()).await.map(|d| d.unwrap_or(false));
            let memory_saved = match outcome {
                Ok(saved) => saved,
                Err(_) => {
                    yield Err(Status::aborted("the snapshot job ended without an outcome"));
                    return;
                }
            };
            yield Ok(host::SnapshotVmResponse {
                progress: Some(common::Progress { processed_bytes: 1, total_bytes: 1 }),
                result: Some(host::SnapshotResult { memory_saved, ..Default::default() }),
            });
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_snapshot(
        &self,
        _: Request<host::CancelSnapshotRequest>,
    ) -> Result<Response<host::CancelSnapshotResponse>, Status> {
        Ok(Response::new(host::CancelSnapshotResponse { cancelled: false }))
    }

    /// The checksum of the dump volume's bytes (zeros up to its capacity),
    /// read through the real StorageService; compared with
    /// `expected_checksum` when given. A simulated snapshot writes no
    /// metadata document, so there is none to check or rebind: a rebind
    /// request is only recorded.
    async fn verify_memory(
        &self,
        req: Request<host::VerifyMemoryRequest>,
    ) -> Result<Response<host::VerifyMemoryResponse>, Status> {
        use ramsnap_common::checksum::{digest_file, same, Algorithm};
        let req = req.into_inner();
        let m = req.memory.ok_or_else(|| Status::invalid_argument("memory"))?;
        let dump = m.dump.ok_or_else(|| Status::invalid_argument("memory.dump"))?;
        self.require_volume(
            m.metadata
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("memory.metadata"))?,
        )
        .await?;
        let mut client = self
            .inner
            .storage
            .lock()
            .unwrap()
            .clone()
            .expect("storage attached");
        let capacity = client
            .get_volume(storage::GetVolumeRequest {
                r#ref: Some(dump.clone()),
            })
            .await?
            .into_inner()
            .volume
            .map(|v| v.capacity_bytes)
            .unwrap_or(0);
        let path = client
            .prepare_volume(storage::PrepareVolumeRequest {
                r#ref: Some(dump.clone()),
                ..Default::default()
            })
            .await?
            .into_inner()
            .path;
        let checksum = digest_file(std::path::Path::new(&path), capacity, Algorithm::CURRENT)
            .map_err(|e| Status::internal(e.to_string()))?
            .checksum
            .to_string();
        let _ = client
            .teardown_volume(storage::TeardownVolumeRequest {
                r#ref: Some(dump.clone()),
            })
            .await;
        if !req.expected_checksum.is_empty() && !same(&req.expected_checksum, &checksum) {
            // The real host's words (ramsnap-host's RestoreError::DumpCorrupt).
            return Err(ramsnap_common::status::failed_precondition(
                "MEMORY_DUMP_CORRUPT",
                &dump.volume_id,
                format!(
                    "memory dump {}/{}/{} is corrupt: checksum {checksum}, recorded {}",
                    dump.domain_id, dump.image_id, dump.volume_id, req.expected_checksum
                ),
            ));
        }
        let rebound = !req.rebind_disk_domain_id.is_empty() || !req.rebind_disks.is_empty();
        self.record(HostCall::Verify {
            dump: dump.clone(),
            rebind_disk_domain_id: req.rebind_disk_domain_id.clone(),
            rebind_disks: req.rebind_disks.clone(),
        });
        Ok(Response::new(host::VerifyMemoryResponse {
            checksum,
            capacity,
            rebound,
            disks: req.rebind_disks,
            ..Default::default()
        }))
    }

    /// A simulated host reads no oVirt memory: every one is unusable (so
    /// an import leaves it out, with a warning).
    async fn inspect_ovirt_memory(
        &self,
        _req: Request<host::InspectOvirtMemoryRequest>,
    ) -> Result<Response<host::InspectOvirtMemoryResponse>, Status> {
        Ok(Response::new(host::InspectOvirtMemoryResponse {
            usable: false,
            reason: "a simulated host reads no oVirt memory".into(),
        }))
    }

    async fn commit_volume(
        &self,
        req: Request<host::CommitVolumeRequest>,
    ) -> Result<Response<host::CommitVolumeResponse>, Status> {
        // What a real host's block commit leaves on storage, done with
        // qemu-img on the (FILE) volumes: top's data in base (`commit -d`),
        // the volume above top reading base (an unsafe rebase: only its
        // header changes). A retry finds the child reading base.
        let r = req.into_inner();
        let (top, base) = (
            r.top.clone().unwrap_or_default(),
            r.base.clone().unwrap_or_default(),
        );
        if self.status(&r.vm_id) == host::VmStatus::Down as i32 {
            return Err(ramsnap_common::status::failed_precondition(
                "VM_NOT_RUNNING",
                &r.vm_id,
                format!("vm {} is not running on this host", r.vm_id),
            ));
        }
        let mut client = self
            .inner
            .storage
            .lock()
            .unwrap()
            .clone()
            .expect("storage attached");
        let listed = client
            .list_volumes(storage::ListVolumesRequest {
                domain_id: top.domain_id.clone(),
                image_id: top.image_id.clone(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .volumes;
        let id = |v: &storage::Volume| v.r#ref.as_ref().map(|r| r.volume_id.clone()).unwrap_or_default();
        let child = listed
            .iter()
            .find(|v| v.parent_volume_id == top.volume_id)
            .map(id);
        let top_listed = listed.iter().any(|v| id(v) == top.volume_id);
        let path = |r: common::VolumeRef| {
            let mut c = client.clone();
            async move {
                let p = c
                    .prepare_volume(storage::PrepareVolumeRequest {
                        r#ref: Some(r.clone()),
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .path;
                c.teardown_volume(storage::TeardownVolumeRequest { r#ref: Some(r) })
                    .await?;
                Ok::<_, Status>(std::path::PathBuf::from(p))
            }
        };
        let qemu_img = |args: Vec<String>| -> Result<(), Status> {
            let out = std::process::Command::new("qemu-img")
                .args(&args)
                .output()
                .map_err(|e| Status::internal(e.to_string()))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(Status::internal(String::from_utf8_lossy(&out.stderr).to_string()))
            }
        };
        let reads_base = |p: &std::path::Path| {
            let out = std::process::Command::new("qemu-img")
                .args(["info", "-U", "--output=json"])
                .arg(p)
                .output()
                .ok()?;
            let info: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            Some(info["backing-filename"].as_str()? == base.volume_id)
        };
        let child_ref = child.clone().map(|c| common::VolumeRef {
            volume_id: c,
            ..top.clone()
        });
        let done_earlier = match &child_ref {
            Some(c) => reads_base(&path(c.clone()).await?).unwrap_or(false),
            None => !top_listed,
        };
        if !done_earlier {
            if !top_listed {
                return Err(ramsnap_common::status::failed_precondition(
                    "VOLUME_NOT_IN_CHAIN",
                    "top",
                    "top is not in the chain",
                ));
            }
            let top_path = path(top.clone()).await?;
            qemu_img(vec![
                "commit".into(),
                "-q".into(),
                "-d".into(),
                top_path.display().to_string(),
            ])?;
            if let Some(c) = &child_ref {
                let c_path = path(c.clone()).await?;
                qemu_img(vec![
                    "rebase".into(),
                    "-u".into(),
                    "-q".into(),
                    "-f".into(),
                    "qcow2".into(),
                    "-b".into(),
                    base.volume_id.clone(),
                    "-F".into(),
                    "qcow2".into(),
                    c_path.display().to_string(),
                ])?;
            }
        }
        self.record(HostCall::Commit {
            vm_id: r.vm_id.clone(),
            top,
            base,
            done_earlier,
        });
        Ok(Response::new(host::CommitVolumeResponse {
            was_leaf: child_ref.is_none(),
            done_earlier,
            duration_ms: 0,
            bytes: 0,
        }))
    }

    async fn suspend_vm(
        &self,
        req: Request<host::SuspendVmRequest>,
    ) -> Result<Response<host::SuspendVmResponse>, Status> {
        // As the HostService contract says: a VM that runs is saved and
        // stopped; a retry finds it saved; otherwise VM_NOT_RUNNING.
        let r = req.into_inner();
        self.record(HostCall::Suspend {
            vm_id: r.vm_id.clone(),
            disks: r.disks.clone(),
            memory: r.memory.clone(),
        });
        let saved = (r.snapshot_id.clone(), r.memory.clone());
        if self.status(&r.vm_id) != host::VmStatus::Up as i32 {
            if self.inner.suspended.lock().unwrap().get(&r.vm_id) == Some(&saved) {
                return Ok(Response::new(host::SuspendVmResponse {
                    dump_bytes: 0,
                    dump_checksum: String::new(),
                    duration_ms: 0,
                    saved_earlier: true,
                }));
            }
            return Err(ramsnap_common::status::failed_precondition(
                "VM_NOT_RUNNING",
                &r.vm_id,
                format!("vm {} is not running on this host", r.vm_id),
            ));
        }
        self.set_status(&r.vm_id, host::VmStatus::Down);
        self.inner
            .suspended
            .lock()
            .unwrap()
            .insert(r.vm_id.clone(), saved);
        Ok(Response::new(host::SuspendVmResponse {
            dump_bytes: 0,
            dump_checksum: String::new(),
            duration_ms: 0,
            saved_earlier: false,
        }))
    }

    async fn forget_vm(
        &self,
        req: Request<host::ForgetVmRequest>,
    ) -> Result<Response<host::ForgetVmResponse>, Status> {
        // As the HostService contract says: refused unless down, idempotent.
        let vm_id = req.into_inner().vm_id;
        if self.status(&vm_id) != host::VmStatus::Down as i32 {
            return Err(ramsnap_common::status::failed_precondition(
                "VM_RUNNING",
                &vm_id,
                format!("vm {vm_id} is not down on this host"),
            ));
        }
        let forgotten = self.inner.vms.lock().unwrap().remove(&vm_id).is_some();
        Ok(Response::new(host::ForgetVmResponse { forgotten }))
    }
}

pub async fn serve(set: ServiceSet) -> (String, oneshot::Sender<()>) {
    // TCP_NODELAY on the listener: Linux gives it to the accepted sockets.
    // Without it a response written in pieces waits for the client's
    // delayed ACK (40 ms) once in a while: sequential calls crawl.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_nodelay(true).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1024).unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        server::serve(listener, vec![set], async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (addr, tx)
}

// ---------------------------------------------------------------------------
// The environment: storage + simulated host on one server (the agents), the
// coordinator elsewhere (in-process or a process of its own), reached
// through the clients of an [`Env`].

/// The agents of one simulated hypervisor host: a real StorageService with
/// a FILE domain in a temporary directory, and the simulated HostService,
/// on one gRPC server. The coordinator's SQLite file goes in `dir` too.
pub struct Agents {
    pub dir: TempDir,
    pub host: SimulatedHost,
    pub storage: StorageServiceClient<Channel>,
    pub domain: String,
    /// A FILE domain with the EXPORT role, for export and import.
    pub export_domain: String,
    /// The server's address (`http://127.0.0.1:PORT`).
    pub addr: String,
    stop: oneshot::Sender<()>,
}

impl Agents {
    pub async fn start() -> Agents {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("roots/nfs1")).unwrap();
        std::fs::create_dir_all(dir.path().join("roots/export1")).unwrap();
        let config = Config {
            state_dir: dir.path().join("state"),
            run_dir: dir.path().join("run"),
            file_roots: vec![dir.path().join("roots")],
            // Never adopt the volume groups of the machine or of other tests.
            block_devices: vec![dir.path().join("no-such-device")],
        };
        let storage_impl = Storage::open(config).await.unwrap();
        let host = SimulatedHost::new();
        let set = ServiceSet::new(STORAGE_SERVICE, StorageApi::new(storage_impl).into_server())
            .with(HOST_SERVICE, HostServiceServer::new(host.clone()));
        let (addr, stop) = serve(set).await;
        let mut storage = StorageServiceClient::connect(addr.clone()).await.unwrap();
        *host.inner.storage.lock().unwrap() = Some(storage.clone());
        let domain = storage
            .register_domain(storage::RegisterDomainRequest {
                domain_id: String::new(),
                name: "nfs1".into(),
                r#type: storage::DomainType::File as i32,
                location: dir.path().join("roots/nfs1").display().to_string(),
                role: storage::DomainRole::Data as i32,
                format: storage::DomainFormat::Unspecified as i32,
            })
            .await
            .unwrap()
            .into_inner()
            .domain
            .unwrap()
            .domain_id;
        let export_domain = storage
            .register_domain(storage::RegisterDomainRequest {
                domain_id: String::new(),
                name: "export1".into(),
                r#type: storage::DomainType::File as i32,
                location: dir.path().join("roots/export1").display().to_string(),
                role: storage::DomainRole::Export as i32,
                format: storage::DomainFormat::Unspecified as i32,
            })
            .await
            .unwrap()
            .into_inner()
            .domain
            .unwrap()
            .domain_id;
        Agents {
            dir,
            host,
            storage,
            domain,
            export_domain,
            addr,
            stop,
        }
    }
}

/// The agents, and clients of the coordinator at `coordinator_addr`, with
/// a cluster and the simulated host in it. Dropping it stops the agents.
pub struct Env {
    pub dir: TempDir,
    pub host: SimulatedHost,
    pub storage: StorageServiceClient<Channel>,
    pub domain: String,
    pub export_domain: String,
    pub agent_addr: String,
    pub vms: VmServiceClient<Channel>,
    pub snaps: SnapshotServiceClient<Channel>,
    pub ops: OperationServiceClient<Channel>,
    pub clusters: ClusterServiceClient<Channel>,
    pub cluster_id: String,
    pub host_id: String,
    /// Dropped with the environment: that stops the agents' server.
    _agents_stop: oneshot::Sender<()>,
}

async fn connect(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(addr.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

impl Env {
    /// Connects to the coordinator and registers a cluster of that
    /// compatibility version with the simulated host in it.
    pub async fn new(agents: Agents, coordinator_addr: &str, compatibility: &str) -> Env {
        let channel = connect(coordinator_addr).await;
        let mut env = Env {
            dir: agents.dir,
            host: agents.host,
            storage: agents.storage,
            domain: agents.domain,
            export_domain: agents.export_domain,
            agent_addr: agents.addr,
            vms: VmServiceClient::new(channel.clone()),
            snaps: SnapshotServiceClient::new(channel.clone()),
            ops: OperationServiceClient::new(channel.clone()),
            clusters: ClusterServiceClient::new(channel),
            cluster_id: String::new(),
            host_id: String::new(),
            _agents_stop: agents.stop,
        };
        let cluster = env
            .clusters
            .create_cluster(pb::CreateClusterRequest {
                request_id: String::new(),
                name: format!("cluster-{compatibility}"),
                compatibility_version: compatibility.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .cluster
            .unwrap();
        env.cluster_id = cluster.cluster_id;
        env.host_id = env
            .clusters
            .add_host(pb::AddHostRequest {
                request_id: String::new(),
                name: "sim-host-1".into(),
                cluster_id: env.cluster_id.clone(),
                host_address: env.agent_addr.clone(),
                storage_address: env.agent_addr.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .host
            .unwrap()
            .host_id;
        env
    }

    /// Points the clients at a (restarted) coordinator.
    pub async fn reconnect(&mut self, coordinator_addr: &str) {
        let channel = connect(coordinator_addr).await;
        self.vms = VmServiceClient::new(channel.clone());
        self.snaps = SnapshotServiceClient::new(channel.clone());
        self.ops = OperationServiceClient::new(channel.clone());
        self.clusters = ClusterServiceClient::new(channel);
    }

    /// Follows the operation to its end.
    pub async fn wait(&mut self, op: Option<pb::Operation>) -> pb::Operation {
        let op = op.expect("an operation");
        let mut stream = self
            .ops
            .watch_operation(pb::WatchOperationRequest {
                operation_id: op.operation_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut last = op;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while last.state == pb::OperationState::Running as i32 {
            let msg = tokio::time::timeout_at(deadline, stream.message())
                .await
                .unwrap_or_else(|_| panic!("operation {} did not end: {last:?}", last.operation_id))
                .unwrap();
            match msg {
                Some(m) => last = m.operation.unwrap(),
                None => break,
            }
        }
        last
    }

    pub async fn ok(&mut self, op: Option<pb::Operation>) -> pb::Operation {
        let op = self.wait(op).await;
        assert_eq!(
            op.state,
            pb::OperationState::Succeeded as i32,
            "operation {} ({}) failed: {} {}",
            op.operation_id,
            op.kind,
            op.error_code,
            op.error_message
        );
        op
    }

    pub async fn create_vm_with(&mut self, name: &str, disks: usize, stateless: bool) -> String {
        let req = pb::CreateVmRequest {
            request_id: Uuid::new_v4().to_string(),
            name: name.into(),
            cluster_id: self.cluster_id.clone(),
            memory_bytes: 64 * MIB,
            vcpus: 1,
            stateless,
            disks: (0..disks)
                .map(|i| pb::DiskSpec {
                    domain_id: self.domain.clone(),
                    capacity_bytes: (32 + 16 * i as u64) * MIB,
                })
                .collect(),
            kernel: "vmlinuz".into(),
            initrd: "initrd.img".into(),
            cmdline: "console=ttyS0 root=/dev/vda".into(),
        };
        let op = self.vms.create_vm(req).await.unwrap().into_inner().operation;
        let op = self.ok(op).await;
        assert!(!op.result_vm_id.is_empty(), "{op:?}");
        op.result_vm_id
    }

    pub async fn create_vm(&mut self, name: &str) -> String {
        self.create_vm_with(name, 2, false).await
    }

    pub async fn vm(&mut self, vm_id: &str) -> pb::Vm {
        self.vms
            .get_vm(pb::GetVmRequest { vm_id: vm_id.into() })
            .await
            .unwrap()
            .into_inner()
            .vm
            .unwrap()
    }

    pub async fn wait_status(&mut self, vm_id: &str, want: pb::VmStatus) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let vm = self.vm(vm_id).await;
            if vm.status == want as i32 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "VM {vm_id} is {:?}, not {want:?}",
                pb::VmStatus::try_from(vm.status)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn run_op(&mut self, vm_id: &str, stateless: bool) -> pb::Operation {
        let op = self
            .vms
            .run_vm(pb::RunVmRequest {
                request_id: Uuid::new_v4().to_string(),
                vm_id: vm_id.into(),
                host_id: String::new(),
                run_stateless: stateless,
            })
            .await
            .unwrap()
            .into_inner()
            .operation;
        self.ok(op).await
    }

    /// Runs the VM and returns the statuses it went through from Down to UP.
    pub async fn run(&mut self, vm_id: &str, stateless: bool) -> Vec<pb::VmStatus> {
        let mut watch = self
            .vms
            .watch_vm(pb::WatchVmRequest { vm_id: vm_id.into() })
            .await
            .unwrap()
            .into_inner();
        self.run_op(vm_id, stateless).await;
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let m = tokio::time::timeout_at(deadline, watch.message())
                .await
                .expect("the VM comes up")
                .unwrap()
                .unwrap();
            let s = pb::VmStatus::try_from(m.status).unwrap();
            if seen.last() != Some(&s) {
                seen.push(s);
            }
            if s == pb::VmStatus::Up {
                assert_eq!(seen.remove(0), pb::VmStatus::Down);
                return seen;
            }
        }
    }

    pub async fn stop(&mut self, vm_id: &str) {
        let was_running = self.host.status(vm_id) != host::VmStatus::Down as i32;
        let op = self
            .vms
            .stop_vm(pb::StopVmRequest {
                request_id: Uuid::new_v4().to_string(),
                vm_id: vm_id.into(),
                graceful_timeout_seconds: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .operation;
        self.ok(op).await;
        assert_eq!(self.vm(vm_id).await.status, pb::VmStatus::Down as i32);
        assert_eq!(self.host.status(vm_id), host::VmStatus::Down as i32);
        if was_running {
            let stopped = self
                .host
                .calls()
                .iter()
                .any(|c| matches!(c, HostCall::Stop { vm_id: v } if v == vm_id));
            assert!(stopped, "the host was asked to stop {vm_id}");
        }
    }

    pub fn snapshot_req(vm_id: &str, save_memory: bool, description: &str) -> pb::CreateSnapshotRequest {
        pb::CreateSnapshotRequest {
            request_id: Uuid::new_v4().to_string(),
            vm_id: vm_id.into(),
            description: description.into(),
            save_memory,
            memory_mode: pb::MemoryMode::Paused as i32,
        }
    }

    pub async fn snapshot(&mut self, vm_id: &str, save_memory: bool, description: &str) -> String {
        let req = Env::snapshot_req(vm_id, save_memory, description);
        let op = self
            .snaps
            .create_snapshot(req)
            .await
            .unwrap()
            .into_inner()
            .operation;
        let op = self.ok(op).await;
        assert!(!op.snapshot_id.is_empty());
        // Creation times order snapshots (commit removes the newer ones).
        tokio::time::sleep(Duration::from_millis(5)).await;
        op.snapshot_id
    }

    pub async fn snapshots(&mut self, vm_id: &str) -> Vec<pb::Snapshot> {
        self.snaps
            .list_snapshots(pb::ListSnapshotsRequest {
                vm_id: vm_id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshots
    }

    pub async fn get_snapshot(&mut self, id: &str) -> Result<pb::Snapshot, Status> {
        self.snaps
            .get_snapshot(pb::GetSnapshotRequest {
                snapshot_id: id.into(),
            })
            .await
            .map(|r| r.into_inner().snapshot.unwrap())
    }

    pub async fn of_type(&mut self, vm_id: &str, t: pb::SnapshotType) -> Option<pb::Snapshot> {
        self.snapshots(vm_id)
            .await
            .into_iter()
            .find(|s| s.r#type == t as i32)
    }

    pub async fn active(&mut self, vm_id: &str) -> pb::Snapshot {
        self.of_type(vm_id, pb::SnapshotType::Active)
            .await
            .expect("an active snapshot")
    }

    pub async fn preview(
        &mut self,
        vm_id: &str,
        snapshot_id: &str,
        restore: bool,
    ) -> pb::PreviewSnapshotResponse {
        let r = self
            .snaps
            .preview_snapshot(pb::PreviewSnapshotRequest {
                request_id: Uuid::new_v4().to_string(),
                vm_id: vm_id.into(),
                snapshot_id: snapshot_id.into(),
                restore_memory: restore,
            })
            .await
            .unwrap()
            .into_inner();
        let op = self.ok(r.operation.clone()).await;
        assert_eq!(op.warnings, r.warnings);
        r
    }

    pub async fn commit(&mut self, vm_id: &str) {
        let op = self
            .snaps
            .commit_snapshot(pb::CommitSnapshotRequest {
                request_id: Uuid::new_v4().to_string(),
                vm_id: vm_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .operation;
        self.ok(op).await;
    }

    pub async fn undo(&mut self, vm_id: &str) {
        let op = self
            .snaps
            .undo_preview(pb::UndoPreviewRequest {
                request_id: Uuid::new_v4().to_string(),
                vm_id: vm_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .operation;
        self.ok(op).await;
    }

    pub async fn remove_snapshot(&mut self, vm_id: &str, snapshot_id: &str) -> Result<pb::Operation, Status> {
        let op = self
            .snaps
            .remove_snapshot(pb::RemoveSnapshotRequest {
                request_id: Uuid::new_v4().to_string(),
                vm_id: vm_id.into(),
                snapshot_id: snapshot_id.into(),
            })
            .await?
            .into_inner()
            .operation;
        Ok(self.wait(op).await)
    }

    /// Every volume of the data domain, page after page.
    pub async fn inventory(&mut self) -> Vec<storage::Volume> {
        let (mut all, mut page_token) = (Vec::new(), String::new());
        loop {
            let page = self
                .storage
                .list_volumes(storage::ListVolumesRequest {
                    domain_id: self.domain.clone(),
                    page_token,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            all.extend(page.volumes);
            if page.next_page_token.is_empty() {
                return all;
            }
            page_token = page.next_page_token;
        }
    }

    pub async fn volume_ids(&mut self) -> BTreeSet<String> {
        self.inventory()
            .await
            .into_iter()
            .map(|v| v.r#ref.unwrap().volume_id)
            .collect()
    }

    pub async fn exists(&mut self, r: &common::VolumeRef) -> bool {
        self.volume_ids().await.contains(&r.volume_id)
    }

    /// Every volume on the domain is reachable from a snapshot of some VM
    /// (a snapshot's disk volume, an ancestor of one, or its memory), and
    /// every volume a snapshot refers to exists and is LEGAL.
    pub async fn assert_no_orphans(&mut self) {
        let volumes = self.inventory().await;
        let parent: HashMap<String, String> = volumes
            .iter()
            .map(|v| (v.r#ref.clone().unwrap().volume_id, v.parent_volume_id.clone()))
            .collect();
        for v in &volumes {
            assert_eq!(v.legality, storage::VolumeLegality::Legal as i32, "{v:?}");
        }
        let vms = self
            .vms
            .list_vms(pb::ListVmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .vms;
        let mut reachable = HashSet::new();
        for vm in vms {
            for s in self.snapshots(&vm.vm_id).await {
                for d in &s.disks {
                    let mut cur = d.volume.as_ref().unwrap().volume_id.clone();
                    assert!(
                        parent.contains_key(&cur),
                        "snapshot {} ({:?}) of {} points at missing volume {cur}",
                        s.snapshot_id,
                        pb::SnapshotType::try_from(s.r#type),
                        vm.name
                    );
                    while !cur.is_empty() && reachable.insert(cur.clone()) {
                        cur = parent[&cur].clone();
                    }
                }
                if let Some(m) = &s.memory {
                    for r in [m.dump.as_ref().unwrap(), m.metadata.as_ref().unwrap()] {
                        assert!(
                            parent.contains_key(&r.volume_id),
                            "snapshot {} has missing memory volume {}",
                            s.snapshot_id,
                            r.volume_id
                        );
                        reachable.insert(r.volume_id.clone());
                    }
                }
            }
        }
        let orphans: Vec<&storage::Volume> = volumes
            .iter()
            .filter(|v| !reachable.contains(&v.r#ref.as_ref().unwrap().volume_id))
            .collect();
        assert!(orphans.is_empty(), "orphan volumes: {orphans:#?}");
    }

    /// ExportVm of the VM to this environment's export domain, followed to
    /// its end.
    pub async fn export_vm(
        &mut self,
        vm_id: &str,
        collapse: bool,
        force: bool,
    ) -> Result<pb::Operation, Status> {
        let op = self
            .vms
            .export_vm(pb::ExportVmRequest {
                request_id: Uuid::new_v4().to_string(),
                vm_id: vm_id.into(),
                export_domain_id: self.export_domain.clone(),
                collapse_snapshots: collapse,
                force_override: force,
            })
            .await?
            .into_inner()
            .operation;
        Ok(self.wait(op).await)
    }

    /// ImportVm into this environment's cluster and data domain; the
    /// response (its operation not waited for).
    pub async fn import_vm_call(
        &mut self,
        vm_id: &str,
        as_clone: bool,
        collapse: bool,
        name: &str,
    ) -> Result<pb::ImportVmResponse, Status> {
        Ok(self
            .vms
            .import_vm(pb::ImportVmRequest {
                request_id: Uuid::new_v4().to_string(),
                export_domain_id: self.export_domain.clone(),
                vm_id: vm_id.into(),
                cluster_id: self.cluster_id.clone(),
                target_domain_id: self.domain.clone(),
                as_clone,
                collapse_snapshots: collapse,
                name: name.into(),
                keep_memory: false,
            })
            .await?
            .into_inner())
    }

    pub async fn remove_vm(&mut self, vm_id: &str) {
        let op = self
            .vms
            .remove_vm(pb::RemoveVmRequest {
                request_id: Uuid::new_v4().to_string(),
                vm_id: vm_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .operation;
        self.ok(op).await;
    }

    /// The volumes on the export domain.
    pub async fn export_volumes(&mut self) -> Vec<storage::Volume> {
        self.storage
            .list_volumes(storage::ListVolumesRequest {
                domain_id: self.export_domain.clone(),
                image_id: String::new(),
                // Every volume: these tests make fewer than a page's maximum.
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volumes
    }

    /// The VM descriptors on the export domain.
    pub async fn descriptors(&mut self) -> Vec<storage::VmDescriptor> {
        self.storage
            .list_vm_descriptors(storage::ListVmDescriptorsRequest {
                domain_id: self.export_domain.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .descriptors
    }

    /// What the export domain holds: its volume ids and, as "ovf:<vm id>",
    /// its VM descriptors.
    pub async fn export_inventory(&mut self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .export_volumes()
            .await
            .into_iter()
            .map(|v| v.r#ref.unwrap().volume_id)
            .collect();
        for d in self.descriptors().await {
            out.insert(format!("ovf:{}", d.vm_id));
        }
        out
    }

    /// ListExportedVms of this environment's export domain.
    pub async fn exported_vms(&mut self) -> pb::ListExportedVmsResponse {
        self.vms
            .list_exported_vms(pb::ListExportedVmsRequest {
                export_domain_id: self.export_domain.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// The export domain's counterpart of [`Env::assert_no_orphans`]: every
    /// volume there is named by a readable descriptor, and every volume a
    /// descriptor names is there and LEGAL.
    pub async fn assert_no_export_orphans(&mut self) {
        let volumes = self.export_volumes().await;
        let present: HashMap<(String, String), &storage::Volume> = volumes
            .iter()
            .map(|v| {
                let r = v.r#ref.as_ref().unwrap();
                ((r.image_id.clone(), r.volume_id.clone()), v)
            })
            .collect();
        let mut named = HashSet::new();
        for d in self.descriptors().await {
            let ovf = ramsnap_snapshot::ovf::OvfVm::parse(&d.ovf)
                .unwrap_or_else(|e| panic!("descriptor of {} is unreadable: {e}", d.vm_id));
            let mut refs: Vec<(String, String)> = ovf
                .disks
                .iter()
                .flat_map(|disk| {
                    disk.volumes
                        .iter()
                        .map(move |v| (disk.image_id.to_string(), v.volume_id.to_string()))
                })
                .collect();
            for m in ovf.memories() {
                refs.push((m.dump_image_id.to_string(), m.dump_volume_id.to_string()));
                refs.push((m.metadata_image_id.to_string(), m.metadata_volume_id.to_string()));
            }
            for r in refs {
                let v = present.get(&r).unwrap_or_else(|| {
                    panic!("the export of {} names missing volume {}/{}", d.vm_id, r.0, r.1)
                });
                assert_eq!(v.legality, storage::VolumeLegality::Legal as i32, "{v:?}");
                named.insert(r);
            }
        }
        let orphans: Vec<&&storage::Volume> = present
            .iter()
            .filter(|(k, _)| !named.contains(*k))
            .map(|(_, v)| v)
            .collect();
        assert!(
            orphans.is_empty(),
            "orphan volumes on the export domain: {orphans:#?}"
        );
    }

    /// A VM that ran, got a snapshot with memory, and is down again.
    pub async fn vm_with_memory_snapshot(&mut self, name: &str) -> (String, String) {
        let vm = self.create_vm(name).await;
        self.run(&vm, false).await;
        let s = self.snapshot(&vm, true, "with memory").await;
        self.stop(&vm).await;
        (vm, s)
    }

    /// Export-Import's starting point: a snapshot with memory, previewed
    /// with its memory and committed, so that it and the ACTIVE snapshot
    /// both hold that memory.
    pub async fn committed_memory_vm(&mut self, name: &str) -> (String, String) {
        let (vm, s1) = self.vm_with_memory_snapshot(name).await;
        self.preview(&vm, &s1, true).await;
        self.commit(&vm).await;
        (vm, s1)
    }
}

pub fn precondition(s: &Status) -> String {
    s.get_error_details()
        .precondition_failure()
        .and_then(|p| p.violations.first().map(|v| v.r#type.clone()))
        .unwrap_or_default()
}

pub fn bad_field(s: &Status) -> String {
    s.get_error_details()
        .bad_request()
        .and_then(|b| b.field_violations.first().map(|f| f.field.clone()))
        .unwrap_or_default()
}

/// The subject of the first precondition violation.
pub fn precondition_subject(s: &Status) -> String {
    s.get_error_details()
        .precondition_failure()
        .and_then(|p| p.violations.first().map(|v| v.subject.clone()))
        .unwrap_or_default()
}

pub fn memory_ref(s: &pb::Snapshot) -> common::MemoryVolumeRef {
    s.memory.clone().expect("the snapshot has memory")
}

#[derive(Debug, PartialEq)]
pub struct State {
    pub vms: Vec<(String, String, i32, String)>,
    pub snapshots: Vec<(String, pb::Snapshot)>,
    pub volumes: BTreeSet<String>,
    /// The export domain's [`Env::export_inventory`].
    pub export: BTreeSet<String>,
}

pub async fn state(sim: &mut Env) -> State {
    let mut vms = sim
        .vms
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    let mut snapshots = Vec::new();
    for vm in &vms {
        for s in sim.snapshots(&vm.vm_id).await {
            snapshots.push((vm.name.clone(), s));
        }
    }
    State {
        vms: vms
            .into_iter()
            .map(|v| (v.name, v.vm_id, v.status, v.locked_by_operation_id))
            .collect(),
        snapshots,
        volumes: sim.volume_ids().await,
        export: sim.export_inventory().await,
    }
}

/// Sets up the VM a saga acts on; returns what the action needs.
pub async fn setup(sim: &mut Env, saga: &str) -> (String, String) {
    match saga {
        "vm_create" => (String::new(), String::new()),
        "vm_run" | "vm_export" | "vm_update" => sim.committed_memory_vm("subject").await,
        "vm_import" => {
            let (vm, s1) = sim.committed_memory_vm("subject").await;
            let op = sim.export_vm(&vm, false, false).await.unwrap();
            assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
            sim.remove_vm(&vm).await;
            (vm, s1)
        }
        "vm_stop" => {
            let (vm, s1) = sim.vm_with_memory_snapshot("subject").await;
            sim.run(&vm, true).await;
            (vm, s1)
        }
        "snapshot_create" | "vm_suspend" => {
            let vm = sim.create_vm("subject").await;
            sim.run(&vm, false).await;
            (vm, String::new())
        }
        "snapshot_remove" | "vm_remove" | "snapshot_preview" | "vm_clone" => {
            let (vm, s1) = sim.vm_with_memory_snapshot("subject").await;
            sim.snapshot(&vm, false, "s2").await;
            (vm, s1)
        }
        "snapshot_remove_live" => {
            // A running VM with s1 and s2, both with memory: s1 goes while
            // it runs, s2's volume committed into s1's.
            let vm = sim.create_vm("subject").await;
            sim.run(&vm, false).await;
            let s1 = sim.snapshot(&vm, true, "s1").await;
            sim.snapshot(&vm, true, "s2").await;
            (vm, s1)
        }
        "snapshot_undo" | "snapshot_commit" => {
            let (vm, s1) = sim.vm_with_memory_snapshot("subject").await;
            sim.run(&vm, false).await;
            sim.snapshot(&vm, true, "s2").await;
            sim.stop(&vm).await;
            sim.preview(&vm, &s1, true).await;
            (vm, s1)
        }
        other => panic!("no scenario for saga {other}"),
    }
}

pub async fn act(sim: &mut Env, saga: &str, vm: &str, snapshot: &str) -> Option<pb::Operation> {
    act_with(sim, saga, vm, snapshot, &Uuid::new_v4().to_string())
        .await
        .unwrap_or_else(|e| panic!("starting {saga}: {e:?}"))
}

/// The call that starts the saga's flow, with that request id: a retry with
/// the same id answers with the same operation.
pub async fn act_with(
    sim: &mut Env,
    saga: &str,
    vm: &str,
    snapshot: &str,
    request_id: &str,
) -> Result<Option<pb::Operation>, Status> {
    let rid = request_id.to_string();
    let (vm, snapshot) = (vm.to_string(), snapshot.to_string());
    let op = match saga {
        "vm_create" => {
            sim.vms
                .create_vm(pb::CreateVmRequest {
                    request_id: rid,
                    name: "created".into(),
                    cluster_id: sim.cluster_id.clone(),
                    memory_bytes: 64 * MIB,
                    vcpus: 1,
                    disks: (0..2)
                        .map(|_| pb::DiskSpec {
                            domain_id: sim.domain.clone(),
                            capacity_bytes: 32 * MIB,
                        })
                        .collect(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .operation
        }
        "vm_remove" => {
            sim.vms
                .remove_vm(pb::RemoveVmRequest {
                    request_id: rid,
                    vm_id: vm,
                })
                .await?
                .into_inner()
                .operation
        }
        "vm_run" => {
            sim.vms
                .run_vm(pb::RunVmRequest {
                    request_id: rid,
                    vm_id: vm,
                    host_id: String::new(),
                    run_stateless: true,
                })
                .await?
                .into_inner()
                .operation
        }
        "vm_update" => {
            // A change of the machine: the ACTIVE snapshot's memory goes.
            sim.vms
                .update_vm(pb::UpdateVmRequest {
                    request_id: rid,
                    vm_id: vm,
                    memory_bytes: Some(128 * MIB),
                    vcpus: Some(2),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .operation
        }
        "vm_suspend" => {
            sim.vms
                .suspend_vm(pb::SuspendVmRequest {
                    request_id: rid,
                    vm_id: vm,
                })
                .await?
                .into_inner()
                .operation
        }
        "vm_stop" => {
            sim.vms
                .stop_vm(pb::StopVmRequest {
                    request_id: rid,
                    vm_id: vm,
                    graceful_timeout_seconds: 0,
                })
                .await?
                .into_inner()
                .operation
        }
        "snapshot_create" => {
            sim.snaps
                .create_snapshot(pb::CreateSnapshotRequest {
                    request_id: rid,
                    save_memory: true,
                    ..Env::snapshot_req(&vm, true, "fault")
                })
                .await?
                .into_inner()
                .operation
        }
        "snapshot_remove" | "snapshot_remove_live" => {
            sim.snaps
                .remove_snapshot(pb::RemoveSnapshotRequest {
                    request_id: rid,
                    vm_id: vm,
                    snapshot_id: snapshot,
                })
                .await?
                .into_inner()
                .operation
        }
        "snapshot_preview" => {
            sim.snaps
                .preview_snapshot(pb::PreviewSnapshotRequest {
                    request_id: rid,
                    vm_id: vm,
                    snapshot_id: snapshot,
                    restore_memory: true,
                })
                .await?
                .into_inner()
                .operation
        }
        "snapshot_undo" => {
            sim.snaps
                .undo_preview(pb::UndoPreviewRequest {
                    request_id: rid,
                    vm_id: vm,
                })
                .await?
                .into_inner()
                .operation
        }
        "snapshot_commit" => {
            sim.snaps
                .commit_snapshot(pb::CommitSnapshotRequest {
                    request_id: rid,
                    vm_id: vm,
                })
                .await?
                .into_inner()
                .operation
        }
        "vm_clone" => {
            sim.snaps
                .clone_vm_from_snapshot(pb::CloneVmFromSnapshotRequest {
                    request_id: rid,
                    vm_id: vm,
                    snapshot_id: snapshot,
                    name: "cloned".into(),
                    target_domain_id: String::new(),
                    // A fork: the memory node runs too (s1 has memory).
                    keep_memory: true,
                })
                .await?
                .into_inner()
                .operation
        }
        "vm_export" => {
            sim.vms
                .export_vm(pb::ExportVmRequest {
                    request_id: rid,
                    vm_id: vm,
                    export_domain_id: sim.export_domain.clone(),
                    collapse_snapshots: false,
                    force_override: false,
                })
                .await?
                .into_inner()
                .operation
        }
        "vm_import" => {
            sim.vms
                .import_vm(pb::ImportVmRequest {
                    request_id: rid,
                    export_domain_id: sim.export_domain.clone(),
                    vm_id: vm,
                    cluster_id: sim.cluster_id.clone(),
                    target_domain_id: sim.domain.clone(),
                    as_clone: false,
                    collapse_snapshots: false,
                    name: String::new(),
                    keep_memory: false,
                })
                .await?
                .into_inner()
                .operation
        }
        other => panic!("no action for saga {other}"),
    };
    Ok(op)
}
