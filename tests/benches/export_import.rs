//! Export and import of a VM with a 1 GiB memory volume, beside `qemu-img
//! convert` of the same volumes in the same run.
//!
//! The system is the e2e fixture's (tests/support/cluster.rs): the three
//! release binaries as processes, real libvirt/QEMU, a FILE data domain, a
//! BLOCK (LVM on loop) data domain and a FILE export domain, SQLite. The
//! guest has 824 MiB of RAM, 500 MiB of it random (`ramsnap.fill`), so its
//! PAUSED snapshot's dump volume is 824 + 200 = 1024 MiB, about 560 MB of it
//! data. After preview and commit the VM has two snapshots sharing that
//! memory, as in Export-Import test case 1.
//!
//! Measured, each 3 times (RAMSNAP_BENCH_RUNS=N for N) with the page
//! cache dropped before, each ramsnap run followed at once by its baseline
//! run (this disk's speed swings by 2x within minutes); medians, and the
//! median of the pairs' ratios:
//! - ExportVm, FILE data domain → export domain: every disk layer, the
//!   memory pair, the dump's SHA-256 on the export domain, the OVF;
//!   each export a fresh one (the earlier export's volumes and descriptor
//!   deleted before, untimed);
//! - baseline: `qemu-img convert` of the same volumes from the same source
//!   files to the same file system (disk layers with `-B` onto the copied
//!   parent, as a layer-by-layer copy does; RAW volumes `-O raw`, sparse);
//! - ExportVm with `force_override` over the last export, whose volumes it
//!   deletes inside the operation, beside the same baseline with the
//!   earlier copy removed inside its timing (`rm -r`, then convert);
//! - ImportVm, export domain → FILE data domain (checksum included), and
//!   the same baseline from the export domain's files;
//! - ImportVm into the BLOCK data domain (preallocated LVs), beside
//!   `qemu-img convert -n` into LVs of the same domain made and prepared
//!   beforehand (the BLOCK domain goes through loop devices on a loop
//!   device here, which slows both sides).
//!
//! Run: `cargo build --release --bins && cargo bench -p ramsnap-e2e --bench export_import`
//! (root, libvirtd up, the guest built: see tests/guest/README.md).
use ramsnap_e2e::cluster::{Cluster, Db, DomainKind, Layout, Process, VmStatus, MIB};
use ramsnap_e2e::guest::CMDLINE;
use ramsnap_e2e::logs::{last_logged, node_times, strip_ansi};
use ramsnap_proto::common::v1::VolumeRef;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::storage::v1 as spb;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MEMORY_MIB: u64 = 824;
const FILL_MIB: u64 = 500;
/// Runs of each measurement unless RAMSNAP_BENCH_RUNS says otherwise.
const RUNS: usize = 3;

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// A volume as the storage lists it, with its path on this host.
#[derive(Clone, Debug)]
struct Vol {
    id: String,
    parent: String,
    raw: bool,
    path: PathBuf,
}

async fn volumes_with_paths(c: &Cluster, domain: &str) -> Vec<Vol> {
    let mut out = Vec::new();
    for v in c.volumes(domain).await {
        let r: VolumeRef = v.r#ref.clone().expect("ref");
        let path = c
            .storage_as_host()
            .await
            .prepare_volume(spb::PrepareVolumeRequest {
                r#ref: Some(r.clone()),
                ..Default::default()
            })
            .await
            .expect("PrepareVolume")
            .into_inner()
            .path;
        out.push(Vol {
            id: r.volume_id,
            parent: v.parent_volume_id.clone(),
            raw: v.format() == spb::VolumeFormat::Raw,
            path: PathBuf::from(path),
        });
    }
    // Parents first.
    let depth = |v: &Vol, all: &[Vol]| {
        let by: HashMap<&str, &Vol> = all.iter().map(|x| (x.id.as_str(), x)).collect();
        let (mut n, mut p) = (0, v.parent.as_str());
        while let Some(x) = by.get(p) {
            n += 1;
            p = x.parent.as_str();
        }
        n
    };
    let copy = out.clone();
    out.sort_by_key(|v| depth(v, &copy));
    out
}

