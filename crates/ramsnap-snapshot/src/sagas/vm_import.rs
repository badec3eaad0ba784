//! Import a VM from an EXPORT domain (oVirt's ImportVm) into a cluster and
//! a data domain of either type.
//!
//! - Plain import: every volume is copied layer by layer with its ids
//!   (allocation converted: sparse on FILE, preallocated on BLOCK), every
//!   snapshot comes back with its memory, the ACTIVE one included. Each
//!   memory's dump is checksummed where it landed against the descriptor
//!   (HostService.VerifyMemory), and its metadata rebound to the data
//!   domain, so that RunVm's restore checks accept it.
//! - `collapse`: only the ACTIVE snapshot, each disk's chain collapsed into
//!   one volume with the leaf's ids, with the ACTIVE snapshot's memory
//!   (rebound to the collapsed volumes).
//! - `as_clone`: new ids for the VM, its disks, images and volumes; only the
//!   ACTIVE snapshot, collapsed, and no memory (oVirt 3.3: the clone boots),
//!   unless `with_memory` (a fork, ImportVm's keep_memory): then the ACTIVE
//!   snapshot's memory, with new ids, bound to the collapsed volumes and
//!   given to the clone (VerifyMemory's rebrand_vm_id), so that its first
//!   run resumes from it.
//!
//! The VM is reserved first (inserted ImageLocked and locked by this
//! operation), so a second import of it is refused before anything is
//! copied. A checksum mismatch fails the whole import, which unwinds:
//! nothing of it remains (import as a clone to get the disks without the
//! memory).
use super::common::{copy_own, delete_volumes_reversed, noop, ordered_disk_id, own_volumes, volume_exists};
use super::vm_export::{copy_memory_pair, PlannedCopy, PlannedMemory};
use crate::app::{db_status, App};
use crate::convert::{downstream, to_wire_memory, to_wire_ref};
use crate::db::{
    self, MemoryVolume, NewVm, Snapshot, SnapshotDisk, SnapshotStatus, SnapshotType, VmDisk, VolumeRef,
};
use crate::ovf::{OvfVm, SnapshotKind};
use crate::saga::{Node, Output, SagaCx, SagaDef};
use crate::service::limits;
use futures::future::BoxFuture;
use futures::FutureExt;
use ramsnap_common::status;
use ramsnap_proto::host::v1 as host_pb;
use ramsnap_proto::storage::v1 as storage;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use tonic::Status;
use tonic_types::StatusExt;
use uuid::Uuid;

pub const NAME: &str = "vm_import";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub export_domain_id: Uuid,
    /// The exported VM (its descriptor's id).
    pub source_vm_id: Uuid,
    /// The imported VM: the exported id, or a new one for a clone (chosen
    /// by the handler).
    pub vm_id: Uuid,
    pub name: String,
    pub cluster_id: Uuid,
    pub target_domain_id: Uuid,
    pub as_clone: bool,
    pub collapse: bool,
    /// False for a clone (unless a fork), or a cluster below 3.3: no memory
    /// is imported.
    pub with_memory: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Plan {
    /// The operation's result.
    pub vm_id: Uuid,
    pub new_vm: NewVmRecord,
    pub disks: Vec<DiskRecord>,
    pub copies: Vec<PlannedCopy>,
    /// With the descriptor's checksum of each (empty: from an oVirt
    /// export domain, adopted as `adoptions` says).
    pub memories: Vec<(PlannedMemory, String)>,
    pub snapshots: Vec<SnapshotRecord>,
    /// oVirt memory snapshots: what ramsnap's metadata of each records.
    #[serde(default)]
    pub adoptions: Vec<Adoption>,
}

