//! The path a user takes: a snapshot with memory and a run that restores
//! it, through the coordinator's gRPC API (the embedded default, `ramsnapd`
//! release build, SQLite, a FILE domain, mutual TLS), beside virsh doing the
//! same on a twin guest in the same run, writing to the same file system.
//!
//! Two VMs of 1 GiB RAM, 600 MiB of it random (`ramsnap.fill`), one 64 MiB
//! disk each, both created and booted through ramsnap:
//! - VM A, through the coordinator only: CreateSnapshot with memory PAUSED,
//!   then LIVE (the wall time from the call to the operation's end, as a
//!   client sees it); then StopVm, PreviewSnapshot (restore_memory) and
//!   CommitSnapshot, and RunVm timed until the VM is UP;
//! - VM B's libvirt domain, through virsh only: `snapshot-create-as
//!   --no-metadata --memspec ... --diskspec ...` without and with `--live`,
//!   into files in the FILE domain's directory; then `virsh destroy` and
//!   `virsh restore` of the last memory file (its disk pointed at a fresh
//!   overlay).
//!
//! The page cache is dropped before every timed step. Each run repeats the
//! whole sequence, ramsnap's part first in odd runs and virsh's first in
//! even ones: whichever side goes first after the other's restore finds
//! the machine in another state (on this machine a PAUSED snapshot taken
//! first in a run was measured 1.5-3.5 times slower on BLOCK, on either
//! side), so an odd number of runs favours neither by much and an even
//! number not at all. Medians are reported with the ratios, and ramsnap's
//! own figures for its steps (the host agent's guest pause and the saga's
//! per-node times, from the logs).
//!
//! With `RAMSNAP_BENCH_DOMAIN=block`, VMs A and B both live on the BLOCK
//! domain (their disks and A's memory volumes are LVs; B's disk chain is
//! prepared again by the benchmark once ramsnap's run of B is destroyed,
//! since virsh's overlays and restores build on it) and virsh writes its memory into new
//! LVs of the same domain, made, zeroed and prepared as ramsnap's memory
//! volumes for the same snapshot (on this machine LVs are loop devices
//! over a sparse file, standing in for device-mapper: both sides pay for
//! it, and both write into fresh extents; an LV written before takes a
//! dump faster here, since the file's blocks are then written already;
//! virsh's are deleted after each run), and its disk overlays into LVs
//! of it too: a qcow2 made there beforehand (untimed) and taken with
//! `--reuse-external`, as ramsnap's overlays are; `virsh restore` puts
//! the disk on a qcow2 overlay in an LV of it, as ramsnap's run does.
//!
//! Run: `cargo build --release --bins && cargo bench -p ramsnap-e2e --bench snapshot_path`
//! (root, libvirtd up; RAMSNAP_BENCH_RUNS=N for more than 3 runs).
use ramsnap_e2e::cluster::{Cluster, Db, DomainKind, Process, VmStatus, MIB};
use ramsnap_e2e::faults::{domain, live_disk, virsh};
use ramsnap_e2e::guest::CMDLINE;
use ramsnap_e2e::logs::{last_logged, node_times, strip_ansi};
use ramsnap_proto::common::v1 as common;
use ramsnap_proto::snapshot::v1 as pb;
use ramsnap_proto::storage::v1 as st;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MEMORY_MIB: u64 = 1024;
const FILL_MIB: u64 = 600;

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

