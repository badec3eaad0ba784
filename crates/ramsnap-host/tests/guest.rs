//! The HostService on the real thing: libvirt qemu:///system, QEMU (TCG),
//! the test guest of tests/guest, and a real StorageService with a FILE and
//! a BLOCK (LVM on a loop device) domain, all over real gRPC. The guest
//! proves a restore: it keeps its boot token and its in-RAM counter goes on,
//! and it checks that its disk holds what it wrote (a restore onto the
//! wrong chain prints RAMSNAP-DISK-MISMATCH).
//!
//! All guest tests live in this one binary so that GUESTS bounds how many
//! run at once (two cores, TCG).
mod support;

use futures::StreamExt;
use ramsnap_proto::common::v1 as common;
use ramsnap_proto::host::v1 as hpb;
use ramsnap_proto::storage::v1 as spb;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;
use support::*;
use tonic::Code;

const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

struct Guest {
    id: String,
    spec: hpb::VmSpec,
    memory_mib: u64,
    token: String,
}

impl Guest {
    fn leaf(&self) -> common::VolumeRef {
        self.spec.disks[0].volume.clone().unwrap()
    }
}

/// qemu:///system, and a 4 GiB BLOCK domain (sparse: only what is written
/// takes space).
fn real_env() -> EnvOptions {
    EnvOptions {
        uri: "qemu:///system",
        block_size: Some(4096 * MIB),
    }
}

