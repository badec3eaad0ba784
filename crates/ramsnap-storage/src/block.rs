//! BLOCK domains: an LVM volume group on a shared LUN, laid out as VDSM lays
//! out its block domains. The VG is named by the domain id; each volume is
//! an LV named by its volume id; all metadata lives in LVM tags, so the
//! domain describes itself to any host that sees the LUN:
//!
//! ```text
//! VG tags  RAMSNAP_DOMAIN  RS_VER_<n>  RS_NAME_<name>  RS_DEL_<request>_<unix secs>
//! LV tags  IU_<image>  PU_<parent or nil uuid>  RS_FMT_<RAW|COW>  RS_ALLOC_<..>
//!          RS_PURPOSE_<..>  RS_LEGAL | RS_ILLEGAL  RS_CAP_<bytes>  RS_CT_<unix secs>
//!          RS_REQ_<request>  RS_DESC_<hex>
//! ```
//!
//! Preparing a volume makes it a block device: `lvchange -ay` where the
//! kernel has device-mapper, otherwise a loop device over the LV's
//! (contiguous) extents on the PV. Either way the path handed out is a
//! symlink `<run-dir>/<domain>/images/<image>/<volume>`, so a qcow2 child
//! finds its parent by bare volume id in the same directory, as on FILE.
use crate::backend::{Backend, Located, Survey, DELETE_JOURNAL_TTL_SECS};
use crate::descriptor::DescriptorStore;
use crate::error::{Result, StorageError};
use crate::lvm;
use crate::model::*;
use crate::qcow2;
use crate::tool;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use uuid::Uuid;

const DOMAIN_TAG: &str = "RAMSNAP_DOMAIN";
/// VDSM's default extent is 128 MiB; 4 MiB wastes less on the small
/// memory-metadata volumes.
const EXTENT_MIB: u64 = 4;

pub struct BlockDomain {
    id: Uuid,
    name: String,
    vg: String,
    run_dir: PathBuf,
    /// The VG's extent size, once an LVM report gave it (it is fixed when
    /// the VG is made): what an LV's size is rounded up to.
    extent: std::sync::OnceLock<u64>,
}

impl BlockDomain {
    /// Initializes a blank device as a new domain.
    pub fn create(device: &Path, id: Uuid, name: &str, run_dir: &Path) -> Result<BlockDomain> {
        lvm::pvcreate(device)?;
        let tags = vec![
            DOMAIN_TAG.to_string(),
            format!("RS_VER_{METADATA_VERSION}"),
            format!("RS_NAME_{name}"),
        ];
        if let Err(e) = lvm::vgcreate(&id.to_string(), device, EXTENT_MIB, &tags) {
            let _ = tool::run(Command::new("pvremove").arg("--yes").arg(device));
            return Err(e);
        }
        Ok(BlockDomain {
            id,
            name: name.into(),
            vg: id.to_string(),
            run_dir: run_dir.join(id.to_string()),
            extent: std::sync::OnceLock::new(),
        })
    }

    /// Every ramsnap domain on the block devices this host sees.
    pub fn discover(run_dir: &Path) -> Result<Vec<(BlockDomain, String)>> {
        let mut out = Vec::new();
        for row in lvm::vgs_all()? {
            if !row.tags.iter().any(|t| t == DOMAIN_TAG) {
                continue;
            }
            let Ok(id) = Uuid::parse_str(&row.name) else {
                continue;
            };
            let name = row
                .tags
                .iter()
                .find_map(|t| t.strip_prefix("RS_NAME_"))
                .unwrap_or("")
                .to_string();
            out.push((
                BlockDomain {
                    id,
                    name,
                    vg: row.name.clone(),
                    run_dir: run_dir.join(id.to_string()),
                    extent: std::sync::OnceLock::new(),
                },
                row.pv,
            ));
        }
        Ok(out)
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    fn link(&self, image: Uuid, volume: Uuid) -> PathBuf {
        self.run_dir
            .join("images")
            .join(image.to_string())
            .join(volume.to_string())
    }

    fn lv(&self, image: Uuid, volume: Uuid) -> Result<lvm::LvRow> {
        lvm::lvs(&self.vg)?
            .into_iter()
            .find(|lv| lv.name == volume.to_string() && lv.tags.contains(&format!("IU_{image}")))
            .ok_or(StorageError::VolumeNotFound(VolumeRef {
                domain: self.id,
                image,
                volume,
            }))
    }

    fn to_volume(&self, lv: &lvm::LvRow) -> Result<Option<Volume>> {
        let Ok(volume) = Uuid::parse_str(&lv.name) else {
            return Ok(None);
        };
        let tag = |p: &str| lv.tags.iter().find_map(|t| t.strip_prefix(p).map(str::to_string));
        let Some(image) = tag("IU_").and_then(|s| Uuid::parse_str(&s).ok()) else {
            return Ok(None);
        };
        let corrupt = |what: &str| StorageError::CorruptMetadata {
            subject: format!("{}/{}", self.vg, lv.name),
            reason: format!("missing or bad {what} tag"),
        };
        let parent = tag("PU_")
            .and_then(|s| Uuid::parse_str(&s).ok())
            .filter(|p| !p.is_nil());
        let format = match tag("RS_FMT_").as_deref() {
            Some("RAW") => Format::Raw,
            Some("COW") => Format::Cow,
            _ => return Err(corrupt("RS_FMT_")),
        };
        let allocation = match tag("RS_ALLOC_").as_deref() {
            Some("SPARSE") => Allocation::Sparse,
            Some("PREALLOCATED") => Allocation::Preallocated,
            _ => return Err(corrupt("RS_ALLOC_")),
        };
        let purpose = match tag("RS_PURPOSE_").as_deref() {
            Some("DISK") => Purpose::Disk,
            Some("MEMORY_DUMP") => Purpose::MemoryDump,
            Some("MEMORY_METADATA") => Purpose::MemoryMetadata,
            _ => return Err(corrupt("RS_PURPOSE_")),
        };
        let legality = if lv.tags.iter().any(|t| t == "RS_LEGAL") {
            Legality::Legal
        } else {
            Legality::Illegal
        };
        let capacity = tag("RS_CAP_")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("RS_CAP_"))?;
        let meta = VolumeMeta {
            version: tag("RS_VER_")
                .and_then(|s| s.parse().ok())
                .unwrap_or(METADATA_VERSION),
            image,
            volume,
            parent,
            format,
            allocation,
            purpose,
            legality,
            capacity,
            description: tag("RS_DESC_").and_then(|h| hex_decode(&h)).unwrap_or_default(),
            request_id: tag("RS_REQ_").and_then(|s| Uuid::parse_str(&s).ok()),
            created_at: tag("RS_CT_").and_then(|s| s.parse().ok()).unwrap_or(0),
        };
        Ok(Some(Volume {
            domain: self.id,
            meta,
            allocated: lv.size,
        }))
    }

