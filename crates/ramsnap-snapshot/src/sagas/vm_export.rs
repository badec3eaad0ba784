//! Export a down VM to an EXPORT domain (oVirt's ExportVm): every volume a
//! snapshot reaches is copied there layer by layer, ids kept, so the chains
//! are the same on the export domain; every memory pair is copied beside
//! them and its dump checksummed there (HostService.VerifyMemory), and the
//! OVF descriptor, written last, records each snapshot with its memory and
//! checksum. With `collapse`, only the ACTIVE snapshot goes: each disk's
//! chain collapsed into one volume with the leaf's ids, and the exported
//! memory metadata rebound to those volumes (they show exactly what the
//! memory saw: see "When the memory is dropped" in sagas.rs).
//!
//! The VM is locked and shown ImageLocked throughout. A failure removes
//! everything the export wrote; `force_override` deletes an earlier export
//! of the VM first, and that deletion is not undone.
use super::common::{
    copy_own, copy_own_checked, copy_volume, delete_image, delete_volumes_reversed, image_lock, image_unlock,
    image_volumes, lock_vm, noop, own_volumes, parents, require_down, unlock_vm, vm_and_host, volume_exists,
};
use crate::app::{db_status, App};
use crate::convert::{downstream, to_wire_memory, to_wire_ref};
use crate::db::{self, MemoryVolume, SnapshotType, VolumeRef};
use crate::ovf::{self, OvfDisk, OvfMemory, OvfSnapshot, OvfVm, OvfVolume, SnapshotKind};
use crate::saga::{Node, Output, SagaCx, SagaDef};
use futures::future::BoxFuture;
use futures::FutureExt;
use ramsnap_common::status;
use ramsnap_proto::host::v1 as host;
use ramsnap_proto::storage::v1 as storage;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use tonic::{Code, Status};
use tonic_types::StatusExt;
use uuid::Uuid;

pub const NAME: &str = "vm_export";

#[derive(Debug, Serialize, Deserialize)]
pub struct Params {
    pub vm_id: Uuid,
    pub export_domain_id: Uuid,
    pub collapse: bool,
    pub force_override: bool,
}

/// One volume copy, in the order they run (parents first).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedCopy {
    pub source: VolumeRef,
    pub target: VolumeRef,
    /// Layer by layer (the target's parent was copied before it); false:
    /// the source's chain collapsed into the target.
    pub keep_parent: bool,
    pub capacity_bytes: u64,
    /// The target's purpose, when not the source's: an oVirt 3.3 memory
    /// volume, recorded there as a disk (CopyVolumeRequest.target_purpose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<MemoryPart>,
}

/// Which volume of a memory pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryPart {
    Dump,
    Metadata,
}

