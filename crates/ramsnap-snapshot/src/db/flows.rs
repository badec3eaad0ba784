//! The snapshot model's state changes, as oVirt makes them. Every VM has
//! exactly one ACTIVE snapshot: its current disks (the leaf volume of each
//! disk) and possibly the memory to restore on its next run. REGULAR
//! snapshots point at frozen volumes. During a preview the pre-preview ACTIVE
//! becomes PREVIEW and the previewed snapshot is IN_PREVIEW; a stateless run
//! turns the ACTIVE into STATELESS until the VM stops.
//!
//! Each change runs in one transaction, and each is idempotent: a saga step
//! re-executed after a crash finds the change made and returns Ok with the
//! same result. The caller holds the VM lock, so two changes of one VM do not
//! race; the conditional updates below still make a lost race fail rather
//! than corrupt the model.

use super::snapshots::{self, Snapshot};
use super::vms::{self, Vm};
use super::{
    Database, DbError, MemoryVolume, NewSnapshot, NewVm, SnapshotDisk, SnapshotStatus, SnapshotType, VmDisk,
};
use sqlx::AnyConnection;
use uuid::Uuid;

fn conflict(kind: &'static str, id: impl ToString, message: impl Into<String>) -> DbError {
    DbError::Conflict {
        kind,
        id: id.to_string(),
        message: message.into(),
    }
}

/// `new` as the VM's new ACTIVE snapshot: type ACTIVE, status OK, pointing
/// at `disks` and `memory`.
fn new_active(
    vm_id: Uuid,
    new: &NewSnapshot,
    disks: &[SnapshotDisk],
    memory: Option<&MemoryVolume>,
) -> Result<Snapshot, DbError> {
    if new.vm_id != vm_id {
        return Err(DbError::InvalidValue {
            field: "new_active.vm_id",
            message: format!("{} is not the vm {vm_id}", new.vm_id),
        });
    }
    let new = NewSnapshot {
        snapshot_type: SnapshotType::Active,
        status: SnapshotStatus::Ok,
        memory: memory.copied(),
        ..new.clone()
    };
    Ok(Snapshot::from_new(&new, disks))
}

/// The snapshot `id` if it is already the VM's ACTIVE one (the flow that
/// inserts it ran before); a [`DbError::Conflict`] if it exists as anything
/// else.
async fn existing_active(
    conn: &mut AnyConnection,
    vm_id: Uuid,
    id: Uuid,
) -> Result<Option<Snapshot>, DbError> {
    match snapshots::fetch(conn, id).await? {
        None => Ok(None),
        Some(s) if s.vm_id == vm_id && s.snapshot_type == SnapshotType::Active => Ok(Some(s)),
        Some(s) => Err(conflict(
            "snapshot",
            id,
            format!("exists as a {} snapshot of vm {}", s.snapshot_type, s.vm_id),
        )),
    }
}

/// The VM's ACTIVE snapshot; a [`DbError::Conflict`] if it has none.
async fn require_active(conn: &mut AnyConnection, vm_id: Uuid) -> Result<Snapshot, DbError> {
    snapshots::fetch_by_vm_type(conn, vm_id, SnapshotType::Active)
        .await?
        .ok_or_else(|| conflict("vm", vm_id, "has no active snapshot"))
}

/// A [`DbError::Conflict`] if the VM has a snapshot of this type.
async fn refuse_if_exists(
    conn: &mut AnyConnection,
    vm_id: Uuid,
    snapshot_type: SnapshotType,
    message: &str,
) -> Result<(), DbError> {
    match snapshots::fetch_by_vm_type(conn, vm_id, snapshot_type).await? {
        Some(_) => Err(conflict("vm", vm_id, message)),
        None => Ok(()),
    }
}

