//! `ramsnap host add|list`: the hypervisor hosts of a cluster, each the
//! address of its HostService and of its StorageService.
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
pub enum HostCommand {
    /// Adds a hypervisor host to a cluster. Adding the same host again
    /// returns it.
    Add {
        /// The cluster to add the host to: its name or id.
        #[arg(long, value_name = "CLUSTER")]
        cluster: Ref,
        /// 1-128 printable characters.
        #[arg(long)]
        name: String,
        /// The host's HostService: http://ADDR:PORT.
        #[arg(long, value_name = "URL")]
        host_address: String,
        /// The host's StorageService: http://ADDR:PORT.
        #[arg(long, value_name = "URL")]
        storage_address: String,
        #[command(flatten)]
        request: RequestArg,
    },
    /// Removes a host from its cluster; refused while a VM runs on it.
    Remove {
        /// The host: its name or id.
        // Not the id `host`: that is the global --host's.
        #[arg(value_name = "HOST")]
        id: Ref,
    },
    /// Lists the hosts, of every cluster or of one.
    List {
        /// Only the hosts of this cluster (name or id).
        #[arg(long, value_name = "CLUSTER")]
        cluster: Option<Ref>,
    },
}

pub async fn run(
    channel: Channel,
    names: &Names<'_>,
    output: Format,
    cmd: HostCommand,
) -> anyhow::Result<()> {
    let mut client = ClusterServiceClient::new(channel);
    match cmd {
        HostCommand::Add {
            cluster,
            name,
            host_address,
            storage_address,
            request,
        } => {
            let cluster = names.cluster(&cluster).await?;
            let request_id = request.id();
            let host = client
                .add_host(pb::AddHostRequest {
                    request_id: request_id.to_string(),
                    name,
                    cluster_id: cluster.to_string(),
                    host_address,
                    storage_address,
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner()
                .host
                .unwrap_or_default();
            match output {
                Format::Table => print_fields(&render::host_fields(&host)),
                Format::Json => print_json(&json!({
                    "request_id": request_id.to_string(),
                    "host": render::host_json(&host),
                })),
            }
        }
        HostCommand::Remove { id } => {
            let id = names.host(&id).await?;
            client
                .remove_host(pb::RemoveHostRequest {
                    host_id: id.to_string(),
                })
                .await?;
            match output {
                Format::Table => println!("host {id} removed"),
                Format::Json => print_json(&json!({ "host_id": id.to_string(), "removed": true })),
            }
        }
        HostCommand::List { cluster } => {
            let cluster = match cluster {
                Some(c) => Some(names.cluster(&c).await?),
                None => None,
            };
            let hosts = client
                .list_hosts(pb::ListHostsRequest {
                    cluster_id: cluster.map(|c| c.to_string()).unwrap_or_default(),
                })
                .await?
                .into_inner()
                .hosts;
            match output {
                Format::Table => render::host_table(&hosts).print(),
                Format::Json => print_json(&hosts.iter().map(render::host_json).collect()),
            }
        }
    }
    Ok(())
}
