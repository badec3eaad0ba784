//! VMs, their disks, and the VM lock that an operation holds while it changes
//! the VM (a live snapshot with memory locks the VM, as the spec requires).

use super::sagas::{bind_owner, check_owner, owned_by, SagaOwner};
use super::{now_ms, to_bigint, Database, DbError, RowExt};
use sqlx::any::AnyRow;
use sqlx::AnyConnection;
use uuid::Uuid;

super::text_enum! {
    /// The VM's run state, as oVirt names it.
    VmStatus, "vm status" {
        Down => "Down",
        PoweringUp => "PoweringUp",
        Up => "Up",
        Paused => "Paused",
        /// Starting from a memory dump (hibernation or snapshot memory).
        RestoringState => "RestoringState",
        /// Writing its memory out.
        SavingState => "SavingState",
        PoweringDown => "PoweringDown",
        ImageLocked => "ImageLocked",
        /// Not running, its memory saved on the ACTIVE snapshot by
        /// SuspendVm (stored as Down with `suspended` set).
        Suspended => "Suspended",
    }
}

impl VmStatus {
    /// The `status` column's value and the `suspended` flag.
    fn stored(self) -> (&'static str, bool) {
        match self {
            VmStatus::Suspended => (VmStatus::Down.as_str(), true),
            s => (s.as_str(), false),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    pub id: Uuid,
    pub name: String,
    pub cluster_id: Uuid,
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// A stateless VM restores its active snapshot's memory on every run.
    pub stateless: bool,
    /// The host the VM runs on, if any.
    pub host_id: Option<Uuid>,
    pub status: VmStatus,
    /// The storage domain for the VM's disks and memory volumes.
    pub disk_domain_id: Uuid,
    /// The operation holding the VM lock.
    pub lock_operation_id: Option<Uuid>,
    /// Direct boot: the kernel image's name in each host's boot directory
    /// (empty: none).
    pub kernel: String,
    /// The initrd image's name in each host's boot directory (empty: none).
    pub initrd: String,
    /// The kernel command line.
    pub cmdline: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
}

/// A VM to create: it starts Down, on no host, unlocked.
#[derive(Debug, Clone)]
pub struct NewVm {
    pub id: Uuid,
    pub name: String,
    pub cluster_id: Uuid,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub stateless: bool,
    pub disk_domain_id: Uuid,
    /// Direct-boot images (names in each host's boot directory; empty: none)
    /// and the kernel command line.
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDisk {
    pub vm_id: Uuid,
    pub disk_id: Uuid,
    pub domain_id: Uuid,
    /// The image: the chain of volumes that make up the disk.
    pub image_id: Uuid,
    pub capacity_bytes: u64,
}

/// What a VM's snapshots say of it beyond its row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmSnapshotState {
    /// It previews a snapshot (it has a PREVIEW snapshot).
    pub in_preview: bool,
    /// It runs stateless, or its stateless run was not ended (it has a
    /// STATELESS snapshot).
    pub stateless_run: bool,
}

const VM_COLUMNS: &str = "id, name, cluster_id, memory_bytes, vcpus, \
     CASE WHEN stateless THEN 1 ELSE 0 END AS stateless, host_id, status, \
     CASE WHEN suspended THEN 1 ELSE 0 END AS suspended, disk_domain_id, \
     lock_operation_id, kernel, initrd, cmdline, created_at, updated_at";

fn vm_from_row(row: &AnyRow) -> Result<Vm, sqlx::Error> {
    Ok(Vm {
        id: row.uuid("id")?,
        name: row.text("name")?,
        cluster_id: row.uuid("cluster_id")?,
        memory_bytes: row.unsigned("memory_bytes")?,
        vcpus: row.unsigned("vcpus")?,
        stateless: row.flag("stateless")?,
        host_id: row.opt_uuid("host_id")?,
        status: match row.parsed("status")? {
            VmStatus::Down if row.flag("suspended")? => VmStatus::Suspended,
            s => s,
        },
        disk_domain_id: row.uuid("disk_domain_id")?,
        lock_operation_id: row.opt_uuid("lock_operation_id")?,
        kernel: row.text("kernel")?,
        initrd: row.text("initrd")?,
        cmdline: row.text("cmdline")?,
        created_at: row.int("created_at")?,
        updated_at: row.int("updated_at")?,
    })
}

const DISK_COLUMNS: &str = "vm_id, disk_id, domain_id, image_id, capacity_bytes";

fn disk_from_row(row: &AnyRow) -> Result<VmDisk, sqlx::Error> {
    Ok(VmDisk {
        vm_id: row.uuid("vm_id")?,
        disk_id: row.uuid("disk_id")?,
        domain_id: row.uuid("domain_id")?,
        image_id: row.uuid("image_id")?,
        capacity_bytes: row.unsigned("capacity_bytes")?,
    })
}

impl Database {
    /// Creates a VM; [`DbError::ForeignKey`] if its cluster does not exist.
    pub async fn create_vm(&self, new: &NewVm) -> Result<Vm, DbError> {
        let vm = Vm::from_new(new);
        let mut conn = self.writer().acquire().await?;
        insert_vm(&mut conn, &vm).await?;
        Ok(vm)
    }

    pub async fn get_vm(&self, id: Uuid) -> Result<Vm, DbError> {
        let mut conn = self.pool().acquire().await?;
        fetch_vm(&mut conn, id)
            .await?
            .ok_or_else(|| DbError::not_found("vm", id))
    }

    /// The VM and what its snapshots say of it ([`VmSnapshotState`]), in
    /// one read.
    pub async fn get_vm_with_snapshot_state(&self, id: Uuid) -> Result<(Vm, VmSnapshotState), DbError> {
        let has = |kind: super::SnapshotType| {
            format!(
                "CASE WHEN EXISTS (SELECT 1 FROM snapshots s \
                 WHERE s.vm_id = vms.id AND s.snapshot_type = '{}') THEN 1 ELSE 0 END",
                kind.as_str()
            )
        };
        let row = sqlx::query(sql!(
            "SELECT {VM_COLUMNS}, {} AS in_preview, {} AS stateless_run FROM vms WHERE id = $1",
            has(super::SnapshotType::Preview),
            has(super::SnapshotType::Stateless)
        ))
        .bind(id.to_string())
        .fetch_optional(self.pool())
        .await?
        .ok_or_else(|| DbError::not_found("vm", id))?;
        let state = VmSnapshotState {
            in_preview: row.flag("in_preview")?,
            stateless_run: row.flag("stateless_run")?,
        };
        Ok((vm_from_row(&row)?, state))
    }

    pub async fn get_vm_by_name(&self, name: &str) -> Result<Vm, DbError> {
        let row = sqlx::query(sql!("SELECT {VM_COLUMNS} FROM vms WHERE name = $1"))
            .bind(name)
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| DbError::not_found("vm", name))?;
        Ok(vm_from_row(&row)?)
    }

    pub async fn list_vms(&self) -> Result<Vec<Vm>, DbError> {
        let rows = sqlx::query(sql!("SELECT {VM_COLUMNS} FROM vms ORDER BY name"))
            .fetch_all(self.pool())
            .await?;
        Ok(rows.iter().map(vm_from_row).collect::<Result<_, _>>()?)
    }

    pub async fn list_vms_in_cluster(&self, cluster_id: Uuid) -> Result<Vec<Vm>, DbError> {
        let rows = sqlx::query(sql!(
            "SELECT {VM_COLUMNS} FROM vms WHERE cluster_id = $1 ORDER BY name"
        ))
        .bind(cluster_id.to_string())
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(vm_from_row).collect::<Result<_, _>>()?)
    }