/// Makes the VM's ACTIVE snapshot `active` of type `to`, and inserts
/// `new_active` as its new ACTIVE snapshot.
async fn replace_active(
    conn: &mut AnyConnection,
    active: &Snapshot,
    to: SnapshotType,
    new_active: &Snapshot,
) -> Result<(), DbError> {
    if !snapshots::change_type(conn, active.id, SnapshotType::Active, to).await? {
        return Err(conflict(
            "snapshot",
            active.id,
            "is no longer the active snapshot",
        ));
    }
    snapshots::insert(conn, new_active).await
}

/// Deletes the VM's ACTIVE snapshot (returned) and makes its snapshot of
/// type `saved` the ACTIVE one again.
async fn restore_active(
    conn: &mut AnyConnection,
    vm_id: Uuid,
    saved: &Snapshot,
) -> Result<Option<Snapshot>, DbError> {
    let active = snapshots::fetch_by_vm_type(conn, vm_id, SnapshotType::Active).await?;
    if let Some(active) = &active {
        snapshots::delete(conn, active.id).await?;
    }
    if !snapshots::change_type(conn, saved.id, saved.snapshot_type, SnapshotType::Active).await? {
        return Err(conflict("snapshot", saved.id, "changed concurrently"));
    }
    Ok(active)
}

async fn insert_vm_with_active(
    conn: &mut AnyConnection,
    vm: &Vm,
    disks: &[VmDisk],
    active: &Snapshot,
) -> Result<(), DbError> {
    vms::insert_vm(conn, vm).await?;
    for disk in disks {
        vms::insert_vm_disk(conn, disk).await?;
    }
    snapshots::insert(conn, active).await
}

impl Database {
    /// Creates the VM with its disks and its ACTIVE snapshot (status OK, no
    /// memory, pointing at `active_disks`), in one transaction. `active`'s
    /// type, status and memory are not used. If the VM already exists (a
    /// replay), returns it as it is now.
    pub async fn create_vm_with_active(
        &self,
        new_vm: &NewVm,
        disks: &[VmDisk],
        active: &NewSnapshot,
        active_disks: &[SnapshotDisk],
    ) -> Result<Vm, DbError> {
        self.create_vm_with_active_memory(new_vm, disks, active, active_disks, None)
            .await
    }

    /// [`Database::create_vm_with_active`] whose ACTIVE snapshot holds
    /// `memory` (a fork's: its first run resumes from it).
    pub async fn create_vm_with_active_memory(
        &self,
        new_vm: &NewVm,
        disks: &[VmDisk],
        active: &NewSnapshot,
        active_disks: &[SnapshotDisk],
        memory: Option<&MemoryVolume>,
    ) -> Result<Vm, DbError> {
        if let Some(disk) = disks.iter().find(|d| d.vm_id != new_vm.id) {
            return Err(DbError::InvalidValue {
                field: "disks.vm_id",
                message: format!(
                    "disk {} belongs to vm {}, not {}",
                    disk.disk_id, disk.vm_id, new_vm.id
                ),
            });
        }
        let vm = Vm::from_new(new_vm);
        let active = new_active(vm.id, active, active_disks, memory)?;
        retry_transient!(async {
            let mut tx = self.begin_write().await?;
            if let Some(existing) = vms::fetch_vm(&mut tx, vm.id).await? {
                return Ok(existing);
            }
            match insert_vm_with_active(&mut tx, &vm, disks, &active).await {
                Ok(()) => {
                    tx.commit().await?;
                    Ok(vm.clone())
                }
                Err(err @ DbError::Conflict { .. }) => {
                    tx.rollback().await?;
                    // A concurrent call with the same VM may have won the race;
                    // otherwise the name (or a disk or snapshot id) is taken.
                    let mut conn = self.pool().acquire().await?;
                    match vms::fetch_vm(&mut conn, vm.id).await? {
                        Some(existing) => Ok(existing),
                        None => Err(err),
                    }
                }
                Err(err) => Err(err),
            }
        })
    }

