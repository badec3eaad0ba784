//! `ramsnap vm create|list|get|run|stop|remove|watch|console|export|import|exported`.
//!
//! Create, run, stop, remove, export and import start operations and wait
//! for them ([`super::wait`]); watch and console follow the VM until Ctrl-C.
//! Export, import and exported are oVirt's export domain: a VM with every
//! snapshot and its memory, moved between setups.
use super::render;
use super::wait::{wait, OperationArgs, Started};
use crate::args::{parse_size, DiskSpec};
use crate::error::with_request_id;
use crate::names::{Names, Ref};
use crate::output::{eprint_line, print_fields, print_json, print_line, Format};
use anyhow::bail;
use clap::{Args, Subcommand};
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::vm_service_client::VmServiceClient;
use serde_json::json;
use std::io::Write;
use std::time::Duration;
use tonic::transport::Channel;
use uuid::Uuid;

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Creates a VM and its disks (one image per disk).
    Create(CreateArgs),
    /// Lists the VMs, of every cluster or of one.
    List {
        /// Only the VMs of this cluster (name or id).
        #[arg(long, value_name = "CLUSTER")]
        cluster: Option<Ref>,
    },
    /// Shows one VM and its disks.
    Get {
        /// The VM: its name or id.
        #[arg(value_name = "VM")]
        id: Ref,
    },
    /// Runs a VM: it resumes from its active snapshot's memory when it has
    /// some (after a preview or commit with --restore-memory), else boots.
    /// Returns once the VM is up (or with --no-wait at once).
    Run {
        /// The VM: its name or id.
        #[arg(value_name = "VM")]
        id: Ref,
        /// The host to run on; by default the cluster's first host. (Not
        /// `--host`: that global flag is the host agent's address.)
        #[arg(long, value_name = "HOST")]
        on_host: Option<Ref>,
        /// Runs this time as stateless (Run Once): stopping it goes back to
        /// the state it ran from.
        #[arg(long)]
        stateless: bool,
        #[command(flatten)]
        op: OperationArgs,
    },
    /// Edits a VM: the options given. Memory, vcpus and boot images need
    /// the VM down, and drop the memory its active snapshot holds.
    Update(UpdateArgs),
    /// Suspends a running VM (hibernate): its memory is saved and the guest
    /// stops, SUSPENDED; `vm run` resumes it where it was, `vm stop`
    /// discards the saved state. Its disks cannot change meanwhile.
    Suspend {
        /// The VM: its name or id.
        #[arg(value_name = "VM")]
        id: Ref,
        #[command(flatten)]
        op: OperationArgs,
    },
    /// Stops a VM; a stateless VM goes back to the state it was run from;
    /// a suspended VM's saved state is discarded.
    Stop {
        /// The VM: its name or id.
        #[arg(value_name = "VM")]
        id: Ref,
        /// Asks the guest to shut down and waits up to SECS before powering
        /// it off; 0 (the default) powers it off at once.
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        timeout: u32,
        #[command(flatten)]
        op: OperationArgs,
    },
    /// Removes a VM that is down, with its snapshots, disks and memory volumes.
    Remove {
        /// The VM: its name or id.
        #[arg(value_name = "VM")]
        id: Ref,
        #[command(flatten)]
        op: OperationArgs,
    },
    /// Prints the VM's status, then each change with its time, until Ctrl-C
    /// or until the VM reaches --until.
    Watch {
        /// The VM: its name or id.
        #[arg(value_name = "VM")]
        id: Ref,
        /// Returns once the VM is in this status.
        #[arg(long, value_enum, value_name = "STATUS")]
        until: Option<VmStatusArg>,
    },
    /// Prints the guest's serial console.
    Console {
        /// The VM: its name or id.
        #[arg(value_name = "VM")]
        id: Ref,
        /// Keeps printing what the guest writes, until Ctrl-C.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Exports a VM that is down to an export domain: every snapshot's
    /// volumes with their memory, ids kept, and its OVF descriptor.
    Export {
        /// The VM: its name or id.
        #[arg(value_name = "VM")]
        id: Ref,
        /// The export domain: its name or id.
        #[arg(long, value_name = "DOMAIN")]
        domain: Ref,
        /// Exports only the active snapshot, with its memory: each disk's
        /// chain collapsed into one volume.
        #[arg(long)]
        collapse_snapshots: bool,
        /// Replaces an earlier export of this VM on the domain (deleted
        /// before the new one is written).
        #[arg(long)]
        force_override: bool,
        #[command(flatten)]
        op: OperationArgs,
    },
    /// Imports a VM from an export domain: every snapshot comes back with
    /// its memory, ids kept; each memory dump is checked against the export.
    Import(ImportArgs),
    /// Lists the VMs an export domain holds, from their OVF descriptors;
    /// SNAPSHOTS counts the active one too, WITH-MEMORY those holding memory.
    Exported {
        /// The export domain: its name or id.
        #[arg(long, value_name = "DOMAIN")]
        domain: Ref,
    },
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The VM's name, unique.
    #[arg(long)]
    name: String,
    /// The cluster the VM belongs to: its name or id.
    #[arg(long, value_name = "CLUSTER")]
    cluster: Ref,
    /// The guest's RAM: bytes, or with a unit: 256M, 4G.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: u64,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// A disk: the storage domain (name or id) and the virtual size, e.g.
    /// local-file:10G. Repeat for more disks; the first one's domain is the
    /// VM's. At least one.
    #[arg(long = "disk", value_name = "DOMAIN:SIZE", required = true)]
    disks: Vec<DiskSpec>,
    /// Runs stateless: every stop goes back to the state it ran from.
    #[arg(long)]
    stateless: bool,
    /// Direct boot: a kernel image in each host's boot-image directory.
    #[arg(long, value_name = "FILE")]
    kernel: Option<String>,
    /// The initrd for --kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<String>,
    /// The kernel command line for --kernel.
    #[arg(long, value_name = "TEXT", requires = "kernel")]
    cmdline: Option<String>,
    #[command(flatten)]
    op: OperationArgs,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// The VM: its name or id.
    #[arg(value_name = "VM")]
    id: Ref,
    /// A new name, unique.
    #[arg(long)]
    name: Option<String>,
    /// The guest's RAM: bytes, or with a unit: 256M, 4G.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: Option<u64>,
    #[arg(long)]
    vcpus: Option<u32>,
    /// Runs stateless from the next run on (true), or not (false).
    #[arg(long, value_name = "BOOL")]
    stateless: Option<bool>,
    /// Direct boot: a kernel image in each host's boot-image directory.
    #[arg(long, value_name = "FILE", conflicts_with = "no_direct_boot")]
    kernel: Option<String>,
    #[arg(long, value_name = "FILE", conflicts_with = "no_direct_boot")]
    initrd: Option<String>,
    #[arg(long, value_name = "TEXT", conflicts_with = "no_direct_boot")]
    cmdline: Option<String>,
    /// Removes direct boot (kernel, initrd and command line).
    #[arg(long)]
    no_direct_boot: bool,
    #[command(flatten)]
    op: OperationArgs,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The exported VM: its name or id (as `ramsnap vm exported` lists it).
    #[arg(value_name = "VM")]
    id: Ref,
    /// The export domain: its name or id.
    #[arg(long, value_name = "DOMAIN")]
    domain: Ref,
    /// The cluster the imported VM belongs to (name or id); below 3.3 the
    /// memory is not imported.
    #[arg(long, value_name = "CLUSTER")]
    cluster: Ref,
    /// The data domain (FILE or BLOCK) that receives the disks and memory:
    /// its name or id.
    #[arg(long, value_name = "DOMAIN")]
    target_domain: Ref,
    /// Imports as a clone: new ids, only the active snapshot, no memory: the
    /// VM boots.
    #[arg(long)]
    as_clone: bool,
    /// With --as-clone: a fork. The clone also gets the exported active
    /// snapshot's memory and its first run resumes from it; the guest
    /// wakes up with the exported VM's identity inside it.
    #[arg(long, requires = "as_clone")]
    keep_memory: bool,
    /// Imports only the active snapshot, with its memory: each disk's chain
    /// collapsed into one volume.
    #[arg(long)]
    collapse_snapshots: bool,
    /// The imported VM's name; by default the exported one.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    op: OperationArgs,
}

