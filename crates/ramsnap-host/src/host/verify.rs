//! Checking a memory volume pair where it is now (after an export or an
//! import copied it), and rebinding its metadata to the volumes' new place:
//! the HostService's VerifyMemory.
//!
//! The checks are the restore's (RunVm with `restore_memory`), on storage
//! alone: the metadata is a version this host reads and belongs to the VM,
//! the dump's checksum matches the metadata's (and the caller's, when given),
//! computed here or, after a copy, by the storage service from the bytes it
//! wrote (`copied_checksum`).
//! Restore compares the disks' full volume refs, domain included, with
//! those the metadata records; a VM whose volumes moved to another domain
//! passes only once its metadata names them where they are now, which is
//! what the rebind writes. Nothing is written unless every check passed.
use super::run::{blocking_io, check_purpose, read_memory_metadata};
use super::Host;
use crate::error::{HostError, RestoreError, Result, SnapshotError};
use crate::metadata::{self, MemoryMetadata};
use crate::model::{Rebind, VerifiedMemory, VerifyMemoryRequest, VolumeRef};
use crate::volumes::Purpose;
use ramsnap_common::checksum::Checksum;
use std::time::Instant;

impl Host {
    /// Verifies the memory pair `req.memory` against `req.vm_id` and its
    /// dump's checksum; with a rebind, rewrites its metadata afterwards.
    ///
    /// Runs under the VM's operation lock: its run (restore), stop and
    /// snapshots are the only operations that open its memory volumes, so
    /// none of them reads or writes the pair meanwhile, and the volumes
    /// prepared here are not torn down under one of them. The VM need not
    /// run on this host (the usual case: an exported or imported VM that is
    /// down); a running VM's disks are never prepared nor torn down here.
    ///
    /// Runs to its end in a task of its own, so that a caller that goes
    /// away does not leave the volumes prepared (or the lock taken).
    pub async fn verify_memory(&self, req: VerifyMemoryRequest) -> Result<VerifiedMemory> {
        let host = self.clone();
        tokio::spawn(async move { host.verify_memory_to_end(req).await })
            .await
            .map_err(|e| HostError::Internal(format!("memory verification: {e}")))?
    }

