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

    /// Gives the role held under generation `from` to `host` under
    /// `generation` (compare-and-set): moving it (another host, `from` + 1)
    /// or raising it past one recorded outside the coordinator (the same
    /// host). False when it had changed meanwhile: the caller reads it
    /// again.
    pub async fn replace_domain_writer(
        &self,
        domain: Uuid,
        from: i64,
        host: Uuid,
        generation: i64,
    ) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE domain_writers SET host_id = $1, generation = $2, assigned_at = $3 \
             WHERE domain_id = $4 AND generation = $5",
        )
        .bind(host.to_string())
        .bind(generation)
        .bind(now_ms())
        .bind(domain.to_string())
        .bind(from)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
