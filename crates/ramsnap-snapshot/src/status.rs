//! VM status follows the HostService: while a VM runs, a task reads its
//! host's WatchVmStatus stream and records each transition.
use crate::app::App;
use crate::db::{self, VmStatus};
use ramsnap_proto::host::v1 as host;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

pub fn from_host(s: i32) -> Option<VmStatus> {
    Some(match host::VmStatus::try_from(s).ok()? {
        host::VmStatus::Down => VmStatus::Down,
        host::VmStatus::PoweringUp => VmStatus::PoweringUp,
        host::VmStatus::Up => VmStatus::Up,
        host::VmStatus::Paused => VmStatus::Paused,
        host::VmStatus::RestoringState => VmStatus::RestoringState,
        host::VmStatus::SavingState => VmStatus::SavingState,
        host::VmStatus::PoweringDown => VmStatus::PoweringDown,
        host::VmStatus::Unspecified => return None,
    })
}

/// Follows every VM the database says is running (after a restart). An
/// ImageLocked VM is down: the saga that changes its images sets it back.
pub async fn follow_running(app: &Arc<App>) {
    let Ok(vms) = app.db.list_vms().await else { return };
    for vm in vms.into_iter().filter(|v| {
        !matches!(
            v.status,
            VmStatus::Down | VmStatus::ImageLocked | VmStatus::Suspended
        )
    }) {
        if let Ok(host) = app.host_for_vm(&vm).await {
            follow(app, vm.id, host);
        }
    }
}

/// Starts following a VM's status on its host (replacing an earlier follower).
pub fn follow(app: &Arc<App>, vm_id: Uuid, host: db::Host) {
    let task_app = app.clone();
    let task = tokio::spawn(async move {
        let app = task_app;
        let mut failures = 0u32;
        loop {
            let Ok(mut client) = app.host_client(&host) else {
                return;
            };
            match client
                .watch_vm_status(host::WatchVmStatusRequest {
                    vm_id: vm_id.to_string(),
                })
                .await
            {
                Ok(stream) => {
                    failures = 0;
                    let mut stream = stream.into_inner();
                    while let Ok(Some(m)) = stream.message().await {
                        let Some(status) = from_host(m.status) else {
                            continue;
                        };
                        if app.db.record_host_status(vm_id, status).await.is_ok() {
                            app.notify_vm(vm_id);
                        }
                        if status == VmStatus::Down {
                            return;
                        }
                    }
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    // The host does not know the VM: it is down.
                    let _ = app.db.set_vm_status(vm_id, VmStatus::Down).await;
                    app.notify_vm(vm_id);
                    return;
                }
                Err(_) => failures += 1,
            }
            tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(25)))).await;
        }
    });
    if let Some(old) = app.followed.lock().expect("poisoned").insert(vm_id, task) {
        old.abort();
    }
}

/// Stops following a VM (it was stopped through the API).
pub fn unfollow(app: &App, vm_id: Uuid) {
    if let Some(t) = app.followed.lock().expect("poisoned").remove(&vm_id) {
        t.abort();
    }
}
