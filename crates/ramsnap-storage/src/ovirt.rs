//! oVirt's own file-based export domains (issue 14), adopted read-only: a
//! directory `<location>/<sdUUID>/` as VDSM 3.3 lays one out (facts in
//! `shared/reference/ovirt-export-domain.md`):
//!
//! ```text
//! dom_md/metadata                    KEY=VALUE, CLASS=Backup, _SHA_CKSUM last
//! images/<image>/<volume>            raw or qcow2 (a child's backing file
//!                                    is ../<image>/<parent>)
//! images/<image>/<volume>.meta       KEY=VALUE lines, then EOF; SIZE in sectors
//! master/vms/<vm>/<vm>.ovf           the VMs' OVFs, as oVirt's engine writes them
//! ```
//!
//! Such a domain may come from anywhere (an NFS export another system
//! wrote), so nothing in it is trusted: the domain metadata's checksum is
//! verified; each `.meta` is bounded and must end with `EOF` and name its
//! own domain and image; volume files and image directories must be what
//! they claim (no symbolic links, regular files); a qcow2 volume's backing
//! file must be exactly the parent its `.meta` names, in its own image
//! directory, and it may not keep its data in an external file. A volume
//! that fails any of these is refused with FAILED_PRECONDITION
//! `OVIRT_VOLUME_INVALID` naming it and the reason, never read around.
use crate::error::{Result, StorageError};
use crate::model::*;
use ramsnap_common::ovirt::meta;
use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use uuid::Uuid;

/// What ramsnap keeps of an oVirt export domain's `dom_md/metadata`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainMeta {
    pub id: Uuid,
    /// The domain's name in ramsnap: its DESCRIPTION when that is a valid
    /// ramsnap domain name, else `ovirt-<first 8 hex digits of its id>`.
    pub name: String,
    /// VDSM's domain format version (`VERSION`).
    pub version: u32,
    /// The oVirt data center it is attached to (`POOL_UUID`), if any.
    pub pool: Option<String>,
}

/// The format version of the export domains ramsnap lays out: V0, which
/// oVirt 3.3 writes for export domains (no volume leases).
pub const VDSM_EXPORT_VERSION: u32 = 0;

/// The key ramsnap adds to a `.meta` it writes: the request that made the
/// volume (for idempotent retries). VDSM reads every `KEY=VALUE` line into
/// a dict and uses the keys it knows; a value has no `=`.
const REQUEST_KEY: &str = "RAMSNAP_REQUEST";

/// VDSM's user and group (vdsm:kvm), which own an export domain's files.
const VDSM_UID: u32 = 36;
const KVM_GID: u32 = 36;