/// Boots a guest with one qcow2 disk on the FILE or BLOCK domain and waits
/// for its first ticks.
async fn boot(env: &mut Env, disk_on_block: bool, memory_mib: u64, extra: &str) -> Guest {
    let disk = env.new_disk(disk_on_block).await;
    let id = uuid::Uuid::new_v4().to_string();
    let spec = vm_spec(&id, memory_mib, vec![disk], extra);
    let mut watch = env
        .host
        .watch_vm_status(hpb::WatchVmStatusRequest { vm_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(env.run(&spec, None).await.unwrap(), hpb::VmStatus::PoweringUp);
    let lines = env.wait_ticks(&id, 0, 2, BOOT_TIMEOUT).await;
    let Some(Line::Boot { token }) = lines.first().cloned() else {
        panic!("the first line is not a BOOT: {lines:?}")
    };
    assert!(ticks(&lines).iter().all(|(t, _)| *t == token));
    // POWERING_UP, then UP at the first console output: never RESTORING_STATE.
    let statuses = collect_until_up(&mut watch).await;
    assert_eq!(
        statuses,
        vec![hpb::VmStatus::Down, hpb::VmStatus::PoweringUp, hpb::VmStatus::Up]
    );
    Guest {
        id,
        spec,
        memory_mib,
        token,
    }
}

async fn collect_until_up(watch: &mut tonic::Streaming<hpb::WatchVmStatusResponse>) -> Vec<hpb::VmStatus> {
    let mut seen = Vec::new();
    while let Ok(Some(Ok(ev))) = tokio::time::timeout(Duration::from_secs(60), watch.next()).await {
        seen.push(ev.status());
        if ev.status() == hpb::VmStatus::Up {
            break;
        }
    }
    seen
}

fn last_tick(log: &str, token: &str) -> u64 {
    let t = ticks(&parse(log));
    let (tok, n) = t.last().cloned().expect("the guest ticks");
    assert_eq!(tok, token, "the guest rebooted:\n{log}");
    n
}

fn snapshot_req(
    g: &Guest,
    overlay: &common::VolumeRef,
    memory: Option<common::MemoryVolumeRef>,
    live: bool,
    level: &str,
) -> hpb::SnapshotVmRequest {
    hpb::SnapshotVmRequest {
        job_id: uuid::Uuid::new_v4().to_string(),
        vm_id: g.id.clone(),
        snapshot_id: uuid::Uuid::new_v4().to_string(),
        disks: vec![hpb::SnapshotDisk {
            current: Some(g.leaf()),
            overlay: Some(overlay.clone()),
        }],
        memory,
        mode: if live {
            hpb::SnapshotMode::Live
        } else {
            hpb::SnapshotMode::Paused
        } as i32,
        compatibility_version: level.into(),
    }
}

fn read_bytes(path: &std::path::Path, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = Vec::new();
    f.take(len as u64).read_to_end(&mut buf).unwrap();
    buf
}

/// What a snapshot with memory left behind, for the restore.
struct Taken {
    frozen: common::VolumeRef,
    overlay: common::VolumeRef,
    memory: common::MemoryVolumeRef,
    /// Counters seen right before and right after the snapshot call.
    counter_before: u64,
    counter_after: u64,
    result: hpb::SnapshotResult,
}

/// Takes a snapshot with memory of a running guest and checks what it did:
/// the VM runs on the overlay, the metadata volume records the frozen disk
/// and the dump's checksum.
async fn volume_capacity(env: &mut Env, r: &common::VolumeRef) -> u64 {
    env.storage
        .get_volume(spb::GetVolumeRequest {
            r#ref: Some(r.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .capacity_bytes
}

/// The checksum of a whole volume, every byte read (a dump volume's
/// capacity, zeros past the dump included), as its text form.
async fn whole_volume_checksum(env: &mut Env, r: &common::VolumeRef) -> String {
    let capacity = volume_capacity(env, r).await;
    let path = env.path_of(r).await;
    let d = ramsnap_common::checksum::digest_file(
        &path,
        capacity,
        ramsnap_common::checksum::Algorithm::Blake3Chunks,
    )
    .unwrap();
    env.teardown(r).await;
    d.checksum.to_string()
}

async fn take_memory_snapshot(env: &mut Env, g: &mut Guest, memory_on_block: bool, live: bool) -> Taken {
    let memory = env
        .memory_volumes(memory_on_block, g.memory_mib * MIB, live)
        .await;
    take_memory_snapshot_into(env, g, memory, memory_on_block, live).await
}

/// [`take_memory_snapshot`] into a given pair of memory volumes.
async fn take_memory_snapshot_into(
    env: &mut Env,
    g: &mut Guest,
    memory: common::MemoryVolumeRef,
    memory_on_block: bool,
    live: bool,
) -> Taken {
    let frozen = g.leaf();
    let overlay = env.child_of(&frozen).await;
    let counter_before = last_tick(&env.console(&g.id).await, &g.token);
    let req = snapshot_req(g, &overlay, Some(memory.clone()), live, "3.3");
    let snapshot_id = req.snapshot_id.clone();
    let (progress, result) = snapshot(&mut env.host, req).await;
    let result = result.expect("snapshot with memory");
    let counter_after = last_tick(&env.console(&g.id).await, &g.token);
    eprintln!(
        "snapshot (memory on {}, {}): {} ms, guest paused {} ms, dump {} bytes, {} progress messages",
        if memory_on_block { "BLOCK" } else { "FILE" },
        if live { "LIVE" } else { "PAUSED" },
        result.duration_ms,
        result.guest_pause_ms,
        result.dump_bytes,
        progress.len()
    );
    assert!(result.memory_saved);
    assert!(
        result.dump_checksum.starts_with("blake3-4m:") && result.dump_checksum.len() == 74,
        "{}",
        result.dump_checksum
    );
    assert!(result.dump_bytes > 8 * MIB, "{result:?}");
    assert!(
        result.guest_pause_ms > 0 && result.guest_pause_ms <= result.duration_ms,
        "{result:?}"
    );
    let last = progress.last().expect("progress messages");
    assert!(
        last.processed_bytes > 0 && last.total_bytes >= g.memory_mib * MIB / 2,
        "{progress:?}"
    );
    assert_eq!(env.status(&g.id).await, hpb::VmStatus::Up);

    // The guest now writes to the overlay.
    let overlay_path = env.path_of(&overlay).await;
    assert_eq!(
        env.live_disks(&g.id),
        vec![("vda".to_string(), overlay_path.display().to_string())]
    );
    // The metadata volume: versioned JSON, then NULs.
    let meta_path = env.path_of(memory.metadata.as_ref().unwrap()).await;
    let bytes = read_bytes(&meta_path, 1 << 20);
    env.teardown(memory.metadata.as_ref().unwrap()).await;
    let end = bytes.iter().position(|&b| b == 0).unwrap();
    assert!(bytes[end..].iter().all(|&b| b == 0));
    let md: serde_json::Value = serde_json::from_slice(&bytes[..end]).unwrap();
    assert_eq!(md["format"], "ramsnap.memory-metadata");
    assert_eq!(md["version"], 2);
    assert_eq!(md["vm_id"], g.id.as_str());
    assert_eq!(md["snapshot_id"], snapshot_id.as_str());
    assert_eq!(md["mode"], if live { "live" } else { "paused" });
    assert_eq!(md["disks"][0]["current"]["volume"], frozen.volume_id.as_str());
    assert_eq!(md["disks"][0]["overlay"]["volume"], overlay.volume_id.as_str());
    assert_eq!(md["dump"]["checksum"], result.dump_checksum.as_str());
    assert!(md["domain_xml"].as_str().unwrap().contains(&g.id));
    Taken {
        frozen,
        overlay,
        memory,
        counter_before,
        counter_after,
        result,
    }
}

/// Destroys the guest, branches a fresh leaf off the frozen volume (what a
/// preview makes) and restores the memory onto it: RESTORING_STATE then UP,
/// the same boot token, the counter going on from the snapshot's.
async fn restore(env: &mut Env, g: &mut Guest, taken: &Taken) {
    assert!(
        !env.stop(&g.id, 0).await,
        "the test guest ignores ACPI: destroyed"
    );
    assert_eq!(env.status(&g.id).await, hpb::VmStatus::Down);
    assert!(!env.domain_exists(&g.id));
    // The overlay holds what the guest wrote after the snapshot: drop it.
    env.delete_volume(&taken.overlay).await;
    let leaf = env.child_of(&taken.frozen).await;
    g.spec.disks[0].volume = Some(leaf.clone());

    let mut watch = env
        .host
        .watch_vm_status(hpb::WatchVmStatusRequest { vm_id: g.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mark = env.console(&g.id).await.len();
    let started = std::time::Instant::now();
    assert_eq!(
        env.run(&g.spec, Some(taken.memory.clone())).await.unwrap(),
        hpb::VmStatus::Up
    );
    eprintln!("restore: {} ms", started.elapsed().as_millis());
    assert_eq!(
        collect_until_up(&mut watch).await,
        vec![
            hpb::VmStatus::Down,
            hpb::VmStatus::RestoringState,
            hpb::VmStatus::Up
        ],
        "a restore reports RESTORING_STATE then UP, never POWERING_UP"
    );
    let lines = env.wait_ticks(&g.id, mark, 2, Duration::from_secs(30)).await;
    assert!(
        !lines
            .iter()
            .any(|l| matches!(l, Line::Boot { .. } | Line::Mismatch(_) | Line::Error(_))),
        "the guest rebooted or saw the wrong disk: {lines:?}"
    );
    let t = ticks(&lines);
    assert!(t.iter().all(|(tok, _)| *tok == g.token), "{t:?}");
    let first = t[0].1;
    assert!(
        first > taken.counter_before && first <= taken.counter_after + 2,
        "counter after restore {first}, snapshot between {} and {}",
        taken.counter_before,
        taken.counter_after
    );
    let leaf_path = env.path_of(&leaf).await;
    assert_eq!(
        env.live_disks(&g.id),
        vec![("vda".to_string(), leaf_path.display().to_string())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_on_file_live_then_paused_restores_the_same_guest() {
    let _guest = GUESTS.acquire().await.unwrap();
    let mut env = Env::new("mfile", real_env()).await;
    let mut g = boot(&mut env, false, 256, "").await;
    for live in [true, false] {
        let taken = take_memory_snapshot(&mut env, &mut g, false, live).await;
        restore(&mut env, &mut g, &taken).await;
    }
    env.stop(&g.id, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_on_block_paused_then_live_restores_the_same_guest_and_a_run_without_memory_boots_anew() {
    let _guest = GUESTS.acquire().await.unwrap();
    let mut env = Env::new("mblock", real_env()).await;
    // The disk is on the BLOCK domain too: qcow2 on LVs, type='block' disks.
    let mut g = boot(&mut env, true, 256, "").await;
    for live in [false, true] {
        let taken = take_memory_snapshot(&mut env, &mut g, true, live).await;
        assert!(
            taken.result.dump_bytes <= (if live { 2 * 256 + 200 } else { 256 + 200 }) * MIB,
            "{:?}",
            taken.result
        );
        // The host read the dump only up to its stream's end (libvirt's
        // figure) and took the rest as zeros: the value is the one every
        // byte of the volume gives.
        let dump_ref = taken.memory.dump.clone().unwrap();
        assert_eq!(
            whole_volume_checksum(&mut env, &dump_ref).await,
            taken.result.dump_checksum,
            "live: {live}"
        );
        restore(&mut env, &mut g, &taken).await;
    }

    // A pair an earlier attempt wrote into (its metadata volume marked, the
    // dump holding old bytes) is scrubbed before the dump: the old bytes
    // past the new dump's end are gone and the restore verifies.
    let planted = vec![0xABu8; 4096];
    let dirty = env.memory_volumes(true, g.memory_mib * MIB, false).await;
    let dump_ref = dirty.dump.clone().unwrap();
    let capacity = volume_capacity(&mut env, &dump_ref).await;
    env.write_bytes(&dump_ref, capacity - 4096, &planted).await;
    env.write_bytes(
        dirty.metadata.as_ref().unwrap(),
        0,
        br#"{"format":"ramsnap.memory-dump-in-progress"}"#,
    )
    .await;
    let taken = take_memory_snapshot_into(&mut env, &mut g, dirty, true, false).await;
    assert!(
        env.volume_bytes(&dump_ref, capacity).await[(capacity - 4096) as usize..]
            .iter()
            .all(|&b| b == 0),
        "a marked pair's dump is scrubbed before the dump"
    );
    restore(&mut env, &mut g, &taken).await;

    // A clean pair (metadata volume zero, as the storage service makes it)
    // is not zeroed a second time: bytes planted far past the dump's end
    // (which no writer of ramsnap leaves there) stay. They are no part of
    // the dump: its checksum stops a chunk past the stream's end, as the
    // restore's check does (so the whole volume's value differs), and the
    // guest resumes.
    let clean = env.memory_volumes(true, g.memory_mib * MIB, false).await;
    let dump_ref = clean.dump.clone().unwrap();
    env.write_bytes(&dump_ref, capacity - 4096, &planted).await;
    let taken = take_memory_snapshot_into(&mut env, &mut g, clean, true, false).await;
    assert!(
        taken.result.dump_bytes + 2 * ramsnap_common::checksum::CHUNK as u64 <= capacity - 4096,
        "{:?}",
        taken.result
    );
    assert_eq!(
        &env.volume_bytes(&dump_ref, capacity).await[(capacity - 4096) as usize..],
        &planted[..],
        "a clean pair's dump volume is not zeroed again"
    );
    assert_ne!(
        whole_volume_checksum(&mut env, &dump_ref).await,
        taken.result.dump_checksum,
        "the bytes past the dump were not read"
    );
    restore(&mut env, &mut g, &taken).await;

    // Run without memory: a cold boot, with a new token.
    env.stop(&g.id, 0).await;
    let mut watch = env
        .host
        .watch_vm_status(hpb::WatchVmStatusRequest { vm_id: g.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mark = env.console(&g.id).await.len();
    assert_eq!(env.run(&g.spec, None).await.unwrap(), hpb::VmStatus::PoweringUp);
    assert_eq!(
        collect_until_up(&mut watch).await,
        vec![hpb::VmStatus::Down, hpb::VmStatus::PoweringUp, hpb::VmStatus::Up]
    );
    let lines = env.wait_ticks(&g.id, mark, 1, BOOT_TIMEOUT).await;
    let Some(Line::Boot { token }) = lines.first().cloned() else {
        panic!("a cold run prints a BOOT line first: {lines:?}")
    };
    assert_ne!(token, g.token, "a cold boot has a new token");
    assert_eq!(ticks(&lines)[0], (token, 1), "and counts from 1");
    assert!(!lines.iter().any(|l| matches!(l, Line::Mismatch(_))));
    env.stop(&g.id, 0).await;
    // Nothing of the VM stays prepared on the BLOCK domain.
    assert_eq!(loops_over(&env.loop_dev.as_ref().unwrap().device), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_is_refused_when_disks_or_vm_differ_or_the_dump_is_corrupt() {
    let _guest = GUESTS.acquire().await.unwrap();
    let mut env = Env::new("refuse", real_env()).await;
    let mut g = boot(&mut env, false, 256, "").await;
    let taken = take_memory_snapshot(&mut env, &mut g, false, true).await;
    env.stop(&g.id, 0).await;
    let fresh_leaf = env.child_of(&taken.frozen).await;
    let mut good = g.spec.clone();
    good.disks[0].volume = Some(fresh_leaf.clone());

    let refused = |st: tonic::Status, kind: &str| {
        assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
        assert_eq!(precondition_kind(&st), kind, "{st:?}");
    };
    // Another disk altogether.
    let mut spec = good.clone();
    spec.disks[0].volume = Some(env.new_disk(false).await);
    refused(
        env.run(&spec, Some(taken.memory.clone())).await.unwrap_err(),
        "MEMORY_DISKS_MISMATCH",
    );
    // The overlay the guest wrote to after the snapshot: a child of the
    // frozen volume, but not its state.
    let mut spec = good.clone();
    spec.disks[0].volume = Some(taken.overlay.clone());
    refused(
        env.run(&spec, Some(taken.memory.clone())).await.unwrap_err(),
        "MEMORY_DISKS_MISMATCH",
    );
    // Another number of disks.
    let mut spec = good.clone();
    spec.disks.push(hpb::DiskSpec {
        volume: Some(env.new_disk(false).await),
    });
    refused(
        env.run(&spec, Some(taken.memory.clone())).await.unwrap_err(),
        "MEMORY_DISKS_MISMATCH",
    );
    // Another VM's memory.
    let mut spec = good.clone();
    spec.vm_id = uuid::Uuid::new_v4().to_string();
    refused(
        env.run(&spec, Some(taken.memory.clone())).await.unwrap_err(),
        "MEMORY_VM_MISMATCH",
    );
    // The volumes swapped: a metadata volume is no dump.
    let swapped = common::MemoryVolumeRef {
        dump: taken.memory.metadata.clone(),
        metadata: taken.memory.dump.clone(),
    };
    refused(env.run(&good, Some(swapped)).await.unwrap_err(), "VOLUME_PURPOSE");

    // One flipped byte in the dump.
    let dump_path = env.path_of(taken.memory.dump.as_ref().unwrap()).await;
    let flip = |path: &std::path::Path, at: u64| {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[b[0] ^ 0x40]).unwrap();
        f.sync_all().unwrap();
    };
    let at = taken.result.dump_bytes / 2;
    flip(&dump_path, at);
    refused(
        env.run(&good, Some(taken.memory.clone())).await.unwrap_err(),
        "MEMORY_DUMP_CORRUPT",
    );
    // Every refusal left the VM down and nothing running.
    assert_eq!(env.status(&g.id).await, hpb::VmStatus::Down);
    assert!(!env.domain_exists(&g.id));

    // Flipped back, the same request restores the guest.
    flip(&dump_path, at);
    let mark = env.console(&g.id).await.len();
    assert_eq!(
        env.run(&good, Some(taken.memory.clone())).await.unwrap(),
        hpb::VmStatus::Up
    );
    let lines = env.wait_ticks(&g.id, mark, 2, Duration::from_secs(30)).await;
    assert!(ticks(&lines).iter().all(|(t, _)| *t == g.token), "{lines:?}");
    assert!(!lines
        .iter()
        .any(|l| matches!(l, Line::Boot { .. } | Line::Mismatch(_))));
    env.stop(&g.id, 0).await;
}

/// A BLOCK dump is hashed behind QEMU's reading while libvirt restores it
/// (see the host's follow_block_restore), the rest after: a byte flipped
/// in its middle is found once the restore is under way. The guest was
/// restored paused (its domain seen paused, never running), is destroyed,
/// and the VM is left down; flipped back, the same request resumes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_block_dump_is_found_while_it_is_restored_and_never_runs() {
    let _guest = GUESTS.acquire().await.unwrap();
    let mut env = Env::new("blockrestore", real_env()).await;
    let mut g = boot(&mut env, true, 256, "").await;
    let taken = take_memory_snapshot(&mut env, &mut g, true, false).await;
    env.stop(&g.id, 0).await;
    let fresh_leaf = env.child_of(&taken.frozen).await;
    let mut good = g.spec.clone();
    good.disks[0].volume = Some(fresh_leaf);
    let dump = taken.memory.dump.clone().unwrap();
    let at = taken.result.dump_bytes / 2;
    env.flip_byte(&dump, at).await;

    // The domain's states while the run is under way.
    let name = env.domain_name(&g.id);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let out = std::process::Command::new("virsh")
                    .args(["-c", "qemu:///system", "domstate", &name])
                    .output()
                    .unwrap();
                if out.status.success() {
                    seen.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            seen
        })
    };
    let mark = env.console(&g.id).await.len();
    let st = env.run(&good, Some(taken.memory.clone())).await.unwrap_err();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    assert_eq!(precondition_kind(&st), "MEMORY_DUMP_CORRUPT", "{st:?}");
    assert!(seen.contains("paused"), "the restore was under way: {seen:?}");
    assert!(!seen.contains("running"), "the guest never ran: {seen:?}");
    assert_eq!(env.status(&g.id).await, hpb::VmStatus::Down);
    assert!(!env.domain_exists(&g.id));
    let after = env.console(&g.id).await;
    let refused = parse(&after[mark.min(after.len())..]);
    assert!(
        ticks(&refused).is_empty(),
        "no tick from the refused guest: {refused:?}"
    );

    // Flipped back, the same request resumes the guest where it was.
    env.flip_byte(&dump, at).await;
    assert_eq!(
        env.run(&good, Some(taken.memory.clone())).await.unwrap(),
        hpb::VmStatus::Up
    );
    let lines = env.wait_ticks(&g.id, mark, 2, Duration::from_secs(30)).await;
    assert_clean(&lines, &g.token);
    env.stop(&g.id, 0).await;
}

/// An export/import of a down VM with memory, as the host sees it: the
/// memory pair and the frozen disk copied to the BLOCK domain with their
/// ids. Restore refuses the moved disk until VerifyMemory has checked the
/// real dump (against the snapshot's checksum) and rebound the metadata to
/// the BLOCK domain; then the same guest resumes there. A flipped byte or a
/// wrong checksum is refused, the metadata left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_memory_rebinds_a_moved_pair_and_the_guest_resumes_from_it() {
    let _guest = GUESTS.acquire().await.unwrap();
    let mut env = Env::new("verify", real_env()).await;
    let pv = env.loop_dev.as_ref().unwrap().device.clone();
    let mut g = boot(&mut env, false, 256, "").await;
    let taken = take_memory_snapshot(&mut env, &mut g, false, false).await;
    env.stop(&g.id, 0).await;
    let sha = taken.result.dump_checksum.clone();

    let block = env.block_domain.clone();
    let moved = common::MemoryVolumeRef {
        dump: Some(
            env.copy_same_ids(taken.memory.dump.as_ref().unwrap(), &block)
                .await,
        ),
        metadata: Some(
            env.copy_same_ids(taken.memory.metadata.as_ref().unwrap(), &block)
                .await,
        ),
    };
    let moved_dump = moved.dump.clone().unwrap();
    let moved_meta = moved.metadata.clone().unwrap();
    let frozen = env.copy_same_ids(&taken.frozen, &block).await;
    let leaf = env.child_of(&frozen).await;
    let mut spec = g.spec.clone();
    spec.disks[0].volume = Some(leaf.clone());

    // The metadata names the disk on the FILE domain: restore refuses.
    let st = env.run(&spec, Some(moved.clone())).await.unwrap_err();
    assert_eq!(precondition_kind(&st), "MEMORY_DISKS_MISMATCH", "{st:?}");

    let req = || hpb::VerifyMemoryRequest {
        vm_id: g.id.clone(),
        memory: Some(moved.clone()),
        expected_checksum: sha.clone(),
        ..Default::default()
    };
    let before = env.volume_bytes(&moved_meta, MIB).await;
    // A wrong checksum, a flipped byte: MEMORY_DUMP_CORRUPT, nothing rewritten.
    let mut q = req();
    q.expected_checksum = "f".repeat(64);
    q.rebind_disk_domain_id = block.clone();
    let st = env.verify_memory(q).await.unwrap_err();
    assert_eq!(precondition_kind(&st), "MEMORY_DUMP_CORRUPT", "{st:?}");
    let at = taken.result.dump_bytes / 2;
    env.flip_byte(&moved_dump, at).await;
    let mut q = req();
    q.rebind_disk_domain_id = block.clone();
    let st = env.verify_memory(q).await.unwrap_err();
    assert_eq!(precondition_kind(&st), "MEMORY_DUMP_CORRUPT", "{st:?}");
    assert_eq!(precondition_subject(&st), volume_name(&moved_dump));
    assert!(st.message().contains(&sha), "{st:?}");
    assert_eq!(env.volume_bytes(&moved_meta, MIB).await, before);
    env.flip_byte(&moved_dump, at).await;

    // A copy's checksum (copied_checksum) stands for the dump's bytes: a
    // wrong one is refused though the dump is good, nothing rewritten; the
    // right one verifies; one of another algorithm than the metadata's is
    // not used (the dump is read, and a flipped byte still found).
    let mut q = req();
    q.copied_checksum = format!("blake3-4m:{}", "0c".repeat(32));
    q.rebind_disk_domain_id = block.clone();
    let st = env.verify_memory(q).await.unwrap_err();
    assert_eq!(precondition_kind(&st), "MEMORY_DUMP_CORRUPT", "{st:?}");
    assert_eq!(env.volume_bytes(&moved_meta, MIB).await, before);
    let mut q = req();
    q.copied_checksum = sha.clone();
    assert_eq!(env.verify_memory(q).await.unwrap().checksum, sha);
    env.flip_byte(&moved_dump, at).await;
    let mut q = req();
    q.copied_checksum = format!("sha256:{}", "0c".repeat(32));
    let st = env.verify_memory(q).await.unwrap_err();
    assert_eq!(precondition_kind(&st), "MEMORY_DUMP_CORRUPT", "{st:?}");
    assert!(st.message().contains(&sha), "{st:?}");
    env.flip_byte(&moved_dump, at).await;

    // Memory saved by version 1 hosts (metadata version 1: a bare hex
    // SHA-256 under `dump.sha256`) still verifies, against that value and
    // against a version 1 export's bare hex; a flipped byte is still found.
    let end = before.iter().position(|&b| b == 0).unwrap();
    let mut v1: serde_json::Value = serde_json::from_slice(&before[..end]).unwrap();
    let capacity = v1["dump"]["capacity"].as_u64().unwrap();
    let dump_path = env.path_of(&moved_dump).await;
    let sha256 = ramsnap_common::checksum::digest_file(
        &dump_path,
        capacity,
        ramsnap_common::checksum::Algorithm::Sha256,
    )
    .unwrap()
    .checksum;
    env.teardown(&moved_dump).await;
    v1["version"] = 1.into();
    let dump = v1["dump"].as_object_mut().unwrap();
    dump.remove("checksum");
    dump.insert("sha256".into(), sha256.hex().into());
    let mut doc = serde_json::to_vec(&v1).unwrap();
    doc.resize(MIB as usize, 0);
    env.write_bytes(&moved_meta, 0, &doc).await;
    let mut q = req();
    q.expected_checksum = sha256.hex();
    let v = env.verify_memory(q).await.unwrap();
    assert_eq!(v.checksum, sha256.to_string());
    env.flip_byte(&moved_dump, at).await;
    let mut q = req();
    q.expected_checksum.clear();
    let st = env.verify_memory(q).await.unwrap_err();
    assert_eq!(precondition_kind(&st), "MEMORY_DUMP_CORRUPT", "{st:?}");
    env.flip_byte(&moved_dump, at).await;
    env.write_bytes(&moved_meta, 0, &before).await;

    // Verified and rebound to the BLOCK domain.
    let started = std::time::Instant::now();
    let mut q = req();
    q.rebind_disk_domain_id = block.clone();
    let v = env.verify_memory(q).await.unwrap();
    eprintln!(
        "verify + rebind of a {} MiB dump volume on BLOCK: {} ms",
        v.capacity / MIB,
        started.elapsed().as_millis()
    );
    assert!(v.rebound);
    assert_eq!(v.checksum, sha);
    assert_eq!(v.dump_bytes, taken.result.dump_bytes);
    assert_eq!(v.disks, vec![frozen.clone()]);
    let v = env.verify_memory(req()).await.unwrap();
    assert_eq!((v.rebound, v.disks), (false, vec![frozen.clone()]));

    // The same guest resumes on the BLOCK domain from the moved memory.
    let mark = env.console(&g.id).await.len();
    assert_eq!(
        env.run(&spec, Some(moved.clone())).await.unwrap(),
        hpb::VmStatus::Up
    );
    let lines = env.wait_ticks(&g.id, mark, 2, Duration::from_secs(30)).await;
    assert!(
        !lines
            .iter()
            .any(|l| matches!(l, Line::Boot { .. } | Line::Mismatch(_) | Line::Error(_))),
        "the guest rebooted or saw the wrong disk: {lines:?}"
    );
    let t = ticks(&lines);
    assert!(t.iter().all(|(tok, _)| *tok == g.token), "{t:?}");
    assert!(
        t[0].1 > taken.counter_before && t[0].1 <= taken.counter_after + 2,
        "counter after restore {}, snapshot between {} and {}",
        t[0].1,
        taken.counter_before,
        taken.counter_after
    );
    let leaf_path = env.path_of(&leaf).await;
    assert_eq!(
        env.live_disks(&g.id),
        vec![("vda".to_string(), leaf_path.display().to_string())]
    );
    // Verifying the memory of the running VM leaves it and its disks alone.
    let v = env.verify_memory(req()).await.unwrap();
    assert_eq!(v.checksum, sha);
    assert_eq!(env.status(&g.id).await, hpb::VmStatus::Up);
    assert_eq!(
        env.live_disks(&g.id),
        vec![("vda".to_string(), leaf_path.display().to_string())]
    );
    env.stop(&g.id, 0).await;
    assert_eq!(
        loops_over(&pv),
        0,
        "something stayed prepared on the BLOCK domain"
    );
}

/// A fork, as the host sees it: the memory pair copied (to the BLOCK
/// domain), then given to another VM with VerifyMemory's rebrand_vm_id.
/// A corrupt dump is refused with nothing written; a pair whose header was
/// given before the metadata (a crash between the two) is finished by the
/// retry; a retry of a given pair writes nothing more; the source VM's id
/// no longer owns it; and the other VM, with its own name and UUID in
/// libvirt, resumes the same guest from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_memory_gives_a_pair_to_another_vm_which_resumes_from_it() {
    use ramsnap_host::metadata;
    let _guest = GUESTS.acquire().await.unwrap();
    let mut env = Env::new("give", real_env()).await;
    let mut g = boot(&mut env, false, 256, "").await;
    let taken = take_memory_snapshot(&mut env, &mut g, false, false).await;
    env.stop(&g.id, 0).await;
    let sha = taken.result.dump_checksum.clone();

    let block = env.block_domain.clone();
    let pair = common::MemoryVolumeRef {
        dump: Some(
            env.copy_same_ids(taken.memory.dump.as_ref().unwrap(), &block)
                .await,
        ),
        metadata: Some(
            env.copy_same_ids(taken.memory.metadata.as_ref().unwrap(), &block)
                .await,
        ),
    };
    let (dump, meta) = (pair.dump.clone().unwrap(), pair.metadata.clone().unwrap());
    let frozen = env.copy_same_ids(&taken.frozen, &block).await;
    let leaf = env.child_of(&frozen).await;
    let source: uuid::Uuid = g.id.parse().unwrap();
    let fork = uuid::Uuid::new_v4();
    let req = || hpb::VerifyMemoryRequest {
        vm_id: g.id.clone(),
        memory: Some(pair.clone()),
        rebind_disks: vec![frozen.clone()],
        rebrand_vm_id: fork.to_string(),
        ..Default::default()
    };
    let meta_before = env.volume_bytes(&meta, MIB).await;
    let dump_path = env.path_of(&dump).await;
    let head = metadata::read_save_head(&dump_path)
        .unwrap()
        .expect("a libvirt save image");
    env.teardown(&dump).await;
    assert_eq!(metadata::head_owner(&head, source, fork), Some(source));

    // A flipped byte: MEMORY_DUMP_CORRUPT, neither header nor metadata written.
    let at = taken.result.dump_bytes / 2;
    env.flip_byte(&dump, at).await;
    let st = env.verify_memory(req()).await.unwrap_err();
    assert_eq!(precondition_kind(&st), "MEMORY_DUMP_CORRUPT", "{st:?}");
    assert_eq!(env.volume_bytes(&meta, MIB).await, meta_before);
    let dump_path = env.path_of(&dump).await;
    assert_eq!(metadata::read_save_head(&dump_path).unwrap().unwrap(), head);
    env.teardown(&dump).await;
    env.flip_byte(&dump, at).await;

    // Half given: the header names the fork, the metadata the source (a
    // crash between the two writes). The retry checks the dump against the
    // recorded value as the source wrote it, and finishes.
    let dump_path = env.path_of(&dump).await;
    metadata::write_head(&dump_path, &metadata::replace_id(&head, source, fork)).unwrap();
    env.teardown(&dump).await;
    let started = std::time::Instant::now();
    let v = env.verify_memory(req()).await.unwrap();
    eprintln!(
        "giving a {} MiB dump volume on BLOCK to another VM: {} ms",
        v.capacity / MIB,
        started.elapsed().as_millis()
    );
    assert!(v.rebound);
    assert_ne!(v.checksum, sha, "the header changed, so did the checksum");
    assert_eq!(v.disks, vec![frozen.clone()]);
    let given = v.checksum.clone();
    // Again: given already; the same value, nothing more to write.
    let v = env.verify_memory(req()).await.unwrap();
    assert_eq!(v.checksum, given);
    let meta_given = env.volume_bytes(&meta, MIB).await;
    let v = env.verify_memory(req()).await.unwrap();
    assert_eq!(v.checksum, given);
    assert_eq!(env.volume_bytes(&meta, MIB).await, meta_given);
    // The source no longer owns it.
    let st = env
        .verify_memory(hpb::VerifyMemoryRequest {
            vm_id: g.id.clone(),
            memory: Some(pair.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(precondition_kind(&st), "MEMORY_VM_MISMATCH", "{st:?}");

    // The fork resumes the same guest: same token, the counter going on.
    let mut spec = g.spec.clone();
    spec.vm_id = fork.to_string();
    spec.name = format!("fork-of-{}", g.id);
    spec.disks[0].volume = Some(leaf.clone());
    // A new VM: its console starts empty.
    let mark = 0;
    assert_eq!(
        env.run(&spec, Some(pair.clone())).await.unwrap(),
        hpb::VmStatus::Up
    );
    let lines = env
        .wait_ticks(&spec.vm_id, mark, 2, Duration::from_secs(30))
        .await;
    assert!(
        !lines
            .iter()
            .any(|l| matches!(l, Line::Boot { .. } | Line::Mismatch(_) | Line::Error(_))),
        "the fork rebooted or saw the wrong disk: {lines:?}"
    );
    let t = ticks(&lines);
    assert!(t.iter().all(|(tok, _)| *tok == g.token), "{t:?}");
    assert!(
        t[0].1 > taken.counter_before && t[0].1 <= taken.counter_after + 2,
        "counter after restore {}, snapshot between {} and {}",
        t[0].1,
        taken.counter_before,
        taken.counter_after
    );
    env.stop(&spec.vm_id, 0).await;
}

/// A host that cannot take the saved guest is refused before anything
/// starts (issue 13, item 3): the machine type, then the CPU model, of the
/// domain XML in the dump's header changed to ones this host lacks:
/// HOST_CANNOT_TAKE_GUEST naming it, the VM down, no domain, the memory
/// left as it is; put back, the same run resumes the guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_cannot_take_the_guest_is_refused_before_the_restore() {
    use ramsnap_host::metadata;
    let _guest = GUESTS.acquire().await.unwrap();
    let mut env = Env::new("takes", real_env()).await;
    let mut g = boot(&mut env, false, 256, "").await;
    let taken = take_memory_snapshot(&mut env, &mut g, false, false).await;
    env.stop(&g.id, 0).await;
    let dump = taken.memory.dump.clone().unwrap();
    let path = env.path_of(&dump).await;
    let head = metadata::read_save_head(&path)
        .unwrap()
        .expect("a libvirt save image");
    let text = String::from_utf8_lossy(&head).to_string();
    let machine = text
        .split("machine='")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .expect("the saved machine type")
        .to_string();
    assert!(machine.starts_with("pc-i440fx-"), "{machine}");
    let lacking = format!("pc-i440fx-{}", "0".repeat(machine.len() - "pc-i440fx-".len()));
    let mut spec = g.spec.clone();
    spec.disks[0].volume = Some(env.child_of(&taken.frozen).await);
    let meta = taken.memory.metadata.clone().unwrap();
    let meta_before = env.volume_bytes(&meta, MIB).await;
    let end = meta_before.iter().position(|&b| b == 0).unwrap();
    let meta_doc: serde_json::Value = serde_json::from_slice(&meta_before[..end]).unwrap();
    let capacity = meta_doc["dump"]["capacity"].as_u64().unwrap();
    for (from, to, named) in [
        (
            format!("machine='{machine}'"),
            format!("machine='{lacking}'"),
            lacking.clone(),
        ),
        (
            ">qemu64<".to_string(),
            ">phenom<".to_string(),
            "CPU model phenom".to_string(),
        ),
    ] {
        let at = head
            .windows(from.len())
            .position(|w| w == from.as_bytes())
            .expect("the saved value");
        let mut changed = head.clone();
        changed[at..at + to.len()].copy_from_slice(to.as_bytes());
        // A sound dump of a guest this host cannot run: the header changed,
        // and the metadata records the changed dump's checksum.
        let path = env.path_of(&dump).await;
        metadata::write_head(&path, &changed).unwrap();
        let sum = ramsnap_common::checksum::digest_file(
            &path,
            capacity,
            ramsnap_common::checksum::Algorithm::Blake3Chunks,
        )
        .unwrap()
        .checksum;
        env.teardown(&dump).await;
        let mut doc = meta_doc.clone();
        doc["dump"]["checksum"] = sum.to_string().into();
        let mut bytes = serde_json::to_vec(&doc).unwrap();
        bytes.resize(meta_before.len(), 0);
        env.write_bytes(&meta, 0, &bytes).await;
        let st = env.run(&spec, Some(taken.memory.clone())).await.unwrap_err();
        assert_eq!(precondition_kind(&st), "HOST_CANNOT_TAKE_GUEST", "{st:?}");
        eprintln!("refused: {}", st.message());
        assert!(st.message().contains(&named), "{named}: {st:?}");
        assert_eq!(env.status(&g.id).await, hpb::VmStatus::Down);
        assert!(!env.domain_exists(&g.id));
    }
    let path = env.path_of(&dump).await;
    metadata::write_head(&path, &head).unwrap();
    env.teardown(&dump).await;
    env.write_bytes(&meta, 0, &meta_before).await;
    let mark = env.console(&g.id).await.len();
    assert_eq!(
        env.run(&spec, Some(taken.memory.clone())).await.unwrap(),
        hpb::VmStatus::Up
    );
    let lines = env.wait_ticks(&g.id, mark, 2, Duration::from_secs(30)).await;
    assert!(ticks(&lines).iter().all(|(t, _)| *t == g.token), "{lines:?}");
    env.stop(&g.id, 0).await;
}

/// The wait for a job that an earlier agent process left running in
/// libvirt (a snapshot it began before it died): a live memory dump runs
/// on the domain from another libvirt client; libvirt's control state says
/// OK for most of it (the async job waits for QEMU between monitor calls),
/// and `wait_for_jobs` returns only once that client's job has ended: the
/// client (virsh) exits right after, not a dump's length later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_libvirts_jobs_outlasts_another_clients_live_dump() {
    let _guest = GUESTS.acquire().await.unwrap();
    let mut env = Env::new("barrier", real_env()).await;
    // A 1 GiB guest: its memory-only dump (every page, zeros included)
    // takes well over a second here.
    let g = boot(&mut env, false, 1024, "ramsnap.fill=600").await;
    let id: uuid::Uuid = g.id.parse().unwrap();
    let hv = ramsnap_host::libvirt::Hypervisor::open("qemu:///system")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("core");
    let domain = env.domain_name(&g.id);
    let mut dump = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system", "dump", "--live", "--memory-only", &domain])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The job is under way once the dump file grows.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "the dump never began");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let began = std::time::Instant::now();
    hv.wait_for_jobs(id, Duration::from_secs(120)).await.unwrap();
    let returned = std::time::Instant::now();
    let exited = tokio::task::spawn_blocking(move || {
        let status = dump.wait().unwrap();
        (status, std::time::Instant::now())
    })
    .await
    .unwrap();
    assert!(exited.0.success(), "virsh dump: {:?}", exited.0);
    let lag = exited.1.duration_since(returned);
    eprintln!(
        "dump ran {:?} after it began writing; wait_for_jobs returned {:?} in, virsh exited {lag:?} after that",
        exited.1.duration_since(began),
        returned.duration_since(began)
    );
    assert!(
        lag < Duration::from_millis(500),
        "wait_for_jobs returned {lag:?} before another client's dump ended"
    );
    // With no job, at once; the domain is untouched.
    let t = std::time::Instant::now();
    hv.wait_for_jobs(id, Duration::from_secs(10)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let mark = env.console(&g.id).await.len();
    let lines = env.wait_ticks(&g.id, mark, 2, Duration::from_secs(30)).await;
    assert!(ticks(&lines).iter().all(|(t, _)| *t == g.token), "{lines:?}");
    env.stop(&g.id, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_a_dump_leaves_the_vm_running_and_nothing_half_made() {
    let _guest = GUESTS.acquire().await.unwrap();
    let mut env = Env::new("cancel", real_env()).await;
    // 600 MiB of random data in a 1 GiB guest: a dump of about 700 MB,
    // which lasts long enough to be cancelled while it is written.
    let mut g = boot(&mut env, false, 1024, "ramsnap.fill=600").await;
    let frozen = g.leaf();
    let frozen_path = env.path_of(&frozen).await;
    let overlay = env.child_of(&frozen).await;
    let memory = env.memory_volumes(false, 1024 * MIB, true).await;
    // Under load libvirt may finish the dump between the first progress
    // report and the cancel; the host then undoes the finished snapshot
    // (also correct, and covered by the next test). Try again until the
    // cancel lands during the dump, as this test is about.
    let mut attempt = 0;
    let job_id = loop {
        attempt += 1;
        let req = snapshot_req(&g, &overlay, Some(memory.clone()), true, "3.3");
        let job_id = req.job_id.clone();
        let mut stream = env.host.snapshot_vm(req).await.unwrap().into_inner();
        // Wait until libvirt reports bytes written, then cancel.
        let seen = loop {
            let msg = stream
                .message()
                .await
                .unwrap()
                .expect("the stream goes on until the dump is cancelled");
            assert!(
                msg.result.is_none(),
                "the dump finished before it could be cancelled"
            );
            let processed = msg.progress.map(|p| p.processed_bytes).unwrap_or(0);
            if processed > 0 {
                break processed;
            }
        };
        let cancelled = env
            .host
            .clone()
            .cancel_snapshot(hpb::CancelSnapshotRequest {
                job_id: job_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .cancelled;
        assert!(cancelled, "the job was running ({seen} bytes processed)");
        let end = loop {
            match stream.message().await {
                Ok(Some(m)) => assert!(m.result.is_none(), "a cancelled snapshot has no result"),
                Ok(None) => panic!("the stream ended without the cancellation"),
                Err(e) => break e,
            }
        };
        assert_eq!(end.code(), Code::Cancelled, "{end:?}");
        if end.message().contains("aborted") {
            break job_id;
        }
        assert!(
            attempt < 3,
            "libvirt's job was never aborted during the dump in {attempt} attempts: {end:?}"
        );
        eprintln!("attempt {attempt}: the dump finished before the cancel ({end:?}); again");
        assert_eq!(
            env.live_disks(&g.id),
            vec![("vda".to_string(), frozen_path.display().to_string())],
            "a snapshot undone after the dump leaves the VM on its previous disk"
        );
    };

    let mut canceller = env.host.clone();
    // The VM runs on, on its previous disk, with the same memory.
    assert_eq!(env.status(&g.id).await, hpb::VmStatus::Up);
    assert_eq!(
        env.live_disks(&g.id),
        vec![("vda".to_string(), frozen_path.display().to_string())]
    );
    let mark = env.console(&g.id).await.len();
    let lines = env.wait_ticks(&g.id, mark, 2, Duration::from_secs(30)).await;
    assert!(ticks(&lines).iter().all(|(t, _)| *t == g.token));
    assert!(!lines
        .iter()
        .any(|l| matches!(l, Line::Boot { .. } | Line::Mismatch(_))));
    // Nothing half-made: the dump volume is empty, the metadata untouched.
    let dump_path = env.path_of(memory.dump.as_ref().unwrap()).await;
    assert_eq!(std::fs::metadata(&dump_path).unwrap().len(), 0);
    let meta_path = env.path_of(memory.metadata.as_ref().unwrap()).await;
    assert!(read_bytes(&meta_path, 1 << 20).iter().all(|&b| b == 0));
    // A second cancel finds nothing to cancel.
    let again = canceller
        .cancel_snapshot(hpb::CancelSnapshotRequest { job_id })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.cancelled);

    // Cancelled once libvirt has finished (the guest is UP again, the host
    // still checksums the dump): the overlay is merged back into the disk,
    // and emptied, so that it can be used again.
    let mut watch = env
        .host
        .watch_vm_status(hpb::WatchVmStatusRequest { vm_id: g.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let req = snapshot_req(&g, &overlay, Some(memory.clone()), true, "3.3");
    let job_id = req.job_id.clone();
    let mut stream = env.host.snapshot_vm(req).await.unwrap().into_inner();
    let mut saving = false;
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), watch.next())
            .await
            .expect("a status change")
            .unwrap()
            .unwrap();
        match ev.status() {
            hpb::VmStatus::SavingState => saving = true,
            hpb::VmStatus::Up if saving => break,
            _ => {}
        }
    }
    let mark = env.console(&g.id).await.len();
    let cancelled = canceller
        .cancel_snapshot(hpb::CancelSnapshotRequest { job_id })
        .await
        .unwrap()
        .into_inner()
        .cancelled;
    let r = if cancelled {
        let end = loop {
            match stream.message().await {
                Ok(Some(m)) => assert!(m.result.is_none(), "a cancelled snapshot has no result"),
                Ok(None) => panic!("the stream ended without the cancellation"),
                Err(e) => break e,
            }
        };
        assert_eq!(end.code(), Code::Cancelled, "{end:?}");
        assert!(end.message().contains("merged back"), "{end:?}");
        assert_eq!(env.status(&g.id).await, hpb::VmStatus::Up);
        assert_eq!(
            env.live_disks(&g.id),
            vec![("vda".to_string(), frozen_path.display().to_string())]
        );
        assert_eq!(std::fs::metadata(&dump_path).unwrap().len(), 0);
        assert!(read_bytes(&meta_path, 1 << 20).iter().all(|&b| b == 0));

        // The same overlay and memory volumes take the snapshot afterwards, and
        // the guest, now on the overlay, sees its disk as it left it.
        let (_, r) = snapshot(
            &mut env.host,
            snapshot_req(&g, &overlay, Some(memory), true, "3.3"),
        )
        .await;
        r.expect("the snapshot after a cancel")
    } else {
        // The job had passed its last check (the checksum after libvirt
        // takes milliseconds now): the cancel says so, and the snapshot
        // stands, as the snapshot after a cancel would have. (A cancel
        // after libvirt's part is still undone in the first attempts
        // above whenever libvirt finished first.)
        eprintln!("the cancel came after the job's last check: the snapshot stands");
        loop {
            let m = stream.message().await.unwrap().expect("the snapshot's result");
            if let Some(r) = m.result {
                break r;
            }
        }
    };
    assert!(r.memory_saved);
    let overlay_path = env.path_of(&overlay).await;
    assert_eq!(
        env.live_disks(&g.id),
        vec![("vda".to_string(), overlay_path.display().to_string())]
    );
    let lines = env.wait_ticks(&g.id, mark, 3, Duration::from_secs(30)).await;
    assert!(
        !lines
            .iter()
            .any(|l| matches!(l, Line::Boot { .. } | Line::Mismatch(_))),
        "{lines:?}"
    );
    g.spec.disks[0].volume = Some(overlay);
    env.stop(&g.id, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_small_dump_volumes_fail_cleanly_and_old_clusters_take_disk_only_snapshots() {
    let _guest = GUESTS.acquire().await.unwrap();
    let mut env = Env::new("small", real_env()).await;
    let mut g = boot(&mut env, false, 256, "").await;
    let frozen = g.leaf();
    let frozen_path = env.path_of(&frozen).await;
    let overlay = env.child_of(&frozen).await;

    for block in [false, true] {
        let domain = env.domain(block);
        let volume = |purpose: spb::VolumePurpose, capacity: u64| spb::CreateVolumeRequest {
            domain_id: domain.clone(),
            capacity_bytes: capacity,
            format: spb::VolumeFormat::Raw as i32,
            purpose: purpose as i32,
            ..Default::default()
        };
        // 32 MiB for a 256 MiB guest whose dump is about 65 MB.
        let dump = env
            .create_volume(volume(spb::VolumePurpose::MemoryDump, 32 * MIB))
            .await;
        let meta = env
            .create_volume(volume(spb::VolumePurpose::MemoryMetadata, MIB))
            .await;
        let memory = common::MemoryVolumeRef {
            dump: dump.r#ref.clone(),
            metadata: meta.r#ref.clone(),
        };
        let (_, r) = snapshot(
            &mut env.host,
            snapshot_req(&g, &overlay, Some(memory.clone()), false, "3.3"),
        )
        .await;
        let st = r.expect_err("a dump larger than its volume fails");
        assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");

        assert_eq!(env.status(&g.id).await, hpb::VmStatus::Up);
        assert_eq!(
            env.live_disks(&g.id),
            vec![("vda".to_string(), frozen_path.display().to_string())]
        );
        let dump_path = env.path_of(dump.r#ref.as_ref().unwrap()).await;
        let data = read_bytes(&dump_path, 32 << 20);
        assert!(data.iter().all(|&b| b == 0), "the dump volume was scrubbed");
        if !block {
            assert_eq!(data.len(), 0);
        }
        let meta_path = env.path_of(meta.r#ref.as_ref().unwrap()).await;
        assert!(read_bytes(&meta_path, 1 << 20).iter().all(|&b| b == 0));
        env.teardown(dump.r#ref.as_ref().unwrap()).await;
        env.teardown(meta.r#ref.as_ref().unwrap()).await;
        let mark = env.console(&g.id).await.len();
        let lines = env.wait_ticks(&g.id, mark, 2, Duration::from_secs(30)).await;
        assert!(ticks(&lines).iter().all(|(t, _)| *t == g.token));
        assert!(!lines.iter().any(|l| matches!(l, Line::Mismatch(_))));
    }

    // A cluster below 3.3 never saves memory: a disk-only snapshot even
    // with memory volumes given, which stay untouched.
    let memory = env.memory_volumes(false, 256 * MIB, false).await;
    let (_, r) = snapshot(
        &mut env.host,
        snapshot_req(&g, &overlay, Some(memory.clone()), false, "3.2"),
    )
    .await;
    let r = r.expect("disk-only snapshot");
    assert!(!r.memory_saved);
    assert_eq!(r.dump_bytes, 0);
    let overlay_path = env.path_of(&overlay).await;
    assert_eq!(
        env.live_disks(&g.id),
        vec![("vda".to_string(), overlay_path.display().to_string())]
    );
    // Untouched: the sparse dump file holds no data at all.
    let dump_path = env.path_of(memory.dump.as_ref().unwrap()).await;
    assert_eq!(
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&dump_path).unwrap()),
        0
    );
    g.spec.disks[0].volume = Some(overlay.clone());

    // Without memory volumes: disk-only as well.
    let next = env.child_of(&overlay).await;
    let (_, r) = snapshot(&mut env.host, snapshot_req(&g, &next, None, true, "")).await;
    assert!(!r.expect("disk-only snapshot").memory_saved);
    let next_path = env.path_of(&next).await;
    assert_eq!(
        env.live_disks(&g.id),
        vec![("vda".to_string(), next_path.display().to_string())]
    );
    let lines = env.wait_ticks(&g.id, 0, 3, Duration::from_secs(30)).await;
    assert!(!lines.iter().any(|l| matches!(l, Line::Mismatch(_))));
    env.stop(&g.id, 0).await;
}

/// SuspendVm (hibernate): the guest's memory into a pair and the guest
/// gone, its disk untouched (no overlay); a retry answers as the first
/// call did; RunVm with the pair resumes it on the very same leaf
/// (RESTORING_STATE, then UP, the same boot token, the counter going on).
/// Then once more with the disk on BLOCK and the memory on BLOCK. Bad
/// requests (disks that are not the leaves, an unknown VM) change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_saves_the_guest_without_an_overlay_and_run_resumes_it() {
    let _guest = GUESTS.acquire().await.unwrap();
    let mut env = Env::new("suspend", real_env()).await;
    for on_block in [false, true] {
        let g = boot(&mut env, on_block, 256, "").await;
        let leaf = g.leaf();
        let memory = env.memory_volumes(on_block, g.memory_mib * MIB, false).await;
        let snapshot_id = uuid::Uuid::new_v4().to_string();
        let req = |disks: Vec<common::VolumeRef>, vm: &str| hpb::SuspendVmRequest {
            vm_id: vm.to_string(),
            snapshot_id: snapshot_id.clone(),
            disks,
            memory: Some(memory.clone()),
        };

        // Hostile first: another volume as the disk, an unknown VM.
        let other = env.child_of(&leaf).await;
        let st = env
            .host
            .suspend_vm(req(vec![other.clone()], &g.id))
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
        assert_eq!(env.status(&g.id).await, hpb::VmStatus::Up);
        env.delete_volume(&other).await;
        let stranger = uuid::Uuid::new_v4().to_string();
        let st = env
            .host
            .suspend_vm(req(vec![leaf.clone()], &stranger))
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
        let st = env
            .host
            .suspend_vm(hpb::SuspendVmRequest {
                memory: None,
                ..req(vec![leaf.clone()], &g.id)
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");

        let counter_before = last_tick(&env.console(&g.id).await, &g.token);
        let r = env
            .host
            .suspend_vm(req(vec![leaf.clone()], &g.id))
            .await
            .expect("suspend")
            .into_inner();
        eprintln!(
            "suspend (disk and memory on {}): {} ms, dump {} bytes",
            if on_block { "BLOCK" } else { "FILE" },
            r.duration_ms,
            r.dump_bytes
        );
        assert!(!r.saved_earlier);
        assert!(r.dump_bytes > 8 * MIB, "{r:?}");
        assert!(r.dump_checksum.starts_with("blake3-4m:"), "{r:?}");
        assert_eq!(env.status(&g.id).await, hpb::VmStatus::Down);
        assert!(!env.domain_exists(&g.id));
        let counter_after = last_tick(&env.console(&g.id).await, &g.token);
        // The metadata binds the disk to its leaf, with no overlay.
        let meta = memory.metadata.clone().unwrap();
        let bytes = env.volume_bytes(&meta, MIB).await;
        let end = bytes.iter().position(|&b| b == 0).unwrap();
        let md: serde_json::Value = serde_json::from_slice(&bytes[..end]).unwrap();
        assert_eq!(md["vm_id"], g.id.as_str());
        assert_eq!(md["snapshot_id"], snapshot_id.as_str());
        assert_eq!(md["disks"][0]["current"]["volume"], leaf.volume_id.as_str());
        assert_eq!(md["disks"][0]["overlay"]["volume"], leaf.volume_id.as_str());
        assert_eq!(md["dump"]["checksum"], r.dump_checksum.as_str());

        // A retry (the coordinator lost the answer) gets the same answer.
        let again = env
            .host
            .suspend_vm(req(vec![leaf.clone()], &g.id))
            .await
            .expect("suspend retried")
            .into_inner();
        assert!(again.saved_earlier);
        assert_eq!(again.dump_checksum, r.dump_checksum);
        assert_eq!(again.dump_bytes, r.dump_bytes);

        // Resume on the same leaf.
        let mut watch = env
            .host
            .watch_vm_status(hpb::WatchVmStatusRequest { vm_id: g.id.clone() })
            .await
            .unwrap()
            .into_inner();
        let mark = env.console(&g.id).await.len();
        assert_eq!(
            env.run(&g.spec, Some(memory.clone())).await.unwrap(),
            hpb::VmStatus::Up
        );
        assert_eq!(
            collect_until_up(&mut watch).await,
            vec![
                hpb::VmStatus::Down,
                hpb::VmStatus::RestoringState,
                hpb::VmStatus::Up
            ]
        );
        let lines = env.wait_ticks(&g.id, mark, 2, Duration::from_secs(30)).await;
        assert!(
            !lines
                .iter()
                .any(|l| matches!(l, Line::Boot { .. } | Line::Mismatch(_) | Line::Error(_))),
            "the guest rebooted or saw the wrong disk: {lines:?}"
        );
        let t = ticks(&lines);
        assert!(t.iter().all(|(tok, _)| *tok == g.token), "{t:?}");
        assert!(
            t[0].1 > counter_before && t[0].1 <= counter_after + 2,
            "counter after resume {}, suspended between {counter_before} and {counter_after}",
            t[0].1
        );
        let leaf_path = env.path_of(&leaf).await;
        assert_eq!(
            env.live_disks(&g.id),
            vec![("vda".to_string(), leaf_path.display().to_string())]
        );
        env.stop(&g.id, 0).await;
    }
}

/// Live merge (CommitVolume): the guest runs on base ← O1 ← O2 after two
/// disk-only snapshots. O1 (inside the chain) is committed into base: the
/// guest now reads base ← O2, and the storage service, told
/// (DropCommittedVolume), records O2's new parent and deletes O1. A retry
/// answers done. Then O2, the leaf, is committed into base (active commit):
/// the guest runs on base. Throughout, the guest keeps counting under the
/// same boot token and finds on its disk what it wrote (no
/// RAMSNAP-DISK-MISMATCH). On FILE, then BLOCK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_volume_merges_a_running_guests_chain_while_it_runs() {
    let _guest = GUESTS.acquire().await.unwrap();
    let mut env = Env::new("merge", real_env()).await;
    for on_block in [false, true] {
        let mut g = boot(&mut env, on_block, 256, "").await;
        let base = g.leaf();
        let mut chain = vec![base.clone()];
        for _ in 0..2 {
            let overlay = env.child_of(&g.leaf()).await;
            let (_, r) = snapshot(&mut env.host, snapshot_req(&g, &overlay, None, false, "3.3")).await;
            assert!(!r.expect("disk-only snapshot").memory_saved);
            g.spec.disks[0].volume = Some(overlay.clone());
            chain.push(overlay);
        }
        let (o1, o2) = (chain[1].clone(), chain[2].clone());
        let mark = env.console(&g.id).await.len();
        let commit = |top: &common::VolumeRef, base: &common::VolumeRef| hpb::CommitVolumeRequest {
            vm_id: g.id.clone(),
            top: Some(top.clone()),
            base: Some(base.clone()),
        };

        // Hostile: the order reversed, a base that is not right below.
        let st = env.host.commit_volume(commit(&base, &o1)).await.unwrap_err();
        assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
        assert_eq!(precondition_kind(&st), "VOLUME_NOT_IN_CHAIN", "{st:?}");
        let st = env.host.commit_volume(commit(&o2, &base)).await.unwrap_err();
        assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
        let st = env.host.commit_volume(commit(&o1, &o1)).await.unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
        // Volumes that are not this VM's: another image's child and its
        // parent, in the right order, are refused and left as they were.
        let other = env.new_disk(on_block).await;
        let other_child = env.child_of(&other).await;
        let st = env
            .host
            .commit_volume(commit(&other_child, &other))
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
        assert_eq!(precondition_kind(&st), "VOLUME_NOT_IN_CHAIN", "{st:?}");
        env.delete_volume(&other_child).await;
        env.delete_volume(&other).await;
        // A 5 MB VM id: refused whole, before any handler.
        let st = env
            .host
            .commit_volume(hpb::CommitVolumeRequest {
                vm_id: "x".repeat(5 << 20),
                ..commit(&o1, &base)
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                st.code(),
                Code::OutOfRange | Code::InvalidArgument | Code::ResourceExhausted
            ),
            "{st:?}"
        );
        // Not committed yet: the storage service refuses to drop it.
        let st = env
            .storage
            .drop_committed_volume(spb::DropCommittedVolumeRequest {
                request_id: String::new(),
                r#ref: Some(o1.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");

        // O1, inside the chain, into base.
        let r = env
            .host
            .commit_volume(commit(&o1, &base))
            .await
            .expect("commit O1")
            .into_inner();
        assert!(!r.was_leaf && !r.done_earlier, "{r:?}");
        eprintln!(
            "live merge of an inner volume ({}): {} ms",
            kind(on_block),
            r.duration_ms
        );
        let again = env
            .host
            .commit_volume(commit(&o1, &base))
            .await
            .expect("retry")
            .into_inner();
        assert!(again.done_earlier, "{again:?}");
        let o2_path = env.path_of(&o2).await;
        assert_eq!(
            env.live_disks(&g.id),
            vec![("vda".to_string(), o2_path.display().to_string())]
        );
        let drop_req = |r: &common::VolumeRef, id: &str| spb::DropCommittedVolumeRequest {
            request_id: id.to_string(),
            r#ref: Some(r.clone()),
        };
        let rid = uuid::Uuid::new_v4().to_string();
        env.storage
            .drop_committed_volume(drop_req(&o1, &rid))
            .await
            .expect("drop O1");
        env.storage
            .drop_committed_volume(drop_req(&o1, &rid))
            .await
            .expect("drop O1 retried");
        let o2_now = env
            .storage
            .get_volume(spb::GetVolumeRequest {
                r#ref: Some(o2.clone()),
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(o2_now.parent_volume_id, base.volume_id, "O2 now reads base");
        let lines = env.wait_ticks(&g.id, mark, 3, Duration::from_secs(30)).await;
        assert_clean(&lines, &g.token);

        // O2, the leaf, into base: the guest runs on base.
        let mark = env.console(&g.id).await.len();
        let r = env
            .host
            .commit_volume(commit(&o2, &base))
            .await
            .expect("commit O2")
            .into_inner();
        assert!(r.was_leaf && !r.done_earlier, "{r:?}");
        eprintln!(
            "live merge of the leaf ({}): {} ms",
            kind(on_block),
            r.duration_ms
        );
        let base_path = env.path_of(&base).await;
        assert_eq!(
            env.live_disks(&g.id),
            vec![("vda".to_string(), base_path.display().to_string())]
        );
        env.storage
            .drop_committed_volume(drop_req(&o2, ""))
            .await
            .expect("drop O2");
        let lines = env.wait_ticks(&g.id, mark, 3, Duration::from_secs(30)).await;
        assert_clean(&lines, &g.token);
        env.stop(&g.id, 0).await;
    }
}

fn kind(block: bool) -> &'static str {
    if block {
        "BLOCK"
    } else {
        "FILE"
    }
}

/// The guest went on (its token) and saw its disk as it wrote it.
fn assert_clean(lines: &[Line], token: &str) {
    assert!(
        !lines
            .iter()
            .any(|l| matches!(l, Line::Boot { .. } | Line::Mismatch(_) | Line::Error(_))),
        "the guest rebooted or saw the wrong disk: {lines:?}"
    );
    assert!(ticks(lines).iter().all(|(t, _)| t == token), "{lines:?}");
}

/// A save libvirt finished for an agent that could not record it (it died,
/// here: the save is made with virsh behind the agent's back, under the
/// mark a SuspendVm writes first): the SuspendVm retry finds the guest gone
/// and the pair marked for this VM and snapshot, checks the save image is
/// this VM's, checksums it and records it; the memory then resumes the guest.
/// And a live merge a dead agent left half-done (an active block commit
/// ready to pivot, started with virsh): CommitVolume settles it and answers
/// done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_and_commit_finish_what_a_dead_agent_left_in_libvirt() {
    use ramsnap_host::metadata;
    let _guest = GUESTS.acquire().await.unwrap();
    let mut env = Env::new("leftover", real_env()).await;
    let mut g = boot(&mut env, false, 256, "").await;

    // A block commit left ready to pivot.
    let base = g.leaf();
    let overlay = env.child_of(&base).await;
    let (_, r) = snapshot(&mut env.host, snapshot_req(&g, &overlay, None, false, "3.3")).await;
    r.expect("disk-only snapshot");
    g.spec.disks[0].volume = Some(overlay.clone());
    let out = std::process::Command::new("virsh")
        .args([
            "-c",
            "qemu:///system",
            "blockcommit",
            &env.domain_name(&g.id),
            "vda",
            "--active",
            "--shallow",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = env
        .host
        .commit_volume(hpb::CommitVolumeRequest {
            vm_id: g.id.clone(),
            top: Some(overlay.clone()),
            base: Some(base.clone()),
        })
        .await
        .expect("CommitVolume after a leftover job")
        .into_inner();
    assert!(r.done_earlier && r.was_leaf, "{r:?}");
    let base_path = env.path_of(&base).await;
    assert_eq!(
        env.live_disks(&g.id),
        vec![("vda".to_string(), base_path.display().to_string())]
    );
    env.storage
        .drop_committed_volume(spb::DropCommittedVolumeRequest {
            request_id: String::new(),
            r#ref: Some(overlay.clone()),
        })
        .await
        .expect("drop the merged leaf");
    g.spec.disks[0].volume = Some(base.clone());

    // A save under SuspendVm's mark, the agent never told.
    let memory = env.memory_volumes(false, g.memory_mib * MIB, false).await;
    let snapshot_id = uuid::Uuid::new_v4();
    let meta = memory.metadata.clone().unwrap();
    let meta_path = env.path_of(&meta).await;
    metadata::mark_dump_in_progress(&meta_path, MIB, g.id.parse().unwrap(), snapshot_id).unwrap();
    env.teardown(&meta).await;
    let dump = memory.dump.clone().unwrap();
    let dump_path = env.path_of(&dump).await;
    let counter_before = last_tick(&env.console(&g.id).await, &g.token);
    let out = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system", "save", &env.domain_name(&g.id)])
        .arg(&dump_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    env.teardown(&dump).await;
    let counter_after = last_tick(&env.console(&g.id).await, &g.token);
    let r = env
        .host
        .suspend_vm(hpb::SuspendVmRequest {
            vm_id: g.id.clone(),
            snapshot_id: snapshot_id.to_string(),
            disks: vec![base.clone()],
            memory: Some(memory.clone()),
        })
        .await
        .expect("SuspendVm after a save libvirt finished")
        .into_inner();
    assert!(r.saved_earlier && r.dump_bytes > 8 * MIB, "{r:?}");
    assert_eq!(env.status(&g.id).await, hpb::VmStatus::Down);
    let mark = env.console(&g.id).await.len();
    assert_eq!(
        env.run(&g.spec, Some(memory.clone())).await.unwrap(),
        hpb::VmStatus::Up
    );
    let lines = env.wait_ticks(&g.id, mark, 2, Duration::from_secs(30)).await;
    assert_clean(&lines, &g.token);
    let first = ticks(&lines)[0].1;
    assert!(
        first > counter_before && first <= counter_after + 2,
        "resumed at {first}, saved between {counter_before} and {counter_after}"
    );
    env.stop(&g.id, 0).await;
}
