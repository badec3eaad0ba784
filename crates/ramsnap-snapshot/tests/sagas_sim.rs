//! Simulation tests of the coordinator's sagas: the real coordinator (SQLite
//! in a temporary file) over real gRPC, a real StorageService in-process on
//! a FILE domain in a temporary directory, and a SIMULATED HostService
//! ([`SimulatedHost`]) that records what it is asked, reports the statuses
//! a real host reports (RESTORING_STATE then UP when it restores memory,
//! POWERING_UP then UP when it boots) and takes snapshots without a guest.
//! After each flow the storage inventory is checked against the database:
//! every volume is reachable from a snapshot, and every volume a snapshot
//! needs exists.
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
use ramsnap_snapshot::app::App;
use ramsnap_snapshot::db::Database;
use ramsnap_snapshot::saga::{Executor, Failpoints};
use ramsnap_snapshot::{sagas, status, Coordinator};
use ramsnap_storage::service::{StorageApi, SERVICE_NAME as STORAGE_SERVICE};
use ramsnap_storage::{Config, Storage};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tempfile::TempDir;
use tokio::sync::{oneshot, watch, Notify};
use tokio_stream::Stream;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tonic_types::StatusExt;
use uuid::Uuid;

const MIB: u64 = 1024 * 1024;
const HOST_SERVICE: &str = "ramsnap.host.v1.HostService";
/// Simulated boot (or restore) time: long enough for watchers to see the
/// transitional status.
const UP_DELAY: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------
// The simulated host.

/// What the coordinator asked the simulated host.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a test's call log
enum HostCall {
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
        memory: bool,
        memory_saved: bool,
    },
}

/// A HostService without libvirt: VMs are status machines. RunVm checks
/// that every disk volume (and the memory to restore) exists on storage, as
/// a real host preparing them would; SnapshotVm checks the overlays and
/// reports `memory_saved` when it was given memory and the cluster is 3.3+.
#[derive(Clone)]
struct SimulatedHost {
    inner: Arc<SimInner>,
}

struct SimInner {
    storage: Mutex<Option<StorageServiceClient<Channel>>>,
    vms: Mutex<HashMap<String, watch::Sender<i32>>>,
    calls: Mutex<Vec<HostCall>>,
    /// While set, SnapshotVm waits for it to be notified.
    snapshot_gate: Mutex<Option<Arc<Notify>>>,
    /// Refuse the next restore as a real host does when the memory's
    /// metadata does not match the disks.
    refuse_restore: Mutex<bool>,
}

impl SimulatedHost {
    fn new() -> SimulatedHost {
        SimulatedHost {
            inner: Arc::new(SimInner {
                storage: Mutex::new(None),
                vms: Mutex::new(HashMap::new()),
                calls: Mutex::new(Vec::new()),
                snapshot_gate: Mutex::new(None),
                refuse_restore: Mutex::new(false),
            }),
        }
    }

    fn calls(&self) -> Vec<HostCall> {
        self.inner.calls.lock().unwrap().clone()
    }

