//! The storage domain layer: the domains attached to this host and the
//! operations on their volumes, with the guarantees the API promises:
//! request-id idempotency, metadata changes serialized per domain, and no
//! half-made volume left by a failure.
use crate::backend::{Backend, Located, Survey};
use crate::block::BlockDomain;
use crate::copy::{self, Backing, CopyJob};
use crate::descriptor::{self, DescriptorStore};
use crate::error::{Result, StorageError};
use crate::file::FileDomain;
use crate::holds::{Holds, RunningHold};
use crate::limits;
use crate::model::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, RwLock};
use tokio::sync::{watch, Mutex, RwLock as AsyncRwLock};
use uuid::Uuid;

#[derive(Clone, Debug)]
pub struct Config {
    /// Where this instance remembers the domains it was asked to attach.
    pub state_dir: PathBuf,
    /// Where prepared BLOCK volumes get their stable paths.
    pub run_dir: PathBuf,
    /// FILE domains may only live inside these directories (NFS mounts in
    /// production); every subdirectory of a root is scanned at start.
    pub file_roots: Vec<PathBuf>,
    /// The block devices BLOCK domains may be on. RegisterDomain lays out
    /// (or adopts) a domain only on one of these, and refuses any other
    /// device with PERMISSION_DENIED: an empty list allows none. At start,
    /// when not empty, only VGs on these devices are adopted (as an LVM
    /// filter would); when empty, every ramsnap VG the host sees (adopting
    /// writes nothing).
    pub block_devices: Vec<PathBuf>,
}

#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    domains: RwLock<HashMap<Uuid, Arc<Domain>>>,
    /// Copies running in this process, by target volume, so that a retried
    /// CopyVolume joins the one under way.
    copies: StdMutex<HashMap<VolumeRef, watch::Receiver<CopyState>>>,
    /// Volumes in use on this host: prepared, or under a running copy.
    holds: Arc<Holds>,
}

struct Domain {
    kind: DomainType,
    backend: Arc<dyn Backend>,
    /// Serializes metadata changes on this domain within the process (held
    /// for writing); LVM's own VG lock covers other processes on the same
    /// host. A volume creation on a FILE domain holds it for reading, and
    /// [`Domain::creates`] for its image and request: creations in other
    /// images run side by side (a snapshot's overlays and memory volumes of
    /// many VMs at once). Prepares and teardowns (both kinds) hold it for
    /// reading and [`Domain::creates`] for their image.
    lock: AsyncRwLock<()>,
    creates: KeyedLocks,
    /// Serializes changes to VM descriptors (EXPORT domains), apart from
    /// volume changes: a Delete must not remove a VM directory between a
    /// Put's mkdir and its rename, and a large Put must not hold up volumes.
    descriptor_lock: Mutex<()>,
    /// Serializes [`Storage::admit_writer`]'s read and record of the
    /// writer generation within the process.
    writer: Mutex<()>,
}

/// Locks by key (an image, a request id) over a fixed set of stripes: two
/// keys may share a stripe, which only serializes them.
struct KeyedLocks {
    stripes: Vec<Mutex<()>>,
}

impl Default for KeyedLocks {
    fn default() -> KeyedLocks {
        KeyedLocks {
            stripes: (0..64).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl KeyedLocks {
    /// Locks the stripes of the given keys, in stripe order (no deadlock
    /// between two callers), each once.
    async fn lock(&self, keys: &[Option<Uuid>]) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut idx: Vec<usize> = keys
            .iter()
            .flatten()
            .map(|k| (k.as_u128() % self.stripes.len() as u128) as usize)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        let mut guards = Vec::with_capacity(idx.len());
        for i in idx {
            guards.push(self.stripes[i].lock().await);
        }
        guards
    }
}

/// What a caller wants created.
#[derive(Clone, Debug)]
pub struct NewVolume {
    pub request_id: Option<Uuid>,
    pub domain: Uuid,
    pub image: Option<Uuid>,
    pub volume: Option<Uuid>,
    pub capacity: u64,
    pub format: Format,
    pub allocation: Option<Allocation>,
    pub purpose: Purpose,
    pub parent: Option<Uuid>,
    pub description: String,
}

#[derive(Clone, Debug)]
pub struct CopyRequest {
    pub request_id: Option<Uuid>,
    pub source: VolumeRef,
    pub target_domain: Uuid,
    pub target_image: Option<Uuid>,
    pub target_volume: Option<Uuid>,
    pub target_format: Option<Format>,
    pub target_allocation: Option<Allocation>,
    pub description: String,
    /// Copy only the source's own layer, onto the same parent already on
    /// the target (see [`layer_parent`]).
    pub keep_parent: bool,
    /// The target's purpose when not the source's: a DISK source (RAW,
    /// copied whole) as a memory volume (see [`target_purpose`]).
    pub target_purpose: Option<Purpose>,
    /// Compute the `blake3-4m` checksum of the bytes copied (a RAW source
    /// without a parent only): see [`CopyState::checksum`].
    pub checksum: bool,
    /// The domain writer making the copy, checked against the target
    /// domain as [`Storage::admit_writer`] checks (on BLOCK, in the same
    /// read as the rest of what the target's create reads first); None
    /// for a call from outside a saga.
    pub writer: Option<i64>,
}

/// The state of a copy as its watchers see it.
#[derive(Clone, Debug)]
pub struct CopyState {
    pub processed: u64,
    pub total: u64,
    pub outcome: Option<Result<Volume>>,
    /// The checksum of the bytes this copy wrote, when asked for. Not known
    /// when the request's copy had already ended before (a retry).
    pub checksum: Option<ramsnap_common::checksum::Checksum>,
}

#[derive(Serialize, Deserialize, Default)]
struct Attached {
    domains: Vec<AttachedDomain>,
}

#[derive(Serialize, Deserialize, Clone)]
struct AttachedDomain {
    id: Uuid,
    #[serde(rename = "type")]
    kind: DomainType,
    location: PathBuf,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(StorageError::Tool {
            cmd: "blocking task".into(),
            stderr: e.to_string(),
        })
    })
}

impl Storage {
    /// Opens the storage layer and rediscovers every domain it can see: the
    /// ones recorded in the state dir, every FILE domain inside the file
    /// roots, and every ramsnap VG on this host's block devices.
    pub async fn open(config: Config) -> Result<Storage> {
        let run_dir = config.run_dir.clone();
        let holds = blocking(move || Holds::open(&run_dir)).await?;
        let storage = Storage {
            inner: Arc::new(Inner {
                config: config.clone(),
                domains: RwLock::new(HashMap::new()),
                copies: StdMutex::new(HashMap::new()),
                holds: Arc::new(holds),
            }),
        };
        let found = blocking(move || discover(&config)).await?;
        for (kind, backend) in found {
            storage.insert(kind, backend);
        }
        Ok(storage)
    }

    fn insert(&self, kind: DomainType, backend: Arc<dyn Backend>) -> Uuid {
        let id = match backend.info() {
            Ok(i) => i.id,
            Err(_) => return Uuid::nil(),
        };
        let mut map = self.inner.domains.write().expect("lock poisoned");
        map.entry(id).or_insert_with(|| {
            Arc::new(Domain {
                kind,
                backend,
                lock: AsyncRwLock::new(()),
                creates: KeyedLocks::default(),
                descriptor_lock: Mutex::new(()),
                writer: Mutex::new(()),
            })
        });
        id
    }

    fn domain(&self, id: Uuid) -> Result<Arc<Domain>> {
        self.inner
            .domains
            .read()
            .expect("lock poisoned")
            .get(&id)
            .cloned()
            .ok_or(StorageError::DomainNotFound(id))
    }

    /// Admits a metadata change on `domain` made under domain-writer
    /// generation `generation` (the coordinator's choice of this host as the
    /// domain's one metadata writer; see `ramsnap_snapshot::writers`).
    /// The highest generation is recorded on the domain itself, where every
    /// host sees it: a call under a lower one comes from a writer that was
    /// replaced and is refused with FAILED_PRECONDITION `STALE_WRITER`; a
    /// higher one is recorded. Read on every call, never cached: the
    /// replacing writer is another process, on another host.
    pub async fn admit_writer(&self, domain: Uuid, generation: i64) -> Result<()> {
        let d = self.domain(domain)?;
        let _one = d.writer.lock().await;
        let backend = d.backend.clone();
        blocking(move || {
            let recorded = backend.writer_generation()?;
            check_writer(backend.as_ref(), domain, Some(generation), recorded)
        })
        .await
    }

