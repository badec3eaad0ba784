//! What a kind of storage domain must do. Implementations are synchronous
//! (they call the file system, LVM and qemu-img) and run on the blocking
//! pool; [`crate::storage`] serializes the metadata-changing calls per domain.
use crate::descriptor::DescriptorStore;
use crate::error::Result;
use crate::model::{Allocation, DomainInfo, DomainRole, Legality, Volume, VolumeMeta};
use std::path::PathBuf;
use uuid::Uuid;

pub trait Backend: Send + Sync + 'static {
    fn info(&self) -> Result<DomainInfo>;
    /// Every volume on the domain, or only those of one image.
    fn list(&self, image: Option<Uuid>) -> Result<Vec<Volume>>;
    /// One volume, or [`crate::StorageError::VolumeNotFound`].
    fn get(&self, image: Uuid, volume: Uuid) -> Result<Volume>;
    /// Creates the volume, recorded as `meta.legality` (callers pass
    /// ILLEGAL and flip it once the content is complete). For a COW child,
    /// the parent must already be prepared. A new volume reads as zeros
    /// (RAW) or as its parent (COW), never as whatever its space held
    /// before. On error nothing is left behind.
    fn create(&self, meta: &VolumeMeta, parent: Option<&VolumeMeta>) -> Result<()>;
    /// Creates a volume whose content is complete once it is made (a new
    /// empty volume, not a copy's target) and leaves it LEGAL: `meta` says
    /// LEGAL. A crash part-way still leaves a visible ILLEGAL volume, as
    /// [`Backend::create`] does. The default is that create and then the
    /// flip; a backend may do it in fewer writes.
    fn create_legal(&self, meta: &VolumeMeta, parent: Option<&VolumeMeta>) -> Result<()> {
        let illegal = VolumeMeta {
            legality: Legality::Illegal,
            ..meta.clone()
        };
        self.create(&illegal, parent)?;
        if let Err(e) = self.set_legality(meta.image, meta.volume, Legality::Legal) {
            let _ = self.remove(meta.image, meta.volume);
            return Err(e);
        }
        Ok(())
    }
    /// New volumes without parents, each as [`Backend::create_legal`]
    /// makes it, all or none (what was made is removed on a failure). The
    /// default makes them one by one; a backend may batch.
    fn create_legal_all(&self, metas: &[VolumeMeta]) -> Result<()> {
        for (i, meta) in metas.iter().enumerate() {
            if let Err(e) = self.create_legal(meta, None) {
                for made in &metas[..i] {
                    let _ = self.remove(made.image, made.volume);
                }
                return Err(e);
            }
        }
        Ok(())
    }
    /// [`Backend::create`] right after `survey` was read under the same
    /// lock, as [`Backend::create_legal_surveyed`].
    fn create_surveyed(&self, meta: &VolumeMeta, parent: Option<&VolumeMeta>, survey: &Survey) -> Result<()> {
        let _ = survey;
        self.create(meta, parent)
    }
    /// [`Backend::create_legal`] right after `survey` was read under the
    /// same lock: a backend may use what it read (BLOCK places the LV in
    /// the free space it saw, and so knows where it lies without asking).
    /// The default ignores it.
    fn create_legal_surveyed(
        &self,
        meta: &VolumeMeta,
        parent: Option<&VolumeMeta>,
        survey: &Survey,
    ) -> Result<()> {
        let _ = survey;
        self.create_legal(meta, parent)
    }
    /// [`Backend::create_legal_all`] right after `survey` was read, as
    /// [`Backend::create_legal_surveyed`].
    fn create_legal_all_surveyed(&self, metas: &[VolumeMeta], survey: &Survey) -> Result<()> {
        let _ = survey;
        self.create_legal_all(metas)
    }
    fn set_legality(&self, image: Uuid, volume: Uuid, legality: Legality) -> Result<()>;
    /// Records a new parent in the volume's metadata (after a rebase).
    fn set_parent(&self, image: Uuid, volume: Uuid, parent: Option<Uuid>) -> Result<()>;
    /// Removes the volume and its metadata; an absent volume is success, so
    /// that undo steps can repeat.
    fn remove(&self, image: Uuid, volume: Uuid) -> Result<()>;
    /// Makes the volume accessible on this host and returns its path.
    /// Preparing a prepared volume returns the same path.
    fn prepare(&self, image: Uuid, volume: Uuid) -> Result<PathBuf>;
    /// [`Backend::prepare`] of a volume the caller has just listed (under
    /// the image's lock): a backend may skip what the listing checked.
    fn prepare_listed(&self, v: &Volume) -> Result<PathBuf> {
        self.prepare(v.meta.image, v.meta.volume)
    }
    /// [`Backend::prepare_listed`] of each of `volumes` (a chain the caller
    /// has just listed, parents first): their paths, in order, up to and
    /// including the first error. A backend may do the work of several at
    /// once; the default prepares each in turn.
    fn prepare_listed_chain(&self, volumes: &[&Volume]) -> Vec<Result<PathBuf>> {
        prepare_each(volumes, |v| self.prepare_listed(v))
    }
    /// [`Backend::list`] of one image, for a prepare under the same lock,
    /// and where its volumes lie when the backend learns that in the same
    /// read ([`Located`]; BLOCK without device-mapper: one `pvs` where an
    /// `lvs` and a `pvs` would be two). The default only lists.
    fn list_to_prepare(&self, image: Uuid) -> Result<(Vec<Volume>, Located)> {
        Ok((self.list(Some(image))?, Located::default()))
    }
    /// [`Backend::prepare_listed_chain`] of volumes [`Backend::list_to_prepare`]
    /// just listed, with what it found of where they lie.
    fn prepare_located_chain(&self, volumes: &[&Volume], located: &Located) -> Vec<Result<PathBuf>> {
        let _ = located;
        self.prepare_listed_chain(volumes)
    }
    fn is_prepared(&self, image: Uuid, volume: Uuid) -> bool;
    /// Undoes [`Backend::prepare`]; a volume not prepared is success.
    fn teardown(&self, image: Uuid, volume: Uuid) -> Result<()>;
    /// The allocation a volume gets when the caller does not choose.
    fn natural_allocation(&self) -> Allocation;
    /// What the domain is for (recorded on it).
    fn role(&self) -> DomainRole;
    /// Remembers, on the domain, that the delete (or merge) request
    /// `request` is done, and which volume survived it (a merge's child).
    fn record_delete(&self, request: Uuid, survivor: Option<Uuid>) -> Result<()>;
    /// Some(survivor) when `request` was recorded as done.
    fn delete_recorded(&self, request: Uuid) -> Result<Option<Option<Uuid>>>;
    /// Where the domain keeps VM descriptors: Some on EXPORT domains only.
    fn descriptors(&self) -> Option<DescriptorStore>;
    /// The highest metadata-writer generation recorded on the domain; 0
    /// when none was (see [`crate::storage::Storage::admit_writer`]).
    fn writer_generation(&self) -> Result<i64>;
    /// Records `generation` on the domain in place of `previous`.
    fn set_writer_generation(&self, previous: i64, generation: i64) -> Result<()>;
    /// What a create in an existing image reads first: the volume that
    /// request `request` made ([`Backend::find_request`]) and the volumes
    /// of `image`. The default asks for each; a backend may read both at
    /// once.
    fn request_and_image(&self, request: Uuid, image: Uuid) -> Result<(Option<Volume>, Vec<Volume>)> {
        Ok((self.find_request(request)?, self.list(Some(image))?))
    }
    /// [`Backend::find_request`] of each request, in order. The default
    /// asks for each; a backend may read them all at once.
    fn find_requests(&self, requests: &[Uuid]) -> Result<Vec<Option<Volume>>> {
        requests.iter().map(|r| self.find_request(*r)).collect()
    }
    /// The volume just made by [`Backend::create_legal`] from `meta`. The
    /// default reads it back; a backend that knows what it wrote may answer
    /// without a read.
    fn created(&self, meta: &VolumeMeta) -> Result<Volume> {
        self.get(meta.image, meta.volume)
    }
    /// What a create reads of the domain before it changes anything (see
    /// [`Survey`]). The default asks for each part; a backend may read
    /// them at once.
    fn survey(&self) -> Result<Survey> {
        Ok(Survey {
            info: self.info()?,
            volumes: self.list(None)?,
            writer_generation: self.writer_generation()?,
            free_space: None,
        })
    }
    /// The volume that a create (or copy) with request id `request` made,
    /// whatever its legality: its metadata records the request. The
    /// default looks at every volume of the domain.
    fn find_request(&self, request: Uuid) -> Result<Option<Volume>> {
        Ok(self
            .list(None)?
            .into_iter()
            .find(|v| v.meta.request_id == Some(request)))
    }
}

