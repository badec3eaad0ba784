//! Simulation tests: the HostService on libvirt's test:///default driver (a
//! hypervisor faked inside libvirt, the kind of host the coordinator's scale
//! tests use), with a real StorageService on a FILE domain, over real gRPC.
//! The real QEMU path is covered by tests/guest.rs.
mod support;

use futures::StreamExt;
use ramsnap_host::{Config, Host};
use ramsnap_proto::host::v1 as hpb;
use std::time::Duration;
use support::*;
use tonic::Code;

fn opts() -> EnvOptions {
    EnvOptions {
        uri: "test:///default",
        block_size: None,
    }
}

#[tokio::test]
async fn simulation_host_info_reports_the_test_driver_and_a_stable_host_id() {
    let mut env = Env::new("siminfo", opts()).await;
    let info = env
        .host
        .get_host_info(hpb::GetHostInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        info.hypervisor_type.eq_ignore_ascii_case("test"),
        "{}",
        info.hypervisor_type
    );
    assert_eq!(info.libvirt_uri, "test:///default");
    assert!(
        !info.memory_snapshots_supported,
        "the test driver cannot dump memory"
    );
    assert!(info.libvirt_version.starts_with("9."), "{}", info.libvirt_version);
    uuid::Uuid::parse_str(&info.host_id).expect("a generated host id is a UUID");
    // The id is kept in the state dir: a restarted agent has the same one.
    let again = Host::open(env.host_config.clone()).await.unwrap();
    assert_eq!(again.info().await.unwrap().host_id, info.host_id);
    // An explicit id wins.
    let mut cfg: Config = env.host_config.clone();
    cfg.host_id = Some("host-7".into());
    assert_eq!(
        Host::open(cfg).await.unwrap().info().await.unwrap().host_id,
        "host-7"
    );
}

#[tokio::test]
async fn simulation_run_list_watch_and_stop() {
    let mut env = Env::new("simrun", opts()).await;
    let disk = env.new_disk(false).await;
    let vm = uuid::Uuid::new_v4().to_string();
    let spec = vm_spec(&vm, 256, vec![disk], "");
    // Not run yet: DOWN, and the stream ends (it used to wait forever).
    let mut early = watch(&mut env, &vm).await;
    assert_eq!(
        statuses(&mut early, Duration::from_secs(5)).await,
        (vec![hpb::VmStatus::Down], true)
    );
    assert_eq!(env.status(&vm).await, hpb::VmStatus::Down);
    assert_eq!(env.run(&spec, None).await.unwrap(), hpb::VmStatus::Up);
    let mut watch = self::watch(&mut env, &vm).await;
    let listed = env
        .host
        .list_vms(hpb::ListVmsRequest {})
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].vm_id, vm);
    assert_eq!(listed[0].name, spec.name);
    assert_eq!(listed[0].status(), hpb::VmStatus::Up);

    // Running it again is refused while it runs.
    let st = env.run(&spec, None).await.unwrap_err();
    assert_eq!(st.code(), Code::AlreadyExists, "{st:?}");

    // The test driver shuts down at once: a graceful stop.
    assert!(env.stop(&vm, 5).await);
    assert_eq!(env.status(&vm).await, hpb::VmStatus::Down);
    assert!(env
        .host
        .list_vms(hpb::ListVmsRequest {})
        .await
        .unwrap()
        .into_inner()
        .vms
        .is_empty());
    // Stopping a VM that is not running succeeds.
    assert!(!env.stop(&vm, 0).await);
    // The watch outlives the stop and sees the next run.
    assert_eq!(env.run(&spec, None).await.unwrap(), hpb::VmStatus::Up);
    assert!(env.stop(&vm, 0).await || env.status(&vm).await == hpb::VmStatus::Down);

    let mut seen = Vec::new();
    while let Some(Ok(ev)) = tokio::time::timeout(Duration::from_secs(2), watch.next())
        .await
        .ok()
        .flatten()
    {
        assert!(ev.at_unix_ms > 0);
        seen.push(ev.status());
        if seen.len() >= 7 {
            break;
        }
    }
    use hpb::VmStatus::*;
    assert_eq!(
        seen,
        vec![Up, PoweringDown, Down, PoweringUp, Up, PoweringDown, Down]
    );
}

async fn watch(env: &mut Env, vm: &str) -> tonic::Streaming<hpb::WatchVmStatusResponse> {
    env.host
        .watch_vm_status(hpb::WatchVmStatusRequest { vm_id: vm.into() })
        .await
        .unwrap()
        .into_inner()
}