/// The statuses `vm watch --until` takes, spelled as JSON prints them.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmStatusArg {
    Down,
    PoweringUp,
    Up,
    Paused,
    RestoringState,
    SavingState,
    PoweringDown,
    ImageLocked,
    Suspended,
}

impl From<VmStatusArg> for pb::VmStatus {
    fn from(s: VmStatusArg) -> Self {
        match s {
            VmStatusArg::Down => pb::VmStatus::Down,
            VmStatusArg::PoweringUp => pb::VmStatus::PoweringUp,
            VmStatusArg::Up => pb::VmStatus::Up,
            VmStatusArg::Paused => pb::VmStatus::Paused,
            VmStatusArg::RestoringState => pb::VmStatus::RestoringState,
            VmStatusArg::SavingState => pb::VmStatus::SavingState,
            VmStatusArg::PoweringDown => pb::VmStatus::PoweringDown,
            VmStatusArg::ImageLocked => pb::VmStatus::ImageLocked,
            VmStatusArg::Suspended => pb::VmStatus::Suspended,
        }
    }
}

/// How much of the console one ReadConsole asks for.
const CONSOLE_CHUNK: u32 = 64 * 1024;
/// How often `vm console --follow` asks for more.
const CONSOLE_POLL: Duration = Duration::from_millis(500);

