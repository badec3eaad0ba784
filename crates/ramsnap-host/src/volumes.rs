//! The host's StorageService, over gRPC: the only way the host learns a
//! path. Volume ids go in, prepared paths come out.
use crate::error::{HostError, Result, StorageCallError};
use crate::metadata::is_block_device;
use crate::model::VolumeRef;
use crate::xml::{DiskFormat, DiskKind};
use ramsnap_common::tls::ClientTransport;
use ramsnap_common::tracecontext::Propagate;
use ramsnap_proto::common::v1 as common;
use ramsnap_proto::storage::v1 as pb;
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use std::path::PathBuf;
use std::time::Duration;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;
use uuid::Uuid;

/// Prepare and teardown run LVM and losetup on BLOCK domains.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Disk,
    MemoryDump,
    MemoryMetadata,
    Other,
}

impl Purpose {
    pub fn name(self) -> &'static str {
        match self {
            Purpose::Disk => "DISK",
            Purpose::MemoryDump => "MEMORY_DUMP",
            Purpose::MemoryMetadata => "MEMORY_METADATA",
            Purpose::Other => "UNSPECIFIED",
        }
    }
}

#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub r: VolumeRef,
    pub parent: Option<Uuid>,
    pub format: DiskFormat,
    pub purpose: Purpose,
    pub capacity: u64,
}

/// A prepared volume: where to open it and what it is.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub r: VolumeRef,
    pub path: PathBuf,
    pub kind: DiskKind,
}

#[derive(Clone)]
pub struct Volumes {
    client: StorageServiceClient<InterceptedService<Channel, Propagate>>,
}

fn to_pb(r: &VolumeRef) -> common::VolumeRef {
    common::VolumeRef {
        domain_id: r.domain.to_string(),
        image_id: r.image.to_string(),
        volume_id: r.volume.to_string(),
    }
}

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(CALL_TIMEOUT);
    req
}

impl Volumes {
    /// A client of the StorageService at `endpoint` (http://host:port);
    /// connects on first use, so the host starts before its storage agent.
    pub fn connect_lazy(endpoint: &str, transport: &ClientTransport) -> Result<Volumes> {
        let ep = transport
            .endpoint(endpoint)
            .map_err(|e| HostError::invalid("storage", format!("{endpoint:?}: {e}")))?
            .connect_timeout(Duration::from_secs(10));
        Ok(Volumes {
            client: StorageServiceClient::with_interceptor(transport.connect_lazy(&ep), Propagate),
        })
    }

    pub async fn get(&self, r: &VolumeRef) -> Result<VolumeInfo> {
        let v = self
            .client
            .clone()
            .get_volume(request(pb::GetVolumeRequest {
                r#ref: Some(to_pb(r)),
            }))
            .await
            .map_err(|s| StorageCallError::from_status("get_volume", &s))?
            .into_inner()
            .volume
            .ok_or_else(|| HostError::Internal("storage get_volume: no volume in the answer".into()))?;
        info_of(r, &v)
    }

    /// Prepares a volume that must be of `purpose`, and what it is: one
    /// call, where a GetVolume to check it and a PrepareVolume would be two
    /// (two LVM reads on BLOCK). The storage service refuses a volume of
    /// another purpose (VOLUME_PURPOSE) before it prepares anything. A
    /// storage service that did not answer what it prepared (an older one,
    /// which does not check either) is asked with a GetVolume; on a wrong
    /// purpose then the volume is left prepared rather than torn down, as
    /// it may be another VM's disk in use.
    pub async fn prepare_of(&self, r: &VolumeRef, purpose: Purpose) -> Result<(Prepared, VolumeInfo)> {
        let (prepared, volume) = self.prepare_request(r, purpose).await?;
        let info = match volume {
            Some(v) => info_of(r, &v)?,
            None => self.get(r).await?,
        };
        if info.purpose != purpose {
            return Err(crate::error::RunError::WrongPurpose {
                volume: *r,
                expected: purpose.name(),
                actual: info.purpose.name().to_string(),
            }
            .into());
        }
        Ok((prepared, info))
    }

