//! Running a VM: a cold boot, or a restore of its memory (oVirt 3.3's "run
//! a VM whose active snapshot has memory": VDSM's restoreState path).
use super::{prepare_console_log, Host, Running, RunningDisk, Vm, RUNNING_VERSION};
use crate::error::{HostError, RestoreError, Result, RunError};
use crate::metadata::{self, DecodeError, MemoryMetadata};
use crate::model::{disk_dev, MemoryVolumes, VmSpec, VmStatus, MIB};
use crate::volumes::{Prepared, Purpose, VolumeInfo};
use crate::xml::{self, DiskSource, DomainDef, RestoreRewrite};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Creating a domain (QEMU start) should take seconds.
const CREATE_TIMEOUT: Duration = Duration::from_secs(120);

/// Loading a memory image: generous, at 20 MB/s for the RAM.
fn restore_timeout(memory: u64) -> Duration {
    Duration::from_secs(120 + memory / (20 * MIB))
}

pub(super) async fn blocking_io<T: Send + 'static>(
    what: String,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HostError::Internal(e.to_string()))?
        .map_err(|e| HostError::io(what, e))
}

pub(crate) fn check_purpose(info: &VolumeInfo, expected: Purpose) -> Result<()> {
    if info.purpose != expected {
        return Err(RunError::WrongPurpose {
            volume: info.r,
            expected: expected.name(),
            actual: info.purpose.name().to_string(),
        }
        .into());
    }
    Ok(())
}

/// Reads and decodes the memory metadata document on a prepared metadata
/// volume of `capacity` bytes: MEMORY_METADATA_INVALID when it is no such
/// document, MEMORY_METADATA_VERSION when it is newer than this host reads.
pub(super) async fn read_memory_metadata(meta: &Prepared, capacity: u64) -> Result<MemoryMetadata> {
    let meta_path = meta.path.clone();
    let bytes = blocking_io("reading the memory metadata".into(), move || {
        metadata::read_volume(&meta_path, capacity)
    })
    .await?;
    let md = MemoryMetadata::decode(&bytes).map_err(|e| match e {
        DecodeError::Version(v) => RestoreError::MetadataVersion {
            volume: meta.r,
            version: v,
            supported: metadata::VERSION,
        },
        DecodeError::Invalid(reason) => RestoreError::MetadataInvalid {
            volume: meta.r,
            reason,
        },
    })?;
    Ok(md)
}

fn path_string(p: &Path) -> Result<String> {
    xml::path_str(p)
        .map(str::to_string)
        .map_err(|e| HostError::Internal(e.to_string()))
}

impl Host {
    /// Starts the VM: boots it, or with `restore` resumes it from that
    /// memory. Returns the status reached (POWERING_UP after a boot, UP
    /// after a restore).
    pub async fn run(&self, spec: VmSpec, restore: Option<MemoryVolumes>) -> Result<VmStatus> {
        let (vm, _op) = self.lock_entry(spec.vm_id).await;
        if self.inner.hv.state(spec.vm_id).await?.is_some() {
            // A domain this agent has no record of may be a restore that an
            // earlier agent process left (libvirt created it after this
            // process had looked at start): destroyed if the guest never
            // resumed, and then run again here.
            let destroyed = vm.running().is_none() && self.settle_unrecorded_restore(&vm).await?;
            if !destroyed {
                return Err(RunError::AlreadyRunning(spec.vm_id).into());
            }
        }
        // A record left by a VM that went down between two monitor rounds.
        if vm.running().is_some() {
            self.release(&vm).await;
        }
        let kernel = self.boot_image(spec.kernel.as_ref().map(|k| k.as_str()))?;
        let initrd = self.boot_image(spec.initrd.as_ref().map(|k| k.as_str()))?;

        let mut prepared: Vec<Prepared> = Vec::new();
        let result = self
            .run_prepared(&vm, &spec, restore, kernel, initrd, &mut prepared)
            .await;
        if result.is_err() {
            let refs: Vec<_> = prepared.iter().map(|p| p.r).collect();
            self.inner.volumes.teardown_all(&refs).await;
            vm.running.lock().expect("vm lock").take();
            vm.set_status(VmStatus::Down);
        }
        result
    }

