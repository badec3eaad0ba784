//! Remove a snapshot of a down VM (oVirt 3.3's RemoveSnapshotCommand, cold
//! merge): each of its disk volumes is merged into its only child (the child
//! is rebased onto the volume's parent, so what it shows is unchanged, and
//! the volume goes); then the row goes, and its memory volumes unless
//! another snapshot refers to them.
//!
//! Which snapshots point where: a REGULAR snapshot points at the volumes
//! frozen when it was taken, and no other snapshot points at them (the
//! ACTIVE one moved to new overlays then; a preview branches new overlays
//! off them). The snapshots that point at the child (the ACTIVE one, or a
//! newer snapshot) see the same content after the merge, so nothing is
//! repointed. A snapshot that pointed at the merged volume itself would see
//! more after the merge than before, so the plan refuses that case rather
//! than repoint it.
//!
//! A memory the ACTIVE snapshot shares with the removed one (after a commit
//! with memory) stays, and its metadata is rebound to the children that
//! took the merged volumes' place, so that the next run still restores it.
use super::common::{
    delete_volume, image_lock_node, image_unlock_node, image_volumes, lock_vm_node, noop, parents,
    remove_snapshot_row, unlock_vm_node, vm_and_host, OnVm,
};
use crate::app::{db_status, App};
use crate::convert::{downstream, to_wire_memory, to_wire_ref};
use crate::db::{MemoryVolume, SnapshotStatus, SnapshotType, VolumeRef};
use crate::saga::{Node, Output, SagaCx, SagaDef};
use futures::future::BoxFuture;
use futures::FutureExt;
use ramsnap_common::status;
use ramsnap_proto::host::v1 as host_pb;
use ramsnap_proto::storage::v1 as storage;
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};
use uuid::Uuid;

pub const NAME: &str = "snapshot_remove";

#[derive(Debug, Serialize, Deserialize)]
pub struct Params {
    pub vm_id: Uuid,
    pub snapshot_id: Uuid,
}

impl OnVm for Params {
    fn vm_id(&self) -> Uuid {
        self.vm_id
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum Step {
    /// Merge into the volume's only child.
    Merge,
    /// The volume has no child (nothing builds on it): delete it.
    Delete,
}

#[derive(Debug, Serialize, Deserialize)]
struct DiskPlan {
    disk_id: Uuid,
    volume: VolumeRef,
    step: Step,
    /// Merge: the child that takes the volume's place.
    #[serde(default)]
    child: Option<VolumeRef>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Plan {
    /// The operation's result.
    snapshot_id: Uuid,
    disks: Vec<DiskPlan>,
    memory: Option<MemoryVolume>,
}

pub fn definition() -> SagaDef<App> {
    SagaDef {
        name: NAME,
        nodes: vec![
            lock_vm_node::<Params>(true),
            image_lock_node::<Params>(),
            Node::new(Output::new("lock_snapshot"), lock_snapshot_fwd).undo(lock_snapshot_undo),
            Node::new(PLAN, plan_fwd).undo(noop),
            // Past the point of no return: the chains change.
            Node::new(Output::new("merge_volumes"), merge_fwd),
            Node::new(Output::new("rebind_memory"), rebind_fwd),
            Node::new(Output::new("remove_row"), remove_row_fwd),
            image_unlock_node::<Params>(),
            unlock_vm_node::<Params>(),
        ],
        result_node: Some(PLAN.name),
    }
}

/// What the removal does to each disk, and the memory it releases; the
/// operation's result.
const PLAN: Output<Plan> = Output::new("plan");

pub(super) fn lock_snapshot_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let db = cx.db();
        let s = db.get_snapshot(p.snapshot_id).await.map_err(db_status)?;
        let subject = format!("snapshot/{}", s.id);
        if s.vm_id != p.vm_id || s.snapshot_type != SnapshotType::Regular {
            return Err(status::failed_precondition(
                "SNAPSHOT_NOT_REGULAR",
                &subject,
                format!("snapshot {} is not a regular snapshot of VM {}", s.id, p.vm_id),
            ));
        }
        match s.status {
            SnapshotStatus::Ok => db
                .set_snapshot_status(s.id, SnapshotStatus::Locked)
                .await
                .map_err(db_status)?,
            // A replay: this saga locked it (the VM lock keeps others out).
            SnapshotStatus::Locked => {}
            SnapshotStatus::InPreview => {
                return Err(status::failed_precondition(
                    "SNAPSHOT_IN_PREVIEW",
                    &subject,
                    "the snapshot is being previewed; commit or undo the preview first",
                ))
            }
        }
        if db
            .snapshot_by_vm_type(p.vm_id, SnapshotType::Preview)
            .await
            .map_err(db_status)?
            .is_some()
        {
            return Err(status::failed_precondition(
                "VM_IN_PREVIEW",
                &format!("vm/{}", p.vm_id),
                "the VM is previewing a snapshot; commit or undo the preview first",
            ));
        }
        Ok(())
    }
    .boxed()
}

pub(super) fn lock_snapshot_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let db = cx.db();
        match db.get_snapshot(p.snapshot_id).await {
            Ok(s) if s.status == SnapshotStatus::Locked => db
                .set_snapshot_status(s.id, SnapshotStatus::Ok)
                .await
                .map_err(db_status),
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(db_status(e)),
        }
    }
    .boxed()
}

