//! VmService: VMs, running and stopping them, and their status.
use super::{get_vm, vm_status};
use crate::app::{db_status, App};
use crate::db;
use ramsnap_common::ids;
use ramsnap_proto::host::v1 as host;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::vm_service_server::VmService;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub struct VmApi(pub Arc<App>);

pub async fn to_vm(app: &App, vm: &db::Vm) -> Result<pb::Vm, Status> {
    let disks = app.db.vm_disks(vm.id).await.map_err(db_status)?;
    let active = app.db.active_snapshot(vm.id).await.ok();
    Ok(pb::Vm {
        vm_id: vm.id.to_string(),
        name: vm.name.clone(),
        cluster_id: vm.cluster_id.to_string(),
        host_id: vm.host_id.map(|h| h.to_string()).unwrap_or_default(),
        memory_bytes: vm.memory_bytes,
        vcpus: vm.vcpus,
        stateless: vm.stateless,
        status: vm_status(vm.status) as i32,
        disks: disks
            .iter()
            .map(|d| pb::Disk {
                disk_id: d.disk_id.to_string(),
                domain_id: d.domain_id.to_string(),
                image_id: d.image_id.to_string(),
                capacity_bytes: d.capacity_bytes,
                leaf_volume_id: active
                    .as_ref()
                    .and_then(|a| a.disks.iter().find(|x| x.disk_id == d.disk_id))
                    .map(|x| x.volume.volume_id.to_string())
                    .unwrap_or_default(),
            })
            .collect(),
        kernel: vm.kernel.clone(),
        initrd: vm.initrd.clone(),
        cmdline: vm.cmdline.clone(),
        locked_by_operation_id: vm.lock_operation_id.map(|o| o.to_string()).unwrap_or_default(),
    })
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
        _req: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::CreateVmResponse>, Status> {
        Err(Status::unimplemented("create_vm: in progress"))
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
        let cluster = ids::parse_optional("cluster_id", &req.get_ref().cluster_id)?;
        let vms = match cluster {
            Some(c) => self.0.db.list_vms_in_cluster(c).await,
            None => self.0.db.list_vms().await,
        }
        .map_err(db_status)?;
        let mut out = Vec::with_capacity(vms.len());
        for vm in &vms {
            out.push(to_vm(&self.0, vm).await?);
        }
        Ok(Response::new(pb::ListVmsResponse { vms: out }))
    }

    async fn remove_vm(
        &self,
        _req: Request<pb::RemoveVmRequest>,
    ) -> Result<Response<pb::RemoveVmResponse>, Status> {
        Err(Status::unimplemented("remove_vm: in progress"))
    }

    async fn run_vm(&self, _req: Request<pb::RunVmRequest>) -> Result<Response<pb::RunVmResponse>, Status> {
        Err(Status::unimplemented("run_vm: in progress"))
    }

    async fn stop_vm(
        &self,
        _req: Request<pb::StopVmRequest>,
    ) -> Result<Response<pb::StopVmResponse>, Status> {
        Err(Status::unimplemented("stop_vm: in progress"))
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
                let _ = tokio::time::timeout(Duration::from_millis(250), events.recv()).await;
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
}
