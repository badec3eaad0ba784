//! The repository's tests. Every test function runs twice: on SQLite (a file
//! in a temporary directory) and on PostgreSQL, in a database of its own
//! created through the server named by RAMSNAP_TEST_PG_URL and dropped after.

use ramsnap_snapshot::db::{
    Accepted, Backend, CompatibilityVersion, Database, DbError, MemoryVolume, NewCluster, NewHost,
    NewOperation, NewReplica, NewSaga, NewSnapshot, NewVm, OperationState, PendingEvent, SagaNodeEventType,
    SagaState, Snapshot, SnapshotDisk, SnapshotStatus, SnapshotType, VmDisk, VmSnapshotState, VmStatus,
    VolumeRef,
};
use serde_json::json;
use sqlx::Executor;
use std::future::Future;
use std::time::Duration;
use uuid::Uuid;

const PG_URL_VAR: &str = "RAMSNAP_TEST_PG_URL";

async fn on_sqlite<F, Fut>(test: F)
where
    F: FnOnce(Database) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite:{}", dir.path().join("ramsnap.db").display());
    let db = Database::connect(&url).await.expect("open SQLite database");
    assert_eq!(db.backend(), Backend::Sqlite);
    db.migrate().await.expect("migrate");
    test(db.clone()).await;
    db.close().await;
}

async fn on_postgres<F, Fut>(test: F)
where
    F: FnOnce(Database) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let server_url = std::env::var(PG_URL_VAR).unwrap_or_else(|_| {
        panic!(
            "{PG_URL_VAR} is not set, so the PostgreSQL variant of this test cannot run. Start PostgreSQL \
             with `bash scripts/setup/postgres.sh` and run the tests with \
             {PG_URL_VAR}=postgres://ramsnap:ramsnap@127.0.0.1:5432/ramsnap"
        )
    });
    let admin = Database::connect(&server_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {server_url} ({PG_URL_VAR}): {e}"));
    let name = format!("rs_test_{}", Uuid::new_v4().simple());
    admin
        .pool()
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .expect("create test database");

    let db = Database::connect(&with_database(&server_url, &name))
        .await
        .expect("open test database");
    assert_eq!(db.backend(), Backend::Postgres);
    db.migrate().await.expect("migrate");
    // Run the test as a task so that a failing test still drops its database.
    let outcome = tokio::spawn(test(db.clone())).await;
    db.close().await;
    admin
        .pool()
        .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .await
        .expect("drop test database");
    admin.close().await;
    if let Err(err) = outcome {
        std::panic::resume_unwind(err.into_panic());
    }
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    format!("{server}/{name}{query}")
}

/// Declares each test once per backend: `sqlite::NAME` and `postgres::NAME`.
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    crate::on_sqlite(crate::$name).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    crate::on_postgres(crate::$name).await
                }
            )+
        }
    };
}

on_both_backends!(
    migrations_apply_twice,
    cluster_crud,
    vm_crud,
    vm_disks,
    snapshot_crud,
    memory_round_trip_and_remove,
    memory_reference_counting,
    snapshot_by_vm_type_status,
    one_active_snapshot_per_vm,
    vm_lock,
    vm_lock_and_progress_of_a_stale_saga_owner,
    operation_request_id,
    operation_progress_and_finish,
    saga_node_events_are_idempotent,
    unfinished_sagas,
    replica_leases,
    not_found_and_foreign_keys,
    hosts_crud,
    operation_cancel_and_warnings,
    create_vm_with_active_is_idempotent,
    snapshot_taken_is_idempotent,
    snapshot_taken_on_active_finds_the_vms_active,
    preview_then_undo,
    preview_then_commit,
    preview_refusals_roll_back,
    stateless_begin_and_end,
    remove_snapshot_row_and_memory_references,
    repoint_snapshot_disks_after_merge,
    operation_fingerprints_and_completed_requests,
    saga_volume_claims,
    vm_using_image,
    concurrent_write_transactions,
    accept_operation_is_one_transaction,
    finish_saga_ends_log_operation_and_saga_together,
    concurrent_log_appends_are_each_answered,
    snapshot_types_and_active_id,
    suspended_is_down_with_a_flag,
    active_disks_with_capacity,
    cached_hosts_and_clusters_go_with_their_delete,
    vm_with_snapshot_state,
);

// ---- fixtures ----

async fn cluster(db: &Database, version: &str) -> NewCluster {
    let new = NewCluster {
        id: Uuid::new_v4(),
        name: format!("cluster-{}", Uuid::new_v4().simple()),
        compatibility_version: version.parse().unwrap(),
    };
    db.create_cluster(&new).await.unwrap();
    new
}

fn new_vm(cluster_id: Uuid) -> NewVm {
    NewVm {
        id: Uuid::new_v4(),
        name: format!("vm-{}", Uuid::new_v4().simple()),
        cluster_id,
        memory_bytes: 1 << 30,
        vcpus: 2,
        stateless: false,
        disk_domain_id: Uuid::new_v4(),
        kernel: String::new(),
        initrd: String::new(),
        cmdline: String::new(),
    }
}

async fn vm(db: &Database) -> NewVm {
    let cluster = cluster(db, "3.3").await;
    let new = new_vm(cluster.id);
    db.create_vm(&new).await.unwrap();
    new
}

fn new_snapshot(vm_id: Uuid, snapshot_type: SnapshotType, memory: Option<MemoryVolume>) -> NewSnapshot {
    NewSnapshot {
        id: Uuid::new_v4(),
        vm_id,
        snapshot_type,
        status: SnapshotStatus::Ok,
        description: "before upgrade".into(),
        memory,
    }
}

fn volume() -> VolumeRef {
    VolumeRef {
        domain_id: Uuid::new_v4(),
        image_id: Uuid::new_v4(),
        volume_id: Uuid::new_v4(),
    }
}

fn memory() -> MemoryVolume {
    MemoryVolume {
        dump: volume(),
        metadata: volume(),
    }
}

async fn operation(db: &Database, vm_id: Option<Uuid>) -> Uuid {
    let new = NewOperation {
        id: Uuid::new_v4(),
        kind: "snapshot_create".into(),
        vm_id,
        request_id: None,
        warnings: Vec::new(),
    };
    db.create_operation(&new).await.unwrap().id
}

// ---- tests ----

async fn migrations_apply_twice(db: Database) {
    // The harness has migrated once already.
    db.migrate().await.unwrap();
    db.migrate().await.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(db.pool())
        .await
        .unwrap();
    let on_disk = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "sql"))
        .count();
    assert_eq!(applied, on_disk as i64);
    assert!(db.list_clusters().await.unwrap().is_empty());
}

