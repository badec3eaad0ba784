//! Copy benchmark: a 1 GiB memory-dump volume, half of it zero regions,
//! copied FILE->BLOCK and BLOCK->FILE by ramsnap's storage layer and by
//! `qemu-img convert` of the same data, in the same run, on the same
//! domains. Page cache is dropped before every measured copy, and both
//! tools flush their target before they count as done.
//!
//! Then the cost of making memory volumes on BLOCK (every new LV is zeroed,
//! so that it never shows a deleted volume's data): `CreateMemoryVolumes`
//! for a guest of the same size (PAUSED: RAM + 200 MiB, plus the 1 MiB
//! metadata volume) beside the bare tools for the dump's size: `lvcreate`
//! alone, and `lvcreate` + `blkdiscard -z` (BLKZEROOUT) of its extents.
//!
//! Then preparing a 12-layer disk chain on BLOCK through its leaf (what a
//! run or a restore of a VM with snapshots does first), beside one `pvs
//! --segments` and a `losetup` per layer.
//!
//! Run: `cargo bench -p ramsnap-storage --bench copy` (root; needs LVM and
//! loop devices). RAMSNAP_BENCH_SIZE_MIB and RAMSNAP_BENCH_RUNS override.
use ramsnap_storage::model::{DumpMode, Format, Purpose, VolumeRef};
use ramsnap_storage::storage::{CopyRequest, NewVolume};
use ramsnap_storage::{Config, Storage};
use rand::RngCore;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const MIB: u64 = 1024 * 1024;

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn drop_caches() {
    sh(&mut Command::new("sync"));
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Cleanup {
    device: String,
    vg: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let cfg = ["--config", "global { activation = 0 }"];
        for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
            let b = std::fs::read_to_string(entry.path().join("loop/backing_file")).unwrap_or_default();
            if b.trim() == self.device {
                let _ = Command::new("losetup")
                    .arg("-d")
                    .arg(format!("/dev/{}", entry.file_name().to_string_lossy()))
                    .status();
            }
        }
        if let Some(vg) = &self.vg {
            let _ = Command::new("vgremove").args(cfg).args(["-f", vg]).output();
        }
        let _ = Command::new("pvremove")
            .args(cfg)
            .args(["-ff", "-y", &self.device])
            .output();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

#[tokio::main]
async fn main() {
    let size_mib: u64 = std::env::var("RAMSNAP_BENCH_SIZE_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let runs: usize = std::env::var("RAMSNAP_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let size = size_mib * MIB;
    let base = std::env::var("RAMSNAP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::tempdir_in(base).unwrap();
    std::fs::create_dir_all(dir.path().join("roots/nfs")).unwrap();
    let pv_file = dir.path().join("pv.img");
    std::fs::File::create(&pv_file)
        .unwrap()
        .set_len(3 * size + 512 * MIB)
        .unwrap();
    let device = sh(Command::new("losetup").args(["--find", "--show"]).arg(&pv_file))
        .trim()
        .to_string();
    let mut cleanup = Cleanup {
        device: device.clone(),
        vg: None,
    };

    let storage = Storage::open(Config {
        state_dir: dir.path().join("state"),
        run_dir: dir.path().join("run"),
        file_roots: vec![dir.path().join("roots")],
        block_devices: vec![PathBuf::from(&device)],
    })
    .await
    .unwrap();
    let file_dom = storage
        .register_domain(
            None,
            "bench-file".into(),
            ramsnap_storage::model::DomainType::File,
            dir.path().join("roots/nfs").display().to_string(),
            None,
            None,
        )
        .await
        .unwrap()
        .0
        .id;
    let block_dom = storage
        .register_domain(
            None,
            "bench-block".into(),
            ramsnap_storage::model::DomainType::Block,
            device.clone(),
            None,
            None,
        )
        .await
        .unwrap()
        .0
        .id;
    cleanup.vg = Some(block_dom.to_string());

    // The source: a memory dump whose odd MiBs are random and even MiBs zero.
    let new = |domain| NewVolume {
        request_id: None,
        domain,
        image: None,
        volume: None,
        capacity: size,
        format: Format::Raw,
        allocation: None,
        purpose: Purpose::MemoryDump,
        parent: None,
        description: "bench".into(),
    };
    let src = storage.create_volume(new(file_dom)).await.unwrap();
    let src_ref = src.volume_ref();
    let src_path = storage.prepare_volume(src_ref).await.unwrap();
    {
        let f = std::fs::OpenOptions::new().write(true).open(&src_path).unwrap();
        let mut chunk = vec![0u8; MIB as usize];
        let mut off = 0;
        while off < size {
            rand::thread_rng().fill_bytes(&mut chunk);
            f.write_all_at(&chunk, off).unwrap();
            off += 2 * MIB;
        }
        f.sync_all().unwrap();
    }
    println!(
        "source: {size_mib} MiB RAW memory volume, {} MiB allocated (half zero regions)",
        alloc(&src_path) / MIB
    );

    let mut rows = Vec::new();
    let mut allocated = Vec::new();

    // FILE -> BLOCK
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut block_copy: Option<VolumeRef> = None;
    for _ in 0..runs {
        if let Some(prev) = block_copy.take() {
            storage.delete_volume(prev, None).await.unwrap();
        }
        drop_caches();
        let t = Instant::now();
        let v = copy(&storage, src_ref, block_dom).await;
        ours.push(size as f64 / t.elapsed().as_secs_f64() / MIB as f64);
        block_copy = Some(v);

        let target = storage.create_volume(new(block_dom)).await.unwrap().volume_ref();
        let dev = storage.prepare_volume(target).await.unwrap();
        drop_caches();
        let t = Instant::now();
        sh(Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src_path)
            .arg(&dev));
        theirs.push(size as f64 / t.elapsed().as_secs_f64() / MIB as f64);
        storage.teardown_volume(target).await.unwrap();
        storage.delete_volume(target, None).await.unwrap();
    }
    let block_vol = storage.get_volume(block_copy.unwrap()).await.unwrap();
    allocated.push(("FILE->BLOCK target (LV size)", block_vol.allocated));
    rows.push(("FILE->BLOCK", median(ours), median(theirs)));

    // BLOCK -> FILE
    let block_ref = block_vol.volume_ref();
    let block_dev = storage.prepare_volume(block_ref).await.unwrap();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut file_alloc = (0, 0);
    for i in 0..runs {
        storage.teardown_volume(block_ref).await.unwrap();
        drop_caches();
        let t = Instant::now();
        let v = copy(&storage, block_ref, file_dom).await;
        ours.push(size as f64 / t.elapsed().as_secs_f64() / MIB as f64);
        let got = storage.get_volume(v).await.unwrap();
        file_alloc.0 = got.allocated;
        storage.delete_volume(v, None).await.unwrap();

        let dev = storage.prepare_volume(block_ref).await.unwrap();
        assert_eq!(dev, block_dev);
        let out = dir.path().join(format!("roots/nfs/qemu-img-{i}.raw"));
        drop_caches();
        let t = Instant::now();
        sh(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&dev)
            .arg(&out));
        theirs.push(size as f64 / t.elapsed().as_secs_f64() / MIB as f64);
        file_alloc.1 = alloc(&out);
        std::fs::remove_file(&out).unwrap();
    }
    storage.teardown_volume(block_ref).await.unwrap();
    allocated.push(("BLOCK->FILE target, ramsnap", file_alloc.0));
    allocated.push(("BLOCK->FILE target, qemu-img", file_alloc.1));
    rows.push(("BLOCK->FILE", median(ours), median(theirs)));

    // Memory volumes on BLOCK for a guest of `size` bytes of RAM.
    let dump_size = DumpMode::Paused.dump_size(size);
    let (mut ours, mut bare_create, mut bare_zeroed) = (Vec::new(), Vec::new(), Vec::new());
    let vg = block_dom.to_string();
    for _ in 0..runs {
        drop_caches();
        let t = Instant::now();
        let (dump, meta) = storage
            .create_memory_volumes(None, block_dom, size, DumpMode::Paused, "bench".into())
            .await
            .unwrap();
        ours.push(t.elapsed().as_secs_f64());
        storage.delete_volume(dump.volume_ref(), None).await.unwrap();
        storage.delete_volume(meta.volume_ref(), None).await.unwrap();

        for zero in [false, true] {
            drop_caches();
            let t = Instant::now();
            sh(lvm("lvcreate")
                .args(["--activate", "n", "--zero", "n", "--wipesignatures", "n"])
                .args(["--alloc", "contiguous", "--name", "bench-bare"])
                .args(["--size", &format!("{dump_size}b"), &vg]));
            if zero {
                let (offset, len) = lv_extents(&vg, "bench-bare");
                sh(Command::new("blkdiscard")
                    .args(["-z", "-o", &offset.to_string(), "-l", &len.to_string()])
                    .arg(&device));
            }
            let took = t.elapsed().as_secs_f64();
            if zero {
                bare_zeroed.push(took);
            } else {
                bare_create.push(took);
            }
            sh(lvm("lvremove").args(["--yes", &format!("{vg}/bench-bare")]));
        }
    }
    // Preparing a VM's disk chain on BLOCK (what a run or a restore does
    // first): a RAW base and COW layers, none prepared, prepared through
    // the leaf; beside the bare tools doing the same on this host (one
    // `pvs --segments` for every layer's extent, a `losetup` per layer).
    const LAYERS: usize = 12;
    let mut layer = NewVolume {
        capacity: 64 * MIB,
        purpose: Purpose::Disk,
        ..new(block_dom)
    };
    let mut chain_refs = vec![storage.create_volume(layer.clone()).await.unwrap().volume_ref()];
    for _ in 1..LAYERS {
        let parent = *chain_refs.last().unwrap();
        layer = NewVolume {
            image: Some(parent.image),
            parent: Some(parent.volume),
            format: Format::Cow,
            ..layer
        };
        chain_refs.push(storage.create_volume(layer.clone()).await.unwrap().volume_ref());
    }
    let leaf = *chain_refs.last().unwrap();
    let (mut ours_prepare, mut bare_prepare) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        storage.prepare_volume(leaf).await.unwrap();
        ours_prepare.push(t.elapsed().as_secs_f64());
        storage.teardown_volume(leaf).await.unwrap();

        let select = chain_refs
            .iter()
            .map(|r| format!("lv_name={}", r.volume))
            .collect::<Vec<_>>()
            .join(" || ");
        let t = Instant::now();
        let out = sh(lvm("pvs").args([
            "--segments",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "--separator",
            "|",
            "-o",
            "lv_name,pv_name,pe_start,vg_extent_size,pvseg_start,pvseg_size",
            "--select",
            &format!("vg_name={vg} && ({select})"),
        ]));
        let mut devices = Vec::new();
        for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let f: Vec<&str> = line.split('|').collect();
            let n = |i: usize| f[i].trim().parse::<u64>().unwrap();
            let (offset, len) = (n(2) + n(4) * n(3), n(5) * n(3));
            devices.push(
                sh(Command::new("losetup").args([
                    "--offset",
                    &offset.to_string(),
                    "--sizelimit",
                    &len.to_string(),
                    "--find",
                    "--show",
                    f[1],
                ]))
                .trim()
                .to_string(),
            );
        }
        bare_prepare.push(t.elapsed().as_secs_f64());
        assert_eq!(devices.len(), LAYERS, "one device per layer");
        for d in devices {
            sh(Command::new("losetup").args(["-d", &d]));
        }
    }
    for r in chain_refs.iter().rev() {
        storage.delete_volume(*r, None).await.unwrap();
    }

    let memory_rows = [
        ("ramsnap CreateMemoryVolumes", median(ours.clone())),
        ("lvcreate", median(bare_create.clone())),
        ("lvcreate + blkdiscard -z", median(bare_zeroed.clone())),
    ];

    println!(
        "\n{:<12} {:>14} {:>14} {:>8}   (median of {runs} runs, MiB/s of virtual size)",
        "direction", "ramsnap", "qemu-img", "ratio"
    );
    for (name, a, b) in &rows {
        println!("{name:<12} {a:>14.0} {b:>14.0} {:>8.2}", a / b);
    }
    println!();
    for (name, bytes) in allocated {
        println!("{name:<32} {:>8} MiB allocated of {size_mib} MiB", bytes / MIB);
    }
    println!(
        "\nmemory volumes on BLOCK for a {size_mib} MiB guest (PAUSED: {} MiB dump + 1 MiB metadata), median of {runs} runs:",
        dump_size / MIB
    );
    let ramsnap = memory_rows[0].1;
    for (name, secs) in memory_rows {
        println!(
            "{name:<32} {secs:>8.3} s   ramsnap / this {:>6.2}",
            ramsnap / secs
        );
    }
    let (a, b) = (median(ours_prepare), median(bare_prepare));
    println!(
        "\npreparing a {LAYERS}-layer disk chain on BLOCK, none prepared, median of {runs} runs:\n\
         ramsnap PrepareVolume of the leaf {a:>8.3} s   one pvs + {LAYERS} losetup {b:>8.3} s   ratio {:>6.2}",
        a / b
    );
    drop(storage);
    drop(cleanup);
}

