//! The acceptance tests of oVirt 3.3's RAM Snapshots feature
//! (../shared/seed/ram-snapshots-feature.md, "Testing"): "Snapshot
//! creations" 1-3, "Preview snapshot" 1-3, "Commit to snapshot" 1-2 and
//! "Run VM" 1-2, end to end: the three real binaries as separate processes,
//! real libvirt/QEMU (TCG) running the test guest (tests/guest/), real LVM
//! on a loop device and a real directory for storage, over gRPC. Every case
//! runs on SQLite and on PostgreSQL (`RAMSNAP_TEST_PG_URL`; the PostgreSQL
//! variants fail when it is not set). Each case uses one storage domain
//! kind on SQLite and the other on PostgreSQL, so both kinds of memory
//! volumes go through every case.
//!
//! How the spec's manual steps map onto the API and the guest:
//! - "Check that the created snapshot contains memory (snapshots subtab)":
//!   ListSnapshots shows it with `has_memory` (and its memory volumes exist).
//! - "Connect to the VM and check that the previous state was restored":
//!   the guest's console shows no new BOOT, the snapshot's boot token, and
//!   its in-RAM counter continuing from the snapshot (at least the counter
//!   seen just before the snapshot, at most a few past the one seen when it
//!   was done; the guest ran on well past that before it was stopped).
//! - "... check that it looks like it should be after boot": a new BOOT
//!   token and the counter starting again at 1.
//! - "Check that the initial status is X and then 'up'": WatchVm from the
//!   RunVm call until UP shows X then UP (DOWN and IMAGE_LOCKED before the
//!   VM starts are not statuses of the running VM).
//! - "Stop VM": StopVm with a graceful timeout of 0.
//! - The guest's state is checked before the status sequence, so that a
//!   failing case says whether the guest resumed, whatever the statuses.
//! - Clusters "with compatibility version less than 3.3": "3.2". There is no
//!   'Save Memory' option: GetCluster says memory snapshots are not
//!   supported and CreateSnapshot with save_memory is refused with
//!   FAILED_PRECONDITION (CLUSTER_BELOW_3_3).
//!
//! After each case, the orphan check: every volume on the domains belongs to
//! a snapshot (disk or memory) or to a chain one of them uses.
//!
//! Guests are bounded by the fixture's semaphore (2 at a time); each case
//! runs one guest at a time.
use ramsnap_e2e::cluster::{Cluster, Db, DomainKind, VmStatus};
use ramsnap_proto::snapshot::v1 as pb;
use std::time::Instant;
use tonic_types::StatusExt;

/// A few ticks more after a snapshot before the guest is stopped, so that a
/// restore of a later state than the snapshot's would show.
const TICKS_AFTER_SNAPSHOT: u64 = 5;

mod cases {
    use super::*;

    /// A 3.3 (or `compat`) system with one VM on `kind`, booted and ticking.
    async fn running_vm(db: Db, compat: &str, label: &str, kind: DomainKind) -> (Cluster, String, String) {
        let c = Cluster::start(db, compat, label).await;
        let vm = c.create_vm(&format!("vm-{label}"), kind).await;
        let g = c.boot(&vm).await;
        (c, vm, g.token)
    }

    /// Takes a snapshot with memory of the running VM, checks it is listed
    /// with memory, lets the guest run on, then stops it.
    async fn memory_snapshot_then_stop(c: &Cluster, vm: &str) -> ramsnap_e2e::cluster::Taken {
        let taken = c.take_snapshot(vm, true, "with memory").await;
        let s = c.snapshot(vm, &taken.snapshot_id).await;
        assert!(
            s.has_memory,
            "the snapshot taken with save_memory has no memory: {s:?}"
        );
        c.wait_counter(vm, 0, taken.counter_after + TICKS_AFTER_SNAPSHOT)
            .await;
        c.stop_vm(vm).await;
        taken
    }

