//! Run a VM (oVirt's RunVmCommand). If its ACTIVE snapshot has memory and
//! the cluster is 3.3 or above, the host resumes the VM from it
//! (RESTORING_STATE, then UP) instead of booting it (POWERING_UP, then UP).
//! Once the host has started the VM, the memory is cleared from the ACTIVE
//! snapshot, and its volumes deleted unless another snapshot refers to them:
//! the guest now writes to the disks, which no longer match that memory.
//!
//! A stateless run first turns the ACTIVE snapshot into the STATELESS one
//! and runs on new overlays over its volumes; the new ACTIVE snapshot
//! points at the STATELESS one's memory, so each stateless run restores
//! the same memory (the STATELESS snapshot keeps it when the run's ACTIVE
//! drops it). StopVm goes back to the STATELESS state.
use super::common::{
    end_stateless, ensure_cow_volume, lock_vm, noop, release_memory, require_down, unlock_undo,
    unlock_vm_node, vm_and_host, OnVm,
};
use crate::app::{db_status, App};
use crate::convert::{downstream, to_wire_memory, to_wire_ref};
use crate::db::{self, MemoryVolume, NewSnapshot, SnapshotDisk, SnapshotStatus, SnapshotType, VolumeRef};
use crate::saga::{Node, Output, SagaCx, SagaDef};
use crate::status;
use futures::future::BoxFuture;
use futures::FutureExt;
use ramsnap_proto::host::v1 as host;
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};
use uuid::Uuid;

pub const NAME: &str = "vm_run";

#[derive(Debug, Serialize, Deserialize)]
pub struct Params {
    pub vm_id: Uuid,
    /// Chosen by the handler: the request's, or the VM's usual one.
    pub host_id: Uuid,
    /// The VM is stateless, or runs stateless this once.
    pub stateless: bool,
}

impl OnVm for Params {
    fn vm_id(&self) -> Uuid {
        self.vm_id
    }
}

/// What the host answered, and the memory the ACTIVE snapshot had.
#[derive(Debug, Serialize, Deserialize)]
struct Started {
    status: i32,
    restored: bool,
    active_memory: Option<MemoryVolume>,
}

pub fn definition() -> SagaDef<App> {
    SagaDef {
        name: NAME,
        nodes: vec![
            Node::new(LOCKED, lock_fwd).undo(unlock_undo::<Params>).local(),
            // A stateless run that ended without StopVm (the guest shut
            // down) left its STATELESS snapshot: go back to it first.
            Node::new(Output::new("restore_stateless"), restore_stateless_fwd).undo(noop),
            Node::new(STATELESS_OVERLAYS, overlays_fwd).undo(overlays_undo),
            Node::new(Output::new("stateless_begin"), stateless_begin_fwd).undo(stateless_begin_undo),
            Node::new(RUN_ON_HOST, run_fwd).undo(run_undo),
            // Past the point of no return: the guest runs.
            Node::new(Output::new("started"), started_fwd),
            unlock_vm_node::<Params>(),
        ],
        result_node: None,
    }
}

/// The lock taken; true when the VM was SUSPENDED (it resumes, and a
/// failed run leaves it suspended).
const LOCKED: Output<bool> = Output::new("lock_vm");
/// A stateless run's overlays, one per disk, on top of what the ACTIVE
/// snapshot had; None (null in the log) for a stateful run.
const STATELESS_OVERLAYS: Output<Option<Vec<SnapshotDisk>>> = Output::new("stateless_overlays");
const RUN_ON_HOST: Output<Started> = Output::new("run_on_host");

/// Takes the VM's lock and checks, under it, that the VM is down or
/// suspended.
fn lock_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<bool, Status>> {
    async move {
        let p: Params = cx.params()?;
        lock_vm(cx, p.vm_id).await?;
        let vm = cx.db().get_vm(p.vm_id).await.map_err(db_status)?;
        if vm.status == db::VmStatus::Suspended {
            return Ok(true);
        }
        require_down(&vm)?;
        Ok(false)
    }
    .boxed()
}

async fn run_host(cx: &SagaCx<App>) -> Result<db::Host, Status> {
    cx.app.host(cx.params::<Params>()?.host_id).await
}

fn restore_stateless_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let leftover = cx
            .app
            .db
            .snapshot_by_vm_type(p.vm_id, SnapshotType::Stateless)
            .await
            .map_err(db_status)?;
        if leftover.is_some() {
            let (_, host) = vm_and_host(cx, p.vm_id).await?;
            end_stateless(cx, &host, p.vm_id).await?;
        }
        Ok(())
    }
    .boxed()
}

fn overlay_id(cx: &SagaCx<App>, disk_id: Uuid) -> Uuid {
    cx.stable_id(&format!("stateless/{disk_id}"))
}

