//! SnapshotService: snapshots of a VM and the operations on them.
use super::vm::{check_data_domains, refuse_taken_name};
use super::{
    check_name, get_vm, get_vm_snapshot, is_running, limits, or_retried, refuse_locked, refuse_suspended,
    require_down, require_up, require_vm_memory_level, start_operation, to_operation, RequestKey, Start,
};
use crate::app::{db_status, App};
use crate::convert::{to_wire_memory, to_wire_ref};
use crate::db::{self, SnapshotStatus, SnapshotType};
use crate::sagas::snapshot_create::{self, MemoryMode};
use crate::sagas::{
    snapshot_commit, snapshot_preview, snapshot_remove, snapshot_remove_live, snapshot_undo, vm_clone,
};
use ramsnap_common::paging::{self, PageRequest};
use ramsnap_common::{ids, status};
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::snapshot_service_server::SnapshotService;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// The warning of a clone from a snapshot with memory (oVirt's popup).
pub const CLONE_MEMORY_WARNING: &str = "the snapshot's memory is discarded: the new VM boots";
/// The response's warning for a fork (keep_memory).
pub const FORK_IDENTITY_WARNING: &str = "the clone resumes from the snapshot's memory with the source's identity inside the guest (addresses, host name, machine id): change them in the guest before both VMs share a network";

pub struct SnapshotApi(pub Arc<App>);

pub fn to_snapshot(s: &db::Snapshot) -> pb::Snapshot {
    pb::Snapshot {
        snapshot_id: s.id.to_string(),
        vm_id: s.vm_id.to_string(),
        r#type: match s.snapshot_type {
            SnapshotType::Active => pb::SnapshotType::Active,
            SnapshotType::Regular => pb::SnapshotType::Regular,
            SnapshotType::Preview => pb::SnapshotType::Preview,
            SnapshotType::Stateless => pb::SnapshotType::Stateless,
        } as i32,
        status: match s.status {
            SnapshotStatus::Ok => pb::SnapshotStatus::Ok,
            SnapshotStatus::Locked => pb::SnapshotStatus::Locked,
            SnapshotStatus::InPreview => pb::SnapshotStatus::InPreview,
        } as i32,
        description: s.description.clone(),
        created_at: s.created_at,
        has_memory: s.memory.is_some(),
        memory: s.memory.as_ref().map(to_wire_memory),
        disks: s
            .disks
            .iter()
            .map(|d| pb::SnapshotDisk {
                disk_id: d.disk_id.to_string(),
                volume: Some(to_wire_ref(&d.volume)),
            })
            .collect(),
    }
}

/// Whether the VM is previewing a snapshot.
pub async fn in_preview(app: &App, vm: &db::Vm) -> Result<bool, Status> {
    Ok(app
        .db
        .snapshot_by_vm_type(vm.id, SnapshotType::Preview)
        .await
        .map_err(db_status)?
        .is_some())
}

/// FAILED_PRECONDITION VM_NOT_IN_PREVIEW unless the VM previews a snapshot.
async fn require_in_preview(app: &App, vm: &db::Vm) -> Result<(), Status> {
    if !in_preview(app, vm).await? {
        return Err(status::failed_precondition(
            "VM_NOT_IN_PREVIEW",
            &format!("vm/{}", vm.id),
            format!("VM {} is not previewing a snapshot", vm.name),
        ));
    }
    Ok(())
}

/// FAILED_PRECONDITION VM_IN_PREVIEW or VM_RUNNING_STATELESS (in that
/// order) if the VM previews a snapshot or runs stateless (`state`, read
/// with the VM).
fn refuse_preview_or_stateless(vm: &db::Vm, state: db::VmSnapshotState, what: &str) -> Result<(), Status> {
    if state.in_preview {
        return Err(in_preview_status(vm, what));
    }
    if state.stateless_run {
        return Err(stateless_status(vm, what));
    }
    Ok(())
}

