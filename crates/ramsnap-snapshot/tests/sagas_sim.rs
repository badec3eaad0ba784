//! Simulation tests of the coordinator's sagas: the real coordinator (SQLite
//! in a temporary file) in-process over real gRPC, a real StorageService
//! in-process on a FILE domain in a temporary directory, and a SIMULATED
//! HostService ([`support::SimulatedHost`]) that records what it is asked,
//! reports the statuses a real host reports (RESTORING_STATE then UP when
//! it restores memory, POWERING_UP then UP when it boots) and takes
//! snapshots without a guest. After each flow the storage inventory is
//! checked against the database: every volume is reachable from a
//! snapshot, and every volume a snapshot needs exists.
//!
//! The environment, the flows and the scenarios are in `support/`, shared
//! with `crash_restart.rs` (the same scenarios with the coordinator as a
//! process of its own, killed and restarted at every saga node).
mod support;

use ramsnap_proto::common::v1 as common;
use ramsnap_proto::host::v1 as host;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::storage::v1 as storage;
use ramsnap_snapshot::app::App;
use ramsnap_snapshot::db::Database;
use ramsnap_snapshot::saga::{Executor, Failpoints};
use ramsnap_snapshot::{sagas, status, Coordinator};
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use support::{act, bad_field, memory_ref, precondition, serve, setup, state, Agents, Env, HostCall, MIB};
use tokio::sync::{oneshot, Notify};
use tonic::Code;
use uuid::Uuid;

// ---------------------------------------------------------------------------
// The coordinator in-process, on a SQLite file beside the agents' domain.

struct Sim {
    env: Env,
    db_url: String,
    app: Arc<App>,
    coordinator_stop: Option<oneshot::Sender<()>>,
}

impl Deref for Sim {
    type Target = Env;
    fn deref(&self) -> &Env {
        &self.env
    }
}

impl DerefMut for Sim {
    fn deref_mut(&mut self) -> &mut Env {
        &mut self.env
    }
}

/// The coordinator as `Coordinator::open` makes it, but with failpoints
/// given here (the environment variable is process-wide).
async fn open_coordinator(db_url: &str, failpoints: &str) -> Coordinator {
    let db = Database::connect(db_url).await.unwrap();
    db.migrate().await.unwrap();
    let app = App::new(db.clone());
    let notify_app = Arc::downgrade(&app);
    let exec = Executor::new(
        db,
        app.clone(),
        sagas::all(),
        Failpoints::parse(failpoints),
        Arc::new(move |op| {
            if let Some(app) = notify_app.upgrade() {
                app.notify_operation(op);
            }
        }),
    );
    app.set_executor(exec.clone());
    exec.recover().await.unwrap();
    status::follow_running(&app).await;
    Coordinator { app }
}

impl Sim {
    async fn start(compatibility: &str) -> Sim {
        Sim::start_with(compatibility, "").await
    }

    async fn start_with(compatibility: &str, failpoints: &str) -> Sim {
        let agents = Agents::start().await;
        let db_url = format!("sqlite:{}", agents.dir.path().join("coordinator.db").display());
        let coordinator = open_coordinator(&db_url, failpoints).await;
        let (addr, coordinator_stop) = serve(coordinator.service_set()).await;
        let env = Env::new(agents, &addr, compatibility).await;
        Sim {
            env,
            db_url,
            app: coordinator.app.clone(),
            coordinator_stop: Some(coordinator_stop),
        }
    }

    /// Restarts the coordinator on the same database, with these failpoints
    /// (the setup of a scenario runs without them).
    async fn restart_coordinator(&mut self, failpoints: &str) {
        for vm in self.app.db.list_vms().await.unwrap() {
            status::unfollow(&self.app, vm.id);
        }
        if let Some(stop) = self.coordinator_stop.take() {
            let _ = stop.send(());
        }
        let coordinator = open_coordinator(&self.db_url, failpoints).await;
        let (addr, stop) = serve(coordinator.service_set()).await;
        self.env.reconnect(&addr).await;
        self.app = coordinator.app.clone();
        self.coordinator_stop = Some(stop);
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(s) = self.coordinator_stop.take() {
            let _ = s.send(());
        }
    }
}

// ---------------------------------------------------------------------------
// The flows.