fn overlays_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Option<Vec<SnapshotDisk>>, Status>> {
    async move {
        let p: Params = cx.params()?;
        if !p.stateless {
            return Ok(None);
        }
        let host = run_host(cx).await?;
        let active = cx.db().active_snapshot(p.vm_id).await.map_err(db_status)?;
        let disks = cx.db().vm_disks(p.vm_id).await.map_err(db_status)?;
        let mut out = Vec::new();
        for d in &active.disks {
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
                cx.stable_id(&format!("stateless-request/{}", d.disk_id)),
                "stateless run layer".into(),
            )
            .await?;
            out.push(SnapshotDisk {
                disk_id: d.disk_id,
                volume: v,
            });
        }
        Ok(Some(out))
    }
    .boxed()
}

fn overlays_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        if !p.stateless {
            return Ok(());
        }
        let host = run_host(cx).await?;
        let active = cx.db().active_snapshot(p.vm_id).await.map_err(db_status)?;
        for d in &active.disks {
            let overlay = VolumeRef {
                volume_id: overlay_id(cx, d.disk_id),
                ..d.volume
            };
            if overlay.volume_id == d.volume.volume_id {
                continue; // never delete what the ACTIVE snapshot uses
            }
            super::common::delete_volume(
                &cx.app,
                &host,
                &overlay,
                cx.stable_id(&format!("undo/stateless/{}", d.disk_id)),
            )
            .await?;
        }
        Ok(())
    }
    .boxed()
}

fn stateless_begin_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        if !p.stateless {
            return Ok(());
        }
        let overlays = cx.get(STATELESS_OVERLAYS)?.unwrap_or_default();
        let db = cx.db();
        let active = db.active_snapshot(p.vm_id).await.map_err(db_status)?;
        // oVirt: the new ACTIVE snapshot points at the previous ACTIVE's
        // memory, which the run then restores.
        let new = NewSnapshot {
            id: cx.stable_id("stateless-active"),
            vm_id: p.vm_id,
            snapshot_type: SnapshotType::Active,
            status: SnapshotStatus::Ok,
            description: "Active VM (stateless run)".into(),
            memory: None,
        };
        db.stateless_begin(p.vm_id, &new, &overlays, active.memory.as_ref())
            .await
            .map_err(db_status)?;
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}

fn stateless_begin_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let db = cx.db();
        if let Ok(active) = db.active_snapshot(p.vm_id).await {
            if active.id == cx.stable_id("stateless-active") {
                db.stateless_end(p.vm_id).await.map_err(db_status)?;
            }
        }
        Ok(())
    }
    .boxed()
}

/// "ramsnap-" and the first eight hex digits of the VM id: the libvirt name.
pub fn domain_name(vm_id: Uuid) -> String {
    format!("ramsnap-{}", &vm_id.simple().to_string()[..8])
}

