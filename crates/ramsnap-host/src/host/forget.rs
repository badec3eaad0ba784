//! Forgetting a VM that is down (the coordinator removed it): what the host
//! keeps of it goes, its status entry (open watches end) and its console
//! log directory, so that the host answers for it as for a VM it never ran
//! (ReadConsole NOT_FOUND, WatchVmStatus one DOWN and the end).
use super::{Host, Vm};
use crate::error::{ForgetError, HostError, Result};
use crate::model::VmStatus;
use std::sync::Arc;
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

impl Host {
    /// The VM's entry (made if missing) with its operation lock held, and
    /// still the one in the table: an entry forgotten (or pruned) between
    /// the lookup and the lock is not used, so that nothing runs under an
    /// entry the table no longer has.
    pub(crate) async fn lock_entry(&self, id: Uuid) -> (Arc<Vm>, OwnedMutexGuard<()>) {
        loop {
            let vm = self.vm_entry(id);
            let op = vm.op.clone().lock_owned().await;
            if self.vm(id).is_some_and(|cur| Arc::ptr_eq(&cur, &vm)) {
                return (vm, op);
            }
        }
    }

    /// Forgets a VM that is down on this host; true when there was
    /// something to forget. Refused while it runs, or while an operation on
    /// it (run, stop, snapshot, verification) is in progress.
    pub async fn forget(&self, id: Uuid) -> Result<bool> {
        let known = self.vm(id).is_some();
        // Through an entry of our own if there is none, so that a run that
        // starts meanwhile waits for its lock, and then makes a new entry.
        let (vm, _op) = loop {
            let vm = self.vm_entry(id);
            let Ok(op) = vm.op.clone().try_lock_owned() else {
                return Err(ForgetError::Busy(id).into());
            };
            if self.vm(id).is_some_and(|cur| Arc::ptr_eq(&cur, &vm)) {
                break (vm, op);
            }
        };
        let result = self.forget_locked(&vm, known).await;
        // Ours or not, an entry of a VM that is down and unlocked goes.
        if result.is_ok() || !known {
            let mut vms = self.inner.vms.lock().expect("vm table");
            if vms.get(&id).is_some_and(|cur| Arc::ptr_eq(cur, &vm)) {
                vms.remove(&id);
            }
        }
        result
    }

    async fn forget_locked(&self, vm: &Vm, known: bool) -> Result<bool> {
        let id = vm.id;
        let status = vm.status();
        let busy = vm.job.lock().expect("vm lock").is_some();
        if status != VmStatus::Down || vm.running().is_some() || busy {
            return Err(ForgetError::Running { vm: id, status }.into());
        }
        // A domain of that id the agent does not know as running (another
        // agent's, or one left from before a lost record): not down.
        if self.inner.hv.state(id).await?.is_some() {
            return Err(ForgetError::Running {
                vm: id,
                status: VmStatus::Up,
            }
            .into());
        }
        let dir = self.inner.config.run_dir.join(id.to_string());
        let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(HostError::io(format!("removing {}", dir.display()), e)),
        })
        .await
        .map_err(|e| HostError::Internal(format!("forgetting vm {id}: {e}")))??;
        tracing::info!(vm = %id, console_log = removed, "forgot the VM");
        Ok(known || removed)
    }
}