#[tokio::test]
async fn simulation_create_vm_validates_and_makes_base_volumes() {
    let mut sim = Sim::start("3.3").await;
    let good = |sim: &Sim| pb::CreateVmRequest {
        request_id: String::new(),
        name: "web".into(),
        cluster_id: sim.cluster_id.clone(),
        memory_bytes: 64 * MIB,
        vcpus: 1,
        stateless: false,
        disks: vec![pb::DiskSpec {
            domain_id: sim.domain.clone(),
            capacity_bytes: 32 * MIB,
        }],
        kernel: String::new(),
        initrd: String::new(),
        cmdline: String::new(),
    };
    type Edit = fn(&mut pb::CreateVmRequest);
    let invalid: [(Edit, &str); 7] = [
        (|r| r.name.clear(), "name"),
        (|r| r.memory_bytes = 0, "memory_bytes"),
        (|r| r.vcpus = 0, "vcpus"),
        (|r| r.disks.clear(), "disks"),
        (|r| r.disks[0].capacity_bytes = 0, "disks[0].capacity_bytes"),
        (|r| r.disks[0].domain_id = "nope".into(), "disks[0].domain_id"),
        (|r| r.kernel = "../vmlinuz".into(), "kernel"),
    ];
    for (edit, field) in invalid {
        let mut req = good(&sim);
        edit(&mut req);
        let err = sim.vms.create_vm(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert_eq!(bad_field(&err), field);
    }
    let mut req = good(&sim);
    req.initrd = "boot/initrd".into();
    assert_eq!(bad_field(&sim.vms.create_vm(req).await.unwrap_err()), "initrd");
    let mut req = good(&sim);
    req.cluster_id = Uuid::new_v4().to_string();
    assert_eq!(sim.vms.create_vm(req).await.unwrap_err().code(), Code::NotFound);
    let mut req = good(&sim);
    req.disks[0].domain_id = Uuid::new_v4().to_string();
    assert_eq!(sim.vms.create_vm(req).await.unwrap_err().code(), Code::NotFound);
    assert!(sim.inventory().await.is_empty());

    let vm_id = sim.create_vm_with("db", 3, false).await;
    let vm = sim.vm(&vm_id).await;
    assert_eq!(vm.status, pb::VmStatus::Down as i32);
    assert_eq!(vm.disks.len(), 3);
    // The disks keep the order they were given in (vda, vdb, vdc).
    let capacities: Vec<u64> = vm.disks.iter().map(|d| d.capacity_bytes).collect();
    assert_eq!(capacities, vec![32 * MIB, 48 * MIB, 64 * MIB]);
    assert_eq!(
        (vm.kernel.as_str(), vm.initrd.as_str()),
        ("vmlinuz", "initrd.img")
    );
    let active = sim.active(&vm_id).await;
    assert!(!active.has_memory);
    let volumes = sim.inventory().await;
    assert_eq!(volumes.len(), 3);
    for v in &volumes {
        assert_eq!(v.format, storage::VolumeFormat::Cow as i32);
        assert!(v.parent_volume_id.is_empty());
        let r = v.r#ref.as_ref().unwrap();
        assert!(vm
            .disks
            .iter()
            .any(|d| d.image_id == r.image_id && d.leaf_volume_id == r.volume_id));
    }
    let taken = pb::CreateVmRequest {
        name: "db".into(),
        ..good(&sim)
    };
    let err = sim.vms.create_vm(taken).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_snapshot_with_and_without_memory() {
    let mut sim = Sim::start("3.3").await;
    let vm = sim.create_vm("app").await;
    // A down VM's memory cannot be saved.
    let err = sim
        .snaps
        .create_snapshot(Env::snapshot_req(&vm, true, "x"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), precondition(&err).as_str()),
        (Code::FailedPrecondition, "VM_NOT_RUNNING")
    );
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses.first(), Some(&pb::VmStatus::PoweringUp), "{statuses:?}");
    assert!(!statuses.contains(&pb::VmStatus::RestoringState));
    let HostCall::Run {
        restore_memory,
        name,
        kernel,
        disks,
        ..
    } = sim.host.last_run(&vm)
    else {
        unreachable!()
    };
    assert!(restore_memory.is_none());
    assert!(name.starts_with("ramsnap-"));
    assert_eq!(kernel, "vmlinuz");
    let vm_info = sim.vm(&vm).await;
    let leaves: Vec<String> = vm_info.disks.iter().map(|d| d.leaf_volume_id.clone()).collect();
    assert_eq!(
        disks.iter().map(|d| d.volume_id.clone()).collect::<Vec<_>>(),
        leaves
    );
    assert_eq!(vm_info.host_id, sim.host_id);

    // Test case 1: with memory.
    let with = sim.snapshot(&vm, true, "with memory").await;
    let s = sim.get_snapshot(&with).await.unwrap();
    assert!(s.has_memory);
    assert!(sim.exists(memory_ref(&s).dump.as_ref().unwrap()).await);
    // Test case 2: without memory.
    let without = sim.snapshot(&vm, false, "disk only").await;
    assert!(!sim.get_snapshot(&without).await.unwrap().has_memory);
    let snaps: Vec<(bool, bool)> = sim
        .host
        .calls()
        .iter()
        .filter_map(|c| match c {
            HostCall::Snapshot {
                vm_id,
                memory,
                memory_saved,
                ..
            } if *vm_id == vm => Some((*memory, *memory_saved)),
            _ => None,
        })
        .collect();
    assert_eq!(snaps, vec![(true, true), (false, false)]);
    // ListSnapshots: oldest first, the active one last.
    let list = sim.snapshots(&vm).await;
    assert_eq!(list.len(), 3);
    assert_eq!(list[0].snapshot_id, with);
    assert_eq!(list[2].r#type, pb::SnapshotType::Active as i32);
    assert!(!list[2].has_memory);
    sim.assert_no_orphans().await;
    // A running VM's snapshot cannot be removed (no live merge).
    let err = sim.remove_snapshot(&vm, &with).await.unwrap_err();
    assert_eq!(precondition(&err), "VM_NOT_DOWN");
    sim.stop(&vm).await;
    // Stopping a down VM succeeds.
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_below_3_3_refuses_memory_and_ignores_restore() {
    let mut sim = Sim::start("3.2").await;
    let vm = sim.create_vm("legacy").await;
    sim.run(&vm, false).await;
    // Test case 3: no Save Memory below 3.3; a disk-only snapshot works.
    let err = sim
        .snaps
        .create_snapshot(Env::snapshot_req(&vm, true, "x"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), precondition(&err).as_str()),
        (Code::FailedPrecondition, "CLUSTER_BELOW_3_3")
    );
    let s = sim.snapshot(&vm, false, "disk only").await;
    assert!(!sim.get_snapshot(&s).await.unwrap().has_memory);
    sim.stop(&vm).await;

    // A snapshot with memory in a 3.2 cluster (as an import would bring):
    // preview test case 3, the restore is ignored with a warning.
    let mut storage = sim.storage.clone();
    let mem = storage
        .create_memory_volumes(storage::CreateMemoryVolumesRequest {
            request_id: Uuid::new_v4().to_string(),
            domain_id: sim.domain.clone(),
            memory_bytes: 64 * MIB,
            mode: storage::MemoryDumpMode::Paused as i32,
            description: "imported".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let r = |v: &storage::Volume| {
        let r = v.r#ref.clone().unwrap();
        ramsnap_snapshot::db::VolumeRef {
            domain_id: r.domain_id.parse().unwrap(),
            image_id: r.image_id.parse().unwrap(),
            volume_id: r.volume_id.parse().unwrap(),
        }
    };
    let memory = ramsnap_snapshot::db::MemoryVolume {
        dump: r(mem.dump.as_ref().unwrap()),
        metadata: r(mem.metadata.as_ref().unwrap()),
    };
    sim.app.db.set_memory(s.parse().unwrap(), &memory).await.unwrap();
    let preview = sim.preview(&vm, &s, true).await;
    assert_eq!(preview.warnings.len(), 1, "{:?}", preview.warnings);
    assert!(preview.warnings[0].contains("3.3"), "{:?}", preview.warnings);
    assert!(!sim.active(&vm).await.has_memory);
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses.first(), Some(&pb::VmStatus::PoweringUp), "{statuses:?}");
    let HostCall::Run { restore_memory, .. } = sim.host.last_run(&vm) else {
        unreachable!()
    };
    assert!(restore_memory.is_none());
    sim.stop(&vm).await;
    sim.undo(&vm).await;
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_preview_with_restore_then_run_restores_once() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.vm_with_memory_snapshot("restore").await;
    let s1_snap = sim.get_snapshot(&s1).await.unwrap();
    let before = sim.active(&vm).await;
    // Preview test case 1: restore memory.
    let r = sim.preview(&vm, &s1, true).await;
    assert!(r.warnings.is_empty());
    let op = r.operation.unwrap();
    assert_eq!(op.kind, "preview_snapshot");
    assert_eq!(sim.vm(&vm).await.status, pb::VmStatus::Down as i32);
    let active = sim.active(&vm).await;
    assert_eq!(
        active.memory, s1_snap.memory,
        "the new ACTIVE points at the snapshot's memory"
    );
    assert_ne!(active.snapshot_id, before.snapshot_id);
    let preview = sim.of_type(&vm, pb::SnapshotType::Preview).await.unwrap();
    assert_eq!(preview.snapshot_id, before.snapshot_id);
    let previewed = sim.get_snapshot(&s1).await.unwrap();
    assert_eq!(previewed.status, pb::SnapshotStatus::InPreview as i32);
    // The new leaves branch off the snapshot's volumes.
    let volumes = sim.inventory().await;
    for (d, sd) in active.disks.iter().zip(&s1_snap.disks) {
        let leaf = volumes
            .iter()
            .find(|v| v.r#ref.as_ref().unwrap().volume_id == d.volume.as_ref().unwrap().volume_id)
            .unwrap();
        assert_eq!(leaf.parent_volume_id, sd.volume.as_ref().unwrap().volume_id);
    }
    sim.assert_no_orphans().await;
    // No second preview, no removal while in preview.
    let err = sim
        .snaps
        .preview_snapshot(pb::PreviewSnapshotRequest {
            request_id: String::new(),
            vm_id: vm.clone(),
            snapshot_id: s1.clone(),
            restore_memory: false,
        })
        .await
        .unwrap_err();
    assert_eq!(precondition(&err), "SNAPSHOT_IN_PREVIEW");
    assert_eq!(
        precondition(&sim.remove_snapshot(&vm, &s1).await.unwrap_err()),
        "SNAPSHOT_IN_PREVIEW"
    );

    // Run: RESTORING_STATE then UP, from the snapshot's memory.
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses, vec![pb::VmStatus::RestoringState, pb::VmStatus::Up]);
    let HostCall::Run { restore_memory, .. } = sim.host.last_run(&vm) else {
        unreachable!()
    };
    assert_eq!(restore_memory, s1_snap.memory);
    // Cleared from the ACTIVE snapshot; the previewed snapshot keeps it.
    assert!(!sim.active(&vm).await.has_memory);
    assert!(sim.get_snapshot(&s1).await.unwrap().has_memory);
    assert!(sim.exists(memory_ref(&s1_snap).dump.as_ref().unwrap()).await);
    sim.stop(&vm).await;
    // The second run boots.
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses[0], pb::VmStatus::PoweringUp, "{statuses:?}");
    let HostCall::Run { restore_memory, .. } = sim.host.last_run(&vm) else {
        unreachable!()
    };
    assert!(restore_memory.is_none());
    sim.stop(&vm).await;

    // Undo: back to the state before the preview, its leaves gone.
    sim.undo(&vm).await;
    let active = sim.active(&vm).await;
    assert_eq!(active.snapshot_id, before.snapshot_id);
    assert_eq!(active.disks, before.disks);
    assert!(sim.of_type(&vm, pb::SnapshotType::Preview).await.is_none());
    assert_eq!(
        sim.get_snapshot(&s1).await.unwrap().status,
        pb::SnapshotStatus::Ok as i32
    );
    assert!(sim.exists(memory_ref(&s1_snap).dump.as_ref().unwrap()).await);
    sim.assert_no_orphans().await;
    let err = sim
        .snaps
        .undo_preview(pb::UndoPreviewRequest {
            request_id: String::new(),
            vm_id: vm.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(precondition(&err), "VM_NOT_IN_PREVIEW");
}

#[tokio::test]
async fn simulation_preview_without_restore_boots() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.vm_with_memory_snapshot("boots").await;
    // Preview test case 2.
    let r = sim.preview(&vm, &s1, false).await;
    assert!(r.warnings.is_empty());
    assert!(!sim.active(&vm).await.has_memory);
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses, vec![pb::VmStatus::PoweringUp, pb::VmStatus::Up]);
    let HostCall::Run { restore_memory, .. } = sim.host.last_run(&vm) else {
        unreachable!()
    };
    assert!(restore_memory.is_none());
    sim.stop(&vm).await;
    // Commit test case 2: the active snapshot appears without memory.
    sim.commit(&vm).await;
    assert!(!sim.active(&vm).await.has_memory);
    sim.assert_no_orphans().await;

    // Restore asked for a snapshot without memory: ignored, with a warning.
    let disk_only = sim.snapshot(&vm, false, "disk only").await;
    let r = sim.preview(&vm, &disk_only, true).await;
    assert_eq!(r.warnings.len(), 1);
    assert!(r.warnings[0].contains("no memory"), "{:?}", r.warnings);
    sim.undo(&vm).await;
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_commit_keeps_active_memory_and_removes_newer_snapshots() {
    let mut sim = Sim::start("3.3").await;
    let vm = sim.create_vm("commit").await;
    sim.run(&vm, false).await;
    let s1 = sim.snapshot(&vm, true, "s1").await;
    let s2 = sim.snapshot(&vm, true, "s2").await;
    let s3 = sim.snapshot(&vm, false, "s3").await;
    sim.stop(&vm).await;
    let s1_snap = sim.get_snapshot(&s1).await.unwrap();
    let s2_snap = sim.get_snapshot(&s2).await.unwrap();
    sim.preview(&vm, &s1, true).await;
    // Commit test case 1: the active snapshot appears with memory.
    sim.commit(&vm).await;
    let op = sim.app.db.list_operations(None).await.unwrap();
    assert!(op.iter().any(|o| o.kind == "commit_snapshot"));
    let active = sim.active(&vm).await;
    assert_eq!(active.memory, s1_snap.memory);
    let left: Vec<String> = sim
        .snapshots(&vm)
        .await
        .into_iter()
        .map(|s| s.snapshot_id)
        .collect();
    assert_eq!(left, vec![s1.clone(), active.snapshot_id.clone()]);
    for gone in [&s2, &s3] {
        assert_eq!(sim.get_snapshot(gone).await.unwrap_err().code(), Code::NotFound);
    }
    // The newer snapshots' memory went; the committed one's stays.
    assert!(!sim.exists(memory_ref(&s2_snap).dump.as_ref().unwrap()).await);
    assert!(!sim.exists(memory_ref(&s2_snap).metadata.as_ref().unwrap()).await);
    assert!(sim.exists(memory_ref(&s1_snap).dump.as_ref().unwrap()).await);
    sim.assert_no_orphans().await;
    assert_eq!(sim.vm(&vm).await.status, pb::VmStatus::Down as i32);

    // Run VM test case 1: restores, then boots.
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses[0], pb::VmStatus::RestoringState, "{statuses:?}");
    assert!(!sim.active(&vm).await.has_memory);
    sim.stop(&vm).await;
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses[0], pb::VmStatus::PoweringUp, "{statuses:?}");
    sim.stop(&vm).await;
    // s1 still holds its memory; removing it deletes the memory volumes.
    assert!(sim.exists(memory_ref(&s1_snap).dump.as_ref().unwrap()).await);
    let op = sim.remove_snapshot(&vm, &s1).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    assert_eq!(op.snapshot_id, s1);
    assert!(!sim.exists(memory_ref(&s1_snap).dump.as_ref().unwrap()).await);
    assert!(!sim.exists(memory_ref(&s1_snap).metadata.as_ref().unwrap()).await);
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_remove_snapshot_keeps_memory_the_active_shares() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.vm_with_memory_snapshot("shared").await;
    let s1_snap = sim.get_snapshot(&s1).await.unwrap();
    sim.preview(&vm, &s1, true).await;
    sim.commit(&vm).await;
    // The ACTIVE snapshot shares s1's memory: removing s1 keeps it.
    let op = sim.remove_snapshot(&vm, &s1).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    let dump = memory_ref(&s1_snap).dump.unwrap();
    assert!(sim.exists(&dump).await);
    assert_eq!(sim.active(&vm).await.memory, s1_snap.memory);
    sim.assert_no_orphans().await;
    // The first run restores it; nothing refers to it after: deleted.
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses[0], pb::VmStatus::RestoringState, "{statuses:?}");
    let HostCall::Run { restore_memory, .. } = sim.host.last_run(&vm) else {
        unreachable!()
    };
    assert_eq!(restore_memory, s1_snap.memory);
    assert!(!sim.exists(&dump).await);
    assert!(!sim.active(&vm).await.has_memory);
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_stateless_runs_restore_every_time() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.vm_with_memory_snapshot("stateless").await;
    let s1_snap = sim.get_snapshot(&s1).await.unwrap();
    sim.preview(&vm, &s1, true).await;
    // A stateless run is refused in preview.
    let err = sim
        .vms
        .run_vm(pb::RunVmRequest {
            request_id: String::new(),
            vm_id: vm.clone(),
            host_id: String::new(),
            run_stateless: true,
        })
        .await
        .unwrap_err();
    assert_eq!(precondition(&err), "VM_IN_PREVIEW");
    sim.commit(&vm).await;
    let committed = sim.active(&vm).await;
    // Run VM test case 2: every stateless run restores.
    for round in 0..2 {
        let statuses = sim.run(&vm, true).await;
        assert_eq!(
            statuses[0],
            pb::VmStatus::RestoringState,
            "round {round}: {statuses:?}"
        );
        let HostCall::Run {
            restore_memory,
            disks,
            ..
        } = sim.host.last_run(&vm)
        else {
            unreachable!()
        };
        assert_eq!(restore_memory, s1_snap.memory, "round {round}");
        let stateless = sim.of_type(&vm, pb::SnapshotType::Stateless).await.unwrap();
        assert_eq!(stateless.snapshot_id, committed.snapshot_id);
        assert_eq!(stateless.memory, s1_snap.memory);
        let active = sim.active(&vm).await;
        assert!(!active.has_memory, "the run's ACTIVE snapshot dropped the memory");
        // The run writes to overlays over the committed state.
        for (d, c) in disks.iter().zip(&committed.disks) {
            assert_ne!(d.volume_id, c.volume.as_ref().unwrap().volume_id);
        }
        // No snapshot of a VM that runs stateless (oVirt).
        let err = sim
            .snaps
            .create_snapshot(Env::snapshot_req(&vm, false, "x"))
            .await
            .unwrap_err();
        assert_eq!(precondition(&err), "VM_RUNNING_STATELESS");
        sim.assert_no_orphans().await;
        sim.stop(&vm).await;
        let back = sim.active(&vm).await;
        assert_eq!(back.snapshot_id, committed.snapshot_id);
        assert_eq!(back.disks, committed.disks);
        assert_eq!(back.memory, s1_snap.memory);
        assert!(sim.of_type(&vm, pb::SnapshotType::Stateless).await.is_none());
        sim.assert_no_orphans().await;
    }
    // A stateless run that ends without StopVm (the guest shut down) is
    // put back before the next run.
    sim.run(&vm, true).await;
    sim.host.set_status(&vm, host::VmStatus::Down);
    sim.wait_status(&vm, pb::VmStatus::Down).await;
    assert!(sim.of_type(&vm, pb::SnapshotType::Stateless).await.is_some());
    // A normal run: restores once, and the memory (still s1's) stays.
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses[0], pb::VmStatus::RestoringState, "{statuses:?}");
    assert!(sim.of_type(&vm, pb::SnapshotType::Stateless).await.is_none());
    assert!(!sim.active(&vm).await.has_memory);
    assert!(sim.exists(memory_ref(&s1_snap).dump.as_ref().unwrap()).await);
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;

    // A VM created stateless runs stateless every time.
    let st = sim.create_vm_with("always-stateless", 1, true).await;
    let base = sim.active(&st).await;
    sim.run(&st, false).await;
    assert!(sim.of_type(&st, pb::SnapshotType::Stateless).await.is_some());
    sim.stop(&st).await;
    assert_eq!(sim.active(&st).await.disks, base.disks);
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_refused_restore_boots_and_drops_the_memory() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.vm_with_memory_snapshot("refused").await;
    let s1_snap = sim.get_snapshot(&s1).await.unwrap();
    sim.preview(&vm, &s1, true).await;
    sim.commit(&vm).await;
    *sim.host.inner.refuse_restore.lock().unwrap() = true;
    let op = sim.run_op(&vm, false).await;
    assert_eq!(op.warnings.len(), 1, "{op:?}");
    assert!(op.warnings[0].contains("refused to restore"), "{op:?}");
    sim.wait_status(&vm, pb::VmStatus::Up).await;
    let HostCall::Run { restore_memory, .. } = sim.host.last_run(&vm) else {
        unreachable!()
    };
    assert!(restore_memory.is_none(), "it booted");
    // The ACTIVE snapshot's memory is gone; the snapshot keeps its own.
    assert!(!sim.active(&vm).await.has_memory);
    assert_eq!(sim.get_snapshot(&s1).await.unwrap().memory, s1_snap.memory);
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}

