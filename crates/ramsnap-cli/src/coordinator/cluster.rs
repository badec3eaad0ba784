//! `ramsnap cluster create|list|get`.
use super::render;
use crate::args::RequestArg;
use crate::error::with_request_id;
use crate::names::{Names, Ref};
use crate::output::{print_fields, print_json, Format};
use clap::Subcommand;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::cluster_service_client::ClusterServiceClient;
use serde_json::json;
use tonic::transport::Channel;

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Creates a cluster. Its compatibility version decides whether its
    /// snapshots can save memory (3.3 and above).
    Create {
        /// 1-128 printable characters. Creating the same cluster again
        /// returns it.
        #[arg(long)]
        name: String,
        /// The compatibility version, "major.minor".
        #[arg(long, value_name = "MAJOR.MINOR", default_value = "3.3")]
        version: String,
        #[command(flatten)]
        request: RequestArg,
    },
    /// Lists the clusters.
    List,
    /// Deletes a cluster that has no VM and no host.
    Delete {
        /// The cluster: its name or id.
        #[arg(value_name = "CLUSTER")]
        id: Ref,
    },
    /// Shows one cluster.
    Get {
        /// The cluster: its name or id.
        #[arg(value_name = "CLUSTER")]
        id: Ref,
    },
}

pub async fn run(
    channel: Channel,
    names: &Names<'_>,
    output: Format,
    cmd: ClusterCommand,
) -> anyhow::Result<()> {
    let mut client = ClusterServiceClient::new(channel);
    match cmd {
        ClusterCommand::Create {
            name,
            version,
            request,
        } => {
            let request_id = request.id();
            let cluster = client
                .create_cluster(pb::CreateClusterRequest {
                    request_id: request_id.to_string(),
                    name,
                    compatibility_version: version,
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner()
                .cluster
                .unwrap_or_default();
            match output {
                Format::Table => print_fields(&render::cluster_fields(&cluster)),
                Format::Json => print_json(&json!({
                    "request_id": request_id.to_string(),
                    "cluster": render::cluster_json(&cluster),
                })),
            }
        }
        ClusterCommand::List => {
            let clusters = client
                .list_clusters(pb::ListClustersRequest {})
                .await?
                .into_inner()
                .clusters;
            match output {
                Format::Table => render::cluster_table(&clusters).print(),
                Format::Json => print_json(&clusters.iter().map(render::cluster_json).collect()),
            }
        }
        ClusterCommand::Delete { id } => {
            let id = names.cluster(&id).await?;
            client
                .delete_cluster(pb::DeleteClusterRequest {
                    cluster_id: id.to_string(),
                })
                .await?;
            match output {
                Format::Table => println!("cluster {id} deleted"),
                Format::Json => print_json(&json!({ "cluster_id": id.to_string(), "deleted": true })),
            }
        }
        ClusterCommand::Get { id } => {
            let id = names.cluster(&id).await?;
            let cluster = client
                .get_cluster(pb::GetClusterRequest {
                    cluster_id: id.to_string(),
                })
                .await?
                .into_inner()
                .cluster
                .unwrap_or_default();
            match output {
                Format::Table => print_fields(&render::cluster_fields(&cluster)),
                Format::Json => print_json(&render::cluster_json(&cluster)),
            }
        }
    }
    Ok(())
}