    fn tags_for(meta: &VolumeMeta) -> Vec<String> {
        let mut tags = vec![
            format!("IU_{}", meta.image),
            format!("PU_{}", meta.parent.unwrap_or(Uuid::nil())),
            format!("RS_VER_{}", meta.version),
            format!("RS_FMT_{}", upper(meta.format)),
            format!("RS_ALLOC_{}", upper(meta.allocation)),
            format!("RS_PURPOSE_{}", upper(meta.purpose)),
            legality_tag(meta.legality).to_string(),
            format!("RS_CAP_{}", meta.capacity),
            format!("RS_CT_{}", meta.created_at),
        ];
        if let Some(r) = meta.request_id {
            tags.push(format!("RS_REQ_{r}"));
        }
        if !meta.description.is_empty() {
            tags.push(format!("RS_DESC_{}", hex_encode(&meta.description)));
        }
        tags
    }

    /// The LV size a volume needs: its capacity for RAW; for COW the size
    /// of a fully allocated qcow2 (from `qemu-img measure`), so that a
    /// qcow2 volume never outgrows its LV.
    fn lv_size(meta: &VolumeMeta) -> Result<u64> {
        match meta.format {
            Format::Raw => Ok(meta.capacity),
            // What `qemu-img measure` says for a fully allocated image.
            Format::Cow => Ok(qcow2::fully_allocated_size(meta.capacity)),
        }
    }

    /// Activates the LV: its device, and for a loop device the mapping it
    /// was set up with (see [`LoopMap`]).
    fn activate(&self, image: Uuid, volume: Uuid) -> Result<(PathBuf, Option<LoopMap>)> {
        if lvm::device_mapper_available() {
            let lv = self.lv(image, volume)?;
            lvm::lv_activate(&self.vg, &lv.name, true)?;
            return Ok((PathBuf::from(format!("/dev/{}/{}", self.vg, lv.name)), None));
        }
        // Where the LV lies, and that it is this image's: one pvs.
        let extent = lvm::lv_extent(&self.vg, &volume.to_string(), Some(&format!("IU_{image}")))?.ok_or(
            StorageError::VolumeNotFound(VolumeRef {
                domain: self.id,
                image,
                volume,
            }),
        )?;
        attach(&extent)
    }

    /// [`Backend::prepare`] of a volume whose extent is known (the loop
    /// stand-in only).
    fn prepare_at(&self, image: Uuid, volume: Uuid, extent: &lvm::Extent) -> Result<PathBuf> {
        if self.live_device(image, volume).is_some() {
            return Ok(self.link(image, volume));
        }
        let (device, map) = attach(extent)?;
        self.place(image, volume, device, map)
    }

    /// Links a volume's new device where clients find it, with the loop
    /// mapping it was set up with; detaches the device if that fails.
    fn place(&self, image: Uuid, volume: Uuid, device: PathBuf, map: Option<LoopMap>) -> Result<PathBuf> {
        let link = self.link(image, volume);
        let record = self.map_record(image, volume);
        let place = (|| {
            fs::create_dir_all(link.parent().expect("has a parent"))?;
            let _ = fs::remove_file(&link);
            match &map {
                Some(m) => fs::write(&record, m.to_text())?,
                None => {
                    let _ = fs::remove_file(&record);
                }
            }
            std::os::unix::fs::symlink(&device, &link)
        })();
        if let Err(e) = place {
            let _ = self.deactivate(&device);
            return Err(e.into());
        }
        Ok(link)
    }

