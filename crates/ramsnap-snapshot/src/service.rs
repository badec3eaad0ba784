//! The coordinator's gRPC services. Handlers are thin: parse and check the
//! request (bad input and failed preconditions are answered at once, with
//! details), then either answer from the database or start an operation:
//! an operation row (idempotent under the request id), the VM's lock, and
//! a saga that does the work.
use crate::app::{db_status, vm_locked, App};
use crate::db::{self, DbError, NewOperation, OperationState};
use crate::saga::code_name;
use ramsnap_common::{ids, status};
use ramsnap_proto::snapshot::v1 as pb;
use serde_json::Value;
use std::sync::Arc;
use tonic::Status;
use uuid::Uuid;

pub mod cluster;
pub mod export;
pub mod operation;
pub mod snapshot;
pub mod vm;

pub const SERVICE_NAMES: [&str; 4] = [
    "ramsnap.snapshot.v1.ClusterService",
    "ramsnap.snapshot.v1.VmService",
    "ramsnap.snapshot.v1.SnapshotService",
    "ramsnap.snapshot.v1.OperationService",
];

/// What a handler hands over to start an operation.
pub struct Start {
    pub kind: &'static str,
    /// The VM the operation is about (recorded on the operation).
    pub vm_id: Option<Uuid>,
    /// Whether the operation takes `vm_id`'s lock (not for a VM that the
    /// operation itself creates).
    pub lock_vm: bool,
    pub request_id: String,
    pub saga: &'static str,
    pub params: Value,
    pub warnings: Vec<String>,
}

impl Start {
    /// The usual operation: it locks `vm_id` and runs `saga` with `params`.
    pub fn locked(
        kind: &'static str,
        vm_id: Uuid,
        request_id: String,
        saga: &'static str,
        params: &impl serde::Serialize,
    ) -> Start {
        Start {
            kind,
            vm_id: Some(vm_id),
            lock_vm: true,
            request_id,
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
/// now because of it). ALREADY_EXISTS if the id started another kind.
pub async fn retried_operation(
    app: &App,
    kind: &str,
    request_id: &str,
) -> Result<Option<db::Operation>, Status> {
    let Some(r) = ids::parse_optional("request_id", request_id)? else {
        return Ok(None);
    };
    let r = r.to_string();
    match app.db.get_operation_by_request_id(&r).await.map_err(db_status)? {
        Some(op) if op.kind != kind => Err(status::already_exists(
            "request",
            &r,
            format!("request_id was used for a {} operation", op.kind),
        )),
        other => Ok(other),
    }
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
pub async fn start_operation(app: &Arc<App>, s: Start) -> Result<db::Operation, Status> {
    let request_id = ids::parse_optional("request_id", &s.request_id)?.map(|r| r.to_string());
    if let Some(op) = retried_operation(app, s.kind, &s.request_id).await? {
        return Ok(op);
    }
    let new = NewOperation {
        id: Uuid::new_v4(),
        kind: s.kind.to_string(),
        vm_id: s.vm_id,
        request_id: request_id.clone(),
        warnings: s.warnings,
    };
    let op = match app.db.create_operation(&new).await {
        Ok(op) => op,
        // Two retries racing: the other one made it.
        Err(DbError::Conflict { .. }) if request_id.is_some() => {
            return app
                .db
                .get_operation_by_request_id(request_id.as_deref().unwrap_or_default())
                .await
                .map_err(db_status)?
                .ok_or_else(|| Status::aborted("request id conflict; retry"));
        }
        Err(e) => return Err(db_status(e)),
    };
    let locked = s.vm_id.filter(|_| s.lock_vm);
    if let Some(vm) = locked {
        if let Err(e) = app.db.try_lock_vm(vm, op.id).await {
            let status = match e {
                DbError::VmLocked { vm_id, holder } => vm_locked(vm_id, holder),
                e => db_status(e),
            };
            let msg = format!("{}: {}", code_name(status.code()), status.message());
            let _ = app
                .db
                .finish_operation(op.id, OperationState::Failed, Some(&msg), None)
                .await;
            return Err(status);
        }
        app.notify_vm(vm);
    }
    if let Err(e) = app.executor().start(s.saga, s.params, op.id).await {
        if let Some(vm) = locked {
            let _ = app.db.unlock_vm(vm, op.id).await;
        }
        let msg = format!("{}: {}", code_name(e.code()), e.message());
        let _ = app
            .db
            .finish_operation(op.id, OperationState::Failed, Some(&msg), None)
            .await;
        return Err(e);
    }
    app.db.get_operation(op.id).await.map_err(db_status)
}

pub fn to_operation(op: &db::Operation) -> pb::Operation {
    let (error_code, error_message) = match &op.error {
        Some(e) => match e.split_once(": ") {
            Some((c, m)) if c.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_') => {
                (c.to_string(), m.to_string())
            }
            _ => ("UNKNOWN".to_string(), e.clone()),
        },
        None => (String::new(), String::new()),
    };
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
        error_code,
        error_message,
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

/// A name of a VM (or cluster, host): 1-128 printable characters.
pub fn check_name(field: &str, name: &str) -> Result<(), Status> {
    if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control()) {
        return Err(status::invalid_argument(
            field,
            "must be 1-128 printable characters",
        ));
    }
    Ok(())
}

/// The snapshot `value` names, which must be one of the VM's.
pub async fn get_vm_snapshot(app: &App, vm: &db::Vm, value: &str) -> Result<db::Snapshot, Status> {
    let id = ids::parse("snapshot_id", value)?;
    match app.db.get_snapshot(id).await {
        Ok(s) if s.vm_id == vm.id => Ok(s),
        Ok(_) => Err(status::not_found("snapshot", &format!("{id} of vm {}", vm.id))),
        Err(e) => Err(db_status(e)),
    }
}

/// FAILED_PRECONDITION VM_NOT_DOWN unless the VM is down.
pub fn require_down(vm: &db::Vm, what: &str) -> Result<(), Status> {
    if vm.status != db::VmStatus::Down {
        return Err(status::failed_precondition(
            "VM_NOT_DOWN",
            &format!("vm/{}", vm.id),
            format!("VM {} is {}; {what} needs it down", vm.name, vm.status),
        ));
    }
    Ok(())
}
