//! Snapshots, the disk volumes they point at, and their memory volume.

use super::{now_ms, Database, DbError, RowExt};
use sqlx::any::AnyRow;
use sqlx::AnyConnection;
use uuid::Uuid;

super::text_enum! {
    SnapshotType, "snapshot type" {
        /// The VM's current state; every VM has exactly one.
        Active => "ACTIVE",
        Regular => "REGULAR",
        /// The VM's state before a preview, kept to undo the preview.
        Preview => "PREVIEW",
        /// The state a stateless VM returns to when it stops.
        Stateless => "STATELESS",
    }
}

super::text_enum! {
    SnapshotStatus, "snapshot status" {
        Ok => "OK",
        Locked => "LOCKED",
        /// The snapshot the VM is previewing.
        InPreview => "IN_PREVIEW",
    }
}

/// One volume of an image on a storage domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct VolumeRef {
    pub domain_id: Uuid,
    pub image_id: Uuid,
    pub volume_id: Uuid,
}

/// Where a snapshot's memory state is: the memory dump and the VM
/// configuration at the moment the snapshot was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct MemoryVolume {
    pub dump: VolumeRef,
    pub metadata: VolumeRef,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: Uuid,
    pub vm_id: Uuid,
    pub snapshot_type: SnapshotType,
    pub status: SnapshotStatus,
    pub description: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// None when the snapshot has no memory state.
    pub memory: Option<MemoryVolume>,
    /// The volume of each disk the snapshot points at, ordered by disk id.
    pub disks: Vec<SnapshotDisk>,
}

#[derive(Debug, Clone)]
pub struct NewSnapshot {
    pub id: Uuid,
    pub vm_id: Uuid,
    pub snapshot_type: SnapshotType,
    pub status: SnapshotStatus,
    pub description: String,
    pub memory: Option<MemoryVolume>,
}

/// The volume of one of the VM's disks that a snapshot points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SnapshotDisk {
    pub disk_id: Uuid,
    pub volume: VolumeRef,
}

pub(super) const COLUMNS: &str = "id, vm_id, snapshot_type, status, description, created_at, \
     memory_dump_domain_id, memory_dump_image_id, memory_dump_volume_id, \
     memory_meta_domain_id, memory_meta_image_id, memory_meta_volume_id";

fn from_row(row: &AnyRow) -> Result<Snapshot, sqlx::Error> {
    let volume = |prefix: &str| -> Result<Option<VolumeRef>, sqlx::Error> {
        let domain_id = row.opt_uuid(&format!("{prefix}_domain_id"))?;
        let image_id = row.opt_uuid(&format!("{prefix}_image_id"))?;
        let volume_id = row.opt_uuid(&format!("{prefix}_volume_id"))?;
        Ok(match (domain_id, image_id, volume_id) {
            (Some(domain_id), Some(image_id), Some(volume_id)) => Some(VolumeRef {
                domain_id,
                image_id,
                volume_id,
            }),
            _ => None,
        })
    };
    // The schema's CHECK makes the six memory columns all set or all NULL.
    let memory = match (volume("memory_dump")?, volume("memory_meta")?) {
        (Some(dump), Some(metadata)) => Some(MemoryVolume { dump, metadata }),
        _ => None,
    };
    Ok(Snapshot {
        id: row.uuid("id")?,
        vm_id: row.uuid("vm_id")?,
        snapshot_type: row.parsed("snapshot_type")?,
        status: row.parsed("status")?,
        description: row.text("description")?,
        created_at: row.int("created_at")?,
        memory,
        // Filled in by `with_disks`.
        disks: Vec::new(),
    })
}

fn disk_from_row(row: &AnyRow) -> Result<SnapshotDisk, sqlx::Error> {
    Ok(SnapshotDisk {
        disk_id: row.uuid("disk_id")?,
        volume: VolumeRef {
            domain_id: row.uuid("domain_id")?,
            image_id: row.uuid("image_id")?,
            volume_id: row.uuid("volume_id")?,
        },
    })
}