impl MemoryPart {
    fn wire(part: Option<MemoryPart>) -> storage::VolumePurpose {
        match part {
            None => storage::VolumePurpose::Unspecified,
            Some(MemoryPart::Dump) => storage::VolumePurpose::MemoryDump,
            Some(MemoryPart::Metadata) => storage::VolumePurpose::MemoryMetadata,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedMemory {
    pub source: MemoryVolume,
    pub target: MemoryVolume,
    pub capacity_bytes: u64,
    /// Collapsed disks: what the target's metadata is rebound to (the
    /// collapsed volumes, in disk order); empty: left as it is.
    pub rebind_disks: Vec<VolumeRef>,
    /// From an oVirt export domain: the volumes are recorded there as
    /// disks, and the copies become memory volumes.
    #[serde(default)]
    pub from_ovirt: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Plan {
    /// The operation's result.
    vm_id: Uuid,
    /// The descriptor, but for the memory checksums (filled in once verified).
    ovf: OvfVm,
    copies: Vec<PlannedCopy>,
    memories: Vec<PlannedMemory>,
    /// An earlier export of the VM is on the domain (force_override).
    previous: bool,
    /// The export domain is oVirt's: the OVF and the memory metadata are
    /// written as oVirt 3.3 reads them.
    #[serde(default)]
    ovirt: bool,
}

pub fn definition() -> SagaDef<App> {
    SagaDef {
        name: NAME,
        nodes: vec![
            Node::new(Output::new("lock_vm"), lock_fwd)
                .undo(lock_undo)
                .local(),
            Node::new(PLAN, plan_fwd).undo(noop),
            // Deleting an earlier export (force_override) cannot be undone;
            // it comes first so that nothing after it needs it.
            Node::new(Output::new("clear_previous"), clear_fwd).undo(noop),
            Node::new(Output::new("copy_disks"), disks_fwd).undo(disks_undo),
            Node::new(COPY_MEMORIES, memories_fwd).undo(memories_undo),
            Node::new(Output::new("write_ovf"), ovf_fwd).undo(ovf_undo),
            Node::new(Output::new("unlock_vm"), unlock_fwd).local(),
        ],
        result_node: Some(PLAN.name),
    }
}

/// What the export copies; the operation's result.
const PLAN: Output<Plan> = Output::new("plan");
/// Each exported memory dump's volume and its checksum.
const COPY_MEMORIES: Output<Vec<(Uuid, String)>> = Output::new("copy_memories");

fn lock_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        lock_vm(cx, p.vm_id).await?;
        let db = cx.db();
        let vm = db.get_vm(p.vm_id).await.map_err(db_status)?;
        if vm.status != db::VmStatus::ImageLocked {
            require_down(&vm)?;
        }
        refuse_unexportable(&cx.app, &vm).await?;
        image_lock(cx, p.vm_id).await?;
        Ok(())
    }
    .boxed()
}

/// FAILED_PRECONDITION VM_IN_PREVIEW / VM_RUNNING_STATELESS: a VM in the
/// middle of a preview or a stateless run has no single state to export.
pub async fn refuse_unexportable(app: &App, vm: &db::Vm) -> Result<(), Status> {
    for (t, kind, why) in [
        (
            SnapshotType::Preview,
            "VM_IN_PREVIEW",
            "previews a snapshot; commit or undo the preview first",
        ),
        (
            SnapshotType::Stateless,
            "VM_RUNNING_STATELESS",
            "has a stateless run that was not ended; stop it first",
        ),
    ] {
        if app
            .db
            .snapshot_by_vm_type(vm.id, t)
            .await
            .map_err(db_status)?
            .is_some()
        {
            return Err(status::failed_precondition(
                kind,
                &format!("vm/{}", vm.id),
                format!("VM {} {why}", vm.name),
            ));
        }
    }
    Ok(())
}

fn lock_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        image_unlock(cx, p.vm_id).await?;
        unlock_vm(cx, p.vm_id).await
    }
    .boxed()
}

fn unlock_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        image_unlock(cx, p.vm_id).await?;
        unlock_vm(cx, p.vm_id).await?;
        Ok(())
    }
    .boxed()
}

/// FAILED_PRECONDITION NOT_AN_EXPORT_DOMAIN unless the domain is one.
pub async fn require_export_domain(
    app: &App,
    h: &db::Host,
    domain_id: Uuid,
) -> Result<storage::StorageDomain, Status> {
    let d = app
        .storage_client(h)?
        .get_domain(storage::GetDomainRequest {
            domain_id: domain_id.to_string(),
        })
        .await
        .map_err(|s| downstream("reading the export domain", s))?
        .into_inner()
        .domain
        .ok_or_else(|| Status::internal("GetDomain answered without a domain"))?;
    if d.role != storage::DomainRole::Export as i32 {
        return Err(status::failed_precondition(
            "NOT_AN_EXPORT_DOMAIN",
            &format!("domain/{domain_id}"),
            format!("storage domain {} ({domain_id}) is not an export domain", d.name),
        ));
    }
    Ok(d)
}

/// [`require_export_domain`], for an export to it: a domain ramsnap only
/// reads (an oVirt export domain attached to an oVirt data center) is
/// FAILED_PRECONDITION DOMAIN_READ_ONLY.
pub async fn require_writable_export_domain(
    app: &App,
    h: &db::Host,
    domain_id: Uuid,
) -> Result<storage::StorageDomain, Status> {
    let d = require_export_domain(app, h, domain_id).await?;
    if d.read_only {
        return Err(status::failed_precondition(
            "DOMAIN_READ_ONLY",
            &format!("domain/{domain_id}"),
            format!(
                "storage domain {} ({domain_id}) is an oVirt export domain attached to an oVirt data center: \
                 ramsnap only imports from it (detach it in oVirt to export to it)",
                d.name
            ),
        ));
    }
    Ok(d)
}