/// `dom_md/metadata` of a new export domain, as VDSM writes it when it
/// creates one (detached: no POOL_UUID), `DESCRIPTION` the domain's name.
pub fn new_domain_metadata(id: Uuid, name: &str, location: &Path) -> Result<String> {
    let keys: BTreeMap<String, String> = [
        ("CLASS", "Backup".to_string()),
        ("DESCRIPTION", name.to_string()),
        ("IOOPTIMEOUTSEC", "10".into()),
        ("LEASERETRIES", "3".into()),
        ("LEASETIMESEC", "60".into()),
        ("LOCKPOLICY", String::new()),
        ("LOCKRENEWALINTERVALSEC", "5".into()),
        ("POOL_UUID", String::new()),
        ("REMOTE_PATH", location.display().to_string()),
        ("ROLE", "Regular".into()),
        ("SDUUID", id.to_string()),
        ("TYPE", "NFS".into()),
        ("VERSION", VDSM_EXPORT_VERSION.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    meta::write_domain(&keys).map_err(|e| StorageError::invalid("location", e.to_string()))
}

/// A `.meta` for `v` on domain `domain`, as VDSM 3.3 writes one (sizes in
/// sectors, `EOF` last); `leaf`: no volume has it as parent (VOLTYPE).
/// Memory volumes are marked as oVirt 4.2 marks them (`DISKTYPE` MEMD and
/// MEMM; 3.3 reads any value), disks `2` as 3.3 writes.
pub fn volume_meta_text(domain: Uuid, v: &VolumeMeta, leaf: bool) -> Result<String> {
    // VDSM keeps 210 characters, and a value may not hold '='.
    let description: String = v.description.replace('=', "-").chars().take(210).collect();
    let mut pairs = vec![
        ("DOMAIN", domain.to_string()),
        ("VOLTYPE", if leaf { "LEAF" } else { "INTERNAL" }.to_string()),
        ("CTIME", v.created_at.to_string()),
        (
            "FORMAT",
            match v.format {
                Format::Cow => "COW",
                Format::Raw => "RAW",
            }
            .to_string(),
        ),
        ("IMAGE", v.image.to_string()),
        (
            "DISKTYPE",
            match v.purpose {
                Purpose::Disk => "2",
                Purpose::MemoryDump => "MEMD",
                Purpose::MemoryMetadata => "MEMM",
            }
            .to_string(),
        ),
        ("PUUID", v.parent.unwrap_or(Uuid::nil()).to_string()),
        (
            "LEGALITY",
            match v.legality {
                Legality::Legal => "LEGAL",
                Legality::Illegal => "ILLEGAL",
            }
            .to_string(),
        ),
        ("MTIME", "0".to_string()),
        ("POOL_UUID", String::new()),
        ("SIZE", v.capacity.div_ceil(512).to_string()),
        (
            "TYPE",
            match v.allocation {
                Allocation::Sparse => "SPARSE",
                Allocation::Preallocated => "PREALLOCATED",
            }
            .to_string(),
        ),
        ("DESCRIPTION", description),
    ];
    if let Some(r) = v.request_id {
        pairs.push((REQUEST_KEY, r.to_string()));
    }
    meta::write_volume(&pairs).map_err(|e| StorageError::invalid("description", e.to_string()))
}

/// Gives `path` to vdsm:kvm (best effort: a file system that refuses keeps
/// root's).
pub fn own(path: &Path) {
    let _ = std::os::unix::fs::chown(path, Some(VDSM_UID), Some(KVM_GID));
}

/// [`own`] for `dir` and everything under it.
pub fn own_tree(dir: &Path) {
    own(dir);
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => own_tree(&p),
                Ok(t) if t.is_file() => own(&p),
                _ => {}
            }
        }
    }
}

/// qcow2's largest virtual size.
const MAX_CAPACITY_BYTES: u64 = 64 << 40;

/// The file system types of VDSM's file domains.
const FILE_TYPES: &[&str] = &["NFS", "LOCALFS", "POSIXFS", "GLUSTERFS", "SHAREDFS"];

fn domain_invalid(id: Uuid, reason: impl Into<String>) -> StorageError {
    StorageError::precondition(
        "OVIRT_DOMAIN_INVALID",
        format!("storage_domain/{id}/dom_md/metadata"),
        format!("the oVirt domain {id} cannot be adopted: {}", reason.into()),
    )
}

fn volume_invalid(domain: Uuid, image: Uuid, volume: Uuid, reason: impl Into<String>) -> StorageError {
    StorageError::precondition(
        "OVIRT_VOLUME_INVALID",
        format!("volume/{domain}/{image}/{volume}"),
        format!(
            "volume {image}/{volume} of the oVirt domain {domain} cannot be used: {}",
            reason.into()
        ),
    )
}

