//! Live merge (oVirt 3.6's, VDSM's `merge` verb): a volume of a running
//! VM's disk chain committed into its parent with libvirt's block commit,
//! the guest running throughout. When the volume is the disk's leaf, an
//! active commit pivots the guest onto the parent; otherwise the volume
//! above it is rebased onto the parent by libvirt (relative name). The
//! storage service records the new chain afterwards
//! (StorageService.DropCommittedVolume); this verb only changes what the
//! running guest reads, which stays the same content throughout.
use super::{Host, RunningDisk};
use crate::error::{HostError, Result, SnapshotError};
use crate::model::VolumeRef;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const MERGE_TIMEOUT: Duration = Duration::from_secs(1800);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    /// `top` was the disk's leaf: the guest now runs on `base`.
    pub was_leaf: bool,
    /// An earlier call had merged it already.
    pub done_earlier: bool,
    pub duration_ms: u64,
    /// Bytes libvirt reported for the job (0 for a job done earlier).
    pub bytes: u64,
}

/// Whether a chain path names that volume (the file or link is named by
/// the volume id, in every domain's layout).
fn names(path: &str, volume: &VolumeRef) -> bool {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == volume.volume.to_string())
}

impl Host {
    /// Commits `top` into `base` (its parent) in the running VM's chain;
    /// see the module.
    pub async fn commit_volume(&self, vm_id: Uuid, top: VolumeRef, base: VolumeRef) -> Result<CommitOutcome> {
        let started = Instant::now();
        if top.domain != base.domain || top.image != base.image || top.volume == base.volume {
            return Err(HostError::InvalidArgument {
                field: "base".into(),
                reason: "must be another volume of top's image".into(),
            });
        }
        let vm = self.vm(vm_id).ok_or(HostError::VmNotFound(vm_id))?;
        let _op = vm
            .op
            .clone()
            .try_lock_owned()
            .map_err(|_| SnapshotError::VmBusy(vm_id))?;
        let running = vm.running().ok_or(SnapshotError::VmNotRunning(vm_id))?;
        // A block job an earlier agent process began ends first (a retry
        // after that process died finds the merge done, or not begun).
        for d in &running.disks {
            self.inner
                .hv
                .settle_block_job(vm_id, d.dev.clone(), MERGE_TIMEOUT)
                .await?;
        }
        let xml = self.inner.hv.live_xml(vm_id).await?;
        let chains = crate::xml::disk_chains(&xml).map_err(|e| HostError::Internal(e.to_string()))?;
        let Some(i) = running
            .disks
            .iter()
            .position(|d| d.leaf.image == top.image && d.leaf.domain == top.domain)
        else {
            return Err(HostError::NotInChain(format!(
                "no running disk of vm {vm_id} is in image {} of domain {}",
                top.image, top.domain
            )));
        };
        let disk: RunningDisk = running.disks[i].clone();
        let chain = chains
            .iter()
            .find(|(dev, _)| *dev == disk.dev)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| HostError::Internal(format!("the live XML has no disk {}", disk.dev)))?;
        let at = |v: &VolumeRef| chain.iter().position(|p| names(p, v));
        let done = |bytes| CommitOutcome {
            was_leaf: false,
            done_earlier: true,
            duration_ms: 0,
            bytes,
        };
        let (top_at, base_at) = match (at(&top), at(&base)) {
            (Some(t), Some(b)) if b == t + 1 => (t, b),
            // Merged before: top left the chain, base is in it.
            (None, Some(_)) => {
                let mut out = done(0);
                out.was_leaf = disk.leaf == top || disk.leaf == base;
                self.drop_from_record(&vm, i, top, base).await?;
                return Ok(out);
            }
            _ => {
                return Err(HostError::NotInChain(format!(
                    "disk {}: {} is not the volume right above {} in the chain it runs on",
                    disk.dev, top, base
                )))
            }
        };
        let bytes = Arc::new(AtomicU64::new(0));
        if top_at == 0 {
            // The leaf: active commit, then the guest runs on base.
            self.inner
                .hv
                .commit_active_layer(vm_id, disk.dev.clone(), MERGE_TIMEOUT)
                .await?;
        } else {
            let seen = bytes.clone();
            self.inner
                .hv
                .commit_layer(
                    vm_id,
                    disk.dev.clone(),
                    chain[top_at].clone(),
                    chain[base_at].clone(),
                    MERGE_TIMEOUT,
                    move |_, end| seen.store(end, Ordering::Relaxed),
                )
                .await?;
        }
        // libvirt's job is over: the chain must now skip top.
        let xml = self.inner.hv.live_xml(vm_id).await?;
        let chains = crate::xml::disk_chains(&xml).map_err(|e| HostError::Internal(e.to_string()))?;
        let now = chains
            .iter()
            .find(|(dev, _)| *dev == disk.dev)
            .map(|(_, c)| c.clone())
            .unwrap_or_default();
        if now.iter().any(|p| names(p, &top)) || !now.iter().any(|p| names(p, &base)) {
            return Err(HostError::Internal(format!(
                "libvirt's block commit of {top} into {base} ended, yet disk {} runs on {now:?}",
                disk.dev
            )));
        }
        self.drop_from_record(&vm, i, top, base).await?;
        tracing::info!(vm = %vm_id, top = %top, base = %base, leaf = top_at == 0,
            ms = started.elapsed().as_millis() as u64, "volume committed into its parent");
        Ok(CommitOutcome {
            was_leaf: top_at == 0,
            done_earlier: false,
            duration_ms: started.elapsed().as_millis() as u64,
            bytes: bytes.load(Ordering::Relaxed),
        })
    }

    /// After top left disk `i`'s chain: a leaf that was top is now base
    /// (prepared for the record, its own hold), and top is torn down if the
    /// VM had prepared it, so that the storage service can drop it.
    async fn drop_from_record(
        &self,
        vm: &Arc<super::Vm>,
        i: usize,
        top: VolumeRef,
        base: VolumeRef,
    ) -> Result<()> {
        let Some(mut r) = vm.running() else {
            return Ok(());
        };
        let volumes = &self.inner.volumes;
        let d = &mut r.disks[i];
        if d.leaf == top {
            let p = volumes.prepare(&base).await?;
            let live = self
                .live_disks(vm.id)
                .await?
                .into_iter()
                .find(|(dev, _)| *dev == d.dev)
                .map(|(_, path)| path);
            d.leaf = base;
            d.path = live.unwrap_or_else(|| p.path.display().to_string());
            d.kind = p.kind;
            if !d.prepared.contains(&base) {
                d.prepared.push(base);
            }
        }
        let had = d.prepared.contains(&top);
        d.prepared.retain(|v| *v != top);
        self.record(vm, r).await;
        if had {
            volumes.teardown_all(&[top]).await;
        }
        Ok(())
    }
}