    /// Writes a VM's editable configuration (UpdateVm): name, memory,
    /// vcpus, stateless flag and boot images, as `vm` has them. A name
    /// another VM has is a [`DbError::Conflict`].
    pub async fn update_vm_config(&self, vm: &Vm) -> Result<(), DbError> {
        let query = sqlx::query(
            "UPDATE vms SET name = $2, memory_bytes = $3, vcpus = $4, stateless = $5, kernel = $6, \
             initrd = $7, cmdline = $8, updated_at = $9 WHERE id = $1",
        )
        .bind(vm.id.to_string())
        .bind(vm.name.clone())
        .bind(super::to_bigint("memory_bytes", vm.memory_bytes)?)
        .bind(i64::from(vm.vcpus))
        .bind(vm.stateless)
        .bind(vm.kernel.clone())
        .bind(vm.initrd.clone())
        .bind(vm.cmdline.clone())
        .bind(now_ms());
        let result = self.execute_write(query).await.map_err(|e| match e {
            DbError::Sqlx(e) => DbError::on_write("vm", &vm.name)(e),
            e => e,
        })?;
        if result.rows_affected() == 0 {
            return Err(DbError::not_found("vm", vm.id));
        }
        Ok(())
    }

    /// How many VMs are in each status.
    pub async fn count_vms_by_status(&self) -> Result<Vec<(String, i64)>, DbError> {
        let rows = sqlx::query(
            "SELECT CASE WHEN suspended THEN 'Suspended' ELSE status END AS status, COUNT(*) AS n \
             FROM vms GROUP BY 1",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| Ok((r.text("status")?, r.int("n")?)))
            .collect::<Result<_, sqlx::Error>>()?)
    }

    pub async fn set_vm_status(&self, id: Uuid, status: VmStatus) -> Result<(), DbError> {
        let (text, suspended) = status.stored();
        let query = sqlx::query("UPDATE vms SET status = $2, suspended = $4, updated_at = $3 WHERE id = $1")
            .bind(id.to_string())
            .bind(text)
            .bind(now_ms())
            .bind(suspended);
        let result = self.execute_write(query).await?;
        if result.rows_affected() == 0 {
            return Err(DbError::not_found("vm", id));
        }
        Ok(())
    }

    /// Records a status the VM's host reported (the status follower). A VM
    /// that an operation has set Down while holding its lock (StopVm) keeps
    /// Down: a report still in flight when the follower was stopped must not
    /// bring it back up. A suspended VM keeps its status: its host no
    /// longer runs it. False if nothing changed.
    pub async fn record_host_status(&self, id: Uuid, status: VmStatus) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE vms SET status = $2, updated_at = $3 \
             WHERE id = $1 AND status <> $2 AND NOT suspended \
             AND NOT (status = 'Down' AND lock_operation_id IS NOT NULL)",
        )
        .bind(id.to_string())
        .bind(status.stored().0)
        .bind(now_ms())
        .execute(self.writer())
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Moves the VM from `from` to `to`; false (and no change) if it was not
    /// in `from`.
    pub async fn transition_vm_status(
        &self,
        id: Uuid,
        from: VmStatus,
        to: VmStatus,
    ) -> Result<bool, DbError> {
        let ((from, from_suspended), (to, to_suspended)) = (from.stored(), to.stored());
        let query = sqlx::query(
            "UPDATE vms SET status = $3, suspended = $6, updated_at = $4 \
             WHERE id = $1 AND status = $2 AND suspended = $5",
        )
        .bind(id.to_string())
        .bind(from)
        .bind(to)
        .bind(now_ms())
        .bind(from_suspended)
        .bind(to_suspended);
        let result = self.execute_write(query).await?;
        if result.rows_affected() == 0 {
            // Tell "no such VM" from "VM in another state".
            self.get_vm(id).await?;
            return Ok(false);
        }
        Ok(true)
    }

    pub async fn set_vm_host(&self, id: Uuid, host_id: Option<Uuid>) -> Result<(), DbError> {
        let query = sqlx::query("UPDATE vms SET host_id = $2, updated_at = $3 WHERE id = $1")
            .bind(id.to_string())
            .bind(host_id.map(|h| h.to_string()))
            .bind(now_ms());
        let result = self.execute_write(query).await?;
        if result.rows_affected() == 0 {
            return Err(DbError::not_found("vm", id));
        }
        Ok(())
    }

    /// Deletes the VM with its disks and snapshots. False if it was already gone.
    pub async fn delete_vm(&self, id: Uuid) -> Result<bool, DbError> {
        let query = sqlx::query("DELETE FROM vms WHERE id = $1").bind(id.to_string());
        let result = self.execute_write(query).await.map_err(|e| match e {
            DbError::Sqlx(e) => DbError::on_write("vm", id)(e),
            e => e,
        })?;
        Ok(result.rows_affected() > 0)
    }

    /// Takes the VM lock for `operation_id`. Taking it again for the same
    /// operation succeeds (a replayed saga step); if another operation holds
    /// it, fails with [`DbError::VmLocked`] naming the holder.
    /// On a saga's handle ([`Database::for_saga`]), refused with
    /// [`DbError::StaleOwner`] once another replica has adopted the saga (a
    /// stale owner must not lock a VM whose saga the adopter has ended).
    /// Returns the VM when it read it with the lock already held (the
    /// usual case), None when it took the lock now.
    pub async fn try_lock_vm(&self, vm_id: Uuid, operation_id: Uuid) -> Result<Option<Vm>, DbError> {
        let owner = self.owner;
        // A saga's lock node usually finds the lock taken for it when its
        // operation was accepted: one read, no write.
        let vm = self.get_vm(vm_id).await?;
        if vm.lock_operation_id == Some(operation_id) {
            return Ok(Some(vm));
        }
        let mut conn = self.writer().acquire().await?;
        match lock(&mut conn, vm_id, operation_id, owner).await? {
            None => Ok(None),
            Some(holder) => Err(DbError::VmLocked { vm_id, holder }),
        }
    }

    /// Releases the VM lock if `operation_id` holds it. Returns whether it
    /// did; releasing a lock not held (or of a VM that is gone) is not an
    /// error, so that undo steps can repeat.
    /// On a saga's handle, refused with [`DbError::StaleOwner`] once another
    /// replica has adopted the saga (a stale owner must not unlock a VM the
    /// adopter is still changing).
    pub async fn unlock_vm(&self, vm_id: Uuid, operation_id: Uuid) -> Result<bool, DbError> {
        let owner = self.owner;
        let mut conn = self.writer().acquire().await?;
        let result = sqlx::query(sql!(
            "UPDATE vms SET lock_operation_id = NULL, updated_at = $3 \
             WHERE id = $1 AND lock_operation_id = $2 {}",
            owned_by(4, owner)
        ))
        .bind(vm_id.to_string())
        .bind(operation_id.to_string())
        .bind(now_ms());
        let result = bind_owner(result, owner).execute(&mut *conn).await?;
        if result.rows_affected() == 0 {
            if let Some(owner) = owner {
                check_owner(&mut conn, owner).await?;
            }
        }
        Ok(result.rows_affected() > 0)
    }

    pub async fn add_vm_disk(&self, disk: &VmDisk) -> Result<(), DbError> {
        let mut conn = self.writer().acquire().await?;
        insert_vm_disk(&mut conn, disk).await
    }

    pub async fn vm_disks(&self, vm_id: Uuid) -> Result<Vec<VmDisk>, DbError> {
        let rows = sqlx::query(sql!(
            "SELECT {DISK_COLUMNS} FROM vm_disks WHERE vm_id = $1 ORDER BY disk_id"
        ))
        .bind(vm_id.to_string())
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(disk_from_row).collect::<Result<_, _>>()?)
    }

    /// Every disk of every VM (or of a cluster's VMs), with the volume the
    /// VM's ACTIVE snapshot has for it (None if it has none): what ListVms
    /// shows, in one query instead of a few per VM.
    pub async fn vm_disks_with_leaves(
        &self,
        cluster_id: Option<Uuid>,
    ) -> Result<Vec<(VmDisk, Option<Uuid>)>, DbError> {
        const BASE: &str = "SELECT d.vm_id AS vm_id, d.disk_id AS disk_id, d.domain_id AS domain_id, \
             d.image_id AS image_id, d.capacity_bytes AS capacity_bytes, sd.volume_id AS leaf_volume_id \
             FROM vm_disks d \
             LEFT JOIN snapshots s ON s.vm_id = d.vm_id AND s.snapshot_type = 'ACTIVE' \
             LEFT JOIN snapshot_disks sd ON sd.snapshot_id = s.id AND sd.disk_id = d.disk_id";
        let rows = match cluster_id {
            Some(c) => {
                sqlx::query(sql!(
                    "{BASE} WHERE d.vm_id IN (SELECT id FROM vms WHERE cluster_id = $1) ORDER BY d.vm_id, d.disk_id"
                ))
                .bind(c.to_string())
                .fetch_all(self.pool())
                .await?
            }
            None => {
                sqlx::query(sql!("{BASE} ORDER BY d.vm_id, d.disk_id"))
                    .fetch_all(self.pool())
                    .await?
            }
        };
        Ok(rows
            .iter()
            .map(|r| Ok((disk_from_row(r)?, r.opt_uuid("leaf_volume_id")?)))
            .collect::<Result<_, sqlx::Error>>()?)
    }

    /// The VM whose disk or snapshot memory is in image `image_id` (on any
    /// domain), if one is: (vm id, vm name).
    pub async fn vm_using_image(&self, image_id: Uuid) -> Result<Option<(Uuid, String)>, DbError> {
        let row = sqlx::query(
            "SELECT v.id AS id, v.name AS name FROM vms v WHERE v.id IN ( \
                 SELECT vm_id FROM vm_disks WHERE image_id = $1 \
                 UNION SELECT vm_id FROM snapshots WHERE memory_dump_image_id = $1 \
                 UNION SELECT vm_id FROM snapshots WHERE memory_meta_image_id = $1 \
                 UNION SELECT s.vm_id FROM snapshot_disks d JOIN snapshots s ON s.id = d.snapshot_id \
                     WHERE d.image_id = $1) \
             ORDER BY v.name LIMIT 1",
        )
        .bind(image_id.to_string())
        .fetch_optional(self.pool())
        .await?;
        Ok(match row {
            Some(r) => Some((r.uuid("id")?, r.text("name")?)),
            None => None,
        })
    }

    /// False if the disk was already gone.
    pub async fn remove_vm_disk(&self, vm_id: Uuid, disk_id: Uuid) -> Result<bool, DbError> {
        let result = sqlx::query("DELETE FROM vm_disks WHERE vm_id = $1 AND disk_id = $2")
            .bind(vm_id.to_string())
            .bind(disk_id.to_string())
            .execute(self.writer())
            .await?;
        Ok(result.rows_affected() > 0)
    }
}

