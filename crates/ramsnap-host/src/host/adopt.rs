//! Memory snapshots oVirt 3.3 made (see [`crate::ovirt`]): the
//! HostService's InspectOvirtMemory, which reads one where it is without
//! changing it, and VerifyMemory's adoption, which gives a copied one
//! ramsnap's metadata.
use super::run::blocking_io;
use super::Host;
use crate::error::{HostError, RestoreError, Result, SnapshotError};
use crate::metadata::{self, Algorithm, DiskRecord, DumpRecord, MemoryMetadata};
use crate::model::{
    MemoryVolumes, OvirtAdoption, SnapshotMode, VerifiedMemory, VerifyMemoryRequest, VolumeRef,
};
use crate::ovirt::{self, Pickled};
use crate::volumes::{Prepared, VolumeInfo};
use ramsnap_common::ovirt::pickle;
use uuid::Uuid;

/// The metadata volume's bytes a pickle may take.
const PICKLE_BYTES: u64 = pickle::MAX_BYTES as u64;

impl Host {
    /// Why the oVirt memory pair `memory` cannot become VM `vm_id`'s (with
    /// `disks` disks), or None when it can. Reads only. Under the VM's
    /// operation lock, like VerifyMemory, and to its end in a task of its
    /// own, so that the volumes it prepares are torn down.
    pub async fn inspect_ovirt_memory(
        &self,
        vm_id: Uuid,
        memory: MemoryVolumes,
        disks: usize,
    ) -> Result<Option<String>> {
        let host = self.clone();
        tokio::spawn(async move {
            let (_vm, _op) = host.lock_entry(vm_id).await;
            let mut prepared = Vec::new();
            let result = host.inspect_prepared(vm_id, memory, disks, &mut prepared).await;
            host.teardown_unless_held(&prepared).await;
            match &result {
                Ok(None) => tracing::info!(vm = %vm_id, dump = %memory.dump, "oVirt memory usable"),
                Ok(Some(why)) => {
                    tracing::info!(vm = %vm_id, dump = %memory.dump, why, "oVirt memory unusable")
                }
                Err(e) => {
                    tracing::warn!(vm = %vm_id, dump = %memory.dump, error = %e, "oVirt memory refused")
                }
            }
            result
        })
        .await
        .map_err(|e| HostError::Internal(format!("oVirt memory inspection: {e}")))?
    }

    async fn inspect_prepared(
        &self,
        vm_id: Uuid,
        memory: MemoryVolumes,
        disks: usize,
        prepared: &mut Vec<VolumeRef>,
    ) -> Result<Option<String>> {
        let volumes = &self.inner.volumes;
        let meta_info = volumes.get(&memory.metadata).await?;
        volumes.get(&memory.dump).await?;
        let meta = volumes.prepare(&memory.metadata).await?;
        prepared.push(memory.metadata);
        let domain_xml = match read_pickled(&meta, meta_info.capacity).await? {
            Pickled::Memory { domain_xml } => domain_xml,
            Pickled::Unknown(why) => return Ok(Some(why)),
        };
        let dump = volumes.prepare(&memory.dump).await?;
        prepared.push(memory.dump);
        header_unfit(&dump, vm_id, disks, &domain_xml).await
    }