    /// Where a prepared loop device's mapping is recorded, beside its link.
    fn map_record(&self, image: Uuid, volume: Uuid) -> PathBuf {
        self.link(image, volume).with_extension("loop")
    }

    fn deactivate(&self, device: &Path) -> Result<()> {
        if is_loop(device) {
            match tool::run(Command::new("losetup").arg("--detach").arg(device)) {
                Ok(_) => Ok(()),
                // Already gone (e.g. after a host reboot).
                Err(_) if !device.exists() || loop_offset(device).is_none() => Ok(()),
                Err(e) => Err(e),
            }
        } else {
            let lv = device
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            lvm::lv_activate(&self.vg, &lv, false)
        }
    }

    /// A new LV for `meta` (its tags, its size), not laid out yet: in
    /// `space` when there is room there (see [`FreeSpace`]), and then where
    /// it lies; else where LVM chooses.
    fn lvcreate_in(&self, meta: &VolumeMeta, space: Option<&mut FreeSpace>) -> Result<Option<lvm::Extent>> {
        if let Some((at, extent)) = space.and_then(|s| s.take(Self::lv_size(meta).unwrap_or(0))) {
            match self.lvcreate(meta, Some(&at)) {
                Ok(()) => return Ok(Some(extent)),
                // The VG changed since it was read (another host's writer
                // made an LV there, say): where LVM chooses, as without a survey.
                Err(e) => tracing::debug!(error = %e, at, "placing the LV failed; LVM places it"),
            }
        }
        self.lvcreate(meta, None).map(|()| None)
    }

    fn lvcreate(&self, meta: &VolumeMeta, at: Option<&str>) -> Result<()> {
        // Callers' descriptions are checked before; this is what an LV tag
        // can hold (a copy may carry an older volume's description).
        let max = crate::limits::MAX_DESCRIPTION_BYTES;
        if meta.description.len() > max {
            return Err(StorageError::invalid(
                "description",
                format!(
                    "is {} bytes long; at most {max} bytes are allowed",
                    meta.description.len()
                ),
            ));
        }
        let size = Self::lv_size(meta)?;
        lvm::lvcreate(
            &self.vg,
            &meta.volume.to_string(),
            size,
            &Self::tags_for(meta),
            at,
        )
        .map_err(|e| self.name_taken(meta.volume).unwrap_or(e))
    }

    /// ILLEGAL to LEGAL, on every LV of `metas` in one `lvchange`; the LVs
    /// are named by their volume ids, so none is looked up first.
    fn flip_legal(&self, metas: &[&VolumeMeta]) -> Result<()> {
        let names: Vec<String> = metas.iter().map(|m| m.volume.to_string()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        lvm::lvs_change_tags(
            &self.vg,
            &names,
            &[legality_tag(Legality::Illegal).to_string()],
            &[legality_tag(Legality::Legal).to_string()],
        )
    }

    /// After a failed lvcreate: ALREADY_EXISTS when the name was taken. A
    /// volume id names an LV, so it is unique in the whole VG, not only in
    /// its image; checked only on failure, to spare every create an lvs.
    fn name_taken(&self, volume: Uuid) -> Option<StorageError> {
        let name = volume.to_string();
        let lv = lvm::lvs(&self.vg).ok()?.into_iter().find(|lv| lv.name == name)?;
        let image = lv
            .tags
            .iter()
            .find_map(|t| t.strip_prefix("IU_"))
            .unwrap_or("(none)")
            .to_string();
        Some(StorageError::AlreadyExists {
            resource: "volume",
            id: format!("{}/{image}/{name}", self.id),
            reason: format!(
                "volume ids are unique on a BLOCK domain (each names an LV); {name} is already in image {image}"
            ),
        })
    }

    /// The device a link points at, if it is still the one this volume was
    /// prepared on (a loop device can vanish with a reboot and be reused).
    fn live_device(&self, image: Uuid, volume: Uuid) -> Option<PathBuf> {
        let target = fs::read_link(self.link(image, volume)).ok()?;
        if !target.exists() {
            return None;
        }
        if is_loop(&target) {
            // The loop device must still map this LV's extents (after a
            // reboot or a detach by hand, its number may map something
            // else): against the mapping recorded when it was set up (no
            // LVM command), else against LVM's.
            let expected = match fs::read_to_string(self.map_record(image, volume))
                .ok()
                .and_then(|t| LoopMap::parse(&t))
            {
                Some(m) => m,
                None => {
                    let lv = self.lv(image, volume).ok()?;
                    let vg = lvm::vg_info(&self.vg).ok()?;
                    LoopMap {
                        offset: vg.pe_start + lv.first_pe? * vg.extent_size,
                        backing: vg.pv,
                    }
                }
            };
            let backing = loop_attr(&target, "backing_file")?;
            if loop_offset(&target)? != expected.offset || backing.trim() != expected.backing {
                return None;
            }
        }
        Some(target)
    }
}

impl BlockDomain {
    fn domain_info(&self, vg: lvm::VgInfo) -> DomainInfo {
        let _ = self.extent.set(vg.extent_size);
        DomainInfo {
            id: self.id,
            name: self.name.clone(),
            domain_type: DomainType::Block,
            // EXPORT domains are FILE only.
            role: DomainRole::Data,
            location: vg.pv,
            capacity: vg.size,
            free: vg.free,
            metadata_version: METADATA_VERSION,
            format: DomainFormat::Ramsnap,
            read_only: false,
        }
    }

