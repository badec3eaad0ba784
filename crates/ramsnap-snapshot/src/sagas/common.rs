//! Steps several sagas share.
use super::vm_export::{run_copies, PlannedCopy};
use crate::app::{db_status, App};
use crate::convert::{downstream, from_wire_ref, to_wire_ref};
use crate::db::{self, MemoryVolume, SnapshotType, VmStatus, VolumeRef};
use crate::saga::{Node, Output, SagaCx};
use futures::future::BoxFuture;
use futures::FutureExt;
use ramsnap_common::status;
use ramsnap_proto::storage::v1 as storage;
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use std::collections::{HashMap, HashSet};
use tonic::{Code, Status};
use tonic_types::StatusExt;
use uuid::Uuid;

/// The result of a saga that makes a VM: its id.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct MadeVm {
    pub vm_id: Uuid,
}

/// The result of a saga that makes (or shows) a snapshot: its id.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct MadeSnapshot {
    pub snapshot_id: Uuid,
}

/// The undo of a node that has nothing to undo (it only computes, or it is
/// the "undo carrier" of a step whose cleanup lives elsewhere).
pub fn noop(_: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async { Ok(()) }.boxed()
}

/// The parameters of a saga on one VM: what the shared lock nodes read.
pub trait OnVm: serde::de::DeserializeOwned {
    fn vm_id(&self) -> Uuid;
}

/// `lock_vm`: takes the VM's lock (with `down`, and checks that the VM is
/// down); its undo releases it. Local: it only writes the database.
pub fn lock_vm_node<P: OnVm>(down: bool) -> Node<App> {
    Node::new(
        Output::new("lock_vm"),
        if down { lock_down_fwd::<P> } else { lock_fwd::<P> },
    )
    .undo(unlock_undo::<P>)
    .local()
}

/// `image_locked`: shows the down VM as ImageLocked; its undo sets it back.
pub fn image_lock_node<P: OnVm>() -> Node<App> {
    Node::new(Output::new("image_locked"), image_lock_fwd::<P>).undo(image_unlock_undo::<P>)
}

/// `image_unlocked`: the VM is Down again (past the point of no return).
pub fn image_unlock_node<P: OnVm>() -> Node<App> {
    Node::new(Output::new("image_unlocked"), image_unlock_fwd::<P>)
}

/// `unlock_vm`: the saga's last node, releasing the VM's lock.
pub fn unlock_vm_node<P: OnVm>() -> Node<App> {
    Node::new(Output::new("unlock_vm"), unlock_fwd::<P>).local()
}

/// The VM of a saga on one VM.
fn vm_of<P: OnVm>(cx: &SagaCx<App>) -> Result<Uuid, Status> {
    Ok(cx.params::<P>()?.vm_id())
}

fn lock_fwd<P: OnVm>(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        lock_vm(cx, vm_of::<P>(cx)?).await?;
        Ok(())
    }
    .boxed()
}

fn lock_down_fwd<P: OnVm>(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        lock_down_vm(cx, vm_of::<P>(cx)?).await?;
        Ok(())
    }
    .boxed()
}

/// The undo of a node that took the VM's lock.
pub fn unlock_undo<P: OnVm>(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move { unlock_vm(cx, vm_of::<P>(cx)?).await }.boxed()
}

fn unlock_fwd<P: OnVm>(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        unlock_vm(cx, vm_of::<P>(cx)?).await?;
        Ok(())
    }
    .boxed()
}

fn image_lock_fwd<P: OnVm>(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        image_lock(cx, vm_of::<P>(cx)?).await?;
        Ok(())
    }
    .boxed()
}

fn image_unlock_undo<P: OnVm>(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move { image_unlock(cx, vm_of::<P>(cx)?).await }.boxed()
}

fn image_unlock_fwd<P: OnVm>(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        image_unlock(cx, vm_of::<P>(cx)?).await?;
        Ok(())
    }
    .boxed()
}

