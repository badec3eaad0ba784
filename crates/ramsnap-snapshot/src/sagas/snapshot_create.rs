//! Create a snapshot, with or without the VM's memory (oVirt's
//! CreateAllSnapshotsFromVm + SnapshotVDSCommand): the VM is locked for the
//! whole operation; the memory volumes go to a domain with room (the VM's
//! disk domain first); each disk gets a new COW overlay over its current
//! leaf; the host takes the snapshot (overlays + memory); then the new
//! snapshot points at the frozen volumes and the active one at the overlays.
use super::common::{
    delete_volume, lock_vm_node, locked_vm, release_memory, unlock_vm_node, MadeSnapshot, OnVm,
};
use crate::app::{db_status, App};
use crate::convert::{downstream, from_wire_ref, to_wire_memory, to_wire_ref};
use crate::db::{self, MemoryVolume, NewSnapshot, SnapshotDisk, SnapshotStatus, SnapshotType, VolumeRef};
use crate::saga::{Node, Output, SagaCx, SagaDef};
use futures::future::BoxFuture;
use futures::FutureExt;
use ramsnap_proto::host::v1 as host;
use ramsnap_proto::storage::v1 as storage;
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};
use uuid::Uuid;

pub const NAME: &str = "snapshot_create";

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum MemoryMode {
    Paused,
    Live,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Params {
    pub vm_id: Uuid,
    pub description: String,
    pub save_memory: bool,
    pub mode: MemoryMode,
    /// Whether the VM was running when the request was accepted (a
    /// running VM's snapshot goes through its host).
    pub vm_running: bool,
}

impl OnVm for Params {
    fn vm_id(&self) -> Uuid {
        self.vm_id
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Overlay {
    disk_id: Uuid,
    current: VolumeRef,
    overlay: VolumeRef,
}

pub fn definition() -> SagaDef<App> {
    SagaDef {
        name: NAME,
        nodes: vec![
            lock_vm_node::<Params>(false),
            Node::new(IDS, ids_fwd).undo(noop).local(),
            // Without memory it makes no call: local.
            Node::new(MEMORY_VOLUMES, memory_fwd)
                .undo(memory_undo)
                .local_if(|p| p.get("save_memory") == Some(&serde_json::Value::Bool(false))),
            Node::new(OVERLAYS, overlays_fwd).undo(overlays_undo),
            Node::new(Output::new("record_snapshot"), record_fwd)
                .undo(record_undo)
                .local(),
            Node::new(HOST_SNAPSHOT, host_fwd).undo(noop),
            // Past the point of no return: the VM now writes to the overlays.
            Node::new(Output::new("commit"), commit_fwd),
            unlock_vm_node::<Params>(),
        ],
        result_node: Some(IDS.name),
    }
}

const IDS: Output<MadeSnapshot> = Output::new("ids");
/// The memory volumes made for the snapshot; None (null in the log) when
/// it saves no memory.
const MEMORY_VOLUMES: Output<Option<MemoryJson>> = Output::new("memory_volumes");
/// Each disk's current leaf and the overlay made over it.
const OVERLAYS: Output<Vec<Overlay>> = Output::new("overlays");
const HOST_SNAPSHOT: Output<HostSnapshot> = Output::new("host_snapshot");

/// What the host's snapshot answered (a down VM's: nothing saved).
#[derive(Debug, Default, Serialize, Deserialize)]
struct HostSnapshot {
    memory_saved: bool,
    #[serde(default)]
    dump_bytes: u64,
    #[serde(default)]
    guest_pause_ms: u64,
}

impl From<&host::SnapshotResult> for HostSnapshot {
    fn from(r: &host::SnapshotResult) -> HostSnapshot {
        HostSnapshot {
            memory_saved: r.memory_saved,
            dump_bytes: r.dump_bytes,
            guest_pause_ms: r.guest_pause_ms,
        }
    }
}

/// The snapshot's memory volumes, if it saves memory and they were made.
fn memory_volumes(cx: &SagaCx<App>) -> Option<MemoryVolume> {
    cx.get_if_ran(MEMORY_VOLUMES).flatten().map(|m| m.volumes())
}

fn noop(_: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async { Ok(()) }.boxed()
}

fn ids_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<MadeSnapshot, Status>> {
    async move {
        Ok(MadeSnapshot {
            snapshot_id: cx.stable_id("snapshot"),
        })
    }
    .boxed()
}

fn snapshot_id(cx: &SagaCx<App>) -> Result<Uuid, Status> {
    Ok(cx.get(IDS)?.snapshot_id)
}

/// The VM and its host, read once per execution (the saga holds the VM's
/// lock: what the nodes use of them does not change).
async fn vm_and_host(cx: &SagaCx<App>) -> Result<(db::Vm, db::Host), Status> {
    cx.memo("vm_and_host", || async {
        let p: Params = cx.params()?;
        let vm = locked_vm(cx, p.vm_id).await?;
        let host = cx.app.host_for_vm(&vm).await?;
        Ok((vm, host))
    })
    .await
}

fn memory_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Option<MemoryJson>, Status>> {
    async move {
        let p: Params = cx.params()?;
        if !p.save_memory {
            return Ok(None);
        }
        let (vm, host) = vm_and_host(cx).await?;
        let description = format!("memory of snapshot {} of VM {}", snapshot_id(cx)?, vm.name);
        let m = make_memory_volumes(cx, &vm, &host, p.mode, description).await?;
        Ok(Some(memory_json(&m)))
    }
    .boxed()
}

/// A memory volume pair for the VM's RAM: on the VM's disk domain, or
/// when it has no room, on the domain with the most free space. One request
/// id per domain tried (from the saga), so a replay finds its volumes.
pub(crate) async fn make_memory_volumes(
    cx: &SagaCx<App>,
    vm: &db::Vm,
    host: &db::Host,
    mode: MemoryMode,
    description: String,
) -> Result<MemoryVolume, Status> {
    let mut client = cx.app.storage_client(host)?;
    let mode = match mode {
        MemoryMode::Paused => storage::MemoryDumpMode::Paused,
        MemoryMode::Live => storage::MemoryDumpMode::Live,
    };
    // The VM's disk domain first; only when it has no room, the others
    // by free space (listing them costs a look at every domain).
    let mut domains = vec![vm.disk_domain_id];
    let mut listed = false;
    let mut last = Status::resource_exhausted("no storage domain has room for the memory volumes");
    while let Some(domain) = domains.pop() {
        let req = storage::CreateMemoryVolumesRequest {
            // One request id per domain tried, so a replay finds its volumes.
            request_id: cx.stable_id(&format!("memory/{domain}")).to_string(),
            domain_id: domain.to_string(),
            memory_bytes: vm.memory_bytes,
            mode: mode as i32,
            description: description.clone(),
        };
        let made = cx
            .app
            .on_domain_writer(&req.domain_id, host, |mut c| {
                let req = req.clone();
                async move { c.create_memory_volumes(req).await }
            })
            .await;
        match made {
            Ok(r) => {
                let r = r.into_inner();
                let m = MemoryVolume {
                    dump: from_wire_ref(r.dump.as_ref().and_then(|v| v.r#ref.as_ref()))?,
                    metadata: from_wire_ref(r.metadata.as_ref().and_then(|v| v.r#ref.as_ref()))?,
                };
                return Ok(m);
            }
            Err(s) if matches!(s.code(), Code::ResourceExhausted | Code::NotFound) => last = s,
            Err(s) => return Err(downstream("creating the memory volumes", s)),
        }
        if !listed {
            listed = true;
            if let Ok(list) = client.list_domains(storage::ListDomainsRequest {}).await {
                let mut others: Vec<_> = list.into_inner().domains;
                // Popped from the end: the most free space last.
                others.sort_by_key(|d| d.free_bytes);
                domains.extend(
                    others
                        .iter()
                        .filter_map(|d| Uuid::parse_str(&d.domain_id).ok())
                        .filter(|d| *d != vm.disk_domain_id),
                );
            }
        }
    }
    Err(last)
}

fn memory_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let Some(m) = memory_volumes(cx) else {
            return Ok(());
        };
        let (_, host) = vm_and_host(cx).await?;
        delete_volume(&cx.app, &host, &m.dump, cx.stable_id("undo/memory/dump")).await?;
        delete_volume(&cx.app, &host, &m.metadata, cx.stable_id("undo/memory/metadata")).await
    }
    .boxed()
}

fn overlays_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Vec<Overlay>, Status>> {
    async move {
        let (vm, host) = vm_and_host(cx).await?;
        let active = cx
            .db()
            .active_disks_with_capacity(vm.id)
            .await
            .map_err(db_status)?;
        let mut out = Vec::new();
        for (d, capacity) in &active {
            let overlay_id = cx.stable_id(&format!("overlay/{}", d.disk_id));
            let req = storage::CreateVolumeRequest {
                request_id: cx
                    .stable_id(&format!("overlay-request/{}", d.disk_id))
                    .to_string(),
                domain_id: d.volume.domain_id.to_string(),
                image_id: d.volume.image_id.to_string(),
                volume_id: overlay_id.to_string(),
                capacity_bytes: capacity.ok_or_else(|| {
                    Status::internal(format!("disk {} of VM {} is not recorded", d.disk_id, vm.id))
                })?,
                format: storage::VolumeFormat::Cow as i32,
                allocation: storage::VolumeAllocation::Unspecified as i32,
                purpose: storage::VolumePurpose::Disk as i32,
                parent_volume_id: d.volume.volume_id.to_string(),
                description: format!("active layer after snapshot {}", snapshot_id(cx)?),
            };
            let v = cx
                .app
                .on_domain_writer(&req.domain_id, &host, |mut c| {
                    let req = req.clone();
                    async move { c.create_volume(req).await }
                })
                .await
                .map_err(|s| downstream("creating a disk overlay", s))?;
            let overlay = from_wire_ref(v.into_inner().volume.as_ref().and_then(|v| v.r#ref.as_ref()))?;
            out.push(Overlay {
                disk_id: d.disk_id,
                current: d.volume,
                overlay,
            });
        }
        Ok(out)
    }
    .boxed()
}

fn overlays_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let (vm, host) = vm_and_host(cx).await?;
        let active = cx
            .db()
            .active_disks_with_capacity(vm.id)
            .await
            .map_err(db_status)?;
        // Whatever this saga may have made, whether or not the step finished.
        for (d, _) in &active {
            let overlay = VolumeRef {
                domain_id: d.volume.domain_id,
                image_id: d.volume.image_id,
                volume_id: cx.stable_id(&format!("overlay/{}", d.disk_id)),
            };
            if overlay.volume_id == d.volume.volume_id {
                continue; // never delete what the VM uses
            }
            delete_volume(
                &cx.app,
                &host,
                &overlay,
                cx.stable_id(&format!("undo/overlay/{}", d.disk_id)),
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
        let id = snapshot_id(cx)?;
        let overlays = cx.get(OVERLAYS)?;
        let memory = memory_volumes(cx);
        let new = NewSnapshot {
            id,
            vm_id: p.vm_id,
            snapshot_type: SnapshotType::Regular,
            status: SnapshotStatus::Locked,
            description: p.description.clone(),
            memory,
        };
        let disks: Vec<SnapshotDisk> = overlays
            .iter()
            .map(|o| SnapshotDisk {
                disk_id: o.disk_id,
                volume: o.current,
            })
            .collect();
        match cx.db().create_snapshot(&new, &disks).await {
            Ok(_) => Ok(()),
            // A replay: recorded before (a read only then, not every time).
            Err(e @ db::DbError::Conflict { .. }) => match cx.db().get_snapshot(id).await {
                Ok(_) => Ok(()),
                Err(_) => Err(db_status(e)),
            },
            Err(e) => Err(db_status(e)),
        }
    }
    .boxed()
}

fn record_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        if let Ok(id) = snapshot_id(cx) {
            cx.db().delete_snapshot(id).await.map_err(db_status)?;
        }
        Ok(())
    }
    .boxed()
}

fn host_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<HostSnapshot, Status>> {
    async move {
        let p: Params = cx.params()?;
        if !p.vm_running {
            // A down VM's disks simply continue on the overlays.
            return Ok(HostSnapshot::default());
        }
        let (vm, host) = vm_and_host(cx).await?;
        let cluster = cx.db().cluster_cached(vm.cluster_id).await.map_err(db_status)?;
        let overlays = cx.get(OVERLAYS)?;
        let memory = memory_volumes(cx);
        let job_id = cx.stable_id("host-job");
        let req = host::SnapshotVmRequest {
            job_id: job_id.to_string(),
            vm_id: vm.id.to_string(),
            snapshot_id: snapshot_id(cx)?.to_string(),
            disks: overlays
                .iter()
                .map(|o| host::SnapshotDisk { current: Some(to_wire_ref(&o.current)), overlay: Some(to_wire_ref(&o.overlay)) })
                .collect(),
            memory: memory.as_ref().map(to_wire_memory),
            mode: match p.mode {
                MemoryMode::Paused => host::SnapshotMode::Paused,
                MemoryMode::Live => host::SnapshotMode::Live,
            } as i32,
            compatibility_version: cluster.compatibility_version.to_string(),
        };
        let mut client = cx.app.host_client(&host)?;
        let mut stream = client.snapshot_vm(req).await.map_err(|s| downstream("host snapshot", s))?.into_inner();
        loop {
            tokio::select! {
                msg = stream.message() => {
                    match msg.map_err(|s| downstream("host snapshot", s))? {
                        Some(m) => {
                            if let Some(pr) = m.progress {
                                cx.progress(pr.processed_bytes, pr.total_bytes).await;
                            }
                            if let Some(r) = m.result {
                                return Ok(HostSnapshot::from(&r));
                            }
                        }
                        None => return Err(Status::unavailable("the host's snapshot stream ended without a result")),
                    }
                }
                _ = cx.cancel.cancelled() => {
                    client
                        .cancel_snapshot(host::CancelSnapshotRequest { job_id: job_id.to_string() })
                        .await
                        .map_err(|s| downstream("cancelling the host snapshot", s))?;
                    // The host unwinds its side; wait for its answer. A cancel
                    // that came too late finds the snapshot taken: the VM
                    // writes to the overlays, so the saga must go on.
                    loop {
                        match stream.message().await.map_err(|s| downstream("host snapshot", s)) {
                            Ok(Some(m)) => {
                                if let Some(r) = m.result {
                                    tracing::info!(vm = %vm.id, "cancel came after the host took the snapshot: it stands");
                                    return Ok(HostSnapshot::from(&r));
                                }
                            }
                            Ok(None) => return Err(Status::unavailable("the host's snapshot stream ended without a result")),
                            Err(s) if s.code() == Code::Cancelled => return Err(Status::cancelled("cancelled by request")),
                            Err(s) => return Err(s),
                        }
                    }
                }
            }
        }
    }
    .boxed()
}

fn commit_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let id = snapshot_id(cx)?;
        let overlays = cx.get(OVERLAYS)?;
        let result = cx.get(HOST_SNAPSHOT)?;
        let disks: Vec<SnapshotDisk> = overlays
            .iter()
            .map(|o| SnapshotDisk {
                disk_id: o.disk_id,
                volume: o.overlay,
            })
            .collect();
        cx.db()
            .snapshot_taken_on_active(p.vm_id, id, &disks)
            .await
            .map_err(db_status)?;
        // Memory asked for but not taken (the host fell back to disk-only):
        // the snapshot must not claim it.
        if let Some(m) = memory_volumes(cx) {
            if !p.vm_running || !result.memory_saved {
                cx.db().remove_memory(id).await.map_err(db_status)?;
                let (_, host) = vm_and_host(cx).await?;
                release_memory(cx, &host, &m, "unused-memory").await?;
            }
        }
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}

/// A memory volume pair as the log keeps it: each volume as [domain,
/// image, volume].
#[derive(Serialize, Deserialize)]
pub(crate) struct MemoryJson {
    dump: [Uuid; 3],
    metadata: [Uuid; 3],
}

pub(crate) fn memory_json(m: &MemoryVolume) -> MemoryJson {
    let a = |r: &VolumeRef| [r.domain_id, r.image_id, r.volume_id];
    MemoryJson {
        dump: a(&m.dump),
        metadata: a(&m.metadata),
    }
}

impl MemoryJson {
    pub(crate) fn volumes(&self) -> MemoryVolume {
        let r = |a: [Uuid; 3]| VolumeRef {
            domain_id: a[0],
            image_id: a[1],
            volume_id: a[2],
        };
        MemoryVolume {
            dump: r(self.dump),
            metadata: r(self.metadata),
        }
    }
}