/// A domain as a create reads it first, all at one time: its free space,
/// every volume (to find what the request made before, and the image's
/// volumes), and the writer generation recorded on it (the fence). On
/// BLOCK one `pvs` instead of three or four LVM commands.
#[derive(Debug, Clone)]
pub struct Survey {
    pub info: DomainInfo,
    /// In [`Backend::list`]'s order.
    pub volumes: Vec<Volume>,
    pub writer_generation: i64,
    /// BLOCK: where the VG's free extents lie (see
    /// [`crate::block::FreeSpace`]); None elsewhere.
    pub(crate) free_space: Option<crate::block::FreeSpace>,
}

impl Survey {
    /// The volume that request `request` made, as [`Backend::find_request`].
    pub fn find_request(&self, request: Uuid) -> Option<Volume> {
        self.volumes
            .iter()
            .find(|v| v.meta.request_id == Some(request))
            .cloned()
    }

    /// The volumes of `image`, as [`Backend::list`] of it.
    pub fn image(&self, image: Uuid) -> Vec<Volume> {
        self.volumes
            .iter()
            .filter(|v| v.meta.image == image)
            .cloned()
            .collect()
    }
}

/// Where volumes lie, read with their listing (see
/// [`Backend::list_to_prepare`]): on BLOCK each LV's extent on its PV, by
/// volume id; empty elsewhere.
#[derive(Debug, Clone, Default)]
pub struct Located(pub(crate) std::collections::HashMap<Uuid, crate::lvm::Extent>);

/// How long completed delete requests are remembered for retries.
pub const DELETE_JOURNAL_TTL_SECS: i64 = 7 * 24 * 3600;

/// `prepare` of each volume in turn, up to and including the first error.
pub fn prepare_each<T>(
    volumes: &[T],
    mut prepare: impl FnMut(&T) -> Result<PathBuf>,
) -> Vec<Result<PathBuf>> {
    let mut out = Vec::with_capacity(volumes.len());
    for v in volumes {
        let r = prepare(v);
        let failed = r.is_err();
        out.push(r);
        if failed {
            break;
        }
    }
    out
}