    /// Attaches a domain: adopts the one already at `location`, or lays out
    /// a new one there with `role` (None: DATA). Returns the domain and
    /// whether it was adopted. An adopted domain keeps the role recorded on
    /// it; asking for another one is refused rather than silently ignored.
    pub async fn register_domain(
        &self,
        id: Option<Uuid>,
        name: String,
        kind: DomainType,
        location: String,
        role: Option<DomainRole>,
        format: Option<DomainFormat>,
    ) -> Result<(DomainInfo, bool)> {
        if !valid_domain_name(&name) {
            return Err(StorageError::invalid(
                "name",
                format!(
                    "must be 1-{} characters of [A-Za-z0-9_.-]",
                    limits::MAX_DOMAIN_NAME_BYTES
                ),
            ));
        }
        limits::check_text("location", &location, limits::MAX_LOCATION_BYTES)?;
        if kind == DomainType::Block && role == Some(DomainRole::Export) {
            // An export domain is carried to another data center as a
            // directory tree with its OVFs; a VG's tags cannot hold those.
            return Err(StorageError::invalid(
                "role",
                "EXPORT domains are FILE domains; a BLOCK domain is always DATA",
            ));
        }
        if format == Some(DomainFormat::Ovirt) && (kind != DomainType::File || role == Some(DomainRole::Data))
        {
            return Err(StorageError::invalid(
                "format",
                "OVIRT lays out an oVirt export domain: a FILE domain with role EXPORT (or unspecified)",
            ));
        }
        let config = self.inner.config.clone();
        // A new domain must not take the id of one attached elsewhere.
        let taken = id.filter(|i| self.domain(*i).is_ok());
        let id_taken = |id: Uuid| StorageError::AlreadyExists {
            resource: "storage_domain",
            id: id.to_string(),
            reason: "a storage domain with this id already exists; leave domain_id empty for a new one"
                .into(),
        };
        let (backend, adopted) = match kind {
            DomainType::File => {
                let dir = self.checked_file_location(&location)?;
                blocking(move || {
                    let existing = FileDomain::discover(&dir)?;
                    match existing.into_iter().next() {
                        Some(d) => Ok((Arc::new(d) as Arc<dyn Backend>, true)),
                        None => {
                            if let Some(t) = taken {
                                return Err(id_taken(t));
                            }
                            let id = id.unwrap_or_else(Uuid::new_v4);
                            let d = match format {
                                Some(DomainFormat::Ovirt) => FileDomain::create_ovirt(&dir, id, &name)?,
                                _ => FileDomain::create(&dir, id, &name, role.unwrap_or_default())?,
                            };
                            Ok((Arc::new(d) as Arc<dyn Backend>, false))
                        }
                    }
                })
                .await?
            }
            DomainType::Block => {
                let canonical = self.checked_block_device(&location)?;
                let run_dir = config.run_dir.clone();
                blocking(move || {
                    let found = BlockDomain::discover(&run_dir)?;
                    if let Some((d, _)) = found.into_iter().find(|(_, pv)| Path::new(pv) == canonical) {
                        return Ok((Arc::new(d) as Arc<dyn Backend>, true));
                    }
                    if let Some(want) = id {
                        // The VG is named by the id: any VG of that name (on
                        // another device) takes it.
                        let name = want.to_string();
                        if taken.is_some() || crate::lvm::vgs_all()?.iter().any(|vg| vg.name == name) {
                            return Err(id_taken(want));
                        }
                    }
                    if let crate::lvm::Probe::NotBlank(why) = crate::lvm::probe(&canonical) {
                        return Err(StorageError::precondition(
                            "DEVICE_NOT_EMPTY",
                            canonical.display(),
                            format!(
                                "{} is not blank: {why}; refusing to lay out a domain over it",
                                canonical.display()
                            ),
                        ));
                    }
                    let d =
                        BlockDomain::create(&canonical, id.unwrap_or_else(Uuid::new_v4), &name, &run_dir)?;
                    Ok((Arc::new(d) as Arc<dyn Backend>, false))
                })
                .await?
            }
        };
        let info = {
            let b = backend.clone();
            blocking(move || b.info()).await?
        };
        if let Some(want) = id {
            if adopted && want != info.id {
                return Err(StorageError::precondition(
                    "DOMAIN_ID_MISMATCH",
                    &location,
                    format!("{location} already holds domain {}, not {want}", info.id),
                ));
            }
        }
        if let Some(want) = format {
            if adopted && want != info.format {
                return Err(StorageError::precondition(
                    "DOMAIN_FORMAT_MISMATCH",
                    info.id,
                    format!(
                        "{location} holds domain {}, laid out as {:?}, not {want:?}",
                        info.id, info.format
                    ),
                ));
            }
        }
        if let Some(want) = role {
            if adopted && want != info.role {
                return Err(StorageError::precondition(
                    "DOMAIN_ROLE_MISMATCH",
                    info.id,
                    format!(
                        "{location} holds domain {}, recorded with role {}, not {want}",
                        info.id, info.role
                    ),
                ));
            }
        }
        self.insert(kind, backend);
        self.remember(AttachedDomain {
            id: info.id,
            kind,
            location: PathBuf::from(&location),
        })
        .await?;
        Ok((info, adopted))
    }

    /// The directory a FILE domain may be registered in. One answer for
    /// "missing", "not a directory" and "outside the roots", quoting only
    /// (the start of) what the caller sent: no probing of the host's file
    /// system, no resolved host path in the message.
    fn checked_file_location(&self, location: &str) -> Result<PathBuf> {
        let path = Path::new(location);
        if !path.is_absolute() {
            return Err(StorageError::invalid("location", "must be an absolute path"));
        }
        let refused = || {
            StorageError::invalid(
                "location",
                format!(
                    "{} is not an existing directory inside the service's allowed file roots",
                    limits::echo(location)
                ),
            )
        };
        let canonical = path.canonicalize().map_err(|_| refused())?;
        let inside = self
            .inner
            .config
            .file_roots
            .iter()
            .filter_map(|r| r.canonicalize().ok())
            .any(|r| canonical.starts_with(&r));
        if !inside || !canonical.is_dir() {
            return Err(refused());
        }
        Ok(canonical)
    }

    /// The device a BLOCK domain may be registered on: a block device
    /// under /dev that the configuration allows ([`Config::block_devices`]).
    /// Anything else is refused before the device is opened.
    fn checked_block_device(&self, location: &str) -> Result<PathBuf> {
        use std::os::unix::fs::FileTypeExt;
        let path = Path::new(location);
        if !path.is_absolute() || !location.starts_with("/dev/") || location.contains("/../") {
            return Err(StorageError::invalid(
                "location",
                "must be an absolute path of a block device under /dev",
            ));
        }
        let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let device = canonical(path);
        let allowed = self
            .inner
            .config
            .block_devices
            .iter()
            .any(|d| canonical(d) == device);
        if !allowed {
            let shown = limits::clip(location);
            return Err(StorageError::PermissionDenied {
                resource: "block_device",
                reason_code: "BLOCK_DEVICE_NOT_ALLOWED",
                reason: format!(
                    "{shown} is not one of the block devices this storage service may use \
                     (its --block-device list); nothing was written to it"
                ),
                name: shown,
            });
        }
        let meta = std::fs::metadata(&device)
            .map_err(|e| StorageError::invalid("location", format!("{location} is not accessible: {e}")))?;
        if !meta.file_type().is_block_device() {
            return Err(StorageError::invalid(
                "location",
                format!("{location} is not a block device"),
            ));
        }
        Ok(device)
    }

    async fn remember(&self, entry: AttachedDomain) -> Result<()> {
        let path = self.inner.config.state_dir.join("domains.json");
        let state_dir = self.inner.config.state_dir.clone();
        blocking(move || {
            std::fs::create_dir_all(&state_dir)?;
            let mut attached: Attached = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            attached.domains.retain(|d| d.id != entry.id);
            attached.domains.push(entry);
            crate::file::write_atomic(
                &path,
                &serde_json::to_vec_pretty(&attached).expect("serializable"),
            )
        })
        .await
    }

    pub async fn get_domain(&self, id: Uuid) -> Result<DomainInfo> {
        let d = self.domain(id)?;
        blocking(move || d.backend.info()).await
    }