    /// VerifyMemory's first step with `adopt_ovirt`: unless the metadata
    /// volume holds ramsnap's metadata already (a retry), the pickle VDSM
    /// wrote is checked as InspectOvirtMemory checks it and replaced with
    /// ramsnap's metadata, which records the dump's checksum.
    pub(super) async fn adopt_ovirt(
        &self,
        req: &VerifyMemoryRequest,
        adopt: &OvirtAdoption,
        meta: &Prepared,
        (meta_capacity, dump_capacity): (u64, u64),
        prepared: &mut Vec<VolumeRef>,
    ) -> Result<()> {
        let memory = req.memory;
        let path = meta.path.clone();
        let bytes = blocking_io("reading the memory metadata".into(), move || {
            metadata::read_volume(&path, meta_capacity)
        })
        .await?;
        if MemoryMetadata::decode(&bytes).is_ok() {
            return Ok(());
        }
        let domain_xml = match ovirt::read_pickle(&bytes[..bytes.len().min(PICKLE_BYTES as usize)]) {
            Ok(Pickled::Memory { domain_xml }) => domain_xml,
            Ok(Pickled::Unknown(reason)) => {
                return Err(RestoreError::MetadataInvalid {
                    volume: memory.metadata,
                    reason,
                }
                .into())
            }
            Err(reason) => {
                return Err(RestoreError::OvirtMemoryRefused {
                    volume: memory.metadata,
                    reason,
                }
                .into())
            }
        };
        let dump = self.inner.volumes.prepare(&memory.dump).await?;
        if !prepared.contains(&memory.dump) {
            prepared.push(memory.dump);
        }
        if let Some(reason) = header_unfit(&dump, req.vm_id, adopt.disks.len(), &domain_xml).await? {
            return Err(RestoreError::DisksMismatch { reason }.into());
        }
        let checksum = match req.copied_checksum.filter(|c| c.algorithm == Algorithm::CURRENT) {
            Some(c) => c,
            None => {
                let path = dump.path.clone();
                blocking_io("checksumming the memory dump".into(), move || {
                    metadata::digest(&path, dump_capacity)
                })
                .await?
                .checksum
            }
        };
        let md = MemoryMetadata {
            format: metadata::FORMAT.to_string(),
            version: metadata::VERSION,
            vm_id: req.vm_id,
            snapshot_id: adopt.snapshot_id,
            created_at: adopt.created_at,
            // VDSM 3.3 saved memory with libvirt's live flag.
            mode: SnapshotMode::Live,
            disks: adopt
                .disks
                .iter()
                .map(|(current, overlay)| DiskRecord {
                    current: *current,
                    overlay: *overlay,
                })
                .collect(),
            dump: DumpRecord {
                volume: memory.dump,
                capacity: dump_capacity,
                // Unknown: the checksum covers the whole capacity.
                dump_bytes: 0,
                checksum,
            },
            domain_xml,
        };
        // oVirt's metadata volume is small (10 KiB): the domain XML is kept
        // when it fits (a restore reads the dump's own header, not it).
        let bytes = match md.encode(meta_capacity) {
            Some(b) => b,
            None => {
                let slim = MemoryMetadata {
                    domain_xml: String::new(),
                    ..md.clone()
                };
                slim.encode(meta_capacity)
                    .ok_or(SnapshotError::MetadataTooLarge {
                        size: slim.encoded_len(),
                        capacity: meta_capacity,
                    })?
            }
        };
        let path = meta.path.clone();
        blocking_io("writing the adopted memory metadata".into(), move || {
            metadata::write_volume(&path, &bytes)
        })
        .await?;
        tracing::info!(vm = %req.vm_id, dump = %memory.dump, checksum = %md.dump.checksum, "oVirt memory adopted");
        Ok(())
    }
}

