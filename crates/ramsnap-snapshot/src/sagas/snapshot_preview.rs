//! Preview a snapshot of a down VM (oVirt's TryBackToAllSnapshotsOfVm): a
//! new COW leaf branches off each of the snapshot's volumes; the ACTIVE
//! snapshot becomes PREVIEW (kept for undo), a new ACTIVE one points at the
//! new leaves and, when memory restore was asked for and is possible (the
//! handler decided), at the snapshot's memory, and the previewed snapshot is
//! IN_PREVIEW.
use super::common::{
    delete_volume, ensure_cow_volume, image_lock_node, image_unlock_node, lock_vm_node, noop, unlock_vm_node,
    vm_and_host, MadeSnapshot, OnVm,
};
use crate::app::{db_status, App};
use crate::db::{NewSnapshot, SnapshotDisk, SnapshotStatus, SnapshotType, VolumeRef};
use crate::saga::{Node, Output, SagaCx, SagaDef};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tonic::Status;
use uuid::Uuid;

pub const NAME: &str = "snapshot_preview";

#[derive(Debug, Serialize, Deserialize)]
pub struct Params {
    pub vm_id: Uuid,
    pub snapshot_id: Uuid,
    /// Restore the snapshot's memory on the next run (already checked: the
    /// snapshot has memory and the cluster is 3.3 or above).
    pub restore_memory: bool,
}

impl OnVm for Params {
    fn vm_id(&self) -> Uuid {
        self.vm_id
    }
}

pub fn definition() -> SagaDef<App> {
    SagaDef {
        name: NAME,
        nodes: vec![
            lock_vm_node::<Params>(true),
            Node::new(IDS, ids_fwd).undo(noop).local(),
            image_lock_node::<Params>(),
            Node::new(OVERLAYS, overlays_fwd).undo(overlays_undo),
            Node::new(Output::new("preview_begin"), begin_fwd).undo(begin_undo),
            image_unlock_node::<Params>(),
            unlock_vm_node::<Params>(),
        ],
        result_node: Some(IDS.name),
    }
}

const IDS: Output<MadeSnapshot> = Output::new("ids");
/// The previewed snapshot's disks, each on a new overlay.
const OVERLAYS: Output<Vec<SnapshotDisk>> = Output::new("overlays");

fn ids_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<MadeSnapshot, Status>> {
    async move {
        Ok(MadeSnapshot {
            snapshot_id: cx.params::<Params>()?.snapshot_id,
        })
    }
    .boxed()
}

fn overlay_id(cx: &SagaCx<App>, disk_id: Uuid) -> Uuid {
    cx.stable_id(&format!("preview/{disk_id}"))
}

fn overlays_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Vec<SnapshotDisk>, Status>> {
    async move {
        let p: Params = cx.params()?;
        let (vm, host) = vm_and_host(cx, p.vm_id).await?;
        let db = cx.db();
        let snapshot = db.get_snapshot(p.snapshot_id).await.map_err(db_status)?;
        let disks = db.vm_disks(vm.id).await.map_err(db_status)?;
        let mut out = Vec::new();
        for d in &snapshot.disks {
            let capacity = disks
                .iter()
                .find(|x| x.disk_id == d.disk_id)
                .map(|x| x.capacity_bytes)
                .ok_or_else(|| Status::internal(format!("disk {} is not recorded", d.disk_id)))?;
            let v = ensure_cow_volume(
                cx,
                &host,
                d.volume.domain_id,
                d.volume.image_id,
                overlay_id(cx, d.disk_id),
                Some(d.volume.volume_id),
                capacity,
                cx.stable_id(&format!("preview-request/{}", d.disk_id)),
                format!("preview of snapshot {}", snapshot.id),
            )
            .await?;
            out.push(SnapshotDisk {
                disk_id: d.disk_id,
                volume: v,
            });
        }
        Ok(out)
    }
    .boxed()
}

fn overlays_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let (_, host) = vm_and_host(cx, p.vm_id).await?;
        let db = cx.db();
        let snapshot = db.get_snapshot(p.snapshot_id).await.map_err(db_status)?;
        let active = db.active_snapshot(p.vm_id).await.map_err(db_status)?;
        for d in &snapshot.disks {
            let overlay = VolumeRef {
                volume_id: overlay_id(cx, d.disk_id),
                ..d.volume
            };
            if active.disks.iter().any(|a| a.volume == overlay) {
                continue; // never delete what the ACTIVE snapshot uses
            }
            delete_volume(
                &cx.app,
                &host,
                &overlay,
                cx.stable_id(&format!("undo/preview/{}", d.disk_id)),
            )
            .await?;
        }
        Ok(())
    }
    .boxed()
}

fn begin_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let db = cx.db();
        let overlays = cx.get(OVERLAYS)?;
        let snapshot = db.get_snapshot(p.snapshot_id).await.map_err(db_status)?;
        let memory = snapshot.memory.filter(|_| p.restore_memory);
        let new = NewSnapshot {
            id: cx.stable_id("preview-active"),
            vm_id: p.vm_id,
            snapshot_type: SnapshotType::Active,
            status: SnapshotStatus::Ok,
            description: "Active VM (preview)".into(),
            memory: None,
        };
        db.preview_begin(p.vm_id, p.snapshot_id, &new, &overlays, memory.as_ref())
            .await
            .map_err(db_status)?;
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}

fn begin_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let db = cx.db();
        if let Ok(active) = db.active_snapshot(p.vm_id).await {
            if active.id == cx.stable_id("preview-active") {
                db.preview_undo(p.vm_id).await.map_err(db_status)?;
            }
        }
        Ok(())
    }
    .boxed()
}