    async fn verify_memory_to_end(&self, req: VerifyMemoryRequest) -> Result<VerifiedMemory> {
        let started = Instant::now();
        let (_vm, op) = self.lock_entry(req.vm_id).await;
        let mut prepared = Vec::new();
        let result = self.verify_prepared(&req, &mut prepared).await;
        if let Err(HostError::Restore(RestoreError::WrongVm { recorded, .. })) = &result {
            // The pair is another VM's: tear it down under that VM's lock
            // (after releasing this one: two crossed requests must not wait
            // for each other), so as not to pull it from under its restore
            // or snapshot.
            drop(op);
            let other = self.vm_entry(*recorded);
            let _other_op = other.op.lock().await;
            self.teardown_unless_held(&prepared).await;
        } else {
            self.teardown_unless_held(&prepared).await;
            drop(op);
        }
        let ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok(v) => tracing::info!(
                vm = %req.vm_id, dump = %req.memory.dump, checksum = %v.checksum, rebound = v.rebound, ms,
                "memory verified"
            ),
            Err(e) => {
                tracing::warn!(vm = %req.vm_id, dump = %req.memory.dump, error = %e, ms, "memory verification failed")
            }
        }
        result
    }

    async fn verify_prepared(
        &self,
        req: &VerifyMemoryRequest,
        prepared: &mut Vec<VolumeRef>,
    ) -> Result<VerifiedMemory> {
        let volumes = &self.inner.volumes;
        let memory = req.memory;
        // As restore does: a disk is never taken for a memory volume (nor
        // the dump for the metadata), so no disk of a running VM is touched.
        let dump_info = volumes.get(&memory.dump).await?;
        check_purpose(&dump_info, Purpose::MemoryDump)?;
        let meta_info = volumes.get(&memory.metadata).await?;
        check_purpose(&meta_info, Purpose::MemoryMetadata)?;

        let meta = volumes.prepare(&memory.metadata).await?;
        prepared.push(memory.metadata);
        if let Some(adopt) = &req.adopt_ovirt {
            self.adopt_ovirt(
                req,
                adopt,
                &meta,
                (meta_info.capacity, dump_info.capacity),
                prepared,
            )
            .await?;
        }
        if req.as_ovirt {
            if let Some(done) = self
                .ovirt_written(req, &meta, &meta_info, &dump_info, prepared)
                .await?
            {
                return Ok(done);
            }
        }
        let md = read_memory_metadata(&meta, meta_info.capacity).await?;
        // A pair given to the clone already (a retry after the metadata was
        // rewritten): verified as the clone's, nothing written again.
        let given = req.rebrand.filter(|to| md.vm_id == *to);
        if md.vm_id != req.vm_id && given.is_none() {
            return Err(RestoreError::WrongVm {
                recorded: md.vm_id,
                requested: req.vm_id,
            }
            .into());
        }
        let rebrand = req.rebrand.filter(|_| given.is_none());
        // Before the (long) checksum: a rebind that cannot apply fails now.
        let rebound = req
            .rebind
            .as_ref()
            .map(|how| rebind(&md, memory.dump, how))
            .transpose()?;

        // The copy's checksum stands for the dump's bytes when it covers
        // what the metadata's does (same algorithm, over the same capacity,
        // which is the volume's): the storage service computed it from the
        // bytes it wrote here, and a restore verifies the dump itself again.
        let copied = req
            .copied_checksum
            .filter(|c| c.algorithm == md.dump.checksum.algorithm && md.dump.capacity == dump_info.capacity);
        // Giving the pair to another VM: its header as it is now, and as
        // the VM it belongs to wrote it (they differ when an earlier attempt
        // wrote the header and stopped before the metadata).
        let heads = match rebrand {
            Some(to) => {
                let dump = volumes.prepare(&memory.dump).await?;
                prepared.push(memory.dump);
                let path = dump.path.clone();
                let head = blocking_io("reading the dump's save header".into(), move || {
                    metadata::read_save_head(&path)
                })
                .await?;
                let head = match head {
                    Some(head) => head,
                    // libvirt's test driver (a simulated host) writes no
                    // dump: only the metadata is given (an empty header
                    // is the original and the given one alike).
                    None if self.inner.simulated => Vec::new(),
                    None => {
                        return Err(RestoreError::NotGivable {
                            volume: memory.dump,
                            reason: "it is not a raw libvirt save image".into(),
                        }
                        .into())
                    }
                };
                let from = req.vm_id;
                let original = match metadata::head_owner(&head, from, to) {
                    _ if head.is_empty() => head.clone(),
                    Some(owner) if owner == from => head.clone(),
                    Some(_) => metadata::replace_id(&head, to, from),
                    None => {
                        return Err(RestoreError::NotGivable {
                            volume: memory.dump,
                            reason: format!("its save header names neither vm {from} nor vm {to}, or both"),
                        }
                        .into())
                    }
                };
                Some((dump.path, head, original))
            }
            None => None,
        };
        let actual = match (copied, &heads) {
            (Some(c), Some((_, head, original))) if head == original => c,
            (Some(c), None) => c,
            (_, Some((path, head, original))) if head != original => {
                let (path, recorded, original) = (path.clone(), md.dump.clone(), original.clone());
                blocking_io("checksumming the memory dump".into(), move || {
                    metadata::digest_with_head(&path, &recorded, &original)
                })
                .await?
            }
            _ => {
                let dump = volumes.prepare(&memory.dump).await?;
                if !prepared.contains(&memory.dump) {
                    prepared.push(memory.dump);
                }
                let (dump_path, recorded) = (dump.path.clone(), md.dump.clone());
                blocking_io("checksumming the memory dump".into(), move || {
                    metadata::digest_recorded(&dump_path, &recorded, false)
                })
                .await?
                .checksum
            }
        };
        let corrupt = |expected: &Checksum| RestoreError::DumpCorrupt {
            volume: memory.dump,
            expected: expected.to_string(),
            actual: actual.to_string(),
        };
        if actual != md.dump.checksum {
            return Err(corrupt(&md.dump.checksum).into());
        }
        // The value an export recorded was computed from this metadata's
        // algorithm: another algorithm cannot match.
        if let Some(expected) = &req.expected_checksum {
            if actual != *expected {
                return Err(corrupt(expected).into());
            }
        }

        // Given to the other VM: the header written (unless it was), then
        // the dump's new checksum, which the rewritten metadata records.
        let rebound = match (rebrand, heads) {
            (Some(to), Some((path, head, original))) => {
                let given_head = metadata::replace_id(&original, req.vm_id, to);
                let recorded = md.dump.clone();
                let checksum = blocking_io("giving the dump to the clone".into(), move || {
                    if head != given_head {
                        metadata::write_head(&path, &given_head)?;
                    }
                    metadata::digest_recorded(&path, &recorded, false).map(|d| d.checksum)
                })
                .await?;
                let mut new = rebound.unwrap_or_else(|| md.clone());
                new.version = metadata::VERSION;
                new.vm_id = to;
                new.dump.checksum = checksum;
                let xml = metadata::replace_id(new.domain_xml.as_bytes(), req.vm_id, to);
                new.domain_xml = String::from_utf8(xml).expect("an id replaced by another in UTF-8 text");
                Some(new)
            }
            _ => rebound,
        };
        let (md, rebound) = match rebound {
            None => (md, false),
            Some(new) => {
                let bytes = new
                    .encode(meta_info.capacity)
                    .ok_or(SnapshotError::MetadataTooLarge {
                        size: new.encoded_len(),
                        capacity: meta_info.capacity,
                    })?;
                let path = meta.path.clone();
                blocking_io("rewriting the memory metadata".into(), move || {
                    metadata::write_volume(&path, &bytes)
                })
                .await?;
                let back = read_memory_metadata(&meta, meta_info.capacity).await?;
                if back != new {
                    return Err(HostError::Internal(format!(
                        "the memory metadata on {} reads back other than it was rewritten",
                        memory.metadata
                    )));
                }
                (new, true)
            }
        };
        tracing::debug!(vm = %req.vm_id, dump = %memory.dump, read = copied.is_none(), "dump checksum");
        if req.as_ovirt {
            self.write_ovirt_pickle(req, &md, &meta, meta_info.capacity, prepared)
                .await?;
        }
        Ok(VerifiedMemory {
            // The dump's checksum now (a given dump's changed with its header).
            checksum: md.dump.checksum,
            dump_bytes: md.dump.dump_bytes,
            capacity: md.dump.capacity,
            snapshot_id: md.snapshot_id,
            created_at: md.created_at,
            rebound,
            disks: md.disks.iter().map(|d| d.current).collect(),
        })
    }

    /// Tears down what was prepared (last first), except a volume that a
    /// VM running here holds as one of its disks: a teardown is not
    /// reference-counted.
    pub(super) async fn teardown_unless_held(&self, prepared: &[VolumeRef]) {
        let held = self.held_by_running();
        let refs: Vec<VolumeRef> = prepared.iter().copied().filter(|r| !held.contains(r)).collect();
        self.inner.volumes.teardown_all(&refs).await;
    }

    /// Every volume a VM running on this host has prepared.
    fn held_by_running(&self) -> Vec<VolumeRef> {
        let vms: Vec<_> = self
            .inner
            .vms
            .lock()
            .expect("vm table")
            .values()
            .cloned()
            .collect();
        vms.iter()
            .filter_map(|vm| vm.running())
            .flat_map(|r| r.disks.into_iter().flat_map(|d| d.prepared))
            .collect()
    }
}

