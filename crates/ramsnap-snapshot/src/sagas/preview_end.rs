//! Ending a preview: `snapshot_commit` and `snapshot_undo` are one saga
//! that differs by the one call that moves the snapshots (and by two node
//! names, which their logs keep). Under the VM's lock and ImageLocked: the
//! plan of what the end removes (`plan`, the operation's result), the
//! move (past the point of no return), the volumes and memory no snapshot
//! reaches any more, then ImageLocked and the lock released.
use super::common::{
    collect_garbage, image_lock_node, image_unlock_node, lock_vm_node, noop, preview_end_plan,
    release_memories, unlock_vm_node, vm_and_host, OnVm, PreviewEnd,
};
use crate::app::App;
use crate::saga::{Node, Output, SagaCx, SagaDef, Step};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tonic::Status;
use uuid::Uuid;

#[derive(Debug, Serialize, Deserialize)]
pub struct Params {
    pub vm_id: Uuid,
}

impl OnVm for Params {
    fn vm_id(&self) -> Uuid {
        self.vm_id
    }
}

/// The saga `name`, whose point of no return is the node `end` (named, and
/// its forward action) and whose clean-up node is named `cleanup`.
pub(super) fn definition(
    name: &'static str,
    end: (&'static str, Step<App, ()>),
    cleanup: &'static str,
) -> SagaDef<App> {
    SagaDef {
        name,
        nodes: vec![
            lock_vm_node::<Params>(true),
            image_lock_node::<Params>(),
            Node::new(PLAN, plan_fwd).undo(noop),
            // Past the point of no return.
            Node::new(Output::new(end.0), end.1),
            Node::new(Output::new(cleanup), cleanup_fwd),
            image_unlock_node::<Params>(),
            unlock_vm_node::<Params>(),
        ],
        result_node: Some(PLAN.name),
    }
}

/// What the end removes; the operation's result.
const PLAN: Output<PreviewEnd> = Output::new("plan");

fn plan_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<PreviewEnd, Status>> {
    async move { preview_end_plan(cx, cx.params::<Params>()?.vm_id).await }.boxed()
}

fn cleanup_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        let (_, host) = vm_and_host(cx, p.vm_id).await?;
        // The volumes no remaining snapshot reaches: a commit's PREVIEW
        // snapshot and the snapshots newer than the committed one; an
        // undo's preview leaves.
        collect_garbage(cx, &host, p.vm_id).await?;
        // Their memory, unless still referenced: never the memory the
        // ACTIVE snapshot now holds.
        release_memories(cx, &host, &plan.memories).await?;
        Ok(())
    }
    .boxed()
}