    pub async fn list_domains(&self) -> Result<Vec<DomainInfo>> {
        let domains: Vec<Arc<Domain>> = self
            .inner
            .domains
            .read()
            .expect("lock poisoned")
            .values()
            .cloned()
            .collect();
        let mut out: Vec<DomainInfo> =
            blocking(move || domains.iter().map(|d| d.backend.info()).collect()).await?;
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    pub async fn get_volume(&self, r: VolumeRef) -> Result<Volume> {
        let d = self.domain(r.domain)?;
        blocking(move || d.backend.get(r.image, r.volume)).await
    }

    pub async fn list_volumes(&self, domain: Uuid, image: Option<Uuid>) -> Result<Vec<Volume>> {
        let d = self.domain(domain)?;
        blocking(move || d.backend.list(image)).await
    }

    pub async fn create_volume(&self, req: NewVolume) -> Result<Volume> {
        self.create_volume_as(req, None).await
    }

    /// [`Storage::create_volume`] by domain writer `writer` (see
    /// [`Storage::admit_writer`]): on BLOCK the fence is read in the same
    /// `pvs` as the rest of what the create reads first (a [`Survey`]).
    pub async fn create_volume_as(&self, req: NewVolume, writer: Option<i64>) -> Result<Volume> {
        limits::check_capacity("capacity_bytes", req.capacity)?;
        limits::check_description("description", &req.description)?;
        let d = self.domain(req.domain)?;
        refuse_export(&d, req.domain)?;
        let allocation = req.allocation.unwrap_or_else(|| d.backend.natural_allocation());
        check_layout(d.kind, req.format, allocation, req.parent.is_some(), "allocation")?;
        if req.parent.is_some() && req.format != Format::Cow {
            return Err(StorageError::invalid(
                "parent_volume_id",
                "only COW volumes can have a parent",
            ));
        }
        if req.parent.is_some() && req.image.is_none() {
            return Err(StorageError::invalid(
                "image_id",
                "is required with parent_volume_id",
            ));
        }
        let backend = d.backend.clone();
        let holds = self.inner.holds.clone();
        if d.kind == DomainType::File {
            if let Some(g) = writer {
                self.admit_writer(req.domain, g).await?;
            }
            let _shared = d.lock.read().await;
            let _keys = d.creates.lock(&[req.image, req.request_id]).await;
            return blocking(move || create_locked(backend.as_ref(), &holds, req, allocation)).await;
        }
        let _guard = d.lock.write().await;
        let _writer = d.writer.lock().await;
        blocking(move || {
            let survey = survey_as(backend.as_ref(), req.domain, writer)?;
            create_surveyed(backend.as_ref(), &holds, req, allocation, survey)
        })
        .await
    }

    /// The two volumes of a snapshot's memory, each in an image of its own.
    /// Both are created, or neither.
    pub async fn create_memory_volumes(
        &self,
        request_id: Option<Uuid>,
        domain: Uuid,
        memory: u64,
        mode: DumpMode,
        description: String,
    ) -> Result<(Volume, Volume)> {
        self.create_memory_volumes_as(request_id, domain, memory, mode, description, None)
            .await
    }

    /// [`Storage::create_memory_volumes`] by domain writer `writer`, as
    /// [`Storage::create_volume_as`].
    pub async fn create_memory_volumes_as(
        &self,
        request_id: Option<Uuid>,
        domain: Uuid,
        memory: u64,
        mode: DumpMode,
        description: String,
        writer: Option<i64>,
    ) -> Result<(Volume, Volume)> {
        if memory == 0 {
            return Err(StorageError::invalid("memory_bytes", "must be greater than 0"));
        }
        limits::check_description("description", &description)?;
        let d = self.domain(domain)?;
        refuse_export(&d, domain)?;
        // One request id drives both volumes: derive a distinct, stable id
        // for each so a retry finds both.
        let sub = |n: u8| request_id.map(|r| Uuid::new_v5(&r, &[n]));
        let base = NewVolume {
            request_id: None,
            domain,
            image: None,
            volume: None,
            capacity: 0,
            format: Format::Raw,
            allocation: None,
            purpose: Purpose::MemoryDump,
            parent: None,
            description,
        };
        let dump = NewVolume {
            request_id: sub(1),
            // Whole sectors, as every volume (a RAM size is, anyway).
            capacity: mode
                .dump_size(memory)
                .div_ceil(limits::SECTOR_BYTES)
                .saturating_mul(limits::SECTOR_BYTES),
            ..base.clone()
        };
        let meta = NewVolume {
            request_id: sub(2),
            capacity: MEMORY_METADATA_BYTES,
            purpose: Purpose::MemoryMetadata,
            ..base
        };
        let backend = d.backend.clone();
        let holds = self.inner.holds.clone();
        let keys = [dump.request_id, meta.request_id];
        // Locked as create_volume locks one volume.
        if d.kind == DomainType::File {
            if let Some(g) = writer {
                self.admit_writer(domain, g).await?;
            }
            let _shared = d.lock.read().await;
            let _keys = d.creates.lock(&keys).await;
            return blocking(move || create_pair_locked(backend.as_ref(), &holds, dump, meta, None)).await;
        }
        let _guard = d.lock.write().await;
        let _writer = d.writer.lock().await;
        blocking(move || {
            let survey = survey_as(backend.as_ref(), domain, writer)?;
            create_pair_locked(backend.as_ref(), &holds, dump, meta, Some(survey))
        })
        .await
    }

    pub async fn delete_volume(&self, r: VolumeRef, request_id: Option<Uuid>) -> Result<()> {
        let d = self.domain(r.domain)?;
        let _guard = d.lock.write().await;
        let backend = d.backend.clone();
        let copying = self.inner.copies.lock().expect("lock poisoned").contains_key(&r);
        let holds = self.inner.holds.clone();
        blocking(move || {
            if let Some(req) = request_id {
                if backend.delete_recorded(req)?.is_some() {
                    return Ok(());
                }
            }
            let volumes = backend.list(Some(r.image))?;
            if !volumes.iter().any(|v| v.meta.volume == r.volume) {
                return Err(StorageError::VolumeNotFound(r));
            }
            if copying {
                return Err(StorageError::precondition(
                    "VOLUME_BUSY",
                    r,
                    "a copy into this volume is running",
                ));
            }
            // A prepared volume (or one in a prepared volume's chain) is
            // open: freeing its space under a guest corrupts whatever is
            // made there next.
            refuse_in_use(backend.as_ref(), &holds, &volumes, r, "deleted")?;
            if let Some(child) = volumes.iter().find(|v| v.meta.parent == Some(r.volume)) {
                return Err(StorageError::precondition(
                    "VOLUME_HAS_CHILDREN",
                    r,
                    format!(
                        "volume {} is the parent of {}; delete or merge the child first",
                        r.volume, child.meta.volume
                    ),
                ));
            }
            backend.remove(r.image, r.volume)?;
            if let Some(req) = request_id {
                backend.record_delete(req, None)?;
            }
            Ok(())
        })
        .await
    }

    /// Merges `r` into its only child and deletes it (see the proto). Safe
    /// to repeat after a crash at any point: the rebase of an already
    /// rebased child is a no-op, and a completed merge is journaled under
    /// its request id like a delete.
    pub async fn merge_volume(&self, r: VolumeRef, request_id: Option<Uuid>) -> Result<Volume> {
        let d = self.domain(r.domain)?;
        let _guard = d.lock.write().await;
        let backend = d.backend.clone();
        let holds = self.inner.holds.clone();
        blocking(move || {
            let volumes = backend.list(Some(r.image))?;
            let Some(merged) = volumes.iter().find(|v| v.meta.volume == r.volume) else {
                if let Some(req) = request_id {
                    if let Some(Some(child)) = backend.delete_recorded(req)? {
                        // Done before: hand back the child that took its place.
                        return backend.get(r.image, child);
                    }
                }
                return Err(StorageError::VolumeNotFound(r));
            };
            // The child is rewritten (rebased) and the volume removed: no
            // guest may have either open (a prepared child, or anything
            // above it, has the volume in its chain).
            refuse_in_use(backend.as_ref(), &holds, &volumes, r, "merged")?;
            let children: Vec<&Volume> = volumes
                .iter()
                .filter(|v| v.meta.parent == Some(r.volume))
                .collect();
            let child = match children[..] {
                [c] => c.clone(),
                [] => {
                    return Err(StorageError::precondition(
                        "VOLUME_HAS_NO_CHILD",
                        r,
                        "only a volume with a child can be merged; delete a leaf instead",
                    ))
                }
                _ => {
                    return Err(StorageError::precondition(
                        "VOLUME_HAS_CHILDREN",
                        r,
                        format!(
                            "volume {} has {} children; it can only merge into one",
                            r.volume,
                            children.len()
                        ),
                    ))
                }
            };
            if child.meta.format != Format::Cow {
                return Err(StorageError::precondition(
                    "CHILD_NOT_COW",
                    r,
                    "the child is not a COW volume",
                ));
            }
            let grandparent = merged
                .meta
                .parent
                .and_then(|p| volumes.iter().find(|v| v.meta.volume == p));
            let child_ref = child.volume_ref();
            let (path, newly) = prepare_chain(backend.as_ref(), child_ref)?;
            let mut cmd = std::process::Command::new("qemu-img");
            cmd.current_dir(path.parent().expect("volumes live in an image directory"));
            cmd.args(["rebase", "-q", "-f", "qcow2"]);
            match grandparent {
                Some(g) => cmd.args(["-b", &g.meta.volume.to_string(), "-F", g.meta.format.qemu_name()]),
                None => cmd.args(["-b", ""]),
            };
            cmd.arg(&path);
            let rebased = crate::tool::run(&mut cmd);
            for v in newly.iter().rev() {
                let _ = backend.teardown(r.image, *v);
            }
            rebased?;
            backend.set_parent(r.image, child.meta.volume, merged.meta.parent)?;
            backend.remove(r.image, r.volume)?;
            if let Some(req) = request_id {
                backend.record_delete(req, Some(child.meta.volume))?;
            }
            backend.get(r.image, child.meta.volume)
        })
        .await
    }

    /// Records a live merge (see the proto): `r`'s data is in its parent,
    /// and the volume above it reads the parent.
    pub async fn drop_committed_volume(&self, r: VolumeRef, request_id: Option<Uuid>) -> Result<()> {
        let d = self.domain(r.domain)?;
        let _guard = d.lock.write().await;
        let backend = d.backend.clone();
        let holds = self.inner.holds.clone();
        blocking(move || {
            if let Some(req) = request_id {
                if backend.delete_recorded(req)?.is_some() {
                    return Ok(());
                }
            }
            let volumes = backend.list(Some(r.image))?;
            let Some(top) = volumes.iter().find(|v| v.meta.volume == r.volume) else {
                return Err(StorageError::VolumeNotFound(r));
            };
            let Some(parent) = top.meta.parent else {
                return Err(StorageError::precondition(
                    "VOLUME_HAS_NO_PARENT",
                    r,
                    "a base volume has no parent to have been committed into",
                ));
            };
            if holds.is_prepared(r) {
                return Err(StorageError::precondition(
                    "VOLUME_IN_USE",
                    r,
                    format!("volume {} is prepared: tear it down first", r.volume),
                ));
            }
            let children: Vec<&Volume> = volumes
                .iter()
                .filter(|v| v.meta.parent == Some(r.volume))
                .collect();
            let child = match children[..] {
                [] => None,
                [c] => Some(c.meta.volume),
                _ => {
                    return Err(StorageError::precondition(
                        "VOLUME_HAS_CHILDREN",
                        r,
                        format!("volume {} has {} children", r.volume, children.len()),
                    ))
                }
            };
            if let Some(c) = child {
                let cref = VolumeRef { volume: c, ..r };
                let (path, newly) = prepare_listed(backend.as_ref(), &volumes, cref)?;
                let named = crate::qcow2::backing_name(&path);
                for v in newly.iter().rev() {
                    let _ = backend.teardown(r.image, *v);
                }
                let named = named?;
                if named.as_deref() != Some(parent.to_string().as_str()) {
                    return Err(StorageError::precondition(
                        "CHILD_NOT_REBASED",
                        r,
                        format!(
                            "volume {c} still reads {:?}, not the parent {parent}: the merge did not happen",
                            named.unwrap_or_default()
                        ),
                    ));
                }
                backend.set_parent(r.image, c, Some(parent))?;
            }
            // No chain reaches the volume now: its device goes (unless
            // something still holds it, which refuses the drop).
            let volumes = backend.list(Some(r.image))?;
            release(backend.as_ref(), &holds, &volumes, r, &[r.volume])?;
            refuse_in_use(backend.as_ref(), &holds, &volumes, r, "dropped")?;
            backend.remove(r.image, r.volume)?;
            if let Some(req) = request_id {
                backend.record_delete(req, child)?;
            }
            Ok(())
        })
        .await
    }

    /// Prepares a volume and its backing chain; returns the volume's path.
    /// The volume is held (in use) from now until its teardown, also
    /// across a restart of the service: see [`crate::holds`].
    pub async fn prepare_volume(&self, r: VolumeRef) -> Result<PathBuf> {
        Ok(self.prepare_volume_of(r, None).await?.0)
    }

    /// [`Storage::prepare_volume`] of a volume that must be of `purpose`
    /// (any when None): FAILED_PRECONDITION `VOLUME_PURPOSE`, before
    /// anything is prepared, when it is not. Also the volume as listed.
    pub async fn prepare_volume_of(
        &self,
        r: VolumeRef,
        purpose: Option<Purpose>,
    ) -> Result<(PathBuf, Volume)> {
        let d = self.domain(r.domain)?;
        // Prepares in other images run side by side (a snapshot's overlay
        // and its two memory volumes): what a prepare or teardown touches
        // (the image's chain, its devices, their holds) is the image's.
        let _shared = d.lock.read().await;
        let _image = d.creates.lock(&[Some(r.image)]).await;
        if self.inner.copies.lock().expect("lock poisoned").contains_key(&r) {
            return Err(StorageError::precondition(
                "VOLUME_BUSY",
                r,
                "a copy into this volume is running; prepare it once the copy is done",
            ));
        }
        let backend = d.backend.clone();
        let holds = self.inner.holds.clone();
        blocking(move || {
            let (volumes, located) = backend.list_to_prepare(r.image)?;
            let volume = volumes
                .iter()
                .find(|v| v.meta.volume == r.volume)
                .cloned()
                .ok_or(StorageError::VolumeNotFound(r))?;
            if let Some(p) = purpose.filter(|p| *p != volume.meta.purpose) {
                return Err(StorageError::precondition(
                    "VOLUME_PURPOSE",
                    r,
                    format!("volume {r} has purpose {}, expected {}", volume.meta.purpose, p),
                ));
            }
            let (path, newly) = prepare_located(backend.as_ref(), &volumes, r, &located)?;
            if let Err(e) = holds.add_prepared(r) {
                for v in newly.iter().rev() {
                    let _ = backend.teardown(r.image, *v);
                }
                return Err(e);
            }
            Ok((path, volume))
        })
        .await
    }

    /// Tears a volume down: releases its hold; the volume and its ancestors stay
    /// active while another holder needs them (a sibling leaf, a child
    /// prepared on top, a running copy). A volume that is gone loses its
    /// hold all the same (NOT_FOUND).
    pub async fn teardown_volume(&self, r: VolumeRef) -> Result<()> {
        let d = self.domain(r.domain)?;
        // As prepare_volume: per image.
        let _shared = d.lock.read().await;
        let _image = d.creates.lock(&[Some(r.image)]).await;
        let backend = d.backend.clone();
        let holds = self.inner.holds.clone();
        blocking(move || {
            holds.remove_prepared(r)?;
            let volumes = backend.list(Some(r.image))?;
            if !volumes.iter().any(|v| v.meta.volume == r.volume) {
                return Err(StorageError::VolumeNotFound(r));
            }
            let own = chain(&volumes, r.volume);
            release(backend.as_ref(), &holds, &volumes, r, &own)
        })
        .await
    }

    /// The descriptor store of an EXPORT domain, or why there is none.
    fn descriptor_store(&self, domain: Uuid) -> Result<(Arc<Domain>, DescriptorStore)> {
        let d = self.domain(domain)?;
        let store = d.backend.descriptors().ok_or_else(|| {
            StorageError::precondition(
                "NOT_AN_EXPORT_DOMAIN",
                domain,
                format!("storage domain {domain} is not an EXPORT domain; only those hold VM descriptors"),
            )
        })?;
        Ok((d, store))
    }

    pub async fn put_vm_descriptor(&self, domain: Uuid, vm: Uuid, ovf: String) -> Result<VmDescriptor> {
        descriptor::check_ovf(&ovf)?;
        let (d, store) = self.descriptor_store(domain)?;
        let _guard = d.descriptor_lock.lock().await;
        blocking(move || store.put(vm, &ovf)).await
    }

    pub async fn get_vm_descriptor(&self, domain: Uuid, vm: Uuid) -> Result<VmDescriptor> {
        let (_, store) = self.descriptor_store(domain)?;
        blocking(move || store.get(vm)).await
    }

    pub async fn list_vm_descriptors(&self, domain: Uuid) -> Result<Vec<VmDescriptor>> {
        let (_, store) = self.descriptor_store(domain)?;
        blocking(move || store.list()).await
    }

    pub async fn delete_vm_descriptor(&self, domain: Uuid, vm: Uuid) -> Result<()> {
        let (d, store) = self.descriptor_store(domain)?;
        let _guard = d.descriptor_lock.lock().await;
        blocking(move || store.delete(vm)).await
    }

    /// Starts (or joins) a copy and returns a receiver of its progress; the
    /// copy runs to its end whether or not anyone watches.
    pub async fn copy_volume(&self, req: CopyRequest) -> Result<watch::Receiver<CopyState>> {
        limits::check_description("description", &req.description)?;
        let src_dom = self.domain(req.source.domain)?;
        let dst_dom = self.domain(req.target_domain)?;
        // The source (with its chain) is in use from here to the copy's end.
        let src_hold = self.inner.holds.hold(
            req.source,
            "is being read by a running copy (CopyVolume), until it ends",
        );
        let source = {
            let b = src_dom.backend.clone();
            let s = req.source;
            blocking(move || b.get(s.image, s.volume)).await?
        };
        if source.meta.legality != Legality::Legal {
            return Err(StorageError::precondition(
                "VOLUME_ILLEGAL",
                req.source,
                "the source volume is ILLEGAL (incomplete); it cannot be copied",
            ));
        }
        let parent = layer_parent(&req, &source)?;
        let format = match parent {
            Some(_) => Format::Cow,
            None => req.target_format.unwrap_or(source.meta.format),
        };
        let purpose = target_purpose(&req, &source, format, parent)?;
        let allocation = req
            .target_allocation
            .unwrap_or_else(|| dst_dom.backend.natural_allocation());
        check_layout(
            dst_dom.kind,
            format,
            allocation,
            parent.is_some(),
            "target_allocation",
        )?;

        let target = {
            let _guard = dst_dom.lock.write().await;
            let _writer = dst_dom.writer.lock().await;
            // What the target's create reads first: on BLOCK all at once
            // (a Survey), with the writer fence; elsewhere the fence alone.
            let survey = {
                let (b, domain, writer) = (dst_dom.backend.clone(), req.target_domain, req.writer);
                let block = dst_dom.kind == DomainType::Block;
                blocking(move || {
                    if block {
                        return survey_as(b.as_ref(), domain, writer).map(Some);
                    }
                    if writer.is_some() {
                        check_writer(b.as_ref(), domain, writer, b.writer_generation()?)?;
                    }
                    Ok(None)
                })
                .await?
            };
            let mut survey = survey;
            // A retry: the request's volume may exist already.
            if let Some(req_id) = req.request_id {
                let b = dst_dom.backend.clone();
                let existing = match &survey {
                    Some(s) => s.find_request(req_id),
                    None => blocking(move || b.find_request(req_id)).await?,
                };
                if let Some(v) = existing {
                    let running = self
                        .inner
                        .copies
                        .lock()
                        .expect("lock poisoned")
                        .get(&v.volume_ref())
                        .cloned();
                    if let Some(rx) = running {
                        return Ok(rx);
                    }
                    if v.meta.legality == Legality::Legal {
                        let (_tx, rx) = watch::channel(CopyState {
                            processed: v.meta.capacity,
                            total: v.meta.capacity,
                            outcome: Some(Ok(v)),
                            checksum: None,
                        });
                        return Ok(rx);
                    }
                    // Left ILLEGAL by a copy that died with its process.
                    let b = dst_dom.backend.clone();
                    let holds = self.inner.holds.clone();
                    let reread = survey.is_some();
                    survey = blocking(move || {
                        remove_unless_in_use(b.as_ref(), &holds, v.volume_ref())?;
                        // What was read before counts the removed volume.
                        reread.then(|| b.survey()).transpose()
                    })
                    .await?;
                }
            }
            let new = NewVolume {
                request_id: req.request_id,
                domain: req.target_domain,
                image: req.target_image,
                volume: req.target_volume,
                capacity: source.meta.capacity,
                format,
                allocation: Some(allocation),
                purpose,
                parent,
                description: if req.description.is_empty() {
                    source.meta.description.clone()
                } else {
                    req.description.clone()
                },
            };
            let b = dst_dom.backend.clone();
            let target_domain = req.target_domain;
            let target = blocking(move || {
                let in_image = match (&survey, new.image) {
                    (Some(s), Some(image)) => Some(s.image(image)),
                    _ => None,
                };
                if let (Some(p), Some(image)) = (parent, new.image) {
                    require_layer_parent(b.as_ref(), target_domain, image, p, in_image.as_deref())?;
                }
                create_new_at(
                    b.as_ref(),
                    new,
                    allocation,
                    Legality::Illegal,
                    in_image,
                    survey.as_ref(),
                )
            })
            .await?;
            // Held and listed as copying before the domain lock is let go:
            // a PrepareVolume or DeleteVolume that was waiting for it finds
            // the copy running (VOLUME_BUSY), never the ILLEGAL target alone.
            let target_ref = target.volume_ref();
            let dst_hold = self.inner.holds.hold(
                target_ref,
                format!(
                    "is being written by a running copy (CopyVolume) from {}, until it ends",
                    req.source
                ),
            );
            let (tx, rx) = watch::channel(CopyState {
                processed: 0,
                total: source.meta.capacity,
                outcome: None,
                checksum: None,
            });
            self.inner
                .copies
                .lock()
                .expect("lock poisoned")
                .insert(target_ref, rx.clone());
            (target, target_ref, dst_hold, tx, rx)
        };
        let (target, target_ref, dst_hold, tx, rx) = target;
        let this = self.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let outcome = this
                .run_copy(
                    src_dom,
                    dst_dom.clone(),
                    source,
                    target,
                    (src_hold, dst_hold),
                    (tx.clone(), req.checksum),
                )
                .await;
            if outcome.is_ok() {
                let copied = tx.borrow().processed;
                ramsnap_common::metrics::record_copy(copied, started.elapsed().as_secs_f64());
            }
            if outcome.is_err() {
                let _guard = dst_dom.lock.write().await;
                let b = dst_dom.backend.clone();
                let _ = blocking(move || b.remove(target_ref.image, target_ref.volume)).await;
            }
            this.inner
                .copies
                .lock()
                .expect("lock poisoned")
                .remove(&target_ref);
            tx.send_modify(|s| s.outcome = Some(outcome));
        });
        Ok(rx)
    }

    async fn run_copy(
        &self,
        src_dom: Arc<Domain>,
        dst_dom: Arc<Domain>,
        source: Volume,
        target: Volume,
        (src_hold, dst_hold): (RunningHold, RunningHold),
        // Where the copy's state goes, and whether it computes a checksum.
        (tx, checksum): (watch::Sender<CopyState>, bool),
    ) -> Result<Volume> {
        let holds = self.inner.holds.clone();
        let src_b = src_dom.backend.clone();
        let dst_b = dst_dom.backend.clone();
        let (sref, tref) = (source.volume_ref(), target.volume_ref());
        let stats = {
            let _s = src_dom.lock.write().await;
            let (src_path, src_new) = {
                let b = src_b.clone();
                blocking(move || prepare_chain(b.as_ref(), sref)).await?
            };
            drop(_s);
            let dst = {
                let _d = dst_dom.lock.write().await;
                let b = dst_b.clone();
                blocking(move || prepare_target(b.as_ref(), tref)).await
            };
            let dst_new = dst.as_ref().map(|(_, _, new)| new.clone()).unwrap_or_default();
            let result = match dst {
                Ok((dst_path, target_backing, _)) => {
                    let job = CopyJob {
                        source: src_path,
                        source_format: source.meta.format,
                        source_has_parent: source.meta.parent.is_some(),
                        target: dst_path,
                        target_format: target.meta.format,
                        // Every new volume reads as zeros (see
                        // Backend::create); a layer's unallocated clusters
                        // read its parent instead.
                        target_reads_zero: target_backing.is_none(),
                        target_backing,
                        size: source.meta.capacity,
                        checksum,
                    };
                    let tx = tx.clone();
                    blocking(move || {
                        let mut last = 0u64;
                        copy::run(&job, &mut |done, total| {
                            // Publish every 1% or so; watchers only need the latest.
                            if done == total || done - last >= total / 100 {
                                last = done;
                                tx.send_modify(|s| {
                                    s.processed = done;
                                    s.total = total;
                                });
                            }
                        })
                    })
                    .await
                }
                Err(e) => Err(e),
            };
            // Release what the copy prepared (the target, a layer's parents
            // beneath it; the source's chain), except what another holder
            // needs: a client may have prepared the source meanwhile.
            drop(dst_hold);
            let _d = dst_dom.lock.write().await;
            let (b, h) = (dst_b.clone(), holds.clone());
            let _ = blocking(move || {
                let volumes = b.list(Some(tref.image))?;
                let mut candidates = vec![tref.volume];
                candidates.extend(dst_new.into_iter().rev().filter(|v| *v != tref.volume));
                release(b.as_ref(), &h, &volumes, tref, &candidates)
            })
            .await;
            drop(_d);
            drop(src_hold);
            let _s = src_dom.lock.write().await;
            let (b, h) = (src_b.clone(), holds.clone());
            let _ = blocking(move || {
                let volumes = b.list(Some(sref.image))?;
                let candidates: Vec<Uuid> = src_new.into_iter().rev().collect();
                release(b.as_ref(), &h, &volumes, sref, &candidates)
            })
            .await;
            result?
        };
        tracing::info!(
            source = %sref, target = %tref, data = stats.data_bytes, zero = stats.zero_bytes,
            transfer_ms = stats.transfer_ms, flush_ms = stats.flush_ms, "copy done"
        );
        tx.send_modify(|s| s.checksum = stats.checksum);
        let _guard = dst_dom.lock.write().await;
        let b = dst_b.clone();
        blocking(move || {
            b.set_legality(tref.image, tref.volume, Legality::Legal)?;
            b.get(tref.image, tref.volume)
        })
        .await
    }
}

