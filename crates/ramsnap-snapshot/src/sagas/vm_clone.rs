//! Clone a VM from a snapshot (oVirt's AddVmFromSnapshot): each of the
//! snapshot's disk volumes is copied, its chain collapsed, into a new image
//! (on the requested domain, or the disk's own), and a new VM is made with
//! the source's configuration and an ACTIVE snapshot over the copies.
//!
//! Without `keep_memory` the snapshot's memory is not copied (oVirt 3.3:
//! the new VM boots; the handler warns). With it (a fork), the memory pair
//! is copied too, onto the first disk copy's domain, and the source's host
//! gives the copy to the new VM (VerifyMemory with `rebrand_vm_id`): the
//! dump is verified, its libvirt save header and the metadata then name the
//! new VM, and the metadata binds the memory to the disk copies. The new
//! VM's ACTIVE snapshot holds that memory: its first run resumes from it.
//! The source VM stays locked while its volumes are read.
use super::common::{
    copy_volume, delete_volume, lock_vm, noop, ordered_disk_id, unlock_undo, unlock_vm_node, vm_and_host,
    MadeVm, OnVm,
};
use crate::app::{db_status, App};
use crate::convert::to_wire_ref;
use crate::convert::{downstream, to_wire_memory};
use crate::db::{
    MemoryVolume, NewSnapshot, NewVm, SnapshotDisk, SnapshotStatus, SnapshotType, VmDisk, VolumeRef,
};
use crate::saga::{Node, Output, SagaCx, SagaDef};
use futures::future::BoxFuture;
use futures::FutureExt;
use ramsnap_common::status;
use ramsnap_proto::host::v1 as host_pb;
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
    /// Fork: the clone also gets the snapshot's memory.
    #[serde(default)]
    pub keep_memory: bool,
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
            Node::new(MEMORY, memory_fwd).undo(memory_undo),
            Node::new(Output::new("record_vm"), record_fwd).undo(record_undo),
            unlock_vm_node::<Params>(),
        ],
        result_node: Some(IDS.name),
    }
}

const IDS: Output<MadeVm> = Output::new("ids");
/// The copies of the snapshot's disks.
const COPIES: Output<Vec<DiskCopy>> = Output::new("copies");
/// The memory pair given to the clone (keep_memory).
const MEMORY: Output<Option<MemoryVolume>> = Output::new("memory");

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
                target_purpose: storage::VolumePurpose::Unspecified as i32,
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

/// Where the memory pair is copied (keep_memory): the first disk copy's
/// domain, new image and volume ids.
fn memory_targets(cx: &SagaCx<App>, domain_id: Uuid) -> MemoryVolume {
    let at = |what: &str| VolumeRef {
        domain_id,
        image_id: cx.stable_id(&format!("memory-image/{what}")),
        volume_id: cx.stable_id(&format!("memory-volume/{what}")),
    };
    MemoryVolume {
        dump: at("dump"),
        metadata: at("metadata"),
    }
}

fn memory_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Option<MemoryVolume>, Status>> {
    async move {
        let p: Params = cx.params()?;
        if !p.keep_memory {
            return Ok(None);
        }
        let (_, host) = vm_and_host(cx, p.source_vm_id).await?;
        let snapshot = cx.db().get_snapshot(p.snapshot_id).await.map_err(db_status)?;
        let source = snapshot.memory.ok_or_else(|| {
            status::failed_precondition(
                "SNAPSHOT_HAS_NO_MEMORY",
                &format!("snapshot/{}", snapshot.id),
                format!("snapshot {} has no memory to keep", snapshot.id),
            )
        })?;
        let copies = cx.get(COPIES)?;
        let first = copies
            .first()
            .ok_or_else(|| Status::failed_precondition("the snapshot has no disks to clone"))?;
        let target = memory_targets(cx, first.volume.domain_id);
        let copy =
            |from: &VolumeRef, to: &VolumeRef, what: &str, checksum: bool| storage::CopyVolumeRequest {
                request_id: cx.stable_id(&format!("memory-copy-request/{what}")).to_string(),
                source: Some(to_wire_ref(from)),
                target_domain_id: to.domain_id.to_string(),
                target_image_id: to.image_id.to_string(),
                target_volume_id: to.volume_id.to_string(),
                target_format: storage::VolumeFormat::Unspecified as i32,
                target_allocation: storage::VolumeAllocation::Unspecified as i32,
                description: format!(
                    "memory {what} of VM {} (clone of snapshot {})",
                    p.name, snapshot.id
                ),
                target_purpose: storage::VolumePurpose::Unspecified as i32,
                keep_parent: false,
                checksum_algorithm: if checksum {
                    "blake3-4m".into()
                } else {
                    String::new()
                },
            };
        copy_volume(
            cx,
            &host,
            copy(&source.metadata, &target.metadata, "metadata", false),
            0,
            0,
        )
        .await?;
        let copied = copy_volume(cx, &host, copy(&source.dump, &target.dump, "dump", true), 0, 0).await?;
        // The source's host gives the copy to the clone: it checks the dump
        // against its recorded checksum, then rewrites the dump's save
        // header and the metadata (the clone's id, its disk copies).
        cx.app
            .host_client(&host)?
            .verify_memory(host_pb::VerifyMemoryRequest {
                vm_id: p.source_vm_id.to_string(),
                memory: Some(to_wire_memory(&target)),
                expected_checksum: String::new(),
                rebind_disk_domain_id: String::new(),
                rebind_disks: copies.iter().map(|c| to_wire_ref(&c.volume)).collect(),
                copied_checksum: copied.checksum.unwrap_or_default(),
                rebrand_vm_id: p.new_vm_id.to_string(),
                adopt_ovirt: None,
                as_ovirt: false,
            })
            .await
            .map_err(|s| downstream("giving the snapshot's memory to the clone", s))?;
        Ok(Some(target))
    }
    .boxed()
}

fn memory_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        if !p.keep_memory {
            return Ok(());
        }
        let (_, host) = vm_and_host(cx, p.source_vm_id).await?;
        let copies = cx.get(COPIES)?;
        let Some(first) = copies.first() else {
            return Ok(());
        };
        // Whatever this saga may have made, whether or not the step finished.
        let target = memory_targets(cx, first.volume.domain_id);
        for (r, what) in [(target.dump, "dump"), (target.metadata, "metadata")] {
            delete_volume(&cx.app, &host, &r, cx.stable_id(&format!("undo/memory/{what}"))).await?;
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
        // Without memory the clone boots; with it, it resumes.
        let active = NewSnapshot {
            id: cx.stable_id("active"),
            vm_id: p.new_vm_id,
            snapshot_type: SnapshotType::Active,
            status: SnapshotStatus::Ok,
            description: "Active VM".into(),
            memory: None,
        };
        let memory = cx.get(MEMORY)?;
        db.create_vm_with_active_memory(&new_vm, &disks, &active, &active_disks, memory.as_ref())
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
