//! Edit a VM (oVirt's UpdateVm): its name, memory, vcpus, stateless flag
//! and boot images. What changes the machine (memory, vcpus, boot images)
//! needs the VM down; the name and the stateless flag may change while it
//! runs (a stateless run is decided when the VM starts).
//!
//! A change of the machine also drops the ACTIVE snapshot's memory: it
//! would be restored at the next run into a machine it was not saved from
//! (see the module notes of [`super`], "When the memory is dropped"). The
//! `plan` node records the configuration before and the memory to drop
//! before anything changes, so a replay after a crash still knows both.
use super::common::{lock_vm, release_memory, unlock_vm, vm_and_host};
use crate::app::{db_status, App};
use crate::db::{self, MemoryVolume, VmStatus};
use crate::saga::{Node, Output, SagaCx, SagaDef};
use futures::future::BoxFuture;
use futures::FutureExt;
use ramsnap_common::status;
use serde::{Deserialize, Serialize};
use tonic::Status;
use uuid::Uuid;

pub const NAME: &str = "vm_update";

/// The fields to change; None: unchanged.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Params {
    pub vm_id: Uuid,
    pub name: Option<String>,
    pub memory_bytes: Option<u64>,
    pub vcpus: Option<u32>,
    pub stateless: Option<bool>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
}

impl Params {
    /// `vm` with the changes applied. A kernel given as empty removes
    /// direct boot with its initrd and command line.
    pub fn apply(&self, vm: &db::Vm) -> db::Vm {
        let mut v = vm.clone();
        if let Some(n) = &self.name {
            v.name = n.clone();
        }
        if let Some(m) = self.memory_bytes {
            v.memory_bytes = m;
        }
        if let Some(c) = self.vcpus {
            v.vcpus = c;
        }
        if let Some(s) = self.stateless {
            v.stateless = s;
        }
        if let Some(k) = &self.kernel {
            v.kernel = k.clone();
        }
        if let Some(i) = &self.initrd {
            v.initrd = i.clone();
        }
        if let Some(c) = &self.cmdline {
            v.cmdline = c.clone();
        }
        if self.kernel.as_deref() == Some("") {
            // Unless given too (then refused: no initrd without a kernel).
            if self.initrd.is_none() {
                v.initrd.clear();
            }
            if self.cmdline.is_none() {
                v.cmdline.clear();
            }
        }
        v
    }
}

/// Whether `after` is another machine than `before`: what a saved memory
/// cannot be restored into.
pub fn machine_changed(before: &db::Vm, after: &db::Vm) -> bool {
    (
        before.memory_bytes,
        before.vcpus,
        &before.kernel,
        &before.initrd,
        &before.cmdline,
    ) != (
        after.memory_bytes,
        after.vcpus,
        &after.kernel,
        &after.initrd,
        &after.cmdline,
    )
}

const PLAN: Output<Plan> = Output::new("plan");

/// What the update changes, read under the lock before anything is
/// written (and logged before `apply` runs, so that a replay of `apply`
/// still knows the configuration before and the memory to drop).
#[derive(Debug, Serialize, Deserialize)]
struct Plan {
    before: Before,
    /// The ACTIVE snapshot and its memory, when the machine changes and it
    /// has one.
    drop_memory: Option<(Uuid, MemoryVolume)>,
}

/// The editable configuration, as it was.
#[derive(Debug, Serialize, Deserialize)]
struct Before {
    name: String,
    memory_bytes: u64,
    vcpus: u32,
    stateless: bool,
    kernel: String,
    initrd: String,
    cmdline: String,
}

pub fn definition() -> SagaDef<App> {
    SagaDef {
        name: NAME,
        nodes: vec![
            Node::new(Output::new("lock_vm"), lock_fwd)
                .undo(unlock_undo)
                .local(),
            // Not local: its output must be in the log before `apply` writes.
            Node::new(PLAN, plan_fwd).undo(super::common::noop),
            Node::new(Output::new("apply"), apply_fwd)
                .undo(apply_undo)
                .local(),
            Node::new(Output::new("release_memory"), release_fwd),
            Node::new(Output::new("unlock_vm"), unlock_fwd).local(),
        ],
        result_node: None,
    }
}