fn run_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Started, Status>> {
    async move {
        let p: Params = cx.params()?;
        let db = cx.db();
        let vm = db.get_vm(p.vm_id).await.map_err(db_status)?;
        let cluster = db.cluster_cached(vm.cluster_id).await.map_err(db_status)?;
        let active = db.active_snapshot(p.vm_id).await.map_err(db_status)?;
        let restore = active
            .memory
            .filter(|_| cluster.compatibility_version.supports_memory_snapshots());
        let host = run_host(cx).await?;
        let mut client = cx.app.host_client(&host)?;
        // "Ensure": a replay finds the VM already started.
        if let Ok(s) = client
            .get_vm_status(host::GetVmStatusRequest {
                vm_id: vm.id.to_string(),
            })
            .await
        {
            let s = s.into_inner().status;
            if !matches!(
                host::VmStatus::try_from(s),
                Ok(host::VmStatus::Down | host::VmStatus::Unspecified) | Err(_)
            ) {
                return Ok(started(s, restore.is_some(), active.memory));
            }
        }
        // vda, vdb, ... in disk id order, which is the order given at creation.
        let disks = db.vm_disks(vm.id).await.map_err(db_status)?;
        let spec_disks = disks
            .iter()
            .map(|d| {
                active
                    .disks
                    .iter()
                    .find(|a| a.disk_id == d.disk_id)
                    .map(|a| host::DiskSpec {
                        volume: Some(to_wire_ref(&a.volume)),
                    })
                    .ok_or_else(|| {
                        Status::internal(format!(
                            "the active snapshot has no volume for disk {}",
                            d.disk_id
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spec = host::VmSpec {
            vm_id: vm.id.to_string(),
            name: domain_name(vm.id),
            memory_bytes: vm.memory_bytes,
            vcpus: vm.vcpus,
            disks: spec_disks,
            kernel: vm.kernel.clone(),
            initrd: vm.initrd.clone(),
            cmdline: vm.cmdline.clone(),
        };
        let req = host::RunVmRequest {
            spec: Some(spec.clone()),
            restore_memory: restore.as_ref().map(to_wire_memory),
        };
        // The host answers once the guest is started, which for a restore
        // is when it is already UP: record the initial status first, so
        // watchers see RESTORING_STATE (or POWERING_UP) then UP, as oVirt
        // reports them.
        let initial = if restore.is_some() {
            db::VmStatus::RestoringState
        } else {
            db::VmStatus::PoweringUp
        };
        db.set_vm_status(vm.id, initial).await.map_err(db_status)?;
        cx.app.notify_vm(vm.id);
        match client.run_vm(req).await {
            Ok(r) => Ok(started(r.into_inner().status, restore.is_some(), active.memory)),
            // The host refuses the memory (its metadata does not match the
            // disks, or the dump is corrupt): the disks may have diverged
            // from it, so it is dropped and the VM boots instead of staying
            // unable to run. The operation says so.
            Err(s) if restore.is_some() && refused_memory(&s) => {
                let warning = format!(
                    "the host refused to restore the memory ({}): it is discarded and the VM boots",
                    s.message()
                );
                tracing::warn!(vm = %vm.id, error = %s, "restore refused; booting");
                if db.add_operation_warning(cx.operation_id, &warning).await.is_ok() {
                    cx.operation_changed();
                }
                db.set_vm_status(vm.id, db::VmStatus::PoweringUp)
                    .await
                    .map_err(db_status)?;
                cx.app.notify_vm(vm.id);
                let req = host::RunVmRequest {
                    spec: Some(spec),
                    restore_memory: None,
                };
                let r = client
                    .run_vm(req)
                    .await
                    .map_err(|s| downstream("running the VM on its host", s))?;
                Ok(started(r.into_inner().status, false, active.memory))
            }
            Err(s) if s.code() == Code::AlreadyExists => {
                // Started by an earlier attempt of this step.
                let status = client
                    .get_vm_status(host::GetVmStatusRequest {
                        vm_id: vm.id.to_string(),
                    })
                    .await
                    .map_err(|s| downstream("reading the VM's status on its host", s))?
                    .into_inner()
                    .status;
                Ok(started(status, restore.is_some(), active.memory))
            }
            Err(s) => Err(downstream("running the VM on its host", s)),
        }
    }
    .boxed()
}

/// A FAILED_PRECONDITION about the memory itself (MEMORY_DISKS_MISMATCH,
/// MEMORY_DUMP_CORRUPT, ...), as opposed to the VM or the host.
fn refused_memory(s: &Status) -> bool {
    use tonic_types::StatusExt;
    s.code() == Code::FailedPrecondition
        && s.get_error_details()
            .precondition_failure()
            .is_some_and(|p| p.violations.iter().any(|v| v.r#type.starts_with("MEMORY_")))
}

fn started(status: i32, restored: bool, active_memory: Option<MemoryVolume>) -> Started {
    Started {
        status,
        restored,
        active_memory,
    }
}

/// Makes sure no half-started guest is left on the host. A host that cannot
/// be reached has no guest of ours that it started for this step.
fn run_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let host = run_host(cx).await?;
        let mut client = cx.app.host_client(&host)?;
        match client
            .stop_vm(host::StopVmRequest {
                vm_id: p.vm_id.to_string(),
                graceful_timeout_seconds: 0,
            })
            .await
        {
            Ok(_) => {}
            Err(s) if matches!(s.code(), Code::NotFound | Code::Unavailable) => {
                tracing::warn!(vm = %p.vm_id, error = %s, "stopping a VM whose run failed");
            }
            Err(s) => return Err(downstream("stopping the VM after a failed run", s)),
        }
        // A suspended VM's memory is still on its ACTIVE snapshot: it stays
        // suspended. (A log written before this node said so has null.)
        let back = if cx.get(LOCKED).unwrap_or(false) {
            db::VmStatus::Suspended
        } else {
            db::VmStatus::Down
        };
        cx.db().set_vm_status(p.vm_id, back).await.map_err(db_status)?;
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}

fn started_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let s = cx.get(RUN_ON_HOST)?;
        let host = run_host(cx).await?;
        let db = cx.db();
        db.set_vm_host(p.vm_id, Some(host.id)).await.map_err(db_status)?;
        let vm_status = status::from_host(s.status).unwrap_or(if s.restored {
            db::VmStatus::RestoringState
        } else {
            db::VmStatus::PoweringUp
        });
        db.set_vm_status(p.vm_id, vm_status).await.map_err(db_status)?;
        cx.app.notify_vm(p.vm_id);
        status::follow(&cx.app, p.vm_id, host.clone());
        // The guest now writes to the disks: the memory no longer matches
        // them. Cleared for good, unless a snapshot (the previewed one, or a
        // stateless run's STATELESS one) still holds it.
        if let Some(m) = s.active_memory {
            let active = db.active_snapshot(p.vm_id).await.map_err(db_status)?;
            if active.memory.is_some() {
                db.remove_memory(active.id).await.map_err(db_status)?;
            }
            release_memory(cx, &host, &m, "run-memory").await?;
        }
        Ok(())
    }
    .boxed()
}