/// Volumes are created on DATA domains only: an EXPORT domain receives
/// copies (CopyVolume) and VM descriptors, nothing made from scratch.
fn refuse_export(d: &Domain, id: Uuid) -> Result<()> {
    if d.backend.role() == DomainRole::Export {
        return Err(StorageError::precondition(
            "EXPORT_DOMAIN",
            id,
            format!(
                "storage domain {id} is an EXPORT domain: it only receives copies of volumes \
                 (CopyVolume) and VM descriptors; create volumes on a DATA domain"
            ),
        ));
    }
    Ok(())
}

/// The first holder that uses `r` (see [`crate::holds`]): one whose
/// backing chain contains it. `volumes` are those of r's image. On a
/// domain whose volumes have devices (BLOCK), an active device nothing
/// recorded (an older version's prepare, a record removed by hand) counts
/// too: the check fails closed.
fn user_of(backend: &dyn Backend, holds: &Holds, volumes: &[Volume], r: VolumeRef) -> Option<(Uuid, String)> {
    let uses = |holder: Uuid| chain(volumes, holder).contains(&r.volume);
    if let Some(h) = holds
        .holders(r.domain, r.image)
        .into_iter()
        .find(|h| uses(h.volume))
    {
        return Some((h.volume, h.what));
    }
    volumes
        .iter()
        .map(|v| v.meta.volume)
        .filter(|v| uses(*v))
        .find(|v| backend.is_prepared(r.image, *v))
        .map(|v| {
            (
                v,
                "is active on this host (a device is open over it) though no PrepareVolume is recorded \
                 (TeardownVolume releases it)"
                    .into(),
            )
        })
}

