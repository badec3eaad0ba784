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
    // A device that holds other data is not overwritten.
    let other = LoopDevice::new(&env.dir.path().join("roots"), 64 * MIB);
    let out = std::process::Command::new("mkfs.ext4")
        .arg("-q")
        .arg(&other.device)
        .output()
        .unwrap();
    assert!(out.status.success());
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