/// The six memory columns' values, in COLUMNS order.
fn memory_values(memory: Option<&MemoryVolume>) -> [Option<String>; 6] {
    match memory {
        None => Default::default(),
        Some(m) => [
            m.dump.domain_id,
            m.dump.image_id,
            m.dump.volume_id,
            m.metadata.domain_id,
            m.metadata.image_id,
            m.metadata.volume_id,
        ]
        .map(|id| Some(id.to_string())),
    }
}

impl Snapshot {
    /// The row `new` describes, created now, with `disks` in disk id order.
    pub(super) fn from_new(new: &NewSnapshot, disks: &[SnapshotDisk]) -> Snapshot {
        let mut disks = disks.to_vec();
        disks.sort_by_key(|d| d.disk_id);
        Snapshot {
            id: new.id,
            vm_id: new.vm_id,
            snapshot_type: new.snapshot_type,
            status: new.status,
            description: new.description.clone(),
            created_at: now_ms(),
            memory: new.memory,
            disks,
        }
    }
}

impl Database {
    /// Creates a snapshot together with the disk volumes it points at, in one
    /// transaction. A second ACTIVE snapshot of a VM is a [`DbError::Conflict`].
    pub async fn create_snapshot(
        &self,
        new: &NewSnapshot,
        disks: &[SnapshotDisk],
    ) -> Result<Snapshot, DbError> {
        let snapshot = Snapshot::from_new(new, disks);
        retry_transient!(async {
            let mut tx = self.begin_write().await?;
            insert(&mut tx, &snapshot).await?;
            tx.commit().await?;
            Ok(snapshot.clone())
        })
    }

    pub async fn get_snapshot(&self, id: Uuid) -> Result<Snapshot, DbError> {
        let mut conn = self.pool().acquire().await?;
        fetch(&mut conn, id)
            .await?
            .ok_or_else(|| DbError::not_found("snapshot", id))
    }

    /// The VM's snapshots, oldest first.
    pub async fn list_snapshots(&self, vm_id: Uuid) -> Result<Vec<Snapshot>, DbError> {
        let mut conn = self.pool().acquire().await?;
        let rows = sqlx::query(sql!(
            "SELECT {COLUMNS} FROM snapshots WHERE vm_id = $1 ORDER BY created_at, id"
        ))
        .bind(vm_id.to_string())
        .fetch_all(&mut *conn)
        .await?;
        with_disks(&mut conn, &rows).await
    }

    /// The VM's ACTIVE snapshot: its current disks, and the memory to restore
    /// on its next run. [`DbError::NotFound`] if it has none.
    pub async fn active_snapshot(&self, vm_id: Uuid) -> Result<Snapshot, DbError> {
        let mut conn = self.pool().acquire().await?;
        fetch_by_vm_type(&mut conn, vm_id, SnapshotType::Active)
            .await?
            .ok_or_else(|| DbError::not_found("active snapshot of vm", vm_id))
    }

    /// The disks of the VM's ACTIVE snapshot (by disk id), each with the
    /// capacity the VM records for it (None if it records none), in one
    /// read: what a new snapshot's overlays are made from. NotFound if the
    /// VM has no ACTIVE snapshot.
    pub async fn active_disks_with_capacity(
        &self,
        vm_id: Uuid,
    ) -> Result<Vec<(SnapshotDisk, Option<u64>)>, DbError> {
        let rows = sqlx::query(
            "SELECT sd.disk_id AS disk_id, sd.domain_id AS domain_id, sd.image_id AS image_id, \
             sd.volume_id AS volume_id, COALESCE(d.capacity_bytes, -1) AS capacity_bytes \
             FROM snapshots s \
             LEFT JOIN snapshot_disks sd ON sd.snapshot_id = s.id \
             LEFT JOIN vm_disks d ON d.vm_id = s.vm_id AND d.disk_id = sd.disk_id \
             WHERE s.vm_id = $1 AND s.snapshot_type = 'ACTIVE'",
        )
        .bind(vm_id.to_string())
        .fetch_all(self.pool())
        .await?;
        if rows.is_empty() {
            return Err(DbError::not_found("active snapshot of vm", vm_id));
        }
        let mut disks = Vec::with_capacity(rows.len());
        for row in &rows {
            // The active snapshot's one row when it has no disk.
            if row.opt_text("disk_id")?.is_none() {
                continue;
            }
            let capacity = row.int("capacity_bytes")?;
            disks.push((disk_from_row(row)?, u64::try_from(capacity).ok()));
        }
        // In Rust rather than in SQL: the same order whatever the text collation.
        disks.sort_by_key(|(d, _)| d.disk_id);
        Ok(disks)
    }

