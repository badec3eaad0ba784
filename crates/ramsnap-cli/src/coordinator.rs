//! Commands of the coordinator (the snapshot service, `--snapshot`):
//! `cluster ...` ([`cluster`]), `host ...` ([`host`]), `vm ...` ([`vm`]),
//! `snapshot ...` ([`snapshot`]) and `operation ...` ([`operation`]).
//! [`wait`] follows the long operations they start; [`render`] turns their
//! messages into table rows and JSON.
mod cluster;
mod host;
mod operation;
mod render;
mod snapshot;
mod vm;
mod wait;

pub use cluster::ClusterCommand;
pub use host::HostCommand;
pub use operation::OperationCommand;
pub use snapshot::SnapshotCommand;
pub use vm::VmCommand;

use crate::names::Names;
use crate::{client, Global};
use tonic::transport::Channel;

pub async fn run_cluster(global: &Global, cmd: ClusterCommand) -> anyhow::Result<()> {
    let channel = connect(global).await?;
    cluster::run(channel.clone(), &Names::new(global, channel), global.output, cmd).await
}

pub async fn run_host(global: &Global, cmd: HostCommand) -> anyhow::Result<()> {
    let channel = connect(global).await?;
    host::run(channel.clone(), &Names::new(global, channel), global.output, cmd).await
}

pub async fn run_vm(global: &Global, cmd: VmCommand) -> anyhow::Result<()> {
    let channel = connect(global).await?;
    vm::run(channel.clone(), &Names::new(global, channel), global.output, cmd).await
}

pub async fn run_snapshot(global: &Global, cmd: SnapshotCommand) -> anyhow::Result<()> {
    let channel = connect(global).await?;
    snapshot::run(channel.clone(), &Names::new(global, channel), global.output, cmd).await
}

pub async fn run_operation(global: &Global, cmd: OperationCommand) -> anyhow::Result<()> {
    let channel = connect(global).await?;
    operation::run(channel.clone(), &Names::new(global, channel), global.output, cmd).await
}

/// One channel to the coordinator, shared by its four service clients.
async fn connect(global: &Global) -> anyhow::Result<Channel> {
    client::connect(
        &global.snapshot,
        "snapshot",
        "--snapshot or RAMSNAP_SNAPSHOT",
        &global.security,
    )
    .await
}