    /// The volumes among `lvs` (of `image`, or all), in [`Backend::list`]'s order.
    fn volumes_of(&self, lvs: &[lvm::LvRow], image: Option<Uuid>) -> Result<Vec<Volume>> {
        let mut out = Vec::new();
        for lv in lvs {
            if let Some(v) = self.to_volume(lv)? {
                if image.is_none_or(|i| i == v.meta.image) {
                    out.push(v);
                }
            }
        }
        out.sort_by_key(|v| (v.meta.image, v.meta.created_at, v.meta.volume));
        Ok(out)
    }
}

impl BlockDomain {
    /// [`Backend::create`], placed in `space` when given.
    fn create_in(
        &self,
        meta: &VolumeMeta,
        parent: Option<&VolumeMeta>,
        space: Option<&mut FreeSpace>,
    ) -> Result<()> {
        let placed = self.lvcreate_in(meta, space)?;
        let result = match placed {
            Some(extent) => Ok(extent),
            None => lvm::lv_extent(&self.vg, &meta.volume.to_string(), None).and_then(|e| {
                e.ok_or_else(|| StorageError::Tool {
                    cmd: "pvs --segments".into(),
                    stderr: format!("the new LV {}/{} is not in the VG", self.vg, meta.volume),
                })
            }),
        }
        .and_then(|extent| lay_out(meta, parent, &extent));
        if let Err(e) = result {
            let _ = self.teardown(meta.image, meta.volume);
            let _ = lvm::lvremove(&self.vg, &meta.volume.to_string());
            return Err(e);
        }
        Ok(())
    }

    /// [`Backend::create_legal`], placed in `space` when given.
    fn create_legal_in(
        &self,
        meta: &VolumeMeta,
        parent: Option<&VolumeMeta>,
        space: Option<&mut FreeSpace>,
    ) -> Result<()> {
        let illegal = VolumeMeta {
            legality: Legality::Illegal,
            ..meta.clone()
        };
        self.create_in(&illegal, parent, space)?;
        self.flip_legal(&[meta]).inspect_err(|_| {
            let _ = self.remove(meta.image, meta.volume);
        })
    }

    /// As `create_legal_in` of each, with at most one `pvs` for all their
    /// extents (none when all were placed in `space`) and one `lvchange`
    /// for all their flips.
    fn create_legal_all_in(&self, metas: &[VolumeMeta], mut space: Option<&mut FreeSpace>) -> Result<()> {
        let mut made: Vec<&VolumeMeta> = Vec::new();
        let result = (|| {
            let mut placed = Vec::new();
            for meta in metas {
                let illegal = VolumeMeta {
                    legality: Legality::Illegal,
                    ..meta.clone()
                };
                placed.push(self.lvcreate_in(&illegal, space.as_deref_mut())?);
                made.push(meta);
            }
            let extents: Vec<lvm::Extent> = match placed.into_iter().collect::<Option<Vec<_>>>() {
                Some(all) => all,
                None => {
                    let names: Vec<String> = metas.iter().map(|m| m.volume.to_string()).collect();
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    lvm::lv_extents(&self.vg, &names)?
                }
            };
            for (meta, extent) in metas.iter().zip(extents) {
                lay_out(meta, None, &extent)?;
            }
            self.flip_legal(&made)
        })();
        if result.is_err() {
            for meta in made {
                let _ = lvm::lvremove(&self.vg, &meta.volume.to_string());
            }
        }
        result
    }
}

/// A VG's free extents as a [`Survey`] read them. A new LV is placed there
/// explicitly (`lvcreate VG PV:first-last`), so where it lies is known
/// without reading it back: a `pvs` (30-50 ms here) fewer per new volume.
#[derive(Debug, Clone)]
pub struct FreeSpace {
    pv: String,
    /// Byte offset of the first extent on the PV.
    pe_start: u64,
    /// Bytes per extent.
    extent: u64,
    /// First extent and count of each free range, in PV order.
    ranges: Vec<(u64, u64)>,
}

impl FreeSpace {
    /// Room for `bytes` (whole extents; the first range that holds them),
    /// taken: the PV range for `lvcreate`, and the extent the LV will have.
    fn take(&mut self, bytes: u64) -> Option<(String, lvm::Extent)> {
        if self.extent == 0 || bytes == 0 {
            return None;
        }
        let count = bytes.div_ceil(self.extent);
        let range = self.ranges.iter_mut().find(|(_, n)| *n >= count)?;
        let first = range.0;
        *range = (first + count, range.1 - count);
        Some((
            format!("{}:{}-{}", self.pv, first, first + count - 1),
            (
                self.pv.clone(),
                self.pe_start + first * self.extent,
                count * self.extent,
            ),
        ))
    }
}

/// The highest `RS_WRITER_<generation>` among a VG's tags; 0 when none.
fn writer_of(tags: &[String]) -> i64 {
    tags.iter()
        .filter_map(|t| t.strip_prefix(WRITER_TAG)?.parse::<i64>().ok())
        .max()
        .unwrap_or(0)
}

impl Backend for BlockDomain {
    fn info(&self) -> Result<DomainInfo> {
        Ok(self.domain_info(lvm::vg_info(&self.vg)?))
    }