fn lock_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move { lock_vm(cx, cx.params::<Params>()?.vm_id).await }.boxed()
}

fn unlock_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move { unlock_vm(cx, cx.params::<Params>()?.vm_id).await }.boxed()
}

fn unlock_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move { unlock_vm(cx, cx.params::<Params>()?.vm_id).await }.boxed()
}

/// Checks, under the lock, that the VM is down if the machine changes, and
/// records what goes.
fn plan_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<Plan, Status>> {
    async move {
        let p: Params = cx.params()?;
        let db = cx.db();
        let vm = db.get_vm(p.vm_id).await.map_err(db_status)?;
        let changed = machine_changed(&vm, &p.apply(&vm));
        if changed && vm.status != VmStatus::Down {
            return Err(status::failed_precondition(
                "VM_NOT_DOWN",
                &format!("vm/{}", vm.id),
                format!(
                    "VM {} is {}; its memory, vcpus and boot images change only while it is down \
                     (its name and stateless flag may change now)",
                    vm.name,
                    vm.status.as_str()
                ),
            ));
        }
        let drop_memory = if changed {
            let active = db.active_snapshot(p.vm_id).await.map_err(db_status)?;
            active.memory.map(|m| (active.id, m))
        } else {
            None
        };
        Ok(Plan {
            before: Before {
                name: vm.name,
                memory_bytes: vm.memory_bytes,
                vcpus: vm.vcpus,
                stateless: vm.stateless,
                kernel: vm.kernel,
                initrd: vm.initrd,
                cmdline: vm.cmdline,
            },
            drop_memory,
        })
    }
    .boxed()
}

/// Writes the configuration and drops the memory: the same again when
/// replayed. A name another VM took meanwhile fails here, and unwinds.
fn apply_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        let db = cx.db();
        let vm = db.get_vm(p.vm_id).await.map_err(db_status)?;
        db.update_vm_config(&p.apply(&vm)).await.map_err(db_status)?;
        if let Some((snapshot, m)) = plan.drop_memory {
            let active = db.get_snapshot(snapshot).await.map_err(db_status)?;
            if active.memory == Some(m) {
                db.remove_memory(snapshot).await.map_err(db_status)?;
                let warning = "the VM's configuration changed: the memory of its active snapshot \
                               was dropped, and its next run boots";
                let _ = db.add_operation_warning(cx.operation_id, warning).await;
            }
        }
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}

fn apply_undo(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        let plan = cx.get(PLAN)?;
        let db = cx.db();
        let mut vm = db.get_vm(p.vm_id).await.map_err(db_status)?;
        let b = plan.before;
        (vm.name, vm.memory_bytes, vm.vcpus, vm.stateless) = (b.name, b.memory_bytes, b.vcpus, b.stateless);
        (vm.kernel, vm.initrd, vm.cmdline) = (b.kernel, b.initrd, b.cmdline);
        db.update_vm_config(&vm).await.map_err(db_status)?;
        if let Some((snapshot, m)) = plan.drop_memory {
            db.set_memory(snapshot, &m).await.map_err(db_status)?;
        }
        cx.app.notify_vm(p.vm_id);
        Ok(())
    }
    .boxed()
}

fn release_fwd(cx: &SagaCx<App>) -> BoxFuture<'_, Result<(), Status>> {
    async move {
        let p: Params = cx.params()?;
        if let Some((_, m)) = cx.get(PLAN)?.drop_memory {
            let (_, host) = vm_and_host(cx, p.vm_id).await?;
            release_memory(cx, &host, &m, "update-memory").await?;
        }
        Ok(())
    }
    .boxed()
}
