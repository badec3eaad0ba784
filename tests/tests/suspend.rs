//! Suspend and resume (issue 13, item 2; oVirt's hibernate): SuspendVm
//! saves a running VM's memory and stops the guest (SAVING_STATE, then
//! SUSPENDED); RunVm resumes it (RESTORING_STATE, then UP: the same boot
//! token, the counter going on, the disk as the guest left it) and frees
//! the volumes; StopVm discards the saved state, and the next run boots.
//! While suspended, whatever would change the disks is refused with
//! VM_SUSPENDED. On the real guest through the real coordinator, on SQLite
//! with a FILE domain and on PostgreSQL with a BLOCK domain.
use ramsnap_e2e::cluster::{request_id, Cluster, Db, DomainKind};
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::VmStatus;
use std::time::Instant;
use tonic_types::StatusExt;

/// Ticks (about 0.2 s each) a resumed guest must count on.
const TICKS: u64 = 5;

/// The precondition kinds of a FAILED_PRECONDITION.
fn kinds(e: &tonic::Status) -> Vec<String> {
    e.get_error_details()
        .precondition_failure()
        .map(|p| p.violations.iter().map(|v| v.r#type.clone()).collect())
        .unwrap_or_default()
}

fn assert_refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, kind: &str, what: &str) {
    match r {
        Ok(v) => panic!("{what} was accepted: {v:?}"),
        Err(e) => {
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{what}: {e:?}");
            assert_eq!(kinds(&e), vec![kind.to_string()], "{what}: {e:?}");
        }
    }
}

async fn suspend_and_resume(db: Db, kind: DomainKind, label: &str) {
    let t = Instant::now();
    let c = Cluster::start(db, "3.3", label).await;
    let vm = c.create_vm(&format!("{label}-vm"), kind).await;

    // Only a VM that is up can be suspended.
    let down = c
        .vms()
        .suspend_vm(pb::SuspendVmRequest {
            request_id: request_id(),
            vm_id: vm.clone(),
        })
        .await;
    assert_refused(down, "VM_NOT_RUNNING", "SuspendVm of a VM that is down");

    c.boot(&vm).await;
    let snapshot = c.take_snapshot(&vm, false, "before the suspend").await;
    let saved = c.suspend_vm(&vm).await;
    assert_eq!(c.get_vm(&vm).await.status(), VmStatus::Suspended);
    assert!(
        c.active_snapshot(&vm).await.has_memory,
        "the suspended VM's ACTIVE snapshot holds its memory"
    );
    c.assert_memory_volumes(&c.active_snapshot(&vm).await).await;

    // Refused while suspended, nothing changed: every operation that
    // would change the disks the memory was saved with.
    let snaps = c.snapshots_api();
    assert_refused(
        snaps
            .clone()
            .preview_snapshot(pb::PreviewSnapshotRequest {
                request_id: request_id(),
                vm_id: vm.clone(),
                snapshot_id: snapshot.snapshot_id.clone(),
                restore_memory: false,
            })
            .await,
        "VM_SUSPENDED",
        "PreviewSnapshot of a suspended VM",
    );
    assert_refused(
        c.create_snapshot_call(&vm, false, "while suspended").await,
        "VM_SUSPENDED",
        "CreateSnapshot of a suspended VM",
    );
    assert_refused(
        snaps
            .clone()
            .remove_snapshot(pb::RemoveSnapshotRequest {
                request_id: request_id(),
                vm_id: vm.clone(),
                snapshot_id: snapshot.snapshot_id.clone(),
            })
            .await,
        "VM_SUSPENDED",
        "RemoveSnapshot of a suspended VM",
    );
    assert_refused(
        c.vms()
            .export_vm(pb::ExportVmRequest {
                request_id: request_id(),
                vm_id: vm.clone(),
                export_domain_id: c.export_domain.clone(),
                collapse_snapshots: false,
                force_override: false,
            })
            .await,
        "VM_SUSPENDED",
        "ExportVm of a suspended VM",
    );
    assert_refused(
        c.vms()
            .remove_vm(pb::RemoveVmRequest {
                request_id: request_id(),
                vm_id: vm.clone(),
            })
            .await,
        "VM_SUSPENDED",
        "RemoveVm of a suspended VM",
    );
    assert_refused(
        c.vms()
            .suspend_vm(pb::SuspendVmRequest {
                request_id: request_id(),
                vm_id: vm.clone(),
            })
            .await,
        "VM_NOT_RUNNING",
        "SuspendVm of a suspended VM",
    );
    assert_eq!(c.get_vm(&vm).await.status(), VmStatus::Suspended);
    assert_eq!(
        c.list_snapshots(&vm).await.len(),
        2,
        "nothing was added or removed"
    );

    // Resume: the same guest, counting on; the memory is freed.
    let run = c.run_vm(&vm, false).await;
    run.assert_started_as(VmStatus::RestoringState);
    let g = c.assert_restored(&vm, &run, &saved).await;
    assert!(
        !c.active_snapshot(&vm).await.has_memory,
        "the resumed VM's ACTIVE snapshot still holds the memory"
    );
    let g = c.wait_counter(&vm, run.console_offset, g.counter + TICKS).await;
    assert_eq!(g.token, saved.token);
    c.assert_no_orphans().await;

    // Suspended again, then stopped: the saved state is discarded and the
    // next run boots.
    c.suspend_vm(&vm).await;
    c.stop_vm(&vm).await;
    assert_eq!(c.get_vm(&vm).await.status(), VmStatus::Down);
    assert!(
        !c.active_snapshot(&vm).await.has_memory,
        "StopVm of a suspended VM kept its memory"
    );
    c.assert_no_orphans().await;
    let run = c.run_vm(&vm, false).await;
    run.assert_started_as(VmStatus::PoweringUp);
    c.assert_booted(&vm, &run, &[&saved.token]).await;
    c.stop_vm(&vm).await;
    c.assert_no_orphans().await;
    eprintln!("[{label}] passed in {:.1}s", t.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread")]
async fn suspend_then_run_resumes_the_guest_sqlite_file() {
    suspend_and_resume(Db::Sqlite, DomainKind::File, "suspend-sqlite").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn suspend_then_run_resumes_the_guest_postgres_block() {
    suspend_and_resume(Db::Postgres, DomainKind::Block, "suspend-pg").await;
}
