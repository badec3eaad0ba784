//! The tonic handler: converts requests into the domain layer's types
//! (rejecting bad input with field details), calls [`Host`], converts back.
use crate::error::HostError;
use crate::host::{Host, JobView, SuspendRequest};
use crate::model::{
    self, BootFile, ClusterLevel, MemoryVolumes, OvirtAdoption, Rebind, SnapshotDisk, SnapshotMode,
    SnapshotRequest, StatusEvent, VerifiedMemory, VerifyMemoryRequest, VmSpec, VmStatus, VolumeRef,
};
use futures::StreamExt;
use ramsnap_common::checksum::ChecksumError;
use ramsnap_common::{ids, status};
use ramsnap_proto::common::v1 as common;
use ramsnap_proto::host::v1 as pb;
use ramsnap_proto::host::v1::host_service_server::{HostService, HostServiceServer};
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub const SERVICE_NAME: &str = "ramsnap.host.v1.HostService";

/// ReadConsole's default and largest read.
const CONSOLE_CHUNK: usize = 1 << 20;
/// The longest graceful shutdown a caller may ask for.
const MAX_GRACEFUL_SECS: u32 = 3600;

pub struct HostApi {
    host: Host,
}

impl HostApi {
    pub fn new(host: Host) -> Self {
        HostApi { host }
    }

    pub fn into_server(self) -> HostServiceServer<Self> {
        use ramsnap_common::limits::MessageLimits;
        HostServiceServer::new(self).with_message_limits()
    }
}

fn volume_ref(field: &str, r: Option<common::VolumeRef>) -> Result<VolumeRef, Status> {
    let r = r.ok_or_else(|| status::invalid_argument(field, "is required"))?;
    Ok(VolumeRef {
        domain: ids::parse(&format!("{field}.domain_id"), &r.domain_id)?,
        image: ids::parse(&format!("{field}.image_id"), &r.image_id)?,
        volume: ids::parse(&format!("{field}.volume_id"), &r.volume_id)?,
    })
}

fn memory_volumes(field: &str, m: Option<common::MemoryVolumeRef>) -> Result<Option<MemoryVolumes>, Status> {
    let Some(m) = m else { return Ok(None) };
    Ok(Some(MemoryVolumes {
        dump: volume_ref(&format!("{field}.dump"), m.dump)?,
        metadata: volume_ref(&format!("{field}.metadata"), m.metadata)?,
    }))
}

/// INVALID_ARGUMENT when the pair is one volume, or one of them is among
/// `others` (disk volumes): a purpose check would refuse it only after
/// volumes were prepared.
fn refuse_memory_among(field: &str, m: &MemoryVolumes, others: &[&[VolumeRef]]) -> Result<(), Status> {
    if m.dump == m.metadata {
        return Err(status::invalid_argument(
            &format!("{field}.metadata"),
            format!("is the same volume as {field}.dump"),
        ));
    }
    for (name, r) in [("dump", m.dump), ("metadata", m.metadata)] {
        if others.iter().any(|o| o.contains(&r)) {
            return Err(status::invalid_argument(
                &format!("{field}.{name}"),
                "is one of the VM's disk volumes",
            ));
        }
    }
    Ok(())
}

fn boot_file(field: &str, name: &str) -> Result<Option<BootFile>, Status> {
    if name.is_empty() {
        return Ok(None);
    }
    BootFile::parse(name)
        .map(Some)
        .map_err(|reason| status::invalid_argument(field, reason))
}

/// INVALID_ARGUMENT when `refs` (named `field(i)`) repeat a volume, or
/// (with `per_image`) put two volumes of one image side by side: one image
/// is one disk's chain, and QEMU cannot open a volume twice (it would fail
/// later, with its command line in the error).
fn refuse_repeats(
    refs: &[VolumeRef],
    field: impl Fn(usize) -> String,
    per_image: bool,
) -> Result<(), Status> {
    for (i, r) in refs.iter().enumerate() {
        for (j, earlier) in refs[..i].iter().enumerate() {
            if r == earlier {
                return Err(status::invalid_argument(
                    &field(i),
                    format!("is the same volume as {}", field(j)),
                ));
            }
            if per_image && (r.domain, r.image) == (earlier.domain, earlier.image) {
                return Err(status::invalid_argument(
                    &field(i),
                    format!("is in the same image as {} (one image is one disk)", field(j)),
                ));
            }
        }
    }
    Ok(())
}

