//! `ramsnap snapshot list|get|create|remove|preview|undo|commit|clone`: the
//! Snapshots tab of oVirt 3.3, with its dialogs' choices as flags (save
//! memory, restore memory) and its Memory column.
use super::render;
use super::wait::{wait, Done, OperationArgs, Started};
use crate::error::with_request_id;
use crate::names::{Names, Ref};
use crate::output::{print_fields, print_json, Format};
use clap::Subcommand;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::snapshot_service_client::SnapshotServiceClient;
use ramsnap_proto::snapshot::v1::vm_service_client::VmServiceClient;
use serde_json::json;
use tonic::transport::Channel;
use uuid::Uuid;

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Lists a VM's snapshots, oldest first, the active one last; MEMORY
    /// says whether a snapshot holds the VM's memory.
    List {
        /// The VM: its name or id.
        #[arg(value_name = "VM")]
        vm: Ref,
    },
    /// Shows one snapshot, with its disk and memory volumes.
    Get {
        /// The snapshot's id.
        #[arg(value_name = "SNAPSHOT")]
        id: Uuid,
    },
    /// Takes a snapshot of a VM's disks, and with --memory of its RAM.
    Create {
        /// The VM: its name or id.
        #[arg(value_name = "VM")]
        vm: Ref,
        /// Free text shown in the list.
        #[arg(long)]
        description: Option<String>,
        /// Saves the memory too (Save Memory): the VM must be up, in a
        /// cluster at 3.3 or above.
        #[arg(long)]
        memory: bool,
        /// Dumps the memory while the guest runs (a short pause at the end)
        /// instead of pausing it for the whole dump.
        #[arg(long, requires = "memory")]
        live: bool,
        #[command(flatten)]
        op: OperationArgs,
    },
    /// Removes a snapshot of a VM that is down: its disk volumes are merged,
    /// its memory volumes go unless another snapshot uses them.
    Remove {
        /// The VM: its name or id.
        #[arg(value_name = "VM")]
        vm: Ref,
        /// The snapshot: its id, its description, or a unique prefix of it.
        // Not the id `snapshot`: that is the global --snapshot's.
        #[arg(id = "snapshot_id", value_name = "SNAPSHOT")]
        snapshot: Ref,
        #[command(flatten)]
        op: OperationArgs,
    },
    /// Sets a VM that is down to preview a snapshot; undo or commit it then.
    Preview {
        /// The VM: its name or id.
        #[arg(value_name = "VM")]
        vm: Ref,
        /// The snapshot: its id, its description, or a unique prefix of it.
        // Not the id `snapshot`: that is the global --snapshot's.
        #[arg(id = "snapshot_id", value_name = "SNAPSHOT")]
        snapshot: Ref,
        /// Restore Memory: the next run resumes from the snapshot's memory
        /// instead of booting (a snapshot with memory, cluster 3.3+).
        #[arg(long)]
        restore_memory: bool,
        #[command(flatten)]
        op: OperationArgs,
    },
    /// Leaves the preview: back to the state before it.
    Undo {
        /// The VM: its name or id.
        #[arg(value_name = "VM")]
        vm: Ref,
        #[command(flatten)]
        op: OperationArgs,
    },
    /// Keeps the previewed state; the snapshots newer than it go, with their
    /// memory.
    Commit {
        /// The VM: its name or id.
        #[arg(value_name = "VM")]
        vm: Ref,
        #[command(flatten)]
        op: OperationArgs,
    },
    /// Creates a new VM whose disks are copies of a snapshot's. The memory
    /// is not copied.
    Clone {
        /// The VM: its name or id.
        #[arg(value_name = "VM")]
        vm: Ref,
        /// The snapshot: its id, its description, or a unique prefix of it.
        // Not the id `snapshot`: that is the global --snapshot's.
        #[arg(id = "snapshot_id", value_name = "SNAPSHOT")]
        snapshot: Ref,
        /// The new VM's name.
        #[arg(long)]
        name: String,
        /// Where the copies go (a domain's name or id); by default each
        /// disk's own domain.
        #[arg(long, value_name = "DOMAIN")]
        target_domain: Option<Ref>,
        /// Fork: the new VM also gets the snapshot's memory, and its first
        /// run resumes from it while the source VM goes on. The guest wakes
        /// up with the source's identity inside it.
        #[arg(long)]
        keep_memory: bool,
        #[command(flatten)]
        op: OperationArgs,
    },
}

