//! FILE domains: a directory (an NFS export in production), laid out as
//! VDSM lays out its file domains:
//!
//! ```text
//! <location>/<domain-id>/dom_md/metadata          domain metadata (JSON)
//! <location>/<domain-id>/dom_md/deleted/<req-id>  completed delete requests
//! <location>/<domain-id>/dom_md/writer            metadata-writer generation
//! <location>/<domain-id>/images/<image>/<volume>  volume data (raw or qcow2)
//! <location>/<domain-id>/images/<image>/<volume>.meta  volume metadata (JSON)
//! <location>/<domain-id>/master/vms/<vm>/<vm>.ovf   VM descriptors (EXPORT only)
//! ```
//!
//! A qcow2 child names its parent by the parent's bare volume id, resolved
//! in the image's directory, so the chain stays valid wherever it is mounted.
use crate::backend::{Backend, DELETE_JOURNAL_TTL_SECS};
use crate::descriptor::DescriptorStore;
use crate::error::{Result, StorageError};
use crate::model::*;
use crate::qcow2;
use crate::tool;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use uuid::Uuid;

/// Where an EXPORT domain keeps its VM descriptors, as oVirt does.
const VMS_DIR: &str = "master/vms";

#[derive(Serialize, Deserialize)]
struct DomainMetadata {
    version: u32,
    domain_id: Uuid,
    name: String,
    #[serde(rename = "type")]
    domain_type: DomainType,
    /// Absent on domains laid out before roles existed: those are DATA.
    /// Adding it keeps the version: older readers ignore the field.
    #[serde(default)]
    role: DomainRole,
}

pub struct FileDomain {
    id: Uuid,
    name: String,
    role: DomainRole,
    location: PathBuf,
    dir: PathBuf,
    /// Ovirt: an oVirt export domain, adopted read-only; its metadata is
    /// VDSM's and every change is refused (see [`crate::ovirt`]).
    format: DomainFormat,
    /// VDSM's domain format version (Ovirt), else ramsnap's.
    metadata_version: u32,
    /// Ovirt: the oVirt data center it is attached to (POOL_UUID), if any;
    /// while attached, ramsnap only reads it.
    pool: Option<String>,
}

impl FileDomain {
    /// Creates a new domain under `location`.
    pub fn create(location: &Path, id: Uuid, name: &str, role: DomainRole) -> Result<FileDomain> {
        let dir = location.join(id.to_string());
        fs::create_dir_all(dir.join("dom_md/deleted"))?;
        fs::create_dir_all(dir.join("images"))?;
        if role == DomainRole::Export {
            fs::create_dir_all(dir.join(VMS_DIR))?;
        }
        let md = DomainMetadata {
            version: METADATA_VERSION,
            domain_id: id,
            name: name.to_string(),
            domain_type: DomainType::File,
            role,
        };
        write_atomic(
            &dir.join("dom_md/metadata"),
            &serde_json::to_vec_pretty(&md).expect("serializable"),
        )?;
        Ok(FileDomain {
            id,
            name: name.to_string(),
            role,
            location: location.to_path_buf(),
            dir,
            format: DomainFormat::Ramsnap,
            metadata_version: METADATA_VERSION,
            pool: None,
        })
    }

    /// Lays out a new oVirt 3.3 export domain under `location` (see
    /// [`crate::ovirt`]): VDSM's metadata with its checksum, the empty
    /// lease and mailbox files, `images`, `master/vms`, `master/tasks`,
    /// owned by vdsm:kvm as oVirt expects of an export domain.
    pub fn create_ovirt(location: &Path, id: Uuid, name: &str) -> Result<FileDomain> {
        let dir = location.join(id.to_string());
        for d in ["dom_md", "images", "master/vms", "master/tasks"] {
            fs::create_dir_all(dir.join(d))?;
        }
        for f in ["ids", "leases", "inbox", "outbox"] {
            write_atomic(&dir.join("dom_md").join(f), b"")?;
        }
        let text = crate::ovirt::new_domain_metadata(id, name, location)?;
        write_atomic(&dir.join("dom_md/metadata"), text.as_bytes())?;
        crate::ovirt::own_tree(&dir);
        Ok(FileDomain {
            id,
            name: name.to_string(),
            role: DomainRole::Export,
            location: location.to_path_buf(),
            dir,
            format: DomainFormat::Ovirt,
            metadata_version: crate::ovirt::VDSM_EXPORT_VERSION,
            pool: None,
        })
    }