/// FAILED_PRECONDITION `VOLUME_IN_USE`, naming the holder, when anything
/// on this host uses `r`; `action` is what was refused ("deleted").
fn refuse_in_use(
    backend: &dyn Backend,
    holds: &Holds,
    volumes: &[Volume],
    r: VolumeRef,
    action: &str,
) -> Result<()> {
    let Some((holder, what)) = user_of(backend, holds, volumes, r) else {
        return Ok(());
    };
    let reason = if holder == r.volume {
        format!("volume {} {what}: it is in use and cannot be {action}", r.volume)
    } else {
        format!(
            "volume {} is in the backing chain of volume {holder}, which {what}: it is in use and \
             cannot be {action}",
            r.volume
        )
    };
    Err(StorageError::precondition("VOLUME_IN_USE", r, reason))
}

/// Removes a volume (left ILLEGAL by a crash) unless something uses it.
fn remove_unless_in_use(backend: &dyn Backend, holds: &Holds, r: VolumeRef) -> Result<()> {
    let volumes = backend.list(Some(r.image))?;
    refuse_in_use(backend, holds, &volumes, r, "replaced")?;
    backend.remove(r.image, r.volume)
}

/// Tears down those of `candidates` (volumes of r's image, leaf first)
/// that no holder still needs: no prepared volume, no running copy, and
/// no active volume outside the candidates has one in its chain.
fn release(
    backend: &dyn Backend,
    holds: &Holds,
    volumes: &[Volume],
    r: VolumeRef,
    candidates: &[Uuid],
) -> Result<()> {
    let mut holders: Vec<Uuid> = holds
        .holders(r.domain, r.image)
        .into_iter()
        .map(|h| h.volume)
        .collect();
    holders.extend(
        volumes
            .iter()
            .map(|v| v.meta.volume)
            .filter(|v| !candidates.contains(v) && backend.is_prepared(r.image, *v)),
    );
    let needed: std::collections::HashSet<Uuid> = holders.iter().flat_map(|h| chain(volumes, *h)).collect();
    for c in candidates {
        if !needed.contains(c) {
            backend.teardown(r.image, *c)?;
        }
    }
    Ok(())
}

