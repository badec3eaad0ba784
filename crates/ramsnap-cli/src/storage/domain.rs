//! `ramsnap domain list|get|register`.
use super::render;
use super::DomainKind;
use crate::output::{print_fields, print_json, Format};
use clap::Subcommand;
use ramsnap_proto::storage::v1 as pb;
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use serde_json::json;
use tonic::transport::Channel;
use uuid::Uuid;

#[derive(Subcommand, Debug)]
pub enum DomainCommand {
    /// Lists the storage domains attached to the storage service.
    List,
    /// Shows one storage domain.
    Get {
        /// The domain's id.
        #[arg(value_name = "UUID")]
        id: Uuid,
    },
    /// Attaches a storage domain: lays out a new one at LOCATION, or adopts
    /// the ramsnap domain already there.
    Register {
        /// 1-64 characters of [A-Za-z0-9_.-].
        #[arg(long)]
        name: String,
        /// What LOCATION is.
        #[arg(long = "type", value_enum, value_name = "TYPE")]
        kind: DomainKind,
        /// FILE: an absolute directory inside one of the service's file
        /// roots. BLOCK: a block device under /dev.
        #[arg(long, value_name = "PATH")]
        location: String,
        /// The new domain's id; generated when not given. When adopting, it
        /// must match the existing domain's id.
        #[arg(long, value_name = "UUID")]
        id: Option<Uuid>,
    },
}

pub async fn run(
    mut client: StorageServiceClient<Channel>,
    output: Format,
    cmd: DomainCommand,
) -> anyhow::Result<()> {
    match cmd {
        DomainCommand::List => {
            let domains = client
                .list_domains(pb::ListDomainsRequest {})
                .await?
                .into_inner()
                .domains;
            match output {
                Format::Table => render::domain_table(&domains).print(),
                Format::Json => print_json(&domains.iter().map(render::domain_json).collect()),
            }
        }
        DomainCommand::Get { id } => {
            let domain = client
                .get_domain(pb::GetDomainRequest {
                    domain_id: id.to_string(),
                })
                .await?
                .into_inner()
                .domain
                .unwrap_or_default();
            match output {
                Format::Table => print_fields(&render::domain_fields(&domain)),
                Format::Json => print_json(&render::domain_json(&domain)),
            }
        }
        DomainCommand::Register {
            name,
            kind,
            location,
            id,
        } => {
            let resp = client
                .register_domain(pb::RegisterDomainRequest {
                    domain_id: id.map(|i| i.to_string()).unwrap_or_default(),
                    name,
                    r#type: pb::DomainType::from(kind) as i32,
                    location,
                })
                .await?
                .into_inner();
            let domain = resp.domain.unwrap_or_default();
            match output {
                Format::Table => {
                    if resp.adopted {
                        println!("adopted the existing domain at {}", domain.location);
                    } else {
                        println!("registered a new domain at {}", domain.location);
                    }
                    print_fields(&render::domain_fields(&domain));
                }
                Format::Json => print_json(&json!({
                    "domain": render::domain_json(&domain),
                    "adopted": resp.adopted,
                })),
            }
        }
    }
    Ok(())
}
