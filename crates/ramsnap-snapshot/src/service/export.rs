//! VmService's export and import handlers (oVirt's ExportVm, ImportVm and
//! the export domain's VM list).
use super::snapshot::refuse_in_preview;
use super::{
    check_name, get_vm, refuse_locked, require_down, retried_operation, start_operation, to_operation,
    RequestKey, Start,
};
use crate::app::{db_status, App};
use crate::convert::downstream;
use crate::db;
use crate::ovf::{OvfVm, SnapshotKind};
use crate::sagas::{vm_export, vm_import};
use ramsnap_common::{ids, status};
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::storage::v1 as storage;
use std::sync::Arc;
use tonic::{Response, Status};
use uuid::Uuid;

/// The warning of an import as a clone when the exported VM's active
/// snapshot has memory (oVirt's Import VM popup).
pub const CLONE_MEMORY_WARNING: &str =
    "the active snapshot's memory is not imported with 'import as clone': the imported VM boots";

/// Any host, for reaching an export domain that belongs to no cluster.
async fn any_host(app: &App) -> Result<db::Host, Status> {
    app.db
        .list_hosts(None)
        .await
        .map_err(db_status)?
        .into_iter()
        .next()
        .ok_or_else(|| {
            status::failed_precondition(
                "NO_HOST",
                "hosts",
                "no host is registered to reach storage through; add one with ClusterService.AddHost",
            )
        })
}

pub async fn export_vm(
    app: &Arc<App>,
    req: pb::ExportVmRequest,
) -> Result<Response<pb::ExportVmResponse>, Status> {
    const KIND: &str = "export_vm";
    let reply = |op: &db::Operation| {
        Response::new(pb::ExportVmResponse {
            operation: Some(to_operation(op)),
        })
    };
    let key = RequestKey::of(&req)?;
    if let Some(op) = retried_operation(app, KIND, &key).await? {
        return Ok(reply(&op));
    }
    let vm = get_vm(app, "vm_id", &req.vm_id).await?;
    let export_domain_id = ids::parse("export_domain_id", &req.export_domain_id)?;
    refuse_locked(&vm)?;
    require_down(&vm, "exporting it")?;
    refuse_in_preview(app, &vm, "exporting it").await?;
    vm_export::refuse_unexportable(app, &vm).await?;
    let h = app.host_for_vm(&vm).await?;
    super::vm::check_domains(app, &h, [export_domain_id]).await?;
    vm_export::require_writable_export_domain(app, &h, export_domain_id).await?;
    if !req.force_override
        && vm_export::descriptor(app, &h, export_domain_id, vm.id)
            .await?
            .is_some()
    {
        return Err(status::failed_precondition(
            "VM_ALREADY_EXPORTED",
            &format!("vm/{}", vm.id),
            format!(
                "VM {} is already on export domain {export_domain_id}; export with force_override to replace it",
                vm.name
            ),
        ));
    }
    let params = vm_export::Params {
        vm_id: vm.id,
        export_domain_id,
        collapse: req.collapse_snapshots,
        force_override: req.force_override,
    };
    let op = start_operation(app, Start::locked(KIND, vm.id, key, vm_export::NAME, &params)).await?;
    Ok(reply(&op))
}

fn to_exported(ovf: &OvfVm) -> pb::ExportedVm {
    pb::ExportedVm {
        vm_id: ovf.vm_id.to_string(),
        name: ovf.name.clone(),
        memory_bytes: ovf.memory_bytes,
        vcpus: ovf.vcpus,
        stateless: ovf.stateless,
        disk_count: ovf.disks.len() as u32,
        collapsed: ovf.collapsed,
        exported_at: ovf.exported_at,
        compatibility_version: ovf.compatibility_version.clone(),
        snapshots: ovf
            .snapshots
            .iter()
            .map(|s| pb::ExportedSnapshot {
                snapshot_id: s.snapshot_id.to_string(),
                r#type: match s.kind {
                    SnapshotKind::Active => pb::SnapshotType::Active,
                    SnapshotKind::Regular => pb::SnapshotType::Regular,
                } as i32,
                description: s.description.clone(),
                created_at: s.created_at,
                has_memory: s.memory.is_some(),
            })
            .collect(),
        warnings: Vec::new(),
    }
}

pub async fn list_exported_vms(
    app: &Arc<App>,
    req: pb::ListExportedVmsRequest,
) -> Result<Response<pb::ListExportedVmsResponse>, Status> {
    let domain_id = ids::parse("export_domain_id", &req.export_domain_id)?;
    let h = any_host(app).await?;
    super::vm::check_domains(app, &h, [domain_id]).await?;
    let domain = vm_export::require_export_domain(app, &h, domain_id).await?;
    // A page of the domain's descriptors is a page of its VMs (both in
    // the order of the VM ids, with the domain as the only filter): the
    // paging is the storage service's, passed through.
    let page = app
        .storage_client(&h)?
        .list_vm_descriptors(storage::ListVmDescriptorsRequest {
            domain_id: domain_id.to_string(),
            page_size: req.page_size,
            page_token: req.page_token,
        })
        .await
        .map_err(|s| match s.code() {
            // The request's own paging fields, refused as they are.
            tonic::Code::InvalidArgument => s,
            _ => downstream("listing the export domain's VMs", s),
        })?
        .into_inner();
    let (descriptors, next_page_token) = (page.descriptors, page.next_page_token);
    let mut vms = Vec::new();
    let mut unreadable = Vec::new();
    for d in descriptors {
        match vm_import::parse_descriptor(&d.ovf, &domain, domain_id) {
            Ok((ovf, _)) if ovf.vm_id.to_string() != d.vm_id => unreadable.push(format!(
                "{}: the descriptor stored for this VM describes VM {}",
                d.vm_id, ovf.vm_id
            )),
            Ok((ovf, warnings)) => vms.push(pb::ExportedVm {
                warnings,
                ..to_exported(&ovf)
            }),
            Err(e) => unreadable.push(format!("{}: {e}", d.vm_id)),
        }
    }
    Ok(Response::new(pb::ListExportedVmsResponse {
        vms,
        unreadable,
        next_page_token,
    }))
}