/// True when `bytes` look like VDSM's `KEY=VALUE` metadata rather than
/// ramsnap's JSON.
pub fn is_vdsm_metadata(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{')
}

/// Reads and checks an oVirt domain's `dom_md/metadata`, found in the
/// directory named `dir_id`: its checksum, `SDUUID` (the directory's
/// name), `CLASS=Backup` (only export domains are read) and a file `TYPE`.
pub fn read_domain_metadata(dir_id: Uuid, bytes: &[u8]) -> Result<DomainMeta> {
    let keys = meta::parse_domain(bytes).map_err(|e| domain_invalid(dir_id, e.to_string()))?;
    let get = |k: &str| keys.get(k).map(String::as_str).unwrap_or("");
    let id = Uuid::parse_str(get("SDUUID"))
        .map_err(|_| domain_invalid(dir_id, format!("SDUUID {:?} is not a UUID", get("SDUUID"))))?;
    if id != dir_id {
        return Err(domain_invalid(
            dir_id,
            format!("SDUUID says {id}, but the domain's directory is {dir_id}"),
        ));
    }
    match get("CLASS") {
        "Backup" => {}
        "Data" | "Iso" => {
            return Err(StorageError::precondition(
                "OVIRT_DOMAIN_UNSUPPORTED",
                format!("storage_domain/{id}"),
                format!(
                "oVirt domain {id} is a {} domain; ramsnap reads oVirt export domains (CLASS=Backup) only",
                get("CLASS")
            ),
            ))
        }
        other => {
            return Err(domain_invalid(
                id,
                format!("CLASS {other:?} is not an oVirt domain class"),
            ))
        }
    }
    if !FILE_TYPES.contains(&get("TYPE")) {
        return Err(StorageError::precondition(
            "OVIRT_DOMAIN_UNSUPPORTED",
            format!("storage_domain/{id}"),
            format!(
                "oVirt domain {id} is of TYPE {:?}; an export domain is a file domain ({})",
                get("TYPE"),
                FILE_TYPES.join(", ")
            ),
        ));
    }
    let version = get("VERSION")
        .parse::<u32>()
        .map_err(|_| domain_invalid(id, format!("VERSION {:?} is not a number", get("VERSION"))))?;
    let pool = Some(get("POOL_UUID").trim().to_string()).filter(|p| !p.is_empty());
    let description = get("DESCRIPTION");
    let name = if valid_domain_name(description) {
        description.to_string()
    } else {
        format!("ovirt-{}", &id.simple().to_string()[..8])
    };
    Ok(DomainMeta {
        id,
        name,
        version,
        pool,
    })
}

/// Reads at most `limit` bytes of the regular file `path` (not through a
/// symbolic link); more is an error.
pub fn read_bounded(path: &Path, limit: usize) -> std::io::Result<Option<Vec<u8>>> {
    let f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a symbolic link, not a file",
            ))
        }
        Err(e) => return Err(e),
    };
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    f.take(limit as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("more than {limit} bytes"),
        ));
    }
    Ok(Some(bytes))
}

/// A volume's `.meta`, read into ramsnap's terms. `None`: there is none.
pub fn read_volume_meta(domain: Uuid, image: Uuid, volume: Uuid, path: &Path) -> Result<Option<VolumeMeta>> {
    let bad = |reason: String| volume_invalid(domain, image, volume, reason);
    let Some(bytes) = read_bounded(path, meta::MAX_BYTES).map_err(|e| bad(format!("its .meta: {e}")))? else {
        return Ok(None);
    };
    let keys = meta::parse(&bytes, true).map_err(|e| bad(format!("its .meta: {e}")))?;
    volume_meta(domain, image, volume, &keys).map(Some).map_err(bad)
}