async fn cluster_crud(db: Database) {
    let old = cluster(&db, "3.2").await;
    let new = cluster(&db, "3.3").await;
    let newer = cluster(&db, "4.10").await;

    let got = db.get_cluster(new.id).await.unwrap();
    assert_eq!(got.name, new.name);
    assert_eq!(got.compatibility_version, CompatibilityVersion::new(3, 3));
    assert!(got.compatibility_version.supports_memory_snapshots());
    assert!(got.created_at > 0);
    assert_eq!(db.list_clusters().await.unwrap().len(), 3);

    let below: Vec<Uuid> = db
        .clusters_below_version(CompatibilityVersion::MEMORY_SNAPSHOTS)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(below, vec![old.id]);
    let below_5: Vec<Uuid> = db
        .clusters_below_version("5.0".parse().unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(below_5.len(), 3);
    assert!(below_5.contains(&newer.id));

    let same_name = NewCluster {
        id: Uuid::new_v4(),
        ..old.clone()
    };
    let err = db.create_cluster(&same_name).await.unwrap_err();
    assert!(
        matches!(err, DbError::Conflict { kind: "cluster", .. }),
        "{err:?}"
    );
    assert!("3".parse::<CompatibilityVersion>().is_err());
}

async fn vm_crud(db: Database) {
    let cluster = cluster(&db, "3.3").await;
    let mut new = new_vm(cluster.id);
    new.stateless = true;
    new.memory_bytes = 3 << 40;
    let created = db.create_vm(&new).await.unwrap();
    let got = db.get_vm(new.id).await.unwrap();
    assert_eq!(got, created);
    assert_eq!(got.status, VmStatus::Down);
    assert!(got.stateless);
    assert_eq!(got.memory_bytes, 3 << 40);
    assert_eq!(got.vcpus, 2);
    assert_eq!(got.host_id, None);
    assert_eq!(got.lock_operation_id, None);
    assert_eq!(got.kernel, "");
    assert_eq!(db.get_vm_by_name(&new.name).await.unwrap().id, new.id);

    // Direct boot images and command line.
    let other = NewVm {
        kernel: "vmlinuz-6.1".into(),
        initrd: "initrd-6.1.img".into(),
        cmdline: "console=ttyS0 root=/dev/vda1".into(),
        ..new_vm(cluster.id)
    };
    let created = db.create_vm(&other).await.unwrap();
    let got = db.get_vm(other.id).await.unwrap();
    assert_eq!(got, created);
    assert!(!got.stateless);
    assert_eq!(
        (got.kernel.as_str(), got.initrd.as_str(), got.cmdline.as_str()),
        ("vmlinuz-6.1", "initrd-6.1.img", "console=ttyS0 root=/dev/vda1")
    );
    let listed = db.list_vms().await.unwrap();
    assert_eq!(listed.iter().find(|v| v.id == other.id), Some(&got));
    assert_eq!(db.list_vms().await.unwrap().len(), 2);
    assert_eq!(db.list_vms_in_cluster(cluster.id).await.unwrap().len(), 2);

    for status in VmStatus::ALL {
        db.set_vm_status(new.id, *status).await.unwrap();
        assert_eq!(db.get_vm(new.id).await.unwrap().status, *status);
    }
    db.set_vm_status(new.id, VmStatus::Down).await.unwrap();
    assert!(db
        .transition_vm_status(new.id, VmStatus::Down, VmStatus::PoweringUp)
        .await
        .unwrap());
    assert!(!db
        .transition_vm_status(new.id, VmStatus::Down, VmStatus::Up)
        .await
        .unwrap());
    assert_eq!(db.get_vm(new.id).await.unwrap().status, VmStatus::PoweringUp);

    let host = Uuid::new_v4();
    db.set_vm_host(new.id, Some(host)).await.unwrap();
    assert_eq!(db.get_vm(new.id).await.unwrap().host_id, Some(host));
    db.set_vm_host(new.id, None).await.unwrap();
    assert_eq!(db.get_vm(new.id).await.unwrap().host_id, None);

    let dup = NewVm {
        id: Uuid::new_v4(),
        ..new.clone()
    };
    assert!(matches!(
        db.create_vm(&dup).await.unwrap_err(),
        DbError::Conflict { kind: "vm", .. }
    ));

    // Deleting the VM takes its snapshots along.
    let snap = new_snapshot(new.id, SnapshotType::Active, None);
    db.create_snapshot(&snap, &[]).await.unwrap();
    assert!(db.delete_vm(new.id).await.unwrap());
    assert!(!db.delete_vm(new.id).await.unwrap());
    assert!(db.get_vm(new.id).await.unwrap_err().is_not_found());
    assert!(db.get_snapshot(snap.id).await.unwrap_err().is_not_found());
    assert_eq!(db.list_vms().await.unwrap().len(), 1);
}

async fn vm_disks(db: Database) {
    let vm = vm(&db).await;
    let disks: Vec<VmDisk> = (0..2)
        .map(|_| VmDisk {
            vm_id: vm.id,
            disk_id: Uuid::new_v4(),
            domain_id: vm.disk_domain_id,
            image_id: Uuid::new_v4(),
            capacity_bytes: 10 << 30,
        })
        .collect();
    for disk in &disks {
        db.add_vm_disk(disk).await.unwrap();
    }
    let mut expected = disks.clone();
    expected.sort_by_key(|d| d.disk_id.to_string());
    assert_eq!(db.vm_disks(vm.id).await.unwrap(), expected);
    assert!(matches!(
        db.add_vm_disk(&disks[0]).await.unwrap_err(),
        DbError::Conflict { .. }
    ));
    assert!(db.remove_vm_disk(vm.id, disks[0].disk_id).await.unwrap());
    assert!(!db.remove_vm_disk(vm.id, disks[0].disk_id).await.unwrap());
    assert_eq!(db.vm_disks(vm.id).await.unwrap(), vec![disks[1].clone()]);
}

async fn snapshot_crud(db: Database) {
    let vm = vm(&db).await;
    let disks: Vec<SnapshotDisk> = (0..3)
        .map(|_| SnapshotDisk {
            disk_id: Uuid::new_v4(),
            volume: volume(),
        })
        .collect();
    let active = new_snapshot(vm.id, SnapshotType::Active, None);
    let created = db.create_snapshot(&active, &disks).await.unwrap();
    assert_eq!(db.get_snapshot(active.id).await.unwrap(), created);
    assert_eq!(created.memory, None);
    let mut expected = disks.clone();
    expected.sort_by_key(|d| d.disk_id.to_string());
    assert_eq!(db.snapshot_disks(active.id).await.unwrap(), expected);

    let regular = new_snapshot(vm.id, SnapshotType::Regular, None);
    db.create_snapshot(&regular, &[]).await.unwrap();
    let extra = SnapshotDisk {
        disk_id: Uuid::new_v4(),
        volume: volume(),
    };
    db.add_snapshot_disk(regular.id, &extra).await.unwrap();
    assert_eq!(db.snapshot_disks(regular.id).await.unwrap(), vec![extra]);
    assert!(matches!(
        db.add_snapshot_disk(regular.id, &extra).await.unwrap_err(),
        DbError::Conflict { .. }
    ));

    let listed = db.list_snapshots(vm.id).await.unwrap();
    assert_eq!(listed.len(), 2);
    // Listed snapshots come with their disks, in disk id order.
    let listed_active = listed.iter().find(|s| s.id == active.id).unwrap();
    assert_eq!(listed_active.disks, expected);
    assert_eq!(listed_active, &created);
    let listed_regular = listed.iter().find(|s| s.id == regular.id).unwrap();
    assert_eq!(listed_regular.disks, vec![extra]);
    assert_eq!(db.get_snapshot(regular.id).await.unwrap().disks, vec![extra]);
    assert_eq!(db.active_snapshot(vm.id).await.unwrap(), created);

    db.set_snapshot_status(regular.id, SnapshotStatus::Locked)
        .await
        .unwrap();
    db.set_snapshot_type(regular.id, SnapshotType::Stateless)
        .await
        .unwrap();
    let got = db.get_snapshot(regular.id).await.unwrap();
    assert_eq!(
        (got.snapshot_type, got.status),
        (SnapshotType::Stateless, SnapshotStatus::Locked)
    );

    // A failed transaction leaves nothing behind: the duplicate disk id
    // fails the second insert, so the snapshot row is rolled back too.
    let bad = new_snapshot(vm.id, SnapshotType::Regular, Some(memory()));
    let dup_disks = [disks[0], disks[0]];
    assert!(matches!(
        db.create_snapshot(&bad, &dup_disks).await.unwrap_err(),
        DbError::Conflict { .. }
    ));
    assert!(db.get_snapshot(bad.id).await.unwrap_err().is_not_found());

    assert!(db.delete_snapshot(active.id).await.unwrap());
    assert!(!db.delete_snapshot(active.id).await.unwrap());
    assert!(db.snapshot_disks(active.id).await.unwrap().is_empty());
    assert_eq!(db.list_snapshots(vm.id).await.unwrap().len(), 1);
}

async fn memory_round_trip_and_remove(db: Database) {
    let vm = vm(&db).await;
    let mem = memory();
    let snap = new_snapshot(vm.id, SnapshotType::Regular, Some(mem));
    db.create_snapshot(&snap, &[]).await.unwrap();
    let got = db.get_snapshot(snap.id).await.unwrap();
    assert_eq!(got.memory, Some(mem));
    assert_ne!(mem.dump, mem.metadata);

    db.remove_memory(snap.id).await.unwrap();
    assert_eq!(db.get_snapshot(snap.id).await.unwrap().memory, None);
    // Removing again is harmless.
    db.remove_memory(snap.id).await.unwrap();

    // Preview with memory: the snapshot gets a memory volume back.
    let other = memory();
    db.set_memory(snap.id, &other).await.unwrap();
    assert_eq!(db.get_snapshot(snap.id).await.unwrap().memory, Some(other));

    // The schema refuses half a memory volume.
    let half = sqlx::query("UPDATE snapshots SET memory_meta_volume_id = NULL WHERE id = $1")
        .bind(snap.id.to_string())
        .execute(db.pool())
        .await;
    assert!(
        half.is_err(),
        "a memory volume without its metadata volume was accepted"
    );
}

async fn memory_reference_counting(db: Database) {
    let vm = vm(&db).await;
    let shared = memory();
    let regular = new_snapshot(vm.id, SnapshotType::Regular, Some(shared));
    db.create_snapshot(&regular, &[]).await.unwrap();
    // After a preview with memory, the active snapshot points at the same volume.
    let active = new_snapshot(vm.id, SnapshotType::Active, Some(shared));
    db.create_snapshot(&active, &[]).await.unwrap();
    let unrelated = new_snapshot(vm.id, SnapshotType::Regular, Some(memory()));
    db.create_snapshot(&unrelated, &[]).await.unwrap();
    db.create_snapshot(&new_snapshot(vm.id, SnapshotType::Regular, None), &[])
        .await
        .unwrap();

    let refs = |db: Database| async move {
        let mut ids: Vec<Uuid> = db
            .snapshots_referencing_memory(shared.dump.volume_id)
            .await
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect();
        ids.sort();
        ids
    };
    let mut both = vec![regular.id, active.id];
    both.sort();
    assert_eq!(refs(db.clone()).await, both);

    // Running the VM clears the active snapshot's memory: one reference left,
    // so the volume must stay.
    db.remove_memory(active.id).await.unwrap();
    assert_eq!(refs(db.clone()).await, vec![regular.id]);
    // Removing the regular snapshot drops the last reference: now it may go.
    db.delete_snapshot(regular.id).await.unwrap();
    assert!(refs(db.clone()).await.is_empty());
    assert!(db
        .snapshots_referencing_memory(shared.metadata.volume_id)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        db.snapshots_referencing_memory(unrelated.memory.unwrap().dump.volume_id)
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn snapshot_by_vm_type_status(db: Database) {
    let vm = vm(&db).await;
    let other_vm = {
        let v = new_vm(db.get_vm(vm.id).await.unwrap().cluster_id);
        db.create_vm(&v).await.unwrap();
        v
    };
    assert_eq!(
        db.snapshot_by_vm_type_status(vm.id, SnapshotType::Active, SnapshotStatus::Ok)
            .await
            .unwrap(),
        None
    );
    let active = new_snapshot(vm.id, SnapshotType::Active, None);
    db.create_snapshot(&active, &[]).await.unwrap();
    let mut in_preview = new_snapshot(vm.id, SnapshotType::Regular, Some(memory()));
    in_preview.status = SnapshotStatus::InPreview;
    db.create_snapshot(&in_preview, &[]).await.unwrap();
    let preview = new_snapshot(vm.id, SnapshotType::Preview, None);
    db.create_snapshot(&preview, &[]).await.unwrap();
    db.create_snapshot(&new_snapshot(other_vm.id, SnapshotType::Active, None), &[])
        .await
        .unwrap();

    let found = |t, s| {
        let db = db.clone();
        async move {
            db.snapshot_by_vm_type_status(vm.id, t, s)
                .await
                .unwrap()
                .map(|s| s.id)
        }
    };
    assert_eq!(
        found(SnapshotType::Active, SnapshotStatus::Ok).await,
        Some(active.id)
    );
    assert_eq!(
        found(SnapshotType::Regular, SnapshotStatus::InPreview).await,
        Some(in_preview.id)
    );
    assert_eq!(
        found(SnapshotType::Preview, SnapshotStatus::Ok).await,
        Some(preview.id)
    );
    assert_eq!(found(SnapshotType::Regular, SnapshotStatus::Ok).await, None);
    assert_eq!(found(SnapshotType::Active, SnapshotStatus::Locked).await, None);
    let got = db
        .snapshot_by_vm_type_status(vm.id, SnapshotType::Regular, SnapshotStatus::InPreview)
        .await;
    assert!(got.unwrap().unwrap().memory.is_some());
    assert_eq!(
        db.snapshot_by_vm_type(vm.id, SnapshotType::Active)
            .await
            .unwrap()
            .map(|s| s.id),
        Some(active.id)
    );
}

async fn one_active_snapshot_per_vm(db: Database) {
    let vm = vm(&db).await;
    let first = new_snapshot(vm.id, SnapshotType::Active, None);
    db.create_snapshot(&first, &[]).await.unwrap();
    let second = new_snapshot(vm.id, SnapshotType::Active, None);
    let err = db.create_snapshot(&second, &[]).await.unwrap_err();
    assert!(
        matches!(err, DbError::Conflict { kind: "snapshot", .. }),
        "{err:?}"
    );

    // Preview: the active snapshot becomes PREVIEW, then a new ACTIVE one is made.
    db.set_snapshot_type(first.id, SnapshotType::Preview)
        .await
        .unwrap();
    db.create_snapshot(&second, &[]).await.unwrap();
    let err = db
        .set_snapshot_type(first.id, SnapshotType::Active)
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
}

async fn vm_lock(db: Database) {
    let vm = vm(&db).await;
    let first = operation(&db, Some(vm.id)).await;
    let second = operation(&db, Some(vm.id)).await;

    db.try_lock_vm(vm.id, first).await.unwrap();
    assert_eq!(db.get_vm(vm.id).await.unwrap().lock_operation_id, Some(first));
    // A replayed lock step of the holder succeeds.
    db.try_lock_vm(vm.id, first).await.unwrap();
    match db.try_lock_vm(vm.id, second).await {
        Err(DbError::VmLocked { vm_id, holder }) => {
            assert_eq!(vm_id, vm.id);
            assert_eq!(holder, first);
        }
        other => panic!("second locker got {other:?}"),
    }
    // Only the holder releases it.
    assert!(!db.unlock_vm(vm.id, second).await.unwrap());
    assert!(db.unlock_vm(vm.id, first).await.unwrap());
    assert!(!db.unlock_vm(vm.id, first).await.unwrap());
    assert_eq!(db.get_vm(vm.id).await.unwrap().lock_operation_id, None);

    db.try_lock_vm(vm.id, second).await.unwrap();
    assert_eq!(db.get_vm(vm.id).await.unwrap().lock_operation_id, Some(second));

    assert!(db
        .try_lock_vm(Uuid::new_v4(), first)
        .await
        .unwrap_err()
        .is_not_found());
    // The holder must be a recorded operation.
    let other = self::vm(&db).await;
    let err = db.try_lock_vm(other.id, Uuid::new_v4()).await.unwrap_err();
    assert!(matches!(err, DbError::ForeignKey { .. }), "{err:?}");
}

/// The writes a saga's nodes make outside its log (the VM lock, progress)
/// are conditional on its owner generation: once another replica adopted
/// the saga, the old owner's are refused and change nothing.
async fn vm_lock_and_progress_of_a_stale_saga_owner(db: Database) {
    let vm = vm(&db).await;
    let op = operation(&db, Some(vm.id)).await;
    let saga = NewSaga {
        id: Uuid::new_v4(),
        name: "toy".into(),
        params: json!({}),
        owner: Uuid::new_v4().to_string(),
        operation_id: Some(op),
    };
    db.create_saga(&saga).await.unwrap();
    let old = (saga.id, 0);
    db.for_saga(old).try_lock_vm(vm.id, op).await.unwrap();
    db.for_saga(old)
        .update_operation_progress(op, 1, 4)
        .await
        .unwrap();

    let adopter = Uuid::new_v4();
    let adopted = db.adopt_sagas(adopter, true).await.unwrap();
    assert_eq!(adopted.len(), 1);
    let new = (saga.id, adopted[0].generation);
    assert_ne!(new, old);

    let stale = |e: DbError| matches!(e, DbError::StaleOwner { saga: s, .. } if s == saga.id);
    let e = db.for_saga(old).unlock_vm(vm.id, op).await.unwrap_err();
    assert!(stale(e));
    assert_eq!(db.get_vm(vm.id).await.unwrap().lock_operation_id, Some(op));
    let e = db
        .for_saga(old)
        .update_operation_progress(op, 3, 4)
        .await
        .unwrap_err();
    assert!(stale(e));
    assert_eq!(db.get_operation(op).await.unwrap().progress_processed, 1);

    // The adopter's go through; then the old owner cannot lock again.
    db.for_saga(new)
        .update_operation_progress(op, 2, 4)
        .await
        .unwrap();
    assert!(db.for_saga(new).unlock_vm(vm.id, op).await.unwrap());
    let e = db.for_saga(old).try_lock_vm(vm.id, op).await.unwrap_err();
    assert!(stale(e));
    assert_eq!(db.get_vm(vm.id).await.unwrap().lock_operation_id, None);
    // The saga's handle fences every write: single statements and
    // transactions alike; the owner's go through.
    let stale_db = db.for_saga(old);
    let before = db.get_vm(vm.id).await.unwrap().status;
    assert!(stale(
        stale_db.set_vm_status(vm.id, VmStatus::Up).await.unwrap_err()
    ));
    assert!(stale(
        stale_db
            .transition_vm_status(vm.id, before, VmStatus::ImageLocked)
            .await
            .unwrap_err()
    ));
    assert_eq!(db.get_vm(vm.id).await.unwrap().status, before);
    let snap = new_snapshot(vm.id, SnapshotType::Regular, None);
    assert!(stale(stale_db.create_snapshot(&snap, &[]).await.unwrap_err()));
    assert!(db.get_snapshot(snap.id).await.unwrap_err().is_not_found());
    let owner_db = db.for_saga(new);
    owner_db.set_vm_status(vm.id, VmStatus::Up).await.unwrap();
    owner_db.create_snapshot(&snap, &[]).await.unwrap();
    assert_eq!(db.get_vm(vm.id).await.unwrap().status, VmStatus::Up);
    // Repeats by the owner stay harmless.
    assert!(!db.for_saga(new).unlock_vm(vm.id, op).await.unwrap());
    db.for_saga(new).try_lock_vm(vm.id, op).await.unwrap();
    assert_eq!(db.get_vm(vm.id).await.unwrap().lock_operation_id, Some(op));
}

async fn operation_request_id(db: Database) {
    let vm = vm(&db).await;
    let new = NewOperation {
        id: Uuid::new_v4(),
        kind: "snapshot_create".into(),
        vm_id: Some(vm.id),
        request_id: Some("req-1".into()),
        warnings: Vec::new(),
    };
    let created = db.create_operation(&new).await.unwrap();
    assert_eq!(created.state, OperationState::Running);
    assert_eq!(db.get_operation(new.id).await.unwrap(), created);
    assert_eq!(
        db.get_operation_by_request_id("req-1").await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(db.get_operation_by_request_id("req-2").await.unwrap(), None);

    // The same request id never makes a second operation.
    let retry = NewOperation {
        id: Uuid::new_v4(),
        ..new.clone()
    };
    let err = db.create_operation(&retry).await.unwrap_err();
    assert!(
        matches!(
            err,
            DbError::Conflict {
                kind: "operation",
                ..
            }
        ),
        "{err:?}"
    );
    let (existing, created_now) = db.ensure_operation(&retry).await.unwrap();
    assert!(!created_now);
    assert_eq!(existing.id, new.id);
    let reused = NewOperation {
        id: Uuid::new_v4(),
        kind: "snapshot_remove".into(),
        ..new.clone()
    };
    assert!(matches!(
        db.ensure_operation(&reused).await.unwrap_err(),
        DbError::Conflict { .. }
    ));

    let fresh = NewOperation {
        id: Uuid::new_v4(),
        request_id: Some("req-2".into()),
        ..new.clone()
    };
    let (op, created_now) = db.ensure_operation(&fresh).await.unwrap();
    assert!(created_now);
    assert_eq!(op.id, fresh.id);

    // Operations without request ids do not collide with each other.
    operation(&db, None).await;
    operation(&db, None).await;
    assert_eq!(db.list_operations(None).await.unwrap().len(), 4);
    assert_eq!(db.list_operations(Some(vm.id)).await.unwrap().len(), 2);
}

async fn operation_progress_and_finish(db: Database) {
    let id = operation(&db, None).await;
    db.update_operation_progress(id, 512, 1024).await.unwrap();
    let op = db.get_operation(id).await.unwrap();
    assert_eq!((op.progress_processed, op.progress_total), (512, 1024));
    assert!(op.updated_at >= op.created_at);

    let result = json!({"snapshot_id": Uuid::new_v4().to_string(), "memory": true});
    db.finish_operation(id, OperationState::Succeeded, None, Some(&result))
        .await
        .unwrap();
    // Replayed: fine. Changing the outcome: refused.
    db.finish_operation(id, OperationState::Succeeded, None, Some(&result))
        .await
        .unwrap();
    let err = db
        .finish_operation(id, OperationState::Failed, Some("late"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    let op = db.get_operation(id).await.unwrap();
    assert_eq!(op.state, OperationState::Succeeded);
    assert_eq!(op.result, Some(result));
    assert_eq!(op.error, None);

    let failed = operation(&db, None).await;
    db.finish_operation(failed, OperationState::Failed, Some("host went away"), None)
        .await
        .unwrap();
    let op = db.get_operation(failed).await.unwrap();
    assert_eq!(
        (op.state, op.error.as_deref(), op.result),
        (OperationState::Failed, Some("host went away"), None)
    );

    assert!(matches!(
        db.finish_operation(failed, OperationState::Running, None, None)
            .await
            .unwrap_err(),
        DbError::InvalidValue { .. }
    ));
    assert!(db
        .update_operation_progress(Uuid::new_v4(), 1, 2)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db
        .finish_operation(Uuid::new_v4(), OperationState::Cancelled, None, None)
        .await
        .unwrap_err()
        .is_not_found());
}

async fn saga_node_events_are_idempotent(db: Database) {
    let op = operation(&db, None).await;
    let new = NewSaga {
        id: Uuid::new_v4(),
        name: "snapshot_create".into(),
        params: json!({"vm_id": Uuid::new_v4().to_string(), "save_memory": true}),
        owner: "coordinator-1".into(),
        operation_id: Some(op),
    };
    let saga = db.create_saga(&new).await.unwrap();
    assert_eq!(db.get_saga(new.id).await.unwrap(), saga);
    assert_eq!(saga.state, SagaState::Running);

    let output = json!({"volume_id": Uuid::new_v4().to_string()});
    assert!(db
        .append_saga_node_event(saga.id, 0, (0, "lock_vm"), SagaNodeEventType::Started, None)
        .await
        .unwrap());
    assert!(db
        .append_saga_node_event(
            saga.id,
            0,
            (0, "lock_vm"),
            SagaNodeEventType::Succeeded,
            Some(&output)
        )
        .await
        .unwrap());
    // The same event twice: one row, and the first data wins.
    assert!(!db
        .append_saga_node_event(
            saga.id,
            0,
            (0, "lock_vm"),
            SagaNodeEventType::Succeeded,
            Some(&json!(1))
        )
        .await
        .unwrap());
    assert!(!db
        .append_saga_node_event(saga.id, 0, (0, "lock_vm"), SagaNodeEventType::Started, None)
        .await
        .unwrap());
    assert!(db
        .append_saga_node_event(saga.id, 0, (1, "overlays"), SagaNodeEventType::Started, None)
        .await
        .unwrap());
    assert!(db
        .append_saga_node_event(
            saga.id,
            0,
            (1, "overlays"),
            SagaNodeEventType::Failed,
            Some(&json!("boom"))
        )
        .await
        .unwrap());
    assert!(db
        .append_saga_node_event(saga.id, 0, (0, "lock_vm"), SagaNodeEventType::UndoStarted, None)
        .await
        .unwrap());
    assert!(db
        .append_saga_node_event(saga.id, 0, (0, "lock_vm"), SagaNodeEventType::UndoFinished, None)
        .await
        .unwrap());

    let events = db.saga_node_events(saga.id).await.unwrap();
    let seen: Vec<(u32, SagaNodeEventType)> = events.iter().map(|e| (e.node_id, e.event_type)).collect();
    assert_eq!(seen.len(), 6);
    // Each event names its node.
    for e in &events {
        assert_eq!(e.node_name.as_deref(), Some(node_name(e.node_id)), "{e:?}");
    }
    let position = |n, t| seen.iter().position(|e| *e == (n, t)).unwrap();
    assert!(position(0, SagaNodeEventType::Started) < position(0, SagaNodeEventType::Succeeded));
    assert!(position(0, SagaNodeEventType::UndoStarted) < position(0, SagaNodeEventType::UndoFinished));
    assert!(position(1, SagaNodeEventType::Started) < position(1, SagaNodeEventType::Failed));
    assert!(events.windows(2).all(|w| w[0].created_at <= w[1].created_at));
    let succeeded = events
        .iter()
        .find(|e| e.event_type == SagaNodeEventType::Succeeded)
        .unwrap();
    assert_eq!(succeeded.data, Some(output.clone()));

    let err = db
        .append_saga_node_event(
            Uuid::new_v4(),
            0,
            (0, "lock_vm"),
            SagaNodeEventType::Started,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::ForeignKey { .. }), "{err:?}");

    // A node's success and the next node's start in one commit: both rows,
    // in life-cycle order though they share a time; again, no new row.
    let saga = db
        .create_saga(&NewSaga {
            id: Uuid::new_v4(),
            ..new.clone()
        })
        .await
        .unwrap();
    for _ in 0..2 {
        db.append_saga_node_event(saga.id, 0, (0, "lock_vm"), SagaNodeEventType::Started, None)
            .await
            .unwrap();
        db.append_saga_node_events(
            saga.id,
            0,
            &[
                ev(0, SagaNodeEventType::Succeeded, Some(&output)),
                ev(1, SagaNodeEventType::Started, None),
            ],
        )
        .await
        .unwrap();
    }
    let events = db.saga_node_events(saga.id).await.unwrap();
    let seen: Vec<(u32, SagaNodeEventType)> = events.iter().map(|e| (e.node_id, e.event_type)).collect();
    assert_eq!(
        seen,
        vec![
            (0, SagaNodeEventType::Started),
            (0, SagaNodeEventType::Succeeded),
            (1, SagaNodeEventType::Started)
        ]
    );
    assert_eq!(events[1].data, Some(output));
    assert_eq!(events[1].created_at, events[2].created_at);
    let err = db
        .append_saga_node_events(
            Uuid::new_v4(),
            0,
            &[
                ev(0, SagaNodeEventType::Succeeded, None),
                ev(1, SagaNodeEventType::Started, None),
            ],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::ForeignKey { .. }), "{err:?}");
    // Nothing to append is no error (and no commit).
    db.append_saga_node_events(Uuid::new_v4(), 0, &[]).await.unwrap();
}

/// A name for the node at `id` (the log stores both).
fn node_name(id: u32) -> &'static str {
    ["lock_vm", "overlays", "record", "host", "commit", "unlock"]
        .get(id as usize)
        .copied()
        .unwrap_or("later")
}

fn ev(node_id: u32, event_type: SagaNodeEventType, data: Option<&serde_json::Value>) -> PendingEvent {
    PendingEvent {
        node_id,
        node_name: node_name(node_id),
        event_type,
        data: data.cloned(),
    }
}

async fn unfinished_sagas(db: Database) {
    let mut ids = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let new = NewSaga {
            id: Uuid::new_v4(),
            name: format!("saga_{name}"),
            params: json!({}),
            owner: "coordinator-1".into(),
            operation_id: None,
        };
        db.create_saga(&new).await.unwrap();
        ids.push(new.id);
    }
    db.set_saga_state(ids[1], 0, SagaState::Unwinding).await.unwrap();
    db.set_saga_state(ids[2], 0, SagaState::Done).await.unwrap();
    db.set_saga_state(ids[3], 0, SagaState::Abandoned).await.unwrap();

    let unfinished = db.list_unfinished_sagas().await.unwrap();
    let mut got: Vec<Uuid> = unfinished.iter().map(|s| s.id).collect();
    got.sort();
    let mut expected = vec![ids[0], ids[1]];
    expected.sort();
    assert_eq!(got, expected);

    // Adopted by another coordinator (all: the one coordinator of the
    // database): owner and generation change, and writes at the old
    // generation are refused, nothing changed.
    let me = Uuid::new_v4();
    let adopted = db.adopt_sagas(me, true).await.unwrap();
    let mut got: Vec<Uuid> = adopted.iter().map(|s| s.id).collect();
    got.sort();
    assert_eq!(got, expected);
    for s in &adopted {
        assert_eq!((s.owner.as_str(), s.generation), (me.to_string().as_str(), 1));
        assert_eq!(s.params, json!({}));
    }
    assert!(
        db.adopt_sagas(me, true).await.unwrap().is_empty(),
        "its own sagas stay"
    );
    let err = db.set_saga_state(ids[0], 0, SagaState::Done).await.unwrap_err();
    assert!(
        matches!(err, DbError::StaleOwner { generation: 0, .. }),
        "{err:?}"
    );
    let err = db
        .append_saga_node_events(ids[0], 0, &[ev(0, SagaNodeEventType::Started, None)])
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::StaleOwner { .. }), "{err:?}");
    assert!(db.saga_node_events(ids[0]).await.unwrap().is_empty());
    db.append_saga_node_events(ids[0], 1, &[ev(0, SagaNodeEventType::Started, None)])
        .await
        .unwrap();
    assert_eq!(db.get_saga(ids[0]).await.unwrap().state, SagaState::Running);
    assert!(db
        .set_saga_state(Uuid::new_v4(), 0, SagaState::Done)
        .await
        .unwrap_err()
        .is_not_found());
}