    /// The id of the VM's ACTIVE snapshot (one read, without its disks).
    pub async fn active_snapshot_id(&self, vm_id: Uuid) -> Result<Uuid, DbError> {
        let row = sqlx::query("SELECT id FROM snapshots WHERE vm_id = $1 AND snapshot_type = $2")
            .bind(vm_id.to_string())
            .bind(SnapshotType::Active.as_str())
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| DbError::not_found("active snapshot of vm", vm_id))?;
        Ok(row.uuid("id")?)
    }

    /// The types of the VM's snapshots, each once (one read).
    pub async fn snapshot_types(&self, vm_id: Uuid) -> Result<Vec<SnapshotType>, DbError> {
        let rows = sqlx::query("SELECT DISTINCT snapshot_type FROM snapshots WHERE vm_id = $1")
            .bind(vm_id.to_string())
            .fetch_all(self.pool())
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.parsed("snapshot_type"))
            .collect::<Result<_, _>>()?)
    }

    pub async fn set_snapshot_status(&self, id: Uuid, status: SnapshotStatus) -> Result<(), DbError> {
        let mut conn = self.writer().acquire().await?;
        if !set_status(&mut conn, id, status).await? {
            return Err(DbError::not_found("snapshot", id));
        }
        Ok(())
    }

    /// Changes the snapshot's type; making a second ACTIVE snapshot of a VM is
    /// a [`DbError::Conflict`].
    pub async fn set_snapshot_type(&self, id: Uuid, snapshot_type: SnapshotType) -> Result<(), DbError> {
        let query = sqlx::query("UPDATE snapshots SET snapshot_type = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(snapshot_type.as_str());
        let result = self.execute_write(query).await.map_err(|e| match e {
            DbError::Sqlx(e) => DbError::on_write("snapshot", id)(e),
            e => e,
        })?;
        if result.rows_affected() == 0 {
            return Err(DbError::not_found("snapshot", id));
        }
        Ok(())
    }

    /// Points the snapshot at a memory volume (preview or restore with memory).
    pub async fn set_memory(&self, snapshot_id: Uuid, memory: &MemoryVolume) -> Result<(), DbError> {
        self.update_memory(snapshot_id, Some(memory)).await
    }

    /// Clears the snapshot's memory state. The volume itself is not touched:
    /// delete it when [`Database::memory_still_referenced`] says no snapshot
    /// refers to it any more.
    pub async fn remove_memory(&self, snapshot_id: Uuid) -> Result<(), DbError> {
        self.update_memory(snapshot_id, None).await
    }

    async fn update_memory(&self, snapshot_id: Uuid, memory: Option<&MemoryVolume>) -> Result<(), DbError> {
        let mut update = sqlx::query(
            "UPDATE snapshots SET memory_dump_domain_id = $2, memory_dump_image_id = $3, \
             memory_dump_volume_id = $4, memory_meta_domain_id = $5, memory_meta_image_id = $6, \
             memory_meta_volume_id = $7 WHERE id = $1",
        )
        .bind(snapshot_id.to_string());
        for value in memory_values(memory) {
            update = update.bind(value);
        }
        let result = self.execute_write(update).await?;
        if result.rows_affected() == 0 {
            return Err(DbError::not_found("snapshot", snapshot_id));
        }
        Ok(())
    }

    /// Every snapshot whose memory dump is the volume `dump_volume_id`:
    /// snapshots share a memory volume after a preview or commit, and the
    /// volume may be deleted only when none is left.
    pub async fn snapshots_referencing_memory(&self, dump_volume_id: Uuid) -> Result<Vec<Snapshot>, DbError> {
        let mut conn = self.pool().acquire().await?;
        let rows = sqlx::query(sql!(
            "SELECT {COLUMNS} FROM snapshots WHERE memory_dump_volume_id = $1 ORDER BY created_at, id"
        ))
        .bind(dump_volume_id.to_string())
        .fetch_all(&mut *conn)
        .await?;
        with_disks(&mut conn, &rows).await
    }

    /// Whether any snapshot still refers to the memory dump `dump_volume_id`;
    /// when none does, its memory volume may be deleted.
    pub async fn memory_still_referenced(&self, dump_volume_id: Uuid) -> Result<bool, DbError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM snapshots WHERE memory_dump_volume_id = $1")
            .bind(dump_volume_id.to_string())
            .fetch_one(self.pool())
            .await?;
        Ok(row.int("n")? > 0)
    }

    /// The VM's newest snapshot of this type and status.
    pub async fn snapshot_by_vm_type_status(
        &self,
        vm_id: Uuid,
        snapshot_type: SnapshotType,
        status: SnapshotStatus,
    ) -> Result<Option<Snapshot>, DbError> {
        let mut conn = self.pool().acquire().await?;
        fetch_by_vm_type_status(&mut conn, vm_id, snapshot_type, status).await
    }

    /// The VM's newest snapshot of this type, whatever its status.
    pub async fn snapshot_by_vm_type(
        &self,
        vm_id: Uuid,
        snapshot_type: SnapshotType,
    ) -> Result<Option<Snapshot>, DbError> {
        let mut conn = self.pool().acquire().await?;
        fetch_by_vm_type(&mut conn, vm_id, snapshot_type).await
    }

    /// Deletes the snapshot and its disk rows. False if it was already gone.
    pub async fn delete_snapshot(&self, id: Uuid) -> Result<bool, DbError> {
        let mut conn = self.writer().acquire().await?;
        delete(&mut conn, id).await
    }

    pub async fn add_snapshot_disk(&self, snapshot_id: Uuid, disk: &SnapshotDisk) -> Result<(), DbError> {
        let mut conn = self.writer().acquire().await?;
        insert_disk(&mut conn, snapshot_id, disk).await
    }

    pub async fn snapshot_disks(&self, snapshot_id: Uuid) -> Result<Vec<SnapshotDisk>, DbError> {
        let mut conn = self.pool().acquire().await?;
        load_disks(&mut conn, snapshot_id).await
    }

    /// Points the snapshot's disk at another volume: after a merge, the
    /// snapshots that pointed at the volume merged away point at its child.
    /// Setting the volume it already has is a no-op; [`DbError::NotFound`]
    /// if the snapshot has no such disk.
    pub async fn set_snapshot_disk_volume(
        &self,
        snapshot_id: Uuid,
        disk_id: Uuid,
        volume: &VolumeRef,
    ) -> Result<(), DbError> {
        let query = sqlx::query(
            "UPDATE snapshot_disks SET domain_id = $3, image_id = $4, volume_id = $5 \
             WHERE snapshot_id = $1 AND disk_id = $2",
        )
        .bind(snapshot_id.to_string())
        .bind(disk_id.to_string())
        .bind(volume.domain_id.to_string())
        .bind(volume.image_id.to_string())
        .bind(volume.volume_id.to_string());
        let result = self.execute_write(query).await.map_err(|e| match e {
            DbError::Sqlx(e) => DbError::on_write("snapshot disk", disk_id)(e),
            e => e,
        })?;
        if result.rows_affected() == 0 {
            return Err(DbError::not_found(
                "snapshot disk",
                format!("{snapshot_id}/{disk_id}"),
            ));
        }
        Ok(())
    }

    /// The (snapshot id, disk id) pairs whose disk points at the volume
    /// `volume_id`, ordered by snapshot and disk.
    pub async fn snapshots_pointing_at_volume(&self, volume_id: Uuid) -> Result<Vec<(Uuid, Uuid)>, DbError> {
        let rows = sqlx::query("SELECT snapshot_id, disk_id FROM snapshot_disks WHERE volume_id = $1")
            .bind(volume_id.to_string())
            .fetch_all(self.pool())
            .await?;
        let mut pairs = rows
            .iter()
            .map(|row| Ok((row.uuid("snapshot_id")?, row.uuid("disk_id")?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        pairs.sort();
        Ok(pairs)
    }
}

// Connection-level building blocks, shared with the transactional flows of
// `flows.rs`: pass `&mut tx` to run them inside a transaction.

/// The snapshots of `rows`, each with its disks.
pub(super) async fn with_disks(conn: &mut AnyConnection, rows: &[AnyRow]) -> Result<Vec<Snapshot>, DbError> {
    let mut snapshots = Vec::with_capacity(rows.len());
    for row in rows {
        let mut snapshot = from_row(row)?;
        snapshot.disks = load_disks(conn, snapshot.id).await?;
        snapshots.push(snapshot);
    }
    Ok(snapshots)
}

pub(super) async fn fetch(conn: &mut AnyConnection, id: Uuid) -> Result<Option<Snapshot>, DbError> {
    let row = sqlx::query(sql!("SELECT {COLUMNS} FROM snapshots WHERE id = $1"))
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(with_disks(conn, row.as_slice()).await?.pop())
}

/// The heads (without disks) of snapshot `id` and of `active` (by id, or the
/// VM's ACTIVE one when None), in one read; those that exist.
pub(super) async fn fetch_heads_for_taken(
    conn: &mut AnyConnection,
    vm_id: Uuid,
    id: Uuid,
    active: Option<Uuid>,
) -> Result<Vec<Snapshot>, DbError> {
    let rows = match active {
        Some(a) => {
            sqlx::query(sql!("SELECT {COLUMNS} FROM snapshots WHERE id = $1 OR id = $2"))
                .bind(id.to_string())
                .bind(a.to_string())
                .fetch_all(&mut *conn)
                .await?
        }
        None => {
            sqlx::query(sql!(
                "SELECT {COLUMNS} FROM snapshots WHERE id = $1 OR (vm_id = $2 AND snapshot_type = $3)"
            ))
            .bind(id.to_string())
            .bind(vm_id.to_string())
            .bind(SnapshotType::Active.as_str())
            .fetch_all(&mut *conn)
            .await?
        }
    };
    Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
}

/// The VM's newest snapshot of this type (the only one, for every type but
/// REGULAR in a consistent database).
pub(super) async fn fetch_by_vm_type(
    conn: &mut AnyConnection,
    vm_id: Uuid,
    snapshot_type: SnapshotType,
) -> Result<Option<Snapshot>, DbError> {
    let row = sqlx::query(sql!(
        "SELECT {COLUMNS} FROM snapshots WHERE vm_id = $1 AND snapshot_type = $2 \
         ORDER BY created_at DESC, id DESC LIMIT 1"
    ))
    .bind(vm_id.to_string())
    .bind(snapshot_type.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(with_disks(conn, row.as_slice()).await?.pop())
}

/// The VM's newest snapshot of this type and status.
pub(super) async fn fetch_by_vm_type_status(
    conn: &mut AnyConnection,
    vm_id: Uuid,
    snapshot_type: SnapshotType,
    status: SnapshotStatus,
) -> Result<Option<Snapshot>, DbError> {
    let row = sqlx::query(sql!(
        "SELECT {COLUMNS} FROM snapshots WHERE vm_id = $1 AND snapshot_type = $2 AND status = $3 \
         ORDER BY created_at DESC, id DESC LIMIT 1"
    ))
    .bind(vm_id.to_string())
    .bind(snapshot_type.as_str())
    .bind(status.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(with_disks(conn, row.as_slice()).await?.pop())
}

/// Inserts the snapshot row and its disks.
pub(super) async fn insert(conn: &mut AnyConnection, snapshot: &Snapshot) -> Result<(), DbError> {
    let sql =
        sql!("INSERT INTO snapshots ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)");
    let mut insert = sqlx::query(sql)
        .bind(snapshot.id.to_string())
        .bind(snapshot.vm_id.to_string())
        .bind(snapshot.snapshot_type.as_str())
        .bind(snapshot.status.as_str())
        .bind(&snapshot.description)
        .bind(snapshot.created_at);
    for value in memory_values(snapshot.memory.as_ref()) {
        insert = insert.bind(value);
    }
    insert
        .execute(&mut *conn)
        .await
        .map_err(DbError::on_write("snapshot", snapshot.id))?;
    for disk in &snapshot.disks {
        insert_disk(conn, snapshot.id, disk).await?;
    }
    Ok(())
}

/// Deletes the snapshot and (by cascade) its disks; false if it was gone.
pub(super) async fn delete(conn: &mut AnyConnection, id: Uuid) -> Result<bool, DbError> {
    let result = sqlx::query("DELETE FROM snapshots WHERE id = $1")
        .bind(id.to_string())
        .execute(conn)
        .await
        .map_err(DbError::on_write("snapshot", id))?;
    Ok(result.rows_affected() > 0)
}

/// Changes the snapshot's status from `from` to `to`; false (and no change)
/// if it is not in `from`.
pub(super) async fn change_status(
    conn: &mut AnyConnection,
    id: Uuid,
    from: SnapshotStatus,
    to: SnapshotStatus,
) -> Result<bool, DbError> {
    let result = sqlx::query("UPDATE snapshots SET status = $3 WHERE id = $1 AND status = $2")
        .bind(id.to_string())
        .bind(from.as_str())
        .bind(to.as_str())
        .execute(conn)
        .await?;
    Ok(result.rows_affected() > 0)
}

/// False if there is no such snapshot.
async fn set_status(conn: &mut AnyConnection, id: Uuid, status: SnapshotStatus) -> Result<bool, DbError> {
    let result = sqlx::query("UPDATE snapshots SET status = $2 WHERE id = $1")
        .bind(id.to_string())
        .bind(status.as_str())
        .execute(conn)
        .await?;
    Ok(result.rows_affected() > 0)
}

/// Changes the snapshot's type from `from` to `to`; false (and no change) if
/// it is not of type `from`. A second ACTIVE snapshot of a VM is a
/// [`DbError::Conflict`].
pub(super) async fn change_type(
    conn: &mut AnyConnection,
    id: Uuid,
    from: SnapshotType,
    to: SnapshotType,
) -> Result<bool, DbError> {
    let result = sqlx::query("UPDATE snapshots SET snapshot_type = $3 WHERE id = $1 AND snapshot_type = $2")
        .bind(id.to_string())
        .bind(from.as_str())
        .bind(to.as_str())
        .execute(conn)
        .await
        .map_err(DbError::on_write("snapshot", id))?;
    Ok(result.rows_affected() > 0)
}

/// Makes `disks` the snapshot's disks, replacing those it had.
pub(super) async fn replace_disks(
    conn: &mut AnyConnection,
    snapshot_id: Uuid,
    disks: &[SnapshotDisk],
) -> Result<(), DbError> {
    sqlx::query("DELETE FROM snapshot_disks WHERE snapshot_id = $1")
        .bind(snapshot_id.to_string())
        .execute(&mut *conn)
        .await?;
    for disk in disks {
        insert_disk(conn, snapshot_id, disk).await?;
    }
    Ok(())
}

async fn load_disks(conn: &mut AnyConnection, snapshot_id: Uuid) -> Result<Vec<SnapshotDisk>, DbError> {
    let rows = sqlx::query(
        "SELECT disk_id, domain_id, image_id, volume_id FROM snapshot_disks WHERE snapshot_id = $1",
    )
    .bind(snapshot_id.to_string())
    .fetch_all(conn)
    .await?;
    let mut disks = rows.iter().map(disk_from_row).collect::<Result<Vec<_>, _>>()?;
    // In Rust rather than in SQL: the same order whatever the text collation.
    disks.sort_by_key(|d| d.disk_id);
    Ok(disks)
}

async fn insert_disk(
    conn: &mut AnyConnection,
    snapshot_id: Uuid,
    disk: &SnapshotDisk,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO snapshot_disks (snapshot_id, disk_id, domain_id, image_id, volume_id) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(snapshot_id.to_string())
    .bind(disk.disk_id.to_string())
    .bind(disk.volume.domain_id.to_string())
    .bind(disk.volume.image_id.to_string())
    .bind(disk.volume.volume_id.to_string())
    .execute(conn)
    .await
    .map_err(DbError::on_write("snapshot disk", disk.disk_id))?;
    Ok(())
}