    fn list(&self, image: Option<Uuid>) -> Result<Vec<Volume>> {
        self.volumes_of(&lvm::lvs(&self.vg)?, image)
    }

    /// One `pvs --segments` for the VG's fields and tags and every LV.
    fn survey(&self) -> Result<Survey> {
        let report = lvm::vg_report(&self.vg)?;
        Ok(Survey {
            volumes: self.volumes_of(&report.lvs, None)?,
            writer_generation: writer_of(&report.info.tags),
            free_space: Some(FreeSpace {
                pv: report.info.pv.clone(),
                pe_start: report.info.pe_start,
                extent: report.info.extent_size,
                ranges: report.free,
            }),
            info: self.domain_info(report.info),
        })
    }

    /// Both from one `lvs`.
    fn request_and_image(&self, request: Uuid, image: Uuid) -> Result<(Option<Volume>, Vec<Volume>)> {
        let all = self.list(None)?;
        let found = all.iter().find(|v| v.meta.request_id == Some(request)).cloned();
        let in_image = all.into_iter().filter(|v| v.meta.image == image).collect();
        Ok((found, in_image))
    }

    /// One `lvs` for all of them.
    fn find_requests(&self, requests: &[Uuid]) -> Result<Vec<Option<Volume>>> {
        let all = self.list(None)?;
        Ok(requests
            .iter()
            .map(|r| all.iter().find(|v| v.meta.request_id == Some(*r)).cloned())
            .collect())
    }

    /// What `get` would read from the new LV's tags, without the `lvs`:
    /// the tags are `meta`'s (see `tags_for`, and the round-trip test
    /// below), and the LV is its size rounded up to whole extents.
    fn created(&self, meta: &VolumeMeta) -> Result<Volume> {
        let Some(extent) = self.extent.get().copied().filter(|e| *e > 0) else {
            return self.get(meta.image, meta.volume);
        };
        Ok(Volume {
            domain: self.id,
            meta: meta.clone(),
            allocated: Self::lv_size(meta)?.div_ceil(extent).saturating_mul(extent),
        })
    }

    fn get(&self, image: Uuid, volume: Uuid) -> Result<Volume> {
        let lv = self.lv(image, volume)?;
        self.to_volume(&lv)?
            .ok_or(StorageError::VolumeNotFound(VolumeRef {
                domain: self.id,
                image,
                volume,
            }))
    }

    fn create(&self, meta: &VolumeMeta, parent: Option<&VolumeMeta>) -> Result<()> {
        self.create_in(meta, parent, None)
    }

    /// As the default (made ILLEGAL, zeroed, then flipped), without looking
    /// the new LV up again before the flip: its name is its volume id.
    /// Saves an `lvs` (50-60 ms here) on every new disk and memory volume.
    fn create_legal(&self, meta: &VolumeMeta, parent: Option<&VolumeMeta>) -> Result<()> {
        self.create_legal_in(meta, parent, None)
    }

    /// Placed in the free space the survey saw: no `pvs` to find the LV.
    fn create_surveyed(&self, meta: &VolumeMeta, parent: Option<&VolumeMeta>, survey: &Survey) -> Result<()> {
        self.create_in(meta, parent, survey.free_space.clone().as_mut())
    }

    /// As `create_surveyed`.
    fn create_legal_surveyed(
        &self,
        meta: &VolumeMeta,
        parent: Option<&VolumeMeta>,
        survey: &Survey,
    ) -> Result<()> {
        self.create_legal_in(meta, parent, survey.free_space.clone().as_mut())
    }

    fn create_legal_all(&self, metas: &[VolumeMeta]) -> Result<()> {
        self.create_legal_all_in(metas, None)
    }

    fn create_legal_all_surveyed(&self, metas: &[VolumeMeta], survey: &Survey) -> Result<()> {
        self.create_legal_all_in(metas, survey.free_space.clone().as_mut())
    }