/// The statuses a watch yields within `within`, and whether it ended (OK).
async fn statuses(
    stream: &mut tonic::Streaming<hpb::WatchVmStatusResponse>,
    within: Duration,
) -> (Vec<hpb::VmStatus>, bool) {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(m))) => seen.push(m.status()),
            Ok(Ok(None)) => return (seen, true),
            Ok(Err(st)) => panic!("the watch failed: {st:?} (after {seen:?})"),
            Err(_) => return (seen, false),
        }
    }
}

#[tokio::test]
async fn simulation_restarted_agent_rediscovers_its_vms() {
    let mut env = Env::new("simredisc", opts()).await;
    let disk = env.new_disk(false).await;
    let vm = uuid::Uuid::new_v4().to_string();
    env.run(&vm_spec(&vm, 128, vec![disk], ""), None).await.unwrap();
    // A second agent on the same libvirt and prefix finds the VM, with its
    // disks, and can stop it.
    let again = Host::open(env.host_config.clone()).await.unwrap();
    let id = uuid::Uuid::parse_str(&vm).unwrap();
    assert_eq!(again.list().len(), 1);
    assert_eq!(again.status(id), ramsnap_host::model::VmStatus::Up);
    // Another agent on the same libvirt (its own host id) leaves it alone.
    let mut other = env.host_config.clone();
    other.host_id = Some("another-host".into());
    let other = Host::open(other).await.unwrap();
    assert!(other.list().is_empty());
    assert_eq!(other.status(id), ramsnap_host::model::VmStatus::Down);
    assert!(again.stop(id, std::time::Duration::ZERO).await.is_ok());
    assert_eq!(again.status(id), ramsnap_host::model::VmStatus::Down);
    // The first agent notices within a monitor round.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while env.status(&vm).await != hpb::VmStatus::Down {
        assert!(
            std::time::Instant::now() < deadline,
            "the first agent still reports the VM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn simulation_bad_input_is_refused_with_the_field() {
    let mut env = Env::new("simbad", opts()).await;
    let disk = env.new_disk(false).await;
    let vm = uuid::Uuid::new_v4().to_string();

    let mut spec = vm_spec(&vm, 128, vec![disk.clone()], "");
    spec.kernel = "../../etc/passwd".into();
    let st = env.run(&spec, None).await.unwrap_err();
    assert_eq!(
        (st.code(), field_of(&st).as_str()),
        (Code::InvalidArgument, "spec.kernel")
    );

    let mut spec = vm_spec(&vm, 128, vec![disk.clone()], "");
    spec.disks[0].volume.as_mut().unwrap().volume_id = "not-a-uuid".into();
    let st = env.run(&spec, None).await.unwrap_err();
    assert_eq!(field_of(&st), "spec.disks[0].volume.volume_id");

    // A volume id that does not exist: the storage service's NOT_FOUND.
    let mut spec = vm_spec(&vm, 128, vec![disk.clone()], "");
    spec.disks[0].volume.as_mut().unwrap().volume_id = uuid::Uuid::new_v4().to_string();
    let st = env.run(&spec, None).await.unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    assert_eq!(env.status(&vm).await, hpb::VmStatus::Down);

    let st = env
        .host
        .get_vm_status(hpb::GetVmStatusRequest { vm_id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(field_of(&st), "vm_id");
    let st = env
        .host
        .read_console(hpb::ReadConsoleRequest {
            vm_id: uuid::Uuid::new_v4().to_string(),
            offset: 0,
            max_bytes: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    let (_, r) = snapshot(
        &mut env.host,
        hpb::SnapshotVmRequest {
            job_id: uuid::Uuid::new_v4().to_string(),
            vm_id: uuid::Uuid::new_v4().to_string(),
            snapshot_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.unwrap_err().code(), Code::NotFound);
    let c = env
        .host
        .cancel_snapshot(hpb::CancelSnapshotRequest {
            job_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!c.cancelled);
    let st = env
        .host
        .stop_vm(hpb::StopVmRequest {
            vm_id: vm.clone(),
            graceful_timeout_seconds: 100_000,
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&st), "graceful_timeout_seconds");
}

#[tokio::test]
async fn simulation_snapshots_with_and_without_memory() {
    let mut env = Env::new("simsnap", opts()).await;
    let disk = env.new_disk(false).await;
    let vm = uuid::Uuid::new_v4().to_string();
    let spec = vm_spec(&vm, 64, vec![disk.clone()], "");
    assert_eq!(env.run(&spec, None).await.unwrap(), hpb::VmStatus::Up);
    let mut current = disk.clone();
    for with_memory in [true, false] {
        let overlay = env.child_of(&current).await;
        let memory = if with_memory {
            Some(env.memory_volumes(false, 64 << 20, false).await)
        } else {
            None
        };
        let req = hpb::SnapshotVmRequest {
            job_id: uuid::Uuid::new_v4().to_string(),
            vm_id: vm.clone(),
            snapshot_id: uuid::Uuid::new_v4().to_string(),
            disks: vec![hpb::SnapshotDisk {
                current: Some(current.clone()),
                overlay: Some(overlay.clone()),
            }],
            memory,
            mode: hpb::SnapshotMode::Paused as i32,
            compatibility_version: "3.3".into(),
        };
        let (_, result) = snapshot(&mut env.host, req).await;
        let result = result.unwrap_or_else(|e| panic!("simulated snapshot (memory: {with_memory}): {e:?}"));
        assert_eq!(result.memory_saved, with_memory);
        // The VM now runs on the overlay.
        current = overlay;
    }
    assert!(env.stop(&vm, 0).await || env.status(&vm).await == hpb::VmStatus::Down);
}

/// VerifyMemory on a pair a simulated snapshot wrote (a dump of zeros, real
/// metadata), checked where it was written, then moved to the BLOCK domain
/// with its ids as an export or import moves it: checked there, refused
/// without a change when anything is off, rebound (both modes) and read back.
/// Every volume it prepares is torn down again, also on a refusal.
#[tokio::test]
async fn simulation_verify_memory_checks_and_rebinds_a_moved_pair() {
    let mut env = Env::new(
        "simverify",
        EnvOptions {
            uri: "test:///default",
            block_size: Some(1024 * MIB),
        },
    )
    .await;
    let pv = env.loop_dev.as_ref().unwrap().device.clone();
    let block = env.block_domain.clone();
    let disk = env.new_disk(false).await;
    let vm = uuid::Uuid::new_v4().to_string();
    let spec = vm_spec(&vm, 64, vec![disk.clone()], "");
    assert_eq!(env.run(&spec, None).await.unwrap(), hpb::VmStatus::Up);
    let overlay = env.child_of(&disk).await;
    let memory = env.memory_volumes(false, 64 * MIB, false).await;
    let snapshot_id = uuid::Uuid::new_v4().to_string();
    let (_, r) = snapshot(
        &mut env.host,
        hpb::SnapshotVmRequest {
            job_id: uuid::Uuid::new_v4().to_string(),
            vm_id: vm.clone(),
            snapshot_id: snapshot_id.clone(),
            disks: vec![hpb::SnapshotDisk {
                current: Some(disk.clone()),
                overlay: Some(overlay.clone()),
            }],
            memory: Some(memory.clone()),
            mode: hpb::SnapshotMode::Paused as i32,
            compatibility_version: "3.3".into(),
        },
    )
    .await;
    let taken = r.expect("simulated snapshot with memory");
    assert!(taken.memory_saved);
    let sha = taken.dump_checksum.clone();
    let req = |memory: &ramsnap_proto::common::v1::MemoryVolumeRef| hpb::VerifyMemoryRequest {
        vm_id: vm.clone(),
        memory: Some(memory.clone()),
        expected_checksum: sha.clone(),
        ..Default::default()
    };

    // Where it was written, while the VM runs: verified, nothing rewritten,
    // the VM left alone.
    let v = env.verify_memory(req(&memory)).await.unwrap();
    assert_eq!(v.checksum, sha);
    assert!(!v.rebound);
    assert_eq!(v.disks, vec![disk.clone()]);
    assert_eq!(v.snapshot_id, snapshot_id);
    assert!(v.capacity >= 64 * MIB && v.created_at > 0, "{v:?}");
    assert_eq!(env.status(&vm).await, hpb::VmStatus::Up);
    assert!(env.stop(&vm, 0).await || env.status(&vm).await == hpb::VmStatus::Down);

    // Moved to the BLOCK domain with the same ids, the disk too.
    let moved = ramsnap_proto::common::v1::MemoryVolumeRef {
        dump: Some(env.copy_same_ids(memory.dump.as_ref().unwrap(), &block).await),
        metadata: Some(env.copy_same_ids(memory.metadata.as_ref().unwrap(), &block).await),
    };
    let moved_dump = moved.dump.clone().unwrap();
    let moved_meta = moved.metadata.clone().unwrap();
    let moved_disk = env.copy_same_ids(&disk, &block).await;
    assert_eq!(moved_disk.domain_id, block);
    let before = env.volume_bytes(&moved_meta, MIB).await;

    // Checked there (VM down: not running on this host); the metadata still
    // names the disk where it was.
    let v = env.verify_memory(req(&moved)).await.unwrap();
    assert_eq!((v.checksum.as_str(), v.rebound), (sha.as_str(), false));
    assert_eq!(v.disks, vec![disk.clone()]);
    assert_eq!(env.status(&vm).await, hpb::VmStatus::Down);

    // Refusals, each with the restore's kind, and nothing rewritten.
    let refused = |r: Result<hpb::VerifyMemoryResponse, tonic::Status>, kind: &str| {
        let st = r.expect_err(kind);
        assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
        assert_eq!(precondition_kind(&st), kind, "{st:?}");
        st
    };
    let mut q = req(&moved);
    q.vm_id = uuid::Uuid::new_v4().to_string();
    q.rebind_disk_domain_id = block.clone();
    let st = refused(env.verify_memory(q).await, "MEMORY_VM_MISMATCH");
    assert_eq!(precondition_subject(&st), vm);
    let mut q = req(&moved);
    q.expected_checksum = "0".repeat(64);
    q.rebind_disk_domain_id = block.clone();
    let st = refused(env.verify_memory(q).await, "MEMORY_DUMP_CORRUPT");
    assert_eq!(precondition_subject(&st), volume_name(&moved_dump));
    assert!(
        st.message().contains(&"0".repeat(64)) && st.message().contains(&sha),
        "expected and actual in the message: {st:?}"
    );
    // Two disks for a memory saved with one (two of one volume is bad input).
    let second = env.new_disk(false).await;
    let mut q = req(&moved);
    q.rebind_disks = vec![moved_disk.clone(), second];
    refused(env.verify_memory(q).await, "MEMORY_DISKS_MISMATCH");
    let swapped = ramsnap_proto::common::v1::MemoryVolumeRef {
        dump: moved.metadata.clone(),
        metadata: moved.dump.clone(),
    };
    refused(env.verify_memory(req(&swapped)).await, "VOLUME_PURPOSE");
    // A metadata volume nothing was ever written to.
    let blank = env.memory_volumes(true, 64 * MIB, false).await;
    let mut q = req(&moved);
    q.memory.as_mut().unwrap().metadata = blank.metadata.clone();
    let st = refused(env.verify_memory(q).await, "MEMORY_METADATA_INVALID");
    assert_eq!(
        precondition_subject(&st),
        volume_name(blank.metadata.as_ref().unwrap())
    );
    let mut q = req(&moved);
    q.memory.as_mut().unwrap().dump.as_mut().unwrap().volume_id = uuid::Uuid::new_v4().to_string();
    assert_eq!(env.verify_memory(q).await.unwrap_err().code(), Code::NotFound);
    // Bad input names its field.
    let bad = |st: tonic::Status| {
        assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
        field_of(&st)
    };
    let mut q = req(&moved);
    q.memory
        .as_mut()
        .unwrap()
        .dump
        .as_mut()
        .unwrap()
        .volume_id
        .clear();
    assert_eq!(
        bad(env.verify_memory(q).await.unwrap_err()),
        "memory.dump.volume_id"
    );
    let mut q = req(&moved);
    q.vm_id = "not-a-uuid".into();
    assert_eq!(bad(env.verify_memory(q).await.unwrap_err()), "vm_id");
    let mut q = req(&moved);
    q.expected_checksum = sha.to_uppercase();
    assert_eq!(bad(env.verify_memory(q).await.unwrap_err()), "expected_checksum");
    let mut q = req(&moved);
    q.rebind_disk_domain_id = block.clone();
    q.rebind_disks = vec![moved_disk.clone()];
    assert_eq!(bad(env.verify_memory(q).await.unwrap_err()), "rebind_disks");
    let mut q = req(&moved);
    q.rebind_disks = vec![ramsnap_proto::common::v1::VolumeRef {
        volume_id: String::new(),
        ..moved_disk.clone()
    }];
    assert_eq!(
        bad(env.verify_memory(q).await.unwrap_err()),
        "rebind_disks[0].volume_id"
    );
    assert_eq!(
        env.volume_bytes(&moved_meta, MIB).await,
        before,
        "a refusal rewrote the metadata"
    );

    // Rebind, mode 1: the disk kept its ids on the BLOCK domain.
    let mut q = req(&moved);
    q.rebind_disk_domain_id = block.clone();
    let v = env.verify_memory(q).await.unwrap();
    assert!(v.rebound);
    assert_eq!(
        (v.checksum.as_str(), v.disks.clone()),
        (sha.as_str(), vec![moved_disk.clone()])
    );
    // Read back by a plain verification.
    let v = env.verify_memory(req(&moved)).await.unwrap();
    assert!(!v.rebound);
    assert_eq!(v.disks, vec![moved_disk.clone()]);
    let after = env.volume_bytes(&moved_meta, MIB).await;
    let end = after.iter().position(|&b| b == 0).unwrap();
    assert!(after[end..].iter().all(|&b| b == 0), "NUL-padded");
    let md: serde_json::Value = serde_json::from_slice(&after[..end]).unwrap();
    assert_eq!(md["vm_id"], vm.as_str());
    assert_eq!(md["dump"]["checksum"], sha.as_str());
    assert_eq!(md["dump"]["volume"]["domain"], block.as_str());
    assert_eq!(md["dump"]["volume"]["volume"], moved_dump.volume_id.as_str());
    assert_eq!(md["disks"][0]["current"]["domain"], block.as_str());
    assert_eq!(md["disks"][0]["overlay"]["domain"], block.as_str());
    assert_eq!(md["disks"][0]["overlay"]["volume"], overlay.volume_id.as_str());
    // The original pair is left as it was.
    let v = env.verify_memory(req(&memory)).await.unwrap();
    assert_eq!(v.disks, vec![disk.clone()]);

    // One flipped byte in the moved dump: refused, even with a rebind asked,
    // and the metadata stays as it was.
    env.flip_byte(&moved_dump, 4096).await;
    let mut q = req(&moved);
    q.expected_checksum.clear();
    q.rebind_disks = vec![env.new_disk(true).await];
    let st = refused(env.verify_memory(q).await, "MEMORY_DUMP_CORRUPT");
    assert_eq!(precondition_subject(&st), volume_name(&moved_dump));
    assert!(st.message().contains(&sha), "{st:?}");
    assert_eq!(env.volume_bytes(&moved_meta, MIB).await, after);
    env.flip_byte(&moved_dump, 4096).await;

    // Rebind, mode 2: the disk collapsed into another volume; the overlay stays.
    let collapsed = env.new_disk(true).await;
    let mut q = req(&moved);
    q.rebind_disks = vec![collapsed.clone()];
    let v = env.verify_memory(q).await.unwrap();
    assert!(v.rebound);
    assert_eq!(v.disks, vec![collapsed.clone()]);
    let md: serde_json::Value = {
        let b = env.volume_bytes(&moved_meta, MIB).await;
        let end = b.iter().position(|&b| b == 0).unwrap();
        serde_json::from_slice(&b[..end]).unwrap()
    };
    assert_eq!(md["disks"][0]["current"]["volume"], collapsed.volume_id.as_str());
    assert_eq!(md["disks"][0]["overlay"]["domain"], block.as_str());

    // Nothing VerifyMemory prepared stays prepared.
    assert_eq!(loops_over(&pv), 0);
}

/// Hostile RunVm requests: each refused with INVALID_ARGUMENT naming its
/// field, before anything is prepared (the disks are on the BLOCK domain,
/// where preparing makes a loop device) or started. The same disk twice
/// used to reach QEMU, whose refusal came back as INTERNAL with its command
/// line and the host's paths.
#[tokio::test]
async fn simulation_hostile_run_requests_are_refused_before_anything_is_prepared() {
    let mut env = Env::new(
        "simhostile",
        EnvOptions {
            uri: "test:///default",
            block_size: Some(512 * MIB),
        },
    )
    .await;
    let pv = env.loop_dev.as_ref().unwrap().device.clone();
    let disk = env.new_disk(true).await;
    let child = env.child_of(&disk).await;
    let other = env.new_disk(true).await;
    let memory = env.memory_volumes(false, 64 * MIB, false).await;
    let vm = uuid::Uuid::new_v4().to_string();
    let good = vm_spec(&vm, 64, vec![disk.clone()], "");

    type Edit = Box<dyn Fn(&mut hpb::RunVmRequest)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "spec.disks[1].volume",
            Box::new(|r| {
                let d = r.spec.as_ref().unwrap().disks[0].clone();
                r.spec.as_mut().unwrap().disks.push(d);
            }),
        ),
        ("spec.disks[2].volume", {
            let (other, disk) = (other.clone(), disk.clone());
            Box::new(move |r| {
                let disks = &mut r.spec.as_mut().unwrap().disks;
                disks.push(hpb::DiskSpec {
                    volume: Some(other.clone()),
                });
                disks.push(hpb::DiskSpec {
                    volume: Some(disk.clone()),
                });
            })
        }),
        ("spec.disks[1].volume", {
            let child = child.clone();
            Box::new(move |r| {
                r.spec.as_mut().unwrap().disks.push(hpb::DiskSpec {
                    volume: Some(child.clone()),
                })
            })
        }),
        ("spec.disks", Box::new(|r| r.spec.as_mut().unwrap().disks.clear())),
        (
            "spec.disks",
            Box::new(|r| {
                let d = r.spec.as_ref().unwrap().disks[0].clone();
                r.spec.as_mut().unwrap().disks = vec![d; 27];
            }),
        ),
        (
            "spec.vm_id",
            Box::new(|r| r.spec.as_mut().unwrap().vm_id = uuid::Uuid::nil().to_string()),
        ),
        (
            "spec.memory_bytes",
            Box::new(|r| r.spec.as_mut().unwrap().memory_bytes = 0),
        ),
        (
            "spec.memory_bytes",
            Box::new(|r| r.spec.as_mut().unwrap().memory_bytes = 1 << 62),
        ),
        ("spec.vcpus", Box::new(|r| r.spec.as_mut().unwrap().vcpus = 0)),
        (
            "spec.vcpus",
            Box::new(|r| r.spec.as_mut().unwrap().vcpus = 1_000_000),
        ),
        (
            "spec.name",
            Box::new(|r| r.spec.as_mut().unwrap().name = "a\u{7}b\nc".into()),
        ),
        (
            "spec.kernel",
            Box::new(|r| r.spec.as_mut().unwrap().kernel = "..".into()),
        ),
        (
            "spec.kernel",
            Box::new(|r| r.spec.as_mut().unwrap().kernel = "boot/vmlinux".into()),
        ),
        (
            "spec.initrd",
            Box::new(|r| r.spec.as_mut().unwrap().initrd = "../initrd".into()),
        ),
        (
            "spec.cmdline",
            Box::new(|r| r.spec.as_mut().unwrap().cmdline = "x".repeat(5000)),
        ),
        (
            "spec.cmdline",
            Box::new(|r| r.spec.as_mut().unwrap().cmdline = "console=ttyS0\ninit=/bin/sh".into()),
        ),
        ("restore_memory.metadata", {
            let memory = memory.clone();
            Box::new(move |r| {
                r.restore_memory = Some(ramsnap_proto::common::v1::MemoryVolumeRef {
                    dump: memory.dump.clone(),
                    metadata: memory.dump.clone(),
                })
            })
        }),
        ("restore_memory.dump", {
            let (memory, disk) = (memory.clone(), disk.clone());
            Box::new(move |r| {
                r.restore_memory = Some(ramsnap_proto::common::v1::MemoryVolumeRef {
                    dump: Some(disk.clone()),
                    metadata: memory.metadata.clone(),
                })
            })
        }),
    ];
    for (field, edit) in &cases {
        let mut req = hpb::RunVmRequest {
            spec: Some(good.clone()),
            restore_memory: None,
        };
        edit(&mut req);
        let st = env.host.run_vm(req).await.unwrap_err();
        assert_eq!(
            (st.code(), field_of(&st).as_str()),
            (Code::InvalidArgument, *field),
            "{st:?}"
        );
        assert!(!st.message().contains(env.dir.path().to_str().unwrap()), "{st:?}");
        assert_eq!(loops_over(&pv), 0, "{field}: a volume was prepared");
        assert_eq!(env.status(&vm).await, hpb::VmStatus::Down, "{field}");
    }
    assert!(env
        .host
        .list_vms(hpb::ListVmsRequest {})
        .await
        .unwrap()
        .into_inner()
        .vms
        .is_empty());

    // The control: the good spec runs, with its disk prepared.
    assert_eq!(env.run(&good, None).await.unwrap(), hpb::VmStatus::Up);
    assert!(loops_over(&pv) > 0, "preparing a BLOCK disk makes a loop device");
    assert!(env.stop(&vm, 0).await || env.status(&vm).await == hpb::VmStatus::Down);
    assert_eq!(loops_over(&pv), 0);
}

/// The other requests with volume lists refuse repeats and collisions too.
#[tokio::test]
async fn simulation_hostile_snapshot_and_verify_requests_name_their_field() {
    let mut env = Env::new("simhostile2", opts()).await;
    let disk = env.new_disk(false).await;
    let overlay = env.child_of(&disk).await;
    let memory = env.memory_volumes(false, 64 * MIB, false).await;
    let vm = uuid::Uuid::new_v4().to_string();
    let snap =
        |disks: Vec<(
            &ramsnap_proto::common::v1::VolumeRef,
            &ramsnap_proto::common::v1::VolumeRef,
        )>,
         memory: Option<ramsnap_proto::common::v1::MemoryVolumeRef>| hpb::SnapshotVmRequest {
            job_id: uuid::Uuid::new_v4().to_string(),
            vm_id: vm.clone(),
            snapshot_id: uuid::Uuid::new_v4().to_string(),
            disks: disks
                .into_iter()
                .map(|(c, o)| hpb::SnapshotDisk {
                    current: Some(c.clone()),
                    overlay: Some(o.clone()),
                })
                .collect(),
            memory,
            mode: hpb::SnapshotMode::Paused as i32,
            compatibility_version: "3.3".into(),
        };
    let cases = vec![
        (
            "disks[1].current",
            snap(vec![(&disk, &overlay), (&disk, &overlay)], None),
        ),
        ("disks[0].overlay", snap(vec![(&disk, &disk)], None)),
        (
            "memory.metadata",
            snap(
                vec![(&disk, &overlay)],
                Some(ramsnap_proto::common::v1::MemoryVolumeRef {
                    dump: memory.dump.clone(),
                    metadata: memory.dump.clone(),
                }),
            ),
        ),
        (
            "memory.dump",
            snap(
                vec![(&disk, &overlay)],
                Some(ramsnap_proto::common::v1::MemoryVolumeRef {
                    dump: Some(overlay.clone()),
                    metadata: memory.metadata.clone(),
                }),
            ),
        ),
    ];
    for (field, req) in cases {
        let (_, r) = snapshot(&mut env.host, req).await;
        let st = r.unwrap_err();
        assert_eq!(
            (st.code(), field_of(&st).as_str()),
            (Code::InvalidArgument, field),
            "{st:?}"
        );
    }
    let verify = |f: &dyn Fn(&mut hpb::VerifyMemoryRequest)| {
        let mut q = hpb::VerifyMemoryRequest {
            vm_id: vm.clone(),
            memory: Some(memory.clone()),
            ..Default::default()
        };
        f(&mut q);
        q
    };
    for (field, req) in [
        (
            "rebind_disks[1]",
            verify(&|q| q.rebind_disks = vec![disk.clone(), disk.clone()]),
        ),
        (
            "memory.dump",
            verify(&|q| q.rebind_disks = vec![memory.dump.clone().unwrap()]),
        ),
        (
            "memory.metadata",
            verify(&|q| q.memory.as_mut().unwrap().metadata = memory.dump.clone()),
        ),
        ("vm_id", verify(&|q| q.vm_id = uuid::Uuid::nil().to_string())),
    ] {
        let st = env.verify_memory(req).await.unwrap_err();
        assert_eq!(
            (st.code(), field_of(&st).as_str()),
            (Code::InvalidArgument, field),
            "{st:?}"
        );
    }
}

/// Bytes that are no protobuf message: tonic refuses them before the
/// handler (INTERNAL, "failed to decode Protobuf message"), and the server
/// goes on serving.
#[tokio::test]
async fn simulation_malformed_protobuf_is_refused_by_tonic() {
    let mut env = Env::new("simmalformed", opts()).await;
    let channel = env.host_channel().await;
    for (method, body) in [
        // Field 1 (spec), length 10, then 2 bytes: truncated.
        ("RunVm", vec![0x0a, 0x0a, 0x01, 0x02]),
        // Field 1 (vm_id) as a string that is not UTF-8.
        ("GetVmStatus", vec![0x0a, 0x02, 0xc3, 0x28]),
        // A varint that never ends.
        (
            "StopVm",
            vec![
                0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        ),
        // Wire type 7 does not exist.
        ("ListVms", vec![0x0f]),
    ] {
        let st = raw_call(channel.clone(), method, body).await.unwrap_err();
        assert_eq!(st.code(), Code::Internal, "{method}: {st:?}");
        assert!(
            st.message().contains("failed to decode Protobuf message"),
            "{method}: {st:?}"
        );
    }
    // Still serving.
    assert_eq!(
        env.status(&uuid::Uuid::new_v4().to_string()).await,
        hpb::VmStatus::Down
    );
}

/// Sends `body` as the raw request message of HostService/`method`.
async fn raw_call(
    channel: tonic::transport::Channel,
    method: &str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    struct Raw;
    struct RawEnc;
    struct RawDec;
    impl Encoder for RawEnc {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            bytes::BufMut::put_slice(dst, &item);
            Ok(())
        }
    }
    impl Decoder for RawDec {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
            let n = bytes::Buf::remaining(src);
            Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
        }
    }
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEnc;
        type Decoder = RawDec;
        fn encoder(&mut self) -> RawEnc {
            RawEnc
        }
        fn decoder(&mut self) -> RawDec {
            RawDec
        }
    }
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path: tonic::codegen::http::uri::PathAndQuery =
        format!("/ramsnap.host.v1.HostService/{method}").parse().unwrap();
    grpc.unary(tonic::Request::new(body), path, Raw)
        .await
        .map(|r| r.into_inner())
}

/// A VM this host never ran: WatchVmStatus is one DOWN and the end (it used
/// to wait forever, holding an entry), ReadConsole NOT_FOUND.
#[tokio::test]
async fn simulation_unknown_vm_watch_ends_after_down() {
    let mut env = Env::new("simunknown", opts()).await;
    let vm = uuid::Uuid::new_v4().to_string();
    let mut w = watch(&mut env, &vm).await;
    assert_eq!(
        statuses(&mut w, Duration::from_secs(5)).await,
        (vec![hpb::VmStatus::Down], true)
    );
    let st = env
        .host
        .read_console(hpb::ReadConsoleRequest {
            vm_id: vm.clone(),
            offset: 0,
            max_bytes: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
}

/// ForgetVm: refused while the VM runs; once it is down, its console log
/// directory goes, its open watches end, ReadConsole is NOT_FOUND and a
/// watch is one DOWN; idempotent; the VM can run again afterwards.
#[tokio::test]
async fn simulation_forget_vm_removes_what_the_host_keeps() {
    let mut env = Env::new("simforget", opts()).await;
    let disk = env.new_disk(false).await;
    let vm = uuid::Uuid::new_v4().to_string();
    let spec = vm_spec(&vm, 64, vec![disk], "");
    assert_eq!(env.run(&spec, None).await.unwrap(), hpb::VmStatus::Up);
    let console_dir = env.run_dir.join(&vm);
    assert!(console_dir.join("console.log").is_file());
    let forget = |vm: &str| hpb::ForgetVmRequest { vm_id: vm.into() };

    let st = env.host.forget_vm(forget(&vm)).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert_eq!(precondition_kind(&st), "VM_RUNNING");
    assert_eq!(precondition_subject(&st), vm);
    assert_eq!(env.status(&vm).await, hpb::VmStatus::Up);
    assert!(console_dir.join("console.log").is_file());

    let mut running_watch = watch(&mut env, &vm).await;
    assert!(env.stop(&vm, 0).await || env.status(&vm).await == hpb::VmStatus::Down);
    // Removed, but the console log is still there: the leftover.
    env.console(&vm).await;

    let r = env.host.forget_vm(forget(&vm)).await.unwrap().into_inner();
    assert!(r.forgotten);
    assert!(!console_dir.exists(), "the console log directory is left");
    // The watch open across the stop sees the end.
    let (seen, ended) = statuses(&mut running_watch, Duration::from_secs(5)).await;
    assert!(ended, "the watch of a forgotten VM is still open (seen {seen:?})");
    assert_eq!(seen.last(), Some(&hpb::VmStatus::Down), "{seen:?}");
    let st = env
        .host
        .read_console(hpb::ReadConsoleRequest {
            vm_id: vm.clone(),
            offset: 0,
            max_bytes: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    let mut w = watch(&mut env, &vm).await;
    assert_eq!(
        statuses(&mut w, Duration::from_secs(5)).await,
        (vec![hpb::VmStatus::Down], true)
    );

    // Again, and for a VM never seen: success, nothing forgotten.
    assert!(
        !env.host
            .forget_vm(forget(&vm))
            .await
            .unwrap()
            .into_inner()
            .forgotten
    );
    let never = uuid::Uuid::new_v4().to_string();
    assert!(
        !env.host
            .forget_vm(forget(&never))
            .await
            .unwrap()
            .into_inner()
            .forgotten
    );
    let st = env.host.forget_vm(forget("nope")).await.unwrap_err();
    assert_eq!(
        (st.code(), field_of(&st).as_str()),
        (Code::InvalidArgument, "vm_id")
    );

    // A forgotten VM can run again.
    assert_eq!(env.run(&spec, None).await.unwrap(), hpb::VmStatus::Up);
    assert!(console_dir.join("console.log").is_file());
    assert!(env.stop(&vm, 0).await || env.status(&vm).await == hpb::VmStatus::Down);
}