/// The metadata `md` bound to where the pair and the VM's disks are now:
/// the dump is `dump`; the disks move as `how` says. Pure: the caller
/// writes the result.
pub(crate) fn rebind(
    md: &MemoryMetadata,
    dump: VolumeRef,
    how: &Rebind,
) -> Result<MemoryMetadata, RestoreError> {
    let mut out = md.clone();
    out.dump.volume = dump;
    // Written in today's layout (the checksum under `checksum`), whatever
    // version it was read from.
    out.version = metadata::VERSION;
    match how {
        Rebind::DiskDomain(domain) => {
            let moved = |r: VolumeRef| VolumeRef { domain: *domain, ..r };
            for d in &mut out.disks {
                d.current = moved(d.current);
                d.overlay = moved(d.overlay);
            }
        }
        Rebind::Disks(volumes) => {
            if volumes.len() != md.disks.len() {
                return Err(RestoreError::DisksMismatch {
                    reason: format!(
                        "the memory was saved with {} disks, rebind_disks names {}",
                        md.disks.len(),
                        volumes.len()
                    ),
                });
            }
            for (d, v) in out.disks.iter_mut().zip(volumes) {
                d.current = *v;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{DiskRecord, DumpRecord};
    use crate::model::SnapshotMode;
    use uuid::Uuid;

    /// The ids a mode-1 rebind never changes.
    fn ids(r: VolumeRef) -> (Uuid, Uuid) {
        (r.image, r.volume)
    }

    fn vref() -> VolumeRef {
        VolumeRef {
            domain: Uuid::new_v4(),
            image: Uuid::new_v4(),
            volume: Uuid::new_v4(),
        }
    }

    fn sample(disks: usize) -> MemoryMetadata {
        let domain = Uuid::new_v4();
        let on = |r: VolumeRef| VolumeRef { domain, ..r };
        MemoryMetadata {
            format: metadata::FORMAT.into(),
            version: metadata::VERSION,
            vm_id: Uuid::new_v4(),
            snapshot_id: Uuid::new_v4(),
            created_at: 1_700_000_000,
            mode: SnapshotMode::Live,
            disks: (0..disks)
                .map(|_| {
                    let current = on(vref());
                    DiskRecord {
                        current,
                        overlay: VolumeRef {
                            volume: Uuid::new_v4(),
                            ..current
                        },
                    }
                })
                .collect(),
            dump: DumpRecord {
                volume: vref(),
                capacity: 1 << 20,
                dump_bytes: 1000,
                checksum: format!("blake3-4m:{}", "ab".repeat(32)).parse().unwrap(),
            },
            domain_xml: "<domain/>".into(),
        }
    }

    #[test]
    fn mode_1_moves_every_disk_reference_to_the_domain_and_keeps_the_ids() {
        let md = sample(2);
        let dump = vref();
        let domain = Uuid::new_v4();
        let out = rebind(&md, dump, &Rebind::DiskDomain(domain)).unwrap();
        assert_eq!(out.dump.volume, dump);
        assert_eq!(out.disks.len(), 2);
        for (new, old) in out.disks.iter().zip(&md.disks) {
            assert_eq!(new.current.domain, domain);
            assert_eq!(new.overlay.domain, domain);
            assert_eq!(ids(new.current), ids(old.current));
            assert_eq!(ids(new.overlay), ids(old.overlay));
        }
        // Nothing else changes: the checksum, the ids, the saved XML.
        let strip = |m: &MemoryMetadata| MemoryMetadata {
            disks: vec![],
            dump: DumpRecord {
                volume: dump,
                ..m.dump.clone()
            },
            ..m.clone()
        };
        assert_eq!(strip(&out), strip(&md));
        // It still encodes into the same space (ids have one length).
        assert_eq!(out.encoded_len(), md.encoded_len());
    }

    #[test]
    fn mode_2_binds_each_disk_to_its_volume_and_keeps_the_overlays() {
        let md = sample(2);
        let dump = vref();
        let new = vec![vref(), vref()];
        let out = rebind(&md, dump, &Rebind::Disks(new.clone())).unwrap();
        assert_eq!(out.dump.volume, dump);
        assert_eq!(out.disks[0].current, new[0]);
        assert_eq!(out.disks[1].current, new[1]);
        assert_eq!(out.disks[0].overlay, md.disks[0].overlay);
        assert_eq!(out.disks[1].overlay, md.disks[1].overlay);
        assert_eq!(out.dump.checksum, md.dump.checksum);
    }

    #[test]
    fn mode_2_needs_one_volume_per_disk() {
        let md = sample(2);
        for n in [0, 1, 3] {
            let volumes = (0..n).map(|_| vref()).collect();
            match rebind(&md, vref(), &Rebind::Disks(volumes)) {
                Err(RestoreError::DisksMismatch { reason }) => {
                    assert!(reason.contains("2 disks"), "{reason}")
                }
                other => panic!("{n} volumes for 2 disks: {other:?}"),
            }
        }
        // No disks at all: mode 1 and an empty mode 2 are fine.
        let none = sample(0);
        assert!(rebind(&none, vref(), &Rebind::Disks(vec![])).is_ok());
        assert!(rebind(&none, vref(), &Rebind::DiskDomain(Uuid::new_v4())).is_ok());
    }

    #[test]
    fn a_rebound_document_passes_the_restore_check_on_the_new_domain() {
        use crate::model::{VmSpec, MIB};
        let md = sample(1);
        let domain = Uuid::new_v4();
        let out = rebind(&md, vref(), &Rebind::DiskDomain(domain)).unwrap();
        let frozen = out.disks[0].current;
        let spec = VmSpec {
            vm_id: md.vm_id,
            name: "vm".into(),
            memory_bytes: 256 * MIB,
            vcpus: 1,
            // A preview leaf over the frozen volume, on the new domain.
            disks: vec![VolumeRef {
                volume: Uuid::new_v4(),
                ..frozen
            }],
            kernel: None,
            initrd: None,
            cmdline: String::new(),
        };
        let chains = [vec![frozen.volume]];
        assert!(super::super::run::verify_against_spec(&out, &spec, &chains).is_ok());
        // The original document, naming the old domain, does not pass.
        assert!(super::super::run::verify_against_spec(&md, &spec, &chains).is_err());
    }
}
