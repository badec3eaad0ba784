//! ClusterService: clusters (compatibility levels) and their hosts.
use super::{retried_operation, RequestKey};
use crate::app::{db_status, App};
use crate::db::{self, CompatibilityVersion, DbError, NewCluster, NewHost, NewOperation};
use ramsnap_common::{ids, status};
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::cluster_service_server::ClusterService;
use serde_json::json;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use uuid::Uuid;

pub struct ClusterApi(pub Arc<App>);

fn to_cluster(c: &db::Cluster) -> pb::Cluster {
    pb::Cluster {
        cluster_id: c.id.to_string(),
        name: c.name.clone(),
        compatibility_version: c.compatibility_version.to_string(),
        memory_snapshots_supported: c.compatibility_version.supports_memory_snapshots(),
    }
}

fn to_host(h: &db::Host) -> pb::Host {
    pb::Host {
        host_id: h.id.to_string(),
        name: h.name.clone(),
        cluster_id: h.cluster_id.to_string(),
        host_address: h.host_address.clone(),
        storage_address: h.storage_address.clone(),
    }
}

use super::limits::{check_address, check_name};

/// The id a completed call recorded as its result (`{"<key>": "<uuid>"}`).
fn recorded_id(op: &db::Operation, key: &str) -> Result<Uuid, Status> {
    op.result
        .as_ref()
        .and_then(|r| r.get(key))
        .and_then(|v| v.as_str())
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| Status::internal(format!("operation {} has no {key} in its result", op.id)))
}

