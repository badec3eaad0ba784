//! The coordinator API's edges (issue 9): request ids reused for another
//! request, values the host would refuse, unbounded and control-character
//! strings, ids that are not ids, leftovers of removed VMs, and imports that
//! must never delete what they did not create. The real coordinator
//! in-process over gRPC, the real StorageService, the simulated host
//! ([`support::inproc`]).
mod support;

use ramsnap_proto::host::v1 as host;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::storage::v1 as storage;
use ramsnap_snapshot::ovf::OvfVm;
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

/// The issue's case: StopVm of VM B under the request id of A's finished
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
        "SuspendVm",
        s.vms.suspend_vm(pb::SuspendVmRequest {
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

// ---------------------------------------------------------------------------
// Items 4 and 5: values the host would refuse, unbounded strings, control
// characters and ids that are not ids are refused at the door, and nothing
// is made.

/// Nothing at all was made: no VM, no operation, no volume.
async fn assert_nothing_made(sim: &mut InProc) {
    let vms = sim
        .vms
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert!(vms.is_empty(), "{vms:?}");
    let ops = sim
        .ops
        .list_operations(pb::ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .operations;
    assert!(ops.is_empty(), "{ops:?}");
    assert!(sim.inventory().await.is_empty());
}

/// The control and bidi-formatting characters a name or a description must
/// not carry: ESC, CR, LF, NUL, another C0, DEL, a C1, the overrides and
/// the isolates.
const FORBIDDEN: [char; 12] = [
    '\u{1b}', '\r', '\n', '\0', '\u{7}', '\u{7f}', '\u{9b}', '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}',
    '\u{200f}',
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_vm_refuses_what_the_host_would_refuse() {
    let mut sim = InProc::start(Db::Sqlite).await;
    type Edit = Box<dyn Fn(&mut pb::CreateVmRequest)>;
    let mut cases: Vec<(Edit, &str)> = vec![
        (Box::new(|r| r.memory_bytes = 1), "memory_bytes"),
        (Box::new(|r| r.memory_bytes = 1 << 62), "memory_bytes"),
        (Box::new(|r| r.memory_bytes = u64::MAX), "memory_bytes"),
        (Box::new(|r| r.memory_bytes = 64 * MIB + 1), "memory_bytes"),
        (Box::new(|r| r.memory_bytes = 8 * MIB), "memory_bytes"),
        (Box::new(|r| r.vcpus = u32::MAX), "vcpus"),
        (Box::new(|r| r.vcpus = 241), "vcpus"),
        (Box::new(|r| r.disks = vec![r.disks[0].clone(); 1000]), "disks"),
        (Box::new(|r| r.disks = vec![r.disks[0].clone(); 27]), "disks"),
        (
            Box::new(|r| {
                r.disks = vec![r.disks[0].clone(); 4];
                r.disks[3].capacity_bytes = 1;
            }),
            "disks[3].capacity_bytes",
        ),
        (
            Box::new(|r| r.disks[0].capacity_bytes = u64::MAX),
            "disks[0].capacity_bytes",
        ),
        (
            Box::new(|r| r.disks[0].capacity_bytes = MIB + 1),
            "disks[0].capacity_bytes",
        ),
        (Box::new(|r| r.name = "x".repeat(8192)), "name"),
        (Box::new(|r| r.name = " padded".into()), "name"),
        (Box::new(|r| r.cmdline = "console=ttyS0 ".repeat(400)), "cmdline"),
        (Box::new(|r| r.cmdline = "a\nb".into()), "cmdline"),
        (Box::new(|r| r.kernel = "../vmlinuz".into()), "kernel"),
        (Box::new(|r| r.kernel = "x".repeat(8192)), "kernel"),
        (Box::new(|r| r.initrd = "boot/initrd".into()), "initrd"),
        (
            Box::new(|r| {
                r.kernel.clear();
                r.initrd = "initrd.img".into();
            }),
            "kernel",
        ),
        (Box::new(|r| r.cluster_id = "c".repeat(8192)), "cluster_id"),
        (Box::new(|r| r.request_id = "r".repeat(8192)), "request_id"),
        (
            Box::new(|r| r.disks[0].domain_id = "d".repeat(8192)),
            "disks[0].domain_id",
        ),
    ];
    for c in FORBIDDEN {
        cases.push((Box::new(move |r| r.name = format!("evil{c}name")), "name"));
    }
    for (edit, field) in &cases {
        let mut req = create_req(&sim, "vm");
        req.kernel = "vmlinuz".into();
        edit(&mut req);
        let shown = format!("{:.80?}", req.name);
        let err = sim.vms.create_vm(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field} ({shown}): {err:?}");
        assert_eq!(support::bad_field(&err), *field, "{shown}: {err:?}");
        assert!(
            err.message().len() < 512,
            "{field}: the error echoes too much: {}",
            err.message()
        );
    }
    // Disks on an EXPORT domain: a precondition, naming the field.
    let mut req = create_req(&sim, "vm");
    req.disks.push(pb::DiskSpec {
        domain_id: sim.export_domain.clone(),
        capacity_bytes: MIB,
    });
    let err = sim.vms.create_vm(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(support::precondition(&err), "NOT_A_DATA_DOMAIN");
    assert!(err.message().contains("disks[1].domain_id"), "{err:?}");
    assert_nothing_made(&mut sim).await;
    // The limits themselves are accepted.
    let mut req = create_req(&sim, "edge");
    req.memory_bytes = 16 * MIB;
    req.vcpus = 240;
    req.disks = vec![req.disks[0].clone(); 26];
    req.disks[25].capacity_bytes = MIB;
    let op = sim.vms.create_vm(req).await.unwrap().into_inner().operation;
    sim.ok(op).await;
    assert_eq!(sim.inventory().await.len(), 26);
    sim.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_text_and_ids_are_bounded_and_printable() {
    let mut sim = InProc::start(Db::Sqlite).await;
    // Ids of 8 KB: INVALID_ARGUMENT with a cut echo, not a transport error.
    let long = "7".repeat(8192);
    let err = sim
        .vms
        .get_vm(pb::GetVmRequest { vm_id: long.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(support::bad_field(&err), "vm_id");
    assert!(err.message().contains('…'), "{}", err.message());
    assert!(
        err.message().chars().filter(|c| *c == '7').count() <= 64,
        "{}",
        err.message()
    );
    let err = sim
        .ops
        .get_operation(pb::GetOperationRequest {
            operation_id: long.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = sim
        .snaps
        .list_snapshots(pb::ListSnapshotsRequest {
            vm_id: long.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Cluster and host names, host addresses.
    let mut bad_clusters = vec![pb::CreateClusterRequest {
        request_id: String::new(),
        name: "c".repeat(8192),
        compatibility_version: "3.3".into(),
    }];
    for c in FORBIDDEN {
        bad_clusters.push(pb::CreateClusterRequest {
            request_id: String::new(),
            name: format!("c{c}"),
            compatibility_version: "3.3".into(),
        });
    }
    for req in bad_clusters {
        let err = sim.clusters.create_cluster(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(support::bad_field(&err), "name");
    }
    let host = |name: &str, address: &str| pb::AddHostRequest {
        request_id: String::new(),
        name: name.into(),
        cluster_id: sim.cluster_id.clone(),
        host_address: address.into(),
        storage_address: "http://127.0.0.1:1".into(),
    };
    for (req, field) in [
        (host("h\u{1b}[2J", "http://127.0.0.1:1"), "name"),
        (
            host("h", &format!("http://{}:1", "a".repeat(8192))),
            "host_address",
        ),
        (host("h", "http://a\nb:1"), "host_address"),
    ] {
        let err = sim.clusters.add_host(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(support::bad_field(&err), field);
        assert!(err.message().len() < 512, "{}", err.message());
    }
    let hosts = sim
        .clusters
        .list_hosts(pb::ListHostsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert_eq!(hosts.len(), 1, "{hosts:?}");

    // Snapshot descriptions, clone names and targets.
    let vm = sim.create_vm("subject").await;
    for description in FORBIDDEN
        .iter()
        .map(|c| format!("before{c}upgrade"))
        .chain(["d".repeat(4097)])
    {
        let err = sim
            .snaps
            .create_snapshot(pb::CreateSnapshotRequest {
                description: description.clone(),
                ..support::Env::snapshot_req(&vm, false, "")
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{description:?}: {err:?}");
        assert_eq!(support::bad_field(&err), "description");
    }
    let s1 = sim.snapshot(&vm, false, "fine").await;
    let clone = |name: &str, target: &str| pb::CloneVmFromSnapshotRequest {
        request_id: Uuid::new_v4().to_string(),
        vm_id: vm.clone(),
        snapshot_id: s1.clone(),
        name: name.into(),
        target_domain_id: target.into(),
        keep_memory: false,
    };
    let err = sim
        .snaps
        .clone_vm_from_snapshot(clone("evil\u{202e}gnp.exe", ""))
        .await
        .unwrap_err();
    assert_eq!(support::bad_field(&err), "name");
    let export = sim.export_domain.clone();
    let err = sim
        .snaps
        .clone_vm_from_snapshot(clone("copy", &export))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(support::precondition(&err), "NOT_A_DATA_DOMAIN");
    // A fork of a snapshot without memory: nothing to keep.
    let err = sim
        .snaps
        .clone_vm_from_snapshot(pb::CloneVmFromSnapshotRequest {
            keep_memory: true,
            ..clone("fork", "")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(support::precondition(&err), "SNAPSHOT_HAS_NO_MEMORY");
    let vms = sim
        .vms
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert_eq!(vms.len(), 1, "only the subject: {vms:?}");
    assert_eq!(sim.export_volumes().await.len(), 0);
    sim.assert_no_orphans().await;
    // A request id reused for the fork of what it cloned before: refused.
    let first = clone("copy", "");
    let op = sim
        .snaps
        .clone_vm_from_snapshot(first.clone())
        .await
        .unwrap()
        .into_inner()
        .operation;
    sim.ok(op).await;
    let err = sim
        .snaps
        .clone_vm_from_snapshot(pb::CloneVmFromSnapshotRequest {
            keep_memory: true,
            ..first
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    sim.finish().await;
}

/// The exported VM's descriptor, parsed.
async fn descriptor(sim: &mut InProc, vm_id: &str) -> OvfVm {
    let domain_id = sim.export_domain.clone();
    let xml = sim
        .storage
        .get_vm_descriptor(storage::GetVmDescriptorRequest {
            domain_id,
            vm_id: vm_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .descriptor
        .unwrap()
        .ovf;
    OvfVm::parse(&xml).unwrap()
}

async fn put_descriptor(sim: &mut InProc, ovf: &OvfVm) {
    let domain_id = sim.export_domain.clone();
    sim.storage
        .put_vm_descriptor(storage::PutVmDescriptorRequest {
            domain_id,
            vm_id: ovf.vm_id.to_string(),
            ovf: ovf.to_xml(),
        })
        .await
        .unwrap();
}

/// ImportVm takes the VM's configuration from the descriptor: each value is
/// checked as CreateVm checks it (OVF_INVALID naming the value), before
/// anything is made; a name given in the request replaces the exported one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_checks_the_values_it_takes_from_the_descriptor() {
    let mut sim = InProc::start(Db::Sqlite).await;
    let vm = sim.create_vm_with("exported", 1, false).await;
    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    sim.remove_vm(&vm).await;
    let real = descriptor(&mut sim, &vm).await;
    type Edit = fn(&mut OvfVm);
    let edits: [(Edit, &str); 8] = [
        (|o| o.memory_bytes = 1, "memory_bytes"),
        (|o| o.memory_bytes = u64::MAX, "memory_bytes"),
        (|o| o.vcpus = u32::MAX, "vcpus"),
        (|o| o.kernel = "../../etc/passwd".into(), "kernel"),
        (|o| o.cmdline = "quiet\u{9b}2J\u{2066}".into(), "cmdline"),
        (|o| o.cmdline = "x".repeat(5000), "cmdline"),
        (|o| o.name = "evil\u{202e}name".into(), "name"),
        (|o| o.disks[0].capacity_bytes = 3, "disks[0].capacity_bytes"),
    ];
    for (edit, field) in edits {
        let mut ovf = real.clone();
        edit(&mut ovf);
        put_descriptor(&mut sim, &ovf).await;
        let err = sim.import_vm_call(&vm, false, false, "").await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{field}: {err:?}");
        assert_eq!(support::precondition(&err), "OVF_INVALID", "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {err:?}");
    }
    assert!(sim
        .vms
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms
        .is_empty());
    assert!(sim.inventory().await.is_empty());
    // Under a name of its own the exported name is not taken, nor checked.
    let mut ovf = real.clone();
    ovf.name = "evil\u{202e}name".into();
    put_descriptor(&mut sim, &ovf).await;
    let r = sim.import_vm_call(&vm, false, false, "renamed").await.unwrap();
    sim.ok(r.operation).await;
    assert_eq!(sim.vm(&vm).await.name, "renamed");
    sim.assert_no_orphans().await;
    sim.finish().await;
}

// ---------------------------------------------------------------------------
// Item 1: an import never deletes what it did not create.

/// Every volume on the data domain, as "image/volume".
async fn data_volumes(sim: &mut InProc) -> std::collections::BTreeSet<String> {
    sim.inventory()
        .await
        .into_iter()
        .map(|v| {
            let r = v.r#ref.unwrap();
            format!("{}/{}", r.image_id, r.volume_id)
        })
        .collect()
}

/// The issue's case: the descriptor of an existing VM, edited to another
/// VM id and name but with the same volume ids. The import failed with
/// ALREADY_EXISTS and its undo deleted the existing VM's live disk. It is
/// refused at the door now, and the VM keeps every volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_of_an_edited_descriptor_never_deletes_an_existing_vms_disks() {
    let mut sim = InProc::start(Db::Sqlite).await;
    let (vm, _) = sim.vm_with_memory_snapshot("original").await;
    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    let before = data_volumes(&mut sim).await;
    let mut edited = descriptor(&mut sim, &vm).await;
    edited.vm_id = Uuid::new_v4();
    edited.name = "impostor".into();
    put_descriptor(&mut sim, &edited).await;
    let err = sim
        .import_vm_call(&edited.vm_id.to_string(), false, false, "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(support::precondition(&err), "VOLUME_EXISTS", "{err:?}");
    assert!(err.message().contains("original"), "names the VM: {err:?}");
    assert_eq!(data_volumes(&mut sim).await, before);
    // A collapsed import would make the leaves' ids: refused the same way.
    let err = sim
        .import_vm_call(&edited.vm_id.to_string(), false, true, "")
        .await
        .unwrap_err();
    assert_eq!(support::precondition(&err), "VOLUME_EXISTS", "{err:?}");
    // As a clone (new ids) it imports beside the original.
    let r = sim
        .import_vm_call(&edited.vm_id.to_string(), true, false, "copy")
        .await
        .unwrap();
    sim.ok(r.operation).await;
    assert!(data_volumes(&mut sim).await.is_superset(&before));
    sim.assert_no_orphans().await;
    sim.run(&vm, false).await;
    sim.stop(&vm).await;
    sim.finish().await;
}

/// Two imports of descriptors that share volume ids (the exported VM and an
/// edited copy under another id and name), started together: both pass the
/// door, and their copies meet on the same volume ids. One wins; the other
/// fails with VOLUME_EXISTS and its undo deletes only what it made, never
/// the winner's volumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_imports_sharing_volume_ids_never_delete_each_others_volumes() {
    let mut sim = InProc::start(Db::Sqlite).await;
    let vm = sim.create_vm_with("shared", 3, false).await;
    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    sim.remove_vm(&vm).await;
    let mut edited = descriptor(&mut sim, &vm).await;
    edited.vm_id = Uuid::new_v4();
    edited.name = "twin".into();
    put_descriptor(&mut sim, &edited).await;
    let twin = edited.vm_id.to_string();
    let (a, b) = tokio::join!(
        {
            let mut s = sim.vms.clone();
            let req = import_req(&sim, &vm);
            async move { s.import_vm(req).await }
        },
        {
            let mut s = sim.vms.clone();
            let req = import_req(&sim, &twin);
            async move { s.import_vm(req).await }
        },
    );
    let mut outcomes = Vec::new();
    for r in [a, b] {
        outcomes.push(match r {
            Ok(r) => {
                let op = sim.wait(r.into_inner().operation).await;
                (op.state == pb::OperationState::Succeeded as i32, op.error_message)
            }
            Err(e) => (false, format!("{}: {}", support::precondition(&e), e.message())),
        });
    }
    let won = outcomes.iter().filter(|(ok, _)| *ok).count();
    assert_eq!(won, 1, "exactly one import wins: {outcomes:?}");
    for (ok, why) in &outcomes {
        assert!(
            *ok || why.contains("VOLUME_EXISTS") || why.contains("exists"),
            "{outcomes:?}"
        );
    }
    // The winner has every volume; nothing of the loser is left.
    sim.assert_no_orphans().await;
    let vms = sim
        .vms
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(sim.inventory().await.len(), 3);
    let winner = vms[0].vm_id.clone();
    sim.run(&winner, false).await;
    sim.stop(&winner).await;
    sim.finish().await;
}

/// The export's side of the same property. An export domain holds volumes
/// under a VM's ids that no descriptor names (an earlier export whose
/// descriptor was removed, or a foreign one): an export without
/// force_override is refused with VOLUME_EXISTS and leaves every one of
/// them (its unwind used to delete them all: the first copy met one, and
/// the undo deleted every planned target); with force_override it replaces
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_never_deletes_export_domain_volumes_it_did_not_create() {
    let mut sim = InProc::start(Db::Sqlite).await;
    let (vm, _) = sim.vm_with_memory_snapshot("exported").await;
    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    let domain_id = sim.export_domain.clone();
    sim.storage
        .delete_vm_descriptor(storage::DeleteVmDescriptorRequest {
            domain_id,
            vm_id: vm.clone(),
        })
        .await
        .unwrap();
    let left = sim.export_inventory().await;
    assert!(
        !left.is_empty() && !left.iter().any(|v| v.starts_with("ovf:")),
        "{left:?}"
    );

    let op = sim.export_vm(&vm, false, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Failed as i32, "{op:?}");
    assert!(op.error_message.contains("VOLUME_EXISTS"), "{op:?}");
    assert!(
        op.error_message.contains("force_override"),
        "says what to do: {op:?}"
    );
    assert_eq!(
        sim.export_inventory().await,
        left,
        "the export domain is untouched"
    );
    // The collapsed export makes the leaves' ids: refused the same way.
    let op = sim.export_vm(&vm, true, false).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Failed as i32, "{op:?}");
    assert_eq!(
        sim.export_inventory().await,
        left,
        "the export domain is untouched"
    );
    // The VM was never touched: it is DOWN and unlocked.
    sim.run(&vm, false).await;
    sim.stop(&vm).await;

    let op = sim.export_vm(&vm, false, true).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    let now = sim.export_inventory().await;
    assert!(now.contains(&format!("ovf:{vm}")), "{now:?}");
    assert_eq!(
        now.len(),
        left.len() + 1,
        "the same volumes again, and the descriptor: {now:?}"
    );
    sim.assert_no_orphans().await;
    sim.finish().await;
}

fn import_req(sim: &InProc, vm_id: &str) -> pb::ImportVmRequest {
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

// ---------------------------------------------------------------------------
// Item 6: what is left of a removed VM.

/// ReadConsole and WatchVm of an unknown or removed VM are NOT_FOUND at
/// once, and a WatchVm stream of a VM that gets removed ends with NOT_FOUND
/// (the proto says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_vms_have_no_console_and_their_watch_ends() {
    let mut sim = InProc::start(Db::Sqlite).await;
    let unknown = Uuid::new_v4().to_string();
    let quick = std::time::Duration::from_secs(5);
    let err = tokio::time::timeout(
        quick,
        sim.vms.read_console(pb::ReadConsoleRequest {
            vm_id: unknown.clone(),
            offset: 0,
            max_bytes: 0,
        }),
    )
    .await
    .expect("answered at once")
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = tokio::time::timeout(
        quick,
        sim.vms.watch_vm(pb::WatchVmRequest {
            vm_id: unknown.clone(),
        }),
    )
    .await
    .expect("answered at once")
    .map(|_| ())
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    let vm = sim.create_vm("doomed").await;
    sim.run(&vm, false).await;
    let console = sim
        .vms
        .read_console(pb::ReadConsoleRequest {
            vm_id: vm.clone(),
            offset: 0,
            max_bytes: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!console.data.is_empty());
    sim.stop(&vm).await;
    let mut watch = sim
        .vms
        .watch_vm(pb::WatchVmRequest { vm_id: vm.clone() })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, pb::VmStatus::Down as i32);
    sim.remove_vm(&vm).await;
    // The stream ends: NOT_FOUND, soon after the removal.
    let end = loop {
        match tokio::time::timeout(quick, watch.message())
            .await
            .expect("the watch of a removed VM ends")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without saying why"),
            Err(e) => break e,
        }
    };
    assert_eq!(end.code(), Code::NotFound, "{end:?}");
    let err = sim
        .vms
        .read_console(pb::ReadConsoleRequest {
            vm_id: vm.clone(),
            offset: 0,
            max_bytes: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = sim
        .vms
        .watch_vm(pb::WatchVmRequest { vm_id: vm.clone() })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    sim.finish().await;
}

/// ListVms answers from one query for every VM's disks and leaves (not a
/// few per VM): it shows exactly what GetVm shows for each VM, with one
/// disk or several, after snapshots and during a preview, for all VMs and
/// for a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_vms_shows_what_get_vm_shows() {
    for db in [Db::Sqlite, Db::Postgres] {
        list_vms_against_get_vm(db).await;
    }
}

async fn list_vms_against_get_vm(db: Db) {
    let mut sim = InProc::start(db).await;
    let one = sim.create_vm_with("one-disk", 1, false).await;
    let three = sim.create_vm_with("three-disks", 3, false).await;
    let snapped = sim.create_vm_with("snapped", 2, false).await;
    let first = sim.snapshot(&snapped, false, "first").await;
    sim.snapshot(&snapped, false, "second").await;
    sim.preview(&snapped, &first, false).await;
    let cluster = sim.cluster_id.clone();
    for filter in [String::new(), cluster] {
        let listed = sim
            .vms
            .list_vms(pb::ListVmsRequest {
                cluster_id: filter.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .vms;
        assert_eq!(listed.len(), 3, "{listed:?}");
        for id in [&one, &three, &snapped] {
            let got = sim.vm(id).await;
            let from_list = listed.iter().find(|v| v.vm_id == *id).expect("listed");
            assert_eq!(*from_list, got, "cluster filter {filter:?}");
            assert!(got.disks.iter().all(|d| !d.leaf_volume_id.is_empty()), "{got:?}");
        }
    }
    sim.finish().await;
}

/// SQLite serves one coordinator (issue 11): a second one opened on the
/// same file is refused at start, with an error that names the file; the
/// lock goes with its holder however that ends (here another process,
/// util-linux `flock`, killed with SIGKILL), so a restart after a crash is
/// never refused.
#[tokio::test]
async fn a_second_coordinator_on_one_sqlite_file_is_refused() {
    use ramsnap_common::tls::ClientTransport;
    use ramsnap_snapshot::{Coordinator, Options};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("coordinator.db");
    let url = format!("sqlite:{}", file.display());
    let options = || Options::new(ClientTransport::Insecure);
    let refused = |r: anyhow::Result<Coordinator>| match r {
        Ok(_) => panic!("a second coordinator opened the same SQLite file"),
        Err(e) => e.to_string(),
    };

    let first = Coordinator::connect_with_options(&url, options()).await.unwrap();
    let err = refused(Coordinator::connect_with_options(&url, options()).await);
    assert!(
        err.contains("another coordinator") && err.contains(&file.display().to_string()),
        "{err}"
    );
    first.close().await;
    drop(first);
    let second = Coordinator::connect_with_options(&url, options()).await.unwrap();
    second.close().await;
    drop(second);

    // Held by another process, then that process killed (--no-fork: the
    // process that holds the lock is the one killed).
    let lock = dir.path().join("coordinator.db.coordinator.lock");
    let mut holder = std::process::Command::new("flock")
        .args(["--exclusive", "--no-fork"])
        .arg(&lock)
        .args(["sleep", "60"])
        .spawn()
        .unwrap();
    let mut held = false;
    for _ in 0..200 {
        let probe = std::process::Command::new("flock")
            .args(["--nonblock", "--exclusive"])
            .arg(&lock)
            .arg("true")
            .status()
            .unwrap();
        if !probe.success() {
            held = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(held, "the other process took the lock");
    refused(Coordinator::connect_with_options(&url, options()).await);
    holder.kill().unwrap();
    holder.wait().unwrap();
    let after = Coordinator::connect_with_options(&url, options()).await.unwrap();
    after.close().await;
}

/// Two coordinator replicas on one PostgreSQL (issue 11): an operation
/// that runs on A is followed by WatchOperation on B, its changes pushed
/// over LISTEN/NOTIFY, and cancelled through B: A cancels it where it
/// runs, and it unwinds. B's watch poll is set to a minute, longer than
/// the test waits, so every change B shows was pushed (not polled).
#[tokio::test]
async fn a_second_replica_follows_and_cancels_an_operation_running_on_the_first() {
    let holds = tempfile::tempdir().unwrap();
    std::env::set_var("RAMSNAP_FAILPOINT_DIR", holds.path());
    let mut sim = InProc::start_with(Db::Postgres, "3.3", "snapshot_create.overlays=hold").await;
    let b = support::inproc::open_coordinator_with(
        &sim.db_url,
        ramsnap_snapshot::Options {
            watch_backstop: std::time::Duration::from_secs(60),
            ..ramsnap_snapshot::Options::new(ramsnap_common::tls::ClientTransport::Insecure).failpoints("")
        },
    )
    .await;
    let (b_addr, b_stop) = support::serve(b.service_set()).await;
    let channel = tonic::transport::Endpoint::from_shared(b_addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut b_ops = pb::operation_service_client::OperationServiceClient::new(channel);
    // What the replicas say to each other, heard by the test itself.
    let server = std::env::var("RAMSNAP_TEST_PG_URL").unwrap();
    let (base, _) = server.rsplit_once('/').unwrap();
    let db_name = sim.db_url.rsplit('/').next().unwrap().to_string();
    let mut listener = sqlx::postgres::PgListener::connect(&format!("{base}/{db_name}"))
        .await
        .unwrap();
    listener.listen(ramsnap_snapshot::peers::CHANNEL).await.unwrap();

    let vm = sim.create_vm("replicas").await;
    // Both replicas see the other live (their peer check runs every second).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let op = sim
        .snaps
        .create_snapshot(support::Env::snapshot_req(&vm, false, "held on A"))
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    let mut watch = b_ops
        .watch_operation(pb::WatchOperationRequest {
            operation_id: op.operation_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap().operation.unwrap();
    assert_eq!(first.state, pb::OperationState::Running as i32);
    assert!(!b.app.executor().is_running(op.operation_id.parse().unwrap()));

    // Cancelled through B, then A's hold released: A unwinds it.
    let cancel = b_ops
        .cancel_operation(pb::CancelOperationRequest {
            operation_id: op.operation_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cancel.cancelling);
    let b_id = b.app.executor().replica_id().to_string();
    let told = format!("op:{}", op.operation_id);
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            let note = listener.recv().await.unwrap();
            let (from, objects) = note.payload().split_once(' ').unwrap();
            if from == b_id && objects.split(',').any(|o| o == told) {
                break;
            }
        }
    })
    .await
    .expect("B told the other replicas of the cancel");
    std::fs::write(holds.path().join("snapshot_create.overlays"), b"").unwrap();
    // Each change B shows, and how long after its commit (its updated_at;
    // the replicas share this machine's clock).
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let mut lags = Vec::new();
    let last = loop {
        // Well within B's minute-long poll: only a push delivers in time.
        let o = tokio::time::timeout(std::time::Duration::from_secs(20), watch.message())
            .await
            .expect("a change pushed to B within 20 s")
            .unwrap()
            .expect("the stream ends after the last state")
            .operation
            .unwrap();
        lags.push((now_ms() - o.updated_at, o.state, o.warnings.len()));
        if o.state != pb::OperationState::Running as i32 {
            break o;
        }
    };
    assert_eq!(last.state, pb::OperationState::Cancelled as i32, "{last:?}");
    // How soon after its commit on A each change reached B's watcher: a
    // push takes milliseconds on an idle machine (tens under CI's load).
    eprintln!("changes seen on B, ms after their commit on A (lag, state, warnings): {lags:?}");
    assert!(lags.iter().all(|(lag, _, _)| *lag < 5_000), "{lags:?}");
    assert!(sim.vm(&vm).await.locked_by_operation_id.is_empty());
    let _ = b_stop.send(());
    b.close().await;
    sim.finish().await;
}

/// The agents fence the coordinator's calls by saga generation (issue 11):
/// once a call of generation 2 of a saga has arrived, a mutating call of
/// generation 1 of that saga is refused with STALE_OWNER before it does
/// anything, while reads, other sagas and calls made outside any saga go
/// through; malformed fence headers are INVALID_ARGUMENT naming the header.
#[tokio::test]
async fn agents_refuse_the_calls_of_a_stale_saga_owner() {
    use ramsnap_common::fence::{GENERATION_HEADER, SAGA_HEADER};
    let sim = InProc::start(Db::Sqlite).await;
    let mut storage = sim.storage.clone();
    let saga = Uuid::new_v4();
    let create = |volume: Uuid, saga: Option<(Uuid, &str)>| {
        let mut req = tonic::Request::new(storage::CreateVolumeRequest {
            request_id: volume.to_string(),
            domain_id: sim.domain.clone(),
            image_id: Uuid::new_v4().to_string(),
            volume_id: volume.to_string(),
            capacity_bytes: MIB,
            format: storage::VolumeFormat::Raw as i32,
            allocation: storage::VolumeAllocation::Unspecified as i32,
            purpose: storage::VolumePurpose::Disk as i32,
            parent_volume_id: String::new(),
            description: "fenced".into(),
        });
        if let Some((saga, generation)) = saga {
            req.metadata_mut()
                .insert(SAGA_HEADER, saga.to_string().parse().unwrap());
            req.metadata_mut()
                .insert(GENERATION_HEADER, generation.parse().unwrap());
        }
        req
    };
    let listed =
        |storage: &mut storage::storage_service_client::StorageServiceClient<tonic::transport::Channel>| {
            let mut s = storage.clone();
            let domain = sim.domain.clone();
            async move {
                s.list_volumes(storage::ListVolumesRequest {
                    domain_id: domain,
                    image_id: String::new(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .volumes
                .into_iter()
                .map(|v| v.r#ref.unwrap().volume_id)
                .collect::<Vec<_>>()
            }
        };

    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    storage.create_volume(create(a, Some((saga, "1")))).await.unwrap();
    // The adopter (generation 2) calls; from then on generation 1 is stale.
    storage.create_volume(create(b, Some((saga, "2")))).await.unwrap();
    let refused = storage
        .create_volume(create(c, Some((saga, "1"))))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(support::precondition(&refused), "STALE_OWNER", "{refused:?}");
    assert_eq!(support::precondition_subject(&refused), format!("saga/{saga}"));
    let volumes = listed(&mut storage).await;
    assert!(
        !volumes.contains(&c.to_string()),
        "a refused call made its volume: {volumes:?}"
    );
    assert!(
        volumes.contains(&a.to_string()) && volumes.contains(&b.to_string()),
        "{volumes:?}"
    );

    // A stale delete is refused too, and deletes nothing.
    let mut del = tonic::Request::new(storage::DeleteVolumeRequest {
        request_id: Uuid::new_v4().to_string(),
        r#ref: Some(ramsnap_proto::common::v1::VolumeRef {
            domain_id: sim.domain.clone(),
            image_id: String::new(),
            volume_id: a.to_string(),
        }),
    });
    del.metadata_mut()
        .insert(SAGA_HEADER, saga.to_string().parse().unwrap());
    del.metadata_mut().insert(GENERATION_HEADER, "1".parse().unwrap());
    let refused = storage.delete_volume(del).await.unwrap_err();
    assert_eq!(support::precondition(&refused), "STALE_OWNER", "{refused:?}");
    assert!(listed(&mut storage).await.contains(&a.to_string()));

    // Reads are not fenced; another saga's generation 1 is its own; a call
    // outside any saga is not fenced.
    let mut read = tonic::Request::new(storage::ListVolumesRequest {
        domain_id: sim.domain.clone(),
        image_id: String::new(),
        ..Default::default()
    });
    read.metadata_mut()
        .insert(SAGA_HEADER, saga.to_string().parse().unwrap());
    read.metadata_mut()
        .insert(GENERATION_HEADER, "1".parse().unwrap());
    storage.list_volumes(read).await.unwrap();
    storage
        .create_volume(create(c, Some((Uuid::new_v4(), "1"))))
        .await
        .unwrap();
    storage.create_volume(create(Uuid::new_v4(), None)).await.unwrap();

    // Malformed fences.
    for (saga, generation, field) in [
        ("not-a-uuid", "1", SAGA_HEADER),
        ("6b9f7f4e-8f0a-4d39-9d43-1d7f4f1e0b8a", "-3", GENERATION_HEADER),
        (
            "6b9f7f4e-8f0a-4d39-9d43-1d7f4f1e0b8a",
            "99999999999999999999999",
            GENERATION_HEADER,
        ),
    ] {
        let mut req = create(Uuid::new_v4(), None);
        req.metadata_mut().insert(SAGA_HEADER, saga.parse().unwrap());
        req.metadata_mut()
            .insert(GENERATION_HEADER, generation.parse().unwrap());
        let bad = storage.create_volume(req).await.unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
        assert_eq!(support::bad_field(&bad), field, "{bad:?}");
    }
    let mut half = create(Uuid::new_v4(), None);
    half.metadata_mut()
        .insert(SAGA_HEADER, saga.to_string().parse().unwrap());
    let bad = storage.create_volume(half).await.unwrap_err();
    assert_eq!(support::bad_field(&bad), GENERATION_HEADER, "{bad:?}");
}

/// ListOperations pages (AIP-158) on both databases: 1,000 operations read
/// page by page over gRPC while more are being created: each of the 1,000
/// exactly once, in (creation time, id) order (many share a millisecond:
/// the id breaks the tie), nothing twice; filters by VM and by state; a
/// token is refused with other filters, and forged tokens and negative
/// sizes are INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_are_listed_page_by_page_while_more_are_made() {
    for db in [Db::Sqlite, Db::Postgres] {
        operations_paged(db).await;
    }
}

async fn new_operation(app: &ramsnap_snapshot::app::App, vm: Option<Uuid>) -> Uuid {
    let new = ramsnap_snapshot::db::NewOperation {
        id: Uuid::new_v4(),
        kind: "snapshot_create".into(),
        vm_id: vm,
        request_id: None,
        warnings: Vec::new(),
    };
    app.db.create_operation(&new).await.unwrap().id
}

async fn list_page(
    sim: &mut InProc,
    vm_id: &str,
    state: pb::OperationState,
    page_size: i32,
    page_token: String,
) -> Result<pb::ListOperationsResponse, tonic::Status> {
    sim.ops
        .list_operations(pb::ListOperationsRequest {
            vm_id: vm_id.to_string(),
            page_size,
            page_token,
            state: state as i32,
        })
        .await
        .map(|r| r.into_inner())
}

async fn operations_paged(db: Db) {
    let mut sim = InProc::start(db).await;
    let vm = sim.create_vm("paged").await;
    let vm_uuid = Uuid::parse_str(&vm).unwrap();
    let mut made = std::collections::BTreeSet::new();
    for i in 0..1000 {
        made.insert(
            new_operation(&sim.app, (i % 2 == 0).then_some(vm_uuid))
                .await
                .to_string(),
        );
    }
    // More are made while the pages are read.
    let app = sim.app.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let maker = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                new_operation(&app, Some(vm_uuid)).await;
                n += 1;
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            n
        })
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list_page(&mut sim, "", pb::OperationState::Unspecified, 37, token)
            .await
            .unwrap();
        assert!(page.operations.len() <= 37);
        pages += 1;
        seen.extend(page.operations);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let extra = maker.await.unwrap();
    let ids: Vec<String> = seen.iter().map(|o| o.operation_id.clone()).collect();
    let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "an operation was listed twice");
    assert!(
        made.iter().all(|id| unique.contains(id)),
        "an operation was missed"
    );
    let order: Vec<(i64, &String)> = seen.iter().map(|o| (o.created_at, &o.operation_id)).collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "not in (created_at, id) order"
    );
    assert!(pages >= 1001 / 37, "{pages} pages");
    eprintln!(
        "{db:?}: {} operations in {pages} pages, {extra} made meanwhile",
        seen.len()
    );

    // Filters: the VM's, the running ones; a token keeps its filters.
    let mut of_vm = 0;
    let mut token = String::new();
    loop {
        let page = list_page(&mut sim, &vm, pb::OperationState::Running, 100, token)
            .await
            .unwrap();
        assert!(page
            .operations
            .iter()
            .all(|o| o.vm_id == vm && o.state == pb::OperationState::Running as i32));
        of_vm += page.operations.len();
        if page.next_page_token.is_empty() {
            break;
        }
        let err = list_page(
            &mut sim,
            "",
            pb::OperationState::Running,
            100,
            page.next_page_token.clone(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with("page_token: "), "{}", err.message());
        token = page.next_page_token;
    }
    assert!(of_vm >= 500 + extra as usize, "{of_vm}");
    let done = list_page(&mut sim, &vm, pb::OperationState::Succeeded, 0, String::new())
        .await
        .unwrap();
    assert_eq!(done.operations.len(), 1, "the VM's creation");
    assert_eq!(done.operations[0].kind, "create_vm");

    // The default page and the cap.
    let first = list_page(&mut sim, "", pb::OperationState::Unspecified, 0, String::new())
        .await
        .unwrap();
    assert_eq!(first.operations.len(), 500);
    let big = list_page(
        &mut sim,
        "",
        pb::OperationState::Unspecified,
        i32::MAX,
        String::new(),
    )
    .await
    .unwrap();
    assert_eq!(big.operations.len(), 1000);
    assert!(!big.next_page_token.is_empty());
    // Hostile values.
    for (size, token, field) in [
        (-1, String::new(), "page_size"),
        (10, "p1.0000000000000000.zz".to_string(), "page_token"),
        (10, "x".repeat(100_000), "page_token"),
    ] {
        let err = list_page(&mut sim, "", pb::OperationState::Unspecified, size, token)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{}", err.message());
    }
    let err = sim
        .ops
        .list_operations(pb::ListOperationsRequest {
            state: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    sim.finish().await;
}

async fn update(sim: &mut InProc, req: pb::UpdateVmRequest) -> Result<pb::Operation, tonic::Status> {
    let r = sim
        .vms
        .update_vm(pb::UpdateVmRequest {
            request_id: Uuid::new_v4().to_string(),
            ..req
        })
        .await?
        .into_inner();
    Ok(sim.wait(r.operation).await)
}

/// UpdateVm on both databases: the name and the stateless flag change
/// while the VM runs; memory, vcpus and boot images only while it is down,
/// and such a change drops the memory the active snapshot held (a warning
/// says so; the volumes go unless a snapshot keeps them); bad values are
/// refused before anything changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_vm_edits_what_its_state_allows() {
    for db in [Db::Sqlite, Db::Postgres] {
        update_vm_cases(db).await;
    }
}

async fn update_vm_cases(db: Db) {
    let mut sim = InProc::start(db).await;
    let vm = sim.create_vm("edit-me").await;
    sim.create_vm("taken").await;
    let by = |f: fn(&mut pb::UpdateVmRequest)| {
        let mut r = pb::UpdateVmRequest {
            vm_id: vm.clone(),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    sim.run(&vm, false).await;
    // While it runs: the name and the stateless flag.
    let op = update(
        &mut sim,
        by(|r| {
            r.name = Some("edited".into());
            r.stateless = Some(true);
        }),
    )
    .await
    .unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    let got = sim.vm(&vm).await;
    assert_eq!((got.name.as_str(), got.stateless), ("edited", true));
    // Not the machine.
    let err = update(&mut sim, by(|r| r.memory_bytes = Some(128 * MIB)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("VM edited is"), "{}", err.message());
    assert_eq!(sim.vm(&vm).await.memory_bytes, 64 * MIB);

    // A memory snapshot, previewed with its memory: the next run would
    // restore it. A change of the machine drops it.
    let op = update(&mut sim, by(|r| r.stateless = Some(false))).await.unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    let snap = sim.snapshot(&vm, true, "with memory").await;
    sim.stop(&vm).await;
    sim.preview(&vm, &snap, true).await;
    let memory = sim.active(&vm).await.memory.expect("the preview has the memory");
    let op = update(
        &mut sim,
        by(|r| {
            r.memory_bytes = Some(128 * MIB);
            r.vcpus = Some(2);
        }),
    )
    .await
    .unwrap();
    assert_eq!(op.state, pb::OperationState::Succeeded as i32, "{op:?}");
    assert_eq!(op.warnings.len(), 1, "{op:?}");
    assert!(
        op.warnings[0].contains("memory of its active snapshot was dropped"),
        "{op:?}"
    );
    let got = sim.vm(&vm).await;
    assert_eq!((got.memory_bytes, got.vcpus), (128 * MIB, 2));
    assert!(sim.active(&vm).await.memory.is_none());
    // The previewed snapshot still holds it: the volumes stay.
    assert!(sim.exists(memory.dump.as_ref().unwrap()).await);
    sim.assert_no_orphans().await;
    // A change that is no change of the machine keeps memory alone.
    let op = update(&mut sim, by(|r| r.memory_bytes = Some(128 * MIB)))
        .await
        .unwrap();
    assert!(op.warnings.is_empty(), "{op:?}");

    // Refused before anything changes.
    for (req, field) in [
        (by(|_| {}), "vm_id"),
        (by(|r| r.name = Some(String::new())), "name"),
        (by(|r| r.memory_bytes = Some(1)), "memory_bytes"),
        (by(|r| r.vcpus = Some(0)), "vcpus"),
        (
            by(|r| {
                r.kernel = Some(String::new());
                r.initrd = Some("initrd.img".into());
            }),
            "kernel",
        ),
        (by(|r| r.kernel = Some("../etc/passwd".into())), "kernel"),
        (by(|r| r.name = Some("x".repeat(100_000))), "name"),
    ] {
        let err = update(&mut sim, req).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().starts_with(field), "{field}: {}", err.message());
    }
    let err = update(&mut sim, by(|r| r.name = Some("taken".into())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = update(
        &mut sim,
        pb::UpdateVmRequest {
            vm_id: Uuid::new_v4().to_string(),
            vcpus: Some(2),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let got = sim.vm(&vm).await;
    assert_eq!(
        (got.name.as_str(), got.memory_bytes, got.vcpus),
        ("edited", 128 * MIB, 2)
    );
    sim.finish().await;
}

/// RemoveHost and DeleteCluster: refused while in use (a VM runs on the
/// host; the cluster has VMs or hosts), then done; an unknown id is
/// NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_and_clusters_are_removed_only_when_unused() {
    for db in [Db::Sqlite, Db::Postgres] {
        remove_host_and_cluster(db).await;
    }
}

async fn remove_host_and_cluster(db: Db) {
    let mut sim = InProc::start(db).await;
    let vm = sim.create_vm("runs-here").await;
    sim.run(&vm, false).await;
    let (host, cluster) = (sim.host_id.clone(), sim.cluster_id.clone());
    let err = sim
        .clusters
        .remove_host(pb::RemoveHostRequest {
            host_id: host.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let details = err.get_error_details();
    let v = &details.precondition_failure().expect("a precondition").violations[0];
    assert_eq!(
        (v.r#type.as_str(), v.subject.as_str()),
        ("HOST_IN_USE", format!("host/{host}").as_str())
    );
    let err = sim
        .clusters
        .delete_cluster(pb::DeleteClusterRequest {
            cluster_id: cluster.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("1 VM(s) and 1 host(s)"),
        "{}",
        err.message()
    );

    sim.stop(&vm).await;
    sim.clusters
        .remove_host(pb::RemoveHostRequest {
            host_id: host.clone(),
        })
        .await
        .unwrap();
    assert!(sim.vm(&vm).await.host_id.is_empty(), "the VM forgot its host");
    let hosts = sim
        .clusters
        .list_hosts(pb::ListHostsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert!(hosts.iter().all(|h| h.host_id != host));
    let err = sim
        .clusters
        .remove_host(pb::RemoveHostRequest {
            host_id: host.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = sim
        .clusters
        .remove_host(pb::RemoveHostRequest {
            host_id: "not-an-id".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Still a VM in it.
    let err = sim
        .clusters
        .delete_cluster(pb::DeleteClusterRequest {
            cluster_id: cluster.clone(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("1 VM(s) and 0 host(s)"),
        "{}",
        err.message()
    );
    sim.app.db.delete_vm(Uuid::parse_str(&vm).unwrap()).await.unwrap();
    sim.clusters
        .delete_cluster(pb::DeleteClusterRequest {
            cluster_id: cluster.clone(),
        })
        .await
        .unwrap();
    let err = sim
        .clusters
        .get_cluster(pb::GetClusterRequest { cluster_id: cluster })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    sim.finish().await;
}

/// SuspendVm from a hostile client: malformed, oversized and unknown ids,
/// a VM that is not up, a stateless run, a VM another operation holds, a
/// cluster below 3.3: each refused with its field or precondition, nothing
/// made, the VM as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_vm_refuses_what_it_cannot_suspend() {
    let mut sim = InProc::start(Db::Sqlite).await;
    let suspend = |vm: &str| pb::SuspendVmRequest {
        request_id: Uuid::new_v4().to_string(),
        vm_id: vm.into(),
    };
    for (vm, code, field) in [
        ("nope", Code::InvalidArgument, "vm_id"),
        (&*"7".repeat(8192), Code::InvalidArgument, "vm_id"),
        ("", Code::InvalidArgument, "vm_id"),
    ] {
        let err = sim.vms.suspend_vm(suspend(vm)).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert_eq!(support::bad_field(&err), field, "{err:?}");
    }
    let err = sim
        .vms
        .suspend_vm(suspend(&Uuid::new_v4().to_string()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let mut bad_rid = suspend(&Uuid::new_v4().to_string());
    bad_rid.request_id = "x".repeat(100_000);
    let err = sim.vms.suspend_vm(bad_rid).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let vm = sim.create_vm("down").await;
    let err = sim.vms.suspend_vm(suspend(&vm)).await.unwrap_err();
    assert_eq!(support::precondition(&err), "VM_NOT_RUNNING", "{err:?}");

    // A stateless run: refused under the lock; the run goes on.
    sim.run(&vm, true).await;
    let op = sim
        .vms
        .suspend_vm(suspend(&vm))
        .await
        .unwrap()
        .into_inner()
        .operation;
    let op = sim.wait(op).await;
    assert_eq!(op.state, pb::OperationState::Failed as i32, "{op:?}");
    assert_eq!(op.error_precondition, "VM_STATELESS_RUN", "{op:?}");
    assert_eq!(sim.vm(&vm).await.status, pb::VmStatus::Up as i32);
    assert_eq!(sim.host.status(&vm), host::VmStatus::Up as i32);
    assert!(!sim.active(&vm).await.has_memory);
    sim.stop(&vm).await;
    assert_nothing_made_but(&mut sim, &vm).await;

    // A VM another operation holds.
    sim.run(&vm, false).await;
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    *sim.host.inner.snapshot_gate.lock().unwrap() = Some(gate.clone());
    let snap = sim
        .snaps
        .create_snapshot(support::Env::snapshot_req(&vm, true, "held"))
        .await
        .unwrap()
        .into_inner()
        .operation
        .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !sim
        .host
        .calls()
        .iter()
        .any(|c| matches!(c, support::HostCall::Snapshot { .. }))
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let err = sim.vms.suspend_vm(suspend(&vm)).await.unwrap_err();
    assert_eq!(support::precondition(&err), "VM_LOCKED", "{err:?}");
    gate.notify_one();
    *sim.host.inner.snapshot_gate.lock().unwrap() = None;
    sim.ok(Some(snap)).await;
    assert_eq!(sim.vm(&vm).await.status, pb::VmStatus::Up as i32);
}

/// After a refused suspend: no memory volume was left of it.
async fn assert_nothing_made_but(sim: &mut InProc, vm: &str) {
    sim.assert_no_orphans().await;
    for s in sim.snapshots(vm).await {
        assert!(!s.has_memory, "{s:?}");
    }
}
