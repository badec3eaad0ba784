//! The coordinator's gRPC services. Handlers are thin: parse and check the
//! request (bad input and failed preconditions are answered at once, with
//! details), then either answer from the database or start an operation:
//! an operation row (idempotent under the request id), the VM's lock, and
//! a saga that does the work.
use crate::app::{db_status, vm_locked, App};
use crate::db::{self, DbError, NewOperation, OperationState};
use ramsnap_common::{ids, status};
use ramsnap_proto::snapshot::v1 as pb;
use serde_json::Value;
use std::sync::Arc;
use tonic::Status;
use uuid::Uuid;

pub mod cluster;
pub mod export;
pub mod limits;
pub mod operation;
pub mod snapshot;
pub mod vm;

pub const SERVICE_NAMES: [&str; 4] = [
    "ramsnap.snapshot.v1.ClusterService",
    "ramsnap.snapshot.v1.VmService",
    "ramsnap.snapshot.v1.SnapshotService",
    "ramsnap.snapshot.v1.OperationService",
];

/// A request that carries a `request_id`: a retry with the same id and the
/// same request is answered with the first call's outcome; the same id with
/// another request (another RPC, or other fields) is refused.
pub trait Idempotent: prost::Message + Clone {
    /// The full RPC name, part of the fingerprint.
    const RPC: &'static str;
    fn request_id(&self) -> &str;
    /// The request with its request id cleared: what the fingerprint hashes.
    fn without_request_id(&self) -> Self;
}

macro_rules! idempotent {
    ($($ty:ident => $rpc:literal,)*) => {
        $(
            impl Idempotent for pb::$ty {
                const RPC: &'static str = $rpc;
                fn request_id(&self) -> &str {
                    &self.request_id
                }
                fn without_request_id(&self) -> Self {
                    pb::$ty {
                        request_id: String::new(),
                        ..self.clone()
                    }
                }
            }
        )*
    };
}

// Every request of the API that has a request_id.
idempotent! {
    CreateClusterRequest => "ramsnap.snapshot.v1.ClusterService/CreateCluster",
    AddHostRequest => "ramsnap.snapshot.v1.ClusterService/AddHost",
    CreateVmRequest => "ramsnap.snapshot.v1.VmService/CreateVm",
    RemoveVmRequest => "ramsnap.snapshot.v1.VmService/RemoveVm",
    RunVmRequest => "ramsnap.snapshot.v1.VmService/RunVm",
    StopVmRequest => "ramsnap.snapshot.v1.VmService/StopVm",
    SuspendVmRequest => "ramsnap.snapshot.v1.VmService/SuspendVm",
    UpdateVmRequest => "ramsnap.snapshot.v1.VmService/UpdateVm",
    ExportVmRequest => "ramsnap.snapshot.v1.VmService/ExportVm",
    ImportVmRequest => "ramsnap.snapshot.v1.VmService/ImportVm",
    CreateSnapshotRequest => "ramsnap.snapshot.v1.SnapshotService/CreateSnapshot",
    RemoveSnapshotRequest => "ramsnap.snapshot.v1.SnapshotService/RemoveSnapshot",
    PreviewSnapshotRequest => "ramsnap.snapshot.v1.SnapshotService/PreviewSnapshot",
    UndoPreviewRequest => "ramsnap.snapshot.v1.SnapshotService/UndoPreview",
    CommitSnapshotRequest => "ramsnap.snapshot.v1.SnapshotService/CommitSnapshot",
    CloneVmFromSnapshotRequest => "ramsnap.snapshot.v1.SnapshotService/CloneVmFromSnapshot",
}

/// A request's idempotency key: its request id (None when not given) and
/// its fingerprint, `"<rpc>:sha256:<hex>"` of the prost-encoded request with
/// the request id cleared (prost encodes fields in field-number order, and
/// these requests have no maps: the same request always encodes the same).
#[derive(Debug, Clone)]
pub struct RequestKey {
    pub id: Option<Uuid>,
    pub fingerprint: String,
}

impl RequestKey {
    pub fn of<R: Idempotent>(req: &R) -> Result<RequestKey, Status> {
        let id = ids::parse_optional("request_id", req.request_id())?;
        Ok(RequestKey {
            id,
            fingerprint: fingerprint(req),
        })
    }
}