/// Replica leases by the database's clock: registered live, expired by
/// name or because the process is gone on this host, renewed; adoption
/// takes only the sagas of replicas without a live lease.
async fn replica_leases(db: Database) {
    let replica = |key: &str, pid: i64| NewReplica {
        id: Uuid::new_v4(),
        name: format!("host:{pid}"),
        local_key: key.into(),
        pid,
    };
    let me = replica("here", 1);
    let gone = replica("here", 2);
    let elsewhere = replica("there", 2);
    let alive = replica("here", 3);
    for r in [&me, &gone, &elsewhere, &alive] {
        db.register_replica(r, std::time::Duration::from_secs(60))
            .await
            .unwrap();
    }
    let live = |rs: &[ramsnap_snapshot::db::Replica], id: Uuid| rs.iter().find(|r| r.id == id).unwrap().live;
    let all = db.replicas().await.unwrap();
    assert_eq!(all.len(), 4);
    assert!(all.iter().all(|r| r.live), "{all:?}");

    // Sagas of each: none is adopted while its owner's lease runs.
    let mut sagas = Vec::new();
    for r in [&gone, &elsewhere, &alive] {
        let new = NewSaga {
            id: Uuid::new_v4(),
            name: "toy".into(),
            params: json!({}),
            owner: r.id.to_string(),
            operation_id: None,
        };
        db.create_saga(&new).await.unwrap();
        sagas.push(new.id);
    }
    assert!(db.adopt_sagas(me.id, false).await.unwrap().is_empty());

    // PID 2 is gone here: only the replica of this host and PID namespace
    // loses its lease (PID 2 elsewhere is another process).
    let expired = db
        .expire_gone_replicas(me.id, "here", &|pid| pid != 2)
        .await
        .unwrap();
    assert_eq!(expired.iter().map(|r| r.id).collect::<Vec<_>>(), vec![gone.id]);
    let all = db.replicas().await.unwrap();
    assert!(!live(&all, gone.id) && live(&all, elsewhere.id) && live(&all, alive.id) && live(&all, me.id));
    let adopted = db.adopt_sagas(me.id, false).await.unwrap();
    assert_eq!(adopted.iter().map(|s| s.id).collect::<Vec<_>>(), vec![sagas[0]]);
    assert_eq!(adopted[0].generation, 1);

    // A lease ended by name; its replica (thawed) cannot renew it, which
    // tells it to stop its sagas, and registers again: live again, but
    // what was adopted meanwhile stays adopted.
    db.expire_lease(alive.id).await.unwrap();
    let adopted = db.adopt_sagas(me.id, false).await.unwrap();
    assert_eq!(adopted.iter().map(|s| s.id).collect::<Vec<_>>(), vec![sagas[2]]);
    assert!(!db
        .renew_lease(alive.id, std::time::Duration::from_secs(60))
        .await
        .unwrap());
    assert!(!live(&db.replicas().await.unwrap(), alive.id));
    db.register_replica(&alive, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    assert!(db
        .renew_lease(alive.id, std::time::Duration::from_secs(60))
        .await
        .unwrap());
    assert!(live(&db.replicas().await.unwrap(), alive.id));
    assert_eq!(db.get_saga(sagas[2]).await.unwrap().owner, me.id.to_string());
    // A lease of 0 ms has run out at once; an unknown replica renews nothing.
    db.register_replica(&elsewhere, std::time::Duration::ZERO)
        .await
        .unwrap();
    assert!(!live(&db.replicas().await.unwrap(), elsewhere.id));
    assert!(!db
        .renew_lease(Uuid::new_v4(), std::time::Duration::from_secs(1))
        .await
        .unwrap());

    // Replicas long expired are forgotten, unless they still own an
    // unfinished saga (elsewhere's was never adopted).
    assert_eq!(
        db.forget_old_replicas(std::time::Duration::ZERO).await.unwrap(),
        1
    );
    let left: Vec<Uuid> = db.replicas().await.unwrap().iter().map(|r| r.id).collect();
    assert!(!left.contains(&gone.id), "{left:?}");
    for kept in [me.id, elsewhere.id, alive.id] {
        assert!(left.contains(&kept), "{left:?}");
    }
}

async fn not_found_and_foreign_keys(db: Database) {
    let missing = Uuid::new_v4();
    match db.get_vm(missing).await.unwrap_err() {
        DbError::NotFound { kind, id } => {
            assert_eq!(kind, "vm");
            assert_eq!(id, missing.to_string());
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(db.get_cluster(missing).await.unwrap_err().is_not_found());
    assert!(db.get_snapshot(missing).await.unwrap_err().is_not_found());
    assert!(db.get_operation(missing).await.unwrap_err().is_not_found());
    assert!(db.get_saga(missing).await.unwrap_err().is_not_found());
    assert!(db
        .set_vm_status(missing, VmStatus::Up)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db.set_vm_host(missing, None).await.unwrap_err().is_not_found());
    assert!(db
        .transition_vm_status(missing, VmStatus::Down, VmStatus::Up)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db
        .set_snapshot_status(missing, SnapshotStatus::Ok)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db
        .set_snapshot_type(missing, SnapshotType::Regular)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db.remove_memory(missing).await.unwrap_err().is_not_found());
    assert!(db
        .set_memory(missing, &memory())
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db.get_vm_by_name("nobody").await.unwrap_err().is_not_found());

    // A VM in a cluster that does not exist.
    let err = db.create_vm(&new_vm(missing)).await.unwrap_err();
    assert!(matches!(err, DbError::ForeignKey { kind: "vm", .. }), "{err:?}");
    // A snapshot of a VM that does not exist.
    let err = db
        .create_snapshot(&new_snapshot(missing, SnapshotType::Regular, None), &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, DbError::ForeignKey { kind: "snapshot", .. }),
        "{err:?}"
    );
    // Disks of a VM or snapshot that does not exist.
    let disk = VmDisk {
        vm_id: missing,
        disk_id: Uuid::new_v4(),
        domain_id: Uuid::new_v4(),
        image_id: Uuid::new_v4(),
        capacity_bytes: 1,
    };
    assert!(matches!(
        db.add_vm_disk(&disk).await.unwrap_err(),
        DbError::ForeignKey { .. }
    ));
    let snapshot_disk = SnapshotDisk {
        disk_id: Uuid::new_v4(),
        volume: volume(),
    };
    assert!(matches!(
        db.add_snapshot_disk(missing, &snapshot_disk).await.unwrap_err(),
        DbError::ForeignKey { .. }
    ));
    // A saga of an operation that does not exist.
    let saga = NewSaga {
        id: Uuid::new_v4(),
        name: "x".into(),
        params: json!(null),
        owner: "o".into(),
        operation_id: Some(missing),
    };
    assert!(matches!(
        db.create_saga(&saga).await.unwrap_err(),
        DbError::ForeignKey { .. }
    ));
    // A cluster still referred to by a VM cannot go.
    let vm = vm(&db).await;
    let cluster_id = db.get_vm(vm.id).await.unwrap().cluster_id;
    let err = sqlx::query("DELETE FROM clusters WHERE id = $1")
        .bind(cluster_id.to_string())
        .execute(db.pool())
        .await;
    assert!(err.is_err(), "deleting a cluster with VMs succeeded");
    // Sizes that do not fit the BIGINT columns are refused before reaching the database.
    let huge = NewVm {
        memory_bytes: u64::MAX,
        ..new_vm(cluster_id)
    };
    assert!(matches!(
        db.create_vm(&huge).await.unwrap_err(),
        DbError::InvalidValue { .. }
    ));
}

async fn hosts_crud(db: Database) {
    let cluster_a = cluster(&db, "3.3").await;
    let cluster_b = cluster(&db, "3.3").await;
    let empty = cluster(&db, "3.3").await;
    let new_host = |cluster_id: Uuid, name: &str| NewHost {
        id: Uuid::new_v4(),
        name: name.into(),
        cluster_id,
        host_address: format!("http://{name}:50061"),
        storage_address: format!("http://{name}:50062"),
    };
    // Created in this order, a millisecond or more apart: "first" is the oldest.
    let first = new_host(cluster_a.id, "host-z");
    let created = db.create_host(&first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second = new_host(cluster_a.id, "host-a");
    db.create_host(&second).await.unwrap();
    let third = new_host(cluster_b.id, "host-m");
    db.create_host(&third).await.unwrap();

    let got = db.get_host(first.id).await.unwrap();
    assert_eq!(got, created);
    assert_eq!(got.host_address, "http://host-z:50061");
    assert_eq!(got.storage_address, "http://host-z:50062");
    assert_eq!(got.cluster_id, cluster_a.id);

    let names =
        |hosts: Vec<ramsnap_snapshot::db::Host>| hosts.into_iter().map(|h| h.name).collect::<Vec<_>>();
    assert_eq!(
        names(db.list_hosts(None).await.unwrap()),
        ["host-a", "host-m", "host-z"]
    );
    assert_eq!(
        names(db.list_hosts(Some(cluster_a.id)).await.unwrap()),
        ["host-a", "host-z"]
    );
    assert!(db.list_hosts(Some(empty.id)).await.unwrap().is_empty());
    assert_eq!(
        db.first_host_in_cluster(cluster_a.id)
            .await
            .unwrap()
            .map(|h| h.id),
        Some(first.id)
    );
    assert_eq!(
        db.first_host_in_cluster(cluster_b.id)
            .await
            .unwrap()
            .map(|h| h.id),
        Some(third.id)
    );
    assert_eq!(db.first_host_in_cluster(empty.id).await.unwrap(), None);

    let same_name = NewHost {
        id: Uuid::new_v4(),
        ..first.clone()
    };
    let err = db.create_host(&same_name).await.unwrap_err();
    assert!(matches!(err, DbError::Conflict { kind: "host", .. }), "{err:?}");
    let same_id = NewHost {
        name: "host-other".into(),
        ..first.clone()
    };
    assert!(matches!(
        db.create_host(&same_id).await.unwrap_err(),
        DbError::Conflict { kind: "host", .. }
    ));
    let orphan = new_host(Uuid::new_v4(), "host-orphan");
    let err = db.create_host(&orphan).await.unwrap_err();
    assert!(matches!(err, DbError::ForeignKey { kind: "host", .. }), "{err:?}");
    assert!(db.get_host(Uuid::new_v4()).await.unwrap_err().is_not_found());
}

async fn operation_cancel_and_warnings(db: Database) {
    let new = NewOperation {
        id: Uuid::new_v4(),
        kind: "snapshot_create".into(),
        vm_id: None,
        request_id: Some("req-warn".into()),
        warnings: vec!["cluster below 3.3: memory not saved".into()],
    };
    let created = db.create_operation(&new).await.unwrap();
    assert!(!created.cancel_requested);
    assert_eq!(db.get_operation(new.id).await.unwrap(), created);
    assert_eq!(created.warnings, new.warnings);
    // ensure_operation stores the warnings too.
    let ensured = NewOperation {
        id: Uuid::new_v4(),
        request_id: Some("req-warn-2".into()),
        warnings: vec!["w".into()],
        ..new.clone()
    };
    let (op, _) = db.ensure_operation(&ensured).await.unwrap();
    assert_eq!(db.get_operation(op.id).await.unwrap().warnings, ["w"]);

    assert!(db.request_cancel(new.id).await.unwrap());
    // Asking again is fine.
    assert!(db.request_cancel(new.id).await.unwrap());
    let op = db.get_operation(new.id).await.unwrap();
    assert!(op.cancel_requested);
    assert_eq!(op.state, OperationState::Running);
    // Other operations are not affected.
    assert!(!db.get_operation(ensured.id).await.unwrap().cancel_requested);

    assert!(db
        .add_operation_warning(new.id, "memory discarded")
        .await
        .unwrap());
    // A replayed step does not repeat the warning.
    assert!(!db
        .add_operation_warning(new.id, "memory discarded")
        .await
        .unwrap());
    // Quotes and other JSON specials survive the round trip.
    assert!(db.add_operation_warning(new.id, "disk \"a\\b\"\n").await.unwrap());
    assert_eq!(
        db.get_operation(new.id).await.unwrap().warnings,
        [
            "cluster below 3.3: memory not saved",
            "memory discarded",
            "disk \"a\\b\"\n"
        ]
    );

    // Concurrent appends are all kept.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let db = db.clone();
            tokio::spawn(async move { db.add_operation_warning(ensured.id, &format!("w{i}")).await })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().unwrap());
    }
    let mut warnings = db.get_operation(ensured.id).await.unwrap().warnings;
    warnings.sort();
    assert_eq!(warnings, ["w", "w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7"]);

    db.finish_operation(new.id, OperationState::Cancelled, Some("cancelled"), None)
        .await
        .unwrap();
    // An ended operation cannot be cancelled any more.
    assert!(!db.request_cancel(new.id).await.unwrap());
    assert!(db
        .request_cancel(Uuid::new_v4())
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db
        .add_operation_warning(Uuid::new_v4(), "x")
        .await
        .unwrap_err()
        .is_not_found());
}

// ---- snapshot flows ----

/// A VM made by create_vm_with_active, with two disks.
struct FlowVm {
    vm: NewVm,
    disks: Vec<VmDisk>,
    active_id: Uuid,
}

fn disk_volume(disk: &VmDisk) -> SnapshotDisk {
    SnapshotDisk {
        disk_id: disk.disk_id,
        volume: VolumeRef {
            domain_id: disk.domain_id,
            image_id: disk.image_id,
            volume_id: Uuid::new_v4(),
        },
    }
}

/// A new leaf volume on top of each of `disks`, in the same image.
fn overlays(disks: &[SnapshotDisk]) -> Vec<SnapshotDisk> {
    let mut overlays: Vec<SnapshotDisk> = disks
        .iter()
        .map(|d| SnapshotDisk {
            disk_id: d.disk_id,
            volume: VolumeRef {
                volume_id: Uuid::new_v4(),
                ..d.volume
            },
        })
        .collect();
    overlays.sort_by_key(|d| d.disk_id);
    overlays
}

async fn flow_vm(db: &Database) -> FlowVm {
    let cluster = cluster(db, "3.3").await;
    let vm = new_vm(cluster.id);
    let disks: Vec<VmDisk> = (0..2)
        .map(|_| VmDisk {
            vm_id: vm.id,
            disk_id: Uuid::new_v4(),
            domain_id: vm.disk_domain_id,
            image_id: Uuid::new_v4(),
            capacity_bytes: 1 << 30,
        })
        .collect();
    let base: Vec<SnapshotDisk> = disks.iter().map(disk_volume).collect();
    let active = new_snapshot(vm.id, SnapshotType::Active, None);
    db.create_vm_with_active(&vm, &disks, &active, &base)
        .await
        .unwrap();
    FlowVm {
        vm,
        disks,
        active_id: active.id,
    }
}

/// Takes a snapshot as the create saga does: a LOCKED REGULAR snapshot of
/// the active's volumes, then snapshot_taken with new overlays. Returns the
/// snapshot. Sleeps a little first so that creation times differ.
async fn take_snapshot(db: &Database, vm_id: Uuid, memory: Option<MemoryVolume>) -> Snapshot {
    tokio::time::sleep(Duration::from_millis(5)).await;
    let active = db.active_snapshot(vm_id).await.unwrap();
    let mut regular = new_snapshot(vm_id, SnapshotType::Regular, memory);
    regular.status = SnapshotStatus::Locked;
    db.create_snapshot(&regular, &active.disks).await.unwrap();
    db.snapshot_taken(vm_id, regular.id, active.id, &overlays(&active.disks))
        .await
        .unwrap();
    db.get_snapshot(regular.id).await.unwrap()
}

/// The VM's snapshots as (id, type, status), oldest first.
async fn model(db: &Database, vm_id: Uuid) -> Vec<(Uuid, SnapshotType, SnapshotStatus)> {
    db.list_snapshots(vm_id)
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.id, s.snapshot_type, s.status))
        .collect()
}