fn check_layout(
    kind: DomainType,
    format: Format,
    allocation: Allocation,
    has_parent: bool,
    field: &'static str,
) -> Result<()> {
    if kind == DomainType::Block && format == Format::Raw && allocation == Allocation::Sparse {
        return Err(StorageError::invalid(
            field,
            "RAW volumes on BLOCK domains are always PREALLOCATED (an LV has no holes)",
        ));
    }
    // qemu-img refuses it (preallocated clusters would hide the parent's
    // data), as VDSM does: a layer on a file is a sparse qcow2 file.
    if kind == DomainType::File
        && format == Format::Cow
        && has_parent
        && allocation == Allocation::Preallocated
    {
        return Err(StorageError::invalid(
            field,
            "a COW volume with a parent on a FILE domain is SPARSE: preallocated clusters would hide the parent's data",
        ));
    }
    Ok(())
}

/// The parent a layer copy (keep_parent) puts the source's own layer on:
/// the source's parent, which the target domain must already hold in the
/// target image (copied first, ids kept). None for a whole copy: without
/// keep_parent, or for a source with no parent, which is its own whole.
/// The purpose a copy's target gets: the source's, or a memory purpose for
/// a DISK source that is RAW and copied whole to RAW (an oVirt 3.3 memory
/// volume, recorded as a disk); any other change is refused.
fn target_purpose(
    req: &CopyRequest,
    source: &Volume,
    format: Format,
    parent: Option<Uuid>,
) -> Result<Purpose> {
    let Some(want) = req.target_purpose.filter(|p| *p != source.meta.purpose) else {
        return Ok(source.meta.purpose);
    };
    if source.meta.purpose != Purpose::Disk || want == Purpose::Disk {
        return Err(StorageError::invalid(
            "target_purpose",
            format!(
                "a {:?} volume keeps its purpose; only a disk may be copied as a memory volume",
                source.meta.purpose
            ),
        ));
    }
    if source.meta.format != Format::Raw
        || format != Format::Raw
        || parent.is_some()
        || source.meta.parent.is_some()
    {
        return Err(StorageError::invalid(
            "target_purpose",
            "a memory volume is RAW without a parent: only a RAW source copied whole to RAW may become one",
        ));
    }
    Ok(want)
}

fn layer_parent(req: &CopyRequest, source: &Volume) -> Result<Option<Uuid>> {
    let Some(parent) = source.meta.parent.filter(|_| req.keep_parent) else {
        return Ok(None);
    };
    if req.target_format.is_some_and(|f| f != Format::Cow) {
        return Err(StorageError::invalid(
            "target_format",
            "must be COW or unspecified with keep_parent: a layer is a qcow2 overlay on its parent",
        ));
    }
    if req.target_image.is_none() {
        return Err(StorageError::invalid(
            "target_image_id",
            "is required with keep_parent: the image on the target domain that holds the parent",
        ));
    }
    Ok(Some(parent))
}

/// Checks that a layer copy's parent is on the target. Runs under the
/// target domain's lock, before the target is created.
/// `listed`: the image's volumes, when the caller has just read them.
fn require_layer_parent(
    backend: &dyn Backend,
    domain: Uuid,
    image: Uuid,
    parent: Uuid,
    listed: Option<&[Volume]>,
) -> Result<()> {
    let found = match listed {
        Some(volumes) => volumes.iter().any(|v| v.meta.volume == parent),
        None => backend.list(Some(image))?.iter().any(|v| v.meta.volume == parent),
    };
    if found {
        return Ok(());
    }
    let missing = VolumeRef {
        domain,
        image,
        volume: parent,
    };
    Err(StorageError::precondition(
        "PARENT_MISSING",
        missing,
        format!("the target has no volume {missing} to put the layer on; copy the parent there first"),
    ))
}

/// Prepares a copy's target and, under a layer, the chain qemu-img opens
/// beneath it. Returns the target's path, its backing when it has a parent
/// (the name its qcow2 header already records), and the volumes this call
/// prepared.
fn prepare_target(backend: &dyn Backend, r: VolumeRef) -> Result<(PathBuf, Option<Backing>, Vec<Uuid>)> {
    // One listing of the image (with where its volumes lie, on BLOCK) for
    // the target, its parent and the chain.
    let (volumes, located) = backend.list_to_prepare(r.image)?;
    let listed = |volume: Uuid| {
        volumes
            .iter()
            .find(|v| v.meta.volume == volume)
            .ok_or(StorageError::VolumeNotFound(VolumeRef { volume, ..r }))
    };
    let backing = match listed(r.volume)?.meta.parent {
        Some(p) => Some(Backing {
            name: p.to_string(),
            format: listed(p)?.meta.format,
        }),
        None => None,
    };
    let (path, newly) = prepare_located(backend, &volumes, r, &located)?;
    Ok((path, backing, newly))
}

/// The volume, then its parent, and so on to the base.
fn chain(volumes: &[Volume], volume: Uuid) -> Vec<Uuid> {
    let mut out = vec![volume];
    let mut cur = volume;
    while let Some(p) = volumes
        .iter()
        .find(|v| v.meta.volume == cur)
        .and_then(|v| v.meta.parent)
    {
        if out.contains(&p) {
            break;
        }
        out.push(p);
        cur = p;
    }
    out
}

/// Prepares base to leaf; returns the leaf's path and the volumes that this
/// call prepared (so the caller can undo exactly those).
fn prepare_chain(backend: &dyn Backend, r: VolumeRef) -> Result<(PathBuf, Vec<Uuid>)> {
    let (volumes, located) = backend.list_to_prepare(r.image)?;
    prepare_located(backend, &volumes, r, &located)
}

/// [`prepare_chain`] with the image's volumes already listed.
fn prepare_listed(backend: &dyn Backend, volumes: &[Volume], r: VolumeRef) -> Result<(PathBuf, Vec<Uuid>)> {
    prepare_located(backend, volumes, r, &Located::default())
}

/// [`prepare_listed`] with where the volumes lie, when the listing said
/// (see [`Backend::list_to_prepare`]).
fn prepare_located(
    backend: &dyn Backend,
    volumes: &[Volume],
    r: VolumeRef,
    located: &Located,
) -> Result<(PathBuf, Vec<Uuid>)> {
    if !volumes.iter().any(|v| v.meta.volume == r.volume) {
        return Err(StorageError::VolumeNotFound(r));
    }
    // Parents first.
    let ids: Vec<Uuid> = chain(volumes, r.volume).into_iter().rev().collect();
    let was: Vec<bool> = ids.iter().map(|v| backend.is_prepared(r.image, *v)).collect();
    let listed: Option<Vec<&Volume>> = ids
        .iter()
        .map(|v| volumes.iter().find(|x| x.meta.volume == *v))
        .collect();
    let results = match &listed {
        Some(listed) => backend.prepare_located_chain(listed, located),
        None => crate::backend::prepare_each(&ids, |v| backend.prepare(r.image, *v)),
    };
    let mut newly = Vec::new();
    let mut path = PathBuf::new();
    for ((v, was), prepared) in ids.iter().zip(was).zip(results) {
        match prepared {
            Ok(p) => path = p,
            Err(e) => {
                for n in newly.iter().rev() {
                    let _ = backend.teardown(r.image, *n);
                }
                return Err(e);
            }
        }
        if !was && backend.is_prepared(r.image, *v) {
            newly.push(*v);
        }
    }
    Ok((path, newly))
}