    /// Finds the domains already laid out directly under `location`:
    /// ramsnap's, and oVirt export domains (adopted read-only).
    pub fn discover(location: &Path) -> Result<Vec<FileDomain>> {
        let mut found = Vec::new();
        let entries = match fs::read_dir(location) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(e.into()),
        };
        for entry in entries {
            let entry = entry?;
            let Some(id) = entry.file_name().to_str().and_then(|n| Uuid::parse_str(n).ok()) else {
                continue;
            };
            let md_path = entry.path().join("dom_md/metadata");
            let bytes = crate::ovirt::read_bounded(&md_path, ramsnap_common::ovirt::meta::MAX_BYTES)
                .map_err(|e| StorageError::CorruptMetadata {
                    subject: md_path.display().to_string(),
                    reason: e.to_string(),
                })?;
            let Some(bytes) = bytes else {
                continue;
            };
            if crate::ovirt::is_vdsm_metadata(&bytes) {
                let md = crate::ovirt::read_domain_metadata(id, &bytes)?;
                found.push(FileDomain {
                    id,
                    name: md.name,
                    role: DomainRole::Export,
                    location: location.to_path_buf(),
                    dir: entry.path(),
                    format: DomainFormat::Ovirt,
                    metadata_version: md.version,
                    pool: md.pool,
                });
                continue;
            }
            let md: DomainMetadata =
                serde_json::from_slice(&bytes).map_err(|e| StorageError::CorruptMetadata {
                    subject: md_path.display().to_string(),
                    reason: e.to_string(),
                })?;
            if md.domain_id != id || md.domain_type != DomainType::File {
                return Err(StorageError::CorruptMetadata {
                    subject: md_path.display().to_string(),
                    reason: "domain id or type does not match its directory".into(),
                });
            }
            if md.version > METADATA_VERSION {
                return Err(StorageError::CorruptMetadata {
                    subject: md_path.display().to_string(),
                    reason: format!("metadata version {} is newer than this service knows", md.version),
                });
            }
            found.push(FileDomain {
                id,
                name: md.name,
                role: md.role,
                location: location.to_path_buf(),
                dir: entry.path(),
                format: DomainFormat::Ramsnap,
                metadata_version: METADATA_VERSION,
                pool: None,
            });
        }
        Ok(found)
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    fn image_dir(&self, image: Uuid) -> PathBuf {
        self.dir.join("images").join(image.to_string())
    }

    fn volume_path(&self, image: Uuid, volume: Uuid) -> PathBuf {
        self.image_dir(image).join(volume.to_string())
    }

    fn meta_path(&self, image: Uuid, volume: Uuid) -> PathBuf {
        self.image_dir(image).join(format!("{volume}.meta"))
    }

    /// Where [`Backend::create_legal`] writes a volume's data before the
    /// data takes its name: not a volume (list reads `.meta` files only).
    fn staging_path(&self, image: Uuid, volume: Uuid) -> PathBuf {
        self.image_dir(image).join(format!("{volume}.creating"))
    }

    /// The request index: `dom_md/requests/<request id>`, a symlink whose
    /// target text is `<image>/<volume>`, made before the volume's
    /// metadata (so it never misses a volume that records the request) and
    /// removed with the volume. A link whose volume is gone, or does not
    /// record the request, is not a match. `.complete` says the index
    /// covers every volume: domains laid out before it get it built once
    /// from a scan.
    fn requests_dir(&self) -> PathBuf {
        self.dir.join("dom_md/requests")
    }

    fn ensure_request_index(&self) -> Result<()> {
        let dir = self.requests_dir();
        if dir.join(".complete").exists() {
            return Ok(());
        }
        fs::create_dir_all(&dir)?;
        for v in self.list(None)? {
            if let Some(r) = v.meta.request_id {
                self.link_request(r, v.meta.image, v.meta.volume)?;
            }
        }
        sync_dir(&dir)?;
        write_atomic(&dir.join(".complete"), b"")
    }

    fn link_request(&self, request: Uuid, image: Uuid, volume: Uuid) -> Result<()> {
        let link = self.requests_dir().join(request.to_string());
        remove_if_exists(&link)?;
        std::os::unix::fs::symlink(format!("{image}/{volume}"), &link)?;
        Ok(())
    }