/// Records a call that completed at once under its request id (if it has
/// one): a retry is answered from it, a reuse for another request refused.
async fn record_request(
    app: &App,
    kind: &'static str,
    key: &RequestKey,
    result: serde_json::Value,
) -> Result<(), Status> {
    let Some(r) = key.id else { return Ok(()) };
    let new = NewOperation {
        id: Uuid::new_v4(),
        kind: kind.into(),
        vm_id: None,
        request_id: Some(r.to_string()),
        warnings: Vec::new(),
    };
    match app
        .db
        .record_completed_request(&new, &key.fingerprint, &result)
        .await
    {
        Ok(_) => Ok(()),
        // A concurrent retry recorded it first: the same request, or refused.
        Err(DbError::Conflict { .. }) => retried_operation(app, kind, key).await.map(|_| ()),
        Err(e) => Err(db_status(e)),
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn create_cluster(
        &self,
        req: Request<pb::CreateClusterRequest>,
    ) -> Result<Response<pb::CreateClusterResponse>, Status> {
        const KIND: &str = "create_cluster";
        let req = req.into_inner();
        let key = RequestKey::of(&req)?;
        if let Some(op) = retried_operation(&self.0, KIND, &key).await? {
            let c = self
                .0
                .db
                .get_cluster(recorded_id(&op, "cluster_id")?)
                .await
                .map_err(db_status)?;
            return Ok(Response::new(pb::CreateClusterResponse {
                cluster: Some(to_cluster(&c)),
            }));
        }
        check_name("name", &req.name)?;
        let version: CompatibilityVersion = req.compatibility_version.parse().map_err(|_| {
            status::invalid_argument("compatibility_version", "must be \"major.minor\", e.g. \"3.3\"")
        })?;
        // A retried create of the same cluster returns it.
        if let Some(c) = self
            .0
            .db
            .list_clusters()
            .await
            .map_err(db_status)?
            .into_iter()
            .find(|c| c.name == req.name)
        {
            if c.compatibility_version == version {
                record_request(&self.0, KIND, &key, json!({ "cluster_id": c.id })).await?;
                return Ok(Response::new(pb::CreateClusterResponse {
                    cluster: Some(to_cluster(&c)),
                }));
            }
        }
        let c = self
            .0
            .db
            .create_cluster(&NewCluster {
                id: Uuid::new_v4(),
                name: req.name,
                compatibility_version: version,
            })
            .await
            .map_err(db_status)?;
        record_request(&self.0, KIND, &key, json!({ "cluster_id": c.id })).await?;
        Ok(Response::new(pb::CreateClusterResponse {
            cluster: Some(to_cluster(&c)),
        }))
    }

    async fn get_cluster(
        &self,
        req: Request<pb::GetClusterRequest>,
    ) -> Result<Response<pb::GetClusterResponse>, Status> {
        let id = ids::parse("cluster_id", &req.get_ref().cluster_id)?;
        let c = self.0.db.get_cluster(id).await.map_err(db_status)?;
        Ok(Response::new(pb::GetClusterResponse {
            cluster: Some(to_cluster(&c)),
        }))
    }

    async fn list_clusters(
        &self,
        _req: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        let clusters = self
            .0
            .db
            .list_clusters()
            .await
            .map_err(db_status)?
            .iter()
            .map(to_cluster)
            .collect();
        Ok(Response::new(pb::ListClustersResponse { clusters }))
    }

    async fn add_host(
        &self,
        req: Request<pb::AddHostRequest>,
    ) -> Result<Response<pb::AddHostResponse>, Status> {
        const KIND: &str = "add_host";
        let req = req.into_inner();
        let key = RequestKey::of(&req)?;
        if let Some(op) = retried_operation(&self.0, KIND, &key).await? {
            let h = self
                .0
                .db
                .get_host(recorded_id(&op, "host_id")?)
                .await
                .map_err(db_status)?;
            return Ok(Response::new(pb::AddHostResponse {
                host: Some(to_host(&h)),
            }));
        }
        check_name("name", &req.name)?;
        let cluster_id = ids::parse("cluster_id", &req.cluster_id)?;
        check_address("host_address", &req.host_address)?;
        check_address("storage_address", &req.storage_address)?;
        self.0.db.get_cluster(cluster_id).await.map_err(db_status)?;
        if let Some(h) = self
            .0
            .db
            .list_hosts(None)
            .await
            .map_err(db_status)?
            .into_iter()
            .find(|h| h.name == req.name)
        {
            if h.cluster_id == cluster_id
                && h.host_address == req.host_address
                && h.storage_address == req.storage_address
            {
                record_request(&self.0, KIND, &key, json!({ "host_id": h.id })).await?;
                return Ok(Response::new(pb::AddHostResponse {
                    host: Some(to_host(&h)),
                }));
            }
        }
        let h = self
            .0
            .db
            .create_host(&NewHost {
                id: Uuid::new_v4(),
                name: req.name,
                cluster_id,
                host_address: req.host_address,
                storage_address: req.storage_address,
            })
            .await
            .map_err(db_status)?;
        record_request(&self.0, KIND, &key, json!({ "host_id": h.id })).await?;
        Ok(Response::new(pb::AddHostResponse {
            host: Some(to_host(&h)),
        }))
    }

    async fn list_hosts(
        &self,
        req: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        let cluster = ids::parse_optional("cluster_id", &req.get_ref().cluster_id)?;
        let hosts = self
            .0
            .db
            .list_hosts(cluster)
            .await
            .map_err(db_status)?
            .iter()
            .map(to_host)
            .collect();
        Ok(Response::new(pb::ListHostsResponse { hosts }))
    }

    async fn remove_host(
        &self,
        req: Request<pb::RemoveHostRequest>,
    ) -> Result<Response<pb::RemoveHostResponse>, Status> {
        let id = ids::parse("host_id", &req.get_ref().host_id)?;
        self.0.db.remove_host(id).await.map_err(db_status)?;
        tracing::info!(host = %id, "host removed");
        Ok(Response::new(pb::RemoveHostResponse {}))
    }

    async fn delete_cluster(
        &self,
        req: Request<pb::DeleteClusterRequest>,
    ) -> Result<Response<pb::DeleteClusterResponse>, Status> {
        let id = ids::parse("cluster_id", &req.get_ref().cluster_id)?;
        self.0.db.delete_cluster(id).await.map_err(db_status)?;
        tracing::info!(cluster = %id, "cluster deleted");
        Ok(Response::new(pb::DeleteClusterResponse {}))
    }
}
