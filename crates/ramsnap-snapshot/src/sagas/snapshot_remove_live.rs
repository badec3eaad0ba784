//! Remove a snapshot while its VM runs (live merge, oVirt 3.6's
//! RemoveSnapshotSingleDiskLive): for each disk, the volume right above the
//! snapshot's volume V (the child C: the ACTIVE leaf, or a newer snapshot's
//! volume) is committed into V by the VM's host with libvirt's block commit
//! (HostService.CommitVolume), the guest running throughout. V then shows
//! what C showed: whatever pointed at C (the ACTIVE snapshot, a newer
//! snapshot) points at V, a newer snapshot's memory is rebound to V, the
//! storage service drops C (DropCommittedVolume), and the row goes with its
//! memory unless another snapshot still refers to it.
//!
//! Why this direction: V belongs to the snapshot being removed, so writing
//! C's data into it changes nothing any remaining snapshot shows, and no
//! copy goes into the running guest's leaf. The ACTIVE snapshot of a
//! running VM holds no memory (a run clears it), so none is dropped.
//!
//! Before the first commit the saga unwinds (cancel included); from it on,
//! it completes: a commit half-done by a crash is finished by the replay
//! (the host finds C out of the chain and answers done).
use super::common::{lock_vm_node, noop, remove_snapshot_row, unlock_vm_node, vm_and_host};
use super::snapshot_remove::{lock_snapshot_fwd, lock_snapshot_undo, rebind_memory, Params};
use crate::app::{db_status, App};
use crate::convert::{downstream, to_wire_ref};
use crate::db::{MemoryVolume, SnapshotType, VmStatus, VolumeRef};
use crate::saga::{Node, Output, SagaCx, SagaDef};
use futures::future::BoxFuture;
use futures::FutureExt;
use ramsnap_common::status;
use ramsnap_proto::host::v1 as host_pb;
use ramsnap_proto::storage::v1 as storage;
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};
use uuid::Uuid;

pub const NAME: &str = "snapshot_remove_live";

#[derive(Debug, Serialize, Deserialize)]
struct DiskPlan {
    disk_id: Uuid,
    /// The removed snapshot's volume: what C is committed into.
    volume: VolumeRef,
    /// Its only child, committed into it and then dropped.
    child: VolumeRef,
    /// (snapshot, disk) rows that pointed at the child.
    pointing: Vec<(Uuid, Uuid)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Plan {
    /// The operation's result.
    snapshot_id: Uuid,
    disks: Vec<DiskPlan>,
    /// The removed snapshot's memory.
    memory: Option<MemoryVolume>,
    /// The memories of the snapshots that pointed at a child: rebound.
    rebind: Vec<MemoryVolume>,
}

pub fn definition() -> SagaDef<App> {
    SagaDef {
        name: NAME,
        nodes: vec![
            lock_vm_node::<Params>(false),
            Node::new(Output::new("check_running"), check_fwd)
                .undo(noop)
                .local(),
            Node::new(Output::new("lock_snapshot"), lock_snapshot_fwd).undo(lock_snapshot_undo),
            Node::new(PLAN, plan_fwd).undo(noop),
            // Past the point of no return: the running chains change.
            Node::new(Output::new("commit_on_host"), commit_fwd),
            Node::new(Output::new("repoint"), repoint_fwd),
            Node::new(Output::new("rebind_memory"), rebind_fwd),
            Node::new(Output::new("drop_volumes"), drop_fwd),
            Node::new(Output::new("remove_row"), remove_row_fwd),
            unlock_vm_node::<Params>(),
        ],
        result_node: Some(PLAN.name),
    }
}

const PLAN: Output<Plan> = Output::new("plan");

/// Under the lock: the VM runs (UP or PAUSED), not a stateless run.
fn check_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let db = cx.db();
        let vm = db.get_vm(p.vm_id).await.map_err(db_status)?;
        if !matches!(vm.status, VmStatus::Up | VmStatus::Paused) {
            return Err(status::failed_precondition(
                "VM_NOT_RUNNING",
                &format!("vm/{}", vm.id),
                format!(
                    "VM {} is {}; a live merge needs it up (or paused), a cold one down",
                    vm.name, vm.status
                ),
            ));
        }
        let types = db.snapshot_types(p.vm_id).await.map_err(db_status)?;
        if types.contains(&SnapshotType::Stateless) {
            return Err(status::failed_precondition(
                "VM_STATELESS_RUN",
                &format!("vm/{}", vm.id),
                format!("VM {} runs stateless: stop it to remove a snapshot", vm.name),
            ));
        }
        Ok(())
    }
    .boxed()
}

