//! VmService: VMs, running and stopping them, and their status.
use super::snapshot::{in_preview, refuse_in_preview};
use super::{
    check_name, get_vm, limits, or_retried, refuse_locked, require_down, require_up, require_vm_memory_level,
    start_operation, to_operation, vm_status, RequestKey, Start,
};
use crate::app::{db_status, App};
use crate::convert::downstream;
use crate::db;
use crate::sagas::{vm_create, vm_remove, vm_run, vm_stop, vm_suspend, vm_update};
use ramsnap_common::paging::PageRequest;
use ramsnap_common::{ids, status};
use ramsnap_proto::host::v1 as host;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::vm_service_server::VmService;
use ramsnap_proto::storage::v1 as storage;
use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

pub struct VmApi(pub Arc<App>);

/// The request's disks, checked (count, each domain id and capacity).
fn disk_specs(disks: &[pb::DiskSpec]) -> Result<Vec<vm_create::DiskSpec>, Status> {
    limits::check_disk_count("disks", disks.len())?;
    disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let domain_id = ids::parse(&format!("disks[{i}].domain_id"), &d.domain_id)?;
            limits::check_disk_capacity(&format!("disks[{i}].capacity_bytes"), d.capacity_bytes)?;
            Ok(vm_create::DiskSpec {
                domain_id,
                capacity_bytes: d.capacity_bytes,
            })
        })
        .collect()
}

/// NOT_FOUND unless the host's StorageService has each domain, and
/// FAILED_PRECONDITION NOT_A_DATA_DOMAIN for an EXPORT domain: VM disks
/// live on data domains only. `domains` are (request field, domain id).
pub async fn check_data_domains(
    app: &App,
    host: &db::Host,
    domains: impl IntoIterator<Item = (String, Uuid)>,
) -> Result<(), Status> {
    let mut client = app.storage_client(host)?;
    let mut seen = BTreeSet::new();
    for (field, d) in domains {
        if !seen.insert(d) {
            continue;
        }
        let domain = match client
            .get_domain(storage::GetDomainRequest {
                domain_id: d.to_string(),
            })
            .await
        {
            Ok(r) => r.into_inner().domain,
            Err(s) if s.code() == Code::NotFound => {
                return Err(status::not_found("storage domain", &d.to_string()))
            }
            Err(s) => return Err(downstream("looking up a storage domain", s)),
        };
        if let Some(dom) = domain.filter(|x| x.role == storage::DomainRole::Export as i32) {
            return Err(status::failed_precondition(
                "NOT_A_DATA_DOMAIN",
                &format!("domain/{d}"),
                format!(
                    "{field}: storage domain {} ({d}) is an export domain; VM disks go on data domains",
                    dom.name
                ),
            ));
        }
    }
    Ok(())
}

/// NOT_FOUND unless the host's StorageService has each domain.
pub async fn check_domains(
    app: &App,
    host: &db::Host,
    domains: impl IntoIterator<Item = Uuid>,
) -> Result<(), Status> {
    let mut client = app.storage_client(host)?;
    for d in domains.into_iter().collect::<BTreeSet<_>>() {
        match client
            .get_domain(storage::GetDomainRequest {
                domain_id: d.to_string(),
            })
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {
                return Err(status::not_found("storage domain", &d.to_string()))
            }
            Err(s) => return Err(downstream("looking up a storage domain", s)),
        }
    }
    Ok(())
}

/// ALREADY_EXISTS if a VM has this name.
pub async fn refuse_taken_name(app: &App, name: &str) -> Result<(), Status> {
    match app.db.get_vm_by_name(name).await {
        Ok(vm) => Err(status::already_exists(
            "vm",
            name,
            format!("the name is taken by VM {}", vm.id),
        )),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(db_status(e)),
    }
}

pub async fn to_vm(app: &App, vm: &db::Vm) -> Result<pb::Vm, Status> {
    let disks = app.db.vm_disks(vm.id).await.map_err(db_status)?;
    let active = app.db.active_snapshot(vm.id).await.ok();
    let leaf = |d: &db::VmDisk| {
        active
            .as_ref()
            .and_then(|a| a.disks.iter().find(|x| x.disk_id == d.disk_id))
            .map(|x| x.volume.volume_id)
    };
    Ok(vm_message(
        vm,
        disks.iter().map(|d| wire_disk(d, leaf(d))).collect(),
    ))
}

fn wire_disk(d: &db::VmDisk, leaf: Option<uuid::Uuid>) -> pb::Disk {
    pb::Disk {
        disk_id: d.disk_id.to_string(),
        domain_id: d.domain_id.to_string(),
        image_id: d.image_id.to_string(),
        capacity_bytes: d.capacity_bytes,
        leaf_volume_id: leaf.map(|l| l.to_string()).unwrap_or_default(),
    }
}