async fn create_vm_with_active_is_idempotent(db: Database) {
    let cluster = cluster(&db, "3.3").await;
    let vm = NewVm {
        kernel: "vmlinuz".into(),
        ..new_vm(cluster.id)
    };
    let disks: Vec<VmDisk> = (0..2)
        .map(|_| VmDisk {
            vm_id: vm.id,
            disk_id: Uuid::new_v4(),
            domain_id: vm.disk_domain_id,
            image_id: Uuid::new_v4(),
            capacity_bytes: 1 << 30,
        })
        .collect();
    let base: Vec<SnapshotDisk> = disks.iter().map(disk_volume).collect();
    // Type, status and memory of the given snapshot are not used: the VM's
    // first snapshot is ACTIVE, OK and without memory.
    let mut active = new_snapshot(vm.id, SnapshotType::Regular, Some(memory()));
    active.status = SnapshotStatus::Locked;
    let created = db
        .create_vm_with_active(&vm, &disks, &active, &base)
        .await
        .unwrap();
    assert_eq!(db.get_vm(vm.id).await.unwrap(), created);
    assert_eq!(created.kernel, "vmlinuz");
    let mut expected_disks = disks.clone();
    expected_disks.sort_by_key(|d| d.disk_id);
    assert_eq!(db.vm_disks(vm.id).await.unwrap(), expected_disks);
    let got = db.active_snapshot(vm.id).await.unwrap();
    assert_eq!(got.id, active.id);
    assert_eq!(
        (got.snapshot_type, got.status, got.memory),
        (SnapshotType::Active, SnapshotStatus::Ok, None)
    );
    assert_eq!(got.disks, sorted(&base));

    // Replayed: Ok, same VM, nothing added.
    db.set_vm_status(vm.id, VmStatus::Up).await.unwrap();
    let again = db
        .create_vm_with_active(&vm, &disks, &active, &base)
        .await
        .unwrap();
    assert_eq!(again.id, vm.id);
    assert_eq!(again.status, VmStatus::Up, "a replay returns the VM as it is");
    assert_eq!(db.list_snapshots(vm.id).await.unwrap().len(), 1);
    assert_eq!(db.vm_disks(vm.id).await.unwrap().len(), 2);

    // Another VM with the same name: Conflict, and nothing of it is left.
    let twin = NewVm {
        id: Uuid::new_v4(),
        ..vm.clone()
    };
    let twin_active = new_snapshot(twin.id, SnapshotType::Active, None);
    let err = db
        .create_vm_with_active(&twin, &[], &twin_active, &[])
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { kind: "vm", .. }), "{err:?}");
    // A failure after the VM row (duplicate snapshot disk) rolls it all back.
    let other = new_vm(cluster.id);
    let other_disk = VmDisk {
        vm_id: other.id,
        ..disks[0].clone()
    };
    let other_active = new_snapshot(other.id, SnapshotType::Active, None);
    let dup = [base[0], base[0]];
    let err = db
        .create_vm_with_active(&other, std::slice::from_ref(&other_disk), &other_active, &dup)
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    assert!(db.get_vm(other.id).await.unwrap_err().is_not_found());
    assert!(db.vm_disks(other.id).await.unwrap().is_empty());
    assert!(db.get_snapshot(other_active.id).await.unwrap_err().is_not_found());
    // Disks or a snapshot of another VM are refused up front.
    let err = db
        .create_vm_with_active(&other, &disks, &other_active, &[])
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::InvalidValue { .. }), "{err:?}");
    let err = db
        .create_vm_with_active(&other, &[other_disk], &active, &[])
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::InvalidValue { .. }), "{err:?}");
    // A missing cluster.
    let orphan = new_vm(Uuid::new_v4());
    let orphan_active = new_snapshot(orphan.id, SnapshotType::Active, None);
    let err = db
        .create_vm_with_active(&orphan, &[], &orphan_active, &[])
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::ForeignKey { kind: "vm", .. }), "{err:?}");
    assert!(db.get_vm(orphan.id).await.unwrap_err().is_not_found());
}