    fn boot_image(&self, name: Option<&str>) -> Result<Option<PathBuf>> {
        let Some(name) = name else { return Ok(None) };
        let path = self.boot_path(name);
        // The test driver reads no kernel: a simulated host needs no images.
        if !self.inner.simulated && !path.is_file() {
            return Err(RunError::BootImageMissing(name.to_string()).into());
        }
        Ok(Some(path))
    }

    async fn run_prepared(
        &self,
        vm: &Arc<Vm>,
        spec: &VmSpec,
        restore: Option<MemoryVolumes>,
        kernel: Option<PathBuf>,
        initrd: Option<PathBuf>,
        prepared: &mut Vec<Prepared>,
    ) -> Result<VmStatus> {
        let volumes = &self.inner.volumes;
        let mut infos = Vec::new();
        let mut disks = Vec::new();
        for (i, leaf) in spec.disks.iter().enumerate() {
            let info = volumes.get(leaf).await?;
            check_purpose(&info, Purpose::Disk)?;
            let p = volumes.prepare(leaf).await?;
            prepared.push(p.clone());
            disks.push(RunningDisk {
                dev: disk_dev(i),
                leaf: *leaf,
                path: path_string(&p.path)?,
                kind: p.kind,
                format: info.format,
                prepared: vec![*leaf],
            });
            infos.push(info);
        }
        let console_log = self.console_log(spec.vm_id);
        let log = console_log.clone();
        let log_start = blocking_io(format!("console log {}", log.display()), move || {
            prepare_console_log(&log)
        })
        .await?;
        let mut running = Running {
            version: RUNNING_VERSION,
            host_id: self.inner.host_id.clone(),
            domain_name: self.domain_name(spec.vm_id),
            spec: spec.clone(),
            disks,
            console_log,
            restoring: None,
        };
        let kernel = kernel.as_deref().map(path_string).transpose()?;
        let initrd = initrd.as_deref().map(path_string).transpose()?;

        match restore {
            None => {
                let console = path_string(&running.console_log)?;
                let sources = sources(&running);
                let element = running.metadata_element();
                let def = DomainDef {
                    virt_type: &self.inner.virt_type,
                    name: &running.domain_name,
                    uuid: spec.vm_id,
                    memory_bytes: spec.memory_bytes,
                    vcpus: spec.vcpus,
                    kernel: kernel.as_deref(),
                    initrd: initrd.as_deref(),
                    cmdline: &spec.cmdline,
                    disks: &sources,
                    console_log: (!self.inner.simulated).then_some(console.as_str()),
                    metadata: &element,
                };
                self.inner.hv.create(def.to_xml(), CREATE_TIMEOUT).await?;
                let generation = vm.generation.fetch_add(1, Ordering::SeqCst) + 1;
                *vm.running.lock().expect("vm lock") = Some(running.clone());
                vm.set_status(VmStatus::PoweringUp);
                if self.inner.simulated {
                    // No guest to show life: up at once.
                    vm.set_status(VmStatus::Up);
                    return Ok(VmStatus::Up);
                }
                tokio::spawn(watch_boot(
                    vm.clone(),
                    generation,
                    running.console_log.clone(),
                    log_start,
                    self.inner.config.boot_grace,
                ));
                Ok(VmStatus::PoweringUp)
            }
            Some(memory) => {
                vm.set_status(VmStatus::RestoringState);
                let mut memory_prepared = Vec::new();
                let r = self
                    .restore_memory(
                        spec,
                        &infos,
                        &memory,
                        &mut running,
                        kernel,
                        initrd,
                        &mut memory_prepared,
                    )
                    .await;
                let refs: Vec<_> = memory_prepared.iter().map(|p: &Prepared| p.r).collect();
                volumes.teardown_all(&refs).await;
                r?;
                vm.generation.fetch_add(1, Ordering::SeqCst);
                *vm.running.lock().expect("vm lock") = Some(running);
                vm.set_status(VmStatus::Up);
                Ok(VmStatus::Up)
            }
        }
    }