/// See [`RequestKey`].
pub fn fingerprint<R: Idempotent>(req: &R) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(req.without_request_id().encode_to_vec());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}:sha256:{hex}", R::RPC)
}

/// What a handler hands over to start an operation.
pub struct Start {
    pub kind: &'static str,
    /// The VM the operation is about (recorded on the operation).
    pub vm_id: Option<Uuid>,
    /// Whether the operation takes `vm_id`'s lock (not for a VM that the
    /// operation itself creates).
    pub lock_vm: bool,
    pub request: RequestKey,
    pub saga: &'static str,
    pub params: Value,
    pub warnings: Vec<String>,
}

impl Start {
    /// The usual operation: it locks `vm_id` and runs `saga` with `params`.
    pub fn locked(
        kind: &'static str,
        vm_id: Uuid,
        request: RequestKey,
        saga: &'static str,
        params: &impl serde::Serialize,
    ) -> Start {
        Start {
            kind,
            vm_id: Some(vm_id),
            lock_vm: true,
            request,
            saga,
            params: serde_json::to_value(params).expect("saga params serialize"),
            warnings: Vec::new(),
        }
    }

    pub fn with_warnings(self, warnings: Vec<String>) -> Start {
        Start { warnings, ..self }
    }
}

/// The operation a request id already started, for a retried call: it is
/// answered with that operation whatever changed since (the VM may be up
/// now because of it). ALREADY_EXISTS, naming that operation, if the id
/// started it for another request (another RPC, or other fields).
pub async fn retried_operation(
    app: &App,
    kind: &str,
    key: &RequestKey,
) -> Result<Option<db::Operation>, Status> {
    let Some(r) = key.id else {
        return Ok(None);
    };
    match app
        .db
        .get_operation_by_request_id(&r.to_string())
        .await
        .map_err(db_status)?
    {
        Some(op) => same_request(op, kind, key).map(Some),
        None => Ok(None),
    }
}

/// Runs a handler's checks and start (`start`) for a request that may be a
/// retry: when the request id already started an operation, the answer is
/// that operation, as [`retried_operation`] gives it. It is looked up only
/// when `start` fails (its checks refuse what the first call changed, or
/// the id is taken), not before every call: a new request, the usual
/// case, costs no read for it, and a retry gets the same answer as if it
/// were looked up first.
pub async fn or_retried(
    app: &App,
    kind: &str,
    key: &RequestKey,
    start: impl std::future::Future<Output = Result<db::Operation, Status>>,
) -> Result<db::Operation, Status> {
    let refused = match start.await {
        Ok(op) => return Ok(op),
        Err(refused) => refused,
    };
    match retried_operation(app, kind, key).await? {
        Some(op) => Ok(op),
        None => Err(refused),
    }
}

/// `op`, started under `key`'s request id, if it was started for the same
/// request; ALREADY_EXISTS naming it otherwise. An operation recorded
/// before fingerprints existed is compared by kind.
fn same_request(op: db::Operation, kind: &str, key: &RequestKey) -> Result<db::Operation, Status> {
    let same = match &op.request_fingerprint {
        Some(f) => *f == key.fingerprint,
        None => op.kind == kind,
    };
    if same {
        return Ok(op);
    }
    let r = key.id.map(|r| r.to_string()).unwrap_or_default();
    Err(status::already_exists(
        "operation",
        &op.id.to_string(),
        format!(
            "request_id {r} was already used by operation {} ({}) for a different request; \
             use a new request_id for a new request",
            op.id, op.kind
        ),
    ))
}

/// CLUSTER_BELOW_3_3 unless the cluster's level keeps memory (3.3 and
/// above); `needs` says what the call needed it for.
pub fn require_memory_level(cluster: &db::Cluster, needs: &str) -> Result<(), Status> {
    if cluster.compatibility_version.supports_memory_snapshots() {
        return Ok(());
    }
    Err(status::failed_precondition(
        "CLUSTER_BELOW_3_3",
        &format!("cluster/{}", cluster.id),
        format!(
            "cluster {} is at compatibility {}; {needs}",
            cluster.name, cluster.compatibility_version
        ),
    ))
}