/// The descriptor of `vm_id` on the export domain, if there is one.
pub async fn descriptor(
    app: &App,
    h: &db::Host,
    domain_id: Uuid,
    vm_id: Uuid,
) -> Result<Option<String>, Status> {
    match app
        .storage_client(h)?
        .get_vm_descriptor(storage::GetVmDescriptorRequest {
            domain_id: domain_id.to_string(),
            vm_id: vm_id.to_string(),
        })
        .await
    {
        Ok(r) => Ok(r.into_inner().descriptor.map(|d| d.ovf)),
        // NOT_FOUND of the descriptor itself, not of the domain.
        Err(s)
            if s.code() == Code::NotFound
                && s.get_error_details()
                    .resource_info()
                    .is_some_and(|r| r.resource_type == "vm_descriptor") =>
        {
            Ok(None)
        }
        Err(s) => Err(downstream("reading the VM's descriptor", s)),
    }
}

fn plan_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Plan, Status>> {
    async move {
        let p: Params = cx.params()?;
        let (vm, h) = vm_and_host(cx, p.vm_id).await?;
        let domain = require_writable_export_domain(&cx.app, &h, p.export_domain_id).await?;
        let ovirt = domain.format == storage::DomainFormat::Ovirt as i32;
        let previous = descriptor(&cx.app, &h, p.export_domain_id, p.vm_id)
            .await?
            .is_some();
        if previous && !p.force_override {
            return Err(status::failed_precondition(
                "VM_ALREADY_EXPORTED",
                &format!("vm/{}", vm.id),
                format!(
                    "VM {} is already on export domain {}; export with force_override to replace it",
                    vm.name, p.export_domain_id
                ),
            ));
        }
        let mut plan = make_plan(cx, &p, &vm, &h, previous).await?;
        plan.ovirt = ovirt;
        if ovirt {
            crate::ovf::ovirt::expressible(&plan.ovf).map_err(|e| {
                status::failed_precondition(
                    "OVIRT_CANNOT_EXPRESS",
                    &format!("vm/{}", vm.id),
                    format!("VM {} cannot be exported in oVirt's format: {e}", vm.name),
                )
            })?;
        }
        if !p.force_override {
            refuse_existing_targets(&cx.app, &h, &plan).await?;
        }
        Ok(plan)
    }
    .boxed()
}

