//! `ramsnap domain list|get|register|descriptors`.
use super::render;
use super::DomainKind;
use crate::names::{domain_on, Ref};
use crate::output::{print_fields, print_json, print_line, Format};
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
        /// The domain: its name or id.
        #[arg(value_name = "DOMAIN")]
        id: Ref,
    },
    /// Attaches a storage domain: lays out a new one at LOCATION, or adopts
    /// the domain already there (ramsnap's, or an oVirt export domain).
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
        /// What the domain is for. Default: data for a new domain; when
        /// adopting, whatever the domain records (a different role is
        /// refused).
        #[arg(long, value_enum)]
        role: Option<RoleArg>,
        /// A new domain's layout: ramsnap's own (the default), or ovirt: an
        /// oVirt 3.3 export domain (FILE, export), which oVirt can attach
        /// and import from, and to which ExportVm writes oVirt's format.
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
    },
    /// Lists the VM descriptors (OVF documents) on an export domain: the
    /// VMs exported there and when each was last written.
    Descriptors {
        /// The export domain: its name or id.
        #[arg(value_name = "DOMAIN")]
        id: Ref,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    Ramsnap,
    Ovirt,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum RoleArg {
    /// Disks and memory of VMs.
    Data,
    /// Exported VMs (FILE domains only): their volumes and OVF descriptors.
    Export,
}

impl From<RoleArg> for pb::DomainRole {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Data => pb::DomainRole::Data,
            RoleArg::Export => pb::DomainRole::Export,
        }
    }
}

/// Largest response `descriptors` accepts: the service's own limit (tonic's
/// default of 4 MiB is less than one 16 MiB descriptor).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

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
            let id = domain_on(&mut client, &id).await?;
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
            role,
            format,
        } => {
            let resp = client
                .register_domain(pb::RegisterDomainRequest {
                    domain_id: id.map(|i| i.to_string()).unwrap_or_default(),
                    name,
                    r#type: pb::DomainType::from(kind) as i32,
                    location,
                    role: role.map_or(0, |r| pb::DomainRole::from(r) as i32),
                    format: match format {
                        None => pb::DomainFormat::Unspecified,
                        Some(FormatArg::Ramsnap) => pb::DomainFormat::Ramsnap,
                        Some(FormatArg::Ovirt) => pb::DomainFormat::Ovirt,
                    } as i32,
                })
                .await?
                .into_inner();
            let domain = resp.domain.unwrap_or_default();
            match output {
                Format::Table => {
                    if resp.adopted {
                        print_line(format!("adopted the existing domain at {}", domain.location));
                    } else {
                        print_line(format!("registered a new domain at {}", domain.location));
                    }
                    print_fields(&render::domain_fields(&domain));
                }
                Format::Json => print_json(&json!({
                    "domain": render::domain_json(&domain),
                    "adopted": resp.adopted,
                })),
            }
        }
        DomainCommand::Descriptors { id } => {
            let id = domain_on(&mut client, &id).await?;
            let client = client.max_decoding_message_size(MAX_RESPONSE_BYTES);
            let descriptors: Vec<pb::VmDescriptor> = crate::client::all_pages(
                |page_token| {
                    let mut c = client.clone();
                    let req = pb::ListVmDescriptorsRequest {
                        domain_id: id.to_string(),
                        page_size: 0,
                        page_token,
                    };
                    async move { c.list_vm_descriptors(req).await }
                },
                |r: &pb::ListVmDescriptorsResponse| &r.next_page_token,
            )
            .await?
            .into_iter()
            .flat_map(|r| r.descriptors)
            .collect();
            match output {
                Format::Table => render::descriptor_table(&descriptors).print(),
                Format::Json => print_json(&descriptors.iter().map(render::descriptor_json).collect()),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    /// `--role` takes the words `-o json` prints.
    #[test]
    fn role_flags_match_json_labels() {
        for r in RoleArg::value_variants() {
            let name = r.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(render::domain_role(pb::DomainRole::from(*r) as i32), name);
        }
    }
}
