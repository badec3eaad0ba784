//! Two hosts on one BLOCK domain (issue 11, item 6): two storage agents on
//! the same LUN, each with its own LVM locking (as two machines have), VMs
//! of two clusters created, snapshotted, merged and removed on both at
//! once, through the real coordinator on SQLite and PostgreSQL. Without one
//! metadata writer per domain the two agents' LVM commands overwrite each
//! other's VG metadata (volumes lost, extents handed out twice); with it,
//! every metadata change goes through one agent.
//!
//! Afterwards: `vgck` finds the VG clean; both agents list the same
//! volumes, which are exactly those the coordinator's snapshots name; no
//! extent belongs to two LVs; and only one agent made metadata changes.
//! Then the writer's agent is killed: the role moves to the other host
//! (generation 2 on the VG), whose VMs go on.
use ramsnap_e2e::cluster::{request_id, Cluster, Db, Process};
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::storage::v1 as spb;
use ramsnap_proto::storage::v1::storage_service_client::StorageServiceClient;
use std::collections::BTreeSet;
use std::process::Command;

const VMS_PER_HOST: usize = 6;
const SNAPSHOTS_PER_VM: usize = 3;
const DISK_BYTES: u64 = 16 << 20;

/// One VM's life on a cluster: created on the BLOCK domain, three disk-only
/// snapshots, the middle one removed (a merge), and the VM itself removed
/// when `remove` says so. Its id while it is kept.
async fn vm_life(c: &Cluster, cluster_id: &str, name: String, remove: bool) -> Option<String> {
    let resp = c
        .vms()
        .create_vm(pb::CreateVmRequest {
            request_id: request_id(),
            name: name.clone(),
            cluster_id: cluster_id.to_string(),
            memory_bytes: 128 << 20,
            vcpus: 1,
            stateless: false,
            disks: vec![pb::DiskSpec {
                domain_id: c.block_domain.clone(),
                capacity_bytes: DISK_BYTES,
            }],
            kernel: String::new(),
            initrd: String::new(),
            cmdline: String::new(),
        })
        .await
        .unwrap_or_else(|e| c.fail(&format!("CreateVm {name}: {e}")))
        .into_inner();
    let op = c.succeed(resp.operation, &format!("CreateVm {name}")).await;
    let vm_id = if op.result_vm_id.is_empty() {
        op.vm_id
    } else {
        op.result_vm_id
    };
    let mut snapshots = Vec::new();
    for i in 0..SNAPSHOTS_PER_VM {
        let resp = c
            .snapshots_api()
            .create_snapshot(pb::CreateSnapshotRequest {
                request_id: request_id(),
                vm_id: vm_id.clone(),
                description: format!("{name} #{i}"),
                save_memory: false,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| c.fail(&format!("CreateSnapshot {name} #{i}: {e}")))
            .into_inner();
        let op = c
            .succeed(resp.operation, &format!("CreateSnapshot {name} #{i}"))
            .await;
        snapshots.push(op.snapshot_id);
    }
    let resp = c
        .snapshots_api()
        .remove_snapshot(pb::RemoveSnapshotRequest {
            request_id: request_id(),
            vm_id: vm_id.clone(),
            snapshot_id: snapshots[1].clone(),
        })
        .await
        .unwrap_or_else(|e| c.fail(&format!("RemoveSnapshot {name}: {e}")))
        .into_inner();
    c.succeed(resp.operation, &format!("RemoveSnapshot {name}")).await;
    if remove {
        let resp = c
            .vms()
            .remove_vm(pb::RemoveVmRequest {
                request_id: request_id(),
                vm_id: vm_id.clone(),
            })
            .await
            .unwrap_or_else(|e| c.fail(&format!("RemoveVm {name}: {e}")))
            .into_inner();
        c.succeed(resp.operation, &format!("RemoveVm {name}")).await;
        return None;
    }
    Some(vm_id)
}

async fn volumes_on(
    agent: &mut StorageServiceClient<tonic::transport::Channel>,
    domain: &str,
) -> BTreeSet<String> {
    agent
        .list_volumes(spb::ListVolumesRequest {
            domain_id: domain.to_string(),
            image_id: String::new(),
            ..Default::default()
        })
        .await
        .expect("ListVolumes")
        .into_inner()
        .volumes
        .into_iter()
        .map(|v| v.r#ref.expect("a volume has its ref").volume_id)
        .collect()
}

fn lvm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(args[0])
        .args(["--config", "global { activation = 0 }"])
        .args(&args[1..])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .expect("running an LVM command");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Successful metadata-changing calls in an agent's audit log.
fn metadata_changes(log: &std::path::Path) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .map(ramsnap_e2e::logs::strip_ansi)
        .filter(|l| {
            ["CreateVolume", "DeleteVolume", "MergeVolume"]
                .iter()
                .any(|rpc| l.contains(&format!("StorageService/{rpc}\"")))
                && l.contains("outcome=\"OK\"")
        })
        .count()
}

async fn two_hosts_on_one_block_domain(db: Db) {
    let mut c = Cluster::start(db, "3.3", "shared-block").await;
    let second = c.second_storage_agent().await;
    let second_url = format!("http://{}", second.addr);
    // A second cluster whose host's storage agent is the second one (its
    // HostService is the first host's: these VMs never run).
    let cluster_b = c
        .clusters()
        .create_cluster(pb::CreateClusterRequest {
            request_id: request_id(),
            name: format!("{}-b", c.label),
            compatibility_version: "3.3".into(),
        })
        .await
        .unwrap_or_else(|e| c.fail(&format!("CreateCluster b: {e}")))
        .into_inner()
        .cluster
        .expect("the cluster")
        .cluster_id;
    c.clusters()
        .add_host(pb::AddHostRequest {
            request_id: request_id(),
            name: format!("host-b-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            cluster_id: cluster_b.clone(),
            host_address: c.host_url.clone(),
            storage_address: second_url.clone(),
        })
        .await
        .unwrap_or_else(|e| c.fail(&format!("AddHost b: {e}")));

    let started = std::time::Instant::now();
    let lives = (0..2 * VMS_PER_HOST).map(|i| {
        let cluster = if i % 2 == 0 {
            c.cluster_id.clone()
        } else {
            cluster_b.clone()
        };
        let c = &c;
        async move { vm_life(c, &cluster, format!("shared-{i}"), i % 4 >= 2).await }
    });
    let kept: Vec<String> = futures::future::join_all(lives)
        .await
        .into_iter()
        .flatten()
        .collect();
    eprintln!(
        "[shared-block] {} VM lives on two hosts in {:.1}s",
        2 * VMS_PER_HOST,
        started.elapsed().as_secs_f64()
    );

    // What the coordinator's snapshots name.
    let mut named = BTreeSet::new();
    for vm in &kept {
        for s in c.list_snapshots(vm).await {
            for d in s.disks {
                named.insert(d.volume.expect("a snapshot disk's volume").volume_id);
            }
        }
    }
    let mut first = c.storage();
    let mut second_client = StorageServiceClient::new(ramsnap_e2e::connect_as(&second_url, "admin").await);
    let on_first = volumes_on(&mut first, &c.block_domain).await;
    let on_second = volumes_on(&mut second_client, &c.block_domain).await;
    assert_eq!(on_first, on_second, "both hosts see the same volumes");
    assert_eq!(
        on_first,
        named,
        "the domain holds exactly the volumes the snapshots name (lost: {:?}; left over: {:?})",
        named.difference(&on_first).collect::<Vec<_>>(),
        on_first.difference(&named).collect::<Vec<_>>()
    );

    let vg = c.block_domain.clone();
    let (ok, _, stderr) = lvm(&["vgck", &vg]);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("Activation disabled"))
        .collect();
    assert!(ok && complaints.is_empty(), "vgck {vg}: {stderr}");
    // Every extent in at most one LV, and every LV a volume.
    let (ok, out, stderr) = lvm(&[
        "lvs",
        "--noheadings",
        "--separator",
        "|",
        "-o",
        "lv_name,seg_pe_ranges",
        &vg,
    ]);
    assert!(ok, "lvs: {stderr}");
    let mut ranges: Vec<(u64, u64, String)> = Vec::new();
    let mut lvs = BTreeSet::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let (lv, segs) = line.trim().split_once('|').expect("lv|ranges");
        lvs.insert(lv.to_string());
        for seg in segs.split_whitespace() {
            let span = seg.rsplit(':').next().expect("pv:start-end");
            let (a, b) = span.split_once('-').expect("start-end");
            ranges.push((a.parse().unwrap(), b.parse().unwrap(), lv.to_string()));
        }
    }
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(w[0].1 < w[1].0, "extents in two LVs: {:?} and {:?}", w[0], w[1]);
    }
    assert_eq!(lvs, on_first, "the VG's LVs are the domain's volumes");

    // One writer made every metadata change.
    let first_changes = metadata_changes(&c.process(Process::StorageAgent).dir.path().join("stderr.log"));
    let second_changes = metadata_changes(&second.dir.path().join("stderr.log"));
    eprintln!("[shared-block] metadata changes: first agent {first_changes}, second {second_changes}");
    assert!(
        (first_changes == 0) != (second_changes == 0),
        "exactly one agent changes the domain's metadata: {first_changes} and {second_changes}"
    );
    let (ok, tags, stderr) = lvm(&["vgs", "--noheadings", "-o", "vg_tags", &vg]);
    assert!(
        ok && tags.contains("RS_WRITER_1"),
        "the writer generation on the VG: {tags} {stderr}"
    );

    // The writer's agent dies: the role moves to the host that next needs
    // it, one generation up, recorded on the VG; that host's VMs go on.
    let mut second = second;
    let (survivor_cluster, survivor_url, mut survivor) = if first_changes > 0 {
        c.process(Process::StorageAgent).kill();
        (cluster_b.clone(), second_url.clone(), second_client)
    } else {
        second.kill();
        (c.cluster_id.clone(), c.storage_url.clone(), first)
    };
    let kept_vm = vm_life(&c, &survivor_cluster, "after-failover".into(), false)
        .await
        .expect("kept");
    let (ok, tags, stderr) = lvm(&["vgs", "--noheadings", "-o", "vg_tags", &vg]);
    assert!(
        ok && tags.contains("RS_WRITER_2") && !tags.contains("RS_WRITER_1"),
        "the role moved to generation 2: {tags} {stderr}"
    );
    for s in c.list_snapshots(&kept_vm).await {
        for d in s.disks {
            named.insert(d.volume.expect("a snapshot disk's volume").volume_id);
        }
    }
    assert_eq!(volumes_on(&mut survivor, &vg).await, named, "after the move");
    let (ok, _, stderr) = lvm(&["vgck", &vg]);
    assert!(ok, "vgck after the move: {stderr}");

    // A generation set from outside the coordinator (a direct call with a
    // forged stamp, by a holder of the coordinator's identity): the
    // coordinator's next change is refused, goes past it, and the VM's
    // operations go on.
    let mut forger = StorageServiceClient::new(ramsnap_e2e::connect_as(&survivor_url, "coordinator").await);
    let mut forged = tonic::Request::new(spb::CreateVolumeRequest {
        request_id: String::new(),
        domain_id: vg.clone(),
        image_id: String::new(),
        volume_id: String::new(),
        capacity_bytes: 1 << 20,
        format: spb::VolumeFormat::Raw as i32,
        allocation: spb::VolumeAllocation::Unspecified as i32,
        purpose: spb::VolumePurpose::Disk as i32,
        parent_volume_id: String::new(),
        description: "forged".into(),
    });
    forged
        .metadata_mut()
        .insert(ramsnap_common::fence::WRITER_HEADER, "1000".parse().unwrap());
    let made = forger
        .create_volume(forged)
        .await
        .expect("the forged call")
        .into_inner();
    forger
        .delete_volume(spb::DeleteVolumeRequest {
            request_id: String::new(),
            r#ref: made.volume.and_then(|v| v.r#ref),
        })
        .await
        .expect("deleting the forged volume");
    let resp = c
        .snapshots_api()
        .create_snapshot(pb::CreateSnapshotRequest {
            request_id: request_id(),
            vm_id: kept_vm.clone(),
            description: "past the forged generation".into(),
            save_memory: false,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| c.fail(&format!("CreateSnapshot past the forged generation: {e}")))
        .into_inner();
    c.succeed(resp.operation, "CreateSnapshot past the forged generation")
        .await;
    let (ok, tags, stderr) = lvm(&["vgs", "--noheadings", "-o", "vg_tags", &vg]);
    assert!(
        ok && tags.contains("RS_WRITER_1001") && !tags.contains("RS_WRITER_1000,"),
        "the coordinator went past the forged generation: {tags} {stderr}"
    );
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hosts_on_one_block_domain_sqlite() {
    two_hosts_on_one_block_domain(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hosts_on_one_block_domain_postgres() {
    two_hosts_on_one_block_domain(Db::Postgres).await;
}
