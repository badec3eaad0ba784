//! Crashes while a step acts on a running guest, with the real guest under
//! real libvirt/QEMU, real gRPC, real SQLite: the faults of issue 9 that
//! deleted the disk a guest was writing to.
//!
//! After each crash and restart the test asserts what must always hold:
//! the operation ends SUCCEEDED (a crash is not a failure), and the
//! coordinator, libvirt and the disk agree: the VM is UP on the coordinator
//! and running in libvirt, libvirt's disk is the coordinator's leaf (the
//! ACTIVE snapshot's volume), that file exists, and QEMU holds no deleted
//! file open.
//!
//! - all in one (`ramsnapd`, the embedded default): the process dies while
//!   libvirt writes the memory of a LIVE snapshot (a host failpoint) and
//!   while libvirt restores a memory on run; and at every node of the
//!   snapshot, run (restoring a memory) and stop sagas (`crash` and
//!   `crash_after` failpoints of the coordinator);
//! - separate agents: the host and storage agents are SIGKILLed while the
//!   snapshot saga stands at each node (a `hold` failpoint), and come back
//!   a moment later: the saga asks again instead of unwinding.
use ramsnap_e2e::cluster::Run;
use ramsnap_e2e::cluster::{Cluster, Db, DomainKind, Process, VmStatus, MIB};
use ramsnap_e2e::faults::{assert_down_agrees, assert_running_agrees, crashed_then_restarted, AgentKiller};
use ramsnap_e2e::guest::CMDLINE;
use ramsnap_proto::snapshot::v1 as pb;
use std::time::Duration;
use uuid::Uuid;

/// RAM filled with random data, so that the dump takes long enough for a
/// crash to land in it.
const FILL_MIB: u64 = 96;

fn snapshot_request(vm_id: &str, request_id: &str, description: &str) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest {
        request_id: request_id.to_string(),
        vm_id: vm_id.to_string(),
        description: description.to_string(),
        save_memory: true,
        memory_mode: pb::MemoryMode::Live as i32,
    }
}

/// Sends `req`; a reply lost in a crash is `None` (the call is repeated,
/// same request id, once the process is back).
async fn send_snapshot(c: &Cluster, req: &pb::CreateSnapshotRequest) -> Option<pb::Operation> {
    match c.snapshots_api().create_snapshot(req.clone()).await {
        Ok(r) => r.into_inner().operation,
        Err(s) => {
            eprintln!("CreateSnapshot: {s} (the process went down)");
            None
        }
    }
}

/// The snapshot of `req`, after the crash: the operation ends SUCCEEDED,
/// the snapshot holds the memory, everything agrees, the guest never
/// rebooted.
async fn after_snapshot_crash(
    c: &Cluster,
    vm_id: &str,
    req: &pb::CreateSnapshotRequest,
    op: Option<pb::Operation>,
    token: &str,
    what: &str,
) {
    let op = match op {
        Some(op) => op,
        None => send_snapshot(c, req)
            .await
            .unwrap_or_else(|| c.fail(&format!("{what}: CreateSnapshot after the restart failed"))),
    };
    let op = c.succeed(Some(op), what).await;
    let snap = c.snapshot(vm_id, &op.snapshot_id).await;
    if !snap.has_memory {
        c.fail(&format!("{what}: the snapshot has no memory: {snap:?}"));
    }
    assert_running_agrees(c, vm_id, what).await;
    let now = c.console_now(vm_id).await;
    if now.token != token {
        c.fail(&format!("{what}: the guest rebooted ({token} -> {})", now.token));
    }
}

