//! The repository's tests. Every test function runs twice: on SQLite (a file
//! in a temporary directory) and on PostgreSQL, in a database of its own
//! created through the server named by RAMSNAP_TEST_PG_URL and dropped after.

use ramsnap_snapshot::db::{
    Backend, CompatibilityVersion, Database, DbError, MemoryVolume, NewCluster, NewOperation, NewSaga,
    NewSnapshot, NewVm, OperationState, SagaNodeEventType, SagaState, SnapshotDisk, SnapshotStatus,
    SnapshotType, VmDisk, VmStatus, VolumeRef,
};
use serde_json::json;
use sqlx::Executor;
use std::future::Future;
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
        .execute(format!("CREATE DATABASE {name}").as_str())
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
        .execute(format!("DROP DATABASE {name} WITH (FORCE)").as_str())
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
    operation_request_id,
    operation_progress_and_finish,
    saga_node_events_are_idempotent,
    unfinished_sagas,
    not_found_and_foreign_keys,
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
    assert_eq!(db.get_vm_by_name(&new.name).await.unwrap().id, new.id);

    let other = new_vm(cluster.id);
    db.create_vm(&other).await.unwrap();
    assert!(!db.get_vm(other.id).await.unwrap().stateless);
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

    let listed: Vec<Uuid> = db
        .list_snapshots(vm.id)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&active.id) && listed.contains(&regular.id));

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

async fn operation_request_id(db: Database) {
    let vm = vm(&db).await;
    let new = NewOperation {
        id: Uuid::new_v4(),
        kind: "snapshot_create".into(),
        vm_id: Some(vm.id),
        request_id: Some("req-1".into()),
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
        .append_saga_node_event(saga.id, 0, SagaNodeEventType::Started, None)
        .await
        .unwrap());
    assert!(db
        .append_saga_node_event(saga.id, 0, SagaNodeEventType::Succeeded, Some(&output))
        .await
        .unwrap());
    // The same event twice: one row, and the first data wins.
    assert!(!db
        .append_saga_node_event(saga.id, 0, SagaNodeEventType::Succeeded, Some(&json!(1)))
        .await
        .unwrap());
    assert!(!db
        .append_saga_node_event(saga.id, 0, SagaNodeEventType::Started, None)
        .await
        .unwrap());
    assert!(db
        .append_saga_node_event(saga.id, 1, SagaNodeEventType::Started, None)
        .await
        .unwrap());
    assert!(db
        .append_saga_node_event(saga.id, 1, SagaNodeEventType::Failed, Some(&json!("boom")))
        .await
        .unwrap());
    assert!(db
        .append_saga_node_event(saga.id, 0, SagaNodeEventType::UndoStarted, None)
        .await
        .unwrap());
    assert!(db
        .append_saga_node_event(saga.id, 0, SagaNodeEventType::UndoFinished, None)
        .await
        .unwrap());

    let events = db.saga_node_events(saga.id).await.unwrap();
    let seen: Vec<(u32, SagaNodeEventType)> = events.iter().map(|e| (e.node_id, e.event_type)).collect();
    assert_eq!(seen.len(), 6);
    let position = |n, t| seen.iter().position(|e| *e == (n, t)).unwrap();
    assert!(position(0, SagaNodeEventType::Started) < position(0, SagaNodeEventType::Succeeded));
    assert!(position(0, SagaNodeEventType::UndoStarted) < position(0, SagaNodeEventType::UndoFinished));
    assert!(position(1, SagaNodeEventType::Started) < position(1, SagaNodeEventType::Failed));
    assert!(events.windows(2).all(|w| w[0].created_at <= w[1].created_at));
    let succeeded = events
        .iter()
        .find(|e| e.event_type == SagaNodeEventType::Succeeded)
        .unwrap();
    assert_eq!(succeeded.data, Some(output));

    let err = db
        .append_saga_node_event(Uuid::new_v4(), 0, SagaNodeEventType::Started, None)
        .await
        .unwrap_err();
    assert!(matches!(err, DbError::ForeignKey { .. }), "{err:?}");
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
    db.set_saga_state(ids[1], SagaState::Unwinding).await.unwrap();
    db.set_saga_state(ids[2], SagaState::Done).await.unwrap();
    db.set_saga_state(ids[3], SagaState::Abandoned).await.unwrap();
    db.set_saga_owner(ids[0], "coordinator-2").await.unwrap();

    let unfinished = db.list_unfinished_sagas().await.unwrap();
    let mut got: Vec<Uuid> = unfinished.iter().map(|s| s.id).collect();
    got.sort();
    let mut expected = vec![ids[0], ids[1]];
    expected.sort();
    assert_eq!(got, expected);
    let adopted = unfinished.iter().find(|s| s.id == ids[0]).unwrap();
    assert_eq!(adopted.owner, "coordinator-2");
    assert_eq!(adopted.params, json!({}));
    assert!(db
        .set_saga_state(Uuid::new_v4(), SagaState::Done)
        .await
        .unwrap_err()
        .is_not_found());
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