/// A VM id: a UUID, not the nil one (libvirt's "no UUID").
fn vm_id(field: &str, value: &str) -> Result<uuid::Uuid, Status> {
    let id = ids::parse(field, value)?;
    if id.is_nil() {
        return Err(status::invalid_argument(field, "must not be the nil UUID"));
    }
    Ok(id)
}

impl TryFrom<pb::VmSpec> for VmSpec {
    type Error = Status;

    fn try_from(s: pb::VmSpec) -> Result<VmSpec, Status> {
        if s.disks.is_empty() {
            return Err(status::invalid_argument(
                "spec.disks",
                "at least one disk is required",
            ));
        }
        if s.disks.len() > model::MAX_DISKS {
            return Err(status::invalid_argument(
                "spec.disks",
                format!("at most {} disks", model::MAX_DISKS),
            ));
        }
        let disks = s
            .disks
            .into_iter()
            .enumerate()
            .map(|(i, d)| volume_ref(&format!("spec.disks[{i}].volume"), d.volume))
            .collect::<Result<Vec<_>, _>>()?;
        refuse_repeats(&disks, |i| format!("spec.disks[{i}].volume"), true)?;
        let spec = VmSpec {
            vm_id: vm_id("spec.vm_id", &s.vm_id)?,
            name: s.name,
            memory_bytes: s.memory_bytes,
            vcpus: s.vcpus,
            disks,
            kernel: boot_file("spec.kernel", &s.kernel)?,
            initrd: boot_file("spec.initrd", &s.initrd)?,
            cmdline: s.cmdline,
        };
        spec.validate()
            .map_err(|(field, reason)| status::invalid_argument(field, reason))?;
        Ok(spec)
    }
}

impl TryFrom<pb::SnapshotVmRequest> for SnapshotRequest {
    type Error = Status;

