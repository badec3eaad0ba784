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
//! Measured, each 3 times with the page cache dropped before, medians:
//! - ExportVm, FILE data domain → export domain: every disk layer, the
//!   memory pair, the dump's SHA-256 on the export domain, the OVF;
//! - baseline: `qemu-img convert` of the same volumes from the same source
//!   files to the same file system (disk layers with `-B` onto the copied
//!   parent, as a layer-by-layer copy does; RAW volumes `-O raw`, sparse);
//! - ImportVm, export domain → FILE data domain (checksum included), and
//!   the same baseline from the export domain's files;
//! - ImportVm into the BLOCK data domain (preallocated LVs), beside
//!   `qemu-img convert -n` into a preallocated LV-sized file of the same
//!   sizes, for scale only (the BLOCK domain goes through loop devices on
//!   a loop device here).
//!
//! Run: `cargo build --release --bins && cargo bench -p ramsnap-e2e --bench export_import`
//! (root, libvirtd up, the guest built: see tests/guest/README.md).
use ramsnap_e2e::cluster::{Cluster, Db, DomainKind, Process, VmStatus, MIB};
use ramsnap_e2e::guest::CMDLINE;
use ramsnap_e2e::logs::node_times;
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
/// onto their copied parent; the wall time.
fn qemu_img_copy(volumes: &[Vol], dir: &Path) -> Duration {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("scratch dir");
    drop_caches();
    let t = Instant::now();
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
    let _ = Command::new("sync").status();
    let d = t.elapsed();
    let _ = std::fs::remove_dir_all(dir);
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

async fn timed_import(c: &Cluster, vm: &str, kind: DomainKind) -> Duration {
    drop_caches();
    let t = Instant::now();
    c.import_vm(vm, kind, false, false, "").await;
    t.elapsed()
}

fn report(what: &str, ramsnap: Duration, baseline: Duration, bytes: u64) {
    let mib = bytes as f64 / MIB as f64;
    println!(
        "{what:<40} ramsnap {:>6.2} s ({:>6.0} MiB/s)   qemu-img convert {:>6.2} s ({:>6.0} MiB/s)   ratio {:.2}",
        secs(ramsnap),
        mib / secs(ramsnap),
        secs(baseline),
        mib / secs(baseline),
        secs(ramsnap) / secs(baseline)
    );
}

async fn run() {
    let mut c = Cluster::start(Db::Sqlite, "3.3", "bench-export").await;
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

    // Export.
    let mut exports = Vec::new();
    let mut export_nodes = Nodes::default();
    for i in 0..RUNS {
        exports.push(timed_export(&c, &vm, i > 0).await);
        export_nodes.add(&c.process(Process::Coordinator).logs(), "vm_export");
    }
    let sources = volumes_with_paths(&c, &c.file_domain).await;
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
    let base_export = median((0..RUNS).map(|_| qemu_img_copy(&sources, &scratch)).collect());
    teardown_all(&c, &c.file_domain).await;
    report(
        "export FILE -> export domain",
        median(exports),
        base_export,
        total,
    );

    // Import into FILE.
    let exported = volumes_with_paths(&c, &c.export_domain).await;
    let base_import = median((0..RUNS).map(|_| qemu_img_copy(&exported, &scratch)).collect());
    teardown_all(&c, &c.export_domain).await;
    c.remove_vm(&vm).await;
    let mut imports = Vec::new();
    let mut import_nodes = Nodes::default();
    for i in 0..RUNS {
        imports.push(timed_import(&c, &vm, DomainKind::File).await);
        import_nodes.add(&c.process(Process::Coordinator).logs(), "vm_import");
        if i + 1 < RUNS {
            c.remove_vm(&vm).await;
        }
    }
    report(
        "import export domain -> FILE",
        median(imports),
        base_import,
        total,
    );
    // The imported VM resumes from its memory.
    let run = c.run_vm(&vm, false).await;
    run.assert_started_as(VmStatus::RestoringState);
    c.stop_vm(&vm).await;
    c.remove_vm(&vm).await;

    // Import into BLOCK, for scale: same baseline (file to file).
    let mut imports = Vec::new();
    for _ in 0..RUNS {
        imports.push(timed_import(&c, &vm, DomainKind::Block).await);
        c.remove_vm(&vm).await;
    }
    report(
        "import export domain -> BLOCK (LVM)",
        median(imports),
        base_import,
        total,
    );
    println!(
        "(bytes counted: the virtual size of every copied volume, {} MiB)",
        total / MIB
    );
    export_nodes.print("export FILE -> export domain");
    import_nodes.print("import export domain -> FILE");
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
