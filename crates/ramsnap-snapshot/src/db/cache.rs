//! Hosts and clusters as the hot paths read them: a saga reads its VM's
//! host and cluster on every run, and these rows never change once written
//! (their ids are the coordinator's own, made new for each row; no
//! statement updates them). They can only be deleted, and only when no VM
//! uses them (HOST_IN_USE, CLUSTER_NOT_EMPTY). So a row read here is kept
//! for [`TTL`], and dropped at once when this process deletes it; another
//! replica's delete is seen within [`TTL`]. Reads that must see the
//! database itself (a delete's checks) use [`Database::get_host`] and
//! [`Database::get_cluster`].
use super::{Cluster, Database, DbError, Host};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long a row read is used without reading it again.
pub const TTL: Duration = Duration::from_secs(5);
/// Rows kept at most (hosts and clusters are few; this bounds the map all
/// the same).
const MAX_ROWS: usize = 4096;

#[derive(Debug, Default)]
pub struct RowCache {
    hosts: Mutex<HashMap<Uuid, (Instant, Host)>>,
    clusters: Mutex<HashMap<Uuid, (Instant, Cluster)>>,
}

/// The row `id` of `map` if read less than [`TTL`] ago, else `read`'s
/// answer, kept.
async fn cached<T: Clone>(
    map: &Mutex<HashMap<Uuid, (Instant, T)>>,
    id: Uuid,
    read: impl std::future::Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    let known = map
        .lock()
        .expect("poisoned")
        .get(&id)
        .filter(|(at, _)| at.elapsed() < TTL)
        .map(|(_, row)| row.clone());
    if let Some(row) = known {
        return Ok(row);
    }
    let row = read.await?;
    let mut map = map.lock().expect("poisoned");
    if map.len() >= MAX_ROWS {
        map.retain(|_, (at, _)| at.elapsed() < TTL);
        if map.len() >= MAX_ROWS {
            map.clear();
        }
    }
    map.insert(id, (Instant::now(), row.clone()));
    Ok(row)
}

impl RowCache {
    pub fn forget_host(&self, id: Uuid) {
        self.hosts.lock().expect("poisoned").remove(&id);
    }

    pub fn forget_cluster(&self, id: Uuid) {
        self.clusters.lock().expect("poisoned").remove(&id);
    }
}

impl Database {
    /// The host, as read at most [`TTL`] ago (see the module's comment).
    pub async fn host_cached(&self, id: Uuid) -> Result<Host, DbError> {
        cached(&self.rows.hosts, id, self.get_host(id)).await
    }

    /// The cluster, as read at most [`TTL`] ago (see the module's comment).
    pub async fn cluster_cached(&self, id: Uuid) -> Result<Cluster, DbError> {
        cached(&self.rows.clusters, id, self.get_cluster(id)).await
    }
}