/// Checks every disk before anything changes: its volume has at most one
/// child, a COW one, and no other snapshot points at it.
fn plan_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Plan, Status>> {
    async move {
        let p: Params = cx.params()?;
        let db = cx.db();
        let (_, host) = vm_and_host(cx, p.vm_id).await?;
        let s = db.get_snapshot(p.snapshot_id).await.map_err(db_status)?;
        let mut disks = Vec::new();
        for d in &s.disks {
            let v = d.volume;
            let subject = format!("volume/{}", v.volume_id);
            let others: Vec<Uuid> = db
                .snapshots_pointing_at_volume(v.volume_id)
                .await
                .map_err(db_status)?
                .into_iter()
                .map(|(snap, _)| snap)
                .filter(|snap| *snap != s.id)
                .collect();
            if let Some(other) = others.first() {
                return Err(status::failed_precondition(
                    "VOLUME_SHARED",
                    &subject,
                    format!(
                        "snapshot {other} also points at volume {}; merging it would change that snapshot",
                        v.volume_id
                    ),
                ));
            }
            let volumes = image_volumes(&cx.app, &host, v.domain_id, v.image_id).await?;
            let parents = parents(&volumes);
            if !parents.contains_key(&v.volume_id) {
                return Err(Status::failed_precondition(format!(
                    "volume {} of snapshot {} is missing from its image",
                    v.volume_id, s.id
                )));
            }
            let children: Vec<&storage::Volume> = volumes
                .iter()
                .filter(|c| c.parent_volume_id == v.volume_id.to_string())
                .collect();
            let child = match children[..] {
                [c] => Some(VolumeRef {
                    volume_id: Uuid::parse_str(
                        &c.r#ref.as_ref().map(|r| r.volume_id.clone()).unwrap_or_default(),
                    )
                    .map_err(|_| Status::internal("a child volume without a valid id"))?,
                    ..v
                }),
                _ => None,
            };
            let step = match children[..] {
                [] => Step::Delete,
                [c] if c.format == storage::VolumeFormat::Cow as i32 => Step::Merge,
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
                            "volume {} has {} children; it can only be merged into one",
                            v.volume_id,
                            children.len()
                        ),
                    ))
                }
            };
            disks.push(DiskPlan {
                disk_id: d.disk_id,
                volume: v,
                step,
                child,
            });
        }
        Ok(Plan {
            snapshot_id: s.id,
            disks,
            memory: s.memory,
        })
    }
    .boxed()
}