    fn unlink_request(&self, request: Uuid, image: Uuid, volume: Uuid) -> Result<()> {
        let link = self.requests_dir().join(request.to_string());
        match fs::read_link(&link) {
            Ok(t) if t == Path::new(&format!("{image}/{volume}")) => remove_if_exists(&link),
            _ => Ok(()),
        }
    }

    fn read_volume(&self, image: Uuid, volume: Uuid) -> Result<Option<Volume>> {
        if self.format == DomainFormat::Ovirt {
            return self.read_ovirt_volume(image, volume);
        }
        let meta_path = self.meta_path(image, volume);
        let mut meta: VolumeMeta = match read_small(&meta_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StorageError::CorruptMetadata {
                // The volume, not the host path of its metadata file.
                subject: format!("volume {}/{image}/{volume}", self.id),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // A volume whose data is gone (a crash between the two removals) is
        // never LEGAL.
        let allocated = match fs::metadata(self.volume_path(image, volume)) {
            Ok(m) => m.blocks() * 512,
            Err(_) => {
                meta.legality = Legality::Illegal;
                0
            }
        };
        Ok(Some(Volume {
            domain: self.id,
            meta,
            allocated,
        }))
    }

    /// True when a volume of the image names `volume` as its parent.
    fn has_children(&self, image: Uuid, volume: Uuid) -> bool {
        self.list(Some(image))
            .map(|vs| vs.iter().any(|v| v.meta.parent == Some(volume)))
            .unwrap_or(false)
    }

    /// On an oVirt domain, VDSM's VOLTYPE of `parent` follows its new
    /// child: INTERNAL.
    fn mark_parent(&self, meta: &VolumeMeta) -> Result<()> {
        if self.format != DomainFormat::Ovirt {
            return Ok(());
        }
        match meta.parent.map(|p| self.get(meta.image, p)) {
            Some(Ok(p)) => self.write_meta(&p.meta),
            _ => Ok(()),
        }
    }

    /// The name a new qcow2 child records for its parent: the bare id
    /// (ramsnap's), or `../<image>/<parent>` as VDSM 3.3 writes it.
    fn backing_name(&self, meta: &VolumeMeta, parent: &VolumeMeta) -> String {
        match self.format {
            DomainFormat::Ramsnap => parent.volume.to_string(),
            DomainFormat::Ovirt => format!("../{}/{}", meta.image, parent.volume),
        }
    }

    /// An oVirt volume: its `.meta` and its data file checked as
    /// [`crate::ovirt`] says; a volume whose data is gone is ILLEGAL.
    fn read_ovirt_volume(&self, image: Uuid, volume: Uuid) -> Result<Option<Volume>> {
        if !crate::ovirt::check_image_dir(self.id, image, &self.image_dir(image))? {
            return Ok(None);
        }
        let Some(mut meta) =
            crate::ovirt::read_volume_meta(self.id, image, volume, &self.meta_path(image, volume))?
        else {
            return Ok(None);
        };
        let allocated = match crate::ovirt::check_data(self.id, &meta, &self.volume_path(image, volume))? {
            Some(a) => a,
            None => {
                meta.legality = Legality::Illegal;
                0
            }
        };
        Ok(Some(Volume {
            domain: self.id,
            meta,
            allocated,
        }))
    }

    /// Every change to an oVirt domain attached to an oVirt data center is
    /// refused.
    fn writable(&self) -> Result<()> {
        match &self.pool {
            None => Ok(()),
            Some(pool) => Err(crate::ovirt::read_only(self.id, pool)),
        }
    }

    fn write_meta(&self, meta: &VolumeMeta) -> Result<()> {
        self.writable()?;
        if self.format == DomainFormat::Ovirt {
            let path = self.meta_path(meta.image, meta.volume);
            let leaf = !self.has_children(meta.image, meta.volume);
            write_atomic(
                &path,
                crate::ovirt::volume_meta_text(self.id, meta, leaf)?.as_bytes(),
            )?;
            crate::ovirt::own(&path);
            return Ok(());
        }
        write_atomic(
            &self.meta_path(meta.image, meta.volume),
            &serde_json::to_vec_pretty(meta).expect("serializable"),
        )
    }

    /// Writes a new volume's data at `path` (its own name, or its staging
    /// name) and makes it durable.
    fn create_data(&self, path: &Path, meta: &VolumeMeta, parent: Option<&VolumeMeta>) -> Result<()> {
        match meta.format {
            Format::Raw => {
                let f = fs::OpenOptions::new().write(true).create_new(true).open(path)?;
                f.set_len(meta.capacity)?;
                if meta.allocation == Allocation::Preallocated {
                    fallocate(&f, meta.capacity)?;
                }
                f.sync_all()?;
            }
            // An empty sparse overlay is written here (see crate::qcow2).
            Format::Cow if meta.allocation == Allocation::Sparse => {
                let f = fs::OpenOptions::new().write(true).create_new(true).open(path)?;
                let name = parent.map(|p| self.backing_name(meta, p));
                let backing = parent.zip(name.as_deref()).map(|(p, name)| qcow2::BackingFile {
                    name,
                    format: p.format.qemu_name(),
                });
                qcow2::create_in_empty_file(&f, meta.capacity, backing)?;
                f.sync_all()?;
            }
            Format::Cow => {
                let mut cmd = Command::new("qemu-img");
                cmd.current_dir(self.image_dir(meta.image))
                    .args(["create", "-q", "-f", "qcow2"]);
                if let Some(p) = parent {
                    // -u: the size is given, so the parent need not be opened; it may be
                    // in use (and locked) by a running VM taking a snapshot.
                    cmd.args([
                        "-u",
                        "-b",
                        &self.backing_name(meta, p),
                        "-F",
                        p.format.qemu_name(),
                    ]);
                }
                let prealloc = match meta.allocation {
                    Allocation::Sparse => "off",
                    Allocation::Preallocated => "falloc",
                };
                cmd.args(["-o", &format!("preallocation={prealloc}")]);
                cmd.arg(path).arg(meta.capacity.to_string());
                tool::run(&mut cmd)?;
            }
        }
        Ok(())
    }

    /// The image directory and the request index entry, made durable
    /// before the volume's metadata (see `requests_dir`).
    fn begin_create(&self, meta: &VolumeMeta) -> Result<()> {
        fs::create_dir_all(self.image_dir(meta.image))?;
        if let Some(r) = meta.request_id {
            self.ensure_request_index()?;
            self.link_request(r, meta.image, meta.volume)?;
            sync_dir(&self.requests_dir())?;
        }
        Ok(())
    }

    /// On an oVirt domain, a new volume's files and image directory belong
    /// to vdsm:kvm, as VDSM's own.
    fn own_new(&self, meta: &VolumeMeta) {
        if self.format == DomainFormat::Ovirt {
            crate::ovirt::own(&self.image_dir(meta.image));
            crate::ovirt::own(&self.volume_path(meta.image, meta.volume));
            crate::ovirt::own(&self.meta_path(meta.image, meta.volume));
        }
    }

    fn remove_files(&self, image: Uuid, volume: Uuid) -> Result<()> {
        remove_if_exists(&self.staging_path(image, volume))?;
        remove_if_exists(&self.volume_path(image, volume))?;
        remove_if_exists(&self.meta_path(image, volume))?;
        // The image directory goes with its last volume.
        let _ = fs::remove_dir(self.image_dir(image));
        Ok(())
    }
}

impl Backend for FileDomain {
    fn info(&self) -> Result<DomainInfo> {
        let st = statvfs(&self.dir)?;
        Ok(DomainInfo {
            id: self.id,
            name: self.name.clone(),
            domain_type: DomainType::File,
            role: self.role,
            location: self.location.display().to_string(),
            capacity: st.0,
            free: st.1,
            metadata_version: self.metadata_version,
            format: self.format,
            read_only: self.pool.is_some(),
        })
    }

    fn list(&self, image: Option<Uuid>) -> Result<Vec<Volume>> {
        let images: Vec<Uuid> = match image {
            Some(i) => vec![i],
            None => fs::read_dir(self.dir.join("images"))?
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| Uuid::parse_str(n).ok()))
                .collect(),
        };
        let mut out = Vec::new();
        for image in images {
            let Ok(entries) = fs::read_dir(self.image_dir(image)) else {
                continue;
            };
            for entry in entries.filter_map(|e| e.ok()) {
                let name = entry.file_name();
                let Some(vol) = name.to_str().and_then(|n| n.strip_suffix(".meta")) else {
                    continue;
                };
                let Ok(vol) = Uuid::parse_str(vol) else { continue };
                if let Some(v) = self.read_volume(image, vol)? {
                    out.push(v);
                }
            }
        }
        out.sort_by_key(|v| (v.meta.image, v.meta.created_at, v.meta.volume));
        Ok(out)
    }