/// FAILED_PRECONDITION VM_LOCKED, naming the holder, if an operation holds
/// the VM (checked before the VM's state, which the holder is changing).
pub fn refuse_locked(vm: &db::Vm) -> Result<(), Status> {
    match vm.lock_operation_id {
        Some(holder) => Err(vm_locked(vm.id, holder)),
        None => Ok(()),
    }
}

/// Starts an operation, or returns the one its request id already started.
/// The operation, the VM's lock, the saga and its first node's start are
/// recorded in one transaction ([`db::Database::accept_operation`]).
pub async fn start_operation(app: &Arc<App>, s: Start) -> Result<db::Operation, Status> {
    let executor = app.executor();
    let Some(first_node) = executor.first_node(s.saga) else {
        return Err(Status::internal(format!("no saga named {}", s.saga)));
    };
    let request_id = s.request.id.map(|r| r.to_string());
    let new = NewOperation {
        id: Uuid::new_v4(),
        kind: s.kind.to_string(),
        vm_id: s.vm_id,
        request_id: request_id.clone(),
        warnings: s.warnings,
    };
    // The trace of the call that starts the saga: the saga's spans (and the
    // agents' calls it makes) continue it, after a restart too.
    let mut params = s.params;
    if let (serde_json::Value::Object(map), Some(tp)) =
        (&mut params, ramsnap_common::tracecontext::current_traceparent())
    {
        map.insert(crate::saga::TRACEPARENT.into(), serde_json::Value::String(tp));
    }
    let saga = db::NewSaga {
        id: Uuid::new_v4(),
        name: s.saga.to_string(),
        params,
        owner: executor.owner().to_string(),
        operation_id: Some(new.id),
    };
    let fingerprint = request_id.as_ref().map(|_| s.request.fingerprint.as_str());
    let locked = s.vm_id.filter(|_| s.lock_vm);
    let locked_error = |holder: Uuid| {
        crate::error::Error::from_status(&vm_locked(locked.unwrap_or_default(), holder)).encode()
    };
    match app
        .db
        .accept_operation(&new, fingerprint, locked, &locked_error, &saga, first_node)
        .await
    {
        Ok(db::Accepted::Started { operation, saga }) => {
            if let Some(vm) = locked {
                app.notify_vm(vm);
            }
            executor.run_accepted(saga);
            Ok(operation)
        }
        Ok(db::Accepted::VmLocked { holder, .. }) => Err(vm_locked(locked.unwrap_or_default(), holder)),
        // The request id is taken: a retry (answered with what it started),
        // possibly racing this one, or a reuse (refused).
        Err(DbError::Conflict { .. }) if request_id.is_some() => {
            match retried_operation(app, s.kind, &s.request).await? {
                Some(op) => Ok(op),
                None => Err(Status::aborted("request id conflict; retry")),
            }
        }
        Err(e) => Err(db_status(e)),
    }
}