    fn assert_regular(s: &pb::Snapshot, description: &str) {
        assert_eq!(s.r#type(), pb::SnapshotType::Regular, "{s:?}");
        assert_eq!(s.status(), pb::SnapshotStatus::Ok, "{s:?}");
        assert_eq!(s.description, description, "{s:?}");
        assert!(!s.disks.is_empty(), "a snapshot holds the VM's disks: {s:?}");
    }

    /// Snapshot creations, test case 1: Run VM; create snapshot with 'Save
    /// Memory'; the snapshot contains memory.
    pub async fn snapshot_creation_1(db: Db, kind: DomainKind) {
        let t = Instant::now();
        let (c, vm, _) = running_vm(db, "3.3", "create1", kind).await;
        let taken = c.take_snapshot(&vm, true, "create1 with memory").await;
        let s = c.snapshot(&vm, &taken.snapshot_id).await;
        assert_regular(&s, "create1 with memory");
        assert!(
            s.has_memory,
            "ListSnapshots: the snapshot taken with save_memory has no memory: {s:?}"
        );
        c.assert_memory_volumes(&s).await;
        assert!(
            !c.active_snapshot(&vm).await.has_memory,
            "the ACTIVE snapshot of a running VM holds no memory"
        );
        // The VM goes on running after the dump: UP, same guest, counting.
        assert_eq!(
            c.get_vm(&vm).await.status(),
            VmStatus::Up,
            "the VM after the snapshot"
        );
        let g = c.wait_counter(&vm, 0, taken.counter_after + 2).await;
        assert_eq!(g.token, taken.token, "the guest rebooted after the snapshot");
        c.stop_vm(&vm).await;
        c.assert_no_orphans().await;
        eprintln!("[create1] passed in {:.1}s", t.elapsed().as_secs_f64());
    }

    /// Snapshot creations, test case 2: Run VM; create snapshot without
    /// 'Save Memory'; the snapshot does not contain memory.
    pub async fn snapshot_creation_2(db: Db, kind: DomainKind) {
        let t = Instant::now();
        let (c, vm, _) = running_vm(db, "3.3", "create2", kind).await;
        let taken = c.take_snapshot(&vm, false, "create2 disks only").await;
        let s = c.snapshot(&vm, &taken.snapshot_id).await;
        assert_regular(&s, "create2 disks only");
        assert!(
            !s.has_memory,
            "ListSnapshots: a snapshot without save_memory has memory: {s:?}"
        );
        assert!(
            s.memory.is_none(),
            "memory volumes on a disk-only snapshot: {s:?}"
        );
        assert_eq!(
            c.get_vm(&vm).await.status(),
            VmStatus::Up,
            "the VM after the snapshot"
        );
        let g = c.wait_counter(&vm, 0, taken.counter_after + 2).await;
        assert_eq!(g.token, taken.token, "the guest rebooted after the snapshot");
        c.stop_vm(&vm).await;
        // No memory volume was left behind for it either.
        c.assert_no_orphans().await;
        eprintln!("[create2] passed in {:.1}s", t.elapsed().as_secs_f64());
    }

    /// Snapshot creations, test case 3: a cluster below 3.3; Run VM; there
    /// is no 'Save Memory' option; the snapshot does not contain memory.
    pub async fn snapshot_creation_3(db: Db, kind: DomainKind) {
        let t = Instant::now();
        let (c, vm, _) = running_vm(db, "3.2", "create3", kind).await;
        let cluster = c
            .clusters()
            .get_cluster(pb::GetClusterRequest {
                cluster_id: c.cluster_id.clone(),
            })
            .await
            .expect("GetCluster")
            .into_inner()
            .cluster
            .expect("a cluster");
        assert_eq!(cluster.compatibility_version, "3.2");
        assert!(
            !cluster.memory_snapshots_supported,
            "a 3.2 cluster offers memory snapshots: {cluster:?}"
        );
        // The option is not there: asking for it anyway is refused, and
        // nothing is left of the attempt.
        let before = c.list_snapshots(&vm).await;
        match c.create_snapshot_call(&vm, true, "create3 with memory").await {
            Ok(r) => c.fail(&format!(
                "CreateSnapshot(save_memory) on a 3.2 cluster was accepted: {:?}",
                r.operation
            )),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
                let kinds: Vec<String> = e
                    .get_error_details()
                    .precondition_failure()
                    .map(|p| p.violations.iter().map(|v| v.r#type.clone()).collect())
                    .unwrap_or_default();
                assert_eq!(kinds, vec!["CLUSTER_BELOW_3_3".to_string()], "{e:?}");
            }
        }
        assert_eq!(
            c.list_snapshots(&vm).await.len(),
            before.len(),
            "the refused snapshot was listed"
        );
        let taken = c.take_snapshot(&vm, false, "create3").await;
        let s = c.snapshot(&vm, &taken.snapshot_id).await;
        assert_regular(&s, "create3");
        assert!(!s.has_memory, "ListSnapshots: a 3.2 snapshot has memory: {s:?}");
        assert_eq!(
            c.get_vm(&vm).await.status(),
            VmStatus::Up,
            "the VM after the snapshot"
        );
        c.stop_vm(&vm).await;
        c.assert_no_orphans().await;
        eprintln!("[create3] passed in {:.1}s", t.elapsed().as_secs_f64());
    }

    /// Preview snapshot, test case 1: preview a snapshot with memory with
    /// 'Restore Memory'; run: 'restoring state' then 'up'; the state is
    /// restored.
    pub async fn preview_1(db: Db, kind: DomainKind) {
        let t = Instant::now();
        let (c, vm, _) = running_vm(db, "3.3", "preview1", kind).await;
        let taken = memory_snapshot_then_stop(&c, &vm).await;
        let warnings = c.preview(&vm, &taken.snapshot_id, true).await;
        assert!(warnings.is_empty(), "preview with memory warned: {warnings:?}");
        let snaps = c.list_snapshots(&vm).await;
        let previewed = c.snapshot(&vm, &taken.snapshot_id).await;
        assert_eq!(previewed.status(), pb::SnapshotStatus::InPreview, "{snaps:?}");
        assert!(
            snaps.iter().any(|s| s.r#type() == pb::SnapshotType::Preview),
            "no PREVIEW snapshot (the state to go back to): {snaps:?}"
        );
        assert!(
            c.active_snapshot(&vm).await.has_memory,
            "after a preview with restore_memory the ACTIVE snapshot has the memory: {snaps:?}"
        );
        let run = c.run_vm(&vm, false).await;
        c.assert_restored(&vm, &run, &taken).await;
        run.assert_started_as(VmStatus::RestoringState);
        c.stop_vm(&vm).await;
        c.assert_no_orphans().await;
        eprintln!("[preview1] passed in {:.1}s", t.elapsed().as_secs_f64());
    }

    /// Preview snapshot, test case 2: preview a snapshot with memory without
    /// 'Restore Memory'; run: 'powering up' then 'up'; a fresh boot.
    pub async fn preview_2(db: Db, kind: DomainKind) {
        let t = Instant::now();
        let (c, vm, token) = running_vm(db, "3.3", "preview2", kind).await;
        let taken = memory_snapshot_then_stop(&c, &vm).await;
        c.preview(&vm, &taken.snapshot_id, false).await;
        assert!(
            !c.active_snapshot(&vm).await.has_memory,
            "after a preview without restore_memory the ACTIVE snapshot has memory"
        );
        assert!(
            c.snapshot(&vm, &taken.snapshot_id).await.has_memory,
            "the previewed snapshot lost its memory"
        );
        let run = c.run_vm(&vm, false).await;
        c.assert_booted(&vm, &run, &[&token]).await;
        run.assert_started_as(VmStatus::PoweringUp);
        c.stop_vm(&vm).await;
        c.assert_no_orphans().await;
        eprintln!("[preview2] passed in {:.1}s", t.elapsed().as_secs_f64());
    }

    /// Preview snapshot, test case 3: a cluster below 3.3; there is no
    /// 'Restore Memory' option; run: 'powering up' then 'up'; a fresh boot.
    ///
    /// A 3.2 cluster cannot take a snapshot with memory (case "Snapshot
    /// creations 3") and the API moves no VM between clusters, so the
    /// previewed snapshot is the disk-only one a 3.2 VM can have; the
    /// preview asks for restore_memory anyway, which is ignored with a
    /// warning.
    pub async fn preview_3(db: Db, kind: DomainKind) {
        let t = Instant::now();
        let (c, vm, token) = running_vm(db, "3.2", "preview3", kind).await;
        assert!(
            c.create_snapshot_call(&vm, true, "preview3 with memory")
                .await
                .is_err(),
            "CreateSnapshot(save_memory) on a 3.2 cluster was accepted"
        );
        let taken = c.take_snapshot(&vm, false, "preview3").await;
        c.wait_counter(&vm, 0, taken.counter_after + TICKS_AFTER_SNAPSHOT)
            .await;
        c.stop_vm(&vm).await;
        let warnings = c.preview(&vm, &taken.snapshot_id, true).await;
        assert!(
            !warnings.is_empty(),
            "PreviewSnapshot(restore_memory) on a 3.2 cluster gave no warning that no memory is restored"
        );
        assert!(
            !c.active_snapshot(&vm).await.has_memory,
            "the ACTIVE snapshot has memory after a preview on a 3.2 cluster"
        );
        let run = c.run_vm(&vm, false).await;
        c.assert_booted(&vm, &run, &[&token]).await;
        run.assert_started_as(VmStatus::PoweringUp);
        c.stop_vm(&vm).await;
        c.assert_no_orphans().await;
        eprintln!("[preview3] passed in {:.1}s", t.elapsed().as_secs_f64());
    }

    /// Commit to snapshot, test case 1: preview with 'Restore Memory';
    /// commit; the active snapshot has memory; run: 'restoring state' then
    /// 'up'; the state is restored.
    pub async fn commit_1(db: Db, kind: DomainKind) {
        let t = Instant::now();
        let (c, vm, _) = running_vm(db, "3.3", "commit1", kind).await;
        let taken = memory_snapshot_then_stop(&c, &vm).await;
        c.preview(&vm, &taken.snapshot_id, true).await;
        c.commit(&vm).await;
        let snaps = c.list_snapshots(&vm).await;
        assert!(
            !snaps.iter().any(|s| s.r#type() == pb::SnapshotType::Preview),
            "a PREVIEW snapshot is left after the commit: {snaps:?}"
        );
        let committed = c.snapshot(&vm, &taken.snapshot_id).await;
        assert_eq!(committed.status(), pb::SnapshotStatus::Ok, "{committed:?}");
        let active = c.active_snapshot(&vm).await;
        assert!(
            active.has_memory,
            "after the commit the ACTIVE snapshot has no memory: {snaps:?}"
        );
        c.assert_memory_volumes(&active).await;
        c.assert_no_orphans().await;
        let run = c.run_vm(&vm, false).await;
        c.assert_restored(&vm, &run, &taken).await;
        run.assert_started_as(VmStatus::RestoringState);
        c.stop_vm(&vm).await;
        c.assert_no_orphans().await;
        eprintln!("[commit1] passed in {:.1}s", t.elapsed().as_secs_f64());
    }

    /// Commit to snapshot, test case 2: preview without 'Restore Memory';
    /// commit; the active snapshot has no memory; run: 'powering up' then
    /// 'up'; a fresh boot.
    pub async fn commit_2(db: Db, kind: DomainKind) {
        let t = Instant::now();
        let (c, vm, token) = running_vm(db, "3.3", "commit2", kind).await;
        let taken = memory_snapshot_then_stop(&c, &vm).await;
        c.preview(&vm, &taken.snapshot_id, false).await;
        c.commit(&vm).await;
        let snaps = c.list_snapshots(&vm).await;
        assert!(
            !snaps.iter().any(|s| s.r#type() == pb::SnapshotType::Preview),
            "a PREVIEW snapshot is left after the commit: {snaps:?}"
        );
        assert!(
            !c.active_snapshot(&vm).await.has_memory,
            "after the commit the ACTIVE snapshot has memory: {snaps:?}"
        );
        c.assert_no_orphans().await;
        let run = c.run_vm(&vm, false).await;
        c.assert_booted(&vm, &run, &[&token]).await;
        run.assert_started_as(VmStatus::PoweringUp);
        c.stop_vm(&vm).await;
        c.assert_no_orphans().await;
        eprintln!("[commit2] passed in {:.1}s", t.elapsed().as_secs_f64());
    }

    /// Run VM, test case 1: preview with 'Restore Memory'; commit; run:
    /// restored; stop; run again: 'powering up' then 'up', a fresh boot (the
    /// memory is used by the first run only).
    pub async fn run_1(db: Db, kind: DomainKind) {
        let t = Instant::now();
        let (c, vm, token) = running_vm(db, "3.3", "run1", kind).await;
        let taken = memory_snapshot_then_stop(&c, &vm).await;
        c.preview(&vm, &taken.snapshot_id, true).await;
        c.commit(&vm).await;
        let run = c.run_vm(&vm, false).await;
        c.assert_restored(&vm, &run, &taken).await;
        run.assert_started_as(VmStatus::RestoringState);
        assert!(
            !c.active_snapshot(&vm).await.has_memory,
            "the ACTIVE snapshot keeps the memory after a run that restored it"
        );
        assert!(
            c.snapshot(&vm, &taken.snapshot_id).await.has_memory,
            "the snapshot lost its memory when the active one was restored from it"
        );
        c.stop_vm(&vm).await;
        c.assert_no_orphans().await;
        let run = c.run_vm(&vm, false).await;
        c.assert_booted(&vm, &run, &[&token]).await;
        run.assert_started_as(VmStatus::PoweringUp);
        c.stop_vm(&vm).await;
        c.assert_no_orphans().await;
        eprintln!("[run1] passed in {:.1}s", t.elapsed().as_secs_f64());
    }

    /// Run VM, test case 2: preview with 'Restore Memory'; commit; run
    /// stateless: restored; stop; run again: restored again (stopping a
    /// stateless run goes back to the state it was run from, memory
    /// included).
    pub async fn run_2(db: Db, kind: DomainKind) {
        let t = Instant::now();
        let (c, vm, _) = running_vm(db, "3.3", "run2", kind).await;
        let taken = memory_snapshot_then_stop(&c, &vm).await;
        c.preview(&vm, &taken.snapshot_id, true).await;
        c.commit(&vm).await;
        let run = c.run_vm(&vm, true).await;
        c.assert_restored(&vm, &run, &taken).await;
        run.assert_started_as(VmStatus::RestoringState);
        c.wait_counter(
            &vm,
            run.console_offset,
            taken.counter_after + 2 * TICKS_AFTER_SNAPSHOT,
        )
        .await;
        c.stop_vm(&vm).await;
        let snaps = c.list_snapshots(&vm).await;
        assert!(
            !snaps.iter().any(|s| s.r#type() == pb::SnapshotType::Stateless),
            "a STATELESS snapshot is left after the stateless run stopped: {snaps:?}"
        );
        assert!(
            c.active_snapshot(&vm).await.has_memory,
            "after a stateless run stopped, the ACTIVE snapshot has no memory to restore: {snaps:?}"
        );
        c.assert_no_orphans().await;
        let run = c.run_vm(&vm, false).await;
        c.assert_restored(&vm, &run, &taken).await;
        run.assert_started_as(VmStatus::RestoringState);
        c.stop_vm(&vm).await;
        c.assert_no_orphans().await;
        eprintln!("[run2] passed in {:.1}s", t.elapsed().as_secs_f64());
    }
}

/// Beyond the spec: after a commit with memory, removing the committed
/// snapshot merges its volume into the active one's and keeps the memory
/// the active snapshot shares; the next run still restores it.
#[tokio::test(flavor = "multi_thread")]
async fn remove_snapshot_sharing_the_active_memory_keeps_it_restorable() {
    use ramsnap_e2e::cluster::{Db, DomainKind};
    let t = Instant::now();
    let c = Cluster::start(Db::Sqlite, "3.3", "rmshared").await;
    let vm = c.create_vm("vm-rmshared", DomainKind::Block).await;
    c.boot(&vm).await;
    let taken = c.take_snapshot(&vm, true, "rmshared with memory").await;
    c.wait_counter(&vm, 0, taken.counter_after + TICKS_AFTER_SNAPSHOT)
        .await;
    c.stop_vm(&vm).await;
    c.preview(&vm, &taken.snapshot_id, true).await;
    c.commit(&vm).await;
    c.remove_snapshot(&vm, &taken.snapshot_id).await;
    let snaps = c.list_snapshots(&vm).await;
    assert_eq!(snaps.len(), 1, "only the active snapshot is left: {snaps:?}");
    assert!(
        snaps[0].has_memory,
        "the active snapshot keeps the memory: {snaps:?}"
    );
    c.assert_no_orphans().await;
    let run = c.run_vm(&vm, false).await;
    c.assert_restored(&vm, &run, &taken).await;
    run.assert_started_as(VmStatus::RestoringState);
    c.stop_vm(&vm).await;
    c.assert_no_orphans().await;
    eprintln!("[rmshared] passed in {:.1}s", t.elapsed().as_secs_f64());
}

/// One test per case; `$flip` swaps each case's storage domain kind.
macro_rules! acceptance_tests {
    ($db:expr, $flip:expr) => {
        use super::cases;
        use ramsnap_e2e::cluster::{Db, DomainKind};

        fn kind(k: DomainKind) -> DomainKind {
            if $flip {
                k.other()
            } else {
                k
            }
        }

        const DB: Db = $db;

        #[tokio::test(flavor = "multi_thread")]
        async fn snapshot_creations_1_save_memory() {
            cases::snapshot_creation_1(DB, kind(DomainKind::File)).await;
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn snapshot_creations_2_without_memory() {
            cases::snapshot_creation_2(DB, kind(DomainKind::Block)).await;
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn snapshot_creations_3_cluster_below_3_3() {
            cases::snapshot_creation_3(DB, kind(DomainKind::File)).await;
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn preview_snapshot_1_restore_memory() {
            cases::preview_1(DB, kind(DomainKind::Block)).await;
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn preview_snapshot_2_without_memory() {
            cases::preview_2(DB, kind(DomainKind::File)).await;
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn preview_snapshot_3_cluster_below_3_3() {
            cases::preview_3(DB, kind(DomainKind::Block)).await;
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn commit_to_snapshot_1_restore_memory() {
            cases::commit_1(DB, kind(DomainKind::File)).await;
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn commit_to_snapshot_2_without_memory() {
            cases::commit_2(DB, kind(DomainKind::Block)).await;
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn run_vm_1_memory_restored_once() {
            cases::run_1(DB, kind(DomainKind::Block)).await;
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn run_vm_2_stateless_restores_every_run() {
            cases::run_2(DB, kind(DomainKind::File)).await;
        }
    };
}

mod sqlite {
    acceptance_tests!(Db::Sqlite, false);
}

mod postgres {
    acceptance_tests!(Db::Postgres, true);
}
