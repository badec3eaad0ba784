//! Suspend a running VM (oVirt's HibernateVmCommand): memory volumes are
//! made, the VM is SAVING_STATE, its host saves the guest's memory into
//! them and stops it (no overlay: the disks stay exactly as they are), and
//! the memory goes on the ACTIVE snapshot, the VM SUSPENDED. `vm_run` then
//! resumes it the way it resumes any ACTIVE snapshot's memory (and frees
//! the volumes once the guest runs); `vm_stop` discards it.
//!
//! A failed save leaves the guest running: the VM is back to what its host
//! reports, and the volumes are deleted.
use super::common::{delete_volume, lock_vm_node, noop, unlock_vm_node, vm_and_host, OnVm};
use super::snapshot_create::{make_memory_volumes, memory_json, MemoryJson, MemoryMode};
use crate::app::{db_status, App};
use crate::convert::{downstream, to_wire_memory, to_wire_ref};
use crate::db::{MemoryVolume, VmStatus};
use crate::saga::{Node, Output, SagaCx, SagaDef};
use crate::status;
use futures::future::BoxFuture;
use futures::FutureExt;
use ramsnap_common::status as st;
use ramsnap_proto::host::v1 as host;
use serde::{Deserialize, Serialize};
use tonic::Status;
use uuid::Uuid;

pub const NAME: &str = "vm_suspend";

#[derive(Debug, Serialize, Deserialize)]
pub struct Params {
    pub vm_id: Uuid,
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
            lock_vm_node::<Params>(false),
            Node::new(Output::new("check"), check_fwd).undo(noop).local(),
            Node::new(MEMORY_VOLUMES, memory_fwd).undo(memory_undo),
            Node::new(Output::new("saving_state"), saving_fwd)
                .undo(saving_undo)
                .local(),
            Node::new(HOST_SUSPEND, host_fwd).undo(noop),
            // Past the point of no return: the guest is gone, its memory is
            // only in the volumes.
            Node::new(Output::new("suspended"), suspended_fwd),
            unlock_vm_node::<Params>(),
        ],
        result_node: None,
    }
}

const MEMORY_VOLUMES: Output<MemoryJson> = Output::new("memory_volumes");
const HOST_SUSPEND: Output<Saved> = Output::new("host_suspend");

/// What the host answered.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    dump_bytes: u64,
    duration_ms: u64,
}

fn memory(cx: &SagaCx<App>) -> Result<MemoryVolume, Status> {
    Ok(cx.get(MEMORY_VOLUMES)?.volumes())
}

/// Under the lock: the VM is UP (not paused, not starting), not a stateless
/// run, and its ACTIVE snapshot holds no memory (it cannot, once it runs).
fn check_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let db = cx.db();
        let vm = db.get_vm(p.vm_id).await.map_err(db_status)?;
        crate::service::require_up(&vm, "only a VM that is up can be suspended")?;
        let types = db.snapshot_types(p.vm_id).await.map_err(db_status)?;
        if types.contains(&crate::db::SnapshotType::Stateless) {
            return Err(st::failed_precondition(
                "VM_STATELESS_RUN",
                &format!("vm/{}", vm.id),
                format!(
                    "VM {} runs stateless: its run is discarded when it stops, not suspended",
                    vm.name
                ),
            ));
        }
        let active = db.active_snapshot(p.vm_id).await.map_err(db_status)?;
        if active.memory.is_some() {
            return Err(Status::internal(format!(
                "VM {} runs, yet its ACTIVE snapshot holds memory",
                vm.name
            )));
        }
        Ok(())
    }
    .boxed()
}

fn memory_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<MemoryJson, Status>> {
    async move {
        let p: Params = cx.params()?;
        let (vm, host) = vm_and_host(cx, p.vm_id).await?;
        let m = make_memory_volumes(
            cx,
            &vm,
            &host,
            MemoryMode::Paused,
            format!("memory of suspended VM {}", vm.name),
        )
        .await?;
        Ok(memory_json(&m))
    }
    .boxed()
}

fn memory_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let Some(m) = cx.get_if_ran(MEMORY_VOLUMES).map(|m| m.volumes()) else {
            return Ok(());
        };
        let (_, host) = vm_and_host(cx, cx.params::<Params>()?.vm_id).await?;
        delete_volume(&cx.app, &host, &m.dump, cx.stable_id("undo/memory/dump")).await?;
        delete_volume(&cx.app, &host, &m.metadata, cx.stable_id("undo/memory/metadata")).await
    }
    .boxed()
}

/// SAVING_STATE; the status follower stops, so that the host's DOWN at the
/// end of the save is not recorded as a stop.
fn saving_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        status::unfollow(&cx.app, p.vm_id);
        cx.db()
            .set_vm_status(p.vm_id, VmStatus::SavingState)
            .await
            .map_err(db_status)?;
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}

/// The save failed: the guest runs on. Its host says in what state.
fn saving_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let (_, host) = vm_and_host(cx, p.vm_id).await?;
        cx.db()
            .set_vm_status(p.vm_id, VmStatus::Up)
            .await
            .map_err(db_status)?;
        cx.app.notify_vm(p.vm_id);
        status::follow(&cx.app, p.vm_id, host);
        Ok(())
    }
    .boxed()
}

fn host_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Saved, Status>> {
    async move {
        let p: Params = cx.params()?;
        let db = cx.db();
        let (vm, host) = vm_and_host(cx, p.vm_id).await?;
        let active = db.active_snapshot(p.vm_id).await.map_err(db_status)?;
        let disks = db.vm_disks(vm.id).await.map_err(db_status)?;
        // vda, vdb, ... in disk id order, as vm_run gives them.
        let leaves = disks
            .iter()
            .map(|d| {
                active
                    .disks
                    .iter()
                    .find(|a| a.disk_id == d.disk_id)
                    .map(|a| to_wire_ref(&a.volume))
                    .ok_or_else(|| Status::internal(format!("the active snapshot has no volume for disk {}", d.disk_id)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let req = host::SuspendVmRequest {
            vm_id: vm.id.to_string(),
            snapshot_id: active.id.to_string(),
            disks: leaves,
            memory: Some(to_wire_memory(&memory(cx)?)),
        };
        let r = cx
            .app
            .host_client(&host)?
            .suspend_vm(req)
            .await
            .map_err(|s| downstream("suspending the VM on its host", s))?
            .into_inner();
        tracing::info!(vm = %vm.id, dump_bytes = r.dump_bytes, ms = r.duration_ms, earlier = r.saved_earlier, "VM suspended");
        Ok(Saved {
            dump_bytes: r.dump_bytes,
            duration_ms: r.duration_ms,
        })
    }
    .boxed()
}

fn suspended_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let db = cx.db();
        let active = db.active_snapshot(p.vm_id).await.map_err(db_status)?;
        db.set_memory(active.id, &memory(cx)?).await.map_err(db_status)?;
        db.set_vm_status(p.vm_id, VmStatus::Suspended)
            .await
            .map_err(db_status)?;
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}