    /// Verifies the memory volume against the VM (its id, its disks, the
    /// dump's checksum), then restores it with the saved domain XML
    /// rewritten for this host.
    ///
    /// The XML comes from the dump itself (`save_image_xml_desc`), not from
    /// the metadata volume: it is exactly the definition the memory was
    /// saved with, libvirt checks the replacement's ABI against it, and the
    /// checksum just verified covers it. The metadata volume's copy is for
    /// the engine (export, inspection).
    #[allow(clippy::too_many_arguments)]
    async fn restore_memory(
        &self,
        spec: &VmSpec,
        disk_infos: &[VolumeInfo],
        memory: &MemoryVolumes,
        running: &mut Running,
        kernel: Option<String>,
        initrd: Option<String>,
        prepared: &mut Vec<Prepared>,
    ) -> Result<()> {
        let volumes = &self.inner.volumes;
        let mut lap = super::Lap::new(spec.vm_id, "restore step");
        let step = std::time::Instant::now();
        // The two volumes side by side, as a snapshot's are: each call is
        // an LVM command or two on BLOCK, and the storage agent prepares
        // different images at once. Each is checked (its purpose) and
        // prepared in one call.
        let (meta, dump) = tokio::join!(
            volumes.prepare_of(&memory.metadata, Purpose::MemoryMetadata),
            volumes.prepare_of(&memory.dump, Purpose::MemoryDump)
        );
        // Whatever was prepared is recorded for the clean-up, also when
        // the other one failed.
        prepared.extend(meta.iter().chain(dump.iter()).map(|(p, _)| p.clone()));
        let ((meta, meta_info), (dump, _)) = (meta?, dump?);
        lap.done("prepare memory volumes");

        let md = read_memory_metadata(&meta, meta_info.capacity).await?;
        let mut chains = Vec::with_capacity(disk_infos.len());
        for info in disk_infos {
            chains.push(volumes.ancestors(info).await?);
        }
        verify_against_spec(&md, spec, &chains)?;
        lap.done("read and verify metadata");

        // The checksum and libvirt's restore run side by side; the restored
        // guest stays paused until the checksum matches, and is destroyed
        // if it does not: it never runs on memory that failed the check.
        // A BLOCK dump of this version is hashed behind QEMU's reading (see
        // follow_block_restore), what is left after the restore; any other
        // is read beside it, through the page cache.
        let hv = &self.inner.hv;
        let follow = !self.inner.simulated
            && dump.kind == crate::xml::DiskKind::Block
            && md.dump.checksum.algorithm == metadata::Algorithm::CURRENT;
        let stop_following = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _stop_following_on_drop = metadata::StopOnDrop(stop_following.clone());
        let follower = follow.then(|| {
            let (path, capacity, stop) = (dump.path.clone(), md.dump.capacity, stop_following.clone());
            tokio::task::spawn_blocking(move || metadata::follow_block_restore(&path, capacity, &stop))
        });
        let check = |followed: Option<metadata::Followed>| {
            let dump_file = dump.path.clone();
            let recorded = md.dump.clone();
            async move {
                let t = Instant::now();
                let hashed_before = followed.as_ref().map_or(0, |f| f.bytes());
                let d = blocking_io("checksumming the memory dump".into(), move || {
                    metadata::digest_recorded_after(&dump_file, &recorded, followed.as_ref())
                })
                .await;
                tracing::debug!(
                    vm = %spec.vm_id, ms = t.elapsed().as_millis() as u64,
                    mib_hashed_during_the_restore = hashed_before >> 20, "restore: checksum"
                );
                d
            }
        };
        let sources = sources(running);
        let console = path_string(&running.console_log)?;
        let dump_path = path_string(&dump.path)?;
        let mut record = running.clone();
        let start = async {
            let t = Instant::now();
            let saved = hv.saved_xml(dump_path.clone()).await?;
            // Before anything starts: this host can take the guest.
            if !self.inner.simulated {
                self.check_host_takes(&saved).await?;
            }
            // libvirt refuses a restore under another name: keep the saved one.
            record.domain_name = xml::domain_name(&saved).map_err(|e| HostError::Internal(e.to_string()))?;
            // Marked as restoring until resumed (see `Running::restoring`).
            let element = Running {
                restoring: Some(*memory),
                ..record.clone()
            }
            .metadata_element();
            let xml = xml::rewrite_for_restore(
                &saved,
                &RestoreRewrite {
                    disks: &sources,
                    console_log: &console,
                    kernel: kernel.as_deref(),
                    initrd: initrd.as_deref(),
                    metadata: &element,
                },
            )
            .map_err(|e| RestoreError::DisksMismatch {
                reason: e.to_string(),
            })?;
            if crate::failpoint::hit("restore_during_load") {
                let (host, id) = (self.clone(), spec.vm_id);
                tokio::spawn(async move {
                    while !matches!(host.inner.hv.state(id).await, Ok(Some(_))) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    eprintln!("host failpoint restore_during_load: exiting");
                    std::process::exit(86);
                });
            }
            let r = hv
                .restore(dump_path.clone(), xml, true, restore_timeout(spec.memory_bytes))
                .await;
            tracing::debug!(vm = %spec.vm_id, ms = t.elapsed().as_millis() as u64, "restore: libvirt restore (paused)");
            r
        };
        let (digest, started) = match follower {
            Some(follower) => {
                let started = start.await;
                stop_following.store(true, Ordering::Release);
                let followed = match follower.await {
                    Ok(Ok(f)) => Some(f),
                    Ok(Err(e)) => {
                        tracing::debug!(vm = %spec.vm_id, error = %e, "hashing the dump behind the restore failed; hashed after");
                        None
                    }
                    Err(_) => None,
                };
                (check(followed).await, started)
            }
            None => tokio::join!(check(None), start),
        };
        lap.done("checksum beside libvirt's restore");
        let corrupt = match &digest {
            Ok(d) => d.checksum != md.dump.checksum,
            Err(_) => true,
        };
        if corrupt {
            if started.is_ok() {
                if let Err(e) = hv.destroy(spec.vm_id).await {
                    tracing::error!(vm = %spec.vm_id, error = %e, "destroying a guest restored from a corrupt dump failed");
                }
            }
            let d = digest?;
            return Err(RestoreError::DumpCorrupt {
                volume: memory.dump,
                expected: md.dump.checksum.to_string(),
                actual: d.checksum.to_string(),
            }
            .into());
        }
        started?;
        if let Err(e) = hv.resume(spec.vm_id).await {
            let _ = hv.destroy(spec.vm_id).await;
            return Err(e);
        }
        if let Err(e) = hv.set_metadata(spec.vm_id, record.metadata_body()).await {
            tracing::warn!(vm = %spec.vm_id, error = %e, "clearing the restore mark failed");
        }
        lap.done("resume");
        ramsnap_common::metrics::record_restore(step.elapsed().as_secs_f64());
        *running = record;
        Ok(())
    }
}

