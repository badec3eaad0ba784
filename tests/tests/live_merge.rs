//! Remove a snapshot while the VM runs (issue 13, item 4; oVirt 3.6's live
//! merge): RemoveSnapshot of a running VM commits the volume above the
//! snapshot's into it on the VM's host with libvirt's block commit, the
//! guest running throughout. On the real guest through the real
//! coordinator, SQLite with FILE and PostgreSQL with BLOCK:
//!
//! - s1, s2 (both with memory) and s3 (disk-only) are taken while the
//!   guest counts; s1 goes (s2's volume is committed into s1's: inside the
//!   chain), then s3 (the ACTIVE leaf is committed into s3's volume: an
//!   active commit, the guest pivots onto it). The guest never restarts and
//!   always reads its disk as it wrote it (it checks on every tick);
//! - s2's memory, saved with the volume that was merged away, is rebound to
//!   the volume that took its place: previewing s2 with its memory resumes
//!   the guest from it.
use ramsnap_e2e::cluster::{request_id, Cluster, Db, DomainKind};
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::VmStatus;
use std::time::Instant;

/// The guest ran on without a restart or a disk mismatch since `offset`,
/// under `token`, and counted at least `ticks` more.
async fn assert_ran_on(c: &Cluster, vm: &str, offset: u64, token: &str, counter: u64, what: &str) -> u64 {
    let g = c.wait_counter(vm, offset, counter + 3).await;
    let (log, _) = c.console_since(vm, offset).await;
    assert!(
        log.boots().is_empty(),
        "{what}: the guest restarted: {:?}",
        log.records
    );
    assert!(
        log.problems().is_empty(),
        "{what}: the guest reported {:?}",
        log.problems()
    );
    let ticks = log.ticks();
    assert!(ticks.iter().all(|t| t.token == token), "{what}: {ticks:?}");
    assert!(
        ticks.windows(2).all(|w| w[1].counter > w[0].counter),
        "{what}: the counter went back: {ticks:?}"
    );
    assert_eq!(g.token, token);
    assert_eq!(c.get_vm(vm).await.status(), VmStatus::Up, "{what}");
    g.counter
}

async fn remove_live(c: &Cluster, vm: &str, snapshot: &str) {
    let t = Instant::now();
    c.remove_snapshot(vm, snapshot).await;
    eprintln!(
        "[{}] live removal of {snapshot}: {:.2}s",
        c.label,
        t.elapsed().as_secs_f64()
    );
}

async fn live_merge(db: Db, kind: DomainKind, label: &str) {
    let t = Instant::now();
    let c = Cluster::start(db, "3.3", label).await;
    let vm = c.create_vm(&format!("{label}-vm"), kind).await;
    c.boot(&vm).await;
    let s1 = c.take_snapshot(&vm, true, "s1").await;
    let s2 = c.take_snapshot(&vm, true, "s2").await;
    let s3 = c.take_snapshot(&vm, false, "s3").await;
    let token = s1.token.clone();
    let s2_before = c.snapshot(&vm, &s2.snapshot_id).await;
    let s1_volumes: Vec<_> = c.snapshot(&vm, &s1.snapshot_id).await.disks;

    // s1: s2's volume is committed into s1's, inside the running chain.
    let offset = c.console_end(&vm).await;
    let counter = c.console_now(&vm).await.counter;
    remove_live(&c, &vm, &s1.snapshot_id).await;
    let counter = assert_ran_on(&c, &vm, offset, &token, counter, "after s1's removal").await;
    let s2_now = c.snapshot(&vm, &s2.snapshot_id).await;
    assert_eq!(
        s2_now.disks.iter().map(|d| d.volume.clone()).collect::<Vec<_>>(),
        s1_volumes.iter().map(|d| d.volume.clone()).collect::<Vec<_>>(),
        "s2 now points at the volumes s1's took the content of"
    );
    assert_eq!(s2_now.memory, s2_before.memory, "s2 keeps its memory");

    // s3: the ACTIVE leaf is committed into s3's volume; the guest pivots.
    let s3_volumes: Vec<_> = c.snapshot(&vm, &s3.snapshot_id).await.disks;
    let offset = c.console_end(&vm).await;
    remove_live(&c, &vm, &s3.snapshot_id).await;
    assert_ran_on(&c, &vm, offset, &token, counter, "after s3's removal").await;
    let active = c.active_snapshot(&vm).await;
    assert_eq!(
        active.disks.iter().map(|d| d.volume.clone()).collect::<Vec<_>>(),
        s3_volumes.iter().map(|d| d.volume.clone()).collect::<Vec<_>>(),
        "the ACTIVE snapshot runs on the volumes s3's took the content of"
    );
    let left: Vec<String> = c
        .list_snapshots(&vm)
        .await
        .iter()
        .map(|s| s.description.clone())
        .collect();
    assert_eq!(left.len(), 2, "s2 and the ACTIVE snapshot: {left:?}");
    c.assert_no_orphans().await;

    // A snapshot the removal does not allow: refused, nothing changed.
    let refused = c
        .snapshots_api()
        .remove_snapshot(pb::RemoveSnapshotRequest {
            request_id: request_id(),
            vm_id: vm.clone(),
            snapshot_id: active.snapshot_id.clone(),
        })
        .await
        .expect_err("removing the ACTIVE snapshot");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");

    // s2's memory was rebound with the merge: it restores.
    c.stop_vm(&vm).await;
    c.preview(&vm, &s2.snapshot_id, true).await;
    let run = c.run_vm(&vm, false).await;
    run.assert_started_as(VmStatus::RestoringState);
    c.assert_restored(&vm, &run, &s2).await;
    c.stop_vm(&vm).await;
    c.commit(&vm).await;
    c.assert_no_orphans().await;
    eprintln!("[{label}] passed in {:.1}s", t.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_snapshots_of_a_running_vm_keeps_the_guest_running_sqlite_file() {
    live_merge(Db::Sqlite, DomainKind::File, "merge-sqlite").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_snapshots_of_a_running_vm_keeps_the_guest_running_postgres_block() {
    live_merge(Db::Postgres, DomainKind::Block, "merge-pg").await;
}