fn vm_message(vm: &db::Vm, disks: Vec<pb::Disk>) -> pb::Vm {
    pb::Vm {
        vm_id: vm.id.to_string(),
        name: vm.name.clone(),
        cluster_id: vm.cluster_id.to_string(),
        host_id: vm.host_id.map(|h| h.to_string()).unwrap_or_default(),
        memory_bytes: vm.memory_bytes,
        vcpus: vm.vcpus,
        stateless: vm.stateless,
        status: vm_status(vm.status) as i32,
        disks,
        kernel: vm.kernel.clone(),
        initrd: vm.initrd.clone(),
        cmdline: vm.cmdline.clone(),
        locked_by_operation_id: vm.lock_operation_id.map(|o| o.to_string()).unwrap_or_default(),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchVmResponse, Status>> + Send>>;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[tonic::async_trait]
impl VmService for VmApi {
    async fn create_vm(
        &self,
        req: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::CreateVmResponse>, Status> {
        const KIND: &str = "create_vm";
        let req = req.into_inner();
        let reply = |op: &db::Operation| {
            Response::new(pb::CreateVmResponse {
                operation: Some(to_operation(op)),
            })
        };
        let key = RequestKey::of(&req)?;
        let op = or_retried(&self.0, KIND, &key, async {
            check_name("name", &req.name)?;
            let cluster_id = ids::parse("cluster_id", &req.cluster_id)?;
            limits::check_memory("memory_bytes", req.memory_bytes)?;
            limits::check_vcpus("vcpus", req.vcpus)?;
            let disks = disk_specs(&req.disks)?;
            limits::check_boot("", &req.kernel, &req.initrd, &req.cmdline)?;
            let cluster = self.0.db.get_cluster(cluster_id).await.map_err(db_status)?;
            refuse_taken_name(&self.0, &req.name).await?;
            let host = self.0.cluster_host(cluster.id).await?;
            let domains: Vec<(String, Uuid)> = disks
                .iter()
                .enumerate()
                .map(|(i, d)| (format!("disks[{i}].domain_id"), d.domain_id))
                .collect();
            check_data_domains(&self.0, &host, domains).await?;
            let vm_id = Uuid::new_v4();
            let params = vm_create::Params {
                vm_id,
                name: req.name,
                cluster_id,
                memory_bytes: req.memory_bytes,
                vcpus: req.vcpus,
                stateless: req.stateless,
                disks,
                kernel: req.kernel,
                initrd: req.initrd,
                cmdline: req.cmdline,
            };
            start_operation(
                &self.0,
                Start {
                    kind: KIND,
                    vm_id: Some(vm_id),
                    lock_vm: false,
                    request: key.clone(),
                    saga: vm_create::NAME,
                    params: serde_json::to_value(params).expect("serializable"),
                    warnings: Vec::new(),
                },
            )
            .await
        })
        .await?;
        Ok(reply(&op))
    }

    async fn get_vm(&self, req: Request<pb::GetVmRequest>) -> Result<Response<pb::GetVmResponse>, Status> {
        let vm = get_vm(&self.0, "vm_id", &req.get_ref().vm_id).await?;
        Ok(Response::new(pb::GetVmResponse {
            vm: Some(to_vm(&self.0, &vm).await?),
        }))
    }

    async fn list_vms(
        &self,
        req: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let req = req.into_inner();
        let cluster = ids::parse_optional("cluster_id", &req.cluster_id)?;
        let page = PageRequest::parse(req.page_size, &req.page_token, &[&req.cluster_id])?;
        let vms = match cluster {
            Some(c) => self.0.db.list_vms_in_cluster(c).await,
            None => self.0.db.list_vms().await,
        }
        .map_err(db_status)?;
        // In the order of the names (unique).
        let (vms, next_page_token) = page.page(vms, |vm| vm.name.clone());
        // Every VM's disks and leaves in one query (not a few per VM).
        let mut disks: std::collections::HashMap<uuid::Uuid, Vec<pb::Disk>> =
            std::collections::HashMap::new();
        for (d, leaf) in self.0.db.vm_disks_with_leaves(cluster).await.map_err(db_status)? {
            disks.entry(d.vm_id).or_default().push(wire_disk(&d, leaf));
        }
        let out = vms
            .iter()
            .map(|vm| vm_message(vm, disks.remove(&vm.id).unwrap_or_default()))
            .collect();
        Ok(Response::new(pb::ListVmsResponse {
            vms: out,
            next_page_token,
        }))
    }

    async fn remove_vm(
        &self,
        req: Request<pb::RemoveVmRequest>,
    ) -> Result<Response<pb::RemoveVmResponse>, Status> {
        const KIND: &str = "remove_vm";
        let req = req.into_inner();
        let reply = |op: &db::Operation| {
            Response::new(pb::RemoveVmResponse {
                operation: Some(to_operation(op)),
            })
        };
        let key = RequestKey::of(&req)?;
        let op = or_retried(&self.0, KIND, &key, async {
            let vm = get_vm(&self.0, "vm_id", &req.vm_id).await?;
            refuse_locked(&vm)?;
            require_down(&vm, "removing it")?;
            self.0.host_for_vm(&vm).await?;
            start_operation(
                &self.0,
                Start::locked(
                    KIND,
                    vm.id,
                    key.clone(),
                    vm_remove::NAME,
                    &vm_remove::Params { vm_id: vm.id },
                ),
            )
            .await
        })
        .await?;
        Ok(reply(&op))
    }

    async fn run_vm(&self, req: Request<pb::RunVmRequest>) -> Result<Response<pb::RunVmResponse>, Status> {
        const KIND: &str = "run_vm";
        let req = req.into_inner();
        let reply = |op: &db::Operation| {
            Response::new(pb::RunVmResponse {
                operation: Some(to_operation(op)),
            })
        };
        let key = RequestKey::of(&req)?;
        let op = or_retried(&self.0, KIND, &key, async {
            let vm = get_vm(&self.0, "vm_id", &req.vm_id).await?;
            let host_id = ids::parse_optional("host_id", &req.host_id)?;
            refuse_locked(&vm)?;
            if vm.status != db::VmStatus::Suspended {
                require_down(&vm, "running it")?;
            }
            let host = match host_id {
                Some(h) => {
                    let host = self.0.host(h).await?;
                    if host.cluster_id != vm.cluster_id {
                        return Err(status::failed_precondition(
                            "HOST_NOT_IN_CLUSTER",
                            &format!("host/{h}"),
                            format!("host {} is not in VM {}'s cluster", host.name, vm.name),
                        ));
                    }
                    host
                }
                None => self.0.host_for_vm(&vm).await?,
            };
            let stateless = vm.stateless || req.run_stateless;
            if stateless && in_preview(&self.0, &vm).await? {
                refuse_in_preview(&self.0, &vm, "running it stateless").await?;
            }
            let params = vm_run::Params {
                vm_id: vm.id,
                host_id: host.id,
                stateless,
            };
            start_operation(
                &self.0,
                Start::locked(KIND, vm.id, key.clone(), vm_run::NAME, &params),
            )
            .await
        })
        .await?;
        Ok(reply(&op))
    }

    async fn stop_vm(&self, req: Request<pb::StopVmRequest>) -> Result<Response<pb::StopVmResponse>, Status> {
        const KIND: &str = "stop_vm";
        let req = req.into_inner();
        let reply = |op: &db::Operation| {
            Response::new(pb::StopVmResponse {
                operation: Some(to_operation(op)),
            })
        };
        let key = RequestKey::of(&req)?;
        let op = or_retried(&self.0, KIND, &key, async {
            let vm = get_vm(&self.0, "vm_id", &req.vm_id).await?;
            refuse_locked(&vm)?;
            let params = vm_stop::Params {
                vm_id: vm.id,
                graceful_timeout_seconds: req.graceful_timeout_seconds,
            };
            start_operation(
                &self.0,
                Start::locked(KIND, vm.id, key.clone(), vm_stop::NAME, &params),
            )
            .await
        })
        .await?;
        Ok(reply(&op))
    }

    async fn suspend_vm(
        &self,
        req: Request<pb::SuspendVmRequest>,
    ) -> Result<Response<pb::SuspendVmResponse>, Status> {
        const KIND: &str = "suspend_vm";
        let req = req.into_inner();
        let reply = |op: &db::Operation| {
            Response::new(pb::SuspendVmResponse {
                operation: Some(to_operation(op)),
            })
        };
        let key = RequestKey::of(&req)?;
        let op = or_retried(&self.0, KIND, &key, async {
            let vm = get_vm(&self.0, "vm_id", &req.vm_id).await?;
            refuse_locked(&vm)?;
            require_vm_memory_level(
                &self.0,
                &vm,
                "suspending a VM saves its memory, which needs 3.3 or above",
            )
            .await?;
            require_up(&vm, "only a VM that is up can be suspended")?;
            // The rest (a stateless run) is checked under the VM's lock.
            let params = vm_suspend::Params { vm_id: vm.id };
            start_operation(
                &self.0,
                Start::locked(KIND, vm.id, key.clone(), vm_suspend::NAME, &params),
            )
            .await
        })
        .await?;
        Ok(reply(&op))
    }

    async fn update_vm(
        &self,
        req: Request<pb::UpdateVmRequest>,
    ) -> Result<Response<pb::UpdateVmResponse>, Status> {
        const KIND: &str = "update_vm";
        let req = req.into_inner();
        let reply = |op: &db::Operation| {
            Response::new(pb::UpdateVmResponse {
                operation: Some(to_operation(op)),
            })
        };
        let key = RequestKey::of(&req)?;
        let op = or_retried(&self.0, KIND, &key, async {
            let params = vm_update::Params {
                vm_id: ids::parse("vm_id", &req.vm_id)?,
                name: req.name,
                memory_bytes: req.memory_bytes,
                vcpus: req.vcpus,
                stateless: req.stateless,
                kernel: req.kernel,
                initrd: req.initrd,
                cmdline: req.cmdline,
            };
            let given = [
                params.name.is_some(),
                params.memory_bytes.is_some(),
                params.vcpus.is_some(),
                params.stateless.is_some(),
                params.kernel.is_some(),
                params.initrd.is_some(),
                params.cmdline.is_some(),
            ];
            if !given.contains(&true) {
                return Err(status::invalid_argument(
                    "vm_id",
                    "nothing to change: give at least one of name, memory_bytes, vcpus, stateless, kernel, \
                     initrd, cmdline",
                ));
            }
            if let Some(name) = &params.name {
                check_name("name", name)?;
            }
            if let Some(m) = params.memory_bytes {
                limits::check_memory("memory_bytes", m)?;
            }
            if let Some(c) = params.vcpus {
                limits::check_vcpus("vcpus", c)?;
            }
            let vm = get_vm(&self.0, "vm_id", &req.vm_id).await?;
            let after = params.apply(&vm);
            limits::check_boot("", &after.kernel, &after.initrd, &after.cmdline)?;
            if after.name != vm.name {
                refuse_taken_name(&self.0, &after.name).await?;
            }
            refuse_locked(&vm)?;
            if vm_update::machine_changed(&vm, &after) {
                // Checked again under the lock by the saga.
                require_down(&vm, "changing its memory, vcpus or boot images")?;
            }
            start_operation(
                &self.0,
                Start::locked(KIND, vm.id, key.clone(), vm_update::NAME, &params),
            )
            .await
        })
        .await?;
        Ok(reply(&op))
    }

    type WatchVmStream = WatchStream;

    async fn watch_vm(&self, req: Request<pb::WatchVmRequest>) -> Result<Response<WatchStream>, Status> {
        let vm = get_vm(&self.0, "vm_id", &req.get_ref().vm_id).await?;
        let app = self.0.clone();
        let mut events = app.vm_events.subscribe();
        let stream = async_stream::try_stream! {
            let mut last = vm.status;
            yield pb::WatchVmResponse { status: vm_status(last) as i32, at_unix_ms: now_ms() };
            loop {
                crate::app::changed(&mut events, |e| *e == vm.id, Duration::from_millis(250)).await;
                let now = app.db.get_vm(vm.id).await.map_err(db_status)?;
                if now.status != last {
                    last = now.status;
                    yield pb::WatchVmResponse { status: vm_status(last) as i32, at_unix_ms: now_ms() };
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn read_console(
        &self,
        req: Request<pb::ReadConsoleRequest>,
    ) -> Result<Response<pb::ReadConsoleResponse>, Status> {
        let req = req.into_inner();
        let vm = get_vm(&self.0, "vm_id", &req.vm_id).await?;
        let host = self.0.host_for_vm(&vm).await?;
        let r = self
            .0
            .host_client(&host)?
            .read_console(host::ReadConsoleRequest {
                vm_id: vm.id.to_string(),
                offset: req.offset,
                max_bytes: req.max_bytes,
            })
            .await?
            .into_inner();
        Ok(Response::new(pb::ReadConsoleResponse {
            data: r.data,
            next_offset: r.next_offset,
        }))
    }

    async fn export_vm(
        &self,
        req: Request<pb::ExportVmRequest>,
    ) -> Result<Response<pb::ExportVmResponse>, Status> {
        super::export::export_vm(&self.0, req.into_inner()).await
    }

    async fn list_exported_vms(
        &self,
        req: Request<pb::ListExportedVmsRequest>,
    ) -> Result<Response<pb::ListExportedVmsResponse>, Status> {
        super::export::list_exported_vms(&self.0, req.into_inner()).await
    }

    async fn import_vm(
        &self,
        req: Request<pb::ImportVmRequest>,
    ) -> Result<Response<pb::ImportVmResponse>, Status> {
        super::export::import_vm(&self.0, req.into_inner()).await
    }
}