impl Host {
    /// HOST_CANNOT_TAKE_GUEST, naming what differs, unless this host's
    /// domain capabilities offer what the saved guest was running with:
    /// its machine type and CPU model, for its emulator, architecture and
    /// virtualization type (libvirt refuses to describe a machine type or
    /// type the emulator lacks: that is a gap too).
    async fn check_host_takes(&self, saved: &str) -> Result<()> {
        let needs = crate::capabilities::guest_needs(saved).map_err(|e| RestoreError::HostCannotTake {
            gaps: vec![format!("its domain XML cannot be read: {e}")],
        })?;
        let caps = self
            .inner
            .hv
            .domain_capabilities(
                needs.emulator.clone(),
                needs.arch.clone(),
                needs.machine.clone(),
                needs.virt_type.clone(),
            )
            .await;
        let gaps = match caps {
            Ok(caps) => {
                crate::capabilities::gaps(&needs, &caps).map_err(|e| RestoreError::HostCannotTake {
                    gaps: vec![format!("this host's domain capabilities cannot be read: {e}")],
                })?
            }
            Err(HostError::Libvirt(e)) => vec![format!(
                "{} machine type {} of {} ({}): {}",
                needs.virt_type,
                needs.machine,
                needs.emulator.as_deref().unwrap_or("the default emulator"),
                needs.arch,
                e.message
            )],
            Err(e) => return Err(e),
        };
        if gaps.is_empty() {
            Ok(())
        } else {
            Err(RestoreError::HostCannotTake { gaps }.into())
        }
    }
}

