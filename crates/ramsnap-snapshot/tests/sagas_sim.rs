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
use ramsnap_snapshot::service::export::CLONE_MEMORY_WARNING;
use ramsnap_snapshot::{sagas, status};
use std::collections::BTreeSet;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use support::inproc::open_coordinator;
use support::{
    act, bad_field, memory_ref, precondition, precondition_subject, serve, setup, state, Agents, Env,
    HostCall, MIB,
};
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
    // A running VM's snapshot is removed by a live merge on its host
    // (beyond oVirt 3.3, which refused it).
    let op = sim.remove_snapshot(&vm, &with).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    assert_eq!(op.snapshot_id, with);
    assert_eq!(
        sim.snapshots(&vm).await.len(),
        2,
        "the disk-only one and the ACTIVE one"
    );
    assert!(
        sim.host
            .calls()
            .iter()
            .any(|c| matches!(c, HostCall::Commit { .. })),
        "the host merged the volume"
    );
    assert_eq!(sim.vm(&vm).await.status, pb::VmStatus::Up as i32);
    sim.assert_no_orphans().await;
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
    // A fork of that memory is refused below 3.3, and nothing is made.
    let err = sim
        .snaps
        .clone_vm_from_snapshot(pb::CloneVmFromSnapshotRequest {
            request_id: Uuid::new_v4().to_string(),
            vm_id: vm.clone(),
            snapshot_id: s.clone(),
            name: "legacy-fork".into(),
            target_domain_id: String::new(),
            keep_memory: true,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), precondition(&err).as_str()),
        (Code::FailedPrecondition, "CLUSTER_BELOW_3_3"),
        "{err:?}"
    );
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
                ..Default::default()
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
        keep_memory: false,
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

