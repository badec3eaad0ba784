//! `ramsnap volume list|get|create|create-memory|delete|copy|prepare|teardown`.
//!
//! Volumes are addressed as `DOMAIN/IMAGE/VOLUME`, the way the services
//! print them. Calls that change state send a request id (generated per
//! invocation unless `--request-id` is given), so that a retry with the same
//! id never acts twice.
use super::render;
use super::{AllocationArg, DumpModeArg, FormatArg, PurposeArg};
use crate::args::{parse_size, RequestArg, VolumeRef};
use crate::error::with_request_id;
use crate::names::{domain_on, Ref};
use crate::output::{print_fields, print_json, print_line, Format};
use anyhow::bail;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ramsnap_proto::common::v1 as common;
use ramsnap_proto::storage::v1 as pb;
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use serde_json::json;
use tonic::transport::Channel;
use uuid::Uuid;

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Lists the volumes of a domain, or of one image.
    List {
        /// The storage domain: its name or id.
        #[arg(long, value_name = "DOMAIN")]
        domain: Ref,
        /// Only the volumes of this image.
        #[arg(long, value_name = "UUID")]
        image: Option<Uuid>,
        /// Only the volumes with this purpose.
        #[arg(long, value_enum)]
        purpose: Option<PurposeArg>,
    },
    /// Shows one volume.
    Get {
        #[arg(value_name = "DOMAIN/IMAGE/VOLUME")]
        volume: VolumeRef,
    },
    /// Creates a volume, in a new image unless --image is given.
    Create(CreateArgs),
    /// Creates the two volumes of a snapshot's memory: the RAM dump, sized
    /// for the dump mode, and the VM configuration at dump time.
    CreateMemory(CreateMemoryArgs),
    /// Deletes a volume; refused while another volume uses it as its parent.
    Delete {
        #[arg(value_name = "DOMAIN/IMAGE/VOLUME")]
        volume: VolumeRef,
        #[command(flatten)]
        request: RequestArg,
    },
    /// Copies a volume (collapsing its chain) to a new volume, showing progress.
    Copy(CopyArgs),
    /// Makes a volume and its parents accessible on the storage host; prints
    /// the path to open.
    Prepare {
        #[arg(value_name = "DOMAIN/IMAGE/VOLUME")]
        volume: VolumeRef,
    },
    /// Undoes prepare.
    Teardown {
        #[arg(value_name = "DOMAIN/IMAGE/VOLUME")]
        volume: VolumeRef,
    },
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The storage domain to create the volume on: its name or id.
    #[arg(long, value_name = "DOMAIN")]
    domain: Ref,
    /// Virtual size: bytes, or with a unit: 512M, 10G, 1.5T (powers of 1024).
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Default: raw.
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Default: sparse on FILE domains, preallocated on BLOCK domains.
    #[arg(long, value_enum)]
    allocation: Option<AllocationArg>,
    /// Default: disk.
    #[arg(long, value_enum)]
    purpose: Option<PurposeArg>,
    /// An existing image to add the volume to.
    #[arg(long, value_name = "UUID")]
    image: Option<Uuid>,
    /// The parent volume (cow only), in the image given by --image.
    #[arg(long, value_name = "UUID", requires = "image")]
    parent: Option<Uuid>,
    /// The new volume's id; generated when not given.
    #[arg(long, value_name = "UUID")]
    id: Option<Uuid>,
    /// Free text kept with the volume.
    #[arg(long)]
    description: Option<String>,
    #[command(flatten)]
    request: RequestArg,
}