/// An oVirt memory snapshot (no checksum in its OVF) and what its adopted
/// metadata records (HostService VerifyMemory's `adopt_ovirt`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Adoption {
    /// The target dump volume: which memory.
    pub dump: VolumeRef,
    pub snapshot_id: Uuid,
    /// Unix seconds.
    pub created_at: i64,
    /// Per disk in order: (the snapshot's volume, its child or itself), as
    /// the import names them on the data domain.
    pub disks: Vec<(VolumeRef, VolumeRef)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewVmRecord {
    pub name: String,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub stateless: bool,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskRecord {
    pub disk_id: Uuid,
    pub image_id: Uuid,
    pub capacity_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: Uuid,
    pub active: bool,
    pub description: String,
    pub created_at: i64,
    pub disks: Vec<SnapshotDisk>,
    pub memory: Option<MemoryVolume>,
}

pub fn definition() -> SagaDef<App> {
    SagaDef {
        name: NAME,
        nodes: vec![
            Node::new(PLAN, plan_fwd).undo(noop),
            Node::new(Output::new("reserve_vm"), reserve_fwd).undo(reserve_undo),
            Node::new(Output::new("copy_disks"), disks_fwd).undo(disks_undo),
            Node::new(Output::new("copy_memories"), memories_fwd).undo(memories_undo),
            // Undone by reserve_vm's undo, which deletes the VM's rows.
            Node::new(Output::new("record_vm"), record_fwd).undo(noop),
            Node::new(Output::new("unlock_vm"), unlock_fwd).local(),
        ],
        result_node: Some(PLAN.name),
    }
}

/// What the import copies and makes; the operation's result.
const PLAN: Output<Plan> = Output::new("plan");

async fn host(app: &App, cluster_id: Uuid) -> Result<db::Host, Status> {
    app.cluster_host(cluster_id).await
}

/// FAILED_PRECONDITION NOT_A_DATA_DOMAIN unless the domain holds VMs.
pub async fn require_data_domain(app: &App, h: &db::Host, domain_id: Uuid) -> Result<(), Status> {
    let d = app
        .storage_client(h)?
        .get_domain(storage::GetDomainRequest {
            domain_id: domain_id.to_string(),
        })
        .await
        .map_err(|s| downstream("reading the target domain", s))?
        .into_inner()
        .domain
        .ok_or_else(|| Status::internal("GetDomain answered without a domain"))?;
    if d.role == storage::DomainRole::Export as i32 {
        return Err(status::failed_precondition(
            "NOT_A_DATA_DOMAIN",
            &format!("domain/{domain_id}"),
            format!(
                "storage domain {} ({domain_id}) is an export domain; import into a data domain",
                d.name
            ),
        ));
    }
    Ok(())
}

/// Parses a descriptor as the export domain's format has it: ramsnap's
/// own OVF, or oVirt 3.3's (an adopted oVirt export domain), with what an
/// import of it would leave out.
pub fn parse_descriptor(
    xml: &str,
    domain: &storage::StorageDomain,
    domain_id: Uuid,
) -> Result<(OvfVm, Vec<String>), crate::ovf::OvfError> {
    if domain.format == storage::DomainFormat::Ovirt as i32 {
        let parsed = crate::ovf::ovirt::parse(xml, domain_id)?;
        parsed.vm.validate_foreign()?;
        Ok((parsed.vm, parsed.warnings))
    } else {
        OvfVm::parse(xml).map(|vm| (vm, Vec::new()))
    }
}

/// Reads, parses and checks the exported VM's descriptor against the
/// export domain: OVF_INVALID, OVF_FILE_MISSING (a volume it names is not
/// there, or not complete), NOT_FOUND when there is no such export.
///
/// From an oVirt export domain, also: each disk's capacity is the exact
/// one of its volumes (oVirt's OVF rounds to GiB), and, with
/// `inspect_memory`, each memory snapshot is read where it is
/// (HostService.InspectOvirtMemory): one that cannot be the VM's is left
/// out, with a warning, and one whose metadata is not what VDSM writes
/// refuses the import (OVIRT_MEMORY_REFUSED) before anything is copied.
/// Returns the descriptor with what the import leaves out, in words.
pub async fn read_export(
    app: &App,
    h: &db::Host,
    export_domain_id: Uuid,
    vm_id: Uuid,
    inspect_memory: bool,
) -> Result<(OvfVm, Vec<String>), Status> {
    let domain = super::vm_export::require_export_domain(app, h, export_domain_id).await?;
    let ovirt = domain.format == storage::DomainFormat::Ovirt as i32;
    let xml = super::vm_export::descriptor(app, h, export_domain_id, vm_id)
        .await?
        .ok_or_else(|| status::not_found("exported vm", &format!("{vm_id} on domain {export_domain_id}")))?;
    let ovf_path = format!("domain/{export_domain_id}/master/vms/{vm_id}/{vm_id}.ovf");
    let (mut ovf, mut warnings) = parse_descriptor(&xml, &domain, export_domain_id).map_err(|e| {
        status::failed_precondition(
            "OVF_INVALID",
            &ovf_path,
            format!("the descriptor of VM {vm_id} cannot be imported: {e}"),
        )
    })?;
    if ovf.vm_id != vm_id {
        return Err(status::failed_precondition(
            "OVF_INVALID",
            &ovf_path,
            format!("the descriptor stored for VM {vm_id} describes VM {}", ovf.vm_id),
        ));
    }
    let volumes = super::common::all_volumes(&mut app.storage_client(h)?, export_domain_id, None)
        .await
        .map_err(|s| downstream("listing the export domain's volumes", s))?;
    if ovirt {
        for d in &mut ovf.disks {
            let exact = volumes
                .iter()
                .filter(|v| {
                    v.r#ref.as_ref().is_some_and(|r| {
                        r.image_id == d.image_id.to_string()
                            && d.volumes.iter().any(|x| r.volume_id == x.volume_id.to_string())
                    })
                })
                .map(|v| v.capacity_bytes)
                .max();
            if let Some(c) = exact {
                d.capacity_bytes = c;
            }
        }
    }
    check_ovf_values(&ovf, export_domain_id, None)?;
    let present = super::common::volume_keys(
        volumes
            .iter()
            .filter(|v| v.legality == storage::VolumeLegality::Legal as i32),
    );
    let mut needed: Vec<(Uuid, Uuid)> = ovf
        .disks
        .iter()
        .flat_map(|d| d.volumes.iter().map(move |v| (d.image_id, v.volume_id)))
        .collect();
    for m in ovf.memories() {
        needed.push((m.dump_image_id, m.dump_volume_id));
        needed.push((m.metadata_image_id, m.metadata_volume_id));
    }
    let missing: Vec<String> = needed
        .iter()
        .filter(|x| !present.contains(x))
        .map(|(i, v)| format!("{i}/{v}"))
        .collect();
    if !missing.is_empty() {
        return Err(status::failed_precondition(
            "OVF_FILE_MISSING",
            &format!("domain/{export_domain_id}/images/{}", missing[0]),
            format!(
                "the export of VM {vm_id} names volumes that are missing or incomplete on the export domain: {}",
                missing.join(", ")
            ),
        ));
    }
    if ovirt && inspect_memory {
        let memories: Vec<crate::ovf::OvfMemory> = ovf.memories().into_iter().cloned().collect();
        for m in memories {
            let r = app
                .host_client(h)?
                .inspect_ovirt_memory(host_pb::InspectOvirtMemoryRequest {
                    vm_id: vm_id.to_string(),
                    memory: Some(to_wire_memory(&MemoryVolume {
                        dump: VolumeRef {
                            domain_id: export_domain_id,
                            image_id: m.dump_image_id,
                            volume_id: m.dump_volume_id,
                        },
                        metadata: VolumeRef {
                            domain_id: export_domain_id,
                            image_id: m.metadata_image_id,
                            volume_id: m.metadata_volume_id,
                        },
                    })),
                    disk_count: ovf.disks.len() as u32,
                })
                .await
                .map_err(|s| downstream("reading an oVirt memory snapshot", s))?
                .into_inner();
            if r.usable {
                continue;
            }
            for s in ovf.snapshots.iter_mut().filter(|s| s.memory.as_ref() == Some(&m)) {
                warnings.push(format!(
                    "snapshot {:?} ({}): its memory is left out, the snapshot is imported without it: {}",
                    s.description, s.snapshot_id, r.reason
                ));
                s.memory = None;
            }
        }
    }
    Ok((ovf, warnings))
}