    fn get(&self, image: Uuid, volume: Uuid) -> Result<Volume> {
        self.read_volume(image, volume)?
            .ok_or(StorageError::VolumeNotFound(VolumeRef {
                domain: self.id,
                image,
                volume,
            }))
    }

    fn create(&self, meta: &VolumeMeta, parent: Option<&VolumeMeta>) -> Result<()> {
        self.writable()?;
        self.begin_create(meta)?;
        // Metadata first, so that a crash part-way leaves a visible ILLEGAL
        // volume rather than an unaccounted file.
        let path = self.volume_path(meta.image, meta.volume);
        let result = self
            .write_meta(meta)
            .and_then(|_| self.create_data(&path, meta, parent))
            .and_then(|_| self.mark_parent(meta));
        if let Err(e) = result {
            let _ = self.remove_files(meta.image, meta.volume);
            return Err(e);
        }
        self.own_new(meta);
        Ok(())
    }

    /// One metadata write instead of two: the metadata says LEGAL from the
    /// start, and the data is written under its staging name and renamed
    /// into place when complete. Until then the volume reads as ILLEGAL
    /// (a volume without its data is never LEGAL, see `read_volume`), on
    /// this host and on any other that shares the domain, and a crash
    /// part-way leaves exactly that: a visible ILLEGAL volume, removed
    /// with its staging file like any other.
    fn create_legal(&self, meta: &VolumeMeta, parent: Option<&VolumeMeta>) -> Result<()> {
        self.writable()?;
        debug_assert_eq!(meta.legality, Legality::Legal);
        self.begin_create(meta)?;
        let (image, volume) = (meta.image, meta.volume);
        let result = self.write_meta(meta).and_then(|_| {
            let staging = self.staging_path(image, volume);
            self.create_data(&staging, meta, parent)?;
            fs::rename(&staging, self.volume_path(image, volume))?;
            sync_dir(&self.image_dir(image))?;
            self.mark_parent(meta)
        });
        if let Err(e) = result {
            let _ = self.remove_files(image, volume);
            return Err(e);
        }
        self.own_new(meta);
        Ok(())
    }