async fn make_plan(
    cx: &SagaCx<App>,
    p: &Params,
    vm: &db::Vm,
    h: &db::Host,
    previous: bool,
) -> Result<Plan, Status> {
    let db = cx.db();
    let cluster = db.cluster_cached(vm.cluster_id).await.map_err(db_status)?;
    let disks = db.vm_disks(vm.id).await.map_err(db_status)?;
    let mut snaps: Vec<db::Snapshot> = db
        .list_snapshots(vm.id)
        .await
        .map_err(db_status)?
        .into_iter()
        .filter(|s| matches!(s.snapshot_type, SnapshotType::Active | SnapshotType::Regular))
        .collect();
    snaps.sort_by_key(|s| (s.snapshot_type != SnapshotType::Active, s.created_at));
    if p.collapse {
        snaps.truncate(1);
    }
    let active = snaps
        .first()
        .filter(|s| s.snapshot_type == SnapshotType::Active)
        .ok_or_else(|| Status::internal(format!("VM {} has no active snapshot", vm.id)))?
        .clone();
    let target = |r: &VolumeRef| VolumeRef {
        domain_id: p.export_domain_id,
        ..*r
    };

    let mut ovf_disks = Vec::new();
    let mut copies = Vec::new();
    for disk in &disks {
        let volumes = image_volumes(&cx.app, h, disk.domain_id, disk.image_id).await?;
        let formats: HashMap<Uuid, (ovf::VolumeFormat, u64)> = volumes
            .iter()
            .filter_map(|v| {
                let id = Uuid::parse_str(&v.r#ref.as_ref()?.volume_id).ok()?;
                let f = if v.format == storage::VolumeFormat::Raw as i32 {
                    ovf::VolumeFormat::Raw
                } else {
                    ovf::VolumeFormat::Cow
                };
                Some((id, (f, v.allocated_bytes)))
            })
            .collect();
        let parents = parents(&volumes);
        let of = |s: &db::Snapshot| {
            s.disks
                .iter()
                .find(|d| d.disk_id == disk.disk_id)
                .map(|d| d.volume)
                .ok_or_else(|| Status::internal(format!("snapshot {} has no disk {}", s.id, disk.disk_id)))
        };
        // Base first: every volume a snapshot reaches, ordered by depth.
        let mut chain: Vec<Uuid> = Vec::new();
        if p.collapse {
            chain.push(of(&active)?.volume_id);
        } else {
            let mut reached = HashSet::new();
            for s in &snaps {
                let mut cur = Some(of(s)?.volume_id);
                while let Some(v) = cur {
                    if !reached.insert(v) {
                        break;
                    }
                    cur = parents.get(&v).copied().flatten();
                }
            }
            let depth = |mut v: Uuid| {
                let mut n = 0;
                while let Some(Some(parent)) = parents.get(&v) {
                    v = *parent;
                    n += 1;
                }
                n
            };
            chain = reached.into_iter().collect();
            chain.sort_by_key(|v| (depth(*v), *v));
        }
        let mut ovf_volumes = Vec::new();
        for v in &chain {
            let (format, actual) = formats.get(v).copied().ok_or_else(|| {
                Status::internal(format!(
                    "volume {v} of disk {} is not on its domain",
                    disk.disk_id
                ))
            })?;
            let source = VolumeRef {
                domain_id: disk.domain_id,
                image_id: disk.image_id,
                volume_id: *v,
            };
            let parent_id = if p.collapse {
                None
            } else {
                parents.get(v).copied().flatten()
            };
            copies.push(PlannedCopy {
                source,
                target: target(&source),
                keep_parent: !p.collapse,
                capacity_bytes: disk.capacity_bytes,
                purpose: None,
            });
            ovf_volumes.push(OvfVolume {
                volume_id: *v,
                parent_id,
                format: if p.collapse {
                    ovf::VolumeFormat::Cow
                } else {
                    format
                },
                actual_bytes: actual,
            });
        }
        ovf_disks.push(OvfDisk {
            disk_id: disk.disk_id,
            image_id: disk.image_id,
            capacity_bytes: disk.capacity_bytes,
            volumes: ovf_volumes,
        });
    }

    let mut memories: Vec<PlannedMemory> = Vec::new();
    for m in snaps.iter().filter_map(|s| s.memory) {
        if memories
            .iter()
            .any(|x| x.source.dump.volume_id == m.dump.volume_id)
        {
            continue;
        }
        let dump = cx
            .app
            .storage_client(h)?
            .get_volume(storage::GetVolumeRequest {
                r#ref: Some(to_wire_ref(&m.dump)),
            })
            .await
            .map_err(|s| downstream("reading a memory dump volume", s))?
            .into_inner()
            .volume
            .ok_or_else(|| Status::internal("GetVolume answered without a volume"))?;
        let rebind_disks = if p.collapse {
            copies.iter().map(|c| c.target).collect()
        } else {
            Vec::new()
        };
        memories.push(PlannedMemory {
            source: m,
            target: MemoryVolume {
                dump: target(&m.dump),
                metadata: target(&m.metadata),
            },
            capacity_bytes: dump.capacity_bytes,
            rebind_disks,
            from_ovirt: false,
        });
    }

    let ovf_snapshots = snaps
        .iter()
        .map(|s| OvfSnapshot {
            snapshot_id: s.id,
            kind: if s.snapshot_type == SnapshotType::Active {
                SnapshotKind::Active
            } else {
                SnapshotKind::Regular
            },
            description: s.description.clone(),
            created_at: s.created_at,
            disks: s.disks.iter().map(|d| (d.disk_id, d.volume.volume_id)).collect(),
            memory: s.memory.map(|m| OvfMemory {
                dump_image_id: m.dump.image_id,
                dump_volume_id: m.dump.volume_id,
                metadata_image_id: m.metadata.image_id,
                metadata_volume_id: m.metadata.volume_id,
                checksum: String::new(),
            }),
        })
        .collect();
    let ovf = OvfVm {
        vm_id: vm.id,
        name: vm.name.clone(),
        memory_bytes: vm.memory_bytes,
        vcpus: vm.vcpus,
        stateless: vm.stateless,
        kernel: vm.kernel.clone(),
        initrd: vm.initrd.clone(),
        cmdline: vm.cmdline.clone(),
        compatibility_version: cluster.compatibility_version.to_string(),
        exported_at: 0,
        collapsed: p.collapse,
        export_domain_id: p.export_domain_id,
        disks: ovf_disks,
        snapshots: ovf_snapshots,
    };
    Ok(Plan {
        vm_id: vm.id,
        ovf,
        copies,
        memories,
        previous,
        ovirt: false,
    })
}

/// What to do about a target of the export that exists already.
const EXPORT_HINT: &str = "the export domain has a volume under this VM's ids but no export of it names \
                           the volume; export with force_override to replace what is there";

/// Every volume the plan creates, parents first: the disk copies, then each
/// memory's metadata and dump.
fn targets(plan: &Plan) -> Vec<VolumeRef> {
    plan.copies
        .iter()
        .map(|c| c.target)
        .chain(
            plan.memories
                .iter()
                .flat_map(|m| [m.target.metadata, m.target.dump]),
        )
        .collect()
}

/// Refuses an export (without force_override) that would create a volume
/// that is on the export domain already: FAILED_PRECONDITION VOLUME_EXISTS.
/// Without a descriptor naming them, such volumes are not this VM's export
/// (a foreign or broken one), and the export must neither overwrite them
/// nor, when it unwinds, delete them. The copies check each target again
/// (see [`copy_own`]).
async fn refuse_existing_targets(app: &App, h: &db::Host, plan: &Plan) -> Result<(), Status> {
    let targets = targets(plan);
    let Some(domain) = targets.first().map(|t| t.domain_id) else {
        return Ok(());
    };
    let present = super::common::volume_keys(
        &super::common::all_volumes(&mut app.storage_client(h)?, domain, None)
            .await
            .map_err(|s| downstream("listing the export domain's volumes", s))?,
    );
    match targets
        .iter()
        .find(|t| present.contains(&(t.image_id, t.volume_id)))
    {
        Some(t) => Err(volume_exists(app, t, EXPORT_HINT).await),
        None => Ok(()),
    }
}

/// Every image an export of this plan (or an earlier one) has on the
/// export domain.
fn images_of(ovf: &OvfVm) -> Vec<Uuid> {
    let mut images: Vec<Uuid> = ovf.disks.iter().map(|d| d.image_id).collect();
    for m in ovf.memories() {
        images.push(m.dump_image_id);
        images.push(m.metadata_image_id);
    }
    images
}

fn clear_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        // force_override also clears what an export of this VM left without
        // a descriptor (volumes under its ids).
        if !plan.previous && !p.force_override {
            return Ok(());
        }
        let (_, h) = vm_and_host(cx, p.vm_id).await?;
        let mut images = images_of(&plan.ovf);
        if let Some(xml) = descriptor(&cx.app, &h, p.export_domain_id, p.vm_id).await? {
            let old = match plan.ovirt {
                true => crate::ovf::ovirt::parse(&xml, p.export_domain_id).map(|p| p.vm),
                false => OvfVm::parse(&xml),
            };
            match old {
                Ok(old) => images.extend(images_of(&old)),
                Err(e) => tracing::warn!(vm = %p.vm_id, error = %e, "the export being replaced has an unreadable descriptor; removing the images of this export only"),
            }
        }
        images.sort();
        images.dedup();
        for image in images {
            delete_image(cx, &h, p.export_domain_id, image).await?;
        }
        delete_descriptor(&cx.app, &h, p.export_domain_id, p.vm_id).await?;
        Ok(())
    }
    .boxed()
}