    fn try_from(r: pb::SnapshotVmRequest) -> Result<SnapshotRequest, Status> {
        if r.disks.len() > model::MAX_DISKS {
            return Err(status::invalid_argument(
                "disks",
                format!("at most {} disks", model::MAX_DISKS),
            ));
        }
        let disks = r
            .disks
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                Ok(SnapshotDisk {
                    current: volume_ref(&format!("disks[{i}].current"), d.current)?,
                    overlay: volume_ref(&format!("disks[{i}].overlay"), d.overlay)?,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let currents: Vec<VolumeRef> = disks.iter().map(|d| d.current).collect();
        refuse_repeats(&currents, |i| format!("disks[{i}].current"), true)?;
        let overlays: Vec<VolumeRef> = disks.iter().map(|d| d.overlay).collect();
        refuse_repeats(&overlays, |i| format!("disks[{i}].overlay"), false)?;
        for (i, d) in disks.iter().enumerate() {
            if let Some(j) = currents.iter().position(|c| *c == d.overlay) {
                return Err(status::invalid_argument(
                    &format!("disks[{i}].overlay"),
                    format!("is the volume of disks[{j}].current"),
                ));
            }
        }
        let memory = memory_volumes("memory", r.memory)?;
        if let Some(m) = &memory {
            refuse_memory_among("memory", m, &[&currents, &overlays])?;
        }
        let mode = match pb::SnapshotMode::try_from(r.mode) {
            // oVirt 3.3's behaviour unless the caller asks for a live dump.
            Ok(pb::SnapshotMode::Unspecified | pb::SnapshotMode::Paused) => SnapshotMode::Paused,
            Ok(pb::SnapshotMode::Live) => SnapshotMode::Live,
            Err(_) => {
                return Err(status::invalid_argument(
                    "mode",
                    format!("{} is not a known value", r.mode),
                ))
            }
        };
        let level = if r.compatibility_version.is_empty() {
            ClusterLevel::MEMORY_SNAPSHOTS
        } else {
            ClusterLevel::parse(&r.compatibility_version).ok_or_else(|| {
                status::invalid_argument(
                    "compatibility_version",
                    format!("{:?} is not MAJOR.MINOR", r.compatibility_version),
                )
            })?
        };
        Ok(SnapshotRequest {
            job_id: ids::parse("job_id", &r.job_id)?,
            vm_id: vm_id("vm_id", &r.vm_id)?,
            snapshot_id: ids::parse("snapshot_id", &r.snapshot_id)?,
            disks,
            memory,
            mode,
            level,
        })
    }
}

impl TryFrom<pb::VerifyMemoryRequest> for VerifyMemoryRequest {
    type Error = Status;

    fn try_from(r: pb::VerifyMemoryRequest) -> Result<VerifyMemoryRequest, Status> {
        let vm_id = vm_id("vm_id", &r.vm_id)?;
        let memory = memory_volumes("memory", r.memory)?
            .ok_or_else(|| status::invalid_argument("memory", "is required"))?;
        let expected_checksum =
            if r.expected_checksum.is_empty() {
                None
            } else {
                Some(r.expected_checksum.parse().map_err(|e: ChecksumError| {
                    status::invalid_argument("expected_checksum", e.to_string())
                })?)
            };
        let copied_checksum = if r.copied_checksum.is_empty() {
            None
        } else {
            Some(
                r.copied_checksum
                    .parse()
                    .map_err(|e: ChecksumError| status::invalid_argument("copied_checksum", e.to_string()))?,
            )
        };
        let domain = ids::parse_optional("rebind_disk_domain_id", &r.rebind_disk_domain_id)?;
        if domain.is_some() && !r.rebind_disks.is_empty() {
            return Err(status::invalid_argument(
                "rebind_disks",
                "not together with rebind_disk_domain_id",
            ));
        }
        if r.rebind_disks.len() > model::MAX_DISKS {
            return Err(status::invalid_argument(
                "rebind_disks",
                format!("at most {} disks", model::MAX_DISKS),
            ));
        }
        let disks = r
            .rebind_disks
            .into_iter()
            .enumerate()
            .map(|(i, d)| volume_ref(&format!("rebind_disks[{i}]"), Some(d)))
            .collect::<Result<Vec<_>, _>>()?;
        refuse_repeats(&disks, |i| format!("rebind_disks[{i}]"), false)?;
        refuse_memory_among("memory", &memory, &[&disks])?;
        let rebind = match domain {
            Some(d) => Some(Rebind::DiskDomain(d)),
            None if !disks.is_empty() => Some(Rebind::Disks(disks)),
            None => None,
        };
        let rebrand = ids::parse_optional("rebrand_vm_id", &r.rebrand_vm_id)?;
        if rebrand == Some(vm_id) {
            return Err(status::invalid_argument(
                "rebrand_vm_id",
                "is vm_id: the memory already belongs to it",
            ));
        }
        let adopt_ovirt = r.adopt_ovirt.map(|a| ovirt_adoption(a, &memory)).transpose()?;
        Ok(VerifyMemoryRequest {
            vm_id,
            memory,
            expected_checksum,
            copied_checksum,
            rebind,
            rebrand,
            adopt_ovirt,
            as_ovirt: r.as_ovirt,
        })
    }
}

fn ovirt_adoption(a: pb::OvirtAdoption, memory: &MemoryVolumes) -> Result<OvirtAdoption, Status> {
    let snapshot_id = vm_id("adopt_ovirt.snapshot_id", &a.snapshot_id)?;
    if a.disks.is_empty() || a.disks.len() > model::MAX_DISKS {
        return Err(status::invalid_argument(
            "adopt_ovirt.disks",
            format!("1 to {} disks", model::MAX_DISKS),
        ));
    }
    let mut disks = Vec::with_capacity(a.disks.len());
    for (i, d) in a.disks.into_iter().enumerate() {
        let current = volume_ref(&format!("adopt_ovirt.disks[{i}].current"), d.current)?;
        let overlay = volume_ref(&format!("adopt_ovirt.disks[{i}].overlay"), d.overlay)?;
        disks.push((current, overlay));
    }
    let currents: Vec<VolumeRef> = disks.iter().map(|d| d.0).collect();
    let overlays: Vec<VolumeRef> = disks.iter().map(|d| d.1).collect();
    refuse_repeats(&currents, |i| format!("adopt_ovirt.disks[{i}].current"), false)?;
    refuse_memory_among("memory", memory, &[&currents, &overlays])?;
    Ok(OvirtAdoption {
        snapshot_id,
        created_at: a.created_at,
        disks,
    })
}

fn to_pb_volume_ref(r: &VolumeRef) -> common::VolumeRef {
    common::VolumeRef {
        domain_id: r.domain.to_string(),
        image_id: r.image.to_string(),
        volume_id: r.volume.to_string(),
    }
}

impl From<VerifiedMemory> for pb::VerifyMemoryResponse {
    fn from(v: VerifiedMemory) -> pb::VerifyMemoryResponse {
        pb::VerifyMemoryResponse {
            checksum: v.checksum.to_string(),
            dump_bytes: v.dump_bytes,
            capacity: v.capacity,
            snapshot_id: v.snapshot_id.to_string(),
            created_at: v.created_at,
            rebound: v.rebound,
            disks: v.disks.iter().map(to_pb_volume_ref).collect(),
        }
    }
}

pub fn to_pb_status(s: VmStatus) -> pb::VmStatus {
    match s {
        VmStatus::Down => pb::VmStatus::Down,
        VmStatus::PoweringUp => pb::VmStatus::PoweringUp,
        VmStatus::Up => pb::VmStatus::Up,
        VmStatus::Paused => pb::VmStatus::Paused,
        VmStatus::RestoringState => pb::VmStatus::RestoringState,
        VmStatus::SavingState => pb::VmStatus::SavingState,
        VmStatus::PoweringDown => pb::VmStatus::PoweringDown,
    }
}

fn progress(v: &JobView) -> common::Progress {
    common::Progress {
        processed_bytes: v.progress.processed,
        total_bytes: v.progress.total,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchVmStatusResponse, Status>> + Send>>;
type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotVmResponse, Status>> + Send>>;

#[tonic::async_trait]
impl HostService for HostApi {
    async fn get_host_info(
        &self,
        _req: Request<pb::GetHostInfoRequest>,
    ) -> Result<Response<pb::GetHostInfoResponse>, Status> {
        let i = self.host.info().await?;
        Ok(Response::new(pb::GetHostInfoResponse {
            host_id: i.host_id,
            hostname: i.hostname,
            libvirt_uri: i.libvirt_uri,
            libvirt_version: i.libvirt_version,
            hypervisor_version: i.hypervisor_version,
            hypervisor_type: i.hypervisor_type,
            memory_snapshots_supported: i.memory_snapshots_supported,
        }))
    }

    async fn run_vm(&self, req: Request<pb::RunVmRequest>) -> Result<Response<pb::RunVmResponse>, Status> {
        let req = req.into_inner();
        let spec = VmSpec::try_from(
            req.spec
                .ok_or_else(|| status::invalid_argument("spec", "is required"))?,
        )?;
        let restore = memory_volumes("restore_memory", req.restore_memory)?;
        if let Some(m) = &restore {
            refuse_memory_among("restore_memory", m, &[&spec.disks])?;
        }
        let s = self.host.run(spec, restore).await?;
        Ok(Response::new(pb::RunVmResponse {
            status: to_pb_status(s) as i32,
        }))
    }

    async fn stop_vm(&self, req: Request<pb::StopVmRequest>) -> Result<Response<pb::StopVmResponse>, Status> {
        let req = req.into_inner();
        let id = ids::parse("vm_id", &req.vm_id)?;
        if req.graceful_timeout_seconds > MAX_GRACEFUL_SECS {
            return Err(status::invalid_argument(
                "graceful_timeout_seconds",
                format!("at most {MAX_GRACEFUL_SECS}"),
            ));
        }
        let graceful = self
            .host
            .stop(id, Duration::from_secs(req.graceful_timeout_seconds.into()))
            .await?;
        Ok(Response::new(pb::StopVmResponse { graceful }))
    }

    async fn get_vm_status(
        &self,
        req: Request<pb::GetVmStatusRequest>,
    ) -> Result<Response<pb::GetVmStatusResponse>, Status> {
        let id = ids::parse("vm_id", &req.into_inner().vm_id)?;
        Ok(Response::new(pb::GetVmStatusResponse {
            status: to_pb_status(self.host.status(id)) as i32,
        }))
    }

    async fn list_vms(
        &self,
        _req: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let vms = self
            .host
            .list()
            .into_iter()
            .map(|(id, name, s)| pb::VmInfo {
                vm_id: id.to_string(),
                name,
                status: to_pb_status(s) as i32,
            })
            .collect();
        Ok(Response::new(pb::ListVmsResponse { vms }))
    }

    type WatchVmStatusStream = WatchStream;

    async fn watch_vm_status(
        &self,
        req: Request<pb::WatchVmStatusRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let id = ids::parse("vm_id", &req.into_inner().vm_id)?;
        let stream = self.host.watch(id).map(|ev: StatusEvent| {
            Ok(pb::WatchVmStatusResponse {
                status: to_pb_status(ev.status) as i32,
                at_unix_ms: ev.at_unix_ms,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn read_console(
        &self,
        req: Request<pb::ReadConsoleRequest>,
    ) -> Result<Response<pb::ReadConsoleResponse>, Status> {
        let req = req.into_inner();
        let id = ids::parse("vm_id", &req.vm_id)?;
        let max = match req.max_bytes as usize {
            0 => CONSOLE_CHUNK,
            n => n.min(CONSOLE_CHUNK),
        };
        let (data, next_offset) = self.host.read_console(id, req.offset, max).await?;
        Ok(Response::new(pb::ReadConsoleResponse { data, next_offset }))
    }

    type SnapshotVmStream = SnapshotStream;

    async fn snapshot_vm(
        &self,
        req: Request<pb::SnapshotVmRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let req = SnapshotRequest::try_from(req.into_inner())?;
        let mut rx = self.host.snapshot(req).await?;
        let stream = async_stream::try_stream! {
            loop {
                let view = rx.borrow_and_update().clone();
                let p = progress(&view);
                match view.outcome {
                    Some(Ok(o)) => {
                        yield pb::SnapshotVmResponse {
                            progress: Some(p),
                            result: Some(pb::SnapshotResult {
                                memory_saved: o.memory_saved,
                                dump_bytes: o.dump_bytes,
                                dump_checksum: o.dump_checksum.map(|c| c.to_string()).unwrap_or_default(),
                                guest_pause_ms: o.guest_pause_ms,
                                duration_ms: o.duration_ms,
                            }),
                        };
                        break;
                    }
                    Some(Err(e)) => Err(Status::from(e))?,
                    None => yield pb::SnapshotVmResponse { progress: Some(p), result: None },
                }
                if rx.changed().await.is_err() {
                    Err(Status::from(HostError::Internal("the snapshot job vanished".into())))?;
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_snapshot(
        &self,
        req: Request<pb::CancelSnapshotRequest>,
    ) -> Result<Response<pb::CancelSnapshotResponse>, Status> {
        let id = ids::parse("job_id", &req.into_inner().job_id)?;
        let cancelled = self.host.cancel_snapshot(id).await?;
        Ok(Response::new(pb::CancelSnapshotResponse { cancelled }))
    }

    async fn verify_memory(
        &self,
        req: Request<pb::VerifyMemoryRequest>,
    ) -> Result<Response<pb::VerifyMemoryResponse>, Status> {
        let req = VerifyMemoryRequest::try_from(req.into_inner())?;
        let verified = self.host.verify_memory(req).await?;
        Ok(Response::new(verified.into()))
    }

    async fn inspect_ovirt_memory(
        &self,
        req: Request<pb::InspectOvirtMemoryRequest>,
    ) -> Result<Response<pb::InspectOvirtMemoryResponse>, Status> {
        let r = req.into_inner();
        let vm = vm_id("vm_id", &r.vm_id)?;
        let memory = memory_volumes("memory", r.memory)?
            .ok_or_else(|| status::invalid_argument("memory", "is required"))?;
        if r.disk_count == 0 || r.disk_count as usize > model::MAX_DISKS {
            return Err(status::invalid_argument(
                "disk_count",
                format!("1 to {}", model::MAX_DISKS),
            ));
        }
        let reason = self
            .host
            .inspect_ovirt_memory(vm, memory, r.disk_count as usize)
            .await?;
        Ok(Response::new(pb::InspectOvirtMemoryResponse {
            usable: reason.is_none(),
            reason: reason.unwrap_or_default(),
        }))
    }

    async fn commit_volume(
        &self,
        req: Request<pb::CommitVolumeRequest>,
    ) -> Result<Response<pb::CommitVolumeResponse>, Status> {
        let r = req.into_inner();
        let vm = vm_id("vm_id", &r.vm_id)?;
        let top = volume_ref("top", r.top)?;
        let base = volume_ref("base", r.base)?;
        let o = self.host.commit_volume(vm, top, base).await?;
        Ok(Response::new(pb::CommitVolumeResponse {
            was_leaf: o.was_leaf,
            done_earlier: o.done_earlier,
            duration_ms: o.duration_ms,
            bytes: o.bytes,
        }))
    }

    async fn suspend_vm(
        &self,
        req: Request<pb::SuspendVmRequest>,
    ) -> Result<Response<pb::SuspendVmResponse>, Status> {
        let r = req.into_inner();
        let disks = r
            .disks
            .into_iter()
            .enumerate()
            .map(|(i, d)| volume_ref(&format!("disks[{i}]"), Some(d)))
            .collect::<Result<Vec<_>, Status>>()?;
        refuse_repeats(&disks, |i| format!("disks[{i}]"), true)?;
        let memory = memory_volumes("memory", r.memory)?
            .ok_or_else(|| status::invalid_argument("memory", "is required"))?;
        refuse_memory_among("memory", &memory, &[&disks])?;
        let req = SuspendRequest {
            vm_id: vm_id("vm_id", &r.vm_id)?,
            snapshot_id: ids::parse("snapshot_id", &r.snapshot_id)?,
            disks,
            memory,
        };
        let o = self.host.suspend(req).await?;
        Ok(Response::new(pb::SuspendVmResponse {
            dump_bytes: o.dump_bytes,
            dump_checksum: o.dump_checksum.to_string(),
            duration_ms: o.duration_ms,
            saved_earlier: o.saved_earlier,
        }))
    }

    async fn forget_vm(
        &self,
        req: Request<pb::ForgetVmRequest>,
    ) -> Result<Response<pb::ForgetVmResponse>, Status> {
        let id = ids::parse("vm_id", &req.into_inner().vm_id)?;
        let forgotten = self.host.forget(id).await?;
        Ok(Response::new(pb::ForgetVmResponse { forgotten }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vref() -> Option<common::VolumeRef> {
        Some(common::VolumeRef {
            domain_id: uuid::Uuid::new_v4().to_string(),
            image_id: uuid::Uuid::new_v4().to_string(),
            volume_id: uuid::Uuid::new_v4().to_string(),
        })
    }

    fn field(st: &Status) -> String {
        use tonic_types::StatusExt;
        st.get_error_details()
            .bad_request()
            .and_then(|b| b.field_violations.first().map(|f| f.field.clone()))
            .unwrap_or_default()
    }

    fn spec() -> pb::VmSpec {
        pb::VmSpec {
            vm_id: uuid::Uuid::new_v4().to_string(),
            name: "vm".into(),
            memory_bytes: 256 << 20,
            vcpus: 1,
            disks: vec![pb::DiskSpec { volume: vref() }],
            kernel: "vmlinux".into(),
            initrd: "initramfs.img".into(),
            cmdline: "console=ttyS0".into(),
        }
    }

    #[test]
    fn bad_specs_name_their_field() {
        assert!(VmSpec::try_from(spec()).is_ok());
        let bad = |f: &dyn Fn(&mut pb::VmSpec)| {
            let mut s = spec();
            f(&mut s);
            let st = VmSpec::try_from(s).unwrap_err();
            assert_eq!(st.code(), tonic::Code::InvalidArgument);
            field(&st)
        };
        assert_eq!(bad(&|s| s.vm_id = "x".into()), "spec.vm_id");
        assert_eq!(bad(&|s| s.kernel = "../../etc/shadow".into()), "spec.kernel");
        assert_eq!(bad(&|s| s.initrd = "/boot/initrd".into()), "spec.initrd");
        assert_eq!(bad(&|s| s.disks[0].volume = None), "spec.disks[0].volume");
        assert_eq!(
            bad(&|s| s.disks[0].volume.as_mut().unwrap().image_id = "..".into()),
            "spec.disks[0].volume.image_id"
        );
        assert_eq!(bad(&|s| s.memory_bytes = 0), "spec.memory_bytes");
        assert_eq!(bad(&|s| s.vcpus = 100_000), "spec.vcpus");
        assert_eq!(bad(&|s| s.disks.clear()), "spec.disks");
        assert_eq!(bad(&|s| s.disks = vec![s.disks[0].clone(); 27]), "spec.disks");
        assert_eq!(bad(&|s| s.disks.push(s.disks[0].clone())), "spec.disks[1].volume");
        assert_eq!(
            bad(&|s| {
                let mut same_image = s.disks[0].volume.clone().unwrap();
                same_image.volume_id = uuid::Uuid::new_v4().to_string();
                s.disks.push(pb::DiskSpec { volume: vref() });
                s.disks.push(pb::DiskSpec {
                    volume: Some(same_image),
                });
            }),
            "spec.disks[2].volume"
        );
        assert_eq!(bad(&|s| s.vm_id = uuid::Uuid::nil().to_string()), "spec.vm_id");
        // Two volumes of one id in different images are two disks.
        let mut s = spec();
        let mut twin = s.disks[0].volume.clone().unwrap();
        twin.image_id = uuid::Uuid::new_v4().to_string();
        s.disks.push(pb::DiskSpec { volume: Some(twin) });
        assert!(VmSpec::try_from(s).is_ok());
    }

    #[test]
    fn verify_memory_requests_name_their_field() {
        let req = || pb::VerifyMemoryRequest {
            vm_id: uuid::Uuid::new_v4().to_string(),
            memory: Some(common::MemoryVolumeRef {
                dump: vref(),
                metadata: vref(),
            }),
            expected_checksum: String::new(),
            rebind_disk_domain_id: String::new(),
            rebind_disks: vec![],
            copied_checksum: String::new(),
            rebrand_vm_id: String::new(),
            adopt_ovirt: None,
            as_ovirt: false,
        };
        let r = VerifyMemoryRequest::try_from(req()).unwrap();
        assert_eq!(r.rebrand, None);
        assert_eq!(
            (r.expected_checksum, r.copied_checksum, r.rebind),
            (None, None, None)
        );
        let b3 = format!("blake3-4m:{}", "0b".repeat(32));
        let r = VerifyMemoryRequest::try_from(pb::VerifyMemoryRequest {
            copied_checksum: b3.clone(),
            ..req()
        })
        .unwrap();
        assert_eq!(r.copied_checksum, Some(b3.parse().unwrap()));
        let ok = |f: &dyn Fn(&mut pb::VerifyMemoryRequest)| {
            let mut q = req();
            f(&mut q);
            VerifyMemoryRequest::try_from(q).unwrap()
        };
        let domain = uuid::Uuid::new_v4();
        let r = ok(&|q| {
            q.expected_checksum = "0a".repeat(32);
            q.rebind_disk_domain_id = domain.to_string();
        });
        assert_eq!(r.expected_checksum, Some("0a".repeat(32).parse().unwrap()));
        assert_eq!(r.rebind, Some(Rebind::DiskDomain(domain)));
        let r = ok(&|q| q.rebind_disks = vec![vref().unwrap(), vref().unwrap()]);
        assert!(matches!(r.rebind, Some(Rebind::Disks(d)) if d.len() == 2));

        let bad = |f: &dyn Fn(&mut pb::VerifyMemoryRequest)| {
            let mut q = req();
            f(&mut q);
            let st = VerifyMemoryRequest::try_from(q).unwrap_err();
            assert_eq!(st.code(), tonic::Code::InvalidArgument);
            field(&st)
        };
        assert_eq!(bad(&|q| q.vm_id = "x".into()), "vm_id");
        assert_eq!(bad(&|q| q.rebrand_vm_id = "y".repeat(100_000)), "rebrand_vm_id");
        assert_eq!(bad(&|q| q.rebrand_vm_id = q.vm_id.clone()), "rebrand_vm_id");
        let to = uuid::Uuid::new_v4();
        assert_eq!(ok(&|q| q.rebrand_vm_id = to.to_string()).rebrand, Some(to));
        assert_eq!(bad(&|q| q.vm_id = q.vm_id.replace('-', "")), "vm_id");
        assert_eq!(bad(&|q| q.memory = None), "memory");
        assert_eq!(bad(&|q| q.memory.as_mut().unwrap().dump = None), "memory.dump");
        assert_eq!(
            bad(&|q| q
                .memory
                .as_mut()
                .unwrap()
                .dump
                .as_mut()
                .unwrap()
                .volume_id
                .clear()),
            "memory.dump.volume_id"
        );
        assert_eq!(
            bad(&|q| q.memory.as_mut().unwrap().metadata.as_mut().unwrap().domain_id = "../x".into()),
            "memory.metadata.domain_id"
        );
        assert_eq!(
            bad(&|q| q.expected_checksum = "AB".repeat(32)),
            "expected_checksum"
        );
        assert_eq!(
            bad(&|q| q.expected_checksum = "ab".repeat(31)),
            "expected_checksum"
        );
        assert_eq!(
            bad(&|q| q.expected_checksum = "g".repeat(64)),
            "expected_checksum"
        );
        assert_eq!(
            bad(&|q| q.copied_checksum = format!("blake3-4m:{}", "AB".repeat(32))),
            "copied_checksum"
        );
        assert_eq!(
            bad(&|q| q.copied_checksum = "x".repeat(100_000)),
            "copied_checksum"
        );
        assert_eq!(
            bad(&|q| q.rebind_disk_domain_id = "nope".into()),
            "rebind_disk_domain_id"
        );
        assert_eq!(
            bad(&|q| {
                q.rebind_disk_domain_id = uuid::Uuid::new_v4().to_string();
                q.rebind_disks = vec![vref().unwrap()];
            }),
            "rebind_disks"
        );
        assert_eq!(
            bad(&|q| {
                let mut d = vref().unwrap();
                d.image_id.clear();
                q.rebind_disks = vec![vref().unwrap(), d];
            }),
            "rebind_disks[1].image_id"
        );
    }

    #[test]
    fn snapshot_requests_parse_mode_and_level() {
        let req = || pb::SnapshotVmRequest {
            job_id: uuid::Uuid::new_v4().to_string(),
            vm_id: uuid::Uuid::new_v4().to_string(),
            snapshot_id: uuid::Uuid::new_v4().to_string(),
            disks: vec![pb::SnapshotDisk {
                current: vref(),
                overlay: vref(),
            }],
            memory: Some(common::MemoryVolumeRef {
                dump: vref(),
                metadata: vref(),
            }),
            mode: pb::SnapshotMode::Live as i32,
            compatibility_version: "3.2".into(),
        };
        let r = SnapshotRequest::try_from(req()).unwrap();
        assert_eq!(r.mode, SnapshotMode::Live);
        assert!(!r.level.has_memory_snapshots());
        let mut q = req();
        q.compatibility_version = "three".into();
        assert_eq!(
            field(&SnapshotRequest::try_from(q).unwrap_err()),
            "compatibility_version"
        );
        let mut q = req();
        q.mode = 9;
        assert_eq!(field(&SnapshotRequest::try_from(q).unwrap_err()), "mode");
        let mut q = req();
        q.memory.as_mut().unwrap().metadata = None;
        assert_eq!(
            field(&SnapshotRequest::try_from(q).unwrap_err()),
            "memory.metadata"
        );
        let mut q = req();
        q.mode = 0;
        q.compatibility_version.clear();
        let r = SnapshotRequest::try_from(q).unwrap();
        assert_eq!(r.mode, SnapshotMode::Paused);
        assert!(r.level.has_memory_snapshots());
    }
}