    /// A live snapshot was taken: the REGULAR snapshot `snapshot_id` (created
    /// LOCKED by [`Database::create_snapshot`], pointing at the volumes just
    /// frozen) becomes OK, and the ACTIVE snapshot `active_id` now points at
    /// the new leaf volumes `overlays`. Once the snapshot is no longer LOCKED
    /// the change is known to be made, and a replay changes nothing.
    pub async fn snapshot_taken(
        &self,
        vm_id: Uuid,
        snapshot_id: Uuid,
        active_id: Uuid,
        overlays: &[SnapshotDisk],
    ) -> Result<(), DbError> {
        self.taken(vm_id, snapshot_id, Some(active_id), overlays).await
    }

    /// [`Database::snapshot_taken`] with the VM's ACTIVE snapshot found in
    /// the same transaction (the saga holds the VM's lock, so it is the one
    /// the overlays were made over).
    pub async fn snapshot_taken_on_active(
        &self,
        vm_id: Uuid,
        snapshot_id: Uuid,
        overlays: &[SnapshotDisk],
    ) -> Result<(), DbError> {
        self.taken(vm_id, snapshot_id, None, overlays).await
    }

    /// Both heads in one read: the snapshot, and the ACTIVE one (`active_id`,
    /// or the VM's when None).
    async fn taken(
        &self,
        vm_id: Uuid,
        snapshot_id: Uuid,
        active_id: Option<Uuid>,
        overlays: &[SnapshotDisk],
    ) -> Result<(), DbError> {
        retry_transient!(async {
            let mut tx = self.begin_write().await?;
            let heads = snapshots::fetch_heads_for_taken(&mut tx, vm_id, snapshot_id, active_id).await?;
            let snapshot = heads
                .iter()
                .find(|s| s.id == snapshot_id)
                .ok_or_else(|| DbError::not_found("snapshot", snapshot_id))?;
            if snapshot.vm_id != vm_id || snapshot.snapshot_type != SnapshotType::Regular {
                return Err(conflict(
                    "snapshot",
                    snapshot_id,
                    format!("is not a regular snapshot of vm {vm_id}"),
                ));
            }
            let active = match active_id {
                Some(a) => heads
                    .iter()
                    .find(|s| s.id == a)
                    .ok_or_else(|| DbError::not_found("snapshot", a))?,
                None => heads
                    .iter()
                    .find(|s| s.id != snapshot_id)
                    .ok_or_else(|| DbError::not_found("active snapshot of vm", vm_id))?,
            };
            if active.vm_id != vm_id || active.snapshot_type != SnapshotType::Active {
                return Err(conflict(
                    "snapshot",
                    active.id,
                    format!("is not the active snapshot of vm {vm_id}"),
                ));
            }
            let active_id = active.id;
            // The conditional update is the claim: a replay (or a concurrent
            // twin) finds the snapshot OK already and leaves the active alone.
            if !snapshots::change_status(&mut tx, snapshot_id, SnapshotStatus::Locked, SnapshotStatus::Ok)
                .await?
            {
                return Ok(());
            }
            snapshots::replace_disks(&mut tx, active_id, overlays).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Starts previewing `previewed_id`: the VM's ACTIVE snapshot becomes
    /// PREVIEW (kept to undo the preview), `new_active` is inserted as the
    /// ACTIVE one (status OK, pointing at `overlays` and `memory`; its own
    /// type, status and memory are not used), and the previewed snapshot
    /// becomes IN_PREVIEW. Returns the new ACTIVE snapshot; a replay (the
    /// new ACTIVE exists) returns it as it is.
    ///
    /// [`DbError::Conflict`] if the VM has no ACTIVE snapshot, is already in
    /// preview, runs stateless, or `previewed_id` is not one of its REGULAR
    /// snapshots with status OK; [`DbError::NotFound`] if it does not exist.
    pub async fn preview_begin(
        &self,
        vm_id: Uuid,
        previewed_id: Uuid,
        new_active: &NewSnapshot,
        overlays: &[SnapshotDisk],
        memory: Option<&MemoryVolume>,
    ) -> Result<Snapshot, DbError> {
        let new_active = self::new_active(vm_id, new_active, overlays, memory)?;
        retry_transient!(async {
            let mut tx = self.begin_write().await?;
            if let Some(existing) = existing_active(&mut tx, vm_id, new_active.id).await? {
                return Ok(existing);
            }
            let active = require_active(&mut tx, vm_id).await?;
            refuse_if_exists(&mut tx, vm_id, SnapshotType::Preview, "is already in preview").await?;
            refuse_if_exists(&mut tx, vm_id, SnapshotType::Stateless, "is running stateless").await?;
            let previewed = snapshots::fetch(&mut tx, previewed_id)
                .await?
                .ok_or_else(|| DbError::not_found("snapshot", previewed_id))?;
            if previewed.vm_id != vm_id || previewed.snapshot_type != SnapshotType::Regular {
                return Err(conflict(
                    "snapshot",
                    previewed_id,
                    format!("is not a regular snapshot of vm {vm_id}"),
                ));
            }
            if !snapshots::change_status(
                &mut tx,
                previewed_id,
                SnapshotStatus::Ok,
                SnapshotStatus::InPreview,
            )
            .await?
            {
                return Err(conflict(
                    "snapshot",
                    previewed_id,
                    format!("is {}, not OK", previewed.status),
                ));
            }
            replace_active(&mut tx, &active, SnapshotType::Preview, &new_active).await?;
            tx.commit().await?;
            Ok(new_active.clone())
        })
    }

    /// Undoes the VM's preview: deletes the ACTIVE snapshot and returns it
    /// (with its disks and memory: delete its volumes, and its memory volume
    /// unless [`Database::memory_still_referenced`]), makes the PREVIEW
    /// snapshot ACTIVE again and the IN_PREVIEW one OK. Ok(None) when the VM
    /// is not in preview (a replay).
    pub async fn preview_undo(&self, vm_id: Uuid) -> Result<Option<Snapshot>, DbError> {
        retry_transient!(async {
            let mut tx = self.begin_write().await?;
            let Some(preview) = snapshots::fetch_by_vm_type(&mut tx, vm_id, SnapshotType::Preview).await?
            else {
                return Ok(None);
            };
            let deleted = restore_active(&mut tx, vm_id, &preview).await?;
            end_in_preview(&mut tx, vm_id).await?;
            tx.commit().await?;
            Ok(deleted)
        })
    }

    /// Commits the VM to the previewed snapshot: deletes the PREVIEW snapshot
    /// and every REGULAR snapshot of the VM newer than the previewed one
    /// (created later; ties broken by id), and returns them, the PREVIEW one
    /// first, with their disks and memory, so that their volumes and
    /// unreferenced memory volumes can be deleted. The previewed snapshot
    /// becomes OK; the ACTIVE snapshot keeps its memory, to restore on the
    /// next run. Ok(empty) when the VM is not in preview (a replay).
    pub async fn preview_commit(&self, vm_id: Uuid) -> Result<Vec<Snapshot>, DbError> {
        retry_transient!(async {
            let mut tx = self.begin_write().await?;
            let Some(preview) = snapshots::fetch_by_vm_type(&mut tx, vm_id, SnapshotType::Preview).await?
            else {
                return Ok(Vec::new());
            };
            let previewed = snapshots::fetch_by_vm_type_status(
                &mut tx,
                vm_id,
                SnapshotType::Regular,
                SnapshotStatus::InPreview,
            )
            .await?;
            let mut deleted = vec![preview];
            if let Some(previewed) = &previewed {
                let rows = sqlx::query(sql!(
                    "SELECT {} FROM snapshots WHERE vm_id = $1 AND snapshot_type = 'REGULAR' \
                     AND (created_at > $2 OR (created_at = $2 AND id > $3)) ORDER BY created_at, id",
                    snapshots::COLUMNS
                ))
                .bind(vm_id.to_string())
                .bind(previewed.created_at)
                .bind(previewed.id.to_string())
                .fetch_all(&mut *tx)
                .await?;
                deleted.extend(snapshots::with_disks(&mut tx, &rows).await?);
            }
            for snapshot in &deleted {
                snapshots::delete(&mut tx, snapshot.id).await?;
            }
            end_in_preview(&mut tx, vm_id).await?;
            tx.commit().await?;
            Ok(deleted)
        })
    }

    /// A stateless VM starts: its ACTIVE snapshot becomes STATELESS (the
    /// state it returns to when it stops), and `new_active` is inserted as
    /// the ACTIVE one (status OK, pointing at `overlays` and `memory`, which
    /// the caller takes from the STATELESS snapshot; `new_active`'s own type,
    /// status and memory are not used). Returns the new ACTIVE snapshot; a
    /// replay returns it as it is. [`DbError::Conflict`] if the VM has no
    /// ACTIVE snapshot, already runs stateless, or is in preview.
    pub async fn stateless_begin(
        &self,
        vm_id: Uuid,
        new_active: &NewSnapshot,
        overlays: &[SnapshotDisk],
        memory: Option<&MemoryVolume>,
    ) -> Result<Snapshot, DbError> {
        let new_active = self::new_active(vm_id, new_active, overlays, memory)?;
        retry_transient!(async {
            let mut tx = self.begin_write().await?;
            if let Some(existing) = existing_active(&mut tx, vm_id, new_active.id).await? {
                return Ok(existing);
            }
            let active = require_active(&mut tx, vm_id).await?;
            refuse_if_exists(
                &mut tx,
                vm_id,
                SnapshotType::Stateless,
                "is already running stateless",
            )
            .await?;
            refuse_if_exists(&mut tx, vm_id, SnapshotType::Preview, "is in preview").await?;
            replace_active(&mut tx, &active, SnapshotType::Stateless, &new_active).await?;
            tx.commit().await?;
            Ok(new_active.clone())
        })
    }

    /// A stateless VM stopped: deletes the ACTIVE snapshot and returns it
    /// (delete its volumes; its memory is the STATELESS snapshot's), and the
    /// STATELESS snapshot becomes ACTIVE again. Ok(None) when there is no
    /// STATELESS snapshot (a replay).
    pub async fn stateless_end(&self, vm_id: Uuid) -> Result<Option<Snapshot>, DbError> {
        retry_transient!(async {
            let mut tx = self.begin_write().await?;
            let Some(stateless) =
                snapshots::fetch_by_vm_type(&mut tx, vm_id, SnapshotType::Stateless).await?
            else {
                return Ok(None);
            };
            let deleted = restore_active(&mut tx, vm_id, &stateless).await?;
            tx.commit().await?;
            Ok(deleted)
        })
    }

    /// Deletes a REGULAR snapshot with its disk rows and returns it (with its
    /// disks and memory); Ok(None) if it is already gone. A snapshot of
    /// another type, or one being previewed, is a [`DbError::Conflict`].
    pub async fn remove_snapshot_row(&self, snapshot_id: Uuid) -> Result<Option<Snapshot>, DbError> {
        retry_transient!(async {
            let mut tx = self.begin_write().await?;
            let Some(snapshot) = snapshots::fetch(&mut tx, snapshot_id).await? else {
                return Ok(None);
            };
            if snapshot.snapshot_type != SnapshotType::Regular {
                return Err(conflict(
                    "snapshot",
                    snapshot_id,
                    format!("is a {} snapshot, not a regular one", snapshot.snapshot_type),
                ));
            }
            if snapshot.status == SnapshotStatus::InPreview {
                return Err(conflict("snapshot", snapshot_id, "is being previewed"));
            }
            snapshots::delete(&mut tx, snapshot_id).await?;
            tx.commit().await?;
            Ok(Some(snapshot))
        })
    }
}

/// The VM's IN_PREVIEW snapshots become OK.
async fn end_in_preview(conn: &mut AnyConnection, vm_id: Uuid) -> Result<(), DbError> {
    sqlx::query("UPDATE snapshots SET status = 'OK' WHERE vm_id = $1 AND status = 'IN_PREVIEW'")
        .bind(vm_id.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

impl Database {
    /// Reserves a VM that an import is making: inserted ImageLocked, locked
    /// by `operation_id`, with its disks and no snapshot yet, so that a
    /// second import of the same VM (or name) is refused before it copies
    /// anything. Ok if this operation reserved it already (a replay). A
    /// [`DbError::Conflict`] of kind "vm" when the id exists otherwise, of
    /// kind "vm_name" when the name is taken.
    pub async fn reserve_imported_vm(
        &self,
        new_vm: &NewVm,
        disks: &[VmDisk],
        operation_id: Uuid,
    ) -> Result<(), DbError> {
        let mut vm = Vm::from_new(new_vm);
        vm.status = super::VmStatus::ImageLocked;
        vm.lock_operation_id = Some(operation_id);
        retry_transient!(async {
            let mut tx = self.begin_write().await?;
            if let Some(existing) = vms::fetch_vm(&mut tx, vm.id).await? {
                if existing.lock_operation_id == Some(operation_id) {
                    return Ok(());
                }
                return Err(conflict(
                    "vm",
                    vm.id,
                    format!("VM {} ({}) exists", existing.name, vm.id),
                ));
            }
            let taken = sqlx::query("SELECT id FROM vms WHERE name = $1")
                .bind(&vm.name)
                .fetch_optional(&mut *tx)
                .await?;
            if taken.is_some() {
                return Err(conflict("vm_name", &vm.name, "the name is in use by another VM"));
            }
            vms::insert_vm(&mut tx, &vm).await?;
            for disk in disks {
                vms::insert_vm_disk(&mut tx, disk).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Records an imported VM's snapshots (ids, types, creation times and
    /// memory as given) and makes it Down; it stays locked. A replay finds
    /// the ACTIVE snapshot recorded and changes nothing.
    pub async fn finish_imported_vm(&self, vm_id: Uuid, snapshots: &[Snapshot]) -> Result<(), DbError> {
        retry_transient!(async {
            let mut tx = self.begin_write().await?;
            if snapshots::fetch_by_vm_type(&mut tx, vm_id, SnapshotType::Active)
                .await?
                .is_some()
            {
                return Ok(());
            }
            for s in snapshots {
                if s.vm_id != vm_id {
                    return Err(DbError::InvalidValue {
                        field: "snapshots.vm_id",
                        message: format!("snapshot {} belongs to vm {}", s.id, s.vm_id),
                    });
                }
                snapshots::insert(&mut tx, s).await?;
            }
            sqlx::query("UPDATE vms SET status = $2, updated_at = $3 WHERE id = $1")
                .bind(vm_id.to_string())
                .bind(super::VmStatus::Down.as_str())
                .bind(super::now_ms())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// The undo of [`Database::reserve_imported_vm`]: deletes the VM (with
    /// its disks and snapshots) if `operation_id` still holds it; false if
    /// it does not (it is gone, or another operation's).
    pub async fn release_imported_vm(&self, vm_id: Uuid, operation_id: Uuid) -> Result<bool, DbError> {
        let query = sqlx::query("DELETE FROM vms WHERE id = $1 AND lock_operation_id = $2")
            .bind(vm_id.to_string())
            .bind(operation_id.to_string());
        let result = self.execute_write(query).await?;
        Ok(result.rows_affected() > 0)
    }
}