    fn set_legality(&self, image: Uuid, volume: Uuid, legality: Legality) -> Result<()> {
        let lv = self.lv(image, volume)?;
        let other = match legality {
            Legality::Legal => Legality::Illegal,
            Legality::Illegal => Legality::Legal,
        };
        lvm::lv_change_tags(
            &self.vg,
            &lv.name,
            &[legality_tag(other).to_string()],
            &[legality_tag(legality).to_string()],
        )
    }

    fn set_parent(&self, image: Uuid, volume: Uuid, parent: Option<Uuid>) -> Result<()> {
        let lv = self.lv(image, volume)?;
        let old: Vec<String> = lv.tags.iter().filter(|t| t.starts_with("PU_")).cloned().collect();
        lvm::lv_change_tags(
            &self.vg,
            &lv.name,
            &old,
            &[format!("PU_{}", parent.unwrap_or(Uuid::nil()))],
        )
    }

    fn remove(&self, image: Uuid, volume: Uuid) -> Result<()> {
        match self.lv(image, volume) {
            Ok(lv) => {
                self.teardown(image, volume)?;
                lvm::lvremove(&self.vg, &lv.name)
            }
            Err(StorageError::VolumeNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn prepare(&self, image: Uuid, volume: Uuid) -> Result<PathBuf> {
        if self.live_device(image, volume).is_some() {
            return Ok(self.link(image, volume));
        }
        let (device, map) = self.activate(image, volume)?;
        self.place(image, volume, device, map)
    }

    /// Without device-mapper, the extents of every layer not prepared yet
    /// are read with one `pvs` (the listing checked that they are this
    /// image's), not one per layer: a restore prepares the VM's whole disk
    /// chain, one layer more with every snapshot.
    fn prepare_listed_chain(&self, volumes: &[&Volume]) -> Vec<Result<PathBuf>> {
        let each = |v: &&Volume| self.prepare(v.meta.image, v.meta.volume);
        if lvm::device_mapper_available() {
            return crate::backend::prepare_each(volumes, each);
        }
        let missing: Vec<Uuid> = volumes
            .iter()
            .filter(|v| self.live_device(v.meta.image, v.meta.volume).is_none())
            .map(|v| v.meta.volume)
            .collect();
        if missing.len() < 2 {
            return crate::backend::prepare_each(volumes, each);
        }
        let names: Vec<String> = missing.iter().map(Uuid::to_string).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let Ok(extents) = lvm::lv_extents(&self.vg, &names) else {
            // Each prepare then reports its own volume's error.
            return crate::backend::prepare_each(volumes, each);
        };
        let known: std::collections::HashMap<Uuid, lvm::Extent> = missing.into_iter().zip(extents).collect();
        crate::backend::prepare_each(volumes, |v| match known.get(&v.meta.volume) {
            Some(extent) => self.prepare_at(v.meta.image, v.meta.volume, extent),
            None => each(v),
        })
    }

    /// Without device-mapper, one `pvs --segments`: the VG's LVs with
    /// their tags, and the segments the loop stand-in needs.
    fn list_to_prepare(&self, image: Uuid) -> Result<(Vec<Volume>, Located)> {
        if lvm::device_mapper_available() {
            return Ok((self.list(Some(image))?, Located::default()));
        }
        let report = lvm::vg_report(&self.vg)?;
        let volumes = self.volumes_of(&report.lvs, Some(image))?;
        let mut located = Located::default();
        for v in &volumes {
            let name = v.meta.volume.to_string();
            let mut segments = report.segments.iter().filter(|(lv, _)| *lv == name);
            // One contiguous segment, as every LV here is; anything else is
            // left to `prepare`, which reports it.
            if let (Some((_, extent)), None) = (segments.next(), segments.next()) {
                located.0.insert(v.meta.volume, extent.clone());
            }
        }
        Ok((volumes, located))
    }

    fn prepare_located_chain(&self, volumes: &[&Volume], located: &Located) -> Vec<Result<PathBuf>> {
        if located.0.is_empty() {
            return self.prepare_listed_chain(volumes);
        }
        crate::backend::prepare_each(volumes, |v| match located.0.get(&v.meta.volume) {
            Some(extent) => self.prepare_at(v.meta.image, v.meta.volume, extent),
            None => self.prepare(v.meta.image, v.meta.volume),
        })
    }

    fn is_prepared(&self, image: Uuid, volume: Uuid) -> bool {
        self.live_device(image, volume).is_some()
    }

    fn teardown(&self, image: Uuid, volume: Uuid) -> Result<()> {
        let link = self.link(image, volume);
        if let Some(device) = self.live_device(image, volume) {
            self.deactivate(&device)?;
        }
        match fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let _ = fs::remove_file(self.map_record(image, volume));
        if let Some(dir) = link.parent() {
            let _ = fs::remove_dir(dir);
        }
        Ok(())
    }

    fn natural_allocation(&self) -> Allocation {
        Allocation::Preallocated
    }

    fn role(&self) -> DomainRole {
        // EXPORT domains are FILE only.
        DomainRole::Data
    }

    fn descriptors(&self) -> Option<DescriptorStore> {
        None
    }

    fn record_delete(&self, request: Uuid, survivor: Option<Uuid>) -> Result<()> {
        let vg = lvm::vg_info(&self.vg)?;
        let horizon = now_unix() - DELETE_JOURNAL_TTL_SECS;
        let expired: Vec<String> = vg
            .tags
            .iter()
            .filter(|t| parse_delete_tag(t).is_some_and(|(_, ts, _)| ts < horizon))
            .cloned()
            .collect();
        let mut tag = format!("RS_DEL_{request}_{}", now_unix());
        if let Some(s) = survivor {
            tag.push_str(&format!("_{s}"));
        }
        lvm::vg_change_tags(&self.vg, &expired, &[tag])
    }

    /// A VG tag, `RS_WRITER_<generation>`: in the VG's own metadata, which
    /// every host reads from the LUN.
    fn writer_generation(&self) -> Result<i64> {
        Ok(writer_of(&lvm::vg_info(&self.vg)?.tags))
    }

    fn set_writer_generation(&self, previous: i64, generation: i64) -> Result<()> {
        let remove: Vec<String> = (previous > 0)
            .then(|| format!("{WRITER_TAG}{previous}"))
            .into_iter()
            .collect();
        lvm::vg_change_tags(&self.vg, &remove, &[format!("{WRITER_TAG}{generation}")])
    }

    fn delete_recorded(&self, request: Uuid) -> Result<Option<Option<Uuid>>> {
        Ok(lvm::vg_info(&self.vg)?
            .tags
            .iter()
            .filter_map(|t| parse_delete_tag(t))
            .find(|(r, _, _)| *r == request)
            .map(|(_, _, survivor)| survivor))
    }
}

const WRITER_TAG: &str = "RS_WRITER_";

/// `RS_DEL_<request>_<unix secs>[_<survivor>]`
fn parse_delete_tag(tag: &str) -> Option<(Uuid, i64, Option<Uuid>)> {
    let mut parts = tag.strip_prefix("RS_DEL_")?.split('_');
    let request = Uuid::parse_str(parts.next()?).ok()?;
    let ts = parts.next()?.parse().ok()?;
    let survivor = parts.next().and_then(|s| Uuid::parse_str(s).ok());
    Some((request, ts, survivor))
}

fn legality_tag(l: Legality) -> &'static str {
    match l {
        Legality::Legal => "RS_LEGAL",
        Legality::Illegal => "RS_ILLEGAL",
    }
}

fn upper<T: serde::Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Makes `len` bytes of `device` at `offset` read as zeros (both are
/// multiples of 512, as LVM extents are) with `BLKZEROOUT`, as
/// `blkdiscard -z` does: the device's write-zeroes offload where it has one
/// (SCSI WRITE SAME, NVMe Write Zeroes; on a loop device over a file,
/// `fallocate(ZERO_RANGE)`, which marks the range zeroed and keeps it
/// allocated), else the kernel writes zero pages. The range stays
/// allocated (no unmap): a PREALLOCATED volume keeps its space, and a loop
/// PV over a sparse file reserves it now rather than failing a dump later
/// with ENOSPC. The ioctl drops the range from the device's page cache
/// first, so no stale cached page shows through either.
/// A new LV's content, written through its extents on the PV (`extent`:
/// the PV device, offset and length; the LV is inactive and contiguous),
/// the same on hosts with and without device-mapper. lvcreate --zero n leaves
/// whatever the extents held: a deleted volume's data. A new volume reads
/// as zeros (RAW) or as its parent (COW, whose unallocated clusters qemu
/// never reads from the LV, but the LV itself must not carry old data
/// either): zeroed, then a COW volume's empty image (see crate::qcow2).
fn lay_out(meta: &VolumeMeta, parent: Option<&VolumeMeta>, extent: &lvm::Extent) -> Result<()> {
    let (pv, offset, len) = extent;
    zero_range(Path::new(pv), *offset, *len)?;
    if meta.format == Format::Cow {
        let f = fs::OpenOptions::new().write(true).open(pv)?;
        qcow2::create_volume_at(&f, *offset, meta, parent)?;
        f.sync_data()?;
    }
    Ok(())
}

pub fn zero_range(device: &Path, offset: u64, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let f = fs::OpenOptions::new().write(true).open(device)?;
    const BLKZEROOUT: libc::c_ulong = 0x127f;
    let range = [offset, len];
    // SAFETY: BLKZEROOUT takes a pointer to two u64s: offset and length.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKZEROOUT, range.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

fn is_loop(device: &Path) -> bool {
    device
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("loop"))
}

fn loop_attr(device: &Path, attr: &str) -> Option<String> {
    let name = device.file_name()?.to_str()?;
    fs::read_to_string(format!("/sys/block/{name}/loop/{attr}")).ok()
}

/// What a loop device standing in for an LV maps: its backing device (the
/// PV) and the offset of the LV's first extent on it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LoopMap {
    backing: String,
    offset: u64,
}

impl LoopMap {
    fn to_text(&self) -> String {
        format!("{}\n{}\n", self.offset, self.backing)
    }

    fn parse(text: &str) -> Option<LoopMap> {
        let (offset, backing) = text.split_once('\n')?;
        Some(LoopMap {
            offset: offset.parse().ok()?,
            backing: backing.strip_suffix('\n')?.to_string(),
        })
    }
}

/// A loop device over an LV's extent: how this host activates an LV
/// without device-mapper (see [`LoopMap`]).
///
/// With direct I/O to the PV (`--direct-io=on`), as a device-mapper LV
/// has: data written to the LV is cached once, in the LV's own page
/// cache, and its writeback goes straight to the PV. A buffered loop
/// cached it again in the PV's page cache (and again in the PV's file
/// where the PV is itself a loop device), and a flush copied it through
/// each layer: here a 700 MiB write and `fdatasync` into an LV, as
/// libvirt writes a dump, took 649-2,184 ms through a buffered loop and
/// 499-705 ms with direct I/O (370-441 ms with the PV's own loop direct
/// too). The kernel keeps the PV's page cache coherent with the direct
/// I/O (written back before it, invalidated after), so what LVM or the
/// agent reads or writes on the PV itself stays in step.
///
/// One attach at a time in this agent: `losetup --find` takes the first
/// free device, and two run side by side (the host prepares a snapshot's
/// volumes in parallel) pick the same one; the loser finds it busy and
/// util-linux sleeps 200 ms before it looks again (seen here as 5 of 171
/// attaches in one benchmark taking 202-206 ms, against 1-2 ms for the
/// rest). Another process's `losetup` can still race with this one; it
/// then costs that sleep, never a wrong device.
fn attach(extent: &lvm::Extent) -> Result<(PathBuf, Option<LoopMap>)> {
    static ATTACH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let (pv, offset, len) = extent;
    let _one_at_a_time = ATTACH.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = tool::run(Command::new("losetup").args([
        "--offset",
        &offset.to_string(),
        "--sizelimit",
        &len.to_string(),
        "--direct-io=on",
        "--find",
        "--show",
        pv,
    ]))?;
    let map = LoopMap {
        backing: pv.clone(),
        offset: *offset,
    };
    Ok((PathBuf::from(out.trim()), Some(map)))
}

fn loop_offset(device: &Path) -> Option<u64> {
    loop_attr(device, "offset")?.trim().parse().ok()
}

fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(h: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..h.len())
        .step_by(2)
        .map(|i| h.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_taken_first_fit_in_whole_extents() {
        let mut space = FreeSpace {
            pv: "/dev/loop7".into(),
            pe_start: 1 << 20,
            extent: 4 << 20,
            ranges: vec![(3, 2), (10, 5)],
        };
        // 5 MiB is two extents: the first range holds them.
        let (at, extent) = space.take(5 << 20).unwrap();
        assert_eq!(at, "/dev/loop7:3-4");
        assert_eq!(
            extent,
            ("/dev/loop7".to_string(), (1 << 20) + 3 * (4 << 20), 8 << 20)
        );
        // That range is used up; three extents go in the next.
        let (at, _) = space.take(12 << 20).unwrap();
        assert_eq!(at, "/dev/loop7:10-12");
        assert_eq!(space.ranges, [(5, 0), (13, 2)]);
        // No range holds three more: LVM is left to place it (or refuse).
        assert!(space.take(12 << 20).is_none());
        assert!(space.take(0).is_none());
    }

    #[test]
    fn description_hex_round_trips() {
        let s = "snapshot: before upgrade, ünïcode";
        assert_eq!(hex_decode(&hex_encode(s)).as_deref(), Some(s));
    }

    #[test]
    fn tags_round_trip_through_to_volume() {
        let meta = VolumeMeta {
            version: METADATA_VERSION,
            image: Uuid::new_v4(),
            volume: Uuid::new_v4(),
            parent: Some(Uuid::new_v4()),
            format: Format::Cow,
            allocation: Allocation::Sparse,
            purpose: Purpose::MemoryDump,
            legality: Legality::Illegal,
            capacity: 123,
            description: "d".into(),
            request_id: Some(Uuid::new_v4()),
            created_at: 42,
        };
        let dom = BlockDomain {
            id: Uuid::new_v4(),
            name: "x".into(),
            vg: "vg".into(),
            run_dir: "/tmp".into(),
            extent: std::sync::OnceLock::from(4 << 20),
        };
        let lv = lvm::LvRow {
            name: meta.volume.to_string(),
            size: 4096,
            tags: BlockDomain::tags_for(&meta),
            first_pe: Some(0),
        };
        let v = dom.to_volume(&lv).unwrap().unwrap();
        assert_eq!(v.meta, meta);
        // What a create answers without reading the LV back: the same.
        let made = dom.created(&meta).unwrap();
        assert_eq!(made.meta, v.meta);
        assert_eq!(
            made.allocated,
            4 << 20,
            "a COW of 123 bytes, rounded up to one extent"
        );
    }
}