    /// The ancestors of `info`'s volume, parent first: from one listing of
    /// its image (one LVM call on BLOCK), not a GetVolume per layer; a
    /// parent the listing lacks is asked for on its own. Bounded at 256.
    pub async fn ancestors(&self, info: &VolumeInfo) -> Result<Vec<Uuid>> {
        let mut parents: std::collections::HashMap<Uuid, Option<Uuid>> = std::collections::HashMap::new();
        if info.parent.is_some() {
            let mut page_token = String::new();
            loop {
                let page = self
                    .client
                    .clone()
                    .list_volumes(request(pb::ListVolumesRequest {
                        domain_id: info.r.domain.to_string(),
                        image_id: info.r.image.to_string(),
                        page_size: 1000,
                        page_token: page_token.clone(),
                        ..Default::default()
                    }))
                    .await
                    .map_err(|s| StorageCallError::from_status("list_volumes", &s))?
                    .into_inner();
                for v in &page.volumes {
                    let id = v.r#ref.as_ref().and_then(|r| Uuid::parse_str(&r.volume_id).ok());
                    if let Some(id) = id {
                        parents.insert(id, Uuid::parse_str(&v.parent_volume_id).ok());
                    }
                }
                if page.next_page_token.is_empty() || page.next_page_token == page_token {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
        let mut chain = Vec::new();
        let mut next = info.parent;
        while let Some(p) = next.filter(|_| chain.len() < 256) {
            chain.push(p);
            next = match parents.get(&p) {
                Some(parent) => *parent,
                None => self.get(&VolumeRef { volume: p, ..info.r }).await?.parent,
            };
        }
        Ok(chain)
    }

    /// Prepares the volume (and its chain); FILE gives the file, BLOCK a
    /// link to the activated device.
    pub async fn prepare(&self, r: &VolumeRef) -> Result<Prepared> {
        Ok(self.prepare_request(r, Purpose::Other).await?.0)
    }

    /// PrepareVolume, of a volume that must be of `purpose` unless Other:
    /// the prepared volume, and the volume as the service listed it.
    async fn prepare_request(
        &self,
        r: &VolumeRef,
        purpose: Purpose,
    ) -> Result<(Prepared, Option<pb::Volume>)> {
        let purpose = match purpose {
            Purpose::Disk => pb::VolumePurpose::Disk,
            Purpose::MemoryDump => pb::VolumePurpose::MemoryDump,
            Purpose::MemoryMetadata => pb::VolumePurpose::MemoryMetadata,
            Purpose::Other => pb::VolumePurpose::Unspecified,
        };
        let answer = self
            .client
            .clone()
            .prepare_volume(request(pb::PrepareVolumeRequest {
                r#ref: Some(to_pb(r)),
                purpose: purpose as i32,
            }))
            .await
            .map_err(|s| StorageCallError::from_status("prepare_volume", &s))?
            .into_inner();
        let path = PathBuf::from(answer.path);
        let p = path.clone();
        let block = tokio::task::spawn_blocking(move || is_block_device(&p))
            .await
            .map_err(|e| HostError::Internal(e.to_string()))?
            .map_err(|e| HostError::io(format!("prepared volume {}", path.display()), e))?;
        let prepared = Prepared {
            r: *r,
            path,
            kind: if block { DiskKind::Block } else { DiskKind::File },
        };
        Ok((prepared, answer.volume))
    }

    /// Tears the volume down; a volume already gone is success.
    pub async fn teardown(&self, r: &VolumeRef) -> Result<()> {
        match self
            .client
            .clone()
            .teardown_volume(request(pb::TeardownVolumeRequest {
                r#ref: Some(to_pb(r)),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(StorageCallError::from_status("teardown_volume", &s).into()),
        }
    }

    /// Tears down every volume in `refs` (last first), logging failures:
    /// used on cleanup paths, where the first error must not hide the rest.
    pub async fn teardown_all(&self, refs: &[VolumeRef]) {
        // Last first within an image (a child before its parent); images
        // side by side, as the storage service tears them down (a memory
        // pair is two images).
        let mut images: Vec<(Uuid, Vec<&VolumeRef>)> = Vec::new();
        for r in refs.iter().rev() {
            match images.iter_mut().find(|(image, _)| *image == r.image) {
                Some((_, of_image)) => of_image.push(r),
                None => images.push((r.image, vec![r])),
            }
        }
        futures::future::join_all(images.into_iter().map(|(_, of_image)| async move {
            for r in of_image {
                if let Err(e) = self.teardown(r).await {
                    tracing::warn!(volume = %r, error = %e, "teardown failed");
                }
            }
        }))
        .await;
    }
}

/// What the host needs of a volume the storage service listed.
fn info_of(r: &VolumeRef, v: &pb::Volume) -> Result<VolumeInfo> {
    let parent =
        if v.parent_volume_id.is_empty() {
            None
        } else {
            Some(Uuid::parse_str(&v.parent_volume_id).map_err(|_| {
                HostError::Internal(format!("storage: bad parent id {:?}", v.parent_volume_id))
            })?)
        };
    Ok(VolumeInfo {
        r: *r,
        parent,
        format: match pb::VolumeFormat::try_from(v.format) {
            Ok(pb::VolumeFormat::Cow) => DiskFormat::Qcow2,
            _ => DiskFormat::Raw,
        },
        purpose: match pb::VolumePurpose::try_from(v.purpose) {
            Ok(pb::VolumePurpose::Disk) => Purpose::Disk,
            Ok(pb::VolumePurpose::MemoryDump) => Purpose::MemoryDump,
            Ok(pb::VolumePurpose::MemoryMetadata) => Purpose::MemoryMetadata,
            _ => Purpose::Other,
        },
        capacity: v.capacity_bytes,
    })
}
