//! The coordinator API's edges (issue 9): request ids reused for another
//! request, values the host would refuse, unbounded and control-character
//! strings, ids that are not ids, leftovers of removed VMs, and imports that
//! must never delete what they did not create. The real coordinator
//! in-process over gRPC, the real StorageService, the simulated host
//! ([`support::inproc`]).
mod support;

use ramsnap_proto::host::v1 as host;
use ramsnap_proto::snapshot::v1 as pb;
use support::inproc::{Db, InProc};
use support::MIB;
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

/// The ResourceInfo of an error: (type, name).
fn resource(s: &tonic::Status) -> (String, String) {
    s.get_error_details()
        .resource_info()
        .map(|r| (r.resource_type.clone(), r.resource_name.clone()))
        .unwrap_or_default()
}

fn create_req(sim: &InProc, name: &str) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        request_id: Uuid::new_v4().to_string(),
        name: name.into(),
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
    }
}

// ---------------------------------------------------------------------------
// Item 2: a request id reused with another request.

/// The case: StopVm of VM B under the request id of A's finished
/// stop was answered with A's operation, and B kept running. Then every RPC
/// that takes a request id, given one already used for another request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_reused_for_another_request_is_refused() {
    let mut sim = InProc::start(Db::Sqlite).await;
    let a = sim.create_vm("a").await;
    let b = sim.create_vm("b").await;
    sim.run(&a, false).await;
    sim.run(&b, false).await;
    let rid = Uuid::new_v4().to_string();
    let stop = |vm: &str| pb::StopVmRequest {
        request_id: rid.clone(),
        vm_id: vm.into(),
        graceful_timeout_seconds: 0,
    };
    let op = sim.vms.stop_vm(stop(&a)).await.unwrap().into_inner().operation;
    let stopped_a = sim.ok(op).await;
    // The same request again: the same operation.
    let again = sim
        .vms
        .stop_vm(stop(&a))
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    assert_eq!(again.operation_id, stopped_a.operation_id);
    // Another VM under the same id: refused, naming A's stop.
    let err = sim.vms.stop_vm(stop(&b)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(
        resource(&err),
        ("operation".to_string(), stopped_a.operation_id.clone())
    );
    assert_eq!(sim.host.status(&b), host::VmStatus::Up as i32, "B still runs");
    assert_eq!(sim.vm(&b).await.status, pb::VmStatus::Up as i32);
    // Another field of the same RPC.
    let mut graceful = stop(&a);
    graceful.graceful_timeout_seconds = 30;
    let err = sim.vms.stop_vm(graceful).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // Every RPC that takes a request id, under A's stop's: refused before
    // anything else is looked at (even with arguments that are all wrong).
    let nil = Uuid::nil().to_string();
    let s = &mut sim;
    let mut refusals: Vec<(&str, tonic::Status)> = Vec::new();
    macro_rules! refused {
        ($name:literal, $call:expr) => {
            refusals.push(($name, $call.await.map(|_| ()).unwrap_err()))
        };
    }
    let r = rid.clone();
    refused!(
        "CreateCluster",
        s.clusters.create_cluster(pb::CreateClusterRequest {
            request_id: r.clone(),
            name: "c".into(),
            compatibility_version: "3.3".into()
        })
    );
    refused!(
        "AddHost",
        s.clusters.add_host(pb::AddHostRequest {
            request_id: r.clone(),
            ..Default::default()
        })
    );
    refused!(
        "CreateVm",
        s.vms.create_vm(pb::CreateVmRequest {
            request_id: r.clone(),
            ..Default::default()
        })
    );
    refused!(
        "RemoveVm",
        s.vms.remove_vm(pb::RemoveVmRequest {
            request_id: r.clone(),
            vm_id: nil.clone()
        })
    );
    refused!(
        "RunVm",
        s.vms.run_vm(pb::RunVmRequest {
            request_id: r.clone(),
            vm_id: a.clone(),
            ..Default::default()
        })
    );
    refused!(
        "ExportVm",
        s.vms.export_vm(pb::ExportVmRequest {
            request_id: r.clone(),
            ..Default::default()
        })
    );
    refused!(
        "ImportVm",
        s.vms.import_vm(pb::ImportVmRequest {
            request_id: r.clone(),
            ..Default::default()
        })
    );
    refused!(
        "CreateSnapshot",
        s.snaps.create_snapshot(pb::CreateSnapshotRequest {
            request_id: r.clone(),
            vm_id: a.clone(),
            ..Default::default()
        })
    );
    refused!(
        "RemoveSnapshot",
        s.snaps.remove_snapshot(pb::RemoveSnapshotRequest {
            request_id: r.clone(),
            ..Default::default()
        })
    );
    refused!(
        "PreviewSnapshot",
        s.snaps.preview_snapshot(pb::PreviewSnapshotRequest {
            request_id: r.clone(),
            ..Default::default()
        })
    );
    refused!(
        "UndoPreview",
        s.snaps.undo_preview(pb::UndoPreviewRequest {
            request_id: r.clone(),
            vm_id: a.clone()
        })
    );
    refused!(
        "CommitSnapshot",
        s.snaps.commit_snapshot(pb::CommitSnapshotRequest {
            request_id: r.clone(),
            vm_id: a.clone()
        })
    );
    refused!(
        "CloneVmFromSnapshot",
        s.snaps.clone_vm_from_snapshot(pb::CloneVmFromSnapshotRequest {
            request_id: r.clone(),
            ..Default::default()
        })
    );
    for (rpc, err) in &refusals {
        assert_eq!(err.code(), Code::AlreadyExists, "{rpc}: {err:?}");
        assert_eq!(resource(err).1, stopped_a.operation_id, "{rpc}: {err:?}");
    }

    // CreateVm: the same request is the same operation, other fields not.
    let create = create_req(&sim, "c");
    let first = sim
        .vms
        .create_vm(create.clone())
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    let done = sim.ok(Some(first.clone())).await;
    let retry = sim
        .vms
        .create_vm(create.clone())
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    assert_eq!(retry.operation_id, first.operation_id);
    let err = sim
        .vms
        .create_vm(pb::CreateVmRequest {
            name: "c-other".into(),
            ..create.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(resource(&err).1, done.operation_id);
    assert!(sim
        .vms
        .get_vm(pb::GetVmRequest {
            vm_id: done.result_vm_id
        })
        .await
        .is_ok());
    assert_eq!(
        sim.inventory().await.len(),
        5,
        "a and b (two disks each), c (one), made once"
    );

    // CreateCluster and AddHost complete at once: their request ids too.
    let cluster = pb::CreateClusterRequest {
        request_id: Uuid::new_v4().to_string(),
        name: "second".into(),
        compatibility_version: "3.2".into(),
    };
    let c1 = sim
        .clusters
        .create_cluster(cluster.clone())
        .await
        .unwrap()
        .into_inner()
        .cluster
        .unwrap();
    let c2 = sim
        .clusters
        .create_cluster(cluster.clone())
        .await
        .unwrap()
        .into_inner()
        .cluster
        .unwrap();
    assert_eq!(c1, c2);
    let err = sim
        .clusters
        .create_cluster(pb::CreateClusterRequest {
            name: "third".into(),
            ..cluster.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(resource(&err).0, "operation");
    let clusters = sim
        .clusters
        .list_clusters(pb::ListClustersRequest {})
        .await
        .unwrap()
        .into_inner()
        .clusters;
    assert!(clusters.iter().all(|c| c.name != "third"), "{clusters:?}");
    let add = pb::AddHostRequest {
        request_id: Uuid::new_v4().to_string(),
        name: "h2".into(),
        cluster_id: c1.cluster_id.clone(),
        host_address: "http://127.0.0.1:1".into(),
        storage_address: "http://127.0.0.1:1".into(),
    };
    let h1 = sim
        .clusters
        .add_host(add.clone())
        .await
        .unwrap()
        .into_inner()
        .host
        .unwrap();
    let h2 = sim
        .clusters
        .add_host(add.clone())
        .await
        .unwrap()
        .into_inner()
        .host
        .unwrap();
    assert_eq!(h1, h2);
    let err = sim
        .clusters
        .add_host(pb::AddHostRequest {
            name: "h3".into(),
            ..add
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    sim.stop(&b).await;
    sim.assert_no_orphans().await;
    sim.finish().await;
}
