//! The host and storage agents SIGKILLed at every node of every saga that
//! reaches them, with the real guest under real libvirt/QEMU, real LVM,
//! real SQLite, over real gRPC (issue 9; the memory snapshot's own nodes
//! are in `crash_guest.rs`).
//!
//! Each cycle: the coordinator is restarted with a `hold` failpoint at one
//! node; the operation is sent; while its saga stands at that node both
//! agents are killed, the node is let go against nothing for two seconds
//! (it gets no answer, so it must ask again and never unwind), and the
//! agents start again. Then the operation must SUCCEED (a crash is not a
//! failure) and everything must agree: the coordinator's status, libvirt's
//! domain, the disks the guest writes to, and the storage (every volume a
//! snapshot names exists, nothing is left over). Memories taken before the
//! faults are restored at the end of each test: the guest resumes instead
//! of booting.
use ramsnap_e2e::cluster::{Cluster, Db, DomainKind, Run, Taken, VmStatus, MIB};
use ramsnap_e2e::faults::{assert_down_agrees, assert_running_agrees, AgentKiller};
use ramsnap_e2e::guest::CMDLINE;
use ramsnap_proto::snapshot::v1 as pb;
use uuid::Uuid;

/// Every node of each saga, in order (see `crates/ramsnap-snapshot/src/sagas`).
const RUN: &[&str] = &[
    "lock_vm",
    "restore_stateless",
    "stateless_overlays",
    "stateless_begin",
    "run_on_host",
    "started",
    "unlock_vm",
];
const STOP: &[&str] = &[
    "lock_vm",
    "stop_on_host",
    "stopped",
    "restore_stateless",
    "unlock_vm",
];
const PREVIEW: &[&str] = &[
    "lock_vm",
    "ids",
    "image_locked",
    "overlays",
    "preview_begin",
    "image_unlocked",
    "unlock_vm",
];
const UNDO: &[&str] = &[
    "lock_vm",
    "image_locked",
    "plan",
    "preview_undo",
    "delete_preview_volumes",
    "image_unlocked",
    "unlock_vm",
];
const COMMIT: &[&str] = &[
    "lock_vm",
    "image_locked",
    "plan",
    "preview_commit",
    "delete_removed_volumes",
    "image_unlocked",
    "unlock_vm",
];
const REMOVE_SNAPSHOT: &[&str] = &[
    "lock_vm",
    "image_locked",
    "lock_snapshot",
    "plan",
    "merge_volumes",
    "rebind_memory",
    "remove_row",
    "image_unlocked",
    "unlock_vm",
];
const EXPORT: &[&str] = &[
    "lock_vm",
    "plan",
    "clear_previous",
    "copy_disks",
    "copy_memories",
    "write_ovf",
    "unlock_vm",
];
const IMPORT: &[&str] = &[
    "plan",
    "reserve_vm",
    "copy_disks",
    "copy_memories",
    "record_vm",
    "unlock_vm",
];
const REMOVE_VM: &[&str] = &[
    "lock_vm",
    "delete_disks",
    "delete_memory",
    "delete_vm",
    "forget_on_hosts",
];
const CREATE_VM: &[&str] = &["ids", "base_volumes", "record_vm"];
const CLONE: &[&str] = &["lock_vm", "ids", "copies", "memory", "record_vm", "unlock_vm"];

/// The operation of a mutating call's response; fails the test when the
/// call failed.
fn operation(c: &Cluster, what: &str, r: Result<Option<pb::Operation>, tonic::Status>) -> pb::Operation {
    match r {
        Ok(Some(op)) => op,
        Ok(None) => c.fail(&format!("{what}: the response carries no operation")),
        Err(s) => c.fail(&format!("{what}: {s}")),
    }
}

fn rid() -> String {
    Uuid::new_v4().to_string()
}

async fn run_call(c: &Cluster, vm: &str, what: &str) -> pb::Operation {
    let r = c
        .vms()
        .run_vm(pb::RunVmRequest {
            request_id: rid(),
            vm_id: vm.into(),
            host_id: String::new(),
            run_stateless: false,
        })
        .await;
    operation(c, what, r.map(|r| r.into_inner().operation))
}

