//! Clone a VM from a snapshot (oVirt's AddVmFromSnapshot): each of the
//! snapshot's disk volumes is copied, its chain collapsed, into a new image
//! (on the requested domain, or the disk's own), and a new VM is made with
//! the source's configuration and an ACTIVE snapshot over the copies. The
//! snapshot's memory is never copied (oVirt 3.3: the new VM boots; the
//! handler warns). The source VM stays locked while its volumes are read.
use super::common::{
    copy_volume, delete_volume, lock_vm, noop, ordered_disk_id, unlock_undo, unlock_vm_node, vm_and_host,
    MadeVm, OnVm,
};
use crate::app::{db_status, App};
use crate::convert::to_wire_ref;
use crate::db::{NewSnapshot, NewVm, SnapshotDisk, SnapshotStatus, SnapshotType, VmDisk, VolumeRef};
use crate::saga::{Node, Output, SagaCx, SagaDef};
use futures::future::BoxFuture;
use futures::FutureExt;
use ramsnap_common::status;
use ramsnap_proto::storage::v1 as storage;
use serde::{Deserialize, Serialize};
use tonic::Status;
use uuid::Uuid;

pub const NAME: &str = "vm_clone";

#[derive(Debug, Serialize, Deserialize)]
pub struct Params {
    pub source_vm_id: Uuid,
    pub snapshot_id: Uuid,
    /// Chosen by the handler.
    pub new_vm_id: Uuid,
    pub name: String,
    /// None: each copy goes to its disk's own domain.
    pub target_domain_id: Option<Uuid>,
}

impl OnVm for Params {
    fn vm_id(&self) -> Uuid {
        self.source_vm_id
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct DiskCopy {
    source_disk_id: Uuid,
    disk_id: Uuid,
    capacity_bytes: u64,
    volume: VolumeRef,
}

pub fn definition() -> SagaDef<App> {
    SagaDef {
        name: NAME,
        nodes: vec![
            Node::new(Output::new("lock_vm"), lock_fwd)
                .undo(unlock_undo::<Params>)
                .local(),
            Node::new(IDS, ids_fwd).undo(noop).local(),
            Node::new(COPIES, copies_fwd).undo(copies_undo),
            Node::new(Output::new("record_vm"), record_fwd).undo(record_undo),
            unlock_vm_node::<Params>(),
        ],
        result_node: Some(IDS.name),
    }
}

const IDS: Output<MadeVm> = Output::new("ids");
/// The copies of the snapshot's disks.
const COPIES: Output<Vec<DiskCopy>> = Output::new("copies");

fn lock_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        lock_vm(cx, p.source_vm_id).await?;
        // Checked again now that nothing else changes the VM's snapshots.
        let s = cx.db().get_snapshot(p.snapshot_id).await.map_err(db_status)?;
        if s.status != SnapshotStatus::Ok || s.snapshot_type == SnapshotType::Active {
            return Err(status::failed_precondition(
                "SNAPSHOT_NOT_CLONABLE",
                &format!("snapshot/{}", s.id),
                format!("snapshot {} is {} {}", s.id, s.snapshot_type, s.status),
            ));
        }
        Ok(())
    }
    .boxed()
}

fn ids_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<MadeVm, Status>> {
    async move {
        Ok(MadeVm {
            vm_id: cx.params::<Params>()?.new_vm_id,
        })
    }
    .boxed()
}

/// Where disk `source` of the snapshot is copied: (disk, image, volume).
fn copy_ids(cx: &SagaCx<App>, index: usize, source: Uuid) -> (Uuid, Uuid, Uuid) {
    (
        ordered_disk_id(index, cx.stable_id(&format!("disk/{source}"))),
        cx.stable_id(&format!("image/{source}")),
        cx.stable_id(&format!("volume/{source}")),
    )
}

