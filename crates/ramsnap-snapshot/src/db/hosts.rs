//! Hosts of a cluster, and where their HostService and StorageService answer.

use super::{now_ms, Database, DbError, RowExt};
use sqlx::any::AnyRow;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub id: Uuid,
    pub name: String,
    pub cluster_id: Uuid,
    /// Where the host's HostService answers, e.g. `http://10.0.0.5:50061`.
    pub host_address: String,
    /// Where the host's StorageService answers.
    pub storage_address: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewHost {
    pub id: Uuid,
    pub name: String,
    pub cluster_id: Uuid,
    pub host_address: String,
    pub storage_address: String,
}

const COLUMNS: &str = "id, name, cluster_id, host_address, storage_address, created_at";

fn from_row(row: &AnyRow) -> Result<Host, sqlx::Error> {
    Ok(Host {
        id: row.uuid("id")?,
        name: row.text("name")?,
        cluster_id: row.uuid("cluster_id")?,
        host_address: row.text("host_address")?,
        storage_address: row.text("storage_address")?,
        created_at: row.int("created_at")?,
    })
}

impl Database {
    /// Registers a host. A reused id or name is a [`DbError::Conflict`]; a
    /// cluster that does not exist, a [`DbError::ForeignKey`].
    pub async fn create_host(&self, new: &NewHost) -> Result<Host, DbError> {
        let host = Host {
            id: new.id,
            name: new.name.clone(),
            cluster_id: new.cluster_id,
            host_address: new.host_address.clone(),
            storage_address: new.storage_address.clone(),
            created_at: now_ms(),
        };
        sqlx::query(
            "INSERT INTO hosts (id, name, cluster_id, host_address, storage_address, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(host.id.to_string())
        .bind(&host.name)
        .bind(host.cluster_id.to_string())
        .bind(&host.host_address)
        .bind(&host.storage_address)
        .bind(host.created_at)
        .execute(self.writer())
        .await
        .map_err(DbError::on_write("host", host.id))?;
        Ok(host)
    }

    pub async fn get_host(&self, id: Uuid) -> Result<Host, DbError> {
        let row = sqlx::query(sql!("SELECT {COLUMNS} FROM hosts WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| DbError::not_found("host", id))?;
        Ok(from_row(&row)?)
    }

    /// Hosts by name; only those of `cluster_id` if given.
    pub async fn list_hosts(&self, cluster_id: Option<Uuid>) -> Result<Vec<Host>, DbError> {
        let rows = match cluster_id {
            Some(cluster_id) => {
                sqlx::query(sql!(
                    "SELECT {COLUMNS} FROM hosts WHERE cluster_id = $1 ORDER BY name"
                ))
                .bind(cluster_id.to_string())
                .fetch_all(self.pool())
                .await?
            }
            None => {
                sqlx::query(sql!("SELECT {COLUMNS} FROM hosts ORDER BY name"))
                    .fetch_all(self.pool())
                    .await?
            }
        };
        Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
    }

    /// Removes a host: refused ([`DbError::Refused`] HOST_IN_USE) while a
    /// VM runs on it or an operation holds a VM that last ran there. The
    /// down VMs that last ran on it forget it, and the domains it was the
    /// metadata writer of lose their writer (the next change names another,
    /// a generation above what the domain recorded). One transaction.
    pub async fn remove_host(&self, id: Uuid) -> Result<(), DbError> {
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query("SELECT id, name, status, lock_operation_id FROM vms WHERE host_id = $1")
            .bind(id.to_string())
            .fetch_all(&mut *tx)
            .await?;
        for row in &rows {
            let (vm, name, status) = (row.text("id")?, row.text("name")?, row.text("status")?);
            let locked = row.opt_text("lock_operation_id")?.is_some();
            if status != "Down" || locked {
                let why = if locked {
                    "an operation holds it".to_string()
                } else {
                    format!("it is {status}")
                };
                return Err(DbError::Refused {
                    kind: "HOST_IN_USE",
                    subject: format!("host/{id}"),
                    message: format!("VM {name} ({vm}) is on host {id} and {why}: stop it or move it first"),
                });
            }
        }
        sqlx::query("UPDATE vms SET host_id = NULL WHERE host_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM domain_writers WHERE host_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        let gone = sqlx::query("DELETE FROM hosts WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        if gone.rows_affected() == 0 {
            return Err(DbError::not_found("host", id));
        }
        tx.commit().await?;
        self.rows.forget_host(id);
        Ok(())
    }

    /// The cluster's first registered host (oldest; ties by name), where a VM
    /// of the cluster runs when no host is asked for. None if it has none.
    pub async fn first_host_in_cluster(&self, cluster_id: Uuid) -> Result<Option<Host>, DbError> {
        let row = sqlx::query(sql!(
            "SELECT {COLUMNS} FROM hosts WHERE cluster_id = $1 ORDER BY created_at, name LIMIT 1"
        ))
        .bind(cluster_id.to_string())
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(from_row).transpose()?)
    }
}