/// The values the import takes from the descriptor (memory, vCPUs, disks,
/// kernel, initrd, command line, and `name` when given: the name the VM
/// gets, the exported one unless the request names another), checked as CreateVm checks them
/// ([`limits`]): a descriptor edited (or written by another tool) with a
/// value the host would refuse is FAILED_PRECONDITION OVF_INVALID, naming
/// the value, before anything is made.
pub fn check_ovf_values(ovf: &OvfVm, export_domain_id: Uuid, name: Option<&str>) -> Result<(), Status> {
    let values = limits::VmValues {
        name,
        memory_bytes: ovf.memory_bytes,
        vcpus: ovf.vcpus,
        kernel: &ovf.kernel,
        initrd: &ovf.initrd,
        cmdline: &ovf.cmdline,
        disk_capacities: ovf.disks.iter().map(|d| d.capacity_bytes).collect(),
    };
    limits::check_vm(&values).map_err(|s| {
        let (field, why) = s
            .get_error_details()
            .bad_request()
            .and_then(|b| b.field_violations.first().cloned())
            .map(|v| (v.field, v.description))
            .unwrap_or_else(|| (String::new(), s.message().to_string()));
        let vm_id = ovf.vm_id;
        status::failed_precondition(
            "OVF_INVALID",
            &format!("domain/{export_domain_id}/master/vms/{vm_id}/{vm_id}.ovf"),
            format!("the descriptor of VM {vm_id} cannot be imported: its {field} {why}"),
        )
    })
}