fn stateless_status(vm: &db::Vm, what: &str) -> Status {
    status::failed_precondition(
        "VM_RUNNING_STATELESS",
        &format!("vm/{}", vm.id),
        format!(
            "VM {} runs stateless (or its stateless run was not ended); stop it with StopVm before {what}",
            vm.name
        ),
    )
}

/// Refuses to change the snapshots of a VM that runs stateless (oVirt:
/// VM_RUNNING_STATELESS), or whose stateless run ended without StopVm.
async fn refuse_stateless(app: &App, vm: &db::Vm, what: &str) -> Result<(), Status> {
    let stateless = app
        .db
        .snapshot_by_vm_type(vm.id, SnapshotType::Stateless)
        .await
        .map_err(db_status)?;
    if stateless.is_some() {
        return Err(stateless_status(vm, what));
    }
    Ok(())
}

/// A snapshot that can be removed or previewed: REGULAR and OK.
fn require_regular_ok(s: &db::Snapshot, what: &str) -> Result<(), Status> {
    let subject = format!("snapshot/{}", s.id);
    let why = match s.snapshot_type {
        SnapshotType::Regular => None,
        SnapshotType::Active => Some("it is the active snapshot: the VM's current state"),
        SnapshotType::Preview => Some("it is the state before the preview; commit or undo the preview"),
        SnapshotType::Stateless => Some("it is the state a stateless run returns to; stop the VM"),
    };
    if let Some(why) = why {
        return Err(status::failed_precondition(
            "SNAPSHOT_NOT_REGULAR",
            &subject,
            format!("snapshot {} cannot be {what}: {why}", s.id),
        ));
    }
    match s.status {
        SnapshotStatus::Ok => Ok(()),
        SnapshotStatus::Locked => Err(status::failed_precondition(
            "SNAPSHOT_LOCKED",
            &subject,
            format!("snapshot {} is locked by an operation in progress", s.id),
        )),
        SnapshotStatus::InPreview => Err(status::failed_precondition(
            "SNAPSHOT_IN_PREVIEW",
            &subject,
            format!(
                "snapshot {} is being previewed; commit or undo the preview first",
                s.id
            ),
        )),
    }
}

/// Refuses to change a VM whose snapshots are in preview.
pub async fn refuse_in_preview(app: &App, vm: &db::Vm, what: &str) -> Result<(), Status> {
    if in_preview(app, vm).await? {
        return Err(in_preview_status(vm, what));
    }
    Ok(())
}

fn in_preview_status(vm: &db::Vm, what: &str) -> Status {
    status::failed_precondition(
        "VM_IN_PREVIEW",
        &format!("vm/{}", vm.id),
        format!(
            "VM {} is previewing a snapshot; commit or undo the preview before {what}",
            vm.name
        ),
    )
}