pub async fn delete_descriptor(app: &App, h: &db::Host, domain_id: Uuid, vm_id: Uuid) -> Result<(), Status> {
    let req = storage::DeleteVmDescriptorRequest {
        domain_id: domain_id.to_string(),
        vm_id: vm_id.to_string(),
    };
    app.on_domain_writer(&req.domain_id, h, |mut c| {
        let req = req.clone();
        async move { c.delete_vm_descriptor(req).await }
    })
    .await
    .map_err(|s| downstream("deleting a VM descriptor", s))?;
    Ok(())
}

/// Bytes the progress counts: every copy's virtual size.
fn total_bytes(copies: &[PlannedCopy], memories: &[PlannedMemory]) -> u64 {
    copies.iter().map(|c| c.capacity_bytes).sum::<u64>()
        + memories.iter().map(|m| m.capacity_bytes).sum::<u64>()
}

/// Runs the planned copies in order (shared with the import). With
/// `checksum`, each copy also computes the `blake3-4m` checksum of what it
/// wrote; returns those it did (`None` for a copy that had ended before).
pub async fn run_copies(
    cx: &SagaCx<App>,
    h: &db::Host,
    copies: &[PlannedCopy],
    done: &mut u64,
    total: u64,
    description: &str,
    checksum: bool,
) -> Result<Vec<Option<String>>, Status> {
    let mut sums = Vec::new();
    for c in copies {
        let req = storage::CopyVolumeRequest {
            request_id: cx
                .stable_id(&format!("copy/{}/{}", c.target.domain_id, c.target.volume_id))
                .to_string(),
            source: Some(to_wire_ref(&c.source)),
            target_domain_id: c.target.domain_id.to_string(),
            target_image_id: c.target.image_id.to_string(),
            target_volume_id: c.target.volume_id.to_string(),
            target_format: storage::VolumeFormat::Unspecified as i32,
            target_allocation: storage::VolumeAllocation::Unspecified as i32,
            description: description.to_string(),
            keep_parent: c.keep_parent,
            target_purpose: MemoryPart::wire(c.purpose) as i32,
            checksum_algorithm: if checksum {
                "blake3-4m".into()
            } else {
                String::new()
            },
        };
        let copied = copy_volume(cx, h, req, *done, total).await?;
        sums.push(copied.checksum);
        *done += c.capacity_bytes;
        cx.progress(*done, total).await;
    }
    Ok(sums)
}