/// Takes the VM's lock for this operation (idempotent for the holder).
pub async fn lock_vm(cx: &SagaCx<App>, vm_id: Uuid) -> Result<(), Status> {
    let read = cx
        .db()
        .try_lock_vm(vm_id, cx.operation_id)
        .await
        .map_err(db_status)?;
    // Read with the lock held: what [`locked_vm`] answers from now on.
    if let Some(vm) = read {
        cx.remember(LOCKED_VM, vm);
    }
    Ok(())
}

const LOCKED_VM: &str = "locked_vm";

/// The VM whose lock the saga holds, read once per execution (the lock
/// node's read, when it made one): what the saga's nodes use of it does
/// not change while it holds the lock.
pub async fn locked_vm(cx: &SagaCx<App>, vm_id: Uuid) -> Result<db::Vm, Status> {
    let vm: db::Vm = cx
        .memo(LOCKED_VM, || async {
            cx.db().get_vm(vm_id).await.map_err(db_status)
        })
        .await?;
    if vm.id == vm_id {
        return Ok(vm);
    }
    cx.db().get_vm(vm_id).await.map_err(db_status)
}

pub async fn unlock_vm(cx: &SagaCx<App>, vm_id: Uuid) -> Result<(), Status> {
    cx.db()
        .unlock_vm(vm_id, cx.operation_id)
        .await
        .map_err(db_status)?;
    cx.app.notify_vm(vm_id);
    Ok(())
}

/// Takes the lock and checks, now that nothing else can change the VM, that
/// it is down (the handler checked before the lock was taken).
pub async fn lock_down_vm(cx: &SagaCx<App>, vm_id: Uuid) -> Result<db::Vm, Status> {
    lock_vm(cx, vm_id).await?;
    let vm = cx.db().get_vm(vm_id).await.map_err(db_status)?;
    require_down(&vm)?;
    Ok(vm)
}

/// FAILED_PRECONDITION VM_NOT_DOWN unless the VM is down.
pub fn require_down(vm: &db::Vm) -> Result<(), Status> {
    crate::service::refuse_suspended(vm, "this operation")?;
    if vm.status != VmStatus::Down {
        return Err(status::failed_precondition(
            "VM_NOT_DOWN",
            &format!("vm/{}", vm.id),
            format!("VM {} is {}; it must be down", vm.name, vm.status),
        ));
    }
    Ok(())
}

/// Shows the down VM as ImageLocked while an operation changes its images.
/// A replay finds it ImageLocked already.
pub async fn image_lock(cx: &SagaCx<App>, vm_id: Uuid) -> Result<(), Status> {
    let db = cx.db();
    if !db
        .transition_vm_status(vm_id, VmStatus::Down, VmStatus::ImageLocked)
        .await
        .map_err(db_status)?
    {
        let vm = db.get_vm(vm_id).await.map_err(db_status)?;
        if vm.status != VmStatus::ImageLocked {
            require_down(&vm)?;
        }
    }
    cx.app.notify_vm(vm_id);
    Ok(())
}

/// Back to Down (forward at the end, or undo); a VM already gone is fine.
pub async fn image_unlock(cx: &SagaCx<App>, vm_id: Uuid) -> Result<(), Status> {
    match cx
        .app
        .db
        .transition_vm_status(vm_id, VmStatus::ImageLocked, VmStatus::Down)
        .await
    {
        Ok(_) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(db_status(e)),
    }
    cx.app.notify_vm(vm_id);
    Ok(())
}

/// The VM and the host whose StorageService reaches its domains.
pub async fn vm_and_host(cx: &SagaCx<App>, vm_id: Uuid) -> Result<(db::Vm, db::Host), Status> {
    let vm = cx.db().get_vm(vm_id).await.map_err(db_status)?;
    let host = cx.app.host_for_vm(&vm).await?;
    Ok((vm, host))
}