fn lvm(tool: &str) -> Command {
    let mut cmd = Command::new(tool);
    cmd.args(["--config", "global { activation = 0 }"])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1");
    cmd
}

/// Byte offset on the PV and length of a (contiguous) LV.
fn lv_extents(vg: &str, lv: &str) -> (u64, u64) {
    let pv = sh(lvm("pvs").args([
        "--noheadings",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        "pe_start,vg_extent_size",
        "--select",
        &format!("vg_name={vg}"),
    ]));
    let f: Vec<u64> = pv.split_whitespace().map(|s| s.parse().unwrap()).collect();
    let out = sh(lvm("lvs").args([
        "--noheadings",
        "--units",
        "b",
        "--nosuffix",
        "--separator",
        "|",
        "-o",
        "lv_size,seg_pe_ranges",
        &format!("{vg}/{lv}"),
    ]));
    let row: Vec<&str> = out.trim().split('|').collect();
    let first: u64 = row[1]
        .rsplit(':')
        .next()
        .and_then(|r| r.split('-').next())
        .unwrap()
        .parse()
        .unwrap();
    (f[0] + first * f[1], row[0].trim().parse().unwrap())
}

async fn copy(storage: &Storage, source: VolumeRef, target_domain: uuid::Uuid) -> VolumeRef {
    let mut rx = storage
        .copy_volume(CopyRequest {
            request_id: None,
            source,
            target_domain,
            target_image: None,
            target_volume: None,
            target_format: None,
            target_allocation: None,
            description: String::new(),
            keep_parent: false,
            target_purpose: None,
            // As an export or import copies a memory dump.
            checksum: true,
            writer: None,
        })
        .await
        .unwrap();
    loop {
        if let Some(outcome) = rx.borrow_and_update().outcome.clone() {
            return outcome.unwrap().volume_ref();
        }
        rx.changed().await.unwrap();
    }
}

fn alloc(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}