/// The memory belongs to this VM and its disks are still the ones it was
/// saved with: each disk's leaf is the volume frozen at dump time, or a
/// fresh overlay on it (what preview and commit make).
/// `chains[i]`: the ancestors of disk i's leaf, nearest first.
pub(crate) fn verify_against_spec(md: &MemoryMetadata, spec: &VmSpec, chains: &[Vec<Uuid>]) -> Result<()> {
    if md.vm_id != spec.vm_id {
        return Err(RestoreError::WrongVm {
            recorded: md.vm_id,
            requested: spec.vm_id,
        }
        .into());
    }
    if md.disks.len() != spec.disks.len() {
        return Err(RestoreError::DisksMismatch {
            reason: format!(
                "the memory was saved with {} disks, the VM has {}",
                md.disks.len(),
                spec.disks.len()
            ),
        }
        .into());
    }
    for (i, (rec, ancestors)) in md.disks.iter().zip(chains).enumerate() {
        let leaf = spec.disks[i];
        let frozen = rec.current;
        // The disk must show what it showed at the dump: the frozen volume
        // itself, or layers over it that started after the dump (a preview
        // or commit leaf, a stateless run's overlay over that). A chain
        // through the snapshot's own overlay (written after the dump) or
        // one that does not reach the frozen volume does not.
        let same_image = leaf.domain == frozen.domain && leaf.image == frozen.image;
        let above: Vec<Uuid> = std::iter::once(leaf.volume)
            .chain(ancestors.iter().copied().take_while(|v| *v != frozen.volume))
            .collect();
        if leaf != frozen && above.contains(&rec.overlay.volume) {
            return Err(RestoreError::DisksMismatch {
                reason: format!(
                    "disk {}: {} is (or lies over) the overlay the VM wrote to after the memory was saved",
                    disk_dev(i),
                    leaf
                ),
            }
            .into());
        }
        let descends = same_image && ancestors.contains(&frozen.volume);
        if leaf != frozen && !descends {
            return Err(RestoreError::DisksMismatch {
                reason: format!(
                    "disk {}: {} is neither the volume saved with the memory ({}) nor a layer over it",
                    disk_dev(i),
                    leaf,
                    frozen
                ),
            }
            .into());
        }
    }
    Ok(())
}

pub(crate) fn sources(running: &Running) -> Vec<DiskSource> {
    running
        .disks
        .iter()
        .map(|d| DiskSource {
            dev: d.dev.clone(),
            kind: d.kind,
            path: d.path.clone(),
            format: d.format,
        })
        .collect()
}

