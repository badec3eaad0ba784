//! VM descriptors (OVF documents) on an EXPORT domain, kept where oVirt
//! keeps them, so that a domain moved to another data center (or read by
//! oVirt's own tools) carries its VMs' definitions with their volumes:
//!
//! ```text
//! <domain dir>/master/vms/<vm>/<vm>.ovf
//! ```
//!
//! A Put writes a temporary file beside the document and renames it over
//! (`file::write_atomic`), so a reader on any host sees the old
//! or the new document, never a mix; temporary files are never listed.
use crate::error::{Result, StorageError};
use crate::file::{sync_dir, write_atomic};
use crate::model::{VmDescriptor, MAX_DESCRIPTOR_BYTES};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// The descriptors of one EXPORT domain.
pub struct DescriptorStore {
    domain: Uuid,
    /// `<domain dir>/master/vms`.
    dir: PathBuf,
    /// The oVirt data center the domain is attached to: Put and Delete
    /// are refused.
    attached_to: Option<String>,
    /// An oVirt domain's: what is written belongs to vdsm:kvm.
    vdsm_owned: bool,
}

impl DescriptorStore {
    pub fn new(domain: Uuid, dir: PathBuf) -> DescriptorStore {
        DescriptorStore {
            domain,
            dir,
            attached_to: None,
            vdsm_owned: false,
        }
    }

    /// The descriptors of an oVirt export domain.
    pub fn new_ovirt(domain: Uuid, dir: PathBuf) -> DescriptorStore {
        DescriptorStore {
            vdsm_owned: true,
            ..DescriptorStore::new(domain, dir)
        }
    }

    /// The descriptors of an oVirt export domain attached to oVirt data
    /// center `pool`: read only.
    pub fn read_only(domain: Uuid, pool: String, dir: PathBuf) -> DescriptorStore {
        DescriptorStore {
            attached_to: Some(pool),
            ..DescriptorStore::new_ovirt(domain, dir)
        }
    }

    fn writable(&self) -> Result<()> {
        match &self.attached_to {
            None => Ok(()),
            Some(pool) => Err(crate::ovirt::read_only(self.domain, pool)),
        }
    }

    fn vm_dir(&self, vm: Uuid) -> PathBuf {
        self.dir.join(vm.to_string())
    }

    fn ovf_path(&self, vm: Uuid) -> PathBuf {
        self.vm_dir(vm).join(format!("{vm}.ovf"))
    }

    /// Replaces (or creates) the VM's descriptor.
    pub fn put(&self, vm: Uuid, ovf: &str) -> Result<VmDescriptor> {
        self.writable()?;
        check_ovf(ovf)?;
        create_dir_durably(&self.vm_dir(vm))?;
        let path = self.ovf_path(vm);
        write_atomic(&path, ovf.as_bytes())?;
        if self.vdsm_owned {
            crate::ovirt::own(&self.vm_dir(vm));
            crate::ovirt::own(&path);
        }
        Ok(VmDescriptor {
            vm,
            ovf: ovf.to_string(),
            updated_at: fs::metadata(&path)?.mtime(),
        })
    }

    pub fn get(&self, vm: Uuid) -> Result<VmDescriptor> {
        self.read(vm)?.ok_or(StorageError::VmDescriptorNotFound {
            domain: self.domain,
            vm,
        })
    }