fn copies_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Vec<DiskCopy>, Status>> {
    async move {
        let p: Params = cx.params()?;
        let (_, host) = vm_and_host(cx, p.source_vm_id).await?;
        let db = cx.db();
        let snapshot = db.get_snapshot(p.snapshot_id).await.map_err(db_status)?;
        let disks = db.vm_disks(p.source_vm_id).await.map_err(db_status)?;
        let capacity = |disk_id: Uuid| {
            disks
                .iter()
                .find(|x| x.disk_id == disk_id)
                .map(|x| x.capacity_bytes)
                .ok_or_else(|| Status::internal(format!("disk {disk_id} is not recorded")))
        };
        let total: u64 = snapshot
            .disks
            .iter()
            .map(|d| capacity(d.disk_id))
            .sum::<Result<u64, Status>>()?;
        let mut done = 0u64;
        let mut out = Vec::new();
        for (i, d) in snapshot.disks.iter().enumerate() {
            let (disk_id, image_id, volume_id) = copy_ids(cx, i, d.disk_id);
            let req = storage::CopyVolumeRequest {
                request_id: cx.stable_id(&format!("copy-request/{}", d.disk_id)).to_string(),
                source: Some(to_wire_ref(&d.volume)),
                target_domain_id: p.target_domain_id.unwrap_or(d.volume.domain_id).to_string(),
                target_image_id: image_id.to_string(),
                target_volume_id: volume_id.to_string(),
                target_format: storage::VolumeFormat::Cow as i32,
                target_allocation: storage::VolumeAllocation::Sparse as i32,
                description: format!("disk {i} of VM {} (clone of snapshot {})", p.name, snapshot.id),
                keep_parent: false,
                checksum_algorithm: String::new(),
            };
            let volume = copy_volume(cx, &host, req, done, total).await?.volume;
            let capacity_bytes = capacity(d.disk_id)?;
            done += capacity_bytes;
            cx.progress(done, total).await;
            out.push(DiskCopy {
                source_disk_id: d.disk_id,
                disk_id,
                capacity_bytes,
                volume,
            });
        }
        Ok(out)
    }
    .boxed()
}

fn copies_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let (_, host) = vm_and_host(cx, p.source_vm_id).await?;
        let snapshot = cx.db().get_snapshot(p.snapshot_id).await.map_err(db_status)?;
        // Whatever this saga may have made, whether or not the step finished.
        for (i, d) in snapshot.disks.iter().enumerate() {
            let (_, image_id, volume_id) = copy_ids(cx, i, d.disk_id);
            let r = VolumeRef {
                domain_id: p.target_domain_id.unwrap_or(d.volume.domain_id),
                image_id,
                volume_id,
            };
            delete_volume(
                &cx.app,
                &host,
                &r,
                cx.stable_id(&format!("undo/copy/{}", d.disk_id)),
            )
            .await?;
        }
        Ok(())
    }
    .boxed()
}

fn record_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let copies = cx.get(COPIES)?;
        let db = cx.db();
        let source = db.get_vm(p.source_vm_id).await.map_err(db_status)?;
        let first = copies
            .first()
            .ok_or_else(|| Status::failed_precondition("the snapshot has no disks to clone"))?;
        let new_vm = NewVm {
            id: p.new_vm_id,
            name: p.name.clone(),
            cluster_id: source.cluster_id,
            memory_bytes: source.memory_bytes,
            vcpus: source.vcpus,
            stateless: source.stateless,
            disk_domain_id: first.volume.domain_id,
            kernel: source.kernel.clone(),
            initrd: source.initrd.clone(),
            cmdline: source.cmdline.clone(),
        };
        let disks: Vec<VmDisk> = copies
            .iter()
            .map(|c| VmDisk {
                vm_id: p.new_vm_id,
                disk_id: c.disk_id,
                domain_id: c.volume.domain_id,
                image_id: c.volume.image_id,
                capacity_bytes: c.capacity_bytes,
            })
            .collect();
        let active_disks: Vec<SnapshotDisk> = copies
            .iter()
            .map(|c| SnapshotDisk {
                disk_id: c.disk_id,
                volume: c.volume,
            })
            .collect();
        // No memory: the clone boots.
        let active = NewSnapshot {
            id: cx.stable_id("active"),
            vm_id: p.new_vm_id,
            snapshot_type: SnapshotType::Active,
            status: SnapshotStatus::Ok,
            description: "Active VM".into(),
            memory: None,
        };
        db.create_vm_with_active(&new_vm, &disks, &active, &active_disks)
            .await
            .map_err(db_status)?;
        cx.app.notify_vm(p.new_vm_id);
        Ok(())
    }
    .boxed()
}

fn record_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        if let Ok(active) = cx.db().active_snapshot(p.new_vm_id).await {
            if active.id == cx.stable_id("active") {
                cx.db().delete_vm(p.new_vm_id).await.map_err(db_status)?;
            }
        }
        Ok(())
    }
    .boxed()
}
