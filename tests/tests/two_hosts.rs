//! Resume on another host (issue 13, item 3): two host agents on this
//! machine (their own names, host ids, run and state directories and
//! ports; one libvirt, one storage agent, so both see the same domains). A
//! memory snapshot taken on host A restores on host B (`RunVm.host_id`);
//! a VM suspended on B resumes on A. Before anything starts, the restore
//! checks that the target host can take the guest: a dump that names a
//! machine type this host's QEMU does not offer (what a host with a newer
//! QEMU would have saved) is refused with HOST_CANNOT_TAKE_GUEST, the VM
//! keeps its memory and state, and once the dump is as saved it resumes.
//! On the real guest through the real coordinator, SQLite with FILE and
//! PostgreSQL with BLOCK.
use ramsnap_e2e::cluster::{request_id, Cluster, Db, DomainKind, Taken};
use ramsnap_proto::common::v1 as common;
use ramsnap_proto::host::v1 as hpb;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::snapshot::v1::VmStatus;
use ramsnap_proto::storage::v1 as spb;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Instant;

/// Runs `f` on the volume's path on this machine (PrepareVolume, then
/// TeardownVolume).
async fn with_volume<T>(c: &Cluster, r: &common::VolumeRef, f: impl FnOnce(&std::path::Path) -> T) -> T {
    let mut storage = c.storage_as_host().await;
    let path = storage
        .prepare_volume(spb::PrepareVolumeRequest {
            r#ref: Some(r.clone()),
            ..Default::default()
        })
        .await
        .expect("PrepareVolume")
        .into_inner()
        .path;
    let out = f(std::path::Path::new(&path));
    storage
        .teardown_volume(spb::TeardownVolumeRequest {
            r#ref: Some(r.clone()),
        })
        .await
        .expect("TeardownVolume");
    out
}

/// Replaces `from` with `to` (the same length) in the first MiB of the
/// dump (libvirt's save header and the domain XML in it), and records the
/// changed dump's checksum in the metadata: a sound dump of another guest.
/// Returns the metadata as it was, to put back.
async fn rewrite_header(c: &Cluster, memory: &common::MemoryVolumeRef, from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let (dump, meta) = (memory.dump.clone().unwrap(), memory.metadata.clone().unwrap());
    let old_meta = with_volume(c, &meta, |p| {
        let mut b = vec![0u8; 1 << 20];
        let mut f = std::fs::File::open(p).unwrap();
        let n = f.read(&mut b).unwrap();
        b.truncate(n);
        b
    })
    .await;
    let end = old_meta.iter().position(|&b| b == 0).unwrap_or(old_meta.len());
    let mut doc: serde_json::Value = serde_json::from_slice(&old_meta[..end]).expect("the metadata");
    let capacity = doc["dump"]["capacity"].as_u64().unwrap();
    let sum = with_volume(c, &dump, |p| {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap();
        let mut head = vec![0u8; 1 << 20];
        f.read_exact(&mut head).unwrap();
        let at = head
            .windows(from.len())
            .position(|w| w == from.as_bytes())
            .unwrap_or_else(|| panic!("{from} is not in the dump's header"));
        f.seek(SeekFrom::Start(at as u64)).unwrap();
        f.write_all(to.as_bytes()).unwrap();
        f.sync_all().unwrap();
        ramsnap_common::checksum::digest_file(p, capacity, ramsnap_common::checksum::Algorithm::Blake3Chunks)
            .unwrap()
            .checksum
    })
    .await;
    doc["dump"]["checksum"] = sum.to_string().into();
    let mut bytes = serde_json::to_vec(&doc).unwrap();
    bytes.resize(old_meta.len(), 0);
    with_volume(c, &meta, |p| {
        let mut f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.write_all(&bytes).unwrap();
        f.sync_all().unwrap();
    })
    .await;
    old_meta
}

/// The machine type in the dump's header (`pc-i440fx-X.Y`).
async fn saved_machine(c: &Cluster, memory: &common::MemoryVolumeRef) -> String {
    with_volume(c, memory.dump.as_ref().unwrap(), |p| {
        let mut head = vec![0u8; 1 << 20];
        std::fs::File::open(p).unwrap().read_exact(&mut head).unwrap();
        let text = String::from_utf8_lossy(&head).to_string();
        text.split("machine='")
            .nth(1)
            .and_then(|r| r.split('\'').next())
            .expect("the saved machine type")
            .to_string()
    })
    .await
}

async fn status_on(c: &Cluster, host_url: &str, vm: &str) -> hpb::VmStatus {
    let channel = ramsnap_e2e::connect_as(host_url, "admin").await;
    hpb::host_service_client::HostServiceClient::new(channel)
        .get_vm_status(hpb::GetVmStatusRequest { vm_id: vm.into() })
        .await
        .unwrap_or_else(|e| c.fail(&format!("GetVmStatus on {host_url}: {e}")))
        .into_inner()
        .status()
}