    /// Every descriptor, by VM id.
    pub fn list(&self) -> Result<Vec<VmDescriptor>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in entries {
            let name = entry?.file_name();
            // Only directories named by a canonical VM id hold descriptors.
            let Some(vm) = name
                .to_str()
                .and_then(|n| Uuid::parse_str(n).ok().filter(|id| id.to_string() == n))
            else {
                continue;
            };
            // A VM directory without its document is a Put under way (only
            // its temporary file exists yet) or a Delete part-way.
            if let Some(d) = self.read(vm)? {
                out.push(d);
            }
        }
        out.sort_by_key(|d| d.vm);
        Ok(out)
    }

    /// Removes the descriptor and its VM directory, as oVirt removes an
    /// exported VM; an absent descriptor is success, so deletes can repeat.
    pub fn delete(&self, vm: Uuid) -> Result<()> {
        self.writable()?;
        match fs::remove_dir_all(self.vm_dir(vm)) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A domain shared over NFS may hold anything another system wrote:
    /// the VM's directory and its document are read only when they are a
    /// directory and a regular file (no symbolic link to elsewhere on the
    /// host), and at most [`MAX_DESCRIPTOR_BYTES`] of the document.
    fn read(&self, vm: Uuid) -> Result<Option<VmDescriptor>> {
        let path = self.ovf_path(vm);
        let refused = |reason: &str| {
            StorageError::precondition(
                "DESCRIPTOR_INVALID",
                format!("vm_descriptor/{}/{vm}", self.domain),
                format!("the descriptor of VM {vm} on domain {}: {reason}", self.domain),
            )
        };
        match fs::symlink_metadata(self.vm_dir(vm)) {
            Ok(st) if st.file_type().is_dir() => {}
            Ok(_) => return Err(refused("its directory is not a directory (a symbolic link?)")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let mut f = match fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(refused("the document is a symbolic link"))
            }
            Err(e) => return Err(e.into()),
        };
        // Content and time from the same open file: a concurrent Put
        // renames a new file over the path, it does not change this one.
        let st = f.metadata()?;
        if !st.is_file() {
            return Err(refused("the document is not a regular file"));
        }
        let updated_at = st.mtime();
        let mut bytes = Vec::new();
        (&mut f)
            .take(MAX_DESCRIPTOR_BYTES as u64 + 1)
            .read_to_end(&mut bytes)?;
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(refused(&format!(
                "the document is larger than a descriptor may be ({MAX_DESCRIPTOR_BYTES} bytes)"
            )));
        }
        let ovf = String::from_utf8(bytes).map_err(|e| StorageError::CorruptMetadata {
            subject: path.display().to_string(),
            reason: format!("the OVF document is not UTF-8: {e}"),
        })?;
        Ok(Some(VmDescriptor { vm, ovf, updated_at }))
    }
}

/// Rejects what is not a document to keep: nothing, or more than a gRPC
/// message should carry.
pub fn check_ovf(ovf: &str) -> Result<()> {
    if ovf.is_empty() {
        return Err(StorageError::invalid("ovf", "is required"));
    }
    if ovf.len() > MAX_DESCRIPTOR_BYTES {
        return Err(StorageError::invalid(
            "ovf",
            format!(
                "is {} bytes; a descriptor holds at most {MAX_DESCRIPTOR_BYTES} bytes (16 MiB)",
                ovf.len()
            ),
        ));
    }
    Ok(())
}

/// Creates `dir` and its missing ancestors, syncing each new entry's parent
/// so that the directories survive a crash along with the document.
fn create_dir_durably(dir: &Path) -> Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        if let Some(parent) = d.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, DescriptorStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = DescriptorStore::new(Uuid::new_v4(), dir.path().join("dom/master/vms"));
        (dir, store)
    }

    #[test]
    fn put_get_list_delete() {
        let (_dir, store) = store();
        assert!(store.list().unwrap().is_empty(), "no master/vms yet");
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let put = store.put(a, "<ovf/>").unwrap();
        assert_eq!(store.get(a).unwrap(), put);
        assert!(store.dir.join(format!("{a}/{a}.ovf")).is_file());
        store.put(b, "<b/>").unwrap();
        store.put(a, "<ovf version='2'/>").unwrap();
        let listed = store.list().unwrap();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(listed.iter().map(|d| d.vm).collect::<Vec<_>>(), want);
        assert_eq!(store.get(a).unwrap().ovf, "<ovf version='2'/>");
        store.delete(a).unwrap();
        store.delete(a).unwrap();
        assert!(!store.dir.join(a.to_string()).exists());
        assert!(matches!(
            store.get(a),
            Err(StorageError::VmDescriptorNotFound { vm, .. }) if vm == a
        ));
    }

    #[test]
    fn list_skips_what_is_not_a_descriptor() {
        let (_dir, store) = store();
        let a = Uuid::new_v4();
        store.put(a, "<a/>").unwrap();
        // A Put that died before its rename, and stray entries.
        let b = Uuid::new_v4();
        fs::create_dir_all(store.dir.join(b.to_string())).unwrap();
        fs::write(store.dir.join(format!("{b}/{b}.tmp.0123")), "<half").unwrap();
        fs::write(store.dir.join(format!("{a}/{a}.tmp.4567")), "<half").unwrap();
        fs::create_dir_all(store.dir.join("not-a-vm")).unwrap();
        fs::create_dir_all(store.dir.join(a.simple().to_string())).unwrap();
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].ovf, "<a/>");
    }

    #[test]
    fn bad_documents() {
        assert!(check_ovf("").is_err());
        assert!(check_ovf(&"x".repeat(MAX_DESCRIPTOR_BYTES)).is_ok());
        let err = check_ovf(&"x".repeat(MAX_DESCRIPTOR_BYTES + 1)).unwrap_err();
        assert!(matches!(err, StorageError::InvalidArgument { field: "ovf", .. }));
    }
}