#[derive(Args, Debug)]
pub struct CreateMemoryArgs {
    /// The storage domain to create the volumes on: its name or id.
    #[arg(long, value_name = "DOMAIN")]
    domain: Ref,
    /// The guest's RAM: bytes, or with a unit: 4G, 512M.
    #[arg(long, value_parser = parse_size)]
    memory: u64,
    /// Default: live.
    #[arg(long, value_enum)]
    mode: Option<DumpModeArg>,
    /// Free text kept with the volume.
    #[arg(long)]
    description: Option<String>,
    #[command(flatten)]
    request: RequestArg,
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    #[arg(value_name = "DOMAIN/IMAGE/VOLUME")]
    volume: VolumeRef,
    /// The domain to copy to (may be the source's): its name or id.
    #[arg(long, value_name = "DOMAIN")]
    to_domain: Ref,
    /// The target image's id; generated when not given.
    #[arg(long, value_name = "UUID")]
    to_image: Option<Uuid>,
    /// The target volume's id; generated when not given.
    #[arg(long, value_name = "UUID")]
    to_volume: Option<Uuid>,
    /// Default: the source's format.
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Default: sparse on FILE domains, preallocated on BLOCK domains.
    #[arg(long, value_enum)]
    allocation: Option<AllocationArg>,
    /// Free text kept with the volume.
    #[arg(long)]
    description: Option<String>,
    /// Copy only this volume's own layer, as a COW volume on top of its
    /// parent, which must already be in --to-image on the target (copy the
    /// chain base first, keeping ids). A volume without a parent is copied
    /// whole.
    #[arg(long)]
    keep_parent: bool,
    /// Default: the source's. A raw disk copied whole may become a memory
    /// volume (an oVirt 3.3 export records its memory volumes as disks).
    #[arg(long, value_enum)]
    purpose: Option<PurposeArg>,
    #[command(flatten)]
    request: RequestArg,
}

fn id_or_empty(id: Option<Uuid>) -> String {
    id.map(|i| i.to_string()).unwrap_or_default()
}

