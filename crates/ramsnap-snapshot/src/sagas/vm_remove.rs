//! Remove a down VM (oVirt's RemoveVm): every volume of its disk images
//! (children first), the memory volumes of its snapshots, then the VM row
//! (its disks and snapshots go with it). Past the point of no return once
//! it starts deleting: a half-removed VM is of no use, so it is finished.
use super::common::{delete_image, delete_volume, lock_down_vm, unlock_vm, vm_and_host};
use crate::app::{db_status, App};
use crate::saga::{Node, Output, SagaCx, SagaDef};
use crate::status;
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use tonic::Status;
use uuid::Uuid;

pub const NAME: &str = "vm_remove";

#[derive(Debug, Serialize, Deserialize)]
pub struct Params {
    pub vm_id: Uuid,
}

pub fn definition() -> SagaDef<App> {
    SagaDef {
        name: NAME,
        nodes: vec![
            Node::new(LOCK_VM, lock_fwd).undo(lock_undo).local(),
            Node::new(Output::new("delete_disks"), disks_fwd),
            Node::new(Output::new("delete_memory"), memory_fwd),
            Node::new(Output::new("delete_vm"), vm_fwd),
            // Last, so that the node indices of sagas logged before it
            // existed stay the same.
            Node::new(Output::new("forget_on_hosts"), forget_fwd),
        ],
        result_node: None,
    }
}

/// The VM's cluster, whose hosts forget the VM at the end (the VM row is
/// gone by then).
#[derive(Debug, Serialize, Deserialize)]
struct Locked {
    cluster_id: Uuid,
}

const LOCK_VM: Output<Locked> = Output::new("lock_vm");

fn lock_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Locked, Status>> {
    async move {
        let vm = lock_down_vm(cx, cx.params::<Params>()?.vm_id).await?;
        Ok(Locked {
            cluster_id: vm.cluster_id,
        })
    }
    .boxed()
}

fn lock_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move { unlock_vm(cx, cx.params::<Params>()?.vm_id).await }.boxed()
}

/// The VM's storage host; None when the VM row is already gone.
async fn host_if_vm(cx: &SagaCx<App>, vm_id: Uuid) -> Result<Option<crate::db::Host>, Status> {
    match cx.db().get_vm(vm_id).await {
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(db_status(e)),
        Ok(_) => Ok(Some(vm_and_host(cx, vm_id).await?.1)),
    }
}

fn disks_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let Some(host) = host_if_vm(cx, p.vm_id).await? else {
            return Ok(()); // the VM row is gone: a replay of the end
        };
        for disk in cx.db().vm_disks(p.vm_id).await.map_err(db_status)? {
            delete_image(cx, &host, disk.domain_id, disk.image_id).await?;
        }
        Ok(())
    }
    .boxed()
}

fn memory_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let Some(host) = host_if_vm(cx, p.vm_id).await? else {
            return Ok(());
        };
        let db = cx.db();
        let mut seen = HashSet::new();
        for s in db.list_snapshots(p.vm_id).await.map_err(db_status)? {
            let Some(m) = s.memory else { continue };
            if !seen.insert(m.dump.volume_id) {
                continue;
            }
            // Memory is never shared across VMs (a clone does not copy it);
            // checked all the same.
            let users = db
                .snapshots_referencing_memory(m.dump.volume_id)
                .await
                .map_err(db_status)?;
            if users.iter().any(|u| u.vm_id != p.vm_id) {
                continue;
            }
            let id = m.dump.volume_id;
            delete_volume(
                &cx.app,
                &host,
                &m.dump,
                cx.stable_id(&format!("memory/{id}/dump")),
            )
            .await?;
            delete_volume(
                &cx.app,
                &host,
                &m.metadata,
                cx.stable_id(&format!("memory/{id}/metadata")),
            )
            .await?;
        }
        Ok(())
    }
    .boxed()
}

fn vm_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        status::unfollow(&cx.app, p.vm_id);
        cx.db().delete_vm(p.vm_id).await.map_err(db_status)?;
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}

/// Best effort, once the VM is gone: every host of its cluster is to forget
/// it (its console log, `<run_dir>/<vm_id>/console.log` on the host), so
/// that nothing of the VM is left and no host answers ReadConsole for it.
/// Never fails the removal: a host that cannot be reached keeps the log.
fn forget_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        // Sagas logged before the lock step named the cluster: nothing to do.
        let Some(Locked { cluster_id }) = cx.get_if_ran(LOCK_VM) else {
            return Ok(());
        };
        let hosts = match cx.db().list_hosts(Some(cluster_id)).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(vm = %p.vm_id, error = %e, "listing the hosts to forget a removed VM");
                return Ok(());
            }
        };
        for h in hosts {
            let Ok(mut client) = cx.app.host_client(&h) else { continue };
            let mut req = tonic::Request::new(ramsnap_proto::host::v1::ForgetVmRequest {
                vm_id: p.vm_id.to_string(),
            });
            req.set_timeout(std::time::Duration::from_secs(10));
            match client.forget_vm(req).await {
                Ok(r) => {
                    tracing::debug!(vm = %p.vm_id, host = %h.name, forgotten = r.into_inner().forgotten, "host forgot the removed VM")
                }
                // An older agent without the call, or none to reach: it keeps
                // the console log; the removal stands.
                Err(e) => tracing::warn!(vm = %p.vm_id, host = %h.name, error = %e, "a host could not forget the removed VM"),
            }
        }
        Ok(())
    }
    .boxed()
}
