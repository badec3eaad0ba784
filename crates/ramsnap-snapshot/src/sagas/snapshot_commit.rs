//! Commit a preview (oVirt's RestoreAllSnapshots with the previewed
//! snapshot): the PREVIEW snapshot (the state before the preview) and every
//! snapshot newer than the previewed one are removed with their volumes and
//! their memory; the previewed snapshot is OK again, and the ACTIVE snapshot
//! keeps the memory chosen at preview, restored on the next run. The saga
//! is [`super::preview_end`]'s.
use super::preview_end;
use crate::app::{db_status, App};
use crate::saga::{SagaCx, SagaDef};
use futures::future::BoxFuture;
use futures::FutureExt;
use tonic::Status;

pub const NAME: &str = "snapshot_commit";

pub use preview_end::Params;

pub fn definition() -> SagaDef<App> {
    preview_end::definition(NAME, ("preview_commit", commit_fwd), "delete_removed_volumes")
}

fn commit_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        cx.db().preview_commit(p.vm_id).await.map_err(db_status)?;
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}
