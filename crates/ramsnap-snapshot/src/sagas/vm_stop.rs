//! Stop a VM (oVirt's StopVm / ShutdownVm): the host shuts the guest down
//! (gracefully within the timeout, then destroys it); the VM is Down. A
//! stateless VM then goes back to the state it was run from (oVirt's
//! RestoreStatelessVm): the run's ACTIVE snapshot and its overlays go, and
//! the STATELESS snapshot, with its memory, is ACTIVE again. Stopping a VM
//! that is down succeeds, and finishes a stateless run left behind.
//! Stopping a SUSPENDED VM discards its saved state: the memory leaves the
//! ACTIVE snapshot and its volumes are deleted; its next run boots.
use super::common::{end_stateless, lock_vm, noop, release_memory, unlock_vm, vm_and_host};
use crate::app::{db_status, App};
use crate::convert::downstream;
use crate::db::{MemoryVolume, VmStatus};
use crate::saga::{Node, Output, SagaCx, SagaDef};
use crate::status;
use futures::future::BoxFuture;
use futures::FutureExt;
use ramsnap_proto::host::v1 as host;
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};
use uuid::Uuid;

pub const NAME: &str = "vm_stop";

#[derive(Debug, Serialize, Deserialize)]
pub struct Params {
    pub vm_id: Uuid,
    pub graceful_timeout_seconds: u32,
}

pub fn definition() -> SagaDef<App> {
    SagaDef {
        name: NAME,
        nodes: vec![
            Node::new(Output::new("lock_vm"), lock_fwd)
                .undo(lock_undo)
                .local(),
            // Reversible so that an unreachable host fails the operation (and
            // frees the VM) instead of retrying for ever; there is nothing to
            // undo: the status follower reports whatever the host did.
            Node::new(STOP_ON_HOST, stop_fwd).undo(noop),
            Node::new(Output::new("stopped"), stopped_fwd),
            Node::new(Output::new("discard_saved_state"), discard_fwd),
            Node::new(Output::new("restore_stateless"), restore_stateless_fwd),
            Node::new(Output::new("unlock_vm"), unlock_fwd).local(),
        ],
        result_node: None,
    }
}

fn lock_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        lock_vm(cx, cx.params::<Params>()?.vm_id).await?;
        Ok(())
    }
    .boxed()
}

fn lock_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move { unlock_vm(cx, cx.params::<Params>()?.vm_id).await }.boxed()
}

fn unlock_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        unlock_vm(cx, cx.params::<Params>()?.vm_id).await?;
        Ok(())
    }
    .boxed()
}

/// Whether the guest shut down by itself (else it was destroyed); for a
/// suspended VM, the memory it was suspended with (to discard).
#[derive(Debug, Serialize, Deserialize)]
struct Stopped {
    graceful: bool,
    #[serde(default)]
    saved_state: Option<MemoryVolume>,
}

const STOP_ON_HOST: Output<Stopped> = Output::new("stop_on_host");

fn stop_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Stopped, Status>> {
    async move {
        let p: Params = cx.params()?;
        let vm = cx.db().get_vm(p.vm_id).await.map_err(db_status)?;
        // A suspended VM runs nowhere: what it has is its saved memory.
        if vm.status == VmStatus::Suspended {
            let active = cx.db().active_snapshot(vm.id).await.map_err(db_status)?;
            return Ok(Stopped {
                graceful: false,
                saved_state: active.memory,
            });
        }
        // A VM that never ran has no host to ask.
        if vm.host_id.is_none() && vm.status == VmStatus::Down {
            return Ok(Stopped {
                graceful: false,
                saved_state: None,
            });
        }
        let host = cx.app.host_for_vm(&vm).await?;
        let mut client = cx.app.host_client(&host)?;
        match client
            .stop_vm(host::StopVmRequest {
                vm_id: vm.id.to_string(),
                graceful_timeout_seconds: p.graceful_timeout_seconds,
            })
            .await
        {
            Ok(r) => Ok(Stopped {
                graceful: r.into_inner().graceful,
                saved_state: None,
            }),
            // The host does not know the VM: it is not running there.
            Err(s) if s.code() == Code::NotFound => Ok(Stopped {
                graceful: false,
                saved_state: None,
            }),
            Err(s) => Err(downstream("stopping the VM on its host", s)),
        }
    }
    .boxed()
}

fn stopped_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        status::unfollow(&cx.app, p.vm_id);
        cx.db()
            .set_vm_status(p.vm_id, VmStatus::Down)
            .await
            .map_err(db_status)?;
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}

/// A suspended VM's saved memory: off the ACTIVE snapshot, volumes deleted.
fn discard_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let Some(m) = cx.get(STOP_ON_HOST)?.saved_state else {
            return Ok(());
        };
        let db = cx.db();
        let active = db.active_snapshot(p.vm_id).await.map_err(db_status)?;
        if active.memory.as_ref() == Some(&m) {
            db.remove_memory(active.id).await.map_err(db_status)?;
        }
        let (_, host) = vm_and_host(cx, p.vm_id).await?;
        release_memory(cx, &host, &m, "discarded-saved-state").await?;
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}

fn restore_stateless_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let (_, host) = vm_and_host(cx, p.vm_id).await?;
        end_stateless(cx, &host, p.vm_id).await?;
        Ok(())
    }
    .boxed()
}
