//! Coordinator replicas and who owns each saga (`coordinators`; the
//! `owner` and `generation` of `sagas`). A replica registers itself with a
//! lease that its heartbeat renews; leases are judged by the database's
//! clock, never by the replicas'. A saga whose owner holds no live lease is
//! adopted by another replica, which bumps its generation: from then on the
//! old owner's writes to the saga's log are refused (see
//! [`DbError::StaleOwner`]).
use super::sagas::{saga_from_row, SAGA_COLUMNS};
use super::{Backend, Database, DbError, RowExt, Saga};
use std::time::Duration;
use uuid::Uuid;

/// The database's clock, in Unix milliseconds.
fn clock(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
    }
}

/// A coordinator replica as it registers.
#[derive(Debug, Clone, PartialEq)]
pub struct NewReplica {
    pub id: Uuid,
    /// For people: "hostname:pid".
    pub name: String,
    /// The boot and PID namespace it runs in (see [`Database::expire_gone_replicas`]).
    pub local_key: String,
    pub pid: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    pub id: Uuid,
    pub name: String,
    pub local_key: String,
    pub pid: i64,
    pub started_at: i64,
    pub lease_expires_at: i64,
    /// Whether its lease runs, by the database's clock.
    pub live: bool,
}

impl Database {
    /// Registers a replica (or renews it, if registered) with a lease of
    /// `lease` from now.
    pub async fn register_replica(&self, r: &NewReplica, lease: Duration) -> Result<(), DbError> {
        let now = clock(self.backend);
        sqlx::query(sql!(
            "INSERT INTO coordinators (id, name, local_key, pid, started_at, lease_expires_at) \
             VALUES ($1, $2, $3, $4, {now}, {now} + $5) \
             ON CONFLICT (id) DO UPDATE SET lease_expires_at = {now} + $5"
        ))
        .bind(r.id.to_string())
        .bind(&r.name)
        .bind(&r.local_key)
        .bind(r.pid)
        .bind(lease.as_millis() as i64)
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// Extends the replica's lease to `lease` from now; false when the
    /// replica is not registered (any more) or its lease has run out: a
    /// lease is never extended once the others may have adopted its sagas.
    pub async fn renew_lease(&self, id: Uuid, lease: Duration) -> Result<bool, DbError> {
        let now = clock(self.backend);
        let result = sqlx::query(sql!(
            "UPDATE coordinators SET lease_expires_at = {now} + $2 WHERE id = $1 AND lease_expires_at > {now}"
        ))
        .bind(id.to_string())
        .bind(lease.as_millis() as i64)
        .execute(self.writer())
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Ends the replica's lease now (its process is gone, or stops).
    pub async fn expire_lease(&self, id: Uuid) -> Result<(), DbError> {
        sqlx::query("UPDATE coordinators SET lease_expires_at = 0 WHERE id = $1")
            .bind(id.to_string())
            .execute(self.writer())
            .await?;
        Ok(())
    }

    /// Ends the leases of replicas that ran in `local_key` (this machine's
    /// boot and PID namespace) and whose process `alive` says is gone: a
    /// coordinator restarted on the same host adopts its predecessor's
    /// sagas at once instead of after the lease. A replica elsewhere, or
    /// whose PID is taken again, keeps its lease until it runs out.
    pub async fn expire_gone_replicas(
        &self,
        me: Uuid,
        local_key: &str,
        alive: &(dyn Fn(i64) -> bool + Sync),
    ) -> Result<Vec<Replica>, DbError> {
        let mut gone = Vec::new();
        for r in self.replicas().await? {
            if r.id != me && r.live && r.local_key == local_key && !alive(r.pid) {
                self.expire_lease(r.id).await?;
                gone.push(r);
            }
        }
        Ok(gone)
    }

    /// Forgets replicas whose lease ran out more than `age` ago and that
    /// own no unfinished saga (each process start registers a new one).
    pub async fn forget_old_replicas(&self, age: Duration) -> Result<u64, DbError> {
        let now = clock(self.backend);
        let result = sqlx::query(sql!(
            "DELETE FROM coordinators WHERE lease_expires_at < {now} - $1 \
             AND NOT EXISTS (SELECT 1 FROM sagas s WHERE s.owner = coordinators.id \
                 AND s.state IN ('RUNNING', 'UNWINDING'))"
        ))
        .bind(age.as_millis() as i64)
        .execute(self.writer())
        .await?;
        Ok(result.rows_affected())
    }

    /// Every registered replica, with whether its lease runs.
    pub async fn replicas(&self) -> Result<Vec<Replica>, DbError> {
        let now = clock(self.backend);
        let rows = sqlx::query(sql!(
            "SELECT id, name, local_key, pid, started_at, lease_expires_at, \
             CASE WHEN lease_expires_at > {now} THEN 1 ELSE 0 END AS live \
             FROM coordinators ORDER BY started_at, id"
        ))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Replica {
                    id: row.uuid("id")?,
                    name: row.text("name")?,
                    local_key: row.text("local_key")?,
                    pid: row.int("pid")?,
                    started_at: row.int("started_at")?,
                    lease_expires_at: row.int("lease_expires_at")?,
                    live: row.int("live")? == 1,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// Adopts for replica `me` every unfinished saga whose owner holds no
    /// live lease (or, with `all`, every unfinished saga owned by another:
    /// for a database only one coordinator uses), bumping each one's
    /// generation, and returns them. On PostgreSQL the sagas are claimed
    /// with FOR UPDATE SKIP LOCKED: replicas adopting at once share them
    /// out, and a saga whose log is being written is left for the next
    /// round rather than waited for.
    pub async fn adopt_sagas(&self, me: Uuid, all: bool) -> Result<Vec<Saga>, DbError> {
        let now = clock(self.backend);
        let orphaned = if all {
            String::new()
        } else {
            format!(
                "AND NOT EXISTS (SELECT 1 FROM coordinators c WHERE c.id = s.owner AND c.lease_expires_at > {now})"
            )
        };
        let lock = match self.backend {
            Backend::Postgres => "FOR UPDATE OF s SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let rows = sqlx::query(sql!(
            "UPDATE sagas SET owner = $1, generation = generation + 1, updated_at = {now} \
             WHERE id IN (SELECT s.id FROM sagas s \
                 WHERE s.state IN ('RUNNING', 'UNWINDING') AND s.owner <> $1 {orphaned} {lock}) \
             RETURNING {SAGA_COLUMNS}"
        ))
        .bind(me.to_string())
        .fetch_all(self.writer())
        .await?;
        let mut sagas = rows.iter().map(saga_from_row).collect::<Result<Vec<_>, _>>()?;
        sagas.sort_by_key(|s| (s.created_at, s.id));
        Ok(sagas)
    }
}