async fn stop_call(c: &Cluster, vm: &str, what: &str) -> pb::Operation {
    let r = c
        .vms()
        .stop_vm(pb::StopVmRequest {
            request_id: rid(),
            vm_id: vm.into(),
            graceful_timeout_seconds: 0,
        })
        .await;
    operation(c, what, r.map(|r| r.into_inner().operation))
}

async fn preview_call(
    c: &Cluster,
    vm: &str,
    snapshot: &str,
    restore_memory: bool,
    what: &str,
) -> pb::Operation {
    let r = c
        .snapshots_api()
        .preview_snapshot(pb::PreviewSnapshotRequest {
            request_id: rid(),
            vm_id: vm.into(),
            snapshot_id: snapshot.into(),
            restore_memory,
        })
        .await;
    operation(c, what, r.map(|r| r.into_inner().operation))
}

async fn undo_call(c: &Cluster, vm: &str, what: &str) -> pb::Operation {
    let r = c
        .snapshots_api()
        .undo_preview(pb::UndoPreviewRequest {
            request_id: rid(),
            vm_id: vm.into(),
        })
        .await;
    operation(c, what, r.map(|r| r.into_inner().operation))
}

async fn commit_call(c: &Cluster, vm: &str, what: &str) -> pb::Operation {
    let r = c
        .snapshots_api()
        .commit_snapshot(pb::CommitSnapshotRequest {
            request_id: rid(),
            vm_id: vm.into(),
        })
        .await;
    operation(c, what, r.map(|r| r.into_inner().operation))
}

async fn remove_snapshot_call(c: &Cluster, vm: &str, snapshot: &str, what: &str) -> pb::Operation {
    let r = c
        .snapshots_api()
        .remove_snapshot(pb::RemoveSnapshotRequest {
            request_id: rid(),
            vm_id: vm.into(),
            snapshot_id: snapshot.into(),
        })
        .await;
    operation(c, what, r.map(|r| r.into_inner().operation))
}

async fn export_call(c: &Cluster, vm: &str, what: &str) -> pb::Operation {
    let r = c
        .vms()
        .export_vm(pb::ExportVmRequest {
            request_id: rid(),
            vm_id: vm.into(),
            export_domain_id: c.export_domain.clone(),
            collapse_snapshots: false,
            force_override: true,
        })
        .await;
    operation(c, what, r.map(|r| r.into_inner().operation))
}

async fn remove_vm_call(c: &Cluster, vm: &str, what: &str) -> pb::Operation {
    let r = c
        .vms()
        .remove_vm(pb::RemoveVmRequest {
            request_id: rid(),
            vm_id: vm.into(),
        })
        .await;
    operation(c, what, r.map(|r| r.into_inner().operation))
}

async fn create_vm_call(c: &Cluster, name: &str, what: &str) -> pb::Operation {
    let r = c
        .vms()
        .create_vm(pb::CreateVmRequest {
            request_id: rid(),
            name: name.into(),
            cluster_id: c.cluster_id.clone(),
            memory_bytes: 128 * MIB,
            vcpus: 1,
            stateless: false,
            disks: vec![pb::DiskSpec {
                domain_id: c.domain(DomainKind::File).to_string(),
                capacity_bytes: 64 * MIB,
            }],
            kernel: ramsnap_e2e::guest::KERNEL.into(),
            initrd: ramsnap_e2e::guest::INITRD.into(),
            cmdline: CMDLINE.into(),
        })
        .await;
    operation(c, what, r.map(|r| r.into_inner().operation))
}

async fn clone_call(c: &Cluster, vm: &str, snapshot: &str, name: &str, what: &str) -> pb::Operation {
    let r = c
        .snapshots_api()
        .clone_vm_from_snapshot(pb::CloneVmFromSnapshotRequest {
            request_id: rid(),
            vm_id: vm.into(),
            snapshot_id: snapshot.into(),
            name: name.into(),
            target_domain_id: String::new(),
            // A fork: the memory node copies the memory and the host gives
            // it to the clone (rewriting the dump's header), agents killed
            // or not.
            keep_memory: true,
        })
        .await;
    operation(c, what, r.map(|r| r.into_inner().operation))
}

/// A disk-only snapshot of the (stopped) VM; its id.
async fn disk_snapshot(c: &Cluster, vm: &str, description: &str) -> String {
    let r = c
        .create_snapshot_call(vm, false, description)
        .await
        .map(|r| r.operation);
    let op = operation(c, "CreateSnapshot", r);
    c.succeed(Some(op), "CreateSnapshot").await.snapshot_id
}