/// What the import makes of the descriptor.
pub fn make_plan(p: &Params, ovf: &OvfVm, stable: &dyn Fn(&str) -> Uuid) -> Plan {
    let collapse = p.collapse || p.as_clone || ovf.collapsed;
    let active = ovf.active();
    let src = |image_id: Uuid, volume_id: Uuid| VolumeRef {
        domain_id: p.export_domain_id,
        image_id,
        volume_id,
    };
    // (new disk id, new image id, new id of a volume).
    let disk_id = |i: usize, d: Uuid| {
        if p.as_clone {
            ordered_disk_id(i, stable(&format!("disk/{d}")))
        } else {
            d
        }
    };
    let image_id = |i: Uuid| {
        if p.as_clone {
            stable(&format!("image/{i}"))
        } else {
            i
        }
    };
    let volume_id = |v: Uuid| {
        if p.as_clone {
            stable(&format!("volume/{v}"))
        } else {
            v
        }
    };
    let tgt = |image: Uuid, volume: Uuid| VolumeRef {
        domain_id: p.target_domain_id,
        image_id: image_id(image),
        volume_id: volume_id(volume),
    };

    let mut disks = Vec::new();
    let mut copies = Vec::new();
    for (i, d) in ovf.disks.iter().enumerate() {
        disks.push(DiskRecord {
            disk_id: disk_id(i, d.disk_id),
            image_id: image_id(d.image_id),
            capacity_bytes: d.capacity_bytes,
        });
        if collapse {
            let leaf = active
                .disks
                .iter()
                .find(|(disk, _)| *disk == d.disk_id)
                .map(|(_, v)| *v)
                .expect("validated: the active snapshot names every disk");
            copies.push(PlannedCopy {
                source: src(d.image_id, leaf),
                target: tgt(d.image_id, leaf),
                keep_parent: false,
                capacity_bytes: d.capacity_bytes,
                purpose: None,
            });
        } else {
            for v in &d.volumes {
                copies.push(PlannedCopy {
                    source: src(d.image_id, v.volume_id),
                    target: tgt(d.image_id, v.volume_id),
                    keep_parent: true,
                    capacity_bytes: d.capacity_bytes,
                    purpose: None,
                });
            }
        }
    }
    let snaps: Vec<_> = ovf
        .snapshots
        .iter()
        .filter(|s| !collapse || s.kind == SnapshotKind::Active)
        .collect();
    let mut memories: Vec<(PlannedMemory, String)> = Vec::new();
    let mut adoptions = Vec::new();
    let mut snapshots = Vec::new();
    for s in snaps {
        let memory = match &s.memory {
            Some(m) if p.with_memory => {
                let target = MemoryVolume {
                    dump: tgt(m.dump_image_id, m.dump_volume_id),
                    metadata: tgt(m.metadata_image_id, m.metadata_volume_id),
                };
                let from_ovirt = m.checksum.is_empty();
                if from_ovirt && !adoptions.iter().any(|a: &Adoption| a.dump == target.dump) {
                    // oVirt's snapshot: its volume of each disk was frozen
                    // at the dump; the VM went on in that volume's child.
                    let disks = ovf
                        .disks
                        .iter()
                        .map(|d| {
                            let current = s
                                .disks
                                .iter()
                                .find(|(disk, _)| *disk == d.disk_id)
                                .map(|(_, v)| *v)
                                .expect("validated: snapshots name every disk");
                            let overlay = d
                                .volumes
                                .iter()
                                .find(|v| v.parent_id == Some(current))
                                .map_or(current, |v| v.volume_id);
                            (tgt(d.image_id, current), tgt(d.image_id, overlay))
                        })
                        .collect();
                    adoptions.push(Adoption {
                        dump: target.dump,
                        snapshot_id: s.snapshot_id,
                        created_at: s.created_at / 1000,
                        disks,
                    });
                }
                if !memories.iter().any(|(x, _)| x.target == target) {
                    memories.push((
                        PlannedMemory {
                            source: MemoryVolume {
                                dump: src(m.dump_image_id, m.dump_volume_id),
                                metadata: src(m.metadata_image_id, m.metadata_volume_id),
                            },
                            target,
                            capacity_bytes: 0,
                            // Collapsed here, or a clone's (new ids): bound
                            // to the copies. Otherwise the ids are kept and
                            // the domain moves.
                            rebind_disks: if (collapse && !ovf.collapsed) || p.as_clone {
                                copies.iter().map(|c| c.target).collect()
                            } else {
                                Vec::new()
                            },
                            from_ovirt,
                        },
                        m.checksum.clone(),
                    ));
                }
                Some(target)
            }
            _ => None,
        };
        let sdisks = s
            .disks
            .iter()
            .map(|(disk, volume)| {
                let (i, d) = ovf
                    .disks
                    .iter()
                    .enumerate()
                    .find(|(_, d)| d.disk_id == *disk)
                    .expect("validated: snapshots name the VM's disks");
                SnapshotDisk {
                    disk_id: disk_id(i, *disk),
                    volume: tgt(d.image_id, *volume),
                }
            })
            .collect();
        snapshots.push(SnapshotRecord {
            id: if p.as_clone {
                stable("active")
            } else {
                s.snapshot_id
            },
            active: s.kind == SnapshotKind::Active,
            description: s.description.clone(),
            created_at: s.created_at,
            disks: sdisks,
            memory,
        });
    }
    Plan {
        vm_id: p.vm_id,
        new_vm: NewVmRecord {
            name: p.name.clone(),
            memory_bytes: ovf.memory_bytes,
            vcpus: ovf.vcpus,
            stateless: ovf.stateless,
            kernel: ovf.kernel.clone(),
            initrd: ovf.initrd.clone(),
            cmdline: ovf.cmdline.clone(),
        },
        disks,
        copies,
        memories,
        snapshots,
        adoptions,
    }
}