/// The `.meta` keys of a volume, in ramsnap's terms.
pub fn volume_meta(
    domain: Uuid,
    image: Uuid,
    volume: Uuid,
    keys: &BTreeMap<String, String>,
) -> std::result::Result<VolumeMeta, String> {
    let get = |k: &str| keys.get(k).map(String::as_str);
    let need = |k: &str| get(k).ok_or_else(|| format!("its .meta has no {k}"));
    let uuid = |k: &str| {
        let v = need(k)?;
        Uuid::parse_str(v).map_err(|_| format!("{k} {v:?} is not a UUID"))
    };
    if uuid("DOMAIN")? != domain {
        return Err(format!("DOMAIN names {}, not this domain", need("DOMAIN")?));
    }
    if uuid("IMAGE")? != image {
        return Err(format!("IMAGE names {}, not the image it is in", need("IMAGE")?));
    }
    let parent = match uuid("PUUID")? {
        p if p.is_nil() => None,
        p if p == volume => return Err("PUUID names the volume itself".into()),
        p => Some(p),
    };
    let format = match need("FORMAT")? {
        "COW" => Format::Cow,
        "RAW" => Format::Raw,
        other => return Err(format!("FORMAT {other:?} is neither COW nor RAW")),
    };
    if format == Format::Raw && parent.is_some() {
        return Err("a RAW volume with a parent".into());
    }
    let allocation = match need("TYPE")? {
        "SPARSE" => Allocation::Sparse,
        "PREALLOCATED" => Allocation::Preallocated,
        other => return Err(format!("TYPE {other:?} is neither SPARSE nor PREALLOCATED")),
    };
    let legality = match need("LEGALITY")? {
        "LEGAL" => Legality::Legal,
        "ILLEGAL" | "FAKE" => Legality::Illegal,
        other => return Err(format!("LEGALITY {other:?} is not a legality")),
    };
    // SIZE: 512-byte sectors; CAP (bytes) on newer formats.
    let capacity = match (get("CAP"), get("SIZE")) {
        (Some(cap), _) => cap
            .parse::<u64>()
            .map_err(|_| format!("CAP {cap:?} is not a number"))?,
        (None, Some(size)) => size
            .parse::<u64>()
            .ok()
            .and_then(|s| s.checked_mul(512))
            .ok_or_else(|| format!("SIZE {size:?} is not a number of sectors"))?,
        (None, None) => return Err("its .meta has neither SIZE nor CAP".into()),
    };
    if capacity == 0 || capacity > MAX_CAPACITY_BYTES || capacity % 512 != 0 {
        return Err(format!(
            "its capacity, {capacity} bytes, is not a whole number of sectors up to {MAX_CAPACITY_BYTES}"
        ));
    }
    // oVirt 4.2 and later mark memory volumes; 3.3 writes 2 for every
    // volume, and its OVF says which are memory.
    let purpose = match get("DISKTYPE") {
        Some("MEMD") => Purpose::MemoryDump,
        Some("MEMM") => Purpose::MemoryMetadata,
        _ => Purpose::Disk,
    };
    let created_at = get("CTIME").and_then(|t| t.parse::<i64>().ok()).unwrap_or(0);
    // Kept as a ramsnap volume description may be (it goes on to copies).
    let mut description = String::new();
    for c in get("DESCRIPTION").unwrap_or("").chars() {
        if description.len() + c.len_utf8() > crate::limits::MAX_DESCRIPTION_BYTES {
            break;
        }
        if !ramsnap_common::text::forbidden(c) {
            description.push(c);
        }
    }
    Ok(VolumeMeta {
        version: METADATA_VERSION,
        image,
        volume,
        parent,
        format,
        allocation,
        purpose,
        legality,
        capacity,
        description,
        request_id: get(REQUEST_KEY).and_then(|r| Uuid::parse_str(r).ok()),
        created_at,
    })
}

/// The volume's data file is what its `.meta` says: a regular file (not a
/// link, a device or a directory); a qcow2 one names exactly its recorded
/// parent as its backing file (by bare id, or `../<image>/<id>` as VDSM
/// 3.3 writes it), and keeps its data in itself. None: the file is gone.
pub fn check_data(domain: Uuid, meta: &VolumeMeta, path: &Path) -> Result<Option<u64>> {
    let (image, volume) = (meta.image, meta.volume);
    let bad = |reason: String| volume_invalid(domain, image, volume, reason);
    let st = match fs::symlink_metadata(path) {
        Ok(st) => st,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let ft = st.file_type();
    if ft.is_symlink() || ft.is_block_device() || ft.is_char_device() || !ft.is_file() {
        return Err(bad(
            "its data is not a regular file (a symbolic link, a device or a directory)".into(),
        ));
    }
    if meta.format == Format::Cow {
        let facts = crate::qcow2::header_facts(path).map_err(|e| bad(format!("its qcow2 header: {e}")))?;
        if facts.external_data_file {
            return Err(bad("its qcow2 header says its data is in an external file".into()));
        }
        let expected = meta.parent.map(|p| (p.to_string(), format!("../{image}/{p}")));
        match (&facts.backing, &expected) {
            (None, None) => {}
            (Some(b), Some((bare, vdsm))) if b == bare || b == vdsm => {}
            (Some(b), _) => {
                return Err(bad(format!(
                    "its backing file is {:?}, not the parent its .meta names ({})",
                    crate::limits::echo(b),
                    meta.parent
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "none".into())
                )))
            }
            (None, Some(_)) => return Err(bad("its .meta names a parent, its qcow2 header none".into())),
        }
    }
    use std::os::unix::fs::MetadataExt;
    Ok(Some(st.blocks() * 512))
}