/// Every disk checked before anything changes: no other snapshot points at
/// the volume, which has exactly one child, a COW one.
fn plan_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Plan, Status>> {
    async move {
        let p: Params = cx.params()?;
        let db = cx.db();
        let (_, host) = vm_and_host(cx, p.vm_id).await?;
        let s = db.get_snapshot(p.snapshot_id).await.map_err(db_status)?;
        let mut disks = Vec::new();
        let mut rebind: Vec<MemoryVolume> = Vec::new();
        for d in &s.disks {
            let v = d.volume;
            let subject = format!("volume/{}", v.volume_id);
            if let Some((other, _)) = db
                .snapshots_pointing_at_volume(v.volume_id)
                .await
                .map_err(db_status)?
                .into_iter()
                .find(|(snap, _)| *snap != s.id)
            {
                return Err(status::failed_precondition(
                    "VOLUME_SHARED",
                    &subject,
                    format!("snapshot {other} also points at volume {}", v.volume_id),
                ));
            }
            let volumes = super::common::image_volumes(&cx.app, &host, v.domain_id, v.image_id).await?;
            let children: Vec<&storage::Volume> = volumes
                .iter()
                .filter(|c| c.parent_volume_id == v.volume_id.to_string())
                .collect();
            let child = match children[..] {
                [c] if c.format == storage::VolumeFormat::Cow as i32 => c,
                [_] => {
                    return Err(status::failed_precondition(
                        "CHILD_NOT_COW",
                        &subject,
                        "the volume's child is not a COW volume",
                    ))
                }
                _ => {
                    return Err(status::failed_precondition(
                        "VOLUME_HAS_CHILDREN",
                        &subject,
                        format!(
                            "volume {} has {} children; a live merge needs exactly one",
                            v.volume_id,
                            children.len()
                        ),
                    ))
                }
            };
            let child = VolumeRef {
                volume_id: Uuid::parse_str(
                    &child
                        .r#ref
                        .as_ref()
                        .map(|r| r.volume_id.clone())
                        .unwrap_or_default(),
                )
                .map_err(|_| Status::internal("a child volume without a valid id"))?,
                ..v
            };
            let pointing = db
                .snapshots_pointing_at_volume(child.volume_id)
                .await
                .map_err(db_status)?;
            for (snap, _) in &pointing {
                let other = db.get_snapshot(*snap).await.map_err(db_status)?;
                if let Some(m) = other.memory {
                    if !rebind.contains(&m) {
                        rebind.push(m);
                    }
                }
            }
            disks.push(DiskPlan {
                disk_id: d.disk_id,
                volume: v,
                child,
                pointing,
            });
        }
        Ok(Plan {
            snapshot_id: s.id,
            disks,
            memory: s.memory,
            rebind,
        })
    }
    .boxed()
}

fn commit_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        let (_, host) = vm_and_host(cx, p.vm_id).await?;
        let mut client = cx.app.host_client(&host)?;
        let n = plan.disks.len() as u64;
        for (i, d) in plan.disks.iter().enumerate() {
            cx.progress(i as u64, n).await;
            let r = client
                .commit_volume(host_pb::CommitVolumeRequest {
                    vm_id: p.vm_id.to_string(),
                    top: Some(to_wire_ref(&d.child)),
                    base: Some(to_wire_ref(&d.volume)),
                })
                .await
                .map_err(|s| downstream("merging a volume on the VM's host", s))?
                .into_inner();
            tracing::info!(vm = %p.vm_id, top = %d.child.volume_id, base = %d.volume.volume_id,
                leaf = r.was_leaf, earlier = r.done_earlier, ms = r.duration_ms, "live merge");
        }
        cx.progress(n, n).await;
        Ok(())
    }
    .boxed()
}

/// What pointed at a child points at the volume it was committed into.
fn repoint_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let plan = cx.get(PLAN)?;
        let db = cx.db();
        for d in &plan.disks {
            for (snapshot, disk) in &d.pointing {
                db.set_snapshot_disk_volume(*snapshot, *disk, &d.volume)
                    .await
                    .map_err(db_status)?;
            }
        }
        Ok(())
    }
    .boxed()
}

fn rebind_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        if plan.rebind.is_empty() {
            return Ok(());
        }
        let moved: Vec<(Uuid, VolumeRef)> =
            plan.disks.iter().map(|d| (d.child.volume_id, d.volume)).collect();
        let (_, host) = vm_and_host(cx, p.vm_id).await?;
        for m in &plan.rebind {
            rebind_memory(cx, &host, p.vm_id, m, &moved).await?;
        }
        Ok(())
    }
    .boxed()
}

fn drop_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        let (_, host) = vm_and_host(cx, p.vm_id).await?;
        for d in &plan.disks {
            let req = storage::DropCommittedVolumeRequest {
                request_id: cx.stable_id(&format!("drop/{}", d.disk_id)).to_string(),
                r#ref: Some(to_wire_ref(&d.child)),
            };
            let dropped = cx
                .app
                .on_domain_writer(&d.child.domain_id.to_string(), &host, |mut c| {
                    let req = req.clone();
                    async move { c.drop_committed_volume(req).await }
                })
                .await;
            match dropped {
                Ok(_) => {}
                // Dropped before under another id (the journal keeps the id).
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(downstream("dropping a merged volume", s)),
            }
        }
        Ok(())
    }
    .boxed()
}

fn remove_row_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        remove_snapshot_row(cx, p.vm_id, p.snapshot_id, plan.memory.as_ref()).await
    }
    .boxed()
}