fn plan_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Plan, Status>> {
    async move {
        let p: Params = cx.params()?;
        let h = host(&cx.app, p.cluster_id).await?;
        require_data_domain(&cx.app, &h, p.target_domain_id).await?;
        let (ovf, _) = read_export(&cx.app, &h, p.export_domain_id, p.source_vm_id, p.with_memory).await?;
        let mut plan = make_plan(&p, &ovf, &|purpose| cx.stable_id(purpose));
        refuse_existing_targets(&cx.app, &h, &plan).await?;
        // The dump sizes, for the progress.
        let mut client = cx.app.storage_client(&h)?;
        for (m, _) in &mut plan.memories {
            let v = client
                .get_volume(storage::GetVolumeRequest {
                    r#ref: Some(to_wire_ref(&m.source.dump)),
                })
                .await
                .map_err(|s| downstream("reading an exported memory dump", s))?
                .into_inner();
            m.capacity_bytes = v.volume.map(|v| v.capacity_bytes).unwrap_or(0);
        }
        Ok(plan)
    }
    .boxed()
}

fn reserve_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        let new_vm = NewVm {
            id: p.vm_id,
            name: plan.new_vm.name.clone(),
            cluster_id: p.cluster_id,
            memory_bytes: plan.new_vm.memory_bytes,
            vcpus: plan.new_vm.vcpus,
            stateless: plan.new_vm.stateless,
            disk_domain_id: p.target_domain_id,
            kernel: plan.new_vm.kernel.clone(),
            initrd: plan.new_vm.initrd.clone(),
            cmdline: plan.new_vm.cmdline.clone(),
        };
        let disks: Vec<VmDisk> = plan
            .disks
            .iter()
            .map(|d| VmDisk {
                vm_id: p.vm_id,
                disk_id: d.disk_id,
                domain_id: p.target_domain_id,
                image_id: d.image_id,
                capacity_bytes: d.capacity_bytes,
            })
            .collect();
        match cx
            .app
            .db
            .reserve_imported_vm(&new_vm, &disks, cx.operation_id)
            .await
        {
            Ok(()) => {}
            Err(db::DbError::Conflict { kind: "vm", .. }) => return Err(vm_exists(p.vm_id)),
            Err(db::DbError::Conflict { kind: "vm_name", .. }) => return Err(name_in_use(&new_vm.name)),
            Err(e) => return Err(db_status(e)),
        }
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}