/// Whether the coordinator still knows the VM.
async fn vm_exists(c: &Cluster, vm: &str) -> bool {
    match c.vms().get_vm(pb::GetVmRequest { vm_id: vm.into() }).await {
        Ok(_) => true,
        Err(s) if s.code() == tonic::Code::NotFound => false,
        Err(s) => c.fail(&format!("GetVm({vm}): {s}")),
    }
}

/// The regular snapshots of the VM, oldest first, as (id, has memory).
async fn regular_snapshots(c: &Cluster, vm: &str) -> Vec<(String, bool)> {
    c.list_snapshots(vm)
        .await
        .into_iter()
        .filter(|s| s.r#type() == pb::SnapshotType::Regular)
        .map(|s| (s.snapshot_id, s.has_memory))
        .collect()
}

/// Runs the VM (its ACTIVE snapshot carries `taken`'s memory) and checks
/// that the guest resumed from it.
async fn run_restoring(
    c: &Cluster,
    vm: &str,
    taken: &Taken,
    op: pb::Operation,
    console_offset: u64,
    what: &str,
) {
    let operation = c.succeed(Some(op), what).await;
    assert_running_agrees(c, vm, what).await;
    let run = Run {
        statuses: Vec::new(),
        console_offset,
        operation,
    };
    c.assert_restored(vm, &run, taken).await;
    if c.active_snapshot(vm).await.has_memory {
        c.fail(&format!(
            "{what}: the ACTIVE snapshot still has memory after the run"
        ));
    }
}

/// RunVm restoring a memory, and StopVm, with the agents killed at every
/// node. Each run resumes the guest from the memory of a snapshot taken
/// (LIVE) just before: snapshot, stop, preview it with its memory, commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_killed_at_every_node_of_run_with_restore_and_of_stop() {
    let killer = AgentKiller::new();
    let mut c = Cluster::start(Db::Sqlite, "3.3", "kill-run").await;
    let vm = c
        .create_vm_sized("kill-run", DomainKind::File, 128 * MIB, CMDLINE)
        .await;
    c.boot(&vm).await;
    for node in RUN {
        let what = format!("agents killed at vm_run.{node}, restoring a memory");
        let taken = c.take_snapshot(&vm, true, &what).await;
        c.stop_vm(&vm).await;
        c.preview(&vm, &taken.snapshot_id, true).await;
        c.commit(&vm).await;
        let console_offset = c.console_end(&vm).await;
        killer.arm(&mut c, "vm_run", node);
        let op = run_call(&c, &vm, &what).await;
        killer.kill_agents_at(&mut c, "vm_run", node, &what).await;
        run_restoring(&c, &vm, &taken, op, console_offset, &what).await;
    }
    for node in STOP {
        let what = format!("agents killed at vm_stop.{node}");
        killer.arm(&mut c, "vm_stop", node);
        let op = stop_call(&c, &vm, &what).await;
        killer.kill_agents_at(&mut c, "vm_stop", node, &what).await;
        c.succeed(Some(op), &what).await;
        assert_down_agrees(&c, &vm, &what).await;
        c.run_vm(&vm, false).await;
        assert_running_agrees(&c, &vm, &what).await;
    }
    c.assert_no_orphans().await;
}