impl Vm {
    /// The VM `new` describes, as created now: Down, on no host, unlocked.
    pub(super) fn from_new(new: &NewVm) -> Vm {
        let now = now_ms();
        Vm {
            id: new.id,
            name: new.name.clone(),
            cluster_id: new.cluster_id,
            memory_bytes: new.memory_bytes,
            vcpus: new.vcpus,
            stateless: new.stateless,
            host_id: None,
            status: VmStatus::Down,
            disk_domain_id: new.disk_domain_id,
            lock_operation_id: None,
            kernel: new.kernel.clone(),
            initrd: new.initrd.clone(),
            cmdline: new.cmdline.clone(),
            created_at: now,
            updated_at: now,
        }
    }
}

// Connection-level building blocks, shared with `flows.rs`.

/// Takes the VM lock for `operation_id` (taking it again for the same
/// operation changes nothing); `Some(holder)` if another operation holds it.
pub(super) async fn lock(
    conn: &mut AnyConnection,
    vm_id: Uuid,
    operation_id: Uuid,
    owner: Option<SagaOwner>,
) -> Result<Option<Uuid>, DbError> {
    loop {
        let query = sqlx::query(sql!(
            "UPDATE vms SET lock_operation_id = $2, updated_at = $3 \
             WHERE id = $1 AND lock_operation_id IS NULL {}",
            owned_by(4, owner)
        ))
        .bind(vm_id.to_string())
        .bind(operation_id.to_string())
        .bind(now_ms());
        let result = bind_owner(query, owner)
            .execute(&mut *conn)
            .await
            .map_err(DbError::on_write("vm lock", vm_id))?;
        if result.rows_affected() == 1 {
            return Ok(None);
        }
        if let Some(owner) = owner {
            check_owner(conn, owner).await?;
        }
        let row = sqlx::query("SELECT lock_operation_id FROM vms WHERE id = $1")
            .bind(vm_id.to_string())
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| DbError::not_found("vm", vm_id))?;
        match row.opt_uuid("lock_operation_id")? {
            Some(holder) if holder == operation_id => return Ok(None),
            Some(holder) => return Ok(Some(holder)),
            // Released between the two statements: try again.
            None => continue,
        }
    }
}

