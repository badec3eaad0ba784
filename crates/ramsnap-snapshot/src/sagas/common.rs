//! Steps several sagas share.
use crate::app::{db_status, App};
use crate::convert::{downstream, to_wire_ref};
use crate::db::{self, MemoryVolume};
use crate::saga::SagaCx;
use ramsnap_proto::storage::v1 as storage;
use tonic::{Code, Status};
use uuid::Uuid;

/// Takes the VM's lock for this operation (idempotent for the holder).
pub async fn lock_vm(cx: &SagaCx<App>, vm_id: Uuid) -> Result<(), Status> {
    cx.app
        .db
        .try_lock_vm(vm_id, cx.operation_id)
        .await
        .map_err(db_status)
}

pub async fn unlock_vm(cx: &SagaCx<App>, vm_id: Uuid) -> Result<(), Status> {
    cx.app
        .db
        .unlock_vm(vm_id, cx.operation_id)
        .await
        .map_err(db_status)?;
    cx.app.notify_vm(vm_id);
    Ok(())
}

/// Deletes a volume; "already gone" is success.
pub async fn delete_volume(
    app: &App,
    host: &db::Host,
    v: &db::VolumeRef,
    request_id: Uuid,
) -> Result<(), Status> {
    let mut storage = app.storage_client(host)?;
    match storage
        .delete_volume(storage::DeleteVolumeRequest {
            request_id: request_id.to_string(),
            r#ref: Some(to_wire_ref(v)),
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