/// Preview, undo, commit and snapshot removal of a stopped VM on BLOCK
/// storage, with the agents killed at every node. The memory snapshot
/// taken first is restored at the end: everything in between left it
/// intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_killed_at_every_node_of_preview_undo_commit_and_remove() {
    let killer = AgentKiller::new();
    let mut c = Cluster::start(Db::Sqlite, "3.3", "kill-preview").await;
    let vm = c
        .create_vm_sized("kill-preview", DomainKind::Block, 128 * MIB, CMDLINE)
        .await;
    c.boot(&vm).await;
    let first = c.take_snapshot(&vm, true, "with memory").await;
    c.stop_vm(&vm).await;

    for node in PREVIEW {
        let what = format!("agents killed at snapshot_preview.{node}");
        killer.arm(&mut c, "snapshot_preview", node);
        let op = preview_call(&c, &vm, &first.snapshot_id, true, &what).await;
        killer
            .kill_agents_at(&mut c, "snapshot_preview", node, &what)
            .await;
        c.succeed(Some(op), &what).await;
        assert_down_agrees(&c, &vm, &what).await;
        let previewed = c.snapshot(&vm, &first.snapshot_id).await;
        if previewed.status() != pb::SnapshotStatus::InPreview {
            c.fail(&format!(
                "{what}: the snapshot is {:?}, not IN_PREVIEW",
                previewed.status()
            ));
        }
        let op = undo_call(&c, &vm, "UndoPreview").await;
        c.succeed(Some(op), "UndoPreview").await;
    }
    for node in UNDO {
        let what = format!("agents killed at snapshot_undo.{node}");
        c.preview(&vm, &first.snapshot_id, true).await;
        killer.arm(&mut c, "snapshot_undo", node);
        let op = undo_call(&c, &vm, &what).await;
        killer.kill_agents_at(&mut c, "snapshot_undo", node, &what).await;
        c.succeed(Some(op), &what).await;
        assert_down_agrees(&c, &vm, &what).await;
        if c.snapshot(&vm, &first.snapshot_id).await.status() != pb::SnapshotStatus::Ok {
            c.fail(&format!("{what}: the snapshot is still in preview"));
        }
    }
    for node in COMMIT {
        let what = format!("agents killed at snapshot_commit.{node}");
        let newest = disk_snapshot(&c, &vm, &what).await;
        c.preview(&vm, &newest, false).await;
        killer.arm(&mut c, "snapshot_commit", node);
        let op = commit_call(&c, &vm, &what).await;
        killer
            .kill_agents_at(&mut c, "snapshot_commit", node, &what)
            .await;
        c.succeed(Some(op), &what).await;
        assert_down_agrees(&c, &vm, &what).await;
        if c.snapshot(&vm, &newest).await.status() != pb::SnapshotStatus::Ok {
            c.fail(&format!("{what}: the committed snapshot is not OK"));
        }
    }
    for node in REMOVE_SNAPSHOT {
        let what = format!("agents killed at snapshot_remove.{node}");
        let doomed = disk_snapshot(&c, &vm, &what).await;
        killer.arm(&mut c, "snapshot_remove", node);
        let op = remove_snapshot_call(&c, &vm, &doomed, &what).await;
        killer
            .kill_agents_at(&mut c, "snapshot_remove", node, &what)
            .await;
        c.succeed(Some(op), &what).await;
        assert_down_agrees(&c, &vm, &what).await;
        if regular_snapshots(&c, &vm)
            .await
            .iter()
            .any(|(id, _)| *id == doomed)
        {
            c.fail(&format!("{what}: the removed snapshot is still listed"));
        }
    }

    // The first snapshot's memory is whole: the guest resumes from it.
    let what = "run restoring the first snapshot's memory, after every fault";
    c.preview(&vm, &first.snapshot_id, true).await;
    c.commit(&vm).await;
    let console_offset = c.console_end(&vm).await;
    let op = run_call(&c, &vm, what).await;
    run_restoring(&c, &vm, &first, op, console_offset, what).await;
    c.assert_no_orphans().await;
}