/// Copies a memory pair, metadata then dump (shared with the import); the
/// dump's checksum as the copy computed it, when this call ran the copy.
pub async fn copy_memory_pair(
    cx: &SagaCx<App>,
    h: &db::Host,
    m: &PlannedMemory,
    (done, total): (&mut u64, u64),
    hint: &str,
) -> Result<Option<String>, Status> {
    let copy = |source, target, capacity_bytes, part| PlannedCopy {
        source,
        target,
        keep_parent: false,
        capacity_bytes,
        purpose: m.from_ovirt.then_some(part),
    };
    let metadata = copy(m.source.metadata, m.target.metadata, 0, MemoryPart::Metadata);
    copy_own_checked(
        cx,
        h,
        &metadata,
        (&mut *done, total),
        "memory of a snapshot",
        hint,
        false,
    )
    .await?;
    let dump = copy(m.source.dump, m.target.dump, m.capacity_bytes, MemoryPart::Dump);
    copy_own_checked(cx, h, &dump, (done, total), "memory of a snapshot", hint, true).await
}

/// Copies memory pairs, then checksums (and rebinds) each where it landed.
/// Returns (dump volume id, checksum) of each.
pub async fn run_memory_copies(
    cx: &SagaCx<App>,
    h: &db::Host,
    vm_id: Uuid,
    memories: &[(PlannedMemory, Option<String>, Option<Uuid>)],
    (done, total): (&mut u64, u64),
    as_ovirt: bool,
) -> Result<Vec<(Uuid, String)>, Status> {
    let mut out = Vec::new();
    for (m, expected, rebind_domain) in memories {
        let copied = copy_memory_pair(cx, h, m, (done, total), EXPORT_HINT).await?;
        let r = cx
            .app
            .host_client(h)?
            .verify_memory(host::VerifyMemoryRequest {
                vm_id: vm_id.to_string(),
                memory: Some(to_wire_memory(&m.target)),
                expected_checksum: expected.clone().unwrap_or_default(),
                rebind_disk_domain_id: rebind_domain.map(|d| d.to_string()).unwrap_or_default(),
                rebind_disks: m.rebind_disks.iter().map(to_wire_ref).collect(),
                copied_checksum: copied.unwrap_or_default(),
                rebrand_vm_id: String::new(),
                adopt_ovirt: None,
                as_ovirt,
            })
            .await
            .map_err(|s| downstream("verifying a memory volume", s))?
            .into_inner();
        out.push((m.source.dump.volume_id, r.checksum));
    }
    Ok(out)
}