/// An image directory is a directory, not a link to one.
pub fn check_image_dir(domain: Uuid, image: Uuid, path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(st) if st.file_type().is_dir() => Ok(true),
        Ok(_) => Err(StorageError::precondition(
            "OVIRT_VOLUME_INVALID",
            format!("image/{domain}/{image}"),
            format!("image {image} of the oVirt domain {domain} is not a directory (a symbolic link?)"),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The error of every change asked of an oVirt domain attached to an
/// oVirt data center (`pool`).
pub fn read_only(domain: Uuid, pool: &str) -> StorageError {
    StorageError::precondition(
        "DOMAIN_READ_ONLY",
        format!("storage_domain/{domain}"),
        format!(
            "storage domain {domain} is an oVirt export domain attached to oVirt data center {}: \
             ramsnap only reads it (import from it; detach it in oVirt to export to it)",
            crate::limits::echo(pool)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain_md(id: Uuid, class: &str) -> String {
        let mut keys = BTreeMap::new();
        for (k, v) in [
            ("CLASS", class),
            ("DESCRIPTION", "export1"),
            ("IOOPTIMEOUTSEC", "10"),
            ("LEASERETRIES", "3"),
            ("LEASETIMESEC", "60"),
            ("LOCKPOLICY", ""),
            ("LOCKRENEWALINTERVALSEC", "5"),
            ("POOL_UUID", ""),
            ("REMOTE_PATH", "nfs.example:/export"),
            ("ROLE", "Regular"),
            ("TYPE", "NFS"),
            ("VERSION", "0"),
        ] {
            keys.insert(k.to_string(), v.to_string());
        }
        keys.insert("SDUUID".into(), id.to_string());
        meta::write_domain(&keys).unwrap()
    }

    #[test]
    fn a_new_export_domain_reads_back() {
        let id = Uuid::new_v4();
        let text = new_domain_metadata(id, "exp", Path::new("/srv/export")).unwrap();
        let md = read_domain_metadata(id, text.as_bytes()).unwrap();
        assert_eq!((md.name.as_str(), md.version, md.pool), ("exp", 0, None));
        let attached = text.replace("POOL_UUID=\n", "POOL_UUID=aaef93d0-feb2-44b3-85b9-d5ae28734b14\n");
        let keys = meta::parse(attached.as_bytes(), false).unwrap();
        let fixed = meta::write_domain(&keys).unwrap();
        let md = read_domain_metadata(id, fixed.as_bytes()).unwrap();
        assert_eq!(md.pool.as_deref(), Some("aaef93d0-feb2-44b3-85b9-d5ae28734b14"));
    }

    #[test]
    fn reads_an_export_domain_and_refuses_others() {
        let id = Uuid::new_v4();
        let md = read_domain_metadata(id, domain_md(id, "Backup").as_bytes()).unwrap();
        assert_eq!(
            (md.id, md.name.as_str(), md.version, md.pool),
            (id, "export1", 0, None)
        );
        let code = |e: StorageError| match e {
            StorageError::Precondition { kind, .. } => kind,
            e => panic!("{e:?}"),
        };
        let data = read_domain_metadata(id, domain_md(id, "Data").as_bytes()).unwrap_err();
        assert_eq!(code(data), "OVIRT_DOMAIN_UNSUPPORTED");
        let other = read_domain_metadata(Uuid::new_v4(), domain_md(id, "Backup").as_bytes()).unwrap_err();
        assert_eq!(code(other), "OVIRT_DOMAIN_INVALID");
        let tampered = domain_md(id, "Backup").replace("export1", "export2");
        let e = read_domain_metadata(id, tampered.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        assert!(is_vdsm_metadata(b"CLASS=Backup\n"));
        assert!(!is_vdsm_metadata(b"  {\"version\": 1}"));
    }

    #[test]
    fn volume_keys_in_ramsnaps_terms() {
        let (d, i, v, p) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let text = meta::write_volume(&[
            ("DOMAIN", d.to_string()),
            ("CTIME", "1380000000".into()),
            ("FORMAT", "COW".into()),
            ("DISKTYPE", "2".into()),
            ("LEGALITY", "LEGAL".into()),
            ("SIZE", "2097152".into()),
            ("VOLTYPE", "LEAF".into()),
            ("DESCRIPTION", "".into()),
            ("IMAGE", i.to_string()),
            ("PUUID", p.to_string()),
            ("MTIME", "0".into()),
            ("POOL_UUID", "".into()),
            ("TYPE", "SPARSE".into()),
        ])
        .unwrap();
        let keys = meta::parse(text.as_bytes(), true).unwrap();
        let m = volume_meta(d, i, v, &keys).unwrap();
        assert_eq!(m.capacity, 1 << 30);
        assert_eq!(
            (m.parent, m.format, m.purpose),
            (Some(p), Format::Cow, Purpose::Disk)
        );
        assert_eq!(m.created_at, 1_380_000_000);
        // Another image's, another domain's, itself as parent, RAW child.
        let bad = |k: &str, val: String| {
            let mut keys = keys.clone();
            keys.insert(k.into(), val);
            volume_meta(d, i, v, &keys).unwrap_err()
        };
        assert!(bad("IMAGE", Uuid::new_v4().to_string()).contains("IMAGE"));
        assert!(bad("DOMAIN", Uuid::new_v4().to_string()).contains("DOMAIN"));
        assert!(bad("PUUID", v.to_string()).contains("itself"));
        assert!(bad("FORMAT", "RAW".into()).contains("RAW volume with a parent"));
        assert!(bad("SIZE", "-1".into()).contains("SIZE"));
        assert!(bad("SIZE", "0".into()).contains("capacity"));
        let mut memd = keys.clone();
        memd.insert("DISKTYPE".into(), "MEMD".into());
        assert_eq!(volume_meta(d, i, v, &memd).unwrap().purpose, Purpose::MemoryDump);
        // What ramsnap writes reads back the same.
        let mut m = volume_meta(d, i, v, &keys).unwrap();
        m.request_id = Some(Uuid::new_v4());
        m.purpose = Purpose::MemoryMetadata;
        m.description = "memory = of snapshot".into();
        let text = volume_meta_text(d, &m, false).unwrap();
        assert!(
            text.ends_with("EOF\n") && text.contains("VOLTYPE=INTERNAL") && text.contains("SIZE=2097152")
        );
        let back = volume_meta(d, i, v, &meta::parse(text.as_bytes(), true).unwrap()).unwrap();
        assert_eq!(
            back,
            VolumeMeta {
                description: "memory - of snapshot".into(),
                ..m
            }
        );
    }

    #[test]
    fn data_files_are_what_the_meta_says() {
        let dir = tempfile::tempdir().unwrap();
        let (d, i, parent, child) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let img = dir.path().join(i.to_string());
        fs::create_dir(&img).unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new("qemu-img")
                .current_dir(&img)
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        };
        run(&["create", "-q", "-f", "raw", &parent.to_string(), "1M"]);
        let backing = format!("../{i}/{parent}");
        run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &backing,
            "-F",
            "raw",
            &child.to_string(),
            "1M",
        ]);
        let meta_of = |v: Uuid, parent: Option<Uuid>| VolumeMeta {
            version: METADATA_VERSION,
            image: i,
            volume: v,
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
        };
        assert!(
            check_data(d, &meta_of(child, Some(parent)), &img.join(child.to_string()))
                .unwrap()
                .is_some()
        );
        // Another parent than the header's.
        let e = check_data(
            d,
            &meta_of(child, Some(Uuid::new_v4())),
            &img.join(child.to_string()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("backing file"), "{e}");
        // A link to a host file.
        let link = img.join(Uuid::new_v4().to_string());
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        let e = check_data(d, &meta_of(Uuid::new_v4(), None), &link).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(read_bounded(&link, 100).is_err());
        // An external data file.
        let ext = Uuid::new_v4();
        run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=/tmp/ramsnap-ext-data-test",
            &ext.to_string(),
            "1M",
        ]);
        let _ = fs::remove_file("/tmp/ramsnap-ext-data-test");
        let e = check_data(d, &meta_of(ext, None).clone_cow(), &img.join(ext.to_string())).unwrap_err();
        assert!(e.to_string().contains("external file"), "{e}");
        assert!(
            read_bounded(&img.join(parent.to_string()), 10).is_err(),
            "over the bound"
        );
    }

    trait Cow {
        fn clone_cow(&self) -> VolumeMeta;
    }
    impl Cow for VolumeMeta {
        fn clone_cow(&self) -> VolumeMeta {
            VolumeMeta {
                format: Format::Cow,
                ..self.clone()
            }
        }
    }
}
