//! The storage domain's own vocabulary, free of any transport types.
use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// Version of the on-domain metadata formats (domain and volume). Bumped on
/// any incompatible change; readers refuse versions they do not know.
pub const METADATA_VERSION: u32 = 1;

/// Size of a memory metadata volume: the domain XML and ramsnap's own
/// metadata at dump time (a few KiB); BLOCK rounds it up to one extent.
pub const MEMORY_METADATA_BYTES: u64 = 1024 * 1024;

/// oVirt 3.3's allowance on top of the guest RAM for a memory dump.
pub const MEMORY_DUMP_OVERHEAD_BYTES: u64 = 200 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DomainType {
    File,
    Block,
}

/// What a domain is for, as in oVirt. DATA domains hold the disks and
/// memory of VMs; an EXPORT domain (FILE only) holds exported VMs: their
/// volumes, copied there layer by layer, and their OVF descriptors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DomainRole {
    /// Also what domains laid out before roles existed are.
    #[default]
    Data,
    Export,
}

impl fmt::Display for DomainRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DomainRole::Data => "DATA",
            DomainRole::Export => "EXPORT",
        })
    }
}

/// Whose layout a FILE domain's metadata follows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DomainFormat {
    /// ramsnap's own (JSON metadata); every BLOCK domain.
    #[default]
    Ramsnap,
    /// oVirt's (VDSM's `KEY=VALUE` files): an oVirt export domain, adopted
    /// read-only (see [`crate::ovirt`]).
    Ovirt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Format {
    Raw,
    Cow,
}

impl Format {
    /// The name qemu-img uses.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Cow => "qcow2",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Allocation {
    Sparse,
    Preallocated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Purpose {
    Disk,
    MemoryDump,
    MemoryMetadata,
}

impl std::fmt::Display for Purpose {
    /// As the API spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Purpose::Disk => "DISK",
            Purpose::MemoryDump => "MEMORY_DUMP",
            Purpose::MemoryMetadata => "MEMORY_METADATA",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Legality {
    Legal,
    Illegal,
}

/// How a memory dump is taken; decides the dump volume's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpMode {
    Paused,
    Live,
}

impl DumpMode {
    /// Dump volume size for a guest with `memory` bytes of RAM. A paused
    /// dump writes each page once: RAM + 200 MiB, as oVirt 3.3 sized it. A
    /// live dump re-sends pages the guest dirties while it is written, so it
    /// gets twice the RAM; one that outgrows even that fails cleanly.
    pub fn dump_size(self, memory: u64) -> u64 {
        let ram = match self {
            DumpMode::Paused => memory,
            DumpMode::Live => memory.saturating_mul(2),
        };
        ram.saturating_add(MEMORY_DUMP_OVERHEAD_BYTES)
    }
}

/// A volume's full address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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

/// What the domain records about a volume, beside the volume itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub version: u32,
    pub image: Uuid,
    pub volume: Uuid,
    pub parent: Option<Uuid>,
    pub format: Format,
    pub allocation: Allocation,
    pub purpose: Purpose,
    pub legality: Legality,
    /// Virtual size in bytes.
    pub capacity: u64,
    pub description: String,
    /// The client request that created it, for idempotent retries.
    pub request_id: Option<Uuid>,
    /// Unix seconds.
    pub created_at: i64,
}

/// A volume as listed: its metadata plus what it occupies now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    pub domain: Uuid,
    pub meta: VolumeMeta,
    pub allocated: u64,
}

impl Volume {
    pub fn volume_ref(&self) -> VolumeRef {
        VolumeRef {
            domain: self.domain,
            image: self.meta.image,
            volume: self.meta.volume,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainInfo {
    pub id: Uuid,
    pub name: String,
    pub domain_type: DomainType,
    pub role: DomainRole,
    /// FILE: the directory given at registration. BLOCK: the PV device.
    pub location: String,
    pub capacity: u64,
    pub free: u64,
    pub metadata_version: u32,
    pub format: DomainFormat,
    /// An oVirt domain attached to an oVirt data center: only read.
    pub read_only: bool,
}

/// Largest OVF document a VM descriptor may hold. oVirt's OVFs are tens
/// of KiB; the bound keeps one Put (and each descriptor in a List) well
/// inside what a gRPC message carries.
pub const MAX_DESCRIPTOR_BYTES: usize = 16 * 1024 * 1024;

/// An exported VM's OVF document, as an EXPORT domain keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDescriptor {
    pub vm: Uuid,
    pub ovf: String,
    /// Unix seconds of the last Put (the file's mtime).
    pub updated_at: i64,
}

/// Checks a domain name: it is stored in LVM tags too, so it keeps to
/// the characters both LVM and file names accept.
pub fn valid_domain_name(name: &str) -> bool {
    (1..=crate::limits::MAX_DOMAIN_NAME_BYTES).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !name.starts_with(['.', '-'])
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_sizes_follow_the_policy() {
        let gib = 1u64 << 30;
        assert_eq!(DumpMode::Paused.dump_size(gib), gib + 200 * 1024 * 1024);
        assert_eq!(DumpMode::Live.dump_size(gib), 2 * gib + 200 * 1024 * 1024);
    }

    #[test]
    fn domain_names() {
        assert!(valid_domain_name("nfs-1.example_a"));
        assert!(!valid_domain_name(""));
        assert!(!valid_domain_name("../x"));
        assert!(!valid_domain_name("a b"));
        assert!(!valid_domain_name(&"x".repeat(65)));
    }
}