async fn another_host(db: Db, kind: DomainKind, label: &str) {
    let t = Instant::now();
    let c = Cluster::start(db, "3.3", label).await;
    let (b, host_b) = c.second_host_agent(&format!("{label}-b")).await;
    let host_b_url = format!("http://{}", b.addr);
    let vm = c.create_vm(&format!("{label}-vm"), kind).await;
    c.boot(&vm).await;
    assert_eq!(c.get_vm(&vm).await.host_id, c.host_id, "it boots on host A");

    // A memory snapshot taken on A; the VM previewed to it with its memory.
    let taken = c.take_snapshot(&vm, true, "on host A").await;
    c.stop_vm(&vm).await;
    c.preview(&vm, &taken.snapshot_id, true).await;
    let active = c.active_snapshot(&vm).await;
    let memory = active.memory.clone().expect("the preview's memory");

    // A dump B's QEMU cannot take: refused before anything starts; the
    // VM keeps its memory and stays down.
    let machine = saved_machine(&c, &memory).await;
    assert!(machine.starts_with("pc-i440fx-"), "{machine}");
    let lacking = format!("pc-i440fx-{}", "9".repeat(machine.len() - "pc-i440fx-".len()));
    let old_meta = rewrite_header(
        &c,
        &memory,
        &format!("machine='{machine}'"),
        &format!("machine='{lacking}'"),
    )
    .await;
    let resp = c
        .vms()
        .run_vm(pb::RunVmRequest {
            request_id: request_id(),
            vm_id: vm.clone(),
            host_id: host_b.clone(),
            run_stateless: false,
        })
        .await
        .unwrap_or_else(|e| c.fail(&format!("RunVm on B: {e}")))
        .into_inner();
    let op = c
        .finish(resp.operation, "RunVm on B (a guest it cannot take)")
        .await;
    assert_eq!(op.state(), pb::OperationState::Failed, "{op:?}");
    assert!(
        op.error_message.contains("HOST_CANNOT_TAKE_GUEST") && op.error_message.contains(&lacking),
        "the refusal names what differs: {op:?}"
    );
    assert_eq!(c.get_vm(&vm).await.status(), VmStatus::Down);
    assert_eq!(
        c.active_snapshot(&vm).await.memory.as_ref(),
        Some(&memory),
        "the memory is kept: another host may take it"
    );
    assert_eq!(status_on(&c, &host_b_url, &vm).await, hpb::VmStatus::Down);

    // The dump as saved: B resumes the guest A saved.
    rewrite_header(
        &c,
        &memory,
        &format!("machine='{lacking}'"),
        &format!("machine='{machine}'"),
    )
    .await;
    with_volume(&c, memory.metadata.as_ref().unwrap(), |p| {
        let mut f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.write_all(&old_meta).unwrap();
        f.sync_all().unwrap();
    })
    .await;
    let run = c.run_vm_on(&vm, &host_b).await;
    run.assert_started_as(VmStatus::RestoringState);
    let g = c.assert_restored(&vm, &run, &taken).await;
    assert_eq!(c.get_vm(&vm).await.host_id, host_b, "it runs on host B");
    assert_eq!(
        status_on(&c, &c.host_url, &vm).await,
        hpb::VmStatus::Down,
        "not on A"
    );
    assert_eq!(status_on(&c, &host_b_url, &vm).await, hpb::VmStatus::Up);
    c.wait_counter(&vm, run.console_offset, g.counter + 3).await;

    // Suspended on B, resumed on A.
    let saved: Taken = c.suspend_vm(&vm).await;
    let run = c.run_vm_on(&vm, &c.host_id).await;
    run.assert_started_as(VmStatus::RestoringState);
    c.assert_restored(&vm, &run, &saved).await;
    assert_eq!(c.get_vm(&vm).await.host_id, c.host_id, "it runs on host A again");
    assert_eq!(
        status_on(&c, &host_b_url, &vm).await,
        hpb::VmStatus::Down,
        "not on B"
    );

    c.stop_vm(&vm).await;
    c.commit(&vm).await;
    c.assert_no_orphans().await;
    drop(b);
    eprintln!("[{label}] passed in {:.1}s", t.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_snapshot_from_host_a_restores_on_host_b_sqlite_file() {
    another_host(Db::Sqlite, DomainKind::File, "hosts-sqlite").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_snapshot_from_host_a_restores_on_host_b_postgres_block() {
    another_host(Db::Postgres, DomainKind::Block, "hosts-pg").await;
}