pub async fn import_vm(
    app: &Arc<App>,
    req: pb::ImportVmRequest,
) -> Result<Response<pb::ImportVmResponse>, Status> {
    const KIND: &str = "import_vm";
    let reply = |op: &db::Operation| {
        Response::new(pb::ImportVmResponse {
            operation: Some(to_operation(op)),
            warnings: op.warnings.clone(),
        })
    };
    let key = RequestKey::of(&req)?;
    if let Some(op) = retried_operation(app, KIND, &key).await? {
        return Ok(reply(&op));
    }
    let export_domain_id = ids::parse("export_domain_id", &req.export_domain_id)?;
    let source_vm_id = ids::parse("vm_id", &req.vm_id)?;
    let cluster_id = ids::parse("cluster_id", &req.cluster_id)?;
    let target_domain_id = ids::parse("target_domain_id", &req.target_domain_id)?;
    if req.keep_memory && !req.as_clone {
        return Err(status::invalid_argument(
            "keep_memory",
            "only with as_clone: a plain import keeps every snapshot's memory",
        ));
    }
    if !req.name.is_empty() {
        check_name("name", &req.name)?;
    }
    let cluster = app.db.get_cluster(cluster_id).await.map_err(db_status)?;
    let h = app.cluster_host(cluster.id).await?;
    super::vm::check_domains(app, &h, [export_domain_id, target_domain_id]).await?;
    vm_import::require_data_domain(app, &h, target_domain_id).await?;
    // Bad input is answered now; the saga reads the descriptor again.
    let memory_supported = cluster.compatibility_version.supports_memory_snapshots();
    let with_memory = (!req.as_clone || req.keep_memory) && memory_supported;
    let (ovf, read_warnings) =
        vm_import::read_export(app, &h, export_domain_id, source_vm_id, with_memory).await?;
    let name = if req.name.is_empty() {
        ovf.name.clone()
    } else {
        req.name.clone()
    };
    if req.name.is_empty() {
        // The exported name is taken from the descriptor: checked as such.
        vm_import::check_ovf_values(&ovf, export_domain_id, Some(&name))?;
    }
    let vm_id = if req.as_clone { Uuid::new_v4() } else { ovf.vm_id };
    if !req.as_clone {
        match app.db.get_vm(vm_id).await {
            Ok(_) => return Err(vm_import::vm_exists(vm_id)),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(db_status(e)),
        }
    }
    match app.db.get_vm_by_name(&name).await {
        Ok(_) => return Err(vm_import::name_in_use(&name)),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(db_status(e)),
    }
    let has_memory = ovf.snapshots.iter().any(|s| s.memory.is_some());
    if req.keep_memory {
        if ovf.active().memory.is_none() {
            return Err(status::failed_precondition(
                "SNAPSHOT_HAS_NO_MEMORY",
                &format!("domain/{export_domain_id}/vms/{source_vm_id}"),
                format!(
                    "the exported active snapshot of VM {source_vm_id} has no memory: keep_memory has nothing to keep"
                ),
            ));
        }
        super::require_memory_level(&cluster, "a clone resumes from memory at 3.3 or above")?;
    }
    let mut warnings = read_warnings;
    if req.as_clone && ovf.active().memory.is_some() {
        warnings.push(if req.keep_memory {
            super::snapshot::FORK_IDENTITY_WARNING.to_string()
        } else {
            CLONE_MEMORY_WARNING.to_string()
        });
    }
    if !req.as_clone && has_memory && !memory_supported {
        warnings.push(format!(
            "cluster {} is at compatibility level {}, below 3.3: the snapshots' memory is not imported",
            cluster.name, cluster.compatibility_version
        ));
    }
    let params = vm_import::Params {
        export_domain_id,
        source_vm_id,
        vm_id,
        name,
        cluster_id,
        target_domain_id,
        as_clone: req.as_clone,
        collapse: req.collapse_snapshots,
        with_memory,
    };
    // The volumes it would make, with the exported ids (a clone's are new):
    // none may exist, nor be in an image a VM uses.
    if !req.as_clone {
        let plan = vm_import::make_plan(&params, &ovf, &|_| Uuid::nil());
        vm_import::refuse_existing_targets(app, &h, &plan).await?;
    }
    let op = start_operation(
        app,
        Start {
            kind: KIND,
            vm_id: Some(vm_id),
            lock_vm: false,
            request: key,
            saga: vm_import::NAME,
            params: serde_json::to_value(params).expect("serializable"),
            warnings,
        },
    )
    .await?;
    Ok(reply(&op))
}