fn disks_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        let (vm, h) = vm_and_host(cx, p.vm_id).await?;
        let total = total_bytes(&plan.copies, &plan.memories);
        let mut done = 0;
        let description = format!("export of VM {}", vm.name);
        for c in &plan.copies {
            copy_own(cx, &h, c, &mut done, total, &description, EXPORT_HINT).await?;
        }
        Ok(())
    }
    .boxed()
}

fn disks_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let Some(plan) = cx.get_if_ran(PLAN) else {
            return Ok(());
        };
        let planned: Vec<VolumeRef> = plan.copies.iter().map(|c| c.target).collect();
        let targets = own_volumes(cx, &planned).await?;
        if targets.is_empty() {
            return Ok(());
        }
        let (_, h) = vm_and_host(cx, p.vm_id).await?;
        delete_volumes_reversed(cx, &h, &targets, "undo/export-copy").await
    }
    .boxed()
}

fn memories_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Vec<(Uuid, String)>, Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        let (_, h) = vm_and_host(cx, p.vm_id).await?;
        let total = total_bytes(&plan.copies, &plan.memories);
        let mut done = plan.copies.iter().map(|c| c.capacity_bytes).sum();
        let work: Vec<_> = plan.memories.iter().map(|m| (m.clone(), None, None)).collect();
        run_memory_copies(cx, &h, p.vm_id, &work, (&mut done, total), plan.ovirt).await
    }
    .boxed()
}

fn memories_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let Some(plan) = cx.get_if_ran(PLAN) else {
            return Ok(());
        };
        let planned: Vec<VolumeRef> = plan
            .memories
            .iter()
            .flat_map(|m| [m.target.dump, m.target.metadata])
            .collect();
        let targets = own_volumes(cx, &planned).await?;
        if targets.is_empty() {
            return Ok(());
        }
        let (_, h) = vm_and_host(cx, p.vm_id).await?;
        delete_volumes_reversed(cx, &h, &targets, "undo/export-memory").await
    }
    .boxed()
}

fn ovf_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let mut plan = cx.get(PLAN)?;
        let sums = cx.get(COPY_MEMORIES)?;
        let sums: HashMap<Uuid, String> = sums.into_iter().collect();
        for m in plan.ovf.snapshots.iter_mut().filter_map(|s| s.memory.as_mut()) {
            m.checksum = sums
                .get(&m.dump_volume_id)
                .cloned()
                .ok_or_else(|| Status::internal(format!("memory {} was not verified", m.dump_volume_id)))?;
        }
        plan.ovf.exported_at = crate::db::now_ms();
        plan.ovf
            .validate()
            .map_err(|e| Status::internal(format!("the descriptor this export wrote is invalid: {e}")))?;
        let (_, h) = vm_and_host(cx, p.vm_id).await?;
        let ovf = match plan.ovirt {
            true => crate::ovf::ovirt::write(&plan.ovf)
                .map_err(|e| Status::internal(format!("the oVirt descriptor cannot be written: {e}")))?,
            false => plan.ovf.to_xml(),
        };
        let req = storage::PutVmDescriptorRequest {
            domain_id: p.export_domain_id.to_string(),
            vm_id: p.vm_id.to_string(),
            ovf,
        };
        cx.app
            .on_domain_writer(&req.domain_id, &h, |mut c| {
                let req = req.clone();
                async move { c.put_vm_descriptor(req).await }
            })
            .await
            .map_err(|s| downstream("writing the VM's descriptor", s))?;
        Ok(())
    }
    .boxed()
}

fn ovf_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let (_, h) = vm_and_host(cx, p.vm_id).await?;
        delete_descriptor(&cx.app, &h, p.export_domain_id, p.vm_id).await
    }
    .boxed()
}