pub(super) async fn fetch_vm(conn: &mut AnyConnection, id: Uuid) -> Result<Option<Vm>, DbError> {
    let row = sqlx::query(sql!("SELECT {VM_COLUMNS} FROM vms WHERE id = $1"))
        .bind(id.to_string())
        .fetch_optional(conn)
        .await?;
    Ok(row.as_ref().map(vm_from_row).transpose()?)
}

pub(super) async fn insert_vm(conn: &mut AnyConnection, vm: &Vm) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO vms (id, name, cluster_id, memory_bytes, vcpus, stateless, host_id, status, \
         disk_domain_id, lock_operation_id, kernel, initrd, cmdline, created_at, updated_at, suspended) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(vm.id.to_string())
    .bind(&vm.name)
    .bind(vm.cluster_id.to_string())
    .bind(to_bigint("memory_bytes", vm.memory_bytes)?)
    .bind(i64::from(vm.vcpus))
    .bind(vm.stateless)
    .bind(vm.host_id.map(|id| id.to_string()))
    .bind(vm.status.stored().0)
    .bind(vm.disk_domain_id.to_string())
    .bind(vm.lock_operation_id.map(|id| id.to_string()))
    .bind(&vm.kernel)
    .bind(&vm.initrd)
    .bind(&vm.cmdline)
    .bind(vm.created_at)
    .bind(vm.updated_at)
    .bind(vm.status.stored().1)
    .execute(conn)
    .await
    .map_err(DbError::on_write("vm", vm.id))?;
    Ok(())
}

pub(super) async fn insert_vm_disk(conn: &mut AnyConnection, disk: &VmDisk) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO vm_disks (vm_id, disk_id, domain_id, image_id, capacity_bytes) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(disk.vm_id.to_string())
    .bind(disk.disk_id.to_string())
    .bind(disk.domain_id.to_string())
    .bind(disk.image_id.to_string())
    .bind(to_bigint("capacity_bytes", disk.capacity_bytes)?)
    .execute(conn)
    .await
    .map_err(DbError::on_write("vm disk", disk.disk_id))?;
    Ok(())
}