/// One guest: LIVE memory snapshot, ramsnapd dies while libvirt writes the
/// memory; then a run that restores that memory, ramsnapd dies while libvirt
/// loads it. Each time the restarted process finds out what libvirt did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_dies_while_libvirt_dumps_and_while_it_restores() {
    let mut c = Cluster::start_embedded(
        Db::Sqlite,
        "3.3",
        "crash-dump",
        &[("RAMSNAP_HOST_FAILPOINTS", "snapshot_during_dump")],
    )
    .await;
    let cmdline = format!("{CMDLINE} ramsnap.fill={FILL_MIB}");
    let vm = c
        .create_vm_sized("crash-dump", DomainKind::File, 256 * MIB, &cmdline)
        .await;
    let guest = c.boot(&vm).await;

    let what = "snapshot, ramsnapd killed during the memory dump";
    let req = snapshot_request(&vm, &Uuid::new_v4().to_string(), "during the dump");
    let op = send_snapshot(&c, &req).await;
    // Back with the next fault armed: a crash during the restore below.
    crashed_then_restarted(
        &mut c,
        Process::Coordinator,
        what,
        &[("RAMSNAP_HOST_FAILPOINTS", "restore_during_load")],
    );
    after_snapshot_crash(&c, &vm, &req, op, &guest.token, what).await;
    let snapshot_id = c
        .list_snapshots(&vm)
        .await
        .into_iter()
        .rev()
        .find(|s| s.r#type() == pb::SnapshotType::Regular)
        .expect("the snapshot just taken")
        .snapshot_id;

    // The memory is usable: preview it, commit, run (restore).
    c.stop_vm(&vm).await;
    c.preview(&vm, &snapshot_id, true).await;
    c.commit(&vm).await;
    let what = "run with restore, ramsnapd killed while libvirt loads the memory";
    let resp = c
        .vms()
        .run_vm(pb::RunVmRequest {
            request_id: Uuid::new_v4().to_string(),
            vm_id: vm.clone(),
            host_id: String::new(),
            run_stateless: false,
        })
        .await;
    let op = resp.ok().and_then(|r| r.into_inner().operation);
    crashed_then_restarted(&mut c, Process::Coordinator, what, &[]);
    let op = op.unwrap_or_else(|| c.fail(&format!("{what}: RunVm answered nothing before the crash")));
    c.succeed(Some(op), what).await;
    // UP once the follower has caught up.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while c.get_vm(&vm).await.status() != VmStatus::Up && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_running_agrees(&c, &vm, what).await;
    let active = c.active_snapshot(&vm).await;
    if active.has_memory {
        c.fail(&format!(
            "{what}: the ACTIVE snapshot still has memory after the run: {active:?}"
        ));
    }
    let now = c.console_now(&vm).await;
    if now.token != guest.token {
        c.fail(&format!(
            "{what}: the guest booted instead of resuming ({} -> {})",
            guest.token, now.token
        ));
    }
}

/// The coordinator's `crash` and `crash_after` at every node of the snapshot
/// saga, in the all-in-one process: each time, a LIVE memory snapshot of the
/// same running guest completes after the restart, and nothing disagrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_dies_at_every_node_of_a_memory_snapshot() {
    let mut c = Cluster::start_embedded(Db::Sqlite, "3.3", "crash-nodes", &[]).await;
    let vm = c
        .create_vm_sized("crash-nodes", DomainKind::File, 128 * MIB, CMDLINE)
        .await;
    let guest = c.boot(&vm).await;
    let nodes = [
        "lock_vm",
        "ids",
        "memory_volumes",
        "overlays",
        "record_snapshot",
        "host_snapshot",
        "commit",
        "unlock_vm",
    ];
    for node in nodes {
        for action in ["crash", "crash_after"] {
            let what = format!("snapshot_create.{node}={action}");
            let failpoint = format!("snapshot_create.{node}={action}");
            c.process(Process::Coordinator)
                .restart(&[("RAMSNAP_FAILPOINTS", failpoint.as_str())]);
            let req = snapshot_request(&vm, &Uuid::new_v4().to_string(), &what);
            let op = send_snapshot(&c, &req).await;
            crashed_then_restarted(&mut c, Process::Coordinator, &what, &[]);
            after_snapshot_crash(&c, &vm, &req, op, &guest.token, &what).await;
        }
    }
    c.assert_no_orphans().await;
}