/// Every volume on the data and export domains, as
/// "domain/image/volume".
async fn all_volumes(sim: &mut Sim) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for domain in [sim.domain.clone(), sim.export_domain.clone()] {
        let volumes = sim
            .storage
            .list_volumes(storage::ListVolumesRequest {
                domain_id: domain,
                image_id: String::new(),
                // Every volume: these tests make fewer than a page's maximum.
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volumes;
        for v in volumes {
            let r = v.r#ref.unwrap();
            out.insert(format!("{}/{}/{}", r.domain_id, r.image_id, r.volume_id));
        }
    }
    out
}

/// A VM no saga of the scenario acts on, with a snapshot with memory and a
/// disk-only one: whatever the saga does (completes or unwinds), every one
/// of its volumes must still be there.
async fn bystander(sim: &mut Sim) -> (String, BTreeSet<String>) {
    let before = all_volumes(sim).await;
    let (vm, _) = sim.vm_with_memory_snapshot("bystander").await;
    sim.snapshot(&vm, false, "bystander disk-only").await;
    let volumes = all_volumes(sim).await.difference(&before).cloned().collect();
    (vm, volumes)
}

/// For each node of the saga: a fresh environment, the scenario's setup,
/// then the action with an error injected at the node. Besides the state
/// being what it was after an unwind, the harness checks one property of
/// every saga: no volume that existed before it started is deleted by its
/// undo (everything on the data and export domains before the action is
/// still there after an unwind), and a bystander VM's volumes survive
/// whatever the saga does.
async fn fault_at_every_node(saga_name: &str) {
    let def = sagas::all()
        .into_iter()
        .find(|d| d.name == saga_name)
        .expect("a saga of that name");
    let nodes: Vec<(&'static str, bool)> = def.nodes.iter().map(|n| (n.name, n.undo.is_some())).collect();
    for (i, (node, reversible)) in nodes.iter().enumerate() {
        let mut sim = Sim::start("3.3").await;
        let (vm, snapshot) = setup(&mut sim, saga_name).await;
        let (bystander_vm, bystander_volumes) = bystander(&mut sim).await;
        sim.assert_no_orphans().await;
        let before = state(&mut sim).await;
        let volumes_before = all_volumes(&mut sim).await;
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
        let volumes_after = all_volumes(&mut sim).await;
        let lost: Vec<&String> = bystander_volumes.difference(&volumes_after).collect();
        assert!(
            lost.is_empty(),
            "{what}: the bystander's volumes were deleted: {lost:?}"
        );
        if *reversible {
            assert_eq!(op.state, pb::OperationState::Failed as i32, "{what}: {op:?}");
            assert!(op.error_message.contains("injected failure"), "{what}: {op:?}");
            let lost: Vec<&String> = volumes_before.difference(&volumes_after).collect();
            assert!(
                lost.is_empty(),
                "{what}: the unwind deleted volumes that existed before the saga: {lost:?}"
            );
            let after = state(&mut sim).await;
            assert_eq!(before, after, "{what}: not unwound cleanly");
            let bystander_volume = |v: &String| bystander_volumes.iter().any(|b| b.ends_with(v.as_str()));
            match saga_name {
                // Nothing of the export: no descriptor, no volume.
                "vm_export" => assert!(after.export.is_empty(), "{what}: {:?}", after.export),
                // Nothing of the import: no VM, no volume on the data
                // domain, but the bystander's.
                "vm_import" => assert!(
                    after.vms.iter().all(|v| v.1 == bystander_vm)
                        && after.volumes.iter().all(bystander_volume),
                    "{what}: {after:?}"
                ),
                _ => {}
            }
        } else {
            assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{what}: {op:?}");
            let after = state(&mut sim).await;
            assert!(
                after.vms.iter().all(|v| v.3.is_empty()),
                "{what}: a VM is still locked"
            );
        }
        sim.assert_no_orphans().await;
        sim.assert_no_export_orphans().await;
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
async fn simulation_faults_snapshot_remove_live() {
    fault_at_every_node("snapshot_remove_live").await;
}

#[tokio::test]
async fn simulation_faults_vm_suspend() {
    fault_at_every_node("vm_suspend").await;
}

#[tokio::test]
async fn simulation_faults_vm_update() {
    fault_at_every_node("vm_update").await;
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

#[tokio::test]
async fn simulation_faults_vm_export() {
    fault_at_every_node("vm_export").await;
}

#[tokio::test]
async fn simulation_faults_vm_import() {
    fault_at_every_node("vm_import").await;
}

/// The harness's property where an error cannot simply be injected: a
/// volume the import is about to make appears (someone else's) after the
/// import passed the door and its plan. The import halts before copying the
/// memory; a volume with the first memory metadata volume's ids is made on
/// the data domain; the import resumes, meets it (FAILED_PRECONDITION
/// VOLUME_EXISTS) and unwinds: its own disk copies go, the other volume
/// stays.
#[tokio::test]
async fn simulation_import_unwind_keeps_a_volume_it_did_not_create() {
    let mut sim = Sim::start("3.3").await;
    let (vm, _) = setup(&mut sim, "vm_import").await;
    let export_domain = sim.export_domain.clone();
    let xml = sim
        .storage
        .get_vm_descriptor(storage::GetVmDescriptorRequest {
            domain_id: export_domain,
            vm_id: vm.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .descriptor
        .unwrap()
        .ovf;
    let ovf = ramsnap_snapshot::ovf::OvfVm::parse(&xml).unwrap();
    let first = (*ovf.memories().first().expect("the export has memory")).clone();
    sim.restart_coordinator("vm_import.copy_memories=halt").await;
    let op = act(&mut sim, "vm_import", &vm, "").await.unwrap();
    // Halted: the node started, the disks are copied.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let sagas = sim.app.db.list_unfinished_sagas().await.unwrap();
        let saga = sagas
            .iter()
            .find(|s| s.operation_id.map(|o| o.to_string()) == Some(op.operation_id.clone()));
        if let Some(saga) = saga {
            let events = sim.app.db.saga_node_events(saga.id).await.unwrap();
            if events.iter().any(|e| e.node_id == 3) {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the import did not reach copy_memories"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let copies_before = sim.volume_ids().await;
    assert!(!copies_before.is_empty(), "the disks were copied");
    let collider = common::VolumeRef {
        domain_id: sim.domain.clone(),
        image_id: first.metadata_image_id.to_string(),
        volume_id: first.metadata_volume_id.to_string(),
    };
    sim.storage
        .create_volume(storage::CreateVolumeRequest {
            request_id: Uuid::new_v4().to_string(),
            domain_id: collider.domain_id.clone(),
            image_id: collider.image_id.clone(),
            volume_id: collider.volume_id.clone(),
            capacity_bytes: MIB,
            format: storage::VolumeFormat::Raw as i32,
            allocation: storage::VolumeAllocation::Unspecified as i32,
            purpose: storage::VolumePurpose::Disk as i32,
            parent_volume_id: String::new(),
            description: "someone else's".into(),
        })
        .await
        .unwrap();
    sim.restart_coordinator("").await;
    let op = sim.wait(Some(op)).await;
    assert_eq!(op.state, pb::OperationState::Failed as i32, "{op:?}");
    // Only the volume it did not make is left; no VM.
    let left: BTreeSet<String> = sim.volume_ids().await;
    assert_eq!(left, BTreeSet::from([collider.volume_id.clone()]), "{left:?}");
    assert!(sim.exists(&collider).await);
    assert!(op.error_message.contains("VOLUME_EXISTS"), "{op:?}");
    let vms = sim
        .vms
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert!(vms.is_empty(), "{vms:?}");
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
        .list_exported_vms(pb::ListExportedVmsRequest {
            export_domain_id,
            ..Default::default()
        })
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

/// The same volume on another domain (export and import keep the ids).
fn on_domain(r: &common::VolumeRef, domain_id: &str) -> common::VolumeRef {
    common::VolumeRef {
        domain_id: domain_id.into(),
        ..r.clone()
    }
}

/// The volumes a snapshot's disks point at, in disk order.
fn disk_refs(s: &pb::Snapshot) -> Vec<common::VolumeRef> {
    s.disks.iter().map(|d| d.volume.clone().unwrap()).collect()
}

/// The volume of that ref in a listing.
fn find<'a>(volumes: &'a [storage::Volume], r: &common::VolumeRef) -> &'a storage::Volume {
    volumes
        .iter()
        .find(|v| v.r#ref.as_ref() == Some(r))
        .unwrap_or_else(|| panic!("no volume {r:?} in {volumes:#?}"))
}

/// An ImportVm of `vm_id` into this environment's cluster and data domain.
fn import_req(sim: &Sim, vm_id: &str) -> pb::ImportVmRequest {
    pb::ImportVmRequest {
        request_id: Uuid::new_v4().to_string(),
        export_domain_id: sim.export_domain.clone(),
        vm_id: vm_id.into(),
        cluster_id: sim.cluster_id.clone(),
        target_domain_id: sim.domain.clone(),
        as_clone: false,
        collapse_snapshots: false,
        name: String::new(),
        keep_memory: false,
    }
}

fn export_req(sim: &Sim, vm_id: &str) -> pb::ExportVmRequest {
    pb::ExportVmRequest {
        request_id: Uuid::new_v4().to_string(),
        vm_id: vm_id.into(),
        export_domain_id: sim.export_domain.clone(),
        collapse_snapshots: false,
        force_override: false,
    }
}

/// Export-Import test case 5: exported with "collapse snapshots", removed,
/// imported: only the ACTIVE snapshot, with its memory, and the first run
/// restores it.
#[tokio::test]
async fn simulation_export_collapsed_then_import_restores_the_active_memory() {
    let mut sim = Sim::start("3.3").await;
    let (vm, _s1) = sim.committed_memory_vm("collapsed").await;
    let active = sim.active(&vm).await;
    let op = sim.export_vm(&vm, true, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    assert_eq!(op.kind, "export_vm");
    let progress = op.progress.unwrap();
    assert!(progress.total_bytes >= (32 + 48) * MIB, "{progress:?}");
    assert_eq!(progress.processed_bytes, progress.total_bytes);
    let v = sim.vm(&vm).await;
    assert_eq!(v.status, pb::VmStatus::Down as i32);
    assert!(v.locked_by_operation_id.is_empty());

    let listed = sim.exported_vms().await;
    assert!(listed.unreadable.is_empty(), "{listed:?}");
    assert_eq!(listed.vms.len(), 1, "{listed:?}");
    let e = &listed.vms[0];
    assert_eq!((e.vm_id.as_str(), e.name.as_str()), (vm.as_str(), "collapsed"));
    assert!(e.collapsed);
    assert_eq!(e.disk_count, 2);
    assert_eq!(e.compatibility_version, "3.3");
    assert_eq!(e.snapshots.len(), 1, "{e:?}");
    assert_eq!(e.snapshots[0].snapshot_id, active.snapshot_id);
    assert_eq!(e.snapshots[0].r#type, pb::SnapshotType::Active as i32);
    assert!(e.snapshots[0].has_memory);

    // One volume per disk (the leaf's ids), without parent, and the memory.
    let exported = sim.export_volumes().await;
    assert_eq!(exported.len(), 4, "{exported:#?}");
    let collapsed: Vec<common::VolumeRef> = disk_refs(&active)
        .iter()
        .map(|r| on_domain(r, &sim.export_domain))
        .collect();
    for r in &collapsed {
        assert!(find(&exported, r).parent_volume_id.is_empty());
    }
    let memory = memory_ref(&active);
    let dump = memory.dump.clone().unwrap();
    find(&exported, &on_domain(&dump, &sim.export_domain));
    find(
        &exported,
        &on_domain(memory.metadata.as_ref().unwrap(), &sim.export_domain),
    );
    sim.assert_no_export_orphans().await;
    // Checksummed there, its metadata rebound to the collapsed volumes.
    let verified = sim.host.verifies_on(&sim.export_domain);
    assert_eq!(verified.len(), 1, "{verified:?}");
    assert_eq!(verified[0].0, on_domain(&dump, &sim.export_domain));
    assert!(verified[0].1.is_empty(), "{verified:?}");
    assert_eq!(verified[0].2, collapsed);

    sim.remove_vm(&vm).await;
    assert!(sim.inventory().await.is_empty());
    let r = sim.import_vm_call(&vm, false, false, "").await.unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let op = sim.ok(r.operation).await;
    assert_eq!(
        (op.kind.as_str(), op.result_vm_id.as_str()),
        ("import_vm", vm.as_str())
    );
    assert_eq!(op.progress, Some(progress), "the same copies back");
    let snaps = sim.snapshots(&vm).await;
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].snapshot_id, active.snapshot_id);
    assert_eq!(snaps[0].r#type, pb::SnapshotType::Active as i32);
    assert!(snaps[0].has_memory);
    assert_eq!(snaps[0].memory, active.memory, "the same ids, on the data domain");
    assert_eq!(disk_refs(&snaps[0]), disk_refs(&active));
    let volumes = sim.inventory().await;
    assert_eq!(volumes.len(), 4, "{volumes:#?}");
    for r in disk_refs(&active) {
        assert!(find(&volumes, &r).parent_volume_id.is_empty());
    }
    // Checksummed on the data domain; already rebound at export, it only
    // moves to the data domain.
    let verified = sim.host.verifies_on(&sim.domain);
    assert_eq!(verified.len(), 1, "{verified:?}");
    assert_eq!(verified[0].0, dump);
    assert_eq!(verified[0].1, sim.domain);
    assert!(verified[0].2.is_empty(), "{verified:?}");
    sim.assert_no_orphans().await;

    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses, vec![pb::VmStatus::RestoringState, pb::VmStatus::Up]);
    let HostCall::Run {
        restore_memory,
        disks,
        ..
    } = sim.host.last_run(&vm)
    else {
        unreachable!()
    };
    assert_eq!(restore_memory, active.memory);
    assert_eq!(disks, disk_refs(&active));
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}

/// Export-Import test case 6: a full export imported with "collapse
/// snapshots": only the ACTIVE snapshot, with its memory, rebound to the
/// collapsed volumes.
#[tokio::test]
async fn simulation_full_export_imported_collapsed_restores_the_active_memory() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.committed_memory_vm("collapse-on-import").await;
    let active = sim.active(&vm).await;
    let s1_snap = sim.get_snapshot(&s1).await.unwrap();
    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    let listed = sim.exported_vms().await;
    assert_eq!(listed.vms.len(), 1, "{listed:?}");
    assert!(!listed.vms[0].collapsed);
    assert_eq!(listed.vms[0].snapshots.len(), 2);
    assert!(listed.vms[0].snapshots.iter().all(|s| s.has_memory));
    // The chains, layer by layer: the ACTIVE's leaves over s1's volumes.
    let exported = sim.export_volumes().await;
    assert_eq!(exported.len(), 6, "{exported:#?}");
    for (leaf, base) in disk_refs(&active).iter().zip(disk_refs(&s1_snap)) {
        let v = find(&exported, &on_domain(leaf, &sim.export_domain));
        assert_eq!(v.parent_volume_id, base.volume_id);
    }
    let verified = sim.host.verifies_on(&sim.export_domain);
    assert_eq!(verified.len(), 1, "one memory, shared: {verified:?}");
    assert!(
        verified[0].2.is_empty() && verified[0].1.is_empty(),
        "{verified:?}"
    );

    sim.remove_vm(&vm).await;
    let r = sim.import_vm_call(&vm, false, true, "").await.unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    sim.ok(r.operation).await;
    let snaps = sim.snapshots(&vm).await;
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].r#type, pb::SnapshotType::Active as i32);
    assert_eq!(snaps[0].snapshot_id, active.snapshot_id);
    assert_eq!(snaps[0].memory, active.memory);
    let collapsed = disk_refs(&active);
    assert_eq!(disk_refs(&snaps[0]), collapsed);
    let volumes = sim.inventory().await;
    assert_eq!(
        volumes.len(),
        4,
        "two disks of one volume each, and the memory: {volumes:#?}"
    );
    let imported = sim.vm(&vm).await;
    for d in &imported.disks {
        let chain: Vec<&storage::Volume> = volumes
            .iter()
            .filter(|v| v.r#ref.as_ref().unwrap().image_id == d.image_id)
            .collect();
        assert_eq!(chain.len(), 1, "{chain:#?}");
        assert!(chain[0].parent_volume_id.is_empty());
        assert_eq!(chain[0].r#ref.as_ref().unwrap().volume_id, d.leaf_volume_id);
    }
    // Rebound to the collapsed volumes on the data domain.
    let verified = sim.host.verifies_on(&sim.domain);
    assert_eq!(verified.len(), 1, "{verified:?}");
    assert_eq!(verified[0].0, memory_ref(&active).dump.unwrap());
    assert!(verified[0].1.is_empty(), "{verified:?}");
    assert_eq!(verified[0].2, collapsed);
    sim.assert_no_orphans().await;

    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses, vec![pb::VmStatus::RestoringState, pb::VmStatus::Up]);
    let HostCall::Run { restore_memory, .. } = sim.host.last_run(&vm) else {
        unreachable!()
    };
    assert_eq!(restore_memory, active.memory);
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}

/// Export-Import test case 2: the VM still exists, so only a clone can be
/// imported: new ids, the ACTIVE snapshot only, no memory (with the
/// warning), and it boots. The original is untouched.
#[tokio::test]
async fn simulation_import_as_clone_warns_and_boots() {
    let mut sim = Sim::start("3.3").await;
    let (vm, _s1) = sim.committed_memory_vm("original").await;
    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    let original = sim.vm(&vm).await;
    let original_snaps = sim.snapshots(&vm).await;
    let original_volumes = sim.volume_ids().await;
    let exported = sim.export_inventory().await;

    // The exported name is taken by the original.
    let err = sim.import_vm_call(&vm, true, false, "").await.unwrap_err();
    assert_eq!(
        (err.code(), precondition(&err).as_str()),
        (Code::FailedPrecondition, "VM_NAME_IN_USE")
    );
    let r = sim.import_vm_call(&vm, true, false, "the-clone").await.unwrap();
    assert_eq!(r.warnings, vec![CLONE_MEMORY_WARNING.to_string()]);
    let op = sim.ok(r.operation).await;
    assert_eq!(op.kind, "import_vm");
    assert_eq!(op.warnings, r.warnings);
    let clone = op.result_vm_id.clone();
    assert!(!clone.is_empty() && clone != vm, "{op:?}");
    let c = sim.vm(&clone).await;
    assert_eq!(c.name, "the-clone");
    assert_eq!(c.status, pb::VmStatus::Down as i32);
    assert!(c.locked_by_operation_id.is_empty());
    assert_eq!((c.memory_bytes, c.vcpus), (original.memory_bytes, original.vcpus));
    let capacities = |v: &pb::Vm| v.disks.iter().map(|d| d.capacity_bytes).collect::<Vec<_>>();
    assert_eq!(
        capacities(&c),
        capacities(&original),
        "the disks keep their order"
    );
    let snaps = sim.snapshots(&clone).await;
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].r#type, pb::SnapshotType::Active as i32);
    assert!(!snaps[0].has_memory);
    assert!(original_snaps
        .iter()
        .all(|s| s.snapshot_id != snaps[0].snapshot_id));
    // New disks, images and volumes: one standalone volume each.
    let volumes = sim.inventory().await;
    for d in &c.disks {
        assert!(original
            .disks
            .iter()
            .all(|o| o.disk_id != d.disk_id && o.image_id != d.image_id));
        assert!(!original_volumes.contains(&d.leaf_volume_id));
        let chain: Vec<&storage::Volume> = volumes
            .iter()
            .filter(|v| v.r#ref.as_ref().unwrap().image_id == d.image_id)
            .collect();
        assert_eq!(chain.len(), 1, "{chain:#?}");
        assert!(chain[0].parent_volume_id.is_empty());
    }
    assert_eq!(volumes.len(), original_volumes.len() + 2, "no memory copied");
    assert!(sim.host.verifies_on(&sim.domain).is_empty());
    // The original and the export are untouched.
    assert_eq!(sim.vm(&vm).await, original);
    assert_eq!(sim.snapshots(&vm).await, original_snaps);
    assert!(original_volumes.is_subset(&sim.volume_ids().await));
    assert_eq!(sim.export_inventory().await, exported);
    sim.assert_no_orphans().await;

    let statuses = sim.run(&clone, false).await;
    assert_eq!(statuses, vec![pb::VmStatus::PoweringUp, pb::VmStatus::Up]);
    let HostCall::Run { restore_memory, .. } = sim.host.last_run(&clone) else {
        unreachable!()
    };
    assert!(restore_memory.is_none());
    sim.stop(&clone).await;
    // The original still restores its own memory.
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses[0], pb::VmStatus::RestoringState, "{statuses:?}");
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}

/// An import into a cluster below 3.3 brings the snapshots without their
/// memory, with a warning; the VM boots.
#[tokio::test]
async fn simulation_import_below_3_3_drops_the_memory_with_a_warning() {
    let mut sim = Sim::start("3.3").await;
    let (vm, _s1) = sim.committed_memory_vm("to-legacy").await;
    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    sim.remove_vm(&vm).await;
    // A 3.2 cluster, its host the same simulated agents.
    let legacy = sim
        .clusters
        .create_cluster(pb::CreateClusterRequest {
            request_id: String::new(),
            name: "legacy".into(),
            compatibility_version: "3.2".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .cluster
        .unwrap();
    assert!(!legacy.memory_snapshots_supported);
    let agent = sim.agent_addr.clone();
    sim.clusters
        .add_host(pb::AddHostRequest {
            request_id: String::new(),
            name: "sim-host-legacy".into(),
            cluster_id: legacy.cluster_id.clone(),
            host_address: agent.clone(),
            storage_address: agent,
        })
        .await
        .unwrap();
    let exported = sim.export_inventory().await;

    let req = pb::ImportVmRequest {
        cluster_id: legacy.cluster_id.clone(),
        ..import_req(&sim, &vm)
    };
    let r = sim.vms.import_vm(req).await.unwrap().into_inner();
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(r.warnings[0].contains("3.3"), "{:?}", r.warnings);
    let op = sim.ok(r.operation).await;
    assert_eq!(op.warnings, r.warnings);
    assert_eq!(sim.vm(&vm).await.cluster_id, legacy.cluster_id);
    let snaps = sim.snapshots(&vm).await;
    assert_eq!(snaps.len(), 2, "every snapshot, without memory: {snaps:?}");
    assert!(
        snaps.iter().all(|s| !s.has_memory && s.memory.is_none()),
        "{snaps:?}"
    );
    assert_eq!(
        sim.inventory().await.len(),
        4,
        "the disks' chains, no memory volume"
    );
    assert!(sim.host.verifies_on(&sim.domain).is_empty());
    assert_eq!(sim.export_inventory().await, exported);
    sim.assert_no_orphans().await;
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses, vec![pb::VmStatus::PoweringUp, pb::VmStatus::Up]);
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}

/// ExportVm's refusals, each leaving everything as it was.
#[tokio::test]
async fn simulation_export_refusals_leave_nothing_behind() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.committed_memory_vm("refused").await;
    let before = state(&mut sim).await;
    let data_domain = sim.domain.clone();
    let req = pb::ExportVmRequest {
        export_domain_id: data_domain,
        ..export_req(&sim, &vm)
    };
    let err = sim.vms.export_vm(req).await.unwrap_err();
    assert_eq!(
        (err.code(), precondition(&err).as_str()),
        (Code::FailedPrecondition, "NOT_AN_EXPORT_DOMAIN")
    );
    type Edit = fn(&mut pb::ExportVmRequest);
    let invalid: [(Edit, &str); 4] = [
        (|r| r.vm_id = "nope".into(), "vm_id"),
        (|r| r.vm_id.clear(), "vm_id"),
        (|r| r.export_domain_id = "nope".into(), "export_domain_id"),
        (|r| r.request_id = "nope".into(), "request_id"),
    ];
    for (edit, field) in invalid {
        let mut req = export_req(&sim, &vm);
        edit(&mut req);
        let err = sim.vms.export_vm(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert_eq!(bad_field(&err), field, "{err:?}");
    }
    for (what, req) in [
        (
            "unknown export domain",
            pb::ExportVmRequest {
                export_domain_id: Uuid::new_v4().to_string(),
                ..export_req(&sim, &vm)
            },
        ),
        ("unknown VM", export_req(&sim, &Uuid::new_v4().to_string())),
    ] {
        let err = sim.vms.export_vm(req).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{what}: {err:?}");
    }
    // ListExportedVms answers for export domains only.
    let data_domain = sim.domain.clone();
    for (id, code) in [
        (data_domain, Code::FailedPrecondition),
        (Uuid::new_v4().to_string(), Code::NotFound),
        ("nope".to_string(), Code::InvalidArgument),
    ] {
        let err = sim
            .vms
            .list_exported_vms(pb::ListExportedVmsRequest {
                export_domain_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{id}: {err:?}");
        if code == Code::FailedPrecondition {
            assert_eq!(precondition(&err), "NOT_AN_EXPORT_DOMAIN");
        }
    }
    assert_eq!(state(&mut sim).await, before);

    // In preview.
    sim.preview(&vm, &s1, true).await;
    let before = state(&mut sim).await;
    let req = export_req(&sim, &vm);
    let err = sim.vms.export_vm(req).await.unwrap_err();
    assert_eq!(
        (err.code(), precondition(&err).as_str()),
        (Code::FailedPrecondition, "VM_IN_PREVIEW")
    );
    assert_eq!(state(&mut sim).await, before);
    sim.undo(&vm).await;

    // Running.
    sim.run(&vm, false).await;
    let before = state(&mut sim).await;
    let req = export_req(&sim, &vm);
    let err = sim.vms.export_vm(req).await.unwrap_err();
    assert_eq!(
        (err.code(), precondition(&err).as_str()),
        (Code::FailedPrecondition, "VM_NOT_DOWN")
    );
    assert_eq!(state(&mut sim).await, before);
    assert!(before.export.is_empty());
    sim.stop(&vm).await;
    sim.assert_no_orphans().await;
}

/// ImportVm's refusals of bad requests, each leaving everything as it was.
#[tokio::test]
async fn simulation_import_refusals_leave_nothing_behind() {
    let mut sim = Sim::start("3.3").await;
    let (vm, _s1) = sim.committed_memory_vm("refused").await;
    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    sim.remove_vm(&vm).await;
    let before = state(&mut sim).await;
    assert!(before.vms.is_empty() && before.volumes.is_empty());

    type Edit = fn(&mut pb::ImportVmRequest);
    let invalid: [(Edit, &str); 7] = [
        (|r| r.export_domain_id = "nope".into(), "export_domain_id"),
        (|r| r.vm_id = "nope".into(), "vm_id"),
        (|r| r.vm_id.clear(), "vm_id"),
        (|r| r.cluster_id = "nope".into(), "cluster_id"),
        (|r| r.target_domain_id = "nope".into(), "target_domain_id"),
        (|r| r.request_id = "nope".into(), "request_id"),
        (|r| r.name = "two\nlines".into(), "name"),
    ];
    for (edit, field) in invalid {
        let mut req = import_req(&sim, &vm);
        edit(&mut req);
        let err = sim.vms.import_vm(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert_eq!(bad_field(&err), field, "{err:?}");
    }
    let unknown = Uuid::new_v4().to_string();
    type Target = fn(&mut pb::ImportVmRequest, String);
    let not_found: [(Target, &str); 4] = [
        (|r, id| r.export_domain_id = id, "export domain"),
        (|r, id| r.cluster_id = id, "cluster"),
        (|r, id| r.target_domain_id = id, "target domain"),
        (|r, id| r.vm_id = id, "VM not on the export domain"),
    ];
    for (edit, what) in not_found {
        let mut req = import_req(&sim, &vm);
        edit(&mut req, unknown.clone());
        let err = sim.vms.import_vm(req).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{what}: {err:?}");
    }
    // The data domain is no export domain.
    let data_domain = sim.domain.clone();
    let req = pb::ImportVmRequest {
        export_domain_id: data_domain,
        ..import_req(&sim, &vm)
    };
    let err = sim.vms.import_vm(req).await.unwrap_err();
    assert_eq!(precondition(&err), "NOT_AN_EXPORT_DOMAIN", "{err:?}");
    assert_eq!(state(&mut sim).await, before);

    // The export domain is no data domain: refused as the call's answer,
    // as every other bad input is.
    let export_domain = sim.export_domain.clone();
    let req = pb::ImportVmRequest {
        target_domain_id: export_domain,
        ..import_req(&sim, &vm)
    };
    match sim.vms.import_vm(req).await {
        Err(err) => assert_eq!(
            (err.code(), precondition(&err).as_str()),
            (Code::FailedPrecondition, "NOT_A_DATA_DOMAIN"),
            "{err:?}"
        ),
        Ok(r) => {
            let op = sim.wait(r.into_inner().operation).await;
            assert_eq!(state(&mut sim).await, before, "{op:?}");
            panic!("ImportVm into the export domain was accepted; its operation: {op:?}");
        }
    }
    assert_eq!(state(&mut sim).await, before);
    sim.assert_no_export_orphans().await;
}

/// Descriptors that cannot be imported: OVF_INVALID (not XML, not an OVF,
/// another VM's), OVF_FILE_MISSING (a volume it names is gone).
#[tokio::test]
async fn simulation_import_refuses_invalid_and_incomplete_exports() {
    let mut sim = Sim::start("3.3").await;
    let (vm, _s1) = sim.committed_memory_vm("exported").await;
    let active = sim.active(&vm).await;
    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    let export_domain = sim.export_domain.clone();
    let real = sim
        .storage
        .get_vm_descriptor(storage::GetVmDescriptorRequest {
            domain_id: export_domain.clone(),
            vm_id: vm.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .descriptor
        .unwrap()
        .ovf;
    let documents = [
        ("not XML", "garbage <<< not xml".to_string()),
        (
            "an empty envelope",
            format!(
                "<?xml version=\"1.0\"?><ovf:Envelope xmlns:ovf=\"{}\"/>",
                ramsnap_snapshot::ovf::OVF_NS
            ),
        ),
        ("another VM's descriptor", real),
    ];
    let mut bad = Vec::new();
    for (what, ovf) in documents {
        let id = Uuid::new_v4().to_string();
        sim.storage
            .put_vm_descriptor(storage::PutVmDescriptorRequest {
                domain_id: export_domain.clone(),
                vm_id: id.clone(),
                ovf,
            })
            .await
            .unwrap();
        bad.push((what, id));
    }
    let listed = sim.exported_vms().await;
    // A descriptor stored under another VM's id is as unreadable as garbage.
    assert_eq!(listed.unreadable.len(), 3, "{listed:?}");
    for (_, id) in &bad {
        assert!(
            listed.unreadable.iter().any(|u| u.starts_with(id.as_str())),
            "{listed:?}"
        );
    }
    let before = state(&mut sim).await;
    for (what, id) in &bad {
        for as_clone in [false, true] {
            let req = pb::ImportVmRequest {
                as_clone,
                name: "imported".into(),
                ..import_req(&sim, id)
            };
            let err = sim.vms.import_vm(req).await.unwrap_err();
            assert_eq!(
                (err.code(), precondition(&err).as_str()),
                (Code::FailedPrecondition, "OVF_INVALID"),
                "{what} (as a clone: {as_clone}): {err:?}"
            );
        }
    }
    assert_eq!(state(&mut sim).await, before);
    for (_, id) in &bad {
        sim.storage
            .delete_vm_descriptor(storage::DeleteVmDescriptorRequest {
                domain_id: export_domain.clone(),
                vm_id: id.clone(),
            })
            .await
            .unwrap();
    }

    // A leaf of the export deleted: OVF_FILE_MISSING, naming it.
    sim.remove_vm(&vm).await;
    let gone = on_domain(&disk_refs(&active)[0], &export_domain);
    sim.storage
        .delete_volume(storage::DeleteVolumeRequest {
            request_id: Uuid::new_v4().to_string(),
            r#ref: Some(gone.clone()),
        })
        .await
        .unwrap();
    let before = state(&mut sim).await;
    for as_clone in [false, true] {
        let err = sim.import_vm_call(&vm, as_clone, false, "").await.unwrap_err();
        assert_eq!(
            (err.code(), precondition(&err).as_str()),
            (Code::FailedPrecondition, "OVF_FILE_MISSING"),
            "as a clone: {as_clone}: {err:?}"
        );
        assert!(err.message().contains(&gone.volume_id), "{err:?}");
        assert!(precondition_subject(&err).contains(&gone.volume_id), "{err:?}");
    }
    assert_eq!(state(&mut sim).await, before);
    assert!(before.vms.is_empty() && before.volumes.is_empty());
}

/// Writes non-zero bytes at the end of a dump, as a guest's RAM fills it
/// (so that a dump cut short checksums differently).
async fn fill_dump_tail(sim: &mut Sim, dump: &common::VolumeRef) {
    let path = prepare(sim, dump).await;
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let len = f.metadata().unwrap().len();
    assert!(len >= 1 << 20, "a dump of {len} bytes");
    f.write_all_at(&[0x5a; 65536], len - 65536).unwrap();
    f.sync_all().unwrap();
    teardown(sim, dump).await;
}

/// Inverts the byte at `offset` of a volume's file.
async fn flip_byte(sim: &mut Sim, r: &common::VolumeRef, offset: u64) {
    let path = prepare(sim, r).await;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[!b[0]], offset).unwrap();
    f.sync_all().unwrap();
    teardown(sim, r).await;
}

/// A VM exported (its dump filled with data first), then removed; the
/// exported dump's ref.
async fn exported_and_removed(sim: &mut Sim, name: &str) -> (String, common::VolumeRef) {
    let (vm, _s1) = sim.committed_memory_vm(name).await;
    let dump = memory_ref(&sim.active(&vm).await).dump.unwrap();
    fill_dump_tail(sim, &dump).await;
    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    sim.remove_vm(&vm).await;
    let export_domain = sim.export_domain.clone();
    (vm, on_domain(&dump, &export_domain))
}

/// An import whose dump does not match the descriptor's checksum fails as
/// a whole and unwinds: nothing of it remains.
async fn import_fails_corrupt(sim: &mut Sim, vm: &str, dump: &common::VolumeRef) {
    let before = state(sim).await;
    let calls = sim.host.calls().len();
    let r = sim.import_vm_call(vm, false, false, "").await.unwrap();
    let op = sim.wait(r.operation).await;
    assert_eq!(op.state, pb::OperationState::Failed as i32, "{op:?}");
    assert_eq!(op.error_code, "FAILED_PRECONDITION", "{op:?}");
    // The operation's message starts with the precondition's kind and
    // names the corrupt dump.
    assert!(
        op.error_message.starts_with("MEMORY_DUMP_CORRUPT: ") && op.error_message.contains(&dump.volume_id),
        "{op:?}"
    );
    // And says so in fields of their own.
    assert_eq!(op.error_precondition, "MEMORY_DUMP_CORRUPT", "{op:?}");
    assert!(!op.error_subject.is_empty(), "{op:?}");
    assert_eq!(state(sim).await, before, "the import did not unwind");
    let err = sim
        .vms
        .get_vm(pb::GetVmRequest { vm_id: vm.into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(sim.inventory().await.is_empty());
    // The host was asked to checksum the copy, nothing else.
    let asked = sim.host.calls()[calls..].to_vec();
    assert!(
        asked.iter().all(|c| matches!(c, HostCall::Verify { .. })),
        "{asked:?}"
    );
}

#[tokio::test]
async fn simulation_import_of_a_corrupt_dump_unwinds() {
    let mut sim = Sim::start("3.3").await;
    let (vm, dump) = exported_and_removed(&mut sim, "corrupt").await;
    flip_byte(&mut sim, &dump, 4096).await;
    import_fails_corrupt(&mut sim, &vm, &dump).await;
    // Put back, it imports with both memories, and restores.
    flip_byte(&mut sim, &dump, 4096).await;
    let r = sim.import_vm_call(&vm, false, false, "").await.unwrap();
    sim.ok(r.operation).await;
    let snaps = sim.snapshots(&vm).await;
    assert_eq!(snaps.iter().filter(|s| s.has_memory).count(), 2, "{snaps:?}");
    sim.assert_no_orphans().await;
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses[0], pb::VmStatus::RestoringState, "{statuses:?}");
    sim.stop(&vm).await;
}

#[tokio::test]
async fn simulation_import_of_a_truncated_dump_unwinds() {
    let mut sim = Sim::start("3.3").await;
    let (vm, dump) = exported_and_removed(&mut sim, "truncated").await;
    let path = prepare(&mut sim, &dump).await;
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len / 2).unwrap();
    f.sync_all().unwrap();
    teardown(&mut sim, &dump).await;
    import_fails_corrupt(&mut sim, &vm, &dump).await;
    // As a clone (no memory), the disks import.
    let r = sim.import_vm_call(&vm, true, false, "").await.unwrap();
    let op = sim.ok(r.operation).await;
    assert_eq!(sim.snapshots(&op.result_vm_id).await.len(), 1);
    sim.assert_no_orphans().await;
}

/// force_override replaces an earlier export: one descriptor, and the
/// volumes of the new export only.
#[tokio::test]
async fn simulation_export_force_override_replaces_the_earlier_export() {
    let mut sim = Sim::start("3.3").await;
    let (vm, s1) = sim.committed_memory_vm("twice").await;
    let s1_snap = sim.get_snapshot(&s1).await.unwrap();
    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    let single = sim.export_inventory().await;
    let op = sim.export_vm(&vm, false, true).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    assert_eq!(sim.export_inventory().await, single);
    assert_eq!(sim.descriptors().await.len(), 1);
    assert_eq!(sim.exported_vms().await.vms.len(), 1);
    sim.assert_no_export_orphans().await;

    // The VM changes: a new snapshot, and s1 removed (its volumes merged
    // into their children).
    let s2 = sim.snapshot(&vm, false, "s2").await;
    let op = sim.remove_snapshot(&vm, &s1).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    let stale: Vec<String> = disk_refs(&s1_snap).into_iter().map(|r| r.volume_id).collect();
    let err = sim.export_vm(&vm, false, false).await.unwrap_err();
    assert_eq!(precondition(&err), "VM_ALREADY_EXPORTED");
    let op = sim.export_vm(&vm, false, true).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    let now = sim.export_inventory().await;
    for v in &stale {
        assert!(!now.contains(v), "{v} is no longer the VM's: {now:?}");
    }
    let mut expected = sim.volume_ids().await;
    expected.insert(format!("ovf:{vm}"));
    assert_eq!(now, expected, "exactly the VM's volumes now");
    let listed = sim.exported_vms().await;
    assert_eq!(listed.vms.len(), 1);
    let snaps: Vec<(String, bool)> = listed.vms[0]
        .snapshots
        .iter()
        .map(|s| (s.snapshot_id.clone(), s.has_memory))
        .collect();
    let active = sim.active(&vm).await;
    assert_eq!(snaps, vec![(active.snapshot_id.clone(), true), (s2, false)]);
    sim.assert_no_export_orphans().await;
    // It imports as it is now.
    let before = sim.snapshots(&vm).await;
    sim.remove_vm(&vm).await;
    let r = sim.import_vm_call(&vm, false, false, "").await.unwrap();
    sim.ok(r.operation).await;
    assert_eq!(sim.snapshots(&vm).await, before);
    sim.assert_no_orphans().await;
}

/// force_override deletes the earlier export first, and that deletion is
/// not undone: a replacing export that fails leaves no export of the VM
/// (neither the earlier one nor part of the new one) and the VM as it was.
#[tokio::test]
async fn simulation_failed_force_override_leaves_no_export() {
    let mut sim = Sim::start("3.3").await;
    let (vm, _s1) = sim.committed_memory_vm("replaced").await;
    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    sim.restart_coordinator("vm_export.copy_memories=error").await;
    let before = state(&mut sim).await;
    assert!(!before.export.is_empty());
    let op = sim.export_vm(&vm, false, true).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Failed as i32, "{op:?}");
    assert!(op.error_message.contains("injected failure"), "{op:?}");
    let after = state(&mut sim).await;
    assert!(after.export.is_empty(), "{:?}", after.export);
    assert_eq!(
        (&after.vms, &after.snapshots, &after.volumes),
        (&before.vms, &before.snapshots, &before.volumes)
    );
    assert!(sim.exported_vms().await.vms.is_empty());
    // Nothing is on the domain: a plain export goes through.
    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    sim.assert_no_export_orphans().await;
    sim.assert_no_orphans().await;
}

#[tokio::test]
async fn simulation_export_and_import_retries_return_the_same_operation() {
    let mut sim = Sim::start("3.3").await;
    let (vm, _s1) = sim.committed_memory_vm("retried").await;
    let req = export_req(&sim, &vm);
    let a = sim
        .vms
        .export_vm(req.clone())
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    let b = sim
        .vms
        .export_vm(req.clone())
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    assert_eq!(a.operation_id, b.operation_id);
    sim.ok(Some(a.clone())).await;
    // After the end too (the VM is exported now: still the same operation).
    let c = sim
        .vms
        .export_vm(req.clone())
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    assert_eq!(c.operation_id, a.operation_id);
    assert_eq!(c.state, pb::OperationState::Succeeded as i32);
    assert_eq!(sim.host.verifies_on(&sim.export_domain).len(), 1, "exported once");
    assert_eq!(sim.descriptors().await.len(), 1);

    sim.remove_vm(&vm).await;
    let ireq = import_req(&sim, &vm);
    let x = sim.vms.import_vm(ireq.clone()).await.unwrap().into_inner();
    let y = sim.vms.import_vm(ireq.clone()).await.unwrap().into_inner();
    let x = x.operation.unwrap();
    assert_eq!(x.operation_id, y.operation.unwrap().operation_id);
    let done = sim.ok(Some(x.clone())).await;
    // After the end (the VM exists now: still the same operation).
    let z = sim
        .vms
        .import_vm(ireq)
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    assert_eq!(z.operation_id, x.operation_id);
    assert_eq!(z.result_vm_id, done.result_vm_id);
    assert_eq!(sim.host.verifies_on(&sim.domain).len(), 1, "imported once");
    assert_eq!(sim.snapshots(&vm).await.len(), 2);
    // A request id of an export is not an import's.
    let reused = pb::ImportVmRequest {
        request_id: req.request_id.clone(),
        ..import_req(&sim, &vm)
    };
    let err = sim.vms.import_vm(reused).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    sim.assert_no_orphans().await;
}

/// An import into another data domain than the one the VM was exported
/// from: the chains land there, and the memory's metadata is rebound to
/// that domain.
#[tokio::test]
async fn simulation_import_into_another_data_domain() {
    let mut sim = Sim::start("3.3").await;
    let (vm, _s1) = sim.committed_memory_vm("moved").await;
    let before = sim.snapshots(&vm).await;
    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    sim.remove_vm(&vm).await;
    let location = sim.dir.path().join("roots/nfs2");
    std::fs::create_dir_all(&location).unwrap();
    let other = sim
        .storage
        .register_domain(storage::RegisterDomainRequest {
            domain_id: String::new(),
            name: "nfs2".into(),
            r#type: storage::DomainType::File as i32,
            location: location.display().to_string(),
            role: storage::DomainRole::Data as i32,
            format: storage::DomainFormat::Unspecified as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap()
        .domain_id;
    let req = pb::ImportVmRequest {
        target_domain_id: other.clone(),
        ..import_req(&sim, &vm)
    };
    let r = sim.vms.import_vm(req).await.unwrap().into_inner();
    sim.ok(r.operation).await;
    let v = sim.vm(&vm).await;
    assert!(v.disks.iter().all(|d| d.domain_id == other), "{v:?}");
    let after = sim.snapshots(&vm).await;
    assert_eq!(after.len(), 2);
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(a.snapshot_id, b.snapshot_id);
        let moved: Vec<common::VolumeRef> = disk_refs(b).iter().map(|r| on_domain(r, &other)).collect();
        assert_eq!(disk_refs(a), moved);
        let m = memory_ref(a);
        assert_eq!(m.dump.as_ref().unwrap().domain_id, other);
        assert_eq!(m.dump.unwrap().volume_id, memory_ref(b).dump.unwrap().volume_id);
    }
    assert!(
        sim.inventory().await.is_empty(),
        "nothing on the first data domain"
    );
    let landed = sim
        .storage
        .list_volumes(storage::ListVolumesRequest {
            domain_id: other.clone(),
            image_id: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert_eq!(landed.len(), 6, "{landed:#?}");
    let verified = sim.host.verifies_on(&other);
    assert_eq!(verified.len(), 1, "{verified:?}");
    assert_eq!(verified[0].1, other, "rebound to the new domain");
    let statuses = sim.run(&vm, false).await;
    assert_eq!(statuses[0], pb::VmStatus::RestoringState, "{statuses:?}");
    let HostCall::Run {
        restore_memory,
        disks,
        ..
    } = sim.host.last_run(&vm)
    else {
        unreachable!()
    };
    assert_eq!(restore_memory, after.last().unwrap().memory);
    assert!(disks.iter().all(|d| d.domain_id == other), "{disks:?}");
    sim.stop(&vm).await;
}