    fn set_legality(&self, image: Uuid, volume: Uuid, legality: Legality) -> Result<()> {
        let mut v = self.get(image, volume)?;
        v.meta.legality = legality;
        self.write_meta(&v.meta)
    }

    fn set_parent(&self, image: Uuid, volume: Uuid, parent: Option<Uuid>) -> Result<()> {
        let mut v = self.get(image, volume)?;
        v.meta.parent = parent;
        self.write_meta(&v.meta)
    }

    fn remove(&self, image: Uuid, volume: Uuid) -> Result<()> {
        self.writable()?;
        let request = self
            .read_volume(image, volume)
            .ok()
            .flatten()
            .and_then(|v| v.meta.request_id);
        if self.meta_path(image, volume).exists() {
            // Mark first: a crash mid-removal must not leave a LEGAL volume
            // without its data.
            let _ = self.set_legality(image, volume, Legality::Illegal);
        }
        let parent = self
            .read_volume(image, volume)
            .ok()
            .flatten()
            .and_then(|v| v.meta.parent);
        self.remove_files(image, volume)?;
        if let (DomainFormat::Ovirt, Some(p)) = (self.format, parent) {
            // Its parent is a leaf again (VOLTYPE).
            if let Ok(p) = self.get(image, p) {
                self.write_meta(&p.meta)?;
            }
        }
        // After the files: a link left by a crash here names nothing.
        if let Some(r) = request {
            self.unlink_request(r, image, volume)?;
        }
        Ok(())
    }

    fn prepare(&self, image: Uuid, volume: Uuid) -> Result<PathBuf> {
        if self.format == DomainFormat::Ovirt {
            // Checked as listed: no link, the backing file its .meta names.
            self.get(image, volume)?;
        }
        let path = self.volume_path(image, volume);
        if !path.exists() {
            return Err(StorageError::VolumeNotFound(VolumeRef {
                domain: self.id,
                image,
                volume,
            }));
        }
        Ok(path)
    }

    fn prepare_listed(&self, v: &Volume) -> Result<PathBuf> {
        // Listing read each volume's data file: a LEGAL one had its data
        // (see `read_volume`). Anything else is checked again.
        if self.format == DomainFormat::Ramsnap && v.meta.legality == Legality::Legal {
            return Ok(self.volume_path(v.meta.image, v.meta.volume));
        }
        self.prepare(v.meta.image, v.meta.volume)
    }