#[tonic::async_trait]
impl SnapshotService for SnapshotApi {
    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let req = req.into_inner();
        const KIND: &str = "create_snapshot";
        let key = RequestKey::of(&req)?;
        let op = or_retried(&self.0, KIND, &key, async {
            // The VM and whether it previews or runs stateless, in one read.
            let vm_id = ids::parse("vm_id", &req.vm_id)?;
            let (vm, state) = self
                .0
                .db
                .get_vm_with_snapshot_state(vm_id)
                .await
                .map_err(db_status)?;
            let mode = match pb::MemoryMode::try_from(req.memory_mode) {
                Ok(pb::MemoryMode::Live) => MemoryMode::Live,
                Ok(pb::MemoryMode::Paused | pb::MemoryMode::Unspecified) => MemoryMode::Paused,
                Err(_) => {
                    return Err(status::invalid_argument(
                        "memory_mode",
                        format!("{} is not a known value", req.memory_mode),
                    ))
                }
            };
            limits::check_text("description", &req.description, limits::MAX_DESCRIPTION)?;
            refuse_locked(&vm)?;
            refuse_suspended(&vm, "taking a snapshot")?;
            let running = is_running(vm.status);
            if req.save_memory {
                require_vm_memory_level(
                    &self.0,
                    &vm,
                    "saving memory needs 3.3 or above (a disk-only snapshot works)",
                )
                .await?;
                require_up(&vm, "only a running VM's memory can be saved")?;
            }
            refuse_preview_or_stateless(&vm, state, "taking a snapshot")?;
            let params = snapshot_create::Params {
                vm_id: vm.id,
                description: req.description,
                save_memory: req.save_memory,
                mode,
                vm_running: running,
            };
            start_operation(
                &self.0,
                Start::locked(KIND, vm.id, key.clone(), snapshot_create::NAME, &params),
            )
            .await
        })
        .await?;
        Ok(Response::new(pb::CreateSnapshotResponse {
            operation: Some(to_operation(&op)),
        }))
    }

    async fn get_snapshot(
        &self,
        req: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let id = ids::parse("snapshot_id", &req.get_ref().snapshot_id)?;
        let s = self.0.db.get_snapshot(id).await.map_err(db_status)?;
        Ok(Response::new(pb::GetSnapshotResponse {
            snapshot: Some(to_snapshot(&s)),
        }))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let req = req.into_inner();
        let page = PageRequest::parse(req.page_size, &req.page_token, &[&req.vm_id])?;
        let vm = get_vm(&self.0, "vm_id", &req.vm_id).await?;
        let snaps = self.0.db.list_snapshots(vm.id).await.map_err(db_status)?;
        // Oldest first (then by id), the active one last.
        let (snaps, next_page_token) = page.page(snaps, |s| {
            let active = if s.snapshot_type == SnapshotType::Active {
                "1"
            } else {
                "0"
            };
            format!("{active}/{}", paging::time_key(s.created_at, &s.id.to_string()))
        });
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: snaps.iter().map(to_snapshot).collect(),
            next_page_token,
        }))
    }

    async fn remove_snapshot(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<pb::RemoveSnapshotResponse>, Status> {
        const KIND: &str = "remove_snapshot";
        let req = req.into_inner();
        let reply = |op: &db::Operation| {
            Response::new(pb::RemoveSnapshotResponse {
                operation: Some(to_operation(op)),
            })
        };
        let key = RequestKey::of(&req)?;
        let op = or_retried(&self.0, KIND, &key, async {
            let vm = get_vm(&self.0, "vm_id", &req.vm_id).await?;
            let snapshot = get_vm_snapshot(&self.0, &vm, &req.snapshot_id).await?;
            refuse_locked(&vm)?;
            // A running VM's snapshot goes by live merge (beyond oVirt 3.3,
            // which needed the VM down; oVirt 3.6 added it).
            let live = matches!(vm.status, db::VmStatus::Up | db::VmStatus::Paused);
            if !live {
                require_down(&vm, "removing a snapshot (a live merge needs it up)")?;
            }
            require_regular_ok(&snapshot, "removed")?;
            refuse_in_preview(&self.0, &vm, "removing a snapshot").await?;
            self.0.host_for_vm(&vm).await?;
            let params = snapshot_remove::Params {
                vm_id: vm.id,
                snapshot_id: snapshot.id,
            };
            let saga = if live {
                snapshot_remove_live::NAME
            } else {
                snapshot_remove::NAME
            };
            start_operation(&self.0, Start::locked(KIND, vm.id, key.clone(), saga, &params)).await
        })
        .await?;
        Ok(reply(&op))
    }

    async fn preview_snapshot(
        &self,
        req: Request<pb::PreviewSnapshotRequest>,
    ) -> Result<Response<pb::PreviewSnapshotResponse>, Status> {
        const KIND: &str = "preview_snapshot";
        let req = req.into_inner();
        let reply = |op: &db::Operation| {
            Response::new(pb::PreviewSnapshotResponse {
                operation: Some(to_operation(op)),
                warnings: op.warnings.clone(),
            })
        };
        let key = RequestKey::of(&req)?;
        let op = or_retried(&self.0, KIND, &key, async {
            let vm = get_vm(&self.0, "vm_id", &req.vm_id).await?;
            let snapshot = get_vm_snapshot(&self.0, &vm, &req.snapshot_id).await?;
            refuse_locked(&vm)?;
            require_down(&vm, "previewing a snapshot")?;
            require_regular_ok(&snapshot, "previewed")?;
            refuse_in_preview(&self.0, &vm, "previewing another snapshot").await?;
            refuse_stateless(&self.0, &vm, "previewing a snapshot").await?;
            self.0.host_for_vm(&vm).await?;
            let cluster = self.0.db.cluster_cached(vm.cluster_id).await.map_err(db_status)?;
            // oVirt: the Restore Memory option exists only for a snapshot with
            // memory in a 3.3+ cluster; asked for otherwise, it is ignored.
            let mut warnings = Vec::new();
            let mut restore_memory = req.restore_memory;
            if req.restore_memory && snapshot.memory.is_none() {
                restore_memory = false;
                warnings.push(format!(
                    "snapshot {} has no memory: restore_memory is ignored and the VM boots on its next run",
                    snapshot.id
                ));
            } else if req.restore_memory && !cluster.compatibility_version.supports_memory_snapshots() {
                restore_memory = false;
                warnings.push(format!(
                    "cluster {} is at compatibility {}; restoring memory needs 3.3 or above: restore_memory is ignored and the VM boots on its next run",
                    cluster.name, cluster.compatibility_version
                ));
            }
            let params = snapshot_preview::Params {
                vm_id: vm.id,
                snapshot_id: snapshot.id,
                restore_memory,
            };
            start_operation(
                &self.0,
                Start {
                    kind: KIND,
                    vm_id: Some(vm.id),
                    lock_vm: true,
                    request: key.clone(),
                    saga: snapshot_preview::NAME,
                    params: serde_json::to_value(params).expect("serializable"),
                    warnings,
                },
            )
            .await
        })
        .await?;
        Ok(reply(&op))
    }

    async fn undo_preview(
        &self,
        req: Request<pb::UndoPreviewRequest>,
    ) -> Result<Response<pb::UndoPreviewResponse>, Status> {
        const KIND: &str = "undo_preview";
        let req = req.into_inner();
        let reply = |op: &db::Operation| {
            Response::new(pb::UndoPreviewResponse {
                operation: Some(to_operation(op)),
            })
        };
        let key = RequestKey::of(&req)?;
        let op = or_retried(&self.0, KIND, &key, async {
            let vm = get_vm(&self.0, "vm_id", &req.vm_id).await?;
            refuse_locked(&vm)?;
            require_down(&vm, "undoing the preview")?;
            require_in_preview(&self.0, &vm).await?;
            self.0.host_for_vm(&vm).await?;
            start_operation(
                &self.0,
                Start::locked(
                    KIND,
                    vm.id,
                    key.clone(),
                    snapshot_undo::NAME,
                    &snapshot_undo::Params { vm_id: vm.id },
                ),
            )
            .await
        })
        .await?;
        Ok(reply(&op))
    }

    async fn commit_snapshot(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<pb::CommitSnapshotResponse>, Status> {
        const KIND: &str = "commit_snapshot";
        let req = req.into_inner();
        let reply = |op: &db::Operation| {
            Response::new(pb::CommitSnapshotResponse {
                operation: Some(to_operation(op)),
            })
        };
        let key = RequestKey::of(&req)?;
        let op = or_retried(&self.0, KIND, &key, async {
            let vm = get_vm(&self.0, "vm_id", &req.vm_id).await?;
            refuse_locked(&vm)?;
            require_down(&vm, "committing the preview")?;
            require_in_preview(&self.0, &vm).await?;
            self.0.host_for_vm(&vm).await?;
            start_operation(
                &self.0,
                Start::locked(
                    KIND,
                    vm.id,
                    key.clone(),
                    snapshot_commit::NAME,
                    &snapshot_commit::Params { vm_id: vm.id },
                ),
            )
            .await
        })
        .await?;
        Ok(reply(&op))
    }

    async fn clone_vm_from_snapshot(
        &self,
        req: Request<pb::CloneVmFromSnapshotRequest>,
    ) -> Result<Response<pb::CloneVmFromSnapshotResponse>, Status> {
        const KIND: &str = "clone_vm";
        let req = req.into_inner();
        let reply = |op: &db::Operation| {
            Response::new(pb::CloneVmFromSnapshotResponse {
                operation: Some(to_operation(op)),
                warnings: op.warnings.clone(),
            })
        };
        let key = RequestKey::of(&req)?;
        let op = or_retried(&self.0, KIND, &key, async {
            check_name("name", &req.name)?;
            let target_domain_id = ids::parse_optional("target_domain_id", &req.target_domain_id)?;
            let vm = get_vm(&self.0, "vm_id", &req.vm_id).await?;
            let snapshot = get_vm_snapshot(&self.0, &vm, &req.snapshot_id).await?;
            refuse_locked(&vm)?;
            let subject = format!("snapshot/{}", snapshot.id);
            if snapshot.snapshot_type == SnapshotType::Active {
                return Err(status::failed_precondition(
                    "SNAPSHOT_IS_ACTIVE",
                    &subject,
                    "the active snapshot changes while the VM runs; take a snapshot and clone that",
                ));
            }
            if snapshot.status != SnapshotStatus::Ok {
                return Err(status::failed_precondition(
                    if snapshot.status == SnapshotStatus::Locked {
                        "SNAPSHOT_LOCKED"
                    } else {
                        "SNAPSHOT_IN_PREVIEW"
                    },
                    &subject,
                    format!(
                        "snapshot {} is {}; it must be OK to clone",
                        snapshot.id, snapshot.status
                    ),
                ));
            }
            if snapshot.disks.is_empty() {
                return Err(status::failed_precondition(
                    "SNAPSHOT_HAS_NO_DISKS",
                    &subject,
                    "the snapshot has no disks to clone",
                ));
            }
            refuse_taken_name(&self.0, &req.name).await?;
            let host = self.0.host_for_vm(&vm).await?;
            let domains: Vec<(String, Uuid)> = match target_domain_id {
                Some(d) => vec![("target_domain_id".to_string(), d)],
                None => snapshot
                    .disks
                    .iter()
                    .map(|d| (format!("disk {}", d.disk_id), d.volume.domain_id))
                    .collect(),
            };
            check_data_domains(&self.0, &host, domains).await?;
            if req.keep_memory {
                if snapshot.memory.is_none() {
                    return Err(status::failed_precondition(
                        "SNAPSHOT_HAS_NO_MEMORY",
                        &subject,
                        format!(
                            "snapshot {} was taken without memory: keep_memory has nothing to keep (clone without it: the new VM boots)",
                            snapshot.id
                        ),
                    ));
                }
                require_vm_memory_level(&self.0, &vm, "a clone resumes from memory at 3.3 or above").await?;
            }
            let warnings = match (&snapshot.memory, req.keep_memory) {
                (Some(_), true) => vec![FORK_IDENTITY_WARNING.to_string()],
                (Some(_), false) => vec![CLONE_MEMORY_WARNING.to_string()],
                (None, _) => Vec::new(),
            };
            let new_vm_id = Uuid::new_v4();
            let params = vm_clone::Params {
                source_vm_id: vm.id,
                snapshot_id: snapshot.id,
                new_vm_id,
                name: req.name,
                target_domain_id,
                keep_memory: req.keep_memory,
            };
            start_operation(
                &self.0,
                Start {
                    kind: KIND,
                    vm_id: Some(vm.id),
                    lock_vm: true,
                    request: key.clone(),
                    saga: vm_clone::NAME,
                    params: serde_json::to_value(params).expect("serializable"),
                    warnings,
                },
            )
            .await
        })
        .await?;
        Ok(reply(&op))
    }
}
