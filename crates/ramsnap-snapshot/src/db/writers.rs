//! Each storage domain's one metadata writer (see [`crate::writers`]).

use super::{now_ms, Database, DbError, RowExt};
use uuid::Uuid;

impl Database {
    /// The domain's metadata writer and the generation it holds the role
    /// under. A domain without one gets `candidate`, under generation 1.
    pub async fn domain_writer(&self, domain: Uuid, candidate: Uuid) -> Result<(Uuid, i64), DbError> {
        let read = || async {
            let row = sqlx::query("SELECT host_id, generation FROM domain_writers WHERE domain_id = $1")
                .bind(domain.to_string())
                .fetch_optional(self.pool())
                .await?;
            Ok::<_, DbError>(match row {
                Some(r) => Some((r.uuid("host_id")?, r.int("generation")?)),
                None => None,
            })
        };
        if let Some(w) = read().await? {
            return Ok(w);
        }
        sqlx::query(
            "INSERT INTO domain_writers (domain_id, host_id, generation, assigned_at) VALUES ($1, $2, 1, $3) \
             ON CONFLICT (domain_id) DO NOTHING",
        )
        .bind(domain.to_string())
        .bind(candidate.to_string())
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        read().await?.ok_or(DbError::NotFound {
            kind: "domain_writer",
            id: domain.to_string(),
        })
    }

    /// Moves the role from the writer that holds it under `from` to `host`,
    /// one generation up. False when it had moved already (another caller
    /// found the same writer gone first): the caller reads it again.
    pub async fn move_domain_writer(&self, domain: Uuid, from: i64, host: Uuid) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE domain_writers SET host_id = $1, generation = generation + 1, assigned_at = $2 \
             WHERE domain_id = $3 AND generation = $4",
        )
        .bind(host.to_string())
        .bind(now_ms())
        .bind(domain.to_string())
        .bind(from)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Raises the writer's generation from `from` to `to` (the writer
    /// stays), when a higher one than the database's was recorded on the
    /// domain from outside the coordinator. False when it had changed.
    pub async fn raise_domain_writer(&self, domain: Uuid, from: i64, to: i64) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE domain_writers SET generation = $1, assigned_at = $2 WHERE domain_id = $3 AND generation = $4",
        )
        .bind(to)
        .bind(now_ms())
        .bind(domain.to_string())
        .bind(from)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
