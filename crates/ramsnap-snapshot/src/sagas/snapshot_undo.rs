//! Undo a preview (oVirt's RestoreAllSnapshots with the PREVIEW snapshot):
//! the preview's ACTIVE snapshot and its leaves go, the PREVIEW snapshot is
//! ACTIVE again (with the memory it had), the previewed snapshot is OK. The
//! preview's memory reference is dropped; the previewed snapshot still holds
//! that memory, so its volumes stay. The saga is [`super::preview_end`]'s.
use super::preview_end;
use crate::app::{db_status, App};
use crate::saga::{SagaCx, SagaDef};
use futures::future::BoxFuture;
use futures::FutureExt;
use tonic::Status;

pub const NAME: &str = "snapshot_undo";

pub use preview_end::Params;

pub fn definition() -> SagaDef<App> {
    preview_end::definition(NAME, ("preview_undo", undo_fwd), "delete_preview_volumes")
}

fn undo_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        cx.db().preview_undo(p.vm_id).await.map_err(db_status)?;
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}