    fn runs(&self, vm_id: &str) -> Vec<HostCall> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c, HostCall::Run { vm_id: v, .. } if v == vm_id))
            .collect()
    }

    fn last_run(&self, vm_id: &str) -> HostCall {
        self.runs(vm_id).pop().expect("the host ran the VM")
    }

    fn status(&self, vm_id: &str) -> i32 {
        self.inner
            .vms
            .lock()
            .unwrap()
            .get(vm_id)
            .map(|s| *s.borrow())
            .unwrap_or(host::VmStatus::Down as i32)
    }

    fn set_status(&self, vm_id: &str, status: host::VmStatus) {
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
            return Err(Status::failed_precondition("the VM is already running"));
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
        let vm_id = req.into_inner().vm_id;
        if !self.inner.vms.lock().unwrap().contains_key(&vm_id) {
            return Err(Status::not_found(format!("vm {vm_id}")));
        }
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
            vms: vms
                .iter()
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

    async fn snapshot_vm(
        &self,
        req: Request<host::SnapshotVmRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let req = req.into_inner();
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
        self.record(HostCall::Snapshot {
            vm_id: req.vm_id.clone(),
            memory,
            memory_saved,
        });
        let gate = self.inner.snapshot_gate.lock().unwrap().clone();
        let stream = async_stream::stream! {
            yield Ok(host::SnapshotVmResponse {
                progress: Some(common::Progress { processed_bytes: 0, total_bytes: 1 }),
                result: None,
            });
            if let Some(g) = gate {
                g.notified().await;
            }
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
}

// ---------------------------------------------------------------------------
// The environment: storage + simulated host on one server, the coordinator
// on another.

struct Sim {
    _dir: TempDir,
    db_url: String,
    host: SimulatedHost,
    storage: StorageServiceClient<Channel>,
    domain: String,
    app: Arc<App>,
    vms: VmServiceClient<Channel>,
    snaps: SnapshotServiceClient<Channel>,
    ops: OperationServiceClient<Channel>,
    clusters: ClusterServiceClient<Channel>,
    cluster_id: String,
    host_id: String,
    stops: Vec<oneshot::Sender<()>>,
    coordinator_stop: Option<oneshot::Sender<()>>,
}

async fn serve(set: ServiceSet) -> (String, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
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

/// The coordinator as `Coordinator::open` makes it, but with failpoints
/// given here (the environment variable is process-wide).
async fn open_coordinator(db_url: &str, failpoints: &str) -> Coordinator {
    let db = Database::connect(db_url).await.unwrap();
    db.migrate().await.unwrap();
    let app = App::new(db.clone());
    let notify_app = Arc::downgrade(&app);
    let exec = Executor::new(
        db,
        app.clone(),
        sagas::all(),
        Failpoints::parse(failpoints),
        Arc::new(move |op| {
            if let Some(app) = notify_app.upgrade() {
                app.notify_operation(op);
            }
        }),
    );
    app.set_executor(exec.clone());
    exec.recover().await.unwrap();
    status::follow_running(&app).await;
    Coordinator { app }
}

impl Sim {
    async fn start(compatibility: &str) -> Sim {
        Sim::start_with(compatibility, "").await
    }

    async fn start_with(compatibility: &str, failpoints: &str) -> Sim {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("roots/nfs1")).unwrap();
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
        let (agent_addr, agent_stop) = serve(set).await;
        let mut storage = StorageServiceClient::connect(agent_addr.clone()).await.unwrap();
        *host.inner.storage.lock().unwrap() = Some(storage.clone());
        let domain = storage
            .register_domain(storage::RegisterDomainRequest {
                domain_id: String::new(),
                name: "nfs1".into(),
                r#type: storage::DomainType::File as i32,
                location: dir.path().join("roots/nfs1").display().to_string(),
            })
            .await
            .unwrap()
            .into_inner()
            .domain
            .unwrap()
            .domain_id;
        let db_url = format!("sqlite:{}", dir.path().join("coordinator.db").display());
        let coordinator = open_coordinator(&db_url, failpoints).await;
        let (addr, coordinator_stop) = serve(coordinator.service_set()).await;
        let channel = tonic::transport::Endpoint::from_shared(addr)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut sim = Sim {
            _dir: dir,
            db_url,
            host,
            storage,
            domain,
            app: coordinator.app.clone(),
            vms: VmServiceClient::new(channel.clone()),
            snaps: SnapshotServiceClient::new(channel.clone()),
            ops: OperationServiceClient::new(channel.clone()),
            clusters: ClusterServiceClient::new(channel),
            cluster_id: String::new(),
            host_id: String::new(),
            stops: vec![agent_stop],
            coordinator_stop: Some(coordinator_stop),
        };
        let cluster = sim
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
        sim.cluster_id = cluster.cluster_id;
        sim.host_id = sim
            .clusters
            .add_host(pb::AddHostRequest {
                request_id: String::new(),
                name: "sim-host-1".into(),
                cluster_id: sim.cluster_id.clone(),
                host_address: agent_addr.clone(),
                storage_address: agent_addr,
            })
            .await
            .unwrap()
            .into_inner()
            .host
            .unwrap()
            .host_id;
        sim
    }

    /// Restarts the coordinator on the same database, with these failpoints
    /// (the setup of a scenario runs without them).
    async fn restart_coordinator(&mut self, failpoints: &str) {
        for vm in self.app.db.list_vms().await.unwrap() {
            status::unfollow(&self.app, vm.id);
        }
        if let Some(stop) = self.coordinator_stop.take() {
            let _ = stop.send(());
        }
        let coordinator = open_coordinator(&self.db_url, failpoints).await;
        let (addr, stop) = serve(coordinator.service_set()).await;
        let channel = tonic::transport::Endpoint::from_shared(addr)
            .unwrap()
            .connect()
            .await
            .unwrap();
        self.app = coordinator.app.clone();
        self.vms = VmServiceClient::new(channel.clone());
        self.snaps = SnapshotServiceClient::new(channel.clone());
        self.ops = OperationServiceClient::new(channel.clone());
        self.clusters = ClusterServiceClient::new(channel);
        self.coordinator_stop = Some(stop);
    }

    /// Follows the operation to its end.
    async fn wait(&mut self, op: Option<pb::Operation>) -> pb::Operation {
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

    async fn ok(&mut self, op: Option<pb::Operation>) -> pb::Operation {
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

    async fn create_vm_with(&mut self, name: &str, disks: usize, stateless: bool) -> String {
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

    async fn create_vm(&mut self, name: &str) -> String {
        self.create_vm_with(name, 2, false).await
    }

    async fn vm(&mut self, vm_id: &str) -> pb::Vm {
        self.vms
            .get_vm(pb::GetVmRequest { vm_id: vm_id.into() })
            .await
            .unwrap()
            .into_inner()
            .vm
            .unwrap()
    }

    async fn wait_status(&mut self, vm_id: &str, want: pb::VmStatus) {
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

    async fn run_op(&mut self, vm_id: &str, stateless: bool) -> pb::Operation {
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
    async fn run(&mut self, vm_id: &str, stateless: bool) -> Vec<pb::VmStatus> {
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

    async fn stop(&mut self, vm_id: &str) {
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

    fn snapshot_req(vm_id: &str, save_memory: bool, description: &str) -> pb::CreateSnapshotRequest {
        pb::CreateSnapshotRequest {
            request_id: Uuid::new_v4().to_string(),
            vm_id: vm_id.into(),
            description: description.into(),
            save_memory,
            memory_mode: pb::MemoryMode::Paused as i32,
        }
    }

    async fn snapshot(&mut self, vm_id: &str, save_memory: bool, description: &str) -> String {
        let req = Sim::snapshot_req(vm_id, save_memory, description);
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

    async fn snapshots(&mut self, vm_id: &str) -> Vec<pb::Snapshot> {
        self.snaps
            .list_snapshots(pb::ListSnapshotsRequest { vm_id: vm_id.into() })
            .await
            .unwrap()
            .into_inner()
            .snapshots
    }

    async fn get_snapshot(&mut self, id: &str) -> Result<pb::Snapshot, Status> {
        self.snaps
            .get_snapshot(pb::GetSnapshotRequest {
                snapshot_id: id.into(),
            })
            .await
            .map(|r| r.into_inner().snapshot.unwrap())
    }

    async fn of_type(&mut self, vm_id: &str, t: pb::SnapshotType) -> Option<pb::Snapshot> {
        self.snapshots(vm_id)
            .await
            .into_iter()
            .find(|s| s.r#type == t as i32)
    }

    async fn active(&mut self, vm_id: &str) -> pb::Snapshot {
        self.of_type(vm_id, pb::SnapshotType::Active)
            .await
            .expect("an active snapshot")
    }

    async fn preview(
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

    async fn commit(&mut self, vm_id: &str) {
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

    async fn undo(&mut self, vm_id: &str) {
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

    async fn remove_snapshot(&mut self, vm_id: &str, snapshot_id: &str) -> Result<pb::Operation, Status> {
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

    async fn inventory(&mut self) -> Vec<storage::Volume> {
        self.storage
            .list_volumes(storage::ListVolumesRequest {
                domain_id: self.domain.clone(),
                image_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .volumes
    }

    async fn volume_ids(&mut self) -> BTreeSet<String> {
        self.inventory()
            .await
            .into_iter()
            .map(|v| v.r#ref.unwrap().volume_id)
            .collect()
    }

    async fn exists(&mut self, r: &common::VolumeRef) -> bool {
        self.volume_ids().await.contains(&r.volume_id)
    }

    /// Every volume on the domain is reachable from a snapshot of some VM
    /// (a snapshot's disk volume, an ancestor of one, or its memory), and
    /// every volume a snapshot refers to exists and is LEGAL.
    async fn assert_no_orphans(&mut self) {
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

    /// A VM that ran, got a snapshot with memory, and is down again.
    async fn vm_with_memory_snapshot(&mut self, name: &str) -> (String, String) {
        let vm = self.create_vm(name).await;
        self.run(&vm, false).await;
        let s = self.snapshot(&vm, true, "with memory").await;
        self.stop(&vm).await;
        (vm, s)
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(s) = self.coordinator_stop.take() {
            let _ = s.send(());
        }
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
    }
}

fn precondition(s: &Status) -> String {
    s.get_error_details()
        .precondition_failure()
        .and_then(|p| p.violations.first().map(|v| v.r#type.clone()))
        .unwrap_or_default()
}

fn bad_field(s: &Status) -> String {
    s.get_error_details()
        .bad_request()
        .and_then(|b| b.field_violations.first().map(|f| f.field.clone()))
        .unwrap_or_default()
}

fn memory_ref(s: &pb::Snapshot) -> common::MemoryVolumeRef {
    s.memory.clone().expect("the snapshot has memory")
}

// ---------------------------------------------------------------------------
// The flows.

#[tokio::test]
async fn simulation_create_vm_validates_and_makes_base_volumes() {
    let mut sim = Sim::start("3.3").await;
    let good = |sim: &Sim| pb::CreateVmRequest {
        request_id: String::new(),
        name: "web".into(),
        cluster_id: sim.cluster_id.clone(),
        memory_bytes: 64 * MIB,
        vcpus: 1,
        stateless: false,
        disks: vec![pb::DiskSpec {
            domain_id: sim.domain.clone(),
            capacity_bytes: 32 * MIB,
        }],
        kernel: String::new(),
        initrd: String::new(),
        cmdline: String::new(),
    };
    type Edit = fn(&mut pb::CreateVmRequest);
    let invalid: [(Edit, &str); 7] = [
        (|r| r.name.clear(), "name"),
        (|r| r.memory_bytes = 0, "memory_bytes"),
        (|r| r.vcpus = 0, "vcpus"),
        (|r| r.disks.clear(), "disks"),
        (|r| r.disks[0].capacity_bytes = 0, "disks[0].capacity_bytes"),
        (|r| r.disks[0].domain_id = "nope".into(), "disks[0].domain_id"),
        (|r| r.kernel = "../vmlinuz".into(), "kernel"),
    ];
    for (edit, field) in invalid {
        let mut req = good(&sim);
        edit(&mut req);
        let err = sim.vms.create_vm(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert_eq!(bad_field(&err), field);
    }
    let mut req = good(&sim);
    req.initrd = "boot/initrd".into();
    assert_eq!(bad_field(&sim.vms.create_vm(req).await.unwrap_err()), "initrd");
    let mut req = good(&sim);
    req.cluster_id = Uuid::new_v4().to_string();
    assert_eq!(sim.vms.create_vm(req).await.unwrap_err().code(), Code::NotFound);
    let mut req = good(&sim);
    req.disks[0].domain_id = Uuid::new_v4().to_string();
    assert_eq!(sim.vms.create_vm(req).await.unwrap_err().code(), Code::NotFound);
    assert!(sim.inventory().await.is_empty());

    let vm_id = sim.create_vm_with("db", 3, false).await;
    let vm = sim.vm(&vm_id).await;
    assert_eq!(vm.status, pb::VmStatus::Down as i32);
    assert_eq!(vm.disks.len(), 3);
    // The disks keep the order they were given in (vda, vdb, vdc).
    let capacities: Vec<u64> = vm.disks.iter().map(|d| d.capacity_bytes).collect();
    assert_eq!(capacities, vec![32 * MIB, 48 * MIB, 64 * MIB]);
    assert_eq!(
        (vm.kernel.as_str(), vm.initrd.as_str()),
        ("vmlinuz", "initrd.img")
    );
    let active = sim.active(&vm_id).await;
    assert!(!active.has_memory);
    let volumes = sim.inventory().await;
    assert_eq!(volumes.len(), 3);
    for v in &volumes {
        assert_eq!(v.format, storage::VolumeFormat::Cow as i32);
        assert!(v.parent_volume_id.is_empty());
        let r = v.r#ref.as_ref().unwrap();
        assert!(vm
            .disks
            .iter()
            .any(|d| d.image_id == r.image_id && d.leaf_volume_id == r.volume_id));
    }
    let err = sim
        .vms
        .create_vm(pb::CreateVmRequest {
            name: "db".into(),
            ..good(&sim)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_snapshot_with_and_without_memory() {
    let mut sim = Sim::start("3.3").await;
    let vm = sim.create_vm("app").await;
    // A down VM's memory cannot be saved.
    let err = sim
        .snaps
        .create_snapshot(Sim::snapshot_req(&vm, true, "x"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), precondition(&err).as_str()),
        (Code::FailedPrecondition, "VM_NOT_RUNNING")
    );
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses.first(), Some(&pb::VmStatus::PoweringUp), "{statuses:?}");
    assert!(!statuses.contains(&pb::VmStatus::RestoringState));
    let HostCall::Run {
        restore_memory,
        name,
        kernel,
        disks,
        ..
    } = sim.host.last_run(&vm)
    else {
        unreachable!()
    };
    assert!(restore_memory.is_none());
    assert!(name.starts_with("ramsnap-"));
    assert_eq!(kernel, "vmlinuz");
    let vm_info = sim.vm(&vm).await;
    let leaves: Vec<String> = vm_info.disks.iter().map(|d| d.leaf_volume_id.clone()).collect();
    assert_eq!(
        disks.iter().map(|d| d.volume_id.clone()).collect::<Vec<_>>(),
        leaves
    );
    assert_eq!(vm_info.host_id, sim.host_id);

    // Test case 1: with memory.
    let with = sim.snapshot(&vm, true, "with memory").await;
    let s = sim.get_snapshot(&with).await.unwrap();
    assert!(s.has_memory);
    assert!(sim.exists(memory_ref(&s).dump.as_ref().unwrap()).await);
    // Test case 2: without memory.
    let without = sim.snapshot(&vm, false, "disk only").await;
    assert!(!sim.get_snapshot(&without).await.unwrap().has_memory);
    let snaps: Vec<(bool, bool)> = sim
        .host
        .calls()
        .iter()
        .filter_map(|c| match c {
            HostCall::Snapshot {
                vm_id,
                memory,
                memory_saved,
            } if *vm_id == vm => Some((*memory, *memory_saved)),
            _ => None,
        })
        .collect();
    assert_eq!(snaps, vec![(true, true), (false, false)]);
    // ListSnapshots: oldest first, the active one last.
    let list = sim.snapshots(&vm).await;
    assert_eq!(list.len(), 3);
    assert_eq!(list[0].snapshot_id, with);
    assert_eq!(list[2].r#type, pb::SnapshotType::Active as i32);
    assert!(!list[2].has_memory);
    sim.assert_no_orphans().await;
    // A running VM's snapshot cannot be removed (no live merge).
    let err = sim.remove_snapshot(&vm, &with).await.unwrap_err();
    assert_eq!(precondition(&err), "VM_NOT_DOWN");
    sim.stop(&vm).await;
    // Stopping a down VM succeeds.
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_below_3_3_refuses_memory_and_ignores_restore() {
    let mut sim = Sim::start("3.2").await;
    let vm = sim.create_vm("legacy").await;
    sim.run(&vm, false).await;
    // Test case 3: no Save Memory below 3.3; a disk-only snapshot works.
    let err = sim
        .snaps
        .create_snapshot(Sim::snapshot_req(&vm, true, "x"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), precondition(&err).as_str()),
        (Code::FailedPrecondition, "CLUSTER_BELOW_3_3")
    );
    let s = sim.snapshot(&vm, false, "disk only").await;
    assert!(!sim.get_snapshot(&s).await.unwrap().has_memory);
    sim.stop(&vm).await;

    // A snapshot with memory in a 3.2 cluster (as an import would bring):
    // preview test case 3, the restore is ignored with a warning.
    let mut storage = sim.storage.clone();
    let mem = storage
        .create_memory_volumes(storage::CreateMemoryVolumesRequest {
            request_id: Uuid::new_v4().to_string(),
            domain_id: sim.domain.clone(),
            memory_bytes: 64 * MIB,
            mode: storage::MemoryDumpMode::Paused as i32,
            description: "imported".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let r = |v: &storage::Volume| {
        let r = v.r#ref.clone().unwrap();
        ramsnap_snapshot::db::VolumeRef {
            domain_id: r.domain_id.parse().unwrap(),
            image_id: r.image_id.parse().unwrap(),
            volume_id: r.volume_id.parse().unwrap(),
        }
    };
    let memory = ramsnap_snapshot::db::MemoryVolume {
        dump: r(mem.dump.as_ref().unwrap()),
        metadata: r(mem.metadata.as_ref().unwrap()),
    };
    sim.app.db.set_memory(s.parse().unwrap(), &memory).await.unwrap();
    let preview = sim.preview(&vm, &s, true).await;
    assert_eq!(preview.warnings.len(), 1, "{:?}", preview.warnings);
    assert!(preview.warnings[0].contains("3.3"), "{:?}", preview.warnings);
    assert!(!sim.active(&vm).await.has_memory);
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses.first(), Some(&pb::VmStatus::PoweringUp), "{statuses:?}");
    let HostCall::Run { restore_memory, .. } = sim.host.last_run(&vm) else {
        unreachable!()
    };
    assert!(restore_memory.is_none());
    sim.stop(&vm).await;
    sim.undo(&vm).await;
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_preview_with_restore_then_run_restores_once() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.vm_with_memory_snapshot("restore").await;
    let s1_snap = sim.get_snapshot(&s1).await.unwrap();
    let before = sim.active(&vm).await;
    // Preview test case 1: restore memory.
    let r = sim.preview(&vm, &s1, true).await;
    assert!(r.warnings.is_empty());
    let op = r.operation.unwrap();
    assert_eq!(op.kind, "preview_snapshot");
    assert_eq!(sim.vm(&vm).await.status, pb::VmStatus::Down as i32);
    let active = sim.active(&vm).await;
    assert_eq!(
        active.memory, s1_snap.memory,
        "the new ACTIVE points at the snapshot's memory"
    );
    assert_ne!(active.snapshot_id, before.snapshot_id);
    let preview = sim.of_type(&vm, pb::SnapshotType::Preview).await.unwrap();
    assert_eq!(preview.snapshot_id, before.snapshot_id);
    let previewed = sim.get_snapshot(&s1).await.unwrap();
    assert_eq!(previewed.status, pb::SnapshotStatus::InPreview as i32);
    // The new leaves branch off the snapshot's volumes.
    let volumes = sim.inventory().await;
    for (d, sd) in active.disks.iter().zip(&s1_snap.disks) {
        let leaf = volumes
            .iter()
            .find(|v| v.r#ref.as_ref().unwrap().volume_id == d.volume.as_ref().unwrap().volume_id)
            .unwrap();
        assert_eq!(leaf.parent_volume_id, sd.volume.as_ref().unwrap().volume_id);
    }
    sim.assert_no_orphans().await;
    // No second preview, no removal while in preview.
    let err = sim
        .snaps
        .preview_snapshot(pb::PreviewSnapshotRequest {
            request_id: String::new(),
            vm_id: vm.clone(),
            snapshot_id: s1.clone(),
            restore_memory: false,
        })
        .await
        .unwrap_err();
    assert_eq!(precondition(&err), "SNAPSHOT_IN_PREVIEW");
    assert_eq!(
        precondition(&sim.remove_snapshot(&vm, &s1).await.unwrap_err()),
        "SNAPSHOT_IN_PREVIEW"
    );

    // Run: RESTORING_STATE then UP, from the snapshot's memory.
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses, vec![pb::VmStatus::RestoringState, pb::VmStatus::Up]);
    let HostCall::Run { restore_memory, .. } = sim.host.last_run(&vm) else {
        unreachable!()
    };
    assert_eq!(restore_memory, s1_snap.memory);
    // Cleared from the ACTIVE snapshot; the previewed snapshot keeps it.
    assert!(!sim.active(&vm).await.has_memory);
    assert!(sim.get_snapshot(&s1).await.unwrap().has_memory);
    assert!(sim.exists(memory_ref(&s1_snap).dump.as_ref().unwrap()).await);
    sim.stop(&vm).await;
    // The second run boots.
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses[0], pb::VmStatus::PoweringUp, "{statuses:?}");
    let HostCall::Run { restore_memory, .. } = sim.host.last_run(&vm) else {
        unreachable!()
    };
    assert!(restore_memory.is_none());
    sim.stop(&vm).await;

    // Undo: back to the state before the preview, its leaves gone.
    sim.undo(&vm).await;
    let active = sim.active(&vm).await;
    assert_eq!(active.snapshot_id, before.snapshot_id);
    assert_eq!(active.disks, before.disks);
    assert!(sim.of_type(&vm, pb::SnapshotType::Preview).await.is_none());
    assert_eq!(
        sim.get_snapshot(&s1).await.unwrap().status,
        pb::SnapshotStatus::Ok as i32
    );
    assert!(sim.exists(memory_ref(&s1_snap).dump.as_ref().unwrap()).await);
    sim.assert_no_orphans().await;
    let err = sim
        .snaps
        .undo_preview(pb::UndoPreviewRequest {
            request_id: String::new(),
            vm_id: vm.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(precondition(&err), "VM_NOT_IN_PREVIEW");
}

#[tokio::test]
async fn simulation_preview_without_restore_boots() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.vm_with_memory_snapshot("boots").await;
    // Preview test case 2.
    let r = sim.preview(&vm, &s1, false).await;
    assert!(r.warnings.is_empty());
    assert!(!sim.active(&vm).await.has_memory);
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses, vec![pb::VmStatus::PoweringUp, pb::VmStatus::Up]);
    let HostCall::Run { restore_memory, .. } = sim.host.last_run(&vm) else {
        unreachable!()
    };
    assert!(restore_memory.is_none());
    sim.stop(&vm).await;
    // Commit test case 2: the active snapshot appears without memory.
    sim.commit(&vm).await;
    assert!(!sim.active(&vm).await.has_memory);
    sim.assert_no_orphans().await;

    // Restore asked for a snapshot without memory: ignored, with a warning.
    let disk_only = sim.snapshot(&vm, false, "disk only").await;
    let r = sim.preview(&vm, &disk_only, true).await;
    assert_eq!(r.warnings.len(), 1);
    assert!(r.warnings[0].contains("no memory"), "{:?}", r.warnings);
    sim.undo(&vm).await;
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_commit_keeps_active_memory_and_removes_newer_snapshots() {
    let mut sim = Sim::start("3.3").await;
    let vm = sim.create_vm("commit").await;
    sim.run(&vm, false).await;
    let s1 = sim.snapshot(&vm, true, "s1").await;
    let s2 = sim.snapshot(&vm, true, "s2").await;
    let s3 = sim.snapshot(&vm, false, "s3").await;
    sim.stop(&vm).await;
    let s1_snap = sim.get_snapshot(&s1).await.unwrap();
    let s2_snap = sim.get_snapshot(&s2).await.unwrap();
    sim.preview(&vm, &s1, true).await;
    // Commit test case 1: the active snapshot appears with memory.
    sim.commit(&vm).await;
    let op = sim.app.db.list_operations(None).await.unwrap();
    assert!(op.iter().any(|o| o.kind == "commit_snapshot"));
    let active = sim.active(&vm).await;
    assert_eq!(active.memory, s1_snap.memory);
    let left: Vec<String> = sim
        .snapshots(&vm)
        .await
        .into_iter()
        .map(|s| s.snapshot_id)
        .collect();
    assert_eq!(left, vec![s1.clone(), active.snapshot_id.clone()]);
    for gone in [&s2, &s3] {
        assert_eq!(sim.get_snapshot(gone).await.unwrap_err().code(), Code::NotFound);
    }
    // The newer snapshots' memory went; the committed one's stays.
    assert!(!sim.exists(memory_ref(&s2_snap).dump.as_ref().unwrap()).await);
    assert!(!sim.exists(memory_ref(&s2_snap).metadata.as_ref().unwrap()).await);
    assert!(sim.exists(memory_ref(&s1_snap).dump.as_ref().unwrap()).await);
    sim.assert_no_orphans().await;
    assert_eq!(sim.vm(&vm).await.status, pb::VmStatus::Down as i32);

    // Run VM test case 1: restores, then boots.
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses[0], pb::VmStatus::RestoringState, "{statuses:?}");
    assert!(!sim.active(&vm).await.has_memory);
    sim.stop(&vm).await;
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses[0], pb::VmStatus::PoweringUp, "{statuses:?}");
    sim.stop(&vm).await;
    // s1 still holds its memory; removing it deletes the memory volumes.
    assert!(sim.exists(memory_ref(&s1_snap).dump.as_ref().unwrap()).await);
    let op = sim.remove_snapshot(&vm, &s1).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    assert_eq!(op.snapshot_id, s1);
    assert!(!sim.exists(memory_ref(&s1_snap).dump.as_ref().unwrap()).await);
    assert!(!sim.exists(memory_ref(&s1_snap).metadata.as_ref().unwrap()).await);
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_remove_snapshot_keeps_memory_the_active_shares() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.vm_with_memory_snapshot("shared").await;
    let s1_snap = sim.get_snapshot(&s1).await.unwrap();
    sim.preview(&vm, &s1, true).await;
    sim.commit(&vm).await;
    // The ACTIVE snapshot shares s1's memory: removing s1 keeps it.
    let op = sim.remove_snapshot(&vm, &s1).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    let dump = memory_ref(&s1_snap).dump.unwrap();
    assert!(sim.exists(&dump).await);
    assert_eq!(sim.active(&vm).await.memory, s1_snap.memory);
    sim.assert_no_orphans().await;
    // The first run restores it; nothing refers to it after: deleted.
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses[0], pb::VmStatus::RestoringState, "{statuses:?}");
    let HostCall::Run { restore_memory, .. } = sim.host.last_run(&vm) else {
        unreachable!()
    };
    assert_eq!(restore_memory, s1_snap.memory);
    assert!(!sim.exists(&dump).await);
    assert!(!sim.active(&vm).await.has_memory);
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_stateless_runs_restore_every_time() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.vm_with_memory_snapshot("stateless").await;
    let s1_snap = sim.get_snapshot(&s1).await.unwrap();
    sim.preview(&vm, &s1, true).await;
    // A stateless run is refused in preview.
    let err = sim
        .vms
        .run_vm(pb::RunVmRequest {
            request_id: String::new(),
            vm_id: vm.clone(),
            host_id: String::new(),
            run_stateless: true,
        })
        .await
        .unwrap_err();
    assert_eq!(precondition(&err), "VM_IN_PREVIEW");
    sim.commit(&vm).await;
    let committed = sim.active(&vm).await;
    // Run VM test case 2: every stateless run restores.
    for round in 0..2 {
        let statuses = sim.run(&vm, true).await;
        assert_eq!(
            statuses[0],
            pb::VmStatus::RestoringState,
            "round {round}: {statuses:?}"
        );
        let HostCall::Run {
            restore_memory,
            disks,
            ..
        } = sim.host.last_run(&vm)
        else {
            unreachable!()
        };
        assert_eq!(restore_memory, s1_snap.memory, "round {round}");
        let stateless = sim.of_type(&vm, pb::SnapshotType::Stateless).await.unwrap();
        assert_eq!(stateless.snapshot_id, committed.snapshot_id);
        assert_eq!(stateless.memory, s1_snap.memory);
        let active = sim.active(&vm).await;
        assert!(!active.has_memory, "the run's ACTIVE snapshot dropped the memory");
        // The run writes to overlays over the committed state.
        for (d, c) in disks.iter().zip(&committed.disks) {
            assert_ne!(d.volume_id, c.volume.as_ref().unwrap().volume_id);
        }
        // No snapshot of a VM that runs stateless (oVirt).
        let err = sim
            .snaps
            .create_snapshot(Sim::snapshot_req(&vm, false, "x"))
            .await
            .unwrap_err();
        assert_eq!(precondition(&err), "VM_RUNNING_STATELESS");
        sim.assert_no_orphans().await;
        sim.stop(&vm).await;
        let back = sim.active(&vm).await;
        assert_eq!(back.snapshot_id, committed.snapshot_id);
        assert_eq!(back.disks, committed.disks);
        assert_eq!(back.memory, s1_snap.memory);
        assert!(sim.of_type(&vm, pb::SnapshotType::Stateless).await.is_none());
        sim.assert_no_orphans().await;
    }
    // A stateless run that ends without StopVm (the guest shut down) is
    // put back before the next run.
    sim.run(&vm, true).await;
    sim.host.set_status(&vm, host::VmStatus::Down);
    sim.wait_status(&vm, pb::VmStatus::Down).await;
    assert!(sim.of_type(&vm, pb::SnapshotType::Stateless).await.is_some());
    // A normal run: restores once, and the memory (still s1's) stays.
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses[0], pb::VmStatus::RestoringState, "{statuses:?}");
    assert!(sim.of_type(&vm, pb::SnapshotType::Stateless).await.is_none());
    assert!(!sim.active(&vm).await.has_memory);
    assert!(sim.exists(memory_ref(&s1_snap).dump.as_ref().unwrap()).await);
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;

    // A VM created stateless runs stateless every time.
    let st = sim.create_vm_with("always-stateless", 1, true).await;
    let base = sim.active(&st).await;
    sim.run(&st, false).await;
    assert!(sim.of_type(&st, pb::SnapshotType::Stateless).await.is_some());
    sim.stop(&st).await;
    assert_eq!(sim.active(&st).await.disks, base.disks);
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_refused_restore_boots_and_drops_the_memory() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.vm_with_memory_snapshot("refused").await;
    let s1_snap = sim.get_snapshot(&s1).await.unwrap();
    sim.preview(&vm, &s1, true).await;
    sim.commit(&vm).await;
    *sim.host.inner.refuse_restore.lock().unwrap() = true;
    let op = sim.run_op(&vm, false).await;
    assert_eq!(op.warnings.len(), 1, "{op:?}");
    assert!(op.warnings[0].contains("refused to restore"), "{op:?}");
    sim.wait_status(&vm, pb::VmStatus::Up).await;
    let HostCall::Run { restore_memory, .. } = sim.host.last_run(&vm) else {
        unreachable!()
    };
    assert!(restore_memory.is_none(), "it booted");
    // The ACTIVE snapshot's memory is gone; the snapshot keeps its own.
    assert!(!sim.active(&vm).await.has_memory);
    assert_eq!(sim.get_snapshot(&s1).await.unwrap().memory, s1_snap.memory);
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}

/// Writes `pattern` at `offset` into a volume's file (a qcow2 on the FILE
/// domain), as a guest would.
async fn write_pattern(sim: &mut Sim, r: &common::VolumeRef, offset: u64, pattern: u8) {
    let path = prepare(sim, r).await;
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P {pattern} {offset} 64k"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    teardown(sim, r).await;
}

/// Whether the volume reads `pattern` at `offset`.
async fn reads_pattern(sim: &mut Sim, r: &common::VolumeRef, offset: u64, pattern: u8) -> bool {
    let path = prepare(sim, r).await;
    let out = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c"])
        .arg(format!("read -P {pattern} {offset} 64k"))
        .arg(&path)
        .output()
        .unwrap();
    teardown(sim, r).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !stdout.contains("Pattern verification failed")
}

async fn prepare(sim: &mut Sim, r: &common::VolumeRef) -> PathBuf {
    PathBuf::from(
        sim.storage
            .prepare_volume(storage::PrepareVolumeRequest {
                r#ref: Some(r.clone()),
            })
            .await
            .unwrap()
            .into_inner()
            .path,
    )
}

async fn teardown(sim: &mut Sim, r: &common::VolumeRef) {
    sim.storage
        .teardown_volume(storage::TeardownVolumeRequest {
            r#ref: Some(r.clone()),
        })
        .await
        .unwrap();
}

fn leaf(vm: &pb::Vm) -> common::VolumeRef {
    let d = &vm.disks[0];
    common::VolumeRef {
        domain_id: d.domain_id.clone(),
        image_id: d.image_id.clone(),
        volume_id: d.leaf_volume_id.clone(),
    }
}

#[tokio::test]
async fn simulation_remove_snapshot_merges_and_keeps_content() {
    let mut sim = Sim::start("3.3").await;
    let vm = sim.create_vm_with("merge", 1, false).await;
    // Content written at each stage, on a down VM.
    let v = sim.vm(&vm).await;
    write_pattern(&mut sim, &leaf(&v), 0, 0xa1).await;
    let s1 = sim.snapshot(&vm, false, "s1").await;
    let v = sim.vm(&vm).await;
    write_pattern(&mut sim, &leaf(&v), 65536, 0xb2).await;
    let s2 = sim.snapshot(&vm, false, "s2").await;
    let v = sim.vm(&vm).await;
    write_pattern(&mut sim, &leaf(&v), 131072, 0xc3).await;
    let leaf_before = leaf(&sim.vm(&vm).await);
    let s2_volume = sim.get_snapshot(&s2).await.unwrap().disks[0]
        .volume
        .clone()
        .unwrap();
    assert_eq!(sim.inventory().await.len(), 3);

    // Refusals: the ACTIVE snapshot, another VM's snapshot, a running VM.
    let active = sim.active(&vm).await;
    let err = sim.remove_snapshot(&vm, &active.snapshot_id).await.unwrap_err();
    assert_eq!(precondition(&err), "SNAPSHOT_NOT_REGULAR");
    let other = sim.create_vm_with("other", 1, false).await;
    let err = sim.remove_snapshot(&other, &s1).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Remove the middle snapshot: its volume merges into the leaf.
    let op = sim.remove_snapshot(&vm, &s2).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    assert_eq!(op.kind, "remove_snapshot");
    assert_eq!(sim.get_snapshot(&s2).await.unwrap_err().code(), Code::NotFound);
    assert!(!sim.exists(&s2_volume).await);
    let now = leaf(&sim.vm(&vm).await);
    assert_eq!(now, leaf_before, "the ACTIVE snapshot keeps its leaf");
    for (offset, pattern) in [(0, 0xa1), (65536, 0xb2), (131072, 0xc3)] {
        assert!(reads_pattern(&mut sim, &now, offset, pattern).await, "{offset}");
    }
    sim.assert_no_orphans().await;
    // Then the oldest: the leaf becomes the whole disk.
    let op = sim.remove_snapshot(&vm, &s1).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    let volumes: Vec<storage::Volume> = sim
        .inventory()
        .await
        .into_iter()
        .filter(|v| v.r#ref.as_ref().unwrap().image_id == now.image_id)
        .collect();
    assert_eq!(volumes.len(), 1);
    assert!(volumes[0].parent_volume_id.is_empty());
    for (offset, pattern) in [(0, 0xa1), (65536, 0xb2), (131072, 0xc3)] {
        assert!(reads_pattern(&mut sim, &now, offset, pattern).await, "{offset}");
    }
    assert_eq!(sim.vm(&vm).await.status, pb::VmStatus::Down as i32);
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_clone_from_snapshot_warns_and_boots() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.vm_with_memory_snapshot("source").await;
    let clone_req = |name: &str, snapshot: &str| pb::CloneVmFromSnapshotRequest {
        request_id: Uuid::new_v4().to_string(),
        vm_id: vm.clone(),
        snapshot_id: snapshot.into(),
        name: name.into(),
        target_domain_id: String::new(),
    };
    let active = sim.active(&vm).await;
    let err = sim
        .snaps
        .clone_vm_from_snapshot(clone_req("c0", &active.snapshot_id))
        .await
        .unwrap_err();
    assert_eq!(precondition(&err), "SNAPSHOT_IS_ACTIVE");
    let err = sim
        .snaps
        .clone_vm_from_snapshot(clone_req("source", &s1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    let r = sim
        .snaps
        .clone_vm_from_snapshot(clone_req("clone", &s1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.warnings,
        vec!["the snapshot's memory is discarded: the new VM boots".to_string()]
    );
    let op = sim.ok(r.operation).await;
    assert_eq!(op.kind, "clone_vm");
    assert_eq!(op.warnings, r.warnings);
    assert_eq!(
        op.progress.as_ref().map(|p| p.processed_bytes),
        Some((32 + 48) * MIB)
    );
    let clone = op.result_vm_id.clone();
    let c = sim.vm(&clone).await;
    assert_eq!(c.name, "clone");
    assert_eq!(c.disks.len(), 2);
    assert_eq!(c.memory_bytes, 64 * MIB);
    let capacities: Vec<u64> = c.disks.iter().map(|d| d.capacity_bytes).collect();
    assert_eq!(capacities, vec![32 * MIB, 48 * MIB]);
    let snaps = sim.snapshots(&clone).await;
    assert_eq!(snaps.len(), 1);
    assert!(!snaps[0].has_memory);
    // Standalone copies in images of their own.
    let source = sim.vm(&vm).await;
    for d in &c.disks {
        assert!(source.disks.iter().all(|s| s.image_id != d.image_id));
        let vols: Vec<storage::Volume> = sim
            .inventory()
            .await
            .into_iter()
            .filter(|v| v.r#ref.as_ref().unwrap().image_id == d.image_id)
            .collect();
        assert_eq!(vols.len(), 1);
        assert!(vols[0].parent_volume_id.is_empty());
    }
    assert!(source.locked_by_operation_id.is_empty());
    sim.assert_no_orphans().await;
    // The clone boots.
    let statuses = sim.run(&clone, false).await;
    assert_eq!(statuses[0], pb::VmStatus::PoweringUp);
    // A snapshot without memory clones without a warning.
    let s2 = sim.snapshot(&clone, false, "disk only").await;
    let r = sim.snaps.clone_vm_from_snapshot(pb::CloneVmFromSnapshotRequest {
        vm_id: clone.clone(),
        ..clone_req("clone-of-clone", &s2)
    });
    let r = r.await.unwrap().into_inner();
    assert!(r.warnings.is_empty());
    sim.ok(r.operation).await;
    sim.stop(&clone).await;
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_vm_locked_error_names_the_holder() {
    let mut sim = Sim::start("3.3").await;
    let vm = sim.create_vm("locked").await;
    sim.run(&vm, false).await;
    let gate = Arc::new(Notify::new());
    *sim.host.inner.snapshot_gate.lock().unwrap() = Some(gate.clone());
    let op = sim
        .snaps
        .create_snapshot(Sim::snapshot_req(&vm, true, "slow"))
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    // Wait until the host is taking it (the lock is held).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !sim
        .host
        .calls()
        .iter()
        .any(|c| matches!(c, HostCall::Snapshot { .. }))
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sim.vm(&vm).await.locked_by_operation_id, op.operation_id);
    let err = sim
        .vms
        .stop_vm(pb::StopVmRequest {
            request_id: Uuid::new_v4().to_string(),
            vm_id: vm.clone(),
            graceful_timeout_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(precondition(&err), "VM_LOCKED");
    assert!(err.message().contains(&op.operation_id), "{}", err.message());
    let err = sim
        .snaps
        .create_snapshot(Sim::snapshot_req(&vm, false, "second"))
        .await
        .unwrap_err();
    assert_eq!(precondition(&err), "VM_LOCKED");
    gate.notify_one();
    *sim.host.inner.snapshot_gate.lock().unwrap() = None;
    sim.ok(Some(op)).await;
    assert!(sim.vm(&vm).await.locked_by_operation_id.is_empty());
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_request_id_retries_return_the_same_operation() {
    let mut sim = Sim::start("3.3").await;
    let request_id = Uuid::new_v4().to_string();
    let create = pb::CreateVmRequest {
        request_id: request_id.clone(),
        name: "retried".into(),
        cluster_id: sim.cluster_id.clone(),
        memory_bytes: 64 * MIB,
        vcpus: 2,
        stateless: false,
        disks: vec![pb::DiskSpec {
            domain_id: sim.domain.clone(),
            capacity_bytes: 32 * MIB,
        }],
        ..Default::default()
    };
    let first = sim
        .vms
        .create_vm(create.clone())
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    let second = sim
        .vms
        .create_vm(create.clone())
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    assert_eq!(first.operation_id, second.operation_id);
    let done = sim.ok(Some(first.clone())).await;
    // After the end too (the name is taken now: still the same operation).
    let third = sim
        .vms
        .create_vm(create)
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    assert_eq!(third.operation_id, first.operation_id);
    assert_eq!(third.result_vm_id, done.result_vm_id);
    let vm = done.result_vm_id;
    assert_eq!(sim.inventory().await.len(), 1, "one VM's volumes, made once");

    let run_id = Uuid::new_v4().to_string();
    let run = pb::RunVmRequest {
        request_id: run_id.clone(),
        vm_id: vm.clone(),
        ..Default::default()
    };
    let a = sim
        .vms
        .run_vm(run.clone())
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    sim.ok(Some(a.clone())).await;
    sim.wait_status(&vm, pb::VmStatus::Up).await;
    // The VM is up now; the retry still answers with the run.
    let b = sim.vms.run_vm(run).await.unwrap().into_inner().operation.unwrap();
    assert_eq!(a.operation_id, b.operation_id);
    assert_eq!(sim.host.runs(&vm).len(), 1);
    // Without the request id it is a new call, refused.
    let err = sim
        .vms
        .run_vm(pb::RunVmRequest {
            vm_id: vm.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(precondition(&err), "VM_NOT_DOWN");
    // A request id used for another kind of operation.
    let err = sim
        .vms
        .stop_vm(pb::StopVmRequest {
            request_id: run_id,
            vm_id: vm.clone(),
            graceful_timeout_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let snap_req = Sim::snapshot_req(&vm, true, "once");
    let x = sim
        .snaps
        .create_snapshot(snap_req.clone())
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    let y = sim
        .snaps
        .create_snapshot(snap_req)
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    assert_eq!(x.operation_id, y.operation_id);
    sim.ok(Some(x)).await;
    assert_eq!(sim.snapshots(&vm).await.len(), 2);
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_remove_vm_deletes_everything() {
    let mut sim = Sim::start("3.3").await;
    let keep = sim.create_vm_with("keep", 1, false).await;
    let (vm, _s1) = sim.vm_with_memory_snapshot("doomed").await;
    sim.snapshot(&vm, false, "s2").await;
    sim.run(&vm, false).await;
    let remove = |vm: &str| pb::RemoveVmRequest {
        request_id: Uuid::new_v4().to_string(),
        vm_id: vm.into(),
    };
    let err = sim.vms.remove_vm(remove(&vm)).await.unwrap_err();
    assert_eq!(precondition(&err), "VM_NOT_DOWN");
    sim.stop(&vm).await;
    let op = sim
        .vms
        .remove_vm(remove(&vm))
        .await
        .unwrap()
        .into_inner()
        .operation;
    let op = sim.ok(op).await;
    assert_eq!(op.kind, "remove_vm");
    let err = sim
        .vms
        .get_vm(pb::GetVmRequest { vm_id: vm.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Only the other VM's volume is left.
    let left = sim.inventory().await;
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(
        left[0].r#ref.as_ref().unwrap().volume_id,
        sim.vm(&keep).await.disks[0].leaf_volume_id
    );
    sim.assert_no_orphans().await;
}

// ---------------------------------------------------------------------------
// Fault injection: an error at every node of every saga. A reversible node
// unwinds the saga (the earlier nodes' undo fails once too and is retried)
// and leaves everything as it was; a node past the point of no return is
// retried and the saga completes.

#[derive(Debug, PartialEq)]
struct State {
    vms: Vec<(String, String, i32, String)>,
    snapshots: Vec<(String, pb::Snapshot)>,
    volumes: BTreeSet<String>,
}

async fn state(sim: &mut Sim) -> State {
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
    }
}

/// Sets up the VM a saga acts on; returns what the action needs.
async fn setup(sim: &mut Sim, saga: &str) -> (String, String) {
    match saga {
        "vm_create" => (String::new(), String::new()),
        "vm_run" => {
            let (vm, s1) = sim.vm_with_memory_snapshot("subject").await;
            sim.preview(&vm, &s1, true).await;
            sim.commit(&vm).await;
            (vm, s1)
        }
        "vm_stop" => {
            let (vm, s1) = sim.vm_with_memory_snapshot("subject").await;
            sim.run(&vm, true).await;
            (vm, s1)
        }
        "snapshot_create" => {
            let vm = sim.create_vm("subject").await;
            sim.run(&vm, false).await;
            (vm, String::new())
        }
        "snapshot_remove" | "vm_remove" | "snapshot_preview" | "vm_clone" => {
            let (vm, s1) = sim.vm_with_memory_snapshot("subject").await;
            sim.snapshot(&vm, false, "s2").await;
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

async fn act(sim: &mut Sim, saga: &str, vm: &str, snapshot: &str) -> Option<pb::Operation> {
    let rid = Uuid::new_v4().to_string();
    let (vm, snapshot) = (vm.to_string(), snapshot.to_string());
    match saga {
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
                .await
                .unwrap()
                .into_inner()
                .operation
        }
        "vm_remove" => {
            sim.vms
                .remove_vm(pb::RemoveVmRequest {
                    request_id: rid,
                    vm_id: vm,
                })
                .await
                .unwrap()
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
                .await
                .unwrap()
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
                .await
                .unwrap()
                .into_inner()
                .operation
        }
        "snapshot_create" => {
            sim.snaps
                .create_snapshot(pb::CreateSnapshotRequest {
                    request_id: rid,
                    save_memory: true,
                    ..Sim::snapshot_req(&vm, true, "fault")
                })
                .await
                .unwrap()
                .into_inner()
                .operation
        }
        "snapshot_remove" => {
            sim.snaps
                .remove_snapshot(pb::RemoveSnapshotRequest {
                    request_id: rid,
                    vm_id: vm,
                    snapshot_id: snapshot,
                })
                .await
                .unwrap()
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
                .await
                .unwrap()
                .into_inner()
                .operation
        }
        "snapshot_undo" => {
            sim.snaps
                .undo_preview(pb::UndoPreviewRequest {
                    request_id: rid,
                    vm_id: vm,
                })
                .await
                .unwrap()
                .into_inner()
                .operation
        }
        "snapshot_commit" => {
            sim.snaps
                .commit_snapshot(pb::CommitSnapshotRequest {
                    request_id: rid,
                    vm_id: vm,
                })
                .await
                .unwrap()
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
                })
                .await
                .unwrap()
                .into_inner()
                .operation
        }
        other => panic!("no action for saga {other}"),
    }
}

/// For each node of the saga: a fresh environment, the scenario's setup,
/// then the action with an error injected at the node.
async fn fault_at_every_node(saga_name: &str) {
    let def = sagas::all()
        .into_iter()
        .find(|d| d.name == saga_name)
        .expect("a saga of that name");
    let nodes: Vec<(&'static str, bool)> = def.nodes.iter().map(|n| (n.name, n.undo.is_some())).collect();
    for (i, (node, reversible)) in nodes.iter().enumerate() {
        let mut sim = Sim::start("3.3").await;
        let (vm, snapshot) = setup(&mut sim, saga_name).await;
        sim.assert_no_orphans().await;
        let before = state(&mut sim).await;
        let mut points = vec![format!("{saga_name}.{node}=error")];
        if *reversible {
            // Every undo that runs before it fails once, and is retried.
            points.extend(
                nodes[..i]
                    .iter()
                    .filter(|(_, r)| *r)
                    .map(|(n, _)| format!("{saga_name}.{n}=undo_error")),
            );
        }
        sim.restart_coordinator(&points.join(",")).await;
        let op = act(&mut sim, saga_name, &vm, &snapshot).await;
        let op = sim.wait(op).await;
        let what = format!("{saga_name}.{node} (reversible: {reversible})");
        if *reversible {
            assert_eq!(op.state, pb::OperationState::Failed as i32, "{what}: {op:?}");
            assert!(op.error_message.contains("injected failure"), "{what}: {op:?}");
            let after = state(&mut sim).await;
            assert_eq!(before, after, "{what}: not unwound cleanly");
        } else {
            assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{what}: {op:?}");
            let after = state(&mut sim).await;
            assert!(
                after.vms.iter().all(|v| v.3.is_empty()),
                "{what}: a VM is still locked"
            );
        }
        sim.assert_no_orphans().await;
    }
}

#[tokio::test]
async fn simulation_faults_vm_create() {
    fault_at_every_node("vm_create").await;
}

#[tokio::test]
async fn simulation_faults_vm_remove() {
    fault_at_every_node("vm_remove").await;
}

#[tokio::test]
async fn simulation_faults_vm_run() {
    fault_at_every_node("vm_run").await;
}

#[tokio::test]
async fn simulation_faults_vm_stop() {
    fault_at_every_node("vm_stop").await;
}

#[tokio::test]
async fn simulation_faults_snapshot_create() {
    fault_at_every_node("snapshot_create").await;
}

#[tokio::test]
async fn simulation_faults_snapshot_remove() {
    fault_at_every_node("snapshot_remove").await;
}

#[tokio::test]
async fn simulation_faults_snapshot_preview() {
    fault_at_every_node("snapshot_preview").await;
}

#[tokio::test]
async fn simulation_faults_snapshot_undo() {
    fault_at_every_node("snapshot_undo").await;
}

#[tokio::test]
async fn simulation_faults_snapshot_commit() {
    fault_at_every_node("snapshot_commit").await;
}

#[tokio::test]
async fn simulation_faults_vm_clone() {
    fault_at_every_node("vm_clone").await;
}
