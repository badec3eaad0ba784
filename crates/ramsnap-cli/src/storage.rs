//! Commands of the storage service: `domain ...` ([`domain`]) and
//! `volume ...` ([`volume`]); [`render`] turns their messages into table
//! rows and JSON.
mod domain;
pub(crate) mod render;
mod volume;

pub use domain::DomainCommand;
pub use volume::VolumeCommand;

use crate::{client, Global};
use ramsnap_proto::storage::v1 as pb;
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use tonic::transport::Channel;

pub async fn run_domain(global: &Global, cmd: DomainCommand) -> anyhow::Result<()> {
    domain::run(connect(global).await?, global.output, cmd).await
}

pub async fn run_volume(global: &Global, cmd: VolumeCommand) -> anyhow::Result<()> {
    volume::run(connect(global).await?, global.output, cmd).await
}

async fn connect(global: &Global) -> anyhow::Result<StorageServiceClient<Channel>> {
    let channel = client::connect(
        &global.storage,
        "storage",
        "--storage or RAMSNAP_STORAGE",
        &global.security,
    )
    .await?;
    Ok(StorageServiceClient::new(channel))
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum DomainKind {
    /// A directory (an NFS export in production).
    File,
    /// An LVM volume group on a shared block device.
    Block,
}

impl From<DomainKind> for pb::DomainType {
    fn from(k: DomainKind) -> Self {
        match k {
            DomainKind::File => pb::DomainType::File,
            DomainKind::Block => pb::DomainType::Block,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    Raw,
    /// qcow2; may have a parent volume in the same image.
    Cow,
}

impl From<FormatArg> for pb::VolumeFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Raw => pb::VolumeFormat::Raw,
            FormatArg::Cow => pb::VolumeFormat::Cow,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum AllocationArg {
    Sparse,
    Preallocated,
}

impl From<AllocationArg> for pb::VolumeAllocation {
    fn from(a: AllocationArg) -> Self {
        match a {
            AllocationArg::Sparse => pb::VolumeAllocation::Sparse,
            AllocationArg::Preallocated => pb::VolumeAllocation::Preallocated,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum PurposeArg {
    Disk,
    MemoryDump,
    MemoryMetadata,
}

impl From<PurposeArg> for pb::VolumePurpose {
    fn from(p: PurposeArg) -> Self {
        match p {
            PurposeArg::Disk => pb::VolumePurpose::Disk,
            PurposeArg::MemoryDump => pb::VolumePurpose::MemoryDump,
            PurposeArg::MemoryMetadata => pb::VolumePurpose::MemoryMetadata,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum DumpModeArg {
    /// The guest runs during the dump: 2 x RAM + 200 MiB.
    Live,
    /// The guest is paused during the dump: RAM + 200 MiB.
    Paused,
}

impl From<DumpModeArg> for pb::MemoryDumpMode {
    fn from(m: DumpModeArg) -> Self {
        match m {
            DumpModeArg::Live => pb::MemoryDumpMode::Live,
            DumpModeArg::Paused => pb::MemoryDumpMode::Paused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    /// The flag values and the JSON labels are spelled alike, so a value read
    /// from `-o json` can be passed back as a flag.
    #[test]
    fn flag_values_match_json_labels() {
        for p in PurposeArg::value_variants() {
            let name = p.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(render::purpose(pb::VolumePurpose::from(*p) as i32), name);
        }
        for f in FormatArg::value_variants() {
            let name = f.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(render::format(pb::VolumeFormat::from(*f) as i32), name);
        }
        for a in AllocationArg::value_variants() {
            let name = a.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(render::allocation(pb::VolumeAllocation::from(*a) as i32), name);
        }
        for k in DomainKind::value_variants() {
            let name = k.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(render::domain_type(pb::DomainType::from(*k) as i32), name);
        }
    }
}