/// The variant that finds the VM's ACTIVE snapshot itself (in the same
/// read as the snapshot's): it moves that one to the new leaves, never
/// another VM's, and refuses what the explicit one refuses.
async fn snapshot_taken_on_active_finds_the_vms_active(db: Database) {
    let f = flow_vm(&db).await;
    let g = flow_vm(&db).await;
    let active = db.active_snapshot(f.vm.id).await.unwrap();
    let g_active = db.active_snapshot(g.vm.id).await.unwrap();
    let mut regular = new_snapshot(f.vm.id, SnapshotType::Regular, None);
    regular.status = SnapshotStatus::Locked;
    db.create_snapshot(&regular, &active.disks).await.unwrap();
    let new_leaves = overlays(&active.disks);
    db.snapshot_taken_on_active(f.vm.id, regular.id, &new_leaves)
        .await
        .unwrap();
    assert_eq!(
        db.get_snapshot(regular.id).await.unwrap().status,
        SnapshotStatus::Ok
    );
    assert_eq!(db.active_snapshot(f.vm.id).await.unwrap().disks, new_leaves);
    assert_eq!(db.active_snapshot(g.vm.id).await.unwrap(), g_active);
    // A replay changes nothing.
    db.snapshot_taken_on_active(f.vm.id, regular.id, &overlays(&active.disks))
        .await
        .unwrap();
    assert_eq!(db.active_snapshot(f.vm.id).await.unwrap().disks, new_leaves);

    // A snapshot that does not exist; the active one itself; another VM's.
    let err = db
        .snapshot_taken_on_active(f.vm.id, Uuid::new_v4(), &[])
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    let err = db
        .snapshot_taken_on_active(f.vm.id, active.id, &[])
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    let mut other = new_snapshot(f.vm.id, SnapshotType::Regular, None);
    other.status = SnapshotStatus::Locked;
    db.create_snapshot(&other, &[]).await.unwrap();
    let err = db
        .snapshot_taken_on_active(g.vm.id, other.id, &[])
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    assert_eq!(
        db.get_snapshot(other.id).await.unwrap().status,
        SnapshotStatus::Locked
    );
    assert_eq!(db.active_snapshot(g.vm.id).await.unwrap(), g_active);
}

fn sorted(disks: &[SnapshotDisk]) -> Vec<SnapshotDisk> {
    let mut disks = disks.to_vec();
    disks.sort_by_key(|d| d.disk_id);
    disks
}

async fn snapshot_taken_is_idempotent(db: Database) {
    let f = flow_vm(&db).await;
    let active = db.active_snapshot(f.vm.id).await.unwrap();
    assert_eq!(active.id, f.active_id);
    let mem = memory();
    let mut regular = new_snapshot(f.vm.id, SnapshotType::Regular, Some(mem));
    regular.status = SnapshotStatus::Locked;
    db.create_snapshot(&regular, &active.disks).await.unwrap();

    // The snapshot is not OK yet, and the active still points at the old leaves.
    assert_eq!(
        db.get_snapshot(regular.id).await.unwrap().status,
        SnapshotStatus::Locked
    );
    let new_leaves = overlays(&active.disks);
    db.snapshot_taken(f.vm.id, regular.id, active.id, &new_leaves)
        .await
        .unwrap();
    let taken = db.get_snapshot(regular.id).await.unwrap();
    assert_eq!(taken.status, SnapshotStatus::Ok);
    assert_eq!(taken.disks, active.disks, "the snapshot keeps the frozen volumes");
    assert_eq!(taken.memory, Some(mem));
    let now_active = db.active_snapshot(f.vm.id).await.unwrap();
    assert_eq!(now_active.disks, new_leaves);
    assert_eq!(now_active.memory, None);

    // Replayed, even with other overlays (as a re-executed step that made
    // new ones would): nothing changes.
    db.snapshot_taken(f.vm.id, regular.id, active.id, &new_leaves)
        .await
        .unwrap();
    db.snapshot_taken(f.vm.id, regular.id, active.id, &overlays(&active.disks))
        .await
        .unwrap();
    assert_eq!(db.active_snapshot(f.vm.id).await.unwrap().disks, new_leaves);
    assert_eq!(db.get_snapshot(regular.id).await.unwrap(), taken);

    // Wrong arguments.
    let err = db
        .snapshot_taken(f.vm.id, Uuid::new_v4(), active.id, &[])
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    let mut other = new_snapshot(f.vm.id, SnapshotType::Regular, None);
    other.status = SnapshotStatus::Locked;
    db.create_snapshot(&other, &[]).await.unwrap();
    // "active" that is not the active snapshot.
    let err = db
        .snapshot_taken(f.vm.id, other.id, regular.id, &[])
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    // The active snapshot is not a regular one.
    let err = db
        .snapshot_taken(f.vm.id, active.id, active.id, &[])
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    // A snapshot of another VM.
    let g = flow_vm(&db).await;
    let err = db
        .snapshot_taken(g.vm.id, other.id, g.active_id, &[])
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    assert_eq!(
        db.get_snapshot(other.id).await.unwrap().status,
        SnapshotStatus::Locked
    );
}