pub fn vm_exists(vm_id: Uuid) -> Status {
    status::failed_precondition(
        "VM_ALREADY_EXISTS",
        &format!("vm/{vm_id}"),
        format!("VM {vm_id} exists; import it as a clone (new ids, no memory) or remove it first"),
    )
}

pub fn name_in_use(name: &str) -> Status {
    status::failed_precondition(
        "VM_NAME_IN_USE",
        &format!("vm/{name}"),
        format!("a VM named {name:?} exists; import under another name"),
    )
}

fn reserve_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        cx.db()
            .release_imported_vm(p.vm_id, cx.operation_id)
            .await
            .map_err(db_status)?;
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}

fn total_bytes(plan: &Plan) -> u64 {
    plan.copies.iter().map(|c| c.capacity_bytes).sum::<u64>()
        + plan.memories.iter().map(|(m, _)| m.capacity_bytes).sum::<u64>()
}

fn disks_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        let h = host(&cx.app, p.cluster_id).await?;
        let mut done = 0;
        let total = total_bytes(&plan);
        let description = format!("VM {} imported", plan.new_vm.name);
        for c in &plan.copies {
            copy_own(cx, &h, c, &mut done, total, &description, IMPORT_HINT).await?;
        }
        Ok(())
    }
    .boxed()
}

/// The undo of a copy step: deletes the volumes of `planned` (children
/// first) that this saga claimed, and nothing else.
async fn delete_own(
    cx: &SagaCx<App>,
    p: &Params,
    planned: &[VolumeRef],
    purpose: &str,
) -> Result<(), Status> {
    let targets = own_volumes(cx, planned).await?;
    if targets.is_empty() {
        return Ok(());
    }
    let h = host(&cx.app, p.cluster_id).await?;
    delete_volumes_reversed(cx, &h, &targets, purpose).await
}

fn disks_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let Some(plan) = cx.get_if_ran(PLAN) else {
            return Ok(());
        };
        let targets: Vec<VolumeRef> = plan.copies.iter().map(|c| c.target).collect();
        delete_own(cx, &p, &targets, "undo/import-copy").await
    }
    .boxed()
}

fn memories_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        let h = host(&cx.app, p.cluster_id).await?;
        let total = total_bytes(&plan);
        let mut done = plan.copies.iter().map(|c| c.capacity_bytes).sum();
        for (m, sha) in &plan.memories {
            let copied = copy_memory_pair(cx, &h, m, (&mut done, total), IMPORT_HINT).await?;
            // Checksummed where it landed against the descriptor, and rebound
            // to the data domain (or to the collapsed disks); a fork's is
            // given to the clone.
            let rebind_domain = m.rebind_disks.is_empty().then_some(p.target_domain_id);
            let adopt_ovirt =
                plan.adoptions
                    .iter()
                    .find(|a| a.dump == m.target.dump)
                    .map(|a| host_pb::OvirtAdoption {
                        snapshot_id: a.snapshot_id.to_string(),
                        created_at: a.created_at,
                        disks: a
                            .disks
                            .iter()
                            .map(|(current, overlay)| host_pb::DiskAtDump {
                                current: Some(to_wire_ref(current)),
                                overlay: Some(to_wire_ref(overlay)),
                            })
                            .collect(),
                    });
            cx.app
                .host_client(&h)?
                .verify_memory(host_pb::VerifyMemoryRequest {
                    vm_id: p.source_vm_id.to_string(),
                    memory: Some(to_wire_memory(&m.target)),
                    expected_checksum: sha.clone(),
                    rebind_disk_domain_id: rebind_domain.map(|d| d.to_string()).unwrap_or_default(),
                    rebind_disks: m.rebind_disks.iter().map(to_wire_ref).collect(),
                    copied_checksum: copied.unwrap_or_default(),
                    rebrand_vm_id: if p.as_clone {
                        p.vm_id.to_string()
                    } else {
                        String::new()
                    },
                    adopt_ovirt,
                    as_ovirt: false,
                })
                .await
                .map_err(|s| downstream("verifying a memory volume", s))?;
        }
        Ok(())
    }
    .boxed()
}