pub async fn run(channel: Channel, names: &Names<'_>, output: Format, cmd: VmCommand) -> anyhow::Result<()> {
    let mut client = VmServiceClient::new(channel.clone());
    match cmd {
        VmCommand::Create(args) => {
            let request_id = args.op.request.id();
            let cluster = names.cluster(&args.cluster).await?;
            let mut disks = Vec::with_capacity(args.disks.len());
            for d in &args.disks {
                disks.push(pb::DiskSpec {
                    domain_id: names.domain(&d.domain).await?.to_string(),
                    capacity_bytes: d.size,
                });
            }
            let name = args.name.clone();
            let resp = client
                .create_vm(pb::CreateVmRequest {
                    request_id: request_id.to_string(),
                    name: args.name,
                    cluster_id: cluster.to_string(),
                    memory_bytes: args.memory,
                    vcpus: args.vcpus,
                    stateless: args.stateless,
                    disks,
                    kernel: args.kernel.unwrap_or_default(),
                    initrd: args.initrd.unwrap_or_default(),
                    cmdline: args.cmdline.unwrap_or_default(),
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner();
            let started = Started::new(request_id, resp.operation, Vec::new());
            let Some(done) = wait(&channel, output, &args.op, started).await? else {
                return Ok(());
            };
            let vm_id = first_non_empty(&done.operation.result_vm_id, &done.operation.vm_id);
            let vm = get_vm(&mut client, &vm_id).await;
            done.print(
                output,
                format!("VM {vm_id} created ({name})"),
                json!({ "vm": vm.as_ref().map(render::vm_json) }),
            );
        }
        VmCommand::List { cluster } => {
            let cluster = match cluster {
                Some(c) => Some(names.cluster(&c).await?),
                None => None,
            };
            let cluster_id = cluster.map(|c| c.to_string()).unwrap_or_default();
            let vms: Vec<pb::Vm> = crate::client::all_pages(
                |page_token| {
                    let mut c = client.clone();
                    let req = pb::ListVmsRequest {
                        cluster_id: cluster_id.clone(),
                        page_size: 0,
                        page_token,
                    };
                    async move { c.list_vms(req).await }
                },
                |r: &pb::ListVmsResponse| &r.next_page_token,
            )
            .await?
            .into_iter()
            .flat_map(|r| r.vms)
            .collect();
            match output {
                Format::Table => render::vm_table(&vms).print(),
                Format::Json => print_json(&vms.iter().map(render::vm_json).collect()),
            }
        }
        VmCommand::Get { id } => {
            let id = names.vm(&id).await?;
            let vm = client
                .get_vm(pb::GetVmRequest {
                    vm_id: id.to_string(),
                })
                .await?
                .into_inner()
                .vm
                .unwrap_or_default();
            match output {
                Format::Table => print_fields(&render::vm_fields(&vm)),
                Format::Json => print_json(&render::vm_json(&vm)),
            }
        }
        VmCommand::Run {
            id,
            on_host,
            stateless,
            op,
        } => {
            let id = names.vm(&id).await?;
            let on_host = match on_host {
                Some(h) => Some(names.host(&h).await?),
                None => None,
            };
            let request_id = op.request.id();
            let resp = client
                .run_vm(pb::RunVmRequest {
                    request_id: request_id.to_string(),
                    vm_id: id.to_string(),
                    host_id: on_host.map(|h| h.to_string()).unwrap_or_default(),
                    run_stateless: stateless,
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner();
            // The operation ends once the guest starts; the VM is UP once
            // the guest shows signs of life (or is resumed from memory).
            // Commands typed next (a snapshot with memory) need it UP.
            let started = Started::new(request_id, resp.operation, Vec::new());
            then_show_vm(
                &channel,
                &mut client,
                output,
                &op,
                started,
                id,
                Until::Started,
                |vm| match vm {
                    Some(vm) if !vm.host_id.is_empty() => format!(
                        "VM {id} is {} on host {}",
                        render::vm_status(vm.status),
                        vm.host_id
                    ),
                    Some(vm) => format!("VM {id} is {}", render::vm_status(vm.status)),
                    None => format!("VM {id} started"),
                },
            )
            .await?;
        }
        VmCommand::Update(args) => {
            let id = names.vm(&args.id).await?;
            let request_id = args.op.request.id();
            let resp = client
                .update_vm(pb::UpdateVmRequest {
                    request_id: request_id.to_string(),
                    vm_id: id.to_string(),
                    name: args.name,
                    memory_bytes: args.memory,
                    vcpus: args.vcpus,
                    stateless: args.stateless,
                    kernel: if args.no_direct_boot {
                        Some(String::new())
                    } else {
                        args.kernel
                    },
                    initrd: args.initrd,
                    cmdline: args.cmdline,
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner();
            let started = Started::new(request_id, resp.operation, Vec::new());
            then_show_vm(
                &channel,
                &mut client,
                output,
                &args.op,
                started,
                id,
                Until::Done,
                |_| format!("VM {id} updated"),
            )
            .await?;
        }
        VmCommand::Suspend { id, op } => {
            let id = names.vm(&id).await?;
            let request_id = op.request.id();
            let resp = client
                .suspend_vm(pb::SuspendVmRequest {
                    request_id: request_id.to_string(),
                    vm_id: id.to_string(),
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner();
            let started = Started::new(request_id, resp.operation, Vec::new());
            then_show_vm(
                &channel,
                &mut client,
                output,
                &op,
                started,
                id,
                Until::Done,
                |vm| match vm {
                    Some(vm) => format!("VM {id} suspended ({})", render::vm_status(vm.status)),
                    None => format!("VM {id} suspended"),
                },
            )
            .await?;
        }
        VmCommand::Stop { id, timeout, op } => {
            let id = names.vm(&id).await?;
            let request_id = op.request.id();
            let resp = client
                .stop_vm(pb::StopVmRequest {
                    request_id: request_id.to_string(),
                    vm_id: id.to_string(),
                    graceful_timeout_seconds: timeout,
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner();
            let started = Started::new(request_id, resp.operation, Vec::new());
            then_show_vm(
                &channel,
                &mut client,
                output,
                &op,
                started,
                id,
                Until::Done,
                |vm| match vm {
                    Some(vm) => format!("VM {id} stopped ({})", render::vm_status(vm.status)),
                    None => format!("VM {id} stopped"),
                },
            )
            .await?;
        }
        VmCommand::Remove { id, op } => {
            let id = names.vm(&id).await?;
            let request_id = op.request.id();
            let resp = client
                .remove_vm(pb::RemoveVmRequest {
                    request_id: request_id.to_string(),
                    vm_id: id.to_string(),
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner();
            let started = Started::new(request_id, resp.operation, Vec::new());
            if let Some(done) = wait(&channel, output, &op, started).await? {
                done.print(output, format!("VM {id} removed"), json!({}));
            }
        }
        VmCommand::Export {
            id,
            domain,
            collapse_snapshots,
            force_override,
            op,
        } => {
            let id = names.vm(&id).await?;
            let domain = names.domain(&domain).await?;
            let request_id = op.request.id();
            let resp = client
                .export_vm(pb::ExportVmRequest {
                    request_id: request_id.to_string(),
                    vm_id: id.to_string(),
                    export_domain_id: domain.to_string(),
                    collapse_snapshots,
                    force_override,
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner();
            let started = Started::new(request_id, resp.operation, Vec::new());
            let Some(done) = wait(&channel, output, &op, started).await? else {
                return Ok(());
            };
            let exported = list_exported(&mut client, domain)
                .await
                .ok()
                .and_then(|r| r.vms.into_iter().find(|v| v.vm_id == id.to_string()));
            let summary = match &exported {
                Some(v) => format!(
                    "VM {id} ({}) exported to domain {domain}: {}",
                    v.name,
                    exported_contents(v)
                ),
                None => format!("VM {id} exported to domain {domain}"),
            };
            done.print(
                output,
                summary,
                json!({ "exported": exported.as_ref().map(render::exported_vm_json) }),
            );
        }
        VmCommand::Import(args) => {
            let request_id = args.op.request.id();
            let domain = names.domain(&args.domain).await?;
            let vm = names.exported_vm(domain, &args.id).await?;
            let cluster = names.cluster(&args.cluster).await?;
            let target_domain = names.domain(&args.target_domain).await?;
            let resp = client
                .import_vm(pb::ImportVmRequest {
                    request_id: request_id.to_string(),
                    export_domain_id: domain.to_string(),
                    vm_id: vm.to_string(),
                    cluster_id: cluster.to_string(),
                    target_domain_id: target_domain.to_string(),
                    as_clone: args.as_clone,
                    collapse_snapshots: args.collapse_snapshots,
                    name: args.name.unwrap_or_default(),
                    keep_memory: args.keep_memory,
                })
                .await
                .map_err(|s| with_request_id(s, request_id))?
                .into_inner();
            // The memory warning (--as-clone) comes first, before any progress.
            let started = Started::new(request_id, resp.operation, resp.warnings);
            let Some(done) = wait(&channel, output, &args.op, started).await? else {
                return Ok(());
            };
            let vm_id = first_non_empty(&done.operation.result_vm_id, &done.operation.vm_id);
            let vm = get_vm(&mut client, &vm_id).await;
            let summary = match &vm {
                Some(vm) => format!("VM {vm_id} ({}) imported from export domain {domain}", vm.name),
                None => format!("VM {vm_id} imported from export domain {domain}"),
            };
            done.print(output, summary, json!({ "vm": vm.as_ref().map(render::vm_json) }));
        }
        VmCommand::Exported { domain } => {
            let domain = names.domain(&domain).await?;
            let resp = list_exported(&mut client, domain).await?;
            for entry in &resp.unreadable {
                eprint_line(format!("warning: unreadable VM descriptor {entry}"));
            }
            for v in &resp.vms {
                for w in &v.warnings {
                    eprint_line(format!("warning: VM {} ({}): {w}", v.name, v.vm_id));
                }
            }
            match output {
                Format::Table => render::exported_vm_table(&resp.vms).print(),
                Format::Json => print_json(&resp.vms.iter().map(render::exported_vm_json).collect()),
            }
        }
        VmCommand::Watch { id, until } => watch(client, output, names.vm(&id).await?, until).await?,
        VmCommand::Console { id, follow } => console(client, output, names.vm(&id).await?, follow).await?,
    }
    Ok(())
}

fn first_non_empty(a: &str, b: &str) -> String {
    if a.is_empty() { b } else { a }.to_string()
}

/// The VM after an operation, for its result; `None` when it cannot be
/// read (removed meanwhile): the operation succeeded all the same.
async fn get_vm(client: &mut VmServiceClient<Channel>, id: &str) -> Option<pb::Vm> {
    client
        .get_vm(pb::GetVmRequest {
            vm_id: id.to_string(),
        })
        .await
        .ok()?
        .into_inner()
        .vm
}

async fn list_exported(
    client: &mut VmServiceClient<Channel>,
    domain: Uuid,
) -> Result<pb::ListExportedVmsResponse, tonic::Status> {
    let pages = crate::client::all_pages(
        |page_token| {
            let mut c = client.clone();
            let req = pb::ListExportedVmsRequest {
                export_domain_id: domain.to_string(),
                page_size: 0,
                page_token,
            };
            async move { c.list_exported_vms(req).await }
        },
        |r: &pb::ListExportedVmsResponse| &r.next_page_token,
    )
    .await?;
    let mut all = pb::ListExportedVmsResponse::default();
    for p in pages {
        all.vms.extend(p.vms);
        all.unreadable.extend(p.unreadable);
    }
    Ok(all)
}

/// What an export holds, for its summary: `3 snapshots (2 with memory),
/// 2 disks`, and whether they were collapsed.
fn exported_contents(v: &pb::ExportedVm) -> String {
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let mut text = format!(
        "{} ({} with memory), {}",
        plural(v.snapshots.len(), "snapshot"),
        render::exported_with_memory(v),
        plural(v.disk_count as usize, "disk")
    );
    if v.collapsed {
        text.push_str(", collapsed");
    }
    text
}

/// How long [`then_show_vm`] follows the VM after its operation ends.
enum Until {
    /// The operation's end.
    Done,
    /// The VM is up (or paused) too; an error if it goes down instead.
    Started,
}

/// Waits for the operation a VM call started (as `op` asks; nothing more
/// when it is not waited for), then prints `summary` of the VM as it is
/// then, with the VM itself in JSON.
#[allow(clippy::too_many_arguments)]
async fn then_show_vm(
    channel: &Channel,
    client: &mut VmServiceClient<Channel>,
    output: Format,
    op: &OperationArgs,
    started: Started,
    id: Uuid,
    until: Until,
    summary: impl FnOnce(Option<&pb::Vm>) -> String,
) -> anyhow::Result<()> {
    let Some(done) = wait(channel, output, op, started).await? else {
        return Ok(());
    };
    let vm = match until {
        Until::Started => until_started(client, id).await?,
        Until::Done => None,
    };
    let vm = match vm {
        Some(vm) => Some(vm),
        None => get_vm(client, &id.to_string()).await,
    };
    done.print(
        output,
        summary(vm.as_ref()),
        json!({ "vm": vm.as_ref().map(render::vm_json) }),
    );
    Ok(())
}

/// Whether `vm watch` is done with the VM in `status`.
/// Follows a VM that is starting (POWERING_UP, RESTORING_STATE) until it
/// is up or paused; an error when it goes down instead. None when the
/// stream ends first.
async fn until_started(client: &mut VmServiceClient<Channel>, id: Uuid) -> anyhow::Result<Option<pb::Vm>> {
    let vm_id = id.to_string();
    let mut stream = client
        .watch_vm(pb::WatchVmRequest { vm_id: vm_id.clone() })
        .await?
        .into_inner();
    while let Some(event) = stream.message().await? {
        let status = pb::VmStatus::try_from(event.status).unwrap_or_default();
        match status {
            pb::VmStatus::PoweringUp | pb::VmStatus::RestoringState | pb::VmStatus::Unspecified => continue,
            pb::VmStatus::Down => {
                bail!("VM {vm_id} went down while it started: see `ramsnap vm console {vm_id}`")
            }
            _ => return Ok(get_vm(client, &vm_id).await),
        }
    }
    Ok(None)
}

fn reached(until: Option<VmStatusArg>, status: i32) -> bool {
    until.is_some_and(|u| pb::VmStatus::from(u) as i32 == status)
}

async fn watch(
    mut client: VmServiceClient<Channel>,
    output: Format,
    id: Uuid,
    until: Option<VmStatusArg>,
) -> anyhow::Result<()> {
    let vm_id = id.to_string();
    let mut stream = client
        .watch_vm(pb::WatchVmRequest { vm_id: vm_id.clone() })
        .await?
        .into_inner();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let event = tokio::select! {
            e = stream.message() => e?,
            _ = &mut interrupted => std::process::exit(130),
        };
        let Some(event) = event else {
            bail!("the coordinator stopped reporting the status of VM {vm_id}");
        };
        match output {
            Format::Table => print_line(render::vm_event_line(&event)),
            // One object per line, as events come.
            Format::Json => println!("{}", render::vm_event_json(&vm_id, &event)),
        }
        if reached(until, event.status) {
            return Ok(());
        }
    }
}

async fn console(
    mut client: VmServiceClient<Channel>,
    output: Format,
    id: Uuid,
    follow: bool,
) -> anyhow::Result<()> {
    let vm_id = id.to_string();
    let mut offset = 0u64;
    let mut collected = Vec::new();
    let mut stdout = std::io::stdout();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let read = client.read_console(pb::ReadConsoleRequest {
            vm_id: vm_id.clone(),
            offset,
            max_bytes: CONSOLE_CHUNK,
        });
        let chunk = tokio::select! {
            r = read => r?.into_inner(),
            _ = &mut interrupted => std::process::exit(130),
        };
        let caught_up = chunk.data.is_empty() && chunk.next_offset == offset;
        if !chunk.data.is_empty() {
            match (output, follow) {
                (Format::Table, _) => {
                    stdout.write_all(&chunk.data)?;
                    stdout.flush()?;
                }
                (Format::Json, true) => println!(
                    "{}",
                    json!({
                        "vm_id": vm_id,
                        "offset": offset,
                        "next_offset": chunk.next_offset,
                        "data": String::from_utf8_lossy(&chunk.data),
                    })
                ),
                (Format::Json, false) => collected.extend_from_slice(&chunk.data),
            }
        }
        offset = chunk.next_offset;
        if caught_up {
            if !follow {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(CONSOLE_POLL) => {}
                _ = &mut interrupted => std::process::exit(130),
            }
        }
    }
    if output == Format::Json {
        print_json(&json!({
            "vm_id": vm_id,
            "data": String::from_utf8_lossy(&collected),
            "next_offset": offset,
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, ValueEnum};

    /// `--until` takes the words `-o json` prints for a status.
    #[test]
    fn status_flags_match_json_labels() {
        for s in VmStatusArg::value_variants() {
            let name = s.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(render::vm_status(pb::VmStatus::from(*s) as i32), name);
        }
        assert!(reached(Some(VmStatusArg::Up), pb::VmStatus::Up as i32));
        assert!(!reached(
            Some(VmStatusArg::Up),
            pb::VmStatus::RestoringState as i32
        ));
        assert!(!reached(None, pb::VmStatus::Up as i32));
    }

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        vm: VmCommand,
    }

    fn parse(args: &[&str]) -> Result<VmCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("vm").chain(args.iter().copied())).map(|c| c.vm)
    }

    #[test]
    fn create_takes_disks_sizes_and_boot_images() {
        let (d1, d2, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let cmd = parse(&[
            "create",
            "--name",
            "web",
            "--cluster",
            &c.to_string(),
            "--memory",
            "256M",
            "--disk",
            &format!("{d1}:1G"),
            "--disk",
            &format!("{d2}:512M"),
            "--stateless",
            "--kernel",
            "vmlinuz",
            "--cmdline",
            "console=ttyS0",
        ])
        .unwrap();
        let VmCommand::Create(args) = cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(args.memory, 256 << 20);
        assert_eq!(args.vcpus, 1);
        assert_eq!(
            args.disks,
            [
                DiskSpec {
                    domain: Ref::Id(d1),
                    size: 1 << 30
                },
                DiskSpec {
                    domain: Ref::Id(d2),
                    size: 512 << 20
                }
            ]
        );
        assert!(args.stateless && !args.op.no_wait);
        assert_eq!(args.kernel.as_deref(), Some("vmlinuz"));
        assert_eq!(args.initrd, None);
    }

    #[test]
    fn create_rejects_bad_input() {
        let (d, c) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
        let base = ["create", "--name", "web", "--cluster", &c, "--memory", "256M"];
        let with = |extra: &[&str]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            parse(&all).unwrap_err().to_string()
        };
        // A disk is required, and must be DOMAIN:SIZE.
        assert!(with(&[]).contains("--disk"));
        assert!(with(&["--disk", "10G"]).contains("DOMAIN:SIZE"));
        assert!(with(&["--disk", &format!("{d}:10X")]).contains("unknown unit"));
        // --initrd and --cmdline go with --kernel.
        assert!(with(&["--disk", &format!("{d}:1G"), "--initrd", "initrd.img"]).contains("--kernel"));
        assert!(parse(&[
            "create",
            "--name",
            "w",
            "--cluster",
            &c,
            "--disk",
            &format!("{d}:1G")
        ])
        .is_err());
    }

    #[test]
    fn run_stop_and_watch_flags() {
        let id = Uuid::new_v4();
        let host = Uuid::new_v4();
        let cmd = parse(&[
            "run",
            &id.to_string(),
            "--on-host",
            &host.to_string(),
            "--stateless",
            "--no-wait",
        ])
        .unwrap();
        let VmCommand::Run {
            on_host,
            stateless,
            op,
            ..
        } = cmd
        else {
            panic!("{cmd:?}")
        };
        assert_eq!(on_host, Some(Ref::Id(host)));
        assert!(stateless && op.no_wait);
        let VmCommand::Stop { timeout, .. } = parse(&["stop", &id.to_string()]).unwrap() else {
            panic!()
        };
        assert_eq!(timeout, 0);
        let VmCommand::Watch { until, .. } = parse(&["watch", &id.to_string(), "--until", "up"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(until, Some(VmStatusArg::Up));
        assert!(parse(&["watch", &id.to_string(), "--until", "running"]).is_err());
    }

    #[test]
    fn export_flags() {
        let (id, dom) = (Uuid::new_v4(), Uuid::new_v4());
        let cmd = parse(&["export", &id.to_string(), "--domain", &dom.to_string()]).unwrap();
        let VmCommand::Export {
            id: vm,
            domain,
            collapse_snapshots,
            force_override,
            op,
        } = cmd
        else {
            panic!("{cmd:?}")
        };
        assert_eq!((vm, domain), (Ref::Id(id), Ref::Id(dom)));
        assert!(!collapse_snapshots && !force_override && !op.no_wait);
        let cmd = parse(&[
            "export",
            &id.to_string(),
            "--domain",
            &dom.to_string(),
            "--collapse-snapshots",
            "--force-override",
            "--no-wait",
        ])
        .unwrap();
        let VmCommand::Export {
            collapse_snapshots,
            force_override,
            op,
            ..
        } = cmd
        else {
            panic!("{cmd:?}")
        };
        assert!(collapse_snapshots && force_override && op.no_wait);
        // The export domain is required; a name is taken for a lookup.
        let err = parse(&["export", &id.to_string()]).unwrap_err().to_string();
        assert!(err.contains("--domain"), "{err}");
        let VmCommand::Export { domain, .. } = parse(&["export", "web", "--domain", "exports"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(domain, Ref::Name("exports".into()));
        assert!(parse(&["export", "web", "--domain", ""]).is_err());
    }

    #[test]
    fn import_flags() {
        let (id, dom, c, target) = (
            Uuid::new_v4().to_string(),
            Uuid::new_v4().to_string(),
            Uuid::new_v4().to_string(),
            Uuid::new_v4().to_string(),
        );
        let base = [
            "import",
            id.as_str(),
            "--domain",
            &dom,
            "--cluster",
            &c,
            "--target-domain",
            &target,
        ];
        let cmd = parse(&base).unwrap();
        let VmCommand::Import(args) = cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(args.id.to_string(), id);
        assert_eq!(args.domain.to_string(), dom);
        assert_eq!(args.cluster.to_string(), c);
        assert_eq!(args.target_domain.to_string(), target);
        assert!(!args.as_clone && !args.collapse_snapshots && args.name.is_none());
        let mut all = base.to_vec();
        all.extend_from_slice(&["--as-clone", "--collapse-snapshots", "--name", "web-copy"]);
        let cmd = parse(&all).unwrap();
        let VmCommand::Import(args) = cmd else {
            panic!("{cmd:?}")
        };
        assert!(args.as_clone && args.collapse_snapshots);
        assert_eq!(args.name.as_deref(), Some("web-copy"));
        // The export domain, the cluster and the target domain are required.
        for missing in ["--domain", "--cluster", "--target-domain"] {
            let at = base.iter().position(|a| *a == missing).unwrap();
            let mut without = base.to_vec();
            without.drain(at..at + 2);
            let err = parse(&without).unwrap_err().to_string();
            assert!(err.contains(missing), "{missing}: {err}");
        }
        assert!(parse(&[
            "import",
            "--domain",
            &dom,
            "--cluster",
            &c,
            "--target-domain",
            &target
        ])
        .is_err());
    }

    #[test]
    fn exported_flags() {
        let dom = Uuid::new_v4();
        let VmCommand::Exported { domain } = parse(&["exported", "--domain", &dom.to_string()]).unwrap()
        else {
            panic!()
        };
        assert_eq!(domain, Ref::Id(dom));
        assert!(parse(&["exported"]).is_err());
    }

    #[test]
    fn export_summaries() {
        let snap = |memory: bool| pb::ExportedSnapshot {
            has_memory: memory,
            ..Default::default()
        };
        let mut v = pb::ExportedVm {
            disk_count: 2,
            snapshots: vec![snap(true), snap(false), snap(true)],
            ..Default::default()
        };
        assert_eq!(exported_contents(&v), "3 snapshots (2 with memory), 2 disks");
        v.disk_count = 1;
        v.snapshots = vec![snap(true)];
        v.collapsed = true;
        assert_eq!(
            exported_contents(&v),
            "1 snapshot (1 with memory), 1 disk, collapsed"
        );
    }
}