/// A disk id whose first four bytes are its index, so that "ordered by
/// disk id" (the order the repository returns disks in, and the order the
/// host attaches them: vda, vdb, ...) is the order the disks were given in.
pub fn ordered_disk_id(index: usize, seed: Uuid) -> Uuid {
    let mut bytes = *seed.as_bytes();
    bytes[..4].copy_from_slice(&(index as u32).to_be_bytes());
    Uuid::from_bytes(bytes)
}

/// Creates (or finds again, under the same request id) a COW volume: a
/// new image's base when `parent` is None, else a child of `parent` in its
/// image (several children branch, as a preview does).
#[allow(clippy::too_many_arguments)]
pub async fn ensure_cow_volume(
    cx: &SagaCx<App>,
    host: &db::Host,
    domain_id: Uuid,
    image_id: Uuid,
    volume_id: Uuid,
    parent: Option<Uuid>,
    capacity_bytes: u64,
    request_id: Uuid,
    description: String,
) -> Result<VolumeRef, Status> {
    let req = storage::CreateVolumeRequest {
        request_id: request_id.to_string(),
        domain_id: domain_id.to_string(),
        image_id: image_id.to_string(),
        volume_id: volume_id.to_string(),
        capacity_bytes,
        format: storage::VolumeFormat::Cow as i32,
        allocation: storage::VolumeAllocation::Sparse as i32,
        purpose: storage::VolumePurpose::Disk as i32,
        parent_volume_id: parent.map(|p| p.to_string()).unwrap_or_default(),
        description,
    };
    let v = cx
        .app
        .on_domain_writer(&req.domain_id, host, |mut c| {
            let req = req.clone();
            async move { c.create_volume(req).await }
        })
        .await
        .map_err(|s| downstream("creating a disk volume", s))?;
    from_wire_ref(v.into_inner().volume.as_ref().and_then(|v| v.r#ref.as_ref()))
}

/// Deletes a volume; "already gone" is success.
pub async fn delete_volume(
    app: &App,
    host: &db::Host,
    v: &db::VolumeRef,
    request_id: Uuid,
) -> Result<(), Status> {
    let req = storage::DeleteVolumeRequest {
        request_id: request_id.to_string(),
        r#ref: Some(to_wire_ref(v)),
    };
    match app
        .on_domain_writer(&v.domain_id.to_string(), host, |mut c| {
            let req = req.clone();
            async move { c.delete_volume(req).await }
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(downstream("deleting a volume", s)),
    }
}

/// Deletes a memory volume pair unless another snapshot still refers to it.
pub async fn release_memory(
    cx: &SagaCx<App>,
    host: &db::Host,
    m: &MemoryVolume,
    purpose: &str,
) -> Result<(), Status> {
    if cx
        .app
        .db
        .memory_still_referenced(m.dump.volume_id)
        .await
        .map_err(db_status)?
    {
        return Ok(());
    }
    delete_volume(&cx.app, host, &m.dump, cx.stable_id(&format!("{purpose}/dump"))).await?;
    delete_volume(
        &cx.app,
        host,
        &m.metadata,
        cx.stable_id(&format!("{purpose}/metadata")),
    )
    .await
}

/// A removed snapshot's last step, cold or live: its row goes, then its
/// memory unless another snapshot (the ACTIVE one after a commit with
/// memory) still refers to it; the VM's watchers hear of it.
pub async fn remove_snapshot_row(
    cx: &SagaCx<App>,
    vm_id: Uuid,
    snapshot_id: Uuid,
    memory: Option<&MemoryVolume>,
) -> Result<(), Status> {
    cx.db()
        .remove_snapshot_row(snapshot_id)
        .await
        .map_err(db_status)?;
    if let Some(m) = memory {
        let (_, host) = vm_and_host(cx, vm_id).await?;
        release_memory(cx, &host, m, "snapshot-memory").await?;
    }
    cx.app.notify_vm(vm_id);
    Ok(())
}

/// Releases each memory pair (reference counted: those a snapshot still
/// refers to stay).
pub async fn release_memories(
    cx: &SagaCx<App>,
    host: &db::Host,
    memories: &[MemoryVolume],
) -> Result<(), Status> {
    let mut seen = HashSet::new();
    for m in memories {
        if seen.insert(m.dump.volume_id) {
            release_memory(cx, host, m, &format!("release/{}", m.dump.volume_id)).await?;
        }
    }
    Ok(())
}

/// The memory of every snapshot of the VM (recorded before a change that
/// deletes snapshots, and released after it).
pub async fn vm_memories(cx: &SagaCx<App>, vm_id: Uuid) -> Result<Vec<MemoryVolume>, Status> {
    let snaps = cx.db().list_snapshots(vm_id).await.map_err(db_status)?;
    Ok(snaps.iter().filter_map(|s| s.memory).collect())
}

/// The volumes of one image, as the StorageService sees them.
pub async fn image_volumes(
    app: &App,
    host: &db::Host,
    domain_id: Uuid,
    image_id: Uuid,
) -> Result<Vec<storage::Volume>, Status> {
    let mut client = app.storage_client(host)?;
    all_volumes(&mut client, domain_id, Some(image_id))
        .await
        .map_err(|s| downstream("listing an image's volumes", s))
}

/// Every volume of a domain (or of one image of it), page after page.
pub async fn all_volumes(
    client: &mut StorageServiceClient<crate::app::AgentChannel>,
    domain_id: Uuid,
    image_id: Option<Uuid>,
) -> Result<Vec<storage::Volume>, Status> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_volumes(storage::ListVolumesRequest {
                domain_id: domain_id.to_string(),
                image_id: image_id.map(|i| i.to_string()).unwrap_or_default(),
                page_size: ramsnap_common::paging::MAX_PAGE_SIZE as i32,
                page_token,
                purpose: 0,
            })
            .await?
            .into_inner();
        all.extend(page.volumes);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = page.next_page_token;
    }
}

/// The (image id, volume id) of each volume.
pub fn volume_keys<'a>(volumes: impl IntoIterator<Item = &'a storage::Volume>) -> HashSet<(Uuid, Uuid)> {
    volumes
        .into_iter()
        .filter_map(|v| {
            let r = v.r#ref.as_ref()?;
            Some((
                Uuid::parse_str(&r.image_id).ok()?,
                Uuid::parse_str(&r.volume_id).ok()?,
            ))
        })
        .collect()
}