fn memories_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let Some(plan) = cx.get_if_ran(PLAN) else {
            return Ok(());
        };
        let targets: Vec<VolumeRef> = plan
            .memories
            .iter()
            .flat_map(|(m, _)| [m.target.dump, m.target.metadata])
            .collect();
        delete_own(cx, &p, &targets, "undo/import-memory").await
    }
    .boxed()
}

/// What to do about a target of the import that exists already.
const IMPORT_HINT: &str = "an import keeps the exported ids; import the VM as a clone (new ids) instead";

async fn target_exists(app: &App, t: &VolumeRef) -> Status {
    volume_exists(app, t, IMPORT_HINT).await
}

/// Every volume the plan creates, in the order it creates them (parents
/// first): the disk copies, then each memory's metadata and dump.
fn targets(plan: &Plan) -> Vec<VolumeRef> {
    plan.copies
        .iter()
        .map(|c| c.target)
        .chain(
            plan.memories
                .iter()
                .flat_map(|(m, _)| [m.target.metadata, m.target.dump]),
        )
        .collect()
}

/// Refuses an import that would create a volume that exists, in an image
/// that exists on the data domain, or in an image a VM of this coordinator
/// uses (on any domain): FAILED_PRECONDITION VOLUME_EXISTS. An import keeps
/// the exported ids, so a descriptor edited (or written elsewhere) can name
/// the volumes of a VM that exists; before anything is made, so that
/// nothing needs undoing. The copies check each target again (see
/// [`copy_own`]).
pub async fn refuse_existing_targets(app: &App, h: &db::Host, plan: &Plan) -> Result<(), Status> {
    let targets = targets(plan);
    let mut images: Vec<Uuid> = targets.iter().map(|t| t.image_id).collect();
    images.sort();
    images.dedup();
    for image in &images {
        if let Some(t) = targets.iter().find(|t| t.image_id == *image) {
            if app.db.vm_using_image(*image).await.map_err(db_status)?.is_some() {
                return Err(target_exists(app, t).await);
            }
        }
    }
    let Some(domain) = targets.first().map(|t| t.domain_id) else {
        return Ok(());
    };
    let present: HashSet<Uuid> = super::common::volume_keys(
        &super::common::all_volumes(&mut app.storage_client(h)?, domain, None)
            .await
            .map_err(|s| downstream("listing the target domain's volumes", s))?,
    )
    .into_iter()
    .map(|(image, _)| image)
    .collect();
    match targets.iter().find(|t| present.contains(&t.image_id)) {
        Some(t) => Err(target_exists(app, t).await),
        None => Ok(()),
    }
}

fn record_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        let snapshots: Vec<Snapshot> = plan
            .snapshots
            .iter()
            .map(|s| {
                let mut disks = s.disks.clone();
                disks.sort_by_key(|d| d.disk_id);
                Snapshot {
                    id: s.id,
                    vm_id: p.vm_id,
                    snapshot_type: if s.active {
                        SnapshotType::Active
                    } else {
                        SnapshotType::Regular
                    },
                    status: SnapshotStatus::Ok,
                    description: s.description.clone(),
                    created_at: s.created_at,
                    memory: s.memory,
                    disks,
                }
            })
            .collect();
        cx.db()
            .finish_imported_vm(p.vm_id, &snapshots)
            .await
            .map_err(db_status)?;
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}

fn unlock_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        match cx.app.db.unlock_vm(p.vm_id, cx.operation_id).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(db_status(e)),
        }
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}
