//! The tonic handler: converts requests into the domain layer's types
//! (rejecting bad input with field details) and results back.
use crate::error::StorageError;
use crate::limits::{parse_id, parse_optional_id};
use crate::model::{self, DomainInfo, DumpMode, VmDescriptor, VolumeRef, MAX_DESCRIPTOR_BYTES};
use crate::storage::{CopyRequest, NewVolume, Storage};
use ramsnap_common::paging::PageRequest;
use ramsnap_common::status;
use ramsnap_proto::common::v1 as common;
use ramsnap_proto::storage::v1 as pb;
use ramsnap_proto::storage::v1::storage_service_server::{StorageService, StorageServiceServer};
use std::pin::Pin;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub const SERVICE_NAME: &str = "ramsnap.storage.v1.StorageService";

/// Largest request the server decodes; see [`StorageApi::into_server`].
/// Clients that Get or List descriptors need a decoding limit as large.
pub const MAX_MESSAGE_BYTES: usize = 2 * MAX_DESCRIPTOR_BYTES;

pub struct StorageApi {
    storage: Storage,
}

impl StorageApi {
    pub fn new(storage: Storage) -> Self {
        StorageApi { storage }
    }

    /// The server, accepting messages that carry a whole VM descriptor
    /// (tonic's default limit is 4 MiB): up to twice the largest, so that
    /// an oversized one still reaches the handler and gets its field error.
    pub fn into_server(self) -> StorageServiceServer<Self> {
        use ramsnap_common::limits::MessageLimits;
        StorageServiceServer::new(self)
            .with_message_limits()
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

fn volume_ref(field: &'static str, r: Option<common::VolumeRef>) -> Result<VolumeRef, Status> {
    let r = r.ok_or_else(|| status::invalid_argument(field, "is required"))?;
    Ok(VolumeRef {
        domain: parse_id(&format!("{field}.domain_id"), &r.domain_id)?,
        image: parse_id(&format!("{field}.image_id"), &r.image_id)?,
        volume: parse_id(&format!("{field}.volume_id"), &r.volume_id)?,
    })
}

fn to_ref(r: VolumeRef) -> common::VolumeRef {
    common::VolumeRef {
        domain_id: r.domain.to_string(),
        image_id: r.image.to_string(),
        volume_id: r.volume.to_string(),
    }
}

fn enum_value<T: TryFrom<i32>>(field: &str, v: i32) -> Result<T, Status> {
    T::try_from(v).map_err(|_| status::invalid_argument(field, format!("{v} is not a known value")))
}

fn format_of(field: &str, v: i32) -> Result<Option<model::Format>, Status> {
    Ok(match enum_value::<pb::VolumeFormat>(field, v)? {
        pb::VolumeFormat::Unspecified => None,
        pb::VolumeFormat::Raw => Some(model::Format::Raw),
        pb::VolumeFormat::Cow => Some(model::Format::Cow),
    })
}

fn allocation_of(field: &str, v: i32) -> Result<Option<model::Allocation>, Status> {
    Ok(match enum_value::<pb::VolumeAllocation>(field, v)? {
        pb::VolumeAllocation::Unspecified => None,
        pb::VolumeAllocation::Sparse => Some(model::Allocation::Sparse),
        pb::VolumeAllocation::Preallocated => Some(model::Allocation::Preallocated),
    })
}

/// How many bytes of OVF documents one ListVmDescriptors page carries at
/// most: below gRPC's 4 MiB default message limit, for any client.
const DESCRIPTOR_PAGE_BYTES: usize = 3 << 20;

fn purpose_of(field: &str, v: i32) -> Result<model::Purpose, Status> {
    Ok(match enum_value::<pb::VolumePurpose>(field, v)? {
        pb::VolumePurpose::Unspecified | pb::VolumePurpose::Disk => model::Purpose::Disk,
        pb::VolumePurpose::MemoryDump => model::Purpose::MemoryDump,
        pb::VolumePurpose::MemoryMetadata => model::Purpose::MemoryMetadata,
    })
}

fn role_of(field: &str, v: i32) -> Result<Option<model::DomainRole>, Status> {
    Ok(match enum_value::<pb::DomainRole>(field, v)? {
        pb::DomainRole::Unspecified => None,
        pb::DomainRole::Data => Some(model::DomainRole::Data),
        pb::DomainRole::Export => Some(model::DomainRole::Export),
    })
}

fn to_descriptor(d: VmDescriptor) -> pb::VmDescriptor {
    pb::VmDescriptor {
        vm_id: d.vm.to_string(),
        ovf: d.ovf,
        updated_at: d.updated_at,
    }
}

fn to_domain(d: DomainInfo) -> pb::StorageDomain {
    pb::StorageDomain {
        domain_id: d.id.to_string(),
        name: d.name,
        r#type: match d.domain_type {
            model::DomainType::File => pb::DomainType::File,
            model::DomainType::Block => pb::DomainType::Block,
        } as i32,
        capacity_bytes: d.capacity,
        free_bytes: d.free,
        location: d.location,
        metadata_version: d.metadata_version,
        role: match d.role {
            model::DomainRole::Data => pb::DomainRole::Data,
            model::DomainRole::Export => pb::DomainRole::Export,
        } as i32,
        format: match d.format {
            model::DomainFormat::Ramsnap => pb::DomainFormat::Ramsnap,
            model::DomainFormat::Ovirt => pb::DomainFormat::Ovirt,
        } as i32,
        read_only: d.read_only,
    }
}

/// Admits a metadata change on `domain` when the call names the domain-
/// writer generation it was made under (the coordinator's calls do; see
/// [`Storage::admit_writer`]). A call without one (an operator's) is not
/// checked: the one-writer rule is the coordinator's.
async fn admit_writer(storage: &Storage, writer: Option<i64>, domain: uuid::Uuid) -> Result<(), Status> {
    match writer {
        Some(g) => Ok(storage.admit_writer(domain, g).await?),
        None => Ok(()),
    }
}

pub fn to_volume(v: model::Volume) -> pb::Volume {
    let m = &v.meta;
    pb::Volume {
        r#ref: Some(to_ref(v.volume_ref())),
        parent_volume_id: m.parent.map(|p| p.to_string()).unwrap_or_default(),
        format: match m.format {
            model::Format::Raw => pb::VolumeFormat::Raw,
            model::Format::Cow => pb::VolumeFormat::Cow,
        } as i32,
        allocation: match m.allocation {
            model::Allocation::Sparse => pb::VolumeAllocation::Sparse,
            model::Allocation::Preallocated => pb::VolumeAllocation::Preallocated,
        } as i32,
        purpose: match m.purpose {
            model::Purpose::Disk => pb::VolumePurpose::Disk,
            model::Purpose::MemoryDump => pb::VolumePurpose::MemoryDump,
            model::Purpose::MemoryMetadata => pb::VolumePurpose::MemoryMetadata,
        } as i32,
        legality: match m.legality {
            model::Legality::Legal => pb::VolumeLegality::Legal,
            model::Legality::Illegal => pb::VolumeLegality::Illegal,
        } as i32,
        capacity_bytes: m.capacity,
        allocated_bytes: v.allocated,
        description: m.description.clone(),
        created_at: m.created_at,
    }
}

type CopyStream = Pin<Box<dyn Stream<Item = Result<pb::CopyVolumeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl StorageService for StorageApi {
    async fn register_domain(
        &self,
        req: Request<pb::RegisterDomainRequest>,
    ) -> Result<Response<pb::RegisterDomainResponse>, Status> {
        let req = req.into_inner();
        let id = parse_optional_id("domain_id", &req.domain_id)?;
        let kind = match enum_value::<pb::DomainType>("type", req.r#type)? {
            pb::DomainType::File => model::DomainType::File,
            pb::DomainType::Block => model::DomainType::Block,
            pb::DomainType::Unspecified => {
                return Err(status::invalid_argument("type", "must be FILE or BLOCK"))
            }
        };
        if req.location.is_empty() {
            return Err(status::invalid_argument("location", "is required"));
        }
        let role = role_of("role", req.role)?;
        let format = match enum_value::<pb::DomainFormat>("format", req.format)? {
            pb::DomainFormat::Unspecified => None,
            pb::DomainFormat::Ramsnap => Some(model::DomainFormat::Ramsnap),
            pb::DomainFormat::Ovirt => Some(model::DomainFormat::Ovirt),
        };
        let (info, adopted) = self
            .storage
            .register_domain(id, req.name, kind, req.location, role, format)
            .await?;
        Ok(Response::new(pb::RegisterDomainResponse {
            domain: Some(to_domain(info)),
            adopted,
        }))
    }

    async fn get_domain(
        &self,
        req: Request<pb::GetDomainRequest>,
    ) -> Result<Response<pb::GetDomainResponse>, Status> {
        let id = parse_id("domain_id", &req.get_ref().domain_id)?;
        let info = self.storage.get_domain(id).await?;
        Ok(Response::new(pb::GetDomainResponse {
            domain: Some(to_domain(info)),
        }))
    }

    async fn list_domains(
        &self,
        _req: Request<pb::ListDomainsRequest>,
    ) -> Result<Response<pb::ListDomainsResponse>, Status> {
        let domains = self
            .storage
            .list_domains()
            .await?
            .into_iter()
            .map(to_domain)
            .collect();
        Ok(Response::new(pb::ListDomainsResponse { domains }))
    }

    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let writer = ramsnap_common::fence::writer_from(req.metadata())?;
        let req = req.into_inner();
        let new = NewVolume {
            request_id: parse_optional_id("request_id", &req.request_id)?,
            domain: parse_id("domain_id", &req.domain_id)?,
            image: parse_optional_id("image_id", &req.image_id)?,
            volume: parse_optional_id("volume_id", &req.volume_id)?,
            capacity: req.capacity_bytes,
            format: format_of("format", req.format)?.unwrap_or(model::Format::Raw),
            allocation: allocation_of("allocation", req.allocation)?,
            purpose: purpose_of("purpose", req.purpose)?,
            parent: parse_optional_id("parent_volume_id", &req.parent_volume_id)?,
            description: req.description,
        };
        let v = self.storage.create_volume_as(new, writer).await?;
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(to_volume(v)),
        }))
    }

    async fn create_memory_volumes(
        &self,
        req: Request<pb::CreateMemoryVolumesRequest>,
    ) -> Result<Response<pb::CreateMemoryVolumesResponse>, Status> {
        let writer = ramsnap_common::fence::writer_from(req.metadata())?;
        let req = req.into_inner();
        let mode = match enum_value::<pb::MemoryDumpMode>("mode", req.mode)? {
            pb::MemoryDumpMode::Unspecified | pb::MemoryDumpMode::Live => DumpMode::Live,
            pb::MemoryDumpMode::Paused => DumpMode::Paused,
        };
        let domain = parse_id("domain_id", &req.domain_id)?;
        let request_id = parse_optional_id("request_id", &req.request_id)?;
        let (dump, metadata) = self
            .storage
            .create_memory_volumes_as(
                request_id,
                domain,
                req.memory_bytes,
                mode,
                req.description,
                writer,
            )
            .await?;
        Ok(Response::new(pb::CreateMemoryVolumesResponse {
            dump: Some(to_volume(dump)),
            metadata: Some(to_volume(metadata)),
        }))
    }

    async fn get_volume(
        &self,
        req: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::GetVolumeResponse>, Status> {
        let r = volume_ref("ref", req.into_inner().r#ref)?;
        let v = self.storage.get_volume(r).await?;
        Ok(Response::new(pb::GetVolumeResponse {
            volume: Some(to_volume(v)),
        }))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let req = req.into_inner();
        let domain = parse_id("domain_id", &req.domain_id)?;
        let image = parse_optional_id("image_id", &req.image_id)?;
        let purpose = match req.purpose {
            0 => None,
            p => Some(purpose_of("purpose", p)?),
        };
        let page = PageRequest::parse(
            req.page_size,
            &req.page_token,
            &[&req.domain_id, &req.image_id, &req.purpose.to_string()],
        )?;
        let all = self.storage.list_volumes(domain, image).await?;
        let selected = all
            .into_iter()
            .filter(|v| purpose.is_none_or(|p| v.meta.purpose == p))
            .collect();
        // In (image, volume) order: a volume keeps its place while others
        // come and go.
        let (volumes, next_page_token) =
            page.page(selected, |v| format!("{}/{}", v.meta.image, v.meta.volume));
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: volumes.into_iter().map(to_volume).collect(),
            next_page_token,
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let writer = ramsnap_common::fence::writer_from(req.metadata())?;
        let req = req.into_inner();
        let request_id = parse_optional_id("request_id", &req.request_id)?;
        let r = volume_ref("ref", req.r#ref)?;
        admit_writer(&self.storage, writer, r.domain).await?;
        self.storage.delete_volume(r, request_id).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn merge_volume(
        &self,
        req: Request<pb::MergeVolumeRequest>,
    ) -> Result<Response<pb::MergeVolumeResponse>, Status> {
        let writer = ramsnap_common::fence::writer_from(req.metadata())?;
        let req = req.into_inner();
        let request_id = parse_optional_id("request_id", &req.request_id)?;
        let r = volume_ref("ref", req.r#ref)?;
        admit_writer(&self.storage, writer, r.domain).await?;
        let child = self.storage.merge_volume(r, request_id).await?;
        Ok(Response::new(pb::MergeVolumeResponse {
            child: Some(to_volume(child)),
        }))
    }

    async fn drop_committed_volume(
        &self,
        req: Request<pb::DropCommittedVolumeRequest>,
    ) -> Result<Response<pb::DropCommittedVolumeResponse>, Status> {
        let writer = ramsnap_common::fence::writer_from(req.metadata())?;
        let req = req.into_inner();
        let request_id = parse_optional_id("request_id", &req.request_id)?;
        let r = volume_ref("ref", req.r#ref)?;
        admit_writer(&self.storage, writer, r.domain).await?;
        self.storage.drop_committed_volume(r, request_id).await?;
        Ok(Response::new(pb::DropCommittedVolumeResponse {}))
    }

    type CopyVolumeStream = CopyStream;

    async fn copy_volume(&self, req: Request<pb::CopyVolumeRequest>) -> Result<Response<CopyStream>, Status> {
        let writer = ramsnap_common::fence::writer_from(req.metadata())?;
        let req = req.into_inner();
        let copy = CopyRequest {
            request_id: parse_optional_id("request_id", &req.request_id)?,
            source: volume_ref("source", req.source)?,
            target_domain: parse_id("target_domain_id", &req.target_domain_id)?,
            target_image: parse_optional_id("target_image_id", &req.target_image_id)?,
            target_volume: parse_optional_id("target_volume_id", &req.target_volume_id)?,
            target_format: format_of("target_format", req.target_format)?,
            target_allocation: allocation_of("target_allocation", req.target_allocation)?,
            description: req.description,
            keep_parent: req.keep_parent,
            target_purpose: match enum_value::<pb::VolumePurpose>("target_purpose", req.target_purpose)? {
                pb::VolumePurpose::Unspecified => None,
                _ => Some(purpose_of("target_purpose", req.target_purpose)?),
            },
            checksum: match req.checksum_algorithm.as_str() {
                "" => false,
                "blake3-4m" => true,
                other => {
                    return Err(StorageError::invalid(
                        "checksum_algorithm",
                        format!(
                            "{} is not supported: \"blake3-4m\", or empty for none",
                            ramsnap_common::text::echo(other)
                        ),
                    )
                    .into())
                }
            },
            writer,
        };
        let mut rx = self.storage.copy_volume(copy).await?;
        let stream = async_stream::try_stream! {
            loop {
                let state = rx.borrow_and_update().clone();
                let progress = Some(common::Progress { processed_bytes: state.processed, total_bytes: state.total });
                match state.outcome {
                    Some(Ok(v)) => {
                        let checksum = state.checksum.map(|c| c.to_string()).unwrap_or_default();
                        yield pb::CopyVolumeResponse { progress, volume: Some(to_volume(v)), checksum };
                        break;
                    }
                    Some(Err(e)) => Err(Status::from(e))?,
                    None => yield pb::CopyVolumeResponse { progress, volume: None, checksum: String::new() },
                }
                if rx.changed().await.is_err() {
                    Err(Status::from(StorageError::Tool { cmd: "copy".into(), stderr: "copy task ended without a result".into() }))?;
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn prepare_volume(
        &self,
        req: Request<pb::PrepareVolumeRequest>,
    ) -> Result<Response<pb::PrepareVolumeResponse>, Status> {
        let req = req.into_inner();
        let r = volume_ref("ref", req.r#ref)?;
        let purpose = match req.purpose {
            0 => None,
            p => Some(purpose_of("purpose", p)?),
        };
        let (path, volume) = self.storage.prepare_volume_of(r, purpose).await?;
        Ok(Response::new(pb::PrepareVolumeResponse {
            path: path.display().to_string(),
            volume: Some(to_volume(volume)),
        }))
    }

    async fn teardown_volume(
        &self,
        req: Request<pb::TeardownVolumeRequest>,
    ) -> Result<Response<pb::TeardownVolumeResponse>, Status> {
        let r = volume_ref("ref", req.into_inner().r#ref)?;
        self.storage.teardown_volume(r).await?;
        Ok(Response::new(pb::TeardownVolumeResponse {}))
    }

    async fn put_vm_descriptor(
        &self,
        req: Request<pb::PutVmDescriptorRequest>,
    ) -> Result<Response<pb::PutVmDescriptorResponse>, Status> {
        let writer = ramsnap_common::fence::writer_from(req.metadata())?;
        let req = req.into_inner();
        let domain = parse_id("domain_id", &req.domain_id)?;
        let vm = parse_id("vm_id", &req.vm_id)?;
        admit_writer(&self.storage, writer, domain).await?;
        let d = self.storage.put_vm_descriptor(domain, vm, req.ovf).await?;
        Ok(Response::new(pb::PutVmDescriptorResponse {
            descriptor: Some(to_descriptor(d)),
        }))
    }

    async fn get_vm_descriptor(
        &self,
        req: Request<pb::GetVmDescriptorRequest>,
    ) -> Result<Response<pb::GetVmDescriptorResponse>, Status> {
        let req = req.into_inner();
        let domain = parse_id("domain_id", &req.domain_id)?;
        let vm = parse_id("vm_id", &req.vm_id)?;
        let d = self.storage.get_vm_descriptor(domain, vm).await?;
        Ok(Response::new(pb::GetVmDescriptorResponse {
            descriptor: Some(to_descriptor(d)),
        }))
    }

    async fn list_vm_descriptors(
        &self,
        req: Request<pb::ListVmDescriptorsRequest>,
    ) -> Result<Response<pb::ListVmDescriptorsResponse>, Status> {
        let req = req.into_inner();
        let domain = parse_id("domain_id", &req.domain_id)?;
        let page = PageRequest::parse(req.page_size, &req.page_token, &[&req.domain_id])?;
        let all = self.storage.list_vm_descriptors(domain).await?;
        // OVF documents are large: a page also ends before its documents
        // pass DESCRIPTOR_PAGE_BYTES (it holds one at least).
        let (descriptors, next_page_token) =
            page.page_within(all, |d| d.vm.to_string(), |d| d.ovf.len(), DESCRIPTOR_PAGE_BYTES);
        Ok(Response::new(pb::ListVmDescriptorsResponse {
            descriptors: descriptors.into_iter().map(to_descriptor).collect(),
            next_page_token,
        }))
    }

    async fn delete_vm_descriptor(
        &self,
        req: Request<pb::DeleteVmDescriptorRequest>,
    ) -> Result<Response<pb::DeleteVmDescriptorResponse>, Status> {
        let writer = ramsnap_common::fence::writer_from(req.metadata())?;
        let req = req.into_inner();
        let domain = parse_id("domain_id", &req.domain_id)?;
        let vm = parse_id("vm_id", &req.vm_id)?;
        admit_writer(&self.storage, writer, domain).await?;
        self.storage.delete_vm_descriptor(domain, vm).await?;
        Ok(Response::new(pb::DeleteVmDescriptorResponse {}))
    }
}