/// The same for RunVm restoring a memory, and for StopVm: `ramsnapd` exits
/// at every node of the run and stop sagas (`crash`, `crash_after`) and
/// comes back; the run resumes the guest from the memory (never boots it,
/// never leaves it paused), the stop leaves it stopped, and everything
/// agrees. A reply lost in the crash is asked for again with the same
/// request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_dies_at_every_node_of_a_run_with_restore_and_of_a_stop() {
    let mut c = Cluster::start_embedded(Db::Sqlite, "3.3", "crash-run", &[]).await;
    let vm = c
        .create_vm_sized("crash-run", DomainKind::File, 128 * MIB, CMDLINE)
        .await;
    c.boot(&vm).await;
    let run_nodes = [
        "lock_vm",
        "restore_stateless",
        "stateless_overlays",
        "stateless_begin",
        "run_on_host",
        "started",
        "unlock_vm",
    ];
    for node in run_nodes {
        for action in ["crash", "crash_after"] {
            let what = format!("vm_run.{node}={action}, restoring a memory");
            let taken = c.take_snapshot(&vm, true, &what).await;
            c.stop_vm(&vm).await;
            c.preview(&vm, &taken.snapshot_id, true).await;
            c.commit(&vm).await;
            let console_offset = c.console_end(&vm).await;
            let failpoint = format!("vm_run.{node}={action}");
            c.process(Process::Coordinator)
                .restart(&[("RAMSNAP_FAILPOINTS", failpoint.as_str())]);
            let req = pb::RunVmRequest {
                request_id: Uuid::new_v4().to_string(),
                vm_id: vm.clone(),
                host_id: String::new(),
                run_stateless: false,
            };
            let op = c
                .vms()
                .run_vm(req.clone())
                .await
                .ok()
                .and_then(|r| r.into_inner().operation);
            crashed_then_restarted(&mut c, Process::Coordinator, &what, &[]);
            let op = match op {
                Some(op) => op,
                None => c
                    .vms()
                    .run_vm(req)
                    .await
                    .unwrap_or_else(|e| c.fail(&format!("{what}: RunVm after the restart: {e}")))
                    .into_inner()
                    .operation
                    .unwrap_or_else(|| c.fail(&format!("{what}: RunVm answered no operation"))),
            };
            let operation = c.succeed(Some(op), &what).await;
            assert_running_agrees(&c, &vm, &what).await;
            let run = Run {
                statuses: Vec::new(),
                console_offset,
                operation,
            };
            c.assert_restored(&vm, &run, &taken).await;
            if c.active_snapshot(&vm).await.has_memory {
                c.fail(&format!(
                    "{what}: the ACTIVE snapshot still has memory after the run"
                ));
            }
        }
    }
    for node in [
        "lock_vm",
        "stop_on_host",
        "stopped",
        "restore_stateless",
        "unlock_vm",
    ] {
        for action in ["crash", "crash_after"] {
            let what = format!("vm_stop.{node}={action}");
            let failpoint = what.clone();
            c.process(Process::Coordinator)
                .restart(&[("RAMSNAP_FAILPOINTS", failpoint.as_str())]);
            let req = pb::StopVmRequest {
                request_id: Uuid::new_v4().to_string(),
                vm_id: vm.clone(),
                graceful_timeout_seconds: 0,
            };
            let op = c
                .vms()
                .stop_vm(req.clone())
                .await
                .ok()
                .and_then(|r| r.into_inner().operation);
            crashed_then_restarted(&mut c, Process::Coordinator, &what, &[]);
            let op = match op {
                Some(op) => op,
                None => c
                    .vms()
                    .stop_vm(req)
                    .await
                    .unwrap_or_else(|e| c.fail(&format!("{what}: StopVm after the restart: {e}")))
                    .into_inner()
                    .operation
                    .unwrap_or_else(|| c.fail(&format!("{what}: StopVm answered no operation"))),
            };
            c.succeed(Some(op), &what).await;
            assert_down_agrees(&c, &vm, &what).await;
            c.run_vm(&vm, false).await;
            assert_running_agrees(&c, &vm, &what).await;
        }
    }
    c.assert_no_orphans().await;
}

/// Separate agents, SIGKILLed while the snapshot saga stands at each node,
/// restarted a moment after the node has begun: the saga asks again (the
/// agents are UNAVAILABLE meanwhile) and completes; nothing disagrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_killed_at_every_node_of_a_memory_snapshot() {
    let killer = AgentKiller::new();
    let mut c = Cluster::start(Db::Sqlite, "3.3", "kill-agents").await;
    let vm = c
        .create_vm_sized("kill-agents", DomainKind::Block, 128 * MIB, CMDLINE)
        .await;
    let guest = c.boot(&vm).await;
    for node in [
        "memory_volumes",
        "overlays",
        "record_snapshot",
        "host_snapshot",
        "commit",
        "unlock_vm",
    ] {
        let what = format!("agents killed at snapshot_create.{node}");
        killer.arm(&mut c, "snapshot_create", node);
        let req = snapshot_request(&vm, &Uuid::new_v4().to_string(), &what);
        let op = send_snapshot(&c, &req)
            .await
            .unwrap_or_else(|| c.fail(&format!("{what}: CreateSnapshot failed")));
        killer
            .kill_agents_at(&mut c, "snapshot_create", node, &what)
            .await;
        after_snapshot_crash(&c, &vm, &req, Some(op), &guest.token, &what).await;
    }
    c.assert_no_orphans().await;
}