/// Export, removal, import, creation and cloning, with the agents killed at
/// every node: each export replaces the last (force_override), each import
/// brings back the VM the removal before it took away, with every snapshot
/// and its memory. The memory is restored at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_killed_at_every_node_of_export_import_remove_create_and_clone() {
    let killer = AgentKiller::new();
    let mut c = Cluster::start(Db::Sqlite, "3.3", "kill-export").await;
    let vm = c
        .create_vm_sized("kill-export", DomainKind::File, 128 * MIB, CMDLINE)
        .await;
    c.boot(&vm).await;
    let taken = c.take_snapshot(&vm, true, "with memory").await;
    c.stop_vm(&vm).await;
    let snapshots = regular_snapshots(&c, &vm).await;

    let mut exported_volumes = None;
    for node in EXPORT {
        let what = format!("agents killed at vm_export.{node}");
        killer.arm(&mut c, "vm_export", node);
        let op = export_call(&c, &vm, &what).await;
        killer.kill_agents_at(&mut c, "vm_export", node, &what).await;
        c.succeed(Some(op), &what).await;
        assert_down_agrees(&c, &vm, &what).await;
        let listed = c.exported(&vm).await;
        let volumes = c.export_volumes().await.len();
        if *exported_volumes.get_or_insert(volumes) != volumes {
            c.fail(&format!(
                "{what}: the export domain holds {volumes} volumes, the first export {exported_volumes:?}"
            ));
        }
        if listed.snapshots.len() < snapshots.len() {
            c.fail(&format!("{what}: the export lists {listed:?}"));
        }
    }

    for (i, node) in IMPORT.iter().enumerate() {
        // Removed (the agents killed at the removal's i-th node, while
        // there is one), then imported back.
        let what = match REMOVE_VM.get(i) {
            Some(remove_node) => {
                let what = format!("agents killed at vm_remove.{remove_node}");
                killer.arm(&mut c, "vm_remove", remove_node);
                let op = remove_vm_call(&c, &vm, &what).await;
                killer
                    .kill_agents_at(&mut c, "vm_remove", remove_node, &what)
                    .await;
                c.succeed(Some(op), &what).await;
                what
            }
            None => {
                let what = "RemoveVm".to_string();
                let op = remove_vm_call(&c, &vm, &what).await;
                c.succeed(Some(op), &what).await;
                what
            }
        };
        if vm_exists(&c, &vm).await {
            c.fail(&format!("{what}: the VM is still there"));
        }
        c.assert_no_orphans().await;

        let what = format!("agents killed at vm_import.{node}");
        killer.arm(&mut c, "vm_import", node);
        let r = c
            .vms()
            .import_vm(c.import_request(&vm, DomainKind::File, false, false, ""))
            .await
            .map(|r| r.into_inner().operation);
        let op = operation(&c, &what, r);
        killer.kill_agents_at(&mut c, "vm_import", node, &what).await;
        c.succeed(Some(op), &what).await;
        assert_down_agrees(&c, &vm, &what).await;
        let now = regular_snapshots(&c, &vm).await;
        if now != snapshots {
            c.fail(&format!(
                "{what}: imported snapshots {now:?}, exported {snapshots:?}"
            ));
        }
    }

    for node in CREATE_VM {
        let what = format!("agents killed at vm_create.{node}");
        killer.arm(&mut c, "vm_create", node);
        let op = create_vm_call(&c, &format!("created-{node}"), &what).await;
        killer.kill_agents_at(&mut c, "vm_create", node, &what).await;
        let op = c.succeed(Some(op), &what).await;
        let created = if op.result_vm_id.is_empty() {
            op.vm_id
        } else {
            op.result_vm_id
        };
        assert_down_agrees(&c, &created, &what).await;
        let op = remove_vm_call(&c, &created, "RemoveVm").await;
        c.succeed(Some(op), "RemoveVm").await;
    }

    for node in CLONE {
        let what = format!("agents killed at vm_clone.{node}");
        killer.arm(&mut c, "vm_clone", node);
        let op = clone_call(&c, &vm, &taken.snapshot_id, &format!("clone-{node}"), &what).await;
        killer.kill_agents_at(&mut c, "vm_clone", node, &what).await;
        let op = c.succeed(Some(op), &what).await;
        let clone = op.result_vm_id.clone();
        if clone.is_empty() || clone == vm {
            c.fail(&format!(
                "{what}: the operation names the source VM, not the clone: {op:?}"
            ));
        }
        assert_down_agrees(&c, &clone, &what).await;
        if !c.active_snapshot(&clone).await.has_memory {
            c.fail(&format!("{what}: the fork has no memory"));
        }
        if *node == "memory" {
            // The fork made through the faults at its memory node resumes
            // (a new VM: its console starts empty).
            c.track_vm(&clone);
            let console_offset = 0;
            let op = run_call(&c, &clone, &what).await;
            run_restoring(&c, &clone, &taken, op, console_offset, &what).await;
            let op = stop_call(&c, &clone, &what).await;
            c.succeed(Some(op), &what).await;
        }
        let op = remove_vm_call(&c, &clone, "RemoveVm").await;
        c.succeed(Some(op), "RemoveVm").await;
    }

    // The memory came through every export and import: the guest resumes.
    let what = "run restoring the memory, after every fault";
    c.preview(&vm, &taken.snapshot_id, true).await;
    c.commit(&vm).await;
    let console_offset = c.console_end(&vm).await;
    let op = run_call(&c, &vm, what).await;
    run_restoring(&c, &vm, &taken, op, console_offset, what).await;
    assert_eq!(c.get_vm(&vm).await.status(), VmStatus::Up);
    c.assert_no_orphans().await;
}
