//! The suspend verb (oVirt's hibernate; VDSM saves the guest with
//! virDomainSave into a hibernation volume): the guest's memory into a
//! memory volume pair, then the guest is gone. No overlay is made and the
//! disks are not touched: the metadata binds each disk to the leaf it runs
//! on (recorded as both the frozen volume and the "overlay", so that the
//! restore-time check accepts that leaf or a layer made over it later, and
//! nothing else). A RunVm with the pair resumes the guest.
//!
//! Retries: the pair's metadata names the VM and the request's snapshot id
//! once the memory is recorded; a call that finds the guest gone and that
//! record answers as the first call did. A save that libvirt finished for
//! an agent process that died before recording it is recorded by the next
//! call (the request names the disks, so nothing of the dead process's
//! state is needed).
use super::snapshot::{chrono_now, ready_dump, scrub_pair, snapshot_timeout, MemoryTarget};
use super::Host;
use crate::error::{HostError, Result, SnapshotError};
use crate::libvirt::DomainState;
use crate::metadata::{self, DiskRecord, DumpRecord, Followed, MemoryMetadata};
use crate::model::{MemoryVolumes, SnapshotMode, VmStatus, VolumeRef};
use crate::xml::DiskKind;
use ramsnap_common::checksum::Checksum;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct SuspendRequest {
    pub vm_id: Uuid,
    /// Recorded in the metadata; the coordinator's ACTIVE snapshot.
    pub snapshot_id: Uuid,
    /// Each disk's leaf, in order.
    pub disks: Vec<VolumeRef>,
    pub memory: MemoryVolumes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuspendOutcome {
    pub dump_bytes: u64,
    pub dump_checksum: Checksum,
    pub duration_ms: u64,
    pub saved_earlier: bool,
}

impl Host {
    pub async fn suspend(&self, req: SuspendRequest) -> Result<SuspendOutcome> {
        let started = Instant::now();
        let hv = &self.inner.hv;
        let Some(vm) = self.vm(req.vm_id) else {
            return self.saved_earlier(&req).await;
        };
        let _op = vm
            .op
            .clone()
            .try_lock_owned()
            .map_err(|_| SnapshotError::VmBusy(req.vm_id))?;
        let Some(running) = vm.running() else {
            return self.saved_earlier(&req).await;
        };
        if vm.adopted.load(Ordering::SeqCst) && !self.inner.simulated {
            // An earlier agent process may have begun this save: libvirt
            // goes on with it; what it did is known once it has ended.
            hv.wait_for_jobs(req.vm_id, snapshot_timeout(running.spec.memory_bytes))
                .await?;
            vm.adopted.store(false, Ordering::SeqCst);
        }
        let paused = match hv.state(req.vm_id).await? {
            Some(DomainState::Running) => false,
            Some(DomainState::Paused { .. }) => true,
            None => {
                // Gone: saved by an earlier process (recorded or not), or
                // lost. Either way this host no longer runs it.
                let outcome = self.saved_earlier(&req).await;
                self.release(&vm).await;
                return outcome;
            }
            Some(_) => return Err(SnapshotError::VmNotRunning(req.vm_id).into()),
        };
        let leaves: Vec<VolumeRef> = running.disks.iter().map(|d| d.leaf).collect();
        if leaves != req.disks {
            return Err(SnapshotError::DisksMismatch(format!(
                "the VM runs on {}, the request names {}",
                list(&leaves),
                list(&req.disks)
            ))
            .into());
        }

        let target = self.prepare_memory(req.memory).await?;
        if let Err(e) = ready_dump(&target, req.vm_id, req.snapshot_id).await {
            self.inner
                .volumes
                .teardown_all(&[req.memory.dump, req.memory.metadata])
                .await;
            return Err(e);
        }
        // The test driver's save image holds no domain XML worth keeping:
        // a simulated host records its live definition, read now.
        let simulated_xml = if self.inner.simulated {
            Some(hv.live_xml(req.vm_id).await?)
        } else {
            None
        };
        vm.set_status(VmStatus::SavingState);
        // The dump is hashed while libvirt writes it (as for a snapshot).
        let stop_following = Arc::new(AtomicBool::new(false));
        let _stop_following_on_drop = metadata::StopOnDrop(stop_following.clone());
        let follower = (!self.inner.simulated).then(|| {
            let (path, capacity, stop) = (
                target.dump.path.clone(),
                target.dump_capacity,
                stop_following.clone(),
            );
            let kind = target.dump.kind;
            tokio::task::spawn_blocking(move || match kind {
                DiskKind::File => metadata::follow_dump(&path, capacity, &stop),
                DiskKind::Block => metadata::follow_block_dump(&path, capacity, &stop),
            })
        });
        let saved = hv
            .save(
                req.vm_id,
                target.dump.path.display().to_string(),
                snapshot_timeout(running.spec.memory_bytes),
            )
            .await;
        stop_following.store(true, Ordering::Release);
        let followed = match follower {
            Some(f) => f.await.ok().and_then(|r| r.ok()),
            None => None,
        };
        if let Err(e) = saved {
            scrub_pair(&target, req.vm_id).await;
            self.teardown_pair(&req.memory).await;
            vm.set_status(if paused { VmStatus::Paused } else { VmStatus::Up });
            let enospc = matches!(&e, HostError::Libvirt(l) if l.message.contains("No space left on device"));
            if enospc {
                return Err(SnapshotError::DumpTooLarge {
                    volume: req.memory.dump,
                    capacity: target.dump_capacity,
                }
                .into());
            }
            return Err(e);
        }
        tracing::info!(vm = %req.vm_id, ms = started.elapsed().as_millis() as u64, "guest saved");

        // The guest is gone: its memory is only in the dump now.
        match self.record_saved(&target, &req, followed, simulated_xml).await {
            Ok((dump_bytes, dump_checksum)) => {
                self.teardown_pair(&req.memory).await;
                self.release(&vm).await;
                Ok(SuspendOutcome {
                    dump_bytes,
                    dump_checksum,
                    duration_ms: started.elapsed().as_millis() as u64,
                    saved_earlier: false,
                })
            }
            Err(e) => {
                // Unrecorded memory is never restored: put the guest back
                // from it now, while its disks are still prepared.
                let back = self.resume_from_unrecorded(&target, req.vm_id).await;
                scrub_pair(&target, req.vm_id).await;
                self.teardown_pair(&req.memory).await;
                match back {
                    Ok(()) => {
                        vm.set_status(if paused { VmStatus::Paused } else { VmStatus::Up });
                        Err(HostError::Internal(format!(
                            "the memory could not be recorded ({e}); the guest was resumed from it and runs"
                        )))
                    }
                    Err(re) => {
                        self.release(&vm).await;
                        Err(HostError::Internal(format!(
                            "the memory could not be recorded ({e}) and the guest could not be resumed from it ({re}): the VM is down"
                        )))
                    }
                }
            }
        }
    }

    /// The guest is not running here: its memory was saved by an earlier
    /// call (recorded: answered as then) or by libvirt for an agent that
    /// died before recording it (recorded now); otherwise VM_NOT_RUNNING.
    async fn saved_earlier(&self, req: &SuspendRequest) -> Result<SuspendOutcome> {
        let target = self.prepare_memory(req.memory).await?;
        let outcome = self.find_saved(&target, req).await;
        self.teardown_pair(&req.memory).await;
        outcome
    }

    async fn find_saved(&self, target: &MemoryTarget, req: &SuspendRequest) -> Result<SuspendOutcome> {
        let done = |dump_bytes, dump_checksum| SuspendOutcome {
            dump_bytes,
            dump_checksum,
            duration_ms: 0,
            saved_earlier: true,
        };
        if let Ok(md) = super::run::read_memory_metadata(&target.meta, target.meta_capacity).await {
            if md.vm_id == req.vm_id && md.snapshot_id == req.snapshot_id {
                return Ok(done(md.dump.dump_bytes, md.dump.checksum));
            }
        }
        // A complete save image whose owner is this VM, under the
        // in-progress mark of this very request: libvirt finished it.
        let marked = metadata::in_progress_mark(&target.meta.path, target.meta_capacity)
            .ok()
            .flatten()
            .is_some_and(|(vm, snapshot)| vm == req.vm_id && snapshot == req.snapshot_id);
        if marked && !self.inner.simulated {
            if let Ok(xml) = self
                .inner
                .hv
                .saved_xml(target.dump.path.display().to_string())
                .await
            {
                if crate::xml::domain_name(&xml).ok() == Some(self.domain_name(req.vm_id)) {
                    tracing::warn!(vm = %req.vm_id, "a save finished for an earlier agent process: recording it");
                    let (bytes, checksum) = self.record_saved(target, req, None, None).await?;
                    return Ok(done(bytes, checksum));
                }
            }
        }
        Err(SnapshotError::VmNotRunning(req.vm_id).into())
    }

    /// Checksums the dump and writes the metadata: the memory is usable.
    async fn record_saved(
        &self,
        target: &MemoryTarget,
        req: &SuspendRequest,
        followed: Option<Followed>,
        simulated_xml: Option<String>,
    ) -> Result<(u64, Checksum)> {
        let (path, capacity) = (target.dump.path.clone(), target.dump_capacity);
        let digest = tokio::task::spawn_blocking(move || {
            metadata::digest_dump(&path, capacity, followed.as_ref(), None)
        })
        .await
        .map_err(|e| HostError::Internal(e.to_string()))?
        .map_err(|e| HostError::io("checksumming the memory dump", e))?;
        if digest.len > capacity {
            return Err(SnapshotError::DumpTooLarge {
                volume: req.memory.dump,
                capacity,
            }
            .into());
        }
        let dump_bytes = match target.dump.kind {
            DiskKind::File => digest.len,
            DiskKind::Block => digest.data_end,
        };
        let domain_xml = match simulated_xml {
            Some(x) => x,
            None => {
                self.inner
                    .hv
                    .saved_xml(target.dump.path.display().to_string())
                    .await?
            }
        };
        let md = MemoryMetadata {
            format: metadata::FORMAT.into(),
            version: metadata::VERSION,
            vm_id: req.vm_id,
            snapshot_id: req.snapshot_id,
            created_at: chrono_now(),
            mode: SnapshotMode::Paused,
            disks: req
                .disks
                .iter()
                .map(|d| DiskRecord {
                    current: *d,
                    overlay: *d,
                })
                .collect(),
            dump: DumpRecord {
                volume: req.memory.dump,
                capacity,
                dump_bytes,
                checksum: digest.checksum,
            },
            domain_xml,
        };
        let bytes = md
            .encode(target.meta_capacity)
            .ok_or(SnapshotError::MetadataTooLarge {
                size: md.encoded_len(),
                capacity: target.meta_capacity,
            })?;
        let meta_path = target.meta.path.clone();
        tokio::task::spawn_blocking(move || metadata::write_volume(&meta_path, &bytes))
            .await
            .map_err(|e| HostError::Internal(e.to_string()))?
            .map_err(|e| HostError::io("writing the memory metadata", e))?;
        Ok((dump_bytes, digest.checksum))
    }

    /// Restores the guest from a save image that could not be recorded, on
    /// the definition it was saved with (its disks still prepared).
    async fn resume_from_unrecorded(&self, target: &MemoryTarget, vm_id: Uuid) -> Result<()> {
        if self.inner.simulated {
            return Err(HostError::Internal("a simulated host cannot restore".into()));
        }
        let path = target.dump.path.display().to_string();
        let xml = self.inner.hv.saved_xml(path.clone()).await?;
        tracing::warn!(vm = %vm_id, "resuming the guest from its unrecorded memory");
        self.inner.hv.restore(path, xml, false, snapshot_timeout(0)).await
    }

    async fn teardown_pair(&self, m: &MemoryVolumes) {
        self.inner.volumes.teardown_all(&[m.dump, m.metadata]).await;
    }
}

fn list(refs: &[VolumeRef]) -> String {
    let v: Vec<String> = refs.iter().map(|r| r.to_string()).collect();
    format!("[{}]", v.join(", "))
}
