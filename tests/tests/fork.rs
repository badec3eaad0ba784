//! Fork (issue 13, item 1): CloneVmFromSnapshot with `keep_memory` makes a
//! VM that resumes from the snapshot's memory under its own name and UUID in
//! libvirt, while the source VM goes on running; ImportVm `as_clone` with
//! `keep_memory` does the same from an export domain. On the real guest
//! through the real coordinator, on SQLite with a FILE domain and on
//! PostgreSQL with a BLOCK domain (the imported fork on the other kind).
//!
//! The guest shows what happened: a resumed guest keeps its boot token and
//! counts on from the snapshot's counter; a booted one has a new token and
//! counts from 1; a guest that sees a disk it did not write says so.
use ramsnap_e2e::cluster::{request_id, Cluster, Db, DomainKind, Taken};
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::VmStatus;
use std::time::Instant;

/// Ticks (about 0.2 s each) a guest must count on its own.
const TICKS: u64 = 5;

async fn clone_call(
    c: &Cluster,
    vm: &str,
    snapshot: &str,
    name: &str,
    keep_memory: bool,
) -> Result<pb::CloneVmFromSnapshotResponse, tonic::Status> {
    c.snapshots_api()
        .clone_vm_from_snapshot(pb::CloneVmFromSnapshotRequest {
            request_id: request_id(),
            vm_id: vm.into(),
            snapshot_id: snapshot.into(),
            name: name.into(),
            target_domain_id: String::new(),
            keep_memory,
        })
        .await
        .map(|r| r.into_inner())
}

/// A fork of `taken`: its id, once the clone exists, with memory.
async fn fork_of(c: &Cluster, source: &str, taken: &Taken, name: &str) -> String {
    let r = clone_call(c, source, &taken.snapshot_id, name, true)
        .await
        .unwrap_or_else(|e| c.fail(&format!("CloneVmFromSnapshot(keep_memory): {e}")));
    assert!(
        r.warnings.iter().any(|w| w.contains("identity")),
        "a fork warns that the guest keeps the source's identity: {:?}",
        r.warnings
    );
    let op = c.succeed(r.operation, "CloneVmFromSnapshot").await;
    let fork = op.result_vm_id.clone();
    assert!(!fork.is_empty() && fork != source, "{op:?}");
    c.track_vm(&fork);
    let active = c.active_snapshot(&fork).await;
    assert!(
        active.has_memory,
        "the fork's ACTIVE snapshot holds the memory: {active:?}"
    );
    fork
}

/// Runs the fork and checks that it resumed from `taken`, then counts on
/// its own.
async fn run_fork(c: &Cluster, fork: &str, taken: &Taken) {
    let run = c.run_vm(fork, false).await;
    run.assert_started_as(VmStatus::RestoringState);
    let g = c.assert_restored(fork, &run, taken).await;
    c.wait_counter(fork, run.console_offset, g.counter + TICKS).await;
}

async fn fork(db: Db, kind: DomainKind, label: &str) {
    let t = Instant::now();
    let c = Cluster::start(db, "3.3", label).await;
    let source = c.create_vm(&format!("{label}-source"), kind).await;
    c.boot(&source).await;

    // Refused before anything is made: a snapshot without memory.
    let disk_only = c.take_snapshot(&source, false, "no memory").await;
    let e = clone_call(&c, &source, &disk_only.snapshot_id, "no-memory-fork", true)
        .await
        .expect_err("keep_memory of a disk-only snapshot");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("without memory"), "{e:?}");

    let taken = c.take_snapshot(&source, true, "fork point").await;
    let fork_a = fork_of(&c, &source, &taken, &format!("{label}-fork-a")).await;
    run_fork(&c, &fork_a, &taken).await;

    // Both run at once, each on its own: the source never restarted and
    // counts on past where it was when the fork began.
    let source_now = c.console_now(&source).await;
    assert_eq!(source_now.token, taken.token, "the source VM restarted");
    assert!(
        source_now.counter > taken.counter_after,
        "{source_now:?} {taken:?}"
    );
    for vm in [&source, &fork_a] {
        assert_eq!(c.get_vm(vm).await.status(), VmStatus::Up, "VM {vm}");
    }

    // Removing the fork leaves the source running.
    c.stop_vm(&fork_a).await;
    c.remove_vm(&fork_a).await;
    let offset = c.console_end(&source).await;
    let g = c.wait_counter(&source, offset, source_now.counter + TICKS).await;
    assert_eq!(g.token, taken.token, "the source VM restarted when its fork went");

    // A second fork of the same memory; then the source goes, and the
    // fork, made from copies, resumes all the same.
    let fork_b = fork_of(&c, &source, &taken, &format!("{label}-fork-b")).await;
    c.stop_vm(&source).await;

    // A fork through an export domain: the source, committed to the
    // snapshot with its memory, exported, then imported as a clone that
    // keeps the active snapshot's memory.
    c.preview(&source, &taken.snapshot_id, true).await;
    c.commit(&source).await;
    c.export_vm(&source, false).await;
    let mut plain = c.import_request(&source, kind.other(), true, false, &format!("{label}-fork-c"));
    plain.keep_memory = false;
    let refused = c
        .vms()
        .import_vm(pb::ImportVmRequest {
            as_clone: false,
            keep_memory: true,
            ..plain.clone()
        })
        .await
        .expect_err("keep_memory without as_clone");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let r = c
        .vms()
        .import_vm(pb::ImportVmRequest {
            keep_memory: true,
            ..plain
        })
        .await
        .unwrap_or_else(|e| c.fail(&format!("ImportVm(as_clone, keep_memory): {e}")))
        .into_inner();
    assert!(
        r.warnings.iter().any(|w| w.contains("identity")),
        "an imported fork warns that the guest keeps the source's identity: {:?}",
        r.warnings
    );
    let op = c.succeed(r.operation, "ImportVm").await;
    let fork_c = op.result_vm_id.clone();
    assert!(!fork_c.is_empty() && fork_c != source, "{op:?}");
    c.track_vm(&fork_c);
    assert!(
        c.active_snapshot(&fork_c).await.has_memory,
        "the imported fork keeps the memory"
    );

    c.remove_vm(&source).await;
    run_fork(&c, &fork_b, &taken).await;
    // Both forks run at once, the imported one on the other domain kind.
    run_fork(&c, &fork_c, &taken).await;
    c.stop_vm(&fork_b).await;
    c.stop_vm(&fork_c).await;
    c.assert_no_orphans().await;
    eprintln!("[{label}] passed in {:.1}s", t.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fork_resumes_beside_its_source_sqlite_file() {
    fork(Db::Sqlite, DomainKind::File, "fork-sqlite").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fork_resumes_beside_its_source_postgres_block() {
    fork(Db::Postgres, DomainKind::Block, "fork-pg").await;
}
