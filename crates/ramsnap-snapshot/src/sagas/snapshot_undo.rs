//! Undo a preview (oVirt's RestoreAllSnapshots with the PREVIEW snapshot):
//! the preview's ACTIVE snapshot and its leaves go, the PREVIEW snapshot is
//! ACTIVE again (with the memory it had), the previewed snapshot is OK. The
//! preview's memory reference is dropped; the previewed snapshot still holds
//! that memory, so its volumes stay.
use super::common::{
    collect_garbage, image_lock, image_unlock, lock_down_vm, noop, preview_end_plan, release_memories,
    unlock_vm, vm_and_host, PreviewEnd,
};
use crate::app::{db_status, App};
use crate::saga::{Node, SagaCx, SagaDef};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tonic::Status;
use uuid::Uuid;

pub const NAME: &str = "snapshot_undo";

#[derive(Debug, Serialize, Deserialize)]
pub struct Params {
    pub vm_id: Uuid,
}

pub fn definition() -> SagaDef<App> {
    SagaDef {
        name: NAME,
        nodes: vec![
            Node {
                name: "lock_vm",
                forward: lock_fwd,
                undo: Some(lock_undo),
                local: true,
            },
            Node {
                name: "image_locked",
                forward: image_lock_fwd,
                undo: Some(image_lock_undo),
                local: false,
            },
            Node {
                name: "plan",
                forward: plan_fwd,
                undo: Some(noop),
                local: false,
            },
            // Past the point of no return.
            Node {
                name: "preview_undo",
                forward: undo_fwd,
                undo: None,
                local: false,
            },
            Node {
                name: "delete_preview_volumes",
                forward: cleanup_fwd,
                undo: None,
                local: false,
            },
            Node {
                name: "image_unlocked",
                forward: image_unlock_fwd,
                undo: None,
                local: false,
            },
            Node {
                name: "unlock_vm",
                forward: unlock_fwd,
                undo: None,
                local: true,
            },
        ],
        result_node: Some("plan"),
    }
}

fn lock_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Value, Status>> {
    async move {
        lock_down_vm(cx, cx.params::<Params>()?.vm_id).await?;
        Ok(Value::Null)
    }
    .boxed()
}

fn lock_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move { unlock_vm(cx, cx.params::<Params>()?.vm_id).await }.boxed()
}

fn unlock_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Value, Status>> {
    async move {
        unlock_vm(cx, cx.params::<Params>()?.vm_id).await?;
        Ok(Value::Null)
    }
    .boxed()
}

fn image_lock_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Value, Status>> {
    async move {
        image_lock(cx, cx.params::<Params>()?.vm_id).await?;
        Ok(Value::Null)
    }
    .boxed()
}

fn image_lock_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move { image_unlock(cx, cx.params::<Params>()?.vm_id).await }.boxed()
}

fn image_unlock_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Value, Status>> {
    async move {
        image_unlock(cx, cx.params::<Params>()?.vm_id).await?;
        Ok(Value::Null)
    }
    .boxed()
}

fn plan_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Value, Status>> {
    async move {
        let plan = preview_end_plan(cx, cx.params::<Params>()?.vm_id).await?;
        Ok(serde_json::to_value(plan).expect("serializable"))
    }
    .boxed()
}

fn undo_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Value, Status>> {
    async move {
        let p: Params = cx.params()?;
        cx.db().preview_undo(p.vm_id).await.map_err(db_status)?;
        cx.app.notify_vm(p.vm_id);
        Ok(Value::Null)
    }
    .boxed()
}

fn cleanup_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Value, Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan: PreviewEnd = cx.output("plan")?;
        let (_, host) = vm_and_host(cx, p.vm_id).await?;
        // The preview's leaves: no snapshot reaches them any more.
        collect_garbage(cx, &host, p.vm_id).await?;
        release_memories(cx, &host, &plan.memories).await?;
        Ok(Value::Null)
    }
    .boxed()
}