    fn is_prepared(&self, _image: Uuid, _volume: Uuid) -> bool {
        // Files are always accessible; there is nothing to undo.
        false
    }

    fn teardown(&self, _image: Uuid, _volume: Uuid) -> Result<()> {
        Ok(())
    }

    fn natural_allocation(&self) -> Allocation {
        Allocation::Sparse
    }

    fn role(&self) -> DomainRole {
        self.role
    }

    fn descriptors(&self) -> Option<DescriptorStore> {
        (self.role == DomainRole::Export).then(|| match (self.format, &self.pool) {
            (DomainFormat::Ramsnap, _) => DescriptorStore::new(self.id, self.dir.join(VMS_DIR)),
            (DomainFormat::Ovirt, None) => DescriptorStore::new_ovirt(self.id, self.dir.join(VMS_DIR)),
            (DomainFormat::Ovirt, Some(pool)) => {
                DescriptorStore::read_only(self.id, pool.clone(), self.dir.join(VMS_DIR))
            }
        })
    }

    fn record_delete(&self, request: Uuid, survivor: Option<Uuid>) -> Result<()> {
        self.writable()?;
        let dir = self.dir.join("dom_md/deleted");
        fs::create_dir_all(&dir)?;
        let survivor = survivor.map(|s| s.to_string()).unwrap_or_default();
        write_atomic(
            &dir.join(request.to_string()),
            format!("{}\n{survivor}\n", now_unix()).as_bytes(),
        )?;
        // Forget requests past their retry window.
        let horizon = now_unix() - DELETE_JOURNAL_TTL_SECS;
        for entry in fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
            let stamp = fs::read_to_string(entry.path())
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok());
            if stamp.is_some_and(|t| t < horizon) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn find_request(&self, request: Uuid) -> Result<Option<Volume>> {
        if self.pool.is_some() {
            // Attached to oVirt: read only, and ramsnap made nothing on it
            // since.
            return Ok(None);
        }
        self.ensure_request_index()?;
        let target = match fs::read_link(self.requests_dir().join(request.to_string())) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let named = target
            .to_str()
            .and_then(|t| t.split_once('/'))
            .and_then(|(i, v)| Some((Uuid::parse_str(i).ok()?, Uuid::parse_str(v).ok()?)));
        let Some((image, volume)) = named else {
            return Ok(None);
        };
        Ok(self
            .read_volume(image, volume)?
            .filter(|v| v.meta.request_id == Some(request)))
    }

    /// `dom_md/writer`: the generation, as text.
    fn writer_generation(&self) -> Result<i64> {
        let path = self.dir.join("dom_md/writer");
        match fs::read_to_string(&path) {
            Ok(s) => s
                .trim()
                .parse::<i64>()
                .map_err(|e| StorageError::CorruptMetadata {
                    subject: path.display().to_string(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    fn set_writer_generation(&self, _previous: i64, generation: i64) -> Result<()> {
        self.writable()?;
        write_atomic(
            &self.dir.join("dom_md/writer"),
            format!("{generation}\n").as_bytes(),
        )
    }

    fn delete_recorded(&self, request: Uuid) -> Result<Option<Option<Uuid>>> {
        match fs::read_to_string(self.dir.join("dom_md/deleted").join(request.to_string())) {
            Ok(s) => Ok(Some(
                s.lines().nth(1).and_then(|l| Uuid::parse_str(l.trim()).ok()),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Writes through a temporary file and a rename, so readers (other hosts on
/// the same NFS export) see the old or the new content, never a mix.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", Uuid::new_v4().simple()));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// A small file's content, read without asking its size first (as
/// `fs::read` does: one `statx` more per volume metadata, and a listing
/// reads every volume's).
fn read_small(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(4096);
    fs::File::open(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Makes a directory's entries (a rename, a new or removed child) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn fallocate(f: &fs::File, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor and plain integer arguments.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// (capacity, free) in bytes of the file system holding `path`.
pub(crate) fn statvfs(path: &Path) -> Result<(u64, u64)> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| StorageError::invalid("location", "path contains a NUL byte"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let frsize = st.f_frsize;
    Ok((st.f_blocks * frsize, st.f_bavail * frsize))
}