/// (volume id, parent volume id) of each volume.
pub fn parents(volumes: &[storage::Volume]) -> HashMap<Uuid, Option<Uuid>> {
    volumes
        .iter()
        .filter_map(|v| {
            let id = Uuid::parse_str(&v.r#ref.as_ref()?.volume_id).ok()?;
            Some((id, Uuid::parse_str(&v.parent_volume_id).ok()))
        })
        .collect()
}

/// Deletes `doomed` volumes of one image, children before their parents.
async fn delete_children_first(
    cx: &SagaCx<App>,
    host: &db::Host,
    domain_id: Uuid,
    image_id: Uuid,
    parents: &HashMap<Uuid, Option<Uuid>>,
    mut doomed: HashSet<Uuid>,
) -> Result<(), Status> {
    while !doomed.is_empty() {
        let leaves: Vec<Uuid> = doomed
            .iter()
            .copied()
            .filter(|v| {
                !doomed
                    .iter()
                    .any(|c| parents.get(c).copied().flatten() == Some(*v))
            })
            .collect();
        if leaves.is_empty() {
            return Err(Status::internal(format!(
                "image {image_id} has a volume cycle; refusing to delete"
            )));
        }
        for v in leaves {
            let r = VolumeRef {
                domain_id,
                image_id,
                volume_id: v,
            };
            delete_volume(&cx.app, host, &r, cx.stable_id(&format!("delete/{v}"))).await?;
            doomed.remove(&v);
        }
    }
    Ok(())
}

/// Deletes every volume of each of the VM's disk images that no snapshot of
/// the VM can reach (neither a snapshot's volume nor one of its ancestors):
/// the leftovers of a preview, a commit, a stateless run or a failed step.
/// Safe because the caller holds the VM lock and images belong to one VM.
pub async fn collect_garbage(cx: &SagaCx<App>, host: &db::Host, vm_id: Uuid) -> Result<(), Status> {
    let disks = cx.db().vm_disks(vm_id).await.map_err(db_status)?;
    let snaps = cx.db().list_snapshots(vm_id).await.map_err(db_status)?;
    for disk in disks {
        let volumes = image_volumes(&cx.app, host, disk.domain_id, disk.image_id).await?;
        let parents = parents(&volumes);
        let mut keep = HashSet::new();
        for d in snaps
            .iter()
            .flat_map(|s| &s.disks)
            .filter(|d| d.disk_id == disk.disk_id)
        {
            let mut cur = Some(d.volume.volume_id);
            while let Some(v) = cur {
                if !keep.insert(v) {
                    break;
                }
                cur = parents.get(&v).copied().flatten();
            }
        }
        if keep.is_empty() {
            // No snapshot points into the image: the model is not what this
            // step expects; deleting the whole disk would be the wrong guess.
            tracing::warn!(vm = %vm_id, disk = %disk.disk_id, "no snapshot points into the image; leaving it");
            continue;
        }
        let doomed: HashSet<Uuid> = parents.keys().filter(|v| !keep.contains(v)).copied().collect();
        delete_children_first(cx, host, disk.domain_id, disk.image_id, &parents, doomed).await?;
    }
    Ok(())
}

/// Deletes every volume of an image, children first.
pub async fn delete_image(
    cx: &SagaCx<App>,
    host: &db::Host,
    domain_id: Uuid,
    image_id: Uuid,
) -> Result<(), Status> {
    let volumes = match image_volumes(&cx.app, host, domain_id, image_id).await {
        Ok(v) => v,
        Err(s) if s.code() == Code::NotFound => return Ok(()),
        Err(s) => return Err(s),
    };
    let parents = parents(&volumes);
    let doomed = parents.keys().copied().collect();
    delete_children_first(cx, host, domain_id, image_id, &parents, doomed).await
}

/// Puts a VM left with a STATELESS snapshot back to the state it was run
/// from: the ACTIVE snapshot of the run is deleted with its overlays, the
/// STATELESS one is ACTIVE again (with the memory it had, so that the next
/// stateless run restores it again). Nothing to do without one.
pub async fn end_stateless(cx: &SagaCx<App>, host: &db::Host, vm_id: Uuid) -> Result<(), Status> {
    let db = cx.db();
    let stateless = db
        .snapshot_by_vm_type(vm_id, SnapshotType::Stateless)
        .await
        .map_err(db_status)?;
    // The run's ACTIVE memory, if it still has one (it is the STATELESS
    // snapshot's, so it normally stays).
    let memory = match &stateless {
        Some(_) => db.active_snapshot(vm_id).await.ok().and_then(|a| a.memory),
        None => None,
    };
    if stateless.is_some() {
        db.stateless_end(vm_id).await.map_err(db_status)?;
    }
    collect_garbage(cx, host, vm_id).await?;
    if let Some(m) = memory {
        release_memory(cx, host, &m, "stateless-run-memory").await?;
    }
    cx.app.notify_vm(vm_id);
    Ok(())
}

/// What ending a preview (undo or commit) needs to know before it changes
/// anything: the previewed snapshot (the operation's result) and every
/// memory pair the VM's snapshots hold, to release (reference counted)
/// once the snapshots the change deletes are gone.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct PreviewEnd {
    pub snapshot_id: Uuid,
    pub memories: Vec<MemoryVolume>,
}

