//! The coordinator's sagas, one module per saga (`resource_verb.rs`). Each
//! holds its serde `Params`, its nodes (forward and undo actions, stable
//! names) and its definition. Steps are "ensure" operations keyed by ids
//! derived from the saga id, so a replayed step asks for the same thing.
//!
//! Every saga takes the VM lock first and gives it back last; all its
//! reversible nodes come before its first node without undo (the point of
//! no return), so a failure either unwinds everything or is retried until
//! the saga completes. Steps that delete snapshots first record what they
//! will release (a "plan" node), so a replay after a crash still knows it.
//!
//! # When the memory is dropped
//!
//! Restoring memory is only sound while the disks are exactly as they were
//! when it was saved (libvirt does not check; a mismatch corrupts the
//! guest's file systems). So the ACTIVE snapshot's memory is dropped
//! whenever its disks may have diverged from it, and kept where they
//! provably have not:
//!
//! - `vm_run`: once the host has started the guest, it writes to the disks:
//!   the ACTIVE snapshot's memory is cleared, booted or restored, at any
//!   cluster level, and the volumes are deleted unless another snapshot
//!   refers to them. Those references are why a preview or commit with
//!   memory does not lose it: the previewed (committed) snapshot keeps
//!   holding it, so the volumes go only when that snapshot is removed too.
//!   A stateless run's ACTIVE snapshot drops the memory the same way, but
//!   the STATELESS snapshot keeps it, and it is ACTIVE again after StopVm:
//!   every stateless run restores it.
//! - A failed run (the host refused, say, a metadata mismatch) never
//!   started the guest: the disks are untouched and the memory stays.
//! - `snapshot_create` of a down VM whose ACTIVE snapshot has memory (a
//!   preview or commit not run yet): the new snapshot freezes exactly the
//!   ACTIVE snapshot's content and the ACTIVE one moves to empty overlays,
//!   so its disks still show what the memory saw: it keeps the memory. The
//!   new snapshot gets none (oVirt: a snapshot of a down VM has none).
//! - `snapshot_remove` merges a volume into its child, which shows the same
//!   content afterwards: whatever the ACTIVE snapshot (or any remaining
//!   snapshot) shows is unchanged, so its memory stays valid.
//! - `snapshot_remove_live` (the VM runs) commits the volume above the
//!   removed snapshot's into it instead: that volume then shows what the
//!   one above showed, and whatever pointed there points at it (a newer
//!   snapshot's memory is rebound). The ACTIVE snapshot of a running VM
//!   holds no memory, so none is dropped.
//! - `snapshot_preview` branches new, empty leaves off the snapshot's
//!   volumes, which show what the snapshot showed when its memory was saved;
//!   `snapshot_undo` returns to the pre-preview ACTIVE snapshot, whose
//!   volumes the preview never touched, with the memory it had;
//!   `snapshot_commit` keeps the preview's ACTIVE snapshot as it is.
//! - `vm_clone` copies content only; the clone has no memory (oVirt 3.3).
//! - `vm_stop` of a stateless VM discards the run's disks and memory
//!   reference together, returning to a consistent (disks, memory) pair.
//! - `vm_suspend` saves the running guest's memory with no overlay: the
//!   disks stay on the leaves it was saved with, and the memory goes on the
//!   ACTIVE snapshot, which `vm_run` restores (and clears) as above. While
//!   the VM is SUSPENDED, nothing that changes its disks runs (VM_SUSPENDED);
//!   `vm_stop` discards the memory.
//! - `vm_update` that changes the machine (memory, vcpus, boot images)
//!   drops the ACTIVE snapshot's memory: the disks still match it, but the
//!   machine it would be restored into is another one. A rename or the
//!   stateless flag keeps it.
//!
//! A VM's images belong to it alone and change only under its lock, which
//! is what lets undo, commit and stop delete every volume no snapshot
//! reaches ([`common::collect_garbage`]) instead of trusting lists made
//! before a crash.
use crate::app::App;
use crate::saga::SagaDef;

pub mod common;
pub mod preview_end;
pub mod snapshot_commit;
pub mod snapshot_create;
pub mod snapshot_preview;
pub mod snapshot_remove;
pub mod snapshot_remove_live;
pub mod snapshot_undo;
pub mod vm_clone;
pub mod vm_create;
pub mod vm_export;
pub mod vm_import;
pub mod vm_remove;
pub mod vm_run;
pub mod vm_stop;
pub mod vm_suspend;
pub mod vm_update;

pub fn all() -> Vec<SagaDef<App>> {
    vec![
        snapshot_create::definition(),
        snapshot_remove::definition(),
        snapshot_remove_live::definition(),
        snapshot_preview::definition(),
        snapshot_undo::definition(),
        snapshot_commit::definition(),
        vm_create::definition(),
        vm_remove::definition(),
        vm_run::definition(),
        vm_stop::definition(),
        vm_suspend::definition(),
        vm_update::definition(),
        vm_clone::definition(),
        vm_export::definition(),
        vm_import::definition(),
    ]
}