/// Writes `pattern` at `offset` into a volume's file (a qcow2 on the FILE
/// domain), as a guest would.
async fn write_pattern(sim: &mut Sim, r: &common::VolumeRef, offset: u64, pattern: u8) {
    let path = prepare(sim, r).await;
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P {pattern} {offset} 64k"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    teardown(sim, r).await;
}

/// Whether the volume reads `pattern` at `offset`.
async fn reads_pattern(sim: &mut Sim, r: &common::VolumeRef, offset: u64, pattern: u8) -> bool {
    let path = prepare(sim, r).await;
    let out = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c"])
        .arg(format!("read -P {pattern} {offset} 64k"))
        .arg(&path)
        .output()
        .unwrap();
    teardown(sim, r).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !stdout.contains("Pattern verification failed")
}

async fn prepare(sim: &mut Sim, r: &common::VolumeRef) -> PathBuf {
    PathBuf::from(
        sim.storage
            .prepare_volume(storage::PrepareVolumeRequest {
                r#ref: Some(r.clone()),
            })
            .await
            .unwrap()
            .into_inner()
            .path,
    )
}

async fn teardown(sim: &mut Sim, r: &common::VolumeRef) {
    sim.storage
        .teardown_volume(storage::TeardownVolumeRequest {
            r#ref: Some(r.clone()),
        })
        .await
        .unwrap();
}