pub async fn preview_end_plan(cx: &SagaCx<App>, vm_id: Uuid) -> Result<PreviewEnd, Status> {
    let db = cx.db();
    let in_preview = db
        .snapshot_by_vm_type(vm_id, SnapshotType::Preview)
        .await
        .map_err(db_status)?
        .is_some();
    let previewed = db
        .snapshot_by_vm_type_status(vm_id, SnapshotType::Regular, db::SnapshotStatus::InPreview)
        .await
        .map_err(db_status)?;
    match previewed {
        Some(s) if in_preview => Ok(PreviewEnd {
            snapshot_id: s.id,
            memories: vm_memories(cx, vm_id).await?,
        }),
        _ => Err(status::failed_precondition(
            "VM_NOT_IN_PREVIEW",
            &format!("vm/{vm_id}"),
            format!("VM {vm_id} is not previewing a snapshot"),
        )),
    }
}

/// Runs a StorageService copy to its end, reporting `done + copied` of
/// `total` as the operation's progress; the copied volume. A cancelled
/// operation stops waiting (the copy goes on in the StorageService, and the
/// undo deletes it once it is done: DeleteVolume refuses a running copy).
/// A copy's result: the target volume, and the checksum of what the copy
/// wrote when the request asked for one and this call ran the copy.
pub struct Copied {
    pub volume: VolumeRef,
    pub checksum: Option<String>,
}

