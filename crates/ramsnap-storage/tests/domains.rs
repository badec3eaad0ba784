//! StorageService against a real FILE domain (a directory) and a real BLOCK
//! domain (LVM2 metadata on a loop device), over real gRPC.
mod support;

use ramsnap_proto::common::v1::VolumeRef;
use ramsnap_proto::storage::v1 as pb;
use std::os::unix::fs::FileExt;
use support::*;
use tonic::Code;
use uuid::Uuid;

const KINDS: [pb::DomainType; 2] = [pb::DomainType::File, pb::DomainType::Block];

fn vref(v: &pb::Volume) -> VolumeRef {
    v.r#ref.clone().unwrap()
}

#[tokio::test]
async fn create_list_get_delete_on_both_kinds() {
    let mut env = Env::new(1024 * MIB).await;
    for kind in KINDS {
        let domain = env.domain(kind);
        let raw = env
            .create(new_volume(&domain, 10 * MIB, pb::VolumeFormat::Raw))
            .await
            .unwrap();
        let cow = env
            .create(new_volume(&domain, 64 * MIB, pb::VolumeFormat::Cow))
            .await
            .unwrap();
        assert_eq!(raw.legality, pb::VolumeLegality::Legal as i32);
        assert_eq!(raw.capacity_bytes, 10 * MIB);
        let natural = if kind == pb::DomainType::File {
            pb::VolumeAllocation::Sparse
        } else {
            pb::VolumeAllocation::Preallocated
        };
        assert_eq!(raw.allocation, natural as i32, "{kind:?}");
        if kind == pb::DomainType::Block {
            assert!(raw.allocated_bytes >= 10 * MIB);
            assert!(lv_names(&domain).contains(&vref(&raw).volume_id));
        }
        let listed = env.list(&domain).await;
        assert_eq!(listed.len(), 2, "{kind:?}: {listed:?}");
        // What a create answers is what the domain holds.
        for made in [&raw, &cow] {
            let back = listed.iter().find(|v| v.r#ref == made.r#ref).unwrap();
            assert_eq!(back, made, "{kind:?}");
        }
        let got = env
            .client
            .get_volume(pb::GetVolumeRequest {
                r#ref: Some(vref(&cow)),
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(got.format, pb::VolumeFormat::Cow as i32);
        for v in [&raw, &cow] {
            env.client
                .delete_volume(pb::DeleteVolumeRequest {
                    request_id: String::new(),
                    r#ref: Some(vref(v)),
                })
                .await
                .unwrap();
        }
        assert!(env.list(&domain).await.is_empty(), "{kind:?}");
        let err = env
            .client
            .get_volume(pb::GetVolumeRequest {
                r#ref: Some(vref(&raw)),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    assert!(lv_names(&env.block_domain).is_empty());
}

#[tokio::test]
async fn memory_volumes_follow_ovirt_layout() {
    let mut env = Env::new(2048 * MIB).await;
    for kind in KINDS {
        let domain = env.domain(kind);
        let resp = env
            .client
            .create_memory_volumes(pb::CreateMemoryVolumesRequest {
                request_id: Uuid::new_v4().to_string(),
                domain_id: domain.clone(),
                memory_bytes: 256 * MIB,
                mode: pb::MemoryDumpMode::Paused as i32,
                description: "snap memory".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let (dump, meta) = (resp.dump.unwrap(), resp.metadata.unwrap());
        assert_eq!(dump.capacity_bytes, 256 * MIB + 200 * MIB);
        assert_eq!(dump.format, pb::VolumeFormat::Raw as i32);
        assert_eq!(dump.purpose, pb::VolumePurpose::MemoryDump as i32);
        assert_eq!(meta.purpose, pb::VolumePurpose::MemoryMetadata as i32);
        assert_ne!(
            vref(&dump).image_id,
            vref(&meta).image_id,
            "each in an image of its own"
        );
        let expected = match kind {
            pb::DomainType::File => {
                // Sparse: nothing written yet.
                assert!(dump.allocated_bytes < MIB, "{}", dump.allocated_bytes);
                pb::VolumeAllocation::Sparse
            }
            _ => {
                assert!(dump.allocated_bytes >= dump.capacity_bytes);
                pb::VolumeAllocation::Preallocated
            }
        };
        assert_eq!(dump.allocation, expected as i32, "{kind:?}");
        // What the create answers is what the domain holds.
        let listed = env.list(&domain).await;
        for made in [&dump, &meta] {
            let back = listed.iter().find(|v| v.r#ref == made.r#ref).unwrap();
            assert_eq!(back, made, "{kind:?}");
        }
        // A live dump gets twice the RAM.
        let live = env
            .client
            .create_memory_volumes(pb::CreateMemoryVolumesRequest {
                domain_id: domain.clone(),
                memory_bytes: 128 * MIB,
                mode: pb::MemoryDumpMode::Live as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(live.dump.unwrap().capacity_bytes, 2 * 128 * MIB + 200 * MIB);
    }
}

#[tokio::test]
async fn cow_chain_prepare_and_teardown() {
    let mut env = Env::new(1024 * MIB).await;
    for kind in KINDS {
        let domain = env.domain(kind);
        let base = env
            .create(new_volume(&domain, 32 * MIB, pb::VolumeFormat::Raw))
            .await
            .unwrap();
        let base_ref = vref(&base);
        // Write a recognisable block into the base.
        let path = env.prepare(&base_ref).await;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"BASE-DATA", 4096)
            .unwrap();
        env.teardown(&base_ref).await;

        let mut child_req = new_volume(&domain, 32 * MIB, pb::VolumeFormat::Cow);
        child_req.image_id = base_ref.image_id.clone();
        child_req.parent_volume_id = base_ref.volume_id.clone();
        let child = env.create(child_req).await.unwrap();
        assert_eq!(child.parent_volume_id, base_ref.volume_id);
        let child_ref = vref(&child);

        let path = env.prepare(&child_ref).await;
        assert!(path.exists(), "{kind:?}: {path:?}");
        // Prepare is idempotent.
        assert_eq!(env.prepare(&child_ref).await, path);
        if kind == pb::DomainType::Block {
            assert_eq!(
                loops_over(&env.loop_dev.device),
                2,
                "child and its base are active"
            );
        }
        // qemu reads the chain through the child: the base's data shows.
        let out = std::process::Command::new("qemu-io")
            .args(["-r", "-f", "qcow2", "-c", "read -v 4096 9"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        // qemu-io's hex dump: "42 41 53 45 2d 44 41 54 41" is "BASE-DATA".
        assert!(
            text.contains("42 41 53 45 2d 44 41 54 41"),
            "{kind:?}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );

        env.teardown(&child_ref).await;
        if kind == pb::DomainType::Block {
            assert_eq!(loops_over(&env.loop_dev.device), 0, "teardown releases the chain");
        }
        // The base cannot go while the child needs it.
        let err = env
            .client
            .delete_volume(pb::DeleteVolumeRequest {
                request_id: String::new(),
                r#ref: Some(base_ref.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        // A snapshot's volume can branch: a second child off the base.
        let mut second = new_volume(&domain, 32 * MIB, pb::VolumeFormat::Cow);
        second.image_id = base_ref.image_id.clone();
        second.parent_volume_id = base_ref.volume_id.clone();
        let second = env.create(second).await.unwrap();
        assert_eq!(second.parent_volume_id, base_ref.volume_id);
    }
}

/// Writes a pattern with data and zero regions into a prepared volume.
fn fill_pattern(path: &std::path::Path, size: u64) -> Vec<u8> {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut expected = vec![0u8; size as usize];
    let mut off = 0u64;
    let mut n = 0u8;
    while off < size {
        n = n.wrapping_add(1);
        // 1 MiB of data, then 1 MiB left zero.
        let chunk: Vec<u8> = (0..MIB).map(|i| (i as u8) ^ n | 1).collect();
        f.write_all_at(&chunk, off).unwrap();
        expected[off as usize..(off + MIB) as usize].copy_from_slice(&chunk);
        off += 2 * MIB;
    }
    f.sync_all().unwrap();
    expected
}

fn read_all(path: &std::path::Path, size: u64) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; size as usize];
    f.read_exact_at(&mut buf, 0).unwrap();
    buf
}

#[tokio::test]
async fn copy_file_to_block_and_back() {
    let mut env = Env::new(1024 * MIB).await;
    let size = 64 * MIB;
    let src = env
        .create(new_volume(&env.file_domain.clone(), size, pb::VolumeFormat::Raw))
        .await
        .unwrap();
    let src_path = env.prepare(&vref(&src)).await;
    let expected = fill_pattern(&src_path, size);

    let (progress, on_block) = env
        .copy(pb::CopyVolumeRequest {
            request_id: Uuid::new_v4().to_string(),
            source: Some(vref(&src)),
            target_domain_id: env.block_domain.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(*progress.last().unwrap(), size);
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "progress only grows: {progress:?}"
    );
    assert_eq!(on_block.allocation, pb::VolumeAllocation::Preallocated as i32);
    assert_eq!(on_block.legality, pb::VolumeLegality::Legal as i32);
    let p = env.prepare(&vref(&on_block)).await;
    assert!(read_all(&p, size) == expected, "FILE->BLOCK content differs");
    env.teardown(&vref(&on_block)).await;

    let (_, back) = env
        .copy(pb::CopyVolumeRequest {
            source: Some(vref(&on_block)),
            target_domain_id: env.file_domain.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(back.allocation, pb::VolumeAllocation::Sparse as i32);
    let p = env.prepare(&vref(&back)).await;
    assert!(read_all(&p, size) == expected, "BLOCK->FILE content differs");
    // Zero regions were not written to the sparse target.
    assert!(
        back.allocated_bytes <= size / 2 + MIB,
        "allocated {}",
        back.allocated_bytes
    );
    assert_eq!(
        loops_over(&env.loop_dev.device),
        0,
        "the copy tore down what it prepared"
    );
}

#[tokio::test]
async fn copy_collapses_a_cow_chain_across_kinds() {
    let mut env = Env::new(1024 * MIB).await;
    let size = 16 * MIB;
    let file = env.file_domain.clone();
    let base = env
        .create(new_volume(&file, size, pb::VolumeFormat::Raw))
        .await
        .unwrap();
    let p = env.prepare(&vref(&base)).await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all_at(b"from-base", 0)
        .unwrap();
    let mut child = new_volume(&file, size, pb::VolumeFormat::Cow);
    child.image_id = vref(&base).image_id;
    child.parent_volume_id = vref(&base).volume_id;
    let child = env.create(child).await.unwrap();
    let cp = env.prepare(&vref(&child)).await;
    let st = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x41 1048576 4096"])
        .arg(&cp)
        .output()
        .unwrap();
    assert!(st.status.success());

    // To BLOCK as qcow2, then back to FILE as RAW.
    let (_, on_block) = env
        .copy(pb::CopyVolumeRequest {
            source: Some(vref(&child)),
            target_domain_id: env.block_domain.clone(),
            target_format: pb::VolumeFormat::Cow as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(on_block.parent_volume_id.is_empty(), "a copy stands alone");
    let (_, raw) = env
        .copy(pb::CopyVolumeRequest {
            source: Some(vref(&on_block)),
            target_domain_id: file.clone(),
            target_format: pb::VolumeFormat::Raw as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let data = read_all(&env.prepare(&vref(&raw)).await, size);
    assert_eq!(&data[..9], b"from-base");
    assert!(data[MIB as usize..MIB as usize + 4096].iter().all(|&b| b == 0x41));
}

#[tokio::test]
async fn retries_with_a_request_id_act_once() {
    let mut env = Env::new(1024 * MIB).await;
    for kind in KINDS {
        let domain = env.domain(kind);
        let mut req = new_volume(&domain, 8 * MIB, pb::VolumeFormat::Raw);
        req.request_id = Uuid::new_v4().to_string();
        let a = env.create(req.clone()).await.unwrap();
        let b = env.create(req.clone()).await.unwrap();
        assert_eq!(a.r#ref, b.r#ref, "{kind:?}");
        // The same request id with other parameters is refused.
        let mut other = req.clone();
        other.capacity_bytes = 16 * MIB;
        assert_eq!(env.create(other).await.unwrap_err().code(), Code::AlreadyExists);

        let mem = pb::CreateMemoryVolumesRequest {
            request_id: Uuid::new_v4().to_string(),
            domain_id: domain.clone(),
            memory_bytes: 64 * MIB,
            mode: pb::MemoryDumpMode::Paused as i32,
            description: String::new(),
        };
        let m1 = env
            .client
            .create_memory_volumes(mem.clone())
            .await
            .unwrap()
            .into_inner();
        let m2 = env.client.create_memory_volumes(mem).await.unwrap().into_inner();
        assert_eq!(m1, m2);

        let copy = pb::CopyVolumeRequest {
            request_id: Uuid::new_v4().to_string(),
            source: Some(vref(&a)),
            target_domain_id: domain.clone(),
            ..Default::default()
        };
        let (_, c1) = env.copy(copy.clone()).await.unwrap();
        let (_, c2) = env.copy(copy).await.unwrap();
        assert_eq!(c1.r#ref, c2.r#ref);
        assert_eq!(
            env.list(&domain).await.len(),
            4,
            "{kind:?}: one volume, two memory volumes, one copy"
        );

        let del = pb::DeleteVolumeRequest {
            request_id: Uuid::new_v4().to_string(),
            r#ref: Some(vref(&a)),
        };
        env.client.delete_volume(del.clone()).await.unwrap();
        env.client
            .delete_volume(del)
            .await
            .expect("a retried delete succeeds");
        let again = pb::DeleteVolumeRequest {
            request_id: Uuid::new_v4().to_string(),
            r#ref: Some(vref(&a)),
        };
        assert_eq!(
            env.client.delete_volume(again).await.unwrap_err().code(),
            Code::NotFound
        );
    }
}

#[tokio::test]
async fn concurrent_creates_on_one_block_domain() {
    let env = Env::new(1024 * MIB).await;
    let domain = env.block_domain.clone();
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let mut client = env.client.clone();
        let domain = domain.clone();
        tasks.push(tokio::spawn(async move {
            let mut req = new_volume(&domain, (i + 1) * MIB, pb::VolumeFormat::Raw);
            req.description = format!("volume {i}");
            client
                .create_volume(req)
                .await
                .map(|r| r.into_inner().volume.unwrap())
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let v = t.await.unwrap().expect("concurrent create");
        ids.insert(vref(&v).volume_id);
    }
    assert_eq!(ids.len(), 16);
    let mut env = env;
    let listed = env.list(&domain).await;
    assert_eq!(listed.len(), 16);
    assert!(listed
        .iter()
        .all(|v| v.legality == pb::VolumeLegality::Legal as i32));
    let mut descriptions: Vec<String> = listed.iter().map(|v| v.description.clone()).collect();
    descriptions.sort();
    let mut want: Vec<String> = (0..16).map(|i| format!("volume {i}")).collect();
    want.sort();
    assert_eq!(descriptions, want, "every volume's metadata is intact");
    assert_eq!(lv_names(&domain).len(), 16);
}

#[tokio::test]
async fn a_restarted_service_rediscovers_everything_from_the_domains() {
    let mut env = Env::new(1024 * MIB).await;
    let mut before = Vec::new();
    for kind in KINDS {
        let domain = env.domain(kind);
        env.create(new_volume(&domain, 4 * MIB, pb::VolumeFormat::Raw))
            .await
            .unwrap();
        env.create(new_volume(&domain, 4 * MIB, pb::VolumeFormat::Cow))
            .await
            .unwrap();
        before.push(env.list(&domain).await);
    }
    // A new instance with no local state at all: only the domains remain.
    let mut config = env.config();
    config.state_dir = env.dir.path().join("fresh-state");
    env.restart(config).await;
    let domains = env
        .client
        .list_domains(pb::ListDomainsRequest {})
        .await
        .unwrap()
        .into_inner()
        .domains;
    let ids: Vec<&str> = domains.iter().map(|d| d.domain_id.as_str()).collect();
    assert!(
        ids.contains(&env.file_domain.as_str()) && ids.contains(&env.block_domain.as_str()),
        "{ids:?}"
    );
    for (i, kind) in KINDS.into_iter().enumerate() {
        let domain = env.domain(kind);
        assert_eq!(env.list(&domain).await, before[i], "{kind:?}");
    }
    // Registering the same location again adopts the domain.
    let again = env
        .client
        .register_domain(pb::RegisterDomainRequest {
            name: "luns".into(),
            r#type: pb::DomainType::Block as i32,
            location: env.loop_dev.device.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.adopted);
    assert_eq!(again.domain.unwrap().domain_id, env.block_domain);
}

#[tokio::test]
async fn bad_input_gets_precise_errors_and_leaves_nothing() {
    let mut env = Env::new(512 * MIB).await;
    let missing = Uuid::new_v4().to_string();
    for kind in KINDS {
        let domain = env.domain(kind);

        let err = env
            .create(new_volume(&missing, MIB, pb::VolumeFormat::Raw))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");

        let err = env
            .create(new_volume(&domain, 0, pb::VolumeFormat::Raw))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, "capacity_bytes")
        );

        let err = env
            .create(new_volume(&domain, 1 << 50, pb::VolumeFormat::Raw))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

        let err = env
            .create(new_volume("../../etc", MIB, pb::VolumeFormat::Raw))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, "domain_id")
        );

        let mut req = new_volume(&domain, MIB, pb::VolumeFormat::Raw);
        req.volume_id = "../../../tmp/x".into();
        let err = env.create(req).await.unwrap_err();
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, "volume_id")
        );

        let mut req = new_volume(&domain, MIB, pb::VolumeFormat::Raw);
        req.format = 42;
        let err = env.create(req).await.unwrap_err();
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, "format")
        );

        let mut req = new_volume(&domain, MIB, pb::VolumeFormat::Raw);
        req.parent_volume_id = Uuid::new_v4().to_string();
        req.image_id = Uuid::new_v4().to_string();
        let err = env.create(req).await.unwrap_err();
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, "parent_volume_id")
        );

        let mut req = new_volume(&domain, MIB, pb::VolumeFormat::Cow);
        req.parent_volume_id = Uuid::new_v4().to_string();
        req.image_id = Uuid::new_v4().to_string();
        assert_eq!(env.create(req).await.unwrap_err().code(), Code::NotFound);

        let bad_ref = VolumeRef {
            domain_id: domain.clone(),
            image_id: missing.clone(),
            volume_id: missing.clone(),
        };
        let err = env
            .client
            .get_volume(pb::GetVolumeRequest {
                r#ref: Some(bad_ref.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        let err = env
            .client
            .prepare_volume(pb::PrepareVolumeRequest {
                r#ref: Some(bad_ref.clone()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        let err = env
            .client
            .delete_volume(pb::DeleteVolumeRequest {
                request_id: String::new(),
                r#ref: Some(bad_ref.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        let err = env
            .client
            .get_volume(pb::GetVolumeRequest { r#ref: None })
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, "ref")
        );
        let err = env
            .copy(pb::CopyVolumeRequest {
                source: Some(bad_ref),
                target_domain_id: domain.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);

        let err = env
            .client
            .create_memory_volumes(pb::CreateMemoryVolumesRequest {
                domain_id: domain.clone(),
                memory_bytes: 1 << 45,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);

        assert!(env.list(&domain).await.is_empty(), "{kind:?}: nothing half-made");
    }
    // RAW volumes on BLOCK cannot be sparse.
    let mut req = new_volume(&env.block_domain.clone(), MIB, pb::VolumeFormat::Raw);
    req.allocation = pb::VolumeAllocation::Sparse as i32;
    let err = env.create(req).await.unwrap_err();
    assert_eq!(
        (err.code(), field_of(&err).as_str()),
        (Code::InvalidArgument, "allocation")
    );
    assert!(lv_names(&env.block_domain).is_empty());

    // Domain registration: traversal out of the allowed roots, relative
    // paths, non-devices, bad names.
    let root = env.dir.path().join("roots");
    for location in [
        format!("{}/../..", root.display()),
        "relative/dir".into(),
        "/etc".into(),
    ] {
        let err = env
            .client
            .register_domain(pb::RegisterDomainRequest {
                name: "x".into(),
                r#type: pb::DomainType::File as i32,
                location: location.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, "location"),
            "{location}"
        );
    }
    for (name, kind, location) in [
        ("x", pb::DomainType::Block, "/etc/passwd"),
        ("x", pb::DomainType::Block, "/dev/../etc/passwd"),
        ("bad name!", pb::DomainType::File, root.to_str().unwrap()),
    ] {
        let err = env
            .client
            .register_domain(pb::RegisterDomainRequest {
                name: name.into(),
                r#type: kind as i32,
                location: location.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name} {location}: {err:?}");
    }
    // A device that holds other data is not overwritten (even one the
    // configuration allows).
    let other = LoopDevice::new(&env.dir.path().join("roots"), 64 * MIB);
    let out = std::process::Command::new("mkfs.ext4")
        .arg("-q")
        .arg(&other.device)
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut config = env.config();
    config.block_devices.push(other.device.clone());
    env.restart(config).await;
    let err = env
        .client
        .register_domain(pb::RegisterDomainRequest {
            name: "busy".into(),
            r#type: pb::DomainType::Block as i32,
            location: other.device.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(precondition_of(&err).0, "DEVICE_NOT_EMPTY");
    assert!(err.message().contains("ext4"), "{err:?}");
}

#[tokio::test]
async fn a_failed_copy_leaves_no_target() {
    let mut env = Env::new(512 * MIB).await;
    let src = env
        .create(new_volume(
            &env.file_domain.clone(),
            8 * MIB,
            pb::VolumeFormat::Raw,
        ))
        .await
        .unwrap();
    // The source's data vanishes behind the service's back (say, a broken
    // NFS export): the copy fails after its target was made.
    let data = env.prepare(&vref(&src)).await;
    std::fs::remove_file(&data).unwrap();
    let err = env
        .copy(pb::CopyVolumeRequest {
            source: Some(vref(&src)),
            target_domain_id: env.block_domain.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::FailedPrecondition | Code::NotFound | Code::Internal
        ),
        "{err:?}"
    );
    assert!(env.list(&env.block_domain.clone()).await.is_empty());
    assert!(lv_names(&env.block_domain).is_empty());
    assert_eq!(loops_over(&env.loop_dev.device), 0);
}

#[tokio::test]
async fn merging_a_snapshot_volume_keeps_what_the_child_shows() {
    let mut env = Env::new(1024 * MIB).await;
    for kind in KINDS {
        let domain = env.domain(kind);
        let size = 16 * MIB;
        // base (RAW) <- mid (COW, "snapshot") <- leaf (COW, "active")
        let base = env
            .create(new_volume(&domain, size, pb::VolumeFormat::Raw))
            .await
            .unwrap();
        let p = env.prepare(&vref(&base)).await;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(b"base", 0)
            .unwrap();
        env.teardown(&vref(&base)).await;
        let mut req = new_volume(&domain, size, pb::VolumeFormat::Cow);
        req.image_id = vref(&base).image_id;
        req.parent_volume_id = vref(&base).volume_id;
        let mid = env.create(req.clone()).await.unwrap();
        let p = env.prepare(&vref(&mid)).await;
        let io = |path: &std::path::Path, cmd: &str| {
            let out = std::process::Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", cmd])
                .arg(path)
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        io(&p, "write -P 0x4d 1048576 4096");
        env.teardown(&vref(&mid)).await;
        req.parent_volume_id = vref(&mid).volume_id;
        let leaf = env.create(req).await.unwrap();
        let p = env.prepare(&vref(&leaf)).await;
        io(&p, "write -P 0x4c 2097152 4096");
        env.teardown(&vref(&leaf)).await;

        let merge = pb::MergeVolumeRequest {
            request_id: Uuid::new_v4().to_string(),
            r#ref: Some(vref(&mid)),
        };
        let child = env
            .client
            .merge_volume(merge.clone())
            .await
            .unwrap()
            .into_inner()
            .child
            .unwrap();
        assert_eq!(child.r#ref, leaf.r#ref);
        assert_eq!(child.parent_volume_id, vref(&base).volume_id, "{kind:?}");
        // A retry returns the same child.
        let again = env
            .client
            .merge_volume(merge)
            .await
            .unwrap()
            .into_inner()
            .child
            .unwrap();
        assert_eq!(again.r#ref, leaf.r#ref);
        assert_eq!(
            env.list(&domain).await.len(),
            2,
            "{kind:?}: the merged volume is gone"
        );

        let p = env.prepare(&vref(&leaf)).await;
        assert!(
            io(&p, "read -P 0x4d 1048576 4096").contains("read 4096/4096"),
            "mid's data survived"
        );
        assert!(io(&p, "read -P 0x4c 2097152 4096").contains("read 4096/4096"));
        let head = io(&p, "read -v 0 4");
        assert!(head.contains("62 61 73 65"), "base still under it: {head}");
        env.teardown(&vref(&leaf)).await;

        // The base has no child to merge into... it has one (the leaf); the
        // leaf has none.
        let err = env
            .client
            .merge_volume(pb::MergeVolumeRequest {
                request_id: String::new(),
                r#ref: Some(vref(&leaf)),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
    }
    assert_eq!(loops_over(&env.loop_dev.device), 0);
}

fn register_req(
    name: &str,
    kind: pb::DomainType,
    location: &str,
    role: pb::DomainRole,
) -> pb::RegisterDomainRequest {
    pb::RegisterDomainRequest {
        name: name.into(),
        r#type: kind as i32,
        location: location.into(),
        role: role as i32,
        ..Default::default()
    }
}

/// A new directory for a FILE domain inside the service's file roots.
fn new_root(env: &Env, name: &str) -> String {
    let dir = env.dir.path().join("roots").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir.display().to_string()
}

async fn get_domain(env: &mut Env, id: &str) -> pb::StorageDomain {
    env.client
        .get_domain(pb::GetDomainRequest { domain_id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap()
}

#[tokio::test]
async fn domain_roles_are_recorded_on_the_domain_and_rediscovered() {
    let mut env = Env::new(256 * MIB).await;
    let export_dir = new_root(&env, "export1");
    let export = env
        .client
        .register_domain(register_req(
            "export",
            pb::DomainType::File,
            &export_dir,
            pb::DomainRole::Export,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!export.adopted);
    let export = export.domain.unwrap();
    assert_eq!(export.role, pb::DomainRole::Export as i32);
    // UNSPECIFIED is DATA, on both types.
    for id in [env.file_domain.clone(), env.block_domain.clone()] {
        assert_eq!(get_domain(&mut env, &id).await.role, pb::DomainRole::Data as i32);
    }
    // The role lives in the domain's own metadata.
    let md_path = std::path::Path::new(&export_dir)
        .join(&export.domain_id)
        .join("dom_md/metadata");
    let md: serde_json::Value = serde_json::from_slice(&std::fs::read(&md_path).unwrap()).unwrap();
    assert_eq!(md["role"], "EXPORT");
    assert!(std::path::Path::new(&export_dir)
        .join(&export.domain_id)
        .join("master/vms")
        .is_dir());
    // Volumes live on export domains too: an export copies them there.
    let data = env
        .create(new_volume(
            &env.file_domain.clone(),
            4 * MIB,
            pb::VolumeFormat::Cow,
        ))
        .await
        .unwrap();
    let (_, vol) = env
        .copy(pb::CopyVolumeRequest {
            source: Some(vref(&data)),
            target_domain_id: export.domain_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    // A domain laid out before roles existed has no role field: DATA.
    let old_dir = new_root(&env, "old");
    let old_id = Uuid::new_v4();
    let old = std::path::Path::new(&old_dir).join(old_id.to_string());
    std::fs::create_dir_all(old.join("dom_md/deleted")).unwrap();
    std::fs::create_dir_all(old.join("images")).unwrap();
    std::fs::write(
        old.join("dom_md/metadata"),
        serde_json::json!({"version": 1, "domain_id": old_id, "name": "old", "type": "FILE"}).to_string(),
    )
    .unwrap();

    // A new instance with no local state finds the roles on the domains.
    let mut config = env.config();
    config.state_dir = env.dir.path().join("fresh-state");
    env.restart(config).await;
    let domains = env
        .client
        .list_domains(pb::ListDomainsRequest {})
        .await
        .unwrap()
        .into_inner()
        .domains;
    let role_of = |id: &str| domains.iter().find(|d| d.domain_id == id).map(|d| d.role);
    assert_eq!(role_of(&export.domain_id), Some(pb::DomainRole::Export as i32));
    assert_eq!(role_of(&old_id.to_string()), Some(pb::DomainRole::Data as i32));
    assert_eq!(role_of(&env.file_domain), Some(pb::DomainRole::Data as i32));
    assert_eq!(role_of(&env.block_domain), Some(pb::DomainRole::Data as i32));
    assert_eq!(env.list(&export.domain_id).await, vec![vol]);

    // Adopting: UNSPECIFIED accepts the recorded role, the same role is
    // fine, another one is refused and changes nothing.
    for role in [pb::DomainRole::Unspecified, pb::DomainRole::Export] {
        let again = env
            .client
            .register_domain(register_req("export", pb::DomainType::File, &export_dir, role))
            .await
            .unwrap()
            .into_inner();
        assert!(again.adopted);
        assert_eq!(
            again.domain.unwrap().role,
            pb::DomainRole::Export as i32,
            "{role:?}"
        );
    }
    for (dir, id, role) in [
        (export_dir.clone(), export.domain_id.clone(), pb::DomainRole::Data),
        (old_dir.clone(), old_id.to_string(), pb::DomainRole::Export),
        (
            env.dir.path().join("roots/nfs1").display().to_string(),
            env.file_domain.clone(),
            pb::DomainRole::Export,
        ),
    ] {
        let err = env
            .client
            .register_domain(register_req("x", pb::DomainType::File, &dir, role))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert_eq!(precondition_of(&err), ("DOMAIN_ROLE_MISMATCH".into(), id.clone()));
    }
    let block_dev = env.loop_dev.device.display().to_string();
    let again = env
        .client
        .register_domain(register_req(
            "luns",
            pb::DomainType::Block,
            &block_dev,
            pb::DomainRole::Data,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(again.adopted);
    assert_eq!(
        get_domain(&mut env, &export.domain_id).await.role,
        pb::DomainRole::Export as i32
    );
    let md: serde_json::Value = serde_json::from_slice(&std::fs::read(&md_path).unwrap()).unwrap();
    assert_eq!(md["role"], "EXPORT", "a refused adoption leaves the record alone");

    // EXPORT is FILE only: refused before anything touches the device,
    // whether it already holds a domain or is blank.
    let blank_dir = env.dir.path().join("blank");
    std::fs::create_dir_all(&blank_dir).unwrap();
    let blank = LoopDevice::new(&blank_dir, 64 * MIB);
    for dev in [block_dev.clone(), blank.device.display().to_string()] {
        let err = env
            .client
            .register_domain(register_req(
                "x",
                pb::DomainType::Block,
                &dev,
                pb::DomainRole::Export,
            ))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, "role"),
            "{dev}"
        );
    }
    let sig = std::process::Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(&blank.device)
        .output()
        .unwrap();
    assert!(sig.stdout.is_empty(), "the blank device stays blank");
    let mut bad = register_req(
        "x",
        pb::DomainType::File,
        &new_root(&env, "bad"),
        pb::DomainRole::Data,
    );
    bad.role = 7;
    let err = env.client.register_domain(bad).await.unwrap_err();
    assert_eq!(
        (err.code(), field_of(&err).as_str()),
        (Code::InvalidArgument, "role")
    );
    let ids: Vec<String> = env
        .client
        .list_domains(pb::ListDomainsRequest {})
        .await
        .unwrap()
        .into_inner()
        .domains
        .into_iter()
        .map(|d| d.domain_id)
        .collect();
    assert_eq!(
        ids.len(),
        4,
        "no domain was made by a refused registration: {ids:?}"
    );
}

fn put_req(domain: &str, vm: &str, ovf: &str) -> pb::PutVmDescriptorRequest {
    pb::PutVmDescriptorRequest {
        domain_id: domain.into(),
        vm_id: vm.into(),
        ovf: ovf.into(),
    }
}

#[tokio::test]
async fn vm_descriptors_live_on_export_domains_as_ovirt_keeps_them() {
    let mut env = Env::new(256 * MIB).await;
    let export_dir = new_root(&env, "export1");
    let export = env
        .client
        .register_domain(register_req(
            "export",
            pb::DomainType::File,
            &export_dir,
            pb::DomainRole::Export,
        ))
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap()
        .domain_id;
    let vms = std::path::Path::new(&export_dir).join(&export).join("master/vms");
    let (a, b) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    let ovf_a = "<ovf:Envelope><Content ovf:id=\"a\"/></ovf:Envelope>";
    let put = env
        .client
        .put_vm_descriptor(put_req(&export, &a, ovf_a))
        .await
        .unwrap()
        .into_inner()
        .descriptor
        .unwrap();
    assert_eq!((put.vm_id.as_str(), put.ovf.as_str()), (a.as_str(), ovf_a));
    let file = vms.join(&a).join(format!("{a}.ovf"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), ovf_a);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(put.updated_at, std::fs::metadata(&file).unwrap().mtime());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - put.updated_at).abs() < 60, "{}", put.updated_at);
    let get = |env: &mut Env, vm: String| {
        let mut client = env.client.clone();
        let domain = export.clone();
        async move {
            client
                .get_vm_descriptor(pb::GetVmDescriptorRequest {
                    domain_id: domain,
                    vm_id: vm,
                })
                .await
                .map(|r| r.into_inner().descriptor.unwrap())
        }
    };
    assert_eq!(get(&mut env, a.clone()).await.unwrap(), put);

    // Put replaces; nothing but the document is left in the VM's directory.
    env.client
        .put_vm_descriptor(put_req(&export, &b, "<b/>"))
        .await
        .unwrap();
    env.client
        .put_vm_descriptor(put_req(&export, &a, "<a version=\"2\"/>"))
        .await
        .unwrap();
    assert_eq!(get(&mut env, a.clone()).await.unwrap().ovf, "<a version=\"2\"/>");
    let entries: Vec<_> = std::fs::read_dir(vms.join(&a))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from(format!("{a}.ovf"))]);
    // A Put that died before its rename left a temporary file behind.
    let c = Uuid::new_v4().to_string();
    std::fs::create_dir_all(vms.join(&c)).unwrap();
    std::fs::write(vms.join(&c).join(format!("{c}.tmp.0123")), "<half").unwrap();
    std::fs::write(vms.join(&b).join(format!("{b}.tmp.4567")), "<half").unwrap();
    // Every page: a page ends before 3 MiB of OVF (the 16 MiB one below
    // is a page of its own).
    let list = |env: &mut Env, domain: String| {
        let mut client = env.client.clone();
        async move {
            let (mut all, mut page_token) = (Vec::new(), String::new());
            loop {
                let page = client
                    .list_vm_descriptors(pb::ListVmDescriptorsRequest {
                        domain_id: domain.clone(),
                        page_size: 0,
                        page_token,
                    })
                    .await?
                    .into_inner();
                all.extend(page.descriptors);
                if page.next_page_token.is_empty() {
                    return Ok::<_, tonic::Status>(all);
                }
                page_token = page.next_page_token;
            }
        }
    };
    let listed = list(&mut env, export.clone()).await.unwrap();
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(listed.iter().map(|d| d.vm_id.clone()).collect::<Vec<_>>(), want);
    assert_eq!(listed.iter().find(|d| d.vm_id == b).unwrap().ovf, "<b/>");

    // The largest document there may be goes through whole; one byte more
    // does not; nor does an empty one.
    let big = "x".repeat(16 * MIB as usize);
    let put = env
        .client
        .put_vm_descriptor(put_req(&export, &c, &big))
        .await
        .unwrap()
        .into_inner()
        .descriptor
        .unwrap();
    assert_eq!(put.ovf.len(), big.len());
    assert!(get(&mut env, c.clone()).await.unwrap().ovf == big);
    for ovf in [String::new(), "x".repeat(16 * MIB as usize + 1)] {
        let err = env
            .client
            .put_vm_descriptor(put_req(&export, &b, &ovf))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, "ovf"),
            "{} bytes",
            ovf.len()
        );
    }
    assert_eq!(
        get(&mut env, b.clone()).await.unwrap().ovf,
        "<b/>",
        "a refused Put changes nothing"
    );

    // Delete removes the document and the VM's directory; again is fine.
    for _ in 0..2 {
        env.client
            .delete_vm_descriptor(pb::DeleteVmDescriptorRequest {
                domain_id: export.clone(),
                vm_id: a.clone(),
            })
            .await
            .unwrap();
    }
    assert!(!vms.join(&a).exists());
    let err = get(&mut env, a.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        resource_of(&err),
        ("vm_descriptor".to_string(), format!("{export}/{a}"))
    );

    // Bad ids, named by field, on every call.
    for bad in [
        "",
        "nope",
        "../../../etc/passwd",
        &Uuid::new_v4().simple().to_string(),
    ] {
        let err = env
            .client
            .put_vm_descriptor(put_req(&export, bad, "<x/>"))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, "vm_id"),
            "{bad}"
        );
        let err = get(&mut env, bad.to_string()).await.unwrap_err();
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, "vm_id"),
            "{bad}"
        );
        let err = env
            .client
            .delete_vm_descriptor(pb::DeleteVmDescriptorRequest {
                domain_id: export.clone(),
                vm_id: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, "vm_id"),
            "{bad}"
        );
    }
    let err = list(&mut env, "../x".into()).await.unwrap_err();
    assert_eq!(
        (err.code(), field_of(&err).as_str()),
        (Code::InvalidArgument, "domain_id")
    );

    // DATA domains (FILE or BLOCK) hold no descriptors; unknown domains
    // are not found.
    let vm = Uuid::new_v4().to_string();
    for domain in [
        env.file_domain.clone(),
        env.block_domain.clone(),
        Uuid::new_v4().to_string(),
    ] {
        let data = domain == env.file_domain || domain == env.block_domain;
        let errs = vec![
            env.client
                .put_vm_descriptor(put_req(&domain, &vm, "<x/>"))
                .await
                .unwrap_err(),
            env.client
                .get_vm_descriptor(pb::GetVmDescriptorRequest {
                    domain_id: domain.clone(),
                    vm_id: vm.clone(),
                })
                .await
                .unwrap_err(),
            list(&mut env, domain.clone()).await.unwrap_err(),
            env.client
                .delete_vm_descriptor(pb::DeleteVmDescriptorRequest {
                    domain_id: domain.clone(),
                    vm_id: vm.clone(),
                })
                .await
                .unwrap_err(),
        ];
        for err in errs {
            if data {
                assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
                assert_eq!(
                    precondition_of(&err),
                    ("NOT_AN_EXPORT_DOMAIN".into(), domain.clone())
                );
            } else {
                assert_eq!(err.code(), Code::NotFound, "{err:?}");
                assert_eq!(resource_of(&err), ("storage_domain".into(), domain.clone()));
            }
        }
    }
    assert!(!env
        .dir
        .path()
        .join("roots/nfs1")
        .join(&env.file_domain)
        .join("master")
        .exists());

    // The descriptors are on the domain: a new instance finds them.
    let mut config = env.config();
    config.state_dir = env.dir.path().join("fresh-state");
    env.restart(config).await;
    let listed = list(&mut env, export.clone()).await.unwrap();
    let mut want = vec![b.clone(), c.clone()];
    want.sort();
    assert_eq!(listed.iter().map(|d| d.vm_id.clone()).collect::<Vec<_>>(), want);
}

/// A copy that keeps the source's ids and, with `keep_parent`, only its
/// own layer.
fn layer_copy(source: &pb::Volume, target_domain: &str) -> pb::CopyVolumeRequest {
    let r = vref(source);
    pb::CopyVolumeRequest {
        request_id: Uuid::new_v4().to_string(),
        source: Some(r.clone()),
        target_domain_id: target_domain.into(),
        target_image_id: r.image_id,
        target_volume_id: r.volume_id,
        keep_parent: true,
        ..Default::default()
    }
}

fn retarget(v: &pb::Volume, domain: &str) -> VolumeRef {
    VolumeRef {
        domain_id: domain.into(),
        ..vref(v)
    }
}

fn qemu_io(path: &std::path::Path, cmds: &[&str]) {
    let mut args = vec!["qemu-io", "-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(path.to_str().unwrap());
    qemu(&args);
}

/// base (RAW, data in every other MiB) <- child (COW: new data over a
/// hole and over data, zeros over data) <- grandchild (COW: a little data)
/// on `domain`; returns them base first.
async fn three_layer_chain(env: &mut Env, domain: &str, size: u64) -> Vec<pb::Volume> {
    let base = env
        .create(new_volume(domain, size, pb::VolumeFormat::Raw))
        .await
        .unwrap();
    fill_pattern(&env.prepare(&vref(&base)).await, size);
    env.teardown(&vref(&base)).await;
    let mut chain = vec![base];
    for writes in [
        &["write -P 0x22 1M 512k", "write -z 4M 64k", "write -P 0x23 6M 64k"][..],
        &["write -P 0x33 1M 4k", "write -P 0x34 10M 1M"][..],
    ] {
        let parent = vref(chain.last().unwrap());
        let mut req = new_volume(domain, size, pb::VolumeFormat::Cow);
        req.image_id = parent.image_id;
        req.parent_volume_id = parent.volume_id;
        let v = env.create(req).await.unwrap();
        qemu_io(&env.prepare(&vref(&v)).await, writes);
        env.teardown(&vref(&v)).await;
        chain.push(v);
    }
    chain
}

/// Compares what two volumes (of qemu-img formats `formats`) show through
/// their chains, and returns the (source, target) own-layer bytes of COW
/// volumes.
async fn compare_views(
    env: &mut Env,
    source: &VolumeRef,
    target: &VolumeRef,
    formats: (&str, &str),
) -> (u64, u64) {
    let (sp, tp) = (env.prepare(source).await, env.prepare(target).await);
    qemu(&[
        "qemu-img",
        "compare",
        "-f",
        formats.0,
        "-F",
        formats.1,
        sp.to_str().unwrap(),
        tp.to_str().unwrap(),
    ]);
    let own = if formats == ("qcow2", "qcow2") {
        (own_layer_bytes(&sp), own_layer_bytes(&tp))
    } else {
        (0, 0)
    };
    env.teardown(source).await;
    env.teardown(target).await;
    own
}

#[tokio::test]
async fn a_chain_moves_layer_by_layer_with_its_ids_file_to_block_to_file() {
    let mut env = Env::new(1024 * MIB).await;
    let size = 32 * MIB;
    let (file, block) = (env.file_domain.clone(), env.block_domain.clone());
    let export_dir = new_root(&env, "export1");
    let export = env
        .client
        .register_domain(register_req(
            "export",
            pb::DomainType::File,
            &export_dir,
            pb::DomainRole::Export,
        ))
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap()
        .domain_id;
    let source = three_layer_chain(&mut env, &file, size).await;

    // FILE -> BLOCK, then BLOCK -> FILE (an export domain), base first.
    for (from, to) in [(&file, &block), (&block, &export)] {
        for (i, v) in source.iter().enumerate() {
            let src = retarget(v, from);
            let src_vol = env
                .client
                .get_volume(pb::GetVolumeRequest {
                    r#ref: Some(src.clone()),
                })
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap();
            let (progress, copied) = env.copy(layer_copy(&src_vol, to)).await.unwrap();
            assert_eq!(*progress.last().unwrap(), size);
            assert_eq!(vref(&copied), retarget(v, to), "ids kept");
            assert_eq!(copied.parent_volume_id, v.parent_volume_id, "{from}->{to} #{i}");
            assert_eq!(copied.legality, pb::VolumeLegality::Legal as i32);
            assert_eq!(copied.capacity_bytes, size);
            let want_format = if i == 0 {
                v.format
            } else {
                pb::VolumeFormat::Cow as i32
            };
            assert_eq!(copied.format, want_format);
            let natural = if to == &block {
                pb::VolumeAllocation::Preallocated
            } else {
                pb::VolumeAllocation::Sparse
            };
            assert_eq!(copied.allocation, natural as i32);
            // Read through their chains, source and copy show the same.
            let fmt = if i == 0 { "raw" } else { "qcow2" };
            let (src_own, dst_own) = compare_views(&mut env, &vref(v), &vref(&copied), (fmt, fmt)).await;
            if i > 0 {
                // Only the layer was written: as much as the source's own.
                assert_eq!(dst_own, src_own, "{from}->{to} #{i}");
                assert!(dst_own <= 2 * MIB, "#{i} holds {dst_own} bytes of its own");
                // Its backing pointer is what a COW child made here gets.
                let p = env.prepare(&vref(&copied)).await;
                assert_eq!(backing_name(&p), v.parent_volume_id);
                env.teardown(&vref(&copied)).await;
            }
        }
    }
    // On the sparse FILE target the layers are small files too.
    let on_export = env.list(&export).await;
    assert_eq!(on_export.len(), 3);
    // (ListVolumes has no order: the layers are the volumes with a parent.)
    let layers: Vec<&pb::Volume> = on_export
        .iter()
        .filter(|v| !v.parent_volume_id.is_empty())
        .collect();
    assert_eq!(layers.len(), 2, "{on_export:?}");
    for v in layers {
        assert!(v.allocated_bytes <= 3 * MIB, "{v:?}");
    }
    // A COW child made the ordinary way on the same parent (on a FILE
    // DATA domain: nothing is created on an export domain but copies), for
    // reference: same backing pointer as the copied one.
    let mut req = new_volume(&file, size, pb::VolumeFormat::Cow);
    req.image_id = vref(&source[0]).image_id;
    req.parent_volume_id = vref(&source[0]).volume_id;
    let sibling = env.create(req).await.unwrap();
    let p = env.prepare(&vref(&sibling)).await;
    assert_eq!(backing_name(&p), vref(&source[0]).volume_id);

    assert_eq!(
        loops_over(&env.loop_dev.device),
        0,
        "copies tore down what they prepared"
    );
    let mut lvs = lv_names(&block);
    lvs.sort();
    let mut want: Vec<String> = source.iter().map(|v| vref(v).volume_id).collect();
    want.sort();
    assert_eq!(lvs, want, "exactly the three layers on BLOCK");
    assert!(env
        .list(&block)
        .await
        .iter()
        .all(|v| v.legality == pb::VolumeLegality::Legal as i32));
}

#[tokio::test]
async fn layer_copies_refuse_what_they_cannot_do_and_leave_nothing() {
    let mut env = Env::new(1024 * MIB).await;
    let size = 16 * MIB;
    let (file, block) = (env.file_domain.clone(), env.block_domain.clone());
    let chain = three_layer_chain(&mut env, &file, size).await;
    let (base, child) = (&chain[0], &chain[1]);

    // The parent is not on the target yet.
    let err = env.copy(layer_copy(child, &block)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let missing = format!("{block}/{}/{}", vref(base).image_id, vref(base).volume_id);
    assert_eq!(precondition_of(&err), ("PARENT_MISSING".into(), missing.clone()));
    // A layer has to be COW, and to name the image that holds its parent.
    let mut req = layer_copy(child, &block);
    req.target_format = pb::VolumeFormat::Raw as i32;
    let err = env.copy(req).await.unwrap_err();
    assert_eq!(
        (err.code(), field_of(&err).as_str()),
        (Code::InvalidArgument, "target_format")
    );
    let mut req = layer_copy(child, &block);
    req.target_image_id = String::new();
    let err = env.copy(req).await.unwrap_err();
    assert_eq!(
        (err.code(), field_of(&err).as_str()),
        (Code::InvalidArgument, "target_image_id")
    );

    // A base copied under a new id does not count as the parent.
    let (_, renamed) = env
        .copy(pb::CopyVolumeRequest {
            source: Some(vref(base)),
            target_domain_id: block.clone(),
            target_image_id: vref(base).image_id,
            keep_parent: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(renamed.parent_volume_id.is_empty(), "a base is copied whole");
    assert_ne!(vref(&renamed).volume_id, vref(base).volume_id);
    let err = env.copy(layer_copy(child, &block)).await.unwrap_err();
    assert_eq!(precondition_of(&err), ("PARENT_MISSING".into(), missing));
    env.client
        .delete_volume(pb::DeleteVolumeRequest {
            request_id: String::new(),
            r#ref: Some(vref(&renamed)),
        })
        .await
        .unwrap();
    assert!(env.list(&block).await.is_empty());
    assert!(lv_names(&block).is_empty());

    // keep_parent on a base without target ids is a plain whole copy.
    let (_, whole) = env
        .copy(pb::CopyVolumeRequest {
            source: Some(vref(base)),
            target_domain_id: block.clone(),
            target_format: pb::VolumeFormat::Cow as i32,
            keep_parent: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(whole.format, pb::VolumeFormat::Cow as i32);
    compare_views(&mut env, &vref(base), &vref(&whole), ("raw", "qcow2")).await;
    env.client
        .delete_volume(pb::DeleteVolumeRequest {
            request_id: String::new(),
            r#ref: Some(vref(&whole)),
        })
        .await
        .unwrap();

    // A retried layer copy acts once.
    env.copy(layer_copy(base, &block)).await.unwrap();
    let req = layer_copy(child, &block);
    let (_, first) = env.copy(req.clone()).await.unwrap();
    let (_, again) = env.copy(req).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(env.list(&block).await.len(), 2);

    // A layer copy that fails part-way (the source's base vanished behind
    // the service's back, so qemu-img cannot open the chain) leaves no
    // target.
    let base_file = env.prepare(&vref(base)).await;
    std::fs::rename(&base_file, base_file.with_extension("away")).unwrap();
    let grandchild = &chain[2];
    let mut req = layer_copy(grandchild, &file);
    req.target_domain_id = block.clone();
    let err = env.copy(req).await.unwrap_err();
    assert!(matches!(err.code(), Code::Internal | Code::NotFound), "{err:?}");
    std::fs::rename(base_file.with_extension("away"), &base_file).unwrap();
    let left: Vec<String> = env.list(&block).await.iter().map(|v| vref(v).volume_id).collect();
    assert_eq!(left.len(), 2, "only the base and the child: {left:?}");
    let mut lvs = lv_names(&block);
    lvs.sort();
    let mut want = left.clone();
    want.sort();
    assert_eq!(lvs, want);
    assert_eq!(loops_over(&env.loop_dev.device), 0);
}

async fn delete(env: &mut Env, r: &VolumeRef) -> Result<(), tonic::Status> {
    env.client
        .delete_volume(pb::DeleteVolumeRequest {
            request_id: String::new(),
            r#ref: Some(r.clone()),
        })
        .await
        .map(drop)
}

fn ref_string(r: &VolumeRef) -> String {
    format!("{}/{}/{}", r.domain_id, r.image_id, r.volume_id)
}

/// Asserts a VOLUME_IN_USE refusal of `r` that names `holder`.
fn assert_in_use(err: &tonic::Status, r: &VolumeRef, holder: &VolumeRef, what: &str) {
    assert_eq!(err.code(), Code::FailedPrecondition, "{what}: {err:?}");
    assert_eq!(
        precondition_of(err),
        ("VOLUME_IN_USE".into(), ref_string(r)),
        "{what}: {err:?}"
    );
    assert!(
        err.message().contains(&holder.volume_id),
        "{what}: the message names the holder {}: {err:?}",
        holder.volume_id
    );
}

#[tokio::test]
async fn deleting_a_volume_in_use_is_refused_also_after_a_restart() {
    let mut env = Env::new(1024 * MIB).await;
    for kind in KINDS {
        let domain = env.domain(kind);
        // A running guest's disk: base <- leaf (prepared), and a memory
        // dump volume being written (prepared).
        let base = vref(
            &env.create(new_volume(&domain, 16 * MIB, pb::VolumeFormat::Raw))
                .await
                .unwrap(),
        );
        let mut req = new_volume(&domain, 16 * MIB, pb::VolumeFormat::Cow);
        req.image_id = base.image_id.clone();
        req.parent_volume_id = base.volume_id.clone();
        let leaf = vref(&env.create(req).await.unwrap());
        let dump = vref(
            &env.create(new_volume(&domain, 16 * MIB, pb::VolumeFormat::Raw))
                .await
                .unwrap(),
        );
        let leaf_path = env.prepare(&leaf).await;
        let dump_path = env.prepare(&dump).await;

        for restarted in [false, true] {
            let when = format!("{kind:?}, restarted: {restarted}");
            let err = delete(&mut env, &dump).await.unwrap_err();
            assert_in_use(&err, &dump, &dump, &when);
            let err = delete(&mut env, &leaf).await.unwrap_err();
            assert_in_use(&err, &leaf, &leaf, &when);
            // The base is in use through the leaf's chain.
            let err = delete(&mut env, &base).await.unwrap_err();
            assert_in_use(&err, &base, &leaf, &when);
            // Merging the base would rewrite the leaf under the guest.
            let err = env
                .client
                .merge_volume(pb::MergeVolumeRequest {
                    request_id: String::new(),
                    r#ref: Some(base.clone()),
                })
                .await
                .unwrap_err();
            assert_in_use(&err, &base, &leaf, &when);
            assert!(leaf_path.exists() && dump_path.exists(), "{when}");
            if kind == pb::DomainType::Block {
                let lvs = lv_names(&domain);
                for r in [&base, &leaf, &dump] {
                    assert!(lvs.contains(&r.volume_id), "{when}: {lvs:?}");
                }
                assert_eq!(loops_over(&env.loop_dev.device), 3, "{when}: still active");
            }
            // The storage service restarts under the running guest: what
            // is prepared stays held.
            env.restart(env.config()).await;
        }

        // A teardown releases the hold.
        env.teardown(&dump).await;
        delete(&mut env, &dump).await.unwrap();
        env.teardown(&leaf).await;
        delete(&mut env, &leaf).await.unwrap();
        delete(&mut env, &base).await.unwrap();
        assert!(env.list(&domain).await.is_empty(), "{kind:?}");
    }
    assert!(lv_names(&env.block_domain).is_empty());
    assert_eq!(settled_loops_over(&env.loop_dev.device, 0), 0);
}

#[tokio::test]
async fn a_teardown_keeps_what_another_prepared_volume_needs() {
    let mut env = Env::new(512 * MIB).await;
    let domain = env.block_domain.clone();
    let base = vref(
        &env.create(new_volume(&domain, 16 * MIB, pb::VolumeFormat::Raw))
            .await
            .unwrap(),
    );
    let mut req = new_volume(&domain, 16 * MIB, pb::VolumeFormat::Cow);
    req.image_id = base.image_id.clone();
    req.parent_volume_id = base.volume_id.clone();
    let leaf = vref(&env.create(req).await.unwrap());
    // A guest runs on the base; a snapshot's overlay is prepared on top,
    // then given up (the snapshot failed): the guest's base stays active.
    let pv = env.loop_dev.device.clone();
    let base_path = env.prepare(&base).await;
    let leaf_path = env.prepare(&leaf).await;
    assert_eq!(loops_over(&pv), 2);
    env.teardown(&leaf).await;
    assert!(bound_over(&base_path, &pv), "the base is still prepared");
    assert!(!leaf_path.exists(), "the leaf is torn down");
    assert_eq!(settled_loops_over(&pv, 1), 1);
    // And the other way round: the base's own teardown keeps it active
    // while the leaf (prepared on it) needs it.
    let leaf_path = env.prepare(&leaf).await;
    env.teardown(&base).await;
    assert!(bound_over(&base_path, &pv), "the leaf needs its base");
    assert!(bound_over(&leaf_path, &pv));
    assert_eq!(loops_over(&pv), 2);
    let err = delete(&mut env, &base).await.unwrap_err();
    assert_in_use(&err, &base, &leaf, "base under a prepared leaf");
    env.teardown(&leaf).await;
    assert!(!base_path.exists() && !leaf_path.exists());
    assert_eq!(settled_loops_over(&pv, 0), 0);
}

/// Bytes of `path` (a prepared volume) that contain `needle`, as offsets.
fn find_all(path: &std::path::Path, needle: &[u8]) -> Vec<usize> {
    let data = std::fs::read(path).unwrap();
    data.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .take(8)
        .collect()
}

const OLD: &[u8] = b"OLD-DATA";

/// Fills a prepared volume with OLD-DATA, end to end.
fn fill_old(path: &std::path::Path, size: u64) {
    let chunk: Vec<u8> = OLD.iter().copied().cycle().take(MIB as usize).collect();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for off in (0..size).step_by(MIB as usize) {
        f.write_all_at(&chunk, off).unwrap();
    }
    f.sync_all().unwrap();
}

#[tokio::test]
async fn a_new_block_volume_never_shows_a_deleted_volumes_data() {
    let mut env = Env::new(512 * MIB).await;
    let domain = env.block_domain.clone();
    // A base with data of its own, for the COW child below.
    let base = vref(
        &env.create(new_volume(&domain, 8 * MIB, pb::VolumeFormat::Raw))
            .await
            .unwrap(),
    );
    let p = env.prepare(&base).await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all_at(b"BASE-DATA", 4096)
        .unwrap();
    env.teardown(&base).await;

    let size = 32 * MIB;
    // (format, parent) of the volume made over the deleted one's extents.
    let cases = [
        (pb::VolumeFormat::Raw, None),
        (pb::VolumeFormat::Cow, None),
        (pb::VolumeFormat::Cow, Some(base.clone())),
    ];
    for (format, parent) in cases {
        let what = format!("{format:?}, parent: {}", parent.is_some());
        // A guest wrote its data; the volume is deleted.
        let old = vref(
            &env.create(new_volume(&domain, size, pb::VolumeFormat::Raw))
                .await
                .unwrap(),
        );
        let p = env.prepare(&old).await;
        fill_old(&p, size);
        assert!(!find_all(&p, OLD).is_empty());
        env.teardown(&old).await;
        let extent = lv_first_pe(&domain, &old.volume_id);
        delete(&mut env, &old).await.unwrap();

        // The next volume gets the same extents.
        let mut req = new_volume(&domain, if parent.is_some() { 8 * MIB } else { size }, format);
        if let Some(p) = &parent {
            req.image_id = p.image_id.clone();
            req.parent_volume_id = p.volume_id.clone();
        }
        let new = vref(&env.create(req).await.unwrap());
        assert_eq!(
            lv_first_pe(&domain, &new.volume_id),
            extent,
            "{what}: reuses the extents"
        );
        let p = env.prepare(&new).await;
        // Nothing of the old data, anywhere in the LV.
        assert_eq!(find_all(&p, OLD), Vec::<usize>::new(), "{what}");
        match (format, &parent) {
            (pb::VolumeFormat::Raw, _) => {
                assert!(read_all(&p, size).iter().all(|&b| b == 0), "{what}: all zeros");
            }
            (_, None) => {
                // A valid, empty qcow2 reading as zeros.
                qemu(&["qemu-img", "check", "-f", "qcow2", p.to_str().unwrap()]);
                let out = qemu(&[
                    "qemu-io",
                    "-r",
                    "-f",
                    "qcow2",
                    "-c",
                    "read -P 0 0 32M",
                    p.to_str().unwrap(),
                ]);
                assert!(!out.contains("Pattern verification failed"), "{what}: {out}");
            }
            (_, Some(_)) => {
                // Reads as its parent: the base's data, zeros elsewhere.
                let out = qemu(&[
                    "qemu-io",
                    "-r",
                    "-f",
                    "qcow2",
                    "-c",
                    "read -v 4096 9",
                    "-c",
                    "read -P 0 1M 7M",
                    p.to_str().unwrap(),
                ]);
                assert!(out.contains("42 41 53 45 2d 44 41 54 41"), "{what}: {out}");
                assert!(!out.contains("Pattern verification failed"), "{what}: {out}");
            }
        }
        env.teardown(&new).await;
        delete(&mut env, &new).await.unwrap();
    }

    // A snapshot's memory volumes, made together (one pvs for both
    // extents, one lvchange for both flips): the dump takes a deleted
    // volume's extents, and both read as zeros.
    let dump_size = 240 * MIB;
    let old = vref(
        &env.create(new_volume(&domain, dump_size, pb::VolumeFormat::Raw))
            .await
            .unwrap(),
    );
    let p = env.prepare(&old).await;
    fill_old(&p, dump_size);
    env.teardown(&old).await;
    let extent = lv_first_pe(&domain, &old.volume_id);
    delete(&mut env, &old).await.unwrap();
    let made = env
        .client
        .create_memory_volumes(pb::CreateMemoryVolumesRequest {
            request_id: Uuid::new_v4().to_string(),
            domain_id: domain.clone(),
            memory_bytes: 40 * MIB,
            mode: pb::MemoryDumpMode::Paused as i32,
            description: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let (dump, meta) = (made.dump.unwrap(), made.metadata.unwrap());
    assert_eq!(dump.capacity_bytes, dump_size);
    assert_eq!(
        lv_first_pe(&domain, &vref(&dump).volume_id),
        extent,
        "the dump reuses the extents"
    );
    for v in [&dump, &meta] {
        assert_eq!(v.legality, pb::VolumeLegality::Legal as i32);
        let p = env.prepare(&vref(v)).await;
        assert!(
            read_all(&p, v.capacity_bytes).iter().all(|&b| b == 0),
            "{:?}: all zeros",
            v.purpose
        );
        env.teardown(&vref(v)).await;
    }
}

#[tokio::test]
async fn registering_a_device_outside_the_configuration_is_denied_and_writes_nothing() {
    let mut env = Env::new(256 * MIB).await;
    let spare_dir = env.dir.path().join("spare");
    std::fs::create_dir_all(&spare_dir).unwrap();
    let spare = LoopDevice::new(&spare_dir, 64 * MIB);
    let dev = spare.device.display().to_string();
    for location in [dev.clone(), "/dev/ramsnap-test-no-such-device".to_string()] {
        let err = env
            .client
            .register_domain(pb::RegisterDomainRequest {
                name: "intruder".into(),
                r#type: pb::DomainType::Block as i32,
                location: location.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{location}: {err:?}");
        assert_eq!(
            error_info_of(&err),
            ("BLOCK_DEVICE_NOT_ALLOWED".into(), location.clone()),
            "{err:?}"
        );
    }
    // Nothing was written to the device: no label, no signature, zeros.
    let head = read_all(&spare_dir.join("pv.img"), MIB);
    assert!(head.iter().all(|&b| b == 0), "the device was written to");
    let out = std::process::Command::new("blkid")
        .arg("-p")
        .arg(&spare.device)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let ids: Vec<String> = env
        .client
        .list_domains(pb::ListDomainsRequest {})
        .await
        .unwrap()
        .into_inner()
        .domains
        .into_iter()
        .map(|d| d.domain_id)
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");

    // Once the configuration lists it, the same device is taken.
    let mut config = env.config();
    config.block_devices.push(spare.device.clone());
    env.restart(config).await;
    let d = env.register("spare", pb::DomainType::Block, &dev).await;
    assert_eq!(d.location, dev);
}

#[tokio::test]
async fn a_device_that_cannot_be_probed_is_not_blank() {
    let mut env = Env::new(256 * MIB).await;
    let dead = DeadDevice::new();
    let mut config = env.config();
    config.block_devices.push(dead.path.clone());
    env.restart(config).await;
    let location = dead.path.display().to_string();
    let err = env
        .client
        .register_domain(pb::RegisterDomainRequest {
            name: "unprobed".into(),
            r#type: pb::DomainType::Block as i32,
            location: location.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(precondition_of(&err), ("DEVICE_NOT_EMPTY".into(), location));
    assert!(err.message().contains("could not be read"), "{err:?}");
}

/// No error about caller input may be INTERNAL, nor carry a tool's
/// command line or a host path.
fn assert_clean(err: &tonic::Status, env: &Env, what: &str) {
    assert_ne!(err.code(), Code::Internal, "{what}: {err:?}");
    let msg = err.message();
    for leak in ["lvcreate", "qemu-img", "--config", "losetup", "/dev/loop"] {
        assert!(!msg.contains(leak), "{what}: {leak} in {msg:?}");
    }
    assert!(
        !msg.contains(env.dir.path().to_str().unwrap()),
        "{what}: a host path in {msg:?}"
    );
}

#[tokio::test]
async fn volumes_are_not_created_on_export_domains() {
    let mut env = Env::new(256 * MIB).await;
    let dir = env.dir.path().join("roots/export1");
    std::fs::create_dir_all(&dir).unwrap();
    let export = env
        .client
        .register_domain(pb::RegisterDomainRequest {
            name: "export".into(),
            r#type: pb::DomainType::File as i32,
            location: dir.display().to_string(),
            role: pb::DomainRole::Export as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap()
        .domain_id;
    let err = env
        .create(new_volume(&export, 4 * MIB, pb::VolumeFormat::Cow))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(precondition_of(&err), ("EXPORT_DOMAIN".into(), export.clone()));
    let err = env
        .client
        .create_memory_volumes(pb::CreateMemoryVolumesRequest {
            domain_id: export.clone(),
            memory_bytes: 64 * MIB,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(precondition_of(&err), ("EXPORT_DOMAIN".into(), export.clone()));
    assert!(env.list(&export).await.is_empty());
    // Copies are what an export domain receives.
    let data = env
        .create(new_volume(
            &env.file_domain.clone(),
            4 * MIB,
            pb::VolumeFormat::Raw,
        ))
        .await
        .unwrap();
    env.copy(pb::CopyVolumeRequest {
        source: Some(vref(&data)),
        target_domain_id: export.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(env.list(&export).await.len(), 1);
}

#[tokio::test]
async fn hostile_input_gets_field_errors_never_internal() {
    let mut env = Env::new(512 * MIB).await;
    let block = env.block_domain.clone();
    for kind in KINDS {
        let domain = env.domain(kind);
        // Capacities: whole sectors only.
        for capacity in [1, 511, 513, 4 * MIB + 1] {
            let err = env
                .create(new_volume(&domain, capacity, pb::VolumeFormat::Raw))
                .await
                .unwrap_err();
            let what = format!("{kind:?} capacity {capacity}");
            assert_eq!(
                (err.code(), field_of(&err).as_str()),
                (Code::InvalidArgument, "capacity_bytes"),
                "{what}: {err:?}"
            );
            assert_clean(&err, &env, &what);
            let err = env
                .create(new_volume(&domain, capacity, pb::VolumeFormat::Cow))
                .await
                .unwrap_err();
            assert_eq!(field_of(&err), "capacity_bytes", "{what} COW: {err:?}");
        }
        // Descriptions: bounded, no control or bidi-override characters,
        // on every call that records one.
        let long = "d".repeat(501);
        for bad in [
            long.as_str(),
            "\u{1b}[2Jcleared",
            "forged\r\nline",
            "new\nline",
            "nul\0byte",
            "gnp.exe\u{202E}",
            "isolate\u{2066}x\u{2069}",
        ] {
            let what = format!("{kind:?} description {:?}", &bad[..bad.len().min(20)]);
            let mut req = new_volume(&domain, MIB, pb::VolumeFormat::Raw);
            req.description = bad.into();
            let err = env.create(req).await.unwrap_err();
            assert_eq!(
                (err.code(), field_of(&err).as_str()),
                (Code::InvalidArgument, "description"),
                "{what}: {err:?}"
            );
            assert!(err.message().len() < 300, "{what}: {err:?}");
            let err = env
                .client
                .create_memory_volumes(pb::CreateMemoryVolumesRequest {
                    domain_id: domain.clone(),
                    memory_bytes: 16 * MIB,
                    description: bad.into(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(field_of(&err), "description", "{what}: {err:?}");
        }
        let mut ok = new_volume(&domain, MIB, pb::VolumeFormat::Raw);
        ok.description = format!("{} ünïcode שלום", "d".repeat(470));
        let src = env.create(ok).await.expect("a long, plain description");
        let err = env
            .copy(pb::CopyVolumeRequest {
                source: Some(vref(&src)),
                target_domain_id: domain.clone(),
                description: "copy\u{1b}]0;title\u{7}".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(field_of(&err), "description", "{kind:?}: {err:?}");
        // Ids: an 8 KiB id is refused without being repeated.
        let huge = "x".repeat(8192);
        let mut req = new_volume(&domain, MIB, pb::VolumeFormat::Raw);
        req.volume_id = huge.clone();
        let err = env.create(req).await.unwrap_err();
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, "volume_id")
        );
        assert!(
            err.message().len() < 200,
            "{} bytes: {err:?}",
            err.message().len()
        );
        let err = env
            .client
            .get_volume(pb::GetVolumeRequest {
                r#ref: Some(VolumeRef {
                    domain_id: domain.clone(),
                    image_id: huge.clone(),
                    volume_id: huge.clone(),
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(field_of(&err), "ref.image_id");
        assert!(err.message().len() < 200, "{err:?}");
        delete(&mut env, &vref(&src)).await.unwrap();
        assert!(env.list(&domain).await.is_empty(), "{kind:?}: nothing half-made");
    }

    // A volume id taken in another image: the LV name is taken on BLOCK.
    let first = env
        .create(new_volume(&block, 4 * MIB, pb::VolumeFormat::Raw))
        .await
        .unwrap();
    let mut req = new_volume(&block, 4 * MIB, pb::VolumeFormat::Cow);
    req.volume_id = vref(&first).volume_id;
    let err = env.create(req).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(resource_of(&err), ("volume".into(), ref_string(&vref(&first))));
    assert_clean(&err, &env, "duplicate volume id");
    assert_eq!(
        lv_names(&block),
        vec![vref(&first).volume_id],
        "nothing half-made"
    );

    // Registration: a domain id taken by another domain; a location of
    // 8 KiB; one through a symlink out of the roots (its target is not
    // revealed).
    let nfs2 = env.dir.path().join("roots/nfs2");
    std::fs::create_dir_all(&nfs2).unwrap();
    let err = env
        .client
        .register_domain(pb::RegisterDomainRequest {
            domain_id: block.clone(),
            name: "twin".into(),
            r#type: pb::DomainType::File as i32,
            location: nfs2.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(
        std::fs::read_dir(&nfs2).unwrap().next().is_none(),
        "no domain laid out"
    );
    let link = env.dir.path().join("roots/elsewhere");
    std::os::unix::fs::symlink("/usr/share", &link).unwrap();
    // A BLOCK location of 4000 bytes: denied, and not repeated whole.
    let err = env
        .client
        .register_domain(pb::RegisterDomainRequest {
            name: "x".into(),
            r#type: pb::DomainType::Block as i32,
            location: format!("/dev/{}", "a".repeat(4000)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().len() < 300, "{err:?}");
    for location in [format!("/{}", "a".repeat(8192)), link.display().to_string()] {
        let err = env
            .client
            .register_domain(pb::RegisterDomainRequest {
                name: "x".into(),
                r#type: pb::DomainType::File as i32,
                location: location.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(field_of(&err), "location", "{err:?}");
        assert!(err.message().len() < 300, "{err:?}");
        assert!(!err.message().contains("/usr/share"), "{err:?}");
    }
}

/// A FILE domain finds the volume of a request through its request index
/// (`dom_md/requests`), not by reading every volume's metadata: the index
/// is built once for a domain laid out before it, follows deletes, and a
/// link left naming nothing (a crash between the link and the volume) is
/// no match.
#[tokio::test]
async fn a_file_domain_finds_a_request_through_its_index() {
    let mut env = Env::new(1024 * MIB).await;
    let domain = env.domain(pb::DomainType::File);
    let location = env
        .client
        .get_domain(pb::GetDomainRequest {
            domain_id: domain.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap()
        .location;
    let index = std::path::Path::new(&location)
        .join(&domain)
        .join("dom_md/requests");
    let mut req = new_volume(&domain, 8 * MIB, pb::VolumeFormat::Raw);
    let request = Uuid::new_v4();
    req.request_id = request.to_string();
    let a = env.create(req.clone()).await.unwrap();
    assert!(index.join(".complete").exists());
    let link = index.join(request.to_string());
    let r = vref(&a);
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        std::path::PathBuf::from(format!("{}/{}", r.image_id, r.volume_id))
    );

    // A domain from before the index: built from a scan on first use.
    std::fs::remove_dir_all(&index).unwrap();
    assert_eq!(
        env.create(req.clone()).await.unwrap().r#ref,
        a.r#ref,
        "the retry finds it"
    );
    assert!(std::fs::symlink_metadata(&link).is_ok() && index.join(".complete").exists());

    // Deleted: the link goes with it, and the request makes a new volume.
    env.client
        .delete_volume(pb::DeleteVolumeRequest {
            request_id: String::new(),
            r#ref: Some(r.clone()),
        })
        .await
        .unwrap();
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "the link went with the volume"
    );
    let b = env.create(req.clone()).await.unwrap();
    assert_ne!(b.r#ref, a.r#ref);

    // A link naming nothing (or garbage) is no match.
    let stale = Uuid::new_v4();
    std::os::unix::fs::symlink(
        format!("{}/{}", Uuid::new_v4(), Uuid::new_v4()),
        index.join(stale.to_string()),
    )
    .unwrap();
    let garbage = Uuid::new_v4();
    std::os::unix::fs::symlink("../../etc/passwd", index.join(garbage.to_string())).unwrap();
    for r in [stale, garbage] {
        let mut q = new_volume(&domain, 8 * MIB, pb::VolumeFormat::Raw);
        q.request_id = r.to_string();
        let made = env.create(q.clone()).await.unwrap();
        assert_eq!(env.create(q).await.unwrap().r#ref, made.r#ref);
    }
    assert_eq!(env.list(&domain).await.len(), 3);
}

/// Creations on a FILE domain run side by side (image and request locks,
/// not one lock per domain), and still act once per request id.
#[tokio::test]
async fn concurrent_creates_on_one_file_domain_act_once_per_request() {
    let mut env = Env::new(1024 * MIB).await;
    let domain = env.domain(pb::DomainType::File);
    let mut same = new_volume(&domain, 8 * MIB, pb::VolumeFormat::Raw);
    same.request_id = Uuid::new_v4().to_string();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..32 {
        let mut client = env.client.clone();
        let req = if i % 2 == 0 {
            same.clone()
        } else {
            let mut r = new_volume(&domain, 8 * MIB, pb::VolumeFormat::Raw);
            r.request_id = Uuid::new_v4().to_string();
            r
        };
        set.spawn(async move {
            (
                i % 2 == 0,
                client
                    .create_volume(req)
                    .await
                    .unwrap()
                    .into_inner()
                    .volume
                    .unwrap(),
            )
        });
    }
    let mut refs_of_same = std::collections::HashSet::new();
    while let Some(r) = set.join_next().await {
        let (is_same, v) = r.unwrap();
        if is_same {
            refs_of_same.insert(format!("{:?}", v.r#ref));
        }
    }
    assert_eq!(refs_of_same.len(), 1, "one volume for the repeated request");
    assert_eq!(env.list(&domain).await.len(), 17);
}

/// The final message of a copy: its volume and checksum.
async fn copy_with_checksum(
    env: &mut Env,
    req: pb::CopyVolumeRequest,
) -> Result<(pb::Volume, String), tonic::Status> {
    let mut stream = env.client.copy_volume(req).await?.into_inner();
    while let Some(msg) = stream.message().await? {
        if let Some(v) = msg.volume {
            return Ok((v, msg.checksum));
        }
    }
    panic!("copy stream ended without a volume");
}

#[tokio::test]
async fn a_copy_checksum_is_what_was_written_and_bad_asks_leave_nothing() {
    use ramsnap_common::checksum::{digest_file, Algorithm};
    let mut env = Env::new(512 * MIB).await;
    let (file, block) = (env.file_domain.clone(), env.block_domain.clone());
    let raw = env
        .create(new_volume(&file, 8 * MIB, pb::VolumeFormat::Raw))
        .await
        .unwrap();
    let path = env.prepare(&vref(&raw)).await;
    let expected = fill_pattern(&path, 8 * MIB);
    assert_eq!(expected.len() as u64, 8 * MIB);
    let want = digest_file(&path, 8 * MIB, Algorithm::Blake3Chunks)
        .unwrap()
        .checksum;

    // Asked for, on a RAW copy to BLOCK: the checksum of what the target holds.
    let req = pb::CopyVolumeRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        source: Some(vref(&raw)),
        target_domain_id: block.clone(),
        checksum_algorithm: "blake3-4m".into(),
        ..Default::default()
    };
    let (v, sum) = copy_with_checksum(&mut env, req.clone()).await.unwrap();
    assert_eq!(sum, want.to_string());
    let target = env.prepare(&vref(&v)).await;
    assert_eq!(
        digest_file(&target, 8 * MIB, Algorithm::Blake3Chunks)
            .unwrap()
            .checksum,
        want
    );
    env.teardown(&vref(&v)).await;
    // The same request again: the volume, no checksum (nothing was copied).
    let (again, sum) = copy_with_checksum(&mut env, req).await.unwrap();
    assert_eq!((vref(&again), sum.as_str()), (vref(&v), ""));

    // Hostile asks: an unknown algorithm, a huge value, a checksum of a COW
    // volume. Each is INVALID_ARGUMENT on the field; no volume is left.
    let before = env.list(&block).await.len();
    let cow = env
        .create(new_volume(&file, 8 * MIB, pb::VolumeFormat::Cow))
        .await
        .unwrap();
    for (source, algorithm) in [
        (&raw, "md5".to_string()),
        (&raw, "x".repeat(1 << 20)),
        (&cow, "blake3-4m".to_string()),
    ] {
        let err = copy_with_checksum(
            &mut env,
            pb::CopyVolumeRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                source: Some(vref(source)),
                target_domain_id: block.clone(),
                checksum_algorithm: algorithm.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{}: {err:?}",
            &algorithm[..algorithm.len().min(16)]
        );
        assert_eq!(field_of(&err), "checksum_algorithm");
        assert!(err.message().len() < 4096, "the value is not echoed whole");
        assert_eq!(env.list(&block).await.len(), before, "no target left");
    }
    assert_eq!(loops_over(&env.loop_dev.device), 0);
}

/// A FILE create writes the metadata once (LEGAL) and names the data when
/// it is complete. A crash between the two (the data still under its
/// staging name) leaves a visible ILLEGAL volume, as before: a retry of the
/// same request makes it again, and a delete leaves no file.
#[tokio::test]
async fn a_file_create_cut_before_its_data_is_named_reads_illegal_and_recovers() {
    let mut env = Env::new(1024 * MIB).await;
    let domain = env.domain(pb::DomainType::File);
    let location = get_domain(&mut env, &domain).await.location;
    let root = std::path::Path::new(&location).join(&domain).join("images");
    let files = |image: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(root.join(image))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let base = env
        .create(new_volume(&domain, 16 * MIB, pb::VolumeFormat::Raw))
        .await
        .unwrap();
    let image = vref(&base).image_id;
    // A preallocated COW child is refused before anything is made (qemu-img
    // would refuse it part-way).
    let mut bad = new_volume(&domain, 16 * MIB, pb::VolumeFormat::Cow);
    bad.allocation = pb::VolumeAllocation::Preallocated as i32;
    bad.image_id = image.clone();
    bad.parent_volume_id = vref(&base).volume_id;
    let err = env.create(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(field_of(&err), "allocation");
    assert_eq!(files(&image).len(), 2, "{:?}", files(&image));

    // The ways a FILE volume's data is written: a sparse COW child (written
    // by ramsnap), a preallocated COW volume (qemu-img), RAW.
    let mut parent = base.clone();
    for (format, allocation, child) in [
        (pb::VolumeFormat::Cow, pb::VolumeAllocation::Sparse, true),
        (pb::VolumeFormat::Cow, pb::VolumeAllocation::Preallocated, false),
        (pb::VolumeFormat::Raw, pb::VolumeAllocation::Sparse, false),
    ] {
        let mut req = new_volume(&domain, 16 * MIB, format);
        req.allocation = allocation as i32;
        if child {
            req.image_id = image.clone();
            req.parent_volume_id = vref(&parent).volume_id;
        } else {
            req.image_id = Uuid::new_v4().to_string();
        }
        req.request_id = Uuid::new_v4().to_string();
        // As the coordinator asks: the ids are chosen by the caller.
        req.volume_id = Uuid::new_v4().to_string();
        let made = env.create(req.clone()).await.unwrap();
        let r = vref(&made);
        assert_eq!(made.legality, pb::VolumeLegality::Legal as i32);
        let data = root.join(&r.image_id).join(&r.volume_id);
        let staging = root.join(&r.image_id).join(format!("{}.creating", r.volume_id));
        assert!(data.exists() && !staging.exists(), "{:?}", files(&r.image_id));

        // The crash: metadata written, data not yet named.
        std::fs::rename(&data, &staging).unwrap();
        let seen = env
            .client
            .get_volume(pb::GetVolumeRequest {
                r#ref: Some(r.clone()),
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(
            seen.legality,
            pb::VolumeLegality::Illegal as i32,
            "{allocation:?}"
        );
        let listed = env.list(&domain).await;
        assert!(
            listed
                .iter()
                .any(|v| v.r#ref == made.r#ref && v.legality == pb::VolumeLegality::Illegal as i32),
            "the cut volume is listed, ILLEGAL"
        );

        // The retry makes it again, complete, and leaves no staging file.
        let again = env.create(req).await.unwrap();
        assert_eq!(again.r#ref, made.r#ref);
        assert_eq!(again.legality, pb::VolumeLegality::Legal as i32);
        assert!(data.exists() && !staging.exists(), "{:?}", files(&r.image_id));
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(&data)
            .output()
            .unwrap();
        let info = String::from_utf8_lossy(&info.stdout);
        let qemu_format = if format == pb::VolumeFormat::Cow {
            "qcow2"
        } else {
            "raw"
        };
        assert!(info.contains(&format!("\"format\": \"{qemu_format}\"")), "{info}");
        assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
        if child {
            assert!(
                info.contains(&vref(&parent).volume_id),
                "a child of its parent: {info}"
            );
            parent = again;
        }
    }

    // Cut again, then deleted instead of retried: nothing is left of it.
    let leaf = vref(&parent);
    let data = root.join(&image).join(&leaf.volume_id);
    std::fs::rename(
        &data,
        root.join(&image).join(format!("{}.creating", leaf.volume_id)),
    )
    .unwrap();
    delete(&mut env, &leaf).await.unwrap();
    assert!(
        !files(&image).iter().any(|f| f.starts_with(&leaf.volume_id)),
        "{:?}",
        files(&image)
    );
    assert_eq!(env.list(&domain).await.len(), 3, "the base and the two others");
}

/// The domain-writer fence (see `ramsnap_snapshot::writers`): a metadata
/// change stamped with a writer generation lower than the highest recorded
/// on the domain is refused, and nothing is made; a higher one is recorded
/// on the domain, where a restarted service (another host) finds it; an
/// unstamped call (an operator's) is not checked; a malformed stamp is
/// INVALID_ARGUMENT naming the header.
#[tokio::test]
async fn metadata_changes_under_a_replaced_writer_are_refused() {
    use ramsnap_common::fence::WRITER_HEADER;
    let mut env = Env::new(1024 * MIB).await;
    let stamped = |req: pb::CreateVolumeRequest, g: &str| {
        let mut r = tonic::Request::new(req);
        r.metadata_mut().insert(WRITER_HEADER, g.parse().unwrap());
        r
    };
    for kind in KINDS {
        let domain = env.domain(kind);
        let first = env
            .client
            .create_volume(stamped(new_volume(&domain, MIB, pb::VolumeFormat::Raw), "1"))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        env.client
            .create_volume(stamped(new_volume(&domain, MIB, pb::VolumeFormat::Raw), "3"))
            .await
            .unwrap();
        let before = env.list(&domain).await.len();
        let refused = env
            .client
            .create_volume(stamped(new_volume(&domain, MIB, pb::VolumeFormat::Raw), "2"))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{kind:?}: {refused:?}");
        assert_eq!(
            precondition_of(&refused),
            ("STALE_WRITER".to_string(), format!("storage_domain/{domain}")),
            "{kind:?}"
        );
        let mut delete = tonic::Request::new(pb::DeleteVolumeRequest {
            request_id: String::new(),
            r#ref: Some(vref(&first)),
        });
        delete.metadata_mut().insert(WRITER_HEADER, "2".parse().unwrap());
        let refused = env.client.delete_volume(delete).await.unwrap_err();
        assert_eq!(precondition_of(&refused).0, "STALE_WRITER", "{kind:?}");
        let mut memory = tonic::Request::new(pb::CreateMemoryVolumesRequest {
            request_id: Uuid::new_v4().to_string(),
            domain_id: domain.clone(),
            memory_bytes: 16 * MIB,
            mode: pb::MemoryDumpMode::Paused as i32,
            description: String::new(),
        });
        memory.metadata_mut().insert(WRITER_HEADER, "2".parse().unwrap());
        let refused = env.client.create_memory_volumes(memory).await.unwrap_err();
        assert_eq!(precondition_of(&refused).0, "STALE_WRITER", "{kind:?}");
        let mut copy = tonic::Request::new(pb::CopyVolumeRequest {
            request_id: Uuid::new_v4().to_string(),
            source: Some(vref(&first)),
            target_domain_id: domain.clone(),
            ..Default::default()
        });
        copy.metadata_mut().insert(WRITER_HEADER, "2".parse().unwrap());
        let refused = env.client.copy_volume(copy).await.unwrap_err();
        assert_eq!(precondition_of(&refused).0, "STALE_WRITER", "{kind:?}");
        assert_eq!(
            env.list(&domain).await.len(),
            before,
            "{kind:?}: nothing made, nothing deleted"
        );
        let bad = env
            .client
            .create_volume(stamped(new_volume(&domain, MIB, pb::VolumeFormat::Raw), "-4"))
            .await
            .unwrap_err();
        assert_eq!(
            (bad.code(), field_of(&bad)),
            (Code::InvalidArgument, WRITER_HEADER.to_string())
        );
        // Unstamped: not checked.
        env.create(new_volume(&domain, MIB, pb::VolumeFormat::Raw))
            .await
            .unwrap();
    }
    // Recorded on the domains: a restarted service refuses generation 2 too.
    let config = env.config();
    env.restart(config).await;
    for kind in KINDS {
        let domain = env.domain(kind);
        let refused = env
            .client
            .create_volume(stamped(new_volume(&domain, MIB, pb::VolumeFormat::Raw), "2"))
            .await
            .unwrap_err();
        assert_eq!(
            precondition_of(&refused).0,
            "STALE_WRITER",
            "{kind:?} after a restart"
        );
    }
}

/// A child left ILLEGAL by a crash part-way through its create, in an image
/// that has other volumes, is made again by the retry of its request: what
/// the create read of the image first (one read on BLOCK, with the request)
/// no longer counts the volume the retry removed.
#[tokio::test]
async fn a_retried_child_left_illegal_in_its_image_is_made_again() {
    let mut env = Env::new(1024 * MIB).await;
    let domain = env.domain(pb::DomainType::Block);
    let base = env
        .create(new_volume(&domain, 8 * MIB, pb::VolumeFormat::Raw))
        .await
        .unwrap();
    let base_ref = vref(&base);
    let mut child = new_volume(&domain, 8 * MIB, pb::VolumeFormat::Cow);
    child.request_id = Uuid::new_v4().to_string();
    // Named by the caller (as the coordinator does): the retry makes the
    // same volume again.
    child.volume_id = Uuid::new_v4().to_string();
    child.image_id = base_ref.image_id.clone();
    child.parent_volume_id = base_ref.volume_id.clone();
    child.allocation = pb::VolumeAllocation::Preallocated as i32;
    let first = env.create(child.clone()).await.unwrap();
    // As a crash between the LV and its LEGAL tag leaves it.
    let lv = format!("{domain}/{}", vref(&first).volume_id);
    let out = std::process::Command::new("lvchange")
        .args([
            "--config",
            "global { activation = 0 }",
            "--deltag",
            "RS_LEGAL",
            "--addtag",
            "RS_ILLEGAL",
            &lv,
        ])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = env.list(&domain).await;
    let illegal = listed.iter().find(|v| v.r#ref == first.r#ref).unwrap();
    assert_eq!(illegal.legality, pb::VolumeLegality::Illegal as i32);

    let again = env.create(child).await.unwrap();
    assert_eq!(again.r#ref, first.r#ref);
    assert_eq!(again.legality, pb::VolumeLegality::Legal as i32);
    let listed = env.list(&domain).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
}

/// ListVolumes pages (AIP-158): 2,000 volumes of a FILE domain read page
/// by page while more are being created: each of the 2,000 exactly once,
/// in (image, volume) order, nothing twice; the purpose filter; a token
/// refused with another filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_are_listed_page_by_page_while_more_are_made() {
    use futures::StreamExt;
    let mut env = Env::new(64 * MIB).await;
    let domain = env.file_domain.clone();
    let t = std::time::Instant::now();
    let made: std::collections::BTreeSet<String> = futures::stream::iter(0..2000)
        .map(|_| {
            let mut c = env.client.clone();
            let req = new_volume(&domain, MIB, pb::VolumeFormat::Raw);
            async move { c.create_volume(req).await.unwrap().into_inner().volume.unwrap() }
        })
        .buffer_unordered(8)
        .map(|v| vref(&v).volume_id)
        .collect()
        .await;
    eprintln!("2,000 volumes made in {:.1} s", t.elapsed().as_secs_f64());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let maker = {
        let (stop, mut c, domain) = (stop.clone(), env.client.clone(), domain.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.create_volume(new_volume(&domain, MIB, pb::VolumeFormat::Raw))
                    .await
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    let list = |c: &mut pb::storage_service_client::StorageServiceClient<tonic::transport::Channel>,
                purpose: pb::VolumePurpose,
                page_size: i32,
                page_token: String| {
        let mut c = c.clone();
        let domain_id = domain.clone();
        async move {
            c.list_volumes(pb::ListVolumesRequest {
                domain_id,
                page_size,
                page_token,
                purpose: purpose as i32,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
        }
    };
    let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let page = list(&mut env.client, pb::VolumePurpose::Unspecified, 99, token)
            .await
            .unwrap();
        assert!(page.volumes.len() <= 99);
        pages += 1;
        seen.extend(page.volumes);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let extra = maker.await.unwrap();
    let keys: Vec<(String, String)> = seen
        .iter()
        .map(|v| (vref(v).image_id, vref(v).volume_id))
        .collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "twice, or out of (image, volume) order"
    );
    let ids: std::collections::BTreeSet<String> = keys.into_iter().map(|(_, v)| v).collect();
    assert!(made.iter().all(|id| ids.contains(id)), "a volume was missed");
    eprintln!("{} volumes in {pages} pages, {extra} made meanwhile", seen.len());

    // The purpose filter, and a token that keeps its filter.
    let pair = env
        .client
        .create_memory_volumes(pb::CreateMemoryVolumesRequest {
            domain_id: domain.clone(),
            memory_bytes: 16 * MIB,
            mode: pb::MemoryDumpMode::Paused as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let dumps = list(&mut env.client, pb::VolumePurpose::MemoryDump, 0, String::new())
        .await
        .unwrap();
    assert_eq!(dumps.volumes.len(), 1);
    assert_eq!(dumps.volumes[0].r#ref, pair.dump.unwrap().r#ref);
    let first = list(&mut env.client, pb::VolumePurpose::Disk, 10, String::new())
        .await
        .unwrap();
    assert_eq!(first.volumes.len(), 10);
    let err = list(
        &mut env.client,
        pb::VolumePurpose::MemoryDump,
        10,
        first.next_page_token,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(field_of(&err), "page_token");
    let err = list(&mut env.client, pb::VolumePurpose::Disk, -5, String::new())
        .await
        .unwrap_err();
    assert_eq!(field_of(&err), "page_size");
}

/// An oVirt 3.3 export domain laid out as VDSM lays one out (see
/// `ramsnap_storage::ovirt`): a RAW base, a qcow2 child naming it as
/// `../<image>/<base>`, and an OVF. Returns (domain id, image, base, leaf).
fn ovirt_domain(location: &std::path::Path, class: &str, pool: &str) -> (Uuid, Uuid, Uuid, Uuid) {
    use ramsnap_common::ovirt::meta;
    let (sd, image, base, leaf) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let dir = location.join(sd.to_string());
    let img = dir.join(format!("images/{image}"));
    for d in ["dom_md", "master/vms", "master/tasks"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::create_dir_all(&img).unwrap();
    let keys = [
        ("CLASS", class),
        ("DESCRIPTION", "export1"),
        ("IOOPTIMEOUTSEC", "10"),
        ("LEASERETRIES", "3"),
        ("LEASETIMESEC", "60"),
        ("LOCKPOLICY", ""),
        ("LOCKRENEWALINTERVALSEC", "5"),
        ("POOL_UUID", pool),
        ("REMOTE_PATH", "nfs.example.com:/exports/export1"),
        ("ROLE", "Regular"),
        ("TYPE", "NFS"),
        ("VERSION", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain([("SDUUID".to_string(), sd.to_string())])
    .collect();
    std::fs::write(dir.join("dom_md/metadata"), meta::write_domain(&keys).unwrap()).unwrap();
    let sh = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img")
            .current_dir(&img)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    sh(&["create", "-q", "-f", "raw", &base.to_string(), "8M"]);
    let base_path = img.join(base.to_string()).display().to_string();
    qemu(&["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", &base_path]);
    let backing = format!("../{image}/{base}");
    sh(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        &backing,
        "-F",
        "raw",
        &leaf.to_string(),
        "8M",
    ]);
    qemu_io(&img.join(leaf.to_string()), &["write -P 0xa5 1M 1M"]);
    for (v, parent, format, voltype) in [
        (base, Uuid::nil(), "RAW", "INTERNAL"),
        (leaf, base, "COW", "LEAF"),
    ] {
        let text = meta::write_volume(&[
            ("DOMAIN", sd.to_string()),
            ("VOLTYPE", voltype.into()),
            ("CTIME", "1380000000".into()),
            ("FORMAT", format.into()),
            ("IMAGE", image.to_string()),
            ("DISKTYPE", "2".into()),
            ("PUUID", parent.to_string()),
            ("LEGALITY", "LEGAL".into()),
            ("MTIME", "0".into()),
            ("POOL_UUID", String::new()),
            ("SIZE", (8 * MIB / 512).to_string()),
            ("TYPE", "SPARSE".into()),
            ("DESCRIPTION", String::new()),
        ])
        .unwrap();
        std::fs::write(img.join(format!("{v}.meta")), text).unwrap();
    }
    let vm = Uuid::new_v4();
    std::fs::create_dir_all(dir.join(format!("master/vms/{vm}"))).unwrap();
    std::fs::write(dir.join(format!("master/vms/{vm}/{vm}.ovf")), "<ovf:Envelope/>").unwrap();
    (sd, image, base, leaf)
}

/// Every file under `dir` with its content: what "unchanged" means.
fn tree(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
                out.push((p.display().to_string(), Vec::new()));
            } else {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn ovirt_export_domains_are_adopted_read_only() {
    let mut env = Env::new(256 * MIB).await;
    let location = new_root(&env, "ovirt1");
    // Attached to an oVirt data center: read only.
    let pool = Uuid::new_v4().to_string();
    let (sd, image, base, leaf) = ovirt_domain(std::path::Path::new(&location), "Backup", &pool);
    let before = tree(std::path::Path::new(&location));
    let resp = env
        .client
        .register_domain(register_req(
            "whatever",
            pb::DomainType::File,
            &location,
            pb::DomainRole::Unspecified,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.adopted);
    let d = resp.domain.unwrap();
    assert_eq!(d.domain_id, sd.to_string());
    assert_eq!(
        (d.role(), d.format()),
        (pb::DomainRole::Export, pb::DomainFormat::Ovirt)
    );
    assert_eq!(
        (d.name.as_str(), d.metadata_version, d.read_only),
        ("export1", 0, true)
    );
    let domain = d.domain_id.clone();

    // The volumes as their .meta files say.
    let vols = env.list(&domain).await;
    assert_eq!(vols.len(), 2, "{vols:?}");
    let of = |v: Uuid| {
        vols.iter()
            .find(|x| vref(x).volume_id == v.to_string())
            .unwrap()
            .clone()
    };
    let (b, l) = (of(base), of(leaf));
    assert_eq!(
        (b.format(), b.parent_volume_id.as_str()),
        (pb::VolumeFormat::Raw, "")
    );
    assert_eq!(
        (l.format(), l.parent_volume_id.clone()),
        (pb::VolumeFormat::Cow, base.to_string())
    );
    assert!(vols
        .iter()
        .all(|v| v.capacity_bytes == 8 * MIB && v.legality() == pb::VolumeLegality::Legal));
    assert_eq!(l.created_at, 1_380_000_000);

    // Copied out: layer by layer with ids kept, and collapsed; the same
    // guest view as the oVirt chain.
    let file = env.file_domain.clone();
    env.copy(layer_copy(&b, &file)).await.unwrap();
    let (_, layer) = env.copy(layer_copy(&l, &file)).await.unwrap();
    let (_, whole) = env
        .copy(pb::CopyVolumeRequest {
            source: Some(vref(&l)),
            target_domain_id: file.clone(),
            target_format: pb::VolumeFormat::Raw as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let src = env.prepare(&vref(&l)).await;
    for copy in [&layer, &whole] {
        let path = env.prepare(&vref(copy)).await;
        let out = std::process::Command::new("qemu-img")
            .arg("compare")
            .arg(&src)
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    }
    env.teardown(&vref(&l)).await;
    // A RAW disk copied whole may become a memory volume; a COW one not.
    let (_, as_dump) = env
        .copy(pb::CopyVolumeRequest {
            source: Some(vref(&b)),
            target_domain_id: file.clone(),
            target_purpose: pb::VolumePurpose::MemoryDump as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(as_dump.purpose(), pb::VolumePurpose::MemoryDump);
    let err = env
        .copy(pb::CopyVolumeRequest {
            source: Some(vref(&l)),
            target_domain_id: file.clone(),
            target_purpose: pb::VolumePurpose::MemoryMetadata as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), field_of(&err).as_str()),
        (Code::InvalidArgument, "target_purpose")
    );
    let err = env
        .copy(pb::CopyVolumeRequest {
            source: Some(vref(&as_dump)),
            target_domain_id: file.clone(),
            target_purpose: pb::VolumePurpose::Disk as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), field_of(&err).as_str()),
        (Code::InvalidArgument, "target_purpose")
    );

    // Nothing is written to it.
    let read_only = |err: tonic::Status, what: &str| {
        assert_eq!(err.code(), Code::FailedPrecondition, "{what}: {err:?}");
        assert_eq!(precondition_of(&err).0, "DOMAIN_READ_ONLY", "{what}: {err:?}");
    };
    let err = env
        .client
        .delete_volume(pb::DeleteVolumeRequest {
            request_id: Uuid::new_v4().to_string(),
            r#ref: Some(vref(&l)),
        })
        .await
        .unwrap_err();
    read_only(err, "DeleteVolume");
    let err = env
        .copy(pb::CopyVolumeRequest {
            source: Some(vref(&whole)),
            target_domain_id: domain.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    read_only(err, "CopyVolume onto it");
    let vm = Uuid::new_v4().to_string();
    let err = env
        .client
        .put_vm_descriptor(put_req(&domain, &vm, "<ovf/>"))
        .await
        .unwrap_err();
    read_only(err, "PutVmDescriptor");
    let listed = env
        .client
        .list_vm_descriptors(pb::ListVmDescriptorsRequest {
            domain_id: domain.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.descriptors.len(), 1, "its OVF is listed: {listed:?}");
    env.restart(env.config()).await;
    assert_eq!(env.list(&domain).await.len(), 2, "rediscovered after a restart");
    assert!(
        tree(std::path::Path::new(&location)) == before,
        "registering, listing, copying out and refusing changed nothing on the oVirt domain"
    );

    // A volume file that is a link to a host file: refused by name.
    let img = std::path::Path::new(&location).join(format!("{sd}/images/{image}"));
    let leaf_file = img.join(leaf.to_string());
    std::fs::rename(&leaf_file, img.join("moved")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", &leaf_file).unwrap();
    let err = env
        .client
        .list_volumes(pb::ListVolumesRequest {
            domain_id: domain.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(precondition_of(&err).0, "OVIRT_VOLUME_INVALID", "{err:?}");
    assert!(err.message().contains("not a regular file"), "{err:?}");
    // An OVF that is a link to a host file: not read.
    let ovf_dir = std::path::Path::new(&location).join(format!("{sd}/master/vms"));
    let linked = Uuid::new_v4();
    std::fs::create_dir_all(ovf_dir.join(linked.to_string())).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", ovf_dir.join(format!("{linked}/{linked}.ovf"))).unwrap();
    let err = env
        .client
        .get_vm_descriptor(pb::GetVmDescriptorRequest {
            domain_id: domain.clone(),
            vm_id: linked.to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(precondition_of(&err).0, "DESCRIPTOR_INVALID", "{err:?}");
    assert!(!err.message().contains("root:"), "{err:?}");

    // Broken checksum; a data domain: not registered.
    let tampered_at = new_root(&env, "ovirt2");
    let (sd2, ..) = ovirt_domain(std::path::Path::new(&tampered_at), "Backup", "");
    let md = std::path::Path::new(&tampered_at).join(format!("{sd2}/dom_md/metadata"));
    let text = std::fs::read_to_string(&md)
        .unwrap()
        .replace("ROLE=Regular", "ROLE=Master");
    std::fs::write(&md, text).unwrap();
    let err = env
        .client
        .register_domain(register_req(
            "t",
            pb::DomainType::File,
            &tampered_at,
            pb::DomainRole::Unspecified,
        ))
        .await
        .unwrap_err();
    assert_eq!(precondition_of(&err).0, "OVIRT_DOMAIN_INVALID", "{err:?}");
    assert!(err.message().contains("checksum"), "{err:?}");
    let data_at = new_root(&env, "ovirt3");
    ovirt_domain(std::path::Path::new(&data_at), "Data", "");
    let err = env
        .client
        .register_domain(register_req(
            "d",
            pb::DomainType::File,
            &data_at,
            pb::DomainRole::Unspecified,
        ))
        .await
        .unwrap_err();
    assert_eq!(precondition_of(&err).0, "OVIRT_DOMAIN_UNSUPPORTED", "{err:?}");
}

/// A detached oVirt export domain, and a new one laid out by ramsnap, take
/// copies written as VDSM writes volumes: `.meta` with `EOF`, VOLTYPE
/// following the chain, a child naming its parent `../<image>/<parent>`,
/// owned by vdsm:kvm.
#[tokio::test]
async fn ovirt_export_domains_take_copies_written_as_vdsm_writes_them() {
    use ramsnap_common::ovirt::meta;
    use std::os::unix::fs::MetadataExt;
    let mut env = Env::new(256 * MIB).await;
    let adopted_at = new_root(&env, "ovirt-detached");
    ovirt_domain(std::path::Path::new(&adopted_at), "Backup", "");
    let new_at = new_root(&env, "ovirt-new");
    let mut req = register_req("ovirt-new", pb::DomainType::File, &new_at, pb::DomainRole::Export);
    req.format = pb::DomainFormat::Ovirt as i32;
    let made = env.client.register_domain(req).await.unwrap().into_inner();
    assert!(!made.adopted);
    let made = made.domain.unwrap();
    assert_eq!((made.format(), made.read_only), (pb::DomainFormat::Ovirt, false));
    let md = std::path::Path::new(&new_at).join(format!("{}/dom_md/metadata", made.domain_id));
    let keys = meta::parse_domain(&std::fs::read(&md).unwrap()).unwrap();
    assert_eq!(
        (keys["CLASS"].as_str(), keys["DESCRIPTION"].as_str()),
        ("Backup", "ovirt-new")
    );
    // A DATA role or a BLOCK type is not an oVirt export domain.
    let mut bad = register_req(
        "x",
        pb::DomainType::File,
        &new_root(&env, "x"),
        pb::DomainRole::Data,
    );
    bad.format = pb::DomainFormat::Ovirt as i32;
    let err = env.client.register_domain(bad).await.unwrap_err();
    assert_eq!(field_of(&err), "format", "{err:?}");
    let adopted = env
        .client
        .register_domain(register_req(
            "d",
            pb::DomainType::File,
            &adopted_at,
            pb::DomainRole::Unspecified,
        ))
        .await
        .unwrap()
        .into_inner()
        .domain
        .unwrap();
    assert!(!adopted.read_only);
    // Asking an existing domain for another layout is refused.
    let mut other = register_req(
        "d",
        pb::DomainType::File,
        &adopted_at,
        pb::DomainRole::Unspecified,
    );
    other.format = pb::DomainFormat::Ramsnap as i32;
    let err = env.client.register_domain(other).await.unwrap_err();
    assert_eq!(precondition_of(&err).0, "DOMAIN_FORMAT_MISMATCH", "{err:?}");

    let file = env.file_domain.clone();
    let chain = three_layer_chain(&mut env, &file, 16 * MIB).await;
    for (domain, location) in [(&made.domain_id, &new_at), (&adopted.domain_id, &adopted_at)] {
        let mut copied = Vec::new();
        for v in &chain {
            copied.push(env.copy(layer_copy(v, domain)).await.unwrap().1);
        }
        let dir = std::path::Path::new(location).join(domain.as_str());
        for (i, c) in copied.iter().enumerate() {
            let r = vref(c);
            let text =
                std::fs::read(dir.join(format!("images/{}/{}.meta", r.image_id, r.volume_id))).unwrap();
            let keys = meta::parse(&text, true).unwrap();
            let want = if i + 1 == copied.len() { "LEAF" } else { "INTERNAL" };
            assert_eq!(keys["VOLTYPE"], want, "{keys:?}");
            assert_eq!(keys["SIZE"], (16 * MIB / 512).to_string());
            assert_eq!(keys["DISKTYPE"], "2");
            let data = dir.join(format!("images/{}/{}", r.image_id, r.volume_id));
            assert_eq!(std::fs::metadata(&data).unwrap().uid(), 36, "owned by vdsm");
            if i > 0 {
                assert_eq!(
                    backing_name(&data),
                    format!("../{}/{}", r.image_id, vref(&copied[i - 1]).volume_id),
                    "as VDSM 3.3 names a parent"
                );
            }
        }
        // The copies show what the chain shows.
        let (top, src) = (vref(copied.last().unwrap()), vref(chain.last().unwrap()));
        let (a, b) = (env.prepare(&top).await, env.prepare(&src).await);
        qemu(&[
            "qemu-img",
            "compare",
            &a.display().to_string(),
            &b.display().to_string(),
        ]);
        env.teardown(&top).await;
        env.teardown(&src).await;
        // Deleting the leaf makes its parent a leaf again.
        env.client
            .delete_volume(pb::DeleteVolumeRequest {
                request_id: Uuid::new_v4().to_string(),
                r#ref: Some(top.clone()),
            })
            .await
            .unwrap();
        let mid = vref(&copied[copied.len() - 2]);
        let keys = meta::parse(
            &std::fs::read(dir.join(format!("images/{}/{}.meta", mid.image_id, mid.volume_id))).unwrap(),
            true,
        )
        .unwrap();
        assert_eq!(keys["VOLTYPE"], "LEAF");
    }
}

/// A BLOCK create places its LV in the free space its one read of the VG
/// saw (so it knows where the LV lies without reading it back). When the VG
/// changed in between (an LV made there by another host's writer, say), the
/// create still succeeds where LVM places it, and the other LV's data is
/// untouched: the volume is laid out where it really is, not where it was
/// meant to go.
#[tokio::test]
async fn a_block_create_placed_where_another_lv_was_made_since_goes_elsewhere() {
    use ramsnap_storage::backend::Backend;
    use ramsnap_storage::model::*;
    let dir = tempfile::tempdir().unwrap();
    let device = LoopDevice::new(dir.path(), 256 * MIB);
    let id = Uuid::new_v4();
    let domain =
        ramsnap_storage::block::BlockDomain::create(&device.device, id, "placed", &dir.path().join("run"))
            .unwrap();
    let vg = id.to_string();
    let survey = domain.survey().unwrap();
    // Made after the survey, in the first free extents: where the create
    // would have placed its own LV.
    ramsnap_storage::lvm::lvcreate(&vg, "outsider", 8 * MIB, &[], None).unwrap();
    let (pv, offset, len) = ramsnap_storage::lvm::lv_extent(&vg, "outsider", None)
        .unwrap()
        .unwrap();
    let pattern = vec![0xabu8; len as usize];
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pv)
        .unwrap();
    f.write_all_at(&pattern, offset).unwrap();
    f.sync_all().unwrap();
    let meta = VolumeMeta {
        version: 1,
        image: Uuid::new_v4(),
        volume: Uuid::new_v4(),
        parent: None,
        format: Format::Raw,
        allocation: Allocation::Preallocated,
        purpose: Purpose::Disk,
        legality: Legality::Legal,
        capacity: 8 * MIB,
        description: String::new(),
        request_id: None,
        created_at: 0,
    };
    domain.create_legal_surveyed(&meta, None, &survey).unwrap();
    let mut back = vec![0u8; len as usize];
    f.read_exact_at(&mut back, offset).unwrap();
    assert!(back == pattern, "the other LV's data was overwritten");
    let (_, made_at, made_len) = ramsnap_storage::lvm::lv_extent(&vg, &meta.volume.to_string(), None)
        .unwrap()
        .unwrap();
    assert_ne!(made_at, offset);
    let mut made = vec![1u8; made_len as usize];
    f.read_exact_at(&mut made, made_at).unwrap();
    assert!(made.iter().all(|b| *b == 0), "the new volume reads as zeros");
    let listed = domain.get(meta.image, meta.volume).unwrap();
    assert_eq!(listed.meta.legality, Legality::Legal);
    // Without the interloper, it goes where the survey said, at once.
    let survey = domain.survey().unwrap();
    let second = VolumeMeta {
        image: Uuid::new_v4(),
        volume: Uuid::new_v4(),
        ..meta.clone()
    };
    domain.create_legal_surveyed(&second, None, &survey).unwrap();
    assert_eq!(domain.list(None).unwrap().len(), 2);
}

/// PrepareVolume with a purpose checks it before it prepares anything: a
/// volume of another purpose is refused (VOLUME_PURPOSE, naming it) and
/// left unprepared (it can be deleted at once, which a prepared volume
/// cannot); the right purpose prepares it and answers the volume with the
/// path, so a host needs no GetVolume first. An unknown purpose value is
/// INVALID_ARGUMENT on the field.
#[tokio::test]
async fn prepare_with_a_purpose_refuses_another_purpose_before_preparing() {
    let mut env = Env::new(1024 * MIB).await;
    for kind in KINDS {
        let domain = env.domain(kind);
        let made = env
            .client
            .create_memory_volumes(pb::CreateMemoryVolumesRequest {
                request_id: Uuid::new_v4().to_string(),
                domain_id: domain.clone(),
                memory_bytes: 16 * MIB,
                mode: pb::MemoryDumpMode::Paused as i32,
                description: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let (dump, meta) = (made.dump.unwrap(), made.metadata.unwrap());
        let prepare = |v: &pb::Volume, purpose: i32| pb::PrepareVolumeRequest {
            r#ref: Some(vref(v)),
            purpose,
        };
        let loops_before = loops_over(&env.loop_dev.device);
        let refused = env
            .client
            .prepare_volume(prepare(&dump, pb::VolumePurpose::MemoryMetadata as i32))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{kind:?}: {refused:?}");
        let (kind_of, subject) = precondition_of(&refused);
        assert_eq!(kind_of, "VOLUME_PURPOSE", "{kind:?}");
        assert!(subject.contains(&vref(&dump).volume_id), "{kind:?}: {subject}");
        assert_eq!(loops_over(&env.loop_dev.device), loops_before, "{kind:?}");
        let bad = env.client.prepare_volume(prepare(&meta, 99)).await.unwrap_err();
        assert_eq!(
            (bad.code(), field_of(&bad)),
            (Code::InvalidArgument, "purpose".to_string())
        );
        let answer = env
            .client
            .prepare_volume(prepare(&meta, pb::VolumePurpose::MemoryMetadata as i32))
            .await
            .unwrap()
            .into_inner();
        let listed = answer.volume.expect("the volume with the path");
        assert_eq!(listed, meta, "{kind:?}");
        env.teardown(&vref(&meta)).await;
        // The refused one was never prepared: it deletes at once.
        env.client
            .delete_volume(pb::DeleteVolumeRequest {
                request_id: String::new(),
                r#ref: Some(vref(&dump)),
            })
            .await
            .unwrap();
    }
}