/// POWERING_UP until the guest writes to its console (or `grace` passes).
async fn watch_boot(vm: Arc<Vm>, generation: u64, log: PathBuf, start: u64, grace: Duration) {
    let deadline = Instant::now() + grace;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if vm.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        let grown = std::fs::metadata(&log).map(|m| m.len() > start).unwrap_or(false);
        if grown || Instant::now() >= deadline {
            vm.transition(Some(VmStatus::PoweringUp), VmStatus::Up);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{DiskRecord, DumpRecord};
    use crate::model::{SnapshotMode, VolumeRef};
    use uuid::Uuid;

    fn vref() -> VolumeRef {
        VolumeRef {
            domain: Uuid::new_v4(),
            image: Uuid::new_v4(),
            volume: Uuid::new_v4(),
        }
    }

    fn setup() -> (MemoryMetadata, VmSpec, VolumeRef) {
        let frozen = vref();
        let spec = VmSpec {
            vm_id: Uuid::new_v4(),
            name: "vm".into(),
            memory_bytes: 256 * MIB,
            vcpus: 1,
            disks: vec![frozen],
            kernel: None,
            initrd: None,
            cmdline: String::new(),
        };
        let md = MemoryMetadata {
            format: metadata::FORMAT.into(),
            version: metadata::VERSION,
            vm_id: spec.vm_id,
            snapshot_id: Uuid::new_v4(),
            created_at: 0,
            mode: SnapshotMode::Live,
            disks: vec![DiskRecord {
                current: frozen,
                overlay: vref(),
            }],
            dump: DumpRecord {
                volume: vref(),
                capacity: 1,
                dump_bytes: 1,
                checksum: format!("blake3-4m:{}", "00".repeat(32)).parse().unwrap(),
            },
            domain_xml: String::new(),
        };
        (md, spec, frozen)
    }

    fn code(r: Result<()>) -> &'static str {
        match r {
            Ok(()) => "ok",
            Err(HostError::Restore(RestoreError::WrongVm { .. })) => "vm",
            Err(HostError::Restore(RestoreError::DisksMismatch { .. })) => "disks",
            Err(_) => "other",
        }
    }

    #[test]
    fn accepts_the_frozen_volume_or_layers_over_it() {
        let (md, spec, frozen) = setup();
        let with = |leaf: VolumeRef| VmSpec {
            disks: vec![leaf],
            ..spec.clone()
        };
        let layer = || VolumeRef {
            volume: Uuid::new_v4(),
            ..frozen
        };
        assert_eq!(code(verify_against_spec(&md, &spec, &[vec![]])), "ok");
        // A preview/commit leaf over the frozen volume.
        let child = layer();
        assert_eq!(
            code(verify_against_spec(&md, &with(child), &[vec![frozen.volume]])),
            "ok"
        );
        // A stateless run's overlay over that leaf.
        let grandchild = layer();
        assert_eq!(
            code(verify_against_spec(
                &md,
                &with(grandchild),
                &[vec![child.volume, frozen.volume]]
            )),
            "ok"
        );
        // A volume of another image, or a chain that never reaches it.
        let other = vref();
        assert_eq!(code(verify_against_spec(&md, &with(other), &[vec![]])), "disks");
        assert_eq!(
            code(verify_against_spec(&md, &with(child), &[vec![Uuid::new_v4()]])),
            "disks"
        );
        // The snapshot's own overlay, or anything over it: written after the dump.
        let overlay = md.disks[0].overlay;
        assert_eq!(
            code(verify_against_spec(&md, &with(overlay), &[vec![frozen.volume]])),
            "disks"
        );
        assert_eq!(
            code(verify_against_spec(
                &md,
                &with(child),
                &[vec![overlay.volume, frozen.volume]]
            )),
            "disks"
        );
        // Another VM, another disk count.
        let other_vm = VmSpec {
            vm_id: Uuid::new_v4(),
            ..spec.clone()
        };
        assert_eq!(code(verify_against_spec(&md, &other_vm, &[vec![]])), "vm");
        let no_disks = VmSpec {
            disks: vec![],
            ..spec.clone()
        };
        assert_eq!(code(verify_against_spec(&md, &no_disks, &[])), "disks");
    }
}
