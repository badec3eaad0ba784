//! Clusters and their compatibility version, which decides whether live
//! snapshots may carry memory (3.3 and above).

use super::{now_ms, Database, DbError, RowExt};
use sqlx::any::AnyRow;
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// A cluster compatibility level such as "3.3". Ordered by (major, minor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CompatibilityVersion {
    pub major: u32,
    pub minor: u32,
}

impl CompatibilityVersion {
    /// The first level whose snapshots can include memory.
    pub const MEMORY_SNAPSHOTS: CompatibilityVersion = CompatibilityVersion { major: 3, minor: 3 };

    pub const fn new(major: u32, minor: u32) -> Self {
        CompatibilityVersion { major, minor }
    }

    pub fn supports_memory_snapshots(self) -> bool {
        self >= Self::MEMORY_SNAPSHOTS
    }
}

impl fmt::Display for CompatibilityVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl FromStr for CompatibilityVersion {
    type Err = DbError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || DbError::InvalidValue {
            field: "compatibility_version",
            message: format!("{s:?} is not of the form MAJOR.MINOR"),
        };
        let (major, minor) = s.split_once('.').ok_or_else(invalid)?;
        Ok(CompatibilityVersion {
            major: major.parse().map_err(|_| invalid())?,
            minor: minor.parse().map_err(|_| invalid())?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub id: Uuid,
    pub name: String,
    pub compatibility_version: CompatibilityVersion,
    /// Unix milliseconds.
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewCluster {
    pub id: Uuid,
    pub name: String,
    pub compatibility_version: CompatibilityVersion,
}

const COLUMNS: &str = "id, name, compatibility_major, compatibility_minor, created_at";

fn from_row(row: &AnyRow) -> Result<Cluster, sqlx::Error> {
    Ok(Cluster {
        id: row.uuid("id")?,
        name: row.text("name")?,
        compatibility_version: CompatibilityVersion {
            major: row.unsigned("compatibility_major")?,
            minor: row.unsigned("compatibility_minor")?,
        },
        created_at: row.int("created_at")?,
    })
}

impl Database {
    pub async fn create_cluster(&self, new: &NewCluster) -> Result<Cluster, DbError> {
        let cluster = Cluster {
            id: new.id,
            name: new.name.clone(),
            compatibility_version: new.compatibility_version,
            created_at: now_ms(),
        };
        let version = cluster.compatibility_version;
        sqlx::query(
            "INSERT INTO clusters \
             (id, name, compatibility_version, compatibility_major, compatibility_minor, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(cluster.id.to_string())
        .bind(&cluster.name)
        .bind(version.to_string())
        .bind(i64::from(version.major))
        .bind(i64::from(version.minor))
        .bind(cluster.created_at)
        .execute(self.writer())
        .await
        .map_err(DbError::on_write("cluster", cluster.id))?;
        Ok(cluster)
    }

    pub async fn get_cluster(&self, id: Uuid) -> Result<Cluster, DbError> {
        let row = sqlx::query(sql!("SELECT {COLUMNS} FROM clusters WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| DbError::not_found("cluster", id))?;
        Ok(from_row(&row)?)
    }

    /// Deletes a cluster with no VM and no host: [`DbError::Refused`]
    /// CLUSTER_NOT_EMPTY otherwise. One transaction (a VM or host added
    /// meanwhile fails on its reference to the cluster instead).
    pub async fn delete_cluster(&self, id: Uuid) -> Result<(), DbError> {
        let mut tx = self.begin_write().await?;
        let count = |table: &'static str| {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT COUNT(*) AS n FROM {table} WHERE cluster_id = $1"
            )))
            .bind(id.to_string())
        };
        let vms = count("vms").fetch_one(&mut *tx).await?.int("n")?;
        let hosts = count("hosts").fetch_one(&mut *tx).await?.int("n")?;
        if vms > 0 || hosts > 0 {
            return Err(DbError::Refused {
                kind: "CLUSTER_NOT_EMPTY",
                subject: format!("cluster/{id}"),
                message: format!("cluster {id} still has {vms} VM(s) and {hosts} host(s): remove them first"),
            });
        }
        let gone = sqlx::query("DELETE FROM clusters WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        if gone.rows_affected() == 0 {
            return Err(DbError::not_found("cluster", id));
        }
        tx.commit().await?;
        self.rows.forget_cluster(id);
        Ok(())
    }

    pub async fn list_clusters(&self) -> Result<Vec<Cluster>, DbError> {
        let rows = sqlx::query(sql!("SELECT {COLUMNS} FROM clusters ORDER BY name"))
            .fetch_all(self.pool())
            .await?;
        Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
    }

    /// Clusters whose compatibility level is lower than `version`, e.g. those
    /// where snapshots must not carry memory.
    pub async fn clusters_below_version(
        &self,
        version: CompatibilityVersion,
    ) -> Result<Vec<Cluster>, DbError> {
        let rows = sqlx::query(sql!(
            "SELECT {COLUMNS} FROM clusters \
             WHERE compatibility_major < $1 OR (compatibility_major = $1 AND compatibility_minor < $2) \
             ORDER BY name"
        ))
        .bind(i64::from(version.major))
        .bind(i64::from(version.minor))
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
    }
}