fn merge_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        let (_, host) = vm_and_host(cx, p.vm_id).await?;
        for (i, d) in plan.disks.iter().enumerate() {
            let request_id = cx.stable_id(&format!("merge/{}", d.disk_id));
            cx.progress(i as u64, plan.disks.len() as u64).await;
            match d.step {
                Step::Merge => {
                    let req = storage::MergeVolumeRequest {
                        request_id: request_id.to_string(),
                        r#ref: Some(to_wire_ref(&d.volume)),
                    };
                    let merged = cx
                        .app
                        .on_domain_writer(&d.volume.domain_id.to_string(), &host, |mut c| {
                            let req = req.clone();
                            async move { c.merge_volume(req).await }
                        })
                        .await;
                    match merged {
                        Ok(_) => {}
                        // Merged before (the journal answers with the child;
                        // NOT_FOUND only if the volume is gone all the same).
                        Err(s) if s.code() == Code::NotFound => {}
                        Err(s) => return Err(downstream("merging a snapshot volume", s)),
                    }
                }
                Step::Delete => delete_volume(&cx.app, &host, &d.volume, request_id).await?,
            }
        }
        cx.progress(plan.disks.len() as u64, plan.disks.len() as u64)
            .await;
        Ok(())
    }
    .boxed()
}

/// The snapshot's memory, when another snapshot still holds it (the ACTIVE
/// one after a commit with memory), was saved with the volumes just merged
/// away: its metadata is rebound to the children that took their place
/// (they show the same content), so that a restore still accepts the disks.
/// Read first, then rewritten only if it still names a merged volume: a
/// replay finds it rebound.
fn rebind_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        let Some(m) = plan.memory else {
            return Ok(());
        };
        let shared = cx
            .app
            .db
            .snapshots_referencing_memory(m.dump.volume_id)
            .await
            .map_err(db_status)?
            .iter()
            .any(|s| s.id != p.snapshot_id);
        let moved: Vec<(Uuid, VolumeRef)> = plan
            .disks
            .iter()
            .filter_map(|d| Some((d.volume.volume_id, d.child?)))
            .collect();
        if !shared || moved.is_empty() {
            return Ok(());
        }
        let (_, host) = vm_and_host(cx, p.vm_id).await?;
        rebind_memory(cx, &host, p.vm_id, &m, &moved).await
    }
    .boxed()
}

/// Rebinds a memory's metadata after merges: each disk bound to a volume
/// in `moved` (old volume id, the volume that now shows its content) is
/// bound to the new one. Read first, then rewritten only if it still names
/// a moved volume: a replay finds it rebound. Memory the host refuses to
/// read (corrupt, foreign) is left as it is: a restore refuses it too, and
/// that run boots.
pub(super) async fn rebind_memory(
    cx: &SagaCx<App>,
    host: &crate::db::Host,
    vm_id: Uuid,
    m: &MemoryVolume,
    moved: &[(Uuid, VolumeRef)],
) -> Result<(), Status> {
    let mut client = cx.app.host_client(host)?;
    let request = |rebind_disks: Vec<ramsnap_proto::common::v1::VolumeRef>| host_pb::VerifyMemoryRequest {
        vm_id: vm_id.to_string(),
        memory: Some(to_wire_memory(m)),
        expected_checksum: String::new(),
        rebind_disk_domain_id: String::new(),
        rebind_disks,
        copied_checksum: String::new(),
        rebrand_vm_id: String::new(),
        adopt_ovirt: None,
        as_ovirt: false,
    };
    let bound = match client.verify_memory(request(Vec::new())).await {
        Ok(r) => r.into_inner().disks,
        Err(s) if s.code() == Code::FailedPrecondition => {
            tracing::warn!(vm = %vm_id, error = %s.message(), "memory not rebound after the merge");
            return Ok(());
        }
        Err(s) => return Err(downstream("reading the memory's metadata", s)),
    };
    let mut changed = false;
    let rebound: Vec<_> = bound
        .into_iter()
        .map(|r| {
            let id = Uuid::parse_str(&r.volume_id).ok();
            match moved.iter().find(|(v, _)| Some(*v) == id) {
                Some((_, to)) => {
                    changed = true;
                    to_wire_ref(to)
                }
                None => r,
            }
        })
        .collect();
    if changed {
        client
            .verify_memory(request(rebound))
            .await
            .map_err(|s| downstream("rebinding the memory to the merged disks", s))?;
    }
    Ok(())
}

fn remove_row_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        remove_snapshot_row(cx, p.vm_id, p.snapshot_id, plan.memory.as_ref()).await
    }
    .boxed()
}
