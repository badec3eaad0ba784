//! SnapshotService: snapshots of a VM and the operations on them.
use super::{get_vm, is_running, start_operation, to_operation, Start};
use crate::app::{db_status, App};
use crate::convert::{to_wire_memory, to_wire_ref};
use crate::db::{self, SnapshotStatus, SnapshotType};
use crate::sagas::snapshot_create::{self, MemoryMode};
use ramsnap_common::{ids, status};
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::snapshot_service_server::SnapshotService;
use std::sync::Arc;
use tonic::{Request, Response, Status};

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

/// Refuses to change a VM whose snapshots are in preview.
pub async fn refuse_in_preview(app: &App, vm: &db::Vm, what: &str) -> Result<(), Status> {
    let snaps = app.db.list_snapshots(vm.id).await.map_err(db_status)?;
    if snaps.iter().any(|s| s.snapshot_type == SnapshotType::Preview) {
        return Err(status::failed_precondition(
            "VM_IN_PREVIEW",
            &format!("vm/{}", vm.id),
            format!(
                "VM {} is previewing a snapshot; commit or undo the preview before {what}",
                vm.name
            ),
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl SnapshotService for SnapshotApi {
    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let req = req.into_inner();
        let vm = get_vm(&self.0, "vm_id", &req.vm_id).await?;
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
        if req.description.len() > 4096 {
            return Err(status::invalid_argument("description", "longer than 4096 bytes"));
        }
        let running = is_running(vm.status);
        if req.save_memory {
            let cluster = self.0.db.get_cluster(vm.cluster_id).await.map_err(db_status)?;
            if !cluster.compatibility_version.supports_memory_snapshots() {
                return Err(status::failed_precondition(
                    "CLUSTER_BELOW_3_3",
                    &format!("cluster/{}", cluster.id),
                    format!(
                        "cluster {} is at compatibility {}; saving memory needs 3.3 or above (a disk-only snapshot works)",
                        cluster.name, cluster.compatibility_version
                    ),
                ));
            }
            if vm.status != db::VmStatus::Up {
                return Err(status::failed_precondition(
                    "VM_NOT_RUNNING",
                    &format!("vm/{}", vm.id),
                    format!(
                        "VM {} is {}; only a running VM's memory can be saved",
                        vm.name, vm.status
                    ),
                ));
            }
        }
        refuse_in_preview(&self.0, &vm, "taking a snapshot").await?;
        let params = snapshot_create::Params {
            vm_id: vm.id,
            description: req.description,
            save_memory: req.save_memory,
            mode,
            vm_running: running,
        };
        let op = start_operation(
            &self.0,
            Start {
                kind: "create_snapshot",
                vm_id: Some(vm.id),
                request_id: req.request_id,
                saga: snapshot_create::NAME,
                params: serde_json::to_value(params).expect("serializable"),
                warnings: Vec::new(),
            },
        )
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
        let vm = get_vm(&self.0, "vm_id", &req.get_ref().vm_id).await?;
        let mut snaps = self.0.db.list_snapshots(vm.id).await.map_err(db_status)?;
        // Oldest first, the active one last.
        snaps.sort_by_key(|s| (s.snapshot_type == SnapshotType::Active, s.created_at));
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: snaps.iter().map(to_snapshot).collect(),
        }))
    }

    async fn remove_snapshot(
        &self,
        _req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<pb::RemoveSnapshotResponse>, Status> {
        Err(Status::unimplemented("remove_snapshot: in progress"))
    }

    async fn preview_snapshot(
        &self,
        _req: Request<pb::PreviewSnapshotRequest>,
    ) -> Result<Response<pb::PreviewSnapshotResponse>, Status> {
        Err(Status::unimplemented("preview_snapshot: in progress"))
    }

    async fn undo_preview(
        &self,
        _req: Request<pb::UndoPreviewRequest>,
    ) -> Result<Response<pb::UndoPreviewResponse>, Status> {
        Err(Status::unimplemented("undo_preview: in progress"))
    }

    async fn commit_snapshot(
        &self,
        _req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<pb::CommitSnapshotResponse>, Status> {
        Err(Status::unimplemented("commit_snapshot: in progress"))
    }

    async fn clone_vm_from_snapshot(
        &self,
        _req: Request<pb::CloneVmFromSnapshotRequest>,
    ) -> Result<Response<pb::CloneVmFromSnapshotResponse>, Status> {
        Err(Status::unimplemented("clone_vm_from_snapshot: in progress"))
    }
}