fn leaf(vm: &pb::Vm) -> common::VolumeRef {
    let d = &vm.disks[0];
    common::VolumeRef {
        domain_id: d.domain_id.clone(),
        image_id: d.image_id.clone(),
        volume_id: d.leaf_volume_id.clone(),
    }
}

#[tokio::test]
async fn simulation_remove_snapshot_merges_and_keeps_content() {
    let mut sim = Sim::start("3.3").await;
    let vm = sim.create_vm_with("merge", 1, false).await;
    // Content written at each stage, on a down VM.
    let v = sim.vm(&vm).await;
    write_pattern(&mut sim, &leaf(&v), 0, 0xa1).await;
    let s1 = sim.snapshot(&vm, false, "s1").await;
    let v = sim.vm(&vm).await;
    write_pattern(&mut sim, &leaf(&v), 65536, 0xb2).await;
    let s2 = sim.snapshot(&vm, false, "s2").await;
    let v = sim.vm(&vm).await;
    write_pattern(&mut sim, &leaf(&v), 131072, 0xc3).await;
    let leaf_before = leaf(&sim.vm(&vm).await);
    let s2_volume = sim.get_snapshot(&s2).await.unwrap().disks[0]
        .volume
        .clone()
        .unwrap();
    assert_eq!(sim.inventory().await.len(), 3);

    // Refusals: the ACTIVE snapshot, another VM's snapshot, a running VM.
    let active = sim.active(&vm).await;
    let err = sim.remove_snapshot(&vm, &active.snapshot_id).await.unwrap_err();
    assert_eq!(precondition(&err), "SNAPSHOT_NOT_REGULAR");
    let other = sim.create_vm_with("other", 1, false).await;
    let err = sim.remove_snapshot(&other, &s1).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Remove the middle snapshot: its volume merges into the leaf.
    let op = sim.remove_snapshot(&vm, &s2).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    assert_eq!(op.kind, "remove_snapshot");
    assert_eq!(sim.get_snapshot(&s2).await.unwrap_err().code(), Code::NotFound);
    assert!(!sim.exists(&s2_volume).await);
    let now = leaf(&sim.vm(&vm).await);
    assert_eq!(now, leaf_before, "the ACTIVE snapshot keeps its leaf");
    for (offset, pattern) in [(0, 0xa1), (65536, 0xb2), (131072, 0xc3)] {
        assert!(reads_pattern(&mut sim, &now, offset, pattern).await, "{offset}");
    }
    sim.assert_no_orphans().await;
    // Then the oldest: the leaf becomes the whole disk.
    let op = sim.remove_snapshot(&vm, &s1).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    let volumes: Vec<storage::Volume> = sim
        .inventory()
        .await
        .into_iter()
        .filter(|v| v.r#ref.as_ref().unwrap().image_id == now.image_id)
        .collect();
    assert_eq!(volumes.len(), 1);
    assert!(volumes[0].parent_volume_id.is_empty());
    for (offset, pattern) in [(0, 0xa1), (65536, 0xb2), (131072, 0xc3)] {
        assert!(reads_pattern(&mut sim, &now, offset, pattern).await, "{offset}");
    }
    assert_eq!(sim.vm(&vm).await.status, pb::VmStatus::Down as i32);
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_clone_from_snapshot_warns_and_boots() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.vm_with_memory_snapshot("source").await;
    let clone_req = |name: &str, snapshot: &str| pb::CloneVmFromSnapshotRequest {
        request_id: Uuid::new_v4().to_string(),
        vm_id: vm.clone(),
        snapshot_id: snapshot.into(),
        name: name.into(),
        target_domain_id: String::new(),
    };
    let active = sim.active(&vm).await;
    let err = sim
        .snaps
        .clone_vm_from_snapshot(clone_req("c0", &active.snapshot_id))
        .await
        .unwrap_err();
    assert_eq!(precondition(&err), "SNAPSHOT_IS_ACTIVE");
    let err = sim
        .snaps
        .clone_vm_from_snapshot(clone_req("source", &s1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    let r = sim
        .snaps
        .clone_vm_from_snapshot(clone_req("clone", &s1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.warnings,
        vec!["the snapshot's memory is discarded: the new VM boots".to_string()]
    );
    let op = sim.ok(r.operation).await;
    assert_eq!(op.kind, "clone_vm");
    assert_eq!(op.warnings, r.warnings);
    assert_eq!(
        op.progress.as_ref().map(|p| p.processed_bytes),
        Some((32 + 48) * MIB)
    );
    let clone = op.result_vm_id.clone();
    let c = sim.vm(&clone).await;
    assert_eq!(c.name, "clone");
    assert_eq!(c.disks.len(), 2);
    assert_eq!(c.memory_bytes, 64 * MIB);
    let capacities: Vec<u64> = c.disks.iter().map(|d| d.capacity_bytes).collect();
    assert_eq!(capacities, vec![32 * MIB, 48 * MIB]);
    let snaps = sim.snapshots(&clone).await;
    assert_eq!(snaps.len(), 1);
    assert!(!snaps[0].has_memory);
    // Standalone copies in images of their own.
    let source = sim.vm(&vm).await;
    for d in &c.disks {
        assert!(source.disks.iter().all(|s| s.image_id != d.image_id));
        let vols: Vec<storage::Volume> = sim
            .inventory()
            .await
            .into_iter()
            .filter(|v| v.r#ref.as_ref().unwrap().image_id == d.image_id)
            .collect();
        assert_eq!(vols.len(), 1);
        assert!(vols[0].parent_volume_id.is_empty());
    }
    assert!(source.locked_by_operation_id.is_empty());
    sim.assert_no_orphans().await;
    // The clone boots.
    let statuses = sim.run(&clone, false).await;
    assert_eq!(statuses[0], pb::VmStatus::PoweringUp);
    // A snapshot without memory clones without a warning.
    let s2 = sim.snapshot(&clone, false, "disk only").await;
    let r = sim.snaps.clone_vm_from_snapshot(pb::CloneVmFromSnapshotRequest {
        vm_id: clone.clone(),
        ..clone_req("clone-of-clone", &s2)
    });
    let r = r.await.unwrap().into_inner();
    assert!(r.warnings.is_empty());
    sim.ok(r.operation).await;
    sim.stop(&clone).await;
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_vm_locked_error_names_the_holder() {
    let mut sim = Sim::start("3.3").await;
    let vm = sim.create_vm("locked").await;
    sim.run(&vm, false).await;
    let gate = Arc::new(Notify::new());
    *sim.host.inner.snapshot_gate.lock().unwrap() = Some(gate.clone());
    let op = sim
        .snaps
        .create_snapshot(Env::snapshot_req(&vm, true, "slow"))
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    // Wait until the host is taking it (the lock is held).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !sim
        .host
        .calls()
        .iter()
        .any(|c| matches!(c, HostCall::Snapshot { .. }))
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sim.vm(&vm).await.locked_by_operation_id, op.operation_id);
    let err = sim
        .vms
        .stop_vm(pb::StopVmRequest {
            request_id: Uuid::new_v4().to_string(),
            vm_id: vm.clone(),
            graceful_timeout_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(precondition(&err), "VM_LOCKED");
    assert!(err.message().contains(&op.operation_id), "{}", err.message());
    let err = sim
        .snaps
        .create_snapshot(Env::snapshot_req(&vm, false, "second"))
        .await
        .unwrap_err();
    assert_eq!(precondition(&err), "VM_LOCKED");
    gate.notify_one();
    *sim.host.inner.snapshot_gate.lock().unwrap() = None;
    sim.ok(Some(op)).await;
    assert!(sim.vm(&vm).await.locked_by_operation_id.is_empty());
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_request_id_retries_return_the_same_operation() {
    let mut sim = Sim::start("3.3").await;
    let request_id = Uuid::new_v4().to_string();
    let create = pb::CreateVmRequest {
        request_id: request_id.clone(),
        name: "retried".into(),
        cluster_id: sim.cluster_id.clone(),
        memory_bytes: 64 * MIB,
        vcpus: 2,
        stateless: false,
        disks: vec![pb::DiskSpec {
            domain_id: sim.domain.clone(),
            capacity_bytes: 32 * MIB,
        }],
        ..Default::default()
    };
    let first = sim
        .vms
        .create_vm(create.clone())
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    let second = sim
        .vms
        .create_vm(create.clone())
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    assert_eq!(first.operation_id, second.operation_id);
    let done = sim.ok(Some(first.clone())).await;
    // After the end too (the name is taken now: still the same operation).
    let third = sim
        .vms
        .create_vm(create)
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    assert_eq!(third.operation_id, first.operation_id);
    assert_eq!(third.result_vm_id, done.result_vm_id);
    let vm = done.result_vm_id;
    assert_eq!(sim.inventory().await.len(), 1, "one VM's volumes, made once");

    let run_id = Uuid::new_v4().to_string();
    let run = pb::RunVmRequest {
        request_id: run_id.clone(),
        vm_id: vm.clone(),
        ..Default::default()
    };
    let a = sim
        .vms
        .run_vm(run.clone())
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    sim.ok(Some(a.clone())).await;
    sim.wait_status(&vm, pb::VmStatus::Up).await;
    // The VM is up now; the retry still answers with the run.
    let b = sim.vms.run_vm(run).await.unwrap().into_inner().operation.unwrap();
    assert_eq!(a.operation_id, b.operation_id);
    assert_eq!(sim.host.runs(&vm).len(), 1);
    // Without the request id it is a new call, refused.
    let err = sim
        .vms
        .run_vm(pb::RunVmRequest {
            vm_id: vm.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(precondition(&err), "VM_NOT_DOWN");
    // A request id used for another kind of operation.
    let err = sim
        .vms
        .stop_vm(pb::StopVmRequest {
            request_id: run_id,
            vm_id: vm.clone(),
            graceful_timeout_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let snap_req = Env::snapshot_req(&vm, true, "once");
    let x = sim
        .snaps
        .create_snapshot(snap_req.clone())
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    let y = sim
        .snaps
        .create_snapshot(snap_req)
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    assert_eq!(x.operation_id, y.operation_id);
    sim.ok(Some(x)).await;
    assert_eq!(sim.snapshots(&vm).await.len(), 2);
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_remove_vm_deletes_everything() {
    let mut sim = Sim::start("3.3").await;
    let keep = sim.create_vm_with("keep", 1, false).await;
    let (vm, _s1) = sim.vm_with_memory_snapshot("doomed").await;
    sim.snapshot(&vm, false, "s2").await;
    sim.run(&vm, false).await;
    let remove = |vm: &str| pb::RemoveVmRequest {
        request_id: Uuid::new_v4().to_string(),
        vm_id: vm.into(),
    };
    let err = sim.vms.remove_vm(remove(&vm)).await.unwrap_err();
    assert_eq!(precondition(&err), "VM_NOT_DOWN");
    sim.stop(&vm).await;
    let op = sim
        .vms
        .remove_vm(remove(&vm))
        .await
        .unwrap()
        .into_inner()
        .operation;
    let op = sim.ok(op).await;
    assert_eq!(op.kind, "remove_vm");
    let err = sim
        .vms
        .get_vm(pb::GetVmRequest { vm_id: vm.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Only the other VM's volume is left.
    let left = sim.inventory().await;
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(
        left[0].r#ref.as_ref().unwrap().volume_id,
        sim.vm(&keep).await.disks[0].leaf_volume_id
    );
    sim.assert_no_orphans().await;
}

// ---------------------------------------------------------------------------
// Fault injection: an error at every node of every saga. A reversible node
// unwinds the saga (the earlier nodes' undo fails once too and is retried)
// and leaves everything as it was; a node past the point of no return is
// retried and the saga completes.

/// For each node of the saga: a fresh environment, the scenario's setup,
/// then the action with an error injected at the node.
async fn fault_at_every_node(saga_name: &str) {
    let def = sagas::all()
        .into_iter()
        .find(|d| d.name == saga_name)
        .expect("a saga of that name");
    let nodes: Vec<(&'static str, bool)> = def.nodes.iter().map(|n| (n.name, n.undo.is_some())).collect();
    for (i, (node, reversible)) in nodes.iter().enumerate() {
        let mut sim = Sim::start("3.3").await;
        let (vm, snapshot) = setup(&mut sim, saga_name).await;
        sim.assert_no_orphans().await;
        let before = state(&mut sim).await;
        let mut points = vec![format!("{saga_name}.{node}=error")];
        if *reversible {
            // Every undo that runs before it fails once, and is retried.
            points.extend(
                nodes[..i]
                    .iter()
                    .filter(|(_, r)| *r)
                    .map(|(n, _)| format!("{saga_name}.{n}=undo_error")),
            );
        }
        sim.restart_coordinator(&points.join(",")).await;
        let op = act(&mut sim, saga_name, &vm, &snapshot).await;
        let op = sim.wait(op).await;
        let what = format!("{saga_name}.{node} (reversible: {reversible})");
        if *reversible {
            assert_eq!(op.state, pb::OperationState::Failed as i32, "{what}: {op:?}");
            assert!(op.error_message.contains("injected failure"), "{what}: {op:?}");
            let after = state(&mut sim).await;
            assert_eq!(before, after, "{what}: not unwound cleanly");
        } else {
            assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{what}: {op:?}");
            let after = state(&mut sim).await;
            assert!(
                after.vms.iter().all(|v| v.3.is_empty()),
                "{what}: a VM is still locked"
            );
        }
        sim.assert_no_orphans().await;
    }
}

#[tokio::test]
async fn simulation_faults_vm_create() {
    fault_at_every_node("vm_create").await;
}

#[tokio::test]
async fn simulation_faults_vm_remove() {
    fault_at_every_node("vm_remove").await;
}

#[tokio::test]
async fn simulation_faults_vm_run() {
    fault_at_every_node("vm_run").await;
}

#[tokio::test]
async fn simulation_faults_vm_stop() {
    fault_at_every_node("vm_stop").await;
}

#[tokio::test]
async fn simulation_faults_snapshot_create() {
    fault_at_every_node("snapshot_create").await;
}

#[tokio::test]
async fn simulation_faults_snapshot_remove() {
    fault_at_every_node("snapshot_remove").await;
}

#[tokio::test]
async fn simulation_faults_snapshot_preview() {
    fault_at_every_node("snapshot_preview").await;
}

#[tokio::test]
async fn simulation_faults_snapshot_undo() {
    fault_at_every_node("snapshot_undo").await;
}

#[tokio::test]
async fn simulation_faults_snapshot_commit() {
    fault_at_every_node("snapshot_commit").await;
}

#[tokio::test]
async fn simulation_faults_vm_clone() {
    fault_at_every_node("vm_clone").await;
}

// ---------------------------------------------------------------------------
// Export and import.

/// Export-Import test case 1's flow in the simulation: two snapshots with
/// memory after preview+commit, exported, the VM removed, imported back
/// with both memories, and the first run restores.
#[tokio::test]
async fn simulation_export_remove_import_keeps_every_memory() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.vm_with_memory_snapshot("traveller").await;
    sim.preview(&vm, &s1, true).await;
    sim.commit(&vm).await;
    let before = sim.snapshots(&vm).await;
    assert_eq!(before.iter().filter(|s| s.has_memory).count(), 2);
    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    assert_eq!(op.result_vm_id, vm);
    let exported = sim.export_inventory().await;
    assert!(exported.contains(&format!("ovf:{vm}")), "{exported:?}");
    // Exporting again needs force_override.
    let err = sim.export_vm(&vm, false, false).await.unwrap_err();
    assert_eq!(precondition(&err), "VM_ALREADY_EXPORTED");
    let export_domain_id = sim.export_domain.clone();
    let listed = sim
        .vms
        .list_exported_vms(pb::ListExportedVmsRequest { export_domain_id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.vms.len(), 1, "{listed:?}");
    assert_eq!(listed.vms[0].snapshots.iter().filter(|s| s.has_memory).count(), 2);
    // The VM exists: only a clone can be imported.
    let err = sim.import_vm_call(&vm, false, false, "").await.unwrap_err();
    assert_eq!(precondition(&err), "VM_ALREADY_EXISTS");

    sim.remove_vm(&vm).await;
    let r = sim.import_vm_call(&vm, false, false, "").await.unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let op = sim.ok(r.operation).await;
    assert_eq!(op.result_vm_id, vm);
    let after = sim.snapshots(&vm).await;
    assert_eq!(after.len(), 2);
    assert_eq!(after.iter().filter(|s| s.has_memory).count(), 2, "{after:?}");
    let ids = |v: &[pb::Snapshot]| {
        let mut x: Vec<String> = v.iter().map(|s| s.snapshot_id.clone()).collect();
        x.sort();
        x
    };
    assert_eq!(ids(&after), ids(&before));
    sim.assert_no_orphans().await;
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses[0], pb::VmStatus::RestoringState, "{statuses:?}");
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}