pub async fn copy_volume(
    cx: &SagaCx<App>,
    host: &db::Host,
    req: storage::CopyVolumeRequest,
    done: u64,
    total: u64,
) -> Result<Copied, Status> {
    let mut stream = cx
        .app
        .on_domain_writer(&req.target_domain_id, host, |mut c| {
            let req = req.clone();
            async move { c.copy_volume(req).await }
        })
        .await
        .map_err(|s| downstream("copying a volume", s))?
        .into_inner();
    loop {
        tokio::select! {
            msg = stream.message() => {
                match msg.map_err(|s| downstream("copying a volume", s))? {
                    Some(m) => {
                        if let Some(pr) = m.progress {
                            cx.progress(done + pr.processed_bytes, total).await;
                        }
                        if let Some(v) = m.volume {
                            return Ok(Copied {
                                volume: from_wire_ref(v.r#ref.as_ref())?,
                                checksum: Some(m.checksum).filter(|c| !c.is_empty()),
                            });
                        }
                    }
                    None => return Err(Status::unavailable("the copy stream ended without a volume")),
                }
            }
            _ = cx.cancel.cancelled() => return Err(Status::cancelled("cancelled by request")),
        }
    }
}

/// Deletes volumes given parents first, children first (in reverse);
/// "already gone" is success.
pub async fn delete_volumes_reversed(
    cx: &SagaCx<App>,
    host: &db::Host,
    volumes: &[VolumeRef],
    purpose: &str,
) -> Result<(), Status> {
    for v in volumes.iter().rev() {
        delete_volume(
            &cx.app,
            host,
            v,
            cx.stable_id(&format!("{purpose}/{}/{}", v.domain_id, v.volume_id)),
        )
        .await?;
    }
    Ok(())
}

// --- volumes a saga claims -----------------------------------------------------
//
// A saga that copies volumes under ids it does not choose (an import keeps
// the exported ids, an export the VM's) must never delete, when it unwinds,
// a volume that was there before it: it claims each target in its record
// before it asks the storage for it, and its undo deletes only what it
// claimed.

/// Copies one planned volume as this saga's own. The target is claimed in
/// the saga's record before the storage is asked for it, and only if it is
/// not there yet: a target that exists without this saga's claim is
/// someone else's (FAILED_PRECONDITION VOLUME_EXISTS with `hint`, and the
/// undo leaves it alone); one that appears between the check and the copy
/// makes the storage refuse the copy (ALREADY_EXISTS of the volume), and
/// the claim is withdrawn. A replay finds its claim and the storage answers
/// the copy's request id with the volume it made.
pub async fn copy_own(
    cx: &SagaCx<App>,
    h: &db::Host,
    c: &PlannedCopy,
    done: &mut u64,
    total: u64,
    description: &str,
    hint: &str,
) -> Result<(), Status> {
    copy_own_checked(cx, h, c, (done, total), description, hint, false)
        .await
        .map(drop)
}

/// [`copy_own`]; with `checksum`, the copy also computes the `blake3-4m`
/// checksum of what it wrote (a memory dump), returned when it ran now.
pub async fn copy_own_checked(
    cx: &SagaCx<App>,
    h: &db::Host,
    c: &PlannedCopy,
    (done, total): (&mut u64, u64),
    description: &str,
    hint: &str,
    checksum: bool,
) -> Result<Option<String>, Status> {
    let db = cx.db();
    let claimed = db
        .saga_volumes(cx.saga_id)
        .await
        .map_err(db_status)?
        .contains(&c.target);
    if !claimed {
        if volume_present(&cx.app, h, &c.target).await? {
            return Err(volume_exists(&cx.app, &c.target, hint).await);
        }
        db.claim_saga_volume(cx.saga_id, &c.target)
            .await
            .map_err(db_status)?;
    }
    match run_copies(cx, h, std::slice::from_ref(c), done, total, description, checksum)
        .await
        .map(|sums| sums.into_iter().next().flatten())
    {
        Err(s)
            if s.code() == Code::AlreadyExists
                && s.get_error_details()
                    .resource_info()
                    .is_some_and(|r| r.resource_type == "volume") =>
        {
            db.release_saga_volume(cx.saga_id, &c.target)
                .await
                .map_err(db_status)?;
            Err(volume_exists(&cx.app, &c.target, hint).await)
        }
        other => other,
    }
}

/// The volumes of `planned` this saga claimed (see [`copy_own`]), in the
/// order given.
pub async fn own_volumes(cx: &SagaCx<App>, planned: &[VolumeRef]) -> Result<Vec<VolumeRef>, Status> {
    let own: HashSet<VolumeRef> = cx
        .db()
        .saga_volumes(cx.saga_id)
        .await
        .map_err(db_status)?
        .into_iter()
        .collect();
    Ok(planned.iter().copied().filter(|t| own.contains(t)).collect())
}

/// Whether the volume is on its domain.
pub async fn volume_present(app: &App, h: &db::Host, r: &VolumeRef) -> Result<bool, Status> {
    match app
        .storage_client(h)?
        .get_volume(storage::GetVolumeRequest {
            r#ref: Some(to_wire_ref(r)),
        })
        .await
    {
        Ok(_) => Ok(true),
        Err(s)
            if s.code() == Code::NotFound
                && s.get_error_details()
                    .resource_info()
                    .is_some_and(|i| i.resource_type == "volume") =>
        {
            Ok(false)
        }
        Err(s) => Err(downstream("looking for a copy's target volume", s)),
    }
}

/// FAILED_PRECONDITION VOLUME_EXISTS for a volume a saga would create,
/// naming the VM that uses its image when there is one; `hint` says what to
/// do instead.
pub async fn volume_exists(app: &App, t: &VolumeRef, hint: &str) -> Status {
    let owner = match app.db.vm_using_image(t.image_id).await {
        Ok(Some((id, name))) => format!(" (its image is VM {name}'s, {id})"),
        _ => String::new(),
    };
    status::failed_precondition(
        "VOLUME_EXISTS",
        &format!("domain/{}/images/{}/{}", t.domain_id, t.image_id, t.volume_id),
        format!(
            "volume {}/{} exists on storage domain {} already{owner}: {hint}",
            t.image_id, t.volume_id, t.domain_id
        ),
    )
}