impl Host {
    /// VerifyMemory with `as_ovirt`, retried after the pickle was written:
    /// the metadata is VDSM's already; the answer is the dump's checksum,
    /// computed again. None: it is not (yet) written.
    pub(super) async fn ovirt_written(
        &self,
        req: &VerifyMemoryRequest,
        meta: &Prepared,
        meta_info: &VolumeInfo,
        dump_info: &VolumeInfo,
        prepared: &mut Vec<VolumeRef>,
    ) -> Result<Option<VerifiedMemory>> {
        let path = meta.path.clone();
        let capacity = meta_info.capacity;
        let bytes = blocking_io("reading the memory metadata".into(), move || {
            metadata::read_volume(&path, capacity)
        })
        .await?;
        if MemoryMetadata::decode(&bytes).is_ok() {
            return Ok(None);
        }
        if !matches!(
            ovirt::read_pickle(&bytes[..bytes.len().min(PICKLE_BYTES as usize)]),
            Ok(Pickled::Memory { .. })
        ) {
            return Ok(None);
        }
        let memory = req.memory;
        let dump = self.inner.volumes.prepare(&memory.dump).await?;
        if !prepared.contains(&memory.dump) {
            prepared.push(memory.dump);
        }
        let (path, capacity) = (dump.path.clone(), dump_info.capacity);
        let d = blocking_io("checksumming the memory dump".into(), move || {
            metadata::digest(&path, capacity)
        })
        .await?;
        Ok(Some(VerifiedMemory {
            checksum: d.checksum,
            dump_bytes: 0,
            capacity,
            snapshot_id: Uuid::nil(),
            created_at: 0,
            rebound: true,
            disks: Vec::new(),
        }))
    }

    /// Writes the metadata volume as oVirt 3.3 keeps it: VDSM's pickle of
    /// the domain XML the guest ran with (the metadata's, else the dump's
    /// save header's).
    pub(super) async fn write_ovirt_pickle(
        &self,
        req: &VerifyMemoryRequest,
        md: &MemoryMetadata,
        meta: &Prepared,
        meta_capacity: u64,
        prepared: &mut Vec<VolumeRef>,
    ) -> Result<()> {
        let xml = if md.domain_xml.is_empty() {
            let dump = self.inner.volumes.prepare(&req.memory.dump).await?;
            if !prepared.contains(&req.memory.dump) {
                prepared.push(req.memory.dump);
            }
            let path = dump.path.clone();
            let head = blocking_io("reading the dump's save header".into(), move || {
                metadata::read_save_head(&path)
            })
            .await?;
            head.as_deref().and_then(ovirt::header_xml).unwrap_or_default()
        } else {
            md.domain_xml.clone()
        };
        let mut bytes = pickle::write_vdsm_memory(&xml);
        if bytes.len() as u64 >= meta_capacity {
            return Err(SnapshotError::MetadataTooLarge {
                size: bytes.len(),
                capacity: meta_capacity,
            }
            .into());
        }
        bytes.resize(meta_capacity.min(metadata::MAX_DOCUMENT) as usize, 0);
        let path = meta.path.clone();
        blocking_io(
            "writing the memory metadata as oVirt keeps it".into(),
            move || metadata::write_volume(&path, &bytes),
        )
        .await?;
        tracing::info!(vm = %req.vm_id, dump = %req.memory.dump, "memory metadata written as oVirt's");
        Ok(())
    }
}

async fn read_pickled(meta: &Prepared, capacity: u64) -> Result<Pickled> {
    let path = meta.path.clone();
    let bytes = blocking_io("reading the oVirt memory metadata".into(), move || {
        metadata::read_volume(&path, capacity.min(PICKLE_BYTES))
    })
    .await?;
    ovirt::read_pickle(&bytes).map_err(|reason| {
        RestoreError::OvirtMemoryRefused {
            volume: meta.r,
            reason,
        }
        .into()
    })
}

/// Why the dump's saved guest does not fit (see [`ovirt::unfit`]).
async fn header_unfit(
    dump: &Prepared,
    vm_id: Uuid,
    disks: usize,
    pickled_xml: &str,
) -> Result<Option<String>> {
    let path = dump.path.clone();
    let head = blocking_io("reading the dump's save header".into(), move || {
        metadata::read_save_head(&path)
    })
    .await?;
    let Some(head) = head else {
        return Ok(Some("its dump is not a raw libvirt save image".into()));
    };
    let Some(xml) = ovirt::header_xml(&head) else {
        return Ok(Some("its dump's save header holds no domain XML".into()));
    };
    Ok(ovirt::unfit(vm_id, disks, &xml, pickled_xml))
}