async fn preview_then_undo(db: Database) {
    let f = flow_vm(&db).await;
    let vm_id = f.vm.id;
    let m1 = memory();
    let s1 = take_snapshot(&db, vm_id, Some(m1)).await;
    let s2 = take_snapshot(&db, vm_id, None).await;
    let before = db.active_snapshot(vm_id).await.unwrap();
    assert_eq!(before.id, f.active_id);
    assert_eq!(
        model(&db, vm_id).await,
        [
            (f.active_id, SnapshotType::Active, SnapshotStatus::Ok),
            (s1.id, SnapshotType::Regular, SnapshotStatus::Ok),
            (s2.id, SnapshotType::Regular, SnapshotStatus::Ok),
        ]
    );

    // Preview S1 with its memory: new leaves on top of S1's volumes.
    let preview_leaves = overlays(&s1.disks);
    let new_active = new_snapshot(vm_id, SnapshotType::Active, None);
    let previewing = db
        .preview_begin(vm_id, s1.id, &new_active, &preview_leaves, Some(&m1))
        .await
        .unwrap();
    assert_eq!(previewing.id, new_active.id);
    assert_eq!(
        (previewing.snapshot_type, previewing.status, previewing.memory),
        (SnapshotType::Active, SnapshotStatus::Ok, Some(m1))
    );
    assert_eq!(previewing.disks, preview_leaves);
    assert_eq!(db.active_snapshot(vm_id).await.unwrap(), previewing);
    let preview = db.get_snapshot(f.active_id).await.unwrap();
    assert_eq!(preview.snapshot_type, SnapshotType::Preview);
    assert_eq!(preview.disks, before.disks, "the pre-preview state is kept");
    assert_eq!(
        db.get_snapshot(s1.id).await.unwrap().status,
        SnapshotStatus::InPreview
    );
    assert_eq!(db.get_snapshot(s2.id).await.unwrap().status, SnapshotStatus::Ok);
    // The previewed snapshot and the new active share the memory volume.
    assert!(db.memory_still_referenced(m1.dump.volume_id).await.unwrap());
    assert_eq!(
        db.snapshots_referencing_memory(m1.dump.volume_id)
            .await
            .unwrap()
            .len(),
        2
    );

    // Replayed: the same result, nothing more.
    let replay = db
        .preview_begin(vm_id, s1.id, &new_active, &overlays(&s1.disks), Some(&m1))
        .await
        .unwrap();
    assert_eq!(replay, previewing);
    assert_eq!(db.list_snapshots(vm_id).await.unwrap().len(), 4);
    // A second preview while in preview is refused.
    let err = db
        .preview_begin(
            vm_id,
            s2.id,
            &new_snapshot(vm_id, SnapshotType::Active, None),
            &overlays(&s2.disks),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    // So is a commit-less removal of the previewed snapshot.
    let err = db.remove_snapshot_row(s1.id).await.unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");

    // Undo: the preview's active goes, the pre-preview state is back.
    let deleted = db.preview_undo(vm_id).await.unwrap().unwrap();
    assert_eq!(deleted, previewing, "returned with its disks and memory");
    assert_eq!(
        model(&db, vm_id).await,
        [
            (f.active_id, SnapshotType::Active, SnapshotStatus::Ok),
            (s1.id, SnapshotType::Regular, SnapshotStatus::Ok),
            (s2.id, SnapshotType::Regular, SnapshotStatus::Ok),
        ]
    );
    assert_eq!(db.active_snapshot(vm_id).await.unwrap(), before);
    assert!(db.get_snapshot(new_active.id).await.unwrap_err().is_not_found());
    // S1 still holds the memory volume: it must stay.
    assert!(db.memory_still_referenced(m1.dump.volume_id).await.unwrap());
    // Replayed: nothing to undo.
    assert_eq!(db.preview_undo(vm_id).await.unwrap(), None);
    assert_eq!(db.preview_commit(vm_id).await.unwrap(), Vec::<Snapshot>::new());
    assert_eq!(db.active_snapshot(vm_id).await.unwrap(), before);

    // The VM can preview again afterwards.
    let again = new_snapshot(vm_id, SnapshotType::Active, None);
    db.preview_begin(vm_id, s2.id, &again, &overlays(&s2.disks), None)
        .await
        .unwrap();
    assert_eq!(
        db.get_snapshot(s2.id).await.unwrap().status,
        SnapshotStatus::InPreview
    );
    assert_eq!(db.preview_undo(vm_id).await.unwrap().unwrap().id, again.id);
}

async fn preview_then_commit(db: Database) {
    let f = flow_vm(&db).await;
    let vm_id = f.vm.id;
    let (m1, m2, m3) = (memory(), memory(), memory());
    let s1 = take_snapshot(&db, vm_id, Some(m1)).await;
    let s2 = take_snapshot(&db, vm_id, Some(m2)).await;
    let s3 = take_snapshot(&db, vm_id, None).await;
    // The active's memory (e.g. left by an earlier commit) goes with PREVIEW.
    db.set_memory(f.active_id, &m3).await.unwrap();
    let before = db.active_snapshot(vm_id).await.unwrap();
    // A snapshot of another VM is never touched.
    let g = flow_vm(&db).await;
    let g1 = take_snapshot(&db, g.vm.id, None).await;

    let new_active = new_snapshot(vm_id, SnapshotType::Active, None);
    let leaves = overlays(&s1.disks);
    let previewing = db
        .preview_begin(vm_id, s1.id, &new_active, &leaves, Some(&m1))
        .await
        .unwrap();

    let deleted = db.preview_commit(vm_id).await.unwrap();
    let ids: Vec<Uuid> = deleted.iter().map(|s| s.id).collect();
    assert_eq!(
        ids,
        [f.active_id, s2.id, s3.id],
        "PREVIEW first, then the newer snapshots"
    );
    assert_eq!(deleted[0].snapshot_type, SnapshotType::Preview);
    assert_eq!(deleted[0].disks, before.disks);
    assert_eq!(deleted[0].memory, Some(m3));
    assert_eq!(deleted[1], s2, "returned with disks and memory");
    assert_eq!(deleted[2], s3);
    assert_eq!(
        model(&db, vm_id).await,
        [
            (s1.id, SnapshotType::Regular, SnapshotStatus::Ok),
            (new_active.id, SnapshotType::Active, SnapshotStatus::Ok),
        ]
    );
    // The active keeps the memory, to restore on the next run.
    let active = db.active_snapshot(vm_id).await.unwrap();
    assert_eq!(active, previewing);
    assert_eq!(active.memory, Some(m1));
    assert!(db.memory_still_referenced(m1.dump.volume_id).await.unwrap());
    // The removed snapshots' memory volumes are unreferenced: the caller deletes them.
    assert!(!db.memory_still_referenced(m2.dump.volume_id).await.unwrap());
    assert!(!db.memory_still_referenced(m3.dump.volume_id).await.unwrap());
    for s in &deleted {
        assert!(db.snapshot_disks(s.id).await.unwrap().is_empty());
    }

    // Replayed: nothing more is deleted.
    assert!(db.preview_commit(vm_id).await.unwrap().is_empty());
    assert_eq!(db.preview_undo(vm_id).await.unwrap(), None);
    assert_eq!(db.list_snapshots(vm_id).await.unwrap().len(), 2);
    assert_eq!(model(&db, g.vm.id).await.len(), 2);
    assert_eq!(db.get_snapshot(g1.id).await.unwrap(), g1);

    // Committing to the newest snapshot deletes no regular one.
    let s4 = take_snapshot(&db, vm_id, None).await;
    let next = new_snapshot(vm_id, SnapshotType::Active, None);
    db.preview_begin(vm_id, s4.id, &next, &overlays(&s4.disks), None)
        .await
        .unwrap();
    let deleted = db.preview_commit(vm_id).await.unwrap();
    assert_eq!(deleted.iter().map(|s| s.id).collect::<Vec<_>>(), [new_active.id]);
    assert_eq!(
        model(&db, vm_id).await,
        [
            (s1.id, SnapshotType::Regular, SnapshotStatus::Ok),
            (s4.id, SnapshotType::Regular, SnapshotStatus::Ok),
            (next.id, SnapshotType::Active, SnapshotStatus::Ok),
        ]
    );
    // m1 was only the old active's and S1's: S1 still holds it.
    assert!(db.memory_still_referenced(m1.dump.volume_id).await.unwrap());
}

async fn preview_refusals_roll_back(db: Database) {
    // A VM without an active snapshot cannot preview.
    let bare = vm(&db).await;
    let regular = new_snapshot(bare.id, SnapshotType::Regular, None);
    db.create_snapshot(&regular, &[]).await.unwrap();
    let err = db
        .preview_begin(
            bare.id,
            regular.id,
            &new_snapshot(bare.id, SnapshotType::Active, None),
            &[],
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    assert!(db.active_snapshot(bare.id).await.unwrap_err().is_not_found());

    let f = flow_vm(&db).await;
    let vm_id = f.vm.id;
    let s1 = take_snapshot(&db, vm_id, None).await;
    let before = model(&db, vm_id).await;
    let fresh = || new_snapshot(vm_id, SnapshotType::Active, None);

    // Missing, not regular, of another VM, locked.
    let err = db
        .preview_begin(vm_id, Uuid::new_v4(), &fresh(), &[], None)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    let err = db
        .preview_begin(vm_id, f.active_id, &fresh(), &[], None)
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    let err = db
        .preview_begin(vm_id, regular.id, &fresh(), &[], None)
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    let mut locked = new_snapshot(vm_id, SnapshotType::Regular, None);
    locked.status = SnapshotStatus::Locked;
    db.create_snapshot(&locked, &[]).await.unwrap();
    let err = db
        .preview_begin(vm_id, locked.id, &fresh(), &[], None)
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    db.delete_snapshot(locked.id).await.unwrap();
    // The new active's id is taken by another snapshot.
    let taken = NewSnapshot { id: s1.id, ..fresh() };
    let err = db
        .preview_begin(vm_id, s1.id, &taken, &[], None)
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    // A new active of another VM.
    let err = db
        .preview_begin(
            vm_id,
            s1.id,
            &new_snapshot(bare.id, SnapshotType::Active, None),
            &[],
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::InvalidValue { .. }), "{err:?}");
    // A failure at the last insert (a disk twice) rolls back the type and
    // status changes made before it.
    let leaves = overlays(&s1.disks);
    let err = db
        .preview_begin(vm_id, s1.id, &fresh(), &[leaves[0], leaves[0]], None)
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    assert_eq!(model(&db, vm_id).await, before);
    assert_eq!(db.active_snapshot(vm_id).await.unwrap().id, f.active_id);
}

async fn stateless_begin_and_end(db: Database) {
    let f = flow_vm(&db).await;
    let vm_id = f.vm.id;
    let s1 = take_snapshot(&db, vm_id, None).await;
    // The active snapshot has memory (committed to a snapshot with memory):
    // a stateless VM restores it on every run.
    let mem = memory();
    db.set_memory(f.active_id, &mem).await.unwrap();
    let before = db.active_snapshot(vm_id).await.unwrap();

    let run_active = new_snapshot(vm_id, SnapshotType::Active, None);
    let leaves = overlays(&before.disks);
    let running = db
        .stateless_begin(vm_id, &run_active, &leaves, before.memory.as_ref())
        .await
        .unwrap();
    assert_eq!(
        (running.id, running.snapshot_type, running.status, running.memory),
        (run_active.id, SnapshotType::Active, SnapshotStatus::Ok, Some(mem))
    );
    assert_eq!(running.disks, leaves);
    assert_eq!(db.active_snapshot(vm_id).await.unwrap(), running);
    let stateless = db.get_snapshot(f.active_id).await.unwrap();
    assert_eq!(stateless.snapshot_type, SnapshotType::Stateless);
    assert_eq!(stateless.disks, before.disks);
    assert_eq!(stateless.memory, Some(mem));

    // Replayed: same result.
    assert_eq!(
        db.stateless_begin(vm_id, &run_active, &overlays(&before.disks), None)
            .await
            .unwrap(),
        running
    );
    assert_eq!(db.list_snapshots(vm_id).await.unwrap().len(), 3);
    // Neither a second stateless run nor a preview meanwhile.
    let err = db
        .stateless_begin(vm_id, &new_snapshot(vm_id, SnapshotType::Active, None), &[], None)
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    let err = db
        .preview_begin(
            vm_id,
            s1.id,
            &new_snapshot(vm_id, SnapshotType::Active, None),
            &[],
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    assert_eq!(db.preview_undo(vm_id).await.unwrap(), None);

    // The VM stops: the run's active goes, the saved state is back.
    let deleted = db.stateless_end(vm_id).await.unwrap().unwrap();
    assert_eq!(deleted, running);
    assert_eq!(db.active_snapshot(vm_id).await.unwrap(), before);
    assert_eq!(
        model(&db, vm_id).await,
        [
            (f.active_id, SnapshotType::Active, SnapshotStatus::Ok),
            (s1.id, SnapshotType::Regular, SnapshotStatus::Ok),
        ]
    );
    // The memory is still the active's: it stays for the next run.
    assert!(db.memory_still_referenced(mem.dump.volume_id).await.unwrap());
    // Replayed: nothing to end.
    assert_eq!(db.stateless_end(vm_id).await.unwrap(), None);
    assert_eq!(db.active_snapshot(vm_id).await.unwrap(), before);

    // A preview refuses a stateless run.
    let previewing = new_snapshot(vm_id, SnapshotType::Active, None);
    db.preview_begin(vm_id, s1.id, &previewing, &overlays(&s1.disks), None)
        .await
        .unwrap();
    let err = db
        .stateless_begin(vm_id, &new_snapshot(vm_id, SnapshotType::Active, None), &[], None)
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    // A VM without an active snapshot cannot start stateless.
    let bare = vm(&db).await;
    let err = db
        .stateless_begin(
            bare.id,
            &new_snapshot(bare.id, SnapshotType::Active, None),
            &[],
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    assert_eq!(db.stateless_end(bare.id).await.unwrap(), None);
}

async fn remove_snapshot_row_and_memory_references(db: Database) {
    let f = flow_vm(&db).await;
    let vm_id = f.vm.id;
    let mem = memory();
    let s1 = take_snapshot(&db, vm_id, Some(mem)).await;
    let s2 = take_snapshot(&db, vm_id, None).await;
    assert!(db.memory_still_referenced(mem.dump.volume_id).await.unwrap());
    // Only the dump volume counts.
    assert!(!db.memory_still_referenced(mem.metadata.volume_id).await.unwrap());
    assert!(!db.memory_still_referenced(Uuid::new_v4()).await.unwrap());

    let removed = db.remove_snapshot_row(s1.id).await.unwrap().unwrap();
    assert_eq!(removed, s1, "returned with disks and memory");
    assert_eq!(removed.disks.len(), 2);
    assert!(db.get_snapshot(s1.id).await.unwrap_err().is_not_found());
    assert!(db.snapshot_disks(s1.id).await.unwrap().is_empty());
    assert!(!db.memory_still_referenced(mem.dump.volume_id).await.unwrap());
    // Replayed: already gone.
    assert_eq!(db.remove_snapshot_row(s1.id).await.unwrap(), None);

    // Only REGULAR snapshots are removed this way.
    let err = db.remove_snapshot_row(f.active_id).await.unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    assert_eq!(db.active_snapshot(vm_id).await.unwrap().id, f.active_id);
    // A LOCKED one (its removal saga locked it) may go.
    db.set_snapshot_status(s2.id, SnapshotStatus::Locked)
        .await
        .unwrap();
    assert_eq!(
        db.remove_snapshot_row(s2.id).await.unwrap().map(|s| s.id),
        Some(s2.id)
    );
    assert_eq!(
        model(&db, vm_id).await,
        [(f.active_id, SnapshotType::Active, SnapshotStatus::Ok)]
    );
}

async fn repoint_snapshot_disks_after_merge(db: Database) {
    let f = flow_vm(&db).await;
    let vm_id = f.vm.id;
    let s1 = take_snapshot(&db, vm_id, None).await;
    let s2 = take_snapshot(&db, vm_id, None).await;
    let active = db.active_snapshot(vm_id).await.unwrap();
    let disk = f.disks[0].disk_id;
    let volume_of = |s: &Snapshot| s.disks.iter().find(|d| d.disk_id == disk).unwrap().volume;
    let (v1, v2, v3) = (volume_of(&s1), volume_of(&s2), volume_of(&active));

    assert_eq!(
        db.snapshots_pointing_at_volume(v1.volume_id).await.unwrap(),
        [(s1.id, disk)]
    );
    assert_eq!(
        db.snapshots_pointing_at_volume(v3.volume_id).await.unwrap(),
        [(active.id, disk)]
    );
    assert!(db
        .snapshots_pointing_at_volume(Uuid::new_v4())
        .await
        .unwrap()
        .is_empty());

    // A merge removed v1 by merging it into its child v2: S1 now points at v2.
    db.set_snapshot_disk_volume(s1.id, disk, &v2).await.unwrap();
    // Replayed: no change, no error.
    db.set_snapshot_disk_volume(s1.id, disk, &v2).await.unwrap();
    assert!(db
        .snapshots_pointing_at_volume(v1.volume_id)
        .await
        .unwrap()
        .is_empty());
    let mut expected = vec![(s1.id, disk), (s2.id, disk)];
    expected.sort();
    assert_eq!(
        db.snapshots_pointing_at_volume(v2.volume_id).await.unwrap(),
        expected
    );
    assert_eq!(volume_of(&db.get_snapshot(s1.id).await.unwrap()), v2);
    // The other disk is untouched.
    let other_disk = f.disks[1].disk_id;
    let other = |s: &Snapshot| s.disks.iter().find(|d| d.disk_id == other_disk).unwrap().volume;
    assert_eq!(other(&db.get_snapshot(s1.id).await.unwrap()), other(&s1));

    let err = db
        .set_snapshot_disk_volume(s1.id, Uuid::new_v4(), &v2)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    let err = db
        .set_snapshot_disk_volume(Uuid::new_v4(), disk, &v2)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
}

/// SQLite-only: an in-memory database keeps its one connection (and data),
/// and a file database is created on first connect.
#[tokio::test]
async fn sqlite_in_memory_and_new_file() {
    let db = Database::connect("sqlite::memory:").await.unwrap();
    db.migrate().await.unwrap();
    let new = cluster(&db, "3.3").await;
    assert_eq!(db.get_cluster(new.id).await.unwrap().name, new.name);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fresh.db");
    let db = Database::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert!(path.exists());
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(fk, 1);
    assert!(Database::connect("mysql://localhost/x").await.is_err());
}

async fn operation_fingerprints_and_completed_requests(db: Database) {
    let request_id = Uuid::new_v4().to_string();
    let new = NewOperation {
        id: Uuid::new_v4(),
        kind: "stop_vm".into(),
        vm_id: None,
        request_id: Some(request_id.clone()),
        warnings: Vec::new(),
    };
    let op = db
        .create_operation_for_request(&new, Some("rpc:sha256:aa"))
        .await
        .unwrap();
    assert_eq!(op.request_fingerprint.as_deref(), Some("rpc:sha256:aa"));
    let got = db
        .get_operation_by_request_id(&request_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, op);
    // Without one (operations from before fingerprints): None.
    let plain = operation(&db, None).await;
    assert_eq!(db.get_operation(plain).await.unwrap().request_fingerprint, None);
    // A call that completed at once: SUCCEEDED with its result.
    let completed = NewOperation {
        id: Uuid::new_v4(),
        kind: "create_cluster".into(),
        vm_id: None,
        request_id: Some(Uuid::new_v4().to_string()),
        warnings: Vec::new(),
    };
    let result = json!({"cluster_id": Uuid::new_v4().to_string()});
    let done = db
        .record_completed_request(&completed, "rpc:sha256:bb", &result)
        .await
        .unwrap();
    let got = db.get_operation(completed.id).await.unwrap();
    assert_eq!(got, done);
    assert_eq!(got.state, OperationState::Succeeded);
    assert_eq!(got.result, Some(result.clone()));
    // Its request id is taken like any other.
    let again = NewOperation {
        id: Uuid::new_v4(),
        ..completed.clone()
    };
    assert!(matches!(
        db.record_completed_request(&again, "rpc:sha256:bb", &result)
            .await,
        Err(DbError::Conflict { .. })
    ));
}

async fn saga_volume_claims(db: Database) {
    let op = operation(&db, None).await;
    let saga = NewSaga {
        id: Uuid::new_v4(),
        name: "vm_import".into(),
        params: json!({}),
        owner: "coordinator-1".into(),
        operation_id: Some(op),
    };
    db.create_saga(&saga).await.unwrap();
    let (a, b) = (volume(), volume());
    assert!(db.saga_volumes(saga.id).await.unwrap().is_empty());
    db.claim_saga_volume(saga.id, &a).await.unwrap();
    db.claim_saga_volume(saga.id, &b).await.unwrap();
    // Claiming again (a replayed step) changes nothing.
    db.claim_saga_volume(saga.id, &a).await.unwrap();
    let mut claimed = db.saga_volumes(saga.id).await.unwrap();
    claimed.sort_by_key(|v| v.volume_id);
    let mut expected = vec![a, b];
    expected.sort_by_key(|v| v.volume_id);
    assert_eq!(claimed, expected);
    db.release_saga_volume(saga.id, &a).await.unwrap();
    db.release_saga_volume(saga.id, &a).await.unwrap();
    assert_eq!(db.saga_volumes(saga.id).await.unwrap(), vec![b]);
    // Another saga's claims are its own.
    let other = NewSaga {
        id: Uuid::new_v4(),
        ..saga.clone()
    };
    db.create_saga(&other).await.unwrap();
    assert!(db.saga_volumes(other.id).await.unwrap().is_empty());
}

async fn vm_using_image(db: Database) {
    let cluster = cluster(&db, "3.3").await;
    let vm = new_vm(cluster.id);
    let disk = VmDisk {
        vm_id: vm.id,
        disk_id: Uuid::new_v4(),
        domain_id: vm.disk_domain_id,
        image_id: Uuid::new_v4(),
        capacity_bytes: 1 << 30,
    };
    let m = memory();
    db.create_vm_with_active(
        &vm,
        std::slice::from_ref(&disk),
        &new_snapshot(vm.id, SnapshotType::Active, None),
        &[disk_volume(&disk)],
    )
    .await
    .unwrap();
    let s = new_snapshot(vm.id, SnapshotType::Regular, Some(m));
    db.create_snapshot(&s, &[disk_volume(&disk)]).await.unwrap();
    for image in [disk.image_id, m.dump.image_id, m.metadata.image_id] {
        assert_eq!(
            db.vm_using_image(image).await.unwrap(),
            Some((vm.id, vm.name.clone())),
            "{image}"
        );
    }
    assert_eq!(db.vm_using_image(Uuid::new_v4()).await.unwrap(), None);
}

/// Write transactions that read first and then write, from many tasks at
/// once (the shape that failed with "database is locked" on SQLite): none
/// fails.
async fn concurrent_write_transactions(db: Database) {
    let cluster = cluster(&db, "3.3").await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let db = db.clone();
        let cluster_id = cluster.id;
        tasks.push(tokio::spawn(async move {
            let vm = new_vm(cluster_id);
            let disk = VmDisk {
                vm_id: vm.id,
                disk_id: Uuid::new_v4(),
                domain_id: vm.disk_domain_id,
                image_id: Uuid::new_v4(),
                capacity_bytes: 1 << 30,
            };
            let active = new_snapshot(vm.id, SnapshotType::Active, None);
            db.create_vm_with_active(&vm, std::slice::from_ref(&disk), &active, &[disk_volume(&disk)])
                .await?;
            let s = new_snapshot(vm.id, SnapshotType::Regular, None);
            db.create_snapshot(&s, &[disk_volume(&disk)]).await?;
            db.remove_snapshot_row(s.id).await.map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(db.list_vms_in_cluster(cluster.id).await.unwrap().len(), 64);
}

fn new_saga(operation_id: Uuid) -> NewSaga {
    NewSaga {
        id: Uuid::new_v4(),
        name: "snapshot_create".into(),
        params: json!({"k": 1}),
        owner: "test".into(),
        operation_id: Some(operation_id),
    }
}

async fn accept_operation_is_one_transaction(db: Database) {
    let vm = vm(&db).await;
    let locked_error = |holder: Uuid| format!("FAILED_PRECONDITION: VM_LOCKED: held by {holder}");
    let new = NewOperation {
        id: Uuid::new_v4(),
        kind: "create_snapshot".into(),
        vm_id: Some(vm.id),
        request_id: Some(Uuid::new_v4().to_string()),
        warnings: vec!["w".into()],
    };
    let saga = new_saga(new.id);
    let Accepted::Started {
        operation,
        saga: recorded,
    } = db
        .accept_operation(&new, Some("fp"), Some(vm.id), &locked_error, &saga, "lock_vm")
        .await
        .unwrap()
    else {
        panic!("the VM was free");
    };
    // What it answers is what it stored.
    assert_eq!(db.get_operation(new.id).await.unwrap(), operation);
    assert_eq!(operation.state, OperationState::Running);
    assert_eq!(operation.request_fingerprint.as_deref(), Some("fp"));
    assert_eq!(db.get_saga(saga.id).await.unwrap(), recorded);
    assert_eq!(recorded.state, SagaState::Running);
    assert_eq!(db.get_vm(vm.id).await.unwrap().lock_operation_id, Some(new.id));
    let events = db.saga_node_events(saga.id).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        (
            events[0].node_id,
            events[0].node_name.as_deref(),
            events[0].event_type
        ),
        (0, Some("lock_vm"), SagaNodeEventType::Started)
    );

    // A second operation on the locked VM is recorded FAILED, naming the
    // holder, with no saga and without touching the lock.
    let second = NewOperation {
        id: Uuid::new_v4(),
        request_id: Some(Uuid::new_v4().to_string()),
        ..new.clone()
    };
    let second_saga = new_saga(second.id);
    match db
        .accept_operation(&second, None, Some(vm.id), &locked_error, &second_saga, "lock_vm")
        .await
        .unwrap()
    {
        Accepted::VmLocked { operation, holder } => {
            assert_eq!(holder, new.id);
            assert_eq!(operation.state, OperationState::Failed);
            assert_eq!(db.get_operation(second.id).await.unwrap(), operation);
            assert_eq!(
                operation.error.as_deref(),
                Some(format!("FAILED_PRECONDITION: VM_LOCKED: held by {}", new.id).as_str())
            );
        }
        other => panic!("the VM was locked: {other:?}"),
    }
    assert!(db.get_saga(second_saga.id).await.unwrap_err().is_not_found());
    assert_eq!(db.get_vm(vm.id).await.unwrap().lock_operation_id, Some(new.id));

    // A reused request id records nothing (the operation, the lock and the
    // saga roll back together).
    db.unlock_vm(vm.id, new.id).await.unwrap();
    let reuse = NewOperation {
        id: Uuid::new_v4(),
        ..new.clone()
    };
    let reuse_saga = new_saga(reuse.id);
    let err = db
        .accept_operation(&reuse, None, Some(vm.id), &locked_error, &reuse_saga, "lock_vm")
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    assert!(db.get_operation(reuse.id).await.unwrap_err().is_not_found());
    assert!(db.get_saga(reuse_saga.id).await.unwrap_err().is_not_found());
    assert_eq!(db.get_vm(vm.id).await.unwrap().lock_operation_id, None);

    // A VM that does not exist: nothing recorded.
    let ghost = NewOperation {
        id: Uuid::new_v4(),
        request_id: None,
        ..new.clone()
    };
    let ghost_saga = new_saga(ghost.id);
    let err = db
        .accept_operation(
            &ghost,
            None,
            Some(Uuid::new_v4()),
            &locked_error,
            &ghost_saga,
            "lock_vm",
        )
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert!(db.get_operation(ghost.id).await.unwrap_err().is_not_found());

    // Without a lock (an operation that creates its VM).
    let free = NewOperation {
        id: Uuid::new_v4(),
        vm_id: None,
        request_id: None,
        ..new.clone()
    };
    let free_saga = new_saga(free.id);
    assert!(matches!(
        db.accept_operation(&free, None, None, &locked_error, &free_saga, "lock_vm")
            .await
            .unwrap(),
        Accepted::Started { .. }
    ));
}

async fn finish_saga_ends_log_operation_and_saga_together(db: Database) {
    let op = operation(&db, None).await;
    let saga = new_saga(op);
    db.create_saga(&saga).await.unwrap();
    let output = json!({"snapshot_id": "x"});
    let ended = db
        .finish_saga(
            (saga.id, 0),
            &[ev(3, SagaNodeEventType::Succeeded, Some(&output))],
            op,
            OperationState::Succeeded,
            None,
            Some(&output),
        )
        .await
        .unwrap();
    // The operation as it ended, as a read of it gives it (what watchers
    // are pushed).
    assert_eq!(ended, Some(db.get_operation(op).await.unwrap()));
    let events = db.saga_node_events(saga.id).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].node_id, events[0].event_type),
        (3, SagaNodeEventType::Succeeded)
    );
    assert_eq!(events[0].data, Some(output.clone()));
    let o = db.get_operation(op).await.unwrap();
    assert_eq!(
        (o.state, o.result),
        (OperationState::Succeeded, Some(output.clone()))
    );
    assert_eq!(db.get_saga(saga.id).await.unwrap().state, SagaState::Done);
    // A replay is a no-op (nothing ended now); another outcome is refused,
    // and changes nothing.
    let replayed = db
        .finish_saga(
            (saga.id, 0),
            &[ev(3, SagaNodeEventType::Succeeded, Some(&output))],
            op,
            OperationState::Succeeded,
            None,
            Some(&output),
        )
        .await
        .unwrap();
    assert_eq!(replayed, None);
    let err = db
        .finish_saga(
            (saga.id, 0),
            &[],
            op,
            OperationState::Failed,
            Some("INTERNAL: x"),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    assert_eq!(
        db.get_operation(op).await.unwrap().state,
        OperationState::Succeeded
    );

    // The operation's refusal rolls the log event back too.
    let op2 = operation(&db, None).await;
    let saga2 = new_saga(op2);
    db.create_saga(&saga2).await.unwrap();
    db.finish_operation(op2, OperationState::Cancelled, Some("CANCELLED: x"), None)
        .await
        .unwrap();
    let err = db
        .finish_saga(
            (saga2.id, 0),
            &[ev(1, SagaNodeEventType::Succeeded, Some(&output))],
            op2,
            OperationState::Succeeded,
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::Conflict { .. }), "{err:?}");
    assert!(db.saga_node_events(saga2.id).await.unwrap().is_empty());
    assert_eq!(db.get_saga(saga2.id).await.unwrap().state, SagaState::Running);
}

/// Appends from many sagas at once (group-committed on SQLite): each is
/// answered for itself; one for a saga that does not exist fails alone.
async fn concurrent_log_appends_are_each_answered(db: Database) {
    let mut sagas = Vec::new();
    for _ in 0..40 {
        let op = operation(&db, None).await;
        let saga = new_saga(op);
        db.create_saga(&saga).await.unwrap();
        sagas.push(saga.id);
    }
    let ghost = Uuid::new_v4();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in sagas.iter().copied().chain([ghost]).enumerate() {
        let db = db.clone();
        tasks.spawn(async move {
            let out = json!({ "i": i });
            for node in 0..3u32 {
                let events = [
                    ev(node, SagaNodeEventType::Succeeded, Some(&out)),
                    ev(node + 1, SagaNodeEventType::Started, None),
                ];
                if let Err(e) = db.append_saga_node_events(id, 0, &events).await {
                    return (id, Err(e));
                }
            }
            (id, Ok(()))
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (id, result) = r.unwrap();
        if id == ghost {
            assert!(matches!(result, Err(DbError::ForeignKey { .. })), "{result:?}");
        } else {
            result.unwrap();
            assert_eq!(db.saga_node_events(id).await.unwrap().len(), 6);
        }
    }
}

/// The one-read checks: the VM's snapshot types, and its ACTIVE snapshot's id.
async fn snapshot_types_and_active_id(db: Database) {
    let f = flow_vm(&db).await;
    assert_eq!(db.active_snapshot_id(f.vm.id).await.unwrap(), f.active_id);
    assert_eq!(db.snapshot_types(f.vm.id).await.unwrap(), [SnapshotType::Active]);
    take_snapshot(&db, f.vm.id, None).await;
    take_snapshot(&db, f.vm.id, None).await;
    let mut types = db.snapshot_types(f.vm.id).await.unwrap();
    types.sort_by_key(|t| t.as_str());
    assert_eq!(types, [SnapshotType::Active, SnapshotType::Regular]);
    assert_eq!(
        db.active_snapshot_id(f.vm.id).await.unwrap(),
        db.active_snapshot(f.vm.id).await.unwrap().id
    );
    let ghost = Uuid::new_v4();
    assert!(db.active_snapshot_id(ghost).await.unwrap_err().is_not_found());
    assert!(db.snapshot_types(ghost).await.unwrap().is_empty());
}

/// A suspended VM is stored Down with its `suspended` flag: it reads back
/// SUSPENDED, a Down-to-ImageLocked transition does not take it, a host's
/// report does not overwrite it, it is counted apart, and any other status
/// clears the flag.
async fn suspended_is_down_with_a_flag(db: Database) {
    let new = vm(&db).await;
    db.set_vm_status(new.id, VmStatus::Up).await.unwrap();
    db.set_vm_status(new.id, VmStatus::Suspended).await.unwrap();
    assert_eq!(db.get_vm(new.id).await.unwrap().status, VmStatus::Suspended);
    assert!(!db
        .transition_vm_status(new.id, VmStatus::Down, VmStatus::ImageLocked)
        .await
        .unwrap());
    assert!(!db.record_host_status(new.id, VmStatus::Down).await.unwrap());
    assert!(!db.record_host_status(new.id, VmStatus::Up).await.unwrap());
    assert_eq!(db.get_vm(new.id).await.unwrap().status, VmStatus::Suspended);
    let counts = db.count_vms_by_status().await.unwrap();
    assert!(counts.contains(&("Suspended".to_string(), 1)), "{counts:?}");
    assert!(!counts.iter().any(|(s, _)| s == "Down"), "{counts:?}");
    assert!(db
        .transition_vm_status(new.id, VmStatus::Suspended, VmStatus::RestoringState)
        .await
        .unwrap());
    assert_eq!(db.get_vm(new.id).await.unwrap().status, VmStatus::RestoringState);
    db.set_vm_status(new.id, VmStatus::Suspended).await.unwrap();
    db.set_vm_status(new.id, VmStatus::Down).await.unwrap();
    assert_eq!(db.get_vm(new.id).await.unwrap().status, VmStatus::Down);
    assert!(db
        .transition_vm_status(new.id, VmStatus::Down, VmStatus::ImageLocked)
        .await
        .unwrap());
}

/// The ACTIVE snapshot's disks with the VM's recorded capacities, in one
/// read: the same disks as `active_snapshot`, this VM's only, None for a
/// disk the VM does not record; NotFound for a VM without an ACTIVE one.
async fn active_disks_with_capacity(db: Database) {
    let f = flow_vm(&db).await;
    let g = flow_vm(&db).await;
    take_snapshot(&db, f.vm.id, None).await;
    let active = db.active_snapshot(f.vm.id).await.unwrap();
    let got = db.active_disks_with_capacity(f.vm.id).await.unwrap();
    let want: Vec<_> = active.disks.iter().map(|d| (*d, Some(1u64 << 30))).collect();
    assert_eq!(got, want);
    assert_eq!(got.len(), 2);
    let g_disks: Vec<_> = db
        .active_disks_with_capacity(g.vm.id)
        .await
        .unwrap()
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    assert_eq!(g_disks, db.active_snapshot(g.vm.id).await.unwrap().disks);

    // A VM that records no disk: its active's disks come with None.
    let cluster = cluster(&db, "3.3").await;
    let bare = new_vm(cluster.id);
    let base = vec![SnapshotDisk {
        disk_id: Uuid::new_v4(),
        volume: VolumeRef {
            domain_id: bare.disk_domain_id,
            image_id: Uuid::new_v4(),
            volume_id: Uuid::new_v4(),
        },
    }];
    let bare_active = new_snapshot(bare.id, SnapshotType::Active, None);
    db.create_vm_with_active(&bare, &[], &bare_active, &base)
        .await
        .unwrap();
    assert_eq!(
        db.active_disks_with_capacity(bare.id).await.unwrap(),
        [(base[0], None)]
    );
    // An ACTIVE snapshot without disks; a VM without an ACTIVE snapshot.
    let diskless = new_vm(cluster.id);
    db.create_vm_with_active(
        &diskless,
        &[],
        &new_snapshot(diskless.id, SnapshotType::Active, None),
        &[],
    )
    .await
    .unwrap();
    assert!(db
        .active_disks_with_capacity(diskless.id)
        .await
        .unwrap()
        .is_empty());
    let plain = vm(&db).await;
    assert!(db
        .active_disks_with_capacity(plain.id)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(db
        .active_disks_with_capacity(Uuid::new_v4())
        .await
        .unwrap_err()
        .is_not_found());
}

/// `host_cached` and `cluster_cached` answer what the database holds, and
/// a delete through the same handle is seen at once (NotFound), not after
/// the rows' time in the cache.
async fn cached_hosts_and_clusters_go_with_their_delete(db: Database) {
    let c = cluster(&db, "3.2").await;
    let host = NewHost {
        id: Uuid::new_v4(),
        name: format!("host-{}", Uuid::new_v4().simple()),
        cluster_id: c.id,
        host_address: "http://h:50061".into(),
        storage_address: "http://h:50062".into(),
    };
    db.create_host(&host).await.unwrap();
    assert_eq!(
        db.host_cached(host.id).await.unwrap(),
        db.get_host(host.id).await.unwrap()
    );
    // Read again from the cache: the same.
    assert_eq!(
        db.host_cached(host.id).await.unwrap(),
        db.get_host(host.id).await.unwrap()
    );
    let cached = db.cluster_cached(c.id).await.unwrap();
    assert_eq!(cached, db.get_cluster(c.id).await.unwrap());
    assert_eq!(cached.compatibility_version.to_string(), "3.2");
    assert!(db.host_cached(Uuid::new_v4()).await.unwrap_err().is_not_found());
    assert!(db
        .cluster_cached(Uuid::new_v4())
        .await
        .unwrap_err()
        .is_not_found());

    db.remove_host(host.id).await.unwrap();
    assert!(db.host_cached(host.id).await.unwrap_err().is_not_found());
    db.delete_cluster(c.id).await.unwrap();
    assert!(db.cluster_cached(c.id).await.unwrap_err().is_not_found());
}

/// The VM read with what its snapshots say of it: in preview while it has
/// a PREVIEW snapshot, running stateless while it has a STATELESS one;
/// another VM's snapshots do not count; NotFound for a VM that is not.
async fn vm_with_snapshot_state(db: Database) {
    let f = flow_vm(&db).await;
    let g = flow_vm(&db).await;
    let neither = VmSnapshotState::default();
    let s1 = take_snapshot(&db, f.vm.id, None).await;
    let (vm, state) = db.get_vm_with_snapshot_state(f.vm.id).await.unwrap();
    assert_eq!(vm, db.get_vm(f.vm.id).await.unwrap());
    assert_eq!(state, neither);

    let new_active = new_snapshot(f.vm.id, SnapshotType::Active, None);
    db.preview_begin(f.vm.id, s1.id, &new_active, &overlays(&s1.disks), None)
        .await
        .unwrap();
    let (_, state) = db.get_vm_with_snapshot_state(f.vm.id).await.unwrap();
    assert_eq!(
        state,
        VmSnapshotState {
            in_preview: true,
            stateless_run: false
        }
    );
    assert_eq!(db.get_vm_with_snapshot_state(g.vm.id).await.unwrap().1, neither);

    let before = db.active_snapshot(g.vm.id).await.unwrap();
    let run_active = new_snapshot(g.vm.id, SnapshotType::Active, None);
    db.stateless_begin(g.vm.id, &run_active, &overlays(&before.disks), None)
        .await
        .unwrap();
    assert_eq!(
        db.get_vm_with_snapshot_state(g.vm.id).await.unwrap().1,
        VmSnapshotState {
            in_preview: false,
            stateless_run: true
        }
    );
    assert!(db
        .get_vm_with_snapshot_state(Uuid::new_v4())
        .await
        .unwrap_err()
        .is_not_found());
}
