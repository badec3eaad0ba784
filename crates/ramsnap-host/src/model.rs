//! The host agent's own types, in the feature's words: a VM spec, its disks
//! as volume refs, memory volumes, snapshot modes and the VM status machine.
//! The tonic layer converts into these (rejecting bad input there); nothing
//! below it sees a protobuf type.
use ramsnap_common::checksum::Checksum;
use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

pub const MIB: u64 = 1024 * 1024;

/// One volume, addressed as VDSM does: domain, image, volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VolumeRef {
    pub domain: Uuid,
    pub image: Uuid,
    pub volume: Uuid,
}

impl fmt::Display for VolumeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.domain, self.image, self.volume)
    }
}

/// The pair of volumes holding a snapshot's memory (oVirt 3.3's layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryVolumes {
    pub dump: VolumeRef,
    pub metadata: VolumeRef,
}

/// A file name inside the host's boot-image directory: never a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFile(String);

impl BootFile {
    /// Accepts a plain file name: no '/', not "." or "..", no NUL or
    /// control characters, at most 255 bytes.
    pub fn parse(name: &str) -> Result<BootFile, String> {
        if name.is_empty() {
            return Err("is empty".into());
        }
        if name.len() > 255 {
            return Err("is longer than 255 bytes".into());
        }
        if name == "." || name == ".." || name.contains('/') {
            return Err(format!("{name:?} is not a plain file name"));
        }
        if name.chars().any(ramsnap_common::text::forbidden) {
            return Err("contains control, line-separator or bidi-formatting characters".into());
        }
        Ok(BootFile(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a VM is made of, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub vm_id: Uuid,
    pub name: String,
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// The disks' current leaf volumes, in order: vda, vdb, ...
    pub disks: Vec<VolumeRef>,
    pub kernel: Option<BootFile>,
    pub initrd: Option<BootFile>,
    pub cmdline: String,
}

pub const MIN_MEMORY: u64 = 16 * MIB;
pub const MAX_MEMORY: u64 = 4096 * 1024 * MIB;
pub const MAX_VCPUS: u32 = 256;
/// vda..vdz.
pub const MAX_DISKS: usize = 26;
pub const MAX_CMDLINE: usize = 4096;
pub const MAX_NAME: usize = 255;

/// The target device of the disk at `index` (vda, vdb, ...).
pub fn disk_dev(index: usize) -> String {
    format!("vd{}", (b'a' + index as u8) as char)
}

impl VmSpec {
    /// Checks every field that the tonic layer cannot check by type;
    /// returns the offending field and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.name.len() > MAX_NAME || self.name.chars().any(ramsnap_common::text::forbidden) {
            return Err((
                "spec.name",
                format!("must be at most {MAX_NAME} bytes without control, line-separator or bidi-formatting characters"),
            ));
        }
        if self.memory_bytes < MIN_MEMORY || self.memory_bytes > MAX_MEMORY {
            return Err((
                "spec.memory_bytes",
                format!("must be between {MIN_MEMORY} and {MAX_MEMORY}"),
            ));
        }
        if !self.memory_bytes.is_multiple_of(MIB) {
            return Err(("spec.memory_bytes", "must be a multiple of 1 MiB".into()));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(("spec.vcpus", format!("must be between 1 and {MAX_VCPUS}")));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(("spec.disks", format!("at most {MAX_DISKS} disks")));
        }
        if self.kernel.is_none() && (self.initrd.is_some() || !self.cmdline.is_empty()) {
            return Err(("spec.kernel", "is required with an initrd or a cmdline".into()));
        }
        if self.cmdline.len() > MAX_CMDLINE || self.cmdline.chars().any(ramsnap_common::text::forbidden) {
            return Err((
                "spec.cmdline",
                format!("must be at most {MAX_CMDLINE} bytes without control, line-separator or bidi-formatting characters"),
            ));
        }
        Ok(())
    }
}

/// oVirt's VM statuses, as far as a host reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmStatus {
    Down,
    PoweringUp,
    Up,
    Paused,
    RestoringState,
    SavingState,
    PoweringDown,
}

/// A status and when it began (Unix milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusEvent {
    pub status: VmStatus,
    pub at_unix_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// oVirt 3.3: the guest is paused while its memory is written.
    Paused,
    /// libvirt's live flag: the guest runs during the dump, then a short pause.
    Live,
}

/// A cluster compatibility level ("3.3").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClusterLevel {
    pub major: u32,
    pub minor: u32,
}

impl ClusterLevel {
    /// The first level with memory snapshots.
    pub const MEMORY_SNAPSHOTS: ClusterLevel = ClusterLevel { major: 3, minor: 3 };