/// The memory mode a create asks for: live only with --live; paused (the
/// default) when saving memory; unset for a disk-only snapshot.
fn memory_mode(memory: bool, live: bool) -> pb::MemoryMode {
    match (memory, live) {
        (true, true) => pb::MemoryMode::Live,
        (true, false) => pb::MemoryMode::Paused,
        (false, _) => pb::MemoryMode::Unspecified,
    }
}

/// How the VM's next run starts, from its active snapshot's memory.
fn next_run(active: Option<&pb::Snapshot>) -> &'static str {
    match active {
        Some(a) if a.has_memory => "its next run resumes from the saved memory",
        Some(_) => "its next run boots",
        None => "",
    }
}

pub async fn run(
    channel: Channel,
    names: &Names<'_>,
    output: Format,
    cmd: SnapshotCommand,
) -> anyhow::Result<()> {
    let mut client = SnapshotServiceClient::new(channel.clone());
    match cmd {
        SnapshotCommand::List { vm } => {
            let vm = names.vm(&vm).await?;
            let snapshots = list(&mut client, vm).await?;
            match output {
                Format::Table => render::snapshot_table(&snapshots).print(),
                Format::Json => print_json(&snapshots.iter().map(render::snapshot_json).collect()),
            }
        }
        SnapshotCommand::Get { id } => {
            let snapshot = client
                .get_snapshot(pb::GetSnapshotRequest {
                    snapshot_id: id.to_string(),
                })
                .await?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            match output {
                Format::Table => print_fields(&render::snapshot_fields(&snapshot)),
                Format::Json => print_json(&render::snapshot_json(&snapshot)),
            }
        }
        SnapshotCommand::Create {
            vm,
            description,
            memory,
            live,
            op,
        } => {
            let vm = names.vm(&vm).await?;
            let request_id = op.request.id();
            let resp = client
                .create_snapshot(pb::CreateSnapshotRequest {
                    request_id: request_id.to_string(),
                    vm_id: vm.to_string(),
                    description: description.unwrap_or_default(),
                    save_memory: memory,
                    memory_mode: memory_mode(memory, live) as i32,
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner();
            let started = Started::new(request_id, resp.operation, Vec::new());
            let Some(done) = wait(&channel, output, &op, started).await? else {
                return Ok(());
            };
            let id = done.operation.snapshot_id.clone();
            let snapshot = get(&mut client, &id).await;
            let summary = match &snapshot {
                Some(s) => format!("snapshot {id} created (memory: {})", render::yes_no(s.has_memory)),
                None => format!("snapshot {id} created"),
            };
            done.print(
                output,
                summary,
                json!({ "snapshot": snapshot.as_ref().map(render::snapshot_json) }),
            );
        }
        SnapshotCommand::Remove { vm, snapshot, op } => {
            let vm = names.vm(&vm).await?;
            let snapshot = names.snapshot(vm, &snapshot).await?;
            let request_id = op.request.id();
            let resp = client
                .remove_snapshot(pb::RemoveSnapshotRequest {
                    request_id: request_id.to_string(),
                    vm_id: vm.to_string(),
                    snapshot_id: snapshot.to_string(),
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner();
            let started = Started::new(request_id, resp.operation, Vec::new());
            if let Some(done) = wait(&channel, output, &op, started).await? {
                done.print(output, format!("snapshot {snapshot} removed"), json!({}));
            }
        }
        SnapshotCommand::Preview {
            vm,
            snapshot,
            restore_memory,
            op,
        } => {
            let vm = names.vm(&vm).await?;
            let snapshot = names.snapshot(vm, &snapshot).await?;
            let request_id = op.request.id();
            let resp = client
                .preview_snapshot(pb::PreviewSnapshotRequest {
                    request_id: request_id.to_string(),
                    vm_id: vm.to_string(),
                    snapshot_id: snapshot.to_string(),
                    restore_memory,
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner();
            let started = Started::new(request_id, resp.operation, resp.warnings);
            if let Some(done) = wait(&channel, output, &op, started).await? {
                let what = format!("VM {vm} is previewing snapshot {snapshot}");
                finish_with_active(&mut client, output, vm, &done, what).await;
            }
        }
        SnapshotCommand::Undo { vm, op } => {
            let vm = names.vm(&vm).await?;
            let request_id = op.request.id();
            let resp = client
                .undo_preview(pb::UndoPreviewRequest {
                    request_id: request_id.to_string(),
                    vm_id: vm.to_string(),
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner();
            let started = Started::new(request_id, resp.operation, Vec::new());
            if let Some(done) = wait(&channel, output, &op, started).await? {
                let what = format!("VM {vm} is back to its state before the preview");
                finish_with_active(&mut client, output, vm, &done, what).await;
            }
        }
        SnapshotCommand::Commit { vm, op } => {
            let vm = names.vm(&vm).await?;
            let request_id = op.request.id();
            let resp = client
                .commit_snapshot(pb::CommitSnapshotRequest {
                    request_id: request_id.to_string(),
                    vm_id: vm.to_string(),
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner();
            let started = Started::new(request_id, resp.operation, Vec::new());
            if let Some(done) = wait(&channel, output, &op, started).await? {
                let what = match done.operation.snapshot_id.as_str() {
                    "" => format!("VM {vm} committed to the previewed snapshot"),
                    id => format!("VM {vm} committed to snapshot {id}"),
                };
                finish_with_active(&mut client, output, vm, &done, what).await;
            }
        }
        SnapshotCommand::Clone {
            vm,
            snapshot,
            name,
            target_domain,
            keep_memory,
            op,
        } => {
            let vm = names.vm(&vm).await?;
            let snapshot = names.snapshot(vm, &snapshot).await?;
            let target_domain = match target_domain {
                Some(d) => Some(names.domain(&d).await?),
                None => None,
            };
            let request_id = op.request.id();
            let resp = client
                .clone_vm_from_snapshot(pb::CloneVmFromSnapshotRequest {
                    request_id: request_id.to_string(),
                    vm_id: vm.to_string(),
                    snapshot_id: snapshot.to_string(),
                    name: name.clone(),
                    target_domain_id: target_domain.map(|d| d.to_string()).unwrap_or_default(),
                    keep_memory,
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner();
            // The memory warning comes first, before any progress.
            let started = Started::new(request_id, resp.operation, resp.warnings);
            let Some(done) = wait(&channel, output, &op, started).await? else {
                return Ok(());
            };
            let new_vm = done.operation.result_vm_id.clone();
            let vm_json = VmServiceClient::new(channel.clone())
                .get_vm(pb::GetVmRequest {
                    vm_id: new_vm.clone(),
                })
                .await
                .ok()
                .and_then(|r| r.into_inner().vm)
                .map(|v| render::vm_json(&v));
            done.print(
                output,
                format!("VM {new_vm} ({name}) created from snapshot {snapshot}"),
                json!({ "vm": vm_json }),
            );
        }
    }
    Ok(())
}

async fn list(client: &mut SnapshotServiceClient<Channel>, vm: Uuid) -> anyhow::Result<Vec<pb::Snapshot>> {
    let pages = crate::client::all_pages(
        |page_token| {
            let mut c = client.clone();
            let req = pb::ListSnapshotsRequest {
                vm_id: vm.to_string(),
                page_size: 0,
                page_token,
            };
            async move { c.list_snapshots(req).await }
        },
        |r: &pb::ListSnapshotsResponse| &r.next_page_token,
    )
    .await?;
    Ok(pages.into_iter().flat_map(|r| r.snapshots).collect())
}

/// A snapshot after an operation made it; `None` when it cannot be read
/// (removed meanwhile): the operation succeeded all the same.
async fn get(client: &mut SnapshotServiceClient<Channel>, id: &str) -> Option<pb::Snapshot> {
    client
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: id.to_string(),
        })
        .await
        .ok()?
        .into_inner()
        .snapshot
}

/// Ends a preview, undo or commit: what happened, and how the VM's next run
/// starts (from its active snapshot's memory, or a boot).
async fn finish_with_active(
    client: &mut SnapshotServiceClient<Channel>,
    output: Format,
    vm: Uuid,
    done: &Done,
    what: String,
) {
    let snapshots = list(client, vm).await.unwrap_or_default();
    let active = snapshots
        .iter()
        .find(|s| s.r#type == pb::SnapshotType::Active as i32);
    let summary = match next_run(active) {
        "" => what,
        next => format!("{what}; {next}"),
    };
    done.print(
        output,
        summary,
        json!({ "active_snapshot": active.map(render::snapshot_json) }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        snapshot: SnapshotCommand,
    }

    fn parse(args: &[&str]) -> Result<SnapshotCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("snapshot").chain(args.iter().copied())).map(|c| c.snapshot)
    }

    #[test]
    fn memory_modes() {
        assert_eq!(memory_mode(true, false), pb::MemoryMode::Paused);
        assert_eq!(memory_mode(true, true), pb::MemoryMode::Live);
        assert_eq!(memory_mode(false, false), pb::MemoryMode::Unspecified);
    }

    #[test]
    fn create_flags() {
        let vm = Uuid::new_v4().to_string();
        let SnapshotCommand::Create {
            memory,
            live,
            description,
            ..
        } = parse(&[
            "create",
            &vm,
            "--memory",
            "--live",
            "--description",
            "before upgrade",
        ])
        .unwrap()
        else {
            panic!()
        };
        assert!(memory && live);
        assert_eq!(description.as_deref(), Some("before upgrade"));
        // --live is a memory mode: it needs --memory.
        let err = parse(&["create", &vm, "--live"]).unwrap_err().to_string();
        assert!(err.contains("--memory"), "{err}");
        let SnapshotCommand::Create { memory, .. } = parse(&["create", &vm]).unwrap() else {
            panic!()
        };
        assert!(!memory);
    }

    #[test]
    fn preview_and_clone_flags() {
        let (vm, snap, dom) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let SnapshotCommand::Preview { restore_memory, .. } =
            parse(&["preview", &vm.to_string(), &snap.to_string(), "--restore-memory"]).unwrap()
        else {
            panic!()
        };
        assert!(restore_memory);
        let SnapshotCommand::Clone {
            name, target_domain, ..
        } = parse(&[
            "clone",
            &vm.to_string(),
            &snap.to_string(),
            "--name",
            "copy",
            "--target-domain",
            &dom.to_string(),
        ])
        .unwrap()
        else {
            panic!()
        };
        assert_eq!((name.as_str(), target_domain), ("copy", Some(Ref::Id(dom))));
        assert!(parse(&["clone", &vm.to_string(), &snap.to_string()]).is_err());
        assert!(parse(&["remove", &vm.to_string()]).is_err());
        // A VM and a snapshot by name and description.
        let SnapshotCommand::Preview { vm, snapshot, .. } =
            parse(&["preview", "web", "before upgrade"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(vm, Ref::Name("web".into()));
        assert_eq!(snapshot, Ref::Name("before upgrade".into()));
        assert!(parse(&["list", ""]).is_err());
    }

    #[test]
    fn next_runs() {
        let with = pb::Snapshot {
            has_memory: true,
            ..Default::default()
        };
        assert_eq!(
            next_run(Some(&with)),
            "its next run resumes from the saved memory"
        );
        assert_eq!(next_run(Some(&pb::Snapshot::default())), "its next run boots");
        assert_eq!(next_run(None), "");
    }
}