fn params_match(existing: &VolumeMeta, req: &NewVolume, allocation: Allocation) -> bool {
    existing.capacity == req.capacity
        && existing.format == req.format
        && existing.allocation == allocation
        && existing.purpose == req.purpose
        && existing.parent == req.parent
        && req.image.is_none_or(|i| i == existing.image)
        && req.volume.is_none_or(|v| v == existing.volume)
}

/// The two volumes of a snapshot's memory (new images, RAW, the domain's
/// natural allocation), both or neither, under the domain lock: what each
/// request made before looked up once for both, the domain's free space
/// read once, and the new ones made together (on BLOCK: one `lvs`, one
/// `pvs` for the space, an `lvcreate` each, one `pvs` for their extents
/// and one `lvchange` for their flips to LEGAL).
fn create_pair_locked(
    backend: &dyn Backend,
    holds: &Holds,
    dump: NewVolume,
    meta: NewVolume,
    survey: Option<Survey>,
) -> Result<(Volume, Volume)> {
    let allocation = backend.natural_allocation();
    let requests: Vec<Uuid> = [dump.request_id, meta.request_id].into_iter().flatten().collect();
    let found = match &survey {
        Some(s) => requests.iter().map(|r| s.find_request(*r)).collect(),
        None => backend.find_requests(&requests)?,
    };
    let mut found = found.into_iter();
    let mut earlier = |r: Option<Uuid>| r.and_then(|_| found.next().flatten());
    let (dump_found, meta_found) = (earlier(dump.request_id), earlier(meta.request_id));
    let dump_found = reusable(backend, holds, &dump, allocation, dump_found)?;
    let meta_found = reusable(backend, holds, &meta, allocation, meta_found)?;
    let new: Vec<VolumeMeta> = [(&dump, &dump_found), (&meta, &meta_found)]
        .into_iter()
        .filter(|(_, found)| found.is_none())
        .map(|(req, _)| new_volume_meta(req, Uuid::new_v4(), Uuid::new_v4(), allocation, Legality::Legal))
        .collect();
    // Both or neither: on a failure, what an earlier try made goes too (a
    // saga's undo of a node that failed has no answer naming them).
    let give_up = |e: StorageError, made_now: bool| {
        if made_now {
            for m in &new {
                let _ = backend.remove(m.image, m.volume);
            }
        }
        for v in dump_found.iter().chain(&meta_found) {
            let _ = remove_unless_in_use(backend, holds, v.volume_ref());
        }
        e
    };
    if !new.is_empty() {
        // All that is missing must fit before any of it is made. (A
        // volume removed above as unusable does not count: its space is
        // free, but the survey was read before.)
        let domain = match &survey {
            Some(s) => s.info.clone(),
            None => backend.info()?,
        };
        let need = new.iter().fold(0u64, |n, m| n.saturating_add(m.capacity));
        if need > domain.free {
            return Err(give_up(
                StorageError::NoSpace {
                    domain: domain.id,
                    requested: need,
                    free: domain.free,
                },
                false,
            ));
        }
        match &survey {
            Some(s) => backend.create_legal_all_surveyed(&new, s),
            None => backend.create_legal_all(&new),
        }
        .map_err(|e| give_up(e, false))?;
    }
    let made = new
        .iter()
        .map(|m| backend.created(m))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| give_up(e, true))?;
    let mut made = made.into_iter();
    let mut or_made = |found: Option<Volume>| found.or_else(|| made.next());
    match (or_made(dump_found), or_made(meta_found)) {
        (Some(dump), Some(meta)) => Ok((dump, meta)),
        _ => unreachable!("a volume made for each one not found"),
    }
}

/// What a request made before, if it is to be answered again: LEGAL and
/// made with the same parameters (other parameters: ALREADY_EXISTS). One a
/// crash left ILLEGAL part-way is removed, to be made again: None.
fn reusable(
    backend: &dyn Backend,
    holds: &Holds,
    req: &NewVolume,
    allocation: Allocation,
    found: Option<Volume>,
) -> Result<Option<Volume>> {
    let (Some(v), Some(req_id)) = (found, req.request_id) else {
        return Ok(None);
    };
    if !params_match(&v.meta, req, allocation) {
        return Err(StorageError::AlreadyExists {
            resource: "request",
            id: req_id.to_string(),
            reason: "request_id was already used for a volume with different parameters".into(),
        });
    }
    if v.meta.legality == Legality::Legal {
        return Ok(Some(v));
    }
    remove_unless_in_use(backend, holds, v.volume_ref())?;
    Ok(None)
}

/// The metadata of a new volume made for `req`.
fn new_volume_meta(
    req: &NewVolume,
    image: Uuid,
    volume: Uuid,
    allocation: Allocation,
    legality: Legality,
) -> VolumeMeta {
    VolumeMeta {
        version: METADATA_VERSION,
        image,
        volume,
        parent: req.parent,
        format: req.format,
        allocation,
        purpose: req.purpose,
        legality,
        capacity: req.capacity,
        description: req.description.clone(),
        request_id: req.request_id,
        created_at: now_unix(),
    }
}

fn create_locked(
    backend: &dyn Backend,
    holds: &Holds,
    req: NewVolume,
    allocation: Allocation,
) -> Result<Volume> {
    // What the request made before, and the image's volumes: one read
    // where the backend can (see Backend::request_and_image).
    let (found, in_image) = match (req.request_id, req.image) {
        (Some(r), Some(i)) => {
            let (found, listed) = backend.request_and_image(r, i)?;
            (found, Some(listed))
        }
        (Some(r), None) => (backend.find_request(r)?, None),
        (None, _) => (None, None),
    };
    create_found(backend, holds, req, allocation, found, in_image, None)
}

/// [`create_locked`] with the domain already read ([`Backend::survey`]).
fn create_surveyed(
    backend: &dyn Backend,
    holds: &Holds,
    req: NewVolume,
    allocation: Allocation,
    survey: Survey,
) -> Result<Volume> {
    let found = req.request_id.and_then(|r| survey.find_request(r));
    let in_image = req.image.map(|i| survey.image(i));
    create_found(backend, holds, req, allocation, found, in_image, Some(&survey))
}

/// The domain's [`Survey`] for a create by domain writer `writer`, the
/// writer checked against the generation read with it (see [`check_writer`]).
fn survey_as(backend: &dyn Backend, domain: Uuid, writer: Option<i64>) -> Result<Survey> {
    let survey = backend.survey()?;
    check_writer(backend, domain, writer, survey.writer_generation)?;
    Ok(survey)
}

/// Refuses a call of domain writer `writer` when the domain recorded a
/// later one (`recorded`), and records it when it is the later one; no
/// writer given (a call from outside a saga) passes.
fn check_writer(backend: &dyn Backend, domain: Uuid, writer: Option<i64>, recorded: i64) -> Result<()> {
    let Some(generation) = writer else {
        return Ok(());
    };
    if generation < recorded {
        return Err(StorageError::StaleWriter {
            domain,
            generation,
            recorded,
        });
    }
    if generation > recorded {
        backend.set_writer_generation(recorded, generation)?;
    }
    Ok(())
}

/// [`create_locked`] once what the request made before (`found`) and the
/// image's volumes are read (None when not read yet), and the domain's
/// survey when they came from one.
fn create_found(
    backend: &dyn Backend,
    holds: &Holds,
    req: NewVolume,
    allocation: Allocation,
    found: Option<Volume>,
    mut in_image: Option<Vec<Volume>>,
    survey: Option<&Survey>,
) -> Result<Volume> {
    let earlier = found.as_ref().map(|v| v.meta.volume);
    if let Some(v) = reusable(backend, holds, &req, allocation, found)? {
        return Ok(v);
    }
    // Left ILLEGAL by a crash part-way, and removed: no longer listed.
    if let (Some(removed), Some(listed)) = (earlier, &mut in_image) {
        listed.retain(|x| x.meta.volume != removed);
    }
    create_new_at(backend, req, allocation, Legality::Legal, in_image, survey)
}

