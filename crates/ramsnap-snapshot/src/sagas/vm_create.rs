//! Create a VM (oVirt's AddVm): one image per disk, each with a COW sparse
//! base volume on the disk's domain, so that snapshots chain onto it; then
//! the VM, its disks and its ACTIVE snapshot (no memory) in one transaction.
use super::common::{delete_volume, ensure_cow_volume, noop, ordered_disk_id, MadeVm};
use crate::app::{db_status, App};
use crate::db::{self, NewSnapshot, NewVm, SnapshotDisk, SnapshotStatus, SnapshotType, VmDisk, VolumeRef};
use crate::saga::{Node, Output, SagaCx, SagaDef};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tonic::Status;
use uuid::Uuid;

pub const NAME: &str = "vm_create";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskSpec {
    pub domain_id: Uuid,
    pub capacity_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Params {
    /// Chosen by the handler, so that the operation names the VM at once.
    pub vm_id: Uuid,
    pub name: String,
    pub cluster_id: Uuid,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub stateless: bool,
    /// At least one; the first one's domain is the VM's disk domain.
    pub disks: Vec<DiskSpec>,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
}

pub fn definition() -> SagaDef<App> {
    SagaDef {
        name: NAME,
        nodes: vec![
            Node::new(IDS, ids_fwd).undo(noop).local(),
            Node::new(BASE_VOLUMES, volumes_fwd).undo(volumes_undo),
            // The last step, and reversible: a name taken meanwhile fails it,
            // and the volumes go.
            Node::new(Output::new("record_vm"), record_fwd).undo(record_undo),
        ],
        result_node: Some(IDS.name),
    }
}

const IDS: Output<MadeVm> = Output::new("ids");
/// Each disk's first volume.
const BASE_VOLUMES: Output<Vec<SnapshotDisk>> = Output::new("base_volumes");

/// The ids of disk `i`: (disk, image, volume).
fn disk_ids(cx: &SagaCx<App>, i: usize) -> (Uuid, Uuid, Uuid) {
    (
        ordered_disk_id(i, cx.stable_id(&format!("disk/{i}"))),
        cx.stable_id(&format!("image/{i}")),
        cx.stable_id(&format!("volume/{i}")),
    )
}

async fn host(cx: &SagaCx<App>, cluster_id: Uuid) -> Result<db::Host, Status> {
    cx.app.cluster_host(cluster_id).await
}

fn ids_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<MadeVm, Status>> {
    async move {
        Ok(MadeVm {
            vm_id: cx.params::<Params>()?.vm_id,
        })
    }
    .boxed()
}

fn volumes_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Vec<SnapshotDisk>, Status>> {
    async move {
        let p: Params = cx.params()?;
        let host = host(cx, p.cluster_id).await?;
        let mut out = Vec::new();
        for (i, d) in p.disks.iter().enumerate() {
            let (disk_id, image_id, volume_id) = disk_ids(cx, i);
            let v = ensure_cow_volume(
                cx,
                &host,
                d.domain_id,
                image_id,
                volume_id,
                None,
                d.capacity_bytes,
                cx.stable_id(&format!("volume-request/{i}")),
                format!("disk {i} of VM {}", p.name),
            )
            .await?;
            out.push(SnapshotDisk { disk_id, volume: v });
        }
        Ok(out)
    }
    .boxed()
}

fn volumes_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let host = host(cx, p.cluster_id).await?;
        // Whatever this saga may have made, whether or not the step finished.
        for (i, d) in p.disks.iter().enumerate() {
            let (_, image_id, volume_id) = disk_ids(cx, i);
            let r = VolumeRef {
                domain_id: d.domain_id,
                image_id,
                volume_id,
            };
            delete_volume(&cx.app, &host, &r, cx.stable_id(&format!("undo/volume/{i}"))).await?;
        }
        Ok(())
    }
    .boxed()
}

fn record_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let volumes = cx.get(BASE_VOLUMES)?;
        let first = p
            .disks
            .first()
            .ok_or_else(|| Status::invalid_argument("at least one disk is required"))?;
        let new_vm = NewVm {
            id: p.vm_id,
            name: p.name.clone(),
            cluster_id: p.cluster_id,
            memory_bytes: p.memory_bytes,
            vcpus: p.vcpus,
            stateless: p.stateless,
            disk_domain_id: first.domain_id,
            kernel: p.kernel.clone(),
            initrd: p.initrd.clone(),
            cmdline: p.cmdline.clone(),
        };
        let disks: Vec<VmDisk> = volumes
            .iter()
            .zip(&p.disks)
            .map(|(v, d)| VmDisk {
                vm_id: p.vm_id,
                disk_id: v.disk_id,
                domain_id: v.volume.domain_id,
                image_id: v.volume.image_id,
                capacity_bytes: d.capacity_bytes,
            })
            .collect();
        let active = NewSnapshot {
            id: cx.stable_id("active"),
            vm_id: p.vm_id,
            snapshot_type: SnapshotType::Active,
            status: SnapshotStatus::Ok,
            description: "Active VM".into(),
            memory: None,
        };
        cx.db()
            .create_vm_with_active(&new_vm, &disks, &active, &volumes)
            .await
            .map_err(db_status)?;
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}

fn record_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        // Only the VM this saga made: the same id, with this saga's ACTIVE.
        if let Ok(active) = cx.db().active_snapshot(p.vm_id).await {
            if active.id == cx.stable_id("active") {
                cx.db().delete_vm(p.vm_id).await.map_err(db_status)?;
            }
        }
        Ok(())
    }
    .boxed()
}