pub async fn run(
    mut client: StorageServiceClient<Channel>,
    output: Format,
    cmd: VolumeCommand,
) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::List {
            domain,
            image,
            purpose,
        } => {
            let domain = domain_on(&mut client, &domain).await?;
            let volumes: Vec<pb::Volume> = crate::client::all_pages(
                |page_token| {
                    let mut c = client.clone();
                    let req = pb::ListVolumesRequest {
                        domain_id: domain.to_string(),
                        image_id: id_or_empty(image),
                        page_size: 0,
                        page_token,
                        purpose: purpose.map_or(0, |p| pb::VolumePurpose::from(p) as i32),
                    };
                    async move { c.list_volumes(req).await }
                },
                |r: &pb::ListVolumesResponse| &r.next_page_token,
            )
            .await?
            .into_iter()
            .flat_map(|r| r.volumes)
            .collect();
            match output {
                Format::Table => render::volume_table(&volumes).print(),
                Format::Json => print_json(&volumes.iter().map(render::volume_json).collect()),
            }
        }
        VolumeCommand::Get { volume } => {
            let volume = client
                .get_volume(pb::GetVolumeRequest {
                    r#ref: Some(volume.into()),
                })
                .await?
                .into_inner()
                .volume
                .unwrap_or_default();
            print_volume(output, &volume, None);
        }
        VolumeCommand::Create(args) => {
            let request_id = args.request.id();
            let req = pb::CreateVolumeRequest {
                request_id: request_id.to_string(),
                domain_id: domain_on(&mut client, &args.domain).await?.to_string(),
                image_id: id_or_empty(args.image),
                volume_id: id_or_empty(args.id),
                capacity_bytes: args.size,
                format: args.format.map_or(0, |f| pb::VolumeFormat::from(f) as i32),
                allocation: args
                    .allocation
                    .map_or(0, |a| pb::VolumeAllocation::from(a) as i32),
                purpose: args.purpose.map_or(0, |p| pb::VolumePurpose::from(p) as i32),
                parent_volume_id: id_or_empty(args.parent),
                description: args.description.unwrap_or_default(),
            };
            let volume = client
                .create_volume(req)
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner()
                .volume
                .unwrap_or_default();
            print_volume(output, &volume, Some(request_id));
        }
        VolumeCommand::CreateMemory(args) => {
            let request_id = args.request.id();
            let domain = domain_on(&mut client, &args.domain).await?;
            let resp = client
                .create_memory_volumes(pb::CreateMemoryVolumesRequest {
                    request_id: request_id.to_string(),
                    domain_id: domain.to_string(),
                    memory_bytes: args.memory,
                    mode: args.mode.map_or(0, |m| pb::MemoryDumpMode::from(m) as i32),
                    description: args.description.unwrap_or_default(),
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner();
            let (dump, metadata) = (resp.dump.unwrap_or_default(), resp.metadata.unwrap_or_default());
            match output {
                Format::Table => render::volume_table([&dump, &metadata]).print(),
                Format::Json => print_json(&json!({
                    "request_id": request_id.to_string(),
                    "dump": render::volume_json(&dump),
                    "metadata": render::volume_json(&metadata),
                })),
            }
        }
        VolumeCommand::Delete { volume, request } => {
            let request_id = request.id();
            client
                .delete_volume(pb::DeleteVolumeRequest {
                    request_id: request_id.to_string(),
                    r#ref: Some(volume.into()),
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?;
            match output {
                Format::Table => println!("deleted {volume}"),
                Format::Json => print_json(&json!({
                    "request_id": request_id.to_string(),
                    "deleted": render::ref_json(&volume.into()),
                })),
            }
        }
        VolumeCommand::Copy(args) => copy(client, output, args).await?,
        VolumeCommand::Prepare { volume } => {
            let path = client
                .prepare_volume(pb::PrepareVolumeRequest {
                    r#ref: Some(volume.into()),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .path;
            match output {
                // Only the path, so that `$(ramsnap volume prepare ...)` works.
                Format::Table => print_line(path),
                Format::Json => print_json(&json!({
                    "ref": render::ref_json(&volume.into()),
                    "path": path,
                })),
            }
        }
        VolumeCommand::Teardown { volume } => {
            client
                .teardown_volume(pb::TeardownVolumeRequest {
                    r#ref: Some(volume.into()),
                })
                .await?;
            match output {
                Format::Table => println!("tore down {volume}"),
                Format::Json => print_json(&json!({ "ref": render::ref_json(&volume.into()) })),
            }
        }
    }
    Ok(())
}

/// One volume: fields for people; for scripts its JSON, wrapped with the
/// request id when the call had one.
fn print_volume(output: Format, volume: &pb::Volume, request_id: Option<Uuid>) {
    match (output, request_id) {
        (Format::Table, _) => print_fields(&render::volume_fields(volume)),
        (Format::Json, None) => print_json(&render::volume_json(volume)),
        (Format::Json, Some(id)) => print_json(&json!({
            "request_id": id.to_string(),
            "volume": render::volume_json(volume),
        })),
    }
}

async fn copy(
    mut client: StorageServiceClient<Channel>,
    output: Format,
    args: CopyArgs,
) -> anyhow::Result<()> {
    let request_id = args.request.id();
    let source: common::VolumeRef = args.volume.into();
    let req = pb::CopyVolumeRequest {
        request_id: request_id.to_string(),
        source: Some(source),
        target_domain_id: domain_on(&mut client, &args.to_domain).await?.to_string(),
        target_image_id: id_or_empty(args.to_image),
        target_volume_id: id_or_empty(args.to_volume),
        target_format: args.format.map_or(0, |f| pb::VolumeFormat::from(f) as i32),
        target_allocation: args
            .allocation
            .map_or(0, |a| pb::VolumeAllocation::from(a) as i32),
        description: args.description.unwrap_or_default(),
        keep_parent: args.keep_parent,
        target_purpose: args.purpose.map_or(0, |p| pb::VolumePurpose::from(p) as i32),
        checksum_algorithm: String::new(),
    };
    let mut stream = client
        .copy_volume(req)
        .await
        .map_err(|s| with_request_id(s, request_id))?
        .into_inner();
    // indicatif hides the bar by itself when stderr is not a terminal.
    let bar = match output {
        Format::Table => ProgressBar::new(0).with_style(
            ProgressStyle::with_template(
                "copying [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("a valid progress template")
            .progress_chars("=> "),
        ),
        Format::Json => ProgressBar::hidden(),
    };
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let volume = loop {
        let msg = tokio::select! {
            msg = stream.message() => msg.map_err(|s| with_request_id(s, request_id))?,
            _ = &mut interrupted => {
                bar.abandon();
                // The service finishes the copy without us; the same request
                // id finds it again.
                eprintln!(
                    "interrupted: the copy goes on in the storage service; follow it with\n  \
                     ramsnap volume copy {} --to-domain {} --request-id {request_id}",
                    args.volume, args.to_domain
                );
                std::process::exit(130);
            }
        };
        let Some(msg) = msg else {
            bar.abandon();
            bail!("the copy stream ended without the new volume (request {request_id})");
        };
        if let Some(p) = msg.progress {
            if p.total_bytes > 0 {
                bar.set_length(p.total_bytes);
            }
            bar.set_position(p.processed_bytes);
        }
        if let Some(v) = msg.volume {
            break v;
        }
    };
    bar.finish_and_clear();
    print_volume(output, &volume, Some(request_id));
    Ok(())
}