/// The median of the runs whose `flags` entry is `when`, or "-".
fn median_where(v: &[f64], flags: &[bool], when: bool) -> String {
    let picked: Vec<f64> = v
        .iter()
        .zip(flags)
        .filter(|(_, &f)| f == when)
        .map(|(x, _)| *x)
        .collect();
    if picked.is_empty() {
        "-".to_string()
    } else {
        format!("{:.2} s", median(picked))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// The host agent's laps of its last step of a kind (`what`: "snapshot
/// step" or "restore step", logged as "WHAT ... step=\"S\" ms=M"), in
/// order: from the last lap named `first` on.
fn host_laps(logs: &str, what: &str, first: &str) -> Vec<(String, f64)> {
    let lines: Vec<String> = logs
        .lines()
        .map(strip_ansi)
        .filter(|l| l.contains(what) && l.contains("step=\""))
        .collect();
    let start = lines
        .iter()
        .rposition(|l| l.contains(&format!("step=\"{first}\"")))
        .unwrap_or(0);
    lines[start..]
        .iter()
        .filter_map(|l| {
            let step = l.split("step=\"").nth(1)?.split('"').next()?.to_string();
            Some((step, last_logged(l, what, "ms")?))
        })
        .collect()
}

/// Where one path's time went, run by run: the saga's nodes, the host
/// agent's laps, the guest pause.
#[derive(Default)]
struct Breakdown {
    nodes: BTreeMap<String, Vec<f64>>,
    laps: Vec<(String, Vec<f64>)>,
    pauses: Vec<f64>,
    /// QEMU's own downtime (libvirt's completed job statistics).
    downtimes: Vec<f64>,
    /// Other timings the host agent logs ("MESSAGE ... ms=M").
    timed: BTreeMap<&'static str, Vec<f64>>,
}

impl Breakdown {
    /// Takes the last run's figures from the whole log of ramsnapd.
    fn add(&mut self, logs: &str, saga: &str, what: &str, first: &str) {
        for (node, ms) in node_times(logs, saga) {
            self.nodes.entry(node).or_default().push(ms);
        }
        for (i, (step, ms)) in host_laps(logs, what, first).into_iter().enumerate() {
            if self.laps.len() <= i {
                self.laps.push((step, Vec::new()));
            }
            self.laps[i].1.push(ms);
        }
        if what == "snapshot step" {
            self.pauses
                .push(last_logged(logs, "guest pause", "pause_ms").unwrap_or(f64::NAN));
            self.downtimes
                .push(last_logged(logs, "guest pause", "qemu_downtime_ms").unwrap_or(f64::NAN));
            // The parts of "checksum and metadata".
            for m in [
                "finish: checksum",
                "finish: domain xml",
                "finish: metadata written",
            ] {
                self.timed
                    .entry(m)
                    .or_default()
                    .push(last_logged(logs, m, "ms").unwrap_or(f64::NAN));
            }
            // How much of the dump was hashed while it was written (MiB).
            self.timed
                .entry("finish: MiB hashed during the dump")
                .or_default()
                .push(
                    last_logged(logs, "finish: checksum", "hashed_during_dump")
                        .map_or(f64::NAN, |b| b / (1u64 << 20) as f64),
                );
        } else {
            // The two halves of "checksum beside libvirt's restore".
            for m in ["restore: checksum", "restore: libvirt restore (paused)"] {
                self.timed
                    .entry(m)
                    .or_default()
                    .push(last_logged(logs, m, "ms").unwrap_or(f64::NAN));
            }
        }
    }

    fn print(self, title: &str) {
        println!("\n{title}");
        if !self.pauses.is_empty() {
            println!("  guest pause (host agent): {:.0} ms", median(self.pauses));
        }
        println!("  the host agent's step, lap by lap (median ms):");
        for (step, v) in self.laps {
            println!("    {step}: {:.0}", median(v));
        }
        for (what, v) in self.timed {
            println!("    ({what}: {:.0})", median(v));
        }
        println!("  the saga, per node (median ms):");
        for (node, v) in self.nodes {
            println!("    {node}: {:.0}", median(v));
        }
    }
}

/// tests/guest/strip-backing.awk, in Rust: drops every <backingStore>.
fn strip_backing(xml: &str) -> String {
    let mut out = String::new();
    let mut depth = 0usize;
    for line in xml.lines() {
        let t = line.trim();
        if depth == 0 && t.starts_with("<backingStore") {
            if !t.ends_with("/>") {
                depth = 1;
            }
            continue;
        }
        if depth > 0 {
            if t.starts_with("<backingStore") && !t.ends_with("/>") {
                depth += 1;
            } else if t.starts_with("</backingStore>") {
                depth -= 1;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[derive(Default)]
struct Figures {
    paused: Vec<f64>,
    live: Vec<f64>,
    restore: Vec<f64>,
}

/// Every figure of the runs so far, both sides.
#[derive(Default)]
struct Tally {
    ours: Figures,
    bare: Figures,
    paused: Breakdown,
    live: Breakdown,
    restore: Breakdown,
    virsh_downtime: Vec<f64>,
    /// Guest pauses from libvirt's lifecycle events (PAUSED, LIVE).
    ours_pause: (Vec<f64>, Vec<f64>),
    bare_pause: (Vec<f64>, Vec<f64>),
    /// Run by run, whether virsh's part went first.
    virsh_first: Vec<bool>,
}

/// ramsnap's part of a run, on VM A through the coordinator: a PAUSED and
/// a LIVE snapshot with memory, then a run that restores the LIVE one.
async fn ours_run(c: &mut Cluster, a: &str, block: bool, t: &mut Tally) {
    let (took, paused_snapshot, pause) = snapshot(c, a, pb::MemoryMode::Paused, "paused").await;
    t.ours.paused.push(took);
    t.ours_pause.0.push(pause);
    // A snapshot whose memory found no room on the VM's domain puts it
    // on another: that would measure another domain.
    let want = if block {
        c.block_domain.clone()
    } else {
        c.file_domain.clone()
    };
    let got = memory_domain(c, a, &paused_snapshot).await;
    assert_eq!(
        got, want,
        "the PAUSED snapshot's memory is not on the measured domain"
    );
    // The whole log of ramsnapd (the last lines are this snapshot's).
    let logs = c.process(Process::Coordinator).logs();
    t.paused
        .add(&logs, "snapshot_create", "snapshot step", "prepare volumes");
    let (took, live_snapshot, pause) = snapshot(c, a, pb::MemoryMode::Live, "live").await;
    t.ours.live.push(took);
    t.ours_pause.1.push(pause);
    let got = memory_domain(c, a, &live_snapshot).await;
    assert_eq!(
        got, want,
        "the LIVE snapshot's memory is not on the measured domain"
    );
    let logs = c.process(Process::Coordinator).logs();
    t.live
        .add(&logs, "snapshot_create", "snapshot step", "prepare volumes");
    c.stop_vm(a).await;
    c.preview(a, &live_snapshot, true).await;
    c.commit(a).await;
    drop_caches();
    let started = Instant::now();
    let r = c
        .vms()
        .run_vm(pb::RunVmRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            vm_id: a.to_string(),
            host_id: String::new(),
            run_stateless: false,
        })
        .await
        .expect("RunVm")
        .into_inner();
    c.succeed(r.operation, "RunVm").await;
    while c.get_vm(a).await.status() != VmStatus::Up {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t.ours.restore.push(started.elapsed().as_secs_f64());
    let logs = c.process(Process::Coordinator).logs();
    t.restore
        .add(&logs, "vm_run", "restore step", "prepare memory volumes");
}

/// virsh's part of a run, on VM B's domain: the same two snapshots into
/// `dir` (BLOCK: into new LVs), then `virsh restore` of the LIVE one.
async fn bare_run(c: &mut Cluster, b: &str, dir: &Path, run: usize, block: bool, t: &mut Tally) {
    // BLOCK: virsh's memory and disk overlays are new LVs of the
    // domain too, made as ramsnap's are for the same snapshots.
    let (paused_lv, live_lv) = if block {
        (Some(overlay_lv(c).await), Some(overlay_lv(c).await))
    } else {
        (None, None)
    };
    let (paused_mem, live_mem) = if block {
        (
            Some(memory_lv(c, st::MemoryDumpMode::Paused).await),
            Some(memory_lv(c, st::MemoryDumpMode::Live).await),
        )
    } else {
        (None, None)
    };
    let (took, _, pause) = virsh_snapshot(
        b,
        dir,
        &format!("{run}-paused"),
        false,
        paused_mem.as_ref().map(|m| m.0.as_path()),
        paused_lv.as_deref(),
    );
    t.bare.paused.push(took);
    t.bare_pause.0.push(pause);
    let (took, mem, pause) = virsh_snapshot(
        b,
        dir,
        &format!("{run}-live"),
        true,
        live_mem.as_ref().map(|m| m.0.as_path()),
        live_lv.as_deref(),
    );
    t.bare.live.push(took);
    t.bare_pause.1.push(pause);
    // QEMU's downtime of virsh's LIVE snapshot, as libvirt recorded it.
    t.virsh_downtime
        .push(completed_downtime_ms(b).unwrap_or(f64::NAN));
    if block && run == 0 {
        pin_disk_chain(c, b).await;
    }
    let restore_lv = if block { Some(overlay_lv(c).await) } else { None };
    t.bare.restore.push(virsh_restore(
        b,
        dir,
        &format!("{run}"),
        &mem,
        restore_lv.as_deref(),
    ));
    for f in std::fs::read_dir(dir).expect("the virsh directory").flatten() {
        if f.path().extension().is_some_and(|e| e == "mem") {
            let _ = std::fs::remove_file(f.path());
        }
    }
    // virsh's memory LVs go (its disk overlays stay: they are the
    // guest's disk chain).
    for (_, volumes) in paused_mem.into_iter().chain(live_mem) {
        c.drop_volumes(&volumes).await;
    }
}

/// Where the memory of `vm`'s snapshot went: its dump volume's domain.
async fn memory_domain(c: &Cluster, vm: &str, snapshot_id: &str) -> String {
    c.list_snapshots(vm)
        .await
        .into_iter()
        .find(|s| s.snapshot_id == snapshot_id)
        .and_then(|s| s.memory)
        .and_then(|m| m.dump)
        .map(|d| d.domain_id)
        .unwrap_or_default()
}

async fn snapshot(c: &Cluster, vm: &str, mode: pb::MemoryMode, what: &str) -> (f64, String, f64) {
    drop_caches();
    let watch = PauseWatch::start(vm);
    let t = Instant::now();
    let r = c
        .snapshots_api()
        .create_snapshot(pb::CreateSnapshotRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            vm_id: vm.to_string(),
            description: what.to_string(),
            save_memory: true,
            memory_mode: mode as i32,
        })
        .await
        .expect("CreateSnapshot")
        .into_inner();
    let op = c.succeed(r.operation, what).await;
    let took = t.elapsed().as_secs_f64();
    (took, op.snapshot_id, watch.finish())
}

/// virsh snapshot-create-as of B's domain into `dir` (the memory into
/// `memory_target` when given, a block device; the disk overlay onto
/// `disk_target` when given, a block device, as a qcow2 made there
/// beforehand, untimed, and taken with `--reuse-external`, as ramsnap's
/// overlays are); the wall time.
fn virsh_snapshot(
    vm: &str,
    dir: &Path,
    tag: &str,
    live: bool,
    memory_target: Option<&Path>,
    disk_target: Option<&Path>,
) -> (f64, PathBuf, f64) {
    let mem = memory_target.map_or_else(|| dir.join(format!("virsh-{tag}.mem")), Path::to_path_buf);
    let name = domain(vm);
    let (memspec, diskspec, reuse) = match disk_target {
        Some(lv) => {
            let backing = live_disk(vm);
            let format = image_format(&backing);
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", &format, "-b", &backing])
                .arg(lv)
                .output()
                .expect("qemu-img");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            (
                format!("file={},snapshot=external", mem.display()),
                format!("vda,snapshot=external,file={},stype=block", lv.display()),
                true,
            )
        }
        None => (
            format!("file={},snapshot=external", mem.display()),
            format!(
                "vda,snapshot=external,file={}",
                dir.join(format!("virsh-{tag}.qcow2")).display()
            ),
            false,
        ),
    };
    let mut args = vec![
        "snapshot-create-as",
        name.as_str(),
        "--no-metadata",
        "--memspec",
        memspec.as_str(),
        "--diskspec",
        diskspec.as_str(),
    ];
    if live {
        args.push("--live");
    }
    if reuse {
        args.push("--reuse-external");
    }
    drop_caches();
    let watch = PauseWatch::start(vm);
    let t = Instant::now();
    virsh(&args);
    let took = t.elapsed().as_secs_f64();
    (took, mem, watch.finish())
}

/// How long a guest was paused, as libvirt's lifecycle events say, on
/// both domains alike: `virsh event --loop --timestamp` runs beside the
/// step, and each "Suspended" to the next "Resumed" counts. This covers
/// the whole pause (QEMU's downtime plus what libvirt does while the guest
/// is stopped, such as syncing the dump), which QEMU's own "downtime" does
/// not.
struct PauseWatch(std::process::Child);

impl PauseWatch {
    fn start(vm: &str) -> PauseWatch {
        let child = Command::new("virsh")
            .args(["-c", "qemu:///system", "event", "--domain", &domain(vm)])
            .args(["--event", "lifecycle", "--loop", "--timestamp"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("virsh event");
        // virsh registers for events once connected: give it that time,
        // outside the timed step.
        std::thread::sleep(Duration::from_millis(400));
        PauseWatch(child)
    }

    /// Ends the watch: the total pause in ms (NaN when no pause was seen).
    fn finish(mut self) -> f64 {
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.0.kill();
        let out = self.0.wait_with_output().expect("virsh event output");
        paused_ms(&String::from_utf8_lossy(&out.stdout))
    }
}

/// The sum of the Suspended-to-Resumed intervals in `virsh event
/// --timestamp` output ("2026-12-06 16:33:22.814+0000: event 'lifecycle'
/// for domain 'x': Suspended Paused").
fn paused_ms(events: &str) -> f64 {
    let at = |line: &str| -> Option<f64> {
        let time = line.split_whitespace().nth(1)?.split('+').next()?;
        let mut parts = time.split(':');
        let (h, m, s): (f64, f64, f64) = (
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
        );
        Some((h * 3600.0 + m * 60.0 + s) * 1000.0)
    };
    let (mut total, mut since, mut seen) = (0.0, None, false);
    for line in events.lines() {
        if line.contains(": Suspended") {
            since = since.or(at(line));
        } else if line.contains(": Resumed") {
            if let (Some(a), Some(b)) = (since.take(), at(line)) {
                total += b - a;
                seen = true;
            }
        }
    }
    if seen {
        total
    } else {
        f64::NAN
    }
}

/// The median of the values that are numbers; NaN when none is.
fn median_known(v: &[f64]) -> f64 {
    let known: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if known.is_empty() {
        f64::NAN
    } else {
        median(known)
    }
}

/// The format of a disk image, as qemu-img reads it.
fn image_format(path: &str) -> String {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U", path])
        .output()
        .expect("qemu-img info");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img's JSON");
    info["format"].as_str().expect("a format").to_string()
}

/// "Total downtime" of the domain's last completed job (`virsh domjobinfo
/// --completed`), in ms.
fn completed_downtime_ms(vm: &str) -> Option<f64> {
    let out = virsh(&["domjobinfo", &domain(vm), "--completed"]);
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("Total downtime:"))?;
    line.split(':').nth(1)?.split_whitespace().next()?.parse().ok()
}

/// virsh destroy, then virsh restore of `mem` with its disk on a fresh
/// qcow2 overlay (made beforehand, untimed) of the disk the memory was
/// saved with: a file beside the volumes, or `target` when given (an LV:
/// on BLOCK ramsnap's run restores onto an LV overlay); the restore's
/// wall time.
fn virsh_restore(vm: &str, dir: &Path, tag: &str, mem: &Path, target: Option<&Path>) -> f64 {
    let name = domain(vm);
    // Already destroyed when the caller had to (the first run on BLOCK).
    let _ = Command::new("virsh")
        .args(["-c", "qemu:///system", "destroy", &name])
        .output();
    let saved = virsh(&[
        "save-image-dumpxml",
        mem.to_str().expect("utf-8"),
        "--security-info",
    ]);
    let saved = strip_backing(&saved);
    let (kind, frozen) = saved_disk_source(&saved);
    let fresh = target.map_or_else(
        || dir.join(format!("virsh-{tag}-restore.qcow2")),
        Path::to_path_buf,
    );
    let out = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            &image_format(&frozen),
            "-b",
            &frozen,
        ])
        .arg(&fresh)
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (disk_type, attr) = if target.is_some() {
        ("block", "dev")
    } else {
        ("file", "file")
    };
    let xml = saved
        .replacen(
            &format!(
                "<disk type='{}' device='disk'",
                if kind == "dev" { "block" } else { "file" }
            ),
            &format!("<disk type='{disk_type}' device='disk'"),
            1,
        )
        .replacen(
            &format!("<source {kind}='{frozen}'"),
            &format!("<source {attr}='{}'", fresh.display()),
            1,
        );
    let xml_path = dir.join(format!("virsh-{tag}.xml"));
    std::fs::write(&xml_path, xml).expect("writing the XML");
    drop_caches();
    let t = Instant::now();
    virsh(&[
        "restore",
        mem.to_str().expect("utf-8"),
        "--xml",
        xml_path.to_str().expect("utf-8"),
    ]);
    t.elapsed().as_secs_f64()
}

/// The source of the first disk in a domain XML: ("file" or "dev", path).
fn saved_disk_source(xml: &str) -> (&'static str, String) {
    let disk = xml.find("device='disk'").expect("a disk in the saved XML");
    let rest = &xml[disk..];
    for kind in ["file", "dev"] {
        let open = format!("<source {kind}='");
        if let Some(i) = rest.find(&open) {
            let path = &rest[i + open.len()..];
            let end = path.find('\'').expect("a closing quote");
            return (kind, path[..end].to_string());
        }
    }
    panic!("no disk source in the saved XML: {xml}");
}

/// A new pair of memory volumes of `mode`'s size on the BLOCK domain, as
/// ramsnap makes for a snapshot (new extents, zeroed), the dump prepared
/// on this host: where virsh writes its memory, so that both sides write
/// into fresh LVs. The dump's path, and both volumes.
async fn memory_lv(c: &Cluster, mode: st::MemoryDumpMode) -> (PathBuf, Vec<common::VolumeRef>) {
    let made = c
        .storage_as("coordinator")
        .await
        .create_memory_volumes(st::CreateMemoryVolumesRequest {
            request_id: String::new(),
            domain_id: c.block_domain.clone(),
            memory_bytes: MEMORY_MIB * MIB,
            mode: mode as i32,
            description: "virsh's memory target (benchmark)".into(),
        })
        .await
        .expect("CreateMemoryVolumes")
        .into_inner();
    let volumes: Vec<common::VolumeRef> = [&made.dump, &made.metadata]
        .into_iter()
        .map(|v| v.as_ref().and_then(|v| v.r#ref.clone()).expect("a volume"))
        .collect();
    let path = c
        .storage_as_host()
        .await
        .prepare_volume(st::PrepareVolumeRequest {
            r#ref: Some(volumes[0].clone()),
            ..Default::default()
        })
        .await
        .expect("PrepareVolume")
        .into_inner()
        .path;
    (PathBuf::from(path), volumes)
}

/// Destroys B's domain (ramsnap's run of it) and, once the host agent has
/// released B's volumes as it does for a domain gone, prepares B's disk
/// chain again for the benchmark: virsh's overlays and restores are built
/// on it, and ramsnap no longer runs B.
async fn pin_disk_chain(c: &Cluster, vm: &str) {
    let disk = c.get_vm(vm).await.disks[0].clone();
    virsh(&["destroy", &domain(vm)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.get_vm(vm).await.status() != VmStatus::Down {
        assert!(Instant::now() < deadline, "B never went DOWN after virsh destroy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.storage_as_host()
        .await
        .prepare_volume(st::PrepareVolumeRequest {
            r#ref: Some(common::VolumeRef {
                domain_id: disk.domain_id,
                image_id: disk.image_id,
                volume_id: disk.leaf_volume_id,
            }),
            ..Default::default()
        })
        .await
        .expect("PrepareVolume of B's disk");
}

/// A new RAW LV on the BLOCK domain, prepared on this host: where virsh's
/// disk overlay goes, as ramsnap's goes into an LV it prepared.
async fn overlay_lv(c: &Cluster) -> PathBuf {
    let made = c
        .storage_as("coordinator")
        .await
        .create_volume(st::CreateVolumeRequest {
            domain_id: c.block_domain.clone(),
            capacity_bytes: 256 << 20,
            format: st::VolumeFormat::Raw as i32,
            purpose: st::VolumePurpose::Disk as i32,
            description: "virsh's disk overlay (benchmark)".into(),
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner();
    let path = c
        .storage_as_host()
        .await
        .prepare_volume(st::PrepareVolumeRequest {
            r#ref: made.volume.and_then(|v| v.r#ref),
            ..Default::default()
        })
        .await
        .expect("PrepareVolume")
        .into_inner()
        .path;
    PathBuf::from(path)
}

fn main() {
    let runs: usize = std::env::var("RAMSNAP_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let block = std::env::var("RAMSNAP_BENCH_DOMAIN").is_ok_and(|d| d == "block");
    if block && std::env::var_os("RAMSNAP_E2E_BLOCK_PV_BYTES").is_none() {
        // Every run keeps a PAUSED (1.2 GiB) and a LIVE (2.2 GiB) dump
        // volume, and virsh's three disk overlays (snapshots and restore,
        // 768 MiB); virsh's memory LVs, as big as ramsnap's, live for one
        // run.
        let bytes = (6u64 << 30) + runs as u64 * (5 << 30);
        // SAFETY: no other thread runs yet (the runtime starts below).
        unsafe { std::env::set_var("RAMSNAP_E2E_BLOCK_PV_BYTES", bytes.to_string()) };
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(run(runs, block));
}

async fn run(runs: usize, block: bool) {
    // The host agent's step laps ("snapshot step", at debug) in the log.
    let mut c = Cluster::start_embedded(
        Db::Sqlite,
        "3.3",
        "bench-path",
        &[(
            "RUST_LOG",
            "info,ramsnap_host::host=debug,ramsnap_storage::tool=debug",
        )],
    )
    .await;
    let cmdline = format!("{CMDLINE} ramsnap.fill={FILL_MIB}");
    let kind = if block {
        DomainKind::Block
    } else {
        DomainKind::File
    };
    let a = c
        .create_vm_sized("path-a", kind, MEMORY_MIB * MIB, &cmdline)
        .await;
    // B's disk on A's domain: on BLOCK, libvirt flushes the disk it
    // snapshots, and where LVs are loop devices over one PV device that
    // flush writes back every LV's dirty pages (the dump's too); both sides
    // pay it alike.
    let b = c
        .create_vm_sized("path-b", kind, MEMORY_MIB * MIB, &cmdline)
        .await;
    eprintln!("booting two {MEMORY_MIB} MiB guests, {FILL_MIB} MiB of random data each...");
    c.boot(&a).await;
    c.boot(&b).await;
    // The guests fill their RAM at boot: wait until both have ticked past it.
    for vm in [&a, &b] {
        c.wait_counter(vm, 0, 8).await;
    }
    // virsh writes where ramsnap's FILE domain keeps its volumes.
    let dir = if block {
        c.file_root.join("virsh-bench")
    } else {
        Path::new(&live_disk(&b))
            .ancestors()
            .nth(3)
            .expect("the FILE domain's directory")
            .join("virsh-bench")
    };
    std::fs::create_dir_all(&dir).expect("a directory beside the volumes");
    let mut t = Tally::default();
    for run in 0..runs {
        // Every other run, virsh goes first: what one side leaves the
        // machine (page cache just freed, writeback, the host's own
        // memory) falls on both sides alike.
        let virsh_first = run % 2 == 1;
        t.virsh_first.push(virsh_first);
        eprintln!(
            "run {} of {runs} ({} first)",
            run + 1,
            if virsh_first { "virsh" } else { "ramsnap" }
        );
        if virsh_first {
            bare_run(&mut c, &b, &dir, run, block, &mut t).await;
            ours_run(&mut c, &a, block, &mut t).await;
        } else {
            ours_run(&mut c, &a, block, &mut t).await;
            bare_run(&mut c, &b, &dir, run, block, &mut t).await;
        }
    }
    let Tally {
        ours,
        bare,
        paused,
        live,
        restore,
        virsh_downtime,
        ours_pause,
        bare_pause,
        virsh_first,
    } = t;
    let _ = Command::new("virsh")
        .args(["-c", "qemu:///system", "destroy", &domain(&b)])
        .output();

    println!(
        "\n{runs} runs, medians, page cache dropped before each step; {MEMORY_MIB} MiB guests, {FILL_MIB} MiB random; {} domain\n",
        if block { "BLOCK (virsh's memory and disk overlays into LVs of it)" } else { "FILE" }
    );
    println!("| path | ramsnap (gRPC, coordinator) | virsh | ratio | ramsnap runs | virsh runs |");
    println!("|---|---|---|---|---|---|");
    for (what, o, b) in [
        ("snapshot with memory, PAUSED", &ours.paused, &bare.paused),
        ("snapshot with memory, LIVE", &ours.live, &bare.live),
        (
            "run with restore, to UP / virsh restore",
            &ours.restore,
            &bare.restore,
        ),
    ] {
        let runs = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" ");
        let (or, br) = (runs(o), runs(b));
        let (o, b) = (median(o.clone()), median(b.clone()));
        println!("| {what} | {o:.2} s | {b:.2} s | {:.2} | {or} | {br} |", o / b);
    }
    // The order's effect: each side's median when its part went first in
    // the run, and when second.
    println!("\n| path | ramsnap first / second in its run | virsh first / second |");
    println!("|---|---|---|");
    for (what, o, b) in [
        ("PAUSED", &ours.paused, &bare.paused),
        ("LIVE", &ours.live, &bare.live),
        ("restore", &ours.restore, &bare.restore),
    ] {
        println!(
            "| {what} | {} / {} | {} / {} |",
            median_where(o, &virsh_first, false),
            median_where(o, &virsh_first, true),
            median_where(b, &virsh_first, true),
            median_where(b, &virsh_first, false),
        );
    }
    println!(
        "\nLIVE snapshot, QEMU's downtime (libvirt's completed job): ramsnap {:.0} ms, virsh {:.0} ms",
        median_known(&live.downtimes),
        median_known(&virsh_downtime)
    );
    println!(
        "Guest pause (libvirt's lifecycle events, Suspended to Resumed): PAUSED ramsnap {:.0} ms, virsh {:.0} ms; LIVE ramsnap {:.0} ms, virsh {:.0} ms",
        median_known(&ours_pause.0),
        median_known(&bare_pause.0),
        median_known(&ours_pause.1),
        median_known(&bare_pause.1),
    );
    paused.print("ramsnap, snapshot with memory, PAUSED:");
    live.print("ramsnap, snapshot with memory, LIVE:");
    restore.print("ramsnap, run with restore:");
}