pub fn to_operation(op: &db::Operation) -> pb::Operation {
    let error = op.error.as_deref().map(crate::error::Error::decode);
    let result = op.result.clone().unwrap_or(Value::Null);
    let field = |k: &str| {
        result
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    pb::Operation {
        operation_id: op.id.to_string(),
        kind: op.kind.clone(),
        vm_id: op.vm_id.map(|v| v.to_string()).unwrap_or_default(),
        request_id: op.request_id.clone().unwrap_or_default(),
        state: match op.state {
            OperationState::Running => pb::OperationState::Running,
            OperationState::Succeeded => pb::OperationState::Succeeded,
            OperationState::Failed => pb::OperationState::Failed,
            OperationState::Cancelled => pb::OperationState::Cancelled,
        } as i32,
        progress: Some(ramsnap_proto::common::v1::Progress {
            processed_bytes: op.progress_processed,
            total_bytes: op.progress_total,
        }),
        error_code: error.as_ref().map(|e| e.code.clone()).unwrap_or_default(),
        error_message: error.as_ref().map(|e| e.display_message()).unwrap_or_default(),
        error_precondition: error.as_ref().map(|e| e.precondition.clone()).unwrap_or_default(),
        error_subject: error.map(|e| e.subject).unwrap_or_default(),
        snapshot_id: field("snapshot_id"),
        result_vm_id: field("vm_id"),
        warnings: op.warnings.clone(),
        created_at: op.created_at,
        updated_at: op.updated_at,
    }
}

pub fn vm_status(s: db::VmStatus) -> pb::VmStatus {
    match s {
        db::VmStatus::Down => pb::VmStatus::Down,
        db::VmStatus::PoweringUp => pb::VmStatus::PoweringUp,
        db::VmStatus::Up => pb::VmStatus::Up,
        db::VmStatus::Paused => pb::VmStatus::Paused,
        db::VmStatus::RestoringState => pb::VmStatus::RestoringState,
        db::VmStatus::SavingState => pb::VmStatus::SavingState,
        db::VmStatus::PoweringDown => pb::VmStatus::PoweringDown,
        db::VmStatus::ImageLocked => pb::VmStatus::ImageLocked,
        db::VmStatus::Suspended => pb::VmStatus::Suspended,
    }
}

/// Whether a VM in this status has a running guest.
pub fn is_running(s: db::VmStatus) -> bool {
    matches!(
        s,
        db::VmStatus::Up
            | db::VmStatus::PoweringUp
            | db::VmStatus::RestoringState
            | db::VmStatus::SavingState
            | db::VmStatus::Paused
            | db::VmStatus::PoweringDown
    )
}

pub async fn get_vm(app: &App, field: &str, value: &str) -> Result<db::Vm, Status> {
    let id = ids::parse(field, value)?;
    app.db.get_vm(id).await.map_err(db_status)
}

pub use limits::check_name;

/// The snapshot `value` names, which must be one of the VM's.
pub async fn get_vm_snapshot(app: &App, vm: &db::Vm, value: &str) -> Result<db::Snapshot, Status> {
    let id = ids::parse("snapshot_id", value)?;
    match app.db.get_snapshot(id).await {
        Ok(s) if s.vm_id == vm.id => Ok(s),
        Ok(_) => Err(status::not_found("snapshot", &format!("{id} of vm {}", vm.id))),
        Err(e) => Err(db_status(e)),
    }
}

/// FAILED_PRECONDITION VM_NOT_DOWN unless the VM is down; VM_SUSPENDED
/// for a suspended one.
pub fn require_down(vm: &db::Vm, what: &str) -> Result<(), Status> {
    refuse_suspended(vm, what)?;
    if vm.status != db::VmStatus::Down {
        return Err(status::failed_precondition(
            "VM_NOT_DOWN",
            &format!("vm/{}", vm.id),
            format!("VM {} is {}; {what} needs it down", vm.name, vm.status),
        ));
    }
    Ok(())
}

/// FAILED_PRECONDITION VM_NOT_RUNNING unless the VM is up; `only` says
/// what needs it up ("only a VM that is up can be suspended").
pub fn require_up(vm: &db::Vm, only: &str) -> Result<(), Status> {
    if vm.status != db::VmStatus::Up {
        return Err(status::failed_precondition(
            "VM_NOT_RUNNING",
            &format!("vm/{}", vm.id),
            format!("VM {} is {}; {only}", vm.name, vm.status),
        ));
    }
    Ok(())
}

/// [`require_memory_level`] for the VM's cluster (read through the
/// cluster cache).
pub async fn require_vm_memory_level(app: &App, vm: &db::Vm, needs: &str) -> Result<(), Status> {
    let cluster = app.db.cluster_cached(vm.cluster_id).await.map_err(db_status)?;
    require_memory_level(&cluster, needs)
}

/// FAILED_PRECONDITION VM_SUSPENDED when the VM is suspended: `what`
/// would change the disks its saved memory was taken with.
pub fn refuse_suspended(vm: &db::Vm, what: &str) -> Result<(), Status> {
    if vm.status == db::VmStatus::Suspended {
        return Err(status::failed_precondition(
            "VM_SUSPENDED",
            &format!("vm/{}", vm.id),
            format!(
                "VM {} is suspended (its memory is saved); {what} needs it down: run it to resume it, \
                 or stop it to discard the saved state",
                vm.name
            ),
        ));
    }
    Ok(())
}