/// Validates against the domain's current state and creates the volume:
/// ILLEGAL for a copy's target (flipped when the copy completes), LEGAL for
/// a new empty volume (see [`Backend::create_legal`]). Runs under the
/// domain lock. `in_image`: the image's volumes, when the caller has just
/// read them under this lock; `survey`: the domain as the caller read it
/// under this lock, when it did (its info, and on BLOCK where the new LV
/// goes).
fn create_new_at(
    backend: &dyn Backend,
    req: NewVolume,
    allocation: Allocation,
    legality: Legality,
    in_image: Option<Vec<Volume>>,
    survey: Option<&Survey>,
) -> Result<Volume> {
    let domain = match survey {
        Some(s) => s.info.clone(),
        None => backend.info()?,
    };
    // A new image has no volumes: no need to list it (an lvs on BLOCK).
    let (image, in_image) = match (req.image, in_image) {
        (Some(i), Some(listed)) => (i, listed),
        (Some(i), None) => (i, backend.list(Some(i))?),
        (None, _) => (Uuid::new_v4(), Vec::new()),
    };
    let volume = req.volume.unwrap_or_else(Uuid::new_v4);
    if in_image.iter().any(|v| v.meta.volume == volume) {
        return Err(StorageError::AlreadyExists {
            resource: "volume",
            id: VolumeRef {
                domain: domain.id,
                image,
                volume,
            }
            .to_string(),
            reason: "a volume with this id exists".into(),
        });
    }
    let parent = match req.parent {
        None => {
            if !in_image.is_empty() {
                return Err(StorageError::precondition(
                    "IMAGE_NOT_EMPTY",
                    image,
                    format!(
                        "image {image} already has volumes; a new volume in it must name its leaf as parent"
                    ),
                ));
            }
            None
        }
        Some(p) => {
            let parent = in_image
                .iter()
                .find(|v| v.meta.volume == p)
                .ok_or(StorageError::VolumeNotFound(VolumeRef {
                    domain: domain.id,
                    image,
                    volume: p,
                }))?;
            if parent.meta.legality != Legality::Legal {
                return Err(StorageError::precondition(
                    "VOLUME_ILLEGAL",
                    p,
                    "the parent volume is ILLEGAL",
                ));
            }
            // A parent may have several children: previewing a snapshot
            // branches a new leaf off the snapshot's volume, as VDSM does.
            if req.capacity < parent.meta.capacity {
                return Err(StorageError::invalid(
                    "capacity_bytes",
                    format!(
                        "must be at least the parent's capacity ({})",
                        parent.meta.capacity
                    ),
                ));
            }
            Some(parent.meta.clone())
        }
    };
    if req.capacity > domain.free {
        return Err(StorageError::NoSpace {
            domain: domain.id,
            requested: req.capacity,
            free: domain.free,
        });
    }
    let meta = new_volume_meta(&req, image, volume, allocation, legality);
    let mut prepared = Vec::new();
    if let Some(p) = &parent {
        let r = VolumeRef {
            domain: domain.id,
            image,
            volume: p.volume,
        };
        prepared = prepare_listed(backend, &in_image, r)?.1;
    }
    let result = match (legality, survey) {
        (Legality::Legal, Some(s)) => backend.create_legal_surveyed(&meta, parent.as_ref(), s),
        (Legality::Legal, None) => backend.create_legal(&meta, parent.as_ref()),
        (Legality::Illegal, Some(s)) => backend.create_surveyed(&meta, parent.as_ref(), s),
        (Legality::Illegal, None) => backend.create(&meta, parent.as_ref()),
    };
    for v in prepared.iter().rev() {
        let _ = backend.teardown(image, *v);
    }
    result?;
    backend.created(&meta)
}

type Found = Vec<(DomainType, Arc<dyn Backend>)>;

fn discover(config: &Config) -> Result<Found> {
    let mut out: Found = Vec::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for root in &config.file_roots {
        dirs.push(root.clone());
        if let Ok(entries) = std::fs::read_dir(root) {
            dirs.extend(
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.is_dir()),
            );
        }
    }
    let attached: Attached = std::fs::read(config.state_dir.join("domains.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    dirs.extend(
        attached
            .domains
            .iter()
            .filter(|d| d.kind == DomainType::File)
            .map(|d| d.location.clone()),
    );
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        match FileDomain::discover(&dir) {
            Ok(found) => out.extend(
                found
                    .into_iter()
                    .map(|d| (DomainType::File, Arc::new(d) as Arc<dyn Backend>)),
            ),
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "skipping unreadable file domain"),
        }
    }
    let wanted: Vec<PathBuf> = config
        .block_devices
        .iter()
        .map(|d| d.canonicalize().unwrap_or(d.clone()))
        .collect();
    match BlockDomain::discover(&config.run_dir) {
        Ok(found) => out.extend(
            found
                .into_iter()
                .filter(|(_, pv)| wanted.is_empty() || wanted.iter().any(|w| w == Path::new(pv)))
                .map(|(d, _)| (DomainType::Block, Arc::new(d) as Arc<dyn Backend>)),
        ),
        Err(e) => tracing::warn!(error = %e, "could not scan for block domains"),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(image: Uuid, volume: Uuid, parent: Option<Uuid>) -> VolumeMeta {
        VolumeMeta {
            version: METADATA_VERSION,
            image,
            volume,
            parent,
            format: if parent.is_some() {
                Format::Cow
            } else {
                Format::Raw
            },
            allocation: Allocation::Sparse,
            purpose: Purpose::Disk,
            legality: Legality::Legal,
            capacity: 1 << 20,
            description: String::new(),
            request_id: None,
            created_at: 0,
        }
    }

    /// What a running copy holds (its source, and through it the source's
    /// chain) is in use until the copy's hold is dropped.
    #[test]
    fn a_running_copy_holds_its_source_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        let domain = FileDomain::create(dir.path(), Uuid::new_v4(), "d", DomainRole::Data).unwrap();
        let (image, base, leaf) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let base_meta = meta(image, base, None);
        domain.create(&base_meta, None).unwrap();
        domain
            .create(&meta(image, leaf, Some(base)), Some(&base_meta))
            .unwrap();
        let holds = Arc::new(Holds::open(&dir.path().join("run")).unwrap());
        let r = |volume| VolumeRef {
            domain: domain.id(),
            image,
            volume,
        };
        let volumes = domain.list(Some(image)).unwrap();
        let copy = holds.hold(
            r(leaf),
            "is being read by a running copy (CopyVolume), until it ends",
        );
        for (v, holder) in [(leaf, leaf), (base, leaf)] {
            match refuse_in_use(&domain, &holds, &volumes, r(v), "deleted") {
                Err(StorageError::Precondition {
                    kind,
                    subject,
                    reason,
                }) => {
                    assert_eq!((kind, subject), ("VOLUME_IN_USE", r(v).to_string()));
                    assert!(reason.contains("running copy"), "{reason}");
                    assert!(reason.contains(&holder.to_string()), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        drop(copy);
        refuse_in_use(&domain, &holds, &volumes, r(base), "deleted").unwrap();
        // A prepared base is in use itself; its child is not (a hold
        // covers the holder's chain below it, never what is above).
        holds.add_prepared(r(base)).unwrap();
        let err = refuse_in_use(&domain, &holds, &volumes, r(base), "merged").unwrap_err();
        assert!(err.to_string().contains("prepared"), "{err}");
        refuse_in_use(&domain, &holds, &volumes, r(leaf), "deleted").unwrap();
    }

    /// A snapshot's memory volumes are both made or neither, across
    /// retries: a retry keeps the dump an earlier try made, counts only
    /// what is missing against the free space, and when that does not fit
    /// removes the earlier dump too.
    #[test]
    fn a_memory_pair_is_made_both_or_neither_across_retries() {
        let dir = tempfile::tempdir().unwrap();
        let domain = FileDomain::create(dir.path(), Uuid::new_v4(), "d", DomainRole::Data).unwrap();
        let holds = Holds::open(&dir.path().join("run")).unwrap();
        let (dump_request, meta_request) = (Uuid::new_v4(), Uuid::new_v4());
        let req = |request_id, capacity, purpose| NewVolume {
            request_id: Some(request_id),
            domain: domain.id(),
            image: None,
            volume: None,
            capacity,
            format: Format::Raw,
            allocation: None,
            purpose,
            parent: None,
            description: String::new(),
        };
        let dump = || req(dump_request, 4 << 20, Purpose::MemoryDump);
        let meta = |capacity| req(meta_request, capacity, Purpose::MemoryMetadata);
        // An earlier try made the dump, and no more.
        create_locked(&domain, &holds, dump(), domain.natural_allocation()).unwrap();
        // The retry: the metadata volume cannot fit.
        let huge = u64::MAX / 4;
        match create_pair_locked(&domain, &holds, dump(), meta(huge), None) {
            Err(StorageError::NoSpace { requested, .. }) => {
                assert_eq!(requested, huge, "only what is missing is counted")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(domain.list(None).unwrap().len(), 0, "the earlier dump went too");
        // A retry that fits makes both, and the next answers the same two.
        let (d, m) = create_pair_locked(&domain, &holds, dump(), meta(1 << 20), None).unwrap();
        // (The retry as BLOCK makes it: with what one read of the domain found.)
        let survey = Some(domain.survey().unwrap());
        let (d2, m2) = create_pair_locked(&domain, &holds, dump(), meta(1 << 20), survey).unwrap();
        assert_eq!(
            (d.volume_ref(), m.volume_ref()),
            (d2.volume_ref(), m2.volume_ref())
        );
        assert_eq!(domain.list(None).unwrap().len(), 2);
        for v in [&d, &m] {
            assert_eq!(v.meta.legality, Legality::Legal);
        }
        // An earlier try's dump is kept when the rest fits.
        domain.remove(m.meta.image, m.meta.volume).unwrap();
        let survey = Some(domain.survey().unwrap());
        let (d3, m3) = create_pair_locked(&domain, &holds, dump(), meta(1 << 20), survey).unwrap();
        assert_eq!(d3.volume_ref(), d.volume_ref());
        assert_ne!(m3.volume_ref(), m.volume_ref());
    }
}