/// `qemu-img convert` of every volume into `dir`, parents first, layers
/// onto their copied parent.
fn convert_all(volumes: &[Vol], dir: &Path) {
    for v in volumes {
        let dst = dir.join(&v.id);
        let mut cmd = Command::new("qemu-img");
        cmd.arg("convert");
        if v.raw {
            cmd.args(["-f", "raw", "-O", "raw"]);
        } else {
            cmd.args(["-f", "qcow2", "-O", "qcow2"]);
            if !v.parent.is_empty() {
                cmd.arg("-B").arg(dir.join(&v.parent)).args(["-F", "qcow2"]);
            }
        }
        cmd.arg(&v.path).arg(&dst);
        let out = cmd.output().expect("qemu-img");
        assert!(
            out.status.success(),
            "qemu-img convert {v:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// [`convert_all`] into `dir`, then `sync`; the wall time. With `replace`,
/// `dir` holds an earlier copy (made untimed if missing), removed inside
/// the timing, as a forced re-export replaces an earlier export; the new
/// copy stays for the next run. Without, `dir` starts empty and is
/// removed after.
fn qemu_img_copy(volumes: &[Vol], dir: &Path, replace: bool) -> Duration {
    if replace {
        if !dir.exists() {
            std::fs::create_dir_all(dir).expect("scratch dir");
            convert_all(volumes, dir);
        }
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
    drop_caches();
    let t = Instant::now();
    if replace {
        std::fs::remove_dir_all(dir).expect("removing the earlier copy");
    }
    std::fs::create_dir_all(dir).expect("scratch dir");
    convert_all(volumes, dir);
    let _ = Command::new("sync").status();
    let d = t.elapsed();
    if !replace {
        let _ = std::fs::remove_dir_all(dir);
    }
    d
}

/// The same-device baseline for an import into BLOCK: `qemu-img convert
/// -n` of every volume into an LV of the BLOCK domain made and prepared
/// beforehand, untimed (RAW volumes into RAW LVs of their size; qcow2
/// layers, each read with its chain, into an LV formatted as qcow2 of the
/// same virtual size), then `sync`; the wall time. The LVs are deleted
/// after.
async fn qemu_img_into_lvs(c: &Cluster, volumes: &[Vol], capacities: &HashMap<String, u64>) -> Duration {
    let mut targets = Vec::new();
    for v in volumes {
        let capacity = capacities[&v.id];
        // A qcow2 of this virtual size fits an LV a little larger.
        let lv_bytes = if v.raw {
            capacity
        } else {
            capacity + capacity / 8 + (16 << 20)
        };
        let made = c
            .storage_as("coordinator")
            .await
            .create_volume(spb::CreateVolumeRequest {
                domain_id: c.block_domain.clone(),
                capacity_bytes: lv_bytes,
                format: spb::VolumeFormat::Raw as i32,
                purpose: spb::VolumePurpose::Disk as i32,
                description: "qemu-img's import target (benchmark)".into(),
                ..Default::default()
            })
            .await
            .expect("CreateVolume on BLOCK")
            .into_inner()
            .volume
            .and_then(|v| v.r#ref)
            .expect("a volume");
        let path = c
            .storage_as_host()
            .await
            .prepare_volume(spb::PrepareVolumeRequest {
                r#ref: Some(made.clone()),
                ..Default::default()
            })
            .await
            .expect("PrepareVolume")
            .into_inner()
            .path;
        if !v.raw {
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", &path, &capacity.to_string()])
                .output()
                .expect("qemu-img");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        targets.push((made, path));
    }
    drop_caches();
    let t = Instant::now();
    for (v, (_, path)) in volumes.iter().zip(&targets) {
        let format = if v.raw { "raw" } else { "qcow2" };
        let out = Command::new("qemu-img")
            .args(["convert", "-n", "-f", format, "-O", format])
            .arg(&v.path)
            .arg(path)
            .output()
            .expect("qemu-img");
        assert!(
            out.status.success(),
            "qemu-img convert -n {v:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = Command::new("sync").status();
    let d = t.elapsed();
    let made: Vec<VolumeRef> = targets.into_iter().map(|(r, _)| r).collect();
    c.drop_volumes(&made).await;
    d
}

async fn teardown_all(c: &Cluster, domain: &str) {
    for v in c.volumes(domain).await {
        let _ = c
            .storage_as_host()
            .await
            .teardown_volume(spb::TeardownVolumeRequest {
                r#ref: v.r#ref.clone(),
            })
            .await;
    }
}

async fn timed_export(c: &Cluster, vm: &str, force: bool) -> Duration {
    drop_caches();
    let t = Instant::now();
    let resp = c
        .vms()
        .export_vm(pb::ExportVmRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            vm_id: vm.to_string(),
            export_domain_id: c.export_domain.clone(),
            collapse_snapshots: false,
            force_override: force,
        })
        .await
        .expect("ExportVm")
        .into_inner();
    c.succeed(resp.operation, "ExportVm").await;
    t.elapsed()
}

/// Removes what an export left on the export domain (its volumes and its
/// descriptor), untimed, so that the next export is a fresh one.
async fn clear_export(c: &Cluster, vm: &str) {
    teardown_all(c, &c.export_domain).await;
    let mut volumes: Vec<spb::Volume> = c.volumes(&c.export_domain).await;
    // Children first.
    volumes.sort_by_key(|v| v.parent_volume_id.is_empty());
    for v in volumes {
        c.storage_as("coordinator")
            .await
            .delete_volume(spb::DeleteVolumeRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                r#ref: v.r#ref.clone(),
            })
            .await
            .expect("DeleteVolume on the export domain");
    }
    c.storage_as("coordinator")
        .await
        .delete_vm_descriptor(spb::DeleteVmDescriptorRequest {
            domain_id: c.export_domain.clone(),
            vm_id: vm.to_string(),
        })
        .await
        .expect("DeleteVmDescriptor");
}

async fn timed_import(c: &Cluster, vm: &str, kind: DomainKind) -> Duration {
    drop_caches();
    let t = Instant::now();
    c.import_vm(vm, kind, false, false, "").await;
    t.elapsed()
}

/// Medians, the ratio of the medians, and the median of the ratios of
/// each run to the baseline run right after it.
fn report(what: &str, ramsnap: &[Duration], baseline: &[Duration], bytes: u64) {
    let mib = bytes as f64 / MIB as f64;
    let mut pairs: Vec<f64> = ramsnap
        .iter()
        .zip(baseline)
        .map(|(r, b)| secs(*r) / secs(*b))
        .collect();
    pairs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let (r, b) = (median(ramsnap.to_vec()), median(baseline.to_vec()));
    println!(
        "{what:<40} ramsnap {:>6.2} s ({:>6.0} MiB/s)   qemu-img convert {:>6.2} s ({:>6.0} MiB/s)   ratio {:.2}   pairs: median {:.2}, {}",
        secs(r),
        mib / secs(r),
        secs(b),
        mib / secs(b),
        secs(r) / secs(b),
        pairs[pairs.len() / 2],
        pairs.iter().map(|p| format!("{p:.2}")).collect::<Vec<_>>().join(" ")
    );
}

async fn run() {
    let runs: usize = std::env::var("RAMSNAP_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(RUNS);
    // Separate processes, as start() runs them, with the storage agent's
    // tool commands and their times in its log.
    let mut c = Cluster::start_as(
        Db::Sqlite,
        "3.3",
        "bench-export",
        Layout::Separate,
        &[("RUST_LOG", "info,ramsnap_storage::tool=debug")],
    )
    .await;
    let vm = c
        .create_vm_sized(
            "bench-export",
            DomainKind::File,
            MEMORY_MIB * MIB,
            &format!("{CMDLINE} ramsnap.fill={FILL_MIB}"),
        )
        .await;
    c.boot(&vm).await;
    let taken = c.take_snapshot(&vm, true, "bench").await;
    c.stop_vm(&vm).await;
    c.preview(&vm, &taken.snapshot_id, true).await;
    c.commit(&vm).await;
    let active = c.active_snapshot(&vm).await;
    let dump = c
        .volume(
            active
                .memory
                .as_ref()
                .and_then(|m| m.dump.as_ref())
                .expect("memory"),
        )
        .await;
    let capacity = dump.capacity_bytes;
    println!(
        "memory dump volume: {} MiB capacity, {} MiB allocated on the FILE domain",
        capacity / MIB,
        dump.allocated_bytes / MIB
    );

    let scratch = PathBuf::from(
        c.storage()
            .get_domain(spb::GetDomainRequest {
                domain_id: c.export_domain.clone(),
            })
            .await
            .expect("GetDomain")
            .into_inner()
            .domain
            .expect("domain")
            .location,
    )
    .with_file_name("bench-scratch");
    let total: u64 = c
        .volumes(&c.file_domain)
        .await
        .iter()
        .map(|v| v.capacity_bytes)
        .sum();
    // The disk here swings by 2x within minutes: each ramsnap run is
    // followed at once by its baseline run, and the ratio of each pair is
    // reported beside the ratio of the medians.
    let sources = volumes_with_paths(&c, &c.file_domain).await;

    // Export.
    let (mut exports, mut base_export) = (Vec::new(), Vec::new());
    let mut export_nodes = Nodes::default();
    for i in 0..runs {
        if i > 0 {
            clear_export(&c, &vm).await;
        }
        exports.push(timed_export(&c, &vm, false).await);
        export_nodes.add(&c.process(Process::Coordinator).logs(), "vm_export");
        base_export.push(qemu_img_copy(&sources, &scratch, false));
    }
    // Exported again over the last export (force_override): the earlier
    // export's volumes are deleted inside the operation.
    let (mut reexports, mut base_reexport) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        reexports.push(timed_export(&c, &vm, true).await);
        base_reexport.push(qemu_img_copy(&sources, &scratch, true));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    teardown_all(&c, &c.file_domain).await;
    report("export FILE -> export domain", &exports, &base_export, total);
    report(
        "re-export over the last (force)",
        &reexports,
        &base_reexport,
        total,
    );

    // Import into FILE. A FILE volume's path stays valid after teardown.
    let exported = volumes_with_paths(&c, &c.export_domain).await;
    teardown_all(&c, &c.export_domain).await;
    c.remove_vm(&vm).await;
    let (mut imports, mut base_import) = (Vec::new(), Vec::new());
    let mut import_nodes = Nodes::default();
    for i in 0..runs {
        imports.push(timed_import(&c, &vm, DomainKind::File).await);
        import_nodes.add(&c.process(Process::Coordinator).logs(), "vm_import");
        base_import.push(qemu_img_copy(&exported, &scratch, false));
        if i + 1 < runs {
            c.remove_vm(&vm).await;
        }
    }
    report("import export domain -> FILE", &imports, &base_import, total);
    // The imported VM resumes from its memory.
    let run = c.run_vm(&vm, false).await;
    run.assert_started_as(VmStatus::RestoringState);
    c.stop_vm(&vm).await;
    c.remove_vm(&vm).await;

    // Import into BLOCK, beside qemu-img writing into LVs of the same
    // domain (the loop devices standing in for device-mapper here slow
    // both sides).
    let capacities: HashMap<String, u64> = c
        .volumes(&c.export_domain)
        .await
        .iter()
        .filter_map(|v| Some((v.r#ref.clone()?.volume_id, v.capacity_bytes)))
        .collect();
    let (mut imports, mut base_import) = (Vec::new(), Vec::new());
    let mut block_nodes = Nodes::default();
    for _ in 0..runs {
        imports.push(timed_import(&c, &vm, DomainKind::Block).await);
        block_nodes.add(&c.process(Process::Coordinator).logs(), "vm_import");
        c.remove_vm(&vm).await;
        base_import.push(qemu_img_into_lvs(&c, &exported, &capacities).await);
    }
    report(
        "import export domain -> BLOCK (LVM)",
        &imports,
        &base_import,
        total,
    );
    println!(
        "(bytes counted: the virtual size of every copied volume, {} MiB)",
        total / MIB
    );
    export_nodes.print("export FILE -> export domain");
    import_nodes.print("import export domain -> FILE");
    block_nodes.print("import export domain -> BLOCK");
    // Where each dump copy spent its time (the storage agent's log), in
    // the order they ran: exports, re-exports, imports into FILE, imports
    // into BLOCK.
    let logs = c.process(Process::StorageAgent).logs();
    let dumps: Vec<String> = logs
        .lines()
        .map(strip_ansi)
        .filter(|l| l.contains("copy done"))
        .filter(|l| last_logged(l, "copy done", "data").is_some_and(|d| d >= (100 * MIB) as f64))
        .filter_map(|l| {
            let t = last_logged(&l, "copy done", "transfer_ms")?;
            let f = last_logged(&l, "copy done", "flush_ms")?;
            Some(format!("{t:.0}+{f:.0}"))
        })
        .collect();
    println!(
        "dump copies in the storage agent, transfer+flush ms: {}",
        dumps.join(" ")
    );
}

/// Each saga node's time, run by run (from the coordinator's log).
#[derive(Default)]
struct Nodes(BTreeMap<String, Vec<f64>>);

impl Nodes {
    fn add(&mut self, logs: &str, saga: &str) {
        for (node, ms) in node_times(logs, saga) {
            self.0.entry(node).or_default().push(ms);
        }
    }

    fn print(self, what: &str) {
        println!("{what}, per saga node (median ms, nodes over 5 ms):");
        for (node, mut v) in self.0 {
            v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
            let m = v[v.len() / 2];
            if m > 5.0 {
                println!("  {node}: {m:.0}");
            }
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        // `cargo test --benches` lists benches; nothing to list here.
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}