    pub fn parse(s: &str) -> Option<ClusterLevel> {
        let (major, minor) = s.split_once('.')?;
        let digits = |p: &str| !p.is_empty() && p.len() <= 6 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(major) || !digits(minor) {
            return None;
        }
        Some(ClusterLevel {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }

    pub fn has_memory_snapshots(self) -> bool {
        self >= Self::MEMORY_SNAPSHOTS
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotDisk {
    /// The VM's current leaf (what the overlay goes on).
    pub current: VolumeRef,
    /// The pre-created COW volume whose parent is `current`.
    pub overlay: VolumeRef,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub job_id: Uuid,
    pub vm_id: Uuid,
    pub snapshot_id: Uuid,
    pub disks: Vec<SnapshotDisk>,
    pub memory: Option<MemoryVolumes>,
    pub mode: SnapshotMode,
    pub level: ClusterLevel,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub processed: u64,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOutcome {
    pub memory_saved: bool,
    pub dump_bytes: u64,
    /// None without memory.
    pub dump_checksum: Option<Checksum>,
    pub guest_pause_ms: u64,
    pub duration_ms: u64,
}

/// How VerifyMemory rebinds a memory metadata document to where the VM's
/// volumes are now (after an export or an import moved them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebind {
    /// Every disk reference (frozen volume and overlay) moves to this
    /// domain; image and volume ids are kept (a chain copied volume by
    /// volume).
    DiskDomain(Uuid),
    /// Per disk, in the metadata's order, the volume that now shows what
    /// the disk showed when the memory was saved (a collapsed chain); the
    /// overlays are kept as they are.
    Disks(Vec<VolumeRef>),
}

/// A VerifyMemory request, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyMemoryRequest {
    /// The VM the memory must belong to.
    pub vm_id: Uuid,
    /// Where the dump and metadata volumes are now.
    pub memory: MemoryVolumes,
    /// A checksum the dump must match besides the metadata's.
    pub expected_checksum: Option<Checksum>,
    /// The dump's checksum as the storage service's copy computed it: with
    /// the metadata's algorithm and capacity, it stands for the dump's
    /// bytes (not read again).
    pub copied_checksum: Option<Checksum>,
    pub rebind: Option<Rebind>,
    /// Give the pair to this VM (see the proto's `rebrand_vm_id`).
    pub rebrand: Option<Uuid>,
    /// An oVirt memory to adopt first (see the proto's `adopt_ovirt`).
    pub adopt_ovirt: Option<OvirtAdoption>,
    /// Write the metadata as oVirt keeps it afterwards (`as_ovirt`).
    pub as_ovirt: bool,
}

/// What ramsnap's metadata records of an oVirt memory snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvirtAdoption {
    pub snapshot_id: Uuid,
    /// Unix seconds.
    pub created_at: i64,
    /// Per disk, in order: (current, overlay) as `metadata::DiskRecord`.
    pub disks: Vec<(VolumeRef, VolumeRef)>,
}

/// What VerifyMemory found (and, with a rebind, wrote).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedMemory {
    pub checksum: Checksum,
    pub dump_bytes: u64,
    /// The dump capacity the checksum covers.
    pub capacity: u64,
    pub snapshot_id: Uuid,
    /// Unix seconds.
    pub created_at: i64,
    /// True when the metadata was rewritten.
    pub rebound: bool,
    /// Per disk, the volume the metadata binds it to now (its frozen volume).
    pub disks: Vec<VolumeRef>,
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_files_are_plain_names() {
        assert!(BootFile::parse("vmlinux").is_ok());
        assert!(BootFile::parse("initramfs-6.1.img").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "../vmlinux",
            "/boot/vmlinuz",
            "a/b",
            "x\ny",
            "x\0y",
        ] {
            assert!(BootFile::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cluster_levels() {
        let l = |s| ClusterLevel::parse(s);
        assert!(l("3.3").unwrap().has_memory_snapshots());
        assert!(l("4.0").unwrap().has_memory_snapshots());
        assert!(l("3.10").unwrap().has_memory_snapshots());
        assert!(!l("3.2").unwrap().has_memory_snapshots());
        assert!(!l("2.9").unwrap().has_memory_snapshots());
        for bad in ["", "3", "3.", ".3", "3.3.1", "a.b", "-3.3", "3.+3", "99999999.1"] {
            assert!(l(bad).is_none(), "{bad:?} parsed");
        }
    }

    #[test]
    fn spec_validation_names_the_field() {
        let spec = VmSpec {
            vm_id: Uuid::new_v4(),
            name: "vm".into(),
            memory_bytes: 256 * MIB,
            vcpus: 1,
            disks: vec![],
            kernel: None,
            initrd: None,
            cmdline: String::new(),
        };
        assert!(spec.validate().is_ok());
        let bad = |f: &dyn Fn(&mut VmSpec)| {
            let mut s = spec.clone();
            f(&mut s);
            s.validate().unwrap_err().0
        };
        assert_eq!(bad(&|s| s.memory_bytes = MIB), "spec.memory_bytes");
        assert_eq!(bad(&|s| s.memory_bytes = 256 * MIB + 1), "spec.memory_bytes");
        assert_eq!(bad(&|s| s.vcpus = 0), "spec.vcpus");
        assert_eq!(bad(&|s| s.cmdline = "console=ttyS0".into()), "spec.kernel");
        assert_eq!(bad(&|s| s.name = "a\nb".into()), "spec.name");
        assert_eq!(disk_dev(0), "vda");
        assert_eq!(disk_dev(25), "vdz");
    }
}
